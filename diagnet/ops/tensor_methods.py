"""`Tensor`'s operators and op methods, installed on the class once, by `diagnet.ops`.

`diagnet.autograd` sits below the ops and imports none of them. The class gets its
arithmetic (``t + u``, ``t @ w``, ``-t``, ``t[i]``), its in-place operators (``t += u``,
``t[i] = v``, ``add_``, ...) and the methods that mirror the functional API (``t.sum()``,
``t.reshape(...)``, ``t.to(...)``, ``t.T``, ...) here instead: `install_tensor_methods`
sets every entry of the one table `TENSOR_METHODS` on `Tensor` when `diagnet.ops` is
imported, as DeZero's ``setup_variable`` and Chainer's ``install_variable_arithmetics`` do.

Where a method takes the op's arguments in the op's order, the op itself is installed
(``Tensor.__add__ is diagnet.ops.add``): an operator costs no call beyond the op's, and
``help(Tensor.__add__)`` shows the op's docstring. The few methods that reorder, rename or
fix an argument are the small functions below.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from ..autograd import Tensor, canonical_dtype
from . import activation, basic, inplace, reduce, shape

__all__ = ["TENSOR_METHODS", "install_tensor_methods"]


# ----------------------------------------------------------------------------- reflected operators

def _radd(self, other):
    """``other + self`` (see `basic.add`)."""
    return basic.add(other, self)


def _rsub(self, other):
    """``other - self`` (see `basic.sub`)."""
    return basic.sub(other, self)


def _rmul(self, other):
    """``other * self`` (see `basic.mul`)."""
    return basic.mul(other, self)


def _rtruediv(self, other):
    """``other / self`` (see `basic.div`)."""
    return basic.div(other, self)


def _rpow(self, base):
    """``base ** self`` (see `basic.pow`)."""
    return basic.pow(base, self)


def _rmatmul(self, other):
    """``other @ self`` (see `basic.matmul`)."""
    return basic.matmul(other, self)


# ----------------------------------------------------------------------------- in-place methods

def _add_(self, other, *, alpha=1):
    """``self += alpha * other`` in place; returns ``self`` (see `inplace.add_`)."""
    return inplace.add_(self, other, alpha=alpha)


def _sub_(self, other, *, alpha=1):
    """``self -= alpha * other`` in place; returns ``self`` (see `inplace.sub_`)."""
    return inplace.sub_(self, other, alpha=alpha)


def _zero_(self):
    """Set every element to zero in place; returns ``self`` (see `inplace.fill_`)."""
    return inplace.fill_(self, 0)


# ----------------------------------------------------------------------------- shape and conversion

def _flatten(self, start_dim=0):
    """The tensor with dimensions ``start_dim`` onwards merged into one (see `shape.reshape`)."""
    return shape.reshape(self, *self.shape[:start_dim], -1)


def _to(self, *args, device=None, dtype=None) -> Tensor:
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
    out = self if dtype is None else basic.astype(self, dtype)
    return out if device is None else basic.to_device(out, device)


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


# ----------------------------------------------------------------------------- the table

#: ``{name: function}`` set on `Tensor` by `install_tensor_methods`; ``self`` is the first
#: argument of each function
TENSOR_METHODS = {
    # arithmetic operators
    "__add__": basic.add, "__radd__": _radd,
    "__sub__": basic.sub, "__rsub__": _rsub,
    "__mul__": basic.mul, "__rmul__": _rmul,
    "__truediv__": basic.div, "__rtruediv__": _rtruediv,
    "__pow__": basic.pow, "__rpow__": _rpow,
    "__matmul__": basic.matmul, "__rmatmul__": _rmatmul,
    "__neg__": basic.neg, "__abs__": basic.abs,
    "__getitem__": shape.getitem,
    # in-place ops (not recorded; rules and checks in `inplace`)
    "__iadd__": inplace.add_, "__isub__": inplace.sub_,
    "__imul__": inplace.mul_, "__itruediv__": inplace.div_,
    "__setitem__": inplace.setitem,
    "add_": _add_, "sub_": _sub_, "mul_": inplace.mul_, "div_": inplace.div_,
    "fill_": inplace.fill_, "zero_": _zero_, "copy_": inplace.copy_,
    # reductions (``dim=`` is PyTorch's name for ``axis=``)
    "sum": reduce.sum, "mean": reduce.mean, "max": reduce.max, "min": reduce.min,
    "var": reduce.var, "argmax": reduce.argmax,
    # element-wise math
    "exp": basic.exp, "abs": basic.abs, "log": basic.log, "sqrt": basic.sqrt,
    "tanh": basic.tanh, "sigmoid": basic.sigmoid, "relu": activation.relu,
    "clip": basic.clip, "clone": basic.clone,
    # shape
    "reshape": shape.reshape, "squeeze": shape.squeeze, "unsqueeze": shape.unsqueeze,
    "transpose": shape.transpose, "permute": shape.permute, "flatten": _flatten,
    "T": property(shape.transpose, doc="The tensor with its dimensions reversed "
                                       "(see `shape.transpose`)."),
    # dtype and device
    "astype": basic.astype, "to": _to,
}


def install_tensor_methods() -> None:
    """Set every entry of `TENSOR_METHODS` on `Tensor` (and so on its subclasses, such as
    `diagnet.nn.Parameter`). Called once, when `diagnet.ops` is imported; calling it again
    changes nothing."""
    for name, method in TENSOR_METHODS.items():
        setattr(Tensor, name, method)
