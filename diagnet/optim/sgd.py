"""`SGD`: stochastic gradient descent with momentum, as ``torch.optim.SGD``.

For each parameter ``p`` with gradient ``g``, per step (``lr``, momentum ``mu``, dampening
``tau``, weight decay ``wd``)::

    g = -g                           if maximize
    g = g + wd * p                   if wd != 0
    buf = g                          on the first step            (if mu != 0)
    buf = mu * buf + (1 - tau) * g   afterwards
    g = g + mu * buf                 if nesterov, else g = buf
    p = p - lr * g

State per parameter: ``momentum_buffer`` (shape and dtype of ``p``), only when ``mu != 0``.

On the CPU, all parameters of a group are updated by one compiled loop (`_foreach_loop`,
numba; see `diagnet.optim._foreach`), bit for bit as the NumPy code of `SGD._update`, which
stays the readable reference and the path for non-contiguous arrays. On the GPU, one kernel
launch per run of parameters does the same, bit for bit too (``kernels/optim.cu``, see
`diagnet.optim._foreach_cuda`).
"""

from __future__ import annotations

import functools

import numpy as np

from .. import backend, checks
from . import _foreach, _foreach_cuda
from .optimizer import Optimizer

__all__ = ["SGD"]


@functools.lru_cache(maxsize=None)
def _foreach_loop(maximize, decay, momentum, nesterov, first):
    """The compiled CPU loop over a group's parameters for these options (numba; compiled on
    first use, per dtype, and cached on disk).

    ``sgd(params, grads, buffers, scalars)``: tuples of `_foreach.CHUNK` flat arrays
    (``buffers`` is not used without ``momentum``) and the scalars ``(lr, wd, mu, c)`` (``c =
    1 - dampening``) in an array of the parameters' dtype. Element by element: ``g = -g``
    (``maximize``), ``g = g + wd*p`` (``decay``), then with ``momentum``: ``buf = g``
    (``first``: no buffer yet) or ``buf = mu*buf + c*g``, and ``g = g + mu*buf``
    (``nesterov``) or ``g = buf``; finally ``p -= lr*g``: the NumPy code's operations, in its
    order and precision (bit for bit; ``fastmath`` is off). The options are constants of the
    compiled code, as in `diagnet.optim.adam._foreach_loop` (and for the same reason).
    """
    import numba

    @numba.njit(cache=True, nogil=True, error_model="numpy")
    def sgd(params, grads, buffers, scalars):
        lr, wd, mu, c = scalars
        for k in range(len(params)):
            p, g, buf = params[k], grads[k], buffers[k]
            for i in range(p.shape[0]):
                gi = -g[i] if maximize else g[i]
                pi = p[i]
                if decay:
                    gi = gi + wd * pi
                if momentum:
                    bi = gi if first else buf[i] * mu + c * gi
                    buf[i] = bi
                    gi = gi + mu * bi if nesterov else bi
                p[i] = pi - lr * gi

    return sgd


class SGD(Optimizer):
    """Stochastic gradient descent, optionally with (Nesterov) momentum (``torch.optim.SGD``).

    Args:
        params: parameters or parameter groups (see `Optimizer`).
        lr: learning rate, ``>= 0``.
        momentum: momentum factor ``mu >= 0`` (0: plain SGD, no state).
        dampening: dampening ``tau`` of the momentum (not applied on the first step).
        weight_decay: L2 penalty ``wd >= 0`` added to the gradient.
        nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        maximize: ascend the objective instead of descending.

    Parameters keep their dtype (float32 stays float32); updates are in place.

    Raises:
        ValueError: a hyperparameter out of range, naming it and its value.
    """

    state_arrays = ("momentum_buffer",)

    def __init__(self, params, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, maximize=False):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
        super().__init__(params, defaults)

    def _check_group(self, group, where):
        group["lr"] = checks.non_negative("lr", group["lr"], where)
        group["momentum"] = checks.non_negative("momentum", group["momentum"], where)
        group["dampening"] = checks.real("dampening", group["dampening"], where)
        group["weight_decay"] = checks.non_negative("weight_decay", group["weight_decay"], where)
        group["nesterov"] = checks.flag("nesterov", group["nesterov"], where)
        group["maximize"] = checks.flag("maximize", group["maximize"], where)
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"invalid nesterov=True{where}: Nesterov momentum needs "
                             f"momentum > 0 and dampening == 0; got momentum="
                             f"{group['momentum']!r}, dampening={group['dampening']!r}")

    def _update(self, param, grad, state, group):
        momentum, weight_decay = group["momentum"], group["weight_decay"]
        g = -grad if group["maximize"] else grad
        if weight_decay != 0:
            g = g + weight_decay * param  # a new array: the gradient itself stays as it is
        if momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                # a copy (g may be the gradient's array), and an array where NumPy made the
                # g of a 0-d parameter a scalar (in-place updates of a scalar would be lost)
                buf = state["momentum_buffer"] = backend.get_array_module(param).array(g)
            else:
                buf *= momentum
                buf += (1.0 - group["dampening"]) * g
            g = g + momentum * buf if group["nesterov"] else buf
        param -= float(group["lr"]) * g

    def _update_group(self, params, grads, states, group):
        """`_update` for each parameter, in one compiled call per `_foreach.CHUNK` parameters
        (CPU) or one kernel launch (GPU) where the arrays allow it (C-contiguous; the dtype,
        and whether the momentum buffer exists yet, shared by a run of consecutive
        parameters), in `_update` otherwise."""
        momentum = group["momentum"] != 0

        def run_key(item):
            param, grad, state = item
            buf = state.get("momentum_buffer") if momentum else None
            arrays = (param, grad) if buf is None else (param, grad, buf)
            target = _foreach.target(*arrays)
            return None if target is None else (target, param.dtype, buf is None)

        for key, run in _foreach.runs(zip(params, grads, states), run_key):
            if key is None:
                self._update(*run[0], group)
            elif key[0] == "cuda":
                self._launch_update(run, *key[1:], group)
            else:
                self._foreach_update(run, *key[1:], group)

    @staticmethod
    def _scalars(group) -> tuple:
        """The Python floats ``(lr, wd, mu, c)`` of the compiled update (see `_foreach_loop`)."""
        return (float(group["lr"]), group["weight_decay"], group["momentum"],
                1.0 - group["dampening"])

    def _foreach_update(self, run, dtype, first, group):
        """One step of the parameters of ``run`` (``(param, grad, state)`` triples of
        compilable arrays of ``dtype``; ``first``: no momentum buffer exists yet) in the
        compiled loop."""
        momentum, weight_decay = group["momentum"], group["weight_decay"]
        params, grads, states = zip(*run)
        if momentum != 0 and first:
            for param, state in zip(params, states):
                state["momentum_buffer"] = np.zeros_like(param)
        buffers = [state["momentum_buffer"] for state in states] if momentum != 0 else grads
        scalars = np.array(self._scalars(group), dtype=dtype)
        loop = _foreach_loop(group["maximize"], weight_decay != 0, momentum != 0,
                             group["nesterov"], first)
        for chunk in zip(*(_foreach.chunks(a, dtype) for a in (params, grads, buffers))):
            loop(*chunk, scalars)

    def _launch_update(self, run, dtype, first, group):
        """One step of the parameters of ``run`` (``(param, grad, state)`` triples of
        launchable CuPy arrays of ``dtype``; ``first``: no momentum buffer exists yet) in one
        kernel launch; in `_update`, one at a time, where two of their arrays share memory."""
        momentum, weight_decay = group["momentum"], group["weight_decay"]
        params, grads, states = zip(*run)
        columns = [params, grads]
        if momentum != 0:
            xp = backend.get_array_module(params[0])
            buffers = ([xp.empty_like(param) for param in params] if first
                       else [state["momentum_buffer"] for state in states])
            columns.append(buffers)
        args = (group["maximize"], weight_decay != 0, momentum != 0, group["nesterov"],
                first) + self._scalars(group)
        if not _foreach_cuda.launch(_foreach_cuda.SGD, dtype, columns, args):
            for item in run:
                self._update(*item, group)
            return
        if momentum != 0 and first:  # the kernel wrote them: buf = g
            for state, buf in zip(states, buffers):
                state["momentum_buffer"] = buf
