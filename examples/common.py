"""Pieces the MNIST examples share: data, the sparse-layer choice, the summary, the plots."""

from __future__ import annotations

import numpy as np

import diagnet as dn
from diagnet import nn
from diagnet.data import ArrayDataset, DataLoader
from diagnet.dst import DynaDiagLinear

#: ``--method`` -> the `diagnet.dst.sparsify` kind, for diagonal and unstructured layers
KINDS = {
    ("diag", "static"): "diag", ("diag", "dynadiag"): "dynadiag",
    ("diag", "set"): "diag_set", ("diag", "rigl"): "diag_rigl",
    ("unstructured", "static"): "unstructured", ("unstructured", "set"): "unstructured_set",
    ("unstructured", "rigl"): "unstructured_rigl",
}


def add_common_flags(parser, epochs, lr, batch_size, out):
    """The flags both examples take."""
    parser.add_argument("--linear", choices=("dense", "diag", "unstructured"), default="diag",
                        help="layer type of the sparse layers (default: diag)")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--method", choices=("dynadiag", "rigl", "set", "static"),
                        default="dynadiag", help="how the sparse structure is trained")
    parser.add_argument("--mode", choices=("sparse", "reference"), default="sparse",
                        help="DynaDiag storage mode (default: sparse)")
    parser.add_argument("--schedule", default="cosine",
                        help="DynaDiag temperature schedule: constant, linear, cosine, "
                             "exponential, step, warmup_cosine, cyclic")
    parser.add_argument("--t-start", type=float, default=5.0)
    parser.add_argument("--t-end", type=float, default=0.5)
    parser.add_argument("--freeze-epoch", type=int, default=3,
                        help="DynaDiag: freeze to the hard top-K at this epoch")
    parser.add_argument("--swap-every", type=int, default=200,
                        help="DynaDiag sparse mode: steps between swaps")
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: best available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=out, help="output folder (log, checkpoints, plots)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--data-root", default=None, help="MNIST cache folder")
    parser.add_argument("--smoke", action="store_true",
                        help="a short run on a small synthetic MNIST-shaped subset (tests)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def mnist_loaders(args, flatten, device):
    """Train and test loaders of normalised MNIST (or a synthetic stand-in with ``--smoke``)."""
    if args.smoke:
        rng = np.random.default_rng(args.seed)
        x = rng.standard_normal((384, 784)).astype(np.float32)
        y = (np.abs(x[:, :10]).argmax(1)).astype(np.int64)  # learnable labels
        xtr, ytr, xte, yte = x[:256], y[:256], x[256:], y[256:]
        source = "synthetic (--smoke)"
    else:
        from diagnet.data import mnist_arrays

        progress = not args.no_progress
        xtr, ytr = mnist_arrays("train", root=args.data_root, progress=progress)
        xte, yte = mnist_arrays("test", root=args.data_root, progress=progress)
        source = "MNIST"
    if not flatten:
        xtr, xte = xtr.reshape(-1, 1, 28, 28), xte.reshape(-1, 1, 28, 28)
    train = DataLoader(ArrayDataset(xtr, ytr), batch_size=args.batch_size, shuffle=True,
                       seed=args.seed, device=device)
    test = DataLoader(ArrayDataset(xte, yte), batch_size=1000, device=device)
    return train, test, f"{source}: {len(xtr)} train / {len(xte)} test images"


def controller_options(args, steps_per_epoch):
    """The controller's arguments for ``--method`` (see `diagnet.dst.sparsify`)."""
    if args.method == "dynadiag":
        from diagnet.dst import TemperatureSchedule

        span = max(1, args.freeze_epoch) if args.freeze_epoch > 0 else args.epochs
        options = dict(schedule=TemperatureSchedule(args.schedule, span=span,
                                                    t_start=args.t_start, t_end=args.t_end),
                       freeze_at=args.freeze_epoch if 0 < args.freeze_epoch < args.epochs
                       else None, mode=args.mode)
        if args.mode == "sparse":
            options["swap_every"] = args.swap_every
        return options
    if args.method in ("set", "rigl"):
        total = steps_per_epoch * args.epochs
        return dict(delta_t=max(1, min(100, total // 10)), t_end=max(2, int(0.75 * total)))
    return {}


def structure_config(model):
    """``initial_offsets`` and ``diagonals`` of every diagonal layer, for the log's config
    (the offset heatmap replays the log from there, `diagnet.plots`)."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.DiagLinear)}
    return {"initial_offsets": {n: m.offsets.numpy().tolist() for n, m in layers.items()},
            "diagonals": {n: m.P for n, m in layers.items()}}


def summary_table(model, log_records, test_accuracy):
    """The closing table: accuracy, realised sparsity per layer, time per epoch."""
    epochs = [r for r in log_records if r["event"] == "epoch"]
    times = [r["time_s"] for r in epochs]
    lines = [f"test accuracy: {100 * test_accuracy:.2f}%",
             f"time per epoch: {np.mean(times):.1f} s (median {np.median(times):.1f} s, "
             f"{len(times)} epochs)", ""]
    layers = [(name, m) for name, m in model.named_modules() if hasattr(m, "weight_stats")]
    w = max([len("layer")] + [len(name) for name, _ in layers])
    lines.append(f"{'layer':<{w}} {'type':<23} {'shape':>9} {'stored':>8} {'sparsity':>9}")
    for name, m in layers:
        stored, dense = m.weight_stats()
        kind = type(m).__name__ + (" (frozen)" if isinstance(m, DynaDiagLinear) and m.frozen
                                   else "")
        lines.append(f"{name:<{w}} {kind:<23} {f'{m.out_features}x{m.in_features}':>9} "
                     f"{stored:>8,} {1 - stored / dense:>9.2%}")
    s = nn.summary(model)
    lines.append(f"{'total':<{w}} {'':<23} {'':>9} {s.params:>8,} {s.weight_sparsity:>9.2%}"
                 "   (all parameters; sparsity of all weights)")
    return "\n".join(lines)


def write_plots(log_path, out_dir):
    """Learning curves and the offsets heatmap, when matplotlib is there (say so once if not)."""
    from diagnet import plots

    if not plots.matplotlib_available():
        print('plots skipped: matplotlib is not installed (pip install "diagnet[plot]")')
        return []
    written = [plots.plot_learning_curves(log_path, f"{out_dir}/learning_curves.png")]
    heat = plots.plot_diagonal_activity(log_path, f"{out_dir}/diagonal_activity.png")
    return written + ([heat] if heat else [])


def fit_and_report(trainer, model, args, started):
    """Train (or resume), then print the summary table and write the plots; the exit code."""
    import time

    from diagnet.train import read_log

    result = trainer.fit(resume=True if args.resume else None)
    records = read_log(result.log_path)
    print()
    print(summary_table(model, records, result.metrics.get("eval_accuracy", 0.0)))
    plots = write_plots(result.log_path, args.out)
    print(f"\nwrote {result.log_path}, {result.last_checkpoint}"
          + (f", {result.best_checkpoint}" if result.best_checkpoint else "")
          + "".join(f", {p}" for p in plots))
    print(f"total time {time.perf_counter() - started:.0f} s (data preparation included)")
    return 0 if not result.interrupted else 130


def pick_device(name):
    return dn.backend.resolve_device(name)
