// The entry points of kernels/softmax.cu that the SIMT harness can launch (harness.cpp
// #includes this inside its kernel table; signatures come from the declarations).
#if SOFTMAX_ENABLE_F32
SIMT_KERNEL(softmax_forward_f32)
SIMT_KERNEL(log_softmax_forward_f32)
SIMT_KERNEL(softmax_backward_f32)
SIMT_KERNEL(log_softmax_backward_f32)
SIMT_KERNEL(cross_entropy_forward_f32)
SIMT_KERNEL(cross_entropy_backward_f32)
#endif
#if SOFTMAX_ENABLE_F64
SIMT_KERNEL(softmax_forward_f64)
SIMT_KERNEL(log_softmax_forward_f64)
SIMT_KERNEL(softmax_backward_f64)
SIMT_KERNEL(log_softmax_backward_f64)
SIMT_KERNEL(cross_entropy_forward_f64)
SIMT_KERNEL(cross_entropy_backward_f64)
#endif
