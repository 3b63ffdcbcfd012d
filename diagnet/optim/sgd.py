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
"""

from __future__ import annotations

from . import _checks
from .optimizer import Optimizer

__all__ = ["SGD"]


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
        group["lr"] = _checks.non_negative("lr", group["lr"], where)
        group["momentum"] = _checks.non_negative("momentum", group["momentum"], where)
        group["dampening"] = _checks.real("dampening", group["dampening"], where)
        group["weight_decay"] = _checks.non_negative("weight_decay", group["weight_decay"], where)
        group["nesterov"] = _checks.flag("nesterov", group["nesterov"], where)
        group["maximize"] = _checks.flag("maximize", group["maximize"], where)
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
                buf = state["momentum_buffer"] = g.copy()  # g may be the gradient's array
            else:
                buf *= momentum
                buf += (1.0 - group["dampening"]) * g
            g = g + momentum * buf if group["nesterov"] else buf
        param -= float(group["lr"]) * g
