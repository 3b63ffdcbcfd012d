"""Compiled CPU kernels (numba) for GELU, forward and backward, over a flat array.

``gelu(x) = x * Phi(x)`` with ``Phi`` the standard normal CDF (the erf form), or its tanh
approximation ``0.5 x (1 + tanh(u))``, ``u = sqrt(2/pi) (x + 0.044715 x^3)``. One pass each
way: forward writes ``y`` from ``x``; backward writes ``gy * gelu'(x)`` from ``x`` and
``gy``, recomputing ``Phi`` instead of keeping an array of it from the forward pass. The
composed NumPy/CuPy version in `diagnet.ops.activation` is the reference these kernels are
tested against, and the GPU path.

How each form is computed (float32 arrays in float64 registers, rounded once on the store):

* **tanh form**: ``0.5 (1 + tanh(u)) = sigmoid(2u) = 1 / (1 + exp(-2u))``, with the
  exponential taken of ``-2|u|`` (never positive: no overflow); the derivative uses the
  same ``sigmoid``: ``s + x * 2 s (1 - s) * du/dx``.
* **erf form, float64**: ``Phi(x) = erfc(-x / sqrt(2)) / 2`` from the C library's ``erfc``
  (accurate in both tails; one scalar call per element, as precise as SciPy's ``erf``).
* **erf form, float32**: ``erfc`` from the Chebyshev fit of Numerical Recipes (``erfcc``,
  relative error below 1.2e-7 for every ``z >= 0``), which vectorises: about float32's own
  precision, at a fraction of a scalar ``erfc`` call per element.
* the density in the erf form's derivative: ``exp(-x^2 / 2) / sqrt(2 pi)``.
* every exponential: float64 arrays use `diagnet.fused.softmax.exp_nonpositive` (a few ulps
  of float64); float32 arrays use `diagnet.fused.fastmath.exp_nonpositive_f32` (a relative
  4e-10, without the former's table lookup, so the whole loop becomes SIMD code); both
  through `diagnet.fused.softmax.exp_for_dtype`.

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
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import types
from numba.extending import overload

from . import fastmath
from .fastmath import exp_nonpositive_f32
from .softmax import exp_for_dtype

__all__ = ["gelu", "gelu_grad", "bias_gelu", "bias_gelu_grad"]

_FASTMATH = fastmath.FASTMATH
_jit, _pjit, _inline = fastmath.jit, fastmath.parallel_jit, fastmath.inline_jit

#: below this many elements a call runs on the calling thread
_SERIAL_ELEMENTS = 1 << 15
#: elements per task of a parallel call (whole SIMD vectors, a few tasks per thread)
_CHUNK = 1 << 13

_u = np.uint64  # unsigned loop indices: no negative-index check, so LLVM vectorises

_SQRT1_2 = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_TANH_CUBIC = 0.044715


# --------------------------------------------------------------------------------------
# Scalar pieces (inlined into the loops below)
# --------------------------------------------------------------------------------------


@_inline
def _erfc_approx(z):
    """``erfc(z)`` for ``z >= 0`` to a relative 1.2e-7 (Numerical Recipes' ``erfcc``)."""
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (
            -0.82215223 + t * 0.17087277))))))))
    exponent = poly - z * z  # at most 3e-8 (at z = 0, where erfc is 1): clamp to 0
    return t * exp_nonpositive_f32(exponent if exponent < 0.0 else 0.0)


def _normal_cdf(v):
    """``Phi(v)`` in float64, to the precision ``v``'s dtype needs (typed by `overload`)."""
    raise NotImplementedError("only callable from numba-compiled code")


@overload(_normal_cdf, jit_options={"fastmath": _FASTMATH, "error_model": "numpy"},
          inline="always")
def _normal_cdf_for(v):
    if v == types.float32:
        def cdf_float32(v):
            x = np.float64(v)
            tail = 0.5 * _erfc_approx(abs(x) * _SQRT1_2)  # Phi(-|x|)
            return tail if x < 0.0 else 1.0 - tail
        return cdf_float32

    def cdf_float64(v):
        return 0.5 * math.erfc(-v * _SQRT1_2)
    return cdf_float64


@_inline
def _tanh_gate(x, like):
    """``(s, ds/dx)`` of the tanh form, ``s = 0.5 (1 + tanh(u)) = sigmoid(2u)``, for the
    float64 ``x`` to the precision of ``like``'s dtype."""
    u = _SQRT_2_OVER_PI * (x + _TANH_CUBIC * x * x * x)
    e = exp_for_dtype(like, -2.0 * abs(u))
    inv = 1.0 / (1.0 + e)
    s, rest = (inv, e * inv) if u >= 0.0 else (e * inv, inv)  # s and 1 - s, both accurate
    du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _TANH_CUBIC * x * x)
    return s, 2.0 * s * rest * du


# --------------------------------------------------------------------------------------
# Loops over elements start .. stop-1 of flat C-contiguous arrays
# --------------------------------------------------------------------------------------


@_jit
def _gelu_block(x, y, tanh_form, start, stop):
    if tanh_form:
        for i in range(_u(start), _u(stop)):
            v = np.float64(x[i])
            y[i] = v * _tanh_gate(v, x[i])[0]
    else:
        for i in range(_u(start), _u(stop)):
            y[i] = np.float64(x[i]) * _normal_cdf(x[i])


@_jit
def _gelu_grad_block(x, gy, gx, tanh_form, start, stop):
    if tanh_form:
        for i in range(_u(start), _u(stop)):
            v = np.float64(x[i])
            s, ds = _tanh_gate(v, x[i])
            gx[i] = np.float64(gy[i]) * (s + v * ds)
    else:
        for i in range(_u(start), _u(stop)):
            v = np.float64(x[i])
            pdf = _INV_SQRT_2PI * exp_for_dtype(x[i], -0.5 * v * v)
            gx[i] = np.float64(gy[i]) * (_normal_cdf(x[i]) + v * pdf)


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
                h = x[r, j] + bias[j]  # rounded to the dtype, as in the reference
                v = np.float64(h)
                y[r, j] = v * _tanh_gate(v, h)[0]
        else:
            for j in range(N):
                h = x[r, j] + bias[j]
                y[r, j] = np.float64(h) * _normal_cdf(h)


@_jit
def _bias_gelu_grad_rows(x, bias, gy, gx, gbias, tanh_form, start, stop):
    """``gx`` of rows ``start .. stop-1``, each row's ``gx`` added into ``gbias`` (float64)."""
    N = _u(x.shape[1])
    for r in range(_u(start), _u(stop)):
        if tanh_form:
            for j in range(N):
                h = x[r, j] + bias[j]
                v = np.float64(h)
                s, ds = _tanh_gate(v, h)
                gx[r, j] = np.float64(gy[r, j]) * (s + v * ds)
        else:
            for j in range(N):
                h = x[r, j] + bias[j]
                v = np.float64(h)
                pdf = _INV_SQRT_2PI * exp_for_dtype(h, -0.5 * v * v)
                gx[r, j] = np.float64(gy[r, j]) * (_normal_cdf(h) + v * pdf)
        # a loop of its own (the row is in L1): LLVM cannot tell that gx and gbias do not
        # overlap, and stores to both in one loop keep it from vectorising
        for j in range(N):
            gbias[j] += gx[r, j]


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
