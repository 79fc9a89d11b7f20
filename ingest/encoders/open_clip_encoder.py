"""CLIP-style image+text encoders through open_clip.

Targets:
  ``ARCH@TAG``          a registered architecture with a pretrained tag (downloads where allowed)
  ``ARCH@/path/ckpt``   a registered architecture with a local checkpoint (.safetensors, .pt, .bin)
  ``hf-hub:org/repo``   a hub model, e.g. microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224
  ``local-dir:/path``   a folder with open_clip_config.json and weights (the hub layout, offline)
Checkpoints are read with ``torch.load(weights_only=True)`` or safetensors by open_clip itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from caselens.errors import EncoderOptionError
from caselens.ingest.encoders.base import (Encoder, EncoderInfo, best_device, fingerprint, l2_normalize,
                                              take_options, to_rgb, torch_weights_sha256)
from caselens.ingest.encoders.registry import register


class OpenClipEncoder(Encoder):
    """An open_clip model; embeds images and, through its text tower, text queries."""

    def __init__(self, target: str, batch_size: int = 32, device: str | None = None):
        import open_clip
        import torch

        if target.startswith(("hf-hub:", "local-dir:")):
            model_name, pretrained = target, None
        else:
            model_name, sep, pretrained = target.partition("@")
            if not sep or not pretrained:
                raise EncoderOptionError(
                    f"open_clip:{target}: say which weights, as ARCH@TAG (e.g. ViT-B-32@laion2b_s34b_b79k) "
                    "or ARCH@/path/to/checkpoint; a model without weights embeds nothing useful")
            if Path(pretrained).expanduser().exists():
                pretrained = str(Path(pretrained).expanduser().resolve())
        self.device = device or best_device()
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=self.device)
        model.eval()
        self.model, self.preprocess = model, preprocess
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.batch_size = batch_size
        self._torch = torch
        with torch.no_grad():
            dim = int(self.model.encode_image(preprocess(Image.new("RGB", (64, 64))).unsqueeze(0).to(self.device)).shape[-1])
        self.info = EncoderInfo(
            spec=f"open_clip:{target}", dim=dim, modalities=("image", "text"),
            # The preprocessing config (size, mean, std, resize mode), not its repr: the same model
            # loaded from a checkpoint or a local-dir/hub folder must get the same fingerprint.
            fingerprint=fingerprint("open_clip", torch_weights_sha256(model),
                                    json.loads(json.dumps(open_clip.get_model_preprocess_cfg(model), default=str))),
            options={"batch_size": batch_size}, description=f"open_clip model {target}")

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = self._torch.stack([self.preprocess(to_rgb(im)) for im in images[start:start + self.batch_size]])
            with self._torch.no_grad():
                out.append(self.model.encode_image(batch.to(self.device)).float().cpu().numpy())
        return l2_normalize(np.concatenate(out)) if out else np.zeros((0, self.dim), np.float32)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[start:start + self.batch_size])).to(self.device)
            with self._torch.no_grad():
                out.append(self.model.encode_text(tokens).float().cpu().numpy())
        return l2_normalize(np.concatenate(out)) if out else np.zeros((0, self.dim), np.float32)


@register("open_clip", "open_clip model: ARCH@TAG, ARCH@/checkpoint, hf-hub:org/repo or local-dir:/folder")
def _load_open_clip(target: str, options: dict[str, Any]) -> Encoder:
    opts = take_options("open_clip", options, {"batch_size": (int, 32), "device": (str, None)})
    return OpenClipEncoder(target, **opts)
