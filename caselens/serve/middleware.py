"""What every request goes through: Host check, body size limit, security headers, request
metrics and an access log without PHI.

The access log line of a request holds the time, method, *route template* (``/api/collections/
{name}/items/{item_id}``, never the path as sent), status, latency and the token's name; never a
query string, body, header value, uploaded image, patient value or free text. uvicorn's own
access log (which prints paths and query strings) is turned off by :func:`run_server`.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Awaitable, Callable

log = logging.getLogger("caselens.serve.access")
errors = logging.getLogger("caselens.serve.errors")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
    # the page loads only its own script and style; images are this origin's or blob: URLs made from
    # authenticated fetches; nothing from elsewhere, no inline script
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
                                 b"connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"),
]
NO_STORE = [(b"cache-control", b"no-store")]  # nothing the service sends is kept by browsers or proxies
_REPLACED = {k for k, _ in SECURITY_HEADERS + NO_STORE}
WINDOW = 2048
_CONVERTER = re.compile(r":[a-z]+}")  # latencies kept per route for the percentiles


class Metrics:
    """Request counts by route and status, and latency percentiles per route (last ``WINDOW``)."""

    def __init__(self) -> None:
        self.started = time.time()
        self._lock = threading.Lock()
        self._counts: dict[str, dict[str, int]] = {}
        self._latency: dict[str, deque[float]] = {}

    def record(self, route: str, status: int, ms: float) -> None:
        with self._lock:
            counts = self._counts.setdefault(route, {})
            counts[str(status)] = counts.get(str(status), 0) + 1
            self._latency.setdefault(route, deque(maxlen=WINDOW)).append(ms)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            routes = {}
            for route, counts in sorted(self._counts.items()):
                values = sorted(self._latency.get(route, ()))
                routes[route] = {"requests": sum(counts.values()), "by_status": dict(sorted(counts.items())),
                                 "latency_ms": {f"p{int(q * 100)}": _quantile(values, q) for q in (0.5, 0.9, 0.99)}
                                 | {"max": round(values[-1], 3) if values else None, "window": len(values)}}
        return {"uptime_s": round(time.time() - self.started, 1),
                "requests": sum(r["requests"] for r in routes.values()), "routes": routes}


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(values[min(len(values) - 1, int(q * len(values)))], 3)


class AccessLog:
    """JSON lines to ``path`` (appended, 0600) and to the ``caselens.serve.access`` logger."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch(mode=0o600, exist_ok=True)

    def write(self, method: str, route: str, status: int, ms: float, token: str | None) -> None:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "method": method, "route": route,
                 "status": status, "ms": round(ms, 2), "token": token or "-"}
        line = json.dumps(entry, separators=(",", ":"))
        log.info(line)
        if self.path is not None:
            with self._lock, self.path.open("a", encoding="utf-8") as fh:
                fh.write(line + "\n")


def _json_error(status: int, code: str, detail: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    body = json.dumps({"error": code, "detail": detail}).encode()
    return [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())], body


class GuardMiddleware:
    """Outermost layer of the app (see the module docstring). ``hosts``: Host names accepted
    (None: any); ``max_body``: request bodies above this many bytes are answered 413 before the
    endpoint runs (``Content-Length`` checked first, then the bytes actually received)."""

    def __init__(self, app: ASGIApp, *, hosts: tuple[str, ...] | None, max_body: int, metrics: Metrics,
                 access_log: AccessLog):
        self.app, self.hosts, self.max_body = app, hosts, max_body
        self.metrics, self.access_log = metrics, access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status_box = [500]
        started = [False]

        async def send_wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                started[0] = True
                status_box[0] = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in _REPLACED]
                message = {**message, "headers": headers + SECURITY_HEADERS + NO_STORE}
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is None:
                body_or_refusal = await self._read_body(scope, receive)
                if isinstance(body_or_refusal, tuple):
                    refusal = body_or_refusal
                elif body_or_refusal is not None:
                    receive = _replay(body_or_refusal, receive)
            if refusal is not None:
                status, code, detail = refusal
                headers, body = _json_error(status, code, detail)
                await send_wrapped({"type": "http.response.start", "status": status, "headers": headers})
                await send_wrapped({"type": "http.response.body", "body": body})
                return
            try:
                await self.app(scope, receive, send_wrapped)
            except Exception as exc:  # noqa: BLE001 - the catch-all: JSON 500, logged without PHI
                log_internal_error(exc, _route_template(scope))
                if not started[0]:
                    headers, body = _json_error(500, "internal_error", "the server failed to answer this request; "
                                                                       "the error is in its log (no request data kept)")
                    await send_wrapped({"type": "http.response.start", "status": 500, "headers": headers})
                    await send_wrapped({"type": "http.response.body", "body": body})
        finally:
            ms = (time.perf_counter() - start) * 1000
            route = _route_template(scope)
            state = scope.get("state") or {}
            self.metrics.record(route, status_box[0], ms)
            self.access_log.write(scope.get("method", "?"), route, status_box[0], ms, state.get("token_name"))

    def _refusal(self, scope: Scope) -> tuple[int, str, str] | None:
        if self.hosts is not None:
            host = ""
            for key, value in scope.get("headers", []):
                if key == b"host":
                    host = value.decode("latin-1").strip().lower()
                    break
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in self.hosts:
                return 400, "bad_host", "this service answers requests addressed to its own host names only"
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    return 400, "bad_request", "Content-Length is not a number"
                if length > self.max_body:
                    return 413, "payload_too_large", (f"request body of {length:,} bytes is over the limit of "
                                                      f"{self.max_body:,} bytes (--max-upload-mb)")
        return None

    async def _read_body(self, scope: Scope, receive: Receive) -> list[Message] | tuple[int, str, str] | None:
        """The request's body messages, or a 413 refusal once more than ``max_body`` bytes came;
        None for methods without a body (nothing read)."""
        if scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return None
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_body:
                return 413, "payload_too_large", f"request body is over the limit of {self.max_body:,} bytes"
            if not message.get("more_body", False):
                break
        return messages


def log_internal_error(exc: BaseException, route: str) -> None:
    """Log an unexpected error by type, route and code location (file, line, function), never its
    message or local values: those may hold an uploaded file's name, a patient value or a query."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)[-6:]
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in reversed(frames))
    errors.error("internal error on %s: %s at %s", route, type(exc).__name__, where)


def _replay(messages: list[Message], receive_more: Receive) -> Receive:
    """A ``receive`` that gives the buffered body messages, then waits on the client again."""
    queue = list(messages)

    async def receive() -> Message:
        if queue:
            return queue.pop(0)
        return await receive_more()

    return receive


def _route_template(scope: Scope) -> str:
    """The matched route's template (e.g. ``/api/collections/{name}``), never the path as sent."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return _CONVERTER.sub("}", path)  # {item_id:path} -> {item_id}
    return "(unmatched)"
