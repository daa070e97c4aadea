"""Holds: reserve, capture, release and expiry, called directly in SQL, and with many real
connections at once."""

from __future__ import annotations

import random

import psycopg

from tests.conftest import CREDIT, balance, capture, consume, hold, reconciliation_problems, release, run_concurrently, sqlstate_of


def test_a_hold_reserves_what_a_charge_would_cost_and_nothing_else_may_spend_it(api_conn, owner, new_account):
    key = new_account("free", 2 * CREDIT)["api_key"]
    replayed, h = hold(api_conn, key, "h1", quantity=12)
    assert not replayed and h["status"] == "open" and h["held"] == {"allowance_units": 10, "credits": "2"}
    assert hold(api_conn, key, "h1", quantity=12) == (True, h)
    assert sqlstate_of(lambda: hold(api_conn, key, "h1", quantity=3)) == "TL42R"
    assert sqlstate_of(lambda: consume(api_conn, key, "c1")) == "TL402"            # all of it is held
    assert sqlstate_of(lambda: hold(api_conn, key, "h2")) == "TL402"
    b = balance(api_conn, key)
    assert (b["credits"], b["held"], b["available"]) == ("2", "2", "0")
    assert b["allowances"][0]["used"] == 10

    # Capture less than held: one usage event, the rest returned.
    replayed, event = capture(api_conn, key, h["id"], quantity=5)
    assert not replayed and event["charged"] == {"allowance_units": 5, "credits": "0"}
    assert capture(api_conn, key, h["id"], quantity=5) == (True, event)            # once
    assert sqlstate_of(lambda: capture(api_conn, key, h["id"], quantity=6)) == "TL42R"
    assert sqlstate_of(lambda: release(api_conn, key, h["id"])) == "TL40C"
    b = balance(api_conn, key)
    assert (b["credits"], b["held"], b["available"], b["allowances"][0]["used"]) == ("2", "0", "2", 5)
    assert owner.execute("SELECT count(*) FROM metering.usage_events").fetchone()[0] == 1
    assert reconciliation_problems(owner) == {}


def test_release_returns_everything_once_and_a_released_hold_cannot_be_captured(api_conn, owner, new_account):
    key = new_account("free", CREDIT)["api_key"]
    h = hold(api_conn, key, "h", quantity=11)[1]
    released = release(api_conn, key, h["id"])
    assert released["status"] == "released" and release(api_conn, key, h["id"])["status"] == "released"
    assert sqlstate_of(lambda: capture(api_conn, key, h["id"])) == "TL40C"
    b = balance(api_conn, key)
    assert (b["available"], b["allowances"][0]["used"]) == ("1", 0)
    assert sqlstate_of(lambda: release(api_conn, key, "00000000-0000-0000-0000-000000000000")) == "TL404"


def test_capturing_more_than_held_needs_the_balance_to_cover_it(api_conn, owner, new_account):
    key = new_account("free", CREDIT)["api_key"]
    h = hold(api_conn, key, "h", quantity=3)[1]
    assert capture(api_conn, key, h["id"], quantity=11)[1]["charged"] == {"allowance_units": 10, "credits": "1"}
    assert sqlstate_of(lambda: hold(api_conn, key, "h2", quantity=1)) == "TL402"   # the day's allowance and credits are spent
    key2 = new_account("free")["api_key"]
    h2 = hold(api_conn, key2, "h", quantity=3)[1]
    assert sqlstate_of(lambda: capture(api_conn, key2, h2["id"], quantity=11)) == "TL402"
    assert hold(api_conn, key2, "h", quantity=3)[1]["status"] == "open"            # still open
    assert reconciliation_problems(owner) == {}


def test_an_expired_hold_releases_itself_once_at_the_next_charge_or_by_the_worker(owner, new_account):
    key = new_account("free", CREDIT)["api_key"]
    owner.execute("SET pgtally.now = '2026-03-10 12:00:00+00'")
    h = hold(owner, key, "h", quantity=11, expires_in=60)[1]
    assert sqlstate_of(lambda: consume(owner, key, "before")) == "TL402"
    owner.execute("SET pgtally.now = '2026-03-10 12:01:00+00'")
    assert consume(owner, key, "after")[1]["charged"] == {"allowance_units": 1, "credits": "0"}     # lazily released
    assert owner.execute("SELECT status FROM metering.holds WHERE id = %s", [h["id"]]).fetchone()[0] == "expired"
    assert sqlstate_of(lambda: capture(owner, key, h["id"])) == "TL40C"

    other = hold(owner, key, "h2", quantity=2, expires_in=60)[1]
    owner.execute("SET pgtally.now = '2026-03-10 12:05:00+00'")
    assert owner.execute("SELECT api.expire_holds()").fetchone()[0] == 1
    assert owner.execute("SELECT api.expire_holds()").fetchone()[0] == 0                            # once
    assert owner.execute("SELECT status FROM metering.holds WHERE id = %s", [other["id"]]).fetchone()[0] == "expired"
    assert balance(owner, key)["held"] == "0" and reconciliation_problems(owner) == {}


def test_64_connections_mixing_holds_captures_releases_and_consumes_never_overspend(owner, new_account, connections):
    acct = new_account("free", 20 * CREDIT)
    key = acct["api_key"]
    conns = connections(64)

    def work(i: int):
        conn = conns[i]
        rng = random.Random(i)
        outcomes = []
        for j in range(4):
            try:
                if rng.random() < 0.3:
                    outcomes.append(("consume", consume(conn, key, f"c{i}-{j}", quantity=rng.randint(1, 3))[1]))
                    continue
                h = hold(conn, key, f"h{i}-{j}", quantity=rng.randint(1, 3))[1]
                if rng.random() < 0.6:
                    outcomes.append(("capture", capture(conn, key, h["id"], quantity=rng.randint(1, h["quantity"]))[1]))
                else:
                    outcomes.append(("release", release(conn, key, h["id"])))
            except psycopg.Error as exc:
                assert exc.sqlstate == "TL402", exc
                outcomes.append(("refused", None))
        return outcomes

    results = run_concurrently(64, work)
    assert not [r for r in results if isinstance(r, Exception)], [r for r in results if isinstance(r, Exception)][:3]
    (credits, held) = owner.execute("SELECT credit_balance_micros, held_micros FROM identity.accounts WHERE id = %s",
                                    [acct["account_id"]]).fetchone()
    assert credits >= 0 and held == 0
    assert owner.execute("SELECT count(*) FROM metering.holds WHERE status = 'open'").fetchone()[0] == 0
    used = owner.execute("SELECT sum(used) FROM metering.allowance_usage").fetchone()[0]
    charged = owner.execute("SELECT sum(allowance_units), sum(credits_micros) FROM metering.usage_events").fetchone()
    assert used == charged[0] <= 10 and charged[1] + credits == 20 * CREDIT
    assert reconciliation_problems(owner) == {}


def test_a_capture_retried_100_times_at_once_charges_once(owner, new_account, connections):
    key = new_account("free", 5 * CREDIT)["api_key"]
    conns = connections(100)
    h = hold(conns[0], key, "h", quantity=12)[1]
    results = run_concurrently(100, lambda i: capture(conns[i], key, h["id"], quantity=12))
    assert sorted(r[0] for r in results) == [False] + [True] * 99
    assert len({str(r[1]) for r in results}) == 1
    assert owner.execute("SELECT count(*) FROM metering.usage_events").fetchone()[0] == 1
    assert balance(owner, key)["credits"] == "3" and reconciliation_problems(owner) == {}
