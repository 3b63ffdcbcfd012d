"""`DynaDiag`: the controller that trains the structure of `DynaDiagLinear` layers.

The layer (`diagnet.dst.dynadiag`) holds DynaDiag's soft top-k and the two structure
changes, `DynaDiagLinear.swap` and `DynaDiagLinear.freeze`; this controller decides *when*
they happen, from the training loop's hooks (`SparsityController`): it sets the temperature
from a `TemperatureSchedule`, arms a `GradientTap` before each swap step and hands its
scores to every layer's swap, and freezes every layer at the chosen epoch or step. Its own
generator (`controller_generator`) draws the swaps' tie-breaking noise, and its state (the
counters, the generator) travels with checkpoints.
"""

from __future__ import annotations

import math

import numpy as np

from ..checks import int_at_least, number_in
from ..diag import validate
from ..nn.module import Module
from .base import SparsityController, checked_generator_state, controller_generator
from .capture import GradientTap
from .dynadiag import DynaDiagLinear, check_temperature, dynadiag_layers
from .events import FREEZE, SWAP, event
from .temperature import TemperatureSchedule

__all__ = ["DynaDiag"]

_RNG_WHERE = "DynaDiag state 'rng'"  # how messages name the saved generator


class DynaDiag(SparsityController):
    """The DynaDiag training schedule: temperature, swaps (sparse mode) and the freeze.

    Args:
        layers: mapping name -> `DynaDiagLinear`, or a `Module` (its DynaDiagLinear layers).
        schedule: a `TemperatureSchedule`; its ``per`` says whether ``T`` is set at the
            start of each epoch or before each step. None: the controller leaves ``T`` alone.
        swap_every: swap every this many optimizer steps (after steps ``swap_every - 1``,
            ``2 * swap_every - 1``, ...); None (default) for no swaps. Sparse mode only.
        swap_until: no swaps from this step on (default None: until the freeze).
        swap_fraction: the share of a layer's pool considered per swap, in ``(0, 1]``
            (default 0.5): ``n = max(1, ceil(swap_fraction * (S - K)))`` (see
            `DynaDiagLinear.swap`, which also exchanges only where the newcomer's gradient
            score beats the leaver's).
        freeze_at: freeze every layer before epoch ``freeze_at`` starts (``freeze_per=
            "epoch"``, in `start_epoch`) or before step ``freeze_at`` runs (``"step"``, in
            `after_step` of step ``freeze_at - 1``); None (default): never. The reference
            freezes at epoch 30 of 100.
        freeze_per: ``"epoch"`` (default) or ``"step"``.
        rng: the controller's own generator for the swaps' tie-breaking noise: an int seed,
            a Generator, or None (seeded from `diagnet.random`'s default generator). Its
            state is in `state_dict`.

    Events (`event` dicts, their names in ``events``): ``{"event": "swap", "step", "layer",
    "dropped", "grown", "k", "stored", "sparsity", "effective_k", "itop", "temperature"}`` per
    layer at every swap step (empty lists when nothing beat the pool), and ``{"event":
    "freeze", "step", "layer", "kept", "k", "stored", "sparsity", "temperature"}`` (plus
    ``"epoch"`` at an epoch).
    """

    def __init__(self, layers, schedule=None, swap_every=None, swap_until=None,
                 swap_fraction=0.5, freeze_at=None, freeze_per="epoch", rng=None):
        if isinstance(layers, Module):
            layers = dynadiag_layers(layers)
        super().__init__(layers)
        for name, layer in self.layers.items():
            if not isinstance(layer, DynaDiagLinear):
                raise TypeError(f"layer {name!r} is a {type(layer).__name__}; DynaDiag manages "
                                "DynaDiagLinear layers")
        if schedule is not None and not isinstance(schedule, TemperatureSchedule):
            raise TypeError(f"schedule must be a TemperatureSchedule or None; got "
                            f"{type(schedule).__name__}")
        self.schedule = schedule
        self.swap_every = int_at_least("swap_every", swap_every, 1, optional=True)
        self.swap_until = int_at_least("swap_until", swap_until, 0, optional=True)
        self.swap_fraction = number_in("swap_fraction", swap_fraction, 0, 1, include_low=False)
        if freeze_per not in ("epoch", "step"):
            raise ValueError(f"freeze_per must be 'epoch' or 'step'; got {freeze_per!r}")
        self.freeze_per = freeze_per
        self.freeze_at = int_at_least("freeze_at", freeze_at, 1 if freeze_per == "step" else 0,
                                      optional=True)
        reference = [n for n, l in self.layers.items() if l.mode != "sparse"]
        if self.swap_every is not None and reference:
            raise ValueError(f"swap_every needs sparse-mode layers; {reference} are in "
                             "reference mode (they store every diagonal already)")
        self.rng = controller_generator(rng)
        self.tap = GradientTap(self.layers)
        self.temperature = None  # the last T this controller set
        self.epoch = None        # the last epoch started
        self.next_step = 0       # steps completed
        self.swaps = 0           # swap steps done

    def config(self) -> dict:
        """The controller's settings, JSON-able (for run logs)."""
        return {"algorithm": "dynadiag",
                "schedule": None if self.schedule is None else self.schedule.config(),
                "swap_every": self.swap_every, "swap_until": self.swap_until,
                "swap_fraction": self.swap_fraction, "freeze_at": self.freeze_at,
                "freeze_per": self.freeze_per,
                "layers": {name: {"mode": l.mode, "active_k": l.active_k, "stored": l.n_stored,
                                  "P": l.P, "pool": l.pool}
                           for name, l in self.layers.items()}}

    def taps(self) -> list:
        """``[tap]``: the gradient tap whose scores drive the swaps."""
        return [self.tap]

    # ------------------------------------------------------------------ the hooks
    def _set_temperature(self, T):
        self.temperature = float(T)
        for layer in self.layers.values():
            layer.T = self.temperature

    def _swaps_at(self, step) -> bool:
        return (self.swap_every is not None and (step + 1) % self.swap_every == 0
                and (self.swap_until is None or step < self.swap_until)
                and any(not layer.frozen for layer in self.layers.values()))

    def start_epoch(self, epoch: int) -> list:
        """Set ``T`` (per-epoch schedules), then freeze if ``epoch >= freeze_at`` (per epoch)."""
        epoch = validate.check_int(epoch, "epoch")
        self.epoch = epoch
        if self.schedule is not None and self.schedule.per == "epoch":
            self._set_temperature(self.schedule(epoch))
        if self.freeze_per == "epoch" and self.freeze_at is not None and epoch >= self.freeze_at:
            return self._freeze(self.next_step, epoch=epoch)
        return []

    def before_step(self, step: int) -> None:
        """Set ``T`` (per-step schedules); arm the gradient tap if ``step`` swaps."""
        step = validate.check_int(step, "step")
        if self.schedule is not None and self.schedule.per == "step":
            self._set_temperature(self.schedule(step))
        if self._swaps_at(step):
            self.tap.arm()

    def after_step(self, step: int) -> list:
        """Swap (at swap steps, from the tap's scores), then freeze (per step)."""
        step = validate.check_int(step, "step")
        events = []
        if self._swaps_at(step):
            n_done = 0
            for name, layer in self.layers.items():
                if layer.frozen or not self.tap.ready(name):
                    continue  # not called in this step's forward: nothing to score it by
                n = max(1, math.ceil(round(self.swap_fraction * (layer.K - layer.active_k), 9)))
                dropped, grown = layer.swap(self.tap.diagonal_scores(name), n, rng=self.rng)
                n_done += 1
                events.append(event(SWAP, step, layer=name, dropped=dropped, grown=grown,
                                    k=layer.active_k, stored=layer.K, sparsity=layer.sparsity,
                                    effective_k=layer.effective_k(), itop=layer.itop(),
                                    temperature=layer.T))
            self.swaps += 1 if n_done else 0
        self.tap.disarm()
        self.tap.clear()
        self.next_step = step + 1
        if self.freeze_per == "step" and self.freeze_at is not None and step + 1 >= self.freeze_at:
            events += self._freeze(step)
        return events

    def _freeze(self, step, **extra) -> list:
        events = []
        for name, layer in self.layers.items():
            kept = layer.freeze()
            if kept is not None:
                events.append(event(FREEZE, step, layer=name, kept=kept, k=layer.active_k,
                                    stored=layer.K, sparsity=layer.sparsity,
                                    temperature=layer.T, **extra))
        return events

    # ------------------------------------------------------------------ reporting
    def metrics(self) -> dict:
        """``sparsity`` (realised, all layers), ``temperature``, ``effective_k`` (summed over
        layers), ``effective_sparsity`` (of the function: ``1 - sum effective_k * L / sum
        m n``) and ``itop`` (diagonals ever stored / all diagonals). Reads the device."""
        eff = [layer.effective_k() for layer in self.layers.values()]
        ever = sum(int(layer.ever_active.data.sum()) for layer in self.layers.values())
        total_p = sum(layer.P for layer in self.layers.values())
        dense = sum(layer.out_features * layer.in_features for layer in self.layers.values())
        eff_nnz = sum(k * layer.L for k, layer in zip(eff, self.layers.values()))
        T = self.temperature
        if T is None:
            T = next(iter(self.layers.values())).T
        return {"sparsity": self.sparsity(), "temperature": T, "effective_k": sum(eff),
                "effective_sparsity": 1.0 - eff_nnz / dense, "itop": ever / total_p}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """JSON-able: temperature, counters, the layers' frozen flags, the generator state."""
        return {"temperature": self.temperature, "epoch": self.epoch,
                "next_step": self.next_step, "swaps": self.swaps,
                "layers": list(self.layers),
                "frozen": [layer.frozen for layer in self.layers.values()],
                "rng": self.rng.bit_generator.state}

    def check_state_dict(self, state: dict) -> None:
        """ValueError if ``state`` does not fit this controller; changes nothing."""
        if not isinstance(state, dict):
            raise ValueError(f"DynaDiag state must be a dict; got {type(state).__name__}")
        keys = {"temperature", "epoch", "next_step", "swaps", "layers", "frozen", "rng"}
        if set(state) != keys:
            raise ValueError(f"DynaDiag state must have the keys {sorted(keys)}; got "
                             f"{sorted(map(str, state))}")
        if list(state["layers"]) != list(self.layers):
            raise ValueError(f"DynaDiag state is for layers {list(state['layers'])}; this "
                             f"controller manages {list(self.layers)}")
        if state["temperature"] is not None:
            check_temperature(state["temperature"])
        int_at_least("epoch", state["epoch"], 0, optional=True)
        int_at_least("next_step", state["next_step"], 0, optional=True)
        int_at_least("swaps", state["swaps"], 0, optional=True)
        frozen = state["frozen"]
        if not isinstance(frozen, (list, tuple)) or len(frozen) != len(self.layers) \
                or not all(isinstance(f, (bool, np.bool_)) for f in frozen):
            raise ValueError(f"DynaDiag state 'frozen' must be {len(self.layers)} bools; got "
                             f"{frozen!r:.80}")
        checked_generator_state(self.rng, state["rng"], _RNG_WHERE)

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict` (the layers' own state comes with the model's)."""
        self.check_state_dict(state)
        self.temperature = None if state["temperature"] is None else float(state["temperature"])
        if self.temperature is not None:
            for layer in self.layers.values():
                layer.T = self.temperature
        self.epoch = None if state["epoch"] is None else int(state["epoch"])
        self.next_step, self.swaps = int(state["next_step"]), int(state["swaps"])
        self.rng.bit_generator.state = checked_generator_state(self.rng, state["rng"],
                                                               _RNG_WHERE)
        self.tap.disarm()
        self.tap.clear()
