"""The GPU side of the foreach optimizers: one kernel launch per run of parameters.

On CuPy arrays the per-parameter code of `Adam._update` and `SGD._update` costs about ten
element-wise CuPy launches per parameter (``m *= b1``, ``m += c1 * g``, ...): for a ViT's
60-odd small parameters some 600 launches per step, each costing more host time than the
GPU spends on its few hundred values. `launch` updates every parameter of a run (consecutive
parameters of a group that share dtype and step count, see `diagnet.optim._foreach.runs`) in
one launch of ``kernels/optim.cu``:

* the arrays travel as one table of device addresses (``a.data.ptr``, uint64), role-major:
  entry ``r * n + k`` is array ``r`` (parameter, gradient, then the state arrays) of
  parameter ``k``; the sizes as prefix offsets (int64, ``(n + 1,)``). Both are uploaded per
  launch (gradients are new arrays at every step);
* each CUDA thread walks the run's elements in a grid-stride loop and finds the parameter of
  an element by a binary search over the offsets.

Which arrays qualify (`launchable`): C-contiguous ``cupy.ndarray`` (not a subclass); others
keep the per-parameter code, in their place in the group's order. The kernel indexes every
array of a parameter by the parameter's size: `Optimizer.step` has checked every gradient
and state array against its parameter (device, shape, dtype) before this runs. Parameters of
size 0 are left out of the tables; if two arrays of a run share memory (a parameter that is
a view of another, one gradient given to two parameters), `launch` launches nothing and the
caller takes the per-parameter code, whose in-order result a parallel kernel would not
reproduce.

**Bit for bit.** Each CuPy launch of the per-parameter code is one ufunc, one IEEE operation
rounded to the array dtype, with the Python-float hyperparameters cast to that dtype first
(CuPy casts scalar operands to the loop's input type); CuPy compiles without fast math, so
its division and square root are the correctly rounded ones, and a kernel holding a single
operation has nothing that NVRTC could contract into a fused multiply-add. The kernel does
the same operations in the same order with the round-to-nearest intrinsics (``__fmul_rn``,
``__fadd_rn``, ``__fdiv_rn``, ``__fsqrt_rn`` and their double forms), which are never
contracted whatever ``--fmad`` says, and takes the scalars rounded the same way (the host
computes them in double, as the Python code does). So the kernel equals the CuPy code bit
for bit on a GPU as well as through the CuPy stand-in of the tests (where the per-parameter
code runs in NumPy). One difference is invisible to ``array_equal``: the payload of a NaN.
"""

from __future__ import annotations

import numpy as np

from .. import backend, cuda_launch

__all__ = ["launchable", "launch", "launch_config", "ADAM", "SGD"]

KERNEL_FILE = "optim.cu"
MACRO_PREFIX = "OPT"
#: threads per block, and the most blocks of a launch (beyond, the threads loop)
THREADS = 256
MAX_BLOCKS = 4096

#: Adam's ``weight_decay_mode``: none, L2 in the gradient (Adam), decoupled (AdamW)
WD_NONE, WD_L2, WD_DECOUPLED = 0, 1, 2

ADAM = cuda_launch.Kernel(
    KERNEL_FILE, "adam_foreach",
    "addresses:U offsets:L n:i total:l maximize:i weight_decay_mode:i amsgrad:i b1:f c1:f "
    "b2:f c2:f s2:f eps:f lr_t:f wd:f decay:f", MACRO_PREFIX)
SGD = cuda_launch.Kernel(
    KERNEL_FILE, "sgd_foreach",
    "addresses:U offsets:L n:i total:l maximize:i decay:i momentum:i nesterov:i first:i lr:f "
    "wd:f mu:f c:f", MACRO_PREFIX)


def launchable(*arrays) -> bool:
    """True when every array can be updated by the kernels: a C-contiguous ``cupy.ndarray``
    (not a subclass). Attribute checks only, and no CuPy import: this runs every step."""
    cp = backend.get_array_module(*arrays[:1])
    if cp is np:
        return False
    for a in arrays:
        if type(a) is not cp.ndarray or not a.flags.c_contiguous:
            return False
    return True


def launch_config(total: int, threads: int | None = None, max_blocks: int | None = None):
    """``(grid, block)`` for a run of ``total >= 1`` elements: one element per thread, at most
    ``max_blocks`` blocks (default `MAX_BLOCKS`; beyond, each thread loops). Pure Python."""
    threads = THREADS if threads is None else threads
    max_blocks = MAX_BLOCKS if max_blocks is None else max_blocks
    blocks = min(-(-total // threads), max_blocks)
    return (blocks, 1, 1), (threads, 1, 1)


def _disjoint(table, nbytes) -> bool:
    """Whether the arrays at the addresses ``table`` (uint64, role-major, ``(R * n,)``), of
    ``nbytes`` (int64, ``(n,)``: parameter ``k``'s arrays are ``nbytes[k]`` long), occupy
    pairwise disjoint memory."""
    order = np.argsort(table)
    starts = table[order]
    ends = starts + np.tile(nbytes, len(table) // len(nbytes)).astype(np.uint64)[order]
    return bool(np.all(starts[1:] >= ends[:-1]))


def launch(kernel, dtype, columns, args) -> bool:
    """Update the parameters of a run in one launch of ``kernel`` (`ADAM` or `SGD`).

    Args:
        kernel: the entry point.
        dtype: float32 or float64, the dtype of every array.
        columns: one sequence per role of the kernel (``kernels/optim.cu``: parameters,
            gradients, then the state arrays), each with one C-contiguous CuPy array per
            parameter, of that parameter's shape (checked by `Optimizer.step`).
        args: the kernel's flags and scalars, after ``total`` in its signature.

    Returns:
        True once launched (or when every parameter is empty); False, launching nothing,
        when two of the arrays share memory (the caller then updates one parameter at a
        time).
    """
    cp = cuda_launch.require_cupy("the CUDA optimizer kernels")
    params = columns[0]
    keep = [k for k, p in enumerate(params) if p.size]
    if len(keep) < len(params):
        columns = [[column[k] for k in keep] for column in columns]
    if not keep:
        return True
    sizes = np.array([params[k].size for k in keep], dtype=np.int64)
    table = np.array([[a.data.ptr for a in column] for column in columns],
                     dtype=np.uint64).ravel()  # role-major
    if not _disjoint(table, sizes * np.dtype(dtype).itemsize):
        return False
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    total = int(offsets[-1])
    grid, block = launch_config(total)
    kernel(dtype, grid, block, (cp.asarray(table), cp.asarray(offsets), len(sizes), total, *args))
    return True
