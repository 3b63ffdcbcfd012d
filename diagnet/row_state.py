"""State that follows a parameter's rows: the link between parameters and optimizers.

Dynamic sparse training changes *which rows* a parameter has (the stored diagonals of a
`DiagLinear`) or which of its entries are active (the mask of a `MaskedLinear`), and every
object that keeps state per row or per entry of that parameter (an optimizer's momentum,
Adam's moments) must follow. This module names the two sides of that link, below
`diagnet.nn` (where `Parameter` lives) and `diagnet.optim` (where `Optimizer` lives), so that
neither package imports the other:

* `RowStateHolder`, the state side (`Optimizer` is one): `remap_rows`, `reset_rows` and
  `mask_state` move, zero or mask its state of one parameter;
* `RowOwner`, the parameter side (`Parameter` is one): a holder registers itself with
  `RowOwner.add_optimizer`; `RowOwner.remap_rows` changes the rows and calls every holder's
  `remap_rows`, so no caller can forget the second half. Code that changes a mask or
  resets rows (the sparse layers) reaches the holders through `RowOwner.optimizers`.

`remap_rows_array` is the row operation both sides apply to their arrays.
"""

from __future__ import annotations

from . import backend

__all__ = ["remap_rows_array", "RowStateHolder", "RowOwner"]


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


class RowStateHolder:
    """Keeps state per row or per entry of some parameters, and follows their changes.

    Subclasses (`diagnet.optim.Optimizer`) implement the three methods; each takes a
    parameter the holder holds and runs on the parameter's device.
    """

    def remap_rows(self, param, index) -> None:
        """Move ``param``'s per-row state after its rows changed: row ``i`` becomes old row
        ``index[i]``, or zeros where ``index[i] < 0`` (``index``: integer ``(K_new,)``)."""
        raise NotImplementedError

    def reset_rows(self, param, rows) -> None:
        """Zero the chosen rows (indices or a boolean mask) of ``param``'s per-row state."""
        raise NotImplementedError

    def mask_state(self, param, keep) -> None:
        """Zero ``param``'s per-entry state where the boolean array ``keep`` is False."""
        raise NotImplementedError


class RowOwner:
    """A tensor whose rows can change, and which tells its `RowStateHolder`\\ s when they do.

    Subclasses (`diagnet.nn.Parameter`) implement the three methods. Holders are kept
    weakly: an optimizer that is dropped stops following the parameter.
    """

    __slots__ = ()

    def add_optimizer(self, optimizer: RowStateHolder) -> None:
        """Register ``optimizer``: `remap_rows` will move its state from now on."""
        raise NotImplementedError

    def optimizers(self) -> list:
        """The registered holders that are still alive, as a new list."""
        raise NotImplementedError

    def remap_rows(self, index, new_rows=None) -> None:
        """Replace the rows (row ``i`` = old row ``index[i]``, or a new row where
        ``index[i] < 0``) and call every holder's `RowStateHolder.remap_rows`."""
        raise NotImplementedError
