"""`Tensor`: an n-dimensional array on a device, with optional gradient tracking.

The class holds the data and the graph links (``creator``, ``generation``), converts
array-likes on construction (`Tensor.__init__`; `Tensor.from_array` wraps an array as is),
and starts the backward walk of `engine`. It does not know any op: its arithmetic
operators and the methods that mirror the functional API (``t + u``, ``t[i]``,
``t.sum()``, ``t.reshape(...)``, ``t.to(...)``, ...) are installed on the class by
`diagnet.ops` when that package is imported (see `diagnet.ops.tensor_methods`), so this
module sits below the ops and imports none of them.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from .dtypes import (DEFAULT_DTYPE, FLOAT_DTYPES, SUPPORTED_KINDS, canonical_dtype,
                     check_integer_range)
from .engine import run_backward
from .shapes import axis_or_dim
from .version import VersionCounter


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

    The operators and the methods that call an op (``+``, ``@``, ``t[i]``, ``sum``,
    ``reshape``, ``to``, ``astype``, ``T``, the in-place ops, ...) are installed by
    `diagnet.ops` (`diagnet.ops.tensor_methods`), which every ``import diagnet`` imports.
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
        # wrapping another tensor's array (no copy was needed) shares its changes too
        shared = isinstance(data, Tensor) and arr is data.data
        self._init(arr, bool(requires_grad), data._version_counter() if shared else None, name)

    @classmethod
    def from_array(cls, array, requires_grad=False, version=None):
        """A tensor wrapping the backend ``array`` as is: no copy, no conversion, no check.

        For code that already holds a valid NumPy/CuPy array of a supported dtype (an op's
        result, an optimizer's state, a gradient); use `diagnet.tensor` or ``Tensor(data)``
        for anything else. The tensor shares the array's memory, like ``torch.from_numpy``.

        Args:
            array: a ``numpy.ndarray`` or ``cupy.ndarray`` (or NumPy scalar) of a dtype the
                tensor may hold (see `dtypes.SUPPORTED_KINDS`); float32/float64 when
                ``requires_grad``.
            requires_grad: a bool, whether backward computes a gradient for the tensor.
            version: the `VersionCounter` of the tensor whose array ``array`` views, so that
                an in-place change of one is seen through the other (default: none yet).

        Returns:
            a leaf `Tensor` (of class ``cls``) with no gradient and no name.
        """
        t = cls.__new__(cls)
        t._init(array, requires_grad, version)
        return t

    def _init(self, array, requires_grad, version, name=None):
        """Set every slot of a new tensor: the one initialiser behind `__init__`,
        `from_array` and `diagnet.nn.Parameter` (which check their arguments first; a
        subclass with slots of its own extends it)."""
        self.data = array
        self.grad = None
        self.requires_grad = requires_grad
        self.creator = None
        self.generation = 0
        self.name = name
        self._output_index = 0
        self._version = version

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
        return Tensor.from_array(self.data, version=self._version_counter())

    def cpu(self) -> "Tensor":
        return self.to("cpu")

    def cuda(self) -> "Tensor":
        return self.to("cuda")

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
        run_backward(self, g, retain_graph)

    def _accumulate_grad(self, g):
        """Add the gradient array ``g`` to ``grad`` (the engine's step at a leaf)."""
        if not self.requires_grad:
            return
        if self.grad is None:
            # copy: the same array may be handed to several leaves or reused by an op
            self.grad = Tensor.from_array(g.copy())
        else:
            self.grad = Tensor.from_array(self.grad.data + g)

    def __pos__(self):
        return self

    # Comparisons return boolean tensors without gradient.
    def _compare(self, other, op):
        o = other.data if isinstance(other, Tensor) else other
        return Tensor.from_array(op(self.data, o))

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
        return Tensor.from_array(self.data.any(axis=axis, keepdims=keepdims))

    def all(self, axis=None, keepdims=False, *, dim=None) -> "Tensor":
        """Whether every element (along ``axis``) is non-zero; a bool tensor without gradient."""
        axis = axis_or_dim("all", axis, dim)
        return Tensor.from_array(self.data.all(axis=axis, keepdims=keepdims))

    # Element-wise ``==`` would make tensors unhashable; like PyTorch, hash by identity so
    # that tensors can be dict keys and set members (which then compare by identity first).
    __hash__ = object.__hash__

    def numel(self): return self.size
