"""Checkpoints: models, optimizers, schedulers and training state in one safetensors file.

File layout
-----------
A checkpoint is a plain **safetensors** file, written and read by `diagnet.tensorfile`
(the format is described there; no pickle anywhere).

`save` / `load` put a whole training run in one such file:

* the model's state dict as tensors ``model/<dotted name>`` (a `DiagLinear` stores its
  ``offsets`` and ``values``, as its state dict does: nothing is densified);
* the optimizer's per-parameter arrays as tensors ``optimizer/state/<index>/<key>``; its
  scalars, ``param_groups`` and ``param_names`` as JSON;
* the scheduler's state, the `diagnet.random` generator state, the training ``state``
  (epoch, step, best metric...), the run ``config`` and any extra named component.

Everything that is not an array lives in one metadata entry, ``__metadata__["diagnet"]``,
a JSON string (next to it, ``__metadata__["diagnet_sha256"]``, the checksum)::

    {"format": "diagnet-checkpoint", "format_version": 1, "diagnet_version": "0.1.0",
     "created": "2025-01-01T12:00:00.000000+00:00",
     "components": {"model": <skeleton>, "optimizer": <skeleton>, ...},
     "classes": {"model": "Sequential", ...},
     "config": <skeleton>, "state": <skeleton>, "rng": <generator state or null>}

A *skeleton* is a component's state dict with every array replaced by a placeholder that
names its tensor (`split_state` / `join_state`, from `diagnet.skeleton`, which describes the
encoding).

Guarantees
----------
* **Atomic writes.** A file is written to a temporary file in the destination folder,
  flushed, ``fsync``-ed and renamed onto the final name (``os.replace``); the folder is then
  ``fsync``-ed where the platform allows. If anything fails, the temporary file is removed
  and whatever was at the final name before is untouched: a reader never sees a partial
  checkpoint.
* **Strict reading.** Every structural property of the file is checked (lengths, UTF-8,
  JSON and its nesting depth, dtypes, shapes against offsets, offsets tiling the data
  section, no trailing bytes), and so is the saved generator state; a violation raises
  `CheckpointError` (a ``ValueError``) naming the file and the problem.
* **Checksum.** ``__metadata__["diagnet_sha256"]`` is the SHA-256 of every tensor (name,
  dtype, shape, bytes) and of the metadata JSON; `load` recomputes it, so a changed byte
  that would leave the file well-formed (a digit of the training state, a weight) is
  caught too. (`load_tensors` reads any safetensors file and does not need it.)
* **Validate everything, then assign.** `load` parses the whole file, rebuilds every
  component's state dict and validates each against its target (``check_state_dict``)
  *before* any ``load_state_dict`` runs. A corrupt, truncated, foreign or mismatched file
  raises and leaves the model, optimizer and the rest in memory unchanged.
* **Devices.** GPU (CuPy) arrays are copied to the host to be written; on load, each
  component's own ``load_state_dict`` copies the arrays onto its parameters' devices.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import random as _random
from .checks import is_int
from .skeleton import MAX_STATE_DEPTH, join_state, split_state
from .tensorfile import (CheckpointError, check_text, dtype_name, host_array, load_tensors,
                         loads_json, save_tensors)
from .version import __version__

__all__ = [
    "CheckpointError", "Checkpoint", "save", "load", "save_tensors", "load_tensors",
    "split_state", "join_state", "FORMAT", "FORMAT_VERSION", "METADATA_KEY", "CHECKSUM_KEY",
    "MAX_STATE_DEPTH",
]

#: value of the ``format`` field of a diagnet checkpoint
FORMAT = "diagnet-checkpoint"
#: the version written by this code; files with a larger version are refused
FORMAT_VERSION = 1
#: the ``__metadata__`` key that holds the checkpoint's JSON
METADATA_KEY = "diagnet"
#: the ``__metadata__`` key that holds the checksum of the checkpoint
CHECKSUM_KEY = "diagnet_sha256"


def _digest(tensors, meta_json):
    """SHA-256 over every tensor (name, dtype, shape, bytes; by name) and the metadata JSON.

    safetensors itself has no checksum; this one lets `load` tell a flipped byte anywhere in
    a checkpoint (a digit of the training state, a byte of a weight) from a valid file.
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        arr = host_array(tensors[name], name)
        h.update(json.dumps([name, dtype_name(arr), list(arr.shape)]).encode("utf-8"))
        h.update(arr.reshape(-1).view(np.uint8).data)
    h.update(meta_json.encode("utf-8"))
    return h.hexdigest()


def _json_dumps(obj):
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=True)


def _component_items(model, optimizer, scheduler, components):
    items = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    for name, obj in components.items():
        if not name or "/" in name or name.startswith("__"):
            raise ValueError(f"component name {name!r} is not allowed (no '/', no leading '__')")
        check_text(name, "component name")
        items[name] = obj
    return {k: v for k, v in items.items() if v is not None}


def save(path, *, model=None, optimizer=None, scheduler=None, state=None, config=None,
         rng=True, **components):
    """Save a training run to one safetensors file, atomically.

    Args:
        path: the file to write (str or path-like); its folder must exist. An existing file
            is replaced only once the new one is complete.
        model: a `diagnet.nn.Module` (its ``state_dict()``: parameters and buffers; sparse
            layers as offsets + values).
        optimizer: an optimizer (``state_dict()`` with ``state``, ``param_groups``,
            ``param_names``): its arrays become tensors, the rest JSON.
        scheduler: a learning-rate scheduler (``state_dict()``).
        state: training state (epoch, step, best metric, data order seed...): dicts, lists,
            tuples, numbers, strings, None (arrays are allowed too).
        config: the run's configuration, under the same rules as ``state``.
        rng: save the `diagnet.random` default generator's state (default True).
        **components: more objects with ``state_dict()`` saved under their keyword's name
            (e.g. ``dst=...``).

    Raises:
        TypeError: a state dict, ``state`` or ``config`` holds a value that cannot be saved
            (the message says where), or a component lacks ``state_dict``.
        ValueError: a component name is not allowed, or a state dict, ``state`` or
            ``config`` nests deeper than `MAX_STATE_DEPTH` or holds a str with a lone
            surrogate (the message says where); nothing is written.
        FileNotFoundError: the destination folder does not exist.
        OSError: writing failed; nothing was written at ``path``.
    """
    objects = _component_items(model, optimizer, scheduler, components)
    tensors, skeletons, classes = {}, {}, {}
    for name, obj in objects.items():
        if not callable(getattr(obj, "state_dict", None)):
            raise TypeError(f"{name}: a {type(obj).__name__} has no state_dict() to save")
        skeletons[name], parts = split_state(obj.state_dict(), name)
        tensors.update(parts)
        classes[name] = type(obj).__name__
    extras = {}
    for key, value in (("state", state), ("config", config)):
        extras[key], parts = split_state(value, key)
        tensors.update(parts)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "diagnet_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "components": skeletons,
        "classes": classes,
        "config": extras["config"],
        "state": extras["state"],
        "rng": _random.get_state() if rng else None,
    }
    text = _json_dumps(meta)
    save_tensors(path, tensors, {METADATA_KEY: text, CHECKSUM_KEY: _digest(tensors, text)})


@dataclass
class Checkpoint:
    """What `load` read from a checkpoint.

    Attributes:
        path: the file.
        state: the training state saved with ``state=`` (None if none).
        config: the configuration saved with ``config=`` (None if none).
        metadata: ``format``, ``format_version``, ``diagnet_version``, ``created`` (UTC ISO
            time), ``components`` (names saved), ``classes`` (their class names),
            ``has_rng``.
        components: the state dicts (NumPy arrays) of the saved components that were *not*
            loaded into an object, by name (``"model"``, ``"optimizer"``...): with
            ``diagnet.load(path)`` alone, everything in the file.
        rng_state: the saved `diagnet.random` state, or None.
        loaded: the names of the components loaded into objects, in load order.
        model_keys: the model's ``IncompatibleKeys`` (non-empty only with ``strict=False``),
            or None when no model was given.
    """

    path: str
    state: Any = None
    config: Any = None
    metadata: dict = field(default_factory=dict)
    components: dict = field(default_factory=dict, repr=False)
    rng_state: Any = field(default=None, repr=False)
    loaded: tuple = ()
    model_keys: Any = None


def _read_checkpoint(path):
    """Parse and structurally validate a checkpoint file; return (meta, decoded parts)."""
    tensors, header_meta = load_tensors(path)

    def fail(msg):
        raise CheckpointError(f"{path}: {msg}")

    if METADATA_KEY not in header_meta:
        fail(f"not a diagnet checkpoint: a safetensors file without the {METADATA_KEY!r} "
             f"metadata (it has {len(tensors)} tensors; read it with load_tensors)")
    try:
        meta = loads_json(header_meta[METADATA_KEY], f"the {METADATA_KEY!r} entry")
    except ValueError as exc:
        fail(f"corrupt checkpoint metadata: {exc}")
    if not isinstance(meta, dict):
        fail("corrupt checkpoint metadata: not a JSON object")
    if meta.get("format") != FORMAT:
        fail(f"not a diagnet checkpoint: format is {meta.get('format')!r}, expected {FORMAT!r}")
    version = meta.get("format_version")
    if not is_int(version) or version < 1:
        fail(f"corrupt checkpoint metadata: format_version {version!r} is not a positive int")
    if version > FORMAT_VERSION:
        fail(f"format_version {version} is newer than this diagnet reads ({FORMAT_VERSION}); "
             "upgrade diagnet")
    if header_meta.get(CHECKSUM_KEY) != _digest(tensors, header_meta[METADATA_KEY]):
        fail("corrupt checkpoint: the checksum does not match the contents (a changed byte in "
             "the metadata or the tensor data)" if CHECKSUM_KEY in header_meta else
             f"corrupt checkpoint: the {CHECKSUM_KEY!r} checksum is missing")
    skeletons = meta.get("components")
    if not isinstance(skeletons, dict):
        fail("corrupt checkpoint metadata: 'components' is not an object")
    used = set()
    try:
        parts = {name: join_state(sk, tensors, used) for name, sk in skeletons.items()}
        state = join_state(meta.get("state"), tensors, used)
        config = join_state(meta.get("config"), tensors, used)
    except ValueError as exc:
        fail(f"corrupt checkpoint: {exc}")
    unused = [name for name in tensors if name not in used]
    if unused:
        fail(f"corrupt checkpoint: tensors not referenced by the metadata: "
             f"{', '.join(unused[:10])}" + (" ..." if len(unused) > 10 else ""))
    rng_state = meta.get("rng")
    if rng_state is not None and not isinstance(rng_state, dict):
        fail("corrupt checkpoint metadata: 'rng' is not an object")
    info = {
        "format": meta["format"],
        "format_version": version,
        "diagnet_version": meta.get("diagnet_version"),
        "created": meta.get("created"),
        "components": list(skeletons),
        "classes": meta.get("classes", {}),
        "has_rng": rng_state is not None,
    }
    return info, parts, state, config, rng_state


def _check_components(targets, parts, strict):
    """Validate each target against its saved state dict with its ``check_state_dict``.

    Returns ``(model_keys, unchecked, checked)``: the model's ``IncompatibleKeys`` (or None),
    the names of the objects without ``check_state_dict`` and of those checked.
    """
    model_keys = None
    unchecked, checked = [], []
    for name, obj in targets.items():
        sd = parts[name]
        if name == "model" and callable(getattr(obj, "check_state_dict", None)):
            model_keys = obj.check_state_dict(sd, strict=strict)
            checked.append(name)
        elif callable(getattr(obj, "check_state_dict", None)):
            obj.check_state_dict(sd)
            checked.append(name)
        else:
            unchecked.append(name)
    return model_keys, unchecked, checked


def load(path, *, model=None, optimizer=None, scheduler=None, rng=True, strict=True,
         **components):
    """Load a checkpoint written by `save`, validating everything before assigning anything.

    Steps: read and validate the whole file (`load_tensors`, then the diagnet metadata);
    rebuild each component's state dict; check that every object given has its component
    in the file; let the model's layers take the saved sizes (``model.prepare_state_dict``:
    a frozen `DynaDiagLinear` stores fewer diagonals than a fresh one, and an optimizer's
    saved moments are checked against the resized parameters; undone if anything below is
    refused); validate each: ``model.check_state_dict(sd, strict)``, and
    ``check_state_dict(sd)`` for every other object that has one; check that the saved
    generator state is usable; only then call the ``load_state_dict`` methods and
    `diagnet.random.set_state`.

    Objects without ``check_state_dict`` (schedulers, typically) are validated only by
    their own ``load_state_dict``; they are loaded *first*, so that if one rejects its state
    nothing else has been assigned yet. The others are then loaded in the order model,
    optimizer, scheduler, extra components. (Only a failure inside a ``load_state_dict``
    that its ``check_state_dict`` let through, such as running out of memory, can leave
    earlier components loaded.)

    Args:
        path: the checkpoint file; or a `Checkpoint` that `load` returned, whose components
            (those it holds) are then loaded without reading the file again: a caller that
            checks the saved ``state`` before it loads anything reads the file once.
        model: a `Module` to load the model's state into (arrays go to each parameter's
            device); None to leave it in `Checkpoint.components`.
        optimizer, scheduler, **components: objects with ``load_state_dict`` to restore.
        rng: restore the `diagnet.random` default generator's state when the file has one
            (default True; a file saved with ``rng=False`` has none and this is skipped).
        strict: passed to the model's ``check_state_dict`` / ``load_state_dict``: missing
            and unexpected keys are errors.

    Returns:
        A `Checkpoint` with ``state``, ``config``, ``metadata`` and the state dicts of the
        saved components that were not loaded into an object.

    Raises:
        CheckpointError (a ValueError): the file is not a valid safetensors file (see
            `load_tensors`), not a diagnet checkpoint, of a newer format version, its
            metadata is corrupt, a component asked for is not in the file, or the saved
            generator state is unusable.
        KeyError, ValueError, TypeError: a component's ``check_state_dict`` rejected its
            state (e.g. the model's missing/unexpected keys with ``strict``, or a shape
            mismatch); the message is the component's.
        OSError: the file cannot be read.
        In every case nothing in memory has been changed.
    """
    if isinstance(path, Checkpoint):
        info, parts, state, config, rng_state = (path.metadata, path.components, path.state,
                                                 path.config, path.rng_state)
        path = path.path
    else:
        path = os.fspath(path)
        info, parts, state, config, rng_state = _read_checkpoint(path)
    targets = _component_items(model, optimizer, scheduler, components)
    missing = [name for name in targets if name not in parts]
    if missing:
        fail_names = ", ".join(repr(n) for n in missing)
        raise CheckpointError(f"{path}: asked to load {fail_names} but the checkpoint has no such "
                              f"component (it has: {', '.join(parts) or 'none'})")
    for name, obj in targets.items():
        if not callable(getattr(obj, "load_state_dict", None)):
            raise TypeError(f"{name}: a {type(obj).__name__} has no load_state_dict()")

    # ---- validate everything, the model resized to the saved sizes
    prepare = getattr(model, "prepare_state_dict", None)
    undo = prepare(parts["model"]) if "model" in targets and callable(prepare) else None
    try:
        model_keys, unchecked, checked = _check_components(targets, parts, strict)
        if rng and rng_state is not None:
            try:
                rng_state = _random.check_state(rng_state)
            except (TypeError, ValueError) as exc:
                raise CheckpointError(f"{path}: the saved random generator state is "
                                      f"unusable: {exc}") from None
        for name in unchecked:  # validated only by loading: first, while nothing else is
            targets[name].load_state_dict(parts[name])
    except BaseException:
        if undo is not None:
            undo()
        raise

    # ---- assign
    for name in checked:
        obj = targets[name]
        if name == "model":
            result = obj.load_state_dict(parts[name], strict=strict)
            model_keys = result if result is not None else model_keys
        else:
            obj.load_state_dict(parts[name])
    if rng and rng_state is not None:
        _random.set_state(rng_state)
    return Checkpoint(
        path=path, state=state, config=config, metadata=info,
        components={name: sd for name, sd in parts.items() if name not in targets},
        rng_state=rng_state, loaded=tuple(unchecked + checked), model_keys=model_keys)
