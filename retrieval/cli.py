"""The ``caselens`` command: a thin layer over the library functions.

Every command prints what it did and where; errors print one line naming the input and the
reason, and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table

from caselens import __version__
from caselens.errors import CaselensError, SourceError, UnsupportedModalityError
from caselens.indexes.collection import Collection, default_home, list_collections

console = Console()


def _encoder_options(pairs: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SourceError(f"--encoder-opt {pair!r}: write it as KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def _open(args: argparse.Namespace) -> Collection:
    return Collection.open(args.collection, args.home)


# ------------------------------------------------------------------ ingest
def _chunker(args: argparse.Namespace, encoder: Any, existing: Collection | None) -> Any:
    """The chunker for a text ingest: the encoder's tokenizer, size/overlap from the options or, for
    an existing collection, the ones it was chunked with (a different setting is refused)."""
    from caselens.ingest.chunking import ChunkingError, chunker_for, stored_chunking

    stored = stored_chunking(existing) if existing is not None else None
    size = args.chunk_tokens if args.chunk_tokens is not None else (stored or {}).get("max_tokens")
    overlap = args.chunk_overlap if args.chunk_overlap is not None else (stored or {}).get("overlap", 32)
    chunker = chunker_for(encoder, size, overlap)
    if stored and chunker is not None and chunker.config.to_record() != stored:
        raise ChunkingError(f"collection {existing.name!r} was chunked with {stored}; ingest with the same "
                            "--chunk-tokens/--chunk-overlap, or into a new collection")
    if chunker is not None:
        console.print(f"chunks: at most {chunker.config.max_tokens} tokens of {encoder.info.spec}'s tokenizer, "
                      f"overlap {chunker.config.overlap}")
    return chunker


def cmd_ingest(args: argparse.Namespace) -> int:
    from caselens.ingest.pipeline import IngestConfig, ingest
    from caselens.ingest.sources import ImageSource, TextCorpusSource
    from caselens.ingest.encoders import load_encoder, load_from_record
    from caselens.ingest.encoders.text import DEFAULT_TEXT_ENCODER

    given = [x for x in (args.images, args.manifest, args.dicom, args.text, args.pdf) if x]
    if not given:
        raise SourceError("say what to ingest: --images DIR [--manifest CSV], --dicom FILE..., --text FILE "
                          "or --pdf FILE_OR_DIR")
    if len([x for x in ((args.images or args.manifest or args.dicom), args.text, args.pdf) if x]) > 1:
        raise SourceError("ingest images, text corpora and PDFs in separate runs (one run, one source)")
    exists = Collection.exists(args.collection, args.home)
    encoder = None
    if args.encoder:
        encoder = load_encoder(args.encoder, _encoder_options(args.encoder_opt))
    elif exists:
        encoder = load_from_record(Collection.open(args.collection, args.home).encoder)
    if args.pdf and args.pdf_items is None:  # text chunks for text encoders, page images for image encoders
        args.pdf_items = "pages" if encoder is not None and "text" not in encoder.info.modalities else "chunks"
    kind = "text" if args.text or (args.pdf and args.pdf_items == "chunks") else "image"
    if encoder is None:
        encoder = load_encoder("classic" if kind == "image" else DEFAULT_TEXT_ENCODER)
    if kind not in encoder.info.modalities:  # refuse before a collection is created
        raise UnsupportedModalityError(f"encoder {encoder.info.spec} cannot embed {kind} items")
    chunker = _chunker(args, encoder, Collection.open(args.collection, args.home) if exists else None) \
        if kind == "text" else None
    named = args.source_paths  # None: the collection's setting, or the default for this input
    if args.text and Path(args.text).expanduser().is_dir():
        from caselens.ingest.sources.text_folder import TextFolderConfig, TextFolderSource

        source: Any = TextFolderSource(Path(args.text), chunker=chunker, config=TextFolderConfig(source_paths=named))
    elif args.text:
        from caselens.ingest.sources.text_corpus import TextCorpusConfig

        source = TextCorpusSource(Path(args.text), args.id_field, args.text_field, limit=args.limit,
                                  chunker=chunker, config=TextCorpusConfig(source_paths=named))
    elif args.pdf:
        from caselens.ingest.sources.pdf import PdfOptions, PdfSource

        source = PdfSource(Path(args.pdf), PdfOptions(items=args.pdf_items, dpi=args.dpi, ocr=not args.no_ocr,
                                                      source_paths=named), chunker=chunker)
    elif args.dicom:
        source = _dicom_source(args, Collection.open(args.collection, args.home) if exists else None)
    else:
        from caselens.ingest.sources.image_folder import ImageSourceConfig

        source = ImageSource(root=Path(args.images) if args.images else None,
                             manifest=Path(args.manifest) if args.manifest else None,
                             label_from_folder=args.label_from_folder,
                             dicom_options=_dicom_options(args, Collection.open(args.collection, args.home)
                                                          if exists else None),
                             config=ImageSourceConfig(source_paths=named))
    if exists:
        collection = Collection.open(args.collection, args.home)
        collection.check_encoder(encoder.info.to_record())
    else:
        record = encoder.info.to_record()
        if args.dicom or isinstance(source, ImageSource):  # the DICOM window; maxmean: twice the size
            from caselens.ingest.volumes import pooled_record

            options = source.config.options if args.dicom else source.dicom_options
            record = pooled_record(record, source.config.pooling if args.dicom else "mean", options.window)
        collection = Collection.create(args.collection, record, args.home)
        console.print(f"created collection [bold]{args.collection}[/] at {collection.root} with encoder "
                      f"{encoder.info.spec} ({encoder.info.dim}-d, fingerprint {encoder.info.fingerprint})")
    if isinstance(source, ImageSource) or args.dicom:
        source.secret = collection.secret()  # pseudonyms are keyed per collection
    from caselens.ingest.source_paths import apply_source_paths

    mode = apply_source_paths(source, collection)
    if mode != "relative" and not args.quiet:
        console.print(f"input paths are stored {'as keyed hashes' if mode == 'hashed' else 'nowhere'} "
                      f"(--source-paths {mode})", markup=False, highlight=False)
    report = ingest(source, collection, encoder, IngestConfig(batch_size=args.batch_size,
                                                              write_items=args.write_items,
                                                              build_index=not args.no_index,
                                                              progress=not args.quiet))
    console.print(report.summary())
    return 0 if report.accepted or report.duplicates or report.recovered else 1


def _dicom_options(args: argparse.Namespace, existing: Collection | None = None) -> Any:
    from caselens.ingest.sources.dicom import DicomOptions

    stored = existing.encoder.get("window", "auto") if existing is not None else None
    window = args.window or stored or "auto"
    if stored is not None and window != stored:
        raise SourceError(f"collection {existing.name!r} was ingested with --window {stored}; use the same "
                          "window, or a new collection")
    return DicomOptions(window=window, allow_burned_in=args.allow_burned_in)


def _dicom_source(args: argparse.Namespace, existing: Collection | None) -> Any:
    """--dicom: one folder or DICOMDIR (a PACS export), or DICOM/NIfTI files."""
    from caselens.ingest.sources.dicom_source import DicomSource, DicomSourceConfig

    stored = (existing.encoder.get("pooling") or "mean") if existing is not None else None
    pooling = args.pooling or stored or "mean"
    if stored is not None and pooling != stored:
        raise SourceError(f"collection {existing.name!r} holds {stored}-pooled vectors; ingest with "
                          f"--pooling {stored}, or into a new collection")
    if pooling == "maxmean" and args.unit == "instance":
        raise SourceError("--pooling maxmean pools the slices of a series or study: add --unit series or --unit study")
    config = DicomSourceConfig(unit=args.unit, slices=args.slices, pooling=pooling, workers=args.workers,
                               options=_dicom_options(args, existing), source_paths=args.source_paths)
    paths = [Path(p).expanduser() for p in args.dicom]
    if not any(p.exists() for p in paths):  # a typo, not an input to record: nothing given exists
        raise SourceError(f"--dicom: no such file or folder: {', '.join(str(p) for p in paths)}")
    return DicomSource(paths, config=config)  # one or several folders, DICOMDIRs and files


def cmd_scan(args: argparse.Namespace) -> int:
    import secrets as _secrets

    from caselens.ingest.dicom_scan import scan

    if args.collection:
        secret, keyed = Collection.open(args.collection, args.home).secret(), f"collection {args.collection}'s key"
    else:
        secret, keyed = _secrets.token_bytes(32), "a one-off key (give --collection for the ingest pseudonyms)"
    root = Path(args.root).expanduser()
    if not root.exists():
        raise SourceError(f"{root} does not exist; give the folder or DICOMDIR of the export")
    report = scan(root, secret, _dicom_options(args), progress=not args.json)
    summary = report.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    console.print(f"scanned {root}: {summary['files']} files -> {summary['patients']} patients, "
                  f"{summary['studies']} studies, {summary['series']} series, {summary['instances']} DICOM "
                  f"instances ({summary['frames']} frames), {summary['nifti_volumes']} NIfTI volumes, "
                  f"{summary['unreadable']} not usable", markup=False, highlight=False)
    console.print("modalities: " + (", ".join(f"{m} {n}" for m, n in summary["modalities"].items()) or "none"),
                  markup=False)
    for code, n in summary["unreadable_by_reason"].items():
        console.print(f"  not usable {n:>6} x {code}", markup=False)
    table = Table(title=f"series (pseudonyms under {keyed})")
    for col in ("patient", "study", "series", "modality", "instances", "frames"):
        table.add_column(col, overflow="fold")
    for row in summary["series_list"][: args.limit]:
        table.add_row(row["patient"], row["study"][:14] + "…", row["series"][:14] + "…", row["modality"],
                      str(row["instances"]), str(row["frames"]))
    console.print(table)
    return 0


# ------------------------------------------------------------------ search
def _hits_table(result: Any) -> Table:
    table = Table(title=f"{result.collection}: {result.query} ({result.candidates} candidates, "
                        f"{result.milliseconds:.0f} ms)")
    show_modality = any(h.metadata.get("modality") for h in result.hits)
    columns = ["rank", "score", "id", "label"] + (["modality"] if show_modality else []) + ["source"]
    for col in columns:
        table.add_column(col, overflow="fold")
    for h in result.hits:
        label = h.label if h.label is not None else (h.text[:60] + "…" if h.text and len(h.text) > 60 else h.text or "")
        row = [str(h.rank), f"{h.score:.4f}", h.id, label or ""]
        if show_modality:
            row.append(str(h.metadata.get("modality") or ""))
        table.add_row(*row, h.source or "")
    return table


def cmd_search(args: argparse.Namespace) -> int:
    from caselens.retrieval.search import search

    collection = _open(args)
    result = search(collection, image=Path(args.image) if args.image else None, text=args.text, k=args.k,
                    where=args.where, exclude_same=args.exclude_same, mode=args.mode)
    if args.csv:
        from caselens.csv_safe import write_csv

        extra = sorted({k for h in result.hits for k in h.metadata if k != "label"})
        columns = ["rank", "score", "id", "kind", "label", "source", "text", *extra]
        n = write_csv(args.csv, columns, ({"rank": h.rank, "score": h.score, "id": h.id, "kind": h.kind,
                                           "label": h.label, "source": h.source, "text": h.text, **{
                                               k: h.metadata.get(k) for k in extra}} for h in result.hits))
        console.print(f"wrote {n} hits to {args.csv}", markup=False, highlight=False)
    if args.json:
        print(result.to_json())
    elif not args.csv:
        console.print(_hits_table(result))
    return 0


# --------------------------------------------------------------------- ask
def cmd_ask(args: argparse.Namespace) -> int:
    from caselens.retrieval.rag import AskConfig, ask

    knowledge = [Collection.open(name.strip(), args.home) for name in args.collection.split(",") if name.strip()]
    cases = Collection.open(args.cases, args.home) if args.cases else None
    options = _encoder_options(args.option) if args.option else None
    task = args.task or ("mc" if options else "free")
    config = AskConfig(k=args.k, task=task, options=options, where=args.where, min_score=args.min_score,
                       images=not args.no_images)
    with console.status("retrieving and generating…", spinner="dots") if not args.json else _null():
        answer = ask(knowledge, args.question, generator=args.generator, cases=cases,
                     image=Path(args.image) if args.image else None, config=config)
    if args.json:
        print(answer.to_json())
        return 0
    console.print(f"Question: {answer.question}", markup=False, highlight=False)
    console.print(f"Answer (generator: {answer.generator}):", markup=False, highlight=False)
    console.print(answer.answer, markup=False, highlight=False)
    if answer.abstained and answer.raw_answer:
        console.print(f"(generator's text, not shown as an answer: {answer.raw_answer})", markup=False, highlight=False)
    if answer.grounding:
        g = answer.grounding
        console.print(f"citations: {', '.join(g['cited']) or 'none'}; supported sentences: "
                      f"{g['supported_fraction']:.0%}" + (f"; invalid: {g['invalid_citations']}" if g["invalid_citations"] else ""),
                      markup=False, highlight=False)
    console.print("Sources:")
    for c in answer.context:
        text = " ".join(c["text"].split())
        console.print(f"  [{c['key']}] ({c['collection']}, score {c['score']:.3f}): {text[:150]}{'…' if len(text) > 150 else ''}",
                      markup=False, highlight=False)
    if answer.dropped:
        console.print(f"  left out by the token budget: {', '.join(answer.dropped)}", markup=False, highlight=False)
    return 0


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# -------------------------------------------------------------------- eval
def _write_json_out(path: str | None, text: str) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)


def cmd_eval_retrieval(args: argparse.Namespace) -> int:
    from caselens.retrieval.eval.retrieval_eval import evaluate_retrieval

    collection = _open(args)
    result = evaluate_retrieval(collection, args.label_column, args.k, args.exclude_same)
    _write_json_out(args.json_out, result.to_json())
    if args.json:
        print(result.to_json())
        return 0
    metrics = list(result.overall)
    table = Table(title=f"leave-one-out retrieval: {collection.name} ({result.encoder}); "
                        f"{result.n_queries} queries" + (f", excluding same {args.exclude_same}" if args.exclude_same else ""))
    table.add_column("class")
    table.add_column("n", justify="right")
    for m in metrics:
        table.add_column(m, justify="right")
    for cls, vals in result.per_class.items():
        table.add_row(cls, str(int(vals["n"])), *[f"{vals[m]:.3f}" for m in metrics])
    table.add_row("[bold]overall[/]", str(result.n_queries), *[f"[bold]{result.overall[m]:.3f}[/]" for m in metrics])
    console.print(table)
    console.print(f"chance P@{args.k} (class prior): {result.chance_p_at_k:.3f}")
    if args.json_out:
        console.print(f"wrote {args.json_out}")
    return 0


def cmd_eval_text(args: argparse.Namespace) -> int:
    from caselens.retrieval.eval.text_eval import evaluate_text, summary_rows

    collection = _open(args)
    result = evaluate_text(collection, Path(args.questions), modes=args.modes.split(","),
                           tasks=args.tasks.split(",") if args.tasks else None,
                           limit_per_task=args.limit_per_task, progress=not args.json)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(result.to_json())
    if args.json:
        print(result.to_json())
        return 0
    metrics = ("recall@1", "recall@5", "recall@10", "recall@20", "ndcg@10")
    table = Table(title=f"gold-document retrieval: {collection.name} ({result.items} items, {result.documents} "
                        f"documents) with {args.questions}")
    for col in ("task", "mode", "n", *metrics):
        table.add_column(col, justify="right")
    for row in summary_rows(result, metrics):
        table.add_row(row[0], row[1], str(row[2]), *[f"{v:.3f}" for v in row[3:]])
    console.print(table)
    left_out = {t: n for t, n in result.no_gold_in_collection.items() if n}
    if left_out:
        console.print(f"left out (no gold document in the collection): {left_out}")
    if args.json_out:
        console.print(f"wrote {args.json_out}")
    return 0


def cmd_eval_qa(args: argparse.Namespace) -> int:
    from caselens.retrieval.eval.qa_eval import evaluate_qa

    knowledge = [Collection.open(n.strip(), args.home) for n in (args.knowledge or "").split(",") if n.strip()]
    result = evaluate_qa(Path(args.questions), knowledge, args.generator, k=args.k,
                         tasks=args.tasks.split(",") if args.tasks else None, limit_per_task=args.limit_per_task,
                         min_score=args.min_score, closed_book=not args.no_closed_book)
    _write_json_out(args.json_out, result.to_json())
    if args.json:
        print(result.to_json())
        return 0
    table = Table(title=f"QA: {args.questions} with {', '.join(result.knowledge) or 'no retrieval'} "
                        f"(generator: {result.generator}, k={result.k})")
    for col in ("task", "n", "acc closed-book", "acc RAG", "acc answered", f"gold recall@{result.k}", "abstained",
                "citations valid", "s/question"):
        table.add_column(col, justify="right")
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    for t in result.tasks.values():
        table.add_row(t.task, str(t.n), fmt(t.accuracy_closed_book), fmt(t.accuracy_rag), fmt(t.accuracy_answered),
                      fmt(t.gold_recall), fmt(t.abstention_rate), fmt(t.citation_validity), fmt(t.seconds_per_question))
    console.print(table)
    if result.suggested_min_score is not None:
        console.print(f"calibrated abstention threshold (ask --min-score): {result.suggested_min_score:.3f} "
                      f"(Youden J {result.calibration_j:.2f} over questions with gold documents)")
    if args.json_out:
        console.print(f"wrote {args.json_out}")
    return 0


# ------------------------------------------------------------- info & co.
def cmd_info(args: argparse.Namespace) -> int:
    from caselens.indexes.faiss_index import read_stamp

    if not args.collection:
        names = list_collections(args.home)
        console.print(f"collections in {Path(args.home).resolve()}: {', '.join(names) if names else 'none'}")
        return 0
    c = _open(args)
    stamp = read_stamp(c.index_dir)
    info = {"collection": c.name, "path": str(c.root), "items": c.count(), "table_version": c.version,
            "encoder": c.encoder, "columns": c.columns(),
            "faiss_index": None if stamp is None else {**stamp.summary(), "fresh": stamp.table_version == c.version}}
    from caselens.indexes import bm25_index
    from caselens.ingest.chunking import stored_chunking

    bm25 = bm25_index.read_stamp(c.root / bm25_index.FOLDER)
    info["bm25_index"] = None if bm25 is None else {"table_version": bm25.table_version, "n_docs": bm25.n_docs,
                                                    "fresh": bm25.table_version == c.version}
    info["chunking"] = stored_chunking(c) if c.count() else None
    print(json.dumps(info, indent=2))
    return 0


def cmd_ledger(args: argparse.Namespace) -> int:
    c = _open(args)
    rows = c.ledger(args.run)
    if args.status:
        rows = [r for r in rows if r["status"] == args.status]
    if args.csv:
        from caselens.csv_safe import write_csv

        n = write_csv(args.csv, ["run_id", "time", "input", "item_id", "status", "reason_code", "reason"], rows)
        console.print(f"wrote {n} ledger rows to {args.csv}", markup=False, highlight=False)
        return 0
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title=f"ledger of {c.name} ({len(rows)} rows) — {c.ledger_path}")
    for col in ("run_id", "input", "status", "reason_code", "reason"):
        table.add_column(col, overflow="fold")
    for r in rows[-args.limit:]:
        table.add_row(r["run_id"], r["input"], r["status"], r["reason_code"], r["reason"])
    console.print(table)
    return 0


def _choice_config(args: argparse.Namespace) -> Any:
    """A ChoiceConfig from --target-recall / --max-memory / --factory, or None when none given."""
    from caselens.indexes.index_choice import ChoiceConfig, parse_memory

    if args.target_recall is None and args.max_memory is None and not args.factory:
        return None
    config = ChoiceConfig()
    if args.target_recall is not None:
        if not 0 < args.target_recall <= 1:
            raise ValueError(f"--target-recall {args.target_recall}: give a fraction in (0, 1], e.g. 0.95")
        config.target_recall = args.target_recall
    if args.max_memory is not None:
        config.max_memory = parse_memory(args.max_memory)
    if args.factory:
        config.factories = tuple(f.strip() for f in args.factory.split(";") if f.strip())
    return config


def cmd_index(args: argparse.Namespace) -> int:
    c = _open(args)
    config = _choice_config(args)
    stamp = c.build_index(rebuild=True, config=config, progress=not args.quiet) if args.rebuild or config \
        else c.index()[1]
    choice = stamp.choice or {}
    console.print(f"FAISS index of {c.name}: {stamp.factory} {stamp.params or ''}, {stamp.live} vectors, table "
                  f"version {stamp.table_version}, at {c.index_dir}", markup=False, highlight=False)
    if choice.get("recall") is not None:
        console.print(f"  recall@{choice.get('k')} {choice['recall']} (target {choice.get('target_recall')}), "
                      f"p99 {choice.get('p99_ms')} ms, {choice.get('bytes_per_vector')} bytes/vector; "
                      f"{choice.get('reason')}", markup=False, highlight=False)
    return 0


def cmd_optimize(args: argparse.Namespace) -> int:
    c = _open(args)
    report = c.optimize(config=_choice_config(args), force=args.force)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    what = "rebuilt" if report.rebuilt else "kept"
    console.print(f"{c.name}: {what} the FAISS index ({report.factory_before} -> {report.factory_after}); "
                  f"recall before {report.recall_before}, after {report.recall_after}; {report.reason} "
                  f"({report.seconds:.1f} s)", markup=False, highlight=False)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    c = _open(args)
    report = c.verify(repair=args.repair, sample=args.sample)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        console.print(f"{c.name}: {report.items} items, {report.expected} expected from the ledger; "
                      f"missing {report.missing_count}, duplicated {report.duplicated_count}, bad vectors "
                      f"{report.bad_vectors}; self-search {report.self_checked - report.self_missed}/"
                      f"{report.self_checked}", markup=False, highlight=False)
        for problem in report.index_problems:
            console.print(f"  index: {problem}", markup=False, highlight=False)
        for fix in report.repaired:
            console.print(f"  repaired: {fix}", markup=False, highlight=False)
        console.print("OK" if report.ok else "PROBLEMS FOUND" + ("" if args.repair else " (run with --repair)"))
    return 0 if report.ok else 1


def cmd_encoders(args: argparse.Namespace) -> int:
    from caselens.ingest.encoders import available

    for scheme, summary in available().items():
        console.print(f"[bold]{scheme}[/]: {summary}")
    console.print("aliases: hf-hub:ORG/REPO and local-dir:PATH -> open_clip")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from caselens.retrieval.demo import run_demo

    return run_demo(Path(args.home), generator=args.generator)


# ------------------------------------------------------------------ parser
def _add_dicom_read_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("--window", choices=["auto", "file", "percentile", "lung", "mediastinum", "bone", "brain", "abdomen"],
                   help="DICOM grey window: auto (default: the file's, else per modality), file, percentile, or "
                        "a CT preset; a collection keeps its window")
    s.add_argument("--allow-burned-in", action="store_true",
                   help="accept DICOM files marked BurnedInAnnotation=YES (rejected by default)")


def _index_choice_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--target-recall", type=float, help="recall@10 against exact search the index must reach "
                                                      "(default 0.95), measured on held-out vectors")
    s.add_argument("--max-memory", help="memory budget of the index, e.g. 4GB or 512MiB (default: none)")
    s.add_argument("--factory", help="FAISS factory string(s) to try instead of the automatic list, ';'-separated "
                                     "(e.g. 'IVF4096,SQ8' or 'HNSW32')")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="caselens", description="Retrieval engine for medical imaging: "
                                "ingest images, DICOM and texts; search by image or text; answer with citations.")
    p.add_argument("--version", action="version", version=f"caselens {__version__}")
    p.add_argument("--home", default=str(default_home()),
                   help="folder holding the collections (default: $CASELENS_HOME or ./caselens-data)")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens inside")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("ingest", help="add images, DICOM files or a text corpus to a collection")
    s.add_argument("collection")
    s.add_argument("--images", metavar="DIR", help="folder of images and/or DICOM files (read recursively)")
    s.add_argument("--manifest", metavar="CSV", help="CSV with path,label[,patient_id,...]; paths relative to it")
    s.add_argument("--label-from-folder", action="store_true", help="without a manifest: label = parent folder name")
    s.add_argument("--dicom", nargs="+", metavar="PATH", help="DICOM exports (folders or DICOMDIRs: DICOM found by "
                   "its preamble, symlinks refused) and/or DICOM / NIfTI files, one or several")
    s.add_argument("--unit", choices=["instance", "series", "study"], default="instance",
                   help="--dicom: one item per file (default), per series or per study (slices pooled)")
    s.add_argument("--slices", type=int, default=8, help="--dicom series/study units: slices sampled per series (default 8)")
    s.add_argument("--pooling", choices=["mean", "maxmean"],
                   help="--dicom series/study units: mean of the slice vectors (default), or maxmean: their "
                        "max and mean concatenated (twice the size; the collection keeps it)")
    s.add_argument("--workers", type=int, default=0, help="--dicom: decoding processes beside the encoder (default 0)")
    _add_dicom_read_options(s)
    s.add_argument("--text", metavar="FILE", help="JSONL or CSV corpus with id and text, or a folder of .txt/.md files")
    s.add_argument("--id-field", default="id", help="corpus id field (default: id)")
    s.add_argument("--text-field", default="text", help="corpus text field (default: text)")
    s.add_argument("--limit", type=int, help="read at most this many corpus rows")
    s.add_argument("--pdf", metavar="FILE_OR_DIR", help="a PDF, or a folder of PDFs (textbooks, guidelines)")
    s.add_argument("--pdf-items", choices=["chunks", "pages"],
                   help="PDFs as text chunks pointing to their page (default for text encoders) or as page "
                        "images with their text (default for image encoders)")
    s.add_argument("--dpi", type=int, default=100, help="PDF page rendering resolution (default 100)")
    s.add_argument("--no-ocr", action="store_true", help="reject PDF pages without a text layer instead of OCR")
    s.add_argument("--chunk-tokens", type=int, metavar="N",
                   help="text chunk size in the encoder's tokens (default: the encoder's window)")
    s.add_argument("--chunk-overlap", type=int, metavar="N", help="tokens shared by consecutive chunks (default 32)")
    s.add_argument("--encoder", help="encoder name (default: the collection's; new collections: classic for "
                                     "images, sentence-transformers:all-MiniLM-L6-v2 for text)")
    s.add_argument("--encoder-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="encoder option, repeatable (e.g. output=MobilenetV2/Logits/AvgPool)")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--write-items", type=int, default=1024, metavar="N",
                   help="items written to the collection together, or what 5 s brought (default 1024; "
                        "fewer: less work redone after a crash, more table versions)")
    s.add_argument("--source-paths", choices=["relative", "hashed", "none"],
                   help="how input files are named in the table, the ledger and results: relative paths, "
                        "keyed hashes (default for DICOM and manifests with patient_id: folder and file names "
                        "may name patients; images are still found again through the collection's local "
                        "inputs.json), or nothing; a collection keeps its setting")
    s.add_argument("--no-index", action="store_true", help="do not refresh the FAISS index afterwards")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser("scan", help="list what a DICOM export holds (patients, studies, series; pseudonyms only)")
    s.add_argument("root", metavar="DIR", help="folder or DICOMDIR")
    s.add_argument("--collection", help="use this collection's key, so pseudonyms match what ingest stores")
    s.add_argument("--limit", type=int, default=50, help="series rows to show (table output)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_dicom_read_options(s)
    s.set_defaults(func=cmd_scan)

    s = sub.add_parser("search", help="search a collection by image or text")
    s.add_argument("collection")
    q = s.add_mutually_exclusive_group(required=True)
    q.add_argument("--image", metavar="PATH", help="query image or DICOM file")
    q.add_argument("--text", metavar="QUERY", help="query text (needs an encoder with a text tower)")
    s.add_argument("--k", type=int, default=10, help="results to return (default 10)")
    s.add_argument("--where", metavar="SQL", help="filter on metadata columns, e.g. \"modality = 'CT'\"")
    s.add_argument("--exclude-same", metavar="COLUMN", help="drop items sharing the query's value, e.g. patient_id")
    s.add_argument("--mode", choices=["dense", "bm25", "hybrid"], default="dense",
                   help="text queries: dense vectors (default), BM25 keywords, or both fused by reciprocal rank")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument("--csv", metavar="FILE", help="write the hits (and their metadata columns) to a CSV file; "
                                                 "cells that spreadsheets would run as formulas are neutralised")
    s.set_defaults(func=cmd_search)

    s = sub.add_parser("ask", help="answer a question from knowledge collections (and similar cases), with checked citations")
    s.add_argument("collection", help="knowledge collection(s), comma-separated")
    s.add_argument("question")
    s.add_argument("--k", type=int, default=5, help="passages per knowledge collection (default 5)")
    s.add_argument("--cases", metavar="COLLECTION", help="image collection of cases for --image")
    s.add_argument("--image", metavar="PATH", help="query image: similar cases join the context")
    s.add_argument("--task", choices=["free", "yesno", "mc"], help="answer form (default: mc with --option, else free)")
    s.add_argument("--option", action="append", default=[], metavar="LETTER=TEXT", help="a multiple-choice option, repeatable")
    s.add_argument("--min-score", type=float, default=0.25, help="abstain when the best passage scores below this")
    s.add_argument("--generator", default="auto", metavar="NAME",
                   help="auto (Gemma 3 270M when installed, else extractive), gemma, extractive, hf:<model folder>, "
                        "or openai:<base url> for an OpenAI-compatible endpoint (model from $CASELENS_MODEL, "
                        "key from $CASELENS_API_KEY)")
    s.add_argument("--where", metavar="SQL", help="filter passages on metadata columns")
    s.add_argument("--no-images", action="store_true",
                   help="send no case or page images to the generator (for text-only models behind openai:)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_ask)

    s = sub.add_parser("eval", help="evaluate a collection")
    esub = s.add_subparsers(dest="what", required=True)
    e = esub.add_parser("retrieval", help="leave-one-out image-to-image retrieval: P@1, P@k, mAP@k, kNN accuracy")
    e.add_argument("collection")
    e.add_argument("--label-column", default="label")
    e.add_argument("--exclude-same", metavar="COLUMN", help="also leave out items sharing this value (patient_id)")
    e.add_argument("--k", type=int, default=10)
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.add_argument("--json-out", metavar="FILE", help="also write the JSON to FILE")
    e.set_defaults(func=cmd_eval_retrieval)

    e = esub.add_parser("text", help="gold-document retrieval (MIRAGE format): recall@k, nDCG@10 per task and mode")
    e.add_argument("collection")
    e.add_argument("--questions", required=True, metavar="FILE", help="MIRAGE-format JSON whose questions name PMIDs")
    e.add_argument("--modes", default="bm25,dense,hybrid", help="comma-separated search modes (default: all three)")
    e.add_argument("--tasks", help="comma-separated task names (default: every task naming gold ids)")
    e.add_argument("--limit-per-task", type=int, help="only the first N questions of each task")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.add_argument("--json-out", metavar="FILE", help="also write the JSON to FILE")
    e.set_defaults(func=cmd_eval_text)

    e = esub.add_parser("qa", help="question answering (MIRAGE format): accuracy with/without retrieval, gold recall")
    e.add_argument("--questions", required=True, metavar="FILE", help="MIRAGE-format JSON")
    e.add_argument("--knowledge", metavar="COLLECTIONS", help="knowledge collection(s), comma-separated")
    e.add_argument("--generator", default="extractive", metavar="NAME", help="as for `ask` (default extractive)")
    e.add_argument("--k", type=int, default=5)
    e.add_argument("--tasks", help="comma-separated task names (default: all)")
    e.add_argument("--limit-per-task", type=int, help="a fixed random sample of this many questions per task")
    e.add_argument("--min-score", type=float, default=0.25, help="abstention threshold (as for `ask`)")
    e.add_argument("--no-closed-book", action="store_true", help="skip the run without retrieval")
    e.add_argument("--json", action="store_true")
    e.add_argument("--json-out", metavar="FILE")
    e.set_defaults(func=cmd_eval_qa)

    s = sub.add_parser("info", help="list collections, or describe one")
    s.add_argument("collection", nargs="?")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("ledger", help="show what ingest accepted and rejected, with reasons")
    s.add_argument("collection")
    s.add_argument("--run", help="only this run id")
    s.add_argument("--status", choices=["accepted", "duplicate", "rejected"])
    s.add_argument("--limit", type=int, default=50, help="rows to show (table output)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--csv", metavar="FILE", help="write every selected row to a CSV file (formula cells neutralised)")
    s.set_defaults(func=cmd_ledger)

    s = sub.add_parser("index", help="bring the FAISS index up to date (or --rebuild it)")
    s.add_argument("collection")
    s.add_argument("--rebuild", action="store_true", help="choose and build the index again from all vectors")
    _index_choice_args(s)
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_index)

    s = sub.add_parser("optimize", help="compact the table; retrain the index when recall drifted below target")
    s.add_argument("collection")
    s.add_argument("--force", action="store_true", help="rebuild even when recall still meets the target")
    _index_choice_args(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_optimize)

    s = sub.add_parser("verify", help="check ledger, table and FAISS index agree; --repair rebuilds the index")
    s.add_argument("collection")
    s.add_argument("--repair", action="store_true", help="rebuild a damaged or disagreeing index (never drops data)")
    s.add_argument("--sample", type=int, help="items searched for themselves (default: all)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("encoders", help="list encoder schemes")
    s.set_defaults(func=cmd_encoders)

    s = sub.add_parser("demo", help="ingest the bundled demo data, search an image, answer a question")
    s.add_argument("--generator", default="auto", metavar="NAME", help="as for `ask` (default auto)")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (CaselensError, ValueError, KeyError, FileExistsError, ConnectionError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"caselens {args.command}: error: {message}", file=sys.stderr)
        return 2
    except Exception as exc:  # a full disk met by a library (LanceDB, FAISS): a known failure, no traceback
        from caselens.files import disk_full

        if not disk_full(exc):
            raise
        name = getattr(args, "collection", None)
        where = f"collection {name!r} under {args.home}" if name else f"{args.home}"
        print(f"caselens {args.command}: error: {where}: no space left on the device while writing; what was "
              "stored before is intact: free space and run the command again", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
