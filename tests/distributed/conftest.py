"""Fixtures of the data-parallel tests, which run in one process and under MPI.

``pytest tests/distributed`` runs them in one process, where the tests that need two ranks
skip; ``mpiexec -n 2 python -m pytest -q -p no:cacheprovider tests/distributed`` runs them on
two ranks (``tests/conftest.py`` gives each rank its own temporary folders and aborts the job
when a test fails on one rank). Tests here run on every rank: draw nothing with Hypothesis
(the ranks would draw different examples), seed every generator.

* ``comm``: the world communicator of `diagnet.distributed.init` (SingleProcess without MPI);
* ``two_ranks``: ``comm``, for a test that needs exactly two ranks (skipped otherwise);
* ``shared_tmp``: one folder for all ranks (rank 0's, its path broadcast);
* ``rank_tmp``: a folder of this rank's own.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from diagnet import distributed

TWO_RANKS = "needs 2 ranks: mpiexec -n 2 python -m pytest tests/distributed"


@pytest.fixture(scope="session")
def comm():
    """The world communicator (`diagnet.distributed.init`)."""
    return distributed.init()


@pytest.fixture
def two_ranks(comm):
    """The world communicator when it has exactly two ranks; skips the test otherwise."""
    if comm.size != 2:
        pytest.skip(TWO_RANKS)
    return comm


@pytest.fixture
def shared_tmp(comm, tmp_path):
    """A folder every rank sees: rank 0's ``tmp_path``, its path broadcast to the others
    (the ranks share a file system); with one rank, ``tmp_path``."""
    return Path(comm.broadcast_object(str(tmp_path) if comm.is_main else None))


@pytest.fixture
def rank_tmp(comm, tmp_path):
    """A folder of this rank alone (under the rank's own base temporary folder)."""
    path = tmp_path / f"rank{comm.rank}"
    path.mkdir()
    return path
