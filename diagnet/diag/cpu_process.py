"""What the first CPU kernel call sets up for the whole process, once.

Two settings of the process serve every numba kernel (the diagonal ones and the fused ops
of `diagnet.fused`): the idle spin of numba's and OpenBLAS's thread pools, so that kernels
and matmuls taking turns on the cores do not slow each other down
(`diagnet.diag.threadpools`), and glibc's malloc thresholds, so that a step's arrays reuse
the pages of the step before (`diagnet.heap`). Importing diagnet changes neither; every
dispatcher that hands out a numba kernel calls `configure_once` first.
"""

from __future__ import annotations

from .. import heap
from . import threadpools

__all__ = ["configure_once"]


def configure_once():
    """Configure the thread pools and the C heap at the first call; nothing after."""
    threadpools.configure_once()
    heap.configure_once()
