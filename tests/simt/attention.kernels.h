// The entry points of kernels/attention.cu that the SIMT harness can launch (harness.cpp
// #includes this inside its kernel table; signatures come from the declarations).
#if ATT_ENABLE_F32
SIMT_KERNEL(attention_forward_f32)
SIMT_KERNEL(attention_backward_f32)
#endif
#if ATT_ENABLE_F64
SIMT_KERNEL(attention_forward_f64)
SIMT_KERNEL(attention_backward_f64)
#endif
