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

Files in ``out_dir`` (`diagnet.train.rundir`): ``log.jsonl`` (`RunLog`; its records are
listed in `diagnet.train.log`), ``last.safetensors`` and ``best.safetensors``: `diagnet.save`
checkpoints whose ``state`` is the `TrainerState`.

Resumption (`diagnet.train.resume`). ``fit(resume=path)`` reads the checkpoint once, checks
that it continues with the objects given to the Trainer and that ``log.jsonl`` is the run's
own, then loads it and continues; a refused resume raises and changes nothing. The result
is bit for bit that of an uninterrupted run: the same parameters, optimizer and controller
states, and the same log lines except the time fields. A checkpoint taken at an epoch's end
continues with the next epoch; one taken by an interrupt continues mid-epoch, with the next
batch. The run's length may be extended by resuming with a larger ``epochs`` and a
scheduler built for the new length (the change is logged as an ``lr_schedule`` record and
printed, with ``progress``).

Interrupts. The first Ctrl-C only asks the trainer to stop (`DeferredInterrupt`): it stops
after the current step, with a consistent state. A ``KeyboardInterrupt`` raised anywhere
else (a second Ctrl-C, or code called by the loop) is handled too: raised before
``optimizer.step()`` began, the step is undone (the random generator is restored to its
state before the step, the batch is not counted); raised during the update (optimizer,
scheduler, ``after_step``, the epoch's bookkeeping), the state is saved as it is and marked
``exact: false``. Either way ``last.safetensors`` is written, then an ``interrupted`` record,
and `fit` returns with ``interrupted=True``.

Data parallel (`diagnet.train.parallel`): launched by ``mpiexec -n N`` with a loader sharded
over the ranks, every rank runs `fit`; the ranks average their gradients, agree on every
step's numbers and stop together, and rank 0 alone writes the files.

Micro-batches (`diagnet.train.microbatch`): when the train loader has a ``micro_batch``
``M``, each step runs forward and backward per micro-batch of ``M`` samples and sums their
gradients in one fixed order, so the run is the same bit for bit on 1 or N ranks (with the
same thread counts per process). The NaN and Ctrl-C checks then come after the
micro-batches' backward passes, still before the update.

Assumptions for exactness: running ``controller.before_step(step)`` again after a rollback
has the same effect as running it once (it arms gradient taps or sets a per-step
temperature, a function of ``step``), and the loader order is fixed by ``(seed, epoch)``
(as in `diagnet.data.DataLoader`).
"""

from __future__ import annotations

import datetime
import os
import time
import warnings

from .. import checks, distributed
from .. import random as _random
from ..checkpoint import load, save
from ..config import no_grad
from ..ops import cross_entropy
from .arguments import check_arguments
from .interrupt import DeferredInterrupt
from .log import TIME_KEYS, RunLog, jsonable
from .metrics import (batch_samples, evaluate, evaluation_totals, metric_value, split_batch,
                      step_numbers, totals_metrics)
from .microbatch import MicroBatchStep
from .parallel import NullLog, ParallelRun
from .progress import ProgressBars
from .result import FitResult, NonFiniteLossError
from .resume import check_resume, extend_schedule
from .rundir import BEST_NAME, LAST_NAME, LOG_NAME, clear_previous_run, existing
from .state import EpochTotals, TrainerState, describe_run

__all__ = ["Trainer", "FitResult", "NonFiniteLossError", "evaluate", "TIME_KEYS"]


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


# ----------------------------------------------------------------------------- Trainer


class Trainer:
    """Train a model for some epochs, logging, evaluating and checkpointing (module docstring).

    Args:
        model: the `diagnet.nn.Module`.
        optimizer: a `diagnet.optim` optimizer over the model's parameters.
        train_loader: a `diagnet.data.DataLoader` (or an object with its methods:
            ``len``, iteration, ``set_epoch``, ``state_dict``, ``load_state_dict``) giving
            batches ``(inputs..., target)``: the model is called on the inputs. Its
            ``micro_batch`` (None or a positive int) chooses the exact mode (module
            docstring).
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
        comm: the `diagnet.distributed.Communicator` of a data-parallel run (default:
            `diagnet.distributed.world()`, one process unless launched by ``mpiexec`` and
            `diagnet.distributed.init` was called). With several ranks the train loader
            must be sharded over them, every rank calls `fit`, and rank 0 alone writes the
            files; see `diagnet.train.parallel`.

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
                 overwrite=False, comm=None):
        best_mode = check_arguments(model, optimizer, train_loader, loss_fn, eval_fn,
                                    eval_loader, scheduler_interval, best_metric, best_mode)
        jsonable(config, "config")  # raises TypeError naming what cannot be logged
        comm = distributed.world() if comm is None else comm
        if not isinstance(comm, distributed.Communicator):
            raise TypeError(f"comm must be a diagnet.distributed.Communicator or None; got "
                            f"{type(comm).__name__}")
        micro_batch = getattr(train_loader, "micro_batch", None)
        if micro_batch is not None:
            micro_batch = checks.positive_int("train_loader.micro_batch", micro_batch)
        self.ranks = ParallelRun(comm, optimizer, controller, train_loader, eval_loader,
                                 micro_batch=micro_batch is not None)
        self.micro = (None if micro_batch is None
                      else MicroBatchStep(micro_batch, optimizer, controller, comm))
        self.model, self.optimizer, self.train_loader = model, optimizer, train_loader
        self.loss_fn = loss_fn if loss_fn is not None else cross_entropy
        self.eval_loader, self.eval_fn = eval_loader, eval_fn
        self.scheduler, self.scheduler_interval = scheduler, scheduler_interval
        self.controller = controller
        self.epochs = checks.int_at_least("epochs", epochs, 1)
        self.checkpoint_every = checks.int_at_least("checkpoint_every", checkpoint_every, 0)
        self.best_metric, self.best_mode = best_metric, best_mode
        self.seed = checks.int_at_least("seed", seed, 0)
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
        self._bars = ProgressBars(self.progress and self.ranks.is_main, self.epochs,
                                  min(st.epoch, self.epochs))
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
                                    "checkpoint": LAST_NAME if existing(self.last_path)
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
            last_checkpoint=existing(self.last_path),
            best_checkpoint=existing(self.best_path), exact=st.exact)

    # ------------------------------------------------------------------ start / resume
    def _start_fresh(self):
        main, comm = self.ranks.is_main, self.ranks.comm
        # rank 0 alone looks at out_dir; a refusal there stops every rank
        distributed.agree(lambda: clear_previous_run(self.out_dir, self.overwrite)
                          if main else None, comm)
        _random.manual_seed(self.seed)
        if self.ranks.parallel:  # every rank starts from rank 0's model, optimizer, structure
            distributed.broadcast_state(self.model, self.optimizer, self.controller, comm)
        loader = self.train_loader.describe() if hasattr(self.train_loader, "describe") else {}
        self.state = TrainerState(seed=self.seed, loader=loader, best_metric=self.best_metric,
                                  best_mode=self.best_mode)
        self.log = RunLog.create(self.log_path) if main else NullLog()
        run = describe_run(
            seed=self.seed, config=self.config, model=self.model, optimizer=self.optimizer,
            scheduler=self.scheduler, scheduler_interval=self.scheduler_interval,
            controller=self.controller, loader=self.train_loader, epochs=self.epochs,
            settings={"eval": self.eval_loader is not None or self.eval_fn is not None,
                      "checkpoint_every": self.checkpoint_every,
                      "best_metric": self.best_metric,
                      "best_mode": self.best_mode if self.best_metric else None,
                      "world_size": comm.size})
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
        objects = {"model": self.model, "optimizer": self.optimizer,
                   "scheduler": self.scheduler, **self._components()}

        def check():  # on every rank (each reads the files); a refusal anywhere stops all
            saved = load(path, rng=False)  # read and verified; nothing assigned
            checked = check_resume(path, saved, objects, self.best_metric, self.best_mode,
                                   self.log_path)
            return saved, checked, extend_schedule(path, saved, checked[0], self.scheduler)

        saved, (state, log_bytes, log_sha), schedule = distributed.agree(check, self.ranks.comm)
        # diagnet.load validates every component against its object before assigning any
        load(saved, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
             rng=True, **self._components())
        if self.config is not None and self.config != saved.config:
            warnings.warn(f"resuming {path}: the config given differs from the checkpoint's; "
                          "the checkpoint's is kept (it is the run's)", stacklevel=3)
        self.config, self.seed = saved.config, state.seed
        self.log = (RunLog.resume(self.log_path, log_bytes, log_sha) if self.ranks.is_main
                    else NullLog())
        self.state = state
        if schedule is None:
            return None
        schedule["lr"] = self.optimizer.param_groups[0]["lr"]
        self.log.write({**schedule, "time": _now()})
        old, new = schedule[self.scheduler.length_key]
        return (f"Resumed at epoch {state.epoch}: the learning rate schedule takes this run's "
                f"length ({schedule['scheduler']} {self.scheduler.length_key} {old} -> {new}); "
                f"lr {schedule['lr']:.4g} now.")

    # ------------------------------------------------------------------ consistency points
    def _safe_point(self, check_interrupt=True):
        """Mark the current state as consistent: an interrupt before the next update is undone
        back to here. Then stop if Ctrl-C was pressed."""
        self._rng_mark = _random.get_state()
        if check_interrupt and self.ranks.any_stop(self._interrupt.requested):
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
                self._log_events(c.start_epoch(st.epoch), c)
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
        if self.micro is None:
            output = self.model(*inputs)
            loss = self.loss_fn(output, target)
            # One read-back from the device per step (loss and correct count in one
            # transfer): it waits for the GPU, but the NaN check and the progress bar need
            # the number.
            numbers = (*step_numbers(loss, output, target), batch_samples(target),
                       target.size)
        else:  # forward and backward of every micro-batch (one read-back each)
            numbers = self.micro.forward_backward(self.model, self.loss_fn, inputs, target)
        # With several ranks, one small allreduce makes them the global batch's numbers.
        value, samples, correct, labels, nonfinite, stop = self.ranks.step_numbers(
            *numbers, self._interrupt.requested)
        if stop:  # a Ctrl-C on some rank: every rank stops here, before the update
            raise KeyboardInterrupt
        if nonfinite:
            raise NonFiniteLossError(st.epoch, st.step, value)
        if self.micro is None:
            self.optimizer.zero_grad()
            loss.backward()
            self.ranks.average_gradients()
        else:
            self.micro.reduce()
        self._begin_update()
        self.optimizer.step()
        if self.scheduler is not None and self.scheduler_interval == "step":
            self.scheduler.step()
        if c is not None:
            self._log_events(c.after_step(st.step), c)
        st.totals.add(value, samples, correct, labels)
        st.step += 1
        st.batch += 1
        # with several ranks the next step's allreduce (or the epoch's end) checks for Ctrl-C
        self._safe_point(check_interrupt=not self.ranks.parallel)
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
        self.ranks.barrier()  # the checkpoints are there for every rank when fit returns
        self._bars.end_epoch(metrics)
        self._safe_point()

    def _evaluate(self):
        """The eval metrics of the epoch (eval_loader's, then eval_fn's)."""
        out = {}
        if self.eval_loader is not None:
            if callable(getattr(self.eval_loader, "set_epoch", None)):
                self.eval_loader.set_epoch(self.state.epoch)  # a shuffled one: a fixed order
            totals = evaluation_totals(self.model, self.eval_loader, self.loss_fn)
            out.update({f"eval_{k}": v for k, v in
                        totals_metrics(self.ranks.eval_totals(totals)).items()})
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
                out[str(key)] = metric_value(key, value)
        return out

    def _controller_metrics(self):
        return jsonable(self.controller.metrics(), "controller.metrics()")

    def _log_events(self, events, controller):
        for ev in events or ():
            if not isinstance(ev, dict):
                raise TypeError(f"controller events must be dicts (see diagnet.dst.event); got "
                                f"{type(ev).__name__}")
            self.log.write(ev)
        if events:  # the structure changed: it must have changed alike on every rank
            self.ranks.check_structure(controller)

    # ------------------------------------------------------------------ saving
    def _save(self, name):
        path = os.path.join(self.out_dir, name)
        if not self.ranks.is_main:
            return path
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
        self.ranks.barrier()
        self.log.write({"event": "interrupted", "epoch": st.epoch, "batch": st.batch,
                        "step": st.step, "checkpoint": LAST_NAME, "exact": exact,
                        "time": _now()})
        self._bars.write(f"Saved {self.last_path}; resume with {self.resume_hint}.")
