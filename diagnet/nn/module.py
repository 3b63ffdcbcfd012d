"""`Module`: the base class of layers and models, after ``torch.nn.Module``.

A module owns three kinds of attributes, each registered by plain assignment:

* **parameters** (`Parameter`): trained by optimizers, saved in the state dict;
* **buffers** (`register_buffer`): state that is not trained but belongs to the model and is
  saved with it, such as the stored diagonal offsets of a `DiagLinear`;
* **submodules** (`Module`): walked recursively by every method below.

Each lives in an insertion-ordered dict, so iteration order, and with it the order of
``parameters()``, of optimizer state and of the state dict, is the order of assignment.
Every parameter and buffer has one dotted name (``blocks.1.mlp.fc1.values``), the key used
by state dicts, optimizers and checkpoints. Saving and loading state dicts lives in
`state.py` (`StateDictMixin`, which `Module` inherits); this file holds the registries, the
tree walk, modes, device and dtype moves and printing.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from ..autograd import FLOAT_DTYPES, Tensor
from .parameter import Parameter
from .state import StateDictMixin

__all__ = ["Module"]


class _HookHandle:
    """Returned by `Module.register_forward_hook`; ``remove()`` unregisters the hook."""

    _next_id = 0

    def __init__(self, hooks, hook):
        _HookHandle._next_id += 1
        self._hooks, self.id = hooks, _HookHandle._next_id
        hooks[self.id] = hook

    def remove(self):
        self._hooks.pop(self.id, None)


class Module(StateDictMixin):
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
        """This module and every descendant, each once, in the order of `named_modules`."""
        # the same walk without the dotted names: `train`/`eval` run it on every call
        seen = set()
        stack = [self]
        while stack:
            mod = stack.pop()
            if id(mod) in seen:
                continue
            seen.add(id(mod))
            yield mod
            stack.extend(reversed([m for m in mod._modules.values() if m is not None]))

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
        # The walk of `modules` without its generator and ordering: inference loops call
        # `eval()` before every batch, so this is on their path.
        seen = set()
        stack = [self]
        while stack:
            mod = stack.pop()
            if mod is None or id(mod) in seen:  # an absent submodule, or one seen before
                continue
            seen.add(id(mod))
            mod.__dict__["training"] = mode
            stack.extend(mod._modules.values())
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
                p.grad = Tensor.from_array(xp.zeros_like(p.grad.data))

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
                        t.grad = Tensor.from_array(fn(t.grad.data))
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
