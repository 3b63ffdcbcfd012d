"""`GradientAverager` and `DistributedOptimizer`: gradients summed across ranks, each rank's
weighted by its share of the global batch, packed in buckets of stored values.

In one process (a `SingleProcess` communicator): the averager leaves the gradients as they
are (weight None is the mean over one rank), moves exactly the stored values (a diagonal
layer's ``K x L``, never ``m x n``), packs the buckets it should, follows a change of
structure, gives a missing gradient zeros, and refuses bad arguments before it changes
anything. Under ``mpiexec -n 2`` (the ``two_ranks`` fixture): each rank computes the
gradient of its own, differently sized share of the data, and the averaged gradient equals
the gradient of the mean loss over both ranks' data, computed here in one piece.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import diagnet as dn
import diagnet.functional as F
from diagnet import nn, optim
from diagnet.distributed import DistributedOptimizer, GradientAverager, SingleProcess
from diagnet.dst import DynaDiagLinear

#: the float64 tolerance of a gradient summed over ranks against the same gradient computed
#: in one piece: the two differ only in the order of a few float sums
F64_SUM_TOL = dict(rtol=1e-12, atol=1e-12)
#: float32: a few ulps of the float32 gradients' size (order 1)
F32_SUM_TOL = dict(rtol=1e-5, atol=1e-6)


def mlp(seed=0, dtype=np.float64, device="cpu", sparsity=0.9):
    """A 90% diagonal MLP 20 -> 30 -> 10 (float64 by default)."""
    return nn.Sequential(
        nn.DiagLinear(20, 30, sparsity=sparsity, rng=seed, dtype=dtype, device=device),
        nn.ReLU(),
        nn.DiagLinear(30, 10, sparsity=sparsity, rng=seed + 1, dtype=dtype, device=device))


def data(seed, batch, dtype=np.float64):
    """``(x (batch, 20), labels (batch,))`` as NumPy arrays, drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, 20)).astype(dtype), rng.integers(0, 10, size=batch)


def backward(model, x, labels, device="cpu"):
    """Forward and backward of the mean cross-entropy over the batch ``x``."""
    model.zero_grad()
    logits = model(dn.tensor(x, device=device))
    F.cross_entropy(logits, dn.tensor(labels, device=device)).backward()


def host_grads(model):
    return [dn.backend.to_numpy(p.grad.data) for p in model.parameters()]


# ----------------------------------------------------------------------------- one process


@pytest.mark.parametrize("weight", [None, 1.0, 1])
def test_one_rank_leaves_the_gradients_as_they_are(weight):
    model = mlp()
    backward(model, *data(1, 8))
    before = host_grads(model)
    averager = GradientAverager(list(model.parameters()), comm=SingleProcess())
    averager.reduce(weight)
    for got, want in zip(host_grads(model), before):
        np.testing.assert_array_equal(got, want)


def test_the_weight_scales_the_gradients():
    model = mlp()
    backward(model, *data(1, 8))
    before = host_grads(model)
    GradientAverager(list(model.parameters()), comm=SingleProcess()).reduce(0.25)
    for got, want in zip(host_grads(model), before):
        np.testing.assert_array_equal(got, want * 0.25)  # a power of two: exact


def test_only_the_stored_values_are_moved():
    model = mlp()
    backward(model, *data(1, 8))
    comm = SingleProcess()
    params = list(model.parameters())
    averager = GradientAverager(params, comm=comm)
    averager.reduce()
    layers = [model[0], model[2]]
    stored = sum(layer.K * layer.L * 8 + layer.out_features * 8 for layer in layers)
    dense = sum(layer.out_features * layer.in_features * 8 for layer in layers)
    assert [tuple(layer.values.shape) for layer in layers] == [(3, 20), (3, 10)]
    assert averager.stats["last_bytes"] == stored == sum(p.data.nbytes for p in params)
    assert stored < dense / 4   # 90% sparse: about a tenth of the dense weights, plus biases
    assert comm.bytes_moved["gradients"] == stored
    averager.reduce()
    assert averager.stats == {"steps": 2, "bytes": 2 * stored, "last_bytes": stored,
                              "buckets": 1}
    assert comm.bytes_moved["gradients"] == 2 * stored


def test_buckets_split_by_size_dtype_and_a_parameter_larger_than_a_bucket():
    # float64 sizes 10, 10 | 100 (800 bytes > 200: a bucket of its own) | 5, and float32
    # sizes 3, 4 in a bucket of their own dtype
    shapes = [((10,), np.float64), ((2, 5), np.float64), ((100,), np.float64),
              ((3,), np.float32), ((5,), np.float64), ((4,), np.float32)]
    params = [nn.Parameter(np.arange(math.prod(s), dtype=dt).reshape(s)) for s, dt in shapes]
    for k, p in enumerate(params):
        p.grad = dn.Tensor.from_array(np.full(p.data.shape, k + 1.0, dtype=p.dtype))
    comm = SingleProcess()
    averager = GradientAverager(params, comm=comm, bucket_bytes=200)
    averager.reduce()
    assert averager.stats["buckets"] == 4          # [10, 10], [100], [5] float64; [3, 4] float32
    assert averager.stats["last_bytes"] == (10 + 10 + 100 + 5) * 8 + (3 + 4) * 4
    for k, p in enumerate(params):
        assert p.grad.shape == p.shape and p.grad.dtype == p.dtype
        np.testing.assert_array_equal(p.grad.data, k + 1.0)
    big = GradientAverager(params, comm=comm)
    big.reduce()
    assert big.stats["buckets"] == 2               # one per dtype


def test_the_layout_follows_set_offsets():
    model = mlp()
    averager = GradientAverager(list(model.parameters()), comm=SingleProcess())
    backward(model, *data(1, 8))
    averager.reduce()
    first = averager.stats["last_bytes"]
    layer = model[0]
    grown = np.union1d(dn.backend.to_numpy(layer.offsets.data), [0, 1, 2, 3, 4, 5])
    layer.set_offsets(grown)
    backward(model, *data(2, 8))
    before = host_grads(model)
    averager.reduce()
    assert layer.values.grad.shape == (grown.size, 20)
    assert averager.stats["last_bytes"] == first + (grown.size - 3) * 20 * 8
    for got, want in zip(host_grads(model), before):
        np.testing.assert_array_equal(got, want)


def test_the_layout_follows_a_dynadiag_freeze_and_leaves_alpha_out():
    layer = DynaDiagLinear(12, 16, sparsity=0.75, rng=0, dtype=np.float64)
    params = list(layer.parameters())
    averager = GradientAverager(params, comm=SingleProcess())
    x = dn.tensor(np.random.default_rng(3).standard_normal((4, 12)))
    layer(x).sum().backward()
    averager.reduce()
    soft = averager.stats["last_bytes"]
    assert soft == sum(p.data.nbytes for p in params)          # values (S, L), bias, alpha
    layer.freeze()
    layer.zero_grad()
    layer(x).sum().backward()
    averager.reduce()
    assert layer.alpha.grad is None                             # not trained: not reduced
    assert averager.stats["last_bytes"] == (layer.active_k * 12 + 16) * 8


def test_a_missing_gradient_becomes_zeros():
    model = mlp()
    backward(model, *data(1, 8))
    model[2].bias.grad = None
    GradientAverager(list(model.parameters()), comm=SingleProcess()).reduce()
    assert model[2].bias.grad is not None
    np.testing.assert_array_equal(model[2].bias.grad.data, np.zeros(10))


def test_the_new_gradients_do_not_share_the_buckets():
    model = mlp()
    averager = GradientAverager(list(model.parameters()), comm=SingleProcess())
    backward(model, *data(1, 8))
    averager.reduce()
    kept = host_grads(model)
    held = [p.grad.data for p in model.parameters()]
    backward(model, *data(2, 8))
    averager.reduce()
    for got, want in zip(held, kept):
        np.testing.assert_array_equal(got, want)


def test_distributed_optimizer_steps_as_the_wrapped_optimizer():
    model, twin = mlp(), mlp()
    adam = optim.Adam(model.parameters(), lr=1e-2)
    wrapped = DistributedOptimizer(adam, comm=SingleProcess())
    plain = optim.Adam(twin.parameters(), lr=1e-2)
    for seed in range(3):
        backward(model, *data(seed, 8))
        backward(twin, *data(seed, 8))
        wrapped.step()
        plain.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        np.testing.assert_array_equal(a.data, b.data)
    assert wrapped.param_groups is adam.param_groups and wrapped.state is adam.state
    assert wrapped.averager.stats["steps"] == 3
    saved = wrapped.state_dict()
    assert saved["state"][0]["step"] == 3
    wrapped.load_state_dict(saved)
    wrapped.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_distributed_optimizer_runs_the_closure_before_averaging():
    model = mlp()
    wrapped = DistributedOptimizer(optim.SGD(model.parameters(), lr=0.1), comm=SingleProcess())
    x, labels = data(1, 8)

    def closure():
        backward(model, x, labels)
        return 1.5

    assert wrapped.step(closure=closure) == 1.5
    assert wrapped.averager.stats["steps"] == 1


def test_distributed_optimizer_follows_an_added_param_group():
    model = mlp()
    adam = optim.Adam(model[0].parameters(), lr=1e-2)
    wrapped = DistributedOptimizer(adam, comm=SingleProcess())
    adam.add_param_group({"params": list(model[2].parameters())})
    backward(model, *data(1, 8))
    wrapped.step()
    assert wrapped.averager.stats["last_bytes"] == sum(p.data.nbytes for p in model.parameters())


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("params, err, match", [
    (nn.Parameter(np.ones(3)), TypeError, "params must be a list of Tensors.*got Parameter"),
    ({nn.Parameter(np.ones(3))}, TypeError, "params must be a list.*got set"),
    (5, TypeError, "params must be a list of Tensors; got int"),
    ([np.ones(3)], TypeError, r"params\[0\] must be a Tensor; got ndarray"),
])
def test_averager_refuses_params_that_are_not_a_list_of_tensors(params, err, match):
    with pytest.raises(err, match=match):
        GradientAverager(params, comm=SingleProcess())


def test_averager_refuses_a_tensor_given_twice():
    p = nn.Parameter(np.ones(3))
    with pytest.raises(ValueError, match="holds a Tensor twice"):
        GradientAverager([p, p], comm=SingleProcess())


@pytest.mark.parametrize("bucket_bytes", [0, -8, 1.5, True, "4MB", None])
def test_averager_refuses_a_bucket_size_that_is_not_a_positive_int(bucket_bytes):
    with pytest.raises(ValueError, match=f"bucket_bytes must be a positive int; got "
                                         f"{bucket_bytes!r}"):
        GradientAverager([nn.Parameter(np.ones(3))], comm=SingleProcess(),
                         bucket_bytes=bucket_bytes)


def test_averager_refuses_a_comm_that_is_not_a_communicator():
    with pytest.raises(TypeError, match="comm must be a Communicator or None; got str"):
        GradientAverager([nn.Parameter(np.ones(3))], comm="world")


@pytest.mark.parametrize("weight, err, match", [
    (-0.5, ValueError, r"invalid weight=-0.5: must be in \[0, 1\]"),
    (1.5, ValueError, r"invalid weight=1.5: must be in \[0, 1\]"),
    (math.nan, ValueError, "invalid weight=nan: must be finite"),
    (math.inf, ValueError, "invalid weight=inf: must be finite"),
    (True, TypeError, "weight must be a real number; got bool"),
    ("half", TypeError, "weight must be a real number; got str"),
])
def test_reduce_refuses_a_weight_outside_0_1_and_changes_nothing(weight, err, match):
    model = mlp()
    backward(model, *data(1, 8))
    before = host_grads(model)
    averager = GradientAverager(list(model.parameters()), comm=SingleProcess())
    with pytest.raises(err, match=match):
        averager.reduce(weight)
    for got, want in zip(host_grads(model), before):
        np.testing.assert_array_equal(got, want)
    assert averager.stats["steps"] == 0


@pytest.mark.parametrize("grad, err, match", [
    (np.ones((3,)), ValueError, r"gradient of params\[1\] has shape \(3,\), dtype float64 "
                                r"on cpu; the parameter has shape \(4,\), dtype float64"),
    (np.ones((4,), dtype=np.float32), ValueError, r"params\[1\] has shape \(4,\), dtype "
                                                  "float32"),
    ("not a tensor", TypeError, r"gradient of params\[1\] must be a Tensor or None; got str"),
])
def test_reduce_refuses_a_gradient_unlike_its_parameter_and_changes_nothing(grad, err, match):
    params = [nn.Parameter(np.zeros(2)), nn.Parameter(np.zeros(4))]
    params[0].grad = dn.Tensor.from_array(np.full(2, 3.0))
    params[1].grad = dn.Tensor.from_array(grad) if isinstance(grad, np.ndarray) else grad
    held = params[0].grad
    with pytest.raises(err, match=match):
        GradientAverager(params, comm=SingleProcess()).reduce(0.5)
    assert params[0].grad is held
    np.testing.assert_array_equal(held.data, 3.0)


def test_distributed_optimizer_refuses_what_is_not_an_optimizer():
    with pytest.raises(TypeError, match="optimizer must be a diagnet optimizer.*got list"):
        DistributedOptimizer([nn.Parameter(np.ones(3))], comm=SingleProcess())


# ----------------------------------------------------------------------------- two ranks


def shares(comm):
    """Each rank's batch size: unequal on purpose (5, 8, 11, ...)."""
    return [5 + 3 * r for r in range(comm.size)]


def averaged_against_one_piece(comm, dtype, device="cpu", tol=F64_SUM_TOL):
    """Every rank: the averaged gradient of its own share equals the gradient of the mean
    loss over all ranks' data (gathered) computed here in one piece."""
    sizes = shares(comm)
    B = sum(sizes)
    x, labels = data(100 + comm.rank, sizes[comm.rank], dtype)   # rank-dependent data
    model, whole = mlp(dtype=dtype, device=device), mlp(dtype=dtype, device=device)
    backward(model, x, labels, device)
    averager = GradientAverager(list(model.parameters()), comm=comm, bucket_bytes=256)
    averager.reduce(sizes[comm.rank] / B)
    everyone = comm.allgather_object((x, labels))
    backward(whole, np.concatenate([e[0] for e in everyone]),
             np.concatenate([e[1] for e in everyone]), device)
    got, want = host_grads(model), host_grads(whole)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == dtype
        np.testing.assert_allclose(g, w, **tol)
    # every rank holds the same averaged gradient, to the bit
    gathered = comm.allgather_object(got)
    for theirs in gathered:
        for g, t in zip(got, theirs):
            np.testing.assert_array_equal(g, t)
    assert averager.stats["buckets"] > 1
    assert averager.stats["last_bytes"] == sum(p.data.nbytes for p in model.parameters())


def test_two_ranks_average_equals_the_gradient_of_both_ranks_data_float64(two_ranks):
    averaged_against_one_piece(two_ranks, np.float64)


def test_two_ranks_average_equals_the_gradient_of_both_ranks_data_float32(two_ranks):
    averaged_against_one_piece(two_ranks, np.float32, tol=F32_SUM_TOL)


def test_two_ranks_a_gradient_missing_on_one_rank_counts_as_zeros(two_ranks):
    comm = two_ranks
    p = nn.Parameter(np.zeros(3))
    p.grad = dn.Tensor.from_array(np.array([1.0, 2.0, 3.0])) if comm.rank == 0 else None
    GradientAverager([p], comm=comm).reduce(0.5)
    np.testing.assert_array_equal(p.grad.data, [0.5, 1.0, 1.5])


def test_two_ranks_different_models_are_refused_on_every_rank(two_ranks):
    comm = two_ranks
    model = mlp(sparsity=0.9 if comm.rank == 0 else 0.5)
    backward(model, *data(1, 4))
    with pytest.raises(RuntimeError, match="the trained parameters differ between rank"):
        GradientAverager(list(model.parameters()), comm=comm).reduce()


def test_two_ranks_distributed_optimizer_trains_as_one_process(two_ranks):
    comm = two_ranks
    sizes = shares(comm)
    B = sum(sizes)
    model, whole = mlp(), mlp()
    wrapped = DistributedOptimizer(optim.Adam(model.parameters(), lr=1e-2), comm=comm)
    plain = optim.Adam(whole.parameters(), lr=1e-2)
    for step in range(3):
        everyone = [data(10 * step + r, sizes[r]) for r in range(comm.size)]
        backward(model, *everyone[comm.rank])
        wrapped.step(sizes[comm.rank] / B)
        backward(whole, np.concatenate([e[0] for e in everyone]),
                 np.concatenate([e[1] for e in everyone]))
        plain.step()
    for a, b in zip(model.parameters(), whole.parameters()):
        np.testing.assert_allclose(a.data, b.data, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- CuPy (stand-in)


@pytest.mark.gpu
def test_averager_on_cupy_arrays(comm):
    averaged_against_one_piece(comm, np.float64, device="cuda")


@pytest.mark.gpu
def test_averager_keeps_cupy_gradients_on_the_device(comm):
    model = mlp(device="cuda")
    backward(model, *data(1, 4), device="cuda")
    GradientAverager(list(model.parameters()), comm=comm).reduce()
    cp = dn.backend.cupy_or_none()
    assert all(isinstance(p.grad.data, cp.ndarray) for p in model.parameters())


# ----------------------------------------------------------------------------- in slot order


def test_ordered_sum_adds_the_slots_in_order_from_zeros():
    rows = np.array([[1e16, -0.0], [1.0, -0.0], [-1e16, -0.0]])
    total = dn.distributed.ordered_sum(rows.copy(), SingleProcess(), tag="gradients")
    # ((0 + 1e16) + 1) - 1e16 = 0 in float64 (1 is lost against 1e16); a sum of -0.0 slots
    # is +0.0, as it is on several ranks, where the other ranks add +0.0 to each slot
    np.testing.assert_array_equal(total, [0.0, 0.0])
    assert not np.signbit(total[1])


def test_ordered_gradient_sum_gives_the_slots_sum_in_slot_order():
    model = mlp()
    params = list(model.parameters())
    comm = SingleProcess()
    summer = dn.distributed.OrderedGradientSum(params, comm=comm)
    x, labels = data(3, 12)
    parts = []
    summer.begin(3)
    for slot, rows in ((2, slice(8, 12)), (0, slice(0, 4)), (1, slice(4, 8))):  # any order
        backward(model, x[rows], labels[rows])
        parts.append((slot, host_grads(model)))
        summer.add(slot)
        assert all(p.grad is None for p in params)  # ready for the next micro-batch
    summer.finish()
    by_slot = dict(parts)
    for i, got in enumerate(host_grads(model)):
        want = np.zeros_like(got)
        for slot in range(3):
            want = want + by_slot[slot][i]
        np.testing.assert_array_equal(got, want)
    stored = sum(p.data.nbytes for p in params)
    assert summer.stats["last_bytes"] == 3 * stored == comm.bytes_moved["gradients"]


def test_ordered_gradient_sum_refuses_calls_out_of_turn():
    model = mlp()
    summer = dn.distributed.OrderedGradientSum(list(model.parameters()), comm=SingleProcess())
    with pytest.raises(RuntimeError, match="add before begin"):
        summer.add(0)
    with pytest.raises(RuntimeError, match="finish before begin"):
        summer.finish()
    with pytest.raises(ValueError, match="slots must be a positive int"):
        summer.begin(0)
    summer.begin(2)
    for bad in (2, -1, 1.0):
        with pytest.raises(ValueError, match=r"slot must be an int in \[0, 2\)"):
            summer.add(bad)


def test_for_params_keeps_the_averager_or_makes_one_of_its_kind_with_the_counts():
    model = mlp()
    params = list(model.parameters())
    for kind in (GradientAverager, dn.distributed.OrderedGradientSum):
        averager = kind(params[:2], comm=SingleProcess(), bucket_bytes=64)
        averager.stats["steps"] = 3
        assert averager.for_params(list(params[:2])) is averager
        grown = averager.for_params(params)
        assert type(grown) is kind and len(grown.params) == len(params)
        assert all(a is b for a, b in zip(grown.params, params))
        assert grown.stats["steps"] == 3 and grown.bucket_bytes == 64
