"""GELU's and bias + GELU's compiled CPU kernels (`diagnet.fused.gelu`) against the composed
reference, and the linear + bias + GELU of `FeedForward`.

The reference is the array code of `diagnet.ops.activation.GELU` and `BiasGELU`, selected
with ``DIAGNET_CPU_KERNELS=reference`` (the `use_kernels` fixture). float64 values and
gradients agree to rounding; float32 (whose erf form uses a vectorisable ``erfc`` accurate to
a relative 1.2e-7, and whose exponentials come from `diagnet.fused.fastmath`, checked here
against NumPy) agrees with the float64 reference to the float32 tolerances. The CUDA kernels
are checked in ``test_fused_gelu_cuda.py``; the ``gpu`` test at the end compares the CuPy
path with the CPU kernels.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest

import diagnet
from diagnet import functional as F
from diagnet import nn
from diagnet.dst import sparsify
from diagnet.gradcheck import gradcheck
from diagnet.models.common import FeedForward
from diagnet.ops.activation import GELU
from tolerances import F32_GRAD_TOL, F32_TOL, F64_GRAD_TOL, F64_TOL, GRADCHECK_TOL

FORMS = ["none", "tanh"]
# rows of width 1, odd widths, and one array past the parallel threshold (2**15 elements)
SHAPES = [(), (1,), (7,), (3, 1), (5, 33), (2, 3, 4), (257, 130)]
SPECIAL = [0.0, -0.0, 1e-30, -1e-30, 5.0, -5.0, 12.0, -12.0, 40.0, -40.0,
           np.inf, -np.inf, np.nan]


def _values(shape, seed, scale=3.0):
    rng = np.random.default_rng(seed)
    x = scale * rng.standard_normal(shape)
    flat = x.reshape(-1)
    flat[:len(SPECIAL)] = SPECIAL[:flat.size]
    return x


def _gelu_and_grad(x, g, approximate):
    t = diagnet.tensor(x, requires_grad=True)
    y = F.gelu(t, approximate=approximate)
    y.backward(g)
    return y.numpy(), t.grad.numpy()


@pytest.mark.parametrize("approximate", FORMS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gelu_kernels_match_the_reference_in_float64(approximate, shape, use_kernels):
    x = _values(shape, seed=1)
    g = np.random.default_rng(2).standard_normal(shape)
    with np.errstate(all="ignore"):  # inf * 0 at the infinities: NaN in both
        y, gx = _gelu_and_grad(x, g, approximate)
        with use_kernels("reference"):
            y_ref, gx_ref = _gelu_and_grad(x, g, approximate)
    assert y.shape == shape and y.dtype == np.float64
    np.testing.assert_allclose(y, y_ref, equal_nan=True, **F64_TOL)
    np.testing.assert_allclose(gx, gx_ref, equal_nan=True, **F64_TOL)


@pytest.mark.parametrize("approximate", FORMS)
def test_gelu_kernels_in_float32_match_the_float64_reference(approximate, use_kernels):
    x = np.concatenate([np.linspace(-10, 10, 4001), _values((40000,), seed=3)[len(SPECIAL):]])
    x32 = x.astype(np.float32)
    g32 = np.random.default_rng(4).standard_normal(x.shape).astype(np.float32)
    y, gx = _gelu_and_grad(x32, g32, approximate)
    assert y.dtype == gx.dtype == np.float32
    with use_kernels("reference"):
        y_ref, gx_ref = _gelu_and_grad(x32.astype(np.float64), g32.astype(np.float64),
                                       approximate)
    np.testing.assert_allclose(y, y_ref, **F32_TOL)
    np.testing.assert_allclose(gx, gx_ref, **F32_GRAD_TOL)


@pytest.mark.parametrize("approximate", FORMS)
def test_gelu_kernels_in_float32_at_special_values(approximate, use_kernels):
    x32 = np.array(SPECIAL + [-1e30, 1e30, -3e38, 3e38, -1e-45], dtype=np.float32)
    g32 = np.ones_like(x32)
    with np.errstate(all="ignore"):  # inf * 0 at the infinities: NaN in both
        y, gx = _gelu_and_grad(x32, g32, approximate)
        with use_kernels("reference"):
            y_ref, gx_ref = _gelu_and_grad(x32.astype(np.float64), g32.astype(np.float64),
                                           approximate)
    np.testing.assert_allclose(y, y_ref, equal_nan=True, **F32_TOL)
    np.testing.assert_allclose(gx, gx_ref, equal_nan=True, **F32_GRAD_TOL)


def test_exp_nonpositive_f32_matches_numpy():
    """The float32-precision exponential of the float32 kernels, to its stated 4e-10."""
    import numba

    from diagnet.fused.fastmath import exp_nonpositive_f32

    @numba.njit
    def exp_all(x):
        return np.array([exp_nonpositive_f32(v) for v in x])

    x = -np.concatenate([np.linspace(0.0, 256.0, 100001),
                         np.random.default_rng(10).exponential(20.0, 10000)])
    x = x[x >= -256.0]
    np.testing.assert_allclose(exp_all(x), np.exp(x), rtol=4e-10, atol=0.0)
    special = exp_all(np.array([-0.0, -256.5, -1e300, -np.inf, np.nan]))
    np.testing.assert_array_equal(special, [1.0, 0.0, 0.0, 0.0, np.nan])


def test_exp_f32_is_within_two_ulps_of_exp():
    """The float32-arithmetic exponential of the float32 GELU kernels: within 2 ulps of
    ``exp`` (float64) over its range, exactly 0 below it, NaN for NaN."""
    import numba

    from diagnet.fused.fastmath import exp_f32

    @numba.njit
    def exp_all(x):
        out = np.empty_like(x)
        for i in range(x.shape[0]):
            out[i] = exp_f32(x[i])
        return out

    x = -np.concatenate([np.linspace(0.0, 87.33, 200001),
                         np.random.default_rng(11).exponential(20.0, 10000)]).astype(np.float32)
    x = x[x >= np.float32(-87.33)]
    got = exp_all(x)
    assert got.dtype == np.float32
    want = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - want) / want) <= 2 * 2.0**-24
    special = exp_all(np.array([-0.0, -87.34, -1e30, -np.inf, np.nan], dtype=np.float32))
    np.testing.assert_array_equal(special, [1.0, 0.0, 0.0, 0.0, np.nan])


def test_gelu_float32_relative_error_is_a_few_dozen_ulps_where_it_matters():
    """The float32 kernels compute in float32: wherever ``|gelu(x)| >= 1e-3`` (every ``x``
    above about -3.44, except a neighbourhood of 0) they stay within 32 ulps of the float64
    value (measured: 21; the erfc tail's exponent ``-x^2 / 2`` rounded to float32 is the
    main term)."""
    from diagnet.fused import gelu as kernels

    x = np.linspace(-12.0, 12.0, 400001).astype(np.float32)
    for form in FORMS:
        got = kernels.gelu(x, form)
        want = kernels.gelu(x.astype(np.float64), form)
        big = np.abs(want) >= 1e-3
        assert np.max(np.abs(got[big] - want[big]) / np.abs(want[big])) <= 32 * 2.0**-24


@pytest.mark.parametrize("approximate", FORMS)
@pytest.mark.parametrize("shape", [(6,), (3, 5)], ids=str)
def test_gelu_kernels_gradcheck(approximate, shape):
    x = diagnet.tensor(2.0 * np.random.default_rng(6).standard_normal(shape),
                       requires_grad=True)
    assert gradcheck(lambda t: F.gelu(t, approximate=approximate), x, **GRADCHECK_TOL)


def test_gelu_takes_the_kernels_for_numpy_floats_only(use_kernels):
    from diagnet.fused import gelu as kernels

    for dtype in (np.float32, np.float64):
        fn = GELU("none")
        fn(diagnet.tensor(np.ones(3, dtype=dtype)))
        assert fn.kernels is kernels
    with use_kernels("reference"):
        fn = GELU("none")
        fn(diagnet.tensor(np.ones(3)))
        assert fn.kernels is None


def test_gelu_kernels_take_non_contiguous_input():
    x = np.random.default_rng(7).standard_normal((6, 5))
    t = diagnet.tensor(x)
    y = F.gelu(t.T).numpy()  # a transposed view
    np.testing.assert_allclose(y, F.gelu(diagnet.tensor(x.T.copy())).numpy(), **F64_TOL)


# ----------------------------------------------------------------------------- bias + GELU

BIAS_SHAPES = [(1,), (7,), (3, 1), (5, 33), (2, 3, 4), (257, 130), (0, 4), (3, 0)]


def _bias_gelu_and_grads(x, b, g, approximate):
    tx = diagnet.tensor(x, requires_grad=True)
    tb = diagnet.tensor(b, requires_grad=True)
    y = F.bias_gelu(tx, tb, approximate=approximate)
    y.backward(g)
    return y.numpy(), tx.grad.numpy(), tb.grad.numpy()


def _bias_inputs(shape, dtype, seed):
    rng = np.random.default_rng([seed, *shape])
    x = _values(shape, seed) if np.prod(shape) else np.zeros(shape)
    return (x.astype(dtype), rng.standard_normal(shape[-1:]).astype(dtype),
            rng.standard_normal(shape).astype(dtype))


@pytest.mark.parametrize("approximate", FORMS)
@pytest.mark.parametrize("shape", BIAS_SHAPES, ids=str)
def test_bias_gelu_kernels_match_the_reference_in_float64(approximate, shape, use_kernels):
    x, b, g = _bias_inputs(shape, np.float64, seed=11)
    with np.errstate(all="ignore"):  # inf * 0 at the infinities: NaN in both
        got = _bias_gelu_and_grads(x, b, g, approximate)
        with use_kernels("reference"):
            want = _bias_gelu_and_grads(x, b, g, approximate)
    for a, r, tol in zip(got, want, (F64_TOL, F64_TOL, F64_GRAD_TOL)):
        assert a.shape == r.shape and a.dtype == np.float64
        np.testing.assert_allclose(a, r, equal_nan=True, **tol)


@pytest.mark.parametrize("approximate", FORMS)
@pytest.mark.parametrize("shape", [(5, 33), (257, 130)], ids=str)
def test_bias_gelu_kernels_in_float32_match_the_float64_reference(approximate, shape,
                                                                  use_kernels):
    x, b, g = _bias_inputs(shape, np.float32, seed=12)
    x[np.isnan(x) | np.isinf(x)] = 0.0
    y, gx, gb = _bias_gelu_and_grads(x, b, g, approximate)
    assert y.dtype == gx.dtype == gb.dtype == np.float32
    with use_kernels("reference"):
        y64, gx64, gb64 = _bias_gelu_and_grads(*(a.astype(np.float64) for a in (x, b, g)),
                                               approximate)
    np.testing.assert_allclose(y, y64, **F32_TOL)
    np.testing.assert_allclose(gx, gx64, **F32_GRAD_TOL)
    # a sum over the rows: scaled rule, against the sum of the terms' magnitudes
    assert np.all(np.abs(gb - gb64) <= 1e-5 * np.abs(gx64).reshape(-1, shape[-1]).sum(axis=0))


@pytest.mark.parametrize("approximate", FORMS)
@pytest.mark.parametrize("shape", [(4,), (3, 5), (2, 2, 3)], ids=str)
def test_bias_gelu_gradcheck(approximate, shape):
    rng = np.random.default_rng(13)
    x = diagnet.tensor(2.0 * rng.standard_normal(shape), requires_grad=True)
    b = diagnet.tensor(rng.standard_normal(shape[-1:]), requires_grad=True)
    assert gradcheck(lambda t, c: F.bias_gelu(t, c, approximate=approximate), x, b,
                     **GRADCHECK_TOL)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bias_gelu_bias_grad_is_the_same_on_one_thread_and_many(dtype):
    """The tasks are fixed by the shape, so the serial and the parallel path add the same
    partial sums in the same order: the same bits."""
    from diagnet.fused import gelu as kernels

    x, b, g = _bias_inputs((257, 130), dtype, seed=14)
    assert x.size >= kernels._SERIAL_ELEMENTS
    first = kernels.bias_gelu_grad(x, b, g)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        serial = kernels.bias_gelu_grad(x, b, g)
    finally:
        numba.set_num_threads(threads)
    for a, c in zip(first, serial):
        assert np.array_equal(a, c, equal_nan=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("approximate", FORMS)
@pytest.mark.parametrize("shape", [(5, 33), (257, 130), (0, 4), (3, 0)], ids=str)
def test_slope_kept_by_the_forward_gives_the_same_bits(shape, approximate, dtype):
    """`bias_gelu_and_slope` returns `bias_gelu`'s output, and the backward from its slope
    gives `bias_gelu_grad`'s ``dx`` and bias gradient bit for bit (special values included),
    on the serial path (small shapes) and the parallel one (257 x 130)."""
    from diagnet.fused import gelu as kernels

    x, b, g = _bias_inputs(shape, dtype, seed=16)
    with np.errstate(all="ignore"):
        y, slope = kernels.bias_gelu_and_slope(x, b, approximate)
        assert slope.shape == y.shape == x.shape and slope.dtype == dtype
        assert np.array_equal(y, kernels.bias_gelu(x, b, approximate), equal_nan=True)
        for want_bias in (True, False):
            got = kernels.bias_gelu_grad_from_slope(slope, g, want_bias)
            want = kernels.bias_gelu_grad(x, b, g, approximate, want_bias)
            assert np.array_equal(got[0], want[0], equal_nan=True)
            assert (got[1] is None) == (want[1] is None) == (not want_bias)
            if want_bias:
                assert got[1].dtype == dtype
                assert np.array_equal(got[1], want[1], equal_nan=True)


def test_bias_gelu_keeps_the_slope_only_when_a_backward_will_follow(monkeypatch):
    """The node writes the slope in its forward when an input requires grad and grad mode
    is on; under ``no_grad``, or for inputs that need no grad, it does not (and the values
    are the same either way)."""
    from diagnet.ops import activation
    from diagnet.ops.activation import BiasGELU

    made = []

    class Spy(BiasGELU):
        def __init__(self, approximate, keep_slope=False):
            made.append(keep_slope)
            super().__init__(approximate, keep_slope)

    monkeypatch.setattr(activation, "BiasGELU", Spy)
    x, b, g = _bias_inputs((64, 70), np.float32, seed=17)
    tx, tb = diagnet.tensor(x, requires_grad=True), diagnet.tensor(b, requires_grad=True)
    y = F.bias_gelu(tx, tb)
    assert y.creator.keep_slope and y.creator.slope is not None
    with diagnet.no_grad():
        y_inference = F.bias_gelu(tx, tb)
    plain = F.bias_gelu(diagnet.tensor(x), diagnet.tensor(b))
    assert made == [True, False, False]
    np.testing.assert_array_equal(y_inference.numpy(), y.numpy())
    np.testing.assert_array_equal(plain.numpy(), y.numpy())
    y.backward(g)
    # the same gradients as the node that recomputes the slope in its backward
    rx, rb = diagnet.tensor(x, requires_grad=True), diagnet.tensor(b, requires_grad=True)
    BiasGELU("none", keep_slope=False)(rx, rb).backward(g)
    np.testing.assert_array_equal(tx.grad.numpy(), rx.grad.numpy())
    np.testing.assert_array_equal(tb.grad.numpy(), rb.grad.numpy())


def test_bias_gelu_computes_only_the_requested_grads():
    x, b, g = _bias_inputs((3, 4), np.float32, seed=15)
    tx, tb = diagnet.tensor(x), diagnet.tensor(b, requires_grad=True)
    F.bias_gelu(tx, tb).backward(g)
    assert tx.grad is None and tb.grad.dtype == np.float32
    tx, tb = diagnet.tensor(x, requires_grad=True), diagnet.tensor(b)
    F.bias_gelu(tx, tb).backward(g)
    assert tb.grad is None and tx.grad.shape == (3, 4)


def test_bias_gelu_without_bias_is_gelu():
    x = diagnet.tensor(np.linspace(-3, 3, 12).reshape(3, 4))
    y = F.bias_gelu(x, None, approximate="tanh")
    np.testing.assert_array_equal(y.numpy(), F.gelu(x, approximate="tanh").numpy())


def test_bias_gelu_refuses_bad_input():
    x = diagnet.tensor(np.ones((2, 3), np.float32))
    b = diagnet.tensor(np.ones(3, np.float32))
    cases = [
        ((x, diagnet.tensor(np.ones(4, np.float32))), ValueError,
         r"bias_gelu: bias must have shape \(N,\) with N = x's last dim; got x of shape "
         r"\(2, 3\) and bias of shape \(4,\)"),
        ((x, diagnet.tensor(np.ones(3))), TypeError,
         "bias_gelu: bias must have x's dtype float32; got float64"),
        ((diagnet.tensor(np.ones((2, 3), np.int64)), b), TypeError,
         "bias_gelu: x must be float32 or float64; got dtype int64"),
        ((x, np.ones(3, np.float32)), TypeError, "bias_gelu: bias must be a Tensor; got ndarray"),
        ((diagnet.tensor(np.float32(1.0)), b), ValueError, "bias_gelu: bias must have shape"),
    ]
    for args, exc, message in cases:
        with pytest.raises(exc, match=message):
            F.bias_gelu(*args)
    with pytest.raises(ValueError, match="bias_gelu: approximate must be 'none' or 'tanh'; "
                                         "got 'erf'"):
        F.bias_gelu(x, b, approximate="erf")


def test_bias_gelu_refuses_input_changed_in_place_before_backward():
    x = diagnet.tensor(np.arange(12.0).reshape(3, 4), requires_grad=True)
    h = x * 1.0
    y = F.bias_gelu(h, diagnet.tensor(np.ones(4)))
    with diagnet.no_grad():
        h.add_(1.0)
    with pytest.raises(RuntimeError, match="changed in place"):
        y.sum().backward()


# ----------------------------------------------------------------------------- FeedForward

LINEAR_KINDS = ["dense", "diag", "dynadiag", "unstructured"]


def _feed_forward(kind):
    ff = FeedForward(8, 16, linear="diag" if kind == "diag" else "dense", dtype=np.float64,
                     rng=0)
    if kind in ("dynadiag", "unstructured"):
        sparsify(ff, kind, sparsity=0.5, rng=1)
    return ff


def _creators(y):
    """Every node of the graph behind ``y``."""
    seen, stack = [], [y.creator]
    while stack:
        node = stack.pop()
        if node is None or any(node is s for s in seen):
            continue
        seen.append(node)
        stack.extend(t.creator for t in node.inputs)
    return seen


@pytest.mark.parametrize("kind", LINEAR_KINDS)
def test_linear_layers_leave_the_bias_out_on_request(kind):
    layer = _feed_forward(kind).fc1
    x = diagnet.tensor(np.random.default_rng(16).standard_normal((3, 8)))
    full = layer(x).numpy()
    np.testing.assert_allclose(layer(x, add_bias=False).numpy() + layer.bias.numpy(), full,
                               **F64_TOL)


@pytest.mark.parametrize("kind", LINEAR_KINDS)
def test_feed_forward_fuses_the_bias_into_gelu(kind):
    """Same values and gradients as ``fc2(gelu(fc1(x)))``, one BiasGELU node, and the same
    parameters and state dict keys."""
    ff = _feed_forward(kind)
    keys = list(ff.state_dict())
    assert {"fc1.bias", "fc2.bias"} <= set(keys)
    x = np.random.default_rng(17).standard_normal((2, 3, 8))
    tx = diagnet.tensor(x, requires_grad=True)
    y = ff(tx)
    assert [type(n).__name__ for n in _creators(y)].count("BiasGELU") == 1
    y.sum().backward()
    got = [tx.grad.numpy()] + [p.grad.numpy() for p in ff.parameters() if p.grad is not None]
    for p in ff.parameters():
        p.grad = None
    tx2 = diagnet.tensor(x, requires_grad=True)
    ff.fc2(F.gelu(ff.fc1(tx2))).sum().backward()
    want = [tx2.grad.numpy()] + [p.grad.numpy() for p in ff.parameters() if p.grad is not None]
    np.testing.assert_allclose(y.numpy(), ff.fc2(F.gelu(ff.fc1(tx2))).numpy(), **F64_TOL)
    assert len(got) == len(want)
    for a, r in zip(got, want):
        np.testing.assert_allclose(a, r, **F64_GRAD_TOL)
    assert list(ff.state_dict()) == keys


def test_feed_forward_without_fc1_bias_uses_plain_gelu():
    ff = FeedForward(4, 6, dtype=np.float64, rng=0)
    ff.fc1 = nn.Linear(4, 6, bias=False, dtype=np.float64, rng=1)
    x = diagnet.tensor(np.ones((2, 4)))
    np.testing.assert_allclose(ff(x).numpy(), ff.fc2(F.gelu(ff.fc1(x))).numpy(), **F64_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("approximate", FORMS)
def test_gelu_on_cuda_matches_the_cpu_kernels(approximate):
    x = np.random.default_rng(8).standard_normal((4, 9)) * 3
    g = np.random.default_rng(9).standard_normal((4, 9))
    cpu = diagnet.tensor(x, device="cpu", requires_grad=True)
    gpu = diagnet.tensor(x, device="cuda", requires_grad=True)
    for t in (cpu, gpu):
        F.gelu(t, approximate=approximate).backward(diagnet.tensor(g, device=t.device))
    np.testing.assert_allclose(F.gelu(gpu, approximate=approximate).numpy(),
                               F.gelu(cpu, approximate=approximate).numpy(), **F64_TOL)
    assert gpu.grad.device == "cuda"
    np.testing.assert_allclose(gpu.grad.numpy(), cpu.grad.numpy(), **F64_TOL)
