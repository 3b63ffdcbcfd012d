"""Random numbers: the default generator, seeding, and device-side uniform draws.

One home for randomness, so that initialisers, dropout, dynamic sparse training and data
loaders all follow `manual_seed`:

* `manual_seed(seed)` reseeds the default generator (a ``numpy.random.Generator``);
  `get_state` / `set_state` save and restore it (JSON-able, for checkpoints), and
  `check_state` validates a state without touching the generator; `forked_state` derives
  independent states from one (a stream per micro-batch, the same in every process).
  `check_generator_state` does the same checks for any NumPy bit generator (the saved
  generators of DST controllers).
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

import numpy as np

from . import checks

_default = np.random.default_rng(0)

# splitmix64 constants (Steele, Lea & Flood, "Fast splittable pseudorandom number generators")
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def manual_seed(seed: int) -> None:
    """Reseed the default generator (used wherever ``rng`` is not given)."""
    global _default
    if not checks.is_integer(seed):
        raise TypeError(f"seed must be an int; got {type(seed).__name__} {seed!r}")
    _default = np.random.default_rng(int(seed))


def default_generator() -> np.random.Generator:
    """The process-wide default generator."""
    return _default


def get_state() -> dict:
    """The default generator's state (a JSON-able dict of its bit generator)."""
    return _default.bit_generator.state


def _state_int(value, where, bits):
    """``value`` as an int if it is one (not a bool) in ``[0, 2**bits)``, else ValueError."""
    if not checks.is_integer(value) or not 0 <= value < 2 ** bits:
        raise ValueError(f"{where} must be an int in [0, 2**{bits}); got "
                         f"{type(value).__name__} {value!r:.60}")
    return int(value)


def _state_keys(value, where, keys):
    """Check that ``value`` is a dict with exactly ``keys``."""
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a dict; got {type(value).__name__}")
    if set(value) != set(keys):
        raise ValueError(f"{where} must have the keys {sorted(keys)}; got "
                         f"{sorted(map(str, value))}"[:300])


def check_state(state: dict) -> dict:
    """Validate a state for the default generator and return a normalised copy; change nothing.

    The state is what `get_state` returns, the state of a PCG64 bit generator::

        {"bit_generator": "PCG64", "state": {"state": <int>, "inc": <odd int>},
         "has_uint32": 0 or 1, "uinteger": <int>}

    with ``state`` and ``inc`` in ``[0, 2**128)`` and ``uinteger`` in ``[0, 2**32)``. NumPy
    itself raises OverflowError or KeyError on such garbage, or silently truncates a float.

    Raises:
        TypeError: ``state`` is not a dict.
        ValueError: a key is missing or extra, or a field has the wrong type or range; the
            message names the field, as in ``state['state']['inc']``.
    """
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict (as get_state returns); got "
                        f"{type(state).__name__} {state!r:.60}")
    _state_keys(state, "state", ("bit_generator", "state", "has_uint32", "uinteger"))
    kind, name = type(_default.bit_generator).__name__, state["bit_generator"]
    if not isinstance(name, str) or name != kind:
        raise ValueError(f"state is for a {name!s:.40} bit generator; expected {kind}")
    inner = state["state"]
    _state_keys(inner, "state['state']", ("state", "inc"))
    inc = _state_int(inner["inc"], "state['state']['inc']", 128)
    if inc % 2 == 0:
        raise ValueError(f"state['state']['inc'] must be odd (a PCG64 increment); got {inc}")
    flag = state["has_uint32"]
    if not checks.is_integer(flag) or flag not in (0, 1):
        raise ValueError(f"state['has_uint32'] must be 0 or 1; got {type(flag).__name__} "
                         f"{flag!r:.60}")
    return {"bit_generator": kind,
            "state": {"state": _state_int(inner["state"], "state['state']['state']", 128),
                      "inc": inc},
            "has_uint32": int(flag),
            "uinteger": _state_int(state["uinteger"], "state['uinteger']", 32)}


def set_state(state: dict) -> None:
    """Restore a state returned by `get_state`, after `check_state` (which raises TypeError
    or ValueError, leaving the generator unchanged)."""
    _default.bit_generator.state = check_state(state)


def forked_state(state: dict, key: int) -> dict:
    """A state for the default generator derived from ``state`` (as `get_state` returns it)
    and ``key`` (an int >= 0): a fresh PCG64 seeded with all of ``state``'s fields and
    ``key``. Forking one state with keys 0, 1, 2, ... gives independent streams, and every
    process that forks the same state with the same key gets the same stream (the
    `Trainer`'s micro-batches draw their dropout so). Raises as `check_state`; TypeError /
    ValueError for a ``key`` that is not an int >= 0."""
    state = check_state(state)
    key = checks.integer("key", key, 0)
    words = [state["state"]["state"], state["state"]["inc"], state["has_uint32"],
             state["uinteger"], key]
    return np.random.PCG64(np.random.SeedSequence(words)).state


#: fields that NumPy stores without a range check although only some values are usable:
#: ``(kind, or None for every kind that has the field; field path; low; high)``. MT19937 and
#: Philox index their key and buffer with ``pos`` and ``buffer_pos`` (a larger one reads past
#: the end); ``has_uint32`` is a flag.
_FIELD_RANGES = ((None, ("has_uint32",), 0, 1),
                 ("MT19937", ("state", "pos"), 0, 624),
                 ("Philox", ("buffer_pos",), 0, 4))
#: the bit generators whose ``inc`` is the odd increment of a PCG
_PCG_KINDS = ("PCG64", "PCG64DXSM")


def check_generator_state(state, kind, where: str = "state") -> dict:
    """Validate the saved state of a ``kind`` bit generator and return the state NumPy holds
    once it is loaded; change nothing.

    ``kind`` is a ``numpy.random.BitGenerator`` class (PCG64, PCG64DXSM, MT19937, Philox,
    SFC64, ...) and ``state`` what ``kind(...).state`` gave: ``{"bit_generator": <kind name>,
    ...}`` with int and integer-array fields. NumPy's own setter truncates a float, ignores
    an extra key, wraps a negative array entry, and takes an even PCG increment or an MT19937
    position past its key. Here the state must have exactly the fields of a ``kind`` state,
    each an int (not a float or bool) or an integer array of the right shape; a fresh ``kind``
    loaded with it must hold it unchanged; and ``inc`` (PCG64, PCG64DXSM) must be odd,
    ``pos`` (MT19937) in ``[0, 624]``, ``buffer_pos`` (Philox) in ``[0, 4]`` and
    ``has_uint32`` 0 or 1.

    Args:
        state: the saved state.
        kind: the bit generator class it must be for.
        where: how messages name the state, e.g. ``"controller state 'rng'"``.

    Returns:
        the state as NumPy holds it (assign it to the generator's ``bit_generator.state``).

    Raises:
        ValueError: ``state`` is not a ``kind`` state; the message names the first bad
            field, as in ``state['state']['inc']``.
    """
    name = kind.__name__
    if not isinstance(state, dict) or state.get("bit_generator") != name:
        raise ValueError(f"{where} must be the state of a {name} bit generator; got "
                         f"{state!r:.80}")
    probe = kind()
    try:
        _check_fields(state, probe.state, "state", same_values=False)
        _check_kind_rules(name, state)
        probe.state = state
        _check_fields(state, probe.state, "state", same_values=True)
    except (TypeError, ValueError, KeyError, OverflowError, IndexError) as exc:  # NumPy's too
        raise ValueError(f"{where} is not a valid {name} state: {exc}") from None
    return probe.state


def _check_fields(given, model, field, same_values) -> None:
    """ValueError unless ``given`` has the structure of the state ``model`` (the same keys;
    ints where it has ints; integer arrays of its shapes where it has arrays) and, with
    ``same_values``, its values. ``field`` names ``given`` in messages."""
    if isinstance(model, dict):
        if not isinstance(given, dict):
            raise ValueError(f"{field} must be a dict; got {type(given).__name__}")
        for key in given:
            if key not in model:
                raise ValueError(f"{field} has the unknown field {key!r:.40}")
        for key in model:
            if key not in given:
                raise ValueError(f"{field} lacks the field {key!r}")
            _check_fields(given[key], model[key], f"{field}[{key!r}]", same_values)
    elif isinstance(model, np.ndarray):
        values = np.asarray(given)
        if values.dtype.kind not in "iu":
            raise ValueError(f"{field} must be integers; got {type(given).__name__} of "
                             f"{values.dtype}")
        if values.shape != model.shape:
            raise ValueError(f"{field} must have shape {model.shape}; got {values.shape}")
        if same_values and not np.array_equal(values, model):
            raise ValueError(f"{field} = {given!s:.60} does not survive loading: NumPy would "
                             f"hold {model!s:.60}")
    elif isinstance(model, str):
        if given != model:
            raise ValueError(f"{field} must be {model!r}; got {given!r:.40}")
    else:
        if not checks.is_integer(given):
            raise ValueError(f"{field} must be an int; got {type(given).__name__} "
                             f"{given!r:.40}")
        if same_values and given != model:
            raise ValueError(f"{field} = {given} does not survive loading: NumPy would hold "
                             f"{model}")


def _check_kind_rules(name, state) -> None:
    """ValueError if a field of the ``name`` state ``state`` (of the right structure) holds a
    value NumPy would store but cannot use."""
    if name in _PCG_KINDS and state["state"]["inc"] % 2 == 0:
        raise ValueError(f"state['state']['inc'] must be odd (a PCG increment); got "
                         f"{state['state']['inc']}")
    for kind, path, low, high in _FIELD_RANGES:
        value = _field_at(state, path)
        if kind in (None, name) and value is not None and not low <= value <= high:
            field = "state" + "".join(f"[{key!r}]" for key in path)
            raise ValueError(f"{field} must be in [{low}, {high}]; got {value}")


def _field_at(state, path):
    """The field at ``path`` (a tuple of keys) of the nested dict ``state``, or None."""
    for key in path:
        if not isinstance(state, dict) or key not in state:
            return None
        state = state[key]
    return state


_RNG_EXPECTED = "rng must be None, a non-negative int seed or a numpy Generator"


def as_generator(rng=None) -> np.random.Generator:
    """``None`` -> the default generator, an int seed >= 0 -> a new seeded one, a Generator
    -> itself. `TypeError` for any other type (``bool`` included), `ValueError` for a
    negative seed."""
    if rng is None:
        return _default
    if isinstance(rng, np.random.Generator):
        return rng
    if not checks.is_integer(rng):
        raise TypeError(f"{_RNG_EXPECTED}; got {type(rng).__name__} {rng!r}")
    if rng < 0:  # NumPy's own message, "expected non-negative integer", names nothing
        raise ValueError(f"{_RNG_EXPECTED}; got {rng!r}")
    return np.random.default_rng(int(rng))


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
