"""Issue 28, part 1: budgets per API key, member and account, called directly in SQL with real
parallel connections: hard caps refuse (TL4B2) and charge nothing, soft thresholds alert once per
window, and no concurrency overspends."""

from __future__ import annotations

import psycopg
import pytest

from tests.conftest import (
    CREDIT,
    balance_micros,
    call,
    consume,
    join,
    key_id,
    person,
    reconciliation_problems,
    run_concurrently,
    set_budget,
    set_clock,
    sqlstate_of,
    team_of,
)


def new_key(conn, account_id: str) -> str:
    return conn.execute("SELECT api_key FROM identity.issue_api_key(%s::uuid, 'second', '{usage:write,usage:read}', NULL)",
                        [account_id]).fetchone()[0]


def credit_events(conn, account_id) -> int:
    return conn.execute("SELECT count(*) FROM metering.usage_events WHERE account_id = %s AND credits_micros > 0",
                        [account_id]).fetchone()[0]


@pytest.fixture
def spender(owner, new_account, api_conn):
    """A free account with 100 credits whose daily allowance is used up: each generation costs 1 credit."""
    acct = new_account("free", 100 * CREDIT)
    consume(api_conn, acct["api_key"], "use-up-allowance", quantity=10)
    return acct


def test_item1_account_budget_refuses_with_budget_exceeded_naming_it_and_charges_nothing(owner, api_conn, spender):
    budget = set_budget(owner, spender["account_id"], "account", spender["account_id"], "2")
    assert budget["limit"] == "2" and budget["spent"] == "0" and budget["window"] == "day"
    consume(api_conn, spender["api_key"], "a")
    consume(api_conn, spender["api_key"], "b")
    with pytest.raises(psycopg.Error) as info:
        consume(api_conn, spender["api_key"], "c")
    assert info.value.sqlstate == "TL4B2"
    import json
    detail = json.loads(info.value.diag.message_detail)
    assert detail["budget_id"] == budget["id"] and detail["resets_at"] == budget["resets_at"]
    assert detail["limit"] == "2" and detail["spent"] == "2" and detail["required_credits"] == "1"
    assert balance_micros(owner, spender["account_id"]) == 98 * CREDIT
    assert credit_events(owner, spender["account_id"]) == 2
    # Allowance usage costs no credits: a budget never refuses it (a new day, a new allowance).
    set_clock(api_conn, "2099-01-01T00:00:00Z")
    assert consume(api_conn, spender["api_key"], "next-day")[1]["charged"]["allowance_units"] == 1
    assert reconciliation_problems(owner) == {}


def test_item1_64_parallel_charges_against_a_key_budget_of_10_credits_spend_at_most_10(owner, spender, connections):
    other_key = new_key(owner, spender["account_id"])
    set_budget(owner, spender["account_id"], "api_key", key_id(owner, spender["api_key"]), "10")
    conns = connections(64)
    results = run_concurrently(64, lambda i: consume(conns[i], spender["api_key"], f"k{i}"))
    served = [r for r in results if not isinstance(r, Exception)]
    assert len(served) == 10
    assert {r.sqlstate for r in results if isinstance(r, Exception)} == {"TL4B2"}
    assert balance_micros(owner, spender["account_id"]) == 90 * CREDIT
    # Another key of the account is not capped by that key's budget.
    assert consume(owner, other_key, "other")[1]["charged"]["credits"] == "1"
    assert owner.execute("SELECT spent_micros FROM metering.budget_windows").fetchone()[0] == 10 * CREDIT
    assert reconciliation_problems(owner) == {}


def test_item1_parallel_charges_by_two_keys_against_an_account_budget(owner, spender, connections):
    second = new_key(owner, spender["account_id"])
    set_budget(owner, spender["account_id"], "account", spender["account_id"], "7", window="month")
    conns = connections(40)
    results = run_concurrently(40, lambda i: consume(conns[i], spender["api_key"] if i % 2 else second, f"k{i}"))
    assert len([r for r in results if not isinstance(r, Exception)]) == 7
    assert balance_micros(owner, spender["account_id"]) == 93 * CREDIT
    assert reconciliation_problems(owner) == {}


def test_item1_member_budget_counts_their_keys_and_sessions_on_the_team(owner, api_conn, connections):
    boss, dev = person(owner, "boss"), person(owner, "dev")
    team = team_of(owner, boss)
    join(owner, boss, team, dev, "member")
    call(owner, "api.grant_credits(%s::uuid, %s::bigint, 'fund')", team, 100 * CREDIT)
    key = call(owner, "api.create_api_key(%s::uuid, 'ci', '{usage:write,usage:read}', NULL, %s::uuid)", dev["session"], team)
    for i in range(10):   # the team's free allowance of the day, spent by the boss
        call(owner, "api.consume(NULL, %s::uuid, %s::text, 'generation', NULL, NULL, NULL, %s::uuid)", boss["session"], f"a{i}", team)
    set_budget(owner, team, "member", dev["user_id"], "5")
    conns = connections(30)

    def charge(i):
        if i % 2:
            return consume(conns[i], key["api_key"], f"dev-key-{i}")
        return conns[i].execute("SELECT * FROM api.consume(NULL, %s::uuid, %s::text, 'generation', NULL, NULL, NULL, %s::uuid)",
                                [dev["session"], f"dev-session-{i}", team]).fetchone()

    results = run_concurrently(30, charge)
    assert len([r for r in results if not isinstance(r, Exception)]) == 5
    assert {r.sqlstate for r in results if isinstance(r, Exception)} == {"TL4B2"}
    # The boss is not capped by the member's budget; the events say who spent.
    call(owner, "api.consume(NULL, %s::uuid, 'boss-more', 'generation', NULL, NULL, NULL, %s::uuid)", boss["session"], team)
    by_user = dict(owner.execute("SELECT user_id::text, sum(credits_micros) FROM reporting.usage_by_principal_daily "
                                 "WHERE account_id = %s GROUP BY 1", [team]).fetchall())
    assert by_user == {dev["user_id"]: 5 * CREDIT, boss["user_id"]: CREDIT}
    # A member sees their own budget; an owner sees all; only owners, admins (and billing) set them.
    assert [b["scope"] for b in call(owner, "api.budgets(NULL, %s::uuid, %s::uuid)", dev["session"], team)["data"]] == ["member"]
    assert sqlstate_of(lambda: call(owner, "api.create_budget(NULL, %s::uuid, 'account', NULL, '1', 'day', '{}', %s::uuid)",
                                    dev["session"], team)) == "TL403"
    mine = call(owner, "api.create_budget(NULL, %s::uuid, 'api_key', %s::uuid, '3', 'month', '{50}', %s::uuid)",
                boss["session"], key["id"], team)
    assert len(call(owner, "api.budgets(NULL, %s::uuid, %s::uuid)", boss["session"], team)["data"]) == 2
    assert len(call(owner, "api.budgets(NULL, %s::uuid, %s::uuid)", dev["session"], team)["data"]) == 2   # their key's too
    call(owner, "api.delete_budget(NULL, %s::uuid, %s::uuid, %s::uuid)", boss["session"], mine["id"], team)
    assert reconciliation_problems(owner) == {}


def test_item1_soft_thresholds_alert_exactly_once_per_window(owner, spender, connections, api_conn):
    payer = person(owner, "payer")
    owner.execute("INSERT INTO identity.memberships (account_id, user_id, role, created_at) VALUES (%s, %s, 'owner', now())",
                  [spender["account_id"], payer["user_id"]])
    set_budget(owner, spender["account_id"], "account", spender["account_id"], "10", alerts=[50, 80, 100])
    conns = connections(20)
    run_concurrently(20, lambda i: consume(conns[i], spender["api_key"], f"k{i}"))

    def alerts():
        return sorted(r[0] for r in owner.execute(
            "SELECT (payload ->> 'threshold_percent')::int FROM outbox.messages "
            "WHERE kind = 'usage_warning' AND payload ->> 'code' = 'budget_threshold'").fetchall())

    assert alerts() == [50, 80, 100]
    assert owner.execute("SELECT alerted FROM metering.budget_windows").fetchone()[0] == [50, 80, 100]
    # The next day is a new window: its thresholds alert again, once.
    set_clock(api_conn, "2099-01-01T00:00:00Z")
    for i in range(20):
        try:
            consume(api_conn, spender["api_key"], f"next-{i}", quantity=1)
        except psycopg.Error as exc:
            assert exc.sqlstate in ("TL4B2", "TL402")
    assert alerts() == [50, 50, 80, 80, 100, 100]


def test_item1_batch_respects_budgets_each_event_on_its_own(owner, api_conn, spender):
    set_budget(owner, spender["account_id"], "api_key", key_id(owner, spender["api_key"]), "5")
    events = [{"idempotency_key": f"b{i}", "meter": "generation"} for i in range(12)]
    import json
    data, charged, replayed, refused = api_conn.execute(
        "SELECT data, charged, replayed, refused FROM api.consume_batch(%s, NULL, %s::jsonb)",
        [spender["api_key"], json.dumps(events)]).fetchone()
    assert (charged, replayed, refused) == (5, 0, 7)
    assert {d["sqlstate"] for d in data if d["status"] == "refused"} == {"TL4B2"}
    assert balance_micros(owner, spender["account_id"]) == 95 * CREDIT
    assert owner.execute("SELECT count(*) FROM metering.usage_events WHERE api_key_id = %s",
                         [key_id(owner, spender["api_key"])]).fetchone()[0] == 6     # the allowance's one, and 5
    assert reconciliation_problems(owner) == {}


def test_item1_holds_count_against_budgets_until_settled(owner, api_conn, spender, connections):
    set_budget(owner, spender["account_id"], "account", spender["account_id"], "10")

    def hold(conn, key, quantity):
        return conn.execute("SELECT body FROM api.hold(%s, NULL, %s, 'generation', %s::bigint)", [spender["api_key"], key, quantity]).fetchone()[0]

    held = hold(api_conn, "h1", 8)
    assert sqlstate_of(lambda: hold(api_conn, "h2", 3)) == "TL4B2"
    assert sqlstate_of(lambda: consume(api_conn, spender["api_key"], "c1", quantity=3)) == "TL4B2"
    api_conn.execute("SELECT api.release_hold(%s, NULL, %s::uuid)", [spender["api_key"], held["id"]])
    # Released: the budget has its 10 again; 16 parallel holds of 1 get exactly 10.
    conns = connections(16)
    results = run_concurrently(16, lambda i: hold(conns[i], f"p{i}", 1))
    assert len([r for r in results if not isinstance(r, Exception)]) == 10
    # Capturing a hold charges its actual amount against the budget instead of the reservation.
    one = next(r for r in results if not isinstance(r, Exception))
    api_conn.execute("SELECT * FROM api.capture_hold(%s, NULL, %s::uuid)", [spender["api_key"], one["id"]])
    assert owner.execute("SELECT spent_micros FROM metering.budget_windows").fetchone()[0] == 10 * CREDIT
    assert reconciliation_problems(owner) == {}


def test_item1_usage_per_key_is_reportable_and_filterable(owner, api_conn, spender):
    second = new_key(owner, spender["account_id"])
    consume(api_conn, second, "s1")
    consume(api_conn, second, "s2")
    page = api_conn.execute("SELECT api.usage_events(%s, NULL, NULL, 20, NULL, NULL, NULL, NULL, %s::uuid)",
                            [spender["api_key"], key_id(owner, second)]).fetchone()[0]
    assert [e["idempotency_key"] for e in page["data"]] == ["s2", "s1"]
    assert {e["api_key_id"] for e in page["data"]} == {key_id(owner, second)}
    rows = owner.execute("SELECT api_key_id::text, events FROM reporting.usage_by_principal_daily WHERE account_id = %s ORDER BY 1",
                         [spender["account_id"]]).fetchall()
    assert sorted(rows) == sorted([(key_id(owner, spender["api_key"]), 1), (key_id(owner, second), 2)])


def test_item1_budget_input_is_validated(owner, spender):
    acct = spender["account_id"]
    for args, field in [(("weekly", acct, "1", "day"), "scope"), (("account", acct, "1", "week"), "window"),
                        (("account", acct, "-1", "day"), "limit"), (("account", acct, "0", "day"), "limit"),
                        (("api_key", acct, "1", "day"), "subject")]:
        with pytest.raises(psycopg.Error) as info:
            set_budget(owner, acct, *args)
        assert info.value.sqlstate == "TL422" and field in info.value.diag.message_primary
    with pytest.raises(psycopg.Error) as info:
        set_budget(owner, acct, "account", acct, "1", alerts=[0])
    assert info.value.sqlstate == "TL422"
    assert owner.execute("SELECT has_budgets FROM identity.accounts WHERE id = %s", [acct]).fetchone()[0] is False
    b = set_budget(owner, acct, "account", acct, "1")
    assert owner.execute("SELECT has_budgets FROM identity.accounts WHERE id = %s", [acct]).fetchone()[0] is True
    owner.execute("SELECT api.operator_delete_budget(%s::uuid)", [b["id"]])
    assert owner.execute("SELECT has_budgets FROM identity.accounts WHERE id = %s", [acct]).fetchone()[0] is False
