"""Read and write IDX files, the format of the MNIST data set.

An IDX file (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT") is::

    [ 2 bytes ]      0x00 0x00                   the magic number's first two bytes
    [ 1 byte  ]      the type code of the data:
                         0x08 unsigned byte (uint8)    0x09 signed byte (int8)
                         0x0B short (int16)            0x0C int (int32)
                         0x0D float (float32)          0x0E double (float64)
    [ 1 byte  ]      ndim, the number of dimensions (at least 1)
    [ 4*ndim bytes ] the dimensions, each an unsigned 32-bit big-endian integer
    [ rest    ]      the data, C order (last index fastest), big-endian, exactly
                     ``prod(dims) * itemsize`` bytes

MNIST's ``train-images-idx3-ubyte`` is ``00 00 08 03  00 00 EA 60  00 00 00 1C  00 00 00 1C``
followed by 60000*28*28 pixels; its labels ``train-labels-idx1-ubyte`` are ``00 00 08 01
00 00 EA 60`` followed by 60000 bytes.

* `read_idx(source)`: a file name (or path-like) or the file's bytes, plain or gzip-compressed
  (recognised by the gzip magic ``1f 8b``, whatever the file's name) -> a NumPy array of the
  file's dtype in native byte order, shape ``dims``. It reads the header first and then no
  more than the data size the header announces (plus one byte), which must not exceed
  ``max_bytes`` (default `MAX_BYTES`): a small compressed file cannot expand into gigabytes.
* `write_idx(path, array)`: writes atomically (`diagnet.tensorfile.atomic_write`); a name
  ending in ``.gz`` is written gzip-compressed (deterministically: no time stamp).
* `encode_idx(array)`: the bytes of the IDX file of ``array``.

The reader is strict: anything that is not exactly one well-formed IDX file raises `IDXError`
(a `ValueError`) whose message names the file and the problem (too short for the header, bad
magic, unknown type code, no dimensions, data size not equal to the product of the
dimensions times the item size, corrupt gzip stream).
"""

from __future__ import annotations

import gzip
import io
import math
import os
import struct
import zlib
from stat import S_ISREG

import numpy as np

from .. import checks
from ..tensorfile import atomic_write

__all__ = ["IDXError", "read_idx", "write_idx", "encode_idx", "IDX_TYPES", "MAX_BYTES",
           "MAX_NDIM"]

#: IDX type code -> NumPy dtype (big-endian, as stored in the file)
IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
# (kind, itemsize) -> type code, for writing
_CODES = {(dt.kind, dt.itemsize): code for code, dt in IDX_TYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"
_BUFFERS = (bytes, bytearray, memoryview)
_MAX_DIM = 2**32 - 1
_BLOCK = 1 << 20  # bytes read or decompressed at a time
#: the most dimensions a file may have: NumPy 1's limit (NumPy 2 allows 64), so that a file
#: written under either reads under both
MAX_NDIM = 32
#: the default limit of `read_idx` on the data size a header may announce (2 GiB; MNIST's
#: largest file holds 47 MB)
MAX_BYTES = 2**31


class IDXError(ValueError):
    """A file or buffer is not a valid IDX file (or not a valid gzip stream around one), or an
    array cannot be written as one. The message names the file and the problem."""


def _check_arguments(source, name, max_bytes):
    if not isinstance(source, _BUFFERS + (str, os.PathLike)):
        # an int would be taken by open() as a file descriptor (read, then closed)
        raise TypeError(f"read_idx: source must be a path (str or os.PathLike) or the file's "
                        f"content (bytes, bytearray or memoryview); got "
                        f"{type(source).__name__} {source!r:.60}")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"read_idx: name must be a str or None; got {type(name).__name__} "
                        f"{name!r:.60}")
    checks.integer("max_bytes", max_bytes, 1)


def read_idx(source, *, name=None, max_bytes=MAX_BYTES):
    """Read one IDX file into a NumPy array.

    Args:
        source: a file name (``str`` or ``os.PathLike``) or the file's content (``bytes``,
            ``bytearray`` or ``memoryview``). A gzip-compressed file or buffer (first bytes
            ``1f 8b``) is decompressed transparently. Nothing else is accepted: an ``int``
            is not taken as a file descriptor.
        name: how to call the source in error messages (default: the path, or
            ``"<IDX bytes>"`` for a buffer).
        max_bytes: the largest data size (``prod(dims) * itemsize``, zero-length dimensions
            left out) a header may announce; larger is refused before any data is read.

    The header is read first; then at most the announced number of data bytes (plus one, to
    detect trailing data) are read or decompressed, so memory use is bounded by the
    announced size, whatever the size of the file or of its decompressed stream.

    Returns:
        A new, writable ``numpy.ndarray`` of shape ``dims`` (as in the header) and dtype
        uint8, int8, int16, int32, float32 or float64 per the type code, in native byte order.

    Raises:
        TypeError: ``source`` is neither a path nor bytes, ``name`` is not a str, or
            ``max_bytes`` is not an int. ValueError: ``max_bytes`` is not positive.
        IDXError: the content is not exactly one valid IDX file, or it announces more than
            ``max_bytes``; the message names the file and the problem. ``OSError`` (e.g.
            ``FileNotFoundError``) if a path cannot be read.
    """
    _check_arguments(source, name, max_bytes)
    if isinstance(source, _BUFFERS):
        where = name or "<IDX bytes>"
        data = bytes(source)
        return _read_stream(io.BytesIO(data), data[:2], len(data), where, max_bytes)
    where = name or os.fspath(source)
    with open(source, "rb") as f:
        info = os.fstat(f.fileno())
        size = info.st_size if S_ISREG(info.st_mode) else None  # a pipe has no size
        return _read_stream(f, f.peek(2)[:2], size, where, max_bytes)


def _read_stream(f, magic, size, where, max_bytes):
    """Decode the IDX file in the binary file ``f``, decompressing it if ``magic`` is gzip's.
    ``size``: the length of the plain stream when known, else None."""
    if magic != _GZIP_MAGIC:
        return _decode(f, size, where, max_bytes)
    try:
        with gzip.GzipFile(fileobj=f, mode="rb") as g:
            return _decode(g, None, where, max_bytes)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise IDXError(f"{where}: corrupt gzip stream ({type(e).__name__}: {e})") from None


def _read_at_most(f, n):
    """Up to ``n`` bytes of ``f`` (fewer only at its end), read in bounded blocks: nothing
    is allocated for bytes that the stream does not hold."""
    out = bytearray()
    while len(out) < n:
        block = f.read(min(n - len(out), _BLOCK))
        if not block:
            break
        out += block
    return out


def _decode(f, size, where, max_bytes):
    head = _read_at_most(f, 4)
    if len(head) < 4:
        raise IDXError(f"{where}: too short for an IDX header ({len(head)} bytes; the header "
                       f"is at least 4 bytes plus 4 per dimension)")
    if head[0] != 0 or head[1] != 0:
        raise IDXError(f"{where}: bad magic: the first two bytes are {head[0]:#04x} "
                       f"{head[1]:#04x}, must be 0x00 0x00 (not an IDX file?)")
    code, ndim = head[2], head[3]
    if code not in IDX_TYPES:
        known = ", ".join(f"{c:#04x} {dt.name}" for c, dt in IDX_TYPES.items())
        raise IDXError(f"{where}: unknown type code {code:#04x} (known: {known})")
    if ndim == 0:
        raise IDXError(f"{where}: the header declares zero dimensions (at least 1 needed)")
    if ndim > MAX_NDIM:
        raise IDXError(f"{where}: the header declares {ndim} dimensions, more than the "
                       f"{MAX_NDIM} an array can have")
    header = 4 + 4 * ndim
    dim_bytes = _read_at_most(f, 4 * ndim)
    if len(dim_bytes) < 4 * ndim:
        raise IDXError(f"{where}: too short for the IDX header: {4 + len(dim_bytes)} bytes, "
                       f"the header of a {ndim}-dimensional file is {header} bytes")
    dims = struct.unpack(f">{ndim}I", dim_bytes)
    dtype = IDX_TYPES[code]
    expected = math.prod(dims) * dtype.itemsize
    # NumPy must be able to index the shape even when a zero-length dimension empties it
    extent = math.prod(d for d in dims if d) * dtype.itemsize
    if extent > max_bytes:
        raise IDXError(f"{where}: the header announces dims {list(dims)} x {dtype.itemsize}-"
                       f"byte {dtype.name} = {extent} bytes (zero-length dimensions left "
                       f"out), more than max_bytes={max_bytes}")
    if size is not None and size - header != expected:
        _size_mismatch(where, size - header, expected, dims, dtype)
    data = _read_at_most(f, expected + 1)
    if len(data) != expected:
        _size_mismatch(where, len(data) if len(data) < expected else None, expected, dims,
                       dtype)
    array = np.frombuffer(data, dtype=dtype).reshape(dims)  # writable: data is a bytearray
    if not dtype.isnative:
        array = array.byteswap(inplace=True).view(dtype.newbyteorder("="))
    return array


def _size_mismatch(where, got, expected, dims, dtype):
    """Raise the IDXError for ``got`` data bytes (None: more than ``expected``, how many more
    is unknown because the stream was not read to its end)."""
    if got is None:
        got, what = f"more than {expected}", "trailing bytes"
    else:
        what = "truncated" if got < expected else f"{got - expected} trailing bytes"
    raise IDXError(f"{where}: data size {got} bytes does not match the header: dims "
                   f"{list(dims)} x {dtype.itemsize}-byte {dtype.name} = {expected} "
                   f"bytes ({what})")


def encode_idx(array):
    """The bytes of the IDX file holding ``array``.

    Args:
        array: array-like with 1 to `MAX_NDIM` dimensions, each at most ``2**32 - 1``, of dtype
            uint8, int8, int16, int32, float32 or float64 (any byte order). Other dtypes are
            refused rather than converted: cast first (e.g. labels ``.astype(np.uint8)``).

    Returns:
        ``bytes``: header then the data, C order, big-endian.

    Raises:
        IDXError: the array has no dimension or too many, a dimension too large, or a dtype
            IDX cannot hold.
    """
    array = np.asarray(array)
    code = _CODES.get((array.dtype.kind, array.dtype.itemsize))
    if code is None or array.dtype.kind not in "uif":
        raise IDXError(f"cannot write dtype {array.dtype} as IDX (IDX holds uint8, int8, "
                       f"int16, int32, float32 and float64)")
    if array.ndim == 0:
        raise IDXError("cannot write a 0-dimensional array as IDX (at least 1 dimension)")
    if array.ndim > MAX_NDIM:
        raise IDXError(f"cannot write a {array.ndim}-dimensional array as IDX (at most "
                       f"{MAX_NDIM})")
    if any(d > _MAX_DIM for d in array.shape):
        raise IDXError(f"cannot write shape {array.shape} as IDX: dimensions are 32-bit")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    body = np.ascontiguousarray(array, dtype=IDX_TYPES[code]).tobytes()
    return header + body


def write_idx(path, array):
    """Write ``array`` as an IDX file at ``path``, atomically.

    Args:
        path: the file name; if it ends in ``.gz`` the file is gzip-compressed (with no time
            stamp, so the same array gives the same bytes).
        array: as for `encode_idx`: at least 1-D, dtype uint8, int8, int16, int32, float32
            or float64.

    The file is written through `diagnet.tensorfile.atomic_write` (temporary file, fsync,
    rename): ``path`` never holds a partial file.

    Raises:
        IDXError: ``array`` cannot be written as IDX (see `encode_idx`).
    """
    data = encode_idx(array)
    if os.fspath(path).endswith(".gz"):
        buf = io.BytesIO()
        with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as g:
            g.write(data)
        data = buf.getvalue()
    atomic_write(path, lambda f: f.write(data))
