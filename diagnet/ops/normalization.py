"""Normalisation ops: layer norm.

`LayerNorm` is one `Function` for the whole op, normalisation and affine part: its forward
and backward are the fused kernels of `diagnet.fused.layer_norm` (one pass over each row),
which also hold the composed array version that defines the math.
"""

from __future__ import annotations

import math

from ..autograd import FLOAT_DTYPES, Function
from ..fused import layer_norm as fused_layer_norm

__all__ = ["layer_norm"]


class LayerNorm(Function):
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the last ``ndims`` axes.

    Inputs ``(x[, weight][, bias])``: the constructor says which of the two parameters are
    present. The leading axes of ``x`` are flattened into rows for the kernels; the forward
    keeps the rows, the weight and the per-row ``mean`` and ``rstd`` for the backward.
    """

    def __init__(self, ndims, eps, has_weight, has_bias):
        self.ndims = ndims
        self.eps = eps
        self.has_weight = has_weight
        self.has_bias = has_bias

    def forward(self, x, *params):
        self.x_shape = x.shape
        self.param_shape = x.shape[x.ndim - self.ndims:]
        n = math.prod(self.param_shape)
        x2 = x.reshape(-1, n)
        params = iter(p.reshape(n) for p in params)
        weight = next(params) if self.has_weight else None
        bias = next(params) if self.has_bias else None
        y, mean, rstd = fused_layer_norm.forward(x2, weight, bias, self.eps)
        self.save(x2, weight, mean, rstd)
        return y.reshape(x.shape)

    def backward(self, gy):
        x2, weight, mean, rstd = self.saved
        want_params = any(self.needs_input_grad[1:])
        dx, dweight, dbias = fused_layer_norm.backward(gy.reshape(x2.shape), x2, weight, mean,
                                                       rstd, want_params)
        grads = [dx.reshape(self.x_shape)]
        for present, g in ((self.has_weight, dweight), (self.has_bias, dbias)):
            if present:
                grads.append(None if g is None else g.reshape(self.param_shape))
        return tuple(grads)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Layer normalisation over the trailing ``normalized_shape`` dims, then ``* weight + bias``.

    Args:
        x: float32 or float64 tensor ``(..., *normalized_shape)``.
        normalized_shape: int or tuple: the trailing shape normalised over.
        weight, bias: optional tensors of shape ``normalized_shape`` and ``x``'s dtype.
        eps: added to the (population) variance.

    Returns:
        A tensor of ``x``'s shape and dtype; one graph node, whose backward computes the
        gradients of ``x``, ``weight`` and ``bias`` in one pass over the rows.
    """
    ns = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if tuple(x.shape[len(x.shape) - len(ns):]) != ns:
        raise ValueError(f"layer_norm: normalized_shape {ns} does not match the trailing dims "
                         f"of input shape {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != ns:
            raise ValueError(f"layer_norm: {name} must have shape {ns}; got {tuple(t.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"layer_norm: x must be float32 or float64; got dtype {x.dtype}")
    params = [t for t in (weight, bias) if t is not None]
    return LayerNorm(len(ns), eps, weight is not None, bias is not None)(x, *params)
