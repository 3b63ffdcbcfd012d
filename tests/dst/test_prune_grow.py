"""`DiagPruneGrow`: diagonal SET and RigL, and the strategy functions of `dst.select`.

Checked: the update steps and the cosine schedule of the counts (exactly), K constant with
sorted unique offsets, dropped = lowest mean |value|, grown only from diagonals inactive
before the drop (disjoint sets), RigL growing exactly the top-scored diagonals of a
constructed gradient, SET growing at random (seeded: same seed same masks, other seed other
masks), grown diagonals at zero with zeroed Adam and SGD state while kept ones keep theirs,
the in-time over-parameterisation rate, and a bit-for-bit resume from a state dict.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest

import diagnet as dn
from diagnet import backend, nn
from diagnet.diag import layout
from diagnet.dst import (DiagPruneGrow, MaskedLinear, UnstructuredPruneGrow, drop_fraction,
                         drop_lowest, grow_random, grow_top, update_size)


def _mlp(seed, dtype=np.float64, device="cpu"):
    """Two diagonal layers, one tall-to-wide (W 24 x 16) and one wide (W 10 x 24)."""
    return nn.Sequential(
        nn.DiagLinear(16, 24, sparsity=0.75, rng=seed, dtype=dtype, device=device),
        nn.ReLU(),
        nn.DiagLinear(24, 10, sparsity=0.6, rng=seed + 1, dtype=dtype, device=device))


def _layers(model):
    return {"0": model[0], "2": model[2]}


def _batch(step, n_in=16, n_out=10, B=8, dtype=np.float64, device="cpu"):
    """The batch of ``step``: a function of the step only, so that a resumed run sees the
    same data."""
    rng = np.random.default_rng(1000 + step)
    x = rng.standard_normal((B, n_in)).astype(dtype)
    y = rng.standard_normal((B, n_out)).astype(dtype)
    return dn.tensor(x, device=device), dn.tensor(y, device=device)


def _train(model, opts, ctrl, steps, start=0, watch=None, **batch):
    """The training loop in the controllers' order; returns the events.

    ``watch(step)`` runs after ``opt.step()`` and before ``after_step`` (to snapshot state)."""
    events = []
    for t in range(start, start + steps):
        x, y = _batch(t, **batch)
        ctrl.before_step(t)
        loss = ((model(x) - y) ** 2).mean()
        for opt in opts:
            opt.zero_grad()
        loss.backward()
        for opt in opts:
            opt.step()
        if watch is not None:
            watch(t)
        events += ctrl.after_step(t)
    return events


def _offsets(layer):
    return layer.offsets.numpy()


# ----------------------------------------------------------------------------- schedule

def test_drop_fraction_is_the_cosine_decay():
    assert drop_fraction(0, 0.3, 100) == 0.3
    assert drop_fraction(50, 0.3, 100) == pytest.approx(0.15, abs=1e-15)
    assert drop_fraction(25, 0.3, 100) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert drop_fraction(99, 0.3, 100) > 0
    assert drop_fraction(100, 0.3, 100) == 0.0 and drop_fraction(1000, 0.3, 100) == 0.0


def test_update_size_rounds_half_up_and_stays_within_the_inactive_units():
    assert update_size(0.25, 10, 100) == 3      # 2.5 -> 3
    assert update_size(0.24, 10, 100) == 2
    assert update_size(0.5, 10, 4) == 4         # only 4 inactive units to grow into
    assert update_size(0.0, 10, 4) == 0


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_updates_happen_exactly_after_the_stated_steps_and_stop_at_t_end(method):
    model = _mlp(0)
    ctrl = DiagPruneGrow(_layers(model), method, delta_t=3, t_end=20, f0=0.5, rng=0)
    assert ctrl.update_steps() == [2, 5, 8, 11, 14, 17]   # (t + 1) % 3 == 0 and t + 1 < 20
    opt = dn.optim.Adam(model.parameters(), lr=0.01)
    events = _train(model, [opt], ctrl, 30)
    assert [e["step"] for e in events] == [t for t in ctrl.update_steps() for _ in range(2)]
    assert [e["layer"] for e in events] == ["0", "2"] * 6
    assert all(ctrl.is_update_step(t) == (t in ctrl.update_steps()) for t in range(40))
    assert ctrl.tap is None or not ctrl.tap.armed  # disarmed after each update


def test_counts_follow_the_cosine_schedule_and_structure_stays_valid():
    model = _mlp(1)
    layers = _layers(model)
    ctrl = DiagPruneGrow(layers, "set", delta_t=2, t_end=17, f0=0.6, rng=3)
    opt = dn.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    K = {name: layer.K for name, layer in layers.items()}
    assert K == {"0": 6, "2": 10}
    events = _train(model, [opt], ctrl, 20)
    sizes = []
    for e in events:
        layer, name = layers[e["layer"]], e["layer"]
        f = drop_fraction(e["step"] + 1, 0.6, 17)
        assert e["fraction"] == f and e["method"] == "set" and e["event"] == "mask_update"
        n = math.floor(f * K[name] + 0.5)
        assert len(e["dropped"]) == len(e["grown"]) == n
        sizes.append(n)
        assert e["k"] == K[name] == layer.K
        assert e["sparsity"] == pytest.approx(1 - K[name] / layer.P)
    # by hand: the first update (after step 1, clock 2) has f = 0.3 (1 + cos(2 pi / 17))
    # = 0.5797, so 6 * f = 3.48 -> 3 and 10 * f = 5.80 -> 6; the last (after step 15,
    # clock 16) has f = 0.3 (1 + cos(16 pi / 17)) = 0.0051 -> 0 for both layers
    assert sizes[:2] == [3, 6] and sizes[-2:] == [0, 0]
    assert len(sizes) == 2 * 8   # clocks 2, 4, ..., 16
    # structure after the last update: K constant, sorted, unique, in range
    for name, layer in layers.items():
        off = _offsets(layer)
        assert off.size == K[name] and np.all(np.diff(off) > 0)
        assert 0 <= off[0] and off[-1] < layer.P
        assert layer.values.shape == (K[name], layer.L)


def test_every_update_drops_active_grows_inactive_and_keeps_offsets_sorted():
    model = _mlp(2)
    layers = _layers(model)
    ctrl = DiagPruneGrow(layers, "rigl", delta_t=1, t_end=12, f0=0.5, rng=5)
    opt = dn.optim.Adam(model.parameters(), lr=0.02)
    history = {name: [_offsets(layer)] for name, layer in layers.items()}
    for t in range(12):
        for e in _train(model, [opt], ctrl, 1, start=t):
            name = e["layer"]
            old, new = history[name][-1], _offsets(layers[name])
            dropped, grown = set(e["dropped"]), set(e["grown"])
            assert dropped <= set(old) and not grown & set(old)   # disjoint by construction
            assert set(new) == (set(old) - dropped) | grown
            assert np.all(np.diff(new) > 0) and new.size == old.size
            history[name].append(new)
    assert all(len(h) == 12 for h in history.values())  # 11 updates: steps 0..10


# ----------------------------------------------------------------------------- drop and grow

def _layer_with_magnitudes(m=12, n=12, offsets=(0, 2, 5, 7, 9, 11), scale=None, dtype=np.float64):
    layer = nn.DiagLinear(n, m, offsets=list(offsets), rng=0, dtype=dtype)
    K, L = layer.K, layer.L
    rng = np.random.default_rng(0)
    signs = rng.choice([-1.0, 1.0], size=(K, L))
    scale = np.arange(1, K + 1)[::-1] if scale is None else np.asarray(scale, dtype=float)
    # row k has mean |value| = scale[k] (signs do not matter)
    layer.values.data = (signs * scale[:, None]).astype(dtype)
    return layer


def test_set_drops_the_lowest_mean_magnitude():
    # mean |value| of the rows: 6, 5, 4, 3, 2, 1 -> the last rows (offsets 11, 9, 7) go first
    layer = _layer_with_magnitudes(scale=[6, 5, 4, 3, 2, 1])
    ctrl = DiagPruneGrow({"fc": layer}, "set", delta_t=1, t_end=1000, f0=0.5, rng=0)
    (e,) = ctrl.after_step(0)
    assert e["dropped"] == [7, 9, 11]            # n = round(0.5 * 6) = 3
    # a row with a large mean but one tiny entry is not "small": the mean decides
    layer = _layer_with_magnitudes(scale=[6, 5, 4, 3, 2, 1])
    layer.values.data[5, :] = 0.0
    layer.values.data[5, 0] = 100.0              # mean 100/12 > 6
    ctrl = DiagPruneGrow({"fc": layer}, "set", delta_t=1, t_end=1000, f0=0.5, rng=0)
    assert ctrl.after_step(0)[0]["dropped"] == [5, 7, 9]


def test_ties_are_broken_by_seeded_noise_not_by_position():
    chosen = set()
    for seed in range(20):
        runs = []
        for _ in range(2):
            layer = _layer_with_magnitudes(scale=[1.0] * 6)  # all equal
            ctrl = DiagPruneGrow({"fc": layer}, "set", delta_t=1, t_end=1000, f0=0.2, rng=seed)
            runs.append(ctrl.after_step(0)[0]["dropped"])
        assert runs[0] == runs[1]                      # reproducible for a seed
        chosen.add(tuple(runs[0]))
    assert len(chosen) > 3                               # and not always the same rows


@pytest.mark.parametrize("n_in, n_out", [(10, 10), (12, 7), (7, 12)])
def test_rigl_grows_exactly_the_top_scored_diagonals(n_in, n_out):
    """x = I and dy chosen so that dW = dy.T @ x is large on known diagonals."""
    m, n = n_out, n_in
    P = max(m, n)
    active = [0, 2, 4, 6]
    layer = nn.DiagLinear(n, m, offsets=active, rng=0, dtype=np.float64)
    layer.values.data = np.array([[3.0], [0.1], [2.0], [0.2]]) * np.ones((1, layer.L))
    rng = np.random.default_rng(1)
    dW = 0.01 * rng.standard_normal((m, n))          # small everywhere ...
    strong = {P - 1: 5.0, P - 3: 4.0, 2: 50.0, 0: 40.0, 1: 3.0}
    for p, size in strong.items():                    # ... except on these diagonals
        rows, cols = layout.diagonal_coordinates((m, n), [p])
        dW[rows, cols] = size
    x = dn.tensor(np.eye(n))
    dy = dn.tensor(dW.T.copy())                       # (B = n, m): dy.T @ I = dW
    ctrl = DiagPruneGrow({"fc": layer}, "rigl", delta_t=1, t_end=1000, f0=0.75, rng=0)
    ctrl.before_step(0)
    (layer(x) * dy).sum().backward()                  # d loss / d y = dy
    (e,) = ctrl.after_step(0)
    # n = round(0.75 * 4) = 3: drop the lowest |value| rows (offsets 2, 6 and then 4); grow
    # the three best *inactive* diagonals: 2 (score 50) was active before the drop, 0 is
    # kept; so P - 1, P - 3 and 1
    assert e["dropped"] == [2, 4, 6]
    assert e["grown"] == sorted({P - 1, P - 3, 1})
    assert sorted(_offsets(layer)) == sorted({0, P - 1, P - 3, 1})


def test_set_grows_only_inactive_diagonals_uniformly_at_random():
    counts = np.zeros(12, dtype=int)
    grown_sets = set()
    for seed in range(200):
        layer = nn.DiagLinear(12, 12, offsets=[1, 4, 8, 10], rng=0, dtype=np.float64)
        ctrl = DiagPruneGrow({"fc": layer}, "set", delta_t=1, t_end=1000, f0=0.5, rng=seed)
        (e,) = ctrl.after_step(0)
        assert not set(e["grown"]) & {1, 4, 8, 10}
        counts[e["grown"]] += 1
        grown_sets.add(tuple(e["grown"]))
    assert np.all(counts[[1, 4, 8, 10]] == 0)
    # 400 picks over 8 inactive diagonals: 50 each on average (binomial sd ~6.6)
    inactive = np.delete(counts, [1, 4, 8, 10])
    assert inactive.min() >= 25 and inactive.max() <= 75
    assert len(grown_sets) > 15


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_seeded_runs_repeat_and_another_seed_differs(method):
    def run(seed):
        model = _mlp(4)
        ctrl = DiagPruneGrow(_layers(model), method, delta_t=2, t_end=30, f0=0.5, rng=seed)
        opt = dn.optim.Adam(model.parameters(), lr=0.01)
        events = _train(model, [opt], ctrl, 12)
        return events, [_offsets(model[i]) for i in (0, 2)]

    (e1, o1), (e2, o2), (e3, _) = run(7), run(7), run(8)
    assert e1 == e2
    for a, b in zip(o1, o2):
        np.testing.assert_array_equal(a, b)
    if method == "set":
        assert e1 != e3
    else:  # RigL uses its seed only to break ties, and random float64 data has none
        assert e1 == e3


def test_grown_diagonals_are_zero_with_zeroed_moments_and_kept_ones_keep_theirs():
    model = _mlp(5)
    layers = _layers(model)
    adam = dn.optim.Adam(model.parameters(), lr=0.01)
    sgd = dn.optim.SGD([model[0].values], lr=0.01, momentum=0.9)   # a second holder
    ctrl = DiagPruneGrow(layers, "rigl", delta_t=3, t_end=30, f0=0.5, rng=1)
    snap = {}

    def watch(t):
        if ctrl.is_update_step(t):
            for name, layer in layers.items():
                st = adam.state[layer.values]
                snap[name] = dict(offsets=_offsets(layer), values=layer.values.numpy(),
                                  m=st["exp_avg"].copy(), v=st["exp_avg_sq"].copy(),
                                  step=st["step"])
            snap["buf"] = sgd.state[model[0].values]["momentum_buffer"].copy()

    events = _train(model, [adam, sgd], ctrl, 3, watch=watch)
    assert len(events) == 2
    for e in events:
        name, layer = e["layer"], layers[e["layer"]]
        old, new = snap[name]["offsets"], _offsets(layer)
        assert e["grown"] and e["dropped"]
        st = adam.state[layer.values]
        for k, p in enumerate(new):
            if p in e["grown"]:
                assert np.all(layer.values.numpy()[k] == 0)
                assert np.all(st["exp_avg"][k] == 0) and np.all(st["exp_avg_sq"][k] == 0)
                if name == "0":
                    assert np.all(sgd.state[layer.values]["momentum_buffer"][k] == 0)
            else:
                j = int(np.searchsorted(old, p))
                np.testing.assert_array_equal(layer.values.numpy()[k], snap[name]["values"][j])
                np.testing.assert_array_equal(st["exp_avg"][k], snap[name]["m"][j])
                np.testing.assert_array_equal(st["exp_avg_sq"][k], snap[name]["v"][j])
                if name == "0":
                    np.testing.assert_array_equal(
                        sgd.state[layer.values]["momentum_buffer"][k], snap["buf"][j])
        assert st["step"] == snap[name]["step"]


def test_itop_counts_every_diagonal_ever_active():
    model = _mlp(6)
    layers = _layers(model)
    ctrl = DiagPruneGrow(layers, "set", delta_t=1, t_end=10, f0=0.5, rng=2)
    P = sum(layer.P for layer in layers.values())
    ever = {name: set(_offsets(layer)) for name, layer in layers.items()}
    assert ctrl.metrics()["itop"] == pytest.approx(sum(map(len, ever.values())) / P)
    opt = dn.optim.Adam(model.parameters(), lr=0.01)
    for e in _train(model, [opt], ctrl, 10):
        ever[e["layer"]] |= set(e["grown"])
        assert e["itop"] == pytest.approx(len(ever[e["layer"]]) / layers[e["layer"]].P)
    metrics = ctrl.metrics()
    assert metrics["itop"] == pytest.approx(sum(map(len, ever.values())) / P)
    assert metrics["itop"] > sum(layer.K for layer in layers.values()) / P
    assert metrics["sparsity"] == pytest.approx(ctrl.sparsity())


# ----------------------------------------------------------------------------- state dicts

@pytest.mark.parametrize("method", ["set", "rigl"])
def test_state_dict_round_trip_continues_identically(method):
    N, cfg = 14, dict(delta_t=2, t_end=40, f0=0.5)

    def make(seed):
        model = _mlp(seed)
        adam = dn.optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-3)
        return model, adam, DiagPruneGrow(_layers(model), method, rng=seed, **cfg)

    model, opt, ctrl = make(0)
    straight = _train(model, [opt], ctrl, N)

    first_model, first_opt, first_ctrl = make(0)
    first = _train(first_model, [first_opt], first_ctrl, N // 2)
    saved_model = {k: v.numpy() for k, v in first_model.state_dict().items()}   # copies
    saved_opt = copy.deepcopy(first_opt.state_dict())
    saved_ctrl = json.loads(json.dumps(first_ctrl.state_dict()))   # JSON-able, survives JSON
    resumed_model, resumed_opt, resumed_ctrl = make(99)             # other offsets, other seed
    resumed_model.load_state_dict(saved_model)
    resumed_opt.load_state_dict(saved_opt)
    resumed_ctrl.load_state_dict(saved_ctrl)
    resumed = first + _train(resumed_model, [resumed_opt], resumed_ctrl, N - N // 2,
                             start=N // 2)

    assert len(straight) == 2 * 7 and resumed == straight
    for key, value in model.state_dict().items():   # offsets and values, bit for bit
        np.testing.assert_array_equal(resumed_model.state_dict()[key].numpy(), value.numpy())
    assert resumed_ctrl.state_dict() == ctrl.state_dict()
    assert resumed_ctrl.metrics() == ctrl.metrics()


def test_check_state_dict_rejects_what_cannot_resume():
    model = _mlp(0)
    ctrl = DiagPruneGrow(_layers(model), "set", delta_t=2, t_end=40, rng=0)
    good = ctrl.state_dict()
    ctrl.check_state_dict(good)

    def spoiled(**changes):
        state = copy.deepcopy(good)
        state.update(changes)
        return state

    cases = [
        (spoiled(t_end=41), "t_end=41, but this controller has t_end=40"),
        (spoiled(method="rigl"), "method='rigl'"),
        (spoiled(kind="UnstructuredPruneGrow"), "kind="),
        ({k: v for k, v in good.items() if k != "rng"}, r"missing \['rng'\]"),
        (spoiled(rng={"bit_generator": "MT19937"}), "PCG64"),
        (spoiled(rng={**good["rng"], "state": "nonsense"}), "not a valid PCG64 state"),
        (spoiled(ever_active={"0": [0]}), "must name the layers"),
        (spoiled(ever_active={"0": [0, 0], "2": [1]}), "distinct diagonal indices in .0, 24."),
        (spoiled(ever_active={"0": [0], "2": [24]}), r"in \[0, 24\)"),
        ([], "must be a dict"),
    ]
    rng_before = ctrl.rng.bit_generator.state
    for state, message in cases:
        with pytest.raises(ValueError, match=message):
            ctrl.load_state_dict(state)
    assert ctrl.rng.bit_generator.state == rng_before  # nothing changed



def _spoiled_rng(state, path, value):
    """A deep copy of the generator ``state`` with the field at ``path`` set to ``value``
    (``DELETE``: removed)."""
    state = copy.deepcopy(state)
    inner = state
    for key in path[:-1]:
        inner = inner[key]
    if value is DELETE:
        del inner[path[-1]]
    else:
        inner[path[-1]] = value
    return state


DELETE = object()

# (bit generator, field, bad value, message): NumPy itself accepts every one of these values
# (truncating a float, keeping an even increment, wrapping a negative, ignoring an extra key,
# or reading past its key array at pos=10**6) or fails with an unhelpful KeyError
GENERATOR_STATE_CASES = [
    ("PCG64", ("state", "state"), 1.5, r"\['state'\]\['state'\] must be an int; got float 1.5"),
    ("PCG64", ("state", "state"), 1.0, r"\['state'\]\['state'\] must be an int; got float"),
    ("PCG64", ("state", "inc"), 4, r"\['state'\]\['inc'\] must be odd"),
    ("PCG64", ("has_uint32",), True, r"\['has_uint32'\] must be an int; got bool"),
    ("PCG64", ("has_uint32",), 2, r"\['has_uint32'\] must be in \[0, 1\]; got 2"),
    ("PCG64", ("state", "extra"), 1, r"\['state'\] has the unknown field 'extra'"),
    ("PCG64", ("extra",), 1, r"has the unknown field 'extra'"),
    ("PCG64", ("state", "inc"), DELETE, r"\['state'\] lacks the field 'inc'"),
    ("SFC64", ("state", "state"), np.array([-1, 2, 3, 4]),
     r"\['state'\]\['state'\] = \[-1  2  3  4\] does not survive loading"),
    ("MT19937", ("state", "pos"), 10 ** 6, r"\['state'\]\['pos'\] must be in \[0, 624\]"),
    ("MT19937", ("state", "pos"), -1, r"\['state'\]\['pos'\] must be in \[0, 624\]"),
    ("MT19937", ("state", "key"), [0.5] * 624, r"\['state'\]\['key'\] must be integers"),
    ("MT19937", ("state", "key"), np.zeros(623, np.uint32), r"must have shape \(624,\)"),
    ("Philox", ("buffer_pos",), 100, r"\['buffer_pos'\] must be in \[0, 4\]"),
]


def _generator(kind):
    return np.random.Generator(getattr(np.random, kind)(11))


@pytest.mark.parametrize("kind, path, value, message", GENERATOR_STATE_CASES,
                         ids=[f"{c[0]}-{'.'.join(c[1])}-{c[2]!r:.12}" for c in
                              GENERATOR_STATE_CASES])
def test_generator_state_is_checked_field_by_field(kind, path, value, message):
    """The saved generator state must be what NumPy would hold after loading it, field by
    field, with ints (not floats or bools) and each kind's own invariants; a refused state
    leaves the controller as it was."""
    model = _mlp(0)
    ctrl = DiagPruneGrow(_layers(model), "set", delta_t=2, t_end=40, rng=_generator(kind))
    good = ctrl.state_dict()
    ctrl.load_state_dict(copy.deepcopy(good))  # the unspoiled state of any kind loads
    bad = {**good, "rng": _spoiled_rng(good["rng"], path, value)}
    with pytest.raises(ValueError, match=f"controller state 'rng' is not a valid {kind} state: "
                                         f"state.*{message}"):
        ctrl.load_state_dict(bad)
    np.testing.assert_equal(ctrl.state_dict(), good)  # nothing changed


# ----------------------------------------------------------------------------- arguments

def test_constructor_arguments_are_checked():
    layers = _layers(_mlp(0))
    with pytest.raises(TypeError, match="manages DiagLinear layers; layer 'd' is a Linear"):
        DiagPruneGrow({"d": nn.Linear(4, 4)}, "set", t_end=10)
    with pytest.raises(ValueError, match="method must be one of"):
        DiagPruneGrow(layers, "magnitude", t_end=10)
    with pytest.raises(ValueError, match="t_end is required"):
        DiagPruneGrow(layers, "set")
    with pytest.raises(ValueError, match="delta_t must be a positive int"):
        DiagPruneGrow(layers, "set", delta_t=0, t_end=10)
    with pytest.raises(ValueError, match="f0 must be a number in"):
        DiagPruneGrow(layers, "set", t_end=10, f0=1.5)
    with pytest.raises(ValueError, match="at least one layer"):
        DiagPruneGrow({}, "set", t_end=10)


def test_rigl_without_before_step_explains_the_order():
    model = _mlp(0)
    ctrl = DiagPruneGrow(_layers(model), "rigl", delta_t=1, t_end=10, rng=0)
    x, y = _batch(0)
    ((model(x) - y) ** 2).mean().backward()
    with pytest.raises(RuntimeError, match=r"call before_step\(step\) before the forward"):
        ctrl.after_step(0)
    assert not ctrl.tap.armed


def test_strategy_functions():
    scores = np.array([0.5, 0.1, 0.9, 0.1, 0.3])
    rng = np.random.default_rng(0)
    assert drop_lowest(scores, 2, rng).tolist() == [1, 3]        # a set, in index order
    assert drop_lowest(scores, 3, rng).tolist() == [1, 3, 4]
    assert drop_lowest(scores, 0, rng).tolist() == []
    among = np.array([True, False, True, False, True])
    assert drop_lowest(scores, 2, rng, among=among).tolist() == [0, 4]
    assert grow_top(scores, among, 2, rng).tolist() == [0, 2]
    # a tie at the cut-off (0.1, 0.1): either may win, chosen by the seeded noise
    picks = {tuple(drop_lowest(scores, 1, np.random.default_rng(s)).tolist()) for s in range(20)}
    assert picks == {(1,), (3,)}
    assert {tuple(grow_top(scores, ~among, 1, np.random.default_rng(s)).tolist())
            for s in range(20)} == {(1,), (3,)}
    picks = {tuple(grow_random(~among, 1, np.random.default_rng(s)).tolist()) for s in range(20)}
    assert picks == {(1,), (3,)}
    assert grow_random(~among, 2, rng).tolist() == [1, 3]
    assert grow_random(~among, 2, rng).dtype == np.int64
    # many ties: exactly n are taken, all below the cut and the right number at it
    tied = np.array([0.0, 2.0, 1.0, 1.0, 1.0, 1.0, 3.0])
    for s in range(10):
        got = drop_lowest(tied, 3, np.random.default_rng(s)).tolist()
        assert len(got) == 3 and got[0] == 0 and set(got[1:]) <= {2, 3, 4, 5}
    with pytest.raises(ValueError, match="one-dimensional"):
        drop_lowest(scores.reshape(1, -1), 1, rng)
    with pytest.raises(ValueError, match=r"n must be an int in \[0, 5\]"):
        drop_lowest(scores, 6, rng)
    with pytest.raises(ValueError, match="candidates must be a boolean array"):
        grow_top(scores, np.ones(5), 1, rng)


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
def test_gpu_controllers_match_the_cpu_and_ordinary_steps_do_not_sync():
    cp = backend.cupy_or_none()
    counts = hasattr(cp, "host_transfers")  # the CuPy stand-in counts device-to-host reads
    results = {}
    for device in ("cpu", "cuda"):
        model = _mlp(3, dtype=np.float32, device=device)
        masked = MaskedLinear(16, 10, density=0.3, rng=4, device=device)
        diag = DiagPruneGrow(_layers(model), "rigl", delta_t=3, t_end=40, f0=0.5, rng=1)
        unst = UnstructuredPruneGrow({"m": masked}, "rigl", delta_t=3, t_end=40, f0=0.5, rng=1)
        params = list(model.parameters()) + list(masked.parameters())
        opt = dn.optim.Adam(params, lr=0.01)
        events = []
        for t in range(6):
            x, y = _batch(t, dtype=np.float32, device=device)
            before = cp.host_transfers if counts else 0
            diag.before_step(t)
            unst.before_step(t)
            loss = ((model(x) - y) ** 2).mean() + ((masked(x) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            new = diag.after_step(t) + unst.after_step(t)
            # (step 0 is skipped: a DiagLinear validates its offsets on its first forward)
            if device == "cuda" and counts and t > 0 and not diag.is_update_step(t):
                assert new == [] and cp.host_transfers == before, \
                    "a device-to-host read on an ordinary step"
            events += new
        assert len(events) == 6   # steps 2 and 5, three layers
        if device == "cuda":
            assert model[0].offsets.device == "cuda" and masked.mask.device == "cuda"
            assert isinstance(unst._ever["m"], cp.ndarray)
        results[device] = (events, [_offsets(model[i]) for i in (0, 2)], masked.mask.numpy(),
                           diag.state_dict(), diag.metrics(), unst.metrics())
    (ev_c, off_c, mask_c, st_c, md_c, mu_c), (ev_g, off_g, mask_g, st_g, md_g, mu_g) = (
        results["cpu"], results["cuda"])
    assert [{k: v for k, v in e.items() if k != "sparsity"} for e in ev_g] == \
        [{k: v for k, v in e.items() if k != "sparsity"} for e in ev_c]
    for a, b in zip(off_g, off_c):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(mask_g, mask_c)
    assert st_g == st_c and md_g == md_c and mu_g == mu_c
