"""`diagnet.plots`: the offsets heatmap replays the log; the figures are written."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diagnet import plots


def _log(tmp_path, records):
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


RECORDS = [
    {"event": "run_start", "config": {"initial_offsets": {"a": [0, 2], "b": [1]},
                                      "diagonals": {"a": 5, "b": 3}}},
    {"event": "swap", "step": 3, "layer": "a", "dropped": [2], "grown": [4]},
    {"event": "epoch", "epoch": 0, "train_loss": 1.0, "train_accuracy": 0.5,
     "eval_loss": 1.1, "eval_accuracy": 0.4},
    {"event": "mask_update", "step": 7, "layer": "b", "dropped": [1], "grown": [0]},
    {"event": "freeze", "step": 8, "layer": "a", "kept": [4]},
    {"event": "epoch", "epoch": 1, "train_loss": 0.5, "train_accuracy": 0.8,
     "eval_loss": 0.6, "eval_accuracy": 0.7},
]


def test_diagonal_activity_replays_the_structure_events(tmp_path):
    grids = plots.diagonal_activity(_log(tmp_path, RECORDS))
    assert set(grids) == {"a", "b"}
    a, b = grids["a"], grids["b"]
    assert a.shape == (5, 3) and b.shape == (3, 3)
    np.testing.assert_array_equal(np.flatnonzero(a[:, 0]), [0, 2])   # before training
    np.testing.assert_array_equal(np.flatnonzero(a[:, 1]), [0, 4])   # after the swap
    np.testing.assert_array_equal(np.flatnonzero(a[:, 2]), [4])      # frozen to the kept
    np.testing.assert_array_equal(np.flatnonzero(b[:, 1]), [1])
    np.testing.assert_array_equal(np.flatnonzero(b[:, 2]), [0])


def test_no_initial_offsets_means_no_heatmap(tmp_path):
    path = _log(tmp_path, [{"event": "run_start", "config": {}}] + RECORDS[2:3])
    assert plots.diagonal_activity(path) == {}
    assert plots.plot_diagonal_activity(path, tmp_path / "h.png") is None


def test_figures_are_written(tmp_path):
    pytest.importorskip("matplotlib")  # the test extra installs it, so CI draws them
    path = _log(tmp_path, RECORDS)
    for fn, name in ((plots.plot_learning_curves, "c.png"), (plots.plot_diagonal_activity,
                                                              "h.png")):
        out = fn(path, tmp_path / name)
        assert out == str(tmp_path / name) and (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no epoch records"):
        plots.plot_learning_curves(_log(tmp_path, RECORDS[:1]), tmp_path / "x.png")
