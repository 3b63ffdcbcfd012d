"""Device selection and the NumPy/CuPy backend.

The CPU tests hold on any machine: those about a missing CuPy simulate it (``cupy`` set to
``None`` in ``sys.modules``, which makes ``import cupy`` raise ImportError), so they also
pass where CuPy is installed. The GPU tests at the end (marked ``gpu``) run only where CUDA is
available: with CuPy and a device, or with the CuPy stand-in (``pytest --fake-cupy``).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import scipy.special as sp

import diagnet
from diagnet import backend, settings
from diagnet import functional as F
from helpers import t64
from tolerances import GRADCHECK_TOL

@pytest.fixture
def no_env_device(monkeypatch):
    monkeypatch.delenv(backend.ENV_DEVICE, raising=False)
    settings.set_device(None)  # (conftest restores the settings after the test)


@pytest.fixture
def without_cupy(monkeypatch, no_env_device):
    """Behave as on a machine where CuPy is not installed."""
    monkeypatch.setitem(sys.modules, "cupy", None)
    backend._cupy_probe.cache_clear()
    yield
    monkeypatch.undo()
    backend._cupy_probe.cache_clear()


# ----------------------------------------------------------------------------- device choice

def test_default_device_on_this_machine(no_env_device):
    expected = "cuda" if diagnet.cuda_available() else "cpu"
    assert diagnet.default_device() == expected
    assert diagnet.tensor([1.0]).device == expected


def test_default_device_is_cpu_without_cupy(without_cupy):
    assert not diagnet.cuda_available()
    assert diagnet.default_device() == "cpu"
    assert diagnet.tensor([1.0]).device == "cpu"
    assert "CuPy is not installed" in backend.cuda_unavailable_reason()


def test_env_cpu_is_respected(monkeypatch):
    monkeypatch.setenv(backend.ENV_DEVICE, "cpu")
    settings.read_environment()  # as at import
    assert diagnet.default_device() == "cpu"
    x = diagnet.tensor([1.0, 2.0])
    assert x.device == "cpu" and isinstance(x.data, np.ndarray)
    monkeypatch.setenv(backend.ENV_DEVICE, " CPU ")  # case and spaces are forgiven
    settings.read_environment()
    assert diagnet.default_device() == "cpu"


def test_env_cuda_without_cupy_raises_with_the_reason(without_cupy, monkeypatch):
    monkeypatch.setenv(backend.ENV_DEVICE, "cuda")
    settings.read_environment()  # as at import
    with pytest.raises(RuntimeError, match="device 'cuda' was requested but is not available: "
                                           "CuPy is not installed"):
        diagnet.default_device()
    with pytest.raises(RuntimeError, match="CuPy is not installed"):
        diagnet.tensor([1.0])


def test_explicit_cuda_without_cupy_raises_with_the_reason(without_cupy):
    with pytest.raises(RuntimeError, match="CuPy is not installed"):
        diagnet.tensor([1.0], device="cuda")
    x = diagnet.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(RuntimeError, match="CuPy is not installed"):
        x.to("cuda")
    with pytest.raises(RuntimeError, match="CuPy is not installed"):
        x.cuda()
    with pytest.raises(RuntimeError, match="CuPy is not installed"):
        F.to_device(x, "cuda:0")


@pytest.mark.skipif(diagnet.cuda_available(), reason="CUDA is available here")
def test_cuda_unavailable_here_raises_runtime_error_naming_why(no_env_device):
    reason = backend.cuda_unavailable_reason()
    assert reason  # a non-empty explanation
    with pytest.raises(RuntimeError, match="not available") as info:
        diagnet.tensor([1.0]).to("cuda")
    assert reason in str(info.value)


@pytest.mark.parametrize("name", ["tpu", "cuda1", "", "mps"])
def test_invalid_device_name_raises_value_error_naming_it(name, monkeypatch, no_env_device):
    with pytest.raises(ValueError, match=f"one of \\('cpu', 'cuda'\\); got '{name}'"):
        diagnet.tensor([1.0], device=name)
    with pytest.raises(ValueError, match=f"got '{name}'"):
        diagnet.tensor([1.0]).to(name)
    if name:  # an empty variable counts as unset
        monkeypatch.setenv(backend.ENV_DEVICE, name)
        with pytest.raises(ValueError, match=f"got '{name}'"):
            settings.read_environment()  # as at import


def test_device_must_be_a_string():
    with pytest.raises(TypeError, match="device must be a str.*got int"):
        diagnet.tensor([1.0], device=0)


def test_check_device_normalises_names():
    assert backend.check_device("CPU") == "cpu"
    assert backend.check_device("cuda:0") == "cuda"
    assert backend.check_device("gpu") == "cuda"
    assert backend.check_device("cuda") == "cuda"


# ----------------------------------------------------------------------------- array modules

def test_get_array_module_on_the_cpu():
    a = np.zeros(3)
    assert diagnet.get_array_module(a) is np
    assert diagnet.get_array_module(diagnet.tensor(a)) is np
    assert diagnet.get_array_module(a, diagnet.tensor([1.0]), 3.0, [1, 2]) is np
    assert diagnet.get_array_module() is np


def test_get_array_module_without_cupy(without_cupy):
    assert diagnet.get_array_module(np.zeros(2), diagnet.tensor([1.0])) is np


def test_cpu_helpers():
    a = np.arange(3.0)
    assert backend.device_of(a) == "cpu" and backend.device_of(1.0) == "cpu"
    assert backend.to_device(a, "cpu") is a
    assert backend.to_numpy(a) is a
    assert backend.xp_for("cpu") is np
    backend.synchronize("cpu")  # no-op
    x = np.linspace(-3, 3, 13)
    np.testing.assert_allclose(backend.erf(x), sp.erf(x), rtol=1e-15)


def test_cuda_available_agrees_with_the_reason():
    assert isinstance(diagnet.cuda_available(), bool)
    assert diagnet.cuda_available() == (backend.cuda_unavailable_reason() == "")


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
def test_gpu_default_device_and_array_module(no_env_device):
    import cupy

    assert diagnet.default_device() == "cuda"
    x = diagnet.tensor([1.0, 2.0])
    assert x.device == "cuda" and isinstance(x.data, cupy.ndarray)
    assert diagnet.get_array_module(x) is cupy and diagnet.get_array_module(x.data) is cupy
    assert diagnet.get_array_module(np.zeros(1), x) is cupy


@pytest.mark.gpu
def test_gpu_env_cpu_overrides(monkeypatch):
    monkeypatch.setenv(backend.ENV_DEVICE, "cpu")
    settings.read_environment()  # as at import
    assert diagnet.tensor([1.0]).device == "cpu"
    assert diagnet.tensor([1.0], device="cuda").device == "cuda"


@pytest.mark.gpu
def test_gpu_to_device_round_trip_is_differentiable():
    x = t64([1.0, -2.0, 3.0], device="cpu")
    y = x.to("cuda")
    assert y.device == "cuda" and y.requires_grad
    z = (y * y).to("cpu")
    assert z.device == "cpu"
    z.sum().backward()
    assert x.grad.device == "cpu"
    np.testing.assert_allclose(x.grad.numpy(), 2 * x.numpy(), rtol=1e-15)


@pytest.mark.gpu
def test_gpu_ops_match_cpu_and_gradcheck():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((4, 2))
    labels = np.array([0, 1, 0])

    def model(p, q):
        return F.cross_entropy(F.gelu(p @ q) * 2.0, labels, label_smoothing=0.1)

    # explicit devices: in a gpu test the default device is cuda
    cpu = [t64(a, device="cpu"), t64(b, device="cpu")]
    gpu = [c.detach().to("cuda").requires_grad_() for c in cpu]
    lc, lg = model(*cpu), model(*gpu)
    np.testing.assert_allclose(lg.item(), lc.item(), rtol=1e-12)
    lc.backward()
    lg.backward()
    for c, g in zip(cpu, gpu):
        assert g.grad.device == "cuda"
        np.testing.assert_allclose(g.grad.numpy(), c.grad.numpy(), rtol=1e-10, atol=1e-12)
    assert diagnet.gradcheck(model, *gpu, **GRADCHECK_TOL)


@pytest.mark.gpu
def test_gpu_mixed_devices_raise():
    with pytest.raises(ValueError, match="different devices"):
        diagnet.tensor([1.0], device="cuda") + diagnet.tensor([1.0], device="cpu")


@pytest.mark.parametrize("name, expected", [
    ("cuda:1", "diagnet uses one GPU.*'cuda' or 'cuda:0'.*CUDA_VISIBLE_DEVICES=1.*got 'cuda:1'"),
    ("cuda:12", "CUDA_VISIBLE_DEVICES=12.*got 'cuda:12'"),
    ("cuda:x", "one of \\('cpu', 'cuda'\\).*got 'cuda:x'"),
    ("cuda:", "got 'cuda:'"),
])
def test_a_gpu_index_other_than_0_is_refused_not_ignored(name, expected):
    with pytest.raises(ValueError, match=expected):
        backend.check_device(name)
    with pytest.raises(ValueError, match=expected):
        backend.resolve_device(name)


def test_unwrap_takes_only_a_tensor_s_array_not_any_data_attribute():
    # a SciPy sparse matrix has an array ``.data`` too (its stored values): unwrapping it
    # would silently hand on the wrong array, e.g. offsets [1] for the matrix [[0, 1]]
    import scipy.sparse

    import diagnet as dn
    from diagnet import nn

    matrix = scipy.sparse.csr_matrix(np.array([[0, 1]]))
    assert backend.unwrap(matrix) is matrix
    t = dn.tensor([1.0, 2.0])
    assert backend.unwrap(t) is t.data
    with pytest.raises((TypeError, ValueError)):
        nn.DiagLinear(3, 3, offsets=matrix)
