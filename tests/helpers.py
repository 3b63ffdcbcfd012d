"""Shared constants and small utilities for the foundation tests (autograd, ops, backend).

Tolerances live here, once, so that every test states the same honest numbers:

* ``GRADCHECK_TOL`` -- central differences in float64. With ``eps = 1e-6`` the truncation
  error is ``O(eps**2) ~ 1e-12`` and the rounding error about ``1e-16 * |f| / eps ~ 1e-10 *
  |f|``; the projected objectives here have ``|f|`` of order 1-100, so an absolute error of
  ``1e-6`` plus ``1e-5`` relative leaves two or more orders of margin without hiding a
  wrong derivative (a wrong formula is off by O(1)).
* ``F64_TOL`` -- forward values in float64 compared with NumPy/SciPy (a few ulps apart).
* ``F32_TOL`` -- forward values in float32 compared with a float64 reference computed from
  the same float32 inputs: float32 has a unit roundoff of ``6e-8``; the ops checked here
  (bounded inputs, well-conditioned formulas) stay within a few dozen ulps.
"""

from __future__ import annotations

import numpy as np

import diagnet

GRADCHECK_TOL = dict(eps=1e-6, atol=1e-6, rtol=1e-5)
F64_TOL = dict(rtol=1e-12, atol=1e-12)
F32_TOL = dict(rtol=1e-5, atol=1e-6)
# gradients in float32, compared with the float64 analytic value
F32_GRAD_TOL = dict(rtol=1e-4, atol=1e-5)


def t64(array, requires_grad=True):
    """A float64 tensor (copy) of ``array``."""
    return diagnet.tensor(np.asarray(array, dtype=np.float64), dtype="float64",
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
