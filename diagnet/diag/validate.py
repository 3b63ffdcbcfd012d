"""Argument checks for the diagonal format, on plain NumPy/CuPy arrays and Python values.

`diagnet.sparse.DiagMatrix`, the diagonal op `diagnet.ops.diagonal` and the layers built on
them all validate through these functions, so every entry point reports a bad argument in
the same words: which argument, what was expected, what was received. Nothing here knows
about the autograd engine: callers unwrap Tensors first. The number and dtype checks shared
by every package (`FLOAT_DTYPES`, `float_dtype`, `is_integer`) live in `diagnet.checks`;
this module adds the checks of the diagonal format itself.

Offsets are checked when a structure is created or changed, not on every product: on the
GPU the check is a device reduction plus one host synchronisation.
"""

from __future__ import annotations

import numbers

import numpy as np

from .. import backend
from ..checks import FLOAT_DTYPES, is_integer, is_real
from . import layout


def as_array(a, name, xp=None):
    """``a`` as a backend array; sequences and scalars become arrays of ``xp`` (default NumPy).

    Containers of an array (a diagnet ``Tensor``) are not unwrapped here: the caller decides
    whether it accepts them (see `backend.unwrap`).
    """
    if backend.is_array(a):
        return a
    if not isinstance(a, (list, tuple, numbers.Number, np.generic)):
        raise TypeError(f"{name} must be an array (NumPy or CuPy) or a sequence of numbers; "
                        f"got {type(a).__name__}")
    try:
        arr = np.asarray(a)
    except Exception as exc:  # ragged lists and the like
        raise TypeError(f"{name} must be an array (NumPy or CuPy) or a sequence of numbers; "
                        f"got {type(a).__name__} ({exc})") from exc
    if arr.dtype == object:
        raise TypeError(f"{name} must be an array of numbers; got {type(a).__name__} that "
                        "converts to an object array")
    if xp is not None and xp is not np:
        arr = xp.asarray(arr)
    return arr


def check_int(v, name, what="an int"):
    """``v`` as a Python int; `TypeError` naming ``name`` unless it is an integer (not a bool)."""
    if not is_integer(v):
        raise TypeError(f"{name} must be {what}; got {type(v).__name__} {v!r}")
    return int(v)


def check_positive_int(v, name):
    """``v`` as a Python int; `TypeError`/`ValueError` naming ``name`` unless an int > 0."""
    v = check_int(v, name, "a positive int")
    if v <= 0:
        raise ValueError(f"{name} must be a positive int; got {v!r}")
    return v


def validate_shape(shape, name="shape"):
    """Check a matrix shape and return it as a tuple ``(m, n)`` of Python ints.

    Raises `TypeError` unless ``shape`` is a tuple or list of two integers (``bool`` is
    not an integer here) and `ValueError` unless both are positive.
    """
    if not isinstance(shape, (tuple, list)):
        raise TypeError(f"{name} must be a tuple (m, n) of two positive ints; "
                        f"got {type(shape).__name__} {shape!r}")
    if len(shape) != 2:
        raise ValueError(f"{name} must be a tuple (m, n) of two positive ints; "
                         f"got {len(shape)} entries: {tuple(shape)!r}")
    m, n = (check_int(s, f"{name}[{i}]") for i, s in enumerate(shape))
    if m <= 0 or n <= 0:
        raise ValueError(f"{name} must be two positive ints; got ({m}, {n})")
    return m, n


def validate_offsets(offsets, shape, name="offsets", xp=None):
    """Check the diagonal offsets of a matrix of ``shape`` and return them as int64.

    Args:
        offsets: array-like ``(K,)`` of integers (a NumPy/CuPy array or a sequence),
            sorted in strictly increasing order, each in
            ``[0, P)`` with ``P = max(shape)``. ``K = 0`` is allowed (an all-zero matrix).
        shape: ``(m, n)``, already validated.
        name: the argument name used in error messages.
        xp: the array module non-arrays are converted to (default NumPy).

    Returns:
        A C-contiguous int64 array on the device ``offsets`` was on (no copy when it was
        already contiguous int64).

    Raises:
        TypeError: not an array or sequence of integers (floats and bools are rejected,
            even when they hold whole numbers; a scalar is not a sequence). An empty
            sequence holds no dtype and is read as int64.
        ValueError: not 1-D, unsorted, repeated, or out of range; the message names the
            first offending element.
    """
    m, n = shape
    P = max(m, n)
    # A sequence is checked on the host and only then moved to ``xp``'s device: checking it
    # there would cost a GPU synchronisation for data that was on the host all along.
    arr = _offsets_array(offsets, name)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must have an integer dtype (int32/int64); got dtype "
                        f"{arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D with shape (K,); got shape {tuple(arr.shape)}")
    if arr.size:
        # One combined device reduction, so a CuPy array costs a single synchronisation;
        # the details for the message are worked out on the host only when it fails.
        mod = backend.get_array_module(arr)
        ok = (arr.min() >= 0) & (arr.max() < P)
        if arr.size > 1:
            ok = ok & mod.all(arr[1:] > arr[:-1])
        if not bool(ok):
            _raise_offsets_error(backend.to_numpy(arr), shape, name)
    arr = arr.astype(np.int64, copy=False)
    if xp is not None and xp is not np and isinstance(arr, np.ndarray):
        return xp.asarray(arr)
    return backend.get_array_module(arr).ascontiguousarray(arr)


def _offsets_array(offsets, name):
    """``offsets`` as an array, refusing what NumPy would silently turn into integers."""
    if isinstance(offsets, (numbers.Number, np.generic)):
        raise TypeError(f"{name} must be a 1-D array or sequence of ints (K,); got "
                        f"{type(offsets).__name__} {offsets!r}")
    if isinstance(offsets, (list, tuple)):
        if not offsets:
            return np.zeros(0, dtype=np.int64)
        # np.asarray([0, True]) is [0, 1]: a bool among ints would pass as a diagonal
        for i, v in enumerate(offsets):
            if isinstance(v, (bool, np.bool_)):
                raise TypeError(f"{name} must hold ints, not bools; got {name}[{i}] = {v!r}")
    return as_array(offsets, name)


def _raise_offsets_error(host, shape, name):
    P = max(shape)
    bad = np.flatnonzero((host < 0) | (host >= P))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{name} must lie in [0, P) = [0, {P}) for shape {tuple(shape)} "
                         f"(P = max(m, n)); got {name}[{i}] = {int(host[i])}")
    i = int(np.flatnonzero(host[1:] <= host[:-1])[0]) + 1
    if host[i] == host[i - 1]:
        raise ValueError(f"{name} must be unique; got the value {int(host[i])} twice "
                         f"(at indices {i - 1} and {i})")
    raise ValueError(f"{name} must be sorted in increasing order; got {name}[{i - 1}] = "
                     f"{int(host[i - 1])} before {name}[{i}] = {int(host[i])}")


def validate_values(values, shape, num_offsets, name="values", xp=None):
    """Check the diagonal values of a matrix of ``shape`` holding ``num_offsets`` diagonals.

    Args:
        values: array-like ``(K, L)`` with ``K = num_offsets`` and ``L = min(shape)``,
            float32 or float64 (lists become float64 arrays).
        shape: ``(m, n)``, already validated.
        num_offsets: ``K``.
        name: the argument name used in error messages.
        xp: the array module non-arrays are converted to (default NumPy).

    Returns:
        The backend array itself (no copy, no cast).

    Raises:
        TypeError: dtype other than float32/float64.
        ValueError: wrong shape.
    """
    m, n = shape
    arr = as_array(values, name, xp)
    if arr.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64; got dtype {arr.dtype}")
    expected = (int(num_offsets), min(m, n))
    if tuple(arr.shape) != expected:
        raise ValueError(f"{name} must have shape (K, L) = {expected} (K = number of offsets, "
                         f"L = min(m, n) for shape {tuple(shape)}); got shape "
                         f"{tuple(arr.shape)}")
    return arr


def check_same_device(**arrays):
    """Raise `ValueError` naming the arguments when the arrays are not on one device.

    ``None`` entries are skipped. Returns the common device name (``"cpu"`` when empty).
    """
    devices = {k: backend.device_of(a) for k, a in arrays.items() if a is not None}
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"arguments must be on the same device; got {where} "
                         "(move them with .to(device))")
    return next(iter(devices.values()), "cpu")


def resolve_num_diagonals(shape, sparsity=None, k=None):
    """How many diagonals ``K`` to keep in a matrix of ``shape``.

    Give at most one of ``sparsity`` (a float in ``[0, 1]``; ``K = max(1, ceil((1 - s) P))``)
    and ``k`` (an int in ``[1, P]``). With neither, all ``P`` diagonals are kept.
    """
    P = layout.num_diagonals(shape)
    if sparsity is not None and k is not None:
        raise ValueError(f"give either sparsity or k, not both; got sparsity={sparsity!r}, "
                         f"k={k!r}")
    if k is not None:
        k = check_int(k, "k")
        if not 1 <= k <= P:
            raise ValueError(f"k must be in [1, P] = [1, {P}] for shape {tuple(shape)}; "
                             f"got {int(k)}")
        return int(k)
    if sparsity is not None:
        return layout.diagonals_for_sparsity(shape, check_sparsity(sparsity))
    return P


def check_sparsity(sparsity, name="sparsity", allow_one=True):
    """``sparsity`` as a Python float in ``[0, 1]`` (``[0, 1)`` with ``allow_one=False``).

    Raises `TypeError` unless a real number (``None``, ``bool`` and strings are not), and
    `ValueError` when NaN or out of the interval; the message names ``name``, the interval
    and the value received.
    """
    interval = "[0, 1]" if allow_one else "[0, 1)"
    if not is_real(sparsity):
        raise TypeError(f"{name} must be a number in {interval}; got "
                        f"{type(sparsity).__name__} {sparsity!r}")
    s = float(sparsity)
    if not (0.0 <= s <= 1.0 if allow_one else 0.0 <= s < 1.0):  # NaN fails both
        raise ValueError(f"{name} must be in {interval}; got {sparsity!r}")
    return s

