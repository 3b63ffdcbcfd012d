"""Argument checks for the public boundary, shared by every package.

It sits at the bottom of the layers (it imports only NumPy), so that the optimizers, the
layers, the gradient clipping and the models all check their arguments with the same
functions. Each check returns the value as a plain Python ``float``/``int``/``bool``, so that
hyperparameters never hold NumPy scalars (which would upcast float32 arrays and are not
JSON-able). Bools are never numbers here.

Two message forms are in use, both naming the argument, the expected and the received: the
hyperparameter checks (`real`, `non_negative`, `positive`, `unit_interval`, `integer`, `flag`)
say ``invalid lr=-0.1: must be >= 0`` and raise a TypeError for a value of the wrong type;
the size and range checks (`positive_int`, `int_at_least`, `number_in`, `probability`) say
``dim must be a positive int; got 0`` and always raise a ValueError. The predicates
`is_integer` and `is_real` serve the callers that word their own message (a corrupted state
dict, a kernel plan). `FLOAT_DTYPES` is defined here, the lowest layer that checks it.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

__all__ = ["FLOAT_DTYPES", "real", "non_negative", "positive", "unit_interval", "integer",
           "flag", "positive_int", "int_at_least", "number_in", "probability", "float_dtype",
           "is_int", "is_integer", "is_real"]

#: the float dtypes a Tensor, a diagonal weight and every kernel may hold
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _fail(name, value, where, requirement):
    return ValueError(f"invalid {name}={value!r}{where}: {requirement}")


def real(name, value, where="") -> float:
    """``value`` as a finite Python float (TypeError for non-numbers and bools)."""
    if not is_real(value):
        raise TypeError(f"{name}{where} must be a real number; got {type(value).__name__} "
                        f"{value!r}")
    result = float(value)
    if not math.isfinite(result):
        raise _fail(name, value, where, "must be finite")
    return result


def non_negative(name, value, where="") -> float:
    """``value`` as a finite Python float ``>= 0``."""
    result = real(name, value, where)
    if result < 0:
        raise _fail(name, value, where, "must be >= 0")
    return result


def positive(name, value, where="") -> float:
    """``value`` as a finite Python float ``> 0``."""
    result = real(name, value, where)
    if result <= 0:
        raise _fail(name, value, where, "must be > 0")
    return result


def unit_interval(name, value, where="", *, include_one) -> float:
    """``value`` as a Python float in ``[0, 1]`` (``include_one``) or ``[0, 1)``."""
    result = real(name, value, where)
    if result < 0 or result > 1 or (result == 1 and not include_one):
        raise _fail(name, value, where, "must be in [0, 1]" if include_one else
                    "must be in [0, 1)")
    return result


def integer(name, value, minimum, where="") -> int:
    """``value`` as a Python int ``>= minimum`` (TypeError for floats and bools)."""
    if not is_integer(value):
        raise TypeError(f"{name}{where} must be an int; got {type(value).__name__} {value!r}")
    if value < minimum:
        raise _fail(name, value, where, f"must be >= {minimum}")
    return int(value)


def flag(name, value, where="") -> bool:
    """``value`` as a Python bool (Python or NumPy bool only: ``1`` is not a flag)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}{where} must be a bool; got {type(value).__name__} {value!r}")
    return bool(value)


def positive_int(name, value) -> int:
    """``value`` as an int, or a ValueError naming ``name`` when it is not a positive int."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return int(value)


def int_at_least(name, value, minimum, *, optional=False):
    """``value`` as a Python int ``>= minimum``, else a ValueError naming ``name`` (also for
    floats and bools). With ``optional``, ``None`` is accepted and returned as it is."""
    if optional and value is None:
        return None
    if not is_integer(value) or value < minimum:
        expected = f"None or an int >= {minimum}" if optional else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {expected}; got {value!r}")
    return int(value)


def number_in(name, value, low, high, *, include_low=True, include_high=True) -> float:
    """``value`` as a Python float in the interval from ``low`` to ``high`` (each end
    included or not), else a ValueError naming ``name`` and the interval. NaN is in no
    interval; an infinite ``high`` makes the check "finite and above ``low``"."""
    try:
        v = float(value) if is_real(value) else math.nan
    except OverflowError:  # an int too large for a float lies in no interval checked here
        v = math.nan
    if (low <= v if include_low else low < v) and (v <= high if include_high else v < high) \
            and math.isfinite(v):
        return v
    interval = f"{'[' if include_low else '('}{low:g}, {high:g}{']' if include_high else ')'}"
    raise ValueError(f"{name} must be a number in {interval}; got {value!r}")


def probability(name, value) -> float:
    """``value`` as a float in ``[0, 1)`` (a dropout probability), else a ValueError."""
    return number_in(name, value, 0, 1, include_high=False)


def float_dtype(dtype, name="dtype"):
    """``dtype`` as a NumPy dtype; `TypeError` naming ``name`` unless float32 or float64."""
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"{name} must be float32 or float64; got {dtype!r}") from exc
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64; got {dt}")
    return dt


def is_int(value) -> bool:
    """Whether ``value`` is a Python int and not a bool (an integer read from JSON)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_integer(value) -> bool:
    """Whether ``value`` is an integer, Python or NumPy, and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """Whether ``value`` is a real number, Python or NumPy, and not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
