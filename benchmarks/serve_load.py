"""Load test of ``caselens serve`` on loopback: search latency (p50/p90/p99) and requests/s at 1, 8
and 32 concurrent clients, image uploads and text queries, against the in-process library call.

    python benchmarks/serve_load.py --work /tmp/caselens-serve-bench      # builds once, then reuses

* ``images``: 4,000 synthetic 128x128 images in 8 classes (stripes, blobs, checkers, rings, ...
  with random parameters and noise; a manifest with label, patient_id, modality), ingested with
  the ``classic`` encoder. Image queries upload PNGs not in the collection.
* ``kb``: 4,000 synthetic passages with the default MiniLM text encoder. Text queries go there:
  no encoder with a text tower for images can be installed offline (see ../shared/models), so
  "text queries" are measured on a knowledge collection of the same size.
* The server runs as ``caselens serve`` in its own process (collections warm, rate limit out of
  the way, default threads), the clients are threads here with keep-alive sessions; both share
  the machine's cores, which the JSON records with the load average.
* Baseline: the same queries in this process through the library (``search(collection,
  image=path)`` reads and decodes the file, encodes, searches; ``search(collection, text=...)``).
  Target: p50 at 1 client within 1.5x of the baseline p50.
* A bounded loop: each client makes ``--requests`` requests (fewer per client at higher
  concurrency, at least ``--min-per-client``) and stops at ``--max-seconds``.
* ``during_ingest``: 1-client image searches while an ingest job (``--ingest-n`` new images,
  through the API) runs in the server: do reads wait for the writer?

Writes benchmarks/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ENCODER_THREADS = 1  # `caselens serve --encoder-threads` default, used for the in-process baseline too
CLASSES = ("stripes", "blobs", "checker", "rings", "gradient", "diagonal", "dots", "noise")
WORDS = ("opacity consolidation nodule effusion pneumothorax fracture edema atelectasis cardiomegaly mass "
         "infiltrate lesion calcification fibrosis emphysema hernia lobe pleural bilateral unilateral right left "
         "upper lower middle acute chronic mild severe diffuse focal patchy round irregular margin density "
         "contrast enhancement follow-up biopsy recommended benign malignant suspicious stable").split()


def synthetic(cls: str, rng: np.random.Generator, size: int = 128) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    f = rng.uniform(3, 12)
    if cls == "stripes":
        img = (np.sin(xx / f) > 0) * 200.0
    elif cls == "blobs":
        img = np.zeros((size, size), np.float32)
        for _ in range(rng.integers(1, 4)):
            cx, cy, r = rng.uniform(20, size - 20), rng.uniform(20, size - 20), rng.uniform(80, 400)
            img += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / r) * 220
    elif cls == "checker":
        img = (((xx // (f * 2)) + (yy // (f * 2))) % 2) * 200.0
    elif cls == "rings":
        img = (np.sin(np.hypot(xx - size / 2, yy - size / 2) / f * 2) > 0) * 200.0
    elif cls == "gradient":
        a = rng.uniform(0, np.pi)
        img = ((np.cos(a) * xx + np.sin(a) * yy) / size) * 230
    elif cls == "diagonal":
        img = (np.sin((xx + yy) / f) > 0) * 200.0
    elif cls == "dots":
        img = ((np.sin(xx / f) * np.sin(yy / f)) > 0.5) * 220.0
    else:
        img = rng.normal(120, 40, (size, size))
    img = img + rng.normal(0, rng.uniform(5, 25), (size, size))
    return np.clip(img, 0, 255).astype(np.uint8)


def build(work: Path, n: int, kb_n: int) -> Path:
    """The home with ``images`` and ``kb`` (built once; reused when present with n items)."""
    from caselens.indexes.collection import Collection
    from caselens.cli import main

    home = work / "home"
    if Collection.exists("images", home) and Collection.open("images", home).count() >= n and \
            Collection.exists("kb", home) and Collection.open("kb", home).count() >= kb_n:
        return home
    rng = np.random.default_rng(0)
    folder = work / "images"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        cls = CLASSES[i % len(CLASSES)]
        name = f"{cls}_{i:05d}.png"
        if not (folder / name).exists():
            Image.fromarray(synthetic(cls, rng)).save(folder / name)
        rows.append({"path": name, "label": cls, "patient_id": f"P{i // 4:05d}", "modality": ("CT", "MR", "CR")[i % 3]})
    with (folder / "manifest.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    if not Collection.exists("images", home):
        main(["--home", str(home), "ingest", "images", "--manifest", str(folder / "manifest.csv"), "-q"])
    corpus = work / "kb.jsonl"
    wr = random.Random(0)
    with corpus.open("w") as fh:
        for i in range(kb_n):
            text = ". ".join(" ".join(wr.choice(WORDS) for _ in range(wr.randint(8, 16))).capitalize()
                             for _ in range(wr.randint(2, 4))) + "."
            fh.write(json.dumps({"id": f"p{i}", "text": text}) + "\n")
    if not Collection.exists("kb", home):
        main(["--home", str(home), "ingest", "kb", "--text", str(corpus), "-q"])
    return home


def queries(work: Path, n: int) -> tuple[list[bytes], list[Path], list[str]]:
    """Query PNGs (not in the collection; bytes and files) and text queries."""
    rng = np.random.default_rng(12345)
    folder = work / "queries"
    folder.mkdir(exist_ok=True)
    paths, blobs = [], []
    for i in range(n):
        path = folder / f"q{i}.png"
        if not path.exists():
            Image.fromarray(synthetic(CLASSES[i % len(CLASSES)], rng)).save(path)
        paths.append(path)
        blobs.append(path.read_bytes())
    wr = random.Random(1)
    texts = [" ".join(wr.choice(WORDS) for _ in range(wr.randint(3, 8))) for _ in range(n)]
    return blobs, paths, texts


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))], 2) if ordered else float("nan")


def summary(lat_ms: list[float], wall: float, errors: int, server_ms: list[float] | None = None) -> dict:
    out = {"n": len(lat_ms), "errors": errors, "p50_ms": pct(lat_ms, 0.5), "p90_ms": pct(lat_ms, 0.9),
           "p99_ms": pct(lat_ms, 0.99), "mean_ms": round(statistics.mean(lat_ms), 2) if lat_ms else None,
           "max_ms": round(max(lat_ms), 2) if lat_ms else None,
           "requests_per_s": round(len(lat_ms) / wall, 2) if wall > 0 else None}
    if server_ms:
        out["library_p50_ms"] = pct(server_ms, 0.5)  # time inside search(), as the server reports it
    return out


def in_process(home: Path, paths: list[Path], texts: list[str], repeats: int) -> dict:
    from caselens.indexes.collection import Collection
    from caselens.retrieval.search import search

    images, kb = Collection.open("images", home), Collection.open("kb", home)
    search(images, image=paths[0], k=10)
    search(kb, text=texts[0], k=10)  # warm: encoders, indexes, join caches
    out = {}
    for kind, call in (("image", lambda i: search(images, image=paths[i % len(paths)], k=10)),
                       ("text", lambda i: search(kb, text=texts[i % len(texts)], k=10))):
        lat = []
        start = time.perf_counter()
        for i in range(repeats):
            t = time.perf_counter()
            call(i)
            lat.append((time.perf_counter() - t) * 1000)
        out[kind] = summary(lat, time.perf_counter() - start, 0)
    return out


class Client:
    def __init__(self, url: str, token: str):
        self.url, self.session = url, requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"

    def image(self, data: bytes) -> requests.Response:
        return self.session.post(self.url + "/api/collections/images/search/image", timeout=120,
                                 files={"image": ("q.png", data, "image/png")}, data={"k": "10"})

    def text(self, text: str) -> requests.Response:
        return self.session.post(self.url + "/api/collections/kb/search/text", json={"text": text, "k": 10},
                                 timeout=120)


def load(url: str, token: str, kind: str, clients: int, per_client: int, max_seconds: float,
         blobs: list[bytes], texts: list[str]) -> dict:
    lat: list[float] = []
    server: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = time.perf_counter() + max_seconds
    barrier = threading.Barrier(clients + 1)

    def run(c: int) -> None:
        client = Client(url, token)
        (client.image(blobs[0]) if kind == "image" else client.text(texts[0]))  # connect + warm
        barrier.wait()
        for i in range(per_client):
            if time.perf_counter() > stop_at:
                break
            j = (c * per_client + i) % len(blobs)
            t = time.perf_counter()
            r = client.image(blobs[j]) if kind == "image" else client.text(texts[j])
            ms = (time.perf_counter() - t) * 1000
            with lock:
                if r.status_code == 200:
                    lat.append(ms)
                    server.append(r.json()["milliseconds"])
                else:
                    errors[0] += 1

    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    for th in threads:
        th.start()
    barrier.wait()
    start = time.perf_counter()
    for th in threads:
        th.join()
    return summary(lat, time.perf_counter() - start, errors[0], server)


def during_ingest(url: str, token: str, writer: str, work: Path, n: int, blobs: list[bytes]) -> dict:
    """1-client image searches while the server ingests ``n`` new images through a job."""
    rng = np.random.default_rng(99)
    batch = work / "incoming" / f"batch-{int(time.time())}"
    batch.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(synthetic(CLASSES[i % len(CLASSES)], rng)).save(batch / f"new_{i:05d}.png")
    client = Client(url, token)
    r = requests.post(url + "/api/collections/images/jobs", headers={"Authorization": f"Bearer {writer}"},
                      json={"folder": batch.name, "label_from_folder": False}, timeout=60)
    r.raise_for_status()
    job_id = r.json()["id"]
    lat, server, errors = [], [], 0
    start = time.perf_counter()
    job = r.json()
    while job["state"] in ("queued", "running") and time.perf_counter() - start < 900:
        t = time.perf_counter()
        resp = client.image(blobs[len(lat) % len(blobs)])
        if resp.status_code == 200:
            lat.append((time.perf_counter() - t) * 1000)
            server.append(resp.json()["milliseconds"])
        else:
            errors += 1
        job = client.session.get(f"{url}/api/jobs/{job_id}", timeout=60).json()
    wall = time.perf_counter() - start
    return {"ingested": n, "job_state": job["state"], "job_seconds": round(wall, 1), "result": job.get("result"),
            "searches": summary(lat, wall, errors, server)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/caselens-serve-bench", help="folder for the collections (outside the repo)")
    p.add_argument("--n", type=int, default=4000, help="images in the collection")
    p.add_argument("--kb-n", type=int, default=4000, help="passages in the text collection")
    p.add_argument("--levels", default="1,8,32", help="concurrent clients")
    p.add_argument("--requests", type=int, default=240, help="requests per level and kind (split over the clients)")
    p.add_argument("--min-per-client", type=int, default=8)
    p.add_argument("--max-seconds", type=float, default=120, help="time bound of one level")
    p.add_argument("--baseline", type=int, default=100, help="in-process queries per kind")
    p.add_argument("--ingest-n", type=int, default=1000, help="images ingested in the during-ingest phase (0: skip)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load.json"))
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from caselens.serve.backend import set_encoder_threads

    set_encoder_threads(ENCODER_THREADS)  # also for the build: 2 torch threads stall on busy shared cores
    t0 = time.perf_counter()
    home = build(work, args.n, args.kb_n)
    build_s = time.perf_counter() - t0
    blobs, paths, texts = queries(work, 64)
    report: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                "loadavg_start": os.getloadavg()},
                    "collections": {"images": args.n, "kb": args.kb_n}, "build_seconds": round(build_s, 1),
                    "encoder_threads": ENCODER_THREADS,
                    "command": " ".join(sys.argv)}
    report["in_process"] = in_process(home, paths, texts, args.baseline)
    print("in-process", json.dumps(report["in_process"]))

    from caselens.serve.auth import TokenStore

    store = TokenStore(home / "tokens.json")
    for name in ("bench-read", "bench-write"):
        store.revoke(name)
    token, writer = store.create("bench-read"), store.create("bench-write", "write")
    (work / "incoming").mkdir(exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "caselens.cli", "--home", str(home), "serve",
                               "--port", str(port), "--collections", "images,kb", "--generator", "extractive",
                               "--encoder-threads", str(ENCODER_THREADS), "--rate-limit", "100000",
                               "--rate-burst", "100000", "--ingest-root", str(work / "incoming"),
                               "--access-log", str(work / "access.log")],
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if requests.get(url + "/api/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the server did not start")
            time.sleep(0.3)
        report["served"] = {}
        for kind in ("image", "text"):
            report["served"][kind] = {}
            for clients in [int(x) for x in args.levels.split(",")]:
                per_client = max(args.min_per_client, args.requests // clients)
                result = load(url, token, kind, clients, per_client, args.max_seconds, blobs, texts)
                report["served"][kind][str(clients)] = result
                print(kind, clients, "clients", json.dumps(result), flush=True)
        ratios = {}
        for kind in ("image", "text"):
            one = report["served"][kind].get("1")
            if one:
                ratios[kind] = round(one["p50_ms"] / report["in_process"][kind]["p50_ms"], 3)
        report["p50_ratio_1_client_vs_in_process"] = ratios
        report["target_p50_within_1.5x"] = all(r <= 1.5 for r in ratios.values())
        report["errors"] = sum(v["errors"] for k in report["served"].values() for v in k.values())
        if args.ingest_n:
            report["during_ingest"] = during_ingest(url, token, writer, work, args.ingest_n, blobs)
            print("during ingest", json.dumps(report["during_ingest"]), flush=True)
        report["server_metrics"] = requests.get(url + "/api/metrics", headers={"Authorization": f"Bearer {token}"},
                                                timeout=30).json()
    finally:
        server.terminate()
        server.wait(timeout=60)
        store.revoke("bench-read")
        store.revoke("bench-write")
    run_id = ((report.get("during_ingest") or {}).get("result") or {}).get("run_id")
    if run_id:  # leave the collection as built, so that a re-run measures the same one
        from caselens.indexes.collection import Collection

        images = Collection.open("images", home)
        added = [r["item_id"] for r in images.ledger(run_id) if r["status"] == "accepted"]
        images.delete(added)
    report["machine"]["loadavg_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
