"""The C heap under NumPy's arrays: keep freed memory for the next training step.

The problem
-----------
A training step allocates the same arrays every time: each op's output, each gradient, each
kernel's scratch. NumPy gets their memory from the C library's ``malloc``. glibc's
``malloc`` serves a request of at least its *mmap threshold* with a fresh ``mmap`` and gives
it back to the kernel with ``munmap`` when the array is freed; below the threshold it uses the
heap, and it returns freed memory at the heap's top to the kernel once more than its *trim
threshold* is free there. Either way the next step's arrays land on pages the kernel must map
and zero again, one page fault per 4 KiB page touched. glibc raises both thresholds by
itself after the first ``munmap`` of a block, but only up to the size of that block (so an
array larger than any freed before is mapped afresh), and the graph of a backward pass frees
tens of megabytes at once, which the trim then hands back. In a process that had freed no
large block before training, these page faults took about a fifth of the CPU time of a
training step of the MNIST ViT (batch 128), and as much in the MLP; a process whose data
preparation freed blocks of tens of megabytes first gets most of the fix from glibc itself
(docs/benchmarks.md, "Measurements behind design choices"). The fix makes the cost of a
step independent of what the process did before.

The fix
-------
`configure` sets glibc's thresholds once per process through ``mallopt``: arrays up to
`MMAP_THRESHOLD` (32 MiB, glibc's largest on 64-bit systems) come from the heap, and up to
`TRIM_THRESHOLD` (256 MiB) of free memory stays at its top, so the arrays of one step reuse
the pages of the step before. The cost is memory that stays with the process after a peak
(at most the trim threshold more than it uses); larger arrays are still mapped and unmapped
one by one.

It does nothing when ``DIAGNET_HEAP`` (`diagnet.settings.heap`) is ``"off"``, when the C
library is not glibc (musl, macOS, Windows), when another allocator is preloaded (jemalloc,
tcmalloc, mimalloc in ``LD_PRELOAD``: it has its own caching), or when the user tuned glibc
already (any of ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``,
``MALLOC_MMAP_MAX_`` or a ``glibc.malloc`` tunable in ``GLIBC_TUNABLES``): `status` says why.

When it runs: as `diagnet.diag.threadpools`, at the first CPU kernel call (the dispatchers
that pick a numba kernel call `diagnet.diag.cpu_process.configure_once`, which configures
both), never at import; a program may call `configure` earlier.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading

from . import settings

__all__ = ["configure", "configure_once", "status", "MMAP_THRESHOLD", "TRIM_THRESHOLD",
           "ENV"]

_log = logging.getLogger(__name__)

#: the environment variable that turns the fix off (read into `diagnet.settings.heap`)
ENV = settings.ENV_HEAP
#: arrays up to this size come from the heap (glibc accepts at most 32 MiB on 64-bit systems)
MMAP_THRESHOLD = 32 * 2 ** 20
#: free memory kept at the top of the heap before glibc returns it to the kernel
TRIM_THRESHOLD = 256 * 2 ** 20

# mallopt's parameter numbers, from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_USER_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
             "MALLOC_MMAP_MAX_")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_lock = threading.Lock()
_status = None  # the result of the first `configure` call


def _why_not(environ) -> str:
    """Why the thresholds must be left alone (``""`` when they may be set)."""
    if settings.heap == "off":
        return f"off ({ENV}=off)"
    for var in _USER_ENV:
        if environ.get(var, "").strip():
            return f"left as set by {var}"
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return "left as set by GLIBC_TUNABLES"
    preload = environ.get("LD_PRELOAD", "").lower()
    for name in _OTHER_ALLOCATORS:
        if name in preload:
            return f"not glibc's malloc: {name} is preloaded"
    if not sys.platform.startswith("linux"):
        return f"not glibc's malloc on {sys.platform}"
    return ""


def _glibc_mallopt():
    """glibc's ``mallopt`` from this process's C library, or None (not glibc)."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc exports it
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt


def configure(environ=None, mallopt=None) -> dict:
    """Set glibc's mmap and trim thresholds for this process (see the module notes).

    Runs once: a later call returns the first call's `status`. ``environ`` (default
    ``os.environ``) and ``mallopt`` (default: the C library's) are for tests.

    Returns:
        ``{"applied": bool, "mmap_threshold": int or None, "trim_threshold": int or None,
        "note": str}``: the thresholds set in bytes, or None and why not.
    """
    global _status
    with _lock:
        if _status is not None:
            return dict(_status)
        environ = os.environ if environ is None else environ
        result = {"applied": False, "mmap_threshold": None, "trim_threshold": None, "note": ""}
        result["note"] = _why_not(environ)
        if not result["note"]:
            mallopt = _glibc_mallopt() if mallopt is None else mallopt
            if mallopt is None:
                result["note"] = "not glibc's malloc"
            # the mmap threshold first: setting either one stops glibc's own adjustments,
            # and a trim threshold alone would leave every array of 128 KiB or more mapped
            # afresh
            elif (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1
                    or mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1):
                result["note"] = "mallopt refused the thresholds"
            else:
                result.update(applied=True, mmap_threshold=MMAP_THRESHOLD,
                              trim_threshold=TRIM_THRESHOLD,
                              note="arrays up to 32 MiB reuse the heap's pages")
        _status = result
        _log.info("heap: %s", result["note"])
        return dict(result)


def configure_once():
    """`configure` at the first call, nothing after (one global check)."""
    if _status is None:
        configure()


def status():
    """What `configure` did (its return value); None before it ran."""
    return None if _status is None else dict(_status)
