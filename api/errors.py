"""The one place where errors become HTTP: pgtally SQLSTATEs and Litestar's own exceptions are
rendered as RFC 9457 ``application/problem+json``."""

from __future__ import annotations

import json
import logging
from typing import Any

import psycopg
from litestar import Request, Response
from litestar.exceptions import HTTPException
from litestar.plugins.problem_details import ProblemDetailsException

log = logging.getLogger("pgtally")

PROBLEM_BASE = "tag:pgtally.dev,2026:problems/"

# SQLSTATE raised by sql/functions (class TL) -> (HTTP status, problem type slug, title).
SQLSTATES: dict[str, tuple[int, str, str]] = {
    "TL401": (401, "invalid-api-key", "The API key is missing, unknown, revoked or expired"),
    "TL402": (402, "quota-exhausted", "Allowance and credits do not cover this request"),
    "TL403": (403, "forbidden", "Forbidden"),
    "TL404": (404, "not-found", "Not found"),
    "TL409": (409, "idempotency-key-reused", "The idempotency key was used for a different request"),
    "TL422": (422, "invalid-request", "The request is not valid"),
}
# Litestar's own HTTP errors (routing, body and header validation) -> (problem type slug, title).
HTTP_STATUSES: dict[int, tuple[str, str]] = {
    400: ("bad-request", "The request is malformed"),
    401: ("invalid-api-key", "The API key is missing, unknown, revoked or expired"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    413: ("request-too-large", "The request body is too large"),
    415: ("unsupported-media-type", "Unsupported media type"),
}


def problem(request: Request, status: int, slug: str, title: str, detail: str,
            extra: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> Response:
    """Render one problem+json response."""
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": 'Bearer realm="pgtally"'}
    return ProblemDetailsException(
        status_code=status, type_=PROBLEM_BASE + slug, title=title, detail=detail,
        extra=extra or None, headers=headers,
    ).to_response(request)


def database_error(request: Request, exc: psycopg.Error) -> Response:
    """A pgtally SQLSTATE becomes its problem; anything else is logged and answered 500."""
    mapped = SQLSTATES.get(exc.sqlstate or "")
    if mapped is None:
        log.exception("database error %s", exc.sqlstate, exc_info=exc)
        return problem(request, 500, "internal-error", "Internal error", "the request could not be completed")
    status, slug, title = mapped
    extra: dict[str, Any] = {}
    if exc.diag.message_detail:
        extra = json.loads(exc.diag.message_detail)
    if status == 402:
        extra["upgrade_url"] = request.app.state.settings.upgrade_url
    return problem(request, status, slug, title, exc.diag.message_primary or title, extra)


def http_error(request: Request, exc: HTTPException) -> Response:
    """Litestar's HTTP exceptions (validation, routing, auth) as problems; validation messages
    go in ``errors``."""
    slug, title = HTTP_STATUSES.get(exc.status_code, ("http-error", "HTTP error"))
    extra = {"errors": exc.extra} if isinstance(exc.extra, list) and exc.extra else (exc.extra or None)
    detail = exc.detail
    if exc.status_code == 400 and isinstance(exc.extra, list) and exc.extra:
        detail = "; ".join(str(e.get("message", e)) if isinstance(e, dict) else str(e) for e in exc.extra)
    return problem(request, exc.status_code, slug, title, detail, extra, exc.headers)


def internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return problem(request, 500, "internal-error", "Internal error", "the request could not be completed")


EXCEPTION_HANDLERS = {psycopg.Error: database_error, HTTPException: http_error, Exception: internal_error}
