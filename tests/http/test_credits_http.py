"""Credits that come from somewhere, over HTTP: a referral from its /r/ link to the reward, the
sign-up bonus, credit lots and the balance's pending and expiring credits, and a refund that
claws back from the lot it bought."""

from __future__ import annotations

import pytest

from tests.conftest import reconciliation_problems
from tests.http.conftest import PASSWORD, PUBLIC_URL, bearer, form, page_client, pay_and_deliver, webhook
from tests.stripe_standin import Events


@pytest.fixture
def settings(stripe_mail_settings):
    return stripe_mail_settings


async def sign_up_and_log_in(client, email: str, **body) -> str:
    r = await client.post("/v1/auth/signup", json={"email": email, "password": PASSWORD, **body})
    assert r.status_code == 202, r.text
    return (await client.post("/v1/auth/login", json={"email": email, "password": PASSWORD})).json()["access_token"]


async def test_a_referral_link_leads_to_a_sign_up_and_the_first_payment_rewards_the_referrer(
        db_url, settings, stripe_api, smtp, deliver, owner):
    # The test client speaks from one address for everyone: let the same-IP rule look back 0 days.
    owner.execute("UPDATE billing.referral_program SET same_ip_window = '0'")
    async with await page_client(db_url, settings) as alice_browser:
        alice = await sign_up_and_log_in(alice_browser, "alice@example.com")
        mine = (await alice_browser.get("/v1/referrals", headers=bearer(alice))).json()
        assert mine["link"] == f"{PUBLIC_URL}/r/{mine['code']}" and mine["referrals"] == []
        assert mine["program"] == {"qualify_on": "first_payment", "referrer_credits": "10", "referee_credits": "0",
                                   "holdback_days": 14, "monthly_cap": 20}

    async with await page_client(db_url, settings) as bob_browser:
        r = await bob_browser.get(f"/r/{mine['code']}", follow_redirects=False)
        assert r.status_code in (302, 303) and r.headers["location"] == "/signup"
        assert (await bob_browser.get("/r/someoneelse", follow_redirects=False)).status_code in (302, 303)
        assert "You were invited" in (await bob_browser.get("/signup")).text
        r = await form(bob_browser, "/signup", {"email": "bob@example.com", "password": PASSWORD})
        assert r.status_code == 200 and "Check your email" in r.text
        await deliver()
        verified = await bob_browser.post("/v1/auth/verify-email", json={"token": smtp.token("bob@example.com", "Confirm")})
        assert verified.status_code == 200
        bob = (await bob_browser.post("/v1/auth/login", json={"email": "bob@example.com", "password": PASSWORD})).json()["access_token"]
        balance = (await bob_browser.get("/v1/balance", headers=bearer(bob))).json()
        assert (balance["credits"], balance["pending"], balance["next_expiry"]) == ("5", "0", None)   # the sign-up bonus
        session = (await bob_browser.post("/v1/billing/checkout", json={"price": "bundle_10"}, headers=bearer(bob))).json()
        await pay_and_deliver(bob_browser, stripe_api, session["id"])
        lots = (await bob_browser.get("/v1/credits/lots", headers=bearer(bob))).json()
        assert [(x["source"], x["status"], x["remaining"]) for x in lots["data"]] == [
            ("purchase", "active", "10"), ("signup_bonus", "active", "5")]
        assert (await bob_browser.get("/v1/credits/lots?status=gone", headers=bearer(bob))).status_code == 422

        mine = (await bob_browser.get("/v1/referrals", headers=bearer(alice))).json()
        (row,) = mine["referrals"]
        assert (row["referee"], row["status"], row["credits"], row["credits_status"]) == ("b***@example.com", "rewarded",
                                                                                          "10", "pending")
        assert (mine["earned"], mine["pending"]) == ("0", "10")
        assert (await bob_browser.get("/v1/balance", headers=bearer(alice))).json()["pending"] == "10"
    assert reconciliation_problems(owner) == {}


async def test_a_device_has_no_referral_link(client, owner):
    device = (await client.post("/v1/identify", json={"install_id": "install-referral-0123456789ab"})).json()
    r = await client.get("/v1/referrals", headers=bearer(device["access_token"]))
    assert r.status_code == 409 and r.headers["content-type"].startswith("application/problem+json")


async def test_a_refund_claws_back_from_the_lot_it_bought_first(client, new_account, owner):
    acct = new_account("free")
    owner.execute("SELECT ledger.grant_lot(%s, 'promotion', 5000000, 'promo', 'promo', now(), now() + interval '3 days')",
                  [acct["account_id"]])
    session = {"id": "cs_lot", "object": "checkout.session", "mode": "payment", "payment_status": "paid",
               "customer": "cus_lot", "client_reference_id": acct["account_id"], "payment_intent": "pi_lot",
               "amount_total": 500, "currency": "usd", "metadata": {"price": "bundle_10"}}
    events = Events()
    await webhook(client, events.event("checkout.session.completed", session))
    r = await client.post("/v1/usage/events", json={"meter": "generation", "quantity": 14},
                          headers=bearer(acct["api_key"], **{"Idempotency-Key": "spend"}))
    assert r.status_code == 201 and r.json()["charged"]["credits"] == "4"     # from the expiring promotion
    balance = (await client.get("/v1/balance", headers=bearer(acct["api_key"]))).json()
    assert balance["credits"] == "11" and balance["next_expiry"]["credits"] == "1"
    await webhook(client, events.event("charge.refunded", {"id": "ch_lot", "object": "charge", "payment_intent": "pi_lot",
                                                           "amount": 500, "amount_refunded": 500, "refunded": True}))
    remaining = dict(owner.execute("SELECT source, remaining_micros FROM ledger.credit_lots WHERE account_id = %s",
                                   [acct["account_id"]]).fetchall())
    assert remaining == {"promotion": 1_000_000, "purchase": 0}
    assert reconciliation_problems(owner) == {}


async def test_the_dashboard_shows_the_referral_link_and_expiring_credits(db_url, settings, owner):
    async with await page_client(db_url, settings) as browser:
        await browser.post("/v1/auth/signup", json={"email": "dash@example.com", "password": PASSWORD})
        assert (await form(browser, "/login", {"email": "dash@example.com", "password": PASSWORD})).status_code in (302, 303)
        account_id, code = owner.execute("SELECT account_id, referral_code FROM identity.users").fetchone()
        owner.execute("SELECT ledger.grant_lot(%s, 'promotion', 2000000, 'promo', 'promo', now(), "
                      "'2030-01-01 00:00:00+00')", [account_id])
        text = " ".join((await browser.get("/dashboard")).text.split())
        assert f'href="{PUBLIC_URL}/r/{code}"' in text and "you get 10 credits" in text
        assert "2 expire 2030-01-01 00:00 UTC" in text
