"""Issue #23, "The stand-in speaks Stripe": its test-clock-like controls (renew, fail a renewal and
retry it, end a period, refund, dispute), from tests and from the command line, and every event
type pgtally handles delivered the way Stripe delivers: concurrently, twice, out of order."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time

import httpx
import pytest

from api.app import create_app
from api.settings import Settings
from tests.conftest import free_port, reconciliation_problems, serving, signup
from tests.http.conftest import PUBLIC_URL, SECRET, account_row, bearer, new_api_key, pay_and_deliver, sdk, webhook
from tests.stripe_standin import StripeStandIn, sign


@pytest.fixture
def settings(stripe_settings):
    return stripe_settings


HANDLED = {"checkout.session.completed", "checkout.session.async_payment_succeeded", "checkout.session.expired",
           "customer.subscription.created", "customer.subscription.updated", "customer.subscription.deleted",
           "invoice.paid", "invoice.payment_failed", "charge.refunded", "payment_intent.succeeded",
           "charge.dispute.created", "charge.dispute.updated", "charge.dispute.closed", "invoice_payment.paid",
           "v1.billing.meter.error_report_triggered"}


def ctl(url: str, *args: str) -> dict:
    """``python -m tests.stripe_standin ctl ...``, as the README shows it."""
    out = subprocess.run([sys.executable, "-m", "tests.stripe_standin", "ctl", *args, "--url", url],
                         capture_output=True, text=True, timeout=60, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    return json.loads(out.stdout)


def wait_for(check, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.1)
    return result


def test_the_standins_controls_renew_fail_and_recover_a_subscription_from_the_command_line(db_url, new_account, owner):
    """The README's offline walk-through: a renewal, a failed renewal and its successful retry, a
    refund and a dispute, each a `ctl` command; the events reach pgtally's webhook, signed."""
    port = free_port()
    with StripeStandIn(f"http://127.0.0.1:{port}/v1/webhooks/stripe", SECRET) as standin:
        settings = Settings(public_url=PUBLIC_URL, pool_max_size=8, stripe_api_key="sk_test_x",
                            stripe_api_base=standin.url, stripe_webhook_secret=SECRET)
        acct = new_account("free")
        with serving(create_app(db_url, settings), port) as base:
            r = httpx.post(f"{base}/v1/billing/checkout", json={"price": "pro_monthly"}, headers=bearer(acct["api_key"]))
            assert httpx.post(r.json()["url"]).status_code == 303                 # "Pay"
            wait_for(lambda: account_row(owner, acct["account_id"])[0] == "pro")
            (sub_id,) = ctl(standin.url, "state")["subscriptions"]
            end = account_row(owner, acct["account_id"])[3]

            renewal = ctl(standin.url, "renew", sub_id)
            assert renewal["status"] == "paid" and renewal["billing_reason"] == "subscription_cycle"
            wait_for(lambda: account_row(owner, acct["account_id"])[2] == end)  # the next period began

            failed = ctl(standin.url, "fail_renewal", sub_id)
            assert failed["status"] == "open"
            wait_for(lambda: account_row(owner, acct["account_id"])[4] is not None)   # payment grace
            assert owner.execute("SELECT status FROM billing.subscriptions").fetchone()[0] == "past_due"
            assert ctl(standin.url, "state")["open_invoices"] == [failed["id"]]

            ctl(standin.url, "pay_invoice", failed["id"])                       # Stripe's retry succeeds
            wait_for(lambda: account_row(owner, acct["account_id"])[4] is None)
            wait_for(lambda: owner.execute("SELECT status FROM billing.subscriptions").fetchone()[0] == "active")
            assert owner.execute("SELECT count(*) FROM billing.invoices WHERE status = 'paid'").fetchone()[0] == 3

            payment = f"pi_{failed['id']}"
            ctl(standin.url, "refund", payment, "--amount", "300")
            wait_for(lambda: owner.execute("SELECT refunded_minor FROM billing.invoices WHERE stripe_invoice_id = %s",
                                           [failed["id"]]).fetchone()[0] == 300)
            dispute = ctl(standin.url, "dispute", payment)
            wait_for(lambda: owner.execute("SELECT account_id::text FROM billing.disputes").fetchone())
            ctl(standin.url, "close_dispute", dispute["id"], "--status", "lost")
            wait_for(lambda: owner.execute("SELECT status FROM billing.disputes").fetchone()[0] == "lost")
            ctl(standin.url, "end_period", sub_id)
            wait_for(lambda: account_row(owner, acct["account_id"])[0] == "free")
            bad = httpx.post(f"{standin.url}/_control/renew", json={})
            assert bad.status_code == 400 and "subscription" in bad.json()["error"]["message"]
    assert reconciliation_problems(owner) == {}


def snapshot(owner) -> dict:
    """Everything a Stripe event can change: plans, balances, the ledger, billing records, the inbox."""
    queries = {
        "accounts": "SELECT id, plan_id, credit_balance_micros, held_micros, billing_period_start, billing_period_end, "
                    "plan_grace_until FROM identity.accounts ORDER BY id",
        "ledger": "SELECT account_id, count(*), sum(amount_micros) FROM ledger.entries GROUP BY 1 ORDER BY 1",
        "transfers": "SELECT kind, idempotency_key, amount_micros FROM ledger.transfers ORDER BY 2, 1",
        "subscriptions": "SELECT stripe_subscription_id, status, plan_id, current_period_start, current_period_end, "
                         "cancel_at_period_end, cancel_at, last_event_id FROM billing.subscriptions ORDER BY 1",
        "invoices": "SELECT stripe_invoice_id, status, amount_paid_minor, refunded_minor, period_start, period_end "
                    "FROM billing.invoices ORDER BY 1",
        "payments": "SELECT stripe_payment_intent_id, amount_minor, refunded_minor, clawed_back_micros FROM billing.payments ORDER BY 1",
        "invoice_payments": "SELECT * FROM billing.invoice_payments ORDER BY 1",
        "disputes": "SELECT stripe_dispute_id, account_id, status, amount_minor FROM billing.disputes ORDER BY 1",
        "checkouts": "SELECT stripe_checkout_session_id, status FROM billing.checkout_sessions ORDER BY 1",
        "inbox": "SELECT id, status FROM billing.stripe_events ORDER BY 1",
        "meter_errors": "SELECT stripe_event_id, error_count, identifiers FROM billing.meter_error_reports ORDER BY 1",
        "outbox": "SELECT kind, count(*) FROM outbox.messages GROUP BY 1 ORDER BY 1",
    }
    return {name: owner.execute(sql).fetchall() for name, sql in queries.items()}


async def test_every_handled_event_type_delivered_concurrently_twice_and_shuffled_answers_2xx_and_replays_change_nothing(
        client, db_url, settings, events, stripe_api, new_account, owner):
    acct = new_account("free")
    headers = bearer(acct["api_key"])
    start = len(stripe_api.sent)
    # A customer's life at Stripe, with nothing delivered yet: a bundle, a top-up with the saved
    # card, a subscription renewed, a failed renewal retried, a refund, a dispute, the end.
    bundle = (await client.post("/v1/billing/checkout", json={"price": "bundle_10"}, headers=headers)).json()["id"]
    stripe_api.pay(stripe_api.sessions[bundle])
    topup = (await client.post("/v1/billing/topup", json={"bundle": "bundle_25"}, headers=headers)).json()
    assert topup["status"] == "paid", topup
    abandoned = (await client.post("/v1/billing/checkout", json={"price": "bundle_10"}, headers=headers)).json()["id"]
    sdk(stripe_api).v1.checkout.sessions.expire(abandoned)
    plan = (await client.post("/v1/billing/checkout", json={"price": "pro_monthly"}, headers=headers)).json()["id"]
    stripe_api.pay(stripe_api.sessions[plan])
    sub_id = stripe_api.sessions[plan]["subscription"]
    stripe_api.renew(sub_id)
    failed = stripe_api.fail_renewal(sub_id)
    stripe_api.pay_invoice(failed["id"])
    stripe_api.refund(stripe_api.sessions[bundle]["payment_intent"], 200)
    dispute = stripe_api.dispute(topup["payment_intent"])
    stripe_api.send_event("charge.dispute.updated", {**dispute, "status": "under_review"})
    stripe_api.close_dispute(dispute["id"], "won")
    stripe_api.end_period(sub_id)
    generated = stripe_api.sent[start:]
    first_invoice = next(e for e in generated if e["type"] == "invoice.paid")["data"]["object"]
    completed = next(e for e in generated if e["type"] == "checkout.session.completed")
    generated += [events.event("invoice_payment.paid", first_invoice["payments"]["data"][0]),
                  events.event("checkout.session.async_payment_succeeded", completed["data"]["object"])]
    # A meter event Stripe accepted, then rejected: a thin event, which pgtally reads whole from Stripe.
    stripe_api.meter_events["mev_rejected"] = {
        "object": "billing.meter_event", "event_name": "pgtally_generation", "identifier": "mev_rejected",
        "payload": {"stripe_customer_id": "cus_elsewhere", "value": "2"}, "timestamp": int(time.time()), "created": 0}
    generated.append(stripe_api.reject_meter_events(["mev_rejected"]))
    assert {e["type"] for e in generated} == HANDLED

    rng = random.Random(23)
    port = free_port()
    with serving(create_app(db_url, settings), port) as base:
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            async def post(event):
                payload = json.dumps(event).encode()
                return await http.post("/v1/webhooks/stripe", content=payload, headers={
                    "Stripe-Signature": sign(payload, SECRET), "Content-Type": "application/json"})

            async def deliver_like_stripe():
                batch = generated * 2
                rng.shuffle(batch)
                return await asyncio.gather(*[post(e) for e in batch])

            answers = await deliver_like_stripe()
            assert {r.status_code for r in answers} == {200}, [r.text for r in answers if r.status_code != 200]
            assert sum(not r.json()["duplicate"] for r in answers) == len(generated)
            before = snapshot(owner)
            assert len(before["meter_errors"]) == 1 and len(before["disputes"]) == 1 and len(before["invoices"]) == 3
            answers = await deliver_like_stripe()                  # Stripe delivers them all again
            assert {r.status_code for r in answers} == {200}
            assert all(r.json()["duplicate"] for r in answers)
    assert snapshot(owner) == before
    assert account_row(owner, acct["account_id"])[0] == "free"                        # the subscription ended
    assert owner.execute("SELECT count(*) FROM billing.invoices").fetchone()[0] == 3


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_delivered_late_concurrently_and_twice_a_failed_renewal_and_its_retry_settle_as_stripe_has_them(
        db_url, new_account, owner, seed):
    """The stand-in delivering like Stripe (--like-stripe): the retry's invoice.paid may come
    before the failure's invoice.payment_failed; the account ends paid up, with no grace."""
    port = free_port()
    with StripeStandIn(f"http://127.0.0.1:{port}/v1/webhooks/stripe", SECRET, like_stripe=True, seed=seed) as standin:
        settings = Settings(public_url=PUBLIC_URL, pool_max_size=8, stripe_api_key="sk_test_x",
                            stripe_api_base=standin.url, stripe_webhook_secret=SECRET)
        acct = new_account("free")
        with serving(create_app(db_url, settings), port) as base:
            r = httpx.post(f"{base}/v1/billing/checkout", json={"price": "pro_monthly"}, headers=bearer(acct["api_key"]))
            httpx.post(r.json()["url"])
            wait_for(lambda: account_row(owner, acct["account_id"])[0] == "pro")
            (sub_id,) = standin.subscriptions
            standin.renew(sub_id)
            failed = standin.fail_renewal(sub_id)
            standin.pay_invoice(failed["id"])
            events = len(standin.sent)
            wait_for(lambda: owner.execute("SELECT count(DISTINCT id) FROM billing.stripe_events").fetchone()[0] == events)
            time.sleep(1.5)                                # the second copies, still arriving
    assert owner.execute("SELECT status FROM billing.subscriptions").fetchone()[0] == "active"
    assert account_row(owner, acct["account_id"])[4] is None                     # no payment grace left
    assert owner.execute("SELECT count(*) FROM billing.invoices WHERE status = 'paid'").fetchone()[0] == 3
    assert reconciliation_problems(owner) == {}


async def test_a_payment_failure_delivered_after_its_invoice_was_paid_changes_nothing(
        client, stripe_api, new_account, owner):

    person = signup(owner, "late@example.com")
    acct = {"account_id": person["account_id"], "api_key": new_api_key(owner, person)}
    session = (await client.post("/v1/billing/checkout", json={"price": "pro_monthly"}, headers=bearer(acct["api_key"]))).json()
    await pay_and_deliver(client, stripe_api, session["id"])
    sub_id = stripe_api.sessions[session["id"]]["subscription"]
    start = len(stripe_api.sent)
    failed = stripe_api.fail_renewal(sub_id)
    stripe_api.pay_invoice(failed["id"])
    failure, past_due, paid, active = stripe_api.sent[start:]
    for event in (paid, active, past_due, failure):             # Stripe's order is not guaranteed
        assert (await webhook(client, event)).status_code == 200
    assert account_row(owner, acct["account_id"])[4] is None
    assert owner.execute("SELECT status FROM billing.invoices WHERE stripe_invoice_id = %s", [failed["id"]]).fetchone()[0] == "paid"
    assert owner.execute("SELECT count(*) FROM outbox.messages WHERE kind = 'payment_failed'").fetchone()[0] == 0
