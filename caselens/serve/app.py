"""The FastAPI app of ``caselens serve``: JSON endpoints under ``/api`` and the case viewer at ``/``.

Every endpoint is a thin shell: it checks the token and the request, then calls one
:class:`~caselens.serve.backend.Backend` method in a worker thread (at most
``config.threads`` at once) and turns its result into a response model.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path as FilePath
from typing import Annotated, Any, Literal, TypeVar

import anyio
import anyio.to_thread
from fastapi import Depends, FastAPI, File, Form, Path, Query, Request, Security, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from caselens import __version__
from caselens.errors import CaselensError, QueryError
from caselens.serve.auth import TokenStore
from caselens.serve.backend import Backend, IngestSpec, check_collection_name, set_encoder_threads
from caselens.serve.config import ServeConfig
from caselens.serve.errors import ServeError, TokenError, status_of
from caselens.serve.jobs import JobManager
from caselens.serve.limits import RateLimiter, check_image
from caselens.serve.middleware import AccessLog, GuardMiddleware, Metrics
from caselens.serve.models import (K_MAX, AskResponse, CollectionInfo, CollectionList, DiagnoseResponse,
                                             ErrorBody, Health, IngestJobBody, ItemModel, JobList, JobModel,
                                             LedgerSummary, MetricsBody, SearchItemBody, SearchResponse,
                                             SearchTextBody)

log = logging.getLogger(__name__)
STATIC = FilePath(__file__).with_name("static")
T = TypeVar("T")

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text} for status, text in (
        (400, "bad request: the reason code says what (bad_query, image_too_large, corrupt_image, ...)"),
        (401, "missing or invalid token"), (403, "the token's scope does not allow this"),
        (404, "no such collection, item, image or job"), (409, "conflict (e.g. encoder mismatch)"),
        (413, "request body over the upload limit"), (415, "upload is not a PNG, JPEG or DICOM file"),
        (422, "request does not match the schema"), (429, "rate limit of the token reached"),
        (500, "internal error (logged without request data)"), (503, "temporarily unavailable"))}
PNG = {200: {"content": {"image/png": {}}, "description": "PNG image"}}
NAME = Annotated[str, Path(min_length=1, max_length=64, description="collection name")]
ITEM_ID = Annotated[str, Path(min_length=1, max_length=512, description="item id (URL-encoded)")]


def _json(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


@functools.lru_cache(maxsize=2048)
def _thumbnail(path: str, stamp: tuple[int, int], size: int) -> bytes:
    """PNG thumbnail (longest side ``size``) of a cached rendering; keyed by its (mtime, size)."""
    from PIL import Image

    with Image.open(path) as im:
        im.draft("RGB", (size, size))
        im = im.convert("RGB") if im.mode not in ("L", "RGB") else im.copy()
    im.thumbnail((size, size))
    buffer = io.BytesIO()
    im.save(buffer, "PNG", optimize=False)
    return buffer.getvalue()


def _parse_json_object(value: str | None, field: str) -> dict[str, Any] | None:
    if value is None or not value.strip():
        return None
    try:
        parsed = json.loads(value)
    except ValueError:
        raise ServeError(400, "bad_request", f"{field} must be a JSON object, e.g. {{\"label\": \"pneumonia\"}}") from None
    if not isinstance(parsed, dict) or not all(
            v is None or isinstance(v, (str, int, float, bool)) for v in parsed.values()):
        raise ServeError(400, "bad_request", f"{field} must be a JSON object of column: value (strings or numbers)")
    return parsed


def _names(value: str | None) -> list[str]:
    return [n.strip() for n in (value or "").split(",") if n.strip()]


def create_app(config: ServeConfig, backend: Backend | None = None) -> FastAPI:
    """The service for ``config``. ``backend`` defaults to one over ``config.home``."""
    backend = backend or Backend(config.home, config.generator)
    tokens = TokenStore(config.tokens_path)
    limiter = RateLimiter(config.rate_per_second, config.rate_burst)
    metrics = Metrics()
    jobs = JobManager(backend.ingest)
    threads = anyio.CapacityLimiter(config.threads)

    async def run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn`` in a worker thread, at most ``config.threads`` at once (reads never block the loop)."""
        return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs), limiter=threads)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        set_encoder_threads(config.encoder_threads)
        for name in config.collections:
            await anyio.to_thread.run_sync(backend.warm, name)
        try:
            yield
        finally:
            jobs.shutdown(wait=False)
            backend.close()

    app = FastAPI(title="caselens", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Case search, grounded answers and a case viewer over caselens collections. "
                              "Send `Authorization: Bearer <token>` (`caselens token create NAME`).")
    app.state.config, app.state.backend, app.state.jobs, app.state.metrics = config, backend, jobs, metrics

    # ------------------------------------------------------------------ auth
    bearer = HTTPBearer(auto_error=False, description="an API token from `caselens token create NAME`")

    def scope_dependency(scope: str) -> Callable[..., Any]:
        def check(request: Request, credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> str:
            if config.auth:
                if credentials is None:
                    raise ServeError(401, "missing_token", "send Authorization: Bearer <token> "
                                     "(make one with `caselens token create NAME`)", {"WWW-Authenticate": "Bearer"})
                try:
                    token = tokens.verify(credentials.credentials)
                except TokenError:
                    log.error("token file %s cannot be used", config.tokens_path)
                    raise ServeError(503, "token_store_unavailable", "the server cannot read its token file") from None
                if token is None:
                    raise ServeError(401, "invalid_token", "this token is not known (revoked, or mistyped)",
                                     {"WWW-Authenticate": "Bearer"})
                if not token.allows(scope):
                    raise ServeError(403, "insufficient_scope", f"token {token.name!r} has scope {token.scope!r}; "
                                     f"this needs {scope!r} (`caselens token create NAME --scope write`)")
                name, key = token.name, "token:" + token.name
            else:
                name, key = "no-auth", "addr:" + (request.client.host if request.client else "?")
            request.state.token_name = name
            wait = limiter.acquire(key)
            if wait:
                raise ServeError(429, "rate_limited", f"rate limit of {config.rate_per_second:g} requests/s reached; "
                                 f"retry in {wait:.1f} s", {"Retry-After": str(max(1, round(wait + 0.5)))})
            return name

        return check

    read = Depends(scope_dependency("read"))
    write = Depends(scope_dependency("write"))

    # ------------------------------------------------------------------ errors
    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError) -> JSONResponse:
        return _json(exc.status, exc.code, exc.message, exc.headers or None)

    @app.exception_handler(CaselensError)
    async def library_error(request: Request, exc: CaselensError) -> JSONResponse:
        status, code = status_of(exc)
        return _json(status, code, exc.args[0] if exc.args else type(exc).__name__)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors()[:5]:  # location and message only: the input may be anything
            loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body",))
            parts.append(f"{loc}: {err.get('msg', 'invalid')}")
        return _json(422, "invalid_request", "; ".join(parts) or "request does not match the schema")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return _json(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail),
                     getattr(exc, "headers", None))

    # ------------------------------------------------------------------ routes
    @app.get("/api/health", response_model=Health, tags=["service"], responses=ERROR_RESPONSES)
    async def health() -> Health:
        """Liveness: answers without a token."""
        return Health(status="ok", version=__version__, auth=config.auth)

    @app.get("/api/metrics", response_model=MetricsBody, tags=["service"], responses=ERROR_RESPONSES)
    async def get_metrics(_: str = read) -> dict[str, Any]:
        """Request counts by route and status; latency percentiles per route."""
        return metrics.snapshot()

    @app.get("/api/collections", response_model=CollectionList, tags=["collections"], responses=ERROR_RESPONSES)
    async def list_collections(_: str = read) -> CollectionList:
        """Names of the collections served."""
        return CollectionList(collections=await run(backend.names))

    @app.get("/api/collections/{name}", response_model=CollectionInfo, tags=["collections"],
             responses=ERROR_RESPONSES)
    async def collection_info(name: NAME, _: str = read) -> dict[str, Any]:
        """Items, encoder, metadata columns, filter choices (facets) and index of a collection."""
        return await run(backend.info, name)

    @app.get("/api/collections/{name}/ledger", response_model=LedgerSummary, tags=["collections"],
             responses=ERROR_RESPONSES)
    async def ledger(name: NAME, runs: int = Query(20, ge=1, le=1000), _: str = read) -> dict[str, Any]:
        """What ingest accepted, found duplicate and rejected (by reason), overall and per run."""
        return await run(backend.ledger_summary, name, runs)

    @app.post("/api/collections/{name}/search/image", response_model=SearchResponse, tags=["search"],
              responses=ERROR_RESPONSES)
    async def search_image(name: NAME, image: UploadFile = File(description="PNG, JPEG or DICOM file"),
                           k: int = Form(10, ge=1, le=K_MAX), where: str | None = Form(None, max_length=2000),
                           filters: str | None = Form(None, max_length=4000, description="JSON object: column -> value"),
                           exclude_same: str | None = Form(None, max_length=64, description="e.g. patient_id"),
                           _: str = read) -> SearchResponse:
        """Items most similar to an uploaded image (or DICOM file)."""
        data = await image.read()
        kind = check_image(data, config.max_image_pixels)
        result = await run(backend.search_image, name, data, kind, k=k, where=where,
                           filters=_parse_json_object(filters, "filters"), exclude_same=exclude_same or None)
        return SearchResponse.of(result, "image")

    @app.post("/api/collections/{name}/search/item", response_model=SearchResponse, tags=["search"],
              responses=ERROR_RESPONSES)
    async def search_item(name: NAME, body: SearchItemBody, _: str = read) -> SearchResponse:
        """Items most similar to a stored item (the item itself left out)."""
        result = await run(backend.search_item, name, body.id, k=body.k, where=body.where, filters=body.filters,
                           exclude_same=body.exclude_same or None)
        return SearchResponse.of(result, "item")

    @app.post("/api/collections/{name}/search/text", response_model=SearchResponse, tags=["search"],
              responses=ERROR_RESPONSES)
    async def search_text(name: NAME, body: SearchTextBody, _: str = read) -> SearchResponse:
        """Items for a text query: dense (the collection's text tower), bm25 or hybrid."""
        result = await run(backend.search_text, name, body.text, k=body.k, mode=body.mode, where=body.where,
                           filters=body.filters)
        return SearchResponse.of(result, "text")

    @app.get("/api/collections/{name}/items/{item_id:path}", response_model=ItemModel, tags=["items"],
             responses=ERROR_RESPONSES)
    async def item(name: NAME, item_id: ITEM_ID, _: str = read) -> ItemModel:
        """One item's label, metadata, provenance and text."""
        return ItemModel.of(await run(backend.item, name, item_id))

    @app.get("/api/collections/{name}/images/{item_id:path}", response_class=Response, tags=["items"],
             responses={**ERROR_RESPONSES, **PNG})
    async def image(name: NAME, item_id: ITEM_ID, _: str = read) -> Response:
        """The item's image, from the collection's own image cache (PNG)."""
        path = await run(backend.item_image, name, item_id)
        return FileResponse(path, media_type="image/png")

    @app.get("/api/collections/{name}/thumbnails/{item_id:path}", response_class=Response, tags=["items"],
             responses={**ERROR_RESPONSES, **PNG})
    async def thumbnail(name: NAME, item_id: ITEM_ID, size: int = Query(192, ge=32, le=512), _: str = read) -> Response:
        """A small PNG of the item's cached image (longest side ``size``)."""
        path = await run(backend.item_image, name, item_id)
        st = os.stat(path)
        data = await run(_thumbnail, str(path), (st.st_mtime_ns, st.st_size), size)
        return Response(data, media_type="image/png")

    @app.post("/api/collections/{name}/diagnose", response_model=DiagnoseResponse, tags=["diagnose"],
              responses=ERROR_RESPONSES)
    async def diagnose(name: NAME, image: UploadFile | None = File(None, description="PNG, JPEG or DICOM file"),
                       id: str | None = Form(None, min_length=1, max_length=512, description="or a stored item's id"),
                       k: int | None = Form(None, ge=1, le=K_MAX, description="voters (default: the fitted number)"),
                       threshold: float | None = Form(None, ge=0.0, le=1.0,
                                                      description="abstain below this confidence (default: the fitted one)"),
                       knowledge: str | None = Form(None, max_length=1000, description="comma-separated collections "
                                                    "for guideline passages on the top candidates"),
                       _: str = read) -> DiagnoseResponse:
        """Calibrated label probabilities from the most similar cases (fitted by ``caselens adapt``),
        never the query itself nor its patient's cases."""
        data = await image.read() if image is not None else None
        if data is not None:
            check_image(data, config.max_image_pixels)
        if (data is None) == (id is None):
            raise QueryError("give exactly one query: an uploaded image or an item id")
        out = await run(backend.diagnose, name, image=data, item_id=id, k=k, threshold=threshold,
                        knowledge=_names(knowledge))
        return DiagnoseResponse.of(out)

    @app.post("/api/ask", response_model=AskResponse, tags=["ask"], responses=ERROR_RESPONSES)
    async def ask(question: str = Form(min_length=1, max_length=4000),
                  knowledge: str = Form(min_length=1, max_length=1000, description="comma-separated knowledge collections"),
                  cases: str | None = Form(None, max_length=64, description="case collection for the image"),
                  image: UploadFile | None = File(None, description="query image: similar cases join the context"),
                  k: int = Form(5, ge=1, le=50), task: Literal["free", "yesno", "mc"] = Form("free"),
                  options: str | None = Form(None, max_length=4000, description="JSON object: letter -> option text"),
                  min_score: float = Form(0.25, ge=0.0, le=1.0), _: str = read) -> AskResponse:
        """A grounded answer with checked citations (generator chosen by the server)."""
        data = await image.read() if image is not None else None
        if data is not None:
            check_image(data, config.max_image_pixels)
        parsed = _parse_json_object(options, "options")
        answer = await run(backend.ask, question, _names(knowledge), cases=cases or None, image=data,
                           k=k, task=task, options={str(a): str(b) for a, b in (parsed or {}).items()} or None,
                           min_score=min_score)
        return AskResponse.of(answer)

    @app.post("/api/collections/{name}/jobs", response_model=JobModel, status_code=202, tags=["jobs"],
              responses=ERROR_RESPONSES)
    async def start_ingest(name: NAME, body: IngestJobBody, _: str = write) -> dict[str, Any]:
        """Start ingesting a folder already on the server (under an allowed ingest root) into
        ``name`` (created with the classic encoder when new). Needs a write token."""
        spec = _ingest_spec(config, name, body)
        return jobs.submit(spec).to_dict()

    @app.get("/api/jobs", response_model=JobList, tags=["jobs"], responses=ERROR_RESPONSES)
    async def list_jobs(_: str = read) -> dict[str, Any]:
        """Recent jobs, newest first."""
        return {"jobs": [j.to_dict() for j in jobs.list()]}

    @app.get("/api/jobs/{job_id}", response_model=JobModel, tags=["jobs"], responses=ERROR_RESPONSES)
    async def job(job_id: str = Path(min_length=1, max_length=64), _: str = read) -> dict[str, Any]:
        """A job's state and progress (inputs read of the expected total)."""
        found = jobs.get(job_id)
        if found is None:
            raise ServeError(404, "job_not_found", "no job has this id (jobs are kept while the server runs)")
        return found.to_dict()

    # ------------------------------------------------------------------ the page
    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # ------------------------------------------------------------------ middleware (last added = outermost)
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_credentials=False,
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(GuardMiddleware, hosts=config.hosts, max_body=config.max_upload_bytes, metrics=metrics,
                       access_log=AccessLog(config.access_log))

    return app


def _ingest_spec(config: ServeConfig, name: str, body: IngestJobBody) -> IngestSpec:
    """The job's folder (and manifest), checked to lie under an allowed ingest root."""
    if not config.ingest_roots:
        raise ServeError(403, "ingest_disabled", "this server takes no ingest jobs; start it with "
                                                 "--ingest-root DIR to allow folders under DIR")
    check_collection_name(name)
    given = FilePath(body.folder).expanduser()
    candidates = [given] if given.is_absolute() else [root / given for root in config.ingest_roots]
    for candidate in candidates:
        try:
            folder = candidate.resolve(strict=True)
        except (OSError, RuntimeError):
            continue
        if any(folder.is_relative_to(root) for root in config.ingest_roots) and folder.is_dir():
            break
    else:
        raise ServeError(403, "folder_not_allowed", "the folder does not exist or is not under an allowed "
                                                    "ingest root of this server")
    manifest = None
    if body.manifest:
        manifest = (folder / body.manifest).resolve()
        if not manifest.is_relative_to(folder) or not manifest.is_file():
            raise ServeError(400, "bad_manifest", "the manifest must be a CSV file inside the folder")
    return IngestSpec(collection=name, folder=folder, kind=body.kind, manifest=manifest,
                      label_from_folder=body.label_from_folder)
