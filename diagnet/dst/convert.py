"""`sparsify`: turn a model's dense `nn.Linear` layers into sparse layers of one recipe.

One call picks the layers, gives each its share of the overall density (uniform or ERK,
exact by construction, see ``density``), builds the sparse layers in place of the dense ones
(same place in the model, same dtype and device) and returns the controller that trains
their structure::

    controller = sparsify(model, "diag", method="dynadiag", sparsity=0.9, schedule=...,
                          freeze_at=30)
    optimizer = optim.Adam(model.parameters(), lr=1e-3)     # after sparsify: new parameters

Which layer and which controller each ``layer`` / ``method`` pair builds is the table
`RECIPES` (``recipes``); a recipe's one-string name (``"dynadiag"``, ``"diag_set"``) is
accepted in place of the pair.
"""

from __future__ import annotations

import fnmatch

from .. import random as _random
from ..diag import validate
from ..nn import Linear, Module
from .base import SparsityController
from .density import diagonal_budgets, element_budgets
from .recipes import find_recipe

__all__ = ["sparsify", "dense_linears"]


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


def sparsify(model, layer="diag", sparsity=0.9, *, method=None, distribution="uniform",
             dense=(), rng=None, init="fresh", count_dense=True, **options) -> SparsityController:
    """Replace ``model``'s dense linear layers by sparse ones, in place; return their controller.

    Args:
        model: a `Module`; every plain `nn.Linear` in it is converted unless kept dense.
        layer: the sparse layer kind, ``"diag"`` (default) or ``"unstructured"``; or a
            recipe's name (``"dynadiag"``, ``"diag_set"``, ...), which names the method too
            (see `diagnet.dst.recipes`).
        sparsity: overall target sparsity in ``[0, 1)`` of the converted layers' weights and,
            with ``count_dense`` (the default, as in the RigL paper), of the dense layers kept
            too; with ``count_dense=False`` the kept layers are left out of the total, so the
            sparse layers alone are at ``sparsity``.
        method: how the structure is trained: ``"static"`` (default: a fixed random
            structure, a metrics-only controller), ``"set"``, ``"rigl"`` or ``"dynadiag"``
            (``"diag"`` layers only).
        distribution: ``"uniform"`` or ``"erk"`` (see `diagnet.dst.density`).
        dense: names or glob patterns (``"head"``, ``"blocks.*.attn.proj"``) of linear layers
            to keep dense; each pattern must match at least one layer.
        rng: None (default generator), int seed or Generator; one stream draws every new
            layer in module order, then the controller's own seed.
        init: ``"fresh"`` (new random layers, for training from scratch) or ``"dense"``
            (keep the dense weights: the diagonals of largest norm, or a random mask over
            the dense values; not for ``"dynadiag"``, whose layers start from the reference
            initialisation).
        options: the recipe's options (`Recipe.options`): ``mode`` and ``pool`` go to each
            `DynaDiagLinear`; the rest to the controller (e.g. ``schedule``, ``freeze_at``
            for DynaDiag; ``delta_t``, ``t_end``, ``f0`` for SET/RigL).

    Returns:
        the controller of the new layers (a metrics-only `SparsityController` for the static
        recipes). Create the optimizer *after* this call: the model's parameters changed.

    Raises:
        ValueError / TypeError: unknown layer, method, distribution or init; a ``dense``
            pattern that matches no layer; no layer left to convert; options that the recipe
            does not take; any refusal of the layers or the controller. A refused call leaves
            the model and the generator ``rng`` as they were.
    """
    if not isinstance(model, Module):
        raise TypeError(f"model must be a Module; got {type(model).__name__}")
    recipe = find_recipe(layer, method)
    if init not in ("fresh", "dense") or (init == "dense" and not recipe.init_dense):
        raise ValueError(f"init must be 'fresh' or 'dense' ('dense' is not available for "
                         f"dynadiag); got {init!r} for method {recipe.method!r}")
    unknown = [name for name in options if name not in recipe.options]
    if unknown:
        raise ValueError(f"options {', '.join(unknown)} do not apply to layer {recipe.layer!r} "
                         f"with method {recipe.method!r}; it takes "
                         f"{', '.join(recipe.options) or 'none (it has no controller)'}")
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
    layer_options = {k: options.pop(k) for k in recipe.layer_options if k in options}
    shapes = {name: (m.out_features, m.in_features) for name, m in linears.items()
              if count_dense or name not in keep}
    budgets = (diagonal_budgets if recipe.layer == "diag" else element_budgets)(
        shapes, 1.0 - sparsity, distribution, dense=keep if count_dense else ())
    gen = _random.as_generator(rng)
    before = gen.bit_generator.state
    try:  # the new layers and their controller first: a refusal there leaves the model as is
        layers = {name: _build(recipe, old, budgets[name], init, gen, layer_options)
                  for name, old in linears.items() if name not in keep}
        controller = _controller(recipe, layers, gen, options)
    except BaseException:
        gen.bit_generator.state = before
        raise
    modules = dict(model.named_modules())
    for name, new in layers.items():
        _replace(modules, name, new)
    return controller


def _build(recipe, old, budget, init, gen, layer_options):
    m, n = old.out_features, old.in_features
    common = dict(bias=old.bias is not None, dtype=old.weight.dtype, device=old.weight.device)
    cls = recipe.layer_class
    if recipe.layer == "unstructured":
        density = budget / (m * n)
        if init == "dense":
            return cls.from_linear(old, density, rng=gen)
        return cls(n, m, density=density, rng=gen, **common)
    if init == "dense":
        return cls.from_dense(old, k=budget)
    return cls(n, m, sparsity=1.0 - budget / max(m, n), rng=gen, **common, **layer_options)


def _controller(recipe, layers, gen, options):
    if recipe.method == "static":
        return recipe.controller(layers)
    seed = int(gen.integers(2 ** 63))  # the controller's own stream, drawn after the layers
    if recipe.passes_method:
        options = dict(options, method=recipe.method)
    return recipe.controller(layers, rng=seed, **options)
