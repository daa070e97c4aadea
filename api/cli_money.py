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
