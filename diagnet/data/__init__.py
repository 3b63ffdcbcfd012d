"""Data: datasets and loaders (``diagnet.data``).

* `ArrayDataset`: samples held as NumPy arrays that share their first dimension;
* `DataLoader`: batches as tuples of `diagnet.Tensor` on a device, in an order that is a
  pure function of ``(seed, epoch)``, resumable mid-epoch (``loader``);
* `epoch_order`: that order;
* `RandomShift`: a random translation of each image, drawn per (seed, epoch, batch) so that
  augmented runs stay reproducible, resumable and independent of the world size
  (``augment``; ``DataLoader(..., augment=...)``);
* `collate`: stacks the samples of a per-sample dataset (``__getitem__`` returning tuples of
  fields, as a PyTorch ``Dataset``) into one batch.

Readers of particular data sets live in their own modules of this package:

* `read_idx` / `write_idx`: the IDX file format (``idx``);
* `load_mnist` (uint8 images, int64 labels) and `mnist_arrays` (normalised float images):
  MNIST (``mnist``), whose files are pinned, cached and fetched by ``mnist_files`` (the
  offline source in ``mnist_offline``) through the generic, size-capped, checked downloads
  of ``download``.
"""

from .augment import RandomShift
from .idx import IDXError, read_idx, write_idx
from .loader import ArrayDataset, DataLoader, collate, epoch_order
from .mnist import load_mnist, mnist_arrays

__all__ = ["ArrayDataset", "DataLoader", "RandomShift", "collate", "epoch_order"]
__all__ += ["IDXError", "read_idx", "write_idx", "load_mnist", "mnist_arrays"]
