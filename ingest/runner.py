"""One library call for an ingest: what the CLI, the Python API, the demo, the notebooks and the
HTTP service all use.

:func:`run_ingest` decides, once, everything an ingest needs before the pipeline runs: which
encoder (the collection's own; for a new collection the one named, else ``classic`` for images
and the packaged MiniLM for text), that it can embed the source's items, the settings a
collection keeps across runs (DICOM window and pooling, text chunking) and refuses to change,
the source built with the collection's own pseudonym key, and the collection created (with its
key) only once all of that checked out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from caselens.errors import SourceError, UnsupportedModalityError
from caselens.indexes.collection import Collection, default_home
from caselens.ingest.chunking import ChunkingError, chunker_for, stored_chunking
from caselens.ingest.encoders import Encoder, load_encoder, load_from_record
from caselens.ingest.encoders.text import DEFAULT_TEXT_ENCODER
from caselens.ingest.pipeline import IngestConfig, IngestReport, ingest
from caselens.ingest.source_paths import check_mode
from caselens.ingest.sources.dicom import DicomOptions
from caselens.ingest.sources.dicom_source import DicomSource, DicomSourceConfig
from caselens.ingest.sources.image_folder import ImageSource, ImageSourceConfig
from caselens.ingest.sources.pdf import PdfOptions, PdfSource
from caselens.ingest.sources.text_corpus import TextCorpusConfig, TextCorpusSource
from caselens.ingest.sources.text_folder import TextFolderConfig, TextFolderSource
from caselens.ingest.volumes import pooled_record

DEFAULT_IMAGE_ENCODER = "classic"


def _paths(value: Any) -> list[Path]:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [Path(value).expanduser()]
    return [Path(v).expanduser() for v in value]


@dataclass
class IngestRequest:
    """What to ingest and how. Give one kind of source per run: images (``images`` folder and/or
    ``manifest``), ``dicom`` (an export folder, a DICOMDIR, or files), ``text`` (a JSONL/CSV
    corpus or a folder of .txt/.md files) or ``pdf`` (a PDF or a folder of them)."""

    images: Path | str | None = None  # folder of images (and DICOM files)
    manifest: Path | str | None = None  # CSV: path,label[,patient_id,...]; paths relative to it
    label_column: str = "label"  # the manifest column holding labels (e.g. "finding")
    text_column: str | None = None  # the manifest column holding each case's report or notes (its text)
    label_from_folder: bool = False  # without a manifest: label = parent folder name
    dicom: list[Path] | Path | str | None = None  # export folder(s), DICOMDIR(s) or DICOM/NIfTI files
    unit: str = "instance"  # DICOM: one item per instance, series or study
    slices: int = 8  # DICOM series/study: slices sampled per series
    pooling: str | None = None  # DICOM series/study: "mean" (default) or "maxmean"; kept by the collection
    workers: int = 0  # DICOM: decoding processes beside the encoder
    window: str | None = None  # DICOM grey window (default "auto"); kept by the collection
    allow_burned_in: bool = False  # DICOM: accept BurnedInAnnotation=YES files
    text: Path | str | None = None  # JSONL/CSV corpus, or a folder of .txt/.md files
    id_field: str = "id"
    text_field: str = "text"
    limit: int | None = None  # read at most this many corpus rows
    pdf: Path | str | None = None  # a PDF or a folder of PDFs
    pdf_items: str | None = None  # "chunks" (text encoders' default) or "pages" (image encoders' default)
    dpi: int = 100
    ocr: bool = True
    chunk_tokens: int | None = None  # text chunk size in the encoder's tokens (default: its window)
    chunk_overlap: int | None = None  # tokens shared by consecutive chunks (default 32)
    encoder: str | None = None  # encoder name (default: the collection's, else by kind)
    encoder_options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 32
    write_items: int = 1024
    build_index: bool = True
    progress: bool = True  # a progress bar on the terminal
    on_progress: Callable[[int, int | None], None] | None = None  # called with (inputs done, inputs expected)
    source_paths: str | None = None  # "relative" | "hashed" | "none": how input files are named
    # (None: the collection's setting, else hashed for DICOM and manifests with patient_id; see ingest.source_paths)
    runner: str = "local"  # "local": this process; "ray": Ray Data tasks and encoder actors (docs/scaling.md)
    address: str | None = None  # runner "ray": None starts a local Ray, "auto" joins the running cluster, ray://...
    encoder_workers: int = 1  # runner "ray": encoder actors, each holding one copy of the model
    gpus_per_worker: float = 0.0  # runner "ray": GPUs per encoder actor

    def __post_init__(self) -> None:
        kinds = [k for k, given in (("images", self.images is not None or self.manifest is not None),
                                    ("dicom", bool(_paths(self.dicom))), ("text", self.text is not None),
                                    ("pdf", self.pdf is not None)) if given]
        if not kinds:
            raise SourceError("say what to ingest: images=DIR and/or manifest=CSV, dicom=PATH..., text=FILE or "
                              "pdf=FILE_OR_DIR")
        if len(kinds) > 1:
            raise SourceError(f"ingest one kind of source per run, not {' and '.join(kinds)}")
        if self.pdf_items not in (None, "chunks", "pages"):
            raise SourceError(f"pdf_items {self.pdf_items!r}: use 'chunks' or 'pages'")
        if self.batch_size < 1 or self.write_items < 1:
            raise SourceError("batch_size and write_items must be at least 1")
        if self.runner not in ("local", "ray"):
            raise SourceError(f"runner {self.runner!r}: use 'local' or 'ray'")
        check_mode(self.source_paths)

    @property
    def source_kind(self) -> str:
        """"images", "dicom", "text" or "pdf"."""
        if self.images is not None or self.manifest is not None:
            return "images"
        if _paths(self.dicom):
            return "dicom"
        return "text" if self.text is not None else "pdf"


def _encoder_for(request: IngestRequest, existing: Collection | None) -> Encoder:
    if request.encoder:
        return load_encoder(request.encoder, request.encoder_options)
    if existing is not None:
        return load_from_record(existing.encoder)
    if request.encoder_options:
        raise SourceError("encoder options were given without an encoder name")
    text_like = request.text is not None or (request.pdf is not None and request.pdf_items == "chunks")
    return load_encoder(DEFAULT_TEXT_ENCODER if text_like else DEFAULT_IMAGE_ENCODER)


def _chunker(request: IngestRequest, encoder: Encoder, existing: Collection | None, notes: list[str]) -> Any:
    """The encoder's tokenizer, size/overlap from the request or, for an existing collection, the
    ones it was chunked with (a different setting is refused)."""
    stored = stored_chunking(existing) if existing is not None and existing.count() else None
    size = request.chunk_tokens if request.chunk_tokens is not None else (stored or {}).get("max_tokens")
    overlap = request.chunk_overlap if request.chunk_overlap is not None else (stored or {}).get("overlap", 32)
    chunker = chunker_for(encoder, size, overlap)
    if stored and chunker is not None and chunker.config.to_record() != stored:
        raise ChunkingError(f"collection {existing.name!r} was chunked with {stored}; ingest with the same "
                            "chunk_tokens/chunk_overlap, or into a new collection")
    if chunker is not None:
        notes.append(f"chunks: at most {chunker.config.max_tokens} tokens of {encoder.info.spec}'s tokenizer, "
                     f"overlap {chunker.config.overlap}")
    return chunker


def _dicom_options(request: IngestRequest, existing: Collection | None) -> DicomOptions:
    stored = existing.encoder.get("window", "auto") if existing is not None else None
    window = request.window or stored or "auto"
    if stored is not None and window != stored:
        raise SourceError(f"collection {existing.name!r} was ingested with window {stored}; use the same "
                          f"window (--window {stored}), or a new collection")
    return DicomOptions(window=window, allow_burned_in=request.allow_burned_in)


def _dicom_source(request: IngestRequest, existing: Collection | None, secret: bytes) -> DicomSource:
    stored = (existing.encoder.get("pooling") or "mean") if existing is not None else None
    pooling = request.pooling or stored or "mean"
    if stored is not None and pooling != stored:
        raise SourceError(f"collection {existing.name!r} holds {stored}-pooled vectors; ingest with pooling "
                          f"{stored} (--pooling {stored}), or into a new collection")
    if pooling == "maxmean" and request.unit == "instance":
        raise SourceError("pooling maxmean pools the slices of a series or study: use unit series or study "
                          "(--unit series)")
    config = DicomSourceConfig(unit=request.unit, slices=request.slices, pooling=pooling, workers=request.workers,
                               options=_dicom_options(request, existing), source_paths=request.source_paths)
    paths = _paths(request.dicom)
    if not any(p.exists() for p in paths):  # a typo, not an input to record: nothing given exists
        raise SourceError(f"dicom: no such file or folder: {', '.join(str(p) for p in paths)}")
    # one or several folders, DICOMDIRs and files (a path that is missing gets its ledger row)
    return DicomSource(paths if len(paths) > 1 else paths[0], secret, config=config)


def _source(request: IngestRequest, encoder: Encoder, existing: Collection | None, secret: bytes,
            notes: list[str]) -> Any:
    kind = request.source_kind
    if kind == "text":
        chunker = _chunker(request, encoder, existing, notes)
        path = Path(request.text).expanduser()
        if path.is_dir():
            return TextFolderSource(path, chunker=chunker, config=TextFolderConfig(source_paths=request.source_paths))
        return TextCorpusSource(path, request.id_field, request.text_field, limit=request.limit, chunker=chunker,
                                config=TextCorpusConfig(source_paths=request.source_paths))
    if kind == "pdf":
        chunker = _chunker(request, encoder, existing, notes) if request.pdf_items == "chunks" else None
        return PdfSource(Path(request.pdf).expanduser(),
                         PdfOptions(items=request.pdf_items, dpi=request.dpi, ocr=request.ocr,
                                    source_paths=request.source_paths), chunker=chunker)
    if kind == "dicom":
        return _dicom_source(request, existing, secret)
    source = ImageSource(root=Path(request.images).expanduser() if request.images is not None else None,
                         manifest=Path(request.manifest).expanduser() if request.manifest is not None else None,
                         secret=secret, label_from_folder=request.label_from_folder,
                         dicom_options=_dicom_options(request, existing), label_column=request.label_column,
                         text_column=request.text_column, config=ImageSourceConfig(source_paths=request.source_paths))
    notes.extend(source.notes)
    return source


def run_ingest(name: str, request: IngestRequest, home: Path | str | None = None) -> IngestReport:
    """Ingest what ``request`` names into the collection ``name`` under ``home`` (created when it
    does not exist, with the encoder chosen as the module docstring says) and bring its derived
    indexes up to date. Returns the run's report; everything the user should know (collection
    created, chunking, manifest notes) is in ``report.notes``."""
    home = Path(home).expanduser() if home is not None else default_home()
    Collection.validate_name(name)
    existing = Collection.open(name, home) if Collection.exists(name, home) else None
    if request.pdf is not None and request.pdf_items is None:  # text chunks for text encoders, pages for image ones
        probe = load_encoder(request.encoder, request.encoder_options) if request.encoder else \
            (load_from_record(existing.encoder) if existing is not None else None)
        request.pdf_items = "pages" if probe is not None and "text" not in probe.info.modalities else "chunks"
    encoder = _encoder_for(request, existing)
    kind = "text" if request.source_kind == "text" or (request.source_kind == "pdf" and request.pdf_items == "chunks") \
        else "image"
    if kind not in encoder.info.modalities:  # refused before a collection is created
        raise UnsupportedModalityError(f"encoder {encoder.info.spec} cannot embed {kind} items; choose an "
                                       f"encoder for {kind}")
    if existing is not None:
        existing.check_encoder(encoder.info.to_record())
    notes: list[str] = []
    if existing is None:  # check the source settings first, then create (the key comes with it)
        record = encoder.info.to_record()
        if request.source_kind in ("images", "dicom"):  # the DICOM window; maxmean: twice the size
            window = _dicom_options(request, None).window
            pooling = (request.pooling or "mean") if request.source_kind == "dicom" else "mean"
            record = pooled_record(record, pooling, window)
        _source(request, encoder, None, os.urandom(32), [])  # validates paths and settings, no side effects
        collection = Collection.create(name, record, home)
        notes.append(f"created collection {name} at {collection.root} with encoder {encoder.info.spec} "
                     f"({encoder.info.dim}-d, fingerprint {encoder.info.fingerprint})")
    else:
        collection = existing
    source = _source(request, encoder, existing, collection.secret(), notes)
    config = IngestConfig(batch_size=request.batch_size, write_items=request.write_items,
                          build_index=request.build_index, progress=request.progress, on_progress=request.on_progress)
    if request.runner == "ray":  # the same stages on a Ray cluster (imported only when asked: Ray is optional)
        from caselens.ingest.ray_runner import RayConfig
        from caselens.ingest.ray_runner import ingest as ray_ingest

        report = ray_ingest(source, collection, encoder, config,
                            RayConfig(address=request.address, encoder_workers=request.encoder_workers,
                                      gpus_per_worker=request.gpus_per_worker))
    else:
        report = ingest(source, collection, encoder, config)
    mode = getattr(getattr(source, "paths", None), "mode", "relative")  # set by the run: ingest.source_paths
    if mode != "relative":
        notes.append(f"input paths are stored {'as keyed hashes' if mode == 'hashed' else 'nowhere'} "
                     f"(source paths {mode}; the collection keeps this setting)")
    report.notes[:0] = notes
    return report
