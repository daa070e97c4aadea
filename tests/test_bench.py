"""Issue 30, "A benchmark a user can run": ``pgtally bench`` (``make bench``) measures on a database
of its own and counts every table a charge writes. The numbers belong in bench/README.md; these
tests check what the command does, never how fast."""

from __future__ import annotations

import psycopg
from click.testing import CliRunner
from psycopg.conninfo import make_conninfo

from api import bench
from api.cli import main
from tests.conftest import SERVER


def databases() -> set[str]:
    with psycopg.connect(make_conninfo(**{**SERVER, "dbname": "postgres"})) as conn:
        return {name for (name,) in conn.execute("SELECT datname FROM pg_database")}


def test_item_bench_counts_every_table_a_charge_writes(db_url):
    """Bytes per event count every table a charge writes, the unpartitioned idempotency keys and
    ledger transfers too (pg_partition_tree lists nothing of use for those: they were left out)."""
    with bench.own_database(db_url) as url:
        bench.prepare(url, 3)
        allowance, credit = bench.charge_tables(url, "unlimited"), bench.charge_tables(url, "free")
        assert {"metering.usage_events", "metering.idempotency_keys", "metering.allowance_usage"} <= set(allowance)
        assert {"ledger.transfers", "ledger.entries", "metering.idempotency_keys", "metering.usage_events"} <= set(credit)
        assert "ledger.transfers" not in allowance
        assert set(bench.charge_tables(url, "unlimited", batch=True)) >= {"metering.usage_events", "metering.idempotency_keys"}
        plain = bench.stored_bytes(url, ["metering.idempotency_keys"])
        both = bench.stored_bytes(url, ["metering.idempotency_keys", "ledger.transfers"])
        assert plain > 0 and both > plain
        with psycopg.connect(url, autocommit=True) as conn:
            partitioned = conn.execute("SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree("
                                       "'metering.usage_events') WHERE isleaf").fetchone()[0]
        assert bench.stored_bytes(url, ["metering.usage_events"]) == partitioned


def test_item_bench_quick_runs_and_leaves_nothing_behind(db_url, owner, monkeypatch):
    """pgtally bench --quick measures every row (SQL and HTTP, single and batched, with their
    ceilings and client counts) in a database of its own, dropped after; the user's database
    (DATABASE_URL) is left as it was."""
    monkeypatch.setenv("DATABASE_URL", db_url)
    before, accounts = databases(), owner.execute("SELECT count(*) FROM identity.accounts").fetchone()[0]
    result = CliRunner().invoke(main, ["bench", "--quick", "--hot-share", "0.5", "--zipf", "1.2", "--events", "300"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    table = [line.split("|")[1:-1] for line in result.output.splitlines() if line.startswith("| sql") or line.startswith("| http")]
    rows = {(cells[0].strip(), cells[1].strip(), cells[2].strip()): cells for cells in table}
    assert set(rows) == {("sql", "one-row UPDATE (ceiling)", "2"), ("sql", "api.consume, allowance path", "2"),
                         ("sql", "api.consume, credit path (ledger)", "2"),
                         ("sql", "api.consume_batch, 20 events a call", "2"),
                         ("http", "authenticated no-op through the pool (ceiling)", "4"),
                         ("http", "POST /v1/usage/events", "4"), ("http", "POST /v1/usage/events/batch, 20 events", "4")}
    for key, cells in rows.items():
        assert float(cells[3].replace(",", "")) > 0 and float(cells[5]) > 0, cells     # events/s, p99
        if key[0] == "sql" and "ceiling" not in key[1]:
            assert int(cells[8].replace(",", "")) > 0, cells                           # bytes per event
    assert "hot share 0.5" in result.output and "Zipf 1.2" in result.output
    assert databases() == before
    assert owner.execute("SELECT count(*) FROM identity.accounts").fetchone()[0] == accounts


def test_item_bench_refuses_bad_options(monkeypatch, db_url):
    """Bad options are refused before anything is made."""
    monkeypatch.setenv("DATABASE_URL", db_url)
    runner = CliRunner()
    assert "greater than 1" in runner.invoke(main, ["bench", "--quick", "--zipf", "0.5"]).output
    assert "comma-separated" in runner.invoke(main, ["bench", "--quick", "--sql-clients", "two"]).output
