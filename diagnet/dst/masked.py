"""`MaskedLinear`: a dense layer with an element-wise mask, the unstructured baseline.

The paper's claim that diagonal sparsity matches unstructured sparsity at equal density
needs an unstructured layer to compare with. `MaskedLinear` stores the full ``(m, n)``
weight (no memory or compute is saved: it is a baseline, not a format) and a boolean
``mask`` buffer ``(m, n)``; it computes::

    y = x @ (weight * mask).T + bias

so the gradient of every pruned weight is exactly zero. The invariant "pruned weights are
zero and so is their optimizer state" then holds through any number of optimizer steps:
with ``w = 0``, ``g = 0``, zero momentum and zero moments, SGD (with momentum and weight
decay), Adam (L2 weight decay adds ``wd * 0``) and AdamW (``0 * (1 - lr wd)``) all leave
``w`` at zero. `set_mask` is the one way to change the mask, and it re-establishes the
invariant for the entries it changes (see there).

The number of active entries is kept on the host (counted once per mask change), so
`weight_stats`, `density` and a controller's `sparsity` never read from the GPU.
"""

from __future__ import annotations

import math

import numpy as np

from .. import backend
from .. import random as _random
from ..autograd import FLOAT_DTYPES, Tensor
from ..checks import number_in, positive_int
from ..nn import init
from ..nn.linear import Linear
from ..nn.module import Module
from ..nn.parameter import Parameter
from ..ops import dense as _dense
from .select import random_subset

__all__ = ["MaskedLinear", "active_count"]


def active_count(density, size) -> int:
    """Entries a mask of ``size`` entries keeps at ``density``: ``max(1, floor(d * size + 1/2))``.

    Rounded half up, so a density computed as ``k / size`` gives back ``k`` exactly.
    """
    density = number_in("density", density, 0, 1, include_low=False)
    return min(size, max(1, math.floor(density * size + 0.5)))


def _random_mask(shape, count, gen) -> np.ndarray:
    """A host boolean mask of ``shape`` with ``count`` True entries, uniformly at random."""
    flat = np.zeros(shape[0] * shape[1], dtype=bool)
    flat[random_subset(flat.size, count, gen)] = True
    return flat.reshape(shape)


class MaskedLinear(Linear):
    """``y = x @ (weight * mask).T + bias``: a dense layer with a fixed-density boolean mask.

    Args:
        in_features, out_features: sizes ``n`` and ``m``; ``weight`` and ``mask`` are ``(m, n)``.
        density: fraction of active weights in ``(0, 1]``; the mask keeps
            ``active_count(density, m * n)`` entries, drawn uniformly at random from ``rng``
            (ignored when ``mask`` is given).
        bias: learn a bias ``(m,)``.
        mask: optional boolean ``(m, n)`` array (NumPy, CuPy, Tensor or nested lists).
        rng: None (the default generator of `diagnet.random`), an int seed or a Generator;
            draws the mask, then the weight, then the bias.
        dtype: float32 (default) or float64. device: ``"cpu"``/``"cuda"`` (default device).

    Initialisation follows `nn.DiagLinear`: an output sums on average ``a / m`` active
    weights (``a`` active entries), so weight and bias are drawn from U(-b, b) with
    ``b = 1 / sqrt(max(1, a / m))``, the bound of a dense layer with that fan-in; pruned
    weights are zero.

    Attributes: ``weight``, ``bias`` (parameters), ``mask`` (bool buffer, saved in the state
    dict); properties ``nnz`` (active entries), ``density``, ``sparsity``.
    """

    def __init__(self, in_features, out_features, density=0.1, bias=True, mask=None, rng=None,
                 dtype=np.float32, device=None):
        # Module.__init__, not Linear.__init__: the weights are drawn for the sparse fan-in
        Module.__init__(self)
        self.in_features = positive_int("in_features", in_features)
        self.out_features = positive_int("out_features", out_features)
        m, n = self.out_features, self.in_features
        dt = np.dtype(dtype)
        if dt not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32 or float64; got {dt}")
        dev, gen = backend.resolve_device(device), _random.as_generator(rng)
        if mask is None:
            host = _random_mask((m, n), active_count(density, m * n), gen)
        else:
            host = backend.to_numpy(self._checked_mask(mask))
        active = int(host.sum())
        bound = init.linear_bound(max(1.0, active / m))
        weight = init.uniform_array((m, n), bound, dt, "cpu", gen) * host
        self.weight = Parameter(backend.to_device(weight, dev))
        if bias:
            self.bias = Parameter(init.uniform_array((m,), bound, dt, dev, gen))
        else:
            self.register_parameter("bias", None)
        self.register_buffer("mask", Tensor.from_array(backend.to_device(host, dev)))
        self._active = active
        self._float_mask = None   # (mask array, dtype, float copy) for the forward

    @classmethod
    def from_linear(cls, linear, density, rng=None) -> "MaskedLinear":
        """A masked copy of a dense ``linear``: a random mask at ``density`` (from ``rng``),
        ``weight * mask`` and the bias copied; dtype and device kept."""
        if not isinstance(linear, Linear):
            raise TypeError(f"linear must be an nn.Linear; got {type(linear).__name__}")
        m, n = linear.out_features, linear.in_features
        host = _random_mask((m, n), active_count(density, m * n), _random.as_generator(rng))
        out = cls(n, m, bias=linear.bias is not None, mask=host, rng=0,
                  dtype=linear.weight.dtype, device=linear.weight.device)
        xp = backend.get_array_module(linear.weight.data)
        out.weight.data = xp.where(out.mask.data, linear.weight.data,
                                   xp.zeros((), dtype=linear.weight.dtype))
        if linear.bias is not None:
            out.bias.data = linear.bias.data.copy()
        return out

    # ------------------------------------------------------------------ structure
    @property
    def nnz(self) -> int:
        """Active weight entries (counted on the host when the mask last changed)."""
        return self._active

    @property
    def density(self) -> float:
        """Realised density of the weight: active entries / ``(m * n)``."""
        return self._active / (self.out_features * self.in_features)

    @property
    def sparsity(self) -> float:
        """Realised sparsity of the weight: ``1 - density``."""
        return 1.0 - self.density

    def weight_stats(self):
        """``(stored, dense)`` entries of the weight matrix: ``(active, m*n)``, no device read."""
        return self._active, self.out_features * self.in_features

    def _checked_mask(self, mask):
        """``mask`` as a boolean backend array of the weight's shape (ValueError/TypeError)."""
        mask = backend.unwrap(mask)
        if not backend.is_array(mask):
            mask = np.asarray(mask)
        if mask.dtype.kind != "b":
            raise TypeError(f"mask must be a boolean array; got dtype {mask.dtype}")
        shape = (self.out_features, self.in_features)
        if tuple(mask.shape) != shape:
            raise ValueError(f"mask must have the weight's shape {shape}; got "
                             f"{tuple(mask.shape)}")
        return mask

    def _mask_as(self, dtype):
        """The mask as a ``dtype`` array for the forward, made once per mask array/dtype."""
        mask = self.mask.data
        cached = self._float_mask
        if cached is None or cached[0] is not mask or cached[1] != dtype:
            cached = self._float_mask = (mask, dtype, mask.astype(dtype))
        return cached[2]

    def forward(self, x, add_bias=True):
        """``x`` ``(..., in_features)`` -> ``(..., out_features)``; pruned weights get zero grad;
        ``add_bias=False`` leaves the bias out (as `Linear.forward`)."""
        w = self.weight * Tensor.from_array(self._mask_as(self.weight.dtype))
        return _dense.linear(x, w, self.bias if add_bias else None)

    def set_mask(self, mask) -> None:
        """Replace the mask: the one way to change which weights are active.

        Args:
            mask: boolean ``(m, n)`` array (NumPy, CuPy, Tensor or nested lists); moved to the
                layer's device. Any number of active entries is accepted.

        Every entry that is not active both before and after (in particular every changed
        entry) gets weight zero, gradient zero (if a gradient is held) and zero state in
        every optimizer holding ``weight`` (`Optimizer.mask_state`): newly pruned weights
        leave no momentum that could revive them, newly grown ones start at zero with fresh
        moments. Kept entries keep their weight and state. The active count is read back
        once (the only device read; mask changes are rare).
        """
        new = backend.to_device(self._checked_mask(mask), self.weight.device)
        xp = backend.get_array_module(self.weight.data)
        keep = xp.logical_and(self.mask.data, new)
        zero = xp.zeros((), dtype=self.weight.dtype)
        self.weight.data = xp.where(keep, self.weight.data, zero)
        if self.weight.grad is not None:
            self.weight.grad = Tensor.from_array(xp.where(keep, self.weight.grad.data, zero))
        for opt in self.weight.optimizers():
            opt.mask_state(self.weight, keep)
        self.mask.data = new.copy()  # never alias the caller's array
        self._active = int(new.sum())

    def _state_loaded(self):
        # a loaded mask: recount (one read, at load time) and hold pruned weights at zero
        xp = backend.get_array_module(self.weight.data)
        self.weight.data = xp.where(self.mask.data, self.weight.data,
                                    xp.zeros((), dtype=self.weight.dtype))
        self._active = int(self.mask.data.sum())

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"active={self._active}/{self.out_features * self.in_features}, "
                f"density={self.density:.4f}, bias={self.bias is not None}")
