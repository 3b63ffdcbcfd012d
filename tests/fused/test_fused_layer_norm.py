"""The fused layer norm: numba and CUDA kernels against the composed reference.

* **CPU**: `diagnet.fused.layer_norm_cpu` against `reference_forward`/`reference_backward`,
  float64 to rounding and float32 against the float64 reference (scaled rule), on the serial
  and the parallel path; gradchecks of `F.layer_norm` through the kernels.
* **CUDA without a GPU**: ``kernels/layer_norm.cu`` compiled by nvcc for sm_80/sm_90 (no
  spills), and run by the SIMT harness through the real launcher (`layer_norm_cuda`) with
  the CuPy stand-in, with tiny tiles that make every loop and edge ragged.
* **GPU** (marked ``gpu``): the op through whatever ``cupy`` is (``--fake-cupy`` included).
"""

from __future__ import annotations

import dataclasses
import re

import numba
import numpy as np
import pytest
from simt import fake_cupy
from simt.harness import (GXX, KERNEL_DIR, NO_GXX_REASON, HarnessError, binary_unusable,
                          run_harness, shared_builder)
from simt.nvcc import NVCC, nvcc_compile

import diagnet
from diagnet import backend, cuda_launch
from diagnet import functional as F
from diagnet.fused import layer_norm as ln
from diagnet.fused import layer_norm_cpu, layer_norm_cuda
from diagnet.gradcheck import gradcheck
from helpers import t64
from tolerances import F64_TOL, GRADCHECK_TOL, LAYER_NORM_RTOL

needs_gxx = pytest.mark.skipif(GXX is None, reason=NO_GXX_REASON)

WIDTHS = [1, 2, 7, 64, 65, 768]
ROWS = [1, 3, 17]
AFFINE = {"plain": (False, False), "weight": (True, False), "bias": (False, True),
          "affine": (True, True)}
EPS = 1e-5


def make(R, N, dtype, affine="affine", seed=0):
    """x, dy ``(R, N)`` and weight, bias ``(N,)`` (``None`` where ``affine`` has none)."""
    rng = np.random.default_rng([seed, R, N])
    x = (rng.standard_normal((R, N)) * 2 + 0.5).astype(dtype)
    dy = rng.standard_normal((R, N)).astype(dtype)
    w = (1 + 0.5 * rng.standard_normal(N)).astype(dtype)
    b = rng.standard_normal(N).astype(dtype)
    has_w, has_b = AFFINE[affine]
    return x, dy, (w if has_w else None), (b if has_b else None)


def reference64(x, dy, w, b):
    """Forward and backward of the reference in float64 (from the same, possibly float32, data)."""
    up = (lambda a: None if a is None else a.astype(np.float64))
    x, dy, w, b = up(x), up(dy), up(w), up(b)
    y, mean, rstd = ln.reference_forward(x, w, b, EPS)
    return (y, mean, rstd), ln.reference_backward(dy, x, w, mean, rstd, True)


def scales(x, dy, w):
    """The sums of magnitudes each output of the backward is built from (scaled rule)."""
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    w = np.ones(x.shape[1]) if w is None else np.abs(w.astype(np.float64))
    mean = x.mean(axis=1, keepdims=True)
    rstd = 1 / np.sqrt(((x - mean) ** 2).mean(axis=1, keepdims=True) + EPS)
    xhat = np.abs((x - mean) * rstd) + np.abs(x) * rstd  # the subtraction's rounding, too
    g = np.abs(dy) * w
    dx = rstd * (g + g.mean(axis=1, keepdims=True) + xhat * (g * xhat).mean(axis=1, keepdims=True))
    return dx, (np.abs(dy) * xhat).sum(axis=0), np.abs(dy).sum(axis=0)


def assert_scaled(got, want, scale, rtol):
    err = np.abs(got.astype(np.float64) - want)
    assert np.all(err <= rtol * scale + 1e-30), (err / np.maximum(scale, 1e-300)).max()


def check_against_reference(fwd, bwd, R, N, dtype, affine, seed=0):
    """Run ``fwd``/``bwd`` (host arrays in, host arrays out) and compare with the reference."""
    x, dy, w, b = make(R, N, dtype, affine, seed)
    (y, mean, rstd) = fwd(x, w, b)
    dx, dw, db = bwd(dy, x, w, mean, rstd)
    for a in (y, mean, rstd, dx, dw, db):
        assert a.dtype == dtype
    assert y.shape == dx.shape == (R, N) and mean.shape == rstd.shape == (R,)
    assert dw.shape == db.shape == (N,)
    (y64, mean64, rstd64), (dx64, dw64, db64) = reference64(x, dy, w, b)
    if dtype == np.float64:
        for got, want in ((y, y64), (mean, mean64), (rstd, rstd64)):
            np.testing.assert_allclose(got, want, **F64_TOL)
        # the gradient from the kernel's own mean and rstd is what the reference gives for them
        dx64, dw64, db64 = ln.reference_backward(dy, x, w, mean, rstd, True)
        for got, want, scale in zip((dx, dw, db), (dx64, dw64, db64), scales(x, dy, w)):
            assert_scaled(got, want, scale, 1e-13)
    else:
        # rstd of a constant row is 1 / sqrt(eps): float32 rounding of eps and of the root
        np.testing.assert_allclose(rstd, rstd64, rtol=1e-5)
        np.testing.assert_allclose(mean, mean64, rtol=1e-6, atol=1e-6 * np.abs(x).max())
        np.testing.assert_allclose(y, y64, rtol=1e-5, atol=2e-5)
        for got, want, scale in zip((dx, dw, db), (dx64, dw64, db64), scales(x, dy, w)):
            assert_scaled(got, want, scale, LAYER_NORM_RTOL)


def check_add_variant(add_fwd, add_bwd, fwd, bwd, R, N, dtype, affine, seed=0):
    """The ``add_`` kernels (host arrays in and out) against the reference, and against the
    plain kernels ``fwd``/``bwd`` of the same implementation run on the sum.

    With a zero residual and a zero ``gtotal`` they must pass every check of
    `check_against_reference`; with non-zero ones, ``total`` is ``x + residual`` bit for bit,
    and ``y`` and ``dx - gtotal`` are the plain kernels' on ``total`` (to rounding)."""
    zeros = np.zeros((R, N), dtype)
    check_against_reference(lambda x, w, b: add_fwd(x, zeros, w, b)[1:],
                            lambda dy, x, w, m, r: add_bwd(zeros, dy, x, w, m, r),
                            R, N, dtype, affine, seed)
    x, dy, w, b = make(R, N, dtype, affine, seed)
    rng = np.random.default_rng([seed, R, N, 7])
    res = rng.standard_normal((R, N)).astype(dtype)
    gtotal = rng.standard_normal((R, N)).astype(dtype)
    total, y, mean, rstd = add_fwd(x, res, w, b)
    assert total.dtype == dtype and np.array_equal(total, x + res)
    tol = F64_TOL if dtype == np.float64 else dict(rtol=2e-6, atol=2e-6)
    for got, want in zip((y, mean, rstd), fwd(total, w, b)):
        np.testing.assert_allclose(got, want, **tol)
    dx, dw, db = add_bwd(gtotal, dy, total, w, mean, rstd)
    pdx, pdw, pdb = bwd(dy, total, w, mean, rstd)
    np.testing.assert_allclose(dx, pdx + gtotal, **tol)
    np.testing.assert_allclose(dw, pdw, **tol)
    np.testing.assert_allclose(db, pdb, **tol)


# =====================================================================================
# CPU: numba kernels
# =====================================================================================


def cpu_fwd(x, w, b):
    return layer_norm_cpu.forward(x, w, b, EPS)


def cpu_bwd(dy, x, w, mean, rstd):
    return layer_norm_cpu.backward(dy, x, w, mean, rstd, True)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("affine", list(AFFINE))
@pytest.mark.parametrize("N", WIDTHS)
@pytest.mark.parametrize("R", ROWS + [130])
def test_cpu_kernel_matches_reference(R, N, affine, dtype):
    check_against_reference(cpu_fwd, cpu_bwd, R, N, dtype, affine)


def cpu_add_fwd(x, res, w, b):
    return layer_norm_cpu.add_forward(x, res, w, b, EPS)


def cpu_add_bwd(gtotal, dy, total, w, mean, rstd):
    return layer_norm_cpu.add_backward(gtotal, dy, total, w, mean, rstd, True)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("affine", ["plain", "affine"])
@pytest.mark.parametrize("R,N", [(1, 1), (3, 7), (17, 64), (130, 65), (2, 768), (4099, 96)])
def test_cpu_add_kernels_match_reference(R, N, affine, dtype):
    """Both the serial and (4099 x 96) the parallel path."""
    check_add_variant(cpu_add_fwd, cpu_add_bwd, cpu_fwd, cpu_bwd, R, N, dtype, affine)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_cpu_kernel_parallel_path_matches_and_is_deterministic(dtype):
    """Past the parallel threshold, the parameter sums of the per-task partial rows come out
    bit for bit the same on every call."""
    R, N = 4099, 96
    assert R * N >= max(layer_norm_cpu._PARALLEL_WORK, layer_norm_cpu._PARALLEL_WORK_BACKWARD)
    check_against_reference(cpu_fwd, cpu_bwd, R, N, dtype, "affine")
    x, dy, w, b = make(R, N, dtype)
    y, mean, rstd = cpu_fwd(x, w, b)
    first = cpu_bwd(dy, x, w, mean, rstd)
    for _ in range(3):
        again = cpu_bwd(dy, x, w, mean, rstd)
        for a, c in zip(first, again):
            assert np.array_equal(a, c)
    # one thread (the serial loop) gives the same values to rounding
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        serial = cpu_bwd(dy, x, w, mean, rstd)
    finally:
        numba.set_num_threads(threads)
    for a, c in zip(first, serial):
        np.testing.assert_allclose(a, c, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-4)


def test_cpu_kernel_without_param_grads_and_strided_inputs():
    x, dy, w, b = make(9, 65, np.float64)
    y, mean, rstd = layer_norm_cpu.forward(np.asfortranarray(x), w[::1], b, EPS)
    np.testing.assert_allclose(y, ln.reference_forward(x, w, b, EPS)[0], **F64_TOL)
    dx, dw, db = layer_norm_cpu.backward(np.asfortranarray(dy), x, w, mean, rstd, False)
    assert dw is None and db is None
    np.testing.assert_allclose(dx, ln.reference_backward(dy, x, w, mean, rstd, False)[0],
                               rtol=1e-12, atol=1e-12)


def test_cpu_kernel_propagates_nan_and_inf():
    x, dy, w, b = make(3, 7, np.float64)
    x[1, 2] = np.nan
    x[2, 3] = np.inf
    y = layer_norm_cpu.forward(x, w, b, EPS)[0]
    with np.errstate(invalid="ignore"):
        ry = ln.reference_forward(x, w, b, EPS)[0]
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ry))
    np.testing.assert_allclose(y[0], ry[0], **F64_TOL)


def test_dispatch_picks_by_device_and_env(use_kernels):
    x, dy, w, b = make(4, 7, np.float64)
    kinds = ("forward", "backward", "add_forward", "add_backward")
    assert [ln._implementation(x, k) for k in kinds] == [
        layer_norm_cpu.forward, layer_norm_cpu.backward, layer_norm_cpu.add_forward,
        layer_norm_cpu.add_backward]
    with use_kernels("reference"):
        assert [ln._implementation(x, k) for k in kinds] == [
            ln.reference_forward, ln.reference_backward, ln.reference_add_forward,
            ln.reference_add_backward]


# ---- the op ----------------------------------------------------------------------------


@pytest.mark.parametrize("affine", list(AFFINE))
@pytest.mark.parametrize("shape,ns", [((1, 1), 1), ((3, 2), 2), ((2, 3, 7), 7), ((2, 64), 64),
                                      ((2, 65), 65), ((2, 768), 768), ((2, 3, 4), (3, 4))])
def test_layer_norm_gradcheck_through_kernels(shape, ns, affine):
    rng = np.random.default_rng([1, *shape])
    x = t64(rng.standard_normal(shape) * 2 + 0.5)
    pshape = (ns,) if isinstance(ns, int) else ns
    has_w, has_b = AFFINE[affine]
    w = t64(1 + 0.5 * rng.standard_normal(pshape)) if has_w else None
    b = t64(rng.standard_normal(pshape)) if has_b else None
    inputs = [t for t in (x, w, b) if t is not None]

    def fn(*ts):
        it = iter(ts[1:])
        return F.layer_norm(ts[0], ns, next(it) if has_w else None, next(it) if has_b else None)

    assert gradcheck(fn, *inputs, **GRADCHECK_TOL)


@pytest.mark.parametrize("kernels", ["numba", "reference"])
def test_layer_norm_is_one_node_and_matches_reference(use_kernels, kernels):
    x, dy, w, b = make(6, 7, np.float64)
    (ry, _, _), (rdx, rdw, rdb) = reference64(x, dy, w, b)
    with use_kernels(kernels):
        tx, tw, tb = (diagnet.tensor(a, requires_grad=True) for a in (x.reshape(2, 3, 7), w, b))
        y = F.layer_norm(tx, 7, tw, tb)
        assert type(y.creator).__name__ == "LayerNorm" and len(y.creator.inputs) == 3
        y.backward(diagnet.tensor(dy.reshape(2, 3, 7)))
    np.testing.assert_allclose(y.numpy().reshape(6, 7), ry, **F64_TOL)
    np.testing.assert_allclose(tx.grad.numpy().reshape(6, 7), rdx, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(tw.grad.numpy(), rdw, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(tb.grad.numpy(), rdb, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("affine", list(AFFINE))
@pytest.mark.parametrize("shape,ns", [((1, 1), 1), ((2, 3, 7), 7), ((2, 65), 65),
                                      ((2, 3, 4), (3, 4))])
def test_add_layer_norm_gradcheck_through_kernels(shape, ns, affine):
    """Both outputs feed the checked function, so both gradients reach x and the residual."""
    rng = np.random.default_rng([2, *shape])
    x, res = (t64(rng.standard_normal(shape) * 2 + 0.5) for _ in range(2))
    pshape = (ns,) if isinstance(ns, int) else ns
    has_w, has_b = AFFINE[affine]
    w = t64(1 + 0.5 * rng.standard_normal(pshape)) if has_w else None
    b = t64(rng.standard_normal(pshape)) if has_b else None
    inputs = [t for t in (x, res, w, b) if t is not None]

    def fn(*ts):
        it = iter(ts[2:])
        total, normed = F.add_layer_norm(ts[0], ts[1], ns, next(it) if has_w else None,
                                         next(it) if has_b else None)
        return total * normed + normed

    assert gradcheck(fn, *inputs, **GRADCHECK_TOL)


@pytest.mark.parametrize("kernels", ["numba", "reference"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_add_layer_norm_is_one_node_and_equals_add_then_layer_norm(use_kernels, kernels, dtype):
    """The same values and gradients, bit for bit, as ``x + residual`` then `layer_norm` (the
    same kernels on the same sums), from one node with two outputs."""
    rng = np.random.default_rng(3)
    x, res, g1, g2 = (rng.standard_normal((2, 17, 64)).astype(dtype) for _ in range(4))
    w, b = (rng.standard_normal(64).astype(dtype) for _ in range(2))
    results = []
    with use_kernels(kernels):
        for fused in (True, False):
            tx, tr, tw, tb = (diagnet.tensor(a, requires_grad=True) for a in (x, res, w, b))
            if fused:
                total, normed = F.add_layer_norm(tx, tr, 64, tw, tb)
                assert total.creator is normed.creator
                assert type(total.creator).__name__ == "AddLayerNorm"
            else:
                total = tx + tr
                normed = F.layer_norm(total, 64, tw, tb)
            (total * diagnet.tensor(g1) + normed * diagnet.tensor(g2)).sum().backward()
            results.append([a.numpy() for a in (total, normed, tx.grad, tr.grad, tw.grad, tb.grad)])
    for got, want in zip(*results):
        assert got.dtype == dtype
        if kernels == "reference":
            np.testing.assert_array_equal(got, want)
        else:  # the add kernel's loops are compiled apart from the plain one's: to rounding
            np.testing.assert_allclose(got, want, **(F64_TOL if dtype == np.float64 else
                                                     dict(rtol=2e-6, atol=2e-6)))


def test_add_layer_norm_unused_sum_and_param_grads():
    """Only ``normed`` used: the engine hands the node a zero gradient for ``total``; without
    parameters needing gradients none are computed."""
    rng = np.random.default_rng(4)
    x, res = (rng.standard_normal((5, 9)) for _ in range(2))
    tx = diagnet.tensor(x, requires_grad=True)
    tw = diagnet.tensor(np.ones(9))
    _, normed = F.add_layer_norm(tx, diagnet.tensor(res), 9, tw)
    normed.sum().backward()
    _, mean, rstd = ln.reference_forward(x + res, None, None, EPS)
    want = ln.reference_backward(np.ones((5, 9)), x + res, None, mean, rstd, False)[0]
    np.testing.assert_allclose(tx.grad.numpy(), want, rtol=1e-12, atol=1e-12)
    assert tw.grad is None


def test_add_layer_norm_refuses_bad_arguments_before_any_kernel():
    x = diagnet.tensor(np.ones((2, 3)), requires_grad=True)
    with pytest.raises(TypeError, match="add_layer_norm: residual must be a Tensor; got ndarray"):
        F.add_layer_norm(x, np.ones((2, 3)), 3)
    with pytest.raises(TypeError, match="add_layer_norm: residual must have x's dtype float64; "
                                        "got float32"):
        F.add_layer_norm(x, diagnet.tensor(np.ones((2, 3), np.float32)), 3)
    with pytest.raises(ValueError, match=r"add_layer_norm: residual must have x's shape \(2, 3\); "
                                         r"got \(1, 3\)"):
        F.add_layer_norm(x, diagnet.tensor(np.ones((1, 3))), 3)
    with pytest.raises(ValueError, match=r"add_layer_norm: normalized_shape \(4,\) does not"):
        F.add_layer_norm(x, x, 4)
    with pytest.raises(ValueError, match=r"layer_norm: residual must have shape \(2, 3\)"):
        ln.add_forward(np.ones((2, 3)), np.ones((3, 2)), None, None, EPS)
    with pytest.raises(ValueError, match=r"layer_norm: gtotal must have shape \(2, 3\)"):
        ln.add_backward(np.ones(6), np.ones((2, 3)), np.ones((2, 3)), None, np.ones(2),
                        np.ones(2), True)
    assert x.grad is None


def test_layer_norm_only_requested_grads_and_empty_rows():
    x, dy, w, b = make(3, 5, np.float32)
    tx = diagnet.tensor(x)
    tw = diagnet.tensor(w, requires_grad=True)
    F.layer_norm(tx, 5, tw).sum().backward()
    assert tx.grad is None and tw.grad is not None and tw.grad.dtype == np.float32
    empty = diagnet.tensor(np.zeros((0, 5), np.float32), requires_grad=True)
    tw.grad = None
    out = F.layer_norm(empty, 5, tw, diagnet.tensor(b))
    assert out.shape == (0, 5)
    out.sum().backward()
    assert empty.grad.shape == (0, 5) and not tw.grad.numpy().any()


def test_layer_norm_refuses_input_changed_in_place_before_backward():
    """The saved rows are a view of x: the version counter sees a later in-place change."""
    x = diagnet.tensor(np.arange(12.0).reshape(3, 4), requires_grad=True)
    y = F.layer_norm(x * 1.0, 4)
    h = x * 1.0
    z = F.layer_norm(h, 4)
    with diagnet.no_grad():
        h.add_(1.0)
    with pytest.raises(RuntimeError, match="changed in place"):
        z.sum().backward()
    y.sum().backward()


def test_layer_norm_refuses_bad_input_before_any_kernel():
    with pytest.raises(TypeError,
                       match=r"layer_norm: x must be float32 or float64; got dtype int64"):
        F.layer_norm(diagnet.tensor(np.arange(6).reshape(2, 3)), 3)
    x = np.ones((2, 3))
    with pytest.raises(ValueError, match=r"layer_norm: weight must have shape \(3,\); got \(4,\)"):
        ln.forward(x, np.ones(4), None, EPS)
    with pytest.raises(TypeError, match="layer_norm: bias must have dtype float64; got float32"):
        ln.forward(x, None, np.ones(3, np.float32), EPS)
    with pytest.raises(ValueError, match=r"layer_norm: rstd must have shape \(2,\); got \(3,\)"):
        ln.backward(x, x, None, np.ones(2), np.ones(3), True)
    with pytest.raises(ValueError, match=r"layer_norm: dy must have shape \(2, 3\); got \(3, 2\)"):
        ln.backward(x.T.copy(), x, None, np.ones(2), np.ones(2), True)
    with pytest.raises(ValueError, match=r"x must be \(rows, N\) with N >= 1; got shape \(6,\)"):
        ln.forward(np.ones(6), None, None, EPS)


# =====================================================================================
# CUDA: nvcc, and the SIMT harness through the real launcher
# =====================================================================================

SMALL = layer_norm_cuda.LayerNormConfig(threads=8, reduce_x=4, reduce_y=2, backward_blocks=3)
STRIDED = dataclasses.replace(SMALL, max_grid=2)
CONFIGS = {"small": SMALL, "strided": STRIDED}


def test_config_defaults_match_source():
    text = (KERNEL_DIR / layer_norm_cuda.KERNEL_FILE).read_text()
    defaults = {name: int(value) for name, value in
                re.findall(r"#ifndef (LN_\w+)\s*\n#define \1 (\d+)", text)}
    expected = {macro: getattr(layer_norm_cuda.DEFAULT_CONFIG, field)
                for field, macro in layer_norm_cuda.COMPILED_FIELDS.items()}
    assert defaults == dict(expected, LN_ENABLE_F32=1, LN_ENABLE_F64=1)


@pytest.mark.parametrize("config", [layer_norm_cuda.DEFAULT_CONFIG, SMALL, STRIDED],
                         ids=["default", "small", "strided"])
@pytest.mark.parametrize("R,N", [(1, 1), (3, 7), (2176, 64), (5, 768), (10**6, 65),
                                 (2**31 - 1, 3), (7, 2**20)])
def test_launch_config_covers_every_row_and_column(config, R, N):
    p = layer_norm_cuda.launch_config(R, N, config)
    bx, by, bz = p.block
    assert bx * by == config.threads and bz == 1 and bx & (bx - 1) == 0
    assert bx <= max(1, N)  # no thread row wider than the row
    assert 1 <= p.forward_grid[0] <= config.max_grid
    assert p.rows_per_block % by == 0
    assert p.backward_grid[0] * p.rows_per_block >= R > (p.backward_grid[0] - 1) * p.rows_per_block
    assert p.backward_grid[0] <= config.backward_blocks
    assert p.partial_rows == p.backward_grid[0] * by
    assert p.reduce_grid[1] == 2 and 1 <= p.reduce_grid[0] <= config.max_grid
    with pytest.raises(ValueError, match="R, N"):
        layer_norm_cuda.launch_config(0, N, config)


def test_layer_norm_config_validation():
    with pytest.raises(ValueError, match="power of two"):
        layer_norm_cuda.LayerNormConfig(threads=96)
    with pytest.raises(ValueError, match="reduce_y must be a power of two"):
        layer_norm_cuda.LayerNormConfig(reduce_y=3)
    with pytest.raises(ValueError, match="positive int"):
        layer_norm_cuda.LayerNormConfig(backward_blocks=0)


@pytest.mark.skipif(NVCC is None, reason="nvcc (CUDA toolkit) is not on PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_nvcc_compiles_launcher_options_without_spills(arch, dtype, tmp_path):
    src = KERNEL_DIR / layer_norm_cuda.KERNEL_FILE
    for config in (layer_norm_cuda.DEFAULT_CONFIG, SMALL):
        options = layer_norm_cuda.compile_options(dtype, config)
        res, kernels = nvcc_compile(src, arch, options, tmp_path)
        assert res.returncode == 0, res.stderr
        assert "warning" not in (res.stdout + res.stderr).lower(), res.stdout + res.stderr
        sfx = "f32" if dtype is np.float32 else "f64"
        entries = ("forward", "backward", "param_reduce", "add_forward", "add_backward")
        assert set(kernels) == {f"layer_norm_{k}_{sfx}" for k in entries}
        for name, k in kernels.items():
            assert k["spill_stores"] == 0 and k["spill_loads"] == 0 and k["stack"] == 0, (name, k)


@pytest.fixture(scope="module")
def harness_builder():
    if GXX is None:
        pytest.skip(NO_GXX_REASON)
    builder = shared_builder()
    for config in (SMALL, layer_norm_cuda.DEFAULT_CONFIG):
        for dtype in (np.float32, np.float64):
            builder.submit(layer_norm_cuda.KERNEL_FILE,
                           layer_norm_cuda.compile_options(dtype, config), "asan")
    builder.check_flavor(layer_norm_cuda.KERNEL_FILE,
                         layer_norm_cuda.compile_options(np.float32, SMALL))
    return builder




def gpu_runner(config, dev=fake_cupy.asarray):
    def fwd(x, w, b):
        out = layer_norm_cuda.forward(dev(x), None if w is None else dev(w),
                                      None if b is None else dev(b), EPS, config=config)
        return tuple(a.get() for a in out)

    def bwd(dy, x, w, mean, rstd):
        out = layer_norm_cuda.backward(dev(dy), dev(x), None if w is None else dev(w),
                                       dev(mean), dev(rstd), True, config=config)
        return tuple(a.get() for a in out)

    return fwd, bwd


@needs_gxx
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("affine", ["plain", "affine", "weight"])
@pytest.mark.parametrize("R,N", [(1, 1), (3, 2), (5, 7), (17, 65), (9, 64), (2, 768)])
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_emulated_kernels_match_reference(make_fake, config_name, R, N, affine, dtype):
    fake = make_fake()
    check_against_reference(*gpu_runner(CONFIGS[config_name]), R, N, dtype, affine)
    names = [name for name, _, _ in fake.launches]
    sfx = "f32" if dtype == np.float32 else "f64"
    assert names == [f"layer_norm_forward_{sfx}", f"layer_norm_backward_{sfx}",
                     f"layer_norm_param_reduce_{sfx}"]


def gpu_add_runner(config, dev=fake_cupy.asarray):
    """`add_forward`/`add_backward` of the launcher, host arrays in and out."""
    opt = (lambda a: None if a is None else dev(a))

    def add_fwd(x, res, w, b):
        out = layer_norm_cuda.add_forward(dev(x), dev(res), opt(w), opt(b), EPS, config=config)
        return tuple(a.get() for a in out)

    def add_bwd(gtotal, dy, total, w, mean, rstd):
        out = layer_norm_cuda.add_backward(dev(gtotal), dev(dy), dev(total), opt(w), dev(mean),
                                           dev(rstd), True, config=config)
        return tuple(a.get() for a in out)

    return add_fwd, add_bwd


@needs_gxx
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("affine", ["plain", "affine"])
@pytest.mark.parametrize("R,N", [(1, 1), (5, 7), (17, 65), (2, 768)])
@pytest.mark.parametrize("config_name", list(CONFIGS) + ["default"])
def test_emulated_add_kernels_match_reference(make_fake, config_name, R, N, affine, dtype):
    config = CONFIGS.get(config_name)
    fake = make_fake()
    check_add_variant(*gpu_add_runner(config), *gpu_runner(config), R, N, dtype, affine)
    sfx = "f32" if dtype == np.float32 else "f64"
    names = {name for name, _, _ in fake.launches}
    assert {f"layer_norm_add_forward_{sfx}", f"layer_norm_add_backward_{sfx}"} <= names


@needs_gxx
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("R,N", [(130, 64), (3, 768), (40, 1)])
def test_emulated_kernels_default_config(make_fake, R, N, dtype):
    """The real default tiles (256-thread blocks) and compile options."""
    fake = make_fake()
    check_against_reference(*gpu_runner(None), R, N, dtype, "affine")
    assert fake.compiles == [layer_norm_cuda.compile_options(dtype)]
    for _, grid, block in fake.launches[:2]:
        assert block[0] * block[1] == 256


@needs_gxx
def test_emulated_paths_are_exercised(make_fake):
    """The small cases above loop: grid-stride forward, several rows per backward block and
    thread row, several partial rows and column tiles in the reduction."""
    plan = layer_norm_cuda.launch_config(17, 65, STRIDED)
    assert plan.block == (8, 1, 1) and plan.forward_grid == (2, 1, 1) < (17, 1, 1)
    assert plan.rows_per_block > plan.block[1] and plan.partial_rows == 3
    assert plan.reduce_grid[0] == 2 < 65 / STRIDED.reduce_x
    fake = make_fake()
    x, dy, w, b = make(17, 65, np.float64)
    _, mean, rstd = map(fake_cupy.asarray, ln.reference_forward(x, None, None, EPS))
    dx, dw, db = layer_norm_cuda.backward(fake_cupy.asarray(dy), fake_cupy.asarray(x), None,
                                          mean, rstd, False, config=STRIDED)
    assert dw is None and db is None and len(fake.launches) == 1  # no partial sums, no reduction


@needs_gxx
def test_emulated_kernels_are_race_free_under_tsan(make_fake, harness_builder):
    reason = binary_unusable(harness_builder, "tsan", layer_norm_cuda.KERNEL_FILE,
                             layer_norm_cuda.compile_options(np.float32, SMALL))
    if reason:
        pytest.skip(reason)
    make_fake("tsan")
    check_against_reference(*gpu_runner(SMALL), 9, 13, np.float32, "affine")
    make_fake("tsan-broken-sync")
    with pytest.raises(HarnessError, match="ThreadSanitizer: data race"):
        check_against_reference(*gpu_runner(SMALL), 9, 13, np.float32, "affine")


@needs_gxx
def test_harness_rejects_a_double_for_a_float_parameter(harness_builder, tmp_path):
    """The harness derives the signatures from the declarations: eps of the f32 kernel is a
    float, so a float64 scalar (what CuPy makes of a Python float) is refused."""
    binary = harness_builder.build(layer_norm_cuda.KERNEL_FILE,
                                   layer_norm_cuda.compile_options(np.float32, SMALL),
                                   harness_builder.flavor)
    x = np.ones((1, 2), np.float32)
    args = (x, x, x, x.copy(), np.empty(1, np.float32), np.empty(1, np.float32), np.int32(1),
            np.int32(2), np.int32(0), np.int32(0))
    with pytest.raises(HarnessError, match="argument 10 should be 'f'"):
        run_harness(binary, "layer_norm_forward_f32", (1, 1, 1), (2, 4, 1),
                    args + (np.float64(1e-5),), tmp_path)
    out = run_harness(binary, "layer_norm_forward_f32", (1, 1, 1), (2, 4, 1),
                      args + (np.float32(1e-5),), tmp_path)
    assert sorted(out) == [3, 4, 5]


def test_launcher_refuses_bad_arguments_before_compiling(monkeypatch, tmp_path):
    """The generic launcher checks each argument against the signature (no compiler needed)."""
    device = fake_cupy.SimtDevice(builder=None, workdir=tmp_path)
    monkeypatch.setattr(cuda_launch, "require_cupy", lambda what="": fake_cupy)
    monkeypatch.setattr(fake_cupy, "_device", device)
    cuda_launch.clear_cache()
    k = layer_norm_cuda._REDUCE
    out = fake_cupy.empty((2, 3), np.float32)
    good = (fake_cupy.zeros((2, 1, 3), np.float32), out, 1, 3)
    cases = [
        ((np.zeros((2, 1, 3), np.float32),) + good[1:], TypeError,
         r"layer_norm_param_reduce: argument 'partial' must be a cupy.ndarray; got numpy.ndarray"),
        ((fake_cupy.zeros((2, 1, 3)),) + good[1:], TypeError,
         r"argument 'partial' must have dtype float32; got float64"),
        ((fake_cupy.zeros((3, 2), np.float32).T,) + good[1:], ValueError, "must be C-contiguous"),
        (good[:2] + (2**31, 3), ValueError, r"argument 'P' must fit a 32-bit int; got 2147483648"),
        (good[:2] + (1.0, 3), TypeError, r"argument 'P' must be an int; got builtins.float"),
        (good[:3], TypeError, r"takes 4 arguments \(partial:F out:O P:i N:i\); got 3"),
    ]
    for args, exc, message in cases:
        with pytest.raises(exc, match=message):
            k(np.float32, (1, 1, 1), (4, 2, 1), args)
    with pytest.raises(TypeError, match="argument 'eps' must be a real number; got builtins.str"):
        x = fake_cupy.zeros((1, 2), np.float32)
        layer_norm_cuda._FORWARD(np.float32, (1, 1, 1), (2, 4, 1),
                                 (x, x, x, x, x[0], x[0], 1, 2, 0, 0, "1e-5"))
    with pytest.raises(TypeError,
                       match="CUDA kernels exist for float32 and float64; got dtype int32"):
        k(np.int32, (1, 1, 1), (4, 2, 1), good)
    with pytest.raises(ValueError, match="each parameter must be 'name:letter'"):
        cuda_launch.Kernel("layer_norm.cu", "x", "a:F b:Z", "LN")
    assert device.launches == [] and device.compiles == []


def test_launcher_casts_scalars_to_the_parameter_types():
    k = cuda_launch.Kernel("layer_norm.cu", "layer_norm_forward",
                           "x:F weight:F bias:F y:O mean:O rstd:O R:i N:i has_weight:i "
                           "has_bias:i eps:f", "LN")
    x = fake_cupy.zeros((1, 2), np.float64)
    args = k._checked(fake_cupy, np.dtype(np.float64),
                      (x,) * 6 + (1, np.int64(2), True, 0, 1e-5))
    assert [type(a) for a in args[6:]] == [np.int32] * 4 + [np.float64]
    x = fake_cupy.zeros((1, 2), np.float32)
    eps = k._checked(fake_cupy, np.dtype(np.float32), (x,) * 6 + (1, 2, 0, 0, 1e-5))[10]
    assert type(eps) is np.float32


# =====================================================================================
# GPU: the op through cupy (a real GPU, or --fake-cupy)
# =====================================================================================


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("R,N", [(3, 7), (130, 64), (4, 768)])
def test_gpu_layer_norm_matches_reference(R, N, dtype):
    cp = backend.cupy_or_none()
    kinds = ("forward", "backward", "add_forward", "add_backward")
    assert [ln._implementation(cp.zeros((1, 1)), k) for k in kinds] == [
        layer_norm_cuda.forward, layer_norm_cuda.backward, layer_norm_cuda.add_forward,
        layer_norm_cuda.add_backward]
    check_against_reference(*gpu_runner(None, cp.asarray), R, N, dtype, "affine")


@pytest.mark.gpu
def test_gpu_layer_norm_op_gradients():
    x, dy, w, b = make(6, 65, np.float64)
    tx, tw, tb = (diagnet.tensor(a, device="cuda", requires_grad=True) for a in (x, w, b))
    y = F.layer_norm(tx, 65, tw, tb)
    y.backward(diagnet.tensor(dy, device="cuda"))
    (ry, _, _), (rdx, rdw, rdb) = reference64(x, dy, w, b)
    np.testing.assert_allclose(y.numpy(), ry, **F64_TOL)
    for got, want in ((tx.grad, rdx), (tw.grad, rdw), (tb.grad, rdb)):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-11, atol=1e-12)


@pytest.mark.gpu
def test_gpu_add_layer_norm_matches_add_then_layer_norm():
    rng = np.random.default_rng(5)
    x, res, g1, g2 = (rng.standard_normal((3, 17, 64)) for _ in range(4))
    w, b = (rng.standard_normal(64) for _ in range(2))
    results = []
    for device in ("cuda", "cpu"):
        tx, tr, tw, tb = (diagnet.tensor(a, device=device, requires_grad=True)
                          for a in (x, res, w, b))
        total, normed = F.add_layer_norm(tx, tr, 64, tw, tb)
        (total * diagnet.tensor(g1, device=device)
         + normed * diagnet.tensor(g2, device=device)).sum().backward()
        results.append([a.numpy() for a in (total, normed, tx.grad, tr.grad, tw.grad, tb.grad)])
    for got, want in zip(*results):
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)
