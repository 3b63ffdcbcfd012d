"""`Module`: the base class of layers and models, after ``torch.nn.Module``.

A module owns three kinds of attributes, each registered by plain assignment:

* **parameters** (`Parameter`): trained by optimizers, saved in the state dict;
* **buffers** (`register_buffer`): state that is not trained but belongs to the model and is
  saved with it, such as the stored diagonal offsets of a `DiagLinear`;
* **submodules** (`Module`): walked recursively by every method below.

Each lives in an insertion-ordered dict, so iteration order, and with it the order of
``parameters()``, of optimizer state and of the state dict, is the order of assignment.
Every parameter and buffer has one dotted name (``blocks.1.mlp.fc1.values``), the key used
by state dicts, optimizers and checkpoints.
"""

from __future__ import annotations

import functools
from collections import namedtuple

import numpy as np

from .. import backend
from ..autograd import FLOAT_DTYPES, Tensor
from .parameter import Parameter

__all__ = ["Module", "IncompatibleKeys"]

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


class _HookHandle:
    """Returned by `Module.register_forward_hook`; ``remove()`` unregisters the hook."""

    _next_id = 0

    def __init__(self, hooks, hook):
        _HookHandle._next_id += 1
        self._hooks, self.id = hooks, _HookHandle._next_id
        hooks[self.id] = hook

    def remove(self):
        self._hooks.pop(self.id, None)


class Module:
    """Base class of every layer and model.

    Subclasses call ``super().__init__()`` first, assign parameters, buffers and submodules
    as attributes, and implement ``forward(*inputs)``; calling the module calls forward.
    ``training`` is True after construction and switched by `train` / `eval`.
    """

    def __init__(self):
        # object.__setattr__: our own __setattr__ needs these dicts to exist already
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_buffers", {})
        object.__setattr__(self, "_non_persistent", set())
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "_forward_hooks", {})
        object.__setattr__(self, "training", True)

    # ------------------------------------------------------------------ registration
    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__}.__init__ must call super().__init__() "
                                 f"before assigning {name!r}")
        # replacing a parameter or submodule keeps its place in the order (a layer swapped
        # into a Sequential stays where it was)
        if isinstance(value, Parameter):
            if name not in self._parameters:
                self._forget(name)
            self._parameters[name] = value
        elif isinstance(value, Module):
            if name not in self._modules:
                self._forget(name)
            self._modules[name] = value
        elif name in self._buffers:
            if value is not None and not isinstance(value, Tensor):
                raise TypeError(f"buffer {name!r} can only be set to a Tensor or None; got "
                                f"{type(value).__name__}")
            self._buffers[name] = value
        elif name in self._parameters or name in self._modules:
            if value is not None:
                kind = "Parameter" if name in self._parameters else "Module"
                raise TypeError(f"cannot assign {type(value).__name__} to {name!r}: a {kind} "
                                "or None is expected")
            (self._parameters if name in self._parameters else self._modules)[name] = None
        else:
            object.__setattr__(self, name, value)

    def _forget(self, name):
        """Drop ``name`` from every registry: an attribute is of one kind at a time."""
        for reg in (self._parameters, self._buffers, self._modules):
            reg.pop(name, None)
        self._non_persistent.discard(name)
        self.__dict__.pop(name, None)

    def __getattr__(self, name):
        # only called when normal lookup fails: look in the registries
        d = self.__dict__
        for key in ("_parameters", "_buffers", "_modules"):
            if key in d and name in d[key]:
                return d[key][name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __delattr__(self, name):
        for key in ("_parameters", "_buffers", "_modules"):
            if name in self.__dict__[key]:
                del self.__dict__[key][name]
                self._non_persistent.discard(name)
                return
        object.__delattr__(self, name)

    def register_buffer(self, name, tensor, persistent=True):
        """Register ``tensor`` (a Tensor, or None) as a buffer called ``name``.

        Persistent buffers are saved in `state_dict`; non-persistent ones only follow `to` /
        `astype`.
        """
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"buffer name must be a non-empty str without '.'; got {name!r}")
        if tensor is not None and not isinstance(tensor, Tensor):
            raise TypeError(f"buffer {name!r} must be a Tensor or None; got {type(tensor).__name__}")
        if name in self._parameters or name in self._modules:
            raise KeyError(f"attribute {name!r} already exists as a parameter or submodule")
        self.__dict__.pop(name, None)
        self._buffers[name] = tensor
        if persistent:
            self._non_persistent.discard(name)
        else:
            self._non_persistent.add(name)

    def register_parameter(self, name, param):
        """Register ``param`` (a `Parameter`, or None for an absent one such as ``bias=False``)."""
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(f"parameter {name!r} must be a Parameter or None; got "
                            f"{type(param).__name__}")
        self.__dict__.pop(name, None)
        self._parameters[name] = param

    def add_module(self, name, module):
        """Register ``module`` as a submodule called ``name`` (for names that are not identifiers)."""
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"{name!r} must be a Module; got {type(module).__name__}")
        self._modules[str(name)] = module

    # ------------------------------------------------------------------ calling
    def forward(self, *inputs):
        raise NotImplementedError(f"{type(self).__name__} does not implement forward()")

    def __call__(self, *inputs, **kwargs):
        out = self.forward(*inputs, **kwargs)
        for hook in tuple(self._forward_hooks.values()):
            replaced = hook(self, inputs, out)
            if replaced is not None:
                out = replaced
        return out

    def register_forward_hook(self, hook):
        """Call ``hook(module, inputs, output)`` after every forward; returns a handle.

        A hook that returns a value replaces the output (dynamic sparse training uses this
        to tap the gradient of a layer's output at mask-update steps). ``handle.remove()``
        unregisters it. Hooks are not saved in the state dict.
        """
        if not callable(hook):
            raise TypeError(f"hook must be callable; got {type(hook).__name__}")
        return _HookHandle(self._forward_hooks, hook)

    # ------------------------------------------------------------------ walking
    def named_modules(self, prefix=""):
        """``(dotted name, module)`` for this module and every descendant, each once, in order."""
        seen = set()
        stack = [(prefix, self)]
        while stack:
            name, mod = stack.pop()
            if id(mod) in seen:
                continue
            seen.add(id(mod))
            yield name, mod
            children = [(f"{name}.{k}" if name else k, m) for k, m in mod._modules.items()
                        if m is not None]
            stack.extend(reversed(children))

    def modules(self):
        for _, m in self.named_modules():
            yield m

    def named_children(self):
        for name, m in self._modules.items():
            if m is not None:
                yield name, m

    def children(self):
        for _, m in self.named_children():
            yield m

    def _named_members(self, registry, recurse=True, persistent_only=False):
        seen = set()
        mods = self.named_modules() if recurse else [("", self)]
        for prefix, mod in mods:
            for name, t in getattr(mod, registry).items():
                if t is None or id(t) in seen:
                    continue
                if persistent_only and name in mod._non_persistent:
                    continue
                seen.add(id(t))
                yield (f"{prefix}.{name}" if prefix else name), t

    def named_parameters(self, recurse=True):
        """``(dotted name, Parameter)`` pairs; a parameter shared by two layers appears once."""
        return self._named_members("_parameters", recurse)

    def parameters(self, recurse=True):
        for _, p in self.named_parameters(recurse):
            yield p

    def named_buffers(self, recurse=True):
        return self._named_members("_buffers", recurse)

    def buffers(self, recurse=True):
        for _, b in self.named_buffers(recurse):
            yield b

    # ------------------------------------------------------------------ modes and grads
    def train(self, mode=True):
        """Set training mode (dropout active) on this module and all descendants; returns self."""
        if not isinstance(mode, bool):
            raise TypeError(f"mode must be a bool; got {type(mode).__name__}")
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self):
        """Set evaluation mode (dropout off); returns self."""
        return self.train(False)

    def zero_grad(self, set_to_none=True):
        """Forget every parameter's gradient (or set it to zeros with ``set_to_none=False``)."""
        for p in self.parameters():
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                xp = backend.get_array_module(p.grad.data)
                p.grad = Tensor._wrap(xp.zeros_like(p.grad.data))

    def requires_grad_(self, requires_grad=True):
        """Freeze (False) or unfreeze every parameter; returns self."""
        for p in self.parameters():
            p.requires_grad = bool(requires_grad)
        return self

    # ------------------------------------------------------------------ device and dtype
    def _apply(self, fn, floats_only=False):
        """Replace every parameter's and buffer's array by ``fn(array)`` in place.

        The Parameter objects stay the same (optimizers keep their references); their
        gradients follow. With ``floats_only``, integer buffers (offsets) are left alone.
        """
        for mod in self.modules():
            for reg in (mod._parameters, mod._buffers):
                for t in reg.values():
                    if t is None or (floats_only and t.dtype not in FLOAT_DTYPES):
                        continue
                    t.data = fn(t.data)
                    if t.grad is not None:
                        t.grad = Tensor._wrap(fn(t.grad.data))
        return self

    def to(self, device):
        """Move every parameter and buffer to ``device`` (``"cpu"`` or ``"cuda"``); returns self."""
        device = backend.resolve_device(device)
        return self._apply(lambda a: backend.to_device(a, device))

    def cpu(self):
        return self.to("cpu")

    def cuda(self):
        return self.to("cuda")

    def astype(self, dtype):
        """Cast every float parameter and buffer to ``dtype`` (float32 or float64); returns self."""
        dtype = np.dtype(dtype)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32 or float64; got {dtype}")
        return self._apply(lambda a: a.astype(dtype, copy=False), floats_only=True)

    def float(self):
        return self.astype(np.float32)

    def double(self):
        return self.astype(np.float64)

    @property
    def device(self):
        """The device of the first parameter or buffer (``"cpu"`` for a module with none)."""
        for _, t in self._named_members("_parameters"):
            return t.device
        for _, t in self._named_members("_buffers"):
            return t.device
        return "cpu"

    # ------------------------------------------------------------------ state dict
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
                    out[f"{prefix}.{name}" if prefix else name] = Tensor._wrap(t.data)
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

    # ------------------------------------------------------------------ printing
    def extra_repr(self) -> str:
        """The text inside this layer's parentheses in `repr` (override in layers)."""
        return ""

    def num_parameters(self, recurse=True) -> int:
        """How many numbers the module stores in parameters (stored diagonals, not ``m*n``)."""
        return sum(p.size for p in self.parameters(recurse))

    def _repr_note(self) -> str:
        own = sum(p.size for p in self._parameters.values() if p is not None)
        return f"  # {own:,} params" if own else ""

    def __repr__(self):
        head = f"{type(self).__name__}({self.extra_repr()}"
        if not self._modules:
            return head + ")" + self._repr_note()
        lines = [head]
        for name, mod in self._modules.items():
            body = repr(mod).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        total = self.num_parameters()
        return "\n".join(lines) + f"\n)  # {total:,} params in all"
