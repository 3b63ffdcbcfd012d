"""Random data augmentation whose draws are a pure function of (seed, epoch, batch).

An augmentation given to `diagnet.data.DataLoader` (``augment=``) changes the input images of
every training batch, differently in every epoch. So that a run stays reproducible,
resumable mid-epoch and identical across data-parallel ranks, it does not draw from a
shared generator: the loader makes a fresh ``numpy.random.Generator`` for each *global*
batch from ``(seed, epoch, batch index)``, the augmentation draws one set of parameters per
sample of that global batch (`RandomShift.draw`), and each rank applies the rows of its own
share (`RandomShift.apply`). Whatever the number of ranks, sample ``k`` of global batch
``i`` of epoch ``e`` is changed in the same way, and a resumed run redraws exactly what the
uninterrupted run drew.

An augmentation is an object with three methods:

* ``draw(rng, n)``: the parameters of ``n`` samples, an array whose first dimension is ``n``;
* ``apply(images, params)``: a new array of ``images``' shape and dtype (``images`` is a
  host NumPy array whose first dimension matches ``params``');
* ``describe()``: a JSON-able dict of its settings (recorded with the loader's settings and
  compared on resume).
"""

from __future__ import annotations

import numpy as np

from .. import checks

__all__ = ["RandomShift"]


class RandomShift:
    """Translate each image by a random whole number of pixels, filling what comes in.

    Each sample gets its own shift ``(dy, dx)``, both drawn uniformly from
    ``[-max_shift, max_shift]``: output pixel ``[..., r, c]`` is input pixel
    ``[..., r - dy, c - dx]`` where that lies inside the image, and ``fill`` elsewhere. A
    shift of a few pixels is the usual augmentation for MNIST-sized digits, which the
    dataset centres in their 28 x 28 frame: it asks a model to recognise a digit wherever it
    sits, which a patch-based model such as the ViT otherwise learns only for the centred
    position.

    Args:
        max_shift: the largest shift in pixels along each axis, an int >= 0 (0 leaves the
            images as they are).
        fill: the value of the pixels that come in from outside, a real number; for
            normalised images, the value a black pixel has after normalisation (e.g.
            ``-MNIST_MEAN / MNIST_STD``).

    Images are arrays ``(N, ..., H, W)``: the shift applies to the last two axes, the same
    for all channels of a sample.
    """

    def __init__(self, max_shift, fill=0.0):
        self.max_shift = checks.integer("max_shift", max_shift, 0)
        if isinstance(fill, bool) or not isinstance(fill, (int, float, np.integer, np.floating)):
            raise TypeError(f"fill must be a real number; got {type(fill).__name__}")
        if not np.isfinite(fill):
            raise ValueError(f"fill must be finite; got {fill}")
        self.fill = float(fill)

    def draw(self, rng, n):
        """The shifts of ``n`` samples: an int64 array ``(n, 2)`` of ``(dy, dx)`` rows."""
        s = self.max_shift
        return rng.integers(-s, s + 1, size=(n, 2), dtype=np.int64)

    def apply(self, images, shifts):
        """``images`` ``(N, ..., H, W)`` shifted by ``shifts`` ``(N, 2)`` (from `draw`): a new
        array of the same shape and dtype."""
        images = np.asarray(images)
        shifts = np.asarray(shifts)
        if images.ndim < 3:
            raise ValueError(f"images must be (N, ..., H, W) with at least 3 dimensions; got "
                             f"shape {images.shape}")
        if shifts.shape != (images.shape[0], 2):
            raise ValueError(f"shifts must have shape ({images.shape[0]}, 2), one (dy, dx) row "
                             f"per image; got {shifts.shape}")
        out = np.full_like(images, self.fill)
        height, width = images.shape[-2:]
        # one slice assignment per distinct shift: at most (2s + 1)**2 of them per batch
        distinct, which = np.unique(shifts, axis=0, return_inverse=True)
        for j, (dy, dx) in enumerate(distinct.tolist()):
            rows = np.flatnonzero(which.reshape(-1) == j)
            if abs(dy) >= height or abs(dx) >= width:
                continue  # the whole image moved out: only fill remains
            src_r, dst_r = _window(dy, height)
            src_c, dst_c = _window(dx, width)
            out[rows, ..., dst_r, dst_c] = images[rows, ..., src_r, src_c]
        return out

    def describe(self):
        """The settings, as a JSON-able dict."""
        return {"kind": "RandomShift", "max_shift": self.max_shift, "fill": self.fill}

    def __repr__(self):
        return f"RandomShift(max_shift={self.max_shift}, fill={self.fill!r})"


def _window(shift, size):
    """The source and destination slices of one axis moved by ``shift`` (|shift| < size)."""
    if shift >= 0:
        return slice(0, size - shift), slice(shift, size)
    return slice(-shift, size), slice(0, size + shift)
