"""CUDA kernels of softmax, log-softmax and softmax cross-entropy: launch ``kernels/softmax.cu``.

The functions take CuPy arrays and have the signatures and semantics of their CPU twins in
`diagnet.fused.softmax` (rows of ``(R, C)`` arrays, one pass per row each way); the results
are new CuPy arrays of the input dtype. `diagnet.ops.activation.softmax_kernels` picks this
module for CuPy float arrays. It imports without CuPy; only calling its functions needs it.

Kernel design (details in ``docs/kernels.md`` and the comments of the ``.cu`` file):

* **One pass per row.** A block holds ``block[1]`` rows of ``block[0]`` threads each (a power
  of two, about half the row width: two columns per thread, at most `SoftmaxConfig.threads`
  in the block). The row max and sums are trees in static shared memory, so the SIMT harness
  runs the kernels as they are and the results do not depend on scheduling. Rows beyond the
  grid (capped at ``max_grid`` blocks) are walked in a grid-stride loop.
* **Arithmetic in the input dtype** (the CPU kernels compute float32 rows in float64): float32
  results agree with the float64 reference to the tolerances of the tests.
* **Cross-entropy** saves each row's max and ``log(sum(exp(z - max)))`` in the logits' dtype
  (the CPU kernels keep them in float64); the backward rebuilds the softmax from them and the
  logits. The labels are read on the device: one out of ``[0, C)`` makes its row NaN (the
  host-side range check of `diagnet.ops.loss` needs no device read, and a device-side one no
  extra launch). The gradient's scale stays on the device too (no host read of the upstream
  gradient).

`launch_config` is pure Python (no CuPy), so the tests hand the real launch geometry to the
SIMT emulation harness in ``tests/simt``.
"""

from __future__ import annotations

import dataclasses
import functools
import operator

import numpy as np

from .. import cuda_launch
from ..checks import FLOAT_DTYPES
from .cuda_rows import INT32_MAX, cdiv, is_power_of_two

__all__ = ["softmax", "softmax_grad", "log_softmax", "log_softmax_grad", "cross_entropy_rows",
           "cross_entropy_grad", "launch_config", "SoftmaxConfig", "DEFAULT_CONFIG"]

KERNEL_FILE = "softmax.cu"
MACRO_PREFIX = "SOFTMAX"

#: SoftmaxConfig fields that are compiled into the kernels, and their ``#define`` names.
COMPILED_FIELDS = {"threads": "SOFTMAX_THREADS"}

@dataclasses.dataclass(frozen=True)
class SoftmaxConfig:
    """Tuning constants of the softmax kernels (defaults match the ``#ifndef`` defaults).

    The fields in `COMPILED_FIELDS` become ``-D`` options of the compiled module; the others
    only steer `launch_config`.
    """

    threads: int = 256  #: threads per block (a power of two, <= 1024)
    max_grid: int = 65535  #: cap on grid.x (the kernels loop over the rows beyond)

    def __post_init__(self):
        cuda_launch.check_positive_fields(self)
        if self.threads > 1024 or not is_power_of_two(self.threads):
            raise ValueError(f"SoftmaxConfig.threads must be a power of two <= 1024; "
                             f"got {self.threads}")

    def defines(self) -> tuple[str, ...]:
        """The ``-D`` options that compile these constants into the kernels."""
        return cuda_launch.config_defines(self, COMPILED_FIELDS)


DEFAULT_CONFIG = SoftmaxConfig()


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """Grid and block of every kernel of the file for one ``(R, C)``."""

    block: tuple[int, int, int]  #: (threads per row, rows per block, 1)
    grid: tuple[int, int, int]


@functools.lru_cache(maxsize=1024)
def launch_config(R: int, C: int, config: SoftmaxConfig | None = None) -> LaunchPlan:
    """The launch geometry for ``R`` rows of width ``C`` (both positive). Pure Python."""
    cfg = DEFAULT_CONFIG if config is None else config
    R, C = operator.index(R), operator.index(C)
    if not (1 <= R <= INT32_MAX and 1 <= C <= INT32_MAX):
        raise ValueError(f"launch_config needs 1 <= R, C <= 2**31 - 1; got R={R}, C={C}")
    # two columns per thread: the row's loads in flight without idle threads on narrow rows
    bx = min(cfg.threads, 1 << max(0, (cdiv(C, 2) - 1).bit_length()))
    by = cfg.threads // bx
    return LaunchPlan(block=(bx, by, 1), grid=(min(cdiv(R, by), cfg.max_grid), 1, 1))


_SOFTMAX = cuda_launch.Kernel(KERNEL_FILE, "softmax_forward", "x:F y:O R:i C:i", MACRO_PREFIX)
_LOG_SOFTMAX = cuda_launch.Kernel(KERNEL_FILE, "log_softmax_forward", "x:F y:O R:i C:i",
                                  MACRO_PREFIX)
_SOFTMAX_GRAD = cuda_launch.Kernel(KERNEL_FILE, "softmax_backward", "y:F gy:F gx:O R:i C:i",
                                   MACRO_PREFIX)
_LOG_SOFTMAX_GRAD = cuda_launch.Kernel(KERNEL_FILE, "log_softmax_backward",
                                       "y:F gy:F gx:O R:i C:i", MACRO_PREFIX)
_CROSS_ENTROPY = cuda_launch.Kernel(
    KERNEL_FILE, "cross_entropy_forward",
    "z:F labels:L losses:O shift:O log_sum:O R:i C:i keep:f smooth:f smoothing:i", MACRO_PREFIX)
_CROSS_ENTROPY_GRAD = cuda_launch.Kernel(
    KERNEL_FILE, "cross_entropy_backward",
    "z:F labels:L shift:F log_sum:F scale:F gz:O R:i C:i keep:f smooth:f scale_stride:i "
    "divisor:f", MACRO_PREFIX)


@functools.lru_cache(maxsize=None)
def _defines(config: SoftmaxConfig) -> tuple[str, ...]:
    # rendered once per config: the tuple is also the memo key of the compiled module
    return config.defines()


def compile_options(dtype, config: SoftmaxConfig | None = None) -> tuple[str, ...]:
    """The NVRTC options of the module for ``dtype``: tuning constants and dtype selection."""
    cfg = DEFAULT_CONFIG if config is None else config
    return cuda_launch.compile_options(MACRO_PREFIX, dtype, _defines(cfg))


def _cupy():
    return cuda_launch.require_cupy("the CUDA softmax kernels")


def _rows(cp, *arrays):
    """The arrays as C-contiguous ``(R, C)`` arrays, ``C >= 1``, all of the first one's shape
    and float dtype (checked in O(1); a copy only where one is not contiguous)."""
    first = arrays[0]
    if first.ndim != 2 or first.dtype not in FLOAT_DTYPES or first.shape[1] < 1:
        raise ValueError(f"expected a (rows, C) float32 or float64 array with C >= 1; got "
                         f"{first.dtype} of shape {tuple(first.shape)}")
    for a in arrays[1:]:
        if a.shape != first.shape or a.dtype != first.dtype:
            raise ValueError(f"expected {first.dtype} arrays of shape {tuple(first.shape)}; got "
                             f"{a.dtype} of shape {tuple(a.shape)}")
    return [cp.ascontiguousarray(a) for a in arrays]


def _run(kernel, config, *arrays):
    """Launch a row kernel taking ``(*inputs, out, R, C)`` on inputs of one shape; ``out``."""
    cp = _cupy()
    cfg = DEFAULT_CONFIG if config is None else config
    arrays = _rows(cp, *arrays)
    out = cp.empty_like(arrays[0])
    R, C = out.shape
    if R:
        plan = launch_config(R, C, cfg)
        kernel(out.dtype, plan.grid, plan.block, (*arrays, out, R, C), defines=_defines(cfg))
    return out


def softmax(x, *, config: SoftmaxConfig | None = None):
    """``exp(x) / sum(exp(x))`` along the last axis of ``x`` ``(R, C)``; a new array."""
    return _run(_SOFTMAX, config, x)


def softmax_grad(y, gy, *, config: SoftmaxConfig | None = None):
    """The input gradient of `softmax`, from its output ``y`` and the output gradient ``gy``."""
    return _run(_SOFTMAX_GRAD, config, y, gy)


def log_softmax(x, *, config: SoftmaxConfig | None = None):
    """``x - logsumexp(x)`` along the last axis of ``x`` ``(R, C)``; a new array."""
    return _run(_LOG_SOFTMAX, config, x)


def log_softmax_grad(y, gy, *, config: SoftmaxConfig | None = None):
    """The input gradient of `log_softmax`, from its output ``y`` and the output gradient."""
    return _run(_LOG_SOFTMAX_GRAD, config, y, gy)


def _labels(cp, labels, n):
    """``labels`` as a contiguous int64 device array of shape ``(n,)`` (no copy if it is one)."""
    if tuple(labels.shape) != (n,):
        raise ValueError(f"labels must have shape ({n},); got {tuple(labels.shape)}")
    return cp.ascontiguousarray(labels, dtype=np.int64)


def _smoothing(eps, C):
    """The kernels' ``keep``, ``smooth`` and ``smoothing`` for label smoothing ``eps``."""
    eps = float(eps)
    return 1.0 - eps, eps / C, int(eps != 0.0)


def cross_entropy_rows(z, labels, eps, *, config: SoftmaxConfig | None = None):
    """Softmax cross-entropy of each row of ``z`` ``(N, C)`` with the labels ``(N,)``.

    ``eps`` is the label smoothing; a row whose label is outside ``[0, C)`` gets NaN.
    Returns ``(losses, shift, log_sum)``, each ``(N,)`` in ``z``'s dtype: the losses, and
    each row's max and ``log(sum(exp(z - max)))`` for `cross_entropy_grad`.
    """
    cp = _cupy()
    cfg = DEFAULT_CONFIG if config is None else config
    (z,) = _rows(cp, z)
    R, C = z.shape
    labels = _labels(cp, labels, R)
    losses, shift, log_sum = (cp.empty(R, dtype=z.dtype) for _ in range(3))
    if R:
        plan = launch_config(R, C, cfg)
        _CROSS_ENTROPY(z.dtype, plan.grid, plan.block,
                       (z, labels, losses, shift, log_sum, R, C, *_smoothing(eps, C)),
                       defines=_defines(cfg))
    return losses, shift, log_sum


def cross_entropy_grad(z, labels, eps, shift, log_sum, scale, divisor=1, *,
                       config: SoftmaxConfig | None = None):
    """``(softmax(z) - q) * scale / divisor``, ``q`` the smoothed one-hot target; ``(N, C)``.

    ``shift`` and ``log_sum`` come from `cross_entropy_rows` on the same ``z`` and
    ``labels``. ``scale`` is a device array: ``(N,)``, each row's factor, or ``()``, one
    factor for every row (the upstream gradient of a mean or a sum, never read on the host);
    ``divisor`` a number (``N`` for a mean).
    """
    cp = _cupy()
    cfg = DEFAULT_CONFIG if config is None else config
    (z,) = _rows(cp, z)
    R, C = z.shape
    labels = _labels(cp, labels, R)
    for name, a in (("shift", shift), ("log_sum", log_sum)):
        if a.dtype != z.dtype or tuple(a.shape) != (R,):
            raise ValueError(f"{name} must be {z.dtype} of shape ({R},); got {a.dtype} of "
                             f"shape {tuple(a.shape)}")
    if tuple(scale.shape) not in ((), (R,)):
        raise ValueError(f"scale must have shape () or ({R},); got {tuple(scale.shape)}")
    scale = cp.ascontiguousarray(scale.reshape(-1), dtype=z.dtype)
    gz = cp.empty_like(z)
    if R:
        plan = launch_config(R, C, cfg)
        keep, smooth, _ = _smoothing(eps, C)
        _CROSS_ENTROPY_GRAD(z.dtype, plan.grid, plan.block,
                            (z, labels, cp.ascontiguousarray(shift),
                             cp.ascontiguousarray(log_sum), scale, gz, R, C, keep, smooth,
                             0 if scale.size == 1 else 1, divisor),
                            defines=_defines(cfg))
    return gz
