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

-- The plan credits expected of subscription invoices leave out duplicates' (never granted).
CREATE OR REPLACE VIEW reporting.revenue_reconciliation_daily AS
WITH stripe_payments AS (
  SELECT DISTINCT ON (key) e.created, e.type, e.payload -> 'data' -> 'object' AS o
  FROM (SELECT *, CASE type WHEN 'invoice.paid' THEN 'in:' || (payload #>> '{data,object,id}')
                            WHEN 'payment_intent.succeeded' THEN 'pi:' || (payload #>> '{data,object,id}')
                            ELSE 'pi:' || coalesce(payload #>> '{data,object,payment_intent}', payload #>> '{data,object,id}') END AS key
        FROM billing.stripe_events WHERE status = 'applied') e
  WHERE e.type = 'payment_intent.succeeded'
     OR (e.type IN ('checkout.session.completed', 'checkout.session.async_payment_succeeded')
         AND e.payload #>> '{data,object,mode}' = 'payment' AND e.payload #>> '{data,object,payment_status}' = 'paid')
     OR (e.type = 'invoice.paid' AND EXISTS (SELECT 1 FROM billing.invoices i WHERE i.stripe_invoice_id = e.payload #>> '{data,object,id}'))
  ORDER BY key, e.created, e.id),
stripe AS (
  SELECT (date_trunc('day', created AT TIME ZONE 'UTC'))::date AS day,
         CASE WHEN type = 'invoice.paid' THEN 'subscription' ELSE 'bundle' END AS kind,
         lower(coalesce(o ->> 'currency', 'usd')) AS currency,
         sum(CASE type WHEN 'invoice.paid' THEN (o ->> 'amount_paid')::bigint
                       WHEN 'payment_intent.succeeded' THEN (o ->> 'amount_received')::bigint
                       ELSE (o ->> 'amount_total')::bigint END) AS stripe_minor
  FROM stripe_payments GROUP BY 1, 2, 3),
recorded AS (
  SELECT (date_trunc('day', p.paid_at AT TIME ZONE 'UTC'))::date AS day, 'bundle' AS kind, p.currency,
         sum(p.amount_minor) AS recorded_minor, sum(p.refunded_minor) AS refunded_minor,
         sum(p.credits_micros) AS expected_credits_micros,
         sum((SELECT coalesce(sum(t.amount_micros), 0) FROM ledger.transfers t
              WHERE t.account_id = p.account_id AND t.kind = 'purchase'
                AND t.idempotency_key IN ('checkout:' || p.stripe_checkout_session, 'payment_intent:' || p.stripe_payment_intent_id))
            ) AS ledger_credits_micros
  FROM billing.payments p GROUP BY 1, 2, 3
  UNION ALL
  SELECT (date_trunc('day', i.paid_at AT TIME ZONE 'UTC'))::date, 'subscription', i.currency,
         sum(i.amount_paid_minor), sum(i.refunded_minor),
         -- A duplicate subscription's invoice grants nothing (it is canceled and refunded).
         sum(CASE WHEN EXISTS (SELECT 1 FROM billing.duplicate_subscriptions d
                               WHERE d.stripe_subscription_id = i.stripe_subscription_id) THEN 0
                  ELSE coalesce(pl.included_credits_micros, 0) END),
         sum((SELECT coalesce(sum(t.amount_micros), 0) FROM ledger.transfers t
              WHERE t.account_id = i.account_id AND t.idempotency_key = 'invoice:' || i.stripe_invoice_id))
  FROM billing.invoices i LEFT JOIN billing.plans pl ON pl.id = i.plan_id
  WHERE i.status IN ('paid', 'refunded') GROUP BY 1, 2, 3)
SELECT coalesce(r.day, s.day) AS day, coalesce(r.kind, s.kind) AS kind, coalesce(r.currency, s.currency) AS currency,
       coalesce(s.stripe_minor, 0) AS stripe_minor, coalesce(r.recorded_minor, 0) AS recorded_minor,
       coalesce(r.refunded_minor, 0) AS refunded_minor,
       coalesce(r.expected_credits_micros, 0) AS expected_credits_micros,
       coalesce(r.ledger_credits_micros, 0) AS ledger_credits_micros,
       round(100.0 * greatest(abs(coalesce(s.stripe_minor, 0) - coalesce(r.recorded_minor, 0))
                                / greatest(coalesce(s.stripe_minor, 0), coalesce(r.recorded_minor, 0), 1),
                              abs(coalesce(r.expected_credits_micros, 0) - coalesce(r.ledger_credits_micros, 0))
                                / greatest(coalesce(r.expected_credits_micros, 0), 1)), 2) AS drift_percent
FROM recorded r FULL JOIN stripe s ON s.day = r.day AND s.kind = r.kind AND s.currency = r.currency;
