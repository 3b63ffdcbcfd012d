"""`MultiHeadSelfAttention`: multi-head self-attention with dense or diagonal projections.

Attention is composed of diagnet ops only (``linear``/``diag_linear`` inside the layers,
``reshape``, ``transpose``, batched ``matmul``, ``softmax``, ``dropout``), so its backward
is the engine's and it runs wherever those ops run (NumPy and CuPy).
"""

from __future__ import annotations

import math

import numpy as np

from .. import functional as F
from .. import random as _random
from ..autograd import Tensor
from ._validate import positive_int, probability
from .linear import make_linear
from .module import Module

__all__ = ["MultiHeadSelfAttention"]


# Score given to masked-out keys. Finite, not -inf: a query whose keys are all masked then
# attends uniformly instead of producing NaN (softmax subtracts the row maximum first, so
# exp(-1e9 - max) is exactly 0 next to any unmasked key, in float32 and float64).
_MASKED_SCORE = -1e9


class MultiHeadSelfAttention(Module):
    """Multi-head scaled dot-product self-attention, ``(B, N, dim) -> (B, N, dim)``.

    Per head ``h`` (``head_dim = dim // heads``)::

        q, k, v  = split(qkv(x))                         # each (B, heads, N, head_dim)
        attn     = softmax(q @ k^T / sqrt(head_dim))     # (B, heads, N, N), over the keys
        out_h    = dropout(attn) @ v                     # (B, heads, N, head_dim)
        y        = proj(concat_h out_h)                  # (B, N, dim)

    Args:
        dim: model width; must be divisible by ``heads``.
        heads: number of attention heads.
        linear: ``"dense"`` (``nn.Linear``) or ``"diag"`` (``nn.DiagLinear``) for both
            projections, ``qkv`` (``dim -> 3*dim``) and ``proj`` (``dim -> dim``).
        sparsity: target sparsity of the diagonal projections (``linear="diag"`` only).
        bias: learn biases in both projections.
        dropout: probability of dropping an attention weight in training mode.
        dtype, device: of the parameters (float32 by default; the default device).
        rng: None, an int seed or a Generator; draws ``qkv``, then ``proj``.

    ``forward(x, mask=None)``: ``mask`` is optional, boolean, broadcastable to
    ``(B, heads, N, N)`` (e.g. ``(N, N)``), True where query ``i`` may attend to key ``j``.
    A query with no allowed key attends uniformly to all of them (no NaN).
    """

    def __init__(self, dim, heads, linear="dense", sparsity=0.9, bias=True, dropout=0.0,
                 dtype=np.float32, device=None, rng=None):
        super().__init__()
        self.dim = positive_int("dim", dim)
        self.heads = positive_int("heads", heads)
        if self.dim % self.heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.head_dim = self.dim // self.heads
        self.dropout = probability("dropout", dropout)
        # one generator for both layers, so that a seed fixes all of them
        gen = _random.as_generator(rng)
        kw = dict(linear=linear, sparsity=sparsity, bias=bias, dtype=dtype, device=device, rng=gen)
        self.qkv = make_linear(self.dim, 3 * self.dim, **kw)
        self.proj = make_linear(self.dim, self.dim, **kw)

    def forward(self, x, mask=None):
        if not isinstance(x, Tensor):
            raise TypeError(f"MultiHeadSelfAttention expects a Tensor; got {type(x).__name__}")
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"MultiHeadSelfAttention expects x of shape (B, N, {self.dim}); "
                             f"got {x.shape}")
        B, N, _ = x.shape
        H, hd = self.heads, self.head_dim
        # (B, N, 3*dim) -> (3, B, heads, N, head_dim): the qkv layout is [q | k | v], each
        # split into heads of head_dim consecutive features
        qkv = self.qkv(x).reshape(B, N, 3, H, hd).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = F.matmul(q, k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(hd))
        if mask is not None:
            scores = F.where(self._mask(mask, scores.shape), scores, _MASKED_SCORE)
        attn = F.dropout(F.softmax(scores, axis=-1), self.dropout, self.training)
        out = F.matmul(attn, v)                                  # (B, heads, N, head_dim)
        return self.proj(out.transpose(0, 2, 1, 3).reshape(B, N, self.dim))

    @staticmethod
    def _mask(mask, shape):
        m = mask.data if isinstance(mask, Tensor) else mask
        if getattr(m, "dtype", None) != np.dtype(bool):
            raise TypeError(f"mask must be a boolean array or Tensor; got "
                            f"{getattr(m, 'dtype', type(m).__name__)}")
        try:
            fits = np.broadcast_shapes(tuple(m.shape), shape) == tuple(shape)
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(f"mask of shape {tuple(m.shape)} does not broadcast to the "
                             f"attention scores' shape {tuple(shape)} (B, heads, N, N)")
        return m

    def extra_repr(self):
        return (f"dim={self.dim}, heads={self.heads}, head_dim={self.head_dim}, "
                f"dropout={self.dropout}")
