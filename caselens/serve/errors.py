"""Errors of the HTTP service: each carries the HTTP status and a short reason code.

Responses for them are JSON ``{"error": code, "detail": message}``; library errors
(:mod:`caselens.errors`) are mapped to a status and a code in one table, :data:`LIBRARY_ERRORS`.
"""

from __future__ import annotations

from caselens.errors import (BadVectorError, CaselensError, CollectionNotFoundError, EncoderMismatchError,
                             EncoderOptionError, IndexIntegrityError, QueryError, SourceError, TableDamagedError,
                             UnknownEncoderError, UnsupportedModalityError)


class ServeError(CaselensError):
    """A request the service refuses: ``status`` (HTTP) and ``code`` (machine-readable reason)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


class ServeConfigError(CaselensError, ValueError):
    """A service setting that is not allowed (e.g. ``--no-auth`` on a non-loopback address)."""


class TokenError(CaselensError, ValueError):
    """A token name, scope or token file that cannot be used."""


# Library error -> (HTTP status, reason code). Order matters: the first matching class wins.
LIBRARY_ERRORS: tuple[tuple[type[CaselensError], int, str], ...] = (
    (CollectionNotFoundError, 404, "collection_not_found"),
    (QueryError, 400, "bad_query"),
    (UnsupportedModalityError, 400, "unsupported_modality"),
    (SourceError, 400, "bad_source"),
    (EncoderMismatchError, 409, "encoder_mismatch"),
    (UnknownEncoderError, 400, "unknown_encoder"),
    (EncoderOptionError, 400, "bad_encoder_option"),
    (BadVectorError, 500, "bad_vector"),
    (IndexIntegrityError, 503, "index_unavailable"),
    (TableDamagedError, 503, "table_damaged"),  # names the file; `caselens verify NAME --repair` fixes it
)


def status_of(exc: CaselensError) -> tuple[int, str]:
    """HTTP status and reason code of a caselens error."""
    if isinstance(exc, ServeError):
        return exc.status, exc.code
    for cls, status, code in LIBRARY_ERRORS:
        if isinstance(exc, cls):
            return status, code
    return 400, "caselens_error"
