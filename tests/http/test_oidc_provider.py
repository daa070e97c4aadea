"""pgtally as an OpenID Connect provider (issue 25), driven over HTTP as a relying party would:
discovery, the authorization code flow with PKCE (first-party, and third-party with consent),
the token endpoint's code and refresh grants and their refusals (RFC 6749 section 5.2), the
JWKS and key rotation, userinfo, RP-initiated logout, client-scoped access tokens on the JSON
API, every sign-in way inside the flow, and CORS for registered origins.

The ID token is checked by an independent validator: PyJWT, with the keys from /oauth/jwks."""

from __future__ import annotations

import hashlib
import html
import json
import re
import secrets
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import jwt as pyjwt
import pytest
from click.testing import CliRunner

from api.cli import main
from tests.http.conftest import BASE, PASSWORD, bearer, form, github_login, google
from tests.oidc_client import CLAIMS, EXTENSION, LOGOUT, PARTNER, WEB, answer, authorize_path, exchange, pkce, register, validate_id_token


@pytest.fixture
def settings(provider_settings):
    """The sign-in tests' settings: Google and GitHub configured."""
    return provider_settings


def links(page: httpx.Response, start: str) -> list[str]:
    """The ``next`` of each link of a page that starts with ``start``."""
    hrefs = [html.unescape(h) for h in re.findall(r'href="([^"]+)"', page.text) if html.unescape(h).startswith(start)]
    return [parse_qs(urlsplit(h).query)["next"][0] for h in hrefs]


async def sign_up_and_log_in(client, email: str = "ada@example.com", next_path: str | None = None) -> httpx.Response:
    assert (await client.post("/v1/auth/signup", json={"email": email, "password": PASSWORD})).status_code == 202
    fields = {"email": email, "password": PASSWORD} | ({"next": next_path} if next_path else {})
    page_path = f"/login?{urlencode({'next': next_path})}" if next_path else "/login"
    return await form(client, "/login", fields, page_path)


async def first_party_tokens(client, owner, scope: str = "openid email profile usage:read") -> tuple[dict, dict]:
    app = register(owner, "Web app", WEB, public=True, first_party=True, logout=(LOGOUT,))
    verifier, challenge = pkce()
    path = authorize_path(app["client_id"], WEB, challenge, scope)
    await sign_up_and_log_in(client, next_path=path)
    code = answer(await client.get(path, follow_redirects=False), WEB)["code"]
    r = await exchange(client, code, WEB, verifier, app["client_id"])
    assert r.status_code == 200, r.text
    return app, r.json()


async def test_item1_discovery_names_every_endpoint(client, monkeypatch):
    from authlib.oidc.discovery import OpenIDProviderMetadata

    r = await client.get("/.well-known/openid-configuration")
    assert r.status_code == 200
    doc = r.json()
    monkeypatch.setenv("AUTHLIB_INSECURE_TRANSPORT", "1")     # the test server's issuer is plain http
    OpenIDProviderMetadata(doc).validate()
    assert doc["issuer"] == BASE and doc["jwks_uri"] == f"{BASE}/oauth/jwks"
    assert doc["code_challenge_methods_supported"] == ["S256"] and doc["response_types_supported"] == ["code"]
    for endpoint in ("authorization_endpoint", "token_endpoint", "userinfo_endpoint", "end_session_endpoint"):
        assert doc[endpoint].startswith(BASE + "/oauth/")
    keys = (await client.get("/oauth/jwks")).json()["keys"]
    assert len(keys) == 1 and keys[0]["kty"] == "RSA" and keys[0]["kid"] and "d" not in keys[0]


async def test_item1_first_party_code_flow_with_pkce_signed_out_visitor_comes_back(client, owner):
    app = register(owner, "Web app", WEB, public=True, first_party=True)
    verifier, challenge = pkce()
    path = authorize_path(app["client_id"], WEB, challenge, "openid email profile usage:read", state="xyz", nonce="abc")
    r = await client.get(path, follow_redirects=False)
    assert r.status_code in (302, 303) and r.headers["location"].startswith("/login?next=")
    assert parse_qs(urlsplit(r.headers["location"]).query)["next"] == [path]

    back = await sign_up_and_log_in(client, next_path=path)
    assert back.headers["location"] == path                    # the login comes back to the request
    params = answer(await client.get(path, follow_redirects=False), WEB)   # first-party: no consent
    assert params["state"] == "xyz" and params["iss"] == BASE

    r = await exchange(client, params["code"], WEB, verifier, app["client_id"])
    assert r.status_code == 200, r.text
    tokens = r.json()
    assert r.headers["cache-control"] == "no-store"
    assert tokens["token_type"] == "bearer" and tokens["refresh_token"] and tokens["scope"] == "email openid profile usage:read"
    claims = await validate_id_token(client, tokens["id_token"], app["client_id"], "abc")
    (user_id, account_id) = owner.execute("SELECT id::text, account_id::text FROM identity.users").fetchone()
    assert claims["sub"] == user_id and claims["email"] == "ada@example.com" and claims["email_verified"] is False
    assert claims["name"] == "ada@example.com" and isinstance(claims["auth_time"], int)
    assert claims[CLAIMS] == {"account_id": account_id, "plan": "free", "teams": []}

    info = await client.get("/oauth/userinfo", headers=bearer(tokens["access_token"]))
    assert info.status_code == 200 and info.json()["sub"] == user_id and info.json()["email"] == "ada@example.com"
    assert (await client.get("/v1/me", headers=bearer(tokens["access_token"]))).json()["account"]["id"] == account_id


async def test_item1_third_party_client_asks_for_consent_approve_and_deny(client, owner):
    partner = register(owner, "Partner Tool", PARTNER)              # confidential, third-party
    await sign_up_and_log_in(client)
    path = authorize_path(partner["client_id"], PARTNER, None, "openid email", state="s-deny")
    to_consent = await client.get(path, follow_redirects=False)
    assert to_consent.headers["location"] == "/authorize/consent?" + path.partition("?")[2]
    path = to_consent.headers["location"]
    page = await client.get(path, follow_redirects=False)
    assert page.status_code == 200 and "Partner Tool" in page.text and "See your email address" in page.text
    assert "form-action 'self' https://partner.example.net" in page.headers["content-security-policy"]
    fields = dict(state="s-deny", client_id=partner["client_id"], redirect_uri=PARTNER, response_type="code",
                  scope="openid email", nonce="n-1")
    denied = await form(client, "/consent", {**fields, "decision": "deny"}, path)
    assert answer(denied, PARTNER) == {"error": "access_denied", "error_description": "the person did not allow Partner Tool",
                                       "state": "s-deny", "iss": BASE}

    approved = await form(client, "/consent", {**fields, "state": "s-ok", "decision": "approve"}, path)
    params = answer(approved, PARTNER)
    assert params["state"] == "s-ok"
    r = await exchange(client, params["code"], PARTNER, None, partner["client_id"], partner["client_secret"], basic=True)
    assert r.status_code == 200, r.text
    claims = await validate_id_token(client, r.json()["id_token"], partner["client_id"], "n-1")
    assert "name" not in claims and claims["email"] == "ada@example.com"      # only the granted scopes
    assert owner.execute("SELECT count(*) FROM identity.auth_events WHERE kind = 'oidc_consent_denied'").fetchone()[0] == 1


async def test_item1_refresh_rotates_and_reuse_revokes_the_session(client, owner):
    app, tokens = await first_party_tokens(client, owner)
    refresh = {"grant_type": "refresh_token", "client_id": app["client_id"]}
    r = await client.post("/oauth/token", data={**refresh, "refresh_token": tokens["refresh_token"]})
    assert r.status_code == 200, r.text
    rotated = r.json()
    assert rotated["refresh_token"] != tokens["refresh_token"]
    claims = await validate_id_token(client, rotated["id_token"], app["client_id"], None)
    assert claims["sub"] == (await validate_id_token(client, tokens["id_token"], app["client_id"], "n-1"))["sub"]

    # A client's refresh token works only with that client: not on /v1/auth/refresh, not for another.
    other = register(owner, "Other", PARTNER, public=True)
    r = await client.post("/oauth/token", data={**refresh, "client_id": other["client_id"], "refresh_token": rotated["refresh_token"]})
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
    assert (await client.post("/v1/auth/refresh", json={"refresh_token": rotated["refresh_token"]})).status_code == 401

    owner.execute("UPDATE identity.refresh_tokens SET used_at = used_at - interval '1 minute' WHERE used_at IS NOT NULL")
    r = await client.post("/oauth/token", data={**refresh, "refresh_token": tokens["refresh_token"]})
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant" and "revoked" in r.json()["error_description"]
    r = await client.post("/oauth/token", data={**refresh, "refresh_token": rotated["refresh_token"]})
    assert r.json()["error"] == "invalid_grant"
    assert (await client.get("/oauth/userinfo", headers=bearer(rotated["access_token"]))).status_code == 401


async def test_item1_refusals_use_the_rfc6749_error_codes(client, owner):
    web = register(owner, "Web app", WEB, public=True, first_party=True)
    partner = register(owner, "Partner", PARTNER, first_party=True)
    await sign_up_and_log_in(client)
    verifier, challenge = pkce()

    # A redirect URI that is not registered exactly: shown, never redirected to.
    for wrong in (WEB + "/", WEB + "?x=1", "https://evil.example/callback"):
        r = await client.get(authorize_path(web["client_id"], wrong, challenge), follow_redirects=False)
        assert r.status_code == 400 and "not one registered" in r.text and "location" not in r.headers
    r = await client.get(authorize_path("pgc_nosuchclientnosuchclient00", WEB, challenge), follow_redirects=False)
    assert r.status_code == 400 and "location" not in r.headers
    # A public client without PKCE, or with the plain method.
    assert answer(await client.get(authorize_path(web["client_id"], WEB, None), follow_redirects=False), WEB)["error"] == "invalid_request"
    plain = authorize_path(web["client_id"], WEB, None, code_challenge=verifier[:43], code_challenge_method="plain")
    assert answer(await client.get(plain, follow_redirects=False), WEB)["error"] == "invalid_request"
    assert answer(await client.get(authorize_path(web["client_id"], WEB, challenge, "openid admin"), follow_redirects=False),
                  WEB)["error"] == "invalid_scope"
    assert answer(await client.get(authorize_path(web["client_id"], WEB, challenge, response_type="token"),
                                   follow_redirects=False), WEB)["error"] == "unsupported_response_type"

    async def code_for(app, redirect, chal):
        return answer(await client.get(authorize_path(app["client_id"], redirect, chal), follow_redirects=False), redirect)["code"]

    # Token endpoint: each refusal burns the code (single use).
    async def refused(status, error, **kw):
        r = await exchange(client, **kw)
        assert (r.status_code, r.json()["error"]) == (status, error), r.text
        return r

    await refused(400, "invalid_grant", code=await code_for(web, WEB, challenge), redirect=PARTNER, verifier=verifier,
                  client_id=web["client_id"])                                   # another redirect URI
    await refused(400, "invalid_grant", code=await code_for(web, WEB, challenge), redirect=WEB, verifier=None,
                  client_id=web["client_id"])                                   # PKCE verifier missing
    await refused(400, "invalid_grant", code=await code_for(web, WEB, challenge), redirect=WEB, verifier=pkce()[0],
                  client_id=web["client_id"])                                   # wrong verifier
    await refused(400, "invalid_grant", code=await code_for(partner, PARTNER, None), redirect=PARTNER, verifier=verifier,
                  client_id=partner["client_id"], secret=partner["client_secret"])   # verifier without a challenge
    r = await refused(401, "invalid_client", code=await code_for(partner, PARTNER, None), redirect=PARTNER, verifier=None,
                      client_id=partner["client_id"], secret="pgcs_wrong", basic=True)
    assert r.headers["www-authenticate"].startswith("Basic")
    await refused(401, "invalid_client", code="x", redirect=PARTNER, verifier=None, client_id=partner["client_id"])
    await refused(400, "invalid_grant", code=await code_for(partner, PARTNER, None), redirect=PARTNER, verifier=None,
                  client_id=web["client_id"])                                   # issued to another client
    expired = await code_for(web, WEB, challenge)
    owner.execute("UPDATE identity.authorization_codes SET expires_at = now() - interval '1 second' WHERE used_at IS NULL")
    await refused(400, "invalid_grant", code=expired, redirect=WEB, verifier=verifier, client_id=web["client_id"])

    # A replayed code is refused and the tokens its first exchange gave are revoked.
    code = await code_for(web, WEB, challenge)
    first = await exchange(client, code, WEB, verifier, web["client_id"])
    assert first.status_code == 200
    await refused(400, "invalid_grant", code=code, redirect=WEB, verifier=verifier, client_id=web["client_id"])
    assert (await client.get("/oauth/userinfo", headers=bearer(first.json()["access_token"]))).status_code == 401

    r = await client.post("/oauth/token", data={"grant_type": "password", "username": "a", "password": "b"})
    assert (r.status_code, r.json()["error"]) == (400, "unsupported_grant_type")


async def test_item1_logout_ends_the_browser_and_client_sessions(client, owner):
    app, tokens = await first_party_tokens(client, owner)
    # Not registered: refused, nobody signed out.
    r = await client.get("/oauth/logout?" + urlencode({"id_token_hint": tokens["id_token"],
                                                       "post_logout_redirect_uri": "https://evil.example/"}),
                         follow_redirects=False)
    assert r.status_code == 400 and (await client.get("/account", follow_redirects=False)).status_code == 200
    # Without an ID token hint a link alone signs nobody out: the person is asked.
    ask = f"/oauth/logout?{urlencode({'client_id': app['client_id'], 'post_logout_redirect_uri': LOGOUT})}"
    r = await client.get(ask, follow_redirects=False)
    assert r.status_code in (302, 303) and r.headers["location"].startswith("/logout/confirm?")
    r = await client.get(r.headers["location"], follow_redirects=False)
    assert r.status_code == 200 and "<h1>Sign out?</h1>" in r.text
    assert "form-action 'self' https://web.example.org" in r.headers["content-security-policy"]
    assert (await client.get("/account", follow_redirects=False)).status_code == 200
    r = await client.get("/oauth/logout?" + urlencode({"id_token_hint": tokens["id_token"], "post_logout_redirect_uri": LOGOUT,
                                                       "state": "bye"}), follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == LOGOUT + "?state=bye"
    assert (await client.get("/account", follow_redirects=False)).headers["location"].startswith("/login")
    assert (await client.get("/oauth/userinfo", headers=bearer(tokens["access_token"]))).status_code == 401
    r = await client.post("/oauth/token", data={"grant_type": "refresh_token", "client_id": app["client_id"],
                                                "refresh_token": tokens["refresh_token"]})
    assert r.json()["error"] == "invalid_grant"


async def test_item1_logout_without_a_hint_asks_then_returns_to_a_registered_uri(client, owner):
    app, tokens = await first_party_tokens(client, owner)
    ask = f"/oauth/logout?{urlencode({'client_id': app['client_id'], 'post_logout_redirect_uri': LOGOUT, 'state': 's'})}"
    ask = (await client.get(ask, follow_redirects=False)).headers["location"]
    r = await form(client, "/logout/confirm", {"client_id": app["client_id"], "post_logout_redirect_uri": LOGOUT,
                                              "state": "s"}, ask)
    assert r.status_code == 303 and r.headers["location"] == LOGOUT + "?state=s"
    assert (await client.get("/account", follow_redirects=False)).headers["location"].startswith("/login")
    # The browser's sign-in ended; the app's own session is the app's to end (with the hint).
    assert (await client.get("/oauth/userinfo", headers=bearer(tokens["access_token"]))).status_code == 200


async def test_item1_signing_key_rotation_keeps_tokens_in_flight_valid(client, owner):
    from joserfc.jwk import RSAKey
    from psycopg.types.json import Jsonb

    app, tokens = await first_party_tokens(client, owner)
    old_kid = pyjwt.get_unverified_header(tokens["id_token"])["kid"]
    key = RSAKey.generate_key(2048, private=True)
    owner.execute("SELECT api.oidc_add_signing_key(%s, %s, %s, true)",
                  [key.thumbprint(), Jsonb(key.as_dict(private=True)), Jsonb(key.as_dict(private=False))])
    client.app.state.oidc_signing_key = None                 # as 5 minutes later, when the cache expires
    r = await client.post("/oauth/token", data={"grant_type": "refresh_token", "client_id": app["client_id"],
                                                "refresh_token": tokens["refresh_token"]})
    new_token = r.json()["id_token"]
    assert pyjwt.get_unverified_header(new_token)["kid"] == key.thumbprint() != old_kid
    kids = [k["kid"] for k in (await client.get("/oauth/jwks")).json()["keys"]]
    assert kids == [key.thumbprint(), old_kid]
    await validate_id_token(client, tokens["id_token"], app["client_id"], "n-1")   # in flight: still valid
    await validate_id_token(client, new_token, app["client_id"], None)
    # 75 minutes after the rotation every token of the old key has expired: it is no longer published.
    owner.execute("UPDATE identity.signing_keys SET created_at = created_at - interval '76 minutes'")
    assert [k["kid"] for k in (await client.get("/oauth/jwks")).json()["keys"]] == [key.thumbprint()]


def test_item2_clients_command_creates_lists_and_revokes(db_url, monkeypatch, owner):
    monkeypatch.setenv("DATABASE_URL", db_url)
    runner = CliRunner()

    def pgtally(*args, ok=True):
        result = runner.invoke(main, list(args), catch_exceptions=False)
        assert (result.exit_code == 0) == ok, result.output
        return result.output

    made = json.loads(pgtally("clients", "create", "--name", "Partner", "--redirect-uri", PARTNER, "--json"))
    assert made["client_id"].startswith("pgc_") and made["client_secret"].startswith("pgcs_")
    stored = owner.execute("SELECT secret_hash FROM identity.oauth_clients WHERE id = %s", [made["client_id"]]).fetchone()[0]
    assert bytes(stored) == hashlib.sha256(made["client_secret"].encode()).digest()     # only the hash is kept
    ext = pgtally("clients", "create", "--name", "Extension", "--redirect-uri", EXTENSION, "--public", "--first-party",
                  "--origin", "chrome-extension://abcdefghijklmnopabcdefghijklmnop")
    assert "client id      pgc_" in ext and "secret" not in ext.replace("no secret", "")
    assert "is not an https URI" in pgtally("clients", "create", "--name", "X", "--redirect-uri", "http://evil.example/cb", ok=False)
    assert "is not an https URI" in pgtally("clients", "create", "--name", "X", "--redirect-uri", WEB + "#frag", ok=False)
    listed = json.loads(pgtally("clients", "list", "--json"))
    assert [(c["name"], c["public"], c["first_party"]) for c in listed] == [("Partner", False, False), ("Extension", True, True)]
    assert "revoked" in pgtally("clients", "revoke", made["client_id"])
    assert "no active client" in pgtally("clients", "revoke", made["client_id"], ok=False)
    assert "(confidential, revoked" in pgtally("clients", "list")
    assert "new signing key" in pgtally("clients", "rotate-key")


async def test_item2_a_revoked_client_signs_nobody_in_and_its_tokens_end(client, owner):
    app, tokens = await first_party_tokens(client, owner)
    owner.execute("SELECT api.oidc_revoke_client(%s)", [app["client_id"]])
    assert (await client.get("/oauth/userinfo", headers=bearer(tokens["access_token"]))).status_code == 401
    r = await client.get(authorize_path(app["client_id"], WEB, pkce()[1]), follow_redirects=False)
    assert r.status_code == 400 and "location" not in r.headers


async def test_item3_client_access_tokens_hold_only_their_scopes(client, owner):
    app, tokens = await first_party_tokens(client, owner, scope="openid usage:read")
    token = bearer(tokens["access_token"])
    assert (await client.get("/v1/me", headers=token)).status_code == 200          # usage:read granted
    r = await client.get("/v1/balance", headers=token)                                # usage:read on the JSON API
    assert r.status_code == 200, r.text
    # Nor does it act as the person: no API keys, sessions or teams.
    for method, path in (("GET", "/v1/api-keys"), ("GET", "/v1/me/sessions"), ("POST", "/v1/accounts")):
        r = await client.request(method, path, headers=token, json={"name": "Team"} if method == "POST" else None)
        assert r.status_code == 403 and "cannot manage the account" in r.json()["detail"], (path, r.text)
    r = await client.post("/v1/usage/events", headers={**token, "Idempotency-Key": "k1"},
                          json={"meter": "generation", "quantity": 1})
    assert r.status_code == 403 and "usage:write" in r.json()["detail"]

    verifier, challenge = pkce()
    path = authorize_path(app["client_id"], WEB, challenge, "openid")
    code = answer(await client.get(path, follow_redirects=False), WEB)["code"]
    only_openid = (await exchange(client, code, WEB, verifier, app["client_id"])).json()
    assert (await client.get("/v1/me", headers=bearer(only_openid["access_token"]))).status_code == 403
    assert (await client.get("/oauth/userinfo", headers=bearer(only_openid["access_token"]))).status_code == 200


async def test_item4_every_sign_in_way_returns_to_the_authorization_request(client, owner):
    app = register(owner, "Web app", WEB, public=True, first_party=True)
    verifier, challenge = pkce()
    path = authorize_path(app["client_id"], WEB, challenge)
    login = (await client.get(path, follow_redirects=False)).headers["location"]
    next_path = parse_qs(urlsplit(login).query)["next"][0]
    assert next_path == path

    # Google (a real OpenID Connect provider) and GitHub carry the request through their round trip.
    back = await google(client, "g-ada", f"/auth/google/start?{urlencode({'next': next_path})}")
    assert back.headers["location"] == path
    assert answer(await client.get(path, follow_redirects=False), WEB)["code"]
    client.cookies.clear()
    back = await github_login(client, f"/auth/github/start?{urlencode({'next': next_path})}")
    assert back.headers["location"] == path
    assert answer(await client.get(path, follow_redirects=False), WEB)["code"]

    # Sign-up: the login page links to it with the request, and its answer leads back through login.
    client.cookies.clear()
    page = await client.get(login)
    assert links(page, "/signup?next=") == [path]
    signup_page = f"/signup?{urlencode({'next': path})}"
    assert "/auth/google/start?next=" in (await client.get(signup_page)).text
    r = await form(client, "/signup", {"email": "new@example.com", "password": PASSWORD, "next": path}, signup_page)
    assert r.status_code == 200 and "Check your email" in r.text
    assert links(r, "/login?next=") == [path]
    r = await form(client, "/login", {"email": "new@example.com", "password": PASSWORD, "next": path}, login)
    assert r.headers["location"] == path
    assert answer(await client.get(path, follow_redirects=False), WEB)["code"]

    # Team SSO's start keeps the request too (the provider's round trip is Google's above).
    sso = await client.get(f"/auth/sso/start?{urlencode({'email': 'kim@corp.example', 'next': path})}",
                           follow_redirects=False)
    assert sso.status_code == 404                       # no team here signs in through its own provider


async def test_item5_cors_for_registered_origins_only(client, owner):
    register(owner, "Web app", WEB, public=True, first_party=True)
    register(owner, "Extension", EXTENSION, public=True, origins=("chrome-extension://abcdefghijklmnopabcdefghijklmnop",))
    preflight = {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"}
    for origin in ("https://web.example.org", "chrome-extension://abcdefghijklmnopabcdefghijklmnop",
                   "https://abcdefghijklmnopabcdefghijklmnop.chromiumapp.org"):
        r = await client.options("/v1/me", headers={"Origin": origin, **preflight})
        assert r.status_code == 204 and r.headers["access-control-allow-origin"] == origin
        assert "Authorization" in r.headers["access-control-allow-headers"] and r.headers["access-control-max-age"] == "600"
        assert "access-control-allow-credentials" not in r.headers and r.headers["vary"] == "Origin"
    r = await client.options("/v1/me", headers={"Origin": "https://evil.example", **preflight})
    assert not [h for h in r.headers if h.startswith("access-control-")]
    r = await client.options("/oauth/token", headers={"Origin": "https://web.example.org", "Access-Control-Request-Method": "POST"})
    assert r.headers["access-control-allow-origin"] == "https://web.example.org"

    got = await client.get("/v1/me", headers={"Origin": "https://web.example.org"})
    assert got.status_code == 401 and got.headers["access-control-allow-origin"] == "https://web.example.org"
    got = await client.get("/v1/me", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in got.headers
    assert "access-control-allow-origin" not in (await client.get("/login", headers={"Origin": "https://web.example.org"})).headers


async def test_item1_a_standard_client_library_signs_in_as_the_readme_shows(client, owner):
    """authlib's OAuth 2.0 client, as a relying party's backend uses it (README, "Use pgtally as
    your app's login"); the ID token is still checked by PyJWT."""
    import warnings

    from authlib.deprecate import AuthlibDeprecationWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AuthlibDeprecationWarning)
        from authlib.integrations.httpx_client import AsyncOAuth2Client

    app = register(owner, "Web app", WEB, first_party=True)
    await sign_up_and_log_in(client)
    meta = (await client.get("/.well-known/openid-configuration")).json()
    rp = AsyncOAuth2Client(app["client_id"], app["client_secret"], scope="openid email profile usage:read",
                           redirect_uri=WEB, code_challenge_method="S256",
                           transport=httpx.ASGITransport(app=client.app), base_url=BASE)
    verifier, nonce = secrets.token_urlsafe(48), secrets.token_urlsafe(16)
    url, state = rp.create_authorization_url(meta["authorization_endpoint"], code_verifier=verifier, nonce=nonce)
    callback = (await client.get(url.removeprefix(BASE), follow_redirects=False)).headers["location"]
    token = await rp.fetch_token(meta["token_endpoint"], authorization_response=callback, code_verifier=verifier)
    claims = await validate_id_token(client, token["id_token"], app["client_id"], nonce)
    assert claims["email"] == "ada@example.com"
    me = await rp.get(f"{BASE}/v1/me")
    assert me.status_code == 200 and me.json()["user"]["email"] == "ada@example.com"
    await rp.aclose()


async def test_item1_prompt_none_and_the_same_site_step_back_to_the_app(client, owner):
    web = register(owner, "Web app", WEB, public=True, first_party=True)
    partner = register(owner, "Partner", PARTNER)
    _, challenge = pkce()
    # prompt=none never shows a page: login_required, then consent_required.
    path = authorize_path(web["client_id"], WEB, challenge, prompt="none")
    assert answer(await client.get(path, follow_redirects=False), WEB)["error"] == "login_required"
    await sign_up_and_log_in(client)
    path = authorize_path(partner["client_id"], PARTNER, None, prompt="none", state="q")
    assert answer(await client.get(path, follow_redirects=False), PARTNER) == {"error": "consent_required", "state": "q",
                                                                               "iss": BASE}
    # Right after a sign-in form (a same-site step), the way back is a page that moves on by
    # itself: Chromium would hold the form's CSP form-action against a redirect to the app.
    r = await client.get(authorize_path(web["client_id"], WEB, challenge), headers={"Sec-Fetch-Site": "same-origin"},
                         follow_redirects=False)
    assert r.status_code == 200 and 'http-equiv="refresh"' in r.text
    target = html.unescape(re.search(r'id="continue" href="([^"]+)"', r.text).group(1))
    assert target.startswith(WEB + "?code=")


async def test_item2_a_browser_extension_signs_in_as_a_public_client(client, owner):
    """What chrome.identity.launchWebAuthFlow does: the authorize URL, back at the extension's
    https://<extension-id>.chromiumapp.org/ with the code, then the token endpoint called from the
    extension's own origin (CORS), with PKCE and no secret."""
    ext = register(owner, "Extension", EXTENSION, public=True, first_party=True,
                   origins=("chrome-extension://abcdefghijklmnopabcdefghijklmnop",))
    assert ext["client_secret"] is None
    verifier, challenge = pkce()
    path = authorize_path(ext["client_id"], EXTENSION, challenge, "openid email usage:read usage:write")
    await sign_up_and_log_in(client, next_path=path)
    code = answer(await client.get(path, follow_redirects=False), EXTENSION)["code"]
    origin = {"Origin": "chrome-extension://abcdefghijklmnopabcdefghijklmnop"}
    preflight = await client.options("/oauth/token", headers={**origin, "Access-Control-Request-Method": "POST"})
    assert preflight.headers["access-control-allow-origin"] == origin["Origin"]
    r = await client.post("/oauth/token", headers=origin, data={
        "grant_type": "authorization_code", "code": code, "redirect_uri": EXTENSION, "code_verifier": verifier,
        "client_id": ext["client_id"]})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin["Origin"]
    me = await client.get("/v1/me", headers={**origin, **bearer(r.json()["access_token"])})
    assert me.status_code == 200 and me.json()["user"]["email"] == "ada@example.com"
    # A secret it does not have is not accepted in place of PKCE either.
    code = answer(await client.get(path, follow_redirects=False), EXTENSION)["code"]
    r = await exchange(client, code, EXTENSION, verifier, ext["client_id"], secret="pgcs_guess")
    assert (r.status_code, r.json()["error"]) == (401, "invalid_client")
