"""sql/schema/schema.sql is what the migrations and functions build."""

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
