"""Helpers of the serve tests: a small real home (image cases + a text knowledge collection),
tokens, and a live uvicorn server on loopback in a thread."""

from __future__ import annotations

import csv
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from conftest import make_images

KNOWLEDGE = [
    {"id": "stripes-note", "text": "Stripes are parallel bands of alternating intensity. A striped pattern "
                                   "suggests a periodic structure such as ribs or a grid artefact."},
    {"id": "blob-note", "text": "A blob is a round bright region with a soft edge. Blobs fade smoothly from "
                                "the centre and may represent a nodule or a mass."},
    {"id": "general-note", "text": "Compare a case with similar cases of other patients before deciding."},
]


def build_home(root: Path, n_per_class: int = 6) -> tuple[Path, Path]:
    """A caselens home with ``cases`` (classic encoder; label, patient_id, age, modality columns)
    and ``kb`` (MiniLM passages); returns (home, image folder)."""
    from caselens.cli import main

    home = root / "home"
    folder = make_images(root / "images", n_per_class=n_per_class)
    manifest = folder / "manifest.csv"
    rows = list(csv.DictReader(manifest.open()))
    with manifest.open("w", newline="") as fh:  # a modality column to filter on
        writer = csv.DictWriter(fh, fieldnames=[*rows[0].keys(), "modality"])
        writer.writeheader()
        for i, row in enumerate(rows):
            writer.writerow({**row, "modality": "CT" if (i // 2) % 2 else "MR"})
    assert main(["--home", str(home), "ingest", "cases", "--manifest", str(manifest), "-q"]) == 0
    corpus = root / "kb.jsonl"
    corpus.write_text("\n".join(json.dumps(x) for x in KNOWLEDGE) + "\n")
    assert main(["--home", str(home), "ingest", "kb", "--text", str(corpus), "-q"]) == 0
    return home, folder


_SHARED: dict[str, tuple[Path, Path]] = {}


def shared_home(tmp_path_factory) -> tuple[Path, Path]:
    """:func:`build_home` once per test session (the serve test modules share it; each starts its
    own server). Tests may add items and tokens; none removes any."""
    if "home" not in _SHARED:
        _SHARED["home"] = build_home(tmp_path_factory.mktemp("serve-home"))
    return _SHARED["home"]


@dataclass
class Live:
    """A running server: its base URL, tokens and the app's state."""

    url: str
    tokens: dict[str, str] = field(default_factory=dict)  # name -> token
    app: object = None
    server: object = None
    thread: threading.Thread | None = None

    def headers(self, name: str = "reader") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[name]}"}

    def get(self, path: str, token: str | None = "reader", **kw) -> requests.Response:
        return requests.get(self.url + path, headers=self.headers(token) if token else {}, timeout=60, **kw)

    def post(self, path: str, token: str | None = "reader", **kw) -> requests.Response:
        return requests.post(self.url + path, headers=self.headers(token) if token else {}, timeout=60, **kw)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)


def start_server(config, tokens: dict[str, str] | None = None, backend=None) -> Live:
    """``create_app(config, backend)`` served by uvicorn on 127.0.0.1 (a free port) in a daemon thread."""
    import uvicorn

    from caselens.serve import create_app

    app = create_app(config, backend)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False,
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True, name="uvicorn-test")
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    return Live(url=f"http://127.0.0.1:{port}", tokens=dict(tokens or {}), app=app, server=server, thread=thread)


def make_tokens(home: Path, suffix: str = "") -> dict[str, str]:
    """A read and a write token (named ``reader<suffix>``, ``writer<suffix>``), keyed "reader", "writer"."""
    from caselens.serve.auth import TokenStore

    store = TokenStore(home / "tokens.json")
    return {"reader": store.create(f"reader{suffix}", "read"), "writer": store.create(f"writer{suffix}", "write")}
