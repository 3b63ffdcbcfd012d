"""`StateDictMixin`: how a `Module` saves and loads its parameters and buffers.

`Module` (in `module.py`) owns the registries and the tree walk; this mixin turns them into
a state dict (dotted name -> Tensor) and back. Loading checks everything before it assigns
anything: every module first resizes itself for its entries (`_prepare_state`), then shapes,
dtypes and each layer's own rules (`_check_state`) are checked, and only then are the
arrays copied in (`_state_loaded` runs after). Layers override those three hooks; nothing
else needs to know a layer type.
"""

from __future__ import annotations

import functools
from collections import namedtuple

from .. import backend
from ..autograd import Tensor

__all__ = ["IncompatibleKeys", "StateDictMixin"]

IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


def _array_of(value, name):
    """The backend array inside ``value`` (a Tensor or a NumPy/CuPy array)."""
    if isinstance(value, Tensor):
        return value.data
    if backend.is_array(value):
        return value
    raise TypeError(f"state_dict entry {name!r} must be a Tensor or a NumPy/CuPy array; got "
                    f"{type(value).__name__}")


def _first_few(items, limit=6, sep=", "):
    """The first ``limit`` of ``items`` joined, and how many more: short, readable errors."""
    shown = sep.join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _mismatch_report(missing, unexpected, problems):
    """``missing keys: ...; unexpected keys: ...; mismatched entries: ...`` (those present)."""
    kinds = (("missing keys", missing, ", "), ("unexpected keys", unexpected, ", "),
             ("mismatched entries", problems, "; "))
    return "; ".join(f"{what}: {_first_few(items, sep=sep)}" for what, items, sep in kinds
                     if items)


def _named_errors(prefix, module, hook, local):
    """``hook(local)``, its ValueError naming the module it came from."""
    try:
        return hook(local)
    except ValueError as exc:
        if not prefix:
            raise
        raise ValueError(f"module {prefix!r} ({type(module).__name__}): {exc}") from None


def _undo_all(undos):
    for undo in reversed(undos):
        undo()


class StateDictMixin:
    """The state-dict methods of `Module`; relies on its ``named_modules`` and registries
    (``_parameters``, ``_buffers``, ``_non_persistent``)."""

    def state_dict(self):
        """Every parameter and persistent buffer by dotted name, as detached Tensors.

        The Tensors share memory with the module (as in PyTorch): copy them to keep a
        snapshot that later training does not change.
        """
        out = {}
        for prefix, mod in self.named_modules():
            for reg in ("_parameters", "_buffers"):
                for name, t in getattr(mod, reg).items():
                    if t is None or (reg == "_buffers" and name in mod._non_persistent):
                        continue
                    out[f"{prefix}.{name}" if prefix else name] = Tensor.from_array(t.data)
        return out

    def _entries(self):
        """``(dotted name, module's dotted name, module, local name, Tensor)`` for each state
        dict entry."""
        for prefix, mod in self.named_modules():
            for reg in ("_parameters", "_buffers"):
                for name, t in getattr(mod, reg).items():
                    if t is None or (reg == "_buffers" and name in mod._non_persistent):
                        continue
                    yield (f"{prefix}.{name}" if prefix else name), prefix, mod, name, t

    def _check_state(self, local):
        """Validate the incoming entries of this module (local names -> arrays) before any is
        assigned; raise ValueError. Layers with structure (e.g. `DiagLinear`'s offsets)
        override this."""

    def _prepare_state(self, local):
        """Get ready to take this module's entries ``local`` (local names -> arrays), whose
        shapes may differ from the current ones; return a callable that undoes what was
        done, or None when nothing was.

        Called, through `prepare_state_dict`, before the shape checks of `check_state_dict`
        and `load_state_dict`, for every module with entries in the state dict. A layer
        whose size is part of its state resizes itself here, so that the checks compare
        the entries with the size it will have (a `DynaDiagLinear` stores ``K`` diagonals
        once frozen and ``S`` before). Raise ValueError, changing nothing, for entries the
        layer cannot take. The default does nothing.
        """
        return None

    def prepare_state_dict(self, state_dict):
        """Let every module resize itself for ``state_dict`` (`_prepare_state`); return a
        callable that undoes every change.

        `check_state_dict` and `load_state_dict` call this themselves. Call it directly to
        validate more than the module against the new sizes before anything is assigned:
        `diagnet.load` checks an optimizer's saved moments against the resized parameters,
        and calls the undo if any component is refused.

        Raises:
            TypeError: ``state_dict`` is not a mapping.
            ValueError: a module cannot take its entries (the modules resized before it
                are restored first).
        """
        if not hasattr(state_dict, "keys"):
            raise TypeError(f"state_dict must be a mapping; got {type(state_dict).__name__}")
        per_module = {}
        for full, prefix, mod, name, _ in self._entries():
            value = backend.unwrap(state_dict[full]) if full in state_dict else None
            if backend.is_array(value):
                per_module.setdefault(id(mod), (prefix, mod, {}))[2][name] = value
        undos = []
        try:
            for prefix, mod, local in per_module.values():
                undo = _named_errors(prefix, mod, mod._prepare_state, local)
                if undo is not None:
                    undos.append(undo)
        except BaseException:
            _undo_all(undos)
            raise
        return functools.partial(_undo_all, undos)

    def _plan_load(self, state_dict, strict):
        """Check ``state_dict`` against this module as it is (prepared); return what to
        assign, assign nothing."""
        entries = list(self._entries())
        names = {e[0] for e in entries}
        missing = [e[0] for e in entries if e[0] not in state_dict]
        unexpected = [k for k in state_dict if k not in names]
        problems, plan, per_module = [], [], {}
        for full, prefix, mod, name, t in entries:
            if full not in state_dict:
                continue
            arr = _array_of(state_dict[full], full)
            if tuple(arr.shape) != t.shape:
                problems.append(f"{full}: shape {tuple(arr.shape)} in the state dict, "
                                f"{t.shape} in the model")
            elif arr.dtype != t.dtype:
                problems.append(f"{full}: dtype {arr.dtype} in the state dict, {t.dtype} in "
                                "the model")
            else:
                plan.append((t, arr))
                per_module.setdefault(id(mod), (prefix, mod, {}))[2][name] = arr
        keys = strict and bool(missing or unexpected)
        if keys or problems:
            report = _mismatch_report(missing if strict else [], unexpected if strict else [],
                                      problems)
            raise (KeyError if keys else ValueError)("load_state_dict: " + report)
        for prefix, mod, local in per_module.values():
            _named_errors(prefix, mod, mod._check_state, local)
        modules = [mod for _, mod, _ in per_module.values()]
        return plan, modules, IncompatibleKeys(missing, unexpected)

    def check_state_dict(self, state_dict, strict=True):
        """Raise exactly as `load_state_dict` would, but change nothing.

        Returns ``IncompatibleKeys``. Checkpoint loading calls this on every component
        before it assigns anything to any of them.
        """
        undo = self.prepare_state_dict(state_dict)
        try:
            return self._plan_load(state_dict, strict)[2]
        finally:
            undo()

    def load_state_dict(self, state_dict, strict=True):
        """Copy parameters and buffers from ``state_dict`` (dotted name -> Tensor or array).

        Layers whose size is part of their state take the size of theirs first
        (`prepare_state_dict`); then everything is checked before anything is assigned, so
        on error the module is unchanged. Arrays are copied onto each parameter's own
        device; the parameter objects stay the same (optimizers holding them stay valid).

        Args:
            state_dict: mapping as returned by `state_dict`.
            strict: if True, missing and unexpected keys are errors.

        Returns:
            ``IncompatibleKeys(missing_keys, unexpected_keys)`` (both empty when strict).

        Raises:
            KeyError: with ``strict``, naming the first few missing and unexpected keys (and
                any mismatched entries).
            ValueError: an entry's shape or dtype differs from the module's (the first few
                listed), or a layer rejects its entries (e.g. offsets not sorted).
            TypeError: an entry is not a Tensor or array.
        """
        undo = self.prepare_state_dict(state_dict)
        try:
            plan, modules, result = self._plan_load(state_dict, strict)
        except BaseException:
            undo()
            raise
        for t, arr in plan:
            new = backend.to_device(arr, t.device)
            t.data = new.copy() if new is arr else new  # never alias the caller's array
            t.grad = None
        for mod in modules:
            mod._state_loaded()
        return result

    def _state_loaded(self):
        """Hook run after `load_state_dict` assigned this module's entries."""
