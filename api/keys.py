"""``/v1/api-keys``: the signed-in user's API keys, shown once at creation."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

import msgspec
from litestar import Request, delete, get, post
from litestar.params import FromPath, JSONBody, QueryParameter

from api.auth import Revoked
from api.calls import NO_STORE_CACHE, SECURITY, SESSION, Session, call_json
from api.errors import problems


class NewApiKey(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
    scopes: Annotated[list[Literal["usage:write", "usage:read", "billing:read", "billing:manage"]],
                      msgspec.Meta(min_length=1)] = \
        msgspec.field(default_factory=lambda: ["usage:write", "usage:read"])
    expires_at: datetime | None = None


class ApiKeyInfo(msgspec.Struct):
    """An API key as lists show it; never the key itself."""

    id: str
    name: str
    display: str
    scopes: list[str]
    created_at: str
    last_used_at: str | None
    expires_at: str | None


class CreatedApiKey(ApiKeyInfo):
    api_key: str
    """The key, shown this once."""


class ApiKeyList(msgspec.Struct):
    data: list[ApiKeyInfo]


TeamParam = Annotated[uuid.UUID | None, QueryParameter(description="a team account whose keys you manage (keys:manage)")]


@post("/v1/api-keys", status_code=201, dependencies=SESSION, security=SECURITY, summary="Create an API key",
      cache_control=NO_STORE_CACHE,
      responses=problems(400, 401, 403, 415, 422, 503))
async def create_api_key(request: Request, session: Session, data: JSONBody[NewApiKey],
                         account_id: TeamParam = None) -> CreatedApiKey:
    """A new key for the account, or a team's (``?account_id=``; ``api_key``, shown this once; only
    a hash is kept). Keys start with ``pgt_`` and end with a checksum that catches typos before any
    lookup. Its scopes are at most what your role allows, and are cut down on use if your role
    shrinks. Needs an access token of a signed-in user (403 for anonymous devices, or a role
    without keys:manage or the scopes)."""
    return await call_json(request, "SELECT api.create_api_key(%s::uuid, %s::text, %s::text[], %s::timestamptz, %s::uuid)",
                           [session, data.name, data.scopes, data.expires_at, account_id])


@get("/v1/api-keys", dependencies=SESSION, security=SECURITY, summary="List API keys",
     responses=problems(400, 401, 403, 503))
async def list_api_keys(request: Request, session: Session, account_id: TeamParam = None) -> ApiKeyList:
    """The account's keys that are not revoked, with ``last_used_at``; never the keys themselves."""
    return await call_json(request, "SELECT api.list_api_keys(%s::uuid, %s::uuid)", [session, account_id])


@delete("/v1/api-keys/{key_id:uuid}", status_code=200, dependencies=SESSION, security=SECURITY,
        summary="Revoke an API key", responses=problems(400, 401, 403, 404, 503))
async def revoke_api_key(request: Request, session: Session, key_id: FromPath[uuid.UUID],
                         account_id: TeamParam = None) -> Revoked:
    """Revoke a key: it stops working at once. 404 when it is not the account's."""
    return await call_json(request, "SELECT api.revoke_api_key(%s::uuid, %s::uuid, %s::uuid)", [session, key_id, account_id])


ROUTES = [create_api_key, list_api_keys, revoke_api_key]
