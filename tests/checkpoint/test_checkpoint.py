"""Checkpoints (`diagnet.checkpoint`): the safetensors reader/writer, `diagnet.save` /
`diagnet.load`, validation before assignment, atomic writes, sizes and compatibility.

Every test that loads a bad file checks two things: the error names the problem
(``match=``), and the model (and optimizer) in memory are bit-for-bit what they were.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import diagnet as dn
from diagnet import backend, checkpoint, nn, skeleton
from diagnet import random as dn_random
from diagnet.checkpoint import (CHECKSUM_KEY, METADATA_KEY, CheckpointError, join_state,
                                load_tensors, save_tensors, split_state)

DTYPES = [np.float32, np.float64]


# ----------------------------------------------------------------------------- helpers


def small_model(seed=0, width=16, dtype=np.float32, device=None, last_bias=True, extra=False):
    """DiagLinear(20, width) -> ReLU -> Linear(width, 4); seeds decide every number."""
    layers = [nn.DiagLinear(20, width, sparsity=0.75, rng=seed, dtype=dtype, device=device),
              nn.ReLU(),
              nn.Linear(width, 4, bias=last_bias, rng=seed + 1, dtype=dtype, device=device)]
    if extra:
        layers.append(nn.Linear(4, 4, rng=seed + 2, dtype=dtype, device=device))
    return nn.Sequential(*layers)


def snapshot(model):
    """Host copies of every state-dict entry (name -> array)."""
    return {k: v.numpy() for k, v in model.state_dict().items()}


def assert_same(got, want):
    """Two snapshots are bit-identical: same names, dtypes, shapes and bytes."""
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert got[k].shape == want[k].shape, k
        assert got[k].tobytes() == want[k].tobytes(), k


def differs(a, b):
    return any(a[k].shape != b[k].shape or a[k].tobytes() != b[k].tobytes() for k in a)


def inputs(dtype=np.float32, B=5, device=None):
    x = np.random.default_rng(42).standard_normal((B, 20)).astype(dtype)
    return dn.tensor(x, device=device)


class Momentum:
    """A minimal optimizer that follows the optimizer state-dict contract of diagnet.optim:
    ``{"state": {index: {key: array or scalar}}, "param_groups": [...], "param_names": [...]}``,
    ``check_state_dict`` validates, ``load_state_dict`` validates then assigns copies."""

    def __init__(self, model, lr=0.1, momentum=0.9):
        named = list(model.named_parameters())
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.param_groups = [{"lr": lr, "momentum": momentum, "betas": (0.9, 0.999),
                              "params": list(range(len(self.params)))}]
        self.state = {}

    def step(self):
        g = self.param_groups[0]
        for i, p in enumerate(self.params):
            s = self.state.setdefault(i, {"step": 0, "buf": p.data * 0})
            s["buf"] = g["momentum"] * s["buf"] + p.grad.data
            s["step"] += 1
            p.data = p.data - g["lr"] * s["buf"]

    def state_dict(self):
        return {"state": {i: dict(s) for i, s in self.state.items()},
                "param_groups": [dict(g) for g in self.param_groups],
                "param_names": list(self.names)}

    def check_state_dict(self, sd):
        for i, s in sd["state"].items():
            if not isinstance(i, int) or not 0 <= i < len(self.params):
                raise ValueError(f"optimizer state: bad parameter index {i!r}")
            if tuple(s["buf"].shape) != self.params[i].shape:
                raise ValueError(f"optimizer state {i} ('buf'): shape {tuple(s['buf'].shape)}, "
                                 f"parameter shape {self.params[i].shape}")
        if len(sd["param_groups"]) != len(self.param_groups):
            raise ValueError("optimizer state: wrong number of param_groups")

    def load_state_dict(self, sd):
        self.check_state_dict(sd)
        self.state = {}
        for i, s in sd["state"].items():
            xp = backend.get_array_module(self.params[i].data)
            self.state[i] = {"step": s["step"],
                             "buf": backend.to_device(np.array(s["buf"]), self.params[i].device)
                             if xp is np else xp.asarray(s["buf"])}
        self.param_groups = [dict(g) for g in sd["param_groups"]]


def train_step(model, opt, seed):
    rng = np.random.default_rng(seed)
    x = dn.tensor(rng.standard_normal((6, 20)).astype(model[0].values.dtype),
                  device=model.device)
    labels = dn.tensor(rng.integers(0, 4, 6), device=model.device)
    for p in model.parameters():
        p.grad = None
    loss = dn.cross_entropy(model(x), labels)
    loss.backward()
    opt.step()


@pytest.fixture
def good(tmp_path):
    """A valid checkpoint of small_model(0) + a Momentum optimizer after two steps."""
    dn.manual_seed(0)
    model = small_model(0)
    opt = Momentum(model)
    train_step(model, opt, 1)
    train_step(model, opt, 2)
    path = tmp_path / "good.safetensors"
    dn.save(path, model=model, optimizer=opt, state={"epoch": 2}, config={"lr": 0.1})
    return path


def fresh():
    """The target of a load: a model with other seeds and its own optimizer state."""
    model = small_model(7)
    opt = Momentum(model, lr=0.5)
    train_step(model, opt, 9)
    return model, opt


def assert_load_fails(path, model, opt=None, exc=CheckpointError, match=None, **kwargs):
    """``dn.load`` raises ``exc`` matching ``match``, and model/opt are unchanged."""
    before = snapshot(model)
    opt_before = None if opt is None else (
        {i: (s["step"], s["buf"].copy()) for i, s in opt.state.items()},
        [dict(g) for g in opt.param_groups])
    rng_before = dn_random.get_state()
    with pytest.raises(exc, match=match):
        dn.load(path, model=model, optimizer=opt, **kwargs)
    assert_same(snapshot(model), before)
    if opt is not None:
        state, groups = opt_before
        assert opt.param_groups == groups
        assert list(opt.state) == list(state)
        for i, (step, buf) in state.items():
            assert opt.state[i]["step"] == step
            assert opt.state[i]["buf"].tobytes() == buf.tobytes()
    assert dn_random.get_state() == rng_before


def header_span(path):
    """``(n, raw header bytes)`` of a safetensors file."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return n, data[8:8 + n]


def write_raw(path, header, data=b"", pad=True):
    """A hand-made safetensors file: ``header`` (an object, or raw bytes) + ``data``."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


def rewrite_metadata(src, dst, edit):
    """Copy checkpoint ``src`` to ``dst`` with its diagnet metadata JSON passed through ``edit``."""
    tensors, meta = load_tensors(src)
    body = json.loads(meta[METADATA_KEY])
    edit(body)
    meta[METADATA_KEY] = json.dumps(body)
    save_tensors(dst, tensors, meta)
    return dst


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_model_round_trip_is_bit_exact(tmp_path, dtype):
    model = small_model(0, dtype=dtype)
    x = inputs(dtype)
    want_out = model(x).numpy()
    state = {"epoch": 3, "step": 1234, "best": {"metric": "acc", "value": 0.8125,
                                                "history": [0.5, 0.75, 0.8125]},
             "done": False, "resumed": True, "note": None, "loader_seed": 2 ** 40 + 3}
    config = {"model": {"widths": [20, 16, 4], "sparsity": 0.75}, "lr": 1e-3,
              "schedule": None, "name": "run-ü", "flags": [True, False]}
    path = tmp_path / "ckpt.safetensors"
    dn.save(path, model=model, state=state, config=config)

    other = small_model(5, dtype=dtype)
    assert differs(snapshot(other), snapshot(model))  # the load has something to do
    ck = dn.load(path, model=other)
    assert_same(snapshot(other), snapshot(model))
    assert isinstance(other[0].offsets.data, np.ndarray)
    assert other[0].offsets.dtype == np.int64
    got_out = other(x).numpy()
    assert got_out.dtype == want_out.dtype and got_out.tobytes() == want_out.tobytes()
    assert ck.state == state and ck.config == config
    assert json.dumps(ck.state) == json.dumps(state)  # same types, not only equal values
    assert ck.loaded == ("model",)
    assert ck.metadata["format"] == "diagnet-checkpoint"
    assert ck.metadata["format_version"] == 1
    assert ck.metadata["diagnet_version"] == dn.__version__
    assert ck.metadata["components"] == ["model"]
    assert ck.metadata["created"].endswith("+00:00")


def test_loaded_arrays_are_not_aliased(tmp_path):
    model = small_model(0)
    path = tmp_path / "c.safetensors"
    dn.save(path, model=model)
    other = small_model(3)
    dn.load(path, model=other)
    other[0].values.data[...] = 0  # must not write through into anything shared
    assert np.any(model[0].values.numpy() != 0)
    again = small_model(4)
    dn.load(path, model=again)
    assert_same(snapshot(again), snapshot(model))


def test_state_and_config_keep_types_exactly(tmp_path):
    state = {
        "ints": {0: "a", 1: "b", -3: "c"},                 # int keys stay ints
        "mixed": {"x": 1, 2: [3, (4, 5.5)]},               # tuples stay tuples
        "floats": [0.1, -0.0, 1e308, 5e-324, float("inf"), float("-inf")],
        "np": {"f32": np.float32(0.1), "i64": np.int64(7), "b": np.bool_(True)},
        "array": np.arange(6, dtype=np.int32).reshape(2, 3),
        "__tensor__": "a user key that looks like a marker",
        "nested": [[], {}, (), [None]],
        "big": 2 ** 100,
    }
    config = ("a", 1)
    path = tmp_path / "c.safetensors"
    dn.save(path, state=state, config=config, rng=False)
    ck = dn.load(path)
    got = ck.state
    assert got["ints"] == {0: "a", 1: "b", -3: "c"}
    assert all(type(k) is int for k in got["ints"])
    assert got["mixed"] == {"x": 1, 2: [3, (4, 5.5)]} and type(got["mixed"][2][1]) is tuple
    assert [repr(v) for v in got["floats"]] == [repr(v) for v in state["floats"]]
    for k, v in state["np"].items():
        assert type(got["np"][k]) is type(v) and got["np"][k] == v
    assert got["array"].dtype == np.int32 and np.array_equal(got["array"], state["array"])
    assert got["__tensor__"] == state["__tensor__"]
    assert got["nested"] == [[], {}, (), [None]] and type(got["nested"][2]) is tuple
    assert got["big"] == 2 ** 100
    assert ck.config == ("a", 1)
    assert ck.rng_state is None and not ck.metadata["has_rng"]


def test_nan_round_trips(tmp_path):
    path = tmp_path / "c.safetensors"
    dn.save(path, state={"loss": float("nan")})
    assert np.isnan(dn.load(path).state["loss"])


def test_split_and_join_are_inverse():
    tree = {"state": {0: {"step": 3, "m": np.ones((2, 2), np.float32)},
                      1: {"step": 3, "m": dn.tensor(np.zeros(3))}},
            "groups": [{"betas": (0.9, 0.999), "params": [0, 1]}],
            "a/b": np.zeros(1), "a": {"b": np.ones(1)}}       # names that would collide
    skeleton, tensors = split_state(tree, "opt")
    json.dumps(skeleton)                                       # plain JSON
    assert "opt/state/0/m" in tensors and len(tensors) == 4
    assert all(isinstance(v, np.ndarray) for v in tensors.values())
    used = set()
    back = join_state(skeleton, tensors, used)
    assert used == set(tensors)
    assert list(back["state"]) == [0, 1]
    assert back["groups"][0]["betas"] == (0.9, 0.999)
    assert np.array_equal(back["state"][0]["m"], tree["state"][0]["m"])
    assert np.array_equal(back["a/b"], np.zeros(1)) and np.array_equal(back["a"]["b"], np.ones(1))


@pytest.mark.parametrize("bad, where", [
    ({"x": {1, 2}}, "state/x"),
    ({"y": [object()]}, "state/y/0"),
    ({(1, 2): 3}, "state"),
    ({"c": 1 + 2j}, "state/c"),
])
def test_unsavable_values_are_named(tmp_path, bad, where):
    path = tmp_path / "c.safetensors"
    with pytest.raises(TypeError, match=where):
        dn.save(path, state=bad)
    assert os.listdir(tmp_path) == []


def test_rng_state_is_restored(tmp_path):
    dn.manual_seed(123)
    dn_random.uniform((3,))
    path = tmp_path / "c.safetensors"
    dn.save(path, model=small_model(0))
    want = [dn_random.uniform((4,)), dn_random.default_generator().integers(0, 1000, 5)]
    dn.manual_seed(999)  # something else entirely
    dn.load(path, model=small_model(1))
    got = [dn_random.uniform((4,)), dn_random.default_generator().integers(0, 1000, 5)]
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
    # rng=False leaves the generator alone
    dn.manual_seed(5)
    expect = dn_random.uniform((4,))
    dn.manual_seed(5)
    dn.load(path, model=small_model(1), rng=False)
    assert np.array_equal(dn_random.uniform((4,)), expect)


def test_load_alone_inspects_a_file(good):
    ck = dn.load(good)
    assert ck.loaded == ()
    assert ck.metadata["components"] == ["model", "optimizer"]
    assert ck.metadata["classes"] == {"model": "Sequential", "optimizer": "Momentum"}
    model_sd = ck.components["model"]
    assert list(model_sd) == list(small_model(0).state_dict())
    assert model_sd["0.offsets"].dtype == np.int64 and model_sd["0.values"].shape == (5, 16)
    opt_sd = ck.components["optimizer"]
    assert list(opt_sd["state"]) == [0, 1, 2, 3] and opt_sd["state"][0]["step"] == 2
    assert opt_sd["param_groups"][0]["betas"] == (0.9, 0.999)
    assert opt_sd["param_names"][0] == "0.values"
    assert ck.state == {"epoch": 2} and ck.config == {"lr": 0.1}
    assert len(repr(ck)) < 1000  # a summary, not every array


def test_optimizer_contract_round_trip(tmp_path):
    """A stand-in that follows the optimizer contract resumes bit-identically."""
    model = small_model(0)
    opt = Momentum(model)
    train_step(model, opt, 1)
    train_step(model, opt, 2)
    path = tmp_path / "c.safetensors"
    dn.save(path, model=model, optimizer=opt)
    model2, opt2 = fresh()
    dn.load(path, model=model2, optimizer=opt2)
    assert opt2.param_groups == opt.param_groups
    train_step(model, opt, 3)
    train_step(model2, opt2, 3)
    assert_same(snapshot(model2), snapshot(model))


def test_adam_and_step_lr_round_trip(tmp_path):
    from diagnet import optim
    from diagnet.optim.lr_scheduler import StepLR

    def build(seed):
        model = small_model(seed)
        opt = optim.Adam(model.named_parameters(), lr=1e-2)
        return model, opt, StepLR(opt, step_size=1, gamma=0.5)

    model, opt, sched = build(0)
    for s in (1, 2):
        train_step(model, opt, s)
        sched.step()
    path = tmp_path / "c.safetensors"
    dn.save(path, model=model, optimizer=opt, scheduler=sched, state={"step": 2})
    model2, opt2, sched2 = build(11)
    assert opt2.param_groups[0]["lr"] != opt.param_groups[0]["lr"]
    ck = dn.load(path, model=model2, optimizer=opt2, scheduler=sched2)
    assert set(ck.loaded) == {"model", "optimizer", "scheduler"}
    assert sched2.state_dict() == sched.state_dict()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 1e-2 * 0.25
    sd, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd2["param_names"] == sd["param_names"] == list(dict(model.named_parameters()))
    for i in sd["state"]:
        for k, v in sd["state"][i].items():
            assert (v.tobytes() == sd2["state"][i][k].tobytes()) if backend.is_array(v) \
                else v == sd2["state"][i][k]
    for m, o, s in ((model, opt, sched), (model2, opt2, sched2)):
        train_step(m, o, 3)
        s.step()
    assert_same(snapshot(model2), snapshot(model))


def test_adam_with_wrong_state_shape_leaves_model_unchanged(tmp_path):
    from diagnet import optim

    wide = small_model(0, width=17)
    opt = optim.Adam(wide.parameters(), lr=1e-2)
    train_step(wide, opt, 1)
    path = tmp_path / "c.safetensors"
    dn.save(path, model=small_model(0), optimizer=opt)  # model fits, optimizer state does not
    model2 = small_model(7)
    opt2 = optim.Adam(model2.parameters(), lr=1e-2)
    before = snapshot(model2)
    with pytest.raises(ValueError, match=r"has shape \(5, 17\), but the parameter has shape "
                                         r"\(5, 16\)"):
        dn.load(path, model=model2, optimizer=opt2)
    assert_same(snapshot(model2), before)
    assert opt2.state == {}


# ----------------------------------------------------------------------------- bad files


def test_every_good_file_loads(good):
    model, opt = fresh()
    dn.load(good, model=model, optimizer=opt)  # the baseline of the corruption tests


@pytest.mark.parametrize("where", ["empty", "in length", "after length", "in header",
                                   "header end", "in data", "one byte short"])
def test_truncated_file(good, tmp_path, where):
    data = good.read_bytes()
    n = int.from_bytes(data[:8], "little")
    cut = {"empty": 0, "in length": 4, "after length": 8, "in header": 8 + n // 2,
           "header end": 8 + n, "in data": 8 + n + (len(data) - 8 - n) // 2,
           "one byte short": len(data) - 1}[where]
    match = {"empty": "it is empty", "in length": "4 bytes long, shorter than the 8-byte",
             "after length": "header length .* exceeds", "in header": "header length .* exceeds",
             "header end": "truncated: the header describes", "in data": "truncated: the header",
             "one byte short": "truncated: the header describes"}[where]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[:cut])
    model, opt = fresh()
    assert_load_fails(bad, model, opt, match=match)


def test_every_flipped_header_byte_is_caught(good, tmp_path):
    data = bytearray(good.read_bytes())
    n = int.from_bytes(data[:8], "little")
    model, opt = fresh()
    before = snapshot(model)
    bad = tmp_path / "bad.safetensors"
    for pos in range(8, 8 + n):
        flipped = bytearray(data)
        flipped[pos] ^= 0x01
        bad.write_bytes(bytes(flipped))
        with pytest.raises((CheckpointError, KeyError)) as info:
            dn.load(bad, model=model, optimizer=opt)
        assert str(bad) in str(info.value) or isinstance(info.value, KeyError), pos
    assert_same(snapshot(model), before)


def test_flipped_header_byte_messages(good, tmp_path):
    data = bytearray(good.read_bytes())
    model, opt = fresh()
    bad = tmp_path / "bad.safetensors"
    first = bytearray(data)
    first[8] ^= 0x01  # '{' -> 'z'
    bad.write_bytes(bytes(first))
    assert_load_fails(bad, model, opt, match="header is not valid JSON")
    n, header = header_span(good)
    digit = header.index(b'"epoch\\":2') + len(b'"epoch\\":')  # inside the metadata JSON
    edited = bytearray(data)
    edited[8 + digit] = ord("3")  # still valid JSON, a different epoch
    bad.write_bytes(bytes(edited))
    assert_load_fails(bad, model, opt, match="checksum does not match")


def test_flipped_data_byte(good, tmp_path):
    data = bytearray(good.read_bytes())
    n = int.from_bytes(data[:8], "little")
    model, opt = fresh()
    bad = tmp_path / "bad.safetensors"
    for pos in (8 + n, 8 + n + 100, len(data) - 1):
        flipped = bytearray(data)
        flipped[pos] ^= 0x10
        bad.write_bytes(bytes(flipped))
        assert_load_fails(bad, model, opt, match="checksum does not match")


@pytest.mark.parametrize("length, match", [
    ("file", "header length .* exceeds"),
    (2 ** 40, "header length .* is absurd"),
    (2 ** 64 - 1, "header length .* is absurd"),
])
def test_header_length_too_large(good, tmp_path, length, match):
    data = good.read_bytes()
    value = len(data) if length == "file" else length
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(value.to_bytes(8, "little") + data[8:])
    model, opt = fresh()
    assert_load_fails(bad, model, opt, match=match)


def test_wrong_tensor_shape(tmp_path):
    path = tmp_path / "wide.safetensors"
    dn.save(path, model=small_model(0, width=17))
    model, opt = fresh()
    assert_load_fails(path, model, exc=ValueError, match=r"0\.values: shape \(5, 17\)")


def test_missing_key_strict_and_not(tmp_path):
    path = tmp_path / "nobias.safetensors"
    saved = small_model(0, last_bias=False)
    dn.save(path, model=saved)
    model, _ = fresh()
    assert_load_fails(path, model, exc=KeyError, match=r"missing keys: 2\.bias")
    ck = dn.load(path, model=model, strict=False)
    assert ck.model_keys.missing_keys == ["2.bias"]
    got = snapshot(model)
    for k, v in snapshot(saved).items():
        assert got[k].tobytes() == v.tobytes()


def test_unexpected_key(tmp_path):
    path = tmp_path / "extra.safetensors"
    dn.save(path, model=small_model(0, extra=True))
    model, _ = fresh()
    assert_load_fails(path, model, exc=KeyError, match=r"unexpected keys: 3\.weight, 3\.bias")


def test_newer_format_version(good, tmp_path):
    bad = rewrite_metadata(good, tmp_path / "v2.safetensors",
                           lambda m: m.update(format_version=2))
    model, opt = fresh()
    assert_load_fails(bad, model, opt, match="format_version 2 is newer")


def test_bad_format_version(good, tmp_path):
    bad = rewrite_metadata(good, tmp_path / "v.safetensors",
                           lambda m: m.update(format_version="1"))
    model, opt = fresh()
    assert_load_fails(bad, model, opt, match="format_version '1' is not a positive int")


def test_wrong_format_name(good, tmp_path):
    bad = rewrite_metadata(good, tmp_path / "f.safetensors",
                           lambda m: m.update(format="something-else"))
    model, opt = fresh()
    assert_load_fails(bad, model, opt, match="not a diagnet checkpoint: format is 'something")


def test_missing_checksum(good, tmp_path):
    tensors, meta = load_tensors(good)
    del meta[CHECKSUM_KEY]
    bad = tmp_path / "b.safetensors"
    save_tensors(bad, tensors, meta)
    model, opt = fresh()
    assert_load_fails(bad, model, opt, match="checksum is missing")


def test_random_bytes_text_and_empty_files(tmp_path):
    model, opt = fresh()
    rnd = tmp_path / "random.bin"
    rnd.write_bytes(np.random.default_rng(0).bytes(4096))
    assert_load_fails(rnd, model, opt, match="not a safetensors file")
    text = tmp_path / "notes.txt"
    text.write_text("epoch 3: loss 0.25\nthis is not a checkpoint\n")
    assert_load_fails(text, model, opt, match="not a safetensors file")
    small = tmp_path / "small.txt"
    small.write_text("hi\n")
    assert_load_fails(small, model, opt, match="3 bytes long")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    assert_load_fails(empty, model, opt, match="it is empty")
    with pytest.raises(FileNotFoundError):
        dn.load(tmp_path / "absent.safetensors", model=model)


def test_plain_safetensors_is_not_a_checkpoint(tmp_path):
    model, opt = fresh()
    path = tmp_path / "plain.safetensors"
    save_tensors(path, {k: v for k, v in small_model(0).state_dict().items()})
    assert_load_fails(path, model, opt, match="not a diagnet checkpoint: a safetensors file "
                                              "without")
    save_tensors(path, {"x": np.zeros(3)}, {"format": "pt"})
    assert_load_fails(path, model, opt, match="not a diagnet checkpoint")


def test_asked_for_a_component_the_file_lacks(tmp_path):
    path = tmp_path / "model_only.safetensors"
    dn.save(path, model=small_model(0))
    model, opt = fresh()
    assert_load_fails(path, model, opt, match="asked to load 'optimizer' but the checkpoint has "
                                              "no such component")


def test_unreferenced_tensor(good, tmp_path):
    tensors, meta = load_tensors(good)
    tensors["stray"] = np.zeros(2)
    meta[CHECKSUM_KEY] = checkpoint._digest(tensors, meta[METADATA_KEY])  # consistent, but
    bad = tmp_path / "b.safetensors"                                       # one tensor too many
    save_tensors(bad, tensors, meta)
    model, opt = fresh()
    assert_load_fails(bad, model, opt, match="not referenced by the metadata: stray")


def test_optimizer_state_mismatch_leaves_model_unchanged(tmp_path):
    """The model part of the file fits; the optimizer's does not: nothing is assigned."""
    wide = small_model(0, width=17)
    wide_opt = Momentum(wide)
    train_step(wide, wide_opt, 1)
    path = tmp_path / "c.safetensors"
    dn.save(path, model=small_model(3), optimizer=wide_opt)
    model, opt = fresh()
    assert_load_fails(path, model, opt, exc=ValueError,
                      match=r"optimizer state 0 \('buf'\): shape \(5, 17\)")


def test_model_is_checked_before_any_component_loads(tmp_path):
    """A model that does not fit is refused before the scheduler (which has no
    check_state_dict, so it is loaded first) or the optimizer is touched."""
    from diagnet import optim

    def build(seed, width=16):
        model = small_model(seed, width=width)
        opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, opt, optim.StepLR(opt, step_size=1, gamma=0.5)

    model, opt, sched = build(0, width=17)
    train_step(model, opt, 1)
    sched.step()
    path = tmp_path / "c.safetensors"
    dn.save(path, model=model, scheduler=sched)
    model2, opt2, sched2 = build(3)
    before, sched_before = snapshot(model2), sched2.state_dict()
    lr_before = opt2.param_groups[0]["lr"]
    with pytest.raises(ValueError, match=r"0\.values: shape \(5, 17\)"):
        dn.load(path, model=model2, scheduler=sched2)
    assert_same(snapshot(model2), before)
    assert sched2.state_dict() == sched_before and opt2.param_groups[0]["lr"] == lr_before


def test_unchecked_component_is_loaded_first(tmp_path):
    """A component without check_state_dict is validated only by its own load; it runs
    before the model's, so its failure leaves the model unchanged."""

    class Counter:
        def __init__(self):
            self.n = 0

        def state_dict(self):
            return {"n": self.n}

        def load_state_dict(self, sd):
            if sd["n"] < 0:
                raise ValueError("counter: n must be >= 0")
            self.n = sd["n"]

    path = tmp_path / "c.safetensors"
    c = Counter()
    c.n = -1
    dn.save(path, model=small_model(0), counter=c)
    model, _ = fresh()
    before = snapshot(model)
    with pytest.raises(ValueError, match="counter: n must be >= 0"):
        dn.load(path, model=model, counter=Counter())
    assert_same(snapshot(model), before)
    c.n = 4
    dn.save(path, model=small_model(0), counter=c)
    target = Counter()
    ck = dn.load(path, model=model, counter=target)
    assert target.n == 4 and ck.loaded == ("counter", "model")


# ----------------------------------------------------------------------------- safetensors reader


def test_tensors_round_trip_every_dtype(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "f64": rng.standard_normal((3, 4)), "f32": rng.standard_normal(5).astype(np.float32),
        "f16": rng.standard_normal((2, 2)).astype(np.float16),
        "i64": rng.integers(-2 ** 62, 2 ** 62, (4,)), "i32": np.arange(6, dtype=np.int32),
        "i16": np.arange(-3, 3, dtype=np.int16), "i8": np.arange(-4, 4, dtype=np.int8),
        "u8": np.arange(200, 206, dtype=np.uint8), "u16": np.array([65535], np.uint16),
        "u32": np.array([2 ** 32 - 1], np.uint32), "u64": np.array([2 ** 64 - 1], np.uint64),
        "bool": np.array([[True, False], [False, True]]),
        "scalar": np.array(3.5), "empty": np.zeros((0, 7), np.float32),
        "strided": rng.standard_normal((4, 6))[:, ::2],      # not contiguous
        "big_endian": np.arange(4, dtype=">i4"),
        "tensor": dn.tensor(np.ones((2, 3), np.float32)),
    }
    path = tmp_path / "t.safetensors"
    save_tensors(path, tensors, {"k": "v", "ü": "ß"})
    got, meta = load_tensors(path)
    assert meta == {"k": "v", "ü": "ß"}
    assert list(got) == list(tensors)
    for k, v in tensors.items():
        want = v.numpy() if isinstance(v, dn.Tensor) else v
        assert got[k].shape == want.shape and np.array_equal(got[k], want), k
        assert got[k].dtype == want.dtype.newbyteorder("="), k
        assert got[k].flags.writeable and got[k].flags.c_contiguous
    n, header = header_span(path)
    assert n % 8 == 0
    assert path.stat().st_size == 8 + n + sum(np.asarray(backend.unwrap(v)).nbytes
                                              for v in tensors.values())


def test_unsupported_dtype_is_refused(tmp_path):
    with pytest.raises(TypeError, match="complex128 cannot be stored"):
        save_tensors(tmp_path / "t.safetensors", {"c": np.zeros(2, complex)})
    with pytest.raises(ValueError, match="reserved"):
        save_tensors(tmp_path / "t.safetensors", {"__metadata__": np.zeros(2)})
    with pytest.raises(TypeError, match="metadata"):
        save_tensors(tmp_path / "t.safetensors", {}, {"k": 1})
    assert os.listdir(tmp_path) == []


def F32(shape, begin):
    """A header entry for a float32 tensor of ``shape`` starting at byte ``begin``."""
    end = begin + 4 * int(np.prod(shape))
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


@pytest.mark.parametrize("header, data, match", [
    ([1, 2], b"", "the header is a JSON list, not an object"),
    (b"\xff\xfe{}", b"", "not valid UTF-8"),
    (b'{"a": 1, "a": 2}', b"", "not valid JSON .*duplicate key 'a'"),
    ({"x": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "exactly 'dtype', 'shape'"),
    ({"x": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8,
     "unknown dtype 'Q7'"),
    ({"x": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8,
     r"unknown dtype \['F32'\]"),
    ({"x": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4,
     "BF16 has no NumPy equivalent"),
    ({"x": {"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 8]}}, b"\0" * 8,
     "shape must be a list of non-negative ints"),
    ({"x": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, b"\0" * 8,
     "shape must be a list"),
    ({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8,
     r"span 8 bytes, but F32 \[3\] needs 12"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8,
     "out of order"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, b"\0" * 8,
     "data_offsets must be"),
    ({"x": F32([2], 0), "y": F32([2], 4)}, b"\0" * 12, "overlap the previous tensor"),
    ({"x": F32([2], 0), "y": F32([2], 12)}, b"\0" * 20, "a gap of 4 bytes"),
    ({"x": F32([2], 4)}, b"\0" * 12, "a gap of 4 bytes"),
    ({"x": F32([2], 0)}, b"\0" * 12, "4 trailing bytes"),
    ({"x": F32([2], 0)}, b"\0" * 6, "truncated: the header describes 8 bytes"),
    ({"__metadata__": {"k": 1}, "x": F32([1], 0)}, b"\0" * 4,
     "__metadata__ must be an object of string values"),
    ({"__metadata__": ["k"]}, b"", "__metadata__ must be an object"),
    ({"x": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}, b"\x01\x02",
     "BOOL holds a byte other than 0 or 1"),
])
def test_reader_rejects(tmp_path, header, data, match):
    path = write_raw(tmp_path / "h.safetensors", header, data)
    with pytest.raises(CheckpointError, match=match) as info:
        load_tensors(path)
    assert str(path) in str(info.value)


def test_reader_accepts_any_header_order_and_empty_tensors(tmp_path):
    # the reference reader sorts entries by offset; JSON order need not be data order
    data = np.arange(2, dtype="<f4").tobytes() + np.arange(3, dtype="<i8").tobytes()
    header = {"b": {"dtype": "I64", "shape": [3], "data_offsets": [8, 32]},
              "e": {"dtype": "F64", "shape": [0, 3], "data_offsets": [8, 8]},
              "a": F32([2], 0)}
    path = write_raw(tmp_path / "o.safetensors", header, data, pad=False)
    got, meta = load_tensors(path)
    assert list(got) == ["b", "e", "a"] and meta == {}
    assert np.array_equal(got["a"], [0, 1]) and np.array_equal(got["b"], [0, 1, 2])
    assert got["e"].shape == (0, 3)


# ----------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("fail_in", ["replace", "fsync", "write"])
def test_failed_save_leaves_old_file_and_no_temp_files(good, monkeypatch, fail_in):
    before = good.read_bytes()
    folder = good.parent
    listing = sorted(os.listdir(folder))

    def boom(*args, **kwargs):
        raise OSError(f"simulated failure in {fail_in}")

    if fail_in == "write":
        real = checkpoint.host_array
        calls = []

        def host_array(value, name):  # fails on the 3rd tensor, after the first writes
            calls.append(name)
            if len(calls) == 3:
                raise OSError("simulated failure in write")
            return real(value, name)

        # split_state and save_tensors both convert; fail while save_tensors writes
        monkeypatch.setattr(checkpoint, "host_array", host_array)
        monkeypatch.setattr(skeleton, "host_array", host_array)
    else:
        monkeypatch.setattr(os, fail_in, boom)
    model = small_model(5)
    with pytest.raises(OSError, match=f"simulated failure in {fail_in}"):
        dn.save(good, model=model, state={"epoch": 99})
    monkeypatch.undo()
    assert good.read_bytes() == before
    assert sorted(os.listdir(folder)) == listing


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        dn.save(tmp_path / "c.safetensors", model=small_model(0))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def test_save_into_missing_folder(tmp_path):
    target = tmp_path / "no" / "such" / "dir" / "c.safetensors"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dn.save(target, model=small_model(0))
    with pytest.raises(IsADirectoryError, match="it is a folder"):
        dn.save(tmp_path, model=small_model(0))
    assert os.listdir(tmp_path) == []


def test_new_file_gets_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = tmp_path / "c.safetensors"
        dn.save(path, model=small_model(0))
        assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
        os.chmod(path, 0o640)
        dn.save(path, model=small_model(1))         # replacing keeps the file's mode
        assert path.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


def test_overwrite_replaces_contents(tmp_path):
    path = tmp_path / "c.safetensors"
    dn.save(path, model=small_model(0), state={"epoch": 1})
    dn.save(path, model=small_model(1), state={"epoch": 2})
    target = small_model(5)
    ck = dn.load(path, model=target)
    assert ck.state == {"epoch": 2}
    assert_same(snapshot(target), snapshot(small_model(1)))


# ----------------------------------------------------------------------------- edited files


def resign_metadata(src, dst, edit, raw=None):
    """Copy checkpoint ``src`` to ``dst`` with its metadata JSON edited *and the checksum
    recomputed*, as a buggy or hostile writer would: only the content checks can refuse it.

    ``edit(body)`` changes the decoded metadata; ``raw`` (optional) maps placeholder
    strings in the re-encoded JSON to raw JSON text (for nesting too deep to encode).
    """
    tensors, meta = load_tensors(src)
    body = json.loads(meta[METADATA_KEY])
    edit(body)
    text = json.dumps(body)
    for placeholder, json_text in (raw or {}).items():
        text = text.replace(json.dumps(placeholder), json_text)
    checksum = checkpoint._digest(tensors, text)
    save_tensors(dst, tensors, {METADATA_KEY: text, CHECKSUM_KEY: checksum})
    return dst


@pytest.fixture
def with_table(tmp_path):
    """A valid checkpoint whose state holds a float32 (2, 3) tensor ``state/table``."""
    dn.manual_seed(0)
    model = small_model(0)
    opt = Momentum(model)
    train_step(model, opt, 1)
    path = tmp_path / "table.safetensors"
    dn.save(path, model=model, optimizer=opt,
            state={"epoch": 1, "table": np.arange(6, dtype=np.float32).reshape(2, 3)})
    return path


@pytest.mark.parametrize("old, new", [
    (b'"dtype":"F32","shape":[2,3]', b'"dtype":"F32","shape":[3,2]'),
    (b'"dtype":"F32","shape":[2,3]', b'"dtype":"I32","shape":[2,3]'),
    (b'"dtype":"F32","shape":[2,3]', b'"dtype":"U32","shape":[6,1]'),
])
def test_checksum_covers_dtype_and_shape(with_table, tmp_path, old, new):
    """Same byte size, still a well-formed file: only the checksum tells the difference."""
    data = with_table.read_bytes()
    assert data.count(old) == 1 and len(old) == len(new)
    bad = tmp_path / "edited.safetensors"
    bad.write_bytes(data.replace(old, new))
    load_tensors(bad)  # a valid safetensors file
    model, opt = fresh()
    assert_load_fails(bad, model, opt, match="checksum does not match")
    with pytest.raises(CheckpointError, match="checksum does not match"):
        dn.load(bad)


# ----------------------------------------------------------------------------- nesting


def deep(depth):
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [101, 5000, 200_000])
def test_deeply_nested_header_is_refused(tmp_path, depth):
    path = write_raw(tmp_path / "deep.safetensors",
                     b'{"__metadata__":{"k":"v"},"x":' + deep(depth).encode() + b"}")
    with pytest.raises(CheckpointError, match="nested deeper than 100 levels") as info:
        load_tensors(path)
    assert str(path) in str(info.value)
    model, opt = fresh()
    assert_load_fails(path, model, opt, match="the header is nested deeper than 100")


def test_brackets_inside_header_strings_do_not_count(tmp_path):
    name = '[{"\\"' + "[" * 300 + "{" * 300
    header = {"__metadata__": {"note": "]" * 50 + "[" * 500}, name: F32([1], 0)}
    got, meta = load_tensors(write_raw(tmp_path / "h.safetensors", header, b"\0" * 4))
    assert list(got) == [name] and meta == {"note": "]" * 50 + "[" * 500}


@pytest.mark.parametrize("depth", [101, 900, 5000])
def test_deeply_nested_metadata_is_refused(good, tmp_path, depth):
    bad = resign_metadata(good, tmp_path / "deep.safetensors",
                          lambda m: m.update(state="DEEP"), raw={"DEEP": deep(depth)})
    model, opt = fresh()
    assert_load_fails(bad, model, opt, match="'diagnet' entry is nested deeper than 100 levels")


def test_deepest_savable_state_round_trips(tmp_path):
    """The save-side limit fits the load-side one, even for the costliest containers."""
    state = "leaf"
    for _ in range(checkpoint.MAX_STATE_DEPTH - 2):
        state = {0: state}                            # int keys: 3 JSON levels per dict
    state = {0: {"a": np.zeros(2, np.float32), "b": state}}
    path = tmp_path / "c.safetensors"
    dn.save(path, model=small_model(0), state=state)
    ck = dn.load(path, model=small_model(1))
    got = ck.state[0]["b"]
    for _ in range(checkpoint.MAX_STATE_DEPTH - 2):
        got = got[0]
    assert got == "leaf" and np.array_equal(ck.state[0]["a"], np.zeros(2, np.float32))


def test_too_deep_or_cyclic_state_is_refused_at_save(good):
    before, listing = good.read_bytes(), sorted(os.listdir(good.parent))
    nested = []
    for _ in range(checkpoint.MAX_STATE_DEPTH):
        nested = [nested]
    cyclic = {"a": {}}
    cyclic["a"]["self"] = cyclic
    with pytest.raises(ValueError, match=r"state/0/0/0/.*: nested deeper than 32 levels"):
        dn.save(good, model=small_model(0), state=nested)
    with pytest.raises(ValueError, match=r"config/a/self/a/self/.*nested deeper than 32"):
        dn.save(good, model=small_model(0), config=cyclic)
    assert good.read_bytes() == before and sorted(os.listdir(good.parent)) == listing


# ----------------------------------------------------------------------------- Unicode


@pytest.mark.parametrize("kwargs, match", [
    (dict(state={"epoch": 1, "name": "\ud800"}), r"state/name: the str '\\ud800'"),
    (dict(config={"runs": ["ok", "bad \udfff here"]}), r"config/runs/1: the str 'bad \\udfff"),
    (dict(config={"opt": {"lr\udc80": 0.1}}), r"config/opt: the key 'lr\\udc80'"),
    (dict(state=("\ud83d",)), r"state/0: the str '\\ud83d'"),
    ({"extra\udc00": small_model(1)}, r"component name 'extra\\udc00'"),
])
def test_lone_surrogate_is_refused_at_save(good, kwargs, match):
    before, listing = good.read_bytes(), sorted(os.listdir(good.parent))
    with pytest.raises(ValueError, match=match + ".*lone surrogate"):
        dn.save(good, model=small_model(0), **kwargs)
    assert good.read_bytes() == before and sorted(os.listdir(good.parent)) == listing


def test_valid_non_ascii_strings_round_trip(tmp_path):
    state = {"name": "run-ü-😀-日本", "ключ": ["\u00e9", "\U0001f600"]}
    path = tmp_path / "c.safetensors"
    dn.save(path, state=state)
    assert dn.load(path).state == state


@pytest.mark.parametrize("tensors, metadata, match", [
    ({"w": np.zeros(2)}, {"note": "a\ud800b"}, r"metadata\['note'\]: the str 'a\\ud800b'"),
    ({"w": np.zeros(2)}, {"k\udfff": "v"}, r"metadata: the key 'k\\udfff'"),
    ({"w\ud800": np.zeros(2)}, None, r"tensor name 'w\\ud800'"),
])
def test_save_tensors_refuses_lone_surrogates(tmp_path, tensors, metadata, match):
    path = tmp_path / "t.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(ValueError, match=match + ".*lone surrogate"):
        save_tensors(path, tensors, metadata)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["t.safetensors"]


@pytest.mark.parametrize("header", [
    b'{"__metadata__":{"k":"\\ud800"}}',
    b'{"__metadata__":{"\\udfff":"v"}}',
    b'{"w\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
])
def test_reader_refuses_lone_surrogate_escapes(tmp_path, header):
    path = write_raw(tmp_path / "s.safetensors", header, b"\0" * 4 if b'"w' in header else b"")
    with pytest.raises(CheckpointError, match="lone surrogate"):
        load_tensors(path)


def test_lone_surrogate_escape_in_metadata_is_refused(good, tmp_path):
    bad = resign_metadata(good, tmp_path / "s.safetensors",
                          lambda m: m["state"].update(note="NOTE"), raw={"NOTE": '"\\udc00"'})
    model, opt = fresh()
    assert_load_fails(bad, model, opt, match="'diagnet' entry .*lone surrogate")


# ----------------------------------------------------------------------------- NumPy's limits


@pytest.mark.parametrize("shape, match", [
    ([2 ** 64, 0], "NumPy cannot hold"),
    ([2 ** 63 - 1, 0], "NumPy cannot hold"),
    ([2 ** 40, 2 ** 40, 0], "NumPy cannot hold"),
    ([1] * 65, "NumPy cannot hold"),
])
def test_shape_numpy_cannot_hold_is_refused(tmp_path, shape, match):
    nbytes = 0 if 0 in shape else 4
    header = {"x": {"dtype": "F32", "shape": shape, "data_offsets": [0, nbytes]}}
    path = write_raw(tmp_path / "s.safetensors", header, b"\0" * nbytes)
    with pytest.raises(CheckpointError, match=match):
        load_tensors(path)


def test_largest_zero_size_shape_loads(tmp_path):
    shape = [2 ** 31, 0, 2 ** 29]   # 2**60 elements of 4 bytes, but none stored
    header = {"x": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}
    got, _ = load_tensors(write_raw(tmp_path / "s.safetensors", header))
    assert got["x"].shape == tuple(shape)


# ----------------------------------------------------------------------------- generator states


DELETE = object()


def pcg_state(**edits):
    """A valid PCG64 state with ``edits`` applied (``state``/``inc`` go into the inner dict;
    the value ``DELETE`` removes a key)."""
    state = dn_random.get_state()
    for key, value in edits.items():
        target = state["state"] if key in ("state", "inc") else state
        if value is DELETE:
            del target[key]
        else:
            target[key] = value
    return state


GARBAGE_STATES = [
    pytest.param(pcg_state(state=2 ** 200), r"\['state'\]\['state'\] must be an int in "
                 r"\[0, 2\*\*128\)", id="huge-int"),
    pytest.param(pcg_state(state=-1), r"\['state'\]\['state'\] must be an int in", id="negative"),
    pytest.param(pcg_state(state=1.5), r"\['state'\]\['state'\] must be an int in .*float",
                 id="float"),
    pytest.param(pcg_state(inc=True), r"\['state'\]\['inc'\] must be .*bool", id="bool"),
    pytest.param(pcg_state(inc=2), r"\['state'\]\['inc'\] must be odd", id="even-inc"),
    pytest.param(pcg_state(inc=DELETE), r"\['state'\] must have the keys \['inc', 'state'\]",
                 id="missing-inc"),
    pytest.param(pcg_state(uinteger=DELETE), r" must have the keys \['bit_generator', "
                 r"'has_uint32', 'state', 'uinteger'\]", id="missing-uinteger"),
    pytest.param(pcg_state(extra=1), " must have the keys", id="extra-key"),
    pytest.param(pcg_state(has_uint32="0"), r"\['has_uint32'\] must be 0 or 1", id="str"),
    pytest.param(pcg_state(has_uint32=2), r"\['has_uint32'\] must be 0 or 1", id="flag-2"),
    pytest.param(pcg_state(uinteger=2 ** 40), r"\['uinteger'\] must be an int in \[0, 2\*\*32\)",
                 id="uinteger-2**40"),
    pytest.param(pcg_state(state=[1, 2]), r"\['state'\]\['state'\] must be an int in .*list",
                 id="list"),
    pytest.param({**pcg_state(), "state": [1, 2]}, r"\['state'\] must be a dict; got list",
                 id="inner-list"),
    pytest.param(pcg_state(bit_generator="MT19937"), " is for a MT19937 bit generator; "
                 "expected PCG64", id="other-kind"),
    pytest.param(pcg_state(bit_generator=None), " is for a None bit generator", id="no-kind"),
    pytest.param({}, " must have the keys", id="empty"),
]


@pytest.mark.parametrize("bad, match", GARBAGE_STATES)
def test_set_state_refuses_garbage_and_changes_nothing(bad, match):
    dn.manual_seed(3)
    before = dn_random.get_state()
    with pytest.raises(ValueError, match=r"^state" + match):
        dn_random.set_state(bad)
    assert dn_random.get_state() == before


@pytest.mark.parametrize("bad", [None, [1, 2], "PCG64"])
def test_set_state_refuses_a_non_dict(bad):
    before = dn_random.get_state()
    with pytest.raises(TypeError, match=r"^state must be a dict"):
        dn_random.set_state(bad)
    assert dn_random.get_state() == before


def test_set_state_round_trips_every_field():
    dn.manual_seed(11)
    dn_random.default_generator().integers(0, 10, 3, dtype=np.uint32)  # buffers a uint32
    state = dn_random.get_state()
    assert state["has_uint32"] == 1
    want = dn_random.default_generator().integers(0, 2 ** 31, 5, dtype=np.uint32)
    dn.manual_seed(0)
    dn_random.set_state(state)
    assert dn_random.get_state() == state
    assert np.array_equal(dn_random.default_generator().integers(0, 2 ** 31, 5, dtype=np.uint32),
                          want)
    assert dn_random.check_state(state) == state and dn_random.check_state(state) is not state


@pytest.mark.parametrize("bad, match", GARBAGE_STATES)
def test_garbage_rng_state_in_checkpoint(good, tmp_path, bad, match):
    path = resign_metadata(good, tmp_path / "rng.safetensors", lambda m: m.update(rng=bad))
    model, opt = fresh()
    assert_load_fails(path, model, opt, match="the saved random generator state is unusable: "
                                              "state" + match)
    dn.load(path, model=model, optimizer=opt, rng=False)  # the rest is usable without it
    assert_same(snapshot(model), dn.load(good, rng=False).components["model"])


def test_garbage_controller_generator_state_is_refused(tmp_path):
    """A DST controller's saved generator state goes through the controller's own check: a
    garbage one is a ValueError (not numpy's OverflowError) and nothing is loaded."""
    from diagnet.dst.prune_grow import DiagPruneGrow

    model = small_model(0)
    path = tmp_path / "c.safetensors"
    dn.save(path, model=model, dst=DiagPruneGrow({"0": model[0]}, t_end=10, rng=0))

    def garbage(m):
        m["components"]["dst"]["rng"]["state"]["state"] = 2 ** 200
    bad = resign_metadata(path, tmp_path / "bad.safetensors", garbage)
    target, _ = fresh()
    controller = DiagPruneGrow({"0": target[0]}, t_end=10, rng=5)
    rng_before = controller.rng.bit_generator.state
    before = snapshot(target)
    with pytest.raises(ValueError, match="controller state 'rng' is not a valid PCG64 state"):
        dn.load(bad, model=target, dst=controller)
    assert_same(snapshot(target), before)
    assert controller.rng.bit_generator.state == rng_before


# ----------------------------------------------------------------------------- size


def mlp(diag, rng=0):
    if diag:
        hidden = [nn.DiagLinear(784, 256, sparsity=0.9, rng=rng),
                  nn.DiagLinear(256, 256, sparsity=0.9, rng=rng + 1)]
    else:
        hidden = [nn.Linear(784, 256, rng=rng), nn.Linear(256, 256, rng=rng + 1)]
    return nn.Sequential(hidden[0], nn.ReLU(), hidden[1], nn.ReLU(),
                         nn.Linear(256, 10, rng=rng + 2))


def test_diagonal_checkpoint_is_small(tmp_path):
    sparse_path, dense_path = tmp_path / "diag.safetensors", tmp_path / "dense.safetensors"
    sparse_model = mlp(True)
    dn.save(sparse_path, model=sparse_model)
    dn.save(dense_path, model=mlp(False))
    s, d = sparse_path.stat().st_size, dense_path.stat().st_size
    ratio = s / d
    assert ratio <= 0.15, f"diagonal checkpoint {s:,} B vs dense {d:,} B: ratio {ratio:.4f}"
    # stored, not densified: the file holds K*L values per diagonal layer
    tensors, _ = load_tensors(sparse_path)
    assert tensors["model/0.values"].shape == (sparse_model[0].K, 256)
    assert tensors["model/0.offsets"].shape == (sparse_model[0].K,)
    assert not any(t.shape == (256, 784) for t in tensors.values())
    print(f"checkpoint sizes: diagonal {s:,} B, dense {d:,} B, ratio {ratio:.4f}")


# ----------------------------------------------------------------------------- compatibility


def test_compatible_with_the_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    ours = tmp_path / "ours.safetensors"
    model = small_model(0)
    dn.save(ours, model=model, state={"epoch": 1})
    theirs = st.load_file(str(ours))
    for k, v in snapshot(model).items():
        assert np.array_equal(theirs[f"model/{k}"], v) and theirs[f"model/{k}"].dtype == v.dtype
    rng = np.random.default_rng(0)
    tensors = {"w": rng.standard_normal((3, 5)).astype(np.float32),
               "i": np.arange(7, dtype=np.int64), "b": np.array([True, False]),
               "h": np.ones(3, np.float16), "s": np.array(2.0)}
    other = tmp_path / "theirs.safetensors"
    st.save_file(tensors, str(other), metadata={"who": "safetensors"})
    got, meta = load_tensors(other)
    assert meta == {"who": "safetensors"}
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and np.array_equal(got[k], v), k


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_model_round_trip(tmp_path):
    model = small_model(0).to("cuda")
    x = inputs(device="cuda")
    want = model(x).numpy()
    path = tmp_path / "gpu.safetensors"
    dn.save(path, model=model, state={"device": "cuda"})
    tensors, _ = load_tensors(path)
    assert all(isinstance(t, np.ndarray) for t in tensors.values())
    other = small_model(5).to("cuda")
    ck = dn.load(path, model=other)
    assert ck.state == {"device": "cuda"}
    for p in list(other.parameters()) + list(other.buffers()):
        assert p.device == "cuda"
    assert_same(snapshot(other), snapshot(model))
    got = other(x).numpy()
    assert got.tobytes() == want.tobytes()
    # and back onto the CPU, bit-exactly
    cpu = small_model(9)
    dn.load(path, model=cpu)
    assert_same(snapshot(cpu), snapshot(model))


@pytest.mark.gpu
def test_gpu_adam_resumes_on_the_gpu(tmp_path):
    from diagnet import optim

    def build(seed):
        model = small_model(seed).to("cuda")
        return model, optim.Adam(model.parameters(), lr=1e-2)

    model, opt = build(0)
    train_step(model, opt, 1)
    path = tmp_path / "gpu.safetensors"
    dn.save(path, model=model, optimizer=opt)
    model2, opt2 = build(3)
    dn.load(path, model=model2, optimizer=opt2)
    for state in opt2.state.values():
        for v in state.values():
            assert not backend.is_array(v) or backend.device_of(v) == "cuda"
    train_step(model, opt, 2)
    train_step(model2, opt2, 2)
    assert_same(snapshot(model2), snapshot(model))
