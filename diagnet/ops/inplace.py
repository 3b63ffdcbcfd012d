"""In-place ops: ``+=``, ``-=``, ``*=``, ``/=``, ``add_``, ``sub_``, ``mul_``, ``div_``,
``fill_``, ``zero_``, ``copy_`` and ``t[index] = value``.

They write into the tensor's own array and are not recorded for backward, so they follow
PyTorch's rules for when that is safe:

* A tensor that requires grad changes only under ``no_grad`` (a parameter update, an
  initialisation). Outside it, a leaf's gradient would stop matching its value, and a
  tensor computed by a recorded op is part of a graph that may need its value.
* While gradients are recorded, an operand that requires grad cannot flow into a tensor in
  place (the op could not be recorded); ``t = t + w`` can.
* The tensor keeps its shape and dtype. The right side broadcasts onto the left, never the
  other way. Arithmetic may cast its result within a kind (float64 into a float32 tensor),
  not across kinds (``int_tensor += 0.5`` raises). ``fill_``, ``copy_`` and assignment
  convert like `diagnet.tensor` does: floats into integers truncate, values that do not fit
  an integer dtype raise.

Every op checks all of this before it writes, then bumps the tensor's `VersionCounter`: a
node whose backward needs the old value then raises instead of computing a wrong gradient.
The checks look at shapes, dtypes and flags only (no scan of the data), except the range
check of a conversion into an integer dtype.
"""

from __future__ import annotations

import numbers

import numpy as np

from .. import backend
from ..autograd import Tensor, check_integer_range
from ..config import is_grad_enabled
from .shape import device_index

__all__ = ["add_", "sub_", "mul_", "div_", "fill_", "copy_", "setitem"]


# ----------------------------------------------------------------------------- checks

def _check_target(t, op):
    """Refuse to change ``t`` in place where that would corrupt autograd or cannot work."""
    if t.requires_grad and is_grad_enabled():
        what = ("a leaf tensor that requires grad" if t.creator is None
                else f"a tensor computed by {type(t.creator).__name__} (part of a graph)")
        raise RuntimeError(f"{op}: cannot change {what} in place while gradients are recorded; "
                           "do it inside `with diagnet.no_grad():` (as a parameter update "
                           "does), or use an out-of-place op such as t = t + x")
    if isinstance(t.data, np.ndarray) and not t.data.flags.writeable:
        raise ValueError(f"{op}: the tensor's data is read-only (a broadcast view, or an "
                         "imported read-only array); clone() it first")


def _is_scalar(value) -> bool:
    return isinstance(value, (numbers.Number, np.generic))


def _operand(t, value, op, any_device=False):
    """``value`` as something NumPy/CuPy can combine with ``t.data``: a Python or NumPy
    scalar as it is (so that NumPy's rules for scalars apply), anything else as an array on
    ``t``'s device (moved there only when ``any_device``). Refuses a value that requires
    grad while gradients are recorded."""
    if isinstance(value, Tensor):
        if value.requires_grad and is_grad_enabled():
            raise RuntimeError(f"{op}: the value requires grad, and an in-place op is not "
                               "recorded for backward; use an out-of-place op such as "
                               "t = t + x, or do it inside `with diagnet.no_grad():`")
        value = value.data
    if _is_scalar(value):
        return value
    if not backend.is_array(value):
        arr = np.asarray(value)
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"{op}: the value must be a number, a sequence of numbers, an "
                            f"array or a Tensor; got {type(value).__name__} {value!r:.40}")
        value, any_device = arr, True  # host data built here goes wherever the tensor is
    if backend.device_of(value) != t.device:
        if not any_device:
            raise ValueError(f"{op}: the value is on {backend.device_of(value)} but the "
                             f"tensor is on {t.device}; move it with .to(device) first")
        value = backend.to_device(value, t.device)
    return value


def _check_broadcast(t, value, op):
    shape = tuple(np.shape(value))
    try:
        fits = np.broadcast_shapes(t.shape, shape) == t.shape
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"{op}: a value of shape {shape} does not broadcast onto the tensor's "
                         f"shape {t.shape} (an in-place op keeps the tensor's shape)")


def _converted(t, value, op):
    """``value`` (a scalar, or an array on ``t``'s device) converted to ``t``'s dtype as
    `diagnet.tensor` converts: floats into integers truncate, values that do not fit raise."""
    if t.dtype.kind in "iu":
        arr = value if backend.is_array(value) else np.asarray(value)
        if arr.dtype != t.dtype:
            check_integer_range(arr, t.dtype, op)
    if _is_scalar(value):
        return t.dtype.type(value)  # a NumPy scalar: CuPy takes it on any device
    return value.astype(t.dtype, copy=False)


def _writable_data(t):
    """``t.data`` as an array that can be written to: a NumPy scalar (what NumPy returns
    from a full reduction) becomes a 0-d array; no other tensor views a scalar."""
    if isinstance(t.data, np.generic):
        t.data = np.array(t.data)
    return t.data


# ----------------------------------------------------------------------------- arithmetic

def _arithmetic(t, value, ufunc, op, alpha=1):
    """``t.data = ufunc(t.data, alpha * value)`` in place, after every check."""
    _check_target(t, op)
    if isinstance(alpha, (bool, np.bool_)) or not isinstance(alpha, numbers.Number):
        raise TypeError(f"{op}: alpha must be a number; got {type(alpha).__name__} {alpha!r:.40}")
    value = _operand(t, value, op)
    _check_broadcast(t, value, op)
    if alpha != 1:
        value = value * alpha
    result = np.result_type(t.dtype, value.dtype if backend.is_array(value) else value)
    if ufunc == "true_divide" and result.kind in "biu":
        result = np.dtype(np.float64)  # true division of integers gives floats
    if not np.can_cast(result, t.dtype, casting="same_kind"):
        raise TypeError(f"{op}: the result has dtype {result}, which cannot be stored in the "
                        f"{t.dtype} tensor in place (an in-place op keeps the tensor's dtype); "
                        "use an out-of-place op, or astype() first")
    data = _writable_data(t)
    getattr(backend.get_array_module(data), ufunc)(data, value, out=data)
    t._version_counter().bump()
    return t


def add_(t, other, alpha=1):
    """``t += alpha * other`` in place (``other`` broadcasts onto ``t``); returns ``t``."""
    return _arithmetic(t, other, "add", "add_", alpha)


def sub_(t, other, alpha=1):
    """``t -= alpha * other`` in place; returns ``t``."""
    return _arithmetic(t, other, "subtract", "sub_", alpha)


def mul_(t, other):
    """``t *= other`` in place; returns ``t``."""
    return _arithmetic(t, other, "multiply", "mul_")


def div_(t, other):
    """``t /= other`` in place (true division, so an integer tensor refuses it); returns ``t``."""
    return _arithmetic(t, other, "true_divide", "div_")


# ----------------------------------------------------------------------------- assignment

def fill_(t, value):
    """Set every element of ``t`` to the number ``value`` (a Python/NumPy number or a
    one-element Tensor), converted to ``t``'s dtype; ``t.zero_()`` is ``fill_(t, 0)``.
    Returns ``t``."""
    _check_target(t, "fill_")
    if isinstance(value, Tensor) and value.size == 1:
        value = _operand(t, value, "fill_", any_device=True).reshape(()).item()
    if not _is_scalar(value):
        raise TypeError(f"fill_: value must be a number or a one-element Tensor; got "
                        f"{type(value).__name__} {value!r:.40}")
    value = _converted(t, value, "fill_")
    _writable_data(t)[...] = value
    t._version_counter().bump()
    return t


def copy_(t, src):
    """Copy ``src`` (a Tensor, array or nested sequence, from any device) into ``t``, which
    keeps its dtype and device; ``src`` broadcasts onto ``t``'s shape. Returns ``t``."""
    _check_target(t, "copy_")
    value = _operand(t, src, "copy_", any_device=True)
    _check_broadcast(t, value, "copy_")
    value = _converted(t, value, "copy_")
    _writable_data(t)[...] = value
    t._version_counter().bump()
    return t


def setitem(t, index, value):
    """``t[index] = value`` in place, with the indexing of `diagnet.functional.getitem`;
    ``value`` is converted to ``t``'s dtype and broadcasts onto ``t[index]``."""
    _check_target(t, "setitem")
    value = _converted(t, _operand(t, value, "setitem", any_device=True), "setitem")
    index = device_index(t, index)
    data = _writable_data(t)
    try:  # NumPy and CuPy check the shapes before they write anything
        data[index] = value
    except ValueError as exc:
        raise ValueError(f"setitem: cannot assign a value of shape {tuple(np.shape(value))} "
                         f"to the selected part of a tensor of shape {t.shape}: {exc}") from None
    t._version_counter().bump()
