"""The worker side of a Ray ingest (:mod:`caselens.ingest.ray_runner`): the read, encode and
write stages, the row counter and the secret's handle.

Imports no LanceDB and no driver code, so Ray worker processes start light: the read stage needs
the sources, the encode stage the encoder registry, the write stage Lance
(:mod:`caselens.indexes.fragments`).

Rows between stages: after *read*, ``item`` (an :class:`~caselens.ingest.items.Item` to encode,
with its payload, or None) and ``outcome`` (JSON: what became of a rejected or already stored
input; empty for an item to encode); after *encode*, ``outcome``, ``record`` (JSON of an
accepted item without its payload) and ``vector``; after *write*, one row per written batch:
``outcomes`` (JSON list, in input order, each with the item's position in the fragment),
``fragments`` (JSON list of Lance fragment metadata), and for a batch left to the driver
``deferred`` (JSON records) and ``vectors`` (float32 bytes).
"""

from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any

import numpy as np

from caselens.cluster import ray_module
from caselens.errors import BadVectorError, EncoderMismatchError
from caselens.indexes import fragments
from caselens.indexes.rows import MetadataTypeError, arrow_rows, coerce_metadata, table_row
from caselens.ingest.chunking import chunker_for
from caselens.ingest.embed import encode_items
from caselens.ingest.encoders import load_from_record
from caselens.ingest.encoders.base import Encoder
from caselens.ingest.items import Item, Rejection

ray = ray_module()  # RunnerError (how to install it) when Ray is missing

# Test hook: a folder named by this variable; a file ``<point>`` in it makes the process reaching
# that point remove the file and die at once (``read``, ``encode``: os._exit of a worker;
# ``commit``: SIGKILL of the driver right after a commit). Inert when unset.
FAULTS_ENV = "CASELENS_RAY_FAULTS"
DUPLICATE_REASON = "an item with this id is already stored; nothing added"


def fault(point: str) -> None:
    """Die here when the test hook :data:`FAULTS_ENV` asks for it (once per file)."""
    folder = os.environ.get(FAULTS_ENV)
    if not folder:
        return
    try:
        os.remove(os.path.join(folder, point))
    except FileNotFoundError:
        return
    if point == "commit":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(17)


class SecretRef:
    """The collection's secret as a Ray object: what tasks and actors are given instead of the
    bytes (its repr shows nothing); :meth:`get` reads it once per process."""

    def __init__(self, ref: ray.ObjectRef):
        self._refs = [ref]  # in a list: Ray passes it on as a reference, never resolves it on its own

    def __repr__(self) -> str:
        return "SecretRef(<hidden>)"

    def get(self) -> bytes:
        key = self._refs[0].hex()
        if key not in _SECRETS:
            _SECRETS[key] = ray.get(self._refs[0])
        return _SECRETS[key]


_SECRETS: dict[str, bytes] = {}
_STORED: dict[str, frozenset] = {}
_ENCODERS: dict[str, Encoder] = {}
_LOCK = threading.Lock()


def worker_encoder(record: dict[str, Any]) -> Encoder:
    """The encoder of ``record``, loaded once per worker process, refused when its fingerprint
    differs from the record's (another checkpoint at the same path on this node, another version
    of a library)."""
    with _LOCK:
        encoder = _ENCODERS.get(record["fingerprint"])
        if encoder is None:
            encoder = load_from_record(record)
            if encoder.info.fingerprint != record["fingerprint"]:
                raise EncoderMismatchError(
                    f"encoder {record['spec']} loaded on node {ray.util.get_node_ip_address()} has fingerprint "
                    f"{encoder.info.fingerprint}, the collection's is {record['fingerprint']}: every worker "
                    "must see the same weights and library versions")
            _ENCODERS[record["fingerprint"]] = encoder
        return encoder


def _objects(values: list[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _outcome(status: str, inputs: list[str], item_id: str = "", code: str = "", reason: str = "") -> str:
    return json.dumps({"status": status, "inputs": inputs, "id": item_id, "code": code, "reason": reason, "row": -1})


def _item_outcome(it: Item, status: str, code: str = "", reason: str = "") -> str:
    return _outcome(status, list(it.members or [it.input]), it.id, code, reason)


# ------------------------------------------------------------------ stages
def _give_key(reader: Any, secret: SecretRef) -> None:
    """Give a part reader (sent without the collection's key) the key where it runs: for its
    pseudonyms, and for its path naming when the collection hashes input paths
    (:mod:`caselens.ingest.source_paths`: the same names as a local ingest)."""
    if hasattr(reader, "secret") and not reader.secret:
        reader.secret = secret.get()
    paths = getattr(reader, "paths", None)
    if paths is not None and not paths.secret and paths.mode != "relative":
        reader.paths = paths.keyed(secret.get())


def read_parts(batch: dict[str, np.ndarray], *, reader: Any, secret: SecretRef, chunking: dict | None,
               record: dict[str, Any], stored: Any, uri: str) -> dict[str, np.ndarray]:
    """Read stage: the items and rejections of each part; items whose id is stored already are
    duplicates here (never encoded). ``stored``: the ids stored when the run began (a Ray object,
    read once per process), or None for collections too large for that (asked of the table)."""
    fault("read")
    _give_key(reader, secret)
    if chunking is not None and getattr(reader, "chunker", None) is None:
        reader.chunker = chunker_for(worker_encoder(record), chunking["max_tokens"], chunking["overlap"])
    got: list[Item | Rejection] = []
    for part in batch["part"]:
        got.extend(reader.read_part(part))
    ids = [it.id for it in got if isinstance(it, Item)]
    if isinstance(stored, ray.ObjectRef):
        key = stored.hex()
        if key not in _STORED:
            _STORED.clear()  # one run's set at a time
            _STORED[key] = ray.get(stored)
        stored = _STORED[key]
    known = stored & set(ids) if stored is not None else fragments.stored_ids(fragments.open_table(uri), ids)
    items, outcomes = [], []
    for it in got:
        if isinstance(it, Rejection):
            items.append(None)
            outcomes.append(_outcome("rejected", [it.input], "", it.reason_code, it.reason))
        elif it.id in known:
            items.append(None)
            outcomes.append(_item_outcome(it, "duplicate", "already_present", DUPLICATE_REASON))
        else:
            items.append(it)
            outcomes.append("")
    return {"item": _objects(items), "outcome": np.array(outcomes, dtype=object)}


def read_headers(reader: Any, secret: SecretRef, files: list) -> list:
    """Headers of DICOM ``files`` (path, relative name), read by a part reader (see
    ``DicomSource.read_headers``): what series and study units are planned from."""
    _give_key(reader, secret)
    return reader.read_headers(files)


class EncodeActor:
    """Encode stage: one actor per encoder worker, the model loaded once (on its GPU when it has one)."""

    def __init__(self, record: dict[str, Any], dim: int, on_bad_vectors: str, token_limit: bool):
        self.encoder = worker_encoder(record)
        self.dim, self.on_bad_vectors = dim, on_bad_vectors
        self.limit = self.encoder.max_tokens() if token_limit else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fault("encode")
        # an all-None column comes back from Arrow as NaNs: anything not an Item has nothing to encode
        items: list[Item | None] = [it if isinstance(it, Item) else None for it in batch["item"]]
        outcomes = [str(o) for o in batch["outcome"]]
        records = [""] * len(items)
        vectors = np.zeros((len(items), self.dim), np.float32)
        fresh = [i for i, it in enumerate(items) if it is not None]
        if fresh:
            got = encode_items(self.encoder, [items[i] for i in fresh])
            good = np.isfinite(got).all(axis=1) & (got.shape[1] == self.dim)
            if not good.all() and self.on_bad_vectors == "error":
                bad = [items[fresh[j]].input for j in np.flatnonzero(~good)]
                raise BadVectorError(f"encoder returned non-finite vectors for {bad}; nothing of this batch stored")
            for j, i in enumerate(fresh):
                it = items[i]
                if not good[j]:
                    outcomes[i] = _item_outcome(it, "rejected", "bad_vector",
                                                "encoder returned a non-finite vector or one of the wrong size")
                    continue
                code, note = "", ""
                if self.limit and it.text is not None:
                    n_tokens = self.encoder.count_tokens(it.text)
                    if n_tokens and n_tokens > self.limit:
                        it.provenance["truncated_from_tokens"] = n_tokens
                        code, note = "truncated", f"text has {n_tokens} tokens; the encoder read the first {self.limit}"
                vectors[i] = got[j]
                records[i] = json.dumps({"id": it.id, "kind": it.kind, "source": it.source, "text": it.text,
                                         "provenance": it.provenance, "metadata": it.metadata},
                                        default=str)  # as coerce_metadata turns values of other types to text
                outcomes[i] = _item_outcome(it, "accepted", code, note)
        return {"outcome": np.array(outcomes, dtype=object), "record": np.array(records, dtype=object),
                "vector": vectors}


@ray.remote(num_cpus=0, max_restarts=0)
class RowCounter:
    """Row numbers for one run: ranges handed out in order, never twice. Started by the driver
    while it holds the collection's write lock, at one past the largest stored row number;
    never restarted (a lost counter ends the run; a re-run starts a new one)."""

    def __init__(self, start: int):
        self.next = int(start)

    def take(self, n: int) -> int:
        start, self.next = self.next, self.next + int(n)
        return start


def write_batch(batch: dict[str, np.ndarray], *, uri: str, counter: Any) -> dict[str, np.ndarray]:
    """Write stage: the accepted rows of a batch as one Lance fragment (not committed), their
    metadata coerced to the table's columns as they are now. A batch whose metadata needs a new
    column is handed back to the driver instead (``deferred``)."""
    outcomes = [json.loads(o) for o in batch["outcome"]]
    table = fragments.open_table(uri)
    types = fragments.column_types(table)
    keep, rows, metas = [], [], []
    deferred = False
    for i, (o, rec) in enumerate(zip(outcomes, batch["record"])):
        if o["status"] != "accepted":
            continue
        record = json.loads(rec)
        try:
            meta = coerce_metadata(record.get("metadata", {}), types)
        except MetadataTypeError as exc:
            o.update(status="rejected", code="bad_metadata", reason=str(exc))
            continue
        if any(k not in types and v is not None for k, v in meta.items()):
            deferred = True
        keep.append(i)
        rows.append(record)
        metas.append(meta)
    out = {"fragments": "[]", "deferred": "[]", "vectors": b""}
    vectors = np.asarray(batch["vector"], np.float32)[keep] if keep else np.zeros((0, 0), np.float32)
    if deferred:
        for o in outcomes:  # the driver decides these again, in order
            if o["status"] == "rejected" and o["code"] == "bad_metadata":
                o.update(status="accepted", code="", reason="")
        keep = [i for i, o in enumerate(outcomes) if o["status"] == "accepted"]
        out["deferred"] = json.dumps([json.loads(batch["record"][i]) for i in keep])
        out["vectors"] = np.ascontiguousarray(np.asarray(batch["vector"], np.float32)[keep]).tobytes()
        for pos, i in enumerate(keep):
            outcomes[i]["row"] = pos
    elif keep:
        start = ray.get(counter.take.remote(len(keep)))
        data = arrow_rows([table_row(r, start + n, m) for n, (r, m) in enumerate(zip(rows, metas))], vectors,
                          table.schema)
        out["fragments"] = json.dumps(fragments.write_fragment(uri, data, table))
        for pos, i in enumerate(keep):
            outcomes[i]["row"] = pos
    out["outcomes"] = json.dumps(outcomes)
    return {key: np.array([value], dtype=object) for key, value in out.items()}
