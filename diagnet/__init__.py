"""diagnet: a small framework for diagonally sparse neural networks.

``diagnet.tensor``, `Tensor` and ``diagnet.from_dlpack`` (autograd), ``diagnet.functional``
(all ops), `DiagMatrix` (the (offset, diagonal) sparse format), ``diagnet.backend`` (NumPy/CuPy),
``diagnet.nn`` (modules and layers), ``diagnet.optim`` (optimizers, schedules),
``diagnet.dst`` (dynamic sparse training), ``diagnet.data`` (datasets, loaders),
``diagnet.train`` (the `Trainer`),
`save` / `load` (checkpoints in the safetensors format, ``diagnet.checkpoint``); the models
are in ``diagnet.models``.
"""

from .version import __version__
from . import (backend, checkpoint, config, data, distributed, dst, functional, nn, optim, random,
               sparse, train)
from .autograd import Function, Tensor, from_dlpack, tensor
from .config import enable_grad, is_grad_enabled, no_grad, set_grad_enabled
from .backend import cuda_available, default_device, get_array_module
from .checkpoint import load, save
from .gradcheck import GradcheckError, gradcheck
from .ops import (concatenate, cross_entropy, exp, log, matmul, maximum, minimum, relu, sigmoid,
                  softmax, sqrt, stack, tanh, where)
from .random import manual_seed
from .sparse import DiagMatrix
