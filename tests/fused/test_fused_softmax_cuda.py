"""The CUDA kernels of softmax, log-softmax and cross-entropy (``kernels/softmax.cu``, launched
by `diagnet.fused.softmax_cuda`) against the composed reference.

* **nvcc**: the file compiled for sm_80 and sm_90 with the launcher's options (no warnings,
  no spills, no stack frame).
* **SIMT harness**: the real launcher on the CuPy stand-in, the kernels emulated on the CPU,
  with tiny blocks (8 threads: every row ragged, several columns per thread), the same with
  the grid capped at 2 blocks (the grid-stride loop), and the default 256-thread blocks;
  widths 1, 2, 7, 10, 17, 64, 65, 1000, one row and many. The reference is the composed
  array code of `diagnet.ops.activation` and `diagnet.ops.loss` on NumPy float64
  (``DIAGNET_CPU_KERNELS=reference``): float64 to rounding, float32 to the tolerances of the
  CPU kernels' tests. Masked (``-inf``), fully masked, NaN and huge logits and labels out of
  range give what the reference gives.
* **GPU** (marked ``gpu``): the ops through whatever ``cupy`` is (``--fake-cupy`` included).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re

import numpy as np
import pytest
from simt import fake_cupy
from simt.harness import (GXX, KERNEL_DIR, NO_GXX_REASON, HarnessError, binary_unusable,
                          shared_builder)
from simt.nvcc import NVCC, nvcc_compile

import diagnet
from diagnet import backend, cuda_launch, settings
from diagnet import functional as F
from diagnet.fused import softmax_cuda
from diagnet.ops.activation import softmax_kernels
from diagnet.ops.loss import CrossEntropy
from test_fused_softmax import LOG_SOFTMAX_F32_TOL
from tolerances import F32_GRAD_TOL, F64_TOL

needs_gxx = pytest.mark.skipif(GXX is None, reason=NO_GXX_REASON)

WIDTHS = [1, 2, 7, 10, 17, 64, 65, 1000]
ENTRIES = ("softmax_forward", "log_softmax_forward", "softmax_backward", "log_softmax_backward",
           "cross_entropy_forward", "cross_entropy_backward")
#: float32 results against the float64 reference (as for the CPU kernels, whose tests state
#: them): softmax values, log-softmax values, losses, gradients
F32_TOLS = {"softmax": dict(rtol=1e-5, atol=1e-7), "log_softmax": LOG_SOFTMAX_F32_TOL,
            "loss": dict(rtol=1e-5, atol=2e-5), "grad": F32_GRAD_TOL}

SMALL = softmax_cuda.SoftmaxConfig(threads=8)
STRIDED = dataclasses.replace(SMALL, max_grid=2)
CONFIGS = {"small": SMALL, "strided": STRIDED, "default": softmax_cuda.DEFAULT_CONFIG}


def make(R, C, dtype, seed=0, special=False):
    """Logits ``x`` ``(R, C)``, an output gradient ``g``, labels ``(R,)`` and a per-row scale.

    ``special`` adds what the kernels must treat as the reference does: a masked (``-inf``)
    logit in every third row, a fully masked row, a NaN, huge logits, logits 300 and 600
    below the row max (0 in float32), a ``-inf`` at a label and labels out of range.
    """
    rng = np.random.default_rng([seed, R, C])
    x = 5.0 * rng.standard_normal((R, C))
    labels = rng.integers(0, C, size=R)
    if special and R >= 8:
        if C > 1:
            x[::3, 0] = -np.inf
        x[1] = -np.inf
        x[2, C // 2] = np.nan
        x[3] += 1e4
        x[4] -= 1e4
        x[5, : (C + 1) // 2] -= 600.0
        x[5, 0] += 300.0
        x[6, labels[6]] = -np.inf
        labels[7] = C  # out of range: a NaN row
        labels[0] = -1
    g = rng.standard_normal((R, C))
    scale = rng.uniform(0.5, 1.5, size=R)
    return x.astype(dtype), g.astype(dtype), labels, scale.astype(dtype)


def reference(x, g, labels, scale, eps):
    """The composed reference on NumPy float64 (from the same, possibly float32, data):
    ``{name: (y, gx)}`` for softmax and log-softmax, and ``(losses, gz, shift, log_sum)``."""
    x, g, scale = (a.astype(np.float64) for a in (x, g, scale))
    out = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(np.errstate(invalid="ignore", divide="ignore"))
        stack.enter_context(_reference_kernels())
        for name, op in (("softmax", F.softmax), ("log_softmax", F.log_softmax)):
            t = diagnet.tensor(x, device="cpu", requires_grad=True)
            y = op(t)
            y.backward(g)
            out[name] = (y.numpy(), t.grad.numpy())
        C = x.shape[1]
        valid = (labels >= 0) & (labels < C)
        t = diagnet.tensor(x, device="cpu", requires_grad=True)
        losses = CrossEntropy(np.clip(labels, 0, C - 1), eps, "none", valid)(t)
        losses.backward(scale)
        shift = x.max(axis=1)
        log_sum = np.log(np.exp(x - shift[:, None]).sum(axis=1))
    return out, (losses.numpy(), t.grad.numpy(), shift, log_sum)


@contextlib.contextmanager
def _reference_kernels():
    with settings.override(cpu_kernels="reference"):
        yield


def run_kernels(x, g, labels, scale, eps, config, dev):
    """Every kernel of the file on the device arrays of ``dev`` (each backward from its own
    forward's outputs); host results, as `reference` returns them."""
    X, G, L, S = dev(x), dev(g), dev(labels), dev(scale)
    out = {}
    for name in ("softmax", "log_softmax"):
        y = getattr(softmax_cuda, name)(X, config=config)
        gx = getattr(softmax_cuda, f"{name}_grad")(y, G, config=config)
        out[name] = (y.get(), gx.get())
    losses, shift, log_sum = softmax_cuda.cross_entropy_rows(X, L, eps, config=config)
    gz = softmax_cuda.cross_entropy_grad(X, L, eps, shift, log_sum, S, config=config)
    return out, (losses.get(), gz.get(), shift.get(), log_sum.get())


def assert_matches(got, want, x):
    """`run_kernels`' results ``got`` against `reference`'s ``want`` for the logits ``x``."""
    dtype = x.dtype
    (rows, (losses, gz, shift, log_sum)) = got
    (rows_ref, (losses_ref, gz_ref, shift_ref, log_sum_ref)) = want
    f64 = np.dtype(dtype) == np.float64
    for name in ("softmax", "log_softmax"):
        y, gx = rows[name]
        y_ref, gx_ref = rows_ref[name]
        assert y.dtype == gx.dtype == dtype and y.shape == gx.shape == y_ref.shape
        np.testing.assert_allclose(y, y_ref, equal_nan=True, **(F64_TOL if f64 else F32_TOLS[name]))
        np.testing.assert_allclose(gx, gx_ref, equal_nan=True,
                                   **(F64_TOL if f64 else F32_TOLS["grad"]))
        if name == "softmax":  # a masked logit gets exactly 0
            assert np.all(y[np.isneginf(x) & ~np.isnan(y_ref)] == 0)
    for a in (losses, shift, log_sum):
        assert a.dtype == dtype and a.shape == losses_ref.shape
    np.testing.assert_allclose(losses, losses_ref, equal_nan=True,
                               **(F64_TOL if f64 else F32_TOLS["loss"]))
    np.testing.assert_allclose(gz, gz_ref, equal_nan=True, **(F64_TOL if f64 else F32_TOLS["grad"]))
    finite = np.isfinite(losses_ref)  # the saved statistics of a NaN row are NaN, no more
    np.testing.assert_allclose(shift[finite], shift_ref[finite],
                               **(F64_TOL if f64 else dict(rtol=1e-7)))
    np.testing.assert_allclose(log_sum[finite], log_sum_ref[finite],
                               **(F64_TOL if f64 else dict(rtol=1e-5, atol=1e-6)))


# =====================================================================================
# Pure Python: config and launch geometry
# =====================================================================================


def test_config_defaults_match_source():
    text = (KERNEL_DIR / softmax_cuda.KERNEL_FILE).read_text()
    defaults = {name: int(value) for name, value in
                re.findall(r"#ifndef (SOFTMAX_\w+)\s*\n#define \1 (\d+)", text)}
    expected = {macro: getattr(softmax_cuda.DEFAULT_CONFIG, field)
                for field, macro in softmax_cuda.COMPILED_FIELDS.items()}
    assert defaults == dict(expected, SOFTMAX_ENABLE_F32=1, SOFTMAX_ENABLE_F64=1)


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
@pytest.mark.parametrize("R,C", [(1, 1), (3, 7), (2176, 17), (5, 1000), (10**6, 10),
                                 (2**31 - 1, 3), (7, 2**20)])
def test_launch_config_covers_every_row_and_column(config, R, C):
    p = softmax_cuda.launch_config(R, C, config)
    bx, by, bz = p.block
    assert bx * by == config.threads and bz == 1 and bx & (bx - 1) == 0
    assert bx <= max(1, C)  # no thread row wider than the row
    assert 1 <= p.grid[0] <= config.max_grid and p.grid[1:] == (1, 1)
    assert p.grid[0] * by >= min(R, config.max_grid * by)  # the grid-stride loop does the rest
    with pytest.raises(ValueError, match="R, C"):
        softmax_cuda.launch_config(R, 0, config)


def test_softmax_config_validation():
    with pytest.raises(ValueError, match="power of two"):
        softmax_cuda.SoftmaxConfig(threads=96)
    with pytest.raises(ValueError, match="positive int"):
        softmax_cuda.SoftmaxConfig(max_grid=0)


# =====================================================================================
# nvcc
# =====================================================================================


@pytest.mark.skipif(NVCC is None, reason="nvcc (CUDA toolkit) is not on PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_nvcc_compiles_launcher_options_without_spills(arch, dtype, tmp_path):
    src = KERNEL_DIR / softmax_cuda.KERNEL_FILE
    sfx = "f32" if dtype is np.float32 else "f64"
    for config in (softmax_cuda.DEFAULT_CONFIG, SMALL):
        res, kernels = nvcc_compile(src, arch, softmax_cuda.compile_options(dtype, config),
                                    tmp_path)
        assert res.returncode == 0, res.stderr
        assert "warning" not in (res.stdout + res.stderr).lower(), res.stdout + res.stderr
        assert set(kernels) == {f"{entry}_{sfx}" for entry in ENTRIES}
        for name, k in kernels.items():
            assert k["spill_stores"] == 0 and k["spill_loads"] == 0 and k["stack"] == 0, (name, k)


# =====================================================================================
# SIMT harness, through the real launcher and the CuPy stand-in
# =====================================================================================


@pytest.fixture(scope="module")
def harness_builder():
    if GXX is None:
        pytest.skip(NO_GXX_REASON)
    builder = shared_builder()
    for config in (SMALL, softmax_cuda.DEFAULT_CONFIG):
        for dtype in (np.float32, np.float64):
            builder.submit(softmax_cuda.KERNEL_FILE,
                           softmax_cuda.compile_options(dtype, config), "asan")
    builder.check_flavor(softmax_cuda.KERNEL_FILE,
                         softmax_cuda.compile_options(np.float32, SMALL))
    return builder




def check(R, C, dtype, config, eps, special=False, dev=fake_cupy.asarray):
    x, g, labels, scale = make(R, C, dtype, special=special)
    got = run_kernels(x, g, labels, scale, eps, config, dev)
    assert_matches(got, reference(x, g, labels, scale, eps), x)


def _cases():
    dtypes = [pytest.param(np.float64, id="f64"), pytest.param(np.float32, id="f32")]
    for dtype in dtypes:
        for C in WIDTHS:
            for R in (1, 37):
                yield pytest.param("small", R, C, dtype.values[0], id=f"small-{R}x{C}-{dtype.id}")
        for R, C in ((37, 7), (37, 65), (5, 1000)):
            yield pytest.param("strided", R, C, dtype.values[0], id=f"strided-{R}x{C}-{dtype.id}")
        for R, C in ((1, 1000), (130, 10), (37, 17), (3, 2), (9, 65)):
            yield pytest.param("default", R, C, dtype.values[0], id=f"default-{R}x{C}-{dtype.id}")


@needs_gxx
@pytest.mark.parametrize("config_name,R,C,dtype", list(_cases()))
def test_emulated_kernels_match_reference(make_fake, config_name, R, C, dtype):
    fake = make_fake()
    eps = 0.1 if C % 2 else 0.0
    check(R, C, dtype, CONFIGS[config_name], eps)
    sfx = "f32" if dtype == np.float32 else "f64"
    assert [name for name, _, _ in fake.launches] == [
        f"{e}_{sfx}" for e in ("softmax_forward", "softmax_backward", "log_softmax_forward",
                               "log_softmax_backward", "cross_entropy_forward",
                               "cross_entropy_backward")]
    assert fake.compiles == [softmax_cuda.compile_options(dtype, CONFIGS[config_name])]


@needs_gxx
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("C", [7, 65])
def test_emulated_kernels_masked_nan_huge_logits_and_bad_labels(make_fake, C, eps, dtype):
    make_fake()
    check(23, C, dtype, SMALL, eps, special=True)
    x, _, labels, _ = make(23, C, dtype, special=True)
    losses = softmax_cuda.cross_entropy_rows(fake_cupy.asarray(x), fake_cupy.asarray(labels),
                                             eps, config=SMALL)[0].get()
    assert np.isnan(losses[[0, 1, 7]]).all()  # labels -1 and C, and the fully masked row
    assert losses[6] == np.inf  # -inf at the label


@needs_gxx
def test_emulated_mean_scale_and_int32_labels(make_fake):
    """A mean's gradient: one device scalar for every row, divided by N in the kernel; labels
    of another integer dtype are converted on the device."""
    make_fake()
    x, _, labels, _ = make(9, 7, np.float64)
    X = fake_cupy.asarray(x)
    L32 = fake_cupy.asarray(labels.astype(np.int32))
    losses, shift, log_sum = softmax_cuda.cross_entropy_rows(X, L32, 0.1, config=SMALL)
    gy = fake_cupy.asarray(np.array(2.0))
    gz = softmax_cuda.cross_entropy_grad(X, L32, 0.1, shift, log_sum, gy, 9, config=SMALL).get()
    _, (_, gz_ref, _, _) = reference(x, x, labels, np.full(9, 2.0 / 9), 0.1)
    np.testing.assert_allclose(gz, gz_ref, **F64_TOL)


def test_launcher_refuses_bad_arguments_before_any_launch(monkeypatch, tmp_path):
    device = fake_cupy.SimtDevice(builder=None, workdir=tmp_path)
    monkeypatch.setattr(cuda_launch, "require_cupy", lambda what="": fake_cupy)
    monkeypatch.setattr(fake_cupy, "_device", device)
    cuda_launch.clear_cache()
    z = fake_cupy.zeros((3, 4))
    labels = fake_cupy.zeros(3, np.int64)
    stats = fake_cupy.zeros(3)
    cases = [
        (lambda: softmax_cuda.softmax(fake_cupy.zeros(4)), ValueError,
         r"expected a \(rows, C\) float32 or float64 array with C >= 1; got float64 of "
         r"shape \(4,\)"),
        (lambda: softmax_cuda.softmax(fake_cupy.zeros((3, 0))), ValueError, "C >= 1"),
        (lambda: softmax_cuda.log_softmax(fake_cupy.zeros((3, 4), np.int32)), ValueError,
         "got int32"),
        (lambda: softmax_cuda.softmax_grad(z, fake_cupy.zeros((3, 4), np.float32)), ValueError,
         r"expected float64 arrays of shape \(3, 4\); got float32 of shape \(3, 4\)"),
        (lambda: softmax_cuda.log_softmax_grad(z, fake_cupy.zeros((4, 3))), ValueError,
         r"got float64 of shape \(4, 3\)"),
        (lambda: softmax_cuda.cross_entropy_rows(z, fake_cupy.zeros(4, np.int64), 0.0),
         ValueError, r"labels must have shape \(3,\); got \(4,\)"),
        (lambda: softmax_cuda.cross_entropy_grad(z, labels, 0.0, fake_cupy.zeros(3, np.float32),
                                                 stats, stats, 1),
         ValueError, r"shift must be float64 of shape \(3,\); got float32 of shape \(3,\)"),
        (lambda: softmax_cuda.cross_entropy_grad(z, labels, 0.0, stats, fake_cupy.zeros(2),
                                                 stats, 1),
         ValueError, r"log_sum must be float64 of shape \(3,\); got float64 of shape \(2,\)"),
        (lambda: softmax_cuda.cross_entropy_grad(z, labels, 0.0, stats, stats,
                                                 fake_cupy.zeros((3, 1)), 1),
         ValueError, r"scale must have shape \(\) or \(3,\); got \(3, 1\)"),
        (lambda: softmax_cuda._CROSS_ENTROPY(np.float64, (1, 1, 1), (4, 2, 1),
                                             (z, labels.astype(np.int32), stats, stats, stats,
                                              3, 4, 1.0, 0.0, 0)),
         TypeError, "cross_entropy_forward: argument 'labels' must have dtype int64; got int32"),
    ]
    for call, exc, message in cases:
        with pytest.raises(exc, match=message):
            call()
    assert device.launches == [] and device.compiles == []


@needs_gxx
def test_empty_rows_launch_nothing(make_fake):
    fake = make_fake()
    z = fake_cupy.zeros((0, 5))
    assert softmax_cuda.softmax(z).shape == (0, 5)
    losses, shift, log_sum = softmax_cuda.cross_entropy_rows(z, fake_cupy.zeros(0, np.int64), 0.1)
    assert losses.shape == shift.shape == log_sum.shape == (0,)
    assert fake.launches == []


@needs_gxx
def test_emulated_kernels_are_race_free_under_tsan(make_fake, harness_builder):
    reason = binary_unusable(harness_builder, "tsan", softmax_cuda.KERNEL_FILE,
                             softmax_cuda.compile_options(np.float32, SMALL))
    if reason:
        pytest.skip(reason)
    make_fake("tsan")
    check(9, 13, np.float32, SMALL, 0.1)
    make_fake("tsan-broken-sync")
    with pytest.raises(HarnessError, match="ThreadSanitizer: data race"):
        check(9, 13, np.float32, SMALL, 0.1)


# =====================================================================================
# GPU: the ops through cupy (a real GPU, or --fake-cupy)
# =====================================================================================


@pytest.mark.gpu
def test_gpu_dispatch_picks_the_cuda_kernels_for_cupy_floats_only():
    from diagnet.fused import softmax as cpu

    cp = backend.cupy_or_none()
    assert softmax_kernels(np.zeros((2, 3))) is cpu
    assert softmax_kernels(cp.zeros((2, 3), np.float32)) is softmax_cuda
    assert softmax_kernels(cp.zeros((2, 3), np.float64)) is softmax_cuda
    assert softmax_kernels(cp.zeros((2, 3), np.int64)) is None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("R,C", [(37, 17), (130, 10), (4, 1000)])
def test_gpu_kernels_match_reference(R, C, dtype):
    check(R, C, dtype, None, 0.1, special=True, dev=backend.cupy_or_none().asarray)


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gpu_ops_run_the_kernels_and_match_the_cpu(reduction):
    rng = np.random.default_rng(14)
    x = rng.standard_normal((2, 3, 17))
    labels = rng.integers(0, 17, size=(2, 3))
    g = rng.standard_normal(x.shape)
    results = []
    for device in ("cpu", "cuda"):
        values = []
        for op in (F.softmax, F.log_softmax):
            t = diagnet.tensor(x, device=device, requires_grad=True)
            y = op(t)
            assert (y.creator.kernels is softmax_cuda) == (device == "cuda")
            y.backward(diagnet.tensor(g, device=device))
            values += [y.numpy(), t.grad.numpy()]
        t = diagnet.tensor(x, device=device, requires_grad=True)
        loss = F.cross_entropy(t, diagnet.tensor(labels, device=device), label_smoothing=0.1,
                               reduction=reduction)
        assert (loss.creator.kernels is softmax_cuda) == (device == "cuda")
        loss.backward(None if loss.ndim == 0 else diagnet.tensor(g[..., 0], device=device))
        values += [loss.numpy(), t.grad.numpy()]
        results.append(values)
    for got, want in zip(*results[::-1]):
        np.testing.assert_allclose(got, want, **F64_TOL)


@pytest.mark.gpu
def test_gpu_cross_entropy_device_labels_out_of_range_are_nan_rows():
    """Labels on the GPU go to the kernel unchecked and unclipped: its rows are NaN."""
    z = diagnet.tensor(np.random.default_rng(15).standard_normal((3, 4)), device="cuda",
                       requires_grad=True)
    loss = F.cross_entropy(z, diagnet.tensor(np.array([1, 4, -1]), device="cuda"),
                           reduction="none")
    assert loss.creator.kernels is softmax_cuda and loss.creator.valid is None
    out = loss.numpy()
    assert np.isfinite(out[0]) and np.isnan(out[1:]).all()
    loss.sum().backward()
    g = z.grad.numpy()
    assert np.isfinite(g[0]).all() and np.isnan(g[1:]).all()
