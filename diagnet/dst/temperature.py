"""Temperature schedules for DynaDiag's soft top-k.

DynaDiag scales each diagonal by ``s = clamp(K * softmax(alpha / T), 0, 1)``. A high
temperature ``T`` spreads the scale evenly (every diagonal gets about ``K / P``); a low one
concentrates it on the ``K`` diagonals with the largest ``alpha`` (scale 1) and silences the
rest (scale 0). Training anneals ``T`` from high to low, so the selection starts soft and
ends hard. The reference code (`horizon-research/DynaDiag`) offers seven schedules; they are
reproduced here exactly (`diagnet` design notes, section 5).

Every schedule is a pure function of a counter ``c`` (an epoch or an optimizer step,
0-based) over a span of ``E`` counts. The counter is clamped first:
``e = min(max(c, 0), E - 1)``, so a schedule holds its last value after the span (and
its first before it). With ``T0 = t_start``, ``T1 = t_end``, ``Tmin = t_min``,
``Tmax = t_max``, ``W = warmup``, and ``cos_between(prog) = Tmin + (Tmax - Tmin) / 2 *
(1 + cos(pi * prog))`` (``Tmax`` at ``prog = 0``, ``Tmin`` at ``prog = 1``):

=============== ==========================================================================
constant        ``T0``
linear          ``(1 - a) * T0 + a * T1`` with ``a = e / max(1, E - 1)``
cosine          ``cos_between(e / max(1, E - 1))``
exponential     ``max(T1, T0 * gamma ** e)``
step            ``max(T1, T0 * gamma ** floor(e / step_size))``
warmup_cosine   ``e < W``: ``(1 - a) * T0 + a * Tmax`` with ``a = e / max(1, W)``; else
                ``cos_between((e - W) / max(1, max(1, E - W) - 1))``
cyclic          ``cos_between(q / max(1, C - 1))`` with ``C = max(1, E // cycles)`` (the
                cycle length) and ``q = e % C`` (the position in the cycle)
=============== ==========================================================================

The reference's defaults: cosine from 5.0 to 0.05 (``Tmax`` defaults to ``T0``, ``Tmin``
to ``T1``), ``gamma = 0.95``, ``step_size = 10``, ``cycles = 1``, no warm-up, one value per
epoch over the epochs before the freeze.
"""

from __future__ import annotations

import math

from ..checks import int_at_least, is_integer, number_in

__all__ = ["TemperatureSchedule", "SCHEDULES", "MAY_RISE", "temperature_at"]

#: the schedule kinds, in the reference's order
SCHEDULES = ("constant", "linear", "cosine", "exponential", "step", "warmup_cosine", "cyclic")

#: the kinds that may run from a low ``t_start`` up to a high ``t_end``; the others only fall
#: (their cosine runs from ``t_max`` down to ``t_min``; exponential and step decay to the
#: floor ``t_end``)
MAY_RISE = ("constant", "linear")

_COSINE_KINDS = ("cosine", "warmup_cosine", "cyclic")


def _clamp(counter: int, span: int) -> int:
    return min(max(int(counter), 0), span - 1)


def _cos_between(t_min: float, t_max: float, prog: float) -> float:
    """``t_max`` at ``prog = 0``, ``t_min`` at ``prog = 1``, half a cosine in between."""
    return t_min + 0.5 * (t_max - t_min) * (1.0 + math.cos(math.pi * prog))


def temperature_at(kind, counter, span, t_start, t_end, t_min, t_max, warmup, gamma,
                   step_size, cycles) -> float:
    """The temperature of schedule ``kind`` at ``counter`` (the formulas in the module doc).

    A pure function, without argument checks (`TemperatureSchedule` validates once).
    """
    E = span
    e = _clamp(counter, E)
    if kind == "constant":
        return t_start
    if kind == "linear":
        a = e / max(1, E - 1)
        return (1 - a) * t_start + a * t_end
    if kind == "cosine":
        return _cos_between(t_min, t_max, e / max(1, E - 1))
    if kind == "exponential":
        return max(t_end, t_start * gamma ** e)
    if kind == "step":
        return max(t_end, t_start * gamma ** (e // step_size))
    if kind == "warmup_cosine":
        if e < warmup:
            a = e / max(1, warmup)
            return (1 - a) * t_start + a * t_max
        rest = max(1, E - warmup)
        return _cos_between(t_min, t_max, (e - warmup) / max(1, rest - 1))
    if kind == "cyclic":
        length = max(1, E // cycles)
        return _cos_between(t_min, t_max, (e % length) / max(1, length - 1))
    raise ValueError(f"kind must be one of {SCHEDULES}; got {kind!r}")


def _positive_float(name, value):
    return number_in(name, value, 0, math.inf, include_low=False, include_high=False)


class TemperatureSchedule:
    """A temperature schedule ``T(counter)`` for DynaDiag (formulas in the module doc).

    Args:
        kind: one of `SCHEDULES` (default ``"cosine"``, the reference's).
        span: ``E``, the number of counts the schedule spans (epochs, or steps with
            ``per="step"``); the counter is clamped to ``[0, E - 1]``. The reference spans
            the epochs before the freeze (all epochs when it does not freeze).
        t_start: ``T0``, the first temperature of constant, linear, exponential, step and
            of the warm-up (default 5.0).
        t_end: ``T1``, the last temperature of linear and the floor of exponential and step
            (default 0.05).
        t_min: ``Tmin``, where the cosine parts end (default: ``t_end``).
        t_max: ``Tmax``, where the cosine parts start and the warm-up ends (default:
            ``t_start``). Must be >= ``t_min`` for the kinds with a cosine part.
        warmup: ``W``, warm-up counts of ``warmup_cosine`` (default 0).
        gamma: decay factor of exponential and step, in ``(0, 1]`` (default 0.95).
        step_size: counts per decay of ``step`` (default 10).
        cycles: number of cosine cycles of ``cyclic`` (default 1).
        per: ``"epoch"`` (default; the reference's) or ``"step"``: what the counter counts.
            The `DynaDiag` controller sets ``T`` at the start of every epoch or before every
            step accordingly.

    Every temperature is a positive finite number; arguments that a schedule does not use
    are still validated, so a typo fails early. Only the kinds in `MAY_RISE` may have
    ``t_end > t_start`` (a temperature that rises); the others refuse it. Raises ValueError
    naming the argument.
    Calling the schedule gives a Python float: ``TemperatureSchedule("cosine", 30)(10)``.
    """

    def __init__(self, kind="cosine", span=1, t_start=5.0, t_end=0.05, t_min=None,
                 t_max=None, warmup=0, gamma=0.95, step_size=10, cycles=1, per="epoch"):
        if kind not in SCHEDULES:
            raise ValueError(f"kind must be one of {SCHEDULES}; got {kind!r}")
        if per not in ("epoch", "step"):
            raise ValueError(f"per must be 'epoch' or 'step'; got {per!r}")
        self.kind, self.per = kind, per
        self.span = int_at_least("span", span, 1)
        self.t_start = _positive_float("t_start", t_start)
        self.t_end = _positive_float("t_end", t_end)
        self.t_min = _positive_float("t_min", self.t_end if t_min is None else t_min)
        self.t_max = _positive_float("t_max", self.t_start if t_max is None else t_max)
        self._check_direction()
        self.warmup = int_at_least("warmup", warmup, 0)
        self.gamma = _positive_float("gamma", gamma)
        if self.gamma > 1:
            raise ValueError(f"gamma must be in (0, 1]; got {self.gamma}")
        self.step_size = int_at_least("step_size", step_size, 1)
        self.cycles = int_at_least("cycles", cycles, 1)

    def _check_direction(self):
        """ValueError when a schedule that only falls is asked to rise (see `MAY_RISE`)."""
        if self.kind in _COSINE_KINDS and self.t_min > self.t_max:
            raise ValueError(f"{self.kind} falls from t_max (default: t_start) to t_min "
                             f"(default: t_end), so t_min must be <= t_max; got "
                             f"t_min={self.t_min}, t_max={self.t_max}")
        if self.kind in ("exponential", "step") and self.t_end > self.t_start:
            raise ValueError(f"{self.kind} falls from t_start to its floor t_end, so t_end "
                             f"must be <= t_start; got t_end={self.t_end}, "
                             f"t_start={self.t_start}")

    def __call__(self, counter) -> float:
        """The temperature at ``counter`` (an int; clamped to ``[0, span - 1]``)."""
        if not is_integer(counter):
            raise TypeError(f"counter must be an int; got {type(counter).__name__} {counter!r}")
        return float(temperature_at(self.kind, int(counter), self.span, self.t_start,
                                    self.t_end, self.t_min, self.t_max, self.warmup,
                                    self.gamma, self.step_size, self.cycles))

    def config(self) -> dict:
        """The arguments, as a JSON-able dict (for run logs); ``TemperatureSchedule(**config)``
        rebuilds the schedule."""
        return {"kind": self.kind, "span": self.span, "t_start": self.t_start,
                "t_end": self.t_end, "t_min": self.t_min, "t_max": self.t_max,
                "warmup": self.warmup, "gamma": self.gamma, "step_size": self.step_size,
                "cycles": self.cycles, "per": self.per}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"TemperatureSchedule({args})"
