"""Switches that change how operations behave, kept per thread.

After DeZero's ``Config`` and PyTorch's grad mode: whether operations are recorded for
backward is a property of the *thread* that runs them, so a data-loading thread that enters
`no_grad` does not switch recording off for the training thread. Each new thread starts with
the defaults (recording on).

The random generators live in `diagnet.random`; per-module train/eval state lives on the
modules themselves.
"""

from __future__ import annotations

import contextlib
import threading


class _ThreadState(threading.local):
    """Per-thread switches; ``threading.local`` re-runs ``__init__`` in every new thread."""

    def __init__(self):
        self.grad_enabled = True


_state = _ThreadState()


def is_grad_enabled() -> bool:
    """Whether operations in this thread are being recorded for backward."""
    return _state.grad_enabled


class _GradMode(contextlib.ContextDecorator):
    """Set grad mode for a ``with`` block (or a decorated function), then restore it."""

    def __init__(self, enabled: bool):
        self.enabled = bool(enabled)
        self._previous = []

    def __enter__(self):
        self._previous.append(_state.grad_enabled)
        _state.grad_enabled = self.enabled
        return self

    def __exit__(self, *exc):
        _state.grad_enabled = self._previous.pop()
        return False


def no_grad() -> _GradMode:
    """Context manager and decorator in which no graph is recorded (in this thread)."""
    return _GradMode(False)


def enable_grad() -> _GradMode:
    """Context manager and decorator that turns recording back on inside `no_grad`."""
    return _GradMode(True)


class set_grad_enabled(contextlib.ContextDecorator):  # noqa: N801 - PyTorch's name
    """Turn recording on or off in this thread, at once; as a ``with`` block, restore after.

    ``set_grad_enabled(False)`` switches recording off until switched back;
    ``with set_grad_enabled(flag):`` restores the previous mode at the end of the block.
    """

    def __init__(self, mode: bool):
        self.previous = _state.grad_enabled
        _state.grad_enabled = bool(mode)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _state.grad_enabled = self.previous
        return False
