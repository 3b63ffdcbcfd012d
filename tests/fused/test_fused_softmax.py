"""Softmax, log-softmax and cross-entropy on the compiled CPU kernels
(`diagnet.fused.softmax`) against the composed reference.

The reference is the array code of `diagnet.ops.activation` / `diagnet.ops.loss`, selected
with ``DIAGNET_CPU_KERNELS=reference`` (the `use_kernels` fixture): float64 values and
gradients agree to rounding, including rows of width 1, huge logits, ``-inf`` entries and
rows that are all ``-inf`` (NaN in both); float32 agrees with the float64 reference to the
stated tolerances. The CuPy path (the CUDA kernels, `tests/fused/test_fused_softmax_cuda.py`) is
checked against these kernels by the ``gpu`` tests at the end.
"""

from __future__ import annotations

import numpy as np
import pytest

import diagnet
from diagnet import functional as F
from diagnet.gradcheck import gradcheck
from diagnet.ops.activation import LogSoftmax, Softmax
from diagnet.ops.loss import CrossEntropy
from tolerances import F32_GRAD_TOL, F64_TOL, GRADCHECK_TOL

OPS = {"softmax": F.softmax, "log_softmax": F.log_softmax}
# width-1 rows, odd widths, leading dims, and one array past the parallel threshold
SHAPES = [(1,), (1, 1), (4, 1), (17,), (3, 17), (2, 3, 5), (2100, 17)]
#: float32 log-softmax values reach ~|30|: a few float32 ulps of that
LOG_SOFTMAX_F32_TOL = dict(rtol=1e-5, atol=1e-5)


def _logits(shape, seed, shift=0.0):
    """Normal logits times 5, plus ``shift``; where the rows allow, a few ``-inf`` entries
    (a masked logit) and, in tables of 3 rows or more, one row all ``-inf``."""
    x = 5.0 * np.random.default_rng(seed).standard_normal(shape) + shift
    rows = x.reshape(-1, shape[-1])
    if shape[-1] > 1:
        rows[::3, 0] = -np.inf
    if rows.shape[0] >= 3:
        rows[1] = -np.inf
    return x


def _value_and_grad(op, x, g):
    t = diagnet.tensor(x, requires_grad=True)
    y = op(t)
    y.backward(g)
    return y.numpy(), t.grad.numpy()


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("shift", [0.0, 1e4, -1e4])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_softmax_kernels_match_the_reference_in_float64(name, shift, shape, use_kernels):
    x = _logits(shape, seed=1, shift=shift)
    g = np.random.default_rng(2).standard_normal(shape)
    with np.errstate(invalid="ignore"):  # the all -inf row: NaN in both
        y, gx = _value_and_grad(OPS[name], x, g)
        with use_kernels("reference"):
            y_ref, gx_ref = _value_and_grad(OPS[name], x, g)
    assert y.dtype == np.float64 and y.shape == shape
    np.testing.assert_allclose(y, y_ref, equal_nan=True, **F64_TOL)
    np.testing.assert_allclose(gx, gx_ref, equal_nan=True, **F64_TOL)
    if name == "softmax":
        assert np.all(y[np.isneginf(x) & ~np.isnan(y)] == 0)  # a masked logit: exactly 0


@pytest.mark.parametrize("name", sorted(OPS))
def test_softmax_kernels_in_float32_match_the_float64_reference(name, use_kernels):
    x = 5.0 * np.random.default_rng(3).standard_normal((2100, 17))
    g = np.random.default_rng(4).standard_normal(x.shape)
    y, gx = _value_and_grad(OPS[name], x.astype(np.float32), g.astype(np.float32))
    assert y.dtype == gx.dtype == np.float32
    with use_kernels("reference"):
        x32 = x.astype(np.float32).astype(np.float64)
        y_ref, gx_ref = _value_and_grad(OPS[name], x32, g.astype(np.float32).astype(np.float64))
    tol = LOG_SOFTMAX_F32_TOL if name == "log_softmax" else dict(rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(y, y_ref, **tol)
    np.testing.assert_allclose(gx, gx_ref, **F32_GRAD_TOL)


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("shift", [0.0, 1e4, -1e4])
def test_float32_kernels_handle_masked_huge_and_nan_logits_like_the_reference(name, shift,
                                                                             use_kernels):
    # float32 rows take their own exponential (`diagnet.fused.fastmath`): its clamp for
    # arguments below -256, -inf and NaN must give what the float64 reference gives
    x = _logits((2100, 17), seed=8, shift=shift)
    x[5, 3] = np.nan
    x[7, :9] = shift - 300.0  # exp(-300) and exp(-600): 0 in float32
    x[7, 9:] = shift + 300.0
    x32 = x.astype(np.float32)
    g32 = np.random.default_rng(9).standard_normal(x.shape).astype(np.float32)
    with np.errstate(invalid="ignore"):  # the all -inf row and the NaN row: NaN in both
        y, gx = _value_and_grad(OPS[name], x32, g32)
        with use_kernels("reference"):
            y_ref, gx_ref = _value_and_grad(OPS[name], x32.astype(np.float64),
                                            g32.astype(np.float64))
    assert y.dtype == gx.dtype == np.float32
    tol = LOG_SOFTMAX_F32_TOL if name == "log_softmax" else dict(rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(y, y_ref, equal_nan=True, **tol)
    np.testing.assert_allclose(gx, gx_ref, equal_nan=True, **F32_GRAD_TOL)
    assert np.isnan(y[5]).all() and np.isnan(gx[5]).all()
    if name == "softmax":
        assert np.all(y[np.isneginf(x32) & ~np.isnan(y)] == 0)  # a masked logit: exactly 0
        assert np.all(y[7, :9] == 0)


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("shape", [(5,), (3, 4), (2, 2, 3)], ids=str)
def test_softmax_kernels_gradcheck(name, shape):
    x = diagnet.tensor(np.random.default_rng(5).standard_normal(shape), requires_grad=True)
    assert gradcheck(OPS[name], x, **GRADCHECK_TOL)


@pytest.mark.parametrize("cls", [Softmax, LogSoftmax])
def test_only_the_last_axis_of_numpy_floats_takes_the_kernels(cls, use_kernels):
    from diagnet.fused import softmax as kernels

    x = diagnet.tensor(np.ones((2, 3)))
    for axis, expected in ((-1, kernels), (1, kernels), (0, None), ((0, 1), None)):
        fn = cls(axis)
        fn(x)
        assert fn.kernels is expected, axis
    fn = cls(-1)
    fn(diagnet.tensor(np.ones((2, 3), dtype=np.int64)))  # the reference promotes integers
    assert fn.kernels is None
    with use_kernels("reference"):
        fn = cls(-1)
        fn(x)
        assert fn.kernels is None


def test_softmax_over_another_axis_still_matches():
    x = np.random.default_rng(6).standard_normal((3, 4, 5))
    for axis in (0, 1, -2):
        y = F.softmax(diagnet.tensor(x), axis=axis).numpy()
        e = np.exp(x - x.max(axis=axis, keepdims=True))
        np.testing.assert_allclose(y, e / e.sum(axis=axis, keepdims=True), **F64_TOL)


# ----------------------------------------------------------------------------- cross-entropy

def _ce_value_and_grad(z, labels, smoothing, reduction):
    t = diagnet.tensor(z, requires_grad=True)
    loss = F.cross_entropy(t, labels, label_smoothing=smoothing, reduction=reduction)
    g = np.linspace(0.5, 1.5, loss.size).reshape(loss.shape) if loss.ndim else None
    loss.backward(g)
    return loss.numpy(), t.grad.numpy()


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(1,), (10,), (4, 1), (128, 10), (2, 3, 7)], ids=str)
def test_cross_entropy_kernels_match_the_reference_in_float64(smoothing, reduction, shape,
                                                              use_kernels):
    rng = np.random.default_rng(7)
    z = 5.0 * rng.standard_normal(shape)
    labels = rng.integers(0, shape[-1], size=shape[:-1])
    loss, gz = _ce_value_and_grad(z, labels, smoothing, reduction)
    with use_kernels("reference"):
        loss_ref, gz_ref = _ce_value_and_grad(z, labels, smoothing, reduction)
    assert loss.dtype == np.float64 and loss.shape == loss_ref.shape
    np.testing.assert_allclose(loss, loss_ref, **F64_TOL)
    np.testing.assert_allclose(gz, gz_ref, **F64_TOL)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_kernels_with_huge_and_masked_logits(smoothing, use_kernels):
    z = np.array([[1e4, 0.0, -1e4, 3.0], [-np.inf, 2.0, 1.0, -np.inf], [0.5, -np.inf, 1e4, 1e4],
                  [-np.inf, -np.inf, -np.inf, -np.inf], [-np.inf, 0.0, 1.0, 2.0]])
    labels = np.array([0, 1, 3, 2, 0])  # the last: -inf at the label
    with np.errstate(invalid="ignore"):  # the all -inf row: NaN in both
        loss, gz = _ce_value_and_grad(z, labels, smoothing, "none")
        with use_kernels("reference"):
            loss_ref, gz_ref = _ce_value_and_grad(z, labels, smoothing, "none")
    np.testing.assert_allclose(loss, loss_ref, equal_nan=True, **F64_TOL)
    np.testing.assert_allclose(gz, gz_ref, equal_nan=True, **F64_TOL)
    assert np.isnan(loss[3]) and loss[4] == np.inf
    if smoothing == 0.0:
        assert np.all(gz[1, [0, 3]] == 0)  # a masked logit gets no gradient


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_kernels_gradcheck(smoothing, reduction):
    rng = np.random.default_rng(8)
    z = diagnet.tensor(rng.standard_normal((4, 5)), requires_grad=True)
    labels = rng.integers(0, 5, size=4)
    assert gradcheck(lambda t: F.cross_entropy(t, labels, label_smoothing=smoothing,
                                               reduction=reduction), z, **GRADCHECK_TOL)


def test_cross_entropy_kernels_in_float32_match_the_float64_reference(use_kernels):
    rng = np.random.default_rng(9)
    z = 5.0 * rng.standard_normal((128, 10))
    labels = rng.integers(0, 10, size=128)
    loss, gz = _ce_value_and_grad(z.astype(np.float32), labels, 0.1, "none")
    assert loss.dtype == gz.dtype == np.float32
    with use_kernels("reference"):
        loss_ref, gz_ref = _ce_value_and_grad(z.astype(np.float32).astype(np.float64), labels,
                                              0.1, "none")
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(gz, gz_ref, **F32_GRAD_TOL)


def test_cross_entropy_kernel_rows_with_a_label_out_of_range_are_nan():
    """`CrossEntropy` applied directly (no host range check): the kernel reads nothing
    outside the logits and marks those rows NaN, as the device-side check does."""
    z = np.random.default_rng(10).standard_normal((3, 4))
    tz = diagnet.tensor(z, requires_grad=True)
    loss = CrossEntropy(np.array([1, 4, -1]), 0.1, "none")(tz)
    out = loss.numpy()
    assert np.isfinite(out[0]) and np.isnan(out[1]) and np.isnan(out[2])
    loss.backward(np.ones(3))
    g = tz.grad.numpy()
    assert np.all(np.isfinite(g[0])) and np.all(np.isnan(g[1:]))


# ----------------------------------------------------------------------------- CuPy path

@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(OPS))
def test_softmax_on_cuda_matches_the_cpu_kernels(name):
    x = _logits((6, 7), seed=11)
    g = np.random.default_rng(12).standard_normal(x.shape)
    results = []
    for device in ("cpu", "cuda"):
        t = diagnet.tensor(x, device=device, requires_grad=True)
        with np.errstate(invalid="ignore"):
            y = OPS[name](t)
            y.backward(diagnet.tensor(g, device=device))
        assert y.device == t.grad.device == device
        results.append((y.numpy(), t.grad.numpy()))
    (y_cpu, g_cpu), (y_gpu, g_gpu) = results
    np.testing.assert_allclose(y_gpu, y_cpu, equal_nan=True, **F64_TOL)
    np.testing.assert_allclose(g_gpu, g_cpu, equal_nan=True, **F64_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_on_cuda_matches_the_cpu_kernels(smoothing):
    rng = np.random.default_rng(13)
    z, labels = rng.standard_normal((5, 4)), rng.integers(0, 4, size=5)
    results = []
    for device in ("cpu", "cuda"):
        t = diagnet.tensor(z, device=device, requires_grad=True)
        loss = F.cross_entropy(t, diagnet.tensor(labels, device=device),
                               label_smoothing=smoothing)
        loss.backward()
        results.append((loss.item(), t.grad.numpy()))
    np.testing.assert_allclose(results[1][0], results[0][0], **F64_TOL)
    np.testing.assert_allclose(results[1][1], results[0][1], **F64_TOL)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scale", [0.25, 1 / 3 ** 0.5, -1.7, 0.0])
@pytest.mark.parametrize("rows", [5, 3000])  # one thread; numba's threads
def test_scaled_softmax_gradient_gives_the_bits_of_a_separate_multiply(dtype, scale, rows):
    """``softmax_grad(y, g, scale)`` is ``softmax_grad(y, g) * scale``, bit for bit, with
    the product rounded to the dtype as NumPy rounds it: attention folds its scale into
    this pass and relies on it."""
    from diagnet.fused import softmax as rows_mod

    rng = np.random.default_rng(rows)
    x = (rng.standard_normal((rows, 17)) * 4).astype(dtype)
    x[0, 3], x[1, :] = np.inf, -np.inf
    if rows > 5:
        x[2, 5] = np.nan
    g = rng.standard_normal((rows, 17)).astype(dtype)
    y = rows_mod.softmax(x)
    want = rows_mod.softmax_grad(y, g)
    want *= scale
    got = rows_mod.softmax_grad(y, g, scale=scale)
    assert np.array_equal(got.view(np.uint8), want.view(np.uint8))


def _one_pass_per_row_softmax():
    """The softmax as a single pass per row (max, then the exponentials and their sum, then
    the outputs), compiled with the kernels' options: the arrangement that
    `diagnet.fused.softmax` replaced by a flat loop over the exponentials."""
    from diagnet.fused import fastmath
    from diagnet.fused import softmax as rows_mod

    exp_for_dtype, row_max = rows_mod.exp_for_dtype, rows_mod._row_max

    @fastmath.jit
    def softmax_rows(x, y):
        e = np.empty(x.shape[1])
        for r in range(x.shape[0]):
            m = row_max(x, r)
            s = 0.0
            for j in range(x.shape[1]):
                v = exp_for_dtype(x[r, j], np.float64(x[r, j]) - m)
                e[j] = v
                s += v
            inv = 1.0 / s
            for j in range(x.shape[1]):
                y[r, j] = e[j] * inv

    return softmax_rows


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("columns", [1, 5, 17, 64, 197])
@pytest.mark.parametrize("rows", [7, 3001])  # one thread; numba's threads
@pytest.mark.parametrize("scale", [None, 0.25, 1 / 3 ** 0.5, -1.7])
def test_softmax_gives_the_bits_of_one_pass_per_row(dtype, columns, rows, scale):
    """The flat loop over the exponentials changes the order of no operation: every output
    has the bits of the one-pass-per-row kernel (NaN, inf and -inf rows included), so
    models train to the same bits as before it; with a ``scale``, those of that kernel on
    ``x * scale`` rounded by NumPy (attention's separate multiply, which it replaces)."""
    from diagnet.fused import softmax as rows_mod

    rng = np.random.default_rng(rows * columns)
    x = (rng.standard_normal((rows, columns)) * rng.uniform(0.1, 30, (rows, 1))).astype(dtype)
    x[0, 0], x[1, :], x[2, -1] = np.inf, -np.inf, np.nan
    x[3, :] = 0.0
    scaled = x if scale is None else x * scale
    want = np.empty_like(x)
    _one_pass_per_row_softmax()(scaled, want)
    got = rows_mod.softmax(x, scale=scale)
    assert np.array_equal(got.view(np.uint8), want.view(np.uint8))
