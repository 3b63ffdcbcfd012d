"""The models of `diagnet.models`: `MLP`, `ViT` and `MLPMixer`.

Checked: output shapes for every accepted input form, dtype and ``linear`` choice; that
``linear="diag"`` puts `nn.DiagLinear` exactly where documented, at the requested sparsity;
float64 gradchecks of a small MLP, a transformer block, a Mixer block and whole tiny ViT
and Mixer (inputs and every parameter); determinism by seed; dropout in train and eval
mode; that a few optimizer steps lower the loss; and (marked ``gpu``) that forward and
backward on CUDA match the CPU.

Tolerances: gradchecks use ``GRADCHECK_TOL``; float32 against float64 outputs use
``F32_TOL``-like bounds stated where used; CPU-vs-GPU comparisons run in float64 with
``F64_DEVICE_TOL`` below.
"""

from __future__ import annotations

import numpy as np
import pytest

import diagnet as dn
import diagnet.functional as F
from diagnet import nn
from diagnet.models import MLP, MixerBlock, MLPMixer, TransformerBlock, ViT
from diagnet.models.common import pre_norm_fusable
from tolerances import GRADCHECK_TOL

#: CPU vs GPU (or the CuPy stand-in) in float64: the same model, with sums in another
#: order in the diagonal kernels and the matmuls; outputs and gradients are O(1), so 1e-10
#: is hundreds of ulps of margin while a wrong kernel is off by O(1e-2).
F64_DEVICE_TOL = dict(rtol=1e-9, atol=1e-11)

KINDS = ("mlp", "vit", "mixer")
C, H, W, CLASSES = 2, 8, 8, 5


def build(kind, linear="dense", dtype=np.float32, rng=0, dropout=0.0, device=None,
          in_channels=C, sparsity=0.9, depth=2):
    """A small model of ``kind`` for ``(B, in_channels, 8, 8)`` images and 5 classes."""
    kw = dict(linear=linear, sparsity=sparsity, dropout=dropout, dtype=dtype, device=device,
              rng=rng)
    if kind == "mlp":
        return MLP(in_channels * H * W, [16, 12], CLASSES, **kw)
    if kind == "vit":
        return ViT(image_size=H, patch_size=4, in_channels=in_channels, dim=8, depth=depth,
                   heads=2, mlp_ratio=2, num_classes=CLASSES, **kw)
    return MLPMixer(image_size=H, patch_size=2, in_channels=in_channels, dim=8, depth=depth,
                    token_mlp_dim=12, channel_mlp_dim=16, num_classes=CLASSES, **kw)


def images(B=3, channels=C, dtype=np.float32, seed=1, device=None, requires_grad=False):
    data = np.random.default_rng(seed).standard_normal((B, channels, H, W))
    return dn.tensor(data, dtype=dtype, device=device, requires_grad=requires_grad)


def state(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


def assert_same_state(a, b):
    sa, sb = state(a), state(b)
    assert list(sa) == list(sb)
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)


# ----------------------------------------------------------------------------- shapes, dtypes


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("linear", ["dense", "diag"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_output_shape_and_dtype(kind, linear, dtype):
    model = build(kind, linear, dtype)
    assert all(p.dtype == dtype for p in model.parameters())
    x = images(dtype=dtype)
    y = model(x)
    assert y.shape == (3, CLASSES) and y.dtype == dtype
    # flat images give the same logits
    np.testing.assert_array_equal(model(x.reshape(3, C * H * W)).numpy(), y.numpy())


@pytest.mark.parametrize("kind", KINDS)
def test_single_channel_images_as_3d_4d_and_2d(kind):
    model = build(kind, "diag", in_channels=1)
    x4 = images(B=2, channels=1)
    y = model(x4).numpy()
    assert y.shape == (2, CLASSES)
    np.testing.assert_array_equal(model(x4.reshape(2, H, W)).numpy(), y)
    np.testing.assert_array_equal(model(x4.reshape(2, H * W)).numpy(), y)


def test_mlp_on_feature_vectors_and_hidden_as_int():
    model = MLP(10, 7, 3, linear="diag", activation="tanh", rng=0)
    assert model(dn.tensor(np.ones((4, 10), np.float32))).shape == (4, 3)
    assert [type(m) for m in model.features] == [nn.DiagLinear, nn.Tanh]
    model = MLP(10, [6, 6, 6], 3, activation="gelu", dropout=0.2, bias=False, rng=0)
    assert [type(m).__name__ for m in model.features] == ["Linear", "GELU", "Dropout"] * 3
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Linear))


@pytest.mark.parametrize("kind", KINDS)
def test_astype_and_dtype_argument_agree(kind):
    m32 = build(kind, "diag")
    m64 = build(kind, "diag").astype(np.float64)
    assert all(p.dtype == np.float64 for p in m64.parameters())
    x = images()
    y32 = m32(x).numpy()
    y64 = m64(x.astype(np.float64)).numpy()
    assert y64.dtype == np.float64
    # the same float32 parameters, evaluated in float32 and in float64
    np.testing.assert_allclose(y32, y64, rtol=1e-4, atol=1e-5)
    # dtype=float64 draws in float64: the same numbers up to float32 rounding
    d64 = build(kind, "diag", dtype=np.float64)
    for (k, a), b in zip(state(d64).items(), state(m32).values()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8, err_msg=k)


# ----------------------------------------------------------------------------- structure

# where each model must put DiagLinear with linear="diag" (names relative to the model)
DIAG_LAYERS = {
    "mlp": {"features.0", "features.2"},
    "vit": {f"blocks.{i}.{n}" for i in range(2)
            for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")},
    "mixer": {f"blocks.{i}.{n}" for i in range(2)
              for n in ("token_mix.fc1", "token_mix.fc2", "channel_mix.fc1", "channel_mix.fc2")},
}
DENSE_LAYERS = {"mlp": {"head"}, "vit": {"patch_embed.proj", "head"},
                "mixer": {"patch_embed.proj", "head"}}


@pytest.mark.parametrize("kind", KINDS)
def test_diag_layers_exactly_where_specified(kind):
    def layers(model, cls):
        return {name for name, m in model.named_modules() if type(m) is cls}

    diag = build(kind, "diag")
    assert layers(diag, nn.DiagLinear) == DIAG_LAYERS[kind]
    assert layers(diag, nn.Linear) == DENSE_LAYERS[kind]
    dense = build(kind, "dense")
    assert layers(dense, nn.DiagLinear) == set()
    assert layers(dense, nn.Linear) == DIAG_LAYERS[kind] | DENSE_LAYERS[kind]


@pytest.mark.parametrize("model", [
    lambda: MLP(784, [256, 128], 10, linear="diag", rng=0),
    lambda: ViT(28, 7, 1, 64, 2, 4, 2, 10, linear="diag", rng=0),
    lambda: MLPMixer(28, 4, 1, 64, 2, 64, 128, 10, linear="diag", rng=0),
], ids=KINDS)
def test_realised_sparsity(model):
    model = model()
    layers = [m for m in model.modules() if isinstance(m, nn.DiagLinear)]
    assert layers
    for layer in layers:
        # K = ceil(0.1 P): the realised sparsity is at most 0.9 and less than one diagonal below
        assert 0.9 - 1 / layer.P < layer.sparsity <= 0.9 + 1e-12, layer
    nnz = sum(layer.nnz for layer in layers)
    full = sum(layer.out_features * layer.in_features for layer in layers)
    assert 1 - nnz / full == pytest.approx(0.9, abs=0.01)


def test_vit_repr_reads_well():
    model = ViT(image_size=28, patch_size=7, in_channels=1, dim=64, depth=2, heads=4,
                mlp_ratio=2, num_classes=10, linear="diag", sparsity=0.9, rng=0)
    text = repr(model)
    lines = text.splitlines()
    assert lines[0] == ("ViT(linear='diag', dropout=0.0, cls_token=(1, 1, 64), "
                        "pos_embed=(1, 17, 64)")
    assert "  (patch_embed): PatchEmbedding(image_size=(28, 28), patch_size=7, num_patches=16" \
        in lines
    assert sum("(attn): MultiHeadSelfAttention(dim=64, heads=4, head_dim=16" in ln
               for ln in lines) == 2
    assert sum("(qkv): DiagLinear(in_features=64, out_features=192, K=20/192" in ln
               for ln in lines) == 2
    assert lines[-1] == f")  # {model.num_parameters():,} params in all"
    assert "MLPMixer(linear='diag'" in repr(build("mixer", "diag"))


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("make, error, match", [
    (lambda: ViT(30, 7, 1, 8, 1, 2, 2, 3), ValueError, "divisible by patch_size"),
    (lambda: ViT(28, 7, 1, 10, 1, 3, 2, 3), ValueError, r"dim \(10\) must be divisible by heads"),
    (lambda: ViT(28, 7, 1, 8, 0, 2, 2, 3), ValueError, "depth must be a positive int"),
    (lambda: ViT(28, 7, 1, 8, 1, 2, 2, 3, linear="sparse"), ValueError, "linear must be one of"),
    (lambda: ViT(28, 7, 1, 8, 1, 2, 2, 3, dropout=1.0), ValueError, "dropout"),
    (lambda: ViT(28, 7, 1, 8, 1, 2, 0, 3), ValueError, "mlp_ratio"),
    (lambda: MLPMixer(28, 5, 1, 8, 1, 4, 4, 3), ValueError, "divisible by patch_size"),
    (lambda: MLPMixer(28, 7, 1, 8, 1, 0, 4, 3), ValueError, "token_mlp_dim must be a pos"),
    (lambda: MLPMixer(28, 7, 1, 8, 1, 4, 4, 3, linear="Diag"), ValueError, "linear must be"),
    (lambda: MLP(10, [], 3), ValueError, "non-empty"),
    (lambda: MLP(10, [4, 0], 3), ValueError, "hidden width must be a positive int"),
    (lambda: MLP(10, 4, 3, activation="swish"), ValueError, "activation must be one of"),
    (lambda: MLP(10, 4, 3, linear="dense "), ValueError, "linear must be one of"),
    (lambda: MLP(10, 4, 0), ValueError, "num_classes must be a positive int"),
])
def test_constructor_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("kind", ["vit", "mixer"])
def test_image_shape_errors(kind):
    model = build(kind)
    for bad in [(3, 3, H, W), (3, H, W), (3, C * H * W + 1), (3, C, H, W + 4)]:
        with pytest.raises(ValueError, match=r"expected images of shape \(B, 2, 8, 8\) or "
                                             r"\(B, 128\)"):
            model(dn.tensor(np.zeros(bad, np.float32)))
    single = build(kind, in_channels=1)
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\), \(B, 8, 8\) or \(B, 64\)"):
        single(dn.tensor(np.zeros((3, 8, 7), np.float32)))


def test_mlp_input_errors():
    model = build("mlp")
    with pytest.raises(ValueError, match=r"\(B, 128\)"):
        model(dn.tensor(np.zeros((3, 127), np.float32)))
    with pytest.raises(ValueError, match=r"\(B, 128\)"):
        model(dn.tensor(np.zeros(128, np.float32)))


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("kind", KINDS)
def test_same_rng_same_parameters_and_outputs(kind):
    a, b = build(kind, "diag", rng=3), build(kind, "diag", rng=3)
    assert_same_state(a, b)
    x = images()
    np.testing.assert_array_equal(a(x).numpy(), b(x).numpy())
    # a Generator in the same state, and the default generator after manual_seed
    assert_same_state(a, build(kind, "diag", rng=np.random.default_rng(3)))
    dn.manual_seed(11)
    c = build(kind, "diag", rng=None)
    dn.manual_seed(11)
    assert_same_state(c, build(kind, "diag", rng=None))
    # another seed: other offsets and values
    other = state(build(kind, "diag", rng=4))
    assert any(not np.array_equal(v, other[k]) for k, v in state(a).items())


@pytest.mark.parametrize("kind", KINDS)
def test_dropout_only_in_training_mode(kind):
    model = build(kind, "diag", dropout=0.3)
    plain = build(kind, "diag", dropout=0.0)   # same seed: the same parameters
    x = images()
    model.eval()
    y1, y2 = model(x).numpy(), model(x).numpy()
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(y1, plain(x).numpy())
    model.train()
    t1, t2 = model(x).numpy(), model(x).numpy()
    assert not np.allclose(t1, y1) and not np.allclose(t1, t2)
    # dropout=0: train and eval mode agree
    np.testing.assert_array_equal(plain.train()(x).numpy(), plain.eval()(x).numpy())


# ----------------------------------------------------------------------------- gradients


def _gradcheck(module, x, *args):
    params = list(module.parameters())
    assert dn.gradcheck(lambda x, *ps: module(x, *args), x, *params, **GRADCHECK_TOL)


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
def test_gradcheck_tiny_diag_mlp(activation):
    model = MLP(6, [8, 5], 3, linear="diag", sparsity=0.5, activation=activation,
                dtype=np.float64, rng=0)
    x = dn.tensor(np.random.default_rng(2).standard_normal((3, 6)), dtype="float64",
                  requires_grad=True)
    _gradcheck(model, x)


def test_gradcheck_transformer_block_diag():
    block = TransformerBlock(dim=4, heads=2, mlp_ratio=2, linear="diag", sparsity=0.5,
                             dtype=np.float64, rng=0)
    # move the LayerNorm affine parameters away from their (1, 0) start so that they are
    # checked at a generic point
    rng = np.random.default_rng(5)
    for ln in (block.ln1, block.ln2):
        ln.weight.data = rng.uniform(0.5, 1.5, 4)
        ln.bias.data = rng.uniform(-0.5, 0.5, 4)
    x = dn.tensor(rng.standard_normal((2, 3, 4)), dtype="float64", requires_grad=True)
    names = [n for n, _ in block.named_parameters()]
    assert names == ["ln1.weight", "ln1.bias", "attn.qkv.values", "attn.qkv.bias",
                     "attn.proj.values", "attn.proj.bias", "ln2.weight", "ln2.bias",
                     "mlp.fc1.values", "mlp.fc1.bias", "mlp.fc2.values", "mlp.fc2.bias"]
    _gradcheck(block, x)


def test_gradcheck_mixer_block_diag():
    block = MixerBlock(num_tokens=4, dim=3, token_mlp_dim=6, channel_mlp_dim=5, linear="diag",
                       sparsity=0.5, dtype=np.float64, rng=0)
    rng = np.random.default_rng(6)
    for ln in (block.ln1, block.ln2):
        ln.weight.data = rng.uniform(0.5, 1.5, 3)
        ln.bias.data = rng.uniform(-0.5, 0.5, 3)
    x = dn.tensor(rng.standard_normal((2, 4, 3)), dtype="float64", requires_grad=True)
    assert sum(isinstance(m, nn.DiagLinear) for m in block.modules()) == 4
    _gradcheck(block, x)


@pytest.mark.parametrize("kind", ["vit", "mixer"])
def test_gradcheck_whole_tiny_model(kind):
    """Patch embedding, class token and position embedding (ViT) and head included."""
    if kind == "vit":
        model = ViT(image_size=4, patch_size=2, in_channels=2, dim=4, depth=1, heads=2,
                    mlp_ratio=1, num_classes=3, linear="diag", sparsity=0.5, dtype=np.float64,
                    rng=0)
        assert {"cls_token", "pos_embed"} <= {n for n, _ in model.named_parameters()}
    else:
        model = MLPMixer(image_size=4, patch_size=2, in_channels=2, dim=3, depth=1,
                         token_mlp_dim=3, channel_mlp_dim=4, num_classes=3, linear="diag",
                         sparsity=0.5, dtype=np.float64, rng=0)
    x = dn.tensor(np.random.default_rng(3).standard_normal((2, 2, 4, 4)), dtype="float64",
                  requires_grad=True)
    _gradcheck(model, x)


# ----------------------------------------------------------------------------- training


def _task(n=64, d=2 * H * W, classes=4, seed=0):
    """64 random images whose labels are the argmax of a fixed random linear map (learnable)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    y = (x @ rng.standard_normal((d, classes))).argmax(axis=1)
    return dn.tensor(x.reshape(n, 2, H, W)), dn.tensor(y)


@pytest.mark.parametrize("kind", KINDS)
def test_training_lowers_the_loss(kind):
    from diagnet.optim import Adam

    x, y = _task()
    kw = dict(linear="diag", sparsity=0.9, rng=0)
    model = {"mlp": lambda: MLP(2 * H * W, [32, 32], 4, **kw),
             "vit": lambda: ViT(H, 4, 2, 16, 1, 2, 2, 4, **kw),
             "mixer": lambda: MLPMixer(H, 4, 2, 16, 1, 8, 32, 4, **kw)}[kind]()
    opt = Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(model(x), y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.5 * losses[0], losses
    # the diagonal structure is untouched by training
    assert all(m.values.shape == (m.K, m.L) for m in model.modules()
               if isinstance(m, nn.DiagLinear))


# ----------------------------------------------------------------------------- gpu


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_forward_and_backward_match_cpu(kind):
    """The same seed built on each device (parameters are drawn on the host, so they are
    equal); float64 logits, input gradient and every parameter gradient must agree within
    ``F64_DEVICE_TOL``. A CPU-built model moved with ``.to`` gives the same logits. (Depth 1:
    the CuPy stand-in emulates every kernel launch on the CPU, so fewer layers run faster.)"""
    results = {}
    for device in ("cpu", "cuda"):
        model = build(kind, "diag", np.float64, device=device, sparsity=0.5, depth=1)
        assert model.device == device
        x = images(B=2, dtype=np.float64, device=device, requires_grad=True)
        logits = model(x)
        assert logits.device == device
        (logits * logits).sum().backward()
        results[device] = [logits.numpy(), x.grad.numpy()] + \
            [p.grad.numpy() for p in model.parameters()]
    for i, (cpu, gpu) in enumerate(zip(results["cpu"], results["cuda"])):
        np.testing.assert_allclose(gpu, cpu, err_msg=f"result {i}", **F64_DEVICE_TOL)
    moved = build(kind, "diag", np.float64, sparsity=0.5, depth=1).to("cuda")
    assert moved.device == "cuda"
    np.testing.assert_allclose(moved(images(B=2, dtype=np.float64, device="cuda")).numpy(),
                               results["cpu"][0], **F64_DEVICE_TOL)


def _vit_outputs(model, x, labels):
    """The logits and every parameter's gradient after one backward of the loss."""
    for p in model.parameters():
        p.grad = None
    logits = model(x)
    F.cross_entropy(logits, labels).backward()
    return [logits.numpy()] + [p.grad.numpy() for p in model.parameters()]


def _fusable(model):
    block_type = TransformerBlock if isinstance(model, ViT) else MixerBlock
    return pre_norm_fusable(model.blocks, block_type, model.norm)


def _small_model(kind, linear, dtype):
    if kind == "vit":
        return ViT(8, 4, 1, 8, 2, 2, 2, 3, linear=linear, sparsity=0.5, dtype=dtype, rng=0)
    return MLPMixer(8, 4, 1, 8, 2, 6, 12, 3, linear=linear, sparsity=0.5, dtype=dtype, rng=0)


@pytest.mark.parametrize("kind", ["vit", "mixer"])
@pytest.mark.parametrize("linear", ["dense", "diag"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_fused_residual_norms_equal_calling_the_blocks(kind, linear, dtype):
    """`ViT.forward` and `MLPMixer.forward` fuse each residual add into the layer norm after
    it; a forward hook on a block makes them call the blocks one by one. Both give the same
    logits and gradients (to rounding: the fused kernels add the gradients of the residual
    stream with an FMA)."""
    rng = np.random.default_rng(0)
    x = dn.tensor(rng.standard_normal((3, 1, 8, 8)).astype(dtype))
    labels = dn.tensor(rng.integers(0, 3, 3))
    model = _small_model(kind, linear, dtype)
    assert _fusable(model)
    fused = _vit_outputs(model, x, labels)
    handle = model.blocks[1].register_forward_hook(lambda module, inputs, out: None)
    assert not _fusable(model)
    blockwise = _vit_outputs(model, x, labels)
    handle.remove()
    assert _fusable(model)
    tol = dict(rtol=1e-12, atol=1e-13) if dtype == np.float64 else dict(rtol=2e-5, atol=2e-6)
    for got, want in zip(fused, blockwise):
        np.testing.assert_allclose(got, want, **tol)


@pytest.mark.parametrize("kind", ["vit", "mixer"])
def test_blocks_are_called_when_a_norm_is_replaced_or_hooked(kind):
    model = _small_model(kind, "dense", np.float32)
    seen = []
    model.norm.register_forward_hook(lambda module, inputs, out: seen.append(out.shape))
    assert not _fusable(model)
    model(dn.tensor(np.zeros((2, 1, 8, 8), np.float32)))
    assert seen == ([(2, 5, 8)] if kind == "vit" else [(2, 4, 8)])
    model = _small_model(kind, "dense", np.float32)
    model.blocks[0].ln2 = nn.Identity()
    assert not _fusable(model)
    assert model(dn.tensor(np.zeros((2, 1, 8, 8), np.float32))).shape == (2, 3)
