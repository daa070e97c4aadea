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
    "TL400": (400, "invalid-token", "The token is not valid"),
    "TL401": (401, "unauthenticated", "The credentials are missing, wrong, revoked or expired"),
    "TL402": (402, "quota-exhausted", "Allowance and credits do not cover this request"),
    "TL403": (403, "forbidden", "Forbidden"),
    "TL404": (404, "not-found", "Not found"),
    "TL409": (409, "idempotency-key-reused", "The idempotency key was used for a different request"),
    "TL422": (422, "invalid-request", "The request is not valid"),
    "TL429": (429, "rate-limited", "Too many attempts"),
    "TL503": (503, "retry-later", "Not ready yet: retry later"),
}
# Litestar's own HTTP errors (routing, body and header validation) -> (problem type slug, title).
HTTP_STATUSES: dict[int, tuple[str, str]] = {
    400: ("bad-request", "The request is malformed"),
    401: ("unauthenticated", "The credentials are missing, wrong, revoked or expired"),
    403: ("forbidden", "Forbidden"),
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


class PgtallyError(Exception):
    """A pgtally error as data: ``{"sqlstate", "message", ...extra}``, returned by a database
    function (so that what it wrote commits) or raised by a handler's input check."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error.get("message"))
        self.error = error


def pgtally_problem(request: Request, sqlstate: str, message: str, extra: dict[str, Any]) -> Response:
    """The problem for a pgtally SQLSTATE, raised or returned alike."""
    status, slug, title = SQLSTATES[sqlstate]
    headers = None
    if status == 402:
        extra["upgrade_url"] = request.app.state.settings.upgrade_url
    if status == 429 and "retry_after" in extra:
        headers = {"Retry-After": str(extra["retry_after"])}
    return problem(request, status, slug, title, message or title, extra, headers)


def database_error(request: Request, exc: psycopg.Error) -> Response:
    """A pgtally SQLSTATE becomes its problem; anything else is logged and answered 500."""
    if (exc.sqlstate or "") not in SQLSTATES:
        log.exception("database error %s", exc.sqlstate, exc_info=exc)
        return problem(request, 500, "internal-error", "Internal error", "the request could not be completed")
    extra = json.loads(exc.diag.message_detail) if exc.diag.message_detail else {}
    return pgtally_problem(request, exc.sqlstate, exc.diag.message_primary or "", extra)


def pgtally_error(request: Request, exc: PgtallyError) -> Response:
    extra = {k: v for k, v in exc.error.items() if k not in ("sqlstate", "message")}
    return pgtally_problem(request, exc.error["sqlstate"], exc.error.get("message", ""), extra)


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


EXCEPTION_HANDLERS = {psycopg.Error: database_error, PgtallyError: pgtally_error, HTTPException: http_error,
                      Exception: internal_error}
