"""The reverse-mode autograd engine: `Tensor`, `Function` and the backward walk.

Define-by-run, after DeZero and Chainer. Calling a `Function` on tensors runs its
``forward`` on the raw backend arrays and, when gradients are wanted, records the function
as the ``creator`` of its outputs. ``Tensor.backward`` then walks the recorded graph from a
max-heap of functions keyed on ``generation`` (a function runs only after every function
that consumed its outputs), so it is iterative and visits each node once.

Rules kept in this one place, so no op needs to repeat them:

* A gradient whose shape differs from its input's (because of broadcasting) is summed back
  to the input's shape (`sum_to`).
* Gradients of leaf tensors accumulate across backward calls until zeroed; intermediate
  gradients are freed as soon as they have been passed on.
* After backward the graph is freed (saved arrays and input links dropped) unless
  ``retain_graph=True``; walking a freed graph again is an error.
* Functions hold their outputs only through weak references, so an unused branch of a
  graph is collected like any other Python object.
* A node whose inputs or outputs were changed in place after it ran refuses to run its
  backward (`VersionCounter`), rather than compute a gradient from values that are gone.
* A call that nothing will differentiate (under `no_grad`, or no input requires grad)
  records nothing: inference pays for the arithmetic and the dispatch only.

Dtype policy: floating tensors are float32 by default, float64 on request. A binary op
between two floating tensors of different dtypes raises `TypeError`; Python scalars, NumPy
arrays and integer/bool tensors mixed with a floating tensor take that tensor's dtype
(for tensors: in the element-wise ops, see ``Function.elementwise``).
"""

from __future__ import annotations

import functools
import heapq
import itertools
import sys
import weakref

import numpy as np

from . import backend
from .config import is_grad_enabled

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
DEFAULT_DTYPE = np.dtype(np.float32)


# ----------------------------------------------------------------------------- helpers

def reduces_to(grad_shape, shape) -> bool:
    """Whether a gradient of ``grad_shape`` is a broadcast of ``shape``: it may have extra
    leading axes, and axes where ``shape`` has size 1 may be longer; every other axis agrees."""
    lead = len(grad_shape) - len(shape)
    return lead >= 0 and all(s == 1 or g == s for g, s in zip(grad_shape[lead:], shape))


def sum_to(xp, grad, shape):
    """Sum ``grad`` over broadcast dimensions so that it has ``shape``.

    ``grad.shape`` must broadcast-reduce to ``shape`` (see `reduces_to`); anything else is a
    `ValueError`, never a reshape that would scramble the gradient. (``xp`` is not used: the
    array's own methods work for NumPy and CuPy alike.)
    """
    shape = tuple(shape)
    if grad.shape == shape:
        return grad
    if not reduces_to(grad.shape, shape):
        raise ValueError(f"sum_to: a gradient of shape {grad.shape} cannot be summed to shape "
                         f"{shape} (only extra leading axes and size-1 axes are summed)")
    lead = grad.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        i + lead for i, s in enumerate(shape) if s == 1 and grad.shape[i + lead] != 1
    )
    out = grad.sum(axis=axes, keepdims=True)
    return out.reshape(shape)  # drops the summed leading axes (all of size 1 now)


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


def axis_or_dim(name, axis, dim, default=None):
    """The axis argument of op ``name``, given as ``axis=`` or as PyTorch's ``dim=``.

    ``default`` when neither is given; `TypeError` when both are.
    """
    if dim is None:
        return default if axis is None else axis
    if axis is not None:
        raise TypeError(f"{name}: got axis={axis!r} and dim={dim!r}; dim is another name for "
                        "axis, pass one of them")
    return dim


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


def _check_data(data):
    """Reject data that NumPy would turn into strings, objects or None arrays."""
    if data is None or isinstance(data, (str, bytes)):
        raise TypeError(f"tensor data must be numbers, nested sequences of numbers or an "
                        f"array; got {type(data).__name__} {data!r:.40}")


def _as_backend_array(data, dtype, device):
    """Turn ``data`` into an array of the requested device and dtype (copying as needed)."""
    if isinstance(data, Tensor):
        data = data.data
    _check_data(data)
    src_device = backend.device_of(data)
    if device is None:  # a CuPy array stays on the GPU; anything else goes to the default
        device = "cuda" if src_device == "cuda" else backend.default_device()
    device = backend.resolve_device(device)
    xp = backend.xp_for(device)
    if device == "cpu":
        arr = backend.to_numpy(data) if src_device == "cuda" else np.asarray(data)
    else:
        arr = xp.asarray(data)
    if arr.dtype.kind not in SUPPORTED_KINDS:
        raise TypeError(f"tensor data must be numeric; got {type(data).__name__} that converts "
                        f"to an array of dtype {arr.dtype}")
    if dtype is not None:
        if dtype.kind in "iu" and arr.dtype != dtype:  # no scan of data already in its dtype
            check_integer_range(arr, dtype)
        arr = arr.astype(dtype, copy=False)
    elif arr.dtype.kind == "f" and arr.dtype not in FLOAT_DTYPES:
        arr = arr.astype(DEFAULT_DTYPE)  # float16 and friends are not supported
    elif arr.dtype.kind == "f" and (isinstance(data, (list, tuple)) or type(data) is float):
        # (``type is float``: a NumPy float64 scalar subclasses float but keeps its dtype,
        # like a NumPy array does)
        arr = arr.astype(DEFAULT_DTYPE)  # Python floats become float32, like torch.tensor
    return arr


# ----------------------------------------------------------------------------- versions

class VersionCounter:
    """When the data of a tensor was last changed in place (shared by views of one array).

    Every in-place change (an in-place op, an optimizer step, a change of a layer's
    structure) calls `bump`, which advances the class-wide ``clock`` and stamps the counter
    with it. A `Function` notes the clock when it runs; at backward, an input or output
    whose stamp is later than that note was changed after the node saw it, and the node
    refuses to run (PyTorch's version counter, after which this is modelled).

    Keeping one clock for all tensors makes the common case one comparison per node: if the
    clock has not moved since the node ran, nothing anywhere was changed in place.

    Attributes:
        value: the clock reading of the last change, 0 if the data never changed in place.
        clock: (class attribute) the number of in-place changes made so far.
    """

    __slots__ = ("value",)
    clock = 0

    def __init__(self):
        self.value = 0

    def bump(self) -> None:
        """Record an in-place change of the data this counter belongs to."""
        VersionCounter.clock += 1
        self.value = VersionCounter.clock


# ----------------------------------------------------------------------------- Tensor

class Tensor:
    """An n-dimensional array on a device, with optional gradient tracking.

    Attributes:
        data: the backend array (``numpy.ndarray`` or ``cupy.ndarray``).
        grad: a `Tensor` of the same shape holding the accumulated gradient, or ``None``.
        requires_grad: whether backward computes a gradient for this tensor.
        creator: the `Function` that produced it (``None`` for leaves).

    In-place ops (``+=``, ``add_``, ``t[i] = v``, ...; see `diagnet.ops.inplace`) change
    ``data`` itself and stamp the tensor's `VersionCounter`, which it shares with the
    tensors that view the same array (``detach()``, reshapes, transposes, basic indexing).
    The counter is made on first use (`_version_counter`): most tensors never need one.
    """

    __array_priority__ = 200  # so that ndarray + Tensor calls Tensor.__radd__
    wraps_array = True  # `backend.unwrap` takes ``data`` from containers that say so
    __slots__ = ("data", "grad", "requires_grad", "creator", "generation", "name",
                 "_output_index", "_version", "__weakref__")

    def __init__(self, data, dtype=None, device=None, requires_grad=False, name=None):
        arr = _as_backend_array(data, canonical_dtype(dtype), device)
        if requires_grad and arr.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"requires_grad=True needs a float32 or float64 tensor; got dtype {arr.dtype}")
        self.data = arr
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self.creator = None
        self.generation = 0
        self.name = name
        self._output_index = 0
        # wrapping another tensor's array (no copy was needed) shares its changes too
        shared = isinstance(data, Tensor) and arr is data.data
        self._version = data._version_counter() if shared else None

    @classmethod
    def _wrap(cls, array, requires_grad=False, version=None):
        """Wrap a backend array without copying or converting it; ``version``: the
        `VersionCounter` of the tensor whose array this views (default: none yet)."""
        t = cls.__new__(cls)
        t.data = array
        t.grad = None
        t.requires_grad = requires_grad
        t.creator = None
        t.generation = 0
        t.name = None
        t._output_index = 0
        t._version = version
        return t

    def _version_counter(self) -> VersionCounter:
        """This tensor's `VersionCounter` (made on first use)."""
        if self._version is None:
            self._version = VersionCounter()
        return self._version

    # -- properties
    @property
    def shape(self):
        return tuple(self.data.shape)

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def size(self):
        return int(self.data.size)

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def device(self):
        return backend.device_of(self.data)

    @property
    def is_leaf(self):
        return self.creator is None

    @property
    def T(self):
        from .ops import shape as _shape

        return _shape.transpose(self)

    def __len__(self):
        if self.ndim == 0:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __bool__(self):
        # As NumPy: the truth value of one element is that element; of several, ambiguous.
        if self.size != 1:
            raise ValueError(f"the truth value of a tensor with {self.size} elements is "
                             "ambiguous; use .any() or .all()")
        return bool(self.item())

    def __float__(self):
        return float(self._one_element("float()"))

    def __int__(self):
        return int(self._one_element("int()"))

    def __index__(self):
        if self.dtype.kind not in "iu":
            raise TypeError(f"only integer tensors can be used as an index; got dtype {self.dtype}")
        return int(self._one_element("an index"))

    def _one_element(self, what):
        if self.size != 1:
            raise ValueError(f"{what} needs a tensor with one element; got shape {self.shape}")
        return self.item()

    def __repr__(self):
        body = np.array2string(self.numpy(), separator=", ", prefix="tensor(")
        extra = f", dtype={self.dtype}" + (", device='cuda'" if self.device == "cuda" else "")
        if self.requires_grad:
            extra += ", requires_grad=True"
        return f"tensor({body}{extra})"

    # -- conversion
    def numpy(self) -> np.ndarray:
        """A NumPy copy of the data, from any device."""
        return np.array(backend.to_numpy(self.data), copy=True)

    def item(self):
        """The value of a one-element tensor as a Python number."""
        if self.size != 1:
            raise ValueError(f"item() needs a tensor with one element; got shape {self.shape}")
        return self.data.reshape(()).item()

    def tolist(self):
        return self.numpy().tolist()

    def detach(self) -> "Tensor":
        """A new leaf tensor sharing this tensor's data (and its version), cut from the graph."""
        return Tensor._wrap(self.data, version=self._version_counter())

    def to(self, *args, device=None, dtype=None) -> "Tensor":
        """This tensor on another device and/or with another dtype; differentiable.

        ``to("cuda")``, ``to("float64")`` or ``to(np.float64)``, ``to("cpu", "float32")``,
        ``to(device=..., dtype=...)``. A single positional argument is a device when it
        names one (``"cpu"``, ``"cuda"``, ``"cuda:0"``), else a dtype. Returns ``self`` when
        nothing changes.
        """
        if len(args) > 2:
            raise TypeError(f"to: takes at most a device and a dtype; got {len(args)} "
                            "positional arguments")
        if len(args) == 2:
            given_device, given_dtype = args
        elif len(args) == 1 and _names_device(args[0]):
            given_device, given_dtype = args[0], None
        elif len(args) == 1:
            given_device, given_dtype = None, args[0]
            if isinstance(given_dtype, str) and not _names_dtype(given_dtype):
                raise ValueError(f"to: expected a device {backend.DEVICES} or a dtype (such as "
                                 f"'float32'); got {given_dtype!r}")
        else:
            given_device = given_dtype = None
        if given_device is not None and device is not None:
            raise TypeError(f"to: got the device twice ({given_device!r} and device={device!r})")
        if given_dtype is not None and dtype is not None:
            raise TypeError(f"to: got the dtype twice ({given_dtype!r} and dtype={dtype!r})")
        device = given_device if device is None else device
        dtype = canonical_dtype(given_dtype if dtype is None else dtype)
        from .ops import basic

        out = self if dtype is None else basic.astype(self, dtype)
        return out if device is None else basic.to_device(out, device)

    def cpu(self) -> "Tensor":
        return self.to("cpu")

    def cuda(self) -> "Tensor":
        return self.to("cuda")

    def astype(self, dtype) -> "Tensor":
        """This tensor cast to ``dtype``; differentiable between float dtypes.

        A cast to an integer dtype raises `ValueError` for values that do not fit it (see
        `check_integer_range`); floats are truncated toward zero.
        """
        from .ops import basic

        return basic.astype(self, dtype)

    # -- sharing memory with other libraries
    def __array__(self, dtype=None, copy=None):
        """The data as a NumPy array, for ``np.asarray(t)`` (NumPy's ``__array__`` protocol).

        Shares memory with a CPU tensor (unless ``copy=True`` or a ``dtype`` cast asks for a
        copy), except for a tensor that requires grad: like `numpy`, it gives a copy, so that
        NumPy code cannot change a value autograd depends on (``copy=False`` then raises
        `ValueError`, NumPy's signal that a copy was needed). A CUDA tensor raises
        `TypeError`: copy it with ``.numpy()`` or ``.to("cpu")`` explicitly.
        """
        if self.device != "cpu":
            raise TypeError("a tensor on cuda is not converted to a NumPy array implicitly; "
                            "call .numpy() (a host copy) or .to('cpu') first")
        if self.requires_grad and copy is False:
            raise ValueError("a tensor that requires grad shares no memory with NumPy (as "
                             ".numpy() gives a copy); use .detach() to share it, or allow a copy")
        arr = np.asarray(self.data)  # a 0-d array for a NumPy scalar
        if dtype is not None and np.dtype(dtype) != arr.dtype:
            if copy is False:
                raise ValueError(f"a cast from {arr.dtype} to {np.dtype(dtype)} needs a copy")
            return arr.astype(dtype)
        return arr.copy() if copy or self.requires_grad else arr

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        """Export the data through DLPack (``np.from_dlpack(t)``, ``torch.from_dlpack(t)``).

        Zero copy, with the rule of `__array__`: a tensor that requires grad exports a copy
        (``copy=False`` raises `BufferError`). The keywords are the DLPack protocol's and are
        passed on to the NumPy/CuPy array (those left at ``None`` are not passed, so that
        array libraries without them still work).
        """
        if self.requires_grad and copy is False:
            raise BufferError("a tensor that requires grad is exported as a copy; use "
                              ".detach() to share its memory")
        data = np.asarray(self.data) if isinstance(self.data, np.generic) else self.data
        if self.requires_grad or copy:
            data = data.copy()
        options = {"stream": stream, "max_version": max_version, "dl_device": dl_device}
        return data.__dlpack__(**{k: v for k, v in options.items() if v is not None})

    def __dlpack_device__(self):
        """``(device_type, device_id)`` of the data, as DLPack numbers them (1: CPU, 2: CUDA)."""
        data = np.asarray(self.data) if isinstance(self.data, np.generic) else self.data
        return data.__dlpack_device__()

    def float(self):
        return self.astype(np.float32)

    def double(self):
        return self.astype(np.float64)

    # -- gradients
    def zero_grad(self):
        """Forget the accumulated gradient."""
        self.grad = None

    def requires_grad_(self, flag=True) -> "Tensor":
        if flag and self.dtype not in FLOAT_DTYPES:
            raise TypeError(f"requires_grad needs a float tensor; got dtype {self.dtype}")
        self.requires_grad = bool(flag)
        return self

    def backward(self, grad=None, retain_graph=False):
        """Accumulate d(self)/d(leaf) into ``leaf.grad`` for every leaf that requires grad.

        Args:
            grad: the gradient flowing into this tensor (same shape); may be omitted for a
                one-element tensor, where it defaults to 1.
            retain_graph: keep the graph so that backward can be called through it again.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() called on a tensor that does not require grad "
                               "(no input had requires_grad=True, or it was made under no_grad)")
        xp = backend.get_array_module(self.data)
        if grad is None:
            if self.size != 1:
                raise RuntimeError(
                    f"backward() without grad needs a one-element output; got shape {self.shape}")
            g = xp.ones_like(self.data)
        else:
            g = grad.data if isinstance(grad, Tensor) else xp.asarray(grad)
            if g.shape != self.data.shape:
                raise ValueError(f"grad must have the output's shape {self.shape}; got {g.shape}")
            g = g.astype(self.dtype, copy=False)
        _run_backward(self, g, retain_graph)

    # -- operators (implemented in diagnet.ops; imported lazily to avoid a cycle)
    def __add__(self, other): return _ops().add(self, other)
    def __radd__(self, other): return _ops().add(other, self)
    def __sub__(self, other): return _ops().sub(self, other)
    def __rsub__(self, other): return _ops().sub(other, self)
    def __mul__(self, other): return _ops().mul(self, other)
    def __rmul__(self, other): return _ops().mul(other, self)
    def __truediv__(self, other): return _ops().div(self, other)
    def __rtruediv__(self, other): return _ops().div(other, self)
    def __neg__(self): return _ops().neg(self)
    def __pos__(self): return self
    def __pow__(self, exponent): return _ops().pow(self, exponent)
    def __rpow__(self, base): return _ops().pow(base, self)
    def __matmul__(self, other): return _ops().matmul(self, other)
    def __rmatmul__(self, other): return _ops().matmul(other, self)
    def __getitem__(self, index): return _ops().getitem(self, index)
    def __abs__(self): return _ops().abs(self)

    # -- in-place ops (not recorded; rules and checks in diagnet.ops.inplace)
    def __iadd__(self, other): return _ops().inplace.add_(self, other)
    def __isub__(self, other): return _ops().inplace.sub_(self, other)
    def __imul__(self, other): return _ops().inplace.mul_(self, other)
    def __itruediv__(self, other): return _ops().inplace.div_(self, other)
    def __setitem__(self, index, value): _ops().inplace.setitem(self, index, value)
    def add_(self, other, *, alpha=1): return _ops().inplace.add_(self, other, alpha=alpha)
    def sub_(self, other, *, alpha=1): return _ops().inplace.sub_(self, other, alpha=alpha)
    def mul_(self, other): return _ops().inplace.mul_(self, other)
    def div_(self, other): return _ops().inplace.div_(self, other)
    def fill_(self, value): return _ops().inplace.fill_(self, value)
    def zero_(self): return _ops().inplace.fill_(self, 0)
    def copy_(self, src): return _ops().inplace.copy_(self, src)

    # Comparisons return boolean tensors without gradient.
    def _compare(self, other, op):
        o = other.data if isinstance(other, Tensor) else other
        return Tensor._wrap(op(self.data, o))

    def __lt__(self, other): return self._compare(other, lambda a, b: a < b)
    def __le__(self, other): return self._compare(other, lambda a, b: a <= b)
    def __gt__(self, other): return self._compare(other, lambda a, b: a > b)
    def __ge__(self, other): return self._compare(other, lambda a, b: a >= b)
    def __eq__(self, other): return self._compare(other, lambda a, b: a == b)  # noqa: E704
    def __ne__(self, other): return self._compare(other, lambda a, b: a != b)  # noqa: E704
    def eq(self, other): return self.__eq__(other)

    def any(self, axis=None, keepdims=False, *, dim=None) -> "Tensor":
        """Whether any element (along ``axis``) is non-zero; a bool tensor without gradient."""
        axis = axis_or_dim("any", axis, dim)
        return Tensor._wrap(self.data.any(axis=axis, keepdims=keepdims))

    def all(self, axis=None, keepdims=False, *, dim=None) -> "Tensor":
        """Whether every element (along ``axis``) is non-zero; a bool tensor without gradient."""
        axis = axis_or_dim("all", axis, dim)
        return Tensor._wrap(self.data.all(axis=axis, keepdims=keepdims))

    # Element-wise ``==`` would make tensors unhashable; like PyTorch, hash by identity so
    # that tensors can be dict keys and set members (which then compare by identity first).
    __hash__ = object.__hash__

    # -- methods mirroring the functional API (``dim=`` is PyTorch's name for ``axis=``)
    def sum(self, axis=None, keepdims=False, *, dim=None):
        return _ops().sum(self, axis, keepdims, dim=dim)

    def mean(self, axis=None, keepdims=False, *, dim=None):
        return _ops().mean(self, axis, keepdims, dim=dim)

    def max(self, axis=None, keepdims=False, *, dim=None):
        return _ops().max(self, axis, keepdims, dim=dim)

    def min(self, axis=None, keepdims=False, *, dim=None):
        return _ops().min(self, axis, keepdims, dim=dim)

    def var(self, axis=None, keepdims=False, ddof=0, *, dim=None):
        return _ops().var(self, axis, keepdims, ddof, dim=dim)

    def argmax(self, axis=None, keepdims=False, *, dim=None):
        return _ops().argmax(self, axis, keepdims, dim=dim)

    def numel(self): return self.size
    def clone(self): return _ops().clone(self)
    def reshape(self, *shape): return _ops().reshape(self, *shape)
    def squeeze(self, dim=None): return _ops().squeeze(self, dim)
    def unsqueeze(self, dim): return _ops().unsqueeze(self, dim)
    def transpose(self, *axes): return _ops().transpose(self, *axes)
    def permute(self, *axes): return _ops().transpose(self, *axes)
    def exp(self): return _ops().exp(self)
    def abs(self): return _ops().abs(self)
    def log(self): return _ops().log(self)
    def sqrt(self): return _ops().sqrt(self)
    def tanh(self): return _ops().tanh(self)
    def sigmoid(self): return _ops().sigmoid(self)
    def relu(self): return _ops().relu(self)
    def clip(self, lo=None, hi=None): return _ops().clip(self, lo, hi)
    def flatten(self, start_dim=0):
        return _ops().reshape(self, *self.shape[:start_dim], -1)


def _names_device(arg) -> bool:
    """Whether ``arg`` is a device name (``"cpu"``, ``"cuda"``, ``"cuda:0"``, ...)."""
    try:
        backend.check_device(arg)
    except (TypeError, ValueError):
        return False
    return True


def _names_dtype(arg) -> bool:
    try:
        np.dtype(arg)
    except TypeError:
        return False
    return True


_ops_module = None


def _ops():
    """`diagnet.ops`, imported on first use (it imports this module), then kept: the
    operators of `Tensor` call this on every use."""
    global _ops_module
    if _ops_module is None:
        from . import ops

        _ops_module = ops
    return _ops_module


# ----------------------------------------------------------------------------- Function

class Function:
    """Base class of every differentiable operation.

    Subclasses implement ``forward(*arrays) -> array | tuple[array, ...]`` on backend
    arrays and ``backward(*grad_outputs) -> array | tuple`` returning one gradient array
    (or ``None``) per input, and store in ``self`` only what backward needs (call
    ``self.save(...)`` or set attributes; both are dropped when the graph is freed).
    ``self.needs_input_grad`` tells backward which gradients are wanted. Backward must not
    modify its ``grad_outputs`` in place: the same array may be shared with other nodes.

    A call is recorded only when grad mode is on and an input requires grad. Otherwise
    (inference, `no_grad`) it runs ``forward`` and wraps the results, nothing more: no graph
    links, no version counters but a view's, nothing to free.

    A subclass that sets ``elementwise = True`` (a broadcasting element-wise op such as
    add or where) gets two more checks here: its operands must broadcast together (else a
    `ValueError` naming the op and the shapes), and integer/bool tensor operands are cast
    to the dtype of its floating operand (the dtype policy in the module docstring).

    A subclass whose forward returns a view of its first input's array (a reshape, a
    transpose, basic indexing) sets ``is_view = True``: the output then shares the input's
    `VersionCounter`, so that changing either in place is seen through the other. The
    outputs of any other recorded node share one new counter. At backward, a node whose
    inputs or outputs were changed in place after it ran raises `RuntimeError` (all of them
    are checked, not only those its backward reads).
    """

    elementwise = False
    is_view = False
    _applied = False  # set on the instance by its one call
    freed = False  # set by `release`

    def __call__(self, *inputs):
        if self._applied:
            # One instance is one node of the graph: applying it twice would overwrite the
            # first call's inputs and saved arrays, and corrupt that call's gradients.
            raise RuntimeError(f"this {type(self).__name__} instance was already applied; "
                               "create a new instance for every call")
        self._applied = True
        # (The engine runs once per op per step, so this path avoids what it can: no
        # wrapping of inputs that are Tensors already, no Tensor properties, no throw-away
        # containers, and nothing recorded when no gradient is wanted.)
        tensors = inputs
        for x in inputs:
            if not isinstance(x, Tensor):
                tensors = tuple(as_tensor_like(a, inputs) for a in inputs)
                break
        if len(tensors) > 1:  # a single operand cannot mix dtypes or devices
            tensors = _check_operands(self, tensors)
        outputs = self.forward(*[t.data for t in tensors])
        record = False
        if is_grad_enabled():
            for t in tensors:
                if t.requires_grad:
                    record = True
                    break
        if record:
            return self._record(tensors, outputs)
        # Not recorded: the outputs are plain tensors, and this node is garbage once its
        # caller lets go of it. A view still shares its input's version (changing one in
        # place changes the other, recorded or not).
        version = tensors[0]._version_counter() if self.is_view else None
        if not isinstance(outputs, tuple):
            return Tensor._wrap(outputs, False, version)
        return tuple(Tensor._wrap(y, False, version) for y in outputs)

    def _record(self, tensors, outputs):
        """Make this node the creator of ``outputs`` (its forward's arrays); return them as
        tensors that require grad."""
        generation = 0
        needs = []
        for t in tensors:
            needs.append(t.requires_grad)
            if t.generation > generation:
                generation = t.generation
        self.generation = generation
        self.inputs = tensors
        self.needs_input_grad = tuple(needs)
        # the outputs of a view share its input's version; those of any other node share
        # one new counter, checked at backward
        version = tensors[0]._version_counter() if self.is_view else VersionCounter()
        self.output_version = version
        self.clock = VersionCounter.clock
        if not isinstance(outputs, tuple):
            self.output_meta = [(outputs.shape, outputs.dtype)]
            y = self._output(outputs, 0, version)
            self.outputs = [weakref.ref(y)]
            return y
        self.output_meta = [(y.shape, y.dtype) for y in outputs]
        results = tuple(self._output(y, i, version) for i, y in enumerate(outputs))
        self.outputs = [weakref.ref(r) for r in results]
        return results

    def _output(self, array, index, version):
        """The tensor for output ``index`` (``array``) of this recorded node."""
        t = Tensor._wrap(array, True, version)
        t.creator = self
        t.generation = self.generation + 1
        t._output_index = index
        return t

    def forward(self, *arrays):
        raise NotImplementedError

    def backward(self, *grad_outputs):
        raise NotImplementedError

    def save(self, *arrays):
        """Keep arrays for backward (read them back as ``self.saved``)."""
        self.saved = arrays

    def release(self):
        """Drop everything kept for backward (the graph is being freed); keep what the
        "already applied" and "already freed" errors need, and ``needs_input_grad``."""
        state = vars(self)
        # (a new dict, not a loop over the names to keep: this runs for every node)
        self.__dict__ = {"_applied": state.get("_applied", False), "freed": True,
                         "generation": state.get("generation", 0),
                         "needs_input_grad": state.get("needs_input_grad"),
                         "output_meta": state.get("output_meta")}


def _check_operands(fn, tensors):
    """The rules for an op of several operands (see `Function`): one float dtype, one
    device and, for an element-wise op, shapes that broadcast together and integer operands
    cast to the float dtype. Returns the operands to use (``tensors`` unless one was cast).

    The common case (operands of one dtype, on the CPU) costs one comparison per operand.
    """
    name = type(fn).__name__
    dtype = tensors[0].data.dtype
    uniform = True
    for t in tensors:
        if t.data.dtype != dtype:
            uniform = False
            break
    if not uniform:
        _check_float_dtypes(name, tensors)
    if "cupy" in sys.modules:  # every array is a NumPy array until CuPy is imported
        _check_devices(name, tensors)
    if fn.elementwise:
        shape = tensors[0].data.shape
        for t in tensors:
            if t.data.shape != shape:
                _check_broadcast(name, tuple(t.data.shape for t in tensors))
                break
        if not uniform:
            tensors = _promote_integers(tensors)
    return tensors


def _check_float_dtypes(op_name, tensors):
    """Refuse operands of two float dtypes (the dtype policy of the module docstring)."""
    floats = {t.data.dtype for t in tensors if t.data.dtype in FLOAT_DTYPES}
    if len(floats) > 1:
        got = ", ".join(str(t.dtype) for t in tensors)
        raise TypeError(f"{op_name}: operands have different float dtypes ({got}); "
                        "convert one with .astype() first")


def _check_devices(op_name, tensors):
    """Refuse operands on different devices."""
    kind = type(tensors[0].data)
    for t in tensors:
        if type(t.data) is not kind:
            break
    else:
        return  # arrays of one type are on one device
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"{op_name}: operands are on different devices ({sorted(devices)}); "
                         "move them with .to(device) first")


def _check_broadcast(op_name, shapes):
    """Refuse operand ``shapes`` that do not broadcast together."""
    if not _broadcastable(shapes):
        raise ValueError(f"{op_name}: operands could not be broadcast together; got shapes "
                         + " and ".join(str(s) for s in shapes))


@functools.lru_cache(maxsize=1024)
def _broadcastable(shapes) -> bool:
    """Whether the ``shapes`` (a tuple of shape tuples) broadcast together; cached, since a
    training loop meets the same few pairs of shapes on every step."""
    try:
        np.broadcast_shapes(*shapes)
    except ValueError:
        return False
    return True


def _promote_integers(tensors):
    """Integer/bool operands cast to the dtype of the floating operands (if any)."""
    floats = [t.data.dtype for t in tensors if t.data.dtype in FLOAT_DTYPES]
    if not floats:
        return tensors
    return tuple(t if t.data.dtype.kind not in "biu" else Tensor._wrap(t.data.astype(floats[0]))
                 for t in tensors)


def as_tensor_like(x, peers):
    """Wrap a non-Tensor operand as a constant tensor matching its peers' device and dtype.

    The reference peer is the first floating Tensor (else the first Tensor), so that in
    ``where(bool_tensor, 0.0, x)`` the scalar takes ``x``'s dtype, not the mask's.
    """
    if isinstance(x, Tensor):
        return x
    tensors = [p for p in peers if isinstance(p, Tensor)]
    ref = next((p for p in tensors if p.dtype in FLOAT_DTYPES), tensors[0] if tensors else None)
    if ref is None:
        return Tensor(x)
    xp = backend.get_array_module(ref.data)
    arr = xp.asarray(x.data if isinstance(x, Tensor) else x)
    if ref.dtype in FLOAT_DTYPES and (arr.dtype.kind in "biuf"):
        arr = arr.astype(ref.dtype, copy=False)
    return Tensor._wrap(arr)


def _run_backward(root, grad, retain_graph):
    """Propagate ``grad`` from ``root`` to all leaves (iteratively, in topological order)."""
    if root.creator is None:  # backward on a leaf: its gradient is the seed itself
        _accumulate(root, grad)
        return
    counter = itertools.count()
    pending = {}  # function -> list of gradient arrays for its outputs
    heap = []

    def push(fn, index, g):
        if fn.freed:
            raise RuntimeError("trying to backward through a graph that was already freed; "
                               "pass retain_graph=True to the first backward() call")
        slot = pending.get(fn)
        if slot is None:
            slot = pending[fn] = [None] * len(fn.output_meta)
            heapq.heappush(heap, (-fn.generation, next(counter), fn))
        slot[index] = g if slot[index] is None else slot[index] + g

    push(root.creator, root._output_index, grad)
    while heap:
        _, _, fn = heapq.heappop(heap)
        grads_out = pending.pop(fn)
        if fn.clock != VersionCounter.clock:  # something was changed in place since fn ran
            _check_versions(fn)
        if len(grads_out) > 1 and any(g is None for g in grads_out):
            # an output nobody used: zero gradient (a single output always has one)
            xp = backend.get_array_module(*[g for g in grads_out if g is not None])
            grads_out = [xp.zeros(shape, dtype) if g is None else g
                         for g, (shape, dtype) in zip(grads_out, fn.output_meta)]
        grads_in = fn.backward(*grads_out)
        if not isinstance(grads_in, tuple):
            grads_in = (grads_in,)
        if len(grads_in) != len(fn.inputs):
            raise RuntimeError(f"{type(fn).__name__}.backward returned {len(grads_in)} "
                               f"gradients for {len(fn.inputs)} inputs")
        for x, gx in zip(fn.inputs, grads_in):
            if gx is None or not x.requires_grad:
                continue
            xa = x.data
            if gx.shape != xa.shape:
                if not reduces_to(gx.shape, xa.shape):
                    _bad_gradient_shape(fn, grads_in, gx)
                gx = sum_to(None, gx, xa.shape)
            if gx.dtype != xa.dtype:
                gx = gx.astype(xa.dtype)
            if x.creator is None:
                _accumulate(x, gx)
            else:
                push(x.creator, x._output_index, gx)
        if not retain_graph:
            fn.release()


def _bad_gradient_shape(fn, grads_in, gx):
    """Raise for the gradient ``gx`` (one of ``grads_in``) that does not fit its input."""
    i = next(i for i, g in enumerate(grads_in) if g is gx)
    raise RuntimeError(
        f"{type(fn).__name__}.backward returned a gradient of shape {gx.shape} for input {i} "
        f"of shape {fn.inputs[i].shape}; a gradient must have its input's shape, or a "
        "broadcast of it (extra leading axes, longer size-1 axes)")


def _check_versions(fn):
    """Raise if an input or output of ``fn`` was changed in place after ``fn`` ran."""
    changed = [f"input {i} (shape {x.shape})" for i, x in enumerate(fn.inputs)
               if x._version is not None and x._version.value > fn.clock]
    if fn.output_version.value > fn.clock and not fn.is_view:
        changed.append("its output")
    if changed:
        name = type(fn).__name__
        raise RuntimeError(
            f"{name}: {' and '.join(changed)} changed in place after {name} ran, and its "
            "backward may need the old values; change tensors in place only after backward() "
            "(as an optimizer step does), or use an out-of-place op or clone()")


def _accumulate(leaf, g):
    if not leaf.requires_grad:
        return
    if leaf.grad is None:
        # copy: the same array may be handed to several leaves or reused by an op
        leaf.grad = Tensor._wrap(g.copy())
    else:
        leaf.grad = Tensor._wrap(leaf.grad.data + g)


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
    return Tensor._wrap(arr)
