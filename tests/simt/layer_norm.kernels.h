// The entry points of kernels/layer_norm.cu that the SIMT harness can launch (harness.cpp
// #includes this inside its kernel table; signatures come from the declarations).
#if LN_ENABLE_F32
SIMT_KERNEL(layer_norm_forward_f32)
SIMT_KERNEL(layer_norm_backward_f32)
SIMT_KERNEL(layer_norm_param_reduce_f32)
SIMT_KERNEL(layer_norm_add_forward_f32)
SIMT_KERNEL(layer_norm_add_backward_f32)
#endif
#if LN_ENABLE_F64
SIMT_KERNEL(layer_norm_forward_f64)
SIMT_KERNEL(layer_norm_backward_f64)
SIMT_KERNEL(layer_norm_param_reduce_f64)
SIMT_KERNEL(layer_norm_add_forward_f64)
SIMT_KERNEL(layer_norm_add_backward_f64)
#endif
