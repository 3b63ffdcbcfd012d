"""Plots of a training run, drawn from its JSONL log alone (matplotlib, an optional extra).

Both figures read nothing but ``log.jsonl`` (`diagnet.train`), so a resumed run, or a run
copied from another machine, plots the same:

* `plot_learning_curves`: training and evaluation loss and accuracy per epoch;
* `plot_diagonal_activity`: for each diagonal layer, which diagonal offsets are stored at the
  end of each epoch, as a heatmap (offsets down, epochs across). The first state is the
  controller's structure in the ``run_start`` record; every later one replays the
  controller's structure events. Both follow the schema of `diagnet.dst.events`.

matplotlib is imported only when a plot is drawn: ``pip install "diagnet[plot]"``.
`matplotlib_available` tells whether it is there.
"""

from __future__ import annotations

import json

import numpy as np

from .dst import events as ev

__all__ = ["matplotlib_available", "plot_learning_curves", "plot_diagonal_activity",
           "diagonal_activity"]


def matplotlib_available() -> bool:
    """True when matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def _records(log_path):
    with open(log_path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_learning_curves(log_path, out_path) -> str:
    """Loss and accuracy per epoch (train and eval) from ``log_path``, saved to ``out_path``."""
    epochs = [r for r in _records(log_path) if r.get("event") == "epoch"]
    if not epochs:
        raise ValueError(f"{log_path}: no epoch records to plot")
    plt = _pyplot()
    x = [r["epoch"] + 1 for r in epochs]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_loss", "train"), ("eval_loss", "test")):
        if all(key in r for r in epochs):
            ax_loss.plot(x, [r[key] for r in epochs], marker="o", label=label)
    for key, label in (("train_accuracy", "train"), ("eval_accuracy", "test")):
        if all(key in r for r in epochs):
            ax_acc.plot(x, [100 * r[key] for r in epochs], marker="o", label=label)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return str(out_path)


def diagonal_activity(log_path) -> dict:
    """``{layer: (P, epochs + 1) bool array}``: the stored offsets before training and at the
    end of each epoch, replayed from the log (see the module docstring).

    Only the diagonal layers of the run's controller are there: none for a dense run or an
    unstructured one.
    """
    records = _records(log_path)
    start = next((r for r in records if r.get(ev.EVENT) == "run_start"), None)
    structure = ((start or {}).get("controller") or {}).get(ev.STRUCTURE) or {}
    current = {name: set(layer[ev.OFFSETS]) for name, layer in structure.items()}
    snapshots = {name: [sorted(s)] for name, s in current.items()}
    for r in records:
        kind, name = r.get(ev.EVENT), r.get(ev.LAYER)
        if kind in (ev.SWAP, ev.MASK_UPDATE) and name in current:
            current[name] -= set(r.get(ev.DROPPED, []))
            current[name] |= set(r.get(ev.GROWN, []))
        elif kind == ev.FREEZE and name in current:
            current[name] = set(r.get(ev.KEPT, []))
        elif kind == "epoch":
            for layer, s in current.items():
                snapshots[layer].append(sorted(s))
    out = {}
    for name, snaps in snapshots.items():
        grid = np.zeros((structure[name][ev.DIAGONALS], len(snaps)), dtype=bool)
        for col, offsets in enumerate(snaps):
            grid[offsets, col] = True
        out[name] = grid
    return out


def plot_diagonal_activity(log_path, out_path) -> str | None:
    """Heatmaps of `diagonal_activity`, one panel per sparse layer; None when there is none."""
    grids = diagonal_activity(log_path)
    if not grids:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(grids), figsize=(4 * len(grids), 5), squeeze=False)
    for ax, (name, grid) in zip(axes[0], grids.items()):
        ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="Greys",
                  extent=(-0.5, grid.shape[1] - 0.5, grid.shape[0] - 0.5, -0.5))
        ax.set(title=f"{name}: {int(grid[:, -1].sum())} of {grid.shape[0]} stored",
               xlabel="epoch (0 = before training)", ylabel="diagonal offset")
    fig.suptitle("stored diagonals over training (black = stored)")
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return str(out_path)
