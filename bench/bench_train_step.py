"""Time a training step of the MNIST MLP: diagnet dense and 90 % diagonal vs PyTorch.

    python bench/bench_train_step.py                    # CPU -> section of docs/benchmarks.md
    python bench/bench_train_step.py --quick --steps 3  # a smoke run, printed only
    python bench/bench_train_step.py --device cuda      # GPU -> section of docs/gpu-benchmarks.md

The model is ``diagnet.models.MLP(784, [256, 256], 10)``, float32. One training step =
forward, ``F.cross_entropy`` on integer labels, ``zero_grad``, backward, ``Adam.step()`` (lr
1e-3), on synthetic MNIST-shaped data (pixels uniform in [0, 1), random labels; a few
batches used in turn). Variants, timed in one process at batch 128 and 1024 (``--batches``):

* **diagnet dense**: every layer `nn.Linear` (NumPy's BLAS);
* **diagnet diag 90% static**: ``MLP(..., linear="diag", sparsity=0.9)``: the two hidden
  layers `nn.DiagLinear` at sparsity 0.9, the head dense;
* **diagnet DynaDiag 90% soft**: the dense MLP converted by ``diagnet.dst.sparsify(model,
  "diag", 0.9, method="dynadiag", dense=("head",), schedule=...)`` (sparse mode, pool 0.25:
  the soft top-k over all diagonals, ``K + ceil(K/4)`` stored), timed on ordinary steps (the
  controller's hooks run, no swap happens);
* **diagnet DynaDiag 90% frozen**: the same after ``freeze()`` (a `DiagLinear` with ``K``);
* **PyTorch dense**: the same MLP in torch (``nn.Linear`` x 3, ReLU, Adam), when torch
  imports (on CUDA with ``--device cuda``, when torch has it); otherwise the report says
  "PyTorch not installed" and has no PyTorch column: a ratio is only ever computed against
  PyTorch measured in the same run. It is timed in a process of its own that stays up
  (`reports.StepServer`), its rounds rotating with diagnet's variants, and again in this
  process after them, head to head with the static diagonal MLP.

Each variant runs ``--steps`` steps per round after warm-up steps, for several rounds with the
order of the variants rotating; the table gives the median over all timed steps. With
``--device cuda`` diagnet runs on CuPy and a step is timed with the GPU synchronised before
and after it.

On the CPU the report has three more parts (not run with ``--device cuda``: they time the
CPU's kernels and thread pools):

* **where the time goes** in one step (diag static and dense, batch 128 and 1024): the
  diagonal kernels, the dense linear ops (BLAS), ``Adam.step``, and the rest (element-wise
  ops, loss, the engine's own Python), from timers around those calls; the number of
  `Function` applications per step and the engine's cost per application;
* **the thread-pool clash** (`diagnet.diag.threadpools`): a diagonal forward and a dense
  matmul alternating, vs each alone, in fresh processes with both pools left at their
  defaults (``DIAGNET_BLAS_THREAD_TIMEOUT=off`` and the other two settings off), with parts
  of diagnet's run-time fix, and with all of it; the same processes time the training step,
  so the fix is measured on the step too;
* machine, library versions and the load average at start and end.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np  # before diagnet, as in most user scripts: the fix must not depend on order

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "bench"):  # run from a checkout without installing; bench/reports.py
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import diagnet as dn  # noqa: E402
from diagnet import autograd, backend, functional as F  # noqa: E402
from diagnet.diag import dispatch, threadpools  # noqa: E402
from diagnet.dst import TemperatureSchedule, sparsify  # noqa: E402
from diagnet.models import MLP  # noqa: E402
from diagnet.ops import dense as _dense  # noqa: E402
from reports import (child_result, default_output, fmt_ratio, load_average,  # noqa: E402
                     machine, serve_steps, time_variants, torch_step_server, write_section)

SECTION = "bench_train_step"
IN, HIDDEN, CLASSES = 784, [256, 256], 10
SPARSITY = 0.9
BATCHES = (128, 1024)
N_BATCHES = 4  # synthetic batches used in turn
#: the interleaved micro-benchmark: one diagonal layer and its dense equivalent
INTERLEAVED = dict(m=768, n=768, batch=256, sparsity=0.9)

DENSE, STATIC, SOFT, FROZEN, TORCH = ("diagnet dense", "diagnet diag 90% static",
                                      "diagnet DynaDiag 90% soft",
                                      "diagnet DynaDiag 90% frozen", "PyTorch dense")
TORCH_ALONE = "PyTorch dense, own process"
STATIC_NEXT_TO_TORCH = "diagnet diag 90% static, next to PyTorch"


# --------------------------------------------------------------------------------------
# Models and steps
# --------------------------------------------------------------------------------------


def make_data(batch, seed=0):
    """``N_BATCHES`` MNIST-shaped batches ``(x (B, 784) float32, labels (B,) int64)``."""
    rng = np.random.default_rng(seed)
    return [(rng.random((batch, IN), dtype=np.float32), rng.integers(0, CLASSES, batch))
            for _ in range(N_BATCHES)]


def make_model(name, seed=0, device="cpu"):
    """``(model, controller or None)`` of a diagnet variant on ``device``."""
    if name == DENSE:
        return MLP(IN, HIDDEN, CLASSES, rng=seed, device=device), None
    if name == STATIC:
        return MLP(IN, HIDDEN, CLASSES, linear="diag", sparsity=SPARSITY, rng=seed,
                   device=device), None
    model = MLP(IN, HIDDEN, CLASSES, rng=seed, device=device)
    # swap_every far away: the timed steps are ordinary steps (the hooks still run)
    ctrl = sparsify(model, "diag", SPARSITY, method="dynadiag", dense=("head",), rng=seed,
                    schedule=TemperatureSchedule("cosine", span=10_000, per="step"),
                    swap_every=10**9)
    if name == FROZEN:
        for layer in ctrl.layers.values():
            layer.freeze()
    return model, ctrl


def hidden_structure(model):
    """E.g. ``"K 79/784, 26/256"`` (diagonal layers) or ``"dense"``."""
    parts = [f"{m.K}/{m.P}" for _, m in model.named_modules() if hasattr(m, "offsets")]
    return "K " + ", ".join(parts) if parts else "dense"


def synchronizer(device):
    """``sync()`` that waits for the GPU's queued work with ``device="cuda"`` (else nothing),
    called before reading the clock."""
    if device == "cuda":
        return lambda: backend.synchronize("cuda")
    return lambda: None


def diagnet_step(name, batch, seed=0, device="cpu"):
    """``(step, model)``: ``step()`` runs one training step and returns its seconds."""
    model, ctrl = make_model(name, seed, device)
    opt = dn.optim.Adam(model.parameters(), lr=1e-3)
    data = [(dn.tensor(x, device=device), dn.tensor(y, device=device))
            for x, y in make_data(batch, seed)]
    counter = [0]
    sync = synchronizer(device)

    def step():
        i = counter[0]
        counter[0] += 1
        x, y = data[i % len(data)]
        sync()
        t0 = time.perf_counter()
        if ctrl is not None:
            ctrl.before_step(i)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ctrl is not None:
            ctrl.after_step(i)
        sync()
        return time.perf_counter() - t0

    return step, model


def torch_step(batch, seed=0, device="cpu"):
    """``step()`` of the same MLP in PyTorch on ``device``, or None when torch does not
    import."""
    try:
        import torch
    except ImportError:
        return None
    torch.manual_seed(seed)
    nn = torch.nn
    model = nn.Sequential(nn.Linear(IN, HIDDEN[0]), nn.ReLU(), nn.Linear(HIDDEN[0], HIDDEN[1]),
                          nn.ReLU(), nn.Linear(HIDDEN[1], CLASSES)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = [(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))
            for x, y in make_data(batch, seed)]
    counter = [0]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        x, y = data[counter[0] % len(data)]
        counter[0] += 1
        sync()
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync()
        return time.perf_counter() - t0

    return step


def torch_info(device="cpu"):
    """``(line naming PyTorch, "")``, or ``(None, why it cannot be measured on device)``."""
    if importlib.util.find_spec("torch") is None:
        return None, "PyTorch not installed"
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        return None, f"PyTorch {torch.__version__} has no CUDA device here"
    where = f", {torch.cuda.get_device_name()}" if device == "cuda" else ""
    return f"PyTorch {torch.__version__} ({torch.get_num_threads()} threads{where})", ""


# --------------------------------------------------------------------------------------
# Where the time goes
# --------------------------------------------------------------------------------------


class Timers:
    """Wrap the kernel entry points, the dense linear op, ``Adam.step`` and
    ``Function.__call__`` with accumulating timers / counters (undone by `restore`)."""

    def __init__(self):
        self.seconds = {"diagonal kernels": 0.0, "dense linear (BLAS)": 0.0, "Adam.step": 0.0}
        self.applications = 0
        self._undo = []

    def _wrap(self, owner, attr, key=None, count=False):
        original = getattr(owner, attr)
        timers = self

        def wrapped(*args, **kwargs):
            if count:
                timers.applications += 1
            if key is None:
                return original(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                timers.seconds[key] += time.perf_counter() - t0

        setattr(owner, attr, wrapped)
        self._undo.append((owner, attr, original))

    def install(self):
        for fn in ("forward", "input_grad", "value_grad"):
            self._wrap(dispatch, fn, "diagonal kernels")
        self._wrap(_dense.LinearFunction, "forward", "dense linear (BLAS)")
        self._wrap(_dense.LinearFunction, "backward", "dense linear (BLAS)")
        self._wrap(dn.optim.Adam, "step", "Adam.step")
        self._wrap(autograd.Function, "__call__", count=True)
        return self

    def restore(self):
        for owner, attr, original in reversed(self._undo):
            setattr(owner, attr, original)
        self._undo.clear()


def breakdown(name, batch, steps, warmup):
    """Median step time and the mean time of its parts (seconds), Function applications."""
    step, _ = diagnet_step(name, batch, seed=1)
    for _ in range(warmup):
        step()
    plain = [step() for _ in range(steps)]
    timers = Timers().install()
    try:
        total = sum(step() for _ in range(steps))
    finally:
        timers.restore()
    parts = {k: v / steps for k, v in timers.seconds.items()}
    parts["rest: element-wise ops, loss, engine, Python (and the timers)"] = \
        total / steps - sum(timers.seconds.values()) / steps
    return float(np.median(plain)), parts, timers.applications / steps


def adam_paths(name, batch, reps):
    """Median seconds of ``Adam.step()`` on the model's parameters (gradients of one step),
    the compiled loop over all parameters vs the NumPy code (``{"fused": s, "numpy": s}``),
    timed alternately."""
    from diagnet.optim import _foreach

    model, _ = make_model(name, seed=2)
    opt = dn.optim.Adam(model.parameters(), lr=1e-3)
    x, y = make_data(batch, seed=2)[0]
    F.cross_entropy(model(dn.tensor(x)), dn.tensor(y)).backward()
    compilable = _foreach.compilable
    times = {"fused": [], "numpy": []}
    try:
        for i in range(2 * reps + 4):
            path = "fused" if i % 2 else "numpy"
            _foreach.compilable = compilable if path == "fused" else (lambda *arrays: False)
            t0 = time.perf_counter()
            opt.step()
            if i >= 4:  # the first calls compile and make the state
                times[path].append(time.perf_counter() - t0)
    finally:
        _foreach.compilable = compilable
    return {k: float(np.median(v)) for k, v in times.items()}


def engine_cost(reps=2000):
    """Seconds per `Function` application (forward and backward) on a 1-element tensor:
    what the engine itself costs per op, with next to no arithmetic."""
    x = dn.tensor(np.ones(1, dtype=np.float32), requires_grad=True)
    chain = 16

    def run():
        y = x
        for _ in range(chain):
            y = F.relu(y)
        y.backward(np.ones(1, dtype=np.float32))
        x.grad = None

    for _ in range(20):
        run()
    t = []
    for _ in range(max(1, reps // chain)):
        t0 = time.perf_counter()
        run()
        t.append(time.perf_counter() - t0)
    return float(np.median(t)) / chain


# --------------------------------------------------------------------------------------
# The thread-pool clash (run in fresh processes: --child)
# --------------------------------------------------------------------------------------


def interleaved(reps):
    """Median ms of a diagonal forward and a dense matmul, each alone and alternating."""
    from diagnet.diag import cpu
    from diagnet.diag import layout

    p = INTERLEAVED
    rng = np.random.default_rng(0)
    K = layout.diagonals_for_sparsity((p["m"], p["n"]), p["sparsity"])
    x = rng.standard_normal((p["batch"], p["n"])).astype(np.float32)
    offsets = np.sort(rng.choice(max(p["m"], p["n"]), K, replace=False)).astype(np.int64)
    values = rng.standard_normal((K, min(p["m"], p["n"]))).astype(np.float32)
    W = rng.standard_normal((p["m"], p["n"])).astype(np.float32)

    def diag():
        cpu.forward(x, offsets, values, p["m"])

    def dense():
        np.matmul(x, W.T)

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    best = None
    for _ in range(3 if reps >= 20 else 1):  # passes; keep the fastest (a pass that other
        diag(), dense()                      # processes disturbed is dropped, not averaged)
        alone_d = [timed(diag) for _ in range(reps)]
        alone_m = [timed(dense) for _ in range(reps)]
        inter_d, inter_m = [], []
        for _ in range(reps):
            inter_d.append(timed(diag))
            inter_m.append(timed(dense))
        res = [float(np.median(v)) * 1e3 for v in (alone_d, inter_d, alone_m, inter_m)]
        best = res if best is None else [min(a, b) for a, b in zip(best, res)]
    return dict(zip(("diag alone", "diag interleaved", "dense alone", "dense interleaved"),
                    best))


def torch_child(args):
    """Serve the PyTorch step from this fresh process (`reports.serve_steps`; no diagnet
    kernel runs here, so no numba or OpenBLAS pool of ours), one key per batch size. The
    ``READY`` info is ``{"why": ""}``, or ``{"why": reason}`` with no steps where PyTorch
    cannot run on the device."""
    why = torch_info(args.device)[1]
    steps = {} if why else {str(b): torch_step(b, device=args.device) for b in args.batches}
    serve_steps(steps, {"why": why})


def child_flags(args):
    """The flags a child process repeats: steps, rounds, warm-up, batches."""
    return ["--steps", str(args.steps), "--rounds", str(args.rounds), "--warmup",
            str(args.warmup), "--batches", *map(str, args.batches)]


def torch_server(args):
    """A `reports.StepServer` running `torch_child`, whose steps rotate with diagnet's; None
    without torch, with ``--no-children``, or where PyTorch cannot run on the device."""
    if args.no_children:
        return None
    cmd = [sys.executable, str(Path(__file__).resolve()), "--torch-child", "--device",
           args.device, *child_flags(args)]
    return torch_step_server(cmd)[0]


def child(args):
    """Measure the interleaved case and the step under this process's settings; print JSON."""
    out = {"threadpools": threadpools.configure(),
           "interleaved": interleaved(args.reps)}
    steps = {}
    for batch in args.batches:
        steps[f"{STATIC} @ {batch}"] = diagnet_step(STATIC, batch)[0]
        steps[f"{DENSE} @ {batch}"] = diagnet_step(DENSE, batch)[0]
    times = time_variants(steps, args.steps, args.warmup, args.rounds)
    out["steps"] = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    print("RESULT " + json.dumps(out))


#: the settings compared in fresh processes: (label, environment changes)
SETTINGS = [
    ("both pools at their default spin (fix off)", {threadpools.ENV: "off",
                                                    threadpools.GOMP_ENV: "off",
                                                    threadpools.WORKER_NICE_ENV: "off"}),
    ("OpenBLAS timeout only", {threadpools.GOMP_ENV: "off", threadpools.WORKER_NICE_ENV: "off"}),
    ("OpenBLAS timeout and libgomp spinning 30,000 times (workers at normal priority)",
     {threadpools.WORKER_NICE_ENV: "off"}),
    ("diagnet's fix (default: OpenBLAS timeout, numba's workers at nice +10, libgomp's "
     "default spin)", {}),
]


#: variables that would override the settings compared (removed from the children's env)
_THREAD_ENV = ("OPENBLAS_THREAD_TIMEOUT", "GOTO_THREAD_TIMEOUT", "GOMP_SPINCOUNT",
               "OMP_WAIT_POLICY", threadpools.ENV, threadpools.GOMP_ENV,
               threadpools.WORKER_NICE_ENV)


def run_children(args):
    """``{label: child result}`` for every entry of `SETTINGS`."""
    results = {}
    for label, env_changes in SETTINGS:
        env = {k: v for k, v in os.environ.items() if k not in _THREAD_ENV}
        env.update(env_changes)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *child_flags(args),
               "--reps", str(args.reps)]
        results[label] = child_result(cmd, f"child run {label!r}", env=env)
    return results


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def report(med, structures, torch_note, profile, adam_times, per_op, children, args, command,
           loads):
    """The Markdown section (a string)."""
    import numba

    batches = args.batches
    torch_line, torch_missing = torch_note
    # the baseline: PyTorch in a process of its own (no other thread pools), else in ours
    ref = {b: med.get((TORCH_ALONE, b), med.get((TORCH, b))) for b in batches}
    measured_torch = any(v is not None for v in ref.values())
    tp = threadpools.status() or {}
    lines = [
        "## Training step of the MNIST MLP (784-256-256-10, float32, Adam)"
        + (" on the GPU" if args.device == "cuda" else ""),
        "",
        f"Generated by `{command}` on {datetime.date.today().isoformat()}.",
        "",
        f"* Machine: {machine(args.device)}",
        f"* Python {platform.python_version()}, NumPy {np.__version__}, numba "
        f"{numba.__version__} ({numba.get_num_threads()} threads, "
        f"{numba.threading_layer()} layer); " + (torch_line or torch_missing),
        f"* Thread pools (`diagnet.diag.threadpools`): {tp.get('note', 'not configured')}; "
        f"{tp.get('gomp', '')}; {tp.get('workers', '')}",
        f"* One step: forward, `F.cross_entropy`, `zero_grad`, backward, `Adam.step()` (lr "
        f"1e-3); median of {args.steps * args.rounds} steps per variant ({args.rounds} rounds "
        f"of {args.steps}, order rotating, after {args.warmup} warm-up steps each)"
        + ("; the GPU synchronised before and after each step." if args.device == "cuda"
           else "."),
        f"* Load average (1 min) at start / end: {loads[0]:.2f} / {loads[1]:.2f} (2 cores: "
        "anything above ~2.5 means other processes took cores during the run)",
        "",
    ]
    if measured_torch:
        lines.append("Ratios are `time of the baseline / time of the variant` (above 1: the "
                     "variant is faster). PyTorch was measured here: alone in a fresh "
                     "process, its rounds rotating with diagnet's variants (the PyTorch column "
                     "divides by that time), and in this process "
                     "after diagnet's variants, rotating with the static diagonal MLP (the "
                     "two \"PyTorch dense\" / \"next to PyTorch\" rows: with PyTorch's "
                     "OpenMP pool in the process, diagnet's steps are slower, so the diagnet "
                     "rows above were timed before PyTorch first ran).")
    else:
        lines.append(f"Ratios are `time of the baseline / time of the variant` (above 1: the "
                     f"variant is faster). {torch_missing}: no PyTorch column.")
    torch_cols = batches if measured_torch else ()
    lines += [
        "",
        "| variant | hidden layers | " + " | ".join(f"ms / step @ {b}" for b in batches)
        + "".join(f" | PyTorch / variant @ {b}" for b in torch_cols)
        + " | " + " | ".join(f"diagnet dense / variant @ {b}" for b in batches) + " |",
        "|---|---|" + "---|" * (2 * len(batches) + len(torch_cols)),
    ]
    names = [n for n in (DENSE, STATIC, SOFT, FROZEN, TORCH, STATIC_NEXT_TO_TORCH, TORCH_ALONE)
             if any((n, b) in med for b in batches)]
    for name in names:
        row = [name, structures.get(name if name != STATIC_NEXT_TO_TORCH else STATIC, "dense")]
        row += [f"{med[(name, b)]:.2f}" if (name, b) in med else "—" for b in batches]
        row += [fmt_ratio(ref[b], med.get((name, b))) for b in torch_cols]
        row += [fmt_ratio(med.get((DENSE, b)), med.get((name, b))) for b in batches]
        lines.append("| " + " | ".join(row) + " |")
    b0 = batches[0]
    ours = med.get((STATIC, b0))
    if ours is not None and ref.get(b0) is not None:
        met = ours <= ref[b0]
        lines += ["", f"**Target** (the diag 90% step at batch {b0} no slower than PyTorch's "
                      f"dense step, measured here): {'met' if met else 'NOT met'}, "
                      f"{ours:.2f} ms against {ref[b0]:.2f} ms."]
    if args.device == "cuda":
        lines += ["", "The CPU's sections (where the time goes, `Adam.step`'s loops, the "
                      "thread-pool clash) are not run with `--device cuda`."]
    else:
        lines += cpu_sections(profile, adam_times, per_op, children, args)
    return "\n".join(lines) + "\n"


def cpu_sections(profile, adam_times, per_op, children, args):
    """The CPU report's lines after the table: the parts of a step, `Adam.step`, the
    thread-pool clash, and where the notes measured once are."""
    batches = args.batches
    lines = []
    lines += ["", "### Where the time goes", "",
              "Mean ms per step of each part, from timers around the diagonal kernel calls, "
              "the dense linear op (`LinearFunction` forward and backward: the BLAS "
              "matmuls and the bias), and `Adam.step()`; the rest is the element-wise ops "
              "(ReLU, cross-entropy), `zero_grad` and the engine's own Python. Measured on "
              f"separate steps ({args.profile_steps} per case) from the table's.", ""]
    cases = list(profile)
    parts = list(next(iter(profile.values()))[1])
    lines.append("| part | " + " | ".join(cases) + " |")
    lines.append("|---|" + "---|" * len(cases))
    lines.append("| whole step (median, untimed parts) | "
                 + " | ".join(f"{profile[c][0] * 1e3:.3f}" for c in cases) + " |")
    for part in parts:
        lines.append(f"| {part} | " + " | ".join(f"{profile[c][1][part] * 1e3:.3f}"
                                                for c in cases) + " |")
    lines.append("| `Function` applications per step | "
                 + " | ".join(f"{profile[c][2]:.0f}" for c in cases) + " |")
    lines += ["", f"The engine's own cost per `Function` application (forward and backward "
                  f"of a ReLU on a 1-element tensor, a chain of 16): {per_op * 1e6:.1f} µs.",
              "",
              "`Adam.step()` alone (median µs, gradients of one step): the fused CPU loop that "
              "NumPy parameters now take, and the NumPy code it replaced (still the path for "
              "CuPy and non-contiguous arrays):", "",
              "| model | fused loop | NumPy code |", "|---|---|---|"]
    for short, t in adam_times.items():
        lines.append(f"| {short} | {t['fused'] * 1e6:.0f} | {t['numpy'] * 1e6:.0f} |")
    lines.append("")

    p = INTERLEAVED
    lines += ["### Thread-pool clash: BLAS and the diagonal kernels taking turns", "",
              f"Fresh processes (NumPy imported before diagnet), each with the setting in the "
              f"first column. Interleaved micro-benchmark: a {p['m']} x {p['n']} diagonal "
              f"forward (sparsity {p['sparsity']}, batch {p['batch']}) and the dense matmul "
              f"`x @ W.T` of the same size, each alone ({args.reps} calls back to back) and "
              f"alternating (diag, matmul, diag, ...); median ms, best of 3 passes. Then the "
              f"training step in the same process ({args.steps * args.rounds} steps).", "",
              "| setting | diag alone | diag alternating | matmul alone | matmul alternating | "
              + " | ".join(f"{n} @ {b}" for b in batches for n in ("diag 90% step", "dense step"))
              + " |",
              "|---|---|---|---|---|" + "---|" * (2 * len(batches))]
    for label, res in children.items():
        it, st = res["interleaved"], res["steps"]
        row = [label] + [f"{it[k]:.2f}" for k in ("diag alone", "diag interleaved",
                                                   "dense alone", "dense interleaved")]
        row += [f"{st[f'{n} @ {b}']:.2f}" for b in batches for n in (STATIC, DENSE)]
        lines.append("| " + " | ".join(row) + " |")
    if not children:
        lines.append("| (not run: `--no-children`) |" + " |" * (4 + 2 * len(batches)))
    lines += ["", "The measurements behind the fused `Adam.step`, the engine's fast paths and "
                  "the thread-pool settings, taken once when they were chosen, are in the "
                  "hand-written notes after this section of `docs/benchmarks.md`."]
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="few steps and rounds; print the report, write nothing")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps per variant and round (default 30; 3 with --quick)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds, order rotating (default 4; 1 with --quick)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="warm-up steps per variant (default 5; 1 with --quick)")
    ap.add_argument("--reps", type=int, default=None,
                    help="calls per case of the interleaved benchmark (default 60; 5 with "
                         "--quick)")
    ap.add_argument("--no-children", action="store_true",
                    help="skip the fresh-process comparison of the thread-pool settings")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where diagnet (and PyTorch) run (default cpu); with cuda only the "
                         "table: the other sections are about the CPU")
    ap.add_argument("--batches", type=int, nargs="+", default=list(BATCHES),
                    help="batch sizes (default: %(default)s)")
    ap.add_argument("--out", default=None,
                    help="Markdown file whose section to write (default docs/benchmarks.md, "
                         "docs/gpu-benchmarks.md with --device cuda; none with --quick)")
    args = ap.parse_args(argv)
    quick = args.quick
    args.steps = args.steps or (3 if quick else 30)
    args.rounds = args.rounds or (1 if quick else 4)
    args.warmup = args.warmup or (1 if quick else 5)
    args.reps = args.reps or (5 if quick else 60)
    args.profile_steps = 3 if quick else 50
    for name in ("steps", "rounds", "warmup", "reps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    if min(args.batches) < 1:
        ap.error("--batches must be >= 1")
    if args.device == "cuda" and not backend.cuda_available():
        ap.error(f"--device cuda: {backend.cuda_unavailable_reason()}")
    os.environ.setdefault(dn.settings.ENV_DEVICE, args.device)  # for the child processes
    if dn.settings.device is None:  # and for this one, which read the variable at import
        dn.settings.set_device(args.device)
    if args.child:
        child(args)
        return
    if args.torch_child:
        torch_child(args)
        return

    load_start = load_average()
    threadpools.configure()
    if importlib.util.find_spec("torch") is None:  # torch itself is imported only below
        print("PyTorch not installed: the report has no PyTorch column", file=sys.stderr)
    med, structures = {}, {}
    # diagnet's variants first, without PyTorch in the process: PyTorch's own OpenMP pool
    # (300,000 spins after each op) slowed them by 20-40% when it ran alongside. PyTorch in
    # a process of its own rotates with them, so that a drift of the machine's speed reaches
    # both sides of the ratios.
    server = torch_server(args)
    try:
        for batch in args.batches:
            steps = {}
            for name in (DENSE, STATIC, SOFT, FROZEN):
                steps[name], model = diagnet_step(name, batch, device=args.device)
                structures[name] = hidden_structure(model)
            if server is not None:
                steps[TORCH_ALONE] = server.step(str(batch))
            times = time_variants(steps, args.steps, args.warmup, args.rounds)
            for name, t in times.items():
                med[(name, batch)] = float(np.median(t)) * 1e3
    finally:
        if server is not None:
            server.close()
    profile, adam_times, per_op, children = {}, {}, None, {}
    if args.device == "cpu":
        for batch in args.batches:
            for name, short in ((STATIC, "diag 90%"), (DENSE, "dense")):
                profile[f"{short} @ {batch}"] = breakdown(name, batch, args.profile_steps,
                                                          args.warmup)
        for name, short in ((STATIC, "diag 90%"), (DENSE, "dense")):
            adam_times[short] = adam_paths(name, args.batches[0], 5 if quick else 200)
        per_op = engine_cost(200 if quick else 4000)
        children = {} if args.no_children else run_children(args)
    torch_line, torch_missing = torch_info(args.device)
    # PyTorch last (see above): in the same process, head to head with the static diagonal MLP
    for batch in args.batches if torch_line else ():
        steps = {TORCH: torch_step(batch, device=args.device),
                 STATIC_NEXT_TO_TORCH: diagnet_step(STATIC, batch, device=args.device)[0]}
        times = time_variants(steps, args.steps, args.warmup, args.rounds)
        for name, t in times.items():
            med[(name, batch)] = float(np.median(t)) * 1e3
    command = "python bench/bench_train_step.py " + " ".join(argv if argv is not None
                                                              else sys.argv[1:])
    text = report(med, structures, (torch_line, torch_missing), profile, adam_times, per_op,
                  children, args, command.strip(), (load_start, load_average()))
    print(text)
    out = args.out or default_output(quick, args.device)
    if out:
        write_section(out, SECTION, text)
        print(f"wrote section {SECTION!r} of {out}")


if __name__ == "__main__":
    main()
