"""`RandomShift` and `DataLoader(..., augment=...)`: shifted images, drawn per global batch.

The shift is checked against a per-pixel reference loop; the loader's draws against the
properties that make augmented runs reproducible: a function of (seed, epoch, batch), the
same after a mid-epoch resume, and the same for every world size (the ranks' shares put
together are the single-process batch).
"""

from __future__ import annotations

import numpy as np
import pytest

from diagnet.data import ArrayDataset, DataLoader, RandomShift

FILL = -0.5


def shift_reference(images, shifts, fill):
    """Output pixel ``[n, ..., r, c]`` = input ``[n, ..., r - dy, c - dx]``, else ``fill``."""
    out = np.full_like(images, fill)
    height, width = images.shape[-2:]
    for n, (dy, dx) in enumerate(shifts):
        for r in range(height):
            for c in range(width):
                if 0 <= r - dy < height and 0 <= c - dx < width:
                    out[n, ..., r, c] = images[n, ..., r - dy, c - dx]
    return out


def images(n=6, channels=2, size=5, dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal((n, channels, size, size)).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_shift_matches_the_reference_for_every_shift(dtype):
    x = images(n=25, dtype=dtype)
    shifts = np.array([(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)])
    got = RandomShift(2, fill=FILL).apply(x, shifts)
    assert got.dtype == x.dtype and got.shape == x.shape
    np.testing.assert_array_equal(got, shift_reference(x, shifts, FILL))


def test_a_shift_as_large_as_the_image_leaves_only_fill():
    x = images(n=3, size=4)
    shifts = np.array([[4, 0], [0, -4], [-5, 7]])
    np.testing.assert_array_equal(RandomShift(7, fill=FILL).apply(x, shifts),
                                  np.full_like(x, FILL))


def test_apply_leaves_its_input_unchanged_and_works_on_3d_images():
    x = images(n=4)[:, 0]  # (N, H, W)
    before = x.copy()
    shifts = np.array([[1, -1], [0, 0], [-2, 2], [1, 1]])
    got = RandomShift(2).apply(x, shifts)
    np.testing.assert_array_equal(x, before)
    np.testing.assert_array_equal(got, shift_reference(x, shifts, 0.0))


def test_draw_is_uniform_in_the_range_and_zero_shift_is_the_identity():
    draws = RandomShift(2).draw(np.random.default_rng(0), 5000)
    assert draws.shape == (5000, 2) and draws.dtype == np.int64
    assert set(np.unique(draws).tolist()) == {-2, -1, 0, 1, 2}
    x = images()
    zero = RandomShift(0)
    np.testing.assert_array_equal(zero.apply(x, zero.draw(np.random.default_rng(1), len(x))), x)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"max_shift": -1}, ValueError, "max_shift"),
    ({"max_shift": 1.5}, TypeError, "max_shift"),
    ({"max_shift": 1, "fill": "black"}, TypeError, "fill must be a real number; got str"),
    ({"max_shift": 1, "fill": float("nan")}, ValueError, "fill must be finite"),
])
def test_random_shift_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        RandomShift(**kwargs)


def test_apply_validation():
    shift = RandomShift(1)
    with pytest.raises(ValueError, match="at least 3 dimensions; got shape \\(4, 25\\)"):
        shift.apply(np.zeros((4, 25)), np.zeros((4, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="shifts must have shape \\(4, 2\\).*got \\(3, 2\\)"):
        shift.apply(np.zeros((4, 5, 5)), np.zeros((3, 2), dtype=np.int64))


# ----------------------------------------------------------------------------- the loader


def dataset(n=23, size=6):
    """Images whose pixels encode the sample id, and the ids."""
    ids = np.arange(n, dtype=np.int64)
    x = (ids[:, None, None, None] * 100.0
         + np.arange(size * size).reshape(1, 1, size, size)).astype(np.float32)
    return ArrayDataset(x, ids)


def loader(ds, **kwargs):
    kwargs = {"batch_size": 6, "shuffle": True, "seed": 3, "augment": RandomShift(2),
              **kwargs}
    return DataLoader(ds, **kwargs)


def epoch(ld):
    return [(x.numpy().copy(), y.numpy().copy()) for x, y in ld]


def test_every_batch_is_shifted_by_draws_of_its_global_batch():
    ds = dataset()
    ld = loader(ds)
    ld.set_epoch(2)
    plain = DataLoader(ds, batch_size=6, shuffle=True, seed=3)
    plain.set_epoch(2)
    for i, ((x, y), (x0, y0)) in enumerate(zip(epoch(ld), epoch(plain))):
        np.testing.assert_array_equal(y, y0)  # the same samples, in the same order
        rng = np.random.default_rng([3, 2, i, 0x61756700])
        shifts = RandomShift(2).draw(rng, len(y))
        np.testing.assert_array_equal(x, shift_reference(x0, shifts, 0.0))
    assert any(not np.array_equal(x, x0) for (x, _), (x0, _) in zip(epoch(ld), epoch(plain)))


def test_draws_are_a_function_of_seed_and_epoch():
    ds = dataset()
    first, again, other_seed = loader(ds), loader(ds), loader(ds, seed=4)
    run = [epoch(first), epoch(first)]  # epochs 0 and 1
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(run[0], epoch(again)))
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(run[0], run[1]))
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(run[0], epoch(other_seed)))


@pytest.mark.parametrize("stop_after", [1, 3])
def test_a_mid_epoch_resume_redraws_what_the_uninterrupted_run_drew(stop_after):
    ds = dataset()
    whole = epoch(loader(ds))
    ld = loader(ds)
    for k, _ in enumerate(ld):
        if k + 1 == stop_after:
            break
    state = ld.state_dict()
    resumed = loader(ds)
    resumed.load_state_dict(state)
    rest = epoch(resumed)
    assert len(rest) == len(whole) - stop_after
    for (x, y), (xw, yw) in zip(rest, whole[stop_after:]):
        np.testing.assert_array_equal(x, xw)
        np.testing.assert_array_equal(y, yw)


@pytest.mark.parametrize("world_size", [2, 3])
def test_the_ranks_shares_are_the_single_process_batch(world_size):
    ds = dataset()
    whole = epoch(loader(ds))
    shares = [epoch(loader(ds, rank=r, world_size=world_size)) for r in range(world_size)]
    for i, (x, y) in enumerate(whole):
        np.testing.assert_array_equal(np.concatenate([s[i][0] for s in shares]), x)
        np.testing.assert_array_equal(np.concatenate([s[i][1] for s in shares]), y)


def test_describe_and_repr_carry_the_augmentation_only_when_there_is_one():
    ds = dataset()
    assert "augment" not in DataLoader(ds, 4).describe()
    assert loader(ds).describe()["augment"] == {"kind": "RandomShift", "max_shift": 2,
                                                "fill": 0.0}
    assert "augment=RandomShift(max_shift=2, fill=0.0)" in repr(loader(ds))


def test_augment_runs_before_transform():
    seen = []

    def transform(x, y):
        seen.append(x.numpy().copy())
        return x, y

    ds = dataset()
    ld = loader(ds, transform=transform)
    batches = epoch(ld)
    assert all(np.array_equal(s, x) for s, (x, _) in zip(seen, batches))


def test_loader_refuses_an_object_that_is_not_an_augmentation():
    with pytest.raises(TypeError, match="augment must be None or an augmentation.*no draw"):
        DataLoader(dataset(), 4, augment=lambda x: x)
