"""diagnet: a small framework for diagonally sparse neural networks."""

__version__ = "0.1.0"

from . import backend
from .autograd import Function, Tensor, enable_grad, is_grad_enabled, no_grad, tensor
from .backend import cuda_available, default_device, get_array_module
from . import functional
from .gradcheck import GradcheckError, gradcheck
from .ops import (concatenate, cross_entropy, exp, log, manual_seed, matmul, maximum, minimum,
                  relu, sigmoid, softmax, sqrt, stack, tanh, where)
