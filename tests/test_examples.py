"""The examples run and do what they say."""

import re
import subprocess
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
