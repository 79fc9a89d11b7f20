"""How a collection names its input files: by relative path, by keyed hash, or not at all.

PACS exports name folders after patients (``Smith_John/MRN778899.dcm``), and whatever names an
input is stored in the items table (``source``, ``provenance.file``), in the ledger (``input``)
and printed by ``search`` and ``ledger``. So a collection chooses once (``--source-paths``):

* ``relative`` — the path relative to the input folder (the manifest's folder, the export root);
* ``hashed`` — ``path-<20 hex>``: HMAC-SHA256 of the relative path under the collection's secret
  (:func:`caselens.ingest.deid.pseudonym`), the same path always the same name within a
  collection, nothing to read without the key. What ``ask`` needs to find an image again (hash
  -> relative path) is kept in the collection's local inputs file only
  (:mod:`caselens.ingest.inputs`), never in an index column, never printed;
* ``none`` — no path anywhere: ``source`` and ``provenance.file`` are empty, the ledger names each
  input by its keyed hash, and no map is kept (images cannot be shown to generators).

The default is ``hashed`` for DICOM exports and for any input that carries patient ids to
pseudonymise (a manifest with a ``patient_id`` column), ``relative`` otherwise. The first ingest
fixes the collection's setting; a later run asking for another one is refused, and so is a run
whose input would default to ``hashed`` into a collection that stores relative paths (say
``--source-paths relative`` to accept that). Collections made before the setting existed store
relative paths.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from caselens.errors import ConfigError, SourceError
from caselens.ingest.deid import pseudonym
from caselens.ingest.inputs import read_source_paths, write_source_paths

if TYPE_CHECKING:
    from caselens.indexes.collection import Collection

MODES = ("relative", "hashed", "none")
PREFIX = "path-"  # every hashed name starts with it (see deid.pseudonym, kind "path")
_MIN_SCRUB = 4  # file and folder names shorter than this are not scrubbed out of reasons


def check_mode(mode: str | None) -> None:
    """Raise ConfigError unless ``mode`` is None (not chosen) or one of :data:`MODES`."""
    if mode is not None and mode not in MODES:
        raise ConfigError(f"source paths {mode!r} is not known; choose one of {', '.join(MODES)}")


def is_hashed_name(name: str | None) -> bool:
    """True for a name made by a ``hashed`` or ``none`` collection."""
    return bool(name) and str(name).startswith(PREFIX)


class PathNamer:
    """Turns relative input paths into the names a collection stores (see the module docstring).

    ``seen`` maps every hashed name given out to its relative path: sources put it into their
    ``input_record`` for the collection's local inputs file."""

    def __init__(self, mode: str = "relative", secret: bytes = b""):
        check_mode(mode)
        if mode != "relative" and not secret:
            raise ConfigError(f"source paths {mode!r} need the collection's secret")
        self.mode, self.secret = mode, secret
        self.seen: dict[str, str] = {}

    def without_secret(self) -> "PathNamer":
        """A copy without the key, to send to a worker (:meth:`keyed` there gives it back)."""
        namer = PathNamer()
        namer.mode, namer.secret = self.mode, b""
        return namer

    def keyed(self, secret: bytes) -> "PathNamer":
        """This naming under ``secret`` (a worker's copy given the collection's key)."""
        return self if self.secret or self.mode == "relative" else PathNamer(self.mode, secret)

    def name(self, rel: str) -> str:
        """What the ledger calls the input at ``rel`` (and, unless ``none``, the items' source)."""
        if self.mode == "relative":
            return rel
        hashed = pseudonym(rel, self.secret, "path")
        if self.mode == "hashed":
            self.seen[hashed] = rel
        return hashed

    def source(self, rel: str) -> str | None:
        """What an item's ``source`` and ``provenance.file`` hold for the file at ``rel``."""
        return None if self.mode == "none" else self.name(rel)

    def clean(self, text: str, path: Path | str | None, rel: str) -> str:
        """``text`` (a rejection reason, which may quote an error message) with the file's
        absolute path, and unless ``relative`` its relative path and the names in it, replaced
        by the file's name here."""
        if not text:
            return text
        name = self.name(rel)
        for form in {str(path), str(Path(path).resolve())} if path is not None else ():
            text = text.replace(form, name)
        if self.mode != "relative":
            text = text.replace(rel, name)
            for part in sorted(Path(rel).parts, key=len, reverse=True):
                if len(part) >= _MIN_SCRUB:
                    text = text.replace(part, name)
        return text

    def record(self) -> dict[str, Any]:
        """What goes into the run's input record: the setting, and the hash -> path map."""
        return {"source_paths": self.mode, **({"paths": dict(self.seen)} if self.seen else {})}


def choose_mode(collection: "Collection", requested: str | None, pseudonymised: bool) -> str:
    """The setting an ingest into ``collection`` uses: ``requested`` (the source's config),
    else the collection's, else the default for the input (see the module docstring). Raises
    :class:`SourceError` when they disagree."""
    check_mode(requested)
    stored = read_source_paths(collection.root)
    if stored is None and collection.count() > 0:
        stored = "relative"  # a collection made before the setting existed
    default = "hashed" if pseudonymised else "relative"
    if requested is not None and stored is not None and requested != stored:
        raise SourceError(f"collection {collection.name!r} stores its input paths as {stored!r}; ingest with "
                          f"--source-paths {stored}, or into a new collection")
    if requested is None and stored == "relative" and default == "hashed":
        raise SourceError(f"collection {collection.name!r} stores input paths as they are (relative), and this "
                          "input's paths may name patients (DICOM, or a manifest with patient_id); ingest into a "
                          "new collection (paths hashed by default), or say --source-paths relative to accept")
    return requested or stored or default


def apply_source_paths(source: Any, collection: "Collection") -> str:
    """Give ``source`` the collection's path naming (``source.paths``) and fix the collection's
    setting if this is its first ingest; returns the setting. Sources without files on disk
    follow the same rule (their corpus file name is a path too)."""
    requested = getattr(source, "source_paths", None)
    pseudonymised = bool(getattr(source, "pseudonymised_patients", False))
    with collection.lock.hold():
        mode = choose_mode(collection, requested, pseudonymised)
        if read_source_paths(collection.root) != mode:
            write_source_paths(collection.root, mode)
    source.paths = PathNamer(mode, collection.secret())
    return mode
