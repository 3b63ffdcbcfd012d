"""`summary(model)`: parameters, non-zeros and sparsity per layer and in total, as a table."""

from __future__ import annotations

from dataclasses import dataclass

from .module import Module

__all__ = ["summary", "Summary", "SummaryRow"]


@dataclass(frozen=True)
class SummaryRow:
    """One module that owns parameters.

    ``params`` counts the numbers the module stores; ``dense`` the numbers a dense layer of
    the same shape would store; ``sparsity = 1 - params / dense`` (0 for dense layers).
    """

    name: str
    kind: str
    detail: str
    params: int
    dense: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.params / self.dense if self.dense else 0.0


@dataclass(frozen=True)
class Summary:
    """The rows of `summary` and their totals; ``str()`` renders a table."""

    rows: tuple
    model: str

    @property
    def params(self) -> int:
        """Stored numbers in all parameters (what memory and optimizer state scale with)."""
        return sum(r.params for r in self.rows)

    @property
    def dense(self) -> int:
        """The same model's size with every sparse layer densified."""
        return sum(r.dense for r in self.rows)

    @property
    def sparsity(self) -> float:
        """Overall sparsity, ``1 - params / dense``, over all parameters (biases included)."""
        return 1.0 - self.params / self.dense if self.dense else 0.0

    def __str__(self):
        head = ("layer", "type", "shape", "params", "dense equiv.", "sparsity")
        body = [(r.name or "(root)", r.kind, r.detail, f"{r.params:,}", f"{r.dense:,}",
                 f"{r.sparsity:.2%}") for r in self.rows]
        total = ("total", self.model, "", f"{self.params:,}", f"{self.dense:,}",
                 f"{self.sparsity:.2%}")
        widths = [max(len(row[i]) for row in [head, total] + body) for i in range(len(head))]
        right = {3, 4, 5}

        def fmt(row):
            return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                             for i, (c, w) in enumerate(zip(row, widths))).rstrip()
        rule = "  ".join("-" * w for w in widths)
        return "\n".join([fmt(head), rule] + [fmt(r) for r in body] + [rule, fmt(total)])


def _detail(mod) -> str:
    if hasattr(mod, "in_features") and hasattr(mod, "out_features"):
        extra = f", K={mod.K}/{mod.P}" if hasattr(mod, "K") else ""
        return f"{mod.out_features}x{mod.in_features}{extra}"
    return ", ".join(f"{n}{tuple(p.shape)}" for n, p in mod._parameters.items() if p is not None)


def summary(model: Module) -> Summary:
    """Tabulate every module of ``model`` that owns parameters.

    A layer reports ``(stored, dense-equivalent)`` through a ``weight_stats()`` method when it
    has one (sparse layers: ``K*L + bias`` against ``m*n + bias``); any other module counts
    its own parameters as both. ``print(summary(model))`` shows the table; the returned
    `Summary` also gives the totals as numbers.
    """
    if not isinstance(model, Module):
        raise TypeError(f"summary needs a Module; got {type(model).__name__}")
    rows = []
    for name, mod in model.named_modules():
        own = sum(p.size for p in mod._parameters.values() if p is not None)
        if not own:
            continue
        stored, dense = mod.weight_stats() if hasattr(mod, "weight_stats") else (own, own)
        rows.append(SummaryRow(name, type(mod).__name__, _detail(mod), int(stored), int(dense)))
    return Summary(tuple(rows), type(model).__name__)
