"""``benchmarks/gpu.py`` in its dry mode (tiny sizes, CPU FAISS, a tiny open_clip model): the same
code paths the GPU run takes, so the one prepared command works when a GPU machine is lent."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _gpu_script():
    spec = importlib.util.spec_from_file_location("caselens_bench_gpu", ROOT / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_dry_run_writes_both_results(tmp_path: Path) -> None:
    # in its own process, as it runs on the GPU machine: it imports faiss.contrib.torch_utils, which
    # replaces Index.search process-wide
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--dry", "--sizes", "600,1200",
                           "--queries", "40", "--images", "6", "--time-limit", "300", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    printed = done.stdout
    assert "[gpu.py" in printed and "done:" in printed  # progress lines
    faiss_out = json.loads((tmp_path / "gpu_faiss_dry.json").read_text())
    assert faiss_out["dry"] is True and set(faiss_out["sizes"]) == {"600", "1200"}
    for size in faiss_out["sizes"].values():
        assert size["flat"]["recall@10"] == 1.0  # the exact index is its own ground truth
        kinds = [k for k in size if isinstance(size[k], dict)]
        assert any(k.startswith("ivf") for k in kinds) and "hnsw32" in kinds
        for k in kinds:
            assert "error" not in size[k], size[k]
            assert size[k]["qps"] > 0 and 0.0 <= size[k]["recall@10"] <= 1.0
    clip = json.loads((tmp_path / "gpu_open_clip_dry.json").read_text())
    assert clip["setup"]["images"] == 6
    assert clip["pipeline_as_is"]["images"] == 6 and clip["pipeline_as_is"]["images_per_s"] > 0
    assert clip["dataloader_overlap_amp"]["images"] == 6
    assert clip["model_alone"]["fp32_batch4"]["images_per_s"] > 0
    assert clip["target_images_per_s"] == 1500


def test_stages_that_do_not_fit_are_skipped_with_a_reason(tmp_path: Path) -> None:
    gpu = _gpu_script()
    results: dict = {}
    clock = gpu.Clock(limit=0.0)
    assert gpu.stage(results, "big", lambda: {"ran": True}, clock, estimate=10) is None
    assert "skipped" in results["big"] and "time limit" in results["big"]["skipped"]
    clock = gpu.Clock(limit=1e9)
    gpu.stage(results, "broken", lambda: 1 / 0, clock, estimate=1)
    assert results["broken"]["error"].startswith("ZeroDivisionError")
