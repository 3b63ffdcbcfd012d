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
``use_kernels``) routes `diagnet.diag.dispatch` to that implementation.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=10_000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


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


@contextlib.contextmanager
def _use_kernels(name):
    """Route `diagnet.diag.dispatch` on the CPU to ``name`` ("reference" or "numba")."""
    key = "DIAGNET_CPU_KERNELS"
    previous = os.environ.get(key)
    os.environ[key] = name
    try:
        yield
    finally:
        if previous is None:
            del os.environ[key]
        else:
            os.environ[key] = previous


@pytest.fixture(scope="session")
def use_kernels():
    """The context manager ``use_kernels(name)`` (session-scoped, so Hypothesis-safe)."""
    return _use_kernels
