"""Gold-document retrieval on the PubMed corpus with the MIRAGE dev questions: BM25, dense, hybrid.

What it measures
----------------
``caselens.retrieval.eval.text_eval.evaluate_text`` on a collection holding
``corpus/pubmed_abstracts.jsonl`` (14,448 documents, chunked by the MiniLM tokenizer) for the
questions of ``qa/mirage_dev.json`` that name gold PubMed ids (PubMedQA* 250, BioASQ-Y/N 300):
recall@1/5/10/20/100, nDCG@10 and MRR@10 per task, for each mode:

* ``bm25``: bm25s over the chunk texts (English stop words, Snowball stemming, k1=1.5, b=0.75);
* ``dense``: the packaged all-MiniLM-L6-v2, exact inner product over unit vectors;
* ``hybrid``: both rankings, 300 chunks deep, fused by reciprocal rank fusion (k=60).

Chunks are mapped to their document (``parent_id``) and repeats dropped before scoring. Because
the fusion rank constant and the relative weight of the two rankings decide whether hybrid helps,
the script also reports, as a diagnosis, the per-question wins and losses of each mode against
the others (which questions each finds at rank 1 that the other misses).

With ``--variants SPEC,SPEC,...`` it compares text encoders instead (issue 13: the ONNX variants
against PyTorch): for each encoder name it ingests the corpus into a fresh collection under
``--work`` (timed: the whole pipeline's chunks/s) and scores dense retrieval (recall@k, nDCG@10,
MRR@10). ``--distractors N`` ingests a fixed subset instead of the whole corpus: every gold
document of the dev questions plus ``N`` other documents drawn with seed 0 (recall on a subset is
higher than on the whole corpus; compare the variants with each other, on the same subset).

Rerun
-----
    .venv/bin/caselens --home /tmp/cl-bench ingest pubmed --text ../shared/data/corpus/pubmed_abstracts.jsonl
    .venv/bin/python benchmarks/text_retrieval.py --home /tmp/cl-bench --collection pubmed
    nice -n 10 .venv/bin/python benchmarks/text_retrieval.py --work /tmp/cl-variants --distractors 2254 \
        --variants sentence-transformers:all-MiniLM-L6-v2,onnx-text:all-MiniLM-L6-v2@fp32,onnx-text:all-MiniLM-L6-v2@int8

Writes ``benchmarks/results/text_retrieval.json`` (``--variants``: ``text_encoder_variants.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from caselens.indexes.collection import Collection  # noqa: E402
from caselens.retrieval.eval.qa_eval import _gold_ids, load_questions  # noqa: E402
from caselens.retrieval.eval.text_eval import _dedupe, doc_ids_by_row, evaluate_text, summary_rows  # noqa: E402
from caselens.retrieval.fusion import TextRanker  # noqa: E402
from caselens.retrieval.search import collection_encoder  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT.parent / "shared" / "data"
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "text_retrieval.json"
console = Console() if sys.stdout.isatty() else Console(width=140)


def diagnose(coll: Collection, questions: Path, k: int = 10) -> dict[str, Any]:
    """Per task: questions whose gold is in the top ``k`` documents of one mode but not another."""
    data = load_questions(questions)
    doc_of = doc_ids_by_row(coll)
    corpus = set(doc_of.values())
    ranker = TextRanker(coll, depth=300)
    encoder = collection_encoder(coll)
    out: dict[str, Any] = {}
    for task in ("pubmedqa", "bioasq"):
        qs = [(q["question"], _gold_ids(q) & corpus) for q in data[task].values()]
        qs = [(q, g) for q, g in qs if g]
        vecs = encoder.encode_queries([q for q, _ in qs])
        found: dict[str, list[bool]] = {}
        for mode in ("bm25", "dense", "hybrid"):
            found[mode] = [bool(g & set(_dedupe([r for _, r in ranker.rank(q, 300, mode, vector=vecs[i])[0]],
                                                doc_of, k)))
                           for i, (q, g) in enumerate(qs)]
        pair = lambda a, b: sum(x and not y for x, y in zip(found[a], found[b]))  # noqa: E731
        out[task] = {f"hit@{k}_only_{a}_not_{b}": pair(a, b)
                     for a in found for b in found if a != b}
        out[task]["both_bm25_and_dense"] = sum(x and y for x, y in zip(found["bm25"], found["dense"]))
        out[task]["neither_bm25_nor_dense"] = sum(not x and not y for x, y in zip(found["bm25"], found["dense"]))
    return out


def subset_corpus(corpus: Path, questions: Path, distractors: int, out: Path) -> dict[str, Any]:
    """Every gold document of ``questions`` in ``corpus`` plus ``distractors`` others (seed 0)."""
    import random

    data = load_questions(questions)
    gold = set().union(*(_gold_ids(q) for task in data.values() for q in task.values()))
    rows = [line for line in corpus.open() if line.strip()]
    ids = [json.loads(line)["id"] for line in rows]
    keep = {i for i, doc in enumerate(ids) if doc in gold}
    others = [i for i in range(len(rows)) if i not in keep]
    keep |= set(random.Random(0).sample(others, min(distractors, len(others))))
    out.write_text("".join(rows[i] if rows[i].endswith("\n") else rows[i] + "\n" for i in sorted(keep)))
    return {"documents": len(keep), "gold_documents": len(keep) - min(distractors, len(others)),
            "distractors": min(distractors, len(others)), "seed": 0}


def compare_variants(specs: list[str], corpus: Path, questions: Path, work: Path) -> dict[str, Any]:
    """Ingest ``corpus`` with each encoder and score dense retrieval; see the module doc."""
    import time

    from caselens.ingest.chunking import chunker_for
    from caselens.ingest.encoders import load_encoder
    from caselens.ingest.pipeline import IngestConfig, ingest
    from caselens.ingest.sources import TextCorpusSource

    out: dict[str, Any] = {}
    for i, spec in enumerate(specs):
        start = time.perf_counter()
        encoder = load_encoder(spec)
        load_s = time.perf_counter() - start
        coll = Collection.create(f"variant{i}", encoder.info.to_record(), work)
        start = time.perf_counter()
        report = ingest(TextCorpusSource(corpus, chunker=chunker_for(encoder)), coll, encoder,
                        IngestConfig(batch_size=64, progress=False))
        seconds = time.perf_counter() - start
        result = evaluate_text(coll, questions, modes=("dense",), progress=False)
        scores = json.loads(result.to_json())["scores"]["dense"]
        out[spec] = {"fingerprint": encoder.info.fingerprint, "load_seconds": round(load_s, 2),
                     "chunks": report.accepted, "ingest_seconds": round(seconds, 1),
                     "ingest_chunks_per_s": round(report.accepted / seconds, 1), "dense": scores}
        console.print(f"{spec}: {report.accepted} chunks in {seconds:.0f}s, recall@10 "
                      f"{scores['all']['recall@10']:.4f}, nDCG@10 {scores['all']['ndcg@10']:.4f}")
        del encoder
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--home", type=Path)
    p.add_argument("--variants", help="comma-separated encoder names to compare (see the module doc)")
    p.add_argument("--work", type=Path, default=Path("/tmp/cl-variants"), help="home for the --variants collections")
    p.add_argument("--distractors", type=int, default=0,
                   help="--variants on the gold documents plus this many others (0: the whole corpus)")
    p.add_argument("--corpus", type=Path, default=DATA / "corpus" / "pubmed_abstracts.jsonl")
    p.add_argument("--collection", default="pubmed")
    p.add_argument("--questions", type=Path, default=DATA / "qa" / "mirage_dev.json")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.variants:
        return main_variants(args)
    if args.home is None:
        p.error("--home is required (or --variants)")
    coll = Collection.open(args.collection, args.home)
    result = evaluate_text(coll, args.questions)
    metrics = ("recall@1", "recall@5", "recall@10", "recall@20", "recall@100", "ndcg@10", "mrr@10")
    table = Table(title=f"gold-document retrieval, {coll.name}: {result.items} chunks of {result.documents} documents")
    for col in ("task", "mode", "n", *metrics):
        table.add_column(col, justify="right")
    for row in summary_rows(result, metrics):
        table.add_row(row[0], row[1], str(row[2]), *[f"{v:.3f}" for v in row[3:]])
    console.print(table)
    out = {"benchmark": "text_retrieval", "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
                       "load_average_at_start": [round(x, 2) for x in os.getloadavg()]},
           "chunking": None, "eval": json.loads(result.to_json()), "diagnosis": diagnose(coll, args.questions)}
    from caselens.ingest.chunking import stored_chunking

    out["chunking"] = stored_chunking(coll)
    console.print(json.dumps(out["diagnosis"], indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    console.print(f"wrote {args.out}")
    return 0


def main_variants(args: argparse.Namespace) -> int:
    import shutil
    import time

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    corpus, subset = args.corpus, None
    if args.distractors:
        corpus = args.work / "subset.jsonl"
        subset = subset_corpus(args.corpus, args.questions, args.distractors, corpus)
    started = time.time()
    out = {"benchmark": "text_encoder_variants", "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
                       "load_average_at_start": [round(x, 2) for x in os.getloadavg()]},
           "corpus": args.corpus.name, "subset": subset, "questions": args.questions.name,
           "variants": compare_variants(args.variants.split(","), corpus, args.questions, args.work)}
    out["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    out["seconds"] = round(time.time() - started)
    dest = args.out if args.out != DEFAULT_OUT else DEFAULT_OUT.with_name("text_encoder_variants.json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2))
    console.print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
