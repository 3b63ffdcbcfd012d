"""The IDX reader and writer (`diagnet.data.idx`): round trips and strict validation."""

from __future__ import annotations

import gzip
import os
import pathlib
import struct
import tracemalloc

import numpy as np
import pytest

from diagnet.data import IDXError, read_idx, write_idx
from diagnet.data.idx import IDX_TYPES, encode_idx

DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]
SHAPES = [(0,), (7,), (3, 5), (4, 28, 28), (2, 3, 4, 5), (1, 1, 1, 1)]


def _random(rng, dtype, shape):
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return (rng.standard_normal(shape) * 1e3).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip(tmp_path, dtype, shape):
    rng = np.random.default_rng(0)
    a = _random(rng, dtype, shape)
    path = tmp_path / "a.idx"
    write_idx(path, a)
    b = read_idx(path)
    assert b.dtype == np.dtype(dtype) and b.dtype.isnative
    assert b.shape == shape
    np.testing.assert_array_equal(a, b)
    assert b.flags.writeable and b.flags.c_contiguous
    # from bytes and from a str path: the same
    np.testing.assert_array_equal(read_idx(path.read_bytes()), a)
    np.testing.assert_array_equal(read_idx(str(path)), a)
    # the size is exactly header + data
    assert path.stat().st_size == 4 + 4 * len(shape) + a.size * a.itemsize


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_gz_round_trip_and_transparent_gzip(tmp_path, dtype):
    a = _random(np.random.default_rng(1), dtype, (3, 4, 5))
    write_idx(tmp_path / "a.idx.gz", a)
    raw = (tmp_path / "a.idx.gz").read_bytes()
    assert raw[:2] == b"\x1f\x8b"
    np.testing.assert_array_equal(read_idx(tmp_path / "a.idx.gz"), a)
    # recognised by content, not by name
    (tmp_path / "noext").write_bytes(gzip.compress(encode_idx(a)))
    np.testing.assert_array_equal(read_idx(tmp_path / "noext"), a)
    np.testing.assert_array_equal(read_idx(raw), a)
    # deterministic compressed bytes
    write_idx(tmp_path / "b.idx.gz", a)
    assert (tmp_path / "b.idx.gz").read_bytes() == raw


def test_known_bytes_big_endian():
    """The header and data layout of the format, byte for byte."""
    labels = np.array([5, 0, 4], dtype=np.uint8)
    assert encode_idx(labels) == b"\x00\x00\x08\x01\x00\x00\x00\x03\x05\x00\x04"
    shorts = np.array([[1, -2]], dtype=np.int16)
    assert encode_idx(shorts) == (b"\x00\x00\x0b\x02" + struct.pack(">II", 1, 2)
                                  + struct.pack(">hh", 1, -2))
    f = np.array([1.5], dtype="<f4")  # any byte order in, big-endian out
    assert encode_idx(f) == b"\x00\x00\x0d\x01\x00\x00\x00\x01" + struct.pack(">f", 1.5)
    assert encode_idx(np.array([2.0], dtype=">f8"))[-8:] == struct.pack(">d", 2.0)
    images = np.zeros((60000, 28, 28), dtype=np.uint8)
    assert encode_idx(images)[:16] == bytes.fromhex("00000803 0000ea60 0000001c 0000001c")
    assert read_idx(b"\x00\x00\x0c\x01\x00\x00\x00\x01\xff\xff\xff\xfe").tolist() == [-2]


def test_write_is_atomic_and_leaves_no_temp(tmp_path):
    path = tmp_path / "x.idx"
    write_idx(path, np.arange(3, dtype=np.uint8))
    with pytest.raises(IDXError, match="dtype int64"):
        write_idx(path, np.arange(3, dtype=np.int64))
    np.testing.assert_array_equal(read_idx(path), [0, 1, 2])  # unchanged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.idx"]


@pytest.mark.parametrize("array, match", [
    (np.arange(3, dtype=np.int64), "dtype int64"),
    (np.arange(3, dtype=np.uint16), "dtype uint16"),
    (np.array([True]), "dtype bool"),
    (np.array([1 + 2j], dtype=np.complex64), "dtype complex64"),
    (np.array(3, dtype=np.uint8), "0-dimensional"),
])
def test_write_refuses(tmp_path, array, match):
    with pytest.raises(IDXError, match=match):
        write_idx(tmp_path / "x.idx", array)
    assert not (tmp_path / "x.idx").exists()


# ------------------------------------------------------------------------------ corruption


@pytest.fixture
def good():
    """A valid 3-D int32 IDX file's bytes: header 16 bytes + 2*3*4*4 = 96 data bytes."""
    return encode_idx(np.arange(24, dtype=np.int32).reshape(2, 3, 4))


@pytest.mark.parametrize("cut", [0, 1, 3])
def test_too_short_for_the_magic(good, cut):
    with pytest.raises(IDXError, match=r"<IDX bytes>: too short for an IDX header"):
        read_idx(good[:cut])


@pytest.mark.parametrize("cut", [4, 8, 15])
def test_truncated_in_the_dims(good, cut):
    with pytest.raises(IDXError, match=r"too short for the IDX header: .* 3-dimensional file "
                                       r"is 16 bytes"):
        read_idx(good[:cut])


@pytest.mark.parametrize("cut", [16, 17, 50, 111])
def test_truncated_in_the_data(good, cut):
    with pytest.raises(IDXError, match=r"data size \d+ bytes does not match the header: dims "
                                       r"\[2, 3, 4\] x 4-byte int32 = 96 bytes \(truncated\)"):
        read_idx(good[:cut])


@pytest.mark.parametrize("extra", [1, 4, 1000])
def test_trailing_bytes(good, extra):
    with pytest.raises(IDXError, match=rf"\({extra} trailing bytes\)"):
        read_idx(good + b"\x00" * extra)


@pytest.mark.parametrize("magic", [b"\x01\x00", b"\x00\x01", b"\xff\xff", b"PK"])
def test_bad_magic(good, magic):
    with pytest.raises(IDXError, match="bad magic"):
        read_idx(magic + good[2:])


@pytest.mark.parametrize("code", sorted(set(range(256)) - set(IDX_TYPES)))
def test_unknown_type_code(good, code):
    with pytest.raises(IDXError, match=f"unknown type code {code:#04x}"):
        read_idx(good[:2] + bytes([code]) + good[3:])


def test_zero_dimensions():
    with pytest.raises(IDXError, match="zero dimensions"):
        read_idx(b"\x00\x00\x08\x00")
    with pytest.raises(IDXError, match="zero dimensions"):
        read_idx(b"\x00\x00\x08\x00\x01\x02")


def test_a_zero_sized_dimension_is_valid():
    a = read_idx(b"\x00\x00\x08\x02\x00\x00\x00\x00\x00\x00\x00\x1c")
    assert a.shape == (0, 28) and a.dtype == np.uint8


def test_errors_name_the_file(tmp_path, good):
    path = tmp_path / "bad-file-idx3-ubyte"
    path.write_bytes(good[:-1])
    with pytest.raises(IDXError, match=r"bad-file-idx3-ubyte: data size"):
        read_idx(path)
    with pytest.raises(IDXError, match=r"^my label: data size"):
        read_idx(good[:-1], name="my label")
    assert issubclass(IDXError, ValueError)
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "missing")


@pytest.mark.parametrize("damage", ["truncated", "crc", "length", "garbage", "method"])
def test_corrupt_gzip(tmp_path, good, damage):
    gz = bytearray(gzip.compress(good, mtime=0))
    if damage == "truncated":
        gz = gz[: len(gz) // 2]
    elif damage == "crc":
        gz[-5] ^= 0xFF  # the CRC32 of the trailer
    elif damage == "length":
        gz[-1] ^= 0x01  # the uncompressed size of the trailer
    elif damage == "garbage":
        gz[12:20] = b"\xff" * 8  # inside the deflate stream
    else:
        gz[2] = 7  # compression method (8 = deflate)
    path = tmp_path / "x.idx.gz"
    path.write_bytes(bytes(gz))
    with pytest.raises(IDXError, match=r"x\.idx\.gz: corrupt gzip stream"):
        read_idx(path)


def test_gzip_of_a_corrupt_idx_is_reported_as_idx_error(good):
    with pytest.raises(IDXError, match="trailing bytes"):
        read_idx(gzip.compress(good + b"\x00"))


# ------------------------------------------------------------------------------ sources


@pytest.fixture
def no_open(monkeypatch):
    """Fail the test if anything is opened: a refused source must be refused before that."""
    def fail(*args, **kwargs):
        pytest.fail(f"open{args} called")
    monkeypatch.setattr("builtins.open", fail)


@pytest.mark.parametrize("source", [0, 3, True, False, 3.0, None, [0, 0, 8, 1], object(),
                                    np.arange(3, dtype=np.uint8)],
                         ids=lambda s: f"{type(s).__name__}-{s!r:.12}")
def test_source_must_be_a_path_or_bytes(no_open, source):
    """An int is not a file descriptor here (``open(3)`` would read fd 3 and close it)."""
    with pytest.raises(TypeError, match=rf"read_idx: source must be a path \(str or "
                                        rf"os.PathLike\) or the file's content \(bytes, "
                                        rf"bytearray or memoryview\); got {type(source).__name__}"):
        read_idx(source)


def test_a_file_descriptor_is_refused_and_left_open(good):
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, good)
        os.close(write_fd)
        with pytest.raises(TypeError, match="got int"):
            read_idx(read_fd)
        assert os.read(read_fd, 4) == good[:4]  # still open, nothing consumed
    finally:
        os.close(read_fd)


def test_name_must_be_a_str(good):
    with pytest.raises(TypeError, match="read_idx: name must be a str or None; got int 3"):
        read_idx(good, name=3)


def test_path_like_and_memoryview_sources(tmp_path, good):
    want = np.arange(24, dtype=np.int32).reshape(2, 3, 4)
    (tmp_path / "g.idx").write_bytes(good)
    np.testing.assert_array_equal(read_idx(pathlib.PurePath(tmp_path / "g.idx")), want)
    np.testing.assert_array_equal(read_idx(memoryview(good)), want)
    np.testing.assert_array_equal(read_idx(bytearray(good)), want)


# ------------------------------------------------------------------------------ size limits


def _peak_bytes(call):
    """The peak of traced memory (bytes) while ``call()`` runs and raises IDXError."""
    tracemalloc.start()
    try:
        with pytest.raises(IDXError) as info:
            call()
        return tracemalloc.get_traced_memory()[1], str(info.value)
    finally:
        tracemalloc.stop()


BOMB = 32 << 20  # bytes behind a header that announces one


@pytest.fixture(scope="module")
def bomb():
    """A 1-byte uint8 IDX file followed by 32 MiB of zeros, gzip-compressed (about 32 KiB)."""
    return gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x01" + bytes(BOMB + 1), mtime=0)


@pytest.mark.parametrize("form", ["bytes", "file"])
def test_decompression_stops_at_the_announced_size(tmp_path, bomb, form):
    assert len(bomb) < BOMB // 512
    source = bomb
    if form == "file":
        source = tmp_path / "bomb.idx.gz"
        source.write_bytes(bomb)
    peak, message = _peak_bytes(lambda: read_idx(source))
    assert peak < 2 << 20, f"decompressing used {peak} bytes"
    assert "trailing bytes" in message and "= 1 bytes" in message


def test_plain_file_with_trailing_data_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "long.idx"
    path.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x01" + bytes(BOMB + 1))
    peak, message = _peak_bytes(lambda: read_idx(path))
    assert peak < 2 << 20, f"reading used {peak} bytes"
    assert f"({BOMB} trailing bytes)" in message


@pytest.mark.parametrize("dims, itemsize_code", [
    ((2**32 - 1, 2**32 - 1), 0x08),        # 2**64 bytes
    ((2**31,), 0x0E),                      # 16 GiB of float64
    ((0, 2**32 - 1, 2**32 - 1), 0x08),     # empty, but no array can have that shape
])
def test_absurd_announced_sizes_are_refused(dims, itemsize_code):
    header = bytes([0, 0, itemsize_code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    for data in (header, gzip.compress(header + b"\x00" * 100)):
        peak, message = _peak_bytes(lambda: read_idx(data))
        assert "more than max_bytes=" in message, message
        assert peak < 2 << 20


def test_max_bytes(good):
    assert read_idx(good, max_bytes=96).shape == (2, 3, 4)
    with pytest.raises(IDXError, match=r"96 bytes .*more than max_bytes=95"):
        read_idx(good, max_bytes=95)
    for bad in (0, -1, 1.5, True, "96"):
        with pytest.raises((TypeError, ValueError), match=r"max_bytes(=\S+: must be >= 1| must be an int; got)"):
            read_idx(good, max_bytes=bad)


def test_too_many_dimensions_is_an_idx_error():
    with pytest.raises(IDXError, match=r"100 dimensions, more than the 32"):
        read_idx(bytes([0, 0, 8, 100]) + struct.pack(">100I", *[1] * 100) + b"\x07")
    with pytest.raises(IDXError, match=r"33-dimensional array .*at most 32"):
        encode_idx(np.zeros((1,) * 33, dtype=np.uint8))
    assert read_idx(encode_idx(np.zeros((1,) * 32, dtype=np.uint8))).ndim == 32


def test_gzip_stream_shorter_than_announced(good):
    with pytest.raises(IDXError, match=r"data size 95 bytes .* \(truncated\)"):
        read_idx(gzip.compress(good[:-1]))
