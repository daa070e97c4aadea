-- pgtally 0017: usage events and ledger entries partitioned by month (old months detach); idempotency keys in
-- their own table, remembered for a window; a compact usage event (no stored JSON answer); the
-- hot path's foreign keys replaced by a reconciliation view; the balanced-transfer check made one
-- statement-level trigger. Issue #14.
-- depends: 0016_sso
--
-- Existing rows are copied into the new tables, straight into their months (made first by
-- util.ensure_partitions). On a large database this rewrites both tables once: plan the upgrade
-- like a VACUUM FULL.

-- 1. Views over the two tables are saved, dropped, and recreated over the new tables below.
CREATE TEMP TABLE saved_views ON COMMIT DROP AS
WITH RECURSIVE deps(view_oid, depth) AS (
  SELECT r.ev_class, 1
  FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid
  WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass
    AND d.refobjid IN ('metering.usage_events'::regclass, 'ledger.entries'::regclass)
  UNION ALL
  SELECT r.ev_class, deps.depth + 1
  FROM deps JOIN pg_depend d ON d.refobjid = deps.view_oid AND d.refclassid = 'pg_class'::regclass
                                AND d.classid = 'pg_rewrite'::regclass
  JOIN pg_rewrite r ON r.oid = d.objid
  WHERE r.ev_class <> deps.view_oid
)
SELECT view_oid::regclass::text AS name, max(depth) AS depth, pg_get_viewdef(view_oid) AS def,
       obj_description(view_oid, 'pg_class') AS comment
FROM deps GROUP BY view_oid;

DO $$
DECLARE
  v record;
BEGIN
  FOR v IN SELECT * FROM saved_views ORDER BY depth DESC LOOP
    EXECUTE format('DROP VIEW %s', v.name);
  END LOOP;
END $$;

-- 2. The old tables step aside (their constraints and indexes go, so the names are free).
ALTER TABLE metering.usage_events RENAME TO usage_events_old;
ALTER TABLE ledger.entries RENAME TO entries_old;
ALTER SEQUENCE ledger.entries_id_seq RENAME TO entries_old_id_seq;
ALTER TABLE ledger.transfers DROP CONSTRAINT transfers_usage_event_id_fkey;
ALTER TABLE ledger.transfers DROP CONSTRAINT transfers_account_id_fkey;
DROP INDEX ledger.transfers_usage_event_id_idx;
DO $$
DECLARE
  v record;
BEGIN
  FOR v IN SELECT c.conrelid::regclass AS tbl, c.conname FROM pg_constraint c
           WHERE c.conrelid IN ('metering.usage_events_old'::regclass, 'ledger.entries_old'::regclass)
             AND c.contype IN ('p', 'u', 'f') LOOP
    EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', v.tbl, v.conname);
  END LOOP;
  FOR v IN SELECT i.indexrelid::regclass AS idx FROM pg_index i
           WHERE i.indrelid IN ('metering.usage_events_old'::regclass, 'ledger.entries_old'::regclass) LOOP
    EXECUTE format('DROP INDEX %s', v.idx);
  END LOOP;
END $$;

-- 3. The new tables.
CREATE TABLE metering.usage_events (
  id uuid NOT NULL DEFAULT util.uuid_v7(),
  account_id uuid NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now(),
  quantity bigint NOT NULL CHECK (quantity > 0),
  allowance_units bigint NOT NULL CHECK (allowance_units >= 0),
  credits_micros bigint NOT NULL CHECK (credits_micros >= 0),
  balance_after_micros bigint,
  used_after bigint CHECK (used_after >= 0),
  period_start timestamptz,
  period_end timestamptz,
  input_tokens bigint CHECK (input_tokens >= 0),
  output_tokens bigint CHECK (output_tokens >= 0),
  amount_minor bigint CHECK (amount_minor >= 0),
  meter_id text NOT NULL,
  idempotency_key text NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 255),
  plan_id text,
  currency text CHECK (currency ~ '^[a-z]{3}$'),
  warnings jsonb CHECK (jsonb_typeof(warnings) = 'array'),
  metadata jsonb CHECK (jsonb_typeof(metadata) = 'object' AND length(metadata::text) <= 2048),
  response jsonb,
  CHECK ((response IS NULL) = (balance_after_micros IS NOT NULL)),
  PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);
CREATE TABLE metering.usage_events_default PARTITION OF metering.usage_events DEFAULT;
COMMENT ON TABLE metering.usage_events IS
  'One row per charged usage event, partitioned by month of created_at (metering.usage_events_yYYYYmMM, made ahead by util.ensure_partitions; rows outside them land in usage_events_default). A charge''s answer is rebuilt from the row (metering.usage_event_answer); its idempotency key is remembered in metering.idempotency_keys for the idempotency window. Old months leave with api.detach_month.';
COMMENT ON COLUMN metering.usage_events.allowance_units IS 'Allowance units this event used.';
COMMENT ON COLUMN metering.usage_events.idempotency_key IS 'The caller''s idempotency key for the event, as listed with it; unique per account through metering.idempotency_keys while the key is remembered.';
COMMENT ON TABLE metering.usage_events_default IS 'Usage events of months that have no partition of their own yet; util.ensure_partitions moves them into their month when it makes it.';
COMMENT ON COLUMN metering.usage_events.credits_micros IS 'Micro-credits this event spent from the credit balance.';
COMMENT ON COLUMN metering.usage_events.balance_after_micros IS 'The account''s credit balance right after the charge (micro-credits), as the answer shows it.';
COMMENT ON COLUMN metering.usage_events.used_after IS 'The allowance window''s usage right after the charge (units, or micro-credits of cost for token meters); NULL when the plan has no entitlement for the meter.';
COMMENT ON COLUMN metering.usage_events.period_start IS 'The allowance window the event was counted in: [period_start, period_end).';
COMMENT ON COLUMN metering.usage_events.plan_id IS 'The plan whose entitlement the event was charged under (NULL: none), to rebuild the answer''s allowance.';
COMMENT ON COLUMN metering.usage_events.amount_minor IS 'Post-paid events: what the event costs in minor currency units (quantity x the entitlement''s unit_amount_minor), billed by Stripe''s invoice; NULL for prepaid events.';
COMMENT ON COLUMN metering.usage_events.currency IS 'Post-paid events: the currency of amount_minor.';
COMMENT ON COLUMN metering.usage_events.warnings IS 'The threshold warnings the charge crossed (NULL: none).';
COMMENT ON COLUMN metering.usage_events.metadata IS 'The caller''s metadata for the event (a JSON object of at most 2 KB: a request id, a thumbnail URL, a model name); part of the idempotency fingerprint, returned with the event.';
COMMENT ON COLUMN metering.usage_events.response IS 'Events charged before migration 0017 only: the JSON answer given the first time, returned as is on a replay.';


CREATE TABLE metering.idempotency_keys (
  account_id uuid NOT NULL,
  idempotency_key text NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 255),
  usage_event_id uuid NOT NULL,
  created_at timestamptz NOT NULL,
  request_hash bytea NOT NULL,
  PRIMARY KEY (account_id, idempotency_key)
);
COMMENT ON TABLE metering.idempotency_keys IS
  'The idempotency keys of usage events, unique per account, without the partition key: a retry finds its event here (usage_event_id, created_at: the event''s partition) and is answered from it. Kept for the idempotency window after the event (metering.idempotency_window(), 30 days unless pgtally.idempotency_window says otherwise), then forgotten by api.maintain_storage: a key older than that charges again.';
COMMENT ON COLUMN metering.idempotency_keys.request_hash IS 'sha256 of the canonical request (metering.request_hash), to tell a retry from a different request under the same key (TL409).';
INSERT INTO metering.idempotency_keys (account_id, idempotency_key, usage_event_id, created_at, request_hash)
SELECT account_id, idempotency_key, id, created_at, request_hash FROM metering.usage_events_old;
-- What api.maintain_storage forgets every few minutes is found by this index, not a scan of the window.
CREATE INDEX idempotency_keys_created_at_idx ON metering.idempotency_keys (created_at);

CREATE TABLE ledger.entries (
  id bigint GENERATED ALWAYS AS IDENTITY,
  transfer_id uuid NOT NULL,
  account_id uuid,
  system_account text,
  amount_micros bigint NOT NULL CHECK (amount_micros <> 0),
  balance_after_micros bigint,
  created_at timestamptz NOT NULL DEFAULT now(),
  CHECK ((account_id IS NULL) <> (system_account IS NULL)),
  CHECK ((account_id IS NULL) = (balance_after_micros IS NULL)),
  PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);
CREATE TABLE ledger.entries_default PARTITION OF ledger.entries DEFAULT;
COMMENT ON TABLE ledger.entries_default IS 'Ledger entries of months that have no partition of their own yet; util.ensure_partitions moves them into their month when it makes it.';
COMMENT ON TABLE ledger.entries IS
  'One side of a transfer: micro-credits added to (positive) or taken from (negative) one account. Append-only. Partitioned by month of created_at like metering.usage_events; a month that leaves (api.detach_month) leaves its sums per account in ledger.archived_balances, so the reconciliation views still balance.';
COMMENT ON COLUMN ledger.entries.account_id IS 'Customer account of this side, or NULL for a system account.';
COMMENT ON COLUMN ledger.entries.system_account IS 'System account of this side, or NULL for a customer account.';
COMMENT ON COLUMN ledger.entries.balance_after_micros IS 'The customer account''s balance right after this entry (NULL for system accounts).';


-- The months the existing rows fall in are made before they are copied, so that each row is
-- written once, into its month (the worker makes the next months with the same function).
CREATE FUNCTION util.partition_name(p_table regclass, p_month date) RETURNS text
LANGUAGE sql STABLE AS $$
  SELECT p_table::text || '_y' || to_char(p_month, 'YYYY') || 'm' || to_char(p_month, 'MM')
$$;
COMMENT ON FUNCTION util.partition_name(regclass, date) IS
  'The name of a monthly partition: metering.usage_events, 2026-11-01 -> metering.usage_events_y2026m11.';

CREATE FUNCTION util.ensure_partitions(p_months_ahead integer DEFAULT 3, p_from date DEFAULT NULL) RETURNS text[]
LANGUAGE plpgsql AS $$
DECLARE
  t regclass;
  v_default text;
  v_first date;
  v_month date;
  v_name text;
  v_moving boolean;
  v_made text[] := '{}';
BEGIN
  FOREACH t IN ARRAY ARRAY['metering.usage_events'::regclass, 'ledger.entries'::regclass] LOOP
    v_default := t::text || '_default';
    EXECUTE format('SELECT date_trunc(''month'', min(created_at), ''UTC'')::date FROM %s', v_default) INTO v_first;
    FOR v_month IN SELECT generate_series(least(v_first, date_trunc('month', util.now(), 'UTC')::date,
                                                date_trunc('month', p_from)::date),
                                          date_trunc('month', util.now(), 'UTC')::date + make_interval(months => p_months_ahead),
                                          interval '1 month')::date LOOP
      v_name := util.partition_name(t, v_month);
      CONTINUE WHEN to_regclass(v_name) IS NOT NULL;       -- made before (or detached and kept)
      EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s WHERE created_at >= $1 AND created_at < $2)', v_default)
        INTO v_moving USING v_month::timestamp AT TIME ZONE 'UTC', (v_month + interval '1 month') AT TIME ZONE 'UTC';
      IF v_moving THEN
        -- Rows of this month wait in the default partition (written before the month had its
        -- own, as by migration 0017): they move into it, the default detached meanwhile.
        EXECUTE format('ALTER TABLE %s DETACH PARTITION %s', t, v_default);
      END IF;
      EXECUTE format('CREATE TABLE %s PARTITION OF %s FOR VALUES FROM (%L) TO (%L)', v_name, t,
                     v_month::timestamp AT TIME ZONE 'UTC', (v_month + interval '1 month') AT TIME ZONE 'UTC');
      IF v_moving THEN
        EXECUTE format('INSERT INTO %s OVERRIDING SYSTEM VALUE SELECT * FROM %s WHERE created_at >= $1 AND created_at < $2',
                       v_name, v_default) USING v_month::timestamp AT TIME ZONE 'UTC', (v_month + interval '1 month') AT TIME ZONE 'UTC';
        EXECUTE format('ALTER TABLE %s DISABLE TRIGGER USER', v_default);
        EXECUTE format('DELETE FROM %s WHERE created_at >= $1 AND created_at < $2', v_default)
          USING v_month::timestamp AT TIME ZONE 'UTC', (v_month + interval '1 month') AT TIME ZONE 'UTC';
        EXECUTE format('ALTER TABLE %s ENABLE TRIGGER USER', v_default);
        EXECUTE format('ALTER TABLE %s ATTACH PARTITION %s DEFAULT', t, v_default);
      END IF;
      IF t = 'ledger.entries'::regclass THEN
        -- A statement on the partition itself is not one on the parent: it gets its own guards.
        EXECUTE format('CREATE TRIGGER entries_append_only BEFORE UPDATE OR DELETE ON %s '
                       'FOR EACH STATEMENT EXECUTE FUNCTION util.forbid_change()', v_name);
        EXECUTE format('CREATE TRIGGER entries_no_truncate BEFORE TRUNCATE ON %s '
                       'FOR EACH STATEMENT EXECUTE FUNCTION util.forbid_change()', v_name);
      END IF;
      v_made := v_made || v_name;
    END LOOP;
  END LOOP;
  RETURN v_made;
END $$;
COMMENT ON FUNCTION util.ensure_partitions(integer, date) IS
  'Make the monthly partitions (UTC months) of metering.usage_events and ledger.entries from the oldest month waiting in their default partitions, the current month or p_from, whichever is first, through p_months_ahead months ahead, moving rows out of the default partition into their month. A month whose table exists (attached, or detached and kept) is left alone. Returns the partitions made. Run after every upgrade and by the worker (api.maintain_storage).';

REVOKE EXECUTE ON FUNCTION util.ensure_partitions(integer, date) FROM PUBLIC;
DO $$ BEGIN
  PERFORM util.ensure_partitions(3, (SELECT least((SELECT min(created_at) FROM metering.usage_events_old),
                                                  (SELECT min(created_at) FROM ledger.entries_old)) AT TIME ZONE 'UTC')::date);
END $$;

INSERT INTO metering.usage_events (id, account_id, created_at, quantity, allowance_units, credits_micros,
                                   input_tokens, output_tokens, amount_minor, meter_id, idempotency_key,
                                   metadata, response)
SELECT id, account_id, created_at, quantity, allowance_units, credits_micros, input_tokens, output_tokens,
       amount_minor, meter_id, idempotency_key, metadata, response
FROM metering.usage_events_old;
CREATE INDEX usage_events_account_id_id_idx ON metering.usage_events (account_id, id);
CREATE INDEX usage_events_account_meter_created_idx ON metering.usage_events (account_id, meter_id, created_at);
CREATE INDEX usage_events_post_paid_idx ON metering.usage_events (account_id, created_at) WHERE amount_minor IS NOT NULL;
INSERT INTO ledger.entries (id, transfer_id, account_id, system_account, amount_micros, balance_after_micros, created_at)
OVERRIDING SYSTEM VALUE
SELECT id, transfer_id, account_id, system_account, amount_micros, balance_after_micros, created_at FROM ledger.entries_old;
DO $$ BEGIN
  PERFORM setval(pg_get_serial_sequence('ledger.entries', 'id'), coalesce(max(id), 0) + 1, false) FROM ledger.entries;
END $$;
CREATE INDEX entries_account_id_idx ON ledger.entries (account_id, id) WHERE account_id IS NOT NULL;
CREATE INDEX entries_transfer_id_idx ON ledger.entries (transfer_id) WHERE account_id IS NOT NULL;

CREATE TABLE ledger.archived_balances (
  month date NOT NULL,
  account_id uuid,
  system_account text,
  amount_micros numeric NOT NULL,
  entries bigint NOT NULL,
  CHECK ((account_id IS NULL) <> (system_account IS NULL)),
  UNIQUE NULLS NOT DISTINCT (month, account_id, system_account)
);
COMMENT ON TABLE ledger.archived_balances IS
  'What each account''s entries of a detached month summed to (micro-credits) and how many there were, written by api.detach_month in the transaction that detaches the month: the reconciliation views add these sums to the entries still attached.';

DROP TABLE metering.usage_events_old CASCADE;
DROP TABLE ledger.entries_old CASCADE;
DROP FUNCTION ledger.check_transfer_balanced();

-- 4. Append-only, and balanced per statement.
CREATE FUNCTION ledger.check_transfers_balanced() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
  v record;
BEGIN
  SELECT transfer_id, sum(amount_micros) AS off INTO v FROM inserted GROUP BY transfer_id HAVING sum(amount_micros) <> 0 LIMIT 1;
  IF FOUND THEN
    RAISE EXCEPTION 'transfer % is unbalanced by % micro-credits', v.transfer_id, v.off USING ERRCODE = 'TL500';
  END IF;
  RETURN NULL;
END $$;
COMMENT ON FUNCTION ledger.check_transfers_balanced() IS
  'Statement-level trigger over the inserted entries: the entries each INSERT writes for a transfer must sum to zero (TL500 otherwise). ledger.post_transfer writes both sides in one statement, so every transfer balances as it is written.';
CREATE TRIGGER entries_balanced AFTER INSERT ON ledger.entries
  REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT EXECUTE FUNCTION ledger.check_transfers_balanced();
CREATE TRIGGER entries_append_only BEFORE UPDATE OR DELETE ON ledger.entries
  FOR EACH STATEMENT EXECUTE FUNCTION util.forbid_change();
CREATE TRIGGER entries_no_truncate BEFORE TRUNCATE ON ledger.entries
  FOR EACH STATEMENT EXECUTE FUNCTION util.forbid_change();
CREATE TRIGGER entries_append_only BEFORE UPDATE OR DELETE ON ledger.entries_default
  FOR EACH STATEMENT EXECUTE FUNCTION util.forbid_change();
CREATE TRIGGER entries_no_truncate BEFORE TRUNCATE ON ledger.entries_default
  FOR EACH STATEMENT EXECUTE FUNCTION util.forbid_change();

-- 5. The views come back, in dependency order, with their comments.
DO $$
DECLARE
  v record;
BEGIN
  FOR v IN SELECT * FROM saved_views ORDER BY depth LOOP
    EXECUTE format('CREATE VIEW %s AS %s', v.name, v.def);
    EXECUTE format('COMMENT ON VIEW %s IS %L', v.name, v.comment);
  END LOOP;
END $$;

-- Balances count the months that left through ledger.archived_balances.
CREATE OR REPLACE VIEW reporting.balance_mismatches AS
SELECT a.id AS account_id,
       a.credit_balance_micros AS cached_micros,
       coalesce(e.total, 0) AS ledger_micros,
       a.credit_balance_micros - coalesce(e.total, 0) AS difference_micros
FROM identity.accounts a
LEFT JOIN (SELECT account_id, sum(amount)::bigint AS total
           FROM (SELECT account_id, amount_micros AS amount FROM ledger.entries WHERE account_id IS NOT NULL
                 UNION ALL
                 SELECT account_id, amount_micros FROM ledger.archived_balances WHERE account_id IS NOT NULL) x
           GROUP BY account_id) e ON e.account_id = a.id
WHERE a.credit_balance_micros <> coalesce(e.total, 0);
COMMENT ON VIEW reporting.balance_mismatches IS
  'Reconciliation: accounts whose cached credit balance differs from the sum of their ledger entries (with the sums of detached months, ledger.archived_balances). Must be empty.';

CREATE OR REPLACE VIEW reporting.entry_balance_breaks AS
SELECT id AS entry_id, account_id, balance_after_micros, running_micros
FROM (SELECT e.id, e.account_id, e.balance_after_micros,
             coalesce((SELECT sum(b.amount_micros) FROM ledger.archived_balances b WHERE b.account_id = e.account_id), 0)
             + sum(e.amount_micros) OVER (PARTITION BY e.account_id ORDER BY e.id) AS running_micros
      FROM ledger.entries e WHERE e.account_id IS NOT NULL) s
WHERE balance_after_micros <> running_micros;
COMMENT ON VIEW reporting.entry_balance_breaks IS
  'Reconciliation: customer entries whose recorded balance_after differs from the running sum of the account''s entries (starting from what its detached months summed to). Must be empty.';

CREATE OR REPLACE VIEW reporting.system_balances AS
SELECT s.code AS system_account,
       (coalesce((SELECT sum(e.amount_micros) FROM ledger.entries e WHERE e.system_account = s.code), 0)
        + coalesce((SELECT sum(b.amount_micros) FROM ledger.archived_balances b WHERE b.system_account = s.code), 0))::bigint
         AS balance_micros
FROM ledger.system_accounts s;
COMMENT ON VIEW reporting.system_balances IS
  'Balance of each system account in micro-credits, detached months included (grants is negative: credits issued). With customer balances it sums to zero.';

CREATE VIEW reporting.ledger_reference_breaks AS
SELECT 'entry' AS row_kind, e.id::text AS row_id, 'transfer' AS missing, e.transfer_id::text AS reference
FROM ledger.entries e WHERE NOT EXISTS (SELECT 1 FROM ledger.transfers t WHERE t.id = e.transfer_id)
UNION ALL
SELECT 'entry', e.id::text, 'account', e.account_id::text
FROM ledger.entries e WHERE e.account_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM identity.accounts a WHERE a.id = e.account_id)
UNION ALL
SELECT 'entry', e.id::text, 'system_account', e.system_account
FROM ledger.entries e WHERE e.system_account IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM ledger.system_accounts s WHERE s.code = e.system_account)
UNION ALL
SELECT 'transfer', t.id::text, 'account', t.account_id::text
FROM ledger.transfers t WHERE NOT EXISTS (SELECT 1 FROM identity.accounts a WHERE a.id = t.account_id)
UNION ALL
SELECT 'usage_event', u.id::text, 'account', u.account_id::text
FROM metering.usage_events u WHERE NOT EXISTS (SELECT 1 FROM identity.accounts a WHERE a.id = u.account_id)
UNION ALL
SELECT 'usage_event', u.id::text, 'meter', u.meter_id
FROM metering.usage_events u WHERE NOT EXISTS (SELECT 1 FROM metering.meters m WHERE m.id = u.meter_id);
COMMENT ON VIEW reporting.ledger_reference_breaks IS
  'Reconciliation: ledger entries, transfers and usage events that name a transfer, account, system account or meter that does not exist. These references are not foreign keys (a foreign-key check per row was the largest share of a charge''s cost; ledger.post_transfer and api.consume write them from rows they just locked or read); this view proves them. Must be empty.';

GRANT SELECT ON ALL TABLES IN SCHEMA reporting TO pgtally_analyst;

-- metering.quote gains OUT plan_id (re-created by the functions step).
DROP FUNCTION IF EXISTS metering.quote(identity.accounts, text, bigint, bigint, bigint);
DROP FUNCTION IF EXISTS metering.charge(identity.accounts, text, bytea, jsonb, record);

-- Usage transfers carry no idempotency key (their usage event's key is the idempotency record):
-- the per-account key index only needs the transfers that have one.
ALTER TABLE ledger.transfers DROP CONSTRAINT transfers_idempotency_key;
CREATE UNIQUE INDEX transfers_idempotency_key ON ledger.transfers (account_id, idempotency_key)
  WHERE idempotency_key IS NOT NULL;
