"""Shared test configuration: Hypothesis profiles and the kernel implementations to test.

Hypothesis profiles (pick one with the environment variable ``HYPOTHESIS_PROFILE``):

* ``default`` (also used on CI, where ``CI=true``): 200 examples per property, no deadline,
  derandomized (the same examples on every run, so a failure reproduces exactly) and no
  example database (nothing is written to the working tree).
* ``thorough``: 10,000 examples per property, random exploration, no deadline; failures
  print a ``@reproduce_failure`` blob.

Kernel implementations: a test with an argument named ``kernel_impl`` runs once per CPU
kernel implementation, ``"reference"`` (NumPy, `diagnet.diag.reference`) and ``"numba"``
(`diagnet.diag.cpu`, the dispatch default), the latter skipped while that module does not
exist. Inside the test, ``with use_kernels(kernel_impl):`` (the session fixture
``use_kernels``) routes `diagnet.diag.dispatch` to that implementation, through
`diagnet.settings`.

Settings: every test starts from the suite's `diagnet.settings` and whatever it changes (with
``settings.set_*``) is restored after it (the autouse fixture `_settings_per_test`).

Devices and GPU tests:

* A test that needs CUDA carries ``@pytest.mark.gpu`` and nothing else: where CUDA is not
  available, `pytest_collection_modifyitems` skips it with the reason from
  ``diagnet.backend.cuda_unavailable_reason()``.
* Tests not marked ``gpu`` run with the default device pinned to the CPU
  (``settings.set_device("cpu")``) unless the user set ``DIAGNET_DEVICE``: they compare
  results with NumPy, which must not depend on whether the machine has a GPU. Tests marked
  ``gpu`` see the machine's own default (``cuda`` where it is available), as a user of a GPU
  machine does. Tests about default-device selection set the device themselves.
* ``--fake-cupy`` installs the CuPy stand-in of ``tests/simt/fake_cupy.py`` as ``cupy`` (and
  ``cupyx``) before diagnet probes for CuPy, so CUDA is "available" and every ``gpu`` test
  runs the CuPy code path on the CPU, with the CUDA kernels emulated from their real source
  by the SIMT harness: ``python -m pytest -q -m gpu --fake-cupy``.

Under MPI (``mpiexec -n 2 python -m pytest -p no:cacheprovider tests/distributed``), detected
as `diagnet.distributed.init` detects it (mpi4py is not imported in a plain run), with more
than one rank:

* each rank gets its own pytest base temporary folder (the numbered folders of one base would
  race between the processes);
* a test that fails on one rank prints its report with the rank and aborts the whole job, so
  the other ranks never wait forever in a collective that the failed rank will not reach.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from diagnet import settings

# The user's own choice of default device (``DIAGNET_DEVICE``), before this file pins it for
# the CPU tests.
_USER_DEVICE = settings.device

hypothesis_settings.register_profile(
    "default",
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
hypothesis_settings.register_profile(
    "thorough",
    max_examples=10_000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def _cpu_kernels_present() -> bool:
    # Only "is the module there": if it is there but fails to import, the tests must fail
    # loudly rather than skip.
    return importlib.util.find_spec("diagnet.diag.cpu") is not None


def kernel_impl_params():
    """``pytest.param`` objects for every CPU kernel implementation to test."""
    return [
        pytest.param("reference", id="reference"),
        pytest.param("numba", id="numba", marks=pytest.mark.skipif(
            not _cpu_kernels_present(),
            reason="diagnet.diag.cpu (the numba kernels) does not exist yet")),
    ]


def pytest_generate_tests(metafunc):
    if "kernel_impl" in metafunc.fixturenames:
        metafunc.parametrize("kernel_impl", kernel_impl_params())


def _use_kernels(name):
    """Route `diagnet.diag.dispatch` on the CPU to ``name`` ("reference" or "numba")."""
    return settings.override(cpu_kernels=name)


@pytest.fixture(scope="session")
def use_kernels():
    """The context manager ``use_kernels(name)`` (session-scoped, so Hypothesis-safe)."""
    return _use_kernels


@pytest.fixture(autouse=True)
def _settings_per_test(request):
    """Restore `diagnet.settings` after each test; a ``gpu`` test runs on the machine's
    default device (cuda where available) instead of the CPU pin."""
    changes = {}
    if _USER_DEVICE is None and request.node.get_closest_marker("gpu") is not None:
        changes["device"] = None
    with settings.override(**changes):
        yield


# ----------------------------------------------------------------------------- devices, gpu


def pytest_addoption(parser):
    parser.addoption(
        "--fake-cupy", action="store_true", default=False,
        help="install the CuPy stand-in of tests/simt/fake_cupy.py as cupy/cupyx, so that the "
             "tests marked gpu run the CuPy code path on the CPU (CUDA kernels emulated by the "
             "SIMT harness; needs g++)")


@pytest.hookimpl(tryfirst=True)  # before the temporary-folder plugin reads the base folder
def pytest_configure(config):
    if _USER_DEVICE is None:
        # Pinned before collection too: some test modules build tensors at import time.
        settings.set_device("cpu")
    if config.getoption("--fake-cupy"):
        # Before anything asks diagnet for CuPy: the backend caches its probe and the launcher
        # its compiled modules, so clear both in case diagnet was imported already.
        from simt import fake_cupy

        config._fake_cupy_replaced = fake_cupy.install()
        import diagnet.backend
        import diagnet.diag.cuda

        diagnet.backend._cupy_probe.cache_clear()
        diagnet.diag.cuda.clear_cache()
    _configure_mpi(config)


# ----------------------------------------------------------------------------- MPI

#: the world communicator when this run is one rank of several (mpiexec), else None
_MPI_WORLD = None


def _configure_mpi(config):
    """Under an MPI launcher with more than one rank: a base temporary folder per rank."""
    global _MPI_WORLD
    from diagnet.distributed import launched_by_mpi

    if not launched_by_mpi():
        return
    from diagnet import distributed

    comm = distributed.init()
    if comm.size == 1:
        return
    _MPI_WORLD = comm
    given = config.option.basetemp
    config.option.basetemp = (f"{given}-rank{comm.rank}" if given else
                              tempfile.mkdtemp(prefix=f"pytest-rank{comm.rank}-"))
    config._mpi_made_basetemp = not given


def _abort_job_if_failed(report):
    """Print a failed report with the rank and abort every rank (only under MPI)."""
    if _MPI_WORLD is None or not report.failed:
        return
    when = getattr(report, "when", "collect")
    sys.stderr.write(f"\n[rank {_MPI_WORLD.rank}/{_MPI_WORLD.size}] {report.nodeid} failed "
                     f"({when}); aborting all ranks\n{report.longreprtext}\n")
    _MPI_WORLD.abort(1)


def pytest_runtest_logreport(report):
    _abort_job_if_failed(report)


def pytest_collectreport(report):
    _abort_job_if_failed(report)


def pytest_sessionfinish(session, exitstatus):
    """Under MPI: remove the rank's base temporary folder after a passing run, once every
    rank is done (another rank may still read a folder that rank 0 shared)."""
    if _MPI_WORLD is None:
        return
    _MPI_WORLD.barrier()
    if exitstatus == 0 and getattr(session.config, "_mpi_made_basetemp", False):
        shutil.rmtree(session.config.option.basetemp, ignore_errors=True)


def pytest_unconfigure(config):
    replaced = getattr(config, "_fake_cupy_replaced", None)
    if replaced is not None:
        from simt import fake_cupy

        fake_cupy.uninstall(replaced)
        import diagnet.backend

        diagnet.backend._cupy_probe.cache_clear()


def pytest_report_header(config):
    if config.getoption("--fake-cupy"):
        return ("cupy: the SIMT stand-in (tests/simt/fake_cupy.py): gpu tests run on the CPU, "
                "CUDA kernels emulated")
    return None


def pytest_collection_modifyitems(config, items):
    """Skip the tests marked ``gpu`` (with the reason) where CUDA is not available, and the
    tests marked ``slow`` unless the ``-m`` expression names ``slow``."""
    from diagnet import backend

    if "slow" not in (config.getoption("markexpr", "") or ""):
        slow = pytest.mark.skip(reason="slow: run with -m slow")
        for item in items:
            if item.get_closest_marker("slow") is not None:
                item.add_marker(slow)
    if backend.cuda_available():
        return
    skip = pytest.mark.skip(reason=f"needs CUDA: {backend.cuda_unavailable_reason()}")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def make_fake(harness_builder, tmp_path, monkeypatch):
    """Make the CuPy stand-in the CUDA launcher's CuPy, its kernels run by a fresh SIMT device.

    For the kernel test modules, each of which defines a ``harness_builder`` fixture (the
    harness builds of its ``.cu`` file). Returns a factory taking the harness flavor (default:
    the builder's, ASan where it runs); the device it returns records the compiles and
    launches of the test. Compiled modules are forgotten before and after: they belong to
    one device.
    """
    import contextlib

    from diagnet import cuda_launch
    from simt import fake_cupy

    stack = contextlib.ExitStack()

    def install(flavor=None):
        device = fake_cupy.SimtDevice(harness_builder, flavor or harness_builder.flavor, tmp_path)
        stack.enter_context(fake_cupy.use_device(device))
        monkeypatch.setattr(cuda_launch, "require_cupy", lambda what="": fake_cupy)
        cuda_launch.clear_cache()
        return device

    with stack:
        yield install
    cuda_launch.clear_cache()
