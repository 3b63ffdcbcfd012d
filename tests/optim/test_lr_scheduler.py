"""Learning-rate schedulers (`diagnet.optim.lr_scheduler`): formulas, resuming, validation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from diagnet.autograd import Tensor
from diagnet.nn.parameter import Parameter
from diagnet.optim import SGD, Adam
from diagnet.optim.lr_scheduler import (CosineAnnealingLR, LinearWarmup, LRScheduler, StepLR,
                                        WarmupCosine)

BASES = (0.1, 0.02)


def _optimizer(bases=BASES):
    return SGD([{"params": [Parameter(np.zeros(2))], "lr": lr} for lr in bases], lr=1.0)


def _lrs(scheduler, steps):
    """The group lrs at t = 0 (after construction) and after each of ``steps`` steps."""
    seen = [[g["lr"] for g in scheduler.optimizer.param_groups]]
    for _ in range(steps):
        scheduler.step()
        seen.append([g["lr"] for g in scheduler.optimizer.param_groups])
    return seen


# formulas written independently of the implementation (one base lr, step t)
def step_formula(base, t, step_size, gamma):
    return base * gamma ** math.floor(t / step_size)


def cosine_formula(base, t, t_max, eta_min):
    return eta_min + (base - eta_min) * (1 + math.cos(math.pi * t / t_max)) / 2


def warmup_formula(base, t, warmup, start):
    return base if t >= warmup else base * (start + (1 - start) * t / warmup)


def warmup_cosine_formula(base, t, warmup, total, eta_min, start):
    if t < warmup:
        return warmup_formula(base, t, warmup, start)
    if t >= total:
        return eta_min
    return cosine_formula(base, t - warmup, total - warmup, eta_min)


def _check(scheduler, formula, steps):
    for t, lrs in enumerate(_lrs(scheduler, steps)):
        assert lrs == pytest.approx([formula(b, t) for b in BASES], rel=1e-12, abs=1e-15), t
        assert scheduler.last_epoch == steps
    assert scheduler.get_last_lr() == lrs


def test_step_lr_hand_values_and_formula():
    sched = StepLR(_optimizer(), step_size=3, gamma=0.5)
    assert [lrs[0] for lrs in _lrs(sched, 7)] == pytest.approx(
        [0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025], rel=1e-15)
    _check(StepLR(_optimizer(), step_size=4, gamma=0.3),
           lambda b, t: step_formula(b, t, 4, 0.3), 50)


def test_cosine_annealing_formula_and_past_t_max():
    _check(CosineAnnealingLR(_optimizer(), T_max=10, eta_min=1e-3),
           lambda b, t: cosine_formula(b, t, 10, 1e-3), 35)
    sched = CosineAnnealingLR(_optimizer(), T_max=4, eta_min=0.01)
    lrs = [lr[0] for lr in _lrs(sched, 8)]
    assert lrs[2] == pytest.approx((0.1 + 0.01) / 2, rel=1e-12)  # half-way
    assert lrs[4] == pytest.approx(0.01, rel=1e-12)             # at T_max: eta_min
    assert lrs[5] > lrs[4] and lrs[8] == pytest.approx(0.1)     # closed form continues


def test_linear_warmup_hand_values_and_formula():
    sched = LinearWarmup(_optimizer(), warmup_steps=4, start_factor=0.25)
    assert [lr[0] for lr in _lrs(sched, 6)] == pytest.approx(
        [0.025, 0.04375, 0.0625, 0.08125, 0.1, 0.1, 0.1], rel=1e-14)
    _check(LinearWarmup(_optimizer(), warmup_steps=7),
           lambda b, t: warmup_formula(b, t, 7, 0.0), 20)
    assert _lrs(LinearWarmup(_optimizer(), warmup_steps=0), 3) == [list(BASES)] * 4


def test_warmup_cosine_formula_and_shape():
    _check(WarmupCosine(_optimizer(), warmup_steps=5, total_steps=25, eta_min=1e-3,
                        start_factor=0.1),
           lambda b, t: warmup_cosine_formula(b, t, 5, 25, 1e-3, 0.1), 40)
    sched = WarmupCosine(_optimizer(), warmup_steps=4, total_steps=14, eta_min=0.0)
    lrs = [lr[0] for lr in _lrs(sched, 20)]
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(0.05, rel=1e-14)
    assert lrs[4] == pytest.approx(0.1, rel=1e-14)           # end of warm-up: the base lr
    assert lrs[9] == pytest.approx(0.05, rel=1e-12)          # half-way through the cosine
    assert all(a > b for a, b in zip(lrs[4:14], lrs[5:15]))  # strictly decreasing
    assert lrs[14:] == [0.0] * 7                             # then it stays at eta_min
    _check(WarmupCosine(_optimizer(), warmup_steps=0, total_steps=6),
           lambda b, t: warmup_cosine_formula(b, t, 0, 6, 0.0, 0.0), 9)


def test_the_optimizer_uses_the_scheduled_lr():
    p = Parameter(np.zeros(3))
    opt = SGD([p], lr=0.4)
    sched = StepLR(opt, step_size=1, gamma=0.5)
    for lr in (0.4, 0.2, 0.1):
        assert opt.param_groups[0]["lr"] == lr
        before = p.data.copy()
        p.grad = Tensor.from_array(np.ones(3))
        opt.step()
        np.testing.assert_allclose(before - p.data, lr, rtol=1e-12)
        sched.step()


def test_initial_lr_base_lrs_and_get_last_lr():
    opt = _optimizer()
    sched = LinearWarmup(opt, warmup_steps=2)
    assert [g["initial_lr"] for g in opt.param_groups] == list(BASES)
    assert sched.base_lrs == list(BASES) and sched.last_epoch == 0
    last = sched.get_last_lr()
    assert last == [0.0, 0.0] and all(type(lr) is float for lr in last)
    last.append(1.0)  # a copy
    assert sched.get_last_lr() == [0.0, 0.0]
    assert isinstance(sched, LRScheduler)
    assert "LinearWarmup(warmup_steps=2, start_factor=0.0, last_epoch=0)" == repr(sched)


def test_a_second_scheduler_keeps_the_first_initial_lr():
    """Warm-up, then cosine on the same optimizer: the second scheduler's base lrs are the
    ``initial_lr`` the first recorded, not the part-warmed lrs the groups hold when it is
    made (PyTorch's ``setdefault``)."""
    opt = _optimizer()
    warmup = LinearWarmup(opt, warmup_steps=4, start_factor=0.25)
    warmup.step()
    warmup.step()
    held = [g["lr"] for g in opt.param_groups]
    assert held == pytest.approx([b * 0.625 for b in BASES], rel=1e-12)
    cosine = CosineAnnealingLR(opt, T_max=6, eta_min=1e-4)
    assert [g["initial_lr"] for g in opt.param_groups] == list(BASES)
    assert cosine.base_lrs == list(BASES)
    _check(cosine, lambda b, t: cosine_formula(b, t, 6, 1e-4), 8)


def test_a_second_scheduler_takes_its_base_lr_as_torch_does():
    torch = pytest.importorskip("torch", reason="torch is not installed: the comparison with "
                                                "torch.optim.lr_scheduler needs it")
    weight = torch.zeros(2, requires_grad=True)
    theirs = torch.optim.SGD([weight], lr=0.1)
    torch_warmup = torch.optim.lr_scheduler.LinearLR(theirs, start_factor=0.25, total_iters=4)
    ours = _optimizer(bases=(0.1,))
    warmup = LinearWarmup(ours, warmup_steps=4, start_factor=0.25)
    for _ in range(2):
        theirs.step()
        torch_warmup.step()
        warmup.step()
    assert ours.param_groups[0]["lr"] == pytest.approx(theirs.param_groups[0]["lr"])
    torch_cosine = torch.optim.lr_scheduler.CosineAnnealingLR(theirs, T_max=6)
    cosine = CosineAnnealingLR(ours, T_max=6)
    assert cosine.base_lrs == torch_cosine.base_lrs == [0.1]


@pytest.mark.parametrize("make", [
    lambda opt: StepLR(opt, step_size=3, gamma=0.7),
    lambda opt: CosineAnnealingLR(opt, T_max=9, eta_min=1e-4),
    lambda opt: LinearWarmup(opt, warmup_steps=11, start_factor=0.3),
    lambda opt: WarmupCosine(opt, warmup_steps=5, total_steps=17, eta_min=1e-5,
                             start_factor=0.2),
], ids=["step", "cosine", "warmup", "warmup_cosine"])
def test_state_dict_round_trip_gives_bit_identical_lrs(make):
    sched = make(_optimizer())
    _lrs(sched, 7)
    saved = json.loads(json.dumps(sched.state_dict()))  # JSON-able, survives JSON
    assert saved["last_epoch"] == 7
    resumed = make(_optimizer(bases=(5.0, 6.0)))  # fresh: other lrs, at t = 0
    resumed.check_state_dict(saved)
    assert resumed.last_epoch == 0 and resumed.get_last_lr()[0] != sched.get_last_lr()[0]
    resumed.load_state_dict(saved)
    assert resumed.get_last_lr() == sched.get_last_lr()
    assert [g["lr"] for g in resumed.optimizer.param_groups] == sched.get_last_lr()
    assert _lrs(resumed, 25) == _lrs(sched, 25)  # exact equality, every step


def test_resuming_with_last_epoch():
    opt = _optimizer()
    StepLR(opt, step_size=2, gamma=0.5)
    opt.param_groups[0]["lr"] = 123.0  # the base lr comes from initial_lr, not from lr
    sched = StepLR(opt, step_size=2, gamma=0.5, last_epoch=3)
    assert sched.last_epoch == 4 and sched.get_last_lr() == pytest.approx([0.025, 0.005])
    with pytest.raises(KeyError, match="initial_lr"):
        StepLR(_optimizer(), step_size=2, last_epoch=3)


@pytest.mark.parametrize("spoil, message", [
    (lambda sd: sd.pop("gamma"), r"missing \['gamma'\]"),
    (lambda sd: sd.update(extra=1), r"unknown \['extra'\]"),
    (lambda sd: sd.update(base_lrs=[0.1]), "one lr per param group"),
    (lambda sd: sd.update(gamma=-1.0), r"invalid gamma=-1\.0"),
    (lambda sd: sd.update(step_size=1.5), "step_size must be an int"),
    (lambda sd: sd.update(last_epoch=-3), "invalid last_epoch=-3"),
])
def test_load_state_dict_errors_leave_the_scheduler_unchanged(spoil, message):
    sched = StepLR(_optimizer(), step_size=2, gamma=0.5)
    _lrs(sched, 3)
    other = StepLR(_optimizer(), step_size=5, gamma=0.9)
    _lrs(other, 1)
    before = (other.state_dict(), other.get_last_lr(),
              [g["lr"] for g in other.optimizer.param_groups])
    sd = sched.state_dict()
    spoil(sd)
    with pytest.raises(ValueError, match=message):
        other.check_state_dict(sd)
    with pytest.raises(ValueError, match=message):
        other.load_state_dict(sd)
    assert (other.state_dict(), other.get_last_lr(),
            [g["lr"] for g in other.optimizer.param_groups]) == before


@pytest.mark.parametrize("make, error, message", [
    (lambda o: StepLR(o, step_size=0), ValueError, "invalid step_size=0"),
    (lambda o: StepLR(o, step_size=2.0), TypeError, "step_size must be an int"),
    (lambda o: StepLR(o, step_size=2, gamma=0.0), ValueError, "invalid gamma=0.0"),
    (lambda o: CosineAnnealingLR(o, T_max=0), ValueError, "invalid T_max=0"),
    (lambda o: CosineAnnealingLR(o, T_max=5, eta_min=-0.1), ValueError, "invalid eta_min"),
    (lambda o: LinearWarmup(o, warmup_steps=-1), ValueError, "invalid warmup_steps=-1"),
    (lambda o: LinearWarmup(o, warmup_steps=3, start_factor=1.5), ValueError,
     r"invalid start_factor=1\.5"),
    (lambda o: WarmupCosine(o, warmup_steps=5, total_steps=5), ValueError,
     r"invalid total_steps=5: must be > warmup_steps \(5\)"),
    (lambda o: WarmupCosine(o, warmup_steps=2, total_steps=9, eta_min=float("inf")),
     ValueError, "invalid eta_min=inf"),
    (lambda o: StepLR(o.param_groups, step_size=2), TypeError, "diagnet Optimizer"),
    (lambda o: StepLR(o, step_size=2, last_epoch=-2), ValueError, "invalid last_epoch=-2"),
])
def test_argument_validation(make, error, message):
    opt = _optimizer()
    with pytest.raises(error, match=message):
        make(opt)
    assert all("initial_lr" not in g for g in opt.param_groups)
    assert [g["lr"] for g in opt.param_groups] == list(BASES)


def test_scheduler_with_adam_state_dict_round_trip():
    """An optimizer resumed from its state dict, with its scheduler, keeps the schedule."""
    p = Parameter(np.zeros(2))
    opt = Adam([p], lr=0.01)
    sched = WarmupCosine(opt, warmup_steps=2, total_steps=6)
    for _ in range(3):
        p.grad = Tensor.from_array(np.ones(2))
        opt.step()
        sched.step()
    q = Parameter(p.data.copy())
    opt2 = Adam([q], lr=0.01)
    opt2.load_state_dict(opt.state_dict())  # carries lr and initial_lr
    sched2 = WarmupCosine(opt2, warmup_steps=2, total_steps=6, last_epoch=2)
    assert sched2.get_last_lr() == sched.get_last_lr() == [opt.param_groups[0]["lr"]]


@pytest.mark.parametrize("make, key, formula", [
    (lambda opt, n: CosineAnnealingLR(opt, T_max=n, eta_min=1e-4), "T_max",
     lambda b, t, n: cosine_formula(b, t, n, 1e-4)),
    (lambda opt, n: WarmupCosine(opt, warmup_steps=2, total_steps=n, eta_min=1e-4), "total_steps",
     lambda b, t, n: warmup_cosine_formula(b, t, 2, n, 1e-4, 0.0)),
])
def test_with_length_extends_a_saved_schedule_from_the_step_reached(make, key, formula):
    """A run resumed with more steps: the saved position, the new length."""
    first = make(_optimizer(), 6)
    _lrs(first, 6)                                   # at the end: lr = eta_min
    saved = json.loads(json.dumps(first.state_dict()))
    longer = make(_optimizer(bases=(5.0, 6.0)), 10)
    state = longer.with_length(saved)
    assert state == {**saved, key: 10} and saved[key] == 6   # a copy
    longer.load_state_dict(state)
    assert longer.last_epoch == 6 and getattr(longer, key) == 10
    for t, lrs in enumerate(_lrs(longer, 4), start=6):
        assert lrs == pytest.approx([formula(b, t, 10) for b in BASES], rel=1e-12), t
    with pytest.raises(ValueError, match=rf"cannot shorten the schedule to {key}=5: the saved "
                                         r"state has taken 6 steps"):
        make(_optimizer(), 5).with_length(saved)
    assert make(_optimizer(), 6).with_length(saved) == saved
    step = StepLR(_optimizer(), step_size=2)         # no length: the state as it is
    assert step.length_key is None and step.with_length(step.state_dict()) == step.state_dict()
