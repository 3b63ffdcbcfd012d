"""`diagnet.train.Trainer`: training, the JSONL log, checkpoints, and bit-exact resumption.

Every run is a tiny classifier (a DiagLinear, ReLU, Dropout and a Linear head) on 96
synthetic samples with learnable labels, batch 16 (6 steps per epoch), with Adam, a
scheduler and `SwapController`, a test controller that moves the DiagLinear's diagonals
every two steps with its own seeded generator. "Resume" tests build fresh objects for the
second part, as a new process would.
"""

from __future__ import annotations

import json
import os
import signal
import warnings

import numpy as np
import pytest

import diagnet
from diagnet import nn, optim
from diagnet import functional as F
from diagnet.checkpoint import CheckpointError
from diagnet.data import ArrayDataset, DataLoader
from diagnet.dst import (DiagPruneGrow, DynaDiag, DynaDiagLinear, SparsityController,
                         TemperatureSchedule, event)
from diagnet.optim.lr_scheduler import CosineAnnealingLR, StepLR
from diagnet.train import TIME_KEYS, NonFiniteLossError, Trainer, jsonable, read_log
from diagnet.train.state import TrainerState

N, D, C, B = 96, 8, 3, 16
STEPS_PER_EPOCH = N // B


def make_data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D)).astype(np.float32)
    w = rng.normal(size=(D, C))
    y = np.argmax(x @ w, axis=1).astype(np.int64)
    return x, y


class Boom(Exception):
    """Stands for the process dying (killed, crashed) at a given step."""


class SwapController(SparsityController):
    """Moves every layer's diagonals (same count) every ``every`` steps, from its own generator.

    ``fail_at = (hook, step, exception)`` raises ``exception`` in ``before_step`` or
    ``after_step`` of that step, to simulate a crash or a Ctrl-C there.
    """

    def __init__(self, layers, every=2, seed=3, fail_at=None):
        super().__init__(layers)
        self.every = every
        self.rng = np.random.default_rng(seed)
        self.temperature = 1.0
        self.steps_done = 0
        self.fail_at = fail_at

    def _maybe_fail(self, hook, step):
        if self.fail_at is not None and self.fail_at[:2] == (hook, step):
            raise self.fail_at[2]

    def start_epoch(self, epoch):
        self.temperature = 1.0 / (1 + epoch)
        return [event("temperature", self.steps_done, epoch=epoch, temperature=self.temperature)]

    def before_step(self, step):
        self._maybe_fail("before", step)

    def after_step(self, step):
        self._maybe_fail("after", step)
        self.steps_done = step + 1
        if self.steps_done % self.every:
            return []
        events = []
        for name, layer in self.layers.items():
            old = diagnet.backend.to_numpy(layer.offsets.data)
            new = np.sort(self.rng.choice(layer.P, size=layer.K, replace=False))
            layer.set_offsets(new)
            events.append(event("swap", step, layer=name, dropped=np.setdiff1d(old, new),
                                grown=np.setdiff1d(new, old), sparsity=self.sparsity(),
                                temperature=self.temperature))
        return events

    def metrics(self):
        return {"sparsity": self.sparsity(), "temperature": self.temperature}

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state, "temperature": self.temperature,
                "steps_done": self.steps_done}

    def check_state_dict(self, state):
        if set(state) != {"rng", "temperature", "steps_done"}:
            raise KeyError(f"SwapController state keys: {sorted(state)}")

    def load_state_dict(self, state):
        self.check_state_dict(state)
        self.rng.bit_generator.state = state["rng"]
        self.temperature, self.steps_done = state["temperature"], state["steps_done"]


def make_controller(kind, model, fail_at):
    """The controller of a run: the test's own, a real one of `diagnet.dst`, or None."""
    layers = {"0": model[0]}
    if kind == "swap":
        return SwapController(layers, fail_at=fail_at)
    if kind in ("set", "rigl"):
        return DiagPruneGrow(layers, method=kind, delta_t=2, t_end=1000, f0=0.5, rng=4)
    if kind == "dynadiag":  # swaps every 2 steps, freezes at the start of epoch 1
        schedule = TemperatureSchedule("cosine", span=2, t_start=2.0, t_end=0.1)
        return DynaDiag(layers, schedule=schedule, swap_every=2, freeze_at=1, rng=7)
    assert kind is False
    return None


class Setup:
    """Fresh objects of one run (the same every time: everything is seeded).

    ``controller``: ``"swap"`` (`SwapController`), ``"set"`` / ``"rigl"`` (`DiagPruneGrow`),
    ``"dynadiag"`` (`DynaDiag`, whose first layer is then a `DynaDiagLinear`) or False.
    ``layer``: the first layer's kind, ``"dynadiag"`` or ``"diag"`` (default: as the
    controller needs) and ``sparsity``; ``head``: the outputs of the last layer; ``t_max``: a
    `CosineAnnealingLR` of that length instead of the `StepLR`.
    """

    def __init__(self, tmp_path, name, *, epochs=2, interval="epoch", fail_at=None, loss_fn=None,
                 controller="swap", batch_size=B, device="cpu", layer=None, sparsity=0.75,
                 head=C, t_max=None, **kwargs):
        # as in a new process, the global generator is in some other state: a resumed run
        # must restore it from the checkpoint (and a fresh one reseed it)
        diagnet.manual_seed(987654321)
        x, y = make_data()
        layer = layer or ("dynadiag" if controller == "dynadiag" else "diag")
        first = (DynaDiagLinear(D, 16, sparsity=sparsity, pool=0.5, rng=0, device=device)
                 if layer == "dynadiag" else nn.DiagLinear(D, 16, rng=0, device=device))
        self.model = nn.Sequential(first, nn.ReLU(), nn.Dropout(0.2),
                                   nn.Linear(16, head, rng=1, device=device))
        self.optimizer = optim.Adam(self.model.named_parameters(), lr=0.02)
        if t_max is None:
            self.scheduler = StepLR(self.optimizer, step_size=1 if interval == "epoch" else 4,
                                    gamma=0.5)
        else:
            self.scheduler = CosineAnnealingLR(self.optimizer, T_max=t_max)
        self.controller = make_controller(controller, self.model, fail_at)
        self.loader = DataLoader(ArrayDataset(x, y), batch_size, shuffle=True, seed=11,
                                 device=device)
        self.out_dir = os.fspath(tmp_path / name)
        options = dict(loss_fn=loss_fn or F.cross_entropy,
                       eval_loader=DataLoader(ArrayDataset(x, y), 32, device=device),
                       scheduler=self.scheduler,
                       scheduler_interval=interval, controller=self.controller, epochs=epochs,
                       out_dir=self.out_dir, best_metric="eval_loss", seed=5,
                       config={"lr": 0.02, "run": "test", "sizes": [D, 16, C]}, progress=False)
        options.update(kwargs)
        self.trainer = Trainer(self.model, self.optimizer, self.loader, **options)

    def path(self, name):
        return os.path.join(self.out_dir, name)

    def log(self, drop_time=True):
        return read_log(self.path("log.jsonl"), drop_time=drop_time)


def snapshot(setup):
    """Everything that must be identical between a straight run and a resumed one."""
    params = {k: v.numpy().copy() for k, v in setup.model.state_dict().items()}
    opt = setup.optimizer.state_dict()
    opt_arrays = {(i, k): diagnet.backend.to_numpy(v) for i, entry in opt["state"].items()
                  for k, v in entry.items() if diagnet.backend.is_array(v)}
    return {"params": params, "opt_arrays": opt_arrays,
            "opt_rest": json.dumps(opt["param_groups"]) + json.dumps(
                {str(i): {k: v for k, v in e.items() if not diagnet.backend.is_array(v)}
                 for i, e in opt["state"].items()}),
            "scheduler": setup.scheduler.state_dict(),
            "controller": json.dumps(jsonable(setup.controller.state_dict()))
            if setup.controller else None,
            "rng": diagnet.random.get_state(), "log": setup.log()}


def assert_identical(a, b):
    assert a["params"].keys() == b["params"].keys()
    for key in a["params"]:
        x, y = a["params"][key], b["params"][key]
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), key
    assert a["opt_arrays"].keys() == b["opt_arrays"].keys()
    for key in a["opt_arrays"]:
        x, y = a["opt_arrays"][key], b["opt_arrays"][key]
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), key
    for key in ("opt_rest", "scheduler", "controller", "rng"):
        assert a[key] == b[key], key
    assert len(a["log"]) == len(b["log"])
    for line_a, line_b in zip(a["log"], b["log"]):
        assert line_a == line_b


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Uninterrupted 2-epoch runs, one per scheduler interval."""
    out = {}
    for interval in ("epoch", "step"):
        s = Setup(tmp_path_factory.mktemp("straight"), "run", interval=interval)
        result = s.trainer.fit()
        out[interval] = (s, result, snapshot(s))
    return out


# ----------------------------------------------------------------------------- training


def test_loss_goes_down_and_accuracy_up(tmp_path):
    s = Setup(tmp_path, "long", epochs=8, scheduler=None, controller=False)
    result = s.trainer.fit()
    epochs = [r for r in s.log() if r["event"] == "epoch"]
    assert len(epochs) == 8 and result.epochs_completed == 8 and result.steps == 8 * 6
    assert epochs[-1]["train_loss"] < 0.8 * epochs[0]["train_loss"]
    assert epochs[-1]["eval_loss"] < 0.8 * epochs[0]["eval_loss"]
    assert epochs[-1]["eval_accuracy"] > epochs[0]["eval_accuracy"]
    assert result.metrics == {k: epochs[-1][k] for k in
                              ("train_loss", "train_accuracy", "eval_loss", "eval_accuracy")}
    assert not result.interrupted and result.exact


def test_log_records_and_fields(straight):
    s, result, _ = straight["step"]
    raw = open(s.path("log.jsonl"), encoding="utf-8").read().splitlines()

    def strict(text):  # strict JSON: no NaN/Infinity tokens
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))

    records = [strict(line) for line in raw]
    assert all("event" in r for r in records)
    start = records[0]
    assert start["event"] == "run_start"
    assert start["seed"] == 5 and start["config"] == {"lr": 0.02, "run": "test",
                                                      "sizes": [D, 16, C]}
    assert start["diagnet_version"] == diagnet.__version__
    summary = nn.summary(s.model)
    assert start["model"] == {"class": "Sequential", "params": summary.params,
                              "dense": summary.dense, "sparsity": summary.sparsity,
                              "weight_sparsity": summary.weight_sparsity}
    assert start["optimizer"]["class"] == "Adam" and start["optimizer"]["lr"] == 0.02
    assert start["optimizer"]["betas"] == [0.9, 0.999]
    assert start["scheduler"] == {"class": "StepLR", "step_size": 4, "gamma": 0.5,
                                  "base_lrs": [0.02]}
    assert start["scheduler_interval"] == "step"
    assert start["controller"]["class"] == "SwapController"
    assert start["controller"]["every"] == 2 and start["controller"]["layers"] == ["0"]
    assert start["train_loader"] == s.loader.describe()
    assert start["epochs"] == 2 and start["best_metric"] == "eval_loss"
    assert start["best_mode"] == "min" and "time" in start

    epochs = [r for r in records if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1]
    assert [r["step"] for r in epochs] == [6, 12]
    for r in epochs:
        assert {"train_loss", "train_accuracy", "eval_loss", "eval_accuracy", "lr", "controller",
                "best", "checkpoints", "time_s"} <= set(r)
        assert 0.0 <= r["train_accuracy"] <= 1.0 and 0.0 <= r["eval_accuracy"] <= 1.0
        assert set(r["controller"]) == {"sparsity", "temperature"}
    # the lr when the epoch ends: after 6 per-step scheduler steps (StepLR, step_size 4)
    assert [r["lr"] for r in epochs] == [0.02 * 0.5 ** (6 // 4), 0.02 * 0.5 ** (12 // 4)]
    assert epochs[0]["controller"]["temperature"] == 1.0
    assert epochs[1]["controller"]["temperature"] == 0.5
    assert epochs[0]["checkpoints"][0] == "last.safetensors"

    swaps = [r for r in records if r["event"] == "swap"]
    assert [r["step"] for r in swaps] == [1, 3, 5, 7, 9, 11]
    for r in swaps:
        assert r["layer"] == "0" and len(r["dropped"]) == len(r["grown"])
        assert {"sparsity", "temperature"} <= set(r)
    temps = [r for r in records if r["event"] == "temperature"]
    assert [(r["epoch"], r["step"]) for r in temps] == [(0, 0), (1, 6)]
    # controller events come in step order, between the epoch records
    kinds = [r["event"] for r in records]
    assert kinds.index("temperature") < kinds.index("swap") < kinds.index("epoch")

    end = records[-1]
    assert end["event"] == "run_end" and end["epochs"] == 2 and end["step"] == 12
    assert end["metrics"] == result.metrics
    assert end["best_metric"] == "eval_loss" and end["best_value"] == result.best_value
    assert set(TIME_KEYS) >= {"time", "time_s"}


def test_checkpoints_written_and_loadable(straight, tmp_path):
    s, result, snap = straight["epoch"]
    assert result.last_checkpoint == s.path("last.safetensors")
    assert result.best_checkpoint == s.path("best.safetensors")
    assert result.log_path == s.path("log.jsonl")
    epochs = [r for r in s.log() if r["event"] == "epoch"]
    best = min(epochs, key=lambda r: r["eval_loss"])
    assert (result.best_epoch, result.best_value) == (best["epoch"], best["eval_loss"])

    fresh = Setup(tmp_path, "fresh")
    ckpt = diagnet.load(s.path("last.safetensors"), model=fresh.model,
                        optimizer=fresh.optimizer, scheduler=fresh.scheduler,
                        controller=fresh.controller, loader=fresh.loader)
    for key, value in fresh.model.state_dict().items():
        assert value.numpy().tobytes() == snap["params"][key].tobytes()
    assert json.dumps(jsonable(fresh.controller.state_dict())) == snap["controller"]
    assert fresh.loader.state_dict() == {"epoch": 2, "batch": 0}
    assert ckpt.state["epoch"] == 2 and ckpt.state["step"] == 12
    assert ckpt.state["epoch_started"] is False and ckpt.state["seed"] == 5
    assert ckpt.state["log"]["bytes"] < os.path.getsize(s.path("log.jsonl"))  # run_end after
    assert ckpt.config == {"lr": 0.02, "run": "test", "sizes": [D, 16, C]}
    assert set(ckpt.metadata["components"]) == {"model", "optimizer", "scheduler", "controller",
                                                "loader"}

    best_ckpt = diagnet.load(s.path("best.safetensors"))
    assert best_ckpt.state["best"] == {"metric": "eval_loss", "mode": "min",
                                       "value": best["eval_loss"], "epoch": best["epoch"]}
    assert best_ckpt.state["epoch"] == best["epoch"] + 1


# ----------------------------------------------------------------------------- resumption


@pytest.mark.parametrize("interval", ["epoch", "step"])
def test_resume_from_epoch_checkpoint_is_bit_exact(straight, tmp_path, interval):
    _, _, want = straight[interval]
    # first process: dies at the first step of epoch 1 (after controller.start_epoch(1)
    # logged its event), leaving last.safetensors of epoch 0 behind
    first = Setup(tmp_path, "run", interval=interval,
                  fail_at=("before", STEPS_PER_EPOCH, Boom("killed")))
    with pytest.raises(Boom):
        first.trainer.fit()
    log = first.log()
    assert log[-1]["event"] == "error" and "killed" in log[-1]["error"]
    # second process: fresh objects, resume
    second = Setup(tmp_path, "run", interval=interval)
    result = second.trainer.fit(resume=second.path("last.safetensors"))
    assert result.epochs_completed == 2 and result.steps == 12 and not result.interrupted
    assert_identical(snapshot(second), want)


def _kill_in_loss_at(step, exc):
    """A cross_entropy that raises ``exc`` at training step ``step`` (after the forward)."""
    calls = {"n": 0}

    def loss_fn(output, target):
        if diagnet.is_grad_enabled():
            if calls["n"] == step:
                calls["n"] += 1
                if exc == "sigint":
                    signal.raise_signal(signal.SIGINT)   # a real Ctrl-C: handled after the step
                else:
                    raise exc
            else:
                calls["n"] += 1
        return F.cross_entropy(output, target)
    return loss_fn


@pytest.mark.parametrize("where", ["loss", "before_step", "sigint", "first_step"])
def test_resume_after_mid_epoch_interrupt_is_bit_exact(straight, tmp_path, where):
    _, _, want = straight["epoch"]
    step = 0 if where == "first_step" else 8   # 8: epoch 1, batch 2
    if where in ("loss", "first_step"):
        first = Setup(tmp_path, "run", loss_fn=_kill_in_loss_at(step, KeyboardInterrupt()))
    elif where == "sigint":
        first = Setup(tmp_path, "run", loss_fn=_kill_in_loss_at(step, "sigint"))
    else:
        first = Setup(tmp_path, "run", fail_at=("before", step, KeyboardInterrupt()))
    result = first.trainer.fit()
    assert result.interrupted and result.exact
    done = step + 1 if where == "sigint" else step   # SIGINT lets the step finish
    assert result.steps == done
    last = first.log()[-1]
    assert last == {"event": "interrupted", "epoch": done // STEPS_PER_EPOCH,
                    "batch": done % STEPS_PER_EPOCH, "step": done,
                    "checkpoint": "last.safetensors", "exact": True}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored

    second = Setup(tmp_path, "run")
    ckpt = diagnet.load(second.path("last.safetensors"), rng=False)  # only inspect
    assert ckpt.components["loader"] == {"epoch": done // STEPS_PER_EPOCH,
                                         "batch": done % STEPS_PER_EPOCH}
    result = second.trainer.fit(resume=True)
    assert result.epochs_completed == 2 and result.steps == 12
    assert_identical(snapshot(second), want)


def test_interrupt_during_evaluation_resumes_exactly(straight, tmp_path):
    _, _, want = straight["epoch"]
    x, y = make_data()
    calls = {"n": 0}

    def eval_fn(model):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        return {}

    first = Setup(tmp_path, "run", eval_fn=eval_fn)
    result = first.trainer.fit()
    assert result.interrupted and result.exact and result.steps == STEPS_PER_EPOCH
    assert diagnet.load(first.path("last.safetensors"), rng=False).state["batch"] == STEPS_PER_EPOCH
    second = Setup(tmp_path, "run", eval_fn=lambda model: {})
    second.trainer.fit(resume=True)
    assert_identical(snapshot(second), want)


def test_resume_twice_and_resume_a_finished_run(straight, tmp_path):
    _, _, want = straight["epoch"]
    first = Setup(tmp_path, "run", fail_at=("before", 3, KeyboardInterrupt()))
    assert first.trainer.fit().interrupted
    second = Setup(tmp_path, "run", fail_at=("before", 9, KeyboardInterrupt()))
    assert second.trainer.fit(resume=True).interrupted
    third = Setup(tmp_path, "run")
    third.trainer.fit(resume=True)
    assert_identical(snapshot(third), want)
    # resuming the finished run: nothing left to train, the log ends the same way
    fourth = Setup(tmp_path, "run")
    result = fourth.trainer.fit(resume=True)
    assert result.epochs_completed == 2 and not result.interrupted
    assert_identical(snapshot(fourth), want)


def test_resume_can_extend_a_run(straight, tmp_path):
    s = Setup(tmp_path, "run", epochs=1)
    s.trainer.fit()
    more = Setup(tmp_path, "run", epochs=2)
    result = more.trainer.fit(resume=True)
    assert result.epochs_completed == 2
    got = snapshot(more)
    _, _, want = straight["epoch"]
    # the same training; the log's run_start keeps the first settings (epochs=1)
    assert all(got["params"][k].tobytes() == want["params"][k].tobytes() for k in got["params"])
    assert got["log"][1:] == want["log"][1:]
    assert got["log"][0]["epochs"] == 1


@pytest.mark.parametrize("kind", ["set", "rigl", "dynadiag"])
def test_real_controllers_resume_bit_exact(tmp_path, kind):
    straight = Setup(tmp_path, "straight", controller=kind)
    straight.trainer.fit()
    want = snapshot(straight)
    trainer_events = {"run_start", "epoch", "run_end"}
    events = [r for r in want["log"] if r["event"] not in trainer_events]
    assert events and all("step" in r for r in events)
    if kind == "dynadiag":
        assert "freeze" in {r["event"] for r in events}   # the interrupt below is after it
    # interrupted mid-epoch 1 (after the forward: dropout drew, the RigL/DynaDiag tap armed)
    first = Setup(tmp_path, "run", controller=kind,
                  loss_fn=_kill_in_loss_at(8, KeyboardInterrupt()))
    assert first.trainer.fit().interrupted
    second = Setup(tmp_path, "run", controller=kind)
    second.trainer.fit(resume=True)
    assert_identical(snapshot(second), want)


@pytest.mark.gpu
def test_cuda_run_resumes_bit_exact(tmp_path):
    straight = Setup(tmp_path, "straight", device="cuda")
    result = straight.trainer.fit()
    assert straight.model[0].values.device == "cuda" and result.metrics["eval_accuracy"] > 0
    want = snapshot(straight)
    first = Setup(tmp_path, "run", device="cuda", loss_fn=_kill_in_loss_at(8, KeyboardInterrupt()))
    assert first.trainer.fit().interrupted
    second = Setup(tmp_path, "run", device="cuda")
    second.trainer.fit(resume=True)
    assert second.optimizer.state_dict()["state"][0]["exp_avg"].__class__.__module__ != "numpy"
    assert_identical(snapshot(second), want)


# ----------------------------------------------------------------------------- stopping


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, bad):
    seen = {}
    calls = {"n": 0}
    setup_holder = {}

    def loss_fn(output, target):
        loss = F.cross_entropy(output, target)
        if diagnet.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 9:   # step 8: epoch 1, batch 2
                with open(setup_holder["s"].path("last.safetensors"), "rb") as f:
                    seen["bytes"] = f.read()
                return loss * bad
        return loss

    s = Setup(tmp_path, "run", loss_fn=loss_fn)
    setup_holder["s"] = s
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 8") as info:
        s.trainer.fit()
    err = info.value
    assert isinstance(err, RuntimeError)
    assert (err.epoch, err.step) == (1, 8) and (err.value != err.value or err.value == bad)
    with open(s.path("last.safetensors"), "rb") as f:
        assert f.read() == seen["bytes"]
    ckpt = diagnet.load(s.path("last.safetensors"), model=Setup(tmp_path, "x").model)
    assert ckpt.state["epoch"] == 1 and ckpt.state["step"] == 6
    last = s.log()[-1]
    assert last == {"event": "stopped_nonfinite", "epoch": 1, "batch": 2, "step": 8,
                    "loss": "nan" if bad != bad else "inf", "checkpoint": "last.safetensors"}


def test_keyboard_interrupt_saves_a_loadable_checkpoint(tmp_path):
    s = Setup(tmp_path, "run", fail_at=("before", 3, KeyboardInterrupt()))
    result = s.trainer.fit()
    assert result.interrupted and result.exact
    assert (result.epochs_completed, result.steps) == (0, 3)
    assert result.last_checkpoint == s.path("last.safetensors")
    assert s.log()[-1]["event"] == "interrupted"
    fresh = Setup(tmp_path, "other")
    ckpt = diagnet.load(result.last_checkpoint, model=fresh.model, optimizer=fresh.optimizer,
                        scheduler=fresh.scheduler, controller=fresh.controller,
                        loader=fresh.loader)
    assert ckpt.state["step"] == 3 and ckpt.state["batch"] == 3 and ckpt.state["exact"]
    assert fresh.loader.state_dict() == {"epoch": 0, "batch": 3}
    for key, value in fresh.model.state_dict().items():
        assert value.numpy().tobytes() == s.model.state_dict()[key].numpy().tobytes()


def test_interrupt_during_the_update_is_saved_but_marked_inexact(tmp_path):
    s = Setup(tmp_path, "run", fail_at=("after", 3, KeyboardInterrupt()))
    with pytest.warns(RuntimeWarning, match="not reproduce"):
        result = s.trainer.fit()
    assert result.interrupted and not result.exact
    assert s.log()[-1]["exact"] is False
    assert diagnet.load(s.path("last.safetensors")).state["exact"] is False


# ----------------------------------------------------------------------------- arguments, checks


def test_seed_makes_runs_reproducible(tmp_path):
    a = Setup(tmp_path, "a", epochs=1)
    a.trainer.fit()
    b = Setup(tmp_path, "b", epochs=1)
    diagnet.manual_seed(999)  # the global state before fit does not matter
    b.trainer.fit()
    c = Setup(tmp_path, "c", epochs=1, seed=6)
    c.trainer.fit()
    pa, pb, pc = (snapshot(s)["params"] for s in (a, b, c))
    assert all(pa[k].tobytes() == pb[k].tobytes() for k in pa)
    assert any(pa[k].tobytes() != pc[k].tobytes() for k in pa)  # other dropout masks
    assert c.log()[0]["seed"] == 6


def test_eval_fn_metrics_are_logged_and_can_be_the_best_metric(tmp_path):
    def eval_fn(model):
        return {"weight_norm": np.float32(np.abs(model[3].weight.numpy()).sum()),
                "const": 1}

    s = Setup(tmp_path, "run", eval_fn=eval_fn, best_metric="weight_norm", best_mode="min")
    result = s.trainer.fit()
    epochs = [r for r in s.log() if r["event"] == "epoch"]
    assert all({"weight_norm", "const", "eval_loss"} <= set(r) for r in epochs)
    assert result.best_value == min(r["weight_norm"] for r in epochs)
    bad = Setup(tmp_path, "bad", eval_fn=lambda m: {"eval_loss": 0.0})
    with pytest.raises(ValueError, match="clashes"):
        bad.trainer.fit()


def test_fresh_run_refuses_a_used_out_dir(tmp_path):
    Setup(tmp_path, "run", epochs=1).trainer.fit()
    with pytest.raises(FileExistsError, match="resume"):
        Setup(tmp_path, "run", epochs=1).trainer.fit()
    result = Setup(tmp_path, "run", epochs=1, overwrite=True, best_metric=None).trainer.fit()
    assert result.best_checkpoint is None  # the old best.safetensors was removed


def test_resume_refuses_mismatched_objects(tmp_path):
    s = Setup(tmp_path, "run", fail_at=("before", 3, KeyboardInterrupt()))
    s.trainer.fit()
    ckpt = s.path("last.safetensors")
    with pytest.raises(ValueError, match="train loader differs"):
        Setup(tmp_path, "run", batch_size=12).trainer.fit(resume=ckpt)
    with pytest.raises(ValueError, match="controller"):
        Setup(tmp_path, "run", controller=False).trainer.fit(resume=ckpt)
    with pytest.raises(ValueError, match="scheduler"):
        Setup(tmp_path, "run", scheduler=None).trainer.fit(resume=ckpt)
    plain = Setup(tmp_path, "plain", controller=False, fail_at=None, epochs=1)
    plain.trainer.fit()
    with pytest.raises(CheckpointError, match="controller"):   # asked for, not in the file
        Setup(tmp_path, "plain").trainer.fit(resume=True)
    with pytest.raises(ValueError, match="best_metric"):
        Setup(tmp_path, "run", best_metric="eval_accuracy").trainer.fit(resume=ckpt)
    # a log that is not the checkpoint's run
    with open(s.path("log.jsonl"), "r+b") as f:
        f.write(b"X")
    with pytest.raises(ValueError, match="not this run's log"):
        Setup(tmp_path, "run").trainer.fit(resume=ckpt)


def memory_state(setup):
    """A bit-level copy of everything a resume may change in memory: a refused resume must
    leave all of it as it was."""
    def plain(value):
        if isinstance(value, diagnet.Tensor):
            value = value.data
        if diagnet.backend.is_array(value):
            host = diagnet.backend.to_numpy(value)
            return (host.dtype.str, host.shape, host.tobytes())
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    layers = [(name, type(m).__name__, m.K, getattr(m, "frozen", None), getattr(m, "T", None))
              for name, m in setup.model.named_modules() if isinstance(m, nn.DiagLinear)]
    return {"model": plain(setup.model.state_dict()),
            "optimizer": plain(setup.optimizer.state_dict()),
            "scheduler": setup.scheduler.state_dict() if setup.scheduler else None,
            "loader": setup.loader.state_dict(),
            "controller": json.dumps(jsonable(setup.controller.state_dict()))
            if setup.controller else None,
            "layers": layers, "rng": diagnet.random.get_state()}


def file_bytes(setup):
    out = {}
    for name in ("log.jsonl", "last.safetensors", "best.safetensors"):
        if os.path.exists(setup.path(name)):
            with open(setup.path(name), "rb") as f:
                out[name] = f.read()
    return out


def _damage_log(setup, how):
    path = setup.path("log.jsonl")
    if how == "missing":
        os.remove(path)
        return
    with open(path, "r+b") as f:
        data = f.read()
        f.seek(0)
        if how == "edited":       # one changed byte: the checksum no longer matches
            f.write(data[:20] + bytes([data[20] ^ 1]) + data[21:])
        else:                     # shorter than when the checkpoint was saved
            f.truncate(len(data) // 3)


REFUSALS = {
    # name: (options of the resuming Setup, damage to the log, error, message)
    "loader batch size": (dict(batch_size=32), None, ValueError, "train loader differs"),
    "best_metric": (dict(best_metric="eval_accuracy"), None, ValueError, "best_metric"),
    "controller missing": (dict(controller=False, layer="dynadiag"), None, ValueError,
                           "controller"),
    "scheduler missing": (dict(scheduler=None), None, ValueError, "scheduler"),
    "log missing": ({}, "missing", FileNotFoundError, "log"),
    "log edited": ({}, "edited", ValueError, "not this run's log"),
    "log shortened": ({}, "shortened", ValueError, "not this run's log"),
    "another head": (dict(head=C + 1), None, CheckpointError, "another structure"),
    "another layer kind": (dict(controller="swap"), None, CheckpointError, "another structure"),
    "another sparsity": (dict(sparsity=0.5), None, CheckpointError,
                         r"another structure \(module '0' \(DynaDiagLinear\): offsets: a "
                         r"frozen DynaDiagLinear stores 8 diagonals"),
    "schedule shorter than the steps taken": (dict(t_max=1, epochs=3), None, ValueError,
                                              "T_max=1"),
}


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory):
    """A finished DynaDiag run (frozen at epoch 1: its layer stores K diagonals, a fresh one
    S) with a cosine lr schedule."""
    s = Setup(tmp_path_factory.mktemp("frozen"), "run", controller="dynadiag", t_max=2)
    s.trainer.fit()
    assert s.model[0].frozen and s.model[0].K == s.model[0].active_k < s.model[0].n_stored
    return s


@pytest.mark.parametrize("reason", list(REFUSALS))
def test_a_refused_resume_changes_nothing(frozen_run, tmp_path, reason):
    import shutil

    options, damage, exc, match = REFUSALS[reason]
    options = {"controller": "dynadiag", "t_max": 2, **options}
    run_dir = tmp_path / "run"
    shutil.copytree(frozen_run.out_dir, run_dir)
    second = Setup(tmp_path, "run", **options)
    if damage:
        _damage_log(second, damage)
    before, files = memory_state(second), file_bytes(second)
    with pytest.raises(exc, match=match):
        second.trainer.fit(resume=True)
    assert memory_state(second) == before
    assert file_bytes(second) == files
    if isinstance(second.model[0], DynaDiagLinear):  # still the fresh, soft layer
        assert not second.model[0].frozen and second.model[0].K == second.model[0].n_stored


def test_a_checkpoint_without_controller_is_refused_before_any_resize(tmp_path):
    first = Setup(tmp_path, "run", controller=False, layer="dynadiag", epochs=1)
    first.model[0].freeze()                 # stores K diagonals, as a frozen run's layer
    first.trainer.fit()
    second = Setup(tmp_path, "run", controller="dynadiag")
    before, files = memory_state(second), file_bytes(second)
    with pytest.raises(CheckpointError, match="controller"):
        second.trainer.fit(resume=True)
    assert memory_state(second) == before and file_bytes(second) == files
    assert second.model[0].K == second.model[0].n_stored


def test_another_structure_is_named_in_readable_form(frozen_run, tmp_path):
    other = Setup(tmp_path, "other", controller="swap")
    with pytest.raises(CheckpointError) as info:
        other.trainer.fit(resume=frozen_run.path("last.safetensors"))
    message = str(info.value)
    assert "saved from a model of another structure" in message
    assert "unexpected keys: 0.alpha, 0.temperature, 0.is_frozen, 0.ever_active" in message
    k = frozen_run.model[0].active_k
    assert f"0.values: shape ({k}, {D}) in the state dict, ({other.model[0].K}, {D})" in message
    wider = Setup(tmp_path, "wider", controller="dynadiag", head=C + 1)
    with pytest.raises(CheckpointError, match=rf"3\.weight: shape \({C}, 16\) in the state "
                                              rf"dict, \({C + 1}, 16\) in the model"):
        wider.trainer.fit(resume=frozen_run.path("last.safetensors"))


def test_a_frozen_dynadiag_run_resumes_into_fresh_objects(frozen_run, tmp_path):
    """The fresh layer stores S diagonals, the checkpoint's K: the layer and the optimizer's
    per-row state take the checkpoint's size, and the run continues."""
    import shutil

    shutil.copytree(frozen_run.out_dir, tmp_path / "run")
    second = Setup(tmp_path, "run", controller="dynadiag", t_max=2)
    result = second.trainer.fit(resume=True)
    assert result.epochs_completed == 2
    assert second.model[0].frozen and second.model[0].K == second.model[0].active_k
    assert_identical(snapshot(second), snapshot(frozen_run))


def test_resume_reads_the_checkpoint_once(frozen_run, tmp_path, monkeypatch):
    """Checking and loading share one read of the file, the layer's resize included."""
    import builtins
    import shutil

    shutil.copytree(frozen_run.out_dir, tmp_path / "run")
    second = Setup(tmp_path, "run", controller="dynadiag", t_max=2)
    checkpoint = os.path.realpath(second.path("last.safetensors"))
    reads = []
    real_open = builtins.open

    def counting_open(file, mode="r", *args, **kwargs):
        if (isinstance(file, (str, os.PathLike)) and "r" in mode
                and os.path.realpath(file) == checkpoint):
            reads.append(mode)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    assert second.trainer.fit(resume=True).epochs_completed == 2
    assert reads == ["rb"]

@pytest.mark.gpu
def test_a_frozen_dynadiag_run_resumes_on_the_gpu(tmp_path):
    first = Setup(tmp_path, "run", controller="dynadiag", device="cuda", t_max=2)
    first.trainer.fit()
    wider = Setup(tmp_path, "run", controller="dynadiag", device="cuda", t_max=2, head=C + 1)
    before = memory_state(wider)
    with pytest.raises(CheckpointError, match="another structure"):  # after the layer's resize
        wider.trainer.fit(resume=True)
    assert memory_state(wider) == before
    more = Setup(tmp_path, "run", controller="dynadiag", device="cuda", epochs=3, t_max=3)
    result = more.trainer.fit(resume=True)
    layer = more.model[0]
    assert result.epochs_completed == 3 and layer.frozen and layer.K == layer.active_k
    assert layer.values.device == "cuda"
    assert more.optimizer.state[layer.values]["exp_avg"].shape == layer.values.shape


# ----------------------------------------------------------------------------- extending a run


def test_extending_a_run_extends_the_lr_schedule(tmp_path, capsys):
    first = Setup(tmp_path, "run", epochs=2, t_max=2)
    first.trainer.fit()
    more = Setup(tmp_path, "run", epochs=3, t_max=3, progress=True)
    more.trainer.fit(resume=True)
    log = more.log()
    change = [r for r in log if r["event"] == "lr_schedule"]
    assert change == [{"event": "lr_schedule", "epoch": 2, "step": 12,
                       "scheduler": "CosineAnnealingLR", "T_max": [2, 3],
                       "lr": pytest.approx(0.005)}]
    epochs = [r for r in log if r["event"] == "epoch"]
    # epochs 0, 1 ran on the 2-epoch schedule; epoch 2 on the 3-epoch one, not at lr 0
    assert [r["lr"] for r in epochs] == pytest.approx([0.02, 0.01, 0.005])
    assert log.index(change[0]) == log.index(epochs[1]) + 1
    assert more.scheduler.T_max == 3
    printed = capsys.readouterr()
    assert "T_max 2 -> 3" in printed.out + printed.err
    # resuming with the length of the checkpoint's run changes nothing and logs nothing
    again = Setup(tmp_path, "again", epochs=2, t_max=2)
    again.trainer.fit()
    Setup(tmp_path, "again", epochs=2, t_max=2).trainer.fit(resume=True)
    assert not [r for r in again.log() if r["event"] == "lr_schedule"]


def test_a_schedule_shorter_than_the_steps_taken_is_refused(tmp_path):
    first = Setup(tmp_path, "run", epochs=2, t_max=2)
    first.trainer.fit()
    short = Setup(tmp_path, "run", epochs=3, t_max=1)
    before, files = memory_state(short), file_bytes(short)
    with pytest.raises(ValueError, match=r"T_max=1: .*taken 2 steps"):
        short.trainer.fit(resume=True)
    assert memory_state(short) == before and file_bytes(short) == files


# ----------------------------------------------------------------------------- best checkpoint


def test_a_tie_with_the_best_so_far_is_not_a_new_best(tmp_path):
    for mode in ("max", "min"):
        state = TrainerState(seed=0, loader={}, best_metric="m", best_mode=mode,
                             best_value=0.5, best_epoch=0)
        assert not state.improves(0.5)
        assert state.improves(0.6 if mode == "max" else 0.4)
    s = Setup(tmp_path, "run", eval_fn=lambda model: {"const": 1.0}, best_metric="const",
              best_mode="max", epochs=3)
    result = s.trainer.fit()
    assert [r["best"] for r in s.log() if r["event"] == "epoch"] == [True, False, False]
    assert (result.best_epoch, result.best_value) == (0, 1.0)
    assert diagnet.load(result.best_checkpoint, rng=False).state["epoch"] == 1


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"epochs": 0}, ValueError, "epochs"),
    ({"scheduler_interval": "batch"}, ValueError, "scheduler_interval"),
    ({"best_mode": "up"}, ValueError, "best_mode"),
    ({"best_metric": "eval_accuracy", "eval_loader": None}, ValueError, "eval_loader"),
    ({"checkpoint_every": -1}, ValueError, "checkpoint_every"),
    ({"seed": -1}, ValueError, "seed"),
    ({"config": {"f": object()}}, TypeError, "config"),
    ({"loss_fn": 3}, TypeError, "loss_fn"),
])
def test_trainer_argument_validation(tmp_path, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Setup(tmp_path, "run", **kwargs)


def test_trainer_rejects_non_loaders_and_bad_losses(tmp_path):
    s = Setup(tmp_path, "run")
    with pytest.raises(TypeError, match="DataLoader"):
        Trainer(s.model, s.optimizer, [(1, 2)], out_dir=s.out_dir)
    bad = Setup(tmp_path, "bad", loss_fn=lambda out, y: F.cross_entropy(out, y, reduction="none"),
                epochs=1)
    with pytest.raises(TypeError, match="one-element"):
        bad.trainer.fit()
    assert bad.log()[-1]["event"] == "error"


def test_progress_bars_do_not_break_training(tmp_path, capsys):
    s = Setup(tmp_path, "run", epochs=1, progress=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s.trainer.fit()
    assert "epochs" in capsys.readouterr().err
    quiet = Setup(tmp_path, "quiet", epochs=1)
    quiet.trainer.fit()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
