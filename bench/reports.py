"""Writing benchmark reports into docs: whole files, or one marked section of a shared file.

Several benchmark scripts report into ``docs/benchmarks.md``. Each owns a section between
``<!-- begin: NAME -->`` and ``<!-- end: NAME -->``; a script that regenerates the whole file
(``bench_diag_linear.py``) keeps the other scripts' sections, so running one benchmark never
erases another's table. Every write is atomic (`diagnet.tensorfile.atomic_write`).
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

from diagnet import backend
from diagnet.tensorfile import atomic_write

_SECTION = re.compile(r"<!-- begin: (?P<name>[\w.-]+) -->\n.*?<!-- end: (?P=name) -->\n?", re.S)


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

