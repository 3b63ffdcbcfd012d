"""CUDA kernels of layer norm: launch ``kernels/layer_norm.cu``.

`forward` and `backward` take CuPy arrays and have the signatures of
`diagnet.fused.layer_norm.reference_forward` and `reference_backward` (plus a keyword-only
``config=``); results are new CuPy arrays of the input dtype. This module imports without
CuPy; only calling them needs it.

Kernel design (details in ``docs/kernels.md`` and the comments of the ``.cu`` file):

* **One pass per row.** A block holds ``block[1]`` rows of ``block[0]`` threads each (a power
  of two, about half the row width: two columns per thread, at most `LayerNormConfig.threads`
  in the block). The row sums are trees in static shared memory, so the SIMT harness runs
  the kernels as they are and the results do not depend on scheduling.
* **Forward** saves ``mean`` and ``rstd`` ``(R,)`` for the backward. Rows beyond the grid
  (capped at ``max_grid`` blocks) are walked in a grid-stride loop.
* **Backward** writes ``dx`` and, when the parameters need gradients, partial sums of
  ``dweight`` and ``dbias``: about ``backward_blocks`` blocks each own a contiguous run of
  rows, and each thread row of a block adds its rows into its own partial row. A second
  kernel adds the ``P`` partial rows in a fixed order (deterministic, no atomics), as the
  diagonal value grad does with its batch splits.

`launch_config` is pure Python (no CuPy), so the tests hand the real launch geometry to the
SIMT emulation harness in ``tests/simt``.
"""

from __future__ import annotations

import dataclasses
import functools
import operator

from .. import cuda_launch

__all__ = ["forward", "backward", "launch_config", "LayerNormConfig", "DEFAULT_CONFIG"]

KERNEL_FILE = "layer_norm.cu"
MACRO_PREFIX = "LN"

#: LayerNormConfig fields that are compiled into the kernels, and their ``#define`` names.
COMPILED_FIELDS = {"threads": "LN_THREADS", "reduce_x": "LN_REDUCE_X", "reduce_y": "LN_REDUCE_Y"}

_INT32_MAX = 2**31 - 1


def _power_of_two(v: int) -> bool:
    return v & (v - 1) == 0


@dataclasses.dataclass(frozen=True)
class LayerNormConfig:
    """Tuning constants of the layer-norm kernels (defaults match the ``#ifndef`` defaults).

    The fields in `COMPILED_FIELDS` become ``-D`` options of the compiled module; the others
    only steer `launch_config`.
    """

    threads: int = 256  #: threads per forward/backward block (power of two, <= 1024)
    reduce_x: int = 32  #: columns per block of the partial-sum reduction
    reduce_y: int = 8  #: lanes per column of the reduction (power of two)
    backward_blocks: int = 264  #: the backward uses about this many blocks (2 per SM of an H100)
    max_grid: int = 65535  #: cap on grid.x of the forward and the reduction (they loop beyond)

    def __post_init__(self):
        cuda_launch.check_positive_fields(self)
        if self.threads > 1024 or not _power_of_two(self.threads):
            raise ValueError(f"LayerNormConfig.threads must be a power of two <= 1024; "
                             f"got {self.threads}")
        if self.reduce_x * self.reduce_y > 1024 or not _power_of_two(self.reduce_y):
            raise ValueError("LayerNormConfig: reduce_y must be a power of two and "
                             f"reduce_x * reduce_y <= 1024; got {self.reduce_x} x {self.reduce_y}")

    def defines(self) -> tuple[str, ...]:
        """The ``-D`` options that compile these constants into the kernels."""
        return cuda_launch.config_defines(self, COMPILED_FIELDS)


DEFAULT_CONFIG = LayerNormConfig()


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """Grids and blocks of the three kernels for one ``(R, N)``."""

    block: tuple[int, int, int]  #: forward and backward: (threads per row, rows, 1)
    forward_grid: tuple[int, int, int]
    backward_grid: tuple[int, int, int]
    rows_per_block: int  #: backward: the rows each block owns (a multiple of block[1])
    partial_rows: int  #: backward: P = backward_grid[0] * block[1] partial sums per column
    reduce_grid: tuple[int, int, int]
    reduce_block: tuple[int, int, int]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=1024)
def launch_config(R: int, N: int, config: LayerNormConfig | None = None) -> LaunchPlan:
    """The launch geometry for ``R`` rows of width ``N`` (both positive). Pure Python."""
    cfg = DEFAULT_CONFIG if config is None else config
    R, N = operator.index(R), operator.index(N)
    if not (1 <= R <= _INT32_MAX and 1 <= N <= _INT32_MAX):
        raise ValueError(f"launch_config needs 1 <= R, N <= 2**31 - 1; got R={R}, N={N}")
    # two columns per thread: the row's loads in flight without idle threads on narrow rows
    bx = min(cfg.threads, 1 << max(0, (_cdiv(N, 2) - 1).bit_length()))
    by = cfg.threads // bx
    groups = _cdiv(R, by)
    rows_per_block = by * _cdiv(groups, cfg.backward_blocks)
    blocks = _cdiv(R, rows_per_block)
    return LaunchPlan(
        block=(bx, by, 1),
        forward_grid=(min(groups, cfg.max_grid), 1, 1),
        backward_grid=(blocks, 1, 1),
        rows_per_block=rows_per_block,
        partial_rows=blocks * by,
        reduce_grid=(min(_cdiv(N, cfg.reduce_x), cfg.max_grid), 2, 1),
        reduce_block=(cfg.reduce_x, cfg.reduce_y, 1),
    )


_FORWARD = cuda_launch.Kernel(
    KERNEL_FILE, "layer_norm_forward",
    "x:F weight:F bias:F y:O mean:O rstd:O R:i N:i has_weight:i has_bias:i eps:f", MACRO_PREFIX)
_BACKWARD = cuda_launch.Kernel(
    KERNEL_FILE, "layer_norm_backward",
    "dy:F x:F weight:F mean:F rstd:F dx:O partial:O R:i N:i has_weight:i want_params:i "
    "rows_per_block:i", MACRO_PREFIX)
_REDUCE = cuda_launch.Kernel(KERNEL_FILE, "layer_norm_param_reduce", "partial:F out:O P:i N:i",
                             MACRO_PREFIX)


@functools.lru_cache(maxsize=None)
def _defines(config: LayerNormConfig) -> tuple[str, ...]:
    # rendered once per config: the tuple is also the memo key of the compiled module
    return config.defines()


def compile_options(dtype, config: LayerNormConfig | None = None) -> tuple[str, ...]:
    """The NVRTC options of the module for ``dtype``: tuning constants and dtype selection."""
    cfg = DEFAULT_CONFIG if config is None else config
    return cuda_launch.compile_options(MACRO_PREFIX, dtype, _defines(cfg))


def _cupy():
    return cuda_launch.require_cupy("the CUDA layer-norm kernels")


def forward(x, weight, bias, eps, *, config: LayerNormConfig | None = None):
    """``(y, mean, rstd)`` of layer norm over the rows of ``x`` ``(R, N)``; see
    `diagnet.fused.layer_norm.reference_forward` (arguments checked by its caller)."""
    cp = _cupy()
    cfg = DEFAULT_CONFIG if config is None else config
    x = cp.ascontiguousarray(x)
    R, N = x.shape
    y = cp.empty_like(x)
    mean = cp.empty(R, dtype=x.dtype)
    rstd = cp.empty(R, dtype=x.dtype)
    if R == 0:
        return y, mean, rstd
    plan = launch_config(R, N, cfg)
    # a missing weight or bias is never read (has_weight, has_bias): x stands in for it
    w = x if weight is None else cp.ascontiguousarray(weight)
    b = x if bias is None else cp.ascontiguousarray(bias)
    _FORWARD(x.dtype, plan.forward_grid, plan.block,
             (x, w, b, y, mean, rstd, R, N, weight is not None, bias is not None, eps),
             defines=_defines(cfg))
    return y, mean, rstd


def backward(dy, x, weight, mean, rstd, want_params, *, config: LayerNormConfig | None = None):
    """``(dx, dweight, dbias)`` of layer norm; see
    `diagnet.fused.layer_norm.reference_backward` (arguments checked by its caller)."""
    cp = _cupy()
    cfg = DEFAULT_CONFIG if config is None else config
    dy, x = cp.ascontiguousarray(dy), cp.ascontiguousarray(x)
    R, N = x.shape
    dx = cp.empty_like(x)
    if R == 0:
        if not want_params:
            return dx, None, None
        return dx, cp.zeros(N, dtype=x.dtype), cp.zeros(N, dtype=x.dtype)
    plan = launch_config(R, N, cfg)
    w = x if weight is None else cp.ascontiguousarray(weight)
    # without want_params the partial sums are never touched: a one-element stand-in
    partial = cp.empty((2, plan.partial_rows, N) if want_params else 1, dtype=x.dtype)
    defines = _defines(cfg)
    _BACKWARD(x.dtype, plan.backward_grid, plan.block,
              (dy, x, w, cp.ascontiguousarray(mean), cp.ascontiguousarray(rstd), dx, partial,
               R, N, weight is not None, want_params, plan.rows_per_block), defines=defines)
    if not want_params:
        return dx, None, None
    out = cp.empty((2, N), dtype=x.dtype)
    _REDUCE(x.dtype, plan.reduce_grid, plan.reduce_block, (partial, out, plan.partial_rows, N),
            defines=defines)
    return dx, out[0], out[1]
