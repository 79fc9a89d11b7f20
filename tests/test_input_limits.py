"""Bounded inputs: an overlong line, row, text, manifest or PDF is rejected with a reason and the
rest goes on, with memory bounded while streaming (issue 12: one 10 MB JSONL row stalled an
ingest for minutes at 2.7 GB and wrote nothing)."""

from __future__ import annotations

import io
import json
import tracemalloc
from pathlib import Path

import pytest
from PIL import Image

from caselens.errors import SourceError
from caselens.ingest.items import Item, Rejection
from caselens.ingest.sources.bounded import bounded_lines, csv_records
from caselens.ingest.sources.dicom_source import DicomSourceConfig
from caselens.ingest.sources.image_folder import ImageSource, ImageSourceConfig
from caselens.ingest.sources.pdf import PdfOptions, PdfSource
from caselens.ingest.sources.text_corpus import TextCorpusConfig, TextCorpusSource
from caselens.ingest.sources.text_folder import TextFolderConfig, TextFolderSource

from test_pdf import write_text_pdf

KEY = bytes(range(32))  # a pseudonym key (collections make their own)


def _codes(source) -> list[str]:
    return [x.reason_code if isinstance(x, Rejection) else "item" for x in source]


class _Chunks(io.RawIOBase):
    """A file of ``n`` bytes of ``b"x"`` (no line end) followed by ``tail``, made as it is read."""

    def __init__(self, n: int, tail: bytes):
        self.left, self.tail = n, tail

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.left > 0:
            k = min(len(buffer), self.left)
            buffer[:k] = b"x" * k
            self.left -= k
            return k
        k = min(len(buffer), len(self.tail))
        buffer[:k], self.tail = self.tail[:k], self.tail[k:]
        return k


def test_an_overlong_line_is_skipped_without_being_held_in_memory() -> None:
    fh = io.BufferedReader(_Chunks(20_000_000, b"\nnext line\n"))
    tracemalloc.start()
    lines = list(bounded_lines(fh, 64 << 10))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert [(ln.number, ln.data is None) for ln in lines] == [(1, True), (2, False)]
    assert lines[0].size == 20_000_001 and lines[1].data == b"next line\n"
    assert peak < 4 << 20, f"reading a 20 MB line held {peak} bytes"


def test_csv_records_follow_quotes_and_bound_each_record() -> None:
    data = ('id,text\n"a","two\nlines"\nb,"say ""hi"""\n' + 'c,"' + "y" * 5000 + '"\nd,after\n'
            + 'e,"never closed\nf,lost\n').encode()
    recs = list(csv_records(io.BytesIO(data), 1000))
    got = [(r.line, r.fields if r.fields is None else r.fields[0], r.code) for r in recs]
    assert got[:4] == [(1, "id", ""), (2, "a", ""), (4, "b", ""), (5, None, "too_long")]
    assert recs[1].fields == ["a", "two\nlines"] and recs[2].fields == ["b", 'say "hi"']
    assert got[4] == (6, "d", "")
    assert recs[5].line == 7 and recs[5].fields is not None  # an unclosed quote runs to the end, as csv reads it
    # BOM and bytes that are not UTF-8
    recs = list(csv_records(io.BytesIO(b"\xef\xbb\xbfpath,label\nok.png,a\nbad\xff.png,b\n"), 1000))
    assert recs[0].fields == ["path", "label"] and recs[1].fields == ["ok.png", "a"]
    assert recs[2].code == "not_utf8"


def test_jsonl_corpus_rejects_overlong_rows_and_keeps_the_rest(tmp_path: Path) -> None:
    corpus = tmp_path / "c.jsonl"
    with corpus.open("w") as fh:
        fh.write(json.dumps({"id": "a", "text": "first row"}) + "\n")
        fh.write(json.dumps({"id": "huge", "text": "w " * 3_000_000}) + "\n")  # 6 MB on one line
        fh.write(json.dumps({"id": "long", "text": "z" * 5000}) + "\n")  # fits the line, not the text bound
        fh.write("[" * 100_000 + "]" * 100_000 + "\n")  # nested past the JSON parser's recursion limit
        fh.write(json.dumps({"id": "b", "text": "last row"}) + "\n")
    source = TextCorpusSource(corpus, config=TextCorpusConfig(max_row_bytes=1 << 20, max_text_chars=4000))
    out = list(source)
    assert [(x.input, x.reason_code if isinstance(x, Rejection) else x.id) for x in out] == [
        ("c.jsonl:1", "a"), ("c.jsonl:2", "too_long"), ("c.jsonl:3", "too_long"), ("c.jsonl:4", "bad_json"),
        ("c.jsonl:5", "b")]
    assert "characters" in out[2].reason and "bytes" in out[1].reason
    assert source.estimate() == 5
    # rows past max_rows: one rejection for the rest
    capped = TextCorpusSource(corpus, config=TextCorpusConfig(max_rows=2))
    assert _codes(capped)[-1] == "too_many_rows" and len(_codes(capped)) == 3


def test_csv_corpus_reads_fields_past_the_csv_module_default_and_bounds_rows(tmp_path: Path) -> None:
    corpus = tmp_path / "c.csv"
    big = "word " * 60_000  # 300 KB: csv's default field limit (128 KiB) refused it with a traceback
    corpus.write_text(f'id,text,note\na,"{big}",x\nhuge,"{"q" * 3_000_000}",y\nb,short,=cmd\n')
    out = list(TextCorpusSource(corpus, config=TextCorpusConfig(max_row_bytes=1 << 20, max_text_chars=400_000)))
    assert [x.reason_code if isinstance(x, Rejection) else x.id for x in out] == ["a", "too_long", "b"]
    assert out[0].text == big.strip() and out[2].metadata == {"note": "=cmd"}


def test_configs_check_their_limits() -> None:
    for make in (lambda: TextCorpusConfig(max_row_bytes=0), lambda: TextFolderConfig(max_text_chars=-1),
                 lambda: ImageSourceConfig(max_manifest_rows=0), lambda: PdfOptions(max_pages=0),
                 lambda: DicomSourceConfig(max_files=0), lambda: TextCorpusConfig(source_paths="secret")):
        with pytest.raises(ValueError):
            make()


def test_manifest_is_streamed_with_bounds(tmp_path: Path) -> None:
    for i in range(3):
        Image.new("L", (8, 8), 40 * i).save(tmp_path / f"im{i}.png")
    lines = ["path,label,score", "im0.png,a,1.5", "im1.png," + "b" * 5000 + ",2", "im2.png,c,3"]
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    source = ImageSource(manifest=tmp_path / "manifest.csv", secret=KEY, config=ImageSourceConfig(max_row_bytes=1000))
    out = list(source)
    assert _codes(out) == ["item", "too_long", "item"]
    assert out[1].input == "manifest line 3" and out[2].metadata == {"label": "c", "score": 3.0}
    capped = ImageSource(manifest=tmp_path / "manifest.csv", secret=KEY, config=ImageSourceConfig(max_manifest_rows=1))
    assert _codes(capped) == ["item", "too_many_rows"] and capped.estimate() == 1
    # an image file over the byte bound is not decoded
    small = ImageSource(tmp_path, secret=KEY, config=ImageSourceConfig(max_file_bytes=10))
    assert set(_codes(small)) == {"too_large"}


def test_text_folder_bounds_files_by_bytes_and_characters(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# Title\nshort note")
    (tmp_path / "big.txt").write_text("x" * 5000)
    (tmp_path / "wide.txt").write_text("é" * 1500)  # 3000 bytes, 1500 characters
    out = list(TextFolderSource(tmp_path, config=TextFolderConfig(max_file_bytes=4000, max_text_chars=1000)))
    assert {x.input: (x.reason_code if isinstance(x, Rejection) else "item") for x in out} == {
        "a.md": "item", "big.txt": "too_large", "wide.txt": "too_long"}
    assert out[0].metadata["document"] == "Title"


def test_pdf_over_the_page_bound_is_rejected_whole(tmp_path: Path) -> None:
    write_text_pdf(tmp_path / "book.pdf", [["page one text that is long enough"], ["page two text, long enough too"]])
    out = list(PdfSource(tmp_path, PdfOptions(max_pages=1, ocr=False)))
    assert _codes(out) == ["too_many_pages"] and out[0].input == "book.pdf"
    out = list(PdfSource(tmp_path, PdfOptions(max_page_chars=10, ocr=False)))
    assert _codes(out) == ["too_long", "too_long"]
    assert [x for x in PdfSource(tmp_path, PdfOptions(ocr=False)) if isinstance(x, Item)]
    with pytest.raises(SourceError):
        PdfOptions(dpi=5)


def test_a_10mb_row_is_rejected_and_the_corpus_ingested(home: Path, tmp_path: Path, minilm) -> None:
    from caselens.indexes.collection import Collection
    from caselens.ingest.pipeline import IngestConfig, ingest

    corpus = tmp_path / "c.jsonl"
    with corpus.open("w") as fh:
        for i in range(20):
            fh.write(json.dumps({"id": f"r{i}", "text": f"Row {i} about pleural effusion."}) + "\n")
            if i == 10:
                fh.write(json.dumps({"id": "huge", "text": "effusion " * 1_200_000}) + "\n")  # 10.8 MB
    coll = Collection.create("t", minilm.info.to_record(), home)
    report = ingest(TextCorpusSource(corpus), coll, minilm, IngestConfig(progress=False, build_index=False))
    assert report.accepted == 20 and dict(report.rejected) == {"too_long": 1}
    rejected = [e for e in coll.ledger(report.run_id) if e["status"] == "rejected"]
    assert [e["input"] for e in rejected] == ["c.jsonl:12"]
