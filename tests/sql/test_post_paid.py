"""Post-paid usage: charged locally in money against the plan's spending limit, each event's report
to Stripe's meter queued in the same transaction; called directly in SQL and with many real
connections at once."""

from __future__ import annotations

import json

from tests.conftest import CREDIT, balance, consume, hold, reconciliation_problems, release, run_concurrently, sqlstate_of

LIMIT_UNITS = 1000          # the default catalog: 5 cents a generation, at most 5000 cents a period


def reports(owner):
    return owner.execute("SELECT id, kind, recipient, payload FROM outbox.messages WHERE kind = 'meter_event' "
                         "ORDER BY id").fetchall()


def test_post_paid_usage_costs_money_not_credits_and_queues_one_report(api_conn, owner, new_account):
    acct = new_account("pay_per_use")
    replayed, event = consume(api_conn, acct["api_key"], "e1", quantity=3)
    assert not replayed and event["charged"] == {"allowance_units": 3, "credits": "0", "amount": 15, "currency": "usd"}
    assert consume(api_conn, acct["api_key"], "e1", quantity=3) == (True, event)
    ((report_id, kind, recipient, payload),) = reports(owner)
    assert str(report_id) == event["id"] and recipient == acct["account_id"]
    assert payload["event_name"] == "pgtally_generation" and payload["value"] == 3
    b = balance(api_conn, acct["api_key"])
    assert b["credits"] == "0" and b["spending"]["limit"] == 5000 and b["spending"]["spent"] == 15
    assert b["spending"]["currency"] == "usd"
    assert b["allowances"][0]["kind"] == "post_paid" and b["allowances"][0]["amount"] == 15
    assert owner.execute("SELECT amount_minor FROM metering.usage_events").fetchone()[0] == 15
    assert owner.execute("SELECT count(*) FROM ledger.transfers").fetchone()[0] == 0
    assert reconciliation_problems(owner) == {}


def test_the_spending_limit_acts_like_a_balance_with_warnings_at_80_and_100_percent(api_conn, owner, new_account):
    key = new_account("pay_per_use")["api_key"]
    event = consume(api_conn, key, "a", quantity=800)[1]
    assert [(w["code"], w["threshold_percent"]) for w in event["warnings"]] == [("spending_limit_threshold", 80)]
    assert "40.00 USD of 50.00 USD" in event["warnings"][0]["message"]
    check = api_conn.execute("SELECT api.check_usage(%s, NULL, 'generation', 201)", [key]).fetchone()[0]
    assert check["allowed"] is False and check["amount"] == 1005
    event = consume(api_conn, key, "b", quantity=200)[1]
    assert [w["threshold_percent"] for w in event["warnings"]] == [100]
    try:
        consume(api_conn, key, "c")
    except Exception as exc:  # noqa: BLE001 - inspected below
        assert exc.sqlstate == "TL402"
        detail = json.loads(exc.diag.message_detail)
        assert (detail["spent"], detail["spending_limit"], detail["required_amount"]) == (5000, 5000, 5)
    else:
        raise AssertionError("a charge past the spending limit was accepted")
    assert len(reports(owner)) == 2
    assert owner.execute("SELECT count(*) FROM outbox.messages WHERE kind = 'usage_warning'").fetchone()[0] == 0


def test_holds_reserve_spending_and_release_returns_it(api_conn, owner, new_account):
    key = new_account("pay_per_use")["api_key"]
    h = hold(api_conn, key, "h", quantity=900)[1]
    assert sqlstate_of(lambda: consume(api_conn, key, "x", quantity=101)) == "TL402"
    assert consume(api_conn, key, "y", quantity=100)[1]["charged"]["amount"] == 500
    release(api_conn, key, h["id"])
    assert consume(api_conn, key, "z", quantity=900)[1]["charged"]["amount"] == 4500
    assert len(reports(owner)) == 2 and reconciliation_problems(owner) == {}


def test_64_connections_never_spend_past_the_limit_and_each_event_is_reported_once(owner, new_account, connections):
    key = new_account("pay_per_use")["api_key"]
    conns = connections(64)
    # 64 distinct events of 30 units each, sent twice at once: 33 fit in 1000 units.
    results = run_concurrently(128, lambda i: consume(conns[i % 64], key, f"e{i % 64}", quantity=30))
    charged = {r[1]["id"] for r in results if not isinstance(r, Exception)}
    refused = [r for r in results if isinstance(r, Exception)]
    assert len(charged) == 33 and all(r.sqlstate == "TL402" for r in refused)
    assert {str(r[0]) for r in reports(owner)} == charged
    spent = owner.execute("SELECT sum(amount_minor) FROM metering.usage_events").fetchone()[0]
    assert spent == 33 * 150 <= 5000
    assert reconciliation_problems(owner) == {}


def test_only_unit_meters_can_be_post_paid_and_the_meter_name_is_required(owner):
    catalog = {"meters": {"tok": {"pricing": "tokens", "input_price_per_million": 1, "output_price_per_million": 1},
                          "gen": {"price": 1}},
               "plans": {"ppu": {"entitlements": {"tok": {"post_paid": 5, "stripe_meter": "t"}}}}}
    assert sqlstate_of(lambda: owner.execute("SELECT api.load_catalog(%s)", [json.dumps(catalog)])) == "TL422"
    owner.rollback()
    catalog["plans"]["ppu"]["entitlements"] = {"gen": {"post_paid": 5}}
    assert sqlstate_of(lambda: owner.execute("SELECT api.load_catalog(%s)", [json.dumps(catalog)])) == "TL422"
    owner.rollback()
    catalog["plans"]["ppu"]["entitlements"] = {"gen": {"post_paid": "0.5", "stripe_meter": "g"}}
    assert sqlstate_of(lambda: owner.execute("SELECT api.load_catalog(%s)", [json.dumps(catalog)])) == "TL422"


def test_20_concurrent_charges_under_the_threshold_queue_one_auto_top_up(owner, new_account, connections):
    acct = new_account("free", 100 * CREDIT)
    owner.execute("INSERT INTO billing.customers (account_id, stripe_customer_id, created_at) VALUES (%s, 'cus_auto', now())",
                  [acct["account_id"]])
    owner.execute("SELECT api.set_auto_topup(%s, NULL, '99', 'bundle_10')", [acct["api_key"]])
    owner.execute("SELECT * FROM api.consume(%s, NULL, 'allowance', 'generation', 10)", [acct["api_key"]])
    conns = connections(20)
    results = run_concurrently(20, lambda i: conns[i].execute(
        "SELECT * FROM api.consume(%s, NULL, %s, 'generation')", [acct["api_key"], f"c{i}"]).fetchone())
    assert not [r for r in results if isinstance(r, Exception)]
    assert owner.execute("SELECT count(*) FROM outbox.messages WHERE kind = 'auto_topup'").fetchone()[0] == 1
    assert owner.execute("SELECT in_flight_since IS NOT NULL FROM billing.auto_topups").fetchone()[0] is True
