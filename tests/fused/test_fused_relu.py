"""Bias + ReLU (`F.bias_relu`): its compiled CPU kernels (`diagnet.fused.relu`) against the
composed reference, and the linear + bias + ReLU of `MLP`.

The reference is the array code of `diagnet.ops.activation.BiasReLU`, selected with
``DIAGNET_CPU_KERNELS=reference`` (the `use_kernels` fixture). The kernels do the
reference's arithmetic (``h = x + bias`` rounded to the dtype, ``h * (h > 0)``, ``gy * (h >
0)``), so values and input gradients agree bit for bit in both dtypes, NaN and infinities
included; only the bias gradient, a sum over the rows in another order (in float64), differs
by rounding. The CUDA kernels are checked in ``test_fused_relu_cuda.py``.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest

import diagnet
from diagnet import functional as F
from diagnet.dst import sparsify
from diagnet.gradcheck import gradcheck
from diagnet.models import MLP
from diagnet.ops import activation
from diagnet.ops.activation import BiasReLU
from helpers import away_from_zero
from tolerances import F64_GRAD_TOL, F64_TOL, GRADCHECK_TOL

# rows of width 1, odd widths, 3-d, one array past the parallel threshold, empty ones
SHAPES = [(1,), (7,), (3, 1), (5, 33), (2, 3, 4), (300, 257), (0, 4), (3, 0)]


@pytest.fixture(autouse=True)
def kernels_at_every_size(monkeypatch):
    """The tests here check the kernels on small shapes too: no size takes the composed
    path unless asked (`test_small_arrays_take_the_composed_path`)."""
    monkeypatch.setattr(activation, "BIAS_RELU_KERNEL_MIN_ELEMENTS", 0)
SPECIAL = [0.0, -0.0, 1e-30, -1e-30, 5.0, -5.0, np.inf, -np.inf, np.nan]


def _inputs(shape, dtype, seed, special=True):
    """x (with `SPECIAL` values first), bias and an output gradient, of ``dtype``."""
    rng = np.random.default_rng([seed, *shape])
    x = 3.0 * rng.standard_normal(shape)
    if special:
        flat = x.reshape(-1)
        flat[:len(SPECIAL)] = SPECIAL[:flat.size]
    return (x.astype(dtype), rng.standard_normal(shape[-1:]).astype(dtype),
            rng.standard_normal(shape).astype(dtype))


def _bias_relu_and_grads(x, b, g):
    tx = diagnet.tensor(x, requires_grad=True)
    tb = diagnet.tensor(b, requires_grad=True)
    y = F.bias_relu(tx, tb)
    y.backward(g)
    return y.numpy(), tx.grad.numpy(), tb.grad.numpy()


def _bias_grad_bound(gx64, rtol):
    """The scaled rule for a sum over rows: ``rtol`` times the sum of the terms' magnitudes."""
    return rtol * np.abs(gx64).sum(axis=tuple(range(gx64.ndim - 1)))


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bias_relu_kernels_match_the_reference(shape, dtype, use_kernels):
    x, b, g = _inputs(shape, dtype, seed=1)
    with np.errstate(all="ignore"):  # inf * 0 at -inf: NaN in both
        y, gx, gb = _bias_relu_and_grads(x, b, g)
        with use_kernels("reference"):
            y_ref, gx_ref, gb_ref = _bias_relu_and_grads(x, b, g)
    assert y.shape == gx.shape == shape and gb.shape == shape[-1:]
    assert y.dtype == gx.dtype == gb.dtype == dtype
    np.testing.assert_array_equal(y, y_ref)  # the same arithmetic: the same bits
    np.testing.assert_array_equal(gx, gx_ref)
    finite = np.isfinite(gx_ref).all(axis=tuple(range(gx_ref.ndim - 1)))
    np.testing.assert_array_equal(np.isnan(gb), np.isnan(gb_ref))
    bound = _bias_grad_bound(gx_ref.astype(np.float64), 1e-12 if dtype == np.float64 else 1e-6)
    assert np.all(np.abs(gb - gb_ref)[finite] <= bound[finite])


def test_bias_relu_follows_relu_at_zero_nan_and_infinities():
    """``relu(x + b)`` is ``h * (h > 0)``: NaN stays NaN, ``-inf`` gives NaN (``-inf * 0``),
    and the gradient is 0 at 0."""
    h = np.array([[0.0, -0.0, 2.0, -2.0, np.inf, -np.inf, np.nan]])
    for kernels in ("numba", "reference"):
        with diagnet.settings.override(cpu_kernels=kernels), np.errstate(all="ignore"):
            y, gx, gb = _bias_relu_and_grads(h, np.zeros(7), np.ones((1, 7)))
            np.testing.assert_array_equal(y, F.relu(diagnet.tensor(h)).numpy())
        np.testing.assert_array_equal(y, [[0.0, 0.0, 2.0, 0.0, np.inf, np.nan, np.nan]])
        np.testing.assert_array_equal(gx, [[0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0]])
        np.testing.assert_array_equal(gb, gx[0])


@pytest.mark.parametrize("shape", [(4,), (3, 5), (2, 2, 3)], ids=str)
def test_bias_relu_gradcheck(shape):
    rng = np.random.default_rng(2)
    b = rng.standard_normal(shape[-1:])
    x = away_from_zero(rng, shape) - b  # x + b away from the kink at 0
    tx = diagnet.tensor(x, requires_grad=True)
    tb = diagnet.tensor(b, requires_grad=True)
    assert gradcheck(F.bias_relu, tx, tb, **GRADCHECK_TOL)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bias_relu_bias_grad_is_the_same_on_one_thread_and_many(dtype):
    """The row tasks are fixed by the shape, so the serial and the parallel path add the
    same partial sums in the same order: the same bits."""
    from diagnet.fused import relu as kernels

    x, b, g = _inputs((300, 257), dtype, seed=3, special=False)
    assert x.size >= kernels._SERIAL_ELEMENTS
    y = kernels.bias_relu(x, b)
    first = kernels.bias_relu_grad(y, g)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        np.testing.assert_array_equal(kernels.bias_relu(x, b), y)
        serial = kernels.bias_relu_grad(y, g)
    finally:
        numba.set_num_threads(threads)
    for a, c in zip(first, serial):
        np.testing.assert_array_equal(a, c)


def test_bias_relu_computes_only_the_requested_grads(use_kernels):
    x, b, g = _inputs((3, 4), np.float32, seed=4, special=False)
    for kernels in ("numba", "reference"):
        with use_kernels(kernels):
            tx, tb = diagnet.tensor(x), diagnet.tensor(b, requires_grad=True)
            F.bias_relu(tx, tb).backward(g)
            assert tx.grad is None and tb.grad.dtype == np.float32
            tx, tb = diagnet.tensor(x, requires_grad=True), diagnet.tensor(b)
            F.bias_relu(tx, tb).backward(g)
            assert tb.grad is None and tx.grad.shape == (3, 4)
            np.testing.assert_array_equal(tx.grad.numpy(), g * (x + b > 0))


def test_bias_relu_without_bias_is_relu():
    x = diagnet.tensor(np.linspace(-3, 3, 12).reshape(3, 4), requires_grad=True)
    y = F.bias_relu(x, None)
    assert type(y.creator).__name__ == "ReLU"
    np.testing.assert_array_equal(y.numpy(), F.relu(x).numpy())


def test_bias_relu_takes_the_kernels_for_numpy_floats_only(use_kernels):
    from diagnet.fused import relu as kernels

    for dtype in (np.float32, np.float64):
        fn = BiasReLU()
        fn(diagnet.tensor(np.ones((2, 3), dtype=dtype)), diagnet.tensor(np.ones(3, dtype=dtype)))
        assert fn.kernels is kernels
    with use_kernels("reference"):
        fn = BiasReLU()
        fn(diagnet.tensor(np.ones((2, 3))), diagnet.tensor(np.ones(3)))
        assert fn.kernels is None


def test_bias_relu_kernels_take_non_contiguous_input():
    x = np.random.default_rng(5).standard_normal((6, 5))
    b = diagnet.tensor(np.arange(6.0) - 3)
    y = F.bias_relu(diagnet.tensor(x).T, b).numpy()  # a transposed view
    np.testing.assert_array_equal(y, F.bias_relu(diagnet.tensor(x.T.copy()), b).numpy())


def test_bias_relu_refuses_bad_input():
    x = diagnet.tensor(np.ones((2, 3), np.float32))
    b = diagnet.tensor(np.ones(3, np.float32))
    cases = [
        ((x, diagnet.tensor(np.ones(4, np.float32))), ValueError,
         r"bias_relu: bias must have shape \(N,\) with N = x's last dim; got x of shape "
         r"\(2, 3\) and bias of shape \(4,\)"),
        ((x, diagnet.tensor(np.ones((1, 3), np.float32))), ValueError,
         r"bias_relu: bias must have shape \(N,\) .* bias of shape \(1, 3\)"),
        ((x, diagnet.tensor(np.ones(3))), TypeError,
         "bias_relu: bias must have x's dtype float32; got float64"),
        ((diagnet.tensor(np.ones((2, 3), np.int64)), b), TypeError,
         "bias_relu: x must be float32 or float64; got dtype int64"),
        ((x, np.ones(3, np.float32)), TypeError, "bias_relu: bias must be a Tensor; got ndarray"),
        (([1.0, 2.0, 3.0], b), TypeError, "bias_relu: x must be a Tensor; got list"),
        ((diagnet.tensor(np.float32(1.0)), b), ValueError, "bias_relu: bias must have shape"),
    ]
    for args, exc, message in cases:
        with pytest.raises(exc, match=message):
            F.bias_relu(*args)


def test_bias_relu_kernel_functions_refuse_mismatched_arrays():
    """The O(1) checks in front of the compiled loops (which index without bounds checks)."""
    from diagnet.fused import relu as kernels

    x = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"expected x \(R, N\) and bias \(N,\); got x \(2, 3\), "
                                         r"bias \(4,\)"):
        kernels.bias_relu(x, np.ones(4, np.float32))
    with pytest.raises(ValueError, match="bias must have x's dtype float32; got float64"):
        kernels.bias_relu(x, np.ones(3))
    with pytest.raises(ValueError, match=r"gy must have y's shape \(2, 3\); got \(3, 2\)"):
        kernels.bias_relu_grad(x, x.T)
    with pytest.raises(ValueError, match=r"expected a 2-d float32 or float64 y; got int64 "
                                         r"of shape \(2, 3\)"):
        kernels.bias_relu_grad(np.ones((2, 3), np.int64), x)


def test_bias_relu_refuses_output_changed_in_place_before_backward():
    """The kernels' backward reads the output (``y > 0`` is the mask): changing it in place
    must be caught, as for any saved array."""
    x = diagnet.tensor(np.arange(12.0).reshape(3, 4) - 6, requires_grad=True)
    y = F.bias_relu(x, diagnet.tensor(np.ones(4)))
    with diagnet.no_grad():
        y.mul_(0.0)
    with pytest.raises(RuntimeError, match="changed in place"):
        y.sum().backward()


# ----------------------------------------------------------------------------- MLP

LINEAR_KINDS = ["dense", "diag", "dynadiag", "unstructured"]


def _mlp(kind, activation="relu", dropout=0.0, bias=True):
    model = MLP(12, [10, 8], 3, linear="diag" if kind == "diag" else "dense", sparsity=0.5,
                activation=activation, dropout=dropout, bias=bias, dtype=np.float64, rng=0)
    if kind in ("dynadiag", "unstructured"):
        sparsify(model, kind, sparsity=0.5, dense=["head"], rng=1)
    return model


def _composed(model, x):
    """The MLP's forward as the plain layers compose it: ``head(features(x))``."""
    return model.head(model.features(x))


def _creator_names(y):
    seen, stack = [], [y.creator]
    while stack:
        node = stack.pop()
        if node is None or any(node is s for s in seen):
            continue
        seen.append(node)
        stack.extend(t.creator for t in node.inputs)
    return [type(n).__name__ for n in seen]


def _forward_backward(model, forward, x):
    """Output, the names of its graph's nodes, and the input and parameter gradients of
    ``forward(model, x).sum()``."""
    for p in model.parameters():
        p.grad = None
    tx = diagnet.tensor(x, requires_grad=True)
    y = forward(model, tx)
    names = _creator_names(y)  # before the backward frees the graph
    y.sum().backward()
    return y, names, [tx.grad.numpy()] + [p.grad.numpy() for p in model.parameters()
                                          if p.grad is not None]


@pytest.mark.parametrize("kind", LINEAR_KINDS)
def test_mlp_fuses_each_hidden_bias_into_relu(kind):
    """Same values and gradients as the composed ``relu(layer(x))`` path, the ReLU fused
    into each hidden layer's node (diagonal) or into one BiasReLU node after it (others),
    and the same modules and state dict keys."""
    model = _mlp(kind)
    keys, modules = list(model.state_dict()), [type(m) for m in model.features]
    x = np.random.default_rng(6).standard_normal((5, 12))
    y, names, got = _forward_backward(model, MLP.__call__, x)
    fused_in = "DiagLinearFunction" if kind in ("diag", "dynadiag") else "BiasReLU"
    assert names.count(fused_in) == 2 and "ReLU" not in names
    assert kind in ("diag", "dynadiag") or "DiagLinearFunction" not in names
    if fused_in == "DiagLinearFunction":
        assert "BiasReLU" not in names
    y_ref, _, want = _forward_backward(model, _composed, x)
    np.testing.assert_allclose(y.numpy(), y_ref.numpy(), **F64_TOL)
    assert len(got) == len(want) == len(list(model.parameters())) + 1
    for a, r in zip(got, want):
        np.testing.assert_allclose(a, r, **F64_TOL)
    assert list(model.state_dict()) == keys
    assert [type(m) for m in model.features] == modules


@pytest.mark.parametrize("activation,dropout,bias", [("gelu", 0.0, True), ("tanh", 0.0, True),
                                                     ("relu", 0.0, False)])
def test_mlp_without_relu_after_a_biased_linear_runs_the_layers(activation, dropout, bias):
    model = _mlp("diag", activation, dropout, bias)
    x = np.random.default_rng(7).standard_normal((4, 12))
    y, names, got = _forward_backward(model, MLP.__call__, x)
    assert "BiasReLU" not in names
    y_ref, _, want = _forward_backward(model, _composed, x)
    np.testing.assert_array_equal(y.numpy(), y_ref.numpy())
    for a, r in zip(got, want):
        np.testing.assert_array_equal(a, r)


def test_mlp_with_dropout_fuses_and_draws_the_same_masks():
    model = _mlp("diag", dropout=0.3)
    x = np.random.default_rng(8).standard_normal((6, 12))
    diagnet.manual_seed(9)
    y, names, got = _forward_backward(model, MLP.__call__, x)
    assert names.count("DiagLinearFunction") == 2 and "ReLU" not in names
    diagnet.manual_seed(9)
    y_ref, _, want = _forward_backward(model, _composed, x)
    np.testing.assert_allclose(y.numpy(), y_ref.numpy(), **F64_TOL)
    for a, r in zip(got, want):
        np.testing.assert_allclose(a, r, **F64_TOL)


def test_mlp_linear_hooks_see_the_output_without_the_bias():
    """As documented: a hidden linear with forward hooks runs with ``add_bias=False`` (its
    ReLU in a BiasReLU node), so that the hook sees the layer's own output, before the
    ReLU; the layer without hooks keeps its ReLU in its own node."""
    model = _mlp("diag")
    seen = []
    model.features[0].register_forward_hook(lambda m, inputs, out: seen.append(out.numpy()))
    x = np.random.default_rng(10).standard_normal((2, 12))
    y, names, _ = _forward_backward(model, MLP.__call__, x)
    layer = model.features[0]
    np.testing.assert_allclose(seen[0] + layer.bias.numpy(),
                               layer(diagnet.tensor(x)).numpy(), **F64_TOL)
    assert names.count("BiasReLU") == 1 and names.count("DiagLinearFunction") == 2
    y_ref, _, _ = _forward_backward(model, _composed, x)
    np.testing.assert_allclose(y.numpy(), y_ref.numpy(), **F64_TOL)


def test_diag_linear_relu_argument_must_be_a_bool():
    layer = _mlp("diag").features[0]
    x = diagnet.tensor(np.zeros((2, 12)))
    with pytest.raises(TypeError, match="relu must be a bool; got int"):
        layer(x, relu=1)


def test_mlp_fused_float32_step_matches_the_composed_one():
    model = MLP(784, [256, 256], 10, linear="diag", sparsity=0.9, rng=0)
    x = np.random.default_rng(11).standard_normal((64, 784)).astype(np.float32)
    y, _, got = _forward_backward(model, MLP.__call__, x)
    y_ref, _, want = _forward_backward(model, _composed, x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y.numpy(), y_ref.numpy(), rtol=1e-5, atol=1e-6)
    for a, r in zip(got, want):
        np.testing.assert_allclose(a, r, **dict(rtol=1e-4, atol=1e-5))


@pytest.mark.gpu
def test_bias_relu_on_cuda_matches_the_cpu_kernels():
    x, b, g = _inputs((4, 9), np.float64, seed=12, special=False)
    results = []
    for device in ("cpu", "cuda"):
        tx = diagnet.tensor(x, device=device, requires_grad=True)
        tb = diagnet.tensor(b, device=device, requires_grad=True)
        y = F.bias_relu(tx, tb)
        y.backward(diagnet.tensor(g, device=device))
        assert tx.grad.device == tb.grad.device == device
        results.append((y.numpy(), tx.grad.numpy(), tb.grad.numpy()))
    for a, c in zip(*results):
        np.testing.assert_allclose(a, c, **F64_GRAD_TOL)


def test_small_arrays_take_the_composed_path(monkeypatch):
    """Below `BIAS_RELU_KERNEL_MIN_ELEMENTS` NumPy arrays take the composed reference (a
    compiled call costs more there); from it on, the numba kernels."""
    monkeypatch.setattr(activation, "BIAS_RELU_KERNEL_MIN_ELEMENTS", 4096)
    assert activation.bias_relu_kernels(np.zeros((1, 256), np.float32)) is None
    assert activation.bias_relu_kernels(np.zeros((15, 256), np.float32)) is None
    assert activation.bias_relu_kernels(np.zeros((16, 256), np.float32)) is not None
