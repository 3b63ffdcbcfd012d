"""CUDA kernels for diagonal sparse weights: compile ``kernels/diag_linear.cu`` and launch it.

The functions `forward`, `input_grad` and `value_grad` take CuPy arrays and have the
signatures of `diagnet.diag.reference`; results are new CuPy arrays of the input dtype
(float32 or float64). This module imports without CuPy; only calling them needs it.

Kernel design (details in ``docs/kernels.md`` and the comments of the ``.cu`` file):

* **Forward and input grad are gathers.** One thread owns one output element ``(b, i)`` and
  adds the at most ``K`` terms that reach it, one per stored diagonal, whose position ``t``
  and input index follow from ``i`` and the offset in O(1). No atomics, no zero-fill, every
  output written once, results deterministic; ``2 * B * K * L`` flops.
* **Thread mapping.** ``threadIdx.x`` runs along output columns, so a warp reads 32
  consecutive entries of a ``values`` row and of an input row (wrapping once at most):
  coalesced. ``threadIdx.y`` and a per-thread loop of ``GATHER_ROWS`` cover batch rows, so
  one load of ``values[k, t]`` feeds several multiply-adds from registers. Offsets are staged
  through shared memory ``OFFSET_CHUNK`` at a time.
* **Value grad** gives each thread one position ``t`` and ``VG_KPT`` diagonals, so that the
  operand indexed by ``t`` alone is loaded once per batch row for all of them. Thread rows of
  a block stride over the batch and are summed by a shared-memory tree; when there are too
  few ``(t, k)`` tiles to fill the GPU, the batch is also split over ``grid.z`` and a second
  kernel adds the per-split partial sums in a fixed order (deterministic, no atomics).
* **Indices.** Shapes are passed as 32-bit ``int`` (each dimension must fit); element offsets
  such as ``b * n`` and ``k * L`` are computed in 64 bits, so ``B * m`` may exceed 2**31.
* **Tuning constants** are ``#define``\\ s in the ``.cu`` file. `KernelConfig` holds them on
  the Python side and passes every one as a ``-D`` option, so the grid computed by
  `launch_config` always matches what the compiled kernel assumes. Compilation (once per
  dtype and options, memoised) and the checked launches are `diagnet.cuda_launch`'s.

`launch_config` is pure Python (no CuPy) so that the tests can hand the real launch geometry
to the CPU emulation harness in ``tests/simt``.
"""

from __future__ import annotations

import dataclasses
import functools
import operator

import numpy as np

from .. import cuda_launch

KERNEL_FILE = "diag_linear.cu"

#: CUDA limits on grid dimensions (x, y and z).
MAX_GRID_X = 2**31 - 1
MAX_GRID_YZ = 65535
_INT32_MAX = 2**31 - 1

_DTYPE_SUFFIX = cuda_launch.DTYPE_SUFFIX

#: KernelConfig fields that are compiled into the kernels, and their ``#define`` names.
COMPILED_FIELDS = {
    "gather_block_x": "DIAG_GATHER_BLOCK_X",
    "gather_block_y": "DIAG_GATHER_BLOCK_Y",
    "gather_rows": "DIAG_GATHER_ROWS",
    "offset_chunk": "DIAG_OFFSET_CHUNK",
    "min_blocks_per_sm": "DIAG_MIN_BLOCKS_PER_SM",
    "vg_block_x": "DIAG_VG_BLOCK_X",
    "vg_block_y": "DIAG_VG_BLOCK_Y",
    "vg_kpt": "DIAG_VG_KPT",
    "reduce_block": "DIAG_REDUCE_BLOCK",
}


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tuning constants of the CUDA kernels (defaults match the ``#ifndef`` defaults).

    The fields in `COMPILED_FIELDS` become ``-D`` options of the compiled module; the others
    only steer `launch_config`.
    """

    gather_block_x: int = 64  #: output columns per gather block (threadIdx.x)
    gather_block_y: int = 4  #: thread rows per gather block (threadIdx.y)
    gather_rows: int = 4  #: batch rows per gather thread (values reuse from registers)
    offset_chunk: int = 256  #: offsets staged in shared memory at a time
    min_blocks_per_sm: int = 4  #: __launch_bounds__ minimum blocks, caps registers
    vg_block_x: int = 32  #: positions t per value-grad block
    vg_block_y: int = 8  #: batch lanes per value-grad block (power of two)
    vg_kpt: int = 4  #: diagonals per value-grad thread
    reduce_block: int = 256  #: threads per block of the split reduction
    vg_target_blocks: int = 1056  #: value grad splits the batch until about this many blocks
    vg_min_batch_per_split: int = 64  #: ... but gives no split fewer batch rows than this
    max_grid_y: int = MAX_GRID_YZ  #: cap on grid.y (larger problems loop in the kernel)
    max_reduce_blocks: int = MAX_GRID_YZ  #: cap on the reduction's grid.x (it loops too)

    def __post_init__(self):
        cuda_launch.check_positive_fields(self)
        if self.gather_block_x * self.gather_block_y > 1024:
            raise ValueError("KernelConfig: gather_block_x * gather_block_y must be <= 1024")
        if self.vg_block_x * self.vg_block_y > 1024:
            raise ValueError("KernelConfig: vg_block_x * vg_block_y must be <= 1024")
        if self.vg_block_y & (self.vg_block_y - 1):
            raise ValueError(f"KernelConfig.vg_block_y must be a power of two; got {self.vg_block_y}")
        if self.vg_block_x * self.vg_block_y < self.vg_kpt:
            raise ValueError("KernelConfig: a value-grad block needs at least vg_kpt threads")
        if self.reduce_block > 1024:
            raise ValueError("KernelConfig.reduce_block must be <= 1024")
        if self.max_grid_y > MAX_GRID_YZ or self.max_reduce_blocks > MAX_GRID_X:
            raise ValueError("KernelConfig: grid caps exceed the CUDA limits")

    def defines(self) -> tuple[str, ...]:
        """The ``-D`` options that compile these constants into the kernels."""
        return cuda_launch.config_defines(self, COMPILED_FIELDS)


DEFAULT_CONFIG = KernelConfig()


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """Grid and block of one kernel call (and, for value grad, of its reduction pass)."""

    kernel: str  #: entry point without the dtype suffix, e.g. ``"diag_forward"``
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    splits: int = 1  #: value grad: batch splits (grid.z); > 1 needs the reduction pass
    batch_per_split: int = 0  #: value grad: batch rows per split
    reduce_grid: tuple[int, int, int] | None = None
    reduce_block: tuple[int, int, int] | None = None


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=1024)
def launch_config(kind: str, B: int, m: int, n: int, K: int,
                  config: KernelConfig | None = None) -> LaunchPlan:
    """The launch geometry of ``kind`` (``"forward"``, ``"input_grad"`` or ``"value_grad"``).

    Pure Python; all sizes must be positive. The plan covers every output element: tiles that
    do not fit under the grid caps are walked by grid-stride loops inside the kernels.
    """
    cfg = DEFAULT_CONFIG if config is None else config
    B, m, n, K = (operator.index(v) for v in (B, m, n, K))
    if min(B, m, n, K) < 1:
        raise ValueError(f"launch_config needs positive sizes; got B={B}, m={m}, n={n}, K={K}")
    if m + n > _INT32_MAX:
        # the kernels form t + offset < m + n in 32-bit ints
        raise ValueError(f"m + n must be < 2**31 for the CUDA kernels; got m={m}, n={n}")
    L = min(m, n)
    if kind in ("forward", "input_grad"):
        n_out = m if kind == "forward" else n
        grid_x = _cdiv(n_out, cfg.gather_block_x)
        grid_y = min(_cdiv(B, cfg.gather_block_y * cfg.gather_rows), cfg.max_grid_y)
        return LaunchPlan(kernel=f"diag_{kind}", grid=(grid_x, grid_y, 1),
                          block=(cfg.gather_block_x, cfg.gather_block_y, 1))
    if kind == "value_grad":
        grid_x = _cdiv(L, cfg.vg_block_x)
        grid_y = min(_cdiv(K, cfg.vg_kpt), cfg.max_grid_y)
        # Split the batch over grid.z only as far as needed to reach the target block count,
        # and never below vg_min_batch_per_split rows per split (each split costs a (K, L)
        # partial buffer write and read).
        want = _cdiv(cfg.vg_target_blocks, grid_x * grid_y)
        splits = max(1, min(want, _cdiv(B, cfg.vg_min_batch_per_split), MAX_GRID_YZ))
        batch_per_split = _cdiv(B, splits)
        splits = _cdiv(B, batch_per_split)  # no empty splits
        block = (cfg.vg_block_x, cfg.vg_block_y, 1)
        if splits == 1:
            return LaunchPlan(kernel="diag_value_grad", grid=(grid_x, grid_y, 1), block=block,
                              splits=1, batch_per_split=batch_per_split)
        reduce_x = min(_cdiv(K * L, cfg.reduce_block), cfg.max_reduce_blocks)
        return LaunchPlan(kernel="diag_value_grad", grid=(grid_x, grid_y, splits), block=block,
                          splits=splits, batch_per_split=batch_per_split,
                          reduce_grid=(reduce_x, 1, 1), reduce_block=(cfg.reduce_block, 1, 1))
    raise ValueError(f"kind must be 'forward', 'input_grad' or 'value_grad'; got {kind!r}")


# ---- compilation ------------------------------------------------------------------------

#: The entry points, launched through `diagnet.cuda_launch` (which checks every argument).
_KERNELS = {kernel.entry: kernel for kernel in (
    cuda_launch.Kernel(KERNEL_FILE, "diag_forward",
                       "x:F offsets:I values:F y:O B:i m:i n:i K:i", "DIAG"),
    cuda_launch.Kernel(KERNEL_FILE, "diag_input_grad",
                       "dy:F offsets:I values:F dx:O B:i m:i n:i K:i", "DIAG"),
    cuda_launch.Kernel(KERNEL_FILE, "diag_value_grad",
                       "dy:F x:F offsets:I out:O B:i m:i n:i K:i batch_per_split:i", "DIAG"),
    cuda_launch.Kernel(KERNEL_FILE, "diag_value_grad_reduce", "partial:F out:O S:i KL:l", "DIAG"),
)}


def kernel_source() -> str:
    """The CUDA C source of the kernels, as shipped in the ``diagnet.kernels`` package."""
    return cuda_launch.source(KERNEL_FILE)


def compile_options(dtype, config: KernelConfig | None = None) -> tuple[str, ...]:
    """The NVRTC options of the module for ``dtype``: tuning constants and dtype selection."""
    cfg = DEFAULT_CONFIG if config is None else config
    return cuda_launch.compile_options("DIAG", dtype, _defines(cfg))


@functools.lru_cache(maxsize=None)
def _defines(config: KernelConfig) -> tuple[str, ...]:
    # rendered once per config: the tuple is also the memo key of the compiled module
    return config.defines()


def _cupy():
    """CuPy, or a RuntimeError saying why it cannot be used."""
    return cuda_launch.require_cupy("the CUDA diagonal kernels")


def _launch(entry: str, dtype, grid, block, args, config: KernelConfig) -> None:
    _KERNELS[entry](dtype, grid, block, args, defines=_defines(config))


def clear_cache() -> None:
    """Forget compiled modules (e.g. after switching devices, or in tests)."""
    cuda_launch.clear_cache()


# ---- argument checks --------------------------------------------------------------------


def _type_name(a) -> str:
    t = type(a)
    return f"{t.__module__}.{t.__qualname__}"


def _float_array(cp, name: str, a, ndim: int, dtype=None, dtype_of: str = ""):
    """``a`` as a contiguous float32/float64 CuPy array, or a TypeError/ValueError."""
    if not isinstance(a, cp.ndarray):
        raise TypeError(f"{name} must be a cupy.ndarray on the GPU; got {_type_name(a)}")
    if a.dtype not in _DTYPE_SUFFIX:
        raise TypeError(f"{name} must be float32 or float64; got dtype {a.dtype}")
    if dtype is not None and a.dtype != dtype:
        raise TypeError(f"{name} must have the dtype of {dtype_of} ({dtype}); got {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D; got shape {tuple(a.shape)}")
    return cp.ascontiguousarray(a)


def _offsets(cp, offsets, K: int | None):
    """``offsets`` as a contiguous int32 CuPy array of length ``K``.

    Host arrays and sequences are accepted and uploaded (``K`` ints; the reference accepts
    them too). Values are not range-checked or sort-checked here (that would synchronise with
    the GPU); the kernels reduce them modulo ``P``, so an out-of-range offset gives wrong
    numbers but never an out-of-bounds access. The long-side gather also relies on the reduced
    offsets being sorted (it binary-searches them); unsorted ones likewise give wrong numbers,
    never an out-of-bounds access.
    """
    if not isinstance(offsets, cp.ndarray):
        host = np.asarray(offsets)
        if host.dtype == object or not (host.size == 0 or np.issubdtype(host.dtype, np.integer)):
            raise TypeError(f"offsets must be integers; got {_type_name(offsets)} of dtype {host.dtype}")
        offsets = cp.asarray(host.astype(np.int32, copy=False))
    elif not np.issubdtype(offsets.dtype, np.integer):
        raise TypeError(f"offsets must have an integer dtype; got {offsets.dtype}")
    if offsets.ndim != 1:
        raise ValueError(f"offsets must be 1-D; got shape {tuple(offsets.shape)}")
    if K is not None and offsets.shape[0] != K:
        raise ValueError(f"offsets must have length K = values.shape[0] = {K}; got {offsets.shape[0]}")
    return cp.ascontiguousarray(offsets, dtype=np.int32)


def prepare_offsets(offsets):
    """``offsets`` as the contiguous int32 CuPy array the kernels read (no copy if it is one).

    Convert once and reuse: `forward`, `input_grad` and `value_grad` otherwise convert
    int64 offsets on every call.
    """
    return _offsets(_cupy(), offsets, None)


def _dim(name: str, value) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int; got {_type_name(value)}") from None
    if not 0 <= value <= _INT32_MAX:
        raise ValueError(f"{name} must be in [0, 2**31 - 1] (the kernels take 32-bit sizes); got {value}")
    return value


def _check_sizes(**sizes) -> None:
    for name, value in sizes.items():
        _dim(name, value)


# ---- launchers ----------------------------------------------------------------------------


def forward(x, offsets, values, m, *, config: KernelConfig | None = None):
    """``y = x @ W.T`` for the diagonal weight ``W`` of shape ``(m, x.shape[1])``; ``(B, m)``."""
    return _launch_gather("forward", x, "x", offsets, values, m, "m", config)


def input_grad(dy, offsets, values, n, *, config: KernelConfig | None = None):
    """``dx = dy @ W`` for the diagonal weight of shape ``(dy.shape[1], n)``; ``(B, n)``."""
    return _launch_gather("input_grad", dy, "dy", offsets, values, n, "n", config)


def _launch_gather(kind: str, inp, inp_name: str, offsets, values, n_out, out_name: str,
                   config: KernelConfig | None):
    """The body of `forward` (``out_name`` ``"m"``) and `input_grad` (``out_name`` ``"n"``).

    ``inp`` is the ``(B, n_in)`` operand, named ``inp_name`` in error messages; ``n_out`` is
    the output width (the other dimension of the weight); the result is ``(B, n_out)``.
    """
    cp = _cupy()
    cfg = DEFAULT_CONFIG if config is None else config
    inp = _float_array(cp, inp_name, inp, 2)
    values = _float_array(cp, "values", values, 2, inp.dtype, inp_name)
    n_out = _dim(out_name, n_out)
    B, n_in = inp.shape
    K = values.shape[0]
    offsets = _offsets(cp, offsets, K)
    m, n = (n_out, n_in) if out_name == "m" else (n_in, n_out)
    if values.shape[1] != min(m, n):
        raise ValueError(f"values must have shape (K, min(m, n)) = ({K}, {min(m, n)}); "
                         f"got {tuple(values.shape)}")
    in_name = "n" if out_name == "m" else "m"
    _check_sizes(**{"B": B, in_name: n_in, "K": K})
    if min(B, m, n, K) == 0:
        return cp.zeros((B, n_out), dtype=inp.dtype)
    out = cp.empty((B, n_out), dtype=inp.dtype)
    plan = launch_config(kind, B, m, n, K, cfg)
    _launch(plan.kernel, inp.dtype, plan.grid, plan.block,
            (inp, offsets, values, out, B, m, n, K), cfg)
    return out


def value_grad(dy, x, offsets, *, config: KernelConfig | None = None):
    """``dvalues[k, t] = sum_b dy[b, row_k(t)] * x[b, col_k(t)]``; ``(K, min(m, n))``."""
    cp = _cupy()
    cfg = DEFAULT_CONFIG if config is None else config
    dy = _float_array(cp, "dy", dy, 2)
    x = _float_array(cp, "x", x, 2, dy.dtype, "dy")
    if x.shape[0] != dy.shape[0]:
        raise ValueError(f"x and dy must have the same batch size; got x {tuple(x.shape)}, "
                         f"dy {tuple(dy.shape)}")
    offsets = _offsets(cp, offsets, None)
    B, m = dy.shape
    n = x.shape[1]
    K, L = offsets.shape[0], min(m, n)
    _check_sizes(B=B, m=m, n=n, K=K)
    if min(B, K, L) == 0:
        return cp.zeros((K, L), dtype=dy.dtype)
    out = cp.empty((K, L), dtype=dy.dtype)
    plan = launch_config("value_grad", B, m, n, K, cfg)
    target = out if plan.splits == 1 else cp.empty((plan.splits, K, L), dtype=dy.dtype)
    _launch(plan.kernel, dy.dtype, plan.grid, plan.block,
            (dy, x, offsets, target, B, m, n, K, plan.batch_per_split), cfg)
    if plan.splits > 1:
        _launch("diag_value_grad_reduce", dy.dtype, plan.reduce_grid, plan.reduce_block,
                (target, out, plan.splits, K * L), cfg)
    return out
