"""GELU's compiled CPU kernels (`diagnet.fused.gelu`) against the composed reference.

The reference is the array code of `diagnet.ops.activation.GELU`, selected with
``DIAGNET_CPU_KERNELS=reference`` (the `use_kernels` fixture). float64 values and gradients
agree to rounding; float32 (whose erf form uses a vectorisable ``erfc`` accurate to a
relative 1.2e-7, and whose exponentials come from `diagnet.fused.fastmath`, checked here
against NumPy) agrees with the float64 reference to the float32 tolerances. The CuPy path
(the reference) is checked through the stand-in by the ``gpu`` tests at the end.
"""

from __future__ import annotations

import numpy as np
import pytest

import diagnet
from diagnet import functional as F
from diagnet.gradcheck import gradcheck
from diagnet.ops.activation import GELU
from tolerances import F32_GRAD_TOL, F32_TOL, F64_TOL, GRADCHECK_TOL

FORMS = ["none", "tanh"]
# rows of width 1, odd widths, and one array past the parallel threshold (2**15 elements)
SHAPES = [(), (1,), (7,), (3, 1), (5, 33), (2, 3, 4), (257, 130)]
SPECIAL = [0.0, -0.0, 1e-30, -1e-30, 5.0, -5.0, 12.0, -12.0, 40.0, -40.0,
           np.inf, -np.inf, np.nan]


def _values(shape, seed, scale=3.0):
    rng = np.random.default_rng(seed)
    x = scale * rng.standard_normal(shape)
    flat = x.reshape(-1)
    flat[:len(SPECIAL)] = SPECIAL[:flat.size]
    return x


def _gelu_and_grad(x, g, approximate):
    t = diagnet.tensor(x, requires_grad=True)
    y = F.gelu(t, approximate=approximate)
    y.backward(g)
    return y.numpy(), t.grad.numpy()


@pytest.mark.parametrize("approximate", FORMS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gelu_kernels_match_the_reference_in_float64(approximate, shape, use_kernels):
    x = _values(shape, seed=1)
    g = np.random.default_rng(2).standard_normal(shape)
    with np.errstate(all="ignore"):  # inf * 0 at the infinities: NaN in both
        y, gx = _gelu_and_grad(x, g, approximate)
        with use_kernels("reference"):
            y_ref, gx_ref = _gelu_and_grad(x, g, approximate)
    assert y.shape == shape and y.dtype == np.float64
    np.testing.assert_allclose(y, y_ref, equal_nan=True, **F64_TOL)
    np.testing.assert_allclose(gx, gx_ref, equal_nan=True, **F64_TOL)


@pytest.mark.parametrize("approximate", FORMS)
def test_gelu_kernels_in_float32_match_the_float64_reference(approximate, use_kernels):
    x = np.concatenate([np.linspace(-10, 10, 4001), _values((40000,), seed=3)[len(SPECIAL):]])
    x32 = x.astype(np.float32)
    g32 = np.random.default_rng(4).standard_normal(x.shape).astype(np.float32)
    y, gx = _gelu_and_grad(x32, g32, approximate)
    assert y.dtype == gx.dtype == np.float32
    with use_kernels("reference"):
        y_ref, gx_ref = _gelu_and_grad(x32.astype(np.float64), g32.astype(np.float64),
                                       approximate)
    np.testing.assert_allclose(y, y_ref, **F32_TOL)
    np.testing.assert_allclose(gx, gx_ref, **F32_GRAD_TOL)


@pytest.mark.parametrize("approximate", FORMS)
def test_gelu_kernels_in_float32_at_special_values(approximate, use_kernels):
    x32 = np.array(SPECIAL + [-1e30, 1e30, -3e38, 3e38, -1e-45], dtype=np.float32)
    g32 = np.ones_like(x32)
    with np.errstate(all="ignore"):  # inf * 0 at the infinities: NaN in both
        y, gx = _gelu_and_grad(x32, g32, approximate)
        with use_kernels("reference"):
            y_ref, gx_ref = _gelu_and_grad(x32.astype(np.float64), g32.astype(np.float64),
                                           approximate)
    np.testing.assert_allclose(y, y_ref, equal_nan=True, **F32_TOL)
    np.testing.assert_allclose(gx, gx_ref, equal_nan=True, **F32_GRAD_TOL)


def test_exp_nonpositive_f32_matches_numpy():
    """The float32-precision exponential of the float32 kernels, to its stated 4e-10."""
    import numba

    from diagnet.fused.fastmath import exp_nonpositive_f32

    @numba.njit
    def exp_all(x):
        return np.array([exp_nonpositive_f32(v) for v in x])

    x = -np.concatenate([np.linspace(0.0, 256.0, 100001),
                         np.random.default_rng(10).exponential(20.0, 10000)])
    x = x[x >= -256.0]
    np.testing.assert_allclose(exp_all(x), np.exp(x), rtol=4e-10, atol=0.0)
    special = exp_all(np.array([-0.0, -256.5, -1e300, -np.inf, np.nan]))
    np.testing.assert_array_equal(special, [1.0, 0.0, 0.0, 0.0, np.nan])


@pytest.mark.parametrize("approximate", FORMS)
@pytest.mark.parametrize("shape", [(6,), (3, 5)], ids=str)
def test_gelu_kernels_gradcheck(approximate, shape):
    x = diagnet.tensor(2.0 * np.random.default_rng(6).standard_normal(shape),
                       requires_grad=True)
    assert gradcheck(lambda t: F.gelu(t, approximate=approximate), x, **GRADCHECK_TOL)


def test_gelu_takes_the_kernels_for_numpy_floats_only(use_kernels):
    from diagnet.fused import gelu as kernels

    for dtype in (np.float32, np.float64):
        fn = GELU("none")
        fn(diagnet.tensor(np.ones(3, dtype=dtype)))
        assert fn.kernels is kernels
    with use_kernels("reference"):
        fn = GELU("none")
        fn(diagnet.tensor(np.ones(3)))
        assert fn.kernels is None


def test_gelu_kernels_take_non_contiguous_input():
    x = np.random.default_rng(7).standard_normal((6, 5))
    t = diagnet.tensor(x)
    y = F.gelu(t.T).numpy()  # a transposed view
    np.testing.assert_allclose(y, F.gelu(diagnet.tensor(x.T.copy())).numpy(), **F64_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("approximate", FORMS)
def test_gelu_on_cuda_matches_the_cpu_kernels(approximate):
    x = np.random.default_rng(8).standard_normal((4, 9)) * 3
    g = np.random.default_rng(9).standard_normal((4, 9))
    cpu = diagnet.tensor(x, device="cpu", requires_grad=True)
    gpu = diagnet.tensor(x, device="cuda", requires_grad=True)
    for t in (cpu, gpu):
        F.gelu(t, approximate=approximate).backward(diagnet.tensor(g, device=t.device))
    np.testing.assert_allclose(F.gelu(gpu, approximate=approximate).numpy(),
                               F.gelu(cpu, approximate=approximate).numpy(), **F64_TOL)
    assert gpu.grad.device == "cuda"
    np.testing.assert_allclose(gpu.grad.numpy(), cpu.grad.numpy(), **F64_TOL)
