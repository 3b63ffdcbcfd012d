"""Sharing memory with other array libraries: NumPy's ``__array__`` protocol, DLPack
(``__dlpack__``, ``__dlpack_device__``, `diagnet.from_dlpack`) and PyTorch.

The PyTorch tests are skipped where torch is not installed (CI); the CUDA ones run through
the CuPy stand-in (``--fake-cupy``) or on a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest

import diagnet
from helpers import t64


# ----------------------------------------------------------------------------- __array__

def test_asarray_shares_the_memory_of_a_cpu_tensor():
    t = diagnet.tensor([[1.0, 2.0], [3.0, 4.0]])
    a = np.asarray(t)
    assert type(a) is np.ndarray and a.dtype == np.float32 and a.shape == (2, 2)
    assert np.shares_memory(a, t.data)
    np.testing.assert_array_equal(a, [[1.0, 2.0], [3.0, 4.0]])


def test_array_protocol_copy_and_dtype_keywords():
    t = diagnet.tensor([1.0, 2.0])
    assert not np.shares_memory(np.array(t), t.data)           # np.array copies by default
    assert not np.shares_memory(np.asarray(t, copy=True), t.data)
    assert np.shares_memory(np.asarray(t, copy=False), t.data)
    a = np.asarray(t, dtype=np.float64)
    assert a.dtype == np.float64 and a.tolist() == [1.0, 2.0]
    with pytest.raises(ValueError):
        np.asarray(t, dtype=np.float64, copy=False)


def test_a_tensor_that_requires_grad_gives_numpy_a_copy_like_numpy():
    w = t64([1.0, 2.0])
    a = np.asarray(w)
    assert not np.shares_memory(a, w.data)
    a[0] = 100.0
    assert w.tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="requires grad shares no memory with NumPy"):
        np.asarray(w, copy=False)
    assert np.shares_memory(np.asarray(w.detach()), w.data)


def test_sequences_of_tensors_and_0d_tensors_convert_to_numbers():
    parts = [diagnet.tensor([1.0, 2.0]), diagnet.tensor([3.0, 4.0])]
    a = np.asarray(parts)
    assert a.dtype == np.float32 and a.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    s = diagnet.tensor([1.0, 2.0]).sum()
    assert np.asarray(s).shape == () and float(np.asarray(s)) == 3.0
    assert diagnet.tensor(parts).shape == (2, 2)


# ----------------------------------------------------------------------------- DLPack, NumPy

def test_numpy_from_dlpack_shares_the_memory():
    t = diagnet.tensor(np.arange(6.0).reshape(2, 3), dtype="float64")
    assert t.__dlpack_device__() == (1, 0)
    a = np.from_dlpack(t)
    assert a.shape == (2, 3) and a.dtype == np.float64 and np.shares_memory(a, t.data)


def test_a_tensor_that_requires_grad_is_exported_as_a_copy():
    w = t64([1.0, 2.0])
    a = np.from_dlpack(w)
    assert a.tolist() == [1.0, 2.0] and not np.shares_memory(a, w.data)
    with pytest.raises(BufferError, match="requires grad is exported as a copy"):
        w.__dlpack__(copy=False)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.uint8, np.bool_])
def test_from_dlpack_imports_numpy_arrays_without_a_copy(dtype):
    a = np.arange(6).reshape(3, 2).astype(dtype)
    t = diagnet.from_dlpack(a)
    assert isinstance(t, diagnet.Tensor) and t.dtype == dtype and t.shape == (3, 2)
    assert np.shares_memory(t.data, a)
    assert t.is_leaf and not t.requires_grad and t.device == "cpu"


def test_from_dlpack_round_trip_and_non_contiguous_views():
    a = np.arange(12.0).reshape(3, 4)[:, ::2]
    t = diagnet.from_dlpack(a)
    np.testing.assert_array_equal(t.numpy(), a)
    assert np.shares_memory(t.data, a)
    u = diagnet.from_dlpack(t)
    assert np.shares_memory(u.data, a)
    # changing the imported tensor in place is seen by the array
    u[0, 0] = -1.0
    assert a[0, 0] == -1.0


def test_from_dlpack_refuses_unsupported_dtypes_and_non_arrays():
    with pytest.raises(TypeError, match="from_dlpack: dtype must be float32, float64.*got float16"):
        diagnet.from_dlpack(np.zeros(3, dtype=np.float16))
    with pytest.raises(TypeError, match="from_dlpack: expected an array with the DLPack "
                                        "protocol.*got list"):
        diagnet.from_dlpack([1.0, 2.0])


def test_from_dlpack_refuses_memory_on_another_kind_of_device():
    class OnRocm:
        def __dlpack__(self, **kwargs):
            raise AssertionError("not to be called")

        def __dlpack_device__(self):
            return (10, 0)  # kDLROCM

    with pytest.raises(ValueError, match="DLPack device type 10"):
        diagnet.from_dlpack(OnRocm())


def test_from_dlpack_is_exported_from_the_package_root():
    assert diagnet.from_dlpack is diagnet.autograd.from_dlpack


# ----------------------------------------------------------------------------- CUDA (stand-in)

@pytest.mark.gpu
def test_asarray_of_a_cuda_tensor_says_how_to_copy():
    t = diagnet.tensor([1.0, 2.0], device="cuda")
    with pytest.raises(TypeError, match=r"call \.numpy\(\) .* or \.to\('cpu'\)"):
        np.asarray(t)
    assert t.numpy().tolist() == [1.0, 2.0]


@pytest.mark.gpu
def test_from_dlpack_imports_cupy_arrays_without_a_copy():
    cp = diagnet.backend.cupy_or_none()
    a = cp.arange(6, dtype=cp.float32).reshape(2, 3)
    t = diagnet.from_dlpack(a)
    assert t.device == "cuda" and t.dtype == np.float32 and t.shape == (2, 3)
    t[0, 0] = 7.0  # the same memory
    assert float(a[0, 0]) == 7.0
    assert t.__dlpack_device__()[0] == 2
    u = diagnet.from_dlpack(t)
    assert u.device == "cuda"
    u[1, 2] = -1.0
    assert float(a[1, 2]) == -1.0


# ----------------------------------------------------------------------------- PyTorch

def test_torch_from_dlpack_shares_the_memory():
    torch = pytest.importorskip("torch")
    t = diagnet.tensor(np.arange(6.0).reshape(2, 3), dtype="float64")
    pt = torch.from_dlpack(t)
    assert pt.dtype == torch.float64 and tuple(pt.shape) == (2, 3)
    pt[0, 0] = 42.0
    assert t.data[0, 0] == 42.0


def test_from_dlpack_imports_torch_tensors_without_a_copy():
    torch = pytest.importorskip("torch")
    pt = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    t = diagnet.from_dlpack(pt)
    assert t.dtype == np.float32 and t.shape == (3, 2)
    t[0, 1] = -5.0
    assert pt[0, 1].item() == -5.0
    with pytest.raises(TypeError, match="got float16"):
        diagnet.from_dlpack(torch.zeros(2, dtype=torch.float16))


def test_torch_as_tensor_reads_a_tensor():
    torch = pytest.importorskip("torch")
    t = diagnet.tensor([[1.0, 2.0], [3.0, 4.0]])
    pt = torch.as_tensor(t)
    assert pt.dtype == torch.float32 and pt.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    w = t64([1.0, 2.0])
    assert torch.as_tensor(w).tolist() == [1.0, 2.0]
