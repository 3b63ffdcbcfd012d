"""A stand-in for the parts of ``cupyx`` diagnet uses, over `simt.fake_cupy` arrays.

* ``cupyx.scatter_add(a, slices, value)``: ``a[slices] += value`` accumulating repeated
  indices (``numpy.add.at``), with CuPy's dtype restriction for integer-array indices;
* ``cupyx.scipy.special.erf`` (and any other ``scipy.special`` ufunc) on device arrays.

`modules` returns the module objects to register in ``sys.modules`` (``fake_cupy.install``
does that), so that ``import cupyx`` and ``from cupyx.scipy.special import erf`` both work.
"""

from __future__ import annotations

import types

import numpy as np
import scipy.special

from . import fake_cupy

# CuPy's atomicAdd-based scatter_add takes these dtypes only (with integer-array indices).
_SCATTER_ADD_DTYPES = (np.int32, np.float16, np.float32, np.float64, np.uint32, np.uint64)


def scatter_add(a, slices, value):
    """``a[slices] += value`` in place, adding every repeated index (``numpy.add.at``).

    ``a`` must be a device array; ``slices`` may hold host or device index arrays and
    ``value`` host or device data (CuPy uploads both).
    """
    if not isinstance(a, fake_cupy.ndarray):
        raise TypeError(f"scatter_add needs a cupy.ndarray; got {type(a).__name__}")
    index, advanced = a._index(slices)
    has_int_array = any(np.asarray(p).dtype.kind in "iu" for p in
                        (index if isinstance(index, tuple) else (index,))
                        if isinstance(p, (np.ndarray, list)))
    if has_int_array and not issubclass(a.dtype.type, _SCATTER_ADD_DTYPES):
        raise TypeError("scatter_add only supports int32, float16, float32, float64, uint32, "
                        "uint64, as data type")
    np.add.at(a._a, index, fake_cupy._unwrap(value, {}, allow_host=True))


def _special_getattr(name):
    """``cupyx.scipy.special.<name>``: the SciPy ufunc of that name on device arrays."""
    attr = getattr(scipy.special, name)
    if isinstance(attr, np.ufunc):
        return fake_cupy.ufunc(attr, "cupyx.scipy.special")
    raise AttributeError(f"module 'cupyx.scipy.special' (SIMT stand-in) has no attribute {name!r}")


special = types.ModuleType("cupyx.scipy.special", "SciPy special-function ufuncs on device arrays.")
special.__getattr__ = _special_getattr
special.erf = fake_cupy.ufunc(scipy.special.erf, "cupyx.scipy.special")

scipy_ = types.ModuleType("cupyx.scipy", "cupyx.scipy of the SIMT stand-in (special only).")
scipy_.special = special

cupyx = types.ModuleType("cupyx", "cupyx of the SIMT stand-in.")
cupyx.scatter_add = scatter_add
cupyx.scipy = scipy_


def modules() -> dict:
    """``{"cupyx": ..., "cupyx.scipy": ..., "cupyx.scipy.special": ...}``."""
    return {"cupyx": cupyx, "cupyx.scipy": scipy_, "cupyx.scipy.special": special}
