-- pgtally 0020: the string rules of the credit path's tables (accounts, transfers, credit lots)
-- become domains. Issue #14.
-- depends: 0019_hot_references
--
-- PostgreSQL parses a table's CHECK constraints from their stored text again on every INSERT and
-- UPDATE, whichever columns change: a credit-path charge updates the account and a credit lot and
-- writes a transfer, and parsed some 17,000 characters of constraints to do it (14% of the charge,
-- measured). A domain's check is parsed once per connection and runs only when its column is
-- written, so updating a balance or what remains of a lot checks none of these. The rules are the
-- same; a violation is the same SQLSTATE (23514), naming the domain.
--
-- Changing a column to a domain rewrites its table (and rebuilds its indexes): plan the upgrade
-- of a large ledger.transfers like a VACUUM FULL. The two NOT VALID length checks of 0006
-- (accounts.name, transfers.memo) stay table checks, so that old rows never block the upgrade.

CREATE DOMAIN identity.account_kind AS text CHECK (VALUE IN ('person', 'team', 'device', 'service'));
COMMENT ON DOMAIN identity.account_kind IS 'What an account is: person, team, device (an anonymous install) or service.';
CREATE DOMAIN identity.device_fingerprint AS text CHECK (length(VALUE) BETWEEN 1 AND 256);
COMMENT ON DOMAIN identity.device_fingerprint IS 'A device''s fingerprint as its client sends it: 1 to 256 characters.';
CREATE DOMAIN util.note AS text CHECK (length(VALUE) <= 500);
COMMENT ON DOMAIN util.note IS 'Free text of at most 500 characters: a memo, a reason.';
CREATE DOMAIN util.idempotency_key AS text CHECK (length(VALUE) BETWEEN 1 AND 255);
COMMENT ON DOMAIN util.idempotency_key IS 'An idempotency key (or a grant key): 1 to 255 characters.';
CREATE DOMAIN ledger.transfer_kind AS text CHECK (VALUE IN ('grant', 'usage', 'purchase', 'adjustment', 'plan_credits',
                                                            'refund', 'signup_bonus', 'monthly_free', 'referral_reward',
                                                            'expiry'));
COMMENT ON DOMAIN ledger.transfer_kind IS 'Why credits moved: the kind of a ledger transfer.';
CREATE DOMAIN ledger.lot_source AS text CHECK (VALUE IN ('purchase', 'subscription_grant', 'signup_bonus', 'monthly_free',
                                                         'referral_reward', 'promotion', 'adjustment'));
COMMENT ON DOMAIN ledger.lot_source IS 'Where a credit lot came from.';
CREATE DOMAIN ledger.lot_status AS text CHECK (VALUE IN ('pending', 'active', 'expired', 'canceled'));
COMMENT ON DOMAIN ledger.lot_status IS 'A credit lot''s state: pending (held back), active (spendable), expired, canceled.';

-- 1. The views over these columns are saved and dropped (a column a view reads cannot change type).
CREATE TEMP TABLE saved_views ON COMMIT DROP AS
WITH RECURSIVE deps(view_oid, depth) AS (
  SELECT r.ev_class, 1
  FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid
  WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass
    AND d.refobjid IN ('identity.accounts'::regclass, 'ledger.transfers'::regclass, 'ledger.credit_lots'::regclass)
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

-- 2. The table checks give way to the domains.
ALTER TABLE identity.accounts
  DROP CONSTRAINT accounts_kind_check,
  DROP CONSTRAINT accounts_device_fingerprint_check,
  DROP CONSTRAINT accounts_suspended_reason_check,
  ALTER COLUMN kind TYPE identity.account_kind,
  ALTER COLUMN device_fingerprint TYPE identity.device_fingerprint,
  ALTER COLUMN suspended_reason TYPE util.note;
ALTER TABLE ledger.transfers
  DROP CONSTRAINT transfers_kind_check,
  DROP CONSTRAINT transfers_idempotency_key_check,
  ALTER COLUMN kind TYPE ledger.transfer_kind,
  ALTER COLUMN idempotency_key TYPE util.idempotency_key;
-- (paid is generated from source: it is made again over the new column, last in the table.)
ALTER TABLE ledger.credit_lots DROP COLUMN paid;
ALTER TABLE ledger.credit_lots
  DROP CONSTRAINT credit_lots_source_check,
  DROP CONSTRAINT credit_lots_status_check,
  DROP CONSTRAINT credit_lots_grant_key_check,
  DROP CONSTRAINT credit_lots_memo_check,
  ALTER COLUMN source TYPE ledger.lot_source,
  ALTER COLUMN status TYPE ledger.lot_status,
  ALTER COLUMN grant_key TYPE util.idempotency_key,
  ALTER COLUMN memo TYPE util.note,
  ADD COLUMN paid boolean GENERATED ALWAYS AS (source IN ('purchase', 'subscription_grant')) STORED;
COMMENT ON COLUMN ledger.credit_lots.paid IS 'Bought credits (purchase, subscription_grant); promotional credits (the rest) are spent before paid ones of the same expiry.';

-- 3. The views come back, in dependency order, with their comments and the analysts' grant.
DO $$
DECLARE
  v record;
BEGIN
  FOR v IN SELECT * FROM saved_views ORDER BY depth LOOP
    EXECUTE format('CREATE VIEW %s AS %s', v.name, v.def);
    EXECUTE format('COMMENT ON VIEW %s IS %L', v.name, v.comment);
  END LOOP;
END $$;
GRANT SELECT ON ALL TABLES IN SCHEMA reporting TO pgtally_analyst;
