"""`sparsify`: turn a model's dense `nn.Linear` layers into sparse layers of one kind.

One call picks the layers, gives each its share of the overall density (uniform or ERK,
exact by construction, see ``density``), builds the sparse layers in place of the dense ones
(same place in the model, same dtype and device) and returns the controller that trains
their structure::

    controller = sparsify(model, "dynadiag", sparsity=0.9, schedule=..., freeze_at=30)
    optimizer = optim.Adam(model.parameters(), lr=1e-3)     # after sparsify: new parameters

Kinds:

============================  ===================  ==========================================
kind                          layer                controller
============================  ===================  ==========================================
``"diag"``                    `nn.DiagLinear`      none (`SparsityController`: metrics only)
``"dynadiag"``                `DynaDiagLinear`     `DynaDiag`
``"diag_set"``/``"diag_rigl"``  `nn.DiagLinear`    `DiagPruneGrow` (method set / rigl)
``"unstructured"``            `MaskedLinear`       none (a fixed random mask)
``"unstructured_set"``/       `MaskedLinear`       `UnstructuredPruneGrow` (set / rigl)
``"unstructured_rigl"``
============================  ===================  ==========================================
"""

from __future__ import annotations

import fnmatch

from .. import random as _random
from ..diag import validate
from ..nn import DiagLinear, Linear, Module
from .base import SparsityController
from .density import diagonal_budgets, element_budgets
from .dynadiag import DynaDiagLinear
from .dynadiag_controller import DynaDiag
from .masked import MaskedLinear
from .prune_grow import DiagPruneGrow, UnstructuredPruneGrow

__all__ = ["sparsify", "KINDS", "dense_linears"]

KINDS = ("diag", "dynadiag", "diag_set", "diag_rigl", "unstructured", "unstructured_set",
         "unstructured_rigl")
_LAYER_OPTIONS = ("mode", "pool")  # DynaDiagLinear's own arguments; the rest is the controller's


def dense_linears(model) -> dict:
    """``{dotted name: layer}`` of every plain `nn.Linear` of ``model`` (not its subclasses)."""
    return {name: m for name, m in model.named_modules() if type(m) is Linear}


def _matches(name, patterns):
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _replace(modules, name, new):
    """Put ``new`` in the place of the module ``name``; ``modules`` is the model's
    ``dict(named_modules())``, which holds every parent of a named module."""
    parent, _, attr = name.rpartition(".")
    setattr(modules[parent], attr, new)  # keeps the layer's place (Module.__setattr__)


def sparsify(model, kind, sparsity=0.9, distribution="uniform", dense=(), rng=None,
             init="fresh", count_dense=True, **options) -> SparsityController:
    """Replace ``model``'s dense linear layers by sparse ones, in place; return their controller.

    Args:
        model: a `Module`; every plain `nn.Linear` in it is converted unless kept dense.
        kind: one of `KINDS` (see the module docstring).
        sparsity: overall target sparsity in ``[0, 1)`` of the converted layers' weights and,
            with ``count_dense`` (the default, as in the RigL paper), of the dense layers kept
            too; with ``count_dense=False`` the kept layers are left out of the total, so the
            sparse layers alone are at ``sparsity``.
        distribution: ``"uniform"`` or ``"erk"`` (see `diagnet.dst.density`).
        dense: names or glob patterns (``"head"``, ``"blocks.*.attn.proj"``) of linear layers
            to keep dense; each pattern must match at least one layer.
        rng: None (default generator), int seed or Generator; one stream draws every new
            layer in module order, then the controller's own seed.
        init: ``"fresh"`` (new random layers, for training from scratch) or ``"dense"``
            (keep the dense weights: the diagonals of largest norm, or a random mask over
            the dense values; not for ``"dynadiag"``, whose layers start from the reference
            initialisation).
        options: ``mode`` and ``pool`` go to each `DynaDiagLinear`; everything else to the
            controller (e.g. ``schedule``, ``freeze_at`` for DynaDiag; ``delta_t``, ``t_end``,
            ``f0`` for SET/RigL).

    Returns:
        the controller of the new layers (a metrics-only `SparsityController` for the static
        kinds). Create the optimizer *after* this call: the model's parameters changed.

    Raises:
        ValueError: unknown kind, distribution or init; a ``dense`` pattern that matches no
            layer; no layer left to convert; options that the kind does not take.
    """
    if not isinstance(model, Module):
        raise TypeError(f"model must be a Module; got {type(model).__name__}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    if init not in ("fresh", "dense") or (init == "dense" and kind == "dynadiag"):
        raise ValueError(f"init must be 'fresh' or 'dense' ('dense' is not available for "
                         f"dynadiag); got {init!r} for kind {kind!r}")
    sparsity = validate.check_sparsity(sparsity, allow_one=False)
    dense = (dense,) if isinstance(dense, str) else tuple(dense)
    linears = dense_linears(model)
    for pattern in dense:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in linears):
            raise ValueError(f"dense pattern {pattern!r} matches no linear layer; layers: "
                             f"{', '.join(linears) or 'none'}")
    keep = [name for name in linears if _matches(name, dense)]
    if len(keep) == len(linears):
        raise ValueError("no linear layer left to make sparse (all are kept dense or there "
                         "are none)")
    layer_options = {k: options.pop(k) for k in _LAYER_OPTIONS if k in options}
    if layer_options and kind != "dynadiag":
        raise ValueError(f"{', '.join(layer_options)} only apply to kind 'dynadiag'")
    shapes = {name: (m.out_features, m.in_features) for name, m in linears.items()
              if count_dense or name not in keep}
    gen = _random.as_generator(rng)
    diagonal = not kind.startswith("unstructured")
    budgets = (diagonal_budgets if diagonal else element_budgets)(
        shapes, 1.0 - sparsity, distribution, dense=keep if count_dense else ())
    layers, modules = {}, dict(model.named_modules())
    for name, old in linears.items():
        if name in keep:
            continue
        new = _build(kind, old, budgets[name], init, gen, layer_options)
        _replace(modules, name, new)
        layers[name] = new
    return _controller(kind, layers, gen, options)


def _build(kind, old, budget, init, gen, layer_options):
    m, n = old.out_features, old.in_features
    common = dict(bias=old.bias is not None, dtype=old.weight.dtype, device=old.weight.device)
    if kind == "dynadiag":
        return DynaDiagLinear(n, m, sparsity=1.0 - budget / max(m, n), rng=gen, **common,
                              **layer_options)
    if kind.startswith("unstructured"):
        density = budget / (m * n)
        if init == "dense":
            return MaskedLinear.from_linear(old, density, rng=gen)
        return MaskedLinear(n, m, density=density, rng=gen, **common)
    if init == "dense":
        return DiagLinear.from_dense(old, k=budget)
    return DiagLinear(n, m, sparsity=1.0 - budget / max(m, n), rng=gen, **common)


def _controller(kind, layers, gen, options):
    if kind in ("diag", "unstructured"):
        if options:
            raise ValueError(f"kind {kind!r} has no controller; unexpected options "
                             f"{', '.join(options)}")
        return SparsityController(layers)
    seed = int(gen.integers(2 ** 63))  # the controller's own stream, drawn after the layers
    if kind == "dynadiag":
        return DynaDiag(layers, rng=seed, **options)
    method = kind.rsplit("_", 1)[1]
    cls = DiagPruneGrow if kind.startswith("diag") else UnstructuredPruneGrow
    return cls(layers, method=method, rng=seed, **options)
