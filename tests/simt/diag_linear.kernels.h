// The entry points of kernels/diag_linear.cu that the SIMT harness can launch (harness.cpp
// #includes this inside its kernel table; signatures come from the declarations).
#if DIAG_ENABLE_F32
SIMT_KERNEL(diag_forward_f32)
SIMT_KERNEL(diag_input_grad_f32)
SIMT_KERNEL(diag_value_grad_f32)
SIMT_KERNEL(diag_value_grad_reduce_f32)
#endif
#if DIAG_ENABLE_F64
SIMT_KERNEL(diag_forward_f64)
SIMT_KERNEL(diag_input_grad_f64)
SIMT_KERNEL(diag_value_grad_f64)
SIMT_KERNEL(diag_value_grad_reduce_f64)
#endif
