"""The benchmark scripts: what they write where (timings themselves are never asserted)."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # importing must not re-exec the process or run anything
    return module


def test_quick_runs_never_overwrite_the_committed_tables():
    bench = _load("bench_diag_linear")
    assert bench.default_output(quick=True, device="cpu") is None
    assert bench.default_output(quick=True, device="cuda") is None
    assert bench.default_output(quick=False, device="cpu") == str(ROOT / "docs" / "benchmarks.md")
    assert bench.default_output(quick=False, device="cuda") == str(ROOT / "docs" / "gpu-benchmarks.md")


def test_reports_keep_other_benchmarks_sections(tmp_path):
    reports = _load("reports")
    doc = tmp_path / "benchmarks.md"
    reports.write_section(doc, "train_step", "| a | b |\n|---|---|\n| 1 | 2 |")
    reports.write_section(doc, "other", "text")
    reports.write_section(doc, "train_step", "| a | b |\n|---|---|\n| 3 | 4 |")  # replaced
    text = doc.read_text()
    assert text.count("<!-- begin: train_step -->") == 1 and "| 3 | 4 |" in text
    assert "| 1 | 2 |" not in text and "text" in text
    reports.write_keeping_sections(doc, "# Kernels\n\nnew grid\n")
    text = doc.read_text()
    assert text.startswith("# Kernels\n\nnew grid\n")
    assert set(reports.sections(text)) == {"train_step", "other"} and "| 3 | 4 |" in text
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_dst_step_bench_quick_run_prints_and_writes_nothing(tmp_path):
    import subprocess

    bench = _load("bench_dst_step")
    assert bench.default_output(quick=True, device="cpu") is None
    before = (ROOT / "docs" / "benchmarks.md").read_bytes()
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_dst_step.py"), "--quick",
                          "--steps", "3"], capture_output=True, text=True, timeout=300,
                         check=True, cwd=tmp_path, env={"DIAGNET_DEVICE": "cpu", "PATH": ""})
    for variant in ("dynadiag sparse", "dynadiag reference", "dense", "static diag"):
        assert variant in res.stdout, res.stdout
    assert (ROOT / "docs" / "benchmarks.md").read_bytes() == before


def test_train_step_bench_quick_run_prints_and_writes_nothing(tmp_path):
    import subprocess

    bench = _load("bench_train_step")
    assert bench.default_output(quick=True, device="cpu") is None
    before = (ROOT / "docs" / "benchmarks.md").read_bytes()
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_train_step.py"), "--quick",
                          "--steps", "3", "--no-children"], capture_output=True, text=True,
                         timeout=300, check=True, cwd=tmp_path,
                         env={"DIAGNET_DEVICE": "cpu", "PATH": ""})
    for variant in ("diagnet dense", "diag 90% static", "DynaDiag 90% soft", "Where the time goes"):
        assert variant in res.stdout, res.stdout
    assert (ROOT / "docs" / "benchmarks.md").read_bytes() == before
