"""The examples run and do what they say."""

import json
import re
import subprocess

import pytest
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


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


# ----------------------------------------------------------------------------- the command line


def _main(script):
    """``main`` of an example, imported in this process (for the fast argument checks)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(script).stem, EXAMPLES / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _refused(script, args, tmp_path, monkeypatch, capsys):
    """Run ``script`` in this process; it must exit 2 with one error line: return that line."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / script)])  # argparse's program name
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        _main(script)(["--smoke", "--no-progress", "--out", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith(f"{script}: error: "), err
    assert not any(line.startswith(f"{script}: error") for line in lines[:-1]), err
    return lines[-1]


@pytest.mark.parametrize("script", ["train_mnist_mlp.py", "train_vit_mnist.py"])
@pytest.mark.parametrize("args, expected", [
    (("--seed", "-1"), "--seed: expected a non-negative integer, got '-1'"),
    (("--epochs", "0"), "--epochs: expected a positive integer, got '0'"),
    (("--batch-size", "0"), "--batch-size: expected a positive integer, got '0'"),
    (("--freeze-epoch", "-2"), "--freeze-epoch: expected a non-negative integer, got '-2'"),
    (("--swap-every", "0"), "--swap-every: expected a positive integer, got '0'"),
    (("--epochs", "two"), "--epochs: expected a positive integer, got 'two'"),
    (("--sparsity", "1"), "--sparsity: expected a number in [0, 1), got '1'"),
    (("--sparsity", "-0.1"), "--sparsity: expected a number in [0, 1), got '-0.1'"),
    (("--sparsity", "nan"), "--sparsity: expected a number in [0, 1), got 'nan'"),
    (("--lr", "-0.001"), "--lr: expected a non-negative number, got '-0.001'"),
    (("--lr", "inf"), "--lr: expected a non-negative number, got 'inf'"),
    (("--t-start", "0"), "--t-start: expected a positive number, got '0'"),
    (("--schedule", "sigmoid"), "--schedule: invalid choice: 'sigmoid'"),
    (("--method", "dynadiag", "--t-start", "0.5", "--t-end", "5"),
     "--t-start 0.5 is below --t-end 5.0: --schedule cosine only falls; a temperature that "
     "rises needs --schedule constant or linear"),
    (("--method", "dynadiag", "--schedule", "step", "--t-start", "1", "--t-end", "2"),
     "--schedule step only falls"),
    (("--device", "cuda:1"), "--device cuda:1: diagnet uses one GPU"),
    (("--device", "tpu"), "--device tpu: device must be one of ('cpu', 'cuda')"),
    (("--resume", "--overwrite"), "argument --overwrite: not allowed with argument --resume"),
])
def test_bad_arguments_get_one_error_line_naming_the_flag(script, args, expected, tmp_path,
                                                          monkeypatch, capsys):
    line = _refused(script, args, tmp_path, monkeypatch, capsys)
    assert expected in line, line
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("args, expected", [
    (("--label-smoothing", "1"), "--label-smoothing: expected a number in [0, 1), got '1'"),
    (("--label-smoothing", "-0.1"), "--label-smoothing: expected a number in [0, 1), got '-0.1'"),
    (("--label-smoothing", "nan"), "--label-smoothing: expected a number in [0, 1), got 'nan'"),
    (("--shift", "-1"), "--shift: expected a non-negative integer, got '-1'"),
    (("--shift", "1.5"), "--shift: expected a non-negative integer, got '1.5'"),
])
def test_vit_flags_get_one_error_line(args, expected, tmp_path, monkeypatch,
                                                      capsys):
    line = _refused("train_vit_mnist.py", args, tmp_path, monkeypatch, capsys)
    assert expected in line, line
    assert not (tmp_path / "run").exists()


def test_resume_without_an_earlier_run_says_there_is_none(tmp_path, monkeypatch, capsys):
    line = _refused("train_mnist_mlp.py", ("--resume",), tmp_path, monkeypatch, capsys)
    assert f"--resume: there is no run to resume in {tmp_path / 'run'}" in line, line
    assert not (tmp_path / "run").exists()


def _files(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_a_second_run_is_refused_and_keeps_the_first(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _run("train_mnist_mlp.py", "--out", str(out), cwd=tmp_path)
    before = _files(out)
    line = _refused("train_mnist_mlp.py", (), tmp_path, monkeypatch, capsys)
    assert (f"{out} holds an earlier run (log.jsonl, last.safetensors, best.safetensors): "
            "continue it with --resume, or replace it with --overwrite") in line, line
    assert _files(out) == before


def test_overwrite_replaces_the_earlier_run(tmp_path):
    out = tmp_path / "run"
    _run("train_mnist_mlp.py", "--out", str(out), "--method", "rigl", cwd=tmp_path)
    _run("train_mnist_mlp.py", "--out", str(out), "--overwrite", cwd=tmp_path)
    records = [json.loads(line) for line in
               (out / "log.jsonl").read_text().splitlines()]
    starts = [r for r in records if r["event"] == "run_start"]
    assert len(starts) == 1 and starts[0]["config"]["method"] == "dynadiag"
    assert len(_epochs(out / "log.jsonl")) == 1


@pytest.mark.parametrize("args, expected", [
    (("--method", "rigl"), "--method rigl (the run in {out} has dynadiag)"),
    (("--sparsity", "0.8"), "--sparsity 0.8 (the run in {out} has 0.9)"),
    (("--linear", "unstructured", "--method", "set"),
     "--linear unstructured (the run in {out} has diag), --method set (the run in {out} has "
     "dynadiag)"),
])
def test_resume_with_other_flags_than_the_run_names_them(args, expected, tmp_path,
                                                           monkeypatch, capsys):
    out = tmp_path / "run"
    _run("train_mnist_mlp.py", "--out", str(out), cwd=tmp_path)
    before = _files(out)
    line = _refused("train_mnist_mlp.py", ("--resume", *args), tmp_path, monkeypatch, capsys)
    assert f"--resume: {expected.format(out=out)}" in line, line
    assert "drop them to continue the run" in line, line
    assert _files(out) == before


def test_resume_refuses_a_run_of_the_other_example(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _run("train_mnist_mlp.py", "--out", str(out), cwd=tmp_path)
    line = _refused("train_vit_mnist.py", ("--resume",), tmp_path, monkeypatch, capsys)
    assert (f"--resume: the run in {out} is one of train_mnist_mlp.py, not of "
            "train_vit_mnist.py") in line, line


def test_resume_takes_the_runs_own_flags(tmp_path):
    out = tmp_path / "run"
    _run("train_mnist_mlp.py", "--out", str(out), "--method", "rigl", "--sparsity", "0.8",
         cwd=tmp_path)
    _run("train_mnist_mlp.py", "--out", str(out), "--resume", cwd=tmp_path)
    assert [e["epoch"] for e in _epochs(out / "log.jsonl")] == [0, 1]


def test_a_rising_temperature_is_allowed_with_a_linear_schedule(tmp_path):
    out = tmp_path / "run"
    _run("train_mnist_mlp.py", "--out", str(out), "--schedule", "linear", "--t-start", "0.5",
         "--t-end", "5", cwd=tmp_path)
    start = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    schedule = start["controller"]["schedule"]
    assert (schedule["kind"], schedule["t_start"], schedule["t_end"]) == ("linear", 0.5, 5.0)


def test_a_short_dynadiag_run_freezes_at_its_last_epoch(tmp_path):
    out = tmp_path / "run"
    res = _run("train_mnist_mlp.py", "--out", str(out), "--epochs", "1", "--freeze-epoch", "3",
               cwd=tmp_path)
    assert res.stdout.count("--freeze-epoch 3 is not before --epochs 1: the layers freeze at "
                            "the start of the last epoch (epoch 0)") == 1, res.stdout
    # 79 of 784 and 3 of 32 diagonals (the candidate pool is gone), and the table says frozen
    assert re.search(r"features\.0 +DynaDiagLinear \(frozen\) +32x784 +2,528 +89\.92%",
                     res.stdout), res.stdout
    assert re.search(r"features\.2 +DynaDiagLinear \(frozen\) +32x32 +96 +90\.62%",
                     res.stdout), res.stdout
    log = (out / "log.jsonl").read_text()
    assert log.count('"event": "freeze"') == 2


def test_ctrl_c_tells_to_resume_with_the_flag(tmp_path, monkeypatch, capsys):
    from diagnet.data import DataLoader

    def one_batch_then_ctrl_c(self, iterate=DataLoader.__iter__):
        batches = iterate(self)
        yield next(batches)
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(DataLoader, "__iter__", one_batch_then_ctrl_c)
    code = _main("train_mnist_mlp.py")(["--smoke", "--out", str(tmp_path / "run")])
    printed = capsys.readouterr()
    assert code == 130
    assert "resume with the same command plus --resume." in printed.out, printed
    assert printed.out.splitlines()[-1] == ("interrupted: to continue, run the same command "
                                            "plus --resume")
    assert "fit(resume" not in printed.out + printed.err


def test_kernels_compile_before_the_timed_loop(tmp_path):
    """On a first run (an empty numba cache) the kernels compile before `Trainer.fit`: the
    first epoch's time and the progress bar's estimate leave the compilation out."""
    script = EXAMPLES / "train_mnist_mlp.py"
    count_compiles_in_fit = (
        "import runpy, sys\n"
        "import numba.core.event as ev\n"
        "from diagnet.train import Trainer\n"
        "fit = Trainer.fit\n"
        "def counted(self, *args, **kwargs):\n"
        "    seen = ev.RecordingListener()\n"
        "    with ev.install_listener('numba:compile', seen):\n"
        "        result = fit(self, *args, **kwargs)\n"
        "    print('compiled during fit:', len(seen.buffer))\n"
        "    return result\n"
        "Trainer.fit = counted\n"
        f"sys.argv = [{str(script)!r}] + sys.argv[1:]\n"
        f"runpy.run_path({str(script)!r}, run_name='__main__')\n")
    env = {"DIAGNET_DEVICE": "cpu", "PATH": "", "MPLBACKEND": "Agg", "HOME": str(tmp_path),
           "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    res = subprocess.run([sys.executable, "-c", count_compiles_in_fit, "--smoke",
                          "--no-progress", "--out", str(tmp_path / "run")], capture_output=True,
                         text=True, timeout=600, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("compiling kernels (first run only") == 1, res.stdout
    assert "compiled during fit: 0" in res.stdout, res.stdout


@pytest.mark.parametrize("flag, key, default, old", [
    ("--label-smoothing", "label_smoothing", 0.1, "0.0"),
    ("--shift", "shift", 2, "0"),
])
def test_resume_of_a_run_saved_before_a_flag_existed_keeps_its_old_value(flag, key, default, old,
                                                                         tmp_path):
    """A ViT run saved before --label-smoothing (or --shift) existed trained without
    smoothing (or shifts): --resume must continue with the old value, not the flag's new
    default, so giving the new default contradicts it."""
    import diagnet as dn

    run = tmp_path / "run"
    _run("train_vit_mnist.py", "--out", str(run), cwd=tmp_path)
    config = dn.load(run / "last.safetensors", rng=False).config
    assert config[key] == default
    old_run = tmp_path / "old"
    old_run.mkdir()
    del config[key]
    dn.save(old_run / "last.safetensors", config=config)  # the configuration is all --resume reads
    env = {"DIAGNET_DEVICE": "cpu", "PATH": "", "HOME": str(tmp_path)}
    res = subprocess.run([sys.executable, str(EXAMPLES / "train_vit_mnist.py"), "--smoke",
                          "--no-progress", "--out", str(old_run), "--resume", flag,
                          str(default)], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env=env)
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"{flag} {default} (the run in" in res.stderr and f"has {old})" in res.stderr
