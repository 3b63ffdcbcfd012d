"""In-memory datasets and a reproducible, resumable batch loader.

* `ArrayDataset(*arrays)`: NumPy arrays that share their first dimension (the samples),
  e.g. images ``(N, 28, 28)`` uint8 and labels ``(N,)`` int64.
* `DataLoader(dataset, batch_size, ...)`: iterates over batches as tuples of
  `diagnet.Tensor` on a device.
* `collate(samples)`: stacks the samples of a per-sample dataset (one that, like
  ``torch.utils.data.Dataset``, only answers ``dataset[k]`` for an int ``k``) into a batch.

Reproducibility. The order of epoch ``e`` is a pure function of ``(seed, e)``:
``numpy.random.default_rng([seed, e]).permutation(N)`` when shuffling, ``arange(N)``
otherwise. It never draws from the global generator (`diagnet.random`) or any other shared
state, so a run and its resumption see the same order, and the order of one epoch does not
depend on how many epochs came before it.

Resumption. `DataLoader.state_dict` is ``{"epoch": e, "batch": i}``: the epoch and the
number of its batches already handed out. After `DataLoader.load_state_dict`, the next
iteration yields batches ``i, i+1, ...`` of epoch ``e``, exactly those that an uninterrupted
iteration would have yielded next; earlier batches are skipped without being gathered.

Sharding. ``DataLoader(..., rank=r, world_size=W)`` gives process ``r`` of a data-parallel
job of ``W`` its share of every *global* batch: batch ``i`` of the single-process order,
``order[i*B:(i+1)*B]`` (``B`` is ``batch_size``, the global batch), is split into ``W``
contiguous parts as ``numpy.array_split`` splits it (sizes differ by at most one, the first
parts larger), and rank ``r`` takes part ``r``. As with PyTorch's ``DistributedSampler``
every rank sees a different part of one epoch order, but the split is per global batch and
nothing is padded or repeated: the union of the ranks' batches is exactly the
single-process batch, in order, so ``W`` ranks train on the same global batches as one
process. Epochs, positions (`DataLoader.state_dict`) and `DataLoader.describe` count global
batches and do not mention the world size, so a run saved by 2 ranks resumes on 1.

Augmentation. ``DataLoader(..., augment=RandomShift(2))`` changes the inputs of every batch
with draws that are a pure function of ``(seed, epoch, batch index)``, made for the whole
global batch before it is split across ranks (`diagnet.data.augment`).

Cost. A batch of an `ArrayDataset` is gathered with one fancy index per array
(``array[indices]``), never with a Python loop over samples, and copied to the device once.
Any other dataset is asked for one sample at a time, and `collate` stacks the samples.
"""

from __future__ import annotations

import numpy as np

from .. import backend, checks
from ..autograd import DEFAULT_DTYPE, Tensor

__all__ = ["ArrayDataset", "DataLoader", "epoch_order", "collate"]

#: the last word of the seed of each batch's augmentation generator, which keeps its stream
#: apart from the epoch order's ``default_rng([seed, epoch])``
_AUGMENT_STREAM = 0x61756700

# array kinds a Tensor can hold: bool, signed and unsigned integers, floats
_NUMERIC_KINDS = "biuf"


def _flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__} {value!r}")
    return bool(value)


class ArrayDataset:
    """Samples stored as NumPy arrays that share their first dimension.

    Args:
        *arrays: one or more ``numpy.ndarray`` of at least one dimension, all with the same
            length ``N`` along axis 0 and a numeric dtype (bool, integer or float). Sample
            ``k`` is ``(arrays[0][k], arrays[1][k], ...)``. The arrays are kept as they are
            (not copied).

    ``len(dataset)`` is ``N``. ``dataset[k]`` for an int ``k`` is the tuple of rows
    ``(a[k] for a in arrays)``; a slice or an integer index array gives the tuple of
    gathered arrays, each ``(len(index), *a.shape[1:])`` with its array's dtype (what
    `DataLoader` uses: one fancy index per array).

    Raises:
        ValueError: no arrays, a 0-d array, or lengths that differ (all shapes are named).
        TypeError: an argument that is not a NumPy array, or a non-numeric dtype.
    """

    def __init__(self, *arrays):
        if not arrays:
            raise ValueError("ArrayDataset needs at least one array")
        for i, a in enumerate(arrays):
            if not isinstance(a, np.ndarray):
                raise TypeError(f"ArrayDataset: argument {i} must be a numpy.ndarray; got "
                                f"{type(a).__name__} (convert it with numpy.asarray)")
            if a.ndim == 0:
                raise ValueError(f"ArrayDataset: argument {i} is 0-d; every array needs a "
                                 "first (sample) dimension")
            if a.dtype.kind not in _NUMERIC_KINDS:
                raise TypeError(f"ArrayDataset: argument {i} has dtype {a.dtype}; only bool, "
                                "integer and float arrays can become tensors")
        lengths = {a.shape[0] for a in arrays}
        if len(lengths) != 1:
            shapes = ", ".join(str(a.shape) for a in arrays)
            raise ValueError(f"ArrayDataset: the arrays must have the same length along axis 0 "
                             f"(the samples); got shapes {shapes}")
        self.arrays = tuple(arrays)

    def __len__(self):
        return self.arrays[0].shape[0]

    def __getitem__(self, index):
        return tuple(a[index] for a in self.arrays)

    def __repr__(self):
        shapes = ", ".join(f"{a.dtype}{list(a.shape)}" for a in self.arrays)
        return f"ArrayDataset({shapes})"


def epoch_order(n, seed, epoch, shuffle=True):
    """The sample order of one epoch: an int64 ``(n,)`` permutation of ``range(n)``.

    ``numpy.random.default_rng([seed, epoch]).permutation(n)`` when ``shuffle``, else
    ``arange(n)``: a pure function of its arguments (no global random state).
    """
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64, copy=False)


def collate(samples):
    """Stack the samples of a per-sample dataset into one array per field.

    Args:
        samples: a non-empty list of ``B`` samples, each a tuple or list of fields, or a
            single field; all with the same number of fields. A field is a NumPy array or
            scalar, a Python int, float or bool, a `Tensor`, or anything ``numpy.asarray``
            makes a numeric array of (nested lists, a CPU ``torch.Tensor``).

    Returns:
        A tuple with one array per field, ``(B, *field_shape)``: a CuPy array where the
        field holds CuPy arrays or CUDA tensors, else a NumPy array. Arrays, NumPy scalars
        and tensors keep their dtype; Python ints become int64, floats float32 and bools
        bool, as in `Tensor`.

    Raises:
        TypeError: a sample is a dict (batches are tuples: give the fields in a tuple), or a
            field is not numeric.
        ValueError: samples with different numbers of fields, or a field whose shape differs
            between samples.
    """
    rows = [_fields(k, sample) for k, sample in enumerate(samples)]
    width = len(rows[0])
    for k, row in enumerate(rows):
        if len(row) != width:
            raise ValueError(f"collate: sample {k} of the batch has {len(row)} field(s), "
                             f"sample 0 has {width}")
    return tuple(_stack(j, [row[j] for row in rows]) for j in range(width))


def _fields(k, sample):
    """The fields of sample ``k`` of a batch, as a tuple (a lone field makes a 1-tuple)."""
    if isinstance(sample, dict):
        raise TypeError(f"collate: sample {k} of the batch is a dict; a per-sample dataset "
                        f"must give a tuple of fields (e.g. (x, y)) or a single field")
    return tuple(sample) if isinstance(sample, (tuple, list)) else (sample,)


def _stack(j, values):
    """Field ``j`` of every sample of a batch, stacked along a new first axis."""
    values = [backend.unwrap(v) for v in values]  # tensors -> their arrays
    kinds = {type(v) for v in values}
    if kinds == {float}:
        return np.array(values, dtype=DEFAULT_DTYPE)
    if kinds == {int}:
        return np.array(values, dtype=np.int64)
    xp = backend.get_array_module(*values)
    arrays = [xp.asarray(v) for v in values]
    for k, a in enumerate(arrays):
        if a.shape != arrays[0].shape:
            raise ValueError(f"collate: field {j} of the batch's samples does not stack: "
                             f"sample 0 has shape {arrays[0].shape}, sample {k} {a.shape}")
    out = xp.stack(arrays)
    if out.dtype.kind not in _NUMERIC_KINDS:
        raise TypeError(f"collate: field {j} of the batch's samples ({type(values[0]).__name__}) "
                        f"stacks to dtype {out.dtype}; only bool, integer and float fields can "
                        "become tensors")
    return out


class DataLoader:
    """Batches of a dataset as tuples of `Tensor`, in a reproducible and resumable order.

    Args:
        dataset: an `ArrayDataset` (a batch is gathered with one ``dataset[indices]``), or
            a per-sample dataset: any other object with ``len()`` whose ``dataset[k]`` for
            an int ``k`` in ``range(len(dataset))`` gives one sample, a tuple of fields
            ``(x, y, ...)`` or a single field, as ``torch.utils.data.Dataset`` does; the
            ``B`` samples of a batch are fetched one by one and stacked field by field
            (see `collate`).
        batch_size: samples per batch ``B`` (a positive int).
        shuffle: visit the samples in a new random order every epoch (see `epoch_order`);
            False keeps the dataset's order.
        seed: a non-negative int; with ``epoch``, it fixes the order of every epoch.
        drop_last: drop the last batch of an epoch when it has fewer than ``B`` samples.
        device: ``"cpu"`` or ``"cuda"``; None for the default device (resolved here, once).
        transform: optional callable ``transform(*tensors) -> tuple of tensors`` applied to
            each batch after it is on the device (e.g. ``lambda x, y: (x.astype("float32")
            / 255, y)``, which moves uint8 images to the GPU at a quarter of the float32
            size). A single returned `Tensor` becomes a 1-tuple. With sharding it sees this
            rank's share of the batch.
        augment: optional augmentation of the first array (the inputs) of every batch,
            such as `diagnet.data.augment.RandomShift`: an object with ``draw(rng, n)``,
            ``apply(images, params)`` and ``describe()`` (see that module). Its random
            draws come from a generator made for each global batch from ``(seed, epoch,
            batch index)``, one draw per sample of the global batch, so they are
            reproducible, resumable and the same whatever the world size. Applied on the
            host, before the batch moves to ``device`` and before ``transform``.
        rank: keyword only; this process's rank ``r``, an int in ``[0, world_size)``.
        world_size: keyword only; the number of processes ``W`` that share every batch (an
            int >= 1; 1, the default, does not shard).
        micro_batch: keyword only; None, or a positive int ``M``: every global batch is
            trained as consecutive micro-batches of ``M`` samples (the last may be
            smaller), each with its own forward and backward, and their gradients are
            summed in one fixed order, so that the run's result does not depend on the
            number of ranks (the `Trainer`'s exact mode, `diagnet.train.microbatch`). With
            sharding each rank takes whole micro-batches.

    Iterating yields, for each batch, a tuple with one `Tensor` per dataset array (or per
    field of a sample), of shape ``(B, *array.shape[1:])`` (the last batch of an epoch may
    be smaller unless ``drop_last``), on ``device``, without gradient. Dtypes are kept:
    float32/float64 stay as they are, integer labels stay int64 (and int32 stays int32);
    only float16 becomes float32, which tensors do not support. Python scalars in samples
    become int64, float32 or bool. Order, ``drop_last``, seeding and resumption are the same
    for both kinds of dataset; a resumed per-sample dataset is not asked for the samples of
    the batches it skips.

    Epochs. ``len(loader)`` is the number of batches per epoch. An iteration covers the
    current epoch (`epoch`) from its next batch; when it runs to the end, the loader moves
    on to the next epoch, so ``for e in range(E): for batch in loader: ...`` sees ``E``
    different orders. `set_epoch` chooses the epoch explicitly (as with PyTorch's
    ``DistributedSampler``); the `Trainer` calls it at the start of every epoch. Breaking
    out of an iteration leaves the position where it was (see `state_dict`); a new
    iteration then starts again at batch 0 of the same epoch, unless `load_state_dict` set a
    position. One iteration at a time: two simultaneous iterators share the position.

    Sharding. With ``world_size`` ``W > 1`` each batch is this rank's part of a global batch
    of ``batch_size`` samples: the global batch is split into ``W`` contiguous parts with
    ``numpy.array_split``'s sizes and rank ``r`` gets part ``r`` (see the module notes). It
    works like PyTorch's ``DistributedSampler``, but per global batch and without padding or
    repeated samples: the ranks' batches together are the single-process batches, and the
    union of the shards is the single-process epoch. Every rank yields ``len(loader)``
    batches per epoch (the number of global batches); `state_dict`, `load_state_dict` and
    `set_epoch` count global batches and `describe` holds no rank or world size, so a state
    saved by ``W`` ranks loads on any other number. A per-sample dataset is asked only for
    this rank's samples. Each rank must get at least one sample of every batch, so every
    global batch, the last one included, needs ``W`` samples or more. With ``micro_batch``
    ``M`` the parts are whole micro-batches: the ``ceil(n / M)`` micro-batches of a global
    batch of ``n`` samples are split with ``numpy.array_split``'s sizes, and every global
    batch needs ``W`` micro-batches or more.

    Raises:
        TypeError / ValueError: invalid arguments, a dataset that gives no batch at all
            (empty, or fewer than ``batch_size`` samples with ``drop_last``), or a global
            batch with fewer samples (micro-batches with ``micro_batch``) than
            ``world_size`` (some rank would get none).
    """

    def __init__(self, dataset, batch_size, shuffle=False, seed=0, drop_last=False, device=None,
                 transform=None, augment=None, *, rank=0, world_size=1, micro_batch=None):
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError(f"dataset must support len() and indexing; got "
                            f"{type(dataset).__name__}")
        self.dataset = dataset
        self.batch_size = checks.integer("batch_size", batch_size, 0)
        if self.batch_size == 0:
            raise ValueError("batch_size must be a positive int; got 0")
        self.shuffle = _flag("shuffle", shuffle)
        self.seed = checks.integer("seed", seed, 0)
        self.drop_last = _flag("drop_last", drop_last)
        self.device = backend.resolve_device(device)
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable or None; got {type(transform).__name__}")
        self.transform = transform
        for method in ("draw", "apply", "describe"):
            if augment is not None and not callable(getattr(augment, method, None)):
                raise TypeError(f"augment must be None or an augmentation with draw(), apply() "
                                f"and describe() methods (e.g. RandomShift); got "
                                f"{type(augment).__name__}, which has no {method}()")
        self.augment = augment
        self.world_size = checks.integer("world_size", world_size, 1)
        self.rank = checks.integer("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"invalid rank={self.rank}: must be < world_size={self.world_size}")
        self.micro_batch = (None if micro_batch is None
                            else checks.positive_int("micro_batch", micro_batch))
        self._per_sample = not isinstance(dataset, ArrayDataset)
        self.num_samples = len(dataset)
        if len(self) == 0:
            raise ValueError(f"DataLoader: no batch to give: the dataset has {self.num_samples} "
                             f"samples, batch_size={self.batch_size}, drop_last={self.drop_last}")
        self._check_shares()
        self.epoch = 0
        self.batch = 0           # batches of `epoch` handed out by the current iteration
        self._resume_at = None   # set by load_state_dict: where the next iteration starts

    def __len__(self):
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    @property
    def sharded(self):
        """True when each batch is split across ``world_size > 1`` ranks."""
        return self.world_size > 1

    def _check_shares(self):
        """Refuse a setting where some global batch leaves a rank without samples (without
        a micro-batch, with ``micro_batch``)."""
        ranks = self.world_size
        unit, what = ((1, "samples") if self.micro_batch is None
                      else (self.micro_batch, f"micro-batches of {self.micro_batch}"))
        units = -(-self.batch_size // unit)
        last = 0 if self.drop_last else self.num_samples % self.batch_size
        last_units = -(-last // unit)
        if units < ranks:
            problem = f"a global batch has at most {units} {what}"
            fix = (f"use a batch_size of at least {ranks * unit}" if unit == 1 else
                   f"use a batch_size of at least {ranks * unit}, or a smaller micro_batch")
        elif 0 < last_units < ranks:
            problem = f"the last global batch has {last} sample(s), {last_units} {what}"
            fix = ("use drop_last=True, or a batch_size that leaves a last batch of at least "
                   f"{(ranks - 1) * unit + 1} samples")
        else:
            return
        raise ValueError(
            f"DataLoader: with world_size={ranks} every global batch needs at least {ranks} "
            f"{what} (one per rank), but {problem} ({self.num_samples} samples, "
            f"batch_size={self.batch_size}, drop_last={self.drop_last}): {fix}")

    # ------------------------------------------------------------------ epochs and position
    def set_epoch(self, epoch):
        """Make ``epoch`` (a non-negative int) the current epoch, from its first batch."""
        self.epoch = checks.integer("epoch", epoch, 0)
        self.batch = 0
        self._resume_at = None

    def state_dict(self):
        """``{"epoch": e, "batch": i}``: batches ``0..i-1`` of epoch ``e`` were handed out.

        Taken while a batch is being used, it counts that batch as handed out; after an
        iteration ran to its end it is ``{"epoch": e + 1, "batch": 0}``.
        """
        return {"epoch": self.epoch, "batch": self.batch}

    def check_state_dict(self, state):
        """Raise (TypeError/ValueError/KeyError) if `load_state_dict` would refuse ``state``."""
        if not isinstance(state, dict):
            raise TypeError(f"DataLoader state must be a dict; got {type(state).__name__}")
        if set(state) != {"epoch", "batch"}:
            raise KeyError(f"DataLoader state must have exactly the keys 'epoch' and 'batch'; "
                           f"got {sorted(state)}")
        checks.integer("epoch", state["epoch"], 0)
        batch = checks.integer("batch", state["batch"], 0)
        if batch > len(self):
            raise ValueError(f"DataLoader state: batch {batch} is past the end of an epoch of "
                             f"{len(self)} batches (was it saved with another batch_size or "
                             "dataset?)")

    def load_state_dict(self, state):
        """Resume at ``state``: the next iteration yields batches ``state["batch"]``, ... of
        epoch ``state["epoch"]``."""
        self.check_state_dict(state)
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self._resume_at = self.batch

    def describe(self):
        """The settings that fix the batches, as a JSON-able dict (for logs and checks)."""
        settings = {"samples": self.num_samples, "batch_size": self.batch_size,
                    "batches": len(self), "shuffle": self.shuffle, "seed": self.seed,
                    "drop_last": self.drop_last}
        if self.augment is not None:  # absent without one: older runs' settings still match
            settings["augment"] = self.augment.describe()
        if self.micro_batch is not None:  # the same
            settings["micro_batch"] = self.micro_batch
        return settings

    # ------------------------------------------------------------------ iteration
    def __iter__(self):
        # The start is read now, not on the first next(): iter() after load_state_dict
        # resumes even if the generator body has not run yet.
        start = self._resume_at if self._resume_at is not None else 0
        self._resume_at = None
        self.batch = start
        return self._batches(self.epoch, start)

    def _batches(self, epoch, start):
        order = epoch_order(self.num_samples, self.seed, epoch, self.shuffle)
        for i in range(start, len(self)):
            indices = order[i * self.batch_size:(i + 1) * self.batch_size]
            params = None
            if self.augment is not None:
                # drawn for the global batch, then cut like the indices: every world size
                # changes sample k of batch i the same way
                rng = np.random.default_rng([self.seed, epoch, i, _AUGMENT_STREAM])
                params = self.augment.draw(rng, len(indices))
            if self.world_size > 1:
                first, stop = self._share_bounds(len(indices))
                indices = indices[first:stop]
                params = None if params is None else params[first:stop]
            arrays = self._gather(indices)
            if params is not None:
                arrays = self._augmented(arrays, params)
            batch = self._to_tensors(arrays)
            self.batch = i + 1   # counted as handed out while the consumer uses it
            yield batch
        self.epoch, self.batch = epoch + 1, 0

    def _share_bounds(self, n):
        """``(start, stop)`` of this rank's contiguous part of a global batch of ``n``
        samples: part ``rank`` of ``numpy.array_split(range(n), world_size)``, or with
        ``micro_batch`` ``M`` the samples of part ``rank`` of its ``ceil(n / M)``
        micro-batches split so."""
        unit = self.micro_batch or 1
        size, larger = divmod(-(-n // unit), self.world_size)
        start = self.rank * size + min(self.rank, larger)
        stop = start + size + (self.rank < larger)
        return start * unit, min(stop * unit, n)

    def _augmented(self, arrays, params):
        """``arrays`` with the first one changed by the augmentation's ``params``."""
        if not isinstance(arrays, tuple):
            arrays = (arrays,)
        images = arrays[0]
        if not isinstance(images, np.ndarray):
            raise TypeError(f"augment works on host NumPy arrays; the dataset's first field is "
                            f"a {type(images).__name__}")
        return (self.augment.apply(images, params),) + arrays[1:]

    def _gather(self, indices):
        if self._per_sample:
            return collate([self.dataset[k] for k in indices.tolist()])
        return self.dataset[indices]

    def _to_tensors(self, arrays):
        if not isinstance(arrays, tuple):
            arrays = (arrays,)
        # Tensor() copies host arrays to the GPU once; on the CPU the gathered array is used
        # as it is (fancy indexing already made a fresh copy)
        batch = tuple(Tensor(a, device=self.device) for a in arrays)
        if self.transform is not None:
            batch = self.transform(*batch)
            if isinstance(batch, Tensor):
                batch = (batch,)
            batch = tuple(batch)
        return batch

    def __repr__(self):
        shard = f", rank={self.rank}, world_size={self.world_size}" if self.sharded else ""
        if self.micro_batch is not None:
            shard = f", micro_batch={self.micro_batch}" + shard
        augment = f", augment={self.augment!r}" if self.augment is not None else ""
        return (f"DataLoader({self.dataset!r}, batch_size={self.batch_size}, "
                f"shuffle={self.shuffle}, seed={self.seed}, drop_last={self.drop_last}, "
                f"device={self.device!r}{augment}{shard})")
