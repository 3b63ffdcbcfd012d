"""`DataLoader(..., rank=r, world_size=W)`: every global batch split across the ranks.

The loaders of all ranks are built in one process and checked together against the
single-process loader, so these tests need no MPI (under ``mpiexec`` every rank runs them
alike).
"""

from __future__ import annotations

import numpy as np
import pytest

from diagnet.data import ArrayDataset, DataLoader

SEED = 5

# (samples, global batch, shuffle, drop_last): every setting gives each of 1, 2 and 3 ranks
# at least one sample of every global batch
SETTINGS = [
    (12, 4, False, False),   # even batches
    (47, 10, True, False),   # last global batch of 7
    (50, 8, True, True),     # last batch dropped
    (23, 6, True, False),    # last global batch of 5
    (9, 3, True, False),     # one sample per rank with 3 ranks
]


def make_dataset(n):
    """An ArrayDataset whose last array is the sample id (features are id-derived too)."""
    ids = np.arange(n, dtype=np.int64)
    x = np.stack([ids * 2.0, ids * 3.0], axis=1)
    return ArrayDataset(x, ids)


def shard_loaders(dataset, batch_size, world_size, **kwargs):
    """One loader per rank, ``0..world_size-1``."""
    return [DataLoader(dataset, batch_size, rank=r, world_size=world_size, seed=SEED, **kwargs)
            for r in range(world_size)]


def ids(batch):
    return batch[-1].numpy().tolist()


def epoch_ids(loader):
    """The sample ids of each batch of one iteration of ``loader``."""
    return [ids(batch) for batch in loader]


def ranks_epoch(loaders):
    """For each global batch, the list of the ranks' sample ids (one iteration of each)."""
    per_rank = [epoch_ids(loader) for loader in loaders]
    assert len({len(batches) for batches in per_rank}) == 1, "ranks yield different counts"
    return [list(shares) for shares in zip(*per_rank)]


# ----------------------------------------------------------------------------- the split


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("n, batch_size, shuffle, drop_last", SETTINGS)
def test_shards_concatenate_to_the_single_process_batches(n, batch_size, shuffle, drop_last,
                                                         world_size):
    dataset = make_dataset(n)
    single = DataLoader(dataset, batch_size, shuffle=shuffle, seed=SEED, drop_last=drop_last)
    shards = shard_loaders(dataset, batch_size, world_size, shuffle=shuffle,
                           drop_last=drop_last)
    assert all(len(loader) == len(single) for loader in shards)
    for epoch in range(2):
        expected = epoch_ids(single)
        got = ranks_epoch(shards)
        assert len(got) == len(expected)
        for global_batch, shares in zip(expected, got):
            assert sum(shares, []) == global_batch
            # numpy.array_split sizes: differ by at most one, the first parts larger
            sizes = [len(share) for share in shares]
            assert sizes == [len(p) for p in np.array_split(global_batch, world_size)]
            assert min(sizes) >= 1
        assert [loader.state_dict() for loader in shards] == [{"epoch": epoch + 1,
                                                               "batch": 0}] * world_size
    assert single.epoch == 2


def test_features_and_ids_stay_aligned_in_a_share():
    dataset = make_dataset(23)
    for loader in shard_loaders(dataset, 6, 3, shuffle=True):
        for x, y in loader:
            np.testing.assert_array_equal(x.numpy(), dataset.arrays[0][y.numpy()])


def test_set_epoch_selects_the_same_global_order_on_every_rank():
    dataset = make_dataset(47)
    single = DataLoader(dataset, 10, shuffle=True, seed=SEED)
    single.set_epoch(4)
    shards = shard_loaders(dataset, 10, 2, shuffle=True)
    for loader in shards:
        loader.set_epoch(4)
    assert [sum(shares, []) for shares in ranks_epoch(shards)] == epoch_ids(single)


def test_transform_applies_to_the_rank_share():
    dataset = make_dataset(23)
    seen = []

    def transform(x, y):
        seen.append(len(y))
        return x * 2, y

    loader = DataLoader(dataset, 6, shuffle=True, seed=SEED, rank=2, world_size=3,
                        transform=transform)
    batches = list(loader)
    assert seen == [len(b[1]) for b in batches] == [2, 2, 2, 1]
    for x, y in batches:
        np.testing.assert_array_equal(x.numpy(), 2 * dataset.arrays[0][y.numpy()])


@pytest.mark.gpu
def test_shards_on_the_gpu_concatenate_to_the_single_process_batches():
    dataset = make_dataset(23)
    single = DataLoader(dataset, 6, shuffle=True, seed=SEED, device="cuda")
    shards = shard_loaders(dataset, 6, 2, shuffle=True, device="cuda")
    assert all(x.device == y.device == "cuda" for x, y in shards[1])
    for loader in shards:
        loader.set_epoch(0)
    assert [sum(s, []) for s in ranks_epoch(shards)] == epoch_ids(single)


class RecordingDataset:
    """A per-sample dataset that records which samples it was asked for."""

    def __init__(self, n):
        self.n = n
        self.asked = []

    def __len__(self):
        return self.n

    def __getitem__(self, k):
        self.asked.append(k)
        return np.float32(k), k


@pytest.mark.parametrize("world_size", [2, 3])
def test_per_sample_dataset_is_asked_only_for_the_rank_samples(world_size):
    asked = []
    for rank in range(world_size):
        dataset = RecordingDataset(23)
        loader = DataLoader(dataset, 6, shuffle=True, seed=SEED, rank=rank,
                            world_size=world_size)
        expected = sum(epoch_ids(loader), [])
        assert dataset.asked == expected
        asked.append(dataset.asked)
    # the ranks' samples are disjoint and together the whole epoch
    assert sorted(sum(asked, [])) == list(range(23))


def test_resumed_per_sample_dataset_is_not_asked_for_skipped_batches():
    dataset = RecordingDataset(23)
    loader = DataLoader(dataset, 6, shuffle=True, seed=SEED, rank=1, world_size=2)
    loader.load_state_dict({"epoch": 1, "batch": 3})
    batches = epoch_ids(loader)
    assert len(batches) == 1 and dataset.asked == batches[0]


# ----------------------------------------------------------------------------- resumption


def take(loader, count):
    """Consume ``count`` batches of one iteration and return the loader's state then."""
    for i, _ in enumerate(loader):
        if i + 1 == count:
            break
    return loader.state_dict()


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("n, batch_size, shuffle, drop_last", SETTINGS)
def test_resuming_mid_epoch_gives_the_same_remaining_shards(n, batch_size, shuffle, drop_last,
                                                            world_size):
    dataset = make_dataset(n)
    kwargs = dict(shuffle=shuffle, drop_last=drop_last)
    uninterrupted = shard_loaders(dataset, batch_size, world_size, **kwargs)
    for loader in uninterrupted:
        loader.set_epoch(1)
    full = ranks_epoch(uninterrupted)
    stop = len(full) // 2 + 1

    interrupted = shard_loaders(dataset, batch_size, world_size, **kwargs)
    states = []
    for loader in interrupted:
        loader.set_epoch(1)
        states.append(take(loader, stop))
    assert states == [{"epoch": 1, "batch": stop}] * world_size

    resumed = shard_loaders(dataset, batch_size, world_size, **kwargs)
    for loader, state in zip(resumed, states):
        loader.load_state_dict(state)
    assert ranks_epoch(resumed) == full[stop:]


@pytest.mark.parametrize("saved_ranks, loaded_ranks", [(2, 1), (1, 2), (3, 2)])
def test_a_state_moves_between_world_sizes(saved_ranks, loaded_ranks):
    dataset = make_dataset(47)
    single = DataLoader(dataset, 10, shuffle=True, seed=SEED)
    single.set_epoch(2)
    remaining = epoch_ids(single)[2:]

    saving = shard_loaders(dataset, 10, saved_ranks, shuffle=True)
    states = []
    for loader in saving:
        loader.set_epoch(2)
        states.append(take(loader, 2))
    assert all(state == states[0] for state in states)

    loading = shard_loaders(dataset, 10, loaded_ranks, shuffle=True)
    for loader in loading:
        loader.load_state_dict(states[0])
    assert [sum(shares, []) for shares in ranks_epoch(loading)] == remaining


@pytest.mark.parametrize("n, batch_size, shuffle, drop_last", SETTINGS)
def test_describe_carries_no_rank_or_world_size(n, batch_size, shuffle, drop_last):
    dataset = make_dataset(n)
    kwargs = dict(shuffle=shuffle, drop_last=drop_last)
    expected = DataLoader(dataset, batch_size, seed=SEED, **kwargs).describe()
    for world_size in (1, 2, 3):
        for loader in shard_loaders(dataset, batch_size, world_size, **kwargs):
            assert loader.describe() == expected


# ----------------------------------------------------------------------------- attributes


def test_rank_world_size_and_sharded():
    dataset = make_dataset(12)
    plain = DataLoader(dataset, 4)
    assert (plain.rank, plain.world_size, plain.sharded) == (0, 1, False)
    assert "rank" not in repr(plain) and "world_size" not in repr(plain)
    alone = DataLoader(dataset, 4, rank=0, world_size=1)
    assert not alone.sharded and repr(alone) == repr(plain)
    loader = DataLoader(dataset, 4, rank=np.int64(1), world_size=np.int64(2))
    assert (loader.rank, loader.world_size, loader.sharded) == (1, 2, True)
    assert type(loader.rank) is int and type(loader.world_size) is int
    assert "rank=1, world_size=2" in repr(loader)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(rank=-1, world_size=2), ValueError, r"rank=-1.*>= 0"),
    (dict(rank=2, world_size=2), ValueError, r"rank=2.*world_size=2"),
    (dict(rank=5), ValueError, r"rank=5.*world_size=1"),
    (dict(world_size=0), ValueError, r"world_size=0.*>= 1"),
    (dict(rank=1.0, world_size=2), TypeError, r"rank must be an int; got float"),
    (dict(rank=True, world_size=2), TypeError, r"rank must be an int; got bool"),
    (dict(world_size="2"), TypeError, r"world_size must be an int; got str"),
    (dict(world_size=2.0), TypeError, r"world_size must be an int; got float"),
])
def test_bad_rank_or_world_size_is_refused(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        DataLoader(make_dataset(12), 4, **kwargs)


def test_rank_and_world_size_are_keyword_only():
    with pytest.raises(TypeError):
        DataLoader(make_dataset(12), 4, False, 0, False, None, None, 1, 2)


# ----------------------------------------------------------------------------- empty shares


@pytest.mark.parametrize("n, batch_size, drop_last, world_size, problem, fix", [
    # the last global batch has 2 samples for 3 ranks
    (50, 8, False, 3, "the last global batch has 2 sample", "drop_last=True"),
    # the last global batch has 1 sample for 2 ranks
    (9, 4, False, 2, "the last global batch has 1 sample", "drop_last=True"),
    # every global batch is smaller than the world (with or without a smaller last one)
    (12, 2, False, 3, "at most 2 sample", "batch_size of at least 3"),
    (13, 2, False, 3, "at most 2 sample", "batch_size of at least 3"),
    (12, 2, True, 3, "at most 2 sample", "batch_size of at least 3"),
])
def test_a_rank_without_samples_is_refused(n, batch_size, drop_last, world_size, problem, fix):
    dataset = RecordingDataset(n)
    for rank in range(world_size):
        with pytest.raises(ValueError) as info:
            DataLoader(dataset, batch_size, drop_last=drop_last, rank=rank,
                       world_size=world_size)
        message = str(info.value)
        for part in (f"batch_size={batch_size}", f"drop_last={drop_last}",
                     f"world_size={world_size}", problem, fix):
            assert part in message, (part, message)
    assert dataset.asked == []   # refused before any sample was read


def test_drop_last_makes_an_uneven_end_acceptable():
    dataset = make_dataset(50)
    single = DataLoader(dataset, 8, shuffle=True, seed=SEED, drop_last=True)
    shards = shard_loaders(dataset, 8, 3, shuffle=True, drop_last=True)
    assert [sum(s, []) for s in ranks_epoch(shards)] == epoch_ids(single)


# ----------------------------------------------------------------------------- micro-batches


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("n, batch_size, micro_batch, drop_last", [
    (48, 12, 4, False),   # 3 micro-batches per batch: one each on 3 ranks, 2 and 1 on 2
    (50, 12, 4, False),   # last global batch of 2: one short micro-batch... on 1 rank only
    (70, 16, 3, False),   # 6 micro-batches, the last of 1; last global batch of 6
    (41, 10, 10, True),   # a micro-batch per batch: one rank only
])
def test_micro_batch_shares_are_whole_micro_batches(n, batch_size, micro_batch, drop_last,
                                                     world_size):
    """With micro_batch M each rank takes whole micro-batches of the global batch, split with
    numpy.array_split's sizes; together they are the single-process batch, in order."""
    dataset = make_dataset(n)
    single = DataLoader(dataset, batch_size, shuffle=True, seed=SEED, drop_last=drop_last)
    expected = epoch_ids(single)
    units = [-(-len(b) // micro_batch) for b in expected]
    if min(units) < world_size:
        with pytest.raises(ValueError, match=f"micro-batches of {micro_batch}"):
            shard_loaders(dataset, batch_size, world_size, shuffle=True, drop_last=drop_last,
                          micro_batch=micro_batch)
        return
    shards = shard_loaders(dataset, batch_size, world_size, shuffle=True, drop_last=drop_last,
                           micro_batch=micro_batch)
    for global_batch, shares in zip(expected, ranks_epoch(shards)):
        assert sum(shares, []) == global_batch
        slots = [global_batch[i:i + micro_batch]
                 for i in range(0, len(global_batch), micro_batch)]
        counts = [len(part) for part in np.array_split(np.arange(len(slots)), world_size)]
        starts = np.cumsum([0] + counts)
        assert shares == [sum(slots[a:b], []) for a, b in zip(starts[:-1], starts[1:])]


def test_micro_batch_is_described_and_checked():
    dataset = make_dataset(24)
    loader = DataLoader(dataset, 8, micro_batch=4, rank=1, world_size=2)
    assert loader.micro_batch == 4 and loader.describe()["micro_batch"] == 4
    assert "micro_batch=4" in repr(loader)
    assert "micro_batch" not in DataLoader(dataset, 8).describe()  # older runs still match
    assert DataLoader(dataset, 8).micro_batch is None
    for bad in (0, 2.5, True, "4"):
        with pytest.raises((TypeError, ValueError), match="micro_batch must be a positive int"):
            DataLoader(dataset, 8, micro_batch=bad)
    with pytest.raises(ValueError, match="at most 1 micro-batches of 8.*smaller micro_batch"):
        DataLoader(dataset, 8, micro_batch=8, rank=0, world_size=2)
