"""diagnet: a small framework for diagonally sparse neural networks.

``diagnet.tensor`` and `Tensor` (autograd), ``diagnet.functional`` (all ops),
`DiagMatrix` (the (offset, diagonal) sparse format), ``diagnet.backend`` (NumPy/CuPy).
"""

__version__ = "0.1.0"

from . import backend, functional, sparse
from .autograd import Function, Tensor, enable_grad, is_grad_enabled, no_grad, tensor
from .backend import cuda_available, default_device, get_array_module
from .gradcheck import GradcheckError, gradcheck
from .ops import (concatenate, cross_entropy, exp, log, manual_seed, matmul, maximum, minimum,
                  relu, sigmoid, softmax, sqrt, stack, tanh, where)
from .sparse import DiagMatrix
