"""Pictures of results: thumbnails and self-contained HTML (images inlined, no network).

Used by ``SearchResult.show()`` in notebooks and by the demo report; the HTTP service serves the
same thumbnails. Images come from :mod:`caselens.retrieval.images` (the item's own file, checked
against its content hash, or the collection's cached rendering); an item without one gets a
placeholder, never an error.
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from caselens.files import atomic_write_bytes
from caselens.retrieval.images import item_images
from caselens.retrieval.tables import short_id

THUMBNAIL_PX = 192


def thumbnail_png(path: str | Path, size: int = THUMBNAIL_PX) -> bytes:
    """A PNG of the image at ``path`` fitted into ``size`` x ``size`` pixels."""
    with Image.open(path) as im:
        im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale
        image = im.convert("RGB") if im.mode not in ("L", "RGB") else im.copy()
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def data_url(png: bytes) -> str:
    """``png`` as a data: URL (inlined in HTML: no file, no network)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


_STYLE = """
.cl-grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(%(px)dpx,1fr));gap:12px;font-family:system-ui,sans-serif;font-size:13px}
.cl-card{border:1px solid #ccd;border-radius:6px;padding:6px;background:#fff;color:#111}
.cl-card img,.cl-none{width:100%%;aspect-ratio:1;object-fit:contain;background:#111;border-radius:4px;display:block}
.cl-none{display:flex;align-items:center;justify-content:center;color:#bbb}
.cl-meta{margin-top:4px;line-height:1.35;overflow-wrap:anywhere}
.cl-score{font-weight:600}.cl-query{outline:3px solid #2a6}
.cl-label{display:inline-block;padding:0 5px;border-radius:3px;background:#e8eefc}
"""


def _card(image: str | None, lines: Sequence[str], extra_class: str = "") -> str:
    picture = f'<img src="{image}" alt="">' if image else '<div class="cl-none">no image</div>'
    return f'<figure class="cl-card {extra_class}">{picture}<figcaption class="cl-meta">{"<br>".join(lines)}</figcaption></figure>'


def hit_lines(hit: Any, score_meaning: str = "cosine") -> list[str]:
    """Caption lines of one hit (escaped HTML): rank and score, label, modality, short id, source."""
    esc = html.escape
    lines = [f'<span class="cl-score">#{hit.rank} · {esc(score_meaning)} {hit.score:.3f}</span>']
    if hit.label:
        lines.append(f'<span class="cl-label">{esc(str(hit.label))}</span>')
    modality = hit.metadata.get("modality")
    if modality:
        lines.append(esc(str(modality)))
    lines.append(f"<code>{esc(short_id(hit.id))}</code>")
    if hit.source:
        lines.append(f'<small>{esc(str(hit.source)[-60:])}</small>')
    return lines


def hits_html(result: Any, collection: Any, size: int = THUMBNAIL_PX, query_image: str | Path | None = None) -> str:
    """A self-contained HTML grid of ``result``'s hits (thumbnails inlined), with the query first
    when ``query_image`` is given."""
    paths = item_images(collection, result.hits)
    cards = []
    if query_image is not None:
        cards.append(_card(_inline(query_image, size), ["<b>query</b>"], "cl-query"))
    meaning = "cosine" if result.mode == "dense" else result.mode
    for hit, path in zip(result.hits, paths):
        cards.append(_card(_inline(path, size) if path else None, hit_lines(hit, meaning)))
    head = html.escape(f"{result.collection}: {result.query} — {len(result.hits)} hits of {result.candidates} "
                       f"candidates ({result.milliseconds:.0f} ms)")
    return (f"<style>{_STYLE % {'px': size}}</style><div><p>{head}</p>"
            f'<div class="cl-grid">{"".join(cards)}</div></div>')


def _inline(path: str | Path | None, size: int) -> str | None:
    if path is None:
        return None
    try:
        return data_url(thumbnail_png(path, size))
    except (OSError, ValueError):
        return None


class HtmlView:
    """HTML shown inline by Jupyter (``_repr_html_``) and written with :meth:`save`."""

    def __init__(self, body: str, title: str = "caselens"):
        self.body = body
        self.title = title

    def _repr_html_(self) -> str:
        return self.body

    def page(self) -> str:
        """A whole HTML page around the body."""
        return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(self.title)}"
                f"</title></head><body>{self.body}</body></html>")

    def save(self, path: str | Path) -> Path:
        """Write :meth:`page` to ``path`` (atomically) and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, self.page().encode("utf-8"))
        return path


# ------------------------------------------------------------------------------------ whole reports
_PAGE_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:24px auto;padding:0 16px;color:#111;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #dde}
.cl-note{color:#444;font-size:.95em}.cl-bars{display:grid;grid-template-columns:max-content 1fr max-content;gap:4px 10px;align-items:center}
.cl-bar{height:14px;background:#3a6fd8;border-radius:3px}.cl-answer{background:#f4f7ff;border-left:4px solid #3a6fd8;padding:10px 14px}
.cl-sources li{margin:6px 0}.cl-sources li:target{background:#fff6cc}code{font-size:.9em}
"""


def hit_cells(hits: Sequence[Any], paths: Sequence[str | None]) -> list[tuple[str | None, str]]:
    """(image path, caption) of each hit for :func:`grid_png`: rank, score and label (or modality)."""
    return [(p, f"#{h.rank} {h.score:.3f} {h.label or h.metadata.get('modality') or ''}".strip())
            for h, p in zip(hits, paths)]


def grid_png(rows: Sequence[tuple[str, Sequence[tuple[str | Path | None, str]]]], out: str | Path,
             size: int = 150) -> Path:
    """A PNG contact sheet, one row per (title, cells); each cell an image (fitted to ``size``,
    small images enlarged) with a caption; a cell captioned "query" is framed green. Written
    atomically to ``out``."""
    from PIL import ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    cols = max(len(cells) for _, cells in rows)
    row_h = 24 + size + 24
    sheet = Image.new("RGB", (cols * (size + 8) + 8, len(rows) * row_h + 8), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (title, cells) in enumerate(rows):
        y0 = 8 + r * row_h
        draw.text((8, y0), title, fill=(17, 17, 17), font=font)
        for c, (path, caption) in enumerate(cells):
            x, y = 8 + c * (size + 8), y0 + 20
            draw.rectangle([x, y, x + size - 1, y + size - 1], fill=(17, 17, 17))
            if path is not None:
                try:
                    with Image.open(path) as im:
                        im.draft("RGB", (size, size))
                        thumb = im.convert("RGB")
                    scale = min(size / thumb.width, size / thumb.height)
                    thumb = thumb.resize((max(1, round(thumb.width * scale)), max(1, round(thumb.height * scale))))
                    sheet.paste(thumb, (x + (size - thumb.width) // 2, y + (size - thumb.height) // 2))
                except (OSError, ValueError):
                    pass
            if caption == "query":
                draw.rectangle([x, y, x + size - 1, y + size - 1], outline=(34, 170, 102), width=4)
            draw.text((x, y + size + 4), caption[:24], fill=(17, 17, 17), font=font)
    buffer = io.BytesIO()
    sheet.save(buffer, "PNG", optimize=True)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buffer.getvalue())
    return out


def anchor(key: str) -> str:
    """The HTML id of a cited source (``doc:HP:0002090`` -> ``src-doc-HP-0002090``)."""
    return "src-" + "".join(c if c.isalnum() else "-" for c in key)


_CITATION = re.compile(r"\[([^\[\]\s]+:[^\[\]\s]+)\]")


def answer_html(answer: Any) -> str:
    """An answer with its citation keys as links to the sources listed under it (each an anchor)."""
    esc = html.escape
    known = {c["key"] for c in answer.context}
    pieces, last = [], 0
    for match in _CITATION.finditer(answer.answer):
        key = match.group(1)
        pieces.append(esc(answer.answer[last:match.start()]))
        pieces.append(f'<a href="#{anchor(key)}">[{esc(key)}]</a>' if key in known else esc(match.group(0)))
        last = match.end()
    pieces.append(esc(answer.answer[last:]))
    sources = "".join(f'<li id="{anchor(c["key"])}"><code>[{esc(c["key"])}]</code> '
                      f'<small>({esc(c["collection"])}, score {c["score"]:.3f})</small> {esc(" ".join(c["text"].split()))}</li>'
                      for c in answer.context)
    return (f'<p class="cl-note">Question: <b>{esc(answer.question)}</b> — generator: {esc(answer.generator)}</p>'
            f'<div class="cl-answer">{"".join(pieces)}</div><h3>Sources</h3><ol class="cl-sources">{sources}</ol>')


def probabilities_html(probabilities: Sequence[tuple[str, float]]) -> str:
    """Label probabilities as horizontal bars."""
    rows = "".join(f'<span>{html.escape(str(label))}</span><div class="cl-bar" style="width:{max(1.0, p * 100):.1f}%"></div>'
                   f"<span>{p:.2f}</span>" for label, p in probabilities)
    return f'<div class="cl-bars">{rows}</div>'


def page(title: str, sections: Sequence[tuple[str, str]], intro: str = "") -> str:
    """A whole self-contained HTML page: ``sections`` are (heading, HTML body) pairs."""
    body = "".join(f"<section><h2>{html.escape(h)}</h2>{b}</section>" for h, b in sections)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width, initial-scale=1"><title>{html.escape(title)}</title>'
            f"<style>{_PAGE_STYLE}{_STYLE % {'px': THUMBNAIL_PX}}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>{intro}{body}</body></html>")
