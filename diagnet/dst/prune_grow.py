"""Prune and regrow: SET and RigL on diagonals (`DiagPruneGrow`) and on entries
(`UnstructuredPruneGrow`).

Both keep each layer's budget of active *units* constant (diagonals of an `nn.DiagLinear`,
entries of a `MaskedLinear`) and, at fixed steps, swap a shrinking fraction of them.

Schedule. ``step`` counts optimizer steps from 0 (the trainer's step); the annealing clock is
``s = step + 1``, the number of optimizer steps taken when `after_step` runs. The masks change
in `after_step(step)` exactly when::

    s % delta_t == 0  and  s < t_end          (s = step + 1)

that is after steps ``delta_t - 1, 2 delta_t - 1, ...`` while ``s < t_end``, never later. The
update at clock ``s`` swaps the fraction (`drop_fraction`, the cosine decay of RigL)::

    f(s) = f0 / 2 * (1 + cos(pi * s / t_end))          (0 for s >= t_end)

of each layer's ``k`` active units: ``n = min(floor(f k + 1/2), P - k)`` (`update_size`;
``P`` units in all, ``P - k`` inactive).

One update of one layer, after the optimizer step (as in sparse_learning's ``Masking.step``):

1. drop the ``n`` active units of smallest magnitude: mean ``|value|`` over a diagonal,
   ``|w|`` of an entry (`drop_lowest`);
2. grow ``n`` units that were inactive *before* the drop, so that the dropped and grown sets
   are disjoint: uniformly at random (SET, Mocanu et al. 2018; `grow_random`) or those with
   the largest gradient score (RigL, Evci et al. 2020; `grow_top`): the all-diagonal score
   ``G[p] = ||(dy.T @ x) on diagonal p||`` or the dense ``|dy.T @ x|``, captured by a
   `GradientTap` armed in `before_step` of update steps only;
3. grown units start at zero, with zero optimizer state in every optimizer holding the
   parameter (`DiagLinear.set_offsets` / `MaskedLinear.set_mask` do both).

The three strategies live in `diagnet.dst.select`, beside DynaDiag's rules. Ties are broken
by seeded noise: among units tied at the cut-off score, those with the smallest random key
are taken, which is the lexicographic order of (score, key), as if a noise smaller than any
gap between scores had been added (RigL adds a tiny noise to the scores; sparse_learning
breaks ties by position). The keys come from the controller's own generator
(`controller_generator`) through `diagnet.random.uniform`, drawn on the layer's device, so a
seed gives the same masks on the CPU and the GPU. No seed ever comes from ``hash()``.

GPU: `before_step` and `after_step` of ordinary steps touch no device value. An update
step reads back what it must (the offsets, the chosen indices, the new active counts).

The in-time over-parameterisation rate ``itop`` (Liu et al. 2021) is the fraction of all
units that have been active at some point of the run; the controllers track the ever-active
sets and report it in `metrics`. `state_dict` holds the generator state and those sets, so
that a run resumed from a checkpoint (model + optimizer + controller) continues bit for bit.
"""

from __future__ import annotations

import math
import operator

import numpy as np

from .. import backend
from ..checks import is_integer, number_in, positive_int
from ..nn.linear import DiagLinear
from .base import SparsityController, checked_generator_state, controller_generator, ever_active
from .capture import GradientTap
from .events import MASK_UPDATE, event
from .masked import MaskedLinear
from .select import drop_lowest, grow_random, grow_top

__all__ = ["METHODS", "drop_fraction", "update_size", "DiagPruneGrow", "UnstructuredPruneGrow"]

_RNG_WHERE = "controller state 'rng'"  # how messages name the saved generator

#: the values of the ``method=`` argument
METHODS = ("set", "rigl")


# ----------------------------------------------------------------------------- schedule

def drop_fraction(step, f0, t_end) -> float:
    """The cosine-annealed update fraction ``f0 / 2 * (1 + cos(pi * step / t_end))``.

    ``f0`` at ``step = 0``, ``f0 / 2`` at ``t_end / 2``, and 0 at or beyond ``t_end``.
    A pure function of the step (the controllers pass the clock ``s = step + 1``).
    """
    if step >= t_end:
        return 0.0
    return f0 / 2.0 * (1.0 + math.cos(math.pi * step / t_end))


def update_size(fraction, active, inactive) -> int:
    """Units to drop (and grow) in one update: ``min(floor(fraction * active + 1/2), inactive)``.

    Rounded half up; never more than there are inactive units to grow into.
    """
    return max(0, min(math.floor(fraction * active + 0.5), inactive))


# ----------------------------------------------------------------------------- controllers

class _PruneGrow(SparsityController):
    """The schedule, the gradient tap, the generator and the state dict shared by
    `DiagPruneGrow` and `UnstructuredPruneGrow`; subclasses update one layer."""

    #: the layer class the controller manages
    layer_type = None

    def __init__(self, layers, method="set", delta_t=100, t_end=None, f0=0.3, rng=None):
        super().__init__(layers)
        for name, layer in self.layers.items():
            if not isinstance(layer, self.layer_type):
                raise TypeError(f"{type(self).__name__} manages {self.layer_type.__name__} "
                                f"layers; layer {name!r} is a {type(layer).__name__}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}; got {method!r}")
        if t_end is None:
            raise ValueError("t_end is required: the step count at which mask updates stop")
        self.method = method
        self.delta_t = positive_int("delta_t", delta_t)
        self.t_end = positive_int("t_end", t_end)
        self.f0 = number_in("f0", f0, 0, 1)
        self.rng = controller_generator(rng)
        self.tap = GradientTap(self.layers) if method == "rigl" else None

    # -- the schedule
    def is_update_step(self, step) -> bool:
        """True when `after_step(step)` changes the masks: ``s = step + 1`` is a multiple of
        ``delta_t`` and below ``t_end``."""
        clock = operator.index(step) + 1
        return clock % self.delta_t == 0 and clock < self.t_end

    def update_steps(self) -> list:
        """Every step after which the masks change: ``[delta_t - 1, 2 delta_t - 1, ...]``."""
        return [clock - 1 for clock in range(self.delta_t, self.t_end, self.delta_t)]

    def fraction(self, step) -> float:
        """The update fraction used after ``step``: ``drop_fraction(step + 1, f0, t_end)``."""
        return drop_fraction(operator.index(step) + 1, self.f0, self.t_end)

    def taps(self) -> list:
        """``[tap]`` for RigL (its gradient scores), ``[]`` for SET (it draws at random)."""
        return [] if self.tap is None else [self.tap]

    # -- the training-loop hooks
    def before_step(self, step) -> None:
        """Arm the gradient tap (RigL) if ``step`` is an update step; otherwise nothing."""
        if self.tap is not None and self.is_update_step(step):
            self.tap.arm()

    def after_step(self, step) -> list:
        """Update every layer if ``step`` is an update step; return one event per layer."""
        if not self.is_update_step(step):
            return []
        try:
            if self.tap is not None:
                missing = [name for name in self.layers if not self.tap.ready(name)]
                if missing:
                    raise RuntimeError(
                        f"RigL needs the gradients of step {step}, but none were captured for "
                        f"{missing}: call before_step(step) before the forward pass, and run "
                        "the backward pass through these layers")
            fraction = self.fraction(step)
            return [self._update_layer(name, layer, fraction, step)
                    for name, layer in self.layers.items()]
        finally:
            if self.tap is not None:
                self.tap.disarm()
                self.tap.clear()

    def _update_layer(self, name, layer, fraction, step) -> dict:
        raise NotImplementedError

    # -- reporting
    def itop(self) -> float:
        """In-time over-parameterisation: units ever active / all units, over every layer."""
        ever = sum(self._ever_count(name) for name in self.layers)
        return ever / sum(self._units(layer) for layer in self.layers.values())

    def metrics(self) -> dict:
        return {"sparsity": self.sparsity(), "itop": self.itop()}

    # -- state
    def _config(self) -> dict:
        return {"kind": type(self).__name__, "method": self.method, "delta_t": self.delta_t,
                "t_end": self.t_end, "f0": self.f0}

    def state_dict(self) -> dict:
        """``{kind, method, delta_t, t_end, f0, rng, ever_active}``: the configuration (checked
        on load), the generator's state (a JSON-able dict) and the ever-active sets."""
        return {**self._config(), "rng": self.rng.bit_generator.state,
                "ever_active": {name: self._ever_state(name) for name in self.layers}}

    def check_state_dict(self, state) -> None:
        """Raise ValueError if ``state`` was not saved by a controller configured like this one
        (same kind, method, schedule and layers) or is malformed; change nothing."""
        if not isinstance(state, dict):
            raise ValueError(f"controller state must be a dict; got {type(state).__name__}")
        missing = sorted({*self._config(), "rng", "ever_active"} - set(state))
        if missing:
            raise ValueError(f"controller state is missing {missing}")
        for key, mine in self._config().items():
            if state[key] != mine:
                raise ValueError(f"controller state has {key}={state[key]!r}, but this "
                                 f"controller has {key}={mine!r}; a resumed run must use the "
                                 "same configuration")
        checked_generator_state(self.rng, state["rng"], _RNG_WHERE)
        ever = state["ever_active"]
        if not isinstance(ever, dict) or set(ever) != set(self.layers):
            got = sorted(map(str, ever)) if isinstance(ever, dict) else type(ever).__name__
            raise ValueError(f"controller state 'ever_active' must name the layers "
                             f"{list(self.layers)}; got {got}")
        for name, value in ever.items():
            self._check_ever(name, value)

    def load_state_dict(self, state) -> None:
        """Restore the generator and the ever-active sets (after `check_state_dict`)."""
        self.check_state_dict(state)
        self.rng.bit_generator.state = checked_generator_state(self.rng, state["rng"],
                                                               _RNG_WHERE)
        for name, value in state["ever_active"].items():
            self._load_ever(name, value)


class DiagPruneGrow(_PruneGrow):
    """Diagonal SET / RigL on `nn.DiagLinear` layers (see the module docstring).

    Args:
        layers: mapping dotted name -> `nn.DiagLinear` (ordered; the order of the events and
            of the random draws).
        method: ``"set"`` (grow at random) or ``"rigl"`` (grow by the all-diagonal gradient
            score ``G[p]``).
        delta_t: steps between mask updates (positive int).
        t_end: the step count at which updates stop (required, positive int): the last
            update is after the last step ``t`` with ``(t + 1) % delta_t == 0`` and
            ``t + 1 < t_end``.
        f0: the initial update fraction in ``[0, 1]``.
        rng: None (a seed drawn from diagnet's default generator), an int seed, or a
            ``numpy.random.Generator`` (used, and restored by `load_state_dict`, as is).

    Each layer keeps its ``K`` diagonals (its offsets stay sorted and unique); after an
    update ``n = update_size(f, K, P - K)`` of them are new, at zero, with zero optimizer
    moments (`DiagLinear.set_offsets`). Each update logs, per layer,
    ``event("mask_update", step, layer=, method=, dropped=[offsets], grown=[offsets], k=K,
    sparsity=, fraction=f, itop=)``. ``metrics()`` gives ``sparsity`` and ``itop`` (the
    fraction of all ``P`` diagonals, over every layer, that were ever active).
    """

    layer_type = DiagLinear

    def __init__(self, layers, method="set", delta_t=100, t_end=None, f0=0.3, rng=None):
        super().__init__(layers, method, delta_t, t_end, f0, rng)
        # ever-active diagonals as host booleans (P,): one read of the offsets, here
        self._ever = {name: ever_active(layer.P, backend.to_numpy(layer.offsets.data))
                      for name, layer in self.layers.items()}

    def _units(self, layer) -> int:
        return layer.P

    def _ever_count(self, name) -> int:
        return int(self._ever[name].sum())

    def _update_layer(self, name, layer, fraction, step) -> dict:
        xp = backend.get_array_module(layer.values.data)
        offsets = backend.to_numpy(layer.offsets.data)  # a host read: update steps only
        K, P = offsets.size, layer.P
        n = update_size(fraction, K, P - K)
        dropped = grown = np.zeros(0, dtype=np.int64)
        if n > 0:
            magnitude = xp.abs(layer.values.data).mean(axis=1)            # (K,)
            rows = backend.to_numpy(drop_lowest(magnitude, n, self.rng))
            candidates = xp.ones(P, dtype=bool)                             # inactive before
            candidates[layer.offsets.data] = False                          # the drop
            if self.method == "set":
                pick = grow_random(candidates, n, self.rng)
            else:
                pick = grow_top(self.tap.diagonal_scores(name), candidates, n, self.rng)
            grown = np.sort(backend.to_numpy(pick))
            dropped = np.sort(offsets[rows])
            layer.set_offsets(np.union1d(np.setdiff1d(offsets, dropped), grown), keep=True,
                              init="zeros")
            self._ever[name][grown] = True
        return event(MASK_UPDATE, step, layer=name, method=self.method, dropped=dropped,
                     grown=grown, k=layer.K, sparsity=layer.sparsity, fraction=fraction,
                     itop=self._ever_count(name) / P)

    def _ever_state(self, name):
        return np.flatnonzero(self._ever[name]).tolist()

    def _check_ever(self, name, value):
        P = self.layers[name].P
        ok = isinstance(value, (list, tuple)) and all(
            is_integer(v) and 0 <= v < P
            for v in value) and len(set(value)) == len(value)
        if not ok:
            raise ValueError(f"controller state 'ever_active' of layer {name!r} must be a list "
                             f"of distinct diagonal indices in [0, {P}); got {value!r:.80}")

    def _load_ever(self, name, value):
        self._ever[name] = ever_active(self.layers[name].P, np.asarray(value, dtype=np.int64))


class UnstructuredPruneGrow(_PruneGrow):
    """Element-wise SET / RigL on `MaskedLinear` layers: the unstructured baseline.

    Same arguments, schedule and tie-breaking as `DiagPruneGrow`, on single weights: drop
    the ``n`` active weights with the smallest ``|w|``, grow ``n`` weights inactive before
    the drop at random (SET) or by the largest ``|dy.T @ x|`` (RigL, `GradientTap.dense_grad`);
    ``n = update_size(f, k, m n - k)`` for ``k`` active weights, so the density stays
    constant. `MaskedLinear.set_mask` zeroes the changed weights and their optimizer state.
    Events carry counts, not indices: ``dropped=n, grown=n, k=k``. ``itop`` is the fraction
    of all weights ever active; the ever-active masks live on the layers' devices and are
    arrays in `state_dict`.
    """

    layer_type = MaskedLinear

    def __init__(self, layers, method="set", delta_t=100, t_end=None, f0=0.3, rng=None):
        super().__init__(layers, method, delta_t, t_end, f0, rng)
        self._ever = {name: layer.mask.data.copy() for name, layer in self.layers.items()}
        self._ever_counts = {name: layer.nnz for name, layer in self.layers.items()}

    def _units(self, layer) -> int:
        return layer.out_features * layer.in_features

    def _ever_count(self, name) -> int:
        return self._ever_counts[name]

    def _update_layer(self, name, layer, fraction, step) -> dict:
        xp = backend.get_array_module(layer.weight.data)
        mask = layer.mask.data
        size, active = mask.size, layer.nnz
        n = update_size(fraction, active, size - active)
        if n > 0:
            flat = mask.reshape(-1)
            drop = drop_lowest(xp.abs(layer.weight.data).reshape(-1), n, self.rng, among=flat)
            candidates = xp.logical_not(flat)                       # inactive before the drop
            if self.method == "set":
                grow = grow_random(candidates, n, self.rng)
            else:
                score = xp.abs(self.tap.dense_grad(name)).reshape(-1)
                grow = grow_top(score, candidates, n, self.rng)
            new = flat.copy()
            new[drop] = False
            new[grow] = True
            layer.set_mask(new.reshape(mask.shape))                 # counts the active entries
            self._ever[name] = xp.logical_or(self._ever[name], layer.mask.data)
            self._ever_counts[name] = int(self._ever[name].sum())   # a read: update steps only
        return event(MASK_UPDATE, step, layer=name, method=self.method, dropped=n, grown=n,
                     k=layer.nnz, sparsity=layer.sparsity, fraction=fraction,
                     itop=self._ever_counts[name] / size)

    def _ever_state(self, name):
        return self._ever[name].copy()

    def _check_ever(self, name, value):
        shape = (self.layers[name].out_features, self.layers[name].in_features)
        value = backend.unwrap(value)
        if not backend.is_array(value) or value.dtype.kind != "b" or tuple(value.shape) != shape:
            raise ValueError(f"controller state 'ever_active' of layer {name!r} must be a "
                             f"boolean array of shape {shape}; got {type(value).__name__} "
                             f"{getattr(value, 'dtype', '')} {getattr(value, 'shape', '')}")

    def _load_ever(self, name, value):
        device = self.layers[name].weight.device
        value = backend.unwrap(value)
        moved = backend.to_device(value, device)
        self._ever[name] = moved.copy() if moved is value else moved
        self._ever_counts[name] = int(self._ever[name].sum())
