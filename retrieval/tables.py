"""Terminal tables of results (rich), shared by the command line and the demo."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def short_id(item_id: str, hex_chars: int = 10) -> str:
    """A short form of an item id for tables and captions (``sha256:3f2a9c…``); full ids stay in JSON."""
    scheme, sep, rest = str(item_id).partition(":")
    if sep and scheme == "sha256" and len(rest) > hex_chars:
        return f"{scheme}:{rest[:hex_chars]}…"
    return item_id if len(item_id) <= 40 else item_id[:39] + "…"


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], wrap: Sequence[str] = ()) -> Any:
    """A rich table; columns in ``wrap`` fold long values onto more lines, the others keep their
    values whole (short ones) or cut them with an ellipsis (long ones: ids, paths)."""
    from rich.table import Table

    out = Table(title=title, title_justify="left")
    widths = [max([len(str(col)), *(len("" if r[i] is None else str(r[i])) for r in rows)]) for i, col in enumerate(columns)]
    for col, width in zip(columns, widths):
        if col in wrap:
            out.add_column(col, overflow="fold", ratio=2)
        elif width <= 12:  # numbers, short codes: never squeezed away
            out.add_column(col, no_wrap=True, min_width=width)
        else:
            out.add_column(col, overflow="ellipsis", no_wrap=True, ratio=1)
    for row in rows:
        out.add_row(*["" if v is None else str(v) for v in row])
    return out


def hits_table(result: Any) -> Any:
    """A table of search hits: short ids, what the score is, sources cut rather than wrapped."""
    show_modality = any(h.metadata.get("modality") for h in result.hits)
    show_label = any(h.label is not None or h.text for h in result.hits)
    columns = ["rank", {"dense": "cosine", "bm25": "BM25", "hybrid": "RRF"}.get(result.mode, "score"), "id",
               *(["label"] if show_label else []), *(["modality"] if show_modality else []), "source"]
    rows = []
    for h in result.hits:
        row = [h.rank, f"{h.score:.4f}", short_id(h.id)]
        if show_label:
            row.append(h.label if h.label is not None else " ".join((h.text or "").split())[:60])
        if show_modality:
            row.append(h.metadata.get("modality"))
        source = str(h.source or "")
        rows.append([*row, source if len(source) <= 48 else "…" + source[-47:]])
    return table(f"{result.collection}: {result.query} — {len(result.hits)} of {result.candidates} candidates, "
                 f"{result.milliseconds:.0f} ms, table v{result.table_version}; score: {result.score_meaning}",
                 columns, rows, wrap=("label",))


