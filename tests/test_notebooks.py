"""Every notebook in ``notebooks/`` runs top to bottom in a real Jupyter kernel and shows pictures.

Each notebook is executed by nbclient with the ``python3`` kernel (ipykernel), offline, with its
working directory, ``TMPDIR`` and ``CASELENS_HOME`` in a pytest tmp dir (so the temporary home it
makes is cleaned up). A cell that raises fails the test with nbclient's message naming the cell and
its traceback. The executed notebook must hold at least one ``image/png`` output and no error
output. The committed notebooks are checked without a kernel: they carry their outputs (pictures
visible on GitHub), stay small, and use the public API (no CLI subprocesses).

Refresh the committed outputs with ``python notebooks/execute.py``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
MAX_BYTES = 1_500_000
CELL_TIMEOUT_S = 600


def outputs(nb: dict) -> list[dict]:
    return [o for cell in nb.get("cells", []) if cell.get("cell_type") == "code" for o in cell.get("outputs", [])]


def png_count(nb: dict) -> int:
    return sum(1 for o in outputs(nb) if "image/png" in o.get("data", {}))


def test_there_are_notebooks() -> None:
    assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "evaluation.ipynb"}


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_committed_notebook_shows_its_pictures_and_uses_the_library(notebook: Path) -> None:
    assert notebook.stat().st_size < MAX_BYTES, f"{notebook.name} is {notebook.stat().st_size} bytes: downscale"
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    assert nb.get("nbformat") == 4
    assert png_count(nb) >= 2, f"{notebook.name} is committed without its pictures: run notebooks/execute.py"
    assert not [o for o in outputs(nb) if o.get("output_type") == "error"], f"{notebook.name} has an error output"
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert "import caselens" in code
    shell = [line for line in code.splitlines() if line.lstrip().startswith(("!", "%%bash"))
             or re.search(r"\bsubprocess\b", line)]
    assert not shell, f"{notebook.name} shells out instead of using the Python API: {shell}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom_and_draws(notebook: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")

    work = tmp_path / "work"
    work.mkdir()
    # The kernel is a child process: it inherits these.
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("CASELENS_HOME", str(tmp_path / "caselens-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.delenv("CASELENS_EVAL_DATA", raising=False)  # the bundled demo data, as in CI

    nb = nbformat.read(notebook, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(work)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:  # names the cell and shows its traceback
        pytest.fail(f"{notebook.name}: {exc}", pytrace=False)

    executed = json.loads(nbformat.writes(nb))
    errors = [o for o in outputs(executed) if o.get("output_type") == "error"]
    assert not errors, f"{notebook.name}: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    tracebacks = [o["text"] for o in outputs(executed) if o.get("name") == "stderr" and "Traceback" in o.get("text", "")]
    assert not tracebacks, f"{notebook.name} printed a traceback:\n{tracebacks[0]}"
    assert png_count(executed) >= 2, f"{notebook.name} drew fewer than two pictures (image/png outputs)"
