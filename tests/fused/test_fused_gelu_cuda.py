"""The CUDA kernels of GELU and bias + GELU (``kernels/gelu.cu``) against the composed reference.

* **nvcc** compiles the file for sm_80/sm_90 with the launcher's options (no spills).
* **SIMT harness**: the real launcher (`diagnet.fused.gelu_cuda`) with the CuPy stand-in,
  with tiny tiles that make every loop and edge ragged, and with the default tiles; float64 to
  rounding, float32 against the float64 reference (F32 tolerances).
* **GPU** (marked ``gpu``): the ops through whatever ``cupy`` is (``--fake-cupy`` included).

The reference is the array code of `diagnet.ops.activation` (`_gelu_reference`,
`_gelu_grad_reference`), the same that ``DIAGNET_CPU_KERNELS=reference`` runs on the CPU.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
from simt import fake_cupy
from simt.harness import GXX, KERNEL_DIR, NO_GXX_REASON, HarnessError, binary_unusable, \
    shared_builder
from simt.nvcc import NVCC, nvcc_compile

import diagnet
from diagnet import backend, cuda_launch
from diagnet import functional as F
from diagnet.fused import gelu_cuda
from diagnet.ops.activation import _gelu_grad_reference, _gelu_reference, gelu_kernels
from tolerances import F32_GRAD_TOL, F32_TOL, F64_TOL

needs_gxx = pytest.mark.skipif(GXX is None, reason=NO_GXX_REASON)

FORMS = ["none", "tanh"]
SPECIAL = [0.0, -0.0, 5.0, -5.0, 12.0, -12.0, 40.0, -40.0, np.inf, -np.inf, np.nan]
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


def reference64(x, gy, bias, approximate):
    """``(y, dx, dbias)`` of gelu(x + bias) in float64 (bias None: plain gelu, dbias None)."""
    h = x.astype(np.float64) if bias is None else x.astype(np.float64) + bias.astype(np.float64)
    y, gate = _gelu_reference(h, approximate)
    dx = _gelu_grad_reference(h, gate, gy.astype(np.float64), approximate)
    return y, dx, (None if bias is None else dx.sum(axis=0))


def check(got, want, dtype, grad=False):
    assert got.dtype == dtype and got.shape == want.shape
    tol = F64_TOL if dtype == np.float64 else (F32_GRAD_TOL if grad else F32_TOL)
    np.testing.assert_allclose(got, want, equal_nan=True, **tol)


def check_bias_grad(got, dx64, dtype):
    """dbias: a sum over rows, scaled rule (the sum of magnitudes of its terms)."""
    scale = np.abs(dx64).sum(axis=0)
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    assert got.dtype == dtype
    assert np.all(np.abs(got - dx64.sum(axis=0)) <= rtol * scale + 1e-30)


# =====================================================================================
# Launch geometry (pure Python)
# =====================================================================================


def test_config_defaults_match_source():
    text = (KERNEL_DIR / gelu_cuda.KERNEL_FILE).read_text()
    defaults = {name: int(value) for name, value in
                re.findall(r"#ifndef (GELU_\w+)\s*\n#define \1 (\d+)", text)}
    expected = {macro: getattr(gelu_cuda.DEFAULT_CONFIG, field)
                for field, macro in gelu_cuda.COMPILED_FIELDS.items()}
    assert defaults == dict(expected, GELU_ENABLE_F32=1, GELU_ENABLE_F64=1)


@pytest.mark.parametrize("config", [gelu_cuda.DEFAULT_CONFIG, SMALL, STRIDED],
                         ids=["default", "small", "strided"])
@pytest.mark.parametrize("R,N", [(1, 1), (3, 7), (2176, 128), (5, 768), (10**6, 65),
                                 (2**31 - 1, 3), (7, 2**20)])
def test_launch_config_covers_every_row_and_column(config, R, N):
    p = gelu_cuda.launch_config(R, N, config)
    bx, by, bz = p.block
    assert bx * by == config.threads and bz == 1 and bx & (bx - 1) == 0
    assert bx < 2 * N  # no thread row twice as wide as the row
    assert 1 <= p.forward_grid[0] <= config.max_grid
    assert p.rows_per_block % by == 0
    assert p.backward_grid[0] * p.rows_per_block >= R > (p.backward_grid[0] - 1) * p.rows_per_block
    assert p.backward_grid[0] <= config.backward_blocks
    assert p.partial_rows == p.backward_grid[0] * by
    assert 1 <= p.reduce_grid[0] <= config.max_grid and p.reduce_grid[1:] == (1, 1)
    flat = gelu_cuda.flat_config(R * N, config)
    assert flat.block == (config.threads, 1, 1) and 1 <= flat.grid[0] <= config.max_grid
    with pytest.raises(ValueError, match="R, N"):
        gelu_cuda.launch_config(R, 0, config)
    with pytest.raises(ValueError, match="n >= 1"):
        gelu_cuda.flat_config(0, config)


def test_gelu_config_validation():
    with pytest.raises(ValueError, match="power of two"):
        gelu_cuda.GeluConfig(threads=96)
    with pytest.raises(ValueError, match="reduce_y must be a power of two"):
        gelu_cuda.GeluConfig(reduce_y=3)
    with pytest.raises(ValueError, match="positive int"):
        gelu_cuda.GeluConfig(backward_blocks=0)


@pytest.mark.skipif(NVCC is None, reason="nvcc (CUDA toolkit) is not on PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_nvcc_compiles_launcher_options_without_spills(arch, dtype, tmp_path):
    src = KERNEL_DIR / gelu_cuda.KERNEL_FILE
    for config in (gelu_cuda.DEFAULT_CONFIG, SMALL):
        res, kernels = nvcc_compile(src, arch, gelu_cuda.compile_options(dtype, config), tmp_path)
        assert res.returncode == 0, res.stderr
        assert "warning" not in (res.stdout + res.stderr).lower(), res.stdout + res.stderr
        sfx = "f32" if dtype is np.float32 else "f64"
        entries = ("gelu_forward", "gelu_backward", "bias_gelu_forward", "bias_gelu_backward",
                   "bias_gelu_bias_reduce", "bias_relu_forward", "bias_relu_backward")
        assert set(kernels) == {f"{k}_{sfx}" for k in entries}
        for name, k in kernels.items():
            assert k["spill_stores"] == 0 and k["spill_loads"] == 0 and k["stack"] == 0, (name, k)


# =====================================================================================
# SIMT harness through the real launcher
# =====================================================================================


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




def run_bias(x, gy, bias, approximate, config, want_bias=True, dev=fake_cupy.asarray):
    """The CUDA bias + GELU forward and backward on host arrays; host results."""
    y = gelu_cuda.bias_gelu(dev(x), dev(bias), approximate, config=config)
    dx, db = gelu_cuda.bias_gelu_grad(dev(x), dev(bias), dev(gy), approximate, want_bias,
                                      config=config)
    return y.get(), dx.get(), (None if db is None else db.get())


def run_flat(x, gy, approximate, config, dev=fake_cupy.asarray):
    y = gelu_cuda.gelu(dev(x), approximate, config=config)
    return y.get(), gelu_cuda.gelu_grad(dev(x), dev(gy), approximate, config=config).get()


@needs_gxx
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("approximate", FORMS)
@pytest.mark.parametrize("R,N", [(1, 1), (3, 5), (17, 9), (2, 13)])
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_emulated_gelu_matches_reference(make_fake, config_name, R, N, approximate, dtype):
    fake = make_fake()
    x, gy, _ = make(R, N, dtype, special=True)
    with np.errstate(all="ignore"):  # inf * 0 at the infinities: NaN in both
        y, dx = run_flat(x, gy, approximate, CONFIGS[config_name])
        y64, dx64, _ = reference64(x, gy, None, approximate)
    check(y, y64, dtype)
    check(dx, dx64, dtype, grad=True)
    sfx = "f32" if dtype == np.float32 else "f64"
    assert [name for name, _, _ in fake.launches] == [f"gelu_forward_{sfx}", f"gelu_backward_{sfx}"]


@needs_gxx
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("approximate", FORMS)
@pytest.mark.parametrize("R,N", [(1, 1), (3, 2), (5, 7), (17, 65), (9, 8)])
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_emulated_bias_gelu_matches_reference(make_fake, config_name, R, N, approximate, dtype):
    fake = make_fake()
    x, gy, bias = make(R, N, dtype)
    y, dx, db = run_bias(x, gy, bias, approximate, CONFIGS[config_name])
    y64, dx64, _ = reference64(x, gy, bias, approximate)
    check(y, y64, dtype)
    check(dx, dx64, dtype, grad=True)
    check_bias_grad(db, dx64, dtype)
    sfx = "f32" if dtype == np.float32 else "f64"
    assert [name for name, _, _ in fake.launches] == [
        f"bias_gelu_forward_{sfx}", f"bias_gelu_backward_{sfx}", f"bias_gelu_bias_reduce_{sfx}"]


@needs_gxx
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_emulated_kernels_default_config(make_fake, dtype):
    """The real default tiles (256-thread blocks) and compile options."""
    fake = make_fake()
    x, gy, bias = make(40, 130, dtype)
    y, dx, db = run_bias(x, gy, bias, "none", None)
    y64, dx64, _ = reference64(x, gy, bias, "none")
    check(y, y64, dtype)
    check(dx, dx64, dtype, grad=True)
    check_bias_grad(db, dx64, dtype)
    y, dx = run_flat(x, gy, "tanh", None)
    y64, dx64, _ = reference64(x, gy, None, "tanh")
    check(y, y64, dtype)
    check(dx, dx64, dtype, grad=True)
    assert fake.compiles == [gelu_cuda.compile_options(dtype)]
    for _, _, block in fake.launches:
        assert block[0] * block[1] == 256


@needs_gxx
def test_emulated_paths_are_exercised_and_bias_grad_is_optional(make_fake):
    """The strided cases loop: grid-stride over row groups and flat elements, several rows per
    backward block, several partial rows and column tiles in the reduction. Without the bias
    gradient there is no reduction."""
    plan = gelu_cuda.launch_config(17, 65, STRIDED)
    assert plan.block == (8, 1, 1) and plan.forward_grid == (2, 1, 1)
    assert plan.rows_per_block > plan.block[1] and plan.partial_rows == 3
    assert plan.reduce_grid[0] == 2 < 65 / STRIDED.reduce_x
    assert gelu_cuda.flat_config(17 * 9, STRIDED).grid == (2, 1, 1)
    fake = make_fake()
    x, gy, bias = make(17, 65, np.float64)
    dx, db = gelu_cuda.bias_gelu_grad(*map(fake_cupy.asarray, (x, bias, gy)), "none", False,
                                      config=STRIDED)
    assert db is None and len(fake.launches) == 1
    np.testing.assert_allclose(dx.get(), reference64(x, gy, bias, "none")[1], **F64_TOL)


@needs_gxx
def test_emulated_gelu_keeps_the_shape_of_a_0d_array(make_fake):
    make_fake()
    x, gy = fake_cupy.asarray(np.array(0.5)), fake_cupy.asarray(np.array(2.0))
    y, dx = gelu_cuda.gelu(x), gelu_cuda.gelu_grad(x, gy)
    assert y.shape == dx.shape == ()
    y64, dx64, _ = reference64(np.array([0.5]), np.array([2.0]), None, "none")
    np.testing.assert_allclose([y.get(), dx.get()], [y64[0], dx64[0]], **F64_TOL)


@needs_gxx
def test_emulated_empty_arrays_launch_nothing(make_fake):
    fake = make_fake()
    x, gy, bias = (fake_cupy.asarray(a) for a in make(0, 4, np.float32))
    assert gelu_cuda.bias_gelu(x, bias).shape == (0, 4)
    dx, db = gelu_cuda.bias_gelu_grad(x, bias, gy)
    assert dx.shape == (0, 4) and db.get().tolist() == [0.0] * 4
    assert gelu_cuda.gelu(x).shape == gelu_cuda.gelu_grad(x, gy).shape == (0, 4)
    assert fake.launches == []


@needs_gxx
def test_emulated_kernels_are_race_free_under_tsan(make_fake, harness_builder):
    reason = binary_unusable(harness_builder, "tsan", gelu_cuda.KERNEL_FILE,
                             gelu_cuda.compile_options(np.float32, SMALL))
    if reason:
        pytest.skip(reason)
    x, gy, bias = make(9, 13, np.float32)
    make_fake("tsan")
    run_bias(x, gy, bias, "none", SMALL)
    make_fake("tsan-broken-sync")
    with pytest.raises(HarnessError, match="ThreadSanitizer: data race"):
        run_bias(x, gy, bias, "none", SMALL)


def test_launcher_refuses_mismatched_bias_before_launching(monkeypatch, tmp_path):
    device = fake_cupy.SimtDevice(builder=None, workdir=tmp_path)
    monkeypatch.setattr(cuda_launch, "require_cupy", lambda what="": fake_cupy)
    monkeypatch.setattr(fake_cupy, "_device", device)
    cuda_launch.clear_cache()
    x = fake_cupy.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"expected x \(R, N\) and bias \(N,\); got x \(2, 3\), "
                                         r"bias \(4,\)"):
        gelu_cuda.bias_gelu(x, fake_cupy.zeros(4, np.float32))
    with pytest.raises(TypeError, match="bias must have x's dtype float32; got float64"):
        gelu_cuda.bias_gelu_grad(x, fake_cupy.zeros(3), x)
    with pytest.raises(ValueError, match=r"gy must have x's shape \(2, 3\); got \(3, 2\)"):
        gelu_cuda.gelu_grad(x, x.T)
    assert device.launches == [] and device.compiles == []


# =====================================================================================
# GPU: the ops through cupy (a real GPU, or --fake-cupy)
# =====================================================================================


@pytest.mark.gpu
def test_gpu_arrays_take_the_cuda_kernels():
    cp = backend.cupy_or_none()
    assert gelu_kernels(cp.zeros(3, np.float32)) is gelu_cuda
    assert gelu_kernels(cp.zeros(3, np.float64)) is gelu_cuda
    assert gelu_kernels(cp.zeros(3, np.int64)) is None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("approximate", FORMS)
def test_gpu_bias_gelu_and_gelu_ops_match_reference(approximate, dtype):
    x, gy, bias = make(6, 33, dtype)
    tx, tb = (diagnet.tensor(a, device="cuda", requires_grad=True) for a in (x, bias))
    y = F.bias_gelu(tx.reshape(2, 3, 33), tb, approximate=approximate)
    assert type(y.creator).__name__ == "BiasGELU"
    y.backward(diagnet.tensor(gy.reshape(2, 3, 33), device="cuda"))
    y64, dx64, _ = reference64(x, gy, bias, approximate)
    check(y.numpy().reshape(6, 33), y64, dtype)
    check(tx.grad.numpy(), dx64, dtype, grad=True)
    check_bias_grad(tb.grad.numpy(), dx64, dtype)
    assert tx.grad.device == tb.grad.device == "cuda"

    tx.grad = None
    y = F.gelu(tx, approximate=approximate)
    y.backward(diagnet.tensor(gy, device="cuda"))
    y64, dx64, _ = reference64(x, gy, None, approximate)
    check(y.numpy(), y64, dtype)
    check(tx.grad.numpy(), dx64, dtype, grad=True)
