"""The CUDA kernels (kernels/*.cu) and their launcher (diagnet.diag.cuda), checked without a GPU.

Three layers:

* **nvcc** compiles every ``kernels/*.cu`` for sm_80 and sm_90 with warnings as errors and
  ``ptxas -v``; the registers, spills and shared memory of each kernel are parsed and printed
  (``pytest -s``), and a spill or stack frame fails the test. Skipped where nvcc is absent.
* **SIMT emulation**: ``tests/simt/harness.cpp`` #includes the real ``kernels/diag_linear.cu``
  after a shim that maps blocks to teams of std::threads (see ``tests/simt/cuda_shim.h``). The
  tests give the launcher the CuPy stand-in ``tests/simt/fake_cupy.py``, whose ``RawModule``
  builds the harness with g++ (with the launcher's own ``-D`` options, under AddressSanitizer
  and UBSan) and whose kernels run in it. So the *real launcher* runs end to end: argument
  checks, int32/int64 scalar casts, contiguity, the grid from `launch_config`, the two-pass
  value grad. Results are compared with `diagnet.diag.reference`. Skipped where g++ is absent.
* **GPU** (marked ``gpu``): the same comparisons, larger, through whatever ``cupy`` is: real
  CuPy on a GPU machine, or the stand-in with ``pytest --fake-cupy``; skipped otherwise.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
from simt import fake_cupy
from simt.harness import (GXX, KERNEL_DIR, NO_GXX_REASON, ROOT, HarnessError, binary_unusable,
                          run_harness, shared_builder)
from simt.nvcc import NVCC, nvcc_compile

from diagnet import backend, cuda_launch
from diagnet.diag import cuda, reference
from tolerances import cuda_kernel_tol

KERNEL_SOURCES = sorted(KERNEL_DIR.glob("*.cu"))

ARCHS = ("sm_80", "sm_90")

# Entry points the launcher calls, per dtype.
KERNEL_BASES = ("diag_forward", "diag_input_grad", "diag_value_grad", "diag_value_grad_reduce")
EXPECTED_KERNELS = {f"{base}_{sfx}" for base in KERNEL_BASES for sfx in ("f32", "f64")}

# Tiny tiles keep the emulated thread count low and make every shape ragged: odd rows per
# thread, offset chunks smaller than K, a value-grad KPT that does not divide K, and batch
# splits with the reduction pass from a few rows on.
SMALL = cuda.KernelConfig(gather_block_x=8, gather_block_y=2, gather_rows=3, offset_chunk=3,
                          min_blocks_per_sm=1, vg_block_x=8, vg_block_y=4, vg_kpt=3,
                          reduce_block=16, vg_target_blocks=64, vg_min_batch_per_split=3)
# The same compiled kernels with the grids capped at 2 blocks in y (and in the reduction), so
# that the grid-stride loops over batch tiles, diagonal groups and partial sums run.
STRIDED = dataclasses.replace(SMALL, max_grid_y=2, max_reduce_blocks=2)
CONFIGS = {"small": SMALL, "strided": STRIDED, "default": cuda.DEFAULT_CONFIG}

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc (CUDA toolkit) is not on PATH")
needs_gxx = pytest.mark.skipif(GXX is None, reason=NO_GXX_REASON)


# =====================================================================================
# nvcc: compile, warnings as errors, registers and spills
# =====================================================================================

@pytest.fixture(scope="module", params=ARCHS)
def nvcc_build(request, tmp_path_factory):
    """Every kernels/*.cu compiled once for one arch with the launcher's default constants."""
    if NVCC is None:
        pytest.skip("nvcc (CUDA toolkit) is not on PATH")
    arch = request.param
    outdir = tmp_path_factory.mktemp(f"nvcc_{arch}")
    builds = {src.name: nvcc_compile(src, arch, cuda.DEFAULT_CONFIG.defines(), outdir)
              for src in KERNEL_SOURCES}
    return arch, builds


def _report(arch, kernels) -> str:
    rows = [f"{'arch':6} {'kernel':28} {'regs':>4} {'spill st':>8} {'spill ld':>8} "
            f"{'stack':>5} {'smem':>6}"]
    for name, k in sorted(kernels.items()):
        rows.append(f"{arch:6} {name:28} {k.get('registers', -1):>4} {k.get('spill_stores', -1):>8} "
                    f"{k.get('spill_loads', -1):>8} {k.get('stack', -1):>5} {k.get('smem', 0):>6}")
    return "\n".join(rows)


@needs_nvcc
def test_kernel_sources_exist():
    assert "diag_linear.cu" in [p.name for p in KERNEL_SOURCES]


@needs_nvcc
def test_nvcc_compiles_without_warnings(nvcc_build):
    arch, builds = nvcc_build
    for name, (res, _) in builds.items():
        assert res.returncode == 0, f"nvcc -arch={arch} {name} failed:\n{res.stderr}"
        assert "warning" not in (res.stdout + res.stderr).lower(), res.stdout + res.stderr


@needs_nvcc
def test_nvcc_no_spills_and_resource_report(nvcc_build, record_property):
    arch, builds = nvcc_build
    kernels = {}
    for _, (res, parsed) in builds.items():
        assert res.returncode == 0, res.stderr
        kernels.update(parsed)
    print("\n" + _report(arch, kernels))
    record_property(f"ptxas_{arch}", {k: dict(v) for k, v in kernels.items()})
    assert EXPECTED_KERNELS <= set(kernels), f"missing entry points: {EXPECTED_KERNELS - set(kernels)}"
    for name, k in kernels.items():
        assert k["spill_stores"] == 0 and k["spill_loads"] == 0, f"{arch} {name} spills: {k}"
        assert k["stack"] == 0, f"{arch} {name} uses a stack frame: {k}"
        assert k["smem"] <= 48 * 1024, f"{arch} {name} needs more than 48 KiB static smem: {k}"
    # __launch_bounds__(256, DIAG_MIN_BLOCKS_PER_SM) must hold the registers to 65536 / (256 * min)
    cfg = cuda.DEFAULT_CONFIG
    cap = 65536 // (cfg.gather_block_x * cfg.gather_block_y * cfg.min_blocks_per_sm)
    for name in ("diag_forward", "diag_input_grad"):
        for sfx in ("f32", "f64"):
            assert kernels[f"{name}_{sfx}"]["registers"] <= cap


@needs_nvcc
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nvcc_compiles_launcher_options(dtype, tmp_path):
    """The exact per-dtype options the launcher gives NVRTC compile, for the test tiles too."""
    src = KERNEL_DIR / cuda.KERNEL_FILE
    config = SMALL if dtype is np.float32 else cuda.DEFAULT_CONFIG
    res, parsed = nvcc_compile(src, "sm_90", cuda.compile_options(dtype, config), tmp_path)
    assert res.returncode == 0, res.stderr
    sfx = "f32" if dtype is np.float32 else "f64"
    assert set(parsed) == {f"{base}_{sfx}" for base in KERNEL_BASES}


def test_config_defaults_match_source():
    """The #ifndef defaults in the .cu equal KernelConfig's defaults (and every one is passed)."""
    text = (KERNEL_DIR / cuda.KERNEL_FILE).read_text()
    defaults = {name: int(value) for name, value in
                re.findall(r"#ifndef (DIAG_\w+)\s*\n#define \1 (\d+)", text)}
    expected = {macro: getattr(cuda.DEFAULT_CONFIG, field) for field, macro in cuda.COMPILED_FIELDS.items()}
    expected.update(DIAG_ENABLE_F32=1, DIAG_ENABLE_F64=1)
    assert defaults == expected


def test_launcher_has_no_direct_cupy_import():
    src = (ROOT / "diagnet" / "diag" / "cuda.py").read_text()
    assert not re.search(r"^\s*(import cupy|from cupy)", src, re.M)


def test_import_and_clear_error_without_cupy():
    if backend.cuda_available():
        pytest.skip("CuPy and a GPU are present")
    with pytest.raises(RuntimeError, match="CuPy"):
        cuda.forward(np.zeros((1, 2), np.float32), np.zeros(1, np.int32),
                     np.zeros((1, 2), np.float32), 2)


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
@pytest.mark.parametrize("B,m,n,K", [(1, 1, 1, 1), (3, 7, 5, 2), (10**6, 4096, 1024, 4096),
                                     (2**21, 64, 4096, 4096), (5, 70000, 3, 70000),
                                     (7, 3, 300000, 300000), (2**31 - 1, 16, 16, 16)])
def test_launch_config_respects_cuda_limits_and_covers_outputs(config, B, m, n, K):
    L = min(m, n)
    for kind, n_out in (("forward", m), ("input_grad", n)):
        p = cuda.launch_config(kind, B, m, n, K, config)
        assert p.block == (config.gather_block_x, config.gather_block_y, 1)
        assert 1 <= p.grid[0] <= cuda.MAX_GRID_X and 1 <= p.grid[1] <= config.max_grid_y
        assert p.grid[2] == 1 and p.grid[0] * p.block[0] >= n_out
        assert p.grid[0] * p.block[0] - n_out < p.block[0]  # no fully idle column blocks
    p = cuda.launch_config("value_grad", B, m, n, K, config)
    assert p.grid[0] * config.vg_block_x >= L and 1 <= p.grid[1] <= config.max_grid_y
    assert 1 <= p.splits == p.grid[2] <= cuda.MAX_GRID_YZ
    assert p.splits * p.batch_per_split >= B > (p.splits - 1) * p.batch_per_split
    assert p.batch_per_split <= 2**31 - 1
    if p.splits > 1:
        assert 1 <= p.reduce_grid[0] <= config.max_reduce_blocks and p.reduce_block[0] <= 1024
    with pytest.raises(ValueError):
        cuda.launch_config("backward", B, m, n, K, config)


def test_launch_config_rejects_sizes_the_kernels_cannot_index():
    with pytest.raises(ValueError, match="m \\+ n must be < 2\\*\\*31"):
        cuda.launch_config("forward", 1, 2**30, 2**30, 1)
    with pytest.raises(ValueError, match="positive sizes"):
        cuda.launch_config("value_grad", 0, 3, 3, 1)


def test_kernel_config_validation():
    with pytest.raises(ValueError, match="power of two"):
        cuda.KernelConfig(vg_block_y=6)
    with pytest.raises(ValueError, match="1024"):
        cuda.KernelConfig(gather_block_x=64, gather_block_y=32)
    with pytest.raises(ValueError, match="positive"):
        cuda.KernelConfig(offset_chunk=0)


# =====================================================================================
# SIMT emulation: g++ harness + a fake CuPy driving the real launcher
# =====================================================================================

@pytest.fixture(scope="session")
def harness_builder():
    """The shared harness builder, with every build the kernel tests need already started."""
    if GXX is None:
        pytest.skip(NO_GXX_REASON)
    builder = shared_builder()
    # start every build the session needs at once (the cores compile in parallel)
    for config in (SMALL, cuda.DEFAULT_CONFIG):
        for dtype in (np.float32, np.float64):
            builder.submit(cuda.KERNEL_FILE, cuda.compile_options(dtype, config), "asan")
    # ASan where it runs
    builder.check_flavor(cuda.KERNEL_FILE, cuda.compile_options(np.float32, SMALL))
    return builder




@pytest.fixture
def fake(make_fake):
    return make_fake()


# ---- problems ---------------------------------------------------------------------------

# (m, n, B, K); K = None means all P diagonals.
CASES = [
    (1, 1, 1, 1),        # 1x1
    (1, 9, 2, 4),        # one output: L = 1, wide
    (9, 1, 3, None),     # one input: L = 1, tall, K = P
    (5, 5, 4, None),     # square, K = P
    (7, 3, 5, 2),        # tall
    (3, 7, 5, 2),        # wide
    (31, 31, 1, 1),      # batch 1, K = 1
    (37, 53, 13, 11),    # primes, wide, ragged everywhere
    (53, 37, 17, None),  # primes, tall, K = P
    (16, 24, 24, 6),     # sizes that are multiples of the small tiles
    (29, 29, 23, 9),     # square prime
    (2, 64, 40, None),   # very wide, K = P = 64, value grad splits the batch
]


def case_id(case):
    m, n, B, K = case
    return f"{m}x{n}-B{B}-K{'P' if K is None else K}"


def make_problem(case, dtype, seed=0):
    m, n, B, K = case
    P = max(m, n)
    rng = np.random.default_rng([seed, m, n, B, P if K is None else K])
    offsets = np.arange(P) if K is None else np.sort(rng.choice(P, size=K, replace=False))
    K = len(offsets)
    return dict(
        m=m, n=n, B=B, K=K,
        x=rng.standard_normal((B, n)).astype(dtype),
        dy=rng.standard_normal((B, m)).astype(dtype),
        offsets=offsets.astype(np.int64),
        values=rng.standard_normal((K, min(m, n))).astype(dtype),
    )


def expected(kind, p):
    if kind == "forward":
        return reference.forward(p["x"], p["offsets"], p["values"], p["m"])
    if kind == "input_grad":
        return reference.input_grad(p["dy"], p["offsets"], p["values"], p["n"])
    return reference.value_grad(p["dy"], p["x"], p["offsets"])


def launch(kind, p, dev, config):
    if kind == "forward":
        return cuda.forward(dev(p["x"]), dev(p["offsets"]), dev(p["values"]), p["m"], config=config)
    if kind == "input_grad":
        return cuda.input_grad(dev(p["dy"]), dev(p["offsets"]), dev(p["values"]), p["n"], config=config)
    return cuda.value_grad(dev(p["dy"]), dev(p["x"]), dev(p["offsets"]), config=config)


def assert_matches(kind, got, p):
    want = expected(kind, p)
    got = got if isinstance(got, np.ndarray) else got.get()
    assert got.dtype == want.dtype and got.shape == want.shape
    terms = p["K"] if kind != "value_grad" else p["B"]
    np.testing.assert_allclose(got, want, **cuda_kernel_tol(want.dtype, terms))


KINDS = ["forward", "input_grad", "value_grad"]
DTYPES = [np.float32, np.float64]


@needs_gxx
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("config_name", ["small", "strided"])
def test_emulated_kernel_matches_reference(fake, config_name, case, kind, dtype):
    p = make_problem(case, dtype)
    got = launch(kind, p, fake_cupy.asarray, CONFIGS[config_name])
    assert isinstance(got, fake_cupy.ndarray)
    assert_matches(kind, got, p)
    assert fake.launches, "nothing was launched"


@needs_gxx
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", [(53, 37, 130, 40), (37, 53, 20, None)], ids=case_id)
def test_emulated_kernel_default_config(fake, case, kind, dtype):
    """The real default tiles (256-thread blocks) and the default compile options."""
    p = make_problem(case, dtype, seed=1)
    got = launch(kind, p, fake_cupy.asarray, None)
    assert_matches(kind, got, p)
    assert fake.compiles == [cuda.compile_options(dtype)]
    for _, grid, block in fake.launches:
        assert block[0] * block[1] * block[2] == 256


@needs_gxx
def test_emulated_paths_are_exercised(fake):
    """The cases above really hit the batch split + reduction and the grid-stride loops."""
    p = make_problem((2, 64, 40, None), np.float64)
    for config in (SMALL, STRIDED):
        fake.launches.clear()
        launch("value_grad", p, fake_cupy.asarray, config)
        names = [name for name, _, _ in fake.launches]
        assert names == ["diag_value_grad_f64", "diag_value_grad_reduce_f64"]
        (_, grid, _), (_, rgrid, _) = fake.launches
        assert grid[2] > 1
        if config is STRIDED:
            assert grid[1] == 2 and rgrid[0] == 2  # K = 64 > 2 * vg_kpt, K * L > 2 * 16
    plan = cuda.launch_config("forward", 40, 2, 64, 64, STRIDED)
    assert plan.grid[1] == 2 < 40 / (SMALL.gather_block_y * SMALL.gather_rows)
    # the default split: 130 rows over 3 splits of 44
    assert cuda.launch_config("value_grad", 130, 53, 37, 40).splits == 3


@needs_gxx
def test_emulated_empty_shapes_launch_nothing(fake):
    x = fake_cupy.asarray(np.ones((0, 4), np.float32))
    y = cuda.forward(x, np.array([0, 2]), fake_cupy.asarray(np.ones((2, 3), np.float32)), 3)
    assert isinstance(y, fake_cupy.ndarray) and y.shape == (0, 3)
    y = cuda.forward(fake_cupy.asarray(np.ones((2, 4), np.float32)), np.zeros(0, np.int64),
                     fake_cupy.asarray(np.ones((0, 3), np.float32)), 3)
    assert y.shape == (2, 3) and not y.get().any()
    g = cuda.value_grad(fake_cupy.asarray(np.ones((0, 3))), fake_cupy.asarray(np.ones((0, 4))), np.array([1, 3]))
    assert g.shape == (2, 3) and not g.get().any()
    assert fake.launches == []


@needs_gxx
def test_emulated_noncontiguous_and_host_offsets(fake):
    """Strided inputs are made contiguous; offsets may come from the host as any int type."""
    p = make_problem((37, 53, 13, 11), np.float32)
    x = fake_cupy.asarray(np.asfortranarray(p["x"]))
    assert not x.flags.c_contiguous
    wide = fake_cupy.asarray(np.repeat(p["values"], 2, axis=1))[:, ::2]
    y = cuda.forward(x, p["offsets"].astype(np.int16), wide, 37, config=SMALL)
    np.testing.assert_allclose(y.get(), expected("forward", p), rtol=2e-5, atol=1e-5)
    g = cuda.value_grad(fake_cupy.asarray(p["dy"]), x, list(p["offsets"]), config=SMALL)
    np.testing.assert_allclose(g.get(), expected("value_grad", p), rtol=2e-5, atol=1e-5)


@needs_gxx
def test_emulated_out_of_range_offsets_stay_in_bounds(fake):
    """Offsets outside [0, P) are reduced modulo P by the kernels (ASan would catch a fault)."""
    p = make_problem((7, 3, 5, 2), np.float64)
    bad = p["offsets"] + np.array([7, -14])
    for kind in KINDS:
        q = dict(p, offsets=bad)
        got = launch(kind, q, fake_cupy.asarray, SMALL)
        assert_matches(kind, got, p)


# Output on the long side (forward with m > n, input grad with m < n): each column block only
# walks the runs of sorted offsets in its cyclic range (i0 - L, i_hi] mod P. Offsets that
# cluster, sit at the ends or straddle the wrap-around 0 / P - 1 exercise both runs and the
# empty runs; (P, L) = (97, 13) keeps that range shorter than P for every tile config.
RUN_OFFSETS = {
    "cluster-mid": [40, 41, 42, 43, 44],
    "cluster-end": [90, 91, 92, 93, 94, 95, 96],
    "straddle-wrap": [0, 1, 2, 94, 95, 96],
    "ends-only": [0, 96],
    "K1-at-0": [0],
    "K1-at-P-1": [96],
    "spread": [3, 17, 18, 30, 52, 53, 54, 71, 88, 96],
}


def make_offsets_problem(m, n, B, offsets, dtype, seed=2):
    rng = np.random.default_rng([seed, m, n, B, len(offsets)])
    offsets = np.asarray(offsets, dtype=np.int64)
    return dict(
        m=m, n=n, B=B, K=len(offsets),
        x=rng.standard_normal((B, n)).astype(dtype),
        dy=rng.standard_normal((B, m)).astype(dtype),
        offsets=offsets,
        values=rng.standard_normal((len(offsets), min(m, n))).astype(dtype),
    )


@needs_gxx
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("config_name", ["small", "strided", "default"])
@pytest.mark.parametrize("offsets", list(RUN_OFFSETS.values()), ids=list(RUN_OFFSETS))
def test_emulated_long_side_offset_runs(fake, offsets, config_name, dtype):
    """The per-block offset runs of the long-side gather: tall forward and wide input grad."""
    for kind, (m, n) in (("forward", (97, 13)), ("input_grad", (13, 97))):
        p = make_offsets_problem(m, n, 5, offsets, dtype)
        assert_matches(kind, launch(kind, p, fake_cupy.asarray, CONFIGS[config_name]), p)


@needs_gxx
def test_emulated_long_side_runs_with_unwrapped_or_unsorted_offsets(fake):
    """The runs are found on the offsets reduced modulo P: out-of-range offsets whose wrapped
    values are sorted still give exact results; unsorted offsets may give wrong numbers but
    every access stays in bounds (ASan) and every output is written (no NaN fill left)."""
    for kind, (m, n) in (("forward", (97, 13)), ("input_grad", (13, 97))):
        p = make_offsets_problem(m, n, 5, RUN_OFFSETS["straddle-wrap"], np.float64)
        bad = p["offsets"] + 97 * np.array([1, -1, 0, 2, -3, 0])
        assert_matches(kind, launch(kind, dict(p, offsets=bad), fake_cupy.asarray, SMALL), p)
        for unsorted in ([96, 0, 50, 3, 95, 40], [5, 4, 3, 2, 1, 0]):
            got = launch(kind, dict(p, offsets=np.array(unsorted)), fake_cupy.asarray, SMALL)
            assert np.isfinite(got.get()).all()


def test_launcher_argument_errors(monkeypatch, tmp_path):
    """Clear TypeError/ValueError naming the argument (needs no compiler: nothing launches)."""
    fake = fake_cupy.SimtDevice(builder=None, workdir=tmp_path)
    monkeypatch.setattr(cuda_launch, "require_cupy", lambda what="": fake_cupy)
    monkeypatch.setattr(fake_cupy, "_device", fake)
    cuda.clear_cache()
    dev = fake_cupy.asarray
    x32, v32 = dev(np.ones((2, 4), np.float32)), dev(np.ones((1, 3), np.float32))
    off = np.array([1])
    with pytest.raises(TypeError, match=r"x must be a cupy.ndarray on the GPU; got numpy.ndarray"):
        cuda.forward(np.ones((2, 4), np.float32), off, v32, 3)
    with pytest.raises(TypeError, match=r"x must be float32 or float64; got dtype int64"):
        cuda.forward(dev(np.ones((2, 4), np.int64)), off, v32, 3)
    with pytest.raises(TypeError, match=r"values must have the dtype of x \(float64\); got float32"):
        cuda.forward(dev(np.ones((2, 4))), off, v32, 3)
    with pytest.raises(ValueError, match=r"values must have shape \(K, min\(m, n\)\) = \(1, 4\); got \(1, 3\)"):
        cuda.forward(x32, off, v32, 5)
    with pytest.raises(ValueError, match=r"x must be 2-D; got shape \(8,\)"):
        cuda.forward(dev(np.ones(8, np.float32)), off, v32, 3)
    with pytest.raises(ValueError, match="offsets must have length K"):
        cuda.forward(x32, np.array([1, 2]), v32, 3)
    with pytest.raises(TypeError, match="offsets must be integers"):
        cuda.forward(x32, np.array([1.0]), v32, 3)
    with pytest.raises(TypeError, match="offsets must have an integer dtype"):
        cuda.forward(x32, dev(np.array([1.0])), v32, 3)
    with pytest.raises(ValueError, match=r"m must be in \[0, 2\*\*31 - 1\]"):
        cuda.forward(x32, off, v32, -3)
    with pytest.raises(TypeError, match="n must be an int"):
        cuda.input_grad(dev(np.ones((2, 3), np.float32)), off, v32, 4.0)
    with pytest.raises(TypeError, match=r"x must have the dtype of dy \(float32\); got float64"):
        cuda.value_grad(dev(np.ones((2, 3), np.float32)), dev(np.ones((2, 4))), off)
    with pytest.raises(ValueError, match="same batch size"):
        cuda.value_grad(dev(np.ones((2, 3))), dev(np.ones((3, 4))), off)
    assert fake.launches == [] and fake.compiles == []


# ---- the harness itself -----------------------------------------------------------------


def _tsan_usable(builder) -> str:
    return binary_unusable(builder, "tsan", cuda.KERNEL_FILE,
                           cuda.compile_options(np.float32, SMALL))


@needs_gxx
def test_emulation_is_race_free_under_tsan(make_fake, harness_builder):
    """ThreadSanitizer sees no data race on the shared arrays with the real barriers."""
    reason = _tsan_usable(harness_builder)
    if reason:
        pytest.skip(reason)
    make_fake("tsan")
    for kind in KINDS:
        p = make_problem((37, 53, 13, 11), np.float32)
        assert_matches(kind, launch(kind, p, fake_cupy.asarray, STRIDED), p)


@needs_gxx
def test_harness_detects_missing_syncthreads(make_fake, harness_builder):
    """Self-test: with __syncthreads() a no-op, ThreadSanitizer reports the shared-memory races,
    so the emulation above would catch a missing or misplaced barrier."""
    reason = _tsan_usable(harness_builder)
    if reason:
        pytest.skip(reason)
    make_fake("tsan-broken-sync")
    p = make_problem((37, 53, 13, 11), np.float32)
    for kind in ("forward", "value_grad"):
        with pytest.raises(HarnessError, match="ThreadSanitizer: data race"):
            launch(kind, p, fake_cupy.asarray, SMALL)


@needs_gxx
def test_harness_rejects_wrong_scalar_types(harness_builder, tmp_path):
    """A Python int would reach the kernel as long long: the harness refuses int64 for int."""
    binary = harness_builder.build(cuda.KERNEL_FILE, cuda.compile_options(np.float32, SMALL),
                                   harness_builder.flavor)
    x = np.ones((2, 4), np.float32)
    args = (x, np.array([1], np.int32), np.ones((1, 3), np.float32), np.empty((2, 3), np.float32),
            np.int32(2), np.int64(3), np.int32(4), np.int32(1))
    with pytest.raises(HarnessError, match="argument 5 should be 'i'"):
        run_harness(binary, "diag_forward_f32", (1, 1, 1), (8, 2, 1), args, tmp_path)
    args = args[:5] + (np.int32(3),) + args[6:]
    with pytest.raises(HarnessError, match="invalid block"):
        run_harness(binary, "diag_forward_f32", (1, 1, 1), (64, 32, 1), args, tmp_path)
    with pytest.raises(HarnessError, match="no kernel named diag_forward_f64"):
        run_harness(binary, "diag_forward_f64", (1, 1, 1), (8, 2, 1), args, tmp_path)
    out = run_harness(binary, "diag_forward_f32", (1, 1, 1), (8, 2, 1), args, tmp_path)
    assert list(out) == [3]


# =====================================================================================
# GPU (CuPy, or the stand-in with --fake-cupy): skipped where CUDA is not available
# =====================================================================================


# Sizes a real GPU runs in milliseconds; with K > offset_chunk they also take the default
# tiles through several offset chunks.
LARGE_CASES = [(512, 384, 300, 77), (384, 1000, 1030, None)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES + LARGE_CASES, ids=case_id)
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_gpu_kernel_matches_reference(request, config_name, case, kind, dtype):
    cp = backend.cupy_or_none()
    if cp is fake_cupy:  # pytest --fake-cupy
        if case in LARGE_CASES and config_name != "default":
            # The tiny test tiles turn these sizes into tens of thousands of blocks and
            # millions of emulated barriers (one std::thread per CUDA thread): minutes each.
            pytest.skip(f"{case_id(case)} with the {config_name!r} tiles takes minutes under "
                        "SIMT emulation; run on a real GPU (the small cases cover these tiles)")
        request.getfixturevalue("harness_builder")  # starts all the builds at once
    p = make_problem(case, dtype)
    got = launch(kind, p, cp.asarray, CONFIGS[config_name])
    assert isinstance(got, cp.ndarray)
    assert_matches(kind, got, p)
