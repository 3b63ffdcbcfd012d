"""The `Trainer`'s argument checks: each names the argument, what it must be and what it got.

Run before the Trainer keeps anything, so a refused construction changes nothing.
"""

from __future__ import annotations

from ..nn.module import Module

__all__ = ["check_arguments"]


def check_arguments(model, optimizer, train_loader, loss_fn, eval_fn, eval_loader,
                    scheduler_interval, best_metric, best_mode):
    """Refuse arguments the `Trainer` cannot run with; return ``best_mode`` resolved
    (``"auto"`` becomes ``"min"`` for a metric named after a loss, else ``"max"``).

    Raises:
        TypeError: a model that is not a `diagnet.nn.Module`, an optimizer or loader
            without the methods the loop calls, a ``loss_fn``/``eval_fn`` that is not
            callable, a ``best_metric`` that is not a str.
        ValueError: an unknown ``scheduler_interval`` or ``best_mode``, or an ``eval_``
            best metric without an eval loader or function.
    """
    if not isinstance(model, Module):
        raise TypeError(f"model must be a diagnet.nn.Module; got {type(model).__name__}")
    for name in ("step", "zero_grad", "state_dict", "load_state_dict"):
        if not callable(getattr(optimizer, name, None)):
            raise TypeError(f"optimizer must be a diagnet optimizer (no {name}() on a "
                            f"{type(optimizer).__name__})")
    for name in ("__len__", "__iter__", "set_epoch", "state_dict", "load_state_dict"):
        if not callable(getattr(train_loader, name, None)):
            raise TypeError(f"train_loader must be a diagnet.data.DataLoader (no {name} on a "
                            f"{type(train_loader).__name__})")
    for name, fn in (("loss_fn", loss_fn), ("eval_fn", eval_fn)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable; got {type(fn).__name__}")
    if scheduler_interval not in ("epoch", "step"):
        raise ValueError(f"scheduler_interval must be 'epoch' or 'step'; got "
                         f"{scheduler_interval!r}")
    if best_mode not in ("auto", "max", "min"):
        raise ValueError(f"best_mode must be 'auto', 'max' or 'min'; got {best_mode!r}")
    if best_metric is not None:
        if not isinstance(best_metric, str):
            raise TypeError(f"best_metric must be a str or None; got {best_metric!r}")
        if best_metric.startswith("eval_") and eval_loader is None and eval_fn is None:
            raise ValueError(f"best_metric={best_metric!r} needs an eval_loader or an eval_fn")
        if best_mode == "auto":
            best_mode = "min" if "loss" in best_metric else "max"
    return best_mode
