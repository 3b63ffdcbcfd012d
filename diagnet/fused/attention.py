"""Compiled CPU kernels (numba) for scaled dot-product attention with small heads.

The same two functions, arguments and results as the composed reference in
`diagnet.ops.attention` (``reference_forward`` and ``reference_backward``, which state the
math); the dispatch there picks this module for NumPy arrays when
``DIAGNET_ATTENTION_KERNELS=numba``. Shapes: ``q`` ``(B, H, L, E)``, ``k`` ``(B, H, S, E)``,
``v`` ``(B, H, S, Ev)``, the weights ``(B, H, L, S)``.

It is not the default: at a ViT's sizes it measured about as fast as the old composition of
diagnet ops and slower than the composed reference in one node, whose batched matmuls reuse
each loaded operand across several multiply-adds (BLAS register blocking) where these loops
load two operands per multiply-add. Blocking the loops below over several outputs is the
next step.

How the loops are arranged, and why
-----------------------------------
**Pairs in the SIMD lanes.** At a ViT's sizes (17 tokens, heads of 16 features) every
product of attention is tiny: NumPy's batched matmul pays per-matrix bookkeeping for each
of the ``B*H`` little products, and a loop over 16 features is too short for LLVM to
vectorise (it wants 32 or more iterations). But all ``B*H`` (batch, head) pairs do the same
arithmetic. So the kernels work on a *lanes* layout with the pair index last:
``q[b, h, i, c]`` becomes ``ql[i, c, b*H + h]``. Every inner loop then runs over a
contiguous range of pairs (hundreds), and each step of the math, one for all pairs, is an
element-wise update of contiguous vectors, which LLVM compiles to SIMD code. Converting
``q``, ``k``, ``v`` (one copy each) costs far less than the products; the outputs are
returned as views of the lanes arrays (so ``weights`` goes back to backward without a copy).

**Four terms per pass.** A reduction such as ``scores[i, j] = sum_c q[i, c] k[j, c]`` adds
four terms per pass over the lanes, so the output vector is loaded and stored once per four
multiply-adds (as the diagonal kernels of `diagnet.diag.cpu` take several diagonals per
pass).

**The exponential runs in NumPy**, between two compiled loops: numba calls the scalar
``exp`` of the C library one element at a time, NumPy's is vectorised (figure in
``docs/benchmarks.md``). So the forward is: scores, mask and row maximum (compiled),
``exp`` (NumPy), normalisation and ``weights @ v`` (compiled). The backward has no
exponential: one compiled pass over the queries for ``dq`` and the ``dS`` rows, one over the
keys for ``dk`` and ``dv``.

**Threads** take contiguous ranges of lanes; only the thread of a lane writes its outputs
(no atomics, no reduction). A call with little work (``B*H*L*S*max(E, Ev)`` multiply-adds
below `_SERIAL_WORK`, the threshold of `diagnet.diag.cpu`) runs on the calling thread.

**Indexing** is unsigned (``_u``), for the reason given in `diagnet.diag.cpu`: with signed
indices numba's negative-index check keeps LLVM from vectorising (several times slower).

Numerics: ``fastmath`` limited to ``contract`` and ``reassoc``, as in `diagnet.diag.cpu`;
sums run in the arrays' dtype, in another order than NumPy's matmul, so the results agree
with the reference to rounding; NaN propagates as there. No bounds checks: the public
function (`diagnet.ops.attention.scaled_dot_product_attention`) validates the shapes.
Compiled on first use per dtype and cached on disk (``cache=True``).
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["forward", "backward"]

_FASTMATH = {"contract", "reassoc"}
_jit = numba.njit(cache=True, fastmath=_FASTMATH, nogil=True)
_pjit = numba.njit(cache=True, fastmath=_FASTMATH, nogil=True, parallel=True)

# Below this many multiply-adds a call runs on the calling thread (as in diagnet.diag.cpu).
_SERIAL_WORK = 1 << 16
# Threads take lanes in multiples of this (a 64-byte cache line of float32).
_LANE_BLOCK = 16

_u = np.uint64  # unsigned index (see "Indexing" above)


# --------------------------------------------------------------------------------------
# Products over the lanes ``a .. b-1``, four terms per pass
# --------------------------------------------------------------------------------------


@_jit
def _dot(out, o0, o1, x, x0, y, y0, a, b):
    """``out[o0, o1, t] = sum_c x[x0, c, t] * y[y0, c, t]`` (``c < x.shape[1]``)."""
    width = _u(x.shape[1])
    for t in range(a, b):
        out[o0, o1, t] = 0
    c = _u(0)
    while c + _u(4) <= width:
        c1, c2, c3 = c + _u(1), c + _u(2), c + _u(3)
        for t in range(a, b):
            out[o0, o1, t] += (x[x0, c, t] * y[y0, c, t] + x[x0, c1, t] * y[y0, c1, t]) + (
                x[x0, c2, t] * y[y0, c2, t] + x[x0, c3, t] * y[y0, c3, t])
        c += _u(4)
    while c < width:
        for t in range(a, b):
            out[o0, o1, t] += x[x0, c, t] * y[y0, c, t]
        c += _u(1)


@_jit
def _mix(out, o0, x, x0, y, a, b):
    """``out[o0, c, t] = sum_r x[x0, r, t] * y[r, c, t]`` for every ``c < y.shape[1]``."""
    rows, width = _u(y.shape[0]), _u(y.shape[1])
    for c in range(width):
        for t in range(a, b):
            out[o0, c, t] = 0
        r = _u(0)
        while r + _u(4) <= rows:
            r1, r2, r3 = r + _u(1), r + _u(2), r + _u(3)
            for t in range(a, b):
                out[o0, c, t] += (x[x0, r, t] * y[r, c, t] + x[x0, r1, t] * y[r1, c, t]) + (
                    x[x0, r2, t] * y[r2, c, t] + x[x0, r3, t] * y[r3, c, t])
            r += _u(4)
        while r < rows:
            for t in range(a, b):
                out[o0, c, t] += x[x0, r, t] * y[r, c, t]
            r += _u(1)


@_jit
def _mix_transposed(out, x, y, a, b):
    """``out[j, c, t] = sum_r x[r, j, t] * y[r, c, t]`` for every ``j`` and ``c``."""
    rows, width = _u(y.shape[0]), _u(y.shape[1])
    for j in range(_u(x.shape[1])):
        for c in range(width):
            for t in range(a, b):
                out[j, c, t] = 0
            r = _u(0)
            while r + _u(4) <= rows:
                r1, r2, r3 = r + _u(1), r + _u(2), r + _u(3)
                for t in range(a, b):
                    out[j, c, t] += (x[r, j, t] * y[r, c, t] + x[r1, j, t] * y[r1, c, t]) + (
                        x[r2, j, t] * y[r2, c, t] + x[r3, j, t] * y[r3, c, t])
                r += _u(4)
            while r < rows:
                for t in range(a, b):
                    out[j, c, t] += x[r, j, t] * y[r, c, t]
                r += _u(1)


# --------------------------------------------------------------------------------------
# Forward: scores (compiled), exp (NumPy), normalisation and weights @ v (compiled)
# --------------------------------------------------------------------------------------


@_jit
def _scores_block(w, q, k, mask, scale, masked_score, a, b):
    """``w[i, j] = q_i . k_j * scale`` (``masked_score`` where ``mask`` is False), minus the
    row maximum over ``j``, for the lanes ``a .. b-1``."""
    has_mask = mask.size > 0
    top = np.empty(w.shape[2], dtype=w.dtype)
    for i in range(_u(q.shape[0])):
        for j in range(_u(k.shape[0])):
            _dot(w, i, j, q, i, k, j, a, b)
            for t in range(a, b):
                x = w[i, j, t] * scale
                if has_mask and not mask[i, j, t]:
                    x = masked_score
                w[i, j, t] = x
                # (x > top is False for NaN: a NaN score still reaches every weight of
                # its row through the sum of the exponentials)
                top[t] = x if j == 0 or x > top[t] else top[t]
        for j in range(_u(k.shape[0])):
            for t in range(a, b):
                w[i, j, t] -= top[t]


@_jit
def _combine_block(out, w, v, drop, a, b):
    """``w[i, j] /= sum_j w[i, j]`` (``w`` holds the exponentials), then ``out[i] =
    sum_j w[i, j] drop[i, j] v[j]``, for the lanes ``a .. b-1``."""
    L, S = _u(w.shape[0]), _u(w.shape[1])
    has_drop = drop.size > 0
    total = np.empty(w.shape[2], dtype=w.dtype)
    kept = np.empty((1, w.shape[1], w.shape[2]), dtype=w.dtype)  # one row of w * drop
    for i in range(L):
        for t in range(a, b):
            total[t] = 0
        for j in range(S):
            for t in range(a, b):
                total[t] += w[i, j, t]
        for j in range(S):
            for t in range(a, b):
                w[i, j, t] /= total[t]
        if has_drop:
            for j in range(S):
                for t in range(a, b):
                    kept[0, j, t] = w[i, j, t] * drop[i, j, t]
            _mix(out, i, kept, _u(0), v, a, b)
        else:
            _mix(out, i, w, i, v, a, b)


@_pjit
def _scores_parallel(w, q, k, mask, scale, masked_score, ntasks):
    """`_scores_block` over all lanes in ``ntasks`` contiguous ranges."""
    for task in numba.prange(ntasks):
        a, b = _lane_range(w.shape[2], task, ntasks)
        _scores_block(w, q, k, mask, scale, masked_score, a, b)


@_pjit
def _combine_parallel(out, w, v, drop, ntasks):
    """`_combine_block` over all lanes in ``ntasks`` contiguous ranges."""
    for task in numba.prange(ntasks):
        a, b = _lane_range(w.shape[2], task, ntasks)
        _combine_block(out, w, v, drop, a, b)


# --------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------


@_jit
def _backward_block(dq, dk, dv, ds, dout, q, k, v, w, mask, drop, scale, a, b):
    """The gradients for the lanes ``a .. b-1``; ``ds`` is ``(L, S, lanes)`` scratch.

    Per query ``i``: ``dP_ij = (dout_i . v_j) drop_ij``, ``dS_ij = scale P_ij (dP_ij -
    sum_j' dP_ij' P_ij')`` (0 where masked), ``dq_i = sum_j dS_ij k_j``. Then over the
    keys: ``dk_j = sum_i dS_ij q_i`` and ``dv_j = sum_i P_ij drop_ij dout_i``.
    """
    L, S = _u(w.shape[0]), _u(w.shape[1])
    has_mask, has_drop = mask.size > 0, drop.size > 0
    zero = scale - scale  # 0 in the arrays' dtype (scale is finite)
    dot = np.empty(w.shape[2], dtype=w.dtype)
    for i in range(L):
        for j in range(S):
            _dot(ds, i, j, dout, i, v, j, a, b)
        for t in range(a, b):
            dot[t] = 0
        for j in range(S):
            for t in range(a, b):
                dp = ds[i, j, t] * drop[i, j, t] if has_drop else ds[i, j, t]
                ds[i, j, t] = dp
                dot[t] += dp * w[i, j, t]
        for j in range(S):
            for t in range(a, b):
                g = scale * (w[i, j, t] * (ds[i, j, t] - dot[t]))
                if has_mask and not mask[i, j, t]:
                    g = zero  # a masked score is a constant: no gradient to q or k
                ds[i, j, t] = g
        _mix(dq, i, ds, i, k, a, b)
    _mix_transposed(dk, ds, q, a, b)
    if has_drop:
        for i in range(L):  # ds is free now: reuse it for the kept weights
            for j in range(S):
                for t in range(a, b):
                    ds[i, j, t] = w[i, j, t] * drop[i, j, t]
        _mix_transposed(dv, ds, dout, a, b)
    else:
        _mix_transposed(dv, w, dout, a, b)


@_pjit
def _backward_parallel(dq, dk, dv, ds, dout, q, k, v, w, mask, drop, scale, ntasks):
    """`_backward_block` over all lanes in ``ntasks`` contiguous ranges."""
    for task in numba.prange(ntasks):
        a, b = _lane_range(w.shape[2], task, ntasks)
        _backward_block(dq, dk, dv, ds, dout, q, k, v, w, mask, drop, scale, a, b)


@_jit
def _lane_range(n, task, ntasks):
    """Lanes ``(a, b)`` of ``task`` out of ``ntasks``: whole blocks of `_LANE_BLOCK`."""
    blocks = (n + _LANE_BLOCK - 1) // _LANE_BLOCK
    a = min(n, _LANE_BLOCK * (blocks * task // ntasks))
    b = min(n, _LANE_BLOCK * (blocks * (task + 1) // ntasks))
    return _u(a), _u(b)


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def forward(q, k, v, mask, drop, scale, masked_score):
    """``(out, weights)``: ``out = (weights * drop) @ v``, ``weights = softmax(q @ k^T * scale)``
    over the keys, with ``masked_score`` for the scores where ``mask`` is False.

    ``q`` ``(B, H, L, E)``, ``k`` ``(B, H, S, E)``, ``v`` ``(B, H, S, Ev)``, one float dtype;
    ``mask``: None or a bool array broadcastable to ``(B, H, L, S)``; ``drop``: None or the
    dropout multiplier ``(B, H, L, S)`` of the same dtype. Returns ``out`` ``(B, H, L, Ev)``
    and ``weights`` ``(B, H, L, S)`` (before dropout, as backward needs them), both views
    of lanes arrays.
    """
    B, H, L, E = q.shape
    S, Ev = k.shape[2], v.shape[3]
    dtype = q.dtype
    w = np.empty((L, S, B * H), dtype=dtype)
    out = np.empty((L, Ev, B * H), dtype=dtype)
    mask_l, drop_l = _mask_lanes(mask, (B, H, L, S)), _drop_lanes(drop, dtype)
    scale, masked_score = dtype.type(scale), dtype.type(masked_score)
    ntasks = _tasks(B * H, L, S, max(E, Ev))
    if ntasks == 1:
        _scores_block(w, _lanes(q), _lanes(k), mask_l, scale, masked_score, _u(0), _u(B * H))
        np.exp(w, out=w)
        _combine_block(out, w, _lanes(v), drop_l, _u(0), _u(B * H))
    else:
        _scores_parallel(w, _lanes(q), _lanes(k), mask_l, scale, masked_score, ntasks)
        np.exp(w, out=w)
        _combine_parallel(out, w, _lanes(v), drop_l, ntasks)
    return _unlanes(out, B, H), _unlanes(w, B, H)


def backward(dout, q, k, v, weights, mask, drop, scale):
    """``(dq, dk, dv)``, the gradients of `forward`'s ``out`` given ``dout`` ``(B, H, L, Ev)``
    (views of lanes arrays).

    ``weights`` are those `forward` returned; the other arguments as given to `forward`.
    """
    B, H, L, E = q.shape
    S, Ev = k.shape[2], v.shape[3]
    dtype = q.dtype
    dq = np.empty((L, E, B * H), dtype=dtype)
    dk = np.empty((S, E, B * H), dtype=dtype)
    dv = np.empty((S, Ev, B * H), dtype=dtype)
    ds = np.empty((L, S, B * H), dtype=dtype)
    args = (dq, dk, dv, ds, _lanes(dout), _lanes(q), _lanes(k), _lanes(v), _lanes(weights),
            _mask_lanes(mask, (B, H, L, S)), _drop_lanes(drop, dtype), dtype.type(scale))
    ntasks = _tasks(B * H, L, S, max(E, Ev))
    if ntasks == 1:
        _backward_block(*args, _u(0), _u(B * H))
    else:
        _backward_parallel(*args, ntasks)
    return _unlanes(dq, B, H), _unlanes(dk, B, H), _unlanes(dv, B, H)


def _lanes(a):
    """``a`` ``(B, H, X, Y)`` in the lanes layout: a C-contiguous, writeable ``(X, Y, B*H)``
    array (no copy for a view made by `_unlanes`)."""
    X, Y = a.shape[2], a.shape[3]
    lanes = np.require(a.transpose(2, 3, 0, 1), requirements=("C", "W"))
    return lanes.reshape(X, Y, a.shape[0] * a.shape[1])


def _unlanes(a, B, H):
    """The ``(B, H, X, Y)`` view of a lanes array ``(X, Y, B*H)``."""
    return a.reshape(a.shape[0], a.shape[1], B, H).transpose(2, 3, 0, 1)


def _mask_lanes(mask, shape):
    """``mask`` broadcast to ``shape`` = (B, H, L, S), in the lanes layout; for None an
    empty array, which the kernels read as "no mask"."""
    if mask is None:
        return np.zeros((0, 0, 0), dtype=np.bool_)
    return _lanes(np.broadcast_to(mask.astype(np.bool_, copy=False), shape))


def _drop_lanes(drop, dtype):
    """The dropout multiplier in the lanes layout; an empty array (none) for None."""
    return np.empty((0, 0, 0), dtype=dtype) if drop is None else _lanes(drop)


def _tasks(pairs, L, S, width):
    """How many lane ranges to run in parallel: 1 (the calling thread) for little work."""
    threads = numba.get_num_threads()
    if pairs * L * S * width < _SERIAL_WORK or threads == 1:
        return 1
    return max(1, min(threads, -(-pairs // _LANE_BLOCK)))
