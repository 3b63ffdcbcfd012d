"""Random numbers: the default generator, seeding, and device-side uniform draws.

One home for randomness, so that initialisers, dropout, dynamic sparse training and data
loaders all follow `manual_seed`:

* `manual_seed(seed)` reseeds the default generator (a ``numpy.random.Generator``);
  `get_state` / `set_state` save and restore it (JSON-able, for checkpoints).
* `as_generator(rng)` turns the ``rng`` argument that random functions accept (``None`` for
  the default generator, an int seed, or a Generator) into a Generator.
* `uniform(shape, xp, ...)` draws uniform numbers *on the array's device* without moving
  data between host and GPU: the host generator gives one 64-bit key, and the numbers are
  ``splitmix64(key + i * golden_gamma)`` for ``i = 0..N-1``, computed with array operations
  of ``xp`` (NumPy or CuPy). So the same seed gives the same numbers on every device, and a
  GPU draw costs no host copy or synchronisation.

The default generator is process-wide, as in PyTorch: threads that draw from it share it.
Give a thread its own stream with an explicit ``rng``.
"""

from __future__ import annotations

import numbers

import numpy as np

_default = np.random.default_rng(0)

# splitmix64 constants (Steele, Lea & Flood, "Fast splittable pseudorandom number generators")
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def manual_seed(seed: int) -> None:
    """Reseed the default generator (used wherever ``rng`` is not given)."""
    global _default
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int; got {type(seed).__name__} {seed!r}")
    _default = np.random.default_rng(int(seed))


def default_generator() -> np.random.Generator:
    """The process-wide default generator."""
    return _default


def get_state() -> dict:
    """The default generator's state (a JSON-able dict of its bit generator)."""
    return _default.bit_generator.state


def set_state(state: dict) -> None:
    """Restore a state returned by `get_state`."""
    bitgen = type(_default.bit_generator)()
    bitgen.state = state
    _default.bit_generator.state = bitgen.state


def as_generator(rng=None) -> np.random.Generator:
    """``None`` -> the default generator, an int -> a new seeded one, a Generator -> itself."""
    if rng is None:
        return _default
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, numbers.Integral) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be None, an int seed or a numpy.random.Generator; got "
                    f"{type(rng).__name__} {rng!r}")


def _splitmix64(xp, key: int, n: int):
    """``n`` pseudo-random uint64 words from ``key``, computed with ``xp`` (wrapping arithmetic)."""
    z = xp.arange(n, dtype=np.uint64) * _GAMMA + np.uint64(key)
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def uniform(shape, xp=np, dtype=np.float32, rng=None):
    """Uniform numbers in ``[0, 1)`` of ``shape`` and ``dtype``, drawn on ``xp``'s device.

    Float32 numbers take the top 24 bits of each word, float64 the top 53, so every value
    is an exact multiple of ``2**-24`` (``2**-53``) below 1. The host generator advances by
    one draw per call, whatever the size.
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"uniform: dtype must be float32 or float64; got {dtype}")
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape, dtype=np.int64))
    key = int(as_generator(rng).integers(0, 2**64, dtype=np.uint64))
    words = _splitmix64(xp, key, n)
    bits = 24 if dtype == np.float32 else 53
    out = (words >> np.uint64(64 - bits)).astype(dtype) * dtype.type(2.0 ** -bits)
    return out.reshape(shape)
