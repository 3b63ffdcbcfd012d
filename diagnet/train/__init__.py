"""Training: the `Trainer` loop with its JSONL log, checkpoints and exact resumption.

* `Trainer` (``trainer``), its argument checks (``arguments``), `FitResult` and
  `NonFiniteLossError` (``result``);
* the data-parallel step: what the ranks agree on (``parallel``), and the exact mode's
  micro-batches (``microbatch``);
* `evaluate` and the per-batch measures (``metrics``);
* checking a checkpoint before resuming (``resume``) and the run folder's files (``rundir``);
* `RunLog`, `read_log`, `TIME_KEYS`: the log (``log``);
* `TrainerState`: the counters a checkpoint keeps (``state``);
* `ProgressBars` (``progress``) and `DeferredInterrupt` (``interrupt``): the loop's helpers.
"""

from .interrupt import DeferredInterrupt
from .log import TIME_KEYS, RunLog, jsonable, read_log
from .metrics import evaluate
from .progress import ProgressBars
from .result import FitResult, NonFiniteLossError
from .state import EpochTotals, TrainerState
from .trainer import Trainer

__all__ = ["Trainer", "FitResult", "NonFiniteLossError", "evaluate", "RunLog", "read_log",
           "jsonable", "TIME_KEYS", "TrainerState", "EpochTotals", "ProgressBars",
           "DeferredInterrupt"]
