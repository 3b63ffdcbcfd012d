"""Time the MNIST ViT and MLP, training step and inference: diagnet vs PyTorch's dense twin.

    python bench/bench_vit_step.py                   # CPU -> section of docs/benchmarks.md
    python bench/bench_vit_step.py --quick           # a smoke run, printed only
    python bench/bench_vit_step.py --device cuda     # GPU -> section of docs/gpu-benchmarks.md

Two models, float32, on synthetic MNIST-shaped data (pixels uniform in [0, 1), random
labels; a few batches used in turn):

* **ViT** of ``examples/train_vit_mnist.py``: 7x7 patches (16 tokens and a class token),
  width 64, depth 4, 4 heads, MLP ratio 2, GELU, pre-norm;
* **MLP** of ``examples/train_mnist_mlp.py``: 784-256-256-10, ReLU.

Three measures per model: the **training step** at batch 128 (forward, ``F.cross_entropy``,
``zero_grad``, backward, ``AdamW.step()``, lr 1e-3, weight decay 0.05) and **inference** at
batch 1 and 128 (forward only, ``eval()`` mode, under ``no_grad``). Variants:

* **diagnet dense**: every linear layer `nn.Linear`;
* **diagnet diag 90% static**: the dense model converted by ``diagnet.dst.sparsify(model,
  "diag", 0.9, ...)`` as the example does (ViT: every ``qkv``, ``proj``, ``fc1``, ``fc2``;
  MLP: the hidden layers; the patch embedding and the head stay dense);
* **diagnet DynaDiag 90% soft**: the same with ``method="dynadiag"`` (sparse mode, pool 0.25),
  timed on ordinary steps (the controller's hooks run, no swap happens);
* **diagnet DynaDiag 90% frozen**: the same after ``freeze()``;
* **PyTorch dense**: the twin of each model in PyTorch, when torch imports, timed in a
  process of its own (no thread pool of diagnet's there) with 2 threads. That process stays
  up (`reports.StepServer`) and PyTorch is one more variant of each rotating round, so its
  visits alternate with diagnet's: a drift of the machine's speed during the run (other
  tenants of a virtual machine, clock changes) reaches both sides of a ratio alike, where
  timing PyTorch in one block after diagnet put it all on one side. The ViT twin is
  built as the ViT: patches by reshape, class token, learned position embedding, pre-norm
  blocks of ``nn.LayerNorm``, ``nn.MultiheadAttention`` (``batch_first``) and a GELU MLP,
  head on the class token; its parameter count is checked against diagnet's.

Every variant runs ``--steps`` steps per round after warm-up steps, for several rounds with
the order of the variants rotating; a step is timed alone (``perf_counter``; on the GPU
synchronised before and after) and the table gives the median over all timed steps. Ratios
to PyTorch are only ever computed against PyTorch measured in the same run.

A **profile** of the diagonal ViT's training step (cProfile) shows where its time goes:
the functions with the most time of their own, and that time grouped by what it does.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import inspect
import json
import os
import platform
import pstats
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "bench"):  # run from a checkout without installing; bench/reports.py
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import diagnet as dn  # noqa: E402
from diagnet import backend, functional as F  # noqa: E402
from diagnet.dst import TemperatureSchedule, sparsify  # noqa: E402
from diagnet.models import MLP, ViT  # noqa: E402
from reports import (default_output, fmt_ratio, load_average, machine,  # noqa: E402
                     serve_steps, time_variants, torch_step_server, write_section)

SECTION = "bench_vit_step"
SPARSITY = 0.9
N_BATCHES = 4  # synthetic batches used in turn
CLASSES = 10
LR, WEIGHT_DECAY = 1e-3, 0.05
TORCH_THREADS = 2


@dataclass(frozen=True)
class Sizes:
    """The models' sizes and the batches of the measures."""

    vit: dict
    mlp: tuple
    train_batch: int
    infer_batches: tuple

    @property
    def train(self):
        """The training step's measure, e.g. ``"train step @ 128"``."""
        return f"train step @ {self.train_batch}"

    @property
    def measures(self):
        """Every measure's name: the training step, then inference at each batch."""
        return (self.train,) + tuple(f"inference @ {b}" for b in self.infer_batches)

    @property
    def batches(self):
        """Every batch size the measures use."""
        return sorted({self.train_batch, *self.infer_batches})


#: the ViT of examples/train_vit_mnist.py and the MLP of examples/train_mnist_mlp.py
FULL = Sizes(vit=dict(image_size=28, patch_size=7, in_channels=1, dim=64, depth=4, heads=4,
                      mlp_ratio=2, num_classes=CLASSES),
             mlp=(784, (256, 256), CLASSES), train_batch=128, infer_batches=(1, 128))
#: ``--tiny``: every code path in seconds, even on an emulated GPU; the figures mean nothing
TINY = Sizes(vit=dict(FULL.vit, dim=16, depth=1, heads=2), mlp=(784, (32, 32), CLASSES),
             train_batch=4, infer_batches=(1, 4))
#: per model: its input shape (one sample) and the layers kept dense when sparsified
MODELS = {
    "ViT": dict(sample=(1, 28, 28), dense=("patch_embed.proj", "head")),
    "MLP": dict(sample=(784,), dense=("head",)),
}

DENSE, STATIC, SOFT, FROZEN, TORCH = ("diagnet dense", "diagnet diag 90% static",
                                      "diagnet DynaDiag 90% soft",
                                      "diagnet DynaDiag 90% frozen", "PyTorch dense")
VARIANTS = (DENSE, STATIC, SOFT, FROZEN)


def measure_batch(measure):
    """The batch size of a measure, e.g. 128 for ``"train step @ 128"``."""
    return int(measure.rsplit("@", 1)[1])


# --------------------------------------------------------------------------------------
# diagnet's variants
# --------------------------------------------------------------------------------------


def make_data(model_name, batch, seed=0):
    """``N_BATCHES`` batches ``(x float32, labels int64 (B,))``; ``x`` is ``(B, 1, 28, 28)``
    for the ViT, ``(B, 784)`` for the MLP."""
    rng = np.random.default_rng(seed)
    shape = (batch,) + MODELS[model_name]["sample"]
    return [(rng.random(shape, dtype=np.float32), rng.integers(0, CLASSES, batch))
            for _ in range(N_BATCHES)]


def make_model(sizes, model_name, variant, device, seed=0):
    """``(model, controller or None)`` of a diagnet variant on ``device``."""
    if model_name == "ViT":
        model = ViT(**sizes.vit, rng=seed, device=device)
    else:
        model = MLP(*sizes.mlp, rng=seed, device=device)
    if variant == DENSE:
        return model, None
    kw = dict(dense=MODELS[model_name]["dense"], count_dense=False, rng=seed)
    if variant == STATIC:
        return model, sparsify(model, "diag", SPARSITY, **kw)
    # swap_every far away: the timed steps are ordinary steps (the hooks still run)
    ctrl = sparsify(model, "diag", SPARSITY, method="dynadiag", **kw,
                    schedule=TemperatureSchedule("cosine", span=10_000, per="step"),
                    swap_every=10**9)
    if variant == FROZEN:
        for layer in ctrl.layers.values():
            layer.freeze()
    return model, ctrl


def structure(model):
    """The diagonal layers as ``"K/P x count"`` (e.g. ``"K 20/192 x4, 7/64 x4"``), or
    ``"dense"``."""
    counts = Counter(f"{m.K}/{m.P}" for _, m in model.named_modules() if hasattr(m, "offsets"))
    return "K " + ", ".join(f"{k} x{n}" for k, n in counts.items()) if counts else "dense"


def parameter_count(model):
    """Number of stored parameter entries (all of them, trainable or not)."""
    return int(sum(p.data.size for p in model.parameters()))


def timed(fn, device):
    """``fn`` wrapped to return the seconds of one call (the GPU synchronised around it)."""
    sync = (lambda: backend.synchronize(device)) if device == "cuda" else (lambda: None)

    def step():
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    return step


def diagnet_steps(sizes, model_name, variant, device, seed=0):
    """``({measure: step}, model)``: each ``step()`` runs one step and returns its seconds."""
    model, ctrl = make_model(sizes, model_name, variant, device, seed)
    opt = dn.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    data = {b: [(dn.tensor(x, device=device), dn.tensor(y, device=device))
                for x, y in make_data(model_name, b, seed)]
            for b in sizes.batches}
    counter = [0]

    def train():
        i = counter[0]
        counter[0] += 1
        x, y = data[sizes.train_batch][i % N_BATCHES]
        model.train()
        if ctrl is not None:
            ctrl.before_step(i)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ctrl is not None:
            ctrl.after_step(i)

    def infer(batch):
        def run():
            x, _ = data[batch][counter[0] % N_BATCHES]
            counter[0] += 1
            model.eval()
            with dn.no_grad():
                model(x)
        return run

    steps = {sizes.train: timed(train, device)}
    steps.update({m: timed(infer(measure_batch(m)), device) for m in sizes.measures[1:]})
    return steps, model


def measure(args, torch_server=None):
    """``(ms, structures, params)``: ``ms[(model, variant, measure)]`` median milliseconds,
    ``structures[(model, variant)]``, ``params[(model, variant)]`` stored entries.

    With ``torch_server`` (a `reports.StepServer` running `torch_child`), PyTorch's twin is
    one more variant of each rotation (``TORCH``), timed in its process between diagnet's
    variants, so that a drift of the machine's speed reaches both sides of a ratio."""
    ms, structures, params = {}, {}, {}
    for model_name in MODELS:
        cases = {}
        for variant in VARIANTS:
            cases[variant], model = diagnet_steps(args.sizes, model_name, variant, args.device)
            structures[(model_name, variant)] = structure(model)
            params[(model_name, variant)] = parameter_count(model)
        for measure_name in args.sizes.measures:
            steps = {v: cases[v][measure_name] for v in VARIANTS}
            if torch_server is not None:
                steps[TORCH] = torch_server.step(torch_key(model_name, measure_name))
            times = time_variants(steps, args.steps, args.warmup, args.rounds)
            for variant, t in times.items():
                ms[(model_name, variant, measure_name)] = float(np.median(t)) * 1e3
    return ms, structures, params


# --------------------------------------------------------------------------------------
# PyTorch's dense twins (imported only in the child process)
# --------------------------------------------------------------------------------------


def torch_vit(torch, c):
    """The twin in PyTorch of the ViT of config ``c`` (same architecture and parameters)."""
    nn = torch.nn
    dim, p = c["dim"], c["patch_size"]
    grid = c["image_size"] // p
    tokens = grid * grid

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1 = nn.LayerNorm(dim)
            self.attn = nn.MultiheadAttention(dim, c["heads"], batch_first=True)
            self.ln2 = nn.LayerNorm(dim)
            hidden = c["mlp_ratio"] * dim
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

        def forward(self, x):
            h = self.ln1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
            return x + self.mlp(self.ln2(x))

    class TwinViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(c["in_channels"] * p * p, dim)
            self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
            self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
            self.blocks = nn.ModuleList(Block() for _ in range(c["depth"]))
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, c["num_classes"])

        def forward(self, x):
            B, C = x.shape[0], c["in_channels"]
            # (B, C, gh, p, gw, p) -> (B, gh, gw, C, p, p): patches by reshape, as diagnet's
            patches = x.reshape(B, C, grid, p, grid, p).permute(0, 2, 4, 1, 3, 5)
            x = self.proj(patches.reshape(B, tokens, C * p * p))
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self.pos_embed
            for block in self.blocks:
                x = block(x)
            return self.head(self.norm(x)[:, 0])

    return TwinViT()


def torch_mlp(torch, sizes):
    """The twin in PyTorch of the MLP of ``sizes`` ``(in, (hidden1, hidden2), out)``."""
    nn = torch.nn
    n_in, (h1, h2), n_out = sizes
    return nn.Sequential(nn.Linear(n_in, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(),
                         nn.Linear(h2, n_out))


def torch_steps(torch, sizes, model_name, device, seed=0):
    """``({measure: step}, parameter count)`` of a PyTorch twin on ``device``."""
    torch.manual_seed(seed)
    model = torch_vit(torch, sizes.vit) if model_name == "ViT" else torch_mlp(torch, sizes.mlp)
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    data = {b: [(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))
                for x, y in make_data(model_name, b, seed)]
            for b in sizes.batches}
    counter = [0]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def clocked(fn):
        def step():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            return time.perf_counter() - t0
        return step

    def train():
        x, y = data[sizes.train_batch][counter[0] % N_BATCHES]
        counter[0] += 1
        model.train()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def infer(batch):
        def run():
            x, _ = data[batch][counter[0] % N_BATCHES]
            counter[0] += 1
            model.eval()
            with torch.no_grad():
                model(x)
        return run

    steps = {sizes.train: clocked(train)}
    steps.update({m: clocked(infer(measure_batch(m))) for m in sizes.measures[1:]})
    return steps, int(sum(p.numel() for p in model.parameters()))


def torch_unavailable(device):
    """Why PyTorch cannot be measured on ``device`` (``""`` when it can). Runs in the child
    (`torch_child`): the process that times diagnet never imports torch, so that nothing of
    PyTorch's (its own libgomp, its thread pools) runs beside diagnet's pools there."""
    try:
        import torch
    except Exception as exc:  # a broken install raises more than ImportError
        return f"PyTorch does not import here ({type(exc).__name__}: {exc})"
    if device == "cuda" and not torch.cuda.is_available():
        return f"PyTorch {torch.__version__} has no CUDA device here"
    return ""


def torch_key(model_name, measure_name):
    """The key of a PyTorch step in `torch_child`'s server."""
    return f"{model_name}|{measure_name}"


def torch_child(args):
    """Serve the PyTorch twins' steps from this fresh process (`reports.serve_steps`): the
    ``READY`` info is ``{"why": "", "info", "params": {model: n}}``, the keys `torch_key`;
    or ``{"why": reason}`` and no steps where PyTorch cannot be measured on the device."""
    why = torch_unavailable(args.device)
    if why:
        serve_steps({}, {"why": why})
        return
    import torch

    torch.set_num_threads(TORCH_THREADS)
    info = {"why": "",
            "info": f"PyTorch {torch.__version__} ({torch.get_num_threads()} threads"
                    + (f", {torch.cuda.get_device_name()})" if args.device == "cuda" else ")"),
            "params": {}}
    steps = {}
    for model_name in MODELS:
        model_steps, info["params"][model_name] = torch_steps(torch, args.sizes, model_name,
                                                              args.device)
        for measure_name, step in model_steps.items():
            steps[torch_key(model_name, measure_name)] = step
    serve_steps(steps, info)


def torch_server(args):
    """``(server, "")``: a `reports.StepServer` running `torch_child` (PyTorch in a process of
    its own); or ``(None, why PyTorch is not measured)`` (`reports.torch_step_server`)."""
    if args.no_torch:
        return None, "PyTorch not measured (--no-torch)"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--torch-child", "--device",
           args.device] + (["--tiny"] if args.tiny else [])
    return torch_step_server(cmd)


# --------------------------------------------------------------------------------------
# Profile of the diagonal ViT step
# --------------------------------------------------------------------------------------

#: groups of the profile, in report order; a diagnet function belongs to the first group
#: one of whose words appears in ``"path/in/diagnet.py:Qual.name"`` (lower case)
GROUPS = [
    ("diagonal kernels", ("diag/", "diagonal.py", "diag_linear", "diaglinear")),
    ("optimizer", ("optim/",)),
    ("layer norm", ("layer_norm", "layernorm", "normalization.py")),
    ("gelu", ("gelu", "erf")),
    ("softmax / attention", ("softmax", "attention", "dot_product", "sdpa", "matmul")),
    ("indexing and reshapes", ("getitem", "index", "split", "concatenate", "stack", "reshape",
                               "transpose", "broadcast")),
    ("dense matmuls", ("ops/dense.py", "linearfunction")),
    ("autograd engine", ("autograd/", "config.py")),
    ("waiting for the GPU", ("synchronize",)),
]
OTHER = "other (element-wise ops, loss, modules, Python)"
#: diagnet modules whose unmatched functions are helpers (array module, kernel launcher):
#: their time goes to their callers
PASS_THROUGH = ("backend.py", "cuda_launch.py")


def qualified_names():
    """``{(file, first line): qualified name}`` of every function and method in diagnet's
    loaded modules (cProfile records only the bare name)."""
    names = {}
    for name, module in list(sys.modules.items()):
        if not (name == "diagnet" or name.startswith("diagnet.")) or module is None:
            continue
        for _, obj in inspect.getmembers(module):
            members = inspect.getmembers(obj) if inspect.isclass(obj) else [(None, obj)]
            for _, fn in members:
                code = getattr(inspect.unwrap(fn) if callable(fn) else None, "__code__", None)
                if code is not None:
                    names[(code.co_filename, code.co_firstlineno)] = getattr(
                        fn, "__qualname__", code.co_name)
    return names


class ProfileGroups:
    """Assign the own time (tottime) of each profiled function to a group of `GROUPS`.

    A diagnet function is grouped by its path and qualified name. Time in any other
    function (NumPy's Python wrappers, builtins such as ``ufunc.at``, numba's dispatcher)
    goes to the groups of its callers, in proportion to the time spent under each caller.
    """

    def __init__(self, stats):
        self.stats = stats.stats
        self.package = str(Path(dn.__file__).resolve().parent) + os.sep
        self.names = qualified_names()
        self._shares = {}

    def label(self, func):
        """``"path/in/diagnet.py:Qual.name"`` of a diagnet function, else None."""
        filename, line, name = func
        if not filename.startswith(self.package):
            return None
        qual = self.names.get((filename, line), name)
        return f"{filename[len(self.package):].replace(os.sep, '/')}:{qual}"

    def own_group(self, func):
        """The group of a diagnet function by its label, or None (not diagnet's)."""
        label = self.label(func)
        if label is None:
            return None
        low = label.lower()
        for group, words in GROUPS:
            if any(w in low for w in words):
                return group
        return None if label.startswith(PASS_THROUGH) else OTHER

    def shares(self, func, seen=frozenset()):
        """``{group: fraction}`` of ``func``'s time."""
        if func in self._shares:
            return self._shares[func]
        group = self.own_group(func)
        if group is not None:
            result = {group: 1.0}
        else:
            callers = self.stats[func][4] if func in self.stats else {}
            weights = {c: v[3] for c, v in callers.items() if c not in seen}
            total = sum(weights.values())
            if not total:
                result = {OTHER: 1.0}
            else:
                result = {}
                for caller, w in weights.items():
                    for g, f in self.shares(caller, seen | {func}).items():
                        result[g] = result.get(g, 0.0) + f * w / total
        if not seen:  # memoise only results that no cycle guard cut short
            self._shares[func] = result
        return result

    def group_of(self, func):
        """The group most of ``func``'s time belongs to."""
        shares = self.shares(func)
        return max(shares, key=shares.get)

    def totals(self):
        """``{group: seconds}`` over all functions, every group of `GROUPS` present."""
        out = {g: 0.0 for g, _ in GROUPS} | {OTHER: 0.0}
        for func, (_, _, tottime, _, _) in self.stats.items():
            for g, f in self.shares(func).items():
                out[g] += tottime * f
        return out


def describe(func, groups):
    """A short name of a profiled function: diagnet's label, or ``file:line(name)``."""
    label = groups.label(func)
    if label is not None:
        return label
    filename, line, name = func
    if filename == "~":  # a builtin
        return name
    return f"{Path(filename).name}:{line}({name})"


def profile_step(sizes, device, steps, warmup, top=15):
    """cProfile ``steps`` training steps of the diag 90% static ViT.

    Returns ``{"plain": median s/step unprofiled, "profiled": s/step under cProfile,
    "groups": {group: s/step}, "top": [(name, group, calls/step, own s/step), ...]}``.
    """
    step = diagnet_steps(sizes, "ViT", STATIC, device, seed=1)[0][sizes.train]
    for _ in range(warmup):
        step()
    plain = float(np.median([step() for _ in range(steps)]))
    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    profiled = (time.perf_counter() - t0) / steps
    stats = pstats.Stats(profiler)
    groups = ProfileGroups(stats)
    ranked = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    return {"plain": plain, "profiled": profiled,
            "groups": {g: s / steps for g, s in groups.totals().items()},
            "top": [(describe(f, groups), groups.group_of(f), v[1] / steps, v[2] / steps)
                    for f, v in ranked]}


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


#: the speed targets at the full sizes, against PyTorch measured in the same run:
#: (model, variant, measure, at most this x PyTorch's time)
TARGETS = [
    ("ViT", STATIC, FULL.train, 0.7),
    ("ViT", DENSE, FULL.train, 1.0),
    ("ViT", STATIC, "inference @ 1", 1.5),
    ("MLP", STATIC, FULL.train, 0.5),
    ("MLP", STATIC, "inference @ 1", 1.0),
]


def timing_table(ms, structures, params, torch_ms, measures):
    """The Markdown table: ms per measure, and x PyTorch when PyTorch was measured."""
    head = "| model | variant | diagonal layers | parameters | " + " | ".join(
        f"{m} (ms)" for m in measures)
    rule = "|---|---|---|---|" + "---|" * len(measures)
    if torch_ms:
        head += " | " + " | ".join(f"{m}: x PyTorch" for m in measures)
        rule += "---|" * len(measures)
    lines = [head + " |", rule]
    for model_name in MODELS:
        for variant in VARIANTS:
            row = [model_name, variant, structures[(model_name, variant)],
                   f"{params[(model_name, variant)]:,}"]
            row += [f"{ms[(model_name, variant, m)]:.3f}" for m in measures]
            if torch_ms:
                row += [fmt_ratio(ms[(model_name, variant, m)], torch_ms["ms"][model_name][m])
                        for m in measures]
            lines.append("| " + " | ".join(row) + " |")
        if torch_ms:
            row = [model_name, TORCH, "dense", f"{torch_ms['params'][model_name]:,}"]
            row += [f"{torch_ms['ms'][model_name][m]:.3f}" for m in measures]
            row += ["1.00"] * len(measures)
            lines.append("| " + " | ".join(row) + " |")
    return lines


def target_lines(ms, torch_ms):
    """One line per target of `TARGETS`: met or not, with the figures."""
    lines = ["| target | measured | met |", "|---|---|---|"]
    for model_name, variant, measure, limit in TARGETS:
        ratio = ms[(model_name, variant, measure)] / torch_ms["ms"][model_name][measure]
        lines.append(f"| {model_name} {variant}, {measure}: <= {limit}x PyTorch | {ratio:.2f}x "
                     f"({ms[(model_name, variant, measure)]:.3f} vs "
                     f"{torch_ms['ms'][model_name][measure]:.3f} ms) | "
                     f"{'yes' if ratio <= limit else '**no**'} |")
    return lines


def profile_lines(prof, steps, device, batch):
    """The profile section: time per group, then the top functions by own time."""
    total = sum(prof["groups"].values())
    lines = [
        f"### Where the time of the diagonal ViT's training step goes (batch {batch})",
        "",
        f"cProfile over {steps} steps of `{STATIC}`: {prof['plain'] * 1e3:.2f} ms per step "
        f"without the profiler, {prof['profiled'] * 1e3:.2f} ms under it (its cost per Python "
        "call inflates the engine and the small ops most). Own time (tottime) per step, "
        "grouped: a diagnet function by its module and name (the compiled kernels' time is "
        "their Python caller's), any other function (NumPy's wrappers, builtins such as "
        "`ufunc.at`, numba's dispatcher) by its callers. Batched `matmul` is attention's "
        "(the ViT's linear layers use the dense or diagonal linear op)."
        + (" On the GPU this is host time: the kernels run asynchronously, and the wait "
           "for them shows as \"waiting for the GPU\"." if device == "cuda" else ""),
        "",
        "| group | ms / step | share |",
        "|---|---|---|",
    ]
    for group, seconds in sorted(prof["groups"].items(), key=lambda kv: -kv[1]):
        if seconds > 0:
            lines.append(f"| {group} | {seconds * 1e3:.2f} | {seconds / total:.0%} |")
    lines += ["", "Top functions by own time:", "",
              "| function | group | calls / step | own ms / step |", "|---|---|---|---|"]
    for name, group, calls, own in prof["top"]:
        lines.append(f"| `{name}` | {group} | {calls:.0f} | {own * 1e3:.3f} |")
    return lines


def report(ms, structures, params, torch_ms, torch_note, prof, args, command, loads):
    """The Markdown section (a string)."""
    import numba

    vit, (n_in, hidden, n_out) = args.sizes.vit, args.sizes.mlp
    lines = [
        "## MNIST ViT and MLP: training step and inference, diagnet vs PyTorch",
        "",
        f"Generated by `{command}` on {datetime.date.today().isoformat()}"
        + (" (`--tiny`: small models and batches, for smoke tests; the figures mean nothing)"
           if args.tiny else " (`--quick`: a smoke run, too few steps for the figures to mean "
           "much)" if args.quick else "") + ".",
        "",
        f"* Machine: {machine(args.device)}; device `{args.device}`",
        f"* Python {platform.python_version()}, NumPy {np.__version__}, numba "
        f"{numba.__version__} ({numba.get_num_threads()} threads); "
        + (torch_ms["info"] + ", in a process of its own, its rounds between diagnet's"
           if torch_ms else torch_note),
        f"* ViT: {vit['patch_size']}x{vit['patch_size']} patches, width {vit['dim']}, depth "
        f"{vit['depth']}, {vit['heads']} heads, MLP ratio {vit['mlp_ratio']}, GELU, pre-norm; "
        f"MLP {n_in}-{'-'.join(map(str, hidden))}-{n_out}; float32, AdamW (lr {LR}, weight "
        f"decay {WEIGHT_DECAY}); inference in `eval()` mode under `no_grad`.",
        f"* Median of {args.steps * args.rounds} steps per variant and measure "
        f"({args.rounds} rounds of {args.steps}, order rotating, after {args.warmup} warm-up "
        "steps each).",
        f"* Load average (1 min) at start / end: {loads[0]:.2f} / {loads[1]:.2f} (on 2 cores "
        "anything above ~2.5 means other processes took cores during the run)",
        "",
    ]
    if torch_ms:
        lines += ["`x PyTorch` is `time of the variant / time of PyTorch's dense twin` in the "
                  "same run (below 1: faster than PyTorch). Parameters of the dense ViT: "
                  f"diagnet {params[('ViT', DENSE)]:,}, PyTorch twin "
                  f"{torch_ms['params']['ViT']:,}.", ""]
    else:
        lines += [f"{torch_note}: no PyTorch column and no ratios to it.", ""]
    lines += timing_table(ms, structures, params, torch_ms, args.sizes.measures)
    if torch_ms and not args.tiny:
        lines += ["", "Targets (time relative to PyTorch's dense twin, this run):", ""]
        lines += target_lines(ms, torch_ms)
    lines += [""] + profile_lines(prof, args.profile_steps, args.device,
                                  args.sizes.train_batch)
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="few steps and rounds; print the report, write nothing")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps per variant, measure and round (default 30; 3 with "
                         "--quick)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds, order rotating (default 4; 1 with --quick)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="warm-up steps per variant and measure (default 5; 1 with --quick)")
    ap.add_argument("--profile-steps", type=int, default=None,
                    help="profiled steps of the diagonal ViT (default 20; 2 with --quick)")
    ap.add_argument("--tiny", action="store_true",
                    help="small models (ViT width 16, depth 1; MLP 784-32-32-10) at batch 4 "
                         "and 1: every code path in seconds, e.g. through an emulated GPU; "
                         "implies --quick")
    ap.add_argument("--no-torch", action="store_true",
                    help="do not measure PyTorch even where it is installed")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where diagnet (and PyTorch) run (default cpu)")
    ap.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None,
                    help="Markdown file whose section to write (default docs/benchmarks.md, "
                         "docs/gpu-benchmarks.md with --device cuda; none with --quick)")
    args = ap.parse_args(argv)
    quick = args.quick = args.quick or args.tiny
    args.sizes = TINY if args.tiny else FULL
    args.steps = args.steps or (3 if quick else 30)
    args.rounds = args.rounds or (1 if quick else 4)
    args.warmup = args.warmup or (1 if quick else 5)
    args.profile_steps = args.profile_steps or (2 if quick else 20)
    for name in ("steps", "rounds", "warmup", "profile_steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.torch_child:
        torch_child(args)
        return
    if args.device == "cuda" and not backend.cuda_available():
        ap.error(f"--device cuda: {backend.cuda_unavailable_reason()}")

    load_start = load_average()
    server, torch_note = torch_server(args)
    if server is None:
        print(torch_note)
        ms, structures, params = measure(args)
        torch_ms = None
    else:
        with server:
            ms, structures, params = measure(args, server)
        torch_ms = {"info": server.info["info"], "params": server.info["params"],
                    "ms": {m: {k: ms.pop((m, TORCH, k)) for k in args.sizes.measures}
                           for m in MODELS}}
    prof = profile_step(args.sizes, args.device, args.profile_steps, args.warmup)
    command = "python bench/bench_vit_step.py " + " ".join(argv if argv is not None
                                                            else sys.argv[1:])
    text = report(ms, structures, params, torch_ms, torch_note, prof, args, command.strip(),
                  (load_start, load_average()))
    print(text)
    out = args.out or default_output(quick, args.device)
    if out:
        write_section(out, SECTION, text)
        print(f"wrote section {SECTION!r} of {out}")


if __name__ == "__main__":
    main()
