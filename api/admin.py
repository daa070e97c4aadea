"""The operators' console, for users with a staff role (``pgtally staff grant EMAIL ROLE``):
support reads and grants a little, admin does everything. The JSON API under ``/v1/admin``
(ROUTES) and the pages under ``/admin`` (PAGES) call the same ``api.admin_*`` functions
(sql/functions/75_admin.sql), each of which checks the staff role and writes its audit row in
the action's own transaction. ``/admin/metrics`` draws MRR, active accounts, conversion and
usage as SVG with pygal on the server (no script, nothing from a CDN), from the reporting
views ``pgtally report`` prints."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

import msgspec
from litestar import Request, get, post
from litestar.params import FromPath, JSONBody, Parameter, QueryParameter

from api.billing import IdempotencyKey, client_of
from api.calls import SECURITY, SESSION, Session, call, call_json
from api.errors import PgtallyError, problems
from api.teams import Sso

Reason = Annotated[str, msgspec.Meta(min_length=1, max_length=500)]


class Adjustment(msgspec.Struct, forbid_unknown_fields=True):
    amount: Annotated[str, msgspec.Meta(pattern=r"^-?[0-9]{1,13}(\.[0-9]{1,6})?$", examples=["5", "-2.5"])]
    """Credits to add (negative: take back), a plain decimal."""
    reason: Reason


class PlanChange(msgspec.Struct, forbid_unknown_fields=True):
    plan: Annotated[str, msgspec.Meta(min_length=1, max_length=63)]
    reason: Reason


class Why(msgspec.Struct, forbid_unknown_fields=True):
    reason: Reason


class RefundRequest(msgspec.Struct, forbid_unknown_fields=True):
    payment_intent: Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
    reason: Reason
    amount: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """Minor units; the whole payment (what is left of it) when omitted."""


ADMIN = {"security": SECURITY, "dependencies": SESSION}
Rows = list[dict[str, Any]]


class AdminAccounts(msgspec.Struct):
    data: Rows
    """Accounts: id, kind, name, plan, credits, suspended, created_at, email, stripe_customer_id."""


class AdminAccount(msgspec.Struct):
    id: str
    kind: str
    name: str | None
    plan: str
    subscribed_plan: str | None
    credits: str
    held: str
    suspended: bool
    suspended_at: str | None
    suspended_reason: str | None
    stripe_customer_id: str | None
    created_at: str
    members: Rows
    allowances: Rows
    lots: Rows
    usage_events: Rows
    ledger: Rows
    holds: Rows
    subscriptions: Rows
    payments: Rows
    referrals: Rows
    auth_events: Rows
    webhook_events: Rows
    audit: Rows
    """The staff actions on this account, newest first."""


class Adjusted(msgspec.Struct):
    transfer_id: str
    kind: str
    amount: str
    balance_after: str
    account_id: str
    memo: str | None
    created_at: str
    replayed: bool


class SessionsRevoked(msgspec.Struct):
    user_id: str
    sessions_revoked: int


class Refunded(msgspec.Struct):
    refund: str
    payment_intent: str
    amount: int
    """Minor currency units."""
    status: str


class AuditLog(msgspec.Struct):
    data: Rows
    """id, at, staff_email, staff_role, action, target_account_id, target_user_id, reason, before, after."""


async def adjust_credits(request: Request, session_id: uuid.UUID, account_id: uuid.UUID, amount: str, reason: str,
                         idempotency_key: str) -> dict[str, Any]:
    (replayed, body) = await call(
        request, "SELECT replayed, body FROM api.admin_adjust_credits(%s::uuid, %s::uuid, %s::text, %s::text, %s::text)",
        [session_id, account_id, amount, idempotency_key, reason])
    return {**body, "replayed": replayed}


async def refund(request: Request, session_id: uuid.UUID, payment_intent: str, amount: int | None, reason: str) -> dict[str, Any]:
    """Refund a recorded payment through Stripe (its idempotency key: the payment and amount
    refunded so far, so a retried click refunds once); the credits come back out with Stripe's
    charge.refunded webhook, as for any refund. Then the audit row."""
    target = await call_json(request, "SELECT api.admin_refund_target(%s::uuid, %s::text, %s::bigint)",
                             [session_id, payment_intent, amount])
    result = await client_of(request).v1.refunds.create_async(
        params={"payment_intent": payment_intent, "amount": target["amount"], "metadata": {"reason": reason[:500]}},
        options={"idempotency_key": f"admin-refund-{payment_intent}-{target['refunded']}-{target['amount']}"})
    return await call_json(request, "SELECT api.admin_refunded(%s::uuid, %s::text, %s::bigint, %s::text, %s::text)",
                           [session_id, payment_intent, target["amount"], result.id, reason])


@get("/v1/admin/accounts", summary="Staff: search accounts", responses=problems(400, 401, 403, 422, 503), **ADMIN)
async def search(request: Request, session: Session,
                 q: Annotated[str, QueryParameter(max_length=320, description="id, name, email (part) or cus_...")] = "") -> AdminAccounts:
    """Accounts by id, name, a member's email (or part of it) or Stripe customer id (staff)."""
    return await call_json(request, "SELECT api.admin_search(%s::uuid, %s::text)", [session, q])


@get("/v1/admin/accounts/{account_id:uuid}", summary="Staff: an account", responses=problems(400, 401, 403, 404, 503), **ADMIN)
async def account(request: Request, session: Session, account_id: FromPath[uuid.UUID]) -> AdminAccount:
    """Plan, balance, lots, usage, ledger, holds, subscriptions, payments, referrals, auth and
    webhook events, members and staff actions of an account (staff)."""
    return await call_json(request, "SELECT api.admin_account(%s::uuid, %s::uuid)", [session, account_id])


@post("/v1/admin/accounts/{account_id:uuid}/credits", status_code=200, summary="Staff: adjust credits",
      responses=problems(400, 401, 402, 403, 404, 409, 415, 422, 503), **ADMIN)
async def credits(request: Request, session: Session, account_id: FromPath[uuid.UUID], data: JSONBody[Adjustment],
                  idempotency_key: IdempotencyKey = None) -> Adjusted:
    """Add or take back credits with a reason, once per ``Idempotency-Key``, never below zero
    (402); support grants at most 50 credits (403 beyond). Audited."""
    if not idempotency_key:
        raise PgtallyError({"sqlstate": "TL422", "message": "an Idempotency-Key header is required", "field": "Idempotency-Key"})
    return await adjust_credits(request, session, account_id, data.amount, data.reason, idempotency_key)


@post("/v1/admin/accounts/{account_id:uuid}/plan", status_code=200, summary="Staff: set the plan without Stripe",
      responses=problems(400, 401, 403, 404, 415, 422, 503), **ADMIN)
async def set_plan(request: Request, session: Session, account_id: FromPath[uuid.UUID], data: JSONBody[PlanChange]) -> AdminAccount:
    """Put the account on a plan without Stripe (a comp); admin only. Audited."""
    return await call_json(request, "SELECT api.admin_set_plan(%s::uuid, %s::uuid, %s::text, %s::text)",
                           [session, account_id, data.plan, data.reason])


@post("/v1/admin/accounts/{account_id:uuid}/suspend", status_code=200, summary="Staff: suspend an account",
      responses=problems(400, 401, 403, 404, 415, 422, 503), **ADMIN)
async def suspend(request: Request, session: Session, account_id: FromPath[uuid.UUID], data: JSONBody[Why]) -> AdminAccount:
    """Refuse every charge, hold, purchase and key of the account (403 account-suspended) until
    unsuspended; admin only. Audited."""
    return await call_json(request, "SELECT api.admin_suspend(%s::uuid, %s::uuid, true, %s::text)",
                           [session, account_id, data.reason])


@post("/v1/admin/accounts/{account_id:uuid}/unsuspend", status_code=200, summary="Staff: unsuspend an account",
      responses=problems(400, 401, 403, 404, 415, 422, 503), **ADMIN)
async def unsuspend(request: Request, session: Session, account_id: FromPath[uuid.UUID], data: JSONBody[Why]) -> AdminAccount:
    """Lift a suspension; admin only. Audited."""
    return await call_json(request, "SELECT api.admin_suspend(%s::uuid, %s::uuid, false, %s::text)",
                           [session, account_id, data.reason])


@post("/v1/admin/users/{user_id:uuid}/revoke-sessions", status_code=200, summary="Staff: sign a user out everywhere",
      responses=problems(400, 401, 403, 404, 415, 422, 503), **ADMIN)
async def revoke_sessions(request: Request, session: Session, user_id: FromPath[uuid.UUID], data: JSONBody[Why]) -> SessionsRevoked:
    """Revoke every session (and refresh token) of the user; admin only. Audited."""
    return await call_json(request, "SELECT api.admin_revoke_sessions(%s::uuid, %s::uuid, %s::text)",
                           [session, user_id, data.reason])


@post("/v1/admin/refunds", status_code=201, summary="Staff: refund a payment through Stripe",
      responses=problems(400, 401, 403, 404, 415, 422, 502, 503), **ADMIN)
async def refunds(request: Request, session: Session, data: JSONBody[RefundRequest]) -> Refunded:
    """Refund a bundle payment in full or in part through Stripe; the credits come back out with
    the charge.refunded webhook. Admin only. Audited."""
    return await refund(request, session, data.payment_intent, data.amount, data.reason)


@get("/v1/admin/audit", summary="Staff: the audit log", responses=problems(400, 401, 403, 503), **ADMIN)
async def audit(request: Request, session: Session) -> AuditLog:
    """The latest staff actions: who, what, on what, why, before and after."""
    return await call_json(request, "SELECT api.admin_audit(%s::uuid)", [session])


@post("/v1/admin/accounts/{account_id:uuid}/sso-domains/{domain:str}/approval", status_code=200,
      summary="Staff: approve a team's SSO domain without DNS", responses=problems(400, 401, 403, 404, 409, 415, 422, 503),
      **ADMIN)
async def approve_sso_domain(request: Request, session: Session, account_id: FromPath[uuid.UUID],
                             domain: Annotated[str, Parameter(max_length=253)], data: JSONBody[Why]) -> Sso:
    """Prove a domain the team claimed for single sign-on, when it showed ownership another way
    than a DNS TXT record (say how in ``reason``). Admin only. Audited. 409 another team proved it."""
    return await call_json(request, "SELECT api.admin_approve_sso_domain(%s::uuid, %s::uuid, %s::text, %s::text)",
                           [session, account_id, domain, data.reason])


ROUTES = [search, account, credits, set_plan, suspend, unsuspend, revoke_sessions, refunds, audit, approve_sso_domain]
