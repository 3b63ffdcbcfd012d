"""Benchmark the diagonal kernels against dense and CSR baselines; write a Markdown report.

    python bench/bench_diag_linear.py                  # full CPU grid -> docs/benchmarks.md
    python bench/bench_diag_linear.py --quick          # a smoke subset, report on stdout only
    python bench/bench_diag_linear.py --device cuda    # GPU grid -> docs/gpu-benchmarks.md

For every weight shape, batch size and sparsity (float32) it times, in one process:

* **forward** ``y = x @ W.T``: our kernel (`diagnet.diag.cpu` / `diagnet.diag.cuda`), the
  dense matmul, and the CSR product (the faster of ``x @ W_csr.T`` and ``W_csr @ x.T``);
* **forward + backward** (forward, input grad, value grad): our three kernels, the three
  dense matmuls ``x @ W.T``, ``dy @ W``, ``dy.T @ x``, and the CSR version: the CSR forward,
  ``dy @ W_csr`` for the input grad, and for the value grad the gradient of the *stored
  entries only* -- ``dW[i, j] = dy[:, i] . x[:, j]`` for each nonzero ``(i, j)``. SciPy has no
  sampled dense-dense product, so we compute it as ``einsum("ib,ib->i", dy.T[rows],
  x.T[cols])`` over chunks of the nonzeros (the two transposes are included in the time).
  This does the same ``B * nnz`` multiply-adds as our value grad; the dense alternative,
  ``dy.T @ x`` read at the nonzeros, would be the dense matmul again.

Times are medians over blocks of back-to-back calls after a warm-up call. The variants of one
configuration are timed in blocks, in four rounds with the order rotating, and each variant
reports its lowest block median: on a shared machine, a round in which other processes took
the cores is discarded rather than averaged in. (Alternating the variants call by call would
instead measure thread pools waking up and competing: numba's and OpenBLAS's; the report has
a section on that cost.) Tables report ``baseline time / our time``: above 1 means ours is
faster. The three headline ratios (768 x 768, batch 256) are measured once more with a larger
budget.

On the CPU, numba uses all cores (its default) and NumPy's BLAS its default threads. The
environment variables ``OPENBLAS_CORETYPE`` and ``OPENBLAS_L2_SIZE`` can force a slow BLAS
kernel; the script restarts itself without them so that the dense baseline is honest (pass
``--keep-blas-env`` to keep them).
"""

from __future__ import annotations

import os
import sys

_BLAS_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
if (__name__ == "__main__" and "--keep-blas-env" not in sys.argv
        and any(v in os.environ for v in _BLAS_ENV)):
    # Must happen before NumPy loads OpenBLAS, which reads these once.
    removed = [v for v in _BLAS_ENV if v in os.environ]
    env = {k: v for k, v in os.environ.items() if k not in _BLAS_ENV}
    env["DIAGNET_BENCH_REMOVED_ENV"] = ",".join(removed)
    print(f"note: restarting without {', '.join(removed)} (they slow NumPy's BLAS)",
          file=sys.stderr)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)

import argparse  # noqa: E402
import datetime  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import scipy  # noqa: E402
import scipy.sparse  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "bench"):  # run from a checkout without installing; bench/reports.py
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from diagnet import backend  # noqa: E402
from diagnet.diag import layout, threadpools  # noqa: E402
from reports import (default_output, gpu_name, load_average, machine,  # noqa: E402
                     write_keeping_sections)

# (out_features m, in_features n, note)
SHAPES = [
    (768, 768, "transformer width"),
    (3072, 768, "MLP up-projection"),
    (256, 784, "MNIST first layer"),
    (256, 256, ""),
]
BATCHES = [1, 32, 256, 1024]
SPARSITIES = [0.5, 0.9, 0.95, 0.99]
QUICK = dict(shapes=[(768, 768, "transformer width"), (256, 784, "MNIST first layer")],
             batches=[32, 256], sparsities=[0.9, 0.95])

# Per configuration the six variants share BUDGET_S seconds of timed calls, in ROUNDS
# rounds of one block of back-to-back calls each (see time_in_blocks).
ROUNDS = 4
MAX_CALLS = 200
BUDGET_S = 2.0
QUICK_BUDGET_S = 0.6
# Nonzeros per chunk in the CSR value grad (bounds its temporaries to ~64 MB at B = 1024).
VG_CHUNK_ELEMENTS = 16 * 1024 * 1024


# --------------------------------------------------------------------------------------
# Problem setup (shared by CPU and GPU)
# --------------------------------------------------------------------------------------


@dataclass
class Problem:
    """One configuration: weight shape, batch, sparsity, and its NumPy arrays."""

    m: int
    n: int
    B: int
    sparsity: float
    K: int = 0
    arrays: dict = field(default_factory=dict)

    @property
    def L(self):
        return min(self.m, self.n)

    @property
    def flops(self):
        """Multiply-adds x 2 of one diagonal product (each of the three kernels)."""
        return 2 * self.B * self.K * self.L


def make_problem(m, n, B, sparsity, rng):
    """Random float32 inputs and a random diagonal weight at ``sparsity``."""
    P, L = max(m, n), min(m, n)
    K = layout.diagonals_for_sparsity((m, n), sparsity)
    offsets = np.sort(rng.choice(P, size=K, replace=False)).astype(np.int64)
    values = (rng.standard_normal((K, L)) / math.sqrt(max(1, K))).astype(np.float32)
    rows, cols = layout.diagonal_coordinates((m, n), offsets)
    return Problem(m, n, B, sparsity, K, dict(
        x=rng.standard_normal((B, n)).astype(np.float32),
        dy=rng.standard_normal((B, m)).astype(np.float32),
        offsets=offsets, values=values,
        rows=rows.ravel(), cols=cols.ravel(),
    ))


def sampled_product(xp, dy, x, rows, cols):
    """``out[e] = dy[:, rows[e]] . x[:, cols[e]]`` for every stored entry ``e`` (chunked)."""
    dyT = xp.ascontiguousarray(dy.T)
    xT = xp.ascontiguousarray(x.T)
    nnz = rows.shape[0]
    out = xp.empty(nnz, dtype=dy.dtype)
    step = max(1, VG_CHUNK_ELEMENTS // max(1, dy.shape[0]))
    for s in range(0, nnz, step):
        e = slice(s, min(nnz, s + step))
        out[e] = xp.einsum("ib,ib->i", dyT[rows[e]], xT[cols[e]])
    return out


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


def time_in_blocks(fns, timer, budget_s, rounds=ROUNDS, min_calls=3, max_calls=MAX_CALLS):
    """Seconds per call of each callable in ``fns`` (a dict): the lowest of its block medians.

    ``timer(fn)`` returns the duration of one call. In each of ``rounds`` rounds every
    variant runs one block of back-to-back calls (after one untimed warm-up call, which also
    wakes thread pools), the order rotating between rounds; block sizes share ``budget_s``
    evenly, with at least ``min_calls`` calls (one for calls slower than 0.1 s). Taking the
    best block median discards a round in which other processes took the cores.
    """
    est = {}
    for name, fn in fns.items():
        fn()
        est[name] = timer(fn)
    per_block = budget_s / (rounds * len(fns))
    medians = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn = fns[name]
            slow = est[name] > 0.1
            if not slow:
                fn()
            calls = 1 if slow else int(min(max_calls, max(min_calls, per_block / est[name])))
            medians[name].append(float(np.median([timer(fn) for _ in range(calls)])))
    return {name: min(v) for name, v in medians.items()}


def cpu_timer(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------
# CPU
# --------------------------------------------------------------------------------------


def cpu_variants(p):
    """The six callables of one configuration on the CPU."""
    from diagnet.diag import cpu

    a = p.arrays
    x, dy, offsets, values = a["x"], a["dy"], a["offsets"], a["values"]
    rows, cols = a["rows"], a["cols"]
    m, n = p.m, p.n
    W = np.zeros((m, n), dtype=np.float32)
    W[rows, cols] = values.ravel()
    Wc = scipy.sparse.csr_matrix((values.ravel(), (rows, cols)), shape=(m, n))
    WcT = Wc.T  # CSC view; x @ WcT is SciPy's own choice of kernel

    def ours_fwd():
        return cpu.forward(x, offsets, values, m)

    def ours_all():
        return (cpu.forward(x, offsets, values, m), cpu.input_grad(dy, offsets, values, n),
                cpu.value_grad(dy, x, offsets))

    def dense_fwd():
        return x @ W.T

    def dense_all():
        return x @ W.T, dy @ W, dy.T @ x

    # CSR forward: use whichever orientation SciPy runs faster for this configuration
    csr_forms = {"x @ W_csr.T": lambda: x @ WcT, "W_csr @ x.T": lambda: Wc @ x.T}
    times = time_in_blocks(csr_forms, cpu_timer, budget_s=0.2, rounds=1)
    csr_form = min(times, key=times.get)
    csr_fwd = csr_forms[csr_form]

    def csr_all():
        return (csr_fwd(), dy @ Wc, sampled_product(np, dy, x, rows, cols))

    fns = dict(ours_fwd=ours_fwd, dense_fwd=dense_fwd, csr_fwd=csr_fwd,
               ours_all=ours_all, dense_all=dense_all, csr_all=csr_all)
    return fns, csr_form


def check_results(p, xp, kernels):
    """Our forward and input grad agree with the dense products (catches a broken build)."""
    a = {k: xp.asarray(v) for k, v in p.arrays.items()}
    W = xp.zeros((p.m, p.n), dtype=xp.float64)
    W[a["rows"], a["cols"]] = a["values"].ravel()
    x, dy = a["x"].astype(xp.float64), a["dy"].astype(xp.float64)
    checks = [
        ("forward", kernels.forward(a["x"], a["offsets"], a["values"], p.m), x @ W.T,
         xp.abs(x) @ xp.abs(W).T),
        ("input_grad", kernels.input_grad(a["dy"], a["offsets"], a["values"], p.n), dy @ W,
         xp.abs(dy) @ xp.abs(W)),
    ]
    for name, got, want, scale in checks:
        if not bool(xp.all(xp.abs(got - want) <= 1e-4 * scale + 1e-30)):
            raise AssertionError(f"{name} disagrees with the dense product for "
                                 f"{p.m}x{p.n}, B={p.B}, K={p.K}")


def wakeup_section(rng):
    """Back-to-back calls vs calls after an idle pause (thread pools asleep), on the CPU."""
    from diagnet.diag import cpu

    p = make_problem(768, 768, 256, 0.9, rng)
    a = p.arrays
    W = np.zeros((p.m, p.n), dtype=np.float32)
    W[a["rows"], a["cols"]] = a["values"].ravel()
    fns = {"ours forward": lambda: cpu.forward(a["x"], a["offsets"], a["values"], p.m),
           "dense forward": lambda: a["x"] @ W.T}
    lines = ["## Thread wake-up (768 x 768, batch 256, sparsity 0.9)", "",
             "The tables time back-to-back calls. In a training step other work runs between",
             "kernel calls, and a call may find the worker threads (numba's, or OpenBLAS's)",
             "asleep. Median of 30 calls each preceded by a 5 ms pause, vs back-to-back:", "",
             "| call | back-to-back (µs) | after 5 ms idle (µs) |", "|---|---|---|"]
    for name, fn in fns.items():
        hot = time_in_blocks({name: fn}, cpu_timer, 0.3)[name]
        cold = []
        for _ in range(30):
            time.sleep(0.005)
            cold.append(cpu_timer(fn))
        lines.append(f"| {name} | {hot * 1e6:.0f} | {float(np.median(cold)) * 1e6:.0f} |")
    lines.append("")
    return lines


# --------------------------------------------------------------------------------------
# GPU (only with --device cuda; CuPy comes from diagnet.backend)
# --------------------------------------------------------------------------------------


def gpu_peaks(cp):
    """``(bytes/s, flop/s)`` of the current device for float32, or ``None`` if unknown.

    Bandwidth is ``2 * memory clock * bus width``; FP32 peak is ``2 * SMs * clock * cores/SM``
    with 64 FP32 lanes per SM on compute capability 8.0 and 128 on 8.6 and later (including
    9.0). Some CUDA versions no longer report the clocks; then there is no roofline column.
    """
    try:
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        mem_khz = props["memoryClockRate"]
        bus_bits = props["memoryBusWidth"]
        sm_khz = props["clockRate"]
        sms = props["multiProcessorCount"]
        cc = (props["major"], props["minor"])
    except Exception:
        return None
    if not (mem_khz and bus_bits and sm_khz and sms):
        return None
    lanes = 64 if cc == (8, 0) else 128
    return 2.0 * mem_khz * 1e3 * bus_bits / 8, 2.0 * sms * sm_khz * 1e3 * lanes


def gpu_floor_s(p, peaks, what):
    """Roofline floor of our kernels: ``max(bytes / bandwidth, flops / peak)``."""
    if peaks is None:
        return None
    bw, peak = peaks
    item = 4
    ops = (p.B * p.n + p.K * p.L + p.B * p.m) * item  # each kernel reads two, writes one
    n_kernels = 1 if what == "fwd" else 3
    return max(n_kernels * ops / bw, n_kernels * p.flops / peak)


def gpu_variants(p, cp):
    """The six callables of one configuration on the GPU."""
    import cupyx.scipy.sparse  # part of CuPy; only reached once backend handed us CuPy

    from diagnet.diag import cuda

    a = {k: cp.asarray(v) for k, v in p.arrays.items()}
    x, dy, values = a["x"], a["dy"], a["values"]
    # int32 once, as a layer holds them (int64 would add a conversion launch per call)
    offsets = cuda.prepare_offsets(a["offsets"])
    rows, cols = a["rows"], a["cols"]
    m, n = p.m, p.n
    W = cp.zeros((m, n), dtype=cp.float32)
    W[rows, cols] = values.ravel()
    Wc = cupyx.scipy.sparse.csr_matrix((values.ravel(), (rows, cols)), shape=(m, n))
    WcT = Wc.T.tocsr()

    def ours_fwd():
        return cuda.forward(x, offsets, values, m)

    def ours_all():
        return (cuda.forward(x, offsets, values, m), cuda.input_grad(dy, offsets, values, n),
                cuda.value_grad(dy, x, offsets))

    def dense_fwd():
        return x @ W.T

    def dense_all():
        return x @ W.T, dy @ W, dy.T @ x

    # cuSPARSE SpMM in whichever orientation CuPy supports and runs faster here
    timer = gpu_timer(cp)
    csr_forms = _working({"W_csr @ x.T": lambda: Wc @ x.T, "x @ W_csr.T": lambda: x @ Wc.T})
    times = time_in_blocks(csr_forms, timer, budget_s=0.2, rounds=1)
    csr_form = min(times, key=times.get)
    csr_fwd = csr_forms[csr_form]
    grad_forms = _working({"dy @ W_csr": lambda: dy @ Wc,
                           "(W_csr.T @ dy.T).T": lambda: (WcT @ dy.T).T})
    csr_input_grad = next(iter(grad_forms.values()))

    def csr_all():
        return csr_fwd(), csr_input_grad(), sampled_product(cp, dy, x, rows, cols)

    fns = dict(ours_fwd=ours_fwd, dense_fwd=dense_fwd, csr_fwd=csr_fwd,
               ours_all=ours_all, dense_all=dense_all, csr_all=csr_all)
    return fns, csr_form


def _working(forms):
    """The entries of ``forms`` whose call succeeds (CuPy's sparse API differs by version)."""
    ok = {}
    for name, fn in forms.items():
        try:
            fn()
            ok[name] = fn
        except (NotImplementedError, TypeError, ValueError, AttributeError):
            pass
    if not ok:
        raise RuntimeError(f"none of {list(forms)} works with this CuPy version")
    return ok


def gpu_timer(cp):
    """Time one call with CUDA events on the current stream (seconds)."""
    start, stop = cp.cuda.Event(), cp.cuda.Event()

    def timer(fn):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        return cp.cuda.get_elapsed_time(start, stop) * 1e-3

    return timer


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [f for f in ("avx2", "fma", "avx512f") if f in flags]
    except OSError:
        pass
    return []


def blas_info():
    """BLAS name/version from NumPy's build config, plus threadpoolctl's view if installed."""
    text = "unknown BLAS"
    try:
        cfg = np.show_config(mode="dicts")
        blas = cfg["Build Dependencies"]["blas"]
        text = f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:
        pass
    try:
        import threadpoolctl

        for info in threadpoolctl.threadpool_info():
            if info.get("user_api") == "blas":
                text += (f" (threadpoolctl: {info.get('internal_api')} "
                         f"{info.get('architecture', '')}, {info.get('num_threads')} threads)")
                break
    except ImportError:
        pass
    return text


def header(device, args, env_note, gpu=None):
    import numba

    lines = [
        "# Diagonal linear layer benchmarks",
        "",
        f"Generated by `python bench/bench_diag_linear.py{' --quick' if args.quick else ''}"
        f"{' --device cuda' if device == 'cuda' else ''}` on {datetime.date.today().isoformat()}.",
        "",
        f"* Machine: {machine()}"
        + (f", flags {'/'.join(cpu_flags())}" if cpu_flags() else ""),
        f"* Python {platform.python_version()}, NumPy {np.__version__}, SciPy {scipy.__version__},"
        f" numba {numba.__version__} ({numba.get_num_threads()} threads,"
        f" {numba.threading_layer() if _numba_layer_known() else 'default'} layer)",
        f"* BLAS: {blas_info()}",
    ]
    if gpu:
        lines.append(f"* GPU: {gpu}")
    if env_note:
        lines.append(f"* {env_note}")
    lines += [
        "* Load average at start / end: {load_start} / {load_end} (other processes on the"
        " machine make threaded timings noisy)",
        "",
        "How to read the tables: each ratio is `baseline time / our time` in float32, so above",
        "1 means our kernel is faster. `fwd` is `y = x @ W.T`; `fwd+bwd` is forward, input grad",
        "and value grad. Baselines:",
        "",
        "* **dense**: NumPy (CuPy) matmul with the dense weight; `x @ W.T` for fwd, plus",
        "  `dy @ W` and `dy.T @ x` for fwd+bwd.",
        "* **CSR**: SciPy (cuSPARSE) with the same nonzeros; the faster of `x @ W_csr.T` and",
        "  `W_csr @ x.T` for fwd, plus `dy @ W_csr` and, for the value grad, the gradient of the",
        "  stored entries only (`einsum` over gathered rows of `dy.T` and `x.T`, chunked): the",
        "  same `B * nnz` multiply-adds as ours, as SciPy has no sampled dense-dense product.",
        "",
        "Timing: blocks of back-to-back calls after a warm-up call, four rounds with the order",
        "of the variants rotating; each variant keeps its lowest block median. `K` is the",
        "number of stored diagonals out of `max(out, in)`.",
        "",
    ]
    return lines


def _numba_layer_known():
    try:
        import numba

        numba.threading_layer()
        return True
    except Exception:
        return False


def shape_table(m, n, note, results, device, peaks):
    label = f"## out = {m}, in = {n}" + (f" ({note})" if note else "")
    cols = ["batch", "sparsity", "K", "ours fwd (µs)", "fwd vs dense", "fwd vs CSR",
            "ours fwd+bwd (µs)", "fwd+bwd vs dense", "fwd+bwd vs CSR"]
    if device == "cuda" and peaks is not None:
        cols += ["fwd roofline floor (µs)", "fwd % of floor"]
    lines = [label, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        t = r["times"]
        row = [str(r["B"]), f"{r['sparsity']:g}", str(r["K"]),
               f"{t['ours_fwd'] * 1e6:.1f}", f"{t['dense_fwd'] / t['ours_fwd']:.2f}",
               f"{t['csr_fwd'] / t['ours_fwd']:.2f}", f"{t['ours_all'] * 1e6:.1f}",
               f"{t['dense_all'] / t['ours_all']:.2f}", f"{t['csr_all'] / t['ours_all']:.2f}"]
        if device == "cuda" and peaks is not None:
            floor = r["floor_fwd"]
            row += [f"{floor * 1e6:.1f}", f"{100 * floor / t['ours_fwd']:.0f}%"]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    return lines


def absolute_table(all_results):
    """Median times of every variant (µs), for reference."""
    lines = ["## Absolute times (µs, median)", "",
             "| out x in | batch | sparsity | ours fwd | dense fwd | CSR fwd | CSR fwd form "
             "| ours fwd+bwd | dense fwd+bwd | CSR fwd+bwd |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in all_results:
        t = r["times"]
        lines.append(
            f"| {r['m']}x{r['n']} | {r['B']} | {r['sparsity']:g} | {t['ours_fwd'] * 1e6:.1f} | "
            f"{t['dense_fwd'] * 1e6:.1f} | {t['csr_fwd'] * 1e6:.1f} | `{r['csr_form']}` | "
            f"{t['ours_all'] * 1e6:.1f} | {t['dense_all'] * 1e6:.1f} | "
            f"{t['csr_all'] * 1e6:.1f} |")
    lines.append("")
    return lines


HEADLINE_BUDGET_S = 8.0
HEADLINE_ROUNDS = 8


def headline_section(rng, budget_s=HEADLINE_BUDGET_S, rounds=HEADLINE_ROUNDS):
    """The three headline ratios of the CPU kernels (768 x 768, batch 256), measured again
    with a larger budget and more rounds than the grid, so that one busy phase of a shared
    machine cannot decide them."""
    from diagnet.diag import cpu

    times = {}
    for s in (0.9, 0.95):
        p = make_problem(768, 768, 256, s, rng)
        check_results(p, np, cpu)
        fns, _ = cpu_variants(p)
        times[s] = time_in_blocks(fns, cpu_timer, budget_s, rounds=rounds, max_calls=1000)
    t90, t95 = times[0.9], times[0.95]
    rows = [
        ("sparsity 0.9: fwd vs dense `x @ W.T`", 2, t90["dense_fwd"] / t90["ours_fwd"]),
        ("sparsity 0.9: fwd+bwd vs the 3 dense matmuls", 2, t90["dense_all"] / t90["ours_all"]),
        ("sparsity 0.95: fwd vs SciPy CSR", 4, t95["csr_fwd"] / t95["ours_fwd"]),
    ]
    lines = ["## Headline (768 x 768, batch 256, float32)", "",
             f"Measured separately from the grid: {budget_s:g} s and {rounds} rounds per "
             "sparsity.", "",
             "| check | target | measured | ours (µs) | baseline (µs) |", "|---|---|---|---|---|"]
    pairs = [(t90, "ours_fwd", "dense_fwd"), (t90, "ours_all", "dense_all"),
             (t95, "ours_fwd", "csr_fwd")]
    for (name, target, ratio), (t, ours, base) in zip(rows, pairs):
        lines.append(f"| {name} | >= {target} | {ratio:.2f} | {t[ours] * 1e6:.0f} | "
                     f"{t[base] * 1e6:.0f} |")
        print(f"headline: {name}: {ratio:.2f} (target {target})")
    lines.append("")
    return lines


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small subset (smoke test)")
    ap.add_argument("--out", default=None,
                    help="Markdown report to write (default: docs/benchmarks.md for the full "
                         "CPU grid, docs/gpu-benchmarks.md for the full GPU grid, none for "
                         "--quick, whose report is printed)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--keep-blas-env", action="store_true",
                    help="keep OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (see the module docstring)")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        threadpools.configure()  # as the dispatch would: the kernels are called directly here

    cp = None
    peaks = None
    gpu = None
    if args.device == "cuda":
        cp = backend.cupy_or_none()
        if cp is None:
            sys.exit(f"--device cuda: {backend.cuda_unavailable_reason()}")
        gpu = gpu_name()
        peaks = gpu_peaks(cp)

    grid = QUICK if args.quick else dict(shapes=SHAPES, batches=BATCHES, sparsities=SPARSITIES)
    budget = QUICK_BUDGET_S if args.quick else BUDGET_S
    removed = os.environ.get("DIAGNET_BENCH_REMOVED_ENV")
    env_note = (f"{removed.replace(',', ' and ')} removed from the environment for this run"
                if removed else "")
    if args.keep_blas_env and any(v in os.environ for v in _BLAS_ENV):
        env_note = "OpenBLAS tuning variables kept: " + ", ".join(
            f"{v}={os.environ[v]}" for v in _BLAS_ENV if v in os.environ)

    rng = np.random.default_rng(0)
    load_start = load_average()
    t_begin = time.perf_counter()
    all_results = []
    body = []
    for m, n, note in grid["shapes"]:
        shape_results = []
        for B in grid["batches"]:
            for s in grid["sparsities"]:
                p = make_problem(m, n, B, s, rng)
                if cp is None:
                    from diagnet.diag import cpu

                    check_results(p, np, cpu)
                    fns, form = cpu_variants(p)
                    times = time_in_blocks(fns, cpu_timer, budget)
                else:
                    from diagnet.diag import cuda

                    check_results(p, cp, cuda)
                    fns, form = gpu_variants(p, cp)
                    times = time_in_blocks(fns, gpu_timer(cp), budget)
                r = dict(m=m, n=n, B=B, sparsity=s, K=p.K, times=times, csr_form=form)
                if cp is not None:
                    r["floor_fwd"] = gpu_floor_s(p, peaks, "fwd")
                shape_results.append(r)
                all_results.append(r)
                t = times
                print(f"{m:5d}x{n:<4d} B={B:<5d} s={s:<5g} K={p.K:<5d} "
                      f"fwd {t['ours_fwd'] * 1e6:9.1f} µs"
                      f"  x{t['dense_fwd'] / t['ours_fwd']:6.2f} dense"
                      f"  x{t['csr_fwd'] / t['ours_fwd']:6.2f} csr | "
                      f"fwd+bwd {t['ours_all'] * 1e6:9.1f} µs"
                      f"  x{t['dense_all'] / t['ours_all']:6.2f} dense"
                      f"  x{t['csr_all'] / t['ours_all']:6.2f} csr", flush=True)
        body += shape_table(m, n, note, shape_results, args.device, peaks)
    headline = []
    if cp is None:
        headline = headline_section(rng, 1.0, 3) if args.quick else headline_section(rng)
    extra = wakeup_section(rng) if cp is None else []
    load_end = load_average()
    elapsed = time.perf_counter() - t_begin

    head = header(args.device, args, env_note, gpu)
    head = [line.replace("{load_start}", f"{load_start:.2f}")
            .replace("{load_end}", f"{load_end:.2f}") for line in head]
    text = "\n".join(head + headline + body
                     + extra + absolute_table(all_results)
                     + [f"Total benchmark time: {elapsed:.0f} s.", ""])
    out = args.out or default_output(args.quick, args.device)
    if out is None:
        print(text)
        print(f"(--quick: report not written; {elapsed:.0f} s)")
    else:
        write_keeping_sections(out, text)  # other benchmarks' sections stay
        print(f"wrote {out} ({elapsed:.0f} s)")


if __name__ == "__main__":
    main()
