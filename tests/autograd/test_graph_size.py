"""How many graph nodes and (through the CuPy stand-in) GPU launches a training step costs.

At the small widths of the example ViT a step is paid per node and per launch as much as per
flop: each `Function` application costs a few microseconds of engine work on the CPU, and
each kernel a launch on the GPU (about 20 us). These tests count both for one training step
of a tiny diagonal `ViT` (forward, cross-entropy, backward, AdamW step) and bound them at
what the step cost before the fused ops: the speed work may only lower them. When an op is
fused and a count drops, lower its bound here to keep the gain.

Counted:

* forward applications: every ``Function.__call__``, recorded or not;
* backward calls: every ``Function.backward`` the backward walk runs;
* (``gpu``, stand-in only) launches: our own kernels (``RawKernel`` calls) plus the stand-in's
  estimate of CuPy's own (``cupy.array_ops``: element-wise ops, reductions, products,
  copies, assignments; not views). Only the sum is bounded: turning composed CuPy ops into
  one kernel of ours raises our own count and lowers the sum.

Each count is bounded for a step of the whole model and per transformer block (the
difference between depth 2 and depth 1), so that a block-level saving cannot hide behind a
saving elsewhere.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest

import diagnet as dn
import diagnet.functional as F
from diagnet import backend, optim
from diagnet.autograd import Function
from diagnet.models import ViT

#: Upper bounds: the counts of the step below with the fused ops of the transformer block.
#: A block applies 8 Functions (4 DiagLinearFunction, 2 AddLayerNorm: each residual add with
#: the layer norm after it, one each of QKVAttention and BiasGELU) and launches 23 of our
#: kernels (the diagonal layers' 12, the layer norms' 6, attention's 2, bias + GELU's 3)
#: beside 24 of CuPy's; a step launches 52 of ours and 77 of CuPy's (the optimizer's update
#: is one launch per group). Before the fused ops a block applied 25 Functions and launched
#: 12 + 277, a step 63 Functions and 24 + 737 launches; with the head split, attention and
#: head merge as three nodes, 12 per block and 35 per step; with separate Add and LayerNorm
#: nodes, 10 per block and 31 per step, and 51 launches per block, 135 per step.
MAX_FORWARD = {"step": 27, "block": 8}
MAX_BACKWARD = {"step": 24, "block": 8}
MAX_LAUNCHES = {"step": 129, "block": 47}


def _subclasses(cls):
    """Every subclass of ``cls``, at any depth."""
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


@pytest.fixture
def node_counter(monkeypatch):
    """Count forward applications and backward calls per `Function` type.

    Returns ``(forward, backward)``, two `collections.Counter` keyed by type name, filled by
    every `Function` call and every ``backward`` run while the test runs.
    """
    forward, backward = collections.Counter(), collections.Counter()
    call = Function.__call__

    def counted_call(self, *inputs):
        forward[type(self).__name__] += 1
        return call(self, *inputs)

    def counted(method):
        def counted_backward(self, *grad_outputs):
            backward[type(self).__name__] += 1
            return method(self, *grad_outputs)
        return counted_backward

    monkeypatch.setattr(Function, "__call__", counted_call)
    for sub in set(_subclasses(Function)):
        if "backward" in vars(sub):
            monkeypatch.setattr(sub, "backward", counted(vars(sub)["backward"]))
    return forward, backward


def _step_runner(depth, device=None):
    """One training step of a tiny diagonal ViT of ``depth`` blocks, as a function (the
    model built and one step run, so that lazy state and compiled kernels exist)."""
    model = ViT(image_size=8, patch_size=4, in_channels=1, dim=8, depth=depth, heads=2,
                mlp_ratio=2, num_classes=3, linear="diag", sparsity=0.5, device=device, rng=0)
    opt = optim.AdamW(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    x = dn.tensor(rng.standard_normal((2, 1, 8, 8)).astype(np.float32), device=device)
    labels = dn.tensor(rng.integers(0, 3, 2), device=device)

    def step():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), labels)
        loss.backward()
        opt.step()

    step()
    return step


def _count(read, device=None):
    """``{"step": n, "block": n}``: how much ``read()`` grows over one training step of a
    2-block ViT, and how much the second block adds to that."""
    totals = []
    for depth in (1, 2):
        step = _step_runner(depth, device)
        before = read()
        step()
        totals.append(read() - before)
    return {"step": totals[1], "block": totals[1] - totals[0]}


def _assert_at_most(counts, bounds, what):
    assert counts["step"] > 0, f"no {what} counted: the counter is not wired"
    for key, bound in bounds.items():
        assert counts[key] <= bound, f"{what} per {key}: {counts[key]}, more than {bound}"


def test_graph_nodes_per_vit_training_step(node_counter):
    forward, backward = node_counter
    _assert_at_most(_count(forward.total), MAX_FORWARD, "Function applications")
    _assert_at_most(_count(backward.total), MAX_BACKWARD, "backward calls")


@pytest.mark.gpu
def test_gpu_launches_per_vit_training_step():
    cp = backend.cupy_or_none()
    if not hasattr(cp, "kernel_launches"):
        pytest.skip("counting launches needs the CuPy stand-in (--fake-cupy)")
    launches = _count(lambda: cp.kernel_launches + cp.array_ops, device="cuda")
    _assert_at_most(launches, MAX_LAUNCHES, "GPU launches (ours and CuPy's)")
