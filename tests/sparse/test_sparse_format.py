"""`DiagMatrix` against a dense reference built independently from the convention.

The reference (``tests/dense_reference.py``, shared with ``test_diag_linear.py``) never
goes through `diagnet.diag.layout`: the (row, col, value) triples are computed from the
definition (position ``t`` of diagonal ``p`` is ``((t + p) % m, t)`` when ``m >= n`` and
``(t, (t + p) % n)`` when ``m < n``) and turned into a dense matrix by
``scipy.sparse.coo_array(...).toarray()``.

Tolerances: conversions (to_dense, to_scipy, transpose, from_dense) are pure data movement
and must be exact. Products are compared in float64 against ``scale = |a| @ |b|`` (the
sum of magnitudes each output element is accumulated from): ``|got - want| <= rtol * scale``
with rtol 1e-10 for float64 and 1e-4 for float32 (``dense_reference.assert_close``).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import diagnet
from diagnet import DiagMatrix
from diagnet.diag import layout
from diagnet.diag.validate import resolve_num_diagonals
from dense_reference import (K_RULES, assert_close, batch_shapes, dense_reference, shapes,
                             triples)

# ----------------------------------------------------------------------------- strategies


@st.composite
def diag_matrices(draw, dtypes=(np.float32, np.float64)):
    """(offsets, values, shape, seed): K from 1 to P, random distinct offsets and values."""
    shape = draw(shapes())
    P, L = max(shape), min(shape)
    k_rule = draw(K_RULES)
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    K = {"one": 1, "all": P}.get(k_rule) or int(rng.integers(1, P + 1))
    offsets = np.sort(rng.choice(P, size=K, replace=False)).astype(np.int64)
    values = rng.standard_normal((K, L)).astype(dtype)
    return offsets, values, shape, seed


# ----------------------------------------------------------------------------- the format

@given(shapes())
def test_reference_diagonals_partition_the_matrix(shape):
    """Sanity of the reference itself: all P diagonals hit every entry exactly once."""
    P, L = max(shape), min(shape)
    r, c, _ = triples(shape, np.arange(P), np.ones((P, L)))
    counts = np.zeros(shape, dtype=np.int64)
    np.add.at(counts, (r, c), 1)
    assert np.all(counts == 1)


@given(shapes())
def test_diagonal_of_inverts_the_convention(shape):
    """`layout.diagonal_of` maps every entry (i, j) to the (p, t) that the formulas, and
    `layout.diagonal_coordinates`, send back to (i, j)."""
    m, n = shape
    P, L = max(shape), min(shape)
    i, j = np.meshgrid(np.arange(m), np.arange(n), indexing="ij")
    p, t = layout.diagonal_of(shape, i, j)
    assert p.shape == t.shape == shape
    assert np.all((0 <= p) & (p < P)) and np.all((0 <= t) & (t < L))
    # position t of diagonal p, from the formulas (dense_reference), then from the layout
    r, c, _ = triples(shape, np.arange(P), np.zeros((P, L)))
    np.testing.assert_array_equal(r.reshape(P, L)[p, t], i)
    np.testing.assert_array_equal(c.reshape(P, L)[p, t], j)
    rows, cols = layout.diagonal_coordinates(shape, np.arange(P))
    np.testing.assert_array_equal(rows[p, t], i)
    np.testing.assert_array_equal(cols[p, t], j)
    # and the other way round: the entries of every (p, t) give back (p, t)
    pp, tt = layout.diagonal_of(shape, rows, cols)
    np.testing.assert_array_equal(pp, np.broadcast_to(np.arange(P)[:, None], (P, L)))
    np.testing.assert_array_equal(tt, np.broadcast_to(np.arange(L), (P, L)))


@given(diag_matrices())
def test_to_dense_matches_reference(case):
    offsets, values, shape, _ = case
    W = DiagMatrix(offsets, values, shape)
    dense = W.to_dense()
    assert isinstance(dense, np.ndarray)
    assert dense.shape == shape and dense.dtype == values.dtype
    np.testing.assert_array_equal(dense, dense_reference(shape, offsets, values))


@given(diag_matrices(), st.sampled_from(["csr", "coo", "dia"]))
def test_to_scipy_matches_reference(case, fmt):
    offsets, values, shape, _ = case
    W = DiagMatrix(offsets, values, shape)
    S = W.to_scipy(fmt)
    assert S.format == fmt
    assert S.shape == shape and S.dtype == values.dtype
    np.testing.assert_array_equal(S.toarray(), dense_reference(shape, offsets, values))
    if fmt == "coo":
        assert S.nnz == W.nnz  # one stored entry per (diagonal, position)
    if fmt == "dia":
        d = np.asarray(S.offsets)
        assert len(np.unique(d)) == len(d)
        # every wrap-around diagonal becomes at most two SciPy diagonals
        assert len(offsets) <= len(d) <= 2 * len(offsets)
        # SciPy's layout: data[k, j] is the entry (j - d_k, j); check it explicitly
        ref = dense_reference(shape, offsets, values)
        m, n = shape
        for k, dk in enumerate(d.tolist()):
            j = np.arange(n)
            i = j - dk
            inside = (i >= 0) & (i < m)
            np.testing.assert_array_equal(S.data[k, j[inside]], ref[i[inside], j[inside]])


@given(diag_matrices())
def test_transpose_matches_dense_transpose(case):
    offsets, values, shape, _ = case
    W = DiagMatrix(offsets, values, shape)
    WT = W.T
    assert isinstance(WT, DiagMatrix)
    assert WT.shape == shape[::-1] and WT.K == W.K and WT.dtype == W.dtype
    # the transposed storage is itself valid (sorted unique offsets, (K, L) values)
    DiagMatrix(WT.offsets, WT.values, WT.shape)
    np.testing.assert_array_equal(WT.to_dense(), dense_reference(shape, offsets, values).T)
    back = WT.T
    np.testing.assert_array_equal(back.offsets, offsets)
    np.testing.assert_array_equal(back.values, values)


def test_transpose_worked_examples():
    # square: diagonal p -> (n - p) % n, values rotated by p
    W = DiagMatrix([1], np.array([[1.0, 2.0, 3.0, 4.0]]), (4, 4))
    # diagonal 1 of a 4x4: entries (1,0)=1, (2,1)=2, (3,2)=3, (0,3)=4
    assert W.to_dense()[1, 0] == 1 and W.to_dense()[0, 3] == 4
    WT = W.T
    assert WT.offsets.tolist() == [3]
    # transposed entries: (0,1)=1, (1,2)=2, (2,3)=3, (3,0)=4; diagonal 3 starts at (3, 0)
    assert WT.values.tolist() == [[4.0, 1.0, 2.0, 3.0]]
    # non-square: same storage, shared
    V = DiagMatrix([0, 2], np.ones((2, 3)), (5, 3))
    assert V.T.offsets is V.offsets and V.T.values is V.values and V.T.shape == (3, 5)


# ----------------------------------------------------------------------------- products

@given(diag_matrices(), batch_shapes, st.integers(0, 2**32 - 1))
def test_x_at_WT_is_the_forward_product(kernel_impl, use_kernels, case, batch, seed):
    offsets, values, shape, _ = case
    m, n = shape
    W = DiagMatrix(offsets, values, shape)
    x = np.random.default_rng(seed).standard_normal(batch + (n,)).astype(values.dtype)
    ref = dense_reference(shape, offsets, values)
    with use_kernels(kernel_impl):
        y = x @ W.T
    assert isinstance(y, np.ndarray) and y.dtype == values.dtype and y.shape == batch + (m,)
    x64 = x.astype(np.float64)
    assert_close(y, x64 @ ref.T, np.abs(x64) @ np.abs(ref).T, values.dtype)


@given(diag_matrices(), batch_shapes, st.integers(0, 2**32 - 1))
def test_dy_at_W_is_the_input_gradient_product(kernel_impl, use_kernels, case, batch, seed):
    offsets, values, shape, _ = case
    m, n = shape
    W = DiagMatrix(offsets, values, shape)
    dy = np.random.default_rng(seed).standard_normal(batch + (m,)).astype(values.dtype)
    ref = dense_reference(shape, offsets, values)
    with use_kernels(kernel_impl):
        dx = dy @ W
    assert dx.dtype == values.dtype and dx.shape == batch + (n,)
    d64 = dy.astype(np.float64)
    assert_close(dx, d64 @ ref, np.abs(d64) @ np.abs(ref), values.dtype)


@given(diag_matrices(), st.sampled_from([None, (), (3,), (2,)]), st.integers(0, 2**32 - 1))
def test_W_at_x_left_product(kernel_impl, use_kernels, case, lead, seed):
    """``W @ v`` for a vector and ``W @ X`` for (n, j) and batched (..., n, j) operands."""
    offsets, values, shape, _ = case
    m, n = shape
    W = DiagMatrix(offsets, values, shape)
    xshape = (n,) if lead is None else lead + (n, 4)
    x = np.random.default_rng(seed).standard_normal(xshape).astype(values.dtype)
    ref = dense_reference(shape, offsets, values)
    with use_kernels(kernel_impl):
        y = W @ x
    x64 = x.astype(np.float64)
    assert y.shape == (ref @ x64).shape
    assert_close(y, ref @ x64, np.abs(ref) @ np.abs(x64), values.dtype)


def test_products_reject_bad_operands():
    W = DiagMatrix.random((6, 4), k=2, rng=0, dtype=np.float64)
    with pytest.raises(TypeError, match=r"dtype float32 but the DiagMatrix has dtype float64"):
        np.ones((3, 4), dtype=np.float32) @ W.T
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 4\).*got \(3, 6\)"):
        np.ones((3, 6)) @ W.T
    with pytest.raises(ValueError, match=r"x must have shape \(4,\) or \(\.\.\., 4, j\)"):
        W @ np.ones(6)
    with pytest.raises(TypeError, match="diag_linear"):
        W.rmatmul(diagnet.tensor(np.ones((2, 6))))
    with pytest.raises(TypeError, match="NumPy or CuPy array"):
        W.matmul([1.0, 2.0, 3.0, 4.0])


# ----------------------------------------------------------------------------- from_dense

@given(shapes(), st.integers(0, 2**32 - 1), st.data())
def test_from_dense_keeps_the_largest_norm_diagonals(shape, seed, data):
    m, n = shape
    P, L = max(shape), min(shape)
    k = data.draw(st.integers(1, P))
    rng = np.random.default_rng(seed)
    W = rng.standard_normal(shape)
    # norms of all P diagonals from the formulas
    norms = np.array([np.sqrt(np.sum(W[triples(shape, [p], np.zeros((1, L)))[:2]] ** 2))
                      for p in range(P)])
    D = DiagMatrix.from_dense(W, k=k)
    assert D.K == k and D.shape == shape and D.dtype == W.dtype
    assert np.all(np.diff(D.offsets) > 0)
    kept = set(D.offsets.tolist())
    dropped = [p for p in range(P) if p not in kept]
    if dropped:
        assert norms[sorted(kept)].min() >= norms[dropped].max()
    # the kept values are exactly W's entries on those diagonals
    np.testing.assert_array_equal(D.to_dense(), np.where(
        dense_reference(shape, D.offsets, np.ones((k, L))) == 1, W, 0.0))


@given(diag_matrices())
def test_from_dense_round_trips_all_diagonals(case):
    offsets, values, shape, _ = case
    dense = dense_reference(shape, offsets, values).astype(values.dtype)
    full = DiagMatrix.from_dense(dense)
    assert full.K == max(shape)
    np.testing.assert_array_equal(full.to_dense(), dense)
    kept = DiagMatrix.from_dense(dense, k=len(offsets))
    # generic random values: the stored diagonals are the nonzero ones
    if np.all(values != 0):
        np.testing.assert_array_equal(kept.offsets, offsets)
        np.testing.assert_array_equal(kept.values, values)


def test_from_dense_breaks_ties_towards_lowest_offset():
    W = np.ones((6, 4))                       # every diagonal has the same norm
    assert DiagMatrix.from_dense(W, k=3).offsets.tolist() == [0, 1, 2]
    W[5, 0] = 2.0                             # (5, 0) is on diagonal 5
    assert DiagMatrix.from_dense(W, k=3).offsets.tolist() == [0, 1, 5]
    W2 = np.zeros((3, 7))                     # wide; all-zero ties too
    assert DiagMatrix.from_dense(W2, k=2).offsets.tolist() == [0, 1]
    W2[0, 6] = -1.0                           # (0, 6) is on diagonal (6 - 0) % 7 = 6
    assert DiagMatrix.from_dense(W2, k=2).offsets.tolist() == [0, 6]


def test_from_dense_sparsity_and_errors():
    W = np.arange(40, dtype=np.float32).reshape(10, 4)
    D = DiagMatrix.from_dense(W, sparsity=0.75)
    assert D.K == 3 and D.dtype == np.float32          # ceil(0.25 * 10) = 3
    with pytest.raises(ValueError, match="either sparsity or k, not both"):
        DiagMatrix.from_dense(W, sparsity=0.5, k=2)
    with pytest.raises(ValueError, match=r"k must be in \[1, P\] = \[1, 10\].*got 11"):
        DiagMatrix.from_dense(W, k=11)
    with pytest.raises(TypeError, match="W must be float32 or float64; got dtype int64"):
        DiagMatrix.from_dense(np.ones((3, 3), dtype=np.int64))
    with pytest.raises(ValueError, match=r"W must be 2-D \(m, n\); got shape \(3,\)"):
        DiagMatrix.from_dense(np.ones(3))


# ----------------------------------------------------------------------------- reporting

@pytest.mark.parametrize("shape, sparsity, K", [
    ((10, 4), 0.9, 1), ((10, 4), 0.0, 10), ((10, 4), 1.0, 1), ((4, 10), 0.5, 5),
    ((7, 7), 0.5, 4), ((1, 1), 0.99, 1), ((200, 13), 0.95, 10), ((64, 128), 0.875, 16),
])
def test_sparsity_density_nnz(shape, sparsity, K):
    W = DiagMatrix.random(shape, sparsity=sparsity, rng=0)
    P, L = max(shape), min(shape)
    assert (W.K, W.P, W.L) == (K, P, L)
    assert W.nnz == K * L
    assert W.density == pytest.approx(K / P)
    assert W.sparsity == pytest.approx(1 - K / P)
    # the realised sparsity matches the fraction of zeros in the dense matrix
    zeros = np.count_nonzero(W.to_dense() == 0) / (shape[0] * shape[1])
    assert zeros == pytest.approx(W.sparsity)
    assert resolve_num_diagonals(shape, sparsity=sparsity) == K
    assert f"K={K}" in repr(W) and f"shape={shape}" in repr(W)


def test_resolve_num_diagonals_errors():
    assert resolve_num_diagonals((5, 3)) == 5
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\]"):
        resolve_num_diagonals((5, 3), sparsity=1.5)
    with pytest.raises(TypeError, match="k must be an int"):
        resolve_num_diagonals((5, 3), k=2.0)
    with pytest.raises(ValueError, match=r"k must be in \[1, P\]"):
        resolve_num_diagonals((5, 3), k=0)


# ----------------------------------------------------------------------------- random

def test_random_is_reproducible_with_a_seed():
    a = DiagMatrix.random((37, 11), sparsity=0.7, rng=123)
    b = DiagMatrix.random((37, 11), sparsity=0.7, rng=123)
    c = DiagMatrix.random((37, 11), sparsity=0.7, rng=124)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.values, b.values)
    assert not (np.array_equal(a.offsets, c.offsets) and np.array_equal(a.values, c.values))
    g1 = DiagMatrix.random((8, 8), k=3, rng=np.random.default_rng(5))
    g2 = DiagMatrix.random((8, 8), k=3, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(g1.values, g2.values)
    # the same seed gives the same matrix in both dtypes, up to rounding
    d = DiagMatrix.random((37, 11), sparsity=0.7, rng=123, dtype=np.float64)
    np.testing.assert_array_equal(a.offsets, d.offsets)
    np.testing.assert_array_equal(a.values, d.values.astype(np.float32))


@given(shapes(), st.integers(0, 2**32 - 1), st.data())
def test_random_offsets_and_value_bound(shape, seed, data):
    m, n = shape
    P, L = max(shape), min(shape)
    k = data.draw(st.integers(1, P))
    W = DiagMatrix.random(shape, k=k, rng=seed, dtype=np.float64)
    assert W.offsets.dtype == np.int64 and W.values.shape == (k, L)
    assert np.all(np.diff(W.offsets) > 0) and 0 <= W.offsets[0] and W.offsets[-1] < P
    bound = 1 / math.sqrt(max(1.0, k * L / m))
    assert np.all(np.abs(W.values) <= bound)


def test_random_errors():
    with pytest.raises(TypeError, match="dtype must be float32 or float64; got int32"):
        DiagMatrix.random((3, 3), dtype=np.int32)
    with pytest.raises(TypeError, match="rng must be None, a non-negative int seed"):
        DiagMatrix.random((3, 3), rng="seed")
    with pytest.raises(ValueError, match=r"rng must be None, a non-negative int seed or a "
                                         r"numpy Generator; got -1"):
        DiagMatrix.random((3, 3), rng=-1)
    with pytest.raises(ValueError, match="device must be one of"):
        DiagMatrix.random((3, 3), device="tpu")


# ----------------------------------------------------------------------------- validation

GOOD_VALUES = np.zeros((2, 4))


@pytest.mark.parametrize("offsets, exc, message", [
    ([3, 1], ValueError, r"offsets must be sorted in increasing order; got offsets\[0\] = 3 "
                         r"before offsets\[1\] = 1"),
    ([2, 2], ValueError, r"offsets must be unique; got the value 2 twice \(at indices 0 and 1\)"),
    ([1, 6], ValueError, r"offsets must lie in \[0, P\) = \[0, 6\) for shape \(6, 4\) "
                         r"\(P = max\(m, n\)\); got offsets\[1\] = 6"),
    ([-1, 2], ValueError, r"offsets must lie in \[0, P\).*got offsets\[0\] = -1"),
    (np.array([0.0, 1.0]), TypeError, r"offsets must have an integer dtype.*got dtype float64"),
    (np.array([True, False]), TypeError, r"offsets must have an integer dtype.*got dtype bool"),
    (np.array([[0, 1]]), ValueError, r"offsets must be 1-D with shape \(K,\); got shape \(1, 2\)"),
    ([[0], [1, 2]], TypeError, r"offsets must be an array"),
    ([0, True], TypeError, r"offsets must hold ints, not bools; got offsets\[1\] = True"),
    ((np.False_, 1), TypeError, r"offsets must hold ints, not bools; got offsets\[0\] = "
                                + re.escape(repr(np.False_))),
    (True, TypeError, r"offsets must be a 1-D array or sequence of ints \(K,\); got bool True"),
    (3, TypeError, r"offsets must be a 1-D array or sequence of ints \(K,\); got int 3"),
])
def test_bad_offsets_are_rejected_with_a_clear_message(offsets, exc, message):
    with pytest.raises(exc, match=message):
        DiagMatrix(offsets, GOOD_VALUES, (6, 4))


@pytest.mark.parametrize("values, shape, exc, message", [
    (np.zeros((2, 5)), (6, 4), ValueError,
     r"values must have shape \(K, L\) = \(2, 4\) \(K = number of offsets, L = min\(m, n\) "
     r"for shape \(6, 4\)\); got shape \(2, 5\)"),
    (np.zeros((3, 4)), (6, 4), ValueError, r"values must have shape \(K, L\) = \(2, 4\)"),
    (np.zeros(8), (6, 4), ValueError, r"got shape \(8,\)"),
    (np.zeros((2, 4), dtype=np.float16), (6, 4), TypeError,
     "values must be float32 or float64; got dtype float16"),
    (np.zeros((2, 4), dtype=np.int64), (6, 4), TypeError,
     "values must be float32 or float64; got dtype int64"),
    (GOOD_VALUES, (6, 0), ValueError, r"shape must be two positive ints; got \(6, 0\)"),
    (GOOD_VALUES, (6, 4, 1), ValueError, "shape must be a tuple \\(m, n\\).*got 3 entries"),
    (GOOD_VALUES, (6.0, 4), TypeError, r"shape\[0\] must be an int; got float 6.0"),
    (GOOD_VALUES, (True, 4), TypeError, r"shape\[0\] must be an int; got bool"),
    (GOOD_VALUES, 6, TypeError, "shape must be a tuple"),
])
def test_bad_values_and_shape_are_rejected(values, shape, exc, message):
    with pytest.raises(exc, match=message):
        DiagMatrix([0, 1], values, shape)


def test_check_finite_is_opt_in():
    vals = np.array([[1.0, np.nan, 2.0], [np.inf, 0.0, 1.0]])
    W = DiagMatrix([0, 1], vals, (3, 3))           # allowed by default
    assert np.isnan(W.to_dense()).sum() == 1
    with pytest.raises(ValueError, match=r"values must be finite \(check_finite=True\); "
                                         r"got 2 NaN or infinite entries"):
        DiagMatrix([0, 1], vals, (3, 3), check_finite=True)
    DiagMatrix([0, 1], np.ones((2, 3)), (3, 3), check_finite=True)


# ----------------------------------------------------------------------------- utilities

def test_accepted_inputs_and_storage():
    vals = np.ones((2, 3), dtype=np.float32)
    W = DiagMatrix(np.array([0, 2], dtype=np.int32), vals, (3, 5))
    assert W.offsets.dtype == np.int64 and W.offsets.flags.c_contiguous
    assert W.values is vals                         # referenced, not copied
    assert DiagMatrix([0, 2], vals, (3, 5), copy=True).values is not vals
    assert DiagMatrix(np.array([0, 2], dtype=np.uint8), vals, (3, 5)).offsets.tolist() == [0, 2]
    t = diagnet.tensor(vals)
    assert DiagMatrix([0, 2], t, (3, 5)).values is t.data   # Tensors are unwrapped
    fortran = np.asfortranarray(np.arange(6.0).reshape(2, 3))
    assert DiagMatrix([0, 2], fortran, (3, 5)).values.flags.c_contiguous
    assert W.device == "cpu" and W.ndim == 2 and W.shape == (3, 5)


def test_astype_copy_to_and_repr():
    W = DiagMatrix.random((9, 4), k=3, rng=1)
    W64 = W.astype(np.float64)
    assert W64.dtype == np.float64 and W64.offsets is W.offsets
    np.testing.assert_array_equal(W64.values, W.values.astype(np.float64))
    assert W.astype(np.float32, copy=False) is W
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        W.astype(np.int64)
    C = W.copy()
    C.values[0, 0] = 99.0
    assert W.values[0, 0] != 99.0 and C.offsets is not W.offsets
    assert W.to("cpu") is W
    assert repr(W) == ("DiagMatrix(shape=(9, 4), K=3, P=9, L=4, density=0.3333, "
                       "dtype=float32, device='cpu')")
    assert diagnet.sparse.DiagMatrix is DiagMatrix


def test_empty_matrix_k_zero():
    W = DiagMatrix(np.zeros(0, dtype=np.int64), np.zeros((0, 3)), (5, 3))
    assert W.nnz == 0 and W.density == 0.0 and W.sparsity == 1.0
    np.testing.assert_array_equal(W.to_dense(), np.zeros((5, 3)))
    np.testing.assert_array_equal((np.ones((2, 3)) @ W.T), np.zeros((2, 5)))
    np.testing.assert_array_equal((np.ones((2, 5)) @ W), np.zeros((2, 3)))
    assert W.to_scipy("dia").toarray().shape == (5, 3)
    assert W.to_scipy("csr").nnz == 0
    with pytest.raises(ValueError, match="format must be one of"):
        W.to_scipy("bsr")


@pytest.mark.parametrize("empty", [[], (), np.zeros(0, dtype=np.int32)])
def test_an_empty_offsets_sequence_is_the_all_zero_matrix(empty):
    # the format allows K = 0; an empty list holds no dtype, so it is read as int64
    W = DiagMatrix(empty, np.zeros((0, 3)), (5, 3))
    assert W.K == 0 and W.offsets.dtype == np.int64 and W.offsets.shape == (0,)
    np.testing.assert_array_equal(W.to_dense(), np.zeros((5, 3)))



# ----------------------------------------------------------------------------- from_scipy

SCIPY_FORMATS = ("csr", "csc", "coo", "dia", "lil", "dok", "bsr")


def _as_scipy(dense, fmt, kind):
    """``dense`` as a SciPy sparse array (``kind="array"``) or matrix of format ``fmt``."""
    import scipy.sparse as sp

    return getattr(sp, f"{fmt}_{kind}")(dense)


@pytest.mark.filterwarnings("ignore::scipy.sparse.SparseEfficiencyWarning")  # DIA, many diags
@given(diag_matrices(), st.sampled_from(SCIPY_FORMATS + ("numpy",)),
       st.sampled_from(["array", "matrix"]))
def test_from_scipy_round_trips_to_scipy_and_to_dense(case, fmt, kind):
    offsets, values, shape, _ = case
    values[values == 0] = 1.0            # every stored diagonal holds non-zeros
    W = DiagMatrix(offsets, values, shape)
    if fmt == "numpy":
        A = W.to_dense()
    else:
        A = _as_scipy(W.to_scipy("coo"), fmt, kind)
    R = DiagMatrix.from_scipy(A)
    assert R.shape == shape and R.dtype == values.dtype and R.device == "cpu"
    np.testing.assert_array_equal(R.offsets, offsets)
    np.testing.assert_array_equal(R.values, values)


@given(diag_matrices(), st.sampled_from(["csr", "coo", "dia"]))
def test_from_scipy_inverts_every_to_scipy_format(case, fmt):
    offsets, values, shape, _ = case
    values[values == 0] = 1.0
    R = DiagMatrix.from_scipy(DiagMatrix(offsets, values, shape).to_scipy(fmt))
    np.testing.assert_array_equal(R.offsets, offsets)
    np.testing.assert_array_equal(R.values, values)


@given(diag_matrices(dtypes=(np.float64,)), st.data())
def test_from_scipy_keeps_the_diagonals_that_hold_a_non_zero(case, data):
    """Zeros inside a kept diagonal stay; a diagonal of zeros only (stored explicitly or
    not) is left out; the dense matrix is the same either way."""
    offsets, values, shape, seed = case
    rng = np.random.default_rng(seed)
    values[rng.random(values.shape) < data.draw(st.sampled_from([0.0, 0.5, 1.0]))] = 0.0
    W = DiagMatrix(offsets, values, shape)
    R = DiagMatrix.from_scipy(W.to_scipy("coo"))    # explicit zeros included
    np.testing.assert_array_equal(R.offsets, offsets[np.any(values != 0, axis=1)])
    np.testing.assert_array_equal(R.to_dense(), W.to_dense())


def test_from_scipy_worked_example_tall():
    # tall 4 x 3: entry (i, j) is on diagonal (i - j) % 4 at position j
    A = np.zeros((4, 3))
    A[3, 0], A[0, 1], A[1, 2] = 1.0, 2.0, 3.0       # diagonal 3
    A[1, 0] = 4.0                                   # diagonal 1, positions 1 and 2 zero
    R = DiagMatrix.from_scipy(A)
    assert R.offsets.tolist() == [1, 3]
    np.testing.assert_array_equal(R.values, [[4.0, 0.0, 0.0], [1.0, 2.0, 3.0]])


def test_from_scipy_sums_duplicate_coo_entries_and_ignores_explicit_zeros():
    import scipy.sparse as sp

    # wide 2 x 3: entry (i, j) is on diagonal (j - i) % 3 at position i
    A = sp.coo_array(([1.0, 2.0, 0.0, 5.0, -5.0], ([0, 0, 1, 1, 1], [0, 0, 0, 2, 2])),
                     shape=(2, 3))
    R = DiagMatrix.from_scipy(A)
    assert R.offsets.tolist() == [0]                # (1, 0) is stored zero, (1, 2) sums to 0
    np.testing.assert_array_equal(R.values, [[3.0, 0.0]])
    assert A.nnz == 5                               # the argument is left as it was


def test_from_scipy_with_offsets_refuses_a_non_zero_off_them():
    A = np.zeros((4, 3))
    A[0, 0], A[2, 1] = 1.0, 2.0                     # diagonals 0 and 1
    R = DiagMatrix.from_scipy(A, offsets=[0, 1, 2])
    assert R.offsets.tolist() == [0, 1, 2]
    np.testing.assert_array_equal(R.values[2], np.zeros(3))
    with pytest.raises(ValueError, match=r"A has a non-zero off the given offsets: A\[2, 1\] = "
                                         r"2.0 lies on diagonal 1 \(shape \(4, 3\)"):
        DiagMatrix.from_scipy(A, offsets=[0, 2])
    with pytest.raises(ValueError, match=r"offsets must lie in \[0, P\) = \[0, 4\)"):
        DiagMatrix.from_scipy(A, offsets=[0, 4])


def test_from_scipy_dtypes():
    import scipy.sparse as sp

    ints = sp.csr_array(np.eye(3, dtype=np.int32))
    assert DiagMatrix.from_scipy(ints).dtype == np.float64        # exact for |v| < 2**53
    assert DiagMatrix.from_scipy(ints, dtype=np.float32).dtype == np.float32
    assert DiagMatrix.from_scipy(np.eye(3, dtype=np.float32)).dtype == np.float32
    assert DiagMatrix.from_scipy(np.eye(3, dtype=bool)).values.tolist() == [[1.0, 1.0, 1.0]]
    nan = DiagMatrix.from_scipy(np.array([[np.nan, 0.0], [0.0, 0.0]]))
    assert nan.offsets.tolist() == [0]                            # NaN is not a zero


def test_from_scipy_never_densifies_a_large_sparse_matrix():
    import scipy.sparse as sp

    m, n = 200_000, 100_000                         # dense float64: 160 GB
    t = np.arange(n)
    rows = np.concatenate([t, (t + 7) % m])
    cols = np.concatenate([t, t])
    A = sp.csr_array((np.ones(2 * n), (rows, cols)), shape=(m, n))
    R = DiagMatrix.from_scipy(A)
    assert R.offsets.tolist() == [0, 7] and R.values.shape == (2, n)


@pytest.mark.parametrize("A, exc, message", [
    ([[1.0, 0.0]], TypeError, r"A must be a SciPy sparse matrix or array, or a 2-D NumPy "
                              r"array; got list"),
    (np.ones(3), ValueError, r"A must be 2-D \(m, n\); got shape \(3,\)"),
    (np.ones((0, 3)), ValueError, r"A.shape must be two positive ints; got \(0, 3\)"),
    (np.ones((2, 2), dtype=np.complex128), TypeError,
     r"A must hold real numbers \(float, int or bool\); got dtype complex128"),
    (np.ones((2, 2), dtype=object), TypeError, r"got dtype object"),
])
def test_from_scipy_rejects_bad_input(A, exc, message):
    with pytest.raises(exc, match=message):
        DiagMatrix.from_scipy(A)


def test_from_scipy_rejects_bad_dtype_argument():
    with pytest.raises(TypeError, match="dtype must be float32 or float64; got int64"):
        DiagMatrix.from_scipy(np.eye(2), dtype=np.int64)

@pytest.mark.gpu
def test_cuda_round_trip_and_products():
    # on the CPU explicitly: in a gpu test the default device is cuda, where W.to("cuda")
    # would return W itself
    W = DiagMatrix.random((33, 20), k=7, rng=3, dtype=np.float64, device="cpu")
    G = W.to("cuda")
    assert G.device == "cuda" and G.offsets is not W.offsets
    np.testing.assert_array_equal(diagnet.backend.to_numpy(G.to_dense()), W.to_dense())
    np.testing.assert_array_equal(G.to_scipy("csr").toarray(), W.to_dense())
    np.testing.assert_array_equal(diagnet.backend.to_numpy(G.T.to_dense()), W.to_dense().T)
    x = np.random.default_rng(0).standard_normal((4, 20))
    xg = diagnet.backend.to_device(x, "cuda")
    np.testing.assert_allclose(diagnet.backend.to_numpy(xg @ G.T), x @ W.to_dense().T,
                               rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="same device"):
        DiagMatrix(G.offsets, W.values, W.shape)
    np.testing.assert_array_equal(G.to("cpu").values, W.values)
