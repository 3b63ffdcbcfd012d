"""Dynamic sparse training: algorithms that change which weights a sparse layer stores.

* `SparsityController` (``base``): the protocol between an algorithm and the training loop;
* `event` and the names of the log's events and fields (``events``), which `diagnet.plots`
  reads;
* `GradientTap` (``capture``): a layer's input and output gradient at mask-update steps;
* `DynaDiagLinear` (``dynadiag``), `DynaDiag` (``dynadiag_controller``): the paper's soft
  top-k over diagonals, with its temperature schedules (``temperature``), swaps and freeze;
* `DiagPruneGrow`, `UnstructuredPruneGrow` (``prune_grow``): SET and RigL on diagonals and on
  single weights; `MaskedLinear` (``masked``): the masked dense layer of the unstructured
  baselines;
* ``select``: the rules that pick units (ranking with tie-breaking, SET/RigL's
  `drop_lowest`, `grow_random`, `grow_top`), shared by both algorithms;
* `structure_fingerprint` (``fingerprint``): a digest of each sparse layer's structure,
  to check that the processes of data-parallel training agree;
* ``density``: layer-wise densities (uniform, ERK) and integer budgets that hit the total;
* `RECIPES` (``recipes``): the one table of what each sparse layer kind and method builds;
* `sparsify` (``convert``): one call that turns a model's dense linears into sparse layers of
  a chosen recipe and returns their controller.
"""

from .base import SparsityController
from .events import event
from .capture import GradientTap
from .density import diagonal_budgets, element_budgets, layer_densities
from .masked import MaskedLinear
from .prune_grow import DiagPruneGrow, UnstructuredPruneGrow, drop_fraction, update_size
from .select import drop_lowest, grow_random, grow_top
from .temperature import SCHEDULES, TemperatureSchedule
from .dynadiag import DynaDiagLinear, dynadiag_layers
from .dynadiag_controller import DynaDiag
from .fingerprint import structure_fingerprint
from .recipes import LAYERS, METHODS, RECIPES, Recipe, find_recipe
from .convert import sparsify
