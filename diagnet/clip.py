"""Gradient clipping, as ``torch.nn.utils.clip_grad_norm_`` and ``clip_grad_value_``.

`clip_grad_norm_` scales all gradients together so that their total norm is at most
``max_norm``::

    total = || (||g_1||_p, ||g_2||_p, ...) ||_p        (the p-norm of all entries together)
    g_i  *= min(1, max_norm / (total + 1e-6))

The factor is computed and applied on the device and the total norm is returned as a 0-d
`Tensor`, so on a GPU no value is read back to the host (unless ``error_if_nonfinite``).
`clip_grad_value_` clamps every gradient entry into ``[-clip_value, clip_value]``.
Both modify ``param.grad`` in place and skip parameters whose grad is None.

Clipping sits below `diagnet.nn` and `diagnet.optim`, which both re-export it
(``nn.utils.clip_grad_norm_`` as in PyTorch, and ``optim.clip_grad_norm_``): it needs only
tensors and their gradients, and neither package may import the other.
"""

from __future__ import annotations

import numpy as np

from . import backend, checks
from .autograd import Tensor

__all__ = ["clip_grad_norm_", "clip_grad_value_"]


def _grad_arrays(parameters):
    """The gradient arrays of ``parameters`` (a Tensor or an iterable of Tensors)."""
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    grads = [p.grad.data for p in parameters if p.grad is not None]
    if len({backend.device_of(g) for g in grads}) > 1:
        raise ValueError("gradients are on different devices; clip each device's parameters "
                         "separately")
    return grads


def _max_norm(max_norm) -> float:
    """``max_norm`` as a float ``>= 0``; ``inf`` is allowed (it only measures the norm)."""
    if isinstance(max_norm, (int, float)) and max_norm == float("inf"):
        return float("inf")
    return checks.non_negative("max_norm", max_norm)


def _norm_type(norm_type) -> float:
    """``norm_type`` as a float ``p > 0`` or ``inf`` (the string ``"inf"`` is accepted)."""
    if isinstance(norm_type, str) and norm_type.strip().lower() in ("inf", "+inf"):
        return float("inf")
    if norm_type == float("inf"):
        return float("inf")
    return checks.positive("norm_type", norm_type)


def _vector_norm(xp, array, norm_type):
    if norm_type == float("inf"):
        return xp.abs(array).max() if array.size else xp.zeros((), dtype=array.dtype)
    return xp.linalg.norm(array.reshape(-1), ord=norm_type)


def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False) -> Tensor:
    """Scale the gradients of ``parameters`` in place so that their total norm is at most
    ``max_norm``.

    Args:
        parameters: a Tensor or an iterable of Tensors; those with ``grad`` None are skipped.
        max_norm: the largest total norm allowed, ``>= 0``; ``float("inf")`` leaves the
            gradients as they are and only measures their norm.
        norm_type: ``p > 0`` of the p-norm, or ``float("inf")`` (or ``"inf"``) for the
            largest absolute entry.
        error_if_nonfinite: raise RuntimeError when the total norm is NaN or infinite (this
            reads the norm back to the host: a synchronisation on the GPU). Otherwise such a
            norm makes the gradients NaN, as in PyTorch.

    Returns:
        the total norm before clipping, a 0-d `Tensor` on the gradients' device (the dtype
        of the gradients; float64 if they mix float32 and float64). Zero (float32, on the
        CPU) when no parameter has a gradient.
    """
    max_norm = _max_norm(max_norm)
    norm_type = _norm_type(norm_type)
    grads = _grad_arrays(parameters)
    if not grads:
        return Tensor.from_array(np.zeros((), dtype=np.float32))
    xp = backend.get_array_module(grads[0])
    norms = xp.stack([_vector_norm(xp, g, norm_type) for g in grads])
    # asarray: NumPy reductions give a scalar, and a Tensor needs an array
    total = xp.asarray(_vector_norm(xp, norms, norm_type))
    if error_if_nonfinite and not bool(xp.isfinite(total)):
        raise RuntimeError(f"the total norm of order {norm_type} of the gradients is "
                           f"non-finite ({float(total)}), so they cannot be clipped; pass "
                           "error_if_nonfinite=False to scale them by it anyway")
    # multiplied even when it is 1: deciding whether to skip would read the norm back
    factor = xp.minimum(max_norm / (total + 1e-6), 1.0)
    for g in grads:
        g *= factor.astype(g.dtype)
    return Tensor.from_array(total)


def clip_grad_value_(parameters, clip_value) -> None:
    """Clamp every gradient entry of ``parameters`` into ``[-clip_value, clip_value]`` in place.

    Args:
        parameters: a Tensor or an iterable of Tensors; those with ``grad`` None are skipped.
        clip_value: ``>= 0``.
    """
    clip_value = checks.non_negative("clip_value", clip_value)
    for g in _grad_arrays(parameters):
        backend.get_array_module(g).clip(g, -clip_value, clip_value, out=g)
