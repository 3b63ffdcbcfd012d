"""Build ``tests/simt/harness.cpp`` with g++ and run emulated kernel launches through it.

The harness #includes one real ``kernels/<name>.cu`` and the table of its entry points,
``tests/simt/<name>.kernels.h`` (see ``harness.cpp`` for the file protocol and
``cuda_shim.h`` for the emulation model). A build is specific to one source, one set of
``-D`` options (the launcher's tuning constants and dtype selection, exactly as it passes them
to NVRTC) and one *flavor*:

* ``asan``: AddressSanitizer + UBSan, so any out-of-bounds access of a kernel aborts the run
  (every array is a heap block of exactly its size);
* ``tsan``: ThreadSanitizer, which reports data races between the emulated CUDA threads (a
  missing ``__syncthreads``);
* ``tsan-broken-sync``: ThreadSanitizer with ``__syncthreads`` compiled to a no-op (a self
  test: the races must then be reported);
* ``plain``: no sanitizer; about twice as fast, for bulk runs where memory errors are
  already covered by the ``asan`` tests.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import os
import shutil
import struct
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np

SIMT_DIR = Path(__file__).resolve().parent
ROOT = SIMT_DIR.parents[1]
KERNEL_DIR = ROOT / "kernels"

GXX = shutil.which("g++")
NO_GXX_REASON = "g++ is not on PATH: cannot build the SIMT emulation harness"

SANITIZERS = {
    "asan": ["-g1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
    "tsan": ["-g1", "-fsanitize=thread"],
    "tsan-broken-sync": ["-g1", "-fsanitize=thread", "-DSIMT_BROKEN_SYNCTHREADS"],
    "plain": [],
}
SANITIZER_ENV = {
    "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:exitcode=86",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
    "TSAN_OPTIONS": "halt_on_error=0:exitcode=66",
}


class HarnessError(RuntimeError):
    """A harness build failed, or an emulated launch exited with an error."""


class HarnessBuilder:
    """Builds tests/simt/harness.cpp once per (source, options, flavor), in parallel when asked.

    ``source`` is the name of a ``kernels/*.cu`` file, e.g. ``"diag_linear.cu"``.

    ``flavor`` is the default flavor for correctness runs: ``"asan"``, or ``"plain"`` once
    `check_flavor` found that sanitized binaries cannot run here.
    """

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self._lock = threading.Lock()
        self._futures: dict = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)))
        self._count = 0
        self.flavor = "asan"
        self.fallback_reason = ""  # why flavor fell back to "plain" ("" when it did not)
        self._flavor_checked = False

    def command(self, source, options, flavor, out: Path):
        """The g++ command line that builds the harness of ``source`` with ``options`` as
        ``flavor``."""
        if GXX is None:
            raise HarnessError(NO_GXX_REASON)
        table = kernel_table(source)
        for opt in options:
            if not opt.startswith("-D"):
                raise AssertionError(f"the launcher passed a non -D option {opt!r} to RawModule")
        return [GXX, "-std=c++20", "-O1", "-pthread", "-Wall", "-Wextra", "-Werror",
                "-Wno-unknown-pragmas", *SANITIZERS[flavor], f"-I{SIMT_DIR}", f"-I{KERNEL_DIR}",
                f'-DSIMT_SOURCE="{source}"', f'-DSIMT_TABLE="{table.name}"',
                *options, str(SIMT_DIR / "harness.cpp"), "-o", str(out)]

    def _build(self, source, options, flavor):
        with self._lock:
            self._count += 1
            out = self.workdir / f"harness_{Path(source).stem}_{flavor}_{self._count}"
        res = subprocess.run(self.command(source, options, flavor, out), capture_output=True,
                             text=True, timeout=300)
        if res.returncode != 0:
            raise HarnessError(f"g++ failed to build the harness ({flavor}):\n{res.stderr}")
        return out

    def submit(self, source, options, flavor="asan"):
        """Start building (or join the running build of) ``source`` with ``options`` as
        ``flavor``; a Future."""
        key = (source, tuple(options), flavor)
        with self._lock:
            if key not in self._futures:
                self._futures[key] = self._pool.submit(self._build, *key)
            return self._futures[key]

    def build(self, source, options, flavor="asan") -> Path:
        """The path of the harness of ``source`` built with ``options`` as ``flavor`` (built
        once)."""
        return self.submit(source, options, flavor).result()

    def check_flavor(self, source, options) -> str:
        """Fall back to ``"plain"`` (with a warning) when an ``asan`` build of ``source`` with
        ``options`` cannot run here; returns the reason ('' when ASan works).

        (ASan needs to map its shadow memory; some sandboxes and emulators refuse.) Emulation
        still works without it, only without out-of-bounds detection.
        """
        with self._lock:
            if self._flavor_checked:
                return self.fallback_reason
            self._flavor_checked = True
        reason = binary_unusable(self, "asan", source, options)
        if reason:
            self.flavor, self.fallback_reason = "plain", reason
            warnings.warn(f"SIMT harness runs without AddressSanitizer: {reason}")
        return reason

    def shutdown(self):
        self._pool.shutdown(wait=True)


def kernel_table(source) -> Path:
    """``tests/simt/<name>.kernels.h``, the table of the entry points of ``kernels/<name>.cu``."""
    if not (KERNEL_DIR / source).is_file():
        raise HarnessError(f"no kernel source {KERNEL_DIR / source}")
    table = SIMT_DIR / f"{Path(source).stem}.kernels.h"
    if not table.is_file():
        raise HarnessError(f"{source} has no table of entry points for the harness: write "
                           f"{table.relative_to(ROOT)} (one SIMT_KERNEL(name) per entry point)")
    return table


def binary_unusable(builder: HarnessBuilder, flavor: str, source, options) -> str:
    """'' if a ``flavor`` build of the harness of ``source`` compiles and runs here, else why
    not."""
    try:
        binary = builder.build(source, tuple(options), flavor)
    except HarnessError as exc:
        return f"g++ cannot build the {flavor} harness here: {str(exc)[-300:]}"
    res = subprocess.run([str(binary)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, **SANITIZER_ENV})
    if "usage" not in res.stderr:
        return f"{flavor} binaries do not run here: {res.stderr[-300:]}"
    return ""


_shared: HarnessBuilder | None = None
_shared_lock = threading.Lock()


def shared_builder() -> HarnessBuilder:
    """One builder per process, in a temporary directory removed at exit.

    Shared by the kernel tests and the ``--fake-cupy`` stand-in, so a harness built for one
    set of options is built once per test session.
    """
    global _shared
    with _shared_lock:
        if _shared is None:
            workdir = Path(tempfile.mkdtemp(prefix="diagnet-simt-"))
            _shared = HarnessBuilder(workdir)

            def cleanup(builder=_shared):
                builder.shutdown()
                shutil.rmtree(builder.workdir, ignore_errors=True)

            atexit.register(cleanup)
        return _shared


_DTYPE_CODE = {np.dtype(np.float32): b"f", np.dtype(np.float64): b"d",
               np.dtype(np.int32): b"i", np.dtype(np.int64): b"q"}


@dataclasses.dataclass(frozen=True)
class AddressTable:
    """A kernel argument of type ``const unsigned long long*`` holding device addresses: entry
    ``e`` becomes the address of memory block ``blocks[e]`` of the launch (see `run_harness`)."""

    blocks: tuple[int, ...]


def run_harness(binary: Path, name: str, grid, block, args, workdir: Path, blocks=()):
    """One emulated launch of kernel ``name``; returns {argument index: output bytes}.

    ``args`` holds NumPy arrays (the device memory), `AddressTable` entries and
    ``np.int32``/``np.int64``/``np.float32``/``np.float64`` scalars; the harness checks them
    against the kernel's signature and returns the bytes of every output array (the caller
    copies them back). ``blocks`` are C-contiguous NumPy arrays that address tables point
    into: each lives in its own heap block during the launch, and its bytes afterwards come
    back under index ``len(args) + its index`` (a kernel may write through a table).
    """
    parts = [b"DIAGSIM1", struct.pack("<I", len(name)), name.encode(),
             struct.pack("<6I", *grid, *block), struct.pack("<I", len(args))]
    for i, a in enumerate(args):
        if isinstance(a, AddressTable):
            if not all(0 <= e < len(blocks) for e in a.blocks):
                raise AssertionError(f"kernel argument {i}: an address table entry names no block")
            parts += [b"P", struct.pack("<Q", len(a.blocks)),
                      struct.pack(f"<{len(a.blocks)}I", *a.blocks)]
        elif isinstance(a, np.ndarray):
            if not a.flags.c_contiguous:
                raise AssertionError(f"kernel argument {i} is not C-contiguous")
            if a.dtype not in _DTYPE_CODE:
                raise AssertionError(f"kernel argument {i} has unsupported dtype {a.dtype}")
            parts += [b"A", _DTYPE_CODE[a.dtype], struct.pack("<Q", a.nbytes), a.tobytes()]
        elif isinstance(a, np.int32):
            parts += [b"i", struct.pack("<i", int(a))]
        elif isinstance(a, np.int64):
            parts += [b"l", struct.pack("<q", int(a))]
        elif isinstance(a, np.float32):
            parts += [b"f", struct.pack("<f", float(a))]
        elif isinstance(a, np.float64):
            parts += [b"d", struct.pack("<d", float(a))]
        else:
            # CuPy would pass a Python int as a 64-bit long long without checking it against
            # the kernel's parameter types: the launcher must cast explicitly.
            raise AssertionError(f"kernel argument {i} is {type(a).__name__} {a!r}; "
                                 "pass np.int32/np.int64 scalars or arrays")
    parts.append(struct.pack("<I", len(blocks)))
    for j, b in enumerate(blocks):
        if not b.flags.c_contiguous:
            raise AssertionError(f"memory block {j} is not C-contiguous")
        parts += [struct.pack("<Q", b.nbytes), b.tobytes()]
    fd, problem = tempfile.mkstemp(dir=workdir, suffix=".prob")
    with os.fdopen(fd, "wb") as f:
        f.write(b"".join(parts))
    result = problem[:-5] + ".out"
    try:
        res = subprocess.run([str(binary), problem, result], capture_output=True, text=True,
                             timeout=300, env={**os.environ, **SANITIZER_ENV})
        if res.returncode != 0:
            raise HarnessError(f"{Path(binary).name} {name} grid={grid} block={block} exited with "
                               f"{res.returncode}:\n{res.stderr[-6000:]}")
        data = Path(result).read_bytes()
    finally:
        for p in (problem, result):
            if os.path.exists(p):
                os.unlink(p)
    outputs, pos = {}, 0
    while pos < len(data):
        index, nbytes = struct.unpack_from("<IQ", data, pos)
        pos += 12
        outputs[index] = data[pos:pos + nbytes]
        pos += nbytes
    return outputs
