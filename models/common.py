"""Pieces shared by the models: argument checks, `PatchEmbedding`, `FeedForward` and the
pre-norm residual stream with each add fused into the layer norm after it.

The dense-or-diagonal switch itself is `diagnet.nn.linear.make_linear` (one copy, used
by attention and by every model).
"""

from __future__ import annotations

import numpy as np

from diagnet import Tensor, nn
from diagnet import functional as F
from diagnet.checks import positive_int, probability
from diagnet.nn.linear import LINEAR_KINDS, make_linear

__all__ = ["positive_int", "probability", "check_linear", "PatchEmbedding", "FeedForward",
           "make_linear", "pre_norm_fusable", "run_pre_norm_fused"]


def check_linear(linear):
    """Reject an unknown ``linear=`` choice early, before any layer is built."""
    if linear not in LINEAR_KINDS:
        raise ValueError(f"linear must be one of {LINEAR_KINDS}; got {linear!r}")
    return linear


class PatchEmbedding(nn.Module):
    """Cut images into non-overlapping ``p x p`` patches and embed each with a dense layer.

    ``(B, C, H, W) -> (B, num_patches, dim)`` with ``num_patches = (H/p) * (W/p)`` in
    row-major patch order; each patch is flattened channel-first, ``(C, p, p) -> C*p*p``,
    then ``proj`` (``nn.Linear(C*p*p, dim)``, always dense) maps it to ``dim``. No
    convolution: a reshape and a transpose make the patches. Also accepted: ``(B, H, W)``
    when ``in_channels == 1``, and flat images ``(B, C*H*W)``.
    """

    def __init__(self, image_size, patch_size, in_channels, dim, dtype=np.float32, device=None,
                 rng=None):
        super().__init__()
        size = (image_size, image_size) if not isinstance(image_size, (tuple, list)) \
            else tuple(image_size)
        if len(size) != 2:
            raise ValueError(f"image_size must be an int or (height, width); got {image_size!r}")
        self.image_size = tuple(positive_int("image_size", s) for s in size)
        self.patch_size = positive_int("patch_size", patch_size)
        self.in_channels = positive_int("in_channels", in_channels)
        for side in self.image_size:
            if side % self.patch_size:
                raise ValueError(f"image_size {image_size!r} must be divisible by patch_size "
                                 f"{patch_size}")
        self.grid = tuple(side // self.patch_size for side in self.image_size)
        self.num_patches = self.grid[0] * self.grid[1]
        patch_dim = self.in_channels * self.patch_size ** 2
        self.proj = nn.Linear(patch_dim, positive_int("dim", dim), dtype=dtype, device=device,
                              rng=rng)

    def images(self, x):
        """``x`` as ``(B, C, H, W)``, from any of the accepted input shapes."""
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a Tensor of images; got {type(x).__name__}")
        C, (H, W) = self.in_channels, self.image_size
        if x.ndim == 4 and x.shape[1:] == (C, H, W):
            return x
        if (x.ndim == 3 and C == 1 and x.shape[1:] == (H, W)) or \
                (x.ndim == 2 and x.shape[1] == C * H * W):
            return x.reshape(x.shape[0], C, H, W)
        accepted = f"(B, {C}, {H}, {W})" + (f", (B, {H}, {W})" if C == 1 else "") + \
            f" or (B, {C * H * W})"
        raise ValueError(f"expected images of shape {accepted}; got {x.shape}")

    def forward(self, x):
        x = self.images(x)
        B, C, p = x.shape[0], self.in_channels, self.patch_size
        (gh, gw) = self.grid
        # (B, C, gh, p, gw, p) -> (B, gh, gw, C, p, p): patch index first, then its pixels
        patches = x.reshape(B, C, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5)
        return self.proj(patches.reshape(B, gh * gw, C * p * p))

    def extra_repr(self):
        return (f"image_size={self.image_size}, patch_size={self.patch_size}, "
                f"num_patches={self.num_patches}")


class FeedForward(nn.Module):
    """Two linear layers with a GELU between: ``fc2(dropout(gelu(fc1(x))))``, then dropout.

    ``(..., dim) -> (..., dim)`` through ``hidden`` features; ``fc1`` and ``fc2`` are dense
    or diagonal by ``linear`` (see `make_linear`), or whatever `diagnet.dst.sparsify` puts in
    their place. The transformer MLP of `ViT` and the token- and channel-mixing MLPs of
    `MLPMixer`. ``fc1`` runs without its bias, which `F.bias_gelu` adds in the activation's
    pass (one pass over the hidden activations each way instead of two).
    """

    def __init__(self, dim, hidden, linear="dense", sparsity=0.9, dropout=0.0, dtype=np.float32,
                 device=None, rng=None):
        super().__init__()
        self.dropout = probability("dropout", dropout)
        kw = dict(linear=linear, sparsity=sparsity, dtype=dtype, device=device, rng=rng)
        self.fc1 = make_linear(positive_int("dim", dim), positive_int("hidden", hidden), **kw)
        self.fc2 = make_linear(hidden, dim, **kw)

    def forward(self, x):
        h = F.bias_gelu(self.fc1(x, add_bias=False), self.fc1.bias)
        h = F.dropout(h, self.dropout, self.training)
        return F.dropout(self.fc2(h), self.dropout, self.training)

    def extra_repr(self):
        return f"dropout={self.dropout}" if self.dropout else ""


def pre_norm_fusable(blocks, block_type, final_norm):
    """Whether `run_pre_norm_fused` computes what calling ``blocks`` and then ``final_norm``
    would: every block an unhooked ``block_type`` whose ``forward`` is that class's, and its
    ``ln1``, ``ln2`` and ``final_norm`` unhooked `nn.LayerNorm` with their own ``forward``."""
    for block in blocks:
        if type(block).forward is not block_type.forward or block._forward_hooks:
            return False
    norms = [final_norm] + [ln for b in blocks for ln in (b.ln1, b.ln2)]
    return all(isinstance(ln, nn.LayerNorm) and type(ln).forward is nn.LayerNorm.forward
               and not ln._forward_hooks for ln in norms)


def run_pre_norm_fused(x, stages, final_norm):
    """``final_norm`` of the residual stream after pre-norm ``stages``, each residual add
    computed with the layer norm after it as one `diagnet.functional.add_layer_norm` node.

    ``stages``: ``[(norm, branch), ...]`` in order, each an `nn.LayerNorm` and a callable:
    ``x = x + branch(norm(x))`` per stage, then ``final_norm(x)`` is returned. The same
    values as those steps taken one by one, without a pass over the residual stream for each
    add, nor one for adding its two gradients in the backward.
    """
    normed = stages[0][0](x)
    for i, (_, branch) in enumerate(stages):
        following = stages[i + 1][0] if i + 1 < len(stages) else final_norm
        x, normed = F.add_layer_norm(x, branch(normed), following.normalized_shape,
                                     following.weight, following.bias, following.eps)
    return normed
