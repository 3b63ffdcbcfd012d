"""CUDA kernels of layer norm: launch ``kernels/layer_norm.cu``.

`forward`, `backward`, `add_forward` and `add_backward` take CuPy arrays and have the
signatures of `diagnet.fused.layer_norm.reference_forward`, `reference_backward`,
`reference_add_forward` and `reference_add_backward` (plus a keyword-only ``config=``);
results are new CuPy arrays of the input dtype. The ``add_`` kernels are the plain ones with
the residual sum formed in the forward's first read of a row (and written out), and its
gradient added where the backward writes ``dx``. This module imports without
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
from typing import ClassVar

from .. import cuda_launch
from .cuda_rows import RowKernelConfig, RowKernelPlan, row_kernel_plan

__all__ = ["forward", "backward", "add_forward", "add_backward", "launch_config",
           "LayerNormConfig", "DEFAULT_CONFIG"]

KERNEL_FILE = "layer_norm.cu"
MACRO_PREFIX = "LN"

#: LayerNormConfig fields that are compiled into the kernels, and their ``#define`` names.
COMPILED_FIELDS = {"threads": "LN_THREADS", "reduce_x": "LN_REDUCE_X", "reduce_y": "LN_REDUCE_Y"}


@dataclasses.dataclass(frozen=True)
class LayerNormConfig(RowKernelConfig):
    """Tuning constants of the layer-norm kernels (`RowKernelConfig`; the defaults match the
    ``#ifndef`` defaults of ``kernels/layer_norm.cu``). The fields in `COMPILED_FIELDS`
    become ``-D`` options of the compiled module; the others only steer `launch_config`.
    """

    compiled_fields: ClassVar[dict[str, str]] = COMPILED_FIELDS


DEFAULT_CONFIG = LayerNormConfig()


#: the plan of the three kernels (forward, backward, reduction) for one ``(R, N)``
LaunchPlan = RowKernelPlan


@functools.lru_cache(maxsize=1024)
def launch_config(R: int, N: int, config: LayerNormConfig | None = None) -> LaunchPlan:
    """The launch geometry for ``R`` rows of width ``N`` (both positive): two columns per
    thread (the row's loads in flight without idle threads on narrow rows), two sums per
    column (the weight's and the bias's gradients). Pure Python."""
    cfg = DEFAULT_CONFIG if config is None else config
    return row_kernel_plan(R, N, cfg, columns_per_thread=2, sums_per_column=2)


_FORWARD = cuda_launch.Kernel(
    KERNEL_FILE, "layer_norm_forward",
    "x:F weight:F bias:F y:O mean:O rstd:O R:i N:i has_weight:i has_bias:i eps:f", MACRO_PREFIX)
_BACKWARD = cuda_launch.Kernel(
    KERNEL_FILE, "layer_norm_backward",
    "dy:F x:F weight:F mean:F rstd:F dx:O partial:O R:i N:i has_weight:i want_params:i "
    "rows_per_block:i", MACRO_PREFIX)
_ADD_FORWARD = cuda_launch.Kernel(
    KERNEL_FILE, "layer_norm_add_forward",
    "x:F res:F total:O weight:F bias:F y:O mean:O rstd:O R:i N:i has_weight:i has_bias:i eps:f",
    MACRO_PREFIX)
_ADD_BACKWARD = cuda_launch.Kernel(
    KERNEL_FILE, "layer_norm_add_backward",
    "gtotal:F dy:F total:F weight:F mean:F rstd:F dx:O partial:O R:i N:i has_weight:i "
    "want_params:i rows_per_block:i", MACRO_PREFIX)
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
    return _forward(x, None, weight, bias, eps, config)[1:]


def add_forward(x, residual, weight, bias, eps, *, config: LayerNormConfig | None = None):
    """``(total, y, mean, rstd)``: ``total = x + residual`` and its layer norm; see
    `diagnet.fused.layer_norm.reference_add_forward` (arguments checked by its caller)."""
    return _forward(x, residual, weight, bias, eps, config)


def _forward(x, residual, weight, bias, eps, config):
    cp = _cupy()
    cfg = DEFAULT_CONFIG if config is None else config
    x = cp.ascontiguousarray(x)
    R, N = x.shape
    total = None if residual is None else cp.empty_like(x)
    y = cp.empty_like(x)
    mean = cp.empty(R, dtype=x.dtype)
    rstd = cp.empty(R, dtype=x.dtype)
    if R == 0:
        return total, y, mean, rstd
    plan = launch_config(R, N, cfg)
    # a missing weight or bias is never read (has_weight, has_bias): x stands in for it
    w = x if weight is None else cp.ascontiguousarray(weight)
    b = x if bias is None else cp.ascontiguousarray(bias)
    tail = (w, b, y, mean, rstd, R, N, weight is not None, bias is not None, eps)
    if residual is None:
        _FORWARD(x.dtype, plan.forward_grid, plan.block, (x, *tail), defines=_defines(cfg))
    else:
        _ADD_FORWARD(x.dtype, plan.forward_grid, plan.block,
                     (x, cp.ascontiguousarray(residual), total, *tail), defines=_defines(cfg))
    return total, y, mean, rstd


def backward(dy, x, weight, mean, rstd, want_params, *, config: LayerNormConfig | None = None):
    """``(dx, dweight, dbias)`` of layer norm; see
    `diagnet.fused.layer_norm.reference_backward` (arguments checked by its caller)."""
    return _backward(None, dy, x, weight, mean, rstd, want_params, config)


def add_backward(gtotal, dy, total, weight, mean, rstd, want_params, *,
                 config: LayerNormConfig | None = None):
    """``(dx, dweight, dbias)`` of `add_forward`: ``dx = gtotal +`` the layer norm's input
    gradient; see `diagnet.fused.layer_norm.reference_add_backward` (arguments checked by
    its caller)."""
    return _backward(gtotal, dy, total, weight, mean, rstd, want_params, config)


def _backward(gtotal, dy, x, weight, mean, rstd, want_params, config):
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
    args = (dy, x, w, cp.ascontiguousarray(mean), cp.ascontiguousarray(rstd), dx, partial,
            R, N, weight is not None, want_params, plan.rows_per_block)
    if gtotal is None:
        _BACKWARD(x.dtype, plan.backward_grid, plan.block, args, defines=defines)
    else:
        _ADD_BACKWARD(x.dtype, plan.backward_grid, plan.block,
                      (cp.ascontiguousarray(gtotal), *args), defines=defines)
    if not want_params:
        return dx, None, None
    out = cp.empty((2, N), dtype=x.dtype)
    _REDUCE(x.dtype, plan.reduce_grid, plan.reduce_block, (partial, out, plan.partial_rows, N),
            defines=defines)
    return dx, out[0], out[1]
