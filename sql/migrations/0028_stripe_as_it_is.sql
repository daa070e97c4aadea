-- pgtally 0028: Stripe as it really is (issue #23). Since API 2025-03-31 a Charge names no invoice
-- and an Invoice no PaymentIntent: the link is the InvoicePayment, recorded here so refunds and
-- disputes of subscription payments find their invoice and account. A fully refunded invoice is
-- status refunded (it leaves the revenue views); refunds that matched nothing are listed.
-- depends: 0023_json_answers

CREATE TABLE billing.invoice_payments (
  stripe_invoice_payment_id text PRIMARY KEY CHECK (length(stripe_invoice_payment_id) <= 255),
  stripe_invoice_id         text NOT NULL CHECK (length(stripe_invoice_id) <= 255),
  account_id                uuid NOT NULL REFERENCES identity.accounts,
  stripe_payment_intent_id  text CHECK (length(stripe_payment_intent_id) <= 255),
  stripe_charge_id          text CHECK (length(stripe_charge_id) <= 255),
  amount_minor              bigint NOT NULL CHECK (amount_minor >= 0),
  refunded_minor            bigint NOT NULL DEFAULT 0 CHECK (refunded_minor >= 0),
  currency                  text NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
  paid_at                   timestamptz
);
CREATE INDEX invoice_payments_invoice_idx ON billing.invoice_payments (stripe_invoice_id);
CREATE INDEX invoice_payments_payment_intent_idx ON billing.invoice_payments (stripe_payment_intent_id);
CREATE INDEX invoice_payments_charge_idx ON billing.invoice_payments (stripe_charge_id);
COMMENT ON TABLE billing.invoice_payments IS
  'Stripe InvoicePayments (API 2025-03-31 on): which PaymentIntent or Charge paid which subscription invoice, from invoice.paid''s payments list or an invoice_payment.paid event, once each. How a charge.refunded or charge.dispute.* of a subscription payment finds its invoice and account (neither object names them).';
COMMENT ON COLUMN billing.invoice_payments.stripe_payment_intent_id IS 'The PaymentIntent that paid it (payment.payment_intent), when the payment was one.';
COMMENT ON COLUMN billing.invoice_payments.stripe_charge_id IS 'The Charge that paid it: payment.charge, or learnt from the first charge.refunded of its PaymentIntent.';
COMMENT ON COLUMN billing.invoice_payments.amount_minor IS 'What this payment paid of the invoice (amount_paid), in minor currency units.';
COMMENT ON COLUMN billing.invoice_payments.refunded_minor IS 'What charge.refunded events took back of this payment (the charge''s amount_refunded), in minor units.';

ALTER TABLE billing.invoices DROP CONSTRAINT invoices_status_check;
ALTER TABLE billing.invoices ADD CONSTRAINT invoices_status_check
  CHECK (status IN ('draft', 'open', 'paid', 'uncollectible', 'void', 'refunded'));
COMMENT ON COLUMN billing.invoices.status IS
  'paid; open (its payment failed and Stripe is retrying); refunded (paid, then refunded in full: it leaves the revenue views).';

-- Recorded subscription money includes invoices refunded since (Stripe reported them paid).
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
         sum(coalesce(pl.included_credits_micros, 0)),
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

CREATE VIEW reporting.unmatched_refunds AS
SELECT e.id AS event_id, e.created, e.payload #>> '{data,object,id}' AS stripe_charge_id,
       e.payload #>> '{data,object,payment_intent}' AS stripe_payment_intent_id,
       e.payload #>> '{data,object,customer}' AS stripe_customer_id,
       (e.payload #>> '{data,object,amount_refunded}')::numeric AS amount_refunded_minor,
       lower(e.payload #>> '{data,object,currency}') AS currency, e.note
FROM billing.stripe_events e
WHERE e.type = 'charge.refunded' AND e.status = 'ignored';
COMMENT ON VIEW reporting.unmatched_refunds IS
  'Reconciliation: charge.refunded events that changed nothing because no payment pgtally recorded matched them (no bundle payment, no subscription invoice payment): money Stripe gave back that pgtally''s revenue still counts, or a payment pgtally never saw. Must be empty.';
GRANT SELECT ON reporting.unmatched_refunds TO pgtally_analyst;

DROP FUNCTION IF EXISTS api.checkout_prepare(text, uuid, text, uuid);
