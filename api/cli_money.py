"""``pgtally budgets`` and ``pgtally events``: budgets and reversals for operators (issue 28),
each command one call of an ``api.*`` function as the owner. Registered on the ``pgtally`` group
by api/cli.py."""

from __future__ import annotations

import json
import uuid

import click

from api.cli import main, run_sql


@main.group()
def budgets() -> None:
    """Spending caps and alerts per API key, member and account."""


@budgets.command("set")
@click.argument("account", type=click.UUID)
@click.option("--scope", type=click.Choice(["api_key", "member", "account"]), required=True)
@click.option("--subject", type=click.UUID, default=None,
              help="The API key id, the member's user id, or (scope account, the default) the account id.")
@click.option("--limit", "limit", required=True, help="Credits per window (decimal).")
@click.option("--window", type=click.Choice(["day", "month", "billing_period"]), required=True)
@click.option("--alert", "alerts", type=click.IntRange(1, 100), multiple=True,
              help="A percentage of the limit to email at, once per window (repeatable).")
def budgets_set(account: uuid.UUID, scope: str, subject: uuid.UUID | None, limit: str, window: str,
                alerts: tuple[int, ...]) -> None:
    """Set a budget on ACCOUNT (api.operator_set_budget); setting it again changes its limit and alerts."""
    (result,) = run_sql("SELECT api.operator_set_budget(%s::uuid, %s::text, %s::uuid, %s::text, %s::text, %s::integer[])",
                        [account, scope, subject, limit, window, list(alerts)])
    click.echo(json.dumps(result, indent=2))


@budgets.command("list")
@click.argument("account", type=click.UUID)
def budgets_list(account: uuid.UUID) -> None:
    """Every budget of ACCOUNT with what its current window spent, as JSON lines."""
    (result,) = run_sql("SELECT api.operator_budgets(%s::uuid)", [account])
    for budget in result["data"]:
        click.echo(json.dumps(budget))


@budgets.command("delete")
@click.argument("budget", type=click.UUID)
def budgets_delete(budget: uuid.UUID) -> None:
    """Delete BUDGET."""
    run_sql("SELECT api.operator_delete_budget(%s::uuid)", [budget])
    click.echo(f"deleted {budget}")


@main.group()
def events() -> None:
    """Usage events: reversals."""


@events.command("reverse")
@click.argument("event", type=click.UUID)
@click.option("--quantity", type=click.IntRange(1), default=None, help="Units to reverse (default: all that are left).")
@click.option("--reason", required=True, help="Why (kept with the reversal).")
@click.option("--idempotency-key", "idempotency_key", required=True,
              help="The same key never reverses twice (a retry prints the first reversal).")
def events_reverse(event: uuid.UUID, quantity: int | None, reason: str, idempotency_key: str) -> None:
    """Reverse usage EVENT in whole or in part (api.operator_reverse_usage): its credits go back to
    the lots it drew from, its allowance to its window if still open; prints the reversal as JSON."""
    replayed, body = run_sql("SELECT replayed, body FROM api.operator_reverse_usage(%s::uuid, %s::bigint, %s::text, %s::text)",
                             [event, quantity, reason, idempotency_key])
    click.echo(json.dumps({**body, "replayed": replayed}, indent=2))


@events.command("reversal-key")
@click.argument("account", type=click.UUID)
def events_reversal_key(account: uuid.UUID) -> None:
    """Issue an operator API key with the usage:reverse scope on service ACCOUNT (shown once)."""
    (result,) = run_sql("SELECT api.operator_reversal_key(%s::uuid)", [account])
    click.echo(f"api key  {result['api_key']}  (usage:reverse, shown once)")
