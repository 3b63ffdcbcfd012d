"""`RunLog`: the JSONL log of a training run, one JSON object per line, resumable.

Every line is written whole, with one ``write`` call, and flushed at once, so a crash loses
at most the line being written. The log counts the bytes it has written and keeps a running
SHA-256 of them: a checkpoint records both, and a resumed run truncates the file back to that
length (dropping whatever the interrupted run wrote after its checkpoint) after checking
that the bytes kept are the ones the checkpoint saw.

Values are made JSON-able by `jsonable`: NumPy scalars and small arrays become Python
numbers and lists, and non-finite floats become the strings ``"nan"``, ``"inf"`` and
``"-inf"`` (strict JSON has no NaN; many readers reject it).

The records a `diagnet.train.Trainer` writes, each with an ``"event"`` key: ``run_start``
(seed, config, diagnet version, model size, optimizer / scheduler / controller
hyperparameters and, for a sparsity controller, its starting ``structure``: each layer's
stored offsets and number of possible diagonals; loader settings), the controller's events as they come
(``controller.after_step`` / ``start_epoch``, written as the controller made them: step,
layer, dropped, grown, ...), one ``epoch`` record per epoch, an ``lr_schedule`` record where
a resumed run changes the learning rate schedule's length (``epoch``, ``step``,
``scheduler``, the length's key with ``[old, new]``, the ``lr`` now), and a last record:
``run_end``, ``interrupted``, ``stopped_nonfinite`` or ``error``. An ``epoch`` record has
``epoch`` (0-based), ``step`` (steps done), ``train_loss`` and ``train_accuracy`` (means
over the epoch's batches, weighted by batch size), ``eval_loss`` / ``eval_accuracy`` and
the ``eval_fn`` metrics, ``lr`` (the first parameter group's when the epoch ends, before
an epoch-interval scheduler steps), ``controller`` (its ``metrics()``), ``best`` (whether
``best_metric`` improved), ``checkpoints`` (the files written) and ``time_s``.
Wall-clock times are only under the keys of `TIME_KEYS` (``time``, ``time_s``).
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os

import numpy as np

from .. import backend
from ..autograd import Tensor

__all__ = ["RunLog", "jsonable", "read_log", "TIME_KEYS"]

#: keys of log records that hold wall-clock times; the only fields in which a resumed run's
#: log may differ from an uninterrupted run's
TIME_KEYS = frozenset({"time", "time_s"})


def jsonable(value, where="record"):
    """``value`` with every leaf turned into a plain JSON value (see the module docstring).

    Raises:
        TypeError: a leaf that is not a number, string, bool, None, array or tensor.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Tensor):
        value = value.data
    if backend.is_array(value):
        return jsonable(backend.to_numpy(value).tolist(), where)
    if isinstance(value, dict):
        return {str(k): jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"{where}: a {type(value).__name__} cannot be written to the JSON log")


class RunLog:
    """Append-only JSONL file with a byte count and a running checksum.

    Use `RunLog.create` for a new run (the file is emptied) or `RunLog.resume` to continue
    one; then `write` records and `close`. ``nbytes`` and `sha256` describe everything
    written so far (what a checkpoint records).
    """

    def __init__(self, path, file, nbytes, digest):
        self.path = os.fspath(path)
        self._file, self.nbytes, self._digest = file, nbytes, digest

    @classmethod
    def create(cls, path):
        """Start an empty log at ``path`` (an existing file is emptied)."""
        return cls(path, open(path, "wb"), 0, hashlib.sha256())

    @staticmethod
    def verify(path, nbytes, sha256):
        """Check that the first ``nbytes`` bytes of ``path`` have checksum ``sha256``; change
        nothing. Returns the running SHA-256 of those bytes (a ``hashlib`` object).

        Raises:
            FileNotFoundError: there is no log at ``path``.
            ValueError: the file is shorter than ``nbytes`` or its first bytes differ (it is
                not the log of the run the checkpoint came from).
        """
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"cannot resume the log: {path!r} does not exist (the "
                                    "checkpoint's run wrote its log there)")
        size = os.path.getsize(path)
        if size < nbytes:
            raise ValueError(f"cannot resume the log {path!r}: it has {size} bytes but had "
                             f"{nbytes} when the checkpoint was saved (not this run's log?)")
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            left = nbytes
            while left:
                chunk = f.read(min(left, 1 << 20))
                digest.update(chunk)
                left -= len(chunk)
        if digest.hexdigest() != sha256:
            raise ValueError(f"cannot resume the log {path!r}: its first {nbytes} bytes are not "
                             "those the checkpoint saw (not this run's log?)")
        return digest

    @classmethod
    def resume(cls, path, nbytes, sha256):
        """Reopen ``path``, check it (`verify`) and cut everything after its first ``nbytes``
        bytes.

        Raises:
            FileNotFoundError, ValueError: as `verify`; the file is not changed.
        """
        digest = cls.verify(path, nbytes, sha256)
        file = open(path, "r+b")
        file.truncate(nbytes)
        file.seek(nbytes)
        return cls(path, file, nbytes, digest)

    def sha256(self) -> str:
        """Hex SHA-256 of the bytes written so far."""
        return self._digest.hexdigest()

    def write(self, record: dict) -> None:
        """Append ``record`` (made JSON-able by `jsonable`) as one line, and flush."""
        line = json.dumps(jsonable(record), ensure_ascii=False, allow_nan=False) + "\n"
        data = line.encode("utf-8")
        self._file.write(data)
        self._file.flush()
        self.nbytes += len(data)
        self._digest.update(data)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def read_log(path, drop_time=False):
    """The records of a JSONL log, as a list of dicts.

    With ``drop_time``, the wall-clock fields (`TIME_KEYS`) are removed from every record:
    what remains is identical between a resumed run and an uninterrupted one.
    """
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    if drop_time:
        records = [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in records]
    return records
