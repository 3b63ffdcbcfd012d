"""The functional API: every differentiable op as a plain function (like ``torch.nn.functional``).

All functions take and return `diagnet.Tensor` (other operands such as Python scalars or
arrays are treated as constants of the tensor's dtype and device), except `numel` (an int)
and `diagonal_scores` and `diagonal_norms`, which return backend arrays (they are scores,
not part of a graph).
`argmax` returns an int64 tensor without gradient.

The names are those of `diagnet.ops` (each op module's ``__all__``, so an op is listed
once, in its own module). ``__all__`` here leaves out the `Function` classes that some
modules also export (such as ``DiagLinearFunction``, the graph node that layers call
directly): they belong to `diagnet.ops`.
"""

from . import ops as _ops
from .ops import *  # noqa: F401,F403

__all__ = [name for name in _ops.__all__ if not isinstance(getattr(_ops, name), type)]
