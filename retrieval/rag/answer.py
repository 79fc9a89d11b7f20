"""``ask``: retrieve passages from a text collection, answer with numbered citations, check them."""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field

from caselens.errors import QueryError
from caselens.indexes.collection import Collection
from caselens.retrieval.rag.generators import Generator, Passage, load_generator
from caselens.retrieval.search import search

_CITE = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")


@dataclass
class Answer:
    """An answer, who gave it, what it rests on, and whether its citations hold."""

    question: str
    answer: str
    generator: str  # which generator answered
    passages: list[dict]  # number, id, score, source, text of each passage put in the prompt
    cited: list[int] = field(default_factory=list)  # passage numbers the answer cites that exist
    invalid_citations: list[int] = field(default_factory=list)  # cited numbers that match no passage
    timings_ms: dict[str, float] = field(default_factory=dict)  # retrieval, generation

    @property
    def grounded(self) -> bool:
        """True when the answer cites at least one passage and nothing that was not retrieved."""
        return bool(self.cited) and not self.invalid_citations

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "grounded": self.grounded}, indent=2)


def citations(text: str) -> list[int]:
    """Numbers cited as [n] or [n, m] in ``text``, in order of first appearance."""
    out: list[int] = []
    for group in _CITE.findall(text):
        for n in group.split(","):
            if int(n) not in out:
                out.append(int(n))
    return out


def ask(collection: Collection, question: str, k: int = 5, generator: Generator | str = "auto",
        where: str | None = None) -> Answer:
    """Answer ``question`` from the top-``k`` text passages of ``collection``."""
    if not question.strip():
        raise QueryError("question is empty")
    t0 = time.perf_counter()
    result = search(collection, text=question, k=k, where=where)
    hits = [h for h in result.hits if h.text]
    passages = [Passage(h.rank, h.id, h.text or "", h.score) for h in hits]
    if not passages:
        raise QueryError(f"collection {collection.name!r} returned no text passages to answer from; "
                         "ask a collection built from a text corpus")
    t1 = time.perf_counter()
    gen = load_generator(generator) if isinstance(generator, str) else generator
    t2 = time.perf_counter()
    text = gen.answer(question, passages)
    t3 = time.perf_counter()
    numbers = {p.number for p in passages}
    cited = citations(text)
    return Answer(question=question, answer=text, generator=gen.name,
                  passages=[{"number": p.number, "id": p.id, "score": round(p.score, 4),
                             "source": h.source, "text": p.text} for p, h in zip(passages, hits)],
                  cited=[n for n in cited if n in numbers], invalid_citations=[n for n in cited if n not in numbers],
                  timings_ms={"retrieval": (t1 - t0) * 1000, "load_generator": (t2 - t1) * 1000,
                              "generation": (t3 - t2) * 1000})
