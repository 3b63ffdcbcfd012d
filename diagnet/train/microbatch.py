"""The `Trainer`'s exact mode: a global batch trained as micro-batches, the same bits for
any number of ranks.

Data parallelism computes the gradient of a global batch as each rank's sum, then a sum
across ranks; one process sums the same terms in another order, and float addition rounds
differently in each order. The difference is tiny at one step but it feeds back through
training: two runs drift apart, and a dynamic sparse training decision between two nearly
equal scores then goes another way. A train loader with a ``micro_batch`` ``M``
(``DataLoader(..., micro_batch=M)``) removes the reordering:

* the global batch of ``B`` samples is cut into micro-batches of ``M`` samples (slots
  ``0 .. S-1``, the last possibly smaller); with ``W`` ranks each takes whole ones (the
  loader splits them), so micro-batch ``s`` holds the same samples for any ``W``;
* each micro-batch runs forward, its mean loss times ``m_s / B`` (its share of the batch)
  and backward on its own, with the same arrays, shapes and kernels whatever ``W`` is;
* its dropout draws come from the step's generator state forked with the slot
  (`diagnet.random.forked_state`), so they do not depend on which rank runs it;
* its gradients go into slot ``s`` (`diagnet.distributed.OrderedGradientSum`), and so do
  the gradient taps' ``dy.T @ x`` at a mask-update step (`GradientTap.fold`); the slots are
  summed in slot order on every rank (`diagnet.distributed.sum_tap_parts`).

So a run gives the same parameters, offsets and masks with 1 or with ``W`` ranks, bit for
bit, provided every process runs the kernels with the same thread counts (a numba kernel
split over 2 threads adds in another order than on 1). The price: a step moves ``S``
gradients instead of one, and a micro-batch smaller than the batch keeps the kernels
further from their best speed. The default (no ``micro_batch``) stays the usual
data-parallel step, equal to one process up to the order of float sums.
"""

from __future__ import annotations

import math

from .. import random as _random
from ..autograd import Tensor
from ..distributed import OrderedGradientSum, sum_tap_parts
from ..optim import optimizer_params
from .metrics import batch_samples, step_numbers

__all__ = ["MicroBatchStep"]


class MicroBatchStep:
    """Forward and backward of one step in micro-batches, and their gradients summed in
    slot order (module docstring).

    Args:
        micro_batch: ``M``, samples per micro-batch (a positive int).
        optimizer: the run's optimizer (its parameters' gradients are summed).
        controller: the sparsity controller or None (its armed taps are folded per
            micro-batch and summed).
        comm: the run's `diagnet.distributed.Communicator`.
    """

    def __init__(self, micro_batch, optimizer, controller, comm):
        self.micro_batch = micro_batch
        self.optimizer, self.controller, self.comm = optimizer, controller, comm
        self.summer = None
        self.slots = 0

    def _armed_taps(self):
        taps = getattr(self.controller, "taps", None)
        return [tap for tap in taps() if tap.armed] if callable(taps) else []

    def _layout(self, samples):
        """``(first slot of this rank, slots of the global batch, global batch size)``."""
        counts = self.comm.allgather_object(samples) if self.comm.size > 1 else [samples]
        start, total = sum(counts[:self.comm.rank]), sum(counts)
        if start % self.micro_batch:
            raise ValueError(
                f"micro-batches: this rank's share of the batch starts at sample {start}, not "
                f"at a micro-batch boundary (micro_batch={self.micro_batch}): shard the train "
                "loader in whole micro-batches, DataLoader(..., micro_batch=M, rank=r, "
                "world_size=W)")
        return start // self.micro_batch, -(-total // self.micro_batch), total

    def forward_backward(self, model, loss_fn, inputs, target):
        """Run this rank's micro-batches of the batch ``(inputs, target)``: for each,
        forward, loss, backward, its gradients and taps folded into its slot.

        Returns the numbers `ParallelRun.step_numbers` takes: ``(mean loss over this rank's
        samples, correct count or None, samples, labels)``. The default generator ends in
        the state forked with the slot count, the same on every rank.
        """
        samples = batch_samples(target)
        first, self.slots, total = self._layout(samples)
        params = optimizer_params(self.optimizer)
        self.summer = (OrderedGradientSum(params, self.comm) if self.summer is None
                       else self.summer.for_params(params))  # a group may have been added
        self.summer.begin(self.slots)
        taps = self._armed_taps()
        base = _random.get_state()
        self.optimizer.zero_grad()
        loss_sum, correct_sum, classified = 0.0, 0, True
        for j, lo in enumerate(range(0, samples, self.micro_batch)):
            hi = min(lo + self.micro_batch, samples)
            slot = first + j
            _random.set_state(_random.forked_state(base, slot))
            part_inputs = tuple(_rows(x, lo, hi) for x in inputs)
            part_target = _rows(target, lo, hi)
            output = model(*part_inputs)
            loss = loss_fn(output, part_target)
            value, correct = step_numbers(loss, output, part_target)
            (loss * ((hi - lo) / total)).backward()
            self.summer.add(slot)
            for tap in taps:
                tap.fold(slot)
            loss_sum += value * (hi - lo) if math.isfinite(value) else math.nan
            classified = classified and correct is not None
            correct_sum += correct or 0
        _random.set_state(_random.forked_state(base, self.slots))
        return (loss_sum / samples, correct_sum if classified else None, samples,
                target.size)

    def reduce(self):
        """Give every parameter the batch's gradient and every armed tap the batch's
        ``dy.T @ x``, each summed in slot order across the ranks (collective)."""
        self.summer.finish()
        taps = self._armed_taps()
        if taps:
            sum_tap_parts(taps, self.slots, self.comm)

    @property
    def stats(self):
        """The gradient sum's byte counts (`GradientAverager.stats`), or None before a step."""
        return None if self.summer is None else self.summer.stats


def _rows(x, lo, hi):
    """Rows ``lo .. hi-1`` of a batch field (a Tensor without gradient), as a Tensor."""
    if isinstance(x, Tensor):
        return Tensor.from_array(x.data[lo:hi])
    return x[lo:hi]
