"""Compiled CPU kernels (numba) for softmax, log-softmax and softmax cross-entropy.

Each op works on the rows of a C-contiguous 2-D array ``(R, C)`` (the last axis of the
caller's array) in one compiled call per direction:

* softmax forward: the rows' maxima, then ``exp(x - max)`` into a float64 scratch in one
  loop over all the rows of a task, then per row the sum and ``exp(x - max) / sum`` written
  out (reading the stored exponentials back costs less than computing them again);
* log-softmax forward: the max, the sum of ``exp(x - max)``, then ``(x - max) - log(sum)``;
* backward: ``y * (g - sum(g * y))`` (softmax) or ``g - exp(y) * sum(g)`` (log-softmax);
* cross-entropy forward: per row the loss ``-(1 - eps) logp[label] - (eps / C) sum(logp)``
  and the row's max and ``log(sum(exp(x - max)))``, which backward needs to rebuild the
  softmax; backward writes ``(softmax - q) * scale`` in one pass (``q`` the smoothed target).

The composed NumPy/CuPy versions in `diagnet.ops.activation` and `diagnet.ops.loss` are the
readable references these kernels are tested against, and the GPU path.

The exponential
---------------
NumPy's ``exp`` is SIMD code; a ``math.exp`` call in a numba loop is not (numba has no vector
math library here), and it made a fused softmax slower than NumPy's five passes. Every
exponential these kernels need has an argument ``<= 0`` (``x - max``, a log-probability), so
`exp_nonpositive` computes just that case with operations LLVM vectorises: split
``x = -n/4 + f`` with ``n`` an integer and ``-1/4 < f <= 0``, read ``exp(-n/4)`` from a table
and multiply by a degree-11 Taylor polynomial of ``exp(f)`` (truncation error below
``0.25**12 / 12! < 2e-16``). It is within a few ulps of ``exp`` in float64, returns exactly
0 for ``-inf`` (a masked logit gets exactly zero probability) and NaN for NaN. Float32
arrays, whose results do not need float64's last digits, use the table-free
`diagnet.fused.fastmath.exp_nonpositive_f32` instead (a relative 4e-10, also exactly 0 for
``-inf``): plain arithmetic on wider vectors instead of the table's gathers (faster for the
log-softmax gradient of 17-wide rows; figure in ``docs/benchmarks.md``). `exp_for_dtype`
picks one of the two by the dtype of an array element.

Numerics: float32 arrays are computed in float64 and rounded once on the store (more
accurate than the reference, which rounds every intermediate to float32). NaN and inf
propagate as in the references (a row of ``-inf`` gives NaN; a ``-inf`` entry gives 0).

Threads: a call with fewer than ``_SERIAL_ELEMENTS`` elements runs on the calling thread
(waking the pool would cost more); a larger one splits its rows into tasks over numba's
pool, as `diagnet.diag.cpu` does. Numba compiles each kernel on first use, per dtype, and
caches the machine code on disk (``cache=True``).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import types
from numba.extending import overload

from . import fastmath
from .fastmath import exp_nonpositive_f32

__all__ = ["exp_nonpositive", "exp_for_dtype", "softmax", "softmax_grad", "log_softmax",
           "log_softmax_grad", "cross_entropy_rows", "cross_entropy_grad"]

_FASTMATH = fastmath.FASTMATH
_jit, _pjit, _inline = fastmath.jit, fastmath.parallel_jit, fastmath.inline_jit

#: below this many elements a call runs on the calling thread
_SERIAL_ELEMENTS = 1 << 15
#: rows are split into about this many tasks per thread (uneven rows still balance)
_TASKS_PER_THREAD = 4

_u = np.uint64  # unsigned loop indices: no negative-index check, so LLVM vectorises

# exp(-n / 4) for n = 0 .. 4 * 746; exp(-746) is below the smallest float64 (5e-324)
_EXP_STEPS = 4
_EXP_TABLE_SIZE = 746 * _EXP_STEPS
_EXP_TABLE = np.exp(-np.arange(_EXP_TABLE_SIZE + 1) / _EXP_STEPS)


@_inline
def exp_nonpositive(x):
    """``exp(x)`` for a float64 ``x <= 0`` (or ``-inf``, or NaN), in vectorisable operations.

    See the module docstring. For ``x > 0`` the result is wrong (but no memory outside the
    table is read): callers make sure the argument is not positive.
    """
    scaled = -x * _EXP_STEPS
    scaled = scaled if scaled < _EXP_TABLE_SIZE else _EXP_TABLE_SIZE  # NaN, -inf: the end
    scaled = scaled if scaled > 0.0 else 0.0  # x > 0: never an index before the table
    n = np.int64(scaled)  # truncation is floor here: scaled >= 0
    f = x + n * (1.0 / _EXP_STEPS)  # exact: n / 4 is within 1/4 of -x
    p = 1.0 + f * (1.0 + f * (1 / 2 + f * (1 / 6 + f * (1 / 24 + f * (1 / 120 + f * (
        1 / 720 + f * (1 / 5040 + f * (1 / 40320 + f * (1 / 362880 + f * (
            1 / 3628800 + f * (1 / 39916800)))))))))))
    y = _EXP_TABLE[n] * p
    if n == _EXP_TABLE_SIZE:  # exp(x) < 5e-324, or x = -inf
        y = 0.0
    if x != x:
        y = x
    return y


def exp_for_dtype(like, x):
    """``exp(x)`` for a float64 ``x <= 0``, to the precision of ``like``'s dtype (float32:
    `exp_nonpositive_f32`, else `exp_nonpositive`); callable from numba-compiled code only."""
    raise NotImplementedError("only callable from numba-compiled code")


@overload(exp_for_dtype, jit_options={"fastmath": _FASTMATH, "error_model": "numpy"})
def _exp_for_dtype(like, x):
    if like == types.float32:
        return lambda like, x: exp_nonpositive_f32(x)
    return lambda like, x: exp_nonpositive(x)


# --------------------------------------------------------------------------------------
# Row kernels: rows start .. stop-1 of 2-D C-contiguous arrays
# --------------------------------------------------------------------------------------


@_inline
def _row_max(x, r, sc=None):
    """The max of row ``r`` (of ``x[r] * sc`` unless ``sc`` is None, each product rounded to
    the dtype), in float64. A NaN in the row is skipped here, but makes the row's sum of
    exponentials NaN, so the row comes out NaN as in the reference."""
    m = -np.inf
    for j in range(_u(x.shape[1])):
        v = np.float64(x[r, j] if sc is None else x[r, j] * sc)
        m = v if v > m else m
    return m


@_jit
def _softmax_rows(x, y, sc, start, stop):
    """Rows ``start .. stop-1`` of the softmax of ``x`` (of ``x * sc`` unless ``sc`` is None:
    a float32 scalar for a float32 ``x``, each product rounded to float32 as ``x * scale``
    in NumPy would round it, because the conversion to float64 stands between the product
    and the subtraction; in float64 LLVM would fuse the two, so `softmax` multiplies first
    there), in three passes over the rows.

    1. Each row's max, written over the row's place in a float64 scratch ``e``.
    2. ``e = exp(x - max)`` as one loop over all the rows' elements. A loop per row would
       end each row with a scalar remainder: at attention's 17 keys, one element in 17
       that costs about a whole vector of the polynomial.
    3. Per row, the sum of ``e`` and ``e / sum`` written out.

    Each element gets the expressions of a single pass per row (the exponential of
    ``float64(x) - max``, the sum over the row in its order, one rounding on the store), so
    the results are that pass's to the bit, and with ``sc`` those of that pass over ``x *
    scale`` (tested). Numba compiles a None ``sc`` apart, without the multiplications.
    """
    C = _u(x.shape[1])
    first, rows = _u(start), _u(stop - start)
    e = np.empty(rows * C)  # the rows' exponentials, in float64 (one rounding per output)
    for r in range(rows):
        m = _row_max(x, first + r, sc)
        for j in range(C):
            e[r * C + j] = m
    xs = x.reshape(x.size)
    base = first * C
    for i in range(rows * C):
        xi = xs[base + i] if sc is None else xs[base + i] * sc
        e[i] = exp_for_dtype(xi, np.float64(xi) - e[i])
    for r in range(rows):
        s = 0.0
        for j in range(C):
            s += e[r * C + j]
        inv = 1.0 / s
        for j in range(C):
            y[first + r, j] = e[r * C + j] * inv


@_jit
def _log_softmax_rows(x, y, start, stop):
    C = _u(x.shape[1])
    for r in range(_u(start), _u(stop)):
        m = _row_max(x, r)
        s = 0.0
        for j in range(C):
            s += exp_for_dtype(x[r, j], np.float64(x[r, j]) - m)
        log_s = math.log(s)
        for j in range(C):
            y[r, j] = (np.float64(x[r, j]) - m) - log_s


@_jit
def _softmax_grad_rows(y, gy, gx, sc, start, stop):
    """The softmax gradient of each row, times ``sc`` unless it is None (a scalar of
    ``gx``'s dtype, applied after the gradient is rounded to that dtype, as ``gx *= scale``
    would). Numba compiles a None ``sc`` apart, without the scaling loop."""
    C = _u(y.shape[1])
    for r in range(_u(start), _u(stop)):
        dot = 0.0
        for j in range(C):
            dot += np.float64(gy[r, j]) * np.float64(y[r, j])
        for j in range(C):
            gx[r, j] = np.float64(y[r, j]) * (np.float64(gy[r, j]) - dot)
        if sc is not None:
            for j in range(C):
                gx[r, j] *= sc


@_jit
def _log_softmax_grad_rows(y, gy, gx, start, stop):
    C = _u(y.shape[1])
    for r in range(_u(start), _u(stop)):
        total = 0.0
        for j in range(C):
            total += np.float64(gy[r, j])
        for j in range(C):
            p = exp_for_dtype(y[r, j], np.float64(y[r, j]))
            gx[r, j] = np.float64(gy[r, j]) - p * total


@_jit
def _cross_entropy_rows(z, labels, eps, losses, shift, log_sum, start, stop):
    """Loss of each row, and the row's max (``shift``) and ``log(sum(exp(z - max)))``.

    A label outside ``[0, C)`` makes its row NaN (loss, and through ``shift`` the gradient),
    as the device-side label check of `diagnet.ops.loss` does; nothing outside ``z`` is read.
    """
    C = _u(z.shape[1])
    smooth = eps / z.shape[1]
    for r in range(_u(start), _u(stop)):
        if labels[r] < 0 or labels[r] >= z.shape[1]:
            losses[r] = shift[r] = log_sum[r] = np.nan
            continue
        m = _row_max(z, r)
        s = 0.0
        shifted_sum = 0.0  # sum_c (z_c - max): sum_c logp_c = shifted_sum - C * log_s
        for j in range(C):
            d = np.float64(z[r, j]) - m
            s += exp_nonpositive(d)
            shifted_sum += d
        log_s = math.log(s)
        loss = -(1.0 - eps) * ((np.float64(z[r, labels[r]]) - m) - log_s)
        if eps != 0.0:  # with eps = 0 a -inf logit must not make the loss NaN (0 * inf)
            loss -= smooth * (shifted_sum - z.shape[1] * log_s)
        losses[r] = loss
        shift[r] = m
        log_sum[r] = log_s


@_jit
def _cross_entropy_grad_rows(z, labels, eps, shift, log_sum, scale, gz, start, stop):
    """``gz[r] = (softmax(z[r]) - q[r]) * scale[r]``, q the smoothed one-hot target."""
    C = _u(z.shape[1])
    smooth = eps / z.shape[1]
    for r in range(_u(start), _u(stop)):
        m, log_s, k = shift[r], log_sum[r], scale[r]
        for j in range(C):
            p = exp_nonpositive((np.float64(z[r, j]) - m) - log_s)
            gz[r, j] = (p - smooth) * k
        label = labels[r]
        if 0 <= label < z.shape[1]:  # else the row is NaN already (shift is NaN)
            p = exp_nonpositive((np.float64(z[r, label]) - m) - log_s)
            gz[r, label] = ((p - smooth) - (1.0 - eps)) * k


# --------------------------------------------------------------------------------------
# The same kernels over the thread pool: tasks of ``rows_per_task`` rows
# --------------------------------------------------------------------------------------


@_pjit
def _softmax_parallel(x, y, sc, rows_per_task):
    R = x.shape[0]
    for task in numba.prange((R + rows_per_task - 1) // rows_per_task):
        start = task * rows_per_task
        _softmax_rows(x, y, sc, start, min(R, start + rows_per_task))


@_pjit
def _log_softmax_parallel(x, y, rows_per_task):
    R = x.shape[0]
    for task in numba.prange((R + rows_per_task - 1) // rows_per_task):
        start = task * rows_per_task
        _log_softmax_rows(x, y, start, min(R, start + rows_per_task))


@_pjit
def _softmax_grad_parallel(y, gy, gx, sc, rows_per_task):
    R = y.shape[0]
    for task in numba.prange((R + rows_per_task - 1) // rows_per_task):
        start = task * rows_per_task
        _softmax_grad_rows(y, gy, gx, sc, start, min(R, start + rows_per_task))


@_pjit
def _log_softmax_grad_parallel(y, gy, gx, rows_per_task):
    R = y.shape[0]
    for task in numba.prange((R + rows_per_task - 1) // rows_per_task):
        start = task * rows_per_task
        _log_softmax_grad_rows(y, gy, gx, start, min(R, start + rows_per_task))


def _rows_per_task(x):
    """Rows per task for a parallel call, or 0 when ``x`` is too small for threads."""
    threads = numba.get_num_threads()
    if x.size < _SERIAL_ELEMENTS or threads == 1:
        return 0
    return max(1, -(-x.shape[0] // (threads * _TASKS_PER_THREAD)))


# --------------------------------------------------------------------------------------
# Public API: 2-D float32/float64 arrays, rows along the last axis
# --------------------------------------------------------------------------------------


def _rows(*arrays):
    """The arrays as C-contiguous 2-D arrays of the first one's dtype (float32 or float64)."""
    first = arrays[0]
    if first.ndim != 2 or first.dtype not in (np.float32, np.float64):
        raise ValueError(f"expected a 2-D float32 or float64 array; got {first.dtype} "
                         f"of shape {first.shape}")
    out = [np.ascontiguousarray(a, dtype=first.dtype) for a in arrays]
    for a in out[1:]:
        if a.shape != first.shape:
            raise ValueError(f"expected arrays of shape {first.shape}; got {a.shape}")
    return out


def _labels(labels, n):
    """``labels`` as a contiguous int64 array of shape ``(n,)``."""
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},); got {labels.shape}")
    return labels


def softmax(x, scale=None):
    """``exp(x) / sum(exp(x))`` along the last axis of ``x`` ``(R, C)``; a new array.

    ``scale``: None, or a Python number: the softmax of ``x * scale``, each product rounded
    to ``x``'s dtype as NumPy would round it (attention's scale; for float32 folded into
    the passes, for float64 a multiplication before them).
    """
    (x,) = _rows(x)
    y = np.empty_like(x)
    sc = None
    if scale is not None and x.dtype == np.float32:
        sc = np.float32(scale)
    elif scale is not None:
        x = x * scale
    tasks = _rows_per_task(x)
    if tasks:
        _softmax_parallel(x, y, sc, tasks)
    else:
        _softmax_rows(x, y, sc, 0, x.shape[0])
    return y


def softmax_grad(y, gy, scale=None):
    """The input gradient of `softmax`, from its output ``y`` and the output gradient ``gy``.

    ``scale``: None, or a Python number that multiplies the gradient once it is rounded to
    its dtype, as ``gx * scale`` in NumPy would (attention's scale, folded into this pass).
    """
    y, gy = _rows(y, gy)
    gx = np.empty_like(y)
    sc = None if scale is None else y.dtype.type(scale)
    tasks = _rows_per_task(y)
    if tasks:
        _softmax_grad_parallel(y, gy, gx, sc, tasks)
    else:
        _softmax_grad_rows(y, gy, gx, sc, 0, y.shape[0])
    return gx


def log_softmax(x):
    """``x - logsumexp(x)`` along the last axis of ``x`` ``(R, C)``; a new array."""
    (x,) = _rows(x)
    y = np.empty_like(x)
    tasks = _rows_per_task(x)
    if tasks:
        _log_softmax_parallel(x, y, tasks)
    else:
        _log_softmax_rows(x, y, 0, x.shape[0])
    return y


def log_softmax_grad(y, gy):
    """The input gradient of `log_softmax`, from its output ``y`` and the output gradient."""
    y, gy = _rows(y, gy)
    gx = np.empty_like(y)
    tasks = _rows_per_task(y)
    if tasks:
        _log_softmax_grad_parallel(y, gy, gx, tasks)
    else:
        _log_softmax_grad_rows(y, gy, gx, 0, y.shape[0])
    return gx


def cross_entropy_rows(z, labels, eps):
    """Softmax cross-entropy of each row of ``z`` ``(N, C)`` with the labels ``(N,)``.

    ``eps`` is the label smoothing; a row whose label is outside ``[0, C)`` gets NaN.
    Returns ``(losses, shift, log_sum)``: the losses ``(N,)`` in ``z``'s dtype and, in
    float64, each row's max and ``log(sum(exp(z - max)))`` for `cross_entropy_grad`.
    (One thread: the ``N`` rows of a classifier head are few.)
    """
    (z,) = _rows(z)
    labels = _labels(labels, z.shape[0])
    n = z.shape[0]
    losses = np.empty(n, dtype=z.dtype)
    shift, log_sum = np.empty(n), np.empty(n)
    _cross_entropy_rows(z, labels, float(eps), losses, shift, log_sum, 0, n)
    return losses, shift, log_sum


def cross_entropy_grad(z, labels, eps, shift, log_sum, scale, divisor=1):
    """``(softmax(z) - q) * scale / divisor``, ``q`` the smoothed one-hot target; ``(N, C)``.

    ``shift`` and ``log_sum`` come from `cross_entropy_rows` on the same ``z`` and
    ``labels``; ``scale`` is ``(N,)``, each row's factor (the output gradient), or ``()``,
    one factor for every row; ``divisor`` a number (``N`` for a mean).
    """
    (z,) = _rows(z)
    labels = _labels(labels, z.shape[0])
    scale = np.asarray(scale, dtype=np.float64)
    if scale.shape not in ((), labels.shape):
        raise ValueError(f"scale must have shape () or {labels.shape}; got {scale.shape}")
    if scale.ndim == 0:
        scale = np.full(labels.shape, float(scale) / divisor)
    else:
        scale = np.ascontiguousarray(scale if divisor == 1 else scale / divisor)
    for name, a in (("shift", shift), ("log_sum", log_sum)):
        if a.shape != labels.shape or a.dtype != np.float64:
            raise ValueError(f"{name} must be float64 of shape {labels.shape}; got {a.dtype} "
                             f"of shape {a.shape}")
    gz = np.empty_like(z)
    _cross_entropy_grad_rows(z, labels, float(eps), shift, log_sum, scale, gz, 0, z.shape[0])
    return gz
