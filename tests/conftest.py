"""Shared fixtures: real DICOM files from pydicom, small image folders, session-scoped encoders."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHARED_DATA = SHARED / "data"
SHARED_MODELS = SHARED / "models"


def needs_shared(path: Path) -> pytest.MarkDecorator:
    """Skip unless ``path`` under ../shared exists."""
    return pytest.mark.skipif(not path.exists(), reason=f"{path} is absent (shared evaluation data not here)")


@pytest.fixture(scope="session")
def minilm():
    """The packaged all-MiniLM-L6-v2 encoder, loaded once."""
    from caselens.ingest.encoders import load_encoder

    return load_encoder("sentence-transformers:all-MiniLM-L6-v2")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """An empty caselens home folder."""
    path = tmp_path / "home"
    path.mkdir()
    return path


def make_images(folder: Path, n_per_class: int = 6, size: int = 48, seed: int = 0) -> Path:
    """Two visually distinct classes (stripes vs blobs) as PNGs plus a manifest with patients."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["path,label,patient_id,age"]
    for i in range(n_per_class):
        yy, xx = np.mgrid[:size, :size]
        stripes = ((np.sin(xx / (2 + i % 3)) > 0) * 200 + rng.integers(0, 40, (size, size))).astype(np.uint8)
        blob = (np.exp(-((xx - size / 2) ** 2 + (yy - size / 2) ** 2) / (60 + 10 * i)) * 230
                + rng.integers(0, 20, (size, size))).astype(np.uint8)
        Image.fromarray(stripes, "L").save(folder / f"stripes_{i}.png")
        Image.fromarray(blob, "L").convert("RGB").save(folder / f"blob_{i}.png")
        rows.append(f"stripes_{i}.png,stripes,P{i % 3},{40 + i}")
        rows.append(f"blob_{i}.png,blob,P{3 + i % 3},{60 + i}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_images(tmp_path / "images")


@pytest.fixture(scope="session")
def dicom_files() -> list[Path]:
    """A few real DICOM files shipped with pydicom (CT, MR, RLE MR, JPEG RGB, YBR colour, multi-frame RT dose)."""
    from pydicom.data import get_testdata_file

    names = ["CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "SC_rgb_jpeg.dcm", "examples_ybr_color.dcm", "rtdose.dcm"]
    return [Path(get_testdata_file(n)) for n in names]


@pytest.fixture
def dicom_folder(tmp_path: Path, dicom_files: list[Path]) -> Path:
    folder = tmp_path / "dicom"
    folder.mkdir()
    for f in dicom_files:
        shutil.copy(f, folder / f.name)
    return folder


class ChatServer:
    """A local HTTP server speaking OpenAI's chat-completions protocol: it records each request
    (path, Authorization header, JSON body) in ``seen`` and answers with ``reply``."""

    def __init__(self) -> None:
        import http.server
        import json
        import threading

        self.seen: list[dict] = []
        self.reply = "ok"
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                data = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant",
                                                                        "content": outer.reply}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def chat_server():
    """A running :class:`ChatServer`, shut down after the test."""
    server = ChatServer()
    yield server
    server.server.shutdown()


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A local Ray cluster for the Ray runner's tests (2 CPUs, no dashboard), shut down at the end;
    yields the fault-point folder its workers watch (``caselens.ingest.ray_stages.FAULTS_ENV``)."""
    ray = pytest.importorskip("ray")
    from caselens.ingest.ray_stages import FAULTS_ENV

    faults = tmp_path_factory.mktemp("ray-faults")
    before = os.environ.get(FAULTS_ENV)
    os.environ[FAULTS_ENV] = str(faults)  # set before the cluster starts: its workers inherit it
    if ray.is_initialized():
        ray.shutdown()
    with warnings.catch_warnings():  # Ray starts its processes with fork+exec: nothing of Lance runs there
        warnings.filterwarnings("ignore", message="lancedb fork support")
        warnings.filterwarnings("ignore", message="lance is not fork-safe")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield faults
    finally:
        ray.shutdown()
        if before is None:
            os.environ.pop(FAULTS_ENV, None)
        else:
            os.environ[FAULTS_ENV] = before
