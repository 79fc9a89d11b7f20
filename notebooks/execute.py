"""Execute the notebooks in this folder top to bottom and save them with their outputs.

    .venv/bin/python notebooks/execute.py                 # every notebook
    .venv/bin/python notebooks/execute.py quickstart      # the ones whose name contains "quickstart"

Run offline (``HF_HUB_OFFLINE=1`` is set) with the ``python3`` Jupyter kernel (``pip install
caselens[notebooks]``) in a temporary working directory, so the notebooks find only what they
create; prints how long each took and its size. The committed notebooks are this script's output.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 600  # per cell


def execute(path: Path, cwd: Path) -> tuple[nbformat.NotebookNode, float]:
    """The notebook at ``path`` executed in ``cwd`` (raises nbclient's CellExecutionError on an
    error), and the seconds it took."""
    nb = nbformat.read(path, as_version=4)
    started = time.perf_counter()
    NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb, time.perf_counter() - started


def main(patterns: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    for path in sorted(HERE.glob("*.ipynb")):
        if patterns and not any(p in path.stem for p in patterns):
            continue
        with tempfile.TemporaryDirectory(prefix="caselens-nb-") as tmp:
            nb, seconds = execute(path, Path(tmp))
        for cell in nb.cells:  # no run-specific metadata in the committed file
            cell.get("metadata", {}).pop("execution", None)
        nbformat.write(nb, path)
        print(f"{path.name}: {seconds:.0f} s, {path.stat().st_size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
