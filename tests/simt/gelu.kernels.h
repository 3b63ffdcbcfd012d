// The entry points of kernels/gelu.cu that the SIMT harness can launch (harness.cpp
// #includes this inside its kernel table; signatures come from the declarations).
#if GELU_ENABLE_F32
SIMT_KERNEL(gelu_forward_f32)
SIMT_KERNEL(gelu_backward_f32)
SIMT_KERNEL(bias_gelu_forward_f32)
SIMT_KERNEL(bias_gelu_backward_f32)
SIMT_KERNEL(bias_gelu_bias_reduce_f32)
SIMT_KERNEL(bias_relu_forward_f32)
SIMT_KERNEL(bias_relu_backward_f32)
#endif
#if GELU_ENABLE_F64
SIMT_KERNEL(gelu_forward_f64)
SIMT_KERNEL(gelu_backward_f64)
SIMT_KERNEL(bias_gelu_forward_f64)
SIMT_KERNEL(bias_gelu_backward_f64)
SIMT_KERNEL(bias_gelu_bias_reduce_f64)
SIMT_KERNEL(bias_relu_forward_f64)
SIMT_KERNEL(bias_relu_backward_f64)
#endif
