"""The GPU foreach optimizers: ``kernels/optim.cu`` and its launcher `diagnet.optim._foreach_cuda`.

The kernels must give exactly (``array_equal``, not allclose) what the per-parameter CuPy code
of `Adam._update` / `SGD._update` gives. Checked in layers:

* **nvcc** compiles ``optim.cu`` with the launcher's options for sm_80 and sm_90, warnings as
  errors, no spills (skipped where nvcc is absent).
* **SIMT emulation** (g++): the harness runs the kernels with their tables of device addresses
  (a harness extension, tested here too), launched by the real launcher on CuPy stand-in
  arrays, against the optimizers' own NumPy code on copies of the same arrays, with tiny
  grids so that the grid-stride loop crosses parameter boundaries.
* **GPU** (marked ``gpu``: a real GPU, or ``--fake-cupy``): whole optimizers over several
  steps, every option, float32 and float64, parameters of sizes 0 to a few thousand, against
  the same optimizer updating one parameter at a time. Through the stand-in the per-parameter
  code runs in NumPy, so there the kernel reproduces NumPy's roundings; on a GPU it must
  reproduce CuPy's (why it does: `diagnet.optim._foreach_cuda`).
"""

from __future__ import annotations

import numpy as np
import pytest
from simt import fake_cupy
from simt.harness import (GXX, KERNEL_DIR, NO_GXX_REASON, AddressTable, HarnessError,
                          run_harness, shared_builder)
from simt.nvcc import NVCC, nvcc_compile

from diagnet import backend, cuda_launch
from diagnet.autograd import Tensor
from diagnet.nn.parameter import Parameter
from diagnet.optim import SGD, Adam, AdamW, Optimizer, _foreach_cuda

needs_gxx = pytest.mark.skipif(GXX is None, reason=NO_GXX_REASON)
DTYPES = [np.float32, np.float64]

#: every option of the kernels: weight decay none / L2 / decoupled, amsgrad, maximize;
#: momentum with and without dampening and weight decay, Nesterov
CASES = {
    "adam": (Adam, dict(lr=0.01)),
    "adam_l2_amsgrad": (Adam, dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
    "adam_maximize": (Adam, dict(lr=0.01, betas=(0.5, 0.9), eps=1e-3, maximize=True)),
    "adamw": (AdamW, dict(lr=0.01, weight_decay=0.1)),
    "adamw_no_decay": (AdamW, dict(lr=0.02, weight_decay=0.0)),
    "adamw_amsgrad_maximize": (AdamW, dict(lr=0.01, weight_decay=0.1, amsgrad=True,
                                           maximize=True)),
    "sgd": (SGD, dict(lr=0.1)),
    "sgd_weight_decay_maximize": (SGD, dict(lr=0.05, weight_decay=0.1, maximize=True)),
    "sgd_momentum": (SGD, dict(lr=0.1, momentum=0.9)),
    "sgd_momentum_dampening": (SGD, dict(lr=0.1, momentum=0.8, dampening=0.3,
                                         weight_decay=0.05)),
    "sgd_nesterov_maximize": (SGD, dict(lr=0.02, momentum=0.7, weight_decay=0.05,
                                        nesterov=True, maximize=True)),
}
#: 0-d, 1, odd, empty and a few thousand values
SHAPES = [(), (1,), (7,), (3, 5), (0, 3), (2999,), (13, 17), (1, 1, 1), (64,), (5, 0)]


def _one_at_a_time(cls):
    """``cls`` updating one parameter at a time in its per-parameter code (the reference)."""
    return type(f"OneAtATime{cls.__name__}", (cls,), {"_update_group": Optimizer._update_group})


def _data(rng, shape, dtype):
    # gradients of varying size and sign, a few exact zeros
    a = rng.standard_normal(shape) * rng.choice([0.0, 0.1, 1.0, 3.0], size=shape)
    return np.asarray(a, dtype=dtype)


# =====================================================================================
# launcher, pure Python
# =====================================================================================


@pytest.mark.parametrize("total", [1, 255, 256, 257, 3000, 10**9])
def test_launch_config_covers_every_element_within_the_block_cap(total):
    grid, block = _foreach_cuda.launch_config(total)
    assert block == (_foreach_cuda.THREADS, 1, 1) and grid[1:] == (1, 1)
    assert 1 <= grid[0] <= _foreach_cuda.MAX_BLOCKS
    assert grid[0] * block[0] >= total or grid[0] == _foreach_cuda.MAX_BLOCKS
    assert _foreach_cuda.launch_config(total, threads=32, max_blocks=2)[0][0] <= 2


def test_overlap_check_counts_bytes_and_allows_adjacent_arrays():
    """Two roles of two parameters of 8 and 16 bytes: touching arrays are disjoint, one
    shared byte is not, wherever it is in the table."""
    nbytes = np.array([8, 16], np.int64)
    table = np.array([100, 200, 108, 300], np.uint64)
    assert _foreach_cuda._disjoint(table, nbytes)
    assert not _foreach_cuda._disjoint(np.array([100, 200, 107, 300], np.uint64), nbytes)
    assert not _foreach_cuda._disjoint(np.array([215, 200, 108, 300], np.uint64), nbytes)
    assert not _foreach_cuda._disjoint(np.array([100, 200, 300, 200], np.uint64), nbytes)


def test_numpy_arrays_are_not_launchable():
    a = np.zeros(3)
    assert not _foreach_cuda.launchable(a, a)


# =====================================================================================
# nvcc
# =====================================================================================


@pytest.mark.skipif(NVCC is None, reason="nvcc (CUDA toolkit) is not on PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_nvcc_compiles_the_launcher_options_without_spills(arch, dtype, tmp_path):
    options = cuda_launch.compile_options(_foreach_cuda.MACRO_PREFIX, dtype)
    res, kernels = nvcc_compile(KERNEL_DIR / _foreach_cuda.KERNEL_FILE, arch, options, tmp_path)
    assert res.returncode == 0, res.stderr
    assert "warning" not in (res.stdout + res.stderr).lower(), res.stdout + res.stderr
    suffix = cuda_launch.dtype_suffix(dtype)
    assert set(kernels) == {f"adam_foreach_{suffix}", f"sgd_foreach_{suffix}"}
    for name, k in kernels.items():
        assert k["spill_stores"] == k["spill_loads"] == k["stack"] == 0, (name, k)


# =====================================================================================
# SIMT emulation (g++): the harness extension, and the kernels through the real launcher
# =====================================================================================


@pytest.fixture(scope="module")
def harness_builder():
    if GXX is None:
        pytest.skip(NO_GXX_REASON)
    builder = shared_builder()
    for dtype in DTYPES:
        builder.submit(_foreach_cuda.KERNEL_FILE,
                       cuda_launch.compile_options(_foreach_cuda.MACRO_PREFIX, dtype), "asan")
    builder.check_flavor(_foreach_cuda.KERNEL_FILE,
                         cuda_launch.compile_options(_foreach_cuda.MACRO_PREFIX, np.float32))
    return builder


@pytest.fixture
def fake(harness_builder, tmp_path, monkeypatch):
    """The CuPy stand-in as the launcher's CuPy, its kernels run in the harness."""
    device = fake_cupy.SimtDevice(harness_builder, harness_builder.flavor, tmp_path)
    monkeypatch.setattr(cuda_launch, "require_cupy", lambda what="": fake_cupy)
    cuda_launch.clear_cache()
    with fake_cupy.use_device(device):
        yield device
    cuda_launch.clear_cache()


def _sgd_args(lr=0.5):
    """The harness values of plain SGD's flags and scalars (maximize, decay, momentum,
    nesterov, first; lr, wd, mu, c) for the float64 kernel."""
    return (np.int32(0), np.int32(0), np.int32(0), np.int32(0), np.int32(0), np.float64(lr),
            np.float64(0), np.float64(0), np.float64(1))


@needs_gxx
def test_harness_passes_address_tables_and_returns_the_blocks(harness_builder, tmp_path):
    """Entry e of an address table reaches the kernel as the address of block e; every block
    comes back after the arguments (written or not)."""
    binary = harness_builder.build(
        _foreach_cuda.KERNEL_FILE,
        cuda_launch.compile_options(_foreach_cuda.MACRO_PREFIX, np.float64),
        harness_builder.flavor)
    p0, p1 = np.arange(3.0), np.arange(10.0, 15.0)
    g0, g1 = np.full(3, 2.0), np.full(5, -4.0)
    blocks = [p0, g1, p1, g0]
    table = AddressTable((0, 2, 3, 1))  # role-major: params 0 and 1, then their gradients
    offsets = np.array([0, 3, 8], np.int64)
    out = run_harness(binary, "sgd_foreach_f64", (2, 1, 1), (4, 1, 1),
                      (table, offsets, np.int32(2), np.int64(8)) + _sgd_args(), tmp_path,
                      blocks)
    assert sorted(out) == [13, 14, 15, 16]  # 13 arguments, then the 4 blocks
    np.testing.assert_array_equal(np.frombuffer(out[13]), p0 - 0.5 * g0)
    np.testing.assert_array_equal(np.frombuffer(out[15]), p1 - 0.5 * g1)
    assert out[14] == g1.tobytes() and out[16] == g0.tobytes()
    with pytest.raises(AssertionError, match="names no block"):
        run_harness(binary, "sgd_foreach_f64", (1, 1, 1), (4, 1, 1),
                    (AddressTable((0, 4)), offsets[:2], np.int32(1), np.int64(3))
                    + _sgd_args(), tmp_path, blocks)


@needs_gxx
def test_harness_catches_a_kernel_running_past_a_block(harness_builder, tmp_path):
    """Each block is a heap block of its own size: offsets that claim more elements than the
    arrays hold make AddressSanitizer stop the launch."""
    if harness_builder.flavor != "asan":
        pytest.skip(f"AddressSanitizer cannot run here: {harness_builder.fallback_reason}")
    binary = harness_builder.build(
        _foreach_cuda.KERNEL_FILE,
        cuda_launch.compile_options(_foreach_cuda.MACRO_PREFIX, np.float64), "asan")
    p, g = np.zeros(3), np.ones(3)
    with pytest.raises(HarnessError, match="AddressSanitizer"):
        run_harness(binary, "sgd_foreach_f64", (1, 1, 1), (4, 1, 1),
                    (AddressTable((0, 1)), np.array([0, 4], np.int64), np.int32(1),
                     np.int64(4)) + _sgd_args(), tmp_path, [p, g])


@needs_gxx
def test_stand_in_resolves_addresses_and_refuses_what_it_cannot_emulate(fake):
    """A uint64 kernel argument is a table of ``a.data.ptr`` of live stand-in arrays: an
    address of no array, and arrays that overlap, are refused before anything runs; a block
    the kernel did not change is not written back (it may be read-only)."""
    cp = fake_cupy
    p = cp.asarray(np.arange(4.0))
    g = cp.asarray(np.ones(4))
    g._a.flags.writeable = False
    offsets = cp.asarray(np.array([0, 4], np.int64))
    args = (1, 4, False, False, False, False, False, 0.5, 0.0, 0.0, 1.0)

    def table(*arrays_or_addresses):
        return cp.asarray(np.array([getattr(getattr(a, "data", None), "ptr", a)
                                    for a in arrays_or_addresses], np.uint64))

    _foreach_cuda.SGD(np.float64, (1, 1, 1), (4, 1, 1), (table(p, g), offsets) + args)
    np.testing.assert_array_equal(p.get(), np.arange(4.0) - 0.5)
    with pytest.raises(fake_cupy.KernelArgumentError, match="not the address of a live"):
        _foreach_cuda.SGD(np.float64, (1, 1, 1), (4, 1, 1), (table(p, 12345), offsets) + args)
    view = p[1:]  # alive at the launch: the table names it
    with pytest.raises(fake_cupy.KernelArgumentError, match="overlapping memory"):
        _foreach_cuda.SGD(np.float64, (1, 1, 1), (4, 1, 1), (table(p, view), offsets) + args)
    with pytest.raises(TypeError, match="argument 'addresses' must have dtype uint64"):
        _foreach_cuda.SGD(np.float64, (1, 1, 1), (4, 1, 1),
                          (offsets, offsets) + args)
    np.testing.assert_array_equal(p.get(), np.arange(4.0) - 0.5)  # the refused calls ran nothing
    assert len(fake.launches) == 1


def _emulated_run(cls, kwargs, dtype, shapes, steps):
    """``steps`` updates of parameters of ``shapes`` by ``cls``: in its GPU update (one launch)
    on stand-in arrays and, as the reference, in its NumPy code (``_update``) on copies."""
    rng = np.random.default_rng([7, len(shapes), np.dtype(dtype).itemsize])
    starts = [_data(rng, s, dtype) for s in shapes]
    opt = cls([Parameter(p0.copy()) for p0 in starts], **kwargs)
    group = opt.param_groups[0]
    params = [p0.copy() for p0 in starts]
    states = [opt._init_state(p, group) for p in params]
    dev_params = [fake_cupy.asarray(p) for p in params]
    dev_states = [{k: fake_cupy.asarray(v) if isinstance(v, np.ndarray) else v
                   for k, v in s.items()} for s in states]
    for _ in range(steps):
        grads = [_data(rng, s, dtype) for s in shapes]
        for p, g, s in zip(params, grads, states):
            opt._update(p, g, s, group)
        dev_grads = [fake_cupy.asarray(g) for g in grads]
        # the key of the run: the momentum buffer's absence (SGD) or the step count (Adam)
        key = ("momentum_buffer" not in dev_states[0] if isinstance(opt, SGD)
               else dev_states[0]["step"])
        opt._launch_update(list(zip(dev_params, dev_grads, dev_states)), np.dtype(dtype), key,
                           group)
    return params, states, dev_params, dev_states


@needs_gxx
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", ["adam_l2_amsgrad", "adamw_amsgrad_maximize",
                                  "sgd_nesterov_maximize", "sgd_momentum_dampening"])
def test_emulated_kernel_matches_the_numpy_code_with_a_strided_grid(case, dtype, fake,
                                                                    monkeypatch):
    """Two blocks of 32 threads for 300-odd values: every thread loops over elements of
    several parameters (and skips the empty one)."""
    monkeypatch.setattr(_foreach_cuda, "THREADS", 32)
    monkeypatch.setattr(_foreach_cuda, "MAX_BLOCKS", 2)
    # SGD makes its momentum buffers with the xp of the parameters (without --fake-cupy,
    # diagnet's backend does not know the stand-in)
    monkeypatch.setattr(backend, "get_array_module", fake_cupy.get_array_module)
    cls, kwargs = CASES[case]
    shapes = [(5,), (), (0,), (37,), (4, 65), (3,)]
    params, states, dev_params, dev_states = _emulated_run(cls, kwargs, dtype, shapes, 3)
    for p, s, dp, ds in zip(params, states, dev_params, dev_states):
        np.testing.assert_array_equal(dp.get(), p)
        assert ds.keys() == s.keys()
        for key, value in s.items():
            got = ds[key].get() if isinstance(ds[key], fake_cupy.ndarray) else ds[key]
            np.testing.assert_array_equal(got, value)
    assert [launch[1:] for launch in fake.launches] == [((2, 1, 1), (32, 1, 1))] * 3


# =====================================================================================
# GPU: whole optimizers (a real GPU, or --fake-cupy)
# =====================================================================================


@pytest.fixture
def launches(monkeypatch):
    """The runs `_foreach_cuda.launch` got (the number of parameters of each), as it runs."""
    calls = []

    def counting(kernel, dtype, columns, args, launch=_foreach_cuda.launch):
        calls.append(len(columns[0]))
        return launch(kernel, dtype, columns, args)

    monkeypatch.setattr(_foreach_cuda, "launch", counting)
    return calls


def _same_state(cp, opt, ref, params, ref_params):
    for p, q in zip(params, ref_params):
        np.testing.assert_array_equal(cp.asnumpy(p.data), cp.asnumpy(q.data))
        assert opt.state.get(p, {}).keys() == ref.state.get(q, {}).keys()
        for key, value in opt.state.get(p, {}).items():
            want = ref.state[q][key]
            assert type(value) is type(want)
            if isinstance(want, cp.ndarray):
                assert value.shape == want.shape and value.dtype == want.dtype
                np.testing.assert_array_equal(cp.asnumpy(value), cp.asnumpy(want))
            else:
                assert value == want


def _gpu_pair(cp, cls, kwargs, starts):
    params = [Parameter(cp.asarray(p0)) for p0 in starts]
    ref_params = [Parameter(cp.asarray(p0)) for p0 in starts]
    return params, ref_params, cls(params, **kwargs), _one_at_a_time(cls)(ref_params, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES)
def test_kernel_equals_the_per_parameter_code_bit_for_bit(case, dtype, launches):
    """Several steps of one group of parameters of many sizes, some without a gradient at
    some steps (so step counts and momentum buffers differ and split the group into runs):
    one launch per run gives exactly what the CuPy code gives one parameter at a time."""
    cp = backend.cupy_or_none()
    cls, kwargs = CASES[case]
    rng = np.random.default_rng([11, len(case), np.dtype(dtype).itemsize])
    starts = [_data(rng, shape, dtype) + np.asarray(0.5, dtype) for shape in SHAPES]
    params, ref_params, opt, ref = _gpu_pair(cp, cls, kwargs, starts)
    for step in range(4):
        for i, (p, q) in enumerate(zip(params, ref_params)):
            p.grad = q.grad = None
            if (i + step) % 4 != 0:
                g = cp.asarray(_data(rng, SHAPES[i], dtype))
                p.grad, q.grad = Tensor.from_array(g), Tensor.from_array(g.copy())
        opt.step()
        ref.step()
        _same_state(cp, opt, ref, params, ref_params)
    assert sum(launches) == sum((i + step) % 4 != 0 for i in range(len(SHAPES))
                                for step in range(4))
    assert len(launches) < sum(launches) / 2  # runs of several parameters, not one each
    assert all(not np.array_equal(cp.asnumpy(p.data), p0) for p, p0 in zip(params, starts)
               if p0.size)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["adamw_amsgrad_maximize", "sgd_nesterov_maximize"])
def test_runs_split_by_dtype_and_arrays_the_kernel_cannot_take_keep_their_place(case, launches):
    """float32 and float64 parameters take a launch each; a transposed (non-contiguous)
    parameter takes the per-parameter code in its place; a parameter that is a view of
    another's memory makes its run take the per-parameter code too (one launch would race
    where the in-order code does not). The result equals one parameter at a time."""
    cp = backend.cupy_or_none()
    cls, kwargs = CASES[case]
    rng = np.random.default_rng(5)
    dtypes = [np.float32, np.float32, np.float64, np.float32, np.float32, np.float32]
    shapes = [(3, 4), (4,), (2, 5), (5, 3), (6,), (6,)]

    def make(params):
        params[3].data = params[3].data.T.copy().T       # not C-contiguous
        params[5].data = params[4].data[::-1][::-1]       # the same memory as params[4]
        return params

    starts = [_data(rng, s, d) for s, d in zip(shapes, dtypes)]
    params, ref_params, _, _ = _gpu_pair(cp, cls, kwargs, starts)
    params, ref_params = make(params), make(ref_params)
    opt, ref = cls(params, **kwargs), _one_at_a_time(cls)(ref_params, **kwargs)
    for _ in range(3):
        for p, q in zip(params, ref_params):
            g = cp.asarray(_data(rng, p.shape, p.dtype))
            p.grad, q.grad = Tensor.from_array(g), Tensor.from_array(g.copy())
        opt.step()
        ref.step()
        _same_state(cp, opt, ref, params, ref_params)
    # per step: [p0, p1] launched, [p2] launched, p3 alone, [p4, p5] refused (shared memory)
    assert launches == [2, 1, 2] * 3
    assert params[5].data.data.ptr == params[4].data.data.ptr


@pytest.mark.gpu
def test_a_refused_step_launches_nothing(launches):
    """The pre-step checks run before any launch: a gradient of the wrong shape refuses the
    whole step and leaves parameters and state as they were."""
    cp = backend.cupy_or_none()
    params = [Parameter(cp.asarray(np.ones((2, 3), np.float32))) for _ in range(3)]
    opt = Adam(params, lr=0.1)
    for p in params:
        p.grad = Tensor.from_array(cp.ones((2, 3), np.float32))
    opt.step()
    before = [cp.asnumpy(p.data) for p in params]
    params[2].grad = Tensor.from_array(cp.ones((3,), np.float32))
    with pytest.raises(ValueError, match=r"has shape \(3,\), but the parameter has shape"):
        opt.step()
    assert launches == [3]
    for p, b in zip(params, before):
        np.testing.assert_array_equal(cp.asnumpy(p.data), b)
    assert {opt.state[p]["step"] for p in params} == {1}

