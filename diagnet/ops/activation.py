"""Activations: relu, bias_relu, gelu, bias_gelu, log_sigmoid, and the softmax family
(softmax, log_softmax).

(`sigmoid` and `tanh` are plain element-wise math and live in `basic`.) The numerically
delicate ones are single functions with hand-written backward passes: fewer graph nodes and
the stable formulas (subtract the max before exponentiating; never exponentiate a large
positive number) in one place. Each public function follows the `Function` class that
implements it.

GELU, bias + ReLU and the softmax family run on NumPy float arrays through the compiled
kernels of `diagnet.fused` (one pass per direction); the composed array code in each
`Function` is the readable reference they are tested against, and the path for every array
when ``DIAGNET_CPU_KERNELS=reference``. See `fused_cpu`. GELU, bias + GELU and bias + ReLU run
on CuPy float arrays through the CUDA kernels of ``kernels/gelu.cu`` (`gelu_kernels`,
`bias_relu_kernels`), the softmax family through those of ``kernels/softmax.cu``
(`softmax_kernels`).
"""

from __future__ import annotations

import math

import numpy as np

from .. import backend, checks, settings
from ..backend import get_array_module as _xp  # the array module (numpy/cupy) of arrays
from ..autograd import FLOAT_DTYPES, Function, Tensor, axis_or_dim
from ..config import is_grad_enabled
from ..diag import cpu_process

__all__ = ["relu", "bias_relu", "gelu", "bias_gelu", "log_sigmoid", "softmax", "log_softmax"]

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def fused_cpu(x, module):
    """The kernels module ``diagnet.fused.<module>`` for the array ``x``, or None.

    None (use the composed reference) for anything but a NumPy float32/float64 array, and
    when ``settings.cpu_kernels == "reference"`` (`diagnet.settings`, the switch of
    `diagnet.diag.dispatch`, for debugging or where numba is unavailable). The modules are
    imported on first use, so importing diagnet does not compile or load numba; the first
    use configures the process for the kernels (`diagnet.diag.cpu_process`: the thread pools
    and the C heap).
    """
    if type(x) is not np.ndarray or x.dtype not in _KERNEL_DTYPES:
        return None
    if settings.cpu_kernels == "reference":
        return None
    if module == "gelu":
        from ..fused import gelu as kernels
    elif module == "relu":
        from ..fused import relu as kernels
    else:
        from ..fused import softmax as kernels
    cpu_process.configure_once()
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


#: NumPy arrays with fewer elements take the composed bias + ReLU: at (16, 256) both cost
#: the same; below, the three NumPy calls beat a compiled call's fixed cost (batch-1 inference)
BIAS_RELU_KERNEL_MIN_ELEMENTS = 4096


def bias_relu_kernels(x):
    """The bias + ReLU kernels for the array ``x``, or None (use the composed reference).

    `diagnet.fused.relu` (numba) for NumPy arrays of at least
    `BIAS_RELU_KERNEL_MIN_ELEMENTS` elements, as `fused_cpu` decides;
    `diagnet.fused.gelu_cuda` (the bias kernels of ``kernels/gelu.cu``) for CuPy
    float32/float64 arrays. Both modules have ``bias_relu(x, bias)`` and
    ``bias_relu_grad(y, gy, want_bias)``.
    """
    if isinstance(x, np.ndarray):
        return fused_cpu(x, "relu") if x.size >= BIAS_RELU_KERNEL_MIN_ELEMENTS else None
    if x.dtype not in _KERNEL_DTYPES or _xp(x) is np:
        return None
    from ..fused import gelu_cuda as kernels
    return kernels


class BiasReLU(Function):
    """``relu(x + bias)``; inputs ``(x, bias)``, ``x`` ``(..., N)``, ``bias`` ``(N,)``.

    The kernels form ``x + bias`` on the fly and keep only the output: ``y > 0`` is the mask
    of the backward, which sums ``dx`` over the rows into the bias gradient in the same pass.
    The reference keeps the mask ``x + bias > 0``, as `ReLU` does.
    """

    def forward(self, x, bias):
        self.x_shape = x.shape
        self.kernels = bias_relu_kernels(x)
        if self.kernels is not None:
            rows = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # (R, N), also for N = 0
            self.y = self.kernels.bias_relu(rows, bias)
            return self.y.reshape(x.shape)
        h = x + bias  # broadcasting over the leading dims: no reshape needed
        self.positive = h > 0
        return h * self.positive

    def backward(self, gy):
        gy = gy.reshape(math.prod(self.x_shape[:-1]), self.x_shape[-1])
        want_bias = self.needs_input_grad[1]
        if self.kernels is not None:
            gx, gb = self.kernels.bias_relu_grad(self.y, gy, want_bias)
        else:
            gx = gy * self.positive.reshape(gy.shape)
            gb = gx.sum(axis=0) if want_bias else None
        return gx.reshape(self.x_shape), gb


def _check_bias_operands(name, x, bias):
    """Refuse what `bias_relu` and `bias_gelu` cannot take (a bias not matching ``x``)."""
    for arg, t in (("x", x), ("bias", bias)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: {arg} must be a Tensor; got {type(t).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: x must be float32 or float64; got dtype {x.dtype}")
    if bias.dtype != x.dtype:
        raise TypeError(f"{name}: bias must have x's dtype {x.dtype}; got {bias.dtype}")
    if x.ndim < 1 or bias.shape != x.shape[-1:]:
        raise ValueError(f"{name}: bias must have shape (N,) with N = x's last dim; got "
                         f"x of shape {x.shape} and bias of shape {bias.shape}")


def bias_relu(x, bias):
    """``relu(x + bias)`` as one op, for a linear layer followed by ReLU.

    The layer runs without its bias (``layer(x, add_bias=False)``) and the bias is added
    here, in the activation's pass; its gradient is summed in the same pass as ``x``'s.
    As `relu`: ``h * (h > 0)`` for ``h = x + bias`` (NaN stays NaN), gradient 0 at 0.

    Args:
        x: Tensor ``(..., N)``, float32 or float64.
        bias: Tensor ``(N,)`` of ``x``'s dtype and device, or None (then this is `relu`).

    Returns:
        Tensor of ``x``'s shape and dtype.
    """
    if bias is None:
        return relu(x)
    _check_bias_operands("bias_relu", x, bias)
    return BiasReLU()(x, bias)


def gelu_kernels(x):
    """The GELU kernels for the array ``x``, or None (use the composed reference).

    `diagnet.fused.gelu` (numba) for NumPy arrays, as `fused_cpu` decides;
    `diagnet.fused.gelu_cuda` (``kernels/gelu.cu``) for CuPy float32/float64 arrays. Both
    modules have the same functions: ``gelu``, ``gelu_grad``, ``bias_gelu``,
    ``bias_gelu_grad``.
    """
    if isinstance(x, np.ndarray):
        return fused_cpu(x, "gelu")
    if x.dtype not in _KERNEL_DTYPES or _xp(x) is np:
        return None
    from ..fused import gelu_cuda as kernels
    return kernels


def _gelu_reference(h, approximate):
    """``(gelu(h), gate)`` in composed array operations; ``gate`` (``Phi(h)``, or the tanh
    of the tanh form) is what `_gelu_grad_reference` needs besides ``h``."""
    if approximate == "tanh":
        th = _xp(h).tanh(SQRT_2_OVER_PI * (h + 0.044715 * h ** 3))
        return 0.5 * h * (1 + th), th
    cdf = 0.5 * (1 + backend.erf(h / math.sqrt(2.0)))
    return h * cdf, cdf


def _gelu_grad_reference(h, gate, gy, approximate):
    """``gy * gelu'(h)`` in composed array operations, from `_gelu_reference`'s ``gate``."""
    if approximate == "tanh":
        du = SQRT_2_OVER_PI * (1 + 3 * 0.044715 * h * h)
        return gy * (0.5 * (1 + gate) + 0.5 * h * (1 - gate * gate) * du)
    pdf = _xp(h).exp(-0.5 * h * h) / math.sqrt(2 * math.pi)
    return gy * (gate + h * pdf)


class GELU(Function):
    def __init__(self, approximate):
        self.approximate = approximate

    def forward(self, x):
        self.save(x)
        self.kernels = gelu_kernels(x)
        if self.kernels is not None:
            return self.kernels.gelu(x, self.approximate)
        y, self.gate = _gelu_reference(x, self.approximate)
        return y

    def backward(self, gy):
        (x,) = self.saved
        if self.kernels is not None:
            return self.kernels.gelu_grad(x, gy, self.approximate)
        return _gelu_grad_reference(x, self.gate, gy, self.approximate)


def _check_approximate(name, approximate):
    if approximate not in ("none", "tanh"):
        raise ValueError(f"{name}: approximate must be 'none' or 'tanh'; got {approximate!r}")


def gelu(x, approximate="none"):
    """Gaussian error linear unit: ``x * Phi(x)`` (``approximate="none"``, the erf form) or
    the tanh approximation ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``."""
    _check_approximate("gelu", approximate)
    return GELU(approximate)(x)


class BiasGELU(Function):
    """``gelu(x + bias)``; inputs ``(x, bias)``, ``x`` ``(..., N)``, ``bias`` ``(N,)``.

    The kernels form ``x + bias`` on the fly in both directions; the backward sums ``dx``
    over the rows into the bias gradient in the same pass. The reference keeps ``x + bias``.
    With ``keep_slope`` (a backward will follow) the CPU kernels write ``gelu'(x + bias)``
    in the forward's pass and the backward only scales ``dy`` by it
    (`diagnet.fused.gelu.bias_gelu_and_slope`; the same values).
    """

    def __init__(self, approximate, keep_slope=False):
        self.approximate = approximate
        self.keep_slope = keep_slope

    def forward(self, x, bias):
        self.x_shape = x.shape
        rows = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # (R, N), also for N = 0
        self.kernels = gelu_kernels(x)
        self.slope = None
        if self.kernels is not None and self.keep_slope and isinstance(x, np.ndarray):
            y, self.slope = self.kernels.bias_gelu_and_slope(rows, bias, self.approximate)
            return y.reshape(x.shape)
        self.save(rows, bias)
        if self.kernels is not None:
            y = self.kernels.bias_gelu(rows, bias, self.approximate)
        else:
            self.h = rows + bias
            y, self.gate = _gelu_reference(self.h, self.approximate)
        return y.reshape(x.shape)

    def backward(self, gy):
        want_bias = self.needs_input_grad[1]
        if self.slope is not None:
            gx, gb = self.kernels.bias_gelu_grad_from_slope(
                self.slope, gy.reshape(self.slope.shape), want_bias)
            return gx.reshape(self.x_shape), gb
        rows, bias = self.saved
        gy = gy.reshape(rows.shape)
        if self.kernels is not None:
            gx, gb = self.kernels.bias_gelu_grad(rows, bias, gy, self.approximate, want_bias)
        else:
            gx = _gelu_grad_reference(self.h, self.gate, gy, self.approximate)
            gb = gx.sum(axis=0) if want_bias else None
        return gx.reshape(self.x_shape), gb


def bias_gelu(x, bias, approximate="none"):
    """``gelu(x + bias)`` as one op, for a linear layer followed by GELU.

    The layer runs without its bias (``layer(x, add_bias=False)``) and the bias is added
    here, in the activation's pass; its gradient is summed in the same pass as ``x``'s.

    Args:
        x: Tensor ``(..., N)``, float32 or float64.
        bias: Tensor ``(N,)`` of ``x``'s dtype, or None (then this is `gelu`).
        approximate: ``"none"`` (the erf form) or ``"tanh"``, as in `gelu`.

    Returns:
        Tensor of ``x``'s shape and dtype.
    """
    _check_approximate("bias_gelu", approximate)
    if bias is None:
        return gelu(x, approximate)
    _check_bias_operands("bias_gelu", x, bias)
    keep_slope = is_grad_enabled() and (x.requires_grad or bias.requires_grad)
    return BiasGELU(approximate, keep_slope)(x, bias)


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


def softmax_kernels(x):
    """The row kernels of the softmax family for the array ``x``, or None (use the composed
    reference).

    `diagnet.fused.softmax` (numba) for NumPy arrays, as `fused_cpu` decides;
    `diagnet.fused.softmax_cuda` (``kernels/softmax.cu``) for CuPy float32/float64 arrays.
    Both modules have the same functions: ``softmax``, ``softmax_grad``, ``log_softmax``,
    ``log_softmax_grad``, ``cross_entropy_rows``, ``cross_entropy_grad``.
    """
    if isinstance(x, np.ndarray):
        return fused_cpu(x, "softmax")
    if x.dtype not in _KERNEL_DTYPES or _xp(x) is np:
        return None
    from ..fused import softmax_cuda as kernels
    return kernels


def _last_axis_kernels(x, axis):
    """The softmax kernels for ``x`` when ``axis`` is its last axis, else None (the
    reference handles other axes, tuples of axes, and reports bad ones)."""
    if not checks.is_integer(axis) or x.ndim == 0 \
            or axis not in (-1, x.ndim - 1) or x.size == 0:
        return None
    return softmax_kernels(x)


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
