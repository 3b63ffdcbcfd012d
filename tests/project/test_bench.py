"""The benchmark scripts: what they write where (timings themselves are never asserted)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


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


def test_regenerating_the_kernel_tables_keeps_every_other_part_of_the_benchmarks_doc(tmp_path):
    # bench_diag_linear.py rewrites docs/benchmarks.md, keeping only the marked sections after
    # its own text: notes written by hand must sit in marked sections too
    reports = _load("reports")
    text = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    own = text[:text.index("<!-- begin: ")]
    doc = tmp_path / "benchmarks.md"
    doc.write_text(text, encoding="utf-8")
    reports.write_keeping_sections(doc, own)
    assert doc.read_text(encoding="utf-8").split() == text.split()


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
    assert not hasattr(bench, "TORCH_REFERENCE_MS")  # ratios only to PyTorch measured here
    if importlib.util.find_spec("torch") is None:
        assert "PyTorch not installed" in res.stdout and "PyTorch / variant" not in res.stdout
    assert (ROOT / "docs" / "benchmarks.md").read_bytes() == before


def test_vit_step_bench_quick_run_prints_and_writes_nothing(tmp_path):
    import subprocess

    bench = _load("bench_vit_step")
    assert bench.default_output(quick=True, device="cpu") is None
    assert bench.default_output(quick=False, device="cuda") == str(ROOT / "docs" /
                                                                   "gpu-benchmarks.md")
    before = (ROOT / "docs" / "benchmarks.md").read_bytes()
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_vit_step.py"), "--quick",
                          "--steps", "1", "--profile-steps", "1"], capture_output=True,
                         text=True, timeout=300, check=True, cwd=tmp_path,
                         env={"DIAGNET_DEVICE": "cpu", "PATH": ""})
    for text in ("| ViT | diagnet dense", "| ViT | diagnet diag 90% static",
                 "| MLP | diagnet DynaDiag 90% soft", "| MLP | diagnet DynaDiag 90% frozen",
                 "train step @ 128", "inference @ 1 ", "inference @ 128",
                 "Where the time of the diagonal ViT's training step goes", "| diagonal kernels |",
                 "Top functions by own time"):
        assert text in res.stdout, res.stdout
    if importlib.util.find_spec("torch") is None:
        assert "PyTorch not installed" in res.stdout and "x PyTorch" not in res.stdout
    else:
        assert "| ViT | PyTorch dense |" in res.stdout and "x PyTorch" in res.stdout
    assert (ROOT / "docs" / "benchmarks.md").read_bytes() == before


def test_vit_step_bench_imports_torch_only_in_its_child(tmp_path):
    # PyTorch's thread pools in diagnet's process slowed diagnet's steps, so the parent
    # leaves even the check whether torch imports to the child. A stand-in torch on the
    # path records which process imported it, and fails to import.
    import subprocess

    fake = tmp_path / "site"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text(
        "import os\n"
        "open(os.path.join(os.path.dirname(__file__), os.pardir, f'imported-{os.getpid()}'),"
        " 'w').close()\n"
        "raise ImportError('a stand-in torch that does not import')\n")
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "bench_vit_step.py"), "--tiny",
                             "--steps", "1", "--profile-steps", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                            env={"DIAGNET_DEVICE": "cpu", "PATH": "", "PYTHONPATH": str(fake)})
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    importers = {int(f.name.split("-")[1]) for f in fake.glob("imported-*")}
    assert importers and proc.pid not in importers, (importers, proc.pid)
    assert "PyTorch does not import here (ImportError: a stand-in torch" in out, out
    assert "x PyTorch" not in out and "| ViT | diagnet diag 90% static" in out


def test_vit_step_bench_pytorch_twins_match_the_models():
    torch = pytest.importorskip("torch")
    bench = _load("bench_vit_step")
    for sizes in (bench.FULL, bench.TINY):
        for name, twin in (("ViT", bench.torch_vit(torch, sizes.vit)),
                           ("MLP", bench.torch_mlp(torch, sizes.mlp))):
            model, _ = bench.make_model(sizes, name, bench.DENSE, "cpu")
            assert sum(p.numel() for p in twin.parameters()) == bench.parameter_count(model)
            x, _ = bench.make_data(name, 3)[0]
            assert tuple(twin(torch.from_numpy(x)).shape) == (3, bench.CLASSES)


@pytest.fixture
def fast_fake_gpu():
    """With the CuPy stand-in, run the kernels in the harness built without sanitizers: the
    benchmarks launch hundreds of kernels (memory errors are the kernel tests' concern)."""
    from diagnet import backend
    from diagnet.diag import cuda

    if not backend.cupy_or_none().__version__.endswith("+simt"):
        yield  # a real GPU
        return
    from simt import fake_cupy

    cuda.clear_cache()  # compiled modules run on the device they were built for
    try:
        with fake_cupy.use_device(fake_cupy.SimtDevice(flavor="plain")):
            yield
    finally:
        cuda.clear_cache()


@pytest.mark.gpu
def test_vit_step_bench_runs_on_cuda(fast_fake_gpu, capsys):
    bench = _load("bench_vit_step")
    bench.main(["--tiny", "--device", "cuda", "--steps", "1", "--profile-steps", "1"])
    out = capsys.readouterr().out
    for text in ("device `cuda`", "| ViT | diagnet DynaDiag 90% soft", "| MLP | diagnet dense",
                 "train step @ 4", "| diagonal kernels |", "waiting for the GPU"):
        assert text in out, out
    assert "wrote section" not in out


@pytest.mark.gpu
def test_train_step_bench_runs_on_cuda(fast_fake_gpu, capsys):
    bench = _load("bench_train_step")
    bench.main(["--quick", "--device", "cuda", "--steps", "1", "--batches", "2",
                "--no-children"])
    out = capsys.readouterr().out
    for text in ("on the GPU", "| diagnet diag 90% static |", "| diagnet DynaDiag 90% frozen |",
                 "ms / step @ 2", "not run with `--device cuda`"):
        assert text in out, out
    assert "wrote section" not in out


def test_distributed_bench_quick_run_prints_both_tables(tmp_path):
    """The scaling bench on --smoke data: 1 and 2 processes of the MLP example, and the
    bytes table (counted, not timed)."""
    import os
    import shutil
    import subprocess

    bin_dir = str(Path(sys.executable).parent)
    if shutil.which("mpiexec", path=bin_dir + os.pathsep + os.environ.get("PATH", "")) is None:
        pytest.skip('needs mpiexec: pip install -e ".[distributed]"')
    env = {**os.environ, "DIAGNET_DEVICE": "cpu",
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_distributed.py"),
                          "--quick"], capture_output=True, text=True, timeout=600, check=True,
                         cwd=tmp_path, env=env)
    assert "| MLP dense | " in res.stdout and "2 processes" in res.stdout, res.stdout
    assert "1 process, all cores" in res.stdout
    rows = [line for line in res.stdout.splitlines() if "diagonal 90%" in line]
    assert len(rows) == 6, res.stdout  # MLP and ViT: RigL, DynaDiag soft and frozen
    assert "bytes per ordinary step" in res.stdout


_SERVER_CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
from reports import serve_steps
calls = {"a": 0, "b": 0}
def step(key, value):
    def run():
        calls[key] += 1
        return value + calls[key] / 1000
    return run
serve_steps({"a": step("a", 1.0), "b": step("b", 2.0)}, {"pid": 1, "args": sys.argv[2:]})
"""


def test_step_server_times_steps_in_a_child_between_the_parents_visits(tmp_path):
    """`StepServer`: the child's steps run where and when `time_variants` visits them, one
    request per visit, and the child quits when the server closes."""
    reports = _load("reports")
    script = tmp_path / "child.py"
    script.write_text(_SERVER_CHILD)
    order = []

    def local():
        order.append("local")
        return 0.5

    with reports.StepServer([sys.executable, str(script), str(ROOT / "bench"), "x"],
                            "test child") as server:
        assert server.info == {"pid": 1, "args": ["x"]}
        remote = server.step("a")
        assert remote() == pytest.approx(1.001)  # one step, in the child
        assert remote.many(2) == pytest.approx([1.002, 1.003])
        times = reports.time_variants({"local": local, "b": server.step("b")}, steps=3,
                                      warmup=1, rounds=2)
        proc = server._proc
    assert proc.returncode == 0  # told to quit, it did
    assert times["local"] == [0.5] * 6
    # b: 1 warm-up, then per round 1 settling step and 3 timed ones, numbered in the child
    assert times["b"] == pytest.approx([2.003, 2.004, 2.005, 2.007, 2.008, 2.009])
    assert len(order) == 1 + 2 * 4


def test_step_server_reports_a_child_that_fails(tmp_path):
    reports = _load("reports")
    script = tmp_path / "child.py"
    script.write_text(_SERVER_CHILD)
    with reports.StepServer([sys.executable, str(script), str(ROOT / "bench")],
                            "test child") as server:
        with pytest.raises(RuntimeError, match="(?s)test child failed.*KeyError: 'missing'"):
            server.run("missing", 1)
    bad = tmp_path / "bad.py"
    bad.write_text("print('no server here')\nraise SystemExit(3)\n")
    with pytest.raises(RuntimeError, match="(?s)test child failed \\(exit 3\\).*no server here"):
        reports.StepServer([sys.executable, str(bad)], "test child")
