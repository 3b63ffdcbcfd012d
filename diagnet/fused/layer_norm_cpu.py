"""Compiled CPU kernels (numba) of layer norm: `forward` and `backward`.

Same functions and results as `diagnet.fused.layer_norm.reference_forward` and
`reference_backward` (see that module for the math), for NumPy arrays ``(R, N)``.

* **One pass per row.** The forward reads a row three times (sum, squared deviations, output)
  and the backward twice (the two row sums, then ``dx`` and the parameter sums), but the row
  is in the L1 cache after the first read: each row costs one trip to memory, where the
  composed reference makes about ten passes over the whole array, each with its temporary.
* **Precision.** Everything is computed in the input dtype, as in the reference and on the
  GPU (float64 intermediates for float32 input are several times slower: each element
  converted, half the vector width; figures in ``docs/benchmarks.md``). ``reassoc`` lets
  LLVM split each row sum into vector lanes, so the sums round like short pairwise sums.
* **No branches in the inner loops.** A missing weight or bias is passed as ones or zeros,
  so one loop serves every affine combination (``* 1.0`` and ``+ 0.0`` are exact).
* **Threads.** Calls with at least `_PARALLEL_WORK` elements split the rows over numba's
  thread pool, the rest run on the calling thread (waking the pool would cost more; see
  `diagnet.diag.threadpools`). The backward's parameter sums are deterministic: each task
  adds its rows, in order, into its own partial row, and the partial rows are added in task
  order; the number of tasks is the thread count, so a given thread count always gives the
  same bits.
* **Indexing.** Loops index with unsigned integers, as in `diagnet.diag.cpu` (a signed index
  may be negative for numba, and that check stops LLVM from vectorising). No bounds checks:
  `diagnet.fused.layer_norm` checks shapes and dtypes before calling these.

Numba compiles the kernels on first use, per dtype, and caches the machine code on disk.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["forward", "backward"]

# contract: FMA; reassoc: let LLVM vectorise the row sums. Not nnan/ninf: NaN and inf
# propagate as in the reference.
_FASTMATH = {"contract", "reassoc"}
_jit = numba.njit(cache=True, fastmath=_FASTMATH, nogil=True)
_pjit = numba.njit(cache=True, fastmath=_FASTMATH, nogil=True, parallel=True)

#: From this many elements (R * N) on, the rows are split over numba's threads. The ViT's
#: 128 * 17 rows of 64 stay below: 2 threads gain little there at best, and lose several
#: times over when the cores are busy (figures in docs/benchmarks.md).
_PARALLEL_WORK = 1 << 18

_u = np.uint64  # unsigned index (see "Indexing" above)


@_jit
def _forward_rows(x, weight, bias, inv_n, eps, y, mean, rstd, start, stop):
    """Rows ``start .. stop-1`` of the forward (``weight`` ones, ``bias`` zeros if absent)."""
    N = _u(x.shape[1])
    for r in range(_u(start), _u(stop)):
        s = x[r, 0]  # sums start from the first term: N >= 1, and no zero of the dtype needed
        for j in range(_u(1), N):
            s += x[r, j]
        mean[r] = s * inv_n
        mu = mean[r]
        d = x[r, 0] - mu
        q = d * d
        for j in range(_u(1), N):
            d = x[r, j] - mu
            q += d * d
        rstd[r] = 1.0 / np.sqrt(q * inv_n + eps)
        rs = rstd[r]  # read back: rounded to the dtype, as the inner loop needs it
        for j in range(N):
            y[r, j] = (x[r, j] - mu) * rs * weight[j] + bias[j]


@_jit
def _backward_rows(dy, x, weight, mean, rstd, inv_n, dx, pw, pb, start, stop, want_params):
    """Rows ``start .. stop-1`` of the backward; with ``want_params`` adds their
    ``dy * xhat`` into ``pw`` and ``dy`` into ``pb`` (``(N,)``)."""
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
        for j in range(N):
            dx[r, j] = rs * (dy[r, j] * weight[j] - mg - (x[r, j] - mu) * rs * mgx)
        if want_params:
            for j in range(N):
                pw[j] += dy[r, j] * ((x[r, j] - mu) * rs)
                pb[j] += dy[r, j]


@_pjit
def _forward_parallel(x, weight, bias, inv_n, eps, y, mean, rstd, ntasks):
    R = x.shape[0]
    for task in numba.prange(ntasks):
        _forward_rows(x, weight, bias, inv_n, eps, y, mean, rstd, R * task // ntasks,
                      R * (task + 1) // ntasks)


@_pjit
def _backward_parallel(dy, x, weight, mean, rstd, inv_n, dx, partial, want_params):
    R = x.shape[0]
    ntasks = partial.shape[0]
    for task in numba.prange(ntasks):
        _backward_rows(dy, x, weight, mean, rstd, inv_n, dx, partial[task, 0], partial[task, 1],
                       R * task // ntasks, R * (task + 1) // ntasks, want_params)


def _tasks(x) -> int:
    """1 (run on the calling thread) below `_PARALLEL_WORK` elements, else the thread count."""
    if x.size < _PARALLEL_WORK:
        return 1
    return min(numba.get_num_threads(), x.shape[0])


def _affine(a, value, n, dtype):
    return np.full(n, value, dtype=dtype) if a is None else np.ascontiguousarray(a)


def forward(x, weight, bias, eps):
    """``(y, mean, rstd)`` of layer norm over the rows of ``x`` ``(R, N)``; see
    `diagnet.fused.layer_norm.reference_forward` (arguments checked by its caller)."""
    x = np.ascontiguousarray(x)
    R, N = x.shape
    weight = _affine(weight, 1, N, x.dtype)
    bias = _affine(bias, 0, N, x.dtype)
    y = np.empty_like(x)
    mean = np.empty(R, dtype=x.dtype)
    rstd = np.empty(R, dtype=x.dtype)
    # scalars of the array dtype keep the inner loops in that dtype (a float64 scalar would
    # promote every element, and halve the vector width)
    inv_n, eps = x.dtype.type(1 / N), x.dtype.type(eps)
    tasks = _tasks(x)
    if tasks == 1:
        _forward_rows(x, weight, bias, inv_n, eps, y, mean, rstd, 0, R)
    else:
        _forward_parallel(x, weight, bias, inv_n, eps, y, mean, rstd, tasks)
    return y, mean, rstd


def backward(dy, x, weight, mean, rstd, want_params):
    """``(dx, dweight, dbias)`` of layer norm; see
    `diagnet.fused.layer_norm.reference_backward` (arguments checked by its caller)."""
    dy, x = np.ascontiguousarray(dy), np.ascontiguousarray(x)
    R, N = x.shape
    weight = _affine(weight, 1, N, x.dtype)
    dx = np.empty_like(x)
    inv_n = x.dtype.type(1 / N)
    tasks = _tasks(x)
    partial = np.zeros((tasks, 2, N if want_params else 0), dtype=x.dtype)
    if tasks == 1:
        _backward_rows(dy, x, weight, mean, rstd, inv_n, dx, partial[0, 0], partial[0, 1], 0, R,
                       want_params)
    else:
        _backward_parallel(dy, x, weight, mean, rstd, inv_n, dx, partial, want_params)
    if not want_params:
        return dx, None, None
    sums = partial[0] if tasks == 1 else partial.sum(axis=0)
    return dx, sums[0], sums[1]
