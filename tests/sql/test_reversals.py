"""Issue 28, part 2: reversing a charge, called directly in SQL with real parallel connections:
credits back into the exact lots in reverse burn order, expired lots as a new short-lived lot,
allowance back to an open window, post-paid credit owed, never more than was charged."""

from __future__ import annotations

import psycopg
import pytest

from tests.conftest import CREDIT, balance_micros, consume, key_id, reconciliation_problems, run_concurrently, set_budget, set_clock, sqlstate_of


def reverse(conn, event_id, key, quantity=None, reason="customer complaint"):
    return conn.execute("SELECT replayed, body FROM api.operator_reverse_usage(%s::uuid, %s::bigint, %s::text, %s::text)",
                        [event_id, quantity, reason, key]).fetchone()


def lots(conn, account_id):
    return {str(i): (s, r, st) for i, s, r, st in conn.execute(
        "SELECT id, source, remaining_micros, status FROM ledger.credit_lots WHERE account_id = %s", [account_id])}


@pytest.fixture
def two_lots(owner, new_account, api_conn):
    """A free account (allowance used up: 1 credit a generation) with a lot of 5 credits that never
    expires and a lot of 1 credit expiring in a day (burned first)."""
    acct = new_account("free", 5 * CREDIT)
    consume(api_conn, acct["api_key"], "use-up-allowance", quantity=10)
    owner.execute("SELECT ledger.grant_lot(%s::uuid, 'promotion', %s::bigint, 'soon', 'expires soon', now(), "
                  "now() + interval '1 day')", [acct["account_id"], CREDIT])
    ids = {src: str(i) for i, src in owner.execute(
        "SELECT id, CASE WHEN expires_at IS NULL THEN 'forever' ELSE 'soon' END FROM ledger.credit_lots WHERE account_id = %s",
        [acct["account_id"]])}
    return {**acct, "forever": ids["forever"], "soon": ids["soon"]}


def test_item2_full_reversal_returns_credits_to_the_exact_lots_in_reverse_burn_order(owner, api_conn, two_lots):
    event = consume(api_conn, two_lots["api_key"], "three", quantity=3)[1]      # 1 from "soon", then 2 from "forever"
    assert lots(owner, two_lots["account_id"])[two_lots["soon"]][1] == 0
    replayed, body = reverse(owner, event["id"], "rev-1")
    assert replayed is False
    assert body["quantity"] == 3 and body["reversed"]["credits"] == "3"
    assert [(x["lot_id"], x["credits"], x["new_lot"]) for x in body["lots"]] == [
        (two_lots["forever"], "2", False), (two_lots["soon"], "1", False)]
    after = lots(owner, two_lots["account_id"])
    assert after[two_lots["soon"]][1] == CREDIT and after[two_lots["forever"]][1] == 5 * CREDIT
    assert balance_micros(owner, two_lots["account_id"]) == 6 * CREDIT
    # A ledger transfer of its own kind, shown in the ledger and in the usage history.
    kinds = [e["kind"] for e in api_conn.execute("SELECT api.ledger(%s, NULL)", [two_lots["api_key"]]).fetchone()[0]["data"]]
    assert kinds[0] == "reversal"
    listed = api_conn.execute("SELECT api.usage_events(%s, NULL)", [two_lots["api_key"]]).fetchone()[0]["data"][0]
    assert listed["id"] == event["id"] and listed["reversed"]["quantity"] == 3 and listed["reversed"]["credits"] == "3"
    assert sqlstate_of(lambda: reverse(owner, event["id"], "rev-2")) == "TL40C"          # nothing left to reverse
    assert reconciliation_problems(owner) == {}


def test_item2_partial_reversals_add_up_to_the_charge_and_never_exceed_it(owner, api_conn, two_lots):
    event = consume(api_conn, two_lots["api_key"], "five", quantity=5)[1]       # 1 from "soon", 4 from "forever"
    first = reverse(owner, event["id"], "p1", quantity=2)[1]
    assert [(x["lot_id"], x["credits"]) for x in first["lots"]] == [(two_lots["forever"], "2")]
    assert sqlstate_of(lambda: reverse(owner, event["id"], "p2", quantity=4)) == "TL422"   # only 3 are left
    second = reverse(owner, event["id"], "p3", quantity=3)[1]
    assert [(x["lot_id"], x["credits"]) for x in second["lots"]] == [(two_lots["forever"], "2"), (two_lots["soon"], "1")]
    assert balance_micros(owner, two_lots["account_id"]) == 6 * CREDIT
    assert sqlstate_of(lambda: reverse(owner, event["id"], "p4", quantity=1)) == "TL40C"
    assert reconciliation_problems(owner) == {}


def test_item2_a_lot_expired_since_comes_back_as_a_new_lot_with_a_short_expiry(owner, api_conn, two_lots):
    event = consume(api_conn, two_lots["api_key"], "two", quantity=2)[1]        # 1 from "soon", 1 from "forever"
    set_clock(owner, "2099-01-01T00:00:00Z")
    body = reverse(owner, event["id"], "late")[1]
    assert [(x["credits"], x["new_lot"]) for x in body["lots"]] == [("1", False), ("1", True)]
    new = body["lots"][1]
    assert new["replaces_lot"] == two_lots["soon"] and new["expires_at"].startswith("2099-01-08")
    assert owner.execute("SELECT source, status, remaining_micros FROM ledger.credit_lots WHERE id = %s",
                         [new["lot_id"]]).fetchone() == ("reversal", "active", CREDIT)
    assert lots(owner, two_lots["account_id"])[two_lots["soon"]][1] == 0     # the expired lot gets nothing back
    assert reconciliation_problems(owner) == {}


def test_item2_allowance_usage_returns_to_its_window_only_while_it_is_open(owner, api_conn, new_account):
    acct = new_account("free")
    event = consume(api_conn, acct["api_key"], "three", quantity=3)[1]
    assert reverse(owner, event["id"], "r1", quantity=1)[1]["allowance_returned"] is True
    assert owner.execute("SELECT used FROM metering.allowance_usage").fetchone()[0] == 2
    set_clock(owner, "2099-01-01T00:00:00Z")
    body = reverse(owner, event["id"], "r2")[1]
    assert body["quantity"] == 2 and body["reversed"]["allowance_units"] == 2 and body["allowance_returned"] is False
    assert owner.execute("SELECT used FROM metering.allowance_usage").fetchone()[0] == 2
    assert reconciliation_problems(owner) == {}


def test_item2_a_reversal_is_once_per_idempotency_key(owner, api_conn, two_lots):
    event = consume(api_conn, two_lots["api_key"], "two", quantity=2)[1]
    first = reverse(owner, event["id"], "same", quantity=1)
    again = reverse(owner, event["id"], "same", quantity=1)
    assert first[0] is False and again[0] is True and again[1]["id"] == first[1]["id"]
    assert sqlstate_of(lambda: reverse(owner, event["id"], "same", quantity=2)) == "TL42R"
    assert sqlstate_of(lambda: reverse(owner, event["id"], "x", reason=" ")) == "TL422"
    assert sqlstate_of(lambda: reverse(owner, "00000000-0000-7000-8000-000000000000", "y")) == "TL404"
    assert balance_micros(owner, two_lots["account_id"]) == 5 * CREDIT


def test_item2_parallel_reversals_of_one_charge_never_exceed_it(owner, api_conn, two_lots, db_url):
    event = consume(api_conn, two_lots["api_key"], "six", quantity=6)[1]
    owners = [psycopg.connect(db_url, autocommit=True) for _ in range(32)]
    try:
        results = run_concurrently(32, lambda i: reverse(owners[i], event["id"], f"r{i}", quantity=1))
    finally:
        for c in owners:
            c.close()
    assert len([r for r in results if not isinstance(r, Exception)]) == 6
    assert {r.sqlstate for r in results if isinstance(r, Exception)} == {"TL40C"}
    assert balance_micros(owner, two_lots["account_id"]) == 6 * CREDIT
    assert owner.execute("SELECT sum(credits_micros) FROM metering.reversals").fetchone()[0] == 6 * CREDIT
    assert reconciliation_problems(owner) == {}


def test_item2_reversals_racing_charges_on_the_same_lots_keep_lots_balance_and_ledger_equal(owner, api_conn, two_lots,
                                                                                            connections, db_url):
    events = [consume(api_conn, two_lots["api_key"], f"e{i}")[1] for i in range(6)]    # 6 credits: all of them
    conns = connections(24)
    owners = [psycopg.connect(db_url, autocommit=True) for _ in range(12)]
    try:
        def work(i):
            if i < 12:
                return reverse(owners[i], events[i % 6]["id"], f"r{i}")
            return consume(conns[i], two_lots["api_key"], f"new{i}")

        results = run_concurrently(24, work)
    finally:
        for c in owners:
            c.close()
    reversed_ = [r for r in results[:12] if not isinstance(r, Exception)]
    charged = [r for r in results[12:] if not isinstance(r, Exception)]
    assert len(reversed_) == 6                              # each event once (the others: TL40C)
    assert balance_micros(owner, two_lots["account_id"]) == (6 - len(charged)) * CREDIT
    assert reconciliation_problems(owner) == {}             # lots = balance = ledger


def test_item2_post_paid_reversal_records_a_credit_owed(owner, api_conn, new_account):
    acct = new_account("pay_per_use")
    event = consume(api_conn, acct["api_key"], "pp", quantity=4)[1]
    assert event["charged"]["amount"] == 20
    body = reverse(owner, event["id"], "pp-r", quantity=1)[1]
    assert body["reversed"]["amount"] == 5 and body["reversed"]["credits"] == "0"
    assert owner.execute("SELECT amount_minor, currency FROM reporting.post_paid_credits_owed").fetchone() == (5, "usd")
    spending = api_conn.execute("SELECT api.balance(%s, NULL)", [acct["api_key"]]).fetchone()[0]["spending"]
    assert spending["spent"] == 15
    assert reconciliation_problems(owner) == {}


def test_item2_a_reversal_gives_the_budget_its_credits_back(owner, api_conn, two_lots):
    set_budget(owner, two_lots["account_id"], "api_key", key_id(owner, two_lots["api_key"]), "3")
    event = consume(api_conn, two_lots["api_key"], "three", quantity=3)[1]
    assert sqlstate_of(lambda: consume(api_conn, two_lots["api_key"], "more")) == "TL4B2"
    reverse(owner, event["id"], "budget-back", quantity=1)
    assert consume(api_conn, two_lots["api_key"], "more")[1]["charged"]["credits"] == "1"
    budget = owner.execute("SELECT api.operator_budgets(%s::uuid)", [two_lots["account_id"]]).fetchone()[0]["data"][0]
    assert budget["spent"] == "3"
    # A budget set afterwards starts from the window's spending net of reversals.
    owner.execute("DELETE FROM metering.budget_windows")
    assert owner.execute("SELECT api.operator_budgets(%s::uuid)", [two_lots["account_id"]]).fetchone()[0]["data"][0]["spent"] == "3"


def test_item2_a_token_meter_charge_is_reversed_whole(owner, api_conn, two_lots):
    event = consume(api_conn, two_lots["api_key"], "llm", meter="llm_tokens", input_tokens=1_000_000, output_tokens=0)[1]
    assert event["charged"]["credits"] == "3.6"                 # 3 credits per million input tokens, margin 1.2
    assert sqlstate_of(lambda: reverse(owner, event["id"], "t1", quantity=2)) == "TL422"
    body = reverse(owner, event["id"], "t2")[1]
    assert body["quantity"] == 1 and body["reversed"]["credits"] == "3.6"
    assert [x["credits"] for x in body["lots"]] == ["2.6", "1"]     # "forever" then "soon": reverse burn order
    assert balance_micros(owner, two_lots["account_id"]) == 6 * CREDIT
    assert reconciliation_problems(owner) == {}
