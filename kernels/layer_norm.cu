// CUDA kernels of the fused layer norm (diagnet/fused/layer_norm.py holds the math and the
// NumPy reference they must reproduce).
//
// Rows: every leading dimension of the input flattened, R of them; N: the normalised width.
// x, y, dy, dx are (R, N), weight and bias (N,), mean and rstd (R,); all contiguous and
// row-major, all of the kernel's dtype.
//
//   forward:   mean = sum_j x_j / N,  var = sum_j (x_j - mean)^2 / N,  rstd = 1 / sqrt(var + eps)
//              y_j = (x_j - mean) * rstd * weight_j + bias_j
//   backward:  xhat_j = (x_j - mean) * rstd,  g_j = dy_j * weight_j
//              dx_j = rstd * (g_j - sum_k g_k / N - xhat_j * sum_k g_k xhat_k / N)
//              dweight_j = sum_rows dy_j xhat_j,  dbias_j = sum_rows dy_j
//
// Kernels (extern "C", one set per dtype, suffix _f32 / _f64):
//   layer_norm_forward_*        y, and mean and rstd for the backward
//   layer_norm_backward_*       dx, and per-thread-row partial sums of dweight and dbias
//   layer_norm_param_reduce_*   adds the partial sums up, in a fixed order
//   layer_norm_add_forward_*    total = x + res written in the first pass over each row, and
//                               the forward of total (a pre-norm transformer's residual add)
//   layer_norm_add_backward_*   the backward of total, plus gtotal (the gradient total has
//                               besides the layer norm's) added into dx as it is written
//
// Block shape (chosen by the launcher, diagnet/fused/layer_norm_cuda.py `launch_config`):
// blockDim.x threads share one row (a power of two), blockDim.y rows per block, at most
// LN_THREADS threads in all. A row's sums are reduced by a tree over blockDim.x in static
// shared memory with __syncthreads: no warp shuffles, atomics or dynamic shared memory, so
// the SIMT emulation harness (tests/simt) runs these kernels unchanged, and the results do
// not depend on scheduling.
//
// No #include: NVRTC compiles this without the host toolkit headers, and the emulation
// harness compiles it as plain C++ after its shim header.

// ---- tuning constants (the launcher passes each as a -D option) ------------------------

// Threads per block of the forward and backward: the size of their shared reduction arrays.
#ifndef LN_THREADS
#define LN_THREADS 256
#endif
// The partial-sum reduction: a block is LN_REDUCE_X columns by LN_REDUCE_Y lanes that
// stride over the partial rows and are then summed by a tree.
#ifndef LN_REDUCE_X
#define LN_REDUCE_X 32
#endif
#ifndef LN_REDUCE_Y
#define LN_REDUCE_Y 8
#endif

// Which dtypes to instantiate; the launcher compiles one dtype per module.
#ifndef LN_ENABLE_F32
#define LN_ENABLE_F32 1
#endif
#ifndef LN_ENABLE_F64
#define LN_ENABLE_F64 1
#endif

static_assert(LN_THREADS >= 1 && LN_THREADS <= 1024 && (LN_THREADS & (LN_THREADS - 1)) == 0,
              "LN_THREADS must be a power of two in [1, 1024]");
static_assert(LN_REDUCE_X >= 1 && LN_REDUCE_Y >= 1 && LN_REDUCE_X * LN_REDUCE_Y <= 1024,
              "bad reduction block");
static_assert((LN_REDUCE_Y & (LN_REDUCE_Y - 1)) == 0, "the tree halves LN_REDUCE_Y");

// ---- row sums ------------------------------------------------------------------------------

// The sums of a and b over the blockDim.x threads of this thread row, returned to every thread
// of the row. Every thread of the block must call it (it holds barriers), with blockDim.x a
// power of two. s_a and s_b hold one slot per thread.
template <typename T>
__device__ __forceinline__ void ln_row_sums(T& a, T& b, T* s_a, T* s_b)
{
    const int tx = (int)threadIdx.x;
    const int base = (int)(threadIdx.y * blockDim.x);
    s_a[base + tx] = a;
    s_b[base + tx] = b;
    __syncthreads();
    for (int s = (int)blockDim.x / 2; s > 0; s >>= 1) {
        if (tx < s) {
            s_a[base + tx] += s_a[base + tx + s];
            s_b[base + tx] += s_b[base + tx + s];
        }
        __syncthreads();
    }
    a = s_a[base];
    b = s_b[base];
    __syncthreads();  // everyone has read the sums before the next call overwrites them
}

// ---- forward ---------------------------------------------------------------------------------
//
// Thread row ty of a block normalises one row at a time, walking groups of blockDim.y rows in a
// grid-stride loop (the trip count depends on blockIdx only, so the barriers stay uniform).
// Each thread reads its columns j = tx, tx + blockDim.x, ... three times (sum, squared
// deviations, output); the second and third reads hit the cache.
// With has_res, the first read forms x_j + res_j and writes it to total; the second and third
// reads take total instead of x (each thread reads back only the columns it wrote).
template <typename T>
__device__ __forceinline__ void ln_forward(const T* __restrict__ x, const T* __restrict__ res,
                                           T* __restrict__ total, const T* __restrict__ weight,
                                           const T* __restrict__ bias, T* __restrict__ y,
                                           T* __restrict__ mean, T* __restrict__ rstd, int R,
                                           int N, int has_res, int has_weight, int has_bias,
                                           T eps, T* s_a, T* s_b)
{
    const int tx = (int)threadIdx.x;
    const int bx = (int)blockDim.x;
    for (long long r0 = (long long)blockIdx.x * blockDim.y; r0 < R;
         r0 += (long long)gridDim.x * blockDim.y) {
        const long long r = r0 + threadIdx.y;
        const bool row_ok = r < R;  // rows past R still reach every barrier
        const long long rr = row_ok ? r : 0;  // 64-bit: R * N may exceed 2^31
        const T* xr = x + rr * N;

        T sum = T(0);
        T unused = T(0);
        if (row_ok) {
            if (has_res) {
                const T* __restrict__ resr = res + rr * N;
                T* __restrict__ totr = total + rr * N;
                for (int j = tx; j < N; j += bx) {
                    const T v = xr[j] + resr[j];
                    totr[j] = v;
                    sum += v;
                }
                xr = totr;  // the rest of the row's passes read the sum
            } else {
                for (int j = tx; j < N; j += bx) sum += xr[j];
            }
        }
        ln_row_sums(sum, unused, s_a, s_b);
        const T mu = sum / T(N);

        T sq = T(0);
        if (row_ok)
            for (int j = tx; j < N; j += bx) {
                const T d = xr[j] - mu;
                sq += d * d;
            }
        ln_row_sums(sq, unused, s_a, s_b);
        const T rs = T(1) / sqrt(sq / T(N) + eps);

        if (row_ok) {
            T* __restrict__ yr = y + r * N;
            for (int j = tx; j < N; j += bx) {
                T v = (xr[j] - mu) * rs;
                if (has_weight) v *= weight[j];
                if (has_bias) v += bias[j];
                yr[j] = v;
            }
            if (tx == 0) {
                mean[r] = mu;
                rstd[r] = rs;
            }
        }
    }
}

// ---- backward --------------------------------------------------------------------------------
//
// Block b owns the rows [b * rows_per_block, (b + 1) * rows_per_block) (the launcher makes
// rows_per_block a multiple of blockDim.y and gridDim.x * rows_per_block >= R); thread row ty
// takes every blockDim.y-th of them. For each row it forms the two row sums of dx and writes
// dx. With want_params, thread (tx, ty) also adds dy_j * xhat_j and dy_j of its columns into
// its own row p = b * blockDim.y + ty of `partial` ((2, P, N), P = gridDim.x * blockDim.y:
// dweight's partial sums, then dbias's). Every element of `partial` has one owning thread,
// which zeroes it first and then adds its rows in order: no atomics, and the sums do not
// depend on scheduling. layer_norm_param_reduce adds the P partial rows up. With has_gtotal,
// dx_j gets gtotal_j added (the add variant's other gradient).
template <typename T>
__device__ __forceinline__ void ln_backward(const T* __restrict__ gtotal,
                                            const T* __restrict__ dy, const T* __restrict__ x,
                                            const T* __restrict__ weight,
                                            const T* __restrict__ mean,
                                            const T* __restrict__ rstd, T* __restrict__ dx,
                                            T* __restrict__ partial, int R, int N,
                                            int has_gtotal, int has_weight, int want_params,
                                            int rows_per_block, T* s_a, T* s_b)
{
    const int tx = (int)threadIdx.x;
    const int bx = (int)blockDim.x;
    const long long P = (long long)gridDim.x * blockDim.y;
    const long long p = (long long)blockIdx.x * blockDim.y + threadIdx.y;
    T* __restrict__ pw = partial + p * N;
    T* __restrict__ pb = partial + (P + p) * N;
    if (want_params)
        for (int j = tx; j < N; j += bx) {
            pw[j] = T(0);
            pb[j] = T(0);
        }

    const long long begin = (long long)blockIdx.x * rows_per_block;
    long long end = begin + rows_per_block;
    if (end > R) end = R;
    for (long long r0 = begin; r0 < end; r0 += blockDim.y) {
        const long long r = r0 + threadIdx.y;
        const bool row_ok = r < end;
        const long long rr = row_ok ? r : 0;
        const T* __restrict__ dyr = dy + rr * N;
        const T* __restrict__ xr = x + rr * N;
        const T mu = mean[rr];
        const T rs = rstd[rr];

        T sum_g = T(0);
        T sum_gx = T(0);
        if (row_ok)
            for (int j = tx; j < N; j += bx) {
                const T g = has_weight ? dyr[j] * weight[j] : dyr[j];
                sum_g += g;
                sum_gx += g * ((xr[j] - mu) * rs);
            }
        ln_row_sums(sum_g, sum_gx, s_a, s_b);
        const T mean_g = sum_g / T(N);
        const T mean_gx = sum_gx / T(N);

        if (row_ok) {
            T* __restrict__ dxr = dx + r * N;
            for (int j = tx; j < N; j += bx) {
                const T xhat = (xr[j] - mu) * rs;
                const T g = has_weight ? dyr[j] * weight[j] : dyr[j];
                const T d = rs * (g - mean_g - xhat * mean_gx);
                dxr[j] = has_gtotal ? gtotal[r * N + j] + d : d;
                if (want_params) {
                    pw[j] += dyr[j] * xhat;
                    pb[j] += dyr[j];
                }
            }
        }
    }
}

// out[c * N + j] = sum_p partial[(c * P + p) * N + j] for c = 0 (dweight) and 1 (dbias, in
// blockIdx.y). LN_REDUCE_Y lanes stride over p, then a tree adds the lanes: a fixed order.
template <typename T>
__device__ __forceinline__ void ln_param_reduce(const T* __restrict__ partial,
                                                T* __restrict__ out, int P, int N,
                                                T (*s_red)[LN_REDUCE_X])
{
    const int tx = (int)threadIdx.x;
    const int ty = (int)threadIdx.y;
    const int c = (int)blockIdx.y;
    for (long long j0 = (long long)blockIdx.x * LN_REDUCE_X; j0 < N;
         j0 += (long long)gridDim.x * LN_REDUCE_X) {
        const long long j = j0 + tx;
        T acc = T(0);
        if (j < N)
            for (long long q = ty; q < P; q += LN_REDUCE_Y) acc += partial[((long long)c * P + q) * N + j];
        s_red[ty][tx] = acc;
        __syncthreads();
        for (int s = LN_REDUCE_Y / 2; s > 0; s >>= 1) {
            if (ty < s) s_red[ty][tx] += s_red[ty + s][tx];
            __syncthreads();
        }
        if (ty == 0 && j < N) out[(long long)c * N + j] = s_red[0][tx];
        __syncthreads();  // s_red is rewritten by the next column tile
    }
}

// ---- extern "C" entry points ---------------------------------------------------------------
//
// Unmangled names for cupy.RawModule.get_function and the emulation harness. Shared memory is
// declared here, in the __global__ functions, with a static size.

#define LN_DEFINE_KERNELS(T, SUFFIX)                                                            \
    extern "C" __global__ void __launch_bounds__(LN_THREADS) layer_norm_forward_##SUFFIX(      \
        const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ bias,    \
        T* __restrict__ y, T* __restrict__ mean, T* __restrict__ rstd, int R, int N,          \
        int has_weight, int has_bias, T eps)                                                   \
    {                                                                                          \
        __shared__ T s_a[LN_THREADS];                                                          \
        __shared__ T s_b[LN_THREADS];                                                          \
        ln_forward<T>(x, nullptr, nullptr, weight, bias, y, mean, rstd, R, N, 0, has_weight,  \
                      has_bias, eps, s_a, s_b);                                                \
    }                                                                                          \
                                                                                               \
    extern "C" __global__ void __launch_bounds__(LN_THREADS) layer_norm_add_forward_##SUFFIX(  \
        const T* __restrict__ x, const T* __restrict__ res, T* __restrict__ total,            \
        const T* __restrict__ weight, const T* __restrict__ bias, T* __restrict__ y,          \
        T* __restrict__ mean, T* __restrict__ rstd, int R, int N, int has_weight,             \
        int has_bias, T eps)                                                                   \
    {                                                                                          \
        __shared__ T s_a[LN_THREADS];                                                          \
        __shared__ T s_b[LN_THREADS];                                                          \
        ln_forward<T>(x, res, total, weight, bias, y, mean, rstd, R, N, 1, has_weight,        \
                      has_bias, eps, s_a, s_b);                                                \
    }                                                                                          \
                                                                                               \
    extern "C" __global__ void __launch_bounds__(LN_THREADS) layer_norm_backward_##SUFFIX(     \
        const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ weight,      \
        const T* __restrict__ mean, const T* __restrict__ rstd, T* __restrict__ dx,           \
        T* __restrict__ partial, int R, int N, int has_weight, int want_params,               \
        int rows_per_block)                                                                    \
    {                                                                                          \
        __shared__ T s_a[LN_THREADS];                                                          \
        __shared__ T s_b[LN_THREADS];                                                          \
        ln_backward<T>(nullptr, dy, x, weight, mean, rstd, dx, partial, R, N, 0, has_weight,  \
                       want_params, rows_per_block, s_a, s_b);                                 \
    }                                                                                          \
                                                                                               \
    extern "C" __global__ void __launch_bounds__(LN_THREADS) layer_norm_add_backward_##SUFFIX( \
        const T* __restrict__ gtotal, const T* __restrict__ dy, const T* __restrict__ total,  \
        const T* __restrict__ weight, const T* __restrict__ mean, const T* __restrict__ rstd, \
        T* __restrict__ dx, T* __restrict__ partial, int R, int N, int has_weight,            \
        int want_params, int rows_per_block)                                                   \
    {                                                                                          \
        __shared__ T s_a[LN_THREADS];                                                          \
        __shared__ T s_b[LN_THREADS];                                                          \
        ln_backward<T>(gtotal, dy, total, weight, mean, rstd, dx, partial, R, N, 1,           \
                       has_weight, want_params, rows_per_block, s_a, s_b);                     \
    }                                                                                          \
                                                                                               \
    extern "C" __global__ void __launch_bounds__(LN_REDUCE_X * LN_REDUCE_Y)                    \
        layer_norm_param_reduce_##SUFFIX(const T* __restrict__ partial, T* __restrict__ out,  \
                                         int P, int N)                                         \
    {                                                                                          \
        __shared__ T s_red[LN_REDUCE_Y][LN_REDUCE_X];                                          \
        ln_param_reduce<T>(partial, out, P, N, s_red);                                         \
    }

#if LN_ENABLE_F32
LN_DEFINE_KERNELS(float, f32)
#endif
#if LN_ENABLE_F64
LN_DEFINE_KERNELS(double, f64)
#endif
