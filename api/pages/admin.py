"""The operators' console for staff: /admin (search), /admin/accounts/{id} (everything about an
account, and the staff actions, each its own route and audited by its api.admin_* function),
/admin/audit, /admin/metrics (charts). The rules are sql/functions/75_admin.sql's."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

import msgspec
import pygal
from litestar import Request, Response, get, post
from litestar.params import FromPath, FromQuery
from litestar.response import Redirect
from pygal.style import CleanStyle

from api.admin import Adjustment, PlanChange, RefundRequest, Why, adjust_credits, refund
from api.calls import call, call_json
from api.errors import PgtallyError
from api.web import (
    FORM,
    browser_session,
    form_as,
    page,
    problem_text,
    refusal_status,
    to_login,
)

Form = FORM

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
    return page("admin/admin_metrics.html", request, charts=CHARTS)


@get("/admin/metrics/charts/{name:str}")
async def metrics_chart(request: Request, name: FromPath[str]) -> Response[bytes]:
    session_id = await staff_only(request)
    if not session_id or name not in CHARTS:
        raise PgtallyError({"sqlstate": "TL403" if session_id is False else "TL404", "message": "no such chart for you"})
    rows = await call_json(request, "SELECT api.metrics_report(%s::uuid, %s::text)", [session_id, name])
    return Response(draw(name, rows), media_type="image/svg+xml", headers=SVG_HEADERS)


class ActionForm(msgspec.Struct):
    """The account page's form fields (each action's route reads its own)."""

    reason: str = ""
    amount: str = ""
    plan: str = ""
    payment_intent: str = ""
    user_id: str = ""
    key: str = ""


class RevokeSessionsForm(Why, forbid_unknown_fields=True):
    """The account page's "sign out everywhere" (the JSON endpoint takes the user in the path)."""

    user_id: uuid.UUID


async def staff_page(request: Request, render) -> Any:
    """A staff page or action for the signed-in person: ``render(session_id)`` makes its one call,
    whose api.admin_* function decides who is staff (TL403 for customers, and for support doing
    an admin's action)."""
    session_id = browser_session(request)
    if session_id is None:
        return to_login(request)
    try:
        return await render(session_id)
    except PgtallyError as exc:
        if exc.error.get("sqlstate") == "TL401":
            return to_login(request)
        if exc.error.get("message") == "staff only":
            return page("message.html", request, 403, title="Staff only", message="This page is for the operators.")
        return page("message.html", request, refusal_status(exc, 400), title="Not done", message=problem_text(exc),
                    link=("/admin", "Back"))


@get("/admin")
async def admin_home(request: Request, q: FromQuery[str] = "") -> Any:
    """Search accounts by id, name, email or Stripe customer."""
    async def render(sid):
        found = await call_json(request, "SELECT api.admin_search(%s::uuid, %s::text)", [sid, q])
        return page("admin/admin.html", request, q=q, accounts=found["data"])
    return await staff_page(request, render)


@get("/admin/accounts/{account_id:uuid}")
async def admin_account_page(request: Request, account_id: FromPath[uuid.UUID], done: FromQuery[str] = "") -> Any:
    """Everything about one account, with the staff actions as forms."""
    async def render(sid):
        shown = await call_json(request, "SELECT api.admin_account_page(%s::uuid, %s::uuid)", [sid, account_id])
        return page("admin/admin_account.html", request, a=shown["account"], plans=shown["plans"],
                    notice=DONE.get(done), key=uuid.uuid4().hex)
    return await staff_page(request, render)


DONE = {"credits": "Credits adjusted.", "refund": "Refund sent to Stripe.", "plan": "Plan changed.",
        "suspend": "Account suspended.", "unsuspend": "Account unsuspended.", "revoke_sessions": "Signed out everywhere."}
"""The notice the account page shows after each action (``?done=``)."""


async def staff_action(request: Request, account_id: uuid.UUID, done: str, act) -> Any:
    """A staff action of the account page: ``act(session_id)`` (one api.admin_* call, which audits
    it), then back to the account with the action's notice."""
    async def render(sid):
        await act(sid)
        return Redirect(f"/admin/accounts/{account_id}?done={done}")
    return await staff_page(request, render)


@post("/admin/accounts/{account_id:uuid}/credits")
async def admin_credits(request: Request, account_id: FromPath[uuid.UUID], data: Annotated[ActionForm, Form]) -> Any:
    """Add or take back credits, once per form (its key)."""
    async def act(sid):
        adjustment = form_as(Adjustment, amount=data.amount.strip(), reason=data.reason)
        await adjust_credits(request, sid, account_id, adjustment.amount, adjustment.reason, data.key or uuid.uuid4().hex)
    return await staff_action(request, account_id, "credits", act)


@post("/admin/accounts/{account_id:uuid}/refund")
async def admin_refund(request: Request, account_id: FromPath[uuid.UUID], data: Annotated[ActionForm, Form]) -> Any:
    """Refund a payment (in full, or ``amount`` minor units) through Stripe."""
    async def act(sid):
        asked = form_as(RefundRequest, payment_intent=data.payment_intent, amount=data.amount.strip(), reason=data.reason)
        await refund(request, sid, asked.payment_intent, asked.amount, asked.reason)
    return await staff_action(request, account_id, "refund", act)


@post("/admin/accounts/{account_id:uuid}/plan")
async def admin_plan(request: Request, account_id: FromPath[uuid.UUID], data: Annotated[ActionForm, Form]) -> Any:
    """Put the account on a plan without Stripe."""
    async def act(sid):
        change = form_as(PlanChange, plan=data.plan, reason=data.reason)
        await call_json(request, "SELECT api.admin_set_plan(%s::uuid, %s::uuid, %s::text, %s::text)",
                        [sid, account_id, change.plan, change.reason])
    return await staff_action(request, account_id, "plan", act)


async def suspension(request: Request, account_id: uuid.UUID, data: ActionForm, suspend: bool) -> Any:
    async def act(sid):
        why = form_as(Why, reason=data.reason)
        await call_json(request, "SELECT api.admin_suspend(%s::uuid, %s::uuid, %s::boolean, %s::text)",
                        [sid, account_id, suspend, why.reason])
    return await staff_action(request, account_id, "suspend" if suspend else "unsuspend", act)


@post("/admin/accounts/{account_id:uuid}/suspend")
async def admin_suspend(request: Request, account_id: FromPath[uuid.UUID], data: Annotated[ActionForm, Form]) -> Any:
    return await suspension(request, account_id, data, True)


@post("/admin/accounts/{account_id:uuid}/unsuspend")
async def admin_unsuspend(request: Request, account_id: FromPath[uuid.UUID], data: Annotated[ActionForm, Form]) -> Any:
    return await suspension(request, account_id, data, False)


@post("/admin/accounts/{account_id:uuid}/revoke-sessions")
async def admin_revoke_sessions(request: Request, account_id: FromPath[uuid.UUID], data: Annotated[ActionForm, Form]) -> Any:
    """Sign one of the account's people out everywhere."""
    async def act(sid):
        target = form_as(RevokeSessionsForm, user_id=data.user_id, reason=data.reason)
        await call_json(request, "SELECT api.admin_revoke_sessions(%s::uuid, %s::uuid, %s::text)",
                        [sid, target.user_id, target.reason])
    return await staff_action(request, account_id, "revoke_sessions", act)


@get("/admin/audit")
async def admin_audit_page(request: Request) -> Any:
    async def render(sid):
        log = await call_json(request, "SELECT api.admin_audit(%s::uuid)", [sid])
        return page("admin/admin_audit.html", request, entries=log["data"])
    return await staff_page(request, render)


PAGES = [admin_home, admin_account_page, admin_credits, admin_refund, admin_plan, admin_suspend, admin_unsuspend,
         admin_revoke_sessions, admin_audit_page, metrics_page, metrics_chart]
