"""`MaskedLinear` (the unstructured baseline layer) and `UnstructuredPruneGrow` (element-wise
SET and RigL).

Checked: the mask's density is exact and seeded; the forward is the masked dense product
and pruned weights get zero gradient; pruned weights and their optimizer state stay zero
through Adam (L2 weight decay), AdamW and SGD (momentum, weight decay), also across mask
changes; `set_mask` zeroes the changed entries and their state in every optimizer holding
the weight; the controller keeps each mask's density exactly, follows the cosine schedule,
drops the lowest |w|, grows only inactive entries (at random, or by |dense gradient|), and
resumes bit for bit from a state dict.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

import diagnet as dn
from diagnet import backend, nn
from diagnet.dst import MaskedLinear, UnstructuredPruneGrow, drop_fraction
from tolerances import F64_GRAD_TOL, F64_TOL


def _batch(step, n_in=12, n_out=9, B=6, dtype=np.float64, device="cpu"):
    rng = np.random.default_rng(2000 + step)
    return (dn.tensor(rng.standard_normal((B, n_in)).astype(dtype), device=device),
            dn.tensor(rng.standard_normal((B, n_out)).astype(dtype), device=device))


def _train(layer, opts, ctrl, steps, start=0, check=None):
    """Steps in the controllers' order; ``check(t)`` runs after ``after_step``."""
    events = []
    for t in range(start, start + steps):
        x, y = _batch(t, layer.in_features, layer.out_features, dtype=layer.weight.dtype)
        if ctrl is not None:
            ctrl.before_step(t)
        loss = ((layer(x) - y) ** 2).mean()
        for opt in opts:
            opt.zero_grad()
        loss.backward()
        for opt in opts:
            opt.step()
        if ctrl is not None:
            events += ctrl.after_step(t)
        if check is not None:
            check(t)
    return events


def _state_arrays(opt, param):
    return {k: v for k, v in opt.state.get(param, {}).items() if backend.is_array(v)}


def _assert_pruned_are_zero(layer, opts):
    off = ~layer.mask.numpy()
    assert np.all(layer.weight.numpy()[off] == 0)
    for opt in opts:
        for key, value in _state_arrays(opt, layer.weight).items():
            assert np.all(value[off] == 0), f"{type(opt).__name__} {key} at pruned weights"


OPTIMIZERS = {
    "adam-l2": lambda ps: dn.optim.Adam(ps, lr=0.05, weight_decay=0.1, amsgrad=True),
    "adamw": lambda ps: dn.optim.AdamW(ps, lr=0.05, weight_decay=0.1),
    "sgd-momentum": lambda ps: dn.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.1,
                                            nesterov=True),
}


# ----------------------------------------------------------------------------- the layer

def test_mask_has_the_exact_density_and_is_seeded():
    layer = MaskedLinear(30, 20, density=0.25, rng=0)
    mask = layer.mask.numpy()
    assert mask.dtype == np.bool_ and mask.shape == (20, 30) and mask.sum() == 150
    assert layer.nnz == 150 and layer.weight_stats() == (150, 600)
    assert layer.density == 0.25 and layer.sparsity == 0.75
    assert np.all(layer.weight.numpy()[~mask] == 0) and np.all(layer.weight.numpy()[mask] != 0)
    assert [n for n, _ in layer.named_buffers()] == ["mask"]
    assert set(layer.state_dict()) == {"weight", "bias", "mask"}
    same, other = MaskedLinear(30, 20, density=0.25, rng=0), MaskedLinear(30, 20, density=0.25,
                                                                           rng=1)
    np.testing.assert_array_equal(same.mask.numpy(), mask)
    np.testing.assert_array_equal(same.weight.numpy(), layer.weight.numpy())
    assert not np.array_equal(other.mask.numpy(), mask)
    # a density computed as k / size gives back k exactly
    assert MaskedLinear(7, 13, density=37 / 91, rng=0).nnz == 37
    assert MaskedLinear(7, 13, density=1e-9, rng=0).nnz == 1   # never empty


def test_initialisation_uses_the_sparse_fan_in():
    layer = MaskedLinear(400, 50, density=0.1, rng=0, dtype=np.float64)
    bound = 1 / math.sqrt(layer.nnz / 50)   # 40 active weights per output on average
    w = np.abs(layer.weight.numpy()[layer.mask.numpy()])
    assert w.max() <= bound and w.max() > 0.9 * bound
    assert np.abs(layer.bias.numpy()).max() <= bound


def test_forward_and_gradients_are_those_of_the_masked_dense_matrix():
    layer = MaskedLinear(12, 9, density=0.4, rng=3, dtype=np.float64)
    layer.weight.data = np.random.default_rng(0).standard_normal((9, 12))  # nonzero everywhere
    W = layer.weight.numpy() * layer.mask.numpy()
    x = dn.tensor(np.random.default_rng(1).standard_normal((2, 5, 12)), requires_grad=True)
    y = layer(x)
    np.testing.assert_allclose(y.numpy(), x.numpy() @ W.T + layer.bias.numpy(), **F64_TOL)
    gy = np.random.default_rng(2).standard_normal(y.shape)
    y.backward(gy)
    dW = gy.reshape(-1, 9).T @ x.numpy().reshape(-1, 12)
    np.testing.assert_allclose(layer.weight.grad.numpy(), dW * layer.mask.numpy(),
                               **F64_GRAD_TOL)
    assert np.all(layer.weight.grad.numpy()[~layer.mask.numpy()] == 0)
    np.testing.assert_allclose(x.grad.numpy(), gy @ W, **F64_GRAD_TOL)


def test_from_linear_and_an_explicit_mask():
    dense = nn.Linear(10, 6, rng=0, dtype=np.float64)
    layer = MaskedLinear.from_linear(dense, 0.5, rng=1)
    mask = layer.mask.numpy()
    assert layer.nnz == 30 and layer.weight.dtype == np.float64
    np.testing.assert_array_equal(layer.weight.numpy(), dense.weight.numpy() * mask)
    np.testing.assert_array_equal(layer.bias.numpy(), dense.bias.numpy())
    assert layer.bias.data is not dense.bias.data
    np.testing.assert_array_equal(MaskedLinear.from_linear(dense, 0.5, rng=1).mask.numpy(), mask)
    explicit = MaskedLinear(10, 6, mask=mask.tolist(), bias=False, rng=0)
    np.testing.assert_array_equal(explicit.mask.numpy(), mask)
    assert explicit.bias is None and explicit.nnz == 30


@pytest.mark.parametrize("make, error, message", [
    (lambda: MaskedLinear(4, 3, density=0.0), ValueError, r"density must be a number in \(0, 1\]"),
    (lambda: MaskedLinear(4, 3, density=1.5), ValueError, "density must be"),
    (lambda: MaskedLinear(4, 3, mask=np.ones((4, 3), bool)), ValueError,
     r"mask must have the weight's shape \(3, 4\)"),
    (lambda: MaskedLinear(4, 3, mask=np.ones((3, 4))), TypeError, "mask must be a boolean array"),
    (lambda: MaskedLinear(4, 3, dtype=np.int32), TypeError, "float32 or float64"),
    (lambda: MaskedLinear.from_linear(nn.DiagLinear(4, 3), 0.5), TypeError,
     "must be an nn.Linear"),
    (lambda: MaskedLinear(4, 3, rng=0).set_mask(np.ones((4, 3), bool)), ValueError,
     "weight's shape"),
])
def test_bad_arguments_raise_clear_errors(make, error, message):
    with pytest.raises(error, match=message):
        make()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_pruned_weights_and_their_state_stay_zero_through_training(name):
    layer = MaskedLinear(12, 9, density=0.3, rng=5, dtype=np.float64)
    opt = OPTIMIZERS[name](layer.parameters())
    _train(layer, [opt], None, 5, check=lambda t: _assert_pruned_are_zero(layer, [opt]))
    # and across a mask change: the newly pruned weights stay at zero afterwards
    new = np.random.default_rng(9).random((9, 12)) < 0.3
    layer.set_mask(new)
    _assert_pruned_are_zero(layer, [opt])
    _train(layer, [opt], None, 5, start=5,
           check=lambda t: _assert_pruned_are_zero(layer, [opt]))
    assert np.any(layer.weight.numpy()[new] != 0)   # while the active ones train


def test_set_mask_zeroes_changed_entries_and_their_state_in_every_optimizer():
    layer = MaskedLinear(12, 9, density=0.5, rng=6, dtype=np.float64)
    adam = dn.optim.Adam(layer.parameters(), lr=0.05)
    sgd = dn.optim.SGD([layer.weight], lr=0.05, momentum=0.9)   # a second holder
    _train(layer, [adam, sgd], None, 3)
    x, y = _batch(99)
    ((layer(x) - y) ** 2).mean().backward()                      # a pending gradient
    old = layer.mask.numpy()
    rng = np.random.default_rng(3)
    new = old.copy()
    pruned = tuple(np.argwhere(old)[rng.choice(old.sum(), 10, replace=False)].T)
    grown = tuple(np.argwhere(~old)[rng.choice((~old).sum(), 4, replace=False)].T)
    new[pruned], new[grown] = False, True
    kept = old & new
    before = {"w": layer.weight.numpy(), "g": layer.weight.grad.numpy(),
              **{f"adam.{k}": v.copy() for k, v in _state_arrays(adam, layer.weight).items()},
              "sgd": sgd.state[layer.weight]["momentum_buffer"].copy()}
    layer.set_mask(new)
    after = {"w": layer.weight.numpy(), "g": layer.weight.grad.numpy(),
             **{f"adam.{k}": v for k, v in _state_arrays(adam, layer.weight).items()},
             "sgd": sgd.state[layer.weight]["momentum_buffer"]}
    for key in before:
        np.testing.assert_array_equal(after[key][kept], before[key][kept], err_msg=key)
        assert np.all(after[key][~kept] == 0), key
        assert np.all(before[key][pruned] != 0), key   # so the zeros come from set_mask
    assert layer.nnz == old.sum() - 6 and layer.weight_stats() == (int(new.sum()), 108)
    assert adam.state[layer.weight]["step"] == 3
    new[0, 0] = not new[0, 0]                                    # the caller's array ...
    assert layer.mask.numpy()[0, 0] != new[0, 0]                 # ... is not aliased


def test_layer_state_dict_round_trip_recounts_the_mask():
    a = MaskedLinear(12, 9, density=0.3, rng=0, dtype=np.float64)
    b = MaskedLinear(12, 9, density=0.6, rng=1, dtype=np.float64)
    b.load_state_dict(a.state_dict())
    assert b.nnz == a.nnz and b.density == a.density
    x, _ = _batch(0)
    np.testing.assert_array_equal(b(x).numpy(), a(x).numpy())


# ----------------------------------------------------------------------------- the controller

@pytest.mark.parametrize("method", ["set", "rigl"])
def test_density_is_exactly_constant_and_counts_follow_the_schedule(method):
    layer = MaskedLinear(12, 9, density=0.3, rng=1, dtype=np.float64)
    k = layer.nnz
    ctrl = UnstructuredPruneGrow({"fc": layer}, method, delta_t=2, t_end=15, f0=0.4, rng=0)
    opt = dn.optim.Adam(layer.parameters(), lr=0.05)
    masks = [layer.mask.numpy()]

    def check(t):
        assert layer.mask.numpy().sum() == k == layer.nnz
        if ctrl.is_update_step(t):
            masks.append(layer.mask.numpy())

    events = _train(layer, [opt], ctrl, 20, check=check)
    assert [e["step"] for e in events] == [1, 3, 5, 7, 9, 11, 13]
    for e, old, new in zip(events, masks, masks[1:]):
        f = drop_fraction(e["step"] + 1, 0.4, 15)
        n = math.floor(f * k + 0.5)
        assert e["fraction"] == f and e["dropped"] == e["grown"] == n and e["k"] == k
        assert (old & ~new).sum() == n and (new & ~old).sum() == n   # disjoint, n each
        assert e["sparsity"] == pytest.approx(1 - k / 108)
    # by hand: k = 0.3 * 108 = 32.4 -> 32; the first update (clock 2) has
    # f = 0.2 (1 + cos(2 pi / 15)) = 0.3827 and 0.3827 * 32 = 12.25 -> 12
    assert k == 32 and events[0]["dropped"] == 12
    assert ctrl.metrics()["itop"] > k / 108


def test_set_drops_the_lowest_magnitudes_and_grows_only_inactive_entries():
    layer = MaskedLinear(10, 8, density=0.5, rng=2, dtype=np.float64)
    mask = layer.mask.numpy()
    rng = np.random.default_rng(0)
    w = rng.permutation(80).reshape(8, 10).astype(float) + 1.0   # distinct magnitudes
    layer.weight.data = np.where(mask, -w, 0.0)                  # signs do not matter
    ctrl = UnstructuredPruneGrow({"fc": layer}, "set", delta_t=1, t_end=1000, f0=0.25, rng=0)
    (e,) = ctrl.after_step(0)
    n = e["dropped"]
    assert n == 10   # round(0.25 * 40)
    new = layer.mask.numpy()
    lowest = np.argsort(np.where(mask, w, np.inf), axis=None)[:n]
    dropped = np.flatnonzero((mask & ~new).reshape(-1))
    assert sorted(dropped) == sorted(lowest)
    grown = new & ~mask
    assert grown.sum() == n and not np.any(grown & mask)
    assert np.all(layer.weight.numpy()[grown] == 0)


def test_rigl_grows_by_the_dense_gradient_magnitude():
    m, n = 8, 10
    layer = MaskedLinear(n, m, density=0.5, rng=3, dtype=np.float64)
    mask = layer.mask.numpy()
    w = np.where(mask, 1.0 + np.random.default_rng(0).random((m, n)), 0.0)
    low = tuple(np.argwhere(mask)[:3].T)
    w[low] = 0.01                                                # the 3 to drop
    layer.weight.data = w
    G = 0.01 * np.random.default_rng(1).standard_normal((m, n))
    targets = tuple(np.argwhere(~mask)[[0, 5, 11]].T)            # inactive: grow these
    G[targets] = [-7.0, 6.0, 5.0]                                # |.|: the sign does not matter
    G[low] = 100.0                                               # dropped now: never regrown
    ctrl = UnstructuredPruneGrow({"fc": layer}, "rigl", delta_t=1, t_end=1000, f0=0.075, rng=0)
    ctrl.before_step(0)
    x = dn.tensor(np.eye(n))
    (layer(x) * dn.tensor(G.T.copy())).sum().backward()           # dy.T @ I = G
    (e,) = ctrl.after_step(0)
    assert e["dropped"] == e["grown"] == 3                       # 0.075 * 40 = 3 (less a hair)
    new = layer.mask.numpy()
    expect = mask.copy()
    expect[low], expect[targets] = False, True
    np.testing.assert_array_equal(new, expect)


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_pruned_weights_stay_zero_with_mask_updates_and_two_optimizers(method):
    layer = MaskedLinear(12, 9, density=0.3, rng=4, dtype=np.float64)
    adam = dn.optim.Adam([layer.weight], lr=0.05, weight_decay=0.1)
    sgd = dn.optim.SGD([layer.bias, layer.weight], lr=0.05, momentum=0.9, weight_decay=0.1)
    ctrl = UnstructuredPruneGrow({"fc": layer}, method, delta_t=2, t_end=30, f0=0.5, rng=1)
    events = _train(layer, [adam, sgd], ctrl, 12,
                    check=lambda t: _assert_pruned_are_zero(layer, [adam, sgd]))
    assert len(events) == 6 and all(e["grown"] > 0 for e in events)


def test_set_is_seeded():
    def run(seed):
        layer = MaskedLinear(12, 9, density=0.3, rng=4, dtype=np.float64)
        ctrl = UnstructuredPruneGrow({"fc": layer}, "set", delta_t=2, t_end=30, rng=seed)
        _train(layer, [dn.optim.Adam(layer.parameters(), lr=0.05)], ctrl, 8)
        return layer.mask.numpy()

    np.testing.assert_array_equal(run(3), run(3))
    assert not np.array_equal(run(3), run(4))


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_state_dict_round_trip_continues_identically(method):
    N = 12

    def make(seed):
        layer = MaskedLinear(12, 9, density=0.3, rng=seed, dtype=np.float64)
        opt = dn.optim.SGD(layer.parameters(), lr=0.05, momentum=0.9)
        return layer, opt, UnstructuredPruneGrow({"fc": layer}, method, delta_t=2, t_end=40,
                                                 f0=0.5, rng=seed)

    layer, opt, ctrl = make(0)
    straight = _train(layer, [opt], ctrl, N)
    first_layer, first_opt, first_ctrl = make(0)
    first = _train(first_layer, [first_opt], first_ctrl, N // 2)
    saved = copy.deepcopy((first_layer.state_dict(), first_opt.state_dict(),
                           first_ctrl.state_dict()))
    resumed_layer, resumed_opt, resumed_ctrl = make(7)
    resumed_layer.load_state_dict(saved[0])
    resumed_opt.load_state_dict(saved[1])
    resumed_ctrl.load_state_dict(saved[2])
    resumed = first + _train(resumed_layer, [resumed_opt], resumed_ctrl, N - N // 2,
                             start=N // 2)
    assert resumed == straight
    for key, value in layer.state_dict().items():   # weight, bias and mask, bit for bit
        np.testing.assert_array_equal(resumed_layer.state_dict()[key].numpy(), value.numpy())
    np.testing.assert_array_equal(resumed_ctrl.state_dict()["ever_active"]["fc"],
                                  ctrl.state_dict()["ever_active"]["fc"])
    assert resumed_ctrl.metrics() == ctrl.metrics()


def test_check_state_dict_and_arguments():
    layer = MaskedLinear(12, 9, density=0.3, rng=0)
    ctrl = UnstructuredPruneGrow({"fc": layer}, "set", delta_t=2, t_end=40, rng=0)
    state = ctrl.state_dict()
    ctrl.check_state_dict(state)
    bad = dict(state, ever_active={"fc": np.ones((9, 11), dtype=bool)})
    with pytest.raises(ValueError, match=r"boolean array of shape \(9, 12\)"):
        ctrl.load_state_dict(bad)
    with pytest.raises(ValueError, match="kind='DiagPruneGrow'"):
        ctrl.load_state_dict(dict(state, kind="DiagPruneGrow"))
    with pytest.raises(TypeError, match="manages MaskedLinear layers"):
        UnstructuredPruneGrow({"d": nn.Linear(3, 3)}, "set", t_end=10)


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
def test_masked_layer_on_the_gpu_matches_the_cpu_without_syncs_in_training():
    cp = backend.cupy_or_none()
    counts = hasattr(cp, "host_transfers")
    out = {}
    new = np.random.default_rng(5).random((9, 12)) < 0.4
    for device in ("cpu", "cuda"):
        layer = MaskedLinear(12, 9, density=0.3, rng=0, device=device)
        opt = dn.optim.Adam(layer.parameters(), lr=0.05, weight_decay=0.1)
        before = cp.host_transfers if counts else 0
        for t in range(3):
            x, y = _batch(t, device=device, dtype=np.float32)
            loss = ((layer(x) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        if device == "cuda" and counts:
            assert cp.host_transfers == before, "a device-to-host read in training"
        layer.set_mask(new)   # one read: the new active count
        if device == "cuda":
            assert layer.mask.device == "cuda" and layer.nnz == int(new.sum())
            if counts:
                assert cp.host_transfers == before + 1
        out[device] = [layer.weight.numpy(), layer.mask.numpy(),
                       backend.to_numpy(opt.state[layer.weight]["exp_avg"])]
    for got, want in zip(out["cuda"], out["cpu"]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
