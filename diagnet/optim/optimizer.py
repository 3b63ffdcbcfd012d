"""`Optimizer`: the base class of diagnet's optimizers, after ``torch.optim.Optimizer``.

An optimizer holds *parameter groups*: dicts with a ``"params"`` list and the
hyperparameters (``"lr"``, ...) for those parameters, defaults filled in. Schedulers and users
change a learning rate by assigning ``group["lr"]``. Per-parameter state (momentum buffers,
Adam's moments) lives in ``optimizer.state[param]``, created on the first step that sees a
gradient for ``param``; a `Tensor` hashes by identity, so tensors with equal values are
distinct keys.

``step()`` updates each parameter whose ``grad`` is not None **in place on its backend array**
(NumPy or CuPy, written once against ``xp``), outside autograd. Subclasses only write
``_init_state`` and ``_update`` for one parameter; on the CPU they may also update a whole
group in one compiled call (``_update_group``, see `diagnet.optim._foreach`), with the same
result bit for bit. Before it updates anything, ``step()`` checks every gradient, state
array and step count against its parameter and refuses the whole step, naming the
parameter, if one differs (`diagnet.optim.guards`).

State dicts follow PyTorch's layout, with parameters numbered in group order::

    {"state": {0: {"step": 3, "exp_avg": <array>, ...}, ...},
     "param_groups": [{"lr": 0.001, ..., "params": [0, 1, ...]}, ...],
     "param_names": ["fc.weight", ...]}        # only when names were given

Arrays are the live state arrays (a checkpoint copies them); every other value is a plain
Python int/float/bool/str/None/list, so it can be stored as JSON.

Dynamic sparse training changes which rows a `Parameter` has, or which of its entries are
active; the optimizer's state follows through `remap_rows`, `reset_rows` and `mask_state`
(`diagnet.optim.dst_state`).
"""

from __future__ import annotations

import numpy as np

from .. import backend, checks
from ..autograd import Tensor
from ..config import enable_grad, no_grad
from ..row_state import RowOwner
from .dst_state import RowStateMethods
from .guards import StepGuards, _check_param, _describe, _is_step_count

__all__ = ["Optimizer", "optimizer_params"]

#: group keys that schedulers add (``LRScheduler`` records the base lr as ``initial_lr``)
_SCHEDULER_KEYS = ("initial_lr",)


def _plain(value):
    """``value`` with tuples as lists and NumPy scalars as Python numbers (JSON-able)."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _copy_to_device_of(value, param_array):
    """A copy of the array ``value`` on the device of ``param_array``."""
    device = backend.device_of(param_array)
    if backend.device_of(value) == device:
        return value.copy()
    return backend.to_device(value, device)  # a transfer is already a copy


class Optimizer(StepGuards, RowStateMethods):
    """Base class of all optimizers (PyTorch's ``torch.optim.Optimizer``).

    Args:
        params: an iterable of float `Tensor`/`Parameter` leaves; or of ``(name, param)``
            pairs, as ``module.named_parameters()`` gives (the names go into the state dict);
            or of dicts, each a parameter group ``{"params": [...], "lr": ..., ...}`` whose
            missing hyperparameters come from ``defaults``.
        defaults: the default hyperparameters of a group.

    Attributes:
        param_groups: list of group dicts (``"params"`` and every hyperparameter).
        state: dict ``param -> dict`` of per-parameter state, created lazily on the first step.
        defaults: the default hyperparameters.

    Raises:
        TypeError: ``params`` is a single Tensor or a set, or holds a non-Tensor or a tensor
            that is not float32/float64.
        ValueError: ``params`` is empty, a parameter appears twice, or a tensor is not a leaf.

    Subclasses set `state_arrays`, `state_scalars` and `state_required` (the names of their
    state entries), implement `_init_state` and `_update` (and, for a compiled loop over a
    whole group, `_update_group`), and validate their hyperparameters in `_check_group`.
    """

    #: names of the per-parameter state entries that are arrays shaped like the parameter
    state_arrays: tuple = ()
    #: names of the per-parameter state entries that are step counts (Python ints >= 0)
    state_scalars: tuple = ()
    #: the entries every saved per-parameter state must have (checked by load_state_dict)
    state_required: tuple = ()

    def __init__(self, params, defaults):
        self.defaults = dict(defaults)
        self._check_group(self.defaults, "")
        self.param_groups = []
        self.state = {}
        self._names = {}  # every held parameter -> the name it was given with (or None)
        if isinstance(params, Tensor):
            raise TypeError("params must be an iterable of Tensors, (name, Tensor) pairs or "
                            "dicts; got a single Tensor (wrap it in a list)")
        if isinstance(params, dict):
            raise TypeError("params must be an iterable; to pass one parameter group, wrap "
                            "the dict in a list")
        if isinstance(params, (set, frozenset)):
            raise TypeError(f"params must be an ordered iterable (a list), not a "
                            f"{type(params).__name__}: the order numbers the parameters in "
                            "the state dict")
        entries = list(params)
        if not entries:
            raise ValueError("optimizer got an empty parameter list")
        is_group = [isinstance(e, dict) for e in entries]
        if any(is_group) and not all(is_group):
            raise TypeError("params must be all parameter groups (dicts) or no dicts at all")
        for group in entries if all(is_group) else [{"params": entries}]:
            self.add_param_group(group)

    # -- groups
    def add_param_group(self, param_group: dict) -> None:
        """Add a parameter group (a dict with ``"params"``; other keys override defaults).

        Used to add layers to an optimizer during training, as in PyTorch. Parameters may be
        given as ``(name, param)`` pairs. A parameter already held by this optimizer is an
        error (ValueError), so is a hyperparameter outside its valid range.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"a parameter group must be a dict; got {type(param_group).__name__}")
        number = len(self.param_groups)
        where = f" in param group {number}"
        if "params" not in param_group:
            raise ValueError(f"param group {number} has no 'params' entry")
        raw = param_group["params"]
        if isinstance(raw, Tensor):
            raw = [raw]
        elif isinstance(raw, (set, frozenset)):
            raise TypeError(f"the 'params' of param group {number} must be ordered (a list), "
                            "not a set: the order numbers the parameters in the state dict")
        else:
            raw = list(raw)
        if not raw:
            raise ValueError(f"param group {number} has an empty 'params' list")
        params, names, seen = [], [], set()
        for i, item in enumerate(raw):
            name = None
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                name, item = item
            label = _describe(name, i, where)
            _check_param(item, label)
            if item in self._names or id(item) in seen:
                raise ValueError(f"{label} appears in more than one place; every parameter "
                                 "may be given to an optimizer once")
            seen.add(id(item))
            params.append(item)
            names.append(name)
        group = {k: v for k, v in param_group.items() if k != "params"}
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        self._check_group(group, where)
        self.param_groups.append({"params": params, **group})
        for param, name in zip(params, names):
            self._names[param] = name
            if isinstance(param, RowOwner):  # a Parameter: plain tensors cannot change rows
                param.add_optimizer(self)

    def _check_group(self, group: dict, where: str) -> None:
        """Validate and normalise (to Python scalars) the hyperparameters of ``group`` in
        place; ``where`` (e.g. ``" in param group 1"``) goes into the error messages."""

    def _params(self):
        return optimizer_params(self)

    # -- the update
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of all parameters: to None (default), or to zeros in place."""
        for param in self._params():
            if set_to_none:
                param.grad = None
            elif param.grad is not None:
                param.grad.data[...] = 0

    def step(self, closure=None):
        """Update every parameter that has a gradient, in place, once.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss; it
                runs with gradient recording on, before the update.

        Returns:
            the closure's loss, or None.

        Raises:
            TypeError, ValueError: a gradient is not a Tensor, a gradient or a state array
                differs from its parameter in device, shape or dtype, or a step count is not
                an int in ``[0, 2**63)`` (the message names the parameter). Everything is
                checked first: a refused step updates nothing.
        """
        loss = None
        if closure is not None:
            with enable_grad():
                loss = closure()
        with no_grad():
            for group, params, grads in self._checked_updates():
                states = []
                for param in params:
                    state = self.state.get(param)
                    if state is None:
                        state = self.state[param] = self._init_state(param.data, group)
                    states.append(state)
                try:
                    self._update_group([param.data for param in params], grads, states, group)
                finally:
                    # a graph that saved the old value must not backward through the new one
                    for param in params:
                        param._version_counter().bump()
        return loss

    def _init_state(self, param, group) -> dict:
        """The initial state of one parameter (``param``: its backend array)."""
        return {}

    def _update(self, param, grad, state, group) -> None:
        """Update the backend array ``param`` in place from ``grad`` (same shape and dtype)."""
        raise NotImplementedError

    def _update_group(self, params, grads, states, group) -> None:
        """Update the parameters of one group that have gradients, in place, in order.

        ``params``, ``grads``: the parameters' and gradients' backend arrays, checked to match;
        ``states``: each parameter's state dict. This calls `_update` for each; an optimizer
        with a compiled loop over many parameters at once replaces it.
        """
        for param, grad, state in zip(params, grads, states):
            self._update(param, grad, state, group)

    # -- state dicts
    def state_dict(self) -> dict:
        """The optimizer's state, PyTorch's layout (see the module docstring).

        State arrays are the live arrays; all other values are plain Python (JSON-able).
        """
        index = {}
        groups = []
        for group in self.param_groups:
            packed = {k: _plain(v) for k, v in group.items() if k != "params"}
            packed["params"] = [index.setdefault(p, len(index)) for p in group["params"]]
            groups.append(packed)
        state = {}
        for param in self._params():
            if param in self.state:
                state[index[param]] = {k: v if backend.is_array(v) else _plain(v)
                                       for k, v in self.state[param].items()}
        result = {"state": state, "param_groups": groups}
        names = [self._names[p] for p in self._params()]
        if any(name is not None for name in names):
            result["param_names"] = names
        return result

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict from `state_dict` (same groups, same parameter shapes).

        Everything is checked first (see `check_state_dict`); on any mismatch a ValueError
        names it and the optimizer is left unchanged. Then the hyperparameters are taken over
        and the state arrays are copied onto each parameter's device (a NumPy array for a
        CuPy parameter is uploaded).
        """
        new_groups, new_state = self._checked_state_dict(state_dict)
        for group, loaded in zip(self.param_groups, new_groups):
            group.update(loaded)
        self.state.clear()
        self.state.update(
            (param, {k: _copy_to_device_of(v, param.data) if backend.is_array(v) else v
                     for k, v in entry.items()})
            for param, entry in new_state.items())

    def check_state_dict(self, state_dict: dict) -> None:
        """Check that `load_state_dict` would accept ``state_dict``, changing nothing.

        Checked: the keys, the number of groups and of parameters per group, the
        hyperparameters, the parameter names (where both sides have them), every state
        entry's name, every state array's shape and dtype against its parameter, and every
        step count (an int in ``[0, 2**63)``).

        Raises:
            ValueError: naming the first mismatch (TypeError: ``state_dict`` is no dict).
        """
        self._checked_state_dict(state_dict)

    def _checked_state_dict(self, state_dict):
        """The groups' new hyperparameters and the new state (arrays not yet copied)."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict; got {type(state_dict).__name__}")
        unknown = set(state_dict) - {"state", "param_groups", "param_names"}
        if unknown:
            raise ValueError(f"unknown keys in optimizer state dict: {sorted(map(str, unknown))}")
        missing = {"state", "param_groups"} - set(state_dict)
        if missing:
            raise ValueError(f"optimizer state dict is missing {sorted(missing)}")
        saved_groups = state_dict["param_groups"]
        if not isinstance(saved_groups, (list, tuple)) or len(saved_groups) != len(
                self.param_groups):
            count = len(saved_groups) if isinstance(saved_groups, (list, tuple)) else "no list of"
            raise ValueError(f"loaded state dict has {count} parameter groups, but the "
                             f"optimizer has {len(self.param_groups)}")
        new_groups, saved_ids = [], []
        for number, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            new_groups.append(self._loaded_group(number, group, saved))
            saved_ids.extend(saved["params"])
        params = self._params()
        if len(set(saved_ids)) != len(saved_ids):
            raise ValueError("loaded state dict numbers a parameter twice in its param_groups")
        by_id = dict(zip(saved_ids, params))
        names = self._check_loaded_names(state_dict.get("param_names"), params)
        return new_groups, self._loaded_state(state_dict["state"], by_id, names)

    def _loaded_group(self, number, group, saved) -> dict:
        """The hyperparameters of ``saved`` for ``group``, checked (ValueError otherwise)."""
        where = f" in loaded param group {number}"
        if not isinstance(saved, dict) or not isinstance(saved.get("params"), (list, tuple)):
            raise ValueError(f"param group {number} of the loaded state dict is not a dict "
                             "with a 'params' list")
        ids = saved["params"]
        if len(ids) != len(group["params"]):
            raise ValueError(f"param group {number}: loaded state dict has {len(ids)} "
                             f"parameters, the optimizer's group has {len(group['params'])}")
        if not all(checks.is_integer(i) for i in ids):
            raise ValueError(f"param group {number} of the loaded state dict: 'params' must "
                             f"be integer indices; got {ids!r:.80}")
        allowed = set(self.defaults) | set(group) | set(_SCHEDULER_KEYS)
        unknown = set(saved) - allowed
        if unknown:
            raise ValueError(f"unknown hyperparameters {sorted(unknown)}{where} for "
                             f"{type(self).__name__}")
        loaded = {k: v for k, v in group.items() if k != "params"}
        loaded.update((k, v) for k, v in saved.items() if k != "params")
        try:
            self._check_group(loaded, where)
        except TypeError as exc:
            raise ValueError(str(exc)) from None
        return loaded

    def _check_loaded_names(self, saved_names, params):
        names = [self._names[p] for p in params]
        if saved_names is None:
            return names
        if not isinstance(saved_names, (list, tuple)) or len(saved_names) != len(params):
            raise ValueError(f"loaded 'param_names' must be a list of {len(params)} names or "
                             f"None; got {saved_names!r:.80}")
        for index, (mine, theirs) in enumerate(zip(names, saved_names)):
            if mine is not None and theirs is not None and mine != theirs:
                raise ValueError(f"parameter {index} is named {mine!r} here but {theirs!r} in "
                                 "the loaded state dict")
        return names

    def _loaded_state(self, saved_state, by_id, names) -> dict:
        """The saved per-parameter state, checked, keyed by parameter in parameter order."""
        if not isinstance(saved_state, dict):
            raise ValueError(f"loaded 'state' must be a dict; got {type(saved_state).__name__}")
        index_of = {p: i for i, p in enumerate(self._params())}
        pending = {}
        for key, entry in saved_state.items():
            # JSON turns integer keys into strings
            index = int(key) if isinstance(key, str) and key.isdigit() else key
            if isinstance(index, bool) or index not in by_id:
                raise ValueError(f"loaded state entry {key!r} names no parameter of the "
                                 "loaded param groups")
            param = by_id[index]
            label = _describe(names[index_of[param]], index)
            if not isinstance(entry, dict):
                raise ValueError(f"loaded state of {label} must be a dict; got "
                                 f"{type(entry).__name__}")
            missing = [name for name in self.state_required if name not in entry]
            if missing:
                raise ValueError(f"loaded state of {label} lacks {missing}")
            pending[param] = {name: self._loaded_value(name, value, param, label)
                              for name, value in entry.items()}
        return dict(sorted(pending.items(), key=lambda item: index_of[item[0]]))

    def _loaded_value(self, name, value, param, label):
        if name in self.state_arrays:
            if not backend.is_array(value):
                raise ValueError(f"state {name!r} of {label} must be an array; got "
                                 f"{type(value).__name__}")
            if tuple(value.shape) != param.shape:
                raise ValueError(f"state {name!r} of {label} has shape {tuple(value.shape)}, "
                                 f"but the parameter has shape {param.shape}")
            if value.dtype != param.dtype:
                raise ValueError(f"state {name!r} of {label} has dtype {value.dtype}, but the "
                                 f"parameter has dtype {param.dtype}")
            return value
        if name in self.state_scalars:
            if not _is_step_count(value):
                raise ValueError(f"state {name!r} of {label} must be an int in [0, 2**63) "
                                 f"(a step count); got {type(value).__name__} {value!r:.40}")
            return int(value)
        known = sorted(self.state_arrays + self.state_scalars)
        raise ValueError(f"unknown state entry {name!r} for {label}; {type(self).__name__} "
                         f"keeps {known}")

    def __repr__(self):
        lines = [f"{type(self).__name__} ("]
        for number, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {number}")
            lines.extend(f"    {key}: {group[key]}" for key in sorted(group) if key != "params")
        return "\n".join(lines) + "\n)"


def optimizer_params(optimizer):
    """Every parameter of ``optimizer``'s groups, group by group, in order: a list of
    Tensors. Works with any object that has ``param_groups`` (a list of dicts with
    ``"params"``), a wrapper's included."""
    return [p for group in optimizer.param_groups for p in group["params"]]
