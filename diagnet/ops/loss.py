"""Losses: softmax cross-entropy with integer labels, mean squared error.

Each public function follows the `Function` class that implements it (`mse_loss` is
composed of basic ops and needs none). The cross-entropy runs on the row kernels of the
softmax family (`diagnet.ops.activation.softmax_kernels`: numba for NumPy float arrays,
``kernels/softmax.cu`` for CuPy ones); its composed array code is the reference they are
tested against.
"""

from __future__ import annotations

import numpy as np

from .. import checks
from ..backend import get_array_module as _xp  # the array module (numpy/cupy) of arrays
from ..autograd import Function, Tensor
from . import basic, reduce
from .activation import _log_softmax_array, softmax_kernels

__all__ = ["cross_entropy", "mse_loss"]

REDUCTIONS = ("mean", "sum", "none")


def _row_kernels(z):
    """The row kernels for the logits ``z`` (`softmax_kernels`), or None for the reference
    (which also serves empty logits)."""
    return softmax_kernels(z) if z.size else None


class CrossEntropy(Function):
    """Softmax cross-entropy with integer labels and optional label smoothing.

    With ``eps`` the smoothing and ``C`` classes, the target is ``q = (1 - eps) * onehot +
    eps / C``, so the loss of a row is

        ``-sum_c q_c logp_c = -(1 - eps) * logp[label] - (eps / C) * sum_c logp_c``

    and its gradient with respect to the logits is ``softmax - q``. The right-hand form is
    what is computed: it never multiplies a zero target weight by a log-probability, so a
    masked logit (``-inf``, whose ``logp`` is ``-inf``) contributes 0 instead of
    ``0 * -inf = NaN``.

    ``labels`` are ``(N,)`` indices in ``[0, C)``. ``valid`` is ``None`` when the labels
    were range-checked on the host; for labels that live on the GPU it is an ``(N,)`` bool
    array (and ``labels`` are clamped into range), and the rows with an invalid label get a
    NaN loss and a NaN gradient.

    With the kernels (`_row_kernels`, ``valid`` None) forward keeps each row's max and
    ``log(sum(exp(z - max)))`` instead of the ``(N, C)`` log-probabilities, and backward
    rebuilds the softmax from them and the logits in the same pass that writes the gradient.
    The kernels check the label range themselves (a row with a label outside ``[0, C)`` is
    NaN), so labels that live on the GPU need no ``valid`` array for them.
    """

    def __init__(self, labels, label_smoothing, reduction, valid=None):
        self.labels, self.eps, self.reduction, self.valid = labels, label_smoothing, reduction, valid

    def forward(self, logits):
        xp = _xp(logits)
        self.in_shape = logits.shape
        z = logits.reshape(-1, logits.shape[-1])
        self.kernels = _row_kernels(z) if self.valid is None else None
        if self.kernels is not None:
            losses, self.shift, self.log_sum = self.kernels.cross_entropy_rows(
                z, self.labels, self.eps)
            self.z = z
        else:
            losses = self._losses_reference(xp, z)
        if self.reduction == "mean":
            return losses.mean()
        if self.reduction == "sum":
            return losses.sum()
        return losses.reshape(self.in_shape[:-1])

    def _losses_reference(self, xp, z):
        """The loss of each row of ``z`` ``(N, C)``, composed of array ops; keeps ``logp``."""
        n, c = z.shape
        logp = _log_softmax_array(z, axis=1)
        losses = -(1.0 - self.eps) * logp[xp.arange(n), self.labels]
        if self.eps:  # a -inf logit makes this term +inf: the smoothed target gives it weight
            losses = losses - (self.eps / c) * logp.sum(axis=1)
        if self.valid is not None:
            losses = xp.where(self.valid, losses, np.nan)
        self.logp = logp
        return losses

    def backward(self, gy):
        if self.kernels is not None:
            n = self.z.shape[0]
            # the upstream gradient stays an array on its device: no host read on the GPU
            scale = gy.reshape(n) if self.reduction == "none" else gy
            return self.kernels.cross_entropy_grad(
                self.z, self.labels, self.eps, self.shift, self.log_sum, scale,
                n if self.reduction == "mean" else 1).reshape(self.in_shape)
        xp = _xp(gy)
        n, c = self.logp.shape
        g = xp.exp(self.logp)  # softmax (0 at a -inf logit)
        if self.eps:
            g -= self.eps / c
        g[xp.arange(n), self.labels] -= 1.0 - self.eps
        if self.valid is not None:
            g = xp.where(self.valid[:, None], g, np.nan)
        if self.reduction == "mean":
            g *= gy / n
        elif self.reduction == "sum":
            g *= gy
        else:
            g *= gy.reshape(n, 1)
        return g.reshape(self.in_shape)


def cross_entropy(logits, labels, label_smoothing=0.0, reduction="mean"):
    """Softmax cross-entropy between ``logits`` and integer class ``labels``.

    Args:
        logits: float tensor ``(..., C)``.
        labels: integer array/tensor of shape ``logits.shape[:-1]`` with values in ``[0, C)``.
        label_smoothing: ``eps`` in ``[0, 1)``: the target puts ``1 - eps + eps/C`` on the
            label and ``eps/C`` on every other class.
        reduction: ``"mean"`` (over samples), ``"sum"`` or ``"none"`` (shape ``(...)``).

    Masked logits (``-inf``, e.g. from ``where(mask, z, -inf)``) are allowed, with the
    semantics of PyTorch's ``cross_entropy``:

    * without label smoothing a ``-inf`` logit of a class other than the label contributes
      nothing (its probability is 0 and so is its target weight); its gradient is 0.
    * with ``label_smoothing > 0`` every class has a positive target weight, so a ``-inf``
      logit makes that row's loss ``+inf`` (as in PyTorch, whose smoothing term sums the
      log-probabilities of all classes); the gradient stays finite (``softmax - target``).
    * a ``-inf`` logit *at the label* makes the loss ``+inf`` (probability 0 for the label).
    * a row whose logits are all ``-inf`` has no distribution: its loss is NaN.

    Label range check: labels held on the host (NumPy arrays, lists, CPU tensors) are
    checked before anything runs, and out-of-range values raise `ValueError`. Labels already
    on the GPU are *not* read back (that would stall the GPU until the check is done);
    instead the check runs on the device and each sample with an out-of-range label gets a
    NaN loss (so a mean loss is NaN) and NaN gradients.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"cross_entropy: reduction must be one of {REDUCTIONS}; got {reduction!r}")
    label_smoothing = checks.unit_interval("label_smoothing", label_smoothing,
                                           include_one=False)
    shape = tuple(logits.shape)
    if len(shape) < 1:
        raise ValueError("cross_entropy: logits must have a class dimension; got a scalar")
    classes = shape[-1]
    xp = _xp(logits.data if isinstance(logits, Tensor) else logits)
    lab = labels.data if isinstance(labels, Tensor) else labels
    on_host = _xp(lab) is np
    if on_host:
        lab = np.asarray(lab)
    elif xp is np:
        raise ValueError("cross_entropy: labels are on cuda but logits are on cpu; move them "
                         "with .to('cpu') first")
    if lab.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: labels must be integers; got dtype {lab.dtype}")
    if tuple(lab.shape) != shape[:-1]:
        raise ValueError(f"cross_entropy: labels must have shape {shape[:-1]} (logits "
                         f"{shape} without the class dim); got {tuple(lab.shape)}")
    lab = lab.reshape(-1)
    valid = None
    if on_host:
        if lab.size and (int(lab.min()) < 0 or int(lab.max()) >= classes):
            raise ValueError(f"cross_entropy: labels must be in [0, {classes}); got values in "
                             f"[{int(lab.min())}, {int(lab.max())}]")
        lab = xp.asarray(lab)  # to the logits' device (a copy only when that is the GPU)
    elif _row_kernels(logits.data if isinstance(logits, Tensor) else logits) is None:
        # labels on the GPU are checked there, without a synchronising read (see the
        # docstring): by the kernels themselves, or by these masks for the reference
        valid = (lab >= 0) & (lab < classes)
        lab = xp.clip(lab, 0, classes - 1)
    return CrossEntropy(lab, float(label_smoothing), reduction, valid)(logits)


def mse_loss(pred, target, reduction="mean"):
    """Mean squared error ``(pred - target)**2`` reduced by ``"mean"``, ``"sum"`` or ``"none"``.

    ``pred`` and ``target`` must have the same shape (no silent broadcasting).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"mse_loss: reduction must be one of {REDUCTIONS}; got {reduction!r}")
    if tuple(pred.shape) != tuple(np.shape(target) if not hasattr(target, "shape") else target.shape):
        raise ValueError(f"mse_loss: pred has shape {tuple(pred.shape)} but target has shape "
                         f"{tuple(target.shape) if hasattr(target, 'shape') else np.shape(target)}")
    diff = basic.sub(pred, target)
    sq = basic.mul(diff, diff)
    if reduction == "mean":
        return reduce.mean(sq)
    if reduction == "sum":
        return reduce.sum(sq)
    return sq
