// CUDA kernels of softmax, log-softmax and softmax cross-entropy over the rows of (R, C) arrays.
// diagnet/fused/softmax.py holds the CPU kernels with the same semantics; the composed array
// code of diagnet/ops/activation.py and diagnet/ops/loss.py is the reference both reproduce.
//
// Rows: every leading dimension flattened, R of them; C: the row width (classes, keys).
// x, y, gy, gx, z, gz are (R, C); labels, losses, shift, log_sum are (R,); all contiguous and
// row-major, of the kernel's dtype (labels: int64). With m the row max and s = sum_j exp(x_j - m):
//
//   softmax:              y_j = exp(x_j - m) / s
//   log_softmax:          y_j = (x_j - m) - log(s)
//   softmax backward:     gx_j = y_j * (gy_j - sum_k gy_k y_k)
//   log_softmax backward: gx_j = gy_j - exp(y_j) * sum_k gy_k
//   cross entropy, label l, keep = 1 - eps, smooth = eps / C (eps the label smoothing):
//     loss  = -keep * ((z_l - m) - log(s)) - smooth * (sum_j (z_j - m) - C * log(s))
//             (the smoothing term only when eps != 0: with eps = 0 a -inf logit must not
//             make the loss 0 * inf = NaN)
//     saved: shift = m and log_sum = log(s), from which the backward rebuilds the softmax
//     gz_j  = (p_j - smooth - keep * [j == l]) * scale[r * scale_stride] / divisor,
//             p_j = exp((z_j - m) - log_sum)
//
// NaN and inf as in the references: the max skips NaN, but a NaN entry makes s NaN and with it
// the whole row; a -inf entry gets probability exactly 0; a row of -inf has m = -inf, so
// x - m is NaN and the row is NaN. A label outside [0, C) makes its row's loss, shift and
// log_sum NaN (and so its gradient); no logit outside the row is read. (diagnet.ops.loss
// range-checks host labels before the launch; labels that live on the GPU are checked here.)
//
// Kernels (extern "C", one set per dtype, suffix _f32 / _f64):
//   softmax_forward_*, log_softmax_forward_*, softmax_backward_*, log_softmax_backward_*,
//   cross_entropy_forward_*, cross_entropy_backward_*
//
// Block shape (chosen by the launcher, diagnet/fused/softmax_cuda.py `launch_config`):
// blockDim.x threads share one row (a power of two), blockDim.y rows per block, at most
// SOFTMAX_THREADS threads in all; rows beyond the grid are walked in a grid-stride loop whose
// trip count depends on blockIdx only, so every thread reaches every barrier. A row's max and
// sums are trees over blockDim.x in static shared memory with __syncthreads: no warp shuffles,
// atomics or dynamic shared memory, so the SIMT emulation harness (tests/simt) runs these
// kernels unchanged, and the results do not depend on scheduling. Arithmetic is in the
// kernel's dtype.
//
// No #include: NVRTC compiles this without the host toolkit headers, and the emulation
// harness compiles it as plain C++ after its shim header.

// ---- tuning constants (the launcher passes each as a -D option) ------------------------

// Threads per block: the size of the shared reduction array.
#ifndef SOFTMAX_THREADS
#define SOFTMAX_THREADS 256
#endif

// Which dtypes to instantiate; the launcher compiles one dtype per module.
#ifndef SOFTMAX_ENABLE_F32
#define SOFTMAX_ENABLE_F32 1
#endif
#ifndef SOFTMAX_ENABLE_F64
#define SOFTMAX_ENABLE_F64 1
#endif

static_assert(SOFTMAX_THREADS >= 1 && SOFTMAX_THREADS <= 1024 &&
                  (SOFTMAX_THREADS & (SOFTMAX_THREADS - 1)) == 0,
              "SOFTMAX_THREADS must be a power of two in [1, 1024]");

// ---- row reductions --------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ T sm_neg_inf()
{
    return -T(1) / T(0);
}

template <typename T>
__device__ __forceinline__ T sm_nan()
{
    return sqrt(T(-1));
}

struct SmMax {
    // b > a is false for a NaN b: the max skips NaN, as the CPU kernels' does
    template <typename T>
    __device__ __forceinline__ static T apply(T a, T b) { return b > a ? b : a; }
};

struct SmSum {
    template <typename T>
    __device__ __forceinline__ static T apply(T a, T b) { return a + b; }
};

// Op over the values v of the blockDim.x threads of this thread row, returned to every thread
// of the row. Every thread of the block must call it (it holds barriers), with blockDim.x a
// power of two; s holds one slot per thread of the block.
template <typename Op, typename T>
__device__ __forceinline__ T sm_row_reduce(T v, T* s)
{
    const int tx = (int)threadIdx.x;
    const int base = (int)(threadIdx.y * blockDim.x);
    s[base + tx] = v;
    __syncthreads();
    for (int half = (int)blockDim.x / 2; half > 0; half >>= 1) {
        if (tx < half) s[base + tx] = Op::apply(s[base + tx], s[base + tx + half]);
        __syncthreads();
    }
    v = s[base];
    __syncthreads();  // everyone has read the result before the next call overwrites it
    return v;
}

// The max of row xr (width C) over this thread row; -inf for rows that are not there.
template <typename T>
__device__ __forceinline__ T sm_row_max(const T* __restrict__ xr, int C, bool row_ok, T* s)
{
    T m = sm_neg_inf<T>();
    if (row_ok)
        for (int j = (int)threadIdx.x; j < C; j += (int)blockDim.x) m = SmMax::apply(m, xr[j]);
    return sm_row_reduce<SmMax>(m, s);
}

// ---- softmax and log-softmax -----------------------------------------------------------
//
// Thread row ty of a block handles one row at a time, walking groups of blockDim.y rows in a
// grid-stride loop. Each thread reads its columns j = tx, tx + blockDim.x, ... twice (max,
// then the exponentials); softmax keeps the exponentials in y and scales them in a third pass
// over its own outputs, which are still in the cache.

template <typename T>
__device__ __forceinline__ void sm_forward(const T* __restrict__ x, T* __restrict__ y, int R,
                                           int C, bool log_out, T* s)
{
    const int tx = (int)threadIdx.x;
    const int bx = (int)blockDim.x;
    for (long long r0 = (long long)blockIdx.x * blockDim.y; r0 < R;
         r0 += (long long)gridDim.x * blockDim.y) {
        const long long r = r0 + threadIdx.y;
        const bool row_ok = r < R;  // rows past R still reach every barrier
        const T* __restrict__ xr = x + (row_ok ? r : 0) * C;  // 64-bit: R * C may exceed 2^31
        T* __restrict__ yr = y + (row_ok ? r : 0) * C;

        const T m = sm_row_max(xr, C, row_ok, s);
        T sum = T(0);
        if (row_ok)
            for (int j = tx; j < C; j += bx) {
                const T e = exp(xr[j] - m);
                if (!log_out) yr[j] = e;
                sum += e;
            }
        sum = sm_row_reduce<SmSum>(sum, s);

        if (!row_ok) continue;
        if (log_out) {
            const T log_s = log(sum);
            for (int j = tx; j < C; j += bx) yr[j] = (xr[j] - m) - log_s;
        } else {
            const T inv = T(1) / sum;
            for (int j = tx; j < C; j += bx) yr[j] *= inv;
        }
    }
}

template <typename T>
__device__ __forceinline__ void sm_backward(const T* __restrict__ y, const T* __restrict__ gy,
                                            T* __restrict__ gx, int R, int C, bool log_out,
                                            T* s)
{
    const int tx = (int)threadIdx.x;
    const int bx = (int)blockDim.x;
    for (long long r0 = (long long)blockIdx.x * blockDim.y; r0 < R;
         r0 += (long long)gridDim.x * blockDim.y) {
        const long long r = r0 + threadIdx.y;
        const bool row_ok = r < R;
        const long long off = (row_ok ? r : 0) * C;
        const T* __restrict__ yr = y + off;
        const T* __restrict__ gyr = gy + off;

        // softmax: sum_k gy_k y_k; log-softmax: sum_k gy_k
        T acc = T(0);
        if (row_ok)
            for (int j = tx; j < C; j += bx) acc += log_out ? gyr[j] : gyr[j] * yr[j];
        acc = sm_row_reduce<SmSum>(acc, s);

        if (!row_ok) continue;
        T* __restrict__ gxr = gx + off;
        for (int j = tx; j < C; j += bx)
            gxr[j] = log_out ? gyr[j] - exp(yr[j]) * acc : yr[j] * (gyr[j] - acc);
    }
}

// ---- cross-entropy ---------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void sm_cross_entropy_forward(
    const T* __restrict__ z, const long long* __restrict__ labels, T* __restrict__ losses,
    T* __restrict__ shift, T* __restrict__ log_sum, int R, int C, T keep, T smooth,
    int smoothing, T* s)
{
    const int tx = (int)threadIdx.x;
    const int bx = (int)blockDim.x;
    for (long long r0 = (long long)blockIdx.x * blockDim.y; r0 < R;
         r0 += (long long)gridDim.x * blockDim.y) {
        const long long r = r0 + threadIdx.y;
        const long long label = r < R ? labels[r] : 0;
        const bool row_ok = r < R && label >= 0 && label < C;  // else NaN, after the barriers
        const T* __restrict__ zr = z + (row_ok ? r : 0) * C;

        const T m = sm_row_max(zr, C, row_ok, s);
        T sum = T(0);
        T shifted = T(0);  // sum_j (z_j - m): sum_j logp_j = shifted - C * log(s)
        if (row_ok)
            for (int j = tx; j < C; j += bx) {
                const T d = zr[j] - m;
                sum += exp(d);
                shifted += d;
            }
        sum = sm_row_reduce<SmSum>(sum, s);
        shifted = sm_row_reduce<SmSum>(shifted, s);

        if (r >= R || tx != 0) continue;
        if (!row_ok) {
            losses[r] = shift[r] = log_sum[r] = sm_nan<T>();
            continue;
        }
        const T log_s = log(sum);
        T loss = -keep * ((zr[label] - m) - log_s);
        if (smoothing) loss -= smooth * (shifted - T(C) * log_s);
        losses[r] = loss;
        shift[r] = m;
        log_sum[r] = log_s;
    }
}

// No reduction: every element is independent, but the row layout of the other kernels is kept
// (one launch geometry for the file; a thread row's loads of shift and log_sum are shared).
template <typename T>
__device__ __forceinline__ void sm_cross_entropy_backward(
    const T* __restrict__ z, const long long* __restrict__ labels, const T* __restrict__ shift,
    const T* __restrict__ log_sum, const T* __restrict__ scale, T* __restrict__ gz, int R,
    int C, T keep, T smooth, int scale_stride, T divisor)
{
    const int tx = (int)threadIdx.x;
    const int bx = (int)blockDim.x;
    for (long long r0 = (long long)blockIdx.x * blockDim.y; r0 < R;
         r0 += (long long)gridDim.x * blockDim.y) {
        const long long r = r0 + threadIdx.y;
        if (r >= R) continue;
        const T* __restrict__ zr = z + r * C;
        T* __restrict__ gzr = gz + r * C;
        const T m = shift[r];
        const T log_s = log_sum[r];  // NaN for a label out of range: the row comes out NaN
        const T k = scale[r * scale_stride] / divisor;
        const long long label = labels[r];
        for (int j = tx; j < C; j += bx) {
            T g = exp((zr[j] - m) - log_s) - smooth;
            if (j == label) g -= keep;
            gzr[j] = g * k;
        }
    }
}

// ---- extern "C" entry points ---------------------------------------------------------------
//
// Unmangled names for cupy.RawModule.get_function and the emulation harness. Shared memory is
// declared here, in the __global__ functions, with a static size. The launch bounds name the
// block size and, explicitly, one block per SM: with the block size alone, ptxas of nvcc 13
// held some of these kernels to 32 registers and spilled.

#define SOFTMAX_KERNEL extern "C" __global__ void __launch_bounds__(SOFTMAX_THREADS, 1)

#define SOFTMAX_DEFINE_KERNELS(T, SUFFIX)                                                       \
    SOFTMAX_KERNEL softmax_forward_##SUFFIX(const T* __restrict__ x, T* __restrict__ y, int R, \
                                            int C)                                             \
    {                                                                                          \
        __shared__ T s[SOFTMAX_THREADS];                                                       \
        sm_forward<T>(x, y, R, C, false, s);                                                   \
    }                                                                                          \
                                                                                               \
    SOFTMAX_KERNEL log_softmax_forward_##SUFFIX(const T* __restrict__ x, T* __restrict__ y,    \
                                                int R, int C)                                  \
    {                                                                                          \
        __shared__ T s[SOFTMAX_THREADS];                                                       \
        sm_forward<T>(x, y, R, C, true, s);                                                    \
    }                                                                                          \
                                                                                               \
    SOFTMAX_KERNEL softmax_backward_##SUFFIX(const T* __restrict__ y, const T* __restrict__ gy, \
                                             T* __restrict__ gx, int R, int C)                 \
    {                                                                                          \
        __shared__ T s[SOFTMAX_THREADS];                                                       \
        sm_backward<T>(y, gy, gx, R, C, false, s);                                             \
    }                                                                                          \
                                                                                               \
    SOFTMAX_KERNEL log_softmax_backward_##SUFFIX(const T* __restrict__ y,                      \
                                                 const T* __restrict__ gy, T* __restrict__ gx, \
                                                 int R, int C)                                 \
    {                                                                                          \
        __shared__ T s[SOFTMAX_THREADS];                                                       \
        sm_backward<T>(y, gy, gx, R, C, true, s);                                              \
    }                                                                                          \
                                                                                               \
    SOFTMAX_KERNEL cross_entropy_forward_##SUFFIX(                                             \
        const T* __restrict__ z, const long long* __restrict__ labels, T* __restrict__ losses, \
        T* __restrict__ shift, T* __restrict__ log_sum, int R, int C, T keep, T smooth,       \
        int smoothing)                                                                         \
    {                                                                                          \
        __shared__ T s[SOFTMAX_THREADS];                                                       \
        sm_cross_entropy_forward<T>(z, labels, losses, shift, log_sum, R, C, keep, smooth,     \
                                    smoothing, s);                                             \
    }                                                                                          \
                                                                                               \
    SOFTMAX_KERNEL cross_entropy_backward_##SUFFIX(                                            \
        const T* __restrict__ z, const long long* __restrict__ labels,                         \
        const T* __restrict__ shift, const T* __restrict__ log_sum,                            \
        const T* __restrict__ scale, T* __restrict__ gz, int R, int C, T keep, T smooth,       \
        int scale_stride, T divisor)                                                           \
    {                                                                                          \
        sm_cross_entropy_backward<T>(z, labels, shift, log_sum, scale, gz, R, C, keep, smooth, \
                                     scale_stride, divisor);                                   \
    }

#if SOFTMAX_ENABLE_F32
SOFTMAX_DEFINE_KERNELS(float, f32)
#endif
#if SOFTMAX_ENABLE_F64
SOFTMAX_DEFINE_KERNELS(double, f64)
#endif
