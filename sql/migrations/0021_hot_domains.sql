-- pgtally 0021: the one-column checks left on the charge's tables (usage events, idempotency keys,
-- allowance windows, accounts, ledger transfers and entries) become domains, without rewriting a
-- table. Issue #14.
-- depends: 0020_check_domains
--
-- PostgreSQL parses and plans every CHECK constraint of a table again on every INSERT or UPDATE
-- statement, whatever it writes (ExecRelCheck): the thirteen checks of a usage event were 17 of
-- the 29 us its INSERT took, and all the checks of the charge's tables together 18-20% of a charge
-- (measured by dropping them). A domain's check is prepared once per connection and runs only
-- for the columns written. The rules are the same, and a violation is still SQLSTATE 23514.
--
-- Changing a column to a domain with a constraint rewrites its table; to a domain without one,
-- it does not (ATColumnChangeRequiresRewrite). So the domains are made bare, the columns change
-- type (a catalog change; the indexes of usage_events' partitions that hold a changed column
-- would be rebuilt, and none does), and the constraints come last: ALTER DOMAIN ADD CONSTRAINT
-- reads every column of the domain once to validate it (a scan, not a rewrite). The rules that
-- 0006 added NOT VALID (names and memos that older rows may break) stay NOT VALID on the domain:
-- new values are checked, old rows are not read. util.idempotency_key (0020) gives up its
-- constraint for the time the usage events' and keys' columns join it.
--
-- The checks over two columns (a window's end after its start, held credits within the balance,
-- the ledger entry's side) stay table checks.

-- Making way for a change to the columns that views read (0017 and 0020 did it inline; later
-- migrations call this).
CREATE FUNCTION util.alter_under_views(p_tables regclass[], p_ddl text) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
  v record;
  g text;
  saved jsonb;
BEGIN
  WITH RECURSIVE deps(view_oid, depth) AS (
    SELECT r.ev_class, 1
    FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid
    WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass
      AND d.refobjid = ANY (p_tables)
    UNION ALL
    SELECT r.ev_class, deps.depth + 1
    FROM deps JOIN pg_depend d ON d.refobjid = deps.view_oid AND d.refclassid = 'pg_class'::regclass
                                  AND d.classid = 'pg_rewrite'::regclass
    JOIN pg_rewrite r ON r.oid = d.objid
    WHERE r.ev_class <> deps.view_oid
  )
  SELECT coalesce(jsonb_agg(jsonb_build_object(
           'name', view_oid::regclass::text, 'depth', depth, 'def', pg_get_viewdef(view_oid),
           'comment', obj_description(view_oid, 'pg_class'),
           'grants', (SELECT coalesce(jsonb_agg(format('GRANT %s ON %s TO %I', a.privilege_type, view_oid::regclass,
                                                       r.rolname)), '[]')
                      FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a JOIN pg_roles r ON r.oid = a.grantee
                      WHERE c.oid = view_oid AND a.grantee <> c.relowner))), '[]')
  INTO saved
  FROM (SELECT view_oid, max(depth) AS depth FROM deps GROUP BY view_oid) x;

  FOR v IN SELECT * FROM jsonb_to_recordset(saved) AS s(name text, depth integer) ORDER BY depth DESC LOOP
    EXECUTE format('DROP VIEW %s', v.name);
  END LOOP;
  EXECUTE p_ddl;
  FOR v IN SELECT * FROM jsonb_to_recordset(saved) AS s(name text, depth integer, def text, comment text, grants jsonb)
           ORDER BY depth LOOP
    EXECUTE format('CREATE VIEW %s AS %s', v.name, v.def);
    EXECUTE format('COMMENT ON VIEW %s IS %L', v.name, v.comment);
    FOR g IN SELECT jsonb_array_elements_text(v.grants) LOOP
      EXECUTE g;
    END LOOP;
  END LOOP;
  RETURN jsonb_array_length(saved);
END $$;
COMMENT ON FUNCTION util.alter_under_views(regclass[], text) IS
  'For migrations: run the DDL p_ddl with the views that read the tables p_tables (and the views over those) out of its way: they are dropped first and made again after it, in dependency order, with their comments and grants (a column a view reads cannot change type). Returns how many views it made again.';

-- 1. Bare domains.
CREATE DOMAIN util.count AS bigint;
COMMENT ON DOMAIN util.count IS 'A count of units or tokens: never negative.';
CREATE DOMAIN util.quantity AS bigint;
COMMENT ON DOMAIN util.quantity IS 'How many units a usage event or hold is for: at least 1.';
CREATE DOMAIN util.micro_credits AS bigint;
COMMENT ON DOMAIN util.micro_credits IS 'An amount of credits in micro-credits (1 credit = 1,000,000): never negative.';
CREATE DOMAIN util.minor_units AS bigint;
COMMENT ON DOMAIN util.minor_units IS 'An amount of money in minor currency units (cents): never negative.';
CREATE DOMAIN util.currency AS text;
COMMENT ON DOMAIN util.currency IS 'A currency as Stripe writes it: three lower-case letters (ISO 4217, https://docs.stripe.com/currencies).';
CREATE DOMAIN metering.event_metadata AS jsonb;
COMMENT ON DOMAIN metering.event_metadata IS 'A caller''s metadata for a usage event: a JSON object of at most 2 KB (as text).';
CREATE DOMAIN metering.warnings AS jsonb;
COMMENT ON DOMAIN metering.warnings IS 'The threshold warnings of a charge: a JSON array.';
CREATE DOMAIN ledger.amount_micros AS bigint;
COMMENT ON DOMAIN ledger.amount_micros IS 'A ledger transfer''s or entry''s signed amount in micro-credits: never zero.';
CREATE DOMAIN ledger.memo AS text;
COMMENT ON DOMAIN ledger.memo IS 'A ledger transfer''s memo: at most 500 characters (checked on new values since 0006).';
CREATE DOMAIN identity.account_name AS text;
COMMENT ON DOMAIN identity.account_name IS 'An account''s display name: at most 200 characters (checked on new values since 0006).';

-- 2. The columns change type, the table checks go. (util.idempotency_key's constraint is dropped
-- inside the DDL: run at the migration's top level, between yoyo's savepoints, ALTER DOMAIN ...
-- DROP CONSTRAINT leaves cache invalidations behind that PostgreSQL 18 then refuses to open the
-- function's first DROP VIEW under: "cannot start a subtransaction when there are unprocessed
-- inval messages".)
DO $do$ BEGIN PERFORM util.alter_under_views(
  ARRAY['metering.usage_events', 'metering.idempotency_keys', 'metering.allowance_usage', 'identity.accounts',
        'ledger.transfers', 'ledger.entries']::regclass[], $ddl$
ALTER DOMAIN util.idempotency_key DROP CONSTRAINT idempotency_key_check;
ALTER TABLE metering.usage_events
  DROP CONSTRAINT usage_events_quantity_check1,
  DROP CONSTRAINT usage_events_allowance_units_check1,
  DROP CONSTRAINT usage_events_credits_micros_check1,
  DROP CONSTRAINT usage_events_used_after_check,
  DROP CONSTRAINT usage_events_input_tokens_check1,
  DROP CONSTRAINT usage_events_output_tokens_check1,
  DROP CONSTRAINT usage_events_amount_minor_check1,
  DROP CONSTRAINT usage_events_currency_check,
  DROP CONSTRAINT usage_events_idempotency_key_check1,
  DROP CONSTRAINT usage_events_metadata_check1,
  DROP CONSTRAINT usage_events_warnings_check,
  ALTER COLUMN quantity TYPE util.quantity,
  ALTER COLUMN allowance_units TYPE util.count,
  ALTER COLUMN credits_micros TYPE util.micro_credits,
  ALTER COLUMN used_after TYPE util.count,
  ALTER COLUMN input_tokens TYPE util.count,
  ALTER COLUMN output_tokens TYPE util.count,
  ALTER COLUMN amount_minor TYPE util.minor_units,
  ALTER COLUMN currency TYPE util.currency,
  ALTER COLUMN idempotency_key TYPE util.idempotency_key,
  ALTER COLUMN metadata TYPE metering.event_metadata,
  ALTER COLUMN warnings TYPE metering.warnings;
ALTER TABLE metering.idempotency_keys
  DROP CONSTRAINT idempotency_keys_idempotency_key_check,
  ALTER COLUMN idempotency_key TYPE util.idempotency_key;
ALTER TABLE metering.allowance_usage
  DROP CONSTRAINT allowance_usage_used_check,
  ALTER COLUMN used TYPE util.count;
ALTER TABLE identity.accounts
  DROP CONSTRAINT credit_balance_not_negative,
  DROP CONSTRAINT accounts_auto_topup_below_micros_check,
  DROP CONSTRAINT accounts_name_length,
  ALTER COLUMN credit_balance_micros TYPE util.micro_credits,
  ALTER COLUMN auto_topup_below_micros TYPE util.micro_credits,
  ALTER COLUMN name TYPE identity.account_name;
ALTER TABLE ledger.transfers
  DROP CONSTRAINT transfers_amount_micros_check,
  DROP CONSTRAINT transfers_memo_length,
  ALTER COLUMN amount_micros TYPE ledger.amount_micros,
  ALTER COLUMN memo TYPE ledger.memo;
ALTER TABLE ledger.entries
  DROP CONSTRAINT entries_amount_micros_check1,
  ALTER COLUMN amount_micros TYPE ledger.amount_micros;
$ddl$); END $do$;

-- 3. The rules, on the domains (each validated by one read of its columns, but for the NOT VALID two).
ALTER DOMAIN util.count ADD CONSTRAINT count_check CHECK (VALUE >= 0);
ALTER DOMAIN util.quantity ADD CONSTRAINT quantity_check CHECK (VALUE > 0);
ALTER DOMAIN util.micro_credits ADD CONSTRAINT micro_credits_check CHECK (VALUE >= 0);
ALTER DOMAIN util.minor_units ADD CONSTRAINT minor_units_check CHECK (VALUE >= 0);
ALTER DOMAIN util.currency ADD CONSTRAINT currency_check CHECK (VALUE ~ '^[a-z]{3}$');
ALTER DOMAIN metering.event_metadata ADD CONSTRAINT event_metadata_check
  CHECK (jsonb_typeof(VALUE) = 'object' AND length(VALUE::text) <= 2048);
ALTER DOMAIN metering.warnings ADD CONSTRAINT warnings_check CHECK (jsonb_typeof(VALUE) = 'array');
ALTER DOMAIN ledger.amount_micros ADD CONSTRAINT amount_micros_check CHECK (VALUE <> 0);
ALTER DOMAIN util.idempotency_key ADD CONSTRAINT idempotency_key_check CHECK (length(VALUE) BETWEEN 1 AND 255);
ALTER DOMAIN ledger.memo ADD CONSTRAINT memo_check CHECK (length(VALUE) <= 500) NOT VALID;
ALTER DOMAIN identity.account_name ADD CONSTRAINT account_name_check CHECK (length(VALUE) <= 200) NOT VALID;
