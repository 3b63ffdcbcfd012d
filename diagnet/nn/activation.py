"""Activation layers: thin modules over the functions of `diagnet.functional`."""

from __future__ import annotations

from .. import functional as F
from ..autograd import axis_or_dim
from .module import Module

__all__ = ["ReLU", "GELU", "Tanh", "Sigmoid", "Softmax"]


class ReLU(Module):
    """``max(x, 0)`` element-wise."""

    def forward(self, x):
        return F.relu(x)


class GELU(Module):
    """Gaussian error linear unit; ``approximate="tanh"`` uses the tanh form."""

    def __init__(self, approximate="none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh'; got {approximate!r}")
        self.approximate = approximate

    def forward(self, x):
        return F.gelu(x, approximate=self.approximate)

    def extra_repr(self):
        return "" if self.approximate == "none" else f"approximate={self.approximate!r}"


class Tanh(Module):
    """``tanh(x)`` element-wise."""

    def forward(self, x):
        return F.tanh(x)


class Sigmoid(Module):
    """``1 / (1 + exp(-x))`` element-wise."""

    def forward(self, x):
        return F.sigmoid(x)


class Softmax(Module):
    """Softmax over ``axis`` (default the last; ``dim=`` is PyTorch's name for it)."""

    def __init__(self, axis=None, *, dim=None):
        super().__init__()
        self.axis = axis_or_dim("Softmax", axis, dim, default=-1)

    def forward(self, x):
        return F.softmax(x, axis=self.axis)

    def extra_repr(self):
        return f"axis={self.axis}"
