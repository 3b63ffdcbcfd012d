"""`LayerNorm`: normalise over the trailing dims, then a learned scale and shift."""

from __future__ import annotations

import numpy as np

from .. import backend
from .. import functional as F
from .module import Module
from .parameter import Parameter

__all__ = ["LayerNorm"]


class LayerNorm(Module):
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the trailing ``normalized_shape``.

    Args:
        normalized_shape: int or tuple, the trailing shape normalised over.
        eps: added to the variance.
        elementwise_affine: learn ``weight`` (ones) and ``bias`` (zeros) of that shape.
        dtype, device: of the parameters (default float32, the default device).
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, dtype=np.float32,
                 device=None):
        super().__init__()
        ns = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        if not ns or any(not isinstance(d, int) or d < 1 for d in ns):
            raise ValueError(f"normalized_shape must be positive ints; got {normalized_shape!r}")
        self.normalized_shape = ns
        self.eps = float(eps)
        if elementwise_affine:
            xp = backend.xp_for(backend.resolve_device(device))
            self.weight = Parameter(xp.ones(ns, dtype=dtype))
            self.bias = Parameter(xp.zeros(ns, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self):
        shape = self.normalized_shape[0] if len(self.normalized_shape) == 1 else self.normalized_shape
        return f"{shape}, eps={self.eps:g}" + ("" if self.weight is not None else ", affine=False")
