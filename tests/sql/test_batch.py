"""Batches of usage events: each charged exactly once and answered on its own, one transaction,
accounts locked in a fixed order so that concurrent batches never deadlock."""

from __future__ import annotations

import json
import random
import uuid

from tests.conftest import CREDIT, reconciliation_problems, run_concurrently


def batch(conn, key, events):
    return conn.execute("SELECT data FROM api.consume_batch(%s, NULL, %s::jsonb)", [key, json.dumps(events)]).fetchone()[0]


def test_each_event_is_answered_on_its_own_and_a_refusal_stops_nothing(api_conn, owner, new_account):
    acct = new_account("free", 2 * CREDIT)
    answers = batch(api_conn, acct["api_key"], [
        {"idempotency_key": "a", "meter": "generation", "quantity": 10},
        {"idempotency_key": "b", "meter": "generation", "quantity": 50},          # 50 credits: refused
        {"idempotency_key": "c", "meter": "nope"},
        {"idempotency_key": "a", "meter": "generation", "quantity": 10},          # the same key again: a replay
        {"idempotency_key": "a", "meter": "generation", "quantity": 3},           # the same key, another request
        {"idempotency_key": "d", "meter": "generation", "quantity": 2},           # 2 credits: charged
        {"idempotency_key": "", "meter": "generation"},
        {"idempotency_key": "e", "meter": "generation", "quantity": "x"},
    ])
    assert [(a["index"], a["status"], a.get("sqlstate")) for a in answers] == [
        (0, "charged", None), (1, "refused", "TL402"), (2, "refused", "TL422"), (3, "replayed", None),
        (4, "refused", "TL42R"), (5, "charged", None), (6, "refused", "TL422"), (7, "refused", "TL422")]
    assert answers[1]["detail"]["required_credits"] == "50" and answers[0]["event"] == answers[3]["event"]
    assert answers[5]["event"]["charged"] == {"allowance_units": 0, "credits": "2"}
    assert api_conn.execute("SELECT charged, replayed, refused FROM api.consume_batch(%s, NULL, %s::jsonb)", [acct["api_key"], json.dumps([
        {"idempotency_key": "a", "meter": "generation", "quantity": 10}, {"idempotency_key": "z", "meter": "nope"}])]).fetchone() == (0, 1, 1)
    assert owner.execute("SELECT count(*) FROM metering.usage_events").fetchone()[0] == 2
    assert owner.execute("SELECT credit_balance_micros FROM identity.accounts WHERE id = %s",
                         [acct["account_id"]]).fetchone()[0] == 0
    # The same batch again: every charge replays, nothing is charged twice.
    again = batch(api_conn, acct["api_key"], [{"idempotency_key": "a", "meter": "generation", "quantity": 10},
                                               {"idempotency_key": "d", "meter": "generation", "quantity": 2}])
    assert [a["status"] for a in again] == ["replayed", "replayed"]
    assert reconciliation_problems(owner) == {}


def test_concurrent_batches_over_shared_accounts_charge_each_event_once(owner, connections):
    service = owner.execute("SELECT api.create_account('free', 0, 'meter', 'service')").fetchone()[0]["api_key"]
    accounts = [owner.execute("SELECT api.create_account('unlimited')").fetchone()[0]["account_id"] for _ in range(10)]
    conns = connections(12)

    def run(i):
        rng = random.Random(i)
        events = [{"idempotency_key": f"k{n}", "meter": "generation", "account_id": accounts[n % 10]}
                  for n in range(60)]
        rng.shuffle(events)                        # every batch names the accounts in another order
        return batch(conns[i], service, events)

    results = run_concurrently(12, run)
    assert not [r for r in results if isinstance(r, Exception)], results
    statuses = [a["status"] for r in results for a in r]
    assert statuses.count("charged") == 60 and statuses.count("replayed") == 11 * 60
    assert owner.execute("SELECT count(*) FROM metering.usage_events").fetchone()[0] == 60
    assert reconciliation_problems(owner) == {}


def test_a_batch_refuses_accounts_the_key_may_not_charge(api_conn, new_account):
    mine, other = new_account("free"), new_account("free")
    answers = batch(api_conn, mine["api_key"], [
        {"idempotency_key": "x", "meter": "generation"},
        {"idempotency_key": "y", "meter": "generation", "account_id": other["account_id"]},
        {"idempotency_key": "z", "meter": "generation", "account_id": "not-a-uuid"}])
    assert [(a["status"], a.get("sqlstate")) for a in answers] == [("charged", None), ("refused", "TL403"), ("refused", "TL422")]


def test_one_key_on_two_accounts_is_two_charges_and_each_repeat_replays_its_own(owner):
    service = owner.execute("SELECT api.create_account('free', 0, 'meter', 'service')").fetchone()[0]["api_key"]
    first, second = (owner.execute("SELECT api.create_account('unlimited')").fetchone()[0]["account_id"] for _ in range(2))
    events = [{"idempotency_key": "same", "meter": "generation", "account_id": account, "quantity": quantity}
              for account, quantity in ((first, 1), (second, 2), (second, 2), (first, 1), (first, 3))]
    answers = batch(owner, service, events)
    assert [(a["status"], a.get("sqlstate")) for a in answers] == [
        ("charged", None), ("charged", None), ("replayed", None), ("replayed", None), ("refused", "TL42R")]
    assert answers[2]["event"] == answers[1]["event"] and answers[3]["event"] == answers[0]["event"]
    assert {answers[0]["event"]["account_id"], answers[1]["event"]["account_id"]} == {first, second}
    # A thousand events, every fifth a repeat of the one before it: a repeat replays within the batch.
    account = owner.execute("SELECT api.create_account('unlimited')").fetchone()[0]
    events = [{"idempotency_key": f"k{n - (n % 5 == 4)}", "meter": "generation"} for n in range(1000)]
    statuses = [a["status"] for a in batch(owner, account["api_key"], events)]
    assert statuses.count("charged") == 800 and statuses.count("replayed") == 200
    assert reconciliation_problems(owner) == {}


def test_windows_and_lots_naming_what_does_not_exist_are_reconciliation_breaks(owner, new_account):
    # Not foreign keys (a batch updates them once per event): reporting.ledger_reference_breaks proves them.
    acct = new_account("free", 5 * CREDIT)
    batch(owner, acct["api_key"], [{"idempotency_key": f"k{n}", "meter": "generation", "quantity": 3} for n in range(5)])
    assert reconciliation_problems(owner) == {}
    owner.execute("INSERT INTO metering.allowance_usage (account_id, meter_id, period_start, period_end, used) "
                  "VALUES (gen_random_uuid(), 'generation', now(), now() + interval '1 day', 1), "
                  "(%s, 'no-such-meter', now(), now() + interval '1 day', 1)", [acct["account_id"]])
    owner.execute("INSERT INTO ledger.credit_lots (account_id, source, amount_micros, remaining_micros, status, grant_key, "
                  "transfer_id, available_at, created_at) SELECT gen_random_uuid(), 'promotion', 1, 1, 'active', 'orphan', "
                  "gen_random_uuid(), now(), now()")
    breaks = reconciliation_problems(owner)["ledger_reference_breaks"]
    assert sorted((kind, missing) for kind, _, missing, _ in breaks) == [
        ("allowance_window", "account"), ("allowance_window", "meter"), ("credit_lot", "account"), ("credit_lot", "transfer")]


def test_a_batch_counts_each_window_as_it_goes_and_leaves_it_right(owner, new_account):
    # The batch keeps each account's window in hand between its events and writes it once at the
    # end: every answer still sees the usage before it, thresholds and the allowance's end included.
    service = owner.execute("SELECT api.create_account('free', 0, 'meter', 'service')").fetchone()[0]["api_key"]
    first, second = new_account("free", 5 * CREDIT), new_account("free", 5 * CREDIT)
    events = []
    for n, quantity in enumerate([4, 4, 4, 1]):
        for acct in (first, second):
            events.append({"idempotency_key": f"k{n}", "meter": "generation", "quantity": quantity,
                           "account_id": acct["account_id"]})
    answers = batch(owner, service, events)
    for acct in (first, second):
        mine = [a["event"] for a in answers if a["event"]["account_id"] == acct["account_id"]]
        assert [e["allowance"]["used"] for e in mine] == [4, 8, 10, 10]
        assert [e["charged"]["credits"] for e in mine] == ["0", "0", "2", "1"]
        assert [[w["threshold_percent"] for w in e["warnings"]] for e in mine] == [[], [80], [100], []]
        assert owner.execute("SELECT used FROM metering.allowance_usage WHERE account_id = %s",
                             [acct["account_id"]]).fetchall() == [(10,)]
    # A charge after the batch counts from where it left the window.
    after = owner.execute("SELECT body FROM api.consume(%s, NULL, 'after', 'generation', 1)", [first["api_key"]]).fetchone()[0]
    assert after["allowance"]["used"] == 10 and after["charged"]["credits"] == "1" and after["balance"]["credits"] == "1"
    assert reconciliation_problems(owner) == {}


def test_batches_and_single_charges_racing_on_one_account_count_every_unit_once(owner, new_account, connections):
    # A batch writes its windows when it ends, while holding the account: single charges waiting on
    # the account read the window after it, so the allowance and the credits add up exactly.
    acct = new_account("free", 100 * CREDIT)           # 10 units a day free, then 1 credit a unit
    conns = connections(16)

    def run(i):
        if i % 2:
            return [a["status"] for a in batch(conns[i], acct["api_key"],
                                               [{"idempotency_key": f"b{i}-{n}", "meter": "generation"} for n in range(5)])]
        return [conns[i].execute("SELECT replayed FROM api.consume(%s, NULL, %s, 'generation')",
                                 [acct["api_key"], f"s{i}"]).fetchone() and "charged"]

    results = run_concurrently(16, run)
    assert not [r for r in results if isinstance(r, Exception)], results
    assert sum(r.count("charged") for r in results) == 8 * 5 + 8      # 48 units: 10 free, 38 credits
    used = owner.execute("SELECT used FROM metering.allowance_usage WHERE account_id = %s", [acct["account_id"]]).fetchall()
    assert used == [(10,)]
    assert owner.execute("SELECT credit_balance_micros FROM identity.accounts WHERE id = %s",
                         [acct["account_id"]]).fetchone()[0] == (100 - 38) * CREDIT
    assert reconciliation_problems(owner) == {}


def test_a_batch_mixing_plans_and_meters_answers_as_single_charges_would(owner, new_account):
    # A batch reads each account's meter, entitlement and window once and keeps them for that
    # account and meter: every answer must still be what api.consume gives for the same requests.
    service = owner.execute("SELECT api.create_account('free', 0, 'meter', 'service')").fetchone()[0]["api_key"]
    batched, single = ([new_account("free", 50 * CREDIT), new_account("unlimited", 50 * CREDIT)] for _ in range(2))
    requests = [(1, "generation", {"quantity": 150}), (0, "generation", {"quantity": 4}),
                (0, "llm_tokens", {"input_tokens": 100000, "output_tokens": 20000}), (1, "generation", {"quantity": 20}),
                (0, "generation", {"quantity": 4}), (1, "llm_tokens", {"input_tokens": 5000, "output_tokens": 0}),
                (0, "generation", {"quantity": 4}), (1, "generation", {"quantity": 40}), (0, "generation", {"quantity": 1})]
    answers = batch(owner, service, [{"idempotency_key": f"k{n}", "meter": meter, "account_id": batched[i]["account_id"],
                                      **args} for n, (i, meter, args) in enumerate(requests)])
    assert all(a["status"] == "charged" for a in answers), answers

    def comparable(event):
        return {k: v for k, v in event.items() if k not in ("id", "account_id", "created_at")}

    for n, (i, meter, args) in enumerate(requests):
        (one,) = owner.execute("SELECT body FROM api.consume(%s, NULL, %s, %s, %s, %s, %s)",
                               [single[i]["api_key"], f"k{n}", meter, args.get("quantity"), args.get("input_tokens"),
                                args.get("output_tokens")]).fetchone()
        assert comparable(answers[n]["event"]) == comparable(one), (n, answers[n], one)
    assert [(w["code"], w["threshold_percent"]) for a in answers for w in a["event"]["warnings"]] == [
        ("fair_use_threshold", 80), ("allowance_threshold", 80), ("allowance_threshold", 100), ("fair_use_threshold", 100)]
    assert reconciliation_problems(owner) == {}


def test_a_batch_s_events_get_version_7_ids_made_together_in_order(owner, new_account):
    """util.uuid_v7s: one random draw a batch, then a counter (RFC 9562 section 6.2, method 2)."""
    key = new_account("unlimited")["api_key"]
    answers = batch(owner, key, [{"idempotency_key": f"id-{n}", "meter": "generation"} for n in range(300)])
    ids = [uuid.UUID(a["event"]["id"]) for a in answers]
    assert all(i.version == 7 and i.variant == uuid.RFC_4122 for i in ids)
    assert [i.int - ids[0].int for i in ids] == list(range(300))         # ascending by one, in the events' order
    stamp = owner.execute("SELECT (extract(epoch FROM created_at) * 1000)::bigint FROM metering.usage_events WHERE id = %s",
                          [ids[0]]).fetchone()[0]
    assert abs((ids[0].int >> 80) - stamp) < 1000                          # 48-bit Unix milliseconds first
    assert (ids[0].int >> 61) & 1 == 0                                      # the counter's top bit starts clear
    again = batch(owner, key, [{"idempotency_key": f"again-{n}", "meter": "generation"} for n in range(300)])
    assert not {uuid.UUID(a["event"]["id"]) for a in again} & set(ids)
    assert owner.execute("SELECT util.uuid_v7s(0)").fetchone()[0] is None
