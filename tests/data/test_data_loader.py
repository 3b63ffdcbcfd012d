"""`diagnet.data`: ArrayDataset and DataLoader (order, batches, dtypes, resumption, errors)."""

from __future__ import annotations

import numpy as np
import pytest

import diagnet
from diagnet import Tensor
from diagnet.data import ArrayDataset, DataLoader, epoch_order

N, D, C = 50, 4, 3


def make_data(n=N):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, D)).astype(np.float32)
    y = rng.integers(0, C, size=n).astype(np.int64)
    ids = np.arange(n, dtype=np.int64)  # which samples a batch holds
    return x, y, ids


def ids_of(loader):
    """The sample ids of every batch of one iteration (the last array is the id column)."""
    return [batch[-1].numpy().tolist() for batch in loader]


# ----------------------------------------------------------------------------- ArrayDataset


def test_array_dataset_len_and_indexing():
    x, y, _ = make_data()
    ds = ArrayDataset(x, y)
    assert len(ds) == N
    row = ds[3]
    assert isinstance(row, tuple) and len(row) == 2
    np.testing.assert_array_equal(row[0], x[3])
    assert row[1] == y[3]
    gathered = ds[np.array([4, 1, 4])]
    np.testing.assert_array_equal(gathered[0], x[[4, 1, 4]])
    np.testing.assert_array_equal(gathered[1], y[[4, 1, 4]])
    assert gathered[1].dtype == np.int64


@pytest.mark.parametrize("args, exc, match", [
    ((), ValueError, "at least one array"),
    (([1, 2, 3],), TypeError, "numpy.ndarray"),
    ((np.float32(1.0),), TypeError, "numpy.ndarray"),
    ((np.array(1.0),), ValueError, "0-d"),
    ((np.zeros((3, 2)), np.zeros(4)), ValueError, r"same length.*\(3, 2\), \(4,\)"),
    ((np.array(["a", "b"]),), TypeError, "dtype"),
    ((np.zeros(2, dtype=object),), TypeError, "dtype"),
])
def test_array_dataset_validation(args, exc, match):
    with pytest.raises(exc, match=match):
        ArrayDataset(*args)


# ----------------------------------------------------------------------------- order


def test_order_is_a_function_of_seed_and_epoch_only():
    x, y, ids = make_data()
    loader = DataLoader(ArrayDataset(x, y, ids), 8, shuffle=True, seed=5)
    loader.set_epoch(3)
    diagnet.manual_seed(0)
    np.random.seed(0)
    first = ids_of(loader)
    # the global generators drawn from / reseeded, other epochs visited first: same order
    diagnet.manual_seed(123)
    diagnet.random.default_generator().random(100)
    np.random.seed(99)
    np.random.random(10)
    other = DataLoader(ArrayDataset(x, y, ids), 8, shuffle=True, seed=5)
    for epoch in (0, 1, 7):
        other.set_epoch(epoch)
        ids_of(other)
    other.set_epoch(3)
    assert ids_of(other) == first
    want = epoch_order(N, 5, 3)
    np.testing.assert_array_equal(np.concatenate(first), want)
    np.testing.assert_array_equal(want, np.random.default_rng([5, 3]).permutation(N))
    # every sample once per epoch; epochs and seeds differ
    assert sorted(np.concatenate(first).tolist()) == list(range(N))
    other.set_epoch(4)
    assert ids_of(other) != first
    third = DataLoader(ArrayDataset(x, y, ids), 8, shuffle=True, seed=6)
    third.set_epoch(3)
    assert ids_of(third) != first


def test_epochs_advance_after_a_full_pass():
    x, y, ids = make_data()
    loader = DataLoader(ArrayDataset(x, y, ids), 8, shuffle=True, seed=1)
    assert loader.state_dict() == {"epoch": 0, "batch": 0}
    e0 = ids_of(loader)
    assert loader.state_dict() == {"epoch": 1, "batch": 0}
    e1 = ids_of(loader)
    assert e0 != e1
    np.testing.assert_array_equal(np.concatenate(e1), epoch_order(N, 1, 1))


def test_no_shuffle_keeps_the_dataset_order():
    x, y, ids = make_data()
    loader = DataLoader(ArrayDataset(x, y, ids), 8)
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        got = ids_of(loader)
        assert got == [list(range(i, min(i + 8, N))) for i in range(0, N, 8)]


@pytest.mark.parametrize("drop_last, lengths", [(False, [16, 16, 16, 2]), (True, [16, 16, 16])])
def test_drop_last(drop_last, lengths):
    x, y, ids = make_data()
    loader = DataLoader(ArrayDataset(x, y, ids), 16, shuffle=True, drop_last=drop_last)
    assert len(loader) == len(lengths)
    assert [len(b) for b in ids_of(loader)] == lengths


def test_exact_multiple_has_no_partial_batch():
    x, y, ids = make_data(48)
    for drop_last in (False, True):
        assert len(DataLoader(ArrayDataset(x, y, ids), 16, drop_last=drop_last)) == 3


# ----------------------------------------------------------------------------- batches


def test_batch_shapes_dtypes_and_device():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(N, 2, 3), dtype=np.uint8)
    x64 = rng.normal(size=(N, D))
    x16 = rng.normal(size=(N, D)).astype(np.float16)
    y = rng.integers(0, C, size=N).astype(np.int64)
    y32 = y.astype(np.int32)
    loader = DataLoader(ArrayDataset(images, x64, x16, y, y32), 16, shuffle=True, device="cpu")
    batches = list(loader)
    assert len(batches) == 4
    for k, batch in enumerate(batches):
        b = 16 if k < 3 else 2
        assert isinstance(batch, tuple) and len(batch) == 5
        assert all(isinstance(t, Tensor) and t.device == "cpu" for t in batch)
        assert all(not t.requires_grad for t in batch)
        assert [t.shape for t in batch] == [(b, 2, 3), (b, D), (b, D), (b,), (b,)]
        assert [t.dtype for t in batch] == [np.uint8, np.float64, np.float32, np.int64, np.int32]
    order = epoch_order(N, 0, 0)
    np.testing.assert_array_equal(batches[1][0].numpy(), images[order[16:32]])
    np.testing.assert_array_equal(batches[1][3].numpy(), y[order[16:32]])


def test_float32_batches_are_float32_and_labels_int64():
    x, y, _ = make_data()
    xb, yb = next(iter(DataLoader(ArrayDataset(x, y), 10)))
    assert xb.dtype == np.float32 and yb.dtype == np.int64
    np.testing.assert_array_equal(xb.numpy(), x[:10])


def test_transform_runs_on_the_device_batch():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(N, 4), dtype=np.uint8)
    y = rng.integers(0, C, size=N).astype(np.int64)
    loader = DataLoader(ArrayDataset(images, y), 8,
                        transform=lambda x, t: (x.astype("float32") / 255.0, t))
    xb, yb = next(iter(loader))
    assert xb.dtype == np.float32 and yb.dtype == np.int64
    np.testing.assert_allclose(xb.numpy(), images[:8] / np.float32(255.0), rtol=1e-6)
    single = DataLoader(ArrayDataset(images), 8, transform=lambda x: x.astype("float64"))
    (xb,) = next(iter(single))
    assert xb.dtype == np.float64


def test_batches_are_gathered_with_one_index_per_array():
    class CountingDataset(ArrayDataset):
        calls = []

        def __getitem__(self, index):
            self.calls.append(np.asarray(index).copy())
            return super().__getitem__(index)

    x, y, _ = make_data()
    ds = CountingDataset(x, y)
    loader = DataLoader(ds, 16, shuffle=True)
    list(loader)
    assert len(ds.calls) == len(loader)  # one gather per batch, not one per sample
    assert [c.shape for c in ds.calls] == [(16,), (16,), (16,), (2,)]


@pytest.mark.gpu
def test_batches_on_cuda():
    x, y, _ = make_data()
    xb, yb = next(iter(DataLoader(ArrayDataset(x, y), 8, shuffle=True, device="cuda")))
    assert xb.device == "cuda" and yb.device == "cuda"
    assert xb.dtype == np.float32 and yb.dtype == np.int64
    np.testing.assert_array_equal(xb.numpy(), x[epoch_order(N, 0, 0)[:8]])


# ----------------------------------------------------------------------------- resumption


@pytest.mark.parametrize("stop_after", [0, 1, 3, 4])
def test_mid_epoch_resume_yields_exactly_the_remaining_batches(stop_after):
    x, y, ids = make_data()
    full = DataLoader(ArrayDataset(x, y, ids), 12, shuffle=True, seed=7)
    full.set_epoch(2)
    want = ids_of(full)

    first = DataLoader(ArrayDataset(x, y, ids), 12, shuffle=True, seed=7)
    first.set_epoch(2)
    seen = []
    if stop_after:
        for batch in first:
            seen.append(batch[-1].numpy().tolist())
            if len(seen) == stop_after:
                break
    state = first.state_dict()
    assert state == {"epoch": 2, "batch": stop_after}

    class NoPeeking(ArrayDataset):
        gathered = 0

        def __getitem__(self, index):
            NoPeeking.gathered += 1
            return super().__getitem__(index)

    resumed = DataLoader(NoPeeking(x, y, ids), 12, shuffle=True, seed=7)
    resumed.load_state_dict(state)
    rest = ids_of(resumed)
    assert seen + rest == want
    assert NoPeeking.gathered == len(want) - stop_after  # skipped batches were not gathered
    assert resumed.state_dict() == {"epoch": 3, "batch": 0}


def test_state_dict_counts_the_batch_in_use_and_a_new_iteration_restarts():
    x, y, ids = make_data()
    loader = DataLoader(ArrayDataset(x, y, ids), 10, shuffle=True)
    it = iter(loader)
    first = next(it)
    assert loader.state_dict() == {"epoch": 0, "batch": 1}
    next(it)
    assert loader.state_dict() == {"epoch": 0, "batch": 2}
    # a new iteration (no load_state_dict) starts the epoch again
    again = next(iter(loader))
    np.testing.assert_array_equal(again[-1].numpy(), first[-1].numpy())


def test_iter_right_after_load_state_dict_resumes():
    x, y, ids = make_data()
    loader = DataLoader(ArrayDataset(x, y, ids), 10)
    loader.load_state_dict({"epoch": 4, "batch": 3})
    it = iter(loader)  # position taken now, before the first next()
    assert next(it)[-1].numpy().tolist() == list(range(30, 40))
    loader.load_state_dict({"epoch": 1, "batch": len(loader)})
    assert ids_of(loader) == []
    assert loader.state_dict() == {"epoch": 2, "batch": 0}


def test_set_epoch_cancels_a_pending_resume():
    x, y, ids = make_data()
    loader = DataLoader(ArrayDataset(x, y, ids), 10)
    loader.load_state_dict({"epoch": 0, "batch": 3})
    loader.set_epoch(1)
    assert len(ids_of(loader)) == len(loader)


@pytest.mark.parametrize("state, exc, match", [
    ([0, 1], TypeError, "dict"),
    ({"epoch": 0}, KeyError, "exactly"),
    ({"epoch": 0, "batch": 1, "x": 2}, KeyError, "exactly"),
    ({"epoch": -1, "batch": 0}, ValueError, ">= 0"),
    ({"epoch": 0, "batch": 1.0}, TypeError, "int"),
    ({"epoch": True, "batch": 0}, TypeError, "int"),
    ({"epoch": 0, "batch": 6}, ValueError, "past the end"),
])
def test_load_state_dict_validation_changes_nothing(state, exc, match):
    x, y, _ = make_data()
    loader = DataLoader(ArrayDataset(x, y), 10)
    loader.load_state_dict({"epoch": 2, "batch": 1})
    with pytest.raises(exc, match=match):
        loader.load_state_dict(state)
    assert loader.state_dict() == {"epoch": 2, "batch": 1}


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"batch_size": 0}, ValueError, "positive"),
    ({"batch_size": -2}, ValueError, ">= 0"),
    ({"batch_size": 2.0}, TypeError, "batch_size must be an int"),
    ({"batch_size": True}, TypeError, "batch_size must be an int"),
    ({"batch_size": 4, "shuffle": 1}, TypeError, "shuffle must be a bool"),
    ({"batch_size": 4, "drop_last": "yes"}, TypeError, "drop_last must be a bool"),
    ({"batch_size": 4, "seed": -1}, ValueError, "seed"),
    ({"batch_size": 4, "device": "tpu"}, ValueError, "device"),
    ({"batch_size": 4, "transform": 3}, TypeError, "transform"),
    ({"batch_size": 60, "drop_last": True}, ValueError, "no batch"),
])
def test_loader_argument_validation(kwargs, exc, match):
    x, y, _ = make_data()
    with pytest.raises(exc, match=match):
        DataLoader(ArrayDataset(x, y), **kwargs)


def test_loader_rejects_non_datasets_and_empty_ones():
    with pytest.raises(TypeError, match="len"):
        DataLoader(object(), 4)
    with pytest.raises(ValueError, match="no batch"):
        DataLoader(ArrayDataset(np.zeros((0, 3))), 4)
    with pytest.raises(ValueError, match=">= 0"):
        DataLoader(ArrayDataset(np.zeros((5, 3))), 4).set_epoch(-1)


# ----------------------------------------------------------------------------- per-sample datasets


class PerSample:
    """A dataset as ``torch.utils.data.Dataset`` has it: ``len()`` and ``dataset[k]`` for an
    int ``k`` only, giving one sample; counts the samples fetched."""

    def __init__(self, make_sample, n=N):
        self.make_sample, self.n, self.fetched = make_sample, n, []

    def __len__(self):
        return self.n

    def __getitem__(self, k):
        if not isinstance(k, int):
            raise TypeError(f"sample index must be an int; got {type(k).__name__}")
        if not 0 <= k < self.n:
            raise IndexError(k)
        self.fetched.append(k)
        return self.make_sample(k)


def xy_per_sample(n=N):
    x, y, _ = make_data(n)
    return PerSample(lambda k: (x[k], int(y[k]), k), n)


@pytest.mark.parametrize("shuffle, drop_last", [(False, False), (True, False), (True, True)])
def test_per_sample_dataset_gives_the_batches_of_the_array_dataset(shuffle, drop_last):
    x, y, ids = make_data()
    want = list(DataLoader(ArrayDataset(x, y, ids), 16, shuffle=shuffle, seed=3,
                           drop_last=drop_last))
    got = list(DataLoader(xy_per_sample(), 16, shuffle=shuffle, seed=3, drop_last=drop_last))
    assert len(got) == len(want) == (3 if drop_last else 4)
    for g, w in zip(got, want):
        assert len(g) == 3 and all(isinstance(t, Tensor) for t in g)
        assert [t.dtype for t in g] == [np.float32, np.int64, np.int64]
        for gt, wt in zip(g, w):
            np.testing.assert_array_equal(gt.numpy(), wt.numpy())


def test_per_sample_order_epochs_and_seed():
    loader = DataLoader(xy_per_sample(), 8, shuffle=True, seed=5)
    loader.set_epoch(3)
    np.testing.assert_array_equal(np.concatenate(ids_of(loader)), epoch_order(N, 5, 3))
    assert loader.state_dict() == {"epoch": 4, "batch": 0}
    np.testing.assert_array_equal(np.concatenate(ids_of(loader)), epoch_order(N, 5, 4))


@pytest.mark.parametrize("stop_after", [0, 2, 4])
def test_per_sample_resume_fetches_only_the_remaining_samples(stop_after):
    full = DataLoader(xy_per_sample(), 12, shuffle=True, seed=7)
    full.set_epoch(1)
    want = ids_of(full)
    first = DataLoader(xy_per_sample(), 12, shuffle=True, seed=7)
    first.set_epoch(1)
    seen = []
    for batch in first if stop_after else ():
        seen.append(batch[-1].numpy().tolist())
        if len(seen) == stop_after:
            break
    assert first.state_dict() == {"epoch": 1, "batch": stop_after}
    dataset = xy_per_sample()
    resumed = DataLoader(dataset, 12, shuffle=True, seed=7)
    resumed.load_state_dict(first.state_dict())
    rest = ids_of(resumed)
    assert seen + rest == want
    assert dataset.fetched == [k for batch in rest for k in batch]  # skipped: not fetched


def test_per_sample_field_kinds():
    """How each kind of field is stacked: arrays keep their dtype; Python ints become int64,
    floats float32 and bools bool (as `Tensor` makes them); NumPy scalars keep theirs."""
    def sample(k):
        return [np.full((2, 3), k, dtype=np.uint8), k, k / 2, k % 2 == 0, np.float64(k),
                np.int32(k), Tensor(np.full(3, k, dtype=np.float64)), [k, k + 1]]

    batch = next(iter(DataLoader(PerSample(sample), 4)))
    assert [t.shape for t in batch] == [(4, 2, 3), (4,), (4,), (4,), (4,), (4,), (4, 3), (4, 2)]
    assert [t.dtype for t in batch] == [np.uint8, np.int64, np.float32, np.bool_, np.float64,
                                        np.int32, np.float64, np.int64]
    np.testing.assert_array_equal(batch[0].numpy()[:, 1, 2], [0, 1, 2, 3])
    np.testing.assert_array_equal(batch[2].numpy(), [0, 0.5, 1, 1.5])
    np.testing.assert_array_equal(batch[3].numpy(), [True, False, True, False])
    np.testing.assert_array_equal(batch[6].numpy()[:, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(batch[7].numpy(), [[0, 1], [1, 2], [2, 3], [3, 4]])


def test_per_sample_single_field_and_transform():
    x, _, _ = make_data()
    loader = DataLoader(PerSample(lambda k: x[k]), 10,
                        transform=lambda t: t.astype("float64"))
    batches = list(loader)
    assert all(len(b) == 1 for b in batches)
    assert batches[0][0].dtype == np.float64
    np.testing.assert_array_equal(batches[1][0].numpy(), x[10:20])


@pytest.mark.parametrize("make_sample, exc, match", [
    (lambda k: {"x": k, "y": k}, TypeError,
     r"sample 0 of the batch is a dict; a per-sample dataset must give a tuple"),
    (lambda k: (np.zeros(3 if k < 2 else 4), k), ValueError,
     r"field 0 of the batch's samples does not stack: sample 0 has shape \(3,\), sample 2 \(4,\)"),
    (lambda k: (k, k) if k < 3 else (k,), ValueError,
     r"sample 3 of the batch has 1 field\(s\), sample 0 has 2"),
    (lambda k: (k, "label"), TypeError, r"field 1 of the batch's samples .*dtype <U5"),
    (lambda k: (k, None), TypeError, r"field 1 of the batch's samples .*dtype object"),
], ids=["dict", "ragged", "fields", "str", "None"])
def test_per_sample_bad_samples(make_sample, exc, match):
    loader = DataLoader(PerSample(make_sample), 5)
    with pytest.raises(exc, match=match):
        next(iter(loader))


def test_array_dataset_keeps_the_one_gather_fast_path():
    """An ArrayDataset is never indexed sample by sample."""
    x, y, _ = make_data()

    class IntIndexRefused(ArrayDataset):
        def __getitem__(self, index):
            assert not isinstance(index, (int, np.integer)), "indexed by one sample"
            return super().__getitem__(index)

    assert len(list(DataLoader(IntIndexRefused(x, y), 16, shuffle=True))) == 4


@pytest.mark.gpu
def test_per_sample_batches_on_cuda():
    x, y, _ = make_data()
    loader = DataLoader(PerSample(lambda k: (Tensor(x[k], device="cuda"), int(y[k]))), 8,
                        shuffle=True, device="cuda")
    xb, yb = next(iter(loader))
    assert xb.device == "cuda" and yb.device == "cuda"
    assert xb.dtype == np.float32 and yb.dtype == np.int64
    np.testing.assert_array_equal(xb.numpy(), x[epoch_order(N, 0, 0)[:8]])
    np.testing.assert_array_equal(yb.numpy(), y[epoch_order(N, 0, 0)[:8]])


def test_a_torch_dataset_is_collated_like_the_array_dataset():
    # the habit this supports: a torch.utils.data.Dataset handed to diagnet's loader as it is
    torch = pytest.importorskip("torch")
    x, y, ids = make_data()

    class TorchDataset(torch.utils.data.Dataset):
        def __len__(self):
            return len(x)

        def __getitem__(self, k):
            return torch.from_numpy(x[k]), int(y[k]), int(ids[k])

    want = list(DataLoader(ArrayDataset(x, y, ids), 16, shuffle=True, seed=3))
    got = list(DataLoader(TorchDataset(), 16, shuffle=True, seed=3))
    tensors = list(DataLoader(torch.utils.data.TensorDataset(
        torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(ids)), 16, shuffle=True, seed=3))
    assert len(got) == len(tensors) == len(want)
    for g, t, w in zip(got, tensors, want):
        for gt, tt, wt in zip(g, t, w):
            np.testing.assert_array_equal(gt.numpy(), wt.numpy())
            np.testing.assert_array_equal(tt.numpy(), wt.numpy())
