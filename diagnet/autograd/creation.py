"""Making tensors from data: `tensor` (always a copy) and `from_dlpack` (never a copy).

``Tensor(data)`` converts without copying where it can, and `Tensor.from_array` wraps a
backend array unchecked; these two are the user-facing constructors of `diagnet`.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from .dtypes import FLOAT_DTYPES, SUPPORTED_KINDS
from .tensor_class import Tensor


def tensor(data, dtype=None, device=None, requires_grad=False) -> Tensor:
    """Create a tensor from array-like ``data`` (copies it).

    Args:
        data: nested lists, a scalar, a NumPy/CuPy array, or a Tensor.
        dtype: ``float32`` (default for floating data), ``float64``, or an integer dtype.
        device: ``"cpu"`` or ``"cuda"``; default `backend.default_device()` (for a CuPy
            array: its own device).
        requires_grad: track gradients for this tensor (float dtypes only).
    """
    if isinstance(data, Tensor):
        data = data.data
    xp_src = backend.get_array_module(data)
    t = Tensor(data, dtype=dtype, device=device, requires_grad=requires_grad)
    if t.data is data or (xp_src is np and isinstance(data, np.ndarray)
                          and isinstance(t.data, np.ndarray) and np.shares_memory(t.data, data)):
        t.data = t.data.copy()
    return t


def from_dlpack(array) -> Tensor:
    """A tensor sharing memory with ``array``, any object with the DLPack protocol
    (``__dlpack__``): a NumPy, CuPy or PyTorch array, or another framework's tensor.

    No copy is made: changing one changes the other (the exporter's own rules apply; PyTorch
    refuses to export a tensor that requires grad). The tensor is a leaf that does not
    require grad, on ``"cpu"`` for host memory and on ``"cuda"`` for CUDA memory.

    Raises:
        TypeError: ``array`` has no ``__dlpack__``, or a dtype diagnet does not support
            (float16, complex, ...).
        ValueError: the memory is on a device diagnet cannot use.
    """
    arr = backend.from_dlpack(array)
    if arr.dtype.kind not in SUPPORTED_KINDS or (arr.dtype.kind == "f"
                                                 and arr.dtype not in FLOAT_DTYPES):
        raise TypeError(f"from_dlpack: dtype must be float32, float64, an integer or bool "
                        f"dtype; got {arr.dtype}")
    return Tensor.from_array(arr)
