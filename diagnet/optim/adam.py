"""`Adam` and `AdamW`, as ``torch.optim.Adam`` and ``torch.optim.AdamW``.

For each parameter ``p`` with gradient ``g``, at step ``t = 1, 2, ...`` (``lr``,
``betas = (b1, b2)``, ``eps``, weight decay ``wd``)::

    g = -g                               if maximize
    g = g + wd * p                       Adam, if wd != 0 (L2 penalty in the gradient)
    p = p * (1 - lr * wd)                AdamW (decoupled weight decay)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    v_max = max(v_max, v);  v = v_max    if amsgrad
    denom = sqrt(v) / sqrt(1 - b2**t) + eps
    p = p - lr / (1 - b1**t) * m / denom

State per parameter: ``step`` (Python int ``t``), ``exp_avg`` (``m``), ``exp_avg_sq``
(``v``) and, with amsgrad, ``max_exp_avg_sq`` (``v_max``); the arrays have the shape and
dtype of ``p`` and start at zero.

On the CPU, all parameters of a group are updated by one compiled loop (`_foreach_loop`,
numba; see `diagnet.optim._foreach`) instead of about ten NumPy calls and their temporaries
per parameter: for the small parameters of a sparse model each NumPy call costs more in
overhead than in arithmetic, and so does a compiled call per parameter. The loop does the same
float operations in the same order and dtype as the NumPy code of `Adam._update` (bit-identical
results), which stays the readable reference and the path for non-contiguous arrays. On the
GPU, one kernel launch per run of parameters does the same (``kernels/optim.cu``, see
`diagnet.optim._foreach_cuda`), bit for bit too. Timings: ``docs/benchmarks.md``.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .. import backend, checks
from . import _foreach, _foreach_cuda
from .optimizer import Optimizer

__all__ = ["Adam", "AdamW"]


@functools.lru_cache(maxsize=None)
def _foreach_loop(maximize, coupled, amsgrad):
    """The compiled CPU loop over a group's parameters for these options (numba; compiled on
    first use, per dtype, and cached on disk).

    ``adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, scalars)``: tuples of
    `_foreach.CHUNK` flat arrays (parameter ``k`` of the call is entry ``k`` of each tuple;
    ``max_exp_avg_sqs`` is not read without ``amsgrad``) and the scalars ``(b1, c1, b2, c2,
    s2, eps, lr_t, wd, decay)`` in an array of the parameters' dtype. Element by element:
    ``g = -g`` (``maximize``), ``g = g + wd*p`` (``coupled``), ``p = p*decay``, ``m = b1*m +
    c1*g``, ``v = b2*v + c2*g*g``, (``amsgrad``: ``v_max = max(v_max, v)``, a NaN wins as in
    ``np.maximum``, and ``v_max`` replaces ``v`` below), ``p -= (m / (sqrt(v) / s2 + eps)) *
    lr_t``: the NumPy code's operations, in its order and precision (bit for bit; no fused
    multiply-add: ``fastmath`` is off). ``error_model="numpy"``: a division by zero gives
    inf/NaN as in NumPy, and the loop has no per-element check.

    The options are constants of the compiled code (numba freezes a closure's variables), so
    the branches not taken are compiled away and LLVM vectorises what remains: several times
    faster than one loop taking the options as run-time arguments (the figure is in
    ``docs/benchmarks.md``, "Measurements behind design choices").
    """
    import numba

    @numba.njit(cache=True, nogil=True, error_model="numpy")
    def adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, scalars):
        b1, c1, b2, c2, s2, eps, lr_t, wd, decay = scalars
        for k in range(len(params)):
            p, g, m, v, v_max = (params[k], grads[k], exp_avgs[k], exp_avg_sqs[k],
                                 max_exp_avg_sqs[k])
            for i in range(p.shape[0]):
                gi = -g[i] if maximize else g[i]
                pi = p[i]
                if coupled:
                    gi = gi + wd * pi
                pi = pi * decay
                mi = m[i] * b1 + c1 * gi
                vi = v[i] * b2 + c2 * gi * gi
                m[i] = mi
                v[i] = vi
                if amsgrad:
                    vm = v_max[i]
                    if vi > vm or vi != vi:
                        vm = vi
                    v_max[i] = vm
                    vi = vm
                p[i] = pi - (mi / (math.sqrt(vi) / s2 + eps)) * lr_t

    return adam


class Adam(Optimizer):
    """Adam (Kingma & Ba, 2015), optionally AMSGrad (``torch.optim.Adam``).

    Args:
        params: parameters or parameter groups (see `Optimizer`).
        lr: learning rate, ``>= 0``.
        betas: ``(b1, b2)``, each in ``[0, 1)``: decay rates of the moment estimates.
        eps: ``>= 0``, added to the denominator for numerical stability.
        weight_decay: L2 penalty ``>= 0`` added to the gradient.
        amsgrad: use the maximum of the past second moments (AMSGrad).
        maximize: ascend the objective instead of descending.

    Parameters keep their dtype (float32 stays float32); updates are in place.

    Raises:
        ValueError: a hyperparameter out of range, naming it and its value.
    """

    state_arrays = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    state_scalars = ("step",)
    state_required = ("step", "exp_avg", "exp_avg_sq")
    #: AdamW sets this: weight decay shrinks the parameter instead of entering the gradient
    decoupled_weight_decay = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, maximize=False):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize)
        super().__init__(params, defaults)

    def _check_group(self, group, where):
        group["lr"] = checks.non_negative("lr", group["lr"], where)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas{where} must be a pair (beta1, beta2); got {betas!r}")
        group["betas"] = (checks.unit_interval("betas[0]", betas[0], where, include_one=False),
                          checks.unit_interval("betas[1]", betas[1], where, include_one=False))
        group["eps"] = checks.non_negative("eps", group["eps"], where)
        group["weight_decay"] = checks.non_negative("weight_decay", group["weight_decay"], where)
        group["amsgrad"] = checks.flag("amsgrad", group["amsgrad"], where)
        group["maximize"] = checks.flag("maximize", group["maximize"], where)

    def _init_state(self, param, group):
        xp = backend.get_array_module(param)
        state = {"step": 0, "exp_avg": xp.zeros_like(param), "exp_avg_sq": xp.zeros_like(param)}
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = xp.zeros_like(param)
        return state

    def _update(self, param, grad, state, group):
        xp = backend.get_array_module(param)
        lr, weight_decay = float(group["lr"]), group["weight_decay"]
        beta1, beta2 = group["betas"]
        g = -grad if group["maximize"] else grad
        state["step"] += 1
        step = state["step"]
        if weight_decay != 0:
            if self.decoupled_weight_decay:
                param *= 1.0 - lr * weight_decay
            else:
                g = g + weight_decay * param  # a new array: the gradient stays as it is
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m *= beta1
        m += (1.0 - beta1) * g
        v *= beta2
        v += (1.0 - beta2) * g * g
        if group["amsgrad"]:
            v_max = _max_exp_avg_sq(state, param)
            xp.maximum(v_max, v, out=v_max)
            v = v_max
        denom = xp.sqrt(v)
        denom /= math.sqrt(1.0 - beta2 ** step)
        denom += group["eps"]
        update = m / denom  # not out=denom: for a 0-d parameter NumPy's sqrt gives a scalar
        update *= lr / (1.0 - beta1 ** step)
        param -= update

    def _update_group(self, params, grads, states, group):
        """`_update` for each parameter, in one compiled call per `_foreach.CHUNK` parameters
        (CPU) or one kernel launch (GPU) where the arrays allow it (C-contiguous; the step
        count and dtype shared by a run of consecutive parameters), in `_update` otherwise."""
        amsgrad = group["amsgrad"]

        def run_key(item):
            param, grad, state = item
            arrays = (param, grad, state["exp_avg"], state["exp_avg_sq"])
            if amsgrad:
                arrays += (_max_exp_avg_sq(state, param),)
            target = _foreach.target(*arrays)
            return None if target is None else (target, param.dtype, state["step"])

        for key, run in _foreach.runs(zip(params, grads, states), run_key):
            if key is None:
                self._update(*run[0], group)
            elif key[0] == "cuda":
                self._launch_update(run, *key[1:], group)
            else:
                self._foreach_update(run, *key[1:], group)

    def _scalars(self, step, group) -> tuple:
        """The Python floats ``(b1, c1, b2, c2, s2, eps, lr_t, wd, decay)`` of the compiled
        update at step ``step`` (see `_foreach_loop`), computed as `_update` computes them."""
        lr, weight_decay = float(group["lr"]), group["weight_decay"]
        beta1, beta2 = group["betas"]
        decay = 1.0 - lr * weight_decay if self.decoupled_weight_decay else 1.0
        return (beta1, 1.0 - beta1, beta2, 1.0 - beta2, math.sqrt(1.0 - beta2 ** step),
                group["eps"], lr / (1.0 - beta1 ** step), weight_decay, decay)

    def _foreach_update(self, run, dtype, step, group):
        """One step of the parameters of ``run`` (``(param, grad, state)`` triples of
        compilable arrays of ``dtype``, all at step count ``step``) in the compiled loop."""
        step += 1
        weight_decay = group["weight_decay"]
        coupled = weight_decay != 0 and not self.decoupled_weight_decay
        # the scalars in the arrays' dtype, rounded as NumPy rounds a Python float
        scalars = np.array(self._scalars(step, group), dtype=dtype)
        params, grads, states = zip(*run)
        exp_avg_sqs = [state["exp_avg_sq"] for state in states]
        arrays = (params, grads, [state["exp_avg"] for state in states], exp_avg_sqs,
                  [state["max_exp_avg_sq"] for state in states] if group["amsgrad"]
                  else exp_avg_sqs)
        loop = _foreach_loop(group["maximize"], coupled, group["amsgrad"])
        for chunk in zip(*(_foreach.chunks(a, dtype) for a in arrays)):
            loop(*chunk, scalars)
        for state in states:
            state["step"] = step

    def _launch_update(self, run, dtype, step, group):
        """One step of the parameters of ``run`` (``(param, grad, state)`` triples of
        launchable CuPy arrays of ``dtype``, all at step count ``step``) in one kernel
        launch; in `_update`, one at a time, where two of their arrays share memory."""
        params, grads, states = zip(*run)
        columns = [params, grads, [state["exp_avg"] for state in states],
                   [state["exp_avg_sq"] for state in states]]
        if group["amsgrad"]:
            columns.append([state["max_exp_avg_sq"] for state in states])
        if group["weight_decay"] == 0:
            mode = _foreach_cuda.WD_NONE
        else:
            mode = (_foreach_cuda.WD_DECOUPLED if self.decoupled_weight_decay
                    else _foreach_cuda.WD_L2)
        args = (group["maximize"], mode, group["amsgrad"]) + self._scalars(step + 1, group)
        if not _foreach_cuda.launch(_foreach_cuda.ADAM, dtype, columns, args):
            for item in run:
                self._update(*item, group)
            return
        for state in states:
            state["step"] = step + 1


def _max_exp_avg_sq(state, param):
    """The AMSGrad maximum of ``state``, made (zeros) if amsgrad was switched on after the
    state was made."""
    v_max = state.get("max_exp_avg_sq")
    if v_max is None:
        v_max = state["max_exp_avg_sq"] = backend.get_array_module(param).zeros_like(param)
    return v_max


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019; ``torch.optim.AdamW``).

    Same arguments as `Adam`, but ``weight_decay`` (default ``1e-2``) multiplies the
    parameter by ``1 - lr * weight_decay`` before the Adam update instead of adding
    ``weight_decay * p`` to the gradient.
    """

    decoupled_weight_decay = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, maximize=False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize)
