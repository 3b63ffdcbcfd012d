"""Differentiable operations on tensors, written once against NumPy/CuPy.

Grouped by concept: `basic` (element-wise arithmetic and math), `shape` (reshape,
transpose, indexing, joins), `reduce` (sum, mean, max), `nn` (activations, softmax,
losses, dropout, layer norm) and `diagonal` (the diagonal sparse linear map and its
regrowth score). `diagnet.functional` is the public namespace for all of them.
"""

from .basic import (abs, add, astype, clip, div, exp, log, matmul, maximum, minimum, mul, neg,
                    pow, sigmoid, sqrt, sub, tanh, to_device, where)
from .diagonal import DiagLinear, diag_linear, diagonal_scores
from .nn import (cross_entropy, dropout, gelu, layer_norm, log_softmax, manual_seed, mse_loss,
                 relu, softmax)
from .reduce import max, mean, sum
from .shape import concatenate, getitem, permute, reshape, stack, transpose
