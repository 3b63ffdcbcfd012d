"""Shape and axis rules shared by the engine and the ops: which gradient shapes reduce to an
input's shape (broadcasting undone), how they are summed back, and the ``axis=``/``dim=``
argument pair.
"""

from __future__ import annotations

import math

import numpy as np

#: from this many rows on, `sum_rows` sums a NumPy float array with one BLAS matrix-vector
#: product: below it the product's call costs more than NumPy's row-by-row sum
SUM_ROWS_GEMV_MIN = 32
_GEMV_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def reduces_to(grad_shape, shape) -> bool:
    """Whether a gradient of ``grad_shape`` is a broadcast of ``shape``: it may have extra
    leading axes, and axes where ``shape`` has size 1 may be longer; every other axis agrees."""
    lead = len(grad_shape) - len(shape)
    return lead >= 0 and all(s == 1 or g == s for g, s in zip(grad_shape[lead:], shape))


def sum_to(grad, shape):
    """Sum ``grad`` over broadcast dimensions so that it has ``shape``.

    ``grad.shape`` must broadcast-reduce to ``shape`` (see `reduces_to`); anything else is a
    `ValueError`, never a reshape that would scramble the gradient. Written with the
    array's own methods, so it works for NumPy and CuPy arrays alike.
    """
    shape = tuple(shape)
    if grad.shape == shape:
        return grad
    if not reduces_to(grad.shape, shape):
        raise ValueError(f"sum_to: a gradient of shape {grad.shape} cannot be summed to shape "
                         f"{shape} (only extra leading axes and size-1 axes are summed)")
    lead = grad.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        i + lead for i, s in enumerate(shape) if s == 1 and grad.shape[i + lead] != 1
    )
    if axes == tuple(range(len(axes))):  # leading axes only (a bias, a position embedding)
        k = len(axes)
        table = grad.reshape(math.prod(grad.shape[:k]), math.prod(grad.shape[k:]))
        return sum_rows(table).reshape(shape)
    out = grad.sum(axis=axes, keepdims=True)
    return out.reshape(shape)  # drops the summed leading axes (all of size 1 now)


def sum_rows(a):
    """``a.sum(axis=0)`` of a 2-D array ``(R, N)``: an ``(N,)`` array of ``a``'s dtype.

    A C-contiguous float32/float64 NumPy array of at least `SUM_ROWS_GEMV_MIN` rows is summed
    as ``ones(R) @ a``, one BLAS matrix-vector product that reads ``a`` once at BLAS speed
    (NumPy adds the rows one by one: 2-4x slower for the gradient of a bias over a batch of
    tokens). The sums then come in BLAS's order, so they may differ from NumPy's in the last
    bits. Other arrays (CuPy, other dtypes, few rows) use ``a.sum(axis=0)``.
    """
    if (type(a) is np.ndarray and a.ndim == 2 and a.shape[0] >= SUM_ROWS_GEMV_MIN
            and a.dtype in _GEMV_DTYPES and a.flags.c_contiguous):
        return np.ones(a.shape[0], dtype=a.dtype) @ a
    return a.sum(axis=0)


def axis_or_dim(name, axis, dim, default=None):
    """The axis argument of op ``name``, given as ``axis=`` or as PyTorch's ``dim=``.

    ``default`` when neither is given; `TypeError` when both are.
    """
    if dim is None:
        return default if axis is None else axis
    if axis is not None:
        raise TypeError(f"{name}: got axis={axis!r} and dim={dim!r}; dim is another name for "
                        "axis, pass one of them")
    return dim
