"""Sign-in through Google (a real OpenID Connect provider: oidc-provider-mock) and GitHub (a
GitHub-shaped stand-in), the pages' cookies, CSRF and headers, and the device authorization
grant (RFC 8628), all through the app over its real database."""

from __future__ import annotations

import asyncio
import re
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from litestar.testing import AsyncTestClient

from api.app import create_app
from api.settings import Settings
from tests.http.conftest import BASE, PASSWORD, form, github_login, google


@pytest.fixture
def settings(provider_settings):
    return provider_settings


def events(owner, kind: str) -> int:
    return owner.execute("SELECT count(*) FROM identity.auth_events WHERE kind = %s", [kind]).fetchone()[0]


async def test_first_google_sign_in_creates_a_verified_user_then_signs_them_in_again(client, owner):
    r = await google(client, "g-ada")
    assert r.status_code in (302, 303) and r.headers["location"] == "/account", r.text
    account = await client.get("/account")
    assert account.status_code == 200 and "ada@example.com" in account.text and "confirmed" in account.text
    (user_id, verified, plan) = owner.execute(
        "SELECT u.id, u.email_verified_at IS NOT NULL, a.plan_id FROM identity.users u "
        "JOIN identity.accounts a ON a.id = u.account_id").fetchone()
    assert verified and plan == "free"
    assert owner.execute("SELECT provider, subject FROM identity.user_identities").fetchall() == [("google", "g-ada")]

    client.cookies.clear()
    assert (await google(client, "g-ada")).headers["location"] == "/account"
    assert owner.execute("SELECT count(*) FROM identity.users").fetchone()[0] == 1
    assert (events(owner, "oauth_signup"), events(owner, "oauth_sign_in")) == (1, 1)
    assert owner.execute("SELECT method FROM identity.sessions ORDER BY created_at").fetchall() == [("google",)] * 2


async def test_a_verified_provider_email_links_to_the_existing_user(client, owner):
    assert (await client.post("/v1/auth/signup", json={"email": "ada@example.com", "password": PASSWORD})).status_code == 202
    r = await google(client, "g-ada")
    assert r.headers["location"] == "/account"
    assert owner.execute("SELECT count(*) FROM identity.users").fetchone()[0] == 1
    assert events(owner, "oauth_linked") == 1


async def test_an_unverified_provider_email_never_links_to_an_existing_user(client, owner):
    assert (await client.post("/v1/auth/signup", json={"email": "eve@example.com", "password": PASSWORD})).status_code == 202
    r = await google(client, "g-eve")
    assert r.status_code == 400 and "sign in with your password" in r.text
    assert owner.execute("SELECT count(*) FROM identity.user_identities").fetchone()[0] == 0
    assert events(owner, "oauth_refused") == 1
    assert "pgtally_session" not in r.cookies


async def test_a_callback_in_another_browser_or_a_replayed_one_is_refused(client, db_url, settings, owner):
    r = await client.get("/auth/google/start", follow_redirects=False)
    back = urlsplit(httpx.post(r.headers["location"], data={"sub": "g-ada"}, follow_redirects=False).headers["location"])
    callback = f"{back.path}?{back.query}"
    async with AsyncTestClient(app=create_app(db_url, settings), base_url=BASE) as other:
        refused = await other.get(callback, follow_redirects=False)
    assert refused.status_code == 400 and "another browser" in refused.text
    # The state is used up: not even the right browser can use it now.
    assert (await client.get(callback, follow_redirects=False)).status_code == 400
    forged = await client.get("/auth/google/callback?state=forged&code=x", follow_redirects=False)
    assert forged.status_code == 400
    assert events(owner, "oauth_refused") == 3 and owner.execute("SELECT count(*) FROM identity.users").fetchone()[0] == 0


async def test_a_replayed_code_is_refused_by_the_provider(client, owner):
    r = await client.get("/auth/github/start", follow_redirects=False)
    back = urlsplit(httpx.get(r.headers["location"], follow_redirects=False).headers["location"])
    code = parse_qs(back.query)["code"][0]
    assert (await client.get(f"{back.path}?{back.query}", follow_redirects=False)).status_code in (302, 303)
    # A new flow (new state, this browser) with the old code: GitHub refuses the code.
    r = await client.get("/auth/github/start", follow_redirects=False)
    state = parse_qs(urlsplit(r.headers["location"]).query)["state"][0]
    again = await client.get(f"/auth/github/callback?state={state}&code={code}", follow_redirects=False)
    assert again.status_code == 400 and "refused" in again.text


async def test_github_signs_up_with_its_primary_verified_email(client, owner):
    r = await github_login(client)
    assert r.headers["location"] == "/account", r.text
    assert owner.execute("SELECT email, email_verified_at IS NOT NULL FROM identity.users").fetchone() == \
        ("octo@example.com", True)
    assert owner.execute("SELECT provider, subject FROM identity.user_identities").fetchone() == ("github", "4242")


async def test_a_provider_error_is_shown_and_signs_nobody_in(client, github, owner):
    github.deny = True
    r = await github_login(client)
    assert r.status_code == 400 and "did not sign you in" in r.text and "access_denied" in r.text
    assert owner.execute("SELECT count(*) FROM identity.users").fetchone()[0] == 0


async def test_unlink_only_while_another_way_to_sign_in_remains(client, owner):
    await google(client, "g-ada")
    r = await form(client, "/account/providers/google/unlink", {}, "/account")
    assert r.status_code == 200 and "only way to sign in" in r.text
    # Link GitHub from the account page, then Google may go.
    r = await github_login(client, "/auth/github/start?link=true")
    assert r.headers["location"] == "/account"
    assert {p for (p,) in owner.execute("SELECT provider FROM identity.user_identities")} == {"google", "github"}
    r = await form(client, "/account/providers/google/unlink", {}, "/account")
    assert r.status_code in (302, 303)
    assert owner.execute("SELECT provider FROM identity.user_identities").fetchall() == [("github",)]
    assert (events(owner, "oauth_linked"), events(owner, "oauth_unlinked")) == (1, 1)


async def test_unconfigured_providers_are_not_offered(db_url, smtp):
    async with AsyncTestClient(app=create_app(db_url, Settings(public_url=BASE)), base_url=BASE) as bare:
        page = await bare.get("/login")
        assert "Continue with" not in page.text
        assert (await bare.get("/auth/google/start", follow_redirects=False)).status_code == 404


async def test_password_pages_with_csrf_and_security_headers(client, smtp, deliver, owner):
    page = await client.get("/login")
    assert page.status_code == 200 and "Continue with Google" in page.text and "Continue with GitHub" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["referrer-policy"] == "no-referrer"
    # No CSRF token: refused.
    r = await client.post("/login", data={"email": "a@example.com", "password": PASSWORD}, follow_redirects=False)
    assert r.status_code == 403

    r = await form(client, "/signup", {"email": "ada@example.com", "password": PASSWORD})
    assert r.status_code == 200 and "Check your email" in r.text
    assert await deliver() == 1
    token = smtp.token("ada@example.com", "Confirm")
    verify = await client.get(f"/verify-email?token={token}")
    assert "Confirm my email address" in verify.text       # a button: opening the link uses nothing
    assert owner.execute("SELECT email_verified_at FROM identity.users").fetchone()[0] is None
    r = await form(client, "/verify-email", {"token": token}, f"/verify-email?token={token}")
    assert r.status_code == 200 and "confirmed" in r.text

    wrong = await form(client, "/login", {"email": "ada@example.com", "password": "nope-nope-nope"})
    assert wrong.status_code == 401 and "not right" in wrong.text
    ok = await form(client, "/login", {"email": "ada@example.com", "password": PASSWORD, "next": "/device"})
    assert ok.status_code in (302, 303) and ok.headers["location"] == "/device"
    cookie = [c for c in ok.headers.get_list("set-cookie") if c.startswith("pgtally_session=")][0]
    assert "httponly" in cookie.lower() and "samesite=lax" in cookie.lower()
    assert (await client.get("/account")).status_code == 200
    r = await form(client, "/logout", {}, "/account")
    assert r.headers["location"] == "/login"
    assert (await client.get("/account", follow_redirects=False)).headers["location"].startswith("/login")


async def test_account_page_creates_shows_once_and_revokes_api_keys(client, owner):
    await google(client, "g-ada")
    r = await form(client, "/account/api-keys", {"name": "laptop"}, "/account")
    key = re.search(r'<code id="new-key">(pgt_[^<]+)</code>', r.text).group(1)
    assert (await client.get("/v1/balance", headers={"Authorization": f"Bearer {key}"})).status_code == 200
    assert key not in (await client.get("/account")).text
    (key_id,) = owner.execute("SELECT id FROM identity.api_keys").fetchone()
    await form(client, f"/account/api-keys/{key_id}/revoke", {}, "/account")
    assert (await client.get("/v1/balance", headers={"Authorization": f"Bearer {key}"})).status_code == 401


async def test_every_link_pgtally_sends_or_shows_leads_to_a_page(client, smtp, deliver):
    from api.web import TEMPLATES as PAGES
    from api.worker import TEMPLATES

    links = set()
    for _subject, body in TEMPLATES.values():
        links |= set(re.findall(r"\{public_url\}(/[\w/-]*)", body))
    for template in PAGES.glob("*.html"):
        links |= {link for link in re.findall(r'(?:href|action)="(/[^"{]*)"', template.read_text())}
    links |= {"/billing/success", "/billing/cancel", "/billing", "/upgrade"}    # Stripe returns, 402 answers
    await google(client, "g-ada")          # signed in, so the account's own pages answer too
    assert len(links) > 10
    for link in sorted(links):
        r = await client.get(link, follow_redirects=False)
        if r.status_code == 405:            # a form's action: it answers POST, and exists
            continue
        if link.startswith("/admin"):       # the operators' pages answer a customer with a 403 page
            assert r.status_code == 403 and "Staff only" in r.text, (link, r.status_code)
            continue
        assert r.status_code in (200, 302, 303), (link, r.status_code)


# Device authorization grant --------------------------------------------------------------------

GRANT = "urn:ietf:params:oauth:grant-type:device_code"


async def poll(client, device_code: str, client_id: str = "pgtally-cli") -> httpx.Response:
    return await client.post("/oauth/token", data={"grant_type": GRANT, "device_code": device_code, "client_id": client_id})


async def test_device_grant_pending_slow_down_approve_and_one_token_pair(client, owner):
    r = await client.post("/oauth/device_authorization", data={"client_id": "pgtally-cli", "scope": "usage"})
    assert r.status_code == 200, r.text
    grant = r.json()
    assert re.fullmatch(r"[BCDFGHJKLMNPQRSTVWXZ]{4}-[BCDFGHJKLMNPQRSTVWXZ]{4}", grant["user_code"])
    assert grant["verification_uri"] == f"{BASE}/device" and grant["expires_in"] == 600 and grant["interval"] == 5
    assert grant["verification_uri_complete"] == f"{BASE}/device?user_code={grant['user_code']}"

    first = await poll(client, grant["device_code"])
    assert first.status_code == 400 and first.json()["error"] == "authorization_pending"
    assert first.headers["cache-control"] == "no-store"
    assert (await poll(client, grant["device_code"])).json()["error"] == "slow_down"

    await google(client, "g-ada")
    page = await client.get(f"/device?user_code={grant['user_code']}")
    assert grant["user_code"] in page.text
    shown = await form(client, "/device", {"user_code": grant["user_code"].lower().replace("-", "")}, "/device")
    assert "pgtally-cli" in shown.text and "Approve" in shown.text
    approved = await form(client, "/device/decide", {"user_code": grant["user_code"], "decision": "approve"}, "/device")
    assert "approved" in approved.text
    again = await form(client, "/device/decide", {"user_code": grant["user_code"], "decision": "approve"}, "/device")
    assert again.status_code == 400                          # decided once

    owner.execute("UPDATE identity.device_codes SET last_polled_at = NULL")
    responses = await asyncio.gather(*[poll(client, grant["device_code"]) for _ in range(20)])
    tokens = [r.json() for r in responses if r.status_code == 200]
    assert len(tokens) == 1, [r.json() for r in responses]
    assert {r.json()["error"] for r in responses if r.status_code != 200} <= {"slow_down", "invalid_grant"}
    me = await client.get("/v1/me", headers={"Authorization": f"Bearer {tokens[0]['access_token']}"})
    assert me.json()["user"]["email"] == "ada@example.com"
    refreshed = await client.post("/oauth/token", data={"grant_type": "refresh_token",
                                                        "refresh_token": tokens[0]["refresh_token"]})
    assert refreshed.status_code == 200 and refreshed.json()["refresh_token"] != tokens[0]["refresh_token"]
    assert events(owner, "device_code_issued") == 1


async def test_device_grant_denied_expired_and_unknown(client, owner):
    await google(client, "g-ada")
    denied = (await client.post("/oauth/device_authorization", data={"client_id": "pgtally-cli"})).json()
    await form(client, "/device/decide", {"user_code": denied["user_code"], "decision": "deny"}, "/device")
    assert (await poll(client, denied["device_code"])).json()["error"] == "access_denied"

    late = (await client.post("/oauth/device_authorization", data={"client_id": "pgtally-cli"})).json()
    owner.execute("UPDATE identity.device_codes SET expires_at = now() - interval '1 second' WHERE status = 'pending'")
    assert (await poll(client, late["device_code"])).json()["error"] == "expired_token"
    r = await form(client, "/device", {"user_code": late["user_code"]}, "/device")
    assert r.status_code == 400 and "no waiting request" in r.text.lower()

    assert (await poll(client, "not-a-code")).json()["error"] == "invalid_grant"
    assert (await poll(client, denied["device_code"], client_id="another")).json()["error"] == "invalid_grant"
    r = await client.post("/oauth/token", data={"grant_type": "password"})
    assert r.status_code == 400 and r.json()["error"] == "unsupported_grant_type"


async def test_wrong_user_codes_are_rate_limited(frozen_db_clock, client):
    await google(client, "g-ada")
    statuses = [(await form(client, "/device", {"user_code": "BBBB-BBBB"}, "/device")).status_code for _ in range(22)]
    assert statuses[:20] == [400] * 20 and statuses[-1] == 400
    last = await form(client, "/device", {"user_code": "BBBB-BBBB"}, "/device")
    assert "too many" in last.text.lower()


async def test_approving_merges_the_command_lines_anonymous_install_once(client, owner):
    install = (await client.post("/v1/identify", json={"install_id": "cli-install-0123456789abcdef"})).json()
    used = await client.post("/v1/usage/events", json={"meter": "generation", "quantity": 2},
                             headers={"Authorization": f"Bearer {install['access_token']}", "Idempotency-Key": "cli-1"})
    assert used.status_code == 201
    grant = (await client.post("/oauth/device_authorization", data={"client_id": "pgtally-cli"},
                               headers={"Authorization": f"Bearer {install['access_token']}"})).json()
    await google(client, "g-ada")
    await form(client, "/device/decide", {"user_code": grant["user_code"], "decision": "approve"}, "/device")
    owner.execute("UPDATE identity.device_codes SET last_polled_at = NULL")
    tokens = (await poll(client, grant["device_code"])).json()
    balance = (await client.get("/v1/balance", headers={"Authorization": f"Bearer {tokens['access_token']}"})).json()
    assert balance["allowances"][0]["used"] == 2
    assert events(owner, "device_merged") == 1


async def test_a_browser_that_carried_an_anonymous_device_merges_it_at_first_sign_in(client, owner):
    device = (await client.post("/v1/identify", json={"install_id": "ext-install-0123456789abcdef"})).json()
    r = await client.post("/v1/usage/events", json={"meter": "generation", "quantity": 3},
                          headers={"Authorization": f"Bearer {device['access_token']}", "Idempotency-Key": "x1"})
    assert r.status_code == 201
    handoff = (await client.post("/v1/identify/handoff", headers={"Authorization": f"Bearer {device['access_token']}"})).json()
    login_page = await client.get(f"/login?handoff={handoff['code']}")
    assert handoff["code"] not in login_page.text and device["access_token"] not in login_page.text
    await google(client, "g-ada")
    me = owner.execute("SELECT a.id FROM identity.users u JOIN identity.accounts a ON a.id = u.account_id").fetchone()[0]
    assert owner.execute("SELECT merged_into FROM identity.accounts WHERE id = %s", [device["account_id"]]).fetchone()[0] == me
    assert owner.execute("SELECT count(*) FROM metering.usage_events WHERE account_id = %s", [me]).fetchone()[0] == 1




async def test_item3_an_install_hands_its_sign_in_to_the_browser_by_a_single_use_code(client, owner):
    device = (await client.post("/v1/identify", json={"install_id": "ext-install-0123456789abcdef"})).json()
    auth = {"Authorization": f"Bearer {device['access_token']}"}
    assert (await client.post("/v1/usage/events", json={"meter": "generation"},
                              headers={**auth, "Idempotency-Key": "h1"})).status_code == 201
    r = await client.post("/v1/identify/handoff", headers=auth)
    assert r.status_code == 201 and r.json()["expires_in"] == 600, r.text
    handoff = r.json()
    assert handoff["login_url"].endswith(f"/login?handoff={handoff['code']}")
    # An access token in the URL does nothing any more.
    await client.get(f"/login?device_token={device['access_token']}")
    assert events(owner, "device_merged") == 0
    # The page claims the code once; the sign-in in that browser merges the install.
    assert (await client.get(f"/login?handoff={handoff['code']}")).status_code == 200
    assert owner.execute("SELECT count(*) FROM identity.handoff_codes WHERE claimed_at IS NOT NULL").fetchone()[0] == 1
    await google(client, "g-ada")
    assert events(owner, "device_merged") == 1
    person = owner.execute("SELECT account_id FROM identity.users").fetchone()[0]
    assert owner.execute("SELECT merged_into FROM identity.accounts WHERE id = %s",
                         [device["account_id"]]).fetchone()[0] == person
    # The install now answers for its person.
    again = (await client.post("/v1/identify", json={"install_id": "ext-install-0123456789abcdef"})).json()
    assert again["account_id"] == str(person)


async def test_item3_a_handoff_code_works_once_and_only_for_an_anonymous_install(client, owner, new_account):
    device = (await client.post("/v1/identify", json={"install_id": "ext-install-0123456789abcdef"})).json()
    code = (await client.post("/v1/identify/handoff",
                              headers={"Authorization": f"Bearer {device['access_token']}"})).json()["code"]
    assert (await client.get(f"/login?handoff={code}")).status_code == 200
    client.cookies.clear()                                # another browser, with the same link
    await client.get(f"/login?handoff={code}")            # replayed: this browser carries no install
    await google(client, "g-ada")
    assert events(owner, "device_merged") == 0
    key = new_account()["api_key"]
    r = await client.post("/v1/identify/handoff", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 403
