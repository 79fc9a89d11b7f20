"""Images of retrieved items for vision-language generators: the file a case or page came from,
found again, checked and, where a VLM cannot read it, decoded to a PNG.

Items store their source relative to the folder they were ingested from (or, in collections
with ``--source-paths hashed``, a keyed hash of it, which the collection's local inputs file
maps back); each ingest run notes that folder in the local inputs file
(:mod:`caselens.ingest.inputs`) and the ledger says which runs read an item. For a search hit this module returns a path to a PNG or JPEG
file that shows what the item's vector was computed from:

* image files (image folders, manifests): ``root / source`` itself, once its sha256 is found
  to be the one ingest read (the item id is the content hash); a changed file is refused, with
  a warning naming the item id (never the path). Formats other than 8-bit PNG/JPEG are
  converted as ingest converted them and written to the cache.
* DICOM instances: decoded with the run's own DICOM options (window, percentile, budgets) by
  :func:`caselens.ingest.sources.dicom.decode_frames`, the frame ingest used; series and study
  items: the middle one of the slices ingest sampled (``provenance.chosen``), after the item id
  is recomputed from the sha256 of every member file the ledger lists; NIfTI volumes: the
  middle sampled slice, windowed as ingest did.
* PDF pages (``--pdf-items pages``) and the pages text chunks point to: the page rendered by
  PDFium at the run's resolution.

Decoded and rendered images go to ``<collection>/cache/images/<item id>.png`` and are reused:
item ids are content hashes, so a cached image never goes stale (it may outlive a deleted item).
The cache holds pixels of the collection's own inputs, like the inputs they came from; it is
created readable by the owner only. Items flagged ``burned_in_annotation = YES`` get no image
(the pixels may show identity). Anything that cannot be resolved gives None and a debug log
line, never an exception: a missing image only means the generator sees the text.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from PIL import Image

from caselens.files import atomic_write_bytes, sha256_file
from caselens.ingest.inputs import read_paths, read_runs
from caselens.ingest.items import content_id

log = logging.getLogger(__name__)

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_PASS_THROUGH = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}  # files a VLM endpoint reads as they are


def cache_dir(collection: Any) -> Path:
    """The folder of a collection's decoded and rendered item images."""
    return collection.layout.image_cache_dir


def cache_path(collection: Any, key: str) -> Path:
    """Where the image of item ``key`` is cached (``:`` and ``#`` of ids become ``_``)."""
    return cache_dir(collection) / f"{_SAFE.sub('_', key)[:200]}.png"


def has_image(hit: Any, pages: bool = True) -> bool:
    """True when ``hit`` has an image to find: image items, and (``pages``) text chunks of a PDF page."""
    if hit.kind == "image":
        return True
    prov = hit.provenance or {}
    return pages and prov.get("reader") == "pypdfium2" and prov.get("page") is not None


def item_image(collection: Any, hit: Any) -> str | None:
    """Path to a PNG/JPEG image of ``hit`` (a :class:`caselens.retrieval.search.Hit` of
    ``collection``) for a vision-language generator, or None (see the module docstring)."""
    return item_images(collection, [hit])[0]


def item_images(collection: Any, hits: Sequence[Any], pages: bool = True) -> list[str | None]:
    """:func:`item_image` of each hit (one read of the inputs file and one ledger query for all).
    ``pages``: also the page images of PDF text chunks."""
    out: list[str | None] = [None] * len(hits)
    todo: list[int] = []
    for i, hit in enumerate(hits):
        try:
            if not has_image(hit, pages):
                continue
            if _burned_in(hit):
                log.debug("no image for item %s: flagged burned_in_annotation (pixels may show identity)", hit.id)
                continue
            cached = cache_path(collection, _cache_key(hit))
            if cached.is_file():
                out[i] = str(cached)
            else:
                todo.append(i)
        except Exception as exc:  # noqa: BLE001 - a missing image never fails a question
            log.debug("no image for item %s: %s: %s", getattr(hit, "id", "?"), type(exc).__name__, exc)
    if not todo:
        return out
    resolver = _Resolver(collection, [hits[i].id for i in todo])
    for i in todo:
        hit = hits[i]
        try:
            out[i] = resolver.resolve(hit)
        except Exception as exc:  # noqa: BLE001 - a missing image never fails a question
            log.debug("no image for item %s: %s: %s", hit.id, type(exc).__name__, exc)
    return out


# ---------------------------------------------------------------------------------------- helpers
def _not_found(item_id: str, changed: bool, what: str) -> None:
    """Log why item ``item_id`` has no image: its ``what`` (input file / series files) changed since
    ingest (a warning: the user may want to re-ingest), or was not found (debug). Returns None."""
    if changed:
        log.warning("no image for item %s: its %s changed since it was ingested (content hash differs); "
                    "re-ingest to show it to a vision-language generator", item_id, what)
    else:
        log.debug("no image for item %s: its %s not found under a recorded input root", item_id, what)


def _burned_in(hit: Any) -> bool:
    return str((hit.metadata or {}).get("burned_in_annotation") or "").strip().upper() == "YES"


def _cache_key(hit: Any) -> str:
    """Cache name of a hit's image: the item id, or the page id for PDF pages and their chunks
    (so every chunk of a page shares one rendering)."""
    prov = hit.provenance or {}
    if prov.get("reader") == "pypdfium2" and prov.get("sha256") and prov.get("page") is not None:
        return f"{content_id(prov['sha256'])}#p{int(prov['page'])}"
    return str(hit.id)


def _ledger_rows(collection: Any, ids: Sequence[str]) -> list[dict[str, Any]]:
    """Ledger rows (run_id, item_id, status, input) that stored or met the items ``ids``."""
    return [r for r in collection.ledger(item_ids=list(dict.fromkeys(ids)))
            if r["status"] in ("accepted", "duplicate")]


def _dicom_options(run: dict[str, Any] | None, collection: Any) -> Any:
    """The DICOM options a run read its files with (as recorded), else the collection's window."""
    from caselens.ingest.sources.dicom import DicomOptions

    recorded = (run or {}).get("dicom")
    if isinstance(recorded, dict):
        fields = {k: v for k, v in recorded.items() if k in DicomOptions.__dataclass_fields__}
        if "percentile" in fields:
            fields["percentile"] = tuple(fields["percentile"])
        try:
            return DicomOptions(**fields)
        except (TypeError, ValueError):
            pass
    return DicomOptions(window=collection.encoder.get("window", "auto"))


class _Resolver:
    """Finds the files of a few hits of one collection (see :func:`item_images`)."""

    def __init__(self, collection: Any, ids: Sequence[str]):
        self.collection = collection
        self.runs = read_runs(collection.root)
        self.paths = read_paths(collection.root)  # keyed hash -> relative path (hashed collections)
        self.rows: list[dict[str, Any]] = []
        if self.runs:
            try:
                self.rows = _ledger_rows(collection, ids)
            except Exception as exc:  # noqa: BLE001 - without the ledger every recorded root is tried
                log.debug("ledger of %s unreadable (%s); trying every recorded input root", collection.name, exc)

    # -------------------------------------------------------------- finding files
    def _runs_for(self, item_id: str, kinds: Iterable[str]) -> list[tuple[str, dict[str, Any]]]:
        """(run id, record) of the runs that may hold ``item_id``'s file: those the ledger names
        (stored first, newest first), then every other recorded run of a matching kind."""
        kinds = set(kinds)
        newest_first = [run for run in reversed(self.runs) if self.runs[run].get("kind") in kinds]
        mine = [r for r in self.rows if r["item_id"] == item_id]
        stored = {r["run_id"] for r in mine if r["status"] == "accepted"}
        met = {r["run_id"] for r in mine}
        order = ([run for run in newest_first if run in stored] + [run for run in newest_first if run in met - stored]
                 + [run for run in newest_first if run not in met])
        return [(run, self.runs[run]) for run in order]

    def _real(self, name: str) -> str:
        """The relative path a stored name stands for (itself unless it is a keyed hash)."""
        return self.paths.get(name, name)

    def _candidates(self, hit: Any, rel: str, kinds: Iterable[str]) -> Iterator[tuple[Path, dict[str, Any] | None]]:
        """Paths ``rel`` (a stored name) may be at: itself when absolute (collections of absolute
        sources), else under each recorded root of the runs that may hold the item. Never
        outside a root."""
        rel = self._real(rel)
        if not rel:
            return
        if Path(rel).is_absolute():
            yield Path(rel), None
            return
        if ".." in Path(rel).parts:
            return
        seen: set[Path] = set()
        for _, run in self._runs_for(hit.id, kinds):
            path = Path(run["root"]) / rel
            if path not in seen:
                seen.add(path)
                yield path, run

    def _verified(self, hit: Any, rel: str, sha: str | None, kinds: Iterable[str],
                  same_id: bool = False) -> tuple[Path, dict[str, Any] | None] | None:
        """The first candidate file of ``rel`` whose sha256 is ``sha`` (and, ``same_id``, whose
        content id is the item id), or None; a file found changed is logged by item id."""
        changed = False
        for path, run in self._candidates(hit, rel, kinds):
            if path.is_symlink() or not path.is_file():
                continue
            if sha is None and not same_id:
                if run is None:  # an absolute source without a recorded hash: used as before
                    return path, run
                continue
            digest = sha256_file(path)
            if (sha is None or digest == sha) and (not same_id or content_id(digest) == hit.id):
                return path, run
            changed = True
        return _not_found(hit.id, changed, "input file")

    def _cache(self, hit: Any, image: Image.Image) -> str:
        folder = cache_dir(self.collection)
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        path = cache_path(self.collection, _cache_key(hit))
        atomic_write_bytes(path, buffer.getvalue())
        return str(path)

    # -------------------------------------------------------------- by kind of item
    def resolve(self, hit: Any) -> str | None:
        prov = hit.provenance or {}
        reader, unit = prov.get("reader"), prov.get("unit")
        if reader == "pypdfium2":
            return self._pdf_page(hit, prov)
        if unit in ("series", "study"):
            return self._dicom_unit(hit, prov)
        if reader == "nibabel":
            return self._nifti(hit, prov)
        if reader == "pydicom":
            return self._dicom_instance(hit, prov)
        return self._image_file(hit, prov)

    def _image_file(self, hit: Any, prov: dict[str, Any]) -> str | None:
        rel = str(prov.get("file") or hit.source or "")
        sha = prov.get("sha256")
        found = self._verified(hit, rel, sha, ("images",), same_id=str(hit.id).startswith("sha256:"))
        if found is None:
            return None
        path = found[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if _PASS_THROUGH.get(path.suffix.lower()) == im.format and im.mode in ("L", "RGB"):
                    return str(path)
                im.load()
                image = im.convert("RGB") if im.mode not in ("L", "RGB") else im.copy()  # as ingest read it
        return self._cache(hit, image)

    def _dicom_instance(self, hit: Any, prov: dict[str, Any]) -> str | None:
        from caselens.ingest.sources.dicom import decode_frames

        rel = str(prov.get("file") or hit.source or "")
        found = self._verified(hit, rel, prov.get("sha256"), ("images", "dicom"), same_id=True)
        if found is None:
            return None
        path, run = found
        frame = prov.get("frame")
        frames = [int(frame)] if isinstance(frame, int) else "middle"
        images, _, _ = decode_frames(path, self.collection.secret(), _dicom_options(run, self.collection), frames)
        return self._cache(hit, images[0])

    def _dicom_unit(self, hit: Any, prov: dict[str, Any]) -> str | None:
        """A series or study item: its id recomputed from the member files the ledger lists, then
        the middle of the slices ingest sampled, decoded as ingest decoded it."""
        from caselens.ingest.sources.dicom import decode_frames
        from caselens.ingest.sources.dicom_source import unit_id

        slices: list[tuple[str, Any]] = []
        for chosen in prov.get("chosen") or []:
            frames = chosen.get("frames")
            slices += [(chosen["file"], f) for f in (frames if isinstance(frames, list) else [frames])]
        if not slices:
            return None
        rel, frame = slices[len(slices) // 2]
        rel = self._real(str(rel or ""))
        if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
            return None
        changed = False
        for run_id, run in self._runs_for(hit.id, ("dicom",)):
            members = sorted({self._real(r["input"]) for r in self.rows
                              if r["item_id"] == hit.id and r["run_id"] == run_id})
            root = Path(run["root"])
            if not members or any(".." in Path(m).parts or Path(m).is_absolute() for m in members):
                continue
            paths = [root / m for m in members]
            if any(p.is_symlink() or not p.is_file() for p in paths):
                continue
            options = _dicom_options(run, self.collection)
            digests = [sha256_file(p) for p in paths]
            if unit_id(digests, prov["unit"], int(prov.get("slices_requested") or 0), str(prov.get("pooling")),
                       options.window) != hit.id:
                changed = True
                continue
            frames = [int(frame)] if isinstance(frame, int) else "middle"
            images, _, _ = decode_frames(root / rel, self.collection.secret(), options, frames)
            return self._cache(hit, images[0])
        return _not_found(hit.id, changed, "series files")

    def _nifti(self, hit: Any, prov: dict[str, Any]) -> str | None:
        from caselens.ingest.sources.dicom import WINDOW_PRESETS
        from caselens.ingest.volumes import read_nifti

        found = self._verified(hit, str(prov.get("file") or ""), prov.get("sha256"), ("dicom",))
        if found is None:
            return None
        path, run = found
        options = _dicom_options(run, self.collection)
        window = prov.get("window") if prov.get("window") in WINDOW_PRESETS else options.window
        percentile = (prov["low"], prov["high"]) if "low" in prov and "high" in prov else options.percentile
        images, _ = read_nifti(path, max(1, len(prov.get("slices") or [0])), window, tuple(percentile),
                               options.max_decoded_bytes)
        return self._cache(hit, images[len(images) // 2])

    def _pdf_page(self, hit: Any, prov: dict[str, Any]) -> str | None:
        import pypdfium2 as pdfium

        from caselens.ingest.sources.pdf import render_page

        sha, number = prov.get("sha256"), prov.get("page")
        if not sha or number is None:
            return None
        found = self._verified(hit, str(prov.get("file") or ""), sha, ("pdf",))
        if found is None:
            return None
        path, run = found
        dpi = int(prov.get("dpi") or (run or {}).get("dpi") or 100)
        doc = pdfium.PdfDocument(str(path))
        try:
            page = doc[int(number) - 1]
            try:
                image = render_page(page, dpi)
            finally:
                page.close()
        finally:
            doc.close()
        return self._cache(hit, image)
