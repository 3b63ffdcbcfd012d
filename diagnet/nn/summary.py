"""`summary(model)`: parameters, non-zeros and sparsity per layer and in total, as a table."""

from __future__ import annotations

from dataclasses import dataclass

from .module import Module

__all__ = ["summary", "Summary", "SummaryRow"]


@dataclass(frozen=True)
class SummaryRow:
    """One module that owns parameters.

    ``params``: the numbers it stores (all its parameters). ``weight_nnz`` / ``weight_dense``:
    the entries its weight matrix stores and would have if dense (``K*L`` and ``m*n`` for a
    `DiagLinear`; both ``m*n`` for a `Linear`); None for modules without a weight matrix
    (layer norms, embeddings).
    """

    name: str
    kind: str
    detail: str
    params: int
    weight_nnz: int | None = None
    weight_dense: int | None = None

    @property
    def dense(self) -> int:
        """The numbers this module would store with a dense weight."""
        if self.weight_nnz is None:
            return self.params
        return self.params - self.weight_nnz + self.weight_dense

    @property
    def sparsity(self) -> float | None:
        """Realised sparsity of the weight matrix, ``1 - weight_nnz / weight_dense``."""
        if self.weight_nnz is None:
            return None
        return 1.0 - self.weight_nnz / self.weight_dense


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
        """The same model's size with every sparse weight densified."""
        return sum(r.dense for r in self.rows)

    @property
    def sparsity(self) -> float:
        """Overall sparsity of all parameters, ``1 - params / dense`` (biases and norms included)."""
        return 1.0 - self.params / self.dense if self.dense else 0.0

    @property
    def weight_sparsity(self) -> float:
        """Sparsity of the weight matrices alone, ``1 - sum(weight_nnz) / sum(weight_dense)``."""
        rows = [r for r in self.rows if r.weight_nnz is not None]
        dense = sum(r.weight_dense for r in rows)
        return 1.0 - sum(r.weight_nnz for r in rows) / dense if dense else 0.0

    def __str__(self):
        head = ("layer", "type", "shape", "params", "non-zeros", "dense equiv.", "sparsity")

        def fmt_row(r):
            nnz = "" if r.weight_nnz is None else f"{r.weight_nnz:,}"
            sp = "" if r.sparsity is None else f"{r.sparsity:.2%}"
            return (r.name or "(root)", r.kind, r.detail, f"{r.params:,}", nnz, f"{r.dense:,}", sp)

        body = [fmt_row(r) for r in self.rows]
        nnz = sum(r.weight_nnz for r in self.rows if r.weight_nnz is not None)
        total = ("total", self.model, "", f"{self.params:,}", f"{nnz:,}", f"{self.dense:,}",
                 f"{self.sparsity:.2%}")
        widths = [max(len(row[i]) for row in [head, total] + body) for i in range(len(head))]

        def fmt(row):
            return "  ".join(c.rjust(w) if i >= 3 else c.ljust(w)
                             for i, (c, w) in enumerate(zip(row, widths))).rstrip()
        rule = "  ".join("-" * w for w in widths)
        note = (f"non-zeros: stored weight entries; sparsity: of each weight matrix, and in the "
                f"total of all parameters (weights alone: {self.weight_sparsity:.2%})")
        return "\n".join([fmt(head), rule] + [fmt(r) for r in body] + [rule, fmt(total), note])


def _detail(mod) -> str:
    if hasattr(mod, "in_features") and hasattr(mod, "out_features"):
        extra = f", K={mod.K}/{mod.P}" if hasattr(mod, "K") else ""
        return f"{mod.out_features}x{mod.in_features}{extra}"
    return ", ".join(f"{n}{tuple(p.shape)}" for n, p in mod._parameters.items() if p is not None)


def summary(model: Module) -> Summary:
    """Tabulate every module of ``model`` that owns parameters.

    A layer with a weight matrix reports ``(stored entries, dense entries)`` of that matrix
    through a ``weight_stats()`` method (`Linear`: ``(m*n, m*n)``; `DiagLinear`:
    ``(K*L, m*n)``); its other parameters (biases) count as stored in both. Modules without
    ``weight_stats`` count their parameters as dense. ``print(summary(model))`` shows the
    table; the returned `Summary` also gives the totals as numbers.
    """
    if not isinstance(model, Module):
        raise TypeError(f"summary needs a Module; got {type(model).__name__}")
    rows = []
    for name, mod in model.named_modules():
        own = sum(p.size for p in mod._parameters.values() if p is not None)
        if not own:
            continue
        nnz, dense = mod.weight_stats() if hasattr(mod, "weight_stats") else (None, None)
        rows.append(SummaryRow(name, type(mod).__name__, _detail(mod), int(own), nnz, dense))
    return Summary(tuple(rows), type(model).__name__)
