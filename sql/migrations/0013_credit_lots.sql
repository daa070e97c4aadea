-- pgtally 0013: credits that come from somewhere: credit lots (source, expiry, burn order),
-- sign-up bonus and monthly free credits, referrals.
-- depends: 0012_post_paid

-- ledger.post_transfer gains lot arguments (sql/functions/30_ledger.sql creates it again);
-- api.signup gains the referral code (sql/functions/50_auth.sql).
DROP FUNCTION IF EXISTS ledger.post_transfer(uuid, text, bigint, text, text, uuid, text);
DROP FUNCTION IF EXISTS api.signup(text, text, text, text, uuid);
DROP FUNCTION IF EXISTS api.oauth_sign_in(text, text, text, boolean, uuid, text, text);

ALTER TABLE ledger.transfers DROP CONSTRAINT transfers_kind_check;
ALTER TABLE ledger.transfers ADD CONSTRAINT transfers_kind_check
  CHECK (kind IN ('grant', 'usage', 'purchase', 'adjustment', 'plan_credits', 'refund', 'signup_bonus',
                  'monthly_free', 'referral_reward', 'expiry'));

INSERT INTO ledger.system_accounts (code, description) VALUES
  ('expirations', 'Credits that expired unspent (what remained of a lot at its expires_at).');

CREATE TABLE ledger.credit_lots (
  id               uuid PRIMARY KEY DEFAULT util.uuid_v7(),
  account_id       uuid NOT NULL REFERENCES identity.accounts,
  source           text NOT NULL CHECK (source IN ('purchase', 'subscription_grant', 'signup_bonus', 'monthly_free',
                                                   'referral_reward', 'promotion', 'adjustment')),
  paid             boolean GENERATED ALWAYS AS (source IN ('purchase', 'subscription_grant')) STORED,
  amount_micros    bigint NOT NULL CHECK (amount_micros > 0),
  remaining_micros bigint NOT NULL,
  status           text NOT NULL CHECK (status IN ('pending', 'active', 'expired', 'canceled')),
  grant_key        text NOT NULL CHECK (length(grant_key) BETWEEN 1 AND 255),
  transfer_id      uuid REFERENCES ledger.transfers,
  available_at     timestamptz NOT NULL,
  expires_at       timestamptz,
  created_at       timestamptz NOT NULL,
  settled_at       timestamptz,
  memo             text CHECK (length(memo) <= 500),
  CHECK (remaining_micros BETWEEN 0 AND amount_micros),
  CHECK (status NOT IN ('pending', 'canceled') OR transfer_id IS NULL),
  CONSTRAINT credit_lots_grant_key UNIQUE (account_id, grant_key)
);
CREATE INDEX credit_lots_spendable_idx ON ledger.credit_lots (account_id, expires_at) WHERE status = 'active' AND remaining_micros > 0;
CREATE INDEX credit_lots_due_idx ON ledger.credit_lots (coalesce(expires_at, available_at))
  WHERE status = 'pending' OR (status = 'active' AND remaining_micros > 0 AND expires_at IS NOT NULL);
COMMENT ON TABLE ledger.credit_lots IS
  'Every credit that enters an account is a lot: where it came from (source), how much, what remains, when it expires and when it is spendable. The cached balance is the sum of active lots'' remaining (reporting.lot_balance_mismatches); charges spend lots in the burn order of ledger.spend_lots. pending: granted, not spendable before available_at (no ledger transfer yet); active: in the balance (its transfer_id brought it); expired: its remainder was taken by an expiry transfer; canceled: a pending lot that never became spendable (a referral reward whose payment was refunded).';
COMMENT ON COLUMN ledger.credit_lots.paid IS 'Bought credits (purchase, subscription_grant); promotional credits (the rest) are spent before paid ones of the same expiry.';
COMMENT ON COLUMN ledger.credit_lots.grant_key IS 'Once per account: the key of the grant that made the lot (its transfer''s idempotency key).';

ALTER TABLE identity.accounts ADD COLUMN credits_due_at timestamptz;
COMMENT ON COLUMN identity.accounts.credits_due_at IS
  'The next moment a lot of this account expires or becomes spendable, or its plan''s monthly credits are due (NULL: nothing is): a charge that finds it past runs ledger.refresh_lots first, so the hot path pays one comparison.';

ALTER TABLE billing.plans
  ADD COLUMN signup_bonus_micros bigint NOT NULL DEFAULT 0 CHECK (signup_bonus_micros >= 0),
  ADD COLUMN monthly_credits_micros bigint NOT NULL DEFAULT 0 CHECK (monthly_credits_micros >= 0);
COMMENT ON COLUMN billing.plans.signup_bonus_micros IS 'Micro-credits granted once per person when they verify their email on this plan (a signup_bonus lot, no expiry).';
COMMENT ON COLUMN billing.plans.monthly_credits_micros IS 'Micro-credits granted every billing period (a calendar month without a subscription) to accounts on this plan, expiring at its end: they reset.';

-- Existing balances become one lot each, so that the balance stays the sum of active lots.
INSERT INTO ledger.credit_lots (account_id, source, amount_micros, remaining_micros, status, grant_key,
                                available_at, created_at, settled_at, memo)
SELECT id, 'adjustment', credit_balance_micros, credit_balance_micros, 'active', 'opening-balance', now(), now(), now(),
       'balance before credit lots (migration 0013)'
FROM identity.accounts WHERE credit_balance_micros > 0;

CREATE TABLE billing.referral_program (
  singleton             boolean PRIMARY KEY DEFAULT true CHECK (singleton),
  qualify_on            text NOT NULL DEFAULT 'first_payment' CHECK (qualify_on IN ('email_verified', 'first_payment')),
  referrer_reward_micros bigint NOT NULL DEFAULT 10000000 CHECK (referrer_reward_micros >= 0),
  referee_reward_micros bigint NOT NULL DEFAULT 0 CHECK (referee_reward_micros >= 0),
  holdback              interval NOT NULL DEFAULT '14 days' CHECK (holdback >= '0'),
  monthly_cap           integer NOT NULL DEFAULT 20 CHECK (monthly_cap >= 0),
  same_ip_window        interval NOT NULL DEFAULT '30 days'
);
INSERT INTO billing.referral_program DEFAULT VALUES;
COMMENT ON TABLE billing.referral_program IS
  'The referral rules (one row, from the catalog''s [referrals] table): the event a referral qualifies on, the referrer''s and referee''s rewards (micro-credits), the holdback before a reward is spendable, the most rewarded referrals per referrer per calendar month, and how long a referrer''s IP counts against a referee signing up from it.';

CREATE FUNCTION util.referral_code() RETURNS text
LANGUAGE sql VOLATILE AS $$
  -- 8 characters of an unambiguous alphabet (31^8, about 8.5e11 codes) from random uuid bytes.
  SELECT string_agg(substr('abcdefghjkmnpqrstuvwxyz23456789', 1 + get_byte(b, i) % 31, 1), '' ORDER BY i)
  FROM (SELECT uuid_send(gen_random_uuid()) AS b) x, unnest(ARRAY[0, 1, 2, 3, 4, 5, 10, 11]) i
$$;
COMMENT ON FUNCTION util.referral_code() IS 'A new random referral code: 8 lower-case letters and digits, no 0/o/1/l/i.';

ALTER TABLE identity.users ADD COLUMN referral_code text UNIQUE CHECK (referral_code ~ '^[a-z0-9]{8}$');
UPDATE identity.users SET referral_code = util.referral_code() WHERE referral_code IS NULL;
ALTER TABLE identity.users ALTER COLUMN referral_code SET DEFAULT util.referral_code(), ALTER COLUMN referral_code SET NOT NULL;
COMMENT ON COLUMN identity.users.referral_code IS 'The person''s referral code (their link is PGTALLY_PUBLIC_URL/r/CODE).';

CREATE TABLE billing.referrals (
  referee_account_id  uuid PRIMARY KEY REFERENCES identity.accounts,
  referrer_account_id uuid NOT NULL REFERENCES identity.accounts,
  referrer_user_id    uuid NOT NULL REFERENCES identity.users,
  code                text NOT NULL,
  status              text NOT NULL CHECK (status IN ('signed_up', 'qualified', 'rewarded', 'rejected')),
  rejected_reason     text CHECK (rejected_reason IN ('self_referral', 'own_device', 'same_ip', 'same_fingerprint',
                                                      'monthly_cap', 'refunded')),
  signup_ip           text CHECK (length(signup_ip) <= 64),
  signup_fingerprint  text CHECK (length(signup_fingerprint) <= 256),
  qualifying_event    text CHECK (qualifying_event IN ('email_verified', 'first_payment')),
  qualifying_ref      text CHECK (length(qualifying_ref) <= 255),
  referrer_lot_id     uuid REFERENCES ledger.credit_lots,
  referee_lot_id      uuid REFERENCES ledger.credit_lots,
  created_at          timestamptz NOT NULL,
  qualified_at        timestamptz,
  rewarded_at         timestamptz,
  rejected_at         timestamptz,
  CHECK ((status = 'rejected') = (rejected_reason IS NOT NULL))
);
CREATE INDEX referrals_referrer_idx ON billing.referrals (referrer_account_id, created_at);
COMMENT ON TABLE billing.referrals IS
  'Who referred whom: one referrer per account, the first one, set at sign-up only. signed_up -> qualified (on the program''s event, once) -> rewarded (lots granted in that same transaction, pending for the holdback), or rejected with the reason (self_referral, own_device, same_ip, same_fingerprint at sign-up; monthly_cap at qualification; refunded: the qualifying payment was refunded inside the holdback).';

CREATE VIEW reporting.lot_balance_mismatches AS
SELECT a.id AS account_id, a.credit_balance_micros, coalesce(l.remaining, 0) AS active_lots_micros
FROM identity.accounts a
LEFT JOIN (SELECT account_id, sum(remaining_micros)::bigint AS remaining FROM ledger.credit_lots
           WHERE status = 'active' GROUP BY account_id) l ON l.account_id = a.id
WHERE a.credit_balance_micros <> coalesce(l.remaining, 0);
COMMENT ON VIEW reporting.lot_balance_mismatches IS
  'Reconciliation: accounts whose cached balance differs from what remains of their active credit lots. Must be empty.';

CREATE VIEW reporting.referral_reward_mismatches AS
SELECT r.referee_account_id, r.status, l.id AS lot_id, l.status AS lot_status, count(t.id) AS transfers
FROM billing.referrals r
JOIN ledger.credit_lots l ON l.id IN (r.referrer_lot_id, r.referee_lot_id)
LEFT JOIN ledger.transfers t ON t.account_id = l.account_id AND t.idempotency_key = l.grant_key
GROUP BY r.referee_account_id, r.status, l.id, l.status
HAVING count(t.id) <> CASE WHEN l.status IN ('active', 'expired') THEN 1 ELSE 0 END
UNION ALL
SELECT r.referee_account_id, r.status, NULL, NULL, 0
FROM billing.referrals r WHERE r.status = 'rewarded' AND r.referrer_lot_id IS NULL
  AND (SELECT referrer_reward_micros FROM billing.referral_program) > 0;
COMMENT ON VIEW reporting.referral_reward_mismatches IS
  'Reconciliation: referral rewards without exactly one ledger transfer once spendable (none while pending or canceled), and rewarded referrals without a reward lot. Must be empty.';

CREATE VIEW reporting.referral_funnel_daily AS
SELECT (date_trunc('day', created_at AT TIME ZONE 'UTC'))::date AS day,
       count(*) AS signed_up,
       count(qualified_at) AS qualified,
       count(*) FILTER (WHERE status = 'rewarded') AS rewarded,
       count(*) FILTER (WHERE rejected_reason = 'self_referral') AS rejected_self_referral,
       count(*) FILTER (WHERE rejected_reason = 'own_device') AS rejected_own_device,
       count(*) FILTER (WHERE rejected_reason = 'same_ip') AS rejected_same_ip,
       count(*) FILTER (WHERE rejected_reason = 'same_fingerprint') AS rejected_same_fingerprint,
       count(*) FILTER (WHERE rejected_reason = 'monthly_cap') AS rejected_monthly_cap,
       count(*) FILTER (WHERE rejected_reason = 'refunded') AS rejected_refunded
FROM billing.referrals GROUP BY 1;
COMMENT ON VIEW reporting.referral_funnel_daily IS
  'Referrals by the UTC day the referee signed up: signed up, qualified, rewarded, and rejected by reason.';

GRANT SELECT ON reporting.lot_balance_mismatches, reporting.referral_reward_mismatches,
  reporting.referral_funnel_daily TO pgtally_analyst;
