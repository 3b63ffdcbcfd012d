"""`diagnet.random.forked_state`: independent generator states derived from one, the same in
every process (a micro-batch's dropout stream)."""

from __future__ import annotations

import numpy as np
import pytest

from diagnet import random as dn_random


def draws(state, n=4):
    generator = np.random.Generator(np.random.PCG64())
    generator.bit_generator.state = state
    return generator.random(n)


def test_forks_are_reproducible_distinct_and_leave_the_generator_alone():
    dn_random.manual_seed(3)
    base = dn_random.get_state()
    forks = [dn_random.forked_state(base, key) for key in range(4)]
    assert dn_random.get_state() == base  # forking draws nothing
    assert forks == [dn_random.forked_state(base, key) for key in range(4)]
    streams = [tuple(draws(f)) for f in forks] + [tuple(draws(base))]
    assert len(set(streams)) == 5
    dn_random.manual_seed(4)  # another state, other forks
    assert dn_random.forked_state(dn_random.get_state(), 0) != forks[0]
    dn_random.set_state(forks[2])
    np.testing.assert_array_equal(dn_random.default_generator().random(4), draws(forks[2]))


def test_a_fork_depends_on_every_field_of_the_state():
    base = dn_random.get_state()
    other = dict(base, has_uint32=1 - base["has_uint32"], uinteger=7)
    assert dn_random.forked_state(base, 0) != dn_random.forked_state(other, 0)


@pytest.mark.parametrize("key, exc", [(-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_a_bad_key_is_refused(key, exc):
    with pytest.raises(exc, match="key"):
        dn_random.forked_state(dn_random.get_state(), key)


def test_a_bad_state_is_refused():
    with pytest.raises((TypeError, ValueError)):
        dn_random.forked_state({"bit_generator": "PCG64"}, 0)
