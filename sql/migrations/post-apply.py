"""Re-apply every file of sql/functions/, then of sql/views/, after migrations, in file-name order.

yoyo runs files named post-apply* after each apply; pgtally drives yoyo from Python
(api.db.upgrade) so this also runs when no migration is pending. Both kinds of file are
idempotent: CREATE OR REPLACE, COMMENT ON, then REVOKE/GRANT. Then the monthly partitions are
made (util.ensure_partitions).

Order: functions first, then views, so that a view may call any function (reporting.mrr_account_months
calls util.now()). Function bodies are not checked when they are made (check_function_bodies off,
as pg_dump restores them): a LANGUAGE sql function is checked when it is first called, so this
checkout's functions can be made on a database migrated only ``until`` an older migration (tests
of an upgrade), where the columns they read may not exist yet. A parameter's or result's type must
exist, though: functions take and return scalars or ``record``, not the row type of a table a
newer migration makes.

Views are re-applied only when every migration of this checkout is applied: a view is written
against the latest tables, and a database migrated ``until`` an older migration (tests of an
upgrade) keeps the views its migrations made until the rest is applied.

CREATE OR REPLACE VIEW can add columns at the end of a view, nothing else: a view whose columns
change (renamed, retyped, reordered, removed) needs ``DROP VIEW reporting.name`` in a numbered
migration first (CASCADE for the views over it; all come back here). So does a migration that
changes the type of a column a view reads: it drops those views before its ALTER TABLE, and this
file makes them again (no saving and restoring of definitions, as 0017, 0020 and 0021 had to).
"""

from pathlib import Path

from yoyo import step

SQL = Path(__file__).resolve().parent.parent
FUNCTIONS = SQL / "functions"
VIEWS = SQL / "views"
MIGRATIONS = SQL / "migrations"


def every_migration_applied(cursor) -> bool:
    """True when each numbered migration file of this checkout is recorded as applied."""
    cursor.execute("SELECT migration_id FROM public._yoyo_migration")
    applied = {row[0] for row in cursor.fetchall()}
    return all(path.stem in applied for path in MIGRATIONS.glob("[0-9]*.sql"))


def apply_functions(conn):
    cursor = conn.cursor()
    # As pg_dump does: a sql function's body is checked when it is called, not when it is made, so
    # that this checkout's functions can be made on an older schema (the upgrade tests).
    cursor.execute("SET LOCAL check_function_bodies = off")
    for path in sorted(FUNCTIONS.glob("*.sql")):
        cursor.execute(path.read_text())
    # Nothing in api is executable unless a function file grants it to pgtally_api.
    cursor.execute("REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA api FROM PUBLIC")
    if every_migration_applied(cursor):
        for path in sorted(VIEWS.glob("*.sql")):
            cursor.execute(path.read_text())
    # This month's and the next months' partitions exist before anything is charged in them.
    cursor.execute("SELECT util.ensure_partitions()")


steps = [step(apply_functions)]
