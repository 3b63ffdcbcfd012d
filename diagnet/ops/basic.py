"""Element-wise arithmetic and math functions, with their derivatives; copies, casts and moves.

Every op is written once against the array module ``xp`` of its inputs, so it runs on
NumPy and CuPy alike. Broadcasting is allowed in every binary op: the engine sums each
gradient back to its input's shape, so the backward methods here ignore broadcasting.
Each public function follows the `Function` class that implements it.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from ..backend import get_array_module as _xp  # the array module (numpy/cupy) of arrays
from ..autograd import (FLOAT_DTYPES, Function, Tensor, as_tensor_like, canonical_dtype,
                        check_integer_range)

__all__ = [
    "add", "sub", "mul", "div", "neg", "pow", "matmul",
    "exp", "log", "sqrt", "tanh", "sigmoid", "abs",
    "where", "maximum", "minimum", "clip",
    "clone", "astype", "to_device",
]


# ----------------------------------------------------------------------------- arithmetic

class Add(Function):
    elementwise = True

    def forward(self, a, b):
        return a + b

    def backward(self, gy):
        return gy, gy


def add(a, b):
    """``a + b`` with broadcasting."""
    return Add()(a, b)


class Sub(Function):
    elementwise = True

    def forward(self, a, b):
        return a - b

    def backward(self, gy):
        return gy, -gy


def sub(a, b):
    """``a - b`` with broadcasting."""
    return Sub()(a, b)


class Mul(Function):
    elementwise = True

    def forward(self, a, b):
        self.save(a, b)
        return a * b

    def backward(self, gy):
        a, b = self.saved
        return gy * b, gy * a


def mul(a, b):
    """``a * b`` with broadcasting."""
    return Mul()(a, b)


class Div(Function):
    elementwise = True

    def forward(self, a, b):
        self.save(a, b)
        return a / b

    def backward(self, gy):
        a, b = self.saved
        ga = gy / b
        return ga, -ga * a / b


def div(a, b):
    """``a / b`` with broadcasting."""
    return Div()(a, b)


class Neg(Function):
    def forward(self, a):
        return -a

    def backward(self, gy):
        return -gy


def neg(a):
    """``-a``."""
    return Neg()(a)


class Pow(Function):
    """``a ** b`` with both operands differentiable (``b`` is usually a constant)."""

    elementwise = True

    def forward(self, a, b):
        y = a ** b
        self.save(a, b, y)
        return y

    def backward(self, gy):
        a, b, y = self.saved
        xp = _xp(a)
        ga = gy * b * a ** (b - 1) if self.needs_input_grad[0] else None
        gb = None
        if self.needs_input_grad[1]:
            # d/db a**b = a**b * log(a); defined as 0 where a == 0 (the limit for b > 0)
            with np.errstate(divide="ignore", invalid="ignore"):
                log_a = xp.where(a > 0, xp.log(xp.where(a > 0, a, 1)), 0)
            gb = gy * y * log_a
        return ga, gb


def pow(a, b):  # noqa: A001 - mirrors the operator's name
    """``a ** b`` with broadcasting; both operands may require grad."""
    return Pow()(a, b)


class MatMul(Function):
    """``a @ b`` with NumPy's rules: 1-D operands are promoted, leading dims broadcast."""

    def forward(self, a, b):
        self.save(a, b)
        return a @ b

    def backward(self, gy):
        a, b = self.saved
        xp = _xp(a)
        ga = gb = None
        a2 = a[None, :] if a.ndim == 1 else a        # (.., i, k)
        b2 = b[:, None] if b.ndim == 1 else b        # (.., k, j)
        # give gy back the dims that 1-D operands lost (for vector @ vector gy is 0-d, so
        # expand_dims(gy, -2) would be out of range: reshape it to (1, 1) directly)
        if a.ndim == 1 and b.ndim == 1:
            g2 = gy.reshape(1, 1)
        elif a.ndim == 1:
            g2 = xp.expand_dims(gy, -2)
        elif b.ndim == 1:
            g2 = xp.expand_dims(gy, -1)
        else:
            g2 = gy
        if self.needs_input_grad[0]:
            ga = g2 @ xp.swapaxes(b2, -1, -2)
            if a.ndim == 1:
                ga = ga.reshape(ga.shape[:-2] + ga.shape[-1:])
        if self.needs_input_grad[1]:
            gb = xp.swapaxes(a2, -1, -2) @ g2
            if b.ndim == 1:
                gb = gb[..., 0]
        return ga, gb


def matmul(a, b):
    """Matrix product with NumPy's ``@`` semantics (batched over leading dimensions).

    Shapes: ``(..., i, k) @ (..., k, j) -> (..., i, j)``; a 1-D operand is treated as a
    vector. Raises `ValueError` naming both shapes when the inner dimensions differ or the
    batch dimensions do not broadcast.
    """
    for name, operand in (("a", a), ("b", b)):
        if type(operand).__name__ == "DiagMatrix":
            raise TypeError(f"matmul: operand {name} is a DiagMatrix; use "
                            "diagnet.functional.diag_linear for a differentiable product with "
                            "a diagonal sparse weight")
    sa = a.shape if hasattr(a, "shape") else np.shape(a)
    sb = b.shape if hasattr(b, "shape") else np.shape(b)
    if len(sa) == 0 or len(sb) == 0:
        raise ValueError(f"matmul: operands must be at least 1-D; got shapes {sa} and {sb}")
    ka = sa[-1]
    kb = sb[-2] if len(sb) >= 2 else sb[0]
    if ka != kb:
        raise ValueError(f"matmul: inner dimensions differ: a has shape {tuple(sa)} and "
                         f"b has shape {tuple(sb)} ({ka} != {kb})")
    try:
        np.broadcast_shapes(tuple(sa[:-2]), tuple(sb[:-2]))
    except ValueError:
        raise ValueError(f"matmul: batch dimensions {tuple(sa[:-2])} and {tuple(sb[:-2])} do not "
                         f"broadcast (a has shape {tuple(sa)}, b has shape {tuple(sb)})") from None
    return MatMul()(a, b)


# ----------------------------------------------------------------------------- unary math

class _Unary(Function):
    """A unary op whose derivative is expressed through its input and output."""

    def forward(self, x):
        y = self.fn(_xp(x), x)
        self.save(x, y)
        return y

    def backward(self, gy):
        x, y = self.saved
        return gy * self.derivative(_xp(x), x, y)


class Exp(_Unary):
    fn = staticmethod(lambda xp, x: xp.exp(x))
    derivative = staticmethod(lambda xp, x, y: y)


def exp(x):
    """Element-wise ``e ** x``."""
    return Exp()(x)


class Log(_Unary):
    fn = staticmethod(lambda xp, x: xp.log(x))
    derivative = staticmethod(lambda xp, x, y: 1 / x)


def log(x):
    """Element-wise natural logarithm."""
    return Log()(x)


class Sqrt(_Unary):
    fn = staticmethod(lambda xp, x: xp.sqrt(x))
    derivative = staticmethod(lambda xp, x, y: 0.5 / y)


def sqrt(x):
    """Element-wise square root."""
    return Sqrt()(x)


class Tanh(_Unary):
    fn = staticmethod(lambda xp, x: xp.tanh(x))
    derivative = staticmethod(lambda xp, x, y: 1 - y * y)


def tanh(x):
    """Element-wise hyperbolic tangent."""
    return Tanh()(x)


def _sigmoid(xp, x):
    # exp(-|x|) never overflows, and taking 1/(1+e) for x >= 0 and e/(1+e) for x < 0 keeps
    # full relative precision in the negative tail (0.5 * (1 + tanh(x / 2)) cancels there:
    # it returned exactly 0 for x = -20 in float32 and x = -50 in float64)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e))


class Sigmoid(_Unary):
    fn = staticmethod(_sigmoid)
    derivative = staticmethod(lambda xp, x, y: y * (1 - y))


def sigmoid(x):
    """Element-wise logistic sigmoid ``1 / (1 + e**-x)`` (overflow-free)."""
    return Sigmoid()(x)


class Abs(_Unary):
    fn = staticmethod(lambda xp, x: xp.abs(x))
    derivative = staticmethod(lambda xp, x, y: xp.sign(x))


def abs(x):  # noqa: A001
    """Element-wise absolute value (subgradient 0 at 0)."""
    return Abs()(x)


# ----------------------------------------------------------------------------- selection

class Where(Function):
    elementwise = True

    def forward(self, cond, a, b):
        self.cond = cond.astype(bool)
        return _xp(a).where(self.cond, a, b)

    def backward(self, gy):
        xp = _xp(gy)
        zero = xp.zeros((), dtype=gy.dtype)
        return None, xp.where(self.cond, gy, zero), xp.where(self.cond, zero, gy)


def where(cond, a, b):
    """Pick ``a`` where ``cond`` is true, else ``b`` (broadcasting); grads flow to ``a`` and ``b``."""
    return Where()(cond, a, b)


class Maximum(Function):
    elementwise = True

    def forward(self, a, b):
        xp = _xp(a, b)
        # ties send the gradient to the first operand, like an if/else would
        self.take_a = a >= b
        return xp.where(self.take_a, a, b)

    def backward(self, gy):
        xp = _xp(gy)
        zero = xp.zeros((), dtype=gy.dtype)
        return xp.where(self.take_a, gy, zero), xp.where(self.take_a, zero, gy)


def maximum(a, b):
    """Element-wise maximum; at ties the gradient goes to ``a``."""
    return Maximum()(a, b)


class Minimum(Maximum):
    def forward(self, a, b):
        xp = _xp(a, b)
        self.take_a = a <= b
        return xp.where(self.take_a, a, b)


def minimum(a, b):
    """Element-wise minimum; at ties the gradient goes to ``a``."""
    return Minimum()(a, b)


class Clip(Function):
    def __init__(self, lo, hi):
        self.lo, self.hi = lo, hi

    def forward(self, x):
        xp = _xp(x)
        self.inside = xp.ones(x.shape, dtype=bool)
        if self.lo is not None:
            self.inside &= x >= self.lo
        if self.hi is not None:
            self.inside &= x <= self.hi
        return xp.clip(x, self.lo, self.hi)

    def backward(self, gy):
        return gy * self.inside


def clip(x, lo=None, hi=None):
    """Clamp ``x`` to ``[lo, hi]`` (either may be None); gradient 1 inside, 0 outside."""
    if lo is None and hi is None:
        raise ValueError("clip: at least one of lo and hi must be given")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"clip: lo must be <= hi; got lo={lo}, hi={hi}")
    return Clip(lo, hi)(x)


# ----------------------------------------------------------------------------- copy/dtype/device

class Clone(Function):
    def forward(self, x):
        return x.copy()

    def backward(self, gy):
        return gy


def clone(x):
    """A copy of ``x`` with its own memory that stays in the graph (the gradient passes
    through unchanged); unlike ``detach()``, which shares the data and cuts the graph."""
    return Clone()(x)


class AsType(Function):
    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)

    def forward(self, x):
        self.src = x.dtype
        return x.astype(self.dtype)

    def backward(self, gy):
        return gy.astype(self.src) if self.src in FLOAT_DTYPES else None


def astype(x, dtype):
    """``x`` cast to ``dtype``; the gradient is cast back (float to float only).

    A cast to an integer dtype truncates floats toward zero and raises `ValueError` for
    values that do not fit (NaN, infinities, out of range), instead of wrapping them.
    """
    dt = canonical_dtype(dtype)
    x = as_tensor_like(x, [x])
    if x.dtype == dt:
        return x
    if x.requires_grad and dt not in FLOAT_DTYPES:
        raise TypeError(f"astype: cannot cast a tensor that requires grad to {dt}; detach() it first")
    if dt.kind in "iu":
        check_integer_range(x.data, dt, "astype")
    return AsType(dt)(x)


class ToDevice(Function):
    def __init__(self, device):
        self.device = backend.resolve_device(device)

    def forward(self, x):
        self.src = backend.device_of(x)
        return backend.to_device(x, self.device)

    def backward(self, gy):
        return backend.to_device(gy, self.src)


def to_device(x, device):
    """``x`` copied to ``device`` (``"cpu"``/``"cuda"``); gradients flow back across."""
    if isinstance(x, Tensor) and x.device == backend.resolve_device(device):
        return x
    return ToDevice(device)(x)
