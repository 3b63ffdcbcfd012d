"""Process-wide settings: read from the environment once, when diagnet is imported.

Each setting is an attribute of this module. Code that needs one reads the attribute (one
lookup, so a hot path pays nothing for the environment); a program changes it with the
function beside it, or for a ``with`` block with `override`. `read_environment` reads the
variables again, for a program that changed ``os.environ`` after importing diagnet.

* `device` (``DIAGNET_DEVICE``): the default device for new tensors, ``"cpu"`` or
  ``"cuda"``; None (the default) picks ``"cuda"`` where CuPy finds a GPU, else ``"cpu"``.
* `cpu_kernels` (``DIAGNET_CPU_KERNELS``): ``"numba"`` (compiled kernels, the default) or
  ``"reference"`` (the readable NumPy versions, for debugging).
* `attention_kernels` (``DIAGNET_ATTENTION_KERNELS``): ``"blas"`` (the default),
  ``"reference"`` or ``"numba"`` (see `diagnet.ops.attention`).
* `blas_thread_timeout` (``DIAGNET_BLAS_THREAD_TIMEOUT``): OpenBLAS's idle spin, an int in
  [4, 30], or ``"off"``; None (the default) lets `diagnet.diag.threadpools` pick.
* `gomp_spincount` (``DIAGNET_GOMP_SPINCOUNT``): libgomp's spin count for numba's pool, an
  int >= 0, or ``"off"``; None (the default) lets `diagnet.diag.threadpools` pick.
* `worker_nice` (``DIAGNET_WORKER_NICE``): how much lower than the calling thread numba's
  pool threads run (a nice increment, an int in [1, 19]), or ``"off"``; None (the default)
  lets `diagnet.diag.threadpools` pick.
* `heap` (``DIAGNET_HEAP``): ``"off"`` leaves glibc's malloc thresholds alone; None (the
  default) lets `diagnet.heap` set them.

An empty variable counts as unset. A bad value makes ``import diagnet`` fail with a message
that names the variable; a setter refuses a bad value and changes nothing. The three thread
settings take effect when `diagnet.diag.threadpools.configure` runs, and `heap` when
`diagnet.heap.configure` runs (each once per process, at the first CPU kernel call); the others
at the next operation.

This module sits at the bottom of the package (it imports nothing from diagnet), so that
`diagnet.backend` can read the device from it.
"""

from __future__ import annotations

import contextlib
import os

# The settings are read as attributes (``settings.device``), never star-imported: a copy
# would not follow `set_device` and the others.
__all__ = ["set_device", "set_cpu_kernels", "set_attention_kernels", "set_blas_thread_timeout",
           "set_gomp_spincount", "set_worker_nice", "set_heap", "override", "read_environment",
           "check_device", "DEVICES", "CPU_KERNELS", "ATTENTION_KERNELS", "ENV_DEVICE",
           "ENV_CPU_KERNELS", "ENV_ATTENTION_KERNELS", "ENV_BLAS_THREAD_TIMEOUT",
           "ENV_GOMP_SPINCOUNT", "ENV_WORKER_NICE", "ENV_HEAP"]

DEVICES = ("cpu", "cuda")
CPU_KERNELS = ("numba", "reference")
ATTENTION_KERNELS = ("blas", "reference", "numba")
_OFF_WORDS = ("off", "none", "no", "false")

ENV_DEVICE = "DIAGNET_DEVICE"
ENV_CPU_KERNELS = "DIAGNET_CPU_KERNELS"
ENV_ATTENTION_KERNELS = "DIAGNET_ATTENTION_KERNELS"
ENV_BLAS_THREAD_TIMEOUT = "DIAGNET_BLAS_THREAD_TIMEOUT"
ENV_GOMP_SPINCOUNT = "DIAGNET_GOMP_SPINCOUNT"
ENV_WORKER_NICE = "DIAGNET_WORKER_NICE"
ENV_HEAP = "DIAGNET_HEAP"

# The settings themselves; assigned from the environment at the end of this module.
device: str | None = None
cpu_kernels: str = "numba"
attention_kernels: str = "blas"
blas_thread_timeout: int | str | None = None
gomp_spincount: int | str | None = None
worker_nice: int | str | None = None
heap: str | None = None


# ----------------------------------------------------------------------------- values


def _device_name(device, label):
    """``device`` normalised (``"cuda:0"``, ``"gpu"`` -> ``"cuda"``); errors name ``label``."""
    if not isinstance(device, str):
        raise TypeError(f"{label} must be a str, one of {DEVICES}; got {type(device).__name__}")
    name = device.strip().lower()
    if name.startswith("cuda:") and name[len("cuda:"):].isdigit():
        index = int(name[len("cuda:"):])
        if index != 0:
            raise ValueError(f"diagnet uses one GPU: {label} must be 'cuda' or 'cuda:0'; to "
                             f"run on GPU {index}, set CUDA_VISIBLE_DEVICES={index}; got "
                             f"{device!r}")
        name = "cuda"
    if name == "gpu":
        name = "cuda"
    if name not in DEVICES:
        raise ValueError(f"{label} must be one of {DEVICES}; got {device!r}")
    return name


def check_device(device) -> str:
    """Validate a device name and return it normalised (``"cuda:0"``, ``"gpu"`` -> ``"cuda"``).

    diagnet runs on one GPU, CuPy's current device, so ``"cuda:1"`` and higher are refused
    rather than silently mapped to it (``CUDA_VISIBLE_DEVICES`` picks the GPU).
    """
    return _device_name(device, "device")


def _unset(value):
    return value is None or (isinstance(value, str) and not value.strip())


def _parse_device(value, label):
    return None if _unset(value) else _device_name(value, label)


def _choice(choices, default):
    """A parser for a setting that takes one of ``choices`` (case and spaces forgiven)."""
    def parse(value, label):
        if _unset(value):
            return default
        if not isinstance(value, str):
            raise TypeError(f"{label} must be a str, one of {choices}; got "
                            f"{type(value).__name__}")
        name = value.strip().lower()
        if name not in choices:
            raise ValueError(f"{label} must be one of {choices}; got {value!r}")
        return name
    return parse


def _off_or_int(low, high, what):
    """A parser for a thread setting: None (the default), ``"off"`` or an int in
    ``[low, high]`` (``high`` None: no upper bound); strings as in the environment."""
    def parse(value, label):
        if _unset(value):
            return None
        if isinstance(value, str):
            word = value.strip().lower()
            if word in _OFF_WORDS:
                return "off"
            try:
                value = int(word)
            except ValueError:
                raise ValueError(f"{label} must be 'off' or {what}; got {value!r}") from None
        elif isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{label} must be 'off' or {what}; got {type(value).__name__}")
        if value < low or (high is not None and value > high):
            raise ValueError(f"{label} must be 'off' or {what}; got {value}")
        return value
    return parse


def _off_or_default(value, label):
    """A parser for a setting that is None (the default: diagnet decides) or ``"off"``."""
    if _unset(value):
        return None
    if not isinstance(value, str):
        raise TypeError(f"{label} must be 'off' or None; got {type(value).__name__}")
    if value.strip().lower() not in _OFF_WORDS:
        raise ValueError(f"{label} must be 'off' (or unset); got {value!r}")
    return "off"


# setting -> (environment variable, parser)
_SETTINGS = {
    "device": (ENV_DEVICE, _parse_device),
    "cpu_kernels": (ENV_CPU_KERNELS, _choice(CPU_KERNELS, "numba")),
    "attention_kernels": (ENV_ATTENTION_KERNELS, _choice(ATTENTION_KERNELS, "blas")),
    "blas_thread_timeout": (ENV_BLAS_THREAD_TIMEOUT, _off_or_int(4, 30, "an int in [4, 30]")),
    "gomp_spincount": (ENV_GOMP_SPINCOUNT, _off_or_int(0, None, "an int >= 0")),
    "worker_nice": (ENV_WORKER_NICE, _off_or_int(1, 19, "an int in [1, 19]")),
    "heap": (ENV_HEAP, _off_or_default),
}


def _assign(changes, from_environment=False):
    """Check every change, then assign them all: a refused call changes nothing.

    Messages name the environment variable for values read from it, else the setting.
    """
    unknown = sorted(set(changes) - set(_SETTINGS))
    if unknown:
        raise TypeError(f"unknown settings {unknown}; the settings are {sorted(_SETTINGS)}")
    parsed = {}
    for key, value in changes.items():
        env, parse = _SETTINGS[key]
        parsed[key] = parse(value, env if from_environment else key)
    globals().update(parsed)  # the module attributes that the rest of diagnet reads


# ----------------------------------------------------------------------------- public API


def set_device(name):
    """The default device for new tensors: ``"cpu"``, ``"cuda"`` (``"cuda:0"``, ``"gpu"``
    accepted), or None for ``"cuda"`` where CuPy finds a GPU, else ``"cpu"``. An explicit
    ``device=`` argument still wins."""
    _assign({"device": name})


def set_cpu_kernels(name):
    """Run the CPU kernels of the diagonal, fused and layer-norm ops as ``"numba"`` (compiled,
    the default) or ``"reference"`` (the plain NumPy versions: for debugging, or where numba
    does not work)."""
    _assign({"cpu_kernels": name})


def set_attention_kernels(name):
    """The CPU implementation of attention: ``"blas"`` (the default), ``"reference"`` (also
    on the GPU) or ``"numba"``; see `diagnet.ops.attention`."""
    _assign({"attention_kernels": name})


def set_blas_thread_timeout(value):
    """OpenBLAS's idle spin for `diagnet.diag.threadpools.configure`: ``log2`` of cycles, an
    int in [4, 30]; ``"off"`` leaves OpenBLAS alone; None restores the default."""
    _assign({"blas_thread_timeout": value})


def set_gomp_spincount(value):
    """libgomp's spin count for numba's pool (`diagnet.diag.threadpools.configure`): an int
    >= 0; ``"off"`` leaves libgomp alone; None restores the default."""
    _assign({"gomp_spincount": value})


def set_worker_nice(value):
    """How much lower numba's pool threads run than the thread that starts them
    (`diagnet.diag.threadpools.configure`): a nice increment, an int in [1, 19]; ``"off"``
    leaves their priority alone; None restores the default."""
    _assign({"worker_nice": value})


def set_heap(value):
    """``"off"`` leaves glibc's malloc thresholds alone (`diagnet.heap.configure`); None
    restores the default (diagnet sets them at the first CPU kernel call)."""
    _assign({"heap": value})


@contextlib.contextmanager
def override(**changes):
    """Change settings for a ``with`` block (``override(cpu_kernels="reference")``); on exit
    every setting is restored, including any changed inside the block."""
    saved = {key: globals()[key] for key in _SETTINGS}
    _assign(changes)
    try:
        yield
    finally:
        globals().update(saved)


def read_environment(environ=None):
    """Set every setting from ``environ`` (default ``os.environ``), as at import: an unset
    variable gives the default. Checks all of them before changing any."""
    env = os.environ if environ is None else environ
    _assign({key: env.get(var) for key, (var, _) in _SETTINGS.items()}, from_environment=True)


read_environment()
