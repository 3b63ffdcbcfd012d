"""Data-parallel scaling: samples per second on 1 and N processes, bytes reduced per step.

    python bench/bench_distributed.py                 # 1 and 2 processes, MLP and ViT
    python bench/bench_distributed.py --procs 1 2 4   # on a machine with more cores
    python bench/bench_distributed.py --quick         # smoke: the MLP only, --smoke data

Throughput is what a user runs: the examples themselves, launched as ``mpiexec -n N python
examples/<example>.py --epochs E --no-progress`` into a temporary folder, each rank with one
numba thread and one BLAS thread (``NUMBA_NUM_THREADS=1``, ``OMP_NUM_THREADS=1``,
``OPENBLAS_NUM_THREADS=1``), so N processes use N cores. ``--batch-size`` is the global
batch, so every N trains the same model; samples per second are the training set's size over
the median epoch time of the run's log (``time_s``: training and evaluation of one epoch,
kernels compiled before). Check the machine's load before: on N cores, N processes only gain
when nothing else runs.

Bytes are counted, not timed: a `diagnet.distributed.GradientAverager` over the model's
parameters reduces one ordinary step's gradients (what it packs into its buckets: the stored
values only, a diagonal layer's ``K x L``), and a RigL or DynaDiag update step adds the dense
``dy.T @ x`` of every layer it updates (``m x n``), which the ranks must sum to choose the
same diagonals.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

#: (label, example, flags): the runs timed on 1 and N processes
RUNS = (
    ("MLP dense", "train_mnist_mlp.py", ["--linear", "dense", "--epochs", "3"]),
    ("MLP diagonal 90% (DynaDiag)", "train_mnist_mlp.py", ["--epochs", "3"]),
    ("ViT diagonal 90% (DynaDiag)", "train_vit_mnist.py", ["--epochs", "2"]),
)

ONE_THREAD = {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "MKL_NUM_THREADS": "1"}


def time_run(example, flags, procs, quick, one_thread=True):
    """Median epoch time (s) and training samples of one example run on ``procs`` ranks
    (``one_thread``: one numba and one BLAS thread each; else their defaults)."""
    out = tempfile.mkdtemp(prefix="bench-dist-")
    try:
        command = ["mpiexec", "-n", str(procs), sys.executable, str(ROOT / "examples" / example),
                   *flags, "--no-progress", "--out", out]
        if quick:
            command.append("--smoke")
        env = {**os.environ, **(ONE_THREAD if one_thread else {})}
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
        records = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    start = records[0]
    assert start["world_size"] == procs, start["world_size"]
    times = [r["time_s"] for r in records if r["event"] == "epoch"]
    # the first epoch also pays for first-touch allocations: leave it out when there are more
    times = times[1:] if len(times) > 1 else times
    return statistics.median(times), start["train_loader"]["samples"]


def throughput_table(procs, quick):
    runs = RUNS[:1] if quick else RUNS
    lines = ["| model | 1 process, all cores | "
             + " | ".join(f"{n} process{'es' if n > 1 else ''}" for n in procs)
             + f" | {procs[-1]} vs 1 process | {procs[-1]} vs all cores |",
             "|---|" + "---|" * (len(procs) + 3)]
    for label, example, flags in runs:
        seconds, samples = time_run(example, flags, 1, quick, one_thread=False)
        threaded = samples / seconds
        print(f"  {label}, 1 process, default threads: {seconds:.2f} s per epoch",
              file=sys.stderr)
        rates = []
        for n in procs:
            seconds, samples = time_run(example, flags, n, quick)
            rates.append(samples / seconds)
            print(f"  {label}, {n} process(es): {seconds:.2f} s per epoch", file=sys.stderr)
        cells = " | ".join(f"{r:,.0f}" for r in [threaded] + rates)
        lines.append(f"| {label} | {cells} | {rates[-1] / rates[0]:.2f}x | "
                     f"{rates[-1] / threaded:.2f}x |")
    return "\n".join(lines)


def _mlp(linear):
    from diagnet.dst import sparsify
    from diagnet.models import MLP

    model = MLP(784, [256, 256], 10, rng=0)
    if linear == "dense":
        return model, None
    controller = sparsify(model, "diag", 0.9, method=linear, dense=("head",),
                          count_dense=False, rng=0, **_options(linear))
    return model, controller


def _vit(linear):
    from diagnet.dst import sparsify
    from diagnet.models import ViT

    model = ViT(image_size=28, patch_size=7, in_channels=1, num_classes=10, dim=64, depth=4,
                heads=4, mlp_ratio=2, rng=0)
    if linear == "dense":
        return model, None
    controller = sparsify(model, "diag", 0.9, method=linear, dense=("patch_embed.proj", "head"),
                          count_dense=False, rng=0, **_options(linear))
    return model, controller


def _options(method):
    if method == "rigl":
        return dict(delta_t=100, t_end=1000)
    from diagnet.dst import TemperatureSchedule

    return dict(schedule=TemperatureSchedule("cosine", span=3, t_start=5.0, t_end=0.5),
                freeze_at=3, swap_every=200, mode="sparse")


def step_bytes(build, linear, frozen=False):
    """Bytes one ordinary step reduces (gradients) and the extra of an update step; a
    DynaDiag model while soft (its pool and alpha too) or ``frozen``."""
    import diagnet as dn
    from diagnet.distributed import GradientAverager, SingleProcess

    model, controller = build(linear)
    if frozen:  # the structure a DynaDiag run trains on after its freeze
        for layer in controller.layers.values():
            layer.freeze()
    params = list(model.parameters())
    for p in params:
        p.grad = dn.Tensor.from_array(np.zeros_like(p.data))
    averager = GradientAverager(params, SingleProcess())
    averager.reduce()
    ordinary = averager.stats["last_bytes"]
    update = 0
    if controller is not None and linear in ("rigl", "dynadiag") and not frozen:
        update = sum(l.out_features * l.in_features * 4 for l in controller.layers.values())
    return ordinary, update, sum(p.size for p in params)


def bytes_table():
    lines = ["| model | parameters | bytes per ordinary step | extra bytes per update step |",
             "|---|---|---|---|"]
    for name, build in (("MLP 784-256-256-10", _mlp), ("ViT (dim 64, depth 4)", _vit)):
        dense, _, dense_params = step_bytes(build, "dense")
        lines.append(f"| {name} dense | {dense_params:,} | {dense:,} | - |")
        for label, method, frozen in (("RigL", "rigl", False),
                                      ("DynaDiag while soft", "dynadiag", False),
                                      ("DynaDiag frozen", "dynadiag", True)):
            ordinary, update, params = step_bytes(build, method, frozen)
            lines.append(f"| {name} diagonal 90% ({label}) | {params:,} | {ordinary:,} "
                         f"({ordinary / dense:.0%} of dense) | {update:,} |" if update else
                         f"| {name} diagonal 90% ({label}) | {params:,} | {ordinary:,} "
                         f"({ordinary / dense:.0%} of dense) | - |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--quick", action="store_true", help="the MLP only, on --smoke data")
    args = parser.parse_args(argv)
    if shutil.which("mpiexec") is None:
        sys.exit('mpiexec not found: pip install -e ".[distributed]"')
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores\n")
    print("Samples per second (training epoch + evaluation; the global batch as in the "
          "example; one numba and one BLAS thread per process, except 'all cores': one "
          "process with their default thread counts):\n")
    print(throughput_table(args.procs, args.quick))
    print(f"\nload average after: {os.getloadavg()[0]:.2f}\n")
    print("Bytes reduced across ranks per training step (float32):\n")
    print(bytes_table())


if __name__ == "__main__":
    main()
