"""Array backends: NumPy on the CPU, CuPy on a CUDA GPU.

This is the only module that imports CuPy. Everything else asks it which array module an
array belongs to (`get_array_module`, after Chainer's ``cuda.get_array_module``) and writes
its code once against that module, conventionally called ``xp``.

Device names are ``"cpu"`` and ``"cuda"``. The default device is ``"cuda"`` when CuPy imports
and a CUDA device answers, else ``"cpu"``; `diagnet.settings` (``DIAGNET_DEVICE``, read at
import, or ``settings.set_device``) and explicit ``device=`` arguments override it.
"""

from __future__ import annotations

import functools
import sys

import numpy as np

from . import settings
from .settings import DEVICES, ENV_DEVICE, check_device  # noqa: F401 - public here too


@functools.lru_cache(maxsize=None)
def _cupy_probe():
    """Import CuPy and ask for a device once. Returns ``(cupy_module_or_None, reason)``."""
    try:
        import cupy
    except ImportError as exc:  # the common case on CPU-only machines
        return None, f"CuPy is not installed ({exc}); install diagnet[cuda12] or diagnet[cuda13]"
    except Exception as exc:  # a broken CuPy install should not break diagnet on the CPU
        return None, f"CuPy failed to import: {type(exc).__name__}: {exc}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return None, f"CuPy imported but the CUDA runtime failed (driver error?): {exc}"
    if count < 1:
        return None, "CuPy imported but no CUDA device was found"
    return cupy, ""


def cupy_or_none():
    """The CuPy module when a usable CUDA device exists, else ``None``."""
    return _cupy_probe()[0]


def cuda_available() -> bool:
    """True when CuPy imports and at least one CUDA device answers."""
    return cupy_or_none() is not None


def cuda_unavailable_reason() -> str:
    """Why ``"cuda"`` cannot be used here (empty string when it can)."""
    return _cupy_probe()[1]


def _require_cupy():
    cp, reason = _cupy_probe()
    if cp is None:
        raise RuntimeError(f"device 'cuda' was requested but is not available: {reason}")
    return cp


def nccl():
    """CuPy's NCCL bindings, ``cupy.cuda.nccl``, for collectives on CuPy arrays.

    Raises ``RuntimeError`` with the reason when they cannot be used: CuPy or a device is
    missing, or CuPy cannot load the NCCL library (which comes from the ``nvidia-nccl-cu12``
    / ``nvidia-nccl-cu13`` wheels that the ``cuda12`` / ``cuda13`` extras install).
    """
    cp, reason = _cupy_probe()
    if cp is None:
        raise RuntimeError(f"NCCL needs CuPy and a CUDA device: {reason}")
    install = ("pip install nvidia-nccl-cu12 (or -cu13), which diagnet[cuda12] / "
               "diagnet[cuda13] bring")
    try:
        from cupy.cuda import nccl as module
    except Exception as exc:  # ImportError, or a library that fails to load
        raise RuntimeError(f"NCCL is not available to CuPy {cp.__version__} "
                           f"({type(exc).__name__}: {exc}); {install}") from exc
    if not getattr(module, "available", True):
        raise RuntimeError(f"NCCL is not available to CuPy {cp.__version__} (CuPy was built "
                           f"or loaded without it); {install}")
    return module


def default_device() -> str:
    """The device used when none is given: `settings.device` (``$DIAGNET_DEVICE``, or
    `diagnet.settings.set_device`) if set, else cuda if usable, else cpu."""
    name = settings.device
    if name is None:
        return "cuda" if cuda_available() else "cpu"
    if name == "cuda":
        _require_cupy()
    return name


def resolve_device(device=None) -> str:
    """Return a usable device name for ``device`` (``None`` means the default).

    Raises ``RuntimeError`` with the reason when ``"cuda"`` is asked for but unavailable.
    """
    if device is None:
        return default_device()
    name = check_device(device)
    if name == "cuda":
        _require_cupy()
    return name


def xp_for(device: str):
    """The array module (``numpy`` or ``cupy``) of a device name."""
    return _require_cupy() if resolve_device(device) == "cuda" else np


def get_array_module(*arrays):
    """Return ``cupy`` if any argument is a CuPy array (or a Tensor holding one), else ``numpy``.

    Tensors are unwrapped through their ``data`` attribute, so this works on either.
    """
    cp = cupy_or_none() if _cupy_imported() else None
    if cp is None:
        return np
    for a in arrays:
        # A Tensor is unwrapped through ``.data``; a CuPy array's own ``.data`` is a
        # MemoryPointer, so the array itself must be tested first.
        if isinstance(a, cp.ndarray) or isinstance(getattr(a, "data", None), cp.ndarray):
            return cp
    return np


def _cupy_imported() -> bool:
    # Avoid importing CuPy just to answer "is this a NumPy array?": if nobody imported it,
    # no CuPy array can exist.
    return "cupy" in sys.modules


def is_array(a) -> bool:
    """True for a NumPy or CuPy ndarray (not a Tensor, list or scalar)."""
    if isinstance(a, np.ndarray):
        return True
    xp = get_array_module(a)
    return xp is not np and isinstance(a, xp.ndarray)


def unwrap(a):
    """The backend array held by an array container (a diagnet Tensor), else ``a`` itself.

    A container is a class that declares ``wraps_array = True`` and keeps its array in
    ``data``. A ``data`` attribute alone does not make one: a SciPy sparse matrix keeps its
    stored values there, and unwrapping it would silently hand on the wrong array.
    """
    if is_array(a) or not getattr(type(a), "wraps_array", False):
        return a
    inner = a.data
    return inner if is_array(inner) else a


def device_of(array) -> str:
    """``"cuda"`` for a CuPy array, ``"cpu"`` for anything else."""
    return "cuda" if get_array_module(array) is not np else "cpu"


def to_device(array, device: str):
    """Copy ``array`` to ``device`` (no copy when it is already there)."""
    name = resolve_device(device)
    if device_of(array) == name:
        return array
    if name == "cpu":
        return array.get()
    return _require_cupy().asarray(array)


def to_numpy(array) -> np.ndarray:
    """A NumPy array with the contents of ``array`` (copied from the GPU when needed)."""
    if device_of(array) == "cuda":
        return array.get()
    return np.asarray(array)


#: DLPack's device types (``DLDeviceType``) that diagnet imports: host memory (CPU, and
#: CUDA pinned host memory) as NumPy arrays, CUDA device and managed memory as CuPy arrays
_DLPACK_HOST = (1, 3)
_DLPACK_CUDA = (2, 13)


def from_dlpack(obj):
    """The NumPy or CuPy array that shares memory with ``obj`` through DLPack.

    ``obj`` is any object with ``__dlpack__`` and ``__dlpack_device__`` (a NumPy, CuPy or
    PyTorch array). Host memory becomes a NumPy array, CUDA memory a CuPy array (which needs
    CuPy and a device). Raises `TypeError` for an object without the protocol and
    `ValueError` for memory on another kind of device.
    """
    if not hasattr(obj, "__dlpack__") or not hasattr(obj, "__dlpack_device__"):
        raise TypeError(f"from_dlpack: expected an array with the DLPack protocol "
                        f"(__dlpack__), such as a NumPy, CuPy or PyTorch array; got "
                        f"{type(obj).__name__}")
    device_type = int(obj.__dlpack_device__()[0])
    if device_type in _DLPACK_HOST:
        return np.from_dlpack(obj)
    if device_type in _DLPACK_CUDA:
        return _require_cupy().from_dlpack(obj)
    raise ValueError(f"from_dlpack: the array is in memory of DLPack device type "
                     f"{device_type}; diagnet imports host memory (types "
                     f"{_DLPACK_HOST}) and CUDA memory (types {_DLPACK_CUDA})")


def erf(x):
    """Element-wise error function for a NumPy or CuPy array."""
    if get_array_module(x) is np:
        from scipy.special import erf as _erf
    else:
        from cupyx.scipy.special import erf as _erf
    return _erf(x)


def scatter_add(target, index, values) -> None:
    """``target[index] += values`` in place, accumulating repeated indices (``add.at``).

    NumPy and CuPy (>= 12.1) both have ``add.at``; CuPy 14 deprecates ``cupyx.scatter_add``.
    """
    get_array_module(target).add.at(target, index, values)


def synchronize(device: str = "cuda") -> None:
    """Wait for all queued GPU work (no-op on the CPU); for timing."""
    if device == "cuda" and cuda_available():
        cupy_or_none().cuda.get_current_stream().synchronize()
