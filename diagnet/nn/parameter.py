"""`Parameter`: a leaf tensor that a `Module` registers and an optimizer updates.

A parameter is a `Tensor` with ``requires_grad=True`` that remembers which optimizers hold
it. That link exists for one reason: dynamic sparse training changes *which rows* a
parameter has (the stored diagonals of a `DiagLinear`), and every optimizer that keeps
per-row state (momentum, Adam's moments) must move that state along with the rows.
`Parameter.remap_rows` does both in one call, so no caller can forget the second half.
"""

from __future__ import annotations

import weakref

from .. import backend
from ..autograd import FLOAT_DTYPES, Tensor

__all__ = ["Parameter", "remap_rows_array"]


def remap_rows_array(old, index):
    """Rows of ``old`` picked by ``index``; rows where ``index < 0`` are zero.

    Args:
        old: backend array ``(K_old, ...)``.
        index: integer backend array ``(K_new,)`` on the same device: ``new[i] = old[index[i]]``
            where ``index[i] >= 0``, else zeros.

    Returns:
        a new array ``(K_new, ...)`` with ``old``'s dtype. Written with ``where`` rather than a
        boolean mask so that on the GPU it runs without a device-to-host synchronisation.
    """
    xp = backend.get_array_module(old)
    if old.shape[0] == 0:
        return xp.zeros((index.shape[0],) + tuple(old.shape[1:]), dtype=old.dtype)
    picked = old[xp.clip(index, 0, None)]
    keep = (index >= 0).reshape((-1,) + (1,) * (old.ndim - 1))
    return xp.where(keep, picked, xp.zeros((), dtype=old.dtype))


class Parameter(Tensor):
    """A trainable leaf tensor (``requires_grad=True``), registered by `Module.__setattr__`.

    Args:
        data: a Tensor, NumPy/CuPy array or array-like of floats; a Tensor's or array's data
            is used as is (not copied), like ``torch.nn.Parameter``.
        requires_grad: default True; False makes a frozen parameter (still saved in the
            state dict, skipped by optimizers).

    Raises:
        TypeError: ``data`` is not float32 or float64.
    """

    __slots__ = ("_optimizers",)

    def __init__(self, data, requires_grad=True):
        source = data
        if isinstance(data, Tensor):
            data = data.data
        if backend.is_array(data):
            self.data = data
        else:
            Tensor.__init__(self, data)
        if self.data.dtype not in FLOAT_DTYPES:
            raise TypeError(f"a Parameter must be float32 or float64; got dtype {self.data.dtype}")
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self.creator = None
        self.generation = 0
        self.name = None
        self._output_index = 0
        # made from a tensor, it wraps that tensor's array, so it shares its version too
        self._version = source._version_counter() if isinstance(source, Tensor) else None
        self._optimizers = weakref.WeakSet()

    def __repr__(self):
        return "Parameter containing:\n" + Tensor.__repr__(self)

    # -- the optimizer link
    def _attach(self, optimizer) -> None:
        """Called by an optimizer that holds this parameter (see `remap_rows`)."""
        self._optimizers.add(optimizer)

    def _detach(self, optimizer) -> None:
        self._optimizers.discard(optimizer)

    def remap_rows(self, index, new_rows=None) -> None:
        """Replace this parameter's rows, and move every holding optimizer's per-row state.

        Row ``i`` of the new data is row ``index[i]`` of the old data where ``index[i] >= 0``;
        where ``index[i] < 0`` it is the matching row of ``new_rows`` (or zero when
        ``new_rows`` is None). The gradient, if any, is remapped the same way (new rows get
        zero gradient), and each optimizer's per-row state through its ``remap_rows``: kept
        rows keep their moments, new rows start at zero.

        Args:
            index: integer array ``(K_new,)`` (NumPy, CuPy or sequence), moved to this
                parameter's device.
            new_rows: optional backend array ``(K_new, *data.shape[1:])`` giving the values of
                the new rows (rows where ``index >= 0`` are ignored).
        """
        xp = backend.get_array_module(self.data)
        index = xp.asarray(backend.unwrap(index), dtype=xp.int64).reshape(-1)
        data = remap_rows_array(self.data, index)
        if new_rows is not None:
            fresh = (index < 0).reshape((-1,) + (1,) * (data.ndim - 1))
            data = xp.where(fresh, xp.asarray(new_rows, dtype=data.dtype), data)
        self.data = data
        self._version_counter().bump()  # a graph that used the old rows must not use these
        if self.grad is not None:
            self.grad = Tensor._wrap(remap_rows_array(self.grad.data, index))
        for opt in list(self._optimizers):
            opt.remap_rows(self, index)
