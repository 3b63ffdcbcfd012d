"""`diagnet.dst.density`: layer-wise densities (uniform, ERK with capping, dense layers) and
their integer budgets (diagonals per layer, entries per layer).

The float densities must hit the requested overall density to float64 rounding; the
integer budgets must stay within the bound their docstrings state, over random sets of
layer shapes (Hypothesis) that include tiny layers (ERK caps them at 1) and dense layers.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from diagnet.dst import density as D
from diagnet.dst import diagonal_budgets, element_budgets, layer_densities

#: float64 sums of a handful of products: a few ulps
EXACT = dict(rel=1e-12, abs=1e-12)


def _overall(shapes, dens):
    return sum(dens[k] * m * n for k, (m, n) in shapes.items()) / sum(
        m * n for m, n in shapes.values())


def _erk_raw(shape, power=1.0):
    m, n = shape
    return ((m + n) / (m * n)) ** power


# sides from 1 (a 1-wide layer) to 300; up to 6 layers
_sides = st.integers(1, 300)
shape_sets = st.dictionaries(st.sampled_from(list("abcdefgh")), st.tuples(_sides, _sides),
                             min_size=1, max_size=6)
densities = st.floats(0.005, 1.0, allow_nan=False)


# ----------------------------------------------------------------------------- by hand

def test_uniform_gives_every_layer_the_same_density():
    shapes = {"fc1": (256, 784), "fc2": (256, 256), "fc3": (10, 256)}
    assert layer_densities(shapes, 0.1) == {name: pytest.approx(0.1, **EXACT) for name in shapes}


def test_erk_by_hand_two_layers():
    # raw densities (m+n)/(mn): a (10, 10) -> 0.2, b (100, 100) -> 0.02; sizes 100 and 10000.
    # eps * (0.2 * 100 + 0.02 * 10000) = 0.1 * 10100  ->  eps = 1010 / 220
    shapes = {"a": (10, 10), "b": (100, 100)}
    eps = 1010 / 220
    got = layer_densities(shapes, 0.1, "erk")
    assert got["a"] == pytest.approx(0.2 * eps, **EXACT)   # 0.918...: below 1, not capped
    assert got["b"] == pytest.approx(0.02 * eps, **EXACT)
    assert _overall(shapes, got) == pytest.approx(0.1, **EXACT)


def test_erk_caps_a_tiny_layer_at_one_and_redistributes():
    # the (4, 3) layer would get eps * 7/12 > 1; capped, the others share the rest
    shapes = {"tiny": (4, 3), "mid": (64, 32), "big": (512, 256)}
    got = layer_densities(shapes, 0.05, "erk")
    assert got["tiny"] == 1.0
    assert _overall(shapes, got) == pytest.approx(0.05, **EXACT)
    # the uncapped layers keep the ERK proportions among themselves
    assert got["mid"] / _erk_raw(shapes["mid"]) == pytest.approx(
        got["big"] / _erk_raw(shapes["big"]), **EXACT)
    assert got["mid"] < 1.0


def test_dense_layers_are_kept_at_one_and_count_towards_the_total():
    shapes = {"first": (64, 32), "mid": (256, 256), "last": (10, 256)}
    for distribution in D.DISTRIBUTIONS:
        got = layer_densities(shapes, 0.3, distribution, dense=["first", "last"])
        assert got["first"] == got["last"] == 1.0
        assert got["mid"] == pytest.approx((0.3 * 70144 - 2048 - 2560) / 65536, **EXACT)
        assert _overall(shapes, got) == pytest.approx(0.3, **EXACT)
        budgets = diagonal_budgets(shapes, 0.3, distribution, dense=["first", "last"])
        assert budgets["first"] == 64 and budgets["last"] == 256
        assert element_budgets(shapes, 0.3, distribution, dense=["last"])["last"] == 2560


def test_density_one_and_power_zero():
    shapes = {"a": (3, 5), "b": (50, 20)}
    assert layer_densities(shapes, 1.0, "erk") == {"a": 1.0, "b": 1.0}
    assert diagonal_budgets(shapes, 1.0, "erk") == {"a": 5, "b": 50}
    assert element_budgets(shapes, 1.0) == {"a": 15, "b": 1000}
    # erk_power_scale=0 makes every raw density 1: uniform
    assert layer_densities(shapes, 0.4, "erk", erk_power_scale=0) == pytest.approx(
        layer_densities(shapes, 0.4, "uniform"), **EXACT)


def test_diagonal_budgets_by_hand():
    # uniform 0.1: K* = 78.4 (P 784, L 256) and 25.6 (P 256, L 256); the target is
    # 0.1 * 266240 = 26624 entries = 104 diagonals of 256. The floors give 103; the one left
    # goes to the larger remainder (0.6 of fc2), which lands exactly on the target.
    shapes = {"fc1": (256, 784), "fc2": (256, 256)}
    got = diagonal_budgets(shapes, 0.1)
    assert got == {"fc1": 78, "fc2": 26}
    assert got["fc1"] * 256 + got["fc2"] * 256 == pytest.approx(0.1 * 266240, **EXACT)


def test_a_layer_below_one_diagonal_gets_one_and_others_give_back():
    # a: K* = 0.01 * 1000 = 10 diagonals of 1000; b: K* = 0.01 * 1 = 0.01 -> must get 1
    shapes = {"a": (1000, 1000), "b": (1, 1)}
    got = diagonal_budgets(shapes, 0.01)
    assert got["b"] == 1 and got["a"] == 10  # the forced extra (1 entry) is below half of 1000
    got = element_budgets({"a": (100, 100), "b": (1, 1)}, 0.01)
    assert got["b"] == 1 and got["a"] == 99   # the extra entry is taken back from "a"


# ----------------------------------------------------------------------------- properties

@given(shape_sets, densities, st.sampled_from(D.DISTRIBUTIONS), st.data())
def test_layer_densities_hit_the_target_exactly(shapes, density, distribution, data):
    names = sorted(shapes)
    dense = data.draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names) - 1))
    held = sum(shapes[k][0] * shapes[k][1] for k in dense)
    total = sum(m * n for m, n in shapes.values())
    if held >= density * total:
        with pytest.raises(ValueError, match="dense layers"):
            layer_densities(shapes, density, distribution, dense=dense)
        return
    got = layer_densities(shapes, density, distribution, dense=dense)
    assert list(got) == list(shapes)
    assert all(0.0 < d <= 1.0 for d in got.values())
    assert all(got[k] == 1.0 for k in dense)
    assert _overall(shapes, got) == pytest.approx(density, **EXACT)
    if distribution == "erk":  # the uncapped layers are proportional to their raw density
        free = [k for k in shapes if k not in dense and got[k] < 1.0]
        ratios = [got[k] / _erk_raw(shapes[k]) for k in free]
        assert all(r == pytest.approx(ratios[0], rel=1e-12) for r in ratios)
        # and a capped layer is one that the common factor would have pushed past 1
        capped = [k for k in shapes if k not in dense and got[k] == 1.0]
        if ratios:
            assert all(ratios[0] * _erk_raw(shapes[k]) >= 1.0 - 1e-12 for k in capped)


@given(shape_sets, densities, st.sampled_from(D.DISTRIBUTIONS))
def test_diagonal_budgets_are_within_half_a_diagonal_of_the_target(shapes, density,
                                                                   distribution):
    dens = layer_densities(shapes, density, distribution)
    got = diagonal_budgets(shapes, density, distribution)
    P = {k: max(s) for k, s in shapes.items()}
    L = {k: min(s) for k, s in shapes.items()}
    assert all(isinstance(k, int) and 1 <= got[name] <= P[name] for name, k in got.items())
    target = density * sum(m * n for m, n in shapes.values())
    error = sum(got[k] * L[k] for k in shapes) - target
    exact = {k: dens[k] * P[k] for k in shapes}
    if min(exact.values()) >= 1.0:
        assert abs(error) <= max(L.values()) / 2 + 1e-9 * target
        # and within one diagonal per layer of its own exact share
        assert all(abs(got[k] - exact[k]) < 1.0 + 1e-9 for k in shapes)
    else:  # the one-diagonal minimum may force entries above the target, never below it
        forced = sum((1.0 - exact[k]) * L[k] for k in shapes if exact[k] < 1.0)
        assert -max(L.values()) / 2 - 1e-9 * target <= error <= forced + max(L.values()) / 2


@given(shape_sets, densities, st.sampled_from(D.DISTRIBUTIONS))
def test_element_budgets_are_exact_to_one_entry(shapes, density, distribution):
    dens = layer_densities(shapes, density, distribution)
    got = element_budgets(shapes, density, distribution)
    size = {k: m * n for k, (m, n) in shapes.items()}
    assert all(1 <= got[k] <= size[k] for k in shapes)
    target = density * sum(size.values())
    if min(dens[k] * size[k] for k in shapes) >= 1.0:
        assert abs(sum(got.values()) - target) <= 0.5 + 1e-9 * target
        assert sum(got.values()) in (math.floor(target + 1e-9), math.ceil(target - 1e-9))


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs, error, message", [
    (dict(shapes={}), ValueError, "shapes is empty"),
    (dict(shapes=[(3, 4)]), TypeError, "shapes must be a mapping"),
    (dict(shapes={"a": (3, 0)}), ValueError, "pair of positive ints"),
    (dict(shapes={"a": (3, 4.0)}), ValueError, "pair of positive ints"),
    (dict(density=0.0), ValueError, r"density must be a number in \(0, 1\]"),
    (dict(density=1.5), ValueError, r"density must be a number in \(0, 1\]"),
    (dict(density=True), ValueError, "density must be"),
    (dict(distribution="er"), ValueError, "distribution must be one of"),
    (dict(dense=["nope"]), ValueError, "not in shapes: .'nope'."),
    (dict(dense="a"), TypeError, "not the string"),
    (dict(erk_power_scale=-1), ValueError, "erk_power_scale"),
    (dict(dense=["a"], density=0.5), ValueError, "dense layers .'a'. alone hold"),
    (dict(dense=["a", "b"], density=0.5), ValueError, "every layer is dense"),
])
@pytest.mark.parametrize("fn", [layer_densities, diagonal_budgets, element_budgets])
def test_invalid_arguments_raise_clear_errors(fn, kwargs, error, message):
    args = dict(shapes={"a": (100, 100), "b": (10, 10)}, density=0.3)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        fn(**args)
