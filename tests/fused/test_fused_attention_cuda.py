"""The CUDA kernels of scaled dot-product attention (``kernels/attention.cu``) against the
composed reference (`diagnet.ops.attention.reference_forward` / ``reference_backward``).

* **nvcc** compiles the file for sm_80 and sm_90 with the launcher's options: no warnings,
  spills or stack, static shared memory within 48 KiB.
* **SIMT harness**: the real launcher (`diagnet.fused.attention_cuda`) with the CuPy stand-in
  runs the kernels on the CPU, with small blocks (32 threads, query tiles of 3, so every
  loop is ragged) and with the default ones; keys ``S`` in 1, 2, 17, 33, 64, head widths
  1, 8, 16, 33, with and without a mask (a fully masked query included, and broadcast
  shapes) and dropout multiplier.
* **GPU** (marked ``gpu``): the op through whatever ``cupy`` is (``--fake-cupy`` included):
  the dispatch picks the kernels where the shapes fit and the composed version elsewhere.

Tolerances (from `tolerances`): float64 values ``F64_TOL`` and gradients ``F64_GRAD_TOL``
(the same sums in another order); float32 results against the float64 reference
``F32_TOL`` and ``F32_GRAD_TOL``.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
from simt import fake_cupy
from simt.harness import (GXX, KERNEL_DIR, NO_GXX_REASON, HarnessError, binary_unusable,
                          shared_builder)
from simt.nvcc import NVCC, nvcc_compile

import diagnet as dn
from diagnet import backend, cuda_launch, settings
from diagnet import functional as F
from diagnet.fused import attention_cuda
from diagnet.ops import attention as ops_attention
from diagnet.ops.attention import MASKED_SCORE, reference_backward, reference_forward
from tolerances import F32_GRAD_TOL, F32_TOL, F64_GRAD_TOL, F64_TOL, GRADCHECK_TOL

needs_gxx = pytest.mark.skipif(GXX is None, reason=NO_GXX_REASON)

#: 32 threads and query tiles of 3: every loop over (query, key) pairs, features and tiles is
#: ragged; float64 heads of up to 40 features so that the width 33 runs in both dtypes.
SMALL = attention_cuda.AttentionConfig(threads=32, query_tile=3, max_dim_f64=40)
#: The same kernels with grid.x capped at 1: one block walks every lane.
STRIDED = dataclasses.replace(SMALL, max_grid=1)


def make(B, H, L, S, E, Ev, dtype=np.float64, mask_shape=None, dropped=False, seed=0):
    """q, k, v, dout; a bool mask of ``mask_shape`` (None: none) whose query 0 (of its first
    batch and head) may attend to no key; a dropout multiplier (``dropped``) or None."""
    rng = np.random.default_rng([seed, B, H, L, S, E, Ev])
    q = rng.standard_normal((B, H, L, E)).astype(dtype)
    k = rng.standard_normal((B, H, S, E)).astype(dtype)
    v = rng.standard_normal((B, H, S, Ev)).astype(dtype)
    dout = rng.standard_normal((B, H, L, Ev)).astype(dtype)
    mask = None
    if mask_shape is not None:
        mask = rng.random(mask_shape) < 0.6
        mask[(0,) * (len(mask_shape) - 1)] = False
    drop = ((rng.random((B, H, L, S)) >= 0.25) / 0.75).astype(dtype) if dropped else None
    return q, k, v, dout, mask, drop


def check_kernels(fwd, bwd, shape, dtype, mask_shape=None, dropped=False):
    """Run ``fwd``/``bwd`` (host arrays in and out) and compare with the reference."""
    q, k, v, dout, mask, drop = make(*shape, dtype=dtype, mask_shape=mask_shape, dropped=dropped)
    scale = 1 / math.sqrt(shape[4])
    out, w = fwd(q, k, v, mask, drop, scale)
    dq, dk, dv = bwd(dout, q, k, v, w, mask, drop, scale)
    B, H, L, S, E, Ev = shape
    for got, want_shape in ((out, (B, H, L, Ev)), (w, (B, H, L, S)), (dq, q.shape),
                            (dk, k.shape), (dv, v.shape)):
        assert got.shape == want_shape and got.dtype == dtype
    up = [None if a is None else a.astype(np.float64) for a in (q, k, v, dout, drop)]
    q64, k64, v64, dout64, drop64 = up
    want_out, want_w = reference_forward(q64, k64, v64, mask, drop64, scale, MASKED_SCORE)
    want = reference_backward(dout64, q64, k64, v64, want_w, mask, drop64, scale)
    vtol, gtol = (F64_TOL, F64_GRAD_TOL) if dtype == np.float64 else (F32_TOL, F32_GRAD_TOL)
    np.testing.assert_allclose(out, want_out, **vtol, err_msg="out")
    np.testing.assert_allclose(w, want_w, **vtol, err_msg="weights")
    for name, got, w64 in zip(("dq", "dk", "dv"), (dq, dk, dv), want):
        np.testing.assert_allclose(got, w64, **gtol, err_msg=name)


def device_runner(config, dev=fake_cupy.asarray):
    """``(fwd, bwd)`` that move host arrays to ``dev``, launch the kernels, and copy back."""
    move = (lambda a: None if a is None else dev(a))  # noqa: E731

    def fwd(q, k, v, mask, drop, scale):
        out = attention_cuda.forward(*map(move, (q, k, v, mask, drop)), scale, MASKED_SCORE,
                                     config=config)
        return tuple(a.get() for a in out)

    def bwd(dout, q, k, v, w, mask, drop, scale):
        out = attention_cuda.backward(*map(move, (dout, q, k, v, w, mask, drop)), scale,
                                      config=config)
        return tuple(a.get() for a in out)

    return fwd, bwd


# =====================================================================================
# Pure Python: config, fits, launch geometry
# =====================================================================================


def test_config_defaults_match_source():
    text = (KERNEL_DIR / attention_cuda.KERNEL_FILE).read_text()
    defaults = {name: int(value) for name, value in
                re.findall(r"#ifndef (ATT_\w+)\s*\n#define \1 (\d+)", text)}
    expected = {macro: getattr(attention_cuda.DEFAULT_CONFIG, field)
                for field, macro in attention_cuda.COMPILED_FIELDS.items()}
    assert defaults == dict(expected, ATT_ENABLE_F32=1, ATT_ENABLE_F64=1)


def test_config_validation():
    with pytest.raises(ValueError, match="the float64 tiles need 81984 bytes of shared memory, "
                                         "more than 49152"):
        attention_cuda.AttentionConfig(max_dim_f64=64)
    with pytest.raises(ValueError, match="query_tile <= threads <= 1024"):
        attention_cuda.AttentionConfig(threads=4, query_tile=8)
    with pytest.raises(ValueError, match="AttentionConfig.max_keys must be a positive int"):
        attention_cuda.AttentionConfig(max_keys=0)
    for dtype in (np.float32, np.float64):
        assert attention_cuda.DEFAULT_CONFIG.shared_bytes(dtype) <= attention_cuda.SHARED_BYTES


@pytest.mark.parametrize("q,k,v,dtype,ok", [
    ((128, 4, 17, 16), (128, 4, 17, 16), (128, 4, 17, 16), np.float32, True),  # the ViT's
    ((2, 1, 300, 64), (2, 1, 64, 64), (2, 1, 64, 64), np.float32, True),  # queries unbounded
    ((2, 1, 3, 64), (2, 1, 65, 64), (2, 1, 65, 64), np.float32, False),  # too many keys
    ((2, 1, 3, 65), (2, 1, 5, 65), (2, 1, 5, 8), np.float32, False),  # too wide
    ((2, 1, 3, 8), (2, 1, 5, 8), (2, 1, 5, 33), np.float64, False),  # too wide in float64
    ((2, 1, 3, 32), (2, 1, 5, 32), (2, 1, 5, 32), np.float64, True),
    ((0, 1, 3, 8), (0, 1, 5, 8), (0, 1, 5, 8), np.float32, False),  # empty
    ((2, 1, 0, 8), (2, 1, 5, 8), (2, 1, 5, 8), np.float32, False),
    ((2, 1, 3, 8), (2, 1, 5, 8), (2, 1, 5, 8), np.float16, False),
])
def test_fits(q, k, v, dtype, ok):
    assert attention_cuda.fits(q, k, v, dtype) is ok


@pytest.mark.parametrize("lanes,L", [(1, 1), (512, 17), (10**6, 64), (2**31 - 1, 3)])
def test_launch_config_covers_every_lane_and_query(lanes, L):
    for cfg in (attention_cuda.DEFAULT_CONFIG, SMALL, STRIDED):
        p = attention_cuda.launch_config(lanes, L, cfg)
        assert p.block == (cfg.threads, 1, 1)
        assert 1 <= p.forward_grid[0] == p.backward_grid[0] <= min(lanes, cfg.max_grid)
        tiles = p.forward_grid[1]
        assert tiles * cfg.query_tile >= L > (tiles - 1) * cfg.query_tile
    with pytest.raises(ValueError, match="lanes, L"):
        attention_cuda.launch_config(0, 3)


# =====================================================================================
# nvcc
# =====================================================================================


@pytest.mark.skipif(NVCC is None, reason="nvcc (CUDA toolkit) is not on PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_nvcc_compiles_launcher_options_without_spills(arch, dtype, tmp_path):
    src = KERNEL_DIR / attention_cuda.KERNEL_FILE
    sfx = "f32" if dtype is np.float32 else "f64"
    for config in (attention_cuda.DEFAULT_CONFIG, SMALL):
        res, kernels = nvcc_compile(src, arch, attention_cuda.compile_options(dtype, config),
                                    tmp_path)
        assert res.returncode == 0, res.stderr
        assert "warning" not in (res.stdout + res.stderr).lower(), res.stdout + res.stderr
        assert set(kernels) == {f"attention_forward_{sfx}", f"attention_backward_{sfx}"}
        for name, k in kernels.items():
            assert k["spill_stores"] == 0 and k["spill_loads"] == 0 and k["stack"] == 0, (name, k)
            assert k["smem"] <= config.shared_bytes(dtype) <= attention_cuda.SHARED_BYTES


# =====================================================================================
# SIMT harness, through the real launcher and the CuPy stand-in
# =====================================================================================


@pytest.fixture(scope="module")
def harness_builder():
    if GXX is None:
        pytest.skip(NO_GXX_REASON)
    builder = shared_builder()
    for config in (SMALL, attention_cuda.DEFAULT_CONFIG):
        for dtype in (np.float32, np.float64):
            builder.submit(attention_cuda.KERNEL_FILE,
                           attention_cuda.compile_options(dtype, config), "asan")
    builder.check_flavor(attention_cuda.KERNEL_FILE,
                         attention_cuda.compile_options(np.float64, SMALL))
    return builder




#: (S, width, mask, dropout): every key count and head width of the brief, each width with
#: each key count, the mask and dropout cases rotating over them.
_VARIANTS = [(None, False), ("key", True), ("full", False), ("row", True)]
_MASK_SHAPES = {"key": lambda B, H, L, S: (B, 1, 1, S), "full": lambda B, H, L, S: (B, H, L, S),
                "row": lambda B, H, L, S: (L, S)}
EMULATED = [(S, d, *_VARIANTS[(a + b) % 4]) for a, S in enumerate([1, 2, 17, 33, 64])
            for b, d in enumerate([1, 8, 16, 33])]


def _mask_shape(kind, B, H, L, S):
    return None if kind is None else _MASK_SHAPES[kind](B, H, L, S)


@needs_gxx
@pytest.mark.parametrize("S,d,mask,dropped", EMULATED)
def test_emulated_kernels_match_reference_float64(make_fake, S, d, mask, dropped):
    fake = make_fake()
    B, H, L = 2, 1, min(S, 7)  # L != S where S > 7: cross-attention, queries ragged in tiles
    check_kernels(*device_runner(SMALL), (B, H, L, S, d, d + 1), np.float64,
                  _mask_shape(mask, B, H, L, S), dropped)
    assert [name for name, _, _ in fake.launches] == ["attention_forward_f64",
                                                      "attention_backward_f64"]


@needs_gxx
@pytest.mark.parametrize("S,d,mask,dropped", EMULATED[::3])
def test_emulated_kernels_float32_within_tolerance(make_fake, S, d, mask, dropped):
    make_fake()
    B, H, L = 1, 2, 5
    check_kernels(*device_runner(SMALL), (B, H, L, S, d, d), np.float32,
                  _mask_shape(mask, B, H, L, S), dropped)


@needs_gxx
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape,mask", [((2, 2, 17, 17, 16, 16), "full"),  # the ViT's head
                                        ((1, 1, 9, 64, 32, 32), "key")])  # the maxima
def test_emulated_kernels_default_config(make_fake, shape, mask, dtype):
    """The real default blocks (128 threads, query tiles of 8) and compile options."""
    fake = make_fake()
    check_kernels(*device_runner(None), shape, dtype, _mask_shape(mask, *shape[:4]), True)
    assert fake.compiles == [attention_cuda.compile_options(dtype)]
    assert [block for _, _, block in fake.launches] == [(128, 1, 1)] * 2


@needs_gxx
def test_emulated_blocks_walk_the_lanes_beyond_the_grid(make_fake):
    fake = make_fake()
    check_kernels(*device_runner(STRIDED), (3, 2, 4, 5, 3, 2), np.float64, (3, 1, 4, 5), True)
    assert [grid for _, grid, _ in fake.launches] == [(1, 2, 1), (1, 1, 1)]


@needs_gxx
def test_fully_masked_query_attends_uniformly_in_the_kernel(make_fake):
    make_fake()
    q, k, v, dout, _, _ = make(1, 1, 3, 4, 2, 3)
    mask = np.ones((3, 4), bool)
    mask[1] = False
    fwd, bwd = device_runner(SMALL)
    out, w = fwd(q, k, v, mask, None, 0.5)
    np.testing.assert_allclose(w[0, 0, 1], 0.25, **F64_TOL)
    np.testing.assert_allclose(out[0, 0, 1], v[0, 0].mean(axis=0), **F64_TOL)
    dout[0, 0, [0, 2]] = 0  # only the masked query's output is differentiated
    dq, dk, dv = bwd(dout, q, k, v, w, mask, None, 0.5)
    assert not dq.any() and not dk.any()
    np.testing.assert_allclose(dv[0, 0], np.tile(dout[0, 0, 1] / 4, (4, 1)), **F64_TOL)


def test_launcher_refuses_shapes_beyond_the_maxima_before_any_launch(monkeypatch, tmp_path):
    device = fake_cupy.SimtDevice(builder=None, workdir=tmp_path)
    monkeypatch.setattr(cuda_launch, "require_cupy", lambda what="": fake_cupy)
    monkeypatch.setattr(fake_cupy, "_device", device)
    cuda_launch.clear_cache()
    q = fake_cupy.zeros((1, 1, 2, 4), np.float32)
    k = fake_cupy.zeros((1, 1, 65, 4), np.float32)
    with pytest.raises(ValueError, match=r"attention kernels: q \(1, 1, 2, 4\), k \(1, 1, 65, "
                                         r"4\), v \(1, 1, 65, 4\) of float32 exceed the "
                                         r"kernels' maxima \(S <= 64"):
        attention_cuda.forward(q, k, k, None, None, 0.5, MASKED_SCORE)
    w = fake_cupy.zeros((1, 1, 2, 65), np.float32)
    with pytest.raises(ValueError, match="exceed the kernels' maxima"):
        attention_cuda.backward(q, q, k, k, w, None, None, 0.5)
    assert device.launches == [] and device.compiles == []
    cuda_launch.clear_cache()


@needs_gxx
def test_emulated_kernels_are_race_free_under_tsan(make_fake, harness_builder):
    reason = binary_unusable(harness_builder, "tsan", attention_cuda.KERNEL_FILE,
                             attention_cuda.compile_options(np.float32, SMALL))
    if reason:
        pytest.skip(reason)
    shape, mask = (1, 2, 4, 5, 3, 3), (1, 2, 4, 5)
    make_fake("tsan")
    check_kernels(*device_runner(SMALL), shape, np.float32, mask, True)
    make_fake("tsan-broken-sync")
    with pytest.raises(HarnessError, match="ThreadSanitizer: data race"):
        check_kernels(*device_runner(SMALL), shape, np.float32, mask, True)


# =====================================================================================
# GPU: the op through cupy (a real GPU, or --fake-cupy)
# =====================================================================================


def _op_results(shape, device, mask, dropout_p, dtype=np.float64):
    q, k, v, dout, _, _ = make(*shape, dtype=dtype)
    ts = [dn.tensor(a, device=device, requires_grad=True) for a in (q, k, v)]
    y = F.scaled_dot_product_attention(*ts, mask=mask, dropout_p=dropout_p, rng=2)
    (y * dn.tensor(dout, device=device)).sum().backward()
    return [y.numpy()] + [t.grad.numpy() for t in ts]


@pytest.mark.gpu
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("shape", [(2, 2, 17, 17, 16, 16), (1, 2, 3, 65, 4, 4)],
                         ids=["kernels", "fallback"])
def test_gpu_op_matches_the_cpu_and_picks_the_kernels_where_they_fit(shape, dropout_p):
    """The ViT's heads run the CUDA kernels; 65 keys the composed CuPy version. Both agree
    with the CPU in float64; the dropout mask is the same on both devices."""
    settings.set_attention_kernels("blas")  # the default (conftest restores the settings)
    cp = backend.cupy_or_none()
    B, H, L, S, E, Ev = shape
    q, k, v = cp.zeros((B, H, L, E)), cp.zeros((B, H, S, E)), cp.zeros((B, H, S, Ev))
    fused = (attention_cuda.forward, attention_cuda.backward)
    assert (ops_attention._kernels(q, k, v) == fused) is (S <= 64)
    mask = np.random.default_rng(1).random((shape[0], 1, shape[2], shape[3])) < 0.7
    mask[0, 0, 0] = False
    cpu = _op_results(shape, "cpu", mask, dropout_p)
    gpu = _op_results(shape, "cuda", mask, dropout_p)
    for name, g, c in zip(("out", "dq", "dk", "dv"), gpu, cpu):
        np.testing.assert_allclose(g, c, **F64_GRAD_TOL, err_msg=name)


@pytest.mark.gpu
def test_gpu_op_float32_and_gradcheck():
    shape = (1, 2, 3, 4, 2, 3)
    want = _op_results(shape, "cpu", None, 0.2)
    got = _op_results(shape, "cuda", None, 0.2, dtype=np.float32)
    np.testing.assert_allclose(got[0], want[0], **F32_TOL)
    for g, w in zip(got[1:], want[1:]):
        np.testing.assert_allclose(g, w, **F32_GRAD_TOL)
    q, k, v, _, _, _ = make(1, 1, 2, 3, 2, 2)
    ts = [dn.tensor(a, device="cuda", requires_grad=True) for a in (q, k, v)]
    mask = np.array([[True, False, True], [False, False, False]])
    assert dn.gradcheck(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, mask, 0.3,
                                                                       rng=3, scale=0.7),
                        *ts, **GRADCHECK_TOL)
