"""The trainer's own counters (`TrainerState`) and the run description of the log's first line.

`TrainerState` is everything besides the model, optimizer, scheduler, controller, loader and
random generator that a resumed run needs to continue exactly: where it is (epoch, batch,
step), the running sums of the current epoch's training loss and accuracy, the best metric
so far, the last epoch's metrics, and the length and checksum of the log at the checkpoint.
It goes into a checkpoint's ``state`` as a plain dict (`TrainerState.to_dict`)::

    {"format": "diagnet-trainer", "version": 1,
     "epoch": 1, "batch": 3, "step": 9, "epoch_started": true,
     "totals": {"loss": 6.62, "samples": 48, "correct": 31, "labels": 48, "batches": 3},
     "best": {"metric": "eval_accuracy", "mode": "max", "value": 0.81, "epoch": 0},
     "metrics": {"train_loss": 0.71, "eval_accuracy": 0.81, ...},
     "seed": 0, "exact": true, "loader": {"samples": 96, "batch_size": 16, ...},
     "log": {"bytes": 2310, "sha256": "..."}}

``epoch`` is the epoch in progress (0-based) or, between epochs, the next one; ``batch`` the
number of its batches trained; ``epoch_started`` whether its start (``set_epoch``,
``controller.start_epoch``) has run. ``exact`` is False only for a checkpoint saved by a
second Ctrl-C in the middle of an update (see `Trainer`).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

from .. import checks
from ..version import __version__

__all__ = ["TrainerState", "EpochTotals", "describe_run"]

FORMAT, VERSION = "diagnet-trainer", 1


@dataclass
class EpochTotals:
    """Running sums over the batches of the current epoch.

    ``loss``: sum of ``batch mean loss * batch size`` (a Python float, so the sum is exact
    to reproduce); ``samples``: samples seen; ``correct`` / ``labels``: correct predictions
    and labels (classification only; ``labels`` stays 0 otherwise); ``batches``.
    """

    loss: float = 0.0
    samples: int = 0
    correct: int = 0
    labels: int = 0
    batches: int = 0

    def add(self, loss, samples, correct=None, labels=0):
        self.loss += loss * samples
        self.samples += samples
        self.batches += 1
        if correct is not None:
            self.correct += correct
            self.labels += labels

    def means(self, prefix="train_"):
        """``{prefix+"loss": ..., prefix+"accuracy": ...}`` (accuracy only when counted)."""
        out = {prefix + "loss": self.loss / self.samples if self.samples else float("nan")}
        if self.labels:
            out[prefix + "accuracy"] = self.correct / self.labels
        return out


@dataclass
class TrainerState:
    """Where a run is and what it has measured (see the module docstring)."""

    seed: int
    loader: dict
    best_metric: str | None = None
    best_mode: str = "max"
    epoch: int = 0
    batch: int = 0
    step: int = 0
    epoch_started: bool = False
    totals: EpochTotals = field(default_factory=EpochTotals)
    best_value: float | None = None
    best_epoch: int | None = None
    metrics: dict = field(default_factory=dict)
    exact: bool = True

    def improves(self, value) -> bool:
        """Whether ``value`` beats the best so far (NaN never does)."""
        if value != value:  # NaN
            return False
        if self.best_value is None:
            return True
        return value > self.best_value if self.best_mode == "max" else value < self.best_value

    def to_dict(self, log_bytes, log_sha256):
        t = self.totals
        return {
            "format": FORMAT, "version": VERSION,
            "epoch": self.epoch, "batch": self.batch, "step": self.step,
            "epoch_started": self.epoch_started,
            "totals": {"loss": float(t.loss), "samples": t.samples, "correct": t.correct,
                       "labels": t.labels, "batches": t.batches},
            "best": {"metric": self.best_metric, "mode": self.best_mode,
                     "value": self.best_value, "epoch": self.best_epoch},
            "metrics": dict(self.metrics),
            "seed": self.seed, "exact": self.exact, "loader": dict(self.loader),
            "log": {"bytes": int(log_bytes), "sha256": log_sha256},
        }

    @classmethod
    def from_dict(cls, d, where="checkpoint"):
        """Rebuild a state from `to_dict`'s output. Returns ``(state, log_bytes, log_sha256)``.

        Raises:
            ValueError: ``d`` is not a trainer state of this version, or is malformed.
        """
        def fail(msg):
            raise ValueError(f"{where}: {msg}")

        if not isinstance(d, dict) or d.get("format") != FORMAT:
            fail("its state is not a diagnet Trainer's (was it saved by Trainer?)")
        if d.get("version") != VERSION:
            fail(f"trainer state version {d.get('version')!r}; this diagnet reads {VERSION}")

        def count(value, name):
            if not checks.is_integer(value) or value < 0:
                fail(f"trainer state: {name} must be a non-negative int; got {value!r}")
            return int(value)

        try:
            t, best, log = d["totals"], d["best"], d["log"]
            state = cls(
                seed=count(d["seed"], "seed"), loader=dict(d["loader"]),
                best_metric=best["metric"], best_mode=best["mode"],
                epoch=count(d["epoch"], "epoch"), batch=count(d["batch"], "batch"),
                step=count(d["step"], "step"), epoch_started=bool(d["epoch_started"]),
                totals=EpochTotals(float(t["loss"]), count(t["samples"], "samples"),
                                   count(t["correct"], "correct"), count(t["labels"], "labels"),
                                   count(t["batches"], "batches")),
                best_value=None if best["value"] is None else float(best["value"]),
                best_epoch=None if best["epoch"] is None else count(best["epoch"], "best epoch"),
                metrics=dict(d["metrics"]), exact=bool(d["exact"]))
            log_bytes, log_sha = count(log["bytes"], "log bytes"), str(log["sha256"])
        except (KeyError, TypeError) as exc:
            fail(f"malformed trainer state ({type(exc).__name__}: {exc})")
        return state, log_bytes, log_sha


# ----------------------------------------------------------------------------- run description

_PLAIN = (bool, int, float, str, type(None))


def _plain_value(value):
    """``value`` if it is a plain number/string (or a list/tuple of them), else None."""
    if isinstance(value, _PLAIN) or isinstance(value, numbers.Number):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, _PLAIN) for v in value):
        return list(value)
    return None


def _public_plain_attributes(obj):
    out = {}
    for key, value in vars(obj).items():
        if key.startswith("_"):
            continue
        plain = _plain_value(value)
        if plain is not None:
            out[key] = plain
    return out


def describe_object(obj):
    """``{"class": ..., <hyperparameters>}`` of an optimizer, scheduler or controller.

    An optimizer gives its ``defaults`` and group count; an object with a ``config()``
    method (`DynaDiag`) gives its dict; one whose ``hyperparameters`` is a tuple of attribute
    names (the schedulers) gives those; any other object its public attributes that are
    plain numbers, strings or lists of them. A controller's layer names are added as
    ``layers`` unless already there, and its ``structure()`` (the stored diagonals at the
    start, from which `diagnet.plots` replays the log) as ``structure``.
    """
    if obj is None:
        return None
    out = {"class": type(obj).__name__}
    hyper = getattr(obj, "hyperparameters", None)
    if hasattr(obj, "defaults") and hasattr(obj, "param_groups"):
        out.update({k: _plain_value(v) for k, v in obj.defaults.items()})
        out["param_groups"] = len(obj.param_groups)
    elif callable(getattr(obj, "config", None)):
        out.update(obj.config())
    elif isinstance(hyper, tuple):
        out.update({name: _plain_value(getattr(obj, name, None)) for name in hyper})
        if hasattr(obj, "base_lrs"):
            out["base_lrs"] = list(obj.base_lrs)
    else:
        out.update(_public_plain_attributes(obj))
    layers = getattr(obj, "layers", None)
    if isinstance(layers, dict) and "layers" not in out:
        out["layers"] = list(layers)
    if callable(getattr(obj, "structure", None)):
        out["structure"] = obj.structure()
    return out


def describe_run(*, seed, config, model, optimizer, scheduler, scheduler_interval, controller,
                 loader, epochs, settings):
    """The fields of the log's ``run_start`` record (everything that defines the run)."""
    from ..nn import summary

    s = summary(model)
    return {
        "seed": seed,
        "config": config,
        "diagnet_version": __version__,
        "model": {"class": type(model).__name__, "params": s.params, "dense": s.dense,
                  "sparsity": s.sparsity, "weight_sparsity": s.weight_sparsity},
        "optimizer": describe_object(optimizer),
        "scheduler": describe_object(scheduler),
        "scheduler_interval": scheduler_interval if scheduler is not None else None,
        "controller": describe_object(controller),
        "train_loader": loader.describe() if hasattr(loader, "describe") else None,
        "epochs": epochs,
        **settings,
    }
