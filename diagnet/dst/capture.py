"""Gradient taps: the inputs and output gradients of chosen layers at one training step.

Regrowth by gradient (RigL, and DynaDiag's swap) needs, for a layer ``y = x @ W.T``, the
dense gradient ``dW = dy.T @ x`` or its per-diagonal norms (`F.diagonal_scores`). Neither
is computed on ordinary steps: the diagonal kernels only form the gradient of the *stored*
entries. A `GradientTap` arms a one-shot forward hook on each layer; on the next forward it
keeps the layer's input ``x`` and wraps the output in an identity op whose backward keeps
``dy``. After ``loss.backward()`` the pair is available, and the tap is disarmed again, so
ordinary steps pay nothing.
"""

from __future__ import annotations

from ..autograd import Function, Tensor
from ..ops.diagonal import diagonal_scores

__all__ = ["GradientTap"]


class _TapGrad(Function):
    """Identity in forward; hands the incoming gradient to ``sink`` in backward."""

    def __init__(self, sink):
        self.sink = sink

    def forward(self, y):
        return y

    def backward(self, gy):
        self.sink(gy)
        return gy


class GradientTap:
    """Capture ``x`` ``(B, n)`` and ``dy`` ``(B, m)`` of each layer at the next step.

    Args:
        layers: mapping name -> layer with ``in_features`` / ``out_features`` whose forward
            takes ``x`` ``(..., n)`` as its first argument (`Linear`, `DiagLinear`, ...).

    Use: ``tap.arm()`` before the forward of an update step, run forward and backward, then
    read ``tap.inputs[name]`` / ``tap.grads[name]`` (backend arrays, leading dims
    flattened), or ``tap.diagonal_scores(name)`` / ``tap.dense_grad(name)``; ``tap.clear()``
    drops them. A layer called several times in one step keeps its first call.
    """

    def __init__(self, layers):
        self.layers = dict(layers)
        self.inputs, self.grads = {}, {}
        self._handles = []

    def arm(self):
        """Install one-shot hooks on every layer (idempotent)."""
        self.disarm()
        self.clear()
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_hook(self._hook(name)))

    def disarm(self):
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def _hook(self, name):
        def hook(layer, inputs, out):
            if name in self.inputs or not isinstance(out, Tensor):
                return None
            x = inputs[0].data
            self.inputs[name] = x.reshape(-1, x.shape[-1])

            def sink(gy):
                self.grads[name] = gy.reshape(-1, gy.shape[-1])
            return _TapGrad(sink)(out)
        return hook

    def clear(self):
        self.inputs, self.grads = {}, {}

    def ready(self, name) -> bool:
        """True when both ``x`` and ``dy`` of ``name`` were captured."""
        return name in self.inputs and name in self.grads

    def diagonal_scores(self, name):
        """``(P,)`` backend array: the norm of ``dy.T @ x`` on every wrap-around diagonal."""
        layer = self.layers[name]
        return diagonal_scores(self.inputs[name], self.grads[name], layer.out_features)

    def dense_grad(self, name):
        """``(m, n)`` backend array ``dy.T @ x``: the gradient of a dense weight (regrowth only)."""
        return self.grads[name].T @ self.inputs[name]
