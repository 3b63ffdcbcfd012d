"""`diagnet.plots`: the offsets heatmap replays the log; the figures are written."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diagnet import optim, plots
from diagnet.data import ArrayDataset, DataLoader
from diagnet.dst import sparsify
from diagnet.models import MLP
from diagnet.train import Trainer


def _log(tmp_path, records):
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


RECORDS = [
    {"event": "run_start", "config": None,
     "controller": {"structure": {"a": {"offsets": [0, 2], "diagonals": 5},
                                  "b": {"offsets": [1], "diagonals": 3}}}},
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
    path = _log(tmp_path, [{"event": "run_start", "config": {}, "controller": None}]
                + RECORDS[2:3])
    assert plots.diagonal_activity(path) == {}
    assert plots.plot_diagonal_activity(path, tmp_path / "h.png") is None


def test_heatmap_from_a_trainer_log_alone(tmp_path):
    """The start comes from the controller (``run_start``), not from a config the caller
    writes: a run with no config plots its diagonals."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 12)).astype(np.float32)
    y = rng.integers(0, 4, 32)
    model = MLP(12, [16], 4, rng=0)
    controller = sparsify(model, "diag", method="set", sparsity=0.5, dense=("head",), rng=0,
                          delta_t=2, t_end=8, f0=0.5)
    start = controller.layers["features.0"].offsets.numpy().tolist()
    loader = DataLoader(ArrayDataset(x, y), batch_size=8, shuffle=True, seed=0)
    Trainer(model, optim.SGD(model.parameters(), lr=0.1), loader, controller=controller,
            epochs=2, out_dir=tmp_path, progress=False).fit()
    grids = plots.diagonal_activity(tmp_path / "log.jsonl")
    assert set(grids) == {"features.0"} and grids["features.0"].shape == (16, 3)
    grid = grids["features.0"]
    final = controller.layers["features.0"].offsets.numpy().tolist()
    assert final != start                                   # the mask updates moved some
    assert np.flatnonzero(grid[:, 0]).tolist() == start
    assert np.flatnonzero(grid[:, -1]).tolist() == final


def test_figures_are_written(tmp_path):
    pytest.importorskip("matplotlib")  # the test extra installs it, so CI draws them
    path = _log(tmp_path, RECORDS)
    for fn, name in ((plots.plot_learning_curves, "c.png"), (plots.plot_diagonal_activity,
                                                              "h.png")):
        out = fn(path, tmp_path / name)
        assert out == str(tmp_path / name) and (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no epoch records"):
        plots.plot_learning_curves(_log(tmp_path, RECORDS[:1]), tmp_path / "x.png")
