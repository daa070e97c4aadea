"""Operations: /metrics (parsed by prometheus-client's own parser), X-Request-Id, /readyz,
operator alerts once an hour per condition, the customers' billing emails, invoices, and the
staff-only metrics page with its charts."""

from __future__ import annotations

import re
import time

import pytest

from api import db
from api.settings import Settings
from tests.http.conftest import PUBLIC_URL, SECRET, bearer, form, page_client, samples, webhook
from tests.stripe_standin import Events

PASSWORD = "violet-harbour-tangent-42"
DAY = 86400


@pytest.fixture
def settings(smtp) -> Settings:
    return Settings(public_url=PUBLIC_URL, pool_max_size=16, smtp_url=f"smtp://127.0.0.1:{smtp.port}",
                    stripe_webhook_secret=SECRET)


async def test_metrics_count_requests_consume_outcomes_and_webhooks(client, new_account, owner):
    acct = new_account("free")
    events = Events()
    send = lambda key, q=1: client.post("/v1/usage/events", json={"meter": "generation", "quantity": q},
                                        headers=bearer(acct["api_key"], **{"Idempotency-Key": key}))
    before = samples((await client.get("/metrics")).text, "pgtally_consume_total")
    assert (await send("m1")).status_code == 201
    assert (await send("m1")).status_code == 200
    assert (await send("m2", 50)).status_code == 402
    await webhook(client, events.event("customer.created", {"id": "cus_m", "object": "customer"}))
    r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    after = samples(r.text, "pgtally_consume_total")
    for outcome in ("charged", "replayed", "refused"):
        assert after[(("outcome", outcome),)] - before.get((("outcome", outcome),), 0) == 1
    requests = samples(r.text, "pgtally_http_requests_total")
    assert requests[(("method", "POST"), ("route", "/v1/usage/events"), ("status", "201"))] >= 1
    assert samples(r.text, "pgtally_stripe_webhook_events_total")[(("outcome", "ignored"), ("type", "customer.created"))] >= 1
    assert samples(r.text, "pgtally_http_request_seconds_count")[(("method", "POST"), ("route", "/v1/usage/events"))] >= 3
    assert samples(r.text, "pgtally_usage_rollup_lag_seconds")[()] >= 0
    assert samples(r.text, "pgtally_pool_connections")[(("state", "size"),)] >= 1


async def test_every_answer_carries_a_request_id(client):
    r = await client.get("/healthz", headers={"X-Request-Id": "trace-42.a_b"})
    assert r.headers["x-request-id"] == "trace-42.a_b"
    r = await client.get("/v1/balance", headers={"X-Request-Id": "no spaces allowed"})
    assert r.status_code == 401 and re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])


async def test_readyz_is_ready_when_the_schema_is_current(client, owner):
    r = await client.get("/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ready", "schema": db.latest_migration()}
    owner.execute("DELETE FROM public._yoyo_migration WHERE migration_id = %s", [db.latest_migration()])
    r = await client.get("/readyz")
    assert r.status_code == 503 and "pgtally db upgrade" in r.json()["detail"]


async def test_item4_read_only_database_answers_503_serves_reads_and_readyz_says_not_ready(db_url, settings, owner,
                                                                                          new_account):
    import asyncio

    from litestar.testing import AsyncTestClient

    from api.app import create_app

    key = new_account("free")["api_key"]              # never used: a read would note last_used_at
    headers = bearer(key)
    dbname = owner.info.dbname
    owner.execute(f'ALTER DATABASE "{dbname}" SET default_transaction_read_only = on')
    async with AsyncTestClient(app=create_app(db_url, settings)) as client:
        for _ in range(2):
            r = await client.get("/v1/balance", headers=headers)
            assert r.status_code == 200, r.text                       # a read is served
            r = await client.post("/v1/usage/events", json={"meter": "generation"},
                                  headers={**headers, "Idempotency-Key": "ro-1"})
            assert r.status_code == 503 and r.headers["retry-after"], r.text
            assert r.json()["type"].endswith("/retry-later") and "read-only" in r.json()["detail"]
        r = await client.get("/readyz")
        assert r.status_code == 503 and "read-only" in r.json()["detail"]
        assert (await client.get("/healthz")).status_code == 200     # alive: a restart would not help
        assert owner.execute("SELECT last_used_at FROM identity.api_keys WHERE key_hash = util.token_hash(%s)",
                             [key]).fetchone() == (None,)

        owner.execute(f'ALTER DATABASE "{dbname}" RESET default_transaction_read_only')
        # The pool replaces a read-only session 5 s old (it keeps the default it started with).
        for _ in range(150):
            r = await client.post("/v1/usage/events", json={"meter": "generation"},
                                  headers={**headers, "Idempotency-Key": "ro-1"})
            if r.status_code != 503:
                break
            await asyncio.sleep(0.1)
        assert r.status_code == 201, r.text
        assert (await client.get("/readyz")).status_code == 200


def test_alerts_go_out_once_an_hour_per_condition(owner, api_conn, new_account):
    check = lambda: api_conn.execute("SELECT api.check_alerts('ops@example.com')").fetchone()[0]["sent"]
    clock = lambda minutes: api_conn.execute(
        "SELECT set_config('pgtally.now', (now() + make_interval(mins => %s))::text, false)", [minutes])
    assert check() == []
    api_conn.execute("SELECT api.stripe_webhook_rejected('abc', 'the body is not JSON')")
    assert check() == ["webhook_rejected"]
    assert check() == []                                          # not again within the hour
    api_conn.execute("SELECT api.stripe_webhook_rejected('def', 'another')")
    clock(30)
    assert check() == []
    clock(61)
    assert check() == ["webhook_rejected"]                        # the one since the last alert
    clock(130)
    assert check() == []                                          # nothing new
    acct = new_account("free")
    owner.execute("UPDATE identity.accounts SET credit_balance_micros = 7 WHERE id = %s", [acct["account_id"]])
    assert check() == ["reconciliation"]
    assert check() == []
    owner.execute("UPDATE outbox.messages SET failed_at = now() + interval '3 hours' WHERE kind = 'alert'")
    owner.execute("INSERT INTO outbox.messages (kind, recipient, payload, failed_at) "
                  "VALUES ('verify_email', 'x@example.com', '{}', now() + interval '2 hours')")
    clock(200)
    assert sorted(check()) == ["outbox_failed", "reconciliation"]
    alerts = owner.execute("SELECT recipient, payload ->> 'condition' FROM outbox.messages WHERE kind = 'alert' "
                           "ORDER BY created_at").fetchall()
    assert sorted(c for _, c in alerts) == ["outbox_failed", "reconciliation", "reconciliation",
                                            "webhook_rejected", "webhook_rejected"]
    assert {r for r, _ in alerts} == {"ops@example.com"}


async def verified_customer(client, owner, email: str) -> dict:
    await client.post("/v1/auth/signup", json={"email": email, "password": PASSWORD})
    user_id, account_id = owner.execute("SELECT id, account_id FROM identity.users WHERE email_normalized = %s",
                                        [email]).fetchone()
    owner.execute("SELECT identity.mark_email_verified(%s)", [user_id])
    token = (await client.post("/v1/auth/login", json={"email": email, "password": PASSWORD})).json()["access_token"]
    return {"account_id": str(account_id), "token": token}


async def test_customers_hear_of_receipts_failed_payments_and_their_plan_ending(client, owner, smtp, deliver):
    events = Events()
    who = await verified_customer(client, owner, "payer@example.com")
    await webhook(client, events.event("checkout.session.completed", {
        "id": "cs_mail", "object": "checkout.session", "mode": "payment", "payment_status": "paid", "customer": "cus_mail",
        "client_reference_id": who["account_id"], "payment_intent": "pi_mail", "amount_total": 500, "currency": "usd",
        "metadata": {"price": "bundle_10"}}))
    now = int(time.time())
    sub = Events.subscription("sub_mail", "cus_mail", who["account_id"], "active", "price_pro_monthly", now - DAY, now + 29 * DAY)
    await webhook(client, events.event("customer.subscription.created", sub, created=now - 50))
    invoice = {"id": "in_mail", "object": "invoice", "number": "MAIL-1", "customer": "cus_mail", "amount_due": 999,
               "currency": "usd", "parent": {"subscription_details": {"subscription": "sub_mail"}},
               "lines": {"data": [{"amount": 999, "period": {"start": now, "end": now + 30 * DAY}}]}}
    await webhook(client, events.event("invoice.payment_failed", invoice, created=now - 40))
    await webhook(client, events.event("invoice.payment_failed", invoice, created=now - 30))   # Stripe's retry: one email
    listed = (await client.get("/v1/billing/invoices", headers=bearer(who["token"]))).json()["data"]
    assert [(i["number"], i["status"], i["amount_paid"]) for i in listed] == [("MAIL-1", "open", 0)]
    await webhook(client, events.event("invoice.paid", {**invoice, "status": "paid", "amount_paid": 999,
                                                        "hosted_invoice_url": "https://invoice.stripe.test/i/in_mail"},
                                       created=now - 20))
    listed = (await client.get("/v1/billing/invoices", headers=bearer(who["token"]))).json()["data"]
    assert [(i["number"], i["status"], i["amount_paid"], i["plan"]) for i in listed] == [("MAIL-1", "paid", 999, "pro")]
    assert listed[0]["hosted_invoice_url"] == "https://invoice.stripe.test/i/in_mail"
    await webhook(client, events.event("customer.subscription.updated", {**sub, "cancel_at_period_end": True}, created=now - 10))
    await webhook(client, events.event("customer.subscription.deleted", {**sub, "status": "canceled"}, created=now - 5))
    await deliver()
    subjects = [m["Subject"] for m in smtp.to("payer@example.com") if m["Subject"] != "Confirm your email address"]
    assert subjects == ["Receipt: 10 credits", "Your payment did not go through", "Your pro plan ends on "
                        + time.strftime("%Y-%m-%d", time.gmtime(now + 29 * DAY)), "Your pro plan has ended"]
    (failed,) = [m for m in smtp.to("payer@example.com") if "did not go through" in m["Subject"]]
    assert f"{PUBLIC_URL}/billing/portal" in failed.get_content() and "9.99 USD" in failed.get_content()
    (receipt,) = [m for m in smtp.to("payer@example.com") if m["Subject"].startswith("Receipt")]
    assert "5.00 USD" in receipt.get_content() and "10 credits" in receipt.get_content()


async def test_the_metrics_page_is_for_staff_and_draws_its_charts_itself(db_url, settings, owner):
    async with await page_client(db_url, settings) as browser:
        await browser.post("/v1/auth/signup", json={"email": "ops@example.com", "password": PASSWORD})
        assert (await browser.get("/admin/metrics", follow_redirects=False)).status_code in (302, 303)   # to the login page
        assert (await form(browser, "/login", {"email": "ops@example.com", "password": PASSWORD})).status_code in (302, 303)
        assert (await browser.get("/admin/metrics")).status_code == 403
        assert (await browser.get("/admin/metrics/charts/mrr")).status_code == 403
        owner.execute("SELECT api.staff_grant('ops@example.com', 'support')")
        page = await browser.get("/admin/metrics")
        assert page.status_code == 200 and page.text.count('<img src="/admin/metrics/charts/') == 4
        for chart in ("mrr", "active_accounts", "conversion", "usage"):
            svg = await browser.get(f"/admin/metrics/charts/{chart}")
            assert svg.status_code == 200 and svg.headers["content-type"].startswith("image/svg+xml")
            # Nothing loaded from elsewhere; pygal's inline config script never runs (an <img> runs no
            # script, and the chart's own CSP forbids them).
            assert "<svg" in svg.text and not re.search(r"<script[^>]*(src|href)=", svg.text)
            assert svg.headers["content-security-policy"].startswith("default-src 'none'")
        assert (await browser.get("/admin/metrics/charts/nope")).status_code == 404


async def test_disputes_are_recorded_once_with_their_latest_status(client, new_account, owner):
    acct = new_account("free")
    events = Events()
    await webhook(client, events.event("checkout.session.completed", {
        "id": "cs_dp", "object": "checkout.session", "mode": "payment", "payment_status": "paid", "customer": "cus_dp",
        "client_reference_id": acct["account_id"], "payment_intent": "pi_dp", "amount_total": 500, "currency": "usd",
        "metadata": {"price": "bundle_10"}}))
    dispute = {"id": "dp_1", "object": "dispute", "charge": "ch_dp", "payment_intent": "pi_dp", "amount": 500,
               "currency": "usd", "reason": "fraudulent", "status": "needs_response", "created": int(time.time())}
    created = events.event("charge.dispute.created", dispute)
    assert (await webhook(client, created)).json()["status"] == "applied"
    assert (await webhook(client, created)).json()["duplicate"] is True
    await webhook(client, events.event("charge.dispute.closed", {**dispute, "status": "lost"}))
    rows = owner.execute("SELECT account_id::text, amount_minor, reason, status, closed_at IS NOT NULL FROM billing.disputes").fetchall()
    assert rows == [(acct["account_id"], 500, "fraudulent", "lost", True)]
