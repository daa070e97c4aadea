"""Sign in with pgtally in real Chromium (issue 25): an app sends the browser to pgtally's
authorization endpoint and gets it back at its redirect URI with a code, for a first-party app
(password, and Google, with no consent screen) and a third-party one (consent: deny, allow). The
app is a plain HTTP server on this machine; the ID token is checked with PyJWT's PyJWKClient
against pgtally's JWKS over HTTP."""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import jwt as pyjwt
import psycopg
import pytest

from tests.conftest import free_port
from tests.e2e.conftest import PASSWORD


@pytest.fixture(scope="module")
def app_server():
    """The relying party's callback: any page that answers, at http://127.0.0.1:PORT/callback."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"the app got its answer")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def register(site, name: str, redirect: str, first_party: bool, public: bool) -> dict:
    with psycopg.connect(site["url"], autocommit=True) as conn:
        return conn.execute("SELECT api.oidc_create_client(%s, %s, %s, %s)", [name, [redirect], public, first_party]).fetchone()[0]


def start(site, app: dict, redirect: str, state: str) -> tuple[str, str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    nonce = secrets.token_urlsafe(12)
    url = f"{site['base']}/oauth/authorize?" + urlencode({
        "response_type": "code", "client_id": app["client_id"], "redirect_uri": redirect, "scope": "openid email",
        "state": state, "nonce": nonce, "code_challenge": challenge, "code_challenge_method": "S256"})
    return url, verifier, nonce


def came_back(page, redirect: str) -> dict[str, str]:
    page.wait_for_url(re.compile("^" + re.escape(redirect) + r"\?"))
    return {k: v[0] for k, v in parse_qs(urlsplit(page.url).query).items()}


def id_token_claims(site, app: dict, redirect: str, code: str, verifier: str, nonce: str) -> dict:
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect, "code_verifier": verifier,
            "client_id": app["client_id"]}
    auth = (app["client_id"], app["client_secret"]) if app["client_secret"] else None
    if auth:
        del data["client_id"]
    r = httpx.post(f"{site['base']}/oauth/token", data=data, auth=auth)
    assert r.status_code == 200, r.text
    token = r.json()["id_token"]
    key = pyjwt.PyJWKClient(f"{site['base']}/oauth/jwks").get_signing_key_from_jwt(token)
    claims = pyjwt.decode(token, key.key, algorithms=["RS256"], audience=app["client_id"], issuer=site["base"])
    assert claims["nonce"] == nonce
    return claims


def test_item6_first_party_app_signs_in_with_a_password_and_with_google_in_chromium(page, site, app_server):
    redirect = f"{app_server}/callback"
    app = register(site, "Web app", redirect, first_party=True, public=True)
    assert httpx.post(f"{site['base']}/v1/auth/signup", json={"email": "oidc-ada@example.com", "password": PASSWORD}
                      ).status_code == 202
    url, verifier, nonce = start(site, app, redirect, "s-password")
    page.goto(url)
    page.get_by_label("Email").fill("oidc-ada@example.com")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    params = came_back(page, redirect)
    assert params["state"] == "s-password" and params["iss"] == site["base"]
    assert id_token_claims(site, app, redirect, params["code"], verifier, nonce)["email"] == "oidc-ada@example.com"

    page.context.clear_cookies()
    url, verifier, nonce = start(site, app, redirect, "s-google")
    page.goto(url)
    page.get_by_role("link", name="Continue with Google").click()
    page.locator("input[name=sub]").fill("g-grace")
    page.locator("input[name=sub]").press("Enter")
    params = came_back(page, redirect)
    assert params["state"] == "s-google"
    assert id_token_claims(site, app, redirect, params["code"], verifier, nonce)["email"] == "grace@example.com"


def test_item6_third_party_app_asks_for_consent_in_chromium(page, site, app_server):
    redirect = f"{app_server}/partner"
    app = register(site, "Partner Tool", redirect, first_party=False, public=False)
    assert httpx.post(f"{site['base']}/v1/auth/signup", json={"email": "oidc-bea@example.com", "password": PASSWORD}
                      ).status_code == 202
    url, verifier, nonce = start(site, app, redirect, "s-deny")
    page.goto(url)
    page.get_by_label("Email").fill("oidc-bea@example.com")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.get_by_role("heading", name=re.compile("Allow Partner Tool")).wait_for()
    page.get_by_role("button", name="Deny").click()
    assert came_back(page, redirect)["error"] == "access_denied"

    url, verifier, nonce = start(site, app, redirect, "s-allow")
    page.goto(url)
    page.get_by_role("button", name="Allow").click()
    params = came_back(page, redirect)
    assert params["state"] == "s-allow"
    assert id_token_claims(site, app, redirect, params["code"], verifier, nonce)["email"] == "oidc-bea@example.com"
