"""The encoder interface: named, versioned, fingerprinted, batched."""

from __future__ import annotations

import hashlib
import json
from abc import ABC
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from caselens.errors import UnsupportedModalityError
from caselens.files import sha256_file


@dataclass(frozen=True)
class EncoderInfo:
    """What an encoder is; stored as JSON with every collection it fills."""

    spec: str  # the name it was loaded by, e.g. "classic", "open_clip:ViT-B-32@/ckpt.pt"
    dim: int  # output dimension
    modalities: tuple[str, ...]  # subset of ("image", "text")
    fingerprint: str  # hash of weights + preprocessing; equal fingerprints = interchangeable vectors
    options: dict[str, Any] = field(default_factory=dict)  # options it was loaded with
    description: str = ""  # one line for humans ("training-free baseline", ...)

    def to_record(self) -> dict[str, Any]:
        record = asdict(self)
        record["modalities"] = list(self.modalities)
        return record


def fingerprint(*parts: Any) -> str:
    """Short stable hash of JSON-able parts (weights hash, preprocessing settings, version)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a weights file, cached per (path, size, mtime) within the process."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = sha256_file(p)
    return _FILE_HASHES[key]


def dir_sha256(path: str | Path, patterns: Sequence[str] = ("*.safetensors", "*.bin", "*.pt", "*.json", "*.txt")) -> str:
    """Hash of the weight and config files under a model folder."""
    root = Path(path)
    files = sorted({f for pat in patterns for f in root.rglob(pat) if f.is_file()})
    return fingerprint([(str(f.relative_to(root)), file_sha256(f)) for f in files])


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def best_device() -> str:
    """"cuda" when torch sees a GPU, else "cpu"."""
    try:
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def physical_cores() -> int:
    """Physical CPU cores this process may run on (hyper-threads counted once): the thread count
    for compute-bound ONNX Runtime and FAISS work, where a second thread per core only contends."""
    import os

    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores: set[tuple[str, str]] = set()
    for cpu in allowed:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            cores.add(("", str(cpu)))
    return max(1, len(cores))


class Encoder(ABC):
    """Turns images and/or texts into L2-normalised float32 vectors.

    Subclasses set :attr:`info` and override :meth:`encode_images` and/or :meth:`encode_texts`.
    Query and source embeddings are separate (:meth:`encode_queries`) for models that embed
    questions differently from documents.
    """

    info: EncoderInfo
    batch_size: int = 32  # items per forward pass

    @property
    def dim(self) -> int:
        return self.info.dim

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        raise UnsupportedModalityError(
            f"encoder {self.info.spec} embeds {', '.join(self.info.modalities)} only, not images; "
            "use an image encoder such as 'classic' or 'open_clip:…'")

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        raise UnsupportedModalityError(
            f"encoder {self.info.spec} embeds {', '.join(self.info.modalities)} only, not text; "
            "use a text encoder ('sentence-transformers:…') or a CLIP-style model with a text tower")

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        """Embed search queries (defaults to :meth:`encode_texts`)."""
        return self.encode_texts(texts)

    def max_tokens(self) -> int | None:
        """Longest text (in the encoder's tokens) embedded without truncation; None if no limit."""
        return None

    def count_tokens(self, text: str) -> int | None:
        """Tokens the encoder would see for ``text``; None when it does not tokenise."""
        return None


def take_options(spec: str, options: dict[str, Any], allowed: dict[str, tuple[type, Any]]) -> dict[str, Any]:
    """Validate encoder ``options`` against ``allowed`` = {name: (type, default)}.

    Unknown names and unconvertible values raise :class:`EncoderOptionError` naming the option.
    Values given as strings (from the command line) are converted; lists accept "a,b,c".
    """
    from caselens.errors import EncoderOptionError

    unknown = set(options) - set(allowed)
    if unknown:
        raise EncoderOptionError(f"encoder {spec}: unknown option(s) {sorted(unknown)}; "
                                 f"allowed: {sorted(allowed)}")
    out: dict[str, Any] = {}
    for name, (kind, default) in allowed.items():
        value = options.get(name, default)
        if value is None:
            out[name] = None
            continue
        try:
            if kind is list:
                if isinstance(value, str):
                    value = [float(v) for v in value.split(",") if v.strip()]
                value = [float(v) for v in value]
            elif kind is bool and isinstance(value, str):
                if value.lower() not in {"1", "0", "true", "false", "yes", "no"}:
                    raise ValueError(value)
                value = value.lower() in {"1", "true", "yes"}
            else:
                value = kind(value)
        except (TypeError, ValueError):
            raise EncoderOptionError(f"encoder {spec}: option {name}={options.get(name)!r} is not a "
                                     f"valid {kind.__name__}") from None
        out[name] = value
    return out


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of any PIL image (16-bit and float greyscale scaled by their range)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
        image = Image.fromarray(arr.astype(np.uint8), "L")
    return image.convert("RGB")


def torch_weights_sha256(module: Any) -> str:
    """sha256 over a torch module's parameters and buffers (names, shapes, bytes)."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            t = t.float()
        digest.update(name.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def quiet_transformers() -> None:
    """Silence transformers' per-load progress bars and info logs (caselens shows its own progress)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
