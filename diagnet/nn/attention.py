"""`MultiHeadSelfAttention`: multi-head self-attention with dense or diagonal projections.

A forward is three graph nodes: the ``qkv`` projection (``linear`` or ``diag_linear``),
`functional.qkv_attention` (the head split, scores, mask, softmax, dropout, the weighted sum
and the head merge in one op: `functional.qkv_split`, `functional.scaled_dot_product_attention`
and `functional.merge_heads` composed) and the ``proj`` projection.
"""

from __future__ import annotations

import numpy as np

from .. import functional as F
from .. import random as _random
from ..autograd import Tensor
from ..checks import positive_int, probability
from .linear import make_linear
from .module import Module

__all__ = ["MultiHeadSelfAttention"]


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
        # qkv_split, scaled_dot_product_attention and merge_heads in one node
        out = F.qkv_attention(self.qkv(x), self.heads, mask=mask,
                              dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out)                                    # (B, N, dim)

    def extra_repr(self):
        return (f"dim={self.dim}, heads={self.heads}, head_dim={self.head_dim}, "
                f"dropout={self.dropout}")
