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

Dtype policy: floating tensors are float32 by default, float64 on request. A binary op
between two floating tensors of different dtypes raises `TypeError`; Python scalars, NumPy
arrays and integer/bool tensors mixed with a floating tensor take that tensor's dtype
(for tensors: in the element-wise ops, see ``Function.elementwise``).
"""

from __future__ import annotations

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

def sum_to(xp, grad, shape):
    """Sum ``grad`` over broadcast dimensions so that it has ``shape``.

    (``xp`` is not used: the array's own methods work for NumPy and CuPy alike.)
    """
    if grad.shape == tuple(shape):
        return grad
    lead = grad.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        i + lead for i, s in enumerate(shape) if s == 1 and grad.shape[i + lead] != 1
    )
    out = grad.sum(axis=axes, keepdims=True)
    if lead:
        out = out.reshape(out.shape[lead:])
    return out.reshape(shape)


#: dtypes a Tensor may hold: the two float types and NumPy's integer and bool types
#: (float16 and complex are not supported by the kernels or the dtype policy)
SUPPORTED_KINDS = "biuf"


def _canonical_dtype(dtype):
    if dtype is None:
        return None
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"dtype must be a NumPy dtype such as 'float32'; got {dtype!r}") from exc
    if dt.kind not in SUPPORTED_KINDS or (dt.kind == "f" and dt not in FLOAT_DTYPES):
        raise TypeError(f"dtype must be float32, float64, an integer or bool dtype; got {dt}")
    return dt


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
        arr = arr.astype(dtype, copy=False)
    elif arr.dtype.kind == "f" and arr.dtype not in FLOAT_DTYPES:
        arr = arr.astype(DEFAULT_DTYPE)  # float16 and friends are not supported
    elif arr.dtype.kind == "f" and (isinstance(data, (list, tuple)) or type(data) is float):
        # (``type is float``: a NumPy float64 scalar subclasses float but keeps its dtype,
        # like a NumPy array does)
        arr = arr.astype(DEFAULT_DTYPE)  # Python floats become float32, like torch.tensor
    return arr


# ----------------------------------------------------------------------------- Tensor

class Tensor:
    """An n-dimensional array on a device, with optional gradient tracking.

    Attributes:
        data: the backend array (``numpy.ndarray`` or ``cupy.ndarray``).
        grad: a `Tensor` of the same shape holding the accumulated gradient, or ``None``.
        requires_grad: whether backward computes a gradient for this tensor.
        creator: the `Function` that produced it (``None`` for leaves).
    """

    __array_priority__ = 200  # so that ndarray + Tensor calls Tensor.__radd__
    __slots__ = ("data", "grad", "requires_grad", "creator", "generation", "name",
                 "_output_index", "__weakref__")

    def __init__(self, data, dtype=None, device=None, requires_grad=False, name=None):
        arr = _as_backend_array(data, _canonical_dtype(dtype), device)
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

    @classmethod
    def _wrap(cls, array, requires_grad=False):
        """Wrap a backend array without copying or converting it."""
        t = cls.__new__(cls)
        t.data = array
        t.grad = None
        t.requires_grad = requires_grad
        t.creator = None
        t.generation = 0
        t.name = None
        t._output_index = 0
        return t

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
        """A new leaf tensor sharing this tensor's data, cut from the graph."""
        return Tensor._wrap(self.data)

    def to(self, device) -> "Tensor":
        """This tensor on ``device`` (``"cpu"`` or ``"cuda"``); differentiable."""
        from .ops import basic

        return basic.to_device(self, device)

    def cpu(self) -> "Tensor":
        return self.to("cpu")

    def cuda(self) -> "Tensor":
        return self.to("cuda")

    def astype(self, dtype) -> "Tensor":
        """This tensor cast to ``dtype``; differentiable between float dtypes."""
        from .ops import basic

        return basic.astype(self, dtype)

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

    def any(self, axis=None, keepdims=False) -> "Tensor":
        """Whether any element (along ``axis``) is non-zero; a bool tensor without gradient."""
        return Tensor._wrap(self.data.any(axis=axis, keepdims=keepdims))

    def all(self, axis=None, keepdims=False) -> "Tensor":
        """Whether every element (along ``axis``) is non-zero; a bool tensor without gradient."""
        return Tensor._wrap(self.data.all(axis=axis, keepdims=keepdims))

    # Element-wise ``==`` would make tensors unhashable; like PyTorch, hash by identity so
    # that tensors can be dict keys and set members (which then compare by identity first).
    __hash__ = object.__hash__

    # -- methods mirroring the functional API
    def sum(self, axis=None, keepdims=False): return _ops().sum(self, axis, keepdims)
    def mean(self, axis=None, keepdims=False): return _ops().mean(self, axis, keepdims)
    def max(self, axis=None, keepdims=False): return _ops().max(self, axis, keepdims)
    def min(self, axis=None, keepdims=False): return _ops().min(self, axis, keepdims)
    def var(self, axis=None, keepdims=False, ddof=0): return _ops().var(self, axis, keepdims, ddof)
    def argmax(self, axis=None, keepdims=False): return _ops().argmax(self, axis, keepdims)
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


def _ops():
    from . import ops

    return ops


# ----------------------------------------------------------------------------- Function

class Function:
    """Base class of every differentiable operation.

    Subclasses implement ``forward(*arrays) -> array | tuple[array, ...]`` on backend
    arrays and ``backward(*grad_outputs) -> array | tuple`` returning one gradient array
    (or ``None``) per input, and store in ``self`` only what backward needs (call
    ``self.save(...)`` or set attributes; both are dropped when the graph is freed).
    ``self.needs_input_grad`` tells backward which gradients are wanted. Backward must not
    modify its ``grad_outputs`` in place: the same array may be shared with other nodes.

    A subclass that sets ``elementwise = True`` (a broadcasting element-wise op such as
    add or where) gets two more checks here: its operands must broadcast together (else a
    `ValueError` naming the op and the shapes), and integer/bool tensor operands are cast
    to the dtype of its floating operand (the dtype policy in the module docstring).
    """

    elementwise = False

    def __call__(self, *inputs):
        if getattr(self, "_applied", False):
            # One instance is one node of the graph: applying it twice would overwrite the
            # first call's inputs and saved arrays, and corrupt that call's gradients.
            raise RuntimeError(f"this {type(self).__name__} instance was already applied; "
                               "create a new instance for every call")
        self._applied = True
        # (The engine runs once per op per step, so this path avoids what it can: no
        # wrapping of inputs that are Tensors already, no Tensor properties, one pass.)
        tensors = [x if isinstance(x, Tensor) else as_tensor_like(x, inputs) for x in inputs]
        if len(tensors) > 1:  # a single operand cannot mix dtypes or devices
            _check_float_dtypes(type(self).__name__, tensors)
            if self.elementwise:
                tensors = _check_elementwise(type(self).__name__, tensors)
        outputs = self.forward(*[t.data for t in tensors])
        single = not isinstance(outputs, tuple)
        if single:
            outputs = (outputs,)
        needs = tuple(t.requires_grad for t in tensors)
        record = any(needs) and is_grad_enabled()
        results = [Tensor._wrap(y, requires_grad=record) for y in outputs]
        if record:
            self.generation = generation = max(t.generation for t in tensors)
            self.inputs = tensors
            self.needs_input_grad = needs
            self.output_meta = [(y.shape, y.dtype) for y in outputs]
            self.outputs = [weakref.ref(r) for r in results]
            for i, r in enumerate(results):
                r.creator = self
                r.generation = generation + 1
                r._output_index = i
        else:
            self.release()
        return results[0] if single else tuple(results)

    def forward(self, *arrays):
        raise NotImplementedError

    def backward(self, *grad_outputs):
        raise NotImplementedError

    def save(self, *arrays):
        """Keep arrays for backward (read them back as ``self.saved``)."""
        self.saved = arrays

    def release(self):
        """Drop everything kept for backward (the graph is being freed)."""
        state = vars(self)
        kept = {key: state[key] for key in _KEPT_AFTER_RELEASE if key in state}
        state.clear()
        state.update(kept)
        self.freed = True


#: what a released `Function` keeps: enough to report "already applied" and "already freed"
_KEPT_AFTER_RELEASE = ("generation", "needs_input_grad", "output_meta", "_applied")


def _check_float_dtypes(op_name, tensors):
    floats = {t.data.dtype for t in tensors if t.data.dtype in FLOAT_DTYPES}
    if len(floats) > 1:
        got = ", ".join(str(t.dtype) for t in tensors)
        raise TypeError(f"{op_name}: operands have different float dtypes ({got}); "
                        "convert one with .astype() first")
    if "cupy" not in sys.modules:
        return  # every array is a NumPy array until CuPy is imported: one device
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"{op_name}: operands are on different devices ({sorted(devices)}); "
                         "move them with .to(device) first")


def _check_elementwise(op_name, tensors):
    """Broadcast check and integer-to-float promotion for element-wise ops (see `Function`)."""
    shapes = [t.shape for t in tensors]
    try:
        np.broadcast_shapes(*shapes)
    except ValueError:
        raise ValueError(f"{op_name}: operands could not be broadcast together; got shapes "
                         + " and ".join(str(s) for s in shapes)) from None
    floats = [t.dtype for t in tensors if t.dtype in FLOAT_DTYPES]
    if floats:  # exactly one float dtype here (_check_float_dtypes ran first)
        tensors = [t if t.dtype.kind not in "biu" else Tensor._wrap(t.data.astype(floats[0]))
                   for t in tensors]
    return tensors


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
        if getattr(fn, "freed", False):
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
        if any(g is None for g in grads_out):  # an output nobody used: zero gradient
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
                gx = sum_to(None, gx, xa.shape)
            if gx.dtype != xa.dtype:
                gx = gx.astype(xa.dtype)
            if x.creator is None:
                _accumulate(x, gx)
            else:
                push(x.creator, x._output_index, gx)
        if not retain_graph:
            fn.release()


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
