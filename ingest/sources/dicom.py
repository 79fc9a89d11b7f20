"""One DICOM file -> normalised 8-bit 2D images plus de-identified metadata.

Pixels: every transfer syntax pydicom decodes with the installed plugins (pylibjpeg with
libjpeg / openjpeg / rle, and GDCM): RLE, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000.
Grey images get the modality LUT (rescale slope/intercept), then a window: the file's own, a
named CT preset (:data:`WINDOW_PRESETS`) or a percentile window, chosen per modality by default
(:data:`MODALITY_DEFAULT_WINDOW`); MONOCHROME1 is inverted. Colour images: YBR is converted to
RGB by pydicom, PALETTE COLOR goes through its lookup table, and values are scaled from their
stored bit depth to 8 bits. Multi-frame files give their middle frame (instances) or sampled
frames (volumes); the frame indices are kept in the provenance.

Safety: the header is read without pixels first; a file over the size limit, a pixel budget
(rows x columns x frames x samples x bits) over the limit, or ``BurnedInAnnotation = YES``
(unless allowed) is rejected before any decoding, so a hostile header cannot make us allocate.
Decoding runs under a wall-clock bound (checked when the decoder returns to Python). GDCM, which
aborts the whole process on some damaged JPEG data (an uncaught C++ exception: no Python code can
catch it), is tried last, after the plugins that fail with an exception, and in a child process
(:func:`decode_isolated`), so that its crash rejects the file instead of ending the ingest.
Metadata: only what :func:`caselens.ingest.deid.kept_metadata` keeps (PS3.15 basic profile).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import io
import logging
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

from caselens.errors import ConfigError
from caselens.ingest.deid import PROFILE_NAME, kept_metadata

MAX_DECODED_BYTES = 1 << 30  # refuse files whose pixel data would decode to more than 1 GiB

# Named CT windows in Hounsfield units: name -> (center, width).
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "abdomen": (40.0, 400.0),
}
# window="auto": the file's own window when it has one, else a per-modality choice. Presets need
# Hounsfield units, so only CT gets one, picked by body part examined; every other modality (and
# CT of an unknown body part) gets the percentile window.
MODALITY_DEFAULT_WINDOW: dict[str, dict[str, str]] = {
    "CT": {"HEAD": "brain", "BRAIN": "brain", "CHEST": "mediastinum", "THORAX": "mediastinum",
           "LUNG": "lung", "ABDOMEN": "abdomen", "PELVIS": "abdomen", "LIVER": "abdomen",
           "SPINE": "bone", "CSPINE": "bone", "TSPINE": "bone", "LSPINE": "bone", "EXTREMITY": "bone"},
}
WINDOW_CHOICES = ("auto", "file", "percentile", *WINDOW_PRESETS)


class DicomReadError(ValueError):
    """A DICOM file that cannot give an image; ``code`` is the ledger reason code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class DicomOptions:
    """How DICOM files are read; stored with each item's provenance where it matters."""

    window: str = "auto"  # "auto" (file's window, else per modality), "file", "percentile", or a preset name
    percentile: tuple[float, float] = (0.5, 99.5)  # bounds of the percentile window
    max_decoded_bytes: int = MAX_DECODED_BYTES  # pixel budget from the header, checked before decoding
    max_file_bytes: int = 4 << 30  # files larger than this are not read at all
    allow_burned_in: bool = False  # accept BurnedInAnnotation=YES files (flagged in metadata) instead of rejecting
    timeout_s: float = 120.0  # wall-clock bound on reading + decoding one file (0: none)

    def __post_init__(self) -> None:
        if self.window not in WINDOW_CHOICES:
            raise ConfigError(f"window {self.window!r} is not known; choose one of {', '.join(WINDOW_CHOICES)}")
        lo, hi = self.percentile
        if not 0 <= lo < hi <= 100:
            raise ConfigError(f"percentile window {self.percentile} must satisfy 0 <= low < high <= 100")


def is_dicom(path: Path) -> bool:
    """True when the file has the DICOM preamble ("DICM" at byte 128)."""
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _first(value: Any) -> float:
    if hasattr(value, "__len__") and not isinstance(value, (str, bytes)):
        value = value[0]
    return float(value)


def default_window(modality: str | None, body_part: str | None) -> str:
    """The window ``auto`` falls back to when a file has none: a CT preset by body part, else percentile."""
    by_part = MODALITY_DEFAULT_WINDOW.get((modality or "").upper(), {})
    return by_part.get((body_part or "").upper().replace(" ", ""), "percentile")


def window_values(values: np.ndarray, ds: Any, modality: str | None,
                  options: DicomOptions) -> tuple[np.ndarray, dict[str, Any]]:
    """Grey values (after the modality LUT) -> [0, 1] with the chosen window, and what was done."""
    choice = options.window
    if choice in ("auto", "file"):
        center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        try:
            c, w = (_first(center), _first(width)) if center is not None and width is not None else (0.0, 0.0)
        except (TypeError, ValueError, IndexError):
            c, w = 0.0, 0.0
        if w > 1:
            lo, hi = c - w / 2, c + w / 2
            return np.clip((values - lo) / (hi - lo), 0, 1), {"window": "file", "center": c, "width": w}
        choice = default_window(modality, str(ds.get("BodyPartExamined", "") or "")) if choice == "auto" else "percentile"
    if choice in WINDOW_PRESETS:
        if modality == "CT":
            c, w = WINDOW_PRESETS[choice]
            lo, hi = c - w / 2, c + w / 2
            return np.clip((values - lo) / (hi - lo), 0, 1), {"window": choice, "center": c, "width": w}
        choice = "percentile"  # presets are in Hounsfield units: other modalities fall back
    plo, phi = options.percentile
    sample = values[::2, ::2] if values.ndim == 2 and values.size > 1 << 18 else values  # large: every 4th pixel
    lo, hi = np.percentile(sample, [plo, phi])
    if hi <= lo:
        return np.zeros_like(values, dtype=np.float32), {"window": "constant"}
    return np.clip((values - lo) / (hi - lo), 0, 1), {"window": "percentile", "low": plo, "high": phi}


class DicomTimeout(BaseException):
    """Reading one file took longer than its bound (a BaseException, so that decoders which
    catch every Exception cannot swallow it)."""


@contextlib.contextmanager
def _time_bound(seconds: float) -> Iterator[None]:
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: Any) -> None:
        raise DicomTimeout()

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """pydicom's log and warnings silenced: problems end as reasons, not console noise."""
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _check_file_size(path: Path, options: DicomOptions) -> None:
    """Raise :class:`DicomReadError` when ``path`` cannot be stat'ed or exceeds the file budget."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DicomReadError("unreadable", f"cannot read file: {exc.strerror or exc}") from None
    if size > options.max_file_bytes:
        raise DicomReadError("too_large", f"file is {size / 2**20:.0f} MiB (limit {options.max_file_bytes / 2**20:.0f} MiB)")


def read_header(path: Path, options: DicomOptions | None = None) -> Any:
    """The header of ``path`` (no pixel data read); raises :class:`DicomReadError`."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    options = options or DicomOptions()
    _check_file_size(path, options)
    try:
        with quiet_pydicom():
            ds = pydicom.dcmread(str(path), force=not is_dicom(path), stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError, AttributeError,
            IndexError, OverflowError, MemoryError, NotImplementedError) as exc:
        raise DicomReadError("corrupt_dicom", f"not a readable DICOM file ({type(exc).__name__}: {exc})") from None
    except Exception as exc:  # pydicom's own errors on damaged values (BytesLengthException, ...)
        raise DicomReadError("corrupt_dicom", f"not a readable DICOM file ({type(exc).__name__})") from None
    return ds


def check_header(ds: Any, options: DicomOptions) -> tuple[int, int, int, int, int]:
    """(rows, columns, frames, samples, bits) of a header that may be decoded; raises
    :class:`DicomReadError` for no image, a bad size, a pixel budget over the limit, or
    ``BurnedInAnnotation = YES`` when not allowed. Nothing is decoded."""
    meta = getattr(ds, "file_meta", None)
    if len(ds) == 0 or (not (meta is not None and "TransferSyntaxUID" in meta)
                        and "SOPClassUID" not in ds and "Rows" not in ds):
        raise DicomReadError("corrupt_dicom", "no recognisable DICOM header (no transfer syntax, SOP class or image size)")
    if "Rows" not in ds and "Columns" not in ds and "NumberOfFrames" not in ds:
        raise DicomReadError("no_pixel_data", "DICOM file has no pixel data (a report, structure or DICOMDIR?)")
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 8) or 8)
    except (TypeError, ValueError) as exc:
        raise DicomReadError("bad_header", f"DICOM image size attributes are not numbers ({exc})") from None
    if rows <= 0 or cols <= 0 or frames <= 0 or samples <= 0:
        raise DicomReadError("bad_header", f"DICOM header gives image size {rows}x{cols}, {frames} frame(s), "
                                           f"{samples} sample(s) per pixel")
    decoded = rows * cols * frames * samples * max(bits, 8) // 8
    if decoded > options.max_decoded_bytes:
        raise DicomReadError("too_large", f"pixel data would decode to {decoded / 2**20:.0f} MiB "
                                          f"(limit {options.max_decoded_bytes / 2**20:.0f} MiB)")
    burned = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if burned == "YES" and not options.allow_burned_in:
        raise DicomReadError("burned_in_annotation", "BurnedInAnnotation is YES: the pixels may show patient "
                                                     "identity; rejected (allow with --allow-burned-in)")
    return rows, cols, frames, samples, bits


def _to_image(arr: np.ndarray, ds: Any, modality: str | None, photometric: str,
              options: DicomOptions) -> tuple[Image.Image, dict[str, Any]]:
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)  # 16-bit RGB from the palette
        rgb = arr.astype(np.float32) / (65535.0 if arr.max() > 255 else 255.0)
        return Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8), "RGB"), {"window": "palette"}
    if arr.ndim == 3:  # RGB (YBR already converted by pydicom)
        stored = int(ds.get("BitsStored", 8) or 8)
        top = float(2 ** stored - 1)
        scaled = arr.astype(np.float32) / top if top > 0 else arr.astype(np.float32)
        return Image.fromarray((np.clip(scaled, 0, 1) * 255).round().astype(np.uint8), "RGB"), {"window": "bits", "bits": stored}
    if "RescaleSlope" in ds or "ModalityLUTSequence" in ds:
        values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    else:
        values = arr.astype(np.float32)
    norm, window = window_values(values, ds, modality, options)
    if photometric == "MONOCHROME1":
        norm = 1.0 - norm
        window["inverted"] = True
    return Image.fromarray((norm * 255).round().astype(np.uint8), "L"), window


def decode_frames(path: Path, secret: bytes, options: DicomOptions | None = None,
                  frames: str | Sequence[int] = "middle") -> tuple[list[Image.Image], dict[str, Any], dict[str, Any]]:
    """Read ``path`` into (images, metadata, provenance); raises :class:`DicomReadError`.

    ``frames``: "middle" (one image: the middle frame of a multi-frame file), "all", or frame indices.
    """
    options = options or DicomOptions()
    try:
        with quiet_pydicom(), _time_bound(options.timeout_s):
            return _decode(path, secret, options, frames)
    except DicomReadError:
        raise
    except DicomTimeout:
        raise DicomReadError("timeout", f"reading took longer than {options.timeout_s:.0f}s; rejected") from None
    except MemoryError:
        raise DicomReadError("too_large", "not enough memory to decode this file") from None
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # any other failure on odd input is a rejection, never a crash; a Rust
        # decoder's panic (pylibjpeg-rle: pyo3's PanicException) derives from BaseException, not Exception
        message = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise DicomReadError("corrupt_dicom", f"DICOM file could not be read ({type(exc).__name__}: {message})") from None


def _decode(path: Path, secret: bytes, options: DicomOptions,
            frames: str | Sequence[int]) -> tuple[list[Image.Image], dict[str, Any], dict[str, Any]]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    # one read of the file: hashed (the item id) and parsed from memory; pixels are decoded
    # only after the header passed the budget and burned-in checks
    _check_file_size(path, options)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DicomReadError("unreadable", f"cannot read file: {exc.strerror or exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=data[128:132] != b"DICM")
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError, AttributeError,
            IndexError, OverflowError, NotImplementedError) as exc:
        raise DicomReadError("corrupt_dicom", f"not a readable DICOM file ({type(exc).__name__}: {exc})") from None
    raw, data = data, b""  # kept for a decoder that has to run in a child process
    _, _, n_frames, _, _ = check_header(ds, options)
    metadata = kept_metadata(ds, secret)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DicomReadError("no_pixel_data", "DICOM file has no pixel data (a report, structure or DICOMDIR?)")
    tsuid = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if frames == "middle":
        indices = [n_frames // 2]
    elif frames == "all":
        indices = list(range(n_frames))
    else:
        indices = [int(i) for i in frames if 0 <= int(i) < n_frames] or [n_frames // 2]
    try:
        arr = _pixels(ds, raw, options)
    except DicomReadError:
        raise
    except Exception as exc:  # decoders raise many types; every one is a rejection, never a crash
        if isinstance(exc, MemoryError) or "MemoryError" in str(exc) or "nable to allocate" in str(exc):
            raise DicomReadError("too_large", "not enough memory to decode this file within the "
                                              "worker's memory bound") from None
        name = getattr(tsuid, "name", str(tsuid))
        raise DicomReadError("undecodable_pixels", f"pixel data could not be decoded (transfer syntax "
                                                   f"{name}; {type(exc).__name__}: {exc})") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    multi = n_frames > 1
    if multi and arr.ndim == (4 if samples > 1 else 3):
        stack = [arr[i] for i in indices]
    else:
        stack, indices = [arr], [0]
    modality = metadata.get("modality")
    images, window = [], {}
    for frame in stack:
        image, window = _to_image(frame, ds, modality, photometric, options)
        images.append(image)
    prov: dict[str, Any] = {"reader": "pydicom", "sha256": digest, "frames": n_frames, "photometric": photometric,
                            "transfer_syntax": str(tsuid) if tsuid else None, "deid": PROFILE_NAME}
    if multi:
        prov["frame"] = indices[0] if len(indices) == 1 else indices
    prov.update(window)
    if metadata.get("burned_in_annotation") is None:
        metadata.pop("burned_in_annotation", None)
    return images, metadata, prov


# Pixel decoders that can end the process on damaged input instead of raising (GDCM: std::terminate
# on an uncaught gdcm::Exception, e.g. in gdcmJPEGBITSCodec). Tried after the others, isolated.
RISKY_PLUGINS = ("gdcm",)


def _pixels(ds: Any, raw: bytes, options: DicomOptions) -> np.ndarray:
    """The pixel array of ``ds``: pydicom's decoders for its transfer syntax in turn, those of
    :data:`RISKY_PLUGINS` last and in a child process (:func:`decode_isolated`)."""
    from pydicom.pixels import get_decoder

    tsuid = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    try:
        decoder = get_decoder(tsuid) if tsuid else None
    except (NotImplementedError, ValueError, KeyError):
        decoder = None
    plugins = list(decoder.available_plugins) if decoder is not None and decoder.is_encapsulated else []
    if not any(p in RISKY_PLUGINS for p in plugins):
        return ds.pixel_array  # native pixels, or no risky decoder: pydicom's own order
    failed: Exception | None = None
    for plugin in (p for p in plugins if p not in RISKY_PLUGINS):
        try:
            ds.pixel_array_options(decoding_plugin=plugin)
            return ds.pixel_array
        except Exception as exc:  # this decoder cannot: the next one may
            failed = exc
    risky = next(p for p in plugins if p in RISKY_PLUGINS)
    try:
        return decode_isolated(raw, risky, options.timeout_s)
    except DicomReadError:
        raise
    except Exception as exc:
        raise failed or exc from None


def _decode_with(raw: bytes, plugin: str) -> np.ndarray:
    """The pixel array of a DICOM file's bytes decoded by ``plugin`` (runs in a child process)."""
    import pydicom

    with quiet_pydicom():
        ds = pydicom.dcmread(io.BytesIO(raw), force=raw[128:132] != b"DICM")
        ds.pixel_array_options(decoding_plugin=plugin)
        return np.ascontiguousarray(ds.pixel_array)


_ISOLATED: Any = None  # the process pool of decode_isolated, made on first use


def exit_with_parent(pid: int, every_s: float = 0.5) -> None:
    """In a worker process: end it (``os._exit``) soon after process ``pid`` is gone. A pool's
    worker otherwise outlives a parent killed with SIGKILL (or ended by ``exit()`` from C, as
    libFuzzer does), blocked on its task queue, and keeps the forkserver and the parent's
    stdout alive with it."""

    def alive() -> bool:
        try:  # a zombie (exited, not yet reaped by its parent) counts as gone
            with open(f"/proc/{pid}/stat", "rb") as fh:
                return fh.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
        except FileNotFoundError:
            return False
        except (OSError, IndexError):  # no /proc: ask the kernel whether the number is taken
            try:
                os.kill(pid, 0)
            except (ProcessLookupError, PermissionError):
                return False
            return True

    def watch() -> None:
        while alive():
            time.sleep(every_s)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _shutdown_isolated() -> None:
    global _ISOLATED
    if _ISOLATED is not None:
        _ISOLATED.shutdown(wait=True, cancel_futures=True)
        _ISOLATED = None


def decode_isolated(raw: bytes, plugin: str, timeout_s: float = 120.0) -> np.ndarray:
    """Decode the pixels of a DICOM file's bytes with ``plugin`` in a child process, so that a
    decoder which aborts (rather than raising) rejects the file (``decoder_crashed``) instead of
    ending this process. Inside a decoding worker (:mod:`caselens.ingest.sources.dicom_source`,
    itself a child) the decoder runs in place: a crash there is already a rejection."""
    global _ISOLATED
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures import TimeoutError as FutureTimeout
    from concurrent.futures.process import BrokenProcessPool

    if multiprocessing.parent_process() is not None:
        return _decode_with(raw, plugin)
    if _ISOLATED is None:
        ctx = multiprocessing.get_context("forkserver")
        _ISOLATED = ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=exit_with_parent,
                                        initargs=(os.getpid(),))
        atexit.register(_shutdown_isolated)
    try:
        return _ISOLATED.submit(_decode_with, raw, plugin).result(timeout=timeout_s if timeout_s > 0 else None)
    except BrokenProcessPool:
        _ISOLATED.shutdown(wait=False, cancel_futures=True)
        _ISOLATED = None
        raise DicomReadError("decoder_crashed", f"the {plugin} decoder crashed on this file's pixel data "
                                                "(damaged compressed data)") from None
    except FutureTimeout:
        _ISOLATED.shutdown(wait=False, cancel_futures=True)
        for proc in list(getattr(_ISOLATED, "_processes", {}).values()):
            proc.kill()
        _ISOLATED = None
        raise DicomReadError("timeout", f"decoding took longer than {timeout_s:.0f}s; rejected") from None


def read_dicom(path: Path, secret: bytes,
               options: DicomOptions | None = None) -> tuple[Image.Image, dict[str, Any], dict[str, Any]]:
    """Read ``path`` into (image, metadata, provenance) of its middle frame; raises
    :class:`DicomReadError` with the ledger reason code."""
    images, metadata, prov = decode_frames(path, secret, options, "middle")
    return images[0], metadata, prov
