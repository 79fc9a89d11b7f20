"""PDF ingest on real PDF files read by PDFium: chunks point to pages, re-ingest adds nothing,
broken, encrypted and image-only PDFs are handled or rejected with a reason."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont

from caselens.indexes import derived
from caselens.indexes.collection import Collection
from caselens.ingest.chunking import chunker_for
from caselens.ingest.items import Item, Rejection
from caselens.ingest.pipeline import IngestConfig, ingest
from caselens.ingest.sources.pdf import PdfOptions, PdfSource, clean_page_text
from caselens.ingest.encoders import load_encoder
from caselens.retrieval.search import search

from conftest import SHARED_DATA, needs_shared

QUIET = IngestConfig(progress=False)

PAGE_1 = ["The Respiratory System", "The lungs exchange oxygen and carbon dioxide with the blood.",
          "Air enters through the nasal cavity, where it is warmed and humidified.",
          "Figure 22.4 Upper Airway", "The pharynx connects the nasal cavity to the larynx.",
          "The larynx holds the vocal cords and protects the airway during swallowing."] + \
         [f"Alveolar sentence {i}: type II alveolar cells secrete pulmonary surfactant." for i in range(12)]
PAGE_2 = ["Bone Tissue", "Osteoblasts build new bone matrix and osteoclasts resorb it.",
          "Figure 6.3 Long Bone Structure", "The diaphysis is the tubular shaft of a long bone."] + \
         [f"Remodelling sentence {i}: calcium is stored in the mineralised matrix." for i in range(10)]


def _escape(line: str) -> str:
    return line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def write_text_pdf(path: Path, pages: list[list[str]], title: str = "Test Notes") -> Path:
    """A real PDF 1.4 file with a Helvetica text layer, one page per list of lines."""
    n = len(pages)
    page_ids = [5 + 2 * i for i in range(n)]
    objs = {1: "<< /Type /Catalog /Pages 2 0 R >>",
            2: f"<< /Type /Pages /Kids [{' '.join(f'{p} 0 R' for p in page_ids)}] /Count {n} >>",
            3: "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
            4: f"<< /Title ({_escape(title)}) >>"}
    for pid, lines in zip(page_ids, pages):
        content = "BT /F1 10 Tf 13 TL 50 760 Td " + " ".join(f"({_escape(x)}) Tj T*" for x in lines) + " ET"
        objs[pid] = (f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
                     f"/Resources << /Font << /F1 3 0 R >> >> /Contents {pid + 1} 0 R >>")
        objs[pid + 1] = f"<< /Length {len(content)} >>\nstream\n{content}\nendstream"
    out = b"%PDF-1.4\n"
    offsets = {}
    for num in sorted(objs):
        offsets[num] = len(out)
        out += f"{num} 0 obj\n{objs[num]}\nendobj\n".encode("latin-1")
    xref, size = len(out), max(objs) + 1
    out += f"xref\n0 {size}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offsets[i]:010d} 00000 n \n".encode() for i in range(1, size))
    out += f"trailer\n<< /Size {size} /Root 1 0 R /Info 4 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    path.write_bytes(out)
    return path


def _text_collection(home: Path, minilm, name: str = "books") -> Collection:
    return (Collection.open(name, home) if Collection.exists(name, home)
            else Collection.create(name, minilm.info.to_record(), home))


def _ingest_pdf(home: Path, path: Path, minilm, size: int = 64):
    coll = _text_collection(home, minilm)
    source = PdfSource(path, PdfOptions(), chunker_for(minilm, size, 8))
    return coll, ingest(source, coll, minilm, QUIET)


def test_clean_page_text_joins_soft_hyphens_and_drops_controls() -> None:
    assert clean_page_text("respira\x02\r\ntory  system\x00\r\nnext") == "respiratory system\nnext"


def test_pdf_pages_become_chunks_pointing_to_their_page(home: Path, tmp_path: Path, minilm) -> None:
    pdf = write_text_pdf(tmp_path / "notes.pdf", [PAGE_1, PAGE_2], title="Respiratory and Bone Notes")
    coll, report = _ingest_pdf(home, pdf, minilm)
    assert report.accepted > 2 and not report.rejected
    rows = coll.rows(columns=["id", "page", "page_id", "parent_id", "document", "figures", "ocr", "text",
                              "provenance"]).to_pylist()
    assert {r["page"] for r in rows} == {1.0, 2.0}
    for r in rows:
        assert r["id"].startswith(r["page_id"] + "#c") and r["parent_id"] == r["page_id"]
        assert r["document"] == "Respiratory and Bone Notes" and r["ocr"] == 0
        assert minilm.count_tokens(r["text"]) <= 64
    # every line of the page text is in some chunk of that page
    page1 = " ".join(r["text"] for r in rows if r["page"] == 1)
    assert all(line in page1 for line in PAGE_1)
    # the caption line stays whole and is named in the chunk's figures column
    captioned = [r for r in rows if "Figure 22.4 Upper Airway" in r["text"]]
    assert len(captioned) == 1 and "Figure 22.4" in captioned[0]["figures"]
    # a query about a page's subject returns a chunk of that page
    hit = search(coll, text="osteoclasts resorb bone matrix", k=1).hits[0]
    assert hit.metadata["page"] == 2 and hit.source == "notes.pdf#page=2"
    hit = search(coll, text="upper airway nasal cavity", k=1, mode="bm25").hits[0]
    assert hit.metadata["page"] == 1


def test_reingest_of_the_same_pdf_adds_nothing(home: Path, tmp_path: Path, minilm) -> None:
    pdf = write_text_pdf(tmp_path / "notes.pdf", [PAGE_1, PAGE_2])
    coll, first = _ingest_pdf(home, pdf, minilm)
    version, count = coll.version, coll.count()
    copy = shutil.copy(pdf, tmp_path / "renamed copy.pdf")  # same content under another name
    for path in (pdf, Path(copy)):
        coll, again = _ingest_pdf(home, path, minilm)
        assert again.accepted == 0 and again.duplicates == first.accepted
        assert coll.count() == count
    assert {e["status"] for e in coll.ledger(again.run_id)} == {"duplicate"}
    assert coll.version >= version


def test_corrupt_and_non_pdf_files_are_rejected_and_the_collection_is_intact(home: Path, tmp_path: Path,
                                                                             minilm) -> None:
    folder = tmp_path / "pdfs"
    folder.mkdir()
    pdf = write_text_pdf(folder / "good.pdf", [PAGE_1])
    coll, first = _ingest_pdf(home, folder, minilm)
    before = sorted(coll.rows(columns=["id"]).column("id").to_pylist())
    data = pdf.read_bytes()
    (folder / "truncated.pdf").write_bytes(data[: len(data) // 3])
    (folder / "garbage.pdf").write_bytes(b"%PDF-1.7\n" + bytes(range(256)) * 8)
    (folder / "empty.pdf").write_bytes(b"")
    (folder / "readme.txt").write_text("not a pdf")
    coll, report = _ingest_pdf(home, folder, minilm)
    codes = {e["input"]: e["reason_code"] for e in coll.ledger(report.run_id) if e["status"] == "rejected"}
    assert codes == {"garbage.pdf": "corrupt_pdf", "truncated.pdf": "corrupt_pdf", "empty.pdf": "empty_file",
                     "readme.txt": "not_a_pdf"}
    assert report.accepted == 0
    assert all(e["reason"] for e in coll.ledger(report.run_id) if e["status"] == "rejected")
    assert report.duplicates == first.accepted
    after = sorted(coll.rows(columns=["id"]).column("id").to_pylist())
    assert set(before) <= set(after)
    index, stamp = derived.load_for_read(coll)  # refreshed by the ingest after its commit
    assert index.ntotal == coll.count() and stamp.table_version == coll.version


def test_encrypted_pdf_is_rejected_with_a_reason(home: Path, tmp_path: Path, minilm) -> None:
    pypdf = pytest.importorskip("pypdf")
    plain = write_text_pdf(tmp_path / "plain.pdf", [PAGE_1])
    writer = pypdf.PdfWriter(clone_from=str(plain))
    writer.encrypt(user_password="s3cret", owner_password="owner", algorithm="RC4-128")
    locked = tmp_path / "locked.pdf"
    with locked.open("wb") as fh:
        writer.write(fh)
    out = list(PdfSource(locked, PdfOptions(), chunker_for(minilm, 64, 8)))
    assert len(out) == 1 and isinstance(out[0], Rejection) and out[0].reason_code == "encrypted_pdf"
    assert "decrypt" in out[0].reason


def _image_pdf(path: Path, lines: list[str] | None) -> Path:
    page = Image.new("RGB", (900, 300), "white")
    if lines:
        draw = ImageDraw.Draw(page)
        font = ImageFont.load_default(size=40)
        for i, line in enumerate(lines):
            draw.text((30, 30 + 60 * i), line, fill="black", font=font)
    page.save(path, "PDF", resolution=100)
    return path


def test_image_only_pages_are_ocred_and_marked_blank_pages_rejected(tmp_path: Path, minilm) -> None:
    pytest.importorskip("rapidocr_onnxruntime")
    scanned = _image_pdf(tmp_path / "scan.pdf", ["PNEUMONIA", "CHEST X RAY"])
    blank = _image_pdf(tmp_path / "blank.pdf", None)
    items = list(PdfSource(scanned, PdfOptions(), chunker_for(minilm, 64, 8)))
    assert all(isinstance(it, Item) for it in items) and items
    assert items[0].metadata["ocr"] == 1 and items[0].provenance["ocr"] is True
    assert "PNEUMONIA" in items[0].text.upper()
    out = list(PdfSource(blank, PdfOptions(), chunker_for(minilm, 64, 8)))
    assert len(out) == 1 and out[0].reason_code == "empty_page"
    off = list(PdfSource(scanned, PdfOptions(ocr=False), chunker_for(minilm, 64, 8)))
    assert len(off) == 1 and off[0].reason_code == "no_text"


def test_pages_mode_embeds_page_images_and_an_image_query_finds_its_page(home: Path, tmp_path: Path) -> None:
    pdf = write_text_pdf(tmp_path / "notes.pdf", [PAGE_1, PAGE_2, PAGE_1[:3]])
    encoder = load_encoder("classic")
    coll = Collection.create("pages", encoder.info.to_record(), home)
    report = ingest(PdfSource(pdf, PdfOptions(items="pages", dpi=60)), coll, encoder, QUIET)
    assert report.accepted == 3
    rows = coll.rows(columns=["id", "kind", "page", "text", "provenance"]).to_pylist()
    assert {r["kind"] for r in rows} == {"image"} and all(r["text"] for r in rows)
    import pypdfium2 as pdfium

    query = tmp_path / "page2.png"
    pdfium.PdfDocument(str(pdf))[1].render(scale=60 / 72).to_pil().save(query)
    hit = search(coll, image=query, k=1).hits[0]
    assert hit.metadata["page"] == 2 and hit.id.endswith("#p2")


@needs_shared(SHARED_DATA / "textbook" / "pdf" / "cdc_what_you_need_to_know_about_tb.pdf")
def test_real_guideline_pdf(home: Path, tmp_path: Path, minilm) -> None:
    src = SHARED_DATA / "textbook" / "pdf" / "cdc_what_you_need_to_know_about_tb.pdf"
    pdf = Path(shutil.copy(src, tmp_path / src.name))
    coll, report = _ingest_pdf(home, pdf, minilm, size=128)
    assert report.accepted >= 2 and not report.rejected
    hits = search(coll, text="tuberculosis skin test or blood test", k=3, mode="hybrid").hits
    assert hits and all(h.source.startswith(src.name + "#page=") for h in hits)


def test_cli_ingests_pdfs_and_text_folders_and_keeps_the_chunking(home: Path, tmp_path: Path, capsys) -> None:
    from caselens.cli import main

    folder = tmp_path / "pdfs"
    folder.mkdir()
    write_text_pdf(folder / "notes.pdf", [PAGE_1, PAGE_2])
    base = ["--home", str(home), "ingest", "books", "-q"]
    assert main([*base, "--pdf", str(folder), "--chunk-tokens", "64", "--chunk-overlap", "8"]) == 0
    out = capsys.readouterr().out
    assert "at most 64 tokens" in out and "accepted" in out
    coll = Collection.open("books", home)
    n = coll.count()
    assert n > 2 and coll.count("page = 2") > 0
    # a later ingest reuses the recorded chunking; a different one is refused
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "copd.md").write_text("# COPD\n\n" + "Chronic obstructive pulmonary disease limits airflow. " * 30)
    (notes / "image.png").write_bytes(b"\x89PNG")
    assert main([*base, "--text", str(notes)]) == 0
    assert "at most 64 tokens" in capsys.readouterr().out
    rows = coll.rows("document = 'COPD'", ["id", "parent_id", "text"]).to_pylist()
    assert len(rows) > 1 and all(r["id"].startswith(r["parent_id"] + "#c") for r in rows)
    assert any(e["reason_code"] == "not_text" for e in coll.ledger())
    assert main([*base, "--text", str(notes), "--chunk-tokens", "128"]) == 2
    assert "was chunked with" in capsys.readouterr().err
    assert main([*base, "--pdf", str(folder)]) == 0  # same PDF again: nothing added
    assert coll.count() == n + len(rows)


def test_clip_text_tower_searches_page_images(home: Path, tmp_path: Path) -> None:
    """Page items of a CLIP-style collection (tiny random CLIP, no download) answer text queries."""
    import json

    import torch
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    model = CLIP(**json.loads(json.dumps(cfg))).eval()
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": cfg, "preprocess_cfg": {"mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD)}}))
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    encoder = load_encoder(f"local-dir:{folder}")
    pdf = write_text_pdf(tmp_path / "notes.pdf", [PAGE_1, PAGE_2])
    coll = Collection.create("clip-pages", encoder.info.to_record(), home)
    assert ingest(PdfSource(pdf, PdfOptions(items="pages", dpi=40)), coll, encoder, QUIET).accepted == 2
    hits = search(coll, text="bone tissue", k=2).hits
    assert {h.id for h in hits} == {r for r in coll.rows(columns=["id"]).column("id").to_pylist()}
    assert all(h.kind == "image" and h.text for h in hits)
