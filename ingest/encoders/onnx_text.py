"""Sentence-transformers text models run by ONNX Runtime: ``onnx-text:all-MiniLM-L6-v2@int8``.

The same packaged weights as ``sentence-transformers:all-MiniLM-L6-v2``, the same tokenizer
(``tokenizer.json``), the same pooling (the model's ``1_Pooling`` settings: mean or CLS) and L2
normalisation, run by ONNX Runtime instead of PyTorch: 2-4x faster on a CPU.

Names: ``onnx-text:<model>@<precision>`` where ``<model>`` is what ``sentence-transformers:``
accepts (the packaged ``all-MiniLM-L6-v2``, a sentence-transformers folder, a hub name in the
local hub cache) and ``<precision>`` is

* ``fp32``: the transformer exported by ``torch.onnx`` and fused by ONNX Runtime's BERT
  optimiser (attention, layer norm, GELU); vectors agree with PyTorch's to cosine > 0.9999;
* ``int8``: that graph with int8 weights and activations quantised per batch
  (``onnxruntime.quantization.quantize_dynamic``); cosine > 0.98 to PyTorch's vectors.

Without ``@``, ``fp32``. The export runs once per model (a few seconds; it needs torch and
transformers, which search does not) and is cached under ``$CASELENS_CACHE/onnx/<weights hash>/``
(see :func:`caselens.files.cache_dir`), each file written atomically with its sha256 in
``manifest.json``. A file that is missing or does not match its sha256 is exported again.

The fingerprint names the scheme, the precision, the export recipe and a hash of the model
folder's files, so vectors of ``fp32``, ``int8`` and the PyTorch encoder are never mixed in one
collection; it does not depend on the torch or ONNX Runtime version (as the PyTorch encoder's
does not depend on the torch version).

Options: ``batch_size`` (texts per ONNX run, after sorting a call's texts by length so that a run
pads little; default 16), ``threads`` (ONNX Runtime intra-op threads; 0: the physical cores
this process may use), ``query_prefix``, ``document_prefix``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from caselens.errors import EncoderOptionError
from caselens.files import atomic_write_bytes, cache_dir
from caselens.ingest.encoders.base import (Encoder, EncoderInfo, dir_sha256, file_sha256, fingerprint,
                                           physical_cores, take_options)
from caselens.ingest.encoders.registry import register
from caselens.ingest.encoders.text import resolve_text_model

log = logging.getLogger(__name__)

SCHEME = "onnx-text"
PRECISIONS = ("fp32", "int8")
# Bump when the export changes what vectors come out (opset, fusions, quantisation settings): the
# fingerprint changes with it and cached files of another recipe are exported again.
RECIPE = 1
OPSET = 17
MANIFEST = "manifest.json"
FILES = {"fp32": "model-fp32.onnx", "int8": "model-int8.onnx"}
# Probe sentences the export is checked on (the ONNX graph against the PyTorch model it came from).
_PROBES = ["Chest radiograph shows a right lower lobe consolidation.",
           "Metformin is the first-line therapy for type 2 diabetes mellitus in most adults.",
           "no acute findings"]


def parse_target(target: str) -> tuple[str, str]:
    """``"all-MiniLM-L6-v2@int8"`` -> ``("all-MiniLM-L6-v2", "int8")``; no ``@precision``: fp32."""
    model, sep, precision = target.rpartition("@")
    if not sep or precision.lower() not in PRECISIONS:
        if sep and "/" not in precision:  # looks like a precision, but an unknown one
            raise EncoderOptionError(f"{SCHEME}:{target}: precision {precision!r} is not one of "
                                     f"{', '.join(PRECISIONS)}; write e.g. {SCHEME}:{model}@int8")
        return target, "fp32"
    return model, precision.lower()


@dataclass(frozen=True)
class ModelLayout:
    """What a sentence-transformers folder says about running it: window, pooling, inputs."""

    folder: Path
    max_seq_length: int
    pooling: str  # "mean" or "cls"
    num_heads: int
    hidden_size: int
    model_type: str  # config.json's model_type ("bert", ...)

    @classmethod
    def read(cls, folder: Path, spec: str) -> "ModelLayout":
        def load(name: str) -> dict[str, Any]:
            try:
                return json.loads((folder / name).read_text())
            except (OSError, ValueError) as exc:
                raise EncoderOptionError(f"{spec}: {folder / name} cannot be read ({exc}); "
                                         "it is not a sentence-transformers model folder") from None

        modules = [m.get("type", "").rsplit(".", 1)[-1] for m in load("modules.json")]
        if modules[:2] != ["Transformer", "Pooling"] or any(m != "Normalize" for m in modules[2:]):
            raise EncoderOptionError(f"{spec}: modules {modules} are not supported by ONNX export (only "
                                     "Transformer, Pooling and Normalize); use sentence-transformers:<model>")
        pool_dir = next(m.get("path", "") for m in load("modules.json") if m.get("type", "").endswith("Pooling"))
        pool = load(f"{pool_dir}/config.json")
        if pool.get("pooling_mode_mean_tokens") and not pool.get("pooling_mode_cls_token"):
            pooling = "mean"
        elif pool.get("pooling_mode_cls_token") and not pool.get("pooling_mode_mean_tokens"):
            pooling = "cls"
        else:
            raise EncoderOptionError(f"{spec}: pooling {pool} is not supported by ONNX export (mean or CLS "
                                     "only); use sentence-transformers:<model>")
        for flag in ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens"):
            if pool.get(flag):
                raise EncoderOptionError(f"{spec}: {flag} is not supported by ONNX export; "
                                         "use sentence-transformers:<model>")
        config = load("config.json")
        st = load("sentence_bert_config.json") if (folder / "sentence_bert_config.json").exists() else {}
        window = int(st.get("max_seq_length") or config.get("max_position_embeddings", 512))
        if not (folder / "tokenizer.json").exists():
            raise EncoderOptionError(f"{spec}: {folder} has no tokenizer.json (a fast tokenizer is needed)")
        return cls(folder, window, pooling, int(config.get("num_attention_heads", 0)),
                   int(config.get("hidden_size", 0)), str(config.get("model_type", "")))


# ------------------------------------------------------------------ export + cache
@contextlib.contextmanager
def _export_lock(folder: Path) -> Iterator[None]:
    """One exporting process per cache folder at a time (others wait, then find the files)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_manifest(folder: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        return manifest if isinstance(manifest, dict) and manifest.get("recipe") == RECIPE else {}
    except (OSError, ValueError):
        return {}


def _valid(folder: Path, manifest: dict[str, Any], precision: str) -> bool:
    """The cached file for ``precision`` exists and has the sha256 its manifest recorded."""
    entry = (manifest.get("files") or {}).get(precision) or {}
    path = folder / FILES[precision]
    return bool(entry.get("sha256")) and path.is_file() and file_sha256(path) == entry["sha256"]


def _torch_model(layout: ModelLayout) -> Any:
    from transformers import AutoModel

    from caselens.ingest.encoders.base import quiet_transformers

    quiet_transformers()
    # eager attention: the graph ONNX Runtime's fusions recognise (SDPA exports differently)
    return AutoModel.from_pretrained(str(layout.folder), attn_implementation="eager").eval()


def _export_fp32(layout: ModelLayout, dest: Path) -> bytes:
    """The transformer's last hidden state as an ONNX graph (dynamic batch and length), fused by
    ONNX Runtime's BERT optimiser, checked against the PyTorch model on a few sentences."""
    import warnings

    import torch

    model = _torch_model(layout)
    want = _reference_vectors(layout, model)
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if "token_type_ids" in _forward_inputs(model) else [])

    class Hidden(torch.nn.Module):
        def __init__(self, inner: Any):
            super().__init__()
            self.inner = inner

        def forward(self, *inputs: Any) -> Any:
            return self.inner(**dict(zip(names, inputs))).last_hidden_state

    # the dummy batch is padded (mask with zeros): traced with an all-ones mask, transformers
    # drops the mask from the graph and padded batches come out wrong
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    dummy = tuple(mask if n == "attention_mask" else torch.zeros_like(mask) if n == "token_type_ids"
                  else torch.full_like(mask, 1000) * mask for n in names)
    axes = {n: {0: "batch", 1: "tokens"} for n in names + ["last_hidden_state"]}
    with tempfile.TemporaryDirectory(dir=dest) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation notes about the TorchScript exporter
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad():
            torch.onnx.export(Hidden(model), dummy, str(raw), input_names=names, output_names=["last_hidden_state"],
                              dynamic_axes=axes, opset_version=OPSET, do_constant_folding=True, dynamo=False)
        if layout.model_type == "bert" and layout.num_heads and layout.hidden_size:
            from onnxruntime.transformers.optimizer import optimize_model

            fused = optimize_model(str(raw), model_type="bert", num_heads=layout.num_heads,
                                   hidden_size=layout.hidden_size)
            fused.save_model_to_file(str(Path(tmp) / "fused.onnx"))
            raw = Path(tmp) / "fused.onnx"
        data = raw.read_bytes()
    _check_export(layout, data, want)
    return data


def _forward_inputs(model: Any) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


def _quantize_int8(fp32: Path, dest: Path) -> bytes:
    """int8 weights (one scale per output channel: per-tensor scales cost MiniLM up to 0.2 of
    cosine), activations quantised per batch (dynamic quantisation)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        out = Path(tmp) / "int8.onnx"
        root = logging.getLogger()
        quiet = logging.Filter("caselens-quiet")  # drops the quantiser's "consider pre-processing" note
        root.addFilter(quiet)
        try:
            quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        finally:
            root.removeFilter(quiet)
        return out.read_bytes()


def exported_model(layout: ModelLayout, precision: str, root: Path | None = None) -> tuple[Path, str]:
    """The cached ONNX file for ``layout``'s model at ``precision`` and the model folder's hash,
    exporting (and quantising) it first when it is missing or damaged."""
    weights = dir_sha256(layout.folder)
    folder = (root or cache_dir()) / "onnx" / weights
    manifest = _read_manifest(folder)
    if _valid(folder, manifest, precision):
        return folder / FILES[precision], weights
    with _export_lock(folder):
        manifest = _read_manifest(folder)  # another process may have exported meanwhile
        if _valid(folder, manifest, precision):
            return folder / FILES[precision], weights
        start = time.perf_counter()
        log.warning("exporting %s to ONNX (%s) into %s: first use only, ~30 s", layout.folder.name, precision, folder)
        files = dict(manifest.get("files") or {})
        needed = ["fp32"] if precision == "fp32" else (["int8"] if _valid(folder, manifest, "fp32") else ["fp32", "int8"])
        for p in needed:
            if (folder / FILES[p]).exists() or p in files:
                log.warning("cached ONNX export %s is missing or damaged; exporting it again", folder / FILES[p])
            data = _export_fp32(layout, folder) if p == "fp32" else _quantize_int8(folder / FILES["fp32"], folder)
            atomic_write_bytes(folder / FILES[p], data)
            files[p] = {"file": FILES[p], "sha256": file_sha256(folder / FILES[p]), "bytes": len(data)}
        versions = {}
        for mod in ("torch", "transformers", "onnx", "onnxruntime"):
            with contextlib.suppress(Exception):
                versions[mod] = __import__(mod).__version__
        record = {"recipe": RECIPE, "opset": OPSET, "model_folder_sha256": weights, "files": files,
                  "exported_with": versions}
        atomic_write_bytes(folder / MANIFEST, json.dumps(record, indent=2).encode())
        log.info("exported %s (%s) to %s in %.1fs", layout.folder.name, precision, folder, time.perf_counter() - start)
        return folder / FILES[precision], weights


def _probe_batch(layout: ModelLayout) -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(layout.folder / "tokenizer.json"))
    tok.no_padding()
    ids = [e.ids for e in tok.encode_batch(_PROBES)]
    width = max(map(len, ids))
    batch = {"input_ids": np.zeros((len(ids), width), np.int64), "attention_mask": np.zeros((len(ids), width), np.int64)}
    for i, row in enumerate(ids):
        batch["input_ids"][i, :len(row)] = row
        batch["attention_mask"][i, :len(row)] = 1
    batch["token_type_ids"] = np.zeros_like(batch["input_ids"])
    return batch


def _reference_vectors(layout: ModelLayout, model: Any) -> np.ndarray:
    """PyTorch's vectors for the probe sentences (taken before the export, which traces the model)."""
    import torch

    batch = _probe_batch(layout)
    with torch.no_grad():
        feed = {k: torch.from_numpy(v) for k, v in batch.items() if k in _forward_inputs(model)}
        hidden = model(**feed).last_hidden_state.numpy()
    return pool(hidden, batch["attention_mask"], layout.pooling)


def _check_export(layout: ModelLayout, data: bytes, want: np.ndarray) -> None:
    """Refuse an export whose vectors differ from PyTorch's (a broken exporter or fusion)."""
    runner = OnnxTextRunner(data, layout, threads=1)
    batch = _probe_batch(layout)
    got = runner.embed_ids([row[mask.astype(bool)].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])])
    cos = float((want * got).sum(1).min())
    if cos < 0.9999:
        raise RuntimeError(f"ONNX export of {layout.folder} disagrees with PyTorch (cosine {cos:.5f}); "
                           "use sentence-transformers:<model> instead")


# ------------------------------------------------------------------ running
def pool(hidden: np.ndarray, mask: np.ndarray, how: str) -> np.ndarray:
    """Sentence vectors from token states: masked mean or the first (CLS) token; L2-normalised."""
    if how == "cls":
        vecs = hidden[:, 0]
    else:
        m = mask[..., None].astype(hidden.dtype)
        vecs = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    vecs = np.asarray(vecs, np.float32)
    return vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)


class OnnxTextRunner:
    """An ONNX session with the model's tokenizer: token ids in, unit vectors out."""

    def __init__(self, model: bytes | Path, layout: ModelLayout, threads: int = 0, batch_size: int = 16):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.layout, self.batch_size = layout, max(1, int(batch_size))
        self.tokenizer = Tokenizer.from_file(str(layout.folder / "tokenizer.json"))
        self.tokenizer.no_padding()  # tokenizer.json pads to 128; batches are padded here, to their longest
        self.tokenizer.no_truncation()  # counting sees the whole text; embedding truncates below
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or physical_cores()
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        source = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, cut to the model's window (last token kept: [SEP])."""
        window = self.layout.max_seq_length
        out = []
        for enc in self.tokenizer.encode_batch(list(texts)):
            ids = enc.ids
            out.append(ids if len(ids) <= window else ids[:window - 1] + ids[-1:])
        return out

    def count(self, text: str) -> int:
        # encode_batch_fast skips offsets: ~1/3 cheaper, and the chunker counts thousands of spans
        return len(self.tokenizer.encode_batch_fast([text])[0].ids)

    def batch(self, ids: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        width = max(len(x) for x in ids)
        input_ids = np.zeros((len(ids), width), np.int64)
        mask = np.zeros((len(ids), width), np.int64)
        for i, row in enumerate(ids):
            input_ids[i, :len(row)] = row
            mask[i, :len(row)] = 1
        feed = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in self.inputs:
            feed["token_type_ids"] = np.zeros_like(input_ids)
        return feed

    def embed_ids(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Unit vectors for token id lists, run longest-first in batches of similar length (little padding)."""
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        parts = []
        for start in range(0, len(order), self.batch_size):
            feed = self.batch([ids[i] for i in order[start:start + self.batch_size]])
            hidden = self.session.run(["last_hidden_state"], feed)[0]
            parts.append(pool(hidden, feed["attention_mask"], self.layout.pooling))
        vecs = np.concatenate(parts)
        out = np.empty_like(vecs)
        out[order] = vecs
        return out


class OnnxTextEncoder(Encoder):
    """A sentence-transformers text model exported to ONNX and run by ONNX Runtime (see module doc)."""

    def __init__(self, target: str, batch_size: int = 16, threads: int = 0, query_prefix: str = "",
                 document_prefix: str = "", cache_root: Path | None = None):
        model, precision = parse_target(target or "all-MiniLM-L6-v2")
        spec = f"{SCHEME}:{model}@{precision}"
        folder = _model_folder(model, spec)
        self.layout = ModelLayout.read(folder, spec)
        self.path, weights = exported_model(self.layout, precision, cache_root)
        self.precision = precision
        self.runner = OnnxTextRunner(self.path, self.layout, threads=threads, batch_size=batch_size)
        self.batch_size = batch_size
        self.query_prefix, self.document_prefix = query_prefix, document_prefix
        dim = int(self.runner.embed_ids(self.runner.token_ids(["dimension probe"])).shape[1])
        # threads belong to the machine, not the vectors: not stored with the collection
        opts = {"batch_size": batch_size, "query_prefix": query_prefix, "document_prefix": document_prefix}
        self.info = EncoderInfo(
            spec=spec, dim=dim, modalities=("text",),
            fingerprint=fingerprint(SCHEME, RECIPE, precision, weights, self.layout.max_seq_length,
                                    self.layout.pooling, query_prefix, document_prefix),
            options=opts, description=f"{model} ({precision}) run by ONNX Runtime")

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return self.runner.embed_ids(self.runner.token_ids(texts))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode([self.document_prefix + t for t in texts])

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode([self.query_prefix + t for t in texts])

    def max_tokens(self) -> int | None:
        return self.layout.max_seq_length

    def count_tokens(self, text: str) -> int | None:
        return self.runner.count(text)


def _model_folder(model: str, spec: str) -> Path:
    source = resolve_text_model(model)
    if Path(source).is_dir():
        return Path(source)
    try:  # a hub name: only its local copy (the hub cache), never a download here
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_files_only=True))
    except Exception:
        raise EncoderOptionError(f"{spec}: {model!r} is neither the packaged all-MiniLM-L6-v2, a model folder, "
                                 "nor a hub model in the local hub cache") from None


@register(SCHEME, "sentence-transformers text model run by ONNX Runtime (exported once, cached): "
                  "<model>@fp32 or <model>@int8; all-MiniLM-L6-v2@int8 is the default text encoder")
def _load_onnx_text(target: str, options: dict[str, Any]) -> Encoder:
    opts = take_options(SCHEME, options, {"batch_size": (int, 16), "threads": (int, 0), "query_prefix": (str, ""),
                                          "document_prefix": (str, "")})
    if opts["batch_size"] < 1 or opts["threads"] < 0:
        raise EncoderOptionError(f"{SCHEME}: batch_size must be at least 1 and threads at least 0 (0: physical cores)")
    return OnnxTextEncoder(target, **opts)
