"""sql/schema/schema.sql is what the migrations and functions build."""

import os

import psycopg
import pytest

from api import db


def test_schema_file_matches_what_migrations_build(db_url):
    built = db.dump_schema(db_url)
    recorded = db.SCHEMA_FILE.read_text()
    if built.splitlines()[0] != recorded.splitlines()[0]:
        pytest.skip(f"sql/schema/schema.sql was generated on another major version ({recorded.splitlines()[0]})")
    assert recorded == built, (
        "sql/schema/schema.sql drifted from the migrations: regenerate it with `pgtally db schema --write`")


def test_upgrade_reapplies_functions_when_no_migration_is_pending(owner, db_url):
    owner.execute("DROP FUNCTION api.balance(text, uuid, uuid)")
    assert db.upgrade(db_url) == []
    assert owner.execute("SELECT to_regprocedure('api.balance(text, uuid, uuid)') IS NOT NULL").fetchone()[0]
    status = db.status(db_url)
    assert status and all(applied for _, applied in status)


HOT_TABLES = ["metering.usage_events", "metering.idempotency_keys", "metering.allowance_usage", "identity.accounts",
              "ledger.transfers", "ledger.entries"]


@pytest.mark.skip(reason="charges on the 0020 schema through this checkout's functions, which read columns of later "
                         "migrations (identity.accounts.has_budgets, 0032); 0021 was proven by this test when it shipped")
def test_0021_moves_the_checks_of_the_hot_tables_into_domains_without_rewriting_a_table():
    from tests.conftest import fresh_database, reconciliation_problems

    def files(conn):
        return dict(conn.execute("SELECT p.relid::regclass::text, pg_relation_filenode(p.relid) "
                                 "FROM unnest(%s::regclass[]) t, pg_partition_tree(t) p WHERE p.isleaf",
                                 [HOT_TABLES]).fetchall())

    def replays(conn, key):
        return [conn.execute("SELECT body FROM api.consume(%s, NULL, %s, 'generation', 4)", [key, f"k{i}"]).fetchone()[0]
                for i in range(4)]

    with fresh_database(f"pgtally_0021_{os.getpid()}", until="0020_check_domains") as url:
        with psycopg.connect(url, autocommit=True) as conn:
            account = conn.execute("SELECT api.create_account('free', 100000000)").fetchone()[0]
            first = replays(conn, account["api_key"])          # the allowance, then credits
            before = files(conn)
            assert len(before) > len(HOT_TABLES)              # (every month partition too)
        assert db.upgrade(url)[0] == "0021_hot_domains"
        with psycopg.connect(url, autocommit=True) as conn:
            assert files(conn) == before                        # no table was rewritten
            assert replays(conn, account["api_key"]) == first   # and every charge reads back as it was
            assert first[-1]["charged"]["credits"] != "0"
            assert reconciliation_problems(conn) == {}
            assert conn.execute("SELECT has_table_privilege('pgtally_analyst', 'reporting.usage_daily', 'SELECT')"
                                ).fetchone()[0]
            event = first[0]["id"]
            acct = account["account_id"]
            for sql in [
                "UPDATE metering.usage_events SET quantity = 0 WHERE id = %(e)s",
                "UPDATE metering.usage_events SET allowance_units = -1 WHERE id = %(e)s",
                "UPDATE metering.usage_events SET credits_micros = -1 WHERE id = %(e)s",
                "UPDATE metering.usage_events SET used_after = -1 WHERE id = %(e)s",
                "UPDATE metering.usage_events SET input_tokens = -1 WHERE id = %(e)s",
                "UPDATE metering.usage_events SET amount_minor = -1 WHERE id = %(e)s",
                "UPDATE metering.usage_events SET currency = 'USD' WHERE id = %(e)s",
                "UPDATE metering.usage_events SET metadata = '[]' WHERE id = %(e)s",
                "UPDATE metering.usage_events SET metadata = jsonb_build_object('x', repeat('y', 2048)) WHERE id = %(e)s",
                "UPDATE metering.usage_events SET warnings = '{}' WHERE id = %(e)s",
                "UPDATE metering.usage_events SET idempotency_key = '' WHERE id = %(e)s",
                "UPDATE metering.idempotency_keys SET idempotency_key = repeat('k', 256) WHERE account_id = %(a)s",
                "UPDATE metering.allowance_usage SET used = -1 WHERE account_id = %(a)s",
                "UPDATE identity.accounts SET credit_balance_micros = -1 WHERE id = %(a)s",
                "UPDATE identity.accounts SET auto_topup_below_micros = -1 WHERE id = %(a)s",
                "UPDATE identity.accounts SET name = repeat('n', 201) WHERE id = %(a)s",
                "INSERT INTO ledger.transfers (account_id, kind, amount_micros, created_at) VALUES (%(a)s, 'grant', 0, now())",
                "INSERT INTO ledger.transfers (account_id, kind, amount_micros, memo, created_at) "
                "VALUES (%(a)s, 'grant', 1, repeat('m', 501), now())",
                "INSERT INTO ledger.entries (transfer_id, system_account, amount_micros, created_at) "
                "VALUES (gen_random_uuid(), 'grants', 0, now())",
            ]:
                with pytest.raises(psycopg.Error) as info:
                    conn.execute(sql, {"e": event, "a": acct})
                assert info.value.sqlstate == "23514", sql
