"""The CuPy stand-in (tests/simt/fake_cupy.py) behaves like CuPy where diagnet could go wrong.

``pytest --fake-cupy`` runs every ``gpu`` test through the stand-in, so what those runs prove
rests on these properties: device arrays are not NumPy arrays, mixing them with host arrays
fails as in CuPy, and kernel launches are checked as strictly as CuPy needs them. None of
these tests builds the SIMT harness (the kernel argument checks run before any build).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from simt import fake_cupy as cp
from simt import fake_cupyx

from diagnet.diag import cuda

IMPLICIT = "Implicit conversion to a NumPy array is not allowed"


def test_ndarray_wraps_numpy_without_being_numpy():
    a = cp.asarray(np.arange(6.0).reshape(2, 3))
    assert not isinstance(a, np.ndarray) and isinstance(a, cp.ndarray)
    assert type(a).__module__ == "cupy"  # messages read "cupy.ndarray"
    assert isinstance(a.data, cp.MemoryPointer) and isinstance(a.data.ptr, int)
    assert a.shape == (2, 3) and a.dtype == np.float64 and a.ndim == 2 and a.size == 6
    assert a.flags.c_contiguous and not a.T.flags.c_contiguous and a.flags["C_CONTIGUOUS"]
    assert not hasattr(a.flags, "writeable")  # CuPy's flags have no writeable
    assert not hasattr(a, "__array_interface__") and not hasattr(a, "ctypes")
    np.testing.assert_array_equal(a.get(), np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(cp.asnumpy(a), a.get())


def test_implicit_conversion_to_numpy_raises():
    a = cp.asarray([1.0, 2.0])
    for convert in (np.asarray, np.array, lambda x: np.testing.assert_allclose(x, [1.0, 2.0])):
        with pytest.raises(TypeError, match=IMPLICIT):
            convert(a)


def test_mixing_host_arrays_raises_like_cupy():
    a, host = cp.asarray([1.0, 2.0]), np.array([1.0, 2.0])
    for mix in (lambda: a + host, lambda: host + a, lambda: np.add(a, host),
                lambda: np.shares_memory(a, host), lambda: np.concatenate([a, host]),
                lambda: cp.where(a > 0, a, host), lambda: cp.ascontiguousarray(host)):
        with pytest.raises(TypeError, match="Unsupported type <class 'numpy.ndarray'>|cupy.ndarray"):
            mix()
    # scalars are fine, and results stay on the device
    for result in (a + 1, 2.0 * a, np.float64(2.0) * a, np.exp(a), cp.sqrt(a), a.sum(), a[0]):
        assert isinstance(result, cp.ndarray)
    assert a.sum().shape == () and a.sum().item() == 3.0  # reductions give 0-d arrays


def test_identity_and_copies():
    a = cp.asarray(np.ones((2, 3), np.float32))
    assert cp.asarray(a) is a and cp.ascontiguousarray(a) is a
    assert a.astype(np.float32, copy=False) is a and a.astype(np.float64).dtype == np.float64
    assert cp.array(a) is not a and cp.ascontiguousarray(a.T) is not a
    flat = a.reshape(-1)  # a view: writes reach a
    flat[0] = 5.0
    assert a[0, 0].item() == 5.0


def test_empty_is_poisoned():
    assert np.isnan(cp.empty((3,), np.float32).get()).all()
    assert (cp.empty((2,), np.int32).get() == -12345).all()
    assert np.isnan(cp.empty_like(cp.zeros(2)).get()).all()


def test_indexing_follows_cupy():
    a = cp.zeros((3, 4))
    a[np.array([0, 2])] = np.ones((2, 4))  # advanced: host values are uploaded
    a[1:2] = 7.0
    with pytest.raises(ValueError, match="non-scalar numpy.ndarray cannot be used for fill"):
        a[1:2] = np.ones((1, 4))
    with pytest.raises(ValueError, match="one boolean array"):
        a[np.array([True, False, True]), np.array([0, 1])]
    np.testing.assert_array_equal(a.get()[:, 0], [1.0, 7.0, 1.0])


def test_binary_operators_defer_like_cupy():
    class HighPriority:  # like diagnet.Tensor
        __array_priority__ = 200

        def __radd__(self, other):
            return "deferred"

    class NoUfuncs:  # like diagnet.DiagMatrix
        __array_ufunc__ = None

        def __rmatmul__(self, other):
            return "deferred"

    a = cp.ones(2)
    assert a + HighPriority() == "deferred" and a @ NoUfuncs() == "deferred"


def test_truth_and_conversions():
    assert bool(cp.asarray([2.0])) and float(cp.asarray(2.5)) == 2.5 and int(cp.asarray(3)) == 3
    with pytest.raises(ValueError, match="ambiguous"):
        bool(cp.ones(2))
    with pytest.raises(TypeError, match="len"):
        len(cp.asarray(1.0))


def test_cuda_namespace_and_cupyx():
    assert cp.cuda.runtime.getDeviceCount() == 1
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    assert props["multiProcessorCount"] > 0 and props["major"] >= 7
    cp.cuda.get_current_stream().synchronize()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    stop.record()
    assert cp.cuda.get_elapsed_time(start, stop) >= 0
    t = cp.zeros(3, np.float32)
    fake_cupyx.scatter_add(t, np.array([0, 0, 2]), cp.asarray([1.0, 2.0, 3.0], np.float32))
    np.testing.assert_array_equal(t.get(), [3.0, 0.0, 3.0])
    np.testing.assert_allclose(fake_cupyx.special.erf(cp.asarray([0.5])).get(), [0.5204998778])


def test_install_registers_cupy_and_cupyx():
    replaced = cp.install()
    try:
        import cupy
        import cupyx
        from cupyx.scipy.special import erf

        assert cupy is cp and cupyx.scatter_add is fake_cupyx.scatter_add
        assert isinstance(erf(cupy.asarray([0.0])), cupy.ndarray)
    finally:
        cp.uninstall(replaced)
    assert sys.modules.get("cupy") is replaced["cupy"]


@pytest.fixture
def kernel():
    """A kernel of the shipped source; calling it with bad arguments fails before any build."""
    module = cp.RawModule(code=cuda.kernel_source(), options=cuda.compile_options(np.float32))
    return cp.RawKernel(name="diag_forward_f32", _module=module)


def test_kernel_arguments_are_checked_like_cupy_needs(kernel):
    x, out = cp.zeros((2, 4), np.float32), cp.empty((2, 3), np.float32)
    off, v = cp.zeros(1, np.int32), cp.zeros((1, 3), np.float32)
    good = (x, off, v, out, np.int32(2), np.int32(3), np.int32(4), np.int32(1))
    bad_args = {
        "Python int": (good[:4] + (2,) + good[5:], r"Python int .* 64-bit long long"),
        "Python float": (good[:4] + (2.0,) + good[5:], "Python float .* double"),
        "host array": ((np.zeros((2, 4), np.float32),) + good[1:], "Unsupported type"),
        "strided array": ((cp.zeros((4, 4), np.float32)[::2],) + good[1:], "C-contiguous"),
        "list of args": (list(good), "args must be a tuple"),
    }
    for what, (args, message) in bad_args.items():
        with pytest.raises(TypeError, match=message):
            kernel((1, 1, 1), (8, 2, 1), args)
    for grid in ((1, 1), [1, 1, 1], (1, 1, np.int64(1)), (0, 1, 1)):
        with pytest.raises(TypeError, match="grid must be a tuple of 3 positive Python ints"):
            kernel(grid, (8, 2, 1), good)


def test_raw_module_runs_only_the_shipped_source():
    with pytest.raises(ValueError, match="diag_linear.cu"):
        cp.RawModule(code="extern \"C\" __global__ void k() {}", options=())
