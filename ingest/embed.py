"""Items to vectors: one call of the encoder per batch, slices of volumes pooled per item.

Shared by the local pipeline and the encoder actors of a Ray ingest; imports no storage code, so
a worker process that only encodes stays light.
"""

from __future__ import annotations

import numpy as np

from caselens.ingest.encoders.base import Encoder
from caselens.ingest.items import Item
from caselens.ingest.volumes import pool


def encode_items(encoder: Encoder, items: list[Item]) -> np.ndarray:
    """Vectors of ``items`` (all texts or all images), one row each. A series or study item
    (``volume``) has every slice embedded in the same call, then pooled; a row whose width
    differs from the others (an encoder that misbehaved) is all NaN, so callers reject it."""
    if items[0].kind != "image":
        return encoder.encode_texts([it.text or "" for it in items])
    if not any(it.volume is not None for it in items):
        return encoder.encode_images([it.image for it in items])
    images, spans = [], []
    for it in items:
        slices = it.volume.slices if it.volume is not None else [it.image]
        spans.append((len(images), len(images) + len(slices)))
        images.extend(slices)
    flat = encoder.encode_images(images)
    out = []
    for it, (a, b) in zip(items, spans):
        if it.volume is None:
            out.append(flat[a])
        else:
            out.append(pool(flat[a:b], it.volume.groups or None, it.volume.pooling))
    width = max(len(v) for v in out)
    return np.stack([v if len(v) == width else np.full(width, np.nan, np.float32) for v in out])
