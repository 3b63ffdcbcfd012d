"""`diag_linear` (forward and gradients) and `diagonal_scores` against a dense reference.

The dense weight comes from ``tests/dense_reference.py`` (shared with
``test_sparse_format.py``): ``scipy.sparse.coo_array`` assembles it from (row, col, value)
triples computed from the convention's formulas, never through `diagnet.diag.layout`.

Tolerances: every product is compared in float64 against ``scale``, the same product taken
on absolute values (the magnitude each output element is accumulated from):
``|got - want| <= rtol * scale`` with rtol 1e-10 for float64 and 1e-4 for float32 (the rule
of ``dense_reference.assert_close``). The bias gradient (a plain batch sum) uses the same
rule. ``gradcheck`` uses its defaults (central differences in float64, ``eps=1e-6``,
``atol=1e-6``, ``rtol=1e-4``).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import diagnet
import diagnet.functional as F
from diagnet import Tensor, backend, gradcheck, no_grad, tensor
from diagnet.diag import dispatch
from diagnet.ops.diagonal import DiagLinearFunction
from dense_reference import (K_RULES, assert_close, batch_shapes, dense_reference, positions,
                             shapes)

# ----------------------------------------------------------------------------- strategies


@st.composite
def layers(draw):
    """A layer case: shape, offsets, values, bias (or None), x and dy, all from one seed."""
    m, n = draw(shapes())
    P, L = max(m, n), min(m, n)
    k_rule = draw(K_RULES)
    dtype = np.dtype(draw(st.sampled_from([np.float32, np.float64])))
    batch = draw(batch_shapes)
    with_bias = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    K = {"one": 1, "all": P}.get(k_rule) or int(rng.integers(1, P + 1))
    offsets = np.sort(rng.choice(P, size=K, replace=False)).astype(np.int64)
    values = rng.standard_normal((K, L)).astype(dtype)
    bias = rng.standard_normal(m).astype(dtype) if with_bias else None
    x = rng.standard_normal(batch + (n,)).astype(dtype)
    dy = rng.standard_normal(batch + (m,)).astype(dtype)
    return (m, n), offsets, values, bias, x, dy


# ----------------------------------------------------------------------------- properties

@given(layers())
def test_forward_matches_dense(kernel_impl, use_kernels, case):
    (m, n), offsets, values, bias, x, _ = case
    W = dense_reference((m, n), offsets, values)
    with use_kernels(kernel_impl):
        y = F.diag_linear(tensor(x), offsets, tensor(values), (m, n),
                          None if bias is None else tensor(bias))
    assert isinstance(y, Tensor) and y.dtype == values.dtype and y.shape == x.shape[:-1] + (m,)
    x64 = x.astype(np.float64)
    want = x64 @ W.T
    scale = np.abs(x64) @ np.abs(W).T
    if bias is not None:
        want = want + bias
        scale = scale + np.abs(bias.astype(np.float64))
    assert_close(y.data, want, scale, values.dtype)


@given(layers())
def test_gradients_match_dense(kernel_impl, use_kernels, case):
    (m, n), offsets, values, bias, x, dy = case
    W = dense_reference((m, n), offsets, values)
    xt = tensor(x, requires_grad=True)
    vt = tensor(values, requires_grad=True)
    bt = None if bias is None else tensor(bias, requires_grad=True)
    with use_kernels(kernel_impl):
        y = F.diag_linear(xt, offsets, vt, (m, n), bt)
        y.backward(dy)
    dtype = values.dtype
    x2 = x.reshape(-1, n).astype(np.float64)
    d2 = dy.reshape(-1, m).astype(np.float64)
    # input grad: dy @ W
    assert xt.grad.shape == x.shape and xt.grad.dtype == dtype
    assert_close(xt.grad.data.reshape(-1, n), d2 @ W, np.abs(d2) @ np.abs(W), dtype)
    # value grad: dense dy.T @ x gathered at each stored position
    G, Gabs = d2.T @ x2, np.abs(d2).T @ np.abs(x2)
    want = np.stack([G[positions((m, n), p)] for p in offsets.tolist()])
    scale = np.stack([Gabs[positions((m, n), p)] for p in offsets.tolist()])
    assert vt.grad.shape == values.shape and vt.grad.dtype == dtype
    assert_close(vt.grad.data, want, scale, dtype)
    if bias is not None:
        assert bt.grad.shape == (m,)
        assert_close(bt.grad.data, d2.sum(axis=0), np.abs(d2).sum(axis=0), dtype)


def _relu_node_and_composed(case, device="cpu"):
    """``(fused, composed)``: each a function of ``(x, values[, bias])`` tensors, the
    `DiagLinearFunction` node with ``relu=True`` and ``relu(diag_linear(...))``."""
    (m, n), offsets, _, _, _, _ = case
    offsets = backend.to_device(offsets, device)

    def fused(*a):
        return DiagLinearFunction(offsets, (m, n), relu=True)(*a)

    def composed(*a):
        return F.relu(F.diag_linear(a[0], offsets, a[1], (m, n), a[2] if len(a) > 2 else None))

    return fused, composed


def _relu_case_inputs(case, device="cpu"):
    """The case's ``(x, values[, bias])`` as tensors that require grad, and its ``dy``."""
    _, _, values, bias, x, dy = case
    arrays = [x, values] + ([] if bias is None else [bias])
    return ([tensor(backend.to_device(a, device), requires_grad=True) for a in arrays],
            backend.to_device(dy, device))


def _check_relu_node(case, device="cpu"):
    """The fused node against the composition on one case: the same forward bits, the same
    input and value gradient bits (the same masked ``dy`` goes to the same kernels), and
    the bias gradient to rounding (summed in float64 partial rows by the bias + ReLU
    kernels, by `sum_rows` in the composition)."""
    fused, composed = _relu_node_and_composed(case, device)
    results = []
    for fn in (fused, composed):
        inputs, dy = _relu_case_inputs(case, device)
        y = fn(*inputs)
        y.backward(dy)
        results.append([backend.to_numpy(y.data)] +
                       [backend.to_numpy(t.grad.data) for t in inputs])
    (y, gx, gv, *gb), (y_c, gx_c, gv_c, *gb_c) = results
    np.testing.assert_array_equal(y, y_c)
    np.testing.assert_array_equal(gx, gx_c)
    np.testing.assert_array_equal(gv, gv_c)
    if gb:
        _, _, values, _, _, dy = case
        d2 = np.abs(dy.reshape(-1, dy.shape[-1]).astype(np.float64))
        assert gb[0].dtype == values.dtype
        assert_close(gb[0], gb_c[0].astype(np.float64), d2.sum(axis=0), values.dtype)


@given(layers())
def test_relu_node_equals_relu_of_the_layer(kernel_impl, use_kernels, case):
    """`DiagLinearFunction(..., relu=True)`, the node of ``layer(x, relu=True)``: forward and
    gradients equal to ``relu(diag_linear(x, ...))`` on both CPU kernel sets."""
    with use_kernels(kernel_impl):
        _check_relu_node(case)


def _fixed_case(shape, K, dtype, with_bias, batch, seed):
    """A layer case as `layers` draws one, from fixed arguments."""
    m, n = shape
    rng = np.random.default_rng(seed)
    offsets = np.sort(rng.choice(max(m, n), size=K, replace=False)).astype(np.int64)
    values = rng.standard_normal((K, min(m, n))).astype(dtype)
    bias = rng.standard_normal(m).astype(dtype) if with_bias else None
    return ((m, n), offsets, values, bias, rng.standard_normal(batch + (n,)).astype(dtype),
            rng.standard_normal(batch + (m,)).astype(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("shape, K, dtype, with_bias, batch", [
    ((7, 4), 3, np.float64, True, (5,)), ((4, 7), 7, np.float32, True, (2, 3)),
    ((6, 6), 1, np.float64, False, (4,)), ((9, 9), 9, np.float32, True, (1,)),
    ((1, 5), 2, np.float32, False, (3,)), ((5, 1), 5, np.float64, True, (2, 2))],
    ids=lambda v: getattr(v, "__name__", str(v)))
def test_relu_node_equals_relu_of_the_layer_on_the_gpu(shape, K, dtype, with_bias, batch):
    """The same on CuPy arrays (the CUDA kernels, then ``y += bias`` and ``y *= y > 0``):
    tall, wide and square weights, one and all diagonals, with and without a bias (fixed
    cases: through the emulated GPU each one runs the kernels on the CPU)."""
    _check_relu_node(_fixed_case(shape, K, dtype, with_bias, batch, seed=sum(shape) + K), "cuda")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(128, 64), (64, 128), (96, 96)], ids=str)
def test_relu_node_on_layers_that_take_the_fused_kernels(shape, dtype):
    """Outputs of 4096 elements and more: on the CPU the backward's mask and bias sum run in
    the numba bias + ReLU kernels (`diagnet.ops.activation.bias_relu_kernels`; smaller
    outputs take the composed version), batch leftovers included (B = 67). CuPy arrays take
    the CUDA kernels at every size (the test above)."""
    m, n = shape
    _check_relu_node(_fixed_case(shape, max(m, n) // 10, dtype, True, (67,), seed=m + n))


@pytest.mark.parametrize("shape", [(7, 4), (4, 7), (5, 5)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck_relu_node(kernel_impl, use_kernels, shape, with_bias):
    m, n = shape
    P, L = max(shape), min(shape)
    rng = np.random.default_rng(m * 100 + n)
    offsets = np.sort(rng.choice(P, size=max(1, P // 2), replace=False))
    case = ((m, n), offsets, None, None, None, None)
    fused, _ = _relu_node_and_composed(case)
    inputs = [tensor(rng.standard_normal((2, 3, n)), dtype=np.float64, requires_grad=True),
              tensor(rng.standard_normal((len(offsets), L)), dtype=np.float64,
                     requires_grad=True)]
    if with_bias:
        inputs.append(tensor(rng.standard_normal(m), dtype=np.float64, requires_grad=True))
    with use_kernels(kernel_impl):
        assert gradcheck(fused, *inputs)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@given(layers())
def test_diagonal_scores_match_dense(device, case):
    """Once per array backend: the score is a dense matmul and a gather in backend-generic
    array code (`dispatch.diagonal_scores`), the same whichever CPU kernels are selected."""
    (m, n), _, values, _, x, dy = case
    scores = F.diagonal_scores(tensor(backend.to_device(x, device)),
                               backend.to_device(dy, device), m)
    P = max(m, n)
    assert backend.is_array(scores) and backend.device_of(scores) == device
    assert scores.shape == (P,) and scores.dtype == x.dtype
    scores = backend.to_numpy(scores)
    x2 = x.reshape(-1, n).astype(np.float64)
    d2 = dy.reshape(-1, m).astype(np.float64)
    G, Gabs = d2.T @ x2, np.abs(d2).T @ np.abs(x2)
    want = np.array([np.linalg.norm(G[positions((m, n), p)]) for p in range(P)])
    # each entry is within rtol * Gabs, so each norm is within rtol * ||Gabs on the diagonal||
    scale = np.array([np.linalg.norm(Gabs[positions((m, n), p)]) for p in range(P)])
    assert_close(scores, want, scale, x.dtype)


# ----------------------------------------------------------------------------- gradcheck

@pytest.mark.parametrize("shape", [(7, 4), (4, 7), (5, 5), (6, 1), (1, 6), (3, 3)])
@pytest.mark.parametrize("K", ["one", "half", "all"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck(kernel_impl, use_kernels, shape, K, with_bias):
    m, n = shape
    P, L = max(shape), min(shape)
    k = {"one": 1, "half": max(1, P // 2), "all": P}[K]
    rng = np.random.default_rng(m * 100 + n * 10 + k)
    offsets = np.sort(rng.choice(P, size=k, replace=False))
    x = tensor(rng.standard_normal((2, 3, n)), dtype=np.float64, requires_grad=True)
    values = tensor(rng.standard_normal((k, L)), dtype=np.float64, requires_grad=True)
    inputs = [x, values]
    if with_bias:
        inputs.append(tensor(rng.standard_normal(m), dtype=np.float64, requires_grad=True))
    with use_kernels(kernel_impl):
        assert gradcheck(lambda *a: F.diag_linear(a[0], offsets, a[1], (m, n),
                                                  a[2] if len(a) > 2 else None), *inputs)


def test_gradcheck_through_a_composite_graph(kernel_impl, use_kernels):
    """Two stacked layers, tanh in between, a scalar loss; offsets given as a Tensor."""
    rng = np.random.default_rng(7)
    x = tensor(rng.standard_normal((4, 6)), dtype=np.float64, requires_grad=True)
    v1 = tensor(rng.standard_normal((3, 6)), dtype=np.float64, requires_grad=True)
    v2 = tensor(rng.standard_normal((2, 5)), dtype=np.float64, requires_grad=True)
    o1 = tensor(np.array([0, 4, 8]))
    o2 = np.array([1, 5])

    def net(x, v1, v2):
        h = F.diag_linear(x, o1, v1, (9, 6)).tanh()      # (4, 6) -> (4, 9), tall
        return F.diag_linear(h, o2, v2, (5, 9))          # (4, 9) -> (4, 5), wide

    with use_kernels(kernel_impl):
        assert gradcheck(net, x, v1, v2)


# ----------------------------------------------------------------------------- behaviour

def test_only_requested_gradients_are_computed(monkeypatch):
    calls = []
    for name in ("input_grad", "value_grad", "input_and_value_grad"):
        real = getattr(dispatch, name)
        monkeypatch.setattr(dispatch, name,
                            lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    rng = np.random.default_rng(0)
    offsets = np.array([0, 2])
    x = tensor(rng.standard_normal((3, 4)))
    v = tensor(rng.standard_normal((2, 4)), requires_grad=True)
    F.diag_linear(x, offsets, v, (5, 4)).sum().backward()
    assert calls == ["value_grad"] and x.grad is None and v.grad is not None
    calls.clear()
    x.requires_grad_()
    v.requires_grad_(False)
    F.diag_linear(x, offsets, v, (5, 4)).sum().backward()
    assert calls == ["input_grad"] and x.grad is not None
    calls.clear()
    b = tensor(np.zeros(5), requires_grad=True)
    x.requires_grad_(False)
    F.diag_linear(x, offsets, v, (5, 4), b).sum().backward()
    assert calls == [] and np.all(b.grad.data == 3)
    # both wanted: one call gives both (one pass over the batch on the CPU)
    calls.clear()
    x.requires_grad_()
    v.requires_grad_()
    F.diag_linear(x, offsets, v, (5, 4)).sum().backward()
    assert calls == ["input_and_value_grad"]


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (5, 5)], ids=str)
def test_input_and_value_grad_dispatch(kernel_impl, use_kernels, shape, monkeypatch):
    """`dispatch.input_and_value_grad` equals the two separate products with either CPU
    implementation; only the numba kernels run them as one (fused) call."""
    m, n = shape
    rng = np.random.default_rng(2)
    offsets = np.array([0, 2, 4])
    values = rng.standard_normal((3, min(m, n)))
    x, dy = rng.standard_normal((7, n)), rng.standard_normal((7, m))
    with use_kernels(kernel_impl):
        impl = dispatch.implementation(dy)
        fused = []
        if kernel_impl == "numba":
            real = impl.input_and_value_grad
            monkeypatch.setattr(impl, "input_and_value_grad",
                                lambda *a: fused.append(1) or real(*a))
        gx, gv = dispatch.input_and_value_grad(dy, x, offsets, values)
        want = (dispatch.input_grad(dy, offsets, values, n), dispatch.value_grad(dy, x, offsets))
    assert fused == ([1] if kernel_impl == "numba" else [])
    np.testing.assert_allclose(gx, want[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gv, want[1], rtol=1e-12, atol=1e-12)


def test_bias_gradient_comes_from_the_fused_backward(kernel_impl, use_kernels, monkeypatch):
    """With a bias, the numba kernels give all three gradients in one call
    (`input_value_and_bias_grad`); the values are those of the separate products and the
    row sum, with either CPU implementation."""
    rng = np.random.default_rng(3)
    x_np, v_np, b_np = rng.standard_normal((9, 6)), rng.standard_normal((3, 4)), rng.standard_normal(4)
    with use_kernels(kernel_impl):
        impl = dispatch.implementation(x_np)
        calls = []
        if kernel_impl == "numba":
            real = impl.input_value_and_bias_grad
            monkeypatch.setattr(impl, "input_value_and_bias_grad",
                                lambda *a: calls.append(1) or real(*a))
        x, v, b = (tensor(a, requires_grad=True) for a in (x_np, v_np, b_np))
        y = F.diag_linear(x, [0, 1, 5], v, (4, 6), b)
        gy = rng.standard_normal(y.shape)
        y.backward(tensor(gy))
        want = (dispatch.input_grad(gy, np.array([0, 1, 5]), v_np, 6),
                dispatch.value_grad(gy, x_np, np.array([0, 1, 5])))
    assert calls == ([1] if kernel_impl == "numba" else [])
    np.testing.assert_allclose(x.grad.numpy(), want[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(v.grad.numpy(), want[1], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(b.grad.numpy(), gy.sum(axis=0), rtol=1e-12, atol=1e-12)


def test_no_graph_under_no_grad_and_without_grad_inputs():
    v = tensor(np.ones((1, 3)), requires_grad=True)
    with no_grad():
        y = F.diag_linear(tensor(np.ones((2, 3))), [0], v, (3, 3))
    assert not y.requires_grad and y.creator is None
    y = F.diag_linear(tensor(np.ones((2, 3))), [0], tensor(np.ones((1, 3))), (3, 3))
    assert not y.requires_grad
    y = F.diag_linear(tensor(np.ones((2, 3))), [0], v, (3, 3))
    assert y.requires_grad and isinstance(y.creator, DiagLinearFunction)


def test_one_dimensional_input_and_constant_arrays():
    rng = np.random.default_rng(1)
    offsets, values = np.array([1, 3]), rng.standard_normal((2, 4)).astype(np.float32)
    W = dense_reference((6, 4), offsets, values)
    x = rng.standard_normal(4).astype(np.float32)
    y = F.diag_linear(tensor(x), offsets, values, (6, 4))     # values as a plain array
    assert y.shape == (6,)
    np.testing.assert_allclose(y.data, W @ x, rtol=1e-5, atol=1e-6)
    y2 = F.diag_linear(x, offsets, tensor(values), (6, 4), bias=[1, 2, 3, 4, 5, 6])
    np.testing.assert_allclose(y2.data, W @ x + np.arange(1, 7), rtol=1e-5, atol=1e-5)


def test_empty_offsets_give_zero_output_and_grads():
    x = tensor(np.ones((2, 4)), requires_grad=True)
    v = tensor(np.zeros((0, 3)), requires_grad=True)
    y = F.diag_linear(x, np.zeros(0, dtype=np.int64), v, (3, 4))
    assert y.shape == (2, 3) and np.all(y.data == 0)
    y.sum().backward()
    assert np.all(x.grad.data == 0) and v.grad.shape == (0, 3)


def test_agrees_with_diagmatrix_products():
    W = diagnet.DiagMatrix.random((11, 7), k=4, rng=2, dtype=np.float64)
    x = np.random.default_rng(3).standard_normal((5, 7))
    y = F.diag_linear(tensor(x), W.offsets, tensor(W.values), (11, 7))
    np.testing.assert_allclose(y.data, x @ W.T, rtol=1e-12, atol=1e-12)


def test_exports():
    from diagnet import ops

    assert F.diag_linear is ops.diag_linear
    assert F.diagonal_scores is ops.diagonal_scores
    assert "diag_linear" in F.__all__ and "diagonal_scores" in F.__all__
    assert ops.DiagLinearFunction is DiagLinearFunction


# ----------------------------------------------------------------------------- validation

def _args(**over):
    rng = np.random.default_rng(0)
    args = dict(x=tensor(rng.standard_normal((3, 4)), dtype=np.float32), offsets=np.array([0, 2]),
                values=tensor(rng.standard_normal((2, 4)), dtype=np.float32, requires_grad=True),
                shape=(6, 4), bias=None)
    args.update(over)
    return args


@pytest.mark.parametrize("over, exc, message", [
    (dict(offsets=np.array([2, 0])), ValueError,
     r"offsets must be sorted in increasing order; got offsets\[0\] = 2 before offsets\[1\] = 0"),
    (dict(offsets=np.array([2, 2])), ValueError, r"offsets must be unique; got the value 2 twice"),
    (dict(offsets=np.array([0, 6])), ValueError,
     r"offsets must lie in \[0, P\) = \[0, 6\) for shape \(6, 4\).*got offsets\[1\] = 6"),
    (dict(offsets=np.array([0.0, 2.0])), TypeError,
     r"offsets must have an integer dtype.*got dtype float64"),
    (dict(values=tensor(np.ones((2, 3)), dtype=np.float32)), ValueError,
     r"values must have shape \(K, L\) = \(2, 4\).*got shape \(2, 3\)"),
    (dict(values=tensor(np.ones((3, 4)), dtype=np.float32)), ValueError,
     r"values must have shape \(K, L\) = \(2, 4\).*got shape \(3, 4\)"),
    (dict(values=tensor(np.ones((2, 4)), dtype=np.float64)), TypeError,
     r"diag_linear: x has dtype float32 but values has dtype float64"),
    (dict(bias=tensor(np.ones(6), dtype=np.float64)), TypeError,
     r"diag_linear: bias has dtype float64 but values has dtype float32"),
    (dict(bias=tensor(np.ones(4), dtype=np.float32)), ValueError,
     r"bias must have shape \(out_features,\) = \(6,\); got \(4,\)"),
    (dict(x=tensor(np.ones((3, 4)), dtype=np.int64)), TypeError,
     r"diag_linear: x must be float32 or float64; got dtype int64"),
    (dict(shape=(0, 4)), ValueError, r"shape \(out_features, in_features\) must be two positive ints; got \(0, 4\)"),
    (dict(shape=(6.0, 4)), TypeError, r"shape \(out_features, in_features\)\[0\] must be an int; got float 6.0"),
    (dict(shape=6), TypeError, r"shape must be the weight's full shape \(out_features, in_features\); got the int 6"),
    (dict(shape=(6, 4, 1)), ValueError, r"must be a tuple \(m, n\) of two positive ints; got 3 entries"),
    (dict(offsets=np.array([[0, 2]])), ValueError, r"offsets must be 1-D with shape \(K,\)"),
    (dict(x=tensor(np.ones((3, 4)), dtype=np.float32), values=np.ones((2, 4), dtype=np.int64)),
     TypeError, r"values must be float32 or float64; got dtype int64"),
])
def test_validation_messages(over, exc, message):
    with pytest.raises(exc, match=message):
        F.diag_linear(**_args(**over))


def test_x_width_must_match_in_features():
    """A wide weight's values are (K, m) whatever n is: only the stated shape catches a wrong
    input width (before, a (4, 10) weight silently ran against a (4, 12) x)."""
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., in_features\) = "
                                         r"\(\.\.\., 4\) for a weight of shape \(6, 4\); "
                                         r"got x of shape \(3, 5\)"):
        F.diag_linear(**_args(x=tensor(np.ones((3, 5)), dtype=np.float32)))
    rng = np.random.default_rng(0)
    v = tensor(rng.standard_normal((2, 4)), dtype=np.float32)
    with pytest.raises(ValueError, match=r"\(\.\.\., 10\) for a weight of shape \(4, 10\); "
                                         r"got x of shape \(2, 12\)"):
        F.diag_linear(tensor(np.ones((2, 12)), dtype=np.float32), [0, 3], v, (4, 10))


def test_diagonal_scores_validation():
    x, dy = np.ones((2, 3, 4)), np.ones((2, 3, 5))
    assert F.diagonal_scores(x, dy).shape == (5,)
    with pytest.raises(ValueError, match="must share their leading dims"):
        F.diagonal_scores(x, np.ones((3, 5)))
    with pytest.raises(ValueError, match=r"dy must have shape \(\.\.\., out_features\) = "
                                         r"\(\.\.\., 6\)"):
        F.diagonal_scores(x, dy, 6)
    with pytest.raises(TypeError, match="x has dtype float32 but dy has dtype float64"):
        F.diagonal_scores(x.astype(np.float32), dy)
