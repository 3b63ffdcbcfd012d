"""Argument checks shared by the optimizers and the schedulers, with one message format.

Each check names the argument and the value it got (``invalid lr=-0.1: must be >= 0``) and
returns the value as a plain Python ``float``/``int``/``bool``, so that hyperparameters never
hold NumPy scalars (which would upcast float32 arrays and are not JSON-able).
"""

from __future__ import annotations

import math
import numbers

import numpy as np


def _fail(name, value, where, requirement):
    return ValueError(f"invalid {name}={value!r}{where}: {requirement}")


def real(name, value, where="") -> float:
    """``value`` as a finite Python float (TypeError for non-numbers and bools)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
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
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}{where} must be an int; got {type(value).__name__} {value!r}")
    if value < minimum:
        raise _fail(name, value, where, f"must be >= {minimum}")
    return int(value)


def flag(name, value, where="") -> bool:
    """``value`` as a Python bool (Python or NumPy bool only: ``1`` is not a flag)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}{where} must be a bool; got {type(value).__name__} {value!r}")
    return bool(value)
