"""``/v1/api-keys``: the signed-in user's API keys, shown once at creation."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

import msgspec
from litestar import Request, delete, get, post
from litestar.params import FromPath, JSONBody

from api.auth import Revoked
from api.calls import SECURITY, SESSION, Session, call_json
from api.errors import problems


class NewApiKey(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
    scopes: Annotated[list[Literal["usage:write", "usage:read"]], msgspec.Meta(min_length=1)] = \
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


@post("/v1/api-keys", status_code=201, dependencies=SESSION, security=SECURITY, summary="Create an API key",
      responses=problems(400, 401, 403, 415, 422, 503))
async def create_api_key(request: Request, session: Session, data: JSONBody[NewApiKey]) -> CreatedApiKey:
    """A new key for the account (``api_key``, shown this once; only a hash is kept). Keys start
    with ``pgt_`` and end with a checksum that catches typos before any lookup. Needs an access
    token of a signed-in user (403 for anonymous devices)."""
    return await call_json(request, "SELECT api.create_api_key(%s::uuid, %s::text, %s::text[], %s::timestamptz)",
                           [session, data.name, data.scopes, data.expires_at])


@get("/v1/api-keys", dependencies=SESSION, security=SECURITY, summary="List API keys",
     responses=problems(400, 401, 403, 503))
async def list_api_keys(request: Request, session: Session) -> ApiKeyList:
    """The account's keys that are not revoked, with ``last_used_at``; never the keys themselves."""
    return await call_json(request, "SELECT api.list_api_keys(%s::uuid)", [session])


@delete("/v1/api-keys/{key_id:uuid}", status_code=200, dependencies=SESSION, security=SECURITY,
        summary="Revoke an API key", responses=problems(400, 401, 403, 404, 503))
async def revoke_api_key(request: Request, session: Session, key_id: FromPath[uuid.UUID]) -> Revoked:
    """Revoke a key: it stops working at once. 404 when it is not the account's."""
    return await call_json(request, "SELECT api.revoke_api_key(%s::uuid, %s::uuid)", [session, key_id])


ROUTES = [create_api_key, list_api_keys, revoke_api_key]
