"""Pick the kernel implementation for an array: CUDA for CuPy arrays, numba on the CPU.

`implementation(array)` returns a module with ``forward``, ``input_grad`` and
``value_grad`` (the signatures of `diagnet.diag.reference`). ``settings.cpu_kernels ==
"reference"`` (`diagnet.settings`: ``DIAGNET_CPU_KERNELS=reference`` or
``settings.set_cpu_kernels("reference")``) switches the CPU path to the plain NumPy reference
(for debugging, or where numba is unavailable). `input_and_value_grad` gives both gradients
of a backward pass, in one pass over the batch with the numba kernels. The first call that
returns the numba kernels configures the process for them (`cpu_process`: the thread pools
and the C heap).

`diagonal_scores` is the exception: it is one dense matmul ``dy.T @ x`` plus a gather of
its ``P`` diagonals (`diagonal_norms`), written once in backend-generic array code (NumPy or
CuPy, whichever holds the arrays) and run only at mask-update steps, so it has no
per-backend kernel and the CPU kernel setting does not affect it.
"""

from __future__ import annotations

import numpy as np

from .. import backend, settings
from . import cpu_process, reference


_cpu = None  # diagnet.diag.cpu once loaded (importing it loads numba: only on first use)


def _cpu_kernels():
    global _cpu
    if _cpu is None:
        from . import cpu

        # the kernels run on numba's pool, the dense matmuls beside them on OpenBLAS's
        cpu_process.configure_once()
        _cpu = cpu
    return _cpu


def implementation(array):
    """The kernel module to use for ``array`` (a NumPy or CuPy array)."""
    # a NumPy array is the common case: answered without asking the backend
    if type(array) is not np.ndarray and backend.get_array_module(array) is not np:
        from . import cuda

        return cuda
    if settings.cpu_kernels == "reference":
        return reference
    return _cpu_kernels()


def prepare_offsets(offsets):
    """``offsets`` in the form the kernels of its device read without converting them.

    On the GPU that is a contiguous int32 array: the CUDA kernels read 32-bit offsets, and
    converting an int64 array is one more kernel launch (about 19 µs measured on an H200,
    as long as the product itself at small sizes) on *every* product. Call it once per
    structure and pass the result to forward, input grad and value grad. On the CPU the
    offsets are returned unchanged (the numba kernels take int64).
    """
    if backend.get_array_module(offsets) is np:
        return offsets
    from . import cuda

    return cuda.prepare_offsets(offsets)


def forward(x, offsets, values, m, bias=None, relu=False):
    """``y = x @ W.T (+ bias)`` for the diagonal weight ``(offsets, values)`` of shape
    ``(m, n)``, then ``relu(y)`` with ``relu``; ``bias``: None or ``(m,)`` of ``x``'s dtype.

    The numba kernels add the bias and apply the ReLU in their store pass (one pass over
    ``y`` fewer for each); the reference and the CUDA kernels do both after the product
    (``y += bias``, ``y *= y > 0``), with the same values: each output is rounded before the
    bias is added either way, and the ReLU is ``h * (h > 0)`` everywhere.
    """
    impl = implementation(x)
    if impl is _cpu:
        return impl.forward(x, offsets, values, m, bias, relu)
    y = impl.forward(x, offsets, values, m)
    if bias is not None:
        y += bias
    if relu:
        y *= y > 0
    return y


def input_grad(dy, offsets, values, n):
    """``dx = dy @ W`` for the diagonal weight of shape ``(dy.shape[1], n)``."""
    return implementation(dy).input_grad(dy, offsets, values, n)


def value_grad(dy, x, offsets):
    """``dvalues[k, t] = sum_b dy[b, r_k(t)] x[b, c_k(t)]``, shape ``(K, L)``."""
    return implementation(dy).value_grad(dy, x, offsets)


def input_and_value_grad(dy, x, offsets, values):
    """``(input_grad(dy, offsets, values, n), value_grad(dy, x, offsets))``, ``n = x.shape[1]``.

    The numba kernels compute both in one pass over the batch; the reference and CUDA
    kernels make the two calls.
    """
    impl = implementation(dy)
    if impl is _cpu:
        return impl.input_and_value_grad(dy, x, offsets, values)
    return impl.input_grad(dy, offsets, values, x.shape[1]), impl.value_grad(dy, x, offsets)


def input_value_and_bias_grad(dy, x, offsets, values):
    """``input_and_value_grad`` plus the bias gradient ``dy.sum(axis=0)`` ``(m,)``.

    The numba kernels add the bias gradient up from the tiles of ``dy`` that their pass
    loads anyway; the reference and CUDA kernels sum ``dy``'s rows separately.
    """
    impl = implementation(dy)
    if impl is _cpu:
        return impl.input_value_and_bias_grad(dy, x, offsets, values)
    return (impl.input_grad(dy, offsets, values, x.shape[1]), impl.value_grad(dy, x, offsets),
            dy.sum(axis=0))


def diagonal_scores(dy, x):
    """``G[p]``, the L2 norm of ``dy.T @ x`` on each of the ``P`` diagonals; ``(P,)``.

    One dense ``(m, n)`` matmul plus a gather, the same backend-generic code for NumPy and
    CuPy arrays (`reference.diagonal_scores`), whichever CPU kernels are selected: it runs
    only at mask-update steps, where a dense product is affordable.
    """
    return reference.diagonal_scores(dy, x)


def diagonal_norms(w):
    """The L2 norm of the dense ``(m, n)`` matrix ``w`` on each of its ``P`` diagonals; ``(P,)``.

    The second half of `diagonal_scores`, for a dense gradient formed elsewhere (e.g. summed
    across processes); the same backend-generic code.
    """
    return reference.diagonal_norms(w)
