"""Keeping ranks identical: the initial state, structural decisions, and a check.

Data-parallel training is only correct while every rank holds the same model. Three things
keep it so:

* `broadcast_state` at the start: every rank takes rank 0's model (values, offsets, masks,
  DynaDiag's alpha and pool), optimizer state and controller state (counters, generator), so
  models built with different seeds, or resized on one rank, start identical. Each object's
  state dict is split into its arrays and the rest (keys, shapes, dtypes, plain values): the
  rest travels as one pickled object, each array with ``comm.broadcast`` on its own device
  (NCCL for CuPy arrays: never through the host). The objects then load it with their own
  ``load_state_dict``, after the same checks a checkpoint load runs.
* `attach_controller` for dynamic sparse training: a grow or swap score is a norm over a
  diagonal of the dense ``dy.T @ x``, and a norm of a sum is not a sum of norms, so at a
  mask-update step the ranks sum the dense gradient itself (each weighted by its share of the
  batch) before any score is taken. With identical weights and identically seeded
  generators, every rank then makes the same structural decision.
* `check_structure`, a debug check: a hash of every layer's structure, compared across ranks.

With micro-batches (the `Trainer`'s exact mode) the taps keep one ``dy.T @ x`` per
micro-batch instead, and `sum_tap_parts` sums them in micro-batch order across the ranks
(`diagnet.distributed.gradients.ordered_sum`): the same scores for any number of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import backend, checks
from ..autograd import Tensor
from ..nn.module import Module
from .comm import agree, checked_comm
from .gradients import ordered_sum

__all__ = ["broadcast_state", "attach_controller", "check_structure", "sum_tap_parts"]


@dataclass(frozen=True)
class _ArraySpec:
    """What stands for an array in the structure sent ahead of the arrays: its number in
    the order of sending, shape, dtype (``dtype.str``) and device."""

    index: int
    shape: tuple
    dtype: str
    device: str


def _split(obj, arrays):
    """``obj`` (nested dicts, lists, tuples) with every array or Tensor replaced by an
    `_ArraySpec`; the arrays, C-contiguous, are appended to ``arrays``."""
    leaf = obj.data if isinstance(obj, Tensor) else obj
    if backend.is_array(leaf):
        array = leaf if leaf.flags.c_contiguous else leaf.copy()  # copy(): C order, 0-d kept
        arrays.append(array)
        return _ArraySpec(len(arrays) - 1, tuple(array.shape), array.dtype.str,
                          backend.device_of(array))
    if isinstance(obj, dict):
        return {key: _split(value, arrays) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_split(value, arrays) for value in obj)
    return obj


def _specs(skeleton):
    """Every `_ArraySpec` in ``skeleton`` (in no particular order)."""
    if isinstance(skeleton, _ArraySpec):
        yield skeleton
    elif isinstance(skeleton, dict):
        for value in skeleton.values():
            yield from _specs(value)
    elif isinstance(skeleton, (list, tuple)):
        for value in skeleton:
            yield from _specs(value)


def _join(skeleton, arrays):
    """The inverse of `_split`: each `_ArraySpec` replaced by its array."""
    if isinstance(skeleton, _ArraySpec):
        return arrays[skeleton.index]
    if isinstance(skeleton, dict):
        return {key: _join(value, arrays) for key, value in skeleton.items()}
    if isinstance(skeleton, (list, tuple)):
        return type(skeleton)(_join(value, arrays) for value in skeleton)
    return skeleton


def _check_parts(model, optimizer, controller, root, comm):
    if not isinstance(model, Module):
        raise TypeError(f"model must be a Module; got {type(model).__name__}")
    for name, obj in (("optimizer", optimizer), ("controller", controller)):
        if obj is not None and not (callable(getattr(obj, "state_dict", None))
                                    and callable(getattr(obj, "load_state_dict", None))):
            raise TypeError(f"{name} must have state_dict() and load_state_dict(), or be "
                            f"None; got {type(obj).__name__}")
    if not checks.is_integer(root) or not 0 <= root < comm.size:
        raise ValueError(f"root must be a rank, an int in [0, {comm.size}); got {root!r}")
    parts = {"model": model, "optimizer": optimizer, "controller": controller}
    return {name: obj for name, obj in parts.items() if obj is not None}


def _prepare_and_check(parts, state):
    """Resize the model for ``state`` and check every part against its entry, as a
    checkpoint load does; return the callable that undoes the resize. Raises (undone) on a
    refusal."""
    if list(state) != list(parts):
        raise ValueError(f"broadcast_state: the root sent the state of {list(state)}, this "
                         f"rank was given {list(parts)}; every rank must pass the same objects")
    undo = parts["model"].prepare_state_dict(state["model"])
    try:
        parts["model"].check_state_dict(state["model"])
        for name in ("optimizer", "controller"):
            check = getattr(parts.get(name), "check_state_dict", None)
            if callable(check):
                check(state[name])
    except BaseException:
        undo()
        raise
    return undo


def broadcast_state(model, optimizer=None, controller=None, comm=None, root=0):
    """Make every rank's model, optimizer and controller identical to ``root``'s.

    Args:
        model: a `Module`; its state dict (parameters and persistent buffers: values,
            offsets, masks, DynaDiag's alpha, pool and frozen flag, ...) is sent. A layer
            whose size is part of its state (a frozen `DynaDiagLinear`) takes root's size.
        optimizer: None, or an optimizer (or `DistributedOptimizer`) over the model's
            parameters: its per-parameter state and hyperparameters are sent.
        controller: None, or a `SparsityController`: its counters and generator state.
        comm: the `Communicator`; None for `diagnet.distributed.world()`.
        root: the rank whose state every rank takes.

    Collective: every rank calls it with the same kinds of objects. The structure of the
    state dicts goes by ``broadcast_object``, each array by ``comm.broadcast`` with tag
    ``"initial"`` (on its own device: NCCL for CuPy arrays). Every receiving rank then
    checks all it got (as `diagnet.load` does) before it loads anything, and if any rank
    refuses, every rank raises.

    Raises:
        TypeError: ``model`` is not a Module, ``optimizer``/``controller`` lack state dicts,
            ``comm`` is not a Communicator.
        ValueError: ``root`` is not a rank; a rank's objects cannot take root's state (other
            layers, shapes or configuration); then every rank raises and none has changed.
    """
    comm = checked_comm(comm)
    parts = _check_parts(model, optimizer, controller, root, comm)
    arrays = []
    if comm.rank == root:
        skeleton = _split({name: obj.state_dict() for name, obj in parts.items()}, arrays)
    else:
        skeleton = None
    skeleton = comm.broadcast_object(skeleton, root=root)
    if comm.rank != root:
        arrays = [backend.xp_for(spec.device).empty(spec.shape, dtype=np.dtype(spec.dtype))
                  for spec in sorted(_specs(skeleton), key=lambda spec: spec.index)]
    for array in arrays:
        comm.broadcast(array, root=root, tag="initial")
    if comm.rank == root:
        agree(lambda: None, comm)  # the receivers' verdict
        return
    state = _join(skeleton, arrays)
    prepared = []

    def check():
        prepared.append(_prepare_and_check(parts, state))

    try:
        agree(check, comm)
    except BaseException:
        for undo in prepared:
            undo()
        raise
    model.load_state_dict(state["model"])
    for name in ("optimizer", "controller"):
        if name in parts:
            parts[name].load_state_dict(state[name])


def attach_controller(controller, comm, weight_fn):
    """Make ``controller``'s grow and swap scores come from the global dense gradient.

    Sets ``tap.reducer`` on every tap of ``controller.taps()`` to ``g -> comm.allreduce(g *
    weight_fn(), tag="structure")``: at a mask-update step each rank's dense ``dy.T @ x``
    ``(m, n)``, weighted by this rank's share ``b_r / B`` of the global batch, is summed
    across ranks before the scores are taken, so every rank scores (and grows or swaps)
    alike. This is the one collective that moves a dense ``m x n`` array, and only at
    update steps (its bytes are counted under the tag ``"structure"``).

    Args:
        controller: a `SparsityController` (one without taps, such as SET, needs nothing).
        comm: the `Communicator`; None for `diagnet.distributed.world()`.
        weight_fn: callable returning this rank's current weight ``b_r / B`` in ``[0, 1]``
            (read at each update step: the last batch of an epoch may be smaller).

    Raises:
        TypeError: ``controller`` has no ``taps()``, ``weight_fn`` is not callable, or
            ``comm`` is not a Communicator.
    """
    comm = checked_comm(comm)
    if not callable(getattr(controller, "taps", None)):
        raise TypeError(f"controller must be a SparsityController (with taps()); got "
                        f"{type(controller).__name__}")
    if not callable(weight_fn):
        raise TypeError(f"weight_fn must be callable; got {type(weight_fn).__name__}")

    def reducer(grad):
        weight = checks.unit_interval("weight_fn()", weight_fn(), include_one=True)
        xp = backend.get_array_module(grad)
        return comm.allreduce(xp.ascontiguousarray(grad * weight), op="sum", tag="structure")

    for tap in controller.taps():
        tap.reducer = reducer


def check_structure(controller, comm):
    """Raise on every rank if a layer of ``controller`` differs in structure across ranks.

    Compares ``controller.fingerprint()`` (a hash per layer of its offsets, pool, active set
    or mask) across ranks: a debug check, one small ``allgather_object``. Collective.

    Raises:
        RuntimeError: naming the first layer (in rank 0's order) whose structure differs,
            and the ranks that disagree with rank 0; raised on every rank alike.
        TypeError: ``controller`` has no ``fingerprint()``; ``comm`` is not a Communicator.
    """
    comm = checked_comm(comm)
    if not callable(getattr(controller, "fingerprint", None)):
        raise TypeError(f"controller must be a SparsityController (with fingerprint()); got "
                        f"{type(controller).__name__}")
    prints = comm.allgather_object(dict(controller.fingerprint()))
    reference = prints[0]
    names = list(reference) + [name for p in prints[1:] for name in p if name not in reference]
    for name in names:
        others = [rank for rank, p in enumerate(prints) if p.get(name) != reference.get(name)]
        if others:
            ranks = ", ".join(map(str, others))
            raise RuntimeError(f"the structure of layer {name!r} differs between rank 0 and "
                               f"rank(s) {ranks}: the ranks' models have diverged")


def sum_tap_parts(taps, slots, comm=None):
    """Give every layer of ``taps`` that was captured the sum of its micro-batch parts.

    Each tap (a `diagnet.dst.GradientTap`) holds in ``tap.parts[name]`` the ``dy.T @ x``
    ``(m, n)`` of the micro-batches this rank ran, by slot (`GradientTap.fold`). For every
    such layer, in the tap's layer order, the parts go into their slots of a ``(slots, m,
    n)`` array, `ordered_sum` adds them up in slot order across the ranks (tag
    ``"structure"``: a dense ``m x n`` per micro-batch, at update steps only), and
    ``tap.set_dense(name, total)`` hands the sum back. Collective: every rank must have
    captured the same layers; that is checked first (one small ``allgather_object``).

    Raises:
        RuntimeError: on every rank, when the ranks captured different layers.
        ValueError: ``slots`` is not a positive int, or a part's slot is outside it.
    """
    comm = checked_comm(comm)
    slots = checks.positive_int("slots", slots)
    captured = [[name for name in tap.layers if name in tap.parts] for tap in taps]
    if comm.size > 1:
        everyone = comm.allgather_object(captured)
        if any(theirs != captured for theirs in everyone):
            raise RuntimeError(f"the ranks captured different layers in their gradient taps "
                               f"({everyone}): a layer must run on every rank's micro-batches")
    for tap, names in zip(taps, captured):
        for name in names:
            parts = tap.parts[name]
            first = next(iter(parts.values()))
            xp = backend.get_array_module(first)
            rows = xp.zeros((slots,) + tuple(first.shape), dtype=first.dtype)
            for slot, part in parts.items():
                if not 0 <= slot < slots:
                    raise ValueError(f"sum_tap_parts: layer {name!r} has a part for slot "
                                     f"{slot}, outside the {slots} slots of the batch")
                rows[slot] = part
            tap.set_dense(name, ordered_sum(rows, comm, tag="structure"))
