"""Scaled dot-product attention, `qkv_split` and `merge_heads` (`diagnet.ops.attention`).

Four implementations of attention are compared:

* the composed reference (`reference_forward` / `reference_backward`, NumPy or CuPy);
* the CPU default (`blas_forward` / `blas_backward`): the reference with the row softmax
  and its gradient from `diagnet.fused.softmax`;
* the numba kernels of `diagnet.fused.attention`, serial and threaded;
* a plain composition of diagnet ops (matmul, where, softmax, dropout), whose backward is
  the engine's: the independent check of the reference's hand-written backward.

Tolerances (from `tolerances`): float64 values and gradients ``F64_TOL`` and
``F64_GRAD_TOL`` (the same sums in another order, values of order 1); float32 results
against the float64 reference ``F32_TOL`` (values) and ``F32_GRAD_TOL`` (gradients);
gradchecks ``GRADCHECK_TOL``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import diagnet as dn
from diagnet import backend, settings
from diagnet import functional as F
from diagnet.fused import attention as kernels
from diagnet.ops import attention as ops_attention
from diagnet.ops.attention import MASKED_SCORE, reference_backward, reference_forward
from tolerances import F32_GRAD_TOL, F32_TOL, F64_GRAD_TOL, F64_TOL, GRADCHECK_TOL

#: (B, H, L, S, E, Ev): ragged sizes, cross-attention (L != S), values wider than keys,
#: one key, and the ViT's own shape
SHAPES = [(2, 3, 5, 7, 4, 6), (1, 1, 1, 1, 3, 2), (3, 2, 4, 1, 5, 5), (2, 4, 17, 17, 16, 16)]


def _arrays(shape, dtype=np.float64, seed=0):
    """q, k, v, dout, a random key mask with one fully masked query, a dropout multiplier."""
    B, H, L, S, E, Ev = shape
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, L, E)).astype(dtype)
    k = rng.standard_normal((B, H, S, E)).astype(dtype)
    v = rng.standard_normal((B, H, S, Ev)).astype(dtype)
    dout = rng.standard_normal((B, H, L, Ev)).astype(dtype)
    mask = rng.random((B, 1, L, S)) < 0.6
    mask[:1, :, :1] = False  # query 0 of batch 0 may attend to nothing
    drop = ((rng.random((B, H, L, S)) >= 0.25) / 0.75).astype(dtype)
    return q, k, v, dout, mask, drop


@pytest.fixture(params=["serial", "threaded"])
def kernel_path(request, monkeypatch):
    """Route every call of the numba kernels through one path (the work threshold decides)."""
    monkeypatch.setattr(kernels, "_SERIAL_WORK", 1 << 62 if request.param == "serial" else 0)
    return request.param


@pytest.fixture(params=["blas", "reference", "numba"])
def impl(request):
    """Run the test body with each CPU implementation of attention."""
    settings.set_attention_kernels(request.param)  # (conftest restores the settings)
    return request.param


# ----------------------------------------------------------------------------- kernels

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dropped", [False, True])
def test_kernels_match_the_reference_float64(shape, masked, dropped, kernel_path):
    q, k, v, dout, mask, drop = _arrays(shape)
    mask, drop = (mask if masked else None), (drop if dropped else None)
    scale = 1 / math.sqrt(shape[4])
    want_out, want_w = reference_forward(q, k, v, mask, drop, scale, MASKED_SCORE)
    out, w = kernels.forward(q, k, v, mask, drop, scale, MASKED_SCORE)
    np.testing.assert_allclose(out, want_out, **F64_TOL)
    np.testing.assert_allclose(w, want_w, **F64_TOL)
    want = reference_backward(dout, q, k, v, want_w, mask, drop, scale)
    got = kernels.backward(dout, q, k, v, w, mask, drop, scale)
    for name, g, gw in zip("qkv", got, want):
        assert g.shape == gw.shape, name
        np.testing.assert_allclose(g, gw, **F64_GRAD_TOL, err_msg=f"d{name}")


@pytest.mark.parametrize("shape", SHAPES[::3])
def test_kernels_float32_within_tolerance_of_the_float64_reference(shape, kernel_path):
    q, k, v, dout, mask, drop = _arrays(shape)
    want_out, want_w = reference_forward(q, k, v, mask, drop, 0.3, MASKED_SCORE)
    want = reference_backward(dout, q, k, v, want_w, mask, drop, 0.3)
    q32, k32, v32, d32, drop32 = (a.astype(np.float32) for a in (q, k, v, dout, drop))
    out, w = kernels.forward(q32, k32, v32, mask, drop32, 0.3, MASKED_SCORE)
    assert out.dtype == w.dtype == np.float32
    np.testing.assert_allclose(out, want_out, **F32_TOL)
    np.testing.assert_allclose(w, want_w, **F32_TOL)
    got = kernels.backward(d32, q32, k32, v32, w, mask, drop32, 0.3)
    for g, gw in zip(got, want):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, gw, **F32_GRAD_TOL)


def test_kernels_read_strided_and_broadcast_inputs():
    """Non-contiguous q/k/v and a mask broadcast over batch and head give the same result."""
    q, k, v, dout, _, _ = _arrays((2, 2, 3, 4, 5, 5))
    mask = np.tril(np.ones((3, 4), bool))
    qt = np.ascontiguousarray(q.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)  # strided view
    want, _ = reference_forward(q, k, v, mask, None, 0.5, MASKED_SCORE)
    got, _ = kernels.forward(qt, k[:, :, :, :], v, mask, None, 0.5, MASKED_SCORE)
    np.testing.assert_allclose(got, want, **F64_TOL)


def test_nan_propagates_like_the_reference():
    q, k, v, _, _, _ = _arrays((1, 1, 2, 3, 2, 2))
    q[0, 0, 1, 0] = np.nan
    want, _ = reference_forward(q, k, v, None, None, 1.0, MASKED_SCORE)
    got, _ = kernels.forward(q, k, v, None, None, 1.0, MASKED_SCORE)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(got[0, 0, 1]).all() and not np.isnan(got[0, 0, 0]).any()


# ----------------------------------------------------------------------------- the op

def composed(q, k, v, mask=None, dropout_p=0.0, rng=None, scale=None):
    """Attention from plain diagnet ops (the engine differentiates it)."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = F.matmul(q, k.transpose(0, 1, 3, 2)) * scale
    if mask is not None:
        scores = F.where(mask, scores, MASKED_SCORE)
    weights = F.dropout(F.softmax(scores, axis=-1), dropout_p, rng=rng)
    return F.matmul(weights, v)


def _tensors(shape, dtype=np.float64, device=None, seed=0):
    q, k, v, dout, mask, _ = _arrays(shape, dtype, seed)
    make = lambda a: dn.tensor(a, device=device, requires_grad=True)  # noqa: E731
    return make(q), make(k), make(v), dout, mask


@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
def test_op_matches_the_composition_of_diagnet_ops(shape, masked, dropout_p, impl):
    q, k, v, dout, mask = _tensors(shape)
    mask = mask if masked else None
    results = []
    for fn in (F.scaled_dot_product_attention, composed):
        for t in (q, k, v):
            t.grad = None
        y = fn(q, k, v, mask=mask, dropout_p=dropout_p, rng=5)
        (y * dn.tensor(dout)).sum().backward()
        results.append([y.numpy(), q.grad.numpy(), k.grad.numpy(), v.grad.numpy()])
    for name, got, want in zip(["out", "dq", "dk", "dv"], *results):
        np.testing.assert_allclose(got, want, **F64_GRAD_TOL, err_msg=name)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_gradcheck(masked, dropout_p, impl):
    q, k, v, _, mask = _tensors((2, 2, 3, 4, 3, 2))
    mask = mask if masked else None
    # an int rng draws the same dropout mask on every call, as finite differences need
    assert dn.gradcheck(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, mask, dropout_p, rng=3,
                                                       scale=0.7),
        q, k, v, **GRADCHECK_TOL)


def test_a_fully_masked_query_attends_uniformly_and_passes_no_gradient_to_q_or_k(impl):
    q, k, v, _, _ = _tensors((1, 2, 3, 4, 2, 3))
    mask = np.ones((3, 4), bool)
    mask[1] = False
    y = F.scaled_dot_product_attention(q, k, v, mask=mask)
    np.testing.assert_allclose(y.numpy()[:, :, 1], v.numpy().mean(axis=2), **F64_TOL)
    y[:, :, 1].sum().backward()
    np.testing.assert_array_equal(q.grad.numpy(), 0.0)
    np.testing.assert_array_equal(k.grad.numpy(), 0.0)
    np.testing.assert_allclose(v.grad.numpy(), np.full(v.shape, 1 / 4), **F64_TOL)


def test_masked_keys_get_no_weight(impl):
    q, k, v, _, _ = _tensors((2, 1, 3, 3, 2, 2))
    causal = np.tril(np.ones((3, 3), bool))
    y = F.scaled_dot_product_attention(q, k, v, mask=dn.tensor(causal))
    # changing only the last key and value leaves the first two queries unchanged
    k2 = k.numpy()
    v2 = v.numpy()
    k2[:, :, 2] += 3.0
    v2[:, :, 2] -= 2.0
    y2 = F.scaled_dot_product_attention(q, dn.tensor(k2), dn.tensor(v2), mask=causal)
    np.testing.assert_array_equal(y2.numpy()[:, :, :2], y.numpy()[:, :, :2])


def test_float32_matches_float64(impl):
    q, k, v, dout, mask = _tensors((2, 2, 5, 5, 4, 4))
    want = F.scaled_dot_product_attention(q, k, v, mask, 0.2, rng=1)
    (want * dn.tensor(dout)).sum().backward()
    q32, k32, v32 = (dn.tensor(t.numpy(), dtype="float32", requires_grad=True)
                     for t in (q, k, v))
    got = F.scaled_dot_product_attention(q32, k32, v32, mask, 0.2, rng=1)
    assert got.dtype == np.float32
    (got * dn.tensor(dout, dtype="float32")).sum().backward()
    np.testing.assert_allclose(got.numpy(), want.numpy(), **F32_TOL)
    for a, b in ((q32, q), (k32, k), (v32, v)):
        np.testing.assert_allclose(a.grad.numpy(), b.grad.numpy(), **F32_GRAD_TOL)


def test_dropout_follows_the_seed_and_the_default_generator(impl):
    q, k, v, _, _ = _tensors((2, 2, 4, 4, 3, 3))
    plain = F.scaled_dot_product_attention(q, k, v).numpy()
    a = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5, rng=1).numpy()
    np.testing.assert_array_equal(F.scaled_dot_product_attention(q, k, v, dropout_p=0.5,
                                                                 rng=1).numpy(), a)
    assert not np.allclose(a, plain)
    dn.manual_seed(4)
    b = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5).numpy()
    dn.manual_seed(4)
    np.testing.assert_array_equal(F.scaled_dot_product_attention(q, k, v, dropout_p=0.5).numpy(), b)


def test_default_scale_and_no_grad_records_nothing(impl):
    q, k, v, _, _ = _tensors((1, 2, 3, 3, 4, 4))
    np.testing.assert_allclose(F.scaled_dot_product_attention(q, k, v).numpy(),
                               F.scaled_dot_product_attention(q, k, v, scale=0.5).numpy(),
                               **F64_TOL)  # 1 / sqrt(4)
    with dn.no_grad():
        y = F.scaled_dot_product_attention(q, k, v)
    assert y.creator is None and not y.requires_grad


def test_empty_batch_and_queries(impl):
    for shape in ((0, 2, 3, 3, 2, 2), (1, 2, 0, 3, 2, 2)):
        q, k, v, _, _ = _tensors(shape)
        y = F.scaled_dot_product_attention(q, k, v)
        assert y.shape == shape[:3] + (shape[5],)
        y.sum().backward()
        assert q.grad.shape == q.shape and k.grad.shape == k.shape


# ----------------------------------------------------------------------------- errors

def _qkv32(B=2, H=2, L=3, S=3, E=4):
    return (dn.tensor(np.zeros((B, H, L, E), np.float32)),
            dn.tensor(np.zeros((B, H, S, E), np.float32)),
            dn.tensor(np.zeros((B, H, S, E), np.float32)))


@pytest.mark.parametrize("change, error, match", [
    (dict(q=np.zeros((2, 2, 3, 4), np.float32)), TypeError, "q must be a Tensor; got ndarray"),
    (dict(k=dn.tensor(np.zeros((2, 2, 3, 4), np.int64))), TypeError,
     "k must be float32 or float64; got dtype int64"),
    (dict(v=dn.tensor(np.zeros((2, 2, 3, 4)), dtype="float64")), TypeError,
     "one dtype; got float32, float32 and float64"),
    (dict(q=dn.tensor(np.zeros((2, 3, 4), np.float32))), ValueError,
     r"q must have shape \(B, H, L, E\); got \(2, 3, 4\)"),
    (dict(k=dn.tensor(np.zeros((2, 2, 3, 5), np.float32))), ValueError,
     r"k must have shape \(B, H, S, E\) = \(2, 2, S, 4\) with S >= 1 keys; got \(2, 2, 3, 5\)"),
    (dict(k=dn.tensor(np.zeros((2, 2, 0, 4), np.float32))), ValueError, "S >= 1 keys"),
    (dict(v=dn.tensor(np.zeros((2, 1, 3, 4), np.float32))), ValueError,
     r"v must have shape \(B, H, S, Ev\) = \(2, 2, 3, Ev\); got \(2, 1, 3, 4\)"),
    (dict(mask=np.ones((3, 3))), TypeError, "mask must be a boolean array or Tensor; got float64"),
    (dict(mask=[[True]]), TypeError, "mask must be a boolean array or Tensor; got list"),
    (dict(mask=np.ones((4, 3), bool)), ValueError,
     r"mask of shape \(4, 3\) does not broadcast to the attention scores' shape \(B, H, L, S\) "
     r"= \(2, 2, 3, 3\)"),
    (dict(mask=np.ones((1, 2, 2, 3, 3), bool)), ValueError, "does not broadcast"),
    (dict(dropout_p=1.0), ValueError, r"invalid dropout_p=1.0: must be in \[0, 1\)"),
    (dict(dropout_p=-0.1), ValueError, r"invalid dropout_p=-0.1: must be in \[0, 1\)"),
    (dict(dropout_p="0.1"), TypeError, "dropout_p must be a real number; got str"),
    (dict(dropout_p=True), TypeError, "dropout_p must be a real number; got bool"),
    (dict(scale=float("nan")), ValueError, "invalid scale=nan: must be finite"),
    (dict(scale=None, rng="seed", dropout_p=0.1), TypeError, "rng must be None"),
])
def test_bad_arguments_are_refused_before_anything_is_drawn(change, error, match):
    q, k, v = _qkv32()
    args = dict(q=q, k=k, v=v, mask=None, dropout_p=0.5, rng=None, scale=None)
    args.update(change)
    before = dn.random.get_state()
    with pytest.raises(error, match=match):
        F.scaled_dot_product_attention(**args)
    assert dn.random.get_state() == before  # the dropout mask was not drawn


# ----------------------------------------------------------------------------- heads

def test_qkv_split_matches_reshape_transpose_and_merge_heads_inverts_it():
    x = np.random.default_rng(0).standard_normal((2, 5, 3 * 12))
    q, k, v = F.qkv_split(dn.tensor(x), 3)
    want = x.reshape(2, 5, 3, 3, 4).transpose(2, 0, 3, 1, 4)
    for i, t in enumerate((q, k, v)):
        assert t.shape == (2, 3, 5, 4) and t.data.flags.c_contiguous
        np.testing.assert_array_equal(t.numpy(), want[i])
    merged = F.merge_heads(v)
    assert merged.shape == (2, 5, 12) and merged.data.flags.c_contiguous
    np.testing.assert_array_equal(merged.numpy(), x[..., 24:])


def test_qkv_split_backward_is_one_buffer_with_zeros_for_unused_parts():
    x = dn.tensor(np.random.default_rng(0).standard_normal((2, 3, 12)), requires_grad=True)
    q, k, v = F.qkv_split(x, 2)
    (k * 2.0).sum().backward()   # q and v unused
    g = x.grad.numpy().reshape(2, 3, 3, 2, 2)
    np.testing.assert_array_equal(g[:, :, 1], 2.0)
    np.testing.assert_array_equal(g[:, :, [0, 2]], 0.0)


def test_heads_gradcheck():
    x = dn.tensor(np.random.default_rng(1).standard_normal((2, 3, 12)), requires_grad=True)
    assert dn.gradcheck(lambda x: F.merge_heads(F.qkv_split(x, 2)[0] * F.qkv_split(x, 2)[2]),
                        x, **GRADCHECK_TOL)
    w = dn.tensor(np.random.default_rng(2).standard_normal((2, 2, 3, 2)), requires_grad=True)
    assert dn.gradcheck(F.merge_heads, w, **GRADCHECK_TOL)


@pytest.mark.parametrize("call, error, match", [
    (lambda: F.qkv_split(np.zeros((1, 2, 6)), 1), TypeError, "x must be a Tensor; got ndarray"),
    (lambda: F.qkv_split(dn.tensor(np.zeros((1, 2, 6))), 2.0), TypeError,
     "heads must be an int; got float"),
    (lambda: F.qkv_split(dn.tensor(np.zeros((1, 2, 6))), True), TypeError, "got bool"),
    (lambda: F.qkv_split(dn.tensor(np.zeros((1, 2, 6))), 0), ValueError,
     "invalid heads=0: must be >= 1"),
    (lambda: F.qkv_split(dn.tensor(np.zeros((1, 2, 6))), 4), ValueError,
     r"divisible by 12; got \(1, 2, 6\)"),
    (lambda: F.qkv_split(dn.tensor(np.zeros((2, 6))), 1), ValueError, r"got \(2, 6\)"),
    (lambda: F.merge_heads(np.zeros((1, 2, 3, 4))), TypeError, "x must be a Tensor"),
    (lambda: F.merge_heads(dn.tensor(np.zeros((2, 3, 4)))), ValueError,
     r"\(B, H, N, d\); got \(2, 3, 4\)"),
])
def test_head_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ----------------------------------------------------------------------------- gpu

@pytest.mark.gpu
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_gpu_matches_the_cpu_kernels(dropout_p):
    """The GPU runs the CUDA kernels (`diagnet.fused.attention_cuda`, tested on their own in
    test_fused_attention_cuda.py); float64 on both devices, so only summation orders differ.
    The dropout mask is the same on both."""
    out = {}
    for device in ("cpu", "cuda"):
        q, k, v, dout, mask = _tensors((2, 2, 4, 5, 3, 3), device=device)
        y = F.scaled_dot_product_attention(q, k, v, mask=mask, dropout_p=dropout_p, rng=2)
        assert backend.device_of(y.data) == device
        (y * dn.tensor(dout, device=device)).sum().backward()
        out[device] = [t.numpy() for t in (y, q.grad, k.grad, v.grad)]
    for cpu, gpu in zip(out["cpu"], out["cuda"]):
        np.testing.assert_allclose(gpu, cpu, **F64_GRAD_TOL)


@pytest.mark.gpu
def test_gpu_heads_and_device_mask_errors():
    x = dn.tensor(np.random.default_rng(0).standard_normal((2, 3, 12)), device="cuda",
                  requires_grad=True)
    q, k, v = F.qkv_split(x, 2)
    assert all(backend.device_of(t.data) == "cuda" for t in (q, k, v))
    F.merge_heads(q * v).sum().backward()
    assert backend.device_of(x.grad.data) == "cuda"
    want = np.random.default_rng(0).standard_normal((2, 3, 12)).reshape(2, 3, 3, 2, 2)
    got = x.grad.numpy().reshape(2, 3, 3, 2, 2)
    np.testing.assert_allclose(got[:, :, 0], want[:, :, 2], **F64_TOL)
    np.testing.assert_array_equal(got[:, :, 1], 0.0)
    cpu_q = dn.tensor(q.numpy(), device="cpu")
    with pytest.raises(ValueError, match="mask is on cuda but q is on cpu"):
        F.scaled_dot_product_attention(cpu_q, cpu_q, cpu_q,
                                       mask=dn.tensor(np.ones((3, 3), bool), device="cuda"))
    with pytest.raises(ValueError, match="one device; got cuda, cpu and cpu"):
        F.scaled_dot_product_attention(q, cpu_q, cpu_q)


def test_the_dispatch_picks_blas_on_the_cpu_unless_asked_otherwise(monkeypatch):
    a = np.zeros((1, 1, 1, 1))
    monkeypatch.delenv(ops_attention.ENV_KERNELS, raising=False)
    settings.read_environment()  # the environment is read at import, or when read again
    assert ops_attention._kernels(a, a, a) == (ops_attention.blas_forward,
                                               ops_attention.blas_backward)
    settings.set_attention_kernels("reference")
    assert ops_attention._kernels(a, a, a) == (reference_forward, reference_backward)
    settings.set_attention_kernels("numba")
    assert ops_attention._kernels(a, a, a) == (kernels.forward, kernels.backward)
    monkeypatch.setenv(ops_attention.ENV_KERNELS, "bogus")
    with pytest.raises(ValueError, match="DIAGNET_ATTENTION_KERNELS must be one of"):
        settings.read_environment()
    assert ops_attention._kernels(a, a, a) == (kernels.forward, kernels.backward)  # unchanged


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dropped", [False, True])
def test_blas_path_matches_the_reference_float64(shape, masked, dropped):
    q, k, v, dout, mask, drop = _arrays(shape)
    mask, drop = (mask if masked else None), (drop if dropped else None)
    scale = 1 / math.sqrt(shape[4])
    want_out, want_w = reference_forward(q, k, v, mask, drop, scale, MASKED_SCORE)
    out, w = ops_attention.blas_forward(q, k, v, mask, drop, scale, MASKED_SCORE)
    np.testing.assert_allclose(out, want_out, **F64_TOL)
    np.testing.assert_allclose(w, want_w, **F64_TOL)
    want = reference_backward(dout, q, k, v, want_w, mask, drop, scale)
    got = ops_attention.blas_backward(dout, q, k, v, w, mask, drop, scale)
    for g, wt in zip(got, want):
        np.testing.assert_allclose(g, wt, **F64_TOL)


# ----------------------------------------------------------------------------- qkv_attention

def _composed_heads(x, heads, **kw):
    """The three ops that `F.qkv_attention` fuses, applied one after the other."""
    return F.merge_heads(F.scaled_dot_product_attention(*F.qkv_split(x, heads), **kw))


#: (B, N, heads, head_dim): ragged sizes, one token, and the ViT's own shape
QKV_SHAPES = [(2, 5, 3, 4), (1, 1, 1, 3), (3, 17, 4, 16)]


@pytest.mark.parametrize("shape", QKV_SHAPES, ids=str)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
def test_qkv_attention_matches_split_attention_merge(shape, masked, dropout_p, impl):
    """Values and the gradient of ``x`` equal the three-op composition (float64), with
    the same dropout mask for the same seed."""
    B, N, H, d = shape
    rng = np.random.default_rng(21)
    x = dn.tensor(rng.standard_normal((B, N, 3 * H * d)), requires_grad=True)
    mask = (rng.random((B, 1, N, N)) < 0.6) if masked else None
    if masked:
        mask[0, :, 0] = False  # a query that may attend to nothing
    g = dn.tensor(rng.standard_normal((B, N, H * d)))
    results = []
    for fn in (F.qkv_attention, _composed_heads):
        x.grad = None
        y = fn(x, H, mask=mask, dropout_p=dropout_p, rng=5)
        assert y.shape == (B, N, H * d) and y.data.flags.c_contiguous
        (y * g).sum().backward()
        results.append((y.numpy(), x.grad.numpy()))
    for name, got, want in zip(["out", "dx"], *results):
        np.testing.assert_allclose(got, want, **F64_GRAD_TOL, err_msg=name)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_qkv_attention_gradcheck(masked, dropout_p, impl):
    rng = np.random.default_rng(22)
    x = dn.tensor(rng.standard_normal((2, 3, 12)), requires_grad=True)
    mask = rng.random((3, 3)) < 0.6 if masked else None
    assert dn.gradcheck(lambda x: F.qkv_attention(x, 2, mask, dropout_p, rng=3, scale=0.7),
                        x, **GRADCHECK_TOL)


def test_qkv_attention_float32_matches_float64(impl):
    rng = np.random.default_rng(23)
    x64 = rng.standard_normal((4, 17, 48))
    g = rng.standard_normal((4, 17, 16))
    out = {}
    for dtype in (np.float64, np.float32):
        x = dn.tensor(x64.astype(dtype), requires_grad=True)
        y = F.qkv_attention(x, 4)
        (y * dn.tensor(g.astype(dtype))).sum().backward()
        assert y.dtype == x.grad.dtype == dtype
        out[dtype] = (y.numpy(), x.grad.numpy())
    np.testing.assert_allclose(out[np.float32][0], out[np.float64][0], **F32_TOL)
    np.testing.assert_allclose(out[np.float32][1], out[np.float64][1], **F32_GRAD_TOL)


def test_qkv_attention_blas_path_copies_nothing_into_the_split_layout(monkeypatch):
    """On the CPU default the products read q, k, v inside x: `blas_forward` receives
    views whose base is x's array, and backward writes into one buffer."""
    seen = {}
    real = ops_attention.blas_forward

    def spy(q, k, v, *args, **kw):
        seen["bases"] = [a.base is not None and np.shares_memory(a, x.data) for a in (q, k, v)]
        seen["out"] = kw.get("out") is not None
        return real(q, k, v, *args, **kw)

    monkeypatch.setattr(ops_attention, "blas_forward", spy)
    x = dn.tensor(np.random.default_rng(24).standard_normal((2, 4, 12)), requires_grad=True)
    F.qkv_attention(x, 2).sum().backward()
    assert seen == {"bases": [True, True, True], "out": True}
    assert x.grad.shape == (2, 4, 12)


@pytest.mark.parametrize("call, error, match", [
    (lambda x: F.qkv_attention(x.data, 2), TypeError, "x must be a Tensor; got ndarray"),
    (lambda x: F.qkv_attention(dn.tensor(np.zeros((1, 2, 12), np.int64)), 2), TypeError,
     "float32 or float64"),
    (lambda x: F.qkv_attention(x, 2.0), TypeError, "heads"),
    (lambda x: F.qkv_attention(x, 0), ValueError, "heads"),
    (lambda x: F.qkv_attention(x, 3), ValueError, "divisible by 9"),
    (lambda x: F.qkv_attention(dn.tensor(np.zeros((1, 0, 12))), 2), ValueError,
     "at least one token"),
    (lambda x: F.qkv_attention(x, 2, mask=np.ones((3, 3), bool)), ValueError,
     "qkv_attention: mask of shape"),
    (lambda x: F.qkv_attention(x, 2, mask=np.ones((2, 2))), TypeError, "boolean"),
    (lambda x: F.qkv_attention(x, 2, dropout_p=1.0), ValueError, "dropout_p"),
])
def test_qkv_attention_refuses_bad_arguments(call, error, match):
    x = dn.tensor(np.zeros((1, 2, 12)), requires_grad=True)
    with pytest.raises(error, match=match):
        call(x)


@pytest.mark.gpu
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_qkv_attention_on_the_gpu_matches_the_cpu(dropout_p):
    out = {}
    for device in ("cpu", "cuda"):
        rng = np.random.default_rng(25)
        x = dn.tensor(rng.standard_normal((2, 5, 12)), device=device, requires_grad=True)
        mask = rng.random((5, 5)) < 0.7
        y = F.qkv_attention(x, 2, mask=mask, dropout_p=dropout_p, rng=2)
        assert backend.device_of(y.data) == device
        (y * dn.tensor(rng.standard_normal((2, 5, 4)), device=device)).sum().backward()
        out[device] = [y.numpy(), x.grad.numpy()]
    for cpu, gpu in zip(out["cpu"], out["cuda"]):
        np.testing.assert_allclose(gpu, cpu, **F64_GRAD_TOL)
