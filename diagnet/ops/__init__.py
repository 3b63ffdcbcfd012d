"""Differentiable operations on tensors, written once against NumPy/CuPy.

One concept per module:

* `basic`: element-wise arithmetic and math, selection (where, maximum, clip), clone,
  dtype casts and device moves;
* `shape`: reshape, squeeze/unsqueeze, transpose, broadcast_to, indexing, joins, numel;
* `inplace`: the in-place ops behind ``+=``, ``add_``, ``fill_``, ``copy_``, ``t[i] = v``
  (methods of `Tensor`, not part of the functional API);
* `reduce`: sum, mean, var, max, min, argmax;
* `activation`: relu, gelu, bias_relu and bias_gelu (a linear's bias added in the activation's
  pass), log_sigmoid, softmax, log_softmax;
* `loss`: cross_entropy, mse_loss;
* `regularization`: dropout;
* `normalization`: layer_norm, add_layer_norm (a residual sum and the layer norm of it);
* `attention`: scaled dot-product attention, the qkv split and the head merge;
* `dense`: the dense linear map ``x @ W.T + b`` as one node;
* `diagonal`: the diagonal sparse linear map and its regrowth score;
* `tensor_methods`: `Tensor`'s operators and op methods (``t + u``, ``t.sum()``, ...),
  installed on the class when this package is imported (`install_tensor_methods`).

Each module lists its public names in ``__all__``; this package re-exports them all (but
those of `inplace` and `tensor_methods`) and `diagnet.functional` is the public namespace. Adding an op edits only its own module.
"""

from . import (activation, attention, basic, dense, diagonal, inplace, loss, normalization,
               reduce, regularization, shape, tensor_methods)
from .activation import *  # noqa: F401,F403
from .attention import *  # noqa: F401,F403
from .basic import *  # noqa: F401,F403
from .diagonal import *  # noqa: F401,F403
from .dense import *  # noqa: F401,F403
from .loss import *  # noqa: F401,F403
from .normalization import *  # noqa: F401,F403
from .reduce import *  # noqa: F401,F403
from .regularization import *  # noqa: F401,F403
from .shape import *  # noqa: F401,F403

__all__ = (basic.__all__ + shape.__all__ + reduce.__all__ + activation.__all__ + loss.__all__
           + regularization.__all__ + normalization.__all__ + attention.__all__ + dense.__all__
           + diagonal.__all__)

tensor_methods.install_tensor_methods()
