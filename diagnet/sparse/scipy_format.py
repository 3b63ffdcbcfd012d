"""The bridge between `DiagMatrix` and SciPy's sparse formats.

`matrix.py` validates the arguments of `DiagMatrix.to_scipy` / `DiagMatrix.from_scipy` and
builds the result; the functions here do the conversions on plain NumPy arrays. Every
entry ``(i, j)`` lies on one wrap-around diagonal, so any matrix converts one way and every
`DiagMatrix` the other. SciPy is imported inside the functions: only the conversions need it.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from ..diag import layout
from ..diag.validate import validate_shape

__all__ = ["to_scipy", "to_scipy_dia", "nonzero_triples", "check_on_offsets"]


def to_scipy(offsets, values, shape, fmt):
    """A SciPy ``csr_array``, ``coo_array`` or ``dia_array`` (``fmt``) of the matrix of
    ``shape`` that stores ``values`` (NumPy ``(K, L)``) on the diagonals ``offsets`` (NumPy
    int64); see `DiagMatrix.to_scipy`."""
    import scipy.sparse as sp

    if fmt == "dia":
        return to_scipy_dia(offsets, values, shape)
    rows, cols = layout.diagonal_coordinates(shape, offsets, np)
    coo = sp.coo_array((values.reshape(-1), (rows.reshape(-1), cols.reshape(-1))),
                       shape=shape)
    return coo if fmt == "coo" else coo.tocsr()


def to_scipy_dia(offsets, values, shape):
    """A ``scipy.sparse.dia_array`` holding the diagonals ``offsets`` (NumPy int64) with
    ``values`` (NumPy ``(K, L)``) of a matrix of ``shape``; see `DiagMatrix.to_scipy`."""
    import scipy.sparse as sp

    m, n = shape
    L = min(m, n)
    t = np.arange(L)
    dia_offsets, rows = [], []
    for k, p in enumerate(offsets.tolist()):
        if m >= n:
            # entry ((t + p) % m, t): column t; no wrap while t + p < m (d = -p), the
            # wrapped part t >= m - p has row t + p - m, so d = m - p.
            split = min(L, m - p)
            parts = [(-p, t[:split], t[:split]), (m - p, t[split:], t[split:])]
        else:
            # entry (t, (t + p) % n): column (t + p) % n; no wrap while t + p < n (d = p),
            # the wrapped part has column t + p - n, so d = p - n.
            split = min(L, n - p)
            parts = [(p, t[:split], t[:split] + p), (p - n, t[split:], t[split:] + p - n)]
        for d, pos, col in parts:
            if pos.size:
                row = np.zeros(n, dtype=values.dtype)
                row[col] = values[k, pos]
                dia_offsets.append(d)
                rows.append(row)
    order = np.argsort(np.asarray(dia_offsets, dtype=np.int64), kind="stable")
    data = (np.stack(rows)[order] if rows else np.zeros((0, n), dtype=values.dtype))
    return sp.dia_array((data, np.asarray(dia_offsets, dtype=np.int64)[order]),
                        shape=(m, n))


def nonzero_triples(A):
    """``(rows, cols, values, shape)`` of the non-zeros of a SciPy sparse or NumPy ``A``."""
    import scipy.sparse as sp

    sparse = sp.issparse(A)
    if not sparse:
        A = backend.unwrap(A)  # a diagnet Tensor -> its array
        if not isinstance(A, np.ndarray):
            raise TypeError(f"A must be a SciPy sparse matrix or array, or a 2-D NumPy array; "
                            f"got {type(A).__name__} (a GPU array: use DiagMatrix.from_dense)")
    if len(A.shape) != 2:
        raise ValueError(f"A must be 2-D (m, n); got shape {tuple(A.shape)}")
    shape = validate_shape(tuple(int(s) for s in A.shape), "A.shape")
    if np.dtype(A.dtype).kind not in "fiub":
        raise TypeError(f"A must hold real numbers (float, int or bool); got dtype {A.dtype}")
    if sparse:
        coo = sp.coo_array(A, copy=True)  # a copy: summing duplicates must not touch A
        coo.sum_duplicates()
        rows, cols, vals = coo.row, coo.col, coo.data
    else:
        A = np.asarray(A)  # an np.matrix would index to 2-D rows
        rows, cols = np.nonzero(A)
        vals = A[rows, cols]
    keep = vals != 0  # explicit zeros say nothing about which diagonals are used
    return rows[keep].astype(np.int64), cols[keep].astype(np.int64), vals[keep], shape


def check_on_offsets(p, rows, cols, vals, offsets, shape):
    """Raise `ValueError` naming the first non-zero (row-major) whose diagonal ``p`` is not
    in ``offsets``."""
    off = ~np.isin(p, offsets)
    if off.any():
        bad = np.flatnonzero(off)
        i = bad[np.argmin(rows[bad] * shape[1] + cols[bad])]
        raise ValueError(f"A has a non-zero off the given offsets: A[{rows[i]}, {cols[i]}] = "
                         f"{vals[i].item()!r} lies on diagonal {p[i]} (shape {shape}, P = "
                         f"{max(shape)}); offsets must include it")
