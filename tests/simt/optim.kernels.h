// The entry points of kernels/optim.cu that the SIMT harness can launch (harness.cpp
// #includes this inside its kernel table; signatures come from the declarations).
#if OPT_ENABLE_F32
SIMT_KERNEL(adam_foreach_f32)
SIMT_KERNEL(sgd_foreach_f32)
#endif
#if OPT_ENABLE_F64
SIMT_KERNEL(adam_foreach_f64)
SIMT_KERNEL(sgd_foreach_f64)
#endif
