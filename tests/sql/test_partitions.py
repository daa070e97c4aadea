"""Monthly partitions of usage events and ledger entries, the idempotency window, and detaching a
month (issue #14), in SQL against the real database."""

from __future__ import annotations

import time

import psycopg
import psycopg.types.json
import pytest

from tests.conftest import reconciliation_problems, set_clock

CREDIT = 1_000_000


def consume(conn, key, idem, quantity=None, metadata=None):
    return conn.execute("SELECT replayed, body FROM api.consume(%s::text, NULL, %s::text, 'generation', %s::bigint, "
                        "NULL, NULL, NULL, %s::jsonb)", [key, idem, quantity, metadata]).fetchone()


def partition_of_event(conn, event_id) -> str:
    return conn.execute("SELECT tableoid::regclass::text FROM metering.usage_events WHERE id = %s", [event_id]).fetchone()[0]


def partitions_of_entries(conn, event_id) -> set[str]:
    return {p for (p,) in conn.execute(
        "SELECT e.tableoid::regclass::text FROM ledger.entries e JOIN ledger.transfers t ON t.id = e.transfer_id "
        "WHERE t.usage_event_id = %s", [event_id])}


def sqlstate_of(fn) -> str:
    with pytest.raises(psycopg.Error) as info:
        fn()
    return info.value.sqlstate


def test_an_event_and_its_ledger_entries_land_in_the_month_of_their_utc_time(owner, new_account):
    acct = new_account("free", 100 * CREDIT)
    owner.execute("SELECT util.ensure_partitions()")
    key = acct["api_key"]
    set_clock(owner, "2026-12-31 23:59:59.999999+00")
    _, last = consume(owner, key, "last-of-december", quantity=11)       # past the allowance: credits too
    set_clock(owner, "2027-01-01 00:00:00+00")
    _, first = consume(owner, key, "first-of-january", quantity=11)
    set_clock(owner, "2027-01-01 00:59:59+01")                                    # 23:59:59 UTC the day before
    _, local = consume(owner, key, "december-in-utc", quantity=11)
    assert partition_of_event(owner, last["id"]) == "metering.usage_events_y2026m12"
    assert partitions_of_entries(owner, last["id"]) == {"ledger.entries_y2026m12"}
    assert partition_of_event(owner, first["id"]) == "metering.usage_events_y2027m01"
    assert partitions_of_entries(owner, first["id"]) == {"ledger.entries_y2027m01"}
    assert partition_of_event(owner, local["id"]) == "metering.usage_events_y2026m12"
    assert reconciliation_problems(owner) == {}


def test_rows_outside_every_month_wait_in_the_default_partition_and_move_into_their_month(owner, new_account):
    acct = new_account("free", 100 * CREDIT)
    set_clock(owner, "2024-02-29 12:00:00+00")                # no partition for that month yet
    _, body = consume(owner, acct["api_key"], "leap-day", quantity=12)
    assert partition_of_event(owner, body["id"]) == "metering.usage_events_default"
    assert partitions_of_entries(owner, body["id"]) == {"ledger.entries_default"}
    made = owner.execute("SELECT util.ensure_partitions(0)").fetchone()[0]
    assert {"metering.usage_events_y2024m02", "ledger.entries_y2024m02"} <= set(made)
    assert partition_of_event(owner, body["id"]) == "metering.usage_events_y2024m02"
    assert partitions_of_entries(owner, body["id"]) == {"ledger.entries_y2024m02"}
    assert owner.execute("SELECT count(*) FROM ledger.entries_default").fetchone()[0] == 0
    # The moved event still answers its retry, and nothing was lost or doubled.
    assert consume(owner, acct["api_key"], "leap-day", quantity=12) == (True, body)
    assert owner.execute("SELECT count(*) FROM metering.usage_events").fetchone()[0] == 1
    assert reconciliation_problems(owner) == {}


def test_a_monthly_partition_of_the_ledger_is_append_only_itself(owner, new_account):
    acct = new_account("free", 100 * CREDIT)
    consume(owner, acct["api_key"], "k", quantity=12)
    month = owner.execute("SELECT util.partition_name('ledger.entries', date_trunc('month', now())::date)").fetchone()[0]
    assert owner.execute(f"SELECT count(*) FROM {month}").fetchone()[0] == 4     # the grant and the charge
    for sql in [f"DELETE FROM {month}", f"UPDATE {month} SET amount_micros = 1", f"TRUNCATE {month}",
                "DELETE FROM ledger.entries_default"]:
        assert sqlstate_of(lambda sql=sql: owner.execute(sql)) == "TL403", sql


def test_a_key_is_remembered_for_the_window_then_forgotten(owner, api_conn, new_account):
    acct = new_account("free", 100 * CREDIT)
    key = acct["api_key"]
    set_clock(owner, "2027-01-10 12:00:00+00")
    first = consume(owner, key, "nightly-job")
    set_clock(owner, "2027-02-09 11:59:59+00")                 # 30 days less a second later
    assert consume(owner, key, "nightly-job") == (True, first[1])
    assert sqlstate_of(lambda: consume(owner, key, "nightly-job", quantity=2)) == "TL42R"
    owner.execute("SELECT api.maintain_storage()")
    assert owner.execute("SELECT count(*) FROM metering.idempotency_keys").fetchone()[0] == 1
    set_clock(owner, "2027-02-09 12:00:01+00")                 # the window has passed
    assert owner.execute("SELECT api.maintain_storage()").fetchone()[0]["idempotency_keys_forgotten"] == 1
    replayed, again = consume(owner, key, "nightly-job", quantity=2)
    assert replayed is False and again["id"] != first[1]["id"]
    assert owner.execute("SELECT count(*) FROM metering.usage_events").fetchone()[0] == 2


def test_a_remembered_key_whose_event_is_gone_is_a_loud_error_not_an_empty_answer(owner, new_account):
    # Only someone dropping a month by hand (not `pgtally partitions detach`, which forgets the
    # month's keys with it) leaves a key without its event: a retry must not get a null body.
    acct = new_account("free", 100 * CREDIT)
    _, first = consume(owner, acct["api_key"], "orphaned")
    owner.execute("DELETE FROM metering.usage_events WHERE id = %s", [first["id"]])
    assert sqlstate_of(lambda: consume(owner, acct["api_key"], "orphaned")) == "TL500"
    events = psycopg.types.json.Jsonb([{"idempotency_key": "orphaned", "meter": "generation"}])
    assert sqlstate_of(lambda: owner.execute("SELECT api.consume_batch(%s, NULL, %s)", [acct["api_key"], events])) == "TL500"


def test_the_window_is_a_setting_of_at_least_a_day(owner):
    assert owner.execute("SELECT metering.idempotency_window()").fetchone()[0].days == 30
    owner.execute("SET pgtally.idempotency_window = '90 days'")
    assert owner.execute("SELECT metering.idempotency_window()").fetchone()[0].days == 90
    owner.execute("SET pgtally.idempotency_window = '1 hour'")
    assert owner.execute("SELECT metering.idempotency_window()").fetchone()[0].days == 1


def test_a_month_detaches_after_the_window_and_the_books_still_balance(owner, new_account):
    set_clock(owner, "2026-09-10 12:00:00+00")
    owner.execute("SELECT util.ensure_partitions(1)")
    acct = new_account("free", 100 * CREDIT)          # granted in September too
    key = acct["api_key"]
    september = [consume(owner, key, f"sep-{i}", quantity=6)[1] for i in range(3)]   # 10 free, then credits
    set_clock(owner, "2026-10-02 12:00:00+00")
    october = consume(owner, key, "oct-1", quantity=6)[1]
    balance_before = owner.execute("SELECT api.balance(%s, NULL)", [key]).fetchone()[0]["credits"]

    set_clock(owner, "2026-10-30 00:00:00+00")                  # the window has not passed September's end
    assert sqlstate_of(lambda: owner.execute("SELECT api.detach_month('2026-09-01')")) == "TL422"
    set_clock(owner, "2026-11-01 00:00:00+00")
    assert sqlstate_of(lambda: owner.execute("SELECT api.detach_month('2026-09-01')")) == "TL409"   # not rolled up
    owner.execute("SELECT api.rollup_usage(100000)")
    result = owner.execute("SELECT api.detach_month('2026-09-15')").fetchone()[0]
    assert result == {"month": "2026-09", "usage_events": "metering.usage_events_y2026m09", "usage_event_count": 3,
                      "entries": "ledger.entries_y2026m09", "archived_balances": 3}
    # The month left: its tables stay, standalone, for archiving.
    assert owner.execute("SELECT count(*) FROM metering.usage_events_y2026m09").fetchone()[0] == 3
    assert [e for (e,) in owner.execute("SELECT id::text FROM metering.usage_events")] == [october["id"]]
    assert owner.execute("SELECT count(*) FROM metering.idempotency_keys").fetchone()[0] == 1
    assert owner.execute("SELECT api.balance(%s, NULL)", [key]).fetchone()[0]["credits"] == balance_before
    assert reconciliation_problems(owner) == {}
    assert owner.execute("SELECT sum(balance_micros) FROM reporting.system_balances").fetchone()[0] \
        + owner.execute("SELECT sum(credit_balance_micros) FROM identity.accounts").fetchone()[0] == 0
    # Charging goes on, and the running balances continue from the archived ones.
    consume(owner, key, "nov-1", quantity=6)
    assert reconciliation_problems(owner) == {}
    assert sqlstate_of(lambda: owner.execute("SELECT api.detach_month('2026-09-01')")) == "TL404"
    assert september[0]["id"] not in {e for (e,) in owner.execute("SELECT id::text FROM metering.usage_events")}
    listed = {r["partition"]: r["attached"] for r in owner.execute(
        "SELECT to_jsonb(p) FROM api.partitions() p").fetchall() for r in [r[0]]}
    assert listed["metering.usage_events_y2026m09"] is False and listed["metering.usage_events_y2026m10"] is True


def test_making_partitions_gives_way_to_a_long_transaction(owner, db_url):
    set_clock(owner, "2027-06-15 12:00:00+00")                 # months up to 2027-09 are due
    with psycopg.connect(db_url) as reader:
        reader.execute("SELECT count(*) FROM metering.usage_events")       # holds the table until it ends
        started = time.monotonic()
        result = owner.execute("SELECT api.maintain_storage()").fetchone()[0]
        assert result["partitions_made"] is None and 1.5 < time.monotonic() - started < 10
        assert owner.execute("SELECT to_regclass('metering.usage_events_y2027m06')").fetchone()[0] is None
        reader.rollback()
    made = owner.execute("SELECT api.maintain_storage()").fetchone()[0]["partitions_made"]
    assert "metering.usage_events_y2027m09" in made and "ledger.entries_y2027m06" in made


def test_the_server_role_the_worker_uses_makes_next_months(api_conn):
    api_conn.execute("SET pgtally.now = '2027-08-01 00:00+00'")
    made = api_conn.execute("SELECT api.maintain_storage()").fetchone()[0]["partitions_made"]
    assert "metering.usage_events_y2027m11" in made and "ledger.entries_y2027m08" in made
    assert api_conn.execute("SELECT api.maintain_storage()").fetchone()[0]["partitions_made"] == []


def test_an_event_charged_before_0017_replays_its_stored_answer(owner, new_account):
    acct = new_account("free")
    stored = {"id": "legacy", "object": "usage_event", "charged": {"allowance_units": 1, "credits": "0"}}
    hash_ = owner.execute("SELECT metering.request_hash('generation', NULL, NULL, NULL)").fetchone()[0]
    (event_id, created_at) = owner.execute(
        "INSERT INTO metering.usage_events (account_id, created_at, quantity, allowance_units, credits_micros, meter_id, "
        "idempotency_key, response) VALUES (%s, now() - interval '1 day', 1, 1, 0, 'generation', 'old-key', %s) "
        "RETURNING id, created_at", [acct["account_id"], psycopg.types.json.Jsonb(stored)]).fetchone()
    owner.execute("INSERT INTO metering.idempotency_keys VALUES (%s, 'old-key', %s, %s, %s)",
                  [acct["account_id"], event_id, created_at, hash_])
    assert consume(owner, acct["api_key"], "old-key") == (True, stored)
    assert owner.execute("SELECT count(*) FROM metering.usage_events").fetchone()[0] == 1


def test_a_charge_that_began_before_the_month_ended_but_came_after_the_next_began_still_balances(owner, db_url, new_account):
    # The late transaction's entry belongs to September (its transaction began then) but was
    # written after October's first charge of the same account: the detached month keeps it by
    # itself, so the running balances of October still start right.
    set_clock(owner, "2026-09-10 12:00:00+00")
    owner.execute("SELECT util.ensure_partitions(1)")
    acct = new_account("free", 100 * CREDIT)
    key = acct["api_key"]
    consume(owner, key, "sep-1", quantity=12)                            # 10 free, 2 credits
    set_clock(owner, "2026-10-01 00:00:00.01+00")
    october = consume(owner, key, "oct-1", quantity=12)[1]
    with psycopg.connect(db_url, autocommit=True) as late:
        set_clock(late, "2026-09-30 23:59:59.99+00")
        september_late = consume(late, key, "sep-late", quantity=13)[1]   # 3 credits, written after oct-1
    assert partition_of_event(owner, september_late["id"]) == "metering.usage_events_y2026m09"
    assert reconciliation_problems(owner) == {}

    set_clock(owner, "2026-12-15 00:00:00+00")
    owner.execute("SELECT api.rollup_usage(100000)")
    # Months leave oldest first.
    assert sqlstate_of(lambda: owner.execute("SELECT api.detach_month('2026-10-01')")) == "TL409"
    owner.execute("SELECT api.detach_month('2026-09-01')")
    kept = owner.execute("SELECT amount_micros, entries FROM ledger.archived_balances "
                         "WHERE entry_id IS NOT NULL").fetchall()
    assert kept == [(-3 * CREDIT, 1)]
    assert reconciliation_problems(owner) == {}
    consume(owner, key, "dec-1", quantity=1)
    assert reconciliation_problems(owner) == {}
    assert october["balance"]["credits"] == "96" and september_late["balance"]["credits"] == "93"
