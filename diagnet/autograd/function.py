"""`Function`: the base class of every differentiable operation, and the node of the graph.

Calling a `Function` on tensors runs its ``forward`` on the raw backend arrays and, when a
gradient is wanted, records it as the ``creator`` of its outputs (`Function._record`);
`engine` later calls its ``backward``. The rules every op obeys on entry (one float dtype,
one device, broadcastable shapes, integer operands promoted) are checked here, once, so no
op repeats them (`_check_operands`, `as_tensor_like`).
"""

from __future__ import annotations

import functools
import sys
import weakref

import numpy as np

from .. import backend
from ..config import is_grad_enabled
from .dtypes import FLOAT_DTYPES
from .tensor_class import Tensor
from .version import VersionCounter


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
    to the dtype of its floating operand (the dtype policy in the `diagnet.autograd`
    package docstring).

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
            return Tensor.from_array(outputs, False, version)
        return tuple(Tensor.from_array(y, False, version) for y in outputs)

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
        t = Tensor.from_array(array, True, version)
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
    """Refuse operands of two float dtypes (the dtype policy of the package docstring)."""
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
    return tuple(t if t.data.dtype.kind not in "biu"
                 else Tensor.from_array(t.data.astype(floats[0])) for t in tensors)


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
    return Tensor.from_array(arr)

