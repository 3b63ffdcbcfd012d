"""What the benchmark scripts share: where and how reports are written, timing in rotating
rounds, fresh-process runs, and the lines that describe the machine.

Several benchmark scripts report into ``docs/benchmarks.md``. Each owns a section between
``<!-- begin: NAME -->`` and ``<!-- end: NAME -->``; a script that regenerates the whole file
(``bench_diag_linear.py``) keeps the other scripts' sections, so running one benchmark never
erases another's table, nor the hand-written sections (notes measured once) that no script
writes. Every write is atomic (`diagnet.tensorfile.atomic_write`).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from pathlib import Path

from diagnet import backend
from diagnet.tensorfile import atomic_write

_SECTION = re.compile(r"<!-- begin: (?P<name>[\w.-]+) -->\n.*?<!-- end: (?P=name) -->\n?", re.S)


DOCS = Path(__file__).resolve().parents[1] / "docs"


def default_output(quick: bool, device: str):
    """Where a report goes without ``--out``: ``docs/benchmarks.md`` (CPU) or
    ``docs/gpu-benchmarks.md`` (``device="cuda"``), and nowhere for ``--quick``.

    A ``--quick`` run is a smoke test on a subset; writing it over the committed tables would
    replace the measured results with a partial, noisier set, so it goes to stdout only.
    """
    if quick:
        return None
    return str(DOCS / ("benchmarks.md" if device == "cpu" else "gpu-benchmarks.md"))


def write_text(path, text):
    """Write ``text`` (UTF-8) to ``path`` atomically, creating the folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def sections(text):
    """``{name: marked block}`` of every section in ``text`` (markers included)."""
    return {m.group("name"): m.group(0) for m in _SECTION.finditer(text)}


def write_keeping_sections(path, text):
    """Write ``text`` to ``path``, appending the marked sections of the old file it lacks."""
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    kept = [block for name, block in sections(old).items() if name not in sections(text)]
    if kept:
        text = text.rstrip("\n") + "\n\n" + "\n".join(b.rstrip("\n") + "\n" for b in kept)
    write_text(path, text)


def write_section(path, name, body):
    """Put ``body`` between the markers of section ``name`` in ``path`` (appended if absent)."""
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    block = f"<!-- begin: {name} -->\n{body.rstrip()}\n<!-- end: {name} -->\n"
    found = sections(old).get(name)
    if found is not None:
        new = old.replace(found, block)
    else:
        new = (old.rstrip("\n") + "\n\n" if old else "") + block
    write_text(path, new)


def time_variants(steps_by_name, steps, warmup, rounds, settle=True):
    """``{name: [seconds, ...]}``: each callable of ``steps_by_name`` returns the seconds of one
    step; ``warmup`` untimed steps each, then ``rounds`` rounds in an order that rotates,
    ``steps`` timed steps per visit. With ``settle``, one untimed step before each visit, so
    that the previous variant's thread pools settle first."""
    names = list(steps_by_name)
    for name in names:
        for _ in range(warmup):
            steps_by_name[name]()
    times = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            if settle:
                steps_by_name[name]()
            times[name].extend(steps_by_name[name]() for _ in range(steps))
    return times


def child_result(cmd, what, env=None):
    """Run ``cmd`` in a fresh process and return the JSON it printed after ``RESULT `` on a
    line of its own; RuntimeError naming ``what``, with the child's output, if it failed.

    A fresh process measures what one process cannot: thread pools at other settings, or
    PyTorch without diagnet's pools beside it."""
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if res.returncode or line is None:
        raise RuntimeError(f"{what} failed:\n{res.stdout}\n{res.stderr}")
    return json.loads(line[len("RESULT "):])


def fmt_ratio(num, den):
    """``num / den`` with two decimals, or a dash where either was not measured."""
    return "—" if num is None or den is None else f"{num / den:.2f}"


def gpu_name():
    """The current CUDA device's name, as CuPy reports it ("unknown device" where it cannot)."""
    cp = backend.cupy_or_none()
    try:
        name = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"]
    except Exception:  # no properties (the CPU stand-in of the tests, an old CuPy)
        return "unknown device"
    return name.decode() if isinstance(name, bytes) else str(name)


def machine(device="cpu"):
    """A line naming the machine: CPU model and cores, and the GPU with ``device="cuda"``."""
    model, cores = platform.processor() or platform.machine(), os.cpu_count()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    text = f"{model}, {cores} cores"
    if hasattr(os, "sched_getaffinity"):
        text += f" ({len(os.sched_getaffinity(0))} usable)"
    if device == "cuda":
        text += f"; GPU: {gpu_name()} (CuPy {backend.cupy_or_none().__version__})"
    return text


def load_average():
    """The 1-minute load average (NaN where the system has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

