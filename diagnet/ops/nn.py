"""Neural-network ops: activations, softmax, losses, dropout, layer norm.

The numerically delicate ones (softmax, log_softmax, cross_entropy, layer_norm) are fused
into single functions with hand-written backward passes: fewer graph nodes and the stable
formulas (subtract the max before exponentiating) in one place.
"""

from __future__ import annotations

import math

import numpy as np

from .. import backend
from ..autograd import FLOAT_DTYPES, Function, Tensor
from . import basic, reduce


def _xp(*arrays):
    return backend.get_array_module(*arrays)


# ----------------------------------------------------------------------------- activations

class ReLU(Function):
    def forward(self, x):
        self.positive = x > 0
        return x * self.positive

    def backward(self, gy):
        return gy * self.positive


class GELU(Function):
    def __init__(self, approximate):
        self.approximate = approximate

    def forward(self, x):
        xp = _xp(x)
        self.save(x)
        if self.approximate == "tanh":
            self.th = xp.tanh(basic.SQRT_2_OVER_PI * (x + 0.044715 * x ** 3))
            return 0.5 * x * (1 + self.th)
        self.cdf = 0.5 * (1 + backend.erf(x / math.sqrt(2.0)))
        return x * self.cdf

    def backward(self, gy):
        (x,) = self.saved
        xp = _xp(x)
        if self.approximate == "tanh":
            th = self.th
            du = basic.SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)
            return gy * (0.5 * (1 + th) + 0.5 * x * (1 - th * th) * du)
        pdf = xp.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        return gy * (self.cdf + x * pdf)


def relu(x):
    """``max(x, 0)`` element-wise (gradient 0 at 0)."""
    return ReLU()(x)


def gelu(x, approximate="none"):
    """Gaussian error linear unit: ``x * Phi(x)`` (``approximate="none"``, the erf form) or
    the tanh approximation ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh'; got {approximate!r}")
    return GELU(approximate)(x)


# ----------------------------------------------------------------------------- softmax

def _log_softmax_array(x, axis):
    xp = _xp(x)
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))


class Softmax(Function):
    def __init__(self, axis):
        self.axis = axis

    def forward(self, x):
        xp = _xp(x)
        e = xp.exp(x - x.max(axis=self.axis, keepdims=True))
        self.y = e / e.sum(axis=self.axis, keepdims=True)
        return self.y

    def backward(self, gy):
        y = self.y
        return y * (gy - (gy * y).sum(axis=self.axis, keepdims=True))


class LogSoftmax(Function):
    def __init__(self, axis):
        self.axis = axis

    def forward(self, x):
        self.y = _log_softmax_array(x, self.axis)
        return self.y

    def backward(self, gy):
        xp = _xp(gy)
        return gy - xp.exp(self.y) * gy.sum(axis=self.axis, keepdims=True)


def softmax(x, axis=-1):
    """``exp(x) / sum(exp(x))`` along ``axis``, computed after subtracting the max."""
    return Softmax(axis)(x)


def log_softmax(x, axis=-1):
    """``x - logsumexp(x)`` along ``axis`` (stable for large logits)."""
    return LogSoftmax(axis)(x)


# ----------------------------------------------------------------------------- losses

REDUCTIONS = ("mean", "sum", "none")


class CrossEntropy(Function):
    """Softmax cross-entropy with integer labels and optional label smoothing."""

    def __init__(self, labels, label_smoothing, reduction):
        self.labels, self.eps, self.reduction = labels, label_smoothing, reduction

    def _targets(self, xp, n, c, dtype):
        q = xp.full((n, c), self.eps / c, dtype=dtype)
        q[xp.arange(n), self.labels] += 1 - self.eps
        return q

    def forward(self, logits):
        xp = _xp(logits)
        self.in_shape = logits.shape
        z = logits.reshape(-1, logits.shape[-1])
        logp = _log_softmax_array(z, axis=1)
        q = self._targets(xp, z.shape[0], z.shape[1], z.dtype)
        losses = -(q * logp).sum(axis=1)
        self.logp = logp
        if self.reduction == "mean":
            return losses.mean()
        if self.reduction == "sum":
            return losses.sum()
        return losses.reshape(self.in_shape[:-1])

    def backward(self, gy):
        xp = _xp(gy)
        n, c = self.logp.shape
        g = xp.exp(self.logp) - self._targets(xp, n, c, self.logp.dtype)
        if self.reduction == "mean":
            g *= gy / n
        elif self.reduction == "sum":
            g *= gy
        else:
            g *= gy.reshape(n, 1)
        return g.reshape(self.in_shape)


def cross_entropy(logits, labels, label_smoothing=0.0, reduction="mean"):
    """Softmax cross-entropy between ``logits`` and integer class ``labels``.

    Args:
        logits: float tensor ``(..., C)``.
        labels: integer array/tensor of shape ``logits.shape[:-1]`` with values in ``[0, C)``.
        label_smoothing: ``eps`` in ``[0, 1)``: the target puts ``1 - eps + eps/C`` on the
            label and ``eps/C`` on every other class.
        reduction: ``"mean"`` (over samples), ``"sum"`` or ``"none"`` (shape ``(...)``).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"cross_entropy: reduction must be one of {REDUCTIONS}; got {reduction!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1); got {label_smoothing}")
    shape = tuple(logits.shape)
    if len(shape) < 1:
        raise ValueError("cross_entropy: logits must have a class dimension; got a scalar")
    lab = labels.data if isinstance(labels, Tensor) else labels
    xp = _xp(logits.data if isinstance(logits, Tensor) else logits)
    lab = xp.asarray(lab)
    if lab.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: labels must be integers; got dtype {lab.dtype}")
    if tuple(lab.shape) != shape[:-1]:
        raise ValueError(f"cross_entropy: labels must have shape {shape[:-1]} (logits "
                         f"{shape} without the class dim); got {tuple(lab.shape)}")
    if lab.size and (int(lab.min()) < 0 or int(lab.max()) >= shape[-1]):
        raise ValueError(f"cross_entropy: labels must be in [0, {shape[-1]}); got values in "
                         f"[{int(lab.min())}, {int(lab.max())}]")
    return CrossEntropy(lab.reshape(-1), float(label_smoothing), reduction)(logits)


def mse_loss(pred, target, reduction="mean"):
    """Mean squared error ``(pred - target)**2`` reduced by ``"mean"``, ``"sum"`` or ``"none"``.

    ``pred`` and ``target`` must have the same shape (no silent broadcasting).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"mse_loss: reduction must be one of {REDUCTIONS}; got {reduction!r}")
    if tuple(pred.shape) != tuple(np.shape(target) if not hasattr(target, "shape") else target.shape):
        raise ValueError(f"mse_loss: pred has shape {tuple(pred.shape)} but target has shape "
                         f"{tuple(target.shape) if hasattr(target, 'shape') else np.shape(target)}")
    diff = basic.sub(pred, target)
    sq = basic.mul(diff, diff)
    if reduction == "mean":
        return reduce.mean(sq)
    if reduction == "sum":
        return reduce.sum(sq)
    return sq


# ----------------------------------------------------------------------------- dropout

_default_rng = np.random.default_rng(0)


def manual_seed(seed: int) -> None:
    """Seed the generator used by `dropout` (and other random ops) when none is passed."""
    global _default_rng
    _default_rng = np.random.default_rng(seed)


def dropout(x, p=0.5, training=True, rng=None):
    """Zero each element with probability ``p`` and scale the rest by ``1 / (1 - p)``.

    Identity when ``training`` is false or ``p == 0``. The mask is drawn from ``rng`` (a
    ``numpy.random.Generator`` or an int seed; default: the generator set by
    `manual_seed`), on the CPU, so a seed gives the same mask on every device.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1); got {p}")
    if not training or p == 0.0:
        return x
    if rng is None:
        rng = _default_rng
    elif not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    keep = rng.random(tuple(x.shape)) >= p
    xp = _xp(x.data if isinstance(x, Tensor) else x)
    dtype = x.dtype if x.dtype in FLOAT_DTYPES else np.float32
    scale = xp.asarray(keep.astype(dtype) / (1.0 - p))
    return basic.mul(x, Tensor._wrap(scale))


# ----------------------------------------------------------------------------- layer norm

class LayerNormCore(Function):
    """``(x - mean) / sqrt(var + eps)`` over the last ``ndims`` axes (no affine part)."""

    def __init__(self, ndims, eps):
        self.axes = tuple(range(-ndims, 0))
        self.eps = eps

    def forward(self, x):
        xp = _xp(x)
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
