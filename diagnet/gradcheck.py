"""Check an op's backward against central finite differences (in float64)."""

from __future__ import annotations

import numpy as np

from . import backend
from .autograd import Tensor
from .config import no_grad


class GradcheckError(AssertionError):
    """Raised by `gradcheck` when an analytic gradient disagrees with the numeric one."""


def gradcheck(fn, *inputs, eps=1e-6, atol=1e-6, rtol=1e-4, seed=0):
    """Compare the gradients of ``fn`` with central finite differences, element by element.

    ``fn(*inputs)`` must return a Tensor (any shape). It is reduced to a scalar with a fixed
    random projection ``sum(fn(*inputs) * v)`` (``v`` drawn from ``seed``), so every
    output element takes part. For each input with ``requires_grad=True`` (which must be
    float64: finite differences in float32 are too coarse to check anything), each element
    is perturbed by ``+-eps`` and the analytic gradient must satisfy
    ``|analytic - numeric| <= atol + rtol * |numeric|``.

    Returns True on success; raises `GradcheckError` naming the input, the worst element,
    both values and the tolerance otherwise.
    """
    checked = [i for i, x in enumerate(inputs) if isinstance(x, Tensor) and x.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no input has requires_grad=True")
    for i in checked:
        if inputs[i].dtype != np.float64:
            raise TypeError(f"gradcheck: input {i} must be float64; got {inputs[i].dtype}")
        data = inputs[i].data
        if not (data.flags.c_contiguous and getattr(data.flags, "writeable", True)):
            # the perturbation below writes through a flat view of the data: a transposed
            # or broadcast (read-only) array would be copied by reshape(-1) (or refuse the
            # write), and every numeric derivative would silently come out 0
            inputs[i].data = data.copy()

    out = fn(*inputs)
    if not isinstance(out, Tensor):
        raise TypeError(f"gradcheck: fn must return a Tensor; got {type(out).__name__}")
    xp = backend.get_array_module(out.data)
    v = xp.asarray(np.random.default_rng(seed).standard_normal(out.shape))

    def objective():
        with no_grad():
            return float((fn(*inputs).data * v).sum())

    for i in checked:
        inputs[i].grad = None
    (out * Tensor.from_array(v)).sum().backward()

    for i in checked:
        x = inputs[i]
        analytic = np.zeros(x.shape) if x.grad is None else x.grad.numpy()
        numeric = np.zeros(x.shape)
        flat = x.data.reshape(-1)  # a view: perturb in place, then restore
        for j in range(flat.size):
            orig = flat[j].item()
            flat[j] = orig + eps
            f_plus = objective()
            flat[j] = orig - eps
            f_minus = objective()
            flat[j] = orig
            numeric.reshape(-1)[j] = (f_plus - f_minus) / (2 * eps)
        err = np.abs(analytic - numeric) - (atol + rtol * np.abs(numeric))
        # non-finite err (a NaN/inf analytic *or* numeric gradient) is a failure too:
        # NaN > 0 is False, so testing err.max() alone would let NaNs pass
        if err.size and (not np.all(np.isfinite(err)) or err.max() > 0):
            worst = np.unravel_index(int(np.nanargmax(np.where(np.isfinite(err), err, np.inf))),
                                     x.shape)
            raise GradcheckError(
                f"gradcheck failed for input {i} (shape {x.shape}) at element {tuple(map(int, worst))}: "
                f"analytic {analytic[worst]:.10g}, numeric {numeric[worst]:.10g}, "
                f"|diff| {abs(analytic[worst] - numeric[worst]):.3g} > "
                f"atol {atol:g} + rtol {rtol:g} * |numeric|")
    return True
