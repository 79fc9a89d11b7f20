"""A collection's adapter: a linear projection of its vectors, fitted on its labelled items.

An :class:`Adapter` maps encoder vectors ``x`` (rows of the items table, or queries embedded by
the same encoder) to unit vectors::

    x' = x                                  (power == 1)
    x' = sign(x) * |x| ** power, then L2    (power < 1: signed power normalisation)
    z  = (x' - mean) @ matrix + bias        (matrix: in_dim x out_dim; None = identity;
                                             bias: out_dim, None = zeros)
    z  = z / ||z||                          (normalisation "l2")

(a constant ``bias`` coordinate makes the cosine of unit vectors rank nearly like Euclidean
distance in the projected space, which helps projections with few dimensions)
so cosine similarity / inner product in the adapted space is what search and diagnosis rank by.
The adapter is fitted elsewhere (:mod:`caselens.retrieval.adaptation`); this module only holds,
applies, stores and loads it, with numpy alone.

Stored in a folder of the collection (``<collection>/adapter/``)::

    adapter.json            the record: method, shapes, power, normalisation, the encoder
                            fingerprint it applies to, the arrays' file names and sha256,
                            provenance (table version, label column, items, classes, CV scores)
    mean-<sha16>.npy        float32 arrays (those that are not None), read with
    matrix-<sha16>.npy      allow_pickle=False and checked by sha256; named by content, so a
    bias-<sha16>.npy        reader never pairs a record with arrays of another fit

Arrays are written first, the record last (atomically, :func:`caselens.files.atomic_write_bytes`),
so a reader sees the old adapter or the new one, never a mix. Never pickled.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from caselens.errors import AdapterIntegrityError, AdapterMismatchError, BadVectorError
from caselens.files import atomic_write_bytes, sha256_file
from caselens.indexes.layout import Layout

RECORD_FILE = "adapter.json"
FORMAT_VERSION = 1
NORMALISATIONS = ("l2",)


def _as_array(value: Any, name: str, ndim: int) -> np.ndarray | None:
    if value is None:
        return None
    arr = np.ascontiguousarray(np.asarray(value, np.float32))
    if arr.ndim != ndim:
        raise AdapterIntegrityError(f"adapter {name} must have {ndim} dimension(s), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise AdapterIntegrityError(f"adapter {name} holds NaN or infinite values")
    return arr


def _digest(arr: np.ndarray | None) -> str:
    if arr is None:
        return "none"
    h = hashlib.sha256()
    h.update(str(arr.shape).encode())
    h.update(np.ascontiguousarray(arr, np.float32).tobytes())
    return h.hexdigest()


@dataclass(frozen=True, eq=False)
class Adapter:
    """A fitted projection (see the module docstring); ``apply`` maps vectors to unit vectors."""

    method: str  # how it was fitted: "raw", "whiten", "lda", "metric", ... (free text for humans)
    encoder_fingerprint: str  # the encoder whose vectors it takes
    in_dim: int  # dimension of the encoder's vectors
    mean: np.ndarray | None = None  # (in_dim,) subtracted after the power transform; None: zeros
    matrix: np.ndarray | None = None  # (in_dim, out_dim); None: identity (out_dim = in_dim)
    bias: np.ndarray | None = None  # (out_dim,) added after the matrix; None: zeros
    power: float = 1.0  # signed power applied to each component first (1.0: none)
    normalisation: str = "l2"  # output normalisation ("l2": unit vectors)
    provenance: dict[str, Any] = field(default_factory=dict)  # what it was fitted on (JSON-able)

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not self.method:
            raise AdapterIntegrityError("adapter method must be a non-empty string")
        if not isinstance(self.encoder_fingerprint, str) or not self.encoder_fingerprint:
            raise AdapterIntegrityError("adapter needs the fingerprint of the encoder it applies to")
        if int(self.in_dim) <= 0:
            raise AdapterIntegrityError(f"adapter in_dim must be positive, got {self.in_dim}")
        object.__setattr__(self, "in_dim", int(self.in_dim))
        mean = _as_array(self.mean, "mean", 1)
        matrix = _as_array(self.matrix, "matrix", 2)
        if mean is not None and mean.shape != (self.in_dim,):
            raise AdapterIntegrityError(f"adapter mean has shape {mean.shape}, expected ({self.in_dim},)")
        if matrix is not None and (matrix.shape[0] != self.in_dim or matrix.shape[1] < 1):
            raise AdapterIntegrityError(f"adapter matrix has shape {matrix.shape}, expected ({self.in_dim}, out_dim)")
        bias = _as_array(self.bias, "bias", 1)
        out_dim = self.in_dim if matrix is None else matrix.shape[1]
        if bias is not None and bias.shape != (out_dim,):
            raise AdapterIntegrityError(f"adapter bias has shape {bias.shape}, expected ({out_dim},)")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "matrix", matrix)
        object.__setattr__(self, "bias", bias)
        power = float(self.power)
        if not (math.isfinite(power) and 0 < power <= 1):
            raise AdapterIntegrityError(f"adapter power must be in (0, 1], got {self.power}")
        object.__setattr__(self, "power", power)
        if self.normalisation not in NORMALISATIONS:
            raise AdapterIntegrityError(f"adapter normalisation {self.normalisation!r} is not one of {NORMALISATIONS}")
        json.dumps(self.provenance)  # must be JSON-able: it is stored as JSON

    @classmethod
    def identity(cls, encoder_fingerprint: str, in_dim: int, provenance: dict[str, Any] | None = None) -> "Adapter":
        """The adapter that keeps the raw vectors (only re-normalised)."""
        return cls("raw", encoder_fingerprint, in_dim, provenance=dict(provenance or {}))

    @property
    def out_dim(self) -> int:
        return self.in_dim if self.matrix is None else int(self.matrix.shape[1])

    @property
    def is_identity(self) -> bool:
        """True when ``apply`` only re-normalises: search the raw vectors and index nothing new."""
        return self.matrix is None and self.mean is None and self.bias is None and self.power == 1.0

    @property
    def fingerprint(self) -> str:
        """Short hash of everything ``apply`` depends on (and the encoder it applies to): equal
        fingerprints give equal adapted vectors. Stamp derived indexes of adapted vectors with it."""
        blob = json.dumps([FORMAT_VERSION, self.method, self.encoder_fingerprint, self.in_dim, self.power,
                           self.normalisation, _digest(self.mean), _digest(self.matrix), _digest(self.bias)])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def check_encoder(self, encoder_fingerprint: str) -> None:
        """Refuse vectors of an encoder other than the one the adapter was fitted for."""
        if encoder_fingerprint != self.encoder_fingerprint:
            raise AdapterMismatchError(
                f"adapter ({self.method}, fingerprint {self.fingerprint}) was fitted on vectors of encoder "
                f"{self.encoder_fingerprint}, not {encoder_fingerprint}: vectors of different encoders cannot "
                "share an adapter; fit the adapter again on this collection (or remove it)")

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        """Adapted unit vectors (float32, one row per input row) of encoder ``vectors``."""
        x = np.asarray(vectors, np.float32)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise BadVectorError(f"adapter takes {self.in_dim}-d vectors, got shape {np.shape(vectors)}")
        if not np.isfinite(x).all():
            raise BadVectorError("refusing to adapt vectors with NaN or infinite values")
        return project(x, self.mean, self.matrix, self.bias, self.power)

    def to_record(self) -> dict[str, Any]:
        """The adapter without its arrays, as stored in ``adapter.json`` (less the file list)."""
        return {"format_version": FORMAT_VERSION, "method": self.method, "fingerprint": self.fingerprint,
                "encoder_fingerprint": self.encoder_fingerprint, "in_dim": self.in_dim, "out_dim": self.out_dim,
                "power": self.power, "normalisation": self.normalisation, "provenance": self.provenance}


def project(vectors: np.ndarray, mean: np.ndarray | None = None, matrix: np.ndarray | None = None,
            bias: np.ndarray | None = None, power: float = 1.0) -> np.ndarray:
    """The adapter's map (module docstring) on a float matrix, without checks: unit float32 rows.
    Fitting code scores candidate projections with it, so they rank exactly as the stored adapter."""
    x = np.asarray(vectors, np.float32)
    if power != 1.0:
        x = np.sign(x) * np.abs(x) ** np.float32(power)
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if mean is not None:
        x = x - mean
    if matrix is not None:
        x = x @ matrix
    if bias is not None:
        x = x + bias
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def adapter_folder(collection_root: str | Path) -> Path:
    """The folder of a collection that holds its adapter (:attr:`Layout.adapter_dir`, where every
    file of a collection is named)."""
    return Layout(Path(collection_root)).adapter_dir


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, np.float32), allow_pickle=False)
    return buf.getvalue()


def save_adapter(adapter: Adapter, folder: str | Path) -> Path:
    """Write ``adapter`` into ``folder`` (created if needed): arrays first, the record last, each
    atomically; arrays of earlier fits are removed afterwards. Returns the record's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, dict[str, Any]] = {}
    for name, arr in (("mean", adapter.mean), ("matrix", adapter.matrix), ("bias", adapter.bias)):
        if arr is None:
            continue
        data = _npy_bytes(arr)
        digest = hashlib.sha256(data).hexdigest()
        file = f"{name}-{digest[:16]}.npy"
        atomic_write_bytes(folder / file, data)
        arrays[name] = {"file": file, "sha256": digest, "shape": list(arr.shape)}
    record = adapter.to_record()
    record["arrays"] = arrays
    record["saved"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    path = folder / RECORD_FILE
    atomic_write_bytes(path, json.dumps(record, indent=2, sort_keys=True).encode())
    keep = {a["file"] for a in arrays.values()}
    for old in folder.glob("*.npy"):  # arrays of earlier fits: no record points to them any more
        if old.name not in keep:
            old.unlink(missing_ok=True)
    return path


def read_record(folder: str | Path) -> dict[str, Any] | None:
    """The stored record (``adapter.json``) or None when the folder holds no adapter."""
    path = Path(folder) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterIntegrityError(f"adapter record {path} cannot be read ({exc}); fit the adapter again") from None
    if not isinstance(record, dict) or record.get("format_version") != FORMAT_VERSION:
        raise AdapterIntegrityError(f"adapter record {path} is not a caselens adapter of format {FORMAT_VERSION}; "
                                    "fit the adapter again")
    return record


def load_adapter(folder: str | Path, encoder_fingerprint: str | None = None) -> Adapter | None:
    """The adapter stored in ``folder`` (None when there is none).

    With ``encoder_fingerprint``, an adapter fitted for another encoder raises
    :class:`~caselens.errors.AdapterMismatchError`. A damaged record or array, or an array whose
    sha256 differs from the record's, raises :class:`~caselens.errors.AdapterIntegrityError`."""
    folder = Path(folder)
    record = read_record(folder)
    if record is None:
        return None
    try:
        stored_for = record["encoder_fingerprint"]
        if encoder_fingerprint is not None and stored_for != encoder_fingerprint:
            raise AdapterMismatchError(
                f"the adapter in {folder} was fitted on vectors of encoder {stored_for}, not {encoder_fingerprint} "
                "(the collection's): fit the adapter again on this collection, or remove it")
        arrays: dict[str, np.ndarray] = {}
        for name, meta in (record.get("arrays") or {}).items():
            if name not in ("mean", "matrix", "bias"):
                raise AdapterIntegrityError(f"adapter record in {folder} names an unknown array {name!r}")
            file = folder / Path(meta["file"]).name  # never a path out of the folder
            if not file.is_file():
                raise AdapterIntegrityError(f"adapter array {file} is missing; fit the adapter again")
            if sha256_file(file) != meta["sha256"]:
                raise AdapterIntegrityError(f"adapter array {file} is damaged (sha256 differs from the record); "
                                            "fit the adapter again")
            try:
                arr = np.load(file, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise AdapterIntegrityError(f"adapter array {file} cannot be read ({exc})") from None
            if list(arr.shape) != list(meta["shape"]):
                raise AdapterIntegrityError(f"adapter array {file} has shape {arr.shape}, the record says {meta['shape']}")
            arrays[name] = arr
        adapter = Adapter(method=record["method"], encoder_fingerprint=stored_for, in_dim=record["in_dim"],
                          mean=arrays.get("mean"), matrix=arrays.get("matrix"), bias=arrays.get("bias"),
                          power=record.get("power", 1.0),
                          normalisation=record.get("normalisation", "l2"), provenance=record.get("provenance") or {})
    except (KeyError, TypeError) as exc:
        raise AdapterIntegrityError(f"adapter record in {folder} lacks {exc}; fit the adapter again") from None
    if adapter.fingerprint != record.get("fingerprint"):
        raise AdapterIntegrityError(f"adapter in {folder} does not match its record's fingerprint; fit it again")
    return adapter


def remove_adapter(folder: str | Path) -> bool:
    """Remove the adapter stored in ``folder`` (the record first, so readers stop using it at
    once) and what was fitted with it there (JSON models such as ``diagnosis.json``); True when
    there was an adapter."""
    folder = Path(folder)
    record = folder / RECORD_FILE
    existed = record.exists()
    record.unlink(missing_ok=True)
    for old in [*folder.glob("*.npy"), *folder.glob("*.json")]:
        old.unlink(missing_ok=True)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    return existed
