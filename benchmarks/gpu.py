"""GPU throughput in one run: FAISS GPU build and search at 1M and 10M vectors, and open_clip
ViT-B/16 image encoding through the caselens ingest pipeline.

What it measures
----------------
**FAISS** (``gpu_faiss.json``): ``--sizes`` (default 1M and 10M) clustered unit vectors of
``--dim`` 512, made on the GPU; for each index type — ``GpuIndexFlatIP`` (exact, the baseline),
``GpuIndexIVFFlat`` (nlist ~ 4*sqrt(n), nprobe 32) and ``GpuIndexCagra`` (where this faiss-gpu
build has it; graph degree 32) — build seconds, batch search of ``--queries`` queries (QPS),
single-query p50/p99 ms, and recall@10 against the exact answer of 1,000 queries.

**open_clip** (``gpu_open_clip.json``): ViT-B-16 with random weights (throughput does not depend
on the weights) written as a ``local-dir:`` model and loaded by caselens' registry:

* model alone, on tensors already on the GPU: fp32, TF32, fp16 autocast (AMP) at batch 64/256/512;
* caselens ``ingest`` of ``--images`` JPEG files (256x256) into a fresh collection with the
  encoder as it is (what ``caselens ingest`` does today): images/s;
* DataLoader-style: ``torch.utils.data.DataLoader`` workers decoding and preprocessing the same
  files while the GPU encodes with AMP: images/s (what the pipeline reaches when decoding
  overlaps encoding). Target: >= 1,500 images/s (clip-retrieval's figure on an RTX 3080).

open_clip runs first (about 2 minutes on a large GPU), then FAISS with the time left. Every
stage checks the time left (``--time-limit``, default 480 s) and is skipped, with the reason
recorded, when its estimate does not fit; a stage that fails records its error and the run goes
on. Progress lines go to stdout. The script installs nothing: FAISS on the GPU needs a faiss
build with GPU support (``pip install faiss-gpu`` or, for CAGRA, ``faiss-gpu-cuvs``, instead of
``faiss-cpu``); without one the FAISS part is skipped with that reason.

**Dry mode** (``--dry``, automatic without CUDA): the same code on tiny sizes on the CPU — CPU
FAISS (IndexFlatIP, IVF, HNSW in place of CAGRA), a tiny open_clip model, a few images — writing
``gpu_*_dry.json``; ``tests/test_gpu_benchmark.py`` runs it.

Rerun
-----
    python benchmarks/gpu.py --time-limit 480            # on a CUDA machine, one command, < 8 min
    python benchmarks/gpu.py --dry --out-dir /tmp/gpu     # anywhere, seconds

Writes ``benchmarks/results/gpu_faiss.json`` and ``benchmarks/results/gpu_open_clip.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results"
START = time.perf_counter()

TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}


def say(msg: str) -> None:
    print(f"[gpu.py {time.perf_counter() - START:6.1f}s] {msg}", flush=True)


class Clock:
    """The run's time budget: stages ask whether their estimate still fits."""

    def __init__(self, limit: float):
        self.limit = limit

    def left(self) -> float:
        return self.limit - (time.perf_counter() - START)

    def fits(self, estimate: float) -> bool:
        return estimate < self.left()


def stage(results: dict[str, Any], name: str, fn: Callable[[], Any], clock: Clock, estimate: float) -> Any:
    """Run one stage unless it does not fit; its result, ``{"skipped": why}`` or ``{"error": ...}``."""
    if not clock.fits(estimate):
        results[name] = {"skipped": f"estimated {estimate:.0f}s, {clock.left():.0f}s left of the time limit"}
        say(f"{name}: skipped ({results[name]['skipped']})")
        return None
    say(f"{name}: start (estimate {estimate:.0f}s)")
    t = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as exc:  # one failing stage must not cost the rest of the run
        results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=4)}
        say(f"{name}: FAILED {type(exc).__name__}: {exc}")
        return None
    results[name]["stage_seconds"] = round(time.perf_counter() - t, 2)
    say(f"{name}: done in {time.perf_counter() - t:.1f}s: "
        + json.dumps({k: v for k, v in results[name].items() if not isinstance(v, (dict, list))})[:300])
    return results[name]


def machine(torch: Any, cuda: bool) -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
                            "torch": torch.__version__, "cuda": cuda}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    cuda_version=torch.version.cuda)
    try:
        import faiss
        info.update(faiss=faiss.__version__, faiss_gpus=int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0)
    except ImportError:
        info["faiss"] = None
    return info


# ----------------------------------------------------------------------------------- FAISS
def clustered(n: int, dim: int, device: str, seed: int = 0) -> Any:
    """``n`` unit vectors around 4096 centres (a torch tensor on ``device``), made in blocks."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    centres = torch.randn(4096, dim, device=device, generator=g)
    out = torch.empty(n, dim, device=device)
    for s in range(0, n, 1 << 20):
        m = min(1 << 20, n - s)
        pick = torch.randint(0, 4096, (m,), device=device, generator=g)
        block = centres[pick] + 0.6 * torch.randn(m, dim, device=device, generator=g)
        out[s:s + m] = block / block.norm(dim=1, keepdim=True)
    return out


def recall_at(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found, truth)]))


def faiss_size(n: int, dim: int, n_queries: int, gpu: bool, clock: Clock) -> dict[str, Any]:
    """Build and search each index type over ``n`` vectors; see the module doc."""
    import faiss
    import faiss.contrib.torch_utils  # noqa: F401 - lets indexes take torch tensors (GPU memory too)
    import torch

    device = "cuda" if gpu else "cpu"
    t = time.perf_counter()
    data = clustered(n, dim, device)
    queries = clustered(n_queries, dim, device, seed=1)
    out: dict[str, Any] = {"n": n, "dim": dim, "queries": n_queries, "data_seconds": round(time.perf_counter() - t, 2)}
    res = faiss.StandardGpuResources() if gpu else None
    nlist = max(16, int(4 * math.sqrt(n)) // 64 * 64) if gpu else max(8, int(math.sqrt(n)))
    builders: dict[str, Callable[[], Any]] = {}
    if gpu:
        builders["flat"] = lambda: faiss.GpuIndexFlatIP(res, dim)

        def ivf() -> Any:
            index = faiss.GpuIndexIVFFlat(res, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(data[torch.randperm(n, device=device)[:min(n, 64 * nlist)]])
            index.nprobe = 32
            return index
        builders[f"ivf{nlist}_flat"] = ivf
        if hasattr(faiss, "GpuIndexCagra"):
            def cagra() -> Any:
                cfg = faiss.GpuIndexCagraConfig()
                cfg.graph_degree, cfg.intermediate_graph_degree = 32, 64
                index = faiss.GpuIndexCagra(res, dim, faiss.METRIC_L2, cfg)  # unit vectors: L2 ranks as IP
                index.train(data)  # CAGRA builds its graph from the training call
                return index
            builders["cagra32"] = cagra
        else:
            out["cagra32"] = {"skipped": "this faiss build has no GpuIndexCagra (faiss-gpu built with cuVS has)"}
    else:
        builders["flat"] = lambda: faiss.IndexFlatIP(dim)

        def ivf_cpu() -> Any:
            index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
            index.train(data[:min(n, 64 * nlist)])
            index.nprobe = 8
            return index
        builders[f"ivf{nlist}_flat"] = ivf_cpu
        builders["hnsw32"] = lambda: faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    truth = None
    flat_seconds = None
    for name, make in builders.items():
        # rough estimate from the exact index's build + search time at this size
        estimate = 5.0 if flat_seconds is None else flat_seconds * (20 if "cagra" in name or "hnsw" in name else 4)
        if not clock.fits(estimate):
            out[name] = {"skipped": f"estimated {estimate:.0f}s, {clock.left():.0f}s left"}
            say(f"  {name} @ {n}: skipped")
            continue
        try:
            t = time.perf_counter()
            index = make()
            if name.startswith("cagra"):
                pass  # built by train()
            else:
                for s in range(0, n, 1 << 20):
                    index.add(data[s:s + (1 << 20)])
            if gpu:
                torch.cuda.synchronize()
            build = time.perf_counter() - t
            k = 10
            params = None
            if name.startswith("cagra") and hasattr(faiss, "SearchParametersCagra"):
                params = faiss.SearchParametersCagra()
                params.itopk_size = 64
            search = (lambda q: index.search(q, k, params=params)) if params is not None else (lambda q: index.search(q, k))
            search(queries[:16])  # warm-up
            t = time.perf_counter()
            _, found = search(queries)
            if gpu:
                torch.cuda.synchronize()
            batch = time.perf_counter() - t
            found = found.cpu().numpy() if hasattr(found, "cpu") else np.asarray(found)
            if name == "flat":
                truth = found[:1000]
                flat_seconds = build + batch
            lat = []
            for i in range(min(100, n_queries)):
                t = time.perf_counter()
                search(queries[i:i + 1])
                if gpu:
                    torch.cuda.synchronize()
                lat.append((time.perf_counter() - t) * 1000)
            out[name] = {"build_seconds": round(build, 3), "batch_search_seconds": round(batch, 4),
                         "qps": round(n_queries / batch, 1),
                         "single_query_p50_ms": round(float(np.percentile(lat, 50)), 3),
                         "single_query_p99_ms": round(float(np.percentile(lat, 99)), 3),
                         "recall@10": round(recall_at(found[:1000], truth), 4) if truth is not None else None}
            if gpu:  # FAISS allocates outside torch: read the device's own counter
                free, total = torch.cuda.mem_get_info()
                out[name]["device_memory_used_gb"] = round((total - free) / 2**30, 2)
            say(f"  {name} @ {n}: " + json.dumps(out[name]))
            del index
            if gpu:
                torch.cuda.empty_cache()
        except Exception as exc:
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
            say(f"  {name} @ {n}: FAILED {exc}")
    del data, queries
    return out


# -------------------------------------------------------------------------------- open_clip
def write_model(folder: Path, dry: bool) -> tuple[str, dict[str, Any]]:
    """A randomly initialised ViT-B-16 (dry: a tiny CLIP) as an open_clip ``local-dir`` model."""
    import open_clip
    import torch
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    cfg = TINY_CLIP if dry else open_clip.get_model_config("ViT-B-16")
    torch.manual_seed(0)
    model = CLIP(**json.loads(json.dumps(cfg))).eval()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": cfg, "preprocess_cfg": {"mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD)}}))
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    return f"local-dir:{folder}", cfg


def write_images(folder: Path, n: int, size: int) -> list[Path]:
    """``n`` JPEG files: smooth gradients with noise (photo-like sizes), written by threads."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size

    def one(i: int) -> Path:
        rng = np.random.default_rng(i)
        a, b, c = rng.uniform(0, 255, 3)
        rgb = np.stack([a * xx + 40 * yy, b * yy + 30 * xx, c * (1 - xx)], -1) + rng.normal(0, 12, (size, size, 3))
        path = folder / f"img_{i:06d}.jpg"
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB").save(path, quality=90)
        return path

    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        return list(pool.map(one, range(n)))


def model_alone(encoder: Any, batches: list[int], precisions: list[str], seconds: float, clock: Clock) -> dict[str, Any]:
    """images/s of the vision tower on random input already on the device."""
    import torch

    model, device = encoder.model, encoder.device
    size = encoder.preprocess.transforms[0].size if hasattr(encoder.preprocess, "transforms") else 224
    side = size if isinstance(size, int) else size[0]
    out: dict[str, Any] = {}
    for precision in precisions:
        for b in batches:
            key = f"{precision}_batch{b}"
            if not clock.fits(seconds + 5):
                out[key] = {"skipped": "time limit"}
                continue
            x = torch.randn(b, 3, side, side, device=device)
            torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
            torch.backends.cudnn.allow_tf32 = precision == "tf32"
            autocast = torch.autocast("cuda", dtype=torch.float16) if precision == "amp_fp16" and device == "cuda" \
                else torch.autocast("cpu", enabled=False)
            try:
                with torch.no_grad(), autocast:
                    for _ in range(3):
                        model.encode_image(x)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    n, t = 0, time.perf_counter()
                    while time.perf_counter() - t < seconds or n < 3:
                        model.encode_image(x)
                        n += 1
                    if device == "cuda":
                        torch.cuda.synchronize()
                    elapsed = time.perf_counter() - t
                out[key] = {"images_per_s": round(n * b / elapsed, 1), "batches": n}
            except Exception as exc:  # e.g. out of memory at the largest batch
                out[key] = {"error": f"{type(exc).__name__}: {exc}"}
            say(f"  model alone {key}: {out[key]}")
    torch.backends.cuda.matmul.allow_tf32 = False
    return out


def through_pipeline(spec: str, folder: Path, batch: int, device: str, home: Path) -> dict[str, Any]:
    """caselens ``ingest`` of the image folder with the encoder as it is."""
    from caselens.indexes.collection import Collection
    from caselens.ingest.encoders import load_encoder
    from caselens.ingest.pipeline import IngestConfig, ingest
    from caselens.ingest.sources import ImageSource

    encoder = load_encoder(spec, {"batch_size": batch, "device": device})
    coll = Collection.create("gpu-bench", encoder.info.to_record(), home)
    t = time.perf_counter()
    report = ingest(ImageSource(folder, secret=coll.secret()), coll, encoder,
                    IngestConfig(batch_size=batch, build_index=False, progress=False, record_inputs=False))
    seconds = time.perf_counter() - t
    return {"images": report.accepted, "rejected": dict(report.rejected), "seconds": round(seconds, 2),
            "images_per_s": round(report.accepted / seconds, 1), "batch": batch, "precision": "fp32 (encoder as is)"}


class _Files:
    """Dataset of image files -> preprocessed tensors (decoded in DataLoader workers)."""

    def __init__(self, files: list[Path], preprocess: Any):
        self.files, self.preprocess = files, preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Any:
        from PIL import Image

        with Image.open(self.files[i]) as im:
            return self.preprocess(im.convert("RGB"))


def dataloader_overlap(encoder: Any, files: list[Path], batch: int, workers: int, amp: bool) -> dict[str, Any]:
    """Decode + preprocess in DataLoader workers while the model encodes (AMP on CUDA)."""
    import torch
    from torch.utils.data import DataLoader

    device = encoder.device
    loader = DataLoader(_Files(files, encoder.preprocess), batch_size=batch, num_workers=workers,
                        pin_memory=device == "cuda", prefetch_factor=4 if workers else None)
    autocast = torch.autocast("cuda", dtype=torch.float16) if amp and device == "cuda" else torch.autocast("cpu", enabled=False)
    n, t = 0, time.perf_counter()
    with torch.no_grad(), autocast:
        for x in loader:
            v = encoder.model.encode_image(x.to(device, non_blocking=True))
            v = torch.nn.functional.normalize(v.float(), dim=-1).cpu()
            n += len(v)
    seconds = time.perf_counter() - t
    return {"images": n, "seconds": round(seconds, 2), "images_per_s": round(n / seconds, 1), "batch": batch,
            "workers": workers, "precision": "amp_fp16" if amp and device == "cuda" else "fp32"}


def open_clip_bench(args: argparse.Namespace, cuda: bool, clock: Clock, work: Path) -> dict[str, Any]:
    from caselens.ingest.encoders import load_encoder

    out: dict[str, Any] = {}
    device = "cuda" if cuda else "cpu"
    t = time.perf_counter()
    spec, cfg = write_model(work / "vit-b-16-random", args.dry)
    files = write_images(work / "images", args.images, 256 if not args.dry else 48)
    out["setup"] = {"model": "tiny CLIP (dry)" if args.dry else "ViT-B-16, random weights", "model_cfg": cfg,
                    "images": len(files), "image_size": 256 if not args.dry else 48,
                    "seconds": round(time.perf_counter() - t, 1)}
    say(f"open_clip setup: {out['setup']['model']}, {len(files)} JPEGs in {out['setup']['seconds']}s")
    encoder = load_encoder(spec, {"batch_size": 256, "device": device})
    batches = [4] if args.dry else [64, 256, 512]
    precisions = ["fp32"] if args.dry else ["fp32", "tf32", "amp_fp16"]
    stage(out, "model_alone", lambda: model_alone(encoder, batches, precisions, 0.5 if args.dry else 6.0, clock),
          clock, len(batches) * len(precisions) * (1 if args.dry else 9))
    batch = 8 if args.dry else 256
    per_image = 1 / 300  # today's pipeline: decoding on one core, well under 1,000 images/s
    stage(out, "pipeline_as_is", lambda: through_pipeline(spec, work / "images", batch, device, work / "home"),
          clock, 10 if args.dry else len(files) * per_image + 20)
    workers = 0 if args.dry else min(16, os.cpu_count() or 1)
    stage(out, "dataloader_overlap_amp", lambda: dataloader_overlap(encoder, files, batch, workers, amp=True),
          clock, 10 if args.dry else len(files) / 1000 + 20)
    best = max([v.get("images_per_s", 0) for k, v in out.items() if isinstance(v, dict) and "images_per_s" in v] or [0])
    out["target_images_per_s"] = 1500
    out["best_end_to_end_images_per_s"] = best
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry", action="store_true", help="tiny sizes on the CPU (automatic without CUDA)")
    p.add_argument("--time-limit", type=float, default=480.0, help="seconds for the whole run (stages that "
                   "would not fit are skipped)")
    p.add_argument("--sizes", default=None, help="FAISS sizes (default 1000000,10000000; dry 2000,5000)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=None, help="batch search queries (default 10000; dry 200)")
    p.add_argument("--images", type=int, default=None, help="JPEG files through the pipeline (default 8192; dry 24)")
    p.add_argument("--skip", nargs="*", default=[], choices=["faiss", "open_clip"])
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available() and not args.dry
    if not cuda and not args.dry:
        say("no CUDA device: running the dry mode (tiny sizes on the CPU)")
        args.dry = True
    sizes = [int(x) for x in (args.sizes or ("2000,5000" if args.dry else "1000000,10000000")).split(",")]
    args.queries = args.queries or (200 if args.dry else 10_000)
    args.images = args.images or (24 if args.dry else 8192)
    clock = Clock(args.time_limit)
    suffix = "_dry" if args.dry else ""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    common = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "dry": args.dry,
              "machine": machine(torch, cuda), "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}
    say(f"start: {json.dumps(common['machine'])}; time limit {args.time_limit:.0f}s")
    work = Path(tempfile.mkdtemp(prefix="caselens-gpu-"))
    written = []
    try:
        # open_clip first: bounded (~2 min), and the part with a target; FAISS gets the time left
        if "open_clip" not in args.skip:
            oc = {"benchmark": "gpu_open_clip", **common, **open_clip_bench(args, cuda, clock, work)}
            path = args.out_dir / f"gpu_open_clip{suffix}.json"
            path.write_text(json.dumps(oc, indent=2))
            written.append(path)
            say(f"wrote {path}")
            if cuda:
                torch.cuda.empty_cache()  # the model's memory back before the FAISS part
        if "faiss" not in args.skip:
            faiss_out: dict[str, Any] = {"benchmark": "gpu_faiss", **common, "sizes": {}}
            gpu_faiss = common["machine"].get("faiss_gpus", 0) > 0 and cuda
            if cuda and not gpu_faiss:
                faiss_out["skipped"] = ("faiss has no GPU support here (faiss-cpu); install a GPU build "
                                        "(faiss-gpu, or faiss-gpu-cuvs for CAGRA) in place of faiss-cpu, and rerun")
                say(f"faiss: {faiss_out['skipped']}")
            else:
                for n in sizes:
                    # generation + flat build + 10k exact queries scale ~linearly; 10M needs ~10x 1M
                    done = [v for v in faiss_out["sizes"].values() if "flat" in v and "build_seconds" in v.get("flat", {})]
                    # (capped: each index build inside checks the clock again before it starts)
                    estimate = 5.0 if not done else min(120.0, sum(
                        x.get("stage_seconds", 0) for x in done) * n / max(v["n"] for v in done) * 0.5)
                    stage(faiss_out["sizes"], str(n),
                          lambda n=n: faiss_size(n, args.dim, args.queries, gpu_faiss, clock), clock, estimate)
            path = args.out_dir / f"gpu_faiss{suffix}.json"
            path.write_text(json.dumps(faiss_out, indent=2))
            written.append(path)
            say(f"wrote {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"done: {', '.join(str(p) for p in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
