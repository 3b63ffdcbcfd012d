"""The reverse-mode autograd engine: `Tensor`, `Function` and the backward walk.

Define-by-run, after DeZero and Chainer. Calling a `Function` on tensors runs its
``forward`` on the raw backend arrays and, when gradients are wanted, records the function
as the ``creator`` of its outputs. ``Tensor.backward`` then walks the recorded graph from a
max-heap of functions keyed on ``generation`` (a function runs only after every function
that consumed its outputs), so it is iterative and visits each node once.

One concept per module, each importing only those above it in this list:

* `dtypes`: the dtypes a tensor may hold, `canonical_dtype`, `check_integer_range`;
* `shapes`: `reduces_to`, `sum_to` (broadcasting undone), `sum_rows` (a column sum at BLAS
  speed) and the ``axis=``/``dim=`` pair;
* `version`: `VersionCounter`, the record of in-place changes;
* `engine`: the backward walk (`engine.run_backward`);
* `tensor_class`: `Tensor` and `Tensor.from_array`;
* `function`: `Function`, the graph node, and the operand rules of every op;
* `creation`: `tensor` and `from_dlpack`.

The engine imports no op: `diagnet.ops` installs `Tensor`'s operators and op methods
(``+``, ``@``, ``t[i]``, ``sum``, ``reshape``, ...) when it is imported
(`diagnet.ops.tensor_methods`), as DeZero's ``setup_variable`` and Chainer's
``install_variable_arithmetics`` do.

Rules kept in this one place, so no op needs to repeat them:

* A gradient whose shape differs from its input's (because of broadcasting) is summed back
  to the input's shape (`sum_to`).
* Gradients of leaf tensors accumulate across backward calls until zeroed; intermediate
  gradients are freed as soon as they have been passed on.
* After backward the graph is freed (saved arrays and input links dropped) unless
  ``retain_graph=True``; walking a freed graph again is an error.
* Functions hold their outputs only through weak references, so an unused branch of a
  graph is collected like any other Python object.
* A node whose inputs or outputs were changed in place after it ran refuses to run its
  backward (`VersionCounter`), rather than compute a gradient from values that are gone.
* A call that nothing will differentiate (under `no_grad`, or no input requires grad)
  records nothing: inference pays for the arithmetic and the dispatch only.

Dtype policy: floating tensors are float32 by default, float64 on request. A binary op
between two floating tensors of different dtypes raises `TypeError`; Python scalars, NumPy
arrays and integer/bool tensors mixed with a floating tensor take that tensor's dtype
(for tensors: in the element-wise ops, see ``Function.elementwise``).
"""

from .creation import from_dlpack, tensor
from .dtypes import (DEFAULT_DTYPE, FLOAT_DTYPES, SUPPORTED_KINDS, canonical_dtype,
                     check_integer_range)
from .function import Function, as_tensor_like
from .shapes import axis_or_dim, reduces_to, sum_rows, sum_to
from .tensor_class import Tensor
from .version import VersionCounter

__all__ = ["Tensor", "Function", "VersionCounter", "tensor", "from_dlpack", "as_tensor_like",
           "FLOAT_DTYPES", "DEFAULT_DTYPE", "SUPPORTED_KINDS", "canonical_dtype",
           "check_integer_range", "reduces_to", "sum_to", "sum_rows", "axis_or_dim"]
