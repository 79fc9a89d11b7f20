"""Split texts into chunks measured by the encoder's own tokenizer.

A chunk never holds more tokens than the limit, counted by the same tokenizer the encoder uses
(special tokens included), so nothing is truncated when it is embedded. Chunks are built from
sentences (and figure-caption lines, which are kept whole); a sentence longer than the limit is
split at line breaks (lists, tables), a line longer than the limit at word boundaries (a word
longer than the limit at characters), and the chunks holding such pieces are flagged ``cut``. Consecutive chunks of one text share about ``overlap`` tokens, starting
at a word boundary. Every character of the text outside whitespace lies in at least one chunk.

Texts that fit the limit are returned whole as one chunk; callers keep their original id for
those, so short texts are stored exactly as before.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

from caselens.errors import ConfigError

if TYPE_CHECKING:
    from caselens.ingest.items import Item

__all__ = ["Chunk", "ChunkConfig", "Chunker", "ChunkingError", "TokenCounter", "chunk_text", "chunker_for",
           "chunk_item", "figure_labels", "stored_chunking"]

TokenCounter = Callable[[str], int]  # tokens a text becomes, special tokens included

# A sentence ends at . ! ? (optionally followed by closing quotes/brackets) before whitespace and
# an upper-case letter, digit or opening bracket; paragraph breaks and caption lines end one too.
_SENTENCE_END = re.compile(r"""[.!?]["')\]]*\s+(?=["'(\[]?[A-Z0-9])|\n[ \t]*\n\s*""")
_CAPTION_LINE = re.compile(r"^[ \t]*(?:Figure|Fig\.|Table)\s+\d+(?:[.\-]\d+)*\b[^\n]*$", re.MULTILINE)
_WORD = re.compile(r"\S+")


class ChunkingError(ConfigError):
    """A chunking setting that cannot work with this tokenizer (e.g. overlap not below the size)."""


class _HasTokenizer(Protocol):
    def max_tokens(self) -> int | None: ...

    def count_tokens(self, text: str) -> int | None: ...


@dataclass(frozen=True)
class ChunkConfig:
    """How texts are split; stored with every chunked item (provenance ``chunking``)."""

    max_tokens: int  # most tokens in one chunk, counted by the encoder's tokenizer with special tokens
    overlap: int = 32  # tokens (about) repeated from the end of one chunk at the start of the next

    def to_record(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Chunk:
    """One piece of a text."""

    index: int  # 0-based position among the text's chunks
    text: str  # the piece (a slice of the source text)
    start: int  # character offset of the piece in the source text
    end: int  # character offset just after the piece
    tokens: int  # tokens the encoder sees for ``text`` (special tokens included)
    cut: bool  # a sentence longer than the limit had to be split inside this chunk


@dataclass(frozen=True)
class _Unit:
    start: int
    end: int
    tokens: int  # content tokens (no special tokens)
    cut: bool


class Chunker:
    """Splits texts with a tokenizer's token counter; see :func:`chunk_text`."""

    def __init__(self, count_tokens: TokenCounter, config: ChunkConfig):
        specials = count_tokens("")
        budget = config.max_tokens - specials
        if budget < 8:
            raise ChunkingError(f"chunk size {config.max_tokens} leaves {budget} tokens after the tokenizer's "
                                f"{specials} special tokens; use a chunk size of at least {specials + 8}")
        if not 0 <= config.overlap <= budget // 2:
            raise ChunkingError(f"chunk overlap {config.overlap} must be between 0 and half the chunk's "
                                f"content tokens ({budget // 2} for size {config.max_tokens})")
        self.count_tokens = count_tokens
        self.config = config
        self.specials = specials
        self.budget = budget

    def _content(self, text: str) -> int:
        return self.count_tokens(text) - self.specials

    def __call__(self, text: str) -> list[Chunk]:
        return self.split(text)

    def split(self, text: str) -> list[Chunk]:
        """Chunks of ``text`` in order; ``[]`` for a text with nothing but whitespace."""
        stripped = text.strip()
        if not stripped:
            return []
        lead = len(text) - len(text.lstrip())
        whole = self.count_tokens(stripped)
        if whole <= self.config.max_tokens:
            return [Chunk(0, stripped, lead, lead + len(stripped), whole, False)]
        units = self._units(text)
        chunks: list[Chunk] = []
        i, cs, prefix = 0, units[0].start, 0  # next unit, chunk start, content tokens before unit i
        while i < len(units):
            j, est = i, prefix
            while j < len(units) and est + units[j].tokens <= self.budget:
                est += units[j].tokens
                j += 1
            if j == i:  # the overlap leaves no room for the next unit: start fresh at it
                cs, prefix = units[i].start, 0
                continue
            # Token counts of pieces do not always add up exactly; check the real text.
            while j - 1 > i and self.count_tokens(text[cs:units[j - 1].end]) > self.config.max_tokens:
                j -= 1
            ce = units[j - 1].end
            n = self.count_tokens(text[cs:ce])
            if n > self.config.max_tokens:  # a lone unit after an overlap: drop the overlap
                cs, prefix = units[i].start, 0
                continue
            cut = any(u.cut for u in units[i:j])
            chunks.append(Chunk(len(chunks), text[cs:ce], cs, ce, n, cut))
            i = j
            if i < len(units):
                cs = self._overlap_start(text, units[i].start, ce, max(units[0].start, cs))
                prefix = self._content(text[cs:ce]) if cs < units[i].start else 0
                if cs >= units[i].start:
                    cs = units[i].start
        return chunks

    # ------------------------------------------------------------------ units
    def _units(self, text: str) -> list[_Unit]:
        """Sentences (caption lines kept whole), each split further when it exceeds the budget."""
        bounds = {0, len(text)}
        for m in _SENTENCE_END.finditer(text):
            bounds.add(m.end())
        for m in _CAPTION_LINE.finditer(text):
            bounds.update((m.start(), m.end()))
        edges = sorted(bounds)
        units: list[_Unit] = []
        for a, b in zip(edges, edges[1:]):
            seg = text[a:b]
            if not seg.strip():
                continue
            s = a + len(seg) - len(seg.lstrip())
            e = b - (len(seg) - len(seg.rstrip()))
            n = self._content(text[s:e])
            if n <= self.budget:
                units.append(_Unit(s, e, n, False))
                continue
            # Too long for one chunk: lines first (lists, tables, glossaries), then words.
            for m in re.finditer(r"[^\n]*\S[^\n]*", text[s:e]):
                ls = s + m.start() + (len(m.group()) - len(m.group().lstrip()))
                le = s + m.end() - (len(m.group()) - len(m.group().rstrip()))
                n = self._content(text[ls:le])
                if n <= self.budget - self.config.overlap:
                    units.append(_Unit(ls, le, n, False))
                else:
                    units.extend(self._split_long(text, ls, le))
        return units

    def _split_long(self, text: str, s: int, e: int) -> list[_Unit]:
        """Pieces of ``text[s:e]`` that fit the budget: at word boundaries, words at characters."""
        words = [(s + m.start(), s + m.end()) for m in _WORD.finditer(text[s:e])]
        budget = self.budget - self.config.overlap  # room for the overlap carried into the next chunk
        out: list[_Unit] = []
        w = 0
        while w < len(words):
            ws = words[w][0]
            lo, hi = w, len(words) - 1  # the most words from w that fit
            if self._content(text[ws:words[w][1]]) > budget:
                out.extend(self._split_chars(text, ws, words[w][1], budget))
                w += 1
                continue
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self._content(text[ws:words[mid][1]]) <= budget:
                    lo = mid
                else:
                    hi = mid - 1
            out.append(_Unit(ws, words[lo][1], self._content(text[ws:words[lo][1]]), True))
            w = lo + 1
        return out

    def _split_chars(self, text: str, s: int, e: int, budget: int) -> list[_Unit]:
        out: list[_Unit] = []
        while s < e:
            lo, hi = s + 1, e  # the longest prefix that fits
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self._content(text[s:mid]) <= budget:
                    lo = mid
                else:
                    hi = mid - 1
            if self._content(text[s:lo]) > self.budget:
                raise ChunkingError(f"one character ({text[s]!r}) is more tokens than the chunk size allows")
            out.append(_Unit(s, lo, self._content(text[s:lo]), True))
            s = lo
        return out

    def _overlap_start(self, text: str, nxt: int, ce: int, floor: int) -> int:
        """Earliest word start in (floor, ce) whose tail up to ``ce`` fits the overlap; ``nxt`` when none."""
        if self.config.overlap == 0:
            return nxt
        starts = [floor + m.start() for m in _WORD.finditer(text[floor:ce])][1:]
        if not starts:
            return nxt
        lo, hi = 0, len(starts)  # first index whose tail fits (tails shrink as the start moves right)
        while lo < hi:
            mid = (lo + hi) // 2
            if self._content(text[starts[mid]:ce]) <= self.config.overlap:
                hi = mid
            else:
                lo = mid + 1
        while lo < len(starts) and self._content(text[starts[lo]:ce]) > self.config.overlap:
            lo += 1
        return starts[lo] if lo < len(starts) else nxt


def chunk_text(text: str, count_tokens: TokenCounter, max_tokens: int, overlap: int = 32) -> list[Chunk]:
    """Split ``text`` into chunks of at most ``max_tokens`` tokens by ``count_tokens``."""
    return Chunker(count_tokens, ChunkConfig(max_tokens, overlap)).split(text)


def chunker_for(encoder: _HasTokenizer, max_tokens: int | None = None, overlap: int = 32) -> Chunker | None:
    """A chunker using ``encoder``'s tokenizer, with chunks of at most ``max_tokens`` (default and
    ceiling: the encoder's window). None when the encoder has no token limit or does not tokenise."""
    limit = encoder.max_tokens()
    if limit is None or encoder.count_tokens("") is None:
        if max_tokens is not None:
            raise ChunkingError("this encoder does not tokenise text, so --chunk-tokens cannot be applied")
        return None
    size = limit if max_tokens is None else int(max_tokens)
    if size > limit:
        raise ChunkingError(f"chunk size {size} exceeds the encoder's window of {limit} tokens; "
                            f"use at most {limit}")
    return Chunker(lambda t: int(encoder.count_tokens(t) or 0), ChunkConfig(size, int(overlap)))


def figure_labels(text: str) -> list[str]:
    """Figure labels (``Figure 22.4``) named in ``text``, in order, without repeats."""
    seen: list[str] = []
    for m in re.finditer(r"\b(?:Figure|Fig\.)\s+(\d+(?:\.\d+)*)", text):
        label = f"Figure {m.group(1)}"
        if label not in seen:
            seen.append(label)
    return seen


def chunk_item(item: "Item", chunker: Chunker | None) -> list["Item"]:
    """``item`` itself when its text fits one chunk (its id kept), else one item per chunk with id
    ``<id>#c<n>``; either way ``parent_id`` (metadata) names the original id and the provenance
    records the chunking settings (and each chunk's span, tokens and ``cut`` flag)."""
    from dataclasses import replace

    if chunker is None or item.text is None:
        return [item]
    chunking = chunker.config.to_record()
    chunks = chunker.split(item.text)
    if len(chunks) <= 1:
        meta = {**item.metadata, "parent_id": item.id}
        return [replace(item, metadata=meta, provenance={**item.provenance, "chunking": chunking})]
    return [replace(item, id=f"{item.id}#c{c.index}", input=f"{item.input}#c{c.index}", text=c.text,
                    metadata={**item.metadata, "parent_id": item.id, "chunk": c.index},
                    provenance={**item.provenance, "chunking": chunking,
                                "chunk": {"index": c.index, "of": len(chunks), "start": c.start, "end": c.end,
                                          "tokens": c.tokens, "cut": c.cut}})
            for c in chunks]


def stored_chunking(collection: Any) -> dict[str, Any] | None:
    """The chunking settings recorded with a collection's text items (None when it has none)."""
    import json

    rows = collection.rows("""provenance LIKE '%"chunking"%'""", ["provenance"], limit=1).to_pylist()
    if not rows:
        return None
    return json.loads(rows[0]["provenance"]).get("chunking")
