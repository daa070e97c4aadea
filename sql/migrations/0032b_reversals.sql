-- pgtally 0032b: reversing a charge (issue #28, part 2). A charge remembers the credit lots it
-- drew from (so a reversal gives credits back to those very lots, in reverse burn order); a
-- reversal is a ledger transfer of its own kind and a row of metering.reversals. Functions are in
-- sql/functions/48_reversals.sql, views in sql/views/48_reversals.sql (both re-applied after migrations).
-- depends: 0032_budgets

-- Signatures that change (sql/functions makes them again).
DROP FUNCTION IF EXISTS ledger.spend_lots(uuid, bigint, uuid);
DROP FUNCTION IF EXISTS ledger.post_transfer(uuid, text, bigint, text, text, uuid, text, timestamptz, boolean, uuid);

-- (In one DO block: run at the top level, between yoyo's savepoints, ALTER DOMAIN ... DROP
-- CONSTRAINT leaves cache invalidations behind that PostgreSQL 18 then refuses to start the next
-- subtransaction under, as migration 0021 found.)
DO $do$ BEGIN
  ALTER DOMAIN ledger.transfer_kind DROP CONSTRAINT transfer_kind_check;
  ALTER DOMAIN ledger.transfer_kind ADD CONSTRAINT transfer_kind_check CHECK (VALUE IN (
    'grant', 'usage', 'purchase', 'adjustment', 'plan_credits', 'refund', 'signup_bonus', 'monthly_free',
    'referral_reward', 'expiry', 'reversal'));
  ALTER DOMAIN ledger.lot_source DROP CONSTRAINT lot_source_check;
  ALTER DOMAIN ledger.lot_source ADD CONSTRAINT lot_source_check CHECK (VALUE IN (
    'purchase', 'subscription_grant', 'signup_bonus', 'monthly_free', 'referral_reward', 'promotion', 'adjustment',
    'reversal'));
END $do$;
COMMENT ON DOMAIN ledger.lot_source IS
  'Where a credit lot came from; reversal: credits a reversed charge gave back whose lot had expired since (metering.reversal_lot_days() to spend them).';

ALTER TABLE identity.api_keys DROP CONSTRAINT api_keys_scopes_check;
ALTER TABLE identity.api_keys ADD CONSTRAINT api_keys_scopes_check
  CHECK (scopes <@ '{usage:write,usage:read,billing:read,billing:manage,service,usage:reverse}'::text[] AND cardinality(scopes) > 0);
COMMENT ON COLUMN identity.api_keys.scopes IS
  'What the key may do: usage:write (POST /v1/usage/events), usage:read (check, balance, ledger), billing:read, billing:manage, service (act on behalf of any account: account_id in the request), usage:reverse (an operator key: reverse usage events of any account; issued by operators only, pgtally events reversal-key).';

ALTER TABLE ops.audit_log DROP CONSTRAINT audit_log_action_check;
ALTER TABLE ops.audit_log ADD CONSTRAINT audit_log_action_check CHECK (action IN (
  'adjust_credits', 'refund', 'set_plan', 'suspend', 'unsuspend', 'revoke_sessions', 'approve_sso_domain', 'reverse_usage'));

ALTER TABLE metering.usage_events ADD COLUMN lot_id uuid, ADD COLUMN lot_draws jsonb;
COMMENT ON COLUMN metering.usage_events.lot_id IS
  'The credit lot the charge''s credits came from (the first, when several): what a reversal gives them back to. NULL when no credits were spent, or charged before migration 0032b.';
COMMENT ON COLUMN metering.usage_events.lot_draws IS
  'When the credits came from several lots: [[lot id, micro-credits], ...] in burn order (NULL for one lot: lot_id and credits_micros say it all).';

CREATE TABLE metering.reversals (
  id               uuid PRIMARY KEY DEFAULT util.uuid_v7(),
  account_id       uuid NOT NULL REFERENCES identity.accounts,
  usage_event_id   uuid NOT NULL,
  event_created_at timestamptz NOT NULL,
  idempotency_key  text NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 255),
  request_hash     bytea NOT NULL,
  quantity         bigint NOT NULL CHECK (quantity > 0),
  allowance_units  bigint NOT NULL CHECK (allowance_units >= 0),
  credits_micros   bigint NOT NULL CHECK (credits_micros >= 0),
  amount_minor     bigint CHECK (amount_minor >= 0),
  currency         text,
  allowance_returned boolean NOT NULL,
  transfer_id      uuid,
  lots             jsonb NOT NULL DEFAULT '[]',
  reason           text NOT NULL CHECK (length(reason) BETWEEN 1 AND 500),
  api_key_id       uuid,
  user_id          uuid,
  staff_user_id    uuid REFERENCES identity.users,
  operator_key_id  uuid,
  created_at       timestamptz NOT NULL,
  balance_after_micros bigint NOT NULL,
  CONSTRAINT reversals_idempotency_key UNIQUE (account_id, idempotency_key),
  CONSTRAINT reversals_by_someone CHECK (num_nonnulls(staff_user_id, operator_key_id) <= 1),
  CONSTRAINT reversals_transfer CHECK ((credits_micros > 0) = (transfer_id IS NOT NULL))
);
CREATE INDEX reversals_event_idx ON metering.reversals (account_id, usage_event_id);
COMMENT ON TABLE metering.reversals IS
  'Reversals of usage events (issue #28), full or partial, each once per idempotency key: the units reversed and what they had cost (allowance units, credits, post-paid amount). Credits come back by a ledger transfer of kind reversal (transfer_id) into the lots the charge drew from (lots); the sum of an event''s reversals never exceeds what it charged (reporting.reversal_mismatches). Written by metering.reverse_usage under the account''s lock.';
COMMENT ON COLUMN metering.reversals.event_created_at IS 'The reversed event''s created_at: its partition, and the windows (allowance, budgets) it counted in.';
COMMENT ON COLUMN metering.reversals.request_hash IS 'Fingerprint of the reversal request (event, quantity, reason), compared on retries of the idempotency key.';
COMMENT ON COLUMN metering.reversals.quantity IS 'Units of the event reversed (a token meter''s event is one unit: reversed whole).';
COMMENT ON COLUMN metering.reversals.allowance_units IS 'Allowance units (units, or micro-credits of cost for token meters) the reversed part had used; given back to the window when allowance_returned.';
COMMENT ON COLUMN metering.reversals.credits_micros IS 'Micro-credits given back to the account.';
COMMENT ON COLUMN metering.reversals.amount_minor IS 'Post-paid: what the reversed units cost (minor units of currency): a credit owed to the customer (reporting.post_paid_credits_owed). Cancelling the Stripe meter event is a follow-up.';
COMMENT ON COLUMN metering.reversals.allowance_returned IS 'Whether the allowance units went back to their window (only while that window is still open).';
COMMENT ON COLUMN metering.reversals.lots IS 'Where the credits went, in the order given back (reverse burn order): [{lot_id, credits, new_lot}]; new_lot when the lot had expired or been canceled since, so a new lot of source reversal holds them.';
COMMENT ON COLUMN metering.reversals.balance_after_micros IS 'The account''s credit balance right after the reversal (micro-credits), as its answer shows it, first time and on replays.';
COMMENT ON COLUMN metering.reversals.staff_user_id IS 'The staff user who reversed it (also in ops.audit_log).';
COMMENT ON COLUMN metering.reversals.operator_key_id IS 'The operator API key (scope usage:reverse) that reversed it.';
