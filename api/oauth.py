"""Sign-in with Google (OpenID Connect) and GitHub (OAuth 2.0 and its user API), through authlib's
httpx client: authorization code flow with PKCE (S256, RFC 7636), a state bound to the browser
and a nonce bound to the ID token. The state, its single use, and who the provider account
becomes (sign in, link, sign up) are decided in PostgreSQL (sql/functions/55_sign_in.sql).

A provider is offered only when its client id and secret are configured; the issuer (Google)
and base URLs (GitHub) can point at local stand-ins for tests and offline use."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from authlib.deprecate import AuthlibDeprecationWarning

with warnings.catch_warnings():
    # authlib 1.9 announces its move to httpx2 on import (its own filter says "always"); the
    # pinned httpx client is the one used.
    warnings.simplefilter("ignore", AuthlibDeprecationWarning)
    from authlib.integrations.httpx_client import AsyncOAuth2Client
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from litestar import Request

from api import outbound
from api.errors import PgtallyError

BINDING_COOKIE = "pgtally_oauth"
NAMES = {"google": "Google", "github": "GitHub", "sso": "Your organisation's sign-in"}


@dataclass(frozen=True)
class Identity:
    """Who the provider says signed in."""

    subject: str
    email: str | None
    email_verified: bool


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
        # GitHub's answers, read as its REST API documents them (a shape error is OutboundError).
        primary = next((e for e in emails if e.get("primary")), None) or next(iter(emails), None)
        email, verified = (primary.get("email"), bool(primary.get("verified"))) if primary else (None, False)
        subject = user["id"]
    return identity_of("github", subject, email, verified)
