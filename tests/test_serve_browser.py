"""The case viewer in a real browser: Playwright driving Debian's Chromium against a live server.

Steps: enter the token, upload an image, see the thumbnails, apply a filter, open a case (with
the keyboard), ask for a diagnosis, ask a question and open a citation. A screenshot of each step
is kept under ``$CASELENS_SCREENSHOTS`` (else the test's tmp folder). Skips when
``/usr/bin/chromium`` is absent (``apt-get install chromium``); never downloads a browser.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="/usr/bin/chromium is absent: `apt-get install -y chromium` (Debian's "
                                       "Chromium drives the browser test; no browser is downloaded)")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python) is not installed")

from serve_support import make_tokens, shared_home, start_server  # noqa: E402

from caselens.serve import ServeConfig  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    home, folder = shared_home(tmp_path_factory)
    tokens = make_tokens(home, "-browser")
    live = start_server(ServeConfig(home=home, encoder_threads=0, collections=("cases", "kb"), generator="extractive",
                                    rate_per_second=1000, rate_burst=1000), tokens)
    yield live, folder
    live.stop()


def images_loaded(page, selector: str) -> bool:
    return page.evaluate(f"""() => [...document.querySelectorAll({selector!r})]
        .every((img) => img.complete && img.naturalWidth > 0)""")


def test_viewer_upload_filter_open_case_ask_and_citation(served, tmp_path):
    expect = sync_api.expect
    live, folder = served
    shots = Path(os.environ.get("CASELENS_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    elsewhere: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 768})
            page.set_default_timeout(30_000)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("request", lambda r: None if r.url.startswith((live.url, "blob:", "data:")) else elsewhere.append(r.url))
            page.goto(live.url + "/")

            # 1. the token, kept in sessionStorage
            page.fill("#token", live.tokens["reader"])
            page.press("#token", "Enter")
            expect(page.locator("#collection")).to_have_value("cases")
            expect(page.locator("#knowledge")).to_have_value("kb")
            assert page.evaluate("sessionStorage.getItem('caselens-token')") == live.tokens["reader"]
            page.screenshot(path=shots / "1-token.png")

            # 2. upload an image (keyboard: Enter on the drop zone opens the file chooser): a grid of
            #    thumbnails with score, label, modality, provenance
            chooser = None
            for _ in range(3):  # a loaded machine can drop the first key press before the page settles
                page.focus("#drop")
                try:
                    with page.expect_file_chooser(timeout=10_000) as opened:
                        page.keyboard.press("Enter")
                    chooser = opened.value
                    break
                except sync_api.TimeoutError:
                    continue
            assert chooser is not None, "Enter on the drop zone never opened the file chooser"
            chooser.set_files(str(folder / "blob_1.png"))
            cards = page.locator("#results .card")
            expect(cards).to_have_count(12)
            page.wait_for_function("""() => [...document.querySelectorAll('#results img.thumb')]
                .every((img) => img.complete && img.naturalWidth > 0)""")
            first = cards.first
            expect(first.locator(".label")).to_have_text("blob")
            # the manifest names patients, so sources are keyed path hashes, never the file name
            expect(first.locator(".prov")).to_contain_text(re.compile(r"path-[0-9a-f]{20}"))
            expect(first.locator(".prov")).not_to_contain_text("blob_1.png")
            expect(first.locator(".modality")).to_have_text(re.compile(r"^(CT|MR)$"))
            assert float(first.locator(".score").inner_text()) > 0.99
            page.screenshot(path=shots / "2-results.png")

            # 3. a filter: only stripes
            page.select_option("#filter-label", "stripes")
            expect(cards.first.locator(".label")).to_have_text("stripes")
            labels = page.locator("#results .card .label").all_inner_texts()
            assert labels and set(labels) == {"stripes"}
            page.wait_for_function("""() => [...document.querySelectorAll('#results img.thumb')]
                .every((img) => img.complete && img.naturalWidth > 0)""")
            page.screenshot(path=shots / "3-filtered.png")

            # 4. open a case with the keyboard; Escape closes it and focus returns to the card
            page.locator(".card-button").first.focus()
            page.keyboard.press("Enter")
            viewer = page.locator("#viewer")
            expect(viewer).to_be_visible()
            expect(page.locator("#viewer-image")).to_be_visible()
            page.wait_for_function("() => document.querySelector('#viewer-image').naturalWidth > 0")
            expect(page.locator("#viewer-meta")).to_contain_text("stripes")
            expect(page.locator("#viewer-meta")).to_contain_text("provenance.sha256")
            page.screenshot(path=shots / "4-case.png")
            page.keyboard.press("Escape")
            expect(viewer).to_be_hidden()
            assert page.evaluate("document.activeElement.classList.contains('card-button')")

            # 5. diagnosis of the query image
            page.select_option("#filter-label", "")
            page.click("#diagnose")
            expect(page.locator("#diagnosis-body .probs li").first).to_contain_text("blob")
            expect(page.locator("#diagnosis-body .supporting li").first).to_be_visible()

            # 6. a question; its citations are links that open the cited case or passage
            page.fill("#question", "What does a round bright region with a soft edge represent?")
            page.click("#ask")
            citations = page.locator("#answer .sources .citation")
            expect(citations.first).to_be_visible()
            page.screenshot(path=shots / "5-answer.png", full_page=True)
            keys = citations.all_inner_texts()
            assert any(k.startswith("[case:") for k in keys) and "[doc:blob-note]" in keys
            page.locator("#answer .sources .citation", has_text="[doc:blob-note]").click()
            expect(viewer).to_be_visible()
            expect(page.locator("#viewer-text")).to_contain_text("round bright region")
            page.screenshot(path=shots / "6-citation-passage.png")
            page.keyboard.press("Escape")
            page.locator("#answer .sources .citation", has_text="[case:").first.click()
            expect(viewer).to_be_visible()
            page.wait_for_function("() => document.querySelector('#viewer-image').naturalWidth > 0")
            page.screenshot(path=shots / "7-citation-case.png")
        finally:
            browser.close()
    assert not problems, problems
    assert not elsewhere, f"the page requested other origins: {elsewhere}"
    assert len(list(shots.glob("*.png"))) >= 7
