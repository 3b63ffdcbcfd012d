"""How `Trainer.fit` ends: the `FitResult` it returns, or the `NonFiniteLossError` it raises."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["FitResult", "NonFiniteLossError"]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped before using it.

    Attributes: ``epoch``, ``step`` (0-based) and ``value`` (the loss, a float).
    """

    def __init__(self, epoch, step, value):
        self.epoch, self.step, self.value = epoch, step, value
        super().__init__(f"the training loss is {value} at epoch {epoch}, step {step}: training "
                         "stopped before the update (the last checkpoint on disk is kept as it "
                         "was)")


@dataclass
class FitResult:
    """What `Trainer.fit` returns.

    ``epochs_completed`` and ``steps`` count the whole run (a resumed run included);
    ``metrics`` are those of the last completed epoch; ``best_*`` describe the best epoch
    (None without ``best_metric``); checkpoint paths are None where no file was written.
    ``exact`` is False only after an interrupt that could not be undone (see `Trainer`).
    """

    epochs_completed: int
    steps: int
    interrupted: bool
    metrics: dict = field(default_factory=dict)
    best_metric: str | None = None
    best_value: float | None = None
    best_epoch: int | None = None
    log_path: str | None = None
    last_checkpoint: str | None = None
    best_checkpoint: str | None = None
    exact: bool = True
