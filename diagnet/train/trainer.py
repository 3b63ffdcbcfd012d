"""`Trainer`: the training loop, with a JSONL log, checkpoints and bit-exact resumption.

A ten-line script::

    trainer = Trainer(model, optimizer, train_loader, loss_fn=F.cross_entropy,
                      eval_loader=test_loader, scheduler=sched, controller=dst, epochs=10,
                      out_dir="runs/x", best_metric="eval_accuracy", config=cfg)
    result = trainer.fit()                      # or trainer.fit(resume="runs/x/last.safetensors")

One step (``step`` counts optimizer steps from 0 over the whole run)::

    controller.before_step(step); out = model(*inputs); loss = loss_fn(out, target)
    (stop if loss is NaN/inf); optimizer.zero_grad(); loss.backward(); optimizer.step()
    scheduler.step()  # with scheduler_interval="step"
    events = controller.after_step(step); step += 1

Each epoch starts with ``train_loader.set_epoch(epoch)`` and ``controller.start_epoch(epoch)``
and ends with the evaluation (``eval_loader``: ``model.eval()``, ``no_grad``), the epoch's
log record, ``scheduler.step()`` (``scheduler_interval="epoch"``) and the checkpoints.

Files in ``out_dir``:

* ``log.jsonl`` (`RunLog`): one JSON object per line, each with an ``"event"`` key:
  ``run_start`` (seed, config, diagnet version, model size, optimizer / scheduler /
  controller hyperparameters, loader settings), the controller's events as they come
  (``controller.after_step`` / ``start_epoch``, written as the controller made them: step,
  layer, dropped, grown, ...), one ``epoch`` record per epoch, an ``lr_schedule`` record
  where a resumed run changes the learning rate schedule's length (see below), and a last
  record:
  ``run_end``, ``interrupted``, ``stopped_nonfinite`` or ``error``. An ``epoch`` record has
  ``epoch`` (0-based), ``step`` (steps done), ``train_loss`` and ``train_accuracy`` (means
  over the epoch's batches, weighted by batch size), ``eval_loss`` / ``eval_accuracy`` and
  the ``eval_fn`` metrics, ``lr`` (the first parameter group's when the epoch ends, before
  an epoch-interval scheduler steps), ``controller`` (its ``metrics()``), ``best`` (whether
  ``best_metric`` improved), ``checkpoints`` (the files written) and ``time_s``.
  Wall-clock times are only under the keys of `TIME_KEYS` (``time``, ``time_s``).
* ``last.safetensors``: every ``checkpoint_every`` epochs, after the last epoch, and when
  the run is interrupted (Ctrl-C); ``best.safetensors`` whenever ``best_metric`` improves.
  Each is a `diagnet.save` checkpoint with the model, optimizer, scheduler, the controller
  (component ``"controller"``), the train loader's position (component ``"loader"``), the
  random generator, the run's ``config``, and the `TrainerState` as ``state`` (epoch, batch,
  step, running sums, best value, last metrics, seed, and the log's length and checksum).

Resumption. ``fit(resume=path)`` reads the checkpoint once and checks that it continues
with the objects given to the Trainer (build them as for the first run: the same model
structure, a scheduler and controller where the run had them, the same loader settings and
``best_metric``) and that ``log.jsonl`` is the run's own (its length and checksum at the
checkpoint); only then does it load everything into those objects, cut ``log.jsonl`` back to
its length at the checkpoint (so whatever the interrupted process wrote after it
disappears) and continue. A refused resume raises and changes nothing: no object, no file,
not the random generator. The result is bit for bit that of an uninterrupted run: the same
parameters, optimizer and controller states, and the same log lines except the time
fields. A checkpoint taken at an epoch's end continues with the next epoch; one taken by an
interrupt continues mid-epoch, with the next batch. Layers whose size is part of their state
(a `DynaDiagLinear` stores fewer diagonals once frozen) take the checkpoint's size as they
load (`Module.prepare_state_dict`).

The run's length may be extended by resuming with a larger ``epochs`` (the ``run_start``
line keeps the original settings). Build the scheduler for the new length: a scheduler with
a length (``T_max``, ``total_steps``: its ``length_key``) keeps the one it was built with and
continues from the step reached (`LRScheduler.with_length`); the saved length would run the
added epochs past the end of the old schedule (a cosine at lr 0). The change is logged as an
``lr_schedule`` record (``epoch``, ``step``, ``scheduler``, the length's key with ``[old,
new]``, the ``lr`` now) and printed (with ``progress``); a length shorter than the steps the
schedule has taken is refused.

Interrupts. The first Ctrl-C only asks the trainer to stop (`DeferredInterrupt`): it stops
after the current step, with a consistent state. A ``KeyboardInterrupt`` raised anywhere
else (a second Ctrl-C, or code called by the loop) is handled too: raised before
``optimizer.step()`` began, the step is undone (the random generator is restored to its
state before the step, the batch is not counted); raised during the update (optimizer,
scheduler, ``after_step``, the epoch's bookkeeping), the state is saved as it is and marked
``exact: false``. Either way ``last.safetensors`` is written, then an ``interrupted`` record,
and `fit` returns with ``interrupted=True``.

Assumptions for exactness: running ``controller.before_step(step)`` again after a rollback
has the same effect as running it once (it arms gradient taps or sets a per-step
temperature, a function of ``step``), and the loader order is fixed by ``(seed, epoch)``
(as in `diagnet.data.DataLoader`).
"""

from __future__ import annotations

import datetime
import math
import numbers
import os
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from .. import backend
from .. import random as _random
from ..autograd import Tensor
from ..checkpoint import CheckpointError, load, save
from ..config import no_grad
from ..nn.module import Module
from ..ops import cross_entropy
from .interrupt import DeferredInterrupt
from .log import TIME_KEYS, RunLog, jsonable
from .progress import ProgressBars
from .state import EpochTotals, TrainerState, describe_run

__all__ = ["Trainer", "FitResult", "NonFiniteLossError", "evaluate", "TIME_KEYS"]

LOG_NAME, LAST_NAME, BEST_NAME = "log.jsonl", "last.safetensors", "best.safetensors"


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


# ----------------------------------------------------------------------------- batch helpers


def split_batch(batch):
    """``(inputs..., target)`` -> ``(inputs tuple, target)``: the model gets all but the last."""
    if isinstance(batch, Tensor) or not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError(f"a batch must be a tuple (inputs..., target) of tensors; got "
                         f"{type(batch).__name__}" + (f" of length {len(batch)}"
                                                      if isinstance(batch, (tuple, list)) else ""))
    return tuple(batch[:-1]), batch[-1]


def _samples(target):
    return target.shape[0] if isinstance(target, Tensor) and target.ndim else 1


def correct_count(output, target):
    """Device 0-d count of ``argmax(output, -1) == target``, or None if not classification.

    Classification: ``output`` ``(..., C)`` logits and ``target`` ``(...)`` integer labels.
    """
    if not (isinstance(output, Tensor) and isinstance(target, Tensor)):
        return None
    if (target.dtype.kind not in "iu" or output.ndim != target.ndim + 1
            or output.shape[:-1] != target.shape):
        return None
    xp = backend.get_array_module(output.data)
    return (xp.argmax(output.data, axis=-1) == target.data).sum()


def _check_loss(loss):
    if not isinstance(loss, Tensor) or loss.size != 1:
        what = (f"a Tensor of shape {loss.shape}" if isinstance(loss, Tensor)
                else type(loss).__name__)
        raise TypeError(f"loss_fn must return a one-element Tensor (a mean loss); got {what}")


def step_numbers(loss, output, target):
    """``(loss value, correct count or None)`` as Python numbers, in one device read-back."""
    _check_loss(loss)
    xp = backend.get_array_module(loss.data)
    value = loss.data.reshape(()).astype(np.float64)
    correct = correct_count(output, target)
    if correct is None:
        return float(backend.to_numpy(value)), None
    both = backend.to_numpy(xp.stack([value, correct.astype(np.float64)]))
    return float(both[0]), int(both[1])


def evaluate(model, loader, loss_fn=cross_entropy):
    """Mean loss (and accuracy, for classification) of ``model`` over ``loader``.

    Runs in eval mode under `no_grad` (the model's mode is restored after). ``loss_fn``
    returns a batch's mean loss; the result weights batches by their sizes. The sums stay
    on the device and are read back once, at the end.

    Returns:
        ``{"loss": float, "accuracy": float}`` (no ``"accuracy"`` when the outputs and
        targets are not logits and integer labels).
    """
    was_training = model.training
    model.eval()
    loss_sum = correct = None
    samples = labels = 0
    try:
        with no_grad():
            for batch in loader:
                inputs, target = split_batch(batch)
                output = model(*inputs)
                loss = loss_fn(output, target)
                _check_loss(loss)
                n = _samples(target)
                term = loss.data.reshape(()).astype(np.float64) * n
                loss_sum = term if loss_sum is None else loss_sum + term
                samples += n
                c = correct_count(output, target)
                if c is not None:
                    correct = c if correct is None else correct + c
                    labels += target.size
    finally:
        model.train(was_training)
    if not samples:
        raise ValueError("evaluate: the loader gave no batch")
    result = {"loss": float(backend.to_numpy(loss_sum)) / samples}
    if correct is not None:
        result["accuracy"] = int(backend.to_numpy(correct)) / labels
    return result


def _metric_value(key, value):
    """A metric as a Python number (NumPy scalars and one-element tensors are read)."""
    if isinstance(value, Tensor):
        value = value.data
    if backend.is_array(value) and value.size == 1:
        value = backend.to_numpy(value).reshape(()).item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"eval_fn: metric {key!r} must be a number; got {type(value).__name__}")
    return value


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


def _positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------- Trainer


class Trainer:
    """Train a model for some epochs, logging, evaluating and checkpointing (module docstring).

    Args:
        model: the `diagnet.nn.Module`.
        optimizer: a `diagnet.optim` optimizer over the model's parameters.
        train_loader: a `diagnet.data.DataLoader` (or an object with its methods:
            ``len``, iteration, ``set_epoch``, ``state_dict``, ``load_state_dict``) giving
            batches ``(inputs..., target)``: the model is called on the inputs.
        out_dir: folder of the log and checkpoints (created if needed).
        loss_fn: ``loss_fn(output, target)`` -> one-element Tensor, the batch's mean loss
            (default `diagnet.functional.cross_entropy`).
        epochs: number of epochs of the run.
        eval_loader: batches to evaluate on after every epoch (metrics ``eval_loss``,
            ``eval_accuracy``); None for none.
        eval_fn: ``eval_fn(model) -> dict`` of more metrics, called after every epoch in eval
            mode under `no_grad`; its keys go into the epoch record as they are.
        scheduler: a learning-rate scheduler, stepped every epoch or every step
            (``scheduler_interval``: ``"epoch"`` or ``"step"``).
        controller: a dynamic sparse training controller (`diagnet.dst.SparsityController`
            protocol).
        checkpoint_every: write ``last.safetensors`` every this many epochs (0: only after
            the last epoch; it is always written then).
        best_metric: a metric of the epoch record (``"eval_accuracy"``, ``"eval_loss"``,
            ``"train_loss"``, an ``eval_fn`` key...) whose improvement writes
            ``best.safetensors``; None for no best checkpoint.
        best_mode: ``"max"``, ``"min"``, or ``"auto"``: ``"min"`` when the name contains
            ``"loss"``, else ``"max"``.
        seed: a fresh run starts with ``diagnet.manual_seed(seed)`` (dropout and every other
            draw from the default generator follow it); a resumed run restores the
            generator from the checkpoint instead, and keeps the seed recorded there.
        config: the run's configuration (JSON-able: dicts, lists, numbers, strings), written
            to the log and to every checkpoint.
        progress: show tqdm bars (False: print nothing, for tests and CI).
        overwrite: allow a fresh run in an ``out_dir`` that holds a previous run's log or
            checkpoints (they are replaced); otherwise that is an error.

    Raises:
        TypeError / ValueError: invalid arguments, naming the argument.
    """

    #: how the message after Ctrl-C says to resume; a command-line program that wraps the
    #: Trainer sets its own (its ``--resume`` flag, say)
    resume_hint = "fit(resume=...)"

    def __init__(self, model, optimizer, train_loader, *, out_dir, loss_fn=cross_entropy,
                 epochs=1, eval_loader=None, eval_fn=None, scheduler=None,
                 scheduler_interval="epoch", controller=None, checkpoint_every=1,
                 best_metric=None, best_mode="auto", seed=0, config=None, progress=True,
                 overwrite=False):
        if not isinstance(model, Module):
            raise TypeError(f"model must be a diagnet.nn.Module; got {type(model).__name__}")
        for name in ("step", "zero_grad", "state_dict", "load_state_dict"):
            if not callable(getattr(optimizer, name, None)):
                raise TypeError(f"optimizer must be a diagnet optimizer (no {name}() on a "
                                f"{type(optimizer).__name__})")
        for name in ("__len__", "__iter__", "set_epoch", "state_dict", "load_state_dict"):
            if not callable(getattr(train_loader, name, None)):
                raise TypeError(f"train_loader must be a diagnet.data.DataLoader (no {name} on a "
                                f"{type(train_loader).__name__})")
        for name, fn in (("loss_fn", loss_fn), ("eval_fn", eval_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable; got {type(fn).__name__}")
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step'; got "
                             f"{scheduler_interval!r}")
        if best_mode not in ("auto", "max", "min"):
            raise ValueError(f"best_mode must be 'auto', 'max' or 'min'; got {best_mode!r}")
        if best_metric is not None:
            if not isinstance(best_metric, str):
                raise TypeError(f"best_metric must be a str or None; got {best_metric!r}")
            if best_metric.startswith("eval_") and eval_loader is None and eval_fn is None:
                raise ValueError(f"best_metric={best_metric!r} needs an eval_loader or an eval_fn")
            if best_mode == "auto":
                best_mode = "min" if "loss" in best_metric else "max"
        jsonable(config, "config")  # raises TypeError naming what cannot be logged
        self.model, self.optimizer, self.train_loader = model, optimizer, train_loader
        self.loss_fn = loss_fn if loss_fn is not None else cross_entropy
        self.eval_loader, self.eval_fn = eval_loader, eval_fn
        self.scheduler, self.scheduler_interval = scheduler, scheduler_interval
        self.controller = controller
        self.epochs = _positive_int("epochs", epochs)
        self.checkpoint_every = _positive_int("checkpoint_every", checkpoint_every, minimum=0)
        self.best_metric, self.best_mode = best_metric, best_mode
        self.seed = _positive_int("seed", seed, minimum=0)
        self.config, self.progress, self.overwrite = config, bool(progress), bool(overwrite)
        self.out_dir = os.fspath(out_dir)
        self.state = self.log = None
        self._bars = ProgressBars(False, 0)
        self._interrupt = DeferredInterrupt()
        self._rng_mark = None  # generator state at the last consistent point; None mid-update

    # ------------------------------------------------------------------ paths
    @property
    def log_path(self):
        return os.path.join(self.out_dir, LOG_NAME)

    @property
    def last_path(self):
        return os.path.join(self.out_dir, LAST_NAME)

    @property
    def best_path(self):
        return os.path.join(self.out_dir, BEST_NAME)

    # ------------------------------------------------------------------ fit
    def fit(self, resume=None) -> FitResult:
        """Run the epochs left; return a `FitResult`.

        Args:
            resume: None for a fresh run; a checkpoint path (or True for
                ``out_dir/last.safetensors``) to continue the run it was saved from.

        Raises:
            NonFiniteLossError: the training loss became NaN/inf (after a
                ``stopped_nonfinite`` record; no checkpoint is written).
            FileExistsError: a fresh run in an ``out_dir`` with a previous run's files.
            CheckpointError / ValueError: the checkpoint cannot be resumed with these
                objects (see `diagnet.load`): a model of another structure, a scheduler or
                controller missing or extra, loader or best-metric settings that differ, a
                learning-rate schedule shorter than the steps taken.
            FileNotFoundError / ValueError: ``log.jsonl`` is missing or is not the
                checkpoint's run's. A refused resume changes nothing.
            Any error of the model, loss or controller (after an ``error`` record).
        """
        note = None
        if resume is None or resume is False:
            self._start_fresh()
        else:
            note = self._resume(self.last_path if resume is True else resume)
        st = self.state
        interrupted = False
        self._bars = ProgressBars(self.progress, self.epochs, min(st.epoch, self.epochs))
        if note:
            self._bars.write(note)
        self._interrupt = DeferredInterrupt(self._bars.write)
        try:
            with self._interrupt:
                try:
                    self._safe_point()
                    while st.epoch < self.epochs:
                        self._train_epoch()
                        self._end_epoch()
                except KeyboardInterrupt:
                    self._save_interrupted()
                    interrupted = True
                except NonFiniteLossError as err:
                    self.log.write({"event": "stopped_nonfinite", "epoch": err.epoch,
                                    "batch": st.batch, "step": err.step, "loss": err.value,
                                    "checkpoint": LAST_NAME if self._existing(self.last_path)
                                    else None,
                                    "time": _now()})
                    raise
                except Exception as exc:
                    self.log.write({"event": "error", "epoch": st.epoch, "batch": st.batch,
                                    "step": st.step, "error": f"{type(exc).__name__}: {exc}",
                                    "time": _now()})
                    raise
            if not interrupted:
                self.log.write({"event": "run_end", "epochs": st.epoch, "step": st.step,
                                "metrics": st.metrics, "best_metric": st.best_metric,
                                "best_value": st.best_value, "best_epoch": st.best_epoch,
                                "time": _now()})
        finally:
            self._bars.close()
            self.log.close()
        return FitResult(
            epochs_completed=st.epoch, steps=st.step, interrupted=interrupted,
            metrics=dict(st.metrics), best_metric=st.best_metric, best_value=st.best_value,
            best_epoch=st.best_epoch, log_path=self.log_path,
            last_checkpoint=self._existing(self.last_path),
            best_checkpoint=self._existing(self.best_path), exact=st.exact)

    # ------------------------------------------------------------------ start / resume
    def _start_fresh(self):
        os.makedirs(self.out_dir, exist_ok=True)
        previous = [p for p in (self.log_path, self.last_path, self.best_path)
                    if os.path.exists(p)]
        if previous and not self.overwrite:
            raise FileExistsError(f"{self.out_dir!r} holds a previous run ({', '.join(previous)}): "
                                  "resume it with fit(resume=...), or pass overwrite=True to "
                                  "start afresh")
        for path in previous:
            os.remove(path)
        _random.manual_seed(self.seed)
        loader = self.train_loader.describe() if hasattr(self.train_loader, "describe") else {}
        self.state = TrainerState(seed=self.seed, loader=loader, best_metric=self.best_metric,
                                  best_mode=self.best_mode)
        self.log = RunLog.create(self.log_path)
        run = describe_run(
            seed=self.seed, config=self.config, model=self.model, optimizer=self.optimizer,
            scheduler=self.scheduler, scheduler_interval=self.scheduler_interval,
            controller=self.controller, loader=self.train_loader, epochs=self.epochs,
            settings={"eval": self.eval_loader is not None or self.eval_fn is not None,
                      "checkpoint_every": self.checkpoint_every,
                      "best_metric": self.best_metric,
                      "best_mode": self.best_mode if self.best_metric else None})
        self.log.write({"event": "run_start", **run, "time": _now()})

    def _components(self):
        parts = {"loader": self.train_loader}
        if self.controller is not None:
            parts["controller"] = self.controller
        return parts

    def _resume(self, path):
        """Continue the run saved at ``path``: read the checkpoint once, check that it
        continues with these objects and settings, then load it. A refused resume changes
        no object, file or generator state. Returns a note to print, or None."""
        path = os.fspath(path)
        saved = load(path, rng=False)  # read and verified; nothing assigned
        state, log_bytes, log_sha = self._check_resume(path, saved)
        schedule = self._extend_schedule(path, saved, state)
        # diagnet.load validates every component against its object before assigning any
        load(saved, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
             rng=True, **self._components())
        if self.config is not None and self.config != saved.config:
            warnings.warn(f"resuming {path}: the config given differs from the checkpoint's; "
                          "the checkpoint's is kept (it is the run's)", stacklevel=3)
        self.config, self.seed = saved.config, state.seed
        self.log = RunLog.resume(self.log_path, log_bytes, log_sha)
        self.state = state
        if schedule is None:
            return None
        schedule["lr"] = self.optimizer.param_groups[0]["lr"]
        self.log.write({**schedule, "time": _now()})
        old, new = schedule[self.scheduler.length_key]
        return (f"Resumed at epoch {state.epoch}: the learning rate schedule takes this run's "
                f"length ({schedule['scheduler']} {self.scheduler.length_key} {old} -> {new}); "
                f"lr {schedule['lr']:.4g} now.")

    def _check_resume(self, path, saved):
        """Check that the checkpoint ``saved`` continues with these objects and settings;
        change nothing. Returns ``(TrainerState, log bytes, log sha256)``."""
        state, log_bytes, log_sha = TrainerState.from_dict(saved.state, where=path)
        in_file = saved.metadata["components"]
        objects = {"model": self.model, "optimizer": self.optimizer,
                   "scheduler": self.scheduler, **self._components()}
        absent = [name for name, obj in objects.items() if obj is not None and name not in in_file]
        if absent:
            raise CheckpointError(f"{path}: this Trainer has a {' and a '.join(absent)}, but "
                                  "the checkpoint's run had none")
        unclaimed = [name for name in in_file if objects.get(name) is None]
        if unclaimed:
            raise ValueError(f"{path}: the checkpoint also holds {unclaimed}, which this Trainer "
                             "has no object for (a scheduler or controller left out?)")
        if hasattr(self.train_loader, "describe") and state.loader != self.train_loader.describe():
            raise ValueError(f"{path}: the train loader differs from the checkpoint's run: "
                             f"{self.train_loader.describe()} vs {state.loader}")
        saved_best = (state.best_metric, state.best_mode if state.best_metric else None)
        if saved_best != (self.best_metric, self.best_mode if self.best_metric else None):
            raise ValueError(f"{path}: best_metric/best_mode {self.best_metric!r}/"
                             f"{self.best_mode!r} differ from the checkpoint's run "
                             f"({state.best_metric!r}/{state.best_mode!r})")
        position = saved.components["loader"]
        if position != {"epoch": state.epoch, "batch": state.batch}:
            raise ValueError(f"{path}: the loader position {position} does not match the trainer "
                             f"state (epoch {state.epoch}, batch {state.batch})")
        self._check_model(path, saved.components["model"])
        RunLog.verify(self.log_path, log_bytes, log_sha)
        return state, log_bytes, log_sha

    def _check_model(self, path, model_state):
        """CheckpointError if the checkpoint's model is not built as ``self.model`` (another
        method, layer kind, sparsity or size); changes nothing."""
        try:
            self.model.check_state_dict(model_state)
        except (KeyError, ValueError) as exc:
            detail = str(exc.args[0] if exc.args else exc).removeprefix("load_state_dict: ")
            raise CheckpointError(f"{path}: the checkpoint was saved from a model of another "
                                  f"structure ({detail}); build the model as its run did (see "
                                  "its config)") from None

    def _extend_schedule(self, path, saved, state):
        """Give the scheduler's saved state the length of ``self.scheduler``, built for this
        run (a run resumed with more epochs); return the log event of the change, or None.

        A run extended with the saved length would train its added epochs past the end of
        the schedule (a cosine at lr 0). Raises ValueError if this length is shorter than
        the steps the schedule has taken; changes only ``saved``.
        """
        key = getattr(self.scheduler, "length_key", None)
        if key is None or "scheduler" not in saved.components:
            return None
        old = saved.components["scheduler"]
        try:
            new = self.scheduler.with_length(old)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        if new[key] == old[key]:
            return None
        saved.components["scheduler"] = new
        return {"event": "lr_schedule", "epoch": state.epoch, "step": state.step,
                "scheduler": type(self.scheduler).__name__, key: [old[key], new[key]]}

    # ------------------------------------------------------------------ consistency points
    def _safe_point(self, check_interrupt=True):
        """Mark the current state as consistent: an interrupt before the next update is undone
        back to here. Then stop if Ctrl-C was pressed."""
        self._rng_mark = _random.get_state()
        if check_interrupt and self._interrupt.requested:
            raise KeyboardInterrupt

    def _begin_update(self):
        """From here until the next `_safe_point`, the state cannot be rolled back."""
        self._rng_mark = None

    # ------------------------------------------------------------------ epochs and steps
    def _train_epoch(self):
        st, c = self.state, self.controller
        if not st.epoch_started:
            self._begin_update()
            self.train_loader.set_epoch(st.epoch)
            if c is not None:
                self._log_events(c.start_epoch(st.epoch))
            st.batch, st.totals, st.epoch_started = 0, EpochTotals(), True
            self._safe_point()
        self._epoch_t0 = time.perf_counter()
        self.model.train()
        self._bars.start_epoch(st.epoch, len(self.train_loader), st.batch)
        for batch in self.train_loader:
            self._train_step(batch)

    def _train_step(self, batch):
        st, c = self.state, self.controller
        inputs, target = split_batch(batch)
        if c is not None:
            c.before_step(st.step)
        output = self.model(*inputs)
        loss = self.loss_fn(output, target)
        # One read-back from the device per step (loss and correct count in one transfer):
        # it waits for the GPU, but the NaN check and the progress bar need the number.
        value, correct = step_numbers(loss, output, target)
        if not math.isfinite(value):
            raise NonFiniteLossError(st.epoch, st.step, value)
        self.optimizer.zero_grad()
        loss.backward()
        self._begin_update()
        self.optimizer.step()
        if self.scheduler is not None and self.scheduler_interval == "step":
            self.scheduler.step()
        if c is not None:
            self._log_events(c.after_step(st.step))
        st.totals.add(value, _samples(target), correct, target.size)
        st.step += 1
        st.batch += 1
        self._safe_point()
        self._bars.step(st.totals.means(""), self._controller_metrics if c is not None else None)

    def _end_epoch(self):
        st = self.state
        metrics = st.totals.means("train_")
        metrics.update(self._evaluate())
        improved = False
        if self.best_metric is not None:
            if self.best_metric not in metrics:
                raise ValueError(f"best_metric {self.best_metric!r} is not among the epoch's "
                                 f"metrics {sorted(metrics)}")
            improved = st.improves(metrics[self.best_metric])
        done = st.epoch + 1
        names = []
        if done == self.epochs or (self.checkpoint_every and done % self.checkpoint_every == 0):
            names.append(LAST_NAME)
        if improved:
            names.append(BEST_NAME)
        record = {"event": "epoch", "epoch": st.epoch, "step": st.step, **metrics,
                  "lr": self.optimizer.param_groups[0]["lr"],
                  "controller": self._controller_metrics() if self.controller else None,
                  "best": improved, "checkpoints": names,
                  "time_s": time.perf_counter() - self._epoch_t0}
        self._begin_update()
        if self.scheduler is not None and self.scheduler_interval == "epoch":
            self.scheduler.step()
        self.log.write(record)
        if improved:
            st.best_value, st.best_epoch = metrics[self.best_metric], st.epoch
        st.metrics = metrics
        st.epoch, st.batch, st.epoch_started, st.totals = done, 0, False, EpochTotals()
        self._safe_point(check_interrupt=False)
        for name in names:
            self._save(name)
        self._bars.end_epoch(metrics)
        self._safe_point()

    def _evaluate(self):
        """The eval metrics of the epoch (eval_loader's, then eval_fn's)."""
        out = {}
        if self.eval_loader is not None:
            if callable(getattr(self.eval_loader, "set_epoch", None)):
                self.eval_loader.set_epoch(self.state.epoch)  # a shuffled one: a fixed order
            out.update({f"eval_{k}": v for k, v in
                        evaluate(self.model, self.eval_loader, self.loss_fn).items()})
        if self.eval_fn is not None:
            was_training = self.model.training
            self.model.eval()
            try:
                with no_grad():
                    extra = self.eval_fn(self.model)
            finally:
                self.model.train(was_training)
            if not isinstance(extra, dict):
                raise TypeError(f"eval_fn must return a dict of metrics; got "
                                f"{type(extra).__name__}")
            for key, value in extra.items():
                if key in out or key.startswith("train_"):
                    raise ValueError(f"eval_fn: metric {key!r} clashes with the trainer's own")
                out[str(key)] = _metric_value(key, value)
        return out

    def _controller_metrics(self):
        return jsonable(self.controller.metrics(), "controller.metrics()")

    def _log_events(self, events):
        for ev in events or ():
            if not isinstance(ev, dict):
                raise TypeError(f"controller events must be dicts (see diagnet.dst.event); got "
                                f"{type(ev).__name__}")
            self.log.write(ev)

    # ------------------------------------------------------------------ saving
    def _save(self, name):
        path = os.path.join(self.out_dir, name)
        save(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
             state=self.state.to_dict(self.log.nbytes, self.log.sha256()), config=self.config,
             rng=True, **self._components())
        return path

    def _save_interrupted(self):
        """Write ``last.safetensors`` for an interrupted run, then the ``interrupted`` record."""
        st = self.state
        exact = self._rng_mark is not None
        if exact:
            # the step (or evaluation) that was cut short is undone: its random draws too,
            # and its batch is not counted (the loader handed it out already)
            _random.set_state(self._rng_mark)
        else:
            st.exact = False
            warnings.warn("interrupted during a parameter update: the checkpoint holds the "
                          "state as it was, and resuming it will not reproduce an "
                          "uninterrupted run exactly", RuntimeWarning, stacklevel=3)
        self.train_loader.load_state_dict({"epoch": st.epoch, "batch": st.batch})
        self._save(LAST_NAME)
        self.log.write({"event": "interrupted", "epoch": st.epoch, "batch": st.batch,
                        "step": st.step, "checkpoint": LAST_NAME, "exact": exact,
                        "time": _now()})
        self._bars.write(f"Saved {self.last_path}; resume with {self.resume_hint}.")

    @staticmethod
    def _existing(path):
        return path if os.path.exists(path) else None
