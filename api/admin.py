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
import psycopg
import pygal
from litestar import Request, Response, get, post
from litestar.params import FromPath, FromQuery, JSONBody, Parameter, QueryParameter
from litestar.response import Redirect
from pygal.style import CleanStyle

from api import db
from api.billing import IdempotencyKey, client_of
from api.calls import SECURITY, SESSION, Session, call, call_json
from api.errors import PgtallyError, problems
from api.teams import Sso
from api.web import FORM, browser_session, form_as, page, problem_text, refusal_status, to_login

CHARTS = {
    "mrr": "Monthly recurring revenue",
    "active_accounts": "Active accounts (DAU, WAU, MAU)",
    "conversion": "Free-to-paid conversion by sign-up month",
    "usage": "Usage per day",
}
SVG_HEADERS = {"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
               "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


def draw(name: str, rows: list[dict[str, Any]]) -> bytes:
    """One chart as SVG, from a report's rows."""
    options = dict(style=CleanStyle, js=[], width=800, height=320, show_legend=True, x_label_rotation=30,
                   disable_xml_declaration=False, no_data_text="No data yet", truncate_label=12)
    if name == "mrr":
        chart = pygal.Line(title=CHARTS[name] + " (major units)", **options)
        chart.x_labels = [r["month"] for r in rows]
        for currency in sorted({r["currency"] for r in rows}):
            chart.add(currency.upper(), [float(r["mrr_minor"]) / 100 if r["currency"] == currency else None for r in rows])
    elif name == "active_accounts":
        chart = pygal.Line(title=CHARTS[name], **options)
        chart.x_labels = [r["day"] for r in rows]
        for series in ("dau", "wau", "mau"):
            chart.add(series.upper(), [r[series] for r in rows])
    elif name == "conversion":
        chart = pygal.Bar(title=CHARTS[name] + " (%)", **options)
        chart.x_labels = [r["cohort"] for r in rows]
        chart.add("converted", [float(r["conversion_percent"]) for r in rows])
    else:
        chart = pygal.Bar(title=CHARTS[name], **options)
        chart.x_labels = [r["day"] for r in rows]
        chart.add("events", [r["events"] for r in rows])
    return chart.render()


async def staff_only(request: Request) -> Any:
    """The signed-in session id of a staff user; False for a customer; None when signed out."""
    session_id = browser_session(request)
    if session_id is None:
        return None
    (role,) = await call(request, "SELECT api.staff_role(%s::uuid)", [session_id])
    return session_id if role else False


@get("/admin/metrics")
async def metrics_page(request: Request) -> Any:
    """The charts, for staff; customers get 403, visitors the login page."""
    session_id = await staff_only(request)
    if session_id is None:
        return to_login(request)
    if session_id is False:
        return page("message.html", request, 403, title="Staff only", message="This page is for pgtally's operators.")
    return page("admin_metrics.html", request, charts=CHARTS)


@get("/admin/metrics/charts/{name:str}")
async def metrics_chart(request: Request, name: FromPath[str]) -> Response[bytes]:
    session_id = await staff_only(request)
    if not session_id or name not in CHARTS:
        raise PgtallyError({"sqlstate": "TL403" if session_id is False else "TL404", "message": "no such chart for you"})
    return Response(draw(name, await chart_rows(request, session_id, name)), media_type="image/svg+xml",
                    headers=SVG_HEADERS)


async def chart_rows(request: Request, session_id: uuid.UUID, name: str) -> Any:
    """A chart's rows (api.metrics_report): read from the streaming replica of
    PGTALLY_REPORTING_DATABASE_URL when set (one connection a chart, as the server's login;
    errors answer as the pool's do: api.errors), else through the pool."""
    query, params = "SELECT api.metrics_report(%s::uuid, %s::text)", [session_id, name]
    url = request.app.state.settings.reporting_database_url
    if not url:
        return await call_json(request, query, params)
    async with await psycopg.AsyncConnection.connect(db.reporting_api_conninfo(url), autocommit=True,
                                                     connect_timeout=5) as conn:
        return (await (await conn.execute(query, params)).fetchone())[0]


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


# Pages ---------------------------------------------------------------------------------------

class ActionForm(msgspec.Struct):
    action: str = ""
    reason: str = ""
    amount: str = ""
    plan: str = ""
    payment_intent: str = ""
    user_id: str = ""
    key: str = ""


class RevokeSessionsForm(Why, forbid_unknown_fields=True):
    """The account page's "sign out everywhere" (the JSON endpoint takes the user in the path)."""

    user_id: uuid.UUID


Form = FORM


async def staff_page(request: Request, render) -> Any:
    session_id = await staff_only(request)
    if session_id is None:
        return to_login(request)
    if session_id is False:
        return page("message.html", request, 403, title="Staff only", message="This page is for pgtally's operators.")
    try:
        return await render(session_id)
    except PgtallyError as exc:
        return page("message.html", request, refusal_status(exc, 400), title="Not done", message=problem_text(exc),
                    link=("/admin", "Back"))


@get("/admin")
async def admin_home(request: Request, q: FromQuery[str] = "") -> Any:
    """Search accounts by id, name, email or Stripe customer."""
    async def render(sid):
        found = await call_json(request, "SELECT api.admin_search(%s::uuid, %s::text)", [sid, q])
        return page("admin.html", request, q=q, accounts=found["data"])
    return await staff_page(request, render)


@get("/admin/accounts/{account_id:uuid}")
async def admin_account_page(request: Request, account_id: FromPath[uuid.UUID], done: FromQuery[str] = "") -> Any:
    """Everything about one account, with the staff actions as forms."""
    async def render(sid):
        found = await call_json(request, "SELECT api.admin_account(%s::uuid, %s::uuid)", [sid, account_id])
        (plans,) = await call(request, "SELECT api.plans()", [])
        return page("admin_account.html", request, a=found, plans=plans["plans"], notice=done or None,
                    key=uuid.uuid4().hex)
    return await staff_page(request, render)


@post("/admin/accounts/{account_id:uuid}")
async def admin_action(request: Request, account_id: FromPath[uuid.UUID], data: Annotated[ActionForm, Form]) -> Any:
    """One staff action from the account page; each is audited by its api.admin_* function."""
    async def render(sid):
        if data.action == "credits":
            adjustment = form_as(Adjustment, amount=data.amount.strip(), reason=data.reason)
            await adjust_credits(request, sid, account_id, adjustment.amount, adjustment.reason, data.key or uuid.uuid4().hex)
        elif data.action == "refund":
            asked = form_as(RefundRequest, payment_intent=data.payment_intent, amount=data.amount.strip(), reason=data.reason)
            await refund(request, sid, asked.payment_intent, asked.amount, asked.reason)
        elif data.action == "plan":
            change = form_as(PlanChange, plan=data.plan, reason=data.reason)
            await call_json(request, "SELECT api.admin_set_plan(%s::uuid, %s::uuid, %s::text, %s::text)",
                            [sid, account_id, change.plan, change.reason])
        elif data.action in ("suspend", "unsuspend"):
            why = form_as(Why, reason=data.reason)
            await call_json(request, "SELECT api.admin_suspend(%s::uuid, %s::uuid, %s::boolean, %s::text)",
                            [sid, account_id, data.action == "suspend", why.reason])
        elif data.action == "revoke_sessions":
            target = form_as(RevokeSessionsForm, user_id=data.user_id, reason=data.reason)
            await call_json(request, "SELECT api.admin_revoke_sessions(%s::uuid, %s::uuid, %s::text)",
                            [sid, target.user_id, target.reason])
        else:
            raise PgtallyError({"sqlstate": "TL422", "message": "no such action"})
        return Redirect(f"/admin/accounts/{account_id}?done={data.action}")
    return await staff_page(request, render)


@get("/admin/audit")
async def admin_audit_page(request: Request) -> Any:
    async def render(sid):
        log = await call_json(request, "SELECT api.admin_audit(%s::uuid)", [sid])
        return page("admin_audit.html", request, entries=log["data"])
    return await staff_page(request, render)


PAGES = [admin_home, admin_account_page, admin_action, admin_audit_page, metrics_page, metrics_chart]
