"""Activations: relu, gelu, log_sigmoid, and the softmax family (softmax, log_softmax).

(`sigmoid` and `tanh` are plain element-wise math and live in `basic`.) The numerically
delicate ones are single functions with hand-written backward passes: fewer graph nodes and
the stable formulas (subtract the max before exponentiating; never exponentiate a large
positive number) in one place. Each public function follows the `Function` class that
implements it.
"""

from __future__ import annotations

import math

from .. import backend
from ..backend import get_array_module as _xp  # the array module (numpy/cupy) of arrays
from ..autograd import Function, axis_or_dim

__all__ = ["relu", "gelu", "log_sigmoid", "softmax", "log_softmax"]

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


# ----------------------------------------------------------------------------- element-wise

class ReLU(Function):
    def forward(self, x):
        self.positive = x > 0
        return x * self.positive

    def backward(self, gy):
        return gy * self.positive


def relu(x):
    """``max(x, 0)`` element-wise (gradient 0 at 0)."""
    return ReLU()(x)


class GELU(Function):
    def __init__(self, approximate):
        self.approximate = approximate

    def forward(self, x):
        xp = _xp(x)
        self.save(x)
        if self.approximate == "tanh":
            self.th = xp.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x ** 3))
            return 0.5 * x * (1 + self.th)
        self.cdf = 0.5 * (1 + backend.erf(x / math.sqrt(2.0)))
        return x * self.cdf

    def backward(self, gy):
        (x,) = self.saved
        xp = _xp(x)
        if self.approximate == "tanh":
            th = self.th
            du = SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)
            return gy * (0.5 * (1 + th) + 0.5 * x * (1 - th * th) * du)
        pdf = xp.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        return gy * (self.cdf + x * pdf)


def gelu(x, approximate="none"):
    """Gaussian error linear unit: ``x * Phi(x)`` (``approximate="none"``, the erf form) or
    the tanh approximation ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh'; got {approximate!r}")
    return GELU(approximate)(x)


class LogSigmoid(Function):
    def forward(self, x):
        xp = _xp(x)
        # log(1 / (1 + e**-x)) = min(x, 0) - log1p(e**-|x|): exp never overflows, and
        # log1p keeps the tiny values of the positive tail (log(1 + 1e-20) would round to 0)
        self.x = x
        self.e = xp.exp(-xp.abs(x))
        return xp.minimum(x, 0) - xp.log1p(self.e)

    def backward(self, gy):
        # d/dx log sigmoid(x) = 1 - sigmoid(x) = sigmoid(-x), from the same e = e**-|x|
        xp = _xp(gy)
        e = self.e
        return gy * xp.where(self.x >= 0, e / (1 + e), 1 / (1 + e))


def log_sigmoid(x):
    """``log(sigmoid(x)) = -log(1 + e**-x)`` element-wise, finite and accurate for any
    finite ``x`` (about ``x`` for large negative ``x``, about ``-e**-x`` for large positive)."""
    return LogSigmoid()(x)


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


def softmax(x, axis=None, *, dim=None):
    """``exp(x) / sum(exp(x))`` along ``axis`` (or ``dim``; default the last axis),
    computed after subtracting the max."""
    return Softmax(axis_or_dim("softmax", axis, dim, default=-1))(x)


class LogSoftmax(Function):
    def __init__(self, axis):
        self.axis = axis

    def forward(self, x):
        self.y = _log_softmax_array(x, self.axis)
        return self.y

    def backward(self, gy):
        xp = _xp(gy)
        return gy - xp.exp(self.y) * gy.sum(axis=self.axis, keepdims=True)


def log_softmax(x, axis=None, *, dim=None):
    """``x - logsumexp(x)`` along ``axis`` (or ``dim``; default the last axis), stable for
    large logits."""
    return LogSoftmax(axis_or_dim("log_softmax", axis, dim, default=-1))(x)
