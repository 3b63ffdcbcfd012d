"""The compiled CPU kernels (`diagnet.diag.cpu`) against the NumPy reference.

Every test compares ``cpu.forward``, ``cpu.input_grad`` and ``cpu.value_grad`` with
`diagnet.diag.reference` on the same inputs.

Tolerance: the kernels add the same products as the reference in a different order (fused
groups of diagonals and batch rows, FMA), so each output may differ by a few roundings of
the *terms* it sums, not of its (possibly cancelling) result. We therefore bound the error
of every element by ``rtol * S`` where ``S`` is the same quantity computed on absolute
values (``|x|``, ``|values|``, ``|dy|``): ``rtol = 1e-12`` in float64 and ``1e-5`` in
float32. A sum of ``n`` terms in precision ``u`` (1.1e-16, 6e-8) errs by at most about
``n * u * S`` and typically ``sqrt(n) * u * S``; the longest sums here have 257 terms, so
float64 has a 30x margin even in the worst case, and float32 a 10x margin on the typical
error (the float32 worst case, 1.5e-5, is not approached by the fused, partly pairwise sums).

The kernels work in tiles: 4 batch rows (leftover rows one at a time), groups of 8, 4 and 1
diagonals, batch blocks per thread, diagonal chunks per thread, scratch strides that depend on
the layer size, and a serial path below a work threshold. The shapes below are chosen to be
ragged against all of them, and the ``parallel`` fixture variant forces the threaded path
(with an odd thread count, so the work splits unevenly) on small shapes.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from diagnet.diag import cpu, reference
from tolerances import CPU_KERNEL_RTOL

RTOL = {np.float32: CPU_KERNEL_RTOL[np.dtype(np.float32)],
        np.float64: CPU_KERNEL_RTOL[np.dtype(np.float64)]}
DTYPES = [np.float32, np.float64]


# The thresholds below which a call runs on the calling thread; all 0 forces the threads.
THRESHOLDS = ("_SERIAL_WORK", "_SERIAL_WORK_VGRAD", "_MIN_PARALLEL_ROWS")


@pytest.fixture(params=["serial", "parallel"])
def path(request, monkeypatch):
    """Run a test once on the serial path and once on the forced threaded path."""
    if request.param == "parallel":
        for name in THRESHOLDS:
            monkeypatch.setattr(cpu, name, 0)
        # three "threads" split rows and diagonals unevenly; numba runs the tasks on however
        # many threads it really has, so this checks the chunking on any machine
        monkeypatch.setattr(cpu, "_threads", lambda: 3)
    return request.param


def make_case(rng, B, m, n, K, dtype):
    """Random inputs of one layout: ``x``, ``dy``, sorted ``offsets`` and ``values``."""
    P, L = max(m, n), min(m, n)
    offsets = np.sort(rng.choice(P, size=K, replace=False)).astype(np.int64)
    values = rng.standard_normal((K, L)).astype(dtype)
    x = rng.standard_normal((B, n)).astype(dtype)
    dy = rng.standard_normal((B, m)).astype(dtype)
    return x, dy, offsets, values


def assert_close(actual, expected, scale, dtype):
    """``|actual - expected| <= rtol * scale`` element-wise (``scale``: sum of |terms|)."""
    assert actual.dtype == dtype, (actual.dtype, dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    tol = RTOL[dtype] * (np.asarray(scale, dtype=np.float64) + np.finfo(dtype).tiny)
    err = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    bad = err > tol
    assert not bad.any(), (
        f"{bad.sum()} of {bad.size} elements off; worst error {err.max():.3g}, "
        f"error / scale up to {(err / tol).max() * RTOL[dtype]:.3g}")


def check_all(x, dy, offsets, values):
    """All three kernels against the reference (in float64 for the reference and scale)."""
    dtype = x.dtype.type
    m, n = dy.shape[1], x.shape[1]
    x64, dy64, v64 = (a.astype(np.float64) for a in (x, dy, values))
    ax, ady, av = np.abs(x64), np.abs(dy64), np.abs(v64)

    assert_close(cpu.forward(x, offsets, values, m), reference.forward(x64, offsets, v64, m),
                 reference.forward(ax, offsets, av, m), dtype)
    assert_close(cpu.input_grad(dy, offsets, values, n),
                 reference.input_grad(dy64, offsets, v64, n),
                 reference.input_grad(ady, offsets, av, n), dtype)
    assert_close(cpu.value_grad(dy, x, offsets), reference.value_grad(dy64, x64, offsets),
                 reference.value_grad(ady, ax, offsets), dtype)


# (m, n) = (out_features, in_features): square, tall, wide, one-wide, primes, and sizes
# that are not multiples of the SIMD width (16 float32 / 8 float64) or of the tile sizes.
SHAPES = [
    (1, 1), (1, 7), (7, 1), (2, 3), (3, 2), (5, 5), (16, 16), (17, 17), (13, 31), (31, 13),
    (64, 48), (48, 64), (97, 89), (89, 97), (100, 37), (37, 100), (128, 33), (33, 128),
]


def k_values(P):
    """Diagonal counts: 1, around the fused group sizes (4 and 8), odd, and all P."""
    return sorted({k for k in (1, 2, 3, 4, 5, 7, 8, 9, P // 2 + 1, P - 1, P) if 1 <= k <= P})


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{n}" for m, n in SHAPES])
def test_shapes_against_reference(shape, dtype, path):
    m, n = shape
    rng = np.random.default_rng(m * 1000 + n)
    for K in k_values(max(m, n)):
        for B in (1, 2, 3, 5, 8, 13):
            check_all(*make_case(rng, B, m, n, K, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(5, 5), (17, 17), (64, 48), (48, 64), (192, 64), (64, 128),
                                   (3, 2), (1, 7)], ids=str)
def test_forward_adds_the_bias_in_its_store_pass(shape, dtype, path):
    """``forward(..., bias)`` equals ``forward(...) + bias`` on every path (gather, scatter,
    rotated square; serial and threaded; batches with leftover rows, of 1 row, and empty).
    The gather stores add the bias to the rounded sum, exactly as ``y += bias`` does; the
    scatter's store adds it to the sum of the two folded halves, in an order that
    ``reassoc`` may change, so there the match is to rounding."""
    m, n = shape
    rng = np.random.default_rng(m * 7 + n)
    for K in sorted({1, min(5, max(m, n)), max(m, n)}):
        for B in (0, 1, 3, 8, 13):
            x, _, offsets, values = make_case(rng, B, m, n, K, dtype)
            bias = rng.standard_normal(m).astype(dtype)
            got = cpu.forward(x, offsets, values, m, bias)
            want = cpu.forward(x, offsets, values, m) + bias
            assert got.dtype == dtype and got.shape == (B, m)
            scale = np.abs(cpu.forward(np.abs(x), offsets, np.abs(values), m)) + np.abs(bias)
            assert_close(got, want, scale, dtype)
            if m <= n:  # a gather: the bias lands on the rounded sum, as y += bias
                np.testing.assert_array_equal(got, want)
    # no diagonals: the bias alone
    x, _, _, _ = make_case(rng, 3, m, n, 1, dtype)
    empty = cpu.forward(x, np.zeros(0, np.int64), np.zeros((0, min(m, n)), dtype), m, bias)
    np.testing.assert_array_equal(empty, np.broadcast_to(bias, (3, m)))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(5, 5), (17, 17), (64, 48), (48, 64), (192, 64), (64, 128),
                                   (3, 2), (1, 7)], ids=str)
def test_forward_applies_the_relu_in_its_store_pass(shape, dtype, path):
    """``forward(..., bias, relu=True)`` is bit for bit ``h * (h > 0)`` of
    ``h = forward(..., bias)`` (the formula of `diagnet.ops.activation.relu`) on every path,
    for batches with leftover rows, of 1 row, and empty, with and without a bias; NaN and
    ``-inf`` outputs give NaN, negatives ``-0.0``, as the composed ReLU."""
    m, n = shape
    rng = np.random.default_rng(m * 11 + n)
    for K in sorted({1, min(5, max(m, n)), max(m, n)}):
        for B in (0, 1, 3, 8, 13):
            x, _, offsets, values = make_case(rng, B, m, n, K, dtype)
            if B:
                x[0, 0] = np.nan  # poisons the outputs that read it
                x[-1, -1] = -np.inf
            bias = rng.standard_normal(m).astype(dtype)
            for b in (bias, None):
                h = cpu.forward(x, offsets, values, m, b)
                with np.errstate(invalid="ignore"):  # -inf * 0 is NaN, as intended
                    want = h * (h > 0)
                got = cpu.forward(x, offsets, values, m, b, relu=True)
                assert got.dtype == dtype and got.shape == (B, m)
                np.testing.assert_array_equal(got, want)
                np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
    empty = cpu.forward(x, np.zeros(0, np.int64), np.zeros((0, min(m, n)), dtype), m, bias,
                        relu=True)
    np.testing.assert_array_equal(empty, np.broadcast_to(bias * (bias > 0), (x.shape[0], m)))


def test_forward_bias_is_checked_and_converted():
    rng = np.random.default_rng(3)
    x, _, offsets, values = make_case(rng, 4, 6, 9, 3, np.float32)
    with pytest.raises(ValueError, match=r"bias must have shape \(m,\) = \(6,\); got \(9,\)"):
        cpu.forward(x, offsets, values, 6, np.zeros(9, np.float32))
    got = cpu.forward(x, offsets, values, 6, np.arange(6.0))  # float64 bias: converted
    np.testing.assert_allclose(got, cpu.forward(x, offsets, values, 6) + np.arange(6.0),
                               rtol=1e-6, atol=1e-6)
    assert got.dtype == np.float32


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(768, 768), (300, 77), (77, 300)], ids=str)
def test_large_batches_use_several_tasks(shape, dtype):
    """Sizes where the default (unforced) dispatch goes parallel with several tasks per thread."""
    m, n = shape
    rng = np.random.default_rng(7)
    for B, K in ((257, 39), (67, 21)):
        check_all(*make_case(rng, B, m, n, K, dtype))


@st.composite
def layouts(draw):
    """``(m, n, K)``: tall, wide and square shapes, each with K = 1, K = P or K in between."""
    kind = draw(st.sampled_from(["tall", "wide", "square"]))
    short = draw(st.integers(1, 60 if kind == "square" else 59))
    long = short if kind == "square" else draw(st.integers(short + 1, 60))
    m, n = (short, long) if kind == "wide" else (long, short)
    P = long
    rule = draw(st.sampled_from(["one", "all", "any", "any"]))
    # "any": about uniform in [1, P] (st.integers(1, P) itself mostly gives the ends)
    K = {"one": 1, "all": P}.get(rule) or 1 + draw(st.integers(0, 2**16)) % P
    return m, n, K


@given(
    B=st.integers(1, 40),
    layout=layouts(),
    f64=st.booleans(),
    parallel=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_random_shapes(B, layout, f64, parallel, seed):
    dtype = np.float64 if f64 else np.float32
    m, n, K = layout
    rng = np.random.default_rng(seed)
    case = make_case(rng, B, m, n, K, dtype)
    saved = {name: getattr(cpu, name) for name in THRESHOLDS + ("_threads",)}
    if parallel:  # (not the fixture: Hypothesis runs every example inside one test call)
        for name in THRESHOLDS:
            setattr(cpu, name, 0)
        cpu._threads = lambda: 2
    try:
        check_all(*case)
    finally:
        for name, value in saved.items():
            setattr(cpu, name, value)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2,
                    reason="numba has one thread here: nothing to compare one thread with")
@pytest.mark.parametrize("shape, K, B", [((200, 120), 50, 200), ((120, 200), 50, 200),
                                         ((160, 160), 50, 200), ((200, 120), 3, 3000)],
                         ids=["tall", "wide", "square", "K3"])
def test_thread_count_does_not_change_results(shape, K, B):
    """All of numba's threads give the one-thread results, and both match the reference.

    The sizes take the threaded path (``B * K * L`` over ``_SERIAL_WORK_VGRAD``, the larger
    threshold) of every kernel: the scatter (tall forward, wide input grad), the gather (wide
    forward, tall input grad), the rotated square gather, and the value grad split by
    diagonals (K = 50) and by batch rows (K = 3: many rows per diagonal)."""
    m, n = shape
    rng = np.random.default_rng(3)
    x, dy, offsets, values = make_case(rng, B, m, n, K, np.float64)
    before = numba.get_num_threads()
    results = {}
    for threads in (1, numba.config.NUMBA_NUM_THREADS):
        numba.set_num_threads(threads)
        try:
            assert cpu._row_threads(B, K, min(m, n)) == threads
            assert cpu._diagonal_threads(B, K, min(m, n)) == threads
            results[threads] = (cpu.forward(x, offsets, values, m),
                                cpu.input_grad(dy, offsets, values, n),
                                cpu.value_grad(dy, x, offsets))
        finally:
            numba.set_num_threads(before)
    ax, ady, av = np.abs(x), np.abs(dy), np.abs(values)
    want = (reference.forward(x, offsets, values, m), reference.input_grad(dy, offsets, values, n),
            reference.value_grad(dy, x, offsets))
    scale = (reference.forward(ax, offsets, av, m), reference.input_grad(ady, offsets, av, n),
             reference.value_grad(ady, ax, offsets))
    for one, many, w, sc in zip(*results.values(), want, scale):
        assert_close(one, w, sc, np.float64)
        assert_close(many, w, sc, np.float64)
        # the same sums, split among threads by rows or diagonals (partial sums over batch
        # chunks only reorder the value grad's batch sum): equal to a few roundings of S
        assert_close(many, one, sc, np.float64)


PARALLEL_KERNELS = ("_gather_parallel", "_scatter_parallel", "_gather_rotated_parallel",
                    "_vgrad_parallel")


def spy_on_parallel_kernels(monkeypatch):
    """Count the calls of the threaded kernels (which still run): ``{name: calls}``."""
    calls = dict.fromkeys(PARALLEL_KERNELS, 0)
    for name in PARALLEL_KERNELS:
        def spy(*args, _name=name, _real=getattr(cpu, name)):
            calls[_name] += 1
            return _real(*args)
        monkeypatch.setattr(cpu, name, spy)
    return calls


def run_all(B, m, n, K, grads=True, seed=0):
    """The kernels on a random float32 case (results unchecked: see `check_all`): forward and
    input grad, and the value grad too with ``grads``."""
    x, dy, offsets, values = make_case(np.random.default_rng(seed), B, m, n, K, np.float32)
    cpu.forward(x, offsets, values, m)
    cpu.input_grad(dy, offsets, values, n)
    if grads:
        cpu.value_grad(dy, x, offsets)


@pytest.mark.parametrize("shape, K", [((256, 784), 79), ((768, 768), 77), ((3072, 768), 308),
                                      ((768, 3072), 308)], ids=str)
def test_small_batches_run_on_the_calling_thread(shape, K, monkeypatch):
    """Batch 1 (online inference) never wakes numba's pool at these sizes (90% sparse).

    With fewer than two tiles of rows a forward or input grad is one task, which the pool
    would run on one thread after the wake-up; the value grad follows its own (measured)
    work threshold. Before, 3072 x 768 at batch 1 took the threaded path: ``B * K * L =
    236,544`` was over the single threshold of 65,536."""
    calls = spy_on_parallel_kernels(monkeypatch)
    m, n = shape
    run_all(1, m, n, K)
    for B in range(2, cpu._MIN_PARALLEL_ROWS):
        run_all(B, m, n, K, grads=False)
    assert calls == dict.fromkeys(PARALLEL_KERNELS, 0)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2,
                    reason="numba has one thread here: every call runs on the calling thread")
@pytest.mark.parametrize("shape, K", [((64, 64), 7), ((128, 64), 13), ((64, 128), 13),
                                      ((192, 64), 20)], ids=str)
def test_vit_sized_calls_use_the_threads(shape, K, monkeypatch):
    """The linears of the example ViT (width 64, 17 tokens x batch 128 = 2176 rows, 90%
    sparse) are large enough for both threads in forward and input grad."""
    calls = spy_on_parallel_kernels(monkeypatch)
    m, n = shape
    run_all(2176, m, n, K)
    row_kernels = ("_gather_parallel", "_scatter_parallel", "_gather_rotated_parallel")
    assert sum(calls[name] for name in row_kernels) == 2


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2,
                    reason="numba has one thread here: every call runs on the calling thread")
@pytest.mark.parametrize("shape, K, B, split", [((64, 64), 7, 2176, "rows"),
                                                ((192, 64), 20, 2176, "rows"),
                                                ((64, 128), 13, 2176, "rows"),
                                                ((768, 768), 77, 64, "diagonals")], ids=str)
def test_threaded_value_grad_splits_rows_of_narrow_layers(shape, K, B, split, monkeypatch):
    """A threaded value grad of a narrow layer with many rows (the example ViT's linears)
    splits the batch among the threads, so that no thread copies every row; a wide layer
    with few rows per diagonal splits the diagonals (no partial sums). Both match the
    reference. Before, every layer with enough diagonals was split by diagonals."""
    splits = []

    def spy(partial, short, long, offsets, n_kchunks, marker, _real=cpu._vgrad_parallel):
        splits.append((n_kchunks, partial.shape[0]))
        return _real(partial, short, long, offsets, n_kchunks, marker)

    monkeypatch.setattr(cpu, "_vgrad_parallel", spy)
    m, n = shape
    x, dy, offsets, _ = make_case(np.random.default_rng(7), B, m, n, K, np.float64)
    got = cpu.value_grad(dy, x, offsets)
    threads = numba.get_num_threads()
    assert splits == [(1, threads) if split == "rows" else (threads, 1)]
    assert_close(got, reference.value_grad(dy, x, offsets),
                 reference.value_grad(np.abs(dy), np.abs(x), offsets), np.float64)


def test_ready_arguments_are_not_copied():
    """C-contiguous arrays of the right dtype reach the kernels as they are (no copy)."""
    x = np.ones((3, 5), np.float32)
    values = np.ones((2, 5), np.float32)
    offsets = np.array([0, 4])
    assert all(a is b for a, b in zip(cpu._float_pair(x, values), (x, values)))
    assert cpu._as_offsets(offsets) is offsets
    # otherwise converted: strided arrays, other dtypes, lists
    fx, fv = cpu._float_pair(x[:, ::2], values.astype(np.float64))
    assert fx.flags.c_contiguous and fv.dtype == np.float32 and fv.flags.c_contiguous
    assert cpu._as_offsets([0, 4]).dtype == np.int64
    assert cpu._as_offsets(offsets[::-1][::-1].astype(np.int32)).dtype == np.int64


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_input_conversions(dtype):
    """Non-contiguous inputs, int32 / uint16 / list offsets, mixed value dtype."""
    rng = np.random.default_rng(11)
    m, n, B, K = 23, 41, 9, 6
    x, dy, offsets, values = make_case(rng, B, m, n, K, dtype)
    want = (reference.forward(x, offsets, values, m),
            reference.input_grad(dy, offsets, values, n),
            reference.value_grad(dy, x, offsets))
    # Fortran-ordered and strided views of the same numbers
    x_f = np.asfortranarray(x)
    dy_s = np.repeat(dy, 2, axis=1)[:, ::2]
    v_s = np.repeat(values, 3, axis=0)[::3]
    assert not dy_s.flags.c_contiguous and not v_s.flags.c_contiguous
    for offs in (offsets.astype(np.int32), offsets.astype(np.uint16), offsets.tolist(),
                 np.repeat(offsets, 2)[::2]):
        got = (cpu.forward(x_f, offs, v_s, m), cpu.input_grad(dy_s, offs, v_s, n),
               cpu.value_grad(dy_s, x_f, offs))
        for g, w in zip(got, want):
            assert g.dtype == dtype
            np.testing.assert_allclose(g, w, rtol=RTOL[dtype], atol=RTOL[dtype] * 10)
    # values of the other float dtype are converted to the input's dtype
    other = np.float64 if dtype == np.float32 else np.float32
    y = cpu.forward(x, offsets, values.astype(other), m)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, want[0], rtol=1e-5, atol=1e-5)


def test_nan_and_inf_propagate_like_the_reference(path):
    """fastmath is limited to contract/reassoc, so NaN and inf reach the same outputs."""
    rng = np.random.default_rng(5)
    for m, n in ((30, 30), (40, 17), (17, 40)):
        x, dy, offsets, values = make_case(rng, 6, m, n, 9, np.float64)
        x[2, 3] = np.nan
        x[4, 0] = np.inf
        dy[1, 5] = -np.inf
        values[1, 2] = np.nan
        pairs = [(cpu.forward(x, offsets, values, m), reference.forward(x, offsets, values, m)),
                 (cpu.input_grad(dy, offsets, values, n),
                  reference.input_grad(dy, offsets, values, n)),
                 (cpu.value_grad(dy, x, offsets), reference.value_grad(dy, x, offsets))]
        for got, want in pairs:
            np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
            np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want))
            np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
            finite = np.isfinite(want)
            np.testing.assert_allclose(got[finite], want[finite], rtol=1e-12, atol=1e-12)


def test_empty_batch_and_no_diagonals():
    x = np.zeros((0, 5), np.float32)
    assert cpu.forward(x, np.array([1]), np.ones((1, 5), np.float32), 8).shape == (0, 8)
    assert cpu.input_grad(np.zeros((0, 8)), [1], np.ones((1, 5)), 5).shape == (0, 5)
    assert cpu.value_grad(np.zeros((0, 8)), np.zeros((0, 5)), [0, 3]).tolist() == [[0.0] * 5] * 2
    x = np.ones((3, 5))
    none = np.zeros(0, np.int64)
    np.testing.assert_array_equal(cpu.forward(x, none, np.zeros((0, 5)), 8), np.zeros((3, 8)))
    np.testing.assert_array_equal(cpu.input_grad(np.ones((3, 8)), none, np.zeros((0, 5)), 5),
                                  np.zeros((3, 5)))
    assert cpu.value_grad(np.ones((3, 8)), x, none).shape == (0, 5)


def test_bad_arguments():
    x = np.ones((2, 5), np.float32)
    with pytest.raises(ValueError, match=r"^values must be \(len\(offsets\), min\(m, n\)\) = "
                                         r"\(2, 5\); got \(2, 4\)$"):
        cpu.forward(x, np.array([0, 1]), np.ones((2, 4), np.float32), 8)
    with pytest.raises(ValueError, match=r"^values must be \(len\(offsets\), min\(m, n\)\) = "
                                         r"\(1, 5\); got \(2, 5\)$"):
        cpu.input_grad(np.ones((2, 8)), np.array([0]), np.ones((2, 5)), 5)
    with pytest.raises(ValueError, match=r"^offsets must lie in \[0, 8\)$"):
        cpu.forward(x, np.array([0, 8]), np.ones((2, 5), np.float32), 8)
    with pytest.raises(ValueError, match=r"^offsets must lie in \[0, 8\)$"):
        cpu.value_grad(np.ones((2, 8)), np.ones((2, 5)), np.array([-1, 2]))
    with pytest.raises(TypeError, match=r"^expected a float32 or float64 array; got int64$"):
        cpu.forward(np.ones((2, 5), np.int64), np.array([0]), np.ones((1, 5)), 8)
    with pytest.raises(TypeError, match=r"^offsets must be integers; got float64$"):
        cpu.forward(x, np.array([0.0]), np.ones((1, 5), np.float32), 8)
    with pytest.raises(ValueError, match=r"^expected a 2-D array; got shape \(5,\)$"):
        cpu.forward(np.ones(5, np.float32), np.array([0]), np.ones((1, 5), np.float32), 8)
    with pytest.raises(ValueError, match=r"^the weight shape must be positive; got \(0, 5\)$"):
        cpu.forward(x, np.array([0]), np.ones((1, 5), np.float32), 0)
    with pytest.raises(ValueError, match=r"^dy and x must have the same batch size; "
                                         r"got 3 and 2$"):
        cpu.value_grad(np.ones((3, 8)), np.ones((2, 5)), np.array([0]))


# ----------------------------------------------------------------------------- fused backward


def check_both(x, dy, offsets, values):
    """`cpu.input_and_value_grad` against the reference input grad and value grad."""
    dtype = x.dtype.type
    n = x.shape[1]
    x64, dy64, v64 = (a.astype(np.float64) for a in (x, dy, values))
    ax, ady, av = np.abs(x64), np.abs(dy64), np.abs(v64)
    dx, dvalues = cpu.input_and_value_grad(dy, x, offsets, values)
    assert_close(dx, reference.input_grad(dy64, offsets, v64, n),
                 reference.input_grad(ady, offsets, av, n), dtype)
    assert_close(dvalues, reference.value_grad(dy64, x64, offsets),
                 reference.value_grad(ady, ax, offsets), dtype)
    # with the bias gradient from the same pass: the same dx and dvalues, bit for bit
    dx3, dvalues3, dbias = cpu.input_value_and_bias_grad(dy, x, offsets, values)
    assert np.array_equal(dx3, dx) and np.array_equal(dvalues3, dvalues)
    assert dbias.dtype == dx.dtype and dbias.shape == (dy.shape[1],)
    assert_close(dbias, dy64.sum(axis=0), ady.sum(axis=0), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{n}" for m, n in SHAPES])
def test_input_and_value_grad_against_reference(shape, dtype, path):
    """The fused backward on every shape kind, K from 1, batches ragged against the tiles;
    on the forced threaded path the small K split the batch (fused, partial sums) and the
    larger ones the diagonals (two separate calls)."""
    m, n = shape
    rng = np.random.default_rng(m * 1000 + n + 1)
    for K in k_values(max(m, n)):
        for B in (1, 2, 3, 5, 8, 13, 37):
            check_both(*make_case(rng, B, m, n, K, dtype))


def spy_on_backward_kernels(monkeypatch):
    """Count the calls of the threaded fused kernel and of the separate products (the
    Python-level functions: a compiled caller cannot call a spy)."""
    names = ("_both_grads_parallel", "_input_grad", "_value_grad")
    calls = dict.fromkeys(names, 0)
    for name in names:
        def spy(*args, _name=name, _real=getattr(cpu, name)):
            calls[_name] += 1
            return _real(*args)
        monkeypatch.setattr(cpu, name, spy)
    return calls


@pytest.mark.parametrize("shape, K, B, threads, chunks", [
    ((64, 64), 7, 2176, 2, 8), ((128, 64), 13, 2176, 2, 8), ((64, 192), 19, 2176, 2, 8),
    ((64, 128), 13, 2176, 3, 12), ((768, 768), 77, 64, 2, 0), ((768, 3072), 308, 32, 2, 0),
    ((64, 64), 7, 7, 2, 1), ((768, 768), 77, 1, 2, 1)], ids=str)
def test_fused_backward_dispatch(shape, K, B, threads, chunks, monkeypatch):
    """Where the value grad would split the batch (the ViT's narrow layers) one fused pass
    splits the batch into about 4 tasks per thread; where it would split its diagonals (wide layers, few rows)
    the two products run separately; small calls run the fused pass on the calling thread."""
    monkeypatch.setattr(cpu, "_threads", lambda: threads)
    m, n = shape
    assert cpu._both_grads_chunks(B, K, min(m, n), max(m, n)) == chunks
    calls = spy_on_backward_kernels(monkeypatch)
    check_both(*make_case(np.random.default_rng(11), B, m, n, K, np.float64))
    separate = int(chunks == 0)
    # check_both runs the pass twice: without and with the bias gradient
    assert calls == {"_both_grads_parallel": 2 * int(chunks > 1), "_input_grad": 2 * separate,
                     "_value_grad": 2 * separate}


def test_input_value_and_bias_grad_propagates_nan_and_inf(path):
    rng = np.random.default_rng(6)
    for m, n in ((30, 30), (40, 17), (17, 40)):
        x, dy, offsets, values = make_case(rng, 6, m, n, 9, np.float64)
        x[2, 3] = np.nan
        dy[1, 5] = -np.inf
        values[1, 2] = np.nan
        got = cpu.input_value_and_bias_grad(dy, x, offsets, values)
        want = (reference.input_grad(dy, offsets, values, n),
                reference.value_grad(dy, x, offsets), dy.sum(axis=0))
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.isnan(g), np.isnan(w))
            np.testing.assert_array_equal(np.isinf(g), np.isinf(w))
            finite = np.isfinite(w)
            np.testing.assert_allclose(g[finite], w[finite], rtol=1e-12, atol=1e-12)


def test_input_and_value_grad_edge_cases_and_conversions():
    dx, dv = cpu.input_and_value_grad(np.zeros((0, 8)), np.zeros((0, 5)), [0, 3],
                                      np.ones((2, 5)))
    assert dx.shape == (0, 5) and dv.tolist() == [[0.0] * 5] * 2
    dx, dv = cpu.input_and_value_grad(np.ones((3, 8)), np.ones((3, 5)), np.zeros(0, np.int64),
                                      np.zeros((0, 5)))
    assert dx.tolist() == [[0.0] * 5] * 3 and dv.shape == (0, 5)
    dx, dv, db = cpu.input_value_and_bias_grad(np.zeros((0, 8)), np.zeros((0, 5)), [0, 3],
                                               np.ones((2, 5)))
    assert dx.shape == (0, 5) and db.tolist() == [0.0] * 8
    # strided dy, float64 x and values, int32 offsets: converted to dy's float32
    rng = np.random.default_rng(8)
    x, dy, offsets, values = make_case(rng, 9, 12, 7, 4, np.float32)
    wide_dy = np.repeat(dy, 2, axis=1)[:, ::2]
    dx, dv = cpu.input_and_value_grad(wide_dy, x.astype(np.float64), offsets.astype(np.int32),
                                      values.astype(np.float64))
    assert dx.dtype == dv.dtype == np.float32
    np.testing.assert_allclose(dx, cpu.input_grad(dy, offsets, values, 7), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dv, cpu.value_grad(dy, x, offsets), rtol=1e-5, atol=1e-5)


def test_input_and_value_grad_bad_arguments():
    dy, x = np.ones((2, 8)), np.ones((2, 5))
    with pytest.raises(ValueError, match=r"^dy and x must have the same batch size; "
                                         r"got 2 and 3$"):
        cpu.input_and_value_grad(dy, np.ones((3, 5)), [0], np.ones((1, 5)))
    with pytest.raises(ValueError, match=r"^values must be \(len\(offsets\), min\(m, n\)\) = "
                                         r"\(1, 5\); got \(2, 5\)$"):
        cpu.input_and_value_grad(dy, x, [0], np.ones((2, 5)))
    with pytest.raises(ValueError, match=r"^values must be a 2-D array; got shape \(5,\)$"):
        cpu.input_and_value_grad(dy, x, [0], np.ones(5))
    with pytest.raises(ValueError, match=r"^offsets must lie in \[0, 8\)$"):
        cpu.input_and_value_grad(dy, x, [8], np.ones((1, 5)))
    with pytest.raises(TypeError, match=r"^expected a float32 or float64 array; got int64$"):
        cpu.input_and_value_grad(dy.astype(np.int64), x, [0], np.ones((1, 5)))
    with pytest.raises(ValueError, match=r"^expected a 2-D array; got shape \(5,\)$"):
        cpu.input_and_value_grad(dy, np.ones(5), [0], np.ones((1, 5)))
