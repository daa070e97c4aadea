"""``/v1/balance`` and ``/v1/ledger``: what the caller has, and every change to it."""

from __future__ import annotations

from typing import Annotated

import uuid

import msgspec
from litestar import Request, Response, get
from litestar.params import QueryParameter

from api.calls import AUTH, SECURITY, Caller, call, json_response
from api.errors import problems
from api.usage import Allowance


class Spending(msgspec.Struct):
    limit: int | None
    """The plan's spending limit per billing period, in minor currency units (null: none)."""
    spent: int
    """Post-paid usage this period, open holds included, in minor currency units."""
    currency: str
    period_start: str
    resets_at: str


class Balance(msgspec.Struct):
    account_id: str
    plan: str
    credits: str
    held: str
    """Credits reserved by open holds."""
    available: str
    """Credits a charge may spend: credits - held."""
    allowances: list[Allowance]
    spending: Spending | None
    """Post-paid plans: this billing period's spending against the plan's limit."""


class Entry(msgspec.Struct):
    transfer_id: str
    kind: str
    amount: str
    balance_after: str
    usage_event_id: str | None
    memo: str | None
    created_at: str


class LedgerPage(msgspec.Struct):
    data: list[Entry]
    has_more: bool
    next_cursor: str | None


@get("/v1/balance", security=SECURITY, dependencies=AUTH, summary="Credit balance and allowances",
     responses=problems(400, 401, 403, 404, 422, 503))
async def get_balance(
    request: Request, caller: Caller,
    account_id: Annotated[uuid.UUID | None, QueryParameter(description="service keys only: the account")] = None,
) -> Response[Balance]:
    """The caller's credit balance (decimal string of credits) and each entitled meter's
    allowance in the current period (``api.balance``). 401 bad key."""
    (body,) = await call(request, "SELECT api.balance(%s::text, %s::uuid, %s::uuid)::text",
                         [*caller.params, account_id])
    return json_response(body)


@get("/v1/ledger", security=SECURITY, dependencies=AUTH, summary="Ledger entries, newest first",
     responses=problems(400, 401, 403, 404, 422, 503))
async def get_ledger(
    request: Request, caller: Caller,
    cursor: Annotated[str | None, QueryParameter(max_length=32, description="next_cursor of the previous page")] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=100)] = 20,
    account_id: Annotated[uuid.UUID | None, QueryParameter(description="service keys only: the account")] = None,
) -> Response[LedgerPage]:
    """The caller's ledger entries, newest first, with cursor pagination (``api.ledger``).
    401 bad key; 422 a cursor this API did not return."""
    (body,) = await call(request, "SELECT api.ledger(%s::text, %s::uuid, %s::text, %s::integer, %s::uuid)::text",
                         [*caller.params, cursor, limit, account_id])
    return json_response(body)


ROUTES = [get_balance, get_ledger]
