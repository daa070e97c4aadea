"""Stripe billing over HTTP: the real stripe SDK against a local stand-in, and webhook events
signed the way Stripe signs them."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest

from api.settings import Settings
from tests.conftest import reconciliation_problems
from tests.http.conftest import DAY, PUBLIC_URL, SECRET, account_row, bearer, form, page_client, pay_and_deliver, webhook
from tests.stripe_standin import Events, sign


@pytest.fixture
def settings(stripe_settings):
    return stripe_settings


def subscribe(events, account, sub="sub_1", status="active", price="price_pro_monthly", start=None, end=None,
              type_="customer.subscription.updated", created=None, id_=None, cancel=False):
    now = int(time.time())
    obj = Events.subscription(sub, "cus_1", account["account_id"], status, price,
                              start or now - DAY, end or now + 29 * DAY, cancel)
    return events.event(type_, obj, created=created, id_=id_)


async def test_plans_are_public_with_prices_and_bundles(client):
    body = (await client.get("/v1/plans")).json()
    plans = {p["id"]: p for p in body["plans"]}
    assert set(plans) == {"free", "pro", "unlimited", "pay_per_use"}
    assert {(x["interval"], x["amount"], x["currency"]) for x in plans["pro"]["prices"]} == {
        ("month", 999, "usd"), ("year", 9999, "usd")}
    assert {x["amount"] for x in plans["unlimited"]["prices"]} == {1999, 19999}
    assert plans["pro"]["entitlements"] == [{"meter": "generation", "kind": "allowance", "period": "billing_period",
                                             "limit": 1000, "unit_amount": None}]
    ppu = plans["pay_per_use"]
    assert ppu["spending_limit"] == 5000 and ppu["entitlements"] == [
        {"meter": "generation", "kind": "post_paid", "period": "billing_period", "limit": None, "unit_amount": 5}]
    assert [(x["usage_type"], x["amount"]) for x in ppu["prices"]] == [("metered", 0)]
    assert [(b["id"], b["credits"]) for b in body["bundles"]] == [("bundle_10", "10"), ("bundle_25", "25")]


async def test_checkout_creates_the_customer_once_and_names_the_account(client, stripe_api, new_account, owner):
    acct = new_account("free")
    r = await client.post("/v1/billing/checkout", json={"price": "bundle_10"},
                          headers=bearer(acct["api_key"], **{"Idempotency-Key": "buy-1"}))
    assert r.status_code == 201, r.text
    assert r.json()["url"].startswith(f"{stripe_api.url}/c/pay/") and r.json()["mode"] == "payment"
    (_, _, customer, customer_key), (_, _, session, session_key) = stripe_api.requests
    assert customer_key == f"customer-{acct['account_id']}" and customer["metadata"] == {"account_id": acct["account_id"]}
    assert session_key.startswith(f"checkout-{acct['account_id']}-")       # the client's key, scoped to the account
    assert session["mode"] == "payment" and session["client_reference_id"] == acct["account_id"]
    assert session["metadata"] == {"account_id": acct["account_id"], "price": "bundle_10"}
    assert session["line_items"] == [{"price": "price_bundle_10", "quantity": "1"}]
    assert session["success_url"].startswith(PUBLIC_URL)

    r = await client.post("/v1/billing/checkout", json={"price": "pro_yearly", "success_url": "https://x.example/ok"},
                          headers=bearer(acct["api_key"]))
    assert r.json()["mode"] == "subscription"
    paths = [path for _, path, _, _ in stripe_api.requests]
    assert paths.count("/v1/customers") == 1                      # reused
    last = stripe_api.requests[-1][2]
    assert last["subscription_data"] == {"metadata": {"account_id": acct["account_id"], "price": "pro_yearly"}}
    assert last["line_items"][0]["price"] == "price_pro_yearly" and last["success_url"] == "https://x.example/ok"
    (stored,) = owner.execute("SELECT stripe_customer_id FROM billing.customers").fetchone()
    assert stored.startswith("cus_") and session["customer"] == stored and last["customer"] == stored


async def test_checkout_validates_its_input(client, new_account):
    key = new_account("free")["api_key"]
    assert (await client.post("/v1/billing/checkout", json={"price": "gold"}, headers=bearer(key))).status_code == 422
    assert (await client.post("/v1/billing/checkout", json={"price": "bundle_10", "success_url": "javascript:x"},
                              headers=bearer(key))).status_code == 422
    assert (await client.post("/v1/billing/checkout", json={"price": "bundle_10"})).status_code == 401


async def test_bundle_purchase_is_credited_once_however_often_delivered(client, events, new_account, owner):
    acct = new_account("free")
    session = {"id": "cs_test_1", "object": "checkout.session", "mode": "payment", "payment_status": "paid",
               "customer": "cus_9", "client_reference_id": acct["account_id"], "payment_intent": "pi_1",
               "amount_total": 500, "currency": "usd", "metadata": {"account_id": acct["account_id"], "price": "bundle_10"}}
    event = events.event("checkout.session.completed", session)
    first = await webhook(client, event)
    assert first.status_code == 200 and first.json() == {"received": True, "duplicate": False, "status": "applied",
                                                        "event_id": event["id"]}
    again = await webhook(client, event)
    assert again.json()["duplicate"] is True
    responses = await asyncio.gather(*[webhook(client, event) for _ in range(20)])
    assert {r.status_code for r in responses} == {200}
    assert account_row(owner, acct["account_id"])[1] == 10_000_000
    assert owner.execute("SELECT stripe_customer_id FROM billing.customers").fetchone()[0] == "cus_9"
    (row,) = owner.execute("SELECT paid_minor, credits_sold_micros, difference_micros FROM reporting.payments_vs_ledger_daily").fetchall()
    assert row == (500, 10_000_000, 0)
    # A second session for the same bundle is a second purchase.
    await webhook(client, events.event("checkout.session.completed", {**session, "id": "cs_test_2", "payment_intent": "pi_2"}))
    assert account_row(owner, acct["account_id"])[1] == 20_000_000
    assert reconciliation_problems(owner) == {}


async def test_a_delayed_payment_is_credited_when_it_succeeds(client, events, new_account, owner):
    acct = new_account("free")
    session = {"id": "cs_slow", "object": "checkout.session", "mode": "payment", "payment_status": "unpaid",
               "customer": "cus_s", "client_reference_id": acct["account_id"], "payment_intent": "pi_slow",
               "amount_total": 1000, "currency": "usd", "metadata": {"price": "bundle_25"}}
    assert (await webhook(client, events.event("checkout.session.completed", session))).json()["status"] == "ignored"
    assert account_row(owner, acct["account_id"])[1] == 0
    paid = events.event("checkout.session.async_payment_succeeded", {**session, "payment_status": "paid"})
    assert (await webhook(client, paid)).json()["status"] == "applied"
    assert account_row(owner, acct["account_id"])[1] == 25_000_000


async def test_concurrent_deliveries_of_new_events_apply_each_once(client, events, new_account, owner):
    acct = new_account("free")
    batch = [events.event("checkout.session.completed", {
        "id": f"cs_{i}", "object": "checkout.session", "mode": "payment", "payment_status": "paid",
        "customer": "cus_9", "client_reference_id": acct["account_id"], "payment_intent": f"pi_{i}",
        "amount_total": 500, "currency": "usd", "metadata": {"price": "bundle_10"}}) for i in range(5)]
    responses = await asyncio.gather(*[webhook(client, e) for e in batch for _ in range(4)])
    assert {r.status_code for r in responses} == {200}
    assert sum(not r.json()["duplicate"] for r in responses) == 5
    assert account_row(owner, acct["account_id"])[1] == 50_000_000


@pytest.mark.parametrize("case", ["bad-secret", "stale", "future", "missing", "tampered"])
async def test_unverified_webhooks_are_refused(client, events, new_account, owner, case):
    event = events.event("customer.subscription.updated",
                         Events.subscription("sub_x", "cus_1", new_account()["account_id"], "active",
                                             "price_pro_monthly", 0, 1))
    payload = json.dumps(event).encode()
    now = int(time.time())
    header = {"bad-secret": sign(payload, "whsec_wrong"), "stale": sign(payload, SECRET, now - 400),
              "future": sign(payload, SECRET, now + 400), "missing": None,
              "tampered": sign(payload, SECRET)}[case]
    body = payload.replace(b"active", b"canceled") if case == "tampered" else payload
    r = await client.post("/v1/webhooks/stripe", content=body,
                          headers={"Stripe-Signature": header} if header else {})
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/problem+json")
    assert owner.execute("SELECT count(*) FROM billing.stripe_events").fetchone()[0] == 0


async def test_update_before_create_ends_in_the_latest_state(client, events, new_account, owner):
    acct = new_account("free")
    now = int(time.time())
    updated = subscribe(events, acct, status="active", created=now)
    created = subscribe(events, acct, status="incomplete", type_="customer.subscription.created", created=now - 5)
    assert (await webhook(client, updated)).json()["status"] == "applied"
    assert (await webhook(client, created)).json()["status"] == "stale"
    plan, _, start, end, _ = account_row(owner, acct["account_id"])
    assert plan == "pro" and start is not None and end is not None
    status = owner.execute("SELECT status, plan_id FROM billing.subscriptions").fetchone()
    assert status == ("active", "pro")
    assert owner.execute("SELECT status FROM reporting.stripe_events_not_applied").fetchall() == [("stale",)]


@pytest.mark.parametrize("truth", ["price_pro_monthly", "price_unlimited_monthly"])
async def test_two_updates_in_one_second_settle_on_what_stripe_has_now(client, events, stripe_api, new_account,
                                                                      owner, truth):
    """Events of the same second carry no order: the subscription is re-read from Stripe."""
    now = int(time.time())
    finals = []
    for order in (0, 1):
        acct = new_account("free")
        sub = f"sub_order_{order}"
        first = subscribe(events, acct, sub=sub, price="price_pro_monthly", created=now, id_=f"evt_a_{order}")
        second = subscribe(events, acct, sub=sub, price="price_unlimited_monthly", created=now, id_=f"evt_b_{order}")
        stripe_api.subscriptions[sub] = {**second["data"]["object"], "items": {"object": "list", "data": [
            {**second["data"]["object"]["items"]["data"][0], "price": {"id": truth, "object": "price"}}]}}
        for event in ([first, second] if order == 0 else [second, first]):
            r = await webhook(client, event)
            assert r.status_code == 200 and r.json()["status"] == "applied", r.text
        finals.append(account_row(owner, acct["account_id"])[0])
    expected = "pro" if truth == "price_pro_monthly" else "unlimited"
    assert finals == [expected, expected]
    assert [m for m, path, *_ in stripe_api.requests if path.startswith("/v1/subscriptions/")] == ["GET", "GET"]


async def test_a_replayed_old_event_never_overwrites_newer_state(client, events, new_account, owner):
    acct = new_account("free")
    now = int(time.time())
    old = subscribe(events, acct, price="price_pro_monthly", created=now - 60)
    new = subscribe(events, acct, price="price_unlimited_monthly", created=now)
    await webhook(client, old)
    await webhook(client, new)
    assert account_row(owner, acct["account_id"])[0] == "unlimited"
    replay = {**old, "id": "evt_replayed_copy"}
    assert (await webhook(client, replay)).json()["status"] == "stale"
    assert account_row(owner, acct["account_id"])[0] == "unlimited"


async def test_cancel_at_period_end_keeps_the_plan_until_deleted(client, events, stripe_api, new_account, owner):
    acct = new_account("free")
    now = int(time.time())
    sub = subscribe(events, acct, created=now - 10)
    stripe_api.subscriptions["sub_1"] = sub["data"]["object"]
    await webhook(client, sub)
    assert (await client.get("/v1/billing/subscription", headers=bearer(acct["api_key"]))).json()["subscription"]["live"]

    r = await client.delete("/v1/billing/subscription", headers=bearer(acct["api_key"]))
    assert r.status_code == 202 and r.json()["cancel_at_period_end"] is True
    assert stripe_api.requests[-1][:3] == ("POST", "/v1/subscriptions/sub_1", {"cancel_at_period_end": "true"})
    await webhook(client, subscribe(events, acct, cancel=True, created=now - 5))
    assert account_row(owner, acct["account_id"])[0] == "pro"
    await webhook(client, subscribe(events, acct, status="canceled", type_="customer.subscription.deleted", created=now))
    plan, _, start, end, _ = account_row(owner, acct["account_id"])
    assert (plan, start, end) == ("free", None, None)
    r = await client.delete("/v1/billing/subscription", headers=bearer(acct["api_key"]))
    assert r.status_code == 404


async def test_change_plan_prorates_through_stripe(client, events, stripe_api, new_account):
    acct = new_account("free")
    sub = subscribe(events, acct)
    stripe_api.subscriptions["sub_1"] = sub["data"]["object"]
    await webhook(client, sub)
    r = await client.post("/v1/billing/subscription/change", json={"price": "unlimited_monthly"},
                          headers=bearer(acct["api_key"]))
    assert r.status_code == 202, r.text
    _, path, params, key = stripe_api.requests[-1]
    assert path == "/v1/subscriptions/sub_1" and key
    assert params["items"] == [{"id": "si_sub_1", "price": "price_unlimited_monthly"}]
    assert params["proration_behavior"] == "create_prorations"
    r = await client.post("/v1/billing/subscription/change", json={"price": "bundle_10"}, headers=bearer(acct["api_key"]))
    assert r.status_code == 422
    r = await client.post("/v1/billing/checkout", json={"price": "pro_monthly"}, headers=bearer(acct["api_key"]))
    assert r.status_code == 409


async def test_portal_needs_a_customer(client, events, new_account, owner):
    acct = new_account("free")
    assert (await client.post("/v1/billing/portal", headers=bearer(acct["api_key"]))).status_code == 404
    owner.execute("INSERT INTO billing.customers (account_id, stripe_customer_id) VALUES (%s, 'cus_p')", [acct["account_id"]])
    r = await client.post("/v1/billing/portal", headers=bearer(acct["api_key"]))
    assert r.status_code == 201 and r.json()["url"].startswith("https://billing.stripe.test/")


async def test_invoice_paid_starts_a_new_period_and_grants_included_credits(client, events, new_account, owner):
    acct = new_account("free")
    now = int(time.time())
    owner.execute("UPDATE billing.plans SET included_credits_micros = 5000000 WHERE id = 'pro'")
    await webhook(client, subscribe(events, acct, start=now - 20 * DAY, end=now + 10 * DAY, created=now - 100))
    headers = bearer(acct["api_key"], **{"Idempotency-Key": "u1"})
    r = await client.post("/v1/usage/events", json={"meter": "generation", "quantity": 40}, headers=headers)
    assert r.json()["allowance"]["used"] == 40
    # That usage belongs to the period that ends when the invoice below starts the next one.
    owner.execute("UPDATE metering.usage_events SET created_at = created_at - interval '5 minutes'")

    invoice = {"id": "in_1", "object": "invoice", "customer": "cus_1", "status": "paid", "amount_paid": 999,
               "parent": {"type": "subscription_details", "subscription_details": {"subscription": "sub_1"}},
               "lines": {"data": [{"period": {"start": now - 60, "end": now + 30 * DAY}}]}}
    paid = events.event("invoice.paid", invoice)
    assert (await webhook(client, paid)).json()["status"] == "applied"
    assert (await webhook(client, {**paid, "id": "evt_same_invoice_again"})).json()["status"] == "applied"
    plan, credits, start, end, _ = account_row(owner, acct["account_id"])
    assert plan == "pro" and credits == 5_000_000                 # granted once per invoice
    assert int(start.timestamp()) == now - 60
    r = await client.post("/v1/usage/events", json={"meter": "generation"}, headers=bearer(acct["api_key"], **{"Idempotency-Key": "u2"}))
    assert r.json()["allowance"]["used"] == 1                     # the new period starts from zero
    assert reconciliation_problems(owner) == {}


async def test_payment_failure_has_a_grace_period_then_meters_as_free(client, events, new_account, owner):
    acct = new_account("free")
    await webhook(client, subscribe(events, acct, created=int(time.time()) - 100))
    invoice = {"id": "in_2", "object": "invoice", "customer": "cus_1",
               "parent": {"subscription_details": {"subscription": "sub_1"}}, "lines": {"data": []}}
    await webhook(client, events.event("invoice.payment_failed", invoice))
    await webhook(client, subscribe(events, acct, status="past_due"))
    plan, _, _, _, grace = account_row(owner, acct["account_id"])
    assert plan == "pro" and grace is not None
    use = lambda k: client.post("/v1/usage/events", json={"meter": "generation"},
                                headers=bearer(acct["api_key"], **{"Idempotency-Key": k}))
    assert (await use("a")).json()["allowance"]["limit"] == 1000        # still pro within the grace period
    owner.execute("UPDATE identity.accounts SET plan_grace_until = now() - interval '1 second'")
    assert (await use("b")).json()["allowance"]["limit"] == 10          # metered as free after it
    assert (await client.get("/v1/balance", headers=bearer(acct["api_key"]))).json()["plan"] == "free"
    period = {"start": int(time.time()), "end": int(time.time()) + 30 * DAY}
    await webhook(client, events.event("invoice.paid", {**invoice, "id": "in_3", "lines": {"data": [{"period": period}]}}))
    assert account_row(owner, acct["account_id"])[4] is None


async def test_refund_after_credits_were_spent_claws_back_what_is_left(client, events, new_account, owner):
    acct = new_account("free")
    session = {"id": "cs_r", "object": "checkout.session", "mode": "payment", "payment_status": "paid",
               "customer": "cus_r", "client_reference_id": acct["account_id"], "payment_intent": "pi_r",
               "amount_total": 500, "currency": "usd", "metadata": {"price": "bundle_10"}}
    await webhook(client, events.event("checkout.session.completed", session))
    await client.post("/v1/usage/events", json={"meter": "generation", "quantity": 14},
                      headers=bearer(acct["api_key"], **{"Idempotency-Key": "spend"}))   # 10 free + 4 credits
    assert account_row(owner, acct["account_id"])[1] == 6_000_000
    charge = {"id": "ch_r", "object": "charge", "payment_intent": "pi_r", "amount": 500, "currency": "usd"}
    half = events.event("charge.refunded", {**charge, "amount_refunded": 250, "refunded": False})
    await webhook(client, half)
    assert account_row(owner, acct["account_id"])[1] == 1_000_000       # 5 of the 10 credits taken back
    full = events.event("charge.refunded", {**charge, "amount_refunded": 500, "refunded": True})
    await webhook(client, full)
    assert account_row(owner, acct["account_id"])[1] == 0               # never below zero
    clawed, shortfall = owner.execute("SELECT clawed_back_micros, shortfall_micros FROM billing.payments").fetchone()
    assert (clawed, shortfall) == (6_000_000, 4_000_000)
    assert (await webhook(client, {**half, "id": "evt_half_again"})).json()["status"] == "stale"
    assert reconciliation_problems(owner) == {}


async def test_unknown_events_are_recorded_and_acknowledged(client, events, owner):
    r = await webhook(client, events.event("customer.created", {"id": "cus_z", "object": "customer"}))
    assert r.status_code == 200 and r.json()["status"] == "ignored"
    (note,) = owner.execute("SELECT note FROM reporting.stripe_events_not_applied").fetchone()
    assert "customer.created" in note


async def test_invoice_for_an_unknown_subscription_is_retried_later(db_url, events, new_account, owner):
    """Without a Stripe API key the subscription cannot be re-read: 503 until its own event arrives."""
    from litestar.testing import AsyncTestClient

    from api.app import create_app

    acct = new_account("free")
    now = int(time.time())
    paid = events.event("invoice.paid", {"id": "in_9", "object": "invoice", "customer": "cus_1",
                                         "parent": {"subscription_details": {"subscription": "sub_1"}},
                                         "lines": {"data": [{"period": {"start": now, "end": now + 30 * DAY}}]}})
    no_api = Settings(public_url=PUBLIC_URL, stripe_webhook_secret=SECRET)
    async with AsyncTestClient(app=create_app(db_url, no_api)) as client:
        r = await webhook(client, paid)
        assert r.status_code == 503                                      # Stripe will retry
        assert owner.execute("SELECT count(*) FROM billing.stripe_events").fetchone()[0] == 0
        await webhook(client, subscribe(events, acct, created=now - 10))
        assert (await webhook(client, paid)).json()["status"] == "applied"


async def test_reporting_views_for_dbas(client, events, new_account, owner):
    a, b = new_account("free"), new_account("free")
    await webhook(client, subscribe(events, a, sub="sub_a"))
    await webhook(client, subscribe(events, b, sub="sub_b", status="past_due", price="price_unlimited_monthly"))
    rows = set(owner.execute("SELECT plan_id, status, subscriptions FROM reporting.subscriptions_by_status").fetchall())
    assert rows == {("pro", "active", 1), ("unlimited", "past_due", 1)}


def bundle_session(acct, **changes):
    return {"id": "cs_bad", "object": "checkout.session", "mode": "payment", "payment_status": "paid",
            "customer": "cus_9", "client_reference_id": acct["account_id"], "payment_intent": "pi_bad",
            "amount_total": 500, "currency": "usd", "metadata": {"account_id": acct["account_id"], "price": "bundle_10"},
            **changes}


@pytest.mark.parametrize("case", ["created 1e20", "created string", "amount abc", "amount -5", "long currency",
                                  "no data.object"])
async def test_a_signed_but_malformed_event_is_recorded_as_rejected_and_nothing_applies(
        client, events, new_account, owner, case):
    acct = new_account("free")
    event = events.event("checkout.session.completed", bundle_session(acct))
    if case == "created 1e20":
        event["created"] = 10**20
    elif case == "created string":
        event["created"] = "yesterday"
    elif case == "amount abc":
        event["data"]["object"]["amount_total"] = "abc"
    elif case == "amount -5":
        event["data"]["object"]["amount_total"] = -5
    elif case == "long currency":
        event["data"]["object"]["currency"] = "x" * 5000
    else:
        event["data"] = {}
    for _ in range(2):      # a redelivery is rejected the same way
        r = await webhook(client, event)
        assert r.status_code == 400 and r.headers["content-type"].startswith("application/problem+json"), r.text
        assert "rejected" in r.json()["detail"]
    (status, note) = owner.execute("SELECT status, note FROM billing.stripe_events").fetchone()
    assert status == "rejected" and note
    assert account_row(owner, acct["account_id"])[1] == 0
    assert owner.execute("SELECT count(*) FROM billing.payments").fetchone()[0] == 0
    assert owner.execute("SELECT count(*) FROM reporting.stripe_events_not_applied WHERE status = 'rejected'"
                         ).fetchone()[0] == 1


@pytest.mark.parametrize("payload", [
    b'{"id": "evt_\\u0000x", "type": "invoice.paid", "created": 1, "data": {"object": {}}}',
    b'{"id": "evt_1", "type": "x", "created": 1, "data": {"object": ' + b'{"a": ' * 5000 + b'1' + b'}' * 5002,
    b'{"id": "evt_\\ud800", "type": "x", "created": 1, "data": {"object": {}}}',
])
async def test_a_signed_body_that_is_not_storable_json_is_rejected_with_400(client, owner, payload):
    r = await client.post("/v1/webhooks/stripe", content=payload,
                          headers={"Stripe-Signature": sign(payload, SECRET), "Content-Type": "application/json"})
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/problem+json"), r.text
    (event_id, status) = owner.execute("SELECT id, status FROM billing.stripe_events").fetchone()
    assert status == "rejected" and event_id.startswith("rejected:")


async def test_a_body_that_is_not_utf8_cannot_verify(client, owner):
    payload = b'{"id": "evt_\xff", "type": "x", "created": 1, "data": {"object": {}}}'
    r = await client.post("/v1/webhooks/stripe", content=payload,
                          headers={"Stripe-Signature": sign(payload, SECRET), "Content-Type": "application/json"})
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/problem+json"), r.text


async def test_stripe_failures_are_502_with_stripes_request_id(client, events, stripe_api, new_account):
    acct = new_account("free")
    await webhook(client, subscribe(events, acct, sub="sub_unknown_to_stripe"))
    r = await client.delete("/v1/billing/subscription", headers=bearer(acct["api_key"]))
    assert r.status_code == 502 and r.headers["content-type"].startswith("application/problem+json"), r.text
    body = r.json()
    assert body["type"].endswith("/payment-provider-error") and body["stripe_request_id"].startswith("req_")


async def test_stripe_down_is_a_502_not_a_500(db_url, events, new_account):
    from litestar.testing import AsyncTestClient

    from api.app import create_app

    down = Settings(public_url=PUBLIC_URL, stripe_api_key="sk_test_x", stripe_api_base="http://127.0.0.1:9",
                    stripe_webhook_secret=SECRET)
    acct = new_account("free")
    async with AsyncTestClient(app=create_app(db_url, down)) as client:
        r = await client.post("/v1/billing/checkout", json={"price": "bundle_10"}, headers=bearer(acct["api_key"]))
    assert r.status_code == 502 and r.json()["type"].endswith("/payment-provider-error"), r.text


async def test_dashboard_shows_what_is_left_and_cancels_then_keeps_the_plan(db_url, settings, events, stripe_api, owner):
    from litestar.testing import AsyncTestClient

    from api.app import create_app

    # Cookies are Secure with an https public URL: the browser side speaks https too.
    async with AsyncTestClient(app=create_app(db_url, settings), base_url="https://testserver.local") as client:
        await dashboard_flow(client, events, stripe_api)


async def dashboard_flow(client, events, stripe_api):

    password = "violet-harbour-tangent-42"
    await client.post("/v1/auth/signup", json={"email": "dash@example.com", "password": password})
    tokens = (await client.post("/v1/auth/login", json={"email": "dash@example.com", "password": password})).json()
    me = (await client.get("/v1/me", headers=bearer(tokens["access_token"]))).json()
    acct = {"account_id": me["account"]["id"]}
    for i in range(2):
        r = await client.post("/v1/usage/events", headers=bearer(tokens["access_token"], **{"Idempotency-Key": f"d{i}"}),
                              json={"meter": "generation", "metadata": {"thumbnail_url": f"https://cdn.example.com/{i}.png",
                                                                        "model": "flux"}})
        assert r.status_code == 201
    sub = subscribe(events, acct, created=int(time.time()) - 10)
    stripe_api.subscriptions["sub_1"] = sub["data"]["object"]
    await webhook(client, sub)

    login = await form(client, "/login", {"email": "dash@example.com", "password": password})
    assert login.status_code in (302, 303)
    page = await client.get("/dashboard")
    assert page.status_code == 200
    assert "2 of 1000 generations used this billing period" in page.text, page.text
    assert 'src="https://cdn.example.com/1.png"' in page.text and "flux" in page.text
    assert "renewing" in page.text and "Cancel at period end" in page.text

    r = await form(client, "/dashboard/cancel", {}, "/dashboard")
    assert r.status_code == 200 and "will end at the end of this period" in r.text
    assert stripe_api.requests[-1][2] == {"cancel_at_period_end": "true"}
    await webhook(client, subscribe(events, acct, cancel=True, created=int(time.time())))
    page = await client.get("/dashboard")
    assert "ending" in page.text and "Keep my plan" in page.text
    r = await form(client, "/dashboard/resume", {}, "/dashboard")
    assert r.status_code == 200 and "continues" in r.text
    assert stripe_api.requests[-1][2] == {"cancel_at_period_end": "false"}
    resumed = await client.post("/v1/billing/subscription/resume", headers=bearer(tokens["access_token"]))
    assert resumed.status_code == 202 and resumed.json()["cancel_at_period_end"] is False


async def test_one_click_top_up_with_the_saved_card_is_credited_once_by_the_webhook(client, stripe_api, new_account, owner):
    acct = new_account("free")
    headers = bearer(acct["api_key"])
    # Without a saved card: Checkout.
    first = await client.post("/v1/billing/topup", json={"bundle": "bundle_10"}, headers=headers)
    assert first.status_code == 201 and first.json()["status"] == "checkout", first.text
    session_id = first.json()["url"].rsplit("/", 1)[-1]
    status = (await client.get(f"/billing/success?session_id={session_id}")).text
    assert "Processing" in status and 'http-equiv="refresh"' in status
    await pay_and_deliver(client, stripe_api, session_id)
    assert "is active" in (await client.get(f"/billing/success?session_id={session_id}")).text
    assert account_row(owner, acct["account_id"])[1] == 10_000_000

    # The card was saved: one click, paid at once, credited only by payment_intent.succeeded.
    before = len(stripe_api.sent)
    r = await client.post("/v1/billing/topup", json={"bundle": "bundle_25"}, headers=bearer(acct["api_key"], **{"Idempotency-Key": "t-1"}))
    assert r.status_code == 201 and r.json()["status"] == "paid" and r.json()["credits"] == "25", r.text
    method, path, params, key = stripe_api.requests[-1]
    assert path == "/v1/payment_intents" and key.startswith(f"topup-{acct['account_id']}-")
    assert params["off_session"] == "true" and params["amount"] == "1000"
    assert account_row(owner, acct["account_id"])[1] == 10_000_000          # nothing granted by the request itself
    (succeeded,) = stripe_api.sent[before:]
    assert succeeded["type"] == "payment_intent.succeeded"
    for event in (succeeded, succeeded, {**succeeded, "id": "evt_same_payment_again"}):
        assert (await webhook(client, event)).status_code == 200
    assert account_row(owner, acct["account_id"])[1] == 35_000_000           # exactly once
    assert "is active" in (await client.get(f"/billing/success?payment_intent={r.json()['payment_intent']}")).text
    assert reconciliation_problems(owner) == {}

    # A card that needs authentication falls back to Checkout.
    stripe_api.needs_authentication.add(owner.execute("SELECT stripe_customer_id FROM billing.customers").fetchone()[0])
    r = await client.post("/v1/billing/topup", json={"bundle": "bundle_10"}, headers=headers)
    assert r.json()["status"] == "checkout" and "/c/pay/" in r.json()["url"]
    assert (await client.post("/v1/billing/topup", json={"bundle": "pro_monthly"}, headers=headers)).status_code == 422


async def test_a_subscription_bought_on_the_checkout_page_is_applied_by_its_events(client, stripe_api, new_account, owner):
    acct = new_account("free")
    r = await client.post("/v1/billing/checkout", json={"price": "pro_yearly"}, headers=bearer(acct["api_key"]))
    session_id = r.json()["id"]
    page = httpx.get(r.json()["url"])
    assert page.status_code == 200 and "Pay" in page.text
    await pay_and_deliver(client, stripe_api, session_id)
    plan, _, start, end, _ = account_row(owner, acct["account_id"])
    assert plan == "pro" and (end - start).days == 365
    assert "is active" in (await client.get(f"/billing/success?session_id={session_id}")).text


async def test_what_a_device_buys_by_its_upgrade_link_moves_with_it_when_it_signs_up(db_url, settings, stripe_api, owner):

    async with await page_client(db_url, settings) as client:
        device = (await client.post("/v1/identify", json={"install_id": "device-buying-0123456789ab"})).json()
        token = device["upgrade_url"].split("token=")[1]
        r = await form(client, "/upgrade/checkout", {"price": "pro_monthly", "token": token}, f"/upgrade?token={token}")
        assert r.status_code in (302, 303) and "/c/pay/" in r.headers["location"], r.text
        await pay_and_deliver(client, stripe_api, r.headers["location"].rsplit("/", 1)[-1])
        assert account_row(owner, device["account_id"])[0] == "pro"

        await client.post("/v1/auth/signup", json={"email": "buyer@example.com", "password": "violet-harbour-tangent-42"},
                          headers=bearer(device["access_token"]))
        (user_account,) = owner.execute("SELECT account_id FROM identity.users").fetchone()
        assert account_row(owner, user_account)[0] == "pro"
        assert owner.execute("SELECT account_id FROM billing.subscriptions").fetchone()[0] == user_account
        # Stripe's later events name the device: they reach the user.
        sub_id = owner.execute("SELECT stripe_subscription_id FROM billing.subscriptions").fetchone()[0]
        stripe_api.subscriptions[sub_id]["cancel_at_period_end"] = True
        event = Events().event("customer.subscription.updated", stripe_api.subscriptions[sub_id], created=int(time.time()) + 5)
        assert (await webhook(client, event)).json()["status"] == "applied"
        assert owner.execute("SELECT cancel_at_period_end FROM billing.subscriptions").fetchone()[0] is True


async def test_a_subscriber_switching_plans_sees_the_proration_and_changes_the_subscription(db_url, settings, stripe_api, owner):

    password = "violet-harbour-tangent-42"
    async with await page_client(db_url, settings) as client:
        await client.post("/v1/auth/signup", json={"email": "switch@example.com", "password": password})
        assert (await form(client, "/login", {"email": "switch@example.com", "password": password})).status_code in (302, 303)
        r = await form(client, "/upgrade/checkout", {"price": "pro_monthly"}, "/upgrade")
        await pay_and_deliver(client, stripe_api, r.headers["location"].rsplit("/", 1)[-1])
        page = await client.get("/upgrade")
        assert "your plan" in page.text and "Switch to Unlimited" in page.text
        preview = await form(client, "/upgrade/checkout", {"price": "unlimited_monthly"}, "/upgrade")
        assert preview.status_code == 200 and "Stripe prorates" in preview.text
        assert re.search(r"<strong>(9\.\d\d|10\.00) USD</strong>", preview.text), preview.text   # about 19.99 - 9.99
        changed = await form(client, "/upgrade/change", {"price": "unlimited_monthly"}, "/upgrade")
        assert changed.status_code == 200 and "changing" in changed.text
        _, path, params, _ = stripe_api.requests[-1]
        assert path.startswith("/v1/subscriptions/sub_") and params["items"][0]["price"] == "price_unlimited_monthly"
        assert owner.execute("SELECT count(*) FROM billing.subscriptions").fetchone()[0] == 1


async def run_worker(db_url, settings) -> int:
    import psycopg as pg

    from api import db
    from api.worker import deliver_due

    async with await pg.AsyncConnection.connect(db.api_conninfo(db_url), autocommit=True) as conn:
        return await deliver_due(conn, settings, limit=100)


async def test_auto_top_up_buys_one_bundle_when_charges_cross_the_threshold(client, db_url, settings, stripe_api, new_account, owner):
    acct = new_account("free")
    headers = bearer(acct["api_key"])
    assert (await client.put("/v1/billing/auto-topup", json={"below": "5", "buy": "bundle_10"}, headers=headers)).status_code == 409
    # A first Checkout saves the card.
    session = (await client.post("/v1/billing/checkout", json={"price": "bundle_10"}, headers=headers)).json()
    await pay_and_deliver(client, stripe_api, session["id"])
    r = await client.put("/v1/billing/auto-topup", json={"below": "5", "buy": "bundle_10"}, headers=headers)
    assert r.status_code == 200 and r.json() == {"enabled": True, "below": "5", "bundle": "bundle_10", "failures": 0,
                                                 "in_flight": False, "last_error": None}, r.text
    assert (await client.put("/v1/billing/auto-topup", json={"below": "1e3", "buy": "bundle_10"}, headers=headers)).status_code == 422
    assert (await client.put("/v1/billing/auto-topup", json={"below": "5", "buy": "pro_monthly"}, headers=headers)).status_code == 422

    # Allowance (10), then credits: two charges under the threshold queue one top-up.
    for i, quantity in enumerate((10, 6, 1)):
        r = await client.post("/v1/usage/events", json={"meter": "generation", "quantity": quantity},
                              headers=bearer(acct["api_key"], **{"Idempotency-Key": f"a{i}"}))
        assert r.status_code == 201
    assert owner.execute("SELECT count(*) FROM outbox.messages WHERE kind = 'auto_topup'").fetchone()[0] == 1
    assert (await client.get("/v1/billing/auto-topup", headers=headers)).json()["in_flight"] is True

    before = len(stripe_api.sent)
    assert await run_worker(db_url, settings) == 1
    # The worker died before recording it? The task runs again with the same idempotency key: paid once.
    owner.execute("UPDATE outbox.messages SET delivered_at = NULL, next_attempt_at = now() WHERE kind = 'auto_topup'")
    assert await run_worker(db_url, settings) == 1
    intents = [e for e in stripe_api.sent[before:] if e["type"] == "payment_intent.succeeded"]
    assert len(intents) == 1 and intents[0]["data"]["object"]["metadata"]["auto_topup"] == "true"
    assert account_row(owner, acct["account_id"])[1] == 3_000_000          # credits only with the event
    await webhook(client, intents[0])
    assert account_row(owner, acct["account_id"])[1] == 13_000_000
    assert (await client.get("/v1/billing/auto-topup", headers=headers)).json()["in_flight"] is False
    assert reconciliation_problems(owner) == {}


async def test_three_failed_auto_top_ups_turn_it_off(client, db_url, settings, stripe_api, new_account, owner):
    acct = new_account("free")
    headers = bearer(acct["api_key"])
    session = (await client.post("/v1/billing/checkout", json={"price": "bundle_10"}, headers=headers)).json()
    await pay_and_deliver(client, stripe_api, session["id"])
    await client.put("/v1/billing/auto-topup", json={"below": "100", "buy": "bundle_10"}, headers=headers)
    stripe_api.needs_authentication.add(owner.execute("SELECT stripe_customer_id FROM billing.customers").fetchone()[0])
    for attempt in range(3):
        r = await client.post("/v1/usage/events", json={"meter": "generation", "quantity": 11 if attempt == 0 else 1},
                              headers=bearer(acct["api_key"], **{"Idempotency-Key": f"f{attempt}"}))
        assert r.status_code == 201
        await run_worker(db_url, settings)
    state = (await client.get("/v1/billing/auto-topup", headers=headers)).json()
    assert state["enabled"] is False and state["failures"] == 3 and "authentication_required" in state["last_error"]
    assert owner.execute("SELECT auto_topup_below_micros FROM identity.accounts WHERE id = %s",
                         [acct["account_id"]]).fetchone()[0] is None
    assert owner.execute("SELECT count(*) FROM outbox.messages WHERE kind = 'auto_topup'").fetchone()[0] == 3
    assert (await client.delete("/v1/billing/auto-topup", headers=headers)).json()["enabled"] is False


async def test_post_paid_usage_is_reported_to_stripe_once_and_the_invoice_matches_the_ledger(
        client, db_url, settings, stripe_api, new_account, owner):
    acct = new_account("free")
    headers = bearer(acct["api_key"])
    session = (await client.post("/v1/billing/checkout", json={"price": "pay_per_use_monthly"}, headers=headers)).json()
    assert "quantity" not in stripe_api.sessions[session["id"]]["line_items"][0]     # a metered price
    await pay_and_deliver(client, stripe_api, session["id"])
    assert account_row(owner, acct["account_id"])[0] == "pay_per_use"

    ids = []
    for i, quantity in enumerate((3, 4, 5)):
        r = await client.post("/v1/usage/events", json={"meter": "generation", "quantity": quantity},
                              headers=bearer(acct["api_key"], **{"Idempotency-Key": f"p{i}"}))
        assert r.status_code == 201 and r.json()["charged"]["amount"] == quantity * 5, r.text
        ids.append(r.json()["id"])
    stripe_api.meter_event_failures = 1            # Stripe fails once: retried with the outbox's backoff
    assert await run_worker(db_url, settings) == 3
    assert len(stripe_api.meter_events) == 2
    owner.execute("UPDATE outbox.messages SET next_attempt_at = now() WHERE kind = 'meter_event'")
    assert await run_worker(db_url, settings) == 1
    assert sorted(stripe_api.meter_events) == sorted(ids)
    customer = owner.execute("SELECT stripe_customer_id FROM billing.customers").fetchone()[0]
    assert {(e["event_name"], e["payload"]["stripe_customer_id"], e["payload"]["value"])
            for e in stripe_api.meter_events.values()} == {("pgtally_generation", customer, v) for v in ("3", "4", "5")}
    # The worker died after Stripe's answer: the reports go again and are counted once.
    owner.execute("UPDATE outbox.messages SET delivered_at = NULL, next_attempt_at = now() WHERE kind = 'meter_event'")
    assert await run_worker(db_url, settings) == 3
    assert len(stripe_api.meter_events) == 3
    day = owner.execute("SELECT reported, pending, failed, missing, reported_units, amount_minor "
                        "FROM reporting.meter_event_reports_daily").fetchall()
    assert day == [(3, 0, 0, 0, 12, 60)]

    # The period ends: Stripe invoices the reported usage, pgtally records it and they agree.
    sub_id = owner.execute("SELECT stripe_subscription_id FROM billing.subscriptions").fetchone()[0]
    before = len(stripe_api.sent)
    invoice = stripe_api.close_period(sub_id)
    for event in stripe_api.sent[before:]:
        assert (await webhook(client, event)).status_code == 200
    assert invoice["amount_paid"] == 60
    row = owner.execute("SELECT amount_paid_minor, metered_amount_minor, number FROM billing.invoices "
                        "WHERE stripe_invoice_id = %s", [invoice["id"]]).fetchone()
    assert row == (60, 60, invoice["number"])
    drift = owner.execute("SELECT invoiced_minor, recorded_minor, drift_percent, within_1_percent "
                          "FROM reporting.post_paid_invoice_drift").fetchall()
    assert drift == [(60, 60, 0, True)]
    # The next period's spending starts from zero.
    assert (await client.get("/v1/balance", headers=headers)).json()["spending"]["spent"] == 0
    assert reconciliation_problems(owner) == {}


async def test_pay_per_use_on_the_pages_shows_the_unit_price_the_limit_and_the_spending(db_url, settings, stripe_api):

    password = "violet-harbour-tangent-42"
    async with await page_client(db_url, settings) as client:
        await client.post("/v1/auth/signup", json={"email": "ppu@example.com", "password": password})
        assert (await form(client, "/login", {"email": "ppu@example.com", "password": password})).status_code in (302, 303)
        page = await client.get("/upgrade?interval=year")      # a metered price shows whatever the interval
        assert "0.05 USD a generation, billed each month for what you used (at most 50.00 USD)" in " ".join(page.text.split())
        r = await form(client, "/upgrade/checkout", {"price": "pay_per_use_monthly"}, "/upgrade")
        await pay_and_deliver(client, stripe_api, r.headers["location"].rsplit("/", 1)[-1])
        tokens = (await client.post("/v1/auth/login", json={"email": "ppu@example.com", "password": password})).json()
        r = await client.post("/v1/usage/events", json={"meter": "generation", "quantity": 3},
                              headers=bearer(tokens["access_token"], **{"Idempotency-Key": "ppu-1"}))
        assert r.status_code == 201, r.text
        text = " ".join((await client.get("/dashboard")).text.split())
        assert "Spent this billing period: <strong>0.15 USD</strong> of your 50.00 USD limit" in text
        assert "generation × 3 · 0.15 billed" in text and "3 generations this billing period at 0.05 each" in text
