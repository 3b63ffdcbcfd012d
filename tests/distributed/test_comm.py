"""The communicators of `diagnet.distributed`: one process, two ranks over MPI, and CuPy
arrays through NCCL (the stand-in of ``tests/simt/fake_nccl.py``).

Run in one process (the two-rank tests skip) and as
``mpiexec -n 2 python -m pytest -q -p no:cacheprovider tests/distributed/test_comm.py``;
both again with ``-m gpu --fake-cupy`` for the NCCL path. The tests that start processes of
their own (a clean interpreter, an ``mpiexec`` job) run in the single-process suite only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pytest

import diagnet
from diagnet import distributed
from diagnet.distributed import MPICommunicator, SingleProcess, comm as comm_module

ROOT = Path(__file__).resolve().parents[2]
MPIEXEC = shutil.which("mpiexec")
#: an MPI job that should end within this many seconds when one rank fails; a hang is
#: killed at the timeout instead
JOB_TIMEOUT = 120

REDUCE_DTYPES = [np.float32, np.float64, np.int32, np.int64]


def clean_environment() -> dict:
    """This process's environment without the variables of an MPI launcher."""
    return {k: v for k, v in os.environ.items()
            if k not in distributed.LAUNCHER_VARIABLES and not k.startswith(("PMI", "OMPI_",
                                                                                "PMIX", "HYDRA"))}


def run_python(code: str, env=None, timeout=JOB_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=clean_environment() if env is None else env,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture
def own_process(comm):
    """For a test that starts processes of its own: only in the single-process suite."""
    if comm.size > 1:
        pytest.skip("starts processes of its own: runs in the single-process suite")


# ----------------------------------------------------------------------------- one process


def test_launcher_detection_reads_the_environment():
    assert not distributed.launched_by_mpi({})
    assert not distributed.launched_by_mpi({"SLURM_PROCID": "0", "HOME": "/root"})
    for name in ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK",
                 "MPI_LOCALNRANKS"):
        assert distributed.launched_by_mpi({name: "2"}), name


def test_init_returns_one_world(comm):
    assert distributed.init() is distributed.init() is comm
    assert distributed.world() is comm
    assert (distributed.rank(), distributed.world_size()) == (comm.rank, comm.size)
    assert distributed.is_main() == (comm.rank == 0) == comm.is_main


def test_a_plain_run_is_one_process_and_never_imports_mpi4py(own_process):
    result = run_python("""
        import sys
        from diagnet import distributed
        c = distributed.init()
        assert distributed.init() is c is distributed.world()
        print(type(c).__name__, c.rank, c.size, "mpi4py" in sys.modules)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["SingleProcess", "0", "1", "False"]


def test_a_launcher_without_mpi4py_falls_back_to_one_process_with_a_warning(own_process):
    env = clean_environment() | {"PMI_RANK": "0", "PMI_SIZE": "2"}
    result = run_python("""
        import sys, warnings
        sys.modules["mpi4py"] = None  # as if it were not installed
        from diagnet import distributed
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            c = distributed.init()
        print(type(c).__name__, c.size)
        print(caught[0].message)
    """, env=env)
    assert result.returncode == 0, result.stderr
    first, warning = result.stdout.splitlines()
    assert first == "SingleProcess 1"
    assert 'pip install "diagnet[distributed]"' in warning and "mpi4py" in warning


def test_world_before_init_is_a_single_process(monkeypatch):
    monkeypatch.setattr(comm_module, "_world", None)
    assert isinstance(distributed.world(), SingleProcess)
    assert distributed.world() is distributed.world()


def test_single_process_collectives_leave_arrays_alone_and_count_bytes():
    c = SingleProcess()
    assert (c.rank, c.size, c.is_main) == (0, 1, True)
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    before = a.copy()
    assert c.allreduce(a, op="max", tag="gradients") is a
    assert c.broadcast(a, root=0, tag="initial") is a
    assert c.allreduce(a) is a
    np.testing.assert_array_equal(a, before)
    assert c.bytes_moved == {"gradients": 24, "initial": 24, "other": 24}
    assert c.broadcast_object({"x": 1}) == {"x": 1}
    assert c.allgather_object("me") == ["me"]
    c.barrier()


BAD_CALLS = [
    # (call, error, words of the message)
    (lambda c: c.allreduce([1.0, 2.0]), TypeError, ["NumPy or CuPy array", "list"]),
    (lambda c: c.allreduce(diagnet.tensor(np.ones(2))), TypeError, ["Tensor", ".data"]),
    (lambda c: c.allreduce(np.ones((3, 4))[:, ::2]), ValueError, ["C-contiguous", "strides"]),
    (lambda c: c.broadcast(np.ones((4, 3)).T), ValueError, ["C-contiguous"]),
    (lambda c: c.allreduce(np.ones(3, np.float16)), TypeError, ["float32", "float16"]),
    (lambda c: c.allreduce(np.ones(3, bool)), TypeError, ["dtype", "bool"]),
    (lambda c: c.broadcast(np.array([None, 1])), TypeError, ["numeric", "object"]),
    (lambda c: c.allreduce(np.ones(3), op="mean"), ValueError, ["op", "'sum'", "'mean'"]),
    (lambda c: c.allreduce(np.ones(3), op=None), ValueError, ["op", "None"]),
    (lambda c: c.broadcast(np.ones(3), root=1), ValueError, ["root", "[0, 1)", "1"]),
    (lambda c: c.broadcast(np.ones(3), root=True), ValueError, ["root", "True"]),
    (lambda c: c.broadcast_object(1, root=-1), ValueError, ["root", "-1"]),
    (lambda c: c.allreduce(np.ones(3), tag=3), TypeError, ["tag", "str", "3"]),
]


@pytest.mark.parametrize("call, error, words", BAD_CALLS)
def test_bad_calls_are_refused_before_anything_moves(call, error, words):
    c = SingleProcess()
    with pytest.raises(error) as info:
        call(c)
    for word in words:
        assert word in str(info.value)
    assert c.bytes_moved == {}


def test_a_read_only_array_is_refused():
    a = np.ones(3)
    a.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        SingleProcess().allreduce(a)


def test_broadcast_moves_any_numeric_dtype():
    c = SingleProcess()
    for dtype in (bool, np.uint8, np.int8, np.float16, np.complex128):
        a = np.ones(5, dtype)
        assert c.broadcast(a) is a


def test_agree_returns_the_result_or_raises_the_original():
    c = SingleProcess()
    assert distributed.agree(lambda: 42, comm=c) == 42
    error = FileExistsError("runs/x exists")

    def refuse():
        raise error

    with pytest.raises(FileExistsError) as info:
        distributed.agree(refuse, comm=c)
    assert info.value is error


class CustomError(Exception):
    """An exception type of this module, re-created on a rank that did not raise it."""


def test_an_exception_is_recreated_with_its_type_and_message():
    made = comm_module._recreate(comm_module._describe(CustomError("bad value")), 1)
    assert type(made) is CustomError and str(made) == "bad value (raised on rank 1)"
    made = comm_module._recreate(comm_module._describe(ValueError("lr must be > 0")), 3)
    assert type(made) is ValueError and str(made).startswith("lr must be > 0")


def test_an_exception_that_cannot_be_recreated_becomes_a_runtime_error():
    unknown = ("no_such_module_here", "WeirdError", "it broke")
    made = comm_module._recreate(unknown, 1)
    assert type(made) is RuntimeError
    assert str(made) == "rank 1 failed: WeirdError: it broke"
    # a type whose constructor wants more than a message
    decode = comm_module._describe(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid"))
    made = comm_module._recreate(decode, 2)
    assert type(made) is RuntimeError and "UnicodeDecodeError" in str(made)
    # only exception types are made: a name that is some other callable is not called
    made = comm_module._recreate(("os", "remove", "x"), 1)
    assert type(made) is RuntimeError


def test_main_first_runs_the_body_and_passes_errors_on():
    ran = []
    with distributed.main_first(SingleProcess()):
        ran.append(1)
    assert ran == [1]
    with pytest.raises(KeyError):
        with distributed.main_first(SingleProcess()):
            raise KeyError("x")


def test_single_process_abort_ends_the_process_with_the_code(own_process):
    result = run_python("""
        from diagnet.distributed import SingleProcess
        print("before", end="")
        SingleProcess().abort(3)
        print("never")
    """)
    assert result.returncode == 3
    assert result.stdout == "before"


def test_an_uncaught_exception_on_one_rank_ends_the_mpi_job(own_process, tmp_path):
    """Rank 1 raises while rank 0 waits in a barrier: the job must end at once, with a
    non-zero status and rank 1's traceback, instead of hanging."""
    if MPIEXEC is None:
        pytest.skip("mpiexec is not installed (pip install \"diagnet[distributed]\")")
    script = tmp_path / "fail_on_rank1.py"
    script.write_text(textwrap.dedent("""
        from diagnet import distributed
        comm = distributed.init()
        if comm.rank == 1:
            raise ValueError("rank 1 gives up")
        comm.barrier()
        print("rank 0 passed the barrier")
    """))
    start = time.monotonic()
    result = subprocess.run([MPIEXEC, "-n", "2", sys.executable, str(script)],
                            capture_output=True, text=True, timeout=JOB_TIMEOUT,
                            env=clean_environment(), cwd=ROOT)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert "[rank 1/2]" in result.stderr and "ValueError: rank 1 gives up" in result.stderr
    assert "aborting all 2 ranks" in result.stderr
    assert "passed the barrier" not in result.stdout
    assert elapsed < JOB_TIMEOUT / 2


def test_a_test_failing_on_one_rank_aborts_the_pytest_job(own_process, tmp_path):
    """The suite's conftest under MPI: a test that fails on rank 1 while rank 0 waits in a
    collective ends the whole job with the failure report, instead of hanging."""
    if MPIEXEC is None:
        pytest.skip("mpiexec is not installed (pip install \"diagnet[distributed]\")")
    (tmp_path / "conftest.py").write_text(textwrap.dedent(f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("suite_conftest",
                                                      {str(ROOT / "tests" / "conftest.py")!r})
        suite = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(suite)
        globals().update({{k: v for k, v in vars(suite).items() if k.startswith("pytest_")}})
    """))
    (tmp_path / "test_one_rank_fails.py").write_text(textwrap.dedent("""
        from diagnet import distributed

        def test_rank1_fails():
            comm = distributed.world()
            assert comm.rank == 0, "rank 1 fails here"
            comm.barrier()
    """))
    env = clean_environment() | {"PYTHONPATH": str(ROOT / "tests")}
    start = time.monotonic()
    result = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "pytest", "-q",
                             "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "base"),
                             str(tmp_path)],
                            capture_output=True, text=True, timeout=JOB_TIMEOUT, env=env,
                            cwd=tmp_path)
    assert result.returncode != 0
    assert "[rank 1/2]" in result.stderr and "test_rank1_fails failed (call)" in result.stderr
    assert "rank 1 fails here" in result.stderr
    assert time.monotonic() - start < JOB_TIMEOUT / 2


# ----------------------------------------------------------------------------- two ranks


def test_each_rank_has_its_own_temporary_folders(two_ranks, tmp_path, rank_tmp):
    folders = two_ranks.allgather_object(str(tmp_path))
    assert folders[0] != folders[1]
    assert not folders[1].startswith(folders[0]) and not folders[0].startswith(folders[1])
    assert rank_tmp.name == f"rank{two_ranks.rank}" and rank_tmp.is_dir()


@pytest.mark.parametrize("dtype", REDUCE_DTYPES)
@pytest.mark.parametrize("op, reference", [("sum", np.sum), ("max", np.max), ("min", np.min)])
def test_allreduce_of_numpy_arrays(two_ranks, dtype, op, reference):
    c = two_ranks
    per_rank = [np.array([[1, -7, 3], [100, 0, -2]], dtype),
                np.array([[4, 5, -6], [-50, 9, 8]], dtype)]
    a = per_rank[c.rank].copy()
    before = dict(c.bytes_moved)
    assert c.allreduce(a, op=op, tag="test") is a
    np.testing.assert_array_equal(a, reference(np.stack(per_rank), axis=0).astype(dtype))
    assert c.bytes_moved["test"] - before.get("test", 0) == a.nbytes


def test_allreduce_of_floats_is_exact_for_two_ranks(two_ranks):
    rng = np.random.default_rng(17 + two_ranks.rank)
    mine = rng.standard_normal(1000)
    everyone = two_ranks.allgather_object(mine)
    two_ranks.allreduce(mine)
    np.testing.assert_array_equal(mine, everyone[0] + everyone[1])  # one addition: exact


@pytest.mark.parametrize("root", [0, 1])
def test_broadcast_of_numpy_arrays(two_ranks, root):
    c = two_ranks
    for dtype in (np.float32, np.int64, bool, np.float16, np.uint8):
        a = np.full((2, 3), c.rank * 3 + 1).astype(dtype)
        assert c.broadcast(a, root=root) is a
        np.testing.assert_array_equal(a, np.full((2, 3), root * 3 + 1).astype(dtype))
    scalar = np.array(float(c.rank))
    c.broadcast(scalar, root=root)
    assert scalar == root


def test_objects_between_ranks(two_ranks):
    c = two_ranks
    got = c.broadcast_object({"rank": c.rank, "shape": (2, 3)}, root=1)
    assert got == {"rank": 1, "shape": (2, 3)}
    assert c.allgather_object(("r", c.rank)) == [("r", 0), ("r", 1)]
    c.barrier()


def test_module_functions_use_the_world(two_ranks):
    a = np.full(4, float(two_ranks.rank))
    distributed.allreduce(a, op="max")
    np.testing.assert_array_equal(a, np.ones(4))
    b = np.full(4, float(two_ranks.rank))
    distributed.broadcast(b, root=1)
    np.testing.assert_array_equal(b, np.ones(4))
    distributed.barrier()


def test_agree_raises_on_every_rank_when_one_fails(two_ranks):
    def refuse_on_rank1():
        if two_ranks.rank == 1:
            raise FileExistsError("--out runs/x exists")
        return "ok"

    with pytest.raises(FileExistsError, match="--out runs/x exists") as info:
        distributed.agree(refuse_on_rank1, comm=two_ranks)
    expected = "--out runs/x exists" + (" (raised on rank 1)" if two_ranks.rank == 0 else "")
    assert str(info.value) == expected
    assert distributed.agree(lambda: two_ranks.rank, comm=two_ranks) == two_ranks.rank


def test_agree_raises_the_lowest_failing_rank(two_ranks):
    def both_fail():
        if two_ranks.rank == 0:
            raise CustomError("rank 0's reason")
        raise KeyError("rank 1's reason")

    with pytest.raises(CustomError, match="rank 0's reason"):
        distributed.agree(both_fail, comm=two_ranks)


def test_main_first_lets_rank0_finish_first(two_ranks, shared_tmp):
    marker = shared_tmp / "downloaded.txt"
    with distributed.main_first(two_ranks):
        if two_ranks.rank == 0:
            time.sleep(0.2)  # rank 1 must still be waiting
            marker.write_text("mnist")
        else:
            assert marker.read_text() == "mnist"
    assert two_ranks.allgather_object(marker.exists()) == [True, True]


def test_main_first_stops_the_others_when_rank0_fails(two_ranks):
    ran = []
    with pytest.raises(ConnectionError, match="mirror down"):
        with distributed.main_first(two_ranks):
            ran.append(two_ranks.rank)
            if two_ranks.rank == 0:
                raise ConnectionError("mirror down")
    assert ran == ([0] if two_ranks.rank == 0 else [])


# ----------------------------------------------------------------------------- CuPy and NCCL


class NoHostCollectives:
    """An MPI communicator that refuses the buffer collectives (Allreduce, Bcast): CuPy
    arrays must go through NCCL, never through MPI on the host. Object collectives pass."""

    def __init__(self, mpi_comm):
        self._mpi_comm = mpi_comm

    def __getattr__(self, name):
        if name in ("Allreduce", "Bcast"):
            raise AssertionError(f"MPI.{name} was called with a CuPy array")
        return getattr(self._mpi_comm, name)


def nccl_communicator(mpi_comm, monkeypatch):
    """An MPICommunicator over ``mpi_comm`` whose buffer collectives are refused."""
    c = MPICommunicator(mpi_comm)
    monkeypatch.setattr(c, "mpi_comm", NoHostCollectives(mpi_comm))
    return c


def check_cupy_collectives(c):
    """Allreduce and broadcast of CuPy arrays on ``c``, results as the NumPy reference; with
    the stand-in, also: through its NCCL, with no host transfer."""
    import cupy
    from simt import fake_cupy, fake_nccl

    stand_in = cupy is fake_cupy

    calls = dict(fake_nccl.calls)
    transfers = fake_cupy.host_transfers
    per_rank = [np.array([[1.5, -2.0, 3.0], [4.0, 0.5, -6.0]]), np.array([[2.0, 1.0, -1.0],
                                                                          [0.0, 7.0, 2.5]])]
    mine = per_rank[c.rank]
    results = {}
    for dtype in REDUCE_DTYPES:
        for op in ("sum", "max", "min"):
            a = cupy.asarray(mine.astype(dtype))
            assert c.allreduce(a, op=op, tag="gpu") is a
            results[dtype, op] = a
    grid = cupy.asarray(np.arange(6, dtype=np.int64).reshape(2, 3) * (c.rank + 1))
    mask = cupy.asarray(np.array([c.rank == 0, True, False]))
    c.broadcast(grid, root=c.size - 1, tag="gpu")
    c.broadcast(mask, root=0, tag="gpu")
    assert not stand_in or fake_cupy.host_transfers == transfers  # nothing staged on the host
    ranks = np.stack(per_rank[:c.size])
    for (dtype, op), a in results.items():
        expected = {"sum": np.sum, "max": np.max, "min": np.min}[op](ranks.astype(dtype), axis=0)
        np.testing.assert_array_equal(a.get(), expected)
    np.testing.assert_array_equal(grid.get(), np.arange(6).reshape(2, 3) * c.size)
    np.testing.assert_array_equal(mask.get(), [True, True, False])
    if stand_in:
        assert fake_nccl.calls["allReduce"] - calls["allReduce"] == 12
        assert fake_nccl.calls["bcast"] - calls["bcast"] == 2
    assert c.bytes_moved["gpu"] == sum(a.nbytes for a in results.values()) + 48 + 3


def fake_cupy_modules(monkeypatch, nccl):
    """A bare ``cupy`` and ``cupy.cuda`` in ``sys.modules``, with ``nccl`` as
    ``cupy.cuda.nccl`` (None: the import fails), and the backend's probe finding them."""
    from diagnet import backend

    cupy, cuda = types.ModuleType("cupy"), types.ModuleType("cupy.cuda")
    cupy.__version__, cupy.cuda = "13.6.0", cuda
    cupy.__path__ = cuda.__path__ = []  # packages, as CuPy's are: submodules are imported
    if nccl is not None:
        cuda.nccl = nccl
    for name, module in [("cupy", cupy), ("cupy.cuda", cuda), ("cupy.cuda.nccl", nccl)]:
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(backend, "_cupy_probe", lambda: (cupy, ""))


def test_backend_nccl_says_why_it_is_missing(monkeypatch):
    from diagnet import backend

    monkeypatch.setattr(backend, "_cupy_probe", lambda: (None, "CuPy is not installed"))
    with pytest.raises(RuntimeError, match="NCCL needs CuPy and a CUDA device: CuPy is not"):
        backend.nccl()
    fake_cupy_modules(monkeypatch, None)
    with pytest.raises(RuntimeError, match="NCCL is not available to CuPy 13.6.0 "
                                           r"\(ModuleNotFoundError.*pip install nvidia-nccl-cu12"):
        backend.nccl()
    fake_cupy_modules(monkeypatch, types.SimpleNamespace(available=False))
    with pytest.raises(RuntimeError, match="without it.*diagnet\\[cuda12\\]"):
        backend.nccl()
    nccl = types.SimpleNamespace(available=True)
    fake_cupy_modules(monkeypatch, nccl)
    assert backend.nccl() is nccl


def test_the_cupy_stand_in_brings_its_nccl():
    import importlib

    from simt import fake_cupy, fake_nccl

    replaced = fake_cupy.install()
    try:
        assert importlib.import_module("cupy.cuda.nccl") is fake_nccl
        assert importlib.import_module("cupy").cuda.nccl is fake_nccl
    finally:
        fake_cupy.uninstall(replaced)


@pytest.mark.gpu
def test_cupy_arrays_go_through_nccl_on_one_rank(monkeypatch):
    MPI = pytest.importorskip("mpi4py.MPI")
    check_cupy_collectives(nccl_communicator(MPI.COMM_SELF, monkeypatch))


@pytest.mark.gpu
def test_cupy_arrays_go_through_nccl_on_two_ranks(two_ranks, monkeypatch):
    check_cupy_collectives(nccl_communicator(two_ranks.mpi_comm, monkeypatch))


@pytest.mark.gpu
def test_single_process_leaves_cupy_arrays_alone():
    import cupy
    from simt import fake_nccl

    calls = dict(fake_nccl.calls)
    a = cupy.arange(4.0)
    c = SingleProcess()
    c.allreduce(a)
    c.broadcast(a)
    np.testing.assert_array_equal(a.get(), np.arange(4.0))
    assert fake_nccl.calls == calls and c.bytes_moved == {"other": 64}


@pytest.mark.gpu
@pytest.mark.parametrize("make, error, words", [
    (lambda cp: cp.ones(3, cp.float16), TypeError, ["float16"]),
    (lambda cp: cp.ones(3, bool), TypeError, ["bool"]),
    (lambda cp: cp.ones((4, 3))[:, 1], ValueError, ["C-contiguous"]),
])
def test_cupy_arrays_nccl_cannot_reduce_are_refused(make, error, words, monkeypatch):
    import cupy

    MPI = pytest.importorskip("mpi4py.MPI")
    c = nccl_communicator(MPI.COMM_SELF, monkeypatch)
    with pytest.raises(error) as info:
        c.allreduce(make(cupy))
    assert all(word in str(info.value) for word in words)
    assert c.bytes_moved == {} and c._nccl is None


@pytest.mark.gpu
def test_a_cupy_array_on_another_gpu_is_refused(monkeypatch):
    import cupy

    MPI = pytest.importorskip("mpi4py.MPI")
    c = nccl_communicator(MPI.COMM_SELF, monkeypatch)
    c.allreduce(cupy.ones(2))  # makes the NCCL channel on GPU 0
    monkeypatch.setattr(c._nccl, "device_id", 1)
    with pytest.raises(ValueError, match="on GPU 0, but this rank's NCCL communicator was "
                                         "made on GPU 1"):
        c.allreduce(cupy.ones(2))


@pytest.mark.gpu
def test_nccl_missing_on_one_rank_fails_on_every_rank(two_ranks, monkeypatch):
    import cupy

    from diagnet import backend

    def no_nccl():
        raise RuntimeError("NCCL is not available to CuPy: pip install nvidia-nccl-cu12")

    if two_ranks.rank == 1:
        monkeypatch.setattr(backend, "nccl", no_nccl)
    c = MPICommunicator(two_ranks.mpi_comm)
    with pytest.raises(RuntimeError, match="need NCCL on every rank; rank 1: NCCL is not "
                                           "available"):
        c.allreduce(cupy.ones(2))


@pytest.mark.gpu
def test_the_nccl_stand_in_refuses_ranks_with_different_ids(two_ranks):
    from simt import fake_nccl

    with pytest.raises(fake_nccl.NcclError, match="different unique ids"):
        fake_nccl.NcclCommunicator(2, fake_nccl.get_unique_id(), two_ranks.rank)
