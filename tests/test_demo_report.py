"""The demo's report: the whole demo run once (as `make demo` runs it, on data that comes with pip),
then its HTML parsed (every image inlined and decodable, every citation a link to a source shown
on the page, the sections a newcomer should see) and opened in headless Chromium (every image
drawn, a citation link landing on its passage). The browser part skips when ``/usr/bin/chromium``
is absent."""

from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from caselens.demo import run_demo

CHROMIUM = Path("/usr/bin/chromium")


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.ids: set[str] = set()
        self.headings: list[str] = []
        self._in_h2 = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "img":
            self.images.append(a.get("src") or "")
        elif tag == "a" and a.get("href"):
            self.links.append(a["href"])
        elif tag == "h2":
            self._in_h2 = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "h2":
            self._in_h2 = False

    def handle_data(self, data: str) -> None:
        if self._in_h2 and data.strip():
            self.headings.append(data.strip())


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("demo") / "home"
    assert run_demo(home) == 0
    return home / "demo-report" / "index.html"


def test_the_report_holds_inlined_images_sections_and_linked_citations(report: Path) -> None:
    text = report.read_text()
    page = _Page()
    page.feed(text)
    assert page.headings[:4] == ["Similar cases", "Diagnosis by similar cases", "A grounded answer", "What ran"]
    assert "http://" not in text and "https://" not in text.replace("https://www.w3.org", "")  # no network
    assert len(page.images) >= 14  # the grid, the query, six cases, the supporting cases
    for src in page.images:
        assert src.startswith("data:image/png;base64,"), src[:60]
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()  # each one a real PNG
    grid = report.parent / "grid.png"
    assert grid.is_file() and Image.open(grid).size[0] > 600
    citations = [h for h in page.links if h.startswith("#src-")]
    assert citations, "the grounded answer cites nothing"
    assert all(h[1:] in page.ids for h in citations)  # every citation lands on a source listed on the page
    answer = text[text.index("A grounded answer"):]
    keys = set(re.findall(r'<a href="#src-[^"]+">\[([^\]]+)\]</a>', answer))
    assert keys and all(f"<code>[{k}]</code>" in answer for k in keys)
    assert "same-patient" in text and "--exclude-same patient_id" in text
    diagnosis = text[text.index("Diagnosis by similar cases"):text.index("A grounded answer")]
    assert "cl-bars" in diagnosis and "Supporting cases" in diagnosis and "vote" in diagnosis


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is absent: `apt-get install -y chromium`")
def test_the_report_in_a_browser_draws_every_image_and_citations_open_their_passage(report: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python) is not installed")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM),
                                    args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.route("**/*", lambda route: route.abort() if not route.request.url.startswith(("file:", "data:"))
                       else route.continue_())  # nothing may come from the network
            page.goto(report.as_uri())
            widths = page.eval_on_selector_all("img", "els => els.map(e => e.complete ? e.naturalWidth : 0)")
            assert widths and all(w > 0 for w in widths)
            link = page.locator('a[href^="#src-"]').first
            target = link.get_attribute("href")
            link.click()
            assert page.evaluate("location.hash") == target
            assert page.locator(f"{target}:target").count() == 1  # the cited passage is the one highlighted
            page.screenshot(path=str(report.parent / "report-browser.png"), full_page=False)
        finally:
            browser.close()
