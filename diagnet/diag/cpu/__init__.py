"""Compiled CPU kernels (numba) for diagonal weights: forward, input grad, value grad.

Same functions, signatures and results as `diagnet.diag.reference` (see
`diagnet.diag.layout` for the convention). Write ``P = max(m, n)`` and ``L = min(m, n)``.
Position ``t`` of diagonal ``p`` always touches index ``t`` on the *short* side of the weight
and index ``(t + p) % P`` on the *long* side; every kernel is built on that.

This module holds the public API (`forward`, `input_grad`, `value_grad`,
`input_and_value_grad`), the argument checks that keep the unchecked kernels inside their
arrays, and the threading policy that picks a serial or threaded kernel for each call. The
kernels are in its submodules, one arrangement of the loops each:

* `.tiles`: batch rows copied into scratch at a compile-time stride (all kernels use them);
* `.gather`: outputs indexed by ``t``, 8 diagonals x 4 batch rows per pass;
* `.scatter`: outputs indexed by ``(t + p) % P`` of a rectangular weight;
* `.value_grad`: the reduction over the batch, 4 diagonals x 4 rows per pass;
* `.both_grads`: input grad and value grad from the same tiles of rows.

How the loops are arranged, and why
-----------------------------------
**Contiguous runs instead of per-element index arithmetic.** For one diagonal and one batch
row, the long-side indices ``(t + p) % P``, ``t = 0 .. L-1``, form a contiguous run that wraps
around at most once. Copying the batch row once into a scratch row that repeats its start,
``ext[j] = row[j % P]`` for ``j < P + L - 1``, removes the wrap: diagonal ``p`` reads
``ext[p : p + L]``. Every inner loop is then an element-wise update of contiguous vectors,
which LLVM compiles to SIMD (AVX-512 / AVX2) code.

**When the output is the short side** (forward of a wide weight, input grad of a tall or
square one) the kernels gather (`.gather`). **When it is the long side** (forward of a tall
or square weight, input grad of a wide one), each diagonal of a square weight is rotated
into output order once per call (``K * L`` copies) and the same gather runs; a rectangular
weight scatters instead (`.scatter`).

**The bias.** Every gather and scatter writes its output from the tile buffer in a last
pass (`.tiles`), which adds a bias row on the way: `forward` takes a layer's bias there
instead of a separate ``y += bias`` over the whole output (zeros where there is none, as
for the input grads).

**Threads.** Forward and input grad give each task a block of batch rows (several tasks per
thread, so uneven batches still balance). The square forward gives each thread one block and
its own rotated copy of the diagonals, because reading a copy that the other core just wrote
cost more than rotating twice. The value grad splits either its diagonals or its batch
rows among the threads. Split by diagonals, each thread writes its own rows of ``dvalues``
(no reduction) but copies every batch row into its tiles; split by rows, each copies only
its own rows, and the per-thread partial results ``(threads, K, L)`` are added at the end.
The batch split is taken when the copies saved, ``B * (P + 2 L)`` elements, are at least
``_VGRAD_BATCH_SPLIT`` (16) times ``K * L``: measured on 2 cores, the batch split wins at
the ViT's narrow layers (ratios in the hundreds) and loses at ratios below 5; between, it
depends on the dtype, so the threshold sits above both. With too few groups of 4 diagonals
for the threads, the batch is split too. The fused backward threads like the input grad, by
batch rows in about ``_TASKS_PER_THREAD`` tasks per thread, each with its own partial value
grad; where the value grad alone would split its diagonals, the two products run separately
instead.

Calls with little work run on the calling thread: forward and input grad below
``_SERIAL_WORK`` multiply-adds (``B * K * L``) or with fewer than two tiles of rows, value
grad below ``_SERIAL_WORK_VGRAD`` (each of its threads loads every batch row, so it gains
less from a second thread). A threaded call pays for the fork and join of numba's pool:
little while the workers still spin from the previous call, much more once they sleep
(`diagnet.diag.threadpools` sets how long they spin, and lowers their priority so that
their spin leaves the cores to BLAS). The forward / input grad threshold sits above the crossover measured with
spinning workers, to leave a margin for the wake-up; the value grad's sits at its own
crossover, since in a backward pass it follows the input grad, whose threads are then still
spinning. Serial and threaded calls give the same sums up to their order. The measurements
behind these choices are in docs/benchmarks.md ("Measurements behind design choices").

**Indexing.** Hot loops index with unsigned integers (``_u``): numba treats a signed index as
possibly negative ("from the end"), and that per-element check on ``a[t + p]`` stops LLVM from
vectorising. They also create no array views (``a[k]``, ``a[p:]``), whose atomic reference
counting is a measurable cost per call. There are no bounds checks, so the public functions
validate shapes and offsets first.

**Numerics.** ``fastmath`` is limited to ``contract`` (fused multiply-add) and ``reassoc`` (to
re-associate the fused sums); NaN and inf propagate as in the reference. The order of the sums
differs from the reference, so results agree to rounding of the summed terms.

Numba compiles the kernels on first use, per dtype and tile stride (tens of seconds for all
of them), and caches the machine code on disk (``cache=True``); importing this package
compiles nothing and configures nothing: `diagnet.diag.dispatch` configures the process for
them (`diagnet.diag.cpu_process`: thread pools and C heap) at its first call of these kernels.
"""

from __future__ import annotations

import numba
import numpy as np

from ...checks import FLOAT_DTYPES
from .both_grads import _both_grads_block, _both_grads_parallel
from .gather import _gather_block, _gather_parallel, _gather_rotated_parallel, _rotate_square
from .scatter import _scatter_block, _scatter_parallel
from .tiles import _TILE_ROWS, _jit, _marker
from .value_grad import _vgrad_block, _vgrad_parallel

__all__ = ["forward", "input_grad", "value_grad", "input_and_value_grad",
           "input_value_and_bias_grad"]

# Below these many multiply-adds (B * K * L) a call runs on the calling thread (the
# crossovers measured on 2 cores, see "Threads" above): forward and input grad...
_SERIAL_WORK = 1 << 18
# ...and value grad (its crossover measured with the threads splitting the diagonals).
_SERIAL_WORK_VGRAD = 1 << 19
# A threaded value grad splits the batch (and adds per-thread partial sums) when the rows
# that every thread would copy under a split by diagonals, ``B * (P + 2 L)`` elements, are at
# least this many times the ``K * L`` of a partial sum (see "Threads" above).
_VGRAD_BATCH_SPLIT = 16
# Forward / input grad with fewer batch rows than this make one task: run on the caller.
_MIN_PARALLEL_ROWS = 8
# Forward / input grad split the batch into about this many tasks per thread...
_TASKS_PER_THREAD = 4
# ...of at most this many rows.
_MAX_ROWS_PER_TASK = 64


# --------------------------------------------------------------------------------------
# Dispatch: serial or threaded
# --------------------------------------------------------------------------------------


def _threads():
    return numba.get_num_threads()


def _row_threads(B, K, L):
    """Threads for a forward / input grad (split by batch rows): 1 when the work is below
    ``_SERIAL_WORK`` or the batch too small for two tasks, else numba's thread count."""
    if B * K * L < _SERIAL_WORK or B < _MIN_PARALLEL_ROWS:
        return 1
    return _threads()


def _diagonal_threads(B, K, L):
    """Threads for a value grad (split by diagonals): 1 below ``_SERIAL_WORK_VGRAD``."""
    return 1 if B * K * L < _SERIAL_WORK_VGRAD else _threads()


def _rows_per_task(B, threads):
    """Rows per forward/input-grad task: about ``_TASKS_PER_THREAD`` tasks per thread, whole
    tiles, at most ``_MAX_ROWS_PER_TASK``."""
    rows = -(-B // (threads * _TASKS_PER_THREAD))
    rows = -(-rows // _TILE_ROWS) * _TILE_ROWS
    return max(_TILE_ROWS, min(rows, _MAX_ROWS_PER_TASK))


def _no_bias(out):
    """Zeros for the bias that the kernels' store pass adds, where there is none."""
    return np.zeros(out.shape[1], dtype=out.dtype)


def _gather(out, inp, vals, shifts, bias, relu):
    """``out[b, i] = sum_k vals[k, i] * inp[b, (i + shifts[k]) % inp.shape[1]] + bias[i]``,
    then a ReLU with ``relu``."""
    B = out.shape[0]
    marker = _marker(out.shape[1] + inp.shape[1] - 1)
    threads = _row_threads(B, *vals.shape)
    if threads == 1:
        _gather_block(out, inp, vals, shifts, bias, relu, 0, B, marker)
    else:
        _gather_parallel(out, inp, vals, shifts, bias, relu, _rows_per_task(B, threads),
                         marker)


def _scatter(out, inp, vals, offsets, bias, relu):
    """``out[b, (t + offsets[k]) % out.shape[1]] = sum_k vals[k, t] * inp[b, t]``, plus
    ``bias``, then a ReLU with ``relu``."""
    B = out.shape[0]
    marker = _marker(out.shape[1] + inp.shape[1] - 1)
    threads = _row_threads(B, *vals.shape)
    if threads == 1:
        _scatter_block(out, inp, vals, offsets, bias, relu, 0, B, marker)
    else:
        _scatter_parallel(out, inp, vals, offsets, bias, relu, _rows_per_task(B, threads),
                          marker)


def _to_long_side(out, short, values, offsets, bias, relu):
    """The product whose output is the long side of the weight (index ``(t + p) % P``),
    plus ``bias``, then a ReLU with ``relu``."""
    B = out.shape[0]
    if short.shape[1] != out.shape[1] or B < _TILE_ROWS:
        # rectangular, or too few rows to pay for rotating the diagonals: scatter
        _scatter(out, short, values, offsets, bias, relu)
        return
    # square: rotate the diagonals into output order, then the faster gather applies
    marker = _marker(2 * out.shape[1] - 1)
    threads = _row_threads(B, *values.shape)
    if threads == 1:
        rot, shifts = _rotate_square(values, offsets)
        _gather_block(out, short, rot, shifts, bias, relu, 0, B, marker)
    else:
        _gather_rotated_parallel(out, short, values, offsets, bias, relu, threads, marker)


def _vgrad_split(B, K, L, P, threads):
    """``(n_kchunks, n_bchunks)``: how a threaded value grad splits diagonals and batch rows.

    Many rows per diagonal (narrow layers, large batches): split the batch, so that each
    thread copies only its own rows. Otherwise give each thread its own diagonals (no partial
    sums to add), and split the batch too only when there are too few groups of 4 diagonals.
    """
    tiles = (B + _TILE_ROWS - 1) // _TILE_ROWS
    if B * (P + 2 * L) >= _VGRAD_BATCH_SPLIT * K * L:
        return 1, max(1, min(threads, tiles))
    n_kchunks = min(threads, (K + 3) // 4)
    return n_kchunks, max(1, min(threads // n_kchunks, tiles))


def _value_grad(short, long, offsets):
    B, L = short.shape
    K = offsets.shape[0]
    marker = _marker(L + long.shape[1] - 1)
    threads = _diagonal_threads(B, K, L)
    if threads == 1:
        out = np.zeros((K, L), dtype=short.dtype)
        _vgrad_block(out, short, long, offsets, 0, K, 0, B, marker)
        return out
    n_kchunks, n_bchunks = _vgrad_split(B, K, L, long.shape[1], threads)
    partial = np.zeros((n_bchunks, K, L), dtype=short.dtype)
    _vgrad_parallel(partial, short, long, offsets, n_kchunks, marker)
    return partial[0] if n_bchunks == 1 else partial.sum(axis=0)


def _both_grads_chunks(B, K, L, P):
    """Batch chunks of a fused input + value grad: 1 runs it on the calling thread, more
    split the batch among threads; 0 means "do not fuse".

    The fused pass threads like the input grad (by batch rows, from ``_SERIAL_WORK``, about
    ``_TASKS_PER_THREAD`` tasks per thread so that a busy core does not hold up the others),
    which suits the value grad wherever a threaded value grad would split the batch too
    (`_vgrad_split`): each task adds its own ``(K, L)`` partial sum. Where it would split its
    diagonals instead (wide layers, few rows per diagonal), the two products run separately.
    """
    threads = _row_threads(B, K, L)
    if threads == 1:
        return 1
    n_kchunks, n_bchunks = _vgrad_split(B, K, L, P, threads)
    tiles = (B + _TILE_ROWS - 1) // _TILE_ROWS
    return 0 if n_kchunks > 1 else max(1, min(threads * _TASKS_PER_THREAD, tiles))


def _input_grad(dx, dy, values, offsets):
    """``dx = dy @ W`` into ``dx`` (``B >= 1``, ``K >= 1``)."""
    if dy.shape[1] >= dx.shape[1]:
        # tall or square: dx is indexed by t, the short side; dy by (t + p) % m
        _gather(dx, dy, values, offsets, _no_bias(dx), False)
    else:
        # wide: dx is indexed by (t + p) % n, the long side
        _to_long_side(dx, dy, values, offsets, _no_bias(dx), False)


def _input_and_value_grad(dy, x, values, offsets, want_bias=False):
    """``(dx, dvalues, dbias)`` for ``B >= 1``, ``K >= 1``: fused where `_both_grads_chunks`
    allows; ``dbias`` (``dy`` summed over its rows, ``(m,)``) only with ``want_bias``, else
    None."""
    B, m = dy.shape
    n = x.shape[1]
    K, L = values.shape
    dx = np.empty((B, n), dtype=dy.dtype)
    n_chunks = _both_grads_chunks(B, K, L, max(m, n))
    if n_chunks == 0:
        _input_grad(dx, dy, values, offsets)
        short, long = (x, dy) if m >= n else (dy, x)
        # one BLAS matrix-vector product reads dy once (NumPy's row sum is slower)
        gb = np.ones(B, dtype=dy.dtype) @ dy if want_bias else None
        return dx, _value_grad(short, long, offsets), gb
    marker = _marker(max(m, n) + L - 1)
    if n_chunks == 1:
        g = np.zeros((K, L), dtype=dy.dtype)
        gb = np.zeros(m, dtype=dy.dtype) if want_bias else None
        _both_grads_block(dx, g, gb, dy, x, values, offsets, 0, B, marker)
        return dx, g, gb
    partial = np.zeros((n_chunks, K, L), dtype=dy.dtype)
    partial_bias = np.zeros((n_chunks, m), dtype=dy.dtype) if want_bias else None
    _both_grads_parallel(dx, partial, partial_bias, dy, x, values, offsets, marker)
    return dx, partial.sum(axis=0), (partial_bias.sum(axis=0) if want_bias else None)


# --------------------------------------------------------------------------------------
# Argument checks (O(1) apart from the offsets range check)
# --------------------------------------------------------------------------------------

_INT64 = np.dtype(np.int64)


def _is_ready(a, dtype):
    """Whether ``a`` is a C-contiguous NumPy array of ``dtype``: usable without a copy."""
    return type(a) is np.ndarray and a.dtype == dtype and a.flags.c_contiguous


def _float_pair(primary, other):
    """``primary`` and ``other`` as C-contiguous 2-D arrays of ``primary``'s dtype (which must
    be float32/float64). Arrays that are so already are returned as they are (no copy)."""
    if type(primary) is not np.ndarray or not primary.flags.c_contiguous:
        primary = np.ascontiguousarray(primary)
    dtype = primary.dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"expected a float32 or float64 array; got {dtype}")
    if not _is_ready(other, dtype):
        other = np.ascontiguousarray(other, dtype=dtype)
    for a in (primary, other):
        if a.ndim != 2:
            raise ValueError(f"expected a 2-D array; got shape {a.shape}")
    return primary, other


def _as_offsets(offsets):
    """``offsets`` as a contiguous 1-D int64 array (from any integer dtype or a list)."""
    if _is_ready(offsets, _INT64) and offsets.ndim == 1:
        return offsets
    offsets = np.asarray(offsets).reshape(-1)
    if offsets.size == 0:
        return np.zeros(0, dtype=np.int64)
    if offsets.dtype.kind not in "iu":
        raise TypeError(f"offsets must be integers; got {offsets.dtype}")
    if offsets.dtype.kind == "u" and offsets.max() > np.iinfo(np.int64).max:
        raise ValueError("offsets out of range")
    return np.ascontiguousarray(offsets, dtype=np.int64)


@_jit
def _offsets_in_range(offsets, P):
    for k in range(offsets.shape[0]):
        if offsets[k] < 0 or offsets[k] >= P:
            return False
    return True


def _check_layout(m, n, offsets, K, L):
    """Raise unless ``values`` is ``(len(offsets), min(m, n))`` and ``0 <= offsets < max(m, n)``.

    The kernels do not bounds-check, so this is what keeps them inside the arrays. The range
    check is one compiled pass over ``K`` offsets (its cost is mostly the call): kept on
    every call, so that offsets changed in place after their validation cannot make a
    kernel write outside its arrays.
    """
    if m < 1 or n < 1:
        raise ValueError(f"the weight shape must be positive; got ({m}, {n})")
    if L != min(m, n) or K != offsets.shape[0]:
        raise ValueError(
            f"values must be (len(offsets), min(m, n)) = ({offsets.shape[0]}, {min(m, n)}); "
            f"got ({K}, {L})")
    if K and not _offsets_in_range(offsets, max(m, n)):
        raise ValueError(f"offsets must lie in [0, {max(m, n)})")


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------

def forward(x, offsets, values, m, bias=None, relu=False):
    """``y = x @ W.T (+ bias)``, then ``relu(y)`` with ``relu``, for the diagonal weight ``W``
    of shape ``(m, n)``, ``n = x.shape[1]``.

    ``x``: ``(B, n)`` float32 or float64. ``offsets``: ``(K,)`` integers (any int dtype) in
    ``[0, max(m, n))``, normally sorted and unique. ``values``: ``(K, min(m, n))``, converted to
    ``x.dtype``. ``bias``: None or ``(m,)``, converted to ``x.dtype`` and added in the
    kernels' store pass (each output rounded, then the bias added: the same values as
    ``y += bias`` after the product). ``relu``: a ReLU applied in the same pass, with the
    values of `diagnet.ops.activation.relu` (``h * (h > 0)``). Non-contiguous inputs are
    copied. Returns ``y``: ``(B, m)``, ``x.dtype``.
    """
    x, values = _float_pair(x, values)
    offsets = _as_offsets(offsets)
    m = int(m)
    B, n = x.shape
    _check_layout(m, n, offsets, *values.shape)
    y = np.empty((B, m), dtype=x.dtype)
    if bias is None:
        bias = _no_bias(y)
    else:
        if not _is_ready(bias, x.dtype):
            bias = np.ascontiguousarray(bias, dtype=x.dtype)
        if bias.shape != (m,):
            raise ValueError(f"bias must have shape (m,) = ({m},); got {bias.shape}")
    relu = bool(relu)
    if B == 0 or offsets.shape[0] == 0:
        y[:] = bias
        if relu:
            y *= y > 0
    elif m < n:
        # wide: y is indexed by t, the short side; x by (t + p) % n
        _gather(y, x, values, offsets, bias, relu)
    else:
        # tall or square: y is indexed by (t + p) % m, the long side
        _to_long_side(y, x, values, offsets, bias, relu)
    return y


def input_grad(dy, offsets, values, n):
    """``dx = dy @ W`` for the diagonal weight ``W`` of shape ``(m, n)``, ``m = dy.shape[1]``.

    ``dy``: ``(B, m)`` float32 or float64; ``offsets`` and ``values`` as in `forward`
    (``values`` converted to ``dy.dtype``). Returns ``dx``: ``(B, n)``, ``dy.dtype``.
    """
    dy, values = _float_pair(dy, values)
    offsets = _as_offsets(offsets)
    n = int(n)
    B, m = dy.shape
    _check_layout(m, n, offsets, *values.shape)
    dx = np.empty((B, n), dtype=dy.dtype)
    if B == 0 or offsets.shape[0] == 0:
        dx[:] = 0
    else:
        _input_grad(dx, dy, values, offsets)
    return dx


def value_grad(dy, x, offsets):
    """The gradient of ``values``: ``dvalues[k, t] = sum_b dy[b, row_k(t)] * x[b, col_k(t)]``.

    ``dy``: ``(B, m)`` float32 or float64; ``x``: ``(B, n)``, converted to ``dy.dtype``;
    ``offsets``: ``(K,)`` integers in ``[0, max(m, n))``. Returns ``(K, min(m, n))``,
    ``dy.dtype``.
    """
    dy, x = _float_pair(dy, x)
    offsets = _as_offsets(offsets)
    B, m = dy.shape
    if x.shape[0] != B:
        raise ValueError(f"dy and x must have the same batch size; got {B} and {x.shape[0]}")
    n = x.shape[1]
    K, L = offsets.shape[0], min(m, n)
    _check_layout(m, n, offsets, K, L)
    if B == 0 or K == 0:
        return np.zeros((K, L), dtype=dy.dtype)
    # t indexes the short side, (t + p) % P the long side; x is the short side when m >= n
    short, long = (x, dy) if m >= n else (dy, x)
    return _value_grad(short, long, offsets)


def input_and_value_grad(dy, x, offsets, values):
    """Both gradients of ``y = x @ W.T`` at once: ``(dx, dvalues)``, equal to
    ``(input_grad(dy, offsets, values, n), value_grad(dy, x, offsets))``, ``n = x.shape[1]``.

    ``dy``: ``(B, m)`` float32 or float64; ``x``: ``(B, n)`` and ``values``:
    ``(len(offsets), min(m, n))``, converted to ``dy.dtype``; ``offsets`` as in `forward`.
    Returns ``dx``: ``(B, n)`` and ``dvalues``: ``(K, min(m, n))``, both ``dy.dtype``.
    One pass over the batch computes both, so each tile of ``dy`` is copied once; the value
    grad's sums may run in another order than `value_grad`'s.
    """
    return _all_grads(dy, x, offsets, values, False)[:2]


def input_value_and_bias_grad(dy, x, offsets, values):
    """The three gradients of ``y = x @ W.T + bias``: ``(dx, dvalues, dbias)``, as
    `input_and_value_grad` plus ``dbias = dy.sum(axis=0)`` ``(m,)`` of ``dy.dtype``, added
    up from the tiles of ``dy`` that pass already loads (in its row order: the last bits may
    differ from another sum's)."""
    return _all_grads(dy, x, offsets, values, True)


def _all_grads(dy, x, offsets, values, want_bias):
    dy, x = _float_pair(dy, x)
    if not _is_ready(values, dy.dtype):
        values = np.ascontiguousarray(values, dtype=dy.dtype)
    if values.ndim != 2:
        raise ValueError(f"values must be a 2-D array; got shape {values.shape}")
    offsets = _as_offsets(offsets)
    B, m = dy.shape
    if x.shape[0] != B:
        raise ValueError(f"dy and x must have the same batch size; got {B} and {x.shape[0]}")
    n = x.shape[1]
    K, L = values.shape
    _check_layout(m, n, offsets, K, L)
    if B == 0 or K == 0:
        return (np.zeros((B, n), dtype=dy.dtype), np.zeros((K, L), dtype=dy.dtype),
                dy.sum(axis=0) if want_bias else None)
    return _input_and_value_grad(dy, x, values, offsets, want_bias)
