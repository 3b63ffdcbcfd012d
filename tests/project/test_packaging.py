"""The built wheel installs diagnet with its kernels and models under the diagnet namespace."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    try:
        import setuptools  # noqa: F401
    except ImportError:
        pytest.skip("setuptools is not installed in this environment")
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("src")
    # build from a copy so that no build/ or egg-info folder lands in the working tree
    src = build / "diagnet-src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "__pycache__", "*.egg-info", "build", ".hypothesis", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "-w", str(out), str(src)], check=True)
    (path,) = out.glob("diagnet-*.whl")
    return path


def test_wheel_contains_namespaced_kernels_and_models(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "diagnet/__init__.py" in names
    assert "diagnet/kernels/__init__.py" in names
    assert "diagnet/models/__init__.py" in names
    assert any(n.startswith("diagnet/kernels/") and n.endswith(".cu") for n in names)
    # nothing generic lands at the top of site-packages
    tops = {n.split("/")[0] for n in names}
    assert not {"kernels", "models", "tests"} & tops


def test_wheel_contains_every_package_of_the_source_tree(wheel):
    # pyproject lists the packages by name: a new subpackage left out of that list would be
    # missing from a plain (non-editable) install while an editable one still finds it
    names = set(zipfile.ZipFile(wheel).namelist())
    inits = (ROOT / "diagnet").rglob("__init__.py")
    packages = sorted(str(p.parent.relative_to(ROOT)) for p in inits)
    missing = [p for p in packages if f"{p}/__init__.py" not in names]
    assert not missing, f"packages missing from the wheel (add them to pyproject.toml): {missing}"


def test_installed_wheel_imports_from_another_directory(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--target", str(target), str(wheel)], check=True)
    code = ("import importlib.resources as r, diagnet, diagnet.kernels, diagnet.models;"
            "cu = [p.name for p in r.files('diagnet.kernels').iterdir() if p.name.endswith('.cu')];"
            "print(diagnet.__version__, diagnet.default_device(), sorted(cu))")
    env = dict(os.environ, PYTHONPATH=str(target), DIAGNET_DEVICE="cpu")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True)
    version, device, kernels = res.stdout.split(" ", 2)
    assert version == "0.1.0" and device == "cpu"
    assert ".cu" in kernels
