"""Knowledge ingest speed and query latency: chunking, encoding, the pipeline, BM25/dense/hybrid search,
and the textbook/guideline PDFs (pages, chunks, OCR, rejections, "which page shows this figure").

What it measures
----------------
1. **chunking alone**: every row of ``corpus/pubmed_abstracts.jsonl`` (14,448 documents) split by
   the packaged MiniLM tokenizer (chunks of at most 256 tokens, overlap 32): rows, chunks, rows
   that needed several chunks, chunks that had to cut a sentence, chunks/s;
2. **encoding alone**: the first ``--encode-sample`` chunks embedded by MiniLM (batch 64), chunks/s;
3. **pipeline**: the first ``--pipeline-rows`` rows ingested into a fresh collection (read + chunk +
   encode + write LanceDB + ledger + FAISS), chunks/s; and, for the full collection given by
   ``--collection`` (built with ``caselens ingest``), its ingest run's duration from the ledger;
4. **query latency** on the full collection for each mode (``dense``, ``bm25``, ``hybrid``),
   ``--queries`` questions of the MIRAGE dev set (PubMedQA* and BioASQ), k=10: through
   ``caselens.retrieval.search.search`` (what ``caselens search`` runs: opens and checks the
   indexes per query) and through one ``TextRanker`` (indexes loaded once, as a server would),
   p50/p99/mean in ms; plus the BM25 index build time;
5. **PDFs** under ``textbook/pdf/``: ingested as chunks (MiniLM): pages, chunks, OCR'd pages,
   rejected files with reasons, seconds; then for every OpenStax figure caption found in the
   text ("Figure 22.4 Upper Airway"), its title ("Upper Airway") is searched in each mode and the
   page holding the figure (gold: ``openstax_pages.jsonl``) must come back: hit@1, hit@5.

With ``--encoders SPEC,SPEC,...`` (issue 13) it compares text encoders instead of sections 2-3
for the default one: **encoder alone** on the same ``--encode-sample`` chunks, the encoders
taking turns batch by batch (64 chunks) so that load changes on a shared machine hit all of
them alike (chunks/s by wall clock, and per CPU-second of this process); then the **pipeline**
(``--pipeline-rows`` rows into a fresh collection) for each, followed at once by the encoder
alone on the chunks that run stored, so the pipeline's share of the encoder-alone rate is taken
under similar load; and, measured inside the pipeline run itself (so that a change of load
cannot skew it), the share of its wall time spent in the encoder, which is the pipeline's rate
as a share of the encoder's. Writes ``text_encoders.json``.

Rerun
-----
From the repository root (the full collection first, ~15-25 min on 2 CPU cores)::

    .venv/bin/caselens --home /tmp/cl-bench ingest pubmed --text ../shared/data/corpus/pubmed_abstracts.jsonl
    .venv/bin/python benchmarks/text_ingest.py --home /tmp/cl-bench --collection pubmed

    nice -n 10 .venv/bin/python benchmarks/text_ingest.py --encode-sample 512 --pipeline-rows 300 \
        --encoders sentence-transformers:all-MiniLM-L6-v2,onnx-text:all-MiniLM-L6-v2@fp32,onnx-text:all-MiniLM-L6-v2@int8

Writes ``benchmarks/results/text_ingest.json`` (``--encoders``: ``text_encoders.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from caselens.indexes import bm25_index as bm25  # noqa: E402
from caselens.indexes.collection import Collection  # noqa: E402
from caselens.ingest.chunking import chunker_for  # noqa: E402
from caselens.ingest.items import Item, Rejection  # noqa: E402
from caselens.ingest.pipeline import IngestConfig, ingest  # noqa: E402
from caselens.ingest.sources import PdfOptions, PdfSource, TextCorpusSource  # noqa: E402
from caselens.ingest.encoders import load_encoder  # noqa: E402
from caselens.ingest.encoders.text import DEFAULT_TEXT_ENCODER  # noqa: E402
from caselens.retrieval.fusion import TextRanker  # noqa: E402
from caselens.retrieval.search import MODES, search  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT.parent / "shared" / "data"
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "text_ingest.json"


def _pct(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"p50_ms": round(float(np.percentile(a, 50)), 2), "p99_ms": round(float(np.percentile(a, 99)), 2),
            "mean_ms": round(float(a.mean()), 2), "n": len(ms)}


def bench_chunking(corpus: Path, encoder: Any) -> tuple[dict[str, Any], list[str]]:
    chunker = chunker_for(encoder)
    texts = [json.loads(line)["text"] for line in corpus.open() if line.strip()]
    start = time.perf_counter()
    per_row = [chunker.split(t) for t in texts]
    seconds = time.perf_counter() - start
    chunks = [c for cs in per_row for c in cs]
    return {"rows": len(texts), "chunks": len(chunks), "rows_with_several_chunks": sum(len(cs) > 1 for cs in per_row),
            "cut_chunks": sum(c.cut for c in chunks), "max_tokens_seen": max(c.tokens for c in chunks),
            "mean_tokens": round(float(np.mean([c.tokens for c in chunks])), 1),
            "chunk_tokens": chunker.config.max_tokens, "overlap": chunker.config.overlap,
            "seconds": round(seconds, 2), "chunks_per_s": round(len(chunks) / seconds, 1)}, [c.text for c in chunks]


def bench_encoding(texts: list[str], encoder: Any, n: int) -> dict[str, Any]:
    sample = texts[:n]
    encoder.encode_texts(sample[:8])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(sample), 64):
        encoder.encode_texts(sample[i:i + 64])
    seconds = time.perf_counter() - start
    return {"chunks": len(sample), "seconds": round(seconds, 2), "chunks_per_s": round(len(sample) / seconds, 1),
            "batch": 64}


def bench_pipeline(corpus: Path, encoder: Any, rows: int, home: Path) -> dict[str, Any]:
    coll = Collection.create("pipeline-sample", encoder.info.to_record(), home)
    source = TextCorpusSource(corpus, limit=rows, chunker=chunker_for(encoder))
    start = time.perf_counter()
    report = ingest(source, coll, encoder, IngestConfig(batch_size=64, progress=False))
    seconds = time.perf_counter() - start
    return {"rows": rows, "chunks": report.accepted, "rejected": dict(report.rejected), "seconds": round(seconds, 2),
            "chunks_per_s": round(report.accepted / seconds, 1), "rows_per_s": round(rows / seconds, 1)}


def compare_encoders(specs: list[str], texts: list[str], corpus: Path, n: int, rows: int, home: Path) -> dict[str, Any]:
    """Encoder alone (taking turns batch by batch) and pipeline with the encoder alone right after."""
    encoders = {}
    for spec in specs:
        t = time.perf_counter()
        encoders[spec] = load_encoder(spec)
        print(f"loaded {spec} in {time.perf_counter() - t:.1f}s", flush=True)
    sample = texts[:n]
    wall = {s: 0.0 for s in specs}
    cpu = {s: 0.0 for s in specs}
    for enc in encoders.values():
        enc.encode_texts(sample[:8])  # warm-up
    for i in range(0, len(sample), 64):
        for spec, enc in encoders.items():
            t, c = time.perf_counter(), time.process_time()
            enc.encode_texts(sample[i:i + 64])
            wall[spec] += time.perf_counter() - t
            cpu[spec] += time.process_time() - c
    out: dict[str, Any] = {}
    for spec in specs:
        out[spec] = {"fingerprint": encoders[spec].info.fingerprint, "encoder_alone": {
            "chunks": len(sample), "seconds": round(wall[spec], 2), "chunks_per_s": round(len(sample) / wall[spec], 1),
            "chunks_per_cpu_s": round(len(sample) / cpu[spec], 1), "batch": 64}}
    base = out[specs[0]]["encoder_alone"]["chunks_per_s"]
    for spec in specs:
        out[spec]["encoder_alone"]["speedup_vs_first"] = round(out[spec]["encoder_alone"]["chunks_per_s"] / base, 2)
        print(spec, json.dumps(out[spec]["encoder_alone"]), flush=True)
    for i, (spec, enc) in enumerate(encoders.items()):
        coll = Collection.create(f"pipeline-{i}", enc.info.to_record(), home)
        source = TextCorpusSource(corpus, limit=rows, chunker=chunker_for(enc))
        in_encoder = [0.0]
        encode = enc.encode_texts

        def timed(texts: list[str], encode: Any = encode) -> Any:  # the encoder's share of the run's wall time
            t0 = time.perf_counter()
            try:
                return encode(texts)
            finally:
                in_encoder[0] += time.perf_counter() - t0

        enc.encode_texts = timed
        t, c = time.perf_counter(), time.process_time()
        try:
            report = ingest(source, coll, enc, IngestConfig(batch_size=64, progress=False))
        finally:
            del enc.encode_texts
        seconds, cpu_seconds = time.perf_counter() - t, time.process_time() - c
        stored = [r["text"] for r in coll.rows(columns=["text"]).to_pylist()]
        t = time.perf_counter()
        for j in range(0, len(stored), 64):
            enc.encode_texts(stored[j:j + 64])
        alone = time.perf_counter() - t
        out[spec]["pipeline"] = {
            "rows": rows, "chunks": report.accepted, "seconds": round(seconds, 2),
            "chunks_per_s": round(report.accepted / seconds, 1),
            "encoder_alone_same_chunks_chunks_per_s": round(len(stored) / alone, 1),
            "pipeline_share_of_encoder_alone": round(alone / seconds, 3),
            "pipeline_chunks_per_cpu_s": round(report.accepted / cpu_seconds, 1),
            # in the same run, so load changes cannot skew it: pipeline rate / encoder rate
            "encoder_share_of_pipeline_wall": round(in_encoder[0] / seconds, 3)}
        print(spec, json.dumps(out[spec]["pipeline"]), flush=True)
    base = out[specs[0]]["pipeline"]["chunks_per_s"]
    for spec in specs:
        out[spec]["pipeline"]["speedup_vs_first"] = round(out[spec]["pipeline"]["chunks_per_s"] / base, 2)
    return out


def full_collection_facts(coll: Collection) -> dict[str, Any]:
    ledger = coll.ledger()
    runs: dict[str, list[str]] = {}
    for e in ledger:
        if e["status"] == "accepted":
            runs.setdefault(e["run_id"], []).append(e["time"])
    facts: dict[str, Any] = {"items": coll.count(), "table_version": coll.version}
    if runs:
        run, times = max(runs.items(), key=lambda kv: len(kv[1]))
        t = [datetime.strptime(x, "%Y-%m-%dT%H:%M:%SZ") for x in times]
        secs = (max(t) - min(t)).total_seconds()
        facts["ingest_run"] = {"run_id": run, "accepted": len(times), "seconds_first_to_last_batch": secs,
                               "chunks_per_s": round(len(times) / secs, 1) if secs else None}
    return facts


def bench_latency(coll: Collection, questions: list[str]) -> dict[str, Any]:
    shutil.rmtree(coll.root / bm25.FOLDER, ignore_errors=True)
    bm25._LOADED.clear()
    start = time.perf_counter()
    bm25.bm25_index(coll)
    out: dict[str, Any] = {"bm25_build_seconds": round(time.perf_counter() - start, 2)}
    for mode in MODES:  # warm-up: encoder, FAISS, BM25 loaded once
        search(coll, text=questions[0], k=10, mode=mode)
    per_call: dict[str, Any] = {}
    for mode in MODES:
        ms = []
        for q in questions:
            t0 = time.perf_counter()
            search(coll, text=q, k=10, mode=mode)
            ms.append((time.perf_counter() - t0) * 1000)
        per_call[mode] = _pct(ms)
    ranker = TextRanker(coll)
    for mode in MODES:
        ranker.rank(questions[0], 10, mode)
    in_process: dict[str, Any] = {}
    for mode in MODES:
        ms = []
        for q in questions:
            t0 = time.perf_counter()
            ranker.rank(q, 10, mode)
            ms.append((time.perf_counter() - t0) * 1000)
        in_process[mode] = _pct(ms)
    out["search_call"] = per_call
    out["ranker_indexes_loaded"] = in_process
    return out


def bench_pdfs(pdf_dir: Path, pages_gold: Path, encoder: Any, home: Path) -> dict[str, Any]:
    coll = Collection.create("textbooks", encoder.info.to_record(), home)
    source = PdfSource(pdf_dir, PdfOptions(), chunker_for(encoder))
    items = list(source)  # read once, to count pages and OCR; then ingest the same items
    start = time.perf_counter()
    report = ingest(iter_items(items, source.kind), coll, encoder, IngestConfig(batch_size=64, progress=False))
    seconds = time.perf_counter() - start
    chunks = [it for it in items if isinstance(it, Item)]
    rejected = Counter(it.reason_code for it in items if isinstance(it, Rejection))
    pages = {it.metadata["page_id"] for it in chunks}
    ocr_pages = {it.metadata["page_id"] for it in chunks if it.metadata["ocr"]}
    rejected_inputs = [{"input": it.input, "reason_code": it.reason_code, "reason": it.reason}
                       for it in items if isinstance(it, Rejection)]
    facts: dict[str, Any] = {
        "files": len(source.files()), "pdfs_read": len({it.provenance["file"] for it in chunks}),
        "pages": len(pages), "chunks": len(chunks), "ocr_pages": len(ocr_pages),
        "cut_chunks": sum(bool(it.provenance["chunk"]["cut"]) for it in chunks),
        "rejected": dict(rejected), "rejected_inputs": rejected_inputs, "accepted": report.accepted,
        "ingest_seconds_after_reading": round(seconds, 2)}
    # which page shows figure X? gold from openstax_pages.jsonl
    gold: dict[tuple[str, str], int] = {}
    for line in pages_gold.open():
        row = json.loads(line)
        for label in row.get("figure_labels") or []:
            gold.setdefault((row["pdf"], label), row["page"])
    captions: dict[tuple[str, str], str] = {}
    for it in chunks:
        for m in re.finditer(r"^(Figure \d+\.\d+)\s+(.+)$", it.text, re.MULTILINE):
            key = (it.provenance["file"], m.group(1))
            if key in gold and m.group(2).strip():
                captions.setdefault(key, m.group(2).strip())
    scores: dict[str, Any] = {}
    ranker = TextRanker(coll)
    doc_page = {r["_row"]: (json.loads(r["provenance"])["file"], int(r["page"]))
                for r in coll.rows(columns=["_row", "provenance", "page"]).to_pylist()}
    for mode in MODES:
        h1 = h5 = 0
        for (pdf, label), title in captions.items():
            found = [doc_page[r] for _, r in ranker.rank(title, 5, mode)[0]]
            h1 += found[:1] == [(pdf, gold[(pdf, label)])]
            h5 += (pdf, gold[(pdf, label)]) in found
        scores[mode] = {"hit@1": round(h1 / len(captions), 3), "hit@5": round(h5 / len(captions), 3)}
    facts["figure_page_search"] = {"figures_with_caption": len(captions), "gold_figures": len(gold),
                                   "query": "the caption's title, e.g. 'Upper Airway'", "scores": scores}
    return facts


class iter_items:  # noqa: N801 - a tiny Source over items already read
    """Items already read, replayed as a source (so reading is not timed twice)."""

    def __init__(self, items: list[Any], kind: str):
        self.items, self.kind = items, kind

    def estimate(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", type=Path, default=DATA)
    p.add_argument("--home", type=Path, help="caselens home holding the full collection")
    p.add_argument("--collection", help="full PubMed collection (for latency and the full ingest run)")
    p.add_argument("--encode-sample", type=int, default=2000)
    p.add_argument("--pipeline-rows", type=int, default=1500)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--encoders", help="comma-separated encoder names to compare (see the module doc); the "
                   "first is the reference for speed-ups")
    p.add_argument("--skip", nargs="*", default=[], choices=["chunking", "encoding", "pipeline", "latency", "pdfs"])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    corpus = args.data_root / "corpus" / "pubmed_abstracts.jsonl"
    encoder = load_encoder(DEFAULT_TEXT_ENCODER)
    result: dict[str, Any] = {
        "benchmark": "text_ingest", "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
                    "load_average_at_start": [round(x, 2) for x in os.getloadavg()]},
        "encoder": encoder.info.spec, "corpus": str(corpus.name)}
    tmp_home = Path(tempfile.mkdtemp(prefix="cl-text-bench-"))
    if args.encoders:
        try:
            chunking, texts = bench_chunking(corpus, encoder)
            result.update(benchmark="text_encoders", chunking=chunking, encode_sample=args.encode_sample,
                          pipeline_rows=args.pipeline_rows,
                          variants=compare_encoders(args.encoders.split(","), texts, corpus, args.encode_sample,
                                                    args.pipeline_rows, tmp_home))
        finally:
            shutil.rmtree(tmp_home, ignore_errors=True)
        result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        out = args.out if args.out != DEFAULT_OUT else DEFAULT_OUT.with_name("text_encoders.json")
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")
        return 0
    try:
        texts: list[str] = []
        if "chunking" not in args.skip or "encoding" not in args.skip:
            chunking, texts = bench_chunking(corpus, encoder)
            result["chunking"] = chunking
            print("chunking:", json.dumps(chunking), flush=True)
        if "encoding" not in args.skip:
            result["encoding"] = bench_encoding(texts, encoder, args.encode_sample)
            print("encoding:", json.dumps(result["encoding"]), flush=True)
        if "pipeline" not in args.skip:
            result["pipeline_sample"] = bench_pipeline(corpus, encoder, args.pipeline_rows, tmp_home)
            print("pipeline:", json.dumps(result["pipeline_sample"]), flush=True)
        if args.collection and "latency" not in args.skip:
            coll = Collection.open(args.collection, args.home)
            result["full_collection"] = full_collection_facts(coll)
            qa = json.loads((args.data_root / "qa" / "mirage_dev.json").read_text())
            questions = [q["question"] for task in ("pubmedqa", "bioasq") for q in qa[task].values()]
            rng = np.random.default_rng(0)
            picked = [questions[i] for i in sorted(rng.choice(len(questions), min(args.queries, len(questions)),
                                                              replace=False))]
            result["latency"] = bench_latency(coll, picked)
            print("latency:", json.dumps(result["latency"]), flush=True)
        if "pdfs" not in args.skip:
            pdf_dir = args.data_root / "textbook" / "pdf"
            result["pdfs"] = bench_pdfs(pdf_dir, pdf_dir / "openstax_pages.jsonl", encoder, tmp_home)
            print("pdfs:", json.dumps({k: v for k, v in result["pdfs"].items() if k != "rejected_inputs"}), flush=True)
    finally:
        shutil.rmtree(tmp_home, ignore_errors=True)
    if args.skip and args.out.exists():  # sections not rerun keep their earlier numbers
        earlier = json.loads(args.out.read_text())
        result = {**earlier, **result, "sections_rerun_at": {
            **earlier.get("sections_rerun_at", {}),
            **{k: result["time"] for k in result if k in ("chunking", "encoding", "pipeline_sample", "latency",
                                                          "full_collection", "pdfs")}}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
