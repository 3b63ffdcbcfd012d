"""Pick the kernel implementation for an array: CUDA for CuPy arrays, numba on the CPU.

`implementation(array)` returns a module with ``forward``, ``input_grad`` and
``value_grad`` (the signatures of `diagnet.diag.reference`). The environment variable
``DIAGNET_CPU_KERNELS=reference`` switches the CPU path to the plain NumPy reference (for
debugging, or where numba is unavailable).
"""

from __future__ import annotations

import os

import numpy as np

from .. import backend
from . import reference


def implementation(array):
    """The kernel module to use for ``array`` (a NumPy or CuPy array)."""
    if backend.get_array_module(array) is not np:
        from . import cuda

        return cuda
    if os.environ.get("DIAGNET_CPU_KERNELS", "numba") == "reference":
        return reference
    from . import cpu

    return cpu


def forward(x, offsets, values, m):
    """``y = x @ W.T`` for the diagonal weight ``(offsets, values)`` of shape ``(m, n)``."""
    return implementation(x).forward(x, offsets, values, m)


def input_grad(dy, offsets, values, n):
    """``dx = dy @ W`` for the diagonal weight of shape ``(dy.shape[1], n)``."""
    return implementation(dy).input_grad(dy, offsets, values, n)


def value_grad(dy, x, offsets):
    """``dvalues[k, t] = sum_b dy[b, r_k(t)] x[b, c_k(t)]``, shape ``(K, L)``."""
    return implementation(dy).value_grad(dy, x, offsets)


def diagonal_scores(dy, x):
    """``G[p]`` for all ``P`` diagonals (dense ``dy.T @ x``; mask-update steps only)."""
    return reference.diagonal_scores(dy, x)
