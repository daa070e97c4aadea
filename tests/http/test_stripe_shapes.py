"""Issue #23, "Stripe as it really is": each defect tried on full-shape Stripe objects (Stripe's
published fixtures with our ids laid over them, tests/stripe_standin.py ``Shapes``), through the
real ``stripe`` SDK and signed webhook deliveries."""

from __future__ import annotations

import asyncio
import copy
import json
import time

import httpx
import pytest

from api.app import create_app
from tests.conftest import free_port, reconciliation_problems, serving, signup
from tests.http.conftest import DAY, SECRET, account_row, bearer, form, new_api_key, page_client, pay_and_deliver, run_worker, sdk, webhook
from tests.stripe_standin import Shapes, sign


@pytest.fixture
def settings(stripe_settings):
    return stripe_settings


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


async def auto_topup_account(client, stripe_api, new_account, below="5"):
    """An account with a saved card (a first bundle bought through Checkout) and auto top-up on."""
    acct = new_account("free")
    headers = bearer(acct["api_key"])
    session = (await client.post("/v1/billing/checkout", json={"price": "bundle_10"}, headers=headers)).json()
    await pay_and_deliver(client, stripe_api, session["id"])
    r = await client.put("/v1/billing/auto-topup", json={"below": below, "buy": "bundle_10"}, headers=headers)
    assert r.status_code == 200, r.text
    return acct, headers


async def spend_below_threshold(client, acct, key: str) -> None:
    r = await client.post("/v1/usage/events", json={"meter": "generation", "quantity": 18},
                          headers=bearer(acct["api_key"], **{"Idempotency-Key": key}))
    assert r.status_code == 201, r.text


async def test_item9_a_worker_without_stripe_leaves_the_top_up_queued_and_says_why(
        client, db_url, settings, stripe_api, new_account, owner):
    from api.settings import Settings

    acct, headers = await auto_topup_account(client, stripe_api, new_account)
    await spend_below_threshold(client, acct, "w1")
    without_stripe = Settings(public_url=settings.public_url, smtp_url=settings.smtp_url)
    assert await run_worker(db_url, without_stripe) >= 1
    delivered, attempts, error = owner.execute(
        "SELECT delivered_at, attempts, last_error FROM outbox.messages WHERE kind = 'auto_topup'").fetchone()
    assert delivered is None and attempts == 0 and "STRIPE_API_KEY" in error
    assert (await client.get("/v1/billing/auto-topup", headers=headers)).json()["in_flight"] is True
    # A worker that has the key pays it, once.
    owner.execute("UPDATE outbox.messages SET next_attempt_at = now() WHERE kind = 'auto_topup'")
    before = len(stripe_api.sent)
    await run_worker(db_url, settings)
    (paid,) = [e for e in stripe_api.sent[before:] if e["type"] == "payment_intent.succeeded"]
    assert owner.execute("SELECT stripe_payment_intent_id FROM billing.auto_topups").fetchone()[0] == paid["data"]["object"]["id"]
    assert (await webhook(client, paid)).status_code == 200
    assert (await client.get("/v1/billing/auto-topup", headers=headers)).json()["in_flight"] is False
    assert reconciliation_problems(owner) == {}


async def test_item9_off_and_on_clears_a_top_up_in_flight_whose_task_then_pays_nothing(
        client, db_url, settings, stripe_api, new_account, owner):

    acct, headers = await auto_topup_account(client, stripe_api, new_account)
    await spend_below_threshold(client, acct, "o1")
    assert (await client.get("/v1/billing/auto-topup", headers=headers)).json()["in_flight"] is True
    assert (await client.delete("/v1/billing/auto-topup", headers=headers)).json()["in_flight"] is False
    r = await client.put("/v1/billing/auto-topup", json={"below": "5", "buy": "bundle_10"}, headers=headers)
    assert r.json()["in_flight"] is False and r.json()["enabled"] is True
    before = len(stripe_api.requests)
    await run_worker(db_url, settings)                      # the old task: superseded, pays nothing
    assert not [p for _, p, _, _ in stripe_api.requests[before:] if p == "/v1/payment_intents"]
    # The next charge under the threshold queues a new one, which pays.
    r = await client.post("/v1/usage/events", json={"meter": "generation", "quantity": 1},
                          headers=bearer(acct["api_key"], **{"Idempotency-Key": "o2"}))
    assert r.status_code == 201
    await run_worker(db_url, settings)
    keys = [k for _, p, _, k in stripe_api.requests[before:] if p == "/v1/payment_intents"]
    (task,) = owner.execute("SELECT id FROM outbox.messages WHERE kind = 'auto_topup' ORDER BY created_at DESC LIMIT 1").fetchone()
    assert keys == [f"auto-topup-{task}"]


async def test_item9_a_top_up_stripe_never_answers_is_listed_then_released(
        client, db_url, settings, stripe_api, new_account, owner):

    acct, headers = await auto_topup_account(client, stripe_api, new_account)
    await spend_below_threshold(client, acct, "s1")
    before = len(stripe_api.sent)
    await run_worker(db_url, settings)
    (lost,) = [e for e in stripe_api.sent[before:] if e["type"] == "payment_intent.succeeded"]   # never delivered
    owner.execute("UPDATE billing.auto_topups SET in_flight_since = now() - interval '2 hours'")
    stuck = owner.execute("SELECT account_id::text, task_state, stripe_payment_intent_id FROM reporting.stuck_auto_topups").fetchall()
    assert stuck == [(acct["account_id"], "delivered", lost["data"]["object"]["id"])]
    assert list(reconciliation_problems(owner)) == ["stuck_auto_topups"]
    assert owner.execute("SELECT api.release_stuck_auto_topups()").fetchone()[0] == 1
    state = (await client.get("/v1/billing/auto-topup", headers=headers)).json()
    assert state["in_flight"] is False and state["failures"] == 1 and "no answer from Stripe" in state["last_error"]
    assert reconciliation_problems(owner) == {}
    # A new top-up starts; the lost event arrives late: credited, and the new one stays in flight.
    await client.post("/v1/usage/events", json={"meter": "generation", "quantity": 1},
                      headers=bearer(acct["api_key"], **{"Idempotency-Key": "s2"}))
    assert (await client.get("/v1/billing/auto-topup", headers=headers)).json()["in_flight"] is True
    balance = account_row(owner, acct["account_id"])[1]
    assert (await webhook(client, lost)).json()["status"] == "applied"
    assert account_row(owner, acct["account_id"])[1] == balance + 10_000_000
    assert (await client.get("/v1/billing/auto-topup", headers=headers)).json()["in_flight"] is True


async def test_item8_off_session_top_ups_need_no_return_url_and_authenticate_the_same_payment(
        client, db_url, settings, stripe_api, new_account, owner):

    acct, headers = await auto_topup_account(client, stripe_api, new_account)
    r = await client.post("/v1/billing/topup", json={"bundle": "bundle_10"}, headers=headers)
    assert r.status_code == 201 and r.json()["status"] == "paid", r.text
    _, path, params, _ = stripe_api.requests[-1]
    assert path == "/v1/payment_intents" and params["payment_method_types"] == ["card"] and "return_url" not in params
    await spend_below_threshold(client, acct, "a1")
    await run_worker(db_url, settings)                    # the worker's auto top-up: card only too
    (auto,) = [p for _, path, p, _ in stripe_api.requests if path == "/v1/payment_intents" and "auto_topup" in p["metadata"]]
    assert auto["payment_method_types"] == ["card"]

    # The bank wants the person to authenticate: they confirm the PaymentIntent Stripe declined, no new Checkout.
    stripe_api.needs_authentication.add(owner.execute("SELECT stripe_customer_id FROM billing.customers").fetchone()[0])
    sessions, before = len(stripe_api.sessions), len(stripe_api.requests)
    r = await client.post("/v1/billing/topup", json={"bundle": "bundle_25"}, headers=headers)
    assert r.status_code == 201 and r.json()["status"] == "requires_action", r.text
    intent = r.json()["payment_intent"]
    calls = [(path, p) for _, path, p, _ in stripe_api.requests[before:] if path.startswith("/v1/payment_intents")]
    assert [c[0] for c in calls] == ["/v1/payment_intents", f"/v1/payment_intents/{intent}/confirm"]
    assert calls[1][1]["return_url"] == f"{settings.public_url}/billing/success?payment_intent={intent}"
    assert len(stripe_api.sessions) == sessions
    sent = len(stripe_api.sent)
    page = httpx.post(r.json()["url"], follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"].endswith(f"payment_intent={intent}")
    (succeeded,) = stripe_api.sent[sent:]
    assert succeeded["type"] == "payment_intent.succeeded" and succeeded["data"]["object"]["id"] == intent
    balance = account_row(owner, acct["account_id"])[1]
    assert (await webhook(client, succeeded)).json()["status"] == "applied"
    assert account_row(owner, acct["account_id"])[1] == balance + 25_000_000


async def test_item10_a_cancellation_scheduled_by_date_shows_as_ending(client, events, stripe_api, owner):

    person = signup(owner, "ending@example.com")
    acct = {"account_id": person["account_id"], "api_key": new_api_key(owner, person)}
    now = int(time.time())
    sub = Shapes.subscription("sub_date", "cus_date", acct["account_id"], "active", "price_pro_monthly", now, now + 30 * DAY)
    assert (await webhook(client, events.event("customer.subscription.created", sub, created=now))).status_code == 200
    ends = now + 10 * DAY          # chosen in the dashboard or portal: not the period's end
    scheduled = {**sub, "cancel_at": ends, "cancel_at_period_end": False}
    event = events.event("customer.subscription.updated", scheduled, created=now + 1)
    for _ in range(2):
        assert (await webhook(client, event)).status_code == 200
    info = (await client.get("/v1/billing/subscription", headers=bearer(acct["api_key"]))).json()["subscription"]
    assert info["ending"] is True and info["cancel_at"].startswith(time.strftime("%Y-%m-%d", time.gmtime(ends)))
    assert info["cancel_at_period_end"] is False
    emails = owner.execute("SELECT payload ->> 'ends_at' FROM outbox.messages WHERE kind = 'subscription_ending'").fetchall()
    assert emails == [(time.strftime("%Y-%m-%d", time.gmtime(ends)),)]                       # told once
    kept = {**sub, "cancel_at": None}
    assert (await webhook(client, events.event("customer.subscription.updated", kept, created=now + 2))).status_code == 200
    info = (await client.get("/v1/billing/subscription", headers=bearer(acct["api_key"]))).json()["subscription"]
    assert info["ending"] is False and info["cancel_at"] is None


async def test_item10_every_subscription_item_is_read(client, events, stripe_api, new_account, owner):
    acct = new_account("free")
    now = int(time.time())
    sub = Shapes.subscription("sub_items", "cus_items", acct["account_id"], "active", "price_pro_monthly", now, now + 30 * DAY)
    addon = copy.deepcopy(sub["items"]["data"][0])
    addon.update(id="si_addon", price=Shapes.price("price_support_addon"))
    sub["items"]["data"].insert(0, addon)          # an add-on pgtally does not sell comes first
    assert (await webhook(client, events.event("customer.subscription.created", sub, created=now))).json()["status"] == "applied"
    assert account_row(owner, acct["account_id"])[0] == "pro"
    assert owner.execute("SELECT plan_id, stripe_item_id FROM billing.subscriptions").fetchone() == ("pro", "si_sub_items")


async def test_item10_an_invoice_with_more_lines_than_its_event_is_read_whole(client, events, stripe_api, new_account, owner):
    acct = new_account("free")
    sub_id = await subscribe_through_checkout(client, stripe_api, acct)
    item = stripe_api.subscriptions[sub_id]["items"]["data"][0]
    start, end = item["current_period_start"], item["current_period_end"]
    # A renewal invoice with many proration lines first: the new period's line is on a later page.
    lines = [Shapes.line("in_long", sub_id, "price_pro_monthly", 10, start, end, n=i) for i in range(12)]
    lines.append(Shapes.line("in_long", sub_id, "price_pro_monthly", 999, end, end + 30 * DAY, n=12))
    invoice = Shapes.invoice("in_long", stripe_api.subscriptions[sub_id]["customer"], sub_id, lines,
                             payment_intent="pi_long", number="LONG-1", account_id=acct["account_id"])
    stripe_api.invoices["in_long"] = invoice
    sent = copy.deepcopy(invoice)
    sent["lines"].update(data=lines[:10], has_more=True)          # what the event carries
    r = await webhook(client, events.event("invoice.paid", sent))
    assert r.status_code == 200 and r.json()["status"] == "applied", r.text
    row = owner.execute("SELECT period_start, period_end, amount_paid_minor FROM billing.invoices "
                        "WHERE stripe_invoice_id = 'in_long'").fetchone()
    assert (int(row[0].timestamp()), int(row[1].timestamp()), row[2]) == (start, end + 30 * DAY, 1119)
    assert int(account_row(owner, acct["account_id"])[3].timestamp()) == end + 30 * DAY
    recorded = owner.execute("SELECT payload #> '{data,object,lines,has_more}' FROM billing.stripe_events "
                             "WHERE type = 'invoice.paid' AND payload #>> '{data,object,id}' = 'in_long'").fetchone()[0]
    assert recorded is True                                        # recorded as Stripe sent it


async def test_item12_a_new_subscription_checkout_expires_the_one_still_open(client, stripe_api, new_account, owner):
    acct = new_account("free")
    headers = bearer(acct["api_key"])
    first = (await client.post("/v1/billing/checkout", json={"price": "pro_monthly"}, headers=headers)).json()["id"]
    answers = await asyncio.gather(*[client.post("/v1/billing/checkout", json={"price": p}, headers=headers)
                                     for p in ("pro_monthly", "unlimited_monthly")])     # two tabs, at once
    assert [r.status_code for r in answers] == [201, 201], [r.text for r in answers]
    ids = [first] + [r.json()["id"] for r in answers]
    assert sorted(stripe_api.sessions[i]["status"] for i in ids) == ["expired", "expired", "open"]
    assert owner.execute("SELECT count(*) FROM billing.checkout_sessions WHERE status = 'open'").fetchone()[0] == 1
    expired = [e for e in stripe_api.sent if e["type"] == "checkout.session.expired"]
    assert len(expired) == 2
    for event in expired:           # pgtally closed them already
        assert (await webhook(client, event)).json()["status"] == "ignored"
    # A bundle's Checkout leaves the subscription's open.
    await client.post("/v1/billing/checkout", json={"price": "bundle_10"}, headers=headers)
    assert sum(stripe_api.sessions[i]["status"] == "open" for i in ids) == 1
    (still_open,) = [i for i in ids if stripe_api.sessions[i]["status"] == "open"]
    await pay_and_deliver(client, stripe_api, still_open)
    assert owner.execute("SELECT status FROM billing.checkout_sessions WHERE stripe_checkout_session_id = %s",
                         [still_open]).fetchone()[0] == "complete"


async def test_item12_a_second_subscription_that_arrives_anyway_is_canceled_refunded_and_told(
        client, db_url, settings, stripe_api, owner):

    owner.execute("UPDATE billing.plans SET included_credits_micros = 5000000 WHERE id = 'pro'")
    person = signup(owner, "twice@example.com")
    acct = {"account_id": person["account_id"], "api_key": new_api_key(owner, person)}
    first = (await client.post("/v1/billing/checkout", json={"price": "pro_monthly"},
                               headers=bearer(acct["api_key"]))).json()["id"]
    customer = owner.execute("SELECT stripe_customer_id FROM billing.customers").fetchone()[0]
    # A second session pgtally could not expire in time (opened elsewhere, or paid as it was expired).
    metadata = {"account_id": acct["account_id"], "price": "pro_monthly"}
    second = sdk(stripe_api).v1.checkout.sessions.create(params={
        "mode": "subscription", "customer": customer, "client_reference_id": acct["account_id"], "metadata": metadata,
        "line_items": [{"price": "price_pro_monthly", "quantity": 1}], "subscription_data": {"metadata": metadata},
        "success_url": "https://app.example.com/ok", "cancel_url": "https://app.example.com/no"}).id
    await pay_and_deliver(client, stripe_api, first)
    await pay_and_deliver(client, stripe_api, second)
    kept, extra = stripe_api.sessions[first]["subscription"], stripe_api.sessions[second]["subscription"]
    assert owner.execute("SELECT stripe_subscription_id, kept_subscription_id FROM billing.duplicate_subscriptions").fetchall() == [
        (extra, kept)]
    assert account_row(owner, acct["account_id"])[0] == "pro"
    plan_credits = owner.execute("SELECT count(*) FROM ledger.transfers WHERE kind = 'plan_credits'").fetchone()[0]

    before = len(stripe_api.sent)
    await run_worker(db_url, settings)
    calls = [(m, p, k) for m, p, _, k in stripe_api.requests if p.startswith(("/v1/subscriptions/", "/v1/refunds"))]
    assert calls == [("DELETE", f"/v1/subscriptions/{extra}", f"cancel-duplicate-{extra}"),
                     ("POST", "/v1/refunds", f"refund-duplicate-inpay_{stripe_api.sessions[second]['invoice']}")]
    for event in stripe_api.sent[before:]:
        assert (await webhook(client, event)).status_code == 200
    assert sorted(owner.execute("SELECT stripe_subscription_id, status FROM billing.subscriptions").fetchall()) == sorted(
        [(kept, "active"), (extra, "canceled")])
    assert owner.execute("SELECT status FROM billing.invoices WHERE stripe_subscription_id = %s", [extra]).fetchone()[0] == "refunded"
    assert owner.execute("SELECT canceled_at IS NOT NULL, refunded_minor FROM billing.duplicate_subscriptions").fetchone() == (True, 999)
    assert account_row(owner, acct["account_id"])[0] == "pro"
    assert owner.execute("SELECT count(*) FROM ledger.transfers WHERE kind = 'plan_credits'").fetchone()[0] == plan_credits == 1
    told = owner.execute("SELECT kind, payload ->> 'subscription', delivered_at IS NOT NULL FROM outbox.messages "
                         "WHERE recipient = 'twice@example.com' AND kind LIKE 'subscription_%'").fetchall()
    assert told == [("subscription_duplicate", extra, True)]          # and no "your plan has ended"
    assert reconciliation_problems(owner) == {}


async def test_item11_meter_events_stripe_rejects_later_are_recorded_and_the_daily_totals_differ(
        client, db_url, settings, stripe_api, new_account, owner):
    import psycopg

    from api import db
    from api.worker import compare_meter_totals

    acct = new_account("free")
    headers = bearer(acct["api_key"])
    session = (await client.post("/v1/billing/checkout", json={"price": "pay_per_use_monthly"}, headers=headers)).json()
    await pay_and_deliver(client, stripe_api, session["id"])
    ids = []
    for i, quantity in enumerate((3, 4, 5)):
        r = await client.post("/v1/usage/events", json={"meter": "generation", "quantity": quantity},
                              headers=bearer(acct["api_key"], **{"Idempotency-Key": f"m{i}"}))
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    await run_worker(db_url, settings)
    assert sorted(stripe_api.meter_events) == sorted(ids)

    # Stripe accepted them, then rejects one in validation: a thin event, read whole from Stripe.
    notification = stripe_api.reject_meter_events([ids[1]])
    assert "data" not in notification and notification["object"] == "v2.core.event"
    for _ in range(2):
        r = await webhook(client, notification)
        assert r.status_code == 200 and r.json()["status"] == "applied", r.text
    assert owner.execute("SELECT stripe_meter_id, error_count, identifiers FROM billing.meter_error_reports").fetchall() == [
        ("mtr_pgtally_generation", 1, [ids[1]])]
    assert ("GET", f"/v2/core/events/{notification['id']}") in [(m, p) for m, p, _, _ in stripe_api.requests]

    # The day after: the worker compares what pgtally reported with Stripe's meter event summaries, once.
    owner.execute(f"ALTER DATABASE \"{owner.info.dbname}\" SET pgtally.now = '{time.strftime('%Y-%m-%d', time.gmtime(time.time() + DAY))} 06:00+00'")
    async with await psycopg.AsyncConnection.connect(db.api_conninfo(db_url), autocommit=True) as conn:
        assert await compare_meter_totals(conn, settings) == 1
        assert await compare_meter_totals(conn, settings) == 0
    rows = owner.execute("SELECT account_id::text, event_name, reported_units, stripe_units, difference_units, error_reports "
                         "FROM reporting.meter_total_mismatches").fetchall()
    assert rows == [(acct["account_id"], "pgtally_generation", 12, 8, -4, [notification["id"]])]
    assert "meter_total_mismatches" in reconciliation_problems(owner)


async def test_tax_opt_in_turns_on_stripe_tax_in_checkout_and_records_the_tax(db_url, stripe_api, new_account, owner):
    from litestar.testing import AsyncTestClient

    from api.settings import Settings
    from tests.http.conftest import PUBLIC_URL

    taxed = Settings(public_url=PUBLIC_URL, stripe_api_key="sk_test_pgtally", stripe_api_base=stripe_api.url,
                     stripe_webhook_secret="whsec_test_secret", stripe_tax=True)
    acct = new_account("free")
    headers = bearer(acct["api_key"])
    async with AsyncTestClient(app=create_app(db_url, taxed)) as client:
        for price in ("bundle_10", "pro_monthly"):
            session = (await client.post("/v1/billing/checkout", json={"price": price}, headers=headers)).json()
            _, _, params, _ = [r for r in stripe_api.requests if r[1] == "/v1/checkout/sessions"][-1]
            assert params["automatic_tax"] == {"enabled": "true"} and params["tax_id_collection"] == {"enabled": "true"}
            assert params["billing_address_collection"] == "required" and params["customer_update"]["address"] == "auto"
            await pay_and_deliver(client, stripe_api, session["id"])
        invoices = (await client.get("/v1/billing/invoices", headers=headers)).json()["data"]
    assert owner.execute("SELECT amount_minor, tax_minor FROM billing.payments").fetchone() == (600, 100)
    assert sorted((i["kind"], i["amount_paid"], i["tax"]) for i in invoices) == [("purchase", 600, 100),
                                                                                ("subscription", 1199, 200)]
    assert reconciliation_problems(owner) == {}


async def test_invoices_for_every_payment_a_bundle_is_invoiced_listed_and_on_the_dashboard(
        db_url, settings, client, stripe_api, owner):

    async with await page_client(db_url, settings) as pages:
        await pages.post("/v1/auth/signup", json={"email": "invoices@example.com", "password": "violet-harbour-tangent-42"})
        owner.execute("UPDATE identity.users SET email_verified_at = now()")
        assert (await form(pages, "/login", {"email": "invoices@example.com",
                                             "password": "violet-harbour-tangent-42"})).status_code in (302, 303)
        r = await form(pages, "/upgrade/checkout", {"price": "bundle_10"}, "/upgrade")
        session_id = r.headers["location"].rsplit("/", 1)[-1]
        assert stripe_api.sessions[session_id]["invoice_creation"]["enabled"] is True
        await pay_and_deliver(pages, stripe_api, session_id)
        invoice = stripe_api.invoices[stripe_api.sessions[session_id]["invoice"]]
        assert invoice["parent"] is None and invoice["metadata"]["price"] == "bundle_10"
        dashboard = (await pages.get("/dashboard")).text
        assert invoice["number"] in dashboard and f'href="{invoice["invoice_pdf"]}"' in dashboard
    key = owner.execute("SELECT api_key FROM (SELECT (api.create_api_key(s.id, 'test', ARRAY['billing:read']) ->> 'api_key') "
                        "AS api_key FROM identity.sessions s LIMIT 1) k").fetchone()[0]
    listed = (await client.get("/v1/billing/invoices", headers=bearer(key))).json()["data"]
    assert [(i["id"], i["kind"], i["number"], i["status"], i["amount_paid"], i["invoice_pdf"], i["hosted_invoice_url"])
            for i in listed] == [(invoice["id"], "purchase", invoice["number"], "paid", 500, invoice["invoice_pdf"],
                                  invoice["hosted_invoice_url"])]
    # Refunded in full: the invoice says so; the money left pgtally's revenue with the payment.
    before = len(stripe_api.sent)
    stripe_api.refund(stripe_api.sessions[session_id]["payment_intent"])
    for event in stripe_api.sent[before:]:
        assert (await webhook(client, event)).status_code == 200
    (listed,) = (await client.get("/v1/billing/invoices", headers=bearer(key))).json()["data"]
    assert (listed["status"], listed["refunded"]) == ("refunded", 500)
    assert owner.execute("SELECT count(*) FROM reporting.revenue_monthly WHERE revenue_minor > 0").fetchone()[0] == 0
    assert reconciliation_problems(owner) == {}


async def test_invoices_for_every_payment_a_top_up_is_invoiced_with_its_payment_attached(
        client, db_url, settings, stripe_api, new_account, owner):

    acct, headers = await auto_topup_account(client, stripe_api, new_account)
    r = await client.post("/v1/billing/topup", json={"bundle": "bundle_25"}, headers=headers)
    assert r.json()["status"] == "paid", r.text
    intent = r.json()["payment_intent"]
    (succeeded,) = [e for e in stripe_api.sent if e["type"] == "payment_intent.succeeded"]
    assert (await webhook(client, succeeded)).json()["status"] == "applied"
    before, sent = len(stripe_api.requests), len(stripe_api.sent)
    await run_worker(db_url, settings)
    calls = [(p.split("/")[-1] if p.count("/") > 3 else p) for m, p, _, _ in stripe_api.requests[before:] if m == "POST"]
    assert calls == ["/v1/invoices", "/v1/invoiceitems", "finalize", "attach_payment"]
    (paid,) = stripe_api.sent[sent:]
    assert paid["type"] == "invoice.paid" and paid["data"]["object"]["payments"]["data"][0]["payment"]["payment_intent"] == intent
    assert (await webhook(client, paid)).json()["status"] == "applied"
    # The task again (a worker that died before recording it): the same invoice, not a second one.
    owner.execute("UPDATE outbox.messages SET delivered_at = NULL, next_attempt_at = now() WHERE kind = 'invoice_topup'")
    await run_worker(db_url, settings)
    assert len([i for i in stripe_api.invoices.values() if i["metadata"].get("payment_intent") == intent]) == 1
    listed = (await client.get("/v1/billing/invoices", headers=headers)).json()["data"]
    topup = [i for i in listed if i["id"] == paid["data"]["object"]["id"]]
    assert [(i["kind"], i["status"], i["amount_paid"], i["number"] is not None, i["invoice_pdf"] is not None) for i in topup] == [
        ("purchase", "paid", 1000, True, True)]
    assert owner.execute("SELECT count(*) FROM billing.payment_invoices").fetchone()[0] == 2     # the bundle's and the top-up's
    assert reconciliation_problems(owner) == {}


async def test_reconcile_lists_a_dispute_of_a_payment_pgtally_never_saw(client, events, owner):
    dispute = Shapes.dispute("dp_stray", "ch_never_seen", "pi_never_seen", 700)
    assert (await webhook(client, events.event("charge.dispute.created", dispute))).json()["status"] == "applied"
    assert owner.execute("SELECT stripe_dispute_id FROM reporting.unmatched_disputes").fetchall() == [("dp_stray",)]
    assert list(reconciliation_problems(owner)) == ["unmatched_disputes"]


async def test_item11_each_event_destination_may_sign_with_its_own_secret(db_url, events, stripe_api):
    from litestar.testing import AsyncTestClient

    from api.settings import Settings

    two = Settings(stripe_api_key="sk_test_pgtally", stripe_api_base=stripe_api.url,
                   stripe_webhook_secret="whsec_snapshot, whsec_thin")
    event = events.event("customer.created", {"id": "cus_x", "object": "customer"})
    async with AsyncTestClient(app=create_app(db_url, two)) as client:
        for secret, status in (("whsec_snapshot", 200), ("whsec_thin", 200), ("whsec_other", 400)):
            assert (await webhook(client, event, secret=secret)).status_code == status
