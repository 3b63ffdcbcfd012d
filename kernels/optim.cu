// CUDA kernels of the "foreach" optimizers: one launch updates every parameter of a run (a
// stretch of a parameter group sharing dtype, step count and options), instead of about ten
// CuPy element-wise launches per parameter. diagnet/optim/adam.py and sgd.py hold the update
// formulas and the NumPy/CuPy code (`_update`) these kernels reproduce bit for bit;
// diagnet/optim/_foreach_cuda.py launches them.
//
// The parameters of a run are n arrays of different sizes, seen as one index space of
// `total` elements: parameter k owns the elements [offsets[k], offsets[k + 1]) (offsets is
// (n + 1,), int64, offsets[0] = 0, offsets[n] = total). Each thread walks that space in a
// grid-stride loop and finds the parameter of an element by a binary search over offsets.
//
// The arrays themselves travel as a table of device addresses, role-major:
// addresses[r * n + k] is the address of array r of parameter k (a C-contiguous array of the
// kernel's dtype with the parameter's size), the roles being
//   adam_foreach:  0 param, 1 grad, 2 exp_avg, 3 exp_avg_sq, 4 max_exp_avg_sq (amsgrad only)
//   sgd_foreach:   0 param, 1 grad, 2 momentum_buffer (momentum only)
// No two arrays of a launch overlap (the launcher checks), so the threads never race.
//
// Bit for bit: the per-parameter code does one rounded operation per CuPy launch (m *= b1,
// then m += c1 * g, ...), in the array dtype, with the Python-float hyperparameters cast to
// that dtype. Every operation here is the same IEEE operation in the same order, spelled
// with the round-to-nearest intrinsics (__fmul_rn, __fadd_rn, ...) that the compiler never
// contracts into a fused multiply-add, whatever the -fmad setting.
//
// No #include: NVRTC compiles this without the host toolkit headers, and the SIMT emulation
// harness (tests/simt) compiles it as plain C++ after its shim header.

// Which dtypes to instantiate; the launcher compiles one dtype per module.
#ifndef OPT_ENABLE_F32
#define OPT_ENABLE_F32 1
#endif
#ifndef OPT_ENABLE_F64
#define OPT_ENABLE_F64 1
#endif

// Adam's weight_decay_mode argument.
#define OPT_WD_NONE 0
#define OPT_WD_L2 1         // Adam: g = g + wd * p
#define OPT_WD_DECOUPLED 2  // AdamW: p = p * (1 - lr * wd)

// ---- one rounding per operation ---------------------------------------------------------

__device__ __forceinline__ float opt_add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float opt_sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float opt_mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float opt_div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ float opt_sqrt(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double opt_add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double opt_sub(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ double opt_mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double opt_div(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ double opt_sqrt(double a) { return __dsqrt_rn(a); }

// ---- finding an element's parameter ------------------------------------------------------

// The parameter owning element i (0 <= i < offsets[n]): the last k with offsets[k] <= i, so
// that an empty parameter (offsets[k] == offsets[k + 1]) never owns anything.
__device__ __forceinline__ int opt_owner(const long long* __restrict__ offsets, int n,
                                         long long i)
{
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        const int mid = lo + (hi - lo + 1) / 2;
        if (offsets[mid] <= i) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    return lo;
}

// Array `role` of parameter k.
template <typename T>
__device__ __forceinline__ T* opt_array(const unsigned long long* __restrict__ addresses,
                                        int role, int n, int k)
{
    return reinterpret_cast<T*>(addresses[(long long)role * n + k]);
}

// ---- Adam / AdamW ------------------------------------------------------------------------

// Per element, as Adam._update: g = -g (maximize); g = g + wd * p (L2) or p = p * decay
// (decoupled); m = m * b1 + c1 * g; v = v * b2 + (c2 * g) * g; with amsgrad v_max =
// max(v_max, v) (a NaN in either wins, as in NumPy and CuPy) and v = v_max;
// p = p - (m / (sqrt(v) / s2 + eps)) * lr_t.
// Scalars: c1 = 1 - b1, c2 = 1 - b2, s2 = sqrt(1 - b2^t), lr_t = lr / (1 - b1^t),
// decay = 1 - lr * wd, each computed in double on the host and rounded to T.
template <typename T>
__device__ __forceinline__ void adam_foreach(
    const unsigned long long* __restrict__ addresses, const long long* __restrict__ offsets,
    int n, long long total, int maximize, int weight_decay_mode, int amsgrad, T b1, T c1, T b2,
    T c2, T s2, T eps, T lr_t, T wd, T decay)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const int k = opt_owner(offsets, n, i);
        const long long j = i - offsets[k];
        T* p = opt_array<T>(addresses, 0, n, k);
        const T* g = opt_array<T>(addresses, 1, n, k);
        T* m = opt_array<T>(addresses, 2, n, k);
        T* v = opt_array<T>(addresses, 3, n, k);

        T gi = maximize ? -g[j] : g[j];
        T pi = p[j];
        if (weight_decay_mode == OPT_WD_L2) {
            gi = opt_add(gi, opt_mul(wd, pi));
        } else if (weight_decay_mode == OPT_WD_DECOUPLED) {
            pi = opt_mul(pi, decay);
        }
        const T mi = opt_add(opt_mul(m[j], b1), opt_mul(c1, gi));
        T vi = opt_add(opt_mul(v[j], b2), opt_mul(opt_mul(c2, gi), gi));
        m[j] = mi;
        v[j] = vi;
        if (amsgrad) {
            T* v_max = opt_array<T>(addresses, 4, n, k);
            T vm = v_max[j];
            if (vi > vm || vi != vi) {
                vm = vi;
            }
            v_max[j] = vm;
            vi = vm;
        }
        const T denom = opt_add(opt_div(opt_sqrt(vi), s2), eps);
        p[j] = opt_sub(pi, opt_mul(opt_div(mi, denom), lr_t));
    }
}

// ---- SGD -----------------------------------------------------------------------------------

// Per element, as SGD._update: g = -g (maximize); g = g + wd * p (decay); with momentum
// buf = g on the first step (first), else buf = buf * mu + c * g, and g = g + mu * buf
// (nesterov) or g = buf; p = p - lr * g. Scalars: c = 1 - dampening, rounded to T.
template <typename T>
__device__ __forceinline__ void sgd_foreach(
    const unsigned long long* __restrict__ addresses, const long long* __restrict__ offsets,
    int n, long long total, int maximize, int decay, int momentum, int nesterov, int first,
    T lr, T wd, T mu, T c)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const int k = opt_owner(offsets, n, i);
        const long long j = i - offsets[k];
        T* p = opt_array<T>(addresses, 0, n, k);
        const T* g = opt_array<T>(addresses, 1, n, k);

        T gi = maximize ? -g[j] : g[j];
        const T pi = p[j];
        if (decay) {
            gi = opt_add(gi, opt_mul(wd, pi));
        }
        if (momentum) {
            T* buf = opt_array<T>(addresses, 2, n, k);
            const T bi = first ? gi : opt_add(opt_mul(buf[j], mu), opt_mul(c, gi));
            buf[j] = bi;
            gi = nesterov ? opt_add(gi, opt_mul(mu, bi)) : bi;
        }
        p[j] = opt_sub(pi, opt_mul(lr, gi));
    }
}

// ---- entry points ------------------------------------------------------------------------

#define OPT_ENTRY_POINTS(T, SUFFIX)                                                            \
    extern "C" __global__ void adam_foreach_##SUFFIX(                                        \
        const unsigned long long* __restrict__ addresses,                                     \
        const long long* __restrict__ offsets, int n, long long total, int maximize,          \
        int weight_decay_mode, int amsgrad, T b1, T c1, T b2, T c2, T s2, T eps, T lr_t,     \
        T wd, T decay)                                                                        \
    {                                                                                         \
        adam_foreach<T>(addresses, offsets, n, total, maximize, weight_decay_mode, amsgrad,   \
                        b1, c1, b2, c2, s2, eps, lr_t, wd, decay);                            \
    }                                                                                         \
    extern "C" __global__ void sgd_foreach_##SUFFIX(                                         \
        const unsigned long long* __restrict__ addresses,                                     \
        const long long* __restrict__ offsets, int n, long long total, int maximize,          \
        int decay, int momentum, int nesterov, int first, T lr, T wd, T mu, T c)              \
    {                                                                                         \
        sgd_foreach<T>(addresses, offsets, n, total, maximize, decay, momentum, nesterov,     \
                       first, lr, wd, mu, c);                                                 \
    }

#if OPT_ENABLE_F32
OPT_ENTRY_POINTS(float, f32)
#endif
#if OPT_ENABLE_F64
OPT_ENTRY_POINTS(double, f64)
#endif
