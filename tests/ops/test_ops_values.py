"""Forward values against NumPy/SciPy and analytic gradients, as hypothesis properties.

Shapes are random (including 0-d and size-1 dims) and binary ops get random mutually
broadcastable shape pairs. Float64 results are compared with ``F64_TOL``; float32 results
with ``F32_TOL`` (values) and ``F32_GRAD_TOL`` (gradients), both against a float64
reference computed from the same float32 inputs. Gradients of broadcast operands must have
the operand's shape and equal the analytic gradient summed over the broadcast dimensions
(``helpers.reduce_to``). The dtype policy of the module docstring of `diagnet.autograd` is
checked at the end.
"""

from __future__ import annotations

import operator
import re

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import numpy as np
import pytest
import scipy.special as sp
from hypothesis import given, settings

import diagnet
from diagnet import functional as F
from helpers import reduce_to
from tolerances import (F32_GRAD_TOL, F32_TOL, F64_GRAD_TOL, F64_TOL, GRADCHECK_TOL,
                        LAYER_NORM_RTOL)

DTYPES = [np.float64, np.float32]


def tol(dtype, grad=False):
    if dtype == np.float64:
        return F64_GRAD_TOL if grad else F64_TOL
    return F32_GRAD_TOL if grad else F32_TOL


def floats(dtype, lo, hi):
    width = 32 if dtype == np.float32 else 64
    return st.floats(lo, hi, width=width, allow_nan=False, allow_infinity=False)


def nonzero_floats(dtype, lo=0.5, hi=10.0):
    return st.one_of(floats(dtype, lo, hi), floats(dtype, -hi, -lo))


def arrays(dtype, shape, elements):
    return hnp.arrays(dtype, shape, elements=elements)


def tensor(array, requires_grad=True):
    array = np.asarray(array)
    return diagnet.tensor(array, dtype=array.dtype, requires_grad=requires_grad)


def ref64(array):
    return np.asarray(array, dtype=np.float64)


shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=1, max_side=4)
pair_shapes = hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=4, max_side=4)


# ----------------------------------------------------------------------------- binary ops

def _binary(name):
    """(diagnet op, numpy op, gradient formula on broadcast float64 arrays, operand domains)."""
    real = (-10.0, 10.0)
    table = {
        "add": (operator.add, np.add, lambda a, b, g: (g, g), None),
        "sub": (operator.sub, np.subtract, lambda a, b, g: (g, -g), None),
        "mul": (operator.mul, np.multiply, lambda a, b, g: (g * b, g * a), None),
        "div": (operator.truediv, np.divide, lambda a, b, g: (g / b, -g * a / b ** 2), "b_nonzero"),
        "pow": (operator.pow, np.power,
                lambda a, b, g: (g * b * a ** (b - 1), g * a ** b * np.log(a)), "pow"),
        "maximum": (F.maximum, np.maximum, lambda a, b, g: (g * (a >= b), g * (a < b)), None),
        "minimum": (F.minimum, np.minimum, lambda a, b, g: (g * (a <= b), g * (a > b)), None),
    }
    return table[name] + (real,)


@settings(deadline=None)
@given(name=st.sampled_from(["add", "sub", "mul", "div", "pow", "maximum", "minimum"]),
       dtype=st.sampled_from(DTYPES), shapes=pair_shapes, data=st.data())
def test_binary_broadcast_values_and_grads(name, dtype, shapes, data):
    op, np_op, grad_fn, domain, real = _binary(name)
    sa, sb = shapes.input_shapes
    ea = eb = floats(dtype, *real)
    if domain == "b_nonzero":
        eb = nonzero_floats(dtype)
    elif domain == "pow":
        ea, eb = floats(dtype, 0.5, 3.0), floats(dtype, -2.0, 2.0)
    a = data.draw(arrays(dtype, sa, ea), label="a")
    b = data.draw(arrays(dtype, sb, eb), label="b")
    g = data.draw(arrays(dtype, shapes.result_shape, floats(dtype, -1.0, 1.0)), label="g")

    ta, tb = tensor(a), tensor(b)
    out = op(ta, tb)
    assert out.shape == shapes.result_shape and out.dtype == dtype
    np.testing.assert_allclose(out.numpy(), np_op(ref64(a), ref64(b)), **tol(dtype))

    out.backward(tensor(g, requires_grad=False))
    a64, b64 = np.broadcast_arrays(ref64(a), ref64(b))
    ga, gb = grad_fn(a64, b64, ref64(g))
    for t, expected in ((ta, ga), (tb, gb)):
        assert t.grad.shape == t.shape and t.grad.dtype == dtype
        np.testing.assert_allclose(t.grad.numpy(), reduce_to(expected, t.shape), **tol(dtype, True))


@settings(deadline=None)
@given(shapes=hnp.mutually_broadcastable_shapes(num_shapes=3, min_dims=0, max_dims=3, max_side=4),
       data=st.data())
def test_where_broadcast(shapes, data):
    sc, sa, sb = shapes.input_shapes
    cond = data.draw(hnp.arrays(bool, sc), label="cond")
    a = data.draw(arrays(np.float64, sa, floats(np.float64, -5, 5)), label="a")
    b = data.draw(arrays(np.float64, sb, floats(np.float64, -5, 5)), label="b")
    ta, tb = tensor(a), tensor(b)
    out = F.where(diagnet.tensor(cond), ta, tb)
    np.testing.assert_array_equal(out.numpy(), np.where(cond, a, b))
    g = np.random.default_rng(0).standard_normal(shapes.result_shape)
    out.backward(g)
    c = np.broadcast_to(cond, shapes.result_shape)
    np.testing.assert_allclose(ta.grad.numpy(), reduce_to(np.where(c, g, 0.0), sa), **F64_GRAD_TOL)
    np.testing.assert_allclose(tb.grad.numpy(), reduce_to(np.where(c, 0.0, g), sb), **F64_GRAD_TOL)


@settings(deadline=None)
@given(shapes=hnp.mutually_broadcastable_shapes(
    signature=np.matmul.signature, max_dims=3, max_side=3), data=st.data())
def test_matmul_values_and_gradcheck(shapes, data):
    sa, sb = shapes.input_shapes
    a = data.draw(arrays(np.float64, sa, floats(np.float64, -3, 3)), label="a")
    b = data.draw(arrays(np.float64, sb, floats(np.float64, -3, 3)), label="b")
    ta, tb = tensor(a), tensor(b)
    out = ta @ tb
    np.testing.assert_allclose(out.numpy(), np.matmul(a, b), rtol=1e-12, atol=1e-12)
    assert diagnet.gradcheck(F.matmul, ta, tb, **GRADCHECK_TOL)
    assert ta.grad.shape == sa and tb.grad.shape == sb


def test_matmul_float32_matches_float64():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 4, 5)).astype(np.float32)
    b = rng.standard_normal((5, 2)).astype(np.float32)
    out = tensor(a) @ tensor(b)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.numpy(), ref64(a) @ ref64(b), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- unary ops

def _gelu_erf(x):
    return x * 0.5 * (1 + sp.erf(x / np.sqrt(2)))


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _gelu_erf_grad(x):
    return 0.5 * (1 + sp.erf(x / np.sqrt(2))) + x * np.exp(-x * x / 2) / np.sqrt(2 * np.pi)


def _gelu_tanh_grad(x):
    u = np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)
    du = np.sqrt(2 / np.pi) * (1 + 3 * 0.044715 * x ** 2)
    return 0.5 * (1 + np.tanh(u)) + 0.5 * x * (1 - np.tanh(u) ** 2) * du


# name: (diagnet op, reference, reference derivative, domain)
UNARY = {
    "neg": (F.neg, np.negative, lambda x: -np.ones_like(x), (-10, 10)),
    "exp": (F.exp, np.exp, np.exp, (-10, 10)),
    "log": (F.log, np.log, lambda x: 1 / x, (0.0625, 100)),
    "sqrt": (F.sqrt, np.sqrt, lambda x: 0.5 / np.sqrt(x), (0.0625, 100)),
    "tanh": (F.tanh, np.tanh, lambda x: 1 - np.tanh(x) ** 2, (-10, 10)),
    "sigmoid": (F.sigmoid, sp.expit, lambda x: sp.expit(x) * (1 - sp.expit(x)), (-30, 30)),
    "log_sigmoid": (F.log_sigmoid, sp.log_expit, lambda x: sp.expit(-x), (-30, 30)),
    "relu": (F.relu, lambda x: np.maximum(x, 0), lambda x: (x > 0) * 1.0, (-10, 10)),
    "abs": (F.abs, np.abs, np.sign, (-10, 10)),
    "gelu": (F.gelu, _gelu_erf, _gelu_erf_grad, (-8, 8)),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), _gelu_tanh, _gelu_tanh_grad, (-8, 8)),
    "square": (lambda x: x ** 2, np.square, lambda x: 2 * x, (-10, 10)),
    "clip": (lambda x: F.clip(x, -1.0, 2.0), lambda x: np.clip(x, -1, 2),
             lambda x: ((x >= -1) & (x <= 2)) * 1.0, (-5, 5)),
}


@settings(deadline=None)
@given(name=st.sampled_from(sorted(UNARY)), dtype=st.sampled_from(DTYPES), shape=shapes,
       data=st.data())
def test_unary_values_and_grads(name, dtype, shape, data):
    op, ref, dref, (lo, hi) = UNARY[name]
    x = data.draw(arrays(dtype, shape, floats(dtype, lo, hi)), label="x")
    g = data.draw(arrays(dtype, shape, floats(dtype, -1, 1)), label="g")
    tx = tensor(x)
    out = op(tx)
    assert out.shape == shape and out.dtype == dtype
    np.testing.assert_allclose(out.numpy(), ref(ref64(x)), **tol(dtype))
    out.backward(g)
    assert tx.grad.dtype == dtype
    # float64 derivatives: the formulas differ from the implementation's (e.g. through the
    # input instead of the output), so allow a few ulps relative
    gtol = dict(rtol=1e-9, atol=1e-12) if dtype == np.float64 else F32_GRAD_TOL
    np.testing.assert_allclose(tx.grad.numpy(), ref64(g) * dref(ref64(x)), **gtol)


def test_sigmoid_is_accurate_in_both_tails():
    for dtype in DTYPES:
        x = np.array([-80.0, -50.0, -20.0, -5.0, 0.0, 5.0, 20.0, 50.0, 80.0], dtype=dtype)
        y = F.sigmoid(tensor(x, requires_grad=False)).numpy()
        assert np.all(np.isfinite(y))
        np.testing.assert_allclose(y, sp.expit(ref64(x)), rtol=1e-6 if dtype == np.float32 else 1e-14,
                                   atol=0)


# ----------------------------------------------------------------------------- softmax family

@settings(deadline=None)
@given(dtype=st.sampled_from(DTYPES), shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=5),
       data=st.data())
def test_softmax_log_softmax_match_scipy(dtype, shape, data):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1), label="axis")
    x = data.draw(arrays(dtype, shape, floats(dtype, -30, 30)), label="x")
    shift = data.draw(st.sampled_from([0.0, 1e3, -1e3]), label="shift")  # stability
    x = (x + dtype(shift)).astype(dtype)
    tx = tensor(x, requires_grad=False)
    sm = F.softmax(tx, axis=axis).numpy()
    lsm = F.log_softmax(tx, axis=axis).numpy()
    assert sm.dtype == lsm.dtype == dtype
    np.testing.assert_allclose(sm, sp.softmax(ref64(x), axis=axis), **tol(dtype))
    # log_softmax magnitudes reach ~60: float32 keeps ~1e-7 relative of the shifted logits
    ltol = F64_TOL if dtype == np.float64 else dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lsm, sp.log_softmax(ref64(x), axis=axis), **ltol)
    # x - log_softmax(x) is logsumexp(x), constant along the axis
    lse = sp.logsumexp(ref64(x), axis=axis, keepdims=True)
    np.testing.assert_allclose(ref64(x) - lsm, np.broadcast_to(lse, x.shape),
                               rtol=1e-12 if dtype == np.float64 else 1e-6, atol=ltol["atol"])


@settings(deadline=None)
@given(shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=4), data=st.data())
def test_softmax_grads_match_jacobian(shape, data):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1), label="axis")
    x = data.draw(arrays(np.float64, shape, floats(np.float64, -5, 5)), label="x")
    g = np.random.default_rng(1).standard_normal(shape)
    s = sp.softmax(x, axis=axis)
    for op, expected in ((F.softmax, s * (g - (g * s).sum(axis=axis, keepdims=True))),
                         (F.log_softmax, g - s * g.sum(axis=axis, keepdims=True))):
        tx = tensor(x)
        op(tx, axis=axis).backward(g)
        np.testing.assert_allclose(tx.grad.numpy(), expected, rtol=1e-10, atol=1e-12)


def _ce_reference(z, labels, smoothing):
    z = ref64(z)
    c = z.shape[-1]
    q = np.full(z.shape, smoothing / c)
    np.put_along_axis(q, labels[..., None], 1 - smoothing + smoothing / c, axis=-1)
    return -(q * sp.log_softmax(z, axis=-1)).sum(axis=-1), q


@settings(deadline=None)
@given(dtype=st.sampled_from(DTYPES), lead=hnp.array_shapes(min_dims=0, max_dims=2, max_side=4),
       classes=st.integers(1, 6), smoothing=st.sampled_from([0.0, 0.1, 0.5]),
       reduction=st.sampled_from(["mean", "sum", "none"]), data=st.data())
def test_cross_entropy_matches_reference(dtype, lead, classes, smoothing, reduction, data):
    z = data.draw(arrays(dtype, lead + (classes,), floats(dtype, -20, 20)), label="logits")
    labels = data.draw(hnp.arrays(np.int64, lead, elements=st.integers(0, classes - 1)),
                       label="labels")
    tz = tensor(z)
    loss = F.cross_entropy(tz, labels, label_smoothing=smoothing, reduction=reduction)
    per, q = _ce_reference(z, labels, smoothing)
    n = max(per.size, 1)
    expected = {"mean": per.mean(), "sum": per.sum(), "none": per}[reduction]
    assert loss.dtype == dtype and loss.shape == np.shape(expected)
    ctol = F64_TOL if dtype == np.float64 else dict(rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(loss.numpy(), expected, **ctol)
    if smoothing == 0.0:  # the textbook form: logsumexp(z) - z[label]
        z_label = np.take_along_axis(ref64(z), labels[..., None], axis=-1)[..., 0]
        np.testing.assert_allclose(per, sp.logsumexp(ref64(z), axis=-1) - z_label, rtol=1e-12, atol=1e-12)
    g = np.ones(loss.shape, dtype=dtype)
    loss.backward(g)
    scale = {"mean": 1.0 / n, "sum": 1.0, "none": 1.0}[reduction]
    expected_grad = (sp.softmax(ref64(z), axis=-1) - q) * scale
    np.testing.assert_allclose(tz.grad.numpy(), expected_grad, **tol(dtype, True))


def test_cross_entropy_huge_logits_are_finite():
    z = tensor(np.array([[1e4, 0.0, -1e4], [0.0, 1e4, 1e4]]))
    loss = F.cross_entropy(z, np.array([0, 2]), reduction="none")
    np.testing.assert_allclose(loss.numpy(), [0.0, np.log(2.0)], atol=1e-12)
    loss.sum().backward()
    assert np.all(np.isfinite(z.grad.numpy()))


# ----------------------------------------------------------------------------- reductions

@st.composite
def axis_choice(draw, ndim):
    kind = draw(st.sampled_from(["none", "int", "tuple"]))
    if kind == "none" or ndim == 0:
        return None
    if kind == "int":
        return draw(st.integers(-ndim, ndim - 1))
    axes = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True))
    return tuple(a - ndim if draw(st.booleans()) else a for a in axes)  # mix negative axes


@settings(deadline=None)
@given(name=st.sampled_from(["sum", "mean", "max", "min"]), dtype=st.sampled_from(DTYPES), shape=shapes,
       keepdims=st.booleans(), data=st.data())
def test_reductions_match_numpy(name, dtype, shape, keepdims, data):
    axis = data.draw(axis_choice(len(shape)), label="axis")
    # unique values for max/min, so that the gradient is one-hot (ties are tested elsewhere)
    x = data.draw(hnp.arrays(dtype, shape, elements=floats(dtype, -100, 100),
                             unique=name in ("max", "min")), label="x")
    tx = tensor(x)
    out = getattr(tx, name)(axis=axis, keepdims=keepdims)
    expected = getattr(np, name)(ref64(x), axis=axis, keepdims=keepdims)
    assert out.shape == expected.shape and out.dtype == dtype
    rtol = tol(dtype)
    if dtype == np.float32 and name not in ("max", "min"):
        rtol = dict(rtol=1e-5, atol=1e-4)  # float32 sums of up to 256 terms of size 100
    np.testing.assert_allclose(out.numpy(), expected, **rtol)

    g = np.random.default_rng(2).uniform(-1, 1, expected.shape).astype(dtype)
    out.backward(g)
    axes = tuple(range(x.ndim)) if axis is None else tuple(np.atleast_1d(axis) % max(x.ndim, 1))
    gk = ref64(g) if keepdims else np.expand_dims(ref64(g), axes) if x.ndim else ref64(g)
    if name == "sum":
        expected_grad = np.broadcast_to(gk, x.shape)
    elif name == "mean":
        expected_grad = np.broadcast_to(gk, x.shape) / max(int(np.prod([x.shape[a] for a in axes])), 1)
    else:
        extreme = getattr(np, name)(ref64(x), axis=axes, keepdims=True)
        expected_grad = (ref64(x) == extreme) * gk
    np.testing.assert_allclose(tx.grad.numpy(), expected_grad, **tol(dtype, True))


# ----------------------------------------------------------------------------- shape ops

@settings(deadline=None)
@given(shape=hnp.array_shapes(min_dims=1, max_dims=4, max_side=4), data=st.data())
def test_basic_indexing_matches_numpy(shape, data):
    index = data.draw(hnp.basic_indices(shape, allow_newaxis=True, allow_ellipsis=True), label="index")
    x = np.arange(np.prod(shape), dtype=np.float64).reshape(shape)
    tx = tensor(x)
    out = tx[index]
    expected = x[index]
    np.testing.assert_array_equal(out.numpy(), expected)
    g = np.random.default_rng(3).standard_normal(expected.shape)
    out.backward(g)
    ref = np.zeros(shape)
    ref[index] = g  # basic indices select each element at most once
    np.testing.assert_array_equal(tx.grad.numpy(), ref)


@settings(deadline=None)
@given(shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=4), data=st.data())
def test_integer_array_indexing_accumulates_repeats(shape, data):
    index = data.draw(hnp.integer_array_indices(shape, result_shape=hnp.array_shapes(max_dims=2, max_side=5)),
                      label="index")
    x = np.random.default_rng(4).standard_normal(shape)
    tx = tensor(x)
    out = tx[index]
    np.testing.assert_array_equal(out.numpy(), x[index])
    g = np.random.default_rng(5).standard_normal(out.shape)
    out.backward(g)
    ref = np.zeros(shape)
    np.add.at(ref, index, g)
    np.testing.assert_allclose(tx.grad.numpy(), ref, rtol=1e-12, atol=1e-12)


def test_boolean_mask_indexing():
    x = np.arange(12.0).reshape(3, 4)
    mask = x % 3 == 0
    tx = tensor(x)
    out = tx[mask]
    np.testing.assert_array_equal(out.numpy(), x[mask])
    out.backward(np.arange(mask.sum(), dtype=np.float64) + 1)
    ref = np.zeros_like(x)
    ref[mask] = np.arange(mask.sum()) + 1
    np.testing.assert_array_equal(tx.grad.numpy(), ref)


BASIC_INDICES = [1, -1, np.int64(2), (1, 2, 0), (), slice(1, 3), slice(None, None, -2),
                 slice(3, 1), (None, 2), (Ellipsis, 1), (1, Ellipsis, None),
                 (slice(None), 0, slice(None, None, -1)), (slice(0, 4, 3), None, Ellipsis, 2)]
ADVANCED_INDICES = [[0, 0, 2], (np.array([3, 3, 0]), slice(None), 1), np.array([True, False] * 2),
                    (slice(None), np.array([[1, 1], [4, 0]]))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index, basic", [(i, True) for i in BASIC_INDICES]
                         + [(i, False) for i in ADVANCED_INDICES], ids=repr)
def test_getitem_gradient_equals_the_scatter_add_reference(index, basic, dtype, monkeypatch):
    """A basic index (ints, slices, None, Ellipsis) selects each element at most once, so its
    gradient is assigned into zeros, without the slow ``add.at`` scatter; integer and boolean
    arrays may repeat an element and keep accumulating. Both equal ``numpy.add.at`` into
    zeros exactly (one addend per element for basic indices)."""
    scatters = []
    scatter_add = diagnet.backend.scatter_add
    monkeypatch.setattr(diagnet.backend, "scatter_add",
                        lambda *args: (scatters.append(args[1]), scatter_add(*args)))
    rng = np.random.default_rng(8)
    x = tensor(rng.standard_normal((4, 5, 3)).astype(dtype), requires_grad=True)
    out = x[index]
    g = rng.standard_normal(out.shape).astype(dtype)
    out.backward(g)
    ref = np.zeros(x.shape, dtype)
    np.add.at(ref, index, g)
    assert x.grad.dtype == dtype
    np.testing.assert_array_equal(x.grad.numpy(), ref)
    assert len(scatters) == (0 if basic else 1)


@settings(deadline=None)
@given(shape=hnp.array_shapes(min_dims=1, max_dims=4, max_side=4), data=st.data())
def test_reshape_transpose_match_numpy(shape, data):
    x = np.random.default_rng(6).standard_normal(shape)
    perm = data.draw(st.permutations(range(len(shape))), label="perm")
    tx = tensor(x)
    t = tx.permute(*perm)
    np.testing.assert_array_equal(t.numpy(), x.transpose(perm))
    flat = t.reshape(-1)
    np.testing.assert_array_equal(flat.numpy(), x.transpose(perm).reshape(-1))
    g = np.arange(flat.size, dtype=np.float64)
    flat.backward(g)
    # the gradient of a permutation of the elements is the inverse permutation of g
    np.testing.assert_array_equal(tx.grad.numpy(), g.reshape(x.transpose(perm).shape).transpose(np.argsort(perm)))
    np.testing.assert_array_equal(tensor(x).T.numpy(), x.T)


@settings(deadline=None)
@given(shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=4), n=st.integers(1, 3), data=st.data())
def test_concatenate_stack_match_numpy(shape, n, data):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1), label="axis")
    rng = np.random.default_rng(7)
    sizes = [data.draw(st.integers(1, 3), label="size") for _ in range(n)]
    parts = []
    for s in sizes:
        sh = list(shape)
        sh[axis] = s
        parts.append(rng.standard_normal(sh))
    ts = [tensor(p) for p in parts]
    cat = F.concatenate(ts, axis=axis)
    np.testing.assert_array_equal(cat.numpy(), np.concatenate(parts, axis=axis))
    g = rng.standard_normal(cat.shape)
    cat.backward(g)
    for t, gp in zip(ts, np.split(g, np.cumsum(sizes)[:-1], axis=axis)):
        np.testing.assert_array_equal(t.grad.numpy(), gp)

    same = [rng.standard_normal(shape) for _ in range(n)]
    ts = [tensor(p) for p in same]
    st_axis = data.draw(st.integers(-len(shape) - 1, len(shape)), label="stack_axis")
    stacked = F.stack(ts, axis=st_axis)
    np.testing.assert_array_equal(stacked.numpy(), np.stack(same, axis=st_axis))
    g = rng.standard_normal(stacked.shape)
    stacked.backward(g)
    for i, t in enumerate(ts):
        np.testing.assert_array_equal(t.grad.numpy(), np.take(g, i, axis=st_axis))


# ----------------------------------------------------------------------------- nn ops

@settings(deadline=None)
@given(dtype=st.sampled_from(DTYPES), lead=hnp.array_shapes(min_dims=0, max_dims=2, max_side=3),
       norm=hnp.array_shapes(min_dims=1, max_dims=2, min_side=2, max_side=5),
       affine=st.booleans(), data=st.data())
def test_layer_norm_matches_numpy(dtype, lead, norm, affine, data):
    x = data.draw(arrays(dtype, lead + norm, floats(dtype, -10, 10)), label="x")
    rng = np.random.default_rng(8)
    w = rng.standard_normal(norm).astype(dtype) if affine else None
    b = rng.standard_normal(norm).astype(dtype) if affine else None
    out = F.layer_norm(tensor(x), norm, None if w is None else tensor(w),
                       None if b is None else tensor(b))
    axes = tuple(range(-len(norm), 0))
    x64 = ref64(x)
    mu = x64.mean(axis=axes, keepdims=True)
    var = x64.var(axis=axes, keepdims=True)
    expected = (x64 - mu) / np.sqrt(var + 1e-5)
    if affine:
        expected = expected * w + b
    assert out.dtype == dtype and out.shape == x.shape
    # Conditioning: rounding x - mean costs ~u * |x|, which the division by
    # sqrt(var + eps) magnifies by up to |x| / sqrt(var + eps) (large for near-constant
    # rows: x = 4.2 everywhere gives 1.5e-4 in float32 where the exact answer is 0).
    u = np.finfo(dtype).eps
    cond = np.abs(x64).max() / np.sqrt(var.min() + 1e-5) * (1 if w is None else np.abs(w).max())
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4 if dtype == np.float32 else 1e-10,
                               atol=16 * u * cond + 16 * u)


def test_mse_loss_values():
    rng = np.random.default_rng(9)
    p, t = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    tp = tensor(p)
    loss = F.mse_loss(tp, tensor(t, requires_grad=False))
    np.testing.assert_allclose(loss.item(), ((p - t) ** 2).mean(), rtol=1e-14)
    loss.backward()
    np.testing.assert_allclose(tp.grad.numpy(), 2 * (p - t) / p.size, rtol=1e-14)
    np.testing.assert_allclose(F.mse_loss(tp, t, reduction="sum").item(), ((p - t) ** 2).sum(), rtol=1e-14)
    np.testing.assert_allclose(F.mse_loss(tp, t, reduction="none").numpy(), (p - t) ** 2, rtol=1e-14)


# ----------------------------------------------------------------------------- dtype policy

def test_python_floats_and_lists_default_to_float32():
    assert diagnet.tensor(1.5).dtype == np.float32
    assert diagnet.tensor([1.0, 2.0]).dtype == np.float32
    assert diagnet.tensor([[1, 2.5]]).dtype == np.float32
    assert diagnet.Tensor((0.5,)).dtype == np.float32
    assert diagnet.tensor([1, 2]).dtype.kind == "i"  # integers stay integers


def test_float64_is_preserved_on_request():
    assert diagnet.tensor([1.0], dtype="float64").dtype == np.float64
    assert diagnet.tensor([1.0], dtype=np.float64).dtype == np.float64
    assert diagnet.tensor(np.zeros(3)).dtype == np.float64  # a float64 array keeps its dtype
    assert diagnet.tensor(np.float64(2.5)).dtype == np.float64  # so does a NumPy scalar
    assert diagnet.tensor(np.zeros(3, dtype=np.float16)).dtype == np.float32  # unsupported -> f32
    x = diagnet.tensor([1.0, 2.0], dtype="float64", requires_grad=True)
    y = F.softmax(F.exp(x * 2.0) + 1.0) @ x
    assert y.dtype == np.float64
    y.backward()
    assert x.grad.dtype == np.float64


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scalar", [2.5, 2, np.float64(2.5), np.float32(0.5), True, np.int64(3)])
def test_scalars_adopt_the_tensor_dtype(dtype, scalar):
    x = diagnet.tensor([1.0, 2.0], dtype=dtype, requires_grad=True)
    for out in (x * scalar, scalar * x, x + scalar, scalar - x, x / scalar, scalar / x,
                x ** 2, F.maximum(x, scalar), F.where(x > 1.5, scalar, x)):
        assert out.dtype == dtype, out
    assert (x * np.array([2.0, 3.0])).dtype == dtype  # NumPy arrays too
    assert (np.array([2.0, 3.0]) * x).dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_integer_tensor_with_float_tensor_adopts_float_dtype(dtype):
    i = diagnet.tensor([1, 2, 3])
    b = diagnet.tensor([True, False, True])
    x = diagnet.tensor([0.5, 1.5, 2.5], dtype=dtype, requires_grad=True)
    for out in (i + x, x + i, x * i, i / x, x - b, F.maximum(i, x), F.where(b, i, x), x ** i):
        assert out.dtype == dtype
    (i * x + b * x).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 2.0, 4.0])
    assert x.grad.dtype == dtype
    # integer-only arithmetic stays integer
    assert (i + i).dtype.kind == "i"


def test_float32_tensor_times_scalar_stays_float32_through_a_graph():
    x = diagnet.tensor([1.0, -2.0], requires_grad=True)
    y = (F.sigmoid(x * 2.5) - 0.5) ** 2 / 3 + F.gelu(x) * np.float64(1.5)
    assert y.dtype == np.float32
    y.sum().backward()
    assert x.grad.dtype == np.float32


# ----------------------------------------------------------------------------- new ops

def test_log_sigmoid_is_accurate_in_both_tails():
    for dtype in DTYPES:
        x = np.array([-1e4, -800.0, -80.0, -20.0, 0.0, 20.0, 80.0, 800.0, 1e4], dtype=dtype)
        tx = tensor(x)
        y = F.log_sigmoid(tx)
        assert np.all(np.isfinite(y.numpy()))
        # log1p keeps the tiny negative values of the right tail (about -e**-x)
        np.testing.assert_allclose(y.numpy(), sp.log_expit(ref64(x)),
                                   rtol=1e-6 if dtype == np.float32 else 1e-14, atol=0)
        y.sum().backward()
        np.testing.assert_allclose(tx.grad.numpy(), sp.expit(-ref64(x)),
                                   rtol=1e-6 if dtype == np.float32 else 1e-14, atol=0)


@settings(deadline=None)
@given(dtype=st.sampled_from(DTYPES), shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=4),
       keepdims=st.booleans(), data=st.data())
def test_argmax_matches_numpy(dtype, shape, keepdims, data):
    lo = -len(shape)  # a 0-d tensor accepts axis 0 only (as sum and max do)
    axis = data.draw(st.one_of(st.none(), st.integers(lo, max(len(shape), 1) - 1)), label="axis")
    # small integers, so that ties occur: the first index wins, as in NumPy
    x = data.draw(arrays(dtype, shape, st.integers(-3, 3).map(dtype)), label="x")
    tx = tensor(x)
    out = F.argmax(tx, axis=axis, keepdims=keepdims)
    np_axis = None if x.ndim == 0 else axis
    expected = np.argmax(x, axis=np_axis, keepdims=keepdims)
    assert out.dtype == np.int64 and not out.requires_grad and out.creator is None
    assert out.shape == expected.shape
    np.testing.assert_array_equal(out.numpy(), expected)
    np.testing.assert_array_equal(tx.argmax(axis, keepdims).numpy(), expected)


def test_argmax_errors():
    with pytest.raises(ValueError, match="argmax: the tensor is empty"):
        F.argmax(tensor(np.zeros((0, 3))))
    with pytest.raises(ValueError, match="argmax: axis must be an int or None"):
        F.argmax(tensor(np.zeros((2, 3))), axis=(0, 1))
    with pytest.raises(ValueError, match="argmax: axis 2 is out of range"):
        F.argmax(tensor(np.zeros((2, 3))), axis=2)


@settings(deadline=None)
@given(shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=1, max_side=3), data=st.data())
def test_unsqueeze_squeeze_match_numpy(shape, data):
    x = np.random.default_rng(10).standard_normal(shape)
    dim = data.draw(st.integers(-len(shape) - 1, len(shape)), label="dim")
    tx = tensor(x)
    up = F.unsqueeze(tx, dim)
    np.testing.assert_array_equal(up.numpy(), np.expand_dims(x, dim))
    np.testing.assert_array_equal(tx.unsqueeze(dim).numpy(), np.expand_dims(x, dim))
    down = F.squeeze(up, dim)  # the inserted dim has size 1
    np.testing.assert_array_equal(down.numpy(), x)
    np.testing.assert_array_equal(F.squeeze(tx).numpy(), np.squeeze(x))
    np.testing.assert_array_equal(up.squeeze().numpy(), np.squeeze(x))
    g = np.random.default_rng(11).standard_normal(up.shape)
    up.backward(g)
    np.testing.assert_array_equal(tx.grad.numpy(), g.reshape(shape))


def test_squeeze_unsqueeze_errors():
    x = tensor(np.zeros((2, 1, 3)))
    np.testing.assert_array_equal(F.squeeze(x, (1,)).shape, (2, 3))
    with pytest.raises(ValueError, match=r"squeeze: dim 0 of shape \(2, 1, 3\) has size 2, not 1"):
        F.squeeze(x, 0)
    with pytest.raises(ValueError, match="squeeze: dim 3 is out of range for 3 dims"):
        F.squeeze(x, 3)
    with pytest.raises(ValueError, match="unsqueeze: dim 4 is out of range for 4 dims"):
        F.unsqueeze(x, 4)
    with pytest.raises(ValueError, match="unsqueeze: dim -5 is out of range"):
        x.unsqueeze(-5)


@settings(deadline=None)
@given(shapes=hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=4, max_side=4),
       dtype=st.sampled_from(DTYPES))
def test_broadcast_to_matches_numpy(shapes, dtype):
    src = shapes.input_shapes[0]
    dst = shapes.result_shape
    x = np.random.default_rng(12).standard_normal(src).astype(dtype)
    tx = tensor(x)
    out = F.broadcast_to(tx, dst)
    assert out.shape == dst and out.dtype == dtype
    np.testing.assert_array_equal(out.numpy(), np.broadcast_to(x, dst))
    g = np.random.default_rng(13).standard_normal(dst).astype(dtype)
    out.backward(g)
    assert tx.grad.shape == src
    np.testing.assert_allclose(tx.grad.numpy(), reduce_to(ref64(g), src), **tol(dtype, True))


def test_broadcast_to_errors():
    for src, dst in [((2, 3), (3, 3)), ((2, 3), (3,)), ((3,), (3, 2))]:
        msg = f"broadcast_to: cannot broadcast a tensor of shape {src} to shape {dst}"
        with pytest.raises(ValueError, match=re.escape(msg)):
            F.broadcast_to(tensor(np.zeros(src)), dst)


def test_clone_is_a_differentiable_copy():
    x = tensor(np.array([1.0, -2.0, 3.0]))
    c = F.clone(x)
    assert c is not x and c.requires_grad and c.creator is not None
    np.testing.assert_array_equal(c.numpy(), x.numpy())
    c.data[0] = 100.0  # its own memory
    assert x.numpy()[0] == 1.0
    (x.clone() * 3.0 + c).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [4.0, 4.0, 4.0])
    d = x.detach()  # for contrast: detach shares the data and leaves the graph
    assert d.data is x.data and not d.requires_grad


def test_numel():
    for shape in [(), (0,), (3,), (2, 3, 4), (1, 0, 5)]:
        x = tensor(np.zeros(shape), requires_grad=False)
        n = F.numel(x)
        assert type(n) is int and n == int(np.prod(shape)) == x.numel()
    assert F.numel(np.zeros((2, 5))) == 10


@settings(deadline=None)
@given(dtype=st.sampled_from(DTYPES), shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=2,
                                                             max_side=4),
       keepdims=st.booleans(), ddof=st.sampled_from([0, 1]), data=st.data())
def test_var_matches_numpy(dtype, shape, keepdims, ddof, data):
    axis = data.draw(axis_choice(len(shape)), label="axis")
    if len(shape) == 0 and ddof:
        return  # one element: no degree of freedom left (tested in test_var_errors)
    x = data.draw(arrays(dtype, shape, floats(dtype, -10, 10)), label="x")
    tx = tensor(x)
    out = F.var(tx, axis=axis, keepdims=keepdims, ddof=ddof)
    np_axis = None if x.ndim == 0 else axis
    expected = np.var(ref64(x), axis=np_axis, keepdims=keepdims, ddof=ddof)
    assert out.shape == expected.shape and out.dtype == dtype
    np.testing.assert_allclose(out.numpy(), expected,
                               **(F64_TOL if dtype == np.float64 else dict(rtol=1e-4, atol=1e-4)))
    np.testing.assert_allclose(tx.var(axis, keepdims, ddof).numpy(), out.numpy(), rtol=0, atol=0)
    g = np.random.default_rng(14).uniform(-1, 1, expected.shape).astype(dtype)
    out.backward(g)
    axes = tuple(range(x.ndim)) if axis is None else tuple(np.atleast_1d(axis) % max(x.ndim, 1))
    n = int(np.prod([x.shape[a] for a in axes]))
    gk = ref64(g) if keepdims or x.ndim == 0 else np.expand_dims(ref64(g), axes)
    centred = ref64(x) - ref64(x).mean(axis=axes, keepdims=True)
    expected_grad = 2 * centred / (n - ddof) * gk
    np.testing.assert_allclose(tx.grad.numpy(), expected_grad,
                               **(F64_GRAD_TOL if dtype == np.float64 else dict(rtol=1e-4, atol=1e-4)))


def test_var_default_is_the_population_variance():
    x = np.array([1.0, 2.0, 4.0, 7.0])
    assert F.var(tensor(x)).item() == pytest.approx(np.var(x))            # ddof=0, NumPy's
    assert F.var(tensor(x), ddof=1).item() == pytest.approx(np.var(x, ddof=1))  # PyTorch's


def test_var_errors():
    with pytest.raises(ValueError, match=r"var: needs more than ddof=1 elements per reduction; "
                                         r"the reduction over axis 0 of shape \(1, 3\) has 1"):
        F.var(tensor(np.zeros((1, 3))), axis=0, ddof=1)
    for bad in (-1, 0.5, True):
        with pytest.raises(ValueError, match="var: ddof must be a non-negative int"):
            F.var(tensor(np.zeros(3)), ddof=bad)


def test_min_errors():
    with pytest.raises(ValueError, match="min: the tensor is empty"):
        F.min(tensor(np.zeros((2, 0))))
    with pytest.raises(ValueError, match="min: axis 3 is out of range"):
        tensor(np.zeros((2, 3))).min(axis=3)


# ----------------------------------------------------------------------------- cross-entropy:
# masked (-inf) logits and labels already on the device

def _masked_reference(z, mask, labels, smoothing):
    """Loss and gradient computed over the unmasked classes only (no -inf anywhere)."""
    n, c = z.shape
    loss, grad = np.zeros(n), np.zeros((n, c))
    for i in range(n):
        keep = mask[i]
        logp = sp.log_softmax(z[i, keep])
        q = np.full(c, smoothing / c)
        q[labels[i]] += 1 - smoothing
        loss[i] = -(q[keep] * logp).sum()
        if smoothing and not keep.all():
            loss[i] = np.inf  # a class with target weight eps/C has probability 0
        grad[i, keep] = np.exp(logp)
        grad[i] -= q
    return loss, grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_with_masked_logits(dtype, smoothing):
    """A -inf logit contributes 0 to the loss (no 0 * -inf = NaN) and gets a 0 gradient;
    with label smoothing the loss is +inf, as in PyTorch, and the gradient stays finite."""
    rng = np.random.default_rng(15)
    z = rng.standard_normal((4, 5)).astype(dtype)
    mask = np.array([[1, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 0, 1], [1, 1, 1, 1, 0]], bool)
    labels = np.array([0, 3, 4, 2])
    tz = tensor(np.where(mask, z, -np.inf).astype(dtype))
    with np.errstate(all="raise"):  # no invalid operation (inf - inf, 0 * inf) anywhere
        loss = F.cross_entropy(tz, labels, label_smoothing=smoothing, reduction="none")
        loss.sum().backward()
    ref_loss, ref_grad = _masked_reference(ref64(z), mask, labels, smoothing)
    np.testing.assert_allclose(loss.numpy(), ref_loss, **tol(dtype))
    grad = tz.grad.numpy()
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad, ref_grad, **tol(dtype, True))
    if smoothing == 0.0:
        assert np.all(grad[~mask] == 0)
        mean = F.cross_entropy(tz, labels)
        np.testing.assert_allclose(mean.item(), ref_loss.mean(), **tol(dtype))


def test_cross_entropy_minus_inf_at_the_label_and_fully_masked_rows():
    z = tensor(np.array([[-np.inf, 0.0, 1.0], [0.0, 1.0, 2.0]]))
    loss = F.cross_entropy(z, np.array([0, 2]), reduction="none")
    assert loss.numpy()[0] == np.inf and np.isfinite(loss.numpy()[1])
    loss.sum().backward()  # the gradient is softmax - onehot: finite
    np.testing.assert_allclose(z.grad.numpy()[0], [-1.0, *sp.softmax([0.0, 1.0])], rtol=1e-12)
    with np.errstate(invalid="ignore"):
        row = F.cross_entropy(tensor(np.full((1, 3), -np.inf)), np.array([1]), reduction="none")
    assert np.isnan(row.numpy()[0])  # no distribution at all: NaN, as in PyTorch


def test_cross_entropy_device_side_label_check_marks_bad_rows_nan():
    """The check used for labels that live on the GPU (no host read), run here with NumPy:
    rows with an out-of-range label get a NaN loss and NaN gradients, the others are
    unaffected."""
    from diagnet.ops.loss import CrossEntropy

    z = np.random.default_rng(16).standard_normal((3, 4))
    raw = np.array([1, 7, -2])
    valid = (raw >= 0) & (raw < 4)
    tz = tensor(z)
    loss = CrossEntropy(np.clip(raw, 0, 3), 0.0, "none", valid)(tz)
    out = loss.numpy()
    assert np.isnan(out[1]) and np.isnan(out[2])
    np.testing.assert_allclose(out[0], -sp.log_softmax(z[0])[1], rtol=1e-12)
    loss.backward(np.ones(3))
    g = tz.grad.numpy()
    assert np.all(np.isnan(g[1:])) and np.all(np.isfinite(g[0]))
    assert np.isnan(CrossEntropy(np.clip(raw, 0, 3), 0.1, "mean", valid)(tensor(z)).item())


def test_cross_entropy_host_labels_out_of_range_raise():
    z = tensor(np.zeros((3, 4)))
    for labels in (np.array([0, 4, 1]), [0, -1, 2], diagnet.tensor(np.array([5, 0, 0]))):
        with pytest.raises(ValueError, match=r"cross_entropy: labels must be in \[0, 4\)"):
            F.cross_entropy(z, labels)


@pytest.mark.gpu
def test_cross_entropy_labels_on_the_gpu():
    """GPU labels are checked on the device (NaN rows); host labels still raise."""
    z = diagnet.tensor(np.random.default_rng(17).standard_normal((3, 4)), device="cuda",
                       requires_grad=True)
    good = diagnet.tensor(np.array([1, 0, 3]), device="cuda")
    loss = F.cross_entropy(z, good, reduction="none")
    np.testing.assert_allclose(loss.numpy(), F.cross_entropy(z.cpu(), np.array([1, 0, 3]),
                                                             reduction="none").numpy(), rtol=1e-6)
    bad = diagnet.tensor(np.array([1, 4, -1]), device="cuda")
    out = F.cross_entropy(z, bad, reduction="none")  # no exception: no host read
    assert out.device == "cuda"
    values = out.numpy()
    assert np.isfinite(values[0]) and np.isnan(values[1]) and np.isnan(values[2])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\)"):
        F.cross_entropy(z, np.array([1, 4, 0]))  # host labels: checked before the copy
    with pytest.raises(ValueError, match="labels are on cuda but logits are on cpu"):
        F.cross_entropy(z.cpu(), good)
    keep = diagnet.tensor(np.array([True, True, False, True]), device="cuda")  # labels kept
    masked = F.where(keep, z, -np.inf)
    ce = F.cross_entropy(masked, good)
    assert np.isfinite(ce.item())
    ce.backward()
    assert np.all(np.isfinite(z.grad.numpy()))


# ----------------------------------------------------------------------------- layer norm grads

def _layer_norm_grads64(x, gy, w, eps, ndims):
    """Float64 ``(dx, dweight, dbias)`` of ``y = xhat * w + b`` for the upstream gradient ``gy``.

    Over the ``N`` normalised elements of a row: ``mu = mean(x)``, ``var = mean((x - mu)**2)``,
    ``r = 1 / sqrt(var + eps)``, ``xhat = (x - mu) * r``. Then ``d mu / d x_j = 1 / N``,
    ``d var / d x_j = 2 (x_j - mu) / N`` (the ``(x_i - mu)`` sum to 0), so
    ``d r / d x_j = -r**3 (x_j - mu) / N = -r**2 xhat_j / N`` and

        d xhat_i / d x_j = r (delta_ij - 1/N) + (x_i - mu) d r / d x_j
                         = r (delta_ij - 1/N - xhat_i xhat_j / N).

    ``dx_j = sum_i g_i d xhat_i / d x_j`` with ``g = gy * w``, taken here through that
    explicit ``N x N`` Jacobian (not the simplified formula the op uses); ``dweight`` and
    ``dbias`` are the sums over the leading dims of ``gy * xhat`` and ``gy``.
    Each comes with its scale: the same sums over the absolute values of the terms (for
    ``dx``, of the three terms of the Jacobian, which cancel exactly when ``N = 2``).
    """
    norm = x.shape[x.ndim - ndims:]
    N = int(np.prod(norm))
    x2, g2 = ref64(x).reshape(-1, N), ref64(gy).reshape(-1, N)
    w2 = np.ones(N) if w is None else ref64(w).reshape(N)
    mu = x2.mean(axis=1, keepdims=True)
    r = 1.0 / np.sqrt(((x2 - mu) ** 2).mean(axis=1, keepdims=True) + eps)
    xhat = (x2 - mu) * r
    jac = r[:, :, None] * (np.eye(N) - 1.0 / N - xhat[:, :, None] * xhat[:, None, :] / N)
    g = g2 * w2
    dx = np.einsum("bi,bij->bj", g, jac)
    outer_abs = np.abs(xhat[:, :, None] * xhat[:, None, :])
    jac_abs = r[:, :, None] * (np.eye(N) + 1.0 / N + outer_abs / N)
    dx_scale = np.einsum("bi,bij->bj", np.abs(g), jac_abs)
    dw, dw_scale = (g2 * xhat).sum(axis=0), np.abs(g2 * xhat).sum(axis=0)
    db, db_scale = g2.sum(axis=0), np.abs(g2).sum(axis=0)
    return ((dx.reshape(x.shape), dx_scale.reshape(x.shape)),
            (dw.reshape(norm), dw_scale.reshape(norm)), (db.reshape(norm), db_scale.reshape(norm)))


# Float32 gradients against the float64 values above, from the same float32 inputs:
# |got - want| <= LAYER_NORM_RTOL * scale, scale = the same sum over absolute values of the
# terms (the reason for the number is in tests/tolerances.py); the rows below keep |mean| at
# most 2 standard deviations, which that bound assumes.


@pytest.mark.parametrize("lead, norm, mean, std, eps", [
    ((), (6,), 0.0, 1.0, 1e-5),
    ((4,), (64,), 3.0, 2.0, 1e-5),          # mean 1.5 standard deviations off zero
    ((2, 3), (4, 5), -1.0, 0.5, 1e-5),      # two normalised dims
    ((3,), (2, 3, 2), 0.5, 1.0, 1e-3),
    ((5,), (2,), 2.0, 1.0, 1e-5),           # N = 2: xhat = +-1 up to eps
    ((4,), (8,), 0.0, 3e-3, 1e-5),          # variance ~ eps: eps matters in r
])
@pytest.mark.parametrize("affine", ["none", "weight", "bias", "both"])
def test_layer_norm_gradients_float32(lead, norm, mean, std, eps, affine):
    rng = np.random.default_rng(len(lead) * 100 + int(np.prod(norm)))
    x = (mean + std * rng.standard_normal(lead + norm)).astype(np.float32)
    gy = rng.standard_normal(lead + norm).astype(np.float32)
    w = rng.uniform(0.5, 2.0, norm).astype(np.float32) if affine in ("weight", "both") else None
    b = rng.standard_normal(norm).astype(np.float32) if affine in ("bias", "both") else None
    tx = tensor(x)
    tw, tb = (None if a is None else tensor(a) for a in (w, b))
    y = F.layer_norm(tx, norm, weight=tw, bias=tb, eps=eps)
    assert y.dtype == np.float32
    y.backward(gy)
    (dx, dx_s), (dw, dw_s), (db, db_s) = _layer_norm_grads64(x, gy, w, eps, len(norm))
    grads = [(tx.grad, dx, dx_s)]
    if tw is not None:
        grads.append((tw.grad, dw, dw_s))
    if tb is not None:
        grads.append((tb.grad, db, db_s))
    for got, want, scale in grads:
        assert got.dtype == np.float32 and got.shape == want.shape
        err = np.abs(got.numpy().astype(np.float64) - want)
        assert np.all(err <= LAYER_NORM_RTOL * scale), (err / scale).max()
    # a check of the reference itself: d/dx sums to zero over each row (shifting x is free)
    rows = dx.reshape(-1, int(np.prod(norm))).sum(axis=1)
    assert np.all(np.abs(rows) <= 1e-12 * dx_s.reshape(rows.shape[0], -1).sum(axis=1))


# ----------------------------------------------------------------------------- dim= for axis=

_X = np.arange(24.0).reshape(2, 3, 4) % 7 - 3.0


@pytest.mark.parametrize("name, kwargs", [
    ("sum", {}), ("mean", {}), ("max", {}), ("min", {}), ("var", {}), ("argmax", {}),
    ("sum", {"keepdims": True}), ("var", {"ddof": 1}),
])
@pytest.mark.parametrize("dim", [1, -1, (0, 2)])
def test_reductions_accept_dim_as_an_alias_of_axis(name, kwargs, dim):
    if name == "argmax" and isinstance(dim, tuple):
        pytest.skip("argmax takes one axis")
    x = diagnet.tensor(_X, dtype="float64")
    expected = getattr(F, name)(x, axis=dim, **kwargs).numpy()
    for got in (getattr(F, name)(x, dim=dim, **kwargs), getattr(x, name)(dim=dim, **kwargs)):
        np.testing.assert_array_equal(got.numpy(), expected)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_softmax_accepts_dim_and_defaults_to_the_last_axis(name):
    x = diagnet.tensor(_X, dtype="float64")
    fn = getattr(F, name)
    np.testing.assert_array_equal(fn(x, dim=0).numpy(), fn(x, axis=0).numpy())
    np.testing.assert_array_equal(fn(x).numpy(), fn(x, axis=-1).numpy())
    np.testing.assert_array_equal(fn(x).numpy(), fn(x, dim=2).numpy())


def test_concatenate_and_stack_accept_dim():
    a, b = diagnet.tensor(_X[0]), diagnet.tensor(_X[1])
    assert F.concatenate([a, b], dim=1).shape == (3, 8) == F.concatenate([a, b], axis=1).shape
    assert F.concatenate([a, b]).shape == (6, 4)
    assert F.stack([a, b], dim=2).shape == (3, 4, 2) == F.stack([a, b], axis=2).shape
    assert F.stack([a, b]).shape == (2, 3, 4)


def test_any_and_all_accept_dim():
    x = diagnet.tensor(_X > 0)
    np.testing.assert_array_equal(x.any(dim=1).numpy(), (_X > 0).any(axis=1))
    np.testing.assert_array_equal(x.all(dim=-1).numpy(), (_X > 0).all(axis=-1))


@pytest.mark.parametrize("call", [
    lambda x: F.sum(x, axis=0, dim=1), lambda x: x.sum(0, dim=0), lambda x: x.mean(axis=1, dim=1),
    lambda x: x.max(1, dim=1), lambda x: x.min(axis=0, dim=0), lambda x: x.var(0, dim=1),
    lambda x: x.argmax(0, dim=0), lambda x: x.any(0, dim=0), lambda x: x.all(0, dim=0),
    lambda x: F.softmax(x, axis=-1, dim=0), lambda x: F.log_softmax(x, -1, dim=-1),
    lambda x: F.concatenate([x, x], axis=0, dim=1), lambda x: F.stack([x, x], 0, dim=0),
])
def test_axis_and_dim_together_raise(call):
    with pytest.raises(TypeError, match=r"got axis=.* and dim=.*; dim is another name for axis"):
        call(diagnet.tensor(_X))


@pytest.mark.parametrize("value", ["0.1", None, [0.1], True])
def test_cross_entropy_label_smoothing_must_be_a_number(value):
    logits = diagnet.tensor([[1.0, 2.0]])
    with pytest.raises(TypeError, match=rf"label_smoothing must be a real number; got "
                                        rf"{type(value).__name__} "):
        F.cross_entropy(logits, [0], label_smoothing=value)
