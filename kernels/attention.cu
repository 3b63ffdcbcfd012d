// CUDA kernels of scaled dot-product attention for small heads (diagnet/ops/attention.py holds
// the composed reference they must reproduce; diagnet/fused/attention_cuda.py launches them).
//
// A lane is one (batch, head) pair: q (L, E), k (S, E), v (S, Ev) and dout (L, Ev) of one lane
// are contiguous, lanes one after another (B*H of them). weights and drop are (lanes, L, S).
//
//   forward:   s_ij = q_i . k_j * scale  (masked_score where the mask is 0)
//              w_ij = exp(s_ij - max_j s_ij) / sum_j exp(s_ij - max_j s_ij)
//              out_i = sum_j w_ij drop_ij v_j
//   backward:  dp_ij = (dout_i . v_j) drop_ij,  dot_i = sum_j dp_ij w_ij
//              ds_ij = w_ij (dp_ij - dot_i) scale  (0 where the mask is 0)
//              dq_i = sum_j ds_ij k_j,  dk_j = sum_i ds_ij q_i,  dv_j = sum_i w_ij drop_ij dout_i
//
// The forward keeps the weights (before dropout) for the backward, as the CPU paths do: at
// small heads they are no larger than q itself (L*S vs L*E), and the backward then needs no
// exponential and no second q k^T.
//
// Kernels (extern "C", one set per dtype, suffix _f32 / _f64):
//   attention_forward_*    one block per (lane, tile of ATT_QTILE queries): out and weights
//   attention_backward_*   one block per lane, walking its queries in tiles: dq, dk, dv
//
// The backward block owns all of its lane's dk and dv: thread t adds the tiles' terms of its
// elements in tile order, so there are no atomics and the sums do not depend on scheduling.
// k and v of the lane sit in static shared memory sized by compile-time maxima (S <= ATT_MAX_KEYS,
// E and Ev <= ATT_MAX_DIM_F32 or _F64); the launcher sends larger shapes to the composed
// version. Row maxima and sums are taken by one thread per row in shared memory, with
// __syncthreads between phases: no warp shuffles, atomics or dynamic shared memory, so the
// SIMT emulation harness (tests/simt) runs these kernels unchanged.
//
// The mask is an int array (nonzero: may attend) read at b*msb + h*msh + i*msi + j*msj, with
// a stride of 0 along each broadcast dimension.
//
// No #include: NVRTC compiles this without the host toolkit headers, and the emulation
// harness compiles it as plain C++ after its shim header.

// ---- tuning constants (the launcher passes each as a -D option) ------------------------

// Threads per block.
#ifndef ATT_THREADS
#define ATT_THREADS 128
#endif
// Queries per forward block, and per step of the backward's walk over the queries.
#ifndef ATT_QTILE
#define ATT_QTILE 8
#endif
// Most keys S a lane may have.
#ifndef ATT_MAX_KEYS
#define ATT_MAX_KEYS 64
#endif
// Most features E (of q and k) and Ev (of v) per head, per dtype: k and v of a lane fill
// 2 * ATT_MAX_KEYS * ATT_MAX_DIM elements of shared memory.
#ifndef ATT_MAX_DIM_F32
#define ATT_MAX_DIM_F32 64
#endif
#ifndef ATT_MAX_DIM_F64
#define ATT_MAX_DIM_F64 32
#endif

// Which dtypes to instantiate; the launcher compiles one dtype per module.
#ifndef ATT_ENABLE_F32
#define ATT_ENABLE_F32 1
#endif
#ifndef ATT_ENABLE_F64
#define ATT_ENABLE_F64 1
#endif

static_assert(ATT_THREADS >= 1 && ATT_THREADS <= 1024, "ATT_THREADS must be in [1, 1024]");
static_assert(ATT_QTILE >= 1 && ATT_QTILE <= ATT_THREADS, "one thread per query row of a tile");
static_assert(ATT_MAX_KEYS >= 1 && ATT_MAX_DIM_F32 >= 1 && ATT_MAX_DIM_F64 >= 1, "bad maxima");

// Static shared memory of the backward (the larger of the two): k, v, and per query tile q,
// dout, the weights, their gradients and one scalar per row. A block may hold 48 KiB.
#define ATT_SHARED_ELEMENTS(D) \
    (2 * ATT_MAX_KEYS * (D) + 2 * ATT_QTILE * (D) + 2 * ATT_QTILE * ATT_MAX_KEYS + ATT_QTILE)
static_assert(ATT_SHARED_ELEMENTS(ATT_MAX_DIM_F32) * 4 <= 48 * 1024, "float32 tiles exceed 48 KiB");
static_assert(ATT_SHARED_ELEMENTS(ATT_MAX_DIM_F64) * 8 <= 48 * 1024, "float64 tiles exceed 48 KiB");

// ---- helpers -------------------------------------------------------------------------------

// rows x cols elements from src (contiguous rows of cols) into the rows of tile, by the block.
template <typename T, int D>
__device__ __forceinline__ void att_load(T (*tile)[D], const T* __restrict__ src, int rows,
                                         int cols)
{
    for (int t = (int)threadIdx.x; t < rows * cols; t += (int)blockDim.x)
        tile[t / cols][t % cols] = src[t];
}

template <typename T>
__device__ __forceinline__ T att_dot(const T* a, const T* b, int n)
{
    T acc = T(0);
    for (int c = 0; c < n; ++c) acc += a[c] * b[c];
    return acc;
}

// ---- forward ---------------------------------------------------------------------------------
//
// Block (x, y) takes queries [y * ATT_QTILE, ...) of lanes x, x + gridDim.x, ... (the trip count
// depends on blockIdx only, so the barriers stay uniform).
template <typename T, int D>
__device__ __forceinline__ void att_forward(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    const int* __restrict__ mask, const T* __restrict__ drop, T* __restrict__ out,
    T* __restrict__ weights, int lanes, int H, int L, int S, int E, int Ev, long long msb,
    long long msh, long long msi, long long msj, int has_mask, int has_drop, T scale,
    T masked_score, T (*s_k)[D], T (*s_v)[D], T (*s_q)[D], T (*s_p)[ATT_MAX_KEYS], T* s_row)
{
    const int tid = (int)threadIdx.x;
    const int nt = (int)blockDim.x;
    const int i0 = (int)blockIdx.y * ATT_QTILE;
    const int rows = L - i0 < ATT_QTILE ? L - i0 : ATT_QTILE;
    for (long long lane = blockIdx.x; lane < lanes; lane += gridDim.x) {
        const long long tile = lane * L + i0;  // the tile's first row of q, out and weights
        att_load<T, D>(s_k, k + lane * S * E, S, E);
        att_load<T, D>(s_v, v + lane * S * Ev, S, Ev);
        att_load<T, D>(s_q, q + tile * E, rows, E);
        __syncthreads();

        const int* __restrict__ m = mask + (lane / H) * msb + (lane % H) * msh + i0 * msi;
        for (int t = tid; t < rows * S; t += nt) {
            const int i = t / S, j = t % S;
            T s = att_dot<T>(s_q[i], s_k[j], E) * scale;
            if (has_mask && !m[i * msi + j * msj]) s = masked_score;
            s_p[i][j] = s;
        }
        __syncthreads();
        if (tid < rows) {
            // (s > top is false for NaN: a NaN score still spoils its row through the sum)
            T top = s_p[tid][0];
            for (int j = 1; j < S; ++j) top = s_p[tid][j] > top ? s_p[tid][j] : top;
            s_row[tid] = top;
        }
        __syncthreads();
        for (int t = tid; t < rows * S; t += nt) {
            const int i = t / S, j = t % S;
            s_p[i][j] = exp(s_p[i][j] - s_row[i]);
        }
        __syncthreads();
        if (tid < rows) {
            T sum = T(0);
            for (int j = 0; j < S; ++j) sum += s_p[tid][j];
            s_row[tid] = sum;
        }
        __syncthreads();
        for (int t = tid; t < rows * S; t += nt) {
            const int i = t / S, j = t % S;
            const T w = s_p[i][j] / s_row[i];
            weights[tile * S + t] = w;
            s_p[i][j] = has_drop ? w * drop[tile * S + t] : w;
        }
        __syncthreads();
        for (int t = tid; t < rows * Ev; t += nt) {
            const int i = t / Ev, c = t % Ev;
            T acc = T(0);
            for (int j = 0; j < S; ++j) acc += s_p[i][j] * s_v[j][c];
            out[tile * Ev + t] = acc;
        }
        __syncthreads();  // the next lane overwrites the tiles
    }
}

// ---- backward --------------------------------------------------------------------------------
//
// Block x takes lanes x, x + gridDim.x, ...; for each it holds k and v, and walks the queries in
// tiles of ATT_QTILE: dq of the tile is written, its terms of dk and dv added by their owners.
template <typename T, int D>
__device__ __forceinline__ void att_backward(
    const T* __restrict__ dout, const T* __restrict__ q, const T* __restrict__ k,
    const T* __restrict__ v, const T* __restrict__ weights, const int* __restrict__ mask,
    const T* __restrict__ drop, T* __restrict__ dq, T* __restrict__ dk, T* __restrict__ dv,
    int lanes, int H, int L, int S, int E, int Ev, long long msb, long long msh, long long msi,
    long long msj, int has_mask, int has_drop, T scale, T (*s_k)[D], T (*s_v)[D], T (*s_q)[D],
    T (*s_g)[D], T (*s_p)[ATT_MAX_KEYS], T (*s_d)[ATT_MAX_KEYS], T* s_row)
{
    const int tid = (int)threadIdx.x;
    const int nt = (int)blockDim.x;
    for (long long lane = blockIdx.x; lane < lanes; lane += gridDim.x) {
        T* __restrict__ dkl = dk + lane * S * E;
        T* __restrict__ dvl = dv + lane * S * Ev;
        const int* __restrict__ ml = mask + (lane / H) * msb + (lane % H) * msh;
        att_load<T, D>(s_k, k + lane * S * E, S, E);
        att_load<T, D>(s_v, v + lane * S * Ev, S, Ev);
        for (int i0 = 0; i0 < L; i0 += ATT_QTILE) {
            const int rows = L - i0 < ATT_QTILE ? L - i0 : ATT_QTILE;
            const long long tile = lane * L + i0;
            att_load<T, D>(s_q, q + tile * E, rows, E);
            att_load<T, D>(s_g, dout + tile * Ev, rows, Ev);
            for (int t = tid; t < rows * S; t += nt) s_p[t / S][t % S] = weights[tile * S + t];
            __syncthreads();

            for (int t = tid; t < rows * S; t += nt) {
                const int i = t / S, j = t % S;
                const T dp = att_dot<T>(s_g[i], s_v[j], Ev);
                s_d[i][j] = has_drop ? dp * drop[tile * S + t] : dp;
            }
            __syncthreads();
            if (tid < rows) {
                T dot = T(0);
                for (int j = 0; j < S; ++j) dot += s_d[tid][j] * s_p[tid][j];
                s_row[tid] = dot;
            }
            __syncthreads();
            for (int t = tid; t < rows * S; t += nt) {
                const int i = t / S, j = t % S;
                // a masked score is a constant: no gradient to q or k
                const bool open = !has_mask || ml[(long long)(i0 + i) * msi + j * msj];
                s_d[i][j] = open ? s_p[i][j] * (s_d[i][j] - s_row[i]) * scale : T(0);
                if (has_drop) s_p[i][j] *= drop[tile * S + t];  // the kept weights, for dv
            }
            __syncthreads();

            for (int t = tid; t < rows * E; t += nt) {
                const int i = t / E, c = t % E;
                T acc = T(0);
                for (int j = 0; j < S; ++j) acc += s_d[i][j] * s_k[j][c];
                dq[tile * E + t] = acc;
            }
            for (int t = tid; t < S * E; t += nt) {
                const int j = t / E, c = t % E;
                T acc = i0 == 0 ? T(0) : dkl[t];
                for (int i = 0; i < rows; ++i) acc += s_d[i][j] * s_q[i][c];
                dkl[t] = acc;
            }
            for (int t = tid; t < S * Ev; t += nt) {
                const int j = t / Ev, c = t % Ev;
                T acc = i0 == 0 ? T(0) : dvl[t];
                for (int i = 0; i < rows; ++i) acc += s_p[i][j] * s_g[i][c];
                dvl[t] = acc;
            }
            __syncthreads();  // the next tile (or lane) overwrites the tiles
        }
    }
}

// ---- extern "C" entry points ---------------------------------------------------------------
//
// Unmangled names for cupy.RawModule.get_function and the emulation harness. Shared memory is
// declared here, in the __global__ functions, with a static size.

#define ATT_DEFINE_KERNELS(T, SUFFIX, D)                                                        \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_forward_##SUFFIX(      \
        const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,            \
        const int* __restrict__ mask, const T* __restrict__ drop, T* __restrict__ out,        \
        T* __restrict__ weights, int lanes, int H, int L, int S, int E, int Ev, long long msb, \
        long long msh, long long msi, long long msj, int has_mask, int has_drop, T scale,     \
        T masked_score)                                                                        \
    {                                                                                          \
        __shared__ T s_k[ATT_MAX_KEYS][D];                                                     \
        __shared__ T s_v[ATT_MAX_KEYS][D];                                                     \
        __shared__ T s_q[ATT_QTILE][D];                                                        \
        __shared__ T s_p[ATT_QTILE][ATT_MAX_KEYS];                                             \
        __shared__ T s_row[ATT_QTILE];                                                         \
        att_forward<T, D>(q, k, v, mask, drop, out, weights, lanes, H, L, S, E, Ev, msb, msh,  \
                          msi, msj, has_mask, has_drop, scale, masked_score, s_k, s_v, s_q,    \
                          s_p, s_row);                                                         \
    }                                                                                          \
                                                                                               \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_backward_##SUFFIX(     \
        const T* __restrict__ dout, const T* __restrict__ q, const T* __restrict__ k,         \
        const T* __restrict__ v, const T* __restrict__ weights, const int* __restrict__ mask, \
        const T* __restrict__ drop, T* __restrict__ dq, T* __restrict__ dk,                   \
        T* __restrict__ dv, int lanes, int H, int L, int S, int E, int Ev, long long msb,     \
        long long msh, long long msi, long long msj, int has_mask, int has_drop, T scale)     \
    {                                                                                          \
        __shared__ T s_k[ATT_MAX_KEYS][D];                                                     \
        __shared__ T s_v[ATT_MAX_KEYS][D];                                                     \
        __shared__ T s_q[ATT_QTILE][D];                                                        \
        __shared__ T s_g[ATT_QTILE][D];                                                        \
        __shared__ T s_p[ATT_QTILE][ATT_MAX_KEYS];                                             \
        __shared__ T s_d[ATT_QTILE][ATT_MAX_KEYS];                                             \
        __shared__ T s_row[ATT_QTILE];                                                         \
        att_backward<T, D>(dout, q, k, v, weights, mask, drop, dq, dk, dv, lanes, H, L, S, E,  \
                           Ev, msb, msh, msi, msj, has_mask, has_drop, scale, s_k, s_v, s_q,   \
                           s_g, s_p, s_d, s_row);                                              \
    }

#if ATT_ENABLE_F32
ATT_DEFINE_KERNELS(float, f32, ATT_MAX_DIM_F32)
#endif
#if ATT_ENABLE_F64
ATT_DEFINE_KERNELS(double, f64, ATT_MAX_DIM_F64)
#endif
