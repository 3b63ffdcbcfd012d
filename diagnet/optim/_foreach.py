"""Updating many parameters in one compiled call ("foreach", as PyTorch's ``foreach=True``).

An optimizer step does a few element-wise operations per parameter. For the small parameters
of a sparse model (a ViT has about 60, most of them a few hundred values), the cost is in the
calls, not in the arithmetic: one compiled call per parameter, each with its Python set-up and
its arguments to convert, cost more than the loop over the values. So the CPU optimizers hand
*all* parameters of a group to one compiled loop (numba), which walks the parameters and, in
each, the values.

How the arrays travel: numba compiles one version of a function per argument *type*, and the
type of a tuple of arrays includes its length. A tuple of all of a group's parameters would
compile once per model (seconds for 60 parameters). So the loops take tuples of exactly
`CHUNK` flat arrays, the last one padded with empty arrays: one compiled version (per dtype
and set of options, such as amsgrad) serves every group, and a group costs ``ceil(n /
CHUNK)`` calls. A flat array is the ``ravel()`` of a C-contiguous array: a view, so the loop
updates the parameter itself.

Which arrays qualify (`compilable`): a NumPy ``ndarray`` (not a subclass, not CuPy) that is
C-contiguous, aligned and writeable; other arrays (numba would type them differently) take the
optimizer's NumPy code, one parameter at a time, in their place in the group's order (`runs`).
On the GPU, C-contiguous CuPy arrays go through one kernel launch per run instead
(`diagnet.optim._foreach_cuda`); `target` says which way a parameter goes.
The loops index every array of a parameter by the parameter's size without bounds checks:
`Optimizer.step` has checked every gradient and state array against its parameter (shape,
dtype) before any of this runs.
"""

from __future__ import annotations

import numpy as np

from . import _foreach_cuda

__all__ = ["CHUNK", "compilable", "target", "runs", "chunks"]

#: parameters per compiled call (the length of the tuples the loops take)
CHUNK = 8


def compilable(*arrays) -> bool:
    """True when every array can go into a compiled loop: a C-contiguous, aligned, writeable
    ``numpy.ndarray`` (``flags.carray``). Attribute checks only: this runs every step."""
    for a in arrays:
        if type(a) is not np.ndarray or not a.flags.carray:
            return False
    return True


def target(*arrays):
    """How the arrays of one parameter can be updated together with other parameters:
    ``"cpu"`` (`compilable`: a compiled loop), ``"cuda"`` (`_foreach_cuda.launchable`: a
    kernel launch) or None (the optimizer's NumPy/CuPy code, one parameter at a time)."""
    if compilable(*arrays):
        return "cpu"
    if _foreach_cuda.launchable(*arrays):
        return "cuda"
    return None


def runs(items, key):
    """Split ``items`` into runs of consecutive items that share ``key(item)``.

    Yields ``(key, [item, ...])`` in order. ``key`` returns None for an item that takes the
    NumPy code: each such item is a run of its own. Keeping the order keeps the result exactly
    that of one parameter at a time, even for parameters that share memory.
    """
    run, run_key = [], None
    for item in items:
        item_key = key(item)
        if run and (item_key is None or item_key != run_key):
            yield run_key, run
            run = []
        run.append(item)
        run_key = item_key
    if run:
        yield run_key, run


def chunks(arrays, dtype):
    """``arrays`` (C-contiguous, of ``dtype``) as flat views in tuples of `CHUNK`, the last one
    padded with empty arrays of ``dtype``."""
    flat = [a.ravel() for a in arrays]
    pad = -len(flat) % CHUNK
    flat.extend([np.empty(0, dtype)] * pad)
    return [tuple(flat[i:i + CHUNK]) for i in range(0, len(flat), CHUNK)]
