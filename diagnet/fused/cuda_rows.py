"""Launch geometry shared by the CUDA row kernels of bias + GELU / ReLU and layer norm.

`diagnet.fused.gelu_cuda` (its bias kernels) and `diagnet.fused.layer_norm_cuda` launch the
same three kinds of kernel over ``R`` rows of ``N`` columns (``kernels/gelu.cu``,
``kernels/layer_norm.cu``):

* **forward**: blocks of ``(bx, by)`` threads, ``bx`` across a row and ``by`` rows at a time;
  a grid-stride loop over the groups of ``by`` rows beyond ``max_grid`` blocks;
* **backward**: the same blocks, each owning ``rows_per_block`` consecutive rows, write one
  partial sum per column and block row (``partial_rows`` partial sums per column, added in a
  fixed order, so the result does not depend on scheduling);
* **reduction**: blocks of ``(reduce_x, reduce_y)`` threads add the partial sums of
  ``reduce_x`` columns, ``reduce_y`` lanes per column.

Both take the same five tuning constants (`RowKernelConfig`), three of them compiled into the
kernels, and the same plan (`RowKernelPlan`); they differ in how many columns a thread takes
in a row and in how many sums per column the reduction writes (bias: 1; layer norm: 2, the
weight's and the bias's).

The integer helpers `cdiv`, `is_power_of_two` and `INT32_MAX` also serve the launchers of
softmax (`diagnet.fused.softmax_cuda`) and attention (`diagnet.fused.attention_cuda`).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import ClassVar

from .. import cuda_launch

__all__ = ["RowKernelConfig", "RowKernelPlan", "row_kernel_plan", "cdiv", "is_power_of_two",
           "INT32_MAX"]

#: the largest row count or width the kernels' ``int`` parameters take
INT32_MAX = 2**31 - 1


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints, ``b >= 1``."""
    return -(-a // b)


def is_power_of_two(v: int) -> bool:
    """Whether the positive int ``v`` is a power of two."""
    return v & (v - 1) == 0


@dataclasses.dataclass(frozen=True)
class RowKernelConfig:
    """Tuning constants of a set of row kernels (the defaults match the ``#ifndef`` defaults
    of the ``.cu`` files).

    A subclass names its kernels' macros in ``compiled_fields`` (field -> ``#define`` name):
    those fields become ``-D`` options of the compiled module (`defines`); the others only
    steer the launch plan.
    """

    compiled_fields: ClassVar[dict[str, str]] = {}

    threads: int = 256  #: threads per forward/backward block (power of two, <= 1024)
    reduce_x: int = 32  #: columns per block of the partial-sum reduction
    reduce_y: int = 8  #: lanes per column of the reduction (power of two)
    backward_blocks: int = 264  #: the backward uses about this many blocks (2 per H100 SM)
    max_grid: int = 65535  #: cap on grid.x of the forward and the reduction (they loop beyond)

    def __post_init__(self):
        cuda_launch.check_positive_fields(self)
        name = type(self).__name__
        if self.threads > 1024 or not is_power_of_two(self.threads):
            raise ValueError(f"{name}.threads must be a power of two <= 1024; "
                             f"got {self.threads}")
        if self.reduce_x * self.reduce_y > 1024 or not is_power_of_two(self.reduce_y):
            raise ValueError(f"{name}: reduce_y must be a power of two and "
                             f"reduce_x * reduce_y <= 1024; got {self.reduce_x} x {self.reduce_y}")

    def defines(self) -> tuple[str, ...]:
        """The ``-D`` options that compile these constants into the kernels."""
        return cuda_launch.config_defines(self, self.compiled_fields)


@dataclasses.dataclass(frozen=True)
class RowKernelPlan:
    """Grids and blocks of the forward, backward and reduction kernels for one ``(R, N)``."""

    block: tuple[int, int, int]  #: forward and backward: (threads per row, rows, 1)
    forward_grid: tuple[int, int, int]
    backward_grid: tuple[int, int, int]
    rows_per_block: int  #: backward: the rows each block owns (a multiple of block[1])
    partial_rows: int  #: backward: P = backward_grid[0] * block[1] partial sums per column
    reduce_grid: tuple[int, int, int]
    reduce_block: tuple[int, int, int]


def row_kernel_plan(R: int, N: int, cfg: RowKernelConfig, columns_per_thread: int,
                    sums_per_column: int) -> RowKernelPlan:
    """The launch geometry for ``R`` rows of width ``N`` (both in ``[1, 2**31)``): ``bx`` the
    smallest power of two of threads that covers a row at ``columns_per_thread`` columns each
    (at most ``cfg.threads``), ``by = cfg.threads // bx`` rows per block; the reduction's grid
    has ``sums_per_column`` rows. Pure Python."""
    R, N = operator.index(R), operator.index(N)
    if not (1 <= R <= INT32_MAX and 1 <= N <= INT32_MAX):
        raise ValueError(f"launch_config needs 1 <= R, N <= 2**31 - 1; got R={R}, N={N}")
    bx = min(cfg.threads, 1 << max(0, (cdiv(N, columns_per_thread) - 1).bit_length()))
    by = cfg.threads // bx
    groups = cdiv(R, by)
    rows_per_block = by * cdiv(groups, cfg.backward_blocks)
    blocks = cdiv(R, rows_per_block)
    return RowKernelPlan(
        block=(bx, by, 1),
        forward_grid=(min(groups, cfg.max_grid), 1, 1),
        backward_grid=(blocks, 1, 1),
        rows_per_block=rows_per_block,
        partial_rows=blocks * by,
        reduce_grid=(min(cdiv(N, cfg.reduce_x), cfg.max_grid), sums_per_column, 1),
        reduce_block=(cfg.reduce_x, cfg.reduce_y, 1),
    )
