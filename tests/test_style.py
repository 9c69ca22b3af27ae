"""Lint and format, as part of the suite (ruff; settings in pyproject.toml)."""

import subprocess
import sys
from pathlib import Path

from conftest import ROOT

RUFF = Path(sys.executable).parent / "ruff"
PATHS = ["platform", "jobs", "benchmarks", "tests"]


def test_ruff_lint_passes():
    out = subprocess.run([str(RUFF), "check", "--output-format", "concise", *PATHS], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_format_is_clean():
    out = subprocess.run([str(RUFF), "format", "--check", *PATHS], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
