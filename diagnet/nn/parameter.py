"""`Parameter`: a leaf tensor that a `Module` registers and an optimizer updates.

A parameter is a `Tensor` with ``requires_grad=True`` that remembers which optimizers hold
it. That link exists for one reason: dynamic sparse training changes *which rows* a
parameter has (the stored diagonals of a `DiagLinear`), and every optimizer that keeps
per-row state (momentum, Adam's moments) must move that state along with the rows.
`Parameter.remap_rows` does both in one call, so no caller can forget the second half.
The link is the protocol of `diagnet.row_state`: a `Parameter` is its `RowOwner`, an
optimizer its `RowStateHolder`.
"""

from __future__ import annotations

import weakref

from .. import backend
from ..autograd import FLOAT_DTYPES, Tensor
from ..row_state import RowOwner, RowStateHolder, remap_rows_array

__all__ = ["Parameter"]


class Parameter(Tensor, RowOwner):
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
        array = data.data if isinstance(data, Tensor) else data
        if not backend.is_array(array):
            array = Tensor(array).data  # converted as any tensor's data is
        if array.dtype not in FLOAT_DTYPES:
            raise TypeError(f"a Parameter must be float32 or float64; got dtype {array.dtype}")
        # made from a tensor, it wraps that tensor's array, so it shares its version too
        version = data._version_counter() if isinstance(data, Tensor) else None
        self._init(array, bool(requires_grad), version)

    def _init(self, array, requires_grad, version, name=None):
        """`Tensor._init`, and no optimizer holds the new parameter yet."""
        super()._init(array, requires_grad, version, name)
        self._optimizers = weakref.WeakSet()

    def __repr__(self):
        return "Parameter containing:\n" + Tensor.__repr__(self)

    # -- the optimizer link (`diagnet.row_state.RowOwner`)
    def add_optimizer(self, optimizer) -> None:
        """Register ``optimizer``, which holds this parameter (see `remap_rows`).

        Raises:
            TypeError: ``optimizer`` is not a `diagnet.row_state.RowStateHolder`.
        """
        if not isinstance(optimizer, RowStateHolder):
            raise TypeError(f"optimizer must be a RowStateHolder (an Optimizer); got "
                            f"{type(optimizer).__name__}")
        self._optimizers.add(optimizer)

    def optimizers(self) -> list:
        """The optimizers that hold this parameter now (a new list): each keeps per-row
        state that must follow changes to this parameter's rows."""
        return list(self._optimizers)

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
            self.grad = Tensor.from_array(remap_rows_array(self.grad.data, index))
        for opt in self.optimizers():
            opt.remap_rows(self, index)
