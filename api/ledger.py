"""``/v1/balance`` and ``/v1/ledger``: what the caller has, and every change to it."""

from __future__ import annotations

import uuid
from typing import Annotated

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


class NextExpiry(msgspec.Struct):
    credits: str
    at: str


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
    pending: str
    """Credits granted but not spendable yet (a referral reward in its holdback)."""
    next_expiry: NextExpiry | None
    """What expires next and when (null: nothing expires)."""


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


class CreditLot(msgspec.Struct):
    id: str
    object: str
    source: str
    """purchase, subscription_grant, signup_bonus, monthly_free, referral_reward, promotion or adjustment."""
    status: str
    """pending (not spendable before available_at), active, expired or canceled."""
    amount: str
    remaining: str
    available_at: str
    expires_at: str | None
    memo: str | None
    created_at: str


class LotPage(msgspec.Struct):
    data: list[CreditLot]
    has_more: bool
    next_cursor: str | None


@get("/v1/credits/lots", security=SECURITY, dependencies=AUTH, summary="Credit lots, newest first",
     responses=problems(400, 401, 403, 404, 422, 503))
async def get_lots(
    request: Request, caller: Caller,
    status: Annotated[str | None, QueryParameter(description="pending, active, expired or canceled")] = None,
    cursor: Annotated[str | None, QueryParameter(max_length=36, description="next_cursor of the previous page")] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=100)] = 50,
    account_id: Annotated[uuid.UUID | None, QueryParameter(description="service keys only: the account")] = None,
) -> Response[LotPage]:
    """Where the caller's credits came from: every lot with its source, what remains, when it
    becomes spendable and when it expires (``api.credit_lots``). Charges spend active lots
    soonest-expiry first, then promotional before paid, then oldest. 422 bad status or cursor."""
    (body,) = await call(request, "SELECT api.credit_lots(%s::text, %s::uuid, %s::text, %s::integer, %s::text, %s::uuid)::text",
                         [*caller.params, status, limit, cursor, account_id])
    return json_response(body)


class Referral(msgspec.Struct):
    referee: str
    """The referred person's email, masked (a***@example.com)."""
    status: str
    """signed_up, qualified, rewarded or rejected."""
    rejected_reason: str | None
    """self_referral, own_device, same_ip, same_fingerprint, monthly_cap or refunded."""
    credits: str | None
    credits_status: str | None
    available_at: str | None
    signed_up_at: str
    qualified_at: str | None
    rewarded_at: str | None


class ReferralProgram(msgspec.Struct):
    qualify_on: str
    referrer_credits: str
    referee_credits: str
    holdback_days: int
    monthly_cap: int


class Referrals(msgspec.Struct):
    code: str
    link: str
    program: ReferralProgram
    earned: str
    """Reward credits already spendable."""
    pending: str
    """Reward credits in their holdback."""
    referrals: list[Referral]


@get("/v1/referrals", security=SECURITY, dependencies=AUTH, summary="Your referral link and referrals",
     responses=problems(400, 401, 403, 409, 503))
async def get_referrals(request: Request, caller: Caller) -> Response[Referrals]:
    """The caller's referral code and link (``PGTALLY_PUBLIC_URL/r/CODE``), the program's rules,
    the credits earned and pending, and each referred account's status (``api.referrals``).
    409 for accounts that are not a person's."""
    (body,) = await call(request, "SELECT api.referrals(%s::text, %s::uuid, %s::text)::text",
                         [*caller.params, request.app.state.settings.public_url])
    return json_response(body)


ROUTES = [get_balance, get_ledger, get_lots, get_referrals]
