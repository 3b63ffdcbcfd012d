"""The Trainer across ranks: 2-rank training is 1-process training with the same global batch.

Run under two ranks: ``mpiexec -n 2 python -m pytest -q tests/distributed``; in one process
the tests that need two ranks skip, and the single-process checks (a 1-rank communicator, the
refusals) run.

Each 2-rank test also trains the same run in one process (`SingleProcess`, an unsharded
loader) on every rank and compares: float64 to 1e-10 relative, float32 to 1e-5, identical
offsets and masks. The pieces: a small MLP whose hidden layers are diagonal (RigL with mask
updates every 2 steps, or DynaDiag with swaps and a freeze) or unstructured (RigL), seeded
synthetic data, Adam.
"""

from __future__ import annotations

import math
import os
import shutil

import numpy as np
import pytest

import diagnet as dn
from diagnet import optim
from diagnet.data import ArrayDataset, DataLoader
from diagnet.distributed import SingleProcess
from diagnet.dst import TemperatureSchedule, sparsify
from diagnet.models import MLP
from diagnet.train import NonFiniteLossError, Trainer, read_log
from diagnet.train.parallel import NullLog

SAMPLES, FEATURES, CLASSES, BATCH = 96, 16, 4, 24


def _data(dtype):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((SAMPLES, FEATURES)).astype(dtype)
    y = np.abs(x[:, :CLASSES]).argmax(1).astype(np.int64)
    return x, y


def _run(comm, out, method="rigl", dtype=np.float64, epochs=2, resume=None, loss_fn=None,
         overwrite=False, device="cpu", micro_batch=None, dropout=0.0):
    """Build and train the test run on ``comm`` into ``out``; return (trainer, result)."""
    x, y = _data(dtype)
    world = comm if hasattr(comm, "rank") else SingleProcess()
    shard = dict(rank=world.rank, world_size=world.size, device=device)
    train = DataLoader(ArrayDataset(x, y), batch_size=BATCH, shuffle=True, seed=3,
                       micro_batch=micro_batch, **shard)
    test = DataLoader(ArrayDataset(x[:40], y[:40]), batch_size=20, **shard)
    model = MLP(FEATURES, [16, 16], CLASSES, dtype=dtype, rng=0, device=device,
                dropout=dropout)
    layer = "diag"
    if method == "unstructured_rigl":
        layer, method = "unstructured", "rigl"
    if method == "rigl":
        options = dict(delta_t=2, t_end=7)
    else:
        options = dict(schedule=TemperatureSchedule("cosine", span=1, t_start=5.0, t_end=0.5),
                       freeze_at=1, swap_every=2, mode="sparse")
    controller = sparsify(model, layer, 0.75, method=method, dense=("head",),
                          count_dense=False, rng=0, **options)
    optimizer = optim.Adam(model.parameters(), lr=1e-2)
    trainer = Trainer(model, optimizer, train, eval_loader=test, controller=controller,
                      epochs=epochs, out_dir=out, best_metric="eval_accuracy", seed=0,
                      progress=False, comm=comm, overwrite=overwrite,
                      **({"loss_fn": loss_fn} if loss_fn else {}))
    return trainer, trainer.fit(resume=resume)


def _state(trainer):
    """Parameters, offsets and controller state as host arrays / plain values."""
    model = {k: dn.backend.to_numpy(dn.backend.unwrap(v))
             for k, v in trainer.model.state_dict().items()}
    return model, trainer.controller.state_dict()


def _assert_same(a, b, rtol):
    (ma, ca), (mb, cb) = _state(a), _state(b)
    assert sorted(ma) == sorted(mb)
    for key in ma:
        if ma[key].dtype.kind in "iub":
            np.testing.assert_array_equal(ma[key], mb[key], err_msg=key)
        else:
            np.testing.assert_allclose(ma[key], mb[key], rtol=rtol, atol=rtol * 1e-3,
                                       err_msg=key)


# ----------------------------------------------------------------------------- one process


def test_single_process_comm_trains_as_before(tmp_path):
    """comm=SingleProcess() is the plain trainer: the same parameters, bit for bit."""
    if dn.distributed.world_size() > 1:
        pytest.skip("compares with the default communicator of a single process")
    a, ra = _run(SingleProcess(), tmp_path / "a")
    b, rb = _run(None, tmp_path / "b")
    _assert_same(a, b, rtol=0)
    assert ra.metrics == rb.metrics
    start = read_log(ra.log_path)[0]
    assert start["event"] == "run_start" and start["world_size"] == 1


def test_micro_batches_in_one_process_train_the_default_model(tmp_path):
    """One process: micro-batches of 8 change only the order of the gradient sums (float64:
    1e-10); one micro-batch of the whole batch is the default step bit for bit (without a
    controller, whose scores come from another formula, nothing differs)."""
    if dn.distributed.world_size() > 1:
        pytest.skip("single-process runs")
    default, rd = _run(SingleProcess(), tmp_path / "default")
    micro, rm = _run(SingleProcess(), tmp_path / "micro", micro_batch=8)
    _assert_same(default, micro, rtol=1e-10)
    assert default.controller.structure() == micro.controller.structure()
    assert math.isclose(rd.metrics["train_loss"], rm.metrics["train_loss"], rel_tol=1e-12)
    assert read_log(rm.log_path)[0]["train_loader"]["micro_batch"] == 8

    def plain(out, micro_batch):
        x, y = _data(np.float64)
        train = DataLoader(ArrayDataset(x, y), batch_size=BATCH, shuffle=True, seed=3,
                           micro_batch=micro_batch)
        model = MLP(FEATURES, [16, 16], CLASSES, dtype=np.float64, rng=0)
        trainer = Trainer(model, optim.Adam(model.parameters(), lr=1e-2), train, epochs=2,
                          out_dir=out, progress=False)
        trainer.fit()
        return trainer

    a, b = plain(tmp_path / "a", None), plain(tmp_path / "b", BATCH)
    for (key, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        np.testing.assert_array_equal(va.numpy(), vb.numpy(), err_msg=key)


def test_a_micro_batch_run_resumes_exactly_and_refuses_another_micro_batch(tmp_path):
    if dn.distributed.world_size() > 1:
        pytest.skip("single-process runs")
    straight, _ = _run(SingleProcess(), tmp_path / "straight", micro_batch=8, dropout=0.2)
    _run(SingleProcess(), tmp_path / "split", micro_batch=8, dropout=0.2, epochs=1)
    with pytest.raises(ValueError, match="train loader differs"):
        _run(SingleProcess(), tmp_path / "split", micro_batch=6, dropout=0.2, resume=True)
    resumed, _ = _run(SingleProcess(), tmp_path / "split", micro_batch=8, dropout=0.2,
                      resume=True)
    _assert_same(straight, resumed, rtol=0)


def test_comm_must_be_a_communicator(tmp_path):
    with pytest.raises(TypeError, match="comm must be a diagnet.distributed.Communicator"):
        _run("world", tmp_path)


# ----------------------------------------------------------------------------- two ranks


@pytest.mark.parametrize("method", ["rigl", "dynadiag", "unstructured_rigl"])
@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-10), (np.float32, 1e-5)])
def test_two_ranks_train_the_one_process_model(two_ranks, shared_tmp, rank_tmp, method, dtype,
                                               rtol):
    comm = two_ranks
    alone, ra = _run(SingleProcess(), rank_tmp / "alone", method, dtype)
    both, rb = _run(comm, shared_tmp / "both", method, dtype)
    # the structure did change during the run (RigL updates, DynaDiag swaps and its freeze)
    changes = [r for r in read_log(rb.log_path) if r["event"] in ("mask_update", "swap")]
    assert any(r["grown"] for r in changes)
    _assert_same(alone, both, rtol)
    assert alone.controller.fingerprint() == both.controller.fingerprint()
    # across the ranks of the run the structure is identical, and so are the metrics
    everyone = comm.allgather_object((both.controller.fingerprint(), rb.metrics))
    assert everyone[0] == everyone[1]
    for key, value in ra.metrics.items():
        assert math.isclose(value, rb.metrics[key], rel_tol=1e-9 if dtype == np.float64
                            else 1e-4), key


@pytest.mark.parametrize("method", ["rigl", "dynadiag", "unstructured_rigl"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("micro_batch", [8, 5])
def test_with_micro_batches_two_ranks_train_the_one_process_model_bit_for_bit(
        two_ranks, shared_tmp, rank_tmp, method, dtype, micro_batch):
    """A loader with a micro_batch: every parameter, offset, mask and optimizer moment of the
    2-rank run equals the 1-process run's exactly, dropout included. Batches of 24: 3
    micro-batches of 8 (ranks take 2 and 1) or 5 of 5 (3 and 2, the last one of 4)."""
    comm = two_ranks
    alone, ra = _run(SingleProcess(), rank_tmp / "alone", method, dtype,
                     micro_batch=micro_batch, dropout=0.2)
    both, rb = _run(comm, shared_tmp / "both", method, dtype, micro_batch=micro_batch,
                    dropout=0.2)
    changes = [r for r in read_log(rb.log_path) if r["event"] in ("mask_update", "swap")]
    assert any(r["grown"] for r in changes)
    _assert_same(alone, both, rtol=0)
    for key, value in alone.optimizer.state_dict()["state"].items():
        for name, moment in value.items():
            if dn.backend.is_array(moment):
                np.testing.assert_array_equal(moment, both.optimizer.state_dict()["state"][key][
                    name], err_msg=f"{key}.{name}")
    assert alone.controller.structure() == both.controller.structure()
    assert ra.metrics["eval_accuracy"] == rb.metrics["eval_accuracy"]
    # each step moved one gradient per micro-batch of the global batch, stored values only
    stored = sum(p.data.nbytes for group in both.optimizer.param_groups
                 for p in group["params"] if p.requires_grad)
    assert both.micro.stats["last_bytes"] == -(-BATCH // micro_batch) * stored
    assert comm.allgather_object(dn.random.get_state())[0] == dn.random.get_state()


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["rigl", "dynadiag"])
def test_two_ranks_on_the_gpu_train_the_one_process_model(two_ranks, shared_tmp, rank_tmp,
                                                          method):
    """The CuPy path: gradients, taps and metrics through NCCL (the stand-in in CI)."""
    alone, _ = _run(SingleProcess(), rank_tmp / "alone", method, np.float32, device="cuda")
    both, _ = _run(two_ranks, shared_tmp / "both", method, np.float32, device="cuda")
    assert both.ranks.comm.bytes_moved["gradients"] > 0
    _assert_same(alone, both, rtol=1e-5)
    assert alone.controller.structure() == both.controller.structure()


@pytest.mark.gpu
def test_with_micro_batches_two_ranks_on_the_gpu_train_the_one_process_model_bit_for_bit(
        two_ranks, shared_tmp, rank_tmp):
    """The CuPy path of the exact mode: slots summed through NCCL (the stand-in in CI)."""
    alone, _ = _run(SingleProcess(), rank_tmp / "alone", "rigl", np.float32, device="cuda",
                    micro_batch=8)
    both, _ = _run(two_ranks, shared_tmp / "both", "rigl", np.float32, device="cuda",
                   micro_batch=8)
    assert both.ranks.comm.bytes_moved["gradients"] > 0
    _assert_same(alone, both, rtol=0)
    assert alone.controller.structure() == both.controller.structure()


def test_rank_zero_alone_writes_and_logs_world_size(two_ranks, shared_tmp):
    comm = two_ranks
    trainer, result = _run(comm, shared_tmp / "run")
    assert isinstance(trainer.log, NullLog) == (comm.rank != 0)
    records = read_log(result.log_path)
    assert records[0]["world_size"] == 2
    assert sum(r["event"] == "run_start" for r in records) == 1
    assert records[-1]["event"] == "run_end"


@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_resume_across_world_sizes(two_ranks, shared_tmp, rank_tmp, first, second):
    """A run checkpointed after epoch 1 on ``first`` ranks resumes on ``second`` and ends
    where one uninterrupted process ends."""
    comm = two_ranks
    alone, _ = _run(SingleProcess(), rank_tmp / "alone", epochs=2)
    run = shared_tmp / "run"
    if first == 2:
        _run(comm, run, epochs=1)
    elif comm.is_main:
        _run(SingleProcess(), run, epochs=1)
    comm.barrier()
    if second == 2:
        resumed, _ = _run(comm, run, epochs=2, resume=True)
    else:  # every rank resumes its own copy on its own
        mine = rank_tmp / "copy"
        shutil.copytree(run, mine)
        resumed, _ = _run(SingleProcess(), mine, epochs=2, resume=True)
    _assert_same(alone, resumed, rtol=1e-10)


def _poisoned_run(comm, out, at_step, what, monkeypatch):
    """Train the test run where, on rank 1 only, the training loss of step ``at_step`` is
    NaN (``what="nan"``) or a Ctrl-C arrives during its forward (``"stop"``)."""
    current = {}
    fit = Trainer.fit

    def keep_trainer(self, resume=None):
        current["trainer"] = self
        return fit(self, resume)
    monkeypatch.setattr(Trainer, "fit", keep_trainer)

    def loss_fn(output, target):
        loss = dn.cross_entropy(output, target)
        trainer = current["trainer"]
        if comm.rank == 1 and trainer.model.training and trainer.state.step == at_step:
            if what == "nan":
                return loss * float("nan")
            trainer._interrupt.requested = True  # what the first Ctrl-C does
        return loss
    try:
        return _run(comm, out, loss_fn=loss_fn)
    finally:
        monkeypatch.undo()


def test_nan_on_one_rank_stops_every_rank(two_ranks, shared_tmp, monkeypatch):
    comm = two_ranks
    with pytest.raises(NonFiniteLossError) as info:
        _poisoned_run(comm, shared_tmp / "run", 5, "nan", monkeypatch)
    assert info.value.step == 5  # the same step on both ranks
    comm.barrier()
    records = read_log(os.path.join(shared_tmp, "run", "log.jsonl"))
    assert records[-1]["event"] == "stopped_nonfinite" and records[-1]["step"] == 5


def test_ctrl_c_on_one_rank_stops_every_rank_at_the_same_step(two_ranks, shared_tmp,
                                                              monkeypatch):
    comm = two_ranks
    _, result = _poisoned_run(comm, shared_tmp / "run", 5, "stop", monkeypatch)
    assert result.interrupted and result.exact
    assert comm.allgather_object(result.steps) == [5, 5]  # step 5 undone on both ranks
    # resuming it ends where one uninterrupted 2-rank run ends, bit for bit
    resumed, _ = _run(comm, shared_tmp / "run", resume=True)
    whole, _ = _run(comm, shared_tmp / "whole")
    _assert_same(whole, resumed, rtol=0)


def test_existing_out_is_refused_on_every_rank(two_ranks, shared_tmp):
    comm = two_ranks
    _run(comm, shared_tmp / "run", epochs=1)
    with pytest.raises(FileExistsError):
        _run(comm, shared_tmp / "run", epochs=1)


@pytest.mark.parametrize("loader", ["train", "eval"])
def test_a_loader_sharded_for_another_world_is_refused(tmp_path, loader):
    """One process with a loader sharded over 2 ranks would train on half the data."""
    x, y = _data(np.float64)
    whole = DataLoader(ArrayDataset(x, y), batch_size=BATCH)
    half = DataLoader(ArrayDataset(x, y), batch_size=BATCH, rank=0, world_size=2)
    model = MLP(FEATURES, [16], CLASSES, rng=0)
    train, test = (half, None) if loader == "train" else (whole, half)
    with pytest.raises(ValueError, match=f"{loader}_loader must be sharded over the 1 rank"):
        Trainer(model, optim.Adam(model.parameters()), train, eval_loader=test,
                out_dir=tmp_path, comm=SingleProcess())


def test_unsharded_train_loader_is_refused(two_ranks, rank_tmp):
    x, y = _data(np.float64)
    train = DataLoader(ArrayDataset(x, y), batch_size=BATCH)
    model = MLP(FEATURES, [16], CLASSES, rng=0)
    with pytest.raises(ValueError, match="train_loader must be sharded"):
        Trainer(model, optim.Adam(model.parameters()), train, out_dir=rank_tmp, comm=two_ranks)


def _late_group_run(comm, out, micro_batch=None):
    """A dense MLP whose optimizer gets the head's parameter group after the Trainer was
    made (as a user adds a group between `Trainer(...)` and `fit`); return the trainer."""
    x, y = _data(np.float64)
    world = comm if hasattr(comm, "rank") else SingleProcess()
    train = DataLoader(ArrayDataset(x, y), batch_size=BATCH, shuffle=True, seed=3,
                       rank=world.rank, world_size=world.size, micro_batch=micro_batch)
    model = MLP(FEATURES, [16], CLASSES, dtype=np.float64, rng=0)
    optimizer = optim.Adam(model.features.parameters(), lr=1e-2)
    trainer = Trainer(model, optimizer, train, epochs=1, out_dir=out, seed=0, progress=False,
                      comm=comm)
    optimizer.add_param_group({"params": list(model.head.parameters()), "lr": 5e-3})
    trainer.fit()
    return trainer


@pytest.mark.parametrize("micro_batch", [None, 8])
def test_a_parameter_group_added_after_the_trainer_is_averaged_too(two_ranks, shared_tmp,
                                                                   rank_tmp, micro_batch):
    parallel = _late_group_run(two_ranks, shared_tmp / "two", micro_batch)
    single = _late_group_run(SingleProcess(), rank_tmp / "one", micro_batch)
    head = parallel.model.head.weight.data
    theirs = two_ranks.allgather_object(head)
    np.testing.assert_array_equal(theirs[0], theirs[1])  # the ranks stayed identical
    np.testing.assert_allclose(head, single.model.head.weight.data,
                               rtol=1e-10 if micro_batch is None else 0)
