"""Tensor files in the safetensors format, and atomic file writes.

A safetensors file (https://github.com/huggingface/safetensors) is::

    [ 8 bytes ]  N, the header length, unsigned 64-bit little-endian
    [ N bytes ]  the header: UTF-8 JSON, padded with spaces to a multiple of 8 bytes
                 {"<tensor name>": {"dtype": "F32", "shape": [16, 20],
                                    "data_offsets": [begin, end]},
                  ...,
                  "__metadata__": {"<key>": "<string>", ...}}
    [ rest    ]  the data: each tensor's bytes, little-endian, C order; ``begin``/``end``
                 are byte offsets from the start of this section. We write the tensors
                 in header order, back to back; the ranges tile the section exactly.

`save_tensors` / `load_tensors` write and read that format for any dict of arrays with
nothing but the standard library and NumPy (no pickle, no dependency on the
``safetensors`` package); any safetensors reader opens our files and we read theirs (for
the dtypes NumPy has). The reader checks every structural property (lengths, UTF-8, JSON
nested at most `MAX_JSON_DEPTH` deep and free of lone surrogates, dtypes, shapes against
offsets and NumPy's limits, offsets tiling the data section, no trailing bytes) and raises
`CheckpointError` naming the file and the problem.

`atomic_write(path, write)` is how every file of diagnet is written: into a temporary file
in the destination folder, flushed, ``fsync``-ed and renamed onto the final name, so that a
crash never leaves a partial file under that name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile

import numpy as np

from . import backend
from .checks import is_int

__all__ = ["CheckpointError", "save_tensors", "load_tensors", "atomic_write", "host_array",
           "dtype_name", "check_text", "loads_json", "MAX_HEADER_BYTES", "MAX_JSON_DEPTH"]

#: the largest header accepted, as the reference implementation (100 MB)
MAX_HEADER_BYTES = 100_000_000
#: the deepest nesting of JSON arrays and objects accepted in a header (a safetensors header
#: needs 3 levels); it keeps the parser, and every walk over the result, far from Python's
#: recursion limit
MAX_JSON_DEPTH = 100

# safetensors dtype names <-> NumPy dtypes (always little-endian in the file)
_DTYPES = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("u1"), "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"), "I16": np.dtype("<i2"), "F16": np.dtype("<f2"),
    "U32": np.dtype("<u4"), "I32": np.dtype("<i4"), "F32": np.dtype("<f4"),
    "U64": np.dtype("<u8"), "I64": np.dtype("<i8"), "F64": np.dtype("<f8"),
}
# valid safetensors dtypes that NumPy cannot hold
_NO_NUMPY = {"BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2"}
_NAMES = {(dt.kind, dt.itemsize): name for name, dt in _DTYPES.items()}


class CheckpointError(ValueError):
    """A file is not a valid safetensors file or diagnet checkpoint, or does not fit the
    objects it is loaded into. The message names the file and the problem."""



# ============================================================================ atomic write


def _default_mode():
    """``0o666`` less the process umask: the mode ``open()`` would give a new file."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no other way to read it; restored at once
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(directory):
    """Make a rename in ``directory`` durable, where the platform allows it."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(directory, flags)
    except OSError:
        return  # e.g. Windows: folders cannot be opened
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write):
    """Write a file through ``write(fileobj)`` atomically: temp file, fsync, rename.

    On any exception (KeyboardInterrupt included) the temporary file is removed, the
    exception propagates and ``path`` keeps its previous content (or stays absent).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {path!r}: the folder {directory!r} does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write {path!r}: it is a folder")
    try:
        mode = os.stat(path).st_mode & 0o777  # replacing a file: keep its permissions
    except OSError:
        mode = _default_mode()
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)  # mkstemp makes 0600 files
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


# ============================================================================ safetensors


def host_array(value, name):
    """``value`` (NumPy/CuPy array or Tensor) as a C-contiguous little-endian NumPy array."""
    arr = backend.unwrap(value)
    if not backend.is_array(arr):
        raise TypeError(f"tensor {name!r} must be a NumPy/CuPy array or a Tensor; got "
                        f"{type(value).__name__}")
    arr = np.asarray(backend.to_numpy(arr), order="C")  # (ascontiguousarray makes 0-d 1-d)
    if (arr.dtype.kind, arr.dtype.itemsize) not in _NAMES:
        raise TypeError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored in safetensors "
                        f"(supported: {', '.join(str(d) for d in _DTYPES.values())})")
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and not np.little_endian):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return arr


def dtype_name(arr):
    """The safetensors name (``"F32"``, ``"I64"``, ...) of the dtype of the NumPy array
    ``arr``, which `host_array` returned (a dtype that safetensors can store)."""
    return _NAMES[(arr.dtype.kind, arr.dtype.itemsize)]


def save_tensors(path, tensors, metadata=None):
    """Write ``tensors`` to ``path`` as a safetensors file, atomically.

    Args:
        path: file name (str or path-like). Its folder must exist.
        tensors: dict name -> NumPy array, CuPy array or `Tensor`; written in this order.
            GPU arrays are copied to the host. Supported dtypes: bool, (u)int8/16/32/64,
            float16/32/64.
        metadata: optional dict str -> str, stored as the header's ``__metadata__``.

    Raises:
        TypeError: a name or metadata entry is not a str, a value is not an array, or its
            dtype has no safetensors equivalent.
        ValueError: a tensor is called ``"__metadata__"``, or a name or metadata entry holds
            a lone surrogate (a str UTF-8 cannot encode); nothing is written.
        FileNotFoundError: the destination folder does not exist.
        OSError: writing failed (the previous file at ``path``, if any, is untouched).
    """
    if not isinstance(tensors, dict):
        raise TypeError(f"tensors must be a dict name -> array; got {type(tensors).__name__}")
    header, arrays, offset = {}, [], 0
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str; got {type(name).__name__} {name!r}")
        if name == "__metadata__":
            raise ValueError("'__metadata__' is reserved and cannot name a tensor")
        check_text(name, "tensor name")
        arr = host_array(value, name)
        header[name] = {"dtype": dtype_name(arr), "shape": [int(s) for s in arr.shape],
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("metadata must be a dict with str keys and str values")
        for key, value in metadata.items():
            check_text(key, "metadata: the key")
            check_text(value, f"metadata[{key!r}]: the str")
        header = {"__metadata__": dict(metadata), **header}
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False,
                     allow_nan=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)

    def write(f):
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for arr in arrays:
            if arr.size:
                f.write(arr.reshape(-1).view(np.uint8).data)

    atomic_write(path, write)


def check_text(text, what):
    """Raise ValueError if the str ``text`` cannot be written as UTF-8 (it holds a lone
    surrogate, such as ``"\\ud800"``); the message starts with ``what`` and ``text``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} {text!r:.80} is not valid Unicode: it holds the lone surrogate "
                         f"{text[exc.start]!r} at index {exc.start}, which UTF-8 cannot "
                         "encode") from None


# a JSON string; one left open runs to the end of the text (so a scan never backtracks)
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_OPEN, _CLOSE = np.frombuffer(b"[{", np.uint8), np.frombuffer(b"]}", np.uint8)


def _json_depth(text):
    """How deeply arrays and objects nest in JSON ``text`` (brackets in strings do not count).

    A linear scan without parsing, so that a hostile header cannot make the parser recurse.
    """
    codes = np.frombuffer(_JSON_STRING.sub("", text).encode("utf-8", "surrogatepass"), np.uint8)
    steps = np.isin(codes, _OPEN).astype(np.int32) - np.isin(codes, _CLOSE)
    return int(np.cumsum(steps).max(initial=0))


def loads_json(text, what):
    """Parse JSON ``text`` strictly: nested at most `MAX_JSON_DEPTH` deep, no duplicate keys,
    no lone surrogate escapes (``"\\ud800"``, which no UTF-8 file can hold).

    Raises:
        ValueError: naming ``what`` (e.g. ``"the header"``) and the problem.
    """
    depth = _json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels of arrays and "
                         f"objects ({depth})")
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates)
    except ValueError as exc:
        raise ValueError(f"{what} is not valid JSON ({exc})") from None
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} holds a lone surrogate escape (such as \\ud800), which is not "
                         "valid Unicode") from None
    return value


def _no_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _parse_header(path, raw, size, n):
    """Validate the header bytes; return ``(entries, metadata)``, entries sorted by offset."""
    def fail(msg):
        raise CheckpointError(f"{path}: {msg}")

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        fail(f"not a safetensors file: the header is not valid UTF-8 ({exc})")
    try:
        header = loads_json(text, "the header")
    except ValueError as exc:
        fail(f"not a safetensors file: {exc}")
    if not isinstance(header, dict):
        fail(f"not a safetensors file: the header is a JSON {type(header).__name__}, not an "
             "object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        fail("__metadata__ must be an object of string values")
    entries = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            fail(f"tensor {name!r}: the entry must be an object with exactly 'dtype', 'shape' "
                 f"and 'data_offsets'; got {info!r}"[:300])
        dname, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if isinstance(dname, str) and dname in _NO_NUMPY:
            fail(f"tensor {name!r}: dtype {dname} has no NumPy equivalent")
        if not isinstance(dname, str) or dname not in _DTYPES:
            fail(f"tensor {name!r}: unknown dtype {dname!r}")
        if not isinstance(shape, list) or not all(is_int(s) and s >= 0 for s in shape):
            fail(f"tensor {name!r}: shape must be a list of non-negative ints; got {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(is_int(o) and o >= 0 for o in offsets)):
            fail(f"tensor {name!r}: data_offsets must be [begin, end], two non-negative ints; "
                 f"got {offsets!r}")
        begin, end = offsets
        if end < begin:
            fail(f"tensor {name!r}: data_offsets [{begin}, {end}] are out of order")
        dtype = _DTYPES[dname]
        nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if end - begin != nbytes:
            fail(f"tensor {name!r}: data_offsets [{begin}, {end}] span {end - begin} bytes, but "
                 f"{dname} {shape} needs {nbytes}")
        entries.append((begin, end, name, dtype, tuple(shape)))
    # The ranges must tile [0, end of data) exactly. (Any order in the JSON, as the
    # reference reader allows; ours is written in data order.)
    expected = 0
    for begin, end, name, _, _ in sorted(entries, key=lambda e: (e[0], e[1])):
        if begin < expected:
            fail(f"tensor {name!r}: data_offsets [{begin}, {end}] overlap the previous tensor "
                 f"(which ends at {expected})")
        if begin > expected:
            fail(f"tensor {name!r}: a gap of {begin - expected} bytes before its data_offsets "
                 f"[{begin}, {end}]")
        expected = end
    data_size = size - 8 - n
    if data_size < expected:
        fail(f"truncated: the header describes {expected} bytes of tensor data, the file holds "
             f"{data_size}")
    if data_size > expected:
        fail(f"{data_size - expected} trailing bytes after the {expected} bytes of tensor data")
    return entries, metadata


def load_tensors(path):
    """Read a safetensors file, validating it strictly.

    Args:
        path: file name (str or path-like).

    Returns:
        ``(tensors, metadata)``: dict name -> writable NumPy array (in header order, native
        byte order) and the header's ``__metadata__`` dict str -> str (empty if absent).

    Raises:
        CheckpointError (a ValueError): the file is shorter than 8 bytes; the header length
            is larger than the file or than 100 MB; the header is not UTF-8 JSON, not an
            object, nested deeper than `MAX_JSON_DEPTH`, has duplicate keys or a lone
            surrogate escape; an entry has an unknown dtype (or one NumPy lacks,
            such as BF16), a bad shape or offsets, or offsets that disagree with its shape;
            a shape NumPy cannot hold (more dimensions, or elements, than it allows);
            offsets overlap or leave gaps; the data section is shorter (truncated) or longer
            (trailing bytes) than the header says; ``__metadata__`` has non-string values; a
            BOOL tensor holds bytes other than 0 and 1.
        OSError: the file cannot be opened (FileNotFoundError, IsADirectoryError...).
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            what = "empty" if size == 0 else f"{size} bytes long"
            raise CheckpointError(f"{path}: not a safetensors file: it is {what}, shorter than "
                                  "the 8-byte header length")
        n = int.from_bytes(f.read(8), "little")
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: not a safetensors file: header length {n} is "
                                  f"absurd (limit {MAX_HEADER_BYTES} bytes)")
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated or not a safetensors file: header length "
                                  f"{n} exceeds the {size - 8} bytes after the length field")
        raw = f.read(n)
        if len(raw) != n:
            raise CheckpointError(f"{path}: truncated while reading (the file changed?)")
        entries, metadata = _parse_header(path, raw, size, n)
        arrays = {}
        for begin, end, name, dtype, shape in entries:
            try:
                arr = np.empty(shape, dtype=dtype.newbyteorder("="))
            except ValueError as exc:  # e.g. [0, 2**64]: no bytes, but a dimension too large
                raise CheckpointError(f"{path}: tensor {name!r}: NumPy cannot hold the shape "
                                      f"{list(shape)} ({exc})"[:300]) from None
            if end > begin:
                f.seek(8 + n + begin)
                got = f.readinto(arr.reshape(-1).view(np.uint8))
                if got != end - begin:
                    raise CheckpointError(f"{path}: tensor {name!r}: truncated while reading "
                                          "(the file changed?)")
                if not np.little_endian and dtype.itemsize > 1:
                    arr = arr.byteswap()
                if dtype.kind == "b" and arr.view(np.uint8).max() > 1:
                    raise CheckpointError(f"{path}: tensor {name!r}: a BOOL holds a byte other "
                                          "than 0 or 1")
            arrays[name] = arr  # entries are in header order
    return arrays, dict(metadata)

