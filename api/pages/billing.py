"""Billing pages: the dashboard (what is left, plan, usage, referrals, top-up, cancel and resume),
the pricing page and Stripe Checkout, plan changes, and the returns from Stripe. One call draws
each page (api.dashboard_page, api.upgrade_page); purchases go through the same functions as
the JSON endpoints (api/billing.py)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

import msgspec
import stripe
from litestar import Request, get, post
from litestar.params import FromQuery
from litestar.response import Redirect

from api.billing import (
    ChangeRequest,
    CheckoutRequest,
    TopUpRequest,
    cancel_at_period_end,
    change_plan,
    open_portal,
    preview_change,
    start_checkout,
    top_up,
)
from api.calls import call, call_json
from api.errors import PgtallyError
from api.web import (
    FORM,
    browser_session,
    form_as,
    page,
    principal_of,
    problem_text,
    signed_in,
    to_login,
)

Form = FORM


async def dashboard_view(request: Request, session_id: uuid.UUID, **extra: Any) -> Any:
    account_id = principal_of(request, session_id)[2]
    shown = await call_json(request, "SELECT api.dashboard_page(%s::uuid, %s::uuid, %s::text)",
                            [session_id, account_id, request.app.state.settings.public_url])
    return page("billing/dashboard.html", request, **shown, **extra)


@get("/dashboard")
async def dashboard_page(request: Request) -> Any:
    """What is left (credits, pending and expiring ones, each allowance and its reset), the plan
    and its billing state, the last 10 usage events with their metadata, and the referral link."""
    return await signed_in(request, lambda sid: dashboard_view(request, sid), dashboard_view)


@post("/dashboard/portal")
async def dashboard_portal(request: Request) -> Any:
    async def action(sid):
        return Redirect(await open_portal(request, principal_of(request, sid)))
    return await signed_in(request, action, dashboard_view)


@post("/dashboard/cancel")
async def dashboard_cancel(request: Request) -> Any:
    async def action(sid):
        await cancel_at_period_end(request, principal_of(request, sid), True)
        return await dashboard_view(request, sid, notice="Your plan will end at the end of this period.")
    return await signed_in(request, action, dashboard_view)


@post("/dashboard/resume")
async def dashboard_resume(request: Request) -> Any:
    async def action(sid):
        await cancel_at_period_end(request, principal_of(request, sid), False)
        return await dashboard_view(request, sid, notice="Your plan continues.")
    return await signed_in(request, action, dashboard_view)


@get("/upgrade")
async def upgrade_page(request: Request, token: FromQuery[str | None] = None, interval: FromQuery[str] = "month") -> Any:
    """The plans (monthly or yearly) and bundles of the catalog, the buyer's plan marked, each
    with the button that starts Stripe Checkout (or, for a subscriber, the plan change).
    ``token``: the signed upgrade token of a 402 or of /v1/identify, naming the account (an
    anonymous device) the purchase is for."""
    buyer = request.app.state.jwt_keys.upgrade_account(token) if token else None
    session_id = None if buyer else browser_session(request)
    shown = await call_json(request, "SELECT api.upgrade_page(%s::uuid, %s::uuid)",
                            [session_id, principal_of(request, session_id)[2] if session_id else None])
    return page("billing/upgrade.html", request, catalog=shown["catalog"], buyer=buyer, token=token if buyer else "",
                interval="year" if interval == "year" else "month", billing=shown["billing"],
                can_buy=bool(buyer or shown["billing"]),
                error=None if buyer or not token else "This link has expired: open it again from the app.")


class PurchaseForm(msgspec.Struct):
    price: str = ""
    token: str = ""


async def purchase(request: Request, data: PurchaseForm) -> Any:
    """A plan or bundle for the signed-in account or the account of a valid upgrade token, through
    Checkout; a subscriber choosing another plan (which checkout refuses) goes to the change
    confirmation instead."""
    buyer = request.app.state.jwt_keys.upgrade_account(data.token) if data.token else None
    session_id = None if buyer else browser_session(request)
    if buyer is None and session_id is None:
        return to_login(request)
    principal = [None, None, buyer] if buyer else principal_of(request, session_id)
    try:
        try:
            session = await start_checkout(request, principal, form_as(CheckoutRequest, price=data.price).price)
        except PgtallyError as exc:
            # api.checkout_prepare refuses a second subscription (TL40C): a subscriber switches.
            if exc.error.get("sqlstate") == "TL40C" and session_id:
                return await change_preview(request, session_id, data.price)
            raise
    except (PgtallyError, stripe.StripeError) as exc:
        message = problem_text(exc) if isinstance(exc, PgtallyError) else "Stripe could not start the checkout: try again."
        (catalog,) = await call(request, "SELECT api.plans()", [])
        return page("billing/upgrade.html", request, 400, catalog=catalog, buyer=buyer, token=data.token, interval="month",
                    billing=None, can_buy=True, error=message)
    return Redirect(session.url)


@post("/upgrade/checkout")
async def upgrade_checkout(request: Request, data: Annotated[PurchaseForm, Form]) -> Any:
    return await purchase(request, data)


async def change_preview(request: Request, session_id: uuid.UUID, price: str) -> Any:
    """What switching the live subscription to ``price`` costs now, as Stripe previews it."""
    preview = await preview_change(request, principal_of(request, session_id), price)
    return page("billing/change.html", request, price=price, preview=preview)


@post("/upgrade/change")
async def upgrade_change(request: Request, data: Annotated[PurchaseForm, Form]) -> Any:
    async def action(sid):
        await change_plan(request, principal_of(request, sid), form_as(ChangeRequest, price=data.price).price)
        return await dashboard_view(request, sid, notice="Your plan is changing; Stripe prorates the difference.")
    return await signed_in(request, action, dashboard_view)


@post("/dashboard/topup")
async def dashboard_topup(request: Request, data: Annotated[PurchaseForm, Form]) -> Any:
    async def action(sid):
        result = await top_up(request, principal_of(request, sid), form_as(TopUpRequest, bundle=data.price).bundle)
        if result.status == "checkout":
            return Redirect(result.url)
        return Redirect(f"/billing/success?payment_intent={result.payment_intent}")
    return await signed_in(request, action, dashboard_view)


@get("/billing/success")
async def billing_success(request: Request, session_id: FromQuery[str | None] = None,
                          payment_intent: FromQuery[str | None] = None) -> Any:
    """Back from Stripe: what was bought and whether Stripe's event has been applied yet. It
    grants nothing itself: until the webhook arrives it says "processing" and reloads."""
    (status,) = await call(request, "SELECT api.payment_status(%s::text, %s::text)", [session_id, payment_intent])
    return page("billing/success.html", request, status=status)


@get("/billing/cancel")
async def billing_cancel(request: Request) -> Any:
    return page("message.html", request, title="Nothing was bought", message="The checkout was cancelled.",
                link=("/upgrade", "Plans"))


@get("/billing/portal")
async def billing_portal(request: Request) -> Any:
    """The link billing emails carry: Stripe's customer portal (update the card, see invoices) for
    the signed-in person, after the login page when needed."""
    async def action(sid):
        return Redirect(await open_portal(request, principal_of(request, sid)))
    return await signed_in(request, action, dashboard_view)


@get("/billing")
async def billing_page(request: Request) -> Redirect:
    """Where the Stripe customer portal returns to."""
    return Redirect("/dashboard")


PAGES = [dashboard_page, dashboard_portal, dashboard_cancel, dashboard_resume, upgrade_page, upgrade_checkout,
         upgrade_change, dashboard_topup, billing_success, billing_cancel, billing_portal, billing_page]
