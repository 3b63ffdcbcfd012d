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


def test_fold_keeps_a_part_per_micro_batch_and_set_dense_replaces_the_capture():
    """Micro-batches: `fold` keeps each micro-batch's ``dy.T @ x`` and captures again;
    `set_dense` gives the step's gradient, from which the scores come."""
    layer = nn.DiagLinear(10, 6, sparsity=0.5, rng=0, dtype=np.float64)
    tap = GradientTap({"layer": layer})
    x = np.random.default_rng(0).standard_normal((6, 10))
    tap.arm()
    for slot, rows in ((3, slice(0, 4)), (4, slice(4, 6))):
        (layer(dn.tensor(x[rows])) ** 2).sum().backward()
        assert tap.ready("layer")
        tap.fold(slot)
        assert not tap.ready("layer") and tap.armed  # forgotten, and capturing again
    parts = tap.parts["layer"]
    assert sorted(parts) == [3, 4]
    for slot, rows in ((3, slice(0, 4)), (4, slice(4, 6))):
        dy = 2 * (x[rows] @ layer.to_dense().numpy().T + layer.bias.numpy())
        np.testing.assert_allclose(parts[slot], dy.T @ x[rows], **F64_GRAD_TOL)
    total = parts[3] + parts[4]
    tap.set_dense("layer", total)
    assert tap.ready("layer") and tap.dense_grad("layer") is total
    np.testing.assert_array_equal(tap.diagonal_scores("layer"),
                                  dn.functional.diagonal_norms(total))
    with np.testing.assert_raises_regex(ValueError, r"shape \(6, 10\)"):
        tap.set_dense("layer", total.T)
    tap.disarm()
    tap.clear()
    assert not tap.ready("layer") and tap.parts == {}
