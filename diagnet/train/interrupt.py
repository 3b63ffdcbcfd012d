"""`DeferredInterrupt`: turn the first Ctrl-C into a request to stop at the next safe point.

A ``KeyboardInterrupt`` raised in the middle of ``optimizer.step()`` can leave half of the
parameters updated; a checkpoint of that state cannot be resumed exactly. While the trainer
runs, the first SIGINT therefore only sets `requested`; the trainer checks it between steps
and stops there with a consistent state. A second SIGINT raises ``KeyboardInterrupt`` at
once (the user insists), and the trainer saves what it can.

The handler is installed only in the main thread and only when SIGINT has Python's default
handler (a program that installed its own keeps it); the previous handler is restored on
exit.
"""

from __future__ import annotations

import signal
import threading

__all__ = ["DeferredInterrupt"]


class DeferredInterrupt:
    """Context manager; ``notify(message)`` is called when the first SIGINT arrives."""

    def __init__(self, notify=None):
        self.notify = notify
        self.requested = False
        self._previous = None

    def __enter__(self):
        self.requested = False
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.notify is not None:
            self.notify("Interrupted: stopping after the current step and saving a checkpoint "
                        "(press Ctrl-C again to stop at once).")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        return False
