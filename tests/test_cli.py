"""The pgtally command against a real database (DATABASE_URL pointed at the test database)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from api.cli import main
from tests.conftest import reconciliation_problems


@pytest.fixture
def pgtally(db_url, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", db_url)
    runner = CliRunner()

    def run(*args: str, ok: bool = True):
        result = runner.invoke(main, list(args), catch_exceptions=False)
        assert (result.exit_code == 0) == ok, result.output
        return result.output

    return run


def test_accounts_create_prints_a_working_key_once(pgtally, api_conn):
    out = json.loads(pgtally("accounts", "create", "--plan", "pro", "--credits", "2.5", "--json"))
    assert out["plan"] == "pro" and out["balance"] == {"credits": "2.5"} and out["api_key"].startswith("pgt_")
    body = api_conn.execute("SELECT api.balance(%s, NULL)", [out["api_key"]]).fetchone()[0]
    assert body["account_id"] == out["account_id"] and body["credits"] == "2.5"
    assert "api key" in pgtally("accounts", "create", "--plan", "free")


def test_accounts_create_refuses_unknown_plan_and_bad_credits(pgtally):
    assert "no active plan" in pgtally("accounts", "create", "--plan", "gold", ok=False)
    assert "6 decimals" in pgtally("accounts", "create", "--plan", "free", "--credits", "0.0000001", ok=False)
    assert "not a plain decimal" in pgtally("accounts", "create", "--plan", "free", "--credits", "lots", ok=False)
    assert "not a plain decimal" in pgtally("accounts", "create", "--plan", "free", "--credits", "1e3", ok=False)


def test_credits_grant_is_idempotent_with_a_key(pgtally, owner):
    account = json.loads(pgtally("accounts", "create", "--plan", "free", "--json"))["account_id"]
    first = json.loads(pgtally("credits", "grant", account, "3", "--idempotency-key", "k1", "--json"))
    again = json.loads(pgtally("credits", "grant", account, "3", "--idempotency-key", "k1", "--json"))
    assert (first["replayed"], again["replayed"]) == (False, True)
    assert again["balance_after"] == "3"
    assert "different" in pgtally("credits", "grant", account, "4", "--idempotency-key", "k1", ok=False)


def test_plans_load_and_db_commands(pgtally, tmp_path, owner):
    catalog = tmp_path / "plans.toml"
    catalog.write_text('[meters.generation]\nprice = 2\n\n[plans.team]\nname = "Team"\n'
                       'entitlements.generation = { allowance = 50, period = "billing_period" }\n')
    assert "plans: team" in pgtally("plans", "load", str(catalog))
    assert owner.execute("SELECT kind, period, limit_units FROM billing.entitlements WHERE plan_id = 'team'"
                         ).fetchone() == ("allowance", "billing_period", 50)
    assert "applied  0001_skeleton" in pgtally("db", "status")
    assert "functions re-applied" in pgtally("db", "upgrade")
    catalog.write_text("[plans.x]\n")
    assert "meters" in pgtally("plans", "load", str(catalog), ok=False)


def test_reconcile_passes_then_reports_a_tampered_balance(pgtally, owner):
    account = json.loads(pgtally("accounts", "create", "--plan", "free", "--credits", "2", "--json"))["account_id"]
    assert "ok    reporting.balance_mismatches: 0 row(s)" in pgtally("reconcile")
    owner.execute("UPDATE identity.accounts SET credit_balance_micros = 5000000 WHERE id = %s", [account])
    out = pgtally("reconcile", ok=False)
    assert "FAIL  reporting.balance_mismatches: 1 row(s)" in out and account in out


def test_credits_adjust_takes_back_never_below_zero(pgtally, owner):
    account = json.loads(pgtally("accounts", "create", "--plan", "free", "--credits", "10", "--json"))["account_id"]
    out = json.loads(pgtally("credits", "adjust", account, "--reason", "duplicate grant", "--json", "--", "-4.5"))
    assert out["amount"] == "-4.5" and out["balance_after"] == "5.5" and out["kind"] == "adjustment"
    assert out["memo"] == "duplicate grant"
    assert "not enough credits" in pgtally("credits", "adjust", account, "--reason", "x", "--", "-6", ok=False)
    assert "reason" in pgtally("credits", "adjust", account, "-1", ok=False)
    assert "not a plain decimal" in pgtally("credits", "grant", account, "1e3", ok=False)
    assert reconciliation_problems(owner) == {}


def test_accounts_list_and_show(pgtally):
    account = json.loads(pgtally("accounts", "create", "--plan", "pro", "--credits", "3", "--json"))["account_id"]
    rows = [json.loads(line) for line in pgtally("accounts", "list", "--plan", "pro", "--json").splitlines()]
    assert [r["account_id"] for r in rows] == [account] and rows[0]["credits"] == "3"
    shown = json.loads(pgtally("accounts", "show", account))
    assert shown["plan"] == "pro" and shown["api_keys"] == 1 and shown["allowances"][0]["meter"] == "generation"
    assert "no account" in pgtally("accounts", "show", "00000000-0000-0000-0000-000000000000", ok=False)


def test_version(pgtally):
    assert pgtally("--version").startswith("pgtally, version ")


def test_db_psql_opens_the_database(db_url, new_account):
    import os
    import subprocess
    import sys
    from pathlib import Path

    account = new_account("free")["account_id"]
    pgtally = Path(sys.executable).parent / "pgtally"
    out = subprocess.run([str(pgtally), "db", "psql", "-At", "-c", "SELECT id FROM identity.accounts"],
                         env={**os.environ, "DATABASE_URL": db_url}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == account


def test_login_tokens_go_to_the_os_keyring_when_there_is_one(tmp_path, monkeypatch):
    """With a keyring present the credentials file names the server only (an in-memory keyring
    stands in for the OS's: the keyring package's own backend interface)."""
    import keyring
    from keyring.backend import KeyringBackend

    from api import cli_people as cli

    class Memory(KeyringBackend):
        priority = 1
        store: dict = {}

        def get_password(self, service, username):
            return self.store.get((service, username))

        def set_password(self, service, username, password):
            self.store[(service, username)] = password

        def delete_password(self, service, username):
            del self.store[(service, username)]

    monkeypatch.setenv("PGTALLY_CONFIG_DIR", str(tmp_path))
    previous = keyring.get_keyring()
    keyring.set_keyring(Memory())
    try:
        cli.save_credentials({"url": "http://pgtally.test", "access_token": "at", "refresh_token": "rt", "expires_at": 1})
        assert json.loads((tmp_path / "credentials.json").read_text()) == {"url": "http://pgtally.test", "in_keyring": True}
        assert cli.load_credentials()["refresh_token"] == "rt"
        cli.forget_credentials()
        assert Memory.store == {} and not (tmp_path / "credentials.json").exists()
    finally:
        keyring.set_keyring(previous)


def test_partitions_list_and_detach(pgtally, owner, new_account):
    owner.execute("SET pgtally.now = '2026-08-10 12:00+00'")
    owner.execute("SELECT util.ensure_partitions(0)")
    acct = new_account("free", 3_000_000)
    owner.execute("SELECT * FROM api.consume(%s, NULL, 'aug', 'generation', 12)", [acct["api_key"]])
    owner.execute("SET pgtally.now = '2026-10-01 00:00+00'")
    owner.execute("SELECT api.rollup_usage(1000)")
    listed = pgtally("partitions", "list")
    assert "metering.usage_events_y2026m08" in listed and "ledger.entries_y2026m08" in listed
    # The CLI's own connection has the real clock: August is long past its window.
    out = pgtally("partitions", "detach", "2026-08")
    assert "2026-08: detached metering.usage_events_y2026m08 (1 usage events)" in out
    assert "already" in pgtally("partitions", "detach", "2026-08", ok=False)
    assert "window" in pgtally("partitions", "detach", "2099-01", ok=False)
    assert reconciliation_problems(owner) == {}


def test_item1_pgtally_budgets_set_list_delete(pgtally, new_account, api_conn):
    acct = new_account("free", 5 * 1_000_000)
    budget = json.loads(pgtally("budgets", "set", acct["account_id"], "--scope", "account", "--limit", "1",
                                "--window", "month", "--alert", "80"))
    assert budget["limit"] == "1" and budget["alerts"] == [80] and budget["window"] == "month"
    assert [json.loads(line)["id"] for line in pgtally("budgets", "list", acct["account_id"]).splitlines()] == [budget["id"]]
    assert "window is day, month" not in pgtally("budgets", "list", acct["account_id"])
    assert "not a plain decimal" in pgtally("budgets", "set", acct["account_id"], "--scope", "account", "--limit", "x",
                                            "--window", "day", ok=False)
    assert "deleted" in pgtally("budgets", "delete", budget["id"])
    assert "no such budget" in pgtally("budgets", "delete", budget["id"], ok=False)


def test_item2_pgtally_events_reverse(pgtally, new_account, api_conn, owner):
    acct = new_account("free", 5 * 1_000_000)
    api_conn.execute("SELECT * FROM api.consume(%s, NULL, 'free', 'generation', 10)", [acct["api_key"]])
    event = api_conn.execute("SELECT body FROM api.consume(%s, NULL, 'paid', 'generation', 2)", [acct["api_key"]]).fetchone()[0]
    out = json.loads(pgtally("events", "reverse", event["id"], "--quantity", "1", "--reason", "test",
                             "--idempotency-key", "k1"))
    assert out["replayed"] is False and out["reversed"]["credits"] == "1"
    assert json.loads(pgtally("events", "reverse", event["id"], "--quantity", "1", "--reason", "test",
                              "--idempotency-key", "k1"))["replayed"] is True
    assert "different reversal" in pgtally("events", "reverse", event["id"], "--reason", "other",
                                           "--idempotency-key", "k1", ok=False)
    assert "Missing option" in pgtally("events", "reverse", event["id"], "--idempotency-key", "k2", ok=False)
    assert reconciliation_problems(owner) == {}
