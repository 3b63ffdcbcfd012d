"""Regularisation ops: dropout.

The mask is drawn with `diagnet.random.uniform` on the tensor's own device, so a GPU tensor
gets its mask without a host-to-device copy, and a seed gives the same mask on every
device.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from .. import random as _random
from ..autograd import FLOAT_DTYPES, Tensor
from . import basic

__all__ = ["dropout"]


def dropout(x, p=0.5, training=True, rng=None):
    """Zero each element with probability ``p`` and scale the rest by ``1 / (1 - p)``.

    Identity (``x`` itself) when ``training`` is false or ``p == 0``. The mask is
    ``uniform >= p`` for float32 uniforms from ``diagnet.random.uniform(x.shape, xp,
    float32, rng)``, drawn on ``x``'s device; ``rng`` is ``None`` (the default generator of
    `diagnet.random`, reseeded by ``diagnet.manual_seed``), an int seed, or a
    ``numpy.random.Generator`` (advanced by one draw per call). The same ``rng`` state gives
    the same mask on every device and for both float dtypes.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1); got {p}")
    if not training or p == 0.0:
        return x
    xp = backend.get_array_module(x.data if isinstance(x, Tensor) else x)
    dtype = x.dtype if x.dtype in FLOAT_DTYPES else np.dtype(np.float32)
    scale = dropout_scale(tuple(x.shape), p, xp, dtype, rng)
    return basic.mul(x, Tensor.from_array(scale))


def dropout_scale(shape, p, xp, dtype, rng=None):
    """The multiplier of `dropout`: an array of ``shape`` and ``dtype`` on ``xp``'s device,
    0 where an element is dropped and ``1 / (1 - p)`` where it is kept.

    Also used by `scaled_dot_product_attention` for its weights, so that both draw the same
    mask from the same ``rng`` state.
    """
    gen = _random.as_generator(rng)
    # compare in float32 on every backend, so that CPU and GPU masks agree bit for bit
    keep = _random.uniform(shape, xp, np.float32, gen) >= np.float32(p)
    return keep.astype(dtype) / (1.0 - p)
