-- pgtally 0001: roles, schemas, catalog, accounts, API keys, metering and the credit ledger.
-- Forward-only DDL. Functions live in sql/functions/ and are re-applied by post-apply.py.

-- Roles are cluster-wide: create them only once per cluster.
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgtally_api') THEN
    CREATE ROLE pgtally_api NOLOGIN;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgtally_analyst') THEN
    CREATE ROLE pgtally_analyst NOLOGIN;
  END IF;
  -- The owner connects and then switches to pgtally_api (SET ROLE) for the server's pool.
  IF NOT pg_has_role(current_user, 'pgtally_api', 'MEMBER') THEN
    EXECUTE format('GRANT pgtally_api TO %I', current_user);
  END IF;
  IF NOT pg_has_role(current_user, 'pgtally_analyst', 'MEMBER') THEN
    EXECUTE format('GRANT pgtally_analyst TO %I', current_user);
  END IF;
END $$;

COMMENT ON ROLE pgtally_api IS
  'pgtally server role: may execute the granted api.* functions and nothing else (no table access).';
COMMENT ON ROLE pgtally_analyst IS
  'pgtally read-only role for DBAs and finance: may read reporting.* views.';

-- New functions are not executable by PUBLIC; each api.* function is granted one by one.
ALTER DEFAULT PRIVILEGES REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;

CREATE SCHEMA util;
CREATE SCHEMA billing;
CREATE SCHEMA identity;
CREATE SCHEMA metering;
CREATE SCHEMA ledger;
CREATE SCHEMA api;
CREATE SCHEMA reporting;
COMMENT ON SCHEMA util IS 'pgtally helpers shared by every domain (clock, ids, units, errors).';
COMMENT ON SCHEMA billing IS 'pgtally plan catalog: plans and their per-meter entitlements.';
COMMENT ON SCHEMA identity IS 'pgtally accounts and the principals that act on them (API keys).';
COMMENT ON SCHEMA metering IS 'pgtally meters (with their rate cards), allowance usage and usage events.';
COMMENT ON SCHEMA ledger IS 'pgtally double-entry credit ledger: transfers and their entries.';
COMMENT ON SCHEMA api IS 'pgtally entry points: SECURITY DEFINER functions, the only thing the server role may touch.';
COMMENT ON SCHEMA reporting IS 'pgtally read-only views for DBAs and the analyst role (reconciliation, usage).';
GRANT USAGE ON SCHEMA api TO pgtally_api;
GRANT USAGE ON SCHEMA reporting TO pgtally_analyst;

-- Time-ordered UUIDs (version 7, RFC 9562) on PostgreSQL 15 and newer alike.
CREATE FUNCTION util.uuid_v7() RETURNS uuid
LANGUAGE sql VOLATILE PARALLEL SAFE AS $$
  SELECT encode(
    set_bit(set_bit(
      overlay(uuid_send(gen_random_uuid())
              PLACING substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
              FROM 1 FOR 6),
      52, 1), 53, 1),
    'hex')::uuid
$$;
COMMENT ON FUNCTION util.uuid_v7() IS
  'A version 7 UUID (RFC 9562 section 5.7): 48-bit Unix milliseconds, then random bits. Used for every public id.';

-- Append-only tables refuse UPDATE and DELETE, whoever asks.
CREATE FUNCTION util.forbid_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION '% is append-only', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME
    USING ERRCODE = 'TL403', HINT = 'Correct a ledger with a new transfer, never by editing history.';
END $$;
COMMENT ON FUNCTION util.forbid_change() IS
  'Trigger function for append-only tables: raises TL403 on UPDATE, DELETE or TRUNCATE.';

------------------------------------------------------------------------------------------------
-- Catalog
------------------------------------------------------------------------------------------------
CREATE TABLE billing.plans (
  id          text PRIMARY KEY CHECK (id ~ '^[a-z][a-z0-9_]{0,62}$'),
  name        text NOT NULL,
  description text NOT NULL DEFAULT '',
  features    jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(features) = 'array'),
  active      boolean NOT NULL DEFAULT true,
  updated_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE billing.plans IS
  'Plans of the catalog (loaded from the catalog file by api.load_catalog). A plan absent from the last loaded file is inactive: existing accounts keep it, new accounts cannot take it.';
COMMENT ON COLUMN billing.plans.id IS 'Stable plan code, for example free, pro, unlimited.';
COMMENT ON COLUMN billing.plans.features IS 'Marketing feature list (JSON array of strings) shown by clients.';

CREATE TABLE metering.meters (
  id                          text PRIMARY KEY CHECK (id ~ '^[a-z][a-z0-9_]{0,62}$'),
  name                        text NOT NULL,
  unit                        text NOT NULL,
  pricing                     text NOT NULL CHECK (pricing IN ('unit', 'tokens')),
  unit_price_micros           bigint CHECK (unit_price_micros >= 0),
  input_price_micros_per_mtok  bigint CHECK (input_price_micros_per_mtok >= 0),
  output_price_micros_per_mtok bigint CHECK (output_price_micros_per_mtok >= 0),
  margin                      numeric(10, 4) NOT NULL DEFAULT 1 CHECK (margin > 0),
  CHECK (CASE pricing
           WHEN 'unit' THEN unit_price_micros IS NOT NULL
                            AND input_price_micros_per_mtok IS NULL AND output_price_micros_per_mtok IS NULL
           ELSE unit_price_micros IS NULL
                AND input_price_micros_per_mtok IS NOT NULL AND output_price_micros_per_mtok IS NOT NULL
         END)
);
COMMENT ON TABLE metering.meters IS
  'Meters and their rate cards. pricing=unit: each unit beyond the allowance costs unit_price_micros. pricing=tokens: a call costs ceil((input_tokens * input_price + output_tokens * output_price) / 1e6 * margin) micro-credits (2-console-app-billing-usage.md).';
COMMENT ON COLUMN metering.meters.unit IS 'Name of one unit in messages, for example generation.';
COMMENT ON COLUMN metering.meters.unit_price_micros IS 'Micro-credits per unit (1 credit = 1,000,000) for pricing=unit.';
COMMENT ON COLUMN metering.meters.input_price_micros_per_mtok IS 'Micro-credits per million input tokens, for pricing=tokens.';
COMMENT ON COLUMN metering.meters.output_price_micros_per_mtok IS 'Micro-credits per million output tokens, for pricing=tokens.';
COMMENT ON COLUMN metering.meters.margin IS 'Multiplier applied to the token cost (1.2 = 20% margin), for pricing=tokens.';

CREATE TABLE billing.entitlements (
  plan_id     text NOT NULL REFERENCES billing.plans ON DELETE CASCADE,
  meter_id    text NOT NULL REFERENCES metering.meters,
  kind        text NOT NULL CHECK (kind IN ('allowance', 'unlimited', 'fair_use')),
  period      text NOT NULL CHECK (period IN ('day', 'month', 'billing_period')),
  limit_units bigint CHECK (limit_units >= 0),
  PRIMARY KEY (plan_id, meter_id),
  CHECK ((kind = 'unlimited') = (limit_units IS NULL))
);
COMMENT ON TABLE billing.entitlements IS
  'What a plan grants per meter and period. allowance: limit_units free per period, then credits at the meter rate, refused when neither covers. unlimited: never charged. fair_use: limit_units is a soft limit that warns at 80% and 100% and never blocks or charges.';
COMMENT ON COLUMN billing.entitlements.period IS
  'day: resets at midnight UTC. month: resets on the 1st at midnight UTC. billing_period: the account''s subscription period, a calendar month until one is set.';
COMMENT ON COLUMN billing.entitlements.limit_units IS
  'Allowance or soft limit per period, in allowance units: meter units for pricing=unit, micro-credits of cost for pricing=tokens. NULL for unlimited.';

------------------------------------------------------------------------------------------------
-- Accounts and API keys
------------------------------------------------------------------------------------------------
CREATE TABLE identity.accounts (
  id                    uuid PRIMARY KEY DEFAULT util.uuid_v7(),
  kind                  text NOT NULL DEFAULT 'person' CHECK (kind IN ('person', 'team', 'device', 'service')),
  name                  text,
  plan_id               text NOT NULL REFERENCES billing.plans,
  credit_balance_micros bigint NOT NULL DEFAULT 0
                        CONSTRAINT credit_balance_not_negative CHECK (credit_balance_micros >= 0),
  billing_period_start  timestamptz,
  billing_period_end    timestamptz,
  created_at            timestamptz NOT NULL DEFAULT now(),
  CHECK ((billing_period_start IS NULL) = (billing_period_end IS NULL)),
  CHECK (billing_period_end > billing_period_start)
);
COMMENT ON TABLE identity.accounts IS
  'An account owns a plan, a credit balance and usage: a person, a team, an anonymous device or a service.';
COMMENT ON COLUMN identity.accounts.credit_balance_micros IS
  'Cached credit balance in micro-credits; always equals the sum of this account''s ledger.entries (reporting.balance_mismatches proves it). Cannot go negative.';
COMMENT ON COLUMN identity.accounts.billing_period_start IS
  'Start of the current subscription period, for entitlements with period=billing_period (set by billing).';
COMMENT ON COLUMN identity.accounts.billing_period_end IS 'End (exclusive) of the current subscription period.';

CREATE TABLE identity.api_keys (
  id           uuid PRIMARY KEY DEFAULT util.uuid_v7(),
  account_id   uuid NOT NULL REFERENCES identity.accounts ON DELETE CASCADE,
  name         text NOT NULL DEFAULT '',
  key_hash     bytea NOT NULL UNIQUE,
  display      text NOT NULL,
  created_at   timestamptz NOT NULL DEFAULT now(),
  expires_at   timestamptz,
  revoked_at   timestamptz
);
CREATE INDEX ON identity.api_keys (account_id);
COMMENT ON TABLE identity.api_keys IS
  'API keys of an account. The key itself is shown once at creation and never stored: only its SHA-256 hash.';
COMMENT ON COLUMN identity.api_keys.key_hash IS 'sha256 of the full key text (UTF-8).';
COMMENT ON COLUMN identity.api_keys.display IS 'The key''s prefix and last four characters, to recognise it in lists.';

------------------------------------------------------------------------------------------------
-- Metering
------------------------------------------------------------------------------------------------
CREATE TABLE metering.allowance_usage (
  account_id   uuid NOT NULL REFERENCES identity.accounts ON DELETE CASCADE,
  meter_id     text NOT NULL REFERENCES metering.meters,
  period_start timestamptz NOT NULL,
  period_end   timestamptz NOT NULL,
  used         bigint NOT NULL DEFAULT 0 CHECK (used >= 0),
  PRIMARY KEY (account_id, meter_id, period_start),
  CHECK (period_end > period_start)
);
COMMENT ON TABLE metering.allowance_usage IS
  'Allowance units counted against an entitlement per account, meter and period. A new period starts a new row, which is how allowances reset.';
COMMENT ON COLUMN metering.allowance_usage.used IS
  'Allowance units used in the period: covered by the allowance for kind=allowance, all usage for unlimited and fair_use.';

CREATE TABLE metering.usage_events (
  id               uuid PRIMARY KEY DEFAULT util.uuid_v7(),
  account_id       uuid NOT NULL REFERENCES identity.accounts ON DELETE CASCADE,
  idempotency_key  text NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 255),
  request_hash     bytea NOT NULL,
  meter_id         text NOT NULL REFERENCES metering.meters,
  quantity         bigint NOT NULL CHECK (quantity > 0),
  input_tokens     bigint CHECK (input_tokens >= 0),
  output_tokens    bigint CHECK (output_tokens >= 0),
  allowance_units  bigint NOT NULL CHECK (allowance_units >= 0),
  credits_micros   bigint NOT NULL CHECK (credits_micros >= 0),
  response         jsonb NOT NULL,
  created_at       timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT usage_events_idempotency_key UNIQUE (account_id, idempotency_key)
);
COMMENT ON TABLE metering.usage_events IS
  'One row per charged usage event. Unique on (account_id, idempotency_key): a retry with the same request replays response, a different request under the same key is refused (TL409).';
COMMENT ON COLUMN metering.usage_events.request_hash IS 'sha256 of the canonical request (meter, quantity, tokens), to tell a retry from a different request.';
COMMENT ON COLUMN metering.usage_events.allowance_units IS 'Allowance units this event used.';
COMMENT ON COLUMN metering.usage_events.credits_micros IS 'Micro-credits this event spent from the credit balance.';
COMMENT ON COLUMN metering.usage_events.response IS 'The JSON answer given the first time, returned as is on every replay.';

------------------------------------------------------------------------------------------------
-- Ledger
------------------------------------------------------------------------------------------------
CREATE TABLE ledger.system_accounts (
  code        text PRIMARY KEY,
  description text NOT NULL
);
COMMENT ON TABLE ledger.system_accounts IS
  'The house side of every transfer. Their balances are not cached (a cached house balance would be one row every charge locks); reporting.system_balances sums them.';
INSERT INTO ledger.system_accounts (code, description) VALUES
  ('grants', 'Credits issued for free: free-tier grants, operator grants, referral rewards.'),
  ('usage', 'Credits spent on metered usage.'),
  ('purchases', 'Credits bought: bundles and top-ups paid through Stripe.'),
  ('adjustments', 'Operator corrections, clawbacks and migrations between accounts.');

CREATE TABLE ledger.transfers (
  id              uuid PRIMARY KEY DEFAULT util.uuid_v7(),
  account_id      uuid NOT NULL REFERENCES identity.accounts ON DELETE RESTRICT,
  kind            text NOT NULL CHECK (kind IN ('grant', 'usage', 'purchase', 'adjustment')),
  amount_micros   bigint NOT NULL CHECK (amount_micros <> 0),
  idempotency_key text CHECK (length(idempotency_key) BETWEEN 1 AND 255),
  usage_event_id  uuid REFERENCES metering.usage_events,
  memo            text,
  created_at      timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT transfers_idempotency_key UNIQUE (account_id, idempotency_key)
);
CREATE INDEX ON ledger.transfers (usage_event_id) WHERE usage_event_id IS NOT NULL;
COMMENT ON TABLE ledger.transfers IS
  'A movement of credits between a customer account and a system account. Its two ledger.entries sum to zero. Append-only.';
COMMENT ON COLUMN ledger.transfers.amount_micros IS
  'Micro-credits moved into the customer account (negative: out of it, as for usage).';
COMMENT ON COLUMN ledger.transfers.idempotency_key IS
  'Caller''s idempotency key, unique per account: a retried grant is applied once.';

CREATE TABLE ledger.entries (
  id                   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  transfer_id          uuid NOT NULL REFERENCES ledger.transfers,
  account_id           uuid REFERENCES identity.accounts ON DELETE RESTRICT,
  system_account       text REFERENCES ledger.system_accounts,
  amount_micros        bigint NOT NULL CHECK (amount_micros <> 0),
  balance_after_micros bigint,
  created_at           timestamptz NOT NULL DEFAULT now(),
  CHECK ((account_id IS NULL) <> (system_account IS NULL)),
  CHECK ((account_id IS NULL) = (balance_after_micros IS NULL))
);
CREATE INDEX entries_account_id_idx ON ledger.entries (account_id, id) WHERE account_id IS NOT NULL;
CREATE INDEX entries_transfer_id_idx ON ledger.entries (transfer_id);
COMMENT ON TABLE ledger.entries IS
  'One side of a transfer: micro-credits added to (positive) or taken from (negative) one account. Append-only.';
COMMENT ON COLUMN ledger.entries.account_id IS 'Customer account of this side, or NULL for a system account.';
COMMENT ON COLUMN ledger.entries.system_account IS 'System account of this side, or NULL for a customer account.';
COMMENT ON COLUMN ledger.entries.balance_after_micros IS 'The customer account''s balance right after this entry (NULL for system accounts).';

-- The entries of a transfer sum to zero, checked at commit.
CREATE FUNCTION ledger.check_transfer_balanced() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
  v_sum numeric;
BEGIN
  SELECT sum(amount_micros) INTO v_sum FROM ledger.entries WHERE transfer_id = NEW.transfer_id;
  IF v_sum <> 0 THEN
    RAISE EXCEPTION 'transfer % is unbalanced by % micro-credits', NEW.transfer_id, v_sum
      USING ERRCODE = 'TL500';
  END IF;
  RETURN NULL;
END $$;
COMMENT ON FUNCTION ledger.check_transfer_balanced() IS
  'Deferred constraint trigger: the entries of a transfer must sum to zero at commit (TL500 otherwise).';
CREATE CONSTRAINT TRIGGER entries_balanced AFTER INSERT ON ledger.entries
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION ledger.check_transfer_balanced();

CREATE TRIGGER transfers_append_only BEFORE UPDATE OR DELETE ON ledger.transfers
  FOR EACH STATEMENT EXECUTE FUNCTION util.forbid_change();
CREATE TRIGGER transfers_no_truncate BEFORE TRUNCATE ON ledger.transfers
  FOR EACH STATEMENT EXECUTE FUNCTION util.forbid_change();
CREATE TRIGGER entries_append_only BEFORE UPDATE OR DELETE ON ledger.entries
  FOR EACH STATEMENT EXECUTE FUNCTION util.forbid_change();
CREATE TRIGGER entries_no_truncate BEFORE TRUNCATE ON ledger.entries
  FOR EACH STATEMENT EXECUTE FUNCTION util.forbid_change();

------------------------------------------------------------------------------------------------
-- Reporting (for DBAs: each reconciliation view must always be empty)
------------------------------------------------------------------------------------------------
CREATE VIEW reporting.balance_mismatches AS
SELECT a.id AS account_id,
       a.credit_balance_micros AS cached_micros,
       coalesce(e.total, 0) AS ledger_micros,
       a.credit_balance_micros - coalesce(e.total, 0) AS difference_micros
FROM identity.accounts a
LEFT JOIN (SELECT account_id, sum(amount_micros)::bigint AS total
           FROM ledger.entries WHERE account_id IS NOT NULL GROUP BY account_id) e ON e.account_id = a.id
WHERE a.credit_balance_micros <> coalesce(e.total, 0);
COMMENT ON VIEW reporting.balance_mismatches IS
  'Reconciliation: accounts whose cached credit balance differs from the sum of their ledger entries. Must be empty.';

CREATE VIEW reporting.unbalanced_transfers AS
SELECT transfer_id, sum(amount_micros) AS sum_micros, count(*) AS entries
FROM ledger.entries GROUP BY transfer_id
HAVING sum(amount_micros) <> 0 OR count(*) <> 2;
COMMENT ON VIEW reporting.unbalanced_transfers IS
  'Reconciliation: transfers whose entries do not sum to zero or are not exactly two. Must be empty.';

CREATE VIEW reporting.entry_balance_breaks AS
SELECT id AS entry_id, account_id, balance_after_micros, running_micros
FROM (SELECT id, account_id, balance_after_micros,
             sum(amount_micros) OVER (PARTITION BY account_id ORDER BY id) AS running_micros
      FROM ledger.entries WHERE account_id IS NOT NULL) s
WHERE balance_after_micros <> running_micros;
COMMENT ON VIEW reporting.entry_balance_breaks IS
  'Reconciliation: customer entries whose recorded balance_after differs from the running sum of the account''s entries. Must be empty.';

CREATE VIEW reporting.usage_charge_mismatches AS
SELECT u.id AS usage_event_id, u.account_id, u.credits_micros, coalesce(-t.amount_micros, 0) AS ledger_micros
FROM metering.usage_events u
LEFT JOIN ledger.transfers t ON t.usage_event_id = u.id
WHERE u.credits_micros <> coalesce(-t.amount_micros, 0);
COMMENT ON VIEW reporting.usage_charge_mismatches IS
  'Reconciliation: usage events whose credits_micros differ from the usage transfer recorded for them. Must be empty.';

CREATE VIEW reporting.system_balances AS
SELECT s.code AS system_account, coalesce(sum(e.amount_micros), 0)::bigint AS balance_micros
FROM ledger.system_accounts s LEFT JOIN ledger.entries e ON e.system_account = s.code
GROUP BY s.code;
COMMENT ON VIEW reporting.system_balances IS
  'Balance of each system account in micro-credits (grants is negative: credits issued). With customer balances it sums to zero.';

CREATE VIEW reporting.usage_daily AS
SELECT (date_trunc('day', created_at AT TIME ZONE 'UTC'))::date AS day, meter_id,
       count(*) AS events, sum(quantity) AS quantity,
       sum(allowance_units) AS allowance_units, sum(credits_micros) AS credits_micros
FROM metering.usage_events GROUP BY 1, 2;
COMMENT ON VIEW reporting.usage_daily IS 'Usage per UTC day and meter: events, units, allowance units and micro-credits spent.';

GRANT SELECT ON ALL TABLES IN SCHEMA reporting TO pgtally_analyst;
