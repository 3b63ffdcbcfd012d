"""`Dropout`: zero activations at random while training, identity in eval mode."""

from __future__ import annotations

from .. import functional as F
from ..checks import probability
from .module import Module

__all__ = ["Dropout"]


class Dropout(Module):
    """Zero each element with probability ``p`` and scale the rest by ``1/(1-p)`` in training.

    Masks are drawn on the input's device from `diagnet.random` (``rng=None``: the default
    generator, so ``diagnet.manual_seed`` makes runs reproducible), or from the given ``rng``.
    """

    def __init__(self, p=0.5, rng=None):
        super().__init__()
        self.p = probability("p", p)
        self.rng = rng

    def forward(self, x):
        return F.dropout(x, self.p, self.training, self.rng)

    def extra_repr(self):
        return f"p={self.p}"
