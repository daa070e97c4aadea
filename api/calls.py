"""What every handler shares: who is calling, and the one database call it makes."""

from __future__ import annotations

import json
import uuid
from typing import Any, Sequence

import psycopg
from litestar import Request, Response
from litestar.di import NamedDependency, Provide
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException

from api.errors import SQLSTATES, PgtallyError
from api.security import AuthorizationHeader, Principal, parse_bearer

SECURITY = [{"bearer": []}]


def principal(request: Request, authorization: AuthorizationHeader = None) -> Principal:
    """The caller, from ``Authorization: Bearer <api key or access token>``; 401 without one.
    Whether the key or session is valid is decided by the database function the handler calls."""
    found = parse_bearer(authorization, request.app.state.jwt_keys)
    if found is None:
        raise NotAuthorizedException("send Authorization: Bearer <api key or access token>")
    return found


def optional_principal(request: Request, authorization: AuthorizationHeader = None) -> Principal | None:
    """The caller if it sent credentials (sign-up and login use an anonymous device's token)."""
    return parse_bearer(authorization, request.app.state.jwt_keys)


def session_id(request: Request, authorization: AuthorizationHeader = None) -> uuid.UUID:
    """The session of an access token; endpoints that manage a sign-in refuse API keys."""
    found = principal(request, authorization)
    if found.session_id is None:
        raise PermissionDeniedException("this endpoint needs an access token, not an API key")
    return found.session_id


Caller = NamedDependency[Principal]
MaybeCaller = NamedDependency[Principal | None]
Session = NamedDependency[uuid.UUID]
AUTH = {"caller": Provide(principal, sync_to_thread=False)}
OPTIONAL_AUTH = {"caller": Provide(optional_principal, sync_to_thread=False)}
SESSION = {"session": Provide(session_id, sync_to_thread=False)}


def client(request: Request) -> list[str | None]:
    """[client IP, User-Agent] for rate limits and the auth event log."""
    return [request.client.host if request.client else None, request.headers.get("user-agent")]


async def call(request: Request, sql: str, params: Sequence[Any]) -> tuple[Any, ...]:
    """Run one statement on the pool (autocommit: the function is the transaction) and return
    its single row. A pgtally SQLSTATE raised by the function becomes a PgtallyError (the same
    problem+json for the API, a message for a page); other errors propagate to api.errors."""
    try:
        async with request.app.state.pool.connection() as conn:
            cur = await conn.execute(sql, params)
            return await cur.fetchone()
    except psycopg.Error as exc:
        if (exc.sqlstate or "") not in SQLSTATES:
            raise
        detail = json.loads(exc.diag.message_detail) if exc.diag.message_detail else {}
        raise PgtallyError({**detail, "sqlstate": exc.sqlstate, "message": exc.diag.message_primary or ""}) from None


async def call_json(request: Request, sql: str, params: Sequence[Any]) -> dict[str, Any]:
    """Run one statement returning a jsonb object; an ``{"error": ...}`` it returned (rather than
    raised, so that what it wrote commits) becomes the same problem+json as a raised one."""
    (result,) = await call(request, sql, params)
    if "error" in result:
        raise PgtallyError(result["error"])
    return result


def json_response(body: str, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON body produced by PostgreSQL, relayed without re-encoding."""
    return Response(body.encode(), status_code=status_code, media_type="application/json", headers=headers)
