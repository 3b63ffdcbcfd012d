"""Compiled CPU kernels (numba) for diagonal weights: forward, input grad, value grad.

Same functions, signatures and results as `diagnet.diag.reference` (see
`diagnet.diag.layout` for the convention). Write ``P = max(m, n)`` and ``L = min(m, n)``.
Position ``t`` of diagonal ``p`` always touches index ``t`` on the *short* side of the weight
and index ``(t + p) % P`` on the *long* side; every kernel below is built on that.

How the loops are arranged, and why
-----------------------------------
**Contiguous runs instead of per-element index arithmetic.** For one diagonal and one batch
row, the long-side indices ``(t + p) % P``, ``t = 0 .. L-1``, form a contiguous run that wraps
around at most once. Copying the batch row once into a scratch row that repeats its start,
``ext[j] = row[j % P]`` for ``j < P + L - 1``, removes the wrap: diagonal ``p`` reads
``ext[p : p + L]``. Every inner loop is then an element-wise update of contiguous vectors,
which LLVM compiles to SIMD (AVX-512 / AVX2) code.

**Gather into the short side, 8 diagonals x 4 batch rows per pass.** When the output is
indexed by ``t`` (forward of a wide weight, input grad of a tall or square one),
``out[b, t] = sum_k values[k, t] * ext[b, t + p_k]``: all diagonals add into the same output
row, so a pass of the inner loop takes 8 diagonals and a *tile* of 4 batch rows. Per SIMD
step it loads 8 ``values`` vectors (each used for 4 rows), 32 shifted input vectors and 4
output vectors, and stores 4, for 32 multiply-adds (4- and 1-diagonal versions take the rest
of ``K``). A loop over one diagonal and one row would load 3 vectors and store 1 per
multiply-add. Loads are what limit these loops (about one 64-byte vector per cycle on AMD
Zen 4); the shifted input loads, one per multiply-add and all different, are the floor that
remains. Measured per multiply-add, the fused loop is ~1.6x faster than the one-diagonal
loop; 8 diagonals gained 5-8% over 4.

**Tiles** keep the 4 rows in one scratch array at a fixed, compile-time stride (see the
comment above `_marker`), so the loop needs one pointer per diagonal instead of one per
(row, diagonal); with 2-D scratch arrays the loop ran out of registers (10-25% slower).
Batch rows left over after the last full tile (``B % 4``) go through one-row versions of the
loops, so a batch of 1 does not pay for 4.

**When the output is the long side** (forward of a tall or square weight, input grad of a wide
one), outputs are indexed by ``(t + p) % P``. For a square weight each diagonal is rotated into
output order once per call (``K * L`` copies) and the same gather runs. For a rectangular
weight the rotated diagonals would be ``P - L`` zeros out of ``P`` (and for fewer than 4 batch
rows the rotation costs as much as the product), so we scatter instead:
``acc[b, t + p] += values[k, t] * in[b, t]`` for a tile of 4 rows sharing each ``values``
load, then the wrapped tail ``acc[b, P:]`` is folded back onto the start.

**Value grad** is a reduction over the batch: ``dvalues[k, t] = sum_b a[b, t] * ext[b, t +
p_k]`` (``a`` is the short side, ``ext`` the extended long side). A pass takes a tile of 4
rows and 4 diagonals: each ``a`` load serves 4 diagonals, each ``dvalues`` element is loaded
and stored once per 4 rows.

**Both gradients in one pass.** A backward pass that wants the input grad and the value
grad (`input_and_value_grad`) loads each tile of rows once for both: the value grad reads
the short side of the weight and the extended long side, and ``dy`` is one of the two (the
long side of a tall or square weight, which the input grad gathers from; the short side of
a wide one, which it scatters from). The inner loops stay those of the separate products: a
loop that also shared the shifted ``ext`` loads between gather and value grad was 1.2-1.7x
slower at the ViT's sizes (likely no longer vectorised: it writes two arrays, ``acc`` and
``g``, in one loop).

**Threads.** Forward and input grad give each task a block of batch rows (several tasks per
thread, so uneven batches still balance). The square forward gives each thread one block and
its own rotated copy of the diagonals, because reading a copy that the other core just wrote
cost more than rotating twice. The value grad splits either its diagonals or its batch
rows among the threads. Split by diagonals, each thread writes its own rows of ``dvalues``
(no reduction) but copies every batch row into its tiles; split by rows, each copies only
its own rows, and the per-thread partial results ``(threads, K, L)`` are added at the end.
The batch split is taken when the copies saved, ``B * (P + 2 L)`` elements, are at least
``_VGRAD_BATCH_SPLIT`` (16) times ``K * L``. Measured on 2 cores, the batch split took
0.69-0.78x the time of the diagonal split at the ViT's narrow layers (``L = 64``, ratio
300-900, float32 and float64) and 1.04-1.27x at ratios 1-5 (768 to 3072 wide, batch 32-256);
at ratios 8-10 it was 0.93-0.98x in float32 but 1.02-1.06x in float64, so the threshold sits
above both. With too few groups of 4 diagonals for the threads, the batch is split too. The fused
backward threads like the input grad, by batch rows in about ``_TASKS_PER_THREAD`` tasks per
thread, each with its own partial value grad; where the value grad alone would split its
diagonals, the two products run separately instead.

Calls with little work run on the calling thread: forward and input grad below
``_SERIAL_WORK`` multiply-adds (``B * K * L``) or with fewer than two tiles of rows, value
grad below ``_SERIAL_WORK_VGRAD`` (each of its threads loads every batch row, so it gains
less from a second thread). A threaded call pays for the fork and join of numba's pool: a
few microseconds while the workers still spin from the previous call, but 170-270 us once
they sleep (`diagnet.diag.threadpools` makes them sleep after about 0.2 ms, so that they
leave the cores to BLAS), measured on a shared 2-core machine. The forward / input grad
threshold sits above the crossover measured with spinning workers (about 1.3e5
multiply-adds, float32) to leave a margin for the wake-up; the value grad's sits at its own
crossover (0.5-1e6), since in a backward pass it follows the input grad, whose threads are
then still spinning. Serial and threaded calls give the same sums up to their order.

**Indexing.** Hot loops index with unsigned integers (``_u``): numba treats a signed index as
possibly negative ("from the end"), and that per-element check on ``a[t + p]`` stops LLVM from
vectorising. They also create no array views (``a[k]``, ``a[p:]``), whose atomic reference
counting cost ~25% at ``L = 768``. There are no bounds checks, so the public functions
validate shapes and offsets first.

**Numerics.** ``fastmath`` is limited to ``contract`` (fused multiply-add) and ``reassoc`` (to
re-associate the fused sums); NaN and inf propagate as in the reference. The order of the sums
differs from the reference, so results agree to rounding of the summed terms.

Numba compiles the kernels on first use, per dtype and tile stride (tens of seconds for all
of them), and caches the machine code on disk (``cache=True``); importing this module
compiles nothing.
"""

from __future__ import annotations

import numba
import numpy as np

from . import threadpools

__all__ = ["forward", "input_grad", "value_grad", "input_and_value_grad"]

# The kernels run on numba's thread pool, the dense matmuls next to them on OpenBLAS's: make
# the idle workers of both sleep soon instead of spinning on the cores the other pool needs
# (see `diagnet.diag.threadpools`). Once per process, at the first use of these kernels.
threadpools.configure()

# contract: use FMA; reassoc: let LLVM re-balance the fused sums. Deliberately not nnan/ninf
# (they would let LLVM drop NaN/inf handling), nor the full fastmath=True.
_FASTMATH = {"contract", "reassoc"}
_jit = numba.njit(cache=True, fastmath=_FASTMATH, nogil=True)
_pjit = numba.njit(cache=True, fastmath=_FASTMATH, nogil=True, parallel=True)

# Below these many multiply-adds (B * K * L) a call runs on the calling thread (the
# crossovers measured on 2 cores, see "Threads" above): forward and input grad...
_SERIAL_WORK = 1 << 18
# ...and value grad (its crossover measured with the threads splitting the diagonals).
_SERIAL_WORK_VGRAD = 1 << 19
# A threaded value grad splits the batch (and adds per-thread partial sums) when the rows
# that every thread would copy under a split by diagonals, ``B * (P + 2 L)`` elements, are at
# least this many times the ``K * L`` of a partial sum (see "Threads" above).
_VGRAD_BATCH_SPLIT = 16
# Forward / input grad with fewer batch rows than this make one task: run on the caller.
_MIN_PARALLEL_ROWS = 8
# Forward / input grad split the batch into about this many tasks per thread...
_TASKS_PER_THREAD = 4
# ...of at most this many rows.
_MAX_ROWS_PER_TASK = 64

_u = np.uint64  # unsigned index (see "Indexing" above)

# Kernels work on tiles of this many batch rows (the loops below are written out for 4).
_TILE_ROWS = 4


# --------------------------------------------------------------------------------------
# Tiles: scratch rows at a compile-time stride
# --------------------------------------------------------------------------------------
# A tile holds 4 rows of scratch in one 1-D array, row r starting at r * S. Because S is a
# compile-time constant, LLVM addresses the same column of all four rows from one pointer
# plus constant displacements, instead of one pointer per (row, diagonal) stream; that keeps
# the hot loops free of register spills (10-25% faster than 2-D scratch arrays). Numba
# compiles one version of a function per *type* of its arguments, so the stride travels as
# the length of a tuple of zeros, ``marker``: ``S = 2**len(marker) + 80``. (The 80 keeps the
# rows of a tile, and the tiles, from colliding in the L1 cache: with 2**q + 16 the scatter
# ran 1.8x and the gather 1.1x slower, measured on AMD Zen 4.)


def _marker(n):
    """The marker of the smallest tile stride ``>= n`` (a tuple of zeros).

    Strides start at 1104, so that all small layers share one compiled version.
    """
    q = 10
    while (1 << q) + 80 < n:
        q += 1
    return (0,) * q


@_jit
def _stride(marker):
    return _u(1 << len(marker)) + _u(80)


@_jit
def _load_tile(tile, src, b_start, nrows, width, marker):
    """``tile[r*S + j] = src[b_start + r, j % W]`` for rows ``r < nrows`` and ``j < width``.

    ``W = src.shape[1]``; with ``width > W`` the row repeats (an extended row, see the module
    docstring).
    """
    S = _stride(marker)
    W = _u(src.shape[1])
    total = _u(width)
    for r in range(_u(nrows)):
        base = r * S
        b = _u(b_start) + r
        start = _u(0)
        while start < total:
            n = min(W, total - start)
            for j in range(n):
                tile[base + start + j] = src[b, j]
            start += n


@_jit
def _zero_tile(tile, nrows, width, marker):
    """``tile[r*S + j] = 0`` for rows ``r < nrows`` and ``j < width``."""
    S = _stride(marker)
    for r in range(_u(nrows)):
        for j in range(_u(width)):
            tile[r * S + j] = 0


@_jit
def _store_tile(dst, tile, b_start, nrows, marker):
    """``dst[b_start + r, j] = tile[r*S + j]`` for ``r < nrows``."""
    S = _stride(marker)
    for r in range(_u(nrows)):
        b = _u(b_start) + r
        for j in range(_u(dst.shape[1])):
            dst[b, j] = tile[r * S + j]


@_jit
def _store_tile_folded(dst, tile, b_start, nrows, width, marker):
    """``dst[b_start + r, j] = tile[r*S + j] + tile[r*S + j + P]``, the second term where
    ``j + P < width``: tile rows of ``width = P + L - 1`` entries fold onto ``P`` outputs."""
    S = _stride(marker)
    P = _u(dst.shape[1])
    tail = _u(width) - P
    for r in range(_u(nrows)):
        b = _u(b_start) + r
        base = r * S
        for j in range(tail):
            dst[b, j] = tile[base + j] + tile[base + j + P]
        for j in range(tail, P):
            dst[b, j] = tile[base + j]


# --------------------------------------------------------------------------------------
# Gather: out[b, i] = sum_k vals[k, i] * inp[b, (i + shifts[k]) % inp.shape[1]]
# --------------------------------------------------------------------------------------

# The first group of diagonals of a tile assigns its sum instead of adding it, which saves a
# pass that zeroes the tile. Like the stride, the choice travels as a type (the length of a
# tuple), so each version compiles without a branch in its loop.
_ASSIGN = (0,)
_ADD = ()


@_jit
def _gather_4rows_8diags(acc, ext, vals, k, shifts, marker, mode):
    """``acc[r*S + i] += sum_{d<8} vals[k+d, i] * ext[r*S + i + shifts[k+d]]``, r = 0..3
    (``=`` instead of ``+=`` when ``mode`` is `_ASSIGN`).

    The hot loop of forward and input grad. Per SIMD step: 8 ``vals`` loads (each used for
    4 rows), 32 shifted ``ext`` loads, 4 ``acc`` loads and 4 stores, for 32 multiply-adds.
    """
    S1 = _stride(marker)
    S2 = S1 + S1
    S3 = S2 + S1
    k0, k1, k2, k3 = _u(k), _u(k + 1), _u(k + 2), _u(k + 3)
    k4, k5, k6, k7 = _u(k + 4), _u(k + 5), _u(k + 6), _u(k + 7)
    s0, s1, s2, s3 = _u(shifts[k0]), _u(shifts[k1]), _u(shifts[k2]), _u(shifts[k3])
    s4, s5, s6, s7 = _u(shifts[k4]), _u(shifts[k5]), _u(shifts[k6]), _u(shifts[k7])
    for i in range(_u(vals.shape[1])):
        w0, w1, w2, w3 = vals[k0, i], vals[k1, i], vals[k2, i], vals[k3, i]
        w4, w5, w6, w7 = vals[k4, i], vals[k5, i], vals[k6, i], vals[k7, i]
        for r in (_u(0), S1, S2, S3):  # unrolled: a constant-length tuple
            j = i + r
            lo = (w0 * ext[j + s0] + w1 * ext[j + s1]) + (w2 * ext[j + s2] + w3 * ext[j + s3])
            hi = (w4 * ext[j + s4] + w5 * ext[j + s5]) + (w6 * ext[j + s6] + w7 * ext[j + s7])
            if len(mode):  # a compile-time constant: no branch in the compiled loop
                acc[j] = lo + hi
            else:
                acc[j] += lo + hi


@_jit
def _gather_4rows_4diags(acc, ext, vals, k, shifts, marker, mode):
    """As `_gather_4rows_8diags` with 4 diagonals (when ``K % 8 >= 4``)."""
    S1 = _stride(marker)
    S2 = S1 + S1
    S3 = S2 + S1
    k0, k1, k2, k3 = _u(k), _u(k + 1), _u(k + 2), _u(k + 3)
    s0, s1, s2, s3 = _u(shifts[k0]), _u(shifts[k1]), _u(shifts[k2]), _u(shifts[k3])
    for i in range(_u(vals.shape[1])):
        w0, w1, w2, w3 = vals[k0, i], vals[k1, i], vals[k2, i], vals[k3, i]
        for r in (_u(0), S1, S2, S3):
            j = i + r
            s = (w0 * ext[j + s0] + w1 * ext[j + s1]) + (w2 * ext[j + s2] + w3 * ext[j + s3])
            if len(mode):
                acc[j] = s
            else:
                acc[j] += s


@_jit
def _gather_4rows_1diag(acc, ext, vals, k, shifts, marker, mode):
    """As `_gather_4rows_8diags` with one diagonal (the last ``K % 4``)."""
    S1 = _stride(marker)
    S2 = S1 + S1
    S3 = S2 + S1
    k0 = _u(k)
    s0 = _u(shifts[k])
    for i in range(_u(vals.shape[1])):
        w0 = vals[k0, i]
        for r in (_u(0), S1, S2, S3):
            if len(mode):
                acc[i + r] = w0 * ext[i + r + s0]
            else:
                acc[i + r] += w0 * ext[i + r + s0]


@_jit
def _gather_1row_8diags(acc, ext, vals, k, shifts):
    """``acc[i] += sum_{d<8} vals[k+d, i] * ext[i + shifts[k+d]]``: one row (batch leftovers)."""
    k0, k1, k2, k3 = _u(k), _u(k + 1), _u(k + 2), _u(k + 3)
    k4, k5, k6, k7 = _u(k + 4), _u(k + 5), _u(k + 6), _u(k + 7)
    s0, s1, s2, s3 = _u(shifts[k0]), _u(shifts[k1]), _u(shifts[k2]), _u(shifts[k3])
    s4, s5, s6, s7 = _u(shifts[k4]), _u(shifts[k5]), _u(shifts[k6]), _u(shifts[k7])
    for i in range(_u(vals.shape[1])):
        lo = (vals[k0, i] * ext[i + s0] + vals[k1, i] * ext[i + s1]) + (
            vals[k2, i] * ext[i + s2] + vals[k3, i] * ext[i + s3])
        hi = (vals[k4, i] * ext[i + s4] + vals[k5, i] * ext[i + s5]) + (
            vals[k6, i] * ext[i + s6] + vals[k7, i] * ext[i + s7])
        acc[i] += lo + hi


@_jit
def _gather_1row_1diag(acc, ext, vals, k, shifts):
    """``acc[i] += vals[k, i] * ext[i + shifts[k]]``: one row, one diagonal."""
    k0 = _u(k)
    s0 = _u(shifts[k])
    for i in range(_u(vals.shape[1])):
        acc[i] += vals[k0, i] * ext[i + s0]


@_jit
def _gather_tile(acc, ext, vals, shifts, marker):
    """All ``K >= 1`` diagonals into a tile of 4 rows; the first group overwrites ``acc``."""
    K = vals.shape[0]
    if K >= 8:
        _gather_4rows_8diags(acc, ext, vals, 0, shifts, marker, _ASSIGN)
        k = 8
    elif K >= 4:
        _gather_4rows_4diags(acc, ext, vals, 0, shifts, marker, _ASSIGN)
        k = 4
    else:
        _gather_4rows_1diag(acc, ext, vals, 0, shifts, marker, _ASSIGN)
        k = 1
    while k + 8 <= K:
        _gather_4rows_8diags(acc, ext, vals, k, shifts, marker, _ADD)
        k += 8
    if k + 4 <= K:
        _gather_4rows_4diags(acc, ext, vals, k, shifts, marker, _ADD)
        k += 4
    while k < K:
        _gather_4rows_1diag(acc, ext, vals, k, shifts, marker, _ADD)
        k += 1


@_jit
def _gather_row(acc, ext, vals, shifts):
    """All diagonals into one row (``acc`` zeroed by the caller)."""
    K = vals.shape[0]
    k = 0
    while k + 8 <= K:
        _gather_1row_8diags(acc, ext, vals, k, shifts)
        k += 8
    while k < K:
        _gather_1row_1diag(acc, ext, vals, k, shifts)
        k += 1


@_jit
def _gather_block(out, inp, vals, shifts, b_start, b_stop, marker):
    """Rows ``b_start .. b_stop-1`` of `_gather`: tiles of 4 rows, then single rows."""
    W = out.shape[1]
    ext_width = W + inp.shape[1] - 1
    size = _TILE_ROWS * _stride(marker)
    ext = np.empty(size, dtype=out.dtype)
    acc = np.empty(size, dtype=out.dtype)
    tiles_stop = b_start + (b_stop - b_start) // _TILE_ROWS * _TILE_ROWS
    for b in range(b_start, tiles_stop, _TILE_ROWS):
        _load_tile(ext, inp, b, _TILE_ROWS, ext_width, marker)
        _gather_tile(acc, ext, vals, shifts, marker)
        _store_tile(out, acc, b, _TILE_ROWS, marker)
    for b in range(tiles_stop, b_stop):
        _load_tile(ext, inp, b, 1, ext_width, marker)
        _zero_tile(acc, 1, W, marker)
        _gather_row(acc, ext, vals, shifts)
        _store_tile(out, acc, b, 1, marker)


@_pjit
def _gather_parallel(out, inp, vals, shifts, rows_per_task, marker):
    """`_gather_block` over the whole batch in tasks of ``rows_per_task`` rows."""
    B = out.shape[0]
    ntasks = (B + rows_per_task - 1) // rows_per_task
    for task in numba.prange(ntasks):
        b_start = task * rows_per_task
        _gather_block(out, inp, vals, shifts, b_start, min(B, b_start + rows_per_task), marker)


@_jit
def _rotate_square(values, offsets):
    """Diagonals of a square ``(P, P)`` weight in output order, and their gather shifts.

    ``rot[k, i] = values[k, (i - p_k) % P]`` and ``shifts[k] = (P - p_k) % P``, so that
    ``out[i] = sum_k values[k, t] * inp[t]`` over ``(i, t)`` on diagonal ``p_k`` becomes
    ``sum_k rot[k, i] * inp[(i + shifts[k]) % P]``, a gather.
    """
    K, P = values.shape
    rot = np.empty((K, P), dtype=values.dtype)
    shifts = np.empty(K, dtype=np.int64)
    for k in range(K):
        shifts[k] = (P - offsets[k]) % P
        # t = 0 .. P-1 lands at i = (t + p) % P: two contiguous runs
        p = _u(offsets[k])
        first = _u(P) - p
        for t in range(first):
            rot[k, t + p] = values[k, t]
        for t in range(first, _u(P)):
            rot[k, t - first] = values[k, t]
    return rot, shifts


@_pjit
def _gather_rotated_parallel(out, inp, values, offsets, n_chunks, marker):
    """`_gather_block` of the rotated diagonals of a square weight, one batch chunk per thread.

    Each thread rotates its own copy of the diagonals: a copy written by one core and read by
    another costs more than rotating twice (~25 us for 768 x 77 on the 2-core test machine).
    """
    B = out.shape[0]
    tiles = (B + _TILE_ROWS - 1) // _TILE_ROWS
    for c in numba.prange(n_chunks):
        b_start = min(B, _TILE_ROWS * (tiles * c // n_chunks))
        b_stop = min(B, _TILE_ROWS * (tiles * (c + 1) // n_chunks))
        if b_start < b_stop:
            rot, shifts = _rotate_square(values, offsets)
            _gather_block(out, inp, rot, shifts, b_start, b_stop, marker)


# --------------------------------------------------------------------------------------
# Scatter: out[b, (t + offsets[k]) % P] = sum_k vals[k, t] * inp[b, t]
# --------------------------------------------------------------------------------------


@_jit
def _scatter_4rows_1diag(acc, x, vals, k, p, marker):
    """``acc[r*S + t + p] += vals[k, t] * x[r*S + t]`` for r = 0..3 (one ``vals`` load each)."""
    S1 = _stride(marker)
    S2 = S1 + S1
    S3 = S2 + S1
    k0 = _u(k)
    pu = _u(p)
    for t in range(_u(vals.shape[1])):
        w = vals[k0, t]
        for r in (_u(0), S1, S2, S3):
            acc[t + r + pu] += w * x[t + r]


@_jit
def _scatter_1row_1diag(acc, x, vals, k, p):
    """``acc[t + p] += vals[k, t] * x[t]``: one row (batch leftovers)."""
    k0 = _u(k)
    pu = _u(p)
    for t in range(_u(vals.shape[1])):
        acc[t + pu] += vals[k0, t] * x[t]


@_jit
def _scatter_block(out, inp, vals, offsets, b_start, b_stop, marker):
    """Rows ``b_start .. b_stop-1`` of `_scatter`: tiles of 4 rows, then single rows."""
    P = out.shape[1]
    K, L = vals.shape
    width = P + L - 1  # t + p < P + L - 1; entries past P wrap, folded back by the store
    size = _TILE_ROWS * _stride(marker)
    x = np.empty(size, dtype=out.dtype)
    acc = np.empty(size, dtype=out.dtype)
    tiles_stop = b_start + (b_stop - b_start) // _TILE_ROWS * _TILE_ROWS
    for b in range(b_start, tiles_stop, _TILE_ROWS):
        _load_tile(x, inp, b, _TILE_ROWS, L, marker)
        _zero_tile(acc, _TILE_ROWS, width, marker)
        for k in range(K):
            _scatter_4rows_1diag(acc, x, vals, k, offsets[k], marker)
        _store_tile_folded(out, acc, b, _TILE_ROWS, width, marker)
    for b in range(tiles_stop, b_stop):
        _load_tile(x, inp, b, 1, L, marker)
        _zero_tile(acc, 1, width, marker)
        for k in range(K):
            _scatter_1row_1diag(acc, x, vals, k, offsets[k])
        _store_tile_folded(out, acc, b, 1, width, marker)


@_pjit
def _scatter_parallel(out, inp, vals, offsets, rows_per_task, marker):
    """`_scatter_block` over the whole batch in tasks of ``rows_per_task`` rows."""
    B = out.shape[0]
    ntasks = (B + rows_per_task - 1) // rows_per_task
    for task in numba.prange(ntasks):
        b_start = task * rows_per_task
        _scatter_block(out, inp, vals, offsets, b_start, min(B, b_start + rows_per_task), marker)


# --------------------------------------------------------------------------------------
# Value grad: g[k, t] = sum_b short[b, t] * long[b, (t + offsets[k]) % P]
# --------------------------------------------------------------------------------------


@_jit
def _vgrad_4rows_4diags(g, a, ext, k, offsets, marker):
    """``g[k+d, t] += sum_{r<4} a[r*S + t] * ext[r*S + t + offsets[k+d]]`` for d = 0..3.

    Per SIMD step: 4 ``a`` loads (each used for 4 diagonals), 16 shifted ``ext`` loads, 4
    ``g`` loads and 4 stores, for 16 multiply-adds.
    """
    S1 = _stride(marker)
    S2 = S1 + S1
    S3 = S2 + S1
    k0, k1, k2, k3 = _u(k), _u(k + 1), _u(k + 2), _u(k + 3)
    p0, p1, p2, p3 = _u(offsets[k0]), _u(offsets[k1]), _u(offsets[k2]), _u(offsets[k3])
    for t in range(_u(g.shape[1])):
        a0, a1, a2, a3 = a[t], a[t + S1], a[t + S2], a[t + S3]
        g[k0, t] += (a0 * ext[t + p0] + a1 * ext[t + S1 + p0]) + (
            a2 * ext[t + S2 + p0] + a3 * ext[t + S3 + p0])
        g[k1, t] += (a0 * ext[t + p1] + a1 * ext[t + S1 + p1]) + (
            a2 * ext[t + S2 + p1] + a3 * ext[t + S3 + p1])
        g[k2, t] += (a0 * ext[t + p2] + a1 * ext[t + S1 + p2]) + (
            a2 * ext[t + S2 + p2] + a3 * ext[t + S3 + p2])
        g[k3, t] += (a0 * ext[t + p3] + a1 * ext[t + S1 + p3]) + (
            a2 * ext[t + S2 + p3] + a3 * ext[t + S3 + p3])


@_jit
def _vgrad_4rows_1diag(g, a, ext, k, offsets, marker):
    """As `_vgrad_4rows_4diags` with one diagonal (the last ``K % 4``)."""
    S1 = _stride(marker)
    S2 = S1 + S1
    S3 = S2 + S1
    k0 = _u(k)
    p0 = _u(offsets[k])
    for t in range(_u(g.shape[1])):
        g[k0, t] += (a[t] * ext[t + p0] + a[t + S1] * ext[t + S1 + p0]) + (
            a[t + S2] * ext[t + S2 + p0] + a[t + S3] * ext[t + S3 + p0])


@_jit
def _vgrad_1row_4diags(g, a, ext, k, offsets):
    """``g[k+d, t] += a[t] * ext[t + offsets[k+d]]`` for d = 0..3: one row (batch leftovers)."""
    k0, k1, k2, k3 = _u(k), _u(k + 1), _u(k + 2), _u(k + 3)
    p0, p1, p2, p3 = _u(offsets[k0]), _u(offsets[k1]), _u(offsets[k2]), _u(offsets[k3])
    for t in range(_u(g.shape[1])):
        a0 = a[t]
        g[k0, t] += a0 * ext[t + p0]
        g[k1, t] += a0 * ext[t + p1]
        g[k2, t] += a0 * ext[t + p2]
        g[k3, t] += a0 * ext[t + p3]


@_jit
def _vgrad_1row_1diag(g, a, ext, k, offsets):
    """``g[k, t] += a[t] * ext[t + offsets[k]]``: one row, one diagonal."""
    k0 = _u(k)
    p0 = _u(offsets[k])
    for t in range(_u(g.shape[1])):
        g[k0, t] += a[t] * ext[t + p0]


@_jit
def _vgrad_tile(g, a, ext, k_start, k_stop, offsets, marker):
    """``g[k] +=`` the value grad of diagonals ``k_start .. k_stop-1`` over a tile of 4 rows."""
    k = k_start
    while k + 4 <= k_stop:
        _vgrad_4rows_4diags(g, a, ext, k, offsets, marker)
        k += 4
    while k < k_stop:
        _vgrad_4rows_1diag(g, a, ext, k, offsets, marker)
        k += 1


@_jit
def _vgrad_row(g, a, ext, k_start, k_stop, offsets):
    """As `_vgrad_tile` for one row (batch leftovers)."""
    k = k_start
    while k + 4 <= k_stop:
        _vgrad_1row_4diags(g, a, ext, k, offsets)
        k += 4
    while k < k_stop:
        _vgrad_1row_1diag(g, a, ext, k, offsets)
        k += 1


@_jit
def _vgrad_block(g, short, long, offsets, k_start, k_stop, b_start, b_stop, marker):
    """``g[k] +=`` the value grad of diagonals ``k_start .. k_stop-1`` over batch rows
    ``b_start .. b_stop-1``: tiles of 4 rows, then single rows."""
    L = short.shape[1]
    ext_width = L + long.shape[1] - 1
    size = _TILE_ROWS * _stride(marker)
    a = np.empty(size, dtype=g.dtype)
    ext = np.empty(size, dtype=g.dtype)
    tiles_stop = b_start + (b_stop - b_start) // _TILE_ROWS * _TILE_ROWS
    for b in range(b_start, tiles_stop, _TILE_ROWS):
        _load_tile(a, short, b, _TILE_ROWS, L, marker)
        _load_tile(ext, long, b, _TILE_ROWS, ext_width, marker)
        _vgrad_tile(g, a, ext, k_start, k_stop, offsets, marker)
    for b in range(tiles_stop, b_stop):
        _load_tile(a, short, b, 1, L, marker)
        _load_tile(ext, long, b, 1, ext_width, marker)
        _vgrad_row(g, a, ext, k_start, k_stop, offsets)


@_pjit
def _vgrad_parallel(partial, short, long, offsets, n_kchunks, marker):
    """Value grad in ``n_kchunks * len(partial)`` tasks: diagonal chunk x batch chunk.

    Task ``(kc, bc)`` adds batch chunk ``bc`` of the diagonals in chunk ``kc`` into
    ``partial[bc]`` (zeroed by the caller), so tasks never write the same element; the caller
    sums ``partial`` over its first axis.
    """
    n_bchunks = partial.shape[0]
    K = offsets.shape[0]
    B = short.shape[0]
    for task in numba.prange(n_kchunks * n_bchunks):
        kc = task % n_kchunks
        bc = task // n_kchunks
        # diagonals split in groups of 4, rows in tiles of 4: only the last chunk is ragged
        groups = (K + 3) // 4
        tiles = (B + 3) // 4
        k_start = min(K, 4 * (groups * kc // n_kchunks))
        k_stop = min(K, 4 * (groups * (kc + 1) // n_kchunks))
        b_start = min(B, 4 * (tiles * bc // n_bchunks))
        b_stop = min(B, 4 * (tiles * (bc + 1) // n_bchunks))
        _vgrad_block(partial[bc], short, long, offsets, k_start, k_stop, b_start, b_stop,
                     marker)


# --------------------------------------------------------------------------------------
# Both gradients in one pass: dx = dy @ W and the value grad from the same tiles
# --------------------------------------------------------------------------------------


@_jit
def _both_grads_block(dx, g, dy, x, vals, offsets, b_start, b_stop, marker):
    """Rows ``b_start .. b_stop-1``: their input grad into ``dx``, their value grad added into
    ``g``, each tile of rows loaded once for both.

    The value grad reads the short side ``a`` and the extended long side ``ext`` of the
    weight. For a tall or square weight ``ext`` holds ``dy``, from which the input grad
    gathers; for a wide one ``a`` holds ``dy``, from which it scatters (see the module
    docstring). Either way ``dy`` is copied into a tile once instead of once per product.
    """
    m, n = dy.shape[1], x.shape[1]
    K, L = vals.shape
    width = max(m, n) + L - 1  # extended long side; also the scatter's unfolded width
    tall = m >= n
    short, long = (x, dy) if tall else (dy, x)
    size = _TILE_ROWS * _stride(marker)
    a = np.empty(size, dtype=g.dtype)
    ext = np.empty(size, dtype=g.dtype)
    acc = np.empty(size, dtype=g.dtype)
    tiles_stop = b_start + (b_stop - b_start) // _TILE_ROWS * _TILE_ROWS
    for b in range(b_start, tiles_stop, _TILE_ROWS):
        _load_tile(a, short, b, _TILE_ROWS, L, marker)
        _load_tile(ext, long, b, _TILE_ROWS, width, marker)
        if tall:
            _gather_tile(acc, ext, vals, offsets, marker)
            _store_tile(dx, acc, b, _TILE_ROWS, marker)
        else:
            _zero_tile(acc, _TILE_ROWS, width, marker)
            for k in range(K):
                _scatter_4rows_1diag(acc, a, vals, k, offsets[k], marker)
            _store_tile_folded(dx, acc, b, _TILE_ROWS, width, marker)
        _vgrad_tile(g, a, ext, 0, K, offsets, marker)
    for b in range(tiles_stop, b_stop):
        _load_tile(a, short, b, 1, L, marker)
        _load_tile(ext, long, b, 1, width, marker)
        if tall:
            _zero_tile(acc, 1, L, marker)
            _gather_row(acc, ext, vals, offsets)
            _store_tile(dx, acc, b, 1, marker)
        else:
            _zero_tile(acc, 1, width, marker)
            for k in range(K):
                _scatter_1row_1diag(acc, a, vals, k, offsets[k])
            _store_tile_folded(dx, acc, b, 1, width, marker)
        _vgrad_row(g, a, ext, 0, K, offsets)


@_pjit
def _both_grads_parallel(dx, partial, dy, x, vals, offsets, marker):
    """`_both_grads_block` with the batch split into ``len(partial)`` chunks, one per task.

    Task ``c`` writes its own rows of ``dx`` and adds its value grad into ``partial[c]``
    (zeroed by the caller), which sums ``partial`` over its first axis.
    """
    n_chunks = partial.shape[0]
    B = dy.shape[0]
    tiles = (B + _TILE_ROWS - 1) // _TILE_ROWS
    for c in numba.prange(n_chunks):
        b_start = min(B, _TILE_ROWS * (tiles * c // n_chunks))
        b_stop = min(B, _TILE_ROWS * (tiles * (c + 1) // n_chunks))
        _both_grads_block(dx, partial[c], dy, x, vals, offsets, b_start, b_stop, marker)


# --------------------------------------------------------------------------------------
# Dispatch: serial or threaded
# --------------------------------------------------------------------------------------


def _threads():
    return numba.get_num_threads()


def _row_threads(B, K, L):
    """Threads for a forward / input grad (split by batch rows): 1 when the work is below
    ``_SERIAL_WORK`` or the batch too small for two tasks, else numba's thread count."""
    if B * K * L < _SERIAL_WORK or B < _MIN_PARALLEL_ROWS:
        return 1
    return _threads()


def _diagonal_threads(B, K, L):
    """Threads for a value grad (split by diagonals): 1 below ``_SERIAL_WORK_VGRAD``."""
    return 1 if B * K * L < _SERIAL_WORK_VGRAD else _threads()


def _rows_per_task(B, threads):
    """Rows per forward/input-grad task: about ``_TASKS_PER_THREAD`` tasks per thread, whole
    tiles, at most ``_MAX_ROWS_PER_TASK``."""
    rows = -(-B // (threads * _TASKS_PER_THREAD))
    rows = -(-rows // _TILE_ROWS) * _TILE_ROWS
    return max(_TILE_ROWS, min(rows, _MAX_ROWS_PER_TASK))


def _gather(out, inp, vals, shifts):
    """``out[b, i] = sum_k vals[k, i] * inp[b, (i + shifts[k]) % inp.shape[1]]``."""
    B = out.shape[0]
    marker = _marker(out.shape[1] + inp.shape[1] - 1)
    threads = _row_threads(B, *vals.shape)
    if threads == 1:
        _gather_block(out, inp, vals, shifts, 0, B, marker)
    else:
        _gather_parallel(out, inp, vals, shifts, _rows_per_task(B, threads), marker)


def _scatter(out, inp, vals, offsets):
    """``out[b, (t + offsets[k]) % out.shape[1]] = sum_k vals[k, t] * inp[b, t]``."""
    B = out.shape[0]
    marker = _marker(out.shape[1] + inp.shape[1] - 1)
    threads = _row_threads(B, *vals.shape)
    if threads == 1:
        _scatter_block(out, inp, vals, offsets, 0, B, marker)
    else:
        _scatter_parallel(out, inp, vals, offsets, _rows_per_task(B, threads), marker)


def _to_long_side(out, short, values, offsets):
    """The product whose output is the long side of the weight (index ``(t + p) % P``)."""
    B = out.shape[0]
    if short.shape[1] != out.shape[1] or B < _TILE_ROWS:
        # rectangular, or too few rows to pay for rotating the diagonals: scatter
        _scatter(out, short, values, offsets)
        return
    # square: rotate the diagonals into output order, then the faster gather applies
    marker = _marker(2 * out.shape[1] - 1)
    threads = _row_threads(B, *values.shape)
    if threads == 1:
        rot, shifts = _rotate_square(values, offsets)
        _gather_block(out, short, rot, shifts, 0, B, marker)
    else:
        _gather_rotated_parallel(out, short, values, offsets, threads, marker)


def _vgrad_split(B, K, L, P, threads):
    """``(n_kchunks, n_bchunks)``: how a threaded value grad splits diagonals and batch rows.

    Many rows per diagonal (narrow layers, large batches): split the batch, so that each
    thread copies only its own rows. Otherwise give each thread its own diagonals (no partial
    sums to add), and split the batch too only when there are too few groups of 4 diagonals.
    """
    tiles = (B + _TILE_ROWS - 1) // _TILE_ROWS
    if B * (P + 2 * L) >= _VGRAD_BATCH_SPLIT * K * L:
        return 1, max(1, min(threads, tiles))
    n_kchunks = min(threads, (K + 3) // 4)
    return n_kchunks, max(1, min(threads // n_kchunks, tiles))


def _value_grad(short, long, offsets):
    B, L = short.shape
    K = offsets.shape[0]
    marker = _marker(L + long.shape[1] - 1)
    threads = _diagonal_threads(B, K, L)
    if threads == 1:
        out = np.zeros((K, L), dtype=short.dtype)
        _vgrad_block(out, short, long, offsets, 0, K, 0, B, marker)
        return out
    n_kchunks, n_bchunks = _vgrad_split(B, K, L, long.shape[1], threads)
    partial = np.zeros((n_bchunks, K, L), dtype=short.dtype)
    _vgrad_parallel(partial, short, long, offsets, n_kchunks, marker)
    return partial[0] if n_bchunks == 1 else partial.sum(axis=0)


def _both_grads_chunks(B, K, L, P):
    """Batch chunks of a fused input + value grad: 1 runs it on the calling thread, more
    split the batch among threads; 0 means "do not fuse".

    The fused pass threads like the input grad (by batch rows, from ``_SERIAL_WORK``, about
    ``_TASKS_PER_THREAD`` tasks per thread so that a busy core does not hold up the others),
    which suits the value grad wherever a threaded value grad would split the batch too
    (`_vgrad_split`): each task adds its own ``(K, L)`` partial sum. Where it would split its
    diagonals instead (wide layers, few rows per diagonal), the two products run separately.
    """
    threads = _row_threads(B, K, L)
    if threads == 1:
        return 1
    n_kchunks, n_bchunks = _vgrad_split(B, K, L, P, threads)
    tiles = (B + _TILE_ROWS - 1) // _TILE_ROWS
    return 0 if n_kchunks > 1 else max(1, min(threads * _TASKS_PER_THREAD, tiles))


def _input_grad(dx, dy, values, offsets):
    """``dx = dy @ W`` into ``dx`` (``B >= 1``, ``K >= 1``)."""
    if dy.shape[1] >= dx.shape[1]:
        # tall or square: dx is indexed by t, the short side; dy by (t + p) % m
        _gather(dx, dy, values, offsets)
    else:
        # wide: dx is indexed by (t + p) % n, the long side
        _to_long_side(dx, dy, values, offsets)


def _input_and_value_grad(dy, x, values, offsets):
    """``(dx, dvalues)`` for ``B >= 1``, ``K >= 1``: fused where `_both_grads_chunks` allows."""
    B, m = dy.shape
    n = x.shape[1]
    K, L = values.shape
    dx = np.empty((B, n), dtype=dy.dtype)
    n_chunks = _both_grads_chunks(B, K, L, max(m, n))
    if n_chunks == 0:
        _input_grad(dx, dy, values, offsets)
        short, long = (x, dy) if m >= n else (dy, x)
        return dx, _value_grad(short, long, offsets)
    marker = _marker(max(m, n) + L - 1)
    if n_chunks == 1:
        g = np.zeros((K, L), dtype=dy.dtype)
        _both_grads_block(dx, g, dy, x, values, offsets, 0, B, marker)
        return dx, g
    partial = np.zeros((n_chunks, K, L), dtype=dy.dtype)
    _both_grads_parallel(dx, partial, dy, x, values, offsets, marker)
    return dx, partial.sum(axis=0)


# --------------------------------------------------------------------------------------
# Argument checks (O(1) apart from the offsets range check)
# --------------------------------------------------------------------------------------

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_INT64 = np.dtype(np.int64)


def _is_ready(a, dtype):
    """Whether ``a`` is a C-contiguous NumPy array of ``dtype``: usable without a copy."""
    return type(a) is np.ndarray and a.dtype == dtype and a.flags.c_contiguous


def _float_pair(primary, other):
    """``primary`` and ``other`` as C-contiguous 2-D arrays of ``primary``'s dtype (which must
    be float32/float64). Arrays that are so already are returned as they are (no copy)."""
    if type(primary) is not np.ndarray or not primary.flags.c_contiguous:
        primary = np.ascontiguousarray(primary)
    dtype = primary.dtype
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"expected a float32 or float64 array; got {dtype}")
    if not _is_ready(other, dtype):
        other = np.ascontiguousarray(other, dtype=dtype)
    for a in (primary, other):
        if a.ndim != 2:
            raise ValueError(f"expected a 2-D array; got shape {a.shape}")
    return primary, other


def _as_offsets(offsets):
    """``offsets`` as a contiguous 1-D int64 array (from any integer dtype or a list)."""
    if _is_ready(offsets, _INT64) and offsets.ndim == 1:
        return offsets
    offsets = np.asarray(offsets).reshape(-1)
    if offsets.size == 0:
        return np.zeros(0, dtype=np.int64)
    if offsets.dtype.kind not in "iu":
        raise TypeError(f"offsets must be integers; got {offsets.dtype}")
    if offsets.dtype.kind == "u" and offsets.max() > np.iinfo(np.int64).max:
        raise ValueError("offsets out of range")
    return np.ascontiguousarray(offsets, dtype=np.int64)


@_jit
def _offsets_in_range(offsets, P):
    for k in range(offsets.shape[0]):
        if offsets[k] < 0 or offsets[k] >= P:
            return False
    return True


def _check_layout(m, n, offsets, K, L):
    """Raise unless ``values`` is ``(len(offsets), min(m, n))`` and ``0 <= offsets < max(m, n)``.

    The kernels do not bounds-check, so this is what keeps them inside the arrays. The range
    check is one compiled pass over ``K`` offsets (about 0.2 us, most of it the call): kept on
    every call, so that offsets changed in place after their validation cannot make a
    kernel write outside its arrays.
    """
    if m < 1 or n < 1:
        raise ValueError(f"the weight shape must be positive; got ({m}, {n})")
    if L != min(m, n) or K != offsets.shape[0]:
        raise ValueError(
            f"values must be (len(offsets), min(m, n)) = ({offsets.shape[0]}, {min(m, n)}); "
            f"got ({K}, {L})")
    if K and not _offsets_in_range(offsets, max(m, n)):
        raise ValueError(f"offsets must lie in [0, {max(m, n)})")


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------

def forward(x, offsets, values, m):
    """``y = x @ W.T`` for the diagonal weight ``W`` of shape ``(m, n)``, ``n = x.shape[1]``.

    ``x``: ``(B, n)`` float32 or float64. ``offsets``: ``(K,)`` integers (any int dtype) in
    ``[0, max(m, n))``, normally sorted and unique. ``values``: ``(K, min(m, n))``, converted to
    ``x.dtype``. Non-contiguous inputs are copied. Returns ``y``: ``(B, m)``, ``x.dtype``.
    """
    x, values = _float_pair(x, values)
    offsets = _as_offsets(offsets)
    m = int(m)
    B, n = x.shape
    _check_layout(m, n, offsets, *values.shape)
    y = np.empty((B, m), dtype=x.dtype)
    if B == 0 or offsets.shape[0] == 0:
        y[:] = 0
    elif m < n:
        # wide: y is indexed by t, the short side; x by (t + p) % n
        _gather(y, x, values, offsets)
    else:
        # tall or square: y is indexed by (t + p) % m, the long side
        _to_long_side(y, x, values, offsets)
    return y


def input_grad(dy, offsets, values, n):
    """``dx = dy @ W`` for the diagonal weight ``W`` of shape ``(m, n)``, ``m = dy.shape[1]``.

    ``dy``: ``(B, m)`` float32 or float64; ``offsets`` and ``values`` as in `forward`
    (``values`` converted to ``dy.dtype``). Returns ``dx``: ``(B, n)``, ``dy.dtype``.
    """
    dy, values = _float_pair(dy, values)
    offsets = _as_offsets(offsets)
    n = int(n)
    B, m = dy.shape
    _check_layout(m, n, offsets, *values.shape)
    dx = np.empty((B, n), dtype=dy.dtype)
    if B == 0 or offsets.shape[0] == 0:
        dx[:] = 0
    else:
        _input_grad(dx, dy, values, offsets)
    return dx


def value_grad(dy, x, offsets):
    """The gradient of ``values``: ``dvalues[k, t] = sum_b dy[b, row_k(t)] * x[b, col_k(t)]``.

    ``dy``: ``(B, m)`` float32 or float64; ``x``: ``(B, n)``, converted to ``dy.dtype``;
    ``offsets``: ``(K,)`` integers in ``[0, max(m, n))``. Returns ``(K, min(m, n))``,
    ``dy.dtype``.
    """
    dy, x = _float_pair(dy, x)
    offsets = _as_offsets(offsets)
    B, m = dy.shape
    if x.shape[0] != B:
        raise ValueError(f"dy and x must have the same batch size; got {B} and {x.shape[0]}")
    n = x.shape[1]
    K, L = offsets.shape[0], min(m, n)
    _check_layout(m, n, offsets, K, L)
    if B == 0 or K == 0:
        return np.zeros((K, L), dtype=dy.dtype)
    # t indexes the short side, (t + p) % P the long side; x is the short side when m >= n
    short, long = (x, dy) if m >= n else (dy, x)
    return _value_grad(short, long, offsets)


def input_and_value_grad(dy, x, offsets, values):
    """Both gradients of ``y = x @ W.T`` at once: ``(dx, dvalues)``, equal to
    ``(input_grad(dy, offsets, values, n), value_grad(dy, x, offsets))``, ``n = x.shape[1]``.

    ``dy``: ``(B, m)`` float32 or float64; ``x``: ``(B, n)`` and ``values``:
    ``(len(offsets), min(m, n))``, converted to ``dy.dtype``; ``offsets`` as in `forward`.
    Returns ``dx``: ``(B, n)`` and ``dvalues``: ``(K, min(m, n))``, both ``dy.dtype``.
    One pass over the batch computes both, so each tile of ``dy`` is copied once; the value
    grad's sums may run in another order than `value_grad`'s.
    """
    dy, x = _float_pair(dy, x)
    if not _is_ready(values, dy.dtype):
        values = np.ascontiguousarray(values, dtype=dy.dtype)
    if values.ndim != 2:
        raise ValueError(f"values must be a 2-D array; got shape {values.shape}")
    offsets = _as_offsets(offsets)
    B, m = dy.shape
    if x.shape[0] != B:
        raise ValueError(f"dy and x must have the same batch size; got {B} and {x.shape[0]}")
    n = x.shape[1]
    K, L = values.shape
    _check_layout(m, n, offsets, K, L)
    if B == 0 or K == 0:
        return np.zeros((B, n), dtype=dy.dtype), np.zeros((K, L), dtype=dy.dtype)
    return _input_and_value_grad(dy, x, values, offsets)
