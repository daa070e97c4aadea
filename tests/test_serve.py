"""``pgtally serve`` as a process with its own embedded PostgreSQL: it stops the server it started
on SIGTERM and SIGINT, recovers from a SIGKILL, and refuses a busy port before touching anything."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import psycopg
import pytest

from api import db

PGTALLY = Path(sys.executable).parent / "pgtally"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def home(tmp_path_factory):
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    path = Path(tmp_path_factory.mktemp("home")) if base is None else base / f"pgtally-serve-{os.getpid()}"
    yield path
    postmaster = postmaster_pid(path)
    if postmaster and psutil.pid_exists(postmaster):
        psutil.Process(postmaster).terminate()
    subprocess.run(["rm", "-rf", str(path)], check=False)


def postmaster_pid(home: Path) -> int | None:
    pidfile = home / "data" / "postmaster.pid"
    return int(pidfile.read_text().split()[0]) if pidfile.exists() else None


def serve(home: Path, port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "XDG_RUNTIME_DIR")}
    return subprocess.Popen([str(PGTALLY), "serve", "--port", str(port), "--workers", "1"],
                            env={**env, "PGTALLY_HOME": str(home)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_healthy(proc: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("pgtally serve did not become healthy")


def wait_stopped(pid: int, seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_api_and_the_embedded_postgresql(home, stop):
    port = free_port()
    proc = serve(home, port)
    wait_healthy(proc, port)
    postgres = postmaster_pid(home)
    assert postgres and psutil.pid_exists(postgres)
    proc.send_signal(stop)
    proc.wait(timeout=30)
    assert wait_stopped(postgres), "PostgreSQL was left running"


def test_after_a_sigkill_the_next_serve_reuses_the_server_and_stops_it(home):
    port = free_port()
    first = serve(home, port)
    wait_healthy(first, port)
    postgres = postmaster_pid(home)
    first.kill()
    first.wait(timeout=10)
    assert psutil.pid_exists(postgres)                      # left behind by the SIGKILL
    assert first.pid in json.loads((home / "data" / ".handle_pids.json").read_text())

    second = serve(home, port)
    wait_healthy(second, port)
    assert postmaster_pid(home) == postgres                 # reused, not a second server
    second.terminate()
    second.wait(timeout=30)
    assert wait_stopped(postgres), "PostgreSQL was left running"


def test_a_busy_port_fails_before_touching_the_database(home):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        proc = serve(home, port)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "cannot listen" in out
    assert not (home / "data").exists()


def cli(home: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "XDG_RUNTIME_DIR")}
    out = subprocess.run([str(PGTALLY), *args], env={**env, "PGTALLY_HOME": str(home)}, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_with_postgresql_down_requests_fail_fast_with_503_and_recover_without_500s(home):
    port = free_port()
    proc = serve(home, port)
    try:
        wait_healthy(proc, port)
        key = json.loads(cli(home, "accounts", "create", "--plan", "free", "--json"))["api_key"]
        balance = f"http://127.0.0.1:{port}/v1/balance"
        headers = {"Authorization": f"Bearer {key}"}
        assert httpx.get(balance, headers=headers).status_code == 200

        os.kill(postmaster_pid(home), signal.SIGQUIT)      # PostgreSQL's immediate shutdown
        time.sleep(0.5)
        for url in (f"http://127.0.0.1:{port}/healthz", balance):
            started = time.monotonic()
            r = httpx.get(url, headers=headers, timeout=10)
            elapsed = time.monotonic() - started
            assert r.status_code == 503 and r.headers["retry-after"], r.text
            assert r.json()["type"].endswith("/retry-later")
            assert elapsed < (1.0 if url.endswith("/healthz") else 3.0), elapsed

        cli(home, "db", "status")                          # starts PostgreSQL again
        statuses = [httpx.get(balance, headers=headers, timeout=10).status_code for _ in range(20)]
        assert 500 not in statuses and statuses[-5:] == [200] * 5, statuses
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_several_workers_share_one_embedded_postgresql(home):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "XDG_RUNTIME_DIR")}
    proc = subprocess.Popen([str(PGTALLY), "serve", "--port", str(port), "--workers", "2"],
                            env={**env, "PGTALLY_HOME": str(home)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(proc, port)
        key = json.loads(cli(home, "accounts", "create", "--plan", "free", "--json"))["api_key"]
        headers = {"Authorization": f"Bearer {key}"}
        for i in range(20):
            r = httpx.post(f"http://127.0.0.1:{port}/v1/usage/events", json={"meter": "generation"},
                           headers={**headers, "Idempotency-Key": f"w{i % 10}"})
            assert r.status_code in (200, 201, 402), r.text
        balance = httpx.get(f"http://127.0.0.1:{port}/v1/balance", headers=headers).json()
        assert balance["allowances"][0]["used"] == 10            # ten keys, each charged once, across processes
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        total = sum(float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith("pgtally_http_requests_total{") and 'route="/v1/usage/events"' in line)
        assert total == 20                                       # counted across both workers
        postmasters = [p for p in psutil.process_iter(["name", "cmdline"])
                       if p.info["name"] == "postgres" and str(home) in " ".join(p.info["cmdline"] or [])]
        assert len(postmasters) == 1
        postmaster = postmaster_pid(home)
        # ... configured once for pgtally (api.db.embedded_settings), not PostgreSQL's 128 MB of buffers.
        shared_buffers = db.embedded_settings()["shared_buffers"]
        with psycopg.connect(host=str(home / "data"), user="postgres", dbname="postgres") as conn:
            assert conn.execute("SELECT pg_size_bytes(current_setting('shared_buffers')) = pg_size_bytes(%s)",
                                [shared_buffers]).fetchone()[0]
        assert cli(home, "db", "psql", "-Atc", "SELECT 1").strip() == "1"   # (psql alongside serve)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert wait_stopped(postmaster)                              # the one server stops with serve


def test_settings_never_restart_an_embedded_server_another_process_uses(home):
    port = free_port()
    proc = serve(home, port)
    try:
        wait_healthy(proc, port)
        postmaster = postmaster_pid(home)
        server = db.embedded_server(home / "data")          # this test process uses it too now
        try:
            db.configure_embedded(server, {"shared_buffers": "200MB"})
            assert postmaster_pid(home) == postmaster            # serve's server was not restarted under it
            assert "shared_buffers = '200MB'" in (home / "data" / "postgresql.auto.conf").read_text()  # next start
            assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
        finally:
            server.cleanup()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_db_psql_lets_go_of_the_embedded_server_when_psql_exits(home):
    assert cli(home, "db", "psql", "-Atc", "SELECT 40 + 2").strip() == "42"
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "XDG_RUNTIME_DIR")}
    out = subprocess.run([str(PGTALLY), "db", "psql", "-Atc", "SELECT 1/0"], capture_output=True, text=True, timeout=60,
                         env={**env, "PGTALLY_HOME": str(home)})
    assert out.returncode != 0 and "division by zero" in out.stderr          # psql's exit status is pgtally's
    # Nothing else used the server: it stopped with psql, and no pid stays listed as using it.
    assert postmaster_pid(home) is None
    assert not [p for p in psutil.process_iter(["name", "cmdline"])
                if p.info["name"] == "postgres" and str(home) in " ".join(p.info["cmdline"] or [])]
