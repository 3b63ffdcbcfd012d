"""The PyTorch export recipe of ``docs/export.md``, run as written, against diagnet's outputs.

The recipe's code is read from the document and executed, so the documentation cannot go
stale. Skipped without PyTorch (not a dependency of diagnet). Tolerances: float64 models
agree to 1e-12 (the same products summed in another order); float32 ones to rtol 1e-5,
atol 1e-6 on outputs of order 1.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import diagnet as dn
from diagnet import nn
from diagnet.dst import sparsify
from diagnet.dst.dynadiag import DynaDiagLinear
from diagnet.models import MLP

torch = pytest.importorskip("torch")

DOC = Path(__file__).resolve().parents[2] / "docs" / "export.md"
TOL = {np.float64: dict(rtol=1e-12, atol=1e-12), np.float32: dict(rtol=1e-5, atol=1e-6)}


def _blocks():
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def recipe():
    """The names defined by the document's first code block (the recipe)."""
    namespace = {}
    exec(compile(_blocks()[0], str(DOC), "exec"), namespace)  # noqa: S102 - our own docs
    return namespace


def _inputs(shape, dtype, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _compare(model, torch_model, x, dtype):
    model.eval()
    want = model(dn.tensor(x)).numpy()
    with torch.no_grad():
        got = torch_model.eval()(torch.from_numpy(x)).numpy()
    assert got.dtype == want.dtype == dtype
    np.testing.assert_allclose(got, want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("dense", [False, True])
def test_exported_mlp_matches_diagnet(recipe, dtype, dense):
    # 20 -> 32 tall, 32 -> 32 square, 32 -> 12 wide; the head is dense
    model = MLP(20, [32, 32, 12], 5, linear="diag", sparsity=0.7, activation="gelu",
                dropout=0.1, dtype=dtype, rng=0)
    torch_model = recipe["to_torch"](model, dense=dense)
    kinds = {type(m).__name__ for m in torch_model.modules()}
    assert ("Linear" if dense else "TorchDiagLinear") in kinds
    _compare(model, torch_model, _inputs((8, 4, 5), dtype), dtype)


@pytest.mark.parametrize("n, m", [(7, 12), (12, 7), (9, 9), (1, 6), (6, 1), (5, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_every_shape_and_k_including_zero(recipe, n, m, bias):
    P = max(m, n)
    for K in sorted({0, 1, P // 2, P}):
        offsets = np.sort(np.random.default_rng(K).choice(P, size=K, replace=False))
        layer = nn.DiagLinear(n, m, offsets=offsets, bias=bias, dtype=np.float64, rng=K)
        _compare(layer, recipe["TorchDiagLinear"](layer), _inputs((3, 2, n), np.float64),
                 np.float64)


def test_values_gradient_in_torch_equals_diagnets(recipe):
    """Training can go on in PyTorch: the same loss gives the same gradient of values."""
    for n, m in [(12, 7), (7, 12), (9, 9)]:
        layer = nn.DiagLinear(n, m, sparsity=0.5, dtype=np.float64, rng=1)
        torch_layer = recipe["TorchDiagLinear"](layer)
        x = _inputs((4, n), np.float64, seed=2)
        (layer(dn.tensor(x)) ** 2).sum().backward()
        (torch_layer(torch.from_numpy(x)) ** 2).sum().backward()
        np.testing.assert_allclose(torch_layer.values.grad.numpy(), layer.values.grad.numpy(),
                                   rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(torch_layer.bias.grad.numpy(), layer.bias.grad.numpy(),
                                   rtol=1e-12, atol=1e-12)


def test_dynadiag_exports_once_frozen(recipe):
    model = MLP(20, [24, 16], 5, rng=0)
    sparsify(model, "dynadiag", sparsity=0.8, dense=("head",), rng=0)
    layers = [m for m in model.modules() if isinstance(m, DynaDiagLinear)]
    assert len(layers) == 2
    with pytest.raises(ValueError, match="freeze"):
        recipe["to_torch"](model)
    rng = np.random.default_rng(3)
    for layer in layers:  # a selection that differs from the initial one
        layer.alpha.data[...] = rng.standard_normal(layer.P).astype(np.float32)
        layer.freeze()
    _compare(model, recipe["to_torch"](model), _inputs((6, 20), np.float32), np.float32)


def test_unknown_modules_are_refused_by_name(recipe):
    from diagnet.dst.masked import MaskedLinear

    with pytest.raises(TypeError, match="no PyTorch counterpart for MaskedLinear"):
        recipe["to_torch"](MaskedLinear(4, 4, density=0.5, rng=0))


def test_usage_example_runs(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = dict(recipe)
    exec(compile(_blocks()[1], str(DOC), "exec"), namespace)  # noqa: S102 - our own docs
    state = torch.load(tmp_path / "mlp-diag.pt")
    assert {"values", "offsets"} <= {k.rsplit(".", 1)[1] for k in state}
