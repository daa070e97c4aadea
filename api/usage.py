"""``/v1/usage``: meter usage exactly once, and ask what it would cost."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, get, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import HeaderParameter, JSONBody, QueryParameter
from psycopg.types.json import Jsonb

from api.calls import AUTH, SECURITY, Caller, call, json_response
from api.errors import PROBLEM_BASE, SQLSTATES, problems, upgrade_url

Count = Annotated[int, msgspec.Meta(ge=0, le=10**12)]
Meter = Annotated[str, msgspec.Meta(min_length=1, max_length=63, pattern=r"^[a-z][a-z0-9_]*$", examples=["generation"])]


class UsageRequest(msgspec.Struct, forbid_unknown_fields=True):
    """One metered call. Unit meters take ``quantity`` (default 1); token meters take
    ``input_tokens`` and ``output_tokens`` instead."""

    meter: Meter
    quantity: Annotated[int, msgspec.Meta(ge=1, le=10**12)] | None = None
    input_tokens: Count | None = None
    output_tokens: Count | None = None
    account_id: uuid.UUID | None = None
    """Service keys only: the account to charge."""
    metadata: dict[str, Any] | None = None
    """Your own JSON object (at most 2 KB): a request id, a thumbnail URL, a model name. Stored
    and returned with the event, and part of its idempotency fingerprint; ignored by check."""


class Charged(msgspec.Struct):
    allowance_units: int
    credits: str
    amount: int | None = None
    """Post-paid: what the event costs in minor currency units (cents), billed by Stripe's invoice."""
    currency: str | None = None


class Allowance(msgspec.Struct):
    meter: str
    kind: str
    """allowance, fair_use, unlimited or post_paid."""
    unit: str
    period: str
    limit: int | None
    used: int
    remaining: int | None
    period_start: str
    resets_at: str
    unit_amount: int | None = None
    """post_paid: the price of one unit, in minor currency units."""
    amount: int | None = None
    """post_paid: what this period's units cost, in minor currency units."""


class Credits(msgspec.Struct):
    credits: str


class Warning(msgspec.Struct):
    code: str
    """allowance_threshold, fair_use_threshold or spending_limit_threshold."""
    meter: str
    threshold_percent: int
    limit: int
    """Units, or for spending_limit_threshold minor currency units."""
    resets_at: str
    message: str
    used: int | None = None
    spent: int | None = None
    """spending_limit_threshold: the period's post-paid spending, in minor units."""
    currency: str | None = None


class UsageEvent(msgspec.Struct):
    """A charged usage event; replays return it unchanged."""

    id: str
    object: str
    account_id: str
    meter: str
    quantity: int
    input_tokens: int | None
    output_tokens: int | None
    charged: Charged
    allowance: Allowance | None
    balance: Credits
    warnings: list[Warning]
    created_at: str
    metadata: dict[str, Any] | None = None


class UsageCheck(msgspec.Struct):
    """What a usage event would do now."""

    allowed: bool
    meter: str
    quantity: int
    input_tokens: int | None
    output_tokens: int | None
    charge: Charged
    required_credits: str
    allowance: Allowance | None
    amount: int | None
    """Post-paid: what it would cost, in minor currency units."""
    currency: str | None
    balance: Credits
    warnings: list[Warning]
    resets_at: str | None


def usage_args(data: UsageRequest) -> list:
    return [data.meter, data.quantity, data.input_tokens, data.output_tokens, data.account_id]


ARGS = "%s::text, %s::bigint, %s::bigint, %s::bigint, %s::uuid"


@post("/v1/usage/events", status_code=201, security=SECURITY, summary="Record and charge a usage event",
      dependencies=AUTH,
      responses={200: ResponseSpec(UsageEvent, description="Replay of an earlier request with this key "
                                                           "(header Idempotent-Replayed: true)"),
                 **problems(400, 401, 402, 403, 404, 409, 415, 422, 503)})
async def create_usage_event(
    request: Request,
    caller: Caller,
    data: JSONBody[UsageRequest],
    idempotency_key: Annotated[str, HeaderParameter(name="Idempotency-Key", min_length=1, max_length=255)],
) -> Response[UsageEvent]:
    """Charge one usage event exactly once: the plan's allowance first, then credits at the
    meter's rate (``api.consume``). 201 with the event; 200 and ``Idempotent-Replayed: true``
    for a retry with the same key and body; 422 ``idempotency-key-reused`` for the same key with another body; 402 with
    ``upgrade_url`` and ``resets_at`` when neither allowance nor credits cover it, or when a
    post-paid plan's spending limit for the billing period does not (nothing is charged); 401
    bad key or token; 403 key without the usage:write scope, or account_id without a service key;
    422 unknown meter, bad quantity, or metadata that is not an object of at most 2 KB."""
    replayed, body = await call(
        request, f"SELECT replayed, body::text FROM api.consume(%s::text, %s::uuid, %s::text, {ARGS}, %s::jsonb)",
        [*caller.params, idempotency_key, *usage_args(data), Jsonb(data.metadata) if data.metadata is not None else None])
    if replayed:
        return json_response(body, 200, {"Idempotent-Replayed": "true"})
    return json_response(body, 201)


@post("/v1/usage/check", status_code=200, security=SECURITY, summary="What a usage event would cost",
      dependencies=AUTH, responses=problems(400, 401, 403, 404, 415, 422, 503))
async def check_usage(request: Request, caller: Caller, data: JSONBody[UsageRequest]) -> Response[UsageCheck]:
    """What ``POST /v1/usage/events`` would do for this body now, with no side effect
    (``api.check_usage``): ``allowed``, the charge, and the allowance and balance after it."""
    (body,) = await call(request, f"SELECT api.check_usage(%s::text, %s::uuid, {ARGS})::text",
                         [*caller.params, *usage_args(data)])
    return json_response(body)


class EventSummary(msgspec.Struct):
    """A usage event as the list shows it."""

    id: str
    object: str
    meter: str
    quantity: int
    input_tokens: int | None
    output_tokens: int | None
    charged: Charged
    idempotency_key: str
    metadata: dict[str, Any] | None
    created_at: str
    api_key_id: str | None = None
    """The API key that charged it (null: a session)."""
    user_id: str | None = None
    """The member it is attributed to: the session's person or the member who made the key."""


class EventPage(msgspec.Struct):
    data: list[EventSummary]
    has_more: bool
    next_cursor: str | None


@get("/v1/usage/events", security=SECURITY, dependencies=AUTH, summary="Usage events, newest first",
     responses=problems(400, 401, 403, 404, 422, 503))
async def list_usage_events(
    request: Request, caller: Caller,
    cursor: Annotated[str | None, QueryParameter(max_length=36, description="next_cursor of the previous page")] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=100)] = 20,
    meter: Annotated[str | None, QueryParameter(max_length=63, description="only this meter")] = None,
    from_: Annotated[datetime | None, QueryParameter(name="from", description="created at or after (RFC 3339)")] = None,
    to: Annotated[datetime | None, QueryParameter(description="created before (RFC 3339)")] = None,
    account_id: Annotated[uuid.UUID | None, QueryParameter(description="service keys only: the account")] = None,
    api_key: Annotated[uuid.UUID | None, QueryParameter(description="only events charged by this API key (its id)")] = None,
    member: Annotated[uuid.UUID | None, QueryParameter(description="only events of this member (user id)")] = None,
) -> Response[EventPage]:
    """The caller's usage events, newest first, with what each was charged and its metadata
    (``api.usage_events``): ``{data, has_more, next_cursor}``; pass ``next_cursor`` back as
    ``cursor``; ``api_key`` and ``member`` keep the events one key or one member charged (usage
    per key and per member). 401 bad key; 403 missing usage:read; 422 a cursor this API did not return."""
    (body,) = await call(request, "SELECT api.usage_events(%s::text, %s::uuid, %s::text, %s::integer, %s::text, "
                                  "%s::timestamptz, %s::timestamptz, %s::uuid, %s::uuid, %s::uuid)::text",
                         [*caller.params, cursor, limit, meter, from_, to, account_id, api_key, member])
    return json_response(body)


class BatchEvent(UsageRequest, forbid_unknown_fields=True):
    """One event of a batch: a usage request with its own idempotency key."""

    idempotency_key: Annotated[str, msgspec.Meta(min_length=1, max_length=255)] = ""


class BatchRequest(msgspec.Struct, forbid_unknown_fields=True):
    events: Annotated[list[BatchEvent], msgspec.Meta(min_length=1, max_length=1000)]


class BatchAnswer(msgspec.Struct):
    index: int
    status: str
    """charged, replayed or refused."""
    event: UsageEvent | None = None
    problem: dict[str, Any] | None = None
    """For a refused event: the problem (type, title, status, detail and its fields) a single
    POST /v1/usage/events would have answered."""


class BatchResult(msgspec.Struct):
    data: list[BatchAnswer]
    charged: int
    replayed: int
    refused: int


@post("/v1/usage/events/batch", status_code=200, security=SECURITY, summary="Record and charge up to 1,000 usage events",
      dependencies=AUTH, responses=problems(400, 401, 415, 422, 503))
async def create_usage_batch(request: Request, caller: Caller, data: JSONBody[BatchRequest]) -> Response[BatchResult]:
    """Charge up to 1,000 usage events in one transaction, each exactly as ``POST
    /v1/usage/events`` would and exactly once per its own ``idempotency_key`` (a service key may
    name a different ``account_id`` on each; the accounts are locked in a fixed order). Each is
    answered on its own: ``charged`` or ``replayed`` with the event, or ``refused`` with the
    problem it would have got alone (402, 403, 422...); a refused event changes nothing and
    the others go on (``api.consume_batch``). 422 when the body is not 1 to 1,000 events."""
    answers_json, charged, replayed, refused = await call(
        request, "SELECT data::text, charged, replayed, refused FROM api.consume_batch(%s::text, %s::uuid, %s::jsonb)",
        [*caller.params, msgspec.json.encode(data.events).decode()])
    if not refused:         # the database's answers as they are: no decoding, no encoding
        return Response(f'{{"data": {answers_json}, "charged": {charged}, "replayed": {replayed}, "refused": 0}}'.encode(),
                        media_type="application/json")
    answers = msgspec.json.decode(answers_json)
    for i, row in enumerate(answers):
        if row["status"] == "refused":
            status, slug, title = SQLSTATES.get(row["sqlstate"], SQLSTATES["TL422"])
            extra = row.get("detail") or {}
            if status == 402:
                extra["upgrade_url"] = upgrade_url(request, extra.get("account_id"))
            answers[i] = {"index": row["index"], "status": "refused",
                          "problem": {**extra, "type": PROBLEM_BASE + slug, "title": title, "status": status,
                                      "detail": row["message"]}}
    return Response(msgspec.json.encode({"data": answers, "charged": charged, "replayed": replayed, "refused": refused}),
                    media_type="application/json")


ROUTES = [create_usage_event, create_usage_batch, check_usage, list_usage_events]
