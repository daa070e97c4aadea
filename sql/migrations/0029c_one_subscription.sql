-- pgtally 0029c: one subscription per account (issue #23, defect 12). The subscription Checkouts
-- pgtally opened are recorded, so a new one expires the older one still open; a second live
-- subscription that arrives anyway is recorded here, canceled at Stripe with a refund of what it
-- charged (a worker task), and the customer told.
-- depends: 0029b_subscription_fields

CREATE TABLE billing.checkout_sessions (
  stripe_checkout_session_id text PRIMARY KEY CHECK (length(stripe_checkout_session_id) <= 255),
  account_id                 uuid NOT NULL REFERENCES identity.accounts,
  mode                       text NOT NULL CHECK (mode IN ('payment', 'subscription', 'setup')),
  price_id                   text REFERENCES billing.prices,
  status                     text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'complete', 'expired')),
  created_at                 timestamptz NOT NULL,
  closed_at                  timestamptz
);
CREATE INDEX checkout_sessions_open_idx ON billing.checkout_sessions (account_id) WHERE status = 'open';
COMMENT ON TABLE billing.checkout_sessions IS
  'Stripe Checkout Sessions pgtally opened (api.checkout_opened): at most one subscription session per account is open; opening another expires the older one (here, and at Stripe by the server). checkout.session.completed and .expired close them.';
COMMENT ON COLUMN billing.checkout_sessions.status IS 'open; complete (paid: checkout.session.completed); expired (a newer one replaced it, or Stripe expired it after 24 hours).';

CREATE TABLE billing.duplicate_subscriptions (
  stripe_subscription_id text PRIMARY KEY CHECK (length(stripe_subscription_id) <= 255),
  account_id             uuid NOT NULL REFERENCES identity.accounts,
  kept_subscription_id   text NOT NULL CHECK (length(kept_subscription_id) <= 255),
  detected_at            timestamptz NOT NULL,
  canceled_at            timestamptz,
  refunded_minor         bigint NOT NULL DEFAULT 0 CHECK (refunded_minor >= 0),
  currency               text CHECK (currency ~ '^[a-z]{3}$')
);
COMMENT ON TABLE billing.duplicate_subscriptions IS
  'A second live subscription of an account that already had one (two Checkouts paid at once): it never sets the plan or grants credits; the worker cancels it at Stripe at once and refunds what its invoices charged (task cancel_duplicate_subscription), and the customer is emailed (subscription_duplicate). Why: Stripe bills every live subscription.';
COMMENT ON COLUMN billing.duplicate_subscriptions.kept_subscription_id IS 'The account''s live subscription it duplicated, which stays.';
COMMENT ON COLUMN billing.duplicate_subscriptions.canceled_at IS 'When the worker had it canceled at Stripe and refunded.';
COMMENT ON COLUMN billing.duplicate_subscriptions.refunded_minor IS 'What the worker asked Stripe to refund of its invoices, in minor currency units.';

ALTER TABLE outbox.messages DROP CONSTRAINT messages_kind_check;
ALTER TABLE outbox.messages ADD CONSTRAINT messages_kind_check
  CHECK (kind IN ('verify_email', 'account_exists', 'password_reset', 'usage_warning', 'auto_topup',
                  'auto_topup_disabled', 'meter_event', 'alert', 'payment_failed', 'receipt', 'subscription_ending',
                  'subscription_canceled', 'invitation', 'sso_link', 'cancel_duplicate_subscription',
                  'subscription_duplicate'));
COMMENT ON COLUMN outbox.messages.kind IS
  'An email (verify_email, account_exists, password_reset, usage_warning, auto_topup_disabled, payment_failed, receipt, subscription_ending, subscription_canceled, subscription_duplicate, invitation, sso_link; alert: to the operators) or a task for the worker (auto_topup: pay a bundle with the saved card; meter_event: report a post-paid usage event to Stripe, the message id being the usage event''s id; cancel_duplicate_subscription: cancel and refund a second subscription).';
