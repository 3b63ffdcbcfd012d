"""`dst.select`, the selection rules shared by DynaDiag and SET/RigL, and the controller
helpers of `dst.base` (seeding, saved-generator checks, the ever-active set).

Checked: `smallest` takes exactly the first ``n`` of `ranking` with the same noise (one
tie-breaking rule for the set and the ordered selections), `ranking` breaks ties by its
second key, `swap_pairs` on a constructed case, `random_subset` is one ``choice`` draw, and
both controllers seed themselves alike from the default generator.
"""

from __future__ import annotations

import numpy as np
import pytest

import diagnet as dn
from diagnet import nn
from diagnet.dst import DiagPruneGrow, DynaDiag, DynaDiagLinear
from diagnet.dst.base import checked_generator_state, controller_generator, ever_active
from diagnet.dst.select import random_subset, ranking, smallest, swap_pairs


@pytest.mark.parametrize("seed", range(5))
def test_smallest_is_the_first_n_of_the_ranking(seed):
    rng = np.random.default_rng(seed)
    key = np.round(rng.random(40), 1)          # many ties
    noise = rng.permutation(40) / 40.0         # distinct
    eligible = rng.random(40) < 0.7
    order = ranking(np.where(eligible, key, np.inf), noise)
    for n in range(int(eligible.sum()) + 1):
        got = smallest(key, n, noise, eligible)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, np.sort(order[:n]))
    np.testing.assert_array_equal(smallest(key, 7, noise), np.sort(ranking(key, noise)[:7]))


def test_ranking_breaks_ties_by_the_second_key():
    key = np.array([0.5, 0.1, 0.5, 0.1, 0.3])
    np.testing.assert_array_equal(ranking(key, np.array([3, 9, 1, 2, 0])), [3, 1, 4, 2, 0])
    # DynaDiag's freeze: the largest alpha first, ties to the lower offset
    offsets = np.array([2, 5, 7, 9])
    alpha = np.array([0.2, 0.4, 0.4, 0.1])
    assert offsets[ranking(-alpha, offsets)[:2]].tolist() == [5, 7]


def test_swap_pairs_on_a_constructed_case():
    P = 8
    offsets = np.array([0, 2, 4, 6])
    scale = np.array([0.9, 0, 0.05, 0, 0.8, 0, 0.01, 0])
    scores = np.array([1.0, 3.0, 0.5, 0.2, 1.0, 5.0, 0.1, 0.4])
    noise = np.linspace(0, 1, P)
    # K = 2: diagonals 0 and 4 stay; the pool is 6 (s 0.01) then 2 (s 0.05)
    dropped, grown, pool = swap_pairs(offsets, scale, scores, 2, 2, noise)
    assert pool.tolist() == [6, 2]
    # 6 (score 0.1) pairs with 5 (score 5.0), 2 (score 0.5) with 1 (score 3.0)
    assert dropped.tolist() == [2, 6] and grown.tolist() == [1, 5]
    # n = 1: only the first pair; a newcomer that does not score higher is not taken
    dropped, grown, _ = swap_pairs(offsets, scale, scores, 2, 1, noise)
    assert dropped.tolist() == [6] and grown.tolist() == [5]
    weak = np.where(np.isin(np.arange(P), offsets), 9.0, 0.1)
    dropped, grown, _ = swap_pairs(offsets, scale, weak, 2, 2, noise)
    assert dropped.size == grown.size == 0


def test_random_subset_is_one_choice_draw():
    got = random_subset(50, 12, np.random.default_rng(3))
    want = np.sort(np.random.default_rng(3).choice(50, size=12, replace=False))
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.int64 and np.unique(got).size == 12


def test_controllers_seed_themselves_alike_from_the_default_generator():
    dn.manual_seed(7)
    first = controller_generator(None).bit_generator.state
    dn.manual_seed(7)
    dynadiag = DynaDiag({"l": DynaDiagLinear(8, 8, rng=0)}, rng=None)
    dn.manual_seed(7)
    prune_grow = DiagPruneGrow({"l": nn.DiagLinear(8, 8, rng=0)}, t_end=10, rng=None)
    assert dynadiag.rng.bit_generator.state == first == prune_grow.rng.bit_generator.state
    assert controller_generator(5).bit_generator.state == \
        np.random.default_rng(5).bit_generator.state
    gen = np.random.default_rng(1)
    assert controller_generator(gen) is gen


def test_checked_generator_state_names_where_and_changes_nothing():
    gen = np.random.default_rng(0)
    before = gen.bit_generator.state
    assert checked_generator_state(gen, np.random.default_rng(4).bit_generator.state,
                                   "x") == np.random.default_rng(4).bit_generator.state
    with pytest.raises(ValueError, match="my state 'rng'"):
        checked_generator_state(gen, {"bit_generator": "MT19937"}, "my state 'rng'")
    assert gen.bit_generator.state == before


def test_ever_active_marks_the_given_units():
    ever = ever_active(6, np.array([1, 4]))
    assert ever.dtype == bool and ever.tolist() == [False, True, False, False, True, False]
    assert not ever_active(3, np.zeros(0, dtype=np.int64)).any()
