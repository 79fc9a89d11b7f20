"""Request and response models of the HTTP API (they are the OpenAPI spec at ``/openapi.json``)."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

K_MAX = 200
Scalar = str | float | int | bool | None


def finite(value: Any) -> Any:
    """``value`` with NaN and infinities (not JSON) replaced by None, in nested dicts and lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


class ErrorBody(BaseModel):
    """Every error: a reason code and what to do about it."""

    error: str = Field(description="machine-readable reason code, e.g. bad_query, missing_token, image_too_large")
    detail: str = Field(description="what was wrong and how to fix it")


class Health(BaseModel):
    status: Literal["ok"]
    version: str
    auth: bool = Field(description="whether requests need a token")


class RouteMetrics(BaseModel):
    requests: int
    by_status: dict[str, int]
    latency_ms: dict[str, float | int | None] = Field(description="p50, p90, p99, max over the last requests, and window")


class MetricsBody(BaseModel):
    uptime_s: float
    requests: int
    routes: dict[str, RouteMetrics] = Field(description="per route template")


class EncoderInfo(BaseModel):
    spec: str | None
    dim: int
    modalities: list[str]
    fingerprint: str | None


class IndexInfo(BaseModel):
    factory: str
    vectors: int
    table_version: int
    fresh: bool


class FacetValue(BaseModel):
    value: Scalar
    count: int


class CollectionInfo(BaseModel):
    name: str
    items: int
    table_version: int
    created: str | None = None
    encoder: EncoderInfo
    metadata_columns: list[str]
    facets: dict[str, list[FacetValue]] = Field(description="most common values of label, modality, ... (filter choices)")
    index: IndexInfo | None


class CollectionList(BaseModel):
    collections: list[str]


class HitModel(BaseModel):
    """One search result."""

    rank: int
    score: float
    id: str
    kind: str
    label: str | None = None
    source: str | None = Field(None, description="path relative to the ingest folder, or corpus file")
    text: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    provenance: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def of(cls, hit: Any) -> "HitModel":
        label = None if hit.label is None else str(hit.label)
        score = float(hit.score) if math.isfinite(float(hit.score)) else 0.0
        return cls(rank=int(hit.rank), score=score, id=str(hit.id), kind=str(hit.kind), label=label,
                   source=hit.source, text=hit.text, metadata=finite(dict(hit.metadata or {})),
                   provenance=finite(dict(hit.provenance or {})))


class SearchBody(BaseModel):
    """Options shared by every search."""

    model_config = ConfigDict(extra="forbid")
    k: int = Field(10, ge=1, le=K_MAX, description="results to return")
    where: str | None = Field(None, max_length=2000, description="SQL filter on metadata columns, e.g. \"modality = 'CT'\"")
    filters: dict[str, Scalar] | None = Field(None, description="column = value filters, ANDed with where")


class SearchItemBody(SearchBody):
    id: str = Field(min_length=1, max_length=512, description="id of a stored item: its neighbours are returned")
    exclude_same: str | None = Field(None, max_length=64, description="drop items sharing the query's value of this column, e.g. patient_id")


class SearchTextBody(SearchBody):
    text: str = Field(min_length=1, max_length=4000)
    mode: Literal["dense", "bm25", "hybrid"] = "dense"


class SearchResponse(BaseModel):
    collection: str
    query: Literal["image", "item", "text"]
    encoder: str
    mode: str
    candidates: int = Field(description="rows ranked after filters and exclusions")
    milliseconds: float = Field(description="time inside the library")
    hits: list[HitModel]

    @classmethod
    def of(cls, result: Any, query: str) -> "SearchResponse":
        return cls(collection=result.collection, query=query, encoder=result.encoder, mode=result.mode,
                   candidates=int(result.candidates), milliseconds=float(result.milliseconds),
                   hits=[HitModel.of(h) for h in result.hits])


class ItemModel(BaseModel):
    id: str
    kind: str
    label: str | None = None
    source: str | None = None
    text: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    provenance: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def of(cls, hit: Any) -> "ItemModel":
        h = HitModel.of(hit)
        return cls(**h.model_dump(exclude={"rank", "score"}))


class LedgerRun(BaseModel):
    run_id: str
    started: str
    finished: str
    accepted: int
    duplicate: int
    rejected: int
    deleted: int


class LedgerSummary(BaseModel):
    collection: str
    rows: int
    by_status: dict[str, int]
    rejected_by_reason: dict[str, int]
    runs: list[LedgerRun] = Field(description="newest first")


class IngestJobBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    folder: str = Field(min_length=1, max_length=4096, description="folder on the server, under an allowed ingest root")
    kind: Literal["images", "dicom"] = "images"
    manifest: str | None = Field(None, max_length=4096, description="CSV (path,label[,patient_id,...]) inside the folder")
    label_from_folder: bool = False


class JobModel(BaseModel):
    id: str
    kind: str
    collection: str
    state: Literal["queued", "running", "done", "failed"]
    done: int
    total: int | None = None
    created: float
    started: float | None = None
    finished: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    detail: str | None = None


class JobList(BaseModel):
    jobs: list[JobModel]


class ContextEntry(BaseModel):
    key: str = Field(description="citation key: case:ID, page:DOC#pN or doc:ID")
    kind: str
    collection: str
    id: str
    text: str
    score: float
    source: str | None = None
    image: bool = Field(description="whether the generator was shown its image")


class SentenceSupport(BaseModel):
    text: str
    cited: list[str]
    supported: bool = Field(description="cites a retrieved source sharing enough of its content words")
    overlap: float


class Grounding(BaseModel):
    """The citation check of an answer (empty when it abstained before generating)."""

    cited: list[str] = Field(default_factory=list)
    invalid_citations: list[str] = Field(default_factory=list)
    supported_fraction: float | None = None
    grounded: bool | None = None
    sentences: list[SentenceSupport] = Field(default_factory=list)


class AskResponse(BaseModel):
    question: str
    answer: str
    generator: str
    abstained: bool
    abstain_reason: str
    raw_answer: str
    choice: str | None = None
    context: list[ContextEntry]
    dropped: list[str]
    grounding: Grounding
    timings_ms: dict[str, float]

    @classmethod
    def of(cls, answer: Any) -> "AskResponse":
        g = dict(answer.grounding or {})
        grounding = Grounding(cited=list(g.get("cited", [])), invalid_citations=list(g.get("invalid_citations", [])),
                              supported_fraction=finite(g.get("supported_fraction")), grounded=g.get("grounded"),
                              sentences=[SentenceSupport(text=x["text"], cited=list(x["cited"]), supported=bool(x["supported"]),
                                                         overlap=float(finite(x["overlap"]) or 0.0))
                                         for x in g.get("sentences", [])])
        context = [ContextEntry(key=c["key"], kind=c["kind"], collection=c["collection"], id=str(c["id"]),
                                text=c["text"], score=float(finite(c["score"]) or 0.0), source=c.get("source"),
                                image=bool(c.get("image"))) for c in answer.context]
        return cls(question=answer.question, answer=answer.answer, generator=answer.generator,
                   abstained=answer.abstained, abstain_reason=answer.abstain_reason, raw_answer=answer.raw_answer,
                   choice=answer.choice, context=context, dropped=list(answer.dropped), grounding=grounding,
                   timings_ms={k: float(v) for k, v in answer.timings_ms.items()})


class LabelProbability(BaseModel):
    label: str
    probability: float


class Passage(BaseModel):
    key: str
    text: str
    collection: str
    score: float


class DiagnoseResponse(BaseModel):
    """Label probabilities from similar cases (never the query's own patient)."""

    labels: list[LabelProbability] = Field(description="most probable first")
    abstained: bool = Field(description="true when the top probability is below the threshold")
    threshold: float
    supporting: list[HitModel]
    passages: list[Passage]
