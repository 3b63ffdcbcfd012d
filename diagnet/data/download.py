"""Checked, cached, atomic downloads: the data-set-independent half of fetching files.

A data set module (`diagnet.data.mnist_files`) pins its files (size and sha256 each) and keeps
them in a cache folder; this module holds what such a module needs and knows nothing of any
data set:

* `download_url`: one HTTP(S) (or ``file://``) body into memory, with a progress bar, a
  timeout and a size cap (`DownloadSizeError` past ``max_bytes``; `gzip_bound` caps a
  compressed file whose data size is pinned);
* `sha256`, `md5`, `sha256_file`, `check_equal` and `check_bytes`: checksums compared with
  pinned values (`ChecksumError` on a mismatch);
* `check_cache_entries` and `verify_cached`: the cache folder's files checked before use (a
  damaged file is removed, with a warning; a directory is never removed);
* `record_sources`: the provenance file (``source.json``) beside the cached files;
* `say`: one line for the user (stderr with progress, else a logger at INFO level).

Files are written with `diagnet.tensorfile.atomic_write`, so a cache never holds half a file.
"""

from __future__ import annotations

import datetime
import hashlib
import http.client
import json
import os
import stat
import sys
import urllib.request
import warnings

from .. import checks
from ..tensorfile import atomic_write

__all__ = ["download_url", "DownloadSizeError", "ChecksumError", "gzip_bound", "sha256", "md5",
           "sha256_file", "check_equal", "check_bytes", "check_cache_entries", "verify_cached",
           "record_sources", "say", "TIMEOUT", "MAX_BYTES", "SOURCE_FILE"]

#: seconds to wait for a server to connect or send the next block
TIMEOUT = 10.0
#: the default cap of `download_url` on a body's size: the body is held in memory
MAX_BYTES = 1 << 30
#: the name of the provenance file in a cache folder
SOURCE_FILE = "source.json"
_BLOCK = 1 << 16  # bytes read at a time


class DownloadSizeError(ValueError):
    """A server announced or sent more bytes than the download's cap (``max_bytes``)."""


class ChecksumError(ValueError):
    """Downloaded or cached bytes do not have the pinned size or checksum."""


# ============================================================================= checksums


def _now():
    """The current UTC time, ISO 8601 to the second (for provenance records)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def sha256(data):
    """The sha256 of ``data`` (bytes), as hex."""
    return hashlib.sha256(data).hexdigest()


def md5(data):
    """The md5 of ``data`` (bytes), as hex: for matching published values, not for security."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def sha256_file(path):
    """The sha256 of the file at ``path``, as hex, read by blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_equal(what, got, expected):
    """Raise `ChecksumError` ("what: got ..., expected ...") unless ``got == expected``."""
    if got != expected:
        raise ChecksumError(f"{what}: got {got}, expected {expected}")


def check_bytes(name, data, pinned, where):
    """Raise `ChecksumError` unless ``data`` (the file ``name``, from ``where``) has the
    ``pinned.size`` and sha256 ``pinned.sha256``."""
    check_equal(f"{where}: size of {name}", len(data), pinned.size)
    check_equal(f"{where}: sha256 of {name}", sha256(data), pinned.sha256)


def gzip_bound(size):
    """A cap on the size of a gzip file whose data has ``size`` bytes: twice the data plus
    64 KiB. No gzip writer comes near it (deflate's worst case adds 5 bytes per 64 KiB
    block, the header a few dozen), so it refuses only a server that sends something else."""
    return 2 * size + (1 << 16)


def say(message, progress, log):
    """One line for the user: on stderr when ``progress`` is true, else ``log.info``."""
    if progress:
        print(message, file=sys.stderr, flush=True)
    else:
        log.info(message)


# ============================================================================== network


def download_url(url, *, timeout=None, progress=True, desc=None, max_bytes=MAX_BYTES):
    """Download ``url`` into memory, with a tqdm progress bar and a size cap.

    Args:
        url: the address.
        timeout: seconds to wait to connect and for each block (default `TIMEOUT`).
        progress: show the bar (on stderr).
        desc: the bar's label (default: the last part of the URL).
        max_bytes: the most bytes the body may have (default `MAX_BYTES`): a larger
            ``Content-Length`` is refused before the body is read, and reading stops at the
            first block past the cap when the server announces no length (or lies).

    Returns:
        ``bytes``: the body.

    Raises:
        DownloadSizeError (a ValueError): the body is larger than ``max_bytes``.
        TypeError / ValueError: ``max_bytes`` is not an int >= 1 (checked before connecting).
        OSError (``urllib.error.URLError``, ``TimeoutError``, ...) or
        ``http.client.HTTPException`` when the server cannot be reached or the transfer fails
        (a body shorter than its ``Content-Length`` included).
    """
    from tqdm.auto import tqdm

    max_bytes = checks.integer("max_bytes", max_bytes, 1)
    timeout = TIMEOUT if timeout is None else timeout
    request = urllib.request.Request(url, headers={"User-Agent": "diagnet"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        if total is not None and total > max_bytes:
            raise DownloadSizeError(f"{url}: the server announces {total} bytes, more than "
                                    f"max_bytes={max_bytes}")
        chunks, received = [], 0
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=desc or url.rsplit("/", 1)[-1], disable=not progress,
                  file=sys.stderr) as bar:
            while True:
                block = response.read(_BLOCK)
                if not block:
                    break
                received += len(block)
                if received > max_bytes:
                    raise DownloadSizeError(f"{url}: more than max_bytes={max_bytes} bytes")
                chunks.append(block)
                bar.update(len(block))
    data = b"".join(chunks)
    if total is not None and len(data) != total:
        raise http.client.IncompleteRead(data, total - len(data))
    return data


# ================================================================================ the cache


def check_cache_entries(root, names, what):
    """Raise if an entry ``names`` (and `SOURCE_FILE`) of the cache folder ``root`` is
    something other than a file; ``what`` names the cache in messages (``"MNIST cache"``).

    Called before anything is said or changed: a directory of the user's is never removed.

    Raises:
        IsADirectoryError: a directory where a file belongs.
        OSError: another non-file (a FIFO, a device) where a file belongs.
    """
    for name in (*names, SOURCE_FILE):
        path = os.path.join(root, name)
        try:
            mode = os.stat(path).st_mode  # follows symbolic links
        except FileNotFoundError:
            continue  # missing (or a dangling link): fetched, the link replaced by the file
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(f"{what}: {path} is a directory where the file {name} "
                                    f"is expected; move it away (directories are never removed)")
        if not stat.S_ISREG(mode):
            raise OSError(f"{what}: {path} is not a regular file where the file {name} is "
                          f"expected; move it away")


def verify_cached(path, pinned, what):
    """True if the file at ``path`` has the ``pinned.size`` and sha256 ``pinned.sha256``.

    A file that does not match is removed, with a warning naming ``what`` (the cache), and
    False returned; so is False for a missing file. ``path`` is missing or a file (see
    `check_cache_entries`); for a symbolic link, the link is removed, never its target.

    Raises:
        OSError: the damaged file cannot be removed (the message says to remove it by hand).
    """
    if not os.path.exists(path):
        return False
    size = os.path.getsize(path)
    problem = None
    if size != pinned.size:
        problem = f"size {size} bytes, expected {pinned.size}"
    else:
        digest = sha256_file(path)
        if digest != pinned.sha256:
            problem = f"sha256 {digest}, expected {pinned.sha256}"
    if problem is None:
        return True
    where, action = path, "removing it"
    if os.path.islink(path):
        where, action = f"{path} (a symbolic link to {os.path.realpath(path)})", "removing the link"
    try:
        os.remove(path)
    except OSError as e:
        raise type(e)(f"{what}: {where} is damaged ({problem}) and cannot be removed "
                      f"({e}); remove it by hand") from e
    warnings.warn(f"{what}: {where} is damaged ({problem}); {action} and fetching it "
                  f"again", stacklevel=4)
    return False


def record_sources(root, fetched, dataset):
    """Update the provenance file `SOURCE_FILE` in ``root`` with the files just written.

    Args:
        root: the cache folder.
        fetched: ``{file name: (source description, spec)}``, ``spec`` with ``size``,
            ``sha256`` and ``gz_md5`` attributes (the pinned values the file matched).
        dataset: the data set's name, for a new record (``"mnist"``).

    A missing or unreadable record is started afresh; it is written atomically.
    """
    path = os.path.join(root, SOURCE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
            raise ValueError
    except (OSError, ValueError):
        record = {"dataset": dataset, "files": {}}
    when = _now()
    for name, (source, fspec) in fetched.items():
        record["files"][name] = {"source": source, "fetched": when, "size": fspec.size,
                                 "sha256": fspec.sha256, "gz_md5": fspec.gz_md5}
    record["updated"] = when
    record["sources"] = sorted({source for source, _ in fetched.values()})
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
