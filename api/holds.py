"""``/v1/holds``: reserve before pay-per-use work, then capture the actual amount or release.
The rules (what a hold reserves, exactly-once capture, expiry) are in sql/functions/45_holds.sql."""

from __future__ import annotations

import uuid
from typing import Annotated

import msgspec
from litestar import Request, Response, get, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, HeaderParameter, JSONBody, QueryParameter

from api.calls import AUTH, SECURITY, Caller, call, json_response
from api.errors import problems
from api.usage import Charged, Count, Meter, UsageEvent


class HoldRequest(msgspec.Struct, forbid_unknown_fields=True):
    """What the work will cost at most: ``quantity`` for unit meters, tokens for token meters."""

    meter: Meter
    quantity: Annotated[int, msgspec.Meta(ge=1, le=10**12)] | None = None
    input_tokens: Count | None = None
    output_tokens: Count | None = None
    expires_in: Annotated[int, msgspec.Meta(ge=1, le=86400)] = 900
    """Seconds until the hold releases itself (default 15 minutes, at most 24 hours)."""
    account_id: uuid.UUID | None = None
    """Service keys only: the account to reserve on."""


class CaptureRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The actual amount; what was held when omitted."""

    quantity: Annotated[int, msgspec.Meta(ge=1, le=10**12)] | None = None
    input_tokens: Count | None = None
    output_tokens: Count | None = None
    account_id: uuid.UUID | None = None


class Hold(msgspec.Struct):
    id: str
    object: str
    status: str
    """open, captured, released or expired."""
    meter: str
    quantity: int
    input_tokens: int | None
    output_tokens: int | None
    held: Charged
    idempotency_key: str
    created_at: str
    expires_at: str
    settled_at: str | None


class HoldList(msgspec.Struct):
    data: list[Hold]


@post("/v1/holds", status_code=201, dependencies=AUTH, security=SECURITY, summary="Reserve before the work",
      responses={200: ResponseSpec(Hold, description="Replay of an earlier request with this key"),
                 **problems(400, 401, 402, 403, 404, 409, 415, 422, 503)})
async def create_hold(request: Request, caller: Caller, data: JSONBody[HoldRequest],
                      idempotency_key: Annotated[str, HeaderParameter(name="Idempotency-Key", min_length=1,
                                                                      max_length=255)]) -> Response[Hold]:
    """Reserve the allowance and credits this request would cost, exactly as ``POST
    /v1/usage/events`` would charge them, so that no other charge or hold can spend them (``api.hold``).
    201 with the hold; 200 for a retry with the same key; 422 ``idempotency-key-reused`` same key, other request; 402 when they
    are not there (nothing reserved)."""
    replayed, body = await call(
        request, "SELECT replayed, body::text FROM api.hold(%s::text, %s::uuid, %s::text, %s::text, %s::bigint, "
                 "%s::bigint, %s::bigint, %s::integer, %s::uuid)",
        [*caller.params, idempotency_key, data.meter, data.quantity, data.input_tokens, data.output_tokens,
         data.expires_in, data.account_id])
    return json_response(body, 200 if replayed else 201, {"Idempotent-Replayed": "true"} if replayed else None)


@post("/v1/holds/{hold_id:uuid}/capture", status_code=200, dependencies=AUTH, security=SECURITY,
      summary="Charge the actual amount of a hold", responses=problems(400, 401, 402, 403, 404, 409, 415, 422, 503))
async def capture_hold(request: Request, caller: Caller, hold_id: FromPath[uuid.UUID],
                       data: JSONBody[CaptureRequest]) -> Response[UsageEvent]:
    """Return the reservation and charge the actual amount as one usage event, exactly once
    (``api.capture_hold``): the usage event; a repeated capture returns the same one
    (``Idempotent-Replayed: true``). 402 more than held and the balance does not cover it (the hold
    stays open); 409 after release or expiry; 422 another amount than the first capture."""
    replayed, body = await call(
        request, "SELECT replayed, body::text FROM api.capture_hold(%s::text, %s::uuid, %s::uuid, %s::bigint, "
                 "%s::bigint, %s::bigint, %s::uuid)",
        [*caller.params, hold_id, data.quantity, data.input_tokens, data.output_tokens, data.account_id])
    return json_response(body, 200, {"Idempotent-Replayed": "true"} if replayed else None)


@post("/v1/holds/{hold_id:uuid}/release", status_code=200, dependencies=AUTH, security=SECURITY,
      summary="Release a hold", responses=problems(400, 401, 403, 404, 409, 503))
async def release_hold(request: Request, caller: Caller, hold_id: FromPath[uuid.UUID]) -> Response[Hold]:
    """Return everything the hold reserved (``api.release_hold``); a repeat returns it as it is.
    409 after capture."""
    (body,) = await call(request, "SELECT api.release_hold(%s::text, %s::uuid, %s::uuid)::text",
                         [*caller.params, hold_id])
    return json_response(body)


@get("/v1/holds", dependencies=AUTH, security=SECURITY, summary="Open holds",
     responses=problems(400, 401, 403, 503))
async def list_holds(request: Request, caller: Caller,
                     account_id: Annotated[uuid.UUID | None, QueryParameter(
                         description="service keys and team members: the account")] = None) -> Response[HoldList]:
    """The open holds of the caller's account (or of ``account_id``), newest first."""
    (body,) = await call(request, "SELECT api.holds(%s::text, %s::uuid, %s::uuid)::text", [*caller.params, account_id])
    return json_response(body)


ROUTES = [create_hold, capture_hold, release_hold, list_holds]
