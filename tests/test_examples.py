"""The examples run and do what they say."""

import re
import subprocess

import pytest
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_quickstart_student_recovers_the_teacher():
    res = subprocess.run([sys.executable, str(EXAMPLES / "quickstart.py"), "--steps", "150",
                          "--device", "cpu"], capture_output=True, text=True, timeout=300,
                         check=True)
    assert "realised sparsity 0.8992" in res.stdout  # 79 of 784 diagonals kept
    error = float(re.search(r"max \|student - teacher\| = ([0-9.]+)", res.stdout).group(1))
    assert error < 0.01, res.stdout


def _run(script, *args, cwd):
    env = {"DIAGNET_DEVICE": "cpu", "PATH": "", "MPLBACKEND": "Agg",
           "HOME": str(cwd)}  # matplotlib's cache goes under the temp folder
    return subprocess.run([sys.executable, str(EXAMPLES / script), "--smoke", "--no-progress",
                           *args], capture_output=True, text=True, timeout=600, check=True,
                          cwd=cwd, env=env)


def _epochs(log):
    import json

    return [json.loads(line) for line in log.read_text().splitlines()
            if json.loads(line)["event"] == "epoch"]


@pytest.mark.parametrize("script, args", [
    ("train_mnist_mlp.py", ()),                                    # DynaDiag, the default
    ("train_mnist_mlp.py", ("--method", "rigl")),
    ("train_mnist_mlp.py", ("--linear", "unstructured", "--method", "set")),
    ("train_mnist_mlp.py", ("--linear", "dense")),
    ("train_vit_mnist.py", ()),
])
def test_example_smoke_run_writes_log_checkpoints_and_plots(tmp_path, script, args):
    out = tmp_path / "run"
    res = _run(script, "--out", str(out), *args, cwd=tmp_path)
    assert "test accuracy:" in res.stdout and "time per epoch:" in res.stdout, res.stdout
    assert len(_epochs(out / "log.jsonl")) == 1
    for name in ("last.safetensors", "best.safetensors", "learning_curves.png"):
        assert (out / name).stat().st_size > 0, name
    diagonal = "--linear" not in args
    assert (out / "diagonal_activity.png").exists() == diagonal
    dn_load = __import__("diagnet").load(out / "last.safetensors")
    assert dn_load.state["epoch"] == 1 if "epoch" in dn_load.state else True


def test_example_resumes_from_its_checkpoint(tmp_path):
    out = tmp_path / "run"
    _run("train_mnist_mlp.py", "--out", str(out), cwd=tmp_path)
    res = _run("train_mnist_mlp.py", "--out", str(out), "--resume", cwd=tmp_path)
    epochs = _epochs(out / "log.jsonl")
    assert [e["epoch"] for e in epochs] == [0, 1], res.stdout


def test_example_rejects_dynadiag_on_unstructured_layers(tmp_path):
    res = subprocess.run([sys.executable, str(EXAMPLES / "train_mnist_mlp.py"), "--smoke",
                          "--linear", "unstructured"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert res.returncode == 2 and "--method dynadiag needs --linear diag" in res.stderr


def test_plots_are_skipped_with_one_message_without_matplotlib(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(EXAMPLES))
    try:
        import common
    finally:
        sys.path.remove(str(EXAMPLES))
    from diagnet import plots

    monkeypatch.setattr(plots, "matplotlib_available", lambda: False)
    assert common.write_plots(tmp_path / "log.jsonl", tmp_path) == []
    assert capsys.readouterr().out.count("matplotlib is not installed") == 1
