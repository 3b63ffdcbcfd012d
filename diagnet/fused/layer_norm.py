"""Layer normalisation over the rows of a 2-D array: the reference, and the dispatch.

Rows are every leading dimension of the input flattened (``R`` of them); ``N`` is the
normalised width. With ``mean`` and ``rstd`` the per-row statistics::

    mean = x.mean(axis=1)          var = ((x - mean) ** 2).mean(axis=1)   (population variance)
    rstd = 1 / sqrt(var + eps)     xhat = (x - mean) * rstd
    y = xhat * weight + bias       (each factor optional)

and for an upstream gradient ``dy``, with ``g = dy * weight`` (``dy`` without a weight)::

    dx = rstd * (g - g.mean(axis=1) - xhat * (g * xhat).mean(axis=1))
    dweight = (dy * xhat).sum(axis=0)        dbias = dy.sum(axis=0)

`add_forward` and `add_backward` are the same with a sum in front, as a pre-norm transformer
has it between blocks (``total = x + residual`` is the residual stream, ``y`` the layer
norm of ``total``, the next branch's input)::

    total = x + residual           y = layer_norm(total)
    dx = dresidual = dtotal + layer_norm's dx (from dy)

`forward` and `backward` (and the ``add_`` pair) pick the implementation by the array's device: the numba kernels
of `diagnet.fused.layer_norm_cpu` for NumPy arrays (or `reference_forward` and
`reference_backward` with ``settings.cpu_kernels == "reference"``), the CUDA kernels of
``kernels/layer_norm.cu`` (`diagnet.fused.layer_norm_cuda`) for CuPy arrays. The forward
keeps ``mean`` and ``rstd`` (``(R,)``, the input's dtype) for the backward, which then needs
``x``, not ``xhat``. The reference is the definition: the kernels are tested against it.
"""

from __future__ import annotations

import numpy as np

from .. import backend, settings
from ..checks import FLOAT_DTYPES
from ..diag import cpu_process

__all__ = ["forward", "backward", "add_forward", "add_backward", "reference_forward",
           "reference_backward", "reference_add_forward", "reference_add_backward"]


def reference_forward(x, weight, bias, eps):
    """``(y, mean, rstd)`` of layer norm over the rows of ``x``, in composed array operations.

    ``x``: ``(R, N)`` float32 or float64 (NumPy or CuPy); ``weight``, ``bias``: ``(N,)`` of
    that dtype, or ``None``; ``eps``: float added to the variance. Returns ``y`` ``(R, N)``,
    ``mean`` and ``rstd`` ``(R,)``, all of ``x``'s dtype.
    """
    xp = backend.get_array_module(x)
    mean = x.mean(axis=1)
    centred = x - mean[:, None]
    var = (centred * centred).mean(axis=1)
    rstd = 1.0 / xp.sqrt(var + eps)
    y = centred * rstd[:, None]
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y, mean, rstd


def reference_backward(dy, x, weight, mean, rstd, want_params):
    """``(dx, dweight, dbias)`` of layer norm, in composed array operations.

    ``dy``, ``x``: ``(R, N)``; ``weight``: ``(N,)`` or ``None``; ``mean``, ``rstd``: ``(R,)``
    from the forward; all of one float dtype. ``dweight`` and ``dbias`` (``(N,)``) are
    computed when ``want_params`` (else ``None``); ``dweight`` is the gradient of a weight
    whether or not the forward had one.
    """
    xhat = (x - mean[:, None]) * rstd[:, None]
    g = dy if weight is None else dy * weight
    dx = rstd[:, None] * (g - g.mean(axis=1, keepdims=True)
                          - xhat * (g * xhat).mean(axis=1, keepdims=True))
    if not want_params:
        return dx, None, None
    return dx, (dy * xhat).sum(axis=0), dy.sum(axis=0)


def reference_add_forward(x, residual, weight, bias, eps):
    """``(total, y, mean, rstd)``: ``total = x + residual`` ``(R, N)`` and `reference_forward`
    of it; ``residual`` of ``x``'s shape and dtype, the rest as there."""
    total = x + residual
    return (total, *reference_forward(total, weight, bias, eps))


def reference_add_backward(gtotal, dy, total, weight, mean, rstd, want_params):
    """``(dx, dweight, dbias)`` of `reference_add_forward` given the gradients ``gtotal`` of
    ``total`` and ``dy`` of ``y`` (``(R, N)``): ``dx``, the gradient of ``x`` and of
    ``residual`` alike, is ``gtotal`` plus `reference_backward`'s ``dx``."""
    dx, dweight, dbias = reference_backward(dy, total, weight, mean, rstd, want_params)
    return gtotal + dx, dweight, dbias


_REFERENCE = {"forward": reference_forward, "backward": reference_backward,
              "add_forward": reference_add_forward, "add_backward": reference_add_backward}


def _implementation(array, kind="forward"):
    """The function ``kind`` (``"forward"``, ``"backward"``, ``"add_forward"``,
    ``"add_backward"``) for ``array``'s device."""
    if backend.get_array_module(array) is not np:
        from . import layer_norm_cuda as impl
    elif settings.cpu_kernels == "reference":
        return _REFERENCE[kind]
    else:
        from . import layer_norm_cpu as impl
        cpu_process.configure_once()  # thread pools and heap, as for the diagonal kernels
    return getattr(impl, kind)


def _check_rows(name, a, dtype, shape):
    """Raise unless ``a`` is an array of ``dtype`` and ``shape`` (O(1): no data is read)."""
    if a.dtype != dtype:
        raise TypeError(f"layer_norm: {name} must have dtype {dtype}; got {a.dtype}")
    if a.shape != shape:
        raise ValueError(f"layer_norm: {name} must have shape {shape}; got {tuple(a.shape)}")


def _check_x(x):
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"layer_norm: x must be float32 or float64; got dtype {x.dtype}")
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"layer_norm: x must be (rows, N) with N >= 1; got shape {tuple(x.shape)}")


def forward(x, weight, bias, eps):
    """``(y, mean, rstd)``: layer norm over the rows of ``x`` (see `reference_forward`).

    Shapes and dtypes are checked here, before any kernel runs (the compiled kernels do not
    check bounds).
    """
    _check_x(x)
    for name, a in (("weight", weight), ("bias", bias)):
        if a is not None:
            _check_rows(name, a, x.dtype, x.shape[1:])
    return _implementation(x)(x, weight, bias, float(eps))


def backward(dy, x, weight, mean, rstd, want_params):
    """``(dx, dweight, dbias)`` of layer norm (see `reference_backward`); checked as `forward`."""
    _check_x(x)
    _check_rows("dy", dy, x.dtype, x.shape)
    _check_rows("mean", mean, x.dtype, x.shape[:1])
    _check_rows("rstd", rstd, x.dtype, x.shape[:1])
    if weight is not None:
        _check_rows("weight", weight, x.dtype, x.shape[1:])
    return _implementation(x, "backward")(dy, x, weight, mean, rstd, bool(want_params))


def add_forward(x, residual, weight, bias, eps):
    """``(total, y, mean, rstd)``: ``total = x + residual`` and layer norm over its rows
    (see `reference_add_forward`); checked as `forward`, ``residual`` like ``x``."""
    _check_x(x)
    _check_rows("residual", residual, x.dtype, x.shape)
    for name, a in (("weight", weight), ("bias", bias)):
        if a is not None:
            _check_rows(name, a, x.dtype, x.shape[1:])
    return _implementation(x, "add_forward")(x, residual, weight, bias, float(eps))


def add_backward(gtotal, dy, total, weight, mean, rstd, want_params):
    """``(dx, dweight, dbias)`` of `add_forward` (see `reference_add_backward`); checked as
    `backward`, ``gtotal`` like ``dy``."""
    _check_x(total)
    _check_rows("gtotal", gtotal, total.dtype, total.shape)
    _check_rows("dy", dy, total.dtype, total.shape)
    _check_rows("mean", mean, total.dtype, total.shape[:1])
    _check_rows("rstd", rstd, total.dtype, total.shape[:1])
    if weight is not None:
        _check_rows("weight", weight, total.dtype, total.shape[1:])
    return _implementation(total, "add_backward")(gtotal, dy, total, weight, mean, rstd,
                                                   bool(want_params))
