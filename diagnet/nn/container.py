"""Containers and shape layers: `Sequential`, `ModuleList`, `Identity`, `Flatten`."""

from __future__ import annotations

from .module import Module

__all__ = ["Sequential", "ModuleList", "Identity", "Flatten"]


class _ModuleSequence(Module):
    """Submodules named ``0``, ``1``, ...: ``len``, iteration, indexing and `append`."""

    def append(self, module):
        """Add ``module`` at the end; returns self."""
        if not isinstance(module, Module):
            raise TypeError(f"{type(self).__name__}.append needs a Module; got "
                            f"{type(module).__name__}")
        self.add_module(str(len(self._modules)), module)
        return self

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def __getitem__(self, i):
        """The ``i``-th module; a slice gives a new container sharing the same modules."""
        mods = list(self._modules.values())
        return self._of(mods[i]) if isinstance(i, slice) else mods[i]


class Sequential(_ModuleSequence):
    """Apply the given modules one after another; submodules are named ``0``, ``1``, ...

    Supports ``len``, iteration, integer indexing and slicing (a slice is a new Sequential
    sharing the same layers).
    """

    def __init__(self, *modules):
        super().__init__()
        for i, m in enumerate(modules):
            if not isinstance(m, Module):
                raise TypeError(f"Sequential: argument {i} must be a Module; got {type(m).__name__}")
            self.append(m)

    @staticmethod
    def _of(modules):
        return Sequential(*modules)

    def forward(self, x):
        for m in self._modules.values():
            x = m(x)
        return x


class ModuleList(_ModuleSequence):
    """A list of modules registered as submodules ``0``, ``1``, ...; it has no forward."""

    def __init__(self, modules=()):
        super().__init__()
        self.extend(modules)

    @staticmethod
    def _of(modules):
        return ModuleList(modules)

    def extend(self, modules):
        """Append each of ``modules``; returns self."""
        for m in modules:
            self.append(m)
        return self


class Identity(Module):
    """Return the input unchanged (a placeholder layer)."""

    def forward(self, x):
        return x


class Flatten(Module):
    """Flatten dims ``start_dim`` .. ``end_dim`` (default 1 .. -1) into one."""

    def __init__(self, start_dim=1, end_dim=-1):
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, x):
        nd = x.ndim
        s = self.start_dim % nd
        e = self.end_dim % nd
        if s > e:
            raise ValueError(f"Flatten: start_dim {self.start_dim} comes after end_dim "
                             f"{self.end_dim} for a {nd}-d input")
        shape = x.shape
        merged = 1
        for d in shape[s:e + 1]:
            merged *= d
        return x.reshape(*shape[:s], merged, *shape[e + 1:])

    def extra_repr(self):
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"
