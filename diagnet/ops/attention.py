"""Attention ops: scaled dot-product attention, and the head split and merge around it.

* `scaled_dot_product_attention`: ``softmax(q k^T * scale) v`` per batch and head as one
  graph node, with an optional boolean mask and dropout on the weights. The composed
  reference below (`reference_forward`, `reference_backward`) is the readable version the
  others are tested against. On the GPU, small heads run the CUDA kernels of
  `diagnet.fused.attention_cuda` (one launch per direction); shapes beyond their maxima (by
  default 64 keys, heads of 64 features in float32 and 32 in float64) run the composed
  reference on CuPy arrays. On the CPU the default (`blas_forward`, `blas_backward`) is the
  same composition with the row softmax and its gradient in one compiled pass per row
  (`diagnet.fused.softmax`) instead of NumPy's several reductions: NumPy's batched matmul
  runs the tiny products with BLAS, which the all-numba kernels of `diagnet.fused.attention`
  (``DIAGNET_ATTENTION_KERNELS=numba``; they load two operands per multiply-add) do not
  match at a ViT's sizes. ``DIAGNET_ATTENTION_KERNELS=reference`` runs the reference.
* `qkv_split`: the output of a fused ``qkv`` projection, ``(B, N, 3*H*d)``, as ``q``, ``k``,
  ``v`` of shape ``(B, H, N, d)`` in one node, whose backward writes the three gradients
  into one buffer (instead of one zero-filled input-sized array per indexed part).
* `merge_heads`: ``(B, H, N, d) -> (B, N, H*d)``, the inverse layout, in one node.
* `qkv_attention`: the three in one node, ``(B, N, 3*H*d) -> (B, N, H*d)``, what
  `diagnet.nn.MultiHeadSelfAttention` runs. On the CPU its products read ``q``, ``k``, ``v``
  where they lie in the ``qkv`` array and write the output and the three gradients where
  they belong in the merged and the ``qkv`` layout (NumPy's matmul takes strided views and
  an ``out=`` view), so neither the split nor the merge copies anything.

Each public function follows the `Function` class that implements it.
"""

from __future__ import annotations

import math

import numpy as np

from .. import backend, checks, settings
from ..autograd import FLOAT_DTYPES, Function, Tensor
from ..backend import get_array_module as _xp  # the array module (numpy/cupy) of arrays
from ..diag import cpu_process
from .regularization import dropout_scale

__all__ = ["scaled_dot_product_attention", "qkv_split", "merge_heads", "qkv_attention"]

#: The score given to masked-out keys. Finite, not -inf: a query whose keys are all masked
#: then attends uniformly instead of producing NaN (softmax subtracts the row maximum first,
#: so exp(-1e9 - max) is exactly 0 next to any allowed key, in float32 and float64).
MASKED_SCORE = -1e9


# ----------------------------------------------------------------------------- reference

def reference_forward(q, k, v, mask, drop, scale, masked_score):
    """``(out, weights)`` of attention, composed from array ops (NumPy or CuPy).

    ``q`` ``(B, H, L, E)``, ``k`` ``(B, H, S, E)``, ``v`` ``(B, H, S, Ev)``, one float dtype;
    ``mask``: None or a bool array broadcastable to ``(B, H, L, S)``, False where a score is
    replaced by ``masked_score``; ``drop``: None or the dropout multiplier ``(B, H, L, S)``.
    ``weights = softmax(q @ k^T * scale)`` over the keys ``(B, H, L, S)`` (before dropout:
    what backward needs), ``out = (weights * drop) @ v`` ``(B, H, L, Ev)``.
    """
    xp = _xp(q)
    scores = (q @ xp.swapaxes(k, -1, -2)) * scale
    if mask is not None:
        scores = xp.where(mask, scores, masked_score)
    e = xp.exp(scores - scores.max(axis=-1, keepdims=True))
    weights = e / e.sum(axis=-1, keepdims=True)
    kept = weights if drop is None else weights * drop
    return kept @ v, weights


def reference_backward(dout, q, k, v, weights, mask, drop, scale):
    """``(dq, dk, dv)`` of `reference_forward` given ``dout`` ``(B, H, L, Ev)`` and its
    ``weights``; the other arguments as given to it."""
    xp = _xp(q)
    kept = weights if drop is None else weights * drop
    dv = xp.swapaxes(kept, -1, -2) @ dout
    dweights = dout @ xp.swapaxes(v, -1, -2)
    if drop is not None:
        dweights = dweights * drop
    # the softmax backward, row by row; a masked score is a constant (no gradient)
    dscores = weights * (dweights - (dweights * weights).sum(axis=-1, keepdims=True))
    if mask is not None:
        dscores = xp.where(mask, dscores, 0)
    dscores = dscores * scale
    return dscores @ k, xp.swapaxes(dscores, -1, -2) @ q, dv


def blas_forward(q, k, v, mask, drop, scale, masked_score, out=None):
    """`reference_forward` for NumPy arrays, with the row softmax computed in one compiled
    pass per row (`diagnet.fused.softmax.softmax`); the products stay NumPy's matmuls.

    ``q``, ``k``, ``v`` may be strided views (NumPy's matmul reads any inner matrix with a
    unit stride on one axis); ``out``: None or a ``(B, H, L, Ev)`` array (a view is fine)
    that receives the output, which is then returned.
    """
    from ..fused import softmax as rows

    scores = q @ np.swapaxes(k, -1, -2)
    S = scores.shape[-1]
    if mask is None:  # the scale inside the softmax's passes, rounded as below
        weights = rows.softmax(scores.reshape(-1, S), scale=scale).reshape(scores.shape)
    else:
        scores *= scale
        scores = np.where(mask, scores, masked_score)
        weights = rows.softmax(scores.reshape(-1, S)).reshape(scores.shape)
    kept = weights if drop is None else weights * drop
    return np.matmul(kept, v, out=out), weights


def blas_backward(dout, q, k, v, weights, mask, drop, scale, out=None):
    """`reference_backward` for NumPy arrays, with the softmax gradient computed in one
    compiled pass per row (`diagnet.fused.softmax.softmax_grad`).

    ``out``: None or three arrays (views are fine) of the shapes of ``q``, ``k``, ``v``
    that receive ``dq``, ``dk``, ``dv``, which are then returned.
    """
    from ..fused import softmax as rows

    dq_out, dk_out, dv_out = (None, None, None) if out is None else out
    kept = weights if drop is None else weights * drop
    dv = np.matmul(np.swapaxes(kept, -1, -2), dout, out=dv_out)
    dweights = dout @ np.swapaxes(v, -1, -2)
    if drop is not None:
        dweights *= drop
    S = weights.shape[-1]
    if mask is None:  # the scale inside the gradient's pass, rounded as below
        dscores = rows.softmax_grad(weights.reshape(-1, S), dweights.reshape(-1, S),
                                    scale=scale).reshape(weights.shape)
    else:
        dscores = rows.softmax_grad(weights.reshape(-1, S), dweights.reshape(-1, S))
        dscores = np.where(mask, dscores.reshape(weights.shape), 0)
        dscores *= scale
    return (np.matmul(dscores, k, out=dq_out),
            np.matmul(np.swapaxes(dscores, -1, -2), q, out=dk_out), dv)


#: The environment variable that picks the implementation: ``blas`` (the default),
#: ``reference`` or ``numba``; read into `diagnet.settings.attention_kernels` at import
#: (``settings.set_attention_kernels`` changes it). ``reference`` runs the composed version
#: on either device; otherwise CuPy arrays run the CUDA kernels where they fit.
ENV_KERNELS = settings.ENV_ATTENTION_KERNELS


def _kernels(q, k, v):
    """``(forward, backward)`` for the arrays ``q``, ``k``, ``v``: on the CPU the
    implementation `diagnet.settings.attention_kernels` names (default ``blas``); on the GPU
    the CUDA kernels where the shapes fit them, else (or when the setting is ``reference``)
    the composed reference."""
    choice = settings.attention_kernels
    if choice == "reference":
        return reference_forward, reference_backward
    if _xp(q) is not np:
        from ..fused import attention_cuda as gpu

        if gpu.fits(q.shape, k.shape, v.shape, q.dtype):
            return gpu.forward, gpu.backward
        return reference_forward, reference_backward
    cpu_process.configure_once()  # both CPU versions run numba kernels beside BLAS
    if choice == "numba":
        from ..fused import attention as cpu

        return cpu.forward, cpu.backward
    return blas_forward, blas_backward


# ----------------------------------------------------------------------------- attention

class ScaledDotProductAttention(Function):
    """``softmax(q k^T * scale) v``; inputs ``(q, k, v)``. The mask and the dropout
    multiplier are constants given to the constructor, already checked and on the device
    of ``q``. Keeps ``q``, ``k``, ``v`` and the weights for backward."""

    def __init__(self, mask, drop, scale):
        self.mask = mask
        self.drop = drop
        self.scale = scale

    def forward(self, q, k, v):
        # backward runs the partner of the forward that made the weights
        forward, self.kernel_backward = _kernels(q, k, v)
        out, weights = forward(q, k, v, self.mask, self.drop, self.scale, MASKED_SCORE)
        self.save(q, k, v, weights)
        return out

    def backward(self, gy):
        return self.kernel_backward(gy, *self.saved, self.mask, self.drop, self.scale)


def scaled_dot_product_attention(q, k, v, mask=None, dropout_p=0.0, rng=None, scale=None):
    """``softmax(q @ k^T * scale) @ v`` over the keys, per batch and head, as one node.

    Args:
        q: Tensor ``(B, H, L, E)``: ``L`` queries of ``E`` features per batch and head.
        k: Tensor ``(B, H, S, E)``: ``S >= 1`` keys.
        v: Tensor ``(B, H, S, Ev)``: one value per key. ``q``, ``k``, ``v``: float32 or
            float64, one dtype, one device.
        mask: None, or a boolean array or Tensor broadcastable to ``(B, H, L, S)`` (e.g.
            ``(L, S)``, or ``(B, 1, 1, S)`` for key padding): True where query ``i`` may
            attend to key ``j``, PyTorch's convention for a boolean ``attn_mask``. A query
            with no allowed key attends **uniformly** to all ``S`` keys (its output is the
            mean of ``v``; PyTorch gives NaN there), and passes no gradient to ``q`` or
            ``k``. A NumPy mask is moved to the device of ``q``.
        dropout_p: probability in ``[0, 1)`` of zeroing each attention weight (the kept
            ones are scaled by ``1 / (1 - p)``), applied whenever it is not 0: pass 0.0 in
            evaluation (a module passes ``p if self.training else 0.0``). The mask is drawn
            as `dropout` draws it, on the device of ``q``, before the kernels run, so every
            implementation applies the same mask.
        rng: the generator of the dropout mask: None (the default generator of
            `diagnet.random`), an int seed or a ``numpy.random.Generator``.
        scale: the factor of the scores; None for ``1 / sqrt(E)``.

    Returns:
        Tensor ``(B, H, L, Ev)`` of the dtype of ``q``. Gradients flow to ``q``, ``k`` and
        ``v``; backward keeps the weights ``(B, H, L, S)`` (and the dropout multiplier).

    Raises:
        TypeError: ``q``, ``k`` or ``v`` is not a float Tensor, their dtypes differ, the
            mask is not boolean, or ``dropout_p``/``scale`` is not a real number.
        ValueError: the shapes do not fit, the mask does not broadcast, ``dropout_p`` is
            outside ``[0, 1)``, ``scale`` is not finite, or the tensors or mask are on
            different devices.
    """
    B, H, L, S, E = _check_qkv(q, k, v)
    mask, drop, scale = _constants(q.data, (B, H, L, S), E, mask, dropout_p, rng, scale)
    return ScaledDotProductAttention(mask, drop, scale)(q, k, v)


def _constants(data, shape, E, mask, dropout_p, rng, scale, op="scaled_dot_product_attention",
               name="q"):
    """``(mask, drop, scale)`` for attention scores of ``shape`` = (B, H, L, S) over
    ``data`` (the query array, named ``name`` in errors), after checking the arguments:
    the mask on ``data``'s device, the dropout multiplier drawn (None without dropout), the
    scale (``1 / sqrt(E)`` by default)."""
    scale = 1.0 / math.sqrt(E) if scale is None else checks.real("scale", scale)
    dropout_p = checks.unit_interval("dropout_p", dropout_p, include_one=False)
    xp = _xp(data)
    mask = None if mask is None else _check_mask(mask, shape, xp, op, name)
    drop = None
    if dropout_p > 0.0:
        drop = dropout_scale(shape, dropout_p, xp, data.dtype, rng)
    return mask, drop, scale


def _check_qkv(q, k, v):
    """``(B, H, L, S, E)`` of ``q``, ``k``, ``v`` after checking their types and shapes."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"scaled_dot_product_attention: {name} must be a Tensor; got "
                            f"{type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"scaled_dot_product_attention: {name} must be float32 or "
                            f"float64; got dtype {t.dtype}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"scaled_dot_product_attention: q, k and v must have one dtype; got "
                        f"{q.dtype}, {k.dtype} and {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"scaled_dot_product_attention: q, k and v must be on one device; "
                         f"got {q.device}, {k.device} and {v.device}")
    if q.ndim != 4:
        raise ValueError(f"scaled_dot_product_attention: q must have shape (B, H, L, E); got "
                         f"{q.shape}")
    B, H, L, E = q.shape
    if k.ndim != 4 or k.shape[:2] != (B, H) or k.shape[3] != E or k.shape[2] < 1:
        raise ValueError(f"scaled_dot_product_attention: k must have shape (B, H, S, E) = "
                         f"({B}, {H}, S, {E}) with S >= 1 keys; got {k.shape}")
    S = k.shape[2]
    if v.ndim != 4 or v.shape[:3] != (B, H, S):
        raise ValueError(f"scaled_dot_product_attention: v must have shape (B, H, S, Ev) = "
                         f"({B}, {H}, {S}, Ev); got {v.shape}")
    return B, H, L, S, E


def _check_mask(mask, shape, xp, op="scaled_dot_product_attention", data="q"):
    """``mask`` as a bool array on ``xp``'s device, after checking it broadcasts to
    ``shape`` = (B, H, L, S); errors name ``op`` and its array argument ``data``."""
    m = mask.data if isinstance(mask, Tensor) else mask
    if getattr(m, "dtype", None) != np.dtype(bool):
        raise TypeError(f"{op}: mask must be a boolean array or "
                        f"Tensor; got {getattr(m, 'dtype', type(m).__name__)}")
    try:
        fits = np.broadcast_shapes(tuple(m.shape), shape) == shape
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"{op}: mask of shape {tuple(m.shape)} does "
                         f"not broadcast to the attention scores' shape (B, H, L, S) = {shape}")
    if xp is np and backend.device_of(m) != "cpu":
        raise ValueError(f"{op}: the mask is on cuda but {data} is on cpu; "
                         "move it with .to('cpu') first")
    return xp.asarray(m)


# ----------------------------------------------------------------------------- heads

class QKVSplit(Function):
    """``(B, N, 3*H*d) -> q, k, v``, each ``(B, H, N, d)`` and C-contiguous.

    The features are laid out ``[q | k | v]``, each part split into ``H`` heads of ``d``
    consecutive features (the layout of a fused ``qkv`` projection). Forward is one copy;
    backward writes the three gradients into one ``(B, N, 3*H*d)`` buffer (the engine
    passes zeros for an output nobody used).
    """

    def __init__(self, heads):
        self.heads = heads

    def forward(self, x):
        B, N, F = x.shape
        H = self.heads
        parts = x.reshape(B, N, 3, H, F // (3 * H)).transpose(2, 0, 3, 1, 4)
        qkv = _xp(x).ascontiguousarray(parts)   # (3, B, H, N, d): q, k, v contiguous
        return qkv[0], qkv[1], qkv[2]

    def backward(self, gq, gk, gv):
        B, H, N, d = gq.shape
        gx = _xp(gq).empty((B, N, 3, H, d), dtype=gq.dtype)
        parts = gx.transpose(2, 0, 3, 1, 4)   # a view: assigning writes gx
        parts[0] = gq
        parts[1] = gk
        parts[2] = gv
        return gx.reshape(B, N, 3 * H * d)


def qkv_split(x, heads):
    """Split a fused ``qkv`` projection ``(B, N, 3*E)`` into ``q``, ``k``, ``v``, each
    ``(B, heads, N, E // heads)``.

    Feature ``f`` of part ``i`` (0: q, 1: k, 2: v) is ``x[..., i*E + f]``, and head ``h``
    takes features ``h*d .. (h+1)*d - 1``, ``d = E // heads``: the same as
    ``x.reshape(B, N, 3, heads, d).transpose(2, 0, 3, 1, 4)`` indexed by part, in one node.

    Raises:
        TypeError: ``x`` is not a Tensor, or ``heads`` not an int.
        ValueError: ``x`` is not 3-D with a last dim divisible by ``3 * heads``, or
            ``heads < 1``.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"qkv_split: x must be a Tensor; got {type(x).__name__}")
    heads = checks.integer("heads", heads, 1)
    if x.ndim != 3 or x.shape[2] % (3 * heads):
        raise ValueError(f"qkv_split: x must have shape (B, N, 3 * heads * head_dim) with "
                         f"heads={heads}, a last dim divisible by {3 * heads}; got {x.shape}")
    return QKVSplit(int(heads))(x)


class MergeHeads(Function):
    """``(B, H, N, d) -> (B, N, H*d)``, C-contiguous; backward is a view of the gradient."""

    def forward(self, x):
        self.in_shape = B, H, N, d = x.shape
        return _xp(x).ascontiguousarray(x.transpose(0, 2, 1, 3)).reshape(B, N, H * d)

    def backward(self, gy):
        B, H, N, d = self.in_shape
        return gy.reshape(B, N, H, d).transpose(0, 2, 1, 3)


def merge_heads(x):
    """Concatenate the heads of ``x`` ``(B, H, N, d)`` along the features: ``(B, N, H*d)``,
    head ``h`` in features ``h*d .. (h+1)*d - 1`` (the inverse layout of `qkv_split`'s parts).

    Raises:
        TypeError: ``x`` is not a Tensor.
        ValueError: ``x`` is not 4-D.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"merge_heads: x must be a Tensor; got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"merge_heads: x must have shape (B, H, N, d); got {x.shape}")
    return MergeHeads()(x)


# ----------------------------------------------------------------------------- fused

class QKVAttention(Function):
    """``merge_heads(scaled_dot_product_attention(*qkv_split(x, heads)))`` as one node:
    ``(B, N, 3*H*d) -> (B, N, H*d)``. The mask and the dropout multiplier are constants given
    to the constructor, as for `ScaledDotProductAttention`.

    With the CPU's default kernels (``blas``) nothing is copied: the products read ``q``,
    ``k``, ``v`` as strided views of ``x`` and write the output straight into the merged
    layout, and backward writes ``dq``, ``dk``, ``dv`` straight into one ``x``-shaped
    buffer. Otherwise (the GPU, or another kernel setting) ``q``, ``k``, ``v`` are copied
    into one contiguous array for the kernels, as `qkv_split` does, and the output and the
    gradients are moved into their layouts afterwards.
    """

    def __init__(self, heads, mask, drop, scale):
        self.heads = heads
        self.mask = mask
        self.drop = drop
        self.scale = scale

    def forward(self, x):
        B, N, F = x.shape
        H = self.heads
        d = F // (3 * H)
        parts = x.reshape(B, N, 3, H, d).transpose(2, 0, 3, 1, 4)  # (3, B, H, N, d) view
        forward, self.kernel_backward = _kernels(parts[0], parts[1], parts[2])
        xp = _xp(x)
        merged = xp.empty((B, N, H, d), dtype=x.dtype)
        heads_view = merged.transpose(0, 2, 1, 3)  # (B, H, N, d): writing it writes merged
        self.in_place = forward is blas_forward
        if self.in_place:
            q, k, v = parts[0], parts[1], parts[2]
            _, weights = blas_forward(q, k, v, self.mask, self.drop, self.scale, MASKED_SCORE,
                                      out=heads_view)
        else:
            q, k, v = xp.ascontiguousarray(parts)
            out, weights = forward(q, k, v, self.mask, self.drop, self.scale, MASKED_SCORE)
            heads_view[...] = out
        self.save(q, k, v, weights)
        return merged.reshape(B, N, H * d)

    def backward(self, gy):
        q, k, v, weights = self.saved
        B, H, N, d = q.shape
        xp = _xp(gy)
        dout = gy.reshape(B, N, H, d).transpose(0, 2, 1, 3)  # (B, H, N, d) view
        gx = xp.empty((B, N, 3, H, d), dtype=gy.dtype)
        gparts = gx.transpose(2, 0, 3, 1, 4)  # (3, B, H, N, d): writing it writes gx
        if self.in_place:
            blas_backward(dout, q, k, v, weights, self.mask, self.drop, self.scale,
                          out=(gparts[0], gparts[1], gparts[2]))
        else:
            grads = self.kernel_backward(xp.ascontiguousarray(dout), q, k, v, weights,
                                         self.mask, self.drop, self.scale)
            for i in range(3):
                gparts[i] = grads[i]
        return gx.reshape(B, N, 3 * H * d)


def qkv_attention(x, heads, mask=None, dropout_p=0.0, rng=None, scale=None):
    """Multi-head attention over a fused ``qkv`` projection, as one node:
    ``merge_heads(scaled_dot_product_attention(*qkv_split(x, heads), mask, dropout_p, rng,
    scale))``.

    Args:
        x: Tensor ``(B, N, 3*E)``, float32 or float64: ``q``, ``k``, ``v`` laid out as
            `qkv_split` reads them (``E = heads * d``).
        heads: number of heads ``H >= 1``; ``3 * heads`` must divide the last dim.
        mask, dropout_p, rng, scale: as for `scaled_dot_product_attention`, with ``L = S =
            N`` (the mask broadcasts to ``(B, H, N, N)``; ``scale`` defaults to
            ``1 / sqrt(d)``). The dropout mask is drawn as `scaled_dot_product_attention`
            draws it, so the two give the same values for the same generator state.

    Returns:
        Tensor ``(B, N, E)`` of ``x``'s dtype: head ``h`` of query ``i`` in features
        ``h*d .. (h+1)*d - 1``, as `merge_heads` lays them out. Backward gives one
        ``(B, N, 3*E)`` gradient and keeps the attention weights ``(B, H, N, N)``.

    Raises:
        TypeError: ``x`` is not a float Tensor, ``heads`` not an int, the mask not boolean,
            or ``dropout_p``/``scale`` not a real number.
        ValueError: ``x`` is not ``(B, N, 3 * heads * d)`` with ``N >= 1``, ``heads < 1``,
            the mask does not broadcast, ``dropout_p`` is outside ``[0, 1)``, ``scale`` is
            not finite, or the mask is on another device.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"qkv_attention: x must be a Tensor; got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"qkv_attention: x must be float32 or float64; got dtype {x.dtype}")
    heads = checks.integer("heads", heads, 1)
    if x.ndim != 3 or x.shape[2] % (3 * heads):
        raise ValueError(f"qkv_attention: x must have shape (B, N, 3 * heads * head_dim) with "
                         f"heads={heads}, a last dim divisible by {3 * heads}; got {x.shape}")
    B, N, F = x.shape
    if N < 1:
        raise ValueError(f"qkv_attention: x must hold at least one token (N >= 1); got "
                         f"{x.shape}")
    mask, drop, scale = _constants(x.data, (B, int(heads), N, N), F // (3 * heads), mask,
                                   dropout_p, rng, scale, "qkv_attention", "x")
    return QKVAttention(int(heads), mask, drop, scale)(x)
