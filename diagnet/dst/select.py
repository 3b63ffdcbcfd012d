"""Which units to take: the selection rules of dynamic sparse training.

Every DST algorithm picks *units* (the diagonals of a layer, or single weights): the weakest
to drop, the most promising to grow, a random set to start from. All of them rank units by a
score and break ties by a second key, that is in the lexicographic order of (score, key):

* `ranking` gives that order in full, on the host. DynaDiag's swap (`swap_pairs`) ranks
  with seeded noise as the key; its freeze keeps the first ``K`` diagonals by ``-alpha``
  with the offset as the key, so that ties go to the lower offset.
* `smallest` gives the ``n`` first units of that order as a set, on the array's device and
  without a sort. SET and RigL (`diagnet.dst.prune_grow`) choose through it:
  `drop_lowest`, `grow_top` and `grow_random`.
* `random_subset`: ``count`` distinct units uniformly at random, the stored diagonals of a
  new `DynaDiagLinear` and the mask of a new `MaskedLinear`.

`ranking`, `smallest` and `swap_pairs` are pure: the noise comes in as an argument. The
strategies that take a generator draw from it a fixed amount per call, whatever the data,
so that a seed fixes the whole stream of decisions.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from ..checks import is_integer
from .. import random as _random

__all__ = ["ranking", "smallest", "random_subset", "swap_pairs", "drop_lowest", "grow_top",
           "grow_random"]


# ----------------------------------------------------------------------------- pure rules

def ranking(key, tiebreak) -> np.ndarray:
    """Indices ``(N,)`` that sort the host arrays ``key`` ``(N,)`` ascending, ties by
    ``tiebreak`` ``(N,)`` ascending (``np.lexsort``): the first ``n`` are the ``n`` smallest."""
    return np.lexsort((tiebreak, key))


def smallest(key, n, noise, eligible=None):
    """The ``n`` eligible entries with the smallest ``key``; ties by the smallest ``noise``.

    Args:
        key: ``(N,)`` float backend array (NumPy or CuPy); no NaN.
        n: how many to pick; at most the number of eligible entries.
        noise: ``(N,)`` float backend array on the same device, distinct values.
        eligible: optional boolean ``(N,)``: only these entries may be picked.

    Returns:
        ``(n,)`` int64 backend array of indices in increasing order: the entries of
        ``ranking(key, noise)[:n]`` (among the eligible ones), as a set.

    Every entry with ``key`` below the ``n``-th smallest value ``v`` is taken; the rest are
    taken from the eligible entries equal to ``v``, those with the smallest noise first, as
    if a noise smaller than any gap between keys had been added, without changing any key.
    O(N): two partitions and no full sort (a 3072 x 768 mask has 2.4M entries); it reads
    one number back from the device.
    """
    xp = backend.get_array_module(key)
    if n == 0:
        return xp.zeros(0, dtype=np.int64)
    if eligible is not None:
        key = xp.where(eligible, key, xp.asarray(np.inf, dtype=key.dtype))
    bound = xp.partition(key, n - 1)[n - 1]          # the n-th smallest key (device scalar)
    below = key < bound
    tied = key == bound
    if eligible is not None:
        tied = xp.logical_and(tied, eligible)
    need = n - int(below.sum())                       # >= 1: a read, at update steps only
    tie_noise = xp.where(tied, noise, np.inf)
    cut = xp.partition(tie_noise, need - 1)[need - 1]
    chosen = xp.logical_or(below, tie_noise <= cut)
    return xp.flatnonzero(chosen).astype(np.int64)


def random_subset(size, count, rng) -> np.ndarray:
    """``count`` distinct indices of ``range(size)``, uniformly at random from the Generator
    ``rng`` (one ``choice`` draw); a host int64 array ``(count,)`` in increasing order."""
    return np.sort(rng.choice(size, size=count, replace=False)).astype(np.int64)


def swap_pairs(offsets, scale, scores, active_k, n, noise):
    """DynaDiag's exchange rule (steps 1-3 of `DynaDiagLinear.swap`), on host arrays.

    Args:
        offsets: ``(S,)`` int64, the stored diagonals (sorted).
        scale: ``(P,)`` float64, every diagonal's scale ``s`` (read at ``offsets``).
        scores: ``(P,)`` float64, every diagonal's gradient score ``G``.
        active_k: ``K``: the ``K`` stored diagonals of largest scale never leave.
        n: the most diagonals to exchange.
        noise: ``(P,)`` float64, the tie-breaking key of both rankings.

    Returns:
        ``(dropped, grown, pool)``: the offsets that leave and enter (int64, equal lengths,
        each sorted) and the pool, the ``S - K`` stored diagonals outside the active set in
        order of scale, smallest first.

    The pool's ``i``-th diagonal (by scale) is exchanged for the ``i``-th non-stored one by
    score, largest first, for the first ``n`` pairs, and only where the newcomer's score is
    strictly larger than the leaver's.
    """
    order = offsets[ranking(scale[offsets], noise[offsets])]
    pool = order[:offsets.size - active_k]
    stored = np.zeros(scores.size, dtype=bool)
    stored[offsets] = True
    outside = np.flatnonzero(~stored)
    entering = outside[ranking(-scores[outside], noise[outside])]
    count = min(n, pool.size, entering.size)
    out, inn = pool[:count], entering[:count]
    better = scores[inn] > scores[out]
    return np.sort(out[better]), np.sort(inn[better]), pool


# ----------------------------------------------------------------------------- SET / RigL
# Each takes backend arrays (NumPy or CuPy) and returns the chosen indices as a backend int64
# array in increasing order (a set: the same on every device). The tie-breaking noise is
# uniform float64, drawn on the scores' device by `diagnet.random.uniform` on every call.

def _check(scores, n, mask, mask_name):
    if scores.ndim != 1:
        raise ValueError(f"scores must be one-dimensional; got shape {tuple(scores.shape)}")
    if not is_integer(n) or not 0 <= n <= scores.size:
        raise ValueError(f"n must be an int in [0, {scores.size}]; got {n!r}")
    if mask is not None and (mask.dtype.kind != "b" or tuple(mask.shape) != tuple(scores.shape)):
        raise ValueError(f"{mask_name} must be a boolean array of shape {tuple(scores.shape)}; "
                         f"got {mask.dtype} {tuple(mask.shape)}")


def _noise(like, rng):
    """Uniform float64 noise of ``like``'s shape, on its device (one draw from ``rng``)."""
    return _random.uniform(like.shape, backend.get_array_module(like), np.float64, rng)


def drop_lowest(scores, n, rng, among=None):
    """The ``n`` entries with the smallest ``scores``; ties broken by seeded noise.

    Args:
        scores: ``(N,)`` float backend array (e.g. mean |value| per active diagonal); no NaN.
        n: how many to pick.
        rng: the generator of the tie-breaking noise (one draw).
        among: optional boolean ``(N,)``: only these entries may be picked (the active ones).

    Returns:
        ``(n,)`` int64 backend array of indices, in increasing order.
    """
    _check(scores, n, among, "among")
    return smallest(scores, n, _noise(scores, rng), among)


def grow_top(scores, candidates, n, rng):
    """The ``n`` candidates with the largest ``scores`` (RigL); ties broken by seeded noise.

    Args:
        scores: ``(N,)`` float backend array (e.g. the all-diagonal gradient score ``G``).
        candidates: boolean ``(N,)``: the entries that may grow (inactive before the drop).
        n: how many to pick.
        rng: the generator of the tie-breaking noise (one draw).

    Returns:
        ``(n,)`` int64 backend array of indices, in increasing order.
    """
    _check(scores, n, candidates, "candidates")
    return smallest(-scores, n, _noise(scores, rng), candidates)


def grow_random(candidates, n, rng):
    """``n`` of the ``candidates``, uniformly at random without replacement (SET).

    Args:
        candidates: boolean ``(N,)`` backend array.
        n: how many to pick.
        rng: the generator of the random keys and of the tie-breaking noise (two draws).

    Returns:
        ``(n,)`` int64 backend array of indices (those with the ``n`` smallest uniform keys),
        in increasing order.
    """
    _check(candidates, n, candidates, "candidates")
    keys = _noise(candidates, rng)
    return smallest(keys, n, _noise(candidates, rng), candidates)
