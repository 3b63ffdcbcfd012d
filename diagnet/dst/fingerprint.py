"""`structure_fingerprint`: a short digest of each sparse layer's structure.

Under data-parallel training every process makes the same structural decisions (which
diagonals or weights are stored), so every process must hold the same structure. A digest
per layer makes that cheap to check: gather the digests of all processes and compare them,
instead of the offsets and masks themselves.

What is hashed is what a layer stores about *where* its weights are, never the weights:
its class, its shape and every integer or boolean buffer. For an `nn.DiagLinear` that is
``offsets``; for a `DynaDiagLinear` ``offsets`` (its stored set: the active budget plus the
candidate pool), ``is_frozen`` and ``ever_active`` (the diagonals ever stored); for a
`MaskedLinear` its ``mask``. Parameters and float buffers (values, ``alpha``, the
temperature) are values: they are averaged across processes, not decided.

Arrays are read back to the host and hashed in a fixed dtype (int64 integers, bool
booleans), so the digest does not depend on the device or on the weights' dtype.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import numpy as np

from .. import backend
from ..nn.linear import DiagLinear
from ..nn.module import Module
from .masked import MaskedLinear

__all__ = ["structure_fingerprint"]

_KINDS = (DiagLinear, MaskedLinear)  # and their subclasses, such as DynaDiagLinear


def _layer_structure(layer) -> tuple[dict, dict]:
    """``(fields, arrays)``: the layer's class and shape as JSON-able ``fields``, and its
    integer and boolean buffers as host ``arrays`` (int64 and bool)."""
    fields = {"kind": type(layer).__name__, "shape": [layer.out_features, layer.in_features]}
    arrays = {}
    for name, buf in layer.named_buffers():
        kind = buf.dtype.kind
        if kind in "iu":
            arrays[name] = backend.to_numpy(buf.data).astype(np.int64)
        elif kind == "b":
            arrays[name] = backend.to_numpy(buf.data)
    return fields, arrays


def _digest(fields, arrays) -> str:
    h = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        # the name, dtype and shape go first, so that no two layouts hash the same bytes
        h.update(f"\n{name} {a.dtype.str} {a.shape}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def structure_fingerprint(layers) -> dict:
    """``{name: SHA-256 hex digest}`` of the structure of each sparse layer.

    Args:
        layers: a mapping name -> layer (`nn.DiagLinear` and its subclasses such as
            `DynaDiagLinear`, or `MaskedLinear`), e.g. a controller's ``layers``; or a
            `Module`, whose sparse layers are taken under their dotted names.

    Returns:
        A dict in the order of ``layers``; each value a 64-character hex string. Two layers
        get the same digest exactly when their structures (module doc) agree, whatever
        their weights, dtype or device. Reads every array of the structure back to the host
        (a debug check, not a per-step one).

    Raises:
        TypeError: ``layers`` is neither a mapping nor a Module, or one of its layers has
            no sparse structure (checked before anything is read).
    """
    if isinstance(layers, Module):
        layers = {name: m for name, m in layers.named_modules() if isinstance(m, _KINDS)}
    elif not isinstance(layers, Mapping):
        raise TypeError(f"structure_fingerprint: layers must be a mapping name -> layer or a "
                        f"Module; got {type(layers).__name__}")
    for name, layer in layers.items():
        if not isinstance(layer, _KINDS):
            raise TypeError(f"structure_fingerprint: layer {name!r} is a "
                            f"{type(layer).__name__}; expected a DiagLinear, DynaDiagLinear "
                            "or MaskedLinear")
    return {name: _digest(*_layer_structure(layer)) for name, layer in layers.items()}
