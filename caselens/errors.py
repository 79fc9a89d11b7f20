"""Exceptions raised by caselens. Each names the input and says how to fix it."""

from __future__ import annotations


class CaselensError(Exception):
    """Base class of every caselens error."""


class CollectionNotFoundError(CaselensError, KeyError):
    """A collection name that does not exist under the caselens home."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class EncoderMismatchError(CaselensError, ValueError):
    """An encoder or index whose fingerprint differs from the collection's."""


class UnknownEncoderError(CaselensError, KeyError):
    """An encoder name that no registered scheme understands."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class EncoderOptionError(CaselensError, ValueError):
    """An encoder option that is missing, unknown or of the wrong type."""


class UnsupportedModalityError(CaselensError, ValueError):
    """An encoder asked to embed a modality (image or text) it does not have."""


class BadVectorError(CaselensError, ValueError):
    """An embedding that is not finite or has the wrong dimension."""


class IndexIntegrityError(CaselensError, ValueError):
    """A FAISS index file whose checksum or stamp does not match."""


class QueryError(CaselensError, ValueError):
    """A search query that cannot be run as given."""


class SourceError(CaselensError, ValueError):
    """A source (folder, manifest, corpus) that cannot be read at all."""


class DiskFullError(CaselensError, OSError):
    """No space left on the device (or the quota) while writing a collection; what was stored
    before the failed write is intact, and the same command run again with space continues."""
