-- pgtally 0032: budgets (issue #28, part 1). A budget caps the credits an API key, a team member
-- or a whole account may spend per window (day, month, billing period), with soft alert
-- thresholds. Charges record which key and member made them, so that usage per key and per member
-- is reportable (reporting.usage_by_principal_daily, sql/views/40_metering.sql). Functions are in
-- sql/functions/47_budgets.sql (re-applied after migrations).
-- depends: 0028_stripe_as_it_is

-- Signatures that change (sql/functions makes them again).
DROP FUNCTION IF EXISTS metering.charge(identity.accounts, text, bytea, jsonb, record, boolean, uuid);
DROP FUNCTION IF EXISTS api.usage_events(text, uuid, text, integer, text, timestamptz, timestamptz, uuid);

ALTER TABLE identity.accounts ADD COLUMN has_budgets boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN identity.accounts.has_budgets IS
  'Whether the account has a budget (metering.budgets): a charge reads this flag from the row it already locks, so an account without budgets pays no query for them. Kept by metering.set_budget and metering.delete_budget under the account''s lock.';

ALTER TABLE metering.usage_events ADD COLUMN api_key_id uuid, ADD COLUMN user_id uuid;
COMMENT ON COLUMN metering.usage_events.api_key_id IS
  'The API key that made the charge (NULL: a session, or charged before migration 0032). A service key acting on another account is recorded too.';
COMMENT ON COLUMN metering.usage_events.user_id IS
  'The person the charge is attributed to: the session''s user, or the member who made the API key (identity.api_keys.created_by); NULL for operator keys and anonymous devices. What member budgets count.';

ALTER TABLE metering.holds ADD COLUMN api_key_id uuid, ADD COLUMN user_id uuid, ADD COLUMN budget_ids uuid[];
COMMENT ON COLUMN metering.holds.api_key_id IS 'The API key that made the hold (NULL: a session).';
COMMENT ON COLUMN metering.holds.user_id IS 'The person the hold is attributed to (as metering.usage_events.user_id).';
COMMENT ON COLUMN metering.holds.budget_ids IS
  'The budgets whose current window counts the hold''s credits as spent (NULL: none); settling the hold gives them back to those windows (metering.budgets_return).';

CREATE TABLE metering.budgets (
  id           uuid PRIMARY KEY DEFAULT util.uuid_v7(),
  account_id   uuid NOT NULL REFERENCES identity.accounts,
  scope        text NOT NULL CHECK (scope IN ('api_key', 'member', 'account')),
  subject      uuid NOT NULL,
  limit_micros bigint NOT NULL CHECK (limit_micros > 0),
  period       text NOT NULL CHECK (period IN ('day', 'month', 'billing_period')),
  alerts       smallint[] NOT NULL DEFAULT '{}'
               CHECK (cardinality(alerts) <= 10 AND 1 <= ALL (alerts) AND 100 >= ALL (alerts)),
  created_at   timestamptz NOT NULL,
  created_by   uuid,
  CONSTRAINT budgets_one_per_window UNIQUE (account_id, scope, subject, period),
  CONSTRAINT budgets_account_subject CHECK (scope <> 'account' OR subject = account_id)
);
COMMENT ON TABLE metering.budgets IS
  'Spending caps set by a customer (issue #28): at most limit_micros of credits spent per window by one API key (scope api_key, subject: the key''s id), one member across the keys they made and their sessions (scope member, subject: the user id) or the whole account (scope account, subject: the account id), on this account. A charge that would pass it is refused (TL4B2, 402 budget-exceeded) and charges nothing; crossing an alert threshold emails once per window.';
COMMENT ON COLUMN metering.budgets.limit_micros IS 'The cap, in micro-credits spent per window (allowance units and post-paid usage cost no credits and do not count).';
COMMENT ON COLUMN metering.budgets.period IS 'The window: day (UTC calendar day), month (UTC calendar month) or billing_period (the subscription period, else the calendar month), as metering.period_bounds.';
COMMENT ON COLUMN metering.budgets.alerts IS 'Soft thresholds, percent of the limit (1-100, at most 10): crossing one emails the account''s owners and admins (and the member, for a member budget) once per window.';
COMMENT ON COLUMN metering.budgets.created_by IS 'The user who set it (NULL: an operator or an API key).';

CREATE TABLE metering.budget_windows (
  budget_id    uuid NOT NULL REFERENCES metering.budgets ON DELETE CASCADE,
  period_start timestamptz NOT NULL,
  period_end   timestamptz NOT NULL,
  spent_micros bigint NOT NULL CHECK (spent_micros >= 0),
  alerted      smallint[] NOT NULL DEFAULT '{}',
  PRIMARY KEY (budget_id, period_start),
  CHECK (period_end > period_start)
);
COMMENT ON TABLE metering.budget_windows IS
  'What a budget''s window has spent, one row per budget and window, written under the account''s lock by the charge, batch or hold that spends. A window''s row starts from the credits the budget''s subject already spent in it (metering.budget_window_usage), so a budget set mid-window counts the window''s earlier spending.';
COMMENT ON COLUMN metering.budget_windows.spent_micros IS 'Micro-credits spent in the window by the budget''s subject, open holds included.';
COMMENT ON COLUMN metering.budget_windows.alerted IS 'The alert thresholds (percent) already emailed in this window: each once.';
