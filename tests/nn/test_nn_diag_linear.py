"""`nn.DiagLinear`: the layer against a dense computation, its initialisation, its one-time
validation, `set_offsets`, and the conversions to and from `nn.Linear`."""

from __future__ import annotations

import numpy as np
import pytest

import diagnet as dn
from diagnet import nn
from diagnet.diag import layout, validate
from tolerances import F64_GRAD_TOL, F64_TOL, GRADCHECK_TOL

SHAPES = [(12, 7), (7, 12), (9, 9)]  # (in, out): wide, tall, square W = (out, in)


def _x(shape, seed=0, dtype=np.float64):
    return dn.tensor(np.random.default_rng(seed).standard_normal(shape).astype(dtype),
                     requires_grad=True)


@pytest.mark.parametrize("n, m", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_match_the_dense_matrix(n, m, bias):
    layer = nn.DiagLinear(n, m, sparsity=0.6, bias=bias, rng=1, dtype=np.float64)
    W = layer.to_dense().numpy()
    assert W.shape == (m, n)
    x = _x((2, 3, n))
    y = layer(x)
    want = x.numpy() @ W.T + (layer.bias.numpy() if bias else 0)
    np.testing.assert_allclose(y.numpy(), want, **F64_TOL)
    gy = np.random.default_rng(5).standard_normal(y.shape)
    y.backward(gy)
    np.testing.assert_allclose(x.grad.numpy(), gy @ W, **F64_GRAD_TOL)
    dW = gy.reshape(-1, m).T @ x.numpy().reshape(-1, n)
    rows, cols = layout.diagonal_coordinates((m, n), layer.offsets.numpy())
    np.testing.assert_allclose(layer.values.grad.numpy(), dW[rows, cols], **F64_GRAD_TOL)
    if bias:
        np.testing.assert_allclose(layer.bias.grad.numpy(), gy.reshape(-1, m).sum(0),
                                   **F64_GRAD_TOL)


def test_gradcheck_through_the_layer():
    layer = nn.DiagLinear(6, 4, sparsity=0.5, rng=0, dtype=np.float64)
    x = _x((3, 6))
    assert dn.gradcheck(lambda x, v, b: layer(x), x, layer.values, layer.bias, **GRADCHECK_TOL)


def test_structure_properties():
    layer = nn.DiagLinear(784, 256, sparsity=0.9, rng=0)
    assert (layer.K, layer.P, layer.L) == (79, 784, 256)
    assert layer.shape == (256, 784) and layer.nnz == 79 * 256
    assert layer.density == pytest.approx(79 / 784) and layer.sparsity == pytest.approx(1 - 79 / 784)
    assert layer.values.shape == (79, 256) and layer.offsets.dtype == np.int64
    assert [n for n, _ in layer.named_parameters()] == ["values", "bias"]
    assert [n for n, _ in layer.named_buffers()] == ["offsets"]
    off = layer.offsets.numpy()
    assert np.all(np.diff(off) > 0) and off[0] >= 0 and off[-1] < 784


def test_offsets_and_values_are_seeded():
    a, b = nn.DiagLinear(30, 20, rng=3), nn.DiagLinear(30, 20, rng=3)
    np.testing.assert_array_equal(a.offsets.numpy(), b.offsets.numpy())
    np.testing.assert_array_equal(a.values.numpy(), b.values.numpy())
    c = nn.DiagLinear(30, 20, rng=4)
    assert not np.array_equal(a.values.numpy(), c.values.numpy())
    dn.manual_seed(11)
    d = nn.DiagLinear(30, 20)
    dn.manual_seed(11)
    np.testing.assert_array_equal(d.values.numpy(), nn.DiagLinear(30, 20).values.numpy())


@pytest.mark.parametrize("n, m", [(784, 256), (256, 784), (256, 256)])
def test_initialisation_keeps_the_output_variance_of_a_dense_layer(n, m):
    layer = nn.DiagLinear(n, m, sparsity=0.9, rng=0, dtype=np.float64)
    fan_in = layer.K * layer.L / m
    assert layer.init_bound() == pytest.approx(1 / np.sqrt(fan_in))
    assert np.abs(layer.values.numpy()).max() <= layer.init_bound()
    dense = nn.Linear(n, m, rng=0, dtype=np.float64)
    x = dn.tensor(np.random.default_rng(1).standard_normal((2048, n)))
    ratio = layer(x).numpy().var() / dense(x).numpy().var()
    # with the dense bound 1/sqrt(n) the ratio would be about the density, 0.1
    assert 0.8 < ratio < 1.25, ratio


def test_offsets_are_validated_once_not_on_every_forward(monkeypatch):
    calls = []
    real = validate.validate_offsets
    monkeypatch.setattr(validate, "validate_offsets",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = nn.DiagLinear(10, 8, sparsity=0.5, rng=0)
    x = _x((4, 10), dtype=np.float32)
    calls.clear()
    for _ in range(3):
        layer(x).sum().backward()
    assert len(calls) == 1, "the hot path must not revalidate the offsets"
    layer.set_offsets([0, 2, 4])
    calls.clear()
    layer(x)
    assert calls == [], "set_offsets validated them already"


def test_set_offsets_keeps_kept_diagonals_and_zeroes_new_ones():
    layer = nn.DiagLinear(8, 8, offsets=[1, 3, 5, 6], rng=0, dtype=np.float64)
    old = layer.values.numpy()
    layer(_x((2, 8))).sum().backward()
    grad = layer.values.grad.numpy()
    index = layer.set_offsets([0, 2, 3, 6, 7])
    np.testing.assert_array_equal(layer.offsets.numpy(), [0, 2, 3, 6, 7])
    np.testing.assert_array_equal(index, [-1, -1, 1, 3, -1])
    vals = layer.values.numpy()
    np.testing.assert_array_equal(vals[[2, 3]], old[[1, 3]])
    assert np.all(vals[[0, 1, 4]] == 0) and layer.K == 5 and layer.values.shape == (5, 8)
    np.testing.assert_array_equal(layer.values.grad.numpy()[[2, 3]], grad[[1, 3]])
    assert np.all(layer.values.grad.numpy()[[0, 1, 4]] == 0)
    # the function is that of the new structure
    x = _x((3, 8), seed=2)
    np.testing.assert_allclose(layer(x).numpy(),
                               x.numpy() @ layer.to_dense().numpy().T + layer.bias.numpy(),
                               **F64_TOL)


def test_set_offsets_init_options_and_keep_false():
    layer = nn.DiagLinear(8, 8, offsets=[1, 3], rng=0)
    old = layer.values.numpy()
    layer.set_offsets([1, 2], init="uniform", rng=0)
    v = layer.values.numpy()
    np.testing.assert_array_equal(v[0], old[0])
    assert np.all(v[1] != 0) and np.abs(v[1]).max() <= layer.init_bound()
    rows = np.full((2, 8), 7.0, np.float32)
    layer.set_offsets([2, 4], init=rows)
    np.testing.assert_array_equal(layer.values.numpy(), [v[1], rows[1]])
    index = layer.set_offsets([2, 4], keep=False)
    np.testing.assert_array_equal(index, [-1, -1])
    assert np.all(layer.values.numpy() == 0)


@pytest.mark.parametrize("offsets, init, error, match", [
    ([3, 1], "zeros", ValueError, "offsets must be sorted"),
    ([1, 1], "zeros", ValueError, "offsets must be unique"),
    ([0, 8], "zeros", ValueError, r"offsets must lie in \[0, P\) = \[0, 8\)"),
    ([0.5], "zeros", TypeError, "integer dtype"),
    ([0, 1], "gaussian", ValueError, "init must be 'zeros', 'uniform' or an array"),
    ([0, 1], np.ones((3, 8)), ValueError, r"init must have shape \(2, 8\)"),
])
def test_set_offsets_errors_leave_the_layer_unchanged(offsets, init, error, match):
    layer = nn.DiagLinear(8, 8, offsets=[1, 3, 5], rng=0)
    off, val = layer.offsets.numpy(), layer.values.numpy()
    with pytest.raises(error, match=match):
        layer.set_offsets(offsets, init=init)
    np.testing.assert_array_equal(layer.offsets.numpy(), off)
    np.testing.assert_array_equal(layer.values.numpy(), val)


def test_loading_other_offsets_changes_the_function():
    a = nn.DiagLinear(10, 6, sparsity=0.5, rng=0, dtype=np.float64)
    b = nn.DiagLinear(10, 6, sparsity=0.5, rng=1, dtype=np.float64)
    x = _x((3, 10))
    b(x)  # prepare b's kernel offsets for its old structure
    assert not np.array_equal(a.offsets.numpy(), b.offsets.numpy())
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(b(x).numpy(), a(x).numpy())


def test_conversions_between_dense_and_diagonal():
    dense = nn.Linear(12, 8, rng=0, dtype=np.float64)
    diag = nn.DiagLinear.from_dense(dense, sparsity=0.75)
    W = dense.weight.numpy()
    rows, cols = layout.diagonal_coordinates((8, 12), np.arange(12))
    norms = (W[rows, cols] ** 2).sum(1)
    assert diag.K == 3
    np.testing.assert_array_equal(diag.offsets.numpy(), np.sort(np.argsort(-norms)[:3]))
    np.testing.assert_array_equal(diag.bias.numpy(), dense.bias.numpy())
    back = nn.Linear.from_diag(diag)
    Wd = back.weight.numpy()
    kept = np.zeros_like(W, dtype=bool)
    r, c = layout.diagonal_coordinates((8, 12), diag.offsets.numpy())
    kept[r, c] = True
    np.testing.assert_array_equal(Wd[kept], W[kept])
    assert np.all(Wd[~kept] == 0)
    full = nn.DiagLinear.from_dense(dense, k=12)
    x = _x((2, 12))
    np.testing.assert_allclose(full(x).numpy(), dense(x).numpy(), **F64_TOL)
    mat = diag.to_matrix()
    assert mat.values is diag.values.data and mat.shape == (8, 12)
    with pytest.raises(TypeError, match="must be an nn.Linear"):
        nn.DiagLinear.from_dense(diag)
    with pytest.raises(TypeError, match="must be a DiagLinear"):
        nn.Linear.from_diag(dense)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(in_features=0, out_features=4), ValueError, "in_features must be a positive int"),
    (dict(in_features=4, out_features=4, sparsity=1.5), ValueError, r"sparsity must be in \[0, 1\]"),
    (dict(in_features=4, out_features=4, offsets=[4]), ValueError, "offsets"),
    (dict(in_features=4, out_features=4, dtype=np.int32), TypeError, "float32 or float64"),
])
def test_constructor_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        nn.DiagLinear(**kwargs)


def test_input_validation():
    layer = nn.DiagLinear(10, 4, rng=0)
    with pytest.raises(ValueError, match="x's last dim must be in_features=10"):
        layer(dn.tensor(np.ones((2, 9), np.float32)))
    with pytest.raises(TypeError, match="expects a Tensor"):
        layer(np.ones((2, 10), np.float32))


@pytest.mark.gpu
def test_layer_on_the_gpu_matches_the_cpu_and_set_offsets_works_there():
    cpu = nn.DiagLinear(20, 12, sparsity=0.7, rng=0, device="cpu")
    gpu = nn.DiagLinear(20, 12, sparsity=0.7, rng=0, device="cuda")
    assert gpu.values.device == "cuda" and gpu.offsets.device == "cuda"
    x = np.random.default_rng(0).standard_normal((5, 20)).astype(np.float32)
    xc, xg = dn.tensor(x, device="cpu"), dn.tensor(x, device="cuda")
    yc, yg = cpu(xc), gpu(xg)
    np.testing.assert_allclose(yg.numpy(), yc.numpy(), rtol=1e-5, atol=1e-6)
    assert gpu._kernel_offsets().dtype == np.int32  # the kernels' form, prepared once
    yc.sum().backward()
    yg.sum().backward()
    np.testing.assert_allclose(gpu.values.grad.numpy(), cpu.values.grad.numpy(), rtol=1e-5,
                               atol=1e-5)
    new = [0, 1, 5, 19]
    np.testing.assert_array_equal(gpu.set_offsets(new), cpu.set_offsets(new))
    np.testing.assert_array_equal(gpu.values.numpy(), cpu.values.numpy())
    assert gpu.values.device == "cuda" and gpu.offsets.device == "cuda"
    np.testing.assert_allclose(gpu(xg).numpy(), cpu(xc).numpy(), rtol=1e-5, atol=1e-6)


def test_set_offsets_remaps_the_state_of_every_optimizer_holding_values():
    layer = nn.DiagLinear(8, 8, offsets=[1, 3, 5], rng=0, dtype=np.float64)
    adam = dn.optim.Adam(layer.parameters(), lr=0.1)
    sgd = dn.optim.SGD([layer.values], lr=0.1, momentum=0.9)
    for _ in range(2):
        adam.zero_grad()
        sgd.zero_grad()
        layer(_x((4, 8))).sum().backward()
        adam.step()
        sgd.step()
    st = adam.state[layer.values]
    m, v = st["exp_avg"].copy(), st["exp_avg_sq"].copy()
    buf = sgd.state[layer.values]["momentum_buffer"].copy()
    bias_m = adam.state[layer.bias]["exp_avg"].copy()
    layer.set_offsets([0, 3, 5, 7])  # 3 and 5 kept (old rows 1, 2); 0 and 7 new
    st = adam.state[layer.values]
    np.testing.assert_array_equal(st["exp_avg"][[1, 2]], m[[1, 2]])
    np.testing.assert_array_equal(st["exp_avg_sq"][[1, 2]], v[[1, 2]])
    assert np.all(st["exp_avg"][[0, 3]] == 0) and np.all(st["exp_avg_sq"][[0, 3]] == 0)
    assert st["step"] == 2 and st["exp_avg"].shape == (4, 8)
    new_buf = sgd.state[layer.values]["momentum_buffer"]
    np.testing.assert_array_equal(new_buf[[1, 2]], buf[[1, 2]])
    assert np.all(new_buf[[0, 3]] == 0)
    np.testing.assert_array_equal(adam.state[layer.bias]["exp_avg"], bias_m)  # not per-row
    # training goes on with the new structure; new rows move away from zero
    adam.zero_grad()
    layer(_x((4, 8), seed=3)).sum().backward()
    adam.step()
    assert np.all(layer.values.numpy()[[0, 3]] != 0)


@pytest.mark.parametrize("offsets", [[], (), np.zeros(0, dtype=np.int64)])
def test_empty_offsets_make_a_layer_without_diagonals(offsets):
    # the format allows K = 0 (W = 0, y = bias); an empty list is read as int64
    layer = nn.DiagLinear(4, 6, offsets=offsets, rng=0, dtype=np.float64)
    assert layer.K == 0 and layer.values.shape == (0, 4) and layer.sparsity == 1.0
    y = layer(_x((2, 4)))
    np.testing.assert_array_equal(y.numpy(), np.broadcast_to(layer.bias.numpy(), (2, 6)))
    layer.set_offsets([1, 2])
    assert layer.offsets.numpy().tolist() == [1, 2]
    layer.set_offsets([])
    assert layer.K == 0


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(offsets=[0, True]), TypeError,
     r"offsets must hold ints, not bools; got offsets\[1\] = True"),
    (dict(offsets=True), TypeError,
     r"offsets must be a 1-D array or sequence of ints \(K,\); got bool True"),
    (dict(offsets=[0, 1], sparsity=float("nan")), ValueError,
     r"sparsity must be in \[0, 1\]; got nan"),
    (dict(offsets=[0, 1], sparsity="0.5"), TypeError,
     r"sparsity must be a number in \[0, 1\]; got str '0.5'"),
])
def test_constructor_refuses_bools_and_garbage_sparsity_next_to_offsets(kwargs, error, match):
    with pytest.raises(error, match=match):
        nn.DiagLinear(4, 6, rng=0, **kwargs)


def test_sparsity_is_ignored_next_to_offsets_and_none_is_accepted_there():
    layer = nn.DiagLinear(4, 6, offsets=[0, 3], sparsity=None, rng=0)
    assert layer.K == 2 and layer.target_sparsity == pytest.approx(1 - 2 / 6)


def test_set_offsets_refuses_bools_and_leaves_the_layer_unchanged():
    layer = nn.DiagLinear(8, 8, offsets=[1, 3], rng=0)
    values = layer.values.numpy()
    with pytest.raises(TypeError, match=r"offsets must hold ints, not bools"):
        layer.set_offsets([1, True])
    assert layer.offsets.numpy().tolist() == [1, 3]
    np.testing.assert_array_equal(layer.values.numpy(), values)


def test_from_dense_k_zero_is_named_as_k():
    with pytest.raises(ValueError, match=r"k must be in \[1, P\] = \[1, 6\]"):
        nn.DiagLinear.from_dense(nn.Linear(4, 6, rng=0), k=0)
