"""Time every reporting view on a database holding many usage events (default 10M), after the
worker's rollup has folded them in. Prints a Markdown table: view, rows, milliseconds.

    .venv/bin/python bench/reports.py [--events 10000000] [--accounts 10000] [--days 90]

How it loads quickly: one INSERT ... SELECT FROM generate_series per million events, straight
into metering.usage_events (event ids from util.uuid_v7() in insert order, created_at spread
over the days in the same order, a stored answer of '{}'), bypassing api.consume; accounts are
made by api.create_account. Subscriptions and payments (for the revenue views) come from
api.stripe_webhook with events dated over the same days. Then api.rollup_usage runs until it is
caught up, timed too. Its database lives under .pgtally/bench-reports/ (dropped and made anew).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import Jsonb

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from api import db  # noqa: E402
from tests.stripe_standin import Events  # noqa: E402

VIEWS = ["mrr_monthly", "mrr_movements_monthly", "churn_by_plan_monthly", "revenue_monthly", "arpu_monthly",
         "conversion_by_cohort", "active_accounts_daily", "retention_weekly", "usage_per_meter_plan_monthly",
         "usage_by_hour", "revenue_reconciliation_daily", "referral_funnel_daily", "meter_event_reports_daily"]


def load(url: str, events: int, accounts: int, days: int) -> None:
    db.upgrade(url)
    db.load_catalog(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE bench_accounts (n int PRIMARY KEY, id uuid NOT NULL)")
        conn.execute(f"""INSERT INTO bench_accounts
                         SELECT n, (api.create_account(CASE WHEN n % 10 = 0 THEN 'pro' ELSE 'free' END) ->> 'account_id')::uuid
                         FROM generate_series(1, {accounts}) n""")
        conn.execute("SELECT set_config('pgtally.now', (now() - make_interval(days => %s))::text, false)", [days])
        start = conn.execute("SELECT util.now()").fetchone()[0]
        conn.execute("SELECT util.ensure_partitions(%s)", [days // 28 + 2])     # every month of the period
        # A tenth of the accounts subscribe, at a steady pace over the period; a few cancel.
        e = Events()
        for n in range(10, accounts + 1, 10):
            (account_id,) = conn.execute("SELECT id::text FROM bench_accounts WHERE n = %s", [n]).fetchone()
            created = int(start.timestamp()) + (n * days * 86400) // (accounts + 1)
            sub = Events.subscription(f"sub_{n}", f"cus_{n}", account_id, "active",
                                      "price_pro_yearly" if n % 30 == 0 else "price_pro_monthly", created, created + 30 * 86400)
            conn.execute("SELECT api.stripe_webhook(%s)", [Jsonb(e.event("customer.subscription.created", sub, created=created))])
            conn.execute("SELECT api.stripe_webhook(%s)", [Jsonb(e.event("invoice.paid", {
                "id": f"in_{n}", "object": "invoice", "customer": f"cus_{n}", "amount_paid": 999, "currency": "usd",
                "parent": {"subscription_details": {"subscription": f"sub_{n}"}},
                "lines": {"data": [{"amount": 999, "period": {"start": created, "end": created + 30 * 86400}}]}},
                created=created + 1))])
            if n % 70 == 0:
                conn.execute("SELECT api.stripe_webhook(%s)", [Jsonb(e.event(
                    "customer.subscription.deleted", {**sub, "status": "canceled"}, created=created + 15 * 86400))])
        chunk = 1_000_000
        for first in range(0, events, chunk):
            n = min(chunk, events - first)
            conn.execute(f"""
                INSERT INTO metering.usage_events (id, account_id, idempotency_key, meter_id, quantity,
                                                   allowance_units, credits_micros, balance_after_micros, created_at)
                SELECT util.uuid_v7(), a.id, 'bench-' || g, 'generation', 1 + g %% 3, 1 + g %% 3, 0, 0,
                       %s::timestamptz + (g::float8 / %s) * make_interval(days => %s)
                FROM generate_series({first}, {first + n - 1}) g
                JOIN bench_accounts a ON a.n = 1 + (g::bigint * 7919) %% {accounts}""", [start, events, days])
            print(f"loaded {first + n:,} events", file=sys.stderr, flush=True)
        # The keys of the idempotency window (the last 30 days) are remembered, as a live database's are.
        conn.execute("INSERT INTO metering.idempotency_keys (account_id, idempotency_key, usage_event_id, created_at, request_hash) "
                     "SELECT account_id, idempotency_key, id, created_at, '\\x00' FROM metering.usage_events "
                     "WHERE created_at >= now() - metering.idempotency_window()")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--days", type=int, default=90)
    args = parser.parse_args()

    os.environ.setdefault("PGTALLY_HOME", str(ROOT / ".pgtally" / "bench-reports"))
    server = conninfo_to_dict(db.database_url())
    admin = make_conninfo(**{**server, "dbname": "postgres"})
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS pgtally_reports WITH (FORCE)")
        conn.execute("CREATE DATABASE pgtally_reports")
    url = make_conninfo(**{**server, "dbname": "pgtally_reports"})
    started = time.perf_counter()
    load(url, args.events, args.accounts, args.days)
    loaded = time.perf_counter() - started
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
        started = time.perf_counter()
        folded = 0
        while (n := conn.execute("SELECT api.rollup_usage(500000)").fetchone()[0]) > 0:
            folded += n
        rolled = time.perf_counter() - started
        conn.execute("VACUUM ANALYZE")
        size = conn.execute("SELECT pg_size_pretty(sum(pg_total_relation_size(relid))) "
                            "FROM pg_partition_tree('metering.usage_events')").fetchone()[0]   # every month
        print(f"{args.events:,} usage events ({size} with indexes) for {args.accounts:,} accounts over {args.days} days: "
              f"loaded in {loaded:.0f} s, rolled up ({folded:,} events) in {rolled:.0f} s\n")
        print("| view | rows | ms |\n|---|---:|---:|")
        for view in VIEWS:
            conn.execute(f"SELECT count(*) FROM reporting.{view}")          # warm the cache once
            started = time.perf_counter()
            rows = conn.execute(f"SELECT * FROM reporting.{view}").fetchall()
            print(f"| reporting.{view} | {len(rows):,} | {(time.perf_counter() - started) * 1000:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
