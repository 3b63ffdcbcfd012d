"""Pieces the MNIST examples share: the flags and their checks, data, the sparse-layer
choice, the kernel warm-up, the summary, the plots, and data-parallel runs.

Data parallel: ``mpiexec -n N python examples/<example>.py ...`` runs N ranks of the same
command (`parse_args` calls `diagnet.distributed.init`). ``--batch-size`` stays the global
batch: each rank takes its share of every batch (sharded loaders), so the run trains the
model that one process would. Rank 0 downloads MNIST while the others wait, and alone
prints and writes files."""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys

import numpy as np
from numba.core import event

import diagnet as dn
from diagnet import nn
from diagnet.data import ArrayDataset, DataLoader, RandomShift
from diagnet.data.mnist import MNIST_MEAN, MNIST_STD
from diagnet.dst import LAYERS, METHODS, RECIPES, SCHEDULES, DynaDiagLinear, find_recipe
from diagnet.dst.temperature import MAY_RISE
from diagnet.train.trainer import BEST_NAME, LAST_NAME, LOG_NAME

#: flags that a resumed run may change: where it writes and reads, how long it runs, where
#: it computes; every other flag is the run's own (taken from its checkpoint on ``--resume``)
RUN_LOCAL_FLAGS = ("out", "resume", "overwrite", "epochs", "device", "data_root", "no_progress")

#: flags added after runs were saved, with the value those runs trained with: ``--resume`` of a
#: run whose configuration lacks one takes this value, not the flag's new default
ADDED_FLAGS = {"label_smoothing": 0.0, "dtype": "float32", "shift": 0, "micro_batch": None}

#: what ``--resume`` tells the user after Ctrl-C, in place of the library's ``fit(resume=...)``
RESUME_HINT = "the same command plus --resume"


# ----------------------------------------------------------------------------- flags


def checked(convert, accept, expected):
    """An argparse ``type``: ``convert(text)`` when ``accept`` takes it, else the one-line error
    "expected <expected>, got '<text>'" (argparse adds the flag's name)."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


positive_int = checked(int, lambda v: v >= 1, "a positive integer")
non_negative_int = checked(int, lambda v: v >= 0, "a non-negative integer")
positive_number = checked(float, lambda v: math.isfinite(v) and v > 0, "a positive number")
non_negative_number = checked(float, lambda v: math.isfinite(v) and v >= 0,
                              "a non-negative number")
fraction = checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def add_common_flags(parser, epochs, lr, batch_size, out):
    """The flags both examples take."""
    parser.add_argument("--linear", choices=("dense", *LAYERS), default="diag",
                        help="layer type of the sparse layers (default: diag)")
    parser.add_argument("--sparsity", type=fraction, default=0.9)
    parser.add_argument("--method", choices=METHODS, default="dynadiag",
                        help="how the sparse structure is trained (see diagnet.dst.RECIPES)")
    parser.add_argument("--mode", choices=("sparse", "reference"), default="sparse",
                        help="DynaDiag storage mode (default: sparse)")
    parser.add_argument("--schedule", choices=SCHEDULES, default="cosine",
                        help="DynaDiag temperature schedule (default: cosine)")
    parser.add_argument("--t-start", type=positive_number, default=5.0)
    parser.add_argument("--t-end", type=positive_number, default=0.5,
                        help="may exceed --t-start only with --schedule constant or linear")
    parser.add_argument("--freeze-epoch", type=non_negative_int, default=3,
                        help="DynaDiag: freeze to the hard top-K at the start of this epoch "
                             "(0-based; at the latest the last epoch, so the run ends at "
                             "--sparsity)")
    parser.add_argument("--swap-every", type=positive_int, default=200,
                        help="DynaDiag sparse mode: steps between swaps")
    parser.add_argument("--epochs", type=positive_int, default=epochs)
    parser.add_argument("--batch-size", type=positive_int, default=batch_size)
    parser.add_argument("--micro-batch", type=positive_int, default=None,
                        help="train each batch as micro-batches of this many samples and sum "
                             "their gradients in one fixed order: the same result, bit for "
                             "bit, on 1 or N processes (with one thread per process, e.g. "
                             "NUMBA_NUM_THREADS=1; see docs/distributed.md)")
    parser.add_argument("--lr", type=non_negative_number, default=lr)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: best available)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="parameters and images (float64: slower, but runs on 1 and N "
                             "processes then agree far longer; see docs/distributed.md)")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--out", default=out, help="output folder (log, checkpoints, plots)")
    run = parser.add_mutually_exclusive_group()
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out, with its own flags")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the run in --out (without it, an earlier run is kept)")
    parser.add_argument("--data-root", default=None, help="MNIST cache folder")
    parser.add_argument("--smoke", action="store_true",
                        help="a short run on a small synthetic MNIST-shaped subset (tests)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def parse_args(parser, argv, example, smoke):
    """Parse the command line of ``example`` and check what argparse alone cannot.

    Every problem ends in one ``parser.error`` line (exit status 2) before anything is read
    or written. A fresh run refuses an ``--out`` that holds an earlier run unless
    ``--overwrite`` is given; ``--resume`` takes the flags of the run in ``--out`` (from its
    last checkpoint) as defaults and refuses given flags that contradict them. With
    ``--smoke`` the run is 1 epoch long (2 when resumed) and ``smoke`` (a dict of flags,
    small layer sizes) overrides the flags.

    Adds ``args.planned_epochs``: the ``--epochs`` the run started with. The structure
    schedules (SET/RigL updates, DynaDiag's freeze) follow it, so a resumed run that adds
    epochs keeps them.

    Under ``mpiexec`` it first joins the job's ranks (`diagnet.distributed.init`) and
    silences the standard output of every rank but 0 (errors still reach stderr).
    """
    start_ranks()
    args = parser.parse_args(argv)
    saved = {}
    if args.resume:
        args, saved = _resume_flags(parser, argv, args, example)
    else:
        _keep_earlier_run(parser, args)
    takes = [r.method for r in RECIPES if r.layer == args.linear]
    if args.linear != "dense" and args.method not in takes:
        needs = " or ".join(r.layer for r in RECIPES if r.method == args.method)
        parser.error(f"--method {args.method} needs --linear {needs} (pick {', '.join(takes)})")
    dynadiag = args.linear == "diag" and args.method == "dynadiag"
    if dynadiag and args.t_start < args.t_end and args.schedule not in MAY_RISE:
        parser.error(f"--t-start {args.t_start} is below --t-end {args.t_end}: --schedule "
                     f"{args.schedule} only falls; a temperature that rises needs --schedule "
                     f"{' or '.join(MAY_RISE)}")
    if args.smoke:
        args.epochs = min(args.epochs, 2 if args.resume else 1)
        vars(args).update(smoke)
    args.planned_epochs = saved.get("epochs", args.epochs)
    return args


def run_config(args, example):
    """The run's configuration, for its log and checkpoints: the example, the recipe's name
    (``kind``: see `diagnet.dst.RECIPES`; ``"dense"`` for dense layers) and the flags (all but
    ``--resume``/``--overwrite``). The layers' structure is the controller's, in the log.

    None with ``--resume``: the run keeps the configuration it started with (`parse_args`
    checked the flags against it; only run-local ones such as ``--epochs`` may differ).
    """
    if args.resume:
        return None
    flags = {k: v for k, v in vars(args).items()
             if k not in ("resume", "overwrite", "planned_epochs")}
    kind = find_recipe(args.linear, args.method).name if args.linear != "dense" else "dense"
    return {"example": example, "kind": kind, **flags}


def _keep_earlier_run(parser, args):
    earlier = [name for name in (LOG_NAME, LAST_NAME, BEST_NAME)
               if os.path.exists(os.path.join(args.out, name))]
    if earlier and not args.overwrite:
        parser.error(f"{args.out} holds an earlier run ({', '.join(earlier)}): continue it with "
                     "--resume, or replace it with --overwrite")


def _resume_flags(parser, argv, args, example):
    """Parse ``argv`` again with the flags saved in the run's checkpoint as the defaults;
    returns the new ``args`` and the saved configuration."""
    path = os.path.join(args.out, LAST_NAME)
    if not os.path.exists(path):
        parser.error(f"--resume: there is no run to resume in {args.out} (no {LAST_NAME}); "
                     "drop --resume to start one")
    try:
        config = dn.load(path, rng=False).config
    except (OSError, ValueError) as exc:
        parser.error(f"--resume: cannot read {path}: {exc}")
    config = config if isinstance(config, dict) else {}
    if config.get("example", example) != example:
        parser.error(f"--resume: the run in {args.out} is one of {config['example']}.py, not "
                     f"of {example}.py")
    saved = {k: v for k, v in config.items() if k in vars(args) and k not in RUN_LOCAL_FLAGS}
    saved.update({k: v for k, v in ADDED_FLAGS.items() if k in vars(args) and k not in config})
    parser.set_defaults(**saved)
    args = parser.parse_args(argv)
    differ = [f"{_flag(k, getattr(args, k))} (the run in {args.out} has {_value(k, v)})"
              for k, v in saved.items() if getattr(args, k) != v]
    if differ:
        parser.error(f"--resume: {', '.join(differ)}: drop them to continue the run, or drop "
                     "--resume to start a new one (another --out, or --overwrite)")
    return args, config


def _value(dest, value):
    """A flag's value as typed: ``[32, 32]`` -> ``32 32``; a switch by its name or ``no``."""
    if isinstance(value, bool):
        return f"--{dest.replace('_', '-')}" if value else f"no --{dest.replace('_', '-')}"
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _flag(dest, value):
    """The flag as typed on the command line: ``--method rigl``, ``--smoke``."""
    shown = _value(dest, value)
    return shown if isinstance(value, bool) else f"--{dest.replace('_', '-')} {shown}"


def start_ranks():
    """Join the ranks of an ``mpiexec`` job (one process otherwise); ranks other than 0 print
    nothing to the standard output. Returns the communicator."""
    comm = dn.distributed.init()
    if not comm.is_main:
        sys.stdout = open(os.devnull, "w")
    return comm


def pick_device(parser, name):
    """The device of ``--device`` (None: the default); a bad name is a ``parser.error``.

    With several ranks on the GPU, each rank takes the GPU of its local rank (one rank per
    GPU, as NCCL requires)."""
    try:
        device = dn.backend.resolve_device(name)
    except (ValueError, RuntimeError) as exc:
        where = (f"--device {name}" if name is not None
                 else f"{dn.backend.ENV_DEVICE}={os.environ.get(dn.backend.ENV_DEVICE)}")
        parser.error(f"{where}: {exc}")
    if device == "cuda" and dn.distributed.world_size() > 1:
        dn.distributed.use_local_gpu()
    return device


# ----------------------------------------------------------------------------- the run


def mnist_loaders(args, flatten, device):
    """Train and test loaders of normalised MNIST (or a synthetic stand-in with ``--smoke``)."""
    if args.smoke:
        rng = np.random.default_rng(args.seed)
        x = rng.standard_normal((384, 784)).astype(args.dtype)
        y = (np.abs(x[:, :10]).argmax(1)).astype(np.int64)  # learnable labels
        xtr, ytr, xte, yte = x[:256], y[:256], x[256:], y[256:]
        source = "synthetic (--smoke)"
    else:
        from diagnet.data import mnist_arrays

        progress = not args.no_progress and dn.distributed.is_main()
        with dn.distributed.main_first():  # rank 0 downloads; the others read its cache
            xtr, ytr = mnist_arrays("train", root=args.data_root, dtype=args.dtype,
                                    progress=progress)
            xte, yte = mnist_arrays("test", root=args.data_root, dtype=args.dtype,
                                    progress=progress)
        source = "MNIST"
    if not flatten:
        xtr, xte = xtr.reshape(-1, 1, 28, 28), xte.reshape(-1, 1, 28, 28)
    augment = None
    if getattr(args, "shift", 0):  # training images only; --shift needs flatten=False
        # pixels shifted in are black: a black pixel (0) is -mean/std once normalised
        black = 0.0 if args.smoke else -MNIST_MEAN / MNIST_STD
        augment = RandomShift(args.shift, fill=black)
    # every rank takes its share of each global batch: the union is one process's batch
    shard = dict(rank=dn.distributed.rank(), world_size=dn.distributed.world_size())
    train = DataLoader(ArrayDataset(xtr, ytr), batch_size=args.batch_size, shuffle=True,
                       seed=args.seed, device=device, augment=augment,
                       micro_batch=getattr(args, "micro_batch", None), **shard)
    test = DataLoader(ArrayDataset(xte, yte), batch_size=1000, device=device, **shard)
    return train, test, f"{source}: {len(xtr)} train / {len(xte)} test images"


def freeze_epoch(args):
    """The epoch DynaDiag freezes at: ``--freeze-epoch``, but at the latest the last one.

    A layer that never freezes keeps its candidate pool besides its ``K`` diagonals, so the
    run would end short of ``--sparsity``; freezing at the start of the last epoch still
    trains that epoch on the final structure. Prints one line when it moves the freeze.
    """
    last = args.planned_epochs - 1
    if args.freeze_epoch <= last:
        return args.freeze_epoch
    print(f"--freeze-epoch {args.freeze_epoch} is not before --epochs {args.planned_epochs}: the "
          f"layers freeze at the start of the last epoch (epoch {last}), so the run ends at "
          "--sparsity")
    return last


def controller_options(args, steps_per_epoch):
    """The controller's arguments for ``--method`` (see `diagnet.dst.sparsify`)."""
    if args.method == "dynadiag":
        from diagnet.dst import TemperatureSchedule

        freeze = freeze_epoch(args)
        # the temperature spans the epochs before the freeze, as in the reference
        options = dict(schedule=TemperatureSchedule(args.schedule, span=max(1, freeze),
                                                    t_start=args.t_start, t_end=args.t_end),
                       freeze_at=freeze, mode=args.mode)
        if args.mode == "sparse":
            options["swap_every"] = args.swap_every
        return options
    if args.method in ("set", "rigl"):
        total = steps_per_epoch * args.planned_epochs
        return dict(delta_t=max(1, min(100, total // 10)), t_end=max(2, int(0.75 * total)))
    return {}


class _CompileNotice(event.Listener):
    """Prints "compiling kernels" at the first numba compilation it hears of (a kernel found
    in the disk cache is loaded without compiling: nothing is printed)."""

    def __init__(self):
        self.shown = False

    def on_start(self, ev):
        if not self.shown:
            print("compiling kernels (first run only: they are cached on disk) ...", flush=True)
            self.shown = True

    def on_end(self, ev):
        pass


def compile_kernels(model, optimizer, train_loader, eval_loader):
    """Run one training step and one evaluation batch on throwaway copies of ``model`` and
    ``optimizer``, so that the kernels compile here and not in the first timed epoch.

    numba compiles a CPU kernel at its first call and caches it on disk: a first run spends
    tens of seconds there, which would count in the first epoch's time and make the progress
    bar's estimate hours long. The inputs are zeros of the loaders' batch shapes (a kernel
    compiles per dtype and layer width, whatever the values). Prints one line when something
    compiles.
    """
    model, optimizer = copy.deepcopy((model, optimizer))
    with event.install_listener("numba:compile", _CompileNotice()):
        inputs, target = _zero_batch(train_loader)
        loss = dn.cross_entropy(model(inputs), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.eval()
        with dn.no_grad():
            model(_zero_batch(eval_loader)[0])


def _zero_batch(loader):
    """Zero inputs and labels shaped like ``loader``'s first batch, on its device."""
    x, y = loader.dataset[0]
    rows = min(loader.batch_size, len(loader.dataset))
    inputs = np.zeros((rows, *np.shape(x)), dtype=np.asarray(x).dtype)
    labels = np.zeros((rows, *np.shape(y)), dtype=np.asarray(y).dtype)
    return (dn.tensor(inputs, device=loader.device), dn.tensor(labels, device=loader.device))


def summary_table(model, log_records, test_accuracy):
    """The closing table: accuracy, time per epoch, realised sparsity per layer (what the
    layers store now: a DynaDiag layer that has not frozen yet also stores its candidates)."""
    times = [r["time_s"] for r in log_records if r["event"] == "epoch"]
    lines = [f"test accuracy: {100 * test_accuracy:.2f}%",
             f"processes: {dn.distributed.world_size()}",
             f"time per epoch: {np.mean(times):.1f} s (median {np.median(times):.1f} s, "
             f"{len(times)} epochs)" if times else "time per epoch: no epoch completed", ""]
    layers = [(name, m) for name, m in model.named_modules() if hasattr(m, "weight_stats")]
    w = max([len("layer")] + [len(name) for name, _ in layers])
    lines.append(f"{'layer':<{w}} {'type':<23} {'shape':>9} {'stored':>8} {'sparsity':>9}")
    soft = []
    for name, m in layers:
        stored, dense = m.weight_stats()
        kind = type(m).__name__
        if isinstance(m, DynaDiagLinear):
            kind += " (frozen)" if m.frozen else " (soft)"
            soft += [] if m.frozen else [name]
        lines.append(f"{name:<{w}} {kind:<23} {f'{m.out_features}x{m.in_features}':>9} "
                     f"{stored:>8,} {1 - stored / dense:>9.2%}")
    s = nn.summary(model)
    lines.append(f"{'total':<{w}} {'':<23} {'':>9} {s.params:>8,} {s.weight_sparsity:>9.2%}"
                 "   (all parameters; sparsity of all weights)")
    if soft:
        lines.append(f"not frozen yet: {', '.join(soft)} store candidate diagonals besides "
                     "their K, so they are less sparse than --sparsity until they freeze")
    return "\n".join(lines)


def write_plots(log_path, out_dir, epochs=1):
    """Learning curves and the offsets heatmap, when matplotlib is there and ``epochs`` (the
    number completed) is not 0; says once why there are none."""
    from diagnet import plots

    if not plots.matplotlib_available():
        print('plots skipped: matplotlib is not installed (pip install "diagnet[plot]")')
        return []
    if not epochs:
        print("plots skipped: no epoch completed")
        return []
    written = [plots.plot_learning_curves(log_path, f"{out_dir}/learning_curves.png")]
    heat = plots.plot_diagonal_activity(log_path, f"{out_dir}/diagonal_activity.png")
    return written + ([heat] if heat else [])


def fit_and_report(trainer, model, args, started):
    """Train (or resume), then print the summary table and write the plots; the exit code
    (130 after Ctrl-C, with a line saying how to continue)."""
    import time

    from diagnet.train import read_log

    trainer.resume_hint = RESUME_HINT
    result = trainer.fit(resume=True if args.resume else None)
    if not dn.distributed.is_main():  # rank 0 reports and plots
        return 130 if result.interrupted else 0
    records = read_log(result.log_path)
    print()
    print(summary_table(model, records, result.metrics.get("eval_accuracy", 0.0)))
    plots = write_plots(result.log_path, args.out, result.epochs_completed)
    print(f"\nwrote {result.log_path}, {result.last_checkpoint}"
          + (f", {result.best_checkpoint}" if result.best_checkpoint else "")
          + "".join(f", {p}" for p in plots))
    print(f"total time {time.perf_counter() - started:.0f} s (data preparation included)")
    if result.interrupted:
        print(f"interrupted: to continue, run {RESUME_HINT}")
        return 130
    return 0
