"""Readable NumPy reference of the diagonal kernels (works on CuPy arrays too).

Each function follows the math of the format directly, one diagonal at a time, with
vectorised NumPy inside the loop. The compiled CPU kernels (`diagnet.diag.cpu`) and the CUDA
kernels (``kernels/diag_linear.cu``) must agree with these; the test suite checks that.

Shapes: ``x`` is ``(B, n)``, ``dy`` is ``(B, m)``, ``offsets`` is ``(K,)`` int, ``values``
is ``(K, L)``; the weight is ``(m, n)``, ``P = max(m, n)``, ``L = min(m, n)``. Arrays are
float32 or float64 (all the same dtype); results have that dtype.
"""

from __future__ import annotations

from .. import backend
from .layout import diagonal_coordinates


def _positions(m, n, offset, xp):
    """Rows and columns covered by diagonal ``offset`` (each ``(L,)``)."""
    t = xp.arange(min(m, n))
    if m >= n:
        return (t + offset) % m, t
    return t, (t + offset) % n


def forward(x, offsets, values, m):
    """``y = x @ W.T`` for the diagonal weight ``W`` of shape ``(m, x.shape[1])``; ``(B, m)``."""
    xp = backend.get_array_module(x)
    n = x.shape[1]
    y = xp.zeros((x.shape[0], m), dtype=x.dtype)
    for k, p in enumerate(offsets.tolist()):
        rows, cols = _positions(m, n, p, xp)
        # rows are distinct within one diagonal, so this fancy-index add is exact
        y[:, rows] += x[:, cols] * values[k]
    return y


def input_grad(dy, offsets, values, n):
    """``dx = dy @ W`` for the diagonal weight of shape ``(dy.shape[1], n)``; ``(B, n)``."""
    xp = backend.get_array_module(dy)
    m = dy.shape[1]
    dx = xp.zeros((dy.shape[0], n), dtype=dy.dtype)
    for k, p in enumerate(offsets.tolist()):
        rows, cols = _positions(m, n, p, xp)
        dx[:, cols] += dy[:, rows] * values[k]
    return dx


def value_grad(dy, x, offsets):
    """``dvalues[k, t] = sum_b dy[b, row] * x[b, col]`` for every stored position; ``(K, L)``."""
    xp = backend.get_array_module(dy)
    m, n = dy.shape[1], x.shape[1]
    out = xp.empty((len(offsets), min(m, n)), dtype=dy.dtype)
    for k, p in enumerate(offsets.tolist()):
        rows, cols = _positions(m, n, p, xp)
        out[k] = (dy[:, rows] * x[:, cols]).sum(axis=0)
    return out


def diagonal_scores(dy, x):
    """``G[p]``: the L2 norm of ``dy.T @ x`` restricted to each of the ``P`` diagonals; ``(P,)``.

    This builds the dense ``(m, n)`` gradient, so it is meant for mask-update steps only.
    """
    return diagonal_norms(dy.T @ x)


def diagonal_norms(w):
    """The L2 norm of the dense ``(m, n)`` matrix ``w`` on each of its ``P`` diagonals; ``(P,)``.

    ``out[p] = sqrt(sum_t w[r_p(t), c_p(t)] ** 2)``, dtype of ``w``, on ``w``'s device.
    """
    xp = backend.get_array_module(w)
    m, n = w.shape
    squares = w ** 2
    # rows of R are the positions t, its columns wrap around: R[t, (t + p) % P] is position t
    # of diagonal p (for m >= n entry ((t + p) % m, t), i.e. the transpose; for m < n entry
    # (t, (t + p) % n) directly)
    return xp.sqrt(_wrapped_diagonal_sums(xp, squares.T if m >= n else squares))


def _wrapped_diagonal_sums(xp, R):
    """``out[p] = sum_t R[t, (t + p) % P]`` for ``R`` of shape ``(L, P)``, ``L <= P``.

    No index arrays and no gather: doubling the columns makes ``R[t, (t + p) % P]`` the
    plain ``RR[t, t + p]``, and reading the flat buffer with a row length one longer than
    ``RR``'s shifts row ``t`` left by ``t``, which lines the diagonals up as columns.
    """
    L, P = R.shape
    flat = xp.concatenate([xp.concatenate([R, R], axis=1).ravel(), xp.zeros(L, R.dtype)])
    skewed = flat[:L * (2 * P + 1)].reshape(L, 2 * P + 1)  # skewed[t, p] = RR[t, t + p]
    return skewed[:, :P].sum(axis=0)
