"""Issue #23, "Stripe as it really is": each defect tried on full-shape Stripe objects (Stripe's
published fixtures with our ids laid over them, tests/stripe_standin.py ``Shapes``), through the
real ``stripe`` SDK and signed webhook deliveries."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import stripe

from api.app import create_app
from tests.conftest import free_port, reconciliation_problems, serving
from tests.http.conftest import DAY, SECRET, account_row, bearer, pay_and_deliver, webhook
from tests.stripe_standin import Shapes, sign


@pytest.fixture
def settings(stripe_settings):
    return stripe_settings


def sdk(stripe_api) -> stripe.StripeClient:
    stripe.enable_telemetry = False
    return stripe.StripeClient("sk_test_pgtally", base_addresses={"api": stripe_api.url})


async def subscribe_through_checkout(client, stripe_api, acct, price="pro_monthly") -> str:
    session = (await client.post("/v1/billing/checkout", json={"price": price}, headers=bearer(acct["api_key"]))).json()
    await pay_and_deliver(client, stripe_api, session["id"])
    return stripe_api.sessions[session["id"]]["subscription"]


def test_the_standin_speaks_stripes_published_shapes(stripe_api):
    sub = Shapes.subscription("sub_s", "cus_s", None, "active", "price_pro_monthly", 0, 1)
    price = sub["items"]["data"][0]["price"]
    assert price["unit_amount"] == 999 and price["unit_amount_decimal"] == "999"
    assert "current_period_end" not in sub and sub["items"]["data"][0]["current_period_end"] == 1
    invoice = Shapes.invoice("in_s", "cus_s", "sub_s", [Shapes.line("in_s", "sub_s", "price_pro_monthly", 999, 0, 1)],
                             payment_intent="pi_s")
    assert invoice["parent"]["subscription_details"]["subscription"] == "sub_s" and invoice["total_taxes"] == []
    assert invoice["payments"]["data"][0]["payment"] == {"type": "payment_intent", "payment_intent": "pi_s"}
    assert "payment_intent" not in invoice and "invoice" not in Shapes.charge("pi_s", "cus_s", 999)
    assert "customer" not in Shapes.dispute("dp_s", "ch_s", "pi_s", 999)


async def test_item1_two_subscription_events_in_one_second_apply_with_stripes_real_prices(
        client, events, stripe_api, new_account, owner):
    """stripe 16 reads unit_amount_decimal as a Decimal: the re-read subscription is stored as JSON."""
    acct = new_account("free")
    now = int(time.time())
    sub = Shapes.subscription("sub_same_second", "cus_1", acct["account_id"], "incomplete", "price_pro_monthly",
                              now, now + 30 * DAY)
    stripe_api.subscriptions[sub["id"]] = {**sub, "status": "active"}
    created = events.event("customer.subscription.created", sub, created=now)
    updated = events.event("customer.subscription.updated", {**sub, "status": "active"}, created=now)
    assert (await webhook(client, created)).json()["status"] == "applied"
    for _ in range(2):          # Stripe's retry keeps `created`: it must not fail again
        r = await webhook(client, updated)
        assert r.status_code == 200, r.text
    assert account_row(owner, acct["account_id"])[0] == "pro"
    assert owner.execute("SELECT status FROM billing.subscriptions").fetchone()[0] == "active"


async def test_item2_a_refunded_subscription_payment_refunds_its_invoice(client, stripe_api, new_account, owner):
    owner.execute("UPDATE billing.plans SET included_credits_micros = 0")
    acct = new_account("free")
    sub_id = await subscribe_through_checkout(client, stripe_api, acct)
    (invoice_id, amount) = owner.execute("SELECT stripe_invoice_id, amount_paid_minor FROM billing.invoices").fetchone()
    assert amount == 999
    (payment_intent,) = owner.execute("SELECT stripe_payment_intent_id FROM billing.invoice_payments").fetchone()
    assert owner.execute("SELECT revenue_minor FROM reporting.revenue_monthly").fetchone()[0] == 999

    before = len(stripe_api.sent)
    sdk(stripe_api).v1.refunds.create(params={"payment_intent": payment_intent, "amount": 400})
    sdk(stripe_api).v1.refunds.create(params={"payment_intent": payment_intent})
    refunds = stripe_api.sent[before:]
    assert [e["type"] for e in refunds] == ["charge.refunded", "charge.refunded"]
    assert "invoice" not in refunds[0]["data"]["object"]
    assert (await webhook(client, refunds[0])).json()["status"] == "applied"
    assert owner.execute("SELECT status, refunded_minor FROM billing.invoices").fetchone() == ("paid", 400)
    assert owner.execute("SELECT revenue_minor FROM reporting.revenue_monthly").fetchone()[0] == 599
    assert (await webhook(client, refunds[1])).json()["status"] == "applied"
    assert (await webhook(client, {**refunds[0], "id": "evt_older_refund_again"})).json()["status"] == "stale"
    r = (await client.get("/v1/billing/invoices", headers=bearer(acct["api_key"]))).json()["data"]
    assert [(i["id"], i["status"], i["refunded"]) for i in r] == [(invoice_id, "refunded", 999)]
    assert owner.execute("SELECT count(*) FROM reporting.revenue_monthly").fetchone()[0] == 0
    assert sub_id and reconciliation_problems(owner) == {}

    # A refund pgtally cannot match is listed for the DBA, not silently dropped.
    stray = Shapes.charge("pi_never_seen", "cus_stray", 700, amount_refunded=700)
    event = {**refunds[0], "id": "evt_stray_refund", "data": {"object": stray}}
    assert (await webhook(client, event)).json()["status"] == "ignored"
    assert [row[0] for row in owner.execute("SELECT stripe_payment_intent_id FROM reporting.unmatched_refunds")] == [
        stray["payment_intent"]]
    assert "unmatched_refunds" in reconciliation_problems(owner)


async def test_item2_a_refund_inside_the_holdback_cancels_the_referral_reward_of_a_subscription(
        client, stripe_api, new_account, owner):
    from tests.conftest import referral, signup

    alice = signup(owner, "alice@example.com")
    bob = signup(owner, "bob@example.com", code=alice["code"])
    owner.execute("UPDATE billing.referral_program SET qualify_on = 'first_payment'")
    acct = {"account_id": bob["account_id"], "api_key": new_api_key(owner, bob)}
    await subscribe_through_checkout(client, stripe_api, acct)
    assert referral(owner, bob) == ("rewarded", None)
    (payment_intent,) = owner.execute("SELECT stripe_payment_intent_id FROM billing.invoice_payments").fetchone()
    before = len(stripe_api.sent)
    sdk(stripe_api).v1.refunds.create(params={"payment_intent": payment_intent})
    (refund,) = stripe_api.sent[before:]
    assert (await webhook(client, refund)).json()["status"] == "applied"
    assert referral(owner, bob) == ("rejected", "refunded")


def new_api_key(owner, person) -> str:
    owner.execute("UPDATE identity.users SET email_verified_at = now() WHERE id = %s", [person["user_id"]])
    session = owner.execute("SELECT api.login_succeeded(%s, NULL, '192.0.2.1', 'test')", [person["user_id"]]).fetchone()[0]
    return owner.execute("SELECT api.create_api_key(%s::uuid, 'test', "
                         "ARRAY['usage:write', 'usage:read', 'billing:read', 'billing:manage'])",
                         [session["session_id"]]).fetchone()[0]["api_key"]


async def test_item3_a_licensed_invoice_records_its_period(client, events, stripe_api, new_account, owner):
    acct = new_account("free")
    sub_id = await subscribe_through_checkout(client, stripe_api, acct)
    item = stripe_api.subscriptions[sub_id]["items"]["data"][0]
    start, end = owner.execute("SELECT period_start, period_end FROM billing.invoices").fetchone()
    assert (int(start.timestamp()), int(end.timestamp())) == (item["current_period_start"], item["current_period_end"])
    before = len(stripe_api.sent)
    renewal = stripe_api.close_period(sub_id)
    for event in stripe_api.sent[before:]:
        assert (await webhook(client, event)).status_code == 200
    start, end = owner.execute("SELECT period_start, period_end FROM billing.invoices WHERE stripe_invoice_id = %s",
                               [renewal["id"]]).fetchone()
    line = renewal["lines"]["data"][0]
    assert (int(start.timestamp()), int(end.timestamp())) == (line["period"]["start"], line["period"]["end"])


async def test_item4_a_dispute_of_a_subscription_charge_finds_its_account(client, events, stripe_api, new_account, owner):
    acct = new_account("free")
    await subscribe_through_checkout(client, stripe_api, acct)
    (payment_intent,) = owner.execute("SELECT stripe_payment_intent_id FROM billing.invoice_payments").fetchone()
    dispute = Shapes.dispute("dp_sub", f"ch_{payment_intent}", payment_intent, 999)
    assert (await webhook(client, events.event("charge.dispute.created", dispute))).json()["status"] == "applied"
    # A dispute that names only the charge, whose id pgtally learnt from a refund of it.
    sdk(stripe_api).v1.refunds.create(params={"payment_intent": payment_intent, "amount": 1})
    await webhook(client, stripe_api.sent[-1])
    only_charge = Shapes.dispute("dp_charge", f"ch_{payment_intent}", None, 500)
    assert (await webhook(client, events.event("charge.dispute.created", only_charge))).json()["status"] == "applied"
    rows = owner.execute("SELECT stripe_dispute_id, account_id::text FROM billing.disputes ORDER BY 1").fetchall()
    assert rows == [("dp_charge", acct["account_id"]), ("dp_sub", acct["account_id"])]


async def test_item5_concurrent_deliveries_over_http_all_answer_2xx_and_apply_once(
        db_url, settings, events, stripe_api, new_account, owner):
    acct = new_account("free")
    now = int(time.time())
    sub = Shapes.subscription("sub_conc", "cus_conc", acct["account_id"], "active", "price_pro_monthly", now, now + 30 * DAY)
    line = Shapes.line("in_conc", "sub_conc", "price_pro_monthly", 999, now, now + 30 * DAY)
    invoice = Shapes.invoice("in_conc", "cus_conc", "sub_conc", [line], payment_intent="pi_conc", number="C-1")
    session = Shapes.checkout_session("cs_conc", "payment", "cus_conc", client_reference_id=acct["account_id"],
                                      payment_intent="pi_bundle_conc", payment_status="paid", status="complete",
                                      amount_total=500, metadata={"price": "bundle_10"})
    distinct = [events.event("customer.subscription.created", sub, created=now - 2),
                events.event("invoice.paid", invoice, created=now - 1),
                events.event("checkout.session.completed", session, created=now - 1),
                events.event("customer.subscription.updated", {**sub, "cancel_at_period_end": True}, created=now)]
    stripe_api.subscriptions[sub["id"]] = {**sub, "cancel_at_period_end": True}
    with serving(create_app(db_url, settings), free_port()) as base:
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            async def post(event):
                payload = json.dumps(event).encode()
                return await http.post("/v1/webhooks/stripe", content=payload, headers={
                    "Stripe-Signature": sign(payload, SECRET), "Content-Type": "application/json"})

            one = distinct[0]
            answers = await asyncio.gather(*[post(one) for _ in range(10)])
            assert [r.status_code for r in answers] == [200] * 10, [r.text for r in answers]
            assert sorted(r.json()["duplicate"] for r in answers) == [False] + [True] * 9
            assert {r.json()["status"] for r in answers} == {"applied"}
            # Every event of one customer at once, each five times.
            answers = await asyncio.gather(*[post(e) for e in distinct[1:] * 5])
            assert {r.status_code for r in answers} == {200}, [r.text for r in answers if r.status_code != 200]
            assert sum(not r.json()["duplicate"] for r in answers) == 3
    assert owner.execute("SELECT count(*) FROM billing.stripe_events WHERE status = 'applied'").fetchone()[0] == 4
    plan, credits, *_ = account_row(owner, acct["account_id"])
    assert plan == "pro" and credits == 10_000_000
    assert owner.execute("SELECT count(*), sum(amount_paid_minor) FROM billing.invoices").fetchone() == (1, 999)
    assert owner.execute("SELECT cancel_at_period_end FROM billing.subscriptions").fetchone()[0] is True
    assert reconciliation_problems(owner) == {}


async def test_item5_an_invoice_before_its_subscription_is_applied_by_reading_the_subscription(
        client, events, stripe_api, new_account, owner):
    acct = new_account("free")
    now = int(time.time())
    sub = Shapes.subscription("sub_later", "cus_later", acct["account_id"], "active", "price_pro_monthly", now, now + 30 * DAY)
    stripe_api.subscriptions[sub["id"]] = sub
    invoice = Shapes.invoice("in_first", "cus_later", "sub_later",
                             [Shapes.line("in_first", "sub_later", "price_pro_monthly", 999, now, now + 30 * DAY)],
                             payment_intent="pi_first")
    r = await webhook(client, events.event("invoice.paid", invoice, created=now))
    assert r.status_code == 200 and r.json()["status"] == "applied", r.text
    assert account_row(owner, acct["account_id"])[0] == "pro"
    late = events.event("customer.subscription.created", {**sub, "status": "incomplete"}, created=now - 1)
    assert (await webhook(client, late)).json()["status"] == "stale"
    assert account_row(owner, acct["account_id"])[0] == "pro"


async def test_item6_two_accounts_with_the_same_idempotency_key_get_their_own_checkouts(client, stripe_api, new_account):
    a, b = new_account("free"), new_account("free")
    answers = []
    for acct in (a, b, a):
        r = await client.post("/v1/billing/checkout", json={"price": "bundle_10"},
                              headers=bearer(acct["api_key"], **{"Idempotency-Key": "order-1"}))
        assert r.status_code == 201, r.text
        answers.append(r.json()["id"])
    assert answers[0] != answers[1] and answers[2] == answers[0]          # a retry gets its own session back
    keys = [key for _, path, _, key in stripe_api.requests if path == "/v1/checkout/sessions"]
    assert keys[0].startswith(f"checkout-{a['account_id']}-") and keys[1].startswith(f"checkout-{b['account_id']}-")
    assert "order-1" not in keys[0] and len(keys[0]) <= 255
    # The same key for another purchase is the client's mistake: 409, not Stripe's 400 as a 502.
    r = await client.post("/v1/billing/checkout", json={"price": "bundle_25"},
                          headers=bearer(a["api_key"], **{"Idempotency-Key": "order-1"}))
    assert r.status_code == 409 and r.json()["type"].endswith("/idempotency-key-reused"), r.text


async def test_item6_top_ups_send_an_account_scoped_key(client, stripe_api, new_account):
    a, b = new_account("free"), new_account("free")
    for acct in (a, b):
        session = (await client.post("/v1/billing/checkout", json={"price": "bundle_10"}, headers=bearer(acct["api_key"]))).json()
        await pay_and_deliver(client, stripe_api, session["id"])
        r = await client.post("/v1/billing/topup", json={"bundle": "bundle_10"},
                              headers=bearer(acct["api_key"], **{"Idempotency-Key": "t-1"}))
        assert r.status_code == 201 and r.json()["status"] == "paid", r.text
    keys = [key for _, path, _, key in stripe_api.requests if path == "/v1/payment_intents"]
    assert keys[0].startswith(f"topup-{a['account_id']}-") and keys[1].startswith(f"topup-{b['account_id']}-")


async def test_item7_buying_a_plan_while_subscribed_is_a_state_conflict(client, stripe_api, new_account):
    acct = new_account("free")
    await subscribe_through_checkout(client, stripe_api, acct)
    r = await client.post("/v1/billing/checkout", json={"price": "unlimited_monthly"}, headers=bearer(acct["api_key"]))
    assert r.status_code == 409 and r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["type"].endswith("/conflict") and r.json()["change_url"] == "/v1/billing/subscription/change"
