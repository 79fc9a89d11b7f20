"""Retrieved content as prompt context: typed citation keys, sanitising, per-source token budgets.

Citation keys name what a statement rests on and where it came from:
``[case:ID]`` for an imaging case, ``[page:DOC#p12]`` for a textbook/guideline page or a chunk of
it, ``[doc:ID]`` for a document (e.g. ``[doc:pmid:123]``). Retrieved text is data: control
sequences are stripped and anything that looks like the prompt's own delimiters is neutralised,
so a passage cannot close its block and speak as the instructions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-_]")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")
_DELIMS = re.compile(r"</?\s*(source|sources|system|instructions?)\b[^>]*>", re.IGNORECASE)
_KEY_SAFE = re.compile(r"[\[\]\s]+")


@dataclass(frozen=True)
class ContextItem:
    """One retrieved thing put before the generator."""

    key: str  # citation key, e.g. "doc:pmid:123", "page:anatomy#p12", "case:sha256:ab12…"
    kind: str  # "doc", "page" or "case"
    collection: str  # collection it came from
    id: str  # item id in that collection
    text: str  # sanitised text shown to the generator
    score: float  # retrieval score (cosine similarity or fused score)
    source: str | None = None  # file or corpus it came from
    image_path: str | None = None  # readable PNG/JPEG of a case or page for a VLM backend (rag.images)


def sanitize(text: str) -> str:
    """Text safe to place inside a source block: no escape or control sequences, no delimiters."""
    text = _ANSI.sub("", text)
    text = _CONTROL.sub(" ", text)
    text = _DELIMS.sub(lambda m: m.group(0).replace("<", "‹").replace(">", "›"), text)
    return " ".join(text.split())


def citation_key(kind: str, hit: Any) -> str:
    """The typed citation key of a search hit."""
    ident = _KEY_SAFE.sub("_", str(hit.id))
    if kind == "page":
        prov = hit.provenance or {}
        doc = _KEY_SAFE.sub("_", str(prov.get("document") or prov.get("file") or hit.source or hit.id))
        page = prov.get("page")
        return f"page:{doc}#p{page}" if page is not None else f"page:{ident}"
    return f"{kind}:{ident}"


def item_kind(hit: Any) -> str:
    """"page" for the pages of a document (page images and the text chunks of a page), "case" for
    other image items, else "doc"."""
    prov = hit.provenance or {}
    if prov.get("page") is not None:
        return "page"
    return "case" if hit.kind == "image" else "doc"


def case_text(hit: Any) -> str:
    """What a case contributes as text: its label, findings/report text and modality."""
    parts = []
    if hit.label:
        parts.append(f"Label: {hit.label}.")
    for key in ("modality", "body_part", "view_position", "finding", "findings", "impression", "notes", "report"):
        value = hit.metadata.get(key)
        if value:
            parts.append(f"{key.replace('_', ' ').capitalize()}: {value}.")
    if hit.text:
        parts.append(hit.text)
    return " ".join(parts) or "(no report)"


def within_budget(items: Sequence[ContextItem], budget_tokens: int,
                  count_tokens: Callable[[str], int]) -> tuple[list[ContextItem], list[ContextItem]]:
    """Keep items in rank order while they fit ``budget_tokens``; an item never is cut mid-text.

    Returns (kept, dropped). A lower-ranked short item may still fit after a long one is dropped.
    """
    kept, dropped, used = [], [], 0
    for item in items:
        cost = count_tokens(item.text) + 12  # the block's key and delimiters
        if used + cost <= budget_tokens:
            kept.append(item)
            used += cost
        else:
            dropped.append(item)
    return kept, dropped


def rough_tokens(text: str) -> int:
    """A tokenizer-free estimate (about 1.3 tokens a word) for generators without a tokenizer."""
    return int(len(text.split()) * 1.3) + 1
