"""The CUDA kernels of bias + ReLU (``bias_relu_*`` of ``kernels/gelu.cu``) against the
composed reference.

* **nvcc**: ``test_fused_gelu_cuda.py`` compiles the whole file (these kernels included) for
  sm_80/sm_90 with the launcher's options and checks that nothing spills.
* **SIMT harness**: the real launcher (`diagnet.fused.gelu_cuda`) with the CuPy stand-in,
  with tiny tiles that make every loop and edge ragged, and with the default tiles. The
  kernels do the reference's arithmetic, so values and ``dx`` agree bit for bit in float64
  and float32, NaN and infinities included; the bias gradient (a sum over the rows in another
  order) to the scaled rule of its dtype.
* **GPU** (marked ``gpu``): `F.bias_relu` through whatever ``cupy`` is (``--fake-cupy``
  included).

The reference is the array code of `diagnet.ops.activation.BiasReLU`, the same that
``DIAGNET_CPU_KERNELS=reference`` runs on the CPU.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from simt import fake_cupy
from simt.harness import GXX, NO_GXX_REASON, shared_builder

import diagnet
from diagnet import backend, cuda_launch
from diagnet import functional as F
from diagnet.fused import gelu_cuda
from diagnet.ops.activation import bias_relu_kernels

needs_gxx = pytest.mark.skipif(GXX is None, reason=NO_GXX_REASON)

SPECIAL = [0.0, -0.0, 5.0, -5.0, np.inf, -np.inf, np.nan]
SMALL = gelu_cuda.GeluConfig(threads=8, reduce_x=4, reduce_y=2, backward_blocks=3)
STRIDED = dataclasses.replace(SMALL, max_grid=2)
CONFIGS = {"small": SMALL, "strided": STRIDED}


def make(R, N, dtype, seed=0, special=False):
    """x, gy ``(R, N)`` and bias ``(N,)``; with ``special``, x starts with `SPECIAL`."""
    rng = np.random.default_rng([seed, R, N])
    x = 3 * rng.standard_normal((R, N))
    if special:
        flat = x.reshape(-1)
        flat[:len(SPECIAL)] = SPECIAL[:flat.size]
    return (x.astype(dtype), rng.standard_normal((R, N)).astype(dtype),
            rng.standard_normal(N).astype(dtype))


def reference(x, gy, bias):
    """``(y, dx, dbias)`` of relu(x + bias), composed in ``x``'s dtype (the reference's
    arithmetic); ``dbias`` in float64."""
    with np.errstate(invalid="ignore"):  # -inf * 0
        h = x + bias
        y = h * (h > 0)
        dx = gy * (h > 0)
    return y, dx, dx.astype(np.float64).sum(axis=0)


def check_bias_grad(got, dx, want, dtype):
    """dbias: a sum over rows, scaled rule (the sum of magnitudes of its terms)."""
    rtol = 1e-12 if dtype == np.float64 else 1e-6
    assert got.dtype == dtype and got.shape == want.shape
    assert np.all(np.abs(got - want) <= rtol * np.abs(dx.astype(np.float64)).sum(axis=0) + 1e-30)


def run(x, gy, bias, config, want_bias=True, dev=fake_cupy.asarray):
    """The CUDA bias + ReLU forward and backward on host arrays; host results."""
    y = gelu_cuda.bias_relu(dev(x), dev(bias), config=config)
    dx, db = gelu_cuda.bias_relu_grad(y, dev(gy), want_bias, config=config)
    return y.get(), dx.get(), (None if db is None else db.get())


@pytest.fixture(scope="module")
def harness_builder():
    if GXX is None:
        pytest.skip(NO_GXX_REASON)
    builder = shared_builder()
    for config in (SMALL, gelu_cuda.DEFAULT_CONFIG):
        for dtype in (np.float32, np.float64):
            builder.submit(gelu_cuda.KERNEL_FILE, gelu_cuda.compile_options(dtype, config),
                           "asan")
    builder.check_flavor(gelu_cuda.KERNEL_FILE, gelu_cuda.compile_options(np.float32, SMALL))
    return builder


@needs_gxx
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("R,N", [(1, 1), (3, 2), (5, 7), (17, 65), (9, 8)])
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_emulated_bias_relu_matches_reference(make_fake, config_name, R, N, dtype):
    fake = make_fake()
    x, gy, bias = make(R, N, dtype, special=True)
    y, dx, db = run(x, gy, bias, CONFIGS[config_name])
    y_ref, dx_ref, db_ref = reference(x, gy, bias)
    assert y.dtype == dx.dtype == dtype
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dx, dx_ref)
    check_bias_grad(db, dx_ref, db_ref, dtype)
    sfx = "f32" if dtype == np.float32 else "f64"
    assert [name for name, _, _ in fake.launches] == [
        f"bias_relu_forward_{sfx}", f"bias_relu_backward_{sfx}", f"bias_gelu_bias_reduce_{sfx}"]


@needs_gxx
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_emulated_bias_relu_default_config(make_fake, dtype):
    """The real default tiles (256-thread blocks) and compile options."""
    fake = make_fake()
    x, gy, bias = make(40, 130, dtype)
    y, dx, db = run(x, gy, bias, None)
    y_ref, dx_ref, db_ref = reference(x, gy, bias)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dx, dx_ref)
    check_bias_grad(db, dx_ref, db_ref, dtype)
    assert fake.compiles == [gelu_cuda.compile_options(dtype)]
    for _, _, block in fake.launches:
        assert block[0] * block[1] == 256


@needs_gxx
def test_emulated_bias_relu_without_bias_grad_does_not_reduce(make_fake):
    fake = make_fake()
    x, gy, bias = make(17, 65, np.float64)
    y_ref, dx_ref, _ = reference(x, gy, bias)
    dx, db = gelu_cuda.bias_relu_grad(fake_cupy.asarray(y_ref), fake_cupy.asarray(gy), False,
                                      config=STRIDED)
    assert db is None and [name for name, _, _ in fake.launches] == ["bias_relu_backward_f64"]
    np.testing.assert_array_equal(dx.get(), dx_ref)


@needs_gxx
def test_emulated_bias_relu_empty_arrays_launch_nothing(make_fake):
    fake = make_fake()
    x, gy, bias = (fake_cupy.asarray(a) for a in make(0, 4, np.float32))
    y = gelu_cuda.bias_relu(x, bias)
    assert y.shape == (0, 4)
    dx, db = gelu_cuda.bias_relu_grad(y, gy)
    assert dx.shape == (0, 4) and db.get().tolist() == [0.0] * 4
    assert gelu_cuda.bias_relu_grad(y, gy, False)[1] is None
    assert fake.launches == []


def test_launcher_refuses_mismatched_bias_relu_arrays_before_launching(monkeypatch, tmp_path):
    device = fake_cupy.SimtDevice(builder=None, workdir=tmp_path)
    monkeypatch.setattr(cuda_launch, "require_cupy", lambda what="": fake_cupy)
    monkeypatch.setattr(fake_cupy, "_device", device)
    cuda_launch.clear_cache()
    x = fake_cupy.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"bias_relu: expected x \(R, N\) and bias \(N,\); got "
                                         r"x \(2, 3\), bias \(4,\)"):
        gelu_cuda.bias_relu(x, fake_cupy.zeros(4, np.float32))
    with pytest.raises(TypeError, match="bias_relu: bias must have x's dtype float32; got float64"):
        gelu_cuda.bias_relu(x, fake_cupy.zeros(3))
    with pytest.raises(ValueError, match=r"bias_relu_grad: gy must have y's shape \(2, 3\); "
                                         r"got \(3, 2\)"):
        gelu_cuda.bias_relu_grad(x, x.T)
    with pytest.raises(ValueError, match=r"bias_relu_grad: expected a 2-d y; got shape \(6,\)"):
        gelu_cuda.bias_relu_grad(x.reshape(6), x.reshape(6))
    assert device.launches == [] and device.compiles == []


# =====================================================================================
# GPU: the op through cupy (a real GPU, or --fake-cupy)
# =====================================================================================


@pytest.mark.gpu
def test_gpu_arrays_take_the_cuda_kernels():
    cp = backend.cupy_or_none()
    assert bias_relu_kernels(cp.zeros(3, np.float32)) is gelu_cuda
    assert bias_relu_kernels(cp.zeros(3, np.float64)) is gelu_cuda
    assert bias_relu_kernels(cp.zeros(3, np.int64)) is None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_gpu_bias_relu_op_matches_reference(dtype):
    x, gy, bias = make(6, 33, dtype, special=True)
    tx, tb = (diagnet.tensor(a, device="cuda", requires_grad=True) for a in (x, bias))
    y = F.bias_relu(tx.reshape(2, 3, 33), tb)
    assert type(y.creator).__name__ == "BiasReLU"
    y.backward(diagnet.tensor(gy.reshape(2, 3, 33), device="cuda"))
    y_ref, dx_ref, db_ref = reference(x, gy, bias)
    np.testing.assert_array_equal(y.numpy().reshape(6, 33), y_ref)
    np.testing.assert_array_equal(tx.grad.numpy(), dx_ref)
    check_bias_grad(tb.grad.numpy(), dx_ref, db_ref, dtype)
    assert tx.grad.device == tb.grad.device == "cuda"


@pytest.mark.gpu
def test_gpu_bias_relu_bias_without_grad_and_refusals():
    x, gy, bias = make(4, 5, np.float64)
    tx = diagnet.tensor(x, device="cuda", requires_grad=True)
    tb = diagnet.tensor(bias, device="cuda")
    F.bias_relu(tx, tb).backward(diagnet.tensor(gy, device="cuda"))
    assert tb.grad is None
    np.testing.assert_array_equal(tx.grad.numpy(), reference(x, gy, bias)[1])
    with pytest.raises(ValueError, match="BiasReLU: operands are on different devices"):
        F.bias_relu(tx, diagnet.tensor(bias, device="cpu"))
    with pytest.raises(TypeError, match="bias_relu: bias must have x's dtype float64; got float32"):
        F.bias_relu(tx, diagnet.tensor(bias.astype(np.float32), device="cuda"))
