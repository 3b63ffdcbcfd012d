"""What the benchmark scripts share: where and how reports are written, timing in rotating
rounds, fresh-process runs, steps timed in a child process that stays up (`StepServer`), and
the lines that describe the machine.

Several benchmark scripts report into ``docs/benchmarks.md``. Each owns a section between
``<!-- begin: NAME -->`` and ``<!-- end: NAME -->``; a script that regenerates the whole file
(``bench_diag_linear.py``) keeps the other scripts' sections, so running one benchmark never
erases another's table, nor the hand-written sections (notes measured once) that no script
writes. Every write is atomic (`diagnet.tensorfile.atomic_write`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
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
            step = steps_by_name[name]
            if settle:
                step()
            many = getattr(step, "many", None)  # a RemoteStep runs a visit in one request
            times[name].extend(many(steps) if many else [step() for _ in range(steps)])
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


class StepServer:
    """A child process that times steps on request and stays up between requests, so that
    its visits interleave with this process's in `time_variants`' rotating rounds.

    A framework that must not share a process with diagnet (PyTorch: its thread pools beside
    numba's) is timed in such a child. Timed in one block before or after diagnet, a drift of
    the machine's speed during the run (other tenants, frequency) lands on one side of the
    ratio; interleaved, both sides see it. ``cmd`` starts the child, which calls
    `serve_steps`; `step` gives the callable for one of its steps. Use as a context manager
    (the child is told to quit on exit, and killed if it does not).
    """

    def __init__(self, cmd, what, env=None):
        self.what = what
        self._stderr = tempfile.TemporaryFile(mode="w+")  # a pipe could fill and block it
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._stderr, text=True, env=env, bufsize=1)
        try:
            self.info = self._reply("READY ")
        except BaseException:
            self.close()
            raise

    def _reply(self, tag):
        """The JSON of the child's next line starting with ``tag`` (other lines are skipped);
        RuntimeError with the child's output if it ends first."""
        skipped = []
        for line in self._proc.stdout:
            if line.startswith(tag):
                return json.loads(line[len(tag):])
            skipped.append(line)
        self._proc.wait()
        self._stderr.seek(0)
        raise RuntimeError(f"{self.what} failed (exit {self._proc.returncode}):\n"
                           f"{''.join(skipped)}\n{self._stderr.read()}")

    def run(self, key, steps):
        """Seconds of each of ``steps`` steps of the child's step ``key``, run back to back."""
        self._proc.stdin.write(json.dumps({"key": key, "steps": steps}) + "\n")
        self._proc.stdin.flush()
        return self._reply("RESULT ")

    def step(self, key):
        """A `RemoteStep` of ``key``, for `time_variants`."""
        return RemoteStep(self, key)

    def close(self):
        """Tell the child to quit and wait for it (killed after 30 s)."""
        try:
            self._proc.stdin.close()  # end of input: serve_steps returns
        except OSError:  # the child is gone: the buffered request could not be written
            pass
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc.stdout.close()
        self._stderr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RemoteStep:
    """One step of a `StepServer`: calling it runs one step in the child and returns its
    seconds; ``many(n)`` runs a visit of ``n`` steps in one request."""

    def __init__(self, server, key):
        self.server, self.key = server, key

    def __call__(self):
        """Seconds of one step, run in the child."""
        return self.server.run(self.key, 1)[0]

    def many(self, n):
        """Seconds of each of ``n`` steps run back to back in the child (one request)."""
        return self.server.run(self.key, n)


def torch_step_server(cmd):
    """``(server, "")``: a `StepServer` running ``cmd``, a PyTorch child that answers
    ``READY`` with ``{"why": ""}`` (or why it cannot measure: then it is closed); or ``(None,
    why PyTorch is not measured)``. This process never imports torch: checking that it
    imports is the child's job, so that nothing of PyTorch's (its own libgomp, its thread
    pools) runs beside diagnet's pools here."""
    if importlib.util.find_spec("torch") is None:
        return None, "PyTorch not installed"
    server = StepServer(cmd, "PyTorch child")
    if server.info["why"]:
        server.close()
        return None, server.info["why"]
    return server, ""


def serve_steps(steps_by_key, info, stdin=None, stdout=None):
    """The child's side of `StepServer`: print ``READY`` and the JSON ``info``, then answer
    each request line ``{"key", "steps"}`` with ``RESULT`` and the list of seconds that
    ``steps`` calls of ``steps_by_key[key]`` returned; return at the end of input. An
    unknown key or a bad request raises (the child exits and the parent reports it)."""
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    print("READY " + json.dumps(info), file=stdout, flush=True)
    for line in stdin:
        request = json.loads(line)
        step, steps = steps_by_key[request["key"]], int(request["steps"])
        print("RESULT " + json.dumps([step() for _ in range(steps)]), file=stdout, flush=True)


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

