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
