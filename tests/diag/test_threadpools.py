"""`diagnet.diag.threadpools`: OpenBLAS's idle workers are told to sleep, at run time.

The fix for the thread-pool clash between numba's kernels and NumPy's BLAS (see the module
docstring) must hold whatever a script imported first, so the tests run fresh processes that
import NumPy and use its BLAS *before* diagnet, then check what OpenBLAS itself reports
(``openblas_thread_timeout()``, the value its worker threads are started with). Timings are
never asserted.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from diagnet import settings
from diagnet.diag import dispatch, threadpools

_LIBS = threadpools.openblas_libraries()
_SERVERS = [p for p in _LIBS if threadpools._pthread_server(ctypes.CDLL(p)) is not None]
needs_openblas = pytest.mark.skipif(
    not _SERVERS, reason="no OpenBLAS with its own pthread pool (and the exports the fix "
                         "uses) is loaded here: NumPy uses another BLAS, or not on Linux")

# Imports NumPy first and runs a threaded matmul (so OpenBLAS's workers are up and spinning
# with the timeout they were started with), then calls a diagonal kernel through the
# dispatch (whose first call configures the pools), then reports.
_SCRIPT = textwrap.dedent("""
    import ctypes, json, os
    import numpy as np
    a = np.ones((256, 256), dtype=np.float32)
    a @ a
    from diagnet.diag import dispatch, threadpools
    x = np.ones((8, 16), dtype=np.float32)
    y = dispatch.forward(x, np.arange(3), np.ones((3, 16), dtype=np.float32), 16)
    ok = bool(np.all(y == 3)) and bool(np.allclose(a @ a, 256.0))  # BLAS restarted fine
    timeouts = {}
    for path in threadpools.openblas_libraries():
        server = threadpools._pthread_server(ctypes.CDLL(path))
        if server is not None:
            timeouts[path] = int(server[2]())
    import numba
    print(json.dumps({"status": threadpools.status(), "timeouts": timeouts, "ok": ok,
                      "env": os.environ.get("OPENBLAS_THREAD_TIMEOUT"),
                      "gomp_env": os.environ.get("GOMP_SPINCOUNT"),
                      "layer": numba.threading_layer()}))
""")


_THREAD_ENV = ("OPENBLAS_THREAD_TIMEOUT", "GOTO_THREAD_TIMEOUT", "GOMP_SPINCOUNT",
               "OMP_WAIT_POLICY", "OMP_DISPLAY_ENV", threadpools.ENV, threadpools.GOMP_ENV,
               threadpools.WORKER_NICE_ENV)


def run_fresh(stderr=False, script=_SCRIPT, **env_changes):
    env = {k: v for k, v in os.environ.items() if k not in _THREAD_ENV}
    env.update(env_changes)
    env["DIAGNET_DEVICE"] = "cpu"
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=600, check=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return (out, res.stderr) if stderr else out


@needs_openblas
def test_fix_applies_after_numpy_was_imported_and_used():
    out = run_fresh()
    assert out["ok"]
    assert out["status"]["openblas_thread_timeout"] == threadpools.DEFAULT_TIMEOUT
    numpy_blas = [p for p in out["timeouts"] if "numpy" in p] or list(out["timeouts"])
    assert numpy_blas
    for path in numpy_blas:  # what OpenBLAS will start its workers with
        assert out["timeouts"][path] == threadpools.DEFAULT_TIMEOUT
        assert out["status"]["libraries"][path] == threadpools.DEFAULT_TIMEOUT
    assert out["env"] is None  # the environment is left as it was


@needs_openblas
def test_the_timeout_can_be_chosen_or_switched_off():
    out = run_fresh(**{threadpools.ENV: "12"})
    assert out["ok"] and out["status"]["openblas_thread_timeout"] == 12
    assert 12 in out["timeouts"].values()
    out = run_fresh(**{threadpools.ENV: "off"})
    assert out["ok"] and out["status"]["openblas_thread_timeout"] is None
    assert "left alone" in out["status"]["note"]
    assert threadpools.DEFAULT_TIMEOUT not in out["timeouts"].values()


@needs_openblas
def test_a_users_own_openblas_setting_is_respected():
    out = run_fresh(OPENBLAS_THREAD_TIMEOUT="9")
    assert out["ok"] and out["status"]["openblas_thread_timeout"] is None
    assert "OPENBLAS_THREAD_TIMEOUT=9" in out["status"]["note"]
    assert set(out["timeouts"].values()) == {9}  # OpenBLAS read it itself, at load time
    assert out["env"] == "9"


# Imports every module with numba kernels, then makes one kernel call through the dispatch.
_IMPORT_SCRIPT = textwrap.dedent("""
    import json, logging
    import numpy as np
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    import diagnet
    from diagnet.diag import cpu, dispatch, threadpools
    from diagnet.fused import attention, gelu, layer_norm_cpu, softmax
    imported = threadpools.status()
    x = np.ones((8, 16), dtype=np.float32)
    dispatch.forward(x, np.arange(3), np.ones((3, 16), dtype=np.float32), 16)
    print(json.dumps({"imported": imported, "called": threadpools.status()}))
""")


def test_importing_the_kernels_configures_nothing_until_the_first_call():
    out, err = run_fresh(stderr=True, script=_IMPORT_SCRIPT)
    assert out["imported"] is None
    assert out["called"] is not None and out["called"]["note"]
    assert "diagnet.diag.threadpools INFO thread pools configured: " in err


def test_configure_runs_once_at_the_first_kernel_call():
    x = np.ones((8, 16), dtype=np.float32)
    dispatch.forward(x, np.arange(3), np.ones((3, 16), dtype=np.float32), 16)

    status = threadpools.status()
    assert status is not None and set(status) == {"openblas_thread_timeout", "libraries", "note",
                                                  "gomp", "workers"}
    assert threadpools.configure() == status  # the second call changes nothing


def test_bad_values_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match=r"\[4, 30\]"):
        threadpools.set_openblas_thread_timeout(3)
    monkeypatch.setenv(threadpools.ENV, "soon")  # read at import, or when read again:
    with pytest.raises(ValueError, match=threadpools.ENV):
        settings.read_environment()


@needs_openblas
def test_blas_results_are_unchanged_after_a_restart():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 200))
    b = rng.standard_normal((200, 100))
    before = a @ b
    threadpools.configure(force=True)  # stops OpenBLAS's workers; the next call restarts them
    np.testing.assert_array_equal(a @ b, before)


def _gomp_spincount(stderr):
    """The ``GOMP_SPINCOUNT`` libgomp reports it started with (``OMP_DISPLAY_ENV=verbose``)."""
    for line in stderr.splitlines():
        if line.strip().startswith("GOMP_SPINCOUNT"):
            return int(line.split("=")[1].strip().strip("'"))
    return None


def test_numba_pool_starts_with_a_short_libgomp_spin():
    out, err = run_fresh(stderr=True, OMP_DISPLAY_ENV="verbose")
    if out["layer"] != "omp" or _gomp_spincount(err) is None:
        pytest.skip(f"numba uses its {out['layer']} layer here, not GNU libgomp")
    assert _gomp_spincount(err) == threadpools.GOMP_SPINS  # what libgomp itself read
    assert str(threadpools.GOMP_SPINS) in out["status"]["gomp"]
    assert out["gomp_env"] is None  # the environment is left as it was
    out, err = run_fresh(stderr=True, OMP_DISPLAY_ENV="verbose", **{threadpools.GOMP_ENV: "off"})
    assert _gomp_spincount(err) == 300_000 and "left alone" in out["status"]["gomp"]
    out, err = run_fresh(stderr=True, OMP_DISPLAY_ENV="verbose", GOMP_SPINCOUNT="777")
    assert _gomp_spincount(err) == 777 and "GOMP_SPINCOUNT=777" in out["status"]["gomp"]


# Reports the nice value of every thread of the process after the first kernel call, with
# the ids of the calling thread and of the threads numba's first parallel region created.
_PRIORITY_SCRIPT = textwrap.dedent("""
    import json, os, threading
    import numpy as np
    from diagnet.diag import dispatch, threadpools

    def threads():
        return {int(t) for t in os.listdir("/proc/self/task")}

    def nice(tid):
        with open(f"/proc/self/task/{tid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[16])

    before = threads()
    x = np.ones((64, 16), dtype=np.float32)
    y = dispatch.forward(x, np.arange(3), np.ones((3, 16), dtype=np.float32), 16)
    new = threads() - before
    import numba
    print(json.dumps({"status": threadpools.status(), "main": nice(threading.get_native_id()),
                      "new": {str(t): nice(t) for t in new}, "ok": bool(np.all(y == 3)),
                      "layer": numba.threading_layer(),
                      "threads": numba.config.NUMBA_NUM_THREADS}))
""")


needs_linux = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                 reason="thread priorities are set on Linux only")


def _nice(base, increment):
    """The nice value of a thread started at ``base`` and lowered by ``increment``."""
    return min(19, base + increment)


@needs_linux
def test_numba_workers_run_at_a_lower_priority_and_spin_long():
    """The first kernel call starts numba's pool: its threads run at nice +10, the calling
    thread keeps its priority, and (libgomp) the workers spin libgomp's default 300,000
    times, which the lower priority makes harmless to the matmuls between kernels."""
    base = os.getpriority(os.PRIO_PROCESS, 0)  # what the fresh process inherits
    out = run_fresh(script=_PRIORITY_SCRIPT)
    assert out["ok"] and out["main"] == base
    if out["threads"] < 2:
        pytest.skip("numba has one thread here: no worker threads")
    assert out["new"]
    assert set(out["new"].values()) == {_nice(base, threadpools.WORKER_NICE)}
    assert out["status"]["workers"] == (f"numba's {len(out['new'])} pool threads run at nice "
                                        f"+{threadpools.WORKER_NICE}")
    if out["layer"] == "omp":
        assert str(threadpools.GOMP_SPINS) in out["status"]["gomp"]


@needs_linux
def test_worker_priority_is_relative_and_can_be_chosen_or_switched_off():
    """Nice values add to the caller's (a program that ran ``os.nice(5)`` gets its workers 5
    lower still, at most 19); ``DIAGNET_WORKER_NICE=3`` chooses the increment; ``off``
    leaves the workers at the caller's priority and limits libgomp's spin instead."""
    base = os.getpriority(os.PRIO_PROCESS, 0)
    script = "import os; os.nice(5)\n" + _PRIORITY_SCRIPT
    out = run_fresh(script=script, **{threadpools.WORKER_NICE_ENV: "12"})
    if out["threads"] < 2:
        pytest.skip("numba has one thread here: no worker threads")
    assert out["main"] == _nice(base, 5)
    assert set(out["new"].values()) == {_nice(base, 17)}
    out = run_fresh(script=script)
    assert set(out["new"].values()) == {_nice(base, 15)}
    out = run_fresh(script=_PRIORITY_SCRIPT, **{threadpools.WORKER_NICE_ENV: "3"})
    assert set(out["new"].values()) == {_nice(base, 3)}
    out = run_fresh(script=_PRIORITY_SCRIPT, **{threadpools.WORKER_NICE_ENV: "off"})
    assert out["main"] == base and set(out["new"].values()) == {base}
    assert out["status"]["workers"] == (f"numba's workers: priority left alone: "
                                        f"{threadpools.WORKER_NICE_ENV}=off")
    if out["layer"] == "omp":
        assert str(threadpools.GOMP_SPINS_SAME_PRIORITY) in out["status"]["gomp"]


# Loads a copy of libgomp by its path before diagnet, as `import torch` does (PyTorch's wheel
# vendors one as torch/lib/libgomp.so.1): a separate instance, not the one numba loads.
_VENDORED_LIBGOMP_FIRST = textwrap.dedent("""
    import ctypes, os
    ctypes.CDLL(os.environ["VENDORED_LIBGOMP"], mode=ctypes.RTLD_GLOBAL)
""")


def _vendored_libgomp(tmp_path):
    """A copy of the libgomp numba loads, as ``tmp_path/vendored/libgomp.so.1``; None where
    numba's pool uses no libgomp."""
    script = ("import json, numba; numba.get_num_threads()\n"
              "from diagnet.diag import threadpools\n"
              "print(json.dumps([numba.threading_layer(), "
              "threadpools.loaded_libraries('libgomp')]))")
    layer, paths = run_fresh(script=script)
    if layer != "omp" or not paths:
        return None
    copy = tmp_path / "vendored" / "libgomp.so.1"
    copy.parent.mkdir()
    copy.write_bytes(open(paths[0], "rb").read())
    return str(copy)


def _gomp_spincounts(stderr):
    """Every ``GOMP_SPINCOUNT`` that a libgomp reported (``OMP_DISPLAY_ENV=verbose``), in the
    order they loaded."""
    return [int(line.split("=")[1].strip().strip("'")) for line in stderr.splitlines()
            if line.strip().startswith("GOMP_SPINCOUNT")]


@needs_linux
def test_another_librarys_libgomp_loaded_first_does_not_stop_the_configuration(tmp_path):
    """A libgomp of another library (PyTorch's) loaded before the first kernel is not the
    one numba's pool runs on: the workers still run at nice +10, and numba's libgomp still
    reads the chosen spin count. (Left alone, the workers would spin at normal priority and
    take turns with OpenBLAS's threads.)"""
    path = _vendored_libgomp(tmp_path)
    if path is None:
        pytest.skip("numba does not use GNU libgomp here")
    base = os.getpriority(os.PRIO_PROCESS, 0)
    script = _VENDORED_LIBGOMP_FIRST + _PRIORITY_SCRIPT
    out = run_fresh(script=script, VENDORED_LIBGOMP=path)
    if out["threads"] < 2:
        pytest.skip("numba has one thread here: no worker threads")
    assert out["ok"] and out["main"] == base
    assert out["new"] and set(out["new"].values()) == {_nice(base, threadpools.WORKER_NICE)}
    assert out["status"]["workers"] == (f"numba's {len(out['new'])} pool threads run at nice "
                                        f"+{threadpools.WORKER_NICE}")
    assert str(threadpools.GOMP_SPINS) in out["status"]["gomp"]
    # where the workers keep their priority the spin is shortened: numba's libgomp, the
    # second to load, reads it; the copy loaded first keeps libgomp's default
    out, err = run_fresh(stderr=True, script=script, VENDORED_LIBGOMP=path,
                         OMP_DISPLAY_ENV="verbose", **{threadpools.WORKER_NICE_ENV: "off"})
    assert _gomp_spincounts(err) == [300_000, threadpools.GOMP_SPINS_SAME_PRIORITY], err
    assert str(threadpools.GOMP_SPINS_SAME_PRIORITY) in out["status"]["gomp"]


@needs_linux
def test_a_pool_numba_started_before_the_first_kernel_is_left_alone():
    """A numba parallel function that ran before diagnet's first kernel started the pool:
    its threads exist already, so diagnet neither lists nor renices them, and says so."""
    script = textwrap.dedent("""
        import numba, numpy as np

        @numba.njit(parallel=True)
        def double(a):
            for i in numba.prange(a.shape[0]):
                a[i] *= 2.0

        double(np.ones(64))
    """) + _PRIORITY_SCRIPT
    base = os.getpriority(os.PRIO_PROCESS, 0)
    out = run_fresh(script=script)
    assert out["ok"] and out["main"] == base
    assert out["status"]["workers"] == ("numba's workers: priority left alone: numba's pool "
                                        "was started before the kernels")
    assert set(out["new"].values()) <= {base}  # nothing of ours was reniced
    if out["layer"] == "omp":
        assert "started before the kernels" in out["status"]["gomp"]


def test_bad_worker_nice_values_are_rejected(monkeypatch):
    for bad in (0, 20, "soon"):
        with pytest.raises((ValueError, TypeError), match="worker_nice"):
            settings.set_worker_nice(bad)
    monkeypatch.setenv(threadpools.WORKER_NICE_ENV, "25")
    with pytest.raises(ValueError, match=threadpools.WORKER_NICE_ENV):
        settings.read_environment()
