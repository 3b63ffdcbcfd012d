"""CUDA kernels of scaled dot-product attention for small heads: launch ``kernels/attention.cu``.

`forward` and `backward` take CuPy arrays and have the signatures of
`diagnet.ops.attention.reference_forward` and ``reference_backward`` (plus a keyword-only
``config=``); results are new C-contiguous CuPy arrays of the input dtype. They run only
shapes the kernels hold (`fits`): at most `AttentionConfig.max_keys` keys and head widths
``E``, ``Ev`` of at most ``max_dim_f32`` (float32) or ``max_dim_f64`` (float64), nothing
empty. The caller, `diagnet.ops.attention`, sends every other shape to the composed CuPy
version; called with such a shape, these functions raise `ValueError` before any launch (the
kernels' shared tiles would overflow). This module imports without CuPy.

Kernel design (details in ``docs/kernels.md`` and the comments of the ``.cu`` file):

* A *lane* is one (batch, head) pair. **Forward**: one block per lane and tile of
  ``query_tile`` queries holds the lane's ``k`` and ``v`` and the tile's ``q`` in static
  shared memory, forms the scores, the row softmax (maximum and sum by one thread per row)
  and ``out``, and writes the weights ``(B, H, L, S)`` for the backward, as the CPU paths
  keep them (at small heads they are no larger than ``q``; the backward then needs no
  exponential and no second ``q k^T``).
* **Backward**: one block per lane walks its queries tile by tile, writes ``dq`` and adds
  each tile's terms to ``dk`` and ``dv``, each element by the one thread that owns it: no
  atomics, and the sums do not depend on scheduling.
* The optional mask travels as an int32 copy of its own (broadcastable) shape with one
  element stride per dimension of ``(B, H, L, S)``, 0 where it broadcasts; the dropout
  multiplier ``(B, H, L, S)``, drawn outside, is read as it is.

`launch_config` is pure Python (no CuPy), so the tests hand the real launch geometry to the
SIMT emulation harness in ``tests/simt``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from .. import cuda_launch
from .cuda_rows import INT32_MAX, cdiv

__all__ = ["forward", "backward", "fits", "launch_config", "AttentionConfig", "DEFAULT_CONFIG"]

KERNEL_FILE = "attention.cu"
MACRO_PREFIX = "ATT"

#: AttentionConfig fields that are compiled into the kernels, and their ``#define`` names.
COMPILED_FIELDS = {"threads": "ATT_THREADS", "query_tile": "ATT_QTILE",
                   "max_keys": "ATT_MAX_KEYS", "max_dim_f32": "ATT_MAX_DIM_F32",
                   "max_dim_f64": "ATT_MAX_DIM_F64"}

#: The static shared memory a block may declare.
SHARED_BYTES = 48 * 1024

_MAX_GRID_Y = 65535


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Tuning constants and maxima of the attention kernels (defaults match the ``#ifndef``
    defaults of the ``.cu`` file). The fields in `COMPILED_FIELDS` become ``-D`` options;
    ``max_grid`` only steers `launch_config`."""

    threads: int = 128  #: threads per block (<= 1024)
    query_tile: int = 8  #: queries per forward block and per backward step (<= threads)
    max_keys: int = 64  #: most keys S per lane
    max_dim_f32: int = 64  #: most features E, Ev per head in float32
    max_dim_f64: int = 32  #: ... in float64 (k and v of a lane fill the shared memory)
    max_grid: int = 65535  #: cap on grid.x (blocks walk the lanes beyond it)

    def __post_init__(self):
        cuda_launch.check_positive_fields(self)
        if self.threads > 1024 or self.query_tile > self.threads:
            raise ValueError(f"AttentionConfig: need query_tile <= threads <= 1024; got "
                             f"query_tile={self.query_tile}, threads={self.threads}")
        for dtype in (np.float32, np.float64):
            if self.shared_bytes(dtype) > SHARED_BYTES:
                raise ValueError(f"AttentionConfig: the {np.dtype(dtype)} tiles need "
                                 f"{self.shared_bytes(dtype)} bytes of shared memory, more "
                                 f"than {SHARED_BYTES}")

    def max_dim(self, dtype) -> int:
        """The most features per head the ``dtype`` kernels hold."""
        return self.max_dim_f32 if np.dtype(dtype) == np.float32 else self.max_dim_f64

    def shared_bytes(self, dtype) -> int:
        """Static shared memory of the backward block (the larger one), as the ``.cu``
        declares it: k, v, and per query tile q, dout, weights, their gradients, a row."""
        d, n, t = self.max_dim(dtype), self.max_keys, self.query_tile
        return (2 * n * d + 2 * t * d + 2 * t * n + t) * np.dtype(dtype).itemsize

    def defines(self) -> tuple[str, ...]:
        """The ``-D`` options that compile these constants into the kernels."""
        return cuda_launch.config_defines(self, COMPILED_FIELDS)


DEFAULT_CONFIG = AttentionConfig()


def fits(q_shape, k_shape, v_shape, dtype, config: AttentionConfig | None = None) -> bool:
    """Whether the kernels run attention of these shapes ``(B, H, L, E)``, ``(B, H, S, E)``,
    ``(B, H, S, Ev)`` and ``dtype`` (float32 or float64): nothing empty, ``S <= max_keys``,
    ``E, Ev <= max_dim`` of the dtype, and the grid within CUDA's limits. O(1)."""
    cfg = DEFAULT_CONFIG if config is None else config
    if np.dtype(dtype) not in cuda_launch.DTYPE_SUFFIX:
        return False
    B, H, L, E = q_shape
    S, Ev = k_shape[2], v_shape[3]
    lanes = B * H
    if min(lanes, L, S, E, Ev) < 1 or S > cfg.max_keys or max(E, Ev) > cfg.max_dim(dtype):
        return False
    # int kernel arguments, and the forward's query tiles in grid.y
    return max(lanes, L) <= INT32_MAX and cdiv(L, cfg.query_tile) <= _MAX_GRID_Y


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """Grid and block of both kernels."""

    block: tuple[int, int, int]
    forward_grid: tuple[int, int, int]  #: (lane blocks, query tiles, 1)
    backward_grid: tuple[int, int, int]  #: (lane blocks, 1, 1)


@functools.lru_cache(maxsize=1024)
def launch_config(lanes: int, L: int, config: AttentionConfig | None = None) -> LaunchPlan:
    """The launch geometry for ``lanes`` (batch x heads) and ``L`` queries (both >= 1).
    Pure Python."""
    cfg = DEFAULT_CONFIG if config is None else config
    if not (1 <= lanes <= INT32_MAX and 1 <= L <= INT32_MAX):
        raise ValueError(f"launch_config needs 1 <= lanes, L <= 2**31 - 1; got lanes={lanes}, "
                         f"L={L}")
    x = min(lanes, cfg.max_grid)
    return LaunchPlan(block=(cfg.threads, 1, 1), forward_grid=(x, cdiv(L, cfg.query_tile), 1),
                      backward_grid=(x, 1, 1))


_FORWARD = cuda_launch.Kernel(
    KERNEL_FILE, "attention_forward",
    "q:F k:F v:F mask:I drop:F out:O weights:O lanes:i H:i L:i S:i E:i Ev:i msb:l msh:l msi:l "
    "msj:l has_mask:i has_drop:i scale:f masked_score:f", MACRO_PREFIX)
_BACKWARD = cuda_launch.Kernel(
    KERNEL_FILE, "attention_backward",
    "dout:F q:F k:F v:F weights:F mask:I drop:F dq:O dk:O dv:O lanes:i H:i L:i S:i E:i Ev:i "
    "msb:l msh:l msi:l msj:l has_mask:i has_drop:i scale:f", MACRO_PREFIX)


@functools.lru_cache(maxsize=None)
def _defines(config: AttentionConfig) -> tuple[str, ...]:
    # rendered once per config: the tuple is also the memo key of the compiled module
    return config.defines()


def compile_options(dtype, config: AttentionConfig | None = None) -> tuple[str, ...]:
    """The NVRTC options of the module for ``dtype``: tuning constants and dtype selection."""
    cfg = DEFAULT_CONFIG if config is None else config
    return cuda_launch.compile_options(MACRO_PREFIX, dtype, _defines(cfg))


def _cupy():
    return cuda_launch.require_cupy("the CUDA attention kernels")


def _checked_plan(q, k, v, cfg):
    """The launch plan, after refusing shapes the kernels do not hold."""
    if not fits(q.shape, k.shape, v.shape, q.dtype, cfg):
        raise ValueError(f"attention kernels: q {tuple(q.shape)}, k {tuple(k.shape)}, v "
                         f"{tuple(v.shape)} of {q.dtype} exceed the kernels' maxima (S <= "
                         f"{cfg.max_keys}, E and Ev <= {cfg.max_dim(q.dtype)}, none empty): "
                         "use the composed version")
    B, H, L, _ = q.shape
    return launch_config(B * H, L, cfg)


def _mask_args(cp, mask):
    """``(int32 mask, has_mask, strides)``: the mask in its own shape (leading ones added to
    make it 4-D) with element strides over ``(B, H, L, S)`` (0 where it broadcasts); for
    None a one-element stand-in that is never read."""
    if mask is None:
        return cp.empty(1, dtype=np.int32), 0, (0, 0, 0, 0)
    shape = (1,) * (4 - mask.ndim) + tuple(mask.shape)
    m = cp.ascontiguousarray(mask.reshape(shape), dtype=np.int32)
    strides = tuple(0 if shape[d] == 1 else math.prod(shape[d + 1:]) for d in range(4))
    return m, 1, strides


def forward(q, k, v, mask, drop, scale, masked_score, *, config: AttentionConfig | None = None):
    """``(out, weights)`` of attention; see `diagnet.ops.attention.reference_forward`
    (arguments checked by its caller; shapes must `fit`)."""
    cp = _cupy()
    cfg = DEFAULT_CONFIG if config is None else config
    plan = _checked_plan(q, k, v, cfg)
    q, k, v = cp.ascontiguousarray(q), cp.ascontiguousarray(k), cp.ascontiguousarray(v)
    B, H, L, E = q.shape
    S, Ev = k.shape[2], v.shape[3]
    out = cp.empty((B, H, L, Ev), dtype=q.dtype)
    weights = cp.empty((B, H, L, S), dtype=q.dtype)
    m, has_mask, ms = _mask_args(cp, mask)
    # a missing dropout multiplier is never read (has_drop): q stands in for it
    d = q if drop is None else cp.ascontiguousarray(drop)
    _FORWARD(q.dtype, plan.forward_grid, plan.block,
             (q, k, v, m, d, out, weights, B * H, H, L, S, E, Ev, *ms, has_mask,
              drop is not None, scale, masked_score), defines=_defines(cfg))
    return out, weights


def backward(dout, q, k, v, weights, mask, drop, scale, *, config: AttentionConfig | None = None):
    """``(dq, dk, dv)`` of attention; see `diagnet.ops.attention.reference_backward`
    (arguments checked by its caller; shapes must `fit`)."""
    cp = _cupy()
    cfg = DEFAULT_CONFIG if config is None else config
    plan = _checked_plan(q, k, v, cfg)
    dout, q, k, v, weights = (cp.ascontiguousarray(a) for a in (dout, q, k, v, weights))
    B, H, L, E = q.shape
    S, Ev = k.shape[2], v.shape[3]
    dq, dk, dv = cp.empty_like(q), cp.empty_like(k), cp.empty_like(v)
    m, has_mask, ms = _mask_args(cp, mask)
    d = q if drop is None else cp.ascontiguousarray(drop)
    _BACKWARD(q.dtype, plan.backward_grid, plan.block,
              (dout, q, k, v, weights, m, d, dq, dk, dv, B * H, H, L, S, E, Ev, *ms, has_mask,
               drop is not None, scale), defines=_defines(cfg))
    return dq, dk, dv
