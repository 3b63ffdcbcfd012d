"""Shape ops: reshape and its special cases (squeeze, unsqueeze), transpose/permute,
broadcast_to, indexing, concatenate, stack; and `numel`.

Each public function follows the `Function` class that implements it.
"""

from __future__ import annotations

import operator

import numpy as np

from .. import backend
from ..backend import get_array_module as _xp  # the array module (numpy/cupy) of arrays
from ..autograd import Function, Tensor, as_tensor_like, axis_or_dim, sum_to

__all__ = ["reshape", "squeeze", "unsqueeze", "transpose", "permute", "broadcast_to",
           "getitem", "concatenate", "stack", "numel"]


def _axes_arg(axes):
    """Accept ``f(1, 0)`` as well as ``f((1, 0))``."""
    if len(axes) == 1 and (axes[0] is None or isinstance(axes[0], (tuple, list))):
        return None if axes[0] is None else tuple(axes[0])
    return tuple(axes) if axes else None


def _dims_arg(name, dim, ndim):
    """``dim`` (an int or a tuple of ints, each in ``[-ndim, ndim)``) as non-negative ints."""
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    out = []
    for d in dims:
        try:
            d = operator.index(d)
        except TypeError:
            raise ValueError(f"{name}: dim {d!r} is not an integer") from None
        if not -ndim <= d < ndim:
            raise ValueError(f"{name}: dim {d} is out of range for {ndim} dims")
        out.append(d % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{name}: repeated dim in {dim!r}")
    return out


class Reshape(Function):
    # a view (when NumPy has to copy a non-contiguous input, sharing its version is cautious)
    is_view = True

    def __init__(self, shape):
        self.shape = shape

    def forward(self, x):
        self.in_shape = x.shape
        return x.reshape(self.shape)

    def backward(self, gy):
        return gy.reshape(self.in_shape)


def reshape(x, *shape):
    """``x`` with a new shape (one dimension may be -1); same number of elements."""
    shape = _axes_arg(shape)
    size = int(np.prod(x.shape))
    known = [s for s in shape if s != -1]
    if shape.count(-1) > 1 or any(s < -1 for s in shape) or \
            (shape.count(-1) == 0 and int(np.prod(shape)) != size) or \
            (shape.count(-1) == 1 and (int(np.prod(known)) == 0 or size % int(np.prod(known)))):
        raise ValueError(f"reshape: cannot reshape a tensor of shape {tuple(x.shape)} "
                         f"({size} elements) into shape {shape}")
    return Reshape(shape)(x)


def squeeze(x, dim=None):
    """``x`` without its size-1 dims: all of them (``dim=None``) or those in ``dim`` (an int
    or a tuple).

    A named dim whose size is not 1 is a `ValueError` (as in NumPy; PyTorch silently leaves
    it in place, which hides shape bugs).
    """
    shape = tuple(x.shape)
    if dim is None:
        dims = [i for i, d in enumerate(shape) if d == 1]
    else:
        dims = _dims_arg("squeeze", dim, len(shape))
        for d in dims:
            if shape[d] != 1:
                raise ValueError(f"squeeze: dim {d} of shape {shape} has size {shape[d]}, not 1")
    return Reshape(tuple(s for i, s in enumerate(shape) if i not in dims))(x)


def unsqueeze(x, dim):
    """``x`` with a new size-1 dim inserted at position ``dim`` of the result
    (``-x.ndim - 1 <= dim <= x.ndim``; ``-1`` appends it)."""
    shape = list(x.shape)
    (d,) = _dims_arg("unsqueeze", dim, len(shape) + 1)
    shape.insert(d, 1)
    return Reshape(tuple(shape))(x)


class Transpose(Function):
    is_view = True

    def __init__(self, axes):
        self.axes = axes

    def forward(self, x):
        return x.transpose(self.axes)

    def backward(self, gy):
        if self.axes is None:
            return gy.transpose()
        return gy.transpose(tuple(int(a) for a in np.argsort(self.axes)))  # the inverse permutation


def transpose(x, *axes):
    """Permute the dimensions of ``x`` (reverse them when no axes are given)."""
    axes = _axes_arg(axes)
    # range check first: modulo alone would accept (0, 5) for a 2-D tensor as (0, 1)
    if axes is not None and (any(not -x.ndim <= a < x.ndim for a in axes)
                             or sorted(a % x.ndim for a in axes) != list(range(x.ndim))):
        raise ValueError(f"transpose: axes {axes} are not a permutation of the "
                         f"{x.ndim} dimensions of shape {tuple(x.shape)}")
    if axes is not None:
        axes = tuple(a % x.ndim for a in axes)
    return Transpose(axes)(x)


permute = transpose


class BroadcastTo(Function):
    is_view = True  # a read-only view: in-place ops on it are refused

    def __init__(self, shape):
        self.shape = shape

    def forward(self, x):
        self.in_shape = x.shape
        return _xp(x).broadcast_to(x, self.shape)  # a view: no copy

    def backward(self, gy):
        return sum_to(gy, self.in_shape)


def broadcast_to(x, shape):
    """``x`` repeated (without copying) to ``shape`` by NumPy's broadcasting rules; the
    gradient is summed back over the repeated dims."""
    shape = (operator.index(shape),) if not isinstance(shape, (tuple, list)) else tuple(shape)
    src = tuple(x.shape)
    ok = len(shape) >= len(src) and all(
        s == d or s == 1 for s, d in zip(src[::-1], shape[::-1])) and all(d >= 0 for d in shape)
    if not ok:
        raise ValueError(f"broadcast_to: cannot broadcast a tensor of shape {src} to shape {shape}")
    return BroadcastTo(shape)(x)


class GetItem(Function):
    def __init__(self, index):
        self.index = index
        self.is_view = _is_basic_index(index)

    def forward(self, x):
        self.in_shape = x.shape
        return x[self.index]

    def backward(self, gy):
        gx = _xp(gy).zeros(self.in_shape, dtype=gy.dtype)
        if self.is_view:  # a basic index selects each element at most once: assign
            gx[self.index] = gy
        else:  # integer arrays may repeat an element (x[[0, 0]]): accumulate, slowly
            backend.scatter_add(gx, self.index, gy)
        return gx


def _is_basic_index(index) -> bool:
    """Whether NumPy indexes with ``index`` by basic indexing (ints, slices, None, Ellipsis),
    which returns a view; integer and boolean arrays return a copy."""
    parts = index if isinstance(index, tuple) else (index,)
    return all(p is None or p is Ellipsis or isinstance(p, slice)
               or (isinstance(p, (int, np.integer)) and not isinstance(p, (bool, np.bool_)))
               for p in parts)


def _unwrap_index(index):
    if isinstance(index, Tensor):
        return index.data
    if isinstance(index, tuple):
        return tuple(_unwrap_index(i) for i in index)
    if isinstance(index, list):
        return np.asarray(index)
    return index


def device_index(x, index):
    """``index`` with Tensors unwrapped and index arrays moved to the device of ``x``."""
    index = _unwrap_index(index)
    xp = _xp(x.data if isinstance(x, Tensor) else x)
    if xp is not np:  # integer arrays must live on the same device as x
        index = tuple(xp.asarray(i) if isinstance(i, np.ndarray) else i for i in index) \
            if isinstance(index, tuple) else (xp.asarray(index) if isinstance(index, np.ndarray)
                                              else index)
    return index


def getitem(x, index):
    """``x[index]`` for basic (ints, slices, None, Ellipsis) and integer/bool-array indexing.

    Repeated integer indices accumulate their gradients. Basic indexing gives a view that
    shares ``x``'s memory (and version), as in NumPy.
    """
    return GetItem(device_index(x, index))(x)


def _check_same_rank(name, xs, axis, same_axis):
    shapes = [tuple(x.shape) for x in xs]
    if not xs:
        raise ValueError(f"{name}: needs at least one tensor")
    nd = len(shapes[0])
    for s in shapes:
        if len(s) != nd:
            raise ValueError(f"{name}: all tensors must have the same number of dimensions; "
                             f"got shapes {shapes}")
        ax = axis % nd if nd else 0
        rest = [d for i, d in enumerate(s) if same_axis or i != ax]
        ref = [d for i, d in enumerate(shapes[0]) if same_axis or i != ax]
        if rest != ref:
            raise ValueError(f"{name}: shapes {shapes} differ outside axis {axis}")


def _check_axis(name, axis, ndim):
    # without this, concatenate failed with a bare "tuple index out of range"
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}: axis {axis} is out of range for a result with {ndim} dims")


class Concatenate(Function):
    def __init__(self, axis):
        self.axis = axis

    def forward(self, *xs):
        self.sizes = [x.shape[self.axis] for x in xs]
        return _xp(*xs).concatenate(xs, axis=self.axis)

    def backward(self, gy):
        xp = _xp(gy)
        cuts = np.cumsum(self.sizes)[:-1].tolist()
        return tuple(xp.split(gy, cuts, axis=self.axis))


def concatenate(xs, axis=None, *, dim=None):
    """Join tensors along an existing ``axis`` (or ``dim``; default 0); shapes must agree
    elsewhere."""
    axis = axis_or_dim("concatenate", axis, dim, default=0)
    xs = list(xs)
    tensors = [as_tensor_like(x, xs) for x in xs]
    _check_same_rank("concatenate", tensors, axis, same_axis=False)
    _check_axis("concatenate", axis, tensors[0].ndim)
    return Concatenate(axis)(*tensors)


class Stack(Function):
    def __init__(self, axis):
        self.axis = axis

    def forward(self, *xs):
        return _xp(*xs).stack(xs, axis=self.axis)

    def backward(self, gy):
        xp = _xp(gy)
        return tuple(xp.take(gy, i, axis=self.axis) for i in range(gy.shape[self.axis]))


def stack(xs, axis=None, *, dim=None):
    """Join tensors of equal shape along a new ``axis`` (or ``dim``; default 0)."""
    axis = axis_or_dim("stack", axis, dim, default=0)
    xs = list(xs)
    tensors = [as_tensor_like(x, xs) for x in xs]
    _check_same_rank("stack", tensors, 0, same_axis=True)
    _check_axis("stack", axis, tensors[0].ndim + 1)  # the new axis may come last
    return Stack(axis)(*tensors)


def numel(x) -> int:
    """The number of elements of ``x`` (a Python int; also ``Tensor.numel()``)."""
    return int(np.prod(tuple(x.shape), dtype=np.int64)) if hasattr(x, "shape") else int(np.size(x))
