"""Checking that a checkpoint continues a `Trainer`'s run, before anything is loaded.

``Trainer.fit(resume=path)`` reads the checkpoint once (`diagnet.load` with no object to
load into) and checks that it continues with the objects given to the Trainer (built as for
the first run: the same model structure, a scheduler and controller where the run had them,
the same loader settings and ``best_metric``) and that ``log.jsonl`` is the run's own (its
length and checksum at the checkpoint): `check_resume`. Only then does it load everything
into those objects (`diagnet.load` again, on the checkpoint already read), cut ``log.jsonl``
back to its length at the checkpoint and continue. A refused resume raises and changes
nothing: no object, no file, not the random generator. Layers whose size is part of their
state take the checkpoint's size as they load, through the one hook
`diagnet.nn.Module._prepare_state`; the trainer knows no layer type.

The run's length may be extended by resuming with a larger ``epochs``. Build the scheduler
for the new length: a scheduler with a length (``T_max``, ``total_steps``: its
``length_key``) keeps the one it was built with and continues from the step reached
(`LRScheduler.with_length`); the saved length would run the added epochs past the end of the
old schedule (a cosine at lr 0). `extend_schedule` makes that change in the checkpoint read
and returns the ``lr_schedule`` record that logs it; a length shorter than the steps the
schedule has taken is refused.
"""

from __future__ import annotations

from ..checkpoint import CheckpointError
from .log import RunLog
from .state import TrainerState

__all__ = ["check_resume", "check_model", "extend_schedule"]


def check_resume(path, saved, objects, best_metric, best_mode, log_path):
    """Check that the checkpoint ``saved`` (read from ``path``) continues with these objects
    and settings; change nothing.

    Args:
        path: the checkpoint's path, for messages.
        saved: the `diagnet.checkpoint.Checkpoint` read from it.
        objects: component name -> the Trainer's object or None: ``"model"``,
            ``"optimizer"``, ``"scheduler"``, ``"loader"`` (the train loader) and, with one,
            ``"controller"``.
        best_metric, best_mode: the Trainer's settings (they must be the run's).
        log_path: the run's ``log.jsonl``.

    Returns:
        ``(TrainerState, log bytes, log sha256)``.

    Raises:
        CheckpointError: an object has no component in the file, or the model is of another
            structure. ValueError: a component has no object, or the loader, best-metric
            settings or loader position differ from the run's. FileNotFoundError /
            ValueError: ``log.jsonl`` is missing or not the checkpoint's run's.
    """
    state, log_bytes, log_sha = TrainerState.from_dict(saved.state, where=path)
    in_file = saved.metadata["components"]
    absent = [name for name, obj in objects.items() if obj is not None and name not in in_file]
    if absent:
        raise CheckpointError(f"{path}: this Trainer has a {' and a '.join(absent)}, but "
                              "the checkpoint's run had none")
    unclaimed = [name for name in in_file if objects.get(name) is None]
    if unclaimed:
        raise ValueError(f"{path}: the checkpoint also holds {unclaimed}, which this Trainer "
                         "has no object for (a scheduler or controller left out?)")
    loader = objects["loader"]
    if hasattr(loader, "describe") and state.loader != loader.describe():
        raise ValueError(f"{path}: the train loader differs from the checkpoint's run: "
                         f"{loader.describe()} vs {state.loader}")
    saved_best = (state.best_metric, state.best_mode if state.best_metric else None)
    if saved_best != (best_metric, best_mode if best_metric else None):
        raise ValueError(f"{path}: best_metric/best_mode {best_metric!r}/"
                         f"{best_mode!r} differ from the checkpoint's run "
                         f"({state.best_metric!r}/{state.best_mode!r})")
    position = saved.components["loader"]
    if position != {"epoch": state.epoch, "batch": state.batch}:
        raise ValueError(f"{path}: the loader position {position} does not match the trainer "
                         f"state (epoch {state.epoch}, batch {state.batch})")
    check_model(path, objects["model"], saved.components["model"])
    RunLog.verify(log_path, log_bytes, log_sha)
    return state, log_bytes, log_sha


def check_model(path, model, model_state):
    """CheckpointError if the checkpoint's model state ``model_state`` is not of a model
    built as ``model`` (another method, layer kind, sparsity or size); changes nothing."""
    try:
        model.check_state_dict(model_state)
    except (KeyError, ValueError) as exc:
        detail = str(exc.args[0] if exc.args else exc).removeprefix("load_state_dict: ")
        raise CheckpointError(f"{path}: the checkpoint was saved from a model of another "
                              f"structure ({detail}); build the model as its run did (see "
                              "its config)") from None


def extend_schedule(path, saved, state, scheduler):
    """Give the scheduler's saved state the length of ``scheduler``, built for this run (a
    run resumed with more epochs); return the log event of the change, or None.

    A run extended with the saved length would train its added epochs past the end of
    the schedule (a cosine at lr 0). Raises ValueError if this length is shorter than
    the steps the schedule has taken; changes only ``saved``.
    """
    key = getattr(scheduler, "length_key", None)
    if key is None or "scheduler" not in saved.components:
        return None
    old = saved.components["scheduler"]
    try:
        new = scheduler.with_length(old)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    if new[key] == old[key]:
        return None
    saved.components["scheduler"] = new
    return {"event": "lr_schedule", "epoch": state.epoch, "step": state.step,
            "scheduler": type(scheduler).__name__, key: [old[key], new[key]]}
