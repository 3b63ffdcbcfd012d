"""`nn.MultiHeadSelfAttention` and `make_linear` against a NumPy reference written by hand.

The reference densifies the projections (``layer.weight`` for a dense layer,
``layer.to_dense()`` for a diagonal one) and computes attention with NumPy in float64, so a
wrong head split, scale, softmax axis or transpose shows up as an O(1) difference.

Tolerances: float64 values use ``F64_ATTN_TOL`` below; float32 values against the float64
reference use ``F32_TOL`` of `tolerances`; gradients use `diagnet.gradcheck` with
``GRADCHECK_TOL``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import diagnet as dn
from diagnet import backend, nn
from diagnet import functional as F
from diagnet.nn.linear import make_linear
from tolerances import F32_TOL, F64_TOL, GRADCHECK_TOL

#: float64 attention vs the NumPy reference: the same sums in another order (the diagonal
#: kernels gather per diagonal, NumPy's matmul per row) and a softmax in between; values are
#: O(1), so a few hundred ulps is plenty, and any formula error is O(1e-2) or more.
F64_ATTN_TOL = dict(rtol=1e-10, atol=1e-12)


def _weight(layer):
    """The dense ``(out, in)`` weight of a Linear or DiagLinear, as float64 NumPy."""
    w = layer.to_dense() if isinstance(layer, nn.DiagLinear) else layer.weight
    return w.numpy().astype(np.float64)


def _bias(layer):
    return np.zeros(layer.out_features) if layer.bias is None else layer.bias.numpy()


def reference(attn, x, mask=None):
    """Multi-head self-attention of ``x`` (B, N, dim) with ``attn``'s weights, in NumPy."""
    x = np.asarray(x, dtype=np.float64)
    B, N, D = x.shape
    H, hd = attn.heads, attn.head_dim
    qkv = x @ _weight(attn.qkv).T + _bias(attn.qkv)          # (B, N, 3D)
    out = np.empty((B, N, D))
    for h in range(H):
        q = qkv[..., 0 * D + h * hd:0 * D + (h + 1) * hd]
        k = qkv[..., 1 * D + h * hd:1 * D + (h + 1) * hd]
        v = qkv[..., 2 * D + h * hd:2 * D + (h + 1) * hd]
        for b in range(B):
            s = q[b] @ k[b].T / np.sqrt(hd)                    # (N, N)
            if mask is not None:
                mb = np.broadcast_to(mask, (B, H, N, N))[b, h]
                # a query with no allowed key attends uniformly (the layer's documented rule)
                s = np.where(mb.any(axis=-1, keepdims=True), np.where(mb, s, -np.inf), 0.0)
            p = np.exp(s - s.max(axis=-1, keepdims=True))
            p /= p.sum(axis=-1, keepdims=True)
            out[b, :, h * hd:(h + 1) * hd] = p @ v[b]
    return out @ _weight(attn.proj).T + _bias(attn.proj)


def _x(shape, dtype=np.float64, seed=1, device=None, requires_grad=False):
    data = np.random.default_rng(seed).standard_normal(shape)
    return dn.tensor(data, dtype=dtype, device=device, requires_grad=requires_grad)


# ----------------------------------------------------------------------------- make_linear


def test_make_linear_builds_the_requested_kind():
    dense = make_linear(6, 4, "dense", rng=0)
    diag = make_linear(40, 20, "diag", sparsity=0.9, rng=0, dtype=np.float64)
    assert type(dense) is nn.Linear and dense.weight.shape == (4, 6)
    assert type(diag) is nn.DiagLinear and diag.K == 4 and diag.values.dtype == np.float64
    assert make_linear(6, 4, "dense", bias=False).bias is None
    with pytest.raises(ValueError, match="linear must be one of"):
        make_linear(6, 4, "sparse")


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("linear", ["dense", "diag"])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_the_numpy_reference_float64(linear, bias):
    attn = nn.MultiHeadSelfAttention(12, 3, linear=linear, sparsity=0.7, bias=bias,
                                     dtype=np.float64, rng=0)
    x = _x((2, 5, 12))
    y = attn(x)
    assert y.shape == (2, 5, 12) and y.dtype == np.float64
    np.testing.assert_allclose(y.numpy(), reference(attn, x.numpy()), **F64_ATTN_TOL)


@pytest.mark.parametrize("linear", ["dense", "diag"])
def test_float32_matches_the_float64_reference(linear):
    attn = nn.MultiHeadSelfAttention(8, 2, linear=linear, sparsity=0.5, rng=3)
    x = _x((3, 4, 8), dtype=np.float32)
    y = attn(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y.numpy(), reference(attn, x.numpy()), **F32_TOL)


def test_one_head_and_one_token():
    attn = nn.MultiHeadSelfAttention(4, 1, dtype=np.float64, rng=0)
    x = _x((2, 1, 4))
    # one token attends only to itself: the output is proj(v), whatever q and k are
    D = 4
    v = x.numpy() @ _weight(attn.qkv)[2 * D:].T + _bias(attn.qkv)[2 * D:]
    want = v @ _weight(attn.proj).T + _bias(attn.proj)
    np.testing.assert_allclose(attn(x).numpy(), want, **F64_ATTN_TOL)
    np.testing.assert_allclose(attn(x).numpy(), reference(attn, x.numpy()), **F64_ATTN_TOL)


def test_heads_are_independent():
    """Changing the keys of head 0 only leaves head 1's part of the pre-projection output."""
    attn = nn.MultiHeadSelfAttention(4, 2, dtype=np.float64, rng=0)
    x = _x((1, 3, 4))
    proj = attn.proj
    attn.proj = nn.Identity()   # look at the concatenated heads directly
    before = attn(x).numpy()
    with dn.no_grad():
        attn.qkv.weight.data[4:6] *= 3.0     # the rows producing head 0's keys
    after = attn(x).numpy()
    attn.proj = proj
    assert not np.allclose(before[..., :2], after[..., :2])
    np.testing.assert_array_equal(before[..., 2:], after[..., 2:])


def composed_forward(attn, x, mask=None):
    """The layer's forward as plain diagnet ops: the qkv split by reshape, transpose and
    three indexings, attention by matmul, where, softmax and dropout, the heads merged by
    transpose and reshape. Its backward is the engine's."""
    B, N, _ = x.shape
    H, hd = attn.heads, attn.head_dim
    qkv = attn.qkv(x).reshape(B, N, 3, H, hd).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    scores = F.matmul(q, k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(hd))
    if mask is not None:
        scores = F.where(mask, scores, -1e9)
    weights = F.dropout(F.softmax(scores, axis=-1), attn.dropout, attn.training)
    out = F.matmul(weights, v)
    return attn.proj(out.transpose(0, 2, 1, 3).reshape(B, N, attn.dim))


@pytest.mark.parametrize("linear", ["dense", "diag"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_outputs_and_gradients_equal_the_composed_ops(linear, masked, training):
    """float64, within F64_TOL (1e-12): outputs, and the gradients of input and parameters;
    in training mode with dropout 0.3, both draw the same mask from the same seed."""
    attn = nn.MultiHeadSelfAttention(8, 2, linear=linear, sparsity=0.5, dropout=0.3,
                                     dtype=np.float64, rng=0)
    attn.train(training)
    x = _x((3, 5, 8), requires_grad=True)
    mask = np.random.default_rng(1).random((3, 1, 5, 5)) < 0.7 if masked else None
    results = []
    for forward in (attn, lambda x, mask: composed_forward(attn, x, mask)):
        attn.zero_grad()
        x.grad = None
        dn.manual_seed(3)
        y = forward(x, mask=mask)
        (y * y).sum().backward()
        results.append([y.numpy(), x.grad.numpy()] + [p.grad.numpy() for p in attn.parameters()])
    for got, want in zip(*results):
        np.testing.assert_allclose(got, want, **F64_TOL)


@pytest.mark.parametrize("linear, keys", [
    ("dense", {"qkv.weight": (24, 8), "qkv.bias": (24,), "proj.weight": (8, 8),
               "proj.bias": (8,)}),
    ("diag", {"qkv.values": (12, 8), "qkv.bias": (24,), "qkv.offsets": (12,),
              "proj.values": (4, 8), "proj.bias": (8,), "proj.offsets": (4,)}),
])
def test_state_dict_layout(linear, keys):
    attn = nn.MultiHeadSelfAttention(8, 2, linear=linear, sparsity=0.5, rng=0)
    assert {name: t.shape for name, t in attn.state_dict().items()} == keys


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("linear", ["dense", "diag"])
def test_causal_mask_matches_the_reference(linear):
    attn = nn.MultiHeadSelfAttention(8, 2, linear=linear, sparsity=0.5, dtype=np.float64, rng=2)
    x = _x((2, 5, 8))
    causal = np.tril(np.ones((5, 5), dtype=bool))
    y = attn(x, mask=causal)
    np.testing.assert_allclose(y.numpy(), reference(attn, x.numpy(), causal), **F64_ATTN_TOL)
    # causality: the first token's output ignores every later token
    x2 = x.numpy().copy()
    x2[:, 1:] += 5.0
    y2 = attn(dn.tensor(x2), mask=causal)
    np.testing.assert_allclose(y2.numpy()[:, 0], y.numpy()[:, 0], **F64_ATTN_TOL)


def test_per_batch_and_per_head_masks_and_tensor_masks():
    attn = nn.MultiHeadSelfAttention(8, 2, dtype=np.float64, rng=4)
    x = _x((2, 3, 8))
    rng = np.random.default_rng(0)
    mask = rng.random((2, 2, 3, 3)) < 0.6
    mask[..., 0] = True  # every query keeps at least one key
    y = attn(x, mask=dn.tensor(mask))
    np.testing.assert_allclose(y.numpy(), reference(attn, x.numpy(), mask), **F64_ATTN_TOL)
    # a key-padding mask (B, 1, 1, N)
    pad = np.array([[True, True, False], [True, False, False]])[:, None, None, :]
    np.testing.assert_allclose(attn(x, mask=pad).numpy(), reference(attn, x.numpy(), pad),
                               **F64_ATTN_TOL)


def test_all_true_mask_changes_nothing_and_fully_masked_rows_are_finite():
    attn = nn.MultiHeadSelfAttention(4, 2, dtype=np.float64, rng=0)
    x = _x((1, 3, 4))
    np.testing.assert_array_equal(attn(x, mask=np.ones((3, 3), bool)).numpy(), attn(x).numpy())
    mask = np.ones((3, 3), bool)
    mask[1] = False  # query 1 may attend to nothing: it attends uniformly
    y = attn(x, mask=mask).numpy()
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y, reference(attn, x.numpy(), mask), **F64_ATTN_TOL)


def test_mask_errors():
    attn = nn.MultiHeadSelfAttention(4, 2, rng=0)
    x = _x((2, 3, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="does not broadcast"):
        attn(x, mask=np.ones((4, 4), bool))
    with pytest.raises(ValueError, match="does not broadcast"):
        attn(x, mask=np.ones((2, 2, 2, 3, 3), bool))
    with pytest.raises(TypeError, match="boolean"):
        attn(x, mask=np.ones((3, 3)))


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("kwargs, match", [
    (dict(dim=10, heads=3), "divisible by heads"),
    (dict(dim=8, heads=0), "heads must be a positive int"),
    (dict(dim=0, heads=1), "dim must be a positive int"),
    (dict(dim=8.0, heads=2), "dim must be a positive int"),
    (dict(dim=8, heads=True), "heads must be a positive int"),
    (dict(dim=8, heads=2, linear="sparse"), "linear must be one of"),
    (dict(dim=8, heads=2, dropout=1.0), r"dropout must be a number in \[0, 1\)"),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nn.MultiHeadSelfAttention(**kwargs)


def test_input_errors():
    attn = nn.MultiHeadSelfAttention(8, 2)
    with pytest.raises(ValueError, match=r"\(B, N, 8\)"):
        attn(_x((2, 8), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(B, N, 8\)"):
        attn(_x((2, 3, 6), dtype=np.float32))
    with pytest.raises(TypeError, match="Tensor"):
        attn(np.zeros((2, 3, 8), np.float32))


def test_structure_and_repr():
    attn = nn.MultiHeadSelfAttention(64, 4, linear="diag", sparsity=0.9, rng=0)
    assert isinstance(attn.qkv, nn.DiagLinear) and attn.qkv.shape == (192, 64)
    assert isinstance(attn.proj, nn.DiagLinear) and attn.proj.shape == (64, 64)
    assert [n for n, _ in attn.named_parameters()] == [
        "qkv.values", "qkv.bias", "proj.values", "proj.bias"]
    text = repr(attn)
    assert text.startswith("MultiHeadSelfAttention(dim=64, heads=4, head_dim=16, dropout=0.0")
    assert "(qkv): DiagLinear(" in text and "(proj): DiagLinear(" in text
    assert nn.MultiHeadSelfAttention is dn.nn.attention.MultiHeadSelfAttention


# ----------------------------------------------------------------------------- randomness


def test_same_seed_same_layer():
    a = nn.MultiHeadSelfAttention(8, 2, linear="diag", sparsity=0.5, rng=7)
    b = nn.MultiHeadSelfAttention(8, 2, linear="diag", sparsity=0.5, rng=7)
    c = nn.MultiHeadSelfAttention(8, 2, linear="diag", sparsity=0.5, rng=8)
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb
        np.testing.assert_array_equal(ta.numpy(), tb.numpy())
    assert not np.array_equal(a.qkv.values.numpy(), c.qkv.values.numpy())


def test_attention_dropout_train_and_eval():
    attn = nn.MultiHeadSelfAttention(8, 2, dropout=0.5, rng=0)
    plain = nn.MultiHeadSelfAttention(8, 2, dropout=0.0, rng=0)
    x = _x((2, 6, 8), dtype=np.float32)
    attn.eval()
    y1, y2 = attn(x).numpy(), attn(x).numpy()
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(y1, plain(x).numpy())  # eval mode: no dropout at all
    attn.train()
    dn.manual_seed(0)
    t1 = attn(x).numpy()
    t2 = attn(x).numpy()
    assert not np.allclose(t1, y1) and not np.allclose(t1, t2)
    dn.manual_seed(0)
    np.testing.assert_array_equal(attn(x).numpy(), t1)  # masks follow diagnet.manual_seed


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("linear", ["dense", "diag"])
def test_gradcheck_input_and_parameters(linear):
    attn = nn.MultiHeadSelfAttention(6, 2, linear=linear, sparsity=0.5, dtype=np.float64, rng=0)
    x = _x((2, 3, 6), requires_grad=True)
    params = list(attn.parameters())
    assert dn.gradcheck(lambda x, *ps: attn(x), x, *params, **GRADCHECK_TOL)


def test_gradcheck_with_mask():
    attn = nn.MultiHeadSelfAttention(4, 2, linear="diag", sparsity=0.5, dtype=np.float64, rng=1)
    x = _x((2, 3, 4), requires_grad=True)
    causal = np.tril(np.ones((3, 3), dtype=bool))
    assert dn.gradcheck(lambda x, *ps: attn(x, mask=causal), x, *attn.parameters(),
                        **GRADCHECK_TOL)


# ----------------------------------------------------------------------------- gpu


@pytest.mark.gpu
@pytest.mark.parametrize("linear", ["dense", "diag"])
def test_gpu_forward_and_backward_match_cpu(linear):
    """Float64 on both devices, so the only differences are summation orders (tolerance
    ``F64_ATTN_TOL``, a few hundred ulps of O(1) values)."""
    out = {}
    for device in ("cpu", "cuda"):
        attn = nn.MultiHeadSelfAttention(8, 2, linear=linear, sparsity=0.5, dtype=np.float64,
                                         device=device, rng=0)
        assert attn.device == device
        x = _x((2, 4, 8), device=device, requires_grad=True)
        y = attn(x, mask=np.tril(np.ones((4, 4), bool)))
        assert backend.device_of(y.data) == device
        (y * y).sum().backward()
        out[device] = [y.numpy(), x.grad.numpy()] + [p.grad.numpy() for p in attn.parameters()]
    for cpu, gpu in zip(out["cpu"], out["cuda"]):
        np.testing.assert_allclose(gpu, cpu, **F64_ATTN_TOL)
