"""DynaDiag's temperature schedules against their formulas, written out here independently."""

import json
import math

import pytest

from diagnet.dst import SCHEDULES, TemperatureSchedule
from diagnet.dst.temperature import MAY_RISE

T0, T1, TMIN, TMAX = 5.0, 0.05, 0.1, 4.0
GAMMA, STEP, W, CYCLES = 0.9, 3, 4, 3


def expected(kind, c, E):
    """The reference's formulas (DESIGN.md section 5), one per kind."""
    e = min(max(c, 0), E - 1)

    def cos_part(prog):
        return TMIN + (TMAX - TMIN) / 2 * (1 + math.cos(math.pi * prog))

    if kind == "constant":
        return T0
    if kind == "linear":
        a = e / max(1, E - 1)
        return (1 - a) * T0 + a * T1
    if kind == "cosine":
        return cos_part(e / max(1, E - 1))
    if kind == "exponential":
        return max(T1, T0 * GAMMA ** e)
    if kind == "step":
        return max(T1, T0 * GAMMA ** math.floor(e / STEP))
    if kind == "warmup_cosine":
        if e < W:
            a = e / max(1, W)
            return (1 - a) * T0 + a * TMAX
        return cos_part((e - W) / max(1, max(1, E - W) - 1))
    if kind == "cyclic":
        length = max(1, E // CYCLES)
        return cos_part((e % length) / max(1, length - 1))
    raise AssertionError(kind)


def make(kind, E, **kw):
    args = dict(t_start=T0, t_end=T1, t_min=TMIN, t_max=TMAX, warmup=W, gamma=GAMMA,
                step_size=STEP, cycles=CYCLES)
    args.update(kw)
    return TemperatureSchedule(kind, E, **args)


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("E", [1, 2, 3, 5, 7, 30, 100])
def test_schedules_follow_their_formulas_at_every_counter(kind, E):
    sched = make(kind, E)
    for c in range(-3, E + 5):  # before, along and beyond the span (clamped)
        assert sched(c) == pytest.approx(expected(kind, c, E), rel=1e-13, abs=1e-15), (kind, E, c)
        assert isinstance(sched(c), float)


def test_endpoints_and_the_reference_default():
    sched = TemperatureSchedule("cosine", 30)  # the reference: cosine 5.0 -> 0.05
    assert sched.t_max == 5.0 and sched.t_min == 0.05 and sched.per == "epoch"
    assert sched(0) == 5.0 and sched(29) == pytest.approx(0.05, abs=1e-15)
    assert sched(100) == sched(29) and sched(-1) == sched(0)
    assert TemperatureSchedule("linear", 11)(10) == pytest.approx(0.05)
    assert TemperatureSchedule("linear", 11)(5) == pytest.approx((5.0 + 0.05) / 2)
    # exponential and step never fall below t_end
    assert TemperatureSchedule("exponential", 1000, gamma=0.5)(999) == 0.05
    assert TemperatureSchedule("step", 1000, gamma=0.5, step_size=2)(999) == 0.05


def test_span_of_one_holds_the_first_value():
    for kind in SCHEDULES:
        sched = make(kind, 1)
        first = expected(kind, 0, 1)
        assert all(sched(c) == pytest.approx(first) for c in (0, 1, 50))


def test_cyclic_restarts_each_cycle_and_warmup_reaches_t_max():
    sched = make("cyclic", 12)  # 3 cycles of 4
    assert [sched(c) for c in (0, 4, 8)] == [pytest.approx(TMAX)] * 3
    assert [sched(c) for c in (3, 7, 11)] == [pytest.approx(TMIN)] * 3
    warm = make("warmup_cosine", 20)
    assert warm(0) == T0 and warm(W) == pytest.approx(TMAX) and warm(19) == pytest.approx(TMIN)


def test_defaults_follow_t_start_and_t_end():
    sched = TemperatureSchedule("cyclic", 10, t_start=3.0, t_end=0.5)
    assert (sched.t_max, sched.t_min) == (3.0, 0.5)


def test_config_is_json_and_rebuilds_the_schedule():
    sched = make("warmup_cosine", 17, per="step")
    config = json.loads(json.dumps(sched.config()))
    again = TemperatureSchedule(**config)
    assert [again(c) for c in range(20)] == [sched(c) for c in range(20)]
    assert "warmup_cosine" in repr(sched)


@pytest.mark.parametrize("kwargs, name", [
    (dict(kind="sigmoid"), "kind"),
    (dict(span=0), "span"),
    (dict(span=2.5), "span"),
    (dict(span=True), "span"),
    (dict(t_start=0.0), "t_start"),
    (dict(t_end=-1.0), "t_end"),
    (dict(t_end=float("nan")), "t_end"),
    (dict(t_min=float("inf")), "t_min"),
    (dict(t_max="5"), "t_max"),
    (dict(t_min=2.0, t_max=1.0), "t_min"),
    (dict(warmup=-1), "warmup"),
    (dict(gamma=0.0), "gamma"),
    (dict(gamma=1.5), "gamma"),
    (dict(step_size=0), "step_size"),
    (dict(cycles=0), "cycles"),
    (dict(per="batch"), "per"),
])
def test_bad_arguments_are_named(kwargs, name):
    args = dict(kind="cosine", span=10)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        TemperatureSchedule(**args)


def test_counter_must_be_an_int():
    sched = TemperatureSchedule("cosine", 10)
    for bad in (1.5, True, "3", None):
        with pytest.raises(TypeError, match="counter"):
            sched(bad)


@pytest.mark.parametrize("kind", ["linear", "constant"])
def test_linear_and_constant_may_rise(kind):
    sched = TemperatureSchedule(kind, span=5, t_start=0.5, t_end=5.0)
    expected = [0.5, 1.625, 2.75, 3.875, 5.0] if kind == "linear" else [0.5] * 5
    assert [sched(e) for e in range(5)] == pytest.approx(expected, rel=0, abs=1e-12)
    assert kind in MAY_RISE


@pytest.mark.parametrize("kind, names", [
    ("cosine", "t_min.*t_max"), ("warmup_cosine", "t_min.*t_max"), ("cyclic", "t_min.*t_max"),
    ("exponential", "t_end.*t_start"), ("step", "t_end.*t_start"),
])
def test_schedules_that_only_fall_refuse_t_end_above_t_start(kind, names):
    assert kind not in MAY_RISE
    with pytest.raises(ValueError, match=f"{kind} .*falls.*{names}.*got") as info:
        TemperatureSchedule(kind, span=5, t_start=0.5, t_end=5.0)
    assert "0.5" in str(info.value) and "5.0" in str(info.value)
