"""Limits on what a request may make the service do: upload type and size, decoded pixels (a small
file that decodes to a huge image, a "decompression bomb", is refused from its header, before
any pixel is decoded), and a per-token rate limit.

Request body size is enforced by :class:`caselens.serve.middleware.GuardMiddleware`
(413 before the endpoint runs); this module checks what is inside.
"""

from __future__ import annotations

import io
import math
import threading
import time
import warnings

from PIL import Image, UnidentifiedImageError

from caselens.serve.errors import ServeError

IMAGE_TYPES = {"png": ".png", "jpeg": ".jpg", "dicom": ".dcm"}  # accepted uploads -> file suffix


def sniff_image(data: bytes) -> str:
    """The upload's type from its first bytes: "png", "jpeg" or "dicom" (preamble + ``DICM``).
    Anything else is refused with 415 ``unsupported_media_type``; empty uploads with 400."""
    if not data:
        raise ServeError(400, "empty_upload", "the uploaded file is empty")
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    raise ServeError(415, "unsupported_media_type",
                     "upload a PNG, JPEG or DICOM file (DICOM with its 128-byte preamble and 'DICM' marker)")


def image_pixels(data: bytes, kind: str) -> int:
    """Pixels the upload would decode to (every frame and sample), read from its header only."""
    if kind == "dicom":
        import pydicom
        from pydicom.errors import InvalidDicomError

        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
            frames = int(str(ds.get("NumberOfFrames", 1) or 1))
            samples = int(ds.get("SamplesPerPixel", 1) or 1)
        except (InvalidDicomError, ValueError, TypeError, OSError, EOFError, AttributeError, KeyError) as exc:
            raise ServeError(400, "corrupt_image", f"the DICOM header cannot be read ({type(exc).__name__})") from None
        if rows <= 0 or cols <= 0:
            raise ServeError(400, "no_pixel_data", "the DICOM file describes no image (Rows/Columns missing)")
        return rows * cols * max(1, frames) * max(1, samples)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:  # reads the header, decodes nothing
                width, height = im.size
                bands = len(im.getbands())
                frames = int(getattr(im, "n_frames", 1) or 1)
    except Image.DecompressionBombError:
        return math.inf  # Pillow's own limit: far above ours
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ServeError(400, "corrupt_image", f"the image header cannot be read ({type(exc).__name__})") from None
    return width * height * max(1, bands) * max(1, frames)


def check_image(data: bytes, max_pixels: int) -> str:
    """The upload's type, after checking it is a PNG, JPEG or DICOM whose decoded size is within
    ``max_pixels`` (400 ``image_too_large`` otherwise: a decompression bomb is refused before
    decoding)."""
    kind = sniff_image(data)
    pixels = image_pixels(data, kind)
    if pixels > max_pixels:
        shown = "more than Pillow's limit" if pixels == math.inf else f"{pixels:,}"
        raise ServeError(400, "image_too_large",
                         f"the image would decode to {shown} pixel values (limit {max_pixels:,}); refused "
                         "before decoding (possible decompression bomb). Downscale it, or raise --max-pixels")
    return kind


class RateLimiter:
    """A token bucket per key (token name or client address): ``rate`` requests a second on
    average, up to ``burst`` at once. ``rate`` 0 turns it off."""

    def __init__(self, rate: float, burst: int, max_keys: int = 10_000):
        self.rate, self.burst, self.max_keys = float(rate), int(burst), max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens left, time of last update)
        self._lock = threading.Lock()

    def acquire(self, key: str) -> float:
        """0.0 when ``key`` may make a request now (and counts it), else the seconds to wait."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            allowed = tokens >= 1.0
            self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
            if len(self._buckets) > self.max_keys:  # forget idle keys: a new bucket starts full anyway
                idle = sorted(self._buckets, key=lambda k: self._buckets[k][1])[: len(self._buckets) // 2]
                for k in idle:
                    if k != key:
                        del self._buckets[k]
            return 0.0 if allowed else (1.0 - tokens) / self.rate
