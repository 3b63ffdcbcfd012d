"""`MLPMixer`: an all-MLP image classifier with dense or diagonal mixing layers."""

from __future__ import annotations

import numpy as np

from diagnet import nn
from diagnet import random as _random

from .common import (FeedForward, PatchEmbedding, check_linear, positive_int, pre_norm_fusable,
                     run_pre_norm_fused)

__all__ = ["MLPMixer", "MixerBlock"]


class MixerBlock(nn.Module):
    """One Mixer layer, ``(B, T, dim) -> (B, T, dim)``::

        x = x + token_mix(ln1(x).transpose(1, 2)).transpose(1, 2)   # mixes across the T tokens
        x = x + channel_mix(ln2(x))                                 # mixes across the dim channels

    ``token_mix`` is ``T -> token_mlp_dim -> T`` and ``channel_mix`` is
    ``dim -> channel_mlp_dim -> dim``, each two linears with a GELU; ``linear`` chooses
    dense or diagonal layers for all four.
    """

    def __init__(self, num_tokens, dim, token_mlp_dim, channel_mlp_dim, linear="dense",
                 sparsity=0.9, dropout=0.0, dtype=np.float32, device=None, rng=None):
        super().__init__()
        gen = _random.as_generator(rng)
        self.ln1 = nn.LayerNorm(dim, dtype=dtype, device=device)
        self.token_mix = FeedForward(num_tokens, token_mlp_dim, linear, sparsity, dropout, dtype,
                                     device, gen)
        self.ln2 = nn.LayerNorm(dim, dtype=dtype, device=device)
        self.channel_mix = FeedForward(dim, channel_mlp_dim, linear, sparsity, dropout, dtype,
                                       device, gen)

    def forward(self, x):
        x = x + self.mix_tokens(self.ln1(x))
        return x + self.channel_mix(self.ln2(x))

    def mix_tokens(self, x):
        """``token_mix`` across the tokens of ``x`` ``(B, T, dim)``: ``(B, T, dim)``."""
        return self.token_mix(x.transpose(0, 2, 1)).transpose(0, 2, 1)


class MLPMixer(nn.Module):
    """MLP-Mixer classifier (Tolstikhin et al., 2021).

    Shapes (``T = num_patches = (H/p) * (W/p)``)::

        images (B, C, H, W)                      # or (B, H, W) if C == 1, or (B, C*H*W)
        patch_embed -> (B, T, dim)               # reshape into p x p patches + dense Linear
        depth x MixerBlock -> (B, T, dim)
        norm, mean over the tokens -> (B, dim)
        head (dense) -> (B, num_classes) logits

    Args:
        image_size, patch_size, in_channels: as in `ViT` (``image_size`` divisible by
            ``patch_size``).
        dim: channel width of the tokens.
        depth: number of Mixer blocks.
        token_mlp_dim, channel_mlp_dim: hidden widths of the token- and channel-mixing MLPs.
        num_classes: outputs of the head.
        linear: ``"dense"`` or ``"diag"``; with ``"diag"`` the token- and channel-mixing
            linears are ``nn.DiagLinear`` of target ``sparsity``; the patch embedding and
            the head stay dense.
        sparsity: target sparsity of the diagonal layers.
        dropout: inside the mixing MLPs.
        dtype, device: of the parameters. rng: None, int seed or Generator.

    As `ViT`, ``forward`` computes each residual add with the layer norm after it as one
    node (`models.common.run_pre_norm_fused`), and calls the blocks one by one when a block
    or a norm has a forward hook or a ``forward`` of its own.
    """

    def __init__(self, image_size, patch_size, in_channels, dim, depth, token_mlp_dim,
                 channel_mlp_dim, num_classes, linear="dense", sparsity=0.9, dropout=0.0,
                 dtype=np.float32, device=None, rng=None):
        super().__init__()
        self.linear = check_linear(linear)
        token_mlp_dim = positive_int("token_mlp_dim", token_mlp_dim)
        channel_mlp_dim = positive_int("channel_mlp_dim", channel_mlp_dim)
        gen = _random.as_generator(rng)
        self.patch_embed = PatchEmbedding(image_size, patch_size, in_channels, dim, dtype,
                                          device, gen)
        T = self.patch_embed.num_patches
        self.blocks = nn.ModuleList(
            MixerBlock(T, dim, token_mlp_dim, channel_mlp_dim, linear, sparsity, dropout, dtype,
                       device, gen)
            for _ in range(positive_int("depth", depth)))
        self.norm = nn.LayerNorm(dim, dtype=dtype, device=device)
        self.head = nn.Linear(dim, positive_int("num_classes", num_classes), dtype=dtype,
                              device=device, rng=gen)

    def forward(self, x):
        x = self.patch_embed(x)
        if pre_norm_fusable(self.blocks, MixerBlock, self.norm):
            stages = [stage for b in self.blocks
                      for stage in ((b.ln1, b.mix_tokens), (b.ln2, b.channel_mix))]
            normed = run_pre_norm_fused(x, stages, self.norm)
        else:
            for block in self.blocks:
                x = block(x)
            normed = self.norm(x)
        return self.head(normed.mean(axis=1))

    def extra_repr(self):
        return f"linear={self.linear!r}"
