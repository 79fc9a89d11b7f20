"""The ``caselens`` command: a thin shell over the library (:mod:`caselens.api` and the functions
it uses). It parses arguments, calls one library function per command and prints the result;
it decides nothing on its own.

Every command prints what it did and where. Exit status: 0 success, 1 problems found (``verify``)
or nothing stored (``ingest``), 2 a usage error (a name, an option or an input to fix; one line
names it and the reason), 3 a failure at run time (damaged files, a full disk, an unreachable
endpoint), 70 a bug in caselens (the traceback is printed: please report it).

Heavy modules (LanceDB, FAISS, torch) are imported by the commands that use them, so that
``caselens --help`` starts at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Any, Sequence

from caselens import __version__
from caselens.files import default_home
from caselens.retrieval.tables import hits_table, short_id, table

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_RUNTIME, EXIT_BUG = 0, 1, 2, 3, 70
_CONSOLE: Any = None


def console() -> Any:
    """The rich console commands print to (made on first use)."""
    global _CONSOLE
    if _CONSOLE is None:
        from rich.console import Console

        _CONSOLE = Console()
    return _CONSOLE


def say(text: str) -> None:
    """Print plain text (no markup, no highlighting: values may hold brackets)."""
    console().print(text, markup=False, highlight=False)


def _options(pairs: Sequence[str], flag: str) -> dict[str, str]:
    from caselens.errors import ConfigError

    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {pair!r}: write it as KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def _collection(args: argparse.Namespace, name: str | None = None) -> Any:
    import caselens

    return caselens.open(name or args.collection, args.home)


def _write_json_out(path: str | None, text: str) -> None:
    if path:
        from caselens.files import atomic_write_bytes

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(Path(path), text.encode())
        say(f"wrote {path}")


# ------------------------------------------------------------------ ingest
def cmd_ingest(args: argparse.Namespace) -> int:
    import caselens

    options = dict(label_column=args.label_column, text_column=args.text_column, label_from_folder=args.label_from_folder, unit=args.unit,
                   slices=args.slices, pooling=args.pooling, workers=args.workers, window=args.window,
                   allow_burned_in=args.allow_burned_in, id_field=args.id_field, text_field=args.text_field,
                   limit=args.limit, pdf_items=args.pdf_items, dpi=args.dpi, ocr=not args.no_ocr,
                   chunk_tokens=args.chunk_tokens, chunk_overlap=args.chunk_overlap,
                   encoder_options=_options(args.encoder_opt, "--encoder-opt"), batch_size=args.batch_size,
                   write_items=args.write_items, build_index=not args.no_index, progress=not args.quiet,
                   runner=args.runner, address=args.address, encoder_workers=args.encoder_workers,
                   gpus_per_worker=args.gpus_per_worker, source_paths=args.source_paths)
    collection = caselens.open(args.collection, args.home, create=True)
    report = collection.ingest(images=args.images, manifest=args.manifest, dicom=args.dicom, text=args.text,
                               pdf=args.pdf, encoder=args.encoder, **options)
    say(report.summary())
    return EXIT_OK if report.accepted or report.duplicates else EXIT_PROBLEMS


def cmd_scan(args: argparse.Namespace) -> int:
    import os

    from caselens.errors import SourceError
    from caselens.ingest.dicom_scan import scan
    from caselens.ingest.sources.dicom import DicomOptions
    if args.collection:
        secret, keyed = _collection(args, args.collection).storage.secret(), f"collection {args.collection}'s key"
    else:
        secret, keyed = os.urandom(32), "a one-off key (give --collection for the ingest pseudonyms)"
    root = Path(args.root).expanduser()
    if not root.exists():
        raise SourceError(f"{root} does not exist; give the folder or DICOMDIR of the export")
    report = scan(root, secret, DicomOptions(window=args.window or "auto", allow_burned_in=args.allow_burned_in),
                  progress=not args.json)
    summary = report.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
        return EXIT_OK
    say(f"scanned {root}: {summary['files']} files -> {summary['patients']} patients, {summary['studies']} studies, "
        f"{summary['series']} series, {summary['instances']} DICOM instances ({summary['frames']} frames), "
        f"{summary['nifti_volumes']} NIfTI volumes, {summary['unreadable']} not usable")
    say("modalities: " + (", ".join(f"{m} {n}" for m, n in summary["modalities"].items()) or "none"))
    for code, n in summary["unreadable_by_reason"].items():
        say(f"  not usable {n:>6} x {code}")
    rows = [(r["patient"], short_id(r["study"]), short_id(r["series"]), r["modality"], r["instances"], r["frames"])
            for r in summary["series_list"][: args.limit]]
    console().print(table(f"series (pseudonyms under {keyed})",
                           ("patient", "study", "series", "modality", "instances", "frames"), rows))
    return EXIT_OK


# ------------------------------------------------------------------ search
def cmd_search(args: argparse.Namespace) -> int:
    collection = _collection(args)
    result = collection.search(args.image, text=args.text, id=args.id, k=args.k, where=args.where,
                               exclude_same=args.exclude_same, query_patient=args.query_patient, mode=args.mode)
    if args.csv:
        say(f"wrote {result.to_csv(args.csv)} hits to {args.csv}")
    if args.json:
        print(result.to_json())
    elif not args.csv:
        console().print(hits_table(result))
        if result.hits:
            say("full ids and metadata: add --json")
    return EXIT_OK


# --------------------------------------------------------------------- ask
def cmd_ask(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.collection.split(",") if n.strip()]
    knowledge = [_collection(args, n) for n in names]
    cases = _collection(args, args.cases) if args.cases else None
    options = _options(args.option, "--option") if args.option else None
    task = args.task or ("mc" if options else "free")
    status = console().status(f"loading generator {args.generator} and answering…", spinner="dots") \
        if not args.json else _Quiet()
    with status:
        answer = knowledge[0].ask(args.question, generator=args.generator, also=knowledge[1:], cases=cases,
                                  image=args.image, k=args.k, task=task, options=options, where=args.where,
                                  min_score=args.min_score, images=not args.no_images,
                                  query_patient=args.query_patient)
    if args.json:
        print(answer.to_json())
        return EXIT_OK
    say(f"Question: {answer.question}")
    say(f"Answer (generator: {answer.generator}):")
    say(answer.answer)
    if answer.abstained and answer.raw_answer:
        say(f"(the generator's own text, withheld because it is not grounded: {answer.raw_answer})")
    if answer.grounding:
        g = answer.grounding
        say(f"citations: {', '.join(g['cited']) or 'none'}; supported sentences: {g['supported_fraction']:.0%}"
            + (f"; invalid: {g['invalid_citations']}" if g["invalid_citations"] else ""))
    say("Sources:")
    for c in answer.context:
        text = " ".join(c["text"].split())
        say(f"  [{c['key']}] ({c['collection']}, score {c['score']:.3f}): {text[:150]}{'…' if len(text) > 150 else ''}")
    if answer.dropped:
        say(f"  left out by the token budget: {', '.join(answer.dropped)}")
    return EXIT_OK


class _Quiet:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# -------------------------------------------------------------------- eval
def cmd_eval_retrieval(args: argparse.Namespace) -> int:
    collection = _collection(args)
    if args.folds is not None:
        return _eval_adapted(args, collection)
    with console().status("ranking every labelled item against the rest…") if not args.json else _Quiet():
        result = collection.evaluate(args.label_column, args.k, args.exclude_same)
    _write_json_out(args.json_out, result.to_json())
    if args.json:
        print(result.to_json())
        return EXIT_OK
    metrics = list(result.overall)
    rows = [[cls, int(vals["n"]), *[f"{vals[m]:.3f}" for m in metrics]] for cls, vals in result.per_class.items()]
    rows.append(["overall", result.n_queries, *[f"{result.overall[m]:.3f}" for m in metrics]])
    title = (f"leave-one-out retrieval: {result.collection} ({result.encoder}); {result.n_queries} queries"
             + (f", excluding same {args.exclude_same}" if args.exclude_same else ""))
    console().print(table(title, ["class", "n", *metrics], rows))
    say(f"chance P@{args.k} (class prior): {result.chance_p_at_k:.3f}")
    return EXIT_OK


def _eval_adapted(args: argparse.Namespace, collection: Any) -> int:
    result = collection.evaluate(args.label_column, args.k, folds=args.folds, method=args.method,
                                 progress=None if args.json else say)
    _write_json_out(args.json_out, result.to_json())
    if args.json:
        print(result.to_json())
        return EXIT_OK
    methods = list(result.overall)
    rows = [[cls, int(v.get("n", 0)), f"{v['raw']:.3f}", f"{v['adapted']:.3f}"] for cls, v in result.per_class.items()]
    console().print(table(f"P@{result.k}, {result.folds} folds ({result.fold_protocol}): {result.collection} "
                          f"({result.encoder}); adapter ({result.method}) fitted on each fold's archive only",
                          ["class", "n", "raw", "adapted"], rows))
    say("overall: " + ", ".join(f"{m} {result.overall[m]:.3f} ± {result.fold_se.get(m, 0):.3f}" for m in methods)
        + f"; chance {result.chance_p_at_k:.3f}")
    for fold in result.per_fold:
        say(f"fold {fold['fold']}: chose {fold['chosen']} (raw {fold['raw']:.3f} -> adapted {fold['adapted']:.3f})")
    return EXIT_OK


def cmd_eval_diagnosis(args: argparse.Namespace) -> int:
    collection = _collection(args)
    result = collection.evaluate_diagnosis(args.label_column, args.folds, method=args.method, out_dir=args.out,
                                           progress=None if args.json else say)
    _write_json_out(args.json_out, result.to_json())
    if args.json:
        print(result.to_json())
        return EXIT_OK
    o = result.overall

    def fmt(v: Any) -> str:
        return "–" if v is None else f"{v:.3f}"

    rows = [[cls, v.get("n", ""), fmt(v.get("recall")), fmt(v.get("precision")), fmt(v.get("auc"))]
            for cls, v in result.per_class.items()]
    console().print(table(f"diagnosis by similar cases, {result.folds} folds: {result.collection} ({result.encoder})",
                          ["class", "n", "recall", "precision", "AUC"], rows))
    say(f"accuracy {fmt(o.get('accuracy'))} (chance {fmt(o.get('chance_accuracy'))}), balanced accuracy "
        f"{fmt(o.get('balanced_accuracy'))}, macro AUC {fmt(o.get('macro_auc'))}; calibration error (ECE) "
        f"{fmt(o.get('ece_before'))} -> {fmt(o.get('ece_after'))} after calibration")
    covered = result.coverage.get(f"coverage_at_{result.target_precision:g}_precision")
    if covered is not None:
        say(f"at {result.target_precision:.0%} precision it answers {covered:.1%} of cases "
            f"(confidence threshold {fmt(result.coverage.get('threshold_for_it'))})")
    for path in result.files:
        say(f"wrote {path}")
    return EXIT_OK


def cmd_adapt(args: argparse.Namespace) -> int:
    collection = _collection(args)
    if args.remove:
        removed = collection.remove_adapter()
        say(f"{'removed the adapter of' if removed else 'no adapter to remove in'} {collection.name}; "
            "searches use the raw vectors")
        return EXIT_OK
    out = collection.adapt(args.label_column, args.method, args.folds, progress=None if args.json else say)
    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return EXIT_OK
    say(f"{collection.name}: {out['decision']}")
    say(f"cross-validated P@{out['k']} ({out['folds']} folds, {out['n_labelled']} labelled items, {out['n_classes']} "
        f"classes): raw {out['raw_p_at_k']:.3f} -> {out['chosen']} {out['chosen_p_at_k']:.3f}")
    d = out["diagnosis"]
    say(f"diagnosis: {d['k']} voters, temperature {d['temperature']}, calibration {d['calibrator']}, abstains below "
        f"{'–' if d['threshold'] is None else format(d['threshold'], '.2f')}")
    say(f"index rebuilt ({out['index']['factory']}, {out['dim']} dimensions); stored in {collection.path / 'adapter'}")
    return EXIT_OK


def cmd_diagnose(args: argparse.Namespace) -> int:
    collection = _collection(args)
    knowledge = [_collection(args, n.strip()) for n in (args.knowledge or "").split(",") if n.strip()]
    result = collection.diagnose(args.image or args.dicom, id=args.id, k=args.k, query_patient=args.query_patient,
                                 knowledge=knowledge)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
        return EXIT_OK
    head = f"diagnosis: {result.label}" if not result.abstained else f"no diagnosis (abstained): {result.reason}"
    say(f"{head}; most probable {result.top_label} at {result.confidence:.2f}")
    rows = [[label, f"{p:.3f}", f"{result.uncalibrated.get(label, 0):.3f}"] for label, p in result.probabilities.items()]
    console().print(table("label probabilities (calibrated; the vote before calibration)",
                          ["label", "probability", "vote"], rows))
    rows = [[c.key, c.label or "–", f"{c.similarity:.3f}", f"{c.weight:.3f}", c.metadata.get("modality") or "–"]
            for c in result.supporting]
    console().print(table(f"supporting cases (k={result.k}; the query's patient left out)",
                          ["case", "label", "similarity", "vote share", "modality"], rows))
    for p in result.passages:
        say(f"[{p.key}] ({', '.join(p.candidates)}) {p.text[:160]}")
    return EXIT_OK


def cmd_eval_text(args: argparse.Namespace) -> int:
    from caselens.retrieval.eval.text_eval import evaluate_text, summary_rows

    storage = _collection(args).storage
    result = evaluate_text(storage, Path(args.questions), modes=args.modes.split(","),
                           tasks=args.tasks.split(",") if args.tasks else None,
                           limit_per_task=args.limit_per_task, progress=not args.json)
    _write_json_out(args.json_out, result.to_json())
    if args.json:
        print(result.to_json())
        return EXIT_OK
    metrics = ("recall@1", "recall@5", "recall@10", "recall@20", "ndcg@10")
    rows = [[r[0], r[1], r[2], *[f"{v:.3f}" for v in r[3:]]] for r in summary_rows(result, metrics)]
    console().print(table(f"gold-document retrieval: {storage.name} ({result.items} items, {result.documents} "
                           f"documents) with {args.questions}", ["task", "mode", "n", *metrics], rows))
    left_out = {t: n for t, n in result.no_gold_in_collection.items() if n}
    if left_out:
        say(f"left out (no gold document in the collection): {left_out}")
    return EXIT_OK


def cmd_eval_qa(args: argparse.Namespace) -> int:
    from caselens.retrieval.eval.qa_eval import evaluate_qa

    knowledge = [_collection(args, n.strip()).storage for n in (args.knowledge or "").split(",") if n.strip()]
    result = evaluate_qa(Path(args.questions), knowledge, args.generator, k=args.k,
                         tasks=args.tasks.split(",") if args.tasks else None, limit_per_task=args.limit_per_task,
                         min_score=args.min_score, closed_book=not args.no_closed_book)
    _write_json_out(args.json_out, result.to_json())
    if args.json:
        print(result.to_json())
        return EXIT_OK

    def fmt(v: float | None) -> str:
        return "–" if v is None else f"{v:.3f}"

    rows = [[t.task, t.n, fmt(t.accuracy_closed_book), fmt(t.accuracy_rag), fmt(t.accuracy_answered),
             fmt(t.gold_recall), fmt(t.abstention_rate), fmt(t.citation_validity), fmt(t.seconds_per_question)]
            for t in result.tasks.values()]
    console().print(table(f"QA: {args.questions} with {', '.join(result.knowledge) or 'no retrieval'} "
                           f"(generator: {result.generator}, k={result.k})",
                           ["task", "n", "acc closed-book", "acc RAG", "acc answered", f"gold recall@{result.k}",
                            "abstained", "citations valid", "s/question"], rows))
    if result.suggested_min_score is not None:
        say(f"calibrated abstention threshold (ask --min-score): {result.suggested_min_score:.3f} "
            f"(Youden J {result.calibration_j:.2f} over questions with gold documents)")
    return EXIT_OK


# ------------------------------------------------------------- info & co.
def cmd_info(args: argparse.Namespace) -> int:
    import caselens

    if not args.collection:
        names = caselens.collections(args.home)
        if args.json:
            print(json.dumps({"home": str(Path(args.home).resolve()), "collections": names}, indent=2))
        else:
            say(f"collections in {Path(args.home).resolve()}: {', '.join(names) if names else 'none'}")
        return EXIT_OK
    info = _collection(args).info()
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    enc = info["encoder"]
    say(f"collection {info['collection']} at {info['path']}")
    say(f"  items        {info['items']} (table version {info['table_version']})")
    say(f"  encoder      {enc['spec']} ({enc['dim']}-d, {', '.join(enc.get('modalities', []))}; fingerprint "
        f"{enc['fingerprint']})" + (f"; pooling {enc['pooling']}" if enc.get("pooling") else "")
        + (f"; DICOM window {enc['window']}" if enc.get("window") else ""))
    meta = [c for c in info["columns"] if c not in ("id", "_row", "kind", "vector", "source", "text", "provenance")]
    say(f"  metadata     {', '.join(meta)}")
    fx = info["faiss_index"]
    say("  FAISS index  none (searches rank exactly; build one with `caselens index`)" if fx is None else
        f"  FAISS index  {fx['factory']}, {fx.get('live', fx.get('ntotal'))} vectors, table version "
        f"{fx['table_version']} ({'fresh' if fx['fresh'] else 'behind: newer rows are ranked exactly'})")
    bm = info["bm25_index"]
    if bm is not None:
        say(f"  BM25 index   {bm['n_docs']} texts, table version {bm['table_version']} "
            f"({'fresh' if bm['fresh'] else 'behind'})")
    if info.get("chunking"):
        say(f"  chunking     {info['chunking']}")
    say("the whole record: add --json")
    return EXIT_OK


LEDGER_CSV_COLUMNS = ("run_id", "time", "input", "item_id", "status", "reason_code", "reason", "runs", "last_run",
                      "last_time")


def cmd_ledger(args: argparse.Namespace) -> int:
    collection = _collection(args)
    rows = collection.ledger(args.run, args.status)
    if args.csv:
        from caselens.csv_safe import write_csv

        n = write_csv(args.csv, LEDGER_CSV_COLUMNS, rows)
        say(f"wrote {n} ledger rows to {args.csv}")
        return EXIT_OK
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    shown = rows[-args.limit:]
    out = table(f"ledger of {collection.name}: {len(rows)} rows (one per input and outcome)"
                + (f", the last {len(shown)}" if len(shown) < len(rows) else ""),
                   ("first run", "input", "status", "item", "runs", "reason"),
                   [(r["run_id"], r["input"] if len(r["input"]) <= 48 else "…" + r["input"][-47:], r["status"],
                     short_id(r["item_id"]) if r["item_id"] else "",
                     str(r.get("runs") or 1) + (f" (last {r['last_run']})" if r.get("last_run") not in (None, r["run_id"])
                                                 else ""),
                     f"{r['reason_code']}: {r['reason']}" if r["reason_code"] else "") for r in shown],
                   wrap=("reason",))
    console().print(out)
    say(f"ledger table: {collection.storage.ledger_path}")
    return EXIT_OK


def _choice_config(args: argparse.Namespace) -> Any:
    """A ChoiceConfig from --target-recall / --max-memory / --factory, or None when none given."""
    from caselens.errors import ConfigError
    from caselens.indexes.index_choice import ChoiceConfig, parse_memory

    if args.target_recall is None and args.max_memory is None and not args.factory:
        return None
    config = ChoiceConfig()
    if args.target_recall is not None:
        if not 0 < args.target_recall <= 1:
            raise ConfigError(f"--target-recall {args.target_recall}: give a fraction in (0, 1], e.g. 0.95")
        config.target_recall = args.target_recall
    if args.max_memory is not None:
        config.max_memory = parse_memory(args.max_memory)
    if args.factory:
        config.factories = tuple(f.strip() for f in args.factory.split(";") if f.strip())
    return config


def cmd_index(args: argparse.Namespace) -> int:
    collection = _collection(args)
    stamp = collection.index(rebuild=args.rebuild, config=_choice_config(args), progress=not args.quiet)
    choice = stamp.get("choice") or {}
    say(f"FAISS index of {collection.name}: {stamp['factory']} {stamp.get('params') or ''}, {stamp['live']} vectors, "
        f"table version {stamp['table_version']}, at {collection.storage.layout.faiss_dir}")
    if choice.get("recall") is not None:
        say(f"  recall@{choice.get('k')} {choice['recall']} (target {choice.get('target_recall')}), p99 "
            f"{choice.get('p99_ms')} ms, {choice.get('bytes_per_vector')} bytes/vector; {choice.get('reason')}")
    return EXIT_OK


def cmd_optimize(args: argparse.Namespace) -> int:
    from caselens.indexes import derived

    storage = _collection(args).storage
    report = derived.optimize(storage, config=_choice_config(args), force=args.force)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return EXIT_OK
    what = "rebuilt" if report.rebuilt else "kept"
    say(f"{storage.name}: {what} the FAISS index ({report.factory_before} -> {report.factory_after}); recall before "
        f"{report.recall_before}, after {report.recall_after}; {report.reason} ({report.seconds:.1f} s)")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from caselens.errors import ConfigError

    if args.reingest and not args.repair:
        raise ConfigError("--reingest goes with --repair: `caselens verify NAME --repair --reingest`")
    collection = _collection(args)
    report = collection.verify(repair=args.repair, sample=args.sample, reingest=args.reingest)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_verify(collection.name, report, args.repair)
    ok = report["ok"] if "after_reingest" not in report else report["after_reingest"]["ok"] and not (
        report["index_problems"] or report["table_problems"] or report["ledger_problems"])
    return EXIT_OK if ok else EXIT_PROBLEMS


def _some(ids: list[str], total: int, shown: int = 5) -> str:
    """A few short ids, and how many more (the full ids are in --json)."""
    text = ", ".join(short_id(i) for i in ids[:shown])
    return text + (f" and {total - min(shown, len(ids))} more (--json for the full ids)" if total > shown else "")


def _print_verify(name: str, report: dict[str, Any], repaired: bool) -> None:
    say(f"{name}: {report['items']} items (table version {report['table_version']}), {report['expected']} expected "
        f"from the ledger ({report['ledger_rows']} rows); missing {report['missing_count']}, duplicated "
        f"{report['duplicated_count']}, phantom {report['phantom_count']}, bad vectors {report['bad_vectors']}, "
        f"checksum mismatches {report['checksum_mismatches']}; self-search "
        f"{report['self_checked'] - report['self_missed']}/{report['self_checked']}")
    if report["index_compared"]:
        say(f"  index copy: {report['index_compared']} vectors compared ({'exact' if report['index_exact'] else 'decoded'}), "
            f"{report['index_mismatches']} differ")
    lines = [("table", p) for p in report["table_problems"]]
    if report["checksum_mismatch_ids"]:
        lines.append(("rows that do not match their checksum",
                      _some(report["checksum_mismatch_ids"], report["checksum_mismatches"])))
    lines += [("ledger", p) for p in report["ledger_problems"]] + [("index", p) for p in report["index_problems"]]
    if report["missing"]:
        lines.append(("missing", _some(report["missing"], report["missing_count"])))
    if report["phantoms"]:
        lines.append(("phantoms (stored, no accepted ledger row)", _some(report["phantoms"], report["phantom_count"])))
    lines += [("note", n) for n in report["notes"]] + [("repaired", r) for r in report["repaired"]]
    for label, text in lines:
        say(f"  {label}: {text}")
    if report["lost_count"]:
        say(f"  lost: {report['lost_count']} rows had no good copy")
    for step in report.get("reingest", []):
        what = f"run {step['run_id']} ({step['kind'] or 'no recorded input'}): {step['items']} missing item(s)"
        say(f"  to ingest again: {what}" + ("" if step["possible"] else f"; {step['reason']}"))
    for done in report.get("reingested", []):
        say(f"  re-ingested run {done['run_id']} as run {done['new_run']}: {done['accepted']} accepted, "
            f"{done['duplicates']} already present, {done['rejected']} rejected")
    after = report.get("after_reingest")
    if after is not None:
        say(f"  after re-ingest: {after['items']} items, missing {after['missing_count']}, phantom {after['phantom_count']}")
        say("OK" if after["ok"] else "PROBLEMS REMAIN")
        return
    if report["ok"]:
        say("OK")
    elif repaired:
        possible = any(s["possible"] for s in report.get("reingest", []))
        say("PROBLEMS REMAIN" + (f" (ingest the missing items again: caselens verify {name} --repair --reingest)"
                                 if possible else ""))
    else:
        say(f"PROBLEMS FOUND (run `caselens verify {name} --repair`)")


def cmd_encoders(args: argparse.Namespace) -> int:
    from caselens.ingest.encoders import available

    for scheme, summary in available().items():
        say(f"{scheme}: {summary}")
    say("aliases: hf-hub:ORG/REPO and local-dir:PATH -> open_clip")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from caselens.demo import run_demo

    return run_demo(Path(args.home), generator=args.generator)


# ------------------------------------------------------- serve & token (caselens.serve)
def cmd_serve(args: argparse.Namespace) -> int:
    from caselens.serve import ServeConfig, run_server

    config = ServeConfig(home=Path(args.home), host=args.host, port=args.port,
                         collections=tuple(n.strip() for n in (args.collections or "").split(",") if n.strip()),
                         auth=not args.no_auth, cors_origins=tuple(args.cors_origin),
                         allowed_hosts=tuple(args.allowed_host), max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
                         max_image_pixels=args.max_pixels, rate_per_second=args.rate_limit, rate_burst=args.rate_burst,
                         search_threads=args.threads, encoder_threads=args.encoder_threads,
                         generator=args.generator, ingest_roots=tuple(Path(p) for p in args.ingest_root),
                         access_log=Path(args.access_log) if args.access_log else None)
    return run_server(config)


def cmd_token(args: argparse.Namespace) -> int:
    from caselens.serve import token_command

    return token_command(Path(args.home), args.action, getattr(args, "name", None), getattr(args, "scope", "read"))


def _add_serve_parsers(sub: Any) -> None:
    s = sub.add_parser("serve", help="HTTP API and web case viewer (FastAPI); loopback and tokens by default")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--collections", metavar="A,B", help="collections to load at start-up (others load on first use)")
    s.add_argument("--no-auth", action="store_true", help="no tokens (loopback demos only; refused on other addresses)")
    s.add_argument("--cors-origin", action="append", default=[], metavar="URL",
                   help="browser origin allowed to call the API, repeatable (default: none)")
    s.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="Host header accepted, repeatable (default: loopback names on a loopback bind, else any)")
    s.add_argument("--max-upload-mb", type=float, default=32.0, help="request body limit in MiB (default 32)")
    s.add_argument("--max-pixels", type=int, default=64_000_000,
                   help="decoded pixel values an uploaded image may have (default 64M)")
    s.add_argument("--rate-limit", type=float, default=20.0, help="requests/s per token (default 20; 0: off)")
    s.add_argument("--rate-burst", type=int, default=60, help="requests a token may make at once (default 60)")
    s.add_argument("--generator", default="auto", metavar="NAME", help="generator of /api/ask, as for `ask`")
    s.add_argument("--threads", type=int, default=0, help="requests computed at once (default 0: one per core)")
    s.add_argument("--encoder-threads", type=int, default=1,
                   help="threads of one encoder call (default 1: requests run side by side; 0: torch's default)")
    s.add_argument("--ingest-root", action="append", default=[], metavar="DIR",
                   help="folder whose subfolders ingest jobs may read, repeatable (default: none, jobs refused)")
    s.add_argument("--access-log", metavar="FILE", help="append the access log (JSON lines, no PHI) here; default stderr")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("token", help="API tokens of `caselens serve` (stored hashed in <home>/tokens.json)")
    tsub = s.add_subparsers(dest="action", required=True)
    t = tsub.add_parser("create", help="make a token and print it once")
    t.add_argument("name")
    t.add_argument("--scope", choices=["read", "write"], default="read",
                   help="read: search, ask, view (default); write: also start ingest jobs")
    tsub.add_parser("list", help="token names, scopes and creation times (never the tokens)")
    t = tsub.add_parser("revoke", help="remove a token")
    t.add_argument("name")
    s.set_defaults(func=cmd_token)
# ------------------------------------------------------- end of serve & token


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
                                "ingest images, DICOM and texts; search by image or text; diagnose from similar "
                                "cases; answer with citations.",
                                epilog="exit status: 0 ok, 1 problems found / nothing stored, 2 usage error, "
                                       "3 runtime failure, 70 a bug in caselens")
    p.add_argument("--version", action="version", version=f"caselens {__version__}")
    p.add_argument("--home", default=str(default_home()),
                   help="folder holding the collections (default: $CASELENS_HOME or ./caselens-data)")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens inside")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("ingest", help="add images, DICOM files, a text corpus or PDFs to a collection")
    s.add_argument("collection")
    s.add_argument("--images", metavar="DIR", help="folder of images and/or DICOM files (read recursively)")
    s.add_argument("--manifest", metavar="CSV", help="CSV with path,label[,patient_id,...]; paths relative to it")
    s.add_argument("--label-column", default="label", metavar="NAME",
                   help="the manifest column holding labels (default: label), e.g. finding")
    s.add_argument("--text-column", metavar="NAME", help="the manifest column holding each case's report or notes: "
                   "stored as the item's text (keyword-searchable, and the case's context for `ask --cases`)")
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
    s.add_argument("--no-index", action="store_true", help="do not refresh the FAISS and BM25 indexes afterwards "
                                                          "(searches rank the new rows exactly until `caselens index`)")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.add_argument("--runner", choices=["local", "ray"], default="local",
                   help="local: this process (default); ray: Ray Data tasks and encoder actors, Lance fragments "
                        "written in parallel (pip install 'caselens[ray]'; docs/scaling.md)")
    s.add_argument("--address", help="--runner ray: 'auto' (the running cluster), 'ray://host:port' or host:port "
                                     "(default: start a local Ray)")
    s.add_argument("--encoder-workers", type=int, default=1, metavar="N",
                   help="--runner ray: encoder actors, each holding one copy of the model (default 1)")
    s.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="G",
                   help="--runner ray: GPUs per encoder actor (default 0: CPU)")
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser("scan", help="list what a DICOM export holds (patients, studies, series; pseudonyms only)")
    s.add_argument("root", metavar="DIR", help="folder or DICOMDIR")
    s.add_argument("--collection", help="use this collection's key, so pseudonyms match what ingest stores")
    s.add_argument("--limit", type=int, default=50, help="series rows to show (table output)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_dicom_read_options(s)
    s.set_defaults(func=cmd_scan)

    s = sub.add_parser("search", help="search a collection by image, text or item id")
    s.add_argument("collection")
    q = s.add_mutually_exclusive_group(required=True)
    q.add_argument("--image", metavar="PATH", help="query image, DICOM file, or a folder of one DICOM series or study")
    q.add_argument("--text", metavar="QUERY", help="query text (needs an encoder with a text tower)")
    q.add_argument("--id", metavar="ITEM_ID", help="a stored item: its nearest other items")
    s.add_argument("--k", type=int, default=10, help="results to return (default 10)")
    s.add_argument("--where", metavar="SQL", help="filter on metadata columns, e.g. \"modality = 'CT'\"")
    s.add_argument("--exclude-same", metavar="COLUMN", help="drop items sharing the query's value, e.g. patient_id")
    s.add_argument("--query-patient", metavar="ID", help="the patient of an outside query image, for "
                   "--exclude-same patient_id (pseudonymised with the collection's key, never stored)")
    s.add_argument("--mode", choices=["dense", "bm25", "hybrid"], default="dense",
                   help="text queries: dense vectors (default; score: cosine), BM25 keywords (score: BM25), or both "
                        "fused by reciprocal rank (score: RRF)")
    s.add_argument("--json", action="store_true", help="print JSON (full ids, metadata, provenance) instead of a table")
    s.add_argument("--csv", metavar="FILE", help="write the hits (and their metadata columns) to a CSV file; "
                                                 "cells that spreadsheets would run as formulas are neutralised")
    s.set_defaults(func=cmd_search)

    s = sub.add_parser("ask", help="answer a question from knowledge collections (and similar cases), with checked citations")
    s.add_argument("collection", help="knowledge collection(s), comma-separated")
    s.add_argument("question")
    s.add_argument("--k", type=int, default=5, help="passages per knowledge collection (default 5)")
    s.add_argument("--cases", metavar="COLLECTION", help="image collection of cases for --image")
    s.add_argument("--image", metavar="PATH", help="query image: similar cases join the context (never the image "
                   "itself, nor its patient's other images when the patient is known)")
    s.add_argument("--query-patient", metavar="ID", help="the patient of an outside --image, so that their other "
                   "images are left out of the similar cases (pseudonymised with the collection's key)")
    s.add_argument("--task", choices=["free", "yesno", "mc"], help="answer form (default: mc with --option, else free)")
    s.add_argument("--option", action="append", default=[], metavar="LETTER=TEXT", help="a multiple-choice option, repeatable")
    s.add_argument("--min-score", type=float, default=0.25, help="abstain when the best passage scores below this")
    s.add_argument("--generator", default="extractive", metavar="NAME",
                   help="extractive (default: quotes the sources, always grounded), gemma (packaged Gemma 3 270M base "
                        "model), auto (gemma when installed), hf:<model folder>, or openai:<base url> for an "
                        "OpenAI-compatible endpoint (model from $CASELENS_MODEL, key from $CASELENS_API_KEY)")
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
    e.add_argument("--folds", type=int, metavar="N",
                   help="raw vs adapted P@k over N patient-disjoint folds, the adapter fitted on each fold's archive only")
    e.add_argument("--method", default="auto", help="adapter method with --folds (auto, whiten, lda, metric, raw)")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.add_argument("--json-out", metavar="FILE", help="also write the JSON to FILE")
    e.set_defaults(func=cmd_eval_retrieval)

    e = esub.add_parser("diagnosis", help="diagnosis by similar cases, cross-validated: accuracy, AUC, calibration, "
                                          "coverage, per class and subgroup")
    e.add_argument("collection")
    e.add_argument("--label-column", default="label")
    e.add_argument("--folds", type=int, default=5)
    e.add_argument("--method", default="auto", help="adapter method (auto, whiten, lda, metric, raw)")
    e.add_argument("--out", metavar="DIR", help="write diagnosis_eval.json, diagnosis_eval_roc.png and "
                                                "diagnosis_eval_reliability.png there")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.add_argument("--json-out", metavar="FILE", help="also write the JSON to FILE")
    e.set_defaults(func=cmd_eval_diagnosis)

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

    s = sub.add_parser("adapt", help="fit an adapter and a diagnosis model on the collection's labels (chosen by "
                                     "cross-validation) and rebuild its index in the adapted space")
    s.add_argument("collection")
    s.add_argument("--label-column", default="label")
    s.add_argument("--method", default="auto", help="auto (chosen by cross-validation; keeps the raw vectors when "
                                                    "nothing beats them), whiten, lda, metric or raw")
    s.add_argument("--folds", type=int, default=5, help="patient-disjoint cross-validation folds")
    s.add_argument("--remove", action="store_true", help="remove the adapter and diagnosis model instead")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_adapt)

    s = sub.add_parser("diagnose", help="label probabilities for an image from the collection's similar cases "
                                        "(after `caselens adapt`)")
    s.add_argument("collection")
    q = s.add_mutually_exclusive_group(required=True)
    q.add_argument("--image", metavar="PATH")
    q.add_argument("--dicom", metavar="PATH", help="a DICOM file, or a folder of one series or study (pooled as "
                                                   "ingest pools them)")
    q.add_argument("--id", metavar="ITEM_ID", help="a stored item (itself and its patient left out)")
    s.add_argument("--k", type=int, help="voters (default: the number chosen by cross-validation)")
    s.add_argument("--query-patient", metavar="ID", help="the query's patient id, whose cases are left out")
    s.add_argument("--knowledge", metavar="COLLECTIONS", help="text collections (comma-separated) to find guideline "
                                                             "passages for the top candidates in")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_diagnose)

    s = sub.add_parser("info", help="list collections, or describe one")
    s.add_argument("collection", nargs="?")
    s.add_argument("--json", action="store_true", help="the whole record as JSON")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("ledger", help="show what ingest accepted and rejected, with reasons (one row per input and "
                                      "outcome, with the runs that met it)")
    s.add_argument("collection")
    s.add_argument("--run", help="only the rows this run was the first or the last to meet")
    s.add_argument("--status", choices=["accepted", "duplicate", "rejected", "deleted"])
    s.add_argument("--limit", type=int, default=50, help="rows to show (table output)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--csv", metavar="FILE", help="write every selected row to a CSV file (formula cells neutralised)")
    s.set_defaults(func=cmd_ledger)

    s = sub.add_parser("index", help="bring the FAISS and BM25 indexes up to date (or --rebuild)")
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

    s = sub.add_parser("verify", help="check every table file and row checksum, that ledger, table and FAISS index "
                                      "agree; --repair rebuilds what is damaged from good copies")
    s.add_argument("collection")
    s.add_argument("--repair", action="store_true",
                   help="replace damaged table or ledger files by the good copies of their rows (older versions, the "
                        "index), record phantoms, rebuild a damaged or disagreeing index; nothing is deleted, and "
                        "what had no good copy is listed by run")
    s.add_argument("--reingest", action="store_true",
                   help="with --repair: read the recorded input of each run that lost items again (only the "
                        "missing items are stored)")
    s.add_argument("--sample", type=int, help="items searched for themselves (default: all)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("encoders", help="list encoder schemes")
    s.set_defaults(func=cmd_encoders)

    s = sub.add_parser("demo", help="ingest the bundled demo data, search an image, answer a question, write a report")
    s.add_argument("--generator", default="extractive", metavar="NAME", help="as for `ask` (default extractive)")
    s.set_defaults(func=cmd_demo)
    _add_serve_parsers(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from caselens.errors import CaselensError

    try:
        return int(args.func(args) or 0)
    except CaselensError as exc:
        print(f"caselens {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except FileExistsError as exc:
        print(f"caselens {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ConnectionError, TimeoutError) as exc:
        print(f"caselens {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except OSError as exc:  # a full disk, a permission, a vanished file: the system's own words
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"caselens {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        print(f"caselens {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug: show it, say so, exit apart from user errors
        from caselens.files import disk_full

        if disk_full(exc):  # a full disk met inside a library (LanceDB, FAISS): a known failure, no traceback
            name = getattr(args, "collection", None)
            print(f"caselens {args.command}: error: {f'collection {name!r}: ' if name else ''}no space left on the "
                  "device while writing; what was stored before is intact: free space and run the command again",
                  file=sys.stderr)
            return EXIT_RUNTIME
        traceback.print_exc()
        print(f"caselens {args.command}: internal error (a bug in caselens {__version__}); please report it "
              "with the traceback above", file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
