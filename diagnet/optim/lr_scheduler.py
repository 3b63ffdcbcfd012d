"""Learning-rate schedules, after ``torch.optim.lr_scheduler``.

A scheduler sets ``group["lr"]`` of every parameter group of an optimizer to a function of
the step count ``t = last_epoch`` and the group's base lr ``b`` (recorded in the group as
``initial_lr`` when the scheduler is made, like PyTorch). Call ``scheduler.step()`` after
``optimizer.step()``; construction applies ``t = 0``.

Every schedule here is a pure function of ``t`` computed in closed form (never by
multiplying the previous lr), so a scheduler resumed from its state dict sets bit-identical
lrs:

* `StepLR`: ``b * gamma ** (t // step_size)``.
* `CosineAnnealingLR`: ``eta_min + (b - eta_min) * (1 + cos(pi * t / T_max)) / 2``; past
  ``T_max`` it follows the same formula (rising again, period ``2 * T_max``), which is
  PyTorch's closed form, not its recursive form.
* `LinearWarmup`: ``b * (s + (1 - s) * t / W)`` for ``t < W`` (``s = start_factor``,
  ``W = warmup_steps``), then ``b``.
* `WarmupCosine`: the linear warm-up for ``t < W``, then
  ``eta_min + (b - eta_min) * (1 + cos(pi * (t - W) / (T - W))) / 2`` up to
  ``T = total_steps``, then ``eta_min``.

A state dict holds the hyperparameters too, so loading one brings back the saved run's
schedule. To extend a run, build the scheduler for the new length and load
``scheduler.with_length(saved)``: the saved position along a schedule of the new ``T_max`` or
``total_steps`` (`LRScheduler.length_key`).
"""

from __future__ import annotations

import math

from .. import checks
from .optimizer import Optimizer

__all__ = ["LRScheduler", "StepLR", "CosineAnnealingLR", "LinearWarmup", "WarmupCosine"]


class LRScheduler:
    """Base class of the schedulers (``torch.optim.lr_scheduler.LRScheduler``).

    Args:
        optimizer: the `Optimizer` whose groups' ``"lr"`` this scheduler sets.
        last_epoch: the step count to resume from; ``-1`` (default) starts afresh and records
            each group's current lr as its ``initial_lr``; otherwise every group must have
            ``initial_lr`` already.

    Attributes:
        last_epoch: the number of `step` calls since the start (0 after construction).
        base_lrs: the groups' base lrs (Python floats).

    Subclasses list their hyperparameters in ``hyperparameters``, validate them in
    `_checked` and implement `lr_at`.
    """

    #: names of the subclass's hyperparameters (attributes, saved in the state dict)
    hyperparameters: tuple = ()
    #: the hyperparameter that is the schedule's length in steps (``T_max``,
    #: ``total_steps``); None for a schedule without an end (`StepLR`)
    length_key: str | None = None

    def __init__(self, optimizer, last_epoch=-1):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a diagnet Optimizer; got "
                            f"{type(optimizer).__name__}")
        last_epoch = checks.integer("last_epoch", last_epoch, -1)
        if last_epoch == -1:
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
        else:
            for number, group in enumerate(optimizer.param_groups):
                if "initial_lr" not in group:
                    raise KeyError(f"'initial_lr' is not in param group {number}; resuming "
                                   "with last_epoch >= 0 needs the optimizer state that the "
                                   "first scheduler recorded it in")
        self.optimizer = optimizer
        self.base_lrs = [checks.non_negative("initial_lr", group["initial_lr"],
                                              f" in param group {number}")
                         for number, group in enumerate(optimizer.param_groups)]
        self.last_epoch = last_epoch
        self.step()

    def _checked(self, **hyperparameters) -> dict:
        """The subclass's hyperparameters validated and normalised (raises otherwise)."""
        return {}

    def lr_at(self, base_lr: float, step: int) -> float:
        """The learning rate at step count ``step`` of a group with base lr ``base_lr``."""
        raise NotImplementedError

    def get_lr(self) -> list:
        """The lrs of the groups at the current ``last_epoch`` (closed form)."""
        return [self.lr_at(base, self.last_epoch) for base in self.base_lrs]

    def get_last_lr(self) -> list:
        """The lrs this scheduler last set, one Python float per group."""
        return list(self._last_lr)

    def step(self) -> None:
        """Advance the step count by one and set every group's ``"lr"``."""
        self.last_epoch += 1
        self._apply()

    def _apply(self):
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr

    def state_dict(self) -> dict:
        """``{"last_epoch", "base_lrs", <hyperparameters>}``: plain Python values (JSON-able)."""
        state = {"last_epoch": self.last_epoch, "base_lrs": list(self.base_lrs)}
        state.update((name, getattr(self, name)) for name in self.hyperparameters)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume from `state_dict`: everything is checked first (see `check_state_dict`;
        the scheduler is unchanged on error), then the groups' lrs are set for
        ``last_epoch`` (PyTorch leaves them to the optimizer's state dict; the closed form
        makes both agree)."""
        hyper, last_epoch, base_lrs = self._checked_state_dict(state_dict)
        self.__dict__.update(hyper)
        self.last_epoch, self.base_lrs = last_epoch, base_lrs
        self._apply()

    def check_state_dict(self, state_dict: dict) -> None:
        """Check that `load_state_dict` would accept ``state_dict``, changing nothing.

        Raises:
            ValueError: a missing or unknown key, an invalid hyperparameter, ``last_epoch``
                or ``base_lrs`` (not one lr per param group), naming it.
        """
        self._checked_state_dict(state_dict)

    def with_length(self, state_dict: dict) -> dict:
        """A copy of the saved ``state_dict`` that takes this scheduler's length.

        For a run resumed with more (or fewer) steps: build the scheduler for the run's new
        length (its `length_key`, ``T_max`` or ``total_steps``) and load
        ``with_length(saved)``. The saved state alone would bring the old length back, and
        the steps added would run past the old end (a cosine at ``eta_min``, often 0). The
        copy keeps the saved step count, base lrs and other hyperparameters: the lr
        continues from the step reached, along the schedule of the new length. A schedule
        without a length gets the state unchanged.

        Raises:
            ValueError: the saved state has taken more steps than the new length (a schedule
                is not cut short before the point it reached), or it is not a valid state
                of this scheduler (`check_state_dict`).
        """
        self.check_state_dict(state_dict)
        out = dict(state_dict)
        if self.length_key is None:
            return out
        length, taken = getattr(self, self.length_key), state_dict["last_epoch"]
        if length < taken:
            raise ValueError(f"{type(self).__name__}: cannot shorten the schedule to "
                             f"{self.length_key}={length}: the saved state has taken {taken} "
                             "steps already")
        out[self.length_key] = length
        self.check_state_dict(out)
        return out

    def _checked_state_dict(self, state_dict):
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict; got {type(state_dict).__name__}")
        expected = {"last_epoch", "base_lrs", *self.hyperparameters}
        if set(state_dict) != expected:
            raise ValueError(f"{type(self).__name__} state dict: missing "
                             f"{sorted(expected - set(state_dict))}, unknown "
                             f"{sorted(map(str, set(state_dict) - expected))}")
        try:
            hyper = self._checked(**{k: state_dict[k] for k in self.hyperparameters})
            last_epoch = checks.integer("last_epoch", state_dict["last_epoch"], 0)
            base_lrs = state_dict["base_lrs"]
            if not isinstance(base_lrs, (list, tuple)) or len(base_lrs) != len(
                    self.optimizer.param_groups):
                raise ValueError(f"base_lrs must be a list of one lr per param group "
                                 f"({len(self.optimizer.param_groups)}); got {base_lrs!r:.80}")
            base_lrs = [checks.non_negative(f"base_lrs[{i}]", lr)
                        for i, lr in enumerate(base_lrs)]
        except TypeError as exc:
            raise ValueError(f"{type(self).__name__} state dict: {exc}") from None
        return hyper, last_epoch, base_lrs

    def __repr__(self):
        args = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.hyperparameters)
        return f"{type(self).__name__}({args}, last_epoch={self.last_epoch})"


def _cosine(start, end, fraction):
    """From ``start`` at ``fraction = 0`` to ``end`` at ``fraction = 1``, half a cosine."""
    return end + (start - end) * (1.0 + math.cos(math.pi * fraction)) / 2.0


def _warmup(base_lr, step, warmup_steps, start_factor):
    return base_lr * (start_factor + (1.0 - start_factor) * step / warmup_steps)


class StepLR(LRScheduler):
    """Decay each group's lr by ``gamma`` every ``step_size`` steps:
    ``lr = base_lr * gamma ** (t // step_size)``.

    Args:
        optimizer: the optimizer.
        step_size: int ``>= 1``, the period of the decay.
        gamma: the decay factor, ``> 0``.
        last_epoch: see `LRScheduler`.
    """

    hyperparameters = ("step_size", "gamma")

    def __init__(self, optimizer, step_size, gamma=0.1, last_epoch=-1):
        self.__dict__.update(self._checked(step_size=step_size, gamma=gamma))
        super().__init__(optimizer, last_epoch)

    def _checked(self, step_size, gamma):
        return {"step_size": checks.integer("step_size", step_size, 1),
                "gamma": checks.positive("gamma", gamma)}

    def lr_at(self, base_lr, step):
        return base_lr * self.gamma ** (step // self.step_size)


class CosineAnnealingLR(LRScheduler):
    """Cosine annealing from each base lr to ``eta_min`` over ``T_max`` steps:
    ``lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * t / T_max)) / 2``.

    Past ``T_max`` the same closed form continues (the lr rises again towards the base lr,
    period ``2 * T_max``), as PyTorch's closed form does; use `WarmupCosine` for a schedule
    that stays at ``eta_min``.

    Args:
        optimizer: the optimizer.
        T_max: int ``>= 1``, the number of steps from the base lr to ``eta_min``.
        eta_min: the final lr, ``>= 0``.
        last_epoch: see `LRScheduler`.
    """

    hyperparameters = ("T_max", "eta_min")
    length_key = "T_max"

    def __init__(self, optimizer, T_max, eta_min=0.0, last_epoch=-1):  # noqa: N803 - torch's name
        self.__dict__.update(self._checked(T_max=T_max, eta_min=eta_min))
        super().__init__(optimizer, last_epoch)

    def _checked(self, T_max, eta_min):  # noqa: N803
        return {"T_max": checks.integer("T_max", T_max, 1),
                "eta_min": checks.non_negative("eta_min", eta_min)}

    def lr_at(self, base_lr, step):
        return _cosine(base_lr, self.eta_min, step / self.T_max)


class LinearWarmup(LRScheduler):
    """Linear warm-up: the lr ramps from ``start_factor * base_lr`` (at ``t = 0``) to
    ``base_lr`` (at ``t = warmup_steps``), then stays there.

    With the default ``start_factor=0`` the first optimizer step runs with lr 0 (it still
    updates the optimizer's running state, e.g. Adam's moments), as in the usual definition.

    Args:
        optimizer: the optimizer.
        warmup_steps: int ``>= 0`` (0: no warm-up).
        start_factor: in ``[0, 1]``.
        last_epoch: see `LRScheduler`.
    """

    hyperparameters = ("warmup_steps", "start_factor")

    def __init__(self, optimizer, warmup_steps, start_factor=0.0, last_epoch=-1):
        self.__dict__.update(self._checked(warmup_steps=warmup_steps, start_factor=start_factor))
        super().__init__(optimizer, last_epoch)

    def _checked(self, warmup_steps, start_factor):
        return {"warmup_steps": checks.integer("warmup_steps", warmup_steps, 0),
                "start_factor": checks.unit_interval("start_factor", start_factor,
                                                      include_one=True)}

    def lr_at(self, base_lr, step):
        if step >= self.warmup_steps:
            return base_lr
        return _warmup(base_lr, step, self.warmup_steps, self.start_factor)


class WarmupCosine(LRScheduler):
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``eta_min`` at
    ``total_steps``, then ``eta_min``.

    ``t < W``: ``base_lr * (s + (1 - s) * t / W)``; ``W <= t < T``:
    ``eta_min + (base_lr - eta_min) * (1 + cos(pi * (t - W) / (T - W))) / 2``;
    ``t >= T``: ``eta_min`` (``W = warmup_steps``, ``T = total_steps``, ``s = start_factor``).

    Args:
        optimizer: the optimizer.
        warmup_steps: int ``>= 0``.
        total_steps: int ``> warmup_steps``.
        eta_min: the final lr, ``>= 0``.
        start_factor: in ``[0, 1]``, the warm-up's starting fraction of the base lr.
        last_epoch: see `LRScheduler`.
    """

    hyperparameters = ("warmup_steps", "total_steps", "eta_min", "start_factor")
    length_key = "total_steps"

    def __init__(self, optimizer, warmup_steps, total_steps, eta_min=0.0, start_factor=0.0,
                 last_epoch=-1):
        self.__dict__.update(self._checked(warmup_steps=warmup_steps, total_steps=total_steps,
                                           eta_min=eta_min, start_factor=start_factor))
        super().__init__(optimizer, last_epoch)

    def _checked(self, warmup_steps, total_steps, eta_min, start_factor):
        warmup_steps = checks.integer("warmup_steps", warmup_steps, 0)
        total_steps = checks.integer("total_steps", total_steps, 1)
        if total_steps <= warmup_steps:
            raise ValueError(f"invalid total_steps={total_steps!r}: must be > warmup_steps "
                             f"({warmup_steps})")
        return {"warmup_steps": warmup_steps,
                "total_steps": total_steps,
                "eta_min": checks.non_negative("eta_min", eta_min),
                "start_factor": checks.unit_interval("start_factor", start_factor,
                                                      include_one=True)}

    def lr_at(self, base_lr, step):
        if step < self.warmup_steps:
            return _warmup(base_lr, step, self.warmup_steps, self.start_factor)
        if step >= self.total_steps:
            return self.eta_min
        fraction = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return _cosine(base_lr, self.eta_min, fraction)
