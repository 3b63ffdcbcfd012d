"""The README's hand-training example runs as written and prints the table the README shows."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def _blocks(section):
    text = README.read_text()
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w*)\n(.*?)```", body, flags=re.S)


def test_hand_training_example_runs_and_prints_the_documented_summary(tmp_path):
    blocks = _blocks("Training a diagonal MLP by hand")
    code = next(b for lang, b in blocks if lang == "python")
    table = next(b for lang, b in blocks if lang == "")
    assert len(code.strip().splitlines()) <= 15
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env={"DIAGNET_DEVICE": "cpu", "PATH": ""},
                         check=True)
    loss = float(re.search(r"loss ([0-9.]+)", res.stdout).group(1))
    assert loss < 1.0, res.stdout  # 128 random samples, 50 Adam steps: memorised
    assert table.strip() in res.stdout, res.stdout
    assert (tmp_path / "mlp.safetensors").stat().st_size > 0


def test_dst_guide_first_example_runs():
    text = (README.parent / "docs" / "dst.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
    namespace = {}
    exec(compile(code, "docs/dst.md", "exec"), namespace)  # noqa: S102 - our own docs
    from diagnet.dst import DynaDiag

    assert isinstance(namespace["dst"], DynaDiag) and len(namespace["dst"].layers) == 2


def test_the_code_map_names_every_module_and_only_files_that_exist():
    section = README.read_text().split("## How to read the code", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`((?:diagnet|kernels|models|tests|bench|docs)/[^`]*)`", section))
    root = README.parent
    missing = sorted(p for p in named if not any(root.glob(p.rstrip("/"))))
    assert not missing, f"the README's map names files that do not exist: {missing}"
    units = {f"diagnet/{p.name}" + ("/" if p.is_dir() else "")
             for p in (root / "diagnet").iterdir()
             if p.name != "__init__.py" and not p.name.startswith((".", "__"))
             and (p.suffix == ".py" or (p / "__init__.py").exists())}
    unlisted = sorted(units - named)
    assert not unlisted, f"the README's map leaves out {unlisted}"
    assert "(docs/tour.md)" in section
