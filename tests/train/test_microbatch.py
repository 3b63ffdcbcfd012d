"""`MicroBatchStep` on its own, in one process (the equality across ranks is tested under
MPI in tests/distributed/test_trainer_parallel.py)."""

from __future__ import annotations

import numpy as np
import pytest

import diagnet as dn
import diagnet.functional as F
from diagnet import optim
from diagnet.distributed import SingleProcess
from diagnet.models import MLP
from diagnet.train.microbatch import MicroBatchStep


def _batch(n=10):
    rng = np.random.default_rng(0)
    return (dn.tensor(rng.standard_normal((n, 6))),), dn.tensor(rng.integers(0, 3, size=n))


def _micro_grads(model, inputs, target, micro_batch):
    """The gradients of the mean loss over the batch, each micro-batch's on its own, summed
    in order from zeros (what the step must give)."""
    n = target.shape[0]
    total = None
    for lo in range(0, n, micro_batch):
        hi = min(lo + micro_batch, n)
        model.zero_grad()
        part = F.cross_entropy(model(dn.tensor(inputs[0].numpy()[lo:hi])),
                               dn.tensor(target.numpy()[lo:hi]))
        (part * ((hi - lo) / n)).backward()
        grads = [p.grad.numpy().copy() for p in model.parameters()]
        total = [np.zeros_like(g) + g for g in grads] if total is None else \
            [t + g for t, g in zip(total, grads)]
    return total


def test_the_step_sums_the_micro_batches_in_order_and_follows_an_added_group():
    model = MLP(6, [5], 3, dtype=np.float64, rng=0)
    inputs, target = _batch()
    want = _micro_grads(model, inputs, target, 4)  # slots of 4, 4 and 2 samples
    optimizer = optim.SGD(model.features.parameters(), lr=0.0)  # the head comes later
    step = MicroBatchStep(4, optimizer, None, SingleProcess())
    numbers = step.forward_backward(model, F.cross_entropy, inputs, target)
    assert numbers[2:] == (10, 10) and step.slots == 3
    step.reduce()
    features = list(model.features.parameters())
    for param, expected in zip(model.parameters(), want):
        if any(param is p for p in features):
            np.testing.assert_array_equal(param.grad.numpy(), expected)
    optimizer.add_param_group({"params": list(model.head.parameters())})
    step.forward_backward(model, F.cross_entropy, inputs, target)
    step.reduce()
    for param, expected in zip(model.parameters(), want):  # lr 0: the same model
        np.testing.assert_array_equal(param.grad.numpy(), expected)
    assert step.stats["steps"] == 2  # the counts carry over the new layout


def test_the_default_generator_ends_forked_by_the_slot_count():
    model = MLP(6, [5], 3, dtype=np.float64, rng=0, dropout=0.5)
    inputs, target = _batch()
    dn.manual_seed(1)
    base = dn.random.get_state()
    step = MicroBatchStep(3, optim.SGD(model.parameters(), lr=0.1), None, SingleProcess())
    step.forward_backward(model, F.cross_entropy, inputs, target)
    assert dn.random.get_state() == dn.random.forked_state(base, 4)  # 4 slots of 3, 3, 3, 1


def test_a_share_that_does_not_start_at_a_micro_batch_is_refused():
    class TwoRanks(SingleProcess):  # rank 1 of 2, with a share that starts at sample 5
        rank, size = 1, 2

        def allgather_object(self, obj):
            return [5, obj]

    model = MLP(6, [5], 3, dtype=np.float64, rng=0)
    step = MicroBatchStep(4, optim.SGD(model.parameters(), lr=0.1), None, TwoRanks())
    with pytest.raises(ValueError, match="starts at sample 5, not at a micro-batch boundary"):
        step.forward_backward(model, F.cross_entropy, *_batch())
