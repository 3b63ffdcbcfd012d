"""In-place ops (``+=``, ``add_``, ``fill_``, ``copy_``, ``t[i] = v``, ...) and the version
counter that makes a backward through changed values raise instead of computing a wrong
gradient."""

from __future__ import annotations

import numpy as np
import pytest

import diagnet
from diagnet import functional as F
from diagnet import nn
from helpers import t64


def version(t):
    return t._version_counter().value


# ----------------------------------------------------------------------------- the update loop

def test_manual_sgd_loop_updates_the_parameters_in_place():
    model = nn.Linear(3, 2, rng=0, dtype=np.float64)
    x = diagnet.tensor(np.ones((4, 3)), dtype="float64")
    F.mse_loss(model(x), diagnet.tensor(np.zeros((4, 2)), dtype="float64")).backward()
    before = {name: (p, p.numpy(), p.grad.numpy()) for name, p in model.named_parameters()}
    lr = 0.1
    with diagnet.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
    for name, p in model.named_parameters():
        param, old, grad = before[name]
        assert p is param  # still the registered parameter, not a new tensor
        np.testing.assert_allclose(p.numpy(), old - lr * grad, rtol=1e-15)
        assert p.requires_grad and p.is_leaf


def test_grad_zero_in_place():
    w = t64([1.0, 2.0])
    (w * 3.0).sum().backward()
    g = w.grad
    assert w.grad.zero_() is g
    np.testing.assert_array_equal(w.grad.numpy(), [0.0, 0.0])


# ----------------------------------------------------------------------------- values

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_operators_change_the_tensor_itself(dtype):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 3)), rng.uniform(1, 2, (2, 3))
    t = diagnet.tensor(a, dtype=dtype)
    data = t.data
    ref = a.astype(dtype)
    for op, iop in ((np.add, "__iadd__"), (np.subtract, "__isub__"), (np.multiply, "__imul__"),
                    (np.true_divide, "__itruediv__")):
        assert getattr(t, iop)(diagnet.tensor(b, dtype=dtype)) is t
        ref = op(ref, b.astype(dtype))
        assert t.data is data and t.dtype == dtype
        np.testing.assert_array_equal(t.numpy(), ref)


def test_named_in_place_methods():
    t = diagnet.tensor([1.0, 2.0, 3.0], dtype="float64")
    assert t.add_(1.0) is t and t.tolist() == [2.0, 3.0, 4.0]
    assert t.add_(diagnet.tensor([1.0, 1.0, 1.0], dtype="float64"), alpha=-2).tolist() == \
        [0.0, 1.0, 2.0]
    assert t.sub_(np.array([1.0, 1.0, 1.0]), alpha=0.5).tolist() == [-0.5, 0.5, 1.5]
    assert t.mul_(2).tolist() == [-1.0, 1.0, 3.0]
    assert t.div_(4).tolist() == [-0.25, 0.25, 0.75]
    assert t.fill_(7).tolist() == [7.0, 7.0, 7.0]
    assert t.zero_().tolist() == [0.0, 0.0, 0.0]
    assert t.copy_([1, 2, 3]).tolist() == [1.0, 2.0, 3.0]
    assert t.dtype == np.float64


def test_right_side_broadcasts_onto_the_left():
    t = diagnet.tensor(np.zeros((2, 3)))
    t += diagnet.tensor([1.0, 2.0, 3.0])
    t += np.array([[10.0], [20.0]])
    t.copy_(t[0])
    np.testing.assert_array_equal(t.numpy(), [[11.0, 12.0, 13.0]] * 2)


@pytest.mark.parametrize("call", [
    lambda t: t.__iadd__(diagnet.tensor(np.ones((2, 3)))),
    lambda t: t.mul_(np.ones((2, 1, 3))),
    lambda t: t.copy_(np.ones(2)),
])
def test_left_side_never_broadcasts(call):
    t = diagnet.tensor([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"does not broadcast onto the tensor's shape \(3,\)"):
        call(t)
    assert t.tolist() == [1.0, 2.0, 3.0] and version(t) == 0


def test_0d_tensors_from_reductions_change_in_place():
    s = diagnet.tensor([1.0, 2.0]).sum()
    s += 1.0
    s *= 2.0
    assert s.item() == 8.0
    assert diagnet.tensor([5, 6])[0].add_(1).item() == 6


def test_setitem():
    t = diagnet.tensor(np.zeros((3, 4)), dtype="float64")
    t[0] = 1.0
    t[1, 1:3] = diagnet.tensor([2.0, 3.0], dtype="float64")
    t[diagnet.tensor([2, 2])] = np.arange(4.0)
    t[t > 2.5] = -1.0
    t[:, diagnet.tensor(0)] += 10.0
    np.testing.assert_array_equal(t.numpy(), [[11, 1, 1, 1], [10, 2, -1, 0], [10, 1, 2, -1]])


def test_setitem_with_a_value_of_the_wrong_shape_names_both():
    t = diagnet.tensor(np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"setitem: cannot assign a value of shape \(3,\)"):
        t[0] = np.ones(3)
    assert not t.numpy().any() and version(t) == 0


# ----------------------------------------------------------------------------- dtypes

@pytest.mark.parametrize("call, result", [
    (lambda t: t.__iadd__(0.5), "float64"),
    (lambda t: t.__itruediv__(2), "float64"),
    (lambda t: t.mul_(diagnet.tensor([1.5, 1.5])), "float64"),  # NumPy's int64 * float32
    (lambda t: t.sub_(np.array([1.0, 1.0])), "float64"),
])
def test_in_place_arithmetic_cannot_change_an_integer_dtype(call, result):
    t = diagnet.tensor([1, 2])
    with pytest.raises(TypeError, match=rf"result has dtype {result}, which cannot be stored in "
                                        r"the int64 tensor"):
        call(t)
    assert t.tolist() == [1, 2] and t.dtype == np.int64


def test_in_place_arithmetic_casts_within_a_kind_like_pytorch():
    t = diagnet.tensor([1.0, 2.0])                     # float32
    t += diagnet.tensor([0.5, 0.5], dtype="float64")  # same kind: stored as float32
    assert t.dtype == np.float32 and t.tolist() == [1.5, 2.5]
    i = diagnet.tensor([1, 2], dtype="int32")
    i *= diagnet.tensor([3, 3], dtype="int64")
    assert i.dtype == np.int32 and i.tolist() == [3, 6]
    b = diagnet.tensor([True, False])
    with pytest.raises(TypeError, match="cannot be stored in the bool tensor"):
        b += 1


def test_fill_copy_and_setitem_convert_like_tensor_does():
    t = diagnet.tensor([0, 0, 0], dtype="uint8")
    t.copy_([1.9, 2.2, 255.0])                    # floats truncate
    assert t.tolist() == [1, 2, 255]
    t[0] = 7.5
    assert t.tolist() == [7, 2, 255]
    for call, shown in ((lambda: t.fill_(300), "300"), (lambda: t.copy_([1, -1, 2]), "-1"),
                        (lambda: t.__setitem__(1, float("nan")), "nan"),
                        (lambda: t.__setitem__(slice(None), [1, 2, 256]), "256")):
        with pytest.raises(ValueError, match=rf"dtype uint8 without wrapping around.*got {shown}"):
            call()
    assert t.tolist() == [7, 2, 255]


@pytest.mark.parametrize("value", ["1", None, [1.0, 2.0], diagnet.tensor([1.0, 2.0])])
def test_fill_needs_one_number(value):
    t = diagnet.tensor([0.0, 0.0])
    with pytest.raises((TypeError, ValueError), match="fill_: value must be a number"):
        t.fill_(value)


# ----------------------------------------------------------------------------- when it is refused

def test_a_leaf_that_requires_grad_changes_only_under_no_grad():
    w = t64([1.0, 2.0])
    for call in (lambda: w.__iadd__(1.0), lambda: w.zero_(), lambda: w.__setitem__(0, 5.0),
                 lambda: w.copy_([3.0, 4.0]), lambda: w.fill_(1.0)):
        with pytest.raises(RuntimeError, match="cannot change a leaf tensor that requires grad "
                                               "in place while gradients are recorded"):
            call()
    assert w.tolist() == [1.0, 2.0] and version(w) == 0
    with diagnet.no_grad():
        w += 1.0
        w[0] = 0.0
    assert w.tolist() == [0.0, 3.0] and w.requires_grad and w.is_leaf


def test_a_tensor_of_a_graph_cannot_change_in_place_outside_no_grad():
    x = t64([1.0, 2.0])
    y = x * 2.0
    with pytest.raises(RuntimeError, match="cannot change a tensor computed by Mul"):
        y += 1.0
    assert y.tolist() == [2.0, 4.0]


def test_an_operand_that_requires_grad_cannot_flow_in_in_place():
    w = t64([1.0, 2.0])
    t = diagnet.tensor([0.0, 0.0], dtype="float64")
    with pytest.raises(RuntimeError, match="add_: the value requires grad"):
        t += w
    with pytest.raises(RuntimeError, match="copy_: the value requires grad"):
        t.copy_(w)
    assert t.tolist() == [0.0, 0.0]
    with diagnet.no_grad():
        t += w
    assert t.tolist() == [1.0, 2.0] and not t.requires_grad


def test_a_read_only_broadcast_view_is_refused():
    b = F.broadcast_to(diagnet.tensor([1.0, 2.0]), (3, 2))
    with pytest.raises(ValueError, match="read-only"):
        b += 1.0


# ----------------------------------------------------------------------------- versions

def test_every_in_place_op_bumps_the_version():
    t = diagnet.tensor([1.0, 2.0])
    seen = [version(t)]
    for call in (lambda: t.__iadd__(1), lambda: t.__isub__(1), lambda: t.__imul__(2),
                 lambda: t.__itruediv__(2), lambda: t.add_(1), lambda: t.fill_(0),
                 lambda: t.zero_(), lambda: t.copy_([1, 2]), lambda: t.__setitem__(0, 3)):
        call()
        seen.append(version(t))
    assert seen == sorted(seen) and len(set(seen)) == len(seen)


def test_views_share_the_version_and_copies_do_not():
    x = diagnet.tensor(np.arange(6.0).reshape(2, 3))
    views = [x.detach(), x.reshape(3, 2), x.T, x.transpose(1, 0), x[0], x[:, 1:], x[None],
             F.squeeze(x[None]), x.flatten()]
    copies = [x.clone(), x[[0, 1]], x[x > 2], x + 0.0, diagnet.tensor(x)]
    with diagnet.no_grad():
        views[0] += 1.0  # through a view
    for v in views:
        assert v._version_counter() is x._version_counter()
        assert version(v) == version(x) > 0
    for c in copies:
        assert c._version is not x._version
    assert diagnet.Tensor(x)._version_counter() is x._version_counter()  # the same array


def test_a_saved_input_changed_in_place_makes_backward_raise():
    a = t64([1.0, 2.0])
    b = diagnet.tensor([3.0, 4.0], dtype="float64")
    y = (a * b).sum()
    b += 1.0
    with pytest.raises(RuntimeError, match=r"Mul: input 1 \(shape \(2,\)\) changed in place "
                                           r"after Mul ran"):
        y.backward()
    assert a.grad is None


def test_a_change_through_a_view_is_seen():
    a = t64(np.ones((2, 2)))
    y = (a.exp() * a).sum()
    with diagnet.no_grad():
        a.reshape(4)[0] = 5.0  # a view of a leaf that requires grad, changed under no_grad
    with pytest.raises(RuntimeError, match="changed in place after"):
        y.backward()


def test_a_saved_output_changed_in_place_makes_backward_raise():
    x = t64([0.5, 1.0])
    y = x.exp()          # Exp's backward reads its output
    d = y.detach()
    d += 1.0             # shares y's memory and version
    with pytest.raises(RuntimeError, match="Exp: its output changed in place after Exp ran"):
        y.backward(np.ones(2))


def test_changes_before_forward_or_after_backward_are_fine():
    a = t64([1.0, 2.0])
    b = diagnet.tensor([3.0, 4.0], dtype="float64")
    b += 1.0
    y = (a * b).sum()
    y.backward()
    b += 1.0
    np.testing.assert_array_equal(a.grad.numpy(), [4.0, 5.0])


def test_retain_graph_then_a_step_then_backward_again_raises():
    w = t64([1.0, 2.0])
    x = diagnet.tensor([3.0, 4.0], dtype="float64")
    y = (w * x).sum()
    y.backward(retain_graph=True)
    opt = diagnet.optim.SGD([w], lr=0.1)
    before = version(w)
    opt.step()
    assert version(w) > before
    with pytest.raises(RuntimeError, match="Mul: input 0 .* changed in place"):
        y.backward()


@pytest.mark.parametrize("make", [lambda ps: diagnet.optim.SGD(ps, lr=0.1, momentum=0.9),
                                  lambda ps: diagnet.optim.Adam(ps),
                                  lambda ps: diagnet.optim.AdamW(ps)])
def test_optimizer_steps_bump_the_versions_of_the_parameters_they_change(make):
    w, unused = t64([1.0, 2.0]), t64([3.0])
    (w * w).sum().backward()
    opt = make([w, unused])
    before = version(w), version(unused)
    opt.step()
    assert version(w) > before[0]
    assert version(unused) == before[1]  # no gradient: not changed


def test_set_offsets_bumps_the_values_version():
    layer = nn.DiagLinear(4, 4, sparsity=0.5, offsets=[0, 1], rng=0, dtype=np.float64)
    x = diagnet.tensor(np.ones((2, 4)), dtype="float64")
    y = layer(x).sum()
    before = version(layer.values)
    layer.set_offsets([1, 2])
    assert version(layer.values) > before
    with pytest.raises(RuntimeError, match="DiagLinearFunction: input 1 .* changed in place"):
        y.backward()


def test_the_version_check_skips_nodes_when_nothing_changed(monkeypatch):
    """The per-node cost when nothing was changed in place is one comparison."""
    from diagnet.autograd import engine

    calls = []
    monkeypatch.setattr(engine, "_check_versions", lambda fn: calls.append(fn))
    x = t64([1.0, 2.0])
    (x * 2.0 + 1.0).sum().backward()
    assert calls == []


# ----------------------------------------------------------------------------- GPU (stand-in)

@pytest.mark.gpu
def test_in_place_ops_on_cuda_tensors():
    t = diagnet.tensor(np.zeros((2, 3)), dtype="float64", device="cuda")
    t += 1.0
    t[0, diagnet.tensor([0, 2], device="cuda")] = 5.0
    t[1] = np.array(2.0)
    t.mul_(diagnet.tensor([1.0, 2.0, 3.0], dtype="float64", device="cuda"))
    np.testing.assert_array_equal(t.numpy(), [[5.0, 2.0, 15.0], [2.0, 4.0, 6.0]])
    t.copy_(np.ones((2, 3)))  # from the host
    assert t.device == "cuda" and t.numpy().tolist() == [[1.0] * 3] * 2
    with pytest.raises(ValueError, match="dtype uint8 without wrapping around"):
        diagnet.tensor([1, 2], dtype="uint8", device="cuda").fill_(-1)


@pytest.mark.gpu
def test_version_check_on_cuda():
    a = t64([1.0, 2.0], device="cuda")
    b = diagnet.tensor([3.0, 4.0], dtype="float64", device="cuda")
    y = (a * b).sum()
    b.zero_()
    with pytest.raises(RuntimeError, match="Mul: input 1"):
        y.backward()
