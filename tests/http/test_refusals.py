"""Issue 22, items 7, 8 and 12: refusals are answered, logged and counted as what they are; page
forms refuse bad fields in the page; small API fixes (problem status, holds by account, scope
dedupe, no-store on secrets)."""

from __future__ import annotations

import logging
import uuid

from tests.http.conftest import bearer, form, page_client, samples


def http_requests(text: str, route: str) -> dict[str, float]:
    return {dict(labels)["status"]: value for labels, value in samples(text, "pgtally_http_requests_total").items()
            if dict(labels)["route"] == route and dict(labels)["method"] == "POST"}


async def test_item7_refusals_are_logged_and_counted_as_what_they_are(client, caplog):
    caplog.set_level(logging.INFO, logger="pgtally.http")
    before = http_requests((await client.get("/metrics")).text, "/login")
    await client.get("/login")                                # the CSRF cookie, but no token sent back
    refused = await client.post("/login", data={"email": "a@example.com", "password": "x"}, headers={"X-Request-Id": "csrf-1"})
    assert refused.status_code == 403 and refused.headers["x-request-id"] == "csrf-1"
    assert refused.headers["content-type"].startswith("application/problem+json")
    malformed = await client.post("/login", content=b"--nope\r\nnot a part",
                                  headers={"Content-Type": "multipart/form-data; boundary=nope", "X-Request-Id": "mp-1"})
    assert malformed.status_code == 400 and malformed.headers["x-request-id"] == "mp-1", malformed.text
    logged = {r.request_id: r.status for r in caplog.records if r.name == "pgtally.http" and r.getMessage() == "request"}
    assert logged["csrf-1"] == 403 and logged["mp-1"] == 400
    after = http_requests((await client.get("/metrics")).text, "/login")
    assert after.get("403", 0) - before.get("403", 0) == 1
    assert after.get("400", 0) - before.get("400", 0) == 1
    assert after.get("500", 0) == before.get("500", 0)


PASSWORD = "violet-harbour-tangent-42"
CREDIT = 1_000_000


async def signed_up(client, owner, email: str) -> dict:
    """A verified person, logged in over the JSON API: its login answer."""
    assert (await client.post("/v1/auth/signup", json={"email": email, "password": PASSWORD})).status_code == 202
    owner.execute("SELECT identity.mark_email_verified(id) FROM identity.users WHERE email_normalized = %s", [email])
    r = await client.post("/v1/auth/login", json={"email": email, "password": PASSWORD})
    assert r.status_code == 200, r.text
    return r


async def test_item12_conflict_problems_carry_status_as_a_number(client, new_account):
    key = new_account("free", 10 * CREDIT)["api_key"]
    auth = lambda idem=None: bearer(key, **({"Idempotency-Key": idem} if idem else {}))
    released = (await client.post("/v1/holds", json={"meter": "generation", "quantity": 2}, headers=auth("a"))).json()
    assert (await client.post(f"/v1/holds/{released['id']}/release", headers=auth())).status_code == 200
    captured = (await client.post("/v1/holds", json={"meter": "generation", "quantity": 2}, headers=auth("b"))).json()
    assert (await client.post(f"/v1/holds/{captured['id']}/capture", json={}, headers=auth())).status_code == 200
    for path, hold_status in [(f"/v1/holds/{released['id']}/capture", "released"),
                              (f"/v1/holds/{captured['id']}/release", "captured")]:
        r = await client.post(path, json={}, headers=auth())
        problem = r.json()
        assert r.status_code == 409 and problem["status"] == 409, problem
        assert problem["hold_status"] == hold_status and problem["type"].endswith("/conflict")


async def test_item12_holds_list_honours_account_id(client, owner, new_account):
    service = owner.execute("SELECT api.create_account('free', 0, 'backend', 'service')").fetchone()[0]["api_key"]
    customer = new_account("free", 10 * CREDIT)
    held = await client.post("/v1/holds", json={"meter": "generation", "quantity": 2, "account_id": customer["account_id"]},
                             headers=bearer(service, **{"Idempotency-Key": "svc-h"}))
    assert held.status_code == 201, held.text
    listed = await client.get("/v1/holds", params={"account_id": customer["account_id"]}, headers=bearer(service))
    assert listed.status_code == 200 and [h["id"] for h in listed.json()["data"]] == [held.json()["id"]]
    assert (await client.get("/v1/holds", headers=bearer(service))).json()["data"] == []     # its own account's
    bad = await client.get("/v1/holds", params={"account_id": "not-a-uuid"}, headers=bearer(service))
    assert bad.status_code == 400
    # A customer's key cannot read another account's holds.
    other = new_account("free")["api_key"]
    r = await client.get("/v1/holds", params={"account_id": customer["account_id"]}, headers=bearer(other))
    assert r.status_code == 403


async def test_item12_api_key_scopes_are_stored_once(client, owner):
    token = (await signed_up(client, owner, "keys@example.com")).json()["access_token"]
    r = await client.post("/v1/api-keys", json={"name": "ci", "scopes": ["usage:write"] * 1000 + ["usage:read", "usage:write"]},
                          headers=bearer(token))
    assert r.status_code == 201 and r.json()["scopes"] == ["usage:write", "usage:read"]
    assert owner.execute("SELECT scopes FROM identity.api_keys WHERE id = %s", [r.json()["id"]]).fetchone()[0] == \
        ["usage:write", "usage:read"]
    logged = owner.execute("SELECT detail -> 'scopes' FROM identity.auth_events WHERE kind = 'api_key_created'").fetchone()[0]
    assert logged == ["usage:write", "usage:read"]


async def test_item12_answers_carrying_a_secret_are_not_stored(client, owner):
    def no_store(r) -> bool:
        return r.status_code in (200, 201) and "no-store" in r.headers.get("cache-control", "")

    login = await signed_up(client, owner, "secret@example.com")
    tokens = login.json()
    identified = await client.post("/v1/identify", json={"fingerprint": "fp-secret"})
    refreshed = await client.post("/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    key = await client.post("/v1/api-keys", json={"name": "ci"}, headers=bearer(refreshed.json()["access_token"]))
    device = await client.post("/oauth/device_authorization", data={"client_id": "pgtally-cli"})
    answers = {"login": login, "identify": identified, "refresh": refreshed, "api key": key, "device code": device}
    assert [name for name, r in answers.items() if not no_store(r)] == [], {n: (r.status_code, r.headers) for n, r in answers.items()}


LONG = "x" * 10_000
STATE = {"users": "SELECT count(*) FROM identity.users", "accounts": "SELECT count(*) FROM identity.accounts",
         "sessions": "SELECT count(*) FROM identity.sessions WHERE revoked_at IS NULL",
         "memberships": "SELECT count(*), string_agg(role, ',' ORDER BY role) FROM identity.memberships",
         "invitations": "SELECT count(*) FROM identity.invitations",
         "api_keys": "SELECT count(*) FROM identity.api_keys", "audit": "SELECT count(*) FROM ops.audit_log",
         "transfers": "SELECT count(*) FROM ledger.transfers", "outbox": "SELECT count(*) FROM outbox.messages"}


def state(owner) -> dict:
    return {name: owner.execute(sql).fetchone() for name, sql in STATE.items()}


async def test_item8_page_forms_refuse_long_or_malformed_fields_in_the_page(db_url, settings, owner):
    async with await page_client(db_url, settings) as browser:
        # Signed out: the login, sign-up and reset forms.
        signed_out = [("/login", {"email": LONG, "password": PASSWORD}),
                      ("/login", {"email": "ada@example.com", "password": LONG}),
                      ("/signup", {"email": LONG, "password": PASSWORD}),
                      ("/reset-password", {"email": LONG}),
                      ("/verify-email", {"token": LONG}),
                      ("/reset-password/confirm", {"token": LONG, "password": PASSWORD})]
        await signed_up(browser, owner, "ada@example.com")
        owner.execute("SELECT api.staff_grant('ada@example.com', 'admin')")
        await signed_up(browser, owner, "bob@example.com")
        ada, bob = [owner.execute("SELECT id, account_id FROM identity.users WHERE email_normalized = %s", [e]).fetchone()
                    for e in ("ada@example.com", "bob@example.com")]
        before = state(owner)
        refused = []
        for path, fields in signed_out:
            refused.append((path, fields, await form(browser, path, fields, "/login")))

        signed_in = await form(browser, "/login", {"email": "ada@example.com", "password": PASSWORD})
        assert signed_in.status_code in (302, 303), signed_in.text
        team = await form(browser, "/teams", {"name": "Acme"})
        team_id = team.headers["location"].rsplit("/", 1)[-1]
        before = state(owner)
        after_sign_in = [
            ("/device", {"user_code": LONG}, "/device"),
            ("/device/decide", {"user_code": LONG, "decision": "approve"}, "/device"),
            ("/account/api-keys", {"name": LONG}, "/account"),
            ("/teams", {"name": LONG}, "/teams"),
            (f"/teams/{team_id}/members/{bob[0]}/role", {"role": "emperor"}, f"/teams/{team_id}"),
            (f"/teams/{team_id}/members/{uuid.uuid4()}/remove", {}, f"/teams/{team_id}"),
            (f"/teams/{team_id}/invitations/{uuid.uuid4()}/revoke", {}, f"/teams/{team_id}"),
            (f"/teams/{team_id}/invitations", {"email": LONG, "role": "member"}, f"/teams/{team_id}"),
            ("/invitations/accept", {"token": LONG}, "/teams"),
            (f"/admin/accounts/{bob[1]}/refund", {"payment_intent": "pi_123", "amount": "abc", "reason": "r"},
             f"/admin/accounts/{bob[1]}"),
            (f"/admin/accounts/{bob[1]}/refund", {"payment_intent": LONG, "reason": "r"}, f"/admin/accounts/{bob[1]}"),
            (f"/admin/accounts/{bob[1]}/credits", {"amount": "abc", "reason": "r"}, f"/admin/accounts/{bob[1]}"),
            (f"/admin/accounts/{bob[1]}/credits", {"amount": "5", "reason": LONG}, f"/admin/accounts/{bob[1]}"),
            (f"/admin/accounts/{bob[1]}/credits", {"amount": "5", "reason": "r", "key": LONG},
             f"/admin/accounts/{bob[1]}"),
            ("/upgrade/checkout", {"price": LONG}, "/upgrade"),
            ("/upgrade/change", {"price": LONG}, "/upgrade"),
            ("/dashboard/topup", {"price": LONG}, "/dashboard"),
            (f"/admin/accounts/{bob[1]}/plan", {"plan": LONG, "reason": "r"}, f"/admin/accounts/{bob[1]}"),
            (f"/admin/accounts/{bob[1]}/suspend", {"reason": LONG}, f"/admin/accounts/{bob[1]}"),
            (f"/admin/accounts/{bob[1]}/revoke-sessions", {"user_id": "not-a-uuid", "reason": "r"},
             f"/admin/accounts/{bob[1]}"),
        ]
        for path, fields, page_path in after_sign_in:
            refused.append((path, fields, await form(browser, path, fields, page_path)))
        wrong = [(path[:60], {k: v[:20] for k, v in fields.items()}, r.status_code, r.headers.get("content-type"))
                 for path, fields, r in refused
                 if not (400 <= r.status_code < 500 and r.headers.get("content-type", "").startswith("text/html"))]
        assert wrong == [], "\n".join(map(str, wrong))
        shown = {(path, tuple(fields)): r.text for path, fields, r in refused}
        assert "Email: expected str of length &lt;= 320" in refused[0][2].text
        assert "Amount: expected int" in shown[(f"/admin/accounts/{bob[1]}/refund", ("payment_intent", "amount", "reason"))]
        # An id that is not one in a page's path matches no page: 404, never a 500.
        token = (await browser.get(f"/teams/{team_id}")).text.split('name="_csrf_token" value="')[1].split('"')[0]
        r = await browser.post(f"/teams/{team_id}/members/not-a-uuid/remove", data={"_csrf_token": token})
        assert r.status_code == 404
        assert state(owner) == before
