"""Where the time of a grounded answer goes: retrieval, prompt assembly (budgeting), generation.

    python benchmarks/rag_latency.py --home /path/home --knowledge pubmed \
        --questions ../shared/data/qa/mirage_dev.json --generators extractive,gemma --n 20

Runs ``ask`` (multiple-choice task, the questions' own options) on ``--n`` questions sampled with a
fixed seed across tasks, per generator, after one warm-up question (model loading is reported
separately), and writes p50/p90/mean milliseconds per stage to benchmarks/results/rag_latency.json.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from caselens.indexes.collection import Collection
from caselens.retrieval.eval.qa_eval import load_questions
from caselens.retrieval.rag import AskConfig, ask, load_generator

from harness import SHARED_DATA, percentiles, write_result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--home", required=True)
    p.add_argument("--knowledge", required=True, help="knowledge collection(s), comma-separated")
    p.add_argument("--questions", default=str(SHARED_DATA / "qa" / "mirage_dev.json"))
    p.add_argument("--generators", default="extractive,gemma")
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--out", default="rag_latency.json")
    args = p.parse_args()

    data = load_questions(Path(args.questions))
    pool = [(task, qid, q) for task, qs in data.items() for qid, q in qs.items()]
    sample = random.Random(0).sample(pool, min(args.n + 1, len(pool)))
    knowledge = [Collection.open(n, args.home) for n in args.knowledge.split(",")]
    report = {"knowledge": args.knowledge, "k": args.k, "n": len(sample) - 1, "generators": {}}
    for name in args.generators.split(","):
        start = time.perf_counter()
        gen = load_generator(name)
        load_s = time.perf_counter() - start
        stages: dict[str, list[float]] = {"retrieval": [], "prompt": [], "generation": [], "total": []}
        for i, (task, qid, q) in enumerate(sample):
            config = AskConfig(k=args.k, task="mc", options={str(a): str(t) for a, t in q["options"].items()})
            answer = ask(knowledge, q["question"], generator=gen, config=config)
            if i == 0:
                continue  # warm-up
            t = answer.timings_ms
            for stage in ("retrieval", "prompt", "generation"):
                stages[stage].append(t[stage])
            stages["total"].append(t["retrieval"] + t["prompt"] + t["generation"])
        report["generators"][gen.name] = {"load_seconds": round(load_s, 2),
                                          **{stage: percentiles(v, 1) for stage, v in stages.items()}}
        print(name, json.dumps(report["generators"][gen.name]))
    write_result(args.out, report)


if __name__ == "__main__":
    main()
