"""The GPU hot path never waits for the GPU: no device-to-host reads in a training step.

A read back to the host (``.get()``, ``bool()`` or ``int()`` of a device value, ``.item()``)
makes the host wait until the GPU has finished everything queued so far, which serialises
the host's Python work with the GPU's kernels. The CuPy stand-in counts those reads
(``cupy.host_transfers``); real CuPy does not, so on a real GPU these tests skip.
"""

from __future__ import annotations

import numpy as np
import pytest

import diagnet as dn
import diagnet.functional as F
from diagnet import backend
from diagnet.ops.diagonal import DiagLinearFunction

pytestmark = pytest.mark.gpu


@pytest.fixture
def cp():
    cp = backend.cupy_or_none()
    if not hasattr(cp, "host_transfers"):
        pytest.skip("counting host transfers needs the CuPy stand-in (--fake-cupy)")
    return cp


def _problem(m=12, n=20, B=8, K=5):
    rng = np.random.default_rng(0)
    W = dn.DiagMatrix.random((m, n), k=K, rng=0, dtype=np.float32, device="cuda")
    x = dn.tensor(rng.standard_normal((B, n)).astype(np.float32), device="cuda")
    labels = dn.tensor(rng.integers(0, m, B), device="cuda")
    return W, x, labels


def test_a_training_step_reads_nothing_back_from_the_gpu(cp):
    W, x, labels = _problem()
    m, n = W.shape
    values = dn.tensor(W.values, requires_grad=True)
    bias = dn.tensor(np.zeros(m, np.float32), device="cuda", requires_grad=True)
    before = cp.host_transfers
    # offsets were validated once, when W was built: the layer's hot path calls the Function
    h = DiagLinearFunction(W.offsets, (m, n))(x, values, bias)
    h = F.dropout(F.relu(h), 0.2, rng=1)       # mask drawn on the device
    loss = F.cross_entropy(h, labels)           # device labels: no host range check
    loss.backward()
    with dn.no_grad():
        values.data -= 0.1 * values.grad.data
        bias.data -= 0.1 * bias.grad.data
    assert cp.host_transfers == before, "a device-to-host read in the training step"


def test_diag_linear_validates_device_offsets_with_one_read(cp):
    """The functional form checks its offsets on every call: one read for device offsets,
    none for offsets given as a Python sequence (checked on the host, then uploaded)."""
    W, x, _ = _problem()
    values = dn.tensor(W.values)
    before = cp.host_transfers
    F.diag_linear(x, W.offsets, values, W.shape)
    assert cp.host_transfers - before == 1
    host_offsets = W.to("cpu").offsets.tolist()
    before = cp.host_transfers
    F.diag_linear(x, host_offsets, values, W.shape)
    assert cp.host_transfers == before


def test_offsets_are_converted_once_per_product(monkeypatch):
    """The three kernels of one forward + backward share one int32 copy of the offsets."""
    from diagnet.diag import cuda

    W, x, _ = _problem()
    seen = []
    for name in ("forward", "input_grad", "value_grad"):
        real = getattr(cuda, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            offsets = args[2] if _name == "value_grad" else args[1]
            seen.append((_name, offsets))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cuda, name, spy)
    x.requires_grad_()
    values = dn.tensor(W.values, requires_grad=True)
    assert W.offsets.dtype == np.int64
    DiagLinearFunction(W.offsets, W.shape)(x, values).sum().backward()
    assert [name for name, _ in seen] == ["forward", "input_grad", "value_grad"]
    first = seen[0][1]
    assert first.dtype == np.int32 and all(offsets is first for _, offsets in seen)


def test_a_module_training_step_with_adam_reads_nothing_back(cp):
    """The same through the public layers: `nn.DiagLinear` validated its offsets when they
    were set, so forward, backward, clipping and the Adam update never wait for the GPU."""
    from diagnet import nn, optim

    model = nn.Sequential(nn.DiagLinear(20, 16, sparsity=0.75, rng=0, device="cuda"), nn.ReLU(),
                          nn.Dropout(0.1, rng=1), nn.Linear(16, 4, rng=2, device="cuda"))
    opt = optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    x = dn.tensor(rng.standard_normal((8, 20)).astype(np.float32), device="cuda")
    labels = dn.tensor(rng.integers(0, 4, 8), device="cuda")
    F.cross_entropy(model(x), labels).backward()  # first call prepares the kernel offsets
    opt.step()
    before = cp.host_transfers
    for _ in range(2):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), labels)
        loss.backward()
        optim.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    assert cp.host_transfers == before, "a device-to-host read in the training step"
