"""The checks `Optimizer` runs before it changes anything.

`Optimizer.add_param_group` checks each parameter (`_check_param`: a float leaf `Tensor`).
Before it updates anything, ``step()`` checks every gradient and state array against its
parameter (device, shape, dtype: attribute comparisons, no array scans) and refuses the whole
step, naming the parameter, if one differs: NumPy would broadcast a ``(n,)`` gradient onto a
``(m, n)`` weight without a word, and a compiled loop handed a smaller array reads and writes
past its end. It also refuses a step count (``state[param]["step"]``) that is not an int in
``[0, 2**63)``. The step's checks are `StepGuards`, a base class of `Optimizer`; loading a
state dict (in ``optimizer.py``) uses `_is_step_count` and `_describe` too.
"""

from __future__ import annotations

from .. import backend, checks
from ..autograd import FLOAT_DTYPES, Tensor

#: the largest step count a state dict may hold: an int64 counter, small enough that the
#: bias corrections ``beta ** step`` stay ordinary floats
_MAX_STEP = 2 ** 63 - 1


def _is_step_count(value) -> bool:
    """Whether ``value`` is a step count: an int (not a bool) in ``[0, 2**63)``."""
    return checks.is_integer(value) and 0 <= value <= _MAX_STEP


def _describe(name, index, where=""):
    return f"parameter {name!r}" if name is not None else f"params[{index}]{where}"


def _check_param(param, label):
    if not isinstance(param, Tensor):
        raise TypeError(f"optimizers can only optimize Tensors, but {label} is a "
                        f"{type(param).__name__}")
    if param.dtype not in FLOAT_DTYPES:
        raise TypeError(f"optimizers need float32 or float64 parameters; {label} has dtype "
                        f"{param.dtype}")
    if not param.is_leaf:
        raise ValueError(f"can't optimize a non-leaf Tensor: {label} was computed by "
                         f"{type(param.creator).__name__}; pass the leaf tensor it came from")


def _mismatch(array, param_array) -> tuple:
    """``(kind, description)`` of the first way ``array`` differs from ``param_array``: kind
    ``"device"``, ``"shape"`` or ``"dtype"``; ``("", "")`` when it does not differ."""
    device, param_device = backend.device_of(array), backend.device_of(param_array)
    if device != param_device:
        return "device", f"is on {device}, but the parameter is on {param_device}"
    if array.shape != param_array.shape:
        return "shape", (f"has shape {tuple(array.shape)}, but the parameter has shape "
                         f"{tuple(param_array.shape)}")
    if array.dtype != param_array.dtype:
        return "dtype", f"has dtype {array.dtype}, but the parameter has dtype {param_array.dtype}"
    return "", ""


#: what to do when a parameter's data no longer matches its optimizer state, by mismatch
_STALE_STATE_REMEDIES = {
    "device": "move the model before making the optimizer, or move the state with "
              "optimizer.load_state_dict(optimizer.state_dict()), which copies it onto each "
              "parameter's device",
    "shape": "change a parameter's rows with Parameter.remap_rows (which moves the state "
             "along), or drop the stale state with `del optimizer.state[param]`, or make a "
             "new optimizer",
    "dtype": "drop the stale state with `del optimizer.state[param]`, or make a new optimizer",
}


class StepGuards:
    """The checks of `Optimizer.step`, a base class of `Optimizer`.

    They read the optimizer's ``param_groups``, ``state``, `state_arrays`, `state_scalars`,
    `state_required` and the names its parameters were given with (``_names``).
    """

    def _checked_updates(self) -> list:
        """``(group, params, grad arrays)`` for every group, listing the parameters that
        have a gradient (groups without any are left out).

        Every gradient and every state array is checked against its parameter first (device,
        shape, dtype), and every step count is checked to be an int in ``[0, 2**63)`` (one
        set by hand to -1, NaN or 1e308 would skew Adam's bias correction without a word),
        so that a refused step updates nothing and no update, compiled loop included, ever
        sees arrays that do not match. Attribute comparisons only: this runs at every step.

        Raises:
            TypeError: a gradient is not a Tensor.
            ValueError: a gradient or a state array differs from its parameter, or a step
                count is not an int in ``[0, 2**63)``.
        """
        updates = []
        for number, group in enumerate(self.param_groups):
            params, grads = [], []
            for index, param in enumerate(group["params"]):
                grad = param.grad
                if grad is None:
                    continue
                if not isinstance(grad, Tensor):
                    raise TypeError(f"the gradient of {self._label(param, number, index)} "
                                    f"must be a Tensor; got {type(grad).__name__}")
                data = param.data
                kind, shape, dtype = type(data), data.shape, data.dtype
                g = grad.data
                # the usual case in three comparisons; a differing array type (another
                # device, or an ndarray subclass) gets the full check
                if type(g) is not kind or g.shape != shape or g.dtype != dtype:
                    self._check_array(param, number, index, None, g)
                state = self.state.get(param)
                if state:
                    for key in self.state_arrays:
                        value = state.get(key)
                        if value is not None and (type(value) is not kind
                                                  or value.shape != shape
                                                  or value.dtype != dtype):
                            self._check_array(param, number, index, key, value)
                    for key in self.state_scalars:
                        count = state.get(key)
                        if type(count) is not int or not 0 <= count <= _MAX_STEP:
                            self._check_count(param, number, index, key, state)
                params.append(param)
                grads.append(g)
            if params:
                updates.append((group, params, grads))
        return updates

    def _check_array(self, param, number, index, key, array) -> None:
        """Raise a ValueError if ``array``, the gradient (``key`` None) or the state entry
        ``key`` of ``param``, differs from the parameter in device, shape or dtype."""
        kind, problem = _mismatch(array, param.data)
        if not kind:
            return
        label = self._label(param, number, index)
        if key is None:
            raise ValueError(f"the gradient of {label} {problem}")
        raise ValueError(f"optimizer state {key!r} of {label} {problem}: the parameter's data "
                         f"changed after the state was made; {_STALE_STATE_REMEDIES[kind]}")

    def _check_count(self, param, number, index, key, state) -> None:
        """Raise a ValueError unless the state entry ``key`` of ``param`` is a step count
        (or is absent and not required)."""
        if key not in state:
            if key not in self.state_required:
                return
            got = "no such entry"
        elif _is_step_count(state[key]):
            return
        else:
            got = f"{type(state[key]).__name__} {state[key]!r:.40}"
        raise ValueError(f"optimizer state {key!r} of {self._label(param, number, index)} must "
                         f"be an int in [0, 2**63) (a step count); got {got}")

    def _label(self, param, number, index) -> str:
        """``param`` as error messages name it: its name, else its place in its group."""
        return _describe(self._names[param], index, f" in param group {number}")
