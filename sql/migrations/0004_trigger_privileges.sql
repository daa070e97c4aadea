-- pgtally 0004: trigger functions run with their owner's rights.
-- depends: 0003_billing
-- Before PostgreSQL 18 a deferred trigger fires at COMMIT as the session's role (pgtally_api),
-- outside the SECURITY DEFINER function that queued it, and that role cannot read ledger.*.

ALTER FUNCTION ledger.check_transfer_balanced() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION util.forbid_change() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
