"""Training-free image encoders: the ``classic`` descriptor and the ``pixels`` baseline.

``classic`` is a baseline, not a medical foundation model: hand-made intensity, layout, texture,
gradient and colour statistics of a fixed-size thumbnail, each block L2-normalised, weighted
and concatenated, then L2-normalised. It needs no weights and no download, so it is the default
image encoder offline. ``pixels`` is the raw-pixel baseline it must beat: a downsampled RGB
thumbnail flattened and L2-normalised.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from PIL import Image

from caselens.errors import EncoderOptionError
from caselens.ingest.encoders.base import Encoder, EncoderInfo, fingerprint, l2_normalize, take_options, to_rgb
from caselens.ingest.encoders.registry import register

CLASSIC_VERSION = 1  # bump whenever the descriptor changes: it is part of the fingerprint
_LBP_OFFSETS = [(-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1)]


def _riu2_table() -> np.ndarray:
    """Map each 8-bit LBP code to its rotation-invariant uniform class (0..9)."""
    table = np.zeros(256, np.int64)
    for code in range(256):
        bits = [(code >> i) & 1 for i in range(8)]
        transitions = sum(bits[i] != bits[(i + 1) % 8] for i in range(8))
        table[code] = sum(bits) if transitions <= 2 else 9
    return table


_RIU2 = _riu2_table()


def _hist(values: np.ndarray, bins: int, lo: float, hi: float, weights: np.ndarray | None = None) -> np.ndarray:
    h, _ = np.histogram(values, bins=bins, range=(lo, hi), weights=weights)
    return h.astype(np.float32)


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 1e-12 else v


def _lbp(gray: np.ndarray) -> np.ndarray:
    c = gray[1:-1, 1:-1]
    code = np.zeros(c.shape, np.int64)
    h, w = gray.shape
    for bit, (dy, dx) in enumerate(_LBP_OFFSETS):
        nb = gray[1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx]
        code |= (nb >= c).astype(np.int64) << bit
    return _RIU2[code]


def _grid_hists(values: np.ndarray, grid: int, bins: int, lo: float, hi: float,
                weights: np.ndarray | None = None) -> list[np.ndarray]:
    h, w = values.shape
    out = []
    for i in range(grid):
        for j in range(grid):
            sl = (slice(i * h // grid, (i + 1) * h // grid), slice(j * w // grid, (j + 1) * w // grid))
            out.append(_hist(values[sl], bins, lo, hi, None if weights is None else weights[sl]))
    return out


def classic_descriptor(image: Image.Image, size: int = 128) -> np.ndarray:
    """The ``classic`` descriptor of one image (float32, unit length)."""
    rgb = np.asarray(to_rgb(image).resize((size, size), Image.BILINEAR), np.float32) / 255.0
    gray = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    # Contrast-normalise so exposure differences do not dominate structure.
    lo, hi = np.percentile(gray, [1, 99])
    norm = np.clip((gray - lo) / (hi - lo), 0, 1) if hi - lo > 1e-6 else np.zeros_like(gray)

    blocks: list[tuple[np.ndarray, float]] = []
    # 1. intensity: histogram of raw and of contrast-normalised grey (sqrt = Hellinger).
    blocks.append((np.sqrt(_hist(gray, 32, 0, 1)), 1.0))
    blocks.append((np.sqrt(_hist(norm, 16, 0, 1)), 0.5))
    # 2. layout: 8x8 block means of the normalised image, centred.
    layout = norm.reshape(8, size // 8, 8, size // 8).mean(axis=(1, 3)).reshape(-1)
    blocks.append((layout - layout.mean(), 1.0))
    # 3. gradients: HOG-like unsigned orientation histograms on a 4x4 grid plus the whole image.
    gy, gx = np.gradient(norm)
    mag = np.hypot(gx, gy)
    ang = np.mod(np.arctan2(gy, gx), np.pi)
    cells = _grid_hists(ang, 4, 9, 0, np.pi, mag)
    blocks.append((np.sqrt(np.concatenate([_unit(c) ** 2 for c in cells])), 1.0))
    blocks.append((np.sqrt(_hist(mag, 16, 0, 0.5)), 0.5))
    # 4. texture: rotation-invariant uniform LBP at two scales, whole image and 2x2 grid.
    for scale_img, weight in ((gray, 1.0), (gray[::2, ::2], 0.7)):
        codes = _lbp(scale_img)
        parts = [_hist(codes, 10, 0, 10)] + _grid_hists(codes, 2, 10, 0, 10)
        blocks.append((np.sqrt(np.concatenate([p / max(p.sum(), 1) for p in parts])), weight))
    # 5. colour: hue weighted by saturation, saturation, value, and channel means/stds.
    hsv = np.asarray(Image.fromarray((rgb * 255).astype(np.uint8)).convert("HSV"), np.float32) / 255.0
    sat = hsv[..., 1]
    colour = np.concatenate([_hist(hsv[..., 0], 12, 0, 1, sat), _hist(sat, 8, 0, 1), _hist(hsv[..., 2], 8, 0, 1)])
    blocks.append((np.sqrt(colour), 0.7))
    blocks.append((np.concatenate([rgb.mean(axis=(0, 1)), rgb.std(axis=(0, 1))]), 0.5))
    vec = np.concatenate([_unit(b.astype(np.float32)) * w for b, w in blocks])
    return _unit(vec).astype(np.float32)


class ClassicEncoder(Encoder):
    """Training-free descriptor baseline (see module docstring)."""

    def __init__(self, size: int = 128):
        if size % 8 or size < 32:
            raise EncoderOptionError(f"classic: size must be a multiple of 8 and at least 32, got {size}")
        self.size = size
        dim = classic_descriptor(Image.new("RGB", (size, size)), size).shape[0]
        self.info = EncoderInfo(spec="classic", dim=dim, modalities=("image",),
                                fingerprint=fingerprint("classic", CLASSIC_VERSION, size),
                                options={"size": size},
                                description="training-free baseline: intensity, layout, texture, gradient, colour statistics")

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([classic_descriptor(im, self.size) for im in images])


class PixelEncoder(Encoder):
    """Raw-pixel baseline: downsampled RGB pixels, flattened, L2-normalised."""

    def __init__(self, size: int = 16):
        self.size = size
        self.info = EncoderInfo(spec="pixels", dim=size * size * 3, modalities=("image",),
                                fingerprint=fingerprint("pixels", 1, size), options={"size": size},
                                description="raw-pixel baseline: downsampled RGB thumbnail")

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), np.float32)
        arr = np.stack([np.asarray(to_rgb(im).resize((self.size, self.size), Image.BILINEAR), np.float32).reshape(-1)
                        for im in images])
        return l2_normalize(arr / 255.0)


@register("classic", "training-free image descriptor (offline default baseline); option size=128")
def _load_classic(target: str, options: dict[str, Any]) -> Encoder:
    opts = take_options("classic", options, {"size": (int, 128)})
    return ClassicEncoder(**opts)


@register("pixels", "raw-pixel baseline (downsampled RGB, L2-normalised); option size=16")
def _load_pixels(target: str, options: dict[str, Any]) -> Encoder:
    opts = take_options("pixels", options, {"size": (int, 16)})
    return PixelEncoder(**opts)
