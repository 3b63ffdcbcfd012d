"""Normalisation ops: layer norm.

The normalisation itself (``(x - mean) / sqrt(var + eps)``) is one `Function` with a
hand-written backward; the optional affine part is composed of basic ops.
"""

from __future__ import annotations

from .. import backend
from ..autograd import Function
from . import basic

__all__ = ["layer_norm"]


class LayerNormCore(Function):
    """``(x - mean) / sqrt(var + eps)`` over the last ``ndims`` axes (no affine part)."""

    def __init__(self, ndims, eps):
        self.axes = tuple(range(-ndims, 0))
        self.eps = eps

    def forward(self, x):
        xp = backend.get_array_module(x)
        mu = x.mean(axis=self.axes, keepdims=True)
        var = ((x - mu) ** 2).mean(axis=self.axes, keepdims=True)
        self.rstd = 1.0 / xp.sqrt(var + self.eps)
        self.xhat = (x - mu) * self.rstd
        return self.xhat

    def backward(self, gy):
        xhat, ax = self.xhat, self.axes
        return self.rstd * (gy - gy.mean(axis=ax, keepdims=True)
                            - xhat * (gy * xhat).mean(axis=ax, keepdims=True))


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Layer normalisation over the trailing ``normalized_shape`` dims, then ``* weight + bias``.

    Args:
        x: tensor ``(..., *normalized_shape)``.
        normalized_shape: int or tuple: the trailing shape normalised over.
        weight, bias: optional tensors of shape ``normalized_shape``.
    """
    ns = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if tuple(x.shape[len(x.shape) - len(ns):]) != ns:
        raise ValueError(f"layer_norm: normalized_shape {ns} does not match the trailing dims "
                         f"of input shape {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != ns:
            raise ValueError(f"layer_norm: {name} must have shape {ns}; got {tuple(t.shape)}")
    y = LayerNormCore(len(ns), eps)(x)
    if weight is not None:
        y = basic.mul(y, weight)
    if bias is not None:
        y = basic.add(y, bias)
    return y
