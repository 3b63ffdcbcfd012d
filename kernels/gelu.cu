// CUDA kernels of GELU and of the fused bias + activation after a linear layer, GELU or ReLU
// (diagnet/ops/activation.py holds the composed reference they must reproduce;
// diagnet/fused/gelu.py and diagnet/fused/relu.py the CPU kernels).
//
//   erf form:   gelu(h) = h * Phi(h),  Phi(h) = erfc(-h / sqrt(2)) / 2
//               gelu'(h) = Phi(h) + h * exp(-h^2 / 2) / sqrt(2 pi)
//   tanh form:  gelu(h) = h * s,  s = (1 + tanh(u)) / 2 = sigmoid(2u),
//               u = sqrt(2/pi) * (h + 0.044715 h^3)
//               gelu'(h) = s + h * 2 s (1 - s) * du/dh
//
// erfc (not 1 + erf) keeps Phi accurate in the left tail; the sigmoid takes the exponential
// of -2|u| (never positive, so it cannot overflow) and forms s and 1 - s without cancellation.
//
// Kernels (extern "C", one set per dtype, suffix _f32 / _f64):
//   gelu_forward_*            y = gelu(x) over n elements of flat arrays
//   gelu_backward_*           dx = dy * gelu'(x)
//   bias_gelu_forward_*       y = gelu(x + bias); x, y (R, N), bias (N,)
//   bias_gelu_backward_*      dx = dy * gelu'(x + bias), and per-thread-row partial sums of
//                             dbias = sum over rows of dx
//   bias_relu_forward_*       y = relu(x + bias) = h * (h > 0), h = x + bias (NaN stays NaN)
//   bias_relu_backward_*      dx = dy * (y > 0) from the forward's output y (positive exactly
//                             where h is), and the partial sums of dbias as for GELU
//   bias_gelu_bias_reduce_*   adds the partial sums up, in a fixed order (both activations)
//
// The flat kernels are grid-stride loops over 64-bit indices. The bias kernels use the block
// shape of diagnet/fused/gelu_cuda.py `launch_config`: blockDim.x threads along a row (a power
// of two), blockDim.y rows per block, so a row's bias is read by consecutive threads and no
// division splits a flat index into row and column. dbias is summed without atomics: every
// element of the (P, N) partial buffer has one owning thread, which zeroes it and adds its
// rows in order, and the reduction kernel adds the P rows in an order fixed by the launch
// geometry, so the result does not depend on scheduling. Only static shared memory and
// __syncthreads: the SIMT emulation harness (tests/simt) runs these kernels unchanged.
//
// No #include: NVRTC compiles this without the host toolkit headers, and the emulation
// harness compiles it as plain C++ after its shim header.

// ---- tuning constants (the launcher passes each as a -D option) ------------------------

// Threads per block of the element-wise kernels (the flat ones and the bias ones).
#ifndef GELU_THREADS
#define GELU_THREADS 256
#endif
// The partial-sum reduction: a block is GELU_REDUCE_X columns by GELU_REDUCE_Y lanes that
// stride over the partial rows and are then summed by a tree.
#ifndef GELU_REDUCE_X
#define GELU_REDUCE_X 32
#endif
#ifndef GELU_REDUCE_Y
#define GELU_REDUCE_Y 8
#endif

// Which dtypes to instantiate; the launcher compiles one dtype per module.
#ifndef GELU_ENABLE_F32
#define GELU_ENABLE_F32 1
#endif
#ifndef GELU_ENABLE_F64
#define GELU_ENABLE_F64 1
#endif

static_assert(GELU_THREADS >= 1 && GELU_THREADS <= 1024 &&
                  (GELU_THREADS & (GELU_THREADS - 1)) == 0,
              "GELU_THREADS must be a power of two in [1, 1024]");
static_assert(GELU_REDUCE_X >= 1 && GELU_REDUCE_Y >= 1 && GELU_REDUCE_X * GELU_REDUCE_Y <= 1024,
              "bad reduction block");
static_assert((GELU_REDUCE_Y & (GELU_REDUCE_Y - 1)) == 0, "the tree halves GELU_REDUCE_Y");

// ---- one element -----------------------------------------------------------------------------

#define GELU_SQRT1_2 0.70710678118654752440
#define GELU_INV_SQRT_2PI 0.39894228040143267794
#define GELU_SQRT_2_OVER_PI 0.79788456080286535588
#define GELU_TANH_CUBIC 0.044715

// Phi(h), the standard normal CDF.
template <typename T>
__device__ __forceinline__ T gelu_cdf(T h)
{
    return T(0.5) * erfc(-h * T(GELU_SQRT1_2));
}

// s = sigmoid(2u) of the tanh form and its derivative ds/dh.
template <typename T>
__device__ __forceinline__ void gelu_tanh_gate(T h, T& s, T& ds)
{
    const T u = T(GELU_SQRT_2_OVER_PI) * (h + T(GELU_TANH_CUBIC) * h * h * h);
    const T e = exp(T(-2) * (u < T(0) ? -u : u));  // a NaN u stays NaN
    const T inv = T(1) / (T(1) + e);
    const bool up = u >= T(0);
    s = up ? inv : e * inv;
    const T rest = up ? e * inv : inv;  // 1 - s
    const T du = T(GELU_SQRT_2_OVER_PI) * (T(1) + T(3 * GELU_TANH_CUBIC) * h * h);
    ds = T(2) * s * rest * du;
}

template <typename T>
__device__ __forceinline__ T gelu_value(T h, int tanh_form)
{
    if (tanh_form) {
        T s, ds;
        gelu_tanh_gate(h, s, ds);
        return h * s;
    }
    return h * gelu_cdf(h);
}

// gelu'(h)
template <typename T>
__device__ __forceinline__ T gelu_slope(T h, int tanh_form)
{
    if (tanh_form) {
        T s, ds;
        gelu_tanh_gate(h, s, ds);
        return s + h * ds;
    }
    return gelu_cdf(h) + h * (T(GELU_INV_SQRT_2PI) * exp(T(-0.5) * h * h));
}

// ---- flat arrays -----------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void gelu_forward_flat(const T* __restrict__ x, T* __restrict__ y,
                                                  long long n, int tanh_form)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        y[i] = gelu_value(x[i], tanh_form);
}

template <typename T>
__device__ __forceinline__ void gelu_backward_flat(const T* __restrict__ x,
                                                   const T* __restrict__ dy,
                                                   T* __restrict__ dx, long long n, int tanh_form)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        dx[i] = dy[i] * gelu_slope(x[i], tanh_form);
}

// ---- bias + GELU over rows -------------------------------------------------------------------
//
// Thread (tx, ty) takes the columns j = tx, tx + blockDim.x, ... of one row; the forward walks
// groups of blockDim.y rows in a grid-stride loop.
template <typename T>
__device__ __forceinline__ void bias_gelu_forward_rows(const T* __restrict__ x,
                                                       const T* __restrict__ bias,
                                                       T* __restrict__ y, int R, int N,
                                                       int tanh_form)
{
    const long long stride = (long long)gridDim.x * blockDim.y;
    for (long long r = (long long)blockIdx.x * blockDim.y + threadIdx.y; r < R; r += stride) {
        const T* __restrict__ xr = x + r * N;  // 64-bit: R * N may exceed 2^31
        T* __restrict__ yr = y + r * N;
        for (int j = (int)threadIdx.x; j < N; j += (int)blockDim.x)
            yr[j] = gelu_value(xr[j] + bias[j], tanh_form);
    }
}

// The backward of a bias + activation over rows: dx = dy * slope(i, j) at flat index
// i = r * N + j. Block b owns the rows [b * rows_per_block, (b + 1) * rows_per_block) (the
// launcher makes gridDim.x * rows_per_block >= R); thread row ty takes every blockDim.y-th of
// them and, with want_bias, adds each dx of its columns into its own row
// p = b * blockDim.y + ty of `partial` ((P, N), P = gridDim.x * blockDim.y).
template <typename T, typename Slope>
__device__ __forceinline__ void bias_activation_backward_rows(const T* __restrict__ dy,
                                                              T* __restrict__ dx,
                                                              T* __restrict__ partial, int R,
                                                              int N, int want_bias,
                                                              int rows_per_block, Slope slope)
{
    const int tx = (int)threadIdx.x;
    const int bx = (int)blockDim.x;
    const long long p = (long long)blockIdx.x * blockDim.y + threadIdx.y;
    T* __restrict__ pb = partial + p * N;
    if (want_bias)
        for (int j = tx; j < N; j += bx) pb[j] = T(0);

    const long long begin = (long long)blockIdx.x * rows_per_block;
    long long end = begin + rows_per_block;
    if (end > R) end = R;
    for (long long r = begin + threadIdx.y; r < end; r += blockDim.y) {
        const long long row = r * N;
        for (int j = tx; j < N; j += bx) {
            const T g = dy[row + j] * slope(row + j, j);
            dx[row + j] = g;
            if (want_bias) pb[j] += g;
        }
    }
}

// gelu'(x + bias), from the input (the forward keeps nothing)
template <typename T>
struct BiasGeluSlope {
    const T* __restrict__ x;
    const T* __restrict__ bias;
    int tanh_form;
    __device__ __forceinline__ T operator()(long long i, int j) const
    {
        return gelu_slope(x[i] + bias[j], tanh_form);
    }
};

// relu'(x + bias), from the output: y > 0 exactly where x + bias > 0
template <typename T>
struct ReluSlope {
    const T* __restrict__ y;
    __device__ __forceinline__ T operator()(long long i, int) const { return T(y[i] > T(0)); }
};

template <typename T>
__device__ __forceinline__ void bias_gelu_backward_rows(const T* __restrict__ x,
                                                        const T* __restrict__ bias,
                                                        const T* __restrict__ dy,
                                                        T* __restrict__ dx,
                                                        T* __restrict__ partial, int R, int N,
                                                        int tanh_form, int want_bias,
                                                        int rows_per_block)
{
    bias_activation_backward_rows<T>(dy, dx, partial, R, N, want_bias, rows_per_block,
                                     BiasGeluSlope<T>{x, bias, tanh_form});
}

// ---- bias + ReLU over rows: the loops of bias + GELU with ReLU's arithmetic -----------------

template <typename T>
__device__ __forceinline__ void bias_relu_forward_rows(const T* __restrict__ x,
                                                       const T* __restrict__ bias,
                                                       T* __restrict__ y, int R, int N)
{
    const long long stride = (long long)gridDim.x * blockDim.y;
    for (long long r = (long long)blockIdx.x * blockDim.y + threadIdx.y; r < R; r += stride) {
        const T* __restrict__ xr = x + r * N;
        T* __restrict__ yr = y + r * N;
        for (int j = (int)threadIdx.x; j < N; j += (int)blockDim.x) {
            const T h = xr[j] + bias[j];
            yr[j] = h * T(h > T(0));  // the reference's formula: NaN and -inf give NaN
        }
    }
}

template <typename T>
__device__ __forceinline__ void bias_relu_backward_rows(const T* __restrict__ y,
                                                        const T* __restrict__ dy,
                                                        T* __restrict__ dx,
                                                        T* __restrict__ partial, int R, int N,
                                                        int want_bias, int rows_per_block)
{
    bias_activation_backward_rows<T>(dy, dx, partial, R, N, want_bias, rows_per_block,
                                     ReluSlope<T>{y});
}

// out[j] = sum_p partial[p * N + j]. GELU_REDUCE_Y lanes stride over p, then a tree adds the
// lanes: a fixed order.
template <typename T>
__device__ __forceinline__ void bias_gelu_reduce(const T* __restrict__ partial,
                                                 T* __restrict__ out, int P, int N,
                                                 T (*s_red)[GELU_REDUCE_X])
{
    const int tx = (int)threadIdx.x;
    const int ty = (int)threadIdx.y;
    for (long long j0 = (long long)blockIdx.x * GELU_REDUCE_X; j0 < N;
         j0 += (long long)gridDim.x * GELU_REDUCE_X) {
        const long long j = j0 + tx;
        T acc = T(0);
        if (j < N)
            for (long long q = ty; q < P; q += GELU_REDUCE_Y) acc += partial[q * N + j];
        s_red[ty][tx] = acc;
        __syncthreads();
        for (int s = GELU_REDUCE_Y / 2; s > 0; s >>= 1) {
            if (ty < s) s_red[ty][tx] += s_red[ty + s][tx];
            __syncthreads();
        }
        if (ty == 0 && j < N) out[j] = s_red[0][tx];
        __syncthreads();  // s_red is rewritten by the next column tile
    }
}

// ---- extern "C" entry points ---------------------------------------------------------------
//
// Unmangled names for cupy.RawModule.get_function and the emulation harness. Shared memory is
// declared here, in the __global__ function, with a static size.

#define GELU_DEFINE_KERNELS(T, SUFFIX)                                                         \
    extern "C" __global__ void __launch_bounds__(GELU_THREADS) gelu_forward_##SUFFIX(         \
        const T* __restrict__ x, T* __restrict__ y, long long n, int tanh_form)               \
    {                                                                                          \
        gelu_forward_flat<T>(x, y, n, tanh_form);                                              \
    }                                                                                          \
                                                                                               \
    extern "C" __global__ void __launch_bounds__(GELU_THREADS) gelu_backward_##SUFFIX(        \
        const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx, long long n,   \
        int tanh_form)                                                                         \
    {                                                                                          \
        gelu_backward_flat<T>(x, dy, dx, n, tanh_form);                                        \
    }                                                                                          \
                                                                                               \
    extern "C" __global__ void __launch_bounds__(GELU_THREADS) bias_gelu_forward_##SUFFIX(    \
        const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y, int R, int N, \
        int tanh_form)                                                                         \
    {                                                                                          \
        bias_gelu_forward_rows<T>(x, bias, y, R, N, tanh_form);                                \
    }                                                                                          \
                                                                                               \
    extern "C" __global__ void __launch_bounds__(GELU_THREADS) bias_gelu_backward_##SUFFIX(   \
        const T* __restrict__ x, const T* __restrict__ bias, const T* __restrict__ dy,        \
        T* __restrict__ dx, T* __restrict__ partial, int R, int N, int tanh_form,             \
        int want_bias, int rows_per_block)                                                     \
    {                                                                                          \
        bias_gelu_backward_rows<T>(x, bias, dy, dx, partial, R, N, tanh_form, want_bias,      \
                                   rows_per_block);                                            \
    }                                                                                          \
                                                                                               \
    extern "C" __global__ void __launch_bounds__(GELU_THREADS) bias_relu_forward_##SUFFIX(    \
        const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y, int R, int N) \
    {                                                                                          \
        bias_relu_forward_rows<T>(x, bias, y, R, N);                                           \
    }                                                                                          \
                                                                                               \
    extern "C" __global__ void __launch_bounds__(GELU_THREADS) bias_relu_backward_##SUFFIX(   \
        const T* __restrict__ y, const T* __restrict__ dy, T* __restrict__ dx,                \
        T* __restrict__ partial, int R, int N, int want_bias, int rows_per_block)             \
    {                                                                                          \
        bias_relu_backward_rows<T>(y, dy, dx, partial, R, N, want_bias, rows_per_block);       \
    }                                                                                          \
                                                                                               \
    extern "C" __global__ void __launch_bounds__(GELU_REDUCE_X * GELU_REDUCE_Y)                \
        bias_gelu_bias_reduce_##SUFFIX(const T* __restrict__ partial, T* __restrict__ out,    \
                                       int P, int N)                                           \
    {                                                                                          \
        __shared__ T s_red[GELU_REDUCE_Y][GELU_REDUCE_X];                                      \
        bias_gelu_reduce<T>(partial, out, P, N, s_red);                                        \
    }

#if GELU_ENABLE_F32
GELU_DEFINE_KERNELS(float, f32)
#endif
#if GELU_ENABLE_F64
GELU_DEFINE_KERNELS(double, f64)
#endif
