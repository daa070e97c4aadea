"""The credit ledger, grants, the server role's limits and the reconciliation views."""

from __future__ import annotations

import psycopg
import pytest

from api import db
from tests.conftest import CREDIT, consume, reconciliation_problems, sqlstate_of


def grant(conn, account_id, micros, key, memo=None):
    return conn.execute("SELECT replayed, body FROM api.grant_credits(%s::uuid, %s::bigint, %s::text, %s::text)",
                        [account_id, micros, key, memo]).fetchone()


def test_grant_is_applied_once_per_idempotency_key(owner, new_account):
    acct = new_account("free")
    replayed, first = grant(owner, acct["account_id"], 5 * CREDIT, "promo-1", "welcome")
    assert replayed is False and first["amount"] == "5" and first["balance_after"] == "5"
    replayed, again = grant(owner, acct["account_id"], 5 * CREDIT, "promo-1", "welcome")
    assert replayed is True and again == first
    assert sqlstate_of(lambda: grant(owner, acct["account_id"], 6 * CREDIT, "promo-1")) == "TL42R"
    assert owner.execute("SELECT credit_balance_micros FROM identity.accounts WHERE id = %s",
                         [acct["account_id"]]).fetchone()[0] == 5 * CREDIT


@pytest.mark.parametrize("micros", [0, -CREDIT])
def test_grant_must_be_positive(owner, new_account, micros):
    assert sqlstate_of(lambda: grant(owner, new_account()["account_id"], micros, "k")) == "TL422"


def test_grant_to_unknown_account_is_not_found(owner):
    assert sqlstate_of(lambda: grant(owner, "00000000-0000-0000-0000-000000000000", CREDIT, "k")) == "TL404"


def test_create_account_refuses_unknown_plan(owner):
    assert sqlstate_of(lambda: owner.execute("SELECT api.create_account('gold')")) == "TL422"


def test_every_change_is_a_balanced_transfer_with_running_balances(owner, api_conn, new_account):
    acct = new_account("free", 3 * CREDIT)
    grant(owner, acct["account_id"], 2 * CREDIT, "g")
    for i in range(13):
        consume(api_conn, acct["api_key"], f"u{i}")
    rows = owner.execute("""SELECT t.kind, e.amount_micros, e.balance_after_micros
                            FROM ledger.entries e JOIN ledger.transfers t ON t.id = e.transfer_id
                            WHERE e.account_id = %s ORDER BY e.id""", [acct["account_id"]]).fetchall()
    assert rows == [("grant", 3 * CREDIT, 3 * CREDIT), ("grant", 2 * CREDIT, 5 * CREDIT),
                    ("usage", -CREDIT, 4 * CREDIT), ("usage", -CREDIT, 3 * CREDIT), ("usage", -CREDIT, 2 * CREDIT)]
    system = dict(owner.execute("SELECT system_account, balance_micros FROM reporting.system_balances").fetchall())
    assert system["grants"] == -5 * CREDIT and system["usage"] == 3 * CREDIT
    assert reconciliation_problems(owner) == {}


def test_ledger_pages_newest_first_with_a_cursor(owner, api_conn, new_account):
    acct = new_account("free")
    for i in range(5):
        grant(owner, acct["account_id"], (i + 1) * CREDIT, f"g{i}")
    page = api_conn.execute("SELECT api.ledger(%s, NULL, NULL, 2)", [acct["api_key"]]).fetchone()[0]
    assert [e["amount"] for e in page["data"]] == ["5", "4"] and page["has_more"] is True
    page = api_conn.execute("SELECT api.ledger(%s, NULL, %s, 2)", [acct["api_key"], page["next_cursor"]]).fetchone()[0]
    assert [e["amount"] for e in page["data"]] == ["3", "2"]
    page = api_conn.execute("SELECT api.ledger(%s, NULL, %s, 2)", [acct["api_key"], page["next_cursor"]]).fetchone()[0]
    assert [e["amount"] for e in page["data"]] == ["1"]
    assert page["has_more"] is False and page["next_cursor"] is None
    assert sqlstate_of(lambda: api_conn.execute("SELECT api.ledger(%s, NULL, 'abc', 2)", [acct["api_key"]])) == "TL422"
    assert sqlstate_of(lambda: api_conn.execute("SELECT api.ledger(%s, NULL, NULL, 0)", [acct["api_key"]])) == "TL422"


def test_ledger_shows_only_the_callers_entries(owner, api_conn, new_account):
    a = new_account("free", CREDIT)
    new_account("free", 2 * CREDIT)           # another account, whose entries must not show
    page = api_conn.execute("SELECT api.ledger(%s, NULL)", [a["api_key"]]).fetchone()[0]
    assert [e["amount"] for e in page["data"]] == ["1"]


def test_ledger_is_append_only(owner, new_account):
    new_account("free", CREDIT)
    assert sqlstate_of(lambda: owner.execute("UPDATE ledger.entries SET amount_micros = 1")) == "TL403"
    assert sqlstate_of(lambda: owner.execute("DELETE FROM ledger.transfers")) == "TL403"


def test_balance_can_never_go_negative(owner, new_account):
    acct = new_account("free", CREDIT)
    assert sqlstate_of(lambda: owner.execute(
        "UPDATE identity.accounts SET credit_balance_micros = -1 WHERE id = %s", [acct["account_id"]])) == "23514"


def test_an_unbalanced_transfer_cannot_commit(owner, new_account):
    acct = new_account("free")
    with pytest.raises(psycopg.Error) as info:
        with owner.transaction():
            (tid,) = owner.execute("INSERT INTO ledger.transfers (account_id, kind, amount_micros) "
                                   "VALUES (%s, 'grant', 1) RETURNING id", [acct["account_id"]]).fetchone()
            owner.execute("INSERT INTO ledger.entries (transfer_id, system_account, amount_micros) "
                          "VALUES (%s, 'grants', -1)", [tid])
    assert info.value.sqlstate == "TL500"


def test_server_role_can_only_execute_granted_api_functions(api_conn, new_account):
    new_account("free", CREDIT)
    for sql in ["SELECT * FROM ledger.entries", "SELECT * FROM identity.accounts",
                "SELECT * FROM metering.usage_events", "SELECT * FROM reporting.balance_mismatches",
                "SELECT api.grant_credits(gen_random_uuid(), 1, 'k')", "SELECT api.create_account('free')",
                "SELECT api.load_catalog('{}')", "SELECT identity.authenticate('x', NULL, 'usage:read')"]:
        assert sqlstate_of(lambda sql=sql: api_conn.execute(sql)) == "42501", sql
    assert api_conn.execute("SELECT current_user").fetchone()[0] == db.API_ROLE


def test_the_server_logs_in_as_a_role_that_cannot_become_anything_more(api_conn, owner):
    assert api_conn.execute("SELECT session_user, current_user").fetchone() == (db.API_ROLE, db.API_ROLE)
    assert owner.execute("SELECT rolsuper, rolcreaterole, rolcreatedb, rolcanlogin FROM pg_roles WHERE rolname = %s",
                         [db.API_ROLE]).fetchone() == (False, False, False, True)
    api_conn.execute("RESET ROLE")
    assert api_conn.execute("SELECT current_user").fetchone()[0] == db.API_ROLE
    for sql in ["SELECT * FROM identity.accounts", "SELECT pg_read_file('postgresql.conf')",
                "CREATE TABLE util.stolen (x int)", "SET ROLE postgres", "SET ROLE pgtally_analyst",
                "SET SESSION AUTHORIZATION postgres", "SELECT * FROM identity.jwt_keys"]:
        assert sqlstate_of(lambda sql=sql: api_conn.execute(sql)) in ("42501", "3F000"), sql


def test_analyst_role_reads_reporting_views_only(db_url, new_account):
    new_account("free", CREDIT)
    with psycopg.connect(psycopg.conninfo.make_conninfo(db_url, options="-c role=pgtally_analyst"),
                         autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM reporting.system_balances").fetchone()[0] == 5
        assert sqlstate_of(lambda: conn.execute("SELECT * FROM ledger.entries")) == "42501"


def test_catalog_load_validates_and_deactivates_missing_plans(owner):
    bad = '{"meters": {"m": {"price": "0.0000001"}}, "plans": {}}'
    assert sqlstate_of(lambda: owner.execute("SELECT api.load_catalog(%s)", [bad])) == "TL422"
    bad = '{"meters": {"m": {"price": 1}}, "plans": {"p": {"entitlements": {"other": {"allowance": 1}}}}}'
    assert sqlstate_of(lambda: owner.execute("SELECT api.load_catalog(%s)", [bad])) == "TL422"
    good = '{"meters": {"generation": {"price": 2}}, "plans": {"solo": {"entitlements": {"generation": {"allowance": 3, "period": "day"}}}}}'
    owner.execute("SELECT api.load_catalog(%s)", [good])
    active = [r[0] for r in owner.execute("SELECT id FROM billing.plans WHERE active ORDER BY id")]
    assert active == ["solo"]
    assert owner.execute("SELECT unit_price_micros FROM metering.meters WHERE id = 'generation'").fetchone()[0] == 2 * CREDIT


def test_housekeeping_deletes_old_rate_limit_buckets(owner, api_conn):
    owner.execute("INSERT INTO identity.rate_limits VALUES ('login:ip:x', ARRAY[now() - interval '3 days']), "
                  "('login:ip:y', ARRAY[now() - interval '3 days', now()]), ('login:ip:z', '{}')")
    assert api_conn.execute("SELECT api.housekeeping()").fetchone()[0] == {"rate_limit_buckets_deleted": 2, "holds_expired": 0,
                                                                          "credit_accounts_refreshed": 0}
    assert owner.execute("SELECT bucket FROM identity.rate_limits").fetchall() == [("login:ip:y",)]


@pytest.mark.parametrize("key, data, digest", [
    # RFC 4231 test cases 1, 2 and 6 (a key longer than the block).
    ("0b" * 20, b"Hi There".hex(), "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"),
    (b"Jefe".hex(), b"what do ya want for nothing?".hex(),
     "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"),
    ("aa" * 131, b"Test Using Larger Than Block-Size Key - Hash Key First".hex(),
     "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"),
])
def test_hmac_sha256_matches_rfc_4231(owner, key, data, digest):
    assert owner.execute("SELECT encode(util.hmac_sha256(decode(%s, 'hex'), decode(%s, 'hex')), 'hex')",
                         [key, data]).fetchone()[0] == digest


@pytest.mark.parametrize("micros, text", [(12_500_000, "12.5"), (0, "0"), (1, "0.000001"), (-2_000_000, "-2"),
                                          (6000000000000052392, "6000000000000.052392"),
                                          (9223372036854775807, "9223372036854.775807"),
                                          (-9223372036854775808, "-9223372036854.775808")])
def test_credits_are_formatted_exactly_for_any_bigint(owner, micros, text):
    assert owner.execute("SELECT util.credits(%s::bigint)", [micros]).fetchone()[0] == text


def test_a_grant_past_the_largest_balance_is_invalid_not_an_overflow(owner, new_account):
    account = new_account("free", 9_000_000_000_000_000_000)["account_id"]
    assert sqlstate_of(lambda: owner.execute("SELECT api.grant_credits(%s, 9000000000000000000, 'k')", [account])) == "TL422"
    assert owner.execute("SELECT util.credits(credit_balance_micros) FROM identity.accounts WHERE id = %s",
                         [account]).fetchone()[0] == "9000000000000"


def test_the_string_rules_of_accounts_transfers_and_lots_still_refuse_bad_values(owner, new_account):
    # Migration 0020 moved them from table checks into domains: the same rules, the same SQLSTATE.
    acct = new_account("free", CREDIT)
    lot = owner.execute("SELECT id FROM ledger.credit_lots WHERE account_id = %s", [acct["account_id"]]).fetchone()[0]
    for sql, args in [
        ("UPDATE identity.accounts SET kind = 'robot' WHERE id = %s", [acct["account_id"]]),
        ("UPDATE identity.accounts SET device_fingerprint = '' WHERE id = %s", [acct["account_id"]]),
        ("UPDATE identity.accounts SET suspended_reason = repeat('x', 501) WHERE id = %s", [acct["account_id"]]),
        ("UPDATE ledger.credit_lots SET status = 'spent' WHERE id = %s", [lot]),
        ("UPDATE ledger.credit_lots SET source = 'gift' WHERE id = %s", [lot]),
        ("UPDATE ledger.credit_lots SET grant_key = '' WHERE id = %s", [lot]),
        ("UPDATE ledger.credit_lots SET memo = repeat('x', 501) WHERE id = %s", [lot]),
        ("INSERT INTO ledger.transfers (account_id, kind, amount_micros, created_at) VALUES (%s, 'gift', 1, now())",
         [acct["account_id"]]),
        ("INSERT INTO ledger.transfers (account_id, kind, amount_micros, idempotency_key, created_at) "
         "VALUES (%s, 'grant', 1, repeat('k', 256), now())", [acct["account_id"]]),
    ]:
        assert sqlstate_of(lambda sql=sql, args=args: owner.execute(sql, args)) == "23514", sql
    # Valid values still go in.
    owner.execute("UPDATE identity.accounts SET suspended_reason = repeat('x', 500), device_fingerprint = 'fp' "
                  "WHERE id = %s", [acct["account_id"]])
