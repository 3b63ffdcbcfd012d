"""The code tour cannot go stale: `docs/tour.py` runs, and `docs/tour.md` names only what exists.

`docs/tour.md` refers to the code in inline code spans: file paths (``diagnet/row_state.py``,
``kernels/*.cu``), dotted symbols (``diagnet.nn.linear.DiagLinear.set_offsets``) and, on a
``Check yourself:`` line closing each section, a pytest selection (``pytest -q
tests/optim/test_optim.py -k remap_rows``). Every path must exist, every symbol must import, and
every selection must select at least one test. Its map must list the layers of
`tests/project/test_layers.py`, and its stops must be the stops the companion prints.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOUR_MD = ROOT / "docs" / "tour.md"
TOUR_PY = ROOT / "docs" / "tour.py"
STOP_HEADING = re.compile(r"^## Stop (\d+): (.+?) \(\d+ minutes\)$", flags=re.M)
PRINTED_STOP = re.compile(r"^== (\d+)\. (.+)$", flags=re.M)


def _spans():
    """The inline code spans of tour.md (fenced blocks left out)."""
    text = re.sub(r"```.*?```", "", TOUR_MD.read_text(), flags=re.S)
    return [span.strip() for span in re.findall(r"`([^`]+)`", text)]


def _paths():
    return sorted({s for s in _spans() if "/" in s and re.fullmatch(r"[\w.*/-]+", s)})


def _symbols():
    return sorted({s for s in _spans() if re.fullmatch(r"diagnet(\.\w+)+", s)})


def _selections():
    """The "Check yourself" selection of each section (the map, then the stops)."""
    return re.findall(r"^Check yourself: `(pytest [^`]+)`$", TOUR_MD.read_text(), flags=re.M)


def _resolve(dotted):
    """Import the longest module prefix of ``dotted`` and look the rest up as attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(dotted)


@pytest.fixture(scope="module")
def companion_output(tmp_path_factory):
    env = {**os.environ, "DIAGNET_DEVICE": "cpu"}
    res = subprocess.run([sys.executable, str(TOUR_PY)], cwd=tmp_path_factory.mktemp("tour"),
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def test_the_companion_prints_the_stops_of_the_tour_in_order(companion_output):
    printed = [(int(n), title) for n, title in PRINTED_STOP.findall(companion_output)]
    stops = [(int(n), title) for n, title in STOP_HEADING.findall(TOUR_MD.read_text())]
    assert len(stops) == 7
    assert printed == stops


def test_the_companion_shows_each_stop_doing_its_work(companion_output):
    expected = [
        "y.creator: DiagLinearFunction",
        "graph, from the loss back: CrossEntropy <- ",
        "loss.creator.freed = True",
        "dispatch.implementation(x.data) -> diagnet.diag.",
        "with settings.override(cpu_kernels='reference') -> diagnet.diag.reference",
        "exp_avg (4, 6)",
        "kept rows unchanged True, grown rows zero True",
        "same offsets True, same output True",
    ]
    for line in expected:
        assert line in companion_output, companion_output
    offsets = re.search(r"offsets (\[[\d, ]+\]) -> (\[[\d, ]+\])", companion_output)
    assert offsets and offsets.group(1) != offsets.group(2), companion_output
    assert len(companion_output.splitlines()) < 60  # short enough to read


def test_every_file_the_tour_names_exists():
    paths = _paths()
    assert "diagnet/row_state.py" in paths and "kernels/*.cu" in paths
    missing = [p for p in paths if not any(ROOT.glob(p.rstrip("/")))]
    assert not missing, f"docs/tour.md names files that do not exist: {missing}"


def test_every_symbol_the_tour_names_resolves():
    symbols = _symbols()
    assert "diagnet.nn.linear.DiagLinear.set_offsets" in symbols
    missing = []
    for dotted in symbols:
        try:
            _resolve(dotted)
        except (ImportError, AttributeError) as exc:
            missing.append(f"{dotted} ({type(exc).__name__}: {exc})")
    assert not missing, "docs/tour.md names symbols that do not exist:\n" + "\n".join(missing)


def test_the_map_lists_the_layers_of_the_layer_test():
    source = next((ROOT / "tests").rglob("test_layers.py"))
    assign = next(node for node in ast.parse(source.read_text()).body
                  if isinstance(node, ast.Assign) and node.targets[0].id == "LAYERS")
    layers = [tuple(units) for units in ast.literal_eval(assign.value)]
    section = TOUR_MD.read_text().split("## The map", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| ([^|]+) \|", section, flags=re.M)
    assert [int(n) for n, _ in rows] == list(range(len(rows)))
    mapped = [tuple("" if unit == "diagnet/__init__.py" else unit
                    for unit in re.findall(r"`([^`]+)`", units)) for _, units in rows]
    assert mapped == layers


@pytest.mark.parametrize("selection", _selections(),
                         ids=[f"section{i}" for i in range(len(_selections()))])
def test_each_check_yourself_selection_selects_tests(selection):
    args = shlex.split(selection)[1:]
    args = [str(ROOT / a) if a.startswith("tests/") else a for a in args]
    # run from tests/ so that `-m pytest` puts no checkout folder before the installed package
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-p",
                          "no:cacheprovider", *args], cwd=ROOT / "tests",
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{selection!r} selects no test:\n{res.stdout[-2000:]}"


def test_every_stop_has_a_selection():
    assert len(_selections()) == 1 + len(STOP_HEADING.findall(TOUR_MD.read_text()))
