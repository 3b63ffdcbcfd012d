"""Reductions over all or some axes, with ``keepdims``: sum, mean, var, max, min, argmax.

Every reduction takes the axes as ``axis=`` or, as in PyTorch, ``dim=`` (not both).

Each public function follows the `Function` class that implements it (`argmax` has none:
an index has no gradient).
"""

from __future__ import annotations

import builtins
import operator

import numpy as np

from .. import backend, checks
from ..autograd import Function, Tensor, as_tensor_like, axis_or_dim

__all__ = ["sum", "mean", "var", "max", "min", "argmax"]


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


def _count(shape, axes):
    """How many elements each reduction over ``axes`` combines."""
    n = 1
    for a in axes:
        n *= shape[a]
    return n


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


def sum(x, axis=None, keepdims=False, *, dim=None):  # noqa: A001
    """Sum over ``axis`` (or ``dim``: int, tuple or None for all)."""
    return Sum(_normalise_axis(axis_or_dim("sum", axis, dim), x.ndim, "sum"), keepdims)(x)


class Mean(Sum):
    def forward(self, x):
        self.in_shape = x.shape
        return x.mean(axis=self.axes, keepdims=self.keepdims)

    def backward(self, gy):
        return super().backward(gy / _count(self.in_shape, self.axes))


def mean(x, axis=None, keepdims=False, *, dim=None):
    """Mean over ``axis`` (or ``dim``: int, tuple or None for all)."""
    return Mean(_normalise_axis(axis_or_dim("mean", axis, dim), x.ndim, "mean"), keepdims)(x)


class Var(Function):
    """``sum((x - mean)**2) / (N - ddof)`` over ``axes``, ``N`` elements per reduction."""

    def __init__(self, axes, keepdims, ddof):
        self.axes, self.keepdims, self.ddof = axes, keepdims, ddof

    def forward(self, x):
        self.centred = x - x.mean(axis=self.axes, keepdims=True)
        self.divisor = _count(x.shape, self.axes) - self.ddof
        sq = self.centred * self.centred
        return sq.sum(axis=self.axes, keepdims=self.keepdims) / self.divisor

    def backward(self, gy):
        # d var / d x_i = 2 (x_i - mean) / (N - ddof): the mean's own dependence on x_i
        # contributes sum_j 2 (x_j - mean) * (-1/N) / (N - ddof) = 0
        g = _expand(gy, self.centred.shape, self.axes, self.keepdims)
        return self.centred * (g * (2.0 / self.divisor))


def var(x, axis=None, keepdims=False, ddof=0, *, dim=None):
    """Variance over ``axis`` (or ``dim``): ``sum((x - mean)**2) / (N - ddof)``.

    ``ddof=0`` (the default, as in NumPy's ``var`` and in `layer_norm`) is the population
    variance; ``ddof=1`` is the unbiased sample variance, PyTorch's default (its
    ``correction=1``). The argument is named ``ddof`` like NumPy's, matching ``axis`` and
    ``keepdims`` here. ``N - ddof`` must be positive (else `ValueError`; NumPy would return
    inf or NaN with a warning).
    """
    if not checks.is_integer(ddof) or ddof < 0:
        raise ValueError(f"var: ddof must be a non-negative int; got {ddof!r}")
    axis = axis_or_dim("var", axis, dim)
    axes = _normalise_axis(axis, x.ndim, "var")
    n = _count(tuple(x.shape), axes)
    if n - ddof <= 0:
        raise ValueError(f"var: needs more than ddof={ddof} elements per reduction; the "
                         f"reduction over axis {axis!r} of shape {tuple(x.shape)} has {n}")
    return Var(axes, keepdims, int(ddof))(x)


class Max(Function):
    """The maximum over ``axes``; tied extremes share the gradient equally."""

    def __init__(self, axes, keepdims):
        self.axes, self.keepdims = axes, keepdims

    def _extreme(self, x):
        return x.max(axis=self.axes, keepdims=True)

    def forward(self, x):
        y = self._extreme(x)
        # ties share the gradient equally, so the result does not depend on element order
        self.mask = x == y
        return y if self.keepdims else y.reshape(
            [d for i, d in enumerate(x.shape) if i not in self.axes])

    def backward(self, gy):
        g = _expand(gy, self.mask.shape, self.axes, self.keepdims)
        count = self.mask.sum(axis=self.axes, keepdims=True)
        return self.mask * (g / count)


def max(x, axis=None, keepdims=False, *, dim=None):  # noqa: A001
    """Maximum over ``axis`` (or ``dim``); tied maxima share the gradient equally.

    Returns the values only (PyTorch's ``max(dim=...)`` also returns indices: see `argmax`).
    """
    axis = axis_or_dim("max", axis, dim)
    if x.size == 0:
        raise ValueError("max: the tensor is empty")
    return Max(_normalise_axis(axis, x.ndim, "max"), keepdims)(x)


class Min(Max):
    def _extreme(self, x):
        return x.min(axis=self.axes, keepdims=True)


def min(x, axis=None, keepdims=False, *, dim=None):  # noqa: A001
    """Minimum over ``axis`` (or ``dim``); tied minima share the gradient equally."""
    axis = axis_or_dim("min", axis, dim)
    if x.size == 0:
        raise ValueError("min: the tensor is empty")
    return Min(_normalise_axis(axis, x.ndim, "min"), keepdims)(x)


def argmax(x, axis=None, keepdims=False, *, dim=None):
    """Index of the maximum along ``axis`` (or ``dim``: an int), or in the flattened tensor
    (``None``).

    Returns an int64 tensor that does not require grad (an index is not differentiable).
    The first index wins at ties, as in NumPy. ``keepdims`` keeps the reduced axis with
    size 1 (every axis for ``axis=None``), as NumPy's ``argmax`` does.
    """
    axis = axis_or_dim("argmax", axis, dim)
    x = as_tensor_like(x, [x])
    if x.size == 0:
        raise ValueError("argmax: the tensor is empty")
    if axis is not None:
        try:
            axis = operator.index(axis)
        except TypeError:
            raise ValueError(f"argmax: axis must be an int or None; got {axis!r}") from None
        (axis,) = _normalise_axis(axis, x.ndim, "argmax")
        if x.ndim == 0:
            axis = None  # axis 0 of a 0-d tensor (accepted, as by max): its only index is 0
    xp = backend.get_array_module(x.data)
    idx = xp.argmax(x.data, axis=axis).astype(np.int64)
    if keepdims:
        shape = [1 if axis is None or i == axis else d for i, d in enumerate(x.shape)]
        idx = idx.reshape(shape)
    return Tensor.from_array(idx)
