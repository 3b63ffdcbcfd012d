"""The autograd engine: graph recording, the backward walk, graph freeing and Tensor basics."""

from __future__ import annotations

import gc
import sys
import weakref

import numpy as np
import pytest

import diagnet
from diagnet import Function, Tensor
from diagnet import functional as F
from diagnet.autograd import VersionCounter, sum_rows, sum_to
from diagnet.autograd.shapes import SUM_ROWS_GEMV_MIN
from helpers import t64


class Counting(Function):
    """Identity that counts how often its backward runs (to observe the walk)."""

    calls = 0

    def forward(self, x):
        return x.copy()

    def backward(self, gy):
        type(self).calls += 1
        return gy


# ----------------------------------------------------------------------------- deep graphs

def test_chain_of_10000_ops_backward_without_recursion():
    assert sys.getrecursionlimit() < 10_000  # a recursive walk would overflow here
    x = t64(0.5)
    y = x
    for i in range(10_000):
        y = y * 1.0001 if i % 2 else y + 0.001
    y.backward()
    np.testing.assert_allclose(x.grad.item(), 1.0001 ** 5000, rtol=1e-12)
    expected = 0.5
    for i in range(10_000):
        expected = expected * 1.0001 if i % 2 else expected + 0.001
    np.testing.assert_allclose(y.item(), expected, rtol=1e-12)


def test_deep_graph_is_deallocated_without_recursion_error():
    x = diagnet.tensor(1.0, requires_grad=True)
    y = x
    for _ in range(20_000):
        y = y + 1.0
    ref = weakref.ref(y.creator)
    del y  # tearing down a 20,000-deep chain of tensors and functions
    gc.collect()
    assert ref() is None


# ----------------------------------------------------------------------------- grad mode

def test_no_grad_records_nothing():
    x = diagnet.tensor([1.0, 2.0], requires_grad=True)
    with diagnet.no_grad():
        assert not diagnet.is_grad_enabled()
        y = x * 2 + 1
        z = F.softmax(y)
    assert diagnet.is_grad_enabled()
    for t in (y, z):
        assert not t.requires_grad and t.creator is None and t.is_leaf
    with pytest.raises(RuntimeError, match="does not require grad"):
        z.sum().backward()


def test_enable_grad_inside_no_grad_and_decorator_form():
    x = diagnet.tensor([1.0], requires_grad=True)
    with diagnet.no_grad():
        with diagnet.enable_grad():
            y = x * 2
        w = x * 2
    assert y.requires_grad and y.creator is not None
    assert not w.requires_grad

    @diagnet.no_grad()
    def evaluate(t):
        return t * 3

    assert not evaluate(x).requires_grad
    assert diagnet.is_grad_enabled()


def test_a_call_that_records_nothing_does_no_graph_bookkeeping(monkeypatch):
    """Under no_grad, or when no input requires grad, a Function call runs its forward and
    wraps the result, nothing more: no VersionCounter, no graph attributes on the node,
    nothing to free (the node is garbage once the call returns), so that inference pays
    only for arithmetic and dispatch. A view still shares its input's counter."""
    made, released = [], []
    init, release = VersionCounter.__init__, Function.release
    monkeypatch.setattr(VersionCounter, "__init__", lambda self: (made.append(1), init(self))[1])
    monkeypatch.setattr(Function, "release", lambda self: (released.append(1), release(self))[1])
    x = t64([1.0, -2.0])
    c = diagnet.tensor([3.0, 4.0], dtype=np.float64)
    node = Counting()
    with diagnet.no_grad():
        y = F.softmax(node(x) * 2.0 + c)
    z = F.relu(c * c - c)  # recording on, but no input requires grad
    assert made == [] and released == []
    assert vars(node) == {"_applied": True}
    for t in (y, z):
        assert not t.requires_grad and t.creator is None and t._version is None
    with diagnet.no_grad():
        view = x.reshape(2, 1)
    assert view._version is x._version is not None


def test_no_grad_restores_mode_after_an_exception():
    with pytest.raises(KeyError):
        with diagnet.no_grad():
            raise KeyError("boom")
    assert diagnet.is_grad_enabled()


def test_outputs_require_grad_only_when_an_input_does():
    a = diagnet.tensor([1.0, 2.0])
    b = diagnet.tensor([3.0, 4.0], requires_grad=True)
    assert not (a * 2).requires_grad and (a * 2).creator is None
    assert (a * b).requires_grad and not (a * b).is_leaf


# ----------------------------------------------------------------------------- accumulation

def test_gradients_accumulate_across_backward_calls_until_zeroed():
    x = t64([1.0, 2.0, 3.0])
    (x * x).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 4.0, 6.0])
    (x * 3.0).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [5.0, 7.0, 9.0])
    x.zero_grad()
    assert x.grad is None
    (x * 3.0).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [3.0, 3.0, 3.0])


def test_leaf_gradients_do_not_alias():
    # Add hands the same array to both inputs; each leaf must own its gradient
    a, b = t64([1.0, 2.0]), t64([3.0, 4.0])
    (a + b).backward(np.array([1.0, 1.0]))
    a.grad.data[0] = 100.0
    assert b.grad.numpy()[0] == 1.0
    seed = np.array([5.0, 6.0])
    leaf = t64([0.0, 0.0])
    leaf.backward(seed)
    seed[0] = -1.0
    assert leaf.grad.numpy()[0] == 5.0


def test_broadcast_gradient_is_summed_to_the_leaf_shape():
    w = t64(np.ones((1, 3)))
    b = t64(2.0)
    x = t64(np.arange(6.0).reshape(2, 3), requires_grad=False)
    (x * w + b).sum().backward()
    assert w.grad.shape == (1, 3) and b.grad.shape == ()
    np.testing.assert_array_equal(w.grad.numpy(), [[3.0, 5.0, 7.0]])
    assert b.grad.item() == 6.0


def test_sum_to():
    g = np.arange(24.0).reshape(2, 3, 4)
    np.testing.assert_array_equal(sum_to(g, (3, 4)), g.sum(0))
    np.testing.assert_array_equal(sum_to(g, (3, 1)), g.sum(0).sum(1, keepdims=True))
    np.testing.assert_array_equal(sum_to(g, (2, 1, 4)), g.sum(1, keepdims=True))
    np.testing.assert_array_equal(sum_to(g, ()), g.sum())
    assert sum_to(g, (2, 3, 4)) is g


@pytest.mark.parametrize("shape", [(0, 4), (2, 0, 3), (40, 17, 3), (5, 1, 3)])
def test_sum_to_over_leading_axes_of_any_size(shape):
    g = np.random.default_rng(0).standard_normal(shape)
    for target in (shape[1:], (1,) + shape[1:]):
        got = sum_to(g, target)
        assert got.shape == target and got.dtype == g.dtype
        np.testing.assert_allclose(got, g.sum(0).reshape(target), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rows", [1, SUM_ROWS_GEMV_MIN - 1, SUM_ROWS_GEMV_MIN, 1000])
@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 1e-4)])
def test_sum_rows_is_the_column_sum(rows, dtype, rtol):
    a = np.random.default_rng(1).standard_normal((rows, 7)).astype(dtype) + 3.0
    got = sum_rows(a)
    assert got.shape == (7,) and got.dtype == dtype
    np.testing.assert_allclose(got, a.astype(np.float64).sum(0), rtol=rtol)
    # other layouts and dtypes take NumPy's sum, with the same result
    np.testing.assert_allclose(sum_rows(np.asfortranarray(a)), got, rtol=rtol)
    ints = np.arange(rows * 3).reshape(rows, 3)
    np.testing.assert_array_equal(sum_rows(ints), ints.sum(0))


def test_sum_rows_propagates_nan_and_inf():
    a = np.ones((64, 3))
    a[5, 0], a[7, 1] = np.nan, np.inf
    got = sum_rows(a)
    assert np.isnan(got[0]) and got[1] == np.inf and got[2] == 64.0


# ----------------------------------------------------------------------------- graph freeing

def test_retain_graph_allows_a_second_backward():
    x = t64([1.0, 2.0])
    y = (x.exp() * x).sum()
    y.backward(retain_graph=True)
    first = x.grad.numpy()
    y.backward()
    np.testing.assert_allclose(x.grad.numpy(), 2 * first, rtol=1e-15)


def test_default_backward_frees_the_graph_and_a_second_backward_raises():
    x = t64([1.0, 2.0])
    y = (x * x).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="already freed.*retain_graph=True"):
        y.backward()
    # a graph that shares a freed part with a new branch raises too
    h = x * 2.0
    h.sum().backward()
    with pytest.raises(RuntimeError, match="already freed"):
        (h * 3.0).sum().backward()


def test_backward_releases_saved_arrays_and_intermediates():
    x = t64(np.ones(4))
    y = x * 2.0
    fn = y.creator
    y_ref = weakref.ref(y)
    z = y.exp().sum()
    del y
    assert y_ref() is not None  # still held by the graph (z -> Exp -> inputs)
    assert hasattr(fn, "saved")
    z.backward()
    assert not hasattr(fn, "saved") and not hasattr(fn, "inputs")
    assert y_ref() is None  # freeing the graph released the intermediate tensor
    np.testing.assert_allclose(x.grad.numpy(), 2 * np.exp(2.0), rtol=1e-15)


def test_intermediate_tensors_get_no_grad():
    x = t64([1.0, 2.0])
    y = x * 3.0
    z = y * y
    z.sum().backward()
    assert y.grad is None and z.grad is None
    np.testing.assert_allclose(x.grad.numpy(), 18 * x.numpy(), rtol=1e-15)


def test_retain_graph_keeps_saved_arrays():
    x = t64([1.0, 2.0])
    y = x * x
    y.sum().backward(retain_graph=True)
    assert hasattr(y.creator, "saved")


def test_functions_hold_outputs_weakly():
    x = t64([1.0, 2.0])
    y = x * 2.0
    fn = y.creator
    y_ref = weakref.ref(y)
    del y  # an unused branch: nothing else holds the output
    assert y_ref() is None
    assert fn.outputs[0]() is None


def test_deleted_intermediate_is_still_backpropagated_through():
    x = t64([0.5, -1.0])
    y = x * 3.0
    z = F.tanh(y)
    w = z * y  # y used twice, then dropped by the user
    del y, z
    gc.collect()
    w.sum().backward()
    t = np.tanh(3 * x.numpy())
    expected = 3 * ((1 - t ** 2) * 3 * x.numpy() + t)
    np.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-14)


# ----------------------------------------------------------------------------- graph shapes

def test_diamond_graph_sums_gradients():
    x = t64([1.0, -2.0])
    a = x * x          # branch 1
    b = x * 3.0        # branch 2
    (a + b).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), 2 * x.numpy() + 3, rtol=1e-15)
    x.zero_grad()
    (x * x * x).sum().backward()  # same tensor twice in one op, then again
    np.testing.assert_allclose(x.grad.numpy(), 3 * x.numpy() ** 2, rtol=1e-15)


def test_topological_order_with_branches_of_different_depth():
    Counting.calls = 0
    x = t64([0.3, 0.7])
    a = Counting()(x)                        # used by both branches below
    long = ((a.exp() * 2.0).tanh() + 1.0) * a  # deep branch (uses a twice)
    short = a * 5.0                          # shallow branch
    out = (long + short).sum()
    out.backward()
    # `a`'s function runs once, after *both* branches delivered their gradient
    assert Counting.calls == 1
    xv = x.numpy()
    t = np.tanh(2 * np.exp(xv))
    expected = (1 - t ** 2) * 2 * np.exp(xv) * xv + t + 1 + 5
    np.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-14)


def test_multi_output_function_with_an_unused_output():
    class Split(Function):
        def forward(self, x):
            return x[:2].copy(), x[2:].copy()

        def backward(self, g1, g2):
            return np.concatenate([g1, g2])

    x = t64([1.0, 2.0, 3.0, 4.0])
    first, _second = Split()(x)
    (first * 10.0).sum().backward()
    # the unused output's gradient arrives as zeros of its shape and dtype
    np.testing.assert_array_equal(x.grad.numpy(), [10.0, 10.0, 0.0, 0.0])


def test_backward_returning_the_wrong_number_of_gradients_raises():
    class Bad(Function):
        def forward(self, a, b):
            return a + b

        def backward(self, gy):
            return gy

    y = Bad()(t64([1.0]), t64([2.0]))
    with pytest.raises(RuntimeError, match="returned 1 gradients for 2 inputs"):
        y.backward()


def test_only_inputs_that_require_grad_get_gradients():
    a = t64([1.0, 2.0])
    b = t64([3.0, 4.0], requires_grad=False)
    (a * b).sum().backward()
    assert b.grad is None
    np.testing.assert_array_equal(a.grad.numpy(), [3.0, 4.0])


# ----------------------------------------------------------------------------- backward args

def test_non_scalar_backward_without_grad_raises():
    y = t64([1.0, 2.0]) * 2.0
    with pytest.raises(RuntimeError, match=r"one-element output; got shape \(2,\)"):
        y.backward()


def test_one_element_non_scalar_backward_defaults_to_ones():
    x = t64([[3.0]])
    (x * 2.0).backward()
    assert x.grad.shape == (1, 1) and x.grad.item() == 2.0


def test_backward_with_wrong_grad_shape_raises():
    y = t64([1.0, 2.0]) * 2.0
    with pytest.raises(ValueError, match=r"output's shape \(2,\); got \(3,\)"):
        y.backward(np.ones(3))
    with pytest.raises(ValueError, match="output's shape"):
        y.backward(diagnet.tensor(np.ones((2, 1))))


def test_backward_with_explicit_grad():
    x = t64([1.0, 2.0])
    (x * x).backward(diagnet.tensor([1.0, -1.0]))  # float32 seed is cast to the output dtype
    assert x.grad.dtype == np.float64
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, -4.0])


def test_backward_on_a_leaf():
    x = t64([1.0, 2.0])
    x.backward(np.array([3.0, 4.0]))
    np.testing.assert_array_equal(x.grad.numpy(), [3.0, 4.0])


def test_backward_without_requires_grad_raises():
    with pytest.raises(RuntimeError, match="does not require grad"):
        diagnet.tensor(1.0).backward()


# ----------------------------------------------------------------------------- Tensor basics

def test_detach_cuts_the_graph_and_shares_data():
    x = t64([1.0, 2.0])
    y = x * 2.0
    d = y.detach()
    assert not d.requires_grad and d.is_leaf and d.creator is None
    assert d.data is y.data
    (d * x).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 4.0])  # nothing through d


def test_item():
    assert diagnet.tensor(2.5).item() == 2.5
    assert isinstance(diagnet.tensor([[4.0]]).item(), float)
    assert diagnet.tensor([7]).item() == 7 and isinstance(diagnet.tensor([7]).item(), int)
    with pytest.raises(ValueError, match=r"one element; got shape \(2,\)"):
        diagnet.tensor([1.0, 2.0]).item()


def test_numpy_returns_a_copy():
    x = diagnet.tensor([1.0, 2.0])
    a = x.numpy()
    a[0] = 99.0
    assert x.numpy()[0] == 1.0
    assert not np.shares_memory(x.numpy(), x.data)
    assert x.tolist() == [1.0, 2.0]


def test_tensor_constructor_copies_but_Tensor_wraps():
    a = np.array([1.0, 2.0])
    t = diagnet.tensor(a)
    a[0] = 5.0
    assert t.numpy()[0] == 1.0
    src = diagnet.tensor([1.0, 2.0])
    assert diagnet.tensor(src).data is not src.data


def test_from_array_wraps_the_array_as_a_leaf_without_copying():
    a = np.array([1.0, 2.0])
    t = Tensor.from_array(a)
    assert type(t) is Tensor and t.data is a
    assert t.is_leaf and t.grad is None and not t.requires_grad and t.name is None
    version = VersionCounter()
    u = Tensor.from_array(a, True, version)
    assert u.requires_grad and u.detach()._version is version
    p = diagnet.nn.Parameter.from_array(a, True)
    assert type(p) is diagnet.nn.Parameter and p.data is a and p.optimizers() == []


def test_tensor_operators_and_op_methods_are_the_installed_ops():
    """`diagnet.ops` installs them (autograd imports no op); each keeps a docstring."""
    from diagnet import ops
    from diagnet.ops.tensor_methods import TENSOR_METHODS

    for name, method in TENSOR_METHODS.items():
        assert Tensor.__dict__[name] is method and method.__doc__, name
    assert Tensor.__add__ is ops.add and Tensor.sum is ops.sum and Tensor.reshape is ops.reshape
    x = t64([[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal((1.0 - x).numpy(), [[0.0, -1.0], [-2.0, -3.0]])
    np.testing.assert_array_equal(x.T.numpy(), [[1.0, 3.0], [2.0, 4.0]])
    np.testing.assert_array_equal(x.flatten().numpy(), [1.0, 2.0, 3.0, 4.0])


def test_autograd_imports_no_op():
    import ast
    import pathlib

    import diagnet.autograd

    for path in pathlib.Path(diagnet.autograd.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any(n == "ops" or n.startswith(("ops.", "diagnet.ops")) for n in names), \
                f"{path.name} imports {names}"


def test_to_cpu():
    x = diagnet.tensor([1.0, 2.0], requires_grad=True)
    assert x.device == "cpu"
    assert x.to("cpu") is x and x.cpu() is x
    assert F.to_device(x, "CPU") is x


def test_requires_grad_flag_and_leaf_properties():
    x = diagnet.tensor([1.0, 2.0])
    assert not x.requires_grad and x.is_leaf and x.grad is None
    assert x.requires_grad_() is x and x.requires_grad
    x.requires_grad_(False)
    assert not x.requires_grad
    assert x.shape == (2,) and x.ndim == 1 and x.size == 2 and len(x) == 2


def test_comparisons_give_bool_tensors_without_grad():
    x = t64([1.0, 2.0, 3.0])
    for m in (x > 2.0, x >= 2.0, x < 2.0, x <= 2.0, x.eq(2.0), x > t64([0.0, 5.0, 1.0])):
        assert m.dtype == bool and not m.requires_grad
    np.testing.assert_array_equal((x > 1.5).numpy(), [False, True, True])


def test_repr():
    r = repr(t64([1.0, 2.0]))
    assert r.startswith("tensor([1., 2.]") and "float64" in r and "requires_grad=True" in r


def test_generation_increases_along_the_graph():
    x = t64([1.0])
    y = x * 2.0
    z = y + x
    assert x.generation == 0 and y.generation == 1 and z.generation == 2


def test_custom_function_needs_input_grad():
    seen = {}

    class Probe(Function):
        def forward(self, a, b):
            return a * b

        def backward(self, gy):
            seen["needs"] = self.needs_input_grad
            return gy, gy

    Probe()(t64([1.0]), t64([2.0], requires_grad=False)).backward()
    assert seen["needs"] == (True, False)


def test_ndarray_on_the_left_of_an_operator_defers_to_tensor():
    x = t64([1.0, 2.0])
    for y in (np.array([1.0, 1.0]) + x, np.array([2.0, 2.0]) * x, np.ones((2, 2)) @ x):
        assert isinstance(y, Tensor) and y.requires_grad


# ----------------------------------------------------------------------------- Python idioms

def test_bool_of_one_element_is_its_value_and_of_more_raises():
    # `if dn.tensor([0.1]) > 0.5:` used to be taken (any non-empty tensor was true) and
    # `if loss > 0.5:` on a 0-d tensor raised IndexError
    assert not (diagnet.tensor([0.1]) > 0.5)
    assert diagnet.tensor([0.7]) > 0.5
    loss = diagnet.tensor(0.7)
    assert (loss > 0.5) and not (loss < 0.5)
    with pytest.raises(ValueError, match="truth value of a tensor with 2 elements is ambiguous"):
        bool(diagnet.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="truth value of a tensor with 0 elements"):
        bool(diagnet.tensor(np.zeros(0)))
    with pytest.raises(TypeError, match="len\\(\\) of a 0-d tensor"):
        len(loss)


def test_equality_is_element_wise_like_the_other_comparisons():
    a, b = diagnet.tensor([1.0, 2.0, 3.0]), diagnet.tensor([1.0, 0.0, 3.0])
    eq, ne = a == b, a != b
    assert isinstance(eq, Tensor) and eq.dtype == np.bool_ and not eq.requires_grad
    np.testing.assert_array_equal(eq.numpy(), [True, False, True])
    np.testing.assert_array_equal(ne.numpy(), [False, True, False])
    np.testing.assert_array_equal((a == 2.0).numpy(), [False, True, False])
    assert (a == a).all() and not (a != a).any() and (a == b).any()
    # tensors stay hashable by identity (dict keys, sets)
    d = {a: 1, b: 2}
    assert d[a] == 1 and d[b] == 2 and len({a, b, a}) == 2


def test_float_int_and_index_of_one_element():
    assert float(diagnet.tensor([2.5])) == 2.5 and isinstance(float(diagnet.tensor(1)), float)
    assert int(diagnet.tensor(3.7)) == 3
    assert [10, 20, 30][diagnet.tensor(2)] == 30
    with pytest.raises(ValueError, match=r"float\(\) needs a tensor with one element; got shape \(2,\)"):
        float(diagnet.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="only integer tensors can be used as an index"):
        [1, 2][diagnet.tensor(1.0)]


def test_reusing_a_function_instance_raises():
    # Applying one instance to a and then to b used to leave a.grad None and double b's.
    class Double(Function):
        def forward(self, x):
            return 2 * x

        def backward(self, gy):
            return 2 * gy

    a, b = t64([1.0]), t64([2.0])
    f = Double()
    ya = f(a)
    with pytest.raises(RuntimeError, match="this Double instance was already applied; create "
                                           "a new instance for every call"):
        f(b)
    ya.backward()
    assert a.grad.item() == 2.0 and b.grad is None


@pytest.mark.parametrize("data, message", [
    ("abc", "tensor data must be numbers.*got str 'abc'"),
    (None, "tensor data must be numbers.*got NoneType None"),
    ([["a", 1]], "tensor data must be numeric; got list that converts to an array of dtype <U"),
    ([1, object()], "tensor data must be numeric; got list that converts to an array of dtype object"),
])
def test_non_numeric_data_is_rejected_at_construction(data, message):
    with pytest.raises(TypeError, match=message):
        diagnet.tensor(data)


@pytest.mark.parametrize("dtype", ["float16", np.complex64, "U3", object])
def test_unsupported_dtypes_are_rejected(dtype):
    with pytest.raises(TypeError, match="dtype must be float32, float64, an integer or bool dtype"):
        diagnet.tensor([1.0], dtype=dtype)


def test_grad_mode_is_per_thread():
    """A data-loading thread inside no_grad must not switch recording off for training."""
    import threading

    inside, release = threading.Event(), threading.Event()
    seen = {}

    def loader():
        with diagnet.no_grad():
            seen["loader"] = diagnet.is_grad_enabled()
            inside.set()
            release.wait(10)

    t = threading.Thread(target=loader)
    t.start()
    try:
        assert inside.wait(10)
        x = t64([1.0])
        y = x * 3.0  # the training thread, while the loader sits in no_grad
        assert diagnet.is_grad_enabled() and y.requires_grad and y.creator is not None
    finally:
        release.set()
        t.join()
    assert seen["loader"] is False
    # a new thread starts with recording on, whatever the creating thread's mode
    with diagnet.no_grad():
        worker = threading.Thread(target=lambda: seen.__setitem__("new", diagnet.is_grad_enabled()))
        worker.start()
        worker.join()
    assert seen["new"] is True


def test_set_grad_enabled_call_and_block_forms():
    with diagnet.set_grad_enabled(False):
        assert not diagnet.is_grad_enabled()
    assert diagnet.is_grad_enabled()
    diagnet.set_grad_enabled(False)
    try:
        assert not diagnet.is_grad_enabled()
    finally:
        diagnet.set_grad_enabled(True)
    assert diagnet.is_grad_enabled()


# ----------------------------------------------------------------------------- gradient shapes

class TransposedGrad(Function):
    """A custom function whose backward returns the right number of elements in the wrong
    shape (the transpose of its input's)."""

    def forward(self, x):
        return x.sum()

    def backward(self, gy):
        return np.full((3, 2), gy)


def test_a_gradient_of_the_wrong_shape_is_refused_not_reshaped():
    x = t64(np.zeros((2, 3)))
    y = TransposedGrad()(x)
    with pytest.raises(RuntimeError, match=r"TransposedGrad\.backward returned a gradient of "
                                           r"shape \(3, 2\) for input 0 of shape \(2, 3\)"):
        y.backward()
    assert x.grad is None


@pytest.mark.parametrize("grad_shape, input_shape", [
    ((3, 2), (2, 3)),        # same size, other order
    ((6,), (2, 3)),          # flattened
    ((2, 3), (6,)),          # the leading axis is not an extra one
    ((2, 3), (2, 1, 3)),     # fewer dims than the input
    ((4, 3), (2, 3)),        # a non-size-1 axis differs
])
def test_only_broadcast_reduction_may_change_a_gradient_shape(grad_shape, input_shape):
    class Wrong(Function):
        def forward(self, x):
            return x.sum()

        def backward(self, gy):
            return np.ones(grad_shape)

    y = Wrong()(t64(np.zeros(input_shape)))
    with pytest.raises(RuntimeError, match=rf"Wrong\.backward returned a gradient of shape "
                                           rf"{re_shape(grad_shape)} for input 0 of shape "
                                           rf"{re_shape(input_shape)}"):
        y.backward()
    with pytest.raises(ValueError, match="cannot be summed to shape"):
        sum_to(np.ones(grad_shape), input_shape)


@pytest.mark.parametrize("grad_shape, input_shape", [
    ((5, 2, 3), (2, 3)), ((2, 3), (1, 3)), ((2, 3), (2, 1)), ((4, 2, 3), (1, 1)), ((2, 3), ()),
])
def test_broadcast_gradients_are_still_summed(grad_shape, input_shape):
    class Broadcasting(Function):
        def forward(self, x):
            return x.sum()

        def backward(self, gy):
            return np.ones(grad_shape)

    x = t64(np.zeros(input_shape))
    Broadcasting()(x).backward()
    np.testing.assert_array_equal(
        x.grad.numpy(), np.full(input_shape, np.prod(grad_shape) / max(1, np.prod(input_shape))))


def re_shape(shape):
    import re

    return re.escape(str(tuple(shape)))


# ----------------------------------------------------------------------------- integer dtypes

@pytest.mark.parametrize("data, dtype, shown", [
    ([300, -1], "uint8", r"\[0, 255\].*300"),
    ([1, -1], "uint32", r"\[0, 4294967295\].*-1"),
    ([float("nan")], "int32", "nan"),
    ([1.0, float("inf")], "int64", "inf"),
    ([3e9], "int32", r"\[-2147483648, 2147483647\].*3e\+09|3000000000"),
    (np.array([70000], dtype=np.int64), "int16", "70000"),
    (np.array([2**63], dtype=np.uint64), "int64", "9223372036854775808"),
    (np.array([-5], dtype=np.int8), "uint16", "-5"),
    (np.array([1e10], dtype=np.float32), "int32", r"1e\+10|10000000000"),
    (128, "int8", "128"),
])
def test_values_that_do_not_fit_an_integer_dtype_are_refused(data, dtype, shown):
    with pytest.raises(ValueError, match=rf"(?s)dtype {dtype}.*{shown}"):
        diagnet.tensor(data, dtype=dtype)


@pytest.mark.parametrize("data, dtype, expected", [
    ([255, 0], "uint8", [255, 0]),
    ([-128, 127], "int8", [-128, 127]),
    ([1.9, -1.9], "int32", [1, -1]),            # truncation toward zero, as NumPy and PyTorch
    ([-0.5], "uint8", [0]),
    (np.array([2**31 - 1], dtype=np.int64), "int32", [2**31 - 1]),
    (np.array([-2.0**63]), "int64", [-2**63]),
    (np.array([True, False]), "uint8", [1, 0]),
])
def test_values_that_fit_an_integer_dtype_are_converted(data, dtype, expected):
    t = diagnet.tensor(data, dtype=dtype)
    assert t.dtype == np.dtype(dtype)
    assert t.tolist() == expected


def test_astype_to_an_integer_dtype_checks_the_range():
    with pytest.raises(ValueError, match=r"(?s)dtype uint8.*-1"):
        diagnet.tensor([1.0, -1.0]).astype("uint8")
    with pytest.raises(ValueError, match=r"(?s)dtype int16.*nan"):
        diagnet.tensor([float("nan")], dtype="float64").astype(np.int16)
    with pytest.raises(ValueError, match=r"(?s)dtype int8.*200"):
        diagnet.tensor([200]).astype("int8")
    assert diagnet.tensor([2.7, -3.0]).astype("int64").tolist() == [2, -3]


def test_data_already_in_the_target_integer_dtype_is_not_scanned(monkeypatch):
    """The range check runs only on a conversion, not on batches already in their dtype."""
    from diagnet.autograd import tensor_class

    calls = []
    real = tensor_class.check_integer_range
    monkeypatch.setattr(tensor_class, "check_integer_range",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    labels = np.arange(10, dtype=np.int64)
    diagnet.tensor(labels)
    diagnet.tensor(labels, dtype="int64")
    diagnet.Tensor(labels, dtype=np.int64)
    assert calls == []
    diagnet.tensor(labels, dtype="int32")
    assert calls == [1]


# ----------------------------------------------------------------------------- dtype arguments

@pytest.mark.parametrize("make", [
    lambda: diagnet.tensor([1.0], dtype="bogus"),
    lambda: diagnet.Tensor([1.0], dtype="bogus"),
    lambda: diagnet.tensor([1.0]).astype("bogus"),
    lambda: diagnet.tensor([1.0]).to(dtype="bogus"),
], ids=["tensor", "Tensor", "astype", "to"])
def test_an_unknown_dtype_names_the_argument_expected_and_received(make):
    with pytest.raises(TypeError, match=r"dtype must be float32, float64, an integer or bool "
                                        r"dtype.*; got 'bogus'"):
        make()


@pytest.mark.parametrize("dtype", ["float16", np.complex64])
def test_astype_refuses_unsupported_dtypes(dtype):
    with pytest.raises(TypeError, match="dtype must be float32, float64, an integer or bool"):
        diagnet.tensor([1.0]).astype(dtype)


def test_to_accepts_a_dtype_a_device_or_both():
    x = t64([1.0, 2.0])
    for y in (x.to("float32"), x.to(np.float32), x.to(dtype="float32"), x.to("cpu", "float32"),
              x.to("cpu", dtype=np.float32), x.to(device="cpu", dtype="float32")):
        assert y.dtype == np.float32 and y.device == "cpu"
        assert y.tolist() == [1.0, 2.0]
    y = x.to("float32")
    (y * 3.0).sum().backward()  # differentiable, like astype
    np.testing.assert_array_equal(x.grad.numpy(), [3.0, 3.0])
    assert x.grad.dtype == np.float64
    assert x.to("cpu") is x and x.to("float64") is x and x.to() is x


@pytest.mark.parametrize("args, kwargs, message", [
    (("bogus",), {}, r"to: expected a device \('cpu', 'cuda'\) or a dtype.*; got 'bogus'"),
    (("cpu", "cpu"), {}, "dtype must be float32, float64"),
    (("float32",), {"dtype": "float64"}, "to: got the dtype twice"),
    (("cpu",), {"device": "cpu"}, "to: got the device twice"),
    (("cpu", "float32", "x"), {}, "to: takes at most a device and a dtype"),
])
def test_to_errors_name_the_problem(args, kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message):
        t64([1.0]).to(*args, **kwargs)


@pytest.mark.gpu
def test_integer_range_check_on_cuda():
    x = diagnet.tensor([1.5, -1.0], device="cuda")
    with pytest.raises(ValueError, match=r"astype: cannot convert to dtype uint8.*got -1\.0"):
        x.astype("uint8")
    assert x.astype("int16").numpy().tolist() == [1, -1]
    with pytest.raises(ValueError, match=r"dtype int8 .*got 300"):
        diagnet.tensor(diagnet.tensor([1, 300], device="cuda"), dtype="int8")
    assert x.to("float64").device == "cuda" and x.to("float64").dtype == np.float64
