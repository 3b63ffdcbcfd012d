"""The fused backward: ``dx = dy @ W``, the value grad, and optionally the bias grad
(``dy`` summed over its rows), from the same tiles of rows.

Part of `diagnet.diag.cpu` (its docstring gives the plan), built from the tile loops of
`.gather`, `.scatter` and `.value_grad`. A backward pass that wants the input grad and the
value grad (`diagnet.diag.cpu.input_and_value_grad`) loads each tile of rows once for both:
the value grad reads the short side of the weight and the extended long side, and ``dy`` is
one of the two (the long side of a tall or square weight, which the input grad gathers
from; the short side of a wide one, which it scatters from). The inner loops stay those of
the separate products: a loop that also shared the shifted ``ext`` loads between gather and
value grad was slower at the ViT's sizes (likely no longer vectorised: it writes two arrays,
``acc`` and ``g``, in one loop). The value-grad pass is `.value_grad`'s `_vgrad_tile`.
"""

from __future__ import annotations

import numba
import numpy as np

from .gather import _gather_row, _gather_tile
from .scatter import _scatter_1row_1diag, _scatter_4rows
from .tiles import (_TILE_ROWS, _jit, _load_tile, _pjit, _store_tile, _store_tile_folded,
                    _stride, _u, _zero_tile)
from .value_grad import _vgrad_row, _vgrad_tile


@_jit
def _add_rows(acc, tile, nrows, width, marker):
    """``acc[j] += tile[r*S + j]`` for rows ``r < nrows`` in order, ``j < width``: the rows of
    ``dy`` in a tile added into a bias gradient."""
    S = _stride(marker)
    for r in range(_u(nrows)):
        base = r * S
        for j in range(_u(width)):
            acc[j] += tile[base + j]


@_jit
def _both_grads_block(dx, g, gbias, dy, x, vals, offsets, b_start, b_stop, marker):
    """Rows ``b_start .. b_stop-1``: their input grad into ``dx``, their value grad added into
    ``g``, each tile of rows loaded once for both; with ``gbias`` (``(m,)``, not None) their
    rows of ``dy`` added into it too (the bias gradient, from the same tile).

    The value grad reads the short side ``a`` and the extended long side ``ext`` of the
    weight. For a tall or square weight ``ext`` holds ``dy``, from which the input grad
    gathers; for a wide one ``a`` holds ``dy``, from which it scatters (see the module
    docstring). Either way ``dy`` is copied into a tile once instead of once per product.
    Numba compiles a None ``gbias`` apart, without the bias loop.
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
    no_bias = np.zeros(dx.shape[1], dtype=g.dtype)  # the stores add a bias: none here
    tiles_stop = b_start + (b_stop - b_start) // _TILE_ROWS * _TILE_ROWS
    for b in range(b_start, tiles_stop, _TILE_ROWS):
        _load_tile(a, short, b, _TILE_ROWS, L, marker)
        _load_tile(ext, long, b, _TILE_ROWS, width, marker)
        if tall:
            _gather_tile(acc, ext, vals, offsets, marker)
            _store_tile(dx, acc, no_bias, False, b, _TILE_ROWS, marker)
        else:
            _zero_tile(acc, _TILE_ROWS, width, marker)
            _scatter_4rows(acc, a, vals, offsets, marker)
            _store_tile_folded(dx, acc, no_bias, False, b, _TILE_ROWS, width, marker)
        _vgrad_tile(g, a, ext, 0, K, offsets, marker)
        if gbias is not None:
            _add_rows(gbias, ext if tall else a, _TILE_ROWS, m, marker)
    for b in range(tiles_stop, b_stop):
        _load_tile(a, short, b, 1, L, marker)
        _load_tile(ext, long, b, 1, width, marker)
        if tall:
            _zero_tile(acc, 1, L, marker)
            _gather_row(acc, ext, vals, offsets)
            _store_tile(dx, acc, no_bias, False, b, 1, marker)
        else:
            _zero_tile(acc, 1, width, marker)
            for k in range(K):
                _scatter_1row_1diag(acc, a, vals, k, offsets[k])
            _store_tile_folded(dx, acc, no_bias, False, b, 1, width, marker)
        _vgrad_row(g, a, ext, 0, K, offsets)
        if gbias is not None:
            _add_rows(gbias, ext if tall else a, 1, m, marker)


@_pjit
def _both_grads_parallel(dx, partial, partial_bias, dy, x, vals, offsets, marker):
    """`_both_grads_block` with the batch split into ``len(partial)`` chunks, one per task.

    Task ``c`` writes its own rows of ``dx`` and adds its value grad into ``partial[c]``
    and, unless ``partial_bias`` is None, its bias grad into ``partial_bias[c]`` (both
    zeroed by the caller, which sums them over their first axis).
    """
    n_chunks = partial.shape[0]
    B = dy.shape[0]
    tiles = (B + _TILE_ROWS - 1) // _TILE_ROWS
    for c in numba.prange(n_chunks):
        b_start = min(B, _TILE_ROWS * (tiles * c // n_chunks))
        b_stop = min(B, _TILE_ROWS * (tiles * (c + 1) // n_chunks))
        if partial_bias is None:
            _both_grads_block(dx, partial[c], None, dy, x, vals, offsets, b_start, b_stop,
                              marker)
        else:
            _both_grads_block(dx, partial[c], partial_bias[c], dy, x, vals, offsets, b_start,
                              b_stop, marker)
