"""Time one training step of a DynaDiag layer against its baselines; report into the docs.

    python bench/bench_dst_step.py                     # CPU -> section of docs/benchmarks.md
    python bench/bench_dst_step.py --quick --steps 3   # a smoke run, printed only
    python bench/bench_dst_step.py --device cuda       # GPU -> section of docs/gpu-benchmarks.md

One layer of 768 x 768 (float32), batch 256, target sparsity 0.9, one training step =
forward, ``loss = mean((y - t) ** 2)`` (``t`` the output of a fixed dense random layer, so
that diagonals outside the stored set have gradient to offer), backward (input gradient
included, as for a hidden layer), ``Adam.step()``. Variants, timed in one process
on the same input:

* **dynadiag sparse**: `DynaDiagLinear` ``mode="sparse"``, pool 0.25: ``K + ceil(K/4)``
  diagonals stored and computed, the soft top-k over all ``P`` (no swap in these steps);
* **dynadiag reference**: ``mode="reference"``: all ``P`` diagonals stored and computed,
  the cost of the paper's code until the freeze;
* **dense**: `nn.Linear`, the dense baseline (BLAS / cuBLAS);
* **static diag**: `nn.DiagLinear` with ``K`` diagonals (what a frozen DynaDiag layer costs).

Each variant runs ``--steps`` steps per round after warm-up steps, for several rounds with the
order of the variants rotating; a step is timed alone (``perf_counter``, the GPU synchronised
before and after), and the table gives the median over all timed steps. The **swap step** is
timed separately on its own layer (a `DynaDiag` controller swapping every step): the whole
step with the gradient tap armed, and the swap itself (the all-diagonal score ``dy.T @ x``
plus `DynaDiagLinear.swap`).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "bench"):  # run from a checkout without installing; bench/reports.py
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import diagnet as dn  # noqa: E402
from diagnet import backend, nn  # noqa: E402
from diagnet.dst import DynaDiag, DynaDiagLinear  # noqa: E402
from reports import (default_output, load_average, machine, time_variants,  # noqa: E402
                     write_section)

SECTION = "bench_dst_step"
M = N = 768
BATCH = 256
SPARSITY = 0.9
POOL = 0.25


def make_variants(device, seed=0):
    """``{name: layer}``, every layer float32 on ``device``."""
    kw = dict(dtype=np.float32, device=device, rng=seed)
    return {
        "dynadiag sparse": DynaDiagLinear(N, M, sparsity=SPARSITY, pool=POOL, **kw),
        "dynadiag reference": DynaDiagLinear(N, M, sparsity=SPARSITY, mode="reference", **kw),
        "dense": nn.Linear(N, M, **kw),
        "static diag": nn.DiagLinear(N, M, sparsity=SPARSITY, **kw),
    }


def make_problem(device, seed=0):
    """The input ``x`` ``(B, n)`` and the target ``t`` ``(B, m)``, float32 on ``device``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH, N)).astype(np.float32)
    teacher = (rng.uniform(-1, 1, (M, N)) / np.sqrt(N)).astype(np.float32)
    # x requires grad: the layer is timed as a hidden layer, whose input gradient is needed
    return (dn.tensor(x, device=device, requires_grad=True),
            dn.tensor(x @ teacher.T, device=device))


def make_step(layer, x, t, device):
    """A closure running one timed training step of ``layer``; returns seconds."""
    opt = dn.optim.Adam(layer.parameters(), lr=1e-3)
    if isinstance(layer, DynaDiagLinear):
        layer.T = 0.5

    def step():
        backend.synchronize(device)
        t0 = time.perf_counter()
        diff = layer(x) - t
        loss = (diff * diff).mean()
        opt.zero_grad()
        x.grad = None
        loss.backward()
        opt.step()
        backend.synchronize(device)
        return time.perf_counter() - t0

    return step


def time_swaps(x, t, device, count, warmup):
    """Median seconds of a whole swap step and of the swap alone, on a sparse layer."""
    layer = DynaDiagLinear(N, M, sparsity=SPARSITY, pool=POOL, dtype=np.float32, device=device,
                           rng=1)
    layer.T = 0.5
    opt = dn.optim.Adam(layer.parameters(), lr=1e-3)
    ctrl = DynaDiag({"fc": layer}, swap_every=1, rng=0)
    whole, alone, moved = [], [], 0
    for i in range(warmup + count):
        backend.synchronize(device)
        t0 = time.perf_counter()
        ctrl.before_step(i)
        diff = layer(x) - t
        loss = (diff * diff).mean()
        opt.zero_grad()
        x.grad = None
        loss.backward()
        opt.step()
        backend.synchronize(device)
        t1 = time.perf_counter()
        events = ctrl.after_step(i)
        backend.synchronize(device)
        t2 = time.perf_counter()
        if i >= warmup:
            whole.append(t2 - t0)
            alone.append(t2 - t1)
            moved += sum(len(e["grown"]) for e in events)
    return float(np.median(whole)), float(np.median(alone)), moved / max(1, count)


def report(times, swap, args, command, layers, loads):
    med = {name: float(np.median(t)) * 1e3 for name, t in times.items()}
    dense = med["dense"]
    sparse = layers["dynadiag sparse"]
    P = sparse.P
    stored = {"dynadiag sparse": sparse.K, "dynadiag reference": P, "dense": P,
              "static diag": layers["static diag"].K}
    import numba

    lines = [
        "## DynaDiag training step (768 x 768, batch 256, sparsity 0.9, float32)",
        "",
        f"Generated by `{command}` on {datetime.date.today().isoformat()}.",
        "",
        f"* Machine: {machine(args.device)}; device `{args.device}`",
        f"* Python {platform.python_version()}, NumPy {np.__version__}, numba "
        f"{numba.__version__} ({numba.get_num_threads()} threads)",
        f"* One step: forward, `mean((y - t) ** 2)`, backward (with the input gradient, as "
        f"for a hidden layer), `Adam.step()`; median of "
        f"{len(next(iter(times.values())))} steps per variant ({args.rounds} rounds of "
        f"{args.steps}, order rotating, after {args.warmup} warm-up steps each).",
        f"* Load average at start / end: {loads[0]:.2f} / {loads[1]:.2f} (other processes "
        "on the machine make timings noisy)",
        f"* `K = {sparse.active_k}` active diagonals of `P = {P}`; the sparse mode stores "
        f"`K + ceil(K/4) = {sparse.K}`.",
        "",
        "| variant | diagonals stored and computed | ms / step | dense time / time |",
        "|---|---|---|---|",
    ]
    for name in times:
        lines.append(f"| {name} | {stored[name]} of {P} | {med[name]:.2f} | "
                     f"{dense / med[name]:.2f} |")
    whole, alone, moved = swap
    lines += [
        "",
        f"Swap step (sparse mode, median of {args.swaps} swaps, about {moved:.1f} diagonals "
        f"exchanged each): {whole * 1e3:.2f} ms for the whole step, of which "
        f"{alone * 1e3:.2f} ms for the swap itself (the dense score `dy.T @ x` and the "
        "exchange); an ordinary step of the same layer is in the table above.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="few steps and rounds; print the table, write nothing")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps per variant and round (default 20; 3 with --quick)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds, order rotating (default 4; 1 with --quick)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="warm-up steps per variant (default 3; 1 with --quick)")
    ap.add_argument("--swaps", type=int, default=None,
                    help="timed swap steps (default 10; 2 with --quick)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--out", default=None,
                    help="Markdown file whose section to write (default docs/benchmarks.md, "
                         "docs/gpu-benchmarks.md with --device cuda, none with --quick)")
    args = ap.parse_args(argv)
    quick = args.quick
    args.steps = args.steps or (3 if quick else 20)
    args.rounds = args.rounds or (1 if quick else 4)
    args.warmup = args.warmup or (1 if quick else 3)
    args.swaps = args.swaps or (2 if quick else 10)
    for name in ("steps", "rounds", "warmup", "swaps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    if args.device == "cuda" and not backend.cuda_available():
        sys.exit(f"--device cuda: {backend.cuda_unavailable_reason()}")

    load_start = load_average()
    x, t = make_problem(args.device)
    layers = make_variants(args.device)
    steps = {name: make_step(layer, x, t, args.device) for name, layer in layers.items()}
    times = time_variants(steps, args.steps, args.warmup, args.rounds, settle=False)
    swap = time_swaps(x, t, args.device, args.swaps, args.warmup)
    command = "python bench/bench_dst_step.py " + " ".join(argv if argv is not None
                                                              else sys.argv[1:])
    text = report(times, swap, args, command.strip(), layers, (load_start, load_average()))
    print(text)
    out = args.out or default_output(quick, args.device)
    if out:
        write_section(out, SECTION, text)
        print(f"wrote section {SECTION!r} of {out}")


if __name__ == "__main__":
    main()
