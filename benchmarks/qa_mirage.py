"""MIRAGE question answering with caselens: accuracy without and with retrieval, gold recall.

    python benchmarks/qa_mirage.py --home /path/home --knowledge pubmed \
        --generators extractive,gemma --limit-per-task 40

``--knowledge`` is a collection of ``../shared/data/corpus/pubmed_abstracts.jsonl`` (``caselens
ingest pubmed --text …``). Each generator runs ``evaluate_qa`` on the same fixed per-task sample;
results go to benchmarks/results/qa_mirage.json.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

from caselens.indexes.collection import Collection
from caselens.retrieval.eval.qa_eval import evaluate_qa

from harness import SHARED_DATA, write_result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--home", required=True)
    p.add_argument("--knowledge", required=True)
    p.add_argument("--questions", default=str(SHARED_DATA / "qa" / "mirage_dev.json"))
    p.add_argument("--generators", default="extractive,gemma")
    p.add_argument("--limit-per-task", type=int, default=40)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--min-score", type=float, default=0.25)
    p.add_argument("--out", default="qa_mirage.json")
    args = p.parse_args()
    knowledge = [Collection.open(n, args.home) for n in args.knowledge.split(",")]
    out = {"questions": args.questions, "limit_per_task": args.limit_per_task, "k": args.k, "runs": []}
    for name in args.generators.split(","):
        start = time.perf_counter()
        result = evaluate_qa(Path(args.questions), knowledge, name, k=args.k, limit_per_task=args.limit_per_task,
                             min_score=args.min_score)
        run = {**asdict(result), "seconds": round(time.perf_counter() - start, 1)}
        out["runs"].append(run)
        for task, t in result.tasks.items():
            print(f"{name:12s} {task:10s} n={t.n:3d} closed={t.accuracy_closed_book} rag={t.accuracy_rag} answered={t.accuracy_answered} "
                  f"gold_recall={t.gold_recall} abstain={t.abstention_rate}")
        write_result(args.out, out)  # after each generator: a stopped run keeps what it measured


if __name__ == "__main__":
    main()
