"""Shared constants and small utilities for the foundation tests (autograd, ops, backend).

Tolerances are in `tolerances`, the suite's one table of them.
"""

from __future__ import annotations

import numpy as np

import diagnet


def t64(array, requires_grad=True, device=None):
    """A float64 tensor (copy) of ``array`` on ``device`` (default: the default device)."""
    return diagnet.tensor(np.asarray(array, dtype=np.float64), dtype="float64", device=device,
                          requires_grad=requires_grad)


def reduce_to(grad, shape):
    """Sum ``grad`` over the dimensions that broadcasting added to ``shape``.

    Written independently of `diagnet.autograd.sum_to` (one axis at a time) so that it can
    serve as the reference for the engine's broadcasting rule.
    """
    grad = np.asarray(grad)
    while grad.ndim > len(shape):
        grad = grad.sum(axis=0)
    for axis, size in enumerate(shape):
        if size == 1 and grad.shape[axis] != 1:
            grad = grad.sum(axis=axis, keepdims=True)
    assert grad.shape == tuple(shape)
    return grad


def away_from_zero(rng, shape, low=0.2, high=2.0):
    """Random values with ``low <= |x| <= high`` and random signs (no kink at 0)."""
    mag = rng.uniform(low, high, size=shape)
    return np.where(rng.random(shape) < 0.5, -mag, mag)


def distinct(rng, shape, spacing=0.1):
    """Values pairwise at least ``spacing`` apart, in random order (no ties for max)."""
    n = int(np.prod(shape, dtype=np.int64))
    return (rng.permutation(n) * spacing - n * spacing / 2).reshape(shape)
