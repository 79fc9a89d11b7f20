"""Question-answering evaluation in the MIRAGE format, with and without retrieval.

The questions file is ``{task: {qid: {question, options: {A: …}, answer: "A", PMID?: [ids]}}}``
(MIRAGE's benchmark.json; ``../shared/data/qa/mirage_dev.json`` is a sample). For each task:

  accuracy_closed_book  the generator chooses an option from the question alone (None for generators
                        that can only quote retrieved text, such as ``extractive``)
  accuracy_rag          the generator chooses with the retrieved context (``ask``); an abstention
                        counts as wrong
  accuracy_answered     the same over the questions it did not abstain on
  gold_recall           for questions naming gold documents (``PMID``): the share of gold ids present
                        in the context that was put in the prompt (chunks count for their document)
  abstention_rate       answers withheld (weak retrieval, invalid citations)
  citation_validity     answers with no citation to anything not retrieved / answers that cite
  seconds_per_question  wall time of the RAG answer

and, over all questions with gold documents, ``suggested_min_score``: the abstention threshold on
the best passage's similarity that best separates questions whose gold document was retrieved
from those whose was not (maximum Youden's J) — the calibration for ``ask --min-score``.

Works with any generator; language models score options by likelihood (see generators.py).
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from caselens.errors import QueryError
from caselens.indexes.collection import Collection
from caselens.retrieval.rag.answer import AskConfig, ask, parse_choice
from caselens.retrieval.rag.generators import Generator, Request
from caselens.retrieval.rag.registry import load_generator


@dataclass
class TaskResult:
    """Scores of one task."""

    task: str
    n: int
    accuracy_closed_book: float | None
    accuracy_rag: float | None
    gold_recall: float | None  # None when the task names no gold documents
    n_with_gold: int
    abstention_rate: float | None
    citation_validity: float | None
    seconds_per_question: float | None
    accuracy_answered: float | None = None  # accuracy_rag over the questions not abstained on


@dataclass
class QAEval:
    """A whole run."""

    questions: str
    knowledge: list[str]
    generator: str
    k: int
    min_score: float
    tasks: dict[str, TaskResult] = field(default_factory=dict)
    suggested_min_score: float | None = None  # calibrated abstention threshold (see module docstring)
    calibration_j: float | None = None  # Youden's J at that threshold

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def calibrate_threshold(pairs: Sequence[tuple[float, bool]]) -> tuple[float | None, float | None]:
    """Threshold on best-passage score maximising TPR - FPR for "gold retrieved" (positives kept)."""
    pos = sum(1 for _, hit in pairs if hit)
    neg = len(pairs) - pos
    if not pos or not neg:
        return None, None
    best_t, best_j = None, -1.0
    for t in sorted({s for s, _ in pairs}):
        tpr = sum(1 for s, hit in pairs if hit and s >= t) / pos
        fpr = sum(1 for s, hit in pairs if not hit and s >= t) / neg
        if tpr - fpr > best_j:
            best_t, best_j = t, tpr - fpr
    return best_t, best_j


def load_questions(path: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """Read and check a MIRAGE-format file; raises QueryError naming what is wrong."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise QueryError(f"questions file {path} cannot be read as JSON: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise QueryError(f"questions file {path}: expected {{task: {{id: question}}}} (MIRAGE format)")
    for task, qs in data.items():
        for qid, q in qs.items():
            if not isinstance(q, dict) or "question" not in q or "options" not in q or "answer" not in q:
                raise QueryError(f"questions file {path}: {task}/{qid} needs question, options and answer")
    return data


def _doc_id(item_id: str) -> str:
    """Document id of an item: chunk ids ``doc#c3`` count for ``doc``."""
    return re.sub(r"#c\d+$", "", item_id)


def _gold_ids(q: dict[str, Any]) -> set[str]:
    gold = q.get("PMID") or []
    gold = gold if isinstance(gold, list) else [gold]
    return {f"pmid:{g}" if not str(g).startswith("pmid:") else str(g) for g in gold}


def evaluate_qa(questions: Path, knowledge: Sequence[Collection], generator: Generator | str = "extractive",
                k: int = 5, tasks: Sequence[str] | None = None, limit_per_task: int | None = None,
                min_score: float = 0.25, closed_book: bool = True, seed: int = 0,
                progress: bool = True) -> QAEval:
    """Evaluate ``generator`` on ``questions`` with ``knowledge`` (see module docstring)."""
    data = load_questions(questions)
    gen = load_generator(generator) if isinstance(generator, str) else generator
    if tasks:
        unknown = set(tasks) - set(data)
        if unknown:
            raise QueryError(f"tasks {sorted(unknown)} not in {questions} (tasks there: {sorted(data)})")
    # a generator that only quotes retrieved text (extractive) has no closed-book accuracy: None, not 0
    closed_book = closed_book and getattr(gen, "answers_closed_book", True)
    result = QAEval(questions=str(questions), knowledge=[c.name for c in knowledge], generator=gen.name, k=k,
                    min_score=min_score)
    pairs: list[tuple[float, bool]] = []
    for task in tasks or list(data):
        items = list(data[task].items())
        if limit_per_task and len(items) > limit_per_task:
            items = random.Random(seed).sample(items, limit_per_task)
        closed = rag = abstained = cited = valid = 0
        recalls: list[float] = []
        seconds = 0.0
        for qid, q in tqdm(items, desc=f"qa {task}", disable=not progress):
            options = {str(a): str(t) for a, t in q["options"].items()}
            truth = str(q["answer"])
            if closed_book:
                text = gen.generate(Request(question=q["question"], task="mc", options=options))
                closed += parse_choice(text, options) == truth
            if knowledge:
                start = time.perf_counter()
                answer = ask(list(knowledge), q["question"], generator=gen,
                             config=AskConfig(k=k, task="mc", options=options, min_score=min_score))
                seconds += time.perf_counter() - start
                rag += (not answer.abstained) and answer.choice == truth
                abstained += answer.abstained
                if answer.grounding.get("cited") or answer.grounding.get("invalid_citations"):
                    cited += 1
                    valid += not answer.grounding.get("invalid_citations")
                gold = _gold_ids(q)
                if gold:
                    in_context = {_doc_id(c["id"]) for c in answer.context}
                    recalls.append(len(gold & in_context) / len(gold))
                    best = max((c["score"] for c in answer.context if c["kind"] != "case"), default=0.0)
                    pairs.append((float(best), recalls[-1] > 0))
        n = len(items)
        result.tasks[task] = TaskResult(
            task=task, n=n,
            accuracy_closed_book=closed / n if closed_book and n else None,
            accuracy_rag=rag / n if knowledge and n else None,
            gold_recall=sum(recalls) / len(recalls) if recalls else None, n_with_gold=len(recalls),
            abstention_rate=abstained / n if knowledge and n else None,
            citation_validity=valid / cited if cited else None,
            seconds_per_question=seconds / n if knowledge and n else None,
            accuracy_answered=rag / (n - abstained) if knowledge and n > abstained else None)
    result.suggested_min_score, result.calibration_j = calibrate_threshold(pairs)
    return result
