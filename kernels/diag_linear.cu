// CUDA kernels of a diagonally sparse linear layer (see diagnet/diag/layout.py for the format
// and diagnet/diag/reference.py for the math they must reproduce).
//
// A weight W of shape (m, n) keeps K of its P = max(m, n) wrap-around diagonals; `values` is
// (K, L) with L = min(m, n), `offsets` is (K,) int32. All arrays are contiguous and row-major:
// x (B, n), y / dy (B, m), dx (B, n).
//
// Kernels (extern "C", one set per dtype, suffix _f32 / _f64):
//   diag_forward_*             y  = x  @ W.T   gather form, no atomics
//   diag_input_grad_*          dx = dy @ W     gather form, no atomics
//   diag_value_grad_*          dvalues, or per-batch-split partial sums of it
//   diag_value_grad_reduce_*   sums the partial sums of a batch-split value grad
//
// The launcher (diagnet/diag/cuda.py, `launch_config`) chooses grid and block sizes from the
// same tuning constants below; it passes every one of them as -D options, so the #ifndef
// defaults here only matter for stand-alone builds (nvcc checks, the SIMT emulation harness).
//
// No #include: NVRTC compiles this without the host toolkit headers, and the emulation
// harness (tests/simt) compiles it as plain C++ after its shim header.

// ---- tuning constants -------------------------------------------------------------------

// Gather kernels (forward, input grad): a block is GATHER_BLOCK_X output columns by
// GATHER_BLOCK_Y * GATHER_ROWS batch rows. X is the fast thread index so that a warp reads
// 32 consecutive values / inputs (coalesced); each thread keeps GATHER_ROWS accumulators so
// that one load of values[k, t] feeds GATHER_ROWS multiply-adds.
#ifndef DIAG_GATHER_BLOCK_X
#define DIAG_GATHER_BLOCK_X 64
#endif
#ifndef DIAG_GATHER_BLOCK_Y
#define DIAG_GATHER_BLOCK_Y 4
#endif
#ifndef DIAG_GATHER_ROWS
#define DIAG_GATHER_ROWS 4
#endif
// Offsets are staged through shared memory this many at a time: every thread of a block
// needs all K of them, and shared memory cannot hold an unbounded K.
#ifndef DIAG_OFFSET_CHUNK
#define DIAG_OFFSET_CHUNK 256
#endif
// Minimum resident blocks per SM asked of __launch_bounds__. With 256-thread blocks, 4 caps
// registers at 64 per thread (50% occupancy), enough warps to hide the latency of these
// memory-bound loops; left alone, ptxas takes 80-118 registers (25-37%). ptxas reports no
// spills at 64 (see docs/kernels.md); raise the cap if a retuned tile starts to spill.
#ifndef DIAG_MIN_BLOCKS_PER_SM
#define DIAG_MIN_BLOCKS_PER_SM 4
#endif

// Value grad: a block is VG_BLOCK_X diagonal positions t by VG_BLOCK_Y batch lanes; each
// thread handles VG_KPT diagonals so that the operand indexed by t alone (x[b, t] when
// m >= n, dy[b, t] when m < n) is loaded once per batch row and reused VG_KPT times.
#ifndef DIAG_VG_BLOCK_X
#define DIAG_VG_BLOCK_X 32
#endif
#ifndef DIAG_VG_BLOCK_Y
#define DIAG_VG_BLOCK_Y 8
#endif
#ifndef DIAG_VG_KPT
#define DIAG_VG_KPT 4
#endif
// Threads per block of the partial-sum reduction.
#ifndef DIAG_REDUCE_BLOCK
#define DIAG_REDUCE_BLOCK 256
#endif

// Which dtypes to instantiate; the launcher compiles one dtype per module.
#ifndef DIAG_ENABLE_F32
#define DIAG_ENABLE_F32 1
#endif
#ifndef DIAG_ENABLE_F64
#define DIAG_ENABLE_F64 1
#endif

#define DIAG_GATHER_THREADS (DIAG_GATHER_BLOCK_X * DIAG_GATHER_BLOCK_Y)
#define DIAG_GATHER_ROWS_PER_BLOCK (DIAG_GATHER_BLOCK_Y * DIAG_GATHER_ROWS)
#define DIAG_VG_THREADS (DIAG_VG_BLOCK_X * DIAG_VG_BLOCK_Y)

static_assert(DIAG_GATHER_THREADS >= 1 && DIAG_GATHER_THREADS <= 1024,
              "gather block must have 1..1024 threads");
static_assert(DIAG_GATHER_ROWS >= 1 && DIAG_OFFSET_CHUNK >= 1, "bad gather tiling");
static_assert(DIAG_VG_THREADS >= 1 && DIAG_VG_THREADS <= 1024,
              "value-grad block must have 1..1024 threads");
static_assert((DIAG_VG_BLOCK_Y & (DIAG_VG_BLOCK_Y - 1)) == 0,
              "the shared-memory tree reduction halves DIAG_VG_BLOCK_Y: it must be a power of two");
static_assert(DIAG_VG_KPT >= 1 && DIAG_VG_THREADS >= DIAG_VG_KPT,
              "one thread stages each of the VG_KPT offsets of a block");
static_assert(DIAG_REDUCE_BLOCK >= 1 && DIAG_REDUCE_BLOCK <= 1024, "bad reduce block");

// ---- helpers ----------------------------------------------------------------------------

// Offsets are reduced modulo P when staged. Valid offsets are already in [0, P); for invalid
// ones this keeps every memory access in bounds (garbage in, garbage out, but no fault).
__device__ __forceinline__ int diag_wrap_offset(int offset, int P)
{
    int o = offset % P;
    return o < 0 ? o + P : o;
}

// First k in [0, K) with wrap(offsets[k]) >= x, or K (std::lower_bound). Every probe is an
// index in [0, K), so this stays in bounds whatever the offsets hold; the answer is only
// meaningful when the wrapped offsets are sorted, as validated callers guarantee.
__device__ __forceinline__ int diag_lower_bound(const int* __restrict__ offsets, int K, int P,
                                                int x)
{
    int lo = 0;
    int hi = K;
    while (lo < hi) {
        const int mid = lo + ((hi - lo) >> 1);
        if (diag_wrap_offset(offsets[mid], P) < x)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

// ---- forward and input grad: one gather body --------------------------------------------
//
// Both products read a (B, n_in) operand and write a (B, n_out) result, and for one output
// column i each stored diagonal contributes at most one term. Which term depends only on
// whether the output side is the short side (t = i) or the long side (t found from i):
//
//   OUT_IS_SHORT (forward with m < n, input grad with m >= n):
//       t = i,                          input column (i + offset) mod n_in,  n_in = P
//   !OUT_IS_SHORT (forward with m >= n, input grad with m < n):
//       t = (i - offset) mod n_out,     valid only if t < n_in = L,          input column t
//
// Gathering (one thread owns each output element and sums its K terms in registers) needs
// no atomics, is deterministic, and writes every output exactly once (so no zero-fill).
//
// In the !OUT_IS_SHORT case, column i only meets offsets p in the cyclic range
// (i - n_in, i] mod n_out, so a block of columns i0..i_hi only meets (i0 - n_in, i_hi]: at
// most two runs of the sorted offsets array: [0, k_a) and [k_b, K) when the range wraps past
// 0, else one run [k_lo, k_a). The block finds them by binary search and walks only those,
// in ascending k, so the terms are summed in the same order as a walk over all K (the skipped
// offsets contributed nothing). The runs depend on blockIdx only: every thread of the block
// walks the same chunks and reaches the same barriers. This relies on the wrapped offsets
// being sorted (validated callers pass sorted unique offsets in [0, P)); for unsorted ones
// the runs may miss terms, but every access stays in bounds. The per-thread t < n_in check
// still decides which of the walked offsets count, column by column.
template <typename T, bool OUT_IS_SHORT>
__device__ __forceinline__ void diag_gather(const T* __restrict__ in,
                                            const int* __restrict__ offsets,
                                            const T* __restrict__ values, T* __restrict__ out,
                                            int B, int n_in, int n_out, int K, int* s_off)
{
    const int P = OUT_IS_SHORT ? n_in : n_out;
    const int L = OUT_IS_SHORT ? n_out : n_in;
    const int tx = (int)threadIdx.x;
    const int ty = (int)threadIdx.y;
    const int tid = ty * DIAG_GATHER_BLOCK_X + tx;
    const int i = (int)blockIdx.x * DIAG_GATHER_BLOCK_X + tx;
    // Tail threads (i >= n_out) must not return early: they still stage offsets and reach
    // every __syncthreads of the block.
    const bool i_ok = i < n_out;

    // grid.y is capped at 65535, so a huge batch is walked in strides of whole grids. The
    // trip count depends on blockIdx only, so all threads of a block agree on it.
    for (long long b0 = (long long)blockIdx.y * DIAG_GATHER_ROWS_PER_BLOCK; b0 < B;
         b0 += (long long)gridDim.y * DIAG_GATHER_ROWS_PER_BLOCK) {
        const T* rows[DIAG_GATHER_ROWS];
        T acc[DIAG_GATHER_ROWS];
#pragma unroll
        for (int r = 0; r < DIAG_GATHER_ROWS; ++r) {
            long long b = b0 + ty + (long long)r * DIAG_GATHER_BLOCK_Y;
            // Rows past the batch read row B - 1 instead: the loads stay in bounds with no
            // branch in the inner loop, and the store below drops those rows.
            if (b > (long long)B - 1) b = (long long)B - 1;
            rows[r] = in + b * n_in;  // 64-bit: B * n_in may exceed 2^31
            acc[r] = T(0);
        }

        // The runs of offsets [seg0_begin, seg0_end) and [seg1_begin, seg1_end) that this block
        // walks: all K unless the output is on the long side and the block's cyclic range
        // (i0 - n_in, i_hi] is shorter than n_out. Recomputed per batch tile (two binary
        // searches of broadcast, cached loads): hoisted out of the batch loop, the three bounds
        // stayed live across it and ptxas spilled under the 64-register cap.
        int seg0_begin = 0;
        int seg0_end = K;
        int seg1_begin = K;
        const int seg1_end = K;
        if (!OUT_IS_SHORT) {
            const int i0 = (int)blockIdx.x * DIAG_GATHER_BLOCK_X;
            if (i0 < n_out) {
                // No overflow: i_hi - i0 < BLOCK_X, and the launcher keeps n_in + n_out < 2^31.
                const int i_hi = (n_out - 1 - i0 < DIAG_GATHER_BLOCK_X - 1)
                                     ? n_out - 1
                                     : i0 + DIAG_GATHER_BLOCK_X - 1;
                if (i_hi - i0 + n_in < n_out) {  // the range has fewer than n_out = P offsets
                    const int lo = i0 - n_in + 1;  // in (-n_in, n_out); hi = i_hi in [0, n_out)
                    const int k_a = diag_lower_bound(offsets, K, n_out, i_hi + 1);
                    if (lo >= 0) {  // one run: offsets in [lo, i_hi]
                        seg0_begin = diag_lower_bound(offsets, K, n_out, lo);
                        seg0_end = k_a;
                    } else {  // wraps: offsets in [0, i_hi] and in [lo + n_out, n_out)
                        seg0_end = k_a;
                        seg1_begin = diag_lower_bound(offsets, K, n_out, lo + n_out);
                        // Sorted offsets give k_a <= seg1_begin; keep the runs disjoint anyway.
                        if (seg1_begin < k_a) seg1_begin = k_a;
                    }
                }
            } else {
                seg0_end = 0;  // no column of this block exists (the launcher never does this)
            }
        }

        for (int seg = 0; seg < 2; ++seg) {
            const int k_end = seg ? seg1_end : seg0_end;
            for (int k0 = seg ? seg1_begin : seg0_begin; k0 < k_end; k0 += DIAG_OFFSET_CHUNK) {
                const int kc = (k_end - k0 < DIAG_OFFSET_CHUNK) ? k_end - k0 : DIAG_OFFSET_CHUNK;
                __syncthreads();  // everyone is done reading the previous chunk
                for (int j = tid; j < kc; j += DIAG_GATHER_THREADS) {
                    s_off[j] = diag_wrap_offset(offsets[k0 + j], P);
                }
                __syncthreads();

                if (i_ok) {
                    const T* vals = values + (long long)k0 * L;  // 64-bit: K * L may exceed 2^31
#pragma unroll 4
                    for (int kk = 0; kk < kc; ++kk) {
                        const int off = s_off[kk];  // same address for the whole warp: broadcast
                        int t;
                        int col;
                        if (OUT_IS_SHORT) {
                            t = i;
                            col = i + off;  // < n_out + P <= 2 * n_in: one subtraction wraps it
                            if (col >= n_in) col -= n_in;
                        } else {
                            t = i - off;
                            if (t < 0) t += n_out;
                            if (t >= n_in) continue;  // this diagonal misses output column i
                            col = t;
                        }
                        const T v = vals[(long long)kk * L + t];
#pragma unroll
                        for (int r = 0; r < DIAG_GATHER_ROWS; ++r) {
                            acc[r] += v * rows[r][col];
                        }
                    }
                }
            }
        }

        if (i_ok) {
#pragma unroll
            for (int r = 0; r < DIAG_GATHER_ROWS; ++r) {
                const long long b = b0 + ty + (long long)r * DIAG_GATHER_BLOCK_Y;
                if (b < B) out[b * n_out + i] = acc[r];
            }
        }
    }
}

// ---- value grad --------------------------------------------------------------------------
//
// dvalues[k, t] = sum_b dy[b, row_k(t)] * x[b, col_k(t)]. Of the two operands, the one on
// the short side of W is indexed by t for every diagonal ("short", row stride L), the other
// by (t + offset) mod P ("long", row stride P):
//   m >= n: short = x,  long = dy        m < n: short = dy,  long = x
//
// Grid: x over t (VG_BLOCK_X per block), y over groups of VG_KPT diagonals, z over batch
// splits of batch_per_split rows. Inside a block, the VG_BLOCK_Y thread rows stride over the
// block's batch range and are then summed by a shared-memory tree. With one split the block
// writes the finished sums into out (K, L); with S > 1 splits, block z writes its partial
// sums to out + z * K * L (an (S, K, L) buffer) and diag_value_grad_reduce adds them up.
// Two passes instead of atomics keep the result deterministic.
template <typename T>
__device__ __forceinline__ void diag_value_grad_body(
    const T* __restrict__ dy, const T* __restrict__ x, const int* __restrict__ offsets,
    T* __restrict__ out, int B, int m, int n, int K, int batch_per_split, int* s_off,
    T (*s_red)[DIAG_VG_KPT][DIAG_VG_BLOCK_X])
{
    const int L = m < n ? m : n;
    const int P = m < n ? n : m;
    const T* __restrict__ short_side = m >= n ? x : dy;
    const T* __restrict__ long_side = m >= n ? dy : x;

    const int tx = (int)threadIdx.x;
    const int ty = (int)threadIdx.y;
    const int tid = ty * DIAG_VG_BLOCK_X + tx;
    const int t = (int)blockIdx.x * DIAG_VG_BLOCK_X + tx;
    const bool t_ok = t < L;

    const long long b_begin = (long long)blockIdx.z * batch_per_split;
    long long b_end = b_begin + batch_per_split;
    if (b_end > B) b_end = B;
    T* __restrict__ out_split = out + (long long)blockIdx.z * K * L;

    for (int k0 = (int)blockIdx.y * DIAG_VG_KPT; k0 < K; k0 += (int)gridDim.y * DIAG_VG_KPT) {
        __syncthreads();  // the previous group's s_off / s_red readers are done
        if (tid < DIAG_VG_KPT) {
            // Past K, stage offset 0: those lanes compute a harmless in-bounds sum that is
            // never stored.
            s_off[tid] = (k0 + tid < K) ? diag_wrap_offset(offsets[k0 + tid], P) : 0;
        }
        __syncthreads();

        T acc[DIAG_VG_KPT];
        int col[DIAG_VG_KPT];
#pragma unroll
        for (int j = 0; j < DIAG_VG_KPT; ++j) {
            acc[j] = T(0);
            int c = t + s_off[j];  // < 2P for t < L <= P: one subtraction wraps it
            if (c >= P) c -= P;
            col[j] = c;
        }

        if (t_ok) {
            for (long long b = b_begin + ty; b < b_end; b += DIAG_VG_BLOCK_Y) {
                const T a = short_side[b * L + t];
                const T* __restrict__ row = long_side + b * P;
#pragma unroll
                for (int j = 0; j < DIAG_VG_KPT; ++j) {
                    acc[j] += a * row[col[j]];
                }
            }
        }

#pragma unroll
        for (int j = 0; j < DIAG_VG_KPT; ++j) s_red[ty][j][tx] = acc[j];
        __syncthreads();
        for (int s = DIAG_VG_BLOCK_Y / 2; s > 0; s >>= 1) {
            if (ty < s) {
#pragma unroll
                for (int j = 0; j < DIAG_VG_KPT; ++j) s_red[ty][j][tx] += s_red[ty + s][j][tx];
            }
            __syncthreads();
        }

        // Thread row j stores diagonal k0 + j so that each store is a coalesced row segment.
        if (t_ok) {
            for (int j = ty; j < DIAG_VG_KPT; j += DIAG_VG_BLOCK_Y) {
                if (k0 + j < K) out_split[(long long)(k0 + j) * L + t] = s_red[0][j][tx];
            }
        }
    }
}

// out[e] = sum_z partial[z * KL + e]: consecutive threads take consecutive e (coalesced) and
// add the splits in a fixed order (deterministic).
template <typename T>
__device__ __forceinline__ void diag_reduce_splits(const T* __restrict__ partial,
                                                   T* __restrict__ out, int S, long long KL)
{
    for (long long e = (long long)blockIdx.x * DIAG_REDUCE_BLOCK + threadIdx.x; e < KL;
         e += (long long)gridDim.x * DIAG_REDUCE_BLOCK) {
        T s = T(0);
        const T* p = partial + e;
        for (int z = 0; z < S; ++z, p += KL) s += *p;
        out[e] = s;
    }
}

// ---- extern "C" entry points ---------------------------------------------------------------
//
// Unmangled names so that cupy.RawModule.get_function and the emulation harness can find
// them without name expressions. Shared memory is declared here, in the __global__ function,
// and handed to the bodies, so that the two inlined gather bodies share one array.
// The branch on m < n is uniform over the whole grid.

#define DIAG_DEFINE_KERNELS(T, SUFFIX)                                                          \
    extern "C" __global__ void __launch_bounds__(DIAG_GATHER_THREADS, DIAG_MIN_BLOCKS_PER_SM)  \
        diag_forward_##SUFFIX(const T* __restrict__ x, const int* __restrict__ offsets,       \
                              const T* __restrict__ values, T* __restrict__ y, int B, int m,  \
                              int n, int K)                                                    \
    {                                                                                          \
        __shared__ int s_off[DIAG_OFFSET_CHUNK];                                               \
        if (m < n)                                                                             \
            diag_gather<T, true>(x, offsets, values, y, B, n, m, K, s_off);                    \
        else                                                                                   \
            diag_gather<T, false>(x, offsets, values, y, B, n, m, K, s_off);                   \
    }                                                                                          \
                                                                                               \
    extern "C" __global__ void __launch_bounds__(DIAG_GATHER_THREADS, DIAG_MIN_BLOCKS_PER_SM)  \
        diag_input_grad_##SUFFIX(const T* __restrict__ dy, const int* __restrict__ offsets,   \
                                 const T* __restrict__ values, T* __restrict__ dx, int B,     \
                                 int m, int n, int K)                                          \
    {                                                                                          \
        __shared__ int s_off[DIAG_OFFSET_CHUNK];                                               \
        if (m >= n)                                                                            \
            diag_gather<T, true>(dy, offsets, values, dx, B, m, n, K, s_off);                  \
        else                                                                                   \
            diag_gather<T, false>(dy, offsets, values, dx, B, m, n, K, s_off);                 \
    }                                                                                          \
                                                                                               \
    extern "C" __global__ void __launch_bounds__(DIAG_VG_THREADS, DIAG_MIN_BLOCKS_PER_SM)      \
        diag_value_grad_##SUFFIX(const T* __restrict__ dy, const T* __restrict__ x,           \
                                 const int* __restrict__ offsets, T* __restrict__ out, int B, \
                                 int m, int n, int K, int batch_per_split)                     \
    {                                                                                          \
        __shared__ int s_off[DIAG_VG_KPT];                                                     \
        __shared__ T s_red[DIAG_VG_BLOCK_Y][DIAG_VG_KPT][DIAG_VG_BLOCK_X];                     \
        diag_value_grad_body<T>(dy, x, offsets, out, B, m, n, K, batch_per_split, s_off,       \
                                s_red);                                                        \
    }                                                                                          \
                                                                                               \
    extern "C" __global__ void __launch_bounds__(DIAG_REDUCE_BLOCK)                            \
        diag_value_grad_reduce_##SUFFIX(const T* __restrict__ partial, T* __restrict__ out,   \
                                        int S, long long KL)                                   \
    {                                                                                          \
        diag_reduce_splits<T>(partial, out, S, KL);                                            \
    }

#if DIAG_ENABLE_F32
DIAG_DEFINE_KERNELS(float, f32)
#endif
#if DIAG_ENABLE_F64
DIAG_DEFINE_KERNELS(double, f64)
#endif
