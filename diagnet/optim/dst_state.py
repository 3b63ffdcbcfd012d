"""The optimizer state that dynamic sparse training changes, row by row or entry by entry.

Dynamic sparse training changes which rows a `Parameter` has; `Parameter.remap_rows` then
calls `Optimizer.remap_rows` on every optimizer holding it, which moves the per-row state with
the rows (kept rows keep their moments, new rows start at zero). Unstructured masks change
single entries instead; `Optimizer.mask_state` zeroes the per-element state of the entries
a mask change touched. These methods are the `diagnet.row_state.RowStateHolder` protocol;
`RowStateMethods` implements them for `Optimizer`, a subclass of it.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from ..row_state import RowStateHolder, remap_rows_array


class RowStateMethods(RowStateHolder):
    """The `RowStateHolder` methods of `Optimizer`, a base class of it.

    They read the optimizer's ``state`` and the parameters it holds (``_names``).
    """

    @staticmethod
    def _is_row_state(value, param) -> bool:
        return (backend.is_array(value) and value.ndim >= 1
                and tuple(value.shape[1:]) == param.shape[1:])

    def remap_rows(self, param, index) -> None:
        """Move ``param``'s per-row state after its rows changed (see `Parameter.remap_rows`).

        Every state array with ``param``'s trailing shape gets row ``i`` = old row
        ``index[i]``, or zeros where ``index[i] < 0``; scalar state (step counts) is kept.
        Runs on the device without a host synchronisation.

        Args:
            param: a parameter held by this optimizer, already holding its new rows.
            index: integer array ``(K_new,)`` with ``K_new == param.shape[0]``.
        """
        state = self.state.get(param)
        if not state:
            return
        xp = backend.get_array_module(param.data)
        index = xp.asarray(backend.unwrap(index), dtype=xp.int64).reshape(-1)
        if index.shape[0] != param.shape[0]:
            raise ValueError(f"remap_rows: index has {index.shape[0]} entries but the parameter "
                             f"has {param.shape[0]} rows")
        for key, value in state.items():
            if self._is_row_state(value, param):
                state[key] = remap_rows_array(value, index)

    def reset_rows(self, param, rows) -> None:
        """Zero the chosen rows of ``param``'s per-row state, in place (step counts kept).

        Args:
            param: a parameter held by this optimizer.
            rows: integer row indices (in range), or a boolean mask ``(param.shape[0],)``;
                a NumPy/CuPy array, Tensor or sequence. Runs without a host synchronisation.
        """
        if param not in self._names:
            raise ValueError("reset_rows: this optimizer does not hold the given parameter")
        state = self.state.get(param)
        if not state:
            return
        xp = backend.get_array_module(param.data)
        rows = xp.asarray(backend.unwrap(rows))
        is_mask = rows.dtype.kind == "b"
        if is_mask and tuple(rows.shape) != (param.shape[0],):
            raise ValueError(f"reset_rows: a boolean mask must have shape ({param.shape[0]},); "
                             f"got {tuple(rows.shape)}")
        if not is_mask and rows.dtype.kind not in "iu":
            raise TypeError(f"reset_rows: rows must be integer indices or a boolean mask; got "
                            f"dtype {rows.dtype}")
        for value in state.values():
            if not self._is_row_state(value, param):
                continue
            if is_mask:  # where, not value[mask] = 0: a boolean setitem may synchronise
                mask = rows.reshape((-1,) + (1,) * (value.ndim - 1))
                value[...] = xp.where(mask, xp.zeros((), dtype=value.dtype), value)
            else:
                value[rows] = 0

    def mask_state(self, param, keep) -> None:
        """Zero ``param``'s per-element state where ``keep`` is False, in place.

        Every state array with exactly ``param``'s shape (momentum buffer, Adam's moments)
        becomes ``value * keep``; scalar state (step counts) is untouched. Unstructured
        dynamic sparse training calls this through `MaskedLinear.set_mask`, so that pruned
        and newly grown weights start without stale momentum. Runs on the device without a
        host synchronisation (``where``, not a boolean setitem; a NaN in the state is
        zeroed too, which a product would keep).

        Args:
            param: a parameter held by this optimizer.
            keep: boolean array of ``param``'s shape (NumPy, CuPy, Tensor or nested
                sequence); moved to ``param``'s device if needed.

        Raises:
            ValueError: ``param`` is not held by this optimizer, or ``keep`` has the wrong
                shape. TypeError: ``keep`` is not boolean.
        """
        if param not in self._names:
            raise ValueError("mask_state: this optimizer does not hold the given parameter")
        keep = backend.unwrap(keep)
        if not backend.is_array(keep):
            keep = np.asarray(keep)
        if keep.dtype.kind != "b":
            raise TypeError(f"mask_state: keep must be a boolean array; got dtype {keep.dtype}")
        if tuple(keep.shape) != param.shape:
            raise ValueError(f"mask_state: keep must have the parameter's shape {param.shape}; "
                             f"got {tuple(keep.shape)}")
        state = self.state.get(param)
        if not state:
            return
        xp = backend.get_array_module(param.data)
        keep = backend.to_device(keep, backend.device_of(param.data))
        for value in state.values():
            if backend.is_array(value) and tuple(value.shape) == param.shape:
                value[...] = xp.where(keep, value, xp.zeros((), dtype=value.dtype))
