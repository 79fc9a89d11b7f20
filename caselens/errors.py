"""Exceptions raised by caselens. Each names the input and says how to fix it."""

from __future__ import annotations


class CaselensError(Exception):
    """Base class of every caselens error. ``exit_code`` is the command line's exit status for it:
    2 for what the user can fix in the command (a name, an option, an input), 3 for a failure at
    run time (damaged files, an unreachable endpoint)."""

    exit_code = 2


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

    exit_code = 3


class IndexIntegrityError(CaselensError, ValueError):
    """A FAISS index file whose checksum or stamp does not match."""

    exit_code = 3


class QueryError(CaselensError, ValueError):
    """A search query that cannot be run as given."""


class SourceError(CaselensError, ValueError):
    """A source (folder, manifest, corpus) that cannot be read at all."""


class PseudonymKeyError(CaselensError, ValueError):
    """A pseudonym key that is missing, empty or damaged (pseudonyms need the collection's own key)."""

    exit_code = 3


class ConfigError(CaselensError, ValueError):
    """A setting (a name, an option, a configuration field) that cannot work; says which and why."""


class TableDamagedError(CaselensError, RuntimeError):
    """A Lance table of a collection (the items or the ledger) that cannot be read as committed:
    a data file missing, truncated or undecodable, a manifest that does not decode. Names the
    collection, the table and the file(s), and says to run ``caselens verify NAME --repair``."""

    exit_code = 3

    def __init__(self, message: str, *, collection: str = "", table: str = "", files: tuple[str, ...] = ()):
        super().__init__(message)
        self.collection = collection
        self.table = table
        self.files = tuple(files)


class RunnerError(CaselensError, RuntimeError):
    """A distributed runner that cannot start: its engine is not installed or its cluster not reachable."""


class AdapterMismatchError(EncoderMismatchError):
    """An adapter fitted on vectors of another encoder than the collection's (or the query's)."""


class AdapterIntegrityError(CaselensError, ValueError):
    """A stored adapter whose record or arrays are missing, damaged or do not fit together."""


class AdaptationError(CaselensError, ValueError):
    """An adapter or diagnosis model that cannot be fitted from the labelled items given."""


class DiskFullError(CaselensError, OSError):
    """No space left on the device (or the quota) while writing a collection; what was stored
    before the failed write is intact, and the same command run again with space continues."""

    exit_code = 3
