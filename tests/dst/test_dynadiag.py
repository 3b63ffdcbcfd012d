"""DynaDiag: the soft top-k layer against a dense NumPy reference, swaps, the freeze, the
controller, state dicts and a resumed run."""

import copy
import json
import math

import numpy as np
import pytest

import diagnet as dn
from diagnet import nn
from diagnet.diag.layout import diagonal_coordinates
from diagnet.dst import DynaDiag, DynaDiagLinear, TemperatureSchedule, dynadiag_layers

from tolerances import F32_GRAD_TOL, F32_TOL, F64_GRAD_TOL, F64_TOL, GRADCHECK_TOL

SHAPES = [(6, 4), (5, 7), (8, 8)]  # (out, in): tall, wide, square


# ----------------------------------------------------------------------------- the reference

def soft_scale(alpha, K, T):
    """``clamp(K softmax(alpha / T), 0, 1)`` in float64, and where the clamp is inactive."""
    z = np.asarray(alpha, dtype=np.float64) / T
    sm = np.exp(z - z.max())
    sm /= sm.sum()
    u = K * sm
    return np.clip(u, 0, 1), (u >= 0) & (u <= 1), sm


def dense_forward(layer, x):
    """``y = x @ W.T + b`` with ``W = sum_p s_p V_p`` built entry by entry (float64); the
    softmax runs over the stored diagonals (all ``P`` in reference mode)."""
    m, n = layer.shape
    offsets = layer.offsets.numpy()
    s, _, _ = soft_scale(layer.alpha.numpy()[offsets], layer.active_k, layer.T)
    rows, cols = diagonal_coordinates((m, n), offsets)
    W = np.zeros((m, n))
    V = layer.values.numpy().astype(np.float64)
    for k in range(offsets.size):
        W[rows[k], cols[k]] += s[k] * V[k]
    b = 0.0 if layer.bias is None else layer.bias.numpy().astype(np.float64)
    return np.asarray(x, np.float64) @ W.T + b, W


def dense_grads(layer, x, g):
    """Gradients of ``sum(y * g)`` in values, alpha, bias and x, by the chain rule (float64)."""
    m, n = layer.shape
    K, T = layer.active_k, layer.T
    offsets = layer.offsets.numpy()
    s, inside, sm = soft_scale(layer.alpha.numpy()[offsets], K, T)
    rows, cols = diagonal_coordinates((m, n), offsets)
    _, W = dense_forward(layer, x)
    x = np.asarray(x, np.float64)
    dW = g.T @ x                                   # gradient of the effective weight
    V = layer.values.numpy().astype(np.float64)
    dvalues = np.stack([s[k] * dW[rows[k], cols[k]] for k in range(offsets.size)])
    ds = np.array([(V[k] * dW[rows[k], cols[k]]).sum() for k in range(offsets.size)])
    du = ds * inside                               # the clamp passes gradient inside [0, 1]
    dsm = K * du
    dz = sm * (dsm - (dsm * sm).sum())             # softmax's Jacobian
    dalpha = np.zeros(layer.P)
    dalpha[offsets] = dz / T                       # diagonals not stored: outside the softmax
    return dvalues, dalpha, g.sum(axis=0), g @ W


def _x(shape, seed=0, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _spread_alpha(layer, seed=0, scale=3.0):
    """Distinct alpha values, so that the top-k and the clamps are unambiguous."""
    rng = np.random.default_rng(seed)
    layer.alpha.data = (rng.permutation(layer.P) / layer.P * scale).astype(layer.alpha.dtype)


# ----------------------------------------------------------------------------- the layer

def test_budget_pool_and_realised_sparsity():
    layer = DynaDiagLinear(20, 10, sparsity=0.9, rng=0)
    assert (layer.P, layer.L, layer.active_k) == (20, 10, 2)      # ceil(0.1 * 20)
    assert layer.n_stored == layer.K == 3                          # 2 + ceil(0.25 * 2)
    assert layer.sparsity == pytest.approx(1 - 3 / 20)
    assert layer.weight_stats() == (30, 200)
    offsets = layer.offsets.numpy()
    assert np.all(np.diff(offsets) > 0) and offsets.min() >= 0 and offsets.max() < 20
    ref = DynaDiagLinear(20, 10, sparsity=0.9, mode="reference", rng=0)
    assert ref.K == 20 and ref.active_k == 2 and ref.sparsity == 0.0
    np.testing.assert_array_equal(ref.alpha.numpy(), np.full(20, 1 / 20, np.float32))
    assert np.all(ref.bias.numpy() == 0)
    bound = 1 / math.sqrt(10)
    assert np.all(np.abs(ref.values.numpy()) <= bound) and ref.values.numpy().std() > bound / 3
    # sparse mode keeps the reference's rows of V: the same draws, then the offsets
    np.testing.assert_array_equal(layer.values.numpy(), ref.values.numpy()[offsets])
    big = DynaDiagLinear(8, 8, sparsity=0.5, pool=5.0, rng=0)
    assert big.K == 8 and np.array_equal(big.offsets.numpy(), np.arange(8))
    assert DynaDiagLinear(8, 8, sparsity=0.5, pool=0, rng=0).K == 4


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(mode="dense"), ValueError, "mode"),
    (dict(pool=-0.5), ValueError, "pool"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(sparsity=1.5), ValueError, "sparsity"),
    (dict(in_features=0), ValueError, "in_features"),
])
def test_bad_arguments(kwargs, err, match):
    args = dict(in_features=6, out_features=4)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        DynaDiagLinear(**args)
    layer = DynaDiagLinear(6, 4)
    with pytest.raises(ValueError, match="temperature"):
        layer.T = -1.0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("T", [0.05, 0.3, 5.0])
def test_reference_mode_matches_the_dense_formula(shape, T):
    m, n = shape
    layer = DynaDiagLinear(n, m, sparsity=0.6, mode="reference", rng=1, dtype=np.float64)
    _spread_alpha(layer, seed=2)
    layer.bias.data = _x((m,), seed=3)
    layer.T = T
    x = _x((5, n), seed=4)
    y = layer(dn.tensor(x, dtype="float64", requires_grad=True))
    want, _ = dense_forward(layer, x)
    np.testing.assert_allclose(y.numpy(), want, **F64_TOL)
    g = _x((5, m), seed=5)
    xt = dn.tensor(x, dtype="float64", requires_grad=True)
    (layer(xt) * dn.tensor(g, dtype="float64")).sum().backward()
    dv, dalpha, db, dx = dense_grads(layer, x, g)
    np.testing.assert_allclose(layer.values.grad.numpy(), dv, **F64_GRAD_TOL)
    np.testing.assert_allclose(layer.alpha.grad.numpy(), dalpha, **F64_GRAD_TOL)
    np.testing.assert_allclose(layer.bias.grad.numpy(), db, **F64_GRAD_TOL)
    np.testing.assert_allclose(xt.grad.numpy(), dx, **F64_GRAD_TOL)


def test_a_layer_without_bias():
    layer = DynaDiagLinear(5, 7, sparsity=0.5, bias=False, mode="reference", rng=2,
                           dtype=np.float64)
    assert layer.bias is None
    _spread_alpha(layer, seed=1)
    layer.T = 0.5
    x = _x((3, 5), seed=2)
    np.testing.assert_allclose(layer(dn.tensor(x, dtype="float64")).numpy(),
                               dense_forward(layer, x)[0], **F64_TOL)
    layer.freeze()
    assert layer(dn.tensor(x, dtype="float64")).shape == (3, 7)


def test_float32_layer_matches_the_float64_formula():
    layer = DynaDiagLinear(7, 5, sparsity=0.5, mode="reference", rng=3)
    _spread_alpha(layer, seed=1)
    layer.T = 0.5
    x = _x((4, 7), seed=2, dtype=np.float32)
    want, _ = dense_forward(layer, x)
    y = layer(dn.tensor(x))
    np.testing.assert_allclose(y.numpy(), want, **F32_TOL)
    g = _x((4, 5), seed=3, dtype=np.float32)
    (y * dn.tensor(g)).sum().backward()
    dv, dalpha, _, _ = dense_grads(layer, x, g.astype(np.float64))
    np.testing.assert_allclose(layer.values.grad.numpy(), dv, **F32_GRAD_TOL)
    np.testing.assert_allclose(layer.alpha.grad.numpy(), dalpha, **F32_GRAD_TOL)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["reference", "sparse"])
def test_gradcheck_in_values_and_alpha_with_some_scales_clamped(shape, mode):
    m, n = shape
    layer = DynaDiagLinear(n, m, sparsity=0.5, mode=mode, pool=1.0, rng=5, dtype=np.float64)
    _spread_alpha(layer, seed=6, scale=1.0)
    layer.T = 0.4
    u = layer.active_k * soft_scale(layer.alpha.numpy(), layer.active_k, layer.T)[2]
    assert (u > 1).any() and ((u < 1) & (u > 1e-3)).any()   # both regimes are exercised
    assert np.abs(u - 1).min() > 1e-4                       # and no kink within eps
    x = dn.tensor(_x((3, n), seed=7), dtype="float64")
    assert dn.gradcheck(lambda values, alpha: layer(x), layer.values, layer.alpha,
                        **GRADCHECK_TOL)


@pytest.mark.parametrize("shape", SHAPES)
def test_sparse_mode_with_a_pool_covering_all_diagonals_is_reference_mode(shape):
    m, n = shape
    ref = DynaDiagLinear(n, m, sparsity=0.7, mode="reference", rng=11)
    sparse = DynaDiagLinear(n, m, sparsity=0.7, mode="sparse", pool=100.0, rng=11)
    for layer in (ref, sparse):
        _spread_alpha(layer, seed=1)
        layer.bias.data = _x((m,), seed=2, dtype=np.float32)
        layer.T = 0.7
    x = _x((6, n), seed=3, dtype=np.float32)
    ys = [layer(dn.tensor(x)) for layer in (ref, sparse)]
    np.testing.assert_array_equal(ys[0].numpy(), ys[1].numpy())
    for y in ys:
        (y ** 2).mean().backward()
    for name in ("values", "alpha", "bias"):
        np.testing.assert_array_equal(getattr(ref, name).grad.numpy(),
                                      getattr(sparse, name).grad.numpy())


def test_sparse_mode_computes_only_its_stored_diagonals():
    layer = DynaDiagLinear(9, 6, sparsity=0.6, rng=2, dtype=np.float64)
    assert layer.K < layer.P
    _spread_alpha(layer, seed=3)
    layer.T = 1.3
    x = _x((4, 9), seed=1)
    np.testing.assert_allclose(layer(dn.tensor(x, dtype="float64")).numpy(),
                               dense_forward(layer, x)[0], **F64_TOL)
    g = _x((4, 6), seed=2)
    (layer(dn.tensor(x, dtype="float64")) * dn.tensor(g, dtype="float64")).sum().backward()
    dv, dalpha, _, _ = dense_grads(layer, x, g)
    np.testing.assert_allclose(layer.values.grad.numpy(), dv, **F64_GRAD_TOL)
    np.testing.assert_allclose(layer.alpha.grad.numpy(), dalpha, **F64_GRAD_TOL)
    # a diagonal that is not stored is outside the softmax: no gradient at all
    outside = np.setdiff1d(np.arange(layer.P), layer.offsets.numpy())
    assert np.all(layer.alpha.grad.numpy()[outside] == 0)
    assert np.all(layer.alpha.grad.numpy()[layer.offsets.numpy()] != 0)


def test_scale_and_metrics():
    layer = DynaDiagLinear(10, 10, sparsity=0.7, pool=1.0, rng=0)   # K = 3, S = 6
    layer.T = 100.0
    assert layer.effective_k() == 6 and layer.effective_sparsity == pytest.approx(0.4)
    a = np.zeros(10, np.float32)
    a[layer.offsets.numpy()[:3]] = 1.0
    layer.alpha.data = a
    layer.T = 0.02
    assert layer.effective_k() == 3                 # the others' scale is ~e^-50
    assert layer.itop() == pytest.approx(0.6)
    s = layer.scale().numpy()
    assert s.shape == (10,) and np.all((s >= 0) & (s <= 1))


# ----------------------------------------------------------------------------- swaps

def _adam_trained(layer, steps=3, lr=0.05, seed=0):
    opt = dn.optim.Adam(layer.parameters(), lr=lr)
    for i in range(steps):
        opt.zero_grad()
        x = dn.tensor(_x((8, layer.in_features), seed=seed + i, dtype=np.float32))
        (layer(x) ** 2).mean().backward()
        opt.step()
    return opt


def test_swap_on_a_constructed_case():
    layer = DynaDiagLinear(10, 10, sparsity=0.6, pool=0.5, rng=0)  # K = 4, S = 6
    initial = set(layer.offsets.numpy().tolist())
    layer.set_offsets([0, 2, 4, 6, 8, 9])
    alpha = np.zeros(10, np.float32)
    alpha[[0, 2, 4, 6, 8, 9]] = [5.0, 4.0, 3.0, 2.5, 1.0, 0.5]      # top-4 of s: 0, 2, 4, 6
    alpha[[1, 3, 5, 7]] = -1.0
    layer.alpha.data = alpha.copy()       # (the optimizer updates it in place)
    layer.T = 1.0
    opt = _adam_trained(layer, steps=1)
    layer.alpha.data = alpha.copy()       # the step moved alpha; the case wants these values
    scores = np.zeros(10)
    scores[[1, 3, 5, 7]] = [0.5, 3.0, 0.1, 2.0]   # best outsiders: 3 (3.0), then 7 (2.0)
    scores[[8, 9]] = [1.0, 2.5]                   # leavers: 9 (smallest s) then 8
    # pairs (9 -> 3): 3.0 > 2.5 swaps; (8 -> 7): 2.0 > 1.0 swaps
    assert layer.swap(scores, n=2, rng=0) == ([8, 9], [3, 7])
    np.testing.assert_array_equal(layer.offsets.numpy(), [0, 2, 3, 4, 6, 7])
    values = layer.values.numpy()
    assert np.all(values[[2, 5]] == 0)                   # rows of offsets 3 and 7
    state = opt.state[layer.values]
    assert np.all(state["exp_avg"][[2, 5]] == 0) and np.all(state["exp_avg_sq"][[2, 5]] == 0)
    assert np.all(state["exp_avg"][[0, 1, 3, 4]] != 0)   # the kept rows keep their moments
    a_state = opt.state[layer.alpha]
    assert np.all(a_state["exp_avg"][[3, 7]] == 0) and np.all(a_state["exp_avg_sq"][[3, 7]] == 0)
    assert np.all(layer.alpha.numpy()[[3, 7]] == np.float32(np.median([1.0, 0.5])))
    ever = initial | {0, 2, 4, 6, 8, 9, 3, 7}              # every set ever stored
    np.testing.assert_array_equal(np.flatnonzero(layer.ever_active.numpy()), sorted(ever))
    assert layer.itop() == pytest.approx(len(ever) / 10)


def test_swap_only_exchanges_where_the_newcomer_scores_higher():
    layer = DynaDiagLinear(10, 10, sparsity=0.6, pool=0.5, rng=0)
    layer.set_offsets([0, 2, 4, 6, 8, 9])
    layer.alpha.data = np.linspace(1, 0, 10).astype(np.float32)   # 8 and 9 are the pool
    scores = np.zeros(10)
    scores[[8, 9]] = 5.0
    scores[[1, 3, 5, 7]] = [1.0, 6.0, 2.0, 3.0]
    # pairs: (9 -> 3) 6 > 5 swaps; (8 -> 7) 3 < 5 stays
    assert layer.swap(scores, n=2, rng=0) == ([9], [3])
    assert layer.swap(np.zeros(10), n=2, rng=0) == ([], [])   # nothing beats anything
    assert layer.K == 6


def test_a_graph_that_read_alpha_before_a_swap_cannot_backward_after_it():
    layer = DynaDiagLinear(10, 10, sparsity=0.6, pool=0.5, rng=0)
    layer.set_offsets([0, 2, 4, 6, 8, 9])
    layer.alpha.data = np.linspace(1, 0, 10).astype(np.float32)   # 8 and 9 are the pool
    loss = layer.stored_scale().sum()      # reads alpha only, not the values
    scores = np.zeros(10)
    scores[3] = 9.0
    assert layer.swap(scores, n=1, rng=0) == ([9], [3])
    with pytest.raises(RuntimeError, match="modified|version|in place|in-place"):
        loss.backward()


def test_swap_invariants_over_training():
    layer = DynaDiagLinear(24, 16, sparsity=0.75, pool=0.5, rng=3)   # K = 6, S = 9
    opt = _adam_trained(layer, steps=2)
    layer.T = 0.3
    rng = np.random.default_rng(0)
    for i in range(12):
        _adam_trained_step(layer, opt, seed=10 + i)
        s = layer.scale().numpy()
        offsets = layer.offsets.numpy()
        top = set(offsets[np.argsort(s[offsets])[-layer.active_k:]].tolist())
        values_before = dict(zip(offsets.tolist(), layer.values.numpy()))
        dropped, grown = layer.swap(rng.random(24) * 2, n=2, rng=rng)
        new = layer.offsets.numpy()
        assert layer.K == 9 and layer.active_k == 6 and len(dropped) == len(grown) <= 2
        assert np.all(np.diff(new) > 0)
        assert top <= set(new.tolist()) and not (set(dropped) & top)
        assert not set(dropped) & set(grown) and set(grown) <= set(new.tolist())
        assert not set(grown) & set(offsets.tolist())
        rows = np.searchsorted(new, grown)
        assert np.all(layer.values.numpy()[rows] == 0)
        assert np.all(opt.state[layer.values]["exp_avg"][rows] == 0)
        assert np.all(opt.state[layer.alpha]["exp_avg"][grown] == 0)
        for p in set(new.tolist()) - set(grown):
            np.testing.assert_array_equal(layer.values.numpy()[np.searchsorted(new, p)],
                                          values_before[p])
    assert layer.itop() > 9 / 24


def _adam_trained_step(layer, opt, seed):
    opt.zero_grad()
    x = dn.tensor(_x((8, layer.in_features), seed=seed, dtype=np.float32))
    (layer(x) ** 2).mean().backward()
    opt.step()


def test_swap_ties_are_broken_by_the_seed():
    def grown_with(seed):
        layer = DynaDiagLinear(40, 40, sparsity=0.9, pool=1.0, rng=0)   # K = 4, S = 8
        scores = np.ones(40)                  # every outsider ties, every stored one loses
        scores[layer.offsets.numpy()] = 0.0
        return layer.swap(scores, n=4, rng=seed)

    assert grown_with(1) == grown_with(1)
    assert len({tuple(grown_with(seed)[1]) for seed in range(6)}) > 1


def test_swap_errors():
    ref = DynaDiagLinear(8, 8, mode="reference")
    with pytest.raises(ValueError, match="sparse"):
        ref.swap(np.zeros(8), 1)
    layer = DynaDiagLinear(8, 8, sparsity=0.5)
    with pytest.raises(ValueError, match="shape"):
        layer.swap(np.zeros(7), 1)
    with pytest.raises(ValueError, match="finite"):
        layer.swap(np.full(8, np.nan), 1)
    with pytest.raises(ValueError, match="n must be"):
        layer.swap(np.zeros(8), -1)
    with pytest.raises(ValueError, match="stored diagonals"):
        layer.set_offsets([0, 1])                 # a soft layer keeps its stored count
    layer.freeze()
    with pytest.raises(RuntimeError, match="frozen"):
        layer.swap(np.zeros(8), 1)


# ----------------------------------------------------------------------------- freeze

def _peaked_layer(dtype=np.float32, mode="sparse", seed=0):
    """A layer whose top-k ``alpha`` are 1 and the rest 0: at T = 0.05 the others' scale is
    ``~K e^-20 / K ~ 2e-9``, so freezing changes the function by about that."""
    layer = DynaDiagLinear(12, 9, sparsity=0.6, pool=0.5, mode=mode, rng=seed, dtype=dtype)
    alpha = np.zeros(layer.P, dtype)
    stored = layer.offsets.numpy()
    alpha[stored[[0, 2, 3, 5, 6]][:layer.active_k]] = 1.0
    layer.alpha.data = alpha
    layer.bias.data = _x((9,), seed=1, dtype=dtype)
    layer.T = 0.05
    return layer


@pytest.mark.parametrize("mode", ["sparse", "reference"])
@pytest.mark.parametrize("dtype, atol", [(np.float64, 1e-7), (np.float32, 1e-6)])
def test_freeze_keeps_the_function_and_the_hard_top_k(mode, dtype, atol):
    layer = _peaked_layer(dtype, mode)
    opt = dn.optim.Adam(layer.parameters(), lr=1e-2)
    x = dn.tensor(_x((5, 12), seed=2, dtype=dtype))
    before = layer(x).numpy()
    (layer(x) ** 2).sum().backward()
    alpha = layer.alpha.numpy().copy()
    want = np.flatnonzero(alpha == 1.0)
    assert layer.freeze() == want.tolist()
    assert layer.frozen and layer.K == layer.active_k == want.size
    np.testing.assert_array_equal(layer.offsets.numpy(), want)
    assert layer.alpha.grad is None and not layer.alpha.requires_grad
    np.testing.assert_allclose(layer(x).numpy(), before, rtol=0, atol=atol)
    s = layer.scale().numpy()
    assert np.all(s[want] == 1.0) and s.sum() == want.size
    # now exactly a DiagLinear with the same structure
    plain = nn.DiagLinear(12, 9, offsets=want, dtype=dtype)
    plain.values.data, plain.bias.data = layer.values.data.copy(), layer.bias.data.copy()
    np.testing.assert_array_equal(layer(x).numpy(), plain(x).numpy())
    # alpha no longer trains
    opt.zero_grad()
    (layer(x) ** 2).sum().backward()
    opt.step()
    assert layer.alpha.grad is None
    np.testing.assert_array_equal(layer.alpha.numpy(), alpha)
    assert layer.freeze() is None                     # a second freeze does nothing
    assert layer.effective_k() == layer.active_k
    assert layer.weight_stats() == (layer.active_k * 9, 108)


@pytest.mark.parametrize("mode", ["sparse", "reference"])
def test_freeze_folds_the_scale_into_the_kept_values_at_any_temperature(mode):
    """At T = 1 with random alpha the scales are far from 1: the kept diagonals' values are
    multiplied by them, and the frozen layer computes ``W`` of the kept diagonals, scaled
    (float64, against the dense formula)."""
    layer = DynaDiagLinear(12, 9, sparsity=0.6, pool=0.5, mode=mode, rng=0, dtype=np.float64)
    layer.alpha.data = np.random.default_rng(3).normal(size=layer.P)
    layer.bias.data = _x((9,), seed=1)
    layer.T = 1.0
    offsets, values = layer.offsets.numpy(), layer.values.numpy().copy()
    s, _, _ = soft_scale(layer.alpha.numpy()[offsets], layer.active_k, 1.0)
    kept = layer.freeze()
    rows = np.searchsorted(offsets, kept)
    assert np.sum(s[rows] < 0.99) >= 3               # the fold matters here
    np.testing.assert_allclose(layer.values.numpy(), values[rows] * s[rows, None],
                               rtol=1e-15, atol=0)
    r, c = diagonal_coordinates(layer.shape, np.asarray(kept))
    W = np.zeros(layer.shape)
    for k, row in enumerate(rows):
        W[r[k], c[k]] += s[row] * values[row]
    x = _x((5, 12), seed=4)
    np.testing.assert_allclose(layer(dn.tensor(x)).numpy(), x @ W.T + layer.bias.numpy(),
                               **F64_TOL)


def test_freeze_ties_go_to_the_lower_offset():
    layer = DynaDiagLinear(10, 10, sparsity=0.7, pool=1.0, rng=0)   # K = 3, S = 6
    layer.set_offsets([1, 2, 4, 5, 7, 9])
    layer.alpha.data = np.zeros(10, np.float32)                     # all tie
    assert layer.freeze() == [1, 2, 4]


def _copy_state(module):
    return {k: v.data.copy() for k, v in module.state_dict().items()}


def test_frozen_state_dict_loads_into_a_fresh_layer():
    layer = _peaked_layer()
    layer.freeze()
    layer.T = 0.07
    state = _copy_state(layer)
    assert state["is_frozen"].shape == () and state["temperature"].shape == ()
    fresh = DynaDiagLinear(12, 9, sparsity=0.6, pool=0.5, rng=99)
    opt = _adam_trained(fresh, steps=1)
    fresh.check_state_dict(state)                    # checks, changes nothing
    assert not fresh.frozen and fresh.K == fresh.n_stored
    fresh.load_state_dict(state)
    assert fresh.frozen and fresh.T == pytest.approx(0.07) and not fresh.alpha.requires_grad
    assert opt.state[fresh.values]["exp_avg"].shape == fresh.values.shape
    x = dn.tensor(_x((3, 12), seed=5, dtype=np.float32))
    np.testing.assert_array_equal(fresh(x).numpy(), layer(x).numpy())
    # and back: a soft state into the frozen layer
    soft = DynaDiagLinear(12, 9, sparsity=0.6, pool=0.5, rng=4)
    fresh.load_state_dict(_copy_state(soft))
    assert not fresh.frozen and fresh.alpha.requires_grad and fresh.K == soft.K
    np.testing.assert_array_equal(fresh(x).numpy(), soft(x).numpy())


def _nested(seed):
    return nn.Sequential(DynaDiagLinear(12, 9, sparsity=0.6, rng=seed), nn.ReLU(),
                         DynaDiagLinear(9, 12, sparsity=0.6, rng=seed + 1))


def _trained_nested(model, steps, opt=None, seed=0):
    """Adam steps on ``_nested``'s model (a new Adam unless ``opt``); returns the optimizer."""
    opt = opt or dn.optim.Adam(model.parameters(), lr=0.05)
    for i in range(steps):
        opt.zero_grad()
        (model(dn.tensor(_x((8, 12), seed=seed + i, dtype=np.float32))) ** 2).mean().backward()
        opt.step()
    return opt


def test_nested_layers_take_the_stored_count_of_the_state():
    saved = _nested(0)
    saved[0].freeze()
    state = _copy_state(saved)
    target = _nested(5)
    opt = _trained_nested(target, steps=1)
    before, moments = _copy_state(target), opt.state[target[0].values]["exp_avg"]
    target.check_state_dict(state)                   # fits; changes nothing
    # refused by the other layer after the first was resized: the resize is undone
    bad = dict(state, **{"2.temperature": np.array(-1.0, np.float32)})
    with pytest.raises(ValueError, match="temperature"):
        target.load_state_dict(bad)
    for key, value in _copy_state(target).items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)
    assert opt.state[target[0].values]["exp_avg"] is moments and not target[0].frozen
    target.load_state_dict(state)
    assert target[0].frozen and not target[2].frozen
    assert opt.state[target[0].values]["exp_avg"].shape == target[0].values.shape
    x = dn.tensor(_x((3, 12), seed=1, dtype=np.float32))
    np.testing.assert_array_equal(target(x).numpy(), saved(x).numpy())
    assert list(dynadiag_layers(target)) == ["0", "2"]


def test_a_frozen_checkpoint_loads_into_a_fresh_model_and_optimizer(tmp_path):
    """The fresh layers store S diagonals, the checkpoint's frozen one K: `diagnet.load`
    resizes the layer (and the optimizer's per-row state) before it checks the optimizer's
    saved moments, and undoes that when any component is refused."""
    saved = _nested(0)
    saved_opt = _trained_nested(saved, steps=2)
    saved[0].freeze()
    _trained_nested(saved, steps=1, opt=saved_opt, seed=9)
    path = tmp_path / "frozen.safetensors"
    dn.save(path, model=saved, optimizer=saved_opt, dst=DynaDiag(saved, rng=0))

    target = _nested(5)
    opt = _trained_nested(target, steps=1)
    before = _copy_state(target)
    moments = {name: dict(opt.state[p]) for name, p in target.named_parameters()}
    with pytest.raises(ValueError, match="layers"):  # a controller of other layers
        dn.load(path, model=target, optimizer=opt, dst=DynaDiag({"x": target[0]}, rng=0))
    for key, value in _copy_state(target).items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)
    for name, p in target.named_parameters():
        assert opt.state[p] == moments[name] or all(
            opt.state[p][k] is moments[name][k] for k in moments[name]), name

    dn.load(path, model=target, optimizer=opt)
    assert target[0].frozen and target[0].K == target[0].active_k
    for (key, a), b in zip(saved_opt.state_dict()["state"].items(),
                           opt.state_dict()["state"].values()):
        np.testing.assert_array_equal(a["exp_avg"], b["exp_avg"], err_msg=str(key))
    x = dn.tensor(_x((3, 12), seed=1, dtype=np.float32))
    np.testing.assert_array_equal(target(x).numpy(), saved(x).numpy())


def test_inconsistent_states_are_refused():
    layer = DynaDiagLinear(12, 9, sparsity=0.6, rng=0)
    state = _copy_state(layer)
    state["offsets"] = state["offsets"][:-1]
    state["values"] = state["values"][:-1]
    with pytest.raises(ValueError, match="stores"):
        layer.load_state_dict(state)
    bad = _copy_state(layer)
    bad["temperature"] = np.array(-1.0, np.float32)
    with pytest.raises(ValueError, match="temperature"):
        layer.load_state_dict(bad)
    assert layer.T == 1.0 and layer.K == layer.n_stored


# ----------------------------------------------------------------------------- the controller

def _model(seed=0, dtype=np.float32):
    return nn.Sequential(DynaDiagLinear(16, 12, sparsity=0.7, pool=0.5, rng=seed, dtype=dtype),
                         nn.ReLU(),
                         DynaDiagLinear(12, 10, sparsity=0.6, pool=0.5, rng=seed + 1,
                                        dtype=dtype))


def _run(model, opt, ctrl, steps, start=0, per_epoch=4, dtype=np.float32):
    events = []
    target = np.random.default_rng(123).standard_normal((16, 10)).astype(dtype)
    for step in range(start, start + steps):
        if step % per_epoch == 0:
            events += ctrl.start_epoch(step // per_epoch)
        ctrl.before_step(step)
        xb = _x((8, 16), seed=1000 + step, dtype=dtype)
        loss = ((model(dn.tensor(xb)) - dn.tensor(xb @ target)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        events += ctrl.after_step(step)
    return events


def test_controller_sets_the_temperature_per_epoch_and_per_step():
    model = _model()
    layers = dynadiag_layers(model)
    per_epoch = TemperatureSchedule("cosine", 5)
    ctrl = DynaDiag(model, schedule=per_epoch)
    for epoch in range(7):
        assert ctrl.start_epoch(epoch) == []
        assert all(layer.T == per_epoch(epoch) for layer in layers.values())
    per_step = TemperatureSchedule("linear", 10, per="step")
    ctrl = DynaDiag(layers, schedule=per_step)
    ctrl.start_epoch(0)
    for step in range(12):
        ctrl.before_step(step)
        assert all(layer.T == per_step(step) for layer in layers.values())
        assert ctrl.metrics()["temperature"] == per_step(step)


def test_controller_swaps_at_the_right_steps_and_logs_them():
    model = _model()
    opt = dn.optim.Adam(model.parameters(), lr=1e-2)
    ctrl = DynaDiag(model, schedule=TemperatureSchedule("cosine", 12, per="step"),
                    swap_every=3, swap_until=9, rng=0)
    events = _run(model, opt, ctrl, 12)
    swaps = [e for e in events if e["event"] == "swap"]
    assert [e["step"] for e in swaps] == [2, 2, 5, 5, 8, 8]
    assert {e["layer"] for e in swaps} == {"0", "2"} and ctrl.swaps == 3
    json.dumps(events)
    for e in swaps:
        layer = model[int(e["layer"])]
        assert set(e) == {"event", "step", "layer", "dropped", "grown", "k", "stored",
                          "sparsity", "effective_k", "itop", "temperature"}
        assert len(e["dropped"]) == len(e["grown"]) <= math.ceil(0.5 * (layer.K - layer.active_k))
        assert e["k"] == layer.active_k and e["stored"] == layer.K
        assert e["sparsity"] == pytest.approx(1 - layer.K / layer.P)
    assert any(e["grown"] for e in swaps)
    assert not ctrl.tap.armed
    m = ctrl.metrics()
    assert set(m) == {"sparsity", "temperature", "effective_k", "effective_sparsity", "itop"}
    stored = sum(layer.K * layer.L for layer in (model[0], model[2]))
    assert m["sparsity"] == pytest.approx(1 - stored / (16 * 12 + 12 * 10))
    assert m["itop"] > (model[0].K + model[2].K) / (16 + 12)


def test_controller_freezes_at_an_epoch_and_at_a_step():
    model = _model()
    opt = dn.optim.Adam(model.parameters(), lr=1e-2)
    ctrl = DynaDiag(model, schedule=TemperatureSchedule("cosine", 2), swap_every=2,
                    freeze_at=2, rng=0)
    events = _run(model, opt, ctrl, 12, per_epoch=4)
    freezes = [e for e in events if e["event"] == "freeze"]
    assert [(e["step"], e["epoch"], e["layer"]) for e in freezes] == [(8, 2, "0"), (8, 2, "2")]
    assert all(e["stored"] == e["k"] == len(e["kept"]) for e in freezes)
    assert max(e["step"] for e in events if e["event"] == "swap") == 7   # none once frozen
    assert model[0].frozen and model[2].frozen and ctrl.metrics()["effective_k"] == \
        model[0].active_k + model[2].active_k

    model = _model()
    opt = dn.optim.Adam(model.parameters(), lr=1e-2)
    ctrl = DynaDiag(model, freeze_at=5, freeze_per="step")
    events = _run(model, opt, ctrl, 8)
    assert [(e["event"], e["step"]) for e in events] == [("freeze", 4), ("freeze", 4)]


def test_controller_argument_errors():
    model = _model()
    with pytest.raises(ValueError, match="reference"):
        DynaDiag({"r": DynaDiagLinear(8, 8, mode="reference")}, swap_every=2)
    with pytest.raises(TypeError, match="DynaDiagLinear"):
        DynaDiag({"d": nn.DiagLinear(8, 8)})
    with pytest.raises(ValueError, match="at least one"):
        DynaDiag(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(TypeError, match="schedule"):
        DynaDiag(model, schedule="cosine")
    for kwargs, name in [(dict(swap_every=0), "swap_every"), (dict(swap_fraction=0), "fraction"),
                         (dict(freeze_at=0, freeze_per="step"), "freeze_at"),
                         (dict(freeze_per="batch"), "freeze_per"),
                         (dict(swap_until=-1), "swap_until")]:
        with pytest.raises(ValueError, match=name):
            DynaDiag(model, **kwargs)
    ctrl = DynaDiag(model)
    with pytest.raises(ValueError, match="layers"):
        ctrl.load_state_dict({**ctrl.state_dict(), "layers": ["x", "y"]})
    with pytest.raises(ValueError, match="rng"):
        ctrl.load_state_dict({**ctrl.state_dict(), "rng": {"bit_generator": "nope"}})


@pytest.mark.parametrize("kind, field, value, message", [
    ("PCG64", "state", 1.5, r"state\['state'\]\['state'\] must be an int; got float 1.5"),
    ("PCG64", "inc", 4, r"state\['state'\]\['inc'\] must be odd"),
    ("PCG64", "extra", 1, r"state\['state'\] has the unknown field 'extra'"),
    ("MT19937", "pos", 10 ** 6, r"state\['state'\]\['pos'\] must be in \[0, 624\]"),
], ids=["float", "even-inc", "extra-key", "mt19937-pos"])
def test_generator_state_is_checked_field_by_field(kind, field, value, message):
    """A saved generator state that NumPy would take but not hold as given (a truncated
    float, an even PCG64 increment, an extra key, an MT19937 position past its key) is
    refused, and the controller keeps its own."""
    ctrl = DynaDiag(_model(), rng=np.random.Generator(getattr(np.random, kind)(3)))
    good = ctrl.state_dict()
    bad = copy.deepcopy(good)
    bad["rng"]["state"][field] = value
    bad["next_step"] += 1
    with pytest.raises(ValueError, match=f"DynaDiag state 'rng' is not a valid {kind} state: "
                                         f"{message}"):
        ctrl.load_state_dict(bad)
    np.testing.assert_equal(ctrl.state_dict(), good)


def _controller(model, rng=7):
    return DynaDiag(model, schedule=TemperatureSchedule("cosine", 16, per="step"),
                    swap_every=3, swap_fraction=1.0, freeze_at=13, freeze_per="step", rng=rng)


@pytest.mark.parametrize("half", [8, 14])   # save before the freeze, and after it
def test_resumed_run_continues_bit_for_bit(half):
    N = 20
    model = _model(0)
    opt = dn.optim.Adam(model.parameters(), lr=2e-2)
    ctrl = _controller(model)
    full_events = _run(model, opt, ctrl, N)

    model2 = _model(0)
    opt2 = dn.optim.Adam(model2.parameters(), lr=2e-2)
    ctrl2 = _controller(model2)
    events = _run(model2, opt2, ctrl2, half)
    saved_model = _copy_state(model2)
    saved_opt = opt2.state_dict()
    saved_opt["state"] = {k: {n: (v.copy() if hasattr(v, "copy") else v) for n, v in s.items()}
                          for k, s in saved_opt["state"].items()}
    saved_ctrl = json.loads(json.dumps(ctrl2.state_dict()))

    model3 = _model(42)                       # another init, another structure
    opt3 = dn.optim.Adam(model3.parameters(), lr=2e-2)
    ctrl3 = _controller(model3, rng=1)
    model3.load_state_dict(saved_model)          # takes the saved stored counts
    opt3.load_state_dict(saved_opt)
    ctrl3.load_state_dict(saved_ctrl)
    events += _run(model3, opt3, ctrl3, N - half, start=half)

    assert events == full_events
    for (name, a), (_, b) in zip(model.state_dict().items(), model3.state_dict().items()):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)
    assert ctrl3.state_dict() == json.loads(json.dumps(ctrl.state_dict()))


def test_checkpoint_round_trip_of_the_controller(tmp_path):
    model = _model(0)
    opt = dn.optim.Adam(model.parameters(), lr=2e-2)
    ctrl = _controller(model)
    _run(model, opt, ctrl, 7)
    path = tmp_path / "run.safetensors"
    dn.save(path, model=model, optimizer=opt, dst=ctrl)
    model2 = _model(3)
    opt2 = dn.optim.Adam(model2.parameters(), lr=2e-2)
    ctrl2 = _controller(model2, rng=0)
    dn.load(path, model=model2, optimizer=opt2, dst=ctrl2)
    assert ctrl2.state_dict() == ctrl.state_dict()
    assert _run(model2, opt2, ctrl2, 9, start=7) == _run(model, opt, ctrl, 9, start=7)
    for (name, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
def test_the_layer_on_the_gpu_matches_the_cpu():
    layers = {dev: DynaDiagLinear(12, 9, sparsity=0.6, pool=1.0, rng=0, device=dev)
              for dev in ("cpu", "cuda")}
    gpu, cpu = layers["cuda"], layers["cpu"]
    assert gpu.alpha.device == "cuda" and gpu.ever_active.device == "cuda"
    for layer in layers.values():
        layer.alpha.data = layer.alpha.data + dn.backend.to_device(
            np.linspace(0, 1, 12).astype(np.float32), layer.alpha.device)
        layer.T = 0.3
    x = _x((5, 12), seed=1, dtype=np.float32)
    ys = {dev: layer(dn.tensor(x, device=dev)) for dev, layer in layers.items()}
    np.testing.assert_allclose(ys["cuda"].numpy(), ys["cpu"].numpy(), **F32_TOL)
    for y in ys.values():
        (y ** 2).mean().backward()
    for name in ("values", "alpha", "bias"):
        np.testing.assert_allclose(getattr(gpu, name).grad.numpy(),
                                   getattr(cpu, name).grad.numpy(), **F32_GRAD_TOL)
    scores = np.random.default_rng(2).random(12)
    assert gpu.swap(dn.backend.to_device(scores, "cuda"), 3, rng=5) == cpu.swap(scores, 3, rng=5)
    np.testing.assert_array_equal(gpu.offsets.numpy(), cpu.offsets.numpy())
    assert gpu.freeze() == cpu.freeze()
    assert gpu.effective_k() == cpu.effective_k() and gpu.itop() == cpu.itop()
    np.testing.assert_allclose(gpu(dn.tensor(x, device="cuda")).numpy(),
                               cpu(dn.tensor(x, device="cpu")).numpy(), **F32_TOL)


@pytest.mark.gpu
def test_a_soft_training_step_reads_nothing_back_from_the_gpu():
    cp = dn.backend.cupy_or_none()
    if not hasattr(cp, "host_transfers"):
        pytest.skip("counting host transfers needs the CuPy stand-in (--fake-cupy)")
    layer = DynaDiagLinear(12, 9, sparsity=0.6, rng=0, device="cuda")
    opt = dn.optim.Adam(layer.parameters(), lr=1e-2)
    ctrl = DynaDiag({"fc": layer}, schedule=TemperatureSchedule("cosine", 10, per="step"),
                    swap_every=4)
    x = dn.tensor(_x((5, 12), seed=1, dtype=np.float32), device="cuda")
    layer(x)  # the first call prepares (validates) the offsets once
    before = cp.host_transfers
    for step in range(3):  # no swap in steps 0-2: the temperature is set on the device
        ctrl.before_step(step)
        opt.zero_grad()
        (layer(x) ** 2).mean().backward()
        opt.step()
        assert ctrl.after_step(step) == []
    assert cp.host_transfers == before, "a device-to-host read in a DynaDiag training step"
