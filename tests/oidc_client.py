"""A relying party's side of pgtally's OpenID Connect provider, for tests: register a client,
PKCE, the authorization URL, the answer at the redirect URI, the code exchange, and an
independent check of the ID token (PyJWT with the keys from /oauth/jwks, not pgtally's code)."""

from __future__ import annotations

import base64
import hashlib
import secrets
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import jwt as pyjwt

from tests.http.conftest import BASE

WEB = "https://web.example.org/callback"

PARTNER = "https://partner.example.net/oidc/cb"

EXTENSION = "https://abcdefghijklmnopabcdefghijklmnop.chromiumapp.org/"

LOGOUT = "https://web.example.org/signed-out"

CLAIMS = "https://pgtally.dev/claims"

def register(owner, name: str, redirect: str, public: bool = False, first_party: bool = False,
             origins: tuple[str, ...] = (), logout: tuple[str, ...] = ()) -> dict:
    (found,) = owner.execute("SELECT api.oidc_create_client(%s, %s, %s, %s, %s, %s)",
                             [name, [redirect], public, first_party, list(origins), list(logout)]).fetchone()
    return found

def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge

def authorize_path(client_id: str, redirect: str, challenge: str | None, scope: str = "openid email profile",
                   state: str = "st-1", nonce: str = "n-1", **extra: str) -> str:
    params = {"response_type": "code", "client_id": client_id, "redirect_uri": redirect, "scope": scope,
              "state": state, "nonce": nonce, **extra}
    if challenge:
        params |= {"code_challenge": challenge, "code_challenge_method": "S256"}
    return "/oauth/authorize?" + urlencode(params)

def answer(response: httpx.Response, redirect: str) -> dict[str, str]:
    """The parameters the browser was sent back to the client's redirect URI with."""
    assert response.status_code in (302, 303), response.text
    location = response.headers["location"]
    assert location.startswith(redirect + "?"), location
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}

async def exchange(client, code: str, redirect: str, verifier: str | None, client_id: str,
                   secret: str | None = None, basic: bool = False) -> httpx.Response:
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect}
    if verifier:
        data["code_verifier"] = verifier
    auth = None
    if basic:
        auth = (client_id, secret)
    else:
        data["client_id"] = client_id
        if secret:
            data["client_secret"] = secret
    return await client.post("/oauth/token", data=data, auth=auth)

async def validate_id_token(client, token: str, audience: str, nonce: str | None) -> dict:
    """PyJWT, not pgtally's code: the signature by the JWKS key of the header's kid, iss, aud, exp
    (and iat, required), then the nonce (OpenID Connect Core section 3.1.3.7)."""
    jwks = (await client.get("/oauth/jwks")).json()
    kid = pyjwt.get_unverified_header(token)["kid"]
    key = pyjwt.PyJWKSet.from_dict(jwks)[kid]
    claims = pyjwt.decode(token, key.key, algorithms=["RS256"], audience=audience, issuer=BASE,
                          options={"require": ["iss", "sub", "aud", "exp", "iat"]})
    assert claims.get("nonce") == nonce
    return claims
