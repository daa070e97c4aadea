"""What every handler shares: the bearer credential and the one database call it makes."""

from __future__ import annotations

from typing import Annotated, Any, Sequence

from litestar import Request, Response
from litestar.exceptions import NotAuthorizedException
from litestar.di import NamedDependency, Provide
from litestar.params import HeaderParameter

SECURITY = [{"apiKey": []}]


def bearer_key(authorization: Annotated[str | None, HeaderParameter(name="Authorization", required=False)] = None) -> str:
    """The API key from ``Authorization: Bearer <key>`` (RFC 6750). Its validity is decided by
    the database function the handler calls; a missing or malformed header is a 401 here."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise NotAuthorizedException("send the API key as Authorization: Bearer <api key>")
    return token.strip()


ApiKey = NamedDependency[str]
"""Handler parameter type for the bearer API key (see AUTH)."""
AUTH = {"api_key": Provide(bearer_key, sync_to_thread=False)}


async def call(request: Request, sql: str, params: Sequence[Any]) -> tuple[Any, ...]:
    """Run one statement on the pool (autocommit: the function is the transaction) and return
    its single row. Errors propagate to api.errors."""
    async with request.app.state.pool.connection() as conn:
        cur = await conn.execute(sql, params)
        return await cur.fetchone()


def json_response(body: str, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON body produced by PostgreSQL, relayed without re-encoding."""
    return Response(body.encode(), status_code=status_code, media_type="application/json", headers=headers)
