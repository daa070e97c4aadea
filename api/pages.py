"""Server-rendered pages for people: sign up, log in (password, Google, GitHub), verify an email,
reset a password, the account page (providers, sessions, API keys), /device (approve a command
line), the pricing page and checkout returns, and the dashboard (what is left, plan, usage,
top-up). Each page is a view over the same ``api.*`` functions as the JSON endpoints, with plain
forms (CSRF-protected) and no script of its own."""

from __future__ import annotations

import uuid
from typing import Annotated, Any
from urllib.parse import quote

import msgspec
import stripe
from litestar import Request, Router, get, post
from litestar.params import FromPath, FromQuery
from litestar.response import Redirect
from litestar.static_files import create_static_files_router

from api.auth import password_login, register
from api.billing import cancel_at_period_end, change_plan, open_portal, preview_change, start_checkout, top_up
from api.calls import call, call_json, client
from api.errors import PgtallyError
from api.web import (FORM, REFERRAL_COOKIE, REFERRAL_DAYS, STATIC, browser_session, device_session, page, page_headers,
                     principal_of, problem_text, referral_of, safe_next, sign_in_browser, to_login)

Form = FORM


class CredentialsForm(msgspec.Struct):
    email: str = ""
    password: str = ""
    next: str | None = None
    device_token: str | None = None


class EmailForm(msgspec.Struct):
    email: str = ""


class TokenForm(msgspec.Struct):
    token: str = ""


class NewPasswordForm(msgspec.Struct):
    token: str = ""
    password: str = ""


class CodeForm(msgspec.Struct):
    user_code: str = ""


class DecisionForm(msgspec.Struct):
    user_code: str = ""
    decision: str = ""


class KeyForm(msgspec.Struct):
    name: str = ""


@get("/")
async def home(request: Request) -> Redirect:
    return Redirect("/dashboard" if browser_session(request) else "/login")


@get("/login")
async def login_page(request: Request, next: FromQuery[str | None] = None,
                     device_token: FromQuery[str | None] = None) -> Any:
    """``device_token``: an anonymous device's access token (an extension sending its user here):
    its usage and credits move to the account signed in to."""
    return page("login.html", request, next=safe_next(next), email="", device_token=device_token or "")


@post("/login")
async def login_submit(request: Request, data: Annotated[CredentialsForm, Form]) -> Any:
    try:
        session = await password_login(request, data.email, data.password, device_session(request, data.device_token))
    except PgtallyError as exc:
        return page("login.html", request, 401, error=problem_text(exc), email=data.email, next=safe_next(data.next),
                    device_token=data.device_token or "")
    sign_in_browser(request, session)
    return Redirect(safe_next(data.next))


@get("/r/{code:str}")
async def referral_link(request: Request, code: FromPath[str]) -> Redirect:
    """A person's referral link: remember the code in this browser (the first one wins, for 30
    days) and lead to sign-up, where it is sent with the new account (``api.signup``, or the
    Google/GitHub sign-up)."""
    response = Redirect("/signup")
    if code.isalnum() and len(code) <= 32 and referral_of(request) is None:
        response.set_cookie(REFERRAL_COOKIE, code.lower(), max_age=REFERRAL_DAYS * 86400, httponly=True,
                            samesite="lax", secure=request.app.state.settings.secure_cookies)
    return response


@get("/signup")
async def signup_page(request: Request, device_token: FromQuery[str | None] = None, next: FromQuery[str | None] = None) -> Any:
    """``next``: where to go once signed in (an app's authorization request, api/oidc.py)."""
    return page("signup.html", request, email="", device_token=device_token or "", referral=referral_of(request),
                next=safe_next(next))


@post("/signup")
async def signup_submit(request: Request, data: Annotated[CredentialsForm, Form]) -> Any:
    try:
        await register(request, data.email, data.password, device_session(request, data.device_token),
                       referral_of(request))
    except PgtallyError as exc:
        return page("signup.html", request, 422, error=problem_text(exc), email=data.email,
                    device_token=data.device_token or "", referral=referral_of(request), next=safe_next(data.next))
    # The same answer whether or not the address was registered already.
    return page("message.html", request, title="Check your email",
                message=f"We sent a link to {data.email.strip()} to confirm the address. It works once, for 24 hours.",
                link=(f"/login?next={quote(safe_next(data.next), safe='')}", "Log in") if data.next else None)


@post("/logout")
async def logout_submit(request: Request) -> Redirect:
    session_id = browser_session(request)
    if session_id:
        try:
            await call_json(request, "SELECT api.logout(%s::uuid, false)", [session_id])
        except PgtallyError:
            pass            # already ended
    request.clear_session()
    return Redirect("/login")


@get("/verify-email")
async def verify_page(request: Request, token: FromQuery[str] = "") -> Any:
    """A button, not an action: mail scanners that open links must not use the token."""
    return page("verify.html", request, token=token)


@post("/verify-email")
async def verify_submit(request: Request, data: Annotated[TokenForm, Form]) -> Any:
    try:
        result = await call_json(request, "SELECT api.verify_email(%s::text, %s::text)", [data.token, client(request)[0]])
    except PgtallyError as exc:
        return page("verify.html", request, 400, token="", error=problem_text(exc))
    return page("message.html", request, title="Email confirmed",
                message=f"{result['email']} is confirmed.", link=("/login", "Log in"))


@get("/reset-password")
async def reset_page(request: Request, token: FromQuery[str | None] = None) -> Any:
    """Without a token: ask for the email. With the emailed token: choose a new password."""
    return page("reset.html", request, token=token or "", email="")


@post("/reset-password")
async def reset_request(request: Request, data: Annotated[EmailForm, Form]) -> Any:
    try:
        await call_json(request, "SELECT api.request_password_reset(%s::text, %s::text)", [data.email, client(request)[0]])
    except PgtallyError as exc:
        return page("reset.html", request, 422, token="", email=data.email, error=problem_text(exc))
    return page("message.html", request, title="Check your email",
                message="If that address has an account, a link to choose a new password is on its way. It works once, for an hour.")


@post("/reset-password/confirm")
async def reset_confirm(request: Request, data: Annotated[NewPasswordForm, Form]) -> Any:
    from api.auth import new_password_hash

    try:
        password_hash = await new_password_hash(data.password)
        await call_json(request, "SELECT api.reset_password(%s::text, %s::text, %s::text)",
                        [data.token, password_hash, client(request)[0]])
    except PgtallyError as exc:
        return page("reset.html", request, 400, token=data.token, email="", error=problem_text(exc))
    request.clear_session()
    return page("message.html", request, title="Password changed",
                message="Your password is changed and every session was signed out.", link=("/login", "Log in"))


async def account_view(request: Request, session_id: uuid.UUID, **extra: Any) -> Any:
    me = await call_json(request, "SELECT api.me(NULL, %s::uuid)", [session_id])
    methods = await call_json(request, "SELECT api.sign_in_methods(%s::uuid)", [session_id])
    sessions = await call_json(request, "SELECT api.sessions(%s::uuid)", [session_id])
    keys = await call_json(request, "SELECT api.list_api_keys(%s::uuid)", [session_id])
    linked = {i["provider"] for i in methods["identities"]}
    return page("account.html", request, me=me, methods=methods, linked=linked, sessions=sessions["data"],
                keys=keys["data"], **extra)


async def signed_in(request: Request, action, view=None) -> Any:
    """Run a page action for the signed-in session; to /login when there is none or it ended. A
    refusal is shown on ``view`` (the account page unless said)."""
    session_id = browser_session(request)
    if session_id is None:
        return to_login(request)
    try:
        return await action(session_id)
    except PgtallyError as exc:
        if exc.error.get("sqlstate") == "TL401":
            request.clear_session()
            return to_login(request)
        if exc.error.get("sqlstate") == "TL403" and request.session.pop("account_id", None):
            # The team the switcher chose is no longer theirs (removed, or the role shrank): back
            # to their own account.
            return Redirect("/dashboard")
        return await (view or account_view)(request, session_id, error=problem_text(exc))
    except stripe.StripeError as exc:
        return await (view or account_view)(request, session_id,
                                            error=f"Stripe could not do it right now ({exc.user_message or type(exc).__name__}).")


@get("/account")
async def account_page(request: Request) -> Any:
    return await signed_in(request, lambda sid: account_view(request, sid))


@post("/account/sessions/{target:uuid}/revoke")
async def revoke_session(request: Request, target: FromPath[uuid.UUID]) -> Any:
    async def action(sid):
        await call_json(request, "SELECT api.revoke_session(%s::uuid, %s::uuid)", [sid, target])
        if target == sid:
            request.clear_session()
            return Redirect("/login")
        return Redirect("/account")
    return await signed_in(request, action)


@post("/account/api-keys")
async def create_key(request: Request, data: Annotated[KeyForm, Form]) -> Any:
    async def action(sid):
        key = await call_json(request, "SELECT api.create_api_key(%s::uuid, %s::text, %s::text[], NULL)",
                              [sid, data.name, ["usage:write", "usage:read"]])
        return await account_view(request, sid, new_key=key)
    return await signed_in(request, action)


@post("/account/api-keys/{key_id:uuid}/revoke")
async def revoke_key(request: Request, key_id: FromPath[uuid.UUID]) -> Any:
    async def action(sid):
        await call_json(request, "SELECT api.revoke_api_key(%s::uuid, %s::uuid)", [sid, key_id])
        return Redirect("/account")
    return await signed_in(request, action)


@post("/account/providers/{provider:str}/unlink")
async def unlink(request: Request, provider: FromPath[str]) -> Any:
    async def action(sid):
        await call_json(request, "SELECT api.oauth_unlink(%s::uuid, %s::text)", [sid, provider])
        return Redirect("/account")
    return await signed_in(request, action)


@get("/device")
async def device_page(request: Request, user_code: FromQuery[str] = "") -> Any:
    """Enter (or arrive with) the code a command line shows; sign in first if needed."""
    if browser_session(request) is None:
        return to_login(request)
    return page("device.html", request, user_code=user_code, request_info=None)


@post("/device")
async def device_lookup(request: Request, data: Annotated[CodeForm, Form]) -> Any:
    session_id = browser_session(request)
    if session_id is None:
        return to_login(request)
    try:
        found = await call_json(request, "SELECT api.device_lookup(%s::uuid, %s::text, %s::text)",
                                [session_id, data.user_code, client(request)[0]])
    except PgtallyError as exc:
        return page("device.html", request, 400, user_code=data.user_code, request_info=None, error=problem_text(exc))
    return page("device.html", request, user_code=found["user_code"], request_info=found)


@post("/device/decide")
async def device_decide(request: Request, data: Annotated[DecisionForm, Form]) -> Any:
    session_id = browser_session(request)
    if session_id is None:
        return to_login(request)
    try:
        result = await call_json(request, "SELECT api.device_decide(%s::uuid, %s::text, %s::boolean, %s::text, %s::text)",
                                 [session_id, data.user_code, data.decision == "approve", *client(request)])
    except PgtallyError as exc:
        return page("device.html", request, 400, user_code="", request_info=None, error=problem_text(exc))
    if result["approved"]:
        return page("message.html", request, title="Device approved",
                    message=f"{result['client_id']} is signed in. You can close this page and go back to it.")
    return page("message.html", request, title="Request denied", message=f"{result['client_id']} was not signed in.")


async def dashboard_view(request: Request, session_id: uuid.UUID, **extra: Any) -> Any:
    principal = principal_of(request, session_id)
    (balance,) = await call(request, "SELECT api.balance(%s::text, %s::uuid, %s::uuid)", principal)
    try:
        billing = await call_json(request, "SELECT api.billing_account(%s::text, %s::uuid, %s::uuid)", principal)
    except PgtallyError as exc:
        if exc.error.get("sqlstate") != "TL403":
            raise
        billing = None                  # a team member whose role does not see billing
    (events,) = await call(request, "SELECT api.usage_events(%s::text, %s::uuid, NULL, 10, NULL, NULL, NULL, %s::uuid)",
                           principal)
    (catalog,) = await call(request, "SELECT api.plans()", [])
    referrals = await call_json(request, "SELECT api.referrals(NULL, %s::uuid, %s::text)",
                                [session_id, request.app.state.settings.public_url])
    return page("dashboard.html", request, balance=balance, billing=billing, events=events["data"],
                bundles=catalog["bundles"], referrals=referrals, **extra)


@get("/dashboard")
async def dashboard_page(request: Request) -> Any:
    """What is left (credits, pending and expiring ones, each allowance and its reset), the plan
    and its billing state, the last 10 usage events with their metadata, and the referral link."""
    return await signed_in(request, lambda sid: dashboard_view(request, sid))


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
    (catalog,) = await call(request, "SELECT api.plans()", [])
    buyer = request.app.state.jwt_keys.upgrade_account(token) if token else None
    session_id = browser_session(request)
    billing = None
    if session_id and not buyer:
        try:
            billing = await call_json(request, "SELECT api.billing_account(%s::text, %s::uuid, %s::uuid)",
                                      principal_of(request, session_id))
        except PgtallyError:
            billing = None
    return page("upgrade.html", request, catalog=catalog, buyer=buyer, token=token if buyer else "",
                interval="year" if interval == "year" else "month", billing=billing,
                can_buy=bool(buyer or billing),
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
            session = await start_checkout(request, principal, data.price)
        except PgtallyError as exc:
            # api.checkout_prepare refuses a second subscription (TL40C): a subscriber switches.
            if exc.error.get("sqlstate") == "TL40C" and session_id:
                return await change_preview(request, session_id, data.price)
            raise
    except (PgtallyError, stripe.StripeError) as exc:
        message = problem_text(exc) if isinstance(exc, PgtallyError) else "Stripe could not start the checkout: try again."
        (catalog,) = await call(request, "SELECT api.plans()", [])
        return page("upgrade.html", request, 400, catalog=catalog, buyer=buyer, token=data.token, interval="month",
                    billing=None, can_buy=True, error=message)
    return Redirect(session.url)


@post("/upgrade/checkout")
async def upgrade_checkout(request: Request, data: Annotated[PurchaseForm, Form]) -> Any:
    return await purchase(request, data)


async def change_preview(request: Request, session_id: uuid.UUID, price: str) -> Any:
    """What switching the live subscription to ``price`` costs now, as Stripe previews it."""
    preview = await preview_change(request, principal_of(request, session_id), price)
    return page("change.html", request, price=price, preview=preview)


@post("/upgrade/change")
async def upgrade_change(request: Request, data: Annotated[PurchaseForm, Form]) -> Any:
    async def action(sid):
        await change_plan(request, principal_of(request, sid), data.price)
        return await dashboard_view(request, sid, notice="Your plan is changing; Stripe prorates the difference.")
    return await signed_in(request, action, dashboard_view)


@post("/dashboard/topup")
async def dashboard_topup(request: Request, data: Annotated[PurchaseForm, Form]) -> Any:
    async def action(sid):
        result = await top_up(request, principal_of(request, sid), data.price)
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
    return page("success.html", request, status=status)


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


def router(settings) -> Router:
    from api import admin, oauth, teams

    return Router(path="/", after_request=page_headers(settings), include_in_schema=False, route_handlers=[
        home, login_page, login_submit, referral_link, signup_page, signup_submit, logout_submit, verify_page, verify_submit,
        reset_page, reset_request, reset_confirm, account_page, revoke_session, create_key, revoke_key, unlink,
        device_page, device_lookup, device_decide, upgrade_page, upgrade_checkout, upgrade_change, billing_success,
        billing_cancel, billing_portal, billing_page, dashboard_page, dashboard_portal, dashboard_cancel, dashboard_resume, dashboard_topup,
        *oauth.ROUTES, *admin.PAGES, *teams.PAGES,
        create_static_files_router(path="/static", directories=[STATIC], include_in_schema=False)])
