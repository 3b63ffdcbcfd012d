"""Reductions: sum, mean, max over all or some axes, with ``keepdims``."""

from __future__ import annotations

import builtins
import operator

from .. import backend
from ..autograd import Function


def _normalise_axis(axis, ndim, name):
    """Return a sorted tuple of non-negative axes (all axes for ``None``)."""
    if axis is None:
        return tuple(range(ndim))
    try:  # any integer, Python or NumPy (np.int64 from a shape computation)
        axes = (operator.index(axis),)
    except TypeError:
        axes = tuple(axis)
    out = []
    for a in axes:
        try:
            a = operator.index(a)
        except TypeError:
            raise ValueError(f"{name}: axis {a!r} is not an integer") from None
        if not -ndim <= a < builtins.max(ndim, 1):
            raise ValueError(f"{name}: axis {a!r} is out of range for a tensor with {ndim} dims")
        out.append(a % ndim if ndim else 0)
    if len(set(out)) != len(out):
        raise ValueError(f"{name}: repeated axis in {axis!r}")
    return tuple(sorted(out))


def _expand(gy, in_shape, axes, keepdims):
    """Give ``gy`` back the reduced axes (size 1) so that it broadcasts against the input."""
    if keepdims:
        return gy
    shape = [1 if i in axes else d for i, d in enumerate(in_shape)]
    return gy.reshape(shape)


class Sum(Function):
    def __init__(self, axes, keepdims):
        self.axes, self.keepdims = axes, keepdims

    def forward(self, x):
        self.in_shape = x.shape
        return x.sum(axis=self.axes, keepdims=self.keepdims)

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        g = _expand(gy, self.in_shape, self.axes, self.keepdims)
        return xp.broadcast_to(g, self.in_shape)


class Mean(Sum):
    def forward(self, x):
        self.in_shape = x.shape
        return x.mean(axis=self.axes, keepdims=self.keepdims)

    def backward(self, gy):
        count = 1
        for a in self.axes:
            count *= self.in_shape[a]
        return super().backward(gy / count)


class Max(Function):
    def __init__(self, axes, keepdims):
        self.axes, self.keepdims = axes, keepdims

    def forward(self, x):
        y = x.max(axis=self.axes, keepdims=True)
        # ties share the gradient equally, so the result does not depend on element order
        self.mask = x == y
        return y if self.keepdims else y.reshape(
            [d for i, d in enumerate(x.shape) if i not in self.axes])

    def backward(self, gy):
        g = _expand(gy, self.mask.shape, self.axes, self.keepdims)
        count = self.mask.sum(axis=self.axes, keepdims=True)
        return self.mask * (g / count)


def sum(x, axis=None, keepdims=False):  # noqa: A001
    """Sum over ``axis`` (int, tuple or None for all)."""
    return Sum(_normalise_axis(axis, x.ndim, "sum"), keepdims)(x)


def mean(x, axis=None, keepdims=False):
    """Mean over ``axis`` (int, tuple or None for all)."""
    return Mean(_normalise_axis(axis, x.ndim, "mean"), keepdims)(x)


def max(x, axis=None, keepdims=False):  # noqa: A001
    """Maximum over ``axis``; tied maxima share the gradient equally."""
    if x.size == 0:
        raise ValueError("max: the tensor is empty")
    return Max(_normalise_axis(axis, x.ndim, "max"), keepdims)(x)
