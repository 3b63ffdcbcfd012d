"""`MLP`: a multilayer perceptron classifier with dense or diagonal hidden layers."""

from __future__ import annotations

import numpy as np

from diagnet.ops.activation import BiasReLU
from diagnet import nn
from diagnet import random as _random

from .common import check_linear, make_linear, positive_int, probability

__all__ = ["MLP"]

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class MLP(nn.Module):
    """Multilayer perceptron: hidden layers ``linear -> activation [-> dropout]``, dense head.

    Shapes: ``(B, in_features)`` (or ``(B, ...)`` with ``in_features`` elements per
    sample, e.g. images, flattened) ``-> features -> (B, hidden[-1]) -> head ->
    (B, num_classes)`` logits.

    Args:
        in_features: input size per sample.
        hidden: an int or a list of ints, the widths of the hidden layers.
        num_classes: number of outputs of the head.
        linear: ``"dense"`` or ``"diag"``; with ``"diag"`` every hidden layer
            (``in -> h1``, ``h1 -> h2``, ...) is an ``nn.DiagLinear`` of target ``sparsity``.
            The head ``hidden[-1] -> num_classes`` is always dense.
        sparsity: target sparsity of the diagonal layers.
        activation: ``"relu"``, ``"gelu"`` or ``"tanh"``.
        dropout: dropout probability after each activation (no Dropout layer when 0).
        bias: learn biases.
        dtype, device: of the parameters (float32; the default device).
        rng: None (default generator), int seed or Generator; the layers draw in order.

    Submodules: ``features`` (`nn.Sequential`) and ``head`` (`nn.Linear`).

    The forward walks ``features`` itself and fuses each linear layer with the ``nn.ReLU``
    that follows it (one pass over the hidden activations each way instead of several):

    * an ``nn.DiagLinear`` (or a subclass) without forward hooks applies the ReLU in its
      own kernels' pass and node (``layer(x, relu=True)``);
    * any other linear layer with a bias (a dense one, or a diagonal one with hooks, as
      dynamic sparse training adds at its mask-update steps) runs without its bias
      (``layer(x, add_bias=False)``) and `F.bias_relu` adds it in the activation's pass;
      forward hooks on it therefore see its output without the bias.

    The ``nn.ReLU`` modules after those linears, like ``features`` itself, are not called
    (their hooks do not run). ``features(x)`` called directly composes the layers as usual:
    the same values, up to the rounding of where the bias is added.
    """

    def __init__(self, in_features, hidden, num_classes, linear="dense", sparsity=0.9,
                 activation="relu", dropout=0.0, bias=True, dtype=np.float32, device=None,
                 rng=None):
        super().__init__()
        widths = [hidden] if isinstance(hidden, (int, np.integer)) else list(hidden)
        if not widths:
            raise ValueError("hidden must be an int or a non-empty list of ints")
        widths = [positive_int("hidden width", h) for h in widths]
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(_ACTIVATIONS)}; got {activation!r}")
        self.in_features = positive_int("in_features", in_features)
        check_linear(linear)
        dropout = probability("dropout", dropout)
        gen = _random.as_generator(rng)
        layers = []
        for n_in, n_out in zip([self.in_features] + widths[:-1], widths):
            layers.append(make_linear(n_in, n_out, linear, sparsity, bias, dtype, device, gen))
            layers.append(_ACTIVATIONS[activation]())
            if dropout:
                layers.append(nn.Dropout(dropout))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], positive_int("num_classes", num_classes), bias=bias,
                              dtype=dtype, device=device, rng=gen)

    def forward(self, x):
        if x.ndim < 2 or x.size != x.shape[0] * self.in_features:
            raise ValueError(f"MLP expects (B, {self.in_features}) or (B, ...) with "
                             f"{self.in_features} elements per sample; got {x.shape}")
        if x.ndim > 2:
            x = x.reshape(x.shape[0], self.in_features)
        return self.head(self._features(x))

    def _features(self, x):
        """``features(x)``, each linear layer followed by ReLU fused with it (see the class
        docstring; `F.bias_relu` with the layer's own bias: the operands fit, so its checks
        are skipped)."""
        for layer, relu in self._feature_plan():
            if relu is None:
                x = layer(x)
                continue
            if isinstance(layer, nn.DiagLinear) and not layer._forward_hooks:
                x = layer(x, relu=True)
                continue
            bias = layer.bias
            if bias is None:  # removed since the plan was made
                x = relu(layer(x))
            else:
                x = BiasReLU()(layer(x, add_bias=False), bias)
        return x

    def _feature_plan(self):
        """``[(module, relu), ...]``: the modules of ``features`` to call, with the `nn.ReLU`
        that follows a linear layer (called fused, not on its own) or None. Made again when
        the modules changed (`diagnet.dst.sparsify` replaces the linear layers after
        construction)."""
        modules = list(self.features)
        # a list compares its items by identity first: the same modules, the same plan
        if self.__dict__.get("_plan_modules") != modules:
            plan, i = [], 0
            while i < len(modules):
                following = modules[i + 1] if i + 1 < len(modules) else None
                fused = _linear_then_relu(modules[i], following)
                plan.append((modules[i], following if fused else None))
                i += 2 if fused else 1
            self.__dict__["_plan"], self.__dict__["_plan_modules"] = plan, modules
        return self.__dict__["_plan"]


def _linear_then_relu(layer, following):
    """True for a linear layer followed by an ``nn.ReLU``.

    Every linear kind the MLP or `diagnet.dst.sparsify` puts here (`nn.Linear`,
    `nn.DiagLinear` and their sparse-training subclasses) takes ``add_bias=False``.
    """
    return type(following) is nn.ReLU and isinstance(layer, (nn.Linear, nn.DiagLinear))
