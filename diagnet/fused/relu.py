"""Compiled CPU kernels (numba) for bias + ReLU, forward and backward, over rows.

For ``x`` ``(R, N)`` and ``bias`` ``(N,)`` (the output of a linear layer run without its
bias, and that bias):

* forward, one pass: ``h = x + bias`` (rounded to the dtype, as the reference rounds it) and
  ``y = h * (h > 0)``, the reference's own formula, so NaN stays NaN and ``-inf`` gives NaN
  as in `diagnet.ops.activation.relu`;
* backward, one pass over each row: ``dx = gy * (y > 0)`` and the bias gradient
  ``dbias = dx.sum(axis=0)``, summed while the row is in the L1 cache. ``y > 0`` exactly
  where ``h > 0`` (NaN and ``-inf`` give a NaN ``y``, which is not positive), so the backward
  reads the output instead of ``x`` and ``bias``, and no mask array is written.

Values and ``dx`` are bit for bit those of the composed NumPy/CuPy reference in
`diagnet.ops.activation.BiasReLU`. The bias gradient is summed as `diagnet.fused.gelu` sums
its own: the rows are split into tasks fixed by the shape (`diagnet.fused.gelu`'s row
tasks), each adding its rows in order into its own float64 partial row, and the partial rows
are added in task order, so the serial and the parallel path give the same bits.

Threads: a pass costs a fraction of a nanosecond per element, so arrays of fewer than
``_SERIAL_ELEMENTS`` elements are done on the calling thread (waking numba's pool would cost
more than it saves); larger ones run their row tasks over the pool.
"""

from __future__ import annotations

import numba
import numpy as np

from . import fastmath
from .gelu import _row_tasks, _rows, grad_by_rows

__all__ = ["bias_relu", "bias_relu_grad"]

_jit, _pjit = fastmath.elementwise_jit, fastmath.elementwise_parallel_jit

#: below this many elements a call runs on the calling thread
_SERIAL_ELEMENTS = 1 << 16

_u = np.uint64  # unsigned loop indices: no negative-index check, so LLVM vectorises


# --------------------------------------------------------------------------------------
# Loops over rows start .. stop-1 of C-contiguous (R, N) arrays
# --------------------------------------------------------------------------------------


@_jit
def _bias_relu_rows(x, bias, y, start, stop):
    N = _u(x.shape[1])
    for r in range(_u(start), _u(stop)):
        for j in range(N):
            h = x[r, j] + bias[j]
            y[r, j] = h * (h > 0)


@_jit
def _bias_relu_grad_rows(y, gy, gx, gbias, start, stop):
    """``gx`` of rows ``start .. stop-1``, each row's ``gx`` added into ``gbias`` (float64)."""
    N = _u(y.shape[1])
    for r in range(_u(start), _u(stop)):
        for j in range(N):
            gx[r, j] = gy[r, j] * (y[r, j] > 0)
        # a loop of its own: stores to gx and gbias in one loop keep LLVM from vectorising
        for j in range(N):
            gbias[j] += gx[r, j]


@_pjit
def _bias_relu_parallel(x, bias, y, ntasks):
    R = x.shape[0]
    for task in numba.prange(ntasks):
        _bias_relu_rows(x, bias, y, R * task // ntasks, R * (task + 1) // ntasks)


@_jit
def _bias_relu_grad_serial(y, gy, gx, partial):
    R, ntasks = y.shape[0], partial.shape[0]
    for task in range(ntasks):
        _bias_relu_grad_rows(y, gy, gx, partial[task], R * task // ntasks,
                             R * (task + 1) // ntasks)


@_pjit
def _bias_relu_grad_parallel(y, gy, gx, partial):
    R, ntasks = y.shape[0], partial.shape[0]
    for task in numba.prange(ntasks):
        _bias_relu_grad_rows(y, gy, gx, partial[task], R * task // ntasks,
                             R * (task + 1) // ntasks)


def _serial(n):
    return n < _SERIAL_ELEMENTS or numba.get_num_threads() == 1


# --------------------------------------------------------------------------------------
# Public API: float32/float64 (R, N) arrays
# --------------------------------------------------------------------------------------


def bias_relu(x, bias):
    """``relu(x + bias)`` for ``x`` ``(R, N)`` and ``bias`` ``(N,)`` (float32 or float64, one
    dtype): a new ``(R, N)`` array."""
    x, bias = _rows(x, bias, "bias_relu")
    y = np.empty_like(x)
    if _serial(x.size):
        _bias_relu_rows(x, bias, y, 0, x.shape[0])
    else:
        _bias_relu_parallel(x, bias, y, _row_tasks(x))
    return y


def bias_relu_grad(y, gy, want_bias=True):
    """``(dx, dbias)`` of `bias_relu` from its output ``y`` ``(R, N)`` and the output
    gradient ``gy``: ``dx = gy * (y > 0)`` ``(R, N)`` and ``dbias = dx.sum(axis=0)``
    ``(N,)``, both of ``y``'s dtype (``dbias`` None unless ``want_bias``; it is summed in
    float64)."""
    return grad_by_rows("bias_relu_grad", "y", y, gy, want_bias, _serial,
                        _bias_relu_grad_serial, _bias_relu_grad_parallel)
