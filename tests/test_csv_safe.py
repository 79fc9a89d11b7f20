"""CSV export neutralises manifest values that spreadsheets would run as formulas (CSV injection)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from caselens.csv_safe import neutralise, write_csv
from caselens.cli import main

FORMULAS = ["=cmd|' /C calc'!A0", "@SUM(1+1)*cmd|' /C calc'!A0", "+1+cmd|' /C calc'!A0",
            "-2+3+cmd|' /C calc'!A0", "\t=1+1", "\r=1+1", "  =HYPERLINK(\"http://x\")", "\uff1d1+1"]


def test_neutralise_prefixes_formula_cells_and_keeps_numbers_and_text() -> None:
    for value in FORMULAS:
        assert neutralise(value) == "'" + value
    for value in ("-3.5", "+12", "1e-3", "-.5", "plain label", "a=b", "", "x-ray"):
        assert neutralise(value) == value
    assert neutralise(-3.5) == -3.5 and neutralise(None) is None and neutralise(7) == 7


def test_write_csv_neutralises_every_cell_including_the_header(tmp_path: Path) -> None:
    out = tmp_path / "x.csv"
    assert write_csv(out, ["id", "=evil"], [{"id": "a", "=evil": "=1+1"}, ["b", -2]]) == 2
    rows = list(csv.reader(out.open(newline="")))
    assert rows == [["id", "'=evil"], ["a", "'=1+1"], ["b", "-2"]]


def test_ledger_and_search_exports_neutralise_manifest_values(home: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    lines = ["path,label,note,value"]
    for i, value in enumerate(FORMULAS[:4]):
        Image.fromarray(rng.integers(0, 255, (24, 24), dtype=np.uint8)).save(folder / f"{i}.png")
        lines.append(f'{i}.png,"{value.replace(chr(34), chr(34) * 2)}","{value.replace(chr(34), chr(34) * 2)}",-{i}.5')
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    h = ["--home", str(home)]
    assert main(h + ["ingest", "c", "--manifest", str(folder / "manifest.csv"), "-q"]) == 0
    hits_csv, ledger_csv = tmp_path / "hits.csv", tmp_path / "ledger.csv"
    assert main(h + ["search", "c", "--image", str(folder / "0.png"), "--csv", str(hits_csv)]) == 0
    assert main(h + ["ledger", "c", "--csv", str(ledger_csv)]) == 0
    assert "wrote 4 hits" in capsys.readouterr().out
    rows = list(csv.DictReader(hits_csv.open(newline="")))
    assert len(rows) == 4
    for row in rows:
        assert row["label"].startswith("'") and row["note"].startswith("'") and row["label"][1:] in FORMULAS
        assert float(row["value"]) < 0  # numbers stay numbers
    assert len(list(csv.DictReader(ledger_csv.open(newline="")))) == 4
