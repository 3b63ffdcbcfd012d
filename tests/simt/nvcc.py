"""Compile one ``kernels/*.cu`` with nvcc and read ptxas's resource report.

Shared by the kernel tests (``tests/diag/test_cuda_kernels.py``, the ``*_cuda.py`` tests of the
fused kernels and of the foreach optimizers): each compiles its source for sm_80 and sm_90 with the
launcher's ``-D`` options, warnings as errors, and checks the registers, spills and stack
frame parsed here. `NVCC` is None where the CUDA toolkit is not on PATH; those tests skip.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

NVCC = shutil.which("nvcc")

_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?(?:, (\d+) bytes smem)?")


def parse_ptxas(output: str) -> dict[str, dict[str, int]]:
    """Per kernel: registers, spill stores/loads, stack frame and static shared memory."""
    kernels: dict[str, dict[str, int]] = {}
    current = None
    for line in output.splitlines():
        if m := _PTXAS_ENTRY.search(line):
            current = kernels.setdefault(m.group(1), {"arch": m.group(2)})
        elif current is not None and (m := _PTXAS_FRAME.search(line)):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                           spill_loads=int(m.group(3)))
        elif current is not None and (m := _PTXAS_USED.search(line)):
            current.update(registers=int(m.group(1)), barriers=int(m.group(2) or 0),
                           smem=int(m.group(3) or 0))
    return kernels


def nvcc_compile(source: Path, arch: str, defines=(), outdir: Path | None = None):
    """Compile ``source`` to a cubin for ``arch`` with ``defines``.

    Returns the finished nvcc process and `parse_ptxas` of its output."""
    outdir = Path(tempfile.mkdtemp()) if outdir is None else outdir
    cmd = [NVCC, "-cubin", f"-arch={arch}", "-Xptxas", "-v", "-Werror", "all-warnings",
           *defines, "-o", str(outdir / f"{source.stem}.{arch}.cubin"), str(source)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return res, parse_ptxas(res.stdout + res.stderr)
