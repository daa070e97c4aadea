"""Compare the charge on two schemas, interleaved, to find what a migration saves.

``bench/ab.py`` compares two versions of a function in one database; a migration changes the
tables themselves, so this makes two databases on the bench's server (``ab_before``, migrated
only until the given migration, and ``ab_after``, migrated fully, both with the bench's accounts)
and charges them in turn: 1,000 charges on one, 1,000 on the other, four rounds a path, each
charge its own transaction with ``synchronous_commit = off``. B/A below 1 is what the later
migrations save.

    .venv/bin/python bench/ab_schema.py 0020_check_domains     # what 0021 (and later) saves
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from run import prepare  # noqa: E402

from api import db  # noqa: E402

PROCEDURE = """
CREATE OR REPLACE PROCEDURE pg_temp.charge(n integer, p_plan text) LANGUAGE plpgsql AS $$
DECLARE
  keys text[];
  t timestamptz;
BEGIN
  SELECT array_agg(key ORDER BY id) INTO keys FROM bench_keys WHERE plan = p_plan;
  COMMIT;
  t := clock_timestamp();
  FOR i IN 1..n LOOP
    PERFORM api.consume(keys[1 + (i % 1000)], NULL, gen_random_uuid()::text, 'generation');
    COMMIT;
  END LOOP;
  RAISE NOTICE '%', extract(epoch FROM clock_timestamp() - t) * 1e6 / n;
END $$;
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("until", help="A: the schema as this migration left it, e.g. 0020_check_domains")
    parser.add_argument("--charges", type=int, default=1000, help="charges on each database a round")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    os.environ.setdefault("PGTALLY_HOME", str(ROOT / ".pgtally" / "bench"))
    server = db.database_url()
    sides = []
    for name, until in (("ab_before", args.until), ("ab_after", None)):
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            conn.execute(f"CREATE DATABASE {name}")
        url = psycopg.conninfo.make_conninfo(server, dbname=name)
        prepare(url, until)
        conn = psycopg.connect(url, autocommit=True)
        notices: list[float] = []
        conn.add_notice_handler(lambda diag, notices=notices: notices.append(float(diag.message_primary)))
        conn.execute("SET synchronous_commit = off")
        conn.execute(PROCEDURE)
        sides.append((conn, notices))
    for plan, path in (("unlimited", "allowance path"), ("free", "credit path")):
        for conn, _ in sides:                                   # warm up: plans, caches
            conn.execute("CALL pg_temp.charge(300, %s)", [plan])
        for _ in range(args.rounds):
            for conn, _ in sides:
                conn.execute("CALL pg_temp.charge(%s, %s)", [args.charges, plan])
            a, b = sides[0][1][-1], sides[1][1][-1]
            print(f"{path}: A {a:.0f} us  B {b:.0f} us  B/A {b / a:.3f}", flush=True)
    for conn, _ in sides:
        conn.close()


if __name__ == "__main__":
    main()
