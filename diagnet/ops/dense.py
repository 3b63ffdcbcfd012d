"""The dense linear map ``y = x @ W.T + b`` as one differentiable op.

One node instead of three (transpose, matmul, add): a layer that runs every step should cost
the engine one function application, and the backward needs only two matrix products:

* input gradient:  ``dx = dy @ W``
* weight gradient: ``dW = dy.T @ x`` (leading dims of ``x`` flattened into the batch)
* bias gradient:   ``db = dy.sum(0)`` (`sum_rows`: one BLAS matrix-vector product)
"""

from __future__ import annotations

from ..autograd import Function, Tensor, sum_rows

__all__ = ["linear"]


class LinearFunction(Function):
    """``y = x @ W.T (+ b)``; inputs ``(x, weight[, bias])``, ``x`` of shape ``(..., n)``."""

    def forward(self, x, w, b=None):
        x2 = x.reshape(-1, x.shape[-1])
        y = x2 @ w.T
        if b is not None:
            y += b  # y is a fresh array from the matmul
        self.save(x2, w)
        self.x_shape = x.shape
        return y.reshape(tuple(x.shape[:-1]) + (w.shape[0],))

    def backward(self, gy):
        x2, w = self.saved
        gy2 = gy.reshape(-1, w.shape[0])
        needs = self.needs_input_grad
        gx = (gy2 @ w).reshape(self.x_shape) if needs[0] else None
        gw = gy2.T @ x2 if needs[1] else None
        if len(needs) == 2:
            return gx, gw
        return gx, gw, (sum_rows(gy2) if needs[2] else None)


def linear(x, weight, bias=None):
    """``x @ weight.T + bias``, PyTorch's ``F.linear``.

    Args:
        x: Tensor ``(..., in_features)``, float32 or float64.
        weight: Tensor ``(out_features, in_features)``, same dtype.
        bias: Tensor ``(out_features,)`` or None.

    Returns:
        Tensor ``(..., out_features)``.

    Raises:
        ValueError: the shapes do not fit (names the argument, the expected and the given).
    """
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"linear: {name} must be a Tensor; got {type(t).__name__}")
    if weight.ndim != 2:
        raise ValueError(f"linear: weight must be 2-D (out_features, in_features); got shape "
                         f"{weight.shape}")
    if x.ndim < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: x's last dim must be in_features={weight.shape[1]}; got x of "
                         f"shape {x.shape}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"linear: bias must have shape ({weight.shape[0]},); got {bias.shape}")
    inputs = (x, weight) if bias is None else (x, weight, bias)
    return LinearFunction()(*inputs)
