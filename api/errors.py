"""The one place where errors become HTTP: pgtally SQLSTATEs and Litestar's own exceptions are
rendered as RFC 9457 ``application/problem+json``."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import msgspec
import psycopg
import stripe
from litestar import Request, Response
from litestar.exceptions import HTTPException
from litestar.openapi.datastructures import ResponseSpec
from litestar.plugins.problem_details import ProblemDetailsException
from psycopg_pool import PoolTimeout

log = logging.getLogger("pgtally")

PROBLEM_BASE = "tag:pgtally.dev,2026:problems/"

# SQLSTATE raised by sql/functions (class TL) -> (HTTP status, problem type slug, title).
SQLSTATES: dict[str, tuple[int, str, str]] = {
    "TL400": (400, "invalid-token", "The token is not valid"),
    "TL401": (401, "unauthenticated", "The credentials are missing, wrong, revoked or expired"),
    "TL402": (402, "quota-exhausted", "Allowance and credits do not cover this request"),
    "TL403": (403, "forbidden", "Forbidden"),
    "TL4S3": (403, "account-suspended", "The account is suspended"),
    "TL4B2": (402, "budget-exceeded", "A budget of the account, API key or member does not cover this request"),
    "TL404": (404, "not-found", "Not found"),
    "TL409": (409, "idempotency-key-reused", "The idempotency key was used for a different request"),
    "TL42R": (422, "idempotency-key-reused", "The idempotency key was used for a different request"),
    "TL40C": (409, "conflict", "This conflicts with the account's current state"),
    "TL422": (422, "invalid-request", "The request is not valid"),
    "TL429": (429, "rate-limited", "Too many attempts"),
    "TL502": (502, "upstream-unavailable", "A service pgtally asked (DNS, an identity provider) failed"),
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


class Problem(msgspec.Struct):
    """An RFC 9457 problem (``application/problem+json``). Members beyond these five carry the
    details of a problem type: ``errors`` and ``field`` (invalid input), ``retry_after`` (429),
    ``upgrade_url``, ``resets_at``, ``required_credits`` and ``balance`` (402),
    ``stripe_request_id`` (402 card-declined, 502)."""

    type: str
    title: str
    status: int
    detail: str


STATUS_TEXT = {400: "Malformed request (not JSON, not UTF-8, nested too deep, a header missing)",
               401: "Credentials missing, wrong, revoked or expired (unauthenticated)",
               402: "Allowance and credits do not cover it (quota-exhausted), or the card was declined",
               403: "Not allowed for these credentials (forbidden)", 404: "Not found (not-found)",
               409: "Conflicts with an earlier request (idempotency-key-reused, or a state conflict)",
               415: "The body is not declared as application/json (unsupported-media-type)",
               422: "The input is not valid (invalid-request): detail and field say what",
               429: "Too many attempts (rate-limited): retry after Retry-After seconds",
               500: "Internal error",
               502: "Stripe failed (payment-provider-error), or DNS or an identity provider did (upstream-unavailable)",
               503: "The database or a dependency is not ready (retry-later): retry after Retry-After seconds"}


def problems(*statuses: int) -> dict[int, ResponseSpec]:
    """OpenAPI responses for the problem statuses an endpoint can answer with (500 always)."""
    return {status: ResponseSpec(Problem, description=STATUS_TEXT[status], media_type=PROBLEM_MEDIA_TYPE,
                                 generate_examples=False)
            for status in sorted({*statuses, 500})}


PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_MEMBERS = frozenset({"type", "title", "status", "detail", "instance"})


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


def upgrade_url(request: Request, account_id: str | None) -> str:
    """Where to send someone who ran out: the pricing page, with a signed token naming the
    account (valid an hour) when it is known."""
    base = request.app.state.settings.upgrade_url
    return f"{base}?token={request.app.state.jwt_keys.upgrade_token(account_id)}" if account_id else base


def pgtally_problem(request: Request, sqlstate: str, message: str, extra: dict[str, Any]) -> Response:
    """The problem for a pgtally SQLSTATE, raised or returned alike."""
    status, slug, title = SQLSTATES[sqlstate]
    # A detail member never replaces one of the problem's own (RFC 9457 section 3.1).
    extra = {k: v for k, v in extra.items() if k not in PROBLEM_MEMBERS}
    headers = None
    if status == 402:
        extra["upgrade_url"] = upgrade_url(request, extra.get("account_id"))
    if status == 429 and "retry_after" in extra:
        headers = {"Retry-After": str(extra["retry_after"])}
    if status == 503:
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
    return problem(request, status, slug, title, message or title, extra, headers)


def database_error(request: Request, exc: psycopg.Error) -> Response:
    """A pgtally SQLSTATE becomes its problem; a lost connection is 503; anything else is logged
    and answered 500."""
    if isinstance(exc, psycopg.OperationalError) and (exc.sqlstate is None or exc.sqlstate.startswith(("08", "57P"))):
        return database_unavailable(request, exc)
    if cannot_write(exc.sqlstate):
        return database_cannot_write(request, exc)
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


def stripe_error(request: Request, exc: stripe.StripeError) -> Response:
    """Stripe's answer to a call pgtally made (never inside a database transaction): a declined
    card is 402; an idempotency key Stripe saw with other parameters is 409; anything else (an
    unknown object, Stripe unreachable or failing) is 502, with Stripe's request id for support (https://docs.stripe.com/error-handling)."""
    extra = {"stripe_request_id": exc.request_id, "stripe_code": exc.code}
    if isinstance(exc, stripe.CardError):
        return problem(request, 402, "card-declined", "The card was declined",
                       exc.user_message or "the card was declined", extra)
    if isinstance(exc, stripe.IdempotencyError):
        # pgtally's key for Stripe is the account's own (api.checkout_prepare): this client sent
        # the same Idempotency-Key before for another purchase.
        return problem(request, 409, "idempotency-key-reused", SQLSTATES["TL409"][2],
                       "this Idempotency-Key was already used for a different purchase", extra)
    log.warning("Stripe call failed: %s (request %s)", exc.user_message or exc, exc.request_id)
    return problem(request, 502, "payment-provider-error", "The payment provider failed",
                   f"Stripe could not complete the request: {exc.user_message or type(exc).__name__}", extra)


RETRY_AFTER_SECONDS = 2


def database_unavailable(request: Request, exc: Exception) -> Response:
    """PostgreSQL cannot be reached (down, restarting, or every pooled connection busy past the
    pool timeout): 503 with Retry-After, fast. The pool is asked to check its idle connections,
    so that ones that died with the server are replaced before they are handed out again."""
    log.warning("database unavailable: %s", exc)
    state = request.app.state
    if state.pool_check is None or state.pool_check.done():
        state.pool_check = asyncio.ensure_future(state.pool.check())
    return problem(request, 503, "retry-later", "Not ready yet: retry later",
                   "the database is not reachable right now", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def cannot_write(sqlstate: str | None) -> bool:
    """Whether an error says the database cannot take writes now: read-only (25006: a standby,
    or ``default_transaction_read_only`` set) or out of a resource (class 53: 53100 disk full,
    53200 out of memory, 53300 too many connections)."""
    return sqlstate is not None and (sqlstate == "25006" or sqlstate.startswith("53"))


CANNOT_WRITE_SECONDS = 30.0
"""How long /readyz of a server process says "not ready" after one of its requests met a
database out of space or other resources (class 53): no read tells that a disk is full."""


def database_cannot_write(request: Request, exc: psycopg.Error) -> Response:
    """The database answers but cannot write (read-only, disk full): 503 retry-later with
    Retry-After, never a 500; reads that need no write are still served. /readyz says not ready
    while the database is read-only, and for a while (:data:`CANNOT_WRITE_SECONDS`) after it ran
    out of space."""
    reason = "read-only" if exc.sqlstate == "25006" else "out of resources (disk full?)"
    log.error("the database cannot write: %s (SQLSTATE %s)", exc.diag.message_primary or exc, exc.sqlstate)
    if exc.sqlstate != "25006":     # (/readyz asks the database whether it is read-only)
        request.app.state.cannot_write = (time.monotonic() + CANNOT_WRITE_SECONDS, f"{reason}, SQLSTATE {exc.sqlstate}")
    return problem(request, 503, "retry-later", "Not ready yet: retry later",
                   f"the database cannot take writes right now ({reason})",
                   headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return problem(request, 500, "internal-error", "Internal error", "the request could not be completed")


EXCEPTION_HANDLERS = {psycopg.Error: database_error, PoolTimeout: database_unavailable, PgtallyError: pgtally_error,
                      HTTPException: http_error, stripe.StripeError: stripe_error, Exception: internal_error}


def error_response(request: Request, exc: Exception) -> Response:
    """The answer to ``exc`` by the most specific of :data:`EXCEPTION_HANDLERS` (as Litestar picks
    it: the first class of the exception's MRO that has one)."""
    handler = next(EXCEPTION_HANDLERS[cls] for cls in type(exc).__mro__ if cls in EXCEPTION_HANDLERS)
    return handler(request, exc)
