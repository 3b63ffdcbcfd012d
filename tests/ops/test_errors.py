"""Clear errors for bad shapes, dtypes and arguments: the type and the message text."""

from __future__ import annotations

import re

import numpy as np
import pytest

import diagnet
from diagnet import functional as F
from helpers import t64


def zeros(*shape, dtype="float64", requires_grad=False):
    return diagnet.tensor(np.zeros(shape), dtype=dtype, requires_grad=requires_grad)


# ----------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("sa, sb, msg", [
    ((2, 3), (4, 5), r"inner dimensions differ: a has shape \(2, 3\) and b has shape \(4, 5\) \(3 != 4\)"),
    ((3,), (4,), r"inner dimensions differ: a has shape \(3,\) and b has shape \(4,\)"),
    ((2, 3), (2,), r"inner dimensions differ: .* \(3 != 2\)"),
    ((5, 2, 3), (4, 3, 1), r"batch dimensions \(5,\) and \(4,\) do not broadcast"),
])
def test_matmul_shape_mismatch(sa, sb, msg):
    with pytest.raises(ValueError, match=f"matmul: {msg}"):
        F.matmul(zeros(*sa), zeros(*sb))
    with pytest.raises(ValueError, match="matmul: "):
        zeros(*sa) @ zeros(*sb)


def test_matmul_scalar_operand():
    with pytest.raises(ValueError, match=r"at least 1-D; got shapes \(\) and \(3,\)"):
        F.matmul(zeros(), zeros(3))


@pytest.mark.parametrize("op, name", [(lambda a, b: a + b, "Add"), (lambda a, b: a - b, "Sub"),
                                      (lambda a, b: a * b, "Mul"), (lambda a, b: a / b, "Div"),
                                      (lambda a, b: a ** b, "Pow"), (F.maximum, "Maximum"),
                                      (F.minimum, "Minimum")])
def test_broadcasting_failure_names_the_op_and_shapes(op, name):
    with pytest.raises(ValueError, match=rf"{name}: operands could not be broadcast together; "
                                         r"got shapes \(2, 3\) and \(4,\)"):
        op(zeros(2, 3, requires_grad=True), zeros(4))
    # a NumPy array operand is checked the same way
    with pytest.raises(ValueError, match=r"got shapes \(2, 3\) and \(2,\)"):
        op(zeros(2, 3), np.ones(2))


def test_where_broadcasting_failure():
    with pytest.raises(ValueError, match=r"Where: .* got shapes \(4,\) and \(2, 3\) and \(2, 3\)"):
        F.where(np.ones(4, dtype=bool), zeros(2, 3), zeros(2, 3))


@pytest.mark.parametrize("shape, msg", [
    ((4, 2), r"\(4, 2\)"), ((-1, 4), r"\(-1, 4\)"), ((-1, -1), r"\(-1, -1\)"),
    ((7,), r"\(7,\)"), ((-2, -3), r"\(-2, -3\)"), ((0, -1), r"\(0, -1\)")])
def test_reshape_incompatible(shape, msg):
    with pytest.raises(ValueError, match=r"reshape: cannot reshape a tensor of shape \(2, 3\) "
                                         rf"\(6 elements\) into shape {msg}"):
        zeros(2, 3).reshape(*shape)


@pytest.mark.parametrize("axes", [(0, 0), (0, 1, 2), (0,), (0, 5), (1, -3)])
def test_transpose_bad_permutation(axes):
    with pytest.raises(ValueError, match=r"transpose: axes .* are not a permutation of the 2 "
                                         r"dimensions of shape \(2, 3\)"):
        zeros(2, 3).transpose(*axes)
    with pytest.raises(ValueError, match="not a permutation"):
        F.permute(zeros(2, 3), axes)


def test_concatenate_and_stack_mismatch():
    with pytest.raises(ValueError, match=r"concatenate: shapes \[\(2, 3\), \(2, 4\)\] differ outside axis 0"):
        F.concatenate([zeros(2, 3), zeros(2, 4)], axis=0)
    with pytest.raises(ValueError, match="same number of dimensions"):
        F.concatenate([zeros(2, 3), zeros(3)])
    with pytest.raises(ValueError, match=r"stack: shapes \[\(2, 3\), \(3, 2\)\] differ"):
        F.stack([zeros(2, 3), zeros(3, 2)])
    with pytest.raises(ValueError, match="needs at least one tensor"):
        F.concatenate([])
    with pytest.raises(ValueError, match="concatenate: axis 2 is out of range for a result with 2 dims"):
        F.concatenate([zeros(2, 3), zeros(2, 3)], axis=2)
    with pytest.raises(ValueError, match="stack: axis -4 is out of range for a result with 3 dims"):
        F.stack([zeros(2, 3), zeros(2, 3)], axis=-4)


@pytest.mark.parametrize("fn", [F.sum, F.mean, F.max])
def test_reduction_bad_axis(fn):
    name = fn.__name__
    with pytest.raises(ValueError, match=f"{name}: axis 2 is out of range for a tensor with 2 dims"):
        fn(zeros(2, 3), axis=2)
    with pytest.raises(ValueError, match=rf"{name}: repeated axis in \(1, -1\)"):
        fn(zeros(2, 3), axis=(1, -1))
    with pytest.raises(ValueError, match="is not an integer"):
        fn(zeros(2, 3), axis=(0.5,))


def test_max_of_empty_tensor():
    with pytest.raises(ValueError, match="max: the tensor is empty"):
        F.max(zeros(0, 3))


def test_loss_and_norm_shape_mismatches():
    with pytest.raises(ValueError, match=r"mse_loss: pred has shape \(2, 3\) but target has shape \(3,\)"):
        F.mse_loss(zeros(2, 3), np.zeros(3))
    with pytest.raises(ValueError, match=r"layer_norm: normalized_shape \(4,\) does not match the "
                                         r"trailing dims of input shape \(2, 3\)"):
        F.layer_norm(zeros(2, 3), 4)
    with pytest.raises(ValueError, match=r"layer_norm: weight must have shape \(3,\); got \(2,\)"):
        F.layer_norm(zeros(2, 3), 3, weight=zeros(2))
    with pytest.raises(ValueError, match=r"cross_entropy: labels must have shape \(4,\)"):
        F.cross_entropy(zeros(4, 3), np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="class dimension"):
        F.cross_entropy(zeros(), 0)


# ----------------------------------------------------------------------------- dtypes

@pytest.mark.parametrize("op", [lambda a, b: a + b, lambda a, b: a * b, lambda a, b: a @ b,
                                lambda a, b: F.concatenate([a, b]), F.maximum])
def test_float32_with_float64_names_both_dtypes(op):
    a = diagnet.tensor(np.ones(3), dtype="float32")
    b = diagnet.tensor(np.ones(3), dtype="float64")
    with pytest.raises(TypeError, match=r"different float dtypes \(float32, float64\).*astype"):
        op(a, b)


def test_requires_grad_on_integer_tensor():
    with pytest.raises(TypeError, match="requires_grad=True needs a float32 or float64 tensor; "
                                        "got dtype int64"):
        diagnet.tensor([1, 2], requires_grad=True)
    with pytest.raises(TypeError, match="needs a float tensor; got dtype bool"):
        diagnet.tensor([True]).requires_grad_()
    with pytest.raises(TypeError, match="cannot cast a tensor that requires grad to int32"):
        t64([1.0]).astype("int32")


def test_bad_dtype_argument():
    with pytest.raises(TypeError, match=r"dtype must be float32, float64, an integer or bool "
                                        r"dtype \(a name such as 'float32' or a NumPy dtype\); "
                                        r"got 'floot'"):
        diagnet.tensor([1.0], dtype="floot")


def test_cross_entropy_label_errors():
    logits = zeros(4, 3, requires_grad=True)
    with pytest.raises(TypeError, match="cross_entropy: labels must be integers; got dtype float64"):
        F.cross_entropy(logits, np.array([0.0, 1.0, 2.0, 0.0]))
    with pytest.raises(TypeError, match="got dtype float32"):
        F.cross_entropy(logits, diagnet.tensor([0.0, 1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\); got values in \[0, 3\]"):
        F.cross_entropy(logits, np.array([0, 1, 3, 0]))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\); got values in \[-1, 2\]"):
        F.cross_entropy(logits, [0, -1, 2, 1])
    with pytest.raises(ValueError, match="reduction must be one of"):
        F.cross_entropy(logits, [0, 1, 2, 1], reduction="avg")
    with pytest.raises(ValueError, match=r"invalid label_smoothing=1.0: must be in \[0, 1\)"):
        F.cross_entropy(logits, [0, 1, 2, 1], label_smoothing=1.0)


# ----------------------------------------------------------------------------- arguments

def test_clip_arguments():
    with pytest.raises(ValueError, match="clip: lo must be <= hi; got lo=1.0, hi=-1.0"):
        F.clip(zeros(3), 1.0, -1.0)
    with pytest.raises(ValueError, match="at least one of lo and hi"):
        F.clip(zeros(3))


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5])
def test_dropout_p_out_of_range(p):
    with pytest.raises(ValueError, match=rf"dropout: p must be in \[0, 1\); got {p}"):
        F.dropout(zeros(3), p=p)
    with pytest.raises(ValueError, match="p must be in"):  # checked in eval mode too
        F.dropout(zeros(3), p=p, training=False)


def test_gelu_and_reduction_arguments():
    with pytest.raises(ValueError, match="gelu: approximate must be 'none' or 'tanh'; got 'fast'"):
        F.gelu(zeros(3), approximate="fast")
    with pytest.raises(ValueError, match="mse_loss: reduction must be one of"):
        F.mse_loss(zeros(3), zeros(3), reduction="max")


def test_backward_errors():
    with pytest.raises(RuntimeError, match="does not require grad"):
        (zeros(2) * 2).sum().backward()
    y = zeros(2, requires_grad=True) * 2
    with pytest.raises(RuntimeError, match=r"without grad needs a one-element output; got shape \(2,\)"):
        y.backward()
    with pytest.raises(ValueError, match=r"grad must have the output's shape \(2,\); got \(2, 2\)"):
        y.backward(np.ones((2, 2)))


def test_item_on_many_elements():
    with pytest.raises(ValueError, match=r"item\(\) needs a tensor with one element; got shape \(2, 2\)"):
        zeros(2, 2).item()


def test_gradcheck_argument_errors():
    with pytest.raises(TypeError, match="gradcheck: input 0 must be float64; got float32"):
        diagnet.gradcheck(F.exp, diagnet.tensor([1.0], requires_grad=True))
    with pytest.raises(ValueError, match="no input has requires_grad=True"):
        diagnet.gradcheck(F.exp, zeros(2))
    with pytest.raises(TypeError, match="fn must return a Tensor; got float"):
        diagnet.gradcheck(lambda x: 1.0, zeros(2, requires_grad=True))


def test_tensor_matmul_with_diagmatrix_points_to_diag_linear():
    W = diagnet.DiagMatrix.random((4, 6), k=2, rng=0)
    x = diagnet.tensor(np.ones((3, 4), dtype=np.float32))
    with pytest.raises(TypeError, match="DiagMatrix; use diagnet.functional.diag_linear"):
        x @ W


# ----------------------------------------------------------------------------- layer arguments

def _mlp():
    return diagnet.nn.Sequential(diagnet.nn.Linear(4, 8, rng=0), diagnet.nn.ReLU(),
                                 diagnet.nn.Linear(8, 4, rng=0))


def _builders():
    from diagnet.dst import sparsify
    from diagnet.dst.dynadiag import DynaDiagLinear

    return {
        "DiagLinear": lambda **kw: diagnet.nn.DiagLinear(4, 6, **kw),
        "DynaDiagLinear": lambda **kw: DynaDiagLinear(4, 6, **kw),
        "sparsify diag": lambda **kw: sparsify(_mlp(), "diag", **kw),
        "sparsify dynadiag": lambda **kw: sparsify(_mlp(), "dynadiag", **kw),
    }


@pytest.mark.parametrize("builder", ["DiagLinear", "DynaDiagLinear", "sparsify diag",
                                     "sparsify dynadiag"])
@pytest.mark.parametrize("sparsity, error, expected", [
    (None, TypeError, "a number in {}; got NoneType None"),
    (True, TypeError, "a number in {}; got bool True"),
    (np.bool_(False), TypeError, "a number in {}; got bool " + repr(np.bool_(False))),
    ("0.5", TypeError, "a number in {}; got str '0.5'"),
    (float("nan"), ValueError, "in {}; got nan"),
])
def test_bad_sparsity_names_the_argument_the_range_and_the_value(builder, sparsity, error,
                                                                 expected):
    state = diagnet.random.get_state()
    interval = "[0, 1)" if builder.startswith("sparsify") else "[0, 1]"
    message = "sparsity must be " + expected.format(interval)
    with pytest.raises(error, match=re.escape(message) + "$"):
        _builders()[builder](sparsity=sparsity)
    assert diagnet.random.get_state() == state  # refused before drawing anything


def test_refused_sparsify_leaves_the_model_as_it_was():
    from diagnet.dst import sparsify

    model = _mlp()
    before = [type(m) for m in model.modules()]
    with pytest.raises(TypeError, match="sparsity must be a number"):
        sparsify(model, "diag", sparsity=None)
    assert [type(m) for m in model.modules()] == before


@pytest.mark.parametrize("make", [
    lambda: diagnet.nn.Linear(4, 6, rng=-1),
    lambda: diagnet.nn.DiagLinear(4, 6, rng=-1),
    lambda: _builders()["DynaDiagLinear"](rng=-1),
    lambda: _builders()["sparsify diag"](rng=-1),
    lambda: diagnet.DiagMatrix.random((4, 6), rng=-1),
    lambda: diagnet.random.as_generator(-1),
])
def test_negative_rng_seed_names_what_rng_accepts(make):
    with pytest.raises(ValueError, match=r"^rng must be None, a non-negative int seed or a "
                                         r"numpy Generator; got -1$"):
        make()


@pytest.mark.parametrize("rng, received", [("7", "str '7'"), (True, "bool True"),
                                           (1.5, "float 1.5")])
def test_rng_of_the_wrong_type(rng, received):
    with pytest.raises(TypeError, match=rf"rng must be None, a non-negative int seed or a "
                                        rf"numpy Generator; got {received}$"):
        diagnet.random.as_generator(rng)
