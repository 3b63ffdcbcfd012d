"""CUDA kernels of GELU and of bias + GELU or ReLU: launch ``kernels/gelu.cu``.

The functions have the signatures of the CPU kernels in `diagnet.fused.gelu` and
`diagnet.fused.relu` (plus a keyword-only ``config=``) and take CuPy float32/float64 arrays;
results are new CuPy arrays of the input dtype. The composed reference they are tested
against is the array code of `diagnet.ops.activation` (`GELU`, `BiasGELU`, `BiasReLU`). This
module imports without CuPy; only calling the functions needs it.

Kernel design (details in ``docs/kernels.md`` and the comments of the ``.cu`` file):

* **GELU**: one element-wise pass each way over the flat array, in a grid-stride loop of
  `GeluConfig.threads`-thread blocks (at most ``max_grid`` of them). The backward recomputes
  ``Phi`` (or the tanh form's sigmoid) from ``x`` instead of keeping it from the forward.
* **bias + GELU** over ``x`` ``(R, N)`` and ``bias`` ``(N,)``: a block holds ``block[1]``
  rows of ``block[0]`` threads (a power of two near ``N``), so consecutive threads read
  consecutive columns of a row and of the bias. The forward writes ``y = gelu(x + bias)``;
  the backward writes ``dx = dy * gelu'(x + bias)`` and, when the bias needs a gradient,
  partial sums of ``dbias = dx.sum(axis=0)``: about ``backward_blocks`` blocks each own a run
  of rows, and each thread row adds its rows into its own partial row. A second kernel adds
  the partial rows in a fixed order: deterministic, no atomics (as the layer norm does for its
  parameter gradients).
* **bias + ReLU**: the same blocks, rows and reduction. The forward writes
  ``y = relu(x + bias)``; the backward reads that ``y`` (``y > 0`` is the mask) and ``dy``.

`launch_config` and `flat_config` are pure Python (no CuPy), so the tests hand the real
launch geometry to the SIMT emulation harness.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import ClassVar

from .. import cuda_launch
from .cuda_rows import RowKernelConfig, RowKernelPlan, cdiv, row_kernel_plan

__all__ = ["gelu", "gelu_grad", "bias_gelu", "bias_gelu_grad", "bias_relu", "bias_relu_grad",
           "launch_config", "flat_config", "GeluConfig", "DEFAULT_CONFIG"]

KERNEL_FILE = "gelu.cu"
MACRO_PREFIX = "GELU"

#: GeluConfig fields that are compiled into the kernels, and their ``#define`` names.
COMPILED_FIELDS = {"threads": "GELU_THREADS", "reduce_x": "GELU_REDUCE_X",
                   "reduce_y": "GELU_REDUCE_Y"}


@dataclasses.dataclass(frozen=True)
class GeluConfig(RowKernelConfig):
    """Tuning constants of the GELU kernels: those of the bias kernels (`RowKernelConfig`;
    the defaults match the ``#ifndef`` defaults of ``kernels/gelu.cu``), whose ``threads``
    and ``max_grid`` also steer the flat kernels (`flat_config`). The fields in
    `COMPILED_FIELDS` become ``-D`` options of the compiled module.
    """

    compiled_fields: ClassVar[dict[str, str]] = COMPILED_FIELDS


DEFAULT_CONFIG = GeluConfig()


@dataclasses.dataclass(frozen=True)
class FlatPlan:
    """Grid and block of the flat GELU kernels for ``n`` elements."""

    grid: tuple[int, int, int]
    block: tuple[int, int, int]


#: the plan of the bias kernels (forward, backward, reduction) for one ``(R, N)``
LaunchPlan = RowKernelPlan


@functools.lru_cache(maxsize=1024)
def flat_config(n: int, config: GeluConfig | None = None) -> FlatPlan:
    """The launch geometry of the flat kernels for ``n >= 1`` elements. Pure Python."""
    cfg = DEFAULT_CONFIG if config is None else config
    n = operator.index(n)
    if n < 1:
        raise ValueError(f"flat_config needs n >= 1; got {n}")
    return FlatPlan(grid=(min(cdiv(n, cfg.threads), cfg.max_grid), 1, 1),
                    block=(cfg.threads, 1, 1))


@functools.lru_cache(maxsize=1024)
def launch_config(R: int, N: int, config: GeluConfig | None = None) -> LaunchPlan:
    """The launch geometry of the bias kernels for ``R`` rows of width ``N`` (both positive):
    one column per thread, one bias sum per column. Pure Python."""
    cfg = DEFAULT_CONFIG if config is None else config
    return row_kernel_plan(R, N, cfg, columns_per_thread=1, sums_per_column=1)


_FORWARD = cuda_launch.Kernel(KERNEL_FILE, "gelu_forward", "x:F y:O n:l tanh_form:i",
                              MACRO_PREFIX)
_BACKWARD = cuda_launch.Kernel(KERNEL_FILE, "gelu_backward", "x:F dy:F dx:O n:l tanh_form:i",
                               MACRO_PREFIX)
_BIAS_FORWARD = cuda_launch.Kernel(KERNEL_FILE, "bias_gelu_forward",
                                   "x:F bias:F y:O R:i N:i tanh_form:i", MACRO_PREFIX)
_BIAS_BACKWARD = cuda_launch.Kernel(
    KERNEL_FILE, "bias_gelu_backward",
    "x:F bias:F dy:F dx:O partial:O R:i N:i tanh_form:i want_bias:i rows_per_block:i",
    MACRO_PREFIX)
_RELU_FORWARD = cuda_launch.Kernel(KERNEL_FILE, "bias_relu_forward", "x:F bias:F y:O R:i N:i",
                                   MACRO_PREFIX)
_RELU_BACKWARD = cuda_launch.Kernel(
    KERNEL_FILE, "bias_relu_backward",
    "y:F dy:F dx:O partial:O R:i N:i want_bias:i rows_per_block:i", MACRO_PREFIX)
_BIAS_REDUCE = cuda_launch.Kernel(KERNEL_FILE, "bias_gelu_bias_reduce",
                                  "partial:F out:O P:i N:i", MACRO_PREFIX)


@functools.lru_cache(maxsize=None)
def _defines(config: GeluConfig) -> tuple[str, ...]:
    # rendered once per config: the tuple is also the memo key of the compiled module
    return config.defines()


def compile_options(dtype, config: GeluConfig | None = None) -> tuple[str, ...]:
    """The NVRTC options of the module for ``dtype``: tuning constants and dtype selection."""
    cfg = DEFAULT_CONFIG if config is None else config
    return cuda_launch.compile_options(MACRO_PREFIX, dtype, _defines(cfg))


def _cupy():
    return cuda_launch.require_cupy("the CUDA GELU kernels")


def _checked_rows(x, bias, name="bias_gelu"):
    """``(R, N)`` of ``x``, after the O(1) checks that keep the kernels in bounds."""
    if x.ndim != 2 or bias.shape != x.shape[1:]:
        raise ValueError(f"{name}: expected x (R, N) and bias (N,); got x {tuple(x.shape)}, "
                         f"bias {tuple(bias.shape)}")
    if bias.dtype != x.dtype:
        raise TypeError(f"{name}: bias must have x's dtype {x.dtype}; got {bias.dtype}")
    return x.shape


def gelu(x, approximate="none", *, config: GeluConfig | None = None):
    """GELU of the CuPy array ``x`` (float32 or float64, any shape), a new array;
    ``approximate`` is ``"none"`` (the erf form) or ``"tanh"``."""
    cp = _cupy()
    cfg = DEFAULT_CONFIG if config is None else config
    flat = cp.ascontiguousarray(x).reshape(-1)  # (ascontiguousarray makes a 0-d array 1-d)
    y = cp.empty_like(flat)
    if flat.size:
        plan = flat_config(flat.size, cfg)
        _FORWARD(x.dtype, plan.grid, plan.block, (flat, y, flat.size, approximate == "tanh"),
                 defines=_defines(cfg))
    return y.reshape(x.shape)


def gelu_grad(x, gy, approximate="none", *, config: GeluConfig | None = None):
    """``gy * gelu'(x)``: the input gradient of `gelu`; ``gy`` of ``x``'s shape."""
    cp = _cupy()
    cfg = DEFAULT_CONFIG if config is None else config
    if gy.shape != x.shape:
        raise ValueError(f"gy must have x's shape {tuple(x.shape)}; got {tuple(gy.shape)}")
    flat = cp.ascontiguousarray(x).reshape(-1)
    gflat = cp.ascontiguousarray(gy, dtype=x.dtype).reshape(-1)
    gx = cp.empty_like(flat)
    if flat.size:
        plan = flat_config(flat.size, cfg)
        _BACKWARD(x.dtype, plan.grid, plan.block,
                  (flat, gflat, gx, flat.size, approximate == "tanh"), defines=_defines(cfg))
    return gx.reshape(x.shape)


def bias_gelu(x, bias, approximate="none", *, config: GeluConfig | None = None):
    """``gelu(x + bias)`` for ``x`` ``(R, N)`` and ``bias`` ``(N,)`` of ``x``'s dtype."""
    cp = _cupy()
    cfg = DEFAULT_CONFIG if config is None else config
    R, N = _checked_rows(x, bias)
    x, bias = cp.ascontiguousarray(x), cp.ascontiguousarray(bias)
    y = cp.empty_like(x)
    if x.size:
        plan = launch_config(R, N, cfg)
        _BIAS_FORWARD(x.dtype, plan.forward_grid, plan.block,
                      (x, bias, y, R, N, approximate == "tanh"), defines=_defines(cfg))
    return y


def bias_gelu_grad(x, bias, gy, approximate="none", want_bias=True, *,
                   config: GeluConfig | None = None):
    """``(dx, dbias)`` of `bias_gelu`: ``dx = gy * gelu'(x + bias)`` ``(R, N)`` and
    ``dbias = dx.sum(axis=0)`` ``(N,)`` (None unless ``want_bias``)."""
    cp = _cupy()
    cfg = DEFAULT_CONFIG if config is None else config
    R, N = _checked_rows(x, bias)
    if gy.shape != x.shape:
        raise ValueError(f"gy must have x's shape {tuple(x.shape)}; got {tuple(gy.shape)}")
    x, bias = cp.ascontiguousarray(x), cp.ascontiguousarray(bias)
    gy = cp.ascontiguousarray(gy, dtype=x.dtype)
    return _bias_backward(_BIAS_BACKWARD, (x, bias, gy), (approximate == "tanh",), want_bias,
                          cfg)


def _bias_backward(kernel, inputs, flags, want_bias, cfg):
    """``(dx, dbias)`` of a bias + activation: ``kernel`` (the GELU or ReLU backward) run
    over the ``(R, N)`` rows of ``inputs[-1]`` (the output gradient, C-contiguous) with
    arguments ``(*inputs, dx, partial, R, N, *flags, want_bias, rows_per_block)``, then the
    fixed-order sum of its partial rows (`_reduce_bias`) when ``want_bias``."""
    cp = _cupy()
    gy = inputs[-1]
    R, N = gy.shape
    dx = cp.empty_like(gy)
    if not gy.size:
        return dx, (cp.zeros(N, dtype=gy.dtype) if want_bias else None)
    plan = launch_config(R, N, cfg)
    # without want_bias the partial sums are never touched: a one-element stand-in
    partial = cp.empty((plan.partial_rows, N) if want_bias else 1, dtype=gy.dtype)
    defines = _defines(cfg)
    kernel(gy.dtype, plan.backward_grid, plan.block,
           (*inputs, dx, partial, R, N, *flags, want_bias, plan.rows_per_block),
           defines=defines)
    if not want_bias:
        return dx, None
    return dx, _reduce_bias(partial, plan, defines)


def _reduce_bias(partial, plan, defines):
    """``dbias`` ``(N,)``: the sum of the backward's ``(P, N)`` partial rows, in a fixed order."""
    db = _cupy().empty(partial.shape[1], dtype=partial.dtype)
    _BIAS_REDUCE(partial.dtype, plan.reduce_grid, plan.reduce_block,
                 (partial, db, plan.partial_rows, partial.shape[1]), defines=defines)
    return db


def bias_relu(x, bias, *, config: GeluConfig | None = None):
    """``relu(x + bias)`` for ``x`` ``(R, N)`` and ``bias`` ``(N,)`` of ``x``'s dtype."""
    cp = _cupy()
    cfg = DEFAULT_CONFIG if config is None else config
    R, N = _checked_rows(x, bias, "bias_relu")
    x, bias = cp.ascontiguousarray(x), cp.ascontiguousarray(bias)
    y = cp.empty_like(x)
    if x.size:
        plan = launch_config(R, N, cfg)
        _RELU_FORWARD(x.dtype, plan.forward_grid, plan.block, (x, bias, y, R, N),
                      defines=_defines(cfg))
    return y


def bias_relu_grad(y, gy, want_bias=True, *, config: GeluConfig | None = None):
    """``(dx, dbias)`` of `bias_relu` from its output ``y`` ``(R, N)`` and the output gradient
    ``gy``: ``dx = gy * (y > 0)`` ``(R, N)`` and ``dbias = dx.sum(axis=0)`` ``(N,)`` (None
    unless ``want_bias``)."""
    cp = _cupy()
    cfg = DEFAULT_CONFIG if config is None else config
    if y.ndim != 2:
        raise ValueError(f"bias_relu_grad: expected a 2-d y; got shape {tuple(y.shape)}")
    if gy.shape != y.shape:
        raise ValueError(f"bias_relu_grad: gy must have y's shape {tuple(y.shape)}; "
                         f"got {tuple(gy.shape)}")
    y = cp.ascontiguousarray(y)
    gy = cp.ascontiguousarray(gy, dtype=y.dtype)
    return _bias_backward(_RELU_BACKWARD, (y, gy), (), want_bias, cfg)
