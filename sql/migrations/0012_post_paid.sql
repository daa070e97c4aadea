-- pgtally 0012: post-paid usage, billed by Stripe through Billing Meters; subscription invoices recorded.
-- depends: 0011_auto_topup

-- metering.quote gains post-paid outputs (sql/functions/40_metering.sql creates it again).
DROP FUNCTION IF EXISTS metering.quote(identity.accounts, text, bigint, bigint, bigint);

ALTER TABLE billing.plans ADD COLUMN spending_limit_minor bigint CHECK (spending_limit_minor >= 0);
COMMENT ON COLUMN billing.plans.spending_limit_minor IS
  'Post-paid plans: the most their post-paid meters may cost per billing period, in minor currency units (cents) of the plan''s price; a charge past it is refused like an empty balance (TL402). NULL: no limit.';

ALTER TABLE billing.entitlements DROP CONSTRAINT entitlements_kind_check;
ALTER TABLE billing.entitlements ADD CONSTRAINT entitlements_kind_check
  CHECK (kind IN ('allowance', 'unlimited', 'fair_use', 'post_paid'));
ALTER TABLE billing.entitlements DROP CONSTRAINT entitlements_check;
ALTER TABLE billing.entitlements ADD CONSTRAINT entitlements_check
  CHECK ((kind IN ('unlimited', 'post_paid')) = (limit_units IS NULL));
ALTER TABLE billing.entitlements
  ADD COLUMN unit_amount_minor bigint CHECK (unit_amount_minor >= 0),
  ADD COLUMN stripe_meter_event text CHECK (stripe_meter_event ~ '^[A-Za-z0-9_.:-]{1,100}$'),
  ADD CONSTRAINT entitlements_post_paid CHECK ((kind = 'post_paid') = (unit_amount_minor IS NOT NULL AND stripe_meter_event IS NOT NULL));
COMMENT ON COLUMN billing.entitlements.unit_amount_minor IS
  'post_paid: the price of one meter unit in minor currency units (cents), billed after the fact by Stripe.';
COMMENT ON COLUMN billing.entitlements.stripe_meter_event IS
  'post_paid: the event_name of the Stripe Billing Meter each usage event is reported to (https://docs.stripe.com/api/billing/meter-event/create).';

ALTER TABLE billing.prices ADD COLUMN usage_type text NOT NULL DEFAULT 'licensed' CHECK (usage_type IN ('licensed', 'metered'));
COMMENT ON COLUMN billing.prices.usage_type IS
  'Stripe''s recurring.usage_type: licensed (a fixed amount per period) or metered (a price on a Billing Meter: Checkout sends no quantity, the invoice bills the period''s reported usage).';

ALTER TABLE metering.usage_events ADD COLUMN amount_minor bigint CHECK (amount_minor >= 0);
COMMENT ON COLUMN metering.usage_events.amount_minor IS
  'Post-paid events: what the event costs in minor currency units (quantity x the entitlement''s unit_amount_minor), billed by Stripe''s invoice; NULL for prepaid events.';

ALTER TABLE outbox.messages DROP CONSTRAINT messages_kind_check;
ALTER TABLE outbox.messages ADD CONSTRAINT messages_kind_check
  CHECK (kind IN ('verify_email', 'account_exists', 'password_reset', 'usage_warning', 'auto_topup',
                  'auto_topup_disabled', 'meter_event'));
COMMENT ON COLUMN outbox.messages.kind IS
  'An email (verify_email, account_exists, password_reset, usage_warning, auto_topup_disabled) or a task for the worker (auto_topup: pay a bundle with the saved card; meter_event: report a post-paid usage event to Stripe, the message id being the usage event''s id).';

CREATE TABLE billing.invoices (
  stripe_invoice_id      text PRIMARY KEY CHECK (length(stripe_invoice_id) <= 255),
  account_id             uuid NOT NULL REFERENCES identity.accounts,
  stripe_subscription_id text REFERENCES billing.subscriptions,
  number                 text CHECK (length(number) <= 255),
  status                 text NOT NULL CHECK (status IN ('draft', 'open', 'paid', 'uncollectible', 'void')),
  currency               text NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
  amount_paid_minor      bigint NOT NULL CHECK (amount_paid_minor >= 0),
  metered_amount_minor   bigint NOT NULL DEFAULT 0 CHECK (metered_amount_minor >= 0),
  metered_period_start   timestamptz,
  metered_period_end     timestamptz,
  hosted_invoice_url     text CHECK (length(hosted_invoice_url) <= 2000),
  invoice_pdf            text CHECK (length(invoice_pdf) <= 2000),
  created_at             timestamptz NOT NULL
);
CREATE INDEX invoices_account_idx ON billing.invoices (account_id, created_at);
COMMENT ON TABLE billing.invoices IS
  'Subscription invoices Stripe reported paid (invoice.paid), once per invoice. metered_*: the lines that bill metered prices (post-paid usage) and the period they cover.';
COMMENT ON COLUMN billing.invoices.amount_paid_minor IS 'What the invoice collected, in minor currency units.';
COMMENT ON COLUMN billing.invoices.metered_amount_minor IS 'The sum of its metered lines (usage reported through Billing Meters), in minor units.';

CREATE VIEW reporting.meter_event_reports_daily AS
SELECT e.account_id, (date_trunc('day', e.created_at AT TIME ZONE 'UTC'))::date AS day,
       count(*) FILTER (WHERE m.delivered_at IS NOT NULL) AS reported,
       count(*) FILTER (WHERE m.delivered_at IS NULL AND m.failed_at IS NULL) AS pending,
       count(*) FILTER (WHERE m.failed_at IS NOT NULL) AS failed,
       count(*) FILTER (WHERE m.id IS NULL) AS missing,
       sum(e.quantity) FILTER (WHERE m.delivered_at IS NOT NULL) AS reported_units,
       sum(e.amount_minor) AS amount_minor
FROM metering.usage_events e
LEFT JOIN outbox.messages m ON m.id = e.id
WHERE e.amount_minor IS NOT NULL
GROUP BY 1, 2;
COMMENT ON VIEW reporting.meter_event_reports_daily IS
  'Post-paid usage events per account and UTC day: reported to Stripe (the meter event was accepted), pending (queued or retrying), failed (retries exhausted: see outbox.messages.last_error) and missing (no report queued: must be 0); units reported and the amount charged locally, in minor units.';

CREATE VIEW reporting.post_paid_invoice_drift AS
SELECT i.stripe_invoice_id, i.account_id, i.metered_period_start, i.metered_period_end, i.currency,
       i.metered_amount_minor AS invoiced_minor, coalesce(u.amount, 0) AS recorded_minor,
       round(100.0 * (i.metered_amount_minor - coalesce(u.amount, 0)) / nullif(coalesce(u.amount, 0), 0), 2) AS drift_percent,
       abs(i.metered_amount_minor - coalesce(u.amount, 0)) <= 0.01 * coalesce(u.amount, 0) AS within_1_percent
FROM billing.invoices i
LEFT JOIN LATERAL (SELECT sum(e.amount_minor)::bigint AS amount FROM metering.usage_events e
                   WHERE e.account_id = i.account_id AND e.amount_minor IS NOT NULL
                     AND e.created_at >= i.metered_period_start AND e.created_at < i.metered_period_end) u ON true
WHERE i.metered_period_start IS NOT NULL;
COMMENT ON VIEW reporting.post_paid_invoice_drift IS
  'Each paid invoice with metered lines against the post-paid usage pgtally charged the account in the same period: invoiced vs recorded (minor units), the drift in percent of what was recorded, and whether it is within 1% (the generation app''s success criterion, seeds/4-saas-monetisation-plan.md).';

CREATE VIEW reporting.unreported_post_paid_events AS
SELECT e.id AS usage_event_id, e.account_id, e.amount_minor, e.created_at
FROM metering.usage_events e
WHERE e.amount_minor IS NOT NULL AND NOT EXISTS (SELECT 1 FROM outbox.messages m WHERE m.id = e.id);
COMMENT ON VIEW reporting.unreported_post_paid_events IS
  'Reconciliation: post-paid usage events with no report to Stripe queued (the charge writes both in one transaction). Must be empty.';

GRANT SELECT ON reporting.meter_event_reports_daily, reporting.post_paid_invoice_drift,
  reporting.unreported_post_paid_events TO pgtally_analyst;
