"""Issue 30, "Citus-ready, by proof": the live schema (pg_catalog of the migrated test database)
against Citus's rules for co-located distributed tables, with the placement of every table in one
file, sql/citus.toml. Today's breakage is listed there as known exceptions; the test fails on new
breakage, on a table in no list, and on an exception that no longer applies (docs/scale-out.md)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field

import psycopg
import pytest

from api import db

CITUS_FILE = db.ROOT / "sql" / "citus.toml"


@dataclass
class Placement:
    """sql/citus.toml: distributed tables (with their distribution column), reference and
    coordinator tables, functions to distribute, and the known exceptions."""

    distributed: dict[str, str]
    reference: set[str]
    coordinator: set[str]
    functions: dict[str, str]
    exceptions: list[dict] = field(default_factory=list)

    @classmethod
    def load(cls) -> Placement:
        """Read sql/citus.toml."""
        doc = tomllib.loads(CITUS_FILE.read_text())
        return cls(dict(doc["distributed"]), set(doc["reference"]["tables"]), set(doc["coordinator"]["tables"]),
                   dict(doc.get("functions", {})), list(doc.get("exception", [])))

    def kind(self, table: str) -> str | None:
        """distributed, reference, coordinator, or None for a table in no list."""
        if table in self.distributed:
            return "distributed"
        if table in self.reference:
            return "reference"
        if table in self.coordinator:
            return "coordinator"
        return None


def schema_tables(conn: psycopg.Connection) -> set[str]:
    """pgtally's tables (partitioned parents, not their partitions), outside public (yoyo's own)."""
    return {t for (t,) in conn.execute(
        "SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition "
        "AND n.nspname !~ '^pg_' AND n.nspname NOT IN ('information_schema', 'public')")}


def violations(conn: psycopg.Connection, placement: Placement) -> set[tuple[str, str, str]]:
    """Every (table, constraint/index/column, rule) of the live schema that breaks Citus's rules
    for the placement; a table in no list is (table, '', 'not-listed'), a listed table that does
    not exist (table, '', 'no-such-table')."""
    tables = schema_tables(conn)
    found: set[tuple[str, str, str]] = set()
    listed = set(placement.distributed) | placement.reference | placement.coordinator
    for table in tables - listed:
        found.add((table, "", "not-listed"))
    for table in listed - tables:
        found.add((table, "", "no-such-table"))
    for table in (placement.reference & placement.coordinator) | (set(placement.distributed) & (placement.reference | placement.coordinator)):
        found.add((table, "", "listed-twice"))

    for table, column in placement.distributed.items():
        if table not in tables:
            continue
        row = conn.execute("SELECT attnotnull FROM pg_attribute WHERE attrelid = %s::regclass AND attname = %s "
                           "AND NOT attisdropped", [table, column]).fetchone()
        if row is None:
            found.add((table, column, "missing-distribution-column"))
        elif not row[0]:
            found.add((table, column, "nullable-distribution-column"))
        # Primary keys, unique constraints, unique indexes (partial ones too) and exclusion constraints.
        for (name,) in conn.execute(
                "SELECT i.indexrelid::regclass::text FROM pg_index i WHERE i.indrelid = %s::regclass "
                "AND (i.indisunique OR i.indisexclusion) AND NOT EXISTS (SELECT 1 FROM pg_attribute a "
                "WHERE a.attrelid = i.indrelid AND a.attname = %s AND a.attnum = ANY (i.indkey))", [table, column]):
            found.add((table, name.split(".")[-1], "unique-without-distribution-column"))

    for src, name, dst, src_cols, dst_cols in conn.execute(
            "SELECT c.conrelid::regclass::text, c.conname, c.confrelid::regclass::text, "
            "ARRAY(SELECT attname FROM unnest(c.conkey) WITH ORDINALITY k(n, o) JOIN pg_attribute a "
            "      ON a.attrelid = c.conrelid AND a.attnum = k.n ORDER BY k.o)::text[], "
            "ARRAY(SELECT attname FROM unnest(c.confkey) WITH ORDINALITY k(n, o) JOIN pg_attribute a "
            "      ON a.attrelid = c.confrelid AND a.attnum = k.n ORDER BY k.o)::text[] "
            "FROM pg_constraint c JOIN pg_class r ON r.oid = c.conrelid "
            "WHERE c.contype = 'f' AND NOT r.relispartition"):
        if src not in tables:
            continue
        src_kind, dst_kind = placement.kind(src), placement.kind(dst)
        if src_kind is None or dst_kind is None:
            continue  # reported as not-listed
        if src_kind == "distributed":
            if dst_kind == "coordinator":
                found.add((src, name, "foreign-key-to-coordinator"))
            elif dst_kind == "distributed":
                pairs = list(zip(src_cols, dst_cols, strict=True))
                if (placement.distributed[src], placement.distributed[dst]) not in pairs:
                    found.add((src, name, "foreign-key-not-co-located"))
        elif src_kind == "reference" and dst_kind != "reference":
            found.add((src, name, "foreign-key-from-reference"))
        elif src_kind == "coordinator" and dst_kind == "distributed":
            found.add((src, name, "foreign-key-from-coordinator-to-distributed"))
    return found


def known(placement: Placement) -> set[tuple[str, str, str]]:
    """The exceptions sql/citus.toml lists, as violations() names them."""
    return {(e["table"], e["what"], e["rule"]) for e in placement.exceptions}


def test_item_citus_ready_schema_follows_citus_rules(owner: psycopg.Connection) -> None:
    """Every table is placed once; every breakage of Citus's rules is a listed exception, and every
    listed exception is still a breakage (fixed ones leave the list)."""
    placement = Placement.load()
    found = violations(owner, placement)
    listed = known(placement)
    assert not found - listed, (
        "new breakage of Citus's rules (docs/scale-out.md; fix it or list it in sql/citus.toml with the reason "
        f"and what a migration would need): {sorted(found - listed)}")
    assert not listed - found, f"exceptions in sql/citus.toml that no longer apply (remove them): {sorted(listed - found)}"


def test_item_citus_ready_exceptions_say_why_and_what_a_migration_needs() -> None:
    """Every known exception carries its reason and the migration that would lift it."""
    for exception in Placement.load().exceptions:
        assert exception.get("reason") and exception.get("migration"), exception


def test_item_citus_ready_functions_take_the_account(owner: psycopg.Connection) -> None:
    """The functions listed for create_distributed_function exist and take the account argument
    they would be distributed by, as a uuid."""
    functions = Placement.load().functions
    assert functions
    for name, argument in functions.items():
        rows = owner.execute(
            "SELECT p.oid::regprocedure::text FROM pg_proc p "
            "WHERE p.oid = ANY (SELECT oid FROM pg_proc WHERE proname = split_part(%s, '.', 2) "
            "  AND pronamespace = split_part(%s, '.', 1)::regnamespace) "
            "AND p.proargnames[array_position(p.proargnames, %s)] IS NOT NULL "
            "AND p.proargtypes[array_position(p.proargnames, %s) - 1] = 'uuid'::regtype",
            [name, name, argument, argument]).fetchall()
        assert rows, f"{name} has no uuid argument {argument}"


@pytest.mark.parametrize("ddl, placed, rule", [
    ("CREATE TABLE metering.gadgets (id uuid PRIMARY KEY, account_id uuid NOT NULL REFERENCES identity.accounts)",
     None, "not-listed"),
    ("CREATE TABLE metering.gadgets (id uuid PRIMARY KEY, account_id uuid NOT NULL REFERENCES identity.accounts)",
     "distributed", "unique-without-distribution-column"),
    ("CREATE TABLE metering.gadgets (account_id uuid NOT NULL, id uuid, PRIMARY KEY (account_id, id), "
     "  hold_id uuid REFERENCES metering.holds (id))", "distributed", "foreign-key-not-co-located"),
    ("CREATE TABLE metering.gadgets (account_id uuid NOT NULL PRIMARY KEY, user_id uuid REFERENCES identity.users)",
     "distributed", "foreign-key-to-coordinator"),
    ("CREATE TABLE metering.gadgets (code text PRIMARY KEY, account_id uuid REFERENCES identity.accounts)",
     "reference", "foreign-key-from-reference"),
    ("CREATE TABLE metering.gadgets (code text PRIMARY KEY, account_id uuid REFERENCES identity.accounts)",
     "coordinator", "foreign-key-from-coordinator-to-distributed"),
    ("CREATE TABLE metering.gadgets (account_id uuid, id uuid, UNIQUE (account_id, id))",
     "distributed", "nullable-distribution-column"),
])
def test_item_citus_ready_a_new_table_that_breaks_a_rule_fails(owner: psycopg.Connection, ddl, placed, rule) -> None:
    """A new table in no list, or placed where it breaks a rule, is reported as new breakage
    (what the schema test above would fail on); co-located and reference keys pass."""
    owner.execute(ddl)
    placement = Placement.load()
    if placed == "distributed":
        placement.distributed["metering.gadgets"] = "account_id"
    elif placed == "reference":
        placement.reference.add("metering.gadgets")
    elif placed == "coordinator":
        placement.coordinator.add("metering.gadgets")
    new = violations(owner, placement) - known(placement)
    assert {rule for table, _, rule in new if table == "metering.gadgets"} == {rule}, new


def test_item_citus_ready_a_well_placed_new_table_passes(owner: psycopg.Connection) -> None:
    """A per-account table keyed and referenced by the account, placed as distributed, adds nothing."""
    owner.execute("CREATE TABLE metering.gadgets (account_id uuid NOT NULL REFERENCES identity.accounts, id uuid, "
                  "meter_id text REFERENCES metering.meters, PRIMARY KEY (account_id, id))")
    placement = Placement.load()
    placement.distributed["metering.gadgets"] = "account_id"
    assert violations(owner, placement) - known(placement) == set()
