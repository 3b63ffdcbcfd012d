"""Checkpoint fuzzing: damage to a valid checkpoint never gets past `diagnet.load` unseen.

A checkpoint of a small model, its Adam optimizer, a training state, a config and the
generator state is mutated at random: bits flipped, bytes overwritten, the file truncated
or extended, the header edited where it matters (JSON numbers, nesting, dtype names,
shapes, data offsets, string escapes). Each mutated file must either

* load exactly what was saved (the mutation touched only bytes the format ignores, such
  as the header's padding), or
* raise `CheckpointError` and leave the model, the optimizer and the default generator
  bit-for-bit as they were.

Any other exception fails the test with the case that raised it. The default run tries a
few hundred cases with a fixed seed; ``-m slow`` tries thousands. Targeted cases pin the
header edits that keep the file well formed, and a second fuzzer feeds garbage generator
states through files whose checksum was recomputed, so that only the content checks stand
between them and the generator.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import diagnet as dn
from diagnet import backend, checkpoint, nn, optim
from diagnet import random as dn_random
from diagnet.checkpoint import CHECKSUM_KEY, METADATA_KEY, CheckpointError

# ----------------------------------------------------------------------------- the checkpoint


def build(seed):
    """DiagLinear(12, 8) -> ReLU -> Linear(8, 3) with Adam after one step: seeds decide all."""
    model = nn.Sequential(nn.DiagLinear(12, 8, sparsity=0.5, rng=seed), nn.ReLU(),
                          nn.Linear(8, 3, rng=seed + 1))
    opt = optim.Adam(model.named_parameters(), lr=1e-2)
    rng = np.random.default_rng(seed)
    x = dn.tensor(rng.standard_normal((4, 12)).astype(np.float32))
    dn.cross_entropy(model(x), dn.tensor(rng.integers(0, 3, 4))).backward()
    opt.step()
    return model, opt


def flat(tree, prefix=""):
    """``[(path, type, value or bytes)]`` of a nested structure: equal lists mean equal trees,
    arrays compared by dtype, shape and bytes, other leaves by type and value."""
    if isinstance(tree, dict):
        return [item for k, v in tree.items() for item in flat(v, f"{prefix}/{k!r}")]
    if isinstance(tree, (list, tuple)):
        return [(prefix, type(tree).__name__, len(tree))] + [
            item for i, v in enumerate(tree) for item in flat(v, f"{prefix}/{i}")]
    arr = backend.unwrap(tree)
    if backend.is_array(arr):
        arr = backend.to_numpy(arr)
        return [(prefix, str(arr.dtype), arr.shape, arr.tobytes())]
    return [(prefix, type(tree).__name__, repr(tree))]


def snapshot(model, opt):
    """Everything a load may change: model, optimizer and the default generator."""
    return flat(model.state_dict()), flat(opt.state_dict()), flat(dn_random.get_state())


class Setup:
    """The saved checkpoint, what loading it gives, and a target to load mutations into."""

    def __init__(self, folder):
        dn.manual_seed(5)
        model, opt = build(0)
        self.path = folder / "good.safetensors"
        dn.save(self.path, model=model, optimizer=opt,
                state={"epoch": 3, "step": 12, "best": (0.8125, None), "ids": {0: "a", 7: "b"},
                       "table": np.arange(6, dtype=np.float32).reshape(2, 3),
                       "empty": np.zeros((0, 3), np.float32)},
                config={"lr": 1e-2, "widths": [12, 8, 3], "name": "fuzz-ü"})
        self.data = self.path.read_bytes()
        self.n = int.from_bytes(self.data[:8], "little")
        self.header = self.data[8:8 + self.n]
        self.model, self.opt = build(9)
        self.expected = self._load(self.path)
        self.target_path = folder / "target.safetensors"
        dn.manual_seed(77)
        model, opt = build(9)
        dn.save(self.target_path, model=model, optimizer=opt)
        self.reset()
        self.file = folder / "mutated.safetensors"

    def _load(self, path):
        ck = dn.load(path, model=self.model, optimizer=self.opt)
        return snapshot(self.model, self.opt), flat([ck.state, ck.config]), dict(ck.metadata)

    def reset(self):
        """Put the target back to its own, different, contents."""
        dn.load(self.target_path, model=self.model, optimizer=self.opt)
        self.before = snapshot(self.model, self.opt)

    def check(self, data, what, rng_state=None):
        """The oracle: ``data`` loads what was saved (with ``rng_state`` as the generator's
        state, if given) or is refused with nothing changed. Returns which happened."""
        self.file.write_bytes(data)
        try:
            got = self._load(self.file)
        except CheckpointError as exc:
            assert str(self.file) in str(exc), what
            assert snapshot(self.model, self.opt) == self.before, f"changed by a refused {what}"
            return "refused"
        except Exception as exc:  # noqa: BLE001 - the point: nothing else may escape
            self.reset()  # so that the cases after this one still test something
            pytest.fail(f"{what}: {type(exc).__name__}: {exc}"[:2000])
        self.reset()
        expected = self.expected
        if rng_state is not None:
            (model, opt, _), rest = expected[0], expected[1:]
            expected = ((model, opt, flat(rng_state)),) + rest
        assert got == expected, f"{what} loaded something else than was saved"
        return "loaded"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return Setup(tmp_path_factory.mktemp("fuzz"))


# ----------------------------------------------------------------------------- mutations

INTERESTING = ["0", "-1", "1", "2", "3", "7", "8", "255", "256", "65536", "2147483648",
               "4294967296", "9223372036854775807", "9223372036854775808",
               "18446744073709551616", str(2 ** 128), "1" + "0" * 400, "1.5", "-0", "1e309",
               "-1e309", "NaN", "Infinity", "true", "null", '"x"', "[]", "{}"]
DTYPE_NAMES = ["F32", "F64", "F16", "I32", "U32", "I64", "U64", "I8", "U8", "I16", "U16",
               "BOOL", "BF16", "F8_E4M3", "f32", "Q7", ""]
NUMBER = re.compile(rb"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
DTYPE = re.compile(rb'"dtype":"([A-Z0-9_]+)"')
SHAPE = re.compile(rb'"shape":\[([0-9,]*)\]')
OFFSETS = re.compile(rb'"data_offsets":\[(\d+),(\d+)\]')
VALUE_START = re.compile(rb'[\[{:,]')


def with_header(setup, header, keep_length=False):
    """The checkpoint with its header replaced (the length field follows, unless kept)."""
    n = setup.n if keep_length else len(header)
    return n.to_bytes(8, "little") + header + setup.data[8 + setup.n:]


def splice(rng, header, pattern, make):
    """Replace one random match of ``pattern`` in ``header`` by ``make(match)``."""
    matches = list(pattern.finditer(header))
    if not matches:
        return header
    m = matches[rng.integers(len(matches))]
    return header[:m.start()] + make(m) + header[m.end():]


def edit_number(rng, header):
    return splice(rng, header, NUMBER,
                  lambda m: INTERESTING[rng.integers(len(INTERESTING))].encode())


def edit_nesting(rng, header):
    depth = int(rng.choice([2, 50, 99, 100, 101, 1000, 100_000]))
    escaped = rng.random() < 0.5  # inside the diagnet metadata string: quotes are escaped
    value = b"[" * depth + b"]" * depth if rng.random() < 0.5 else \
        (b'{\\"a\\":' if escaped else b'{"a":') * depth + b"0" + b"}" * depth
    return splice(rng, header, VALUE_START, lambda m: m.group() + value + b",")


def edit_dtype(rng, header):
    name = DTYPE_NAMES[rng.integers(len(DTYPE_NAMES))].encode()
    return splice(rng, header, DTYPE, lambda m: b'"dtype":"' + name + b'"')


def edit_shape(rng, header):
    def make(m):
        dims = [int(d) for d in m.group(1).split(b",") if d]
        choice = rng.integers(4)
        if choice == 0 and dims:
            dims = list(rng.permutation(dims))
        elif choice == 1:
            dims.append(int(rng.choice([0, 1, 2, 2 ** 63, 2 ** 64])))
        elif choice == 2 and dims:
            dims[rng.integers(len(dims))] = int(rng.choice([0, 1, 3, 2 ** 40, 2 ** 63 - 1]))
        else:
            dims = [1] * int(rng.choice([31, 32, 33, 64, 65])) + dims
        return b'"shape":[' + b",".join(str(d).encode() for d in dims) + b"]"
    return splice(rng, header, SHAPE, make)


def edit_offsets(rng, header):
    def make(m):
        begin, end = int(m.group(1)), int(m.group(2))
        delta = int(rng.choice([-8, -4, -1, 1, 4, 8, 2 ** 63, 2 ** 64]))
        begin, end = (begin + delta, end) if rng.random() < 0.5 else (begin, end + delta)
        return f'"data_offsets":[{begin},{end}]'.encode()
    return splice(rng, header, OFFSETS, make)


def edit_escape(rng, header):
    escape = [b"\\ud800", b"\\udfff", b"\\\\ud800", b"\\u0000", b"\\x", b"\\"][rng.integers(6)]
    at = int(rng.integers(len(header)))
    return header[:at] + escape + header[at:]


HEADER_EDITS = [edit_number, edit_nesting, edit_dtype, edit_shape, edit_offsets, edit_escape]


def mutate(rng, setup):
    """One random mutation of the checkpoint: ``(bytes, description)``."""
    data = bytearray(setup.data)
    kind = int(rng.integers(6))
    in_header = rng.random() < 0.7

    def position():
        return int(rng.integers(8, 8 + setup.n) if in_header else rng.integers(len(data)))

    if kind == 0:  # mostly the low 7 bits, so that the header often stays ASCII
        where = [position() for _ in range(rng.integers(1, 5))]
        for pos in where:
            data[pos] ^= 1 << int(rng.integers(8) if rng.random() < 0.2 else rng.integers(7))
        return bytes(data), f"bits flipped at {where}"
    if kind == 1:  # half the time printable ASCII, which keeps the header valid UTF-8
        pos, length = position(), int(rng.integers(1, 17))
        data[pos:pos + length] = rng.bytes(length) if rng.random() < 0.5 else \
            rng.integers(0x20, 0x7F, length, dtype=np.uint8).tobytes()
        return bytes(data), f"{length} random bytes at {pos}"
    if kind == 2:
        cut = int(rng.integers(len(data)))
        return bytes(data[:cut]), f"truncated to {cut} bytes"
    if kind == 3:
        extra = rng.bytes(int(rng.integers(1, 65)))
        if rng.random() < 0.5:
            return bytes(data) + extra, f"{len(extra)} bytes appended"
        pos = position()
        return bytes(data[:pos]) + extra + bytes(data[pos:]), f"{len(extra)} bytes at {pos}"
    edit = HEADER_EDITS[rng.integers(len(HEADER_EDITS))]
    keep = rng.random() < 0.2
    header = edit(rng, setup.header)
    return with_header(setup, header, keep_length=keep), \
        f"{edit.__name__}{' (length field kept)' if keep else ''}: {changed(setup.header, header)}"


def changed(old, new):
    """Where ``new`` starts to differ from ``old``, with some of its bytes from there."""
    at = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
    return f"at {at}: {new[max(0, at - 20):at + 60]!r}"


@pytest.mark.parametrize("cases, seed", [
    pytest.param(600, 0, id="default"),
    pytest.param(20_000, 1, id="thorough", marks=pytest.mark.slow),
])
def test_mutated_checkpoints_load_identically_or_are_refused(setup, cases, seed):
    rng = np.random.default_rng(seed)
    outcomes = {"refused": 0, "loaded": 0}
    for case in range(cases):
        data, what = mutate(rng, setup)
        outcomes[setup.check(data, f"case {case} (seed {seed}): {what}")] += 1
    assert outcomes["refused"] > cases * 0.9, outcomes  # the mutations do damage


# ----------------------------------------------------------------------------- targeted cases


def replace_once(setup, old, new):
    assert setup.header.count(old) == 1, old
    return with_header(setup, setup.header.replace(old, new))


TARGETED = {
    # the checksum covers each tensor's dtype and shape: same sizes, still well formed
    "shape [2,3] -> [3,2]": lambda s: replace_once(s, b'"F32","shape":[2,3]',
                                                   b'"F32","shape":[3,2]'),
    "dtype F32 -> I32": lambda s: replace_once(s, b'"F32","shape":[2,3]', b'"I32","shape":[2,3]'),
    "dtype F32 -> U32, shape [6]": lambda s: replace_once(s, b'"F32","shape":[2,3]',
                                                          b'"U32","shape":[6]  '),
    # nesting: in the header, in __metadata__, and inside the diagnet metadata string
    "nested header": lambda s: with_header(s, s.header.replace(
        b"{", b'{"deep":' + b"[" * 5000 + b"]" * 5000 + b",", 1)),
    "nested __metadata__": lambda s: with_header(s, s.header.replace(
        b'"__metadata__":{', b'"__metadata__":{"x":' + b"[" * 5000 + b"]" * 5000 + b",", 1)),
    "nested diagnet metadata": lambda s: with_header(s, s.header.replace(
        b'"epoch\\":3', b'"epoch\\":' + b"[" * 5000 + b"]" * 5000, 1)),
    "nested diagnet metadata, 101 deep": lambda s: with_header(s, s.header.replace(
        b'"epoch\\":3', b'"epoch\\":' + b"[" * 101 + b"]" * 101, 1)),
    # a lone surrogate escaped in the header
    "lone surrogate in a tensor name": lambda s: with_header(s, s.header.replace(
        b'"model/0.values"', b'"model/0.values\\ud800"', 1)),
    "lone surrogate in the diagnet metadata": lambda s: with_header(s, s.header.replace(
        b'fuzz-', b'fuzz-\\\\udc00', 1)),
    # a zero-size tensor with a dimension NumPy cannot hold
    "zero-size tensor with a huge dimension": lambda s: replace_once(
        s, b'"shape":[0,3]', b'"shape":[0,18446744073709551616]'),
    "zero-size tensor with 65 dimensions": lambda s: replace_once(
        s, b'"shape":[0,3]', b'"shape":[0' + b",1" * 64 + b"]"),
}


@pytest.mark.parametrize("name", list(TARGETED))
def test_targeted_header_edits_are_refused(setup, name):
    data = TARGETED[name](setup)
    assert data != setup.data
    assert setup.check(data, name) == "refused"


# ----------------------------------------------------------------------------- generator states


def garbage(rng, depth=0):
    """A random JSON value, biased towards what breaks a generator state."""
    choice = int(rng.integers(9 if depth < 2 else 6))
    if choice == 0:
        return int(rng.choice([0, 1, 2, 3, -1, 2 ** 32, 2 ** 63, 2 ** 64, 2 ** 127, 2 ** 128,
                               2 ** 128 - 1, -(2 ** 200), 10 ** 60]))
    if choice == 1:
        return float(rng.choice([0.0, 1.0, 1.5, -2.0, 1e300]))
    if choice == 2:
        return ["PCG64", "MT19937", "", "0", "\udc00"][rng.integers(5)]
    if choice == 3:
        return bool(rng.integers(2))
    if choice in (4, 5):
        return None
    if choice == 6:
        return [garbage(rng, depth + 1) for _ in range(rng.integers(3))]
    keys = ["state", "inc", "has_uint32", "uinteger", "bit_generator", "x"]
    return {keys[rng.integers(len(keys))]: garbage(rng, depth + 1) for _ in range(rng.integers(4))}


def mutate_state(rng, state):
    """``state`` (a PCG64 state) with one random field replaced, removed or added."""
    state = json.loads(json.dumps(state))
    target = state if rng.random() < 0.5 else state["state"]
    key = list(target)[rng.integers(len(target))] if rng.random() < 0.9 else "extra"
    if rng.random() < 0.15:
        target.pop(key, None)
    else:
        target[key] = garbage(rng)
    return state


def resigned(setup, rng_state):
    """The checkpoint with its generator state replaced and its checksum recomputed."""
    tensors, meta = checkpoint.load_tensors(setup.path)
    body = json.loads(meta[METADATA_KEY])
    body["rng"] = rng_state
    text = json.dumps(body)
    checksum = checkpoint._digest(tensors, text)
    checkpoint.save_tensors(setup.file, tensors, {METADATA_KEY: text, CHECKSUM_KEY: checksum})
    return setup.file.read_bytes()


@pytest.mark.parametrize("cases, seed", [
    pytest.param(300, 0, id="default"),
    pytest.param(5000, 1, id="thorough", marks=pytest.mark.slow),
])
def test_garbage_generator_states_are_refused(setup, cases, seed):
    rng = np.random.default_rng(seed)
    saved = dn.load(setup.path, rng=False).rng_state
    refused = 0
    for case in range(cases):
        state = mutate_state(rng, saved)
        what = f"case {case} (seed {seed}): rng state {state!r:.300}"
        # a state that loads must be the generator's state exactly, nothing coerced
        refused += setup.check(resigned(setup, state), what, rng_state=state) == "refused"
    assert refused > cases * 0.8
