"""Architecture contracts: the import-linter contracts in pyproject.toml hold (layers point one
way, as DESIGN.md says), and the CLI starts without importing the heavy libraries."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

# where each installed package's files are in the repository (pyproject's package-dir)
PACKAGE_DIRS = {"caselens": "caselens", "caselens/ingest": "ingest", "caselens/indexes": "indexes",
                "caselens/retrieval": "retrieval"}


def installed_layout(target: Path) -> Path:
    """The package tree as a wheel installs it (``caselens/ingest/...``), copied under ``target``:
    import-linter reads packages from the file system, and the repository keeps the three layers
    in root folders mapped by package-dir."""
    for package, folder in PACKAGE_DIRS.items():
        for path in (ROOT / folder).rglob("*.py"):
            if any(part.startswith(".") or part == "__pycache__" for part in path.relative_to(ROOT).parts):
                continue
            dest = target / package / path.relative_to(ROOT / folder)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
    shutil.copyfile(ROOT / "pyproject.toml", target / "pyproject.toml")
    return target


def test_import_linter_contracts_hold(tmp_path: Path) -> None:
    exe = shutil.which("lint-imports") or shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("import-linter is not installed (pip install caselens[test])")
    tree = installed_layout(tmp_path / "tree")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([exe, "--no-cache", str(tree / "pyproject.toml")], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout and "3 kept" in done.stdout


def test_the_cli_and_the_package_import_no_heavy_library() -> None:
    code = ("import sys, caselens, caselens.cli as cli; cli.build_parser(); "
            "heavy = [m for m in ('lancedb', 'faiss', 'torch', 'pyarrow', 'numpy') if m in sys.modules]; "
            "print(','.join(heavy))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"imported at start-up: {done.stdout}"
