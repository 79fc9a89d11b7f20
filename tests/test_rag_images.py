"""Images of retrieved cases and pages reach a vision-language generator: found again under the
input roots ingest recorded (sources stay relative), checked against the item's content hash,
DICOM decoded and PDF pages rendered into the collection's cache, sent as data URLs."""

from __future__ import annotations

import base64
import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caselens.indexes.collection import Collection
from caselens.ingest.inputs import read_runs
from caselens.ingest.pipeline import IngestConfig, ingest
from caselens.ingest.sources import ImageSource, PdfOptions, PdfSource
from caselens.ingest.sources.dicom import DicomOptions, decode_frames, read_dicom
from caselens.ingest.sources.dicom_source import DicomSource, DicomSourceConfig
from caselens.ingest.encoders import load_encoder
from caselens.retrieval.rag import AskConfig, ask, retrieve_context
from caselens.retrieval.images import cache_dir, item_images
from caselens.retrieval.search import search

from conftest import make_images

KEY = bytes(range(32))  # a pseudonym key (collections make their own)

QUIET = IngestConfig(progress=False)
OPEN = AskConfig(min_score=-1.0, require_citations=False)  # no knowledge passages: the generator still runs


@pytest.fixture(scope="module")
def classic():
    return load_encoder("classic")


def pixels(path: str | Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


class Seeing:
    """A generator that sees images (``takes_images``) and keeps the request it was given."""

    name = "seeing"
    takes_images = True

    def __init__(self) -> None:
        self.request = None

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def generate(self, request) -> str:
        self.request = request
        return "Similar case [case:x]."


def _cases(home: Path, folder: Path, classic, name: str = "cases", **kwargs) -> Collection:
    coll = Collection.create(name, classic.info.to_record(), home)
    ingest(ImageSource(folder, secret=coll.secret(), **kwargs), coll, classic, QUIET)
    return coll


def test_case_images_of_a_relative_image_folder_reach_the_generator(home: Path, tmp_path: Path, classic) -> None:
    folder = make_images(tmp_path / "ward_7" / "images", n_per_class=3)
    cases = _cases(home, folder, classic)
    # the root is in the collection's local inputs file, never in the items table
    runs = read_runs(cases.root)
    assert [r["kind"] for r in runs.values()] == ["images"] and list(runs.values())[0]["root"] == str(folder)
    rows = cases.rows(columns=["id", "source", "provenance"]).to_pylist()
    assert rows and not any(str(tmp_path) in json.dumps(r) for r in rows)
    assert all(not Path(r["source"]).is_absolute() for r in rows)

    gen = Seeing()
    answer = ask([], "What is shown?", generator=gen, cases=cases, image=folder / "blob_1.png", config=OPEN)
    seen = [it for it in gen.request.items if it.kind == "case"]
    assert len(seen) == 3
    for item in seen:
        assert item.image_path and Path(item.image_path).is_file()
        assert np.array_equal(pixels(item.image_path), pixels(folder / item.source))
    assert "blob_1.png" not in [it.source for it in seen]  # the query itself is never a similar case
    # the answer says an image was shown, without the local path
    assert all(c["image"] is True and "image_path" not in c for c in answer.context)
    assert str(tmp_path) not in answer.to_json()
    # a generator without eyes: no image work at all
    text_only = ask([], "What is shown?", generator="extractive", cases=cases, image=folder / "blob_1.png", config=OPEN)
    assert not any(c["image"] for c in text_only.context)
    # the library's retrieve_context resolves them too
    items = retrieve_context("What is shown?", [], cases, folder / "stripes_0.png", AskConfig(k_cases=2))
    assert all(it.image_path and Path(it.image_path).is_file() for it in items)


def test_changed_or_missing_file_gives_no_image(home: Path, tmp_path: Path, classic,
                                                caplog: pytest.LogCaptureFixture) -> None:
    folder = make_images(tmp_path / "images", n_per_class=2)
    cases = _cases(home, folder, classic)
    changed = folder / "stripes_1.png"
    Image.fromarray(np.zeros((48, 48), np.uint8), "L").save(changed)  # edited after ingest
    (folder / "blob_0.png").unlink()  # moved away after ingest
    hits = search(cases, image=folder / "blob_1.png", k=4).hits
    by_source = {h.source: h for h in hits}
    with caplog.at_level(logging.DEBUG, logger="caselens.retrieval.images"):
        paths = dict(zip([h.source for h in hits], item_images(cases, hits)))
    assert paths["stripes_1.png"] is None and paths["blob_0.png"] is None
    assert paths["blob_1.png"] == str(folder / "blob_1.png") and paths["stripes_0.png"] == str(folder / "stripes_0.png")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and by_source["stripes_1.png"].id in warned[0] and str(folder) not in warned[0]
    # through ask: no exception, the changed case simply has no image
    gen = Seeing()
    ask([], "What is shown?", generator=gen, cases=cases, image=folder / "blob_1.png",
        config=AskConfig(k_cases=4, min_score=-1.0, require_citations=False))
    assert {it.source: it.image_path for it in gen.request.items}["stripes_1.png"] is None

    # a collection ingested without recording its root: no image, no error
    other = Collection.create("noroot", classic.info.to_record(), home)
    ingest(ImageSource(folder, secret=other.secret()), other, classic,
           IngestConfig(progress=False, record_inputs=False))
    assert read_runs(other.root) == {}  # its path setting is kept there, but no input root
    assert item_images(other, search(other, image=folder / "blob_1.png", k=2).hits) == [None, None]


def test_dicom_cases_resolve_to_cached_pngs(home: Path, tmp_path: Path, classic) -> None:
    from pydicom.data import get_testdata_file

    export = tmp_path / "export" / "study1"
    export.mkdir(parents=True)
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(get_testdata_file(name), export / name)
    ct = export / "CT_small.dcm"
    # an image folder holding DICOM files, and a PACS export read by DicomSource (instance items)
    folder_cases = _cases(home, export, classic, name="dcm_folder", dicom_options=DicomOptions(window="percentile"))
    export_cases = Collection.create("dcm_export", classic.info.to_record(), home)
    ingest(DicomSource(export.parent, export_cases.secret()), export_cases, classic, QUIET)
    assert read_runs(export_cases.root)[next(iter(read_runs(export_cases.root)))]["root"] == str(export.parent)
    for cases, window in ((folder_cases, "percentile"), (export_cases, "auto")):
        gen = Seeing()
        # asked with the MR: the query itself is never a similar case, so the CT is the top case
        ask([], "What does this show?", generator=gen, cases=cases, image=export / "MR_small.dcm", config=OPEN)
        top = gen.request.items[0]
        # a PACS export stores keyed hashes of its paths by default; the image is found all the same
        named = top.source.endswith("CT_small.dcm") if cases is folder_cases else top.source.startswith("path-")
        assert top.kind == "case" and named
        assert not any(it.source.endswith("MR_small.dcm") for it in gen.request.items)
        cached = Path(top.image_path)
        assert cached.parent == cache_dir(cases) and cached.suffix == ".png"
        expected = read_dicom(ct, KEY, DicomOptions(window=window))[0]  # the collection's own window
        assert np.array_equal(pixels(cached), np.asarray(expected))
    # reused next time, without the export
    shutil.rmtree(tmp_path / "export")
    hits = search(export_cases, image=cached, k=2).hits
    assert str(cached) in item_images(export_cases, hits)


def test_dicom_series_item_shows_a_sampled_slice(home: Path, tmp_path: Path, classic, dicom_files) -> None:
    export = tmp_path / "export"
    export.mkdir()
    shutil.copy(dicom_files[-1], export / "dose.dcm")  # a multi-frame RT dose: one series of frames
    coll = Collection.create("series", classic.info.to_record(), home)
    source = DicomSource(export, coll.secret(), DicomSourceConfig(unit="series", slices=3))
    assert ingest(source, coll, classic, QUIET).accepted == 1
    query = tmp_path / "slice.png"
    decode_frames(export / "dose.dcm", KEY, DicomOptions(), "middle")[0][0].save(query)
    hit = search(coll, image=query, k=1).hits[0]
    assert hit.provenance["unit"] == "series" and len(hit.provenance["chosen"][0]["frames"]) == 3
    path = item_images(coll, [hit])[0]
    assert path and Path(path).parent == cache_dir(coll)
    frames = hit.provenance["chosen"][0]["frames"]
    images, _, _ = decode_frames(export / "dose.dcm", KEY, DicomOptions(), [frames[len(frames) // 2]])
    assert np.array_equal(pixels(path), np.asarray(images[0]))
    # a member file changed: the series id no longer matches, no image
    shutil.rmtree(cache_dir(coll))
    with open(export / "dose.dcm", "ab") as fh:
        fh.write(b"\0\0")
    assert item_images(coll, [hit]) == [None]


def test_pdf_pages_and_chunk_pages_are_rendered(home: Path, tmp_path: Path, classic, minilm) -> None:
    import pypdfium2 as pdfium

    from caselens.ingest.chunking import chunker_for
    from test_pdf import PAGE_1, PAGE_2, write_text_pdf

    books = tmp_path / "books"
    books.mkdir()
    pdf = write_text_pdf(books / "notes.pdf", [PAGE_1, PAGE_2])
    pages = Collection.create("pages", classic.info.to_record(), home)
    ingest(PdfSource(books, PdfOptions(items="pages", dpi=40)), pages, classic, QUIET)
    query = tmp_path / "p2.png"
    pdfium.PdfDocument(str(pdf))[1].render(scale=40 / 72).to_pil().convert("RGB").save(query)
    hits = search(pages, image=query, k=2).hits
    paths = item_images(pages, hits)
    assert all(p and Path(p).parent == cache_dir(pages) for p in paths)
    page2 = paths[[h.metadata["page"] for h in hits].index(2)]
    assert np.array_equal(pixels(page2), pixels(query))

    kb = Collection.create("book", minilm.info.to_record(), home)
    ingest(PdfSource(books, PdfOptions(dpi=50), chunker_for(minilm, 48, 8)), kb, minilm, QUIET)
    gen = Seeing()
    ask(kb, "What do osteoblasts build?", generator=gen, config=AskConfig(k=4, min_score=-1.0,
                                                                         require_citations=False))
    shown = [it for it in gen.request.items if it.image_path]
    assert shown and all(it.kind == "page" for it in gen.request.items)
    assert len({it.image_path for it in shown}) == len(shown)  # one image per page, on its best chunk
    number = int(shown[0].key.rsplit("#p", 1)[1])
    rendered = pdfium.PdfDocument(str(pdf))[number - 1].render(scale=50 / 72).to_pil().convert("RGB")
    assert np.array_equal(pixels(shown[0].image_path), np.asarray(rendered))
    # text-only generators leave the pages unrendered
    shutil.rmtree(cache_dir(kb))
    ask(kb, "What do osteoblasts build?", generator="extractive", config=AskConfig(k=4, min_score=-1.0))
    assert not cache_dir(kb).exists()


def test_openai_endpoint_receives_the_case_image_as_a_data_url(home: Path, tmp_path: Path, classic,
                                                               chat_server) -> None:

    from caselens.retrieval.rag.generators import OpenAIChatGenerator

    folder = make_images(tmp_path / "images", n_per_class=2)
    cases = _cases(home, folder, classic)
    chat_server.reply = "Stripes."
    gen = OpenAIChatGenerator(chat_server.url, model="tiny-vlm")
    answer = ask([], "What is shown?", generator=gen, cases=cases, image=folder / "stripes_1.png",
                 config=AskConfig(k_cases=1, min_score=-1.0, require_citations=False))
    seen = [r["body"] for r in chat_server.seen]
    assert answer.answer == "Stripes."
    content = seen[0]["messages"][-1]["content"]
    labels = [c["text"] for c in content if c["type"] == "text"]
    urls = [c["image_url"]["url"] for c in content if c["type"] == "image_url"]
    assert len(urls) == 1 and urls[0].startswith("data:image/png;base64,")
    assert f"Image of [{answer.context[0]['key']}]:" in labels
    sent = Image.open(io.BytesIO(base64.b64decode(urls[0].split(",", 1)[1])))
    assert np.array_equal(np.asarray(sent), pixels(folder / answer.context[0]["source"]))  # the top similar case
    assert str(tmp_path) not in json.dumps(seen[0])  # the endpoint gets pixels, not local paths
