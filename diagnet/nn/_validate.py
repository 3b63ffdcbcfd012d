"""Argument checks shared by the layers (and the models built on them)."""

from __future__ import annotations

import numbers

import numpy as np

__all__ = ["positive_int", "probability"]


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
