"""The log schema of the sparsity controllers: the events they emit and the fields they carry.

A controller's `after_step` and `start_epoch` return events made by `event`, plain JSON-able
dicts that the trainer writes to its log as they are. The names below are the one place
that spells them: the controllers (``dynadiag_controller``, ``prune_grow``) write them and
`diagnet.plots` reads them, so a renamed field cannot leave the plots behind.

Every event has ``EVENT`` (its kind) and ``STEP`` (the optimizer step it followed); an event
about one layer has ``LAYER`` (its dotted name). The structure events:

* ``SWAP`` (DynaDiag, sparse mode): ``DROPPED`` and ``GROWN``, the diagonal offsets that left
  and entered the layer's stored set;
* ``MASK_UPDATE`` (SET/RigL): ``DROPPED`` and ``GROWN``, offsets on diagonal layers, counts
  on `MaskedLinear` layers;
* ``FREEZE`` (DynaDiag): ``KEPT``, the offsets the layer stores from then on.

Replaying them from the structure before training gives the stored set at any step. That
start is ``STRUCTURE``, a controller's description of its diagonal layers
(`SparsityController.structure`), which the trainer writes into the ``run_start`` record
under ``controller``: ``{layer: {OFFSETS: [stored offsets], DIAGONALS: P}}``.
"""

from __future__ import annotations

__all__ = ["event", "EVENT", "STEP", "LAYER", "SWAP", "MASK_UPDATE", "FREEZE", "DROPPED",
           "GROWN", "KEPT", "STRUCTURE", "OFFSETS", "DIAGONALS"]

EVENT, STEP, LAYER = "event", "step", "layer"
SWAP, MASK_UPDATE, FREEZE = "swap", "mask_update", "freeze"
DROPPED, GROWN, KEPT = "dropped", "grown", "kept"
STRUCTURE, OFFSETS, DIAGONALS = "structure", "offsets", "diagonals"


def event(kind: str, step: int, **fields) -> dict:
    """A log event: ``{"event": kind, "step": step, **fields}`` with JSON-able values.

    NumPy scalars and arrays in ``fields`` are turned into Python numbers and lists.
    """
    out = {EVENT: str(kind), STEP: int(step)}
    for key, value in fields.items():
        out[key] = _plain(value)
    return out


def _plain(value):
    if hasattr(value, "tolist"):          # NumPy / CuPy arrays and scalars
        if hasattr(value, "get"):
            value = value.get()
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value
