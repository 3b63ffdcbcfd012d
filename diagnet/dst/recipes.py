"""The sparsification recipes: which sparse layer and which controller each choice builds.

A recipe is a sparse layer kind (``"diag"``: whole diagonals; ``"unstructured"``: single
weights) and a method that trains its structure (``"static"``: none, a fixed random
structure; ``"set"``, ``"rigl"``; ``"dynadiag"``, diagonal layers only). `RECIPES` is the one
table of them: `sparsify` (``convert``) builds from it, the examples take their
``--linear`` / ``--method`` choices from it, and a test checks the table of ``docs/dst.md``
against it.

Each recipe also has a one-string ``name`` (``"dynadiag"``, ``"diag_set"``, ...), which
`sparsify` takes in place of the pair: ``sparsify(model, "dynadiag")`` is
``sparsify(model, "diag", method="dynadiag")``. `find_recipe` is the one place that maps
either form to a recipe.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from ..nn import DiagLinear
from .base import SparsityController
from .dynadiag import DynaDiagLinear
from .dynadiag_controller import DynaDiag
from .masked import MaskedLinear
from .prune_grow import DiagPruneGrow, UnstructuredPruneGrow

__all__ = ["Recipe", "RECIPES", "LAYERS", "METHODS", "find_recipe"]

LAYERS = ("diag", "unstructured")
METHODS = ("static", "set", "rigl", "dynadiag")

#: controller arguments that `sparsify` sets itself, so they are not options of a recipe
_SET_BY_SPARSIFY = ("self", "layers", "rng", "method")


@dataclass(frozen=True)
class Recipe:
    """One sparse layer kind with one method of training its structure.

    Attributes:
        layer: ``"diag"`` or ``"unstructured"``.
        method: ``"static"``, ``"set"``, ``"rigl"`` or ``"dynadiag"``.
        name: the one-string form `sparsify` also takes (``"diag_rigl"``).
        layer_class: the sparse layer that replaces each dense `nn.Linear`.
        controller: the controller class; `SparsityController` (metrics only) for static.
        layer_options: `sparsify` options that go to each new layer, not to the controller.
        passes_method: the controller takes ``method`` as an argument (SET and RigL share
            one controller class).
        init_dense: ``sparsify(init="dense")`` is available (keep the dense weights).
    """

    layer: str
    method: str
    name: str
    layer_class: type
    controller: type
    layer_options: tuple = ()
    passes_method: bool = False
    init_dense: bool = True

    @property
    def controller_options(self) -> tuple:
        """The controller's own arguments, which `sparsify` passes on from its options."""
        params = inspect.signature(self.controller).parameters
        return tuple(name for name in params if name not in _SET_BY_SPARSIFY)

    @property
    def options(self) -> tuple:
        """Every option `sparsify` takes for this recipe: the layers', then the controller's."""
        return self.layer_options + self.controller_options


RECIPES = (
    Recipe("diag", "static", "diag", DiagLinear, SparsityController),
    Recipe("diag", "set", "diag_set", DiagLinear, DiagPruneGrow, passes_method=True),
    Recipe("diag", "rigl", "diag_rigl", DiagLinear, DiagPruneGrow, passes_method=True),
    Recipe("diag", "dynadiag", "dynadiag", DynaDiagLinear, DynaDiag,
           layer_options=("mode", "pool"), init_dense=False),
    Recipe("unstructured", "static", "unstructured", MaskedLinear, SparsityController),
    Recipe("unstructured", "set", "unstructured_set", MaskedLinear, UnstructuredPruneGrow,
           passes_method=True),
    Recipe("unstructured", "rigl", "unstructured_rigl", MaskedLinear, UnstructuredPruneGrow,
           passes_method=True),
)
_BY_PAIR = {(r.layer, r.method): r for r in RECIPES}
_BY_NAME = {r.name: r for r in RECIPES}


def find_recipe(layer, method=None) -> Recipe:
    """The recipe of ``layer`` and ``method``, or of the recipe name given as ``layer``.

    Args:
        layer: one of `LAYERS`, or a recipe's ``name`` (``"dynadiag"``, ``"diag_set"``...),
            which names the method too.
        method: one of `METHODS`; None (default) means ``"static"``, or the method of the
            recipe named by ``layer``.

    Raises:
        ValueError: a ``layer`` or ``method`` that is none of the choices, a pair without a
            recipe (``"dynadiag"`` on unstructured layers), or a recipe name with a
            ``method`` that contradicts it; the message names the argument, the choices
            and the value received.
    """
    named = _BY_NAME.get(layer) if isinstance(layer, str) else None
    if named is not None and layer not in LAYERS:
        if method is not None and method != named.method:
            raise ValueError(f"layer={layer!r} is the recipe of method {named.method!r}; got "
                             f"method={method!r} too (give layer={named.layer!r} with a method, "
                             "or the recipe's name alone)")
        return named
    if not isinstance(layer, str) or layer not in LAYERS:
        names = tuple(r.name for r in RECIPES if r.name not in LAYERS)
        raise ValueError(f"layer must be one of {LAYERS} (or a recipe name, one of {names}); "
                         f"got {layer!r}")
    method = "static" if method is None else method
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    recipe = _BY_PAIR.get((layer, method))
    if recipe is None:
        takes = tuple(r.method for r in RECIPES if r.layer == layer)
        raise ValueError(f"method {method!r} does not apply to layer {layer!r}: its methods are "
                         f"{takes}")
    return recipe
