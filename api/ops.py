"""Operations: Prometheus metrics (``/metrics``), request ids and structured JSON logs, and
``/readyz`` (database up, schema current).

Every matched request is timed and counted by route template and status, answered with an
``X-Request-Id`` (the caller's, when it sends a sane one, else a new one) and logged as one JSON
line carrying it; that includes refusals made before the handler runs (a CSRF failure, a form
body that cannot be parsed). Metrics use prometheus-client's default registry; the database-side gauges
(outbox backlog and failures, rollup lag) are read at scrape time from ``api.ops_gauges()``.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid

import msgspec
from litestar import Request, Response, get
from litestar.datastructures import MutableScopeHeaders
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from api import db
from api.errors import PgtallyError, error_response, problems

log = logging.getLogger("pgtally.http")

REQUESTS = Counter("pgtally_http_requests", "HTTP requests by route template, method and status",
                   ["method", "route", "status"])
LATENCY = Histogram("pgtally_http_request_seconds", "HTTP request latency by route template and method",
                    ["method", "route"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
CONSUME = Counter("pgtally_consume", "POST /v1/usage/events outcomes: charged, replayed, refused (402), invalid (4xx)",
                  ["outcome"])
WEBHOOKS = Counter("pgtally_stripe_webhook_events", "Stripe webhook events by type and outcome", ["type", "outcome"])
# Database-side gauges are read at scrape time (the newest reading wins across workers); pool
# gauges add up over the server processes.
OUTBOX_PENDING = Gauge("pgtally_outbox_pending", "Outbox messages waiting to be delivered", ["kind"],
                       multiprocess_mode="mostrecent")
OUTBOX_FAILED = Gauge("pgtally_outbox_failed", "Outbox messages that exhausted their retries", ["kind"],
                      multiprocess_mode="mostrecent")
ROLLUP_LAG = Gauge("pgtally_usage_rollup_lag_seconds", "Age of the oldest usage event not yet in the analytics rollup",
                   multiprocess_mode="mostrecent")
POOL = Gauge("pgtally_pool_connections", "Database pool: size, available and waiting requests", ["state"],
             multiprocess_mode="livesum")


def prepare_multiprocess_metrics(directory) -> None:
    """For ``pgtally serve --workers N``: every worker writes its metrics to files in an empty
    ``directory`` (prometheus-client's multiprocess mode, set before the workers import it) and
    ``/metrics`` adds them up."""
    import shutil

    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)


def registry():
    """The registry /metrics reads: this process's, or all workers' in multiprocess mode."""
    from prometheus_client import REGISTRY, CollectorRegistry, multiprocess

    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    combined = CollectorRegistry()
    multiprocess.MultiProcessCollector(combined)
    return combined

REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
CONSUME_ROUTE = ("POST", "/v1/usage/events")
CONSUME_OUTCOMES = {201: "charged", 200: "replayed", 402: "refused"}


class Observe:
    """ASGI middleware: request id, metrics and one JSON log line per matched request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if REQUEST_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        responded = False
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status, responded
            if message["type"] == "http.response.start":
                status, responded = message["status"], True
                MutableScopeHeaders.from_message(message)["X-Request-Id"] = request_id
            await send(message)

        try:
            try:
                await self.app(scope, receive, send_with_id)
            except Exception as exc:
                if responded:
                    raise
                # Raised by the middleware inside this one (Litestar's CSRF check, which also
                # parses a form body for its token), so past the handler's exception handling:
                # answered here by the same handlers, with the request id, and counted as itself.
                request = scope["litestar_app"].request_class(scope=scope, receive=receive)
                response = error_response(request, exc)
                await response.to_asgi_response(app=None, request=request)(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route, method = scope.get("path_template") or "unmatched", scope["method"]
            REQUESTS.labels(method, route, str(status)).inc()
            LATENCY.labels(method, route).observe(elapsed)
            if (method, route) == CONSUME_ROUTE:
                CONSUME.labels(CONSUME_OUTCOMES.get(status, "invalid" if status < 500 else "error")).inc()
            log.info("request", extra={"request_id": request_id, "method": method, "route": route,
                                       "path": scope["path"], "status": status, "duration_ms": round(elapsed * 1000, 2)})


def configure_logging(fmt: str = "json", level: int = logging.INFO) -> None:
    """Log to stderr as one JSON object a line (python-json-logger), or as text (``fmt="text"``):
    pgtally's and uvicorn's own messages from ``level`` on, libraries' warnings and errors."""
    from pythonjsonlogger.json import JsonFormatter

    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                                       rename_fields={"asctime": "time", "levelname": "level", "name": "logger"})
                         if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    for name in ("pgtally", "uvicorn"):
        logging.getLogger(name).setLevel(level)


@get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response[bytes]:
    """Prometheus text format: request counts and latency by route, consume outcomes, webhook
    events, outbox backlog and failures, usage rollup lag, pool usage."""
    pool = request.app.state.pool
    stats = pool.get_stats()
    POOL.labels("size").set(stats.get("pool_size", 0))
    POOL.labels("available").set(stats.get("pool_available", 0))
    POOL.labels("waiting").set(stats.get("requests_waiting", 0))
    try:
        async with pool.connection() as conn:
            (gauges,) = await (await conn.execute("SELECT api.ops_gauges()")).fetchone()
    except Exception:  # noqa: BLE001 - the process metrics still answer with the database down
        gauges = None
    if gauges:
        OUTBOX_PENDING.clear()
        OUTBOX_FAILED.clear()
        for kind, row in gauges["outbox"].items():
            OUTBOX_PENDING.labels(kind).set(row["pending"])
            OUTBOX_FAILED.labels(kind).set(row["failed"])
        ROLLUP_LAG.set(gauges["rollup_lag_seconds"])
    return Response(generate_latest(registry()), media_type=CONTENT_TYPE_LATEST)


class Ready(msgspec.Struct):
    status: str
    schema: str
    """The newest migration applied."""


@get("/readyz", summary="Readiness: database writable and schema current", responses=problems(503))
async def readyz(request: Request) -> Ready:
    """200 ``{"status": "ready", "schema": <latest migration>}`` when the database answers, can
    write, and its newest applied migration is the newest this server ships (``api.readiness``);
    503 ``retry-later`` otherwise: an upgrade is due, PostgreSQL is down, read-only, or it failed
    a request of this process for lack of space or other resources in the last 30 s."""
    async with request.app.state.pool.connection(timeout=1.0) as conn:
        (ready,) = await (await conn.execute("SELECT api.readiness()")).fetchone()
    expected = db.latest_migration()
    if ready["schema"] != expected:
        raise PgtallyError({"sqlstate": "TL503", "message": f"the database schema is at {ready['schema']}, "
                                                            f"this server needs {expected}: run pgtally db upgrade"})
    if ready["read_only"]:
        raise PgtallyError({"sqlstate": "TL503", "message": "the database is read-only"})
    until, reason = request.app.state.cannot_write
    if time.monotonic() < until:
        raise PgtallyError({"sqlstate": "TL503", "message": f"the database could not write just now ({reason})"})
    return Ready(status="ready", schema=ready["schema"])


ROUTES = [metrics, readyz]
