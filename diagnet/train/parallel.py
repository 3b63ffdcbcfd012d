"""The `Trainer`'s side of data-parallel training: what the ranks agree on at every step.

Under ``mpiexec -n N`` every rank runs the same `Trainer` on its share of each global batch
(a sharded `diagnet.data.DataLoader`). `ParallelRun` is what keeps the N copies one run:

* per step, one small allreduce of ``[samples, loss * samples, correct, labels, NaN flag,
  stop flag]`` (`ParallelRun.step_numbers`): every rank learns the global batch size ``B``,
  the global mean loss and accuracy, and whether any rank saw a NaN/inf loss or a Ctrl-C, so
  all ranks stop at the same step;
* the gradients, each rank's weighted by its share ``b_r / B`` and summed in buckets
  (`diagnet.distributed.GradientAverager`): the gradient of the global batch's mean loss,
  as one process computes it, up to the order of the float sums;
* the structure: a controller's gradient taps reduce the dense ``dy.T @ x`` with the same
  weights (`diagnet.distributed.attach_controller`), and after every structure change the
  ranks compare fingerprints of their layers (`diagnet.distributed.check_structure`);
* evaluation: a sharded eval loader's sums are reduced; an unsharded one is evaluated
  whole on every rank (replicated: the same numbers everywhere);
* files: rank 0 alone writes the log and the checkpoints; the other ranks keep a `NullLog`.

With one process (`diagnet.distributed.SingleProcess`) every method is the plain
single-process arithmetic and no collective runs.

With micro-batches (``micro_batch=True``, the exact mode of `diagnet.train.microbatch`)
the gradients and the taps' dense gradients are summed per micro-batch slot by
`MicroBatchStep` instead, so no averager is made and the taps get no reducer.
"""

from __future__ import annotations

import math

import numpy as np

from ..distributed import GradientAverager, attach_controller, check_structure
from ..optim import optimizer_params

__all__ = ["ParallelRun", "NullLog"]


class NullLog:
    """The log of a rank other than 0: accepts records and writes nothing."""

    nbytes = 0

    def write(self, record: dict) -> None:
        """Drop ``record`` (rank 0 writes the run's log)."""

    def sha256(self) -> str:
        return ""

    def close(self) -> None:
        """Nothing to close."""


class ParallelRun:
    """The collectives of one `Trainer` run over the ranks of ``comm`` (module docstring).

    Args:
        comm: a `diagnet.distributed.Communicator`.
        optimizer: the run's optimizer (its parameters' gradients are averaged).
        controller: the sparsity controller or None (its taps get a reducer).
        train_loader: must be sharded over ``comm.size`` ranks, at this rank, when
            ``comm.size > 1`` (and not sharded otherwise).
        eval_loader: sharded the same way (its sums are reduced), or not (replicated), or
            None.
        micro_batch: True when the gradients are summed by micro-batch slots
            (`diagnet.train.microbatch.MicroBatchStep`): then `average_gradients` does
            nothing and the controller's taps are left without a reducer.

    Raises:
        ValueError: a loader sharded otherwise than over the ranks of ``comm``.
    """

    def __init__(self, comm, optimizer, controller, train_loader, eval_loader,
                 micro_batch=False):
        self.comm = comm
        self.parallel = comm.size > 1
        self.weight = 1.0  # this rank's share of the current global batch, b_r / B
        self.averager = None
        for name, loader in (("train_loader", train_loader), ("eval_loader", eval_loader)):
            # the train loader must be sharded over the ranks; the eval loader may be whole
            if loader is None or not (_sharded(loader) or self.parallel
                                      and name == "train_loader"):
                continue
            shard = (getattr(loader, "rank", None), getattr(loader, "world_size", None))
            if shard != (comm.rank, comm.size):
                raise ValueError(
                    f"{name} must be sharded over the {comm.size} rank(s) of the run, at this "
                    f"rank: DataLoader(..., rank={comm.rank}, world_size={comm.size}); got "
                    f"rank={shard[0]}, world_size={shard[1]}")
        if not self.parallel:
            return
        self.eval_sharded = _sharded(eval_loader)
        self.optimizer = optimizer
        if micro_batch:
            return
        self.averager = GradientAverager(optimizer_params(self.optimizer), comm)
        if controller is not None:
            attach_controller(controller, comm, lambda: self.weight)

    @property
    def is_main(self) -> bool:
        """Whether this rank writes the run's files (rank 0)."""
        return self.comm.is_main

    def step_numbers(self, value, correct, samples, labels, stop):
        """Combine one step's numbers over the ranks.

        Args:
            value: this rank's mean loss over its ``samples``; ``correct``/``labels``: its
                correct count and label count (``correct`` None: not classification);
            stop: whether a Ctrl-C was asked for on this rank.

        Returns:
            ``(loss, samples, correct, labels, nonfinite, stop)`` of the global batch: the
            mean loss over all samples, their count, the summed counts (``correct`` None as
            given), whether any rank's loss was NaN/inf, whether any rank asked to stop (one
            process: always False, the trainer's next safe point looks at its Ctrl-C).
            Sets `weight` to this rank's share ``samples / B``.
        """
        if not self.parallel:
            return value, samples, correct, labels, not math.isfinite(value), False
        finite = math.isfinite(value)
        sums = np.array([samples, value * samples if finite else 0.0,
                         correct or 0, labels, not finite, stop], dtype=np.float64)
        self.comm.allreduce(sums, tag="metrics")
        total = int(sums[0])
        self.weight = samples / total
        loss = float("nan") if sums[4] else float(sums[1]) / total
        return (loss, total, None if correct is None else int(sums[2]), int(sums[3]),
                bool(sums[4]), bool(sums[5]))

    def average_gradients(self):
        """Replace every gradient by the global batch's (this rank's weighted by `weight`).

        The parameters are the optimizer's at this step: a group added after the run was made
        is averaged too (a new averager, its byte counts carried over)."""
        if self.averager is None:
            return
        self.averager = self.averager.for_params(optimizer_params(self.optimizer))
        self.averager.reduce(self.weight)

    def any_stop(self, stop) -> bool:
        """Whether any rank asks to stop (``stop``: this rank's wish)."""
        if not self.parallel:
            return bool(stop)
        flag = np.array([bool(stop)], dtype=np.float64)
        return bool(self.comm.allreduce(flag, op="max", tag="metrics")[0])

    def eval_totals(self, totals):
        """``totals`` (loss sum, samples, correct, labels) summed over the ranks when the
        eval loader is sharded; as they are otherwise."""
        if not self.parallel or not self.eval_sharded:
            return totals
        loss_sum, samples, correct, labels = totals
        sums = np.array([loss_sum, samples, correct or 0, labels], dtype=np.float64)
        self.comm.allreduce(sums, tag="metrics")
        return (float(sums[0]), int(sums[1]), None if correct is None else int(sums[2]),
                int(sums[3]))

    def check_structure(self, controller):
        """Raise if the ranks' sparse structures differ (after a structure change)."""
        if self.parallel and controller is not None:
            check_structure(controller, self.comm)

    def barrier(self):
        """Wait for every rank (e.g. until rank 0 has written a checkpoint)."""
        if self.parallel:
            self.comm.barrier()


def _sharded(loader) -> bool:
    return bool(getattr(loader, "sharded", False))
