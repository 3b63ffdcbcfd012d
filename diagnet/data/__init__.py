"""Data: datasets and loaders (``diagnet.data``).

* `ArrayDataset`: samples held as NumPy arrays that share their first dimension;
* `DataLoader`: batches as tuples of `diagnet.Tensor` on a device, in an order that is a
  pure function of ``(seed, epoch)``, resumable mid-epoch (``loader``);
* `epoch_order`: that order.

Readers of particular data sets live in their own modules of this package.
"""

from .loader import ArrayDataset, DataLoader, epoch_order

__all__ = ["ArrayDataset", "DataLoader", "epoch_order"]
