"""What every handler shares: who is calling, and the one database call it makes."""

from __future__ import annotations

import ipaddress
import json
import uuid
from collections.abc import Sequence
from typing import Any

import psycopg
from litestar import Request, Response
from litestar.datastructures import CacheControlHeader
from litestar.di import NamedDependency, Provide
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException

from api.errors import SQLSTATES, PgtallyError
from api.security import AuthorizationHeader, Principal, parse_bearer

SECURITY = [{"bearer": []}]
NO_STORE_CACHE = CacheControlHeader(no_store=True)
"""``cache_control=`` of every answer that carries a secret (tokens, device codes, API keys): no
cache, shared or private, may keep it."""


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
    """[client IP, User-Agent] for rate limits, the auth event log and the referral rules; the IP
    is :func:`client_ip` of the connection's peer, with the proxies of PGTALLY_TRUSTED_PROXIES."""
    peer = request.client.host if request.client else None
    ip = client_ip(peer, request.headers.getall("x-forwarded-for", []), request.app.state.settings.trusted_proxies)
    return [ip, request.headers.get("user-agent")]


def client_ip(peer: str | None, forwarded_for: Sequence[str],
              trusted: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> str | None:
    """The address a request came from. Each proxy appends to ``X-Forwarded-For`` the address it
    received the request from, and anyone can write the entries before that; so starting from the
    peer, while the address at hand is a trusted proxy, step to the entry it appended (right to
    left, over every header line). The answer is the first untrusted address (the right-most
    untrusted entry), the farthest one when all are trusted, and the last trusted proxy's own
    address when the entry it wrote is not an IP. A peer that is not an IP is returned as it is.
    """
    address = _ip(peer) if peer else None
    if address is None:
        return peer
    hops = [hop for value in forwarded_for for hop in value.split(",")]
    while hops and any(address in network for network in trusted):
        previous = _ip(hops.pop())
        if previous is None:
            break
        address = previous
    return str(address)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address as a proxy writes it (``203.0.113.7``, ``203.0.113.7:4711``, ``2001:db8::7``,
    ``[2001:db8::7]:443``), IPv4-mapped IPv6 as IPv4; None when it is not one."""
    text = text.strip()
    if text.startswith("[") and "]" in text:
        text = text[1:text.index("]")]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return getattr(address, "ipv4_mapped", None) or address


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
