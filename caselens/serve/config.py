"""Settings of ``caselens serve``, checked once when they are made."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from caselens.serve.errors import ServeConfigError

TOKEN_FILE = "tokens.json"  # in the caselens home, next to the collections


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches: 127.0.0.0/8, ::1 and ``localhost``."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class ServeConfig:
    """How the HTTP service runs. Defaults are the safe ones: loopback only, tokens required,
    no CORS, bounded uploads, a rate limit per token, ingest only from named folders."""

    home: Path  # the caselens home holding the collections (and the token file)
    host: str = "127.0.0.1"
    port: int = 8000
    collections: tuple[str, ...] = ()  # opened, with their encoders, at start-up (others on first use)
    auth: bool = True  # False (``--no-auth``) is refused unless ``host`` is a loopback address
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API; none by default
    allowed_hosts: tuple[str, ...] = ()  # Host header values accepted; default: loopback names, or any
    max_upload_bytes: int = 32 << 20  # request bodies above this get 413
    max_image_pixels: int = 64_000_000  # decoded pixels (all frames) above this get 400 image_too_large
    rate_per_second: float = 20.0  # sustained requests per token (0: no limit)
    rate_burst: int = 60  # requests a token may make at once
    search_threads: int = 0  # searches run at once (0: one per CPU core); more wait their turn
    encoder_threads: int = 1  # threads of one encoder call (torch); 0: torch's default (all cores)
    generator: str = "auto"  # for /api/ask: auto, extractive, gemma, hf:<path>, openai:<url> (server-side only)
    ingest_roots: tuple[Path, ...] = ()  # folders ingest jobs may read; none: ingest jobs refused
    access_log: Path | None = None  # JSON lines; None: the ``caselens.serve.access`` logger only

    def __post_init__(self) -> None:
        self.home = Path(self.home).expanduser()
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ServeConfigError(f"port {self.port!r} is not a TCP port (0-65535)")
        if not self.auth and not is_loopback(self.host):
            raise ServeConfigError(f"--no-auth serves without tokens and is only allowed on a loopback address "
                                   f"(127.0.0.1, ::1, localhost), not {self.host!r}; create a token with "
                                   "`caselens token create NAME` instead")
        if self.max_upload_bytes < 1024:
            raise ServeConfigError(f"max_upload_bytes {self.max_upload_bytes} is too small (at least 1024)")
        if self.max_image_pixels < 1:
            raise ServeConfigError(f"max_image_pixels must be positive, not {self.max_image_pixels}")
        if self.rate_per_second < 0 or self.rate_burst < 1:
            raise ServeConfigError(f"rate limit {self.rate_per_second}/s burst {self.rate_burst}: give a rate "
                                   ">= 0 (0 turns it off) and a burst >= 1")
        if self.encoder_threads < 0:
            raise ServeConfigError(f"encoder_threads must be 0 (torch's default) or more, not {self.encoder_threads}")
        if self.search_threads < 0:
            raise ServeConfigError(f"search_threads must be 0 (one per core) or more, not {self.search_threads}")
        for origin in self.cors_origins:
            if origin == "*" or not origin.startswith(("http://", "https://")):
                raise ServeConfigError(f"CORS origin {origin!r}: name each origin (http(s)://host[:port]); "
                                       "'*' is not allowed with tokens")
        roots = []
        for root in self.ingest_roots:
            path = Path(root).expanduser().resolve()
            if not path.is_dir():
                raise ServeConfigError(f"ingest root {root} is not a folder")
            roots.append(path)
        self.ingest_roots = tuple(roots)
        self.collections = tuple(c for c in self.collections if c)

    @property
    def tokens_path(self) -> Path:
        """The token file: ``<home>/tokens.json``."""
        return self.home / TOKEN_FILE

    @property
    def threads(self) -> int:
        """Searches run at once."""
        return self.search_threads or max(1, os.cpu_count() or 1)

    @property
    def hosts(self) -> tuple[str, ...] | None:
        """Host header names accepted (None: any). Loopback binds accept loopback names only, so a
        web page elsewhere cannot reach the service by pointing its own domain at 127.0.0.1
        (DNS rebinding)."""
        if self.allowed_hosts:
            return tuple(h.lower() for h in self.allowed_hosts)
        if is_loopback(self.host):
            return ("127.0.0.1", "localhost", "::1", "[::1]")
        return None

