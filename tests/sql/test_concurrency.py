"""Exactly once and never overspent, with many real connections at once."""

from __future__ import annotations

import psycopg

from tests.conftest import CREDIT, consume, reconciliation_problems, run_concurrently


def test_64_connections_spend_exactly_what_allowance_and_credits_cover(owner, new_account, connections):
    # free: 10 generations a day, then 1 credit each; 5 credits: exactly 15 can be served.
    acct = new_account("free", 5 * CREDIT)
    conns = connections(64)
    results = run_concurrently(64, lambda i: consume(conns[i], acct["api_key"], f"event-{i}"))
    served = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, Exception)]
    assert len(served) == 15
    assert {r.sqlstate for r in refused} == {"TL402"}
    assert sorted(b["charged"]["allowance_units"] for _, b in served) == [0] * 5 + [1] * 10
    assert owner.execute("SELECT credit_balance_micros FROM identity.accounts WHERE id = %s",
                         [acct["account_id"]]).fetchone()[0] == 0
    assert owner.execute("SELECT used FROM metering.allowance_usage").fetchone()[0] == 10
    assert reconciliation_problems(owner) == {}


def test_100_concurrent_retries_of_one_key_charge_once_with_identical_answers(owner, new_account, connections):
    acct = new_account("free", CREDIT)
    conns = connections(100)
    results = run_concurrently(100, lambda i: consume(conns[i], acct["api_key"], "the-one-key"))
    assert not [r for r in results if isinstance(r, Exception)]
    assert sorted(replayed for replayed, _ in results) == [False] + [True] * 99
    assert len({str(body) for _, body in results}) == 1
    assert owner.execute("SELECT count(*) FROM metering.usage_events").fetchone()[0] == 1
    assert owner.execute("SELECT used FROM metering.allowance_usage").fetchone()[0] == 1


def test_concurrent_retries_and_new_events_on_one_account_stay_consistent(owner, new_account, connections):
    # 48 connections: 16 distinct keys, each sent 3 times at once; only credits pay (pro allowance used up).
    acct = new_account("pro", 10 * CREDIT)
    consume(owner, acct["api_key"], "use-up", quantity=1000)
    conns = connections(48)
    results = run_concurrently(48, lambda i: consume(conns[i], acct["api_key"], f"k{i % 16}"))
    served = {}
    for i, r in enumerate(results):
        if isinstance(r, Exception):
            assert r.sqlstate == "TL402"
        else:
            served.setdefault(i % 16, set()).add(r[1]["id"])
    assert all(len(ids) == 1 for ids in served.values())        # every key: one event, however retried
    assert len(served) == 10                                     # 10 credits pay for 10 keys
    assert owner.execute("SELECT credit_balance_micros FROM identity.accounts WHERE id = %s",
                         [acct["account_id"]]).fetchone()[0] == 0
    assert reconciliation_problems(owner) == {}


def test_concurrent_grants_with_one_key_grant_once(owner, new_account, db_url):
    acct = new_account("free")
    conns = [psycopg.connect(db_url, autocommit=True) for _ in range(32)]
    try:
        results = run_concurrently(32, lambda i: conns[i].execute(
            "SELECT replayed FROM api.grant_credits(%s::uuid, %s::bigint, 'once')",
            [acct["account_id"], 7 * CREDIT]).fetchone()[0])
    finally:
        for conn in conns:
            conn.close()
    assert sorted(results) == [False] + [True] * 31
    assert owner.execute("SELECT credit_balance_micros FROM identity.accounts WHERE id = %s",
                         [acct["account_id"]]).fetchone()[0] == 7 * CREDIT
