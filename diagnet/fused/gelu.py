"""Compiled CPU kernels (numba) for GELU, forward and backward, over a flat array.

``gelu(x) = x * Phi(x)`` with ``Phi`` the standard normal CDF (the erf form), or its tanh
approximation ``0.5 x (1 + tanh(u))``, ``u = sqrt(2/pi) (x + 0.044715 x^3)``. One pass each
way: forward writes ``y`` from ``x``; backward writes ``gy * gelu'(x)`` from ``x`` and
``gy``, recomputing ``Phi`` instead of keeping an array of it from the forward pass. The
composed NumPy/CuPy version in `diagnet.ops.activation` is the reference these kernels are
tested against, and the GPU path.

How each form is computed. Each array is computed in registers of its own dtype: float32
arrays in float32 arithmetic (16 SIMD lanes of AVX-512 instead of float64's 8; the float32
tolerances of the tests bound the error against a float64 reference), float64 arrays in
float64.

* **tanh form**: ``0.5 (1 + tanh(u)) = sigmoid(2u) = 1 / (1 + exp(-2u))``, with the
  exponential taken of ``-2|u|`` (never positive: no overflow); the derivative uses the
  same ``sigmoid``: ``s + x * 2 s (1 - s) * du/dx``.
* **erf form, float64**: ``Phi(x) = erfc(-x / sqrt(2)) / 2`` from the C library's ``erfc``
  (accurate in both tails; one scalar call per element, as precise as SciPy's ``erf``).
* **erf form, float32**: ``Phi(-|x|) = erfc(|x| / sqrt(2)) / 2`` from the Chebyshev fit of
  Numerical Recipes (``erfcc``, relative error below 1.2e-7 for every ``z >= 0``), which
  vectorises; taking the tail from ``erfc`` keeps its relative precision for negative
  ``x``, where ``1 + erf`` would cancel.
* the density in the erf form's derivative: ``exp(-x^2 / 2) / sqrt(2 pi)``.
* every exponential: float64 arrays use `diagnet.fused.softmax.exp_nonpositive` (a few ulps
  of float64); float32 arrays use `diagnet.fused.fastmath.exp_f32` (about 1.3 ulps of
  float32, in float32 arithmetic, no table: the whole loop becomes SIMD code).

Threads: arrays of fewer than ``_SERIAL_ELEMENTS`` elements are done on the calling
thread, larger ones in chunks over numba's pool (the policy of `diagnet.diag.cpu`).

**Bias + GELU** (`bias_gelu`, `bias_gelu_grad`), for ``x`` ``(R, N)`` and ``bias`` ``(N,)``:
``h = x + bias`` is formed in the array dtype (as the reference rounds it) and never stored.
The forward writes ``y = gelu(h)`` in one pass; the backward writes ``dx = gy * gelu'(h)``
and sums it over the rows into the bias gradient in the same pass (row by row, while the
row is in the L1 cache). The rows are split into
tasks of about ``_CHUNK`` elements, each adding its rows in order into its own float64
partial row; the partial rows are added in task order. The tasks do not depend on the thread
count, so the serial and the parallel path give the same bits.

**The slope kept for the backward** (`bias_gelu_and_slope`, `bias_gelu_grad_from_slope`): a
training step may have the forward write ``gelu'(h)`` beside ``y``, in the same pass, where
the exponentials and the division of ``Phi`` (or of the tanh gate) are at hand; the backward
is then ``dx = gy * slope`` and the bias sum, a pass without an exponential. The slope is
the expression `bias_gelu_grad` computes, so ``dx`` and the bias gradient have the same bits
either way; the forward costs one more exponential (the density) and one more array.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import types
from numba.extending import overload

from . import fastmath
from .fastmath import exp_f32
from .softmax import exp_nonpositive

__all__ = ["gelu", "gelu_grad", "bias_gelu", "bias_gelu_grad", "bias_gelu_and_slope",
           "bias_gelu_grad_from_slope"]

_FASTMATH = fastmath.FASTMATH
_jit, _pjit = fastmath.elementwise_jit, fastmath.elementwise_parallel_jit
_inline = fastmath.inline_jit

#: below this many elements a call runs on the calling thread
_SERIAL_ELEMENTS = 1 << 15
#: elements per task of a parallel call (whole SIMD vectors, a few tasks per thread)
_CHUNK = 1 << 13

_u = np.uint64  # unsigned loop indices: no negative-index check, so LLVM vectorises

_SQRT1_2 = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_TANH_CUBIC = 0.044715
_F32 = np.float32
#: Numerical Recipes' ``erfcc`` coefficients after the two highest, highest first, float32
_ERFCC_F32 = tuple(_F32(c) for c in (1.48851587, -1.13520398, 0.27886807, -0.18628806,
                                     0.09678418, 0.37409196, 1.00002368, -1.26551223))


# --------------------------------------------------------------------------------------
# Scalar pieces (inlined into the loops below)
# --------------------------------------------------------------------------------------


@_inline
def _erfc_approx_f32(z):
    """``erfc(z)`` for a float32 ``z >= 0`` in float32 arithmetic (Numerical Recipes'
    ``erfcc``, whose fit is good to a relative 1.2e-7; float32 rounding adds a few ulps)."""
    t = _F32(1.0) / (_F32(1.0) + _F32(0.5) * z)
    poly = _F32(0.17087277) * t + _F32(-0.82215223)
    for c in _ERFCC_F32:  # a constant tuple: unrolled
        poly = poly * t + c
    exponent = poly - z * z  # at most 3e-8 (at z = 0, where erfc is 1): clamp to 0
    return t * exp_f32(exponent if exponent < _F32(0.0) else _F32(0.0))


def _normal_cdf(v):
    """``Phi(v)`` in ``v``'s dtype, to its precision (typed by `overload`)."""
    raise NotImplementedError("only callable from numba-compiled code")


def _normal_pdf(v):
    """``exp(-v^2 / 2) / sqrt(2 pi)`` in ``v``'s dtype (typed by `overload`)."""
    raise NotImplementedError("only callable from numba-compiled code")


def _tanh_gate(v):
    """``(s, ds/dv)`` of the tanh form in ``v``'s dtype, ``s = 0.5 (1 + tanh(u)) =
    sigmoid(2u)`` (typed by `overload`)."""
    raise NotImplementedError("only callable from numba-compiled code")


_OVERLOAD = dict(jit_options={"fastmath": _FASTMATH, "error_model": "numpy"}, inline="always")


@overload(_normal_cdf, **_OVERLOAD)
def _normal_cdf_for(v):
    if v == types.float32:
        def cdf_float32(v):
            tail = _F32(0.5) * _erfc_approx_f32(abs(v) * _F32(_SQRT1_2))  # Phi(-|v|)
            return tail if v < _F32(0.0) else _F32(1.0) - tail
        return cdf_float32

    def cdf_float64(v):
        return 0.5 * math.erfc(-v * _SQRT1_2)
    return cdf_float64


@overload(_normal_pdf, **_OVERLOAD)
def _normal_pdf_for(v):
    if v == types.float32:
        return lambda v: _F32(_INV_SQRT_2PI) * exp_f32(_F32(-0.5) * v * v)
    return lambda v: _INV_SQRT_2PI * exp_nonpositive(-0.5 * v * v)


@overload(_tanh_gate, **_OVERLOAD)
def _tanh_gate_for(v):
    if v == types.float32:
        def gate_float32(v):
            u = _F32(_SQRT_2_OVER_PI) * (v + _F32(_TANH_CUBIC) * v * v * v)
            e = exp_f32(_F32(-2.0) * abs(u))
            inv = _F32(1.0) / (_F32(1.0) + e)
            s, rest = (inv, e * inv) if u >= _F32(0.0) else (e * inv, inv)  # s, 1 - s
            du = _F32(_SQRT_2_OVER_PI) * (_F32(1.0) + _F32(3.0 * _TANH_CUBIC) * v * v)
            # v * v overflows float32 from |v| ~ 1.8e19 (float64's reference does not): where
            # the gate has saturated (e == 0: s or 1 - s is 0) the slope is 0, not 0 * inf
            return s, _F32(0.0) if e == _F32(0.0) else _F32(2.0) * s * rest * du
        return gate_float32

    def gate_float64(v):
        u = _SQRT_2_OVER_PI * (v + _TANH_CUBIC * v * v * v)
        e = exp_nonpositive(-2.0 * abs(u))
        inv = 1.0 / (1.0 + e)
        s, rest = (inv, e * inv) if u >= 0.0 else (e * inv, inv)
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _TANH_CUBIC * v * v)
        return s, 2.0 * s * rest * du
    return gate_float64


# --------------------------------------------------------------------------------------
# Loops over elements start .. stop-1 of flat C-contiguous arrays
# --------------------------------------------------------------------------------------


@_jit
def _gelu_block(x, y, tanh_form, start, stop):
    if tanh_form:
        for i in range(_u(start), _u(stop)):
            v = x[i]
            y[i] = v * _tanh_gate(v)[0]
    else:
        for i in range(_u(start), _u(stop)):
            v = x[i]
            y[i] = v * _normal_cdf(v)


@_jit
def _gelu_grad_block(x, gy, gx, tanh_form, start, stop):
    if tanh_form:
        for i in range(_u(start), _u(stop)):
            v = x[i]
            s, ds = _tanh_gate(v)
            gx[i] = gy[i] * (s + v * ds)
    else:
        for i in range(_u(start), _u(stop)):
            v = x[i]
            gx[i] = gy[i] * (_normal_cdf(v) + v * _normal_pdf(v))


@_pjit
def _gelu_parallel(x, y, tanh_form, chunk):
    n = x.shape[0]
    for task in numba.prange((n + chunk - 1) // chunk):
        start = task * chunk
        _gelu_block(x, y, tanh_form, start, min(n, start + chunk))


@_pjit
def _gelu_grad_parallel(x, gy, gx, tanh_form, chunk):
    n = x.shape[0]
    for task in numba.prange((n + chunk - 1) // chunk):
        start = task * chunk
        _gelu_grad_block(x, gy, gx, tanh_form, start, min(n, start + chunk))


# --------------------------------------------------------------------------------------
# Bias + GELU: rows start .. stop-1 of C-contiguous (R, N) arrays
# --------------------------------------------------------------------------------------


@_jit
def _bias_gelu_rows(x, bias, y, tanh_form, start, stop):
    N = _u(x.shape[1])
    for r in range(_u(start), _u(stop)):
        if tanh_form:
            for j in range(N):
                h = x[r, j] + bias[j]
                y[r, j] = h * _tanh_gate(h)[0]
        else:
            for j in range(N):
                h = x[r, j] + bias[j]
                y[r, j] = h * _normal_cdf(h)


@_jit
def _bias_gelu_grad_rows(x, bias, gy, gx, gbias, tanh_form, start, stop):
    """``gx`` of rows ``start .. stop-1``, each row's ``gx`` added into ``gbias`` (float64)."""
    N = _u(x.shape[1])
    for r in range(_u(start), _u(stop)):
        if tanh_form:
            for j in range(N):
                h = x[r, j] + bias[j]
                s, ds = _tanh_gate(h)
                gx[r, j] = gy[r, j] * (s + h * ds)
        else:
            for j in range(N):
                h = x[r, j] + bias[j]
                gx[r, j] = gy[r, j] * (_normal_cdf(h) + h * _normal_pdf(h))
        # a loop of its own (the row is in L1): LLVM cannot tell that gx and gbias do not
        # overlap, and stores to both in one loop keep it from vectorising
        for j in range(N):
            gbias[j] += gx[r, j]


@_jit
def _bias_gelu_slope_rows(x, bias, y, slope, tanh_form, start, stop):
    """``y = gelu(h)`` and ``slope = gelu'(h)``, ``h = x + bias``, for rows ``start ..
    stop-1`` (the slope as `_bias_gelu_grad_rows` computes it)."""
    N = _u(x.shape[1])
    for r in range(_u(start), _u(stop)):
        if tanh_form:
            for j in range(N):
                h = x[r, j] + bias[j]
                s, ds = _tanh_gate(h)
                y[r, j] = h * s
                slope[r, j] = s + h * ds
        else:
            for j in range(N):
                h = x[r, j] + bias[j]
                cdf = _normal_cdf(h)
                y[r, j] = h * cdf
                slope[r, j] = cdf + h * _normal_pdf(h)


@_jit
def _scaled_grad_rows(slope, gy, gx, gbias, start, stop):
    """``gx = gy * slope`` for rows ``start .. stop-1``, each row added into ``gbias``
    (float64)."""
    N = _u(slope.shape[1])
    for r in range(_u(start), _u(stop)):
        for j in range(N):
            gx[r, j] = gy[r, j] * slope[r, j]
        for j in range(N):  # a loop of its own, as in `_bias_gelu_grad_rows`
            gbias[j] += gx[r, j]


@_pjit
def _bias_gelu_slope_parallel(x, bias, y, slope, tanh_form, ntasks):
    R = x.shape[0]
    for task in numba.prange(ntasks):
        _bias_gelu_slope_rows(x, bias, y, slope, tanh_form, R * task // ntasks,
                              R * (task + 1) // ntasks)


@_jit
def _scaled_grad_serial(slope, gy, gx, partial):
    R, ntasks = slope.shape[0], partial.shape[0]
    for task in range(ntasks):
        _scaled_grad_rows(slope, gy, gx, partial[task], R * task // ntasks,
                          R * (task + 1) // ntasks)


@_pjit
def _scaled_grad_parallel(slope, gy, gx, partial):
    R, ntasks = slope.shape[0], partial.shape[0]
    for task in numba.prange(ntasks):
        _scaled_grad_rows(slope, gy, gx, partial[task], R * task // ntasks,
                          R * (task + 1) // ntasks)


@_pjit
def _bias_gelu_parallel(x, bias, y, tanh_form, ntasks):
    R = x.shape[0]
    for task in numba.prange(ntasks):
        _bias_gelu_rows(x, bias, y, tanh_form, R * task // ntasks, R * (task + 1) // ntasks)


@_jit
def _bias_gelu_grad_serial(x, bias, gy, gx, partial, tanh_form):
    R, ntasks = x.shape[0], partial.shape[0]
    for task in range(ntasks):
        _bias_gelu_grad_rows(x, bias, gy, gx, partial[task], tanh_form, R * task // ntasks,
                             R * (task + 1) // ntasks)


@_pjit
def _bias_gelu_grad_parallel(x, bias, gy, gx, partial, tanh_form):
    R, ntasks = x.shape[0], partial.shape[0]
    for task in numba.prange(ntasks):
        _bias_gelu_grad_rows(x, bias, gy, gx, partial[task], tanh_form, R * task // ntasks,
                             R * (task + 1) // ntasks)


def _serial(n):
    return n < _SERIAL_ELEMENTS or numba.get_num_threads() == 1


def _flat(x, dtype=None):
    """``x`` as a flat C-contiguous array (a view when it already is one)."""
    return np.ascontiguousarray(x, dtype=dtype).reshape(-1)


# --------------------------------------------------------------------------------------
# Public API: float32/float64 arrays of any shape
# --------------------------------------------------------------------------------------


def gelu(x, approximate="none"):
    """GELU of ``x`` (float32 or float64, any shape): a new array of ``x``'s shape and dtype.

    ``approximate``: ``"none"`` (the erf form) or ``"tanh"``.
    """
    if x.dtype not in (np.float32, np.float64):
        raise ValueError(f"expected a float32 or float64 array; got {x.dtype}")
    flat = _flat(x)
    y = np.empty_like(flat)
    tanh_form = approximate == "tanh"
    if _serial(flat.shape[0]):
        _gelu_block(flat, y, tanh_form, 0, flat.shape[0])
    else:
        _gelu_parallel(flat, y, tanh_form, _CHUNK)
    return y.reshape(x.shape)


def gelu_grad(x, gy, approximate="none"):
    """``gy * gelu'(x)``: the input gradient of `gelu`; ``gy`` of ``x``'s shape."""
    if x.dtype not in (np.float32, np.float64):
        raise ValueError(f"expected a float32 or float64 array; got {x.dtype}")
    if gy.shape != x.shape:
        raise ValueError(f"gy must have x's shape {x.shape}; got {gy.shape}")
    flat, gflat = _flat(x), _flat(gy, x.dtype)
    gx = np.empty_like(flat)
    tanh_form = approximate == "tanh"
    if _serial(flat.shape[0]):
        _gelu_grad_block(flat, gflat, gx, tanh_form, 0, flat.shape[0])
    else:
        _gelu_grad_parallel(flat, gflat, gx, tanh_form, _CHUNK)
    return gx.reshape(x.shape)


def _rows(x, bias, name="bias_gelu"):
    """``x`` and ``bias`` as C-contiguous arrays, after the O(1) checks that keep the
    compiled loops in bounds."""
    if x.dtype not in (np.float32, np.float64):
        raise ValueError(f"{name}: expected a float32 or float64 x; got {x.dtype}")
    if x.ndim != 2 or bias.shape != x.shape[1:]:
        raise ValueError(f"{name}: expected x (R, N) and bias (N,); got x {x.shape}, "
                         f"bias {bias.shape}")
    if bias.dtype != x.dtype:
        raise ValueError(f"{name}: bias must have x's dtype {x.dtype}; got {bias.dtype}")
    return np.ascontiguousarray(x), np.ascontiguousarray(bias)


def _row_tasks(x):
    """Tasks of about `_CHUNK` elements (whole rows); fixed by the shape, not the threads."""
    R, N = x.shape
    return max(1, min(R, -(-R * N // _CHUNK)))


def bias_gelu(x, bias, approximate="none"):
    """``gelu(x + bias)`` for ``x`` ``(R, N)`` and ``bias`` ``(N,)`` (float32 or float64, one
    dtype): a new ``(R, N)`` array."""
    x, bias = _rows(x, bias)
    y = np.empty_like(x)
    tanh_form = approximate == "tanh"
    if _serial(x.size):
        _bias_gelu_rows(x, bias, y, tanh_form, 0, x.shape[0])
    else:
        _bias_gelu_parallel(x, bias, y, tanh_form, _row_tasks(x))
    return y


def bias_gelu_grad(x, bias, gy, approximate="none", want_bias=True):
    """``(dx, dbias)`` of `bias_gelu`: ``dx = gy * gelu'(x + bias)`` ``(R, N)`` and
    ``dbias = dx.sum(axis=0)`` ``(N,)``, both of ``x``'s dtype (``dbias`` None unless
    ``want_bias``; it is summed in float64)."""
    x, bias = _rows(x, bias, "bias_gelu_grad")
    if gy.shape != x.shape:
        raise ValueError(f"gy must have x's shape {x.shape}; got {gy.shape}")
    gy = np.ascontiguousarray(gy, dtype=x.dtype)
    gx = np.empty_like(x)
    partial = np.zeros((_row_tasks(x), x.shape[1]))
    tanh_form = approximate == "tanh"
    if _serial(x.size):
        _bias_gelu_grad_serial(x, bias, gy, gx, partial, tanh_form)
    else:
        _bias_gelu_grad_parallel(x, bias, gy, gx, partial, tanh_form)
    if not want_bias:
        return gx, None
    return gx, partial.sum(axis=0).astype(x.dtype)


def bias_gelu_and_slope(x, bias, approximate="none"):
    """``(gelu(x + bias), gelu'(x + bias))`` for ``x`` ``(R, N)`` and ``bias`` ``(N,)``
    (float32 or float64, one dtype): two new ``(R, N)`` arrays, from one pass; the second is
    what `bias_gelu_grad_from_slope` takes."""
    x, bias = _rows(x, bias, "bias_gelu_and_slope")
    y = np.empty_like(x)
    slope = np.empty_like(x)
    tanh_form = approximate == "tanh"
    if _serial(x.size):
        _bias_gelu_slope_rows(x, bias, y, slope, tanh_form, 0, x.shape[0])
    else:
        _bias_gelu_slope_parallel(x, bias, y, slope, tanh_form, _row_tasks(x))
    return y, slope


def bias_gelu_grad_from_slope(slope, gy, want_bias=True):
    """`bias_gelu_grad` from the slope that `bias_gelu_and_slope` returned: ``(dx, dbias)``
    with ``dx = gy * slope`` ``(R, N)`` and ``dbias = dx.sum(axis=0)`` (None unless
    ``want_bias``), the same values as `bias_gelu_grad`'s."""
    return grad_by_rows("bias_gelu_grad_from_slope", "slope", slope, gy, want_bias, _serial,
                        _scaled_grad_serial, _scaled_grad_parallel)


def grad_by_rows(name, what, a, gy, want_bias, serial, serial_kernel, parallel_kernel):
    """``(dx, dbias)`` of an activation whose backward reads one saved ``(R, N)`` array ``a``
    (called ``what`` in messages) and ``gy``: ``kernel(a, gy, dx, partial)`` writes ``dx``
    and adds each task's rows into ``partial[task]`` (float64, `_row_tasks` tasks);
    ``dbias`` is their sum in task order, in ``a``'s dtype (None unless ``want_bias``).
    ``serial(size)`` picks ``serial_kernel`` or ``parallel_kernel``. Shared by the backward
    of bias + GELU from its slope and of bias + ReLU from its output."""
    if a.ndim != 2 or a.dtype not in (np.float32, np.float64):
        raise ValueError(f"{name}: expected a 2-d float32 or float64 {what}; got {a.dtype} "
                         f"of shape {a.shape}")
    if gy.shape != a.shape:
        raise ValueError(f"{name}: gy must have {what}'s shape {a.shape}; got {gy.shape}")
    a = np.ascontiguousarray(a)
    gy = np.ascontiguousarray(gy, dtype=a.dtype)
    gx = np.empty_like(a)
    partial = np.zeros((_row_tasks(a), a.shape[1]))
    (serial_kernel if serial(a.size) else parallel_kernel)(a, gy, gx, partial)
    if not want_bias:
        return gx, None
    return gx, partial.sum(axis=0).astype(a.dtype)
