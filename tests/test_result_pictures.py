"""Search results as pictures: ``SearchResult.grid()`` (a PIL contact sheet, image/png in Jupyter)
and ``SearchResult.show()`` (self-contained HTML), on real collections."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import caselens
from caselens.errors import QueryError
from caselens.retrieval.report import grid_image

SIZE = 64


def _cell_pixels(sheet: Image.Image, column: int, size: int = SIZE) -> np.ndarray:
    """The square of cell ``column`` in a one-row sheet made by grid_image."""
    x, y = 8 + column * (size + 8), 8 + 20
    return np.asarray(sheet.crop((x, y, x + size, y + size)).convert("RGB"), dtype=np.int16)


def test_grid_shows_the_query_and_each_hit_as_its_own_picture(home: Path, image_folder: Path) -> None:
    cases = caselens.open("cases", home=home, create=True)
    cases.ingest(manifest=image_folder / "manifest.csv")
    query = image_folder / "stripes_0.png"
    hits = cases.search(query, k=4)

    sheet = hits.grid(size=SIZE, query_image=query)

    assert isinstance(sheet, Image.Image)
    assert sheet.width == 5 * (SIZE + 8) + 8  # the query and four hits in one row
    png = sheet._repr_png_()  # what Jupyter stores as image/png
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # The first hit is the query itself (cosine 1): its cell shows the same picture as the query cell.
    assert hits[0].source.startswith("path-")  # (the manifest names patients: sources are keyed path hashes)
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    query_cell, first_hit = _cell_pixels(sheet, 0), _cell_pixels(sheet, 1)
    inner = (slice(6, SIZE - 6), slice(6, SIZE - 6))  # inside the query's green frame
    assert np.abs(query_cell[inner] - first_hit[inner]).mean() < 3
    # Every hit's cell holds its own image, not the dark placeholder, and a blob differs from stripes.
    for column in range(1, 5):
        assert _cell_pixels(sheet, column).std() > 10
    blob = cases.search(image_folder / "blob_0.png", k=1)
    blob_cell = _cell_pixels(blob.grid(size=SIZE), 0)
    assert np.abs(blob_cell[inner] - first_hit[inner]).mean() > 20


def test_grid_decodes_a_dicom_query_and_keeps_placeholders_for_missing_images(home: Path, dicom_folder: Path) -> None:
    ct = caselens.open("ct", home=home, create=True)
    ct.ingest(images=dicom_folder)
    query = dicom_folder / "CT_small.dcm"
    hits = ct.search(query, k=2)

    sheet = hits.grid(size=SIZE, query_image=query, title="CT query")
    assert _cell_pixels(sheet, 0)[6:-6, 6:-6].std() > 10  # the decoded CT slice, not a blank square

    empty = grid_image([("nothing here", [(None, "missing"), (io.BytesIO(b"not an image"), "broken")])], SIZE)
    for column in range(2):
        assert _cell_pixels(empty, column).max() <= 17  # the dark placeholder square


def test_show_is_html_with_inlined_thumbnails_and_unbound_results_say_how_to_fix(home: Path, image_folder: Path) -> None:
    cases = caselens.open("cases", home=home, create=True)
    cases.ingest(manifest=image_folder / "manifest.csv")
    hits = cases.search(image_folder / "blob_1.png", k=3)

    html = hits.show(size=SIZE)._repr_html_()
    assert html.count("data:image/png;base64,") == 3
    assert "blob" in html

    from caselens.retrieval.search import SearchResult

    loose = SearchResult(hits.collection, hits.query, hits.encoder, list(hits.hits), hits.candidates, hits.milliseconds)
    with pytest.raises(QueryError, match="bind"):
        loose.grid()
