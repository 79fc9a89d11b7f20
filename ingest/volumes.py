"""Volumes as units of retrieval: slices sampled along a series (or a NIfTI volume), embedded one
by one and pooled into one vector; studies pool their series.

Pooling is attention-free: ``mean`` of the slice embeddings, or ``maxmean``, the concatenation
of the element-wise max and the mean (twice the encoder's dimension). Each pooled vector is
L2-normalised. A study's vector is the mean of its series' pooled vectors, so a series with many
slices does not outweigh the others. The slice choice and the pooling are kept in the provenance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from caselens.errors import ConfigError

POOLINGS = ("mean", "maxmean")
UNITS = ("instance", "series", "study")


@dataclass
class Volume:
    """Slices of one unit, to be embedded and pooled into one vector."""

    slices: list[Image.Image]  # 8-bit images, in slice order within each group
    groups: list[int] = field(default_factory=list)  # series index of each slice (study units); empty: one group
    pooling: str = "mean"  # "mean" or "maxmean"

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling {self.pooling!r} is not known; choose one of {', '.join(POOLINGS)}")


def sample_indices(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (centres of k equal parts); all when n <= k."""
    if n <= 0:
        return []
    if k <= 0 or n <= k:
        return list(range(n))
    return sorted({int((i + 0.5) * n / k) for i in range(k)})


def _normalise(v: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v


def pool(vectors: np.ndarray, groups: list[int] | None = None, pooling: str = "mean") -> np.ndarray:
    """One vector from slice ``vectors`` (n x d): pooled per group, then the groups averaged."""
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling {pooling!r} is not known; choose one of {', '.join(POOLINGS)}")
    vectors = np.asarray(vectors, np.float32)
    if vectors.ndim != 2 or len(vectors) == 0:
        raise ValueError("pool needs at least one slice vector (an n x d matrix)")
    labels = np.asarray(groups if groups else [0] * len(vectors))
    pooled = []
    for g in sorted(set(labels.tolist())):
        part = vectors[labels == g]
        mean = part.mean(axis=0)
        pooled.append(_normalise(np.concatenate([part.max(axis=0), mean]) if pooling == "maxmean" else mean))
    return _normalise(np.mean(pooled, axis=0)).astype(np.float32)


def pooled_dim(encoder_dim: int, pooling: str) -> int:
    """Dimension of pooled vectors for an encoder of ``encoder_dim``."""
    return encoder_dim * (2 if pooling == "maxmean" else 1)


def pooled_record(encoder_record: dict[str, Any], pooling: str, window: str = "auto") -> dict[str, Any]:
    """The encoder record a DICOM collection is created with: ``maxmean`` doubles ``dim`` and says
    so (``pooling``), so queries are shaped to match (:func:`query_vectors`); a window other than
    ``auto`` is kept (``window``) so DICOM queries are windowed like the stored items."""
    record = dict(encoder_record)
    if pooling == "maxmean":
        record.update(dim=pooled_dim(int(encoder_record["dim"]), pooling), pooling=pooling)
    if window != "auto":
        record["window"] = window
    return record


def query_vectors(vectors: np.ndarray, pooling: str | None) -> np.ndarray:
    """Single-image (or text) query vectors shaped like a collection's pooled vectors: for
    ``maxmean`` one slice's max and mean are the vector itself, so [v, v] / sqrt(2)."""
    vectors = np.asarray(vectors, np.float32)
    if pooling != "maxmean":
        return vectors
    return (np.concatenate([vectors, vectors], axis=1) / np.sqrt(2.0)).astype(np.float32)


class NiftiReadError(ValueError):
    """A NIfTI file that cannot give slices; ``code`` is the ledger reason code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def read_nifti(path: Path, n_slices: int, window: str = "auto", percentile: tuple[float, float] = (0.5, 99.5),
               max_decoded_bytes: int = 1 << 30) -> tuple[list[Image.Image], dict[str, Any]]:
    """Axial slices of a NIfTI volume (sampled evenly along the last spatial axis) as 8-bit images,
    and the provenance. The header's free-text fields (descrip, aux_file, intent name) are never
    read into the result. A preset window assumes Hounsfield units (CT); otherwise a percentile
    window over the sampled slices is used."""
    import nibabel as nib

    from caselens.ingest.sources.dicom import WINDOW_PRESETS

    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        itemsize = np.dtype(img.get_data_dtype()).itemsize
    except Exception as exc:  # nibabel raises many types on bad files
        raise NiftiReadError("corrupt_nifti", f"not a readable NIfTI file ({type(exc).__name__})") from None
    if len(shape) < 2 or any(s <= 0 for s in shape):
        raise NiftiReadError("bad_header", f"NIfTI shape {shape} is not an image")
    if int(np.prod(shape, dtype=np.int64)) * itemsize > max_decoded_bytes:
        raise NiftiReadError("too_large", f"volume {shape} would decode to more than "
                                          f"{max_decoded_bytes / 2**20:.0f} MiB")
    depth = shape[2] if len(shape) >= 3 else 1
    picks = sample_indices(depth, n_slices)
    try:
        if len(shape) == 2:
            stack = [np.asarray(img.dataobj, dtype=np.float32)]
        else:
            index_rest = (0,) * (len(shape) - 3)  # first volume of a 4D series
            stack = [np.asarray(img.dataobj[(slice(None), slice(None), z) + index_rest], dtype=np.float32) for z in picks]
    except Exception as exc:
        raise NiftiReadError("undecodable_pixels", f"NIfTI data could not be read ({type(exc).__name__})") from None
    values = np.stack(stack)
    if not np.isfinite(values).all():
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    if window in WINDOW_PRESETS:
        c, w = WINDOW_PRESETS[window]
        lo, hi = c - w / 2, c + w / 2
        prov_window: dict[str, Any] = {"window": window, "center": c, "width": w}
    else:
        lo, hi = (float(v) for v in np.percentile(values, percentile))
        prov_window = {"window": "percentile", "low": percentile[0], "high": percentile[1]}
    norm = np.clip((values - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(values)
    # NIfTI stores (x, y) with x first: transpose so rows are y, and flip to radiological display
    images = [Image.fromarray((np.flipud(s.T) * 255).round().astype(np.uint8), "L") for s in norm]
    prov = {"reader": "nibabel", "shape": list(shape), "slices": picks, "slice_axis": 2, **prov_window}
    return images, prov
