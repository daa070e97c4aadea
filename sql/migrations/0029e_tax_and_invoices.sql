-- pgtally 0029e: tax and an invoice for every payment (issue #23). Checkout with Stripe Tax on
-- (PGTALLY_STRIPE_TAX) records the tax of each bundle payment; one-time Checkout purchases create
-- invoices (invoice_creation), recorded here beside the subscription invoices, so
-- GET /v1/billing/invoices lists every payment with its number, PDF and hosted page.
-- depends: 0029d_meter_reconciliation

ALTER TABLE billing.payments ADD COLUMN tax_minor bigint NOT NULL DEFAULT 0 CHECK (tax_minor >= 0);
COMMENT ON COLUMN billing.payments.tax_minor IS
  'The tax Stripe Tax added to the payment (the Checkout Session''s total_details.amount_tax), in minor units; amount_minor includes it.';

CREATE TABLE billing.payment_invoices (
  stripe_invoice_id        text PRIMARY KEY CHECK (length(stripe_invoice_id) <= 255),
  account_id               uuid NOT NULL REFERENCES identity.accounts,
  stripe_payment_intent_id text CHECK (length(stripe_payment_intent_id) <= 255),
  number                   text CHECK (length(number) <= 255),
  status                   text NOT NULL CHECK (status IN ('paid', 'open', 'void', 'uncollectible')),
  currency                 text NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
  amount_paid_minor        bigint NOT NULL CHECK (amount_paid_minor >= 0),
  tax_minor                bigint NOT NULL DEFAULT 0 CHECK (tax_minor >= 0),
  description              text CHECK (length(description) <= 500),
  hosted_invoice_url       text CHECK (length(hosted_invoice_url) <= 2000),
  invoice_pdf              text CHECK (length(invoice_pdf) <= 2000),
  created_at               timestamptz NOT NULL,
  paid_at                  timestamptz
);
CREATE INDEX payment_invoices_account_idx ON billing.payment_invoices (account_id, created_at);
CREATE INDEX payment_invoices_payment_intent_idx ON billing.payment_invoices (stripe_payment_intent_id);
COMMENT ON TABLE billing.payment_invoices IS
  'Invoices of one-time payments (bundles bought through Checkout with invoice_creation), from their invoice.paid, once each: the customer''s record of the purchase (number, PDF, hosted page, tax). The money itself is billing.payments'' (this table is not revenue: nothing is counted twice).';
COMMENT ON COLUMN billing.payment_invoices.amount_paid_minor IS 'What the invoice collected (tax included), in minor currency units.';
COMMENT ON COLUMN billing.payment_invoices.tax_minor IS 'Its tax (the sum of total_taxes), in minor units.';
