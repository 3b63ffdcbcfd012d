"""The run folder: the names of a run's files, and what a fresh run does with a previous one's.

A `Trainer` writes three files in its ``out_dir``:

* ``log.jsonl`` (`LOG_NAME`, a `RunLog`): one JSON object per line, each with an ``"event"``
  key (the records are listed in `diagnet.train.log`);
* ``last.safetensors`` (`LAST_NAME`): every ``checkpoint_every`` epochs, after the last
  epoch, and when the run is interrupted (Ctrl-C);
* ``best.safetensors`` (`BEST_NAME`): whenever ``best_metric`` improves.

Each checkpoint is a `diagnet.save` checkpoint with the model, optimizer, scheduler, the
controller (component ``"controller"``), the train loader's position (component
``"loader"``), the random generator, the run's ``config``, and the `TrainerState` as
``state``. A fresh run never mixes its files with a previous run's (`clear_previous_run`).
"""

from __future__ import annotations

import os

__all__ = ["LOG_NAME", "LAST_NAME", "BEST_NAME", "clear_previous_run", "existing"]

LOG_NAME, LAST_NAME, BEST_NAME = "log.jsonl", "last.safetensors", "best.safetensors"


def clear_previous_run(out_dir, overwrite):
    """Make ``out_dir`` ready for a fresh run: create it, and remove a previous run's files
    (`LOG_NAME`, `LAST_NAME`, `BEST_NAME`) when ``overwrite`` is true.

    Raises:
        FileExistsError: a previous run's files are there and ``overwrite`` is false (raised
            before any file is removed).
    """
    os.makedirs(out_dir, exist_ok=True)
    previous = [p for p in (os.path.join(out_dir, name) for name in (LOG_NAME, LAST_NAME,
                                                                      BEST_NAME))
                if os.path.exists(p)]
    if previous and not overwrite:
        raise FileExistsError(f"{out_dir!r} holds a previous run ({', '.join(previous)}): "
                              "resume it with fit(resume=...), or pass overwrite=True to "
                              "start afresh")
    for path in previous:
        os.remove(path)


def existing(path):
    """``path`` if a file is there, else None (the checkpoint paths of a `FitResult`)."""
    return path if os.path.exists(path) else None
