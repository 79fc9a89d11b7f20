"""API tokens: created once, shown once, stored only as a sha256 hash, checked in constant time.

The token file (``<home>/tokens.json``, mode 0600) holds for each token its name, scope
(``read``: search, ask, view; ``write``: also start ingest jobs), creation time and the sha256 of
the token. A token is 256 random bits, so a fast hash is enough (no password stretching needed:
there is nothing to guess). The service re-reads the file when it changes, so ``caselens token
revoke`` takes effect without a restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from caselens.files import atomic_write_bytes
from caselens.serve.errors import TokenError

SCOPES = ("read", "write")
PREFIX = "clk_"  # makes a leaked token easy to recognise (and to search for in logs or code)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_VERSION = 1


@dataclass(frozen=True)
class Token:
    """A token's record (never the token itself)."""

    name: str
    scope: str  # "read" or "write"
    created: str  # ISO time, UTC
    sha256: str  # hex digest of the token

    def allows(self, scope: str) -> bool:
        """True when this token may do what ``scope`` needs (write includes read)."""
        return scope == "read" or self.scope == "write"


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


class TokenStore:
    """The token file of a caselens home."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._cache: tuple[tuple[int, int, int], tuple[Token, ...]] | None = None
        self._guard = threading.Lock()

    # ------------------------------------------------------------------ reading
    def _read(self) -> tuple[Token, ...]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return ()
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._cache
        if cached is not None and cached[0] == key:
            return cached[1]
        if st.st_mode & 0o077:
            raise TokenError(f"token file {self.path} is readable by others (mode {st.st_mode & 0o777:o}); "
                             f"run `chmod 600 {self.path}`")
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            tokens = tuple(Token(**{k: str(t[k]) for k in ("name", "scope", "created", "sha256")})
                           for t in data["tokens"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TokenError(f"token file {self.path} cannot be read ({type(exc).__name__}); "
                             "restore it or delete it and create tokens again") from None
        with self._guard:
            self._cache = (key, tokens)
        return tokens

    def list(self) -> list[Token]:
        """Every token's record, oldest first."""
        return list(self._read())

    def verify(self, secret: str) -> Token | None:
        """The record of the token ``secret``, or None. Every record is compared, in constant
        time, so timing says nothing about which (or whether a) token matched."""
        if not secret:
            return None
        digest = _digest(secret)
        found = None
        for token in self._read():
            if hmac.compare_digest(digest, token.sha256):
                found = token
        return found

    # ------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def _locked(self) -> Iterator[list[Token]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                tokens = list(self._read())
                before = list(tokens)
                yield tokens
                if tokens != before:
                    data = {"version": _VERSION, "tokens": [asdict(t) for t in tokens]}
                    atomic_write_bytes(self.path, json.dumps(data, indent=1).encode())  # mkstemp: mode 0600
                    os.chmod(self.path, 0o600)
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def create(self, name: str, scope: str = "read") -> str:
        """Make a token named ``name`` with ``scope``; returns the token (shown once, not stored)."""
        if not _NAME_RE.match(name or ""):
            raise TokenError(f"token name {name!r} is not allowed: use 1-64 letters, digits, '_', '-' or '.'")
        if scope not in SCOPES:
            raise TokenError(f"token scope {scope!r} is not known; use one of {', '.join(SCOPES)}")
        secret = PREFIX + secrets.token_urlsafe(32)
        with self._locked() as tokens:
            if any(t.name == name for t in tokens):
                raise TokenError(f"a token named {name!r} exists; revoke it first or choose another name")
            tokens.append(Token(name, scope, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), _digest(secret)))
        return secret

    def revoke(self, name: str) -> bool:
        """Remove the token named ``name``; False when there is none."""
        with self._locked() as tokens:
            kept = [t for t in tokens if t.name != name]
            found = len(kept) != len(tokens)
            tokens[:] = kept
        return found
