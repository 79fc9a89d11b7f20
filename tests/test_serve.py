"""caselens serve over real HTTP: a live uvicorn server on loopback, a real collection built here
(classic encoder) and a MiniLM knowledge collection; security defaults, searches, items, jobs."""

from __future__ import annotations

import http.client
import io
import json
import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from conftest import ROOT, make_images  # noqa: E402
from serve_support import Live, make_tokens, shared_home, start_server  # noqa: E402

from caselens.serve import ServeConfig  # noqa: E402
from caselens.serve.auth import TokenStore  # noqa: E402
from caselens.serve.backend import Backend  # noqa: E402
from caselens.serve.errors import ServeConfigError  # noqa: E402

MAX_UPLOAD = 1 << 20  # 1 MiB in these tests


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    home, folder = shared_home(tmp_path_factory)
    incoming = root / "incoming"
    incoming.mkdir()
    tokens = make_tokens(home)
    config = ServeConfig(home=home, encoder_threads=0, collections=("cases", "kb"), generator="extractive",
                         max_upload_bytes=MAX_UPLOAD, rate_per_second=1000, rate_burst=1000, ingest_roots=(incoming,),
                         access_log=root / "access.log")
    live = start_server(config, tokens)
    yield {"live": live, "home": home, "folder": folder, "incoming": incoming, "root": root, "config": config}
    live.stop()


@pytest.fixture(scope="module")
def live(world) -> Live:
    return world["live"]


def png_bytes(path: Path) -> bytes:
    return path.read_bytes()


def search_upload(live: Live, path: Path, token: str = "reader", **data) -> requests.Response:
    with path.open("rb") as fh:
        return live.post("/api/collections/cases/search/image", token, files={"image": (path.name, fh, "image/png")},
                         data={k: (json.dumps(v) if isinstance(v, dict) else str(v)) for k, v in data.items()})


def first_id(live: Live, world) -> str:
    r = search_upload(live, world["folder"] / "blob_0.png", k=1)
    assert r.status_code == 200, r.text
    return r.json()["hits"][0]["id"]


# ------------------------------------------------------------------ security defaults
def test_health_needs_no_token_but_api_does(live):
    assert live.get("/api/health", token=None).json()["status"] == "ok"
    r = live.get("/api/collections", token=None)
    assert r.status_code == 401
    assert r.json()["error"] == "missing_token"
    assert r.headers["www-authenticate"] == "Bearer"
    r = requests.get(live.url + "/api/collections", headers={"Authorization": "Bearer clk_not-a-token"}, timeout=10)
    assert r.status_code == 401 and r.json()["error"] == "invalid_token"
    assert {"cases", "kb"} <= set(live.get("/api/collections").json()["collections"])


def test_read_only_token_cannot_ingest(live, world):
    job = {"folder": str(world["incoming"])}
    r = live.post("/api/collections/more/jobs", "reader", json=job)
    assert r.status_code == 403
    assert r.json()["error"] == "insufficient_scope"
    r = live.post("/api/collections/more/jobs", None, json=job)
    assert r.status_code == 401


def test_oversize_upload_is_413(live, world):
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (800, 800, 3), dtype=np.uint8))
    buf = io.BytesIO()
    big.save(buf, "PNG")
    assert len(buf.getvalue()) > MAX_UPLOAD
    r = live.post("/api/collections/cases/search/image", files={"image": ("big.png", buf.getvalue(), "image/png")})
    assert r.status_code == 413
    assert r.json()["error"] == "payload_too_large"

    def chunks():  # no Content-Length: the bytes actually received are counted
        data = buf.getvalue()
        for i in range(0, len(data), 1 << 16):
            yield data[i:i + 1 << 16]

    r = requests.post(live.url + "/api/collections/cases/search/image", data=chunks(), timeout=30,
                      headers={**live.headers(), "Content-Type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413


def test_decompression_bomb_is_400_with_a_reason(live):
    bomb = Image.new("1", (16000, 16000))  # 256 M pixels, a few kB as PNG
    buf = io.BytesIO()
    bomb.save(buf, "PNG", optimize=True)
    assert len(buf.getvalue()) < MAX_UPLOAD
    r = live.post("/api/collections/cases/search/image", files={"image": ("bomb.png", buf.getvalue(), "image/png")})
    assert r.status_code == 400
    body = r.json()
    assert body["error"] == "image_too_large"
    assert "decompression bomb" in body["detail"]
    assert live.get("/api/health", token=None).status_code == 200  # still serving


def test_not_an_image_is_415_and_corrupt_is_400(live):
    r = live.post("/api/collections/cases/search/image", files={"image": ("x.txt", b"hello world", "text/plain")})
    assert r.status_code == 415 and r.json()["error"] == "unsupported_media_type"
    r = live.post("/api/collections/cases/search/image",
                  files={"image": ("x.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "image/png")})
    assert r.status_code == 400 and r.json()["error"] == "corrupt_image"


def raw_get(live: Live, path: str) -> tuple[int, bytes]:
    """GET ``path`` exactly as written (no client-side normalisation of ``..``)."""
    host, port = live.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", path, headers=live.headers())
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, body


@pytest.mark.parametrize("kind", ["items", "images", "thumbnails"])
def test_path_traversal_in_ids_is_404(live, world, kind):
    secret = (world["home"] / "cases" / "secret.key").read_bytes()
    tokens_file = (world["home"] / "tokens.json").read_bytes()
    for bad in ["../secret.key", "..%2Fsecret.key", "..%2F..%2Fcases%2Fsecret.key", "%2e%2e/%2e%2e/tokens.json",
                "../../../../etc/passwd", "/etc/passwd", "sha256:..%2F..%2Fsecret", "..", "%00", "a%0Ab"]:
        status, body = raw_get(live, f"/api/collections/cases/{kind}/{bad}")
        assert status == 404, (bad, status, body[:200])
        assert secret not in body and tokens_file not in body and b"root:" not in body
        assert json.loads(body)["error"] in ("item_not_found", "not_found")
    for bad_coll in ["..%2Fcases", "..", "%2e%2e"]:
        status, body = raw_get(live, f"/api/collections/{bad_coll}/items/x")
        assert status == 404, (bad_coll, status, body[:200])


def test_rate_limit_is_429_per_token(world):
    home = world["home"]
    config = ServeConfig(home=home, encoder_threads=0, rate_per_second=1, rate_burst=3)
    server = start_server(config, make_tokens_for(home, "rl"))
    try:
        statuses = [server.get("/api/collections", "rl-a").status_code for _ in range(6)]
        assert statuses[:3] == [200, 200, 200]
        assert 429 in statuses[3:]
        r = server.get("/api/collections", "rl-a")
        assert r.status_code == 429 and r.json()["error"] == "rate_limited" and int(r.headers["retry-after"]) >= 1
        assert server.get("/api/collections", "rl-b").status_code == 200  # another token has its own budget
    finally:
        server.stop()


def make_tokens_for(home: Path, prefix: str) -> dict[str, str]:
    store = TokenStore(home / "tokens.json")
    return {f"{prefix}-a": store.create(f"{prefix}-a"), f"{prefix}-b": store.create(f"{prefix}-b")}


def test_token_file_is_private_and_hashed_and_revocation_is_live(live, world):
    path = world["home"] / "tokens.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert live.tokens["reader"] not in text and live.tokens["writer"] not in text
    store = TokenStore(path)
    extra = store.create("short-lived")
    r = requests.get(live.url + "/api/collections", headers={"Authorization": f"Bearer {extra}"}, timeout=10)
    assert r.status_code == 200
    assert store.revoke("short-lived")
    r = requests.get(live.url + "/api/collections", headers={"Authorization": f"Bearer {extra}"}, timeout=10)
    assert r.status_code == 401


def test_no_auth_is_refused_off_loopback(tmp_path):
    with pytest.raises(ServeConfigError, match="loopback"):
        ServeConfig(home=tmp_path, host="0.0.0.0", auth=False)
    ServeConfig(home=tmp_path, host="127.0.0.1", auth=False)  # a loopback demo is fine


def test_foreign_host_header_and_cors_are_refused(live):
    r = requests.get(live.url + "/api/health", headers={"Host": "evil.example"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"] == "bad_host"
    r = requests.get(live.url + "/api/collections", headers={**live.headers(), "Origin": "http://evil.example"},
                     timeout=10)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    assert r.headers["cache-control"] == "no-store" and r.headers["x-content-type-options"] == "nosniff"


def test_errors_are_json_with_reason_codes(live):
    r = live.get("/api/collections/nope")
    assert r.status_code == 404 and r.json()["error"] == "collection_not_found"
    assert str(live.app.state.config.home) not in r.text  # server folders are not echoed
    r = live.post("/api/collections/cases/search/item", json={"id": "x", "k": 0})
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"
    r = live.post("/api/collections/cases/search/item", json={"id": "x", "where": "age >>> ;; nonsense"})
    assert r.status_code in (400, 404)
    r = live.get("/api/no/such/route")
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = live.post("/api/collections/cases/search/text", json={"text": "round"})
    assert r.status_code == 400 and r.json()["error"] == "unsupported_modality"  # classic has no text tower


def test_unexpected_errors_are_json_500_logged_without_their_message(world, caplog):
    class Failing(Backend):  # fault injection: a backend whose ledger call breaks
        def ledger_summary(self, name: str, runs: int = 20) -> dict:
            raise RuntimeError("CANARYPHI-4471 patient Jane Doe")

    live = start_server(ServeConfig(home=world["home"], encoder_threads=0), make_tokens(world["home"], "-fault"),
                        Failing(world["home"]))
    try:
        with caplog.at_level(logging.DEBUG):
            r = live.get("/api/collections/cases/ledger")
        assert r.status_code == 500 and r.json()["error"] == "internal_error"
        assert "CANARYPHI" not in r.text and "Traceback" not in r.text
        assert "RuntimeError" in caplog.text and "CANARYPHI" not in caplog.text and "Jane" not in caplog.text
        assert live.get("/api/health", token=None).status_code == 200
    finally:
        live.stop()


# ------------------------------------------------------------------ search, items, ledger, diagnose, ask
def test_search_by_upload_finds_the_image_itself_first(live, world):
    r = search_upload(live, world["folder"] / "stripes_2.png", k=5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"] == "image" and body["encoder"] == "classic"
    assert body["hits"][0]["source"] == stored_name(world, "stripes_2.png") and body["hits"][0]["score"] > 0.99
    assert [h["rank"] for h in body["hits"]] == [1, 2, 3, 4, 5]
    assert "stripes_2" not in json.dumps({k: v for k, v in body.items() if k != "hits"})  # upload name not echoed


def test_search_by_jpeg_and_dicom_uploads(live, world, dicom_files):
    buf = io.BytesIO()
    Image.open(world["folder"] / "stripes_3.png").convert("RGB").save(buf, "JPEG", quality=95)
    r = live.post("/api/collections/cases/search/image", files={"image": ("q.jpg", buf.getvalue(), "image/jpeg")})
    assert r.status_code == 200 and r.json()["hits"][0]["label"] == "stripes"
    ct = next(p for p in dicom_files if p.name == "CT_small.dcm")
    r = live.post("/api/collections/cases/search/image",
                  files={"image": ("ct.dcm", ct.read_bytes(), "application/dicom")}, data={"k": "3"})
    assert r.status_code == 200 and len(r.json()["hits"]) == 3
    truncated = (world["folder"] / "stripes_3.png").read_bytes()
    r = live.post("/api/collections/cases/search/image",
                  files={"image": ("t.png", truncated[: len(truncated) // 2], "image/png")})
    assert r.status_code == 400 and r.json()["error"] == "bad_query"
    assert "the uploaded image" in r.json()["detail"] and "/tmp" not in r.json()["detail"]  # no server path


def test_search_excludes_the_query_patient_and_applies_filters(live, world):
    r = search_upload(live, world["folder"] / "blob_1.png", k=12, exclude_same="patient_id")
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    item = live.get(f"/api/collections/cases/items/{first_id_of(live, world, 'blob_1.png')}").json()
    patient = item["metadata"]["patient_id"]
    assert patient.startswith("pt-") and hits and all(h["metadata"].get("patient_id") != patient for h in hits)
    r = search_upload(live, world["folder"] / "blob_1.png", k=12, filters={"label": "stripes", "modality": "CT"})
    hits = r.json()["hits"]
    assert hits and all(h["label"] == "stripes" and h["metadata"]["modality"] == "CT" for h in hits)
    r = search_upload(live, world["folder"] / "blob_1.png", k=12, where="age >= 62")
    assert r.json()["hits"] and all(h["metadata"]["age"] >= 62 for h in r.json()["hits"])
    r = search_upload(live, world["folder"] / "blob_1.png", filters={"no_such_column": "x"})
    assert r.status_code == 400 and r.json()["error"] == "bad_query"


def stored_name(world, rel: str) -> str:
    """What the cases collection calls the file at ``rel``: its manifest names patients, so it
    stores keyed hashes of paths (caselens.ingest.source_paths)."""
    from caselens.indexes.collection import Collection
    from caselens.ingest.deid import pseudonym

    return pseudonym(rel, Collection.open("cases", world["home"]).secret(), "path")


def first_id_of(live: Live, world, name: str) -> str:
    return search_upload(live, world["folder"] / name, k=1).json()["hits"][0]["id"]


def test_search_by_item_id_and_by_text(live, world):
    item_id = first_id_of(live, world, "stripes_0.png")
    r = live.post("/api/collections/cases/search/item", json={"id": item_id, "k": 4})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert len(hits) == 4 and item_id not in [h["id"] for h in hits]
    assert sum(h["label"] == "stripes" for h in hits) >= 3
    r = live.post("/api/collections/cases/search/item", json={"id": "sha256:" + "0" * 32})
    assert r.status_code == 404 and r.json()["error"] == "item_not_found"
    r = live.post("/api/collections/kb/search/text", json={"text": "round bright region with a soft edge", "k": 2})
    assert r.status_code == 200 and r.json()["hits"][0]["id"] == "blob-note"
    r = live.post("/api/collections/kb/search/text", json={"text": "periodic bands", "mode": "hybrid", "k": 1})
    assert r.status_code == 200 and r.json()["hits"][0]["id"] == "stripes-note"


def test_item_metadata_image_and_thumbnail(live, world):
    item_id = first_id_of(live, world, "blob_3.png")
    item = live.get(f"/api/collections/cases/items/{item_id}").json()
    assert item["label"] == "blob" and item["source"] == stored_name(world, "blob_3.png") \
        and item["provenance"]["reader"] == "pillow"
    r = live.get(f"/api/collections/cases/images/{item_id}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    full = Image.open(io.BytesIO(r.content))
    assert full.size == Image.open(world["folder"] / "blob_3.png").size
    cached = world["home"] / "cases" / "cache" / "images" / f"{item_id.replace(':', '_')}.png"
    assert cached.is_file()  # served from the collection's own cache
    r = live.get(f"/api/collections/cases/thumbnails/{item_id}", params={"size": 32})
    assert r.status_code == 200 and max(Image.open(io.BytesIO(r.content)).size) <= 32
    r = live.get("/api/collections/kb/images/blob-note")
    assert r.status_code == 404 and r.json()["error"] == "no_image"  # a text item has no image


def test_collection_info_and_ledger(live):
    info = live.get("/api/collections/cases").json()
    assert info["items"] >= 12 and info["encoder"]["spec"] == "classic" and info["index"]["fresh"]
    assert {f["value"] for f in info["facets"]["label"]} == {"blob", "stripes"}
    assert {f["value"] for f in info["facets"]["modality"]} == {"CT", "MR"}
    assert "patient_id" not in info["facets"]  # no facet of patient values
    assert "path" not in info
    ledger = live.get("/api/collections/cases/ledger").json()
    assert ledger["by_status"]["accepted"] >= 12 and ledger["runs"][0]["accepted"] >= 1


def test_diagnose_votes_from_other_patients(live, world):
    item_id = first_id_of(live, world, "stripes_4.png")
    r = live.post("/api/collections/cases/diagnose", data={"id": item_id, "k": "5", "knowledge": "kb"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["labels"][0]["label"] == "stripes" and out["top_label"] == "stripes" and out["k"] == 5
    assert abs(sum(x["probability"] for x in out["labels"]) - 1) < 1e-3 and out["reason"]
    item = live.get(f"/api/collections/cases/items/{item_id}").json()
    assert out["supporting"] and all(h["id"] != item_id for h in out["supporting"])
    assert all(h["metadata"]["patient_id"] != item["metadata"]["patient_id"] for h in out["supporting"])
    assert out["passages"] and out["passages"][0]["collection"] == "kb"
    with (world["folder"] / "blob_5.png").open("rb") as fh:
        r = live.post("/api/collections/cases/diagnose", files={"image": fh}, data={"threshold": "0.999"})
    out = r.json()
    assert r.status_code == 200 and out["labels"][0]["label"] == "blob" and out["threshold"] == 0.999
    assert out["abstained"] == (out["confidence"] < 0.999) and (out["label"] is None) == out["abstained"]
    r = live.post("/api/collections/cases/diagnose", data={"k": "3"})
    assert r.status_code == 400
    r = live.post("/api/collections/kb/diagnose", data={"id": "x" * 64})  # no model there
    assert r.status_code in (404, 409)


def test_ask_with_citations(live, world):
    with (world["folder"] / "blob_0.png").open("rb") as fh:
        r = live.post("/api/ask", files={"image": fh},
                      data={"question": "What does a round bright region with a soft edge represent?",
                            "knowledge": "kb", "cases": "cases"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["generator"].startswith("extractive")
    keys = {c["key"] for c in out["context"]}
    assert "doc:blob-note" in keys and any(k.startswith("case:") for k in keys)
    assert out["grounding"]["cited"] and set(out["grounding"]["cited"]) <= keys
    r = live.post("/api/ask", data={"question": "x", "knowledge": "nope"})
    assert r.status_code == 404


def test_metrics_count_requests_per_route(live):
    live.get("/api/collections")
    m = live.get("/api/metrics").json()
    route = m["routes"]["/api/collections"]
    assert route["requests"] >= 1 and route["by_status"]["200"] >= 1 and route["latency_ms"]["p50"] is not None
    assert all(r.startswith(("/api/", "(unmatched)", "/")) for r in m["routes"])


# ------------------------------------------------------------------ ingest jobs
def test_ingest_job_progress_reaches_done_while_searches_answer(live, world):
    folder = make_images(world["incoming"] / "batch1", n_per_class=80, size=64, seed=7)
    item_id = first_id_of(live, world, "stripes_1.png")
    before = live.get("/api/collections/cases").json()["items"]
    r = live.post("/api/collections/cases/jobs", "writer", json={"folder": "batch1", "manifest": "manifest.csv"})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    answered_while_running, states, deadline = 0, [], time.monotonic() + 300
    while time.monotonic() < deadline:
        job = live.get(f"/api/jobs/{job_id}").json()
        states.append((job["state"], job["done"]))
        if job["state"] in ("done", "failed"):
            break
        if job["state"] == "running":
            s = live.post("/api/collections/cases/search/item", json={"id": item_id, "k": 3})
            assert s.status_code == 200, s.text
            if live.get(f"/api/jobs/{job_id}").json()["state"] == "running":
                answered_while_running += 1
        time.sleep(0.05)
    assert job["state"] == "done", job
    assert job["result"]["accepted"] == 160 and job["done"] == job["total"] == 160
    assert answered_while_running >= 1, states
    dones = [d for s, d in states if s == "running"]
    assert dones == sorted(dones)  # progress only moves forward
    assert live.get("/api/collections/cases").json()["items"] == before + 160
    r = search_upload(live, folder / "blob_10.png", k=1)
    assert r.json()["hits"][0]["source"] == stored_name(world, "blob_10.png")  # searchable at once
    assert live.get("/api/jobs").json()["jobs"][0]["id"] == job_id


def test_dicom_ingest_job_into_a_new_collection_and_its_thumbnails(live, world, dicom_files):
    import shutil

    folder = world["incoming"] / "export"
    folder.mkdir()
    for f in dicom_files:
        shutil.copy(f, folder / f.name)
    r = live.post("/api/collections/ct-job/jobs", "writer", json={"folder": "export", "kind": "dicom"})
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 300
    while (job := live.get(f"/api/jobs/{r.json()['id']}").json())["state"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert job["state"] == "done", job
    assert job["result"]["accepted"] >= 4 and job["done"] == job["total"] == len(dicom_files)
    assert "ct-job" in live.get("/api/collections").json()["collections"]
    ledger = live.get("/api/collections/ct-job/ledger").json()
    assert ledger["by_status"]["accepted"] == job["result"]["accepted"]
    ct = next(p for p in dicom_files if p.name == "CT_small.dcm")
    hit = live.post("/api/collections/ct-job/search/image", files={"image": ("ct.dcm", ct.read_bytes())},
                    data={"k": "1"}).json()["hits"][0]
    assert hit["metadata"]["modality"] == "CT" and hit["score"] > 0.99
    thumb = live.get(f"/api/collections/ct-job/thumbnails/{hit['id']}")
    assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.content)).size[0] > 0  # decoded into the cache


def test_ingest_job_refuses_folders_outside_the_roots(live, world):
    r = live.post("/api/collections/cases/jobs", "writer", json={"folder": str(world["folder"])})
    assert r.status_code == 403 and r.json()["error"] == "folder_not_allowed"
    r = live.post("/api/collections/cases/jobs", "writer", json={"folder": "../images"})
    assert r.status_code == 403
    r = live.post("/api/collections/cases/jobs", "writer", json={"folder": "/etc"})
    assert r.status_code == 403
    assert live.get("/api/jobs/nope").status_code == 404


# ------------------------------------------------------------------ the access log holds no PHI
def test_access_log_has_no_patient_values_query_text_or_query_strings(live, world):
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Keep(level=logging.DEBUG)
    watched = [logging.getLogger(), logging.getLogger("caselens"), logging.getLogger("uvicorn"),
               logging.getLogger("uvicorn.error")]
    for lg in watched:
        lg.addHandler(handler)
    try:
        item = live.get(f"/api/collections/cases/items/{first_id_of(live, world, 'blob_2.png')}").json()
        patient = item["metadata"]["patient_id"]  # a patient value (pseudonym)
        canaries = [patient, "CANARYTEXT7731", "CANARYWHERE5512", "CANARYQUESTION9021", "CANARYFILE4410",
                    "CANARYFILTER3381", "size=77", item["id"]]
        search_upload(live, world["folder"] / "blob_2.png", k=3, filters={"patient_id": patient})
        search_upload(live, world["folder"] / "blob_2.png", where="label <> 'CANARYWHERE5512'")
        live.post("/api/collections/kb/search/text", json={"text": "CANARYTEXT7731 nodule"})
        live.post("/api/collections/cases/search/item", json={"id": item["id"], "filters": {"label": "CANARYFILTER3381"}})
        live.post("/api/ask", data={"question": "CANARYQUESTION9021 what is a blob?", "knowledge": "kb"})
        with (world["folder"] / "blob_2.png").open("rb") as fh:
            live.post("/api/collections/cases/search/image", files={"image": ("CANARYFILE4410.png", fh, "image/png")})
        live.post("/api/collections/cases/search/image",
                  files={"image": ("CANARYFILE4410.png", b"CANARYTEXT7731 not an image", "image/png")})
        live.get(f"/api/collections/cases/thumbnails/{item['id']}", params={"size": 77})
        live.get(f"/api/collections/cases/items/{patient}")  # a patient value in a path: 404, not logged
    finally:
        for lg in watched:
            lg.removeHandler(handler)
    log_text = (world["root"] / "access.log").read_text()
    lines = [json.loads(x) for x in log_text.splitlines()]
    assert lines and {"time", "method", "route", "status", "ms", "token"} == set(lines[-1])
    assert "/api/collections/{name}/thumbnails/{item_id}" in {x["route"] for x in lines}
    assert {"reader"} <= {x["token"] for x in lines}
    for canary in canaries:
        assert canary not in log_text, canary
        assert not any(canary in r for r in records), canary
    assert "?" not in log_text


# ------------------------------------------------------------------ the CLI
def test_cli_token_commands_and_serve_subprocess(world, capsys):
    from caselens.cli import main

    home = world["home"]
    assert main(["--home", str(home), "token", "create", "cli-user", "--scope", "write"]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert token.startswith("clk_")
    assert main(["--home", str(home), "token", "list"]) == 0
    listed = capsys.readouterr().out
    assert "cli-user\twrite" in listed and token not in listed
    assert main(["--home", str(home), "serve", "--no-auth", "--host", "0.0.0.0"]) == 2
    assert "loopback" in capsys.readouterr().err
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "caselens.cli", "--home", str(home), "serve", "--port",
                             str(port), "--generator", "extractive"], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if requests.get(url + "/api/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.2)
        assert requests.get(url + "/api/collections", timeout=10).status_code == 401
        r = requests.get(url + "/api/collections", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert {"cases", "kb"} <= set(r.json()["collections"])
        assert requests.get(url + "/", timeout=10).text.startswith("<!doctype html>")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert '"route":"/api/collections"' in err and token not in err  # access log on stderr, no token
    assert main(["--home", str(home), "token", "revoke", "cli-user"]) == 0
    assert main(["--home", str(home), "token", "revoke", "cli-user"]) == 1
