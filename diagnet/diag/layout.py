"""The fixed diagonal convention: which matrix entry each stored value is.

A weight ``W`` of shape ``(m, n) = (out_features, in_features)`` acts as ``y = x @ W.T``.
It has ``P = max(m, n)`` wrap-around diagonals, each of length ``L = min(m, n)``.
Position ``t`` of diagonal ``p`` is the entry

* ``(row, col) = ((t + p) % m, t)``   when ``m >= n`` (tall or square),
* ``(row, col) = (t, (t + p) % n)``   when ``m < n``  (wide).

The ``P`` diagonals partition the matrix: entry ``(i, j)`` lies on diagonal
``(i - j) % m`` at position ``j`` when ``m >= n``, and on diagonal ``(j - i) % n`` at
position ``i`` when ``m < n``. A sparse weight keeps ``K`` of them: ``offsets`` (``K``
sorted unique ints in ``[0, P)``) and ``values`` (``(K, L)``), so its density is ``K / P``.
"""

from __future__ import annotations

import math

import numpy as np


def num_diagonals(shape) -> int:
    """``P = max(m, n)``: how many wrap-around diagonals an ``(m, n)`` matrix has."""
    m, n = shape
    return max(m, n)


def diagonal_length(shape) -> int:
    """``L = min(m, n)``: the length of every diagonal of an ``(m, n)`` matrix."""
    m, n = shape
    return min(m, n)


def diagonals_for_sparsity(shape, sparsity: float) -> int:
    """``K = max(1, ceil((1 - sparsity) * P))``: the diagonals kept at a target sparsity.

    ``sparsity`` is a number in ``[0, 1]``; the public entry points check its type first
    with `diagnet.diag.validate.check_sparsity`, so that ``None`` or a bool is named there.
    """
    if not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1]; got {sparsity!r}")
    P = num_diagonals(shape)
    # round() first so that e.g. (1 - 0.9) * 10 = 1.0000000000000002 does not become 2
    return max(1, math.ceil(round((1.0 - float(sparsity)) * P, 9)))


def diagonal_coordinates(shape, offsets, xp=np):
    """Row and column index arrays, each ``(K, L)`` int64, of every stored position.

    ``rows[k, t], cols[k, t]`` is the matrix entry of position ``t`` on diagonal
    ``offsets[k]``.
    """
    m, n = shape
    offsets = xp.asarray(offsets, dtype=xp.int64).reshape(-1, 1)
    t = xp.arange(min(m, n), dtype=xp.int64).reshape(1, -1)
    if m >= n:
        rows = (t + offsets) % m
        cols = xp.broadcast_to(t, rows.shape)
    else:
        cols = (t + offsets) % n
        rows = xp.broadcast_to(t, cols.shape)
    return xp.ascontiguousarray(rows), xp.ascontiguousarray(cols)


def diagonal_of(shape, rows, cols, xp=np):
    """The diagonal index ``p`` and position ``t`` of entries ``(rows, cols)``.

    The inverse of `diagonal_coordinates`: entry ``(i, j)`` is position ``t`` of diagonal
    ``p``, with ``0 <= p < P`` and ``0 <= t < L``. ``rows`` and ``cols`` are integer arrays
    (or ints) of the same shape; ``p`` and ``t`` have that shape.
    """
    m, n = shape
    rows = xp.asarray(rows)
    cols = xp.asarray(cols)
    if m >= n:
        return (rows - cols) % m, cols
    return (cols - rows) % n, rows
