"""Compiled CPU kernels (numba) of layer norm: `forward` and `backward`, and `add_forward` and
`add_backward`, the same with a residual sum in front (``layer_norm(x + residual)``).

Same functions and results as `diagnet.fused.layer_norm.reference_forward`,
`reference_backward`, `reference_add_forward` and `reference_add_backward` (see that
module for the math), for NumPy arrays ``(R, N)``.

* **One pass per row.** The forward reads a row three times (sum, squared deviations, output)
  and the backward twice (the two row sums, then ``dx`` and the parameter sums), but the row
  is in the L1 cache after the first read: each row costs one trip to memory, where the
  composed reference makes about ten passes over the whole array, each with its temporary.
  `add_forward` forms ``x + residual`` in the first pass and writes it out as it goes, and
  `add_backward` adds the sum's own gradient into ``dx`` in the pass that writes it: a
  residual stream's add and its gradient's accumulation cost no pass of their own.
* **Precision.** Everything is computed in the input dtype, as in the reference and on the
  GPU (float64 intermediates for float32 input are several times slower: each element
  converted, half the vector width; figures in ``docs/benchmarks.md``). ``reassoc`` lets
  LLVM split each row sum into vector lanes, so the sums round like short pairwise sums.
* **No branches in the inner loops.** A missing weight or bias is passed as ones or zeros,
  so one loop serves every affine combination (``* 1.0`` and ``+ 0.0`` are exact).
* **Threads.** Calls with at least `_PARALLEL_WORK` elements (`_PARALLEL_WORK_BACKWARD` for
  the backward) split the rows over numba's thread pool, the rest run on the calling
  thread (waking the pool would cost more; see `diagnet.diag.threadpools`). The backward's
  parameter sums are deterministic: each task adds its rows, in order, into its own partial
  row, and the partial rows are added in task order; the number of tasks is the thread
  count, so a given thread count always gives the same bits.
* **Indexing.** Loops index with unsigned integers, as in `diagnet.diag.cpu` (a signed index
  may be negative for numba, and that check stops LLVM from vectorising). No bounds checks:
  `diagnet.fused.layer_norm` checks shapes and dtypes before calling these.

Numba compiles the kernels on first use, per dtype, and caches the machine code on disk.
"""

from __future__ import annotations

import numba
import numpy as np

from ..jit import noalias_njit

__all__ = ["forward", "backward", "add_forward", "add_backward"]

# contract: FMA; reassoc: let LLVM vectorise the row sums. Not nnan/ninf: NaN and inf
# propagate as in the reference.
_FASTMATH = {"contract", "reassoc"}
# noalias: see diagnet.jit (these kernels write only the outputs and partial sums that their
# public functions allocate)
_jit = noalias_njit(cache=True, fastmath=_FASTMATH, nogil=True)
_pjit = noalias_njit(cache=True, fastmath=_FASTMATH, nogil=True, parallel=True)

#: From this many elements (R * N) on, the rows are split over numba's threads: the forward
#: and the backward (whose per-task partial sums cost more to set up and add). The ViT's
#: 128 * 17 rows of 64 are above both: alone, the forward (with the residual add) takes 40
#: instead of 75 µs on 2 threads and the backward 64 instead of 75 µs, and the ViT's step
#: about 0.5 ms less (figures in docs/benchmarks.md). A busy core slows a threaded call
#: several times over, as it does the diagonal kernels beside them.
_PARALLEL_WORK = 1 << 16
_PARALLEL_WORK_BACKWARD = 1 << 17

_u = np.uint64  # unsigned index (see "Indexing" above)


@_jit
def _forward_rows(x, residual, total, weight, bias, inv_n, eps, y, mean, rstd, start, stop):
    """Rows ``start .. stop-1`` of the forward (``weight`` ones, ``bias`` zeros if absent).

    ``residual`` and ``total``: both None (layer norm of ``x``), or both arrays of ``x``'s
    shape: then ``total = x + residual`` is written in the first pass over each row, and the
    other two passes read ``total``. Numba compiles the two cases apart (a None argument has
    a type of its own), so neither holds a branch. (The passes are written out in each case:
    one variable bound to either array, or a helper called with it, kept LLVM from
    vectorising them.)
    """
    N = _u(x.shape[1])
    for r in range(_u(start), _u(stop)):
        if residual is None:
            s = x[r, 0]  # sums start from the first term: N >= 1, and no zero of the dtype
            for j in range(_u(1), N):
                s += x[r, j]
            mu, rs = _row_stats(x, r, N, s, inv_n, eps, mean, rstd)
            for j in range(N):
                y[r, j] = (x[r, j] - mu) * rs * weight[j] + bias[j]
        else:
            v = x[r, 0] + residual[r, 0]
            total[r, 0] = v
            s = v
            for j in range(_u(1), N):
                v = x[r, j] + residual[r, j]
                total[r, j] = v
                s += v
            mu, rs = _row_stats(total, r, N, s, inv_n, eps, mean, rstd)
            for j in range(N):
                y[r, j] = (total[r, j] - mu) * rs * weight[j] + bias[j]


@_jit
def _row_stats(x, r, N, s, inv_n, eps, mean, rstd):
    """``(mean, rstd)`` of row ``r`` of ``x``, whose sum is ``s``, also stored in ``mean``
    and ``rstd`` (and read back: rounded to the dtype, as the output pass needs them)."""
    mean[r] = s * inv_n
    mu = mean[r]
    d = x[r, 0] - mu
    q = d * d
    for j in range(_u(1), N):
        d = x[r, j] - mu
        q += d * d
    rstd[r] = 1.0 / np.sqrt(q * inv_n + eps)
    return mu, rstd[r]


@_jit
def _backward_rows(dy, x, weight, mean, rstd, inv_n, dx, pw, pb, start, stop, want_params,
                   gtotal):
    """Rows ``start .. stop-1`` of the backward; with ``want_params`` adds their
    ``dy * xhat`` into ``pw`` and ``dy`` into ``pb`` (``(N,)``). ``gtotal``: None, or the
    gradient of the sum that `add_forward` normalised (``x``'s shape), added into ``dx`` on
    the way (compiled apart, as ``residual`` in `_forward_rows`)."""
    N = _u(x.shape[1])
    for r in range(_u(start), _u(stop)):
        mu = mean[r]
        rs = rstd[r]
        g = dy[r, 0] * weight[0]
        sg = g
        sgx = g * ((x[r, 0] - mu) * rs)
        for j in range(_u(1), N):
            g = dy[r, j] * weight[j]
            sg += g
            sgx += g * ((x[r, j] - mu) * rs)
        mg = sg * inv_n
        mgx = sgx * inv_n
        if gtotal is None:
            for j in range(N):
                dx[r, j] = rs * (dy[r, j] * weight[j] - mg - (x[r, j] - mu) * rs * mgx)
        else:
            for j in range(N):
                dx[r, j] = gtotal[r, j] + rs * (dy[r, j] * weight[j] - mg
                                                - (x[r, j] - mu) * rs * mgx)
        if want_params:
            for j in range(N):
                pw[j] += dy[r, j] * ((x[r, j] - mu) * rs)
                pb[j] += dy[r, j]


@_pjit
def _forward_parallel(x, residual, total, weight, bias, inv_n, eps, y, mean, rstd, ntasks):
    R = x.shape[0]
    for task in numba.prange(ntasks):
        _forward_rows(x, residual, total, weight, bias, inv_n, eps, y, mean, rstd,
                      R * task // ntasks, R * (task + 1) // ntasks)


@_pjit
def _backward_parallel(dy, x, weight, mean, rstd, inv_n, dx, partial, want_params, gtotal):
    R = x.shape[0]
    ntasks = partial.shape[0]
    for task in numba.prange(ntasks):
        _backward_rows(dy, x, weight, mean, rstd, inv_n, dx, partial[task, 0], partial[task, 1],
                       R * task // ntasks, R * (task + 1) // ntasks, want_params, gtotal)


def _tasks(x, threshold) -> int:
    """1 (run on the calling thread) below ``threshold`` elements, else the thread count."""
    if x.size < threshold:
        return 1
    return min(numba.get_num_threads(), x.shape[0])


def _affine(a, value, n, dtype):
    return np.full(n, value, dtype=dtype) if a is None else np.ascontiguousarray(a)


def forward(x, weight, bias, eps):
    """``(y, mean, rstd)`` of layer norm over the rows of ``x`` ``(R, N)``; see
    `diagnet.fused.layer_norm.reference_forward` (arguments checked by its caller)."""
    x = np.ascontiguousarray(x)
    y, mean, rstd = _forward(x, None, None, weight, bias, eps)
    return y, mean, rstd


def add_forward(x, residual, weight, bias, eps):
    """``(total, y, mean, rstd)``: ``total = x + residual`` and the layer norm of its rows,
    in one pass per row; see `diagnet.fused.layer_norm.reference_add_forward` (arguments
    checked by its caller)."""
    x, residual = np.ascontiguousarray(x), np.ascontiguousarray(residual)
    total = np.empty_like(x)
    y, mean, rstd = _forward(x, residual, total, weight, bias, eps)
    return total, y, mean, rstd


def _forward(x, residual, total, weight, bias, eps):
    R, N = x.shape
    weight = _affine(weight, 1, N, x.dtype)
    bias = _affine(bias, 0, N, x.dtype)
    y = np.empty_like(x)
    mean = np.empty(R, dtype=x.dtype)
    rstd = np.empty(R, dtype=x.dtype)
    # scalars of the array dtype keep the inner loops in that dtype (a float64 scalar would
    # promote every element, and halve the vector width)
    inv_n, eps = x.dtype.type(1 / N), x.dtype.type(eps)
    tasks = _tasks(x, _PARALLEL_WORK)
    if tasks == 1:
        _forward_rows(x, residual, total, weight, bias, inv_n, eps, y, mean, rstd, 0, R)
    else:
        _forward_parallel(x, residual, total, weight, bias, inv_n, eps, y, mean, rstd, tasks)
    return y, mean, rstd


def backward(dy, x, weight, mean, rstd, want_params):
    """``(dx, dweight, dbias)`` of layer norm; see
    `diagnet.fused.layer_norm.reference_backward` (arguments checked by its caller)."""
    return _backward(dy, x, weight, mean, rstd, want_params, None)


def add_backward(gtotal, dy, total, weight, mean, rstd, want_params):
    """``(dx, dweight, dbias)`` of `add_forward`: ``dx = gtotal + `` the layer norm's input
    gradient (the gradient of both ``x`` and ``residual``); see
    `diagnet.fused.layer_norm.reference_add_backward` (arguments checked by its caller)."""
    return _backward(dy, total, weight, mean, rstd, want_params,
                     np.ascontiguousarray(gtotal))


def _backward(dy, x, weight, mean, rstd, want_params, gtotal):
    dy, x = np.ascontiguousarray(dy), np.ascontiguousarray(x)
    R, N = x.shape
    weight = _affine(weight, 1, N, x.dtype)
    dx = np.empty_like(x)
    inv_n = x.dtype.type(1 / N)
    tasks = _tasks(x, _PARALLEL_WORK_BACKWARD)
    partial = np.zeros((tasks, 2, N if want_params else 0), dtype=x.dtype)
    if tasks == 1:
        _backward_rows(dy, x, weight, mean, rstd, inv_n, dx, partial[0, 0], partial[0, 1], 0, R,
                       want_params, gtotal)
    else:
        _backward_parallel(dy, x, weight, mean, rstd, inv_n, dx, partial, want_params, gtotal)
    if not want_params:
        return dx, None, None
    sums = partial[0] if tasks == 1 else partial.sum(axis=0)
    return dx, sums[0], sums[1]
