"""A PACS export (folder or DICOMDIR of DICOM files, NIfTI volumes) as a source of items.

Units of retrieval (:attr:`DicomSourceConfig.unit`):

* ``instance`` — one item per DICOM file (its middle frame); id = content hash of the file.
* ``series`` — one item per series: slices sampled evenly along the ordered series (or along the
  frames of a multi-frame file), embedded and pooled; id = hash of the member files' hashes and
  the slice/pooling choice. Every file of the series gets its ledger row under that id.
* ``study`` — one item per study: the sampled slices of each of its series, pooled per series,
  then averaged.

NIfTI files (``.nii``, ``.nii.gz``) are volumes in every unit: sampled and pooled the same way.

Decoding runs in ``workers`` processes while the caller (the ingest pipeline) encodes, with a
bounded number of files in flight (:attr:`DicomSourceConfig.prefetch` files and about
:attr:`DicomSourceConfig.prefetch_bytes` of decoded pixels ahead of the encoder: enough that the
workers keep decoding through a run of large images the encoder is slow on); results come
back in input order, so a re-run after a kill meets the same items in the same order and skips
the ones already stored.
"""

from __future__ import annotations

import copy
import hashlib
import multiprocessing
import os
from collections import OrderedDict
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from caselens.errors import ConfigError, SourceError
from caselens.ingest.deid import check_key
from caselens.ingest.dicom_scan import (InstanceHeader, common_base, header_of, is_nifti, order_slices, walk_inputs,
                                        walk_many)
from caselens.ingest.items import Item, Rejection, content_id, sha256_file
from caselens.ingest.source_paths import PathNamer, check_mode
from caselens.ingest.sources.dicom import DicomOptions, DicomReadError, decode_frames, exit_with_parent, is_dicom
from caselens.ingest.volumes import POOLINGS, UNITS, NiftiReadError, Volume, read_nifti, sample_indices


@dataclass(frozen=True)
class DicomSourceConfig:
    """How a DICOM export becomes items."""

    unit: str = "instance"  # "instance", "series" or "study"
    slices: int = 8  # slices sampled per series / NIfTI volume (series and study units)
    pooling: str = "mean"  # "mean" or "maxmean" (concatenated max and mean: twice the dimension)
    workers: int = 0  # decoding processes running beside the encoder (0: decode in this process)
    worker_memory_bytes: int = 6 << 30  # address space each worker may add while decoding (0: unbounded)
    prefetch: int = 512  # with workers: files decoded ahead of the encoder at most (plus 4 per worker)
    prefetch_bytes: int = 2 << 30  # ... and about this many bytes of their pixels (0: no bound; see ordered_map)
    options: DicomOptions = field(default_factory=DicomOptions)  # windowing, budgets, burned-in policy
    max_files: int = 2_000_000  # files of one run at most; the rest are rejected together (too_many_files)
    source_paths: str | None = None  # "relative" | "hashed" | "none"; None: the collection's (hashed for new ones)

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ConfigError(f"unit {self.unit!r} is not known; choose one of {', '.join(UNITS)}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling {self.pooling!r} is not known; choose one of {', '.join(POOLINGS)}")
        if self.slices < 1:
            raise ConfigError(f"slices must be at least 1, not {self.slices}")
        if self.workers < 0:
            raise ConfigError(f"workers must be 0 or more, not {self.workers}")
        if self.prefetch < 1 or self.prefetch_bytes < 0:
            raise ConfigError(f"prefetch must be at least 1 and prefetch_bytes 0 or more, not "
                             f"{self.prefetch} and {self.prefetch_bytes}")
        if self.max_files < 1:
            raise ConfigError(f"max_files must be at least 1, not {self.max_files}")
        check_mode(self.source_paths)


def unit_id(digests: list[str], unit: str, slices: int, pooling: str, window: str) -> str:
    """Item id of a series, study or NIfTI volume: a hash of its files' sha256 digests and of the
    choices that shape its vector (unit, slices sampled, pooling, DICOM window)."""
    h = hashlib.sha256()
    h.update(f"{unit}|{slices}|{pooling}|{window}".encode())
    for d in sorted(digests):
        h.update(d.encode())
    return content_id(h.hexdigest())


# ------------------------------------------------------------------ worker tasks (top level: picklable)
def _instance_task(path: str, rel: str, secret: bytes, options: DicomOptions) -> Item | Rejection:
    """One file -> one instance item (or a rejection)."""
    p = Path(path)
    try:
        if p.stat().st_size == 0:
            return Rejection(rel, "empty_file", "file is empty")
    except OSError as exc:
        return Rejection(rel, "unreadable", f"cannot read file: {exc.strerror or exc}")
    try:
        images, meta, prov = decode_frames(p, secret, options, "middle")
    except DicomReadError as exc:
        if exc.code == "corrupt_dicom" and not is_dicom(p):  # no preamble and no recognisable header
            return Rejection(rel, "not_dicom", "not a DICOM file (no DICM preamble, no recognisable header)")
        return Rejection(rel, exc.code, str(exc))
    prov = {"file": rel, "unit": "instance", **prov}  # prov["sha256"]: hash of the bytes decoded
    return Item(id=content_id(prov["sha256"]), kind="image", input=rel, source=rel, image=images[0],
                metadata=meta, provenance=prov)


def _slices_task(path: str, rel: str, secret: bytes, options: DicomOptions,
                 frames: Any) -> tuple[list, dict, dict] | Rejection:
    """Frames of one file of a series -> (images, metadata, provenance) or a rejection."""
    try:
        return decode_frames(Path(path), secret, options, frames)
    except DicomReadError as exc:
        return Rejection(rel, exc.code, str(exc))


def _nifti_task(path: str, rel: str, n_slices: int, options: DicomOptions) -> tuple[list, dict] | Rejection:
    try:
        return read_nifti(Path(path), n_slices, options.window, options.percentile, options.max_decoded_bytes)
    except NiftiReadError as exc:
        return Rejection(rel, exc.code, str(exc))
    except Exception as exc:  # never a crash on odd input
        return Rejection(rel, "corrupt_nifti", f"NIfTI file could not be read ({type(exc).__name__})")


def _worker_init(memory_bytes: int = 0, parent: int = 0) -> None:
    """Decoding process setup: Ctrl-C is the parent's to handle; the address space may grow by
    at most ``memory_bytes`` beyond what the process holds now (0: no bound), so a decoder that
    runs away fails with MemoryError (a ``too_large`` rejection) instead of exhausting the host;
    the worker ends when the ``parent`` process is gone (a killed ingest leaves no orphans)."""
    import resource
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if parent:
        exit_with_parent(parent)
    if memory_bytes > 0:
        try:
            with open("/proc/self/statm") as fh:
                baseline = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            resource.setrlimit(resource.RLIMIT_AS, (baseline + memory_bytes, resource.RLIM_INFINITY))
        except (OSError, ValueError):  # not Linux, or not allowed: the header budget still holds
            pass


def _task_failed(task: tuple, exc: BaseException) -> Rejection:
    """A task whose worker died (a decoder crash) or raised: a rejection of its file, not a crash."""
    rel = task[1] if len(task) > 1 else "?"
    return Rejection(str(rel), "decoder_crashed", f"the decoding process failed on this file ({type(exc).__name__})")


def _pixel_bytes(result: Any) -> int:
    """Bytes of decoded pixels a task result holds (an item's image and slices, a slices task's
    images); 0 for rejections and anything else."""
    if isinstance(result, Item):
        images = [result.image, *(result.volume.slices if result.volume is not None else [])]
    elif isinstance(result, tuple) and result and isinstance(result[0], list):
        images = result[0]
    else:
        return 0
    return sum(im.width * im.height * len(im.getbands()) for im in images if hasattr(im, "getbands"))


def ordered_map(fn: Callable[..., Any], tasks: Iterable[tuple], workers: int, window: int = 64,
                memory_bytes: int = 0, window_bytes: int = 0) -> Iterator[Any]:
    """``fn(*task)`` for each task, in order; with ``workers`` > 0 they run in that many processes,
    at most ``window`` tasks ahead of the consumer (the encoder keeps running meanwhile) and, when
    ``window_bytes`` > 0, at most as many as results the size of the largest so far fit in
    ``window_bytes`` (so results waiting for the consumer hold about that many bytes of pixels at
    most). A task whose worker dies gives a ``decoder_crashed`` rejection and the pool is
    restarted."""
    if workers <= 0:
        for task in tasks:
            yield fn(*task)
        return
    from concurrent.futures.process import BrokenProcessPool

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["caselens.ingest.sources.dicom_source"])

    def new_pool() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                                   initargs=(memory_bytes, os.getpid()))

    pending: OrderedDict[int, tuple[tuple, Future]] = OrderedDict()
    # With a pixel budget, the window holds as many tasks as results the size of the largest one
    # taken so far fit in it (16 MiB assumed until one is seen): tasks handed to the pool are
    # all decoded, whether or not the consumer is taking results meanwhile.
    largest = 0

    def room() -> bool:
        cap = max(window, 2 * workers)
        if window_bytes > 0:
            cap = min(cap, max(2 * workers, window_bytes // (largest or 16 << 20)))
        return len(pending) < cap

    restarts, max_restarts = 0, 20
    pool = new_pool()
    try:
        it = iter(tasks)
        n = 0
        exhausted = False
        while True:
            while not exhausted and room():
                try:
                    task = next(it)
                except StopIteration:
                    exhausted = True
                    break
                pending[n] = (task, pool.submit(fn, *task))
                n += 1
            if not pending:
                return
            _, (task, future) = pending.popitem(last=False)
            try:
                result = future.result()
            except BrokenProcessPool as exc:
                restarts += 1
                if restarts > max_restarts:
                    raise SourceError(f"decoding processes keep dying ({restarts} times); run again with "
                                      "--workers 0 to decode in the main process") from None
                result = _task_failed(task, exc)
                pool.shutdown(wait=False, cancel_futures=True)
                pool = new_pool()  # the others in flight were innocent: run them again
                for key, (other, _) in list(pending.items()):
                    pending[key] = (other, pool.submit(fn, *other))
            except Exception as exc:  # noqa: BLE001 - a task error is a rejection of that file
                result = _task_failed(task, exc)
            if window_bytes > 0:
                largest = max(largest, _pixel_bytes(result))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class DicomSource:
    """Items from a DICOM export (see the module docstring): one folder or DICOMDIR, several
    folders / DICOMDIRs / files (``root`` a list; named relative to their common folder), or
    ``files`` under ``root``."""

    kind = "image"
    pseudonymised_patients = True  # DICOM headers name patients: their ids are pseudonymised

    def __init__(self, root: Path | Sequence[Path], secret: bytes, config: DicomSourceConfig | None = None,
                 files: list[Path] | None = None):
        roots = [Path(p).expanduser() for p in root] if isinstance(root, (list, tuple)) else [Path(root).expanduser()]
        if not roots:
            raise SourceError("give a DICOM folder, DICOMDIR or files")
        self.roots = roots
        self.root = roots[0] if len(roots) == 1 else common_base(roots)
        self.secret = check_key(secret)  # the collection's key: every pseudonym is keyed by it
        self.config = config or DicomSourceConfig()
        self.files = files
        self._inputs: list[tuple[Path, str] | Rejection] | None = None
        self._where: dict[str, tuple[Path, str]] = {}  # stored name -> (file, relative path)
        self.paths = PathNamer()  # how files are named in the collection; set for it by the runner

    @property
    def source_paths(self) -> str | None:
        return self.config.source_paths

    @property
    def paths(self) -> PathNamer:
        """How files are named in the collection (set for it by the runner; the inputs are then
        walked and named again)."""
        return self._paths

    @paths.setter
    def paths(self, namer: PathNamer) -> None:
        old = getattr(self, "_paths", None)
        self._paths = namer
        if old is None or old.mode != namer.mode or (old.secret and old.secret != namer.secret):
            self._inputs = None  # named otherwise now: walked and named again
            self._where = {}

    @property
    def base(self) -> Path:
        """The folder relative to which inputs are named."""
        if len(self.roots) > 1:
            return self.root
        root = self.root.resolve()
        return root.parent if root.is_file() else root

    def input_record(self) -> dict[str, Any]:
        """The folder its inputs are named relative to, and how they were read (unit, slices,
        pooling, DICOM options), for the collection's local inputs file
        (:mod:`caselens.ingest.inputs`; never an index column)."""
        from dataclasses import asdict

        cfg = self.config
        inputs = self.inputs()  # names every file: a hashed collection's map is complete before the run
        several = {"roots": [str(r.resolve()) for r in self.roots]} if len(self.roots) > 1 else {}
        return {"kind": "dicom", "root": str(self.base), **several, "unit": cfg.unit, "slices": cfg.slices,
                "pooling": cfg.pooling, "dicom": asdict(cfg.options), "files": len(inputs), **self.paths.record()}

    def inputs(self) -> list[tuple[Path, str] | Rejection]:
        """The walked inputs (cached), under the names the collection stores (see ``paths``):
        (path, name) or rejections (symlinks, outside root...); past ``max_files``, one
        ``too_many_files`` rejection for the rest."""
        if self._inputs is None:
            one = self.roots[0]
            single = len(self.roots) == 1 and (one.is_dir() or one.name.upper() == "DICOMDIR")
            walked = walk_inputs(self.root, self.files) if self.files is not None or single else walk_many(self.roots)
            out: list[tuple[Path, str] | Rejection] = []
            for entry in walked:
                if len(out) >= self.config.max_files:
                    out.append(Rejection(".", "too_many_files", f"the export holds more than {self.config.max_files} "
                                         "files; the rest are not read (ingest it in parts)"))
                    break
                if isinstance(entry, Rejection):
                    out.append(Rejection(self.paths.name(entry.input), entry.reason_code, entry.reason))
                    continue
                path, rel = entry
                name = self.paths.name(rel)
                self._where[name] = (path, rel)
                out.append((path, name))
            self._inputs = out
        return self._inputs

    def _clean(self, entry: Item | Rejection) -> Item | Rejection:
        """A rejection whose reason may quote an error message, with any path in it replaced by
        the file's stored name; with ``source_paths`` "none", items without a source or file."""
        if isinstance(entry, Item) and self.paths.mode == "none":
            entry.source = None
            entry.provenance = {**entry.provenance, "file": None}
            if isinstance(entry.provenance.get("chosen"), list):
                entry.provenance["chosen"] = [{**c, "file": None} for c in entry.provenance["chosen"]]
            return entry
        if isinstance(entry, Rejection) and entry.input in self._where:
            path, rel = self._where[entry.input]
            reason = self.paths.clean(entry.reason, path, rel)
            if reason != entry.reason:
                return Rejection(entry.input, entry.reason_code, reason)
        return entry

    def estimate(self) -> int | None:
        return len(self.inputs())

    def __iter__(self) -> Iterator[Item | Rejection]:
        for entry in self._items():
            yield self._clean(entry)

    def _items(self) -> Iterator[Item | Rejection]:
        inputs = self.inputs()
        if not inputs:
            yield Rejection(".", "empty_source", "folder holds no files; nothing to ingest")
            return
        for entry in inputs:
            if isinstance(entry, Rejection):
                yield entry
        files = [e for e in inputs if not isinstance(e, Rejection)]
        window = self.config.prefetch + 4 * self.config.workers
        if self.config.unit == "instance":
            volumes = [(p, r) for p, r in files if is_nifti(p)]
            tasks = ((str(p), r, self.secret, self.config.options) for p, r in files if not is_nifti(p))
            yield from ordered_map(_instance_task, tasks, self.config.workers, window, self.config.worker_memory_bytes,
                                   self.config.prefetch_bytes)
            yield from self._nifti_items(volumes, 1)
            return
        yield from self._volume_items(files, window)

    # ------------------------------------------------------------ volumes
    def _nifti_items(self, volumes: list[tuple[Path, str]], n_slices: int) -> Iterator[Item | Rejection]:
        tasks = ((str(p), r, n_slices, self.config.options) for p, r in volumes)
        results = ordered_map(_nifti_task, tasks, self.config.workers, 8, self.config.worker_memory_bytes,
                              self.config.prefetch_bytes)
        for (path, rel), result in zip(volumes, results):
            if isinstance(result, Rejection):
                yield result
                continue
            images, prov = result
            try:
                digest = sha256_file(path)
            except OSError as exc:
                yield Rejection(rel, "unreadable", f"cannot read file: {exc.strerror or exc}")
                continue
            unit = "instance" if n_slices == 1 else "volume"
            yield Item(id=self._unit_id([digest], unit), kind="image", input=rel, source=rel, image=images[0],
                       volume=Volume(images, [], self.config.pooling) if n_slices > 1 else None,
                       metadata={"modality": None},
                       provenance={"file": rel, "sha256": digest, "unit": unit, "pooling": self.config.pooling
                                   if n_slices > 1 else None, **prov})

    def _unit_id(self, digests: list[str], unit: str) -> str:
        return unit_id(digests, unit, self.config.slices, self.config.pooling, self.config.options.window)

    def read_headers(self, files: list[tuple[Path, str]]) -> list[InstanceHeader | Rejection]:
        """The de-identified headers of ``files`` (path, relative name), or why each cannot be read."""
        return [header_of(path, rel, self.secret, self.config.options) for path, rel in files]

    def unit_plans(self, headers: list[InstanceHeader]) -> list[tuple]:
        """Series or study units of ``headers``, in order of first appearance: for each, its key,
        its series (ordered instances) and the slices to decode ``(header, frames, series index)``."""
        cfg = self.config
        series: OrderedDict[tuple[str, str, str], list[InstanceHeader]] = OrderedDict()
        for h in headers:
            series.setdefault((h.patient, h.study, h.series), []).append(h)
        units: OrderedDict[tuple, list[list[InstanceHeader]]] = OrderedDict()
        for key, members in series.items():
            unit_key = key if cfg.unit == "series" else key[:2]
            units.setdefault(unit_key, []).append(order_slices(members))
        # plan: which file and which frames each slice comes from
        plans: list[tuple[tuple, list[list[InstanceHeader]], list[tuple[InstanceHeader, Any, int]]]] = []
        for key, groups in units.items():
            picks: list[tuple[InstanceHeader, Any, int]] = []
            for g, members in enumerate(groups):
                if len(members) == 1 and members[0].frames > 1:
                    picks.append((members[0], sample_indices(members[0].frames, cfg.slices), g))
                else:
                    picks.extend((members[i], "middle", g) for i in sample_indices(len(members), cfg.slices))
            plans.append((key, groups, picks))
        return plans

    def _volume_items(self, files: list[tuple[Path, str]], window: int) -> Iterator[Item | Rejection]:
        cfg = self.config
        headers: list[InstanceHeader] = []
        nifti = [(path, rel) for path, rel in files if is_nifti(path)]
        for found in self.read_headers([(path, rel) for path, rel in files if not is_nifti(path)]):
            if isinstance(found, Rejection):
                yield found
            else:
                headers.append(found)
        plans = self.unit_plans(headers)
        tasks = ((str(h.path), h.rel, self.secret, cfg.options, frames)
                 for _, _, picks in plans for h, frames, _ in picks)
        results = ordered_map(_slices_task, tasks, cfg.workers, window, cfg.worker_memory_bytes, cfg.prefetch_bytes)
        for key, groups, picks in plans:
            decoded = [(pick, next(results)) for pick in picks]
            yield from self._assemble(key, groups, decoded)
        yield from self._nifti_items(nifti, cfg.slices)

    # ------------------------------------------------------------ parts (distributed ingest)
    def parts(self, size: int, headers: list[InstanceHeader | Rejection] | None = None) -> list[dict[str, Any]]:
        """The inputs in the order :meth:`__iter__` reads them, in groups of about ``size`` files
        (series and study units: ``size // slices`` units), for readers elsewhere
        (:meth:`read_part`). Series and study units need the headers of the DICOM files
        (:meth:`read_headers` of :meth:`dicom_files`, in order); read here when not given."""
        inputs = self.inputs()
        if not inputs:
            return [{"rejects": [(".", "empty_source", "folder holds no files; nothing to ingest")]}]
        size = max(1, size)
        rejected = [(r.input, r.reason_code, r.reason) for r in inputs if isinstance(r, Rejection)]
        parts: list[dict[str, Any]] = [{"rejects": rejected}] if rejected else []
        files = [e for e in inputs if not isinstance(e, Rejection)]
        nifti = [(str(p), r) for p, r in files if is_nifti(p)]
        if self.config.unit == "instance":
            dicom = [(str(p), r) for p, r in files if not is_nifti(p)]
            parts += [{"instances": dicom[i:i + size]} for i in range(0, len(dicom), size)]
            parts += [{"nifti": nifti[i:i + size], "slices": 1} for i in range(0, len(nifti), size)]
            return parts
        if headers is None:
            headers = self.read_headers(self.dicom_files())
        bad = [(h.input, h.reason_code, h.reason) for h in headers if isinstance(h, Rejection)]
        if bad:
            parts.append({"rejects": bad})
        plans = self.unit_plans([h for h in headers if not isinstance(h, Rejection)])
        per = max(1, size // self.config.slices)
        parts += [{"units": plans[i:i + per]} for i in range(0, len(plans), per)]
        parts += [{"nifti": nifti[i:i + per], "slices": self.config.slices} for i in range(0, len(nifti), per)]
        return parts

    def dicom_files(self) -> list[tuple[Path, str]]:
        """The DICOM files among the inputs (not NIfTI, not rejected), in order."""
        return [e for e in self.inputs() if not isinstance(e, Rejection) and not is_nifti(e[0])]

    def read_part(self, part: dict[str, Any]) -> Iterator[Item | Rejection]:
        """Items and rejections of one group of :meth:`parts`, in order (decoded in this process),
        named as :meth:`__iter__` names them."""
        for entry in self._read_part(part):
            yield self._clean(entry)

    def _read_part(self, part: dict[str, Any]) -> Iterator[Item | Rejection]:
        opts = self.config.options
        for rejection in part.get("rejects", ()):
            yield Rejection(*rejection)
        for path, rel in part.get("instances", ()):
            yield _instance_task(path, rel, self.secret, opts)
        for key, groups, picks in part.get("units", ()):
            decoded = [(pick, _slices_task(str(pick[0].path), pick[0].rel, self.secret, opts, pick[1]))
                       for pick in picks]
            yield from self._assemble(key, groups, decoded)
        if part.get("nifti"):
            yield from self._nifti_items([(Path(p), r) for p, r in part["nifti"]], part["slices"])

    def part_reader(self) -> "DicomSource":
        """A copy that reads parts in its own process: no decoding workers, no input list and no
        secret (set ``secret`` on it where it runs; its path naming takes the key then). It keeps
        the stored name -> file map, to clean paths out of rejection reasons as here."""
        reader = copy.copy(self)
        reader.config = replace(self.config, workers=0)
        reader.secret, reader.files, reader._inputs = b"", None, []
        reader._paths, reader._where = self.paths.without_secret(), dict(self._where)
        return reader

    def _assemble(self, key: tuple, groups: list[list[InstanceHeader]],
                  decoded: list[tuple[tuple[InstanceHeader, Any, int], Any]]) -> Iterator[Item | Rejection]:
        cfg = self.config
        failed = {pick[0].rel: res for pick, res in decoded if isinstance(res, Rejection)}
        yield from failed.values()
        good = [(pick, res) for pick, res in decoded if not isinstance(res, Rejection)]
        members = [h for g in groups for h in g if h.rel not in failed]
        if not good:
            for h in members:  # nothing decodable was sampled: the whole unit is rejected
                yield Rejection(h.rel, "no_decodable_slices", f"no sampled slice of this {cfg.unit} could be decoded")
            return
        digests = []
        for h in members:
            try:
                digests.append(sha256_file(h.path))
            except OSError:
                digests.append(h.rel)
        slices, slice_groups, chosen = [], [], []
        metadata: dict[str, Any] = {}
        prov_first: dict[str, Any] = {}
        for (h, frames, g), (images, meta, prov) in good:
            slices.extend(images)
            slice_groups.extend([g] * len(images))
            chosen.append({"file": h.rel, "series": g, **({"frames": prov.get("frame")} if prov.get("frame") is not None else {})})
            if not metadata:
                metadata, prov_first = dict(meta), prov
        metadata.pop("instance_uid", None)  # a series/study item is not one instance
        if cfg.unit == "study":
            for k in ("series_uid", "series_number", "view_position"):
                metadata.pop(k, None)
            modalities = sorted({g[0].modality for g in groups if g and g[0].modality})
            metadata["modality"] = "/".join(modalities) or None
        first = members[0].rel
        name = f"{cfg.unit} of {len(members)} file(s) from {os.path.dirname(first) or '.'}"
        provenance = {"unit": cfg.unit, "pooling": cfg.pooling, "slices_requested": cfg.slices,
                      "series": len(groups), "instances": len(members), "slices_used": len(slices),
                      "slice_choice": "evenly spaced along the slice-ordered series (position along the normal, "
                                      "else InstanceNumber); frames of a multi-frame file sampled the same way",
                      "chosen": chosen, "deid": prov_first.get("deid"), "window": prov_first.get("window"),
                      "reader": "pydicom"}
        yield Item(id=self._unit_id(digests, cfg.unit), kind="image", input=first, source=name,
                   image=slices[len(slices) // 2],
                   volume=Volume(slices, slice_groups if cfg.unit == "study" else [], cfg.pooling),
                   metadata=metadata, provenance=provenance, members=[h.rel for h in members])
