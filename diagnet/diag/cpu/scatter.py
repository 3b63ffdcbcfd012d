"""Scatter kernels: ``out[b, (t + offsets[k]) % P] = sum_k vals[k, t] * inp[b, t]``.

Part of `diagnet.diag.cpu` (its docstring gives the plan; `.tiles` the scratch rows): the
products whose output is the *long* side of a rectangular weight (forward of a tall weight,
input grad of a wide one). For a square weight `diagnet.diag.cpu` rotates the diagonals
into output order and gathers instead (`.gather`); for a rectangular one the rotated
diagonals would be ``P - L`` zeros out of ``P`` (and for fewer than 4 batch rows the
rotation costs as much as the product), so these kernels scatter:
``acc[b, t + p] += values[k, t] * in[b, t]`` for a tile of 4 rows sharing each ``values``
load, then the wrapped tail ``acc[b, P:]`` is folded back onto the start
(`_store_tile_folded`). `.both_grads` reuses the tile loops.
"""

from __future__ import annotations

import numba
import numpy as np

from .tiles import (_TILE_ROWS, _jit, _load_tile, _pjit, _store_tile_folded, _stride, _u,
                    _zero_tile)


@_jit
def _scatter_4rows(acc, x, vals, offsets, marker):
    """``acc[r*S + t + offsets[k]] += vals[k, t] * x[r*S + t]`` for r = 0..3 (one ``vals``
    load each), diagonal after diagonal.

    The loop over the diagonals is here rather than in the caller, so that each diagonal's
    vector loop starts without a call around it, which counts at narrow widths
    (docs/benchmarks.md); the same sums in the same order.
    """
    S1 = _stride(marker)
    S2 = S1 + S1
    S3 = S2 + S1
    for k in range(_u(vals.shape[0])):
        pu = _u(offsets[k])
        for t in range(_u(vals.shape[1])):
            w = vals[k, t]
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
def _scatter_block(out, inp, vals, offsets, bias, relu, b_start, b_stop, marker):
    """Rows ``b_start .. b_stop-1`` of `_scatter`: tiles of 4 rows, then single rows;
    ``bias`` ``(out.shape[1],)`` is added in the store pass (zeros for none), followed by a
    ReLU with ``relu`` (`.tiles._store_tile`)."""
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
        _scatter_4rows(acc, x, vals, offsets, marker)
        _store_tile_folded(out, acc, bias, relu, b, _TILE_ROWS, width, marker)
    for b in range(tiles_stop, b_stop):
        _load_tile(x, inp, b, 1, L, marker)
        _zero_tile(acc, 1, width, marker)
        for k in range(K):
            _scatter_1row_1diag(acc, x, vals, k, offsets[k])
        _store_tile_folded(out, acc, bias, relu, b, 1, width, marker)


@_pjit
def _scatter_parallel(out, inp, vals, offsets, bias, relu, rows_per_task, marker):
    """`_scatter_block` over the whole batch in tasks of ``rows_per_task`` rows."""
    B = out.shape[0]
    ntasks = (B + rows_per_task - 1) // rows_per_task
    for task in numba.prange(ntasks):
        b_start = task * rows_per_task
        _scatter_block(out, inp, vals, offsets, bias, relu, b_start,
                       min(B, b_start + rows_per_task), marker)
