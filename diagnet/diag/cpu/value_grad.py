"""Value-grad kernels: ``g[k, t] = sum_b short[b, t] * long[b, (t + offsets[k]) % P]``.

Part of `diagnet.diag.cpu` (its docstring gives the plan; `.tiles` the scratch rows). The
value grad is a reduction over the batch: ``dvalues[k, t] = sum_b a[b, t] * ext[b, t +
p_k]`` (``a`` is the short side of the weight, ``ext`` the extended long side). A pass
takes a tile of 4 rows and 4 diagonals: each ``a`` load serves 4 diagonals, each
``dvalues`` element is loaded and stored once per 4 rows. `diagnet.diag.cpu` decides how a
threaded call splits diagonals and batch rows (`_vgrad_split`); `.both_grads` reuses the
tile loops.

The arrays a pass writes (``dvalues``) and reads (``a``, ``ext`` at run-time shifts) are
distinct, and the kernels tell LLVM so (`diagnet.jit.noalias_njit`); without that promise it
tested about 170 pairs of address ranges before each 4-diagonal pass, which at the ViT's
64 columns cost as much as the multiply-adds (figures in docs/benchmarks.md).
"""

from __future__ import annotations

import numba
import numpy as np

from .tiles import _TILE_ROWS, _jit, _load_tile, _pjit, _stride, _u


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
