"""`ViT`: a Vision Transformer with dense or diagonal attention and MLP layers."""

from __future__ import annotations

import numpy as np

from diagnet import backend, nn
from diagnet import functional as F
from diagnet import random as _random

from .common import (FeedForward, PatchEmbedding, check_linear, positive_int, pre_norm_fusable,
                     probability, run_pre_norm_fused)

__all__ = ["ViT", "TransformerBlock"]


def _normal_parameter(shape, std, dtype, device, gen):
    """A Parameter drawn from N(0, std^2) on the host (the same on every device), then moved."""
    host = (gen.standard_normal(shape) * std).astype(dtype)
    return nn.Parameter(backend.to_device(host, backend.resolve_device(device)))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block, ``(B, N, dim) -> (B, N, dim)``::

        x = x + attn(ln1(x))
        x = x + mlp(ln2(x))          # mlp: dim -> mlp_ratio * dim -> dim, GELU

    ``linear`` and ``sparsity`` choose dense or diagonal layers for the attention's ``qkv``
    and ``proj`` and for both MLP layers.

    `ViT` runs its blocks' branches itself, with each residual add fused into the layer norm
    that follows it (`ViT.forward`, `models.common.run_pre_norm_fused`); calling a block runs
    this ``forward``.
    """

    def __init__(self, dim, heads, mlp_ratio, linear="dense", sparsity=0.9, dropout=0.0,
                 dtype=np.float32, device=None, rng=None):
        super().__init__()
        gen = _random.as_generator(rng)
        hidden = int(round(mlp_ratio * dim))
        if hidden < 1:
            raise ValueError(f"mlp_ratio * dim must be at least 1; got {mlp_ratio!r} * {dim}")
        self.ln1 = nn.LayerNorm(dim, dtype=dtype, device=device)
        self.attn = nn.MultiHeadSelfAttention(dim, heads, linear=linear, sparsity=sparsity,
                                              dropout=dropout, dtype=dtype, device=device,
                                              rng=gen)
        self.ln2 = nn.LayerNorm(dim, dtype=dtype, device=device)
        self.mlp = FeedForward(dim, hidden, linear, sparsity, dropout, dtype, device, gen)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    """Vision Transformer classifier (Dosovitskiy et al., 2021), without convolutions.

    Shapes (``T = num_patches = (H/p) * (W/p)``)::

        images (B, C, H, W)                      # or (B, H, W) if C == 1, or (B, C*H*W)
        patch_embed -> (B, T, dim)               # reshape into p x p patches + dense Linear
        [cls_token; .] + pos_embed -> (B, T+1, dim)
        depth x TransformerBlock -> (B, T+1, dim)
        norm, take the class token -> (B, dim)
        head (dense) -> (B, num_classes) logits

    Args:
        image_size: int or (H, W); divisible by ``patch_size``.
        patch_size: side ``p`` of the square patches.
        in_channels: ``C``.
        dim: token width; divisible by ``heads``.
        depth: number of transformer blocks.
        heads: attention heads per block.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        num_classes: outputs of the head.
        linear: ``"dense"`` or ``"diag"``; with ``"diag"`` every ``qkv``, attention
            output (``proj``) and MLP layer is an ``nn.DiagLinear`` of target ``sparsity``;
            the patch embedding and the head stay dense.
        sparsity: target sparsity of the diagonal layers.
        dropout: after the position embedding, on the attention weights and in the MLPs.
        dtype, device: of the parameters. rng: None, int seed or Generator (draws the
            patch embedding, class token, position embedding, blocks, head, in order).

    Parameters ``cls_token`` ``(1, 1, dim)`` and ``pos_embed`` ``(1, T+1, dim)`` start from
    N(0, 0.02^2).

    Every residual add is followed by a layer norm (the next block's ``ln1``, the block's own
    ``ln2``, or the final ``norm``), and ``forward`` computes each such pair as one
    `diagnet.functional.add_layer_norm` node: the same values as calling the blocks, without
    a pass over the residual stream for the add, nor one for adding its two gradients in the
    backward. It calls the blocks' ``attn`` and ``mlp`` modules (their hooks run); when a
    block, one of its layer norms or the final norm has a forward hook or a ``forward`` of
    its own (a subclass, a replaced module), it calls the blocks one by one instead.
    """

    def __init__(self, image_size, patch_size, in_channels, dim, depth, heads, mlp_ratio,
                 num_classes, linear="dense", sparsity=0.9, dropout=0.0, dtype=np.float32,
                 device=None, rng=None):
        super().__init__()
        self.linear = check_linear(linear)
        self.dropout = probability("dropout", dropout)
        gen = _random.as_generator(rng)
        self.patch_embed = PatchEmbedding(image_size, patch_size, in_channels, dim, dtype,
                                          device, gen)
        T = self.patch_embed.num_patches
        self.cls_token = _normal_parameter((1, 1, dim), 0.02, dtype, device, gen)
        self.pos_embed = _normal_parameter((1, T + 1, dim), 0.02, dtype, device, gen)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, heads, mlp_ratio, linear, sparsity, dropout, dtype, device, gen)
            for _ in range(positive_int("depth", depth)))
        self.norm = nn.LayerNorm(dim, dtype=dtype, device=device)
        self.head = nn.Linear(dim, positive_int("num_classes", num_classes), dtype=dtype,
                              device=device, rng=gen)

    def forward(self, x):
        x = self.patch_embed(x)                                      # (B, T, dim)
        B, _, dim = x.shape
        cls = F.broadcast_to(self.cls_token, (B, 1, dim))
        x = F.concatenate([cls, x], axis=1) + self.pos_embed         # (B, T+1, dim)
        x = F.dropout(x, self.dropout, self.training)
        if pre_norm_fusable(self.blocks, TransformerBlock, self.norm):
            stages = [stage for b in self.blocks for stage in ((b.ln1, b.attn), (b.ln2, b.mlp))]
            normed = run_pre_norm_fused(x, stages, self.norm)
        else:
            for block in self.blocks:
                x = block(x)
            normed = self.norm(x)
        return self.head(normed[:, 0])

    def extra_repr(self):
        return (f"linear={self.linear!r}, dropout={self.dropout}, "
                f"cls_token={self.cls_token.shape}, pos_embed={self.pos_embed.shape}")
