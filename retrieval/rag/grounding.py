"""Checking an answer against what was retrieved.

* citations are parsed (typed keys ``[doc:…]``, ``[page:…]``, ``[case:…]``; bare ``[n]`` is read as
  the n-th source, for small models); a citation of anything not retrieved is *invalid*;
* each sentence is *supported* when it cites a retrieved source whose text shares at least
  ``min_overlap`` of the sentence's content words (lexical support), else *unsupported*;
* the answer is *grounded* when it cites something, cites nothing invalid, and most sentences
  are supported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

from caselens.retrieval.rag.context import ContextItem

_CITE = re.compile(r"\[((?:case|page|doc):[^\[\]\s]+|\d+(?:\s*,\s*\d+)*)\]")
_WORD = re.compile(r"[a-z0-9]+")
_STOP = set("""a an the of and or to in on for with by is are was were be been what which who whom whose how why
when where does do did can could should would will may might that this these those it its as at from into
about than then there their they them his her he she you your i we our not no yes also such""".split())


def content_terms(text: str) -> set[str]:
    """Lower-cased content words (stop words and one-letter tokens dropped)."""
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP and len(w) > 1}


def split_sentences(text: str) -> list[str]:
    """Sentences of a text (a light rule-based splitter that keeps citations with their sentence)."""
    parts = re.split(r"(?<=[.!?\]])\s+(?=[A-Z0-9\"'(\[])", text.strip())
    out: list[str] = []
    for p in parts:
        p = p.strip()
        if not p:
            continue
        if out and _CITE.fullmatch(p.strip(" .")):  # a citation left alone after the full stop
            out[-1] += " " + p
        else:
            out.append(p)
    return out


def parse_citations(text: str, items: Sequence[ContextItem]) -> list[str]:
    """Cited keys in order of first appearance; ``[n]`` becomes the n-th item's key (or ``#n``)."""
    keys: list[str] = []
    for group in _CITE.findall(text):
        found = []
        if group[0].isdigit():
            for n in group.split(","):
                i = int(n)
                found.append(items[i - 1].key if 1 <= i <= len(items) else f"#{i}")
        else:
            found.append(group)
        for key in found:
            if key not in keys:
                keys.append(key)
    return keys


@dataclass
class SentenceSupport:
    """One answer sentence and the evidence for it."""

    text: str
    cited: list[str]  # keys it cites
    supported: bool  # cites a retrieved source that shares enough content words
    overlap: float  # best fraction of the sentence's content words found in a cited source


@dataclass
class Grounding:
    """The citation check of one answer."""

    cited: list[str] = field(default_factory=list)  # valid keys cited
    invalid_citations: list[str] = field(default_factory=list)  # keys cited but not retrieved
    sentences: list[SentenceSupport] = field(default_factory=list)

    @property
    def supported_fraction(self) -> float:
        return sum(s.supported for s in self.sentences) / len(self.sentences) if self.sentences else 0.0

    @property
    def grounded(self) -> bool:
        return bool(self.cited) and not self.invalid_citations and self.supported_fraction >= 0.5


def check_grounding(answer: str, items: Sequence[ContextItem], min_overlap: float = 0.5) -> Grounding:
    """Check ``answer``'s citations and per-sentence support against the retrieved ``items``."""
    by_key = {it.key: it for it in items}
    cited = parse_citations(answer, items)
    result = Grounding(cited=[k for k in cited if k in by_key], invalid_citations=[k for k in cited if k not in by_key])
    for sentence in split_sentences(answer):
        keys = parse_citations(sentence, items)
        terms = content_terms(_CITE.sub(" ", sentence))
        best = 0.0
        for key in keys:
            if key in by_key and terms:
                best = max(best, len(terms & content_terms(by_key[key].text)) / len(terms))
        result.sentences.append(SentenceSupport(sentence, keys, bool(keys) and best >= min_overlap, round(best, 3)))
    return result
