"""The house plan is enforced: `lint-imports` (import-linter, contracts in pyproject.toml) passes, and it
fails when a component imports across a floor (here: export importing eval)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.is_file(), reason="import-linter is not installed (pip install -e .[dev])")


def _lint(src: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH first: import-linter builds its graph from the `kdforge` it can import.
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([str(LINT), str(ROOT / "pyproject.toml"), "--no-cache"], cwd=src, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_layer_contract_holds():
    r = _lint(ROOT / "src")
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_layer_contract_fails_when_export_imports_eval(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "kdforge", src / "kdforge", ignore=shutil.ignore_patterns("__pycache__"))
    init = src / "kdforge" / "export" / "__init__.py"
    init.write_text(init.read_text() + "\nimport kdforge.eval.markdown  # noqa: F401  (a forbidden import)\n")
    r = _lint(src)
    assert r.returncode != 0
    assert "kdforge.export is not allowed to import kdforge.eval" in r.stdout, r.stdout
