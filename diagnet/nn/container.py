"""Containers and shape layers: `Sequential`, `ModuleList`, `Identity`, `Flatten`."""

from __future__ import annotations

from .module import Module

__all__ = ["Sequential", "ModuleList", "Identity", "Flatten"]


class Sequential(Module):
    """Apply the given modules one after another; submodules are named ``0``, ``1``, ...

    Supports ``len``, iteration, integer indexing and slicing (a slice is a new Sequential
    sharing the same layers).
    """

    def __init__(self, *modules):
        super().__init__()
        for i, m in enumerate(modules):
            if not isinstance(m, Module):
                raise TypeError(f"Sequential: argument {i} must be a Module; got {type(m).__name__}")
            self.add_module(str(i), m)

    def forward(self, x):
        for m in self._modules.values():
            x = m(x)
        return x

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def __getitem__(self, i):
        mods = list(self._modules.values())
        if isinstance(i, slice):
            return Sequential(*mods[i])
        return mods[i]

    def append(self, module):
        """Add ``module`` at the end; returns self."""
        if not isinstance(module, Module):
            raise TypeError(f"append needs a Module; got {type(module).__name__}")
        self.add_module(str(len(self)), module)
        return self


class ModuleList(Module):
    """A list of modules registered as submodules ``0``, ``1``, ...; it has no forward."""

    def __init__(self, modules=()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, module):
        """Add ``module`` at the end; returns self."""
        if not isinstance(module, Module):
            raise TypeError(f"ModuleList.append needs a Module; got {type(module).__name__}")
        self.add_module(str(len(self._modules)), module)
        return self

    def extend(self, modules):
        for m in modules:
            self.append(m)
        return self

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def __getitem__(self, i):
        mods = list(self._modules.values())
        return ModuleList(mods[i]) if isinstance(i, slice) else mods[i]


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
