"""A dense reference for the diagonal format and the Hypothesis strategies that feed it.

Shared by ``test_sparse_format.py`` and ``test_diag_linear.py``. The reference is built from
the convention's formulas, never via `diagnet.diag.layout`: position ``t`` of diagonal ``p``
of an ``(m, n)`` matrix is ``((t + p) % m, t)`` when ``m >= n`` and ``(t, (t + p) % n)`` when
``m < n``, for ``t = 0..L-1`` with ``L = min(m, n)``. The resulting (row, col, value) triples
are turned into a dense float64 matrix by ``scipy.sparse.coo_array(...).toarray()``.

Tolerance rule (`assert_close`): a product is compared in float64 against ``scale``, the same
product taken on absolute values (the sum of magnitudes each output element is accumulated
from): ``|got - want| <= rtol * scale`` with rtol 1e-10 for float64 and 1e-4 for float32.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from hypothesis import strategies as st
from tolerances import DENSE_ORACLE_RTOL

RTOL = DENSE_ORACLE_RTOL

# ----------------------------------------------------------------------------- reference


def positions(shape, p):
    """(rows, cols) of diagonal ``p``, position t = 0..L-1, from the formulas."""
    m, n = shape
    t = np.arange(min(m, n))
    return ((t + p) % m, t) if m >= n else (t, (t + p) % n)


def triples(shape, offsets, values):
    """(rows, cols, vals) of every stored entry, straight from the convention's formulas."""
    rows, cols = [], []
    for p in np.asarray(offsets).tolist():
        r, c = positions(shape, p)
        rows.append(r)
        cols.append(c)
    if not rows:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0)
    return (np.concatenate(rows), np.concatenate(cols),
            np.asarray(values, dtype=np.float64).reshape(-1))


def dense_reference(shape, offsets, values):
    """The dense float64 matrix, assembled by SciPy from the triples (duplicates would add)."""
    r, c, v = triples(shape, offsets, values)
    return sp.coo_array((v, (r, c)), shape=shape).toarray()


def assert_close(got, want, scale, dtype):
    """``|got - want| <= RTOL[dtype] * scale`` elementwise, compared in float64."""
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    bound = RTOL[np.dtype(dtype)] * (scale + np.finfo(np.float64).tiny)
    err = np.abs(got - want)
    assert np.all(err <= bound), (
        f"max err {err.max():.3g}, worst ratio {(err / bound).max():.3g} "
        f"(rtol {RTOL[np.dtype(dtype)]:g}, dtype {np.dtype(dtype)})")


# ----------------------------------------------------------------------------- strategies

SPECIAL_DIMS = [1, 2, 3, 4, 5, 7, 8, 13, 16, 31, 32, 61, 64, 97, 127, 128, 131, 197, 199, 200]
dims = st.one_of(st.sampled_from(SPECIAL_DIMS), st.integers(13, 200), st.integers(1, 12))
# Leading (batch) shapes of x: none (a 1-D x), flat batches of 0 to MAX_ROWS rows, and 2-D
# and 3-D leading shapes of up to MAX_ROWS rows in all. The CPU kernels work in tiles of 4 rows
# (leftover rows one at a time) and give each thread a block of rows, so the flattened batch
# must reach several tiles with every remainder; TILE_EDGES are the counts around tile edges
# (several tiles first: Hypothesis favours the first entries, and the first branch).
MAX_ROWS = 40
TILE_EDGES = [13, 9, 8, 12, 17, 16, 33, 31, 32, 23, 39, 40, 7, 5, 4, 3, 1, 0]
batch_shapes = st.one_of(
    st.sampled_from(TILE_EDGES).map(lambda b: (b,)),
    st.integers(1, MAX_ROWS).map(lambda b: (b,)),
    st.tuples(st.integers(0, 5), st.integers(1, MAX_ROWS // 5)),
    st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4)),
    st.just(()),
)
# K: the extremes 1 and P, or uniform in [1, P] (Hypothesis' own integers favour the ends)
K_RULES = st.sampled_from(["uniform", "one", "uniform", "all", "uniform"])
# mostly free shapes (tall, wide and square), plus forced square and 1-wide ones
SHAPE_KINDS = ["free"] * 6 + ["square", "one-column", "one-row"]


@st.composite
def shapes(draw):
    """A matrix shape ``(m, n)``: a kind from `SHAPE_KINDS`, then the free dims from `dims`."""
    kind = draw(st.sampled_from(SHAPE_KINDS))
    m = draw(dims)
    if kind == "square":
        return m, m
    if kind == "one-column":
        return m, 1
    if kind == "one-row":
        return 1, m
    return m, draw(dims)
