"""Compare two versions of a charge function, interleaved, to find what a change saves.

This machine's CPU speed moves by a quarter from one second to the next, so two runs one after
the other cannot tell a 5% change from noise. This tool calls the two functions alternately in
one session, each in its own transaction (as a client's charge is), and sums the time of each:
both see the same machine, and B/A is steady to about 1% (two identical copies read 0.98-0.99,
the second of a pair being slightly favoured).

    # B: a copy of api.consume (or of a function it calls, with the copy of api.consume calling it)
    # under another name, with the change to measure; loaded into the bench database.
    .venv/bin/python bench/ab.py api.consume scratch.consume_b            # allowance path
    .venv/bin/python bench/ab.py api.consume scratch.consume_b --plan free  # credit path

Both functions take api.consume's arguments (key, session, idempotency key, meter). The bench
database is the one bench/run.py made last (``pgtally_bench`` on the bench's embedded server, or
``DATABASE_URL``); commits are asynchronous here (``synchronous_commit = off``), so the numbers
are the server's work per charge without the disk flush the two would share.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from api import db  # noqa: E402

PROCEDURE = """
CREATE OR REPLACE PROCEDURE pg_temp.ab(n integer, p_plan text) LANGUAGE plpgsql AS $$
DECLARE
  keys text[];
  t timestamptz;
  ta float8 := 0;
  tb float8 := 0;
BEGIN
  SELECT array_agg(key ORDER BY id) INTO keys FROM bench_keys WHERE plan = p_plan;
  COMMIT;
  FOR i IN 1..n LOOP
    t := clock_timestamp();
    PERFORM {a}(keys[1 + (i % 1000)], NULL, gen_random_uuid()::text, 'generation');
    COMMIT;
    ta := ta + extract(epoch FROM clock_timestamp() - t);
    t := clock_timestamp();
    PERFORM {b}(keys[1 + ((i + 500) % 1000)], NULL, gen_random_uuid()::text, 'generation');
    COMMIT;
    tb := tb + extract(epoch FROM clock_timestamp() - t);
  END LOOP;
  RAISE NOTICE '% % %', ta * 1e6 / n, tb * 1e6 / n, tb / ta;
END $$;
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="the function as it is, e.g. api.consume")
    parser.add_argument("b", help="the changed copy, e.g. scratch.consume_b")
    parser.add_argument("--plan", default="unlimited", choices=["unlimited", "free"],
                        help="unlimited: the allowance path; free: the credit path (ledger)")
    parser.add_argument("--charges", type=int, default=2000, help="charges of each function a round")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    os.environ.setdefault("PGTALLY_HOME", str(ROOT / ".pgtally" / "bench"))
    url = os.environ.get("DATABASE_URL") or psycopg.conninfo.make_conninfo(db.database_url(), dbname="pgtally_bench")
    notices: list[str] = []
    with psycopg.connect(url, autocommit=True) as conn:
        conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        conn.execute("SET synchronous_commit = off")
        conn.execute(PROCEDURE.format(a=args.a, b=args.b))
        for _ in range(args.rounds):
            conn.execute("CALL pg_temp.ab(%s, %s)", [args.charges, args.plan])
            a, b, ratio = (float(x) for x in notices[-1].split())
            print(f"A {a:.0f} us  B {b:.0f} us  B/A {ratio:.3f}", flush=True)


if __name__ == "__main__":
    main()
