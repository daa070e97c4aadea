"""Sign-in with Google (OpenID Connect) and GitHub (OAuth 2.0 and its user API), through authlib's
httpx client: authorization code flow with PKCE (S256, RFC 7636), a state bound to the browser
and a nonce bound to the ID token. The state, its single use, and who the provider account
becomes (sign in, link, sign up) are decided in PostgreSQL (sql/functions/55_sign_in.sql).

A provider is offered only when its client id and secret are configured; the issuer (Google)
and base URLs (GitHub) can point at local stand-ins for tests and offline use."""

from __future__ import annotations

import secrets
import warnings
from dataclasses import dataclass
from typing import Annotated, Any

import httpx
from authlib.common.errors import AuthlibBaseError
from authlib.deprecate import AuthlibDeprecationWarning

with warnings.catch_warnings():
    # authlib 1.9 announces its move to httpx2 on import (its own filter says "always"); the
    # pinned httpx client is the one used.
    warnings.simplefilter("ignore", AuthlibDeprecationWarning)
    from authlib.integrations.httpx_client import AsyncOAuth2Client
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from litestar import Request, get, post
from litestar.params import FromPath, FromQuery, QueryParameter
from litestar.response import Redirect

from api import outbound
from api.calls import call, call_json, client
from api.errors import PgtallyError
from api.pages import TokenForm
from api.web import (FORM, browser_session, device_session, page, problem_text, referral_of, safe_next,
                     sign_in_browser)

BINDING_COOKIE = "pgtally_oauth"
PROVIDERS = ("google", "github")
NAMES = {"google": "Google", "github": "GitHub", "sso": "Your organisation's sign-in"}


@dataclass(frozen=True)
class Identity:
    """Who the provider says signed in."""

    subject: str
    email: str | None
    email_verified: bool


def configured_providers(settings) -> list[str]:
    """The providers this server offers: those with a client id and secret."""
    return [p for p in PROVIDERS
            if getattr(settings, f"{p}_client_id") and getattr(settings, f"{p}_client_secret")]


def oauth_client(request: Request, provider: str, sso: dict[str, Any] | None = None) -> AsyncOAuth2Client:
    """The authlib client of a provider: Google's and GitHub's from the settings, a team's own
    OpenID Connect provider (``sso``: its client id and secret from api.sso_flow_config)."""
    settings = request.app.state.settings
    client_id, client_secret = ((sso["client_id"], sso["client_secret"]) if sso else
                                (getattr(settings, f"{provider}_client_id"), getattr(settings, f"{provider}_client_secret")))
    # Every request it makes goes only where the operator allowed (api/outbound.py).
    return outbound.guarded(AsyncOAuth2Client(
        client_id=client_id, client_secret=client_secret,
        scope="read:user user:email" if provider == "github" else "openid email profile",
        redirect_uri=f"{settings.public_url.rstrip('/')}/auth/{provider}/callback",
        code_challenge_method="S256", timeout=outbound.TIMEOUT, trust_env=False,
        event_hooks=outbound.hooks(settings)), settings)


def issuer_of(request: Request, provider: str, sso: dict[str, Any] | None) -> str:
    return (sso["issuer"] if sso else request.app.state.settings.google_issuer).rstrip("/")


async def oidc_metadata(request: Request, issuer: str) -> dict[str, Any]:
    """An issuer's OpenID Connect discovery document, checked and cached (outbound.oidc_metadata)."""
    return await outbound.oidc_metadata(request.app.state.oidc_metadata, request.app.state.settings, issuer)


async def authorization_url(request: Request, provider: str, flow: dict[str, Any], sso: dict[str, Any] | None = None,
                            login_hint: str | None = None) -> str:
    settings = request.app.state.settings
    oidc = provider != "github"
    endpoint = ((await oidc_metadata(request, issuer_of(request, provider, sso)))["authorization_endpoint"] if oidc
                else f"{settings.github_url.rstrip('/')}/login/oauth/authorize")
    extra = {"nonce": flow["nonce"]} if oidc else {}
    if login_hint:
        extra["login_hint"] = login_hint
    async with oauth_client(request, provider, sso) as oauth:
        url, _ = oauth.create_authorization_url(endpoint, state=flow["state"], code_verifier=flow["code_verifier"], **extra)
    return url


async def oidc_identity(request: Request, provider: str, code: str, flow: dict[str, Any],
                        sso: dict[str, Any] | None = None) -> Identity:
    """Exchange the code (with the PKCE verifier) and check the ID token: signature (the
    issuer's JWKS), issuer, audience, expiry and nonce (OpenID Connect Core 1.0 section 3.1.3.7).
    Google's, or a team's own provider (``sso``)."""
    metadata = await oidc_metadata(request, issuer_of(request, provider, sso))
    audience = sso["client_id"] if sso else request.app.state.settings.google_client_id
    settings = request.app.state.settings
    async with outbound.exchange(NAMES[provider]):
        async with oauth_client(request, provider, sso) as oauth:
            token = await oauth.fetch_token(metadata["token_endpoint"], code=code, code_verifier=flow["code_verifier"])
    async with outbound.client(settings) as http:     # no token of the user goes to the keys' address
        keys = await outbound.read_json(http, settings, metadata["jwks_uri"], f"the keys of {NAMES[provider]}")
    try:
        decoded = jwt.decode(token["id_token"], KeySet.import_key_set(keys))
        jwt.JWTClaimsRegistry(
            iss={"essential": True, "value": metadata["issuer"]},
            aud={"essential": True, "value": audience},
            exp={"essential": True}, sub={"essential": True},
            nonce={"essential": True, "value": flow["nonce"]}).validate(decoded.claims)
    except (JoseError, KeyError, ValueError, TypeError) as exc:
        raise PgtallyError({"sqlstate": "TL400", "message": f"the ID token from {NAMES[provider]} is not valid: {exc}"}) from None
    return identity_of(provider, decoded.claims.get("sub"), decoded.claims.get("email"),
                       decoded.claims.get("email_verified") is True)


def identity_of(provider: str, subject: Any, email: Any, verified: bool) -> Identity:
    """The provider's answer as pgtally stores it: a subject (string or number) and an email
    (a string or none), neither with a NUL character; anything else is refused (400)."""
    if not isinstance(subject, (str, int)) or isinstance(subject, bool) or not isinstance(email, (str, type(None))) \
            or "\x00" in str(subject) + (email or ""):
        raise PgtallyError({"sqlstate": "TL400", "message": f"{NAMES[provider]} named the user in a way pgtally cannot use"})
    return Identity(str(subject), email, verified)


async def github_identity(request: Request, code: str, flow: dict[str, Any]) -> Identity:
    """Exchange the code, then read the user and its primary email from GitHub's REST API."""
    settings = request.app.state.settings
    api = settings.github_api_url.rstrip("/")
    async with outbound.exchange("GitHub"), oauth_client(request, "github") as oauth:
        await oauth.fetch_token(f"{settings.github_url.rstrip('/')}/login/oauth/access_token", code=code,
                                code_verifier=flow["code_verifier"], headers={"Accept": "application/json"})
        headers = {"Accept": "application/vnd.github+json"}
        user = (await oauth.get(f"{api}/user", headers=headers)).raise_for_status().json()
        emails = (await oauth.get(f"{api}/user/emails", headers=headers)).raise_for_status().json()
        # GitHub's answers, read as its REST API documents them (a shape error is Unavailable).
        primary = next((e for e in emails if e.get("primary")), None) or next(iter(emails), None)
        email, verified = (primary.get("email"), bool(primary.get("verified"))) if primary else (None, False)
        subject = user["id"]
    return identity_of("github", subject, email, verified)


@get("/auth/{provider:str}/start", include_in_schema=False)
async def start(request: Request, provider: FromPath[str], next: FromQuery[str | None] = None,
                link: FromQuery[bool] = False,
                device_token: FromQuery[str | None] = None, email: FromQuery[str | None] = None) -> Any:
    """Send the browser to the provider, with a state bound to a cookie set here. ``link``: link
    the provider to the signed-in user instead of signing in. ``device_token``: the access token
    of an anonymous device (a browser extension's /v1/identify) to merge into the user.
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
    elif provider not in configured_providers(request.app.state.settings):
        return page("message.html", request, 404, title="Not available",
                    message=f"Sign-in with {provider} is not configured on this server.")
    binding = secrets.token_urlsafe(32)
    session_id = browser_session(request) if link else None
    if link and session_id is None:
        return Redirect(f"/login?next=/account")
    flow = await call_json(request, "SELECT api.oauth_begin(%s::text, %s::text, %s::text, %s::uuid, %s::uuid, %s::text, "
                                    "%s::text, %s::uuid)",
                           [provider, "link" if link and not sso else "sign_in", binding, None if sso else session_id,
                            device_session(request, device_token),
                            safe_next(next), client(request)[0], sso and sso["account_id"]])
    try:
        response = Redirect(await authorization_url(request, provider, flow, sso, login_hint=email if sso else None))
    except outbound.Unavailable as exc:
        return page("message.html", request, 502, title="Sign-in is unavailable",
                    message=f"{NAMES[provider]} cannot be used right now: {exc}. Try again later, or ask your administrator.",
                    link=("/login", "Log in another way"))
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
        who = await (github_identity(request, code, flow) if provider == "github"
                     else oidc_identity(request, provider, code, flow, sso))
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
                                        "from now on, open the link we emailed to that address (it works once, within an hour).")
                response.delete_cookie(BINDING_COOKIE, path="/auth")
                return response
            sign_in_browser(request, session)
            target = safe_next(flow["return_to"])
    except PgtallyError as exc:
        response = page("login.html", request, 400, error=problem_text(exc), email="")
    except AuthlibBaseError as exc:
        response = page("login.html", request, 400, email="",
                        error=f"{NAMES[provider]} refused the sign-in ({exc.error}): start again.")
    except httpx.HTTPError:
        response = page("login.html", request, 502, email="", error=f"{NAMES[provider]} could not be reached: try again.")
    except outbound.Unavailable as exc:
        response = page("login.html", request, 502, email="", error=f"{NAMES[provider]} cannot be used right now: {exc}.")
    else:
        response = Redirect(target)
    response.delete_cookie(BINDING_COOKIE, path="/auth")
    return response


@get("/auth/sso/confirm", include_in_schema=False)
async def sso_confirm_page(request: Request, token: FromQuery[str] = "") -> Any:
    """The link of the sso_link email: a button, not an action (mail scanners open links)."""
    return page("sso_confirm.html", request, token=token[:200])


@post("/auth/sso/confirm", include_in_schema=False)
async def sso_confirm(request: Request, data: Annotated[TokenForm, FORM]) -> Any:
    """Link the team's provider to the user the email went to, and sign them in (api.confirm_sso_link)."""
    ip, user_agent = client(request)
    try:
        session = await call_json(request, "SELECT api.confirm_sso_link(%s::text, %s::text, %s::text)",
                                  [data.token[:200], ip, user_agent])
    except PgtallyError as exc:
        return page("sso_confirm.html", request, 400, token="", error=problem_text(exc))
    sign_in_browser(request, session)
    return Redirect("/teams")


ROUTES = [start, callback, sso_confirm_page, sso_confirm]
