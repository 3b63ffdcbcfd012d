"""Every differentiable op gradchecked in float64 against central finite differences.

One table (`CASES`) lists op x shapes; one parametrized test (`test_gradcheck`) runs
`diagnet.gradcheck` over it with the tolerances of ``helpers.GRADCHECK_TOL``. Inputs are
drawn away from the kinks of relu/abs/max/clip/maximum (a finite difference across a kink
measures nothing); the behaviour *at* the kinks and at ties is tested separately below with
exact expected gradients. The same table runs on CUDA at the end of the module when CuPy
and a device are available.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest

import diagnet
from diagnet import functional as F
from helpers import away_from_zero, distinct, t64
from tolerances import GRADCHECK_TOL


# ----------------------------------------------------------------------------- the table

@dataclass
class Case:
    """One gradcheck: ``fn(*tensors)`` on the arrays returned by ``make(rng)``.

    ``grad`` says which inputs require grad (default: all); the others are constants.
    """

    fn: Callable
    make: Callable
    grad: tuple | None = None
    tol: dict = field(default_factory=lambda: dict(GRADCHECK_TOL))


CASES: dict[str, Case] = {}


def add_case(name, fn, make, grad=None, tol=None):
    assert name not in CASES, name
    CASES[name] = Case(fn, make, grad, tol or dict(GRADCHECK_TOL))


def normal(scale=1.0):
    return lambda rng, shape: scale * rng.standard_normal(shape)


def uniform(lo, hi):
    return lambda rng, shape: rng.uniform(lo, hi, size=shape)


def nonzero(rng, shape):
    return away_from_zero(rng, shape)


def clip_grid(rng, shape):
    # values on the grid 0.3 k + 0.05: at least 0.05 away from lo=-0.4 and hi=0.5
    return rng.integers(-4, 5, size=shape) * 0.3 + 0.05


# --- unary element-wise ops x shapes
UNARY_SHAPES = [(), (5,), (2, 3), (2, 1, 3)]
UNARY = {
    "neg": (lambda x: -x, normal()),
    "neg_fn": (F.neg, normal()),
    "exp": (F.exp, normal()),
    "log": (F.log, uniform(0.5, 2.0)),
    "sqrt": (F.sqrt, uniform(0.5, 2.0)),
    "tanh": (F.tanh, normal()),
    "sigmoid": (F.sigmoid, normal(2.0)),
    "log_sigmoid": (F.log_sigmoid, normal(3.0)),
    "log_sigmoid_wide": (F.log_sigmoid, uniform(-40.0, 40.0)),  # far into both tails
    "relu": (F.relu, nonzero),
    "gelu_erf": (F.gelu, normal(2.0)),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), normal(2.0)),
    "abs": (F.abs, nonzero),
    "pow_scalar_int": (lambda x: x ** 3, normal()),
    "pow_scalar_half": (lambda x: x ** 0.5, uniform(0.5, 2.0)),
    "pow_scalar_neg": (lambda x: F.pow(x, -2.0), nonzero),
    "pow_scalar_base": (lambda x: 2.0 ** x, normal()),
    "add_scalar": (lambda x: x + 1.5, normal()),
    "rsub_scalar": (lambda x: 3.0 - x, normal()),
    "mul_scalar": (lambda x: 2.5 * x, normal()),
    "div_scalar": (lambda x: x / 4.0, normal()),
    "rdiv_scalar": (lambda x: 2.0 / x, nonzero),
    "clip_both": (lambda x: F.clip(x, -0.4, 0.5), clip_grid),
    "clip_lo": (lambda x: x.clip(lo=-0.4), clip_grid),
    "clip_hi": (lambda x: F.clip(x, hi=0.5), clip_grid),
    "astype_f64": (lambda x: F.astype(x, "float64") * 2.0, normal()),
    "clone": (F.clone, normal()),
    "clone_method_shared": (lambda x: x.clone() * x, normal()),  # the copy and x both used
}
for _name, (_fn, _sample) in UNARY.items():
    for _shape in UNARY_SHAPES:
        add_case(f"{_name}-{_shape}", _fn, lambda rng, s=_shape, g=_sample: [g(rng, s)])

# --- binary broadcasting ops x shape pairs
BINARY_SHAPES = [((3,), (3,)), ((2, 3), (3,)), ((2, 1), (1, 3)), ((), (2, 2)),
                 ((2, 1, 3), (4, 1)), ((4, 1, 1), (1, 2, 3))]


def grid_pair(rng, sa, sb):
    # a = 0.5 k + 0.25, b = 0.5 m: |a - b| >= 0.25 everywhere, so maximum/minimum never tie
    return [rng.integers(-4, 5, size=sa) * 0.5 + 0.25, rng.integers(-4, 5, size=sb) * 0.5]


def where_inputs(rng, sa, sb):
    cond = rng.random(np.broadcast_shapes(sa, sb)) < 0.5
    return [cond, rng.standard_normal(sa), rng.standard_normal(sb)]


BINARY = {
    "add": (lambda a, b: a + b, lambda rng, sa, sb: [rng.standard_normal(sa), rng.standard_normal(sb)], None),
    "add_fn": (F.add, lambda rng, sa, sb: [rng.standard_normal(sa), rng.standard_normal(sb)], None),
    "sub": (lambda a, b: a - b, lambda rng, sa, sb: [rng.standard_normal(sa), rng.standard_normal(sb)], None),
    "mul": (lambda a, b: a * b, lambda rng, sa, sb: [rng.standard_normal(sa), rng.standard_normal(sb)], None),
    "div": (lambda a, b: a / b, lambda rng, sa, sb: [rng.standard_normal(sa), away_from_zero(rng, sb)], None),
    "pow_tensor": (lambda a, b: a ** b, lambda rng, sa, sb: [rng.uniform(0.5, 2.0, sa), rng.standard_normal(sb)], None),
    "maximum": (F.maximum, grid_pair, None),
    "minimum": (F.minimum, grid_pair, None),
    "where": (F.where, where_inputs, (False, True, True)),
}
for _name, (_fn, _make, _grad) in BINARY.items():
    for _sa, _sb in BINARY_SHAPES:
        add_case(f"{_name}-{_sa}-{_sb}", _fn, lambda rng, a=_sa, b=_sb, m=_make: m(rng, a, b), _grad)
        if _name in ("sub", "div", "pow_tensor", "maximum") and _sa != _sb:  # swap the shapes
            add_case(f"{_name}-{_sb}-{_sa}", _fn, lambda rng, a=_sb, b=_sa, m=_make: m(rng, a, b), _grad)

# only one operand requires grad (the engine must skip the other)
add_case("mul-const-rhs", lambda a, b: a * b,
         lambda rng: [rng.standard_normal((2, 3)), rng.standard_normal((3,))], (True, False))
add_case("pow-base-const", lambda a, b: a ** b,
         lambda rng: [rng.uniform(0.5, 2, (3,)), rng.standard_normal((2, 3))], (False, True))

# --- matmul: 1-D, 2-D and batched with broadcasting of batch dims
MATMUL_SHAPES = [((3,), (3,)), ((3,), (3, 4)), ((2, 3), (3,)), ((2, 3), (3, 4)),
                 ((2, 2, 3), (3, 4)), ((3,), (2, 3, 4)), ((2, 3, 4), (4,)),
                 ((2, 1, 2, 3), (3, 3, 2)), ((4, 2, 3), (4, 3, 1)), ((1, 2, 3), (2, 3, 2))]
for _sa, _sb in MATMUL_SHAPES:
    add_case(f"matmul-{_sa}-{_sb}", F.matmul,
             lambda rng, a=_sa, b=_sb: [rng.standard_normal(a), rng.standard_normal(b)])
add_case("matmul-operator", lambda a, b: a @ b,
         lambda rng: [rng.standard_normal((2, 3)), rng.standard_normal((3, 2))])

# --- reductions
REDUCE_AXES = {(4,): [None, 0, -1, (0,)],
               (2, 3, 4): [None, 0, 1, -1, (0, 2), (2, 0), (0, 1, 2)]}
for _shape, _axes in REDUCE_AXES.items():
    for _axis in _axes:
        for _keep in (False, True):
            sfx = f"{_shape}-axis{_axis}-keep{_keep}".replace(" ", "")
            add_case(f"sum-{sfx}", lambda x, a=_axis, k=_keep: F.sum(x, a, k),
                     lambda rng, s=_shape: [rng.standard_normal(s)])
            add_case(f"mean-{sfx}", lambda x, a=_axis, k=_keep: x.mean(axis=a, keepdims=k),
                     lambda rng, s=_shape: [rng.standard_normal(s)])
            add_case(f"max-{sfx}", lambda x, a=_axis, k=_keep: x.max(axis=a, keepdims=k),
                     lambda rng, s=_shape: [distinct(rng, s)])
            add_case(f"min-{sfx}", lambda x, a=_axis, k=_keep: F.min(x, axis=a, keepdims=k),
                     lambda rng, s=_shape: [distinct(rng, s)])
            add_case(f"var-{sfx}", lambda x, a=_axis, k=_keep: F.var(x, axis=a, keepdims=k),
                     lambda rng, s=_shape: [rng.standard_normal(s)])
            if not _keep:
                add_case(f"var-ddof1-{sfx}", lambda x, a=_axis: x.var(axis=a, ddof=1),
                         lambda rng, s=_shape: [rng.standard_normal(s)])
add_case("sum-scalar", lambda x: x.sum(), lambda rng: [rng.standard_normal(())])
# argmax has no gradient: it must leave the graph of what it indexes intact (distinct
# values, so that a 1e-6 perturbation never moves the argmax)
add_case("argmax-gather", lambda x: x[np.arange(3), F.argmax(x, axis=1)] * 2.0,
         lambda rng: [distinct(rng, (3, 4))])
add_case("argmax-scale", lambda x: x * x.argmax(axis=0, keepdims=True),
         lambda rng: [distinct(rng, (3, 4))])
add_case("numel", lambda x: x.sum() / F.numel(x), lambda rng: [rng.standard_normal((2, 3))])
add_case("numel-method", lambda x: x * x.numel(), lambda rng: [rng.standard_normal((4,))])

# --- shape ops
X234 = lambda rng: [rng.standard_normal((2, 3, 4))]  # noqa: E731
for _shape in [(6, 4), (-1,), (4, -1, 2), (24,), (1, 2, 12, 1)]:
    add_case(f"reshape-{_shape}", lambda x, s=_shape: x.reshape(*s), X234)
add_case("reshape-tuple", lambda x: F.reshape(x, (3, 8)), X234)
add_case("flatten", lambda x: x.flatten(1), X234)
for _axes in [None, (1, 0, 2), (2, 0, 1), (-1, 0, 1), (0, 1, 2)]:
    add_case(f"transpose-{_axes}", lambda x, a=_axes: F.transpose(x, a) if a else F.transpose(x), X234)
add_case("permute", lambda x: x.permute(2, 1, 0), X234)
add_case("permute_fn", lambda x: F.permute(x, (1, 2, 0)), X234)
add_case("T-2d", lambda x: x.T, lambda rng: [rng.standard_normal((2, 3))])
for _dim in (0, 1, 3, -1, -4):
    add_case(f"unsqueeze-{_dim}", lambda x, d=_dim: F.unsqueeze(x, d), X234)
add_case("unsqueeze-method", lambda x: x.unsqueeze(1).sum(axis=2), X234)
X2131 = lambda rng: [rng.standard_normal((2, 1, 3, 1))]  # noqa: E731
for _dim in (None, 1, -1, (1, 3)):
    add_case(f"squeeze-{_dim}".replace(" ", ""), lambda x, d=_dim: F.squeeze(x, d), X2131)
add_case("squeeze-method", lambda x: x.squeeze() * 2.0, X2131)
for _src, _dst in [((3,), (2, 3)), ((2, 1), (2, 3)), ((1, 3), (4, 2, 3)), ((), (2, 2)),
                   ((2, 1, 3), (2, 4, 3)), ((2, 3), (2, 3))]:
    add_case(f"broadcast_to-{_src}-{_dst}", lambda x, d=_dst: F.broadcast_to(x, d),
             lambda rng, s=_src: [rng.standard_normal(s)])

X453 = lambda rng: [rng.standard_normal((4, 5, 3))]  # noqa: E731
INDICES = {
    "int": 1,
    "negint": -1,
    "slice": slice(1, 3),
    "negstep": slice(None, None, -1),
    "negstep2-int": (slice(None, None, -2), 1),
    "none": (None, 2),
    "ellipsis": (Ellipsis, 1),
    "int-ellipsis-none": (1, Ellipsis, None),
    "slices-mixed": (slice(0, 4, 2), slice(None), slice(2, None, -1)),
    "ints-all": (1, 2, 0),
    "np-integer": np.int64(2),
    "empty-tuple": (),
    "slice-none-ellipsis-int": (slice(0, 4, 3), None, Ellipsis, 2),
    "intarray-repeats": [0, 0, 2, 0],
    "intarray-pair": ([0, 2, 2], [1, 1, 4]),
    "intarray-slice": (np.array([3, 3, 0]), slice(None), slice(None, None, -1)),
    "negative-intarray": (np.array([-1, -1]),),
    "boolmask-2d": np.array([[True, False, True, False, True]] * 2 + [[False] * 5] + [[True] * 5]),
    "boolmask-1d": np.array([True, False, True, True]),
    "boolmask-tensor": diagnet.tensor(np.array([False, True, True, False])),
}
for _name, _index in INDICES.items():
    add_case(f"getitem-{_name}", lambda x, i=_index: x[i], X453)
add_case("getitem-fn", lambda x: F.getitem(x, (slice(None), 2)), X453)

for _axis in (0, 1, -1):
    add_case(f"concatenate-axis{_axis}", lambda a, b, c, ax=_axis: F.concatenate([a, b, c], axis=ax),
             lambda rng, ax=_axis: [rng.standard_normal(s) for s in
                                    ([(2, 3), (1, 3), (3, 3)] if ax == 0 else [(2, 1), (2, 3), (2, 2)])])
    add_case(f"stack-axis{_axis}", lambda a, b, c, ax=_axis: F.stack([a, b, c], axis=ax),
             lambda rng: [rng.standard_normal((2, 3)) for _ in range(3)])
add_case("concatenate-repeated-input", lambda a: F.concatenate([a, a * 2.0, a], axis=0),
         lambda rng: [rng.standard_normal((2, 2))])

# --- nn ops
for _shape, _axis in [((4,), -1), ((3, 4), -1), ((3, 4), 0), ((2, 3, 4), 1)]:
    add_case(f"softmax-{_shape}-axis{_axis}", lambda x, a=_axis: F.softmax(x, axis=a),
             lambda rng, s=_shape: [rng.standard_normal(s) * 2])
    add_case(f"log_softmax-{_shape}-axis{_axis}", lambda x, a=_axis: F.log_softmax(x, axis=a),
             lambda rng, s=_shape: [rng.standard_normal(s) * 2])
add_case("softmax-large-logits", F.softmax, lambda rng: [rng.standard_normal((3, 4)) + 500.0])

for _shape in [(4, 5), (2, 3, 5), (5,)]:
    for _red in ("mean", "sum", "none"):
        for _ls in (0.0, 0.1):
            _labels = np.random.default_rng(7).integers(0, 5, size=_shape[:-1])
            add_case(f"cross_entropy-{_shape}-{_red}-ls{_ls}",
                     lambda z, lab=_labels, r=_red, ls=_ls: F.cross_entropy(
                         z, lab, label_smoothing=ls, reduction=r),
                     lambda rng, s=_shape: [rng.standard_normal(s) * 2])
# masked logits (-inf where the mask is off, a common idiom): finite loss and gradients
_mask = np.array([[True, False, True, True], [False, True, True, False], [True, True, True, True]])
add_case("cross_entropy-masked",
         lambda z: F.cross_entropy(F.where(_mask, z, -np.inf), np.array([0, 2, 3])),
         lambda rng: [rng.standard_normal((3, 4))])
add_case("cross_entropy-masked-none",
         lambda z: F.cross_entropy(F.where(_mask, z, -np.inf), np.array([2, 1, 0]), reduction="none"),
         lambda rng: [rng.standard_normal((3, 4))])
add_case("cross_entropy-tensor-labels",
         lambda z: F.cross_entropy(z, diagnet.tensor(np.array([0, 2, 1]), device=z.device)),
         lambda rng: [rng.standard_normal((3, 3))])

for _red in ("mean", "sum", "none"):
    add_case(f"mse_loss-{_red}", lambda p, t, r=_red: F.mse_loss(p, t, reduction=r),
             lambda rng: [rng.standard_normal((3, 4)), rng.standard_normal((3, 4))])
add_case("mse_loss-const-target", lambda p, t: F.mse_loss(p, t),
         lambda rng: [rng.standard_normal((5,)), rng.standard_normal((5,))], (True, False))

# dropout: an int seed redraws the same mask on every call, so the op is a fixed function
add_case("dropout-train", lambda x: F.dropout(x, p=0.3, rng=1234),
         lambda rng: [rng.standard_normal((4, 5))])
add_case("dropout-eval", lambda x: F.dropout(x, p=0.3, training=False) * 1.0,
         lambda rng: [rng.standard_normal((4, 5))])

add_case("layer_norm-plain", lambda x: F.layer_norm(x, 5), lambda rng: [rng.standard_normal((3, 5))])
add_case("layer_norm-weight", lambda x, w: F.layer_norm(x, (5,), weight=w),
         lambda rng: [rng.standard_normal((3, 5)), rng.standard_normal(5)])
add_case("layer_norm-bias", lambda x, b: F.layer_norm(x, (5,), bias=b),
         lambda rng: [rng.standard_normal((3, 5)), rng.standard_normal(5)])
add_case("layer_norm-affine", lambda x, w, b: F.layer_norm(x, 5, w, b),
         lambda rng: [rng.standard_normal((2, 3, 5)), rng.standard_normal(5), rng.standard_normal(5)])
add_case("layer_norm-multidim", lambda x, w, b: F.layer_norm(x, (3, 4), weight=w, bias=b),
         lambda rng: [rng.standard_normal((2, 3, 4)), rng.standard_normal((3, 4)),
                      rng.standard_normal((3, 4))])
add_case("layer_norm-multidim-plain", lambda x: F.layer_norm(x, (2, 3, 4), eps=1e-3),
         lambda rng: [rng.standard_normal((2, 3, 4))])
add_case("bias_gelu-erf", F.bias_gelu,
         lambda rng: [2.0 * rng.standard_normal((2, 3, 5)), rng.standard_normal(5)])
add_case("bias_gelu-tanh", lambda x, b: F.bias_gelu(x, b, approximate="tanh"),
         lambda rng: [2.0 * rng.standard_normal((4, 5)), rng.standard_normal(5)])


def _bias_relu_inputs(shape):
    """x and bias with ``x + bias`` away from relu's kink."""
    def make(rng):
        b = rng.standard_normal(shape[-1:])
        return [away_from_zero(rng, shape) - b, b]
    return make


add_case("bias_relu-2d", F.bias_relu, _bias_relu_inputs((4, 5)))
add_case("bias_relu-3d", F.bias_relu, _bias_relu_inputs((2, 3, 5)))
add_case("bias_relu-const-bias", F.bias_relu, _bias_relu_inputs((3, 4)), (True, False))

# astype through float32 and back: the float32 round trip loses ~1e-7 relative, which a
# 1e-6 perturbation cannot resolve, so this one case uses eps=1e-3 and matching tolerances
# (the exact gradient of astype is tested in test_astype_gradient_is_cast_back).
add_case("astype-f32-roundtrip", lambda x: (x.astype("float32") * 3.0).astype("float64"),
         lambda rng: [rng.standard_normal((2, 3))], tol=dict(eps=1e-3, atol=1e-4, rtol=1e-4))

# a small composite: a 2-layer MLP with cross-entropy (several ops chained, shared inputs)
add_case("mlp-composite",
         lambda x, w1, w2: F.cross_entropy(F.gelu(x @ w1) @ w2 + (x @ w1).sum(), np.array([0, 2, 1])),
         lambda rng: [rng.standard_normal((3, 4)), rng.standard_normal((4, 5)) * 0.5,
                      rng.standard_normal((5, 3)) * 0.5])

OPS_COVERED = sorted({name.split("-")[0] for name in CASES})


def _inputs(name, case, device=None):
    """Build the case's inputs from a seed derived from its name (stable across runs)."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    arrays = case.make(rng)
    grad = case.grad or (True,) * len(arrays)
    tensors = []
    for arr, g in zip(arrays, grad):
        arr = np.asarray(arr)
        if arr.dtype == bool:
            t = diagnet.tensor(arr, device=device)
        else:
            t = diagnet.tensor(arr, dtype="float64", device=device, requires_grad=g)
        tensors.append(t)
    return tensors


@pytest.mark.parametrize("name", list(CASES))
def test_gradcheck(name):
    case = CASES[name]
    assert diagnet.gradcheck(case.fn, *_inputs(name, case), **case.tol)


def test_table_covers_every_op():
    """The table names each op of the issue at least once."""
    required = {"add", "sub", "mul", "div", "neg", "pow_tensor", "pow_scalar_int",
                "pow_scalar_base", "matmul", "sum", "mean", "max", "reshape", "transpose",
                "permute", "getitem", "concatenate", "stack", "exp", "log", "sqrt", "tanh",
                "sigmoid", "relu", "gelu_erf", "gelu_tanh", "softmax", "log_softmax",
                "cross_entropy", "mse_loss", "dropout", "layer_norm", "where", "maximum",
                "minimum", "clip_both", "abs", "astype", "argmax", "unsqueeze", "squeeze",
                "broadcast_to", "clone", "numel", "var", "min", "log_sigmoid"}
    assert required <= set(OPS_COVERED), required - set(OPS_COVERED)


def test_gradcheck_detects_a_wrong_backward():
    """The checker itself: a deliberately wrong derivative must be caught."""

    class WrongSquare(diagnet.Function):
        def forward(self, x):
            self.save(x)
            return x * x

        def backward(self, gy):
            (x,) = self.saved
            return gy * x  # should be 2 x

    x = t64([0.5, -1.0, 2.0])
    with pytest.raises(diagnet.GradcheckError, match="analytic .* numeric"):
        diagnet.gradcheck(lambda t: WrongSquare()(t), x, **GRADCHECK_TOL)


def test_gradcheck_handles_non_contiguous_inputs():
    """A transposed (non-contiguous) float64 input is perturbed correctly."""
    x = diagnet.Tensor(np.arange(6.0).reshape(2, 3).T + 1.0, requires_grad=True)
    assert not x.data.flags.c_contiguous
    assert diagnet.gradcheck(lambda t: t * t, x, **GRADCHECK_TOL)


def test_gradcheck_rejects_float32_and_nan():
    with pytest.raises(TypeError, match="float64"):
        diagnet.gradcheck(F.exp, diagnet.tensor([1.0], requires_grad=True))
    with pytest.raises(ValueError, match="requires_grad"):
        diagnet.gradcheck(F.exp, t64([1.0], requires_grad=False))
    with np.errstate(invalid="ignore", divide="ignore"):
        with pytest.raises(diagnet.GradcheckError, match="nan"):
            diagnet.gradcheck(F.log, t64([-1.0, 2.0]), **GRADCHECK_TOL)


# ----------------------------------------------------------------------------- kinks and ties

def _grad_of(fn, *values):
    xs = [t64(v) for v in values]
    fn(*xs).sum().backward()
    return [x.grad.numpy() for x in xs]


def test_relu_and_abs_at_zero_have_zero_gradient():
    (g,) = _grad_of(F.relu, [-1.0, 0.0, 2.0])
    np.testing.assert_array_equal(g, [0.0, 0.0, 1.0])
    (g,) = _grad_of(F.abs, [-1.0, 0.0, 2.0])
    np.testing.assert_array_equal(g, [-1.0, 0.0, 1.0])


def test_max_ties_share_the_gradient_equally():
    (g,) = _grad_of(lambda x: x.max(), [1.0, 3.0, 3.0, -2.0])
    np.testing.assert_array_equal(g, [0.0, 0.5, 0.5, 0.0])
    (g,) = _grad_of(lambda x: x.max(axis=1), [[2.0, 2.0, 2.0], [1.0, 5.0, 0.0]])
    np.testing.assert_allclose(g, [[1 / 3, 1 / 3, 1 / 3], [0.0, 1.0, 0.0]], rtol=0, atol=1e-15)
    (g,) = _grad_of(lambda x: x.max(axis=(0, 1), keepdims=True), [[4.0, 1.0], [0.0, 4.0]])
    np.testing.assert_array_equal(g, [[0.5, 0.0], [0.0, 0.5]])


def test_min_ties_share_the_gradient_equally():
    (g,) = _grad_of(lambda x: F.min(x), [1.0, -3.0, -3.0, 2.0])
    np.testing.assert_array_equal(g, [0.0, 0.5, 0.5, 0.0])
    (g,) = _grad_of(lambda x: x.min(axis=1), [[2.0, 2.0, 2.0], [1.0, -5.0, 0.0]])
    np.testing.assert_allclose(g, [[1 / 3, 1 / 3, 1 / 3], [0.0, 1.0, 0.0]], rtol=0, atol=1e-15)
    (g,) = _grad_of(lambda x: x.min(axis=(0, 1), keepdims=True), [[-4.0, 1.0], [0.0, -4.0]])
    np.testing.assert_array_equal(g, [[0.5, 0.0], [0.0, 0.5]])


def test_maximum_minimum_ties_send_gradient_to_first_operand():
    ga, gb = _grad_of(F.maximum, [1.0, 2.0, 3.0], [1.0, 5.0, 0.0])
    np.testing.assert_array_equal(ga, [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(gb, [0.0, 1.0, 0.0])
    ga, gb = _grad_of(F.minimum, [1.0, 2.0, 3.0], [1.0, 5.0, 0.0])
    np.testing.assert_array_equal(ga, [1.0, 1.0, 0.0])
    np.testing.assert_array_equal(gb, [0.0, 0.0, 1.0])


def test_clip_gradient_is_one_inside_and_on_the_bounds():
    (g,) = _grad_of(lambda x: F.clip(x, -1.0, 1.0), [-2.0, -1.0, 0.0, 1.0, 1.5])
    np.testing.assert_array_equal(g, [0.0, 1.0, 1.0, 1.0, 0.0])


def test_pow_exponent_gradient_is_zero_at_zero_base():
    # d/db 0**b = 0**b * log(0) is defined as 0 (the limit for b > 0), not NaN
    a = t64([0.0, 2.0], requires_grad=False)
    b = t64([2.0, 3.0])
    (a ** b).sum().backward()
    np.testing.assert_allclose(b.grad.numpy(), [0.0, 8.0 * np.log(2.0)], rtol=1e-15)


# ----------------------------------------------------------------------------- dropout

def test_dropout_train_gradient_equals_mask_scaling():
    p, seed, shape = 0.25, 99, (50, 40)
    x = t64(np.random.default_rng(0).uniform(0.5, 1.5, shape))
    y = F.dropout(x, p=p, rng=seed)
    # the documented mask draw: float32 uniforms from diagnet.random, on x's device
    keep = diagnet.random.uniform(shape, np, np.float32, seed) >= np.float32(p)
    np.testing.assert_allclose(y.numpy(), x.numpy() * keep / (1 - p), rtol=1e-15)
    y.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), keep / (1 - p))
    assert 0.65 < keep.mean() < 0.85  # about 1 - p of the elements survive


def test_dropout_eval_and_p0_are_identity():
    x = t64(np.random.default_rng(1).standard_normal((3, 4)))
    assert F.dropout(x, p=0.5, training=False) is x
    assert F.dropout(x, p=0.0) is x


def test_dropout_seeded_reproducibility():
    x = diagnet.tensor(np.ones((64, 64)))
    a = F.dropout(x, 0.5, rng=7).numpy()
    b = F.dropout(x, 0.5, rng=7).numpy()
    c = F.dropout(x, 0.5, rng=8).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # the module-wide generator: same manual_seed, same sequence of masks
    diagnet.manual_seed(3)
    first = [F.dropout(x, 0.5).numpy() for _ in range(2)]
    diagnet.manual_seed(3)
    second = [F.dropout(x, 0.5).numpy() for _ in range(2)]
    for u, v in zip(first, second):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(first[0], first[1])  # consecutive calls draw fresh masks
    # a Generator passed in is used (and advanced)
    g1, g2 = np.random.default_rng(5), np.random.default_rng(5)
    np.testing.assert_array_equal(F.dropout(x, 0.3, rng=g1).numpy(), F.dropout(x, 0.3, rng=g2).numpy())


def test_dropout_follows_diagnet_random():
    """The default generator is `diagnet.random`'s: ``diagnet.manual_seed`` and
    ``diagnet.random.manual_seed`` are the same function and reseed dropout."""
    x = diagnet.tensor(np.ones((32, 32)))
    assert diagnet.manual_seed is diagnet.random.manual_seed
    diagnet.random.manual_seed(11)
    a = F.dropout(x, 0.5).numpy()
    diagnet.manual_seed(11)
    b = F.dropout(x, 0.5).numpy()
    np.testing.assert_array_equal(a, b)
    diagnet.random.manual_seed(11)
    expected = diagnet.random.uniform((32, 32), np, np.float32) >= np.float32(0.5)
    np.testing.assert_array_equal(a != 0, expected)
    # a Generator advances by exactly one draw per call, whatever the size
    g, ref = np.random.default_rng(4), np.random.default_rng(4)
    F.dropout(x, 0.5, rng=g)
    ref.integers(0, 2**64, dtype=np.uint64)
    assert g.bit_generator.state == ref.bit_generator.state
    with pytest.raises(TypeError, match="rng must be"):
        F.dropout(x, 0.5, rng="seed")


def test_dropout_mask_is_drawn_on_the_tensor_device(monkeypatch):
    """The mask comes from `diagnet.random.uniform` with the tensor's array module (on the
    GPU: CuPy, so no host draw and no host-to-device copy), and is the same for float32 and
    float64 tensors."""
    calls = []
    real = diagnet.random.uniform

    def spy(shape, xp, dtype, rng):
        calls.append(xp)
        return real(shape, xp, dtype, rng)

    monkeypatch.setattr(diagnet.random, "uniform", spy)
    x32 = diagnet.tensor(np.ones((8, 8)), dtype="float32")
    m32 = F.dropout(x32, 0.5, rng=3).numpy()
    m64 = F.dropout(x32.double(), 0.5, rng=3).numpy()
    assert calls == [np, np]
    np.testing.assert_array_equal(m32 != 0, m64 != 0)


@pytest.mark.gpu
def test_dropout_mask_is_drawn_on_the_gpu(monkeypatch):
    calls = []
    real = diagnet.random.uniform

    def spy(shape, xp, dtype, rng):
        out = real(shape, xp, dtype, rng)
        calls.append((xp, diagnet.backend.device_of(out)))
        return out

    monkeypatch.setattr(diagnet.random, "uniform", spy)
    x = diagnet.tensor(np.ones((64, 64)), device="cuda")
    y = F.dropout(x, 0.3, rng=5)
    assert y.device == "cuda"
    assert calls == [(diagnet.backend.get_array_module(x.data), "cuda")]
    np.testing.assert_array_equal(y.numpy(), F.dropout(x.cpu(), 0.3, rng=5).numpy())


def test_astype_gradient_is_cast_back():
    x = t64([1.0, 2.0, 3.0])
    y = x.astype("float32")
    assert y.dtype == np.float32 and y.requires_grad
    (y * diagnet.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert x.grad.dtype == np.float64
    np.testing.assert_array_equal(x.grad.numpy(), [1.0, 2.0, 3.0])
    assert x.astype("float64") is x  # no-op cast
    assert x.double() is x and x.float().dtype == np.float32


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CASES))
def test_gradcheck_cuda(name):
    """The same table on the GPU: gradcheck passes there and matches the CPU gradients."""
    case = CASES[name]
    xs_gpu = _inputs(name, case, device="cuda")
    assert diagnet.gradcheck(case.fn, *xs_gpu, **case.tol)
    xs_cpu = _inputs(name, case, device="cpu")
    out_cpu, out_gpu = case.fn(*xs_cpu), case.fn(*xs_gpu)
    assert out_gpu.device == "cuda"
    np.testing.assert_allclose(out_gpu.numpy(), out_cpu.numpy(), rtol=1e-10, atol=1e-12)
