"""Tiles: batch rows copied into scratch at a compile-time stride, and the compile options
that every kernel module of `diagnet.diag.cpu` shares.

Part of `diagnet.diag.cpu` (its docstring gives the plan): the gather (`.gather`), scatter
(`.scatter`), value grad (`.value_grad`) and fused backward (`.both_grads`) kernels all copy
their batch rows into tiles with the functions here and index them with `_stride`.

**Tiles** keep 4 batch rows in one scratch array at a fixed, compile-time stride (see the
comment above `_marker`), so a hot loop needs one pointer per diagonal instead of one per
(row, diagonal); with 2-D scratch arrays the loops ran out of registers. Batch rows left
over after the last full tile (``B % 4``) go through one-row versions of the loops, so a
batch of 1 does not pay for 4.
"""

from __future__ import annotations

import numpy as np

from ...jit import noalias_njit

# contract: use FMA; reassoc: let LLVM re-balance the fused sums. Deliberately not nnan/ninf
# (they would let LLVM drop NaN/inf handling), nor the full fastmath=True.
_FASTMATH = {"contract", "reassoc"}
# noalias and wide vectors: see diagnet.jit (every kernel here writes only the outputs and
# scratch it is given, and its vector lanes hold independent elements: no sum across them)
_jit = noalias_njit(wide_vectors=True, cache=True, fastmath=_FASTMATH, nogil=True)
_pjit = noalias_njit(wide_vectors=True, cache=True, fastmath=_FASTMATH, nogil=True,
                     parallel=True)

_u = np.uint64  # unsigned index (see "Indexing" in `diagnet.diag.cpu`)

# Kernels work on tiles of this many batch rows (their loops are written out for 4).
_TILE_ROWS = 4


# --------------------------------------------------------------------------------------
# Tiles: scratch rows at a compile-time stride
# --------------------------------------------------------------------------------------
# A tile holds 4 rows of scratch in one 1-D array, row r starting at r * S. Because S is a
# compile-time constant, LLVM addresses the same column of all four rows from one pointer
# plus constant displacements, instead of one pointer per (row, diagonal) stream; that keeps
# the hot loops free of register spills. Numba compiles one version of a function per *type*
# of its arguments, so the stride travels as the length of a tuple of zeros, ``marker``:
# ``S = 2**len(marker) + 80``. (The 80 keeps the rows of a tile, and the tiles, from
# colliding in the L1 cache, which a stride of 2**q + 16 did not.)

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
def _relu(h):
    """``h * (h > 0)``, the formula of `diagnet.ops.activation.relu` (NaN stays NaN, ``-inf``
    gives NaN, a negative gives ``-0.0``), so a fused ReLU gives its bits."""
    return h * (h > 0)


@_jit
def _store_tile(dst, tile, bias, relu, b_start, nrows, marker):
    """``dst[b_start + r, j] = tile[r*S + j] + bias[j]`` for ``r < nrows``, passed through
    `_relu` when ``relu``.

    ``bias`` ``(dst.shape[1],)``: a layer's bias added in the store pass (zeros where there
    is none: adding 0 changes no value). ``relu``: a following ReLU applied on the way.
    """
    S = _stride(marker)
    for r in range(_u(nrows)):
        b = _u(b_start) + r
        if relu:
            for j in range(_u(dst.shape[1])):
                dst[b, j] = _relu(tile[r * S + j] + bias[j])
        else:
            for j in range(_u(dst.shape[1])):
                dst[b, j] = tile[r * S + j] + bias[j]


@_jit
def _store_tile_folded(dst, tile, bias, relu, b_start, nrows, width, marker):
    """``dst[b_start + r, j] = (tile[r*S + j] + tile[r*S + j + P]) + bias[j]``, the second
    term where ``j + P < width``: tile rows of ``width = P + L - 1`` entries fold onto ``P``
    outputs. ``bias`` and ``relu`` as in `_store_tile`."""
    S = _stride(marker)
    P = _u(dst.shape[1])
    tail = _u(width) - P
    for r in range(_u(nrows)):
        b = _u(b_start) + r
        base = r * S
        if relu:
            for j in range(tail):
                dst[b, j] = _relu((tile[base + j] + tile[base + j + P]) + bias[j])
            for j in range(tail, P):
                dst[b, j] = _relu(tile[base + j] + bias[j])
        else:
            for j in range(tail):
                dst[b, j] = (tile[base + j] + tile[base + j + P]) + bias[j]
            for j in range(tail, P):
                dst[b, j] = tile[base + j] + bias[j]
