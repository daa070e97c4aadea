"""Revenue and analytics views over a small known history: three months of sign-ups, upgrades,
downgrades, a cancellation and a reactivation, a bundle and a refund, and usage, with the clock
moved (pgtally.now) and Stripe events dated as they happened. Every metric is asserted exactly."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from psycopg.types.json import Jsonb

from tests.conftest import reconciliation_problems, run_concurrently, set_clock
from tests.stripe_standin import Events

EVENTS = Events()


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def set_utc_clock(conn, when: str) -> None:
    set_clock(conn, f"{when}+00")


def event(conn, type_: str, obj: dict, when: str) -> dict:
    e = EVENTS.event(type_, obj, created=int(at(when).timestamp()))
    return conn.execute("SELECT api.stripe_webhook(%s)", [Jsonb(e)]).fetchone()[0]


class History:
    def __init__(self, conn):
        self.conn = conn
        self.people: dict[str, dict] = {}

    def sign_up(self, name: str, when: str) -> None:
        set_utc_clock(self.conn, when)
        self.conn.execute("SELECT api.signup(%s, 'argon2-hash', %s, 'test')", [f"{name}@example.com", f"10.3.0.{len(self.people)}"])
        user_id, account_id = self.conn.execute("SELECT id, account_id FROM identity.users WHERE email_normalized = %s",
                                                [f"{name}@example.com"]).fetchone()
        self.people[name] = {"user_id": user_id, "account_id": str(account_id), "customer": f"cus_{name}"}

    def subscription(self, name: str, sub: str, price: str, when: str, type_="customer.subscription.updated",
                     status="active") -> None:
        start = int(at(when).timestamp())
        obj = Events.subscription(sub, self.people[name]["customer"], self.people[name]["account_id"], status, price,
                                  start, start + 30 * 86400)
        assert event(self.conn, type_, obj, when)["status"] == "applied"

    def invoice(self, name: str, sub: str, amount: int, when: str, number: str) -> None:
        start = int(at(when).timestamp())
        assert event(self.conn, "invoice.paid", {
            "id": f"in_{number}", "object": "invoice", "number": number, "customer": self.people[name]["customer"],
            "status": "paid", "amount_paid": amount, "currency": "usd", "total_taxes": [{"amount": 0}],
            "parent": {"type": "subscription_details", "subscription_details": {"subscription": sub}},
            "lines": {"data": [{"amount": amount, "period": {"start": start, "end": start + 30 * 86400}}]}},
            when)["status"] == "applied"

    def use(self, name: str, quantity: int, when: str) -> None:
        set_utc_clock(self.conn, when)
        session = self.conn.execute("SELECT api.login_succeeded(%s, NULL, '10.4.0.1', 'test')",
                                    [self.people[name]["user_id"]]).fetchone()[0]
        self.conn.execute("SELECT * FROM api.consume(NULL, %s, %s, 'generation', %s)",
                          [session["session_id"], f"{name}-{when}", quantity])
        # The worker's rollup runs every few minutes: the plan the usage is counted under is the one then.
        self.conn.execute("SELECT set_config('pgtally.now', (%s::timestamptz + interval '2 minutes')::text, false)",
                          [f"{when}+00"])
        self.conn.execute("SELECT api.rollup_usage()")


@pytest.fixture
def history(owner) -> History:
    h = History(owner)
    h.sign_up("ann", "2026-01-05 09:00:00")
    h.subscription("ann", "sub_ann", "price_pro_monthly", "2026-01-10 09:00:00", "customer.subscription.created")
    h.invoice("ann", "sub_ann", 999, "2026-01-10 09:00:01", "A-1")
    h.use("ann", 3, "2026-01-12 10:00:00")
    h.use("ann", 2, "2026-01-20 15:00:00")
    h.sign_up("bob", "2026-01-20 09:00:00")
    h.subscription("bob", "sub_bob", "price_pro_monthly", "2026-01-25 09:00:00", "customer.subscription.created")
    h.invoice("bob", "sub_bob", 999, "2026-01-25 09:00:01", "B-1")
    h.use("bob", 5, "2026-01-26 10:00:00")
    # February: a bundle and a half refund, a renewal, an upgrade, a new subscriber, a cancellation.
    h.sign_up("cat", "2026-02-03 09:00:00")
    assert event(owner, "checkout.session.completed", {
        "id": "cs_cat", "object": "checkout.session", "mode": "payment", "payment_status": "paid",
        "customer": "cus_cat", "client_reference_id": h.people["cat"]["account_id"], "payment_intent": "pi_cat",
        "amount_total": 500, "currency": "usd", "metadata": {"price": "bundle_10"}}, "2026-02-04 09:00:00")["status"] == "applied"
    h.invoice("ann", "sub_ann", 999, "2026-02-10 09:00:00", "A-2")
    h.sign_up("dan", "2026-02-10 09:00:00")
    h.subscription("dan", "sub_dan", "price_unlimited_monthly", "2026-02-12 09:00:00", "customer.subscription.created")
    h.invoice("dan", "sub_dan", 1999, "2026-02-12 09:00:01", "D-1")
    h.use("dan", 4, "2026-02-13 22:00:00")
    h.subscription("ann", "sub_ann", "price_unlimited_monthly", "2026-02-15 09:00:00")
    h.use("ann", 1, "2026-02-16 10:00:00")
    h.subscription("bob", "sub_bob", "price_pro_monthly", "2026-02-20 09:00:00", "customer.subscription.deleted", "canceled")
    assert event(owner, "charge.refunded", {"id": "ch_cat", "object": "charge", "payment_intent": "pi_cat",
                                            "amount": 500, "amount_refunded": 250}, "2026-02-21 09:00:00")["status"] == "applied"
    # March: a yearly subscriber, a downgrade, a reactivation, a sign-up who never pays.
    h.sign_up("eve", "2026-03-01 09:00:00")
    h.subscription("eve", "sub_eve", "price_pro_yearly", "2026-03-02 09:00:00", "customer.subscription.created")
    h.invoice("eve", "sub_eve", 9999, "2026-03-02 09:00:01", "E-1")
    h.subscription("dan", "sub_dan", "price_pro_monthly", "2026-03-05 09:00:00")
    h.invoice("ann", "sub_ann", 1999, "2026-03-10 09:00:00", "A-3")
    h.sign_up("fay", "2026-03-10 09:00:00")
    h.invoice("dan", "sub_dan", 999, "2026-03-12 09:00:00", "D-2")
    h.subscription("bob", "sub_bob2", "price_pro_monthly", "2026-03-15 09:00:00", "customer.subscription.created")
    h.invoice("bob", "sub_bob2", 999, "2026-03-15 09:00:01", "B-2")
    set_utc_clock(owner, "2026-03-31 12:00:00")
    owner.execute("SELECT api.rollup_usage()")      # the worker's next run: the days since are computed too
    return h


def rows(conn, sql: str) -> list[tuple]:
    return conn.execute(sql).fetchall()


def test_mrr_arr_and_movements_per_month(owner, history):
    assert rows(owner, "SELECT month::text, currency, mrr_minor, arr_minor, subscribers FROM reporting.mrr_monthly ORDER BY month") == [
        ("2026-01-01", "usd", Decimal("1998"), Decimal("23976"), 2),
        ("2026-02-01", "usd", Decimal("3998"), Decimal("47976"), 2),
        ("2026-03-01", "usd", Decimal("4830.25"), Decimal("57963"), 4)]
    assert rows(owner, "SELECT month::text, new_minor, expansion_minor, contraction_minor, churned_minor, reactivated_minor, "
                       "net_minor FROM reporting.mrr_movements_monthly ORDER BY month") == [
        ("2026-01-01", 1998, 0, 0, 0, 0, 1998),
        ("2026-02-01", 1999, 1000, 0, 999, 0, 2000),
        ("2026-03-01", Decimal("833.25"), 0, 1000, 0, 999, Decimal("832.25"))]


def test_churn_by_plan_and_arpu_with_clv(owner, history):
    assert rows(owner, "SELECT month::text, plan_id, subscribers_at_start, churned, subscriber_churn_percent, "
                       "mrr_lost_minor, revenue_churn_percent FROM reporting.churn_by_plan_monthly ORDER BY month, plan_id") == [
        ("2026-02-01", "pro", 2, 1, Decimal("50.00"), 999, Decimal("50.00")),
        ("2026-03-01", "unlimited", 2, 0, Decimal("0.00"), 1000, Decimal("25.01"))]
    assert rows(owner, "SELECT month::text, revenue_minor, paying_accounts, arpu_minor, churn_percent, clv_minor "
                       "FROM reporting.arpu_monthly ORDER BY month") == [
        ("2026-01-01", 1998, 2, Decimal("999.00"), None, None),
        ("2026-02-01", 3248, 3, Decimal("1082.67"), Decimal("50.00"), Decimal("2165.33")),
        ("2026-03-01", 13996, 4, Decimal("3499.00"), Decimal("0.00"), None)]


def test_conversion_by_sign_up_cohort(owner, history):
    assert rows(owner, "SELECT cohort::text, signed_up, converted, converted_in_30_days, conversion_percent "
                       "FROM reporting.conversion_by_cohort ORDER BY cohort") == [
        ("2026-01-01", 2, 2, 2, Decimal("100.00")),
        ("2026-02-01", 2, 2, 2, Decimal("100.00")),
        ("2026-03-01", 2, 1, 1, Decimal("50.00"))]


def test_active_accounts_retention_and_usage(owner, history):
    active = dict((d.isoformat(), (dau, wau, mau)) for d, dau, wau, mau in
                  rows(owner, "SELECT day, dau, wau, mau FROM reporting.active_accounts_daily"))
    assert active["2026-01-12"] == (1, 1, 1)
    assert active["2026-01-20"] == (1, 1, 1)
    assert active["2026-01-26"] == (1, 2, 2)
    assert active["2026-02-13"] == (1, 1, 3)
    assert active["2026-02-16"] == (1, 2, 3)
    assert active["2026-02-17"] == (0, 2, 3)
    assert rows(owner, "SELECT cohort::text, weeks_since, active_accounts, retention_percent "
                       "FROM reporting.retention_weekly ORDER BY cohort, weeks_since") == [
        ("2026-01-12", 0, 1, Decimal("100.00")), ("2026-01-12", 1, 1, Decimal("100.00")),
        ("2026-01-12", 5, 1, Decimal("100.00")),
        ("2026-01-26", 0, 1, Decimal("100.00")),
        ("2026-02-09", 0, 1, Decimal("100.00"))]
    assert rows(owner, "SELECT month::text, meter_id, plan_id, accounts, quantity, p50_per_account, p95_per_account "
                       "FROM reporting.usage_per_meter_plan_monthly ORDER BY month, plan_id") == [
        ("2026-01-01", "generation", "pro", 2, 10, 5.0, 5.0),
        ("2026-02-01", "generation", "unlimited", 2, 5, 2.5, pytest.approx(3.85))]
    assert rows(owner, "SELECT hour_of_day, events, quantity, percent_of_events FROM reporting.usage_by_hour "
                       "ORDER BY hour_of_day") == [(10, 3, 9, Decimal("60.00")), (15, 1, 2, Decimal("20.00")),
                                                   (22, 1, 4, Decimal("20.00"))]


def test_money_in_reconciles_to_zero_drift_and_invoices_are_recorded(owner, history):
    recon = rows(owner, "SELECT day::text, kind, stripe_minor, recorded_minor, refunded_minor, drift_percent "
                        "FROM reporting.revenue_reconciliation_daily ORDER BY day, kind")
    assert ("2026-02-04", "bundle", 500, 500, 250, Decimal("0.00")) in recon
    assert ("2026-03-02", "subscription", 9999, 9999, 0, Decimal("0.00")) in recon
    assert all(r[5] == 0 for r in recon) and sum(r[3] for r in recon) == 1998 + 999 + 1999 + 500 + 9999 + 1999 + 999 + 999
    assert rows(owner, "SELECT number, plan_id, amount_paid_minor, status FROM billing.invoices WHERE number LIKE 'A-%' "
                       "ORDER BY number") == [("A-1", "pro", 999, "paid"), ("A-2", "pro", 999, "paid"),
                                              ("A-3", "unlimited", 1999, "paid")]
    assert reconciliation_problems(owner) == {}
    # A payment recorded without its ledger grant shows as drift.
    owner.execute("UPDATE billing.payments SET credits_micros = credits_micros + 1000000")
    assert rows(owner, "SELECT drift_percent FROM reporting.revenue_reconciliation_daily WHERE kind = 'bundle'") == [
        (Decimal("9.09"),)]


def test_pgtally_report_prints_a_view_filtered_by_date(owner, history, db_url, monkeypatch):
    from click.testing import CliRunner

    from api.cli import main

    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("PGOPTIONS", "-c pgtally.now=2026-03-31T12:00:00Z")
    result = CliRunner().invoke(main, ["report", "mrr_monthly", "--from", "2026-02-01", "--to", "2026-03-01",
                                       "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["month,currency,mrr_minor,arr_minor,subscribers", "2026-02-01,usd,3998.00,47976.00,2"]
    table = CliRunner().invoke(main, ["report", "churn_by_plan_monthly"])
    assert table.exit_code == 0 and "| unlimited" in table.output and "25.01" in table.output
    listing = CliRunner().invoke(main, ["report"])
    assert "mrr_movements_monthly  (by month)" in listing.output and "usage_by_hour" in listing.output
    assert CliRunner().invoke(main, ["report", "no_such_view"]).exit_code == 2


def test_concurrent_rollups_fold_each_event_once(owner, new_account, connections):
    key = new_account("unlimited")["api_key"]
    for i in range(300):
        owner.execute("SELECT * FROM api.consume(%s, NULL, %s, 'generation', 2)", [key, f"r{i}"])
    conns = connections(6)
    for conn in conns:
        conn.execute("SELECT set_config('pgtally.now', (now() + interval '2 minutes')::text, false)")

    folded = run_concurrently(6, lambda i: sum(iter(lambda: conns[i].execute("SELECT api.rollup_usage(40)").fetchone()[0], 0)))
    assert not [f for f in folded if isinstance(f, Exception)] and sum(folded) == 300
    assert owner.execute("SELECT sum(events), sum(quantity) FROM metering.usage_rollup_daily").fetchone() == (300, 600)
    assert owner.execute("SELECT sum(events) FROM metering.usage_rollup_monthly").fetchone()[0] == 300
