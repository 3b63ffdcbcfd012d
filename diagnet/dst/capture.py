"""Gradient taps: the inputs and output gradients of chosen layers at one training step.

Regrowth by gradient (RigL, and DynaDiag's swap) needs, for a layer ``y = x @ W.T``, the
dense gradient ``dW = dy.T @ x`` or its per-diagonal norms (`F.diagonal_scores`). Neither
is computed on ordinary steps: the diagonal kernels only form the gradient of the *stored*
entries. A `GradientTap` arms a one-shot forward hook on each layer; on the next forward it
keeps the layer's input ``x`` and wraps the output in an identity op whose backward keeps
``dy``. After ``loss.backward()`` the pair is available, and the tap is disarmed again, so
ordinary steps pay nothing.

Data-parallel training gives the tap a *reducer*: a score is a norm over a diagonal of
``dy.T @ x``, and a norm of a sum is not a sum of norms, so each process forms its dense
gradient, the reducer sums them across processes, and the scores are taken from the sum.
Every process then sees the same scores and makes the same decision.

Micro-batches (the `Trainer`'s exact mode, `diagnet.train.microbatch`) run several forwards
and backwards per step. After each one, `GradientTap.fold` keeps ``dy.T @ x`` of every
captured layer as that micro-batch's part and forgets ``x`` and ``dy``, so the next forward
captures again; the trainer then sums the parts in one fixed order and hands the sum back
with `GradientTap.set_dense`, from which the scores are taken.
"""

from __future__ import annotations

from .. import backend
from ..autograd import Function, Tensor
from ..ops.diagonal import diagonal_norms, diagonal_scores

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

    ``reducer`` (attribute, None by default): a callable ``reducer(dense) -> array`` that
    `diagonal_scores` and `dense_grad` pass the dense ``(m, n)`` gradient ``dy.T @ x``
    through before using it (data parallel: its sum across processes). It may work in
    place and must return an ``(m, n)`` array. Each call of `diagonal_scores` or
    `dense_grad` forms and reduces the gradient anew: call one of them once per layer and
    step (under data parallelism every process must make the same calls).
    """

    def __init__(self, layers):
        self.layers = dict(layers)
        self.inputs, self.grads = {}, {}
        self.parts = {}   # name -> {micro-batch slot: dy.T @ x}, filled by fold()
        self._given = {}  # name -> the step's dense gradient, set by set_dense()
        self._handles = []
        self._reducer = None

    @property
    def reducer(self):
        """None, or the callable the dense gradient goes through (see the class doc)."""
        return self._reducer

    @reducer.setter
    def reducer(self, fn):
        if fn is not None and not callable(fn):
            raise TypeError(f"reducer must be None or a callable reducer(dense) -> array; "
                            f"got {type(fn).__name__}")
        self._reducer = fn

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
        """Forget everything captured, folded or set (the hooks stay as they are)."""
        self.inputs, self.grads, self.parts, self._given = {}, {}, {}, {}

    def fold(self, slot):
        """Keep ``dy.T @ x`` of every layer captured since the last fold as the part of
        micro-batch ``slot`` (an int >= 0) in `parts`, and forget ``x`` and ``dy``: the next
        forward captures again. Layers not captured get no part."""
        for name in list(self.inputs):
            if name in self.grads:
                self.parts.setdefault(name, {})[slot] = self.grads[name].T @ self.inputs[name]
        self.inputs, self.grads = {}, {}

    def set_dense(self, name, dense):
        """Make ``dense`` ``(m, n)`` (a backend array) the step's gradient ``dy.T @ x`` of
        layer ``name``: `dense_grad` returns it and `diagonal_scores` takes its norms,
        without the reducer (it is the whole batch's already). Cleared by `clear`."""
        layer = self.layers[name]
        shape = (layer.out_features, layer.in_features)
        if not backend.is_array(dense) or dense.shape != shape:
            raise ValueError(f"set_dense: the gradient of layer {name!r} must be an array of "
                             f"shape {shape}; got {getattr(dense, 'shape', type(dense).__name__)}")
        self._given[name] = dense

    def ready(self, name) -> bool:
        """True when the step's gradient of ``name`` is known: ``x`` and ``dy`` captured,
        or a dense gradient set."""
        return name in self._given or (name in self.inputs and name in self.grads)

    def diagonal_scores(self, name):
        """``(P,)`` backend array: the norm of ``dy.T @ x`` on every wrap-around diagonal
        (of the reduced ``dy.T @ x`` when a reducer is set, of the one given to
        `set_dense` when there is one)."""
        if name in self._given:
            return diagonal_norms(self._given[name])
        if self._reducer is None:
            layer = self.layers[name]
            return diagonal_scores(self.inputs[name], self.grads[name], layer.out_features)
        return diagonal_norms(self.dense_grad(name))

    def dense_grad(self, name):
        """``(m, n)`` backend array ``dy.T @ x``: the gradient of a dense weight (regrowth
        only), passed through the reducer when one is set; the one given to `set_dense`
        when there is one."""
        if name in self._given:
            return self._given[name]
        dense = self.grads[name].T @ self.inputs[name]
        if self._reducer is None:
            return dense
        shape = dense.shape
        reduced = self._reducer(dense)
        if not backend.is_array(reduced) or reduced.shape != shape:
            got = (f"{type(reduced).__name__} of shape {tuple(reduced.shape)}"
                   if backend.is_array(reduced) else type(reduced).__name__)
            raise ValueError(f"reducer must return an array of shape {shape} (the dense "
                             f"gradient of layer {name!r}); got {got}")
        return reduced
