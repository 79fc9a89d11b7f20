"""``ask``: retrieve cases and passages, prompt a generator, check the answer's citations, abstain
when the evidence is weak.

1. With a query image and a case collection, the image finds similar cases (``[case:…]``).
2. The question, extended with the retrieved cases' labels and findings, finds passages in each
   knowledge collection (``[doc:…]``, ``[page:…]``).
3. Each kind of source gets its own token budget; ranked content is kept whole, the lowest
   dropped.
4. No generator runs when the best passage scores below ``min_score``: the answer abstains.
5. The answer's citations are checked (:mod:`grounding`); an answer that cites nothing retrieved
   abstains too, keeping the model's text in ``raw_answer``.

A generator that sees images (a vision-language model) is given the image of each kept case and
page (:mod:`images`: found again under the collection's recorded input roots, checked against the
item's content hash, DICOM decoded and PDF pages rendered as ingest did them).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

from caselens.errors import QueryError
from caselens.indexes.collection import Collection
from caselens.retrieval.rag.context import ContextItem, case_text, citation_key, item_kind, sanitize, within_budget
from caselens.retrieval.rag.generators import Generator, Request
from caselens.retrieval.rag.registry import load_generator
from caselens.retrieval.rag.grounding import check_grounding
from caselens.retrieval.rag.prompts import ABSTAIN_TEXT
from caselens.retrieval.search import ExclusionUnknownError, ImageQuery, search


@dataclass
class AskConfig:
    """How ``ask`` retrieves, budgets and abstains."""

    k: int = 5  # passages retrieved from each knowledge collection
    k_cases: int = 3  # similar cases retrieved for a query image
    task: str = "free"  # "free", "yesno" or "mc"
    options: dict[str, str] | None = None  # letter -> text for "mc"
    where: str | None = None  # SQL filter applied to knowledge collections
    min_score: float = 0.25  # abstain when the best passage's similarity is below this
    budget_tokens: dict[str, int] = field(default_factory=lambda: {"case": 600, "page": 1500, "doc": 1500})
    min_overlap: float = 0.5  # share of a sentence's content words its cited source must contain
    max_new_tokens: int = 160  # generation length limit
    require_citations: bool = True  # abstain when a free/yes-no answer cites nothing retrieved
    images: bool = True  # show a generator that takes images the kept cases' and pages' images
    exclude_same: str | None = "patient_id"  # similar cases never share this with the query (when it is known)
    query_patient: str | None = None  # the patient of an outside query image (pseudonymised, never stored)


@dataclass
class Answer:
    """An answer, who gave it, what it rests on, and whether its citations hold."""

    question: str
    answer: str  # what to show: the model's answer, or the abstention message
    generator: str  # which generator answered
    abstained: bool = False
    abstain_reason: str = ""  # "weak_retrieval", "no_citations", "invalid_citations"
    raw_answer: str = ""  # the generator's text, kept when the answer abstained
    choice: str | None = None  # option letter for multiple-choice and yes/no tasks
    context: list[dict] = field(default_factory=list)  # key, kind, collection, id, score, source, text, image
    dropped: list[str] = field(default_factory=list)  # keys retrieved but left out by the token budget
    grounding: dict = field(default_factory=dict)  # cited, invalid_citations, sentences, supported_fraction
    timings_ms: dict[str, float] = field(default_factory=dict)  # retrieval, prompt, generation

    @property
    def cited(self) -> list[str]:
        return list(self.grounding.get("cited", []))

    @property
    def invalid_citations(self) -> list[str]:
        return list(self.grounding.get("invalid_citations", []))

    @property
    def grounded(self) -> bool:
        return bool(self.grounding.get("grounded"))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)


def _context_entry(item: ContextItem) -> dict:
    """An answer's record of a context item: ``image`` says whether its image was shown; the
    image's local path is left out (it may name the input folder; see ``caselens.ingest.inputs``)."""
    entry = {**asdict(item), "score": round(item.score, 4)}
    entry["image"] = entry.pop("image_path") is not None
    return entry


_LETTER = re.compile(r"^\W*([A-Z])(?:[\.\):\s]|$)")


def parse_choice(text: str, options: dict[str, str] | None) -> str | None:
    """The option letter an answer starts with (or whose yes/no/maybe word it starts with)."""
    if not options:
        return None
    m = _LETTER.match(text.strip())
    if m and m.group(1) in options:
        return m.group(1)
    first = re.match(r"\W*(\w+)", text.lower())
    if first:
        for letter, option in options.items():
            if option.strip().lower().rstrip(".") == first.group(1):
                return letter
    return None


_Hits = dict[tuple[str, str], tuple[Collection, Any]]  # (collection name, item id) -> (collection, hit)


def _retrieve(question: str, knowledge: Sequence[Collection], cases: Collection | None,
              image: ImageQuery | None, config: AskConfig) -> tuple[list[ContextItem], _Hits]:
    """Context items without images, and the hits they came from (to find their images later)."""
    items: list[ContextItem] = []
    hits: _Hits = {}
    query = question
    if image is not None:
        if cases is None:
            raise QueryError("a query image needs a case collection (--cases)")
        column = config.exclude_same if config.exclude_same in cases.columns() else None
        try:  # the query image itself and its patient never come back as a similar case
            result = search(cases, image=image, k=config.k_cases, exclude_self=True, exclude_same=column,
                            query_patient=config.query_patient if column else None)
        except ExclusionUnknownError:  # its patient is not known: only its stored copy is left out
            result = search(cases, image=image, k=config.k_cases, exclude_self=True)
        for hit in result.hits:
            text = sanitize(case_text(hit))
            items.append(ContextItem(citation_key("case", hit), "case", cases.name, hit.id, text, hit.score,
                                     hit.source))
            hits[(cases.name, hit.id)] = (cases, hit)
        findings = " ".join(sorted({it.text for it in items if it.text != "(no report)"}))
        query = f"{question} {findings}".strip()
    for coll in knowledge:
        result = search(coll, text=query, k=config.k, where=config.where)
        for hit in result.hits:
            if not hit.text:
                continue
            kind = item_kind(hit)
            items.append(ContextItem(citation_key(kind, hit), kind, coll.name, hit.id, sanitize(hit.text),
                                     hit.score, hit.source))
            hits[(coll.name, hit.id)] = (coll, hit)
    items.sort(key=lambda it: -it.score)
    return items, hits


def with_images(items: Sequence[ContextItem], hits: _Hits, chunk_pages: bool = False) -> list[ContextItem]:
    """``items`` with ``image_path`` set where their image is found (:mod:`.images`): cases, page
    items and, with ``chunk_pages``, the page a PDF text chunk comes from (rendered once, cached).
    An image goes to the best-ranked item showing it only (chunks of one page share one), so a
    generator is not shown the same picture twice."""
    from caselens.retrieval.images import has_image, item_images

    wanted: dict[str, list[ContextItem]] = {}
    for it in items:
        found = hits.get((it.collection, it.id))
        if it.image_path is None and found is not None and it.kind in ("case", "page") and \
                (found[1].kind == "image" or (chunk_pages and has_image(found[1]))):
            wanted.setdefault(it.collection, []).append(it)
    paths: dict[tuple[str, str], str | None] = {}
    for name, of_coll in wanted.items():
        coll = hits[(name, of_coll[0].id)][0]
        resolved = item_images(coll, [hits[(name, it.id)][1] for it in of_coll], pages=chunk_pages)
        paths.update({(name, it.id): path for it, path in zip(of_coll, resolved)})
    out, shown = [], set()
    for it in items:
        path = it.image_path or paths.get((it.collection, it.id))
        if path is not None and path in shown:
            path = None
        if path is not None:
            shown.add(path)
        out.append(it if path == it.image_path else replace(it, image_path=path))
    return out


def takes_images(generator: Generator) -> bool:
    """True when ``generator`` shows images to its model: a ``takes_images`` attribute says so, else
    a transformers vision-language model or an OpenAI-compatible endpoint sending images."""
    flag = getattr(generator, "takes_images", None)
    if flag is not None:
        return bool(flag)
    from caselens.retrieval.rag.generators import OpenAIChatGenerator, TransformersVLMGenerator

    return isinstance(generator, TransformersVLMGenerator) or \
        (isinstance(generator, OpenAIChatGenerator) and bool(generator.send_images))


def retrieve_context(question: str, knowledge: Sequence[Collection], cases: Collection | None = None,
                     image: ImageQuery | None = None, config: AskConfig | None = None, *, images: bool = True,
                     chunk_pages: bool = False) -> list[ContextItem]:
    """Cases for ``image`` and passages for ``question`` (+ the cases' findings), best first.

    ``images``: cases and page items get ``image_path``, a PNG/JPEG of what they show, found from
    the collection's recorded input roots (:mod:`caselens.retrieval.images`: checked against
    the item's content hash, DICOM decoded and PDF pages rendered into the collection's cache);
    ``chunk_pages``: PDF text chunks too get their page's image.
    """
    items, hits = _retrieve(question, knowledge, cases, image, config or AskConfig())
    return with_images(items, hits, chunk_pages) if images else items


def ask(knowledge: Collection | Sequence[Collection], question: str, *, generator: Generator | str = "auto",
        cases: Collection | None = None, image: ImageQuery | None = None, config: AskConfig | None = None) -> Answer:
    """Answer ``question`` from ``knowledge`` collections (and cases similar to ``image``)."""
    config = config or AskConfig()
    if not question.strip():
        raise QueryError("question is empty")
    knowledge = [knowledge] if isinstance(knowledge, Collection) else list(knowledge)
    t0 = time.perf_counter()
    items, hits = _retrieve(question, knowledge, cases, image, config)
    t1 = time.perf_counter()
    gen = load_generator(generator) if isinstance(generator, str) else generator
    t2 = time.perf_counter()
    kept: list[ContextItem] = []
    dropped: list[ContextItem] = []
    for kind in ("case", "page", "doc"):
        of_kind = [it for it in items if it.kind == kind]
        k, d = within_budget(of_kind, config.budget_tokens.get(kind, 1500), gen.count_tokens)
        kept += k
        dropped += d
    kept.sort(key=lambda it: (-(it.kind == "case"), -it.score))
    if config.images and takes_images(gen):  # images only of what the prompt keeps, for a model that sees them
        kept = with_images(kept, hits, chunk_pages=True)
    answer = Answer(question=question, answer="", generator=gen.name,
                    context=[_context_entry(it) for it in kept],
                    dropped=[it.key for it in dropped])
    passages = [it for it in kept if it.kind != "case"]
    best = max((it.score for it in passages), default=0.0)
    t3 = time.perf_counter()
    if best < config.min_score:
        answer.abstained, answer.abstain_reason = True, "weak_retrieval"
        answer.answer = (f"{ABSTAIN_TEXT} (best passage similarity {best:.2f} is below the "
                         f"abstention threshold {config.min_score:.2f})")
    else:
        request = Request(question=question, items=kept, task=config.task, options=config.options,
                          max_new_tokens=config.max_new_tokens)
        text = gen.generate(request)
        answer.raw_answer = text
        answer.choice = parse_choice(text, config.options)
        grounding = check_grounding(text, kept, config.min_overlap)
        answer.grounding = {**asdict(grounding), "supported_fraction": grounding.supported_fraction,
                            "grounded": grounding.grounded}
        answer.answer = text
        if grounding.invalid_citations:
            answer.abstained, answer.abstain_reason = True, "invalid_citations"
            answer.answer = f"{ABSTAIN_TEXT} (the answer cited sources that were not retrieved: " \
                            f"{', '.join(grounding.invalid_citations)})"
        elif config.require_citations and config.task != "mc" and not grounding.cited:
            answer.abstained, answer.abstain_reason = True, "no_citations"
            answer.answer = f"{ABSTAIN_TEXT} (the generator's answer cites no retrieved source)"
    t4 = time.perf_counter()
    answer.timings_ms = {"retrieval": (t1 - t0) * 1000, "load_generator": (t2 - t1) * 1000,
                         "prompt": (t3 - t2) * 1000, "generation": (t4 - t3) * 1000}
    return answer
