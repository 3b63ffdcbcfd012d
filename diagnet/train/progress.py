"""`ProgressBars`: the trainer's tqdm bars (one over epochs, one over the batches of an epoch).

The batch bar shows the epoch's running loss and accuracy and the controller's numbers
(sparsity, temperature, ...); the epoch bar shows the last epoch's metrics. With
``enabled=False`` every method does nothing and nothing is printed, for tests and CI.
"""

from __future__ import annotations

import time

from .. import checks

__all__ = ["ProgressBars"]

# Refreshing a postfix formats strings and may ask the controller for its numbers: do it at
# most this often (seconds), not on every step.
_POSTFIX_INTERVAL = 0.5


def _short(metrics):
    """``{"train_loss": 0.1234567, "eval_accuracy": 0.5}`` -> ``{"loss": "0.1235", "eval_acc":
    "0.5"}``: numbers only, 4 digits, short names."""
    out = {}
    for key, value in metrics.items():
        if not checks.is_real(value):
            continue
        key = key.replace("train_", "").replace("accuracy", "acc").replace("temperature", "temp")
        out[key] = f"{value:.4g}"
    return out


class ProgressBars:
    """Epoch and batch progress bars.

    Args:
        enabled: show bars (False: no output at all).
        epochs: total number of epochs; ``start_epoch``: epochs already done (resume).
    """

    def __init__(self, enabled, epochs, start_epoch=0):
        self.enabled = bool(enabled)
        self._epochs = self._batches = None
        self._last_postfix = 0.0
        if self.enabled:
            from tqdm.auto import tqdm

            self._tqdm = tqdm
            self._epochs = tqdm(total=epochs, initial=start_epoch, desc="epochs", unit="epoch",
                                position=0, dynamic_ncols=True)

    def start_epoch(self, epoch, batches, done=0):
        """Open the batch bar of ``epoch`` (``batches`` in all, ``done`` already trained)."""
        if not self.enabled:
            return
        self._close_batches()
        self._batches = self._tqdm(total=batches, initial=done, desc=f"epoch {epoch}",
                                   unit="batch", position=1, leave=False, dynamic_ncols=True)

    def step(self, stats, extra=None):
        """Advance the batch bar by one; every so often show ``stats`` and ``extra()``'s dict.

        ``extra`` is a callable, so the controller is only asked when the bar is refreshed.
        """
        if not self.enabled:
            return
        self._batches.update(1)
        now = time.monotonic()
        if now - self._last_postfix >= _POSTFIX_INTERVAL:
            self._last_postfix = now
            shown = dict(stats)
            if extra is not None:
                shown.update(extra())
            self._batches.set_postfix(_short(shown), refresh=False)

    def end_epoch(self, metrics):
        """Close the batch bar, advance the epoch bar and show the epoch's ``metrics``."""
        if not self.enabled:
            return
        self._close_batches()
        self._epochs.update(1)
        self._epochs.set_postfix(_short(metrics))

    def write(self, message):
        """Print ``message`` without breaking the bars (nothing when disabled)."""
        if self.enabled:
            self._tqdm.write(message)

    def _close_batches(self):
        if self._batches is not None:
            self._batches.close()
            self._batches = None

    def close(self):
        if not self.enabled:
            return
        self._close_batches()
        if self._epochs is not None:
            self._epochs.close()
            self._epochs = None
