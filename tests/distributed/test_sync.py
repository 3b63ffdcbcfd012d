"""`broadcast_state`, `attach_controller` and `check_structure`: every rank starts from rank
0's model, optimizer and controller, makes the same structural decisions, and a divergence
is caught.

In one process: `broadcast_state` changes nothing and counts the bytes of the state's
arrays; arguments are refused. Under ``mpiexec -n 2`` (the ``two_ranks`` fixture): models,
optimizers and controllers built from different seeds on each rank (and a DynaDiag model
frozen on rank 0 alone, so its layers have another size there) come out identical to rank
0's; a RigL update on rank-dependent data picks the same diagonals on both ranks, and the
ones a single process picks on both ranks' data; one rank's changed offsets make
`check_structure` raise on both ranks. Every comparison across ranks is made on every rank
from gathered copies, so a failure fails every rank alike (none is left waiting).
"""

from __future__ import annotations

import numpy as np
import pytest

import diagnet as dn
import diagnet.functional as F
from diagnet import backend, nn, optim
from diagnet.distributed import (SingleProcess, attach_controller, broadcast_state,
                                 check_structure)
from diagnet.dst import DiagPruneGrow, DynaDiag, DynaDiagLinear


def mlp(seed, dtype=np.float64, device="cpu"):
    """A 75% diagonal MLP 12 -> 40 -> 10 whose offsets and values depend on ``seed``."""
    return nn.Sequential(
        nn.DiagLinear(12, 40, sparsity=0.75, rng=seed, dtype=dtype, device=device),
        nn.ReLU(),
        nn.DiagLinear(40, 10, sparsity=0.75, rng=seed + 1, dtype=dtype, device=device))


def dynadiag_mlp(seed, dtype=np.float64, device="cpu"):
    return nn.Sequential(
        DynaDiagLinear(12, 16, sparsity=0.75, rng=seed, dtype=dtype, device=device),
        nn.ReLU(),
        DynaDiagLinear(16, 10, sparsity=0.75, rng=seed + 1, dtype=dtype, device=device))


def data(seed, batch, device="cpu"):
    rng = np.random.default_rng(seed)
    return (dn.tensor(rng.standard_normal((batch, 12)), device=device),
            dn.tensor(rng.integers(0, 10, size=batch), device=device))


def train_step(model, optimizer, seed, device="cpu"):
    x, labels = data(seed, 6, device)
    optimizer.zero_grad()
    F.cross_entropy(model(x), labels).backward()
    optimizer.step()


def host(obj):
    """``obj`` with every array or Tensor as a NumPy copy (for comparing across ranks)."""
    if isinstance(obj, dn.Tensor):
        obj = obj.data
    if backend.is_array(obj):
        return backend.to_numpy(obj).copy()
    if isinstance(obj, dict):
        return {k: host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host(v) for v in obj)
    return obj


def assert_same(a, b, where="state"):
    """Exactly equal nested states (arrays: shape, dtype and every bit)."""
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray), where
        assert a.shape == b.shape and a.dtype == b.dtype, where
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def states(model, optimizer=None, controller=None):
    out = {"model": host(model.state_dict())}
    if optimizer is not None:
        out["optimizer"] = host(optimizer.state_dict())
    if controller is not None:
        out["controller"] = host(controller.state_dict())
    return out


def same_on_every_rank(comm, state):
    """Assert, on every rank, that every rank's ``state`` equals rank 0's."""
    gathered = comm.allgather_object(state)
    for rank, theirs in enumerate(gathered):
        assert_same(gathered[0], theirs, f"rank {rank}")


def differs_between_ranks(comm, state) -> bool:
    gathered = comm.allgather_object(state)
    try:
        for theirs in gathered:
            assert_same(gathered[0], theirs)
    except AssertionError:
        return True
    return False


# ----------------------------------------------------------------------------- one process


def test_one_rank_broadcast_changes_nothing_and_counts_the_arrays():
    model = mlp(0)
    opt = optim.Adam(model.parameters(), lr=1e-2)
    train_step(model, opt, 1)
    controller = DiagPruneGrow({"0": model[0], "2": model[2]}, method="rigl", t_end=10, rng=3)
    before = states(model, opt, controller)
    arrays = [p.data for p in model.state_dict().values()]
    arrays += [v for s in opt.state.values() for v in s.values() if backend.is_array(v)]
    comm = SingleProcess()
    broadcast_state(model, opt, controller, comm=comm)
    assert_same(before, states(model, opt, controller))
    assert comm.bytes_moved == {"initial": sum(a.nbytes for a in arrays)}


def test_broadcast_refuses_what_is_not_a_model():
    with pytest.raises(TypeError, match="model must be a Module; got list"):
        broadcast_state([1, 2], comm=SingleProcess())


@pytest.mark.parametrize("part", ["optimizer", "controller"])
def test_broadcast_refuses_parts_without_state_dicts(part):
    with pytest.raises(TypeError, match=f"{part} must have state_dict.*got int"):
        broadcast_state(mlp(0), comm=SingleProcess(), **{part: 5})


@pytest.mark.parametrize("root", [-1, 1, 0.0, True, "0"])
def test_broadcast_refuses_a_root_that_is_no_rank(root):
    with pytest.raises(ValueError, match=r"root must be a rank, an int in \[0, 1\); got"):
        broadcast_state(mlp(0), comm=SingleProcess(), root=root)


def test_broadcast_refuses_a_comm_that_is_not_a_communicator():
    with pytest.raises(TypeError, match="comm must be a Communicator or None; got int"):
        broadcast_state(mlp(0), comm=3)


def test_attach_controller_sets_a_weighted_reducer_on_every_tap():
    model = mlp(0)
    controller = DiagPruneGrow({"0": model[0], "2": model[2]}, method="rigl", t_end=10, rng=3)
    comm = SingleProcess()
    attach_controller(controller, comm, lambda: 0.5)
    (tap,) = controller.taps()
    got = tap.reducer(np.ones((2, 3)))
    np.testing.assert_array_equal(got, np.full((2, 3), 0.5))
    assert comm.bytes_moved == {"structure": 6 * 8}


def test_attach_controller_refuses_a_weight_outside_0_1_at_use():
    model = mlp(0)
    controller = DiagPruneGrow({"0": model[0]}, method="rigl", t_end=10, rng=3)
    attach_controller(controller, SingleProcess(), lambda: 2.0)
    with pytest.raises(ValueError, match=r"invalid weight_fn\(\)=2.0: must be in \[0, 1\]"):
        controller.taps()[0].reducer(np.ones((2, 2)))


@pytest.mark.parametrize("controller, weight_fn, match", [
    ("rigl", lambda: 1.0, "controller must be a SparsityController.*got str"),
    (None, 0.5, "weight_fn must be callable; got float"),
])
def test_attach_controller_refusals(controller, weight_fn, match):
    if controller is None:
        controller = DiagPruneGrow({"0": mlp(0)[0]}, method="rigl", t_end=10, rng=3)
    with pytest.raises(TypeError, match=match):
        attach_controller(controller, SingleProcess(), weight_fn)


def test_check_structure_passes_in_one_process_and_refuses_a_non_controller():
    model = mlp(0)
    check_structure(DiagPruneGrow({"0": model[0]}, t_end=10, rng=3), SingleProcess())
    with pytest.raises(TypeError, match="controller must be a SparsityController.*got dict"):
        check_structure({"0": model[0]}, SingleProcess())


# ----------------------------------------------------------------------------- two ranks


def test_two_ranks_broadcast_makes_model_optimizer_and_controller_rank_0s(two_ranks):
    comm = two_ranks
    model = mlp(10 * comm.rank)
    opt = optim.Adam(model.parameters(), lr=1e-2 * (comm.rank + 1))
    for step in range(1 + comm.rank):   # different moments and step counts
        train_step(model, opt, 100 * comm.rank + step)
    controller = DiagPruneGrow({"0": model[0], "2": model[2]}, method="rigl", t_end=10,
                               rng=comm.rank)
    assert differs_between_ranks(comm, states(model, opt, controller))
    root_state = comm.broadcast_object(states(model, opt, controller) if comm.rank == 0
                                       else None)
    broadcast_state(model, opt, controller, comm=comm)
    assert_same(root_state, states(model, opt, controller))
    same_on_every_rank(comm, states(model, opt, controller))
    # and they train on identically from here
    train_step(model, opt, 7)
    same_on_every_rank(comm, states(model, opt, controller))


def test_two_ranks_broadcast_of_a_model_frozen_on_rank_0_alone(two_ranks):
    comm = two_ranks
    model = dynadiag_mlp(10 * comm.rank)
    opt = optim.Adam(model.parameters(), lr=1e-2)
    controller = DynaDiag(model, rng=comm.rank)
    train_step(model, opt, comm.rank)
    if comm.rank == 0:
        for layer in (model[0], model[2]):
            layer.freeze()
        train_step(model, opt, 5)
    sizes = comm.allgather_object([tuple(p.shape) for p in model.parameters()])
    assert sizes[0] != sizes[1]
    broadcast_state(model, opt, controller, comm=comm)
    same_on_every_rank(comm, states(model, opt, controller))
    assert model[0].frozen and model[2].frozen
    assert not model[0].alpha.requires_grad
    x, _ = data(3, 4)
    same_on_every_rank(comm, host(model(x)))


def test_two_ranks_refused_state_raises_on_every_rank_and_changes_nothing(two_ranks):
    comm = two_ranks
    width = 40 if comm.rank == 0 else 41          # rank 1's model cannot take rank 0's
    model = nn.Sequential(nn.DiagLinear(12, width, sparsity=0.75, rng=0, dtype=np.float64))
    before = states(model)
    with pytest.raises(ValueError, match="shape"):
        broadcast_state(model, comm=comm)
    assert_same(before, states(model))


def test_two_ranks_refuse_different_parts_on_every_rank(two_ranks):
    comm = two_ranks
    model = mlp(0)
    opt = optim.SGD(model.parameters(), lr=0.1) if comm.rank == 0 else None
    with pytest.raises(ValueError, match="every rank must pass the same objects"):
        broadcast_state(model, opt, comm=comm)


def rigl_offsets(model, controller, x, labels):
    """One RigL update (step 0) from the gradient of the mean loss on ``(x, labels)``."""
    controller.before_step(0)
    model.zero_grad()
    F.cross_entropy(model(x), labels).backward()
    controller.after_step(0)
    return [backend.to_numpy(model[i].offsets.data).tolist() for i in (0, 2)]


def rigl(model):
    return DiagPruneGrow({"0": model[0], "2": model[2]}, method="rigl", delta_t=1, t_end=10,
                         f0=0.5, rng=11)


def test_two_ranks_rigl_chooses_the_diagonals_one_process_chooses_on_all_the_data(two_ranks):
    comm = two_ranks
    sizes = [7, 4]
    B = sum(sizes)
    everyone = [data(200 + r, sizes[r]) for r in range(comm.size)]
    model = mlp(0)
    controller = rigl(model)
    attach_controller(controller, comm, lambda: sizes[comm.rank] / B)
    got = rigl_offsets(model, controller, *everyone[comm.rank])
    whole = mlp(0)
    want = rigl_offsets(whole, rigl(whole), dn.concatenate([e[0] for e in everyone]),
                        dn.concatenate([e[1] for e in everyone]))
    assert got == want
    same_on_every_rank(comm, got)
    check_structure(controller, comm)


def test_two_ranks_check_structure_raises_on_every_rank_when_one_diverges(two_ranks):
    comm = two_ranks
    model = mlp(0)
    controller = rigl(model)
    check_structure(controller, comm)              # built from one seed: the same
    if comm.rank == 1:
        offsets = backend.to_numpy(model[2].offsets.data)
        free = np.setdiff1d(np.arange(model[2].P), offsets)[0]
        model[2].set_offsets(np.sort(np.append(offsets[1:], free)))
    with pytest.raises(RuntimeError, match=r"structure of layer '2' differs between rank 0 "
                                           r"and rank\(s\) 1"):
        check_structure(controller, comm)


# ----------------------------------------------------------------------------- CuPy (stand-in)


@pytest.mark.gpu
def test_broadcast_state_of_cupy_arrays(comm):
    model = mlp(10 * comm.rank, device="cuda")
    opt = optim.Adam(model.parameters(), lr=1e-2)
    train_step(model, opt, comm.rank, device="cuda")
    broadcast_state(model, opt, comm=comm)
    cp = backend.cupy_or_none()
    assert all(isinstance(p.data, cp.ndarray) for p in model.parameters())
    assert all(isinstance(v, cp.ndarray) for s in opt.state.values() for v in s.values()
               if backend.is_array(v))
    same_on_every_rank(comm, states(model, opt))


@pytest.mark.gpu
def test_broadcast_state_of_a_cupy_dynadiag_model(comm):
    model = dynadiag_mlp(10 * comm.rank, device="cuda")
    if comm.rank == 0:
        model[0].freeze()
    broadcast_state(model, comm=comm)
    same_on_every_rank(comm, states(model))
    assert model[0].frozen


@pytest.mark.gpu
def test_attached_reducer_sums_cupy_gradients_on_the_device(comm):
    model = mlp(0, device="cuda")
    controller = rigl(model)
    attach_controller(controller, comm, lambda: 0.5)
    cp = backend.cupy_or_none()
    dense = cp.full((4, 3), float(comm.rank + 1))
    got = controller.taps()[0].reducer(dense.T)      # a transposed (F-ordered) gradient
    assert isinstance(got, cp.ndarray) and got.shape == (3, 4)
    total = 0.5 * sum(r + 1 for r in range(comm.size))
    np.testing.assert_array_equal(backend.to_numpy(got), np.full((3, 4), total))
