"""`GradientTap`: the input and output gradient of a layer at one step, and nothing otherwise."""

from __future__ import annotations

import numpy as np

import diagnet as dn
from diagnet import nn
from diagnet.diag import reference
from diagnet.dst import GradientTap, event
from tolerances import F64_GRAD_TOL


def test_tap_captures_x_and_dy_once_and_is_free_when_disarmed():
    layer = nn.DiagLinear(10, 6, sparsity=0.5, rng=0, dtype=np.float64)
    head = nn.Linear(6, 2, rng=1, dtype=np.float64)
    tap = GradientTap({"layer": layer})
    x = dn.tensor(np.random.default_rng(0).standard_normal((2, 3, 10)))
    tap.arm()
    assert tap.armed
    h = layer(x)
    layer(x)  # a second call in the same step keeps the first
    head(h).sum().backward()
    tap.disarm()
    assert tap.ready("layer") and tap.inputs["layer"].shape == (6, 10)
    dy = np.ones((6, 2)) @ head.weight.numpy()
    np.testing.assert_allclose(tap.grads["layer"], dy, **F64_GRAD_TOL)
    np.testing.assert_allclose(tap.dense_grad("layer"), dy.T @ x.numpy().reshape(6, 10),
                               **F64_GRAD_TOL)
    np.testing.assert_allclose(tap.diagonal_scores("layer"),
                               reference.diagonal_scores(dy, x.numpy().reshape(6, 10)),
                               **F64_GRAD_TOL)
    tap.clear()
    layer(x).sum().backward()  # disarmed: nothing captured
    assert not tap.ready("layer") and not layer._forward_hooks


def test_event_makes_plain_json_values():
    e = event("mask_update", np.int64(5), layer="0", dropped=np.array([1, 2]),
              sparsity=np.float32(0.5), nested={"a": (np.int32(1),)})
    assert e == {"event": "mask_update", "step": 5, "layer": "0", "dropped": [1, 2],
                 "sparsity": 0.5, "nested": {"a": [1]}}
    assert type(e["sparsity"]) is float and type(e["dropped"][0]) is int
