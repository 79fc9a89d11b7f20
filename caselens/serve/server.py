"""Running the service (uvicorn) and the ``caselens token`` commands, for the CLI to call."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TextIO

from caselens.serve.auth import TokenStore
from caselens.serve.config import TOKEN_FILE, ServeConfig
from caselens.serve.errors import ServeConfigError

log = logging.getLogger(__name__)


def run_server(config: ServeConfig, out: TextIO | None = None) -> int:
    """Serve ``config`` until interrupted. uvicorn's access log is off (it prints paths and query
    strings); the service writes its own, without PHI (:mod:`.middleware`)."""
    import uvicorn

    out = out or sys.stdout
    from caselens.serve.app import create_app

    app = create_app(config)
    missing = [name for name in config.collections if name not in app.state.backend.names()]
    if missing:
        raise ServeConfigError(f"--collections: no collection {', '.join(map(repr, missing))} in {config.home}; "
                               f"collections there: {', '.join(app.state.backend.names()) or 'none'}")
    store = TokenStore(config.tokens_path)
    access = logging.getLogger("caselens.serve.access")
    if config.access_log is None and not access.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
        access.setLevel(logging.INFO)
        access.propagate = False
    if config.auth and not store.list():
        print(f"no API tokens yet: create one with `caselens --home {config.home} token create NAME` "
              "(requests without a token get 401)", file=out)
    where = f"http://{'[' + config.host + ']' if ':' in config.host else config.host}:{config.port}/"
    print(f"caselens serve: {where} (collections in {config.home}; "
          f"{'tokens required' if config.auth else 'NO AUTH (loopback demo)'}; API spec at {where}openapi.json)",
          file=out, flush=True)
    uvicorn.run(app, host=config.host, port=config.port, access_log=False, server_header=False,
                proxy_headers=False, log_level="warning", timeout_graceful_shutdown=10)
    return 0


def token_command(home: Path, action: str, name: str | None = None, scope: str = "read",
                  out: TextIO | None = None) -> int:
    """``caselens token create|list|revoke``: prints what it did; the new token is printed once."""
    out = out or sys.stdout
    store = TokenStore(Path(home) / TOKEN_FILE)
    if action == "create":
        secret = store.create(name or "", scope)
        print(f"created {scope} token {name!r} (stored hashed in {store.path}); it is shown only now:", file=out)
        print(secret, file=out)
        return 0
    if action == "list":
        tokens = store.list()
        if not tokens:
            print(f"no tokens in {store.path}", file=out)
        for t in tokens:
            print(f"{t.name}\t{t.scope}\tcreated {t.created}", file=out)
        return 0
    if action == "revoke":
        if store.revoke(name or ""):
            print(f"revoked token {name!r}", file=out)
            return 0
        print(f"no token named {name!r} in {store.path}", file=out)
        return 1
    raise ValueError(f"token action {action!r} is not known; use create, list or revoke")
