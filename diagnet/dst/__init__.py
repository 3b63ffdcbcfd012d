"""Dynamic sparse training: algorithms that change which weights a sparse layer stores.

* `SparsityController` (``base``): the protocol between an algorithm and the training loop;
* `GradientTap` (``capture``): a layer's input and output gradient at mask-update steps;
* `DynaDiagLinear`, `DynaDiag` (``dynadiag``): the paper's soft top-k over diagonals, with
  its temperature schedules (``temperature``), swaps and freeze;
* `DiagPruneGrow`, `UnstructuredPruneGrow` (``prune_grow``): SET and RigL on diagonals and on
  single weights; `MaskedLinear` (``masked``): the masked dense layer of the unstructured
  baselines;
* ``density``: layer-wise densities (uniform, ERK) and integer budgets that hit the total;
* `sparsify` (``convert``): one call that turns a model's dense linears into sparse layers of
  a chosen kind and returns their controller.
"""

from .base import SparsityController, event
from .capture import GradientTap
from .density import diagonal_budgets, element_budgets, layer_densities
from .masked import MaskedLinear
from .prune_grow import (DiagPruneGrow, UnstructuredPruneGrow, drop_fraction, drop_lowest,
                         grow_random, grow_top, update_size)
from .temperature import SCHEDULES, TemperatureSchedule
from .dynadiag import DynaDiag, DynaDiagLinear, dynadiag_layers
from .convert import KINDS, sparsify
