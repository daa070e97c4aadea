-- reporting views. Billing: subscriptions, Stripe payments against the ledger, webhook events not applied, post-paid
-- usage reported to Stripe, refunds nothing matched.
-- Re-applied after the migrations and the functions (sql/migrations/post-apply.py).

CREATE OR REPLACE VIEW reporting.subscriptions_by_status AS
SELECT plan_id, status, count(*) AS subscriptions,
       count(*) FILTER (WHERE cancel_at_period_end) AS canceling_at_period_end
FROM billing.subscriptions GROUP BY plan_id, status;
COMMENT ON VIEW reporting.subscriptions_by_status IS 'Subscriptions per plan and Stripe status.';

CREATE OR REPLACE VIEW reporting.payments_vs_ledger_daily AS
WITH pay AS (
  SELECT (date_trunc('day', paid_at AT TIME ZONE 'UTC'))::date AS day, currency,
         sum(amount_minor) AS paid_minor, sum(refunded_minor) AS refunded_minor, sum(credits_micros) AS credits_sold_micros
  FROM billing.payments GROUP BY 1, 2),
led AS (
  SELECT (date_trunc('day', t.created_at AT TIME ZONE 'UTC'))::date AS day, sum(t.amount_micros) AS ledger_purchase_micros
  FROM ledger.transfers t WHERE t.kind = 'purchase' GROUP BY 1)
SELECT coalesce(pay.day, led.day) AS day, pay.currency, coalesce(pay.paid_minor, 0) AS paid_minor,
       coalesce(pay.refunded_minor, 0) AS refunded_minor, coalesce(pay.credits_sold_micros, 0) AS credits_sold_micros,
       coalesce(led.ledger_purchase_micros, 0) AS ledger_purchase_micros,
       coalesce(pay.credits_sold_micros, 0) - coalesce(led.ledger_purchase_micros, 0) AS difference_micros
FROM pay FULL JOIN led ON led.day = pay.day;
COMMENT ON VIEW reporting.payments_vs_ledger_daily IS
  'Per UTC day: Stripe bundle payments (minor units) and the credits they sold against the purchase credits the ledger holds; difference_micros should be 0.';

CREATE OR REPLACE VIEW reporting.stripe_events_not_applied AS
SELECT id, type, created, received_at, status, note FROM billing.stripe_events WHERE status <> 'applied';
COMMENT ON VIEW reporting.stripe_events_not_applied IS 'Webhook events received but not applied (stale or ignored), with the reason.';

CREATE OR REPLACE VIEW reporting.meter_event_reports_daily AS
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

CREATE OR REPLACE VIEW reporting.post_paid_invoice_drift AS
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

CREATE OR REPLACE VIEW reporting.unreported_post_paid_events AS
SELECT e.id AS usage_event_id, e.account_id, e.amount_minor, e.created_at
FROM metering.usage_events e
WHERE e.amount_minor IS NOT NULL AND NOT EXISTS (SELECT 1 FROM outbox.messages m WHERE m.id = e.id);
COMMENT ON VIEW reporting.unreported_post_paid_events IS
  'Reconciliation: post-paid usage events with no report to Stripe queued (the charge writes both in one transaction). Must be empty.';

CREATE OR REPLACE VIEW reporting.unmatched_refunds AS
SELECT e.id AS event_id, e.created, e.payload #>> '{data,object,id}' AS stripe_charge_id,
       e.payload #>> '{data,object,payment_intent}' AS stripe_payment_intent_id,
       e.payload #>> '{data,object,customer}' AS stripe_customer_id,
       (e.payload #>> '{data,object,amount_refunded}')::numeric AS amount_refunded_minor,
       lower(e.payload #>> '{data,object,currency}') AS currency, e.note
FROM billing.stripe_events e
WHERE e.type = 'charge.refunded' AND e.status = 'ignored';
COMMENT ON VIEW reporting.unmatched_refunds IS
  'Reconciliation: charge.refunded events that changed nothing because no payment pgtally recorded matched them (no bundle payment, no subscription invoice payment): money Stripe gave back that pgtally''s revenue still counts, or a payment pgtally never saw. Must be empty.';

GRANT SELECT ON reporting.subscriptions_by_status, reporting.payments_vs_ledger_daily, reporting.stripe_events_not_applied, reporting.meter_event_reports_daily, reporting.post_paid_invoice_drift, reporting.unreported_post_paid_events, reporting.unmatched_refunds TO pgtally_analyst;
