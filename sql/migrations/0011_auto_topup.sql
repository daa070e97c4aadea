-- pgtally 0011: auto top-up: a charge that takes the balance under a threshold buys a bundle
-- with the saved card, one at a time.
-- depends: 0010_holds

ALTER TABLE identity.accounts ADD COLUMN auto_topup_below_micros bigint CHECK (auto_topup_below_micros >= 0);
COMMENT ON COLUMN identity.accounts.auto_topup_below_micros IS
  'Auto top-up threshold in micro-credits (NULL: off): a charge that leaves the balance below it enqueues one top-up (billing.auto_topups).';

CREATE TABLE billing.auto_topups (
  account_id      uuid PRIMARY KEY REFERENCES identity.accounts,
  below_micros    bigint NOT NULL CHECK (below_micros >= 0),
  price_id        text NOT NULL REFERENCES billing.prices,
  enabled         boolean NOT NULL DEFAULT true,
  failures        integer NOT NULL DEFAULT 0 CHECK (failures >= 0),
  in_flight_since timestamptz,
  last_error      text CHECK (length(last_error) <= 1000),
  updated_at      timestamptz NOT NULL
);
COMMENT ON TABLE billing.auto_topups IS
  'Auto top-up settings: buy price_id (a bundle) with the saved card when a charge leaves the balance below below_micros. in_flight_since: a top-up is queued or being paid (never two at once); cleared by its payment_intent.succeeded, or by a failure (3 failures turn it off and email the user).';

ALTER TABLE outbox.messages DROP CONSTRAINT messages_kind_check;
ALTER TABLE outbox.messages ADD CONSTRAINT messages_kind_check
  CHECK (kind IN ('verify_email', 'account_exists', 'password_reset', 'usage_warning', 'auto_topup',
                  'auto_topup_disabled'));
COMMENT ON COLUMN outbox.messages.kind IS
  'An email (verify_email, account_exists, password_reset, usage_warning, auto_topup_disabled) or a task for the worker (auto_topup: pay a bundle with the saved card).';
