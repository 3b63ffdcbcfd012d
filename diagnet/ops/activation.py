"""Activations: relu, gelu, log_sigmoid, and the softmax family (softmax, log_softmax).

(`sigmoid` and `tanh` are plain element-wise math and live in `basic`.) The numerically
delicate ones are single functions with hand-written backward passes: fewer graph nodes and
the stable formulas (subtract the max before exponentiating; never exponentiate a large
positive number) in one place. Each public function follows the `Function` class that
implements it.

GELU and the softmax family run on NumPy float arrays through the compiled kernels of
`diagnet.fused` (one pass per direction); the composed array code in each `Function` is the
readable reference they are tested against, and the path for CuPy arrays (and for every
array when ``DIAGNET_CPU_KERNELS=reference``). See `fused_cpu`.
"""

from __future__ import annotations

import math
import numbers
import os

import numpy as np

from .. import backend
from ..backend import get_array_module as _xp  # the array module (numpy/cupy) of arrays
from ..autograd import Function, axis_or_dim

__all__ = ["relu", "gelu", "log_sigmoid", "softmax", "log_softmax"]

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def fused_cpu(x, module):
    """The kernels module ``diagnet.fused.<module>`` for the array ``x``, or None.

    None (use the composed reference) for anything but a NumPy float32/float64 array, and
    when ``DIAGNET_CPU_KERNELS=reference`` (the switch of `diagnet.diag.dispatch`, for
    debugging or where numba is unavailable). The modules are imported on first use, so
    importing diagnet does not compile or load numba.
    """
    if type(x) is not np.ndarray or x.dtype not in _KERNEL_DTYPES:
        return None
    if os.environ.get("DIAGNET_CPU_KERNELS", "numba") == "reference":
        return None
    if module == "gelu":
        from ..fused import gelu as kernels
    else:
        from ..fused import softmax as kernels
    return kernels


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
        self.save(x)
        self.kernels = fused_cpu(x, "gelu")
        if self.kernels is not None:
            return self.kernels.gelu(x, self.approximate)
        xp = _xp(x)
        if self.approximate == "tanh":
            self.th = xp.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x ** 3))
            return 0.5 * x * (1 + self.th)
        self.cdf = 0.5 * (1 + backend.erf(x / math.sqrt(2.0)))
        return x * self.cdf

    def backward(self, gy):
        (x,) = self.saved
        if self.kernels is not None:
            return self.kernels.gelu_grad(x, gy, self.approximate)
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


def _last_axis_kernels(x, axis):
    """The softmax kernels for ``x`` when ``axis`` is its last axis, else None (the
    reference handles other axes, tuples of axes, and reports bad ones)."""
    if not isinstance(axis, numbers.Integral) or isinstance(axis, bool) or x.ndim == 0 \
            or axis not in (-1, x.ndim - 1) or x.size == 0:
        return None
    return fused_cpu(x, "softmax")


class Softmax(Function):
    def __init__(self, axis):
        self.axis = axis

    def forward(self, x):
        self.kernels = _last_axis_kernels(x, self.axis)
        if self.kernels is not None:
            self.y = self.kernels.softmax(x.reshape(-1, x.shape[-1])).reshape(x.shape)
            return self.y
        xp = _xp(x)
        e = xp.exp(x - x.max(axis=self.axis, keepdims=True))
        self.y = e / e.sum(axis=self.axis, keepdims=True)
        return self.y

    def backward(self, gy):
        y = self.y
        if self.kernels is not None:
            rows = (-1, y.shape[-1])
            return self.kernels.softmax_grad(y.reshape(rows), gy.reshape(rows)).reshape(y.shape)
        return y * (gy - (gy * y).sum(axis=self.axis, keepdims=True))


def softmax(x, axis=None, *, dim=None):
    """``exp(x) / sum(exp(x))`` along ``axis`` (or ``dim``; default the last axis),
    computed after subtracting the max."""
    return Softmax(axis_or_dim("softmax", axis, dim, default=-1))(x)


class LogSoftmax(Function):
    def __init__(self, axis):
        self.axis = axis

    def forward(self, x):
        self.kernels = _last_axis_kernels(x, self.axis)
        if self.kernels is not None:
            self.y = self.kernels.log_softmax(x.reshape(-1, x.shape[-1])).reshape(x.shape)
            return self.y
        self.y = _log_softmax_array(x, self.axis)
        return self.y

    def backward(self, gy):
        y = self.y
        if self.kernels is not None:
            rows = (-1, y.shape[-1])
            return self.kernels.log_softmax_grad(y.reshape(rows),
                                                 gy.reshape(rows)).reshape(y.shape)
        xp = _xp(gy)
        return gy - xp.exp(y) * gy.sum(axis=self.axis, keepdims=True)


def log_softmax(x, axis=None, *, dim=None):
    """``x - logsumexp(x)`` along ``axis`` (or ``dim``; default the last axis), stable for
    large logits."""
    return LogSoftmax(axis_or_dim("log_softmax", axis, dim, default=-1))(x)
