"""File helpers shared by the ingest, index and encoder layers: where collections live, content
hashes, atomic writes, and telling a full disk from other write errors."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

from caselens.errors import DiskFullError
from caselens.faults import fault_point

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_FULL_TEXTS = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122")


def default_home() -> Path:
    """Where collections live: ``$CASELENS_HOME`` or ``./caselens-data``."""
    return Path(os.environ.get("CASELENS_HOME", "caselens-data")).expanduser()


def cache_dir() -> Path:
    """The user cache of derived model files (converted weights, ONNX exports):
    ``$CASELENS_CACHE``, default ``~/.cache/caselens``. Everything in it can be rebuilt."""
    return Path(os.environ.get("CASELENS_CACHE", Path.home() / ".cache" / "caselens")).expanduser()


def disk_full(exc: BaseException | None) -> bool:
    """True when ``exc`` (or an exception it was raised from) says the disk or the quota is full:
    an OSError with ENOSPC / EDQUOT, or a library error (LanceDB, FAISS) quoting one."""
    seen = 0
    while exc is not None and seen < 16:
        if isinstance(exc, DiskFullError):
            return True
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return True
        if any(text in str(exc).lower() for text in _FULL_TEXTS):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(folder: str | Path) -> None:
    """fsync a folder so that a rename inside it survives a power loss."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes | memoryview | Any) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part:
    a temporary file in the same folder, fsynced, renamed over ``path``, then the folder fsynced.
    A writer killed midway leaves only a ``.<name>.*.tmp`` file behind."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        if disk_full(exc):
            raise DiskFullError(f"no space left on the device to write {path} ({exc.strerror}); the previous "
                                "file is intact") from None
        raise
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(memoryview(data))
            fh.flush()
            os.fsync(fh.fileno())
        fault_point("file.rename.before")
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if disk_full(exc):
            raise DiskFullError(f"no space left on the device to write {path} ({getattr(exc, 'strerror', exc)}); "
                                "the previous file is intact") from None
        raise
    fsync_dir(path.parent)
