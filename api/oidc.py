"""pgtally as an OpenID Connect provider for the product's own apps (issue 25): discovery, the
authorization endpoint and its consent page, the code and refresh grants of ``/oauth/token``
(api/device.py hands them here), the JWKS, userinfo, RP-initiated logout, and CORS on the JSON
API for registered clients' origins.

Every decision and single-use claim is a PL/pgSQL function (sql/functions/59_oidc_provider.sql);
this module only speaks the protocol: it reads the request, calls one ``api.oidc_*`` function,
and signs the ID token claims it returns with joserfc (RS256, the newest key of
``identity.signing_keys``). Sources: OpenID Connect Core 1.0, Discovery 1.0, RP-Initiated
Logout 1.0, RFC 6749, RFC 7636, RFC 9207."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any
from urllib.parse import quote, urlencode, urlsplit

import msgspec
from authlib.common.urls import add_params_to_uri
from authlib.oauth2.rfc6749.util import extract_basic_authorization
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet, RSAKey
from litestar import Request, Response, Router, get, post
from litestar.enums import MediaType
from litestar.params import FromQuery, QueryParameter
from litestar.response import Redirect, Template
from psycopg.types.json import Jsonb

from api.calls import SESSION, Session, call, client
from api.errors import PgtallyError, problems
from api.web import FORM, browser_session, page, page_headers, problem_text

ID_TOKEN_SECONDS = 3600
"""An ID token is valid an hour (identity.published_signing_keys keeps a superseded key 75 minutes)."""
KEY_CACHE_SECONDS = 300
"""How long a server keeps signing with the key it read before reading the newest again."""
CORS_CACHE_SECONDS = 30
"""How long a server keeps the registered clients' origins (a new client's origin works within this)."""
CLAIMS_NAMESPACE = "https://pgtally.dev/claims"
SCOPE_TEXT = {"openid": "Know who you are (your pgtally user id)", "profile": "See your name",
              "email": "See your email address and whether it is confirmed",
              "offline_access": "Stay signed in when you are away",
              "usage:read": "See your usage, credits and plan", "usage:write": "Use your allowance and credits",
              "billing:read": "See your billing details", "billing:manage": "Buy and change your plan"}
AUTHORIZE_PARAMS = ("response_type", "client_id", "redirect_uri", "scope", "state", "nonce", "code_challenge",
                    "code_challenge_method")
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
CONSENT_PAGE = "/authorize/consent"
"""The consent page (GET); its form posts to /consent."""


def issuer(request: Request) -> str:
    """The issuer identifier: PGTALLY_PUBLIC_URL without a trailing slash."""
    return request.app.state.settings.public_url.rstrip("/")


# ------------------------------------------------------------------------------------------------
# Signing keys
# ------------------------------------------------------------------------------------------------
async def signing_key(request: Request) -> tuple[str, RSAKey]:
    """The newest signing key (kid, key), read at most every 5 minutes. The first server to find
    none makes one (2048-bit RSA, kid = its RFC 7638 thumbprint) and api.oidc_add_signing_key
    keeps only the first stored."""
    state = request.app.state
    cached = getattr(state, "oidc_signing_key", None)
    if cached and cached[0] > time.monotonic():
        return cached[1], cached[2]
    async with state.pool.connection() as conn:
        row = await (await conn.execute("SELECT kid, private_jwk FROM api.oidc_signing_key()")).fetchone()
        if row is None:
            key = RSAKey.generate_key(2048, private=True)
            await conn.execute("SELECT api.oidc_add_signing_key(%s::text, %s::jsonb, %s::jsonb, false)",
                               [key.thumbprint(), Jsonb(key.as_dict(private=True)), Jsonb(key.as_dict(private=False))])
            row = await (await conn.execute("SELECT kid, private_jwk FROM api.oidc_signing_key()")).fetchone()
    kid, jwk = row
    state.oidc_signing_key = (time.monotonic() + KEY_CACHE_SECONDS, kid, RSAKey.import_key(jwk, {"kid": kid}))
    return kid, state.oidc_signing_key[2]


async def published_keys(request: Request) -> dict[str, Any]:
    """The JWK Set (api.oidc_jwks), read fresh each time: another server may already sign with a
    key rotated in a moment ago, and a relying party that meets an unknown kid asks again."""
    await signing_key(request)                  # there is always one key to publish
    (jwks,) = await call(request, "SELECT api.oidc_jwks()", [])
    return jwks


async def sign_id_token(request: Request, claims: dict[str, Any]) -> str:
    """An ID token (OpenID Connect Core section 2) of the claims api.oidc_token_* returned, with
    iss, iat and exp added, signed RS256 by joserfc with the newest key (its kid in the header)."""
    kid, key = await signing_key(request)
    now = int(time.time())
    return jwt.encode({"alg": "RS256", "kid": kid, "typ": "JWT"},
                      {**claims, "iss": issuer(request), "iat": now, "exp": now + ID_TOKEN_SECONDS}, key,
                      algorithms=["RS256"])


async def token_response(request: Request, found: dict[str, Any]) -> dict[str, Any]:
    """The token response of a code or refresh grant: the access and refresh token as every
    pgtally sign-in gets them (api.security.Keys.issue), plus scope and a signed id_token."""
    body = request.app.state.jwt_keys.issue(found)
    if found.get("scope") is not None:
        body["scope"] = found["scope"]
    if found.get("id_token"):
        body["id_token"] = await sign_id_token(request, found["id_token"])
    return body


# ------------------------------------------------------------------------------------------------
# Token endpoint grants (called from api.device.token)
# ------------------------------------------------------------------------------------------------
def client_credentials(request: Request, client_id: str | None, client_secret: str | None
                       ) -> tuple[str | None, str | None, str | None]:
    """(client_id, client_secret, error): from HTTP Basic (client_secret_basic) or the form
    (client_secret_post), not both (RFC 6749 section 2.3.1)."""
    basic_id, basic_secret = extract_basic_authorization(request.headers)
    if basic_id is not None:
        if client_secret is not None or (client_id is not None and client_id != basic_id):
            return None, None, "authenticate the client one way: HTTP Basic or the form, not both"
        return basic_id, basic_secret, None
    return client_id, client_secret, None


async def code_grant(request: Request, client_id: str | None, client_secret: str | None, code: str | None,
                     redirect_uri: str | None, code_verifier: str | None) -> dict[str, Any]:
    """grant_type=authorization_code: api.oidc_token_code decides (one round trip)."""
    (found,) = await call(request, "SELECT api.oidc_token_code(%s::text, %s::text, %s::text, %s::text, %s::text, "
                                   "%s::text, %s::text)",
                          [client_id, client_secret, code, redirect_uri, code_verifier, *client(request)])
    return found


async def refresh_grant(request: Request, client_id: str | None, client_secret: str | None,
                        refresh_token: str) -> dict[str, Any]:
    """grant_type=refresh_token: api.oidc_token_refresh (a client's token only with that client)."""
    (found,) = await call(request, "SELECT api.oidc_token_refresh(%s::text, %s::text, %s::text, %s::text, %s::text)",
                          [client_id, client_secret, refresh_token, *client(request)])
    return found


# ------------------------------------------------------------------------------------------------
# Discovery, JWKS, userinfo
# ------------------------------------------------------------------------------------------------
class ProviderMetadata(msgspec.Struct):
    """OpenID Provider metadata (OpenID Connect Discovery 1.0 section 3, RFC 8414)."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    userinfo_endpoint: str
    jwks_uri: str
    end_session_endpoint: str
    device_authorization_endpoint: str
    scopes_supported: list[str]
    response_types_supported: list[str]
    response_modes_supported: list[str]
    grant_types_supported: list[str]
    subject_types_supported: list[str]
    id_token_signing_alg_values_supported: list[str]
    token_endpoint_auth_methods_supported: list[str]
    code_challenge_methods_supported: list[str]
    claims_supported: list[str]
    prompt_values_supported: list[str]
    authorization_response_iss_parameter_supported: bool


class JWKSet(msgspec.Struct):
    """A JWK Set (RFC 7517 section 5): public RSA keys with kid, use sig, alg RS256."""

    keys: list[dict[str, str]]


class UserInfo(msgspec.Struct, omit_defaults=True):
    """The UserInfo response (OpenID Connect Core section 5.3.2)."""

    sub: str
    pgtally: dict[str, Any] = msgspec.field(name=CLAIMS_NAMESPACE)
    email: str | None = None
    email_verified: bool | None = None
    name: str | None = None


@get("/.well-known/openid-configuration", summary="OpenID Provider metadata (OpenID Connect Discovery 1.0)",
     responses=problems())
async def discovery(request: Request) -> ProviderMetadata:
    """Where pgtally's OpenID Connect endpoints are and what they support."""
    base = issuer(request)
    return ProviderMetadata(
        issuer=base, authorization_endpoint=f"{base}/oauth/authorize", token_endpoint=f"{base}/oauth/token",
        userinfo_endpoint=f"{base}/oauth/userinfo", jwks_uri=f"{base}/oauth/jwks",
        end_session_endpoint=f"{base}/oauth/logout", device_authorization_endpoint=f"{base}/oauth/device_authorization",
        scopes_supported=list(SCOPE_TEXT), response_types_supported=["code"], response_modes_supported=["query"],
        grant_types_supported=["authorization_code", "refresh_token", "urn:ietf:params:oauth:grant-type:device_code"],
        subject_types_supported=["public"], id_token_signing_alg_values_supported=["RS256"],
        token_endpoint_auth_methods_supported=["client_secret_basic", "client_secret_post", "none"],
        code_challenge_methods_supported=["S256"],
        claims_supported=["iss", "sub", "aud", "exp", "iat", "auth_time", "nonce", "sid", "email", "email_verified",
                          "name", CLAIMS_NAMESPACE],
        prompt_values_supported=["none", "consent"], authorization_response_iss_parameter_supported=True)


@get("/oauth/jwks", summary="The ID token signing keys (JWK Set)", responses=problems(503))
async def jwks(request: Request) -> Response[JWKSet]:
    """The public keys ID tokens are signed with: the newest, and older ones until their tokens expire."""
    return Response(msgspec.convert(await published_keys(request), JWKSet), headers={"Cache-Control": "public, max-age=300"})


@get("/oauth/userinfo", dependencies=SESSION, security=[{"bearer": []}], summary="UserInfo (OpenID Connect Core 5.3)",
     responses=problems(400, 401, 403, 503))
async def userinfo(request: Request, session: Session) -> Response[UserInfo]:
    """The claims about the person an access token of a client (scope ``openid``) was issued for:
    sub, email and email_verified (scope email), name (scope profile), and pgtally's account and
    teams under ``https://pgtally.dev/claims``."""
    (claims,) = await call(request, "SELECT api.oidc_userinfo(%s::uuid)", [session])
    return Response(msgspec.convert(claims, UserInfo), headers=NO_STORE)


# ------------------------------------------------------------------------------------------------
# Authorization endpoint and consent (pages: the browser's cookie session)
# ------------------------------------------------------------------------------------------------
class ConsentForm(msgspec.Struct):
    decision: str = ""
    response_type: str | None = None
    client_id: str | None = None
    redirect_uri: str | None = None
    scope: str | None = None
    state: str | None = None
    nonce: str | None = None
    code_challenge: str | None = None
    code_challenge_method: str | None = None


def back_to_client(request: Request, redirect_uri: str, params: dict[str, str | None], client_name: str = "the app"
                   ) -> Response:
    """Send the browser to the client's (registered) redirect URI with the answer, state and iss
    (RFC 9207). After a same-site step (a sign-in or consent form) the answer is a page that moves
    on by itself: Chromium applies the form's CSP form-action to every redirect that follows."""
    target = add_params_to_uri(redirect_uri, [(k, v) for k, v in {**params, "iss": issuer(request)}.items()
                                              if v is not None])
    if request.headers.get("sec-fetch-site") == "same-origin":
        return Template(template_name="oidc/oidc_redirect.html", context={"target": target, "client_name": client_name},
                        media_type=MediaType.HTML)
    return Redirect(target, status_code=303)


async def decide(request: Request, params: dict[str, str | None], decision: str | None, prompt: str | None) -> Any:
    """Run api.oidc_authorize on an authorization request and answer it (see its comment)."""
    found = await call(request, "SELECT api.oidc_authorize(%s::uuid, %s::text, %s::text, %s::text, %s::text, %s::text, "
                                "%s::text, %s::text, %s::text, %s::text, %s::text)",
                       [browser_session(request), params["client_id"], params["redirect_uri"], params["response_type"],
                        params["scope"], params["code_challenge"], params["code_challenge_method"], params["nonce"],
                        decision, *client(request)])
    (found,) = found
    state = params["state"]
    if "refuse" in found:
        return page("message.html", request, 400, title="This sign-in link is not valid",
                    message=f"The app that sent you here made a mistake: {found['refuse']}.")
    if "oauth_error" in found:
        return back_to_client(request, params["redirect_uri"], {**found["oauth_error"], "state": state})
    if "login" in found:
        if prompt == "none":
            return back_to_client(request, params["redirect_uri"], {"error": "login_required", "state": state})
        here = "/oauth/authorize?" + (request.url.query if request.method == "GET"
                                      else urlencode({k: v for k, v in params.items() if v is not None}))
        return Redirect(f"/login?next={quote(here, safe='')}")
    if "consent" in found:
        if prompt == "none":
            return back_to_client(request, params["redirect_uri"], {"error": "consent_required", "state": state})
        if request.url.path != CONSENT_PAGE:
            # The consent form is a page of its own: /oauth/ paths carry no CSRF token.
            return Redirect(f"{CONSENT_PAGE}?{request.url.query}")
        response = page("oidc/consent.html", request, consent=found["consent"], params=params, scope_text=SCOPE_TEXT)
        # The consent form posts here, then the browser goes on to the client's redirect URI.
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            f"form-action 'self' {found['consent']['redirect_origin']}; frame-ancestors 'none'; base-uri 'none'; "
            "object-src 'none'")
        return response
    return back_to_client(request, params["redirect_uri"], {"code": found["code"], "state": state},
                          found.get("client_name", "the app"))


@get("/oauth/authorize")
async def authorize(request: Request,
                    response_type: FromQuery[str | None] = None, client_id: FromQuery[str | None] = None, redirect_uri: FromQuery[str | None] = None,
                    oauth_scope: Annotated[str | None, QueryParameter(name="scope")] = None,
                    oauth_state: Annotated[str | None, QueryParameter(name="state")] = None, nonce: FromQuery[str | None] = None,
                    code_challenge: FromQuery[str | None] = None, code_challenge_method: FromQuery[str | None] = None,
                    prompt: FromQuery[str | None] = None) -> Any:
    """The authorization endpoint (authorization code flow, OpenID Connect Core section 3.1.2):
    a signed-out visitor goes to /login (or sign-up, Google, GitHub, team SSO) and comes back
    here; a first-party client gets its code at once, a third-party one after the consent page.
    ``prompt=none``: login_required or consent_required instead of a page."""
    params = {"response_type": response_type, "client_id": client_id, "redirect_uri": redirect_uri, "scope": oauth_scope,
              "state": oauth_state, "nonce": nonce, "code_challenge": code_challenge,
              "code_challenge_method": code_challenge_method}
    return await decide(request, params, None, prompt)


@get(CONSENT_PAGE)
async def consent_page(request: Request,
                       response_type: FromQuery[str | None] = None, client_id: FromQuery[str | None] = None,
                       redirect_uri: FromQuery[str | None] = None,
                       oauth_scope: Annotated[str | None, QueryParameter(name="scope")] = None,
                       oauth_state: Annotated[str | None, QueryParameter(name="state")] = None, nonce: FromQuery[str | None] = None,
                       code_challenge: FromQuery[str | None] = None, code_challenge_method: FromQuery[str | None] = None) -> Any:
    """The consent page of a third-party client's authorization request (what it will see; allow
    or deny), where /oauth/authorize sends a signed-in person."""
    params = {"response_type": response_type, "client_id": client_id, "redirect_uri": redirect_uri, "scope": oauth_scope,
              "state": oauth_state, "nonce": nonce, "code_challenge": code_challenge,
              "code_challenge_method": code_challenge_method}
    return await decide(request, params, None, None)


@post("/consent")
async def consent(request: Request, data: Annotated[ConsentForm, FORM]) -> Any:
    """The consent page's answer (CSRF-protected): approve or deny, then back to the client."""
    params = {name: getattr(data, name) for name in AUTHORIZE_PARAMS}
    return await decide(request, params, "approve" if data.decision == "approve" else "deny", None)


# ------------------------------------------------------------------------------------------------
# RP-initiated logout
# ------------------------------------------------------------------------------------------------
async def hint_claims(request: Request, id_token_hint: str | None) -> dict[str, Any] | None:
    """The claims of an ID token pgtally signed (an expired one too, as RP-Initiated Logout 1.0
    section 2 allows); None when there is none or it is not pgtally's."""
    if not id_token_hint:
        return None
    try:
        decoded = jwt.decode(id_token_hint, KeySet.import_key_set(await published_keys(request)), algorithms=["RS256"])
        jwt.JWTClaimsRegistry(iss={"essential": True, "value": issuer(request)},
                              sid={"essential": True}).validate(decoded.claims)
        uuid.UUID(decoded.claims["sid"])
        return decoded.claims
    except (JoseError, ValueError, TypeError, KeyError):
        return None


async def finish_logout(request: Request, hint_sid: str | None, client_id: str | None, redirect_uri: str | None,
                        logout_state: str | None) -> Any:
    """api.oidc_end_session, then back to the client's registered post-logout URI or a page."""
    try:
        (result,) = await call(request, "SELECT api.oidc_end_session(%s::uuid, %s::uuid, %s::text, %s::text)",
                               [browser_session(request), hint_sid, client_id, redirect_uri])
    except PgtallyError as exc:
        return page("message.html", request, 400, title="Not signed out", message=problem_text(exc))
    if request.scope.get("session") is not None:
        request.clear_session()
    if result["redirect_uri"]:
        return Redirect(add_params_to_uri(result["redirect_uri"], [("state", logout_state)] if logout_state else []),
                        status_code=303)
    return page("message.html", request, title="Signed out", message="You are signed out of pgtally.",
                link=("/login", "Log in"), signed_in=False)


@get("/oauth/logout")
async def end_session(request: Request, id_token_hint: FromQuery[str | None] = None, client_id: FromQuery[str | None] = None,
                      post_logout_redirect_uri: FromQuery[str | None] = None,
                      logout_state: Annotated[str | None, QueryParameter(name="state")] = None) -> Any:
    """The end_session_endpoint: sign the browser out of pgtally and end the client session the
    ``id_token_hint`` names, then go back to ``post_logout_redirect_uri`` when it is registered
    for the client (with ``state``), else show that the person is signed out. Without a valid
    hint a signed-in person is asked first (RP-Initiated Logout 1.0 section 2): a link alone
    signs nobody out."""
    hint = await hint_claims(request, id_token_hint)
    if hint is None and browser_session(request) is not None:
        # The question is a page of its own: /oauth/ paths carry no CSRF token.
        asked = {"client_id": client_id, "post_logout_redirect_uri": post_logout_redirect_uri, "state": logout_state}
        return Redirect(f"/logout/confirm?{urlencode({k: v for k, v in asked.items() if v})}")
    return await finish_logout(request, hint and hint["sid"], client_id, post_logout_redirect_uri, logout_state)


@get("/logout/confirm")
async def logout_question(request: Request, client_id: FromQuery[str | None] = None,
                          post_logout_redirect_uri: FromQuery[str | None] = None,
                          logout_state: Annotated[str | None, QueryParameter(name="state")] = None) -> Any:
    """Ask a signed-in person whether to sign out, for an app's logout request without an ID token hint."""
    fields = {"client_id": client_id, "post_logout_redirect_uri": post_logout_redirect_uri, "state": logout_state}
    response = page("oidc/logout_confirm.html", request, fields=fields)
    origin = urlsplit(post_logout_redirect_uri or "")
    if origin.scheme in ("https", "http") and origin.netloc:
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            f"form-action 'self' {origin.scheme}://{origin.netloc}; frame-ancestors 'none'; base-uri 'none'; "
            "object-src 'none'")
    return response


class LogoutForm(msgspec.Struct):
    client_id: str | None = None
    post_logout_redirect_uri: str | None = None
    state: str | None = None


@post("/logout/confirm")
async def confirm_logout(request: Request, data: Annotated[LogoutForm, FORM]) -> Any:
    """The answer of the sign-out question (CSRF-protected): sign out, then back to the app."""
    return await finish_logout(request, None, data.client_id or None, data.post_logout_redirect_uri or None,
                               data.state or None)


ROUTES = [discovery, jwks, userinfo]
"""The JSON endpoints (in the OpenAPI document)."""


def router(settings) -> Router:
    """The browser pages of the provider, with the pages' security headers."""
    return Router(path="/", after_request=page_headers(settings), include_in_schema=False,
                  route_handlers=[authorize, consent_page, consent, end_session, logout_question, confirm_logout])


# ------------------------------------------------------------------------------------------------
# CORS for registered clients
# ------------------------------------------------------------------------------------------------
CORS_PATHS = ("/v1/", "/oauth/token", "/oauth/userinfo", "/oauth/jwks", "/.well-known/openid-configuration")
CORS_PREFLIGHT = [(b"access-control-allow-methods", b"GET, POST, PUT, PATCH, DELETE"),
                  (b"access-control-allow-headers", b"Authorization, Content-Type, Idempotency-Key"),
                  (b"access-control-max-age", b"600")]
CORS_EXPOSE = (b"access-control-expose-headers", b"Retry-After, Location, WWW-Authenticate")


async def allowed_origins(app) -> frozenset[str]:
    """The registered clients' origins (api.oidc_cors_origins), read at most every 30 seconds."""
    cached = getattr(app.state, "cors_origins", None)
    if cached and cached[0] > time.monotonic():
        return cached[1]
    async with app.state.pool.connection() as conn:
        (origins,) = await (await conn.execute("SELECT api.oidc_cors_origins()")).fetchone()
    app.state.cors_origins = (time.monotonic() + CORS_CACHE_SECONDS, frozenset(origins))
    return app.state.cors_origins[1]


class ClientCORS:
    """CORS on the JSON API and the token, userinfo, JWKS and discovery endpoints for the origins
    of registered clients only (Fetch standard, CORS protocol): bearer tokens, never credentials
    (no Access-Control-Allow-Credentials, so no cookie is used cross-origin), preflights cached
    10 minutes. An unknown origin gets no CORS header at all, so the browser keeps the answer
    from it. Litestar's CORSConfig has one fixed list; this one follows the clients table."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(CORS_PATHS):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        origin = headers.get(b"origin")
        if origin is None:
            return await self.app(scope, receive, send)
        allowed = origin.decode("latin-1") in await allowed_origins(scope["app"])
        cors = [(b"access-control-allow-origin", origin)] if allowed else []
        if scope["method"] == "OPTIONS" and b"access-control-request-method" in headers:
            await send({"type": "http.response.start", "status": 204,
                        "headers": [*cors, *(CORS_PREFLIGHT if allowed else []), (b"vary", b"Origin")]})
            await send({"type": "http.response.body", "body": b""})
            return

        async def send_with_cors(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *cors, *([CORS_EXPOSE] if allowed else []),
                                                  (b"vary", b"Origin")]}
            await send(message)

        await self.app(scope, receive, send_with_cors)
