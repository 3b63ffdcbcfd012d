"""The examples under ``mpiexec -n 2``, unchanged: the 1-process model, one report, resumable
across world sizes.

These tests start MPI jobs of their own, so they run in the single-process suite (under
``mpiexec`` they skip). The runs are the examples' ``--smoke`` runs in float64
(``--dtype float64``), where 2 processes and 1 process give the same structure and the same
parameters up to the order of float sums.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import diagnet as dn
from diagnet import distributed

ROOT = Path(__file__).resolve().parents[2]
MPIEXEC = shutil.which("mpiexec")


@pytest.fixture
def launcher(comm):
    """mpiexec, for a test that starts MPI jobs: only in the single-process suite."""
    if comm.size > 1:
        pytest.skip("starts MPI jobs of its own: runs in the single-process suite")
    if MPIEXEC is None:
        pytest.skip('mpiexec is not installed (pip install "diagnet[distributed]")')
    return MPIEXEC


def _example(procs, out, *flags, cwd):
    """Run the MLP example's smoke run on ``procs`` processes; return its stdout."""
    env = {k: v for k, v in os.environ.items()
           if k not in distributed.LAUNCHER_VARIABLES and not k.startswith(("PMI", "OMPI_",
                                                                               "PMIX", "HYDRA"))}
    env.update({"DIAGNET_DEVICE": "cpu", "MPLBACKEND": "Agg", "HOME": str(cwd),
                "NUMBA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"})
    command = [sys.executable, str(ROOT / "examples" / "train_mnist_mlp.py"), "--smoke",
               "--no-progress", "--dtype", "float64", "--out", str(out), *flags]
    if procs > 1:
        command = [MPIEXEC, "-n", str(procs), *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd,
                            env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _model(out):
    return {k: dn.backend.to_numpy(v)
            for k, v in dn.load(out / "last.safetensors", rng=False).components["model"].items()}


def _assert_same_model(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        if key.endswith("offsets"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-9, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("method", ["rigl", "dynadiag"])
def test_two_processes_train_the_one_process_model_and_report_once(launcher, tmp_path, method):
    two = _example(2, tmp_path / "two", "--method", method, cwd=tmp_path)
    one = _example(1, tmp_path / "one", "--method", method, cwd=tmp_path)
    # rank 0 alone prints: one summary, which names the processes
    assert two.count("test accuracy:") == 1 and two.count("processes: 2") == 1, two
    assert "processes: 1" in one
    records = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").open()]
    assert [r["world_size"] for r in records if r["event"] == "run_start"] == [2]
    _assert_same_model(_model(tmp_path / "one"), _model(tmp_path / "two"))


@pytest.mark.parametrize("method", ["rigl", "dynadiag"])
def test_with_micro_batches_two_processes_train_the_one_process_model_bit_for_bit(
        launcher, tmp_path, method):
    """``--micro-batch``: in float32, the default, every array of the final checkpoint of a
    2-process run equals the 1-process run's (offsets, values, optimizer state)."""
    flags = ("--method", method, "--dtype", "float32", "--batch-size", "48",
             "--micro-batch", "8")
    _example(2, tmp_path / "two", *flags, cwd=tmp_path)
    _example(1, tmp_path / "one", *flags, cwd=tmp_path)
    # the structure was decided during the run: RigL's updates, DynaDiag's freeze (the
    # smoke run's one epoch is its last, where it freezes)
    records = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").open()]
    assert any(r.get("grown") for r in records if r["event"] == "mask_update") \
        or any(r["event"] == "freeze" for r in records)
    one, two = (dn.load(tmp_path / run / "last.safetensors", rng=False).components
                for run in ("one", "two"))
    for part in ("model", "optimizer"):
        a, b = _flat(one[part]), _flat(two[part])
        assert sorted(a) == sorted(b) and a
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{part}: {key}")


def _flat(tree, prefix=""):
    """``{path: host array}`` of every array in a nested state (dicts and lists)."""
    out = {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) \
        if isinstance(tree, (list, tuple)) else ()
    for key, value in items:
        path = f"{prefix}{key}"
        if dn.backend.is_array(value):
            out[path] = dn.backend.to_numpy(value)
        elif isinstance(value, (dict, list, tuple)):
            out.update(_flat(value, path + "."))
    return out


def test_a_run_moves_between_one_and_two_processes(launcher, tmp_path):
    """Started on 2 processes and resumed on 1, or the other way round: the same model."""
    _example(2, tmp_path / "a", "--method", "rigl", cwd=tmp_path)
    _example(1, tmp_path / "b", "--method", "rigl", cwd=tmp_path)
    _example(1, tmp_path / "a", "--resume", cwd=tmp_path)
    resumed = _example(2, tmp_path / "b", "--resume", cwd=tmp_path)
    assert "processes: 2" in resumed
    _assert_same_model(_model(tmp_path / "a"), _model(tmp_path / "b"))
    for run in ("a", "b"):
        epochs = [json.loads(line) for line in (tmp_path / run / "log.jsonl").open()]
        assert [r["epoch"] for r in epochs if r["event"] == "epoch"] == [0, 1]
