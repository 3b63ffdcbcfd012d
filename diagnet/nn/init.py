"""Parameter initialisers, drawn on the host from `diagnet.random` and placed on a device.

Drawing on the host (one NumPy generator) makes an initialisation identical on every device
for the same seed; it is a one-off cost at construction, not on the training path.
"""

from __future__ import annotations

import math

import numpy as np

from .. import backend
from .. import random as _random

__all__ = ["uniform_array", "zeros_array", "linear_bound", "fill_uniform_"]


def uniform_array(shape, bound, dtype=np.float32, device="cpu", rng=None):
    """An array of ``shape`` drawn from U(-bound, bound) on ``device``.

    Args:
        shape: tuple of ints.
        bound: half-width of the interval (>= 0).
        dtype: float32 or float64 (drawn in float64, then cast).
        device: ``"cpu"`` or ``"cuda"``.
        rng: None (the default generator), an int seed or a ``numpy.random.Generator``.
    """
    gen = _random.as_generator(rng)
    host = gen.uniform(-bound, bound, size=shape).astype(dtype)
    return backend.to_device(host, backend.resolve_device(device))


def zeros_array(shape, dtype=np.float32, device="cpu"):
    """A zero array of ``shape`` and ``dtype`` on ``device``."""
    xp = backend.xp_for(backend.resolve_device(device))
    return xp.zeros(shape, dtype=dtype)


def linear_bound(fan_in: float) -> float:
    """``1 / sqrt(fan_in)``: PyTorch's default bound for ``nn.Linear`` weights and biases.

    (``kaiming_uniform_(a=sqrt(5))`` reduces to this bound; the variance is ``1 / (3 fan_in)``.)
    """
    return 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0


def fill_uniform_(param, bound, rng=None):
    """Overwrite ``param``'s data with U(-bound, bound) draws (same shape, dtype, device)."""
    param.data = uniform_array(param.shape, bound, param.dtype, param.device, rng)
    return param
