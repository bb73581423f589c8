"""The package type-checks (mypy, configured in pyproject.toml), as users who type-check code
calling it rely on: it ships py.typed and a stub of its compiled module."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_package_type_checks():
    pytest.importorskip("mypy", reason="mypy comes with the dev extra (make test installs it)")
    proc = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", os.path.join(ROOT, "build", "mypy_cache")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Success: no issues found" in proc.stdout

