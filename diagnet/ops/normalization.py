"""Normalisation ops: layer norm, and layer norm with a residual sum in front.

`LayerNorm` is one `Function` for the whole op, normalisation and affine part: its forward
and backward are the fused kernels of `diagnet.fused.layer_norm` (one pass over each row),
which also hold the composed array version that defines the math. `AddLayerNorm` is
``total = x + residual`` and ``layer_norm(total)`` as one node with two outputs, the step
between two branches of a pre-norm transformer: its kernels form the sum in the layer
norm's first pass, and its backward adds the two gradients of ``total`` (the residual
stream's own, and the layer norm's) in the pass that writes them, where separate ``Add``
and ``LayerNorm`` nodes would each make a pass of their own and the autograd engine a third
to add the gradients.
"""

from __future__ import annotations

import math

from ..autograd import FLOAT_DTYPES, Function, Tensor
from ..fused import layer_norm as fused_layer_norm

__all__ = ["layer_norm", "add_layer_norm"]


def _split_params(params, has_weight, has_bias, n):
    """``(weight, bias)`` from the parameter inputs, each flattened to ``(n,)``, or None."""
    params = iter(p.reshape(n) for p in params)
    return (next(params) if has_weight else None), (next(params) if has_bias else None)


def _param_grads(dweight, dbias, has_weight, has_bias, shape):
    """The parameter gradients that the node returns, in the order of its inputs."""
    return tuple(None if g is None else g.reshape(shape)
                 for present, g in ((has_weight, dweight), (has_bias, dbias)) if present)


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
        weight, bias = _split_params(params, self.has_weight, self.has_bias, n)
        y, mean, rstd = fused_layer_norm.forward(x2, weight, bias, self.eps)
        self.save(x2, weight, mean, rstd)
        return y.reshape(x.shape)

    def backward(self, gy):
        x2, weight, mean, rstd = self.saved
        want_params = any(self.needs_input_grad[1:])
        dx, dweight, dbias = fused_layer_norm.backward(gy.reshape(x2.shape), x2, weight, mean,
                                                       rstd, want_params)
        return (dx.reshape(self.x_shape),
                *_param_grads(dweight, dbias, self.has_weight, self.has_bias, self.param_shape))


class AddLayerNorm(Function):
    """``total = x + residual`` and ``layer_norm(total)``: inputs ``(x, residual[, weight][,
    bias])``, outputs ``(total, normed)``, both of ``x``'s shape. The constructor says which
    parameters are present, as for `LayerNorm`; the forward keeps ``total`` (as rows), the
    weight and the per-row statistics. The gradient of ``x`` and of ``residual`` is the same
    array (``d total`` plus the layer norm's input gradient), as an ``Add`` node's is.
    """

    def __init__(self, ndims, eps, has_weight, has_bias):
        self.ndims = ndims
        self.eps = eps
        self.has_weight = has_weight
        self.has_bias = has_bias

    def forward(self, x, residual, *params):
        self.x_shape = x.shape
        self.param_shape = x.shape[x.ndim - self.ndims:]
        n = math.prod(self.param_shape)
        weight, bias = _split_params(params, self.has_weight, self.has_bias, n)
        total, y, mean, rstd = fused_layer_norm.add_forward(
            x.reshape(-1, n), residual.reshape(-1, n), weight, bias, self.eps)
        self.save(total, weight, mean, rstd)
        return total.reshape(x.shape), y.reshape(x.shape)

    def backward(self, gtotal, gy):
        total, weight, mean, rstd = self.saved
        want_params = any(self.needs_input_grad[2:])
        dx, dweight, dbias = fused_layer_norm.add_backward(
            gtotal.reshape(total.shape), gy.reshape(total.shape), total, weight, mean, rstd,
            want_params)
        dx = dx.reshape(self.x_shape)
        return (dx, dx,
                *_param_grads(dweight, dbias, self.has_weight, self.has_bias, self.param_shape))


def _checked_params(op, x, normalized_shape, weight, bias):
    """``normalized_shape`` as a tuple, after checking it and the parameters against ``x``."""
    ns = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if tuple(x.shape[len(x.shape) - len(ns):]) != ns:
        raise ValueError(f"{op}: normalized_shape {ns} does not match the trailing dims "
                         f"of input shape {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != ns:
            raise ValueError(f"{op}: {name} must have shape {ns}; got {tuple(t.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: x must be float32 or float64; got dtype {x.dtype}")
    return ns


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
    ns = _checked_params("layer_norm", x, normalized_shape, weight, bias)
    params = [t for t in (weight, bias) if t is not None]
    return LayerNorm(len(ns), eps, weight is not None, bias is not None)(x, *params)


def add_layer_norm(x, residual, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``total = x + residual`` and ``layer_norm(total, normalized_shape, weight, bias, eps)``
    in one node: a pre-norm transformer's residual add and the next layer norm.

    Args:
        x, residual: float32 or float64 tensors of one shape ``(..., *normalized_shape)``,
            dtype and device (no broadcasting).
        normalized_shape, weight, bias, eps: as for `layer_norm`.

    Returns:
        ``(total, normed)``, two tensors of ``x``'s shape and dtype: the sum, and its layer
        norm. Equal to ``total = x + residual; normed = layer_norm(total, ...)`` in value and
        gradients, with one pass over the rows each way (see `AddLayerNorm`).

    Raises:
        TypeError: ``residual`` is not a Tensor, or its dtype differs from ``x``'s; ``x`` is
            not float32 or float64.
        ValueError: the shapes or devices of ``x`` and ``residual`` differ, or
            ``normalized_shape``, ``weight`` or ``bias`` does not fit ``x``.
    """
    ns = _checked_params("add_layer_norm", x, normalized_shape, weight, bias)
    if not isinstance(residual, Tensor):
        raise TypeError(f"add_layer_norm: residual must be a Tensor; got "
                        f"{type(residual).__name__}")
    if residual.dtype != x.dtype:
        raise TypeError(f"add_layer_norm: residual must have x's dtype {x.dtype}; got "
                        f"{residual.dtype}")
    if tuple(residual.shape) != tuple(x.shape):
        raise ValueError(f"add_layer_norm: residual must have x's shape {tuple(x.shape)}; got "
                         f"{tuple(residual.shape)}")
    if residual.device != x.device:
        raise ValueError(f"add_layer_norm: residual is on {residual.device} but x is on "
                         f"{x.device}")
    params = [t for t in (weight, bias) if t is not None]
    node = AddLayerNorm(len(ns), eps, weight is not None, bias is not None)
    return node(x, residual, *params)
