"""api.consume, api.check_usage and the charging rule, called directly in SQL."""

from __future__ import annotations

import psycopg
import pytest

from tests.conftest import CREDIT, balance, consume, reconciliation_problems, sqlstate_of


def test_allowance_first_then_credits_then_refused_with_nothing_charged(api_conn, owner, new_account):
    acct = new_account("free", 2 * CREDIT)
    key = acct["api_key"]
    bodies = [consume(api_conn, key, f"k{i}")[1] for i in range(12)]
    assert [b["charged"]["allowance_units"] for b in bodies] == [1] * 10 + [0, 0]
    assert [b["charged"]["credits"] for b in bodies] == ["0"] * 10 + ["1", "1"]
    assert bodies[-1]["balance"] == {"credits": "0"}
    assert bodies[9]["allowance"]["remaining"] == 0

    with pytest.raises(psycopg.Error) as info:
        consume(api_conn, key, "k-refused")
    assert info.value.sqlstate == "TL402"
    assert '"resets_at"' in info.value.diag.message_detail
    # Refused: no event, no allowance, no credits taken.
    assert owner.execute("SELECT count(*) FROM metering.usage_events").fetchone()[0] == 12
    assert balance(api_conn, key)["credits"] == "0"
    assert reconciliation_problems(owner) == {}


def test_partial_allowance_spills_into_credits(api_conn, new_account):
    key = new_account("free", 5 * CREDIT)["api_key"]
    consume(api_conn, key, "a", quantity=8)
    body = consume(api_conn, key, "b", quantity=4)[1]
    assert body["charged"] == {"allowance_units": 2, "credits": "2"}
    assert body["balance"] == {"credits": "3"}


def test_same_key_same_request_replays_and_other_request_conflicts(api_conn, owner, new_account):
    key = new_account("free", CREDIT)["api_key"]
    replayed, first = consume(api_conn, key, "same")
    assert replayed is False
    consume(api_conn, key, "other")
    replayed, again = consume(api_conn, key, "same", quantity=1)   # quantity 1 is the default
    assert replayed is True and again == first
    assert sqlstate_of(lambda: consume(api_conn, key, "same", quantity=2)) == "TL42R"
    assert owner.execute("SELECT sum(quantity) FROM metering.usage_events").fetchone()[0] == 2


def test_keys_are_per_account(api_conn, new_account):
    a, b = new_account()["api_key"], new_account()["api_key"]
    assert consume(api_conn, a, "shared")[0] is False
    assert consume(api_conn, b, "shared")[0] is False


def test_warnings_when_crossing_80_and_100_percent(api_conn, new_account):
    key = new_account("free")["api_key"]
    warnings = [consume(api_conn, key, f"w{i}")[1]["warnings"] for i in range(10)]
    assert [i for i, w in enumerate(warnings) if w] == [7, 9]          # the 8th and the 10th use
    assert warnings[7][0]["threshold_percent"] == 80 and warnings[7][0]["used"] == 8
    assert warnings[9][0]["threshold_percent"] == 100


def test_one_request_crossing_both_thresholds_gets_both_warnings(api_conn, new_account):
    key = new_account("free")["api_key"]
    body = consume(api_conn, key, "big", quantity=10)[1]
    assert [w["threshold_percent"] for w in body["warnings"]] == [80, 100]


def test_daily_allowance_resets_at_midnight_utc(owner, new_account):
    key = new_account("free")["api_key"]
    owner.execute("SET pgtally.now = '2026-03-10 23:59:59+00'")
    body = consume(owner, key, "late", quantity=10)[1]
    assert body["allowance"]["resets_at"] == "2026-03-11T00:00:00.000000Z"
    assert sqlstate_of(lambda: consume(owner, key, "still-late")) == "TL402"
    owner.execute("SET pgtally.now = '2026-03-11 00:00:00+00'")
    body = consume(owner, key, "next-day")[1]
    assert body["charged"] == {"allowance_units": 1, "credits": "0"}
    assert body["allowance"]["remaining"] == 9


def test_monthly_allowance_resets_on_the_first(owner, new_account):
    key = new_account("pro")["api_key"]
    owner.execute("SET pgtally.now = '2026-01-31 12:00:00+00'")
    body = consume(owner, key, "jan", quantity=1000)[1]
    assert body["allowance"]["remaining"] == 0 and body["allowance"]["resets_at"] == "2026-02-01T00:00:00.000000Z"
    assert sqlstate_of(lambda: consume(owner, key, "jan-2")) == "TL402"
    owner.execute("SET pgtally.now = '2026-02-01 00:00:00+00'")
    assert consume(owner, key, "feb")[1]["allowance"]["used"] == 1


def test_fair_use_warns_and_never_blocks_or_charges(api_conn, new_account):
    key = new_account("unlimited")["api_key"]
    assert consume(api_conn, key, "a", quantity=159)[1]["warnings"] == []
    assert [w["threshold_percent"] for w in consume(api_conn, key, "b")[1]["warnings"]] == [80]
    body = consume(api_conn, key, "c", quantity=100)[1]
    assert [w["code"] for w in body["warnings"]] == ["fair_use_threshold"]
    assert body["charged"] == {"allowance_units": 100, "credits": "0"}
    body = consume(api_conn, key, "d", quantity=1000)[1]
    assert body["warnings"] == [] and body["charged"]["credits"] == "0"
    assert body["allowance"]["used"] == 1260


def test_token_meter_charges_input_and_output_rates_times_margin(api_conn, new_account):
    key = new_account("free", CREDIT)["api_key"]
    body = consume(api_conn, key, "t", meter="llm_tokens", input_tokens=1000, output_tokens=500)[1]
    # (1000 * 3 + 500 * 15) credits per million tokens, times the 1.2 margin = 0.0126 credits.
    assert body["charged"] == {"allowance_units": 0, "credits": "0.0126"}
    assert body["balance"] == {"credits": "0.9874"}
    assert body["allowance"] is None


def test_token_cost_rounds_up_to_a_whole_micro_credit(api_conn, new_account):
    key = new_account("free", CREDIT)["api_key"]
    body = consume(api_conn, key, "t", meter="llm_tokens", input_tokens=1, output_tokens=0)[1]
    assert body["charged"]["credits"] == "0.000004"      # 3.6 micro-credits, rounded up


@pytest.mark.parametrize("args", [
    dict(meter="nope"),
    dict(quantity=0),
    dict(quantity=-3),
    dict(input_tokens=5),                                  # tokens on a unit meter
    dict(meter="llm_tokens", quantity=1),                  # quantity on a token meter
    dict(meter="llm_tokens"),                              # no tokens
    dict(meter="llm_tokens", input_tokens=-1, output_tokens=5),
    dict(quantity=9_000_000_000_000_000_000),
])
def test_bad_requests_are_refused_as_invalid(api_conn, owner, new_account, args):
    key = new_account("free", CREDIT)["api_key"]
    assert sqlstate_of(lambda: consume(api_conn, key, "bad", **args)) == "TL422"
    assert owner.execute("SELECT count(*) FROM metering.usage_events").fetchone()[0] == 0


def test_unknown_or_revoked_key_is_unauthenticated(api_conn, owner, new_account):
    acct = new_account()
    assert sqlstate_of(lambda: consume(api_conn, "pgt_not-a-key", "k")) == "TL401"
    owner.execute("UPDATE identity.api_keys SET revoked_at = now() WHERE id = %s", [acct["api_key_id"]])
    assert sqlstate_of(lambda: consume(api_conn, acct["api_key"], "k")) == "TL401"


def test_idempotency_key_is_required(api_conn, new_account):
    key = new_account()["api_key"]
    assert sqlstate_of(lambda: consume(api_conn, key, "")) == "TL422"
    assert sqlstate_of(lambda: consume(api_conn, key, "x" * 256)) == "TL422"


def test_check_tells_what_consume_would_do_and_changes_nothing(api_conn, owner, new_account):
    key = new_account("free", CREDIT)["api_key"]
    consume(api_conn, key, "a", quantity=10)
    check = api_conn.execute("SELECT api.check_usage(%s, NULL, 'generation', 1)", [key]).fetchone()[0]
    assert check["allowed"] is True and check["charge"] == {"allowance_units": 0, "credits": "1"}
    assert check["balance"] == {"credits": "0"}
    check = api_conn.execute("SELECT api.check_usage(%s, NULL, 'generation', 2)", [key]).fetchone()[0]
    assert check["allowed"] is False and check["required_credits"] == "2"
    assert check["resets_at"] is not None
    assert balance(api_conn, key)["credits"] == "1"
    assert owner.execute("SELECT count(*) FROM metering.usage_events").fetchone()[0] == 1
    assert consume(api_conn, key, "b")[1]["charged"]["credits"] == "1"


def test_balance_lists_allowances_of_the_plan(api_conn, new_account):
    key = new_account("free", 3 * CREDIT)["api_key"]
    consume(api_conn, key, "a", quantity=3)
    body = balance(api_conn, key)
    assert body["plan"] == "free" and body["credits"] == "3"
    (allowance,) = body["allowances"]
    assert allowance["meter"] == "generation" and allowance["used"] == 3 and allowance["remaining"] == 7


def test_usage_already_made_today_counts_after_falling_back_to_free(owner, new_account):
    acct = new_account("pro")
    key = acct["api_key"]
    owner.execute("SET pgtally.now = '2026-03-10 12:00:00+00'")
    assert consume(owner, key, "pro-13", quantity=13)[1]["charged"] == {"allowance_units": 13, "credits": "0"}
    # The subscription ends (billing.sync_account_plan): metered as free, 10 a day.
    owner.execute("UPDATE identity.accounts SET plan_id = 'free' WHERE id = %s", [acct["account_id"]])
    (generation,) = balance(owner, key)["allowances"]
    assert (generation["used"], generation["remaining"]) == (13, 0)
    assert sqlstate_of(lambda: consume(owner, key, "free-1")) == "TL402"
    owner.execute("SET pgtally.now = '2026-03-11 00:00:01+00'")
    assert consume(owner, key, "free-2")[1]["allowance"]["remaining"] == 9
    assert reconciliation_problems(owner) == {}


def test_token_allowances_in_the_catalog_are_credits(owner):
    catalog = {"meters": {"llm": {"pricing": "tokens", "input_price_per_million": 3, "output_price_per_million": 15}},
               "plans": {"dev": {"entitlements": {"llm": {"allowance": "2.5", "period": "month"}}}}}
    owner.execute("SELECT api.load_catalog(%s)", [psycopg.types.json.Jsonb(catalog)])
    assert owner.execute("SELECT limit_units FROM billing.entitlements WHERE plan_id = 'dev'").fetchone()[0] == 2_500_000
    catalog["plans"]["dev"]["entitlements"]["llm"]["allowance"] = "1e3"
    assert sqlstate_of(lambda: owner.execute("SELECT api.load_catalog(%s)", [psycopg.types.json.Jsonb(catalog)])) == "TL422"
    catalog["meters"]["gen"] = {"price": 1}
    catalog["plans"]["dev"]["entitlements"] = {"gen": {"allowance": 1.5}}
    assert sqlstate_of(lambda: owner.execute("SELECT api.load_catalog(%s)", [psycopg.types.json.Jsonb(catalog)])) == "TL422"
