"""Teams and the operator's console over HTTP: a team from invitation to metering on it, and every
staff action with its audit row; support is refused an admin's action."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from tests.conftest import reconciliation_problems
from tests.http.conftest import PUBLIC_URL, bearer, form, page_client, pay_and_deliver, webhook


@pytest.fixture
def settings(stripe_mail_settings):
    return stripe_mail_settings

PASSWORD = "violet-harbour-tangent-42"


async def person(client, owner, email: str, staff: str | None = None) -> dict:
    assert (await client.post("/v1/auth/signup", json={"email": email, "password": PASSWORD})).status_code == 202
    user_id, account_id = owner.execute("SELECT id, account_id FROM identity.users WHERE email_normalized = %s", [email]).fetchone()
    owner.execute("SELECT identity.mark_email_verified(%s)", [user_id])
    if staff:
        owner.execute("SELECT api.staff_grant(%s, %s)", [email, staff])
    token = (await client.post("/v1/auth/login", json={"email": email, "password": PASSWORD})).json()["access_token"]
    return {"user_id": str(user_id), "account_id": str(account_id), "token": token, "email": email}


async def test_a_team_invites_by_email_and_its_members_meter_and_buy_on_it(client, owner, smtp, deliver, stripe_api):
    boss = await person(client, owner, "boss@example.com")
    dev = await person(client, owner, "dev@example.com")
    team = (await client.post("/v1/accounts", json={"name": "Acme"}, headers=bearer(boss["token"]))).json()
    assert team["kind"] == "team" and team["role"] == "owner"
    r = await client.post(f"/v1/accounts/{team['id']}/invitations", json={"email": "dev@example.com", "role": "member"},
                          headers=bearer(boss["token"]))
    assert r.status_code == 201 and r.json()["role"] == "member"
    await deliver()
    (mail,) = [m for m in smtp.to("dev@example.com") if "invited you" in m["Subject"]]
    assert mail["Subject"] == "boss@example.com invited you to Acme on pgtally"
    token = smtp.token("dev@example.com", "invited you")
    assert f"{PUBLIC_URL}/invitations/accept?token=" in mail.get_content()
    joined = await client.post("/v1/invitations/accept", json={"token": token}, headers=bearer(dev["token"]))
    assert joined.status_code == 200 and joined.json()["id"] == team["id"]
    assert (await client.post("/v1/invitations/accept", json={"token": token}, headers=bearer(dev["token"]))).status_code == 400
    mine = (await client.get("/v1/accounts", headers=bearer(dev["token"]))).json()["data"]
    assert [(a["kind"], a["role"]) for a in mine] == [("person", "owner"), ("team", "member")]
    members = (await client.get(f"/v1/accounts/{team['id']}/members", headers=bearer(dev["token"]))).json()["data"]
    assert {(m["email"], m["role"]) for m in members} == {("boss@example.com", "owner"), ("dev@example.com", "member")}

    # The member meters on the team, not on their own account; buying needs billing:manage.
    r = await client.post("/v1/usage/events", json={"meter": "generation", "account_id": team["id"]},
                          headers=bearer(dev["token"], **{"Idempotency-Key": "t1"}))
    assert r.status_code == 201 and r.json()["account_id"] == team["id"]
    r = await client.post(f"/v1/billing/checkout?account_id={team['id']}", json={"price": "bundle_10"}, headers=bearer(dev["token"]))
    assert r.status_code == 403 and r.json()["permission"] == "billing:manage"
    await client.patch(f"/v1/accounts/{team['id']}/members/{dev['user_id']}", json={"role": "billing"},
                       headers=bearer(boss["token"]))
    r = await client.post(f"/v1/billing/checkout?account_id={team['id']}", json={"price": "bundle_10"}, headers=bearer(dev["token"]))
    assert r.status_code == 201, r.text
    await pay_and_deliver(client, stripe_api, r.json()["id"])
    balance = (await client.get(f"/v1/balance?account_id={team['id']}", headers=bearer(boss["token"]))).json()
    assert balance["credits"] == "10"
    key = await client.post(f"/v1/api-keys?account_id={team['id']}", json={"name": "ci"}, headers=bearer(boss["token"]))
    assert key.status_code == 201
    r = await client.post("/v1/usage/events", json={"meter": "generation"},
                          headers=bearer(key.json()["api_key"], **{"Idempotency-Key": "t2"}))
    assert r.json()["account_id"] == team["id"]
    assert (await client.delete(f"/v1/accounts/{team['id']}/members/{boss['user_id']}",
                                headers=bearer(boss["token"]))).status_code == 409        # the last owner stays
    assert reconciliation_problems(owner) == {}


def audit_rows(owner) -> list[tuple]:
    return owner.execute("SELECT action, staff_role, reason FROM ops.audit_log ORDER BY id").fetchall()


async def test_every_staff_action_is_audited_and_support_may_not_act_as_admin(client, owner, stripe_api, new_account):
    admin = await person(client, owner, "admin@pgtally.example", staff="admin")
    support = await person(client, owner, "support@pgtally.example", staff="support")
    customer = await person(client, owner, "cust@example.com")
    acct = customer["account_id"]
    assert (await client.get("/v1/admin/accounts?q=cust@", headers=bearer(customer["token"]))).status_code == 403
    found = (await client.get("/v1/admin/accounts?q=cust@", headers=bearer(support["token"]))).json()["data"]
    assert [a["id"] for a in found] == [acct]

    # Credits: support grants a little, never takes back; admin does both; a retry replays.
    grant = lambda who, amount, key: client.post(f"/v1/admin/accounts/{acct}/credits", json={"amount": amount, "reason": "goodwill"},
                                                 headers=bearer(who["token"], **{"Idempotency-Key": key}))
    r = await grant(support, "20", "g1")
    assert r.status_code == 200 and r.json()["balance_after"] == "25" and r.json()["replayed"] is False, r.text
    assert (await grant(support, "20", "g1")).json()["replayed"] is True
    assert (await grant(support, "60", "g2")).status_code == 403
    assert (await grant(support, "-1", "g3")).status_code == 403
    assert (await grant(admin, "-100", "g4")).status_code == 402                     # never below zero
    assert (await grant(admin, "-5", "g5")).json()["balance_after"] == "20"

    # Admin-only actions: support is refused each, admin succeeds.
    for path, body in ((f"/v1/admin/accounts/{acct}/plan", {"plan": "pro", "reason": "partner"}),
                       (f"/v1/admin/accounts/{acct}/suspend", {"reason": "chargebacks"})):
        assert (await client.post(path, json=body, headers=bearer(support["token"]))).status_code == 403
        assert (await client.post(path, json=body, headers=bearer(admin["token"]))).status_code == 200
    view = (await client.get(f"/v1/admin/accounts/{acct}", headers=bearer(support["token"]))).json()
    assert view["plan"] == "pro" and view["suspended"] is True and view["suspended_reason"] == "chargebacks"
    r = await client.post("/v1/usage/events", json={"meter": "generation"},
                          headers=bearer(customer["token"], **{"Idempotency-Key": "s1"}))
    assert r.status_code == 403 and r.json()["type"].endswith("/account-suspended") and r.json()["reason"] == "chargebacks"
    assert (await client.get("/v1/me", headers=bearer(customer["token"]))).status_code == 200   # signing in still works
    why = (await client.get("/v1/billing/subscription", headers=bearer(customer["token"]))).json()["suspended"]
    assert why["reason"] == "chargebacks"
    assert (await client.post(f"/v1/admin/accounts/{acct}/unsuspend", json={"reason": "resolved"},
                              headers=bearer(admin["token"]))).status_code == 200
    r = await client.post("/v1/usage/events", json={"meter": "generation"},
                          headers=bearer(customer["token"], **{"Idempotency-Key": "s2"}))
    assert r.status_code == 201

    # A refund through Stripe: the credits come back out with the charge.refunded webhook.
    session = (await client.post("/v1/billing/checkout", json={"price": "bundle_10"}, headers=bearer(customer["token"]))).json()
    await pay_and_deliver(client, stripe_api, session["id"])
    (pi,) = owner.execute("SELECT stripe_payment_intent_id FROM billing.payments").fetchone()
    assert (await client.post("/v1/admin/refunds", json={"payment_intent": pi, "reason": "x"},
                              headers=bearer(support["token"]))).status_code == 403
    before = len(stripe_api.sent)
    r = await client.post("/v1/admin/refunds", json={"payment_intent": pi, "amount": 250, "reason": "unhappy"},
                          headers=bearer(admin["token"]))
    assert r.status_code == 201 and r.json()["amount"] == 250, r.text
    for event in stripe_api.sent[before:]:
        await webhook(client, event)
    assert owner.execute("SELECT refunded_minor FROM billing.payments").fetchone()[0] == 250
    assert (await client.post("/v1/admin/refunds", json={"payment_intent": pi, "amount": 9999, "reason": "too much"},
                              headers=bearer(admin["token"]))).status_code == 422

    r = await client.post(f"/v1/admin/users/{customer['user_id']}/revoke-sessions", json={"reason": "account takeover"},
                          headers=bearer(admin["token"]))
    assert r.status_code == 200 and r.json()["sessions_revoked"] >= 1
    assert (await client.get("/v1/me", headers=bearer(customer["token"]))).status_code == 401

    assert audit_rows(owner) == [
        ("adjust_credits", "support", "goodwill"), ("adjust_credits", "admin", "goodwill"),
        ("set_plan", "admin", "partner"), ("suspend", "admin", "chargebacks"), ("unsuspend", "admin", "resolved"),
        ("refund", "admin", "unhappy"), ("revoke_sessions", "admin", "account takeover")]
    log = (await client.get("/v1/admin/audit", headers=bearer(admin["token"]))).json()["data"]
    assert log[0]["action"] == "revoke_sessions" and log[-1]["staff_email"] == "support@pgtally.example"
    assert (log[-1]["before"], log[-1]["after"]["credits"]) == ({"credits": "5"}, "25")
    with pytest.raises(psycopg.Error) as refused:
        owner.execute("UPDATE ops.audit_log SET reason = 'tampered'")                # append-only
    assert refused.value.sqlstate == "TL403"
    assert reconciliation_problems(owner) == {}


async def test_staff_endpoints_refuse_customers_and_anonymous_callers(client, owner):
    customer = await person(client, owner, "c2@example.com")
    some = str(uuid.uuid4())
    for method, path in (("GET", "/v1/admin/accounts"), ("GET", f"/v1/admin/accounts/{some}"), ("GET", "/v1/admin/audit")):
        assert (await client.request(method, path, headers=bearer(customer["token"]))).status_code == 403
        assert (await client.request(method, path)).status_code == 401


async def test_the_team_switcher_acts_on_the_team_and_falls_back_when_it_is_no_longer_yours(db_url, settings, owner):

    async with await page_client(db_url, settings) as boss_browser, await page_client(db_url, settings) as dev_browser:
        boss = await person(boss_browser, owner, "boss@example.com")
        dev = await person(dev_browser, owner, "dev@example.com")
        team = (await boss_browser.post("/v1/accounts", json={"name": "Acme"}, headers=bearer(boss["token"]))).json()
        owner.execute("SELECT api.grant_credits(%s, 7000000, 'seed')", [team["id"]])
        await boss_browser.post(f"/v1/accounts/{team['id']}/invitations", json={"email": "dev@example.com"},
                                headers=bearer(boss["token"]))
        token = owner.execute("SELECT payload ->> 'token' FROM outbox.messages WHERE kind = 'invitation'").fetchone()[0]
        await dev_browser.post("/v1/invitations/accept", json={"token": token}, headers=bearer(dev["token"]))
        assert (await form(dev_browser, "/login", {"email": "dev@example.com", "password": PASSWORD})).status_code in (302, 303)
        assert "Acme" in (await dev_browser.get("/teams")).text
        r = await form(dev_browser, "/teams/switch", {"account_id": team["id"]}, "/teams")
        assert r.status_code in (302, 303)
        page = await dev_browser.get("/dashboard")
        assert '<strong id="credits">7</strong>' in page.text          # the team's credits, not their own 5
        await boss_browser.delete(f"/v1/accounts/{team['id']}/members/{dev['user_id']}", headers=bearer(boss["token"]))
        page = await dev_browser.get("/dashboard", follow_redirects=True)
        assert page.status_code == 200 and '<strong id="credits">5</strong>' in page.text
