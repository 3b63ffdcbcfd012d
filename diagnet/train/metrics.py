"""What a batch and an evaluation measure: the loss, the correct count, the metrics.

The `Trainer`'s per-batch arithmetic, kept apart from the loop so that `evaluate` can be
used on its own:

* `split_batch`: ``(inputs..., target)`` -> the model's inputs and the target;
* `step_numbers`: a step's loss and correct count as Python numbers, in one device read-back;
* `evaluate`: the mean loss (and accuracy) of a model over a loader, the sums kept on the
  device until the end (`evaluation_totals`: the sums, which data-parallel runs add over
  the ranks; `totals_metrics`: the means of such sums);
* `correct_count` and `batch_samples`: the pieces they share; `metric_value`: an ``eval_fn``
  metric as a Python number.
"""

from __future__ import annotations

import numpy as np

from .. import backend, checks
from ..autograd import Tensor
from ..config import no_grad
from ..ops import cross_entropy

__all__ = ["split_batch", "batch_samples", "correct_count", "step_numbers", "evaluate",
           "evaluation_totals", "totals_metrics", "metric_value"]


def split_batch(batch):
    """``(inputs..., target)`` -> ``(inputs tuple, target)``: the model gets all but the last."""
    if isinstance(batch, Tensor) or not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError(f"a batch must be a tuple (inputs..., target) of tensors; got "
                         f"{type(batch).__name__}" + (f" of length {len(batch)}"
                                                      if isinstance(batch, (tuple, list)) else ""))
    return tuple(batch[:-1]), batch[-1]


def batch_samples(target):
    """The number of samples in a batch: the target's first dimension (1 for a scalar)."""
    return target.shape[0] if isinstance(target, Tensor) and target.ndim else 1


def correct_count(output, target):
    """Device 0-d count of ``argmax(output, -1) == target``, or None if not classification.

    Classification: ``output`` ``(..., C)`` logits and ``target`` ``(...)`` integer labels.
    """
    if not (isinstance(output, Tensor) and isinstance(target, Tensor)):
        return None
    if (target.dtype.kind not in "iu" or output.ndim != target.ndim + 1
            or output.shape[:-1] != target.shape):
        return None
    xp = backend.get_array_module(output.data)
    return (xp.argmax(output.data, axis=-1) == target.data).sum()


def _check_loss(loss):
    if not isinstance(loss, Tensor) or loss.size != 1:
        what = (f"a Tensor of shape {loss.shape}" if isinstance(loss, Tensor)
                else type(loss).__name__)
        raise TypeError(f"loss_fn must return a one-element Tensor (a mean loss); got {what}")


def step_numbers(loss, output, target):
    """``(loss value, correct count or None)`` as Python numbers, in one device read-back."""
    _check_loss(loss)
    xp = backend.get_array_module(loss.data)
    value = loss.data.reshape(()).astype(np.float64)
    correct = correct_count(output, target)
    if correct is None:
        return float(backend.to_numpy(value)), None
    both = backend.to_numpy(xp.stack([value, correct.astype(np.float64)]))
    return float(both[0]), int(both[1])


def evaluation_totals(model, loader, loss_fn=cross_entropy):
    """The sums `evaluate` divides: ``(loss sum, samples, correct, labels)`` over ``loader``.

    ``loss sum`` is the sum of ``batch mean loss * batch size`` (a float), ``samples`` the
    number of samples, ``correct`` the number of correct predictions (None when the outputs
    and targets are not logits and integer labels) and ``labels`` the number of labels. Runs
    in eval mode under `no_grad` (the model's mode is restored after); the sums stay on the
    device and are read back once, at the end. Data-parallel evaluation adds these over the
    ranks before dividing.

    Raises:
        ValueError: the loader gave no batch.
    """
    was_training = model.training
    model.eval()
    loss_sum = correct = None
    samples = labels = 0
    try:
        with no_grad():
            for batch in loader:
                inputs, target = split_batch(batch)
                output = model(*inputs)
                loss = loss_fn(output, target)
                _check_loss(loss)
                n = batch_samples(target)
                term = loss.data.reshape(()).astype(np.float64) * n
                loss_sum = term if loss_sum is None else loss_sum + term
                samples += n
                c = correct_count(output, target)
                if c is not None:
                    correct = c if correct is None else correct + c
                    labels += target.size
    finally:
        model.train(was_training)
    if not samples:
        raise ValueError("evaluate: the loader gave no batch")
    return (float(backend.to_numpy(loss_sum)), samples,
            None if correct is None else int(backend.to_numpy(correct)), labels)


def totals_metrics(totals):
    """``{"loss": ..., "accuracy": ...}`` of `evaluation_totals`' sums (no ``"accuracy"``
    when nothing was classified)."""
    loss_sum, samples, correct, labels = totals
    result = {"loss": loss_sum / samples}
    if correct is not None:
        result["accuracy"] = correct / labels
    return result


def evaluate(model, loader, loss_fn=cross_entropy):
    """Mean loss (and accuracy, for classification) of ``model`` over ``loader``.

    Runs in eval mode under `no_grad` (the model's mode is restored after). ``loss_fn``
    returns a batch's mean loss; the result weights batches by their sizes. The sums stay
    on the device and are read back once, at the end (see `evaluation_totals`).

    Returns:
        ``{"loss": float, "accuracy": float}`` (no ``"accuracy"`` when the outputs and
        targets are not logits and integer labels).
    """
    return totals_metrics(evaluation_totals(model, loader, loss_fn))


def metric_value(key, value):
    """A metric as a Python number (NumPy scalars and one-element tensors are read)."""
    if isinstance(value, Tensor):
        value = value.data
    if backend.is_array(value) and value.size == 1:
        value = backend.to_numpy(value).reshape(()).item()
    if isinstance(value, np.generic):
        value = value.item()
    if not checks.is_real(value):
        raise TypeError(f"eval_fn: metric {key!r} must be a number; got {type(value).__name__}")
    return value
