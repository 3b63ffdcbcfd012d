"""The functional API: every differentiable op as a plain function (like ``torch.nn.functional``).

All functions take and return `diagnet.Tensor` (other operands such as Python scalars or
arrays are treated as constants of the tensor's dtype and device), except
`diagonal_scores`, which returns a backend array (it is a score, not part of a graph).
"""

from .ops import (abs, add, astype, clip, concatenate, cross_entropy, diag_linear,
                  diagonal_scores, div, dropout, exp, gelu, getitem, layer_norm, log,
                  log_softmax, matmul, max, maximum, mean, minimum, mse_loss, mul, neg, permute,
                  pow, relu, reshape, sigmoid, softmax, sqrt, stack, sub, sum, tanh, to_device,
                  transpose, where)

__all__ = [
    "abs", "add", "astype", "clip", "concatenate", "cross_entropy", "diag_linear",
    "diagonal_scores", "div", "dropout", "exp", "gelu", "getitem", "layer_norm", "log",
    "log_softmax", "matmul", "max", "maximum", "mean", "minimum", "mse_loss", "mul", "neg",
    "permute", "pow", "relu", "reshape", "sigmoid", "softmax", "sqrt", "stack", "sub", "sum",
    "tanh", "to_device", "transpose", "where",
]
