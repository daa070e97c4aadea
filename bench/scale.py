"""Does a charge cost more when the database is big? pgbench runs api.consume (allowance path) on
a database holding 10M usage events (the one bench/reports.py loads, reused when it exists) and
on one holding 10k, on the same server, alternately, and prints both rates and their ratio
(issue #14's target: at least 0.9).

    .venv/bin/python bench/scale.py [--seconds 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from api import db  # noqa: E402
from bench.reports import load  # noqa: E402
from bench.run import pgbench  # noqa: E402


def keys(url: str) -> None:
    """1,000 unlimited accounts with keys in bench_keys, as bench/run.py makes them."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_keys")
        conn.execute("CREATE TABLE bench_keys (id int, plan text, key text, PRIMARY KEY (plan, id))")
        conn.execute("""INSERT INTO bench_keys SELECT i, 'unlimited', (api.create_account('unlimited') ->> 'api_key')
                        FROM generate_series(1, 1000) i""")
        conn.execute("VACUUM ANALYZE")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("PGTALLY_HOME", str(ROOT / ".pgtally" / "bench-reports"))
    server = conninfo_to_dict(db.database_url())
    admin = make_conninfo(**{**server, "dbname": "postgres"})
    with psycopg.connect(admin, autocommit=True) as conn:
        have_big = conn.execute("SELECT 1 FROM pg_database WHERE datname = 'pgtally_reports'").fetchone()
        conn.execute("DROP DATABASE IF EXISTS pgtally_small WITH (FORCE)")
        conn.execute("CREATE DATABASE pgtally_small")
        if not have_big:
            conn.execute("CREATE DATABASE pgtally_reports")
    small = make_conninfo(**{**server, "dbname": "pgtally_small"})
    big = make_conninfo(**{**server, "dbname": "pgtally_reports"})
    load(small, 10_000, 1_000, 90)
    if not have_big:
        load(big, 10_000_000, 10_000, 90)
    else:
        # A big database loaded by an older checkout is upgraded first, as an operator would (and
        # the time that takes is worth knowing); the worker's chores then run once.
        started = time.perf_counter()
        applied = db.upgrade(big)
        with psycopg.connect(big, autocommit=True) as conn:
            chores = conn.execute("SELECT api.maintain_storage()").fetchone()[0]
        print(f"upgraded the big database ({', '.join(applied) or 'nothing pending'}) and ran api.maintain_storage "
              f"({chores['idempotency_keys_forgotten']:,} keys past the window forgotten) in "
              f"{time.perf_counter() - started:,.0f} s", flush=True)
    for url in (small, big):
        keys(url)
    rates: dict[str, list[float]] = {"small": [], "big": []}
    for _ in range(args.rounds):
        for name, url in (("small", small), ("big", big)):
            rates[name].append(pgbench(url, "consume_allowance.sql", args.seconds, 8))
    with psycopg.connect(big) as conn:
        events = conn.execute("SELECT count(*) FROM metering.usage_events").fetchone()[0]
    s, b = max(rates["small"]), max(rates["big"])
    print(f"api.consume (allowance path), best of {args.rounds} runs of {args.seconds} s, 8 clients:\n"
          f"| database | usage events | consumes/s |\n|---|---:|---:|\n"
          f"| small | ~10,000 | {s:,.0f} |\n| big | {events:,} | {b:,.0f} |\n\nratio big/small: {b / s:.2f} (target 0.9)")


if __name__ == "__main__":
    main()
