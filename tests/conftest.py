"""Test fixtures: one real PostgreSQL per run, the migrated schema as a template database, and a
fresh copy of it for each test that asks for one.

The server is ``DATABASE_URL`` when set, else an embedded PostgreSQL whose data lives on tmpfs
(``/dev/shm``) when there is one: creating a database from the template is several times faster
there.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pytest_postgresql import factories

from api import db

TEST_SERVER_SETTINGS = {"max_connections": "300", "fsync": "off", "synchronous_commit": "off",
                        "full_page_writes": "off"}


def start_test_server() -> dict[str, Any]:
    url = os.environ.get("DATABASE_URL")
    if url:
        return conninfo_to_dict(url)
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    # One test cluster per checkout: two checkouts can run the suite on one machine at once.
    checkout = hashlib.sha256(str(db.ROOT).encode()).hexdigest()[:8]
    pgdata = base / f"pgtally-test-{os.getuid()}-{checkout}" / "data"
    server = db.embedded_server(pgdata)
    # A throwaway test cluster: more connections for the concurrency tests, no fsync.
    db.configure_embedded(server, TEST_SERVER_SETTINGS)
    return conninfo_to_dict(db.embedded_uri(server))


SERVER = start_test_server()


TEST_RUN = "pgtally-test-run"
"""The application_name of a run's maintenance connection, held for the whole run."""


def drop_leftover_template() -> None:
    """A run killed before its end leaves its databases behind (pytest-postgresql drops the
    template at the end of a session; each test's copy is named pgtally_test_<pid>_<n>), and the
    next run would stop on the template: drop what runs that are gone left, never what a live run
    (another pytest of this checkout) is using."""
    with psycopg.connect(make_conninfo(**{**SERVER, "dbname": "postgres"}), autocommit=True) as conn:
        if conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", [TEST_RUN]).fetchone()[0]:
            return                      # another run of this checkout is under way: its databases are in use
        names = [n for (n,) in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'pgtally\\_test%%'")]
        for name in names:
            conn.execute(f'ALTER DATABASE "{name}" IS_TEMPLATE false')
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


drop_leftover_template()


def build_template(host: str, port: int, user: str, dbname: str, password: str | None, **_: Any) -> None:
    url = make_conninfo(host=host, port=port, user=user, dbname=dbname, password=password or None)
    db.upgrade(url)
    db.load_catalog(url)


postgresql_noproc = factories.postgresql_noproc(
    host=SERVER.get("host"), port=SERVER.get("port") or 5432, user=SERVER.get("user") or "postgres",
    password=SERVER.get("password"), dbname="pgtally_test", load=[build_template],
)


@pytest.fixture(scope="session")
def maintenance() -> Iterator[psycopg.Connection]:
    """One autocommit connection to the server's maintenance database for the whole run: it makes
    and drops each test's database."""
    with psycopg.connect(make_conninfo(**{**SERVER, "dbname": "postgres", "application_name": TEST_RUN}),
                         autocommit=True) as conn:
        yield conn


TEST_DATABASES = itertools.count()


@pytest.fixture
def db_url(postgresql_noproc, maintenance: psycopg.Connection) -> Iterator[str]:
    """Owner URL of this test's fresh database (migrated, default catalog loaded): a copy of the
    template, dropped after the test whoever is still connected to it. STRATEGY FILE_COPY copies
    the template's files (45 ms here, against 65 for WAL_LOG, the default, which writes every block
    to the WAL), and one connection makes every copy. Measured on this machine, 60 tests that only
    ask for a database, three runs each way: 80-140 ms of setup and teardown a test, against
    120-220 ms with pytest-postgresql's ``postgresql`` fixture (which also connects twice a test)."""
    name = f"pgtally_test_{os.getpid()}_{next(TEST_DATABASES)}"
    maintenance.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
        sql.Identifier(name), sql.Identifier(postgresql_noproc.template_dbname)))
    try:
        yield make_conninfo(**{**SERVER, "dbname": name})
    finally:
        maintenance.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def owner(db_url: str):
    """An autocommit connection as the owner (what a DBA or the CLI uses)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def api_conn(db_url: str):
    """An autocommit connection as the server role pgtally_api."""
    with psycopg.connect(db.api_conninfo(db_url), autocommit=True) as conn:
        yield conn


@pytest.fixture
def new_account(owner: psycopg.Connection) -> Callable[..., dict]:
    """Create an account: new_account(plan='free', credits_micros=0) -> {account_id, api_key, ...}."""

    def create(plan: str = "free", credits_micros: int = 0) -> dict:
        return owner.execute("SELECT api.create_account(%s::text, %s::bigint)", [plan, credits_micros]).fetchone()[0]

    return create


def set_clock(conn: psycopg.Connection, when: str) -> None:
    """Make util.now() answer ``when`` (timestamptz text) on this connection (pgtally.now), for
    tests of windows, expiries, partitions and reports."""
    conn.execute("SELECT set_config('pgtally.now', %s, false)", [when])


def run_concurrently(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run fn(0..n-1) on n threads released together; return results (or raised exceptions) in order."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def worker(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(i)
        except Exception as exc:  # noqa: BLE001 - the caller inspects what each thread got
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def reconciliation_problems(conn: psycopg.Connection) -> dict[str, list]:
    """Rows of every reconciliation view; all must be empty."""
    from api.cli import reconciliation_views

    return {v: rows for v in reconciliation_views(conn) if (rows := conn.execute(f"SELECT * FROM reporting.{v}").fetchall())}


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def fresh_database(name: str, until: str | None = None):
    """A database of its own (migrated, default catalog), for fixtures wider than one test, or
    for an upgrade's test (migrated only ``until`` that migration: api.db.upgrade)."""
    admin = make_conninfo(**{**SERVER, "dbname": "postgres"})
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_conninfo(**{**SERVER, "dbname": name})
    db.upgrade(url, until)
    db.load_catalog(url)
    try:
        yield url
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def serving(app, port: int):
    """The app under uvicorn on 127.0.0.1:port in a thread, until the block ends."""
    import httpx
    import uvicorn

    # As pgtally serve runs it: the app decides what X-Forwarded-For is worth (PGTALLY_TRUSTED_PROXIES).
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", proxy_headers=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(f"{base}/healthz").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(10)


# Calling the api functions directly, as the SQL tests do.
CREDIT = 1_000_000
"""Micro-credits in one credit."""


def consume(conn, key, idem, meter="generation", quantity=None, input_tokens=None, output_tokens=None):
    return conn.execute(
        "SELECT replayed, body FROM api.consume(%s::text, NULL, %s::text, %s::text, %s::bigint, %s::bigint, %s::bigint)",
        [key, idem, meter, quantity, input_tokens, output_tokens]).fetchone()


def sqlstate_of(fn) -> str:
    with pytest.raises(psycopg.Error) as info:
        fn()
    return info.value.sqlstate


def balance(conn, key):
    return conn.execute("SELECT api.balance(%s, NULL)", [key]).fetchone()[0]


def hold(conn, key, idem, quantity=None, expires_in=900, meter="generation"):
    return conn.execute("SELECT replayed, body FROM api.hold(%s::text, NULL, %s::text, %s::text, %s::bigint, NULL, NULL, "
                        "%s::integer)", [key, idem, meter, quantity, expires_in]).fetchone()


def capture(conn, key, hold_id, quantity=None):
    return conn.execute("SELECT replayed, body FROM api.capture_hold(%s::text, NULL, %s::uuid, %s::bigint)",
                        [key, hold_id, quantity]).fetchone()


def release(conn, key, hold_id):
    return conn.execute("SELECT api.release_hold(%s::text, NULL, %s::uuid)", [key, hold_id]).fetchone()[0]


def move_clock(owner, conns, interval: str, since: str = "now()") -> None:
    """Set pgtally.now on each connection to the database's now() (or since) + interval."""
    at = owner.execute(f"SELECT ({since} + %s::interval)::text", [interval]).fetchone()[0]
    for conn in conns:
        set_clock(conn, at)


@pytest.fixture
def connections(db_url):
    opened = []

    def open_(n: int) -> list[psycopg.Connection]:
        opened.extend(psycopg.connect(db.api_conninfo(db_url), autocommit=True) for _ in range(n))
        return opened[-n:]

    yield open_
    for conn in opened:
        conn.close()


ips = (f"10.1.{i // 250}.{i % 250}" for i in itertools.count(1))
"""Distinct client addresses for sign-ups (the same-IP rules of referrals and rate limits)."""


def signup(conn, email, code=None, ip=None, fingerprint=None, device_session=None):
    conn.execute("SELECT api.signup(%s, 'argon2-hash', %s, 'test', %s, %s, %s)",
                 [email, ip or next(ips), device_session, code, fingerprint])
    user_id, account_id, referral_code = conn.execute(
        "SELECT id, account_id, referral_code FROM identity.users WHERE email_normalized = %s", [email]).fetchone()
    return {"user_id": user_id, "account_id": str(account_id), "code": referral_code}


def referral(owner, person):
    return owner.execute("SELECT status, rejected_reason FROM billing.referrals WHERE referee_account_id = %s",
                         [person["account_id"]]).fetchone()


LOCAL_PROVIDERS: dict[str, Any] = {"env": "development", "outbound_allow": ("127.0.0.0/8", "::1/128")}
"""Settings that let pgtally reach sign-in providers and stand-ins on this machine over plain http
(outside development, and without the operator's allow-list, it refuses both: api/outbound.py)."""


class Zone:
    """The TXT records a local DNS server (dnslib) answers: ``zone.txt["corp.example"] = [...]``."""

    def __init__(self) -> None:
        self.txt: dict[str, list[str]] = {}
        self.queries: list[str] = []
        self.port = 0

    def resolve(self, request, handler):
        from dnslib import QTYPE, RR, TXT

        self.queries.append(str(request.q.qname).rstrip(".").lower())
        reply = request.reply()
        if request.q.qtype == QTYPE.TXT:
            for value in self.txt.get(str(request.q.qname).rstrip(".").lower(), []):
                reply.add_answer(RR(request.q.qname, QTYPE.TXT, rdata=TXT(value), ttl=60))
        return reply


@pytest.fixture
def dns_zone():
    """A real DNS server on 127.0.0.1 (UDP) answering from a :class:`Zone`; point
    ``Settings(dns_nameservers=(f"127.0.0.1:{zone.port}",))`` at it."""
    import socket

    from dnslib.server import DNSLogger, DNSServer

    zone = Zone()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        zone.port = probe.getsockname()[1]
    server = DNSServer(zone, port=zone.port, address="127.0.0.1", logger=DNSLogger("-request,-reply,-truncated,-error,-recv,-send,-data"))
    server.start_thread()
    yield zone
    server.stop()


# People and teams in SQL (issue 28's budgets and test_teams) -------------------------------------

_ips = (f"10.7.{i // 250}.{i % 250}" for i in itertools.count(1))


def person(conn, name: str) -> dict:
    """A signed-up, verified person with a session: {user_id, account_id, session, email}."""
    email = f"{name}@example.com"
    conn.execute("SELECT api.signup(%s, 'argon2-hash', %s, 'test')", [email, next(_ips)])
    user_id, account_id = conn.execute("SELECT id, account_id FROM identity.users WHERE email_normalized = %s", [email]).fetchone()
    conn.execute("SELECT identity.mark_email_verified(%s)", [user_id])
    session = conn.execute("SELECT api.login_succeeded(%s, NULL, %s, 'test')", [user_id, next(_ips)]).fetchone()[0]
    return {"user_id": str(user_id), "account_id": str(account_id), "session": session["session_id"], "email": email}


def call(conn, sql: str, *params):
    """SELECT sql with params; its one value."""
    return conn.execute(f"SELECT {sql}", list(params)).fetchone()[0]


def team_of(conn, owner: dict, name="Acme") -> str:
    """A team owned by owner (a person); its id."""
    return call(conn, "api.create_team(%s::uuid, %s::text)", owner["session"], name)["id"]


def join(conn, owner: dict, team: str, who: dict, role: str) -> None:
    """who joins team with role, invited by owner."""
    call(conn, "api.invite(%s::uuid, %s::uuid, %s::text, %s::text)", owner["session"], team, who["email"], role)
    token = conn.execute("SELECT payload ->> 'token' FROM outbox.messages WHERE kind = 'invitation' AND recipient = %s "
                         "ORDER BY created_at DESC LIMIT 1", [who["email"]]).fetchone()[0]
    assert call(conn, "api.accept_invitation(%s::uuid, %s::text)", who["session"], token)["role"] == role


def set_budget(conn, account_id, scope, subject, limit, window="day", alerts=()):
    """An operator's budget (api.operator_set_budget); its JSON."""
    return conn.execute("SELECT api.operator_set_budget(%s::uuid, %s::text, %s::uuid, %s::text, %s::text, %s::integer[])",
                        [account_id, scope, subject, limit, window, list(alerts)]).fetchone()[0]


def key_id(conn, api_key: str) -> str:
    """The id of an API key."""
    return str(conn.execute("SELECT id FROM identity.api_keys WHERE key_hash = util.token_hash(%s)", [api_key]).fetchone()[0])


def balance_micros(conn, account_id) -> int:
    """An account's cached credit balance (micro-credits)."""
    return conn.execute("SELECT credit_balance_micros FROM identity.accounts WHERE id = %s", [account_id]).fetchone()[0]

