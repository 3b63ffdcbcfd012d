"""`diagnet.heap`: glibc's malloc thresholds, set once at the first CPU kernel call.

What is checked: which calls `configure` makes and when it must make none (a fake
``mallopt``, so the process's own heap is left alone), and, in fresh processes, what the
thresholds are for: a training step's arrays reuse memory instead of page-faulting it in
again, and nothing is set before the first kernel call.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

from diagnet import heap, settings


@pytest.fixture
def fresh(monkeypatch):
    """`heap.configure` forgets an earlier call for the test (and again after it)."""
    monkeypatch.setattr(heap, "_status", None)
    yield
    monkeypatch.setattr(heap, "_status", None)


class FakeMallopt:
    """Records ``mallopt(param, value)`` calls and answers ``result``."""

    def __init__(self, result=1):
        self.calls, self.result = [], result

    def __call__(self, param, value):
        self.calls.append((param, value))
        return self.result


def _is_glibc():
    try:
        ctypes.CDLL(None).gnu_get_libc_version
    except (OSError, AttributeError):
        return False
    return sys.platform.startswith("linux")


def test_sets_the_mmap_threshold_first_then_the_trim_threshold(fresh):
    mallopt = FakeMallopt()
    status = heap.configure(environ={}, mallopt=mallopt)
    assert mallopt.calls == [(-3, heap.MMAP_THRESHOLD), (-1, heap.TRIM_THRESHOLD)]
    assert status == {"applied": True, "mmap_threshold": 32 * 2 ** 20,
                      "trim_threshold": 256 * 2 ** 20, "note": status["note"]}
    assert heap.status() == status


def test_runs_once(fresh):
    first = FakeMallopt()
    assert heap.configure(environ={}, mallopt=first)["applied"]
    second = FakeMallopt()
    assert heap.configure(environ={}, mallopt=second)["applied"]
    heap.configure_once()
    assert len(first.calls) == 2 and second.calls == []


@pytest.mark.parametrize("environ, note", [
    ({"MALLOC_TRIM_THRESHOLD_": "1000000"}, "left as set by MALLOC_TRIM_THRESHOLD_"),
    ({"MALLOC_MMAP_THRESHOLD_": "65536"}, "left as set by MALLOC_MMAP_THRESHOLD_"),
    ({"MALLOC_TOP_PAD_": "0"}, "left as set by MALLOC_TOP_PAD_"),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}, "left as set by GLIBC_TUNABLES"),
    ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, "jemalloc is preloaded"),
    ({"LD_PRELOAD": "libtcmalloc_minimal.so"}, "tcmalloc is preloaded"),
])
def test_a_user_choice_or_another_allocator_is_left_alone(fresh, environ, note):
    mallopt = FakeMallopt()
    status = heap.configure(environ=environ, mallopt=mallopt)
    assert mallopt.calls == []
    assert not status["applied"] and status["mmap_threshold"] is None
    assert note in status["note"]


def test_the_setting_turns_it_off(fresh):
    mallopt = FakeMallopt()
    with settings.override(heap="off"):
        status = heap.configure(environ={}, mallopt=mallopt)
    assert mallopt.calls == [] and status["note"] == "off (DIAGNET_HEAP=off)"


def test_a_refused_mallopt_is_reported(fresh):
    status = heap.configure(environ={}, mallopt=FakeMallopt(result=0))
    assert not status["applied"] and status["note"] == "mallopt refused the thresholds"


def test_unrelated_variables_do_not_stop_it(fresh):
    mallopt = FakeMallopt()
    environ = {"GLIBC_TUNABLES": "glibc.pthread.rseq=0", "LD_PRELOAD": "libfoo.so",
               "MALLOC_ARENA_MAX": ""}
    assert heap.configure(environ=environ, mallopt=mallopt)["applied"]


# A step-like loop: allocate, touch and free arrays of a few MiB, as a training step's
# outputs and gradients are. Prints the minor page faults of the loop (after a warm-up).
_FAULTS = """
import resource, sys
import numpy as np
import diagnet as dn
from diagnet import heap
{setup}
def step():
    arrays = [np.ones(n, dtype=np.float32) for n in (2**20, 3 * 2**19, 2**18, 2**21)]
    del arrays
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, heap.status())
"""
_FIRST_KERNEL = ("dn.functional.gelu(dn.tensor(np.ones((64, 128), dtype=np.float32)))  # first CPU "
                 "kernel call")


def _faults(setup, **env):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    environ.update(env)
    res = subprocess.run([sys.executable, "-c", _FAULTS.format(setup=setup)],
                         capture_output=True, text=True, env=environ, timeout=300, check=True)
    faults, status = res.stdout.split(" ", 1)
    return int(faults), status


@pytest.mark.skipif(not _is_glibc(), reason="glibc's malloc only (Linux)")
def test_after_the_first_kernel_call_a_steps_arrays_reuse_their_memory():
    # 50 steps touch 50 * 18 MiB: about 230,000 pages. Unset, glibc maps the 8 MiB array
    # afresh every time (it is larger than any block freed before it raised its threshold).
    off, off_status = _faults(_FIRST_KERNEL, DIAGNET_HEAP="off")
    on, on_status = _faults(_FIRST_KERNEL)
    assert "'applied': False" in off_status and "'applied': True" in on_status
    assert off > 50 * 1000, off
    assert on < off / 20, (on, off)


@pytest.mark.skipif(not _is_glibc(), reason="glibc's malloc only (Linux)")
def test_importing_diagnet_changes_nothing():
    faults, status = _faults("")
    assert status.strip() == "None"
    assert faults > 50 * 1000, faults
