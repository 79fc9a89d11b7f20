"""Listing the files under an input folder, the one way every folder source does it.

No symlink is followed and nothing outside the root is read: a symbolic link (to a file or to a
folder) and anything that is not a regular file (a pipe, a device) is yielded as a
:class:`~caselens.ingest.items.Rejection` with its reason, so it gets a ledger row like every
other input. Hidden files and folders (names starting with ".") and the ``skip`` names (folder
clutter such as ``Thumbs.db``) are not inputs and are passed over silently.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from collections.abc import Callable, Iterable
from typing import Iterator

from caselens.ingest.items import Item, Rejection

CLUTTER = frozenset({".ds_store", "thumbs.db", "desktop.ini"})


def walk_files(root: Path, skip: frozenset[str] | set[str] = CLUTTER,
               base: Path | None = None) -> Iterator[tuple[Path, str] | Rejection]:
    """(path, path relative to ``base``) of every regular file under ``root`` (sorted, depth
    first), and a rejection for each symlink or special file met (see the module docstring).
    ``base`` (default: ``root``) is the folder names are relative to; ``root`` must lie in it."""
    root = Path(root)
    base = Path(base) if base is not None else root
    skip = {s.lower() for s in skip}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        dirnames.sort()
        for d in list(dirnames):
            if d.startswith("."):
                dirnames.remove(d)
            elif (here / d).is_symlink():
                dirnames.remove(d)
                yield Rejection(os.path.relpath(here / d, base), "symlink",
                                "symbolic link to a folder; not followed (copy the files into the input folder instead)")
        for name in sorted(filenames):
            if name.startswith(".") or name.lower() in skip:
                continue
            path = here / name
            rel = os.path.relpath(path, base)
            found = check_file(path, rel)
            if found is not None:
                yield found
            else:
                yield path, rel


def check_file(path: Path, rel: str) -> Rejection | None:
    """Why ``path`` is not a regular file that may be read (symlink, missing, folder, special
    file), or None when it is one."""
    if "\0" in str(path):
        return Rejection(rel, "bad_path", "the path holds a NUL character; no file can have that name")
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return Rejection(rel, "missing_file", "file does not exist")
    except (OSError, ValueError) as exc:  # ValueError: a name the OS cannot take
        return Rejection(rel, "unreadable", f"cannot read file: {getattr(exc, 'strerror', None) or exc}")
    if stat.S_ISLNK(mode):
        return Rejection(rel, "symlink", "symbolic link; not followed (copy the file into the input folder instead)")
    if stat.S_ISDIR(mode):
        return Rejection(rel, "is_a_folder", "path names a folder, not a file")
    if not stat.S_ISREG(mode):
        return Rejection(rel, "not_a_file", "not a regular file (device, pipe or socket); skipped")
    return None


def file_entries(walked: Iterable[tuple[Path, str] | Rejection], empty_reason: str) -> list[tuple]:
    """A walk (:func:`walk_files`) as JSON-able entries for a source's parts: ``("file", path,
    rel)`` or ``("reject", rel, code, reason)``; an empty walk is one ``empty_source`` rejection
    with ``empty_reason``."""
    entries = [("reject", e.input, e.reason_code, e.reason) if isinstance(e, Rejection) else
               ("file", str(e[0]), e[1]) for e in walked]
    return entries or [("reject", ".", "empty_source", empty_reason)]


def read_entries(entries: Iterable[tuple], read_file: Callable[[Path, str], Iterator[Item | Rejection]],
                 name: Callable[[str], str]) -> Iterator[Item | Rejection]:
    """Items and rejections of :func:`file_entries`, in order: each file read by ``read_file(path,
    rel)``, each rejection named by ``name`` (the source's path naming; the folder itself, of an
    ``empty_source``, keeps its ".")."""
    for entry in entries:
        if entry[0] == "file":
            yield from read_file(Path(entry[1]), entry[2])
            continue
        _, rel, code, reason = entry
        yield Rejection(rel if code == "empty_source" else name(rel), code, reason)
