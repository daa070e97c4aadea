"""Re-apply every file of sql/functions/ after migrations, in file-name order.

yoyo runs files named post-apply* after each apply; pgtally drives yoyo from Python
(api.db.upgrade) so this also runs when no migration is pending. Function files are
idempotent: CREATE OR REPLACE, then REVOKE/GRANT. Then the monthly partitions are made
(util.ensure_partitions).
"""

from pathlib import Path

from yoyo import step

FUNCTIONS = Path(__file__).resolve().parent.parent / "functions"


def apply_functions(conn):
    cursor = conn.cursor()
    # As pg_dump does: a sql function's body is checked when it is called, not when it is made, so
    # that this checkout's functions can be made on an older schema (the upgrade tests).
    cursor.execute("SET LOCAL check_function_bodies = off")
    for path in sorted(FUNCTIONS.glob("*.sql")):
        cursor.execute(path.read_text())
    # Nothing in api is executable unless a function file grants it to pgtally_api.
    cursor.execute("REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA api FROM PUBLIC")
    # This month's and the next months' partitions exist before anything is charged in them.
    cursor.execute("SELECT util.ensure_partitions()")


steps = [step(apply_functions)]
