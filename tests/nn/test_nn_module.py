"""`diagnet.nn.Module` and the small layers: registration, walking, modes, devices, state dicts."""

from __future__ import annotations

import numpy as np
import pytest

import diagnet as dn
from diagnet import nn
from tolerances import F32_TOL, F64_GRAD_TOL, F64_TOL, GRADCHECK_TOL


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3, rng=0)
        self.scale = nn.Parameter(np.ones(3, np.float32))
        self.register_buffer("count", dn.tensor(np.zeros(1, np.int64)))
        self.register_buffer("cache", dn.tensor(np.zeros(2)), persistent=False)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.fc(x)) * self.scale


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = Block()
        self.second = Block()
        self.second.fc = self.first.fc  # shared layer: its parameters count once
        self.head = nn.Linear(3, 2, rng=1)

    def forward(self, x):
        return self.head(self.second.act(self.first(x)))


def test_registration_by_assignment_in_order():
    net = Net()
    # pre-order, a module's own parameters before its children's (as in PyTorch)
    assert [n for n, _ in net.named_parameters()] == [
        "first.scale", "first.fc.weight", "first.fc.bias", "second.scale",
        "head.weight", "head.bias"]
    assert [n for n, _ in net.named_buffers()] == [
        "first.count", "first.cache", "second.count", "second.cache"]
    assert [n for n, _ in net.named_modules()] == [
        "", "first", "first.fc", "first.act", "second", "second.act", "head"]
    assert [n for n, _ in net.named_children()] == ["first", "second", "head"]
    assert len(list(net.modules())) == 7
    assert net.num_parameters() == 4 * 3 + 3 + 3 + 3 + 3 * 2 + 2


def test_state_dict_has_persistent_entries_under_dotted_names():
    net = Net()
    sd = net.state_dict()
    assert "first.cache" not in sd and "first.count" in sd
    # a shared layer is saved once, under its first name, as named_parameters lists it
    assert "second.fc.weight" not in sd and sd["first.fc.weight"].data is net.first.fc.weight.data
    assert list(sd) == ["first.scale", "first.count", "first.fc.weight", "first.fc.bias",
                        "second.scale", "second.count", "head.weight", "head.bias"]


def test_reassigning_changes_the_kind_and_bad_assignments_raise():
    b = Block()
    b.scale = None  # an absent parameter, as bias=False
    assert "scale" not in dict(b.named_parameters())
    b.scale = nn.Parameter(np.ones(3))
    with pytest.raises(TypeError, match="cannot assign int to 'act': a Module or None"):
        b.act = 5
    with pytest.raises(TypeError, match="buffer 'count' can only be set to a Tensor"):
        b.count = np.zeros(1)
    with pytest.raises(TypeError, match="cannot assign ndarray to 'scale'"):
        b.scale = np.ones(3)
    del b.fc
    assert "fc" not in dict(b.named_children())


def test_setattr_before_super_init_is_a_clear_error():
    class Bad(nn.Module):
        def __init__(self):
            self.fc = nn.Linear(2, 2)

    with pytest.raises(AttributeError, match="must call super"):
        Bad()


def test_missing_attribute_error_names_the_module():
    with pytest.raises(AttributeError, match="'Block' object has no attribute 'nope'"):
        Block().nope


def test_train_eval_reach_every_module_and_dropout_follows():
    net = nn.Sequential(nn.Linear(8, 8, rng=0), nn.Dropout(0.5), nn.Sequential(nn.Dropout(0.3)))
    assert all(m.training for m in net.modules())
    assert net.eval() is net and not any(m.training for m in net.modules())
    x = dn.tensor(np.ones((4, 8), np.float32))
    np.testing.assert_array_equal(net(x).numpy(), net(x).numpy())
    net.train()
    assert all(m.training for m in net.modules())
    dn.manual_seed(0)
    a = net(x).numpy()
    b = net(x).numpy()
    assert not np.array_equal(a, b)  # a fresh mask each call
    with pytest.raises(TypeError, match="mode must be a bool"):
        net.train("no")


def test_train_eval_skip_absent_submodules_and_visit_shared_ones_once():
    """The walk of `train` (its own loop, not `modules()`): a submodule set to None is
    skipped, one shared by two parents and a cycle back to an ancestor end the walk."""
    shared = nn.Dropout(0.5)
    net = nn.Sequential(nn.Sequential(shared), shared, nn.Linear(2, 2, rng=0))
    net[2]._modules["extra"] = None  # an absent submodule slot
    net[0]._modules["back"] = net  # a cycle
    assert net.eval() is net
    assert not any(m.training for m in (net, net[0], shared, net[2]))
    net.train()
    assert all(m.training for m in (net, net[0], shared, net[2]))


def test_zero_grad_both_forms_and_requires_grad_():
    lin = nn.Linear(3, 2, rng=0)
    lin(dn.tensor(np.ones((2, 3), np.float32))).sum().backward()
    lin.zero_grad(set_to_none=False)
    assert np.all(lin.weight.grad.numpy() == 0)
    lin.zero_grad()
    assert lin.weight.grad is None and lin.bias.grad is None
    lin.requires_grad_(False)
    assert not any(p.requires_grad for p in lin.parameters())


def test_astype_casts_floats_keeps_offsets_and_parameter_identity():
    net = nn.Sequential(nn.DiagLinear(6, 4, sparsity=0.5, rng=0), nn.LayerNorm(4))
    params = list(net.parameters())
    net.double()
    assert list(net.parameters()) == params or all(a is b for a, b in zip(net.parameters(), params))
    assert all(p.dtype == np.float64 for p in net.parameters())
    assert net[0].offsets.dtype == np.int64
    y = net(dn.tensor(np.ones((2, 6)), dtype=np.float64))
    assert y.dtype == np.float64
    with pytest.raises(TypeError, match="float32 or float64"):
        net.astype(np.int32)


def test_state_dict_round_trip_is_bit_exact():
    a = nn.Sequential(nn.DiagLinear(10, 7, sparsity=0.6, rng=0), nn.GELU(), nn.Linear(7, 3, rng=1))
    b = nn.Sequential(nn.DiagLinear(10, 7, sparsity=0.6, rng=5), nn.GELU(), nn.Linear(7, 3, rng=6))
    x = dn.tensor(np.random.default_rng(0).standard_normal((5, 10)).astype(np.float32))
    assert not np.array_equal(a(x).numpy(), b(x).numpy())
    b.load_state_dict({k: v.numpy() for k, v in a.state_dict().items()})
    np.testing.assert_array_equal(a(x).numpy(), b(x).numpy())
    # the loaded arrays are copies: changing the source does not reach the model
    sd = a.state_dict()
    b.load_state_dict(sd)
    a[2].weight.data += 1
    assert not np.array_equal(a[2].weight.numpy(), b[2].weight.numpy())


def _snapshot(model):
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before):
    after = _snapshot(model)
    assert after.keys() == before.keys()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])


@pytest.mark.parametrize("edit, error, match", [
    (lambda sd: sd.pop("2.bias"), KeyError, "missing keys: 2.bias"),
    (lambda sd: sd.__setitem__("2.extra", np.ones(1)), KeyError, "unexpected keys: 2.extra"),
    (lambda sd: sd.__setitem__("2.weight", np.ones((3, 8), np.float32)), ValueError,
     r"2.weight: shape \(3, 8\) in the state dict, \(3, 7\) in the model"),
    (lambda sd: sd.__setitem__("2.weight", sd["2.weight"].astype(np.float64)), ValueError,
     "2.weight: dtype float64 in the state dict, float32 in the model"),
    (lambda sd: sd.__setitem__("0.offsets", sd["0.offsets"][::-1].copy()), ValueError,
     "offsets must be sorted"),
    (lambda sd: sd.__setitem__("0.values", "text"), TypeError, "must be a Tensor or a NumPy"),
])
def test_load_state_dict_errors_leave_the_model_unchanged(edit, error, match):
    src = nn.Sequential(nn.DiagLinear(10, 7, sparsity=0.6, rng=0), nn.ReLU(), nn.Linear(7, 3, rng=1))
    dst = nn.Sequential(nn.DiagLinear(10, 7, sparsity=0.6, rng=9), nn.ReLU(), nn.Linear(7, 3, rng=8))
    sd = _snapshot(src)
    edit(sd)
    before = _snapshot(dst)
    with pytest.raises(error, match=match):
        dst.check_state_dict(sd)
    with pytest.raises(error, match=match):
        dst.load_state_dict(sd)
    _assert_unchanged(dst, before)


class Growing(nn.Module):
    """A module whose parameter takes the length of the state it loads (as a
    `DynaDiagLinear` takes the stored count of its state), through `_prepare_state`."""

    def __init__(self, n, most=10):
        super().__init__()
        self.w = nn.Parameter(np.arange(n, dtype=np.float32))
        self.most = most

    def _prepare_state(self, local):
        saved = local.get("w")
        if saved is None or saved.shape == self.w.shape:
            return None
        if saved.shape[0] > self.most:
            raise ValueError(f"w: at most {self.most} entries; the state dict has "
                             f"{saved.shape[0]}")
        old = self.w.data
        self.w.data = np.zeros(saved.shape, np.float32)

        def undo():
            self.w.data = old
        return undo


def test_prepare_state_resizes_before_the_shape_checks_and_is_undone_on_refusal():
    src = nn.Sequential(Growing(5), nn.Linear(2, 2, rng=0))
    src[0].w.data = np.linspace(1, 2, 5).astype(np.float32)
    sd = _snapshot(src)
    dst = nn.Sequential(Growing(3), nn.Linear(2, 2, rng=1))
    old_w = dst[0].w.data
    assert dst.check_state_dict(sd) == ([], [])        # fits, once resized; changes nothing
    assert dst[0].w.data is old_w
    # refused after the resize (another module's entry): the resize is undone
    bad = dict(sd, **{"1.weight": np.ones((2, 3), np.float32)})
    with pytest.raises(ValueError, match=r"1\.weight: shape \(2, 3\)"):
        dst.load_state_dict(bad)
    assert dst[0].w.data is old_w
    # refused by a later module's own hook: the earlier ones are undone
    two = nn.Sequential(Growing(3), Growing(3, most=4))
    kept = [m.w.data for m in two]
    with pytest.raises(ValueError, match="at most 4 entries"):
        two.load_state_dict({"0.w": np.zeros(5, np.float32), "1.w": np.zeros(6, np.float32)})
    assert [m.w.data for m in two] == kept
    dst.load_state_dict(sd)
    np.testing.assert_array_equal(dst[0].w.numpy(), src[0].w.numpy())
    # prepare_state_dict alone: resize now, undo later (as a checkpoint load does while it
    # validates the optimizer against the new shapes)
    other = nn.Sequential(Growing(3), nn.Linear(2, 2, rng=1))
    undo = other.prepare_state_dict(sd)
    assert other[0].w.shape == (5,)
    undo()
    assert other[0].w.shape == (3,)


def test_mismatch_errors_list_a_few_keys_and_every_kind():
    src = nn.Sequential(*[nn.Linear(3, 3, rng=i) for i in range(12)])
    dst = nn.Sequential(*[nn.Linear(3, 3, rng=i) for i in range(10)], nn.Linear(3, 4))
    with pytest.raises(KeyError) as info:
        dst.load_state_dict(_snapshot(src))
    message = info.value.args[0]
    assert "unexpected keys: 11.weight, 11.bias" in message
    assert "10.weight: shape (3, 3) in the state dict, (4, 3) in the model" in message
    few = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(KeyError, match=r"unexpected keys: 1\.weight, 1\.bias, 2\.weight, "
                                        r"2\.bias, 3\.weight, 3\.bias and 16 more"):
        few.load_state_dict(_snapshot(src))


def test_non_strict_load_reports_keys_and_loads_the_rest():
    src = nn.Sequential(nn.Linear(4, 4, rng=0), nn.Linear(4, 2, rng=1))
    dst = nn.Sequential(nn.Linear(4, 4, rng=2), nn.Linear(4, 2, rng=3))
    sd = _snapshot(src)
    del sd["1.bias"]
    sd["junk"] = np.zeros(1)
    result = dst.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["1.bias"] and result.unexpected_keys == ["junk"]
    np.testing.assert_array_equal(dst[0].weight.numpy(), src[0].weight.numpy())
    assert not np.array_equal(dst[1].bias.numpy(), src[1].bias.numpy())


def test_repr_shows_layers_parameter_counts_and_sparsity():
    net = nn.Sequential(nn.DiagLinear(784, 256, sparsity=0.9, rng=0), nn.ReLU(), nn.Linear(256, 10))
    text = repr(net)
    assert "(0): DiagLinear(in_features=784, out_features=256, K=79/784, sparsity=0.8992, " \
           "bias=True)  # 20,480 params" in text
    assert "(1): ReLU()" in text
    assert "(2): Linear(in_features=256, out_features=10, bias=True)  # 2,570 params" in text
    assert text.endswith("# 23,050 params in all")


def test_summary_counts_stored_and_dense_equivalent_numbers():
    net = nn.Sequential(nn.DiagLinear(784, 256, sparsity=0.9, rng=0), nn.ReLU(),
                        nn.DiagLinear(256, 256, sparsity=0.9, rng=1), nn.ReLU(), nn.Linear(256, 10),
                        nn.LayerNorm(10))
    s = nn.summary(net)
    assert [r.name for r in s.rows] == ["0", "2", "4", "5"]
    first, second, head, norm = s.rows
    assert (first.params, first.weight_nnz, first.weight_dense) == (79 * 256 + 256, 79 * 256,
                                                                    784 * 256)
    assert first.dense == 784 * 256 + 256 and first.sparsity == pytest.approx(1 - 79 / 784)
    assert second.params == 26 * 256 + 256 and second.sparsity == pytest.approx(1 - 26 / 256)
    assert head.sparsity == 0.0 and head.dense == head.params == 2570
    assert norm.weight_nnz is None and norm.sparsity is None and norm.dense == 20
    assert s.params == net.num_parameters()
    assert s.dense == 784 * 256 + 256 * 256 + 256 * 10 + 256 + 256 + 10 + 20
    assert s.sparsity == pytest.approx(1 - s.params / s.dense, abs=1e-15)
    assert s.weight_sparsity == pytest.approx(
        1 - (79 * 256 + 26 * 256 + 2560) / (784 * 256 + 256 * 256 + 2560), abs=1e-15)
    text = str(s)
    assert "DiagLinear" in text and "256x784, K=79/784" in text and "89.92%" in text
    assert text.splitlines()[-2].startswith("total") and "weights alone" in text
    with pytest.raises(TypeError, match="needs a Module"):
        nn.summary(object())


def test_containers():
    a, b = nn.Linear(2, 3, rng=0), nn.Tanh()
    seq = nn.Sequential(a, b)
    assert len(seq) == 2 and seq[0] is a and list(seq) == [a, b]
    assert isinstance(seq[1:], nn.Sequential) and seq[1:][0] is b
    seq.append(nn.Identity())
    assert len(seq) == 3
    lst = nn.ModuleList([nn.Linear(2, 2, rng=1)]).append(nn.Linear(2, 2, rng=2))
    assert [n for n, _ in lst.named_parameters()] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    with pytest.raises(TypeError, match="argument 0 must be a Module"):
        nn.Sequential(lambda x: x)
    with pytest.raises(NotImplementedError, match="ModuleList does not implement forward"):
        lst(dn.tensor(np.ones(2)))
    x = dn.tensor(np.arange(24.0).reshape(2, 3, 4))
    assert nn.Flatten()(x).shape == (2, 12)
    assert nn.Flatten(0, 1)(x).shape == (6, 4)
    assert nn.Identity()(x) is x


def test_linear_matches_numpy_and_pytorch_initialisation_bounds():
    lin = nn.Linear(50, 20, rng=0, dtype=np.float64)
    bound = 1 / np.sqrt(50)
    w, b = lin.weight.numpy(), lin.bias.numpy()
    assert np.abs(w).max() <= bound and np.abs(b).max() <= bound
    assert np.abs(w).max() > 0.9 * bound  # really uses the whole interval
    x = np.random.default_rng(1).standard_normal((3, 4, 50))
    np.testing.assert_allclose(lin(dn.tensor(x)).numpy(), x @ w.T + b, **F64_TOL)
    assert nn.Linear(50, 20, rng=0).weight.dtype == np.float32
    np.testing.assert_array_equal(nn.Linear(50, 20, rng=3).weight.numpy(),
                                  nn.Linear(50, 20, rng=3).weight.numpy())


def test_functional_linear_gradients_float64():
    rng = np.random.default_rng(2)
    x = dn.tensor(rng.standard_normal((2, 3, 5)), dtype=np.float64, requires_grad=True)
    w = dn.tensor(rng.standard_normal((4, 5)), dtype=np.float64, requires_grad=True)
    b = dn.tensor(rng.standard_normal(4), dtype=np.float64, requires_grad=True)
    assert dn.gradcheck(lambda x, w, b: dn.functional.linear(x, w, b), x, w, b, **GRADCHECK_TOL)
    assert dn.gradcheck(lambda x, w: dn.functional.linear(x, w), x, w, **GRADCHECK_TOL)
    w.grad = None
    dn.functional.linear(x, w, b).sum().backward()
    np.testing.assert_allclose(w.grad.numpy(), np.ones((6, 4)).T @ x.numpy().reshape(6, 5),
                               **F64_GRAD_TOL)


@pytest.mark.parametrize("args, match", [
    (((2, 5), (4, 6), None), "x's last dim must be in_features=6"),
    (((2, 5), (4, 5, 1), None), "weight must be 2-D"),
    (((2, 5), (4, 5), (3,)), r"bias must have shape \(4,\)"),
])
def test_functional_linear_validates_shapes(args, match):
    xs, ws, bs = args
    x, w = dn.tensor(np.ones(xs)), dn.tensor(np.ones(ws))
    b = None if bs is None else dn.tensor(np.ones(bs))
    with pytest.raises(ValueError, match=match):
        dn.functional.linear(x, w, b)


def test_layer_norm_module_and_parameter_validation():
    ln = nn.LayerNorm(6)
    x = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)
    want = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(ln(dn.tensor(x)).numpy(), want, **F32_TOL)
    assert [n for n, _ in ln.named_parameters()] == ["weight", "bias"]
    assert list(nn.LayerNorm(6, elementwise_affine=False).parameters()) == []
    with pytest.raises(ValueError, match="normalized_shape must be positive ints"):
        nn.LayerNorm(0)
    with pytest.raises(TypeError, match="float32 or float64"):
        nn.Parameter(np.ones(3, np.int64))


@pytest.mark.gpu
def test_to_cuda_and_back_moves_everything_and_keeps_parameters():
    net = nn.Sequential(nn.DiagLinear(12, 8, sparsity=0.5, rng=0, device="cpu"), nn.ReLU(),
                        nn.Linear(8, 3, rng=1, device="cpu"))
    x = np.random.default_rng(0).standard_normal((4, 12)).astype(np.float32)
    want = net(dn.tensor(x, device="cpu")).numpy()
    params = list(net.parameters())
    assert net.to("cuda") is net and net.device == "cuda"
    assert all(a is b for a, b in zip(net.parameters(), params))
    assert all(t.device == "cuda" for t in list(net.parameters()) + list(net.buffers()))
    got = net(dn.tensor(x, device="cuda"))
    assert got.device == "cuda"
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    net.cpu()
    assert all(t.device == "cpu" for t in net.parameters())
    np.testing.assert_allclose(net(dn.tensor(x, device="cpu")).numpy(), want, rtol=1e-6)


def test_forward_hooks_see_inputs_and_output_and_can_replace_it():
    lin = nn.Linear(3, 2, rng=0)
    seen = []
    h1 = lin.register_forward_hook(lambda m, inputs, out: seen.append((m, inputs[0].shape, out.shape)))
    h2 = lin.register_forward_hook(lambda m, inputs, out: out * 0)
    x = dn.tensor(np.ones((4, 3), np.float32))
    y = lin(x)
    assert seen == [(lin, (4, 3), (4, 2))] and np.all(y.numpy() == 0)
    h2.remove()
    h1.remove()
    h1.remove()  # removing twice is harmless
    assert np.any(lin(x).numpy() != 0) and len(seen) == 1
    with pytest.raises(TypeError, match="hook must be callable"):
        lin.register_forward_hook(3)


def test_replacing_a_submodule_keeps_its_place():
    seq = nn.Sequential(nn.Linear(4, 4, rng=0), nn.ReLU(), nn.Linear(4, 2, rng=1))
    setattr(seq, "0", nn.DiagLinear(4, 4, sparsity=0.5, rng=2))
    assert [type(m).__name__ for m in seq] == ["DiagLinear", "ReLU", "Linear"]
    assert [n for n, _ in seq.named_parameters()] == ["0.values", "0.bias", "2.weight", "2.bias"]


def test_softmax_module_takes_dim_as_torch_does():
    x = dn.tensor(np.arange(6.0).reshape(2, 3), dtype="float64")
    want = dn.functional.softmax(x, axis=0).numpy()
    np.testing.assert_allclose(nn.Softmax(dim=0)(x).numpy(), want)
    np.testing.assert_allclose(nn.Softmax(axis=0)(x).numpy(), want)
    with pytest.raises(TypeError, match="dim"):
        nn.Softmax(axis=0, dim=1)
