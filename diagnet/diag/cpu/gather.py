"""Gather kernels: ``out[b, i] = sum_k vals[k, i] * inp[b, (i + shifts[k]) % inp.shape[1]]``.

Part of `diagnet.diag.cpu` (its docstring gives the plan; `.tiles` the scratch rows): the
products whose output is indexed by ``t``, the *short* side of the weight (forward of a wide
weight, input grad of a tall or square one), and, after `_rotate_square`, those of a square
weight whose output is the long side. `diagnet.diag.cpu` picks serial (`_gather_block`) or
threaded (`_gather_parallel`, `_gather_rotated_parallel`); `.both_grads` reuses the tile
loops.

**8 diagonals x 4 batch rows per pass.** ``out[b, t] = sum_k values[k, t] * ext[b, t +
p_k]``: all diagonals add into the same output row, so a pass of the inner loop takes 8
diagonals and a *tile* of 4 batch rows. Per SIMD step it loads 8 ``values`` vectors (each
used for 4 rows), 32 shifted input vectors and 4 output vectors, and stores 4, for 32
multiply-adds (4- and 1-diagonal versions take the rest of ``K``). A loop over one diagonal
and one row would load 3 vectors and store 1 per multiply-add. Loads are what limit these
loops (about one 64-byte vector per cycle on AMD Zen 4); the shifted input loads, one per
multiply-add and all different, are the floor that remains. The fused loop is faster per
multiply-add than the one-diagonal loop, and 8 diagonals beat 4
(docs/benchmarks.md, "Measurements behind design choices").
"""

from __future__ import annotations

import numba
import numpy as np

from .tiles import (_TILE_ROWS, _jit, _load_tile, _pjit, _store_tile, _stride, _u,
                    _zero_tile)

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
def _gather_block(out, inp, vals, shifts, bias, relu, b_start, b_stop, marker):
    """Rows ``b_start .. b_stop-1`` of `_gather`: tiles of 4 rows, then single rows;
    ``bias`` ``(out.shape[1],)`` is added in the store pass (zeros for none), followed by a
    ReLU with ``relu`` (`.tiles._store_tile`)."""
    W = out.shape[1]
    ext_width = W + inp.shape[1] - 1
    size = _TILE_ROWS * _stride(marker)
    ext = np.empty(size, dtype=out.dtype)
    acc = np.empty(size, dtype=out.dtype)
    tiles_stop = b_start + (b_stop - b_start) // _TILE_ROWS * _TILE_ROWS
    for b in range(b_start, tiles_stop, _TILE_ROWS):
        _load_tile(ext, inp, b, _TILE_ROWS, ext_width, marker)
        _gather_tile(acc, ext, vals, shifts, marker)
        _store_tile(out, acc, bias, relu, b, _TILE_ROWS, marker)
    for b in range(tiles_stop, b_stop):
        _load_tile(ext, inp, b, 1, ext_width, marker)
        _zero_tile(acc, 1, W, marker)
        _gather_row(acc, ext, vals, shifts)
        _store_tile(out, acc, bias, relu, b, 1, marker)


@_pjit
def _gather_parallel(out, inp, vals, shifts, bias, relu, rows_per_task, marker):
    """`_gather_block` over the whole batch in tasks of ``rows_per_task`` rows."""
    B = out.shape[0]
    ntasks = (B + rows_per_task - 1) // rows_per_task
    for task in numba.prange(ntasks):
        b_start = task * rows_per_task
        _gather_block(out, inp, vals, shifts, bias, relu, b_start,
                      min(B, b_start + rows_per_task), marker)


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
def _gather_rotated_parallel(out, inp, values, offsets, bias, relu, n_chunks, marker):
    """`_gather_block` of the rotated diagonals of a square weight, one batch chunk per thread.

    Each thread rotates its own copy of the diagonals: a copy written by one core and read by
    another costs more than rotating twice.
    """
    B = out.shape[0]
    tiles = (B + _TILE_ROWS - 1) // _TILE_ROWS
    for c in numba.prange(n_chunks):
        b_start = min(B, _TILE_ROWS * (tiles * c // n_chunks))
        b_stop = min(B, _TILE_ROWS * (tiles * (c + 1) // n_chunks))
        if b_start < b_stop:
            rot, shifts = _rotate_square(values, offsets)
            _gather_block(out, inp, rot, shifts, bias, relu, b_start, b_stop, marker)
