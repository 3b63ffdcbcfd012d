"""`sparsify`: one call turns a model's dense linears into sparse layers and a controller."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import diagnet as dn
from diagnet import nn
from diagnet.dst import (DiagPruneGrow, DynaDiag, DynaDiagLinear, MaskedLinear,
                         SparsityController, UnstructuredPruneGrow)
from diagnet.dst import RECIPES, find_recipe
from diagnet.dst.convert import dense_linears, sparsify
from diagnet.models import MLP

EXPECTED = {
    "diag": (nn.DiagLinear, SparsityController),
    "dynadiag": (DynaDiagLinear, DynaDiag),
    "diag_set": (nn.DiagLinear, DiagPruneGrow),
    "diag_rigl": (nn.DiagLinear, DiagPruneGrow),
    "unstructured": (MaskedLinear, SparsityController),
    "unstructured_set": (MaskedLinear, UnstructuredPruneGrow),
    "unstructured_rigl": (MaskedLinear, UnstructuredPruneGrow),
}


def _options(kind):
    return dict(t_end=100, delta_t=10) if kind.endswith(("set", "rigl")) else {}


def _model():
    return MLP(64, [48, 32], 10, rng=0)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.name)
def test_every_kind_replaces_the_linears_in_place_and_trains(recipe):
    kind = recipe.name
    model = _model()
    names = list(dense_linears(model))
    controller = sparsify(model, recipe.layer, method=recipe.method, sparsity=0.8,
                          dense=("head",), rng=0, **_options(kind))
    layer_type, controller_type = EXPECTED[kind]
    assert type(controller) is controller_type
    assert list(controller.layers) == names[:-1]
    modules = dict(model.named_modules())
    assert all(type(modules[n]) is layer_type for n in names[:-1])
    assert type(model.head) is nn.Linear
    # the converted layers sit where the dense ones were
    assert [n for n, _ in model.named_modules()] == [n for n, _ in _model().named_modules()]
    # the whole model, dense head included, is at the target to one diagonal per layer
    s = nn.summary(model)
    tol = 1.0 / 48 if kind != "dynadiag" else 0.25 * 0.2 + 1.0 / 48  # dynadiag stores a pool
    assert abs(s.weight_sparsity - 0.8) <= tol, s.weight_sparsity
    if kind.startswith("unstructured"):
        assert abs(s.weight_sparsity - 0.8) < 1e-3
    x = dn.tensor(np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32))
    labels = dn.tensor(np.arange(8) % 10)
    opt = dn.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(12):
        controller.before_step(step)
        loss = dn.functional.cross_entropy(model(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        controller.after_step(step)
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_sparsify_is_seeded():
    a, b, c = _model(), _model(), _model()
    for m, seed in ((a, 3), (b, 3), (c, 4)):
        sparsify(m, "diag", 0.9, rng=seed)
    off = lambda m: m.features[0].offsets.numpy()  # noqa: E731
    np.testing.assert_array_equal(off(a), off(b))
    assert not np.array_equal(off(a), off(c))


def test_erk_gives_small_layers_more_density():
    model = MLP(256, [256, 16], 10, rng=0)
    controller = sparsify(model, "diag", 0.9, distribution="erk", rng=0)
    dens = {n: layer.density for n, layer in controller.layers.items()}
    assert dens["head"] > dens["features.0"]
    assert abs(nn.summary(model).weight_sparsity - 0.9) <= 1.0 / 16


def test_init_dense_keeps_the_largest_diagonals():
    model = _model()
    W = model.features[0].weight.numpy()
    sparsify(model, "diag", 0.75, dense=("head",), init="dense", rng=0)
    layer = model.features[0]
    kept = layer.to_dense().numpy()
    nz = kept != 0
    np.testing.assert_array_equal(kept[nz], W[nz])


@pytest.mark.parametrize("kwargs, match", [
    (dict(layer="sparse"), r"layer must be one of \('diag', 'unstructured'\) .*got 'sparse'"),
    (dict(layer="diag", method="prune"),
     r"method must be one of \('static', 'set', 'rigl', 'dynadiag'\); got 'prune'"),
    (dict(layer="unstructured", method="dynadiag"),
     r"method 'dynadiag' does not apply to layer 'unstructured': its methods are "
     r"\('static', 'set', 'rigl'\)"),
    (dict(layer="diag_set", method="rigl"), "layer='diag_set' is the recipe of method 'set'"),
    (dict(layer="diag", dense=("nope",)), "dense pattern 'nope' matches no linear layer"),
    (dict(layer="diag", dense=("*",)), "no linear layer left"),
    (dict(layer="dynadiag", init="dense"), "init must be 'fresh' or 'dense'"),
    (dict(layer="diag", mode="sparse"),
     "options mode do not apply to layer 'diag' with method 'static'"),
    (dict(layer="diag", t_end=5), r"options t_end .* it takes none \(it has no controller\)"),
    (dict(layer="diag", method="set", t_end=5, schedule=None),
     "options schedule do not apply .* it takes delta_t, t_end, f0"),
    (dict(layer="diag", sparsity=1.0), r"sparsity must be in \[0, 1\)"),
])
def test_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sparsify(_model(), **kwargs)


def test_count_dense_false_puts_each_sparse_layer_at_the_target():
    model = MLP(784, [256, 256], 10, rng=0)
    controller = sparsify(model, "diag", 0.9, dense=("head",), count_dense=False, rng=0)
    # 0.1 * (784 + 256) = 104 diagonals of length 256: exactly 90% over the two layers
    assert [layer.K for layer in controller.layers.values()] == [78, 26]
    assert controller.sparsity() == pytest.approx(0.9, abs=1e-12)
    other = MLP(784, [256, 256], 10, rng=0)
    counted = sparsify(other, "diag", 0.9, dense=("head",), rng=0)
    assert sum(layer.K for layer in counted.layers.values()) < 78 + 26


def test_a_recipe_name_builds_what_its_layer_and_method_build():
    a, b = _model(), _model()
    by_name = sparsify(a, "diag_rigl", 0.8, rng=0, t_end=50)
    by_pair = sparsify(b, "diag", 0.8, method="rigl", rng=0, t_end=50)
    assert type(by_name) is type(by_pair) is DiagPruneGrow and by_pair.method == "rigl"
    np.testing.assert_array_equal(a.features[0].offsets.numpy(), b.features[0].offsets.numpy())
    assert find_recipe("dynadiag") is find_recipe("diag", "dynadiag")
    assert find_recipe("dynadiag", "dynadiag") is find_recipe("diag", "dynadiag")
    assert find_recipe("unstructured").method == "static"


def test_refused_controller_leaves_the_model_and_the_generator_as_they_were():
    """The controller refuses (SET needs ``t_end``) after the layers were drawn: the model
    keeps its dense layers and the generator its state."""
    model = _model()
    before = [(name, type(m)) for name, m in model.named_modules()]
    gen = np.random.default_rng(5)
    state = gen.bit_generator.state
    with pytest.raises(ValueError, match="t_end is required"):
        sparsify(model, "diag_set", sparsity=0.8, rng=gen)
    assert [(name, type(m)) for name, m in model.named_modules()] == before
    assert gen.bit_generator.state == state


def test_docs_table_is_the_recipe_table():
    """``docs/dst.md`` shows `RECIPES` row for row, so the two cannot drift."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "dst.md").read_text()
    rows = [line for line in doc.splitlines() if line.startswith("| `\"")]
    want = [f"| `\"{r.layer}\"` | `\"{r.method}\"` | `\"{r.name}\"` "
            f"| `{_qualified(r.layer_class)}` | `{_qualified(r.controller)}` "
            f"| {', '.join(f'`{o}`' for o in r.options) or '-'} |" for r in RECIPES]
    assert rows == want


def _qualified(cls):
    return f"nn.{cls.__name__}" if cls.__module__.startswith("diagnet.nn") else cls.__name__
