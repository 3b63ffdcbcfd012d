"""The hooks through which data-parallel training keeps structure decisions the same on
every rank, checked in one process.

* `diagonal_norms`: the per-diagonal L2 norms of a dense ``(m, n)`` matrix, against a plain
  loop over the convention's positions (float64 to 1e-12, float32 to the float32 rule).
* `GradientTap.reducer`: the dense ``dy.T @ x`` goes through it before the scores and the
  dense gradient are formed; an identity reducer gives today's scores, a reducer that adds
  a known matrix gives the norms of the sum, and RigL (diagonal and unstructured) and
  DynaDiag's swap decide from the reduced gradient.
* `SparsityController.taps`: every controller's gradient taps.
* `structure_fingerprint` / `SparsityController.fingerprint`: equal for models built from
  one seed, changed by one offset or one mask entry, blind to values, dtype and device.
"""

from __future__ import annotations

import numpy as np
import pytest

import diagnet as dn
import diagnet.functional as F
from diagnet import backend, nn, optim
from diagnet.diag.layout import diagonal_coordinates
from diagnet.dst import (DiagPruneGrow, DynaDiag, DynaDiagLinear, GradientTap, MaskedLinear,
                         SparsityController, UnstructuredPruneGrow, structure_fingerprint)
from dense_reference import positions
from tolerances import F32_TOL, F64_TOL

SHAPES = [(6, 6), (5, 9), (9, 4), (1, 7), (7, 1)]   # square, wide, tall, 1-high, 1-wide


def loop_norms(W):
    """``(P,)`` float64: the L2 norm of ``W`` on each wrap-around diagonal, one at a time."""
    W = np.asarray(W, dtype=np.float64)
    return np.array([np.sqrt(sum(W[i, j] ** 2 for i, j in zip(*positions(W.shape, p))))
                     for p in range(max(W.shape))])


def _captured(shape, dtype=np.float64, device="cpu", reducer=None, seed=0):
    """A tap over one DiagLinear of ``shape`` after one forward and backward of a batch
    ``(2, 3, n)`` (leading dims are flattened)."""
    m, n = shape
    layer = nn.DiagLinear(n, m, sparsity=0.5, rng=seed, dtype=dtype, device=device)
    tap = GradientTap({"w": layer})
    tap.reducer = reducer
    rng = np.random.default_rng(seed + 1)
    x = dn.tensor(rng.standard_normal((2, 3, n)).astype(dtype), device=device)
    g = dn.tensor(rng.standard_normal((2, 3, m)).astype(dtype), device=device)
    tap.arm()
    (layer(x) * g).sum().backward()
    tap.disarm()
    return tap


# ----------------------------------------------------------------------------- diagonal_norms

@pytest.mark.parametrize("shape", SHAPES)
def test_diagonal_norms_match_a_plain_loop_in_float64(shape):
    W = np.random.default_rng(sum(shape)).standard_normal(shape)
    got = F.diagonal_norms(W)
    assert got.shape == (max(shape),) and got.dtype == np.float64
    np.testing.assert_allclose(got, loop_norms(W), **F64_TOL)


@pytest.mark.parametrize("shape", SHAPES)
def test_diagonal_norms_in_float32(shape):
    W = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
    got = F.diagonal_norms(dn.tensor(W))   # a Tensor is read, not tracked
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, loop_norms(W), **F32_TOL)


@pytest.mark.parametrize("bad, err, match", [
    (np.ones(4), ValueError, r"diagonal_norms: w must be a 2-d .* got shape \(4,\)"),
    (np.ones((2, 3, 4)), ValueError, r"w must be a 2-d .* got shape \(2, 3, 4\)"),
    (np.ones((0, 3)), ValueError, r"\(0, 3\)"),
    (np.ones((3, 3), dtype=np.int64), TypeError, r"w must be float32 or float64; got .*int64"),
    ("w", TypeError, r"w must be an array .* got str"),
])
def test_diagonal_norms_refuses_what_is_not_a_float_matrix(bad, err, match):
    with pytest.raises(err, match=match):
        F.diagonal_norms(bad)


# ----------------------------------------------------------------------------- the reducer

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype, tol", [(np.float64, dict(rtol=1e-12, atol=1e-12)),
                                        (np.float32, dict(rtol=1e-6, atol=1e-6))])
def test_an_identity_reducer_gives_the_scores_of_a_single_process(shape, dtype, tol):
    """Float32: both forms take the same float32 ``dy.T @ x``; they may differ only by the
    rounding of the squares' sums (a few ulps)."""
    plain = _captured(shape, dtype)
    calls = []
    reduced = _captured(shape, dtype, reducer=lambda a: calls.append(a.shape) or a)
    want = plain.diagonal_scores("w")
    got = reduced.diagonal_scores("w")
    assert calls == [shape] and got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(got, want, **tol)
    np.testing.assert_array_equal(reduced.dense_grad("w"), plain.dense_grad("w"))


def test_without_a_reducer_the_scores_are_the_functional_ones_bit_for_bit():
    tap = _captured((5, 9))
    assert tap.reducer is None
    want = F.diagonal_scores(tap.inputs["w"], tap.grads["w"], 5)
    np.testing.assert_array_equal(tap.diagonal_scores("w"), want)


@pytest.mark.parametrize("shape", SHAPES)
def test_a_reducer_that_adds_a_matrix_gives_the_norms_of_the_sum(shape):
    A = np.random.default_rng(7).standard_normal(shape)

    def add(dense):
        dense += A          # a reducer may work in place and return its argument
        return dense

    tap = _captured(shape, reducer=add)
    total = tap.grads["w"].T @ tap.inputs["w"] + A
    np.testing.assert_allclose(tap.diagonal_scores("w"), loop_norms(total), **F64_TOL)
    np.testing.assert_allclose(tap.dense_grad("w"), total, **F64_TOL)


def test_a_reducer_that_is_not_callable_or_returns_a_wrong_shape_is_refused():
    tap = _captured((5, 9))
    with pytest.raises(TypeError, match=r"reducer must be None or a callable .*; got int"):
        tap.reducer = 3
    assert tap.reducer is None   # refused: unchanged
    tap.reducer = lambda dense: dense[:2]
    with pytest.raises(ValueError, match=r"reducer must return an array of shape \(5, 9\) "
                                         r"\(the dense gradient of layer 'w'\); got .*\(2, 9\)"):
        tap.diagonal_scores("w")
    tap.reducer = lambda dense: None
    with pytest.raises(ValueError, match=r"\(5, 9\) .* got NoneType"):
        tap.dense_grad("w")


# ----------------------------------------------------------------------------- the controllers

def _mlp(seed):
    return nn.Sequential(
        nn.DiagLinear(16, 24, sparsity=0.75, rng=seed, dtype=np.float64),
        nn.ReLU(),
        nn.DiagLinear(24, 10, sparsity=0.6, rng=seed + 1, dtype=np.float64))


def _step(model, ctrl, opt, step, n_in=16, n_out=10):
    rng = np.random.default_rng(100 + step)
    x = dn.tensor(rng.standard_normal((8, n_in)))
    y = dn.tensor(rng.standard_normal((8, n_out)))
    ctrl.before_step(step)
    loss = ((model(x) - y) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return ctrl.after_step(step)


def _boost_diagonal(shape, p, calls, name):
    """A reducer that records ``name`` and adds a large gradient on diagonal ``p``."""
    def reducer(dense):
        calls.append(name)
        rows, cols = diagonal_coordinates(shape, [p])
        dense[rows, cols] += 1e6
        return dense
    return reducer


def test_diagonal_rigl_grows_by_the_reduced_scores():
    model = _mlp(0)
    layers = {"0": model[0], "2": model[2]}
    ctrl = DiagPruneGrow(layers, method="rigl", delta_t=1, t_end=10, f0=0.3, rng=0)
    assert ctrl.taps() == [ctrl.tap]
    calls = []
    target = {name: int(np.setdiff1d(np.arange(layer.P), layer.offsets.numpy())[-1])
              for name, layer in layers.items()}   # an inactive diagonal per layer
    ctrl.tap.reducer = _dispatching_reducer(layers, target, calls)
    events = _step(model, ctrl, optim.SGD(model.parameters(), lr=0.1), 0)
    assert sorted(calls) == ["0", "2"]        # once per layer, at the update step
    for e in events:
        assert target[e["layer"]] in e["grown"]
        assert target[e["layer"]] in layers[e["layer"]].offsets.numpy().tolist()


def _dispatching_reducer(layers, target, calls):
    """One reducer for a tap over several layers: it finds the layer by the matrix's shape."""
    by_shape = {layer.shape: name for name, layer in layers.items()}

    def reducer(dense):
        name = by_shape[tuple(dense.shape)]
        return _boost_diagonal(tuple(dense.shape), target[name], calls, name)(dense)
    return reducer


def test_unstructured_rigl_grows_by_the_reduced_dense_gradient():
    layer = MaskedLinear(16, 10, density=0.3, rng=4, dtype=np.float64)
    model = nn.Sequential(layer)
    ctrl = UnstructuredPruneGrow({"m": layer}, method="rigl", delta_t=1, t_end=10, f0=0.3,
                                 rng=0)
    assert ctrl.taps() == [ctrl.tap]
    i, j = map(int, np.argwhere(~layer.mask.numpy())[-1])
    calls = []

    def reducer(dense):
        calls.append(dense.shape)
        dense[i, j] += 1e6
        return dense

    ctrl.tap.reducer = reducer
    _step(model, ctrl, optim.SGD(model.parameters(), lr=0.1), 0, n_out=10)
    assert calls == [(10, 16)] and layer.mask.numpy()[i, j]


def test_dynadiag_swaps_by_the_reduced_scores():
    layer = DynaDiagLinear(16, 24, sparsity=0.75, pool=0.5, rng=0, dtype=np.float64)
    model = nn.Sequential(layer)
    ctrl = DynaDiag({"d": layer}, swap_every=1, rng=0)
    assert ctrl.taps() == [ctrl.tap]
    outside = np.setdiff1d(np.arange(layer.P), layer.offsets.numpy())
    p, calls = int(outside[0]), []
    ctrl.tap.reducer = _boost_diagonal(layer.shape, p, calls, "d")
    events = _step(model, ctrl, optim.Adam(model.parameters(), lr=0.01), 0, n_out=24)
    assert calls == ["d"] and events[0]["grown"][0] == p and p in layer.offsets.numpy()


def test_controllers_without_a_gradient_tap_have_none():
    model = _mlp(0)
    layers = {"0": model[0], "2": model[2]}
    assert SparsityController(layers).taps() == []
    assert DiagPruneGrow(layers, method="set", t_end=10, rng=0).taps() == []
    masked = MaskedLinear(4, 3, density=0.5, rng=0)
    assert UnstructuredPruneGrow({"m": masked}, method="set", t_end=10, rng=0).taps() == []


# ----------------------------------------------------------------------------- fingerprints

def _is_hex_digest(value):
    return isinstance(value, str) and len(value) == 64 and int(value, 16) >= 0


def test_diag_linear_fingerprint_follows_the_offsets_only():
    a, b, other = _mlp(0), _mlp(0), _mlp(5)
    fa = structure_fingerprint({"0": a[0], "2": a[2]})
    assert list(fa) == ["0", "2"] and all(map(_is_hex_digest, fa.values()))
    assert structure_fingerprint({"0": b[0], "2": b[2]}) == fa
    assert structure_fingerprint({"0": other[0], "2": other[2]})["0"] != fa["0"]
    b[0].values.data *= 3.0                      # values are not structure
    assert structure_fingerprint({"0": b[0], "2": b[2]}) == fa
    offsets = b[2].offsets.numpy()
    free = int(np.setdiff1d(np.arange(b[2].P), offsets)[0])
    b[2].set_offsets(np.sort(np.append(offsets[1:], free)))   # one offset changed
    fb = structure_fingerprint({"0": b[0], "2": b[2]})
    assert fb["0"] == fa["0"] and fb["2"] != fa["2"]


def test_fingerprint_ignores_dtype_and_names_layers_as_given():
    f32 = nn.DiagLinear(16, 24, sparsity=0.75, rng=0, dtype=np.float32)
    f64 = nn.DiagLinear(16, 24, sparsity=0.75, rng=0, dtype=np.float64)
    assert structure_fingerprint({"x": f32}) == structure_fingerprint({"x": f64})
    assert list(structure_fingerprint({"b": f32, "a": f64})) == ["b", "a"]


@pytest.mark.parametrize("mode", ["sparse", "reference"])
def test_dynadiag_fingerprint_follows_stored_set_and_freeze(mode):
    def build():
        return DynaDiagLinear(16, 24, sparsity=0.75, mode=mode, pool=0.5, rng=3,
                              dtype=np.float64)

    a, b = build(), build()
    fa = structure_fingerprint({"d": a})
    assert structure_fingerprint({"d": b}) == fa
    b.alpha.data[:] = np.linspace(0.0, 1.0, b.P)   # alpha and values are not structure
    b.values.data *= 2.0
    assert structure_fingerprint({"d": b}) == fa
    if mode == "sparse":
        offsets = b.offsets.numpy()
        free = int(np.setdiff1d(np.arange(b.P), offsets)[0])
        b.set_offsets(np.sort(np.append(offsets[1:], free)))   # one stored offset changed
        changed = structure_fingerprint({"d": b})["d"]
        assert changed != fa["d"]
        c = build()
        c.ever_active.data[free] = True    # the ever-stored set is structure too
        assert structure_fingerprint({"d": c})["d"] not in (fa["d"], changed)
    b.freeze()
    assert structure_fingerprint({"d": b})["d"] != fa["d"]


def test_masked_linear_fingerprint_follows_the_mask_only():
    a = MaskedLinear(16, 10, density=0.3, rng=4)
    b = MaskedLinear(16, 10, density=0.3, rng=4)
    fa = structure_fingerprint({"m": a})
    assert structure_fingerprint({"m": b}) == fa
    b.weight.data *= 2.0
    assert structure_fingerprint({"m": b}) == fa
    mask = b.mask.numpy().copy()
    mask[0, 0] = not mask[0, 0]              # one entry flipped
    b.set_mask(mask)
    assert structure_fingerprint({"m": b}) != fa


def test_controller_fingerprint_and_modules():
    model = _mlp(0)
    layers = {"0": model[0], "2": model[2]}
    ctrl = DiagPruneGrow(layers, method="rigl", t_end=10, rng=0)
    assert ctrl.fingerprint() == structure_fingerprint(layers)
    # a Module: its sparse layers under their dotted names
    assert structure_fingerprint(model) == structure_fingerprint(layers)


def test_fingerprint_refuses_a_layer_without_a_sparse_structure():
    with pytest.raises(TypeError, match=r"structure_fingerprint: layer 'fc' is a Linear; "
                                        r"expected a DiagLinear, DynaDiagLinear or MaskedLinear"):
        structure_fingerprint({"fc": nn.Linear(3, 2)})
    with pytest.raises(TypeError, match=r"layers must be a mapping name -> layer or a Module; "
                                        r"got list"):
        structure_fingerprint([nn.Linear(3, 2)])


# ----------------------------------------------------------------------------- the GPU path

@pytest.mark.gpu
def test_gpu_reducer_scores_and_fingerprints_match_the_cpu():
    for shape in [(9, 4), (5, 9)]:
        W = np.random.default_rng(1).standard_normal(shape)
        got = F.diagonal_norms(backend.to_device(W, "cuda"))
        assert backend.device_of(got) == "cuda"
        np.testing.assert_allclose(backend.to_numpy(got), loop_norms(W), **F64_TOL)
        seen = []
        cpu = _captured(shape)
        gpu = _captured(shape, device="cuda",
                        reducer=lambda a: seen.append(backend.device_of(a)) or a)
        scores = gpu.diagonal_scores("w")
        assert seen == ["cuda"] and backend.device_of(scores) == "cuda"
        np.testing.assert_allclose(backend.to_numpy(scores), cpu.diagonal_scores("w"),
                                   **F64_TOL)
    layers = {"d": DynaDiagLinear(16, 24, sparsity=0.75, rng=3, device="cuda"),
              "m": MaskedLinear(16, 10, density=0.3, rng=4, device="cuda")}
    host = {"d": DynaDiagLinear(16, 24, sparsity=0.75, rng=3),
            "m": MaskedLinear(16, 10, density=0.3, rng=4)}
    assert structure_fingerprint(layers) == structure_fingerprint(host)
