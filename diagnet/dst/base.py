"""The protocol between a dynamic sparse training algorithm and the training loop.

Every algorithm (DynaDiag, diagonal SET/RigL, unstructured SET/RigL, a static mask) is a
`SparsityController` over named layers. The trainer, or a hand-written loop, calls it at
fixed points of each step::

    controller.start_epoch(epoch)        # per-epoch schedules (temperature), freeze at an epoch
    for batch in loader:
        controller.before_step(step)     # e.g. arm gradient taps if `step` updates masks
        loss = loss_fn(model(x), y); optimizer.zero_grad(); loss.backward(); optimizer.step()
        events = controller.after_step(step)   # mask updates, swaps, freeze at a step
        step += 1

``step`` counts optimizer steps from 0 over the whole run. `after_step` and `start_epoch`
return a list of events: plain JSON-able dicts that the trainer writes to its JSONL log,
built with `event` (their names and fields are in ``events``). `structure` gives the stored
diagonals of the layers, the start from which those events replay; `metrics` gives the
numbers a progress bar shows. The controller's
``state_dict`` (JSON-able values and backend arrays) goes into checkpoints, so that a
resumed run continues exactly.

The helpers below are what the controllers share beyond the protocol: their own seeded
generator (`controller_generator`), the check of a saved generator state
(`checked_generator_state`), and the set of units ever active (`ever_active`), from which
they report the in-time over-parameterisation rate ``itop`` (Liu et al. 2021): the
fraction of all units that have been active at some point of the run.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from .. import random as _random
from ..nn import DiagLinear
from .events import DIAGONALS, OFFSETS
from .fingerprint import structure_fingerprint

__all__ = ["SparsityController", "controller_generator", "checked_generator_state",
           "ever_active"]


def controller_generator(rng) -> np.random.Generator:
    """A controller's own generator: an int seeds a new one, a Generator is used as it is,
    and None draws a seed from diagnet's default generator (so `manual_seed` governs it
    while the controller's draws stay independent of everything else that uses the
    default)."""
    if rng is None:
        return np.random.default_rng(int(_random.default_generator().integers(2 ** 63)))
    return _random.as_generator(rng)


def checked_generator_state(rng, saved, where: str) -> dict:
    """``saved`` as the Generator ``rng`` will hold it once loaded; ValueError naming
    ``where`` if it is not a state of ``rng``'s bit generator (see
    `diagnet.random.check_generator_state`). Changes nothing."""
    return _random.check_generator_state(saved, type(rng.bit_generator), where)


def ever_active(size, active) -> np.ndarray:
    """The ever-active set at its start: a host boolean array ``(size,)``, True at the
    indices ``active`` (an int array or sequence)."""
    ever = np.zeros(size, dtype=bool)
    ever[active] = True
    return ever


class SparsityController:
    """Base class: the hooks of the training loop, all no-ops here.

    Args:
        layers: mapping of dotted name -> sparse layer the controller manages (ordered).
    """

    def __init__(self, layers):
        self.layers = dict(layers)
        if not self.layers:
            raise ValueError("a sparsity controller needs at least one layer")

    def start_epoch(self, epoch: int) -> list:
        """Called before the first step of ``epoch`` (0-based). Returns events."""
        return []

    def before_step(self, step: int) -> None:
        """Called before the forward pass of optimizer step ``step``."""

    def after_step(self, step: int) -> list:
        """Called after ``optimizer.step()`` of step ``step``. Returns events."""
        return []

    def metrics(self) -> dict:
        """Numbers for progress bars and epoch logs, e.g. ``{"sparsity": 0.9}``."""
        return {"sparsity": self.sparsity()}

    def sparsity(self) -> float:
        """Realised sparsity over the managed layers' weights: ``1 - sum nnz / sum m*n``."""
        nnz = dense = 0
        for layer in self.layers.values():
            stored, full = layer.weight_stats()
            nnz, dense = nnz + stored, dense + full
        return 1.0 - nnz / dense

    def structure(self) -> dict:
        """``{layer: {"offsets": [stored offsets], "diagonals": P}}`` of the diagonal layers
        (`nn.DiagLinear` and its subclasses; masked layers have no offsets to list): the
        start from which the structure events replay (see ``events``). Reads the device."""
        return {name: {OFFSETS: backend.to_numpy(layer.offsets.data).tolist(),
                       DIAGONALS: layer.P}
                for name, layer in self.layers.items() if isinstance(layer, DiagLinear)}

    def taps(self) -> list:
        """The controller's `GradientTap` objects (empty: this one has none). Data-parallel
        training sets a reducer on each, without knowing the controller's type."""
        return []

    def fingerprint(self) -> dict:
        """``{layer: SHA-256 hex digest}`` of each managed layer's structure
        (`structure_fingerprint`); equal across processes whose structures agree. Reads
        the device."""
        return structure_fingerprint(self.layers)

    def state_dict(self) -> dict:
        """The controller's own state (not the layers': those are in the model's state dict)."""
        return {}

    def check_state_dict(self, state: dict) -> None:
        """Raise ValueError if ``state`` cannot be loaded; change nothing."""

    def load_state_dict(self, state: dict) -> None:
        self.check_state_dict(state)
