"""The dtypes a `Tensor` may hold, and the checks that a dtype or a conversion is allowed.

The dtype policy itself (float32 by default, no mixing of float dtypes, integers taking
the float operand's dtype) is stated in the `diagnet.autograd` package docstring; this
module holds the constants and checks that `tensor_class`, `function` and the ops apply
it with.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from ..checks import FLOAT_DTYPES
DEFAULT_DTYPE = np.dtype(np.float32)

#: dtypes a Tensor may hold: the two float types and NumPy's integer and bool types
#: (float16 and complex are not supported by the kernels or the dtype policy)
SUPPORTED_KINDS = "biuf"


def canonical_dtype(dtype):
    """``dtype`` (a name such as ``"float32"``, a NumPy type or dtype) as a supported
    `numpy.dtype`; ``None`` stays ``None``. Raises `TypeError` naming what was given."""
    if dtype is None:
        return None
    expected = "dtype must be float32, float64, an integer or bool dtype"
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{expected} (a name such as 'float32' or a NumPy dtype); "
                        f"got {dtype!r}") from None
    if dt.kind not in SUPPORTED_KINDS or (dt.kind == "f" and dt not in FLOAT_DTYPES):
        raise TypeError(f"{expected}; got {dt}")
    return dt


def check_integer_range(array, dtype, name="tensor") -> None:
    """Raise `ValueError` (prefixed with ``name``) if a value of the NumPy/CuPy ``array``
    would not survive a cast to the integer ``dtype`` (NumPy would wrap it around, or turn
    NaN into an arbitrary integer).

    Floats are truncated toward zero by the cast (as in NumPy and PyTorch), so a float fits
    when its truncation lies in the dtype's range; NaN and infinities never fit. A cast that
    is safe for every value (``int8`` to ``int32``, ``bool`` to ``uint8``) is not scanned.
    On the GPU the check reads one bool back from the device.
    """
    dtype = np.dtype(dtype)
    if array.dtype == dtype or np.can_cast(array.dtype, dtype, casting="safe") \
            or array.size == 0:
        return
    info = np.iinfo(dtype)
    flat = array.reshape(-1)
    if array.dtype.kind == "f":
        # the bounds -2**k and 2**k (one past the maximum) are exact in every float dtype
        whole = backend.get_array_module(array).trunc(flat)
        fits = (whole >= float(info.min)) & (whole < float(int(info.max) + 1))
    else:
        fits = (flat >= info.min) & (flat <= info.max)
    if bool(fits.all()):
        return
    bad = flat[fits.argmin()].item()  # the first value that does not fit
    raise ValueError(f"{name}: cannot convert to dtype {dtype} without wrapping around: it "
                     f"holds integers in [{info.min}, {info.max}]; got {bad!r}")
