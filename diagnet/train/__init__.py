"""Training: the `Trainer` loop with its JSONL log, checkpoints and exact resumption.

* `Trainer`, `FitResult`, `NonFiniteLossError`, `evaluate` (``trainer``);
* `RunLog`, `read_log`, `TIME_KEYS`: the log (``log``);
* `TrainerState`: the counters a checkpoint keeps (``state``);
* `ProgressBars` (``progress``) and `DeferredInterrupt` (``interrupt``): the loop's helpers.
"""

from .interrupt import DeferredInterrupt
from .log import TIME_KEYS, RunLog, jsonable, read_log
from .progress import ProgressBars
from .state import EpochTotals, TrainerState
from .trainer import FitResult, NonFiniteLossError, Trainer, evaluate

__all__ = ["Trainer", "FitResult", "NonFiniteLossError", "evaluate", "RunLog", "read_log",
           "jsonable", "TIME_KEYS", "TrainerState", "EpochTotals", "ProgressBars",
           "DeferredInterrupt"]
