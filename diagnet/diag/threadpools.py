"""NumPy's BLAS threads and the numba kernels' threads, taking turns on the same cores.

The problem
-----------
A training step alternates between the diagonal kernels (numba, on its OpenMP pool: GNU
libgomp) and dense matmuls (NumPy's BLAS: OpenBLAS in the NumPy and SciPy wheels, on its own
pthread pool). Both pools keep their worker threads spinning after a call, waiting for the
next one: OpenBLAS for ``2**28`` CPU cycles (about 0.1 s), libgomp for 300,000 spin
iterations (milliseconds). In a training step the next call goes to the *other* pool, whose
threads then share their cores with the first pool's spinning workers: on a 2-core machine
a call split evenly over 2 threads waits for the thread that shares its core, and both the
diagonal forward and the dense matmul ran several times slower when alternating than alone
(docs/benchmarks.md, "Measurements behind design choices").

The documented knobs are read once, when each library loads: ``OPENBLAS_THREAD_TIMEOUT``
when NumPy is first imported (too late for a library imported after NumPy, and unknown to
most users), ``GOMP_SPINCOUNT`` / ``OMP_WAIT_POLICY`` when libgomp loads.
``OMP_WAIT_POLICY=passive`` and ``NUMBA_THREADING_LAYER=workqueue`` remove the clash but make
every kernel pay for waking its threads.

The fix
-------
`configure` shortens OpenBLAS's spin and makes numba's spinning workers give way, at run
time, whatever was imported first:

* **OpenBLAS**: its workers sleep after ``2**4`` cycles (`DEFAULT_TIMEOUT`). OpenBLAS
  exports two functions that make a run-time change possible: ``openblas_read_env``
  re-reads its environment variables, and ``blas_thread_shutdown_`` stops its workers
  (OpenBLAS runs it itself before a ``fork``); the next threaded BLAS call starts new
  workers, which take the timeout read last. `set_openblas_thread_timeout` sets
  ``OPENBLAS_THREAD_TIMEOUT`` in the environment for a moment, calls the two functions and
  restores the environment. Not done when ``OPENBLAS_THREAD_TIMEOUT`` (or
  ``GOTO_THREAD_TIMEOUT``) is set (the user chose), when
  `diagnet.settings.blas_thread_timeout` (``DIAGNET_BLAS_THREAD_TIMEOUT``) is ``"off"`` (an
  int: the timeout to use, ``log2`` of cycles, 4 to 30), or when no OpenBLAS with those
  exports and a pthread pool is loaded (MKL, Accelerate, an OpenMP build of OpenBLAS, a
  non-Linux system: the mechanism is specific to OpenBLAS's own thread server, found
  through ``/proc/self/maps``).
* **numba's workers run at a lower priority** (nice `WORKER_NICE`, 10, above the thread
  that starts them). A worker that spins, waiting for the next kernel, then gives its core
  to any other thread of normal priority that wants it (OpenBLAS's workers, the main
  thread) within the kernel scheduler's latency, instead of taking turns with it; and while
  a kernel runs, nothing else of the process competes with the worker. So the workers can
  spin long enough to catch every kernel of a training step (a kernel that finds its worker
  asleep waits 30-45 µs for it in a VM, against 2 µs when it spins) without slowing the
  matmuls between those kernels. `configure` starts numba's pool itself and lowers the
  priority of the threads it creates (Linux, ``setpriority`` per thread). Not done when
  `diagnet.settings.worker_nice` (``DIAGNET_WORKER_NICE``) is ``"off"`` (an int: the
  increment, 1 to 19), off Linux, or when the pool was started before (then the status
  says so).
* **libgomp** (numba's ``omp`` threading layer): its workers spin `GOMP_SPINS` times before
  they sleep: libgomp's own default, 300,000 (a few milliseconds), where the workers run at
  the lower priority; `GOMP_SPINS_SAME_PRIORITY`, 30,000 (0.3-0.5 ms here), where they
  cannot: enough to catch the next kernel of the same step, short enough to be asleep soon
  after a kernel that a large matmul follows (a worker of the same priority takes turns
  with the matmul's threads while it spins). libgomp reads ``GOMP_SPINCOUNT`` when it
  loads, which numba does when it starts its thread pool; `configure` starts that pool
  itself with ``GOMP_SPINCOUNT`` set for the moment (then restores the environment). Not
  done when ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY`` is set, when
  `diagnet.settings.gomp_spincount` (``DIAGNET_GOMP_SPINCOUNT``) is ``"off"`` (an int: the
  count to use), or when the libgomp numba runs on was loaded already (by an earlier
  numba parallel function, say): then the status says so. Another library's own copy of
  libgomp (PyTorch's wheel loads ``torch/lib/libgomp.so.1`` on ``import torch``) is a
  separate instance and changes neither part (taken for numba's, it would leave the workers
  spinning at normal priority beside OpenBLAS's threads). The measurements behind both
  choices are in
  docs/benchmarks.md ("The libgomp spin count and the workers' priority").

When it runs
------------
Importing diagnet (or its kernels) changes nothing. The dispatchers that pick a numba kernel
(`diagnet.diag.dispatch`, and those of the fused ops) call `configure_once` (through
`diagnet.diag.cpu_process`) before they return one, so `configure` runs at the first CPU
kernel call and logs what it did (one ``INFO`` line on the ``diagnet.diag.threadpools``
logger). A program or benchmark that calls the kernel modules directly calls `configure`
itself.

Caveat: stopping OpenBLAS's workers while another thread is inside a BLAS call could hang
that call (as a ``fork`` at that moment would); `configure` runs at the first kernel call,
normally before any such thread exists. Call it yourself earlier (or set the variables
before importing NumPy) if your program runs BLAS in threads.

What it costs: a BLAS call that finds its workers asleep wakes them (tens of
microseconds), and a numba worker that waits for a busy core runs its share of a kernel
late; on a machine whose cores other programs keep busy, the lower priority makes that
more likely (`NUMBA_NUM_THREADS=1` is the robust choice there, docs/benchmarks.md).
Measured in ``bench/bench_train_step.py`` (docs/benchmarks.md).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading

from .. import settings

__all__ = ["configure", "configure_once", "status", "openblas_libraries",
           "set_openblas_thread_timeout", "DEFAULT_TIMEOUT", "ENV", "GOMP_SPINS",
           "GOMP_SPINS_SAME_PRIORITY", "GOMP_ENV", "WORKER_NICE", "WORKER_NICE_ENV"]

_log = logging.getLogger(__name__)

#: the environment variable that chooses the OpenBLAS timeout (``log2`` of cycles) or ``off``
#: (read into `diagnet.settings.blas_thread_timeout`)
ENV = settings.ENV_BLAS_THREAD_TIMEOUT
#: OpenBLAS's own minimum: its workers sleep about 16 cycles after a job
DEFAULT_TIMEOUT = 4
#: OpenBLAS's default, for reference: 28 (``2**28`` cycles, ~0.1 s)
OPENBLAS_DEFAULT_TIMEOUT = 28
_USER_ENV = ("OPENBLAS_THREAD_TIMEOUT", "GOTO_THREAD_TIMEOUT")

#: the environment variable that chooses libgomp's spin count for numba's pool, or ``off``
#: (read into `diagnet.settings.gomp_spincount`)
GOMP_ENV = settings.ENV_GOMP_SPINCOUNT
#: libgomp's spin iterations before a worker sleeps, where the workers run at a lower
#: priority (`WORKER_NICE`): libgomp's own default
GOMP_SPINS = 300_000
#: ... and where they run at the priority of the other threads
GOMP_SPINS_SAME_PRIORITY = 30_000
_USER_GOMP_ENV = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")

#: the environment variable that chooses how much lower numba's workers run, or ``off``
#: (read into `diagnet.settings.worker_nice`)
WORKER_NICE_ENV = settings.ENV_WORKER_NICE
#: the nice increment of numba's pool threads over the thread that starts them
WORKER_NICE = 10

_lock = threading.Lock()
_status = None  # the result of the first `configure` call


def loaded_libraries(word):
    """Paths of the shared libraries loaded in this process whose file name contains
    ``word`` (Linux, from ``/proc/self/maps``; elsewhere ``[]``)."""
    if not sys.platform.startswith("linux"):
        return []
    paths = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.split(maxsplit=5)[-1].strip()
                name = os.path.basename(path)
                if word in name.lower() and ".so" in name and path not in paths:
                    paths.append(path)
    except OSError:
        return []
    return paths


def openblas_libraries():
    """Paths of the OpenBLAS shared libraries loaded in this process (Linux; else ``[]``)."""
    return loaded_libraries("openblas")


def _symbol(lib, *names):
    """The first of ``names`` that ``lib`` exports (wheels prefix/suffix the public API)."""
    for name in names:
        try:
            return getattr(lib, name)
        except AttributeError:
            continue
    return None


def _pthread_server(lib):
    """``(read_env, shutdown, timeout_getter)`` of an OpenBLAS built with its own pthread
    pool, or None (an OpenMP or sequential build, or a build without those exports)."""
    get_parallel = _symbol(lib, "openblas_get_parallel", "openblas_get_parallel64_",
                           "scipy_openblas_get_parallel", "scipy_openblas_get_parallel64_")
    read_env = _symbol(lib, "openblas_read_env")
    shutdown = _symbol(lib, "blas_thread_shutdown_")
    timeout = _symbol(lib, "openblas_thread_timeout")
    if None in (get_parallel, read_env, shutdown, timeout):
        return None
    get_parallel.restype = ctypes.c_int
    if get_parallel() != 1:  # 0: sequential, 1: pthreads, 2: OpenMP
        return None
    timeout.restype = ctypes.c_uint
    return read_env, shutdown, timeout


def set_openblas_thread_timeout(log2_cycles):
    """Make every loaded OpenBLAS pthread pool sleep ``2**log2_cycles`` cycles after a job.

    Returns ``{path: timeout now in effect (log2)}`` for the libraries changed; an OpenBLAS
    without the needed exports is left alone (and absent from the result). The process
    environment is restored afterwards. See the module docstring for how and the caveat.
    """
    value = int(log2_cycles)
    if not 4 <= value <= 30:
        raise ValueError(f"the OpenBLAS thread timeout is log2 of cycles in [4, 30]; got {value}")
    done = {}
    for path in openblas_libraries():
        try:
            lib = ctypes.CDLL(path)  # already loaded: this only opens a handle to it
        except OSError:
            continue
        server = _pthread_server(lib)
        if server is None:
            continue
        read_env, shutdown, timeout = server
        saved = os.environ.get("OPENBLAS_THREAD_TIMEOUT")
        os.environ["OPENBLAS_THREAD_TIMEOUT"] = str(value)
        try:
            read_env()   # OpenBLAS caches its environment variables: read them again
            shutdown()   # stop the workers; the next threaded call restarts them
        finally:
            if saved is None:
                del os.environ["OPENBLAS_THREAD_TIMEOUT"]
            else:
                os.environ["OPENBLAS_THREAD_TIMEOUT"] = saved
        done[path] = int(timeout())
    return done


def _requested(setting, env, user_env, default):
    """The value to apply (an int) for ``setting`` (a `diagnet.settings` value: None, "off" or
    an int, read from ``env``), or a string saying why none is applied.

    The other libraries' own variables (``user_env``) are read here, from the environment:
    what matters is what those libraries read when they loaded.
    """
    for name in user_env:
        if os.environ.get(name):
            return f"left alone: {name}={os.environ[name]} is set"
    if setting == "off":
        return f"left alone: {env}=off"
    return default if setting is None else setting


def start_numba_pool(spins):
    """Start numba's thread pool with libgomp spinning ``spins`` times before sleeping.

    Returns a note on what happened. libgomp reads ``GOMP_SPINCOUNT`` when it loads, and
    numba loads it (``omp`` layer) when it starts its pool, which ``numba.get_num_threads``
    does; so the variable is set for that moment only. Whether it was read is known on Linux:
    a libgomp file that was not loaded before is loaded then. Another library's own copy
    (PyTorch's ``torch/lib/libgomp.so.1``) is a separate instance that numba does not use.
    """
    import numba

    if _numba_pool_started():
        numba.get_num_threads()
        return ("libgomp spin count left alone: numba's pool was started before the kernels "
                "(set GOMP_SPINCOUNT before importing to choose it)")
    before = set(loaded_libraries("libgomp"))
    saved = os.environ.get("GOMP_SPINCOUNT")
    os.environ["GOMP_SPINCOUNT"] = str(int(spins))
    try:
        numba.get_num_threads()  # starts the threading layer: libgomp loads and reads it
    finally:
        if saved is None:
            del os.environ["GOMP_SPINCOUNT"]
        else:
            os.environ["GOMP_SPINCOUNT"] = saved
    layer = numba.threading_layer()
    if layer != "omp":
        return f"numba uses its {layer} layer: no libgomp spin to limit"
    if sys.platform.startswith("linux") and not set(loaded_libraries("libgomp")) - before:
        return ("libgomp spin count left alone: the libgomp numba runs on was loaded before "
                "the kernels (set GOMP_SPINCOUNT before importing to choose it)")
    return f"numba's OpenMP workers (libgomp) spin {int(spins)} times before sleeping"


def _libgomp_loaded():
    """Whether any libgomp is loaded in this process (Linux; False elsewhere)."""
    return any(os.path.basename(p).startswith("libgomp") for p in loaded_libraries("libgomp"))


def _numba_pool_started():
    """Whether numba's threading layer has started its pool. Read from numba's own flag; a
    numba without it counts any loaded libgomp as a started pool (the cautious answer)."""
    from numba.np.ufunc import parallel

    started = getattr(parallel, "_is_initialized", None)
    return _libgomp_loaded() if started is None else bool(started)


def _thread_ids():
    """The ids of this process's threads (Linux: ``/proc/self/task``), or None elsewhere."""
    try:
        return {int(t) for t in os.listdir("/proc/self/task")}
    except (OSError, ValueError):
        return None


def _spawn_workers():
    """Run one parallel region on all of numba's threads, so that its threading layer
    creates every worker thread it will use (libgomp creates them at the first region)."""
    import numba
    import numpy as np

    from ._pool_start import touch_in_parallel

    saved = numba.get_num_threads()
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    try:
        touch_in_parallel(np.zeros(4 * numba.config.NUMBA_NUM_THREADS))
    finally:
        numba.set_num_threads(saved)


def _lower_priority(thread_ids, increment):
    """Raise the nice value of each thread in ``thread_ids`` to the calling thread's plus
    ``increment`` (at most 19; a thread already at that value or above is left as it is);
    returns how many of them now run at that priority or lower (threads that ended since
    they were listed are not counted). Linux only (a thread id is a process id for
    ``setpriority``)."""
    nice = min(19, os.getpriority(os.PRIO_PROCESS, 0) + int(increment))
    changed = 0
    for tid in sorted(thread_ids):
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
            changed += 1
        except OSError:  # the thread has ended since it was listed
            continue
    return changed


def _start_pool():
    """Start numba's pool (libgomp's spin chosen as the workers' priority allows) and lower
    the priority of its threads; returns ``(gomp note, workers note)``."""
    import numba

    nice = _requested(settings.worker_nice, WORKER_NICE_ENV, (), WORKER_NICE)
    if isinstance(nice, int) and not sys.platform.startswith("linux"):
        nice = "left alone: thread priorities are set on Linux only"
    elif isinstance(nice, int) and _numba_pool_started():
        nice = "left alone: numba's pool was started before the kernels"
    before = _thread_ids() if isinstance(nice, int) else None
    default = GOMP_SPINS if isinstance(nice, int) else GOMP_SPINS_SAME_PRIORITY
    spins = _requested(settings.gomp_spincount, GOMP_ENV, _USER_GOMP_ENV, default)
    if isinstance(spins, str):
        numba.get_num_threads()  # start the pool anyway: the same moment in all cases
        gomp = spins
    else:
        gomp = start_numba_pool(spins)
    if not isinstance(nice, int):
        return gomp, f"numba's workers: priority {nice}"
    if before is None:
        return gomp, "numba's workers: priority left alone: no /proc/self/task to list them"
    _spawn_workers()
    workers = _thread_ids() - before
    changed = _lower_priority(workers, nice)
    return gomp, f"numba's {changed} pool threads run at nice +{nice}"


def configure(force=False):
    """Shorten the idle spin of OpenBLAS's and numba's workers, once per process.

    See the module docstring. Returns the same dict as `status` and logs it (``INFO``).
    ``force=True`` applies the OpenBLAS part again (for libraries loaded since, or after
    `diagnet.settings.set_blas_thread_timeout`); libgomp's spin count can only be set once,
    before it loads.
    """
    global _status
    with _lock:
        if _status is not None and not force:
            return dict(_status)
        wanted = _requested(settings.blas_thread_timeout, ENV, _USER_ENV, DEFAULT_TIMEOUT)
        if isinstance(wanted, str):
            blas = {"openblas_thread_timeout": None, "libraries": {}, "note": wanted}
        else:
            done = set_openblas_thread_timeout(wanted)
            note = (f"OpenBLAS workers sleep after 2**{wanted} cycles" if done else
                    "no OpenBLAS pthread pool with the needed exports is loaded")
            blas = {"openblas_thread_timeout": wanted if done else None,
                    "libraries": done, "note": note}
        if _status is not None and "gomp" in _status:
            gomp, workers = _status["gomp"], _status["workers"]  # the pool starts once
        else:
            gomp, workers = _start_pool()
        _status = {**blas, "gomp": gomp, "workers": workers}
        _log.info("thread pools configured: %s; %s; %s", blas["note"], gomp, workers)
        return dict(_status)


def configure_once():
    """`configure` at the first call, nothing after: the call that kernel dispatchers make
    before returning a numba kernel (one global check once configured)."""
    if _status is None:
        configure()


def status():
    """What `configure` did: ``{"openblas_thread_timeout": log2 or None, "libraries":
    {path: log2}, "note": str, "gomp": str, "workers": str}``; None before it ran."""
    return None if _status is None else dict(_status)
