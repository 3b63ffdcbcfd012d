"""Argument checks for the public boundary, shared by every package.

It sits at the bottom of the layers (it imports only NumPy), so that the optimizers, the
layers, the gradient clipping and the models all check their arguments with the same
functions. Each check returns the value as a plain Python ``float``/``int``/``bool``, so that
hyperparameters never hold NumPy scalars (which would upcast float32 arrays and are not
JSON-able). Bools are never numbers here.

Two message forms are in use: the number checks name the argument and the value it got
(``invalid lr=-0.1: must be >= 0``; a TypeError for a value of the wrong type), and the
layer-size checks `positive_int` and `probability` say what the argument must be
(``dim must be a positive int; got 0``; always a ValueError).
"""

from __future__ import annotations

import math
import numbers

import numpy as np

__all__ = ["real", "non_negative", "positive", "unit_interval", "integer", "flag",
           "positive_int", "probability", "is_int"]


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


def positive_int(name, value) -> int:
    """``value`` as an int, or a ValueError naming ``name`` when it is not a positive int."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return int(value)


def probability(name, value) -> float:
    """``value`` as a float in ``[0, 1)`` (a dropout probability), else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1); got {value!r}")
    return float(value)


def is_int(value) -> bool:
    """Whether ``value`` is a Python int and not a bool (an integer read from JSON)."""
    return isinstance(value, int) and not isinstance(value, bool)
