"""Sign-in pages: sign up, log in (password, Google, GitHub, a team's own provider), log out, a
referral link, email verification, password reset, and /device (approve a command line). Each is a
view over the same ``api.*`` functions as the JSON endpoints (sql/functions/50_auth.sql,
55_sign_in.sql, 58_sso.sql), with plain CSRF-protected forms and no script."""

from __future__ import annotations

import secrets
from typing import Annotated, Any
from urllib.parse import quote

import httpx
import msgspec
from authlib.common.errors import AuthlibBaseError
from litestar import Request, get, post
from litestar.enums import MediaType
from litestar.params import FromPath, FromQuery, QueryParameter
from litestar.response import Redirect, Template

from api import oauth, outbound
from api.auth import (
    Credentials,
    EmailRequest,
    ResetConfirm,
    TokenRequest,
    new_password_hash,
    password_login,
    register,
)
from api.calls import call, call_json, client
from api.device import UserCodeForm
from api.errors import PgtallyError
from api.oauth import BINDING_COOKIE, NAMES
from api.web import (
    FORM,
    REFERRAL_COOKIE,
    REFERRAL_DAYS,
    browser_session,
    claim_handoff,
    form_as,
    handed_off_device,
    page,
    problem_text,
    referral_code,
    referral_of,
    refusal_status,
    safe_next,
    sign_in_browser,
    to_login,
)

Form = FORM


class CredentialsForm(msgspec.Struct):
    email: str = ""
    password: str = ""
    next: str | None = None


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


async def sso_available(request: Request) -> bool:
    """Whether the "Single sign-on" form is worth showing: some team proved a domain (the page's
    one call, api.sso_available). A form re-shown after a refusal leaves it out."""
    (available,) = await call(request, "SELECT api.sso_available()", [])
    return bool(available)


@get("/")
async def home(request: Request) -> Redirect:
    return Redirect("/dashboard" if browser_session(request) else "/login")


@get("/login")
async def login_page(request: Request, next: FromQuery[str | None] = None,
                     handoff: FromQuery[str | None] = None) -> Any:
    """``handoff``: an install's single-use code (POST /v1/identify/handoff), claimed here once: the
    install's usage and credits move to the account signed in to in this browser."""
    await claim_handoff(request, handoff)
    return page("sign_in/login.html", request, next=safe_next(next), email="", sso=await sso_available(request))


@post("/login")
async def login_submit(request: Request, data: Annotated[CredentialsForm, Form]) -> Any:
    try:
        credentials = form_as(Credentials, email=data.email, password=data.password)
        session = await password_login(request, credentials.email, credentials.password,
                                       handed_off_device(request))
    except PgtallyError as exc:
        return page("sign_in/login.html", request, refusal_status(exc, 401), error=problem_text(exc), email=data.email[:320],
                    next=safe_next(data.next))
    sign_in_browser(request, session)
    return Redirect(safe_next(data.next))


@get("/r/{code:str}")
async def referral_link(request: Request, code: FromPath[str]) -> Redirect:
    """A person's referral link: remember the code in this browser (the first one wins, for 30
    days) and lead to sign-up, where it is sent with the new account (``api.signup``, or the
    Google/GitHub sign-up)."""
    response = Redirect("/signup")
    if referral_code(code) and referral_of(request) is None:
        response.set_cookie(REFERRAL_COOKIE, referral_code(code), max_age=REFERRAL_DAYS * 86400, httponly=True,
                            samesite="lax", secure=request.app.state.settings.secure_cookies)
    return response


@get("/signup")
async def signup_page(request: Request, handoff: FromQuery[str | None] = None,
                      next: FromQuery[str | None] = None) -> Any:
    """``next``: where to go once signed in (an app's authorization request, api/oidc.py).
    ``handoff``: an install's single-use code, as on /login."""
    await claim_handoff(request, handoff)
    return page("sign_in/signup.html", request, email="", referral=referral_of(request), next=safe_next(next),
                sso=await sso_available(request))


@post("/signup")
async def signup_submit(request: Request, data: Annotated[CredentialsForm, Form]) -> Any:
    try:
        credentials = form_as(Credentials, email=data.email, password=data.password)
        sent = await register(request, credentials.email, credentials.password,
                              handed_off_device(request), referral_of(request))
    except PgtallyError as exc:
        return page("sign_in/signup.html", request, 422, error=problem_text(exc), email=data.email[:320],
                    referral=referral_of(request), next=safe_next(data.next))
    # The same answer whether or not the address was registered already.
    return page("message.html", request, title="Check your email",
                message=f"We sent a link to {sent['email']} to confirm the address. It works once, for {sent['valid_for']}.",
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
    return page("sign_in/verify.html", request, token=token)


@post("/verify-email")
async def verify_submit(request: Request, data: Annotated[TokenForm, Form]) -> Any:
    try:
        token = form_as(TokenRequest, token=data.token).token
        result = await call_json(request, "SELECT api.verify_email(%s::text, %s::text)", [token, client(request)[0]])
    except PgtallyError as exc:
        return page("sign_in/verify.html", request, 400, token="", error=problem_text(exc))
    return page("message.html", request, title="Email confirmed",
                message=f"{result['email']} is confirmed.", link=("/login", "Log in"))


@get("/reset-password")
async def reset_page(request: Request, token: FromQuery[str | None] = None) -> Any:
    """Without a token: ask for the email. With the emailed token: choose a new password."""
    return page("sign_in/reset.html", request, token=token or "", email="")


@post("/reset-password")
async def reset_request(request: Request, data: Annotated[EmailForm, Form]) -> Any:
    try:
        email = form_as(EmailRequest, email=data.email).email
        sent = await call_json(request, "SELECT api.request_password_reset(%s::text, %s::text)", [email, client(request)[0]])
    except PgtallyError as exc:
        return page("sign_in/reset.html", request, 422, token="", email=data.email[:320], error=problem_text(exc))
    return page("message.html", request, title="Check your email",
                message="If that address has an account, a link to choose a new password is on its way. "
                        f"It works once, for {sent['valid_for']}.")


@post("/reset-password/confirm")
async def reset_confirm(request: Request, data: Annotated[NewPasswordForm, Form]) -> Any:
    try:
        confirm = form_as(ResetConfirm, token=data.token, password=data.password)
        password_hash = await new_password_hash(confirm.password)
        await call_json(request, "SELECT api.reset_password(%s::text, %s::text, %s::text)",
                        [confirm.token, password_hash, client(request)[0]])
    except PgtallyError as exc:
        return page("sign_in/reset.html", request, 400, token=data.token[:200], email="", error=problem_text(exc))
    request.clear_session()
    return page("message.html", request, title="Password changed",
                message="Your password is changed and every session was signed out.", link=("/login", "Log in"))


@get("/device")
async def device_page(request: Request, user_code: FromQuery[str] = "") -> Any:
    """Enter (or arrive with) the code a command line shows; sign in first if needed."""
    if browser_session(request) is None:
        return to_login(request)
    return page("sign_in/device.html", request, user_code=user_code, request_info=None)


@post("/device")
async def device_lookup(request: Request, data: Annotated[CodeForm, Form]) -> Any:
    session_id = browser_session(request)
    if session_id is None:
        return to_login(request)
    try:
        user_code = form_as(UserCodeForm, user_code=data.user_code).user_code
        found = await call_json(request, "SELECT api.device_lookup(%s::uuid, %s::text, %s::text)",
                                [session_id, user_code, client(request)[0]])
    except PgtallyError as exc:
        return page("sign_in/device.html", request, refusal_status(exc, 400), user_code=data.user_code[:32], request_info=None,
                    error=problem_text(exc))
    return page("sign_in/device.html", request, user_code=found["user_code"], request_info=found)


@post("/device/decide")
async def device_decide(request: Request, data: Annotated[DecisionForm, Form]) -> Any:
    session_id = browser_session(request)
    if session_id is None:
        return to_login(request)
    try:
        user_code = form_as(UserCodeForm, user_code=data.user_code).user_code
        result = await call_json(request, "SELECT api.device_decide(%s::uuid, %s::text, %s::boolean, %s::text, %s::text)",
                                 [session_id, user_code, data.decision == "approve", *client(request)])
    except PgtallyError as exc:
        return page("sign_in/device.html", request, 400, user_code="", request_info=None, error=problem_text(exc))
    if result["approved"]:
        return page("message.html", request, title="Device approved",
                    message=f"{result['client_id']} is signed in. You can close this page and go back to it.")
    return page("message.html", request, title="Request denied", message=f"{result['client_id']} was not signed in.")


@get("/auth/{provider:str}/start", include_in_schema=False)
async def start(request: Request, provider: FromPath[str], next: FromQuery[str | None] = None,
                link: FromQuery[bool] = False,
                handoff: FromQuery[str | None] = None, email: FromQuery[str | None] = None) -> Any:
    """Send the browser to the provider, with a state bound to a cookie set here. ``link``: link
    the provider to the signed-in user instead of signing in. ``handoff``: an install's single-use
    code (POST /v1/identify/handoff), claimed here unless /login or /signup claimed it already: the
    install merges into the user.
    ``/auth/sso/start?email=``: the provider of the team the address's domain belongs to."""
    sso = None
    if provider == "sso":
        if not email:
            return Redirect("/login")
        (sso,) = await call(request, "SELECT api.sso_flow_config(%s::text)", [email])
        if sso is None:
            return page("message.html", request, 404, title="No single sign-on",
                        message="No team signs in people of this email domain through its own provider: "
                                "log in with your password, Google or GitHub.", link=("/login", "Log in"))
    elif provider not in request.app.state.settings.providers:
        return page("message.html", request, 404, title="Not available",
                    message=f"Sign-in with {provider} is not configured on this server.")
    await claim_handoff(request, handoff)
    binding = secrets.token_urlsafe(32)
    session_id = browser_session(request) if link else None
    if link and session_id is None:
        return Redirect("/login?next=/account")
    flow = await call_json(request, "SELECT api.oauth_begin(%s::text, %s::text, %s::text, %s::uuid, %s::uuid, %s::text, "
                                    "%s::text, %s::uuid)",
                           [provider, "link" if link and not sso else "sign_in", binding, None if sso else session_id,
                            handed_off_device(request),
                            safe_next(next), client(request)[0], sso and sso["account_id"]])
    try:
        target = await oauth.authorization_url(request, provider, flow, sso, login_hint=email if sso else None)
    except outbound.OutboundError as exc:
        return page("message.html", request, 502, title="Sign-in is unavailable",
                    message=f"{NAMES[provider]} cannot be used right now: {exc}. Try again later, or ask your administrator.",
                    link=("/login", "Log in another way"))
    if sso and request.headers.get("sec-fetch-site") == "same-origin":
        # The "Single sign-on" form's answer: a page of this site that moves on by itself. Chromium
        # applies the form's CSP form-action to every redirect that follows a submission, and the
        # team's provider is no origin the CSP can name for everyone (as api/oidc.py answers).
        response: Any = Template(template_name="sign_in/sso_redirect.html", context={"target": target},
                                 media_type=MediaType.HTML)
    else:
        response = Redirect(target)
    response.set_cookie(BINDING_COOKIE, binding, path="/auth", max_age=600, httponly=True, samesite="lax",
                        secure=request.app.state.settings.secure_cookies)
    return response


@get("/auth/{provider:str}/callback", include_in_schema=False)
async def callback(request: Request, provider: FromPath[str],
                   oauth_state: Annotated[str | None, QueryParameter(name="state")] = None, code: FromQuery[str | None] = None,
                   error: FromQuery[str | None] = None, error_description: FromQuery[str | None] = None) -> Any:
    """Where the provider sends the browser back: the state is claimed once (from the browser
    that started it), the code exchanged, and the person signed in, linked or signed up."""
    ip, user_agent = client(request)
    try:
        flow = await call_json(request, "SELECT api.oauth_claim(%s::text, %s::text, %s::text, %s::text)",
                               [oauth_state or "", request.cookies.get(BINDING_COOKIE, ""), ip, user_agent])
        if flow["provider"] != provider:
            raise PgtallyError({"sqlstate": "TL400", "message": "this sign-in was started with another provider"})
        if error or not code:
            raise PgtallyError({"sqlstate": "TL400",
                                "message": f"{NAMES[provider]} did not sign you in ({error or 'no code'})"
                                           + (f": {error_description}" if error_description else "")})
        sso = None
        if provider == "sso":
            (sso,) = await call(request, "SELECT api.sso_flow_config(NULL, %s::uuid)", [flow["sso_account_id"]])
            if sso is None:
                raise PgtallyError({"sqlstate": "TL400", "message": "this team no longer signs in through its own provider"})
        who = await (oauth.github_identity(request, code, flow) if provider == "github"
                     else oauth.oidc_identity(request, provider, code, flow, sso))
        if flow["purpose"] == "link":
            await call_json(request, "SELECT api.oauth_link(%s::uuid, %s::text, %s::text, %s::text, %s::boolean, %s::text, %s::text)",
                            [flow["session_id"], provider, who.subject, who.email, who.email_verified, ip, user_agent])
            target = "/account"
        else:
            session = await call_json(
                request, "SELECT api.oauth_sign_in(%s::text, %s::text, %s::text, %s::boolean, %s::uuid, %s::text, %s::text, "
                "%s::text, %s::uuid)",
                [provider, who.subject, who.email, who.email_verified, flow["device_session_id"], ip, user_agent,
                 referral_of(request), flow["sso_account_id"]])
            if session.get("status") == "sso_link_email_sent":
                # An existing user who never linked this team's provider confirms from their mailbox.
                response = page("message.html", request, 200, title="Check your email",
                                message=f"{session['email']} already has an account. To sign in with your organisation "
                                        f"from now on, open the link we emailed to that address (it works once, within {session['valid_for']}).")
                response.delete_cookie(BINDING_COOKIE, path="/auth")
                return response
            sign_in_browser(request, session)
            target = safe_next(flow["return_to"])
    except PgtallyError as exc:
        response = page("sign_in/login.html", request, 400, error=problem_text(exc), email="")
    except AuthlibBaseError as exc:
        response = page("sign_in/login.html", request, 400, email="",
                        error=f"{NAMES[provider]} refused the sign-in ({exc.error}): start again.")
    except httpx.HTTPError:
        response = page("sign_in/login.html", request, 502, email="", error=f"{NAMES[provider]} could not be reached: try again.")
    except outbound.OutboundError as exc:
        response = page("sign_in/login.html", request, 502, email="", error=f"{NAMES[provider]} cannot be used right now: {exc}.")
    else:
        response = Redirect(target)
    response.delete_cookie(BINDING_COOKIE, path="/auth")
    return response


@get("/auth/sso/confirm", include_in_schema=False)
async def sso_confirm_page(request: Request, token: FromQuery[str] = "") -> Any:
    """The link of the sso_link email: a button, not an action (mail scanners open links)."""
    return page("sign_in/sso_confirm.html", request, token=token[:200])


@post("/auth/sso/confirm", include_in_schema=False)
async def sso_confirm(request: Request, data: Annotated[TokenForm, FORM]) -> Any:
    """Link the team's provider to the user the email went to, and sign them in (api.confirm_sso_link)."""
    ip, user_agent = client(request)
    try:
        session = await call_json(request, "SELECT api.confirm_sso_link(%s::text, %s::text, %s::text)",
                                  [data.token[:200], ip, user_agent])
    except PgtallyError as exc:
        return page("sign_in/sso_confirm.html", request, 400, token="", error=problem_text(exc))
    sign_in_browser(request, session)
    return Redirect("/teams")


PAGES = [home, login_page, login_submit, referral_link, signup_page, signup_submit, logout_submit, verify_page,
         verify_submit, reset_page, reset_request, reset_confirm, device_page, device_lookup, device_decide,
         start, callback, sso_confirm_page, sso_confirm]
