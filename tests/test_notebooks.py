"""Every notebook in ``notebooks/`` runs top to bottom.

The code cells of each notebook are executed in order, in one fresh namespace (``exec`` of the cell
source; IPython magics and shell escapes, i.e. lines starting with ``%`` or ``!``, are skipped), with
the working directory and ``tempfile``'s default folder set to a pytest tmp dir. A failure names the
notebook and the cell index (its position among all cells, as Jupyter shows them).

No Jupyter kernel is needed: this does not check outputs, only that the cells run.
"""

from __future__ import annotations

import json
import linecache
import tempfile
import traceback
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def code_cells(path: Path) -> list[tuple[int, str]]:
    """(cell index, source without %/! lines) of each code cell of the notebook at ``path``."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert nb.get("nbformat") == 4, f"{path.name}: not an nbformat 4 notebook"
    cells = []
    for index, cell in enumerate(nb.get("cells", [])):
        if cell.get("cell_type") != "code":
            continue
        source = cell.get("source", "")
        if isinstance(source, list):
            source = "".join(source)
        lines = [line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))]
        cells.append((index, "\n".join(lines) + "\n"))
    return cells


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(notebook: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    # tempfile.mkdtemp() in a notebook lands under tmp_path, so pytest cleans it up.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    # Anything that falls back to the default caselens home writes under tmp_path too.
    monkeypatch.setenv("CASELENS_HOME", str(tmp_path / "caselens-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")

    cells = code_cells(notebook)
    assert cells, f"{notebook.name} has no code cells"
    namespace: dict = {"__name__": "__main__"}
    for index, source in cells:
        filename = f"{notebook.name}[cell {index}]"
        linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)  # tracebacks show lines
        failure = None
        try:
            exec(compile(source, filename, "exec"), namespace)
        except Exception as exc:  # report which cell broke, with the traceback from the cell down
            tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None  # drop this frame
            failure = (f"{notebook.name}: cell {index} raised {type(exc).__name__}: {exc}\n\n"
                       + "".join(traceback.format_exception(type(exc), exc, tb))
                       + f"\n--- {notebook.name}, cell {index} ---\n{source}")
        if failure is not None:
            pytest.fail(failure, pytrace=False)
