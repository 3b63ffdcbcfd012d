"""Layers and models as `Module` trees, after ``torch.nn``.

* `Module`, `Parameter`: registration by attribute assignment, state dicts, device moves;
* containers: `Sequential`, `ModuleList`, `Identity`, `Flatten`;
* layers: `Linear`, `DiagLinear` (diagonally sparse), `LayerNorm`, `Dropout`, `ReLU`,
  `GELU`, `Tanh`, `Sigmoid`, `Softmax`, `MultiHeadSelfAttention`;
* `summary(model)`: parameters, non-zeros and sparsity per layer, as a table;
* `init`: initialisers; `utils`: gradient clipping.
"""

from . import init, utils
from .activation import GELU, ReLU, Sigmoid, Softmax, Tanh
from .attention import MultiHeadSelfAttention
from .container import Flatten, Identity, ModuleList, Sequential
from .linear import DiagLinear, Linear
from .module import Module
from .normalization import LayerNorm
from .parameter import Parameter
from .regularization import Dropout
from .state import IncompatibleKeys
from .summary import Summary, summary
