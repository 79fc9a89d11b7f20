"""The ``caselens`` command: a thin layer over the library functions.

Every command prints what it did and where; errors print one line naming the input and the
reason, and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
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
def cmd_ingest(args: argparse.Namespace) -> int:
    from caselens.ingest.pipeline import IngestConfig, ingest
    from caselens.ingest.sources import ImageSource, TextCorpusSource
    from caselens.retrieval.encoders import load_encoder, load_from_record
    from caselens.retrieval.encoders.text import DEFAULT_TEXT_ENCODER

    given = [x for x in (args.images, args.manifest, args.dicom, args.text) if x]
    if not given:
        raise SourceError("say what to ingest: --images DIR [--manifest CSV], --dicom FILE..., or --text FILE")
    if args.text and (args.images or args.manifest or args.dicom):
        raise SourceError("ingest images and texts into separate collections (one run, one kind)")
    kind = "text" if args.text else "image"
    exists = Collection.exists(args.collection, args.home)
    if args.encoder:
        encoder = load_encoder(args.encoder, _encoder_options(args.encoder_opt))
    elif exists:
        encoder = load_from_record(Collection.open(args.collection, args.home).encoder)
    else:
        encoder = load_encoder("classic" if kind == "image" else DEFAULT_TEXT_ENCODER)
    if kind not in encoder.info.modalities:  # refuse before a collection is created
        raise UnsupportedModalityError(f"encoder {encoder.info.spec} cannot embed {kind} items")
    if args.text:
        source: Any = TextCorpusSource(Path(args.text), args.id_field, args.text_field, limit=args.limit)
    elif args.dicom:
        files = [Path(p).expanduser().resolve() for p in args.dicom]
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise SourceError(f"--dicom: no such file(s): {', '.join(missing)}")
        source = ImageSource(root=Path(os.path.commonpath([str(f.parent) for f in files])), files=files)
    else:
        source = ImageSource(root=Path(args.images) if args.images else None,
                             manifest=Path(args.manifest) if args.manifest else None,
                             label_from_folder=args.label_from_folder)
    if exists:
        collection = Collection.open(args.collection, args.home)
        collection.check_encoder(encoder.info.to_record())
    else:
        collection = Collection.create(args.collection, encoder.info.to_record(), args.home)
        console.print(f"created collection [bold]{args.collection}[/] at {collection.root} with encoder "
                      f"{encoder.info.spec} ({encoder.info.dim}-d, fingerprint {encoder.info.fingerprint})")
    if isinstance(source, ImageSource):
        source.secret = collection.secret()  # pseudonyms are keyed per collection
    report = ingest(source, collection, encoder, IngestConfig(batch_size=args.batch_size,
                                                              build_index=not args.no_index,
                                                              progress=not args.quiet))
    console.print(report.summary())
    return 0 if report.accepted or report.duplicates else 1


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
                    where=args.where, exclude_same=args.exclude_same)
    if args.json:
        print(result.to_json())
    else:
        console.print(_hits_table(result))
    return 0


# --------------------------------------------------------------------- ask
def cmd_ask(args: argparse.Namespace) -> int:
    from caselens.retrieval.rag import AskConfig, ask

    knowledge = [Collection.open(name.strip(), args.home) for name in args.collection.split(",") if name.strip()]
    cases = Collection.open(args.cases, args.home) if args.cases else None
    options = _encoder_options(args.option) if args.option else None
    task = args.task or ("mc" if options else "free")
    config = AskConfig(k=args.k, task=task, options=options, where=args.where, min_score=args.min_score)
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
def cmd_eval_retrieval(args: argparse.Namespace) -> int:
    from caselens.retrieval.eval.retrieval_eval import evaluate_retrieval

    collection = _open(args)
    result = evaluate_retrieval(collection, args.label_column, args.k, args.exclude_same)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(result.to_json())
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
            "faiss_index": None if stamp is None else {**stamp.__dict__, "fresh": stamp.table_version == c.version}}
    print(json.dumps(info, indent=2))
    return 0


def cmd_ledger(args: argparse.Namespace) -> int:
    c = _open(args)
    rows = c.ledger(args.run)
    if args.status:
        rows = [r for r in rows if r["status"] == args.status]
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


def cmd_index(args: argparse.Namespace) -> int:
    c = _open(args)
    stamp = c.build_index() if args.rebuild else c.index()[1]
    console.print(f"FAISS index of {c.name}: {stamp.factory}, {stamp.ntotal} vectors, table version "
                  f"{stamp.table_version}, at {c.index_dir}")
    return 0


def cmd_encoders(args: argparse.Namespace) -> int:
    from caselens.retrieval.encoders import available

    for scheme, summary in available().items():
        console.print(f"[bold]{scheme}[/]: {summary}")
    console.print("aliases: hf-hub:ORG/REPO and local-dir:PATH -> open_clip")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from caselens.retrieval.demo import run_demo

    return run_demo(Path(args.home), generator=args.generator)


# ------------------------------------------------------------------ parser
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
    s.add_argument("--dicom", nargs="+", metavar="FILE", help="single DICOM files")
    s.add_argument("--text", metavar="FILE", help="JSONL or CSV corpus with id and text")
    s.add_argument("--id-field", default="id", help="corpus id field (default: id)")
    s.add_argument("--text-field", default="text", help="corpus text field (default: text)")
    s.add_argument("--limit", type=int, help="read at most this many corpus rows")
    s.add_argument("--encoder", help="encoder name (default: the collection's; new collections: classic for "
                                     "images, sentence-transformers:all-MiniLM-L6-v2 for text)")
    s.add_argument("--encoder-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="encoder option, repeatable (e.g. output=MobilenetV2/Logits/AvgPool)")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--no-index", action="store_true", help="do not refresh the FAISS index afterwards")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser("search", help="search a collection by image or text")
    s.add_argument("collection")
    q = s.add_mutually_exclusive_group(required=True)
    q.add_argument("--image", metavar="PATH", help="query image or DICOM file")
    q.add_argument("--text", metavar="QUERY", help="query text (needs an encoder with a text tower)")
    s.add_argument("--k", type=int, default=10, help="results to return (default 10)")
    s.add_argument("--where", metavar="SQL", help="filter on metadata columns, e.g. \"modality = 'CT'\"")
    s.add_argument("--exclude-same", metavar="COLUMN", help="drop items sharing the query's value, e.g. patient_id")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
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

    s = sub.add_parser("info", help="list collections, or describe one")
    s.add_argument("collection", nargs="?")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("ledger", help="show what ingest accepted and rejected, with reasons")
    s.add_argument("collection")
    s.add_argument("--run", help="only this run id")
    s.add_argument("--status", choices=["accepted", "duplicate", "rejected"])
    s.add_argument("--limit", type=int, default=50, help="rows to show (table output)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_ledger)

    s = sub.add_parser("index", help="bring the FAISS index up to date (or --rebuild it)")
    s.add_argument("collection")
    s.add_argument("--rebuild", action="store_true")
    s.set_defaults(func=cmd_index)

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


if __name__ == "__main__":
    sys.exit(main())
