"""A stand-in for the ``cupy`` module: NumPy arrays posing as GPU memory, kernels emulated.

``pytest --fake-cupy`` (see ``tests/conftest.py``) registers this module as ``cupy`` (and
`simt.fake_cupyx` as ``cupyx``) before diagnet probes for CuPy, so ``diagnet.cuda_available()``
is True and every test marked ``gpu`` runs the whole CuPy code path of diagnet on the CPU.
The kernel tests in ``tests/diag/test_cuda_kernels.py`` use it directly as the launcher's CuPy.

What it mirrors from CuPy, because diagnet could get it wrong:

* `ndarray` is its own class wrapping a NumPy array, *not* a NumPy subclass. Its ``.data`` is
  a `MemoryPointer` (as in CuPy), not the array. Implicit conversion to NumPy
  (``np.asarray(a)``, ``np.array(a)``) raises CuPy's ``TypeError``; ``a.get()`` and
  `asnumpy` are the only ways back to the host.
* NumPy functions and ufuncs called on stand-in arrays dispatch through
  ``__array_function__``/``__array_ufunc__`` and return stand-in arrays. Mixing in a host
  ``numpy.ndarray`` raises ``TypeError: Unsupported type <class 'numpy.ndarray'>`` (what CuPy
  raises for most functions); Python and NumPy scalars are fine. Reductions and integer
  indexing return 0-d arrays, not scalars. Binary operators defer to an operand with a
  higher ``__array_priority__`` or with ``__array_ufunc__ = None`` (CuPy's ``_should_use_rop``).
* Indexing follows CuPy's rules where they differ from NumPy's in ways that raise: one
  boolean mask per index at most, and basic-slice assignment takes a scalar or a device
  array (``a[1:3] = numpy_array`` is an error in CuPy).
* DLPack: arrays say they are in CUDA memory (``__dlpack_device__``), so only `from_dlpack`
  imports them (zero copy); ``np.from_dlpack`` of one raises, and `from_dlpack` of host
  memory raises.
* `empty` memory is poisoned (NaN, or -12345 for integers), so an output a kernel forgets to
  write shows up.
* `RawModule` / `RawKernel` check their arguments as strictly as CuPy *needs* them: device
  arrays must be stand-in arrays and C-contiguous, scalars must be ``np.int32``/``np.int64``/
  ``np.float32``/``np.float64`` (CuPy silently passes a Python int as a 64-bit ``long long``
  and a float as ``double``, whatever the kernel declares), grid and block are tuples of three
  ints. The kernels then run from the real ``kernels/*.cu`` source in the SIMT emulation
  harness (`simt.harness`), built with the launcher's own ``-D`` options.
* ``cupy.cuda.nccl`` is `simt.fake_nccl`: NCCL's calling convention (device pointers,
  counts, ``NCCL_*`` constants) over MPI on the stand-in's memory.
* A ``uint64`` kernel argument is a table of device addresses (``a.data.ptr`` of other
  arrays, as a kernel that updates many arrays at once takes them): every entry must be the
  address of a live stand-in array, which then travels to the harness as a memory block of
  its own (out-of-bounds accesses through the table are caught as for any array) and comes
  back with whatever the kernel wrote into it. Tables pointing at overlapping memory are
  refused: the harness could not keep such arrays in one piece.

What it does not mirror (only a real GPU run shows these): NVRTC compilation, the GPU memory
model and warp timing, streams and asynchrony (everything is synchronous), performance,
out-of-bounds fancy indices (CuPy wraps them around, NumPy raises), and the many corners of
CuPy's API where it accepts less than NumPy (here every NumPy function exists).
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import sys
import time
import types
import warnings
import weakref
from pathlib import Path

import numpy as np

from . import fake_nccl, harness

__version__ = "0.0.0+simt"  # not a real CuPy: the SIMT emulation stand-in of diagnet's tests

#: DLPack's device types (``DLDeviceType``) of host and CUDA memory
_DLPACK_CPU, _DLPACK_CUDA = 1, 2

_IMPLICIT_CONVERSION = ("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

#: Device-to-host reads so far: `ndarray.get` and everything built on it, ``bool()``,
#: ``item()``, ``tolist()``. Each one makes real CuPy wait for the GPU, so tests read this
#: counter to check that a hot path (a training step) never synchronises.
host_transfers = 0

#: Launches so far, so that tests can bound the launches of a training step:
#: ``kernel_launches`` of our own kernels (`RawKernel` calls), ``array_ops`` an estimate of
#: CuPy's own: one for each stand-in call that writes device memory (an element-wise op, a
#: reduction, a product, a copy, an assignment, an ``out=`` or in-place op, a gather by an
#: index array), none for views (reshape, transpose, basic indexing), uploads and reads back.
#: (Real CuPy may split such a call into several kernels, or run a small one on the host.)
kernel_launches = 0
array_ops = 0


def _host_transfer():
    global host_transfers
    host_transfers += 1


# Types a CuPy kernel accepts as a scalar operand (CuPy's ``_scalar.scalar_type_set``).
_PY_SCALARS = (bool, int, float, complex)


def _is_scalar(x) -> bool:
    return type(x) in _PY_SCALARS or isinstance(x, np.generic)


def _unsupported(x):
    return TypeError(f"Unsupported type {type(x)}")


# ----------------------------------------------------------------------------- wrap / unwrap


def _unwrap(obj, originals: dict, allow_host: bool = False):
    """``obj`` with every stand-in array replaced by its NumPy array (in lists/tuples/dicts too).

    ``originals`` collects ``id(numpy array) -> stand-in array`` so that a result which *is*
    an input (``ascontiguousarray`` of a contiguous array, ``astype(copy=False)``, ``out=``)
    comes back as the same stand-in object, as in CuPy. A host ``numpy.ndarray`` raises
    CuPy's ``TypeError`` unless ``allow_host`` (indices and converters accept host data).
    """
    if isinstance(obj, ndarray):
        originals[id(obj._a)] = obj
        return obj._a
    if isinstance(obj, np.ndarray):
        if not allow_host:
            raise _unsupported(obj)
        return obj
    if type(obj) is tuple or type(obj) is list:
        return type(obj)(_unwrap(o, originals, allow_host) for o in obj)
    if type(obj) is dict:
        return {k: _unwrap(v, originals, allow_host) for k, v in obj.items()}
    return obj


def _wrap(obj, originals: dict | None = None):
    """Turn NumPy results into stand-in results: arrays are wrapped, NumPy scalars become 0-d
    arrays (CuPy returns 0-d arrays from reductions and integer indexing), tuples and lists
    are wrapped element by element, random generators are proxied."""
    if isinstance(obj, np.ndarray):
        if originals and id(obj) in originals and originals[id(obj)]._a is obj:
            return originals[id(obj)]
        return ndarray._from_numpy(obj)
    if isinstance(obj, np.generic):
        return ndarray._from_numpy(np.asarray(obj))
    if type(obj) is tuple or type(obj) is list:
        return type(obj)(_wrap(o, originals) for o in obj)
    if isinstance(obj, (np.random.Generator, np.random.RandomState)):
        return _Namespace(obj, f"cupy.random.{type(obj).__name__}")
    return obj


def _call(func, args, kwargs, allow_host: bool = False, originals: dict | None = None):
    """Run the NumPy ``func`` on the unwrapped arguments and wrap its result."""
    originals = {} if originals is None else originals
    args = _unwrap(args, originals, allow_host)
    kwargs = _unwrap(kwargs, originals, allow_host)
    result = _wrap(func(*args, **kwargs), originals)
    if result is None or "out" in kwargs or _writes_new_memory(result, originals):
        _count_array_op()
    return result


def _writes_new_memory(result, originals: dict) -> bool:
    """Whether ``result`` holds an array that is no view of an input (in ``originals``)."""
    inputs = [a._a for a in originals.values()]
    results = result if type(result) in (tuple, list) else (result,)
    return any(isinstance(r, ndarray) and not any(np.may_share_memory(r._a, a) for a in inputs)
               for r in results)


def _count_array_op():
    """Count one of CuPy's own kernel launches (see `array_ops`)."""
    global array_ops
    array_ops += 1


def _device_function(func, name: str):
    """A ``cupy.<name>`` made from the NumPy function ``func`` (host arrays rejected)."""

    @functools.wraps(func)
    def device_function(*args, **kwargs):
        return _call(func, args, kwargs)

    device_function.__qualname__ = device_function.__name__ = name
    device_function.__module__ = "cupy"
    return device_function


class ufunc:
    """A CuPy ufunc: the NumPy ufunc applied to device arrays (``__call__``, ``reduce``, ...)."""

    def __init__(self, np_ufunc, module: str = "cupy"):
        self._ufunc = np_ufunc
        self.__name__ = np_ufunc.__name__
        self._module = module

    def __repr__(self):
        return f"<ufunc '{self.__name__}' ({self._module} stand-in)>"

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        attr = getattr(self._ufunc, name)
        if name in ("reduce", "accumulate", "reduceat", "outer", "at"):
            return _device_function(attr, f"{self.__name__}.{name}")
        return attr  # nin, nout, types, identity, ...

    def __call__(self, *args, **kwargs):
        return _call(self._ufunc, args, kwargs)


class _Namespace:
    """``cupy.random``, ``cupy.linalg``, ...: a NumPy namespace (or a random generator) whose
    functions return device arrays."""

    def __init__(self, target, name: str):
        self._target = target
        self._name = name

    def __repr__(self):
        return f"<{self._name} (SIMT stand-in over {self._target!r})>"

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        attr = getattr(self._target, name)
        if isinstance(attr, np.ufunc):
            return ufunc(attr, self._name)
        if isinstance(attr, type) or not callable(attr):
            return attr
        return _device_function(attr, name)


# ----------------------------------------------------------------------------- ndarray


class MemoryPointer:
    """What CuPy's ``ndarray.data`` is: a pointer into device memory (here, host memory that
    only the stand-in and the harness touch)."""

    __slots__ = ("ptr", "device_id")

    def __init__(self, ptr: int, device_id: int = 0):
        self.ptr = ptr
        self.device_id = device_id

    @property
    def device(self):
        return cuda.Device(self.device_id)

    def __int__(self):
        return self.ptr

    def __repr__(self):
        return f"<MemoryPointer 0x{self.ptr:x} on device {self.device_id} (SIMT stand-in)>"


class Flags:
    """CuPy's ``ndarray.flags``: only ``c_contiguous``, ``f_contiguous`` and ``owndata``
    (there is no ``writeable``)."""

    __slots__ = ("c_contiguous", "f_contiguous", "owndata")

    def __init__(self, c_contiguous, f_contiguous, owndata):
        self.c_contiguous = bool(c_contiguous)
        self.f_contiguous = bool(f_contiguous)
        self.owndata = bool(owndata)

    def __getitem__(self, name):
        key = {"C_CONTIGUOUS": "c_contiguous", "F_CONTIGUOUS": "f_contiguous",
               "OWNDATA": "owndata"}.get(name)
        if key is None:
            raise KeyError(f"{name} is not defined for cupy.ndarray.flags")
        return getattr(self, key)

    def __repr__(self):
        return (f"  C_CONTIGUOUS : {self.c_contiguous}\n  F_CONTIGUOUS : {self.f_contiguous}\n"
                f"  OWNDATA : {self.owndata}")


# NumPy attributes that would hand out host memory (or pretend an array is a host buffer).
_HOST_ONLY = frozenset({"ctypes", "flat", "tofile", "dump", "dumps", "setflags", "getfield",
                        "setfield", "itemset", "newbyteorder", "resize"})


def _should_use_rop(x, y) -> bool:
    """CuPy's rule for ``x <op> y`` with a non-CuPy ``y``: defer to ``y`` (return
    NotImplemented) when it opts out of ufuncs or has a higher ``__array_priority__``."""
    try:
        y_ufunc = y.__array_ufunc__
    except AttributeError:
        return getattr(x, "__array_priority__", 0) < getattr(y, "__array_priority__", 0)
    return y_ufunc is None


def _poison(a: np.ndarray) -> np.ndarray:
    """Fill fresh "device memory" with values a kernel would never write (GPU memory is not
    zeroed; a forgotten output must not pass as zeros)."""
    if a.dtype.kind in "fc":
        a.fill(np.nan)
    elif a.dtype.kind == "i":
        a.fill(-12345)
    elif a.dtype.kind == "u":
        a.fill(np.iinfo(a.dtype).max)
    elif a.dtype.kind == "b":
        a.fill(True)
    return a


class ndarray:
    """A CuPy array stand-in: owns a NumPy array that only the stand-in may touch.

    ``ndarray(shape, dtype)`` allocates uninitialised (poisoned) memory as in CuPy. Attributes
    and methods not defined here come from the NumPy array, with arguments unwrapped and results
    wrapped (so ``a.sum()`` is a 0-d device array, ``a.reshape(...)`` a device view).
    """

    __slots__ = ("_a", "__weakref__")
    __array_priority__ = 100  # CuPy's value (Tensor uses 200, DiagMatrix 1000)

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        if memptr is not None or strides is not None:
            raise NotImplementedError("the SIMT stand-in does not support memptr/strides")
        self._a = _poison(np.empty(shape, dtype=dtype, order=order))

    @classmethod
    def _from_numpy(cls, a: np.ndarray) -> "ndarray":
        if a.dtype == object:
            raise ValueError("Unsupported dtype object")  # CuPy has no object arrays
        obj = cls.__new__(cls)
        obj._a = a
        return obj

    # -- attributes CuPy defines itself
    @property
    def shape(self):
        return self._a.shape

    @shape.setter
    def shape(self, value):
        self._a.shape = value  # in-place reshape without copy, like CuPy's setter

    @property
    def dtype(self):
        return self._a.dtype

    @property
    def ndim(self):
        return self._a.ndim

    @property
    def size(self):
        return self._a.size

    @property
    def itemsize(self):
        return self._a.itemsize

    @property
    def nbytes(self):
        return self._a.nbytes

    @property
    def strides(self):
        return self._a.strides

    @property
    def flags(self):
        return Flags(self._a.flags.c_contiguous, self._a.flags.f_contiguous, self._a.base is None)

    @property
    def data(self) -> MemoryPointer:
        """A `MemoryPointer`, as in CuPy (not the array: diagnet must not unwrap it as one)."""
        return MemoryPointer(_register_address(self))

    @property
    def device(self):
        return cuda.Device(0)

    @property
    def base(self):
        base = self._a.base
        return ndarray._from_numpy(base) if isinstance(base, np.ndarray) else None

    @property
    def T(self):
        return self if self.ndim < 2 else ndarray._from_numpy(self._a.T)

    def __getattr__(self, name):
        # Only reached for names not defined above. Private and dunder names are refused so
        # that NumPy's probes (``__array_interface__``, ``__array_struct__``) find nothing and
        # implicit conversion stays impossible.
        if name.startswith("_") or name in _HOST_ONLY:
            raise AttributeError(f"'cupy.ndarray' object has no attribute {name!r}")
        attr = getattr(self._a, name)
        if not callable(attr):
            return _wrap(attr, {id(self._a): self})

        @functools.wraps(attr)
        def method(*args, **kwargs):
            return _call(attr, args, kwargs, originals={id(self._a): self})

        return method

    # -- host transfer: the only ways out
    def get(self, stream=None, order="C", out=None, blocking=True) -> np.ndarray:
        """A NumPy copy of the array (``out``: copy into that host array instead)."""
        _host_transfer()
        if out is not None:
            if not isinstance(out, np.ndarray):
                raise TypeError("Only numpy.ndarray can be obtained from cupy.ndarray")
            if out.dtype != self.dtype:
                raise TypeError(f"{out.dtype} array cannot be obtained from {self.dtype} array")
            if out.shape != self.shape:
                raise ValueError(f"Shape mismatch. Expected shape: {self.shape}, "
                                 f"actual shape: {out.shape}")
            out[...] = self._a
            return out
        order = order.upper()
        if order == "A":
            order = "F" if self._a.flags.f_contiguous and not self._a.flags.c_contiguous else "C"
        return np.array(self._a, order=order, copy=True)

    def set(self, arr, stream=None):
        """Copy the host array ``arr`` (same dtype and shape) into this array."""
        if not isinstance(arr, np.ndarray):
            raise TypeError("Only numpy.ndarray can be set to cupy.ndarray")
        if arr.dtype != self.dtype:
            raise TypeError(f"{arr.dtype} array cannot be set to {self.dtype} array")
        if arr.shape != self.shape:
            raise ValueError(f"Shape mismatch. Old shape: {self.shape}, new shape: {arr.shape}")
        self._a[...] = arr

    def __array__(self, dtype=None, copy=None):
        raise TypeError(_IMPLICIT_CONVERSION)

    # -- DLPack: CUDA memory, which only `from_dlpack` imports (a host consumer such as
    #    ``np.from_dlpack`` is refused, as it is by a real CuPy array)
    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        if not _dlpack_import.active:
            raise BufferError("the stand-in exports CUDA memory, which only cupy.from_dlpack "
                              "imports")
        options = {"max_version": max_version, "copy": copy}
        return self._a.__dlpack__(**{k: v for k, v in options.items() if v is not None})

    def __dlpack_device__(self):
        return (_DLPACK_CUDA, 0)

    # -- NumPy protocols
    def __array_ufunc__(self, ufunc_, method, *inputs, **kwargs):
        for x in inputs + tuple(kwargs.get("out", ())):
            if isinstance(x, ndarray) or _is_scalar(x):
                continue
            if isinstance(x, np.ndarray):
                raise _unsupported(x)
            return NotImplemented
        return _call(getattr(ufunc_, method), inputs, kwargs)

    def __array_function__(self, func, types_, args, kwargs):
        for t in types_:
            if not issubclass(t, (ndarray, np.ndarray)):
                return NotImplemented
        return _call(func, args, kwargs)

    # -- container protocol
    def __len__(self):
        if self.ndim == 0:
            raise TypeError("len() of unsized object")
        return self._a.shape[0]

    def __iter__(self):
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(self._a.shape[0]))

    def _index(self, key):
        """``key`` with device arrays unwrapped (host index arrays are uploaded by CuPy, so
        they are accepted), after CuPy's rule of at most one boolean mask."""
        parts = list(key) if isinstance(key, tuple) else [key]
        arrays = [p for p in parts if isinstance(p, (ndarray, np.ndarray, list))]
        masks = [p for p in arrays if not isinstance(p, list) and p.dtype == np.bool_]
        if masks and len(arrays) > 1:
            raise ValueError("currently, CuPy only supports slices that consist of one "
                             "boolean array.")
        return _unwrap(key, {}, allow_host=True), bool(arrays)

    def __getitem__(self, key):
        index, advanced = self._index(key)
        if advanced:  # a gather; basic indexing is a view
            _count_array_op()
        return _wrap(self._a[index], {id(self._a): self})

    def __setitem__(self, key, value):
        index, advanced = self._index(key)
        if not advanced and not isinstance(value, ndarray) and not _is_scalar(value):
            # CuPy's basic-slice assignment is ``fill`` for anything but a device array
            if isinstance(value, np.ndarray):
                if value.shape != ():
                    raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
            else:
                raise _unsupported(value)
        self._a[index] = _unwrap(value, {}, allow_host=True)
        _count_array_op()

    # -- conversions that synchronise in CuPy (allowed: they go through get())
    def item(self):
        _host_transfer()
        return self._a.item()

    def tolist(self):
        _host_transfer()
        return self._a.tolist()

    def __bool__(self):
        _host_transfer()
        if self.size == 0:
            warnings.warn("The truth value of an empty array is ambiguous. Returning False, "
                          "but in future this will result in an error.", DeprecationWarning,
                          stacklevel=2)
            return False
        if self.size > 1:
            raise ValueError("The truth value of an array with more than one element is "
                             "ambiguous. Use a.any() or a.all()")
        return bool(self._a.reshape(()))

    def __int__(self):
        return int(self.get())

    def __float__(self):
        return float(self.get())

    def __complex__(self):
        return complex(self.get())

    def __repr__(self):
        return repr(self._a)

    def __str__(self):
        return str(self._a)

    def __format__(self, spec):
        return format(self._a, spec)

    def __copy__(self):
        return self.copy()

    def __deepcopy__(self, memo):
        return self.copy()

    # -- comparisons
    def _compare(self, other, np_op, default=None):
        if isinstance(other, ndarray):
            return np_op(self, other)
        if _should_use_rop(self, other):
            return NotImplemented
        if default is not None and (type(other).__eq__ is object.__eq__ or other is None):
            # never equal to an element (CuPy: comparison with None, Ellipsis, ...)
            return ndarray._from_numpy(np.full(self.shape, default, dtype=bool))
        return np_op(self, other)

    def __eq__(self, other):
        return self._compare(other, np.equal, default=False)

    def __ne__(self, other):
        return self._compare(other, np.not_equal, default=True)

    def __lt__(self, other):
        return self._compare(other, np.less)

    def __le__(self, other):
        return self._compare(other, np.less_equal)

    def __gt__(self, other):
        return self._compare(other, np.greater)

    def __ge__(self, other):
        return self._compare(other, np.greater_equal)

    __hash__ = None  # arrays are mutable

    # -- unary operators
    def __neg__(self):
        return np.negative(self)

    def __pos__(self):
        return np.positive(self)

    def __abs__(self):
        return np.absolute(self)

    def __invert__(self):
        return np.invert(self)


def _binary_operator(np_ufunc, name):
    """``a <op> b``, ``b <op> a`` and ``a <op>= b`` for one ufunc, with CuPy's deferral rule.
    Everything else (host arrays, scalars) goes through ``__array_ufunc__``."""

    def forward(self, other):
        if not isinstance(other, ndarray) and _should_use_rop(self, other):
            return NotImplemented
        return np_ufunc(self, other)

    def reflected(self, other):
        # a reflected operator is CuPy's last chance: no deferral
        return np_ufunc(other, self)

    def inplace(self, other):
        return np_ufunc(self, other, out=(self,))

    for fn, dunder in ((forward, f"__{name}__"), (reflected, f"__r{name}__"),
                       (inplace, f"__i{name}__")):
        fn.__name__ = fn.__qualname__ = dunder
        setattr(ndarray, dunder, fn)


for _name, _ufunc in {"add": np.add, "sub": np.subtract, "mul": np.multiply,
                      "matmul": np.matmul, "truediv": np.true_divide,
                      "floordiv": np.floor_divide, "mod": np.remainder, "pow": np.power,
                      "lshift": np.left_shift, "rshift": np.right_shift, "and": np.bitwise_and,
                      "or": np.bitwise_or, "xor": np.bitwise_xor}.items():
    _binary_operator(_ufunc, _name)


def _divmod(self, other):
    if not isinstance(other, ndarray) and _should_use_rop(self, other):
        return NotImplemented
    return np.divmod(self, other)


ndarray.__divmod__ = _divmod
ndarray.__rdivmod__ = lambda self, other: np.divmod(other, self)
ndarray.__module__ = "cupy"  # error messages name it cupy.ndarray, like the real one


# ----------------------------------------------------------------------------- module functions


def asarray(a, dtype=None, order=None, *, blocking=False):
    """Upload host data (array, list, scalar) to the device; a device array of the right
    dtype is returned as is (no copy), as in CuPy."""
    if isinstance(a, ndarray):
        return a.astype(dtype, order=order or "K", copy=False) if dtype is not None else a
    host = np.array(_unwrap(a, {}, allow_host=True), dtype=dtype, order=order or "K", copy=True)
    return ndarray._from_numpy(host)


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    """Like `asarray`, copying device arrays too unless ``copy=False``."""
    originals: dict = {}
    data = _unwrap(obj, originals, allow_host=True)
    result = np.array(data, dtype=dtype, copy=bool(copy) or None, order=order, ndmin=ndmin)
    if not copy:
        return _wrap(result, originals)
    return ndarray._from_numpy(result)


asanyarray = asarray


def ascontiguousarray(a, dtype=None):
    """``a`` itself when already C-contiguous with that dtype, else a contiguous copy. Only
    device arrays (CuPy's signature takes a ``cupy.ndarray``)."""
    if not isinstance(a, ndarray):
        raise TypeError(f"Argument 'a' has incorrect type (expected cupy.ndarray, got "
                        f"{type(a).__name__})")
    return _call(np.ascontiguousarray, (a,), {"dtype": dtype})


def empty(shape, dtype=float, order="C"):
    """Uninitialised device memory: poisoned with NaN / -12345 so a missed write shows."""
    return ndarray(shape, dtype=dtype, order=order)


def empty_like(prototype, dtype=None, order="K", subok=None, shape=None):
    """`empty` with the shape and dtype of ``prototype`` (poisoned too)."""
    if not isinstance(prototype, ndarray):
        raise _unsupported(prototype)
    a = np.empty_like(prototype._a, dtype=dtype, order=order, shape=shape)
    return ndarray._from_numpy(_poison(a))


def asnumpy(a, stream=None, order="C", out=None, blocking=True) -> np.ndarray:
    """A host copy of a device array; host data is returned through ``numpy.asarray``."""
    if isinstance(a, ndarray):
        return a.get(stream=stream, order=order, out=out, blocking=blocking)
    if out is not None:
        out[...] = a
        return out
    return np.asarray(a, order=order)


class _AsHostMemory:
    """An exporter of CUDA memory presented to NumPy as host memory (which, here, it is)."""

    def __init__(self, exporter):
        self._exporter = exporter

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        options = {"max_version": max_version, "copy": copy}
        return self._exporter.__dlpack__(**{k: v for k, v in options.items() if v is not None})

    def __dlpack_device__(self):
        return (_DLPACK_CPU, 0)


_dlpack_import = types.SimpleNamespace(active=False)  # inside `from_dlpack`


def from_dlpack(array):
    """A device array sharing memory with ``array``, an exporter whose ``__dlpack_device__``
    says CUDA (a stand-in array, or a diagnet tensor holding one); host memory is refused."""
    device_type = array.__dlpack_device__()[0]
    if device_type != _DLPACK_CUDA:
        raise BufferError(f"the CuPy stand-in imports CUDA memory only; got DLPack device "
                          f"type {device_type}")
    _dlpack_import.active = True
    try:
        return ndarray._from_numpy(np.from_dlpack(_AsHostMemory(array)))
    finally:
        _dlpack_import.active = False


def get_array_module(*args):
    """This module when any argument is a device array, else NumPy (as ``cupy.get_array_module``)."""
    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else np


def __getattr__(name):
    """Every other ``cupy.<name>``: the NumPy function of that name on device arrays.

    Types and constants (``cupy.float32``, ``cupy.pi``) are NumPy's own, as in CuPy; ufuncs
    and functions are wrapped (host arrays refused, results wrapped); submodules
    (``cupy.random``, ``cupy.linalg``, ``cupy.fft``) become namespaces of wrapped functions.
    Results are cached in the module (builtin names excepted).
    """
    if name.startswith("_"):
        raise AttributeError(f"module 'cupy' has no attribute {name!r}")
    try:
        attr = getattr(np, name)
    except AttributeError:
        raise AttributeError(f"module 'cupy' (SIMT stand-in) has no attribute {name!r}") from None
    if isinstance(attr, np.ufunc):
        value = ufunc(attr)
    elif isinstance(attr, types.ModuleType):
        value = _Namespace(attr, f"cupy.{name}")
    elif isinstance(attr, type) or not callable(attr):
        value = attr
    else:
        value = _device_function(attr, name)
    # Cache in the module, except names of Python builtins (all, any, sum, max, min, abs,
    # round, ...): a module global ``all`` would shadow the builtin for the code above.
    if name not in vars(builtins):
        globals()[name] = value
    return value


# ----------------------------------------------------------------------------- cupy.cuda


class CUDARuntimeError(RuntimeError):
    """What ``cupy.cuda.runtime`` raises (here: only for a device other than 0)."""


_PROPERTIES = {
    # Plausible numbers (an sm_90 part) for code that sizes grids from the device; the name
    # says what it really is.
    "name": b"SIMT emulator (diagnet test stand-in)",
    "totalGlobalMem": 80 * 2**30,
    "sharedMemPerBlock": 48 * 1024,
    "sharedMemPerBlockOptin": 227 * 1024,
    "sharedMemPerMultiprocessor": 228 * 1024,
    "regsPerBlock": 65536,
    "regsPerMultiprocessor": 65536,
    "warpSize": 32,
    "maxThreadsPerBlock": 1024,
    "maxThreadsDim": (1024, 1024, 64),
    "maxGridSize": (2**31 - 1, 65535, 65535),
    "maxThreadsPerMultiProcessor": 2048,
    "maxBlocksPerMultiProcessor": 32,
    "multiProcessorCount": 132,
    "clockRate": 1_980_000,
    "memoryClockRate": 2_619_000,
    "memoryBusWidth": 5120,
    "l2CacheSize": 50 * 2**20,
    "major": 9,
    "minor": 0,
    "computeMode": 0,
    "concurrentKernels": 1,
    "pciBusID": 0,
    "pciDeviceID": 0,
}


def _check_device_id(device_id) -> int:
    device_id = int(device_id)
    if device_id != 0:
        raise CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")
    return device_id


class Device:
    """``cupy.cuda.Device``: the one emulated device (id 0)."""

    def __init__(self, device=None):
        self.id = 0 if device is None else _check_device_id(device)

    @property
    def compute_capability(self) -> str:
        return f"{_PROPERTIES['major']}{_PROPERTIES['minor']}"

    @property
    def mem_info(self):
        return _PROPERTIES["totalGlobalMem"], _PROPERTIES["totalGlobalMem"]

    def synchronize(self):
        """Everything is synchronous here."""

    def use(self):
        """Make this the current device (it always is)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __int__(self):
        return self.id

    def __eq__(self, other):
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self):
        return hash(self.id)

    def __repr__(self):
        return f"<CUDA Device {self.id} (SIMT stand-in)>"


class Event:
    """``cupy.cuda.Event``: records host time (launches are synchronous)."""

    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.disable_timing = disable_timing
        self.time = None

    def record(self, stream=None):
        self.time = time.perf_counter()

    def synchronize(self):
        """Nothing is in flight."""

    @property
    def done(self):
        return True


def get_elapsed_time(start_event: Event, end_event: Event) -> float:
    """Milliseconds between two recorded events."""
    if start_event.time is None or end_event.time is None:
        raise CUDARuntimeError("cudaErrorInvalidResourceHandle: event not recorded")
    return (end_event.time - start_event.time) * 1e3


class Stream:
    """``cupy.cuda.Stream``: every stream is the synchronous null stream."""

    def __init__(self, null=False, non_blocking=False, ptds=False):
        self.ptr = 0

    def synchronize(self):
        """Nothing is in flight."""

    def record(self, event=None):
        event = Event() if event is None else event
        event.record(self)
        return event

    def use(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


Stream.null = Stream(null=True)


def get_current_stream(device_id=None) -> Stream:
    return Stream.null


class _MemoryPool:
    def used_bytes(self):
        return 0

    def total_bytes(self):
        return 0

    def free_all_blocks(self, stream=None):
        """NumPy's allocator frees memory itself."""


_memory_pool = _MemoryPool()


def get_default_memory_pool():
    return _memory_pool


def _module(name: str, doc: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name, doc)
    mod.__dict__.update(attrs)
    return mod


def _device_properties(device) -> dict:
    _check_device_id(device)
    return dict(_PROPERTIES)


runtime = _module(
    "cupy.cuda.runtime", "``cupy.cuda.runtime`` of the SIMT stand-in: one device, id 0.",
    CUDARuntimeError=CUDARuntimeError,
    getDeviceCount=lambda: 1,
    getDevice=lambda: 0,
    setDevice=_check_device_id,
    getDeviceProperties=_device_properties,
    deviceSynchronize=lambda: None,
    memGetInfo=lambda: (_PROPERTIES["totalGlobalMem"], _PROPERTIES["totalGlobalMem"]),
    runtimeGetVersion=lambda: 12080,
    driverGetVersion=lambda: 12080,
    is_hip=False,
)

cuda = _module(
    "cupy.cuda", "``cupy.cuda`` of the SIMT stand-in.",
    runtime=runtime, Device=Device, Event=Event, Stream=Stream, MemoryPointer=MemoryPointer,
    get_elapsed_time=get_elapsed_time, get_current_stream=get_current_stream,
    is_available=lambda: True, nccl=fake_nccl,
)

random = _Namespace(np.random, "cupy.random")
get_default_pinned_memory_pool = get_default_memory_pool


# ----------------------------------------------------------------------------- kernels


class KernelArgumentError(TypeError):
    """A kernel argument CuPy would misinterpret (or reject)."""


class SimtDevice:
    """Where the stand-in's kernels run, and a record of what ran there.

    Args:
        builder: the `harness.HarnessBuilder` (default: the process-wide shared one).
        flavor: the harness build to run kernels in (``"asan"``, ``"plain"``, ``"tsan"``,
            ...; default: the builder's own, ``"asan"`` unless ASan cannot run here).
        workdir: where launch files are written (default: the builder's directory).

    ``launches`` lists ``(kernel name, grid, block)`` of every launch and ``compiles`` the
    options of every module built, so tests can check what the launcher did.
    """

    def __init__(self, builder=None, flavor: str | None = None, workdir: Path | None = None):
        self.builder = builder
        self.flavor = flavor
        self.workdir = workdir
        self.launches: list[tuple[str, tuple, tuple]] = []
        self.compiles: list[tuple[str, ...]] = []

    def build(self, source: str, options: tuple[str, ...]) -> Path:
        """The harness binary of ``kernels/<source>`` for ``options`` (skips the test where
        g++ is absent)."""
        if harness.GXX is None:
            import pytest

            pytest.skip(harness.NO_GXX_REASON)
        if self.builder is None:
            self.builder = harness.shared_builder()
        flavor = self.flavor
        if flavor is None:
            self.builder.check_flavor(source, options)  # ASan where it runs, else plain
            flavor = self.builder.flavor
        self.compiles.append(tuple(options))
        return self.builder.build(source, tuple(options), flavor)

    def run(self, binary: Path, name: str, grid, block, args):
        """Run one launch and copy the output arrays back into the stand-in arrays."""
        self.launches.append((name, grid, block))
        workdir = self.workdir or self.builder.workdir
        values, blocks = _with_address_tables(args)
        outputs = harness.run_harness(binary, name, grid, block, values, workdir,
                                      [b._a for b in blocks])
        for index, data in outputs.items():
            if index < len(args):
                a = args[index]._a
            else:
                a = blocks[index - len(args)]._a
                if data == a.tobytes():
                    continue  # not written (it may be read-only memory)
            a[...] = np.frombuffer(data, dtype=a.dtype).reshape(a.shape)


_device: SimtDevice | None = None


def current_device() -> SimtDevice:
    """The `SimtDevice` new modules run on (a default one is made on first use)."""
    global _device
    if _device is None:
        _device = SimtDevice()
    return _device


@contextlib.contextmanager
def use_device(device: SimtDevice):
    """Run the kernels of modules compiled inside the block on ``device``."""
    global _device
    previous, _device = _device, device
    try:
        yield device
    finally:
        _device = previous


def _kernel_value(a):
    """The harness value of one kernel argument, checked like CuPy needs it."""
    if isinstance(a, ndarray):
        if not a._a.flags.c_contiguous:
            # CuPy passes the data pointer; the kernel would index a strided array as if dense
            raise KernelArgumentError("a kernel array argument must be C-contiguous; got "
                                      f"strides {a.strides} for shape {a.shape}")
        return a._a
    if isinstance(a, (np.int32, np.int64, np.float32, np.float64)):
        return a
    if type(a) in (int, float, bool):
        raise KernelArgumentError(
            f"a Python {type(a).__name__} ({a!r}) reaches a CUDA kernel as a 64-bit "
            f"{'long long' if type(a) is not float else 'double'} whatever the kernel declares; "
            "pass np.int32/np.int64/np.float32/np.float64")
    raise _unsupported(a)


#: ``ndarray.data`` addresses handed out -> weak references to the arrays that begin there,
#: so that a table of addresses can be turned back into the arrays it points at.
_address_owners: dict[int, list] = {}


def _register_address(a: ndarray) -> int:
    """The address of ``a``'s memory, remembered as ``a``'s (see `_address_owner`)."""
    address = a._a.__array_interface__["data"][0]
    refs = [r for r in _address_owners.get(address, ()) if r() is not None and r() is not a]
    _address_owners[address] = refs + [weakref.ref(a)]
    if len(_address_owners) > 4096:  # forget the addresses of arrays that are gone
        for key in [k for k, rs in _address_owners.items() if all(r() is None for r in rs)]:
            del _address_owners[key]
    return address


def _address_owner(address: int) -> ndarray:
    """The live array whose ``data.ptr`` was ``address`` (the largest, if views of one
    array share that start)."""
    owners = [r() for r in _address_owners.get(address, ())]
    owners = [a for a in owners if a is not None]
    if not owners:
        raise KernelArgumentError(
            f"0x{address:x} in a table of device addresses (a uint64 kernel argument) is not "
            "the address of a live device array; take addresses from a.data.ptr")
    return max(owners, key=lambda a: a.nbytes)


def live_spans() -> list:
    """``(start, end)`` addresses of the live arrays whose ``data.ptr`` was taken (for the
    NCCL stand-in, which receives bare pointers)."""
    return [(address, address + a.nbytes) for address, refs in _address_owners.items()
            for a in (r() for r in refs) if a is not None]


def _with_address_tables(args):
    """``(values, blocks)``: the harness values of ``args``, each uint64 array replaced by a
    `harness.AddressTable` into ``blocks``, the arrays its addresses point at (each once)."""
    values, blocks, numbers = [], [], {}
    for a in args:
        value = _kernel_value(a)
        if isinstance(value, np.ndarray) and value.dtype == np.uint64:
            entries = []
            for address in value.tolist():
                if address not in numbers:
                    numbers[address] = len(blocks)
                    blocks.append(_address_owner(address))
                entries.append(numbers[address])
            value = harness.AddressTable(tuple(entries))
        values.append(value)
    spans = sorted((b.data.ptr, b.data.ptr + b.nbytes) for b in blocks if b.nbytes)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        if start < end:
            raise KernelArgumentError("tables of device addresses point at overlapping memory; "
                                      "the SIMT harness runs each array as a block of its own")
    return values, blocks


def _check_dims(what: str, dims):
    if not (isinstance(dims, tuple) and len(dims) == 3
            and all(type(d) is int and d >= 1 for d in dims)):
        raise KernelArgumentError(f"{what} must be a tuple of 3 positive Python ints; got {dims!r}")


class RawKernel:
    """One kernel of a `RawModule`; calling it runs the launch in the SIMT harness."""

    def __init__(self, code=None, name=None, options=(), *, _module: "RawModule | None" = None):
        self._raw_module = RawModule(code=code, options=options) if _module is None else _module
        self.name = name

    def __call__(self, grid, block, args, *, shared_mem=0, enable_cooperative_groups=False):
        _check_dims("grid", grid)
        _check_dims("block", block)
        if not isinstance(args, tuple):
            raise KernelArgumentError(f"args must be a tuple; got {type(args).__name__}")
        if shared_mem != 0 or enable_cooperative_groups:
            raise NotImplementedError("dynamic shared memory and cooperative groups are not emulated")
        _with_address_tables(args)  # check every argument before anything runs
        global kernel_launches
        kernel_launches += 1
        module = self._raw_module
        module._device.run(module._binary(), self.name, grid, block, args)


class RawModule:
    """``cupy.RawModule(code=..., options=...)`` for a shipped ``kernels/*.cu`` file.

    The harness #includes that file, so the code must be one of them, unchanged; the options
    must be ``-D`` definitions (they become g++ ``-D`` options of the harness build). Built
    lazily on the first `get_function`, on the `SimtDevice` current at construction.
    """

    def __init__(self, code=None, *, path=None, options=(), backend="nvrtc",
                 translate_cucomplex=False, enable_backends=False, name_expressions=None,
                 log_stream=None, jitify=False):
        if path is not None or code is None:
            raise NotImplementedError("the SIMT stand-in compiles source code only (code=...)")
        sources = {p.read_text(): p.name for p in sorted(harness.KERNEL_DIR.glob("*.cu"))}
        if code not in sources:
            raise ValueError("the SIMT harness runs the shipped kernels/*.cu files ("
                             + ", ".join(sources.values()) + "): the code must be one of them, "
                             "unchanged")
        self.source = sources[code]
        if not isinstance(options, (tuple, list)) or not all(isinstance(o, str) for o in options):
            raise TypeError(f"options must be a tuple of str; got {options!r}")
        self.options = tuple(options)
        self._device = current_device()
        self._path: Path | None = None

    def _binary(self) -> Path:
        if self._path is None:
            self._path = self._device.build(self.source, self.options)
        return self._path

    def get_function(self, name: str) -> RawKernel:
        self._binary()  # compile errors surface here, as with NVRTC
        return RawKernel(name=name, _module=self)


# ----------------------------------------------------------------------------- installation


def install() -> dict:
    """Register this module as ``cupy`` (with ``cupy.cuda`` and `simt.fake_nccl` as
    ``cupy.cuda.nccl``, and the stand-in ``cupyx``) in ``sys.modules``.

    Returns the entries it replaced, for `uninstall`. Call it before anything imports CuPy
    (diagnet's backend caches its probe: clear ``diagnet.backend._cupy_probe`` after).
    """
    from . import fake_cupyx

    this = sys.modules[__name__]
    modules = {"cupy": this, "cupy.cuda": cuda, "cupy.cuda.runtime": runtime,
               "cupy.cuda.nccl": fake_nccl, "cupy.random": random, **fake_cupyx.modules()}
    previous = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    return previous


def uninstall(previous: dict) -> None:
    """Undo `install` (``previous`` is what it returned)."""
    for name, module in previous.items():
        if module is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = module
