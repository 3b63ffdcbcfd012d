"""Dynamic sparse training: algorithms that change which weights a sparse layer stores.

* `SparsityController` (``base``): the protocol between an algorithm and the training loop;
* `GradientTap` (``capture``): a layer's input and output gradient at mask-update steps;
* `DynaDiagLinear` (``dynadiag``), `DynaDiag` (``dynadiag_controller``): the paper's soft
  top-k over diagonals, with its temperature schedules (``temperature``), swaps and freeze;
* `DiagPruneGrow`, `UnstructuredPruneGrow` (``prune_grow``): SET and RigL on diagonals and on
  single weights; `MaskedLinear` (``masked``): the masked dense layer of the unstructured
  baselines;
* ``select``: the rules that pick units (ranking with tie-breaking, SET/RigL's
  `drop_lowest`, `grow_random`, `grow_top`), shared by both algorithms;
* ``density``: layer-wise densities (uniform, ERK) and integer budgets that hit the total;
* `sparsify` (``convert``): one call that turns a model's dense linears into sparse layers of
  a chosen kind and returns their controller.
"""

from .base import SparsityController, event
from .capture import GradientTap
from .density import diagonal_budgets, element_budgets, layer_densities
from .masked import MaskedLinear
from .prune_grow import DiagPruneGrow, UnstructuredPruneGrow, drop_fraction, update_size
from .select import drop_lowest, grow_random, grow_top
from .temperature import SCHEDULES, TemperatureSchedule
from .dynadiag import DynaDiagLinear, dynadiag_layers
from .dynadiag_controller import DynaDiag
from .convert import KINDS, sparsify
