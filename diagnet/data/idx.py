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
  file's dtype in native byte order, shape ``dims``.
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

import numpy as np

from ..tensorfile import atomic_write

__all__ = ["IDXError", "read_idx", "write_idx", "encode_idx", "IDX_TYPES"]

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
_MAX_DIM = 2**32 - 1


class IDXError(ValueError):
    """A file or buffer is not a valid IDX file (or not a valid gzip stream around one), or an
    array cannot be written as one. The message names the file and the problem."""


def _describe(source, name):
    if name is not None:
        return str(name)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<IDX bytes>"
    return os.fspath(source) if not isinstance(source, int) else str(source)


def _gunzip(data, where):
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise IDXError(f"{where}: corrupt gzip stream ({type(e).__name__}: {e})") from None


def read_idx(source, *, name=None):
    """Read one IDX file into a NumPy array.

    Args:
        source: a file name (``str`` or path-like) or the file's content (``bytes``,
            ``bytearray`` or ``memoryview``). A gzip-compressed file or buffer (first bytes
            ``1f 8b``) is decompressed transparently.
        name: how to call the source in error messages (default: the path, or
            ``"<IDX bytes>"`` for a buffer).

    Returns:
        A new, writable ``numpy.ndarray`` of shape ``dims`` (as in the header) and dtype
        uint8, int8, int16, int32, float32 or float64 per the type code, in native byte order.

    Raises:
        IDXError: the content is not exactly one valid IDX file; the message names the file
            and the problem. ``OSError`` (e.g. ``FileNotFoundError``) if a path cannot be read.
    """
    where = _describe(source, name)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        with open(source, "rb") as f:
            data = f.read()
    if data[:2] == _GZIP_MAGIC:
        data = _gunzip(data, where)
    return _decode(data, where)


def _decode(data, where):
    n = len(data)
    if n < 4:
        raise IDXError(f"{where}: too short for an IDX header ({n} bytes; the header is at "
                       f"least 4 bytes plus 4 per dimension)")
    if data[0] != 0 or data[1] != 0:
        raise IDXError(f"{where}: bad magic: the first two bytes are {data[0]:#04x} "
                       f"{data[1]:#04x}, must be 0x00 0x00 (not an IDX file?)")
    code, ndim = data[2], data[3]
    if code not in IDX_TYPES:
        known = ", ".join(f"{c:#04x} {dt.name}" for c, dt in IDX_TYPES.items())
        raise IDXError(f"{where}: unknown type code {code:#04x} (known: {known})")
    if ndim == 0:
        raise IDXError(f"{where}: the header declares zero dimensions (at least 1 needed)")
    header = 4 + 4 * ndim
    if n < header:
        raise IDXError(f"{where}: too short for the IDX header: {n} bytes, the header of a "
                       f"{ndim}-dimensional file is {header} bytes")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = IDX_TYPES[code]
    expected = math.prod(dims) * dtype.itemsize
    got = n - header
    if got != expected:
        what = "truncated" if got < expected else f"{got - expected} trailing bytes"
        raise IDXError(f"{where}: data size {got} bytes does not match the header: dims "
                       f"{list(dims)} x {dtype.itemsize}-byte {dtype.name} = {expected} "
                       f"bytes ({what})")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=True)


def encode_idx(array):
    """The bytes of the IDX file holding ``array``.

    Args:
        array: array-like with at least one dimension, each at most ``2**32 - 1``, of dtype
            uint8, int8, int16, int32, float32 or float64 (any byte order). Other dtypes are
            refused rather than converted: cast first (e.g. labels ``.astype(np.uint8)``).

    Returns:
        ``bytes``: header then the data, C order, big-endian.

    Raises:
        IDXError: the array has no dimension, a dimension too large, or a dtype IDX cannot
            hold.
    """
    array = np.asarray(array)
    code = _CODES.get((array.dtype.kind, array.dtype.itemsize))
    if code is None or array.dtype.kind not in "uif":
        raise IDXError(f"cannot write dtype {array.dtype} as IDX (IDX holds uint8, int8, "
                       f"int16, int32, float32 and float64)")
    if array.ndim == 0:
        raise IDXError("cannot write a 0-dimensional array as IDX (at least 1 dimension)")
    if array.ndim > 255:
        raise IDXError(f"cannot write a {array.ndim}-dimensional array as IDX (at most 255)")
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
