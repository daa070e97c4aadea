-- GENERATED: do not edit. `make schema` (pgtally db upgrade && pgtally db schema --write) writes it
-- from what sql/migrations, sql/functions and sql/views build; tests/sql/test_schema.py fails when it
-- drifts. For reading, not for restoring: schemas and domains, then each table with its comments,
-- constraints, indexes, triggers and grants, then the views, then the functions.
-- PostgreSQL 18: another major version deparses views and functions differently

----------------------------------------------------------------------------------------------------
-- Schemas, domains and default privileges
----------------------------------------------------------------------------------------------------
CREATE SCHEMA api;

COMMENT ON SCHEMA api IS 'pgtally entry points: SECURITY DEFINER functions, the only thing the server role may touch.';

GRANT USAGE ON SCHEMA api TO pgtally_api;

CREATE SCHEMA billing;

COMMENT ON SCHEMA billing IS 'pgtally plan catalog: plans and their per-meter entitlements.';

CREATE SCHEMA identity;

COMMENT ON SCHEMA identity IS 'pgtally accounts and the principals that act on them (API keys).';

CREATE SCHEMA ledger;

COMMENT ON SCHEMA ledger IS 'pgtally double-entry credit ledger: transfers and their entries.';

CREATE SCHEMA metering;

COMMENT ON SCHEMA metering IS 'pgtally meters (with their rate cards), allowance usage and usage events.';

CREATE SCHEMA ops;

COMMENT ON SCHEMA ops IS 'pgtally operations: alert state.';

GRANT USAGE ON SCHEMA ops TO pgtally_analyst;

CREATE SCHEMA outbox;

COMMENT ON SCHEMA outbox IS 'pgtally outbox: messages written by the transaction that caused them, delivered by pgtally worker.';

CREATE SCHEMA reporting;

COMMENT ON SCHEMA reporting IS 'pgtally read-only views for DBAs and the analyst role (reconciliation, usage).';

GRANT USAGE ON SCHEMA reporting TO pgtally_analyst;

CREATE SCHEMA util;

COMMENT ON SCHEMA util IS 'pgtally helpers shared by every domain (clock, ids, units, errors).';

CREATE DOMAIN identity.account_kind AS text
	CONSTRAINT account_kind_check CHECK ((VALUE = ANY (ARRAY['person'::text, 'team'::text, 'device'::text, 'service'::text])));

COMMENT ON DOMAIN identity.account_kind IS 'What an account is: person, team, device (an anonymous install) or service.';

CREATE DOMAIN identity.account_name AS text;

COMMENT ON DOMAIN identity.account_name IS 'An account''s display name: at most 200 characters (checked on new values since 0006).';

CREATE DOMAIN identity.device_fingerprint AS text
	CONSTRAINT device_fingerprint_check CHECK (((length(VALUE) >= 1) AND (length(VALUE) <= 256)));

COMMENT ON DOMAIN identity.device_fingerprint IS 'A device''s fingerprint as its client sends it: 1 to 256 characters.';

CREATE DOMAIN ledger.amount_micros AS bigint
	CONSTRAINT amount_micros_check CHECK ((VALUE <> 0));

COMMENT ON DOMAIN ledger.amount_micros IS 'A ledger transfer''s or entry''s signed amount in micro-credits: never zero.';

CREATE DOMAIN ledger.lot_source AS text
	CONSTRAINT lot_source_check CHECK ((VALUE = ANY (ARRAY['purchase'::text, 'subscription_grant'::text, 'signup_bonus'::text, 'monthly_free'::text, 'referral_reward'::text, 'promotion'::text, 'adjustment'::text, 'reversal'::text])));

COMMENT ON DOMAIN ledger.lot_source IS 'Where a credit lot came from; reversal: credits a reversed charge gave back whose lot had expired since (metering.reversal_lot_days() to spend them).';

CREATE DOMAIN ledger.lot_status AS text
	CONSTRAINT lot_status_check CHECK ((VALUE = ANY (ARRAY['pending'::text, 'active'::text, 'expired'::text, 'canceled'::text])));

COMMENT ON DOMAIN ledger.lot_status IS 'A credit lot''s state: pending (held back), active (spendable), expired, canceled.';

CREATE DOMAIN ledger.memo AS text;

COMMENT ON DOMAIN ledger.memo IS 'A ledger transfer''s memo: at most 500 characters (checked on new values since 0006).';

CREATE DOMAIN ledger.transfer_kind AS text
	CONSTRAINT transfer_kind_check CHECK ((VALUE = ANY (ARRAY['grant'::text, 'usage'::text, 'purchase'::text, 'adjustment'::text, 'plan_credits'::text, 'refund'::text, 'signup_bonus'::text, 'monthly_free'::text, 'referral_reward'::text, 'expiry'::text, 'reversal'::text])));

COMMENT ON DOMAIN ledger.transfer_kind IS 'Why credits moved: the kind of a ledger transfer.';

CREATE DOMAIN metering.event_metadata AS jsonb
	CONSTRAINT event_metadata_check CHECK (((jsonb_typeof(VALUE) = 'object'::text) AND (length((VALUE)::text) <= 2048)));

COMMENT ON DOMAIN metering.event_metadata IS 'A caller''s metadata for a usage event: a JSON object of at most 2 KB (as text).';

CREATE DOMAIN metering.warnings AS jsonb
	CONSTRAINT warnings_check CHECK ((jsonb_typeof(VALUE) = 'array'::text));

COMMENT ON DOMAIN metering.warnings IS 'The threshold warnings of a charge: a JSON array.';

CREATE DOMAIN util.count AS bigint
	CONSTRAINT count_check CHECK ((VALUE >= 0));

COMMENT ON DOMAIN util.count IS 'A count of units or tokens: never negative.';

CREATE DOMAIN util.currency AS text
	CONSTRAINT currency_check CHECK ((VALUE ~ '^[a-z]{3}$'::text));

COMMENT ON DOMAIN util.currency IS 'A currency as Stripe writes it: three lower-case letters (ISO 4217, https://docs.stripe.com/currencies).';

CREATE DOMAIN util.idempotency_key AS text
	CONSTRAINT idempotency_key_check CHECK (((length(VALUE) >= 1) AND (length(VALUE) <= 255)));

COMMENT ON DOMAIN util.idempotency_key IS 'An idempotency key (or a grant key): 1 to 255 characters.';

CREATE DOMAIN util.micro_credits AS bigint
	CONSTRAINT micro_credits_check CHECK ((VALUE >= 0));

COMMENT ON DOMAIN util.micro_credits IS 'An amount of credits in micro-credits (1 credit = 1,000,000): never negative.';

CREATE DOMAIN util.minor_units AS bigint
	CONSTRAINT minor_units_check CHECK ((VALUE >= 0));

COMMENT ON DOMAIN util.minor_units IS 'An amount of money in minor currency units (cents): never negative.';

CREATE DOMAIN util.note AS text
	CONSTRAINT note_check CHECK ((length(VALUE) <= 500));

COMMENT ON DOMAIN util.note IS 'Free text of at most 500 characters: a memo, a reason.';

CREATE DOMAIN util.quantity AS bigint
	CONSTRAINT quantity_check CHECK ((VALUE > 0));

COMMENT ON DOMAIN util.quantity IS 'How many units a usage event or hold is for: at least 1.';

ALTER DEFAULT PRIVILEGES FOR ROLE <owner> REVOKE ALL ON FUNCTIONS FROM PUBLIC;

----------------------------------------------------------------------------------------------------
-- Tables
----------------------------------------------------------------------------------------------------
CREATE TABLE billing.auto_topups (
    account_id uuid NOT NULL,
    below_micros bigint NOT NULL,
    price_id text NOT NULL,
    enabled boolean DEFAULT true NOT NULL,
    failures integer DEFAULT 0 NOT NULL,
    in_flight_since timestamp with time zone,
    last_error text,
    updated_at timestamp with time zone NOT NULL,
    task_id uuid,
    stripe_payment_intent_id text,
    CONSTRAINT auto_topups_below_micros_check CHECK ((below_micros >= 0)),
    CONSTRAINT auto_topups_failures_check CHECK ((failures >= 0)),
    CONSTRAINT auto_topups_last_error_check CHECK ((length(last_error) <= 1000)),
    CONSTRAINT auto_topups_stripe_payment_intent_id_check CHECK ((length(stripe_payment_intent_id) <= 255))
);

COMMENT ON TABLE billing.auto_topups IS 'Auto top-up settings: buy price_id (a bundle) with the saved card when a charge leaves the balance below below_micros. in_flight_since: a top-up is queued or being paid (never two at once); cleared by its payment_intent.succeeded, or by a failure (3 failures turn it off and email the user).';

COMMENT ON COLUMN billing.auto_topups.task_id IS 'The outbox task (outbox.messages.id, kind auto_topup) of the top-up in flight: only that task may pay, and Stripe''s idempotency key is auto-topup-<task_id>. NULL when none is in flight.';

COMMENT ON COLUMN billing.auto_topups.stripe_payment_intent_id IS 'The PaymentIntent the worker created for the top-up in flight (or the last one), as Stripe answered it.';

ALTER TABLE ONLY billing.auto_topups
    ADD CONSTRAINT auto_topups_pkey PRIMARY KEY (account_id);

ALTER TABLE ONLY billing.auto_topups
    ADD CONSTRAINT auto_topups_account_id_fkey FOREIGN KEY (account_id) REFERENCES identity.accounts(id);

ALTER TABLE ONLY billing.auto_topups
    ADD CONSTRAINT auto_topups_price_id_fkey FOREIGN KEY (price_id) REFERENCES billing.prices(id);

CREATE TABLE billing.checkout_sessions (
    stripe_checkout_session_id text NOT NULL,
    account_id uuid NOT NULL,
    mode text NOT NULL,
    price_id text,
    status text DEFAULT 'open'::text NOT NULL,
    created_at timestamp with time zone NOT NULL,
    closed_at timestamp with time zone,
    CONSTRAINT checkout_sessions_mode_check CHECK ((mode = ANY (ARRAY['payment'::text, 'subscription'::text, 'setup'::text]))),
    CONSTRAINT checkout_sessions_status_check CHECK ((status = ANY (ARRAY['open'::text, 'complete'::text, 'expired'::text]))),
    CONSTRAINT checkout_sessions_stripe_checkout_session_id_check CHECK ((length(stripe_checkout_session_id) <= 255))
);

COMMENT ON TABLE billing.checkout_sessions IS 'Stripe Checkout Sessions pgtally opened (api.checkout_opened): at most one subscription session per account is open; opening another expires the older one (here, and at Stripe by the server). checkout.session.completed and .expired close them.';

COMMENT ON COLUMN billing.checkout_sessions.status IS 'open; complete (paid: checkout.session.completed); expired (a newer one replaced it, or Stripe expired it after 24 hours).';

ALTER TABLE ONLY billing.checkout_sessions
    ADD CONSTRAINT checkout_sessions_pkey PRIMARY KEY (stripe_checkout_session_id);

CREATE INDEX checkout_sessions_open_idx ON billing.checkout_sessions USING btree (account_id) WHERE (status = 'open'::text);

ALTER TABLE ONLY billing.checkout_sessions
    ADD CONSTRAINT checkout_sessions_account_id_fkey FOREIGN KEY (account_id) REFERENCES identity.accounts(id);

ALTER TABLE ONLY billing.checkout_sessions
    ADD CONSTRAINT checkout_sessions_price_id_fkey FOREIGN KEY (price_id) REFERENCES billing.prices(id);

CREATE TABLE billing.customers (
    account_id uuid NOT NULL,
    stripe_customer_id text NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL
);

COMMENT ON TABLE billing.customers IS 'The Stripe Customer (cus_...) of an account, one each.';

ALTER TABLE ONLY billing.customers
    ADD CONSTRAINT customers_pkey PRIMARY KEY (account_id);

ALTER TABLE ONLY billing.customers
    ADD CONSTRAINT customers_stripe_customer_id_key UNIQUE (stripe_customer_id);

ALTER TABLE billing.customers
    ADD CONSTRAINT customers_stripe_customer_id_length CHECK (((length(stripe_customer_id) >= 1) AND (length(stripe_customer_id) <= 255))) NOT VALID;

ALTER TABLE ONLY billing.customers
    ADD CONSTRAINT customers_account_id_fkey FOREIGN KEY (account_id) REFERENCES identity.accounts(id);

CREATE TABLE billing.disputes (
    stripe_dispute_id text NOT NULL,
    account_id uuid,
    stripe_charge_id text,
    stripe_payment_intent_id text,
    amount_minor bigint NOT NULL,
    currency text NOT NULL,
    reason text,
    status text NOT NULL,
    created_at timestamp with time zone NOT NULL,
    closed_at timestamp with time zone,
    CONSTRAINT disputes_amount_minor_check CHECK ((amount_minor >= 0)),
    CONSTRAINT disputes_currency_check CHECK ((currency ~ '^[a-z]{3}$'::text)),
    CONSTRAINT disputes_reason_check CHECK ((length(reason) <= 100)),
    CONSTRAINT disputes_status_check CHECK ((length(status) <= 50)),
    CONSTRAINT disputes_stripe_charge_id_check CHECK ((length(stripe_charge_id) <= 255)),
    CONSTRAINT disputes_stripe_dispute_id_check CHECK ((length(stripe_dispute_id) <= 255)),
    CONSTRAINT disputes_stripe_payment_intent_id_check CHECK ((length(stripe_payment_intent_id) <= 255))
);

COMMENT ON TABLE billing.disputes IS 'Chargebacks (charge.dispute.created, .updated, .closed), once per dispute, with Stripe''s latest status (won, lost, needs_response...). A lost dispute is money out, like a refund.';

ALTER TABLE ONLY billing.disputes
    ADD CONSTRAINT disputes_pkey PRIMARY KEY (stripe_dispute_id);

ALTER TABLE ONLY billing.disputes
    ADD CONSTRAINT disputes_account_id_fkey FOREIGN KEY (account_id) REFERENCES identity.accounts(id);

CREATE TABLE billing.duplicate_subscriptions (
    stripe_subscription_id text NOT NULL,
    account_id uuid NOT NULL,
    kept_subscription_id text NOT NULL,
    detected_at timestamp with time zone NOT NULL,
    canceled_at timestamp with time zone,
    refunded_minor bigint DEFAULT 0 NOT NULL,
    currency text,
    CONSTRAINT duplicate_subscriptions_currency_check CHECK ((currency ~ '^[a-z]{3}$'::text)),
    CONSTRAINT duplicate_subscriptions_kept_subscription_id_check CHECK ((length(kept_subscription_id) <= 255)),
    CONSTRAINT duplicate_subscriptions_refunded_minor_check CHECK ((refunded_minor >= 0)),
    CONSTRAINT duplicate_subscriptions_stripe_subscription_id_check CHECK ((length(stripe_subscription_id) <= 255))
);

COMMENT ON TABLE billing.duplicate_subscriptions IS 'A second live subscription of an account that already had one (two Checkouts paid at once): it never sets the plan or grants credits; the worker cancels it at Stripe at once and refunds what its invoices charged (task cancel_duplicate_subscription), and the customer is emailed (subscription_duplicate). Why: Stripe bills every live subscription.';

COMMENT ON COLUMN billing.duplicate_subscriptions.kept_subscription_id IS 'The account''s live subscription it duplicated, which stays.';

COMMENT ON COLUMN billing.duplicate_subscriptions.canceled_at IS 'When the worker had it canceled at Stripe and refunded.';

COMMENT ON COLUMN billing.duplicate_subscriptions.refunded_minor IS 'What the worker asked Stripe to refund of its invoices, in minor currency units.';

ALTER TABLE ONLY billing.duplicate_subscriptions
    ADD CONSTRAINT duplicate_subscriptions_pkey PRIMARY KEY (stripe_subscription_id);

ALTER TABLE ONLY billing.duplicate_subscriptions
    ADD CONSTRAINT duplicate_subscriptions_account_id_fkey FOREIGN KEY (account_id) REFERENCES identity.accounts(id);

CREATE TABLE billing.entitlements (
    plan_id text NOT NULL,
    meter_id text NOT NULL,
    kind text NOT NULL,
    period text NOT NULL,
    limit_units bigint,
    unit_amount_minor bigint,
    stripe_meter_event text,
    CONSTRAINT entitlements_check CHECK (((kind = ANY (ARRAY['unlimited'::text, 'post_paid'::text])) = (limit_units IS NULL))),
    CONSTRAINT entitlements_kind_check CHECK ((kind = ANY (ARRAY['allowance'::text, 'unlimited'::text, 'fair_use'::text, 'post_paid'::text]))),
    CONSTRAINT entitlements_limit_units_check CHECK ((limit_units >= 0)),
    CONSTRAINT entitlements_period_check CHECK ((period = ANY (ARRAY['day'::text, 'month'::text, 'billing_period'::text]))),
    CONSTRAINT entitlements_post_paid CHECK (((kind = 'post_paid'::text) = ((unit_amount_minor IS NOT NULL) AND (stripe_meter_event IS NOT NULL)))),
    CONSTRAINT entitlements_stripe_meter_event_check CHECK ((stripe_meter_event ~ '^[A-Za-z0-9_.:-]{1,100}$'::text)),
    CONSTRAINT entitlements_unit_amount_minor_check CHECK ((unit_amount_minor >= 0))
);

COMMENT ON TABLE billing.entitlements IS 'What a plan grants per meter and period. allowance: limit_units free per period, then credits at the meter rate, refused when neither covers. unlimited: never charged. fair_use: limit_units is a soft limit that warns at 80% and 100% and never blocks or charges.';

COMMENT ON COLUMN billing.entitlements.period IS 'day: resets at midnight UTC. month: resets on the 1st at midnight UTC. billing_period: the account''s subscription period, a calendar month until one is set.';

COMMENT ON COLUMN billing.entitlements.limit_units IS 'Allowance or soft limit per period, in allowance units: meter units for pricing=unit, micro-credits of cost for pricing=tokens. NULL for unlimited.';

COMMENT ON COLUMN billing.entitlements.unit_amount_minor IS 'post_paid: the price of one meter unit in minor currency units (cents), billed after the fact by Stripe.';

COMMENT ON COLUMN billing.entitlements.stripe_meter_event IS 'post_paid: the event_name of the Stripe Billing Meter each usage event is reported to (https://docs.stripe.com/api/billing/meter-event/create).';

ALTER TABLE ONLY billing.entitlements
    ADD CONSTRAINT entitlements_pkey PRIMARY KEY (plan_id, meter_id);

ALTER TABLE ONLY billing.entitlements
    ADD CONSTRAINT entitlements_meter_id_fkey FOREIGN KEY (meter_id) REFERENCES metering.meters(id);

ALTER TABLE ONLY billing.entitlements
    ADD CONSTRAINT entitlements_plan_id_fkey FOREIGN KEY (plan_id) REFERENCES billing.plans(id) ON DELETE CASCADE;

CREATE TABLE billing.invoice_payments (
    stripe_invoice_payment_id text NOT NULL,
    stripe_invoice_id text NOT NULL,
    account_id uuid NOT NULL,
    stripe_payment_intent_id text,
    stripe_charge_id text,
    amount_minor bigint NOT NULL,
    refunded_minor bigint DEFAULT 0 NOT NULL,
    currency text NOT NULL,
    paid_at timestamp with time zone,
    CONSTRAINT invoice_payments_amount_minor_check CHECK ((amount_minor >= 0)),
    CONSTRAINT invoice_payments_currency_check CHECK ((currency ~ '^[a-z]{3}$'::text)),
    CONSTRAINT invoice_payments_refunded_minor_check CHECK ((refunded_minor >= 0)),
    CONSTRAINT invoice_payments_stripe_charge_id_check CHECK ((length(stripe_charge_id) <= 255)),
    CONSTRAINT invoice_payments_stripe_invoice_id_check CHECK ((length(stripe_invoice_id) <= 255)),
    CONSTRAINT invoice_payments_stripe_invoice_payment_id_check CHECK ((length(stripe_invoice_payment_id) <= 255)),
    CONSTRAINT invoice_payments_stripe_payment_intent_id_check CHECK ((length(stripe_payment_intent_id) <= 255))
);

COMMENT ON TABLE billing.invoice_payments IS 'Stripe InvoicePayments (API 2025-03-31 on): which PaymentIntent or Charge paid which subscription invoice, from invoice.paid''s payments list or an invoice_payment.paid event, once each. How a charge.refunded or charge.dispute.* of a subscription payment finds its invoice and account (neither object names them).';

COMMENT ON COLUMN billing.invoice_payments.stripe_payment_intent_id IS 'The PaymentIntent that paid it (payment.payment_intent), when the payment was one.';

COMMENT ON COLUMN billing.invoice_payments.stripe_charge_id IS 'The Charge that paid it: payment.charge, or learnt from the first charge.refunded of its PaymentIntent.';

COMMENT ON COLUMN billing.invoice_payments.amount_minor IS 'What this payment paid of the invoice (amount_paid), in minor currency units.';

COMMENT ON COLUMN billing.invoice_payments.refunded_minor IS 'What charge.refunded events took back of this payment (the charge''s amount_refunded), in minor units.';

ALTER TABLE ONLY billing.invoice_payments
    ADD CONSTRAINT invoice_payments_pkey PRIMARY KEY (stripe_invoice_payment_id);

CREATE INDEX invoice_payments_charge_idx ON billing.invoice_payments USING btree (stripe_charge_id);

CREATE INDEX invoice_payments_invoice_idx ON billing.invoice_payments USING btree (stripe_invoice_id);

CREATE INDEX invoice_payments_payment_intent_idx ON billing.invoice_payments USING btree (stripe_payment_intent_id);

ALTER TABLE ONLY billing.invoice_payments
    ADD CONSTRAINT invoice_payments_account_id_fkey FOREIGN KEY (account_id) REFERENCES identity.accounts(id);

CREATE TABLE billing.invoices (
    stripe_invoice_id text NOT NULL,
    account_id uuid NOT NULL,
    stripe_subscription_id text,
    number text,
    status text NOT NULL,
    currency text NOT NULL,
    amount_paid_minor bigint NOT NULL,
    metered_amount_minor bigint DEFAULT 0 NOT NULL,
    metered_period_start timestamp with time zone,
    metered_period_end timestamp with time zone,
    hosted_invoice_url text,
    invoice_pdf text,
    created_at timestamp with time zone NOT NULL,
    tax_minor bigint DEFAULT 0 NOT NULL,
    plan_id text,
    period_start timestamp with time zone,
    period_end timestamp with time zone,
    refunded_minor bigint DEFAULT 0 NOT NULL,
    paid_at timestamp with time zone,
    CONSTRAINT invoices_amount_paid_minor_check CHECK ((amount_paid_minor >= 0)),
    CONSTRAINT invoices_currency_check CHECK ((currency ~ '^[a-z]{3}$'::text)),
    CONSTRAINT invoices_hosted_invoice_url_check CHECK ((length(hosted_invoice_url) <= 2000)),
    CONSTRAINT invoices_invoice_pdf_check CHECK ((length(invoice_pdf) <= 2000)),
    CONSTRAINT invoices_metered_amount_minor_check CHECK ((metered_amount_minor >= 0)),
    CONSTRAINT invoices_number_check CHECK ((length(number) <= 255)),
    CONSTRAINT invoices_refunded_minor_check CHECK ((refunded_minor >= 0)),
    CONSTRAINT invoices_status_check CHECK ((status = ANY (ARRAY['draft'::text, 'open'::text, 'paid'::text, 'uncollectible'::text, 'void'::text, 'refunded'::text]))),
    CONSTRAINT invoices_stripe_invoice_id_check CHECK ((length(stripe_invoice_id) <= 255)),
    CONSTRAINT invoices_tax_minor_check CHECK ((tax_minor >= 0))
);

COMMENT ON TABLE billing.invoices IS 'Subscription invoices Stripe reported paid (invoice.paid), once per invoice. metered_*: the lines that bill metered prices (post-paid usage) and the period they cover.';

COMMENT ON COLUMN billing.invoices.status IS 'paid; open (its payment failed and Stripe is retrying); refunded (paid, then refunded in full: it leaves the revenue views).';

COMMENT ON COLUMN billing.invoices.amount_paid_minor IS 'What the invoice collected, in minor currency units.';

COMMENT ON COLUMN billing.invoices.metered_amount_minor IS 'The sum of its metered lines (usage reported through Billing Meters), in minor units.';

COMMENT ON COLUMN billing.invoices.tax_minor IS 'Tax on the invoice, in minor units (Stripe''s total_taxes, or tax on older API versions).';

COMMENT ON COLUMN billing.invoices.refunded_minor IS 'What charge.refunded events took back of this invoice''s payment, in minor units.';

COMMENT ON COLUMN billing.invoices.paid_at IS 'When Stripe reported it paid (the invoice.paid event''s time).';

ALTER TABLE ONLY billing.invoices
    ADD CONSTRAINT invoices_pkey PRIMARY KEY (stripe_invoice_id);

CREATE INDEX invoices_account_idx ON billing.invoices USING btree (account_id, created_at);

ALTER TABLE ONLY billing.invoices
    ADD CONSTRAINT invoices_account_id_fkey FOREIGN KEY (account_id) REFERENCES identity.accounts(id);

ALTER TABLE ONLY billing.invoices
    ADD CONSTRAINT invoices_plan_id_fkey FOREIGN KEY (plan_id) REFERENCES billing.plans(id);

ALTER TABLE ONLY billing.invoices
    ADD CONSTRAINT invoices_stripe_subscription_id_fkey FOREIGN KEY (stripe_subscription_id) REFERENCES billing.subscriptions(stripe_subscription_id);

CREATE TABLE billing.meter_error_reports (
    stripe_event_id text NOT NULL,
    stripe_meter_id text,
    error_count integer NOT NULL,
    summary text,
    error_types jsonb DEFAULT '[]'::jsonb NOT NULL,
    identifiers text[] DEFAULT '{}'::text[] NOT NULL,
    validation_start timestamp with time zone,
    validation_end timestamp with time zone,
    received_at timestamp with time zone NOT NULL,
    CONSTRAINT meter_error_reports_error_count_check CHECK ((error_count >= 0)),
    CONSTRAINT meter_error_reports_stripe_event_id_check CHECK ((length(stripe_event_id) <= 255)),
    CONSTRAINT meter_error_reports_stripe_meter_id_check CHECK ((length(stripe_meter_id) <= 255)),
    CONSTRAINT meter_error_reports_summary_check CHECK ((length(summary) <= 2000))
);

COMMENT ON TABLE billing.meter_error_reports IS 'Stripe''s v1.billing.meter.error_report_triggered events: meter events it accepted and then rejected in a validation window (an unknown customer, a timestamp too old, a bad value...). Source: https://docs.stripe.com/billing/subscriptions/usage-based/recording-usage#handle-meter-event-errors.';

COMMENT ON COLUMN billing.meter_error_reports.error_count IS 'How many meter events Stripe rejected in the window (reason.error_count).';

COMMENT ON COLUMN billing.meter_error_reports.error_types IS 'reason.error_types as Stripe sent them: [{code, error_count, sample_errors: [{error_message, request: {identifier}}]}].';

COMMENT ON COLUMN billing.meter_error_reports.identifiers IS 'The identifiers of the sample rejected meter events (pgtally sends the usage event id): a sample, not every one.';

ALTER TABLE ONLY billing.meter_error_reports
    ADD CONSTRAINT meter_error_reports_pkey PRIMARY KEY (stripe_event_id);

CREATE TABLE billing.meter_event_summaries (
    account_id uuid NOT NULL,
    event_name text NOT NULL,
    day date NOT NULL,
    stripe_units numeric NOT NULL,
    checked_at timestamp with time zone NOT NULL,
    CONSTRAINT meter_event_summaries_event_name_check CHECK ((length(event_name) <= 100))
);

COMMENT ON TABLE billing.meter_event_summaries IS 'What Stripe counted of an account''s meter events per meter and UTC day (GET /v1/billing/meters/:id/event_summaries, aggregated_value), read once by the worker after the day ended, for the days pgtally reported usage.';

COMMENT ON COLUMN billing.meter_event_summaries.stripe_units IS 'Stripe''s aggregated_value for the day: units (the meter sums the values pgtally sent).';

ALTER TABLE ONLY billing.meter_event_summaries
    ADD CONSTRAINT meter_event_summaries_pkey PRIMARY KEY (account_id, event_name, day);

ALTER TABLE ONLY billing.meter_event_summaries
    ADD CONSTRAINT meter_event_summaries_account_id_fkey FOREIGN KEY (account_id) REFERENCES identity.accounts(id);

CREATE TABLE billing.mrr_changes (
    id bigint NOT NULL,
    account_id uuid NOT NULL,
    at timestamp with time zone NOT NULL,
    currency text NOT NULL,
    mrr_minor numeric(20,4) NOT NULL,
    plan_id text,
    CONSTRAINT mrr_changes_currency_check CHECK ((currency ~ '^[a-z]{3}$'::text)),
    CONSTRAINT mrr_changes_mrr_minor_check CHECK ((mrr_minor >= (0)::numeric))
);

COMMENT ON TABLE billing.mrr_changes IS 'Each change of an account''s monthly recurring revenue, at the time of the Stripe event that made it: the sum of its live (active or past_due) licensed subscription prices, yearly ones divided by 12 (hence numeric: an analytic, not money that moves). Metered prices bill usage, not MRR. Written by billing.record_mrr when a subscription event changes it.';

ALTER TABLE billing.mrr_changes ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME billing.mrr_changes_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

ALTER TABLE ONLY billing.mrr_changes
    ADD CONSTRAINT mrr_changes_pkey PRIMARY KEY (id);

CREATE INDEX mrr_changes_account_idx ON billing.mrr_changes USING btree (account_id, at DESC, id DESC);

ALTER TABLE ONLY billing.mrr_changes
    ADD CONSTRAINT mrr_changes_account_id_fkey FOREIGN KEY (account_id) REFERENCES identity.accounts(id);

ALTER TABLE ONLY billing.mrr_changes
    ADD CONSTRAINT mrr_changes_plan_id_fkey FOREIGN KEY (plan_id) REFERENCES billing.plans(id);

CREATE TABLE billing.payment_invoices (
    stripe_invoice_id text NOT NULL,
    account_id uuid NOT NULL,
    stripe_payment_intent_id text,
    number text,
    status text NOT NULL,
    currency text NOT NULL,
    amount_paid_minor bigint NOT NULL,
    tax_minor bigint DEFAULT 0 NOT NULL,
    description text,
    hosted_invoice_url text,
    invoice_pdf text,
    created_at timestamp with time zone NOT NULL,
    paid_at timestamp with time zone,
    CONSTRAINT payment_invoices_amount_paid_minor_check CHECK ((amount_paid_minor >= 0)),
    CONSTRAINT payment_invoices_currency_check CHECK ((currency ~ '^[a-z]{3}$'::text)),
    CONSTRAINT payment_invoices_description_check CHECK ((length(description) <= 500)),
    CONSTRAINT payment_invoices_hosted_invoice_url_check CHECK ((length(hosted_invoice_url) <= 2000)),
    CONSTRAINT payment_invoices_invoice_pdf_check CHECK ((length(invoice_pdf) <= 2000)),
    CONSTRAINT payment_invoices_number_check CHECK ((length(number) <= 255)),
    CONSTRAINT payment_invoices_status_check CHECK ((status = ANY (ARRAY['paid'::text, 'open'::text, 'void'::text, 'uncollectible'::text]))),
    CONSTRAINT payment_invoices_stripe_invoice_id_check CHECK ((length(stripe_invoice_id) <= 255)),
    CONSTRAINT payment_invoices_stripe_payment_intent_id_check CHECK ((length(stripe_payment_intent_id) <= 255)),
    CONSTRAINT payment_invoices_tax_minor_check CHECK ((tax_minor >= 0))
);

COMMENT ON TABLE billing.payment_invoices IS 'Invoices of one-time payments (bundles bought through Checkout with invoice_creation), from their invoice.paid, once each: the customer''s record of the purchase (number, PDF, hosted page, tax). The money itself is billing.payments'' (this table is not revenue: nothing is counted twice).';

COMMENT ON COLUMN billing.payment_invoices.amount_paid_minor IS 'What the invoice collected (tax included), in minor currency units.';

COMMENT ON COLUMN billing.payment_invoices.tax_minor IS 'Its tax (the sum of total_taxes), in minor units.';

ALTER TABLE ONLY billing.payment_invoices
    ADD CONSTRAINT payment_invoices_pkey PRIMARY KEY (stripe_invoice_id);

CREATE INDEX payment_invoices_account_idx ON billing.payment_invoices USING btree (account_id, created_at);

CREATE INDEX payment_invoices_payment_intent_idx ON billing.payment_invoices USING btree (stripe_payment_intent_id);

ALTER TABLE ONLY billing.payment_invoices
    ADD CONSTRAINT payment_invoices_account_id_fkey FOREIGN KEY (account_id) REFERENCES identity.accounts(id);

CREATE TABLE billing.payments (
    stripe_payment_intent_id text NOT NULL,
    account_id uuid NOT NULL,
    stripe_checkout_session text,
    price_id text,
    amount_minor bigint NOT NULL,
    currency text NOT NULL,
    credits_micros bigint NOT NULL,
    refunded_minor bigint DEFAULT 0 NOT NULL,
    clawed_back_micros bigint DEFAULT 0 NOT NULL,
    shortfall_micros bigint DEFAULT 0 NOT NULL,
    paid_at timestamp with time zone NOT NULL,
    tax_minor bigint DEFAULT 0 NOT NULL,
    CONSTRAINT payments_amount_minor_check CHECK ((amount_minor >= 0)),
    CONSTRAINT payments_clawed_back_micros_check CHECK ((clawed_back_micros >= 0)),
    CONSTRAINT payments_credits_micros_check CHECK ((credits_micros >= 0)),
    CONSTRAINT payments_refunded_minor_check CHECK ((refunded_minor >= 0)),
    CONSTRAINT payments_shortfall_micros_check CHECK ((shortfall_micros >= 0)),
    CONSTRAINT payments_tax_minor_check CHECK ((tax_minor >= 0))
);

COMMENT ON TABLE billing.payments IS 'One-time payments for credit bundles. Refunds claw back credits in proportion, never below a zero balance: what could not be taken back is recorded in shortfall_micros.';

COMMENT ON COLUMN billing.payments.stripe_checkout_session IS 'The Checkout Session that sold it; NULL for a one-click top-up (an off-session PaymentIntent with a saved card).';

COMMENT ON COLUMN billing.payments.tax_minor IS 'The tax Stripe Tax added to the payment (the Checkout Session''s total_details.amount_tax), in minor units; amount_minor includes it.';

ALTER TABLE billing.payments
    ADD CONSTRAINT payments_currency_shape CHECK ((currency ~ '^[a-z]{3}$'::text)) NOT VALID;

ALTER TABLE billing.payments
    ADD CONSTRAINT payments_id_length CHECK (((length(stripe_payment_intent_id) >= 1) AND (length(stripe_payment_intent_id) <= 255))) NOT VALID;

ALTER TABLE ONLY billing.payments
    ADD CONSTRAINT payments_pkey PRIMARY KEY (stripe_payment_intent_id);

ALTER TABLE billing.payments
    ADD CONSTRAINT payments_session_length CHECK ((length(stripe_checkout_session) <= 255)) NOT VALID;

ALTER TABLE ONLY billing.payments
    ADD CONSTRAINT payments_stripe_checkout_session_key UNIQUE (stripe_checkout_session);

CREATE INDEX payments_account_id_idx ON billing.payments USING btree (account_id);

ALTER TABLE ONLY billing.payments
    ADD CONSTRAINT payments_account_id_fkey FOREIGN KEY (account_id) REFERENCES identity.accounts(id);

ALTER TABLE ONLY billing.payments
    ADD CONSTRAINT payments_price_id_fkey FOREIGN KEY (price_id) REFERENCES billing.prices(id);

CREATE TABLE billing.plans (
    id text NOT NULL,
    name text NOT NULL,
    description text DEFAULT ''::text NOT NULL,
    features jsonb DEFAULT '[]'::jsonb NOT NULL,
    active boolean DEFAULT true NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    included_credits_micros bigint DEFAULT 0 NOT NULL,
    spending_limit_minor bigint,
    signup_bonus_micros bigint DEFAULT 0 NOT NULL,
    monthly_credits_micros bigint DEFAULT 0 NOT NULL,
    CONSTRAINT plans_features_check CHECK ((jsonb_typeof(features) = 'array'::text)),
    CONSTRAINT plans_id_check CHECK ((id ~ '^[a-z][a-z0-9_]{0,62}$'::text)),
    CONSTRAINT plans_included_credits_micros_check CHECK ((included_credits_micros >= 0)),
    CONSTRAINT plans_monthly_credits_micros_check CHECK ((monthly_credits_micros >= 0)),
    CONSTRAINT plans_signup_bonus_micros_check CHECK ((signup_bonus_micros >= 0)),
    CONSTRAINT plans_spending_limit_minor_check CHECK ((spending_limit_minor >= 0))
);

COMMENT ON TABLE billing.plans IS 'Plans of the catalog (loaded from the catalog file by api.load_catalog). A plan absent from the last loaded file is inactive: existing accounts keep it, new accounts cannot take it.';

COMMENT ON COLUMN billing.plans.id IS 'Stable plan code, for example free, pro, unlimited.';

COMMENT ON COLUMN billing.plans.features IS 'Marketing feature list (JSON array of strings) shown by clients.';

COMMENT ON COLUMN billing.plans.included_credits_micros IS 'Credits granted at the start of every paid subscription period (on invoice.paid), in micro-credits.';

COMMENT ON COLUMN billing.plans.spending_limit_minor IS 'Post-paid plans: the most their post-paid meters may cost per billing period, in minor currency units (cents) of the plan''s price; a charge past it is refused like an empty balance (TL402). NULL: no limit.';

COMMENT ON COLUMN billing.plans.signup_bonus_micros IS 'Micro-credits granted once per person when they verify their email on this plan (a signup_bonus lot, no expiry).';

COMMENT ON COLUMN billing.plans.monthly_credits_micros IS 'Micro-credits granted every billing period (a calendar month without a subscription) to accounts on this plan, expiring at its end: they reset.';

ALTER TABLE billing.plans
    ADD CONSTRAINT plans_description_length CHECK ((length(description) <= 2000)) NOT VALID;

ALTER TABLE billing.plans
    ADD CONSTRAINT plans_name_length CHECK ((length(name) <= 200)) NOT VALID;

ALTER TABLE ONLY billing.plans
    ADD CONSTRAINT plans_pkey PRIMARY KEY (id);

CREATE TABLE billing.prices (
    id text NOT NULL,
    stripe_price_id text NOT NULL,
    plan_id text,
    "interval" text,
    credits_micros bigint,
    amount_minor bigint NOT NULL,
    currency text NOT NULL,
    name text NOT NULL,
    active boolean DEFAULT true NOT NULL,
    usage_type text DEFAULT 'licensed'::text NOT NULL,
    CONSTRAINT prices_amount_minor_check CHECK ((amount_minor >= 0)),
    CONSTRAINT prices_check CHECK ((((plan_id IS NOT NULL) AND ("interval" IS NOT NULL) AND (credits_micros IS NULL)) OR ((plan_id IS NULL) AND ("interval" IS NULL) AND (credits_micros IS NOT NULL)))),
    CONSTRAINT prices_credits_micros_check CHECK ((credits_micros > 0)),
    CONSTRAINT prices_currency_check CHECK ((currency ~ '^[a-z]{3}$'::text)),
    CONSTRAINT prices_id_check CHECK ((id ~ '^[a-z][a-z0-9_]{0,62}$'::text)),
    CONSTRAINT prices_interval_check CHECK (("interval" = ANY (ARRAY['month'::text, 'year'::text]))),
    CONSTRAINT prices_usage_type_check CHECK ((usage_type = ANY (ARRAY['licensed'::text, 'metered'::text])))
);

COMMENT ON TABLE billing.prices IS 'What can be bought through Stripe Checkout: a plan''s recurring price (monthly or yearly, subscription mode) or a one-time credit bundle (payment mode). Loaded from the catalog file.';

COMMENT ON COLUMN billing.prices.id IS 'pgtally''s price code, for example pro_monthly or bundle_10 (what clients send).';

COMMENT ON COLUMN billing.prices.stripe_price_id IS 'The Stripe Price id (price_...) of this environment.';

COMMENT ON COLUMN billing.prices.credits_micros IS 'For a bundle: the micro-credits a paid checkout grants.';

COMMENT ON COLUMN billing.prices.amount_minor IS 'Price in minor currency units (cents), as Stripe counts.';

COMMENT ON COLUMN billing.prices.usage_type IS 'Stripe''s recurring.usage_type: licensed (a fixed amount per period) or metered (a price on a Billing Meter: Checkout sends no quantity, the invoice bills the period''s reported usage).';

ALTER TABLE billing.prices
    ADD CONSTRAINT prices_name_length CHECK ((length(name) <= 200)) NOT VALID;

ALTER TABLE ONLY billing.prices
    ADD CONSTRAINT prices_pkey PRIMARY KEY (id);

ALTER TABLE ONLY billing.prices
    ADD CONSTRAINT prices_stripe_price_id_key UNIQUE (stripe_price_id);

ALTER TABLE billing.prices
    ADD CONSTRAINT prices_stripe_price_id_length CHECK ((length(stripe_price_id) <= 255)) NOT VALID;

ALTER TABLE ONLY billing.prices
    ADD CONSTRAINT prices_plan_id_fkey FOREIGN KEY (plan_id) REFERENCES billing.plans(id);

CREATE TABLE billing.referral_program (
    singleton boolean DEFAULT true NOT NULL,
    qualify_on text DEFAULT 'first_payment'::text NOT NULL,
    referrer_reward_micros bigint DEFAULT 10000000 NOT NULL,
    referee_reward_micros bigint DEFAULT 0 NOT NULL,
    holdback interval DEFAULT '14 days'::interval NOT NULL,
    monthly_cap integer DEFAULT 20 NOT NULL,
    same_ip_window interval DEFAULT '30 days'::interval NOT NULL,
    CONSTRAINT referral_program_holdback_check CHECK ((holdback >= '00:00:00'::interval)),
    CONSTRAINT referral_program_monthly_cap_check CHECK ((monthly_cap >= 0)),
    CONSTRAINT referral_program_qualify_on_check CHECK ((qualify_on = ANY (ARRAY['email_verified'::text, 'first_payment'::text]))),
    CONSTRAINT referral_program_referee_reward_micros_check CHECK ((referee_reward_micros >= 0)),
    CONSTRAINT referral_program_referrer_reward_micros_check CHECK ((referrer_reward_micros >= 0)),
    CONSTRAINT referral_program_singleton_check CHECK (singleton)
);

COMMENT ON TABLE billing.referral_program IS 'The referral rules (one row, from the catalog''s [referrals] table): the event a referral qualifies on, the referrer''s and referee''s rewards (micro-credits), the holdback before a reward is spendable, the most rewarded referrals per referrer per calendar month, and how long a referrer''s IP counts against a referee signing up from it.';

ALTER TABLE ONLY billing.referral_program
    ADD CONSTRAINT referral_program_pkey PRIMARY KEY (singleton);

CREATE TABLE billing.referrals (
    referee_account_id uuid NOT NULL,
    referrer_account_id uuid NOT NULL,
    referrer_user_id uuid NOT NULL,
    code text NOT NULL,
    status text NOT NULL,
    rejected_reason text,
    signup_ip text,
    signup_fingerprint text,
    qualifying_event text,
    qualifying_ref text,
    referrer_lot_id uuid,
    referee_lot_id uuid,
    created_at timestamp with time zone NOT NULL,
    qualified_at timestamp with time zone,
    rewarded_at timestamp with time zone,
    rejected_at timestamp with time zone,
    CONSTRAINT referrals_check CHECK (((status = 'rejected'::text) = (rejected_reason IS NOT NULL))),
    CONSTRAINT referrals_qualifying_event_check CHECK ((qualifying_event = ANY (ARRAY['email_verified'::text, 'first_payment'::text]))),
    CONSTRAINT referrals_qualifying_ref_check CHECK ((length(qualifying_ref) <= 255)),
    CONSTRAINT referrals_rejected_reason_check CHECK ((rejected_reason = ANY (ARRAY['self_referral'::text, 'own_device'::text, 'same_ip'::text, 'same_fingerprint'::text, 'monthly_cap'::text, 'refunded'::text]))),
    CONSTRAINT referrals_signup_fingerprint_check CHECK ((length(signup_fingerprint) <= 256)),
    CONSTRAINT referrals_signup_ip_check CHECK ((length(signup_ip) <= 64)),
    CONSTRAINT referrals_status_check CHECK ((status = ANY (ARRAY['signed_up'::text, 'qualified'::text, 'rewarded'::text, 'rejected'::text])))
);

COMMENT ON TABLE billing.referrals IS 'Who referred whom: one referrer per account, the first one, set at sign-up only. signed_up -> qualified (on the program''s event, once) -> rewarded (lots granted in that same transaction, pending for the holdback), or rejected with the reason (self_referral, own_device, same_ip, same_fingerprint at sign-up; monthly_cap at qualification; refunded: the qualifying payment was refunded inside the holdback).';

ALTER TABLE ONLY billing.referrals
    ADD CONSTRAINT referrals_pkey PRIMARY KEY (referee_account_id);

CREATE INDEX referrals_referrer_idx ON billing.referrals USING btree (referrer_account_id, created_at);

ALTER TABLE ONLY billing.referrals
    ADD CONSTRAINT referrals_referee_account_id_fkey FOREIGN KEY (referee_account_id) REFERENCES identity.accounts(id);

ALTER TABLE ONLY billing.referrals
    ADD CONSTRAINT referrals_referee_lot_id_fkey FOREIGN KEY (referee_lot_id) REFERENCES ledger.credit_lots(id);

ALTER TABLE ONLY billing.referrals
    ADD CONSTRAINT referrals_referrer_account_id_fkey FOREIGN KEY (referrer_account_id) REFERENCES identity.accounts(id);

ALTER TABLE ONLY billing.referrals
    ADD CONSTRAINT referrals_referrer_lot_id_fkey FOREIGN KEY (referrer_lot_id) REFERENCES ledger.credit_lots(id);

ALTER TABLE ONLY billing.referrals
    ADD CONSTRAINT referrals_referrer_user_id_fkey FOREIGN KEY (referrer_user_id) REFERENCES identity.users(id);

CREATE TABLE billing.stripe_events (
    id text NOT NULL,
    type text NOT NULL,
    created timestamp with time zone,
    livemode boolean DEFAULT false NOT NULL,
    payload jsonb,
    received_at timestamp with time zone DEFAULT now() NOT NULL,
    status text NOT NULL,
    note text,
    CONSTRAINT stripe_events_rejected_only_unreadable CHECK (((status = 'rejected'::text) OR ((payload IS NOT NULL) AND (created IS NOT NULL)))),
    CONSTRAINT stripe_events_status_check CHECK ((status = ANY (ARRAY['applied'::text, 'stale'::text, 'ignored'::text, 'rejected'::text])))
);

COMMENT ON TABLE billing.stripe_events IS 'Inbox of Stripe webhook events, keyed by Stripe''s event id: an event is applied in the transaction that records it, and a redelivery changes nothing. status: applied, stale (older than the state already applied), ignored (a type pgtally does not handle, or nothing of pgtally''s to change; note says why).';

COMMENT ON COLUMN billing.stripe_events.payload IS 'The event as received; NULL only for a rejected event that is not readable JSON (its id is then rejected: + the SHA-256 of the body).';

COMMENT ON COLUMN billing.stripe_events.status IS 'applied; stale (older than the state already applied); ignored (nothing of pgtally''s to change); rejected (validly signed but malformed: nothing applied, note says why; answered 400).';

ALTER TABLE billing.stripe_events
    ADD CONSTRAINT stripe_events_id_length CHECK (((length(id) >= 1) AND (length(id) <= 255))) NOT VALID;

ALTER TABLE billing.stripe_events
    ADD CONSTRAINT stripe_events_note_length CHECK ((length(note) <= 1000)) NOT VALID;

ALTER TABLE ONLY billing.stripe_events
    ADD CONSTRAINT stripe_events_pkey PRIMARY KEY (id);

ALTER TABLE billing.stripe_events
    ADD CONSTRAINT stripe_events_type_length CHECK ((length(type) <= 100)) NOT VALID;

CREATE INDEX stripe_events_checkout_session_idx ON billing.stripe_events USING btree (((payload #>> '{data,object,id}'::text[]))) WHERE (type ~~ 'checkout.session.%'::text);

CREATE INDEX stripe_events_status_idx ON billing.stripe_events USING btree (status, received_at) WHERE (status <> 'applied'::text);

CREATE TABLE billing.subscriptions (
    stripe_subscription_id text NOT NULL,
    account_id uuid NOT NULL,
    stripe_customer_id text,
    status text NOT NULL,
    stripe_item_id text,
    price_id text,
    plan_id text,
    current_period_start timestamp with time zone,
    current_period_end timestamp with time zone,
    cancel_at_period_end boolean DEFAULT false NOT NULL,
    canceled_at timestamp with time zone,
    last_event_created timestamp with time zone NOT NULL,
    last_event_rank integer NOT NULL,
    last_event_id text NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    cancel_at timestamp with time zone,
    CONSTRAINT subscriptions_status_check CHECK ((status = ANY (ARRAY['incomplete'::text, 'incomplete_expired'::text, 'trialing'::text, 'active'::text, 'past_due'::text, 'canceled'::text, 'unpaid'::text, 'paused'::text])))
);

COMMENT ON TABLE billing.subscriptions IS 'Stripe subscriptions as the newest applied event describes them. An event is applied only when (created, rank, id) is greater than the stored last_event_*: an older event never overwrites newer state, and events of the same second are ordered the same way whatever order they arrive in.';

COMMENT ON COLUMN billing.subscriptions.last_event_rank IS 'Tiebreak within one second: the lifecycle rank of the event''s subscription status (incomplete < trialing < active < past_due < unpaid < paused < canceled), then created/updated/deleted.';

COMMENT ON COLUMN billing.subscriptions.cancel_at IS 'Stripe''s cancel_at: when the subscription is scheduled to end (set by cancel at period end, or a date chosen in the dashboard or the customer portal); NULL when it renews.';

ALTER TABLE billing.subscriptions
    ADD CONSTRAINT subscriptions_customer_length CHECK ((length(stripe_customer_id) <= 255)) NOT VALID;

ALTER TABLE billing.subscriptions
    ADD CONSTRAINT subscriptions_id_length CHECK (((length(stripe_subscription_id) >= 1) AND (length(stripe_subscription_id) <= 255))) NOT VALID;

ALTER TABLE billing.subscriptions
    ADD CONSTRAINT subscriptions_item_length CHECK ((length(stripe_item_id) <= 255)) NOT VALID;

ALTER TABLE billing.subscriptions
    ADD CONSTRAINT subscriptions_last_event_id_length CHECK ((length(last_event_id) <= 255)) NOT VALID;

ALTER TABLE ONLY billing.subscriptions
    ADD CONSTRAINT subscriptions_pkey PRIMARY KEY (stripe_subscription_id);

ALTER DOMAIN identity.account_name
    ADD CONSTRAINT account_name_check CHECK ((length(VALUE) <= 200)) NOT VALID;

CREATE INDEX subscriptions_account_id_idx ON billing.subscriptions USING btree (account_id);

ALTER TABLE ONLY billing.subscriptions
    ADD CONSTRAINT subscriptions_account_id_fkey FOREIGN KEY (account_id) REFERENCES identity.accounts(id);

ALTER TABLE ONLY billing.subscriptions
    ADD CONSTRAINT subscriptions_plan_id_fkey FOREIGN KEY (plan_id) REFERENCES billing.plans(id);

ALTER TABLE ONLY billing.subscriptions
    ADD CONSTRAINT subscriptions_price_id_fkey FOREIGN KEY (price_id) REFERENCES billing.prices(id);

CREATE TABLE identity.accounts (
    id uuid DEFAULT util.uuid_v7() NOT NULL,
    kind identity.account_kind DEFAULT 'person'::text NOT NULL,
    name identity.account_name,
    plan_id text NOT NULL,
    credit_balance_micros util.micro_credits DEFAULT 0 NOT NULL,
    billing_period_start timestamp with time zone,
    billing_period_end timestamp with time zone,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    merged_into uuid,
    device_fingerprint identity.device_fingerprint,
    plan_grace_until timestamp with time zone,
    device_install_hash bytea,
    held_micros bigint DEFAULT 0 NOT NULL,
    auto_topup_below_micros util.micro_credits,
    credits_due_at timestamp with time zone,
    suspended_at timestamp with time zone,
    suspended_reason util.note,
    has_budgets boolean DEFAULT false NOT NULL,
    external_id text,
    provisioned_by uuid,
    CONSTRAINT accounts_check CHECK (((billing_period_start IS NULL) = (billing_period_end IS NULL))),
    CONSTRAINT accounts_check1 CHECK ((billing_period_end > billing_period_start)),
    CONSTRAINT accounts_external_id_check CHECK (((length(external_id) >= 1) AND (length(external_id) <= 255))),
    CONSTRAINT accounts_external_id_pair CHECK (((external_id IS NULL) = (provisioned_by IS NULL))),
    CONSTRAINT held_within_balance CHECK (((held_micros >= 0) AND (held_micros <= (credit_balance_micros)::bigint)))
);

COMMENT ON TABLE identity.accounts IS 'An account owns a plan, a credit balance and usage: a person, a team, an anonymous device or a service.';

COMMENT ON COLUMN identity.accounts.credit_balance_micros IS 'Cached credit balance in micro-credits; always equals the sum of this account''s ledger.entries (reporting.balance_mismatches proves it). Cannot go negative.';

COMMENT ON COLUMN identity.accounts.billing_period_start IS 'Start of the current subscription period, for entitlements with period=billing_period (set by billing).';

COMMENT ON COLUMN identity.accounts.billing_period_end IS 'End (exclusive) of the current subscription period.';

COMMENT ON COLUMN identity.accounts.merged_into IS 'For an anonymous device account: the user account its usage and credits moved to (set once, by identity.merge_device).';

COMMENT ON COLUMN identity.accounts.device_fingerprint IS 'For an anonymous device account: the fingerprint the device sent to POST /v1/identify. A hint for lookups and abuse limits, never a credential.';

COMMENT ON COLUMN identity.accounts.plan_grace_until IS 'Set when a subscription payment fails: the plan holds until then, after which the account is metered as free until a payment succeeds.';

COMMENT ON COLUMN identity.accounts.device_install_hash IS 'For an anonymous device account: SHA-256 of the install id the device sends to POST /v1/identify (a client-generated secret of at least 128 bits). The same install gets the same account. Kept after the account is merged into a person''s account (merged_into): the install is then linked, and identify answers for the person, until one of its sessions is revoked (identity.sessions.install_hash), which clears it.';

COMMENT ON COLUMN identity.accounts.held_micros IS 'Micro-credits reserved by open holds: part of the balance that no charge or other hold may spend (spendable = credit_balance_micros - held_micros).';

COMMENT ON COLUMN identity.accounts.auto_topup_below_micros IS 'Auto top-up threshold in micro-credits (NULL: off): a charge that leaves the balance below it enqueues one top-up (billing.auto_topups).';

COMMENT ON COLUMN identity.accounts.credits_due_at IS 'The next moment a lot of this account expires or becomes spendable, or its plan''s monthly credits are due (NULL: nothing is): a charge that finds it past runs ledger.refresh_lots first, so the hot path pays one comparison.';

COMMENT ON COLUMN identity.accounts.suspended_at IS 'Set by an operator (pgtally admin): every charge, hold and API key of the account is refused (403 account-suspended) until unsuspended; signing in still works and shows why.';

COMMENT ON COLUMN identity.accounts.has_budgets IS 'Whether the account has a budget (metering.budgets): a charge reads this flag from the row it already locks, so an account without budgets pays no query for them. Kept by metering.set_budget and metering.delete_budget under the account''s lock.';

COMMENT ON COLUMN identity.accounts.external_id IS 'The product''s own id for the person (its users table, NextAuth, Clerk) an account was provisioned for by POST /v1/accounts/provision; unique per provisioning service account (provisioned_by). NULL otherwise.';

COMMENT ON COLUMN identity.accounts.provisioned_by IS 'The service account whose key (scopes service and accounts:write) provisioned this account for external_id. NULL otherwise.';

ALTER TABLE ONLY identity.accounts
    ADD CONSTRAINT accounts_device_install_hash_key UNIQUE (device_install_hash);

ALTER TABLE ONLY identity.accounts
    ADD CONSTRAINT accounts_pkey PRIMARY KEY (id);

ALTER TABLE ONLY identity.accounts
    ADD CONSTRAINT accounts_provisioned_external_id_key UNIQUE (provisioned_by, external_id);

CREATE INDEX accounts_device_fingerprint_idx ON identity.accounts USING btree (device_fingerprint) WHERE (device_fingerprint IS NOT NULL);

ALTER TABLE ONLY identity.accounts
    ADD CONSTRAINT accounts_merged_into_fkey FOREIGN KEY (merged_into) REFERENCES identity.accounts(id);

ALTER TABLE ONLY identity.accounts
    ADD CONSTRAINT accounts_plan_id_fkey FOREIGN KEY (plan_id) REFERENCES billing.plans(id);

ALTER TABLE ONLY identity.accounts
    ADD CONSTRAINT accounts_provisioned_by_fkey FOREIGN KEY (provisioned_by) REFERENCES identity.accounts(id);

CREATE TABLE identity.api_keys (
    id uuid DEFAULT util.uuid_v7() NOT NULL,
    account_id uuid NOT NULL,
    name text DEFAULT ''::text NOT NULL,
    key_hash bytea NOT NULL,
    display text NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    expires_at timestamp with time zone,
    revoked_at timestamp with time zone,
    scopes text[] DEFAULT '{usage:write,usage:read}'::text[] NOT NULL,
    last_used_at timestamp with time zone,
    created_by uuid,
    CONSTRAINT api_keys_scopes_check CHECK (((scopes <@ '{usage:write,usage:read,billing:read,billing:manage,service,usage:reverse,accounts:write}'::text[]) AND (cardinality(scopes) > 0)))
);

COMMENT ON TABLE identity.api_keys IS 'API keys of an account. The key itself is shown once at creation and never stored: only its SHA-256 hash.';

COMMENT ON COLUMN identity.api_keys.key_hash IS 'sha256 of the full key text (UTF-8).';

COMMENT ON COLUMN identity.api_keys.display IS 'The key''s prefix and last four characters, to recognise it in lists.';

COMMENT ON COLUMN identity.api_keys.scopes IS 'What the key may do: usage:write (POST /v1/usage/events), usage:read (check, balance, ledger), billing:read, billing:manage, service (act on behalf of any account: account_id in the request), usage:reverse (an operator key: reverse usage events of any account; issued by operators only, pgtally events reversal-key), accounts:write (with service: POST /v1/accounts/provision).';

COMMENT ON COLUMN identity.api_keys.last_used_at IS 'When the key last authenticated a request (updated at most once a minute).';

COMMENT ON COLUMN identity.api_keys.created_by IS 'The member who created the key: on every use its scopes are cut to what that member''s role allows now (a demoted member''s keys lose what the role lost; a removed member''s keys stop). NULL for operator keys.';

ALTER TABLE ONLY identity.api_keys
    ADD CONSTRAINT api_keys_key_hash_key UNIQUE (key_hash);

ALTER TABLE identity.api_keys
    ADD CONSTRAINT api_keys_name_length CHECK ((length(name) <= 100)) NOT VALID;

ALTER TABLE ONLY identity.api_keys
    ADD CONSTRAINT api_keys_pkey PRIMARY KEY (id);

CREATE INDEX api_keys_account_id_idx ON identity.api_keys USING btree (account_id);

ALTER TABLE ONLY identity.api_keys
    ADD CONSTRAINT api_keys_account_id_fkey FOREIGN KEY (account_id) REFERENCES identity.accounts(id) ON DELETE CASCADE;

ALTER TABLE ONLY identity.api_keys
    ADD CONSTRAINT api_keys_created_by_fkey FOREIGN KEY (created_by) REFERENCES identity.users(id) ON DELETE SET NULL;

CREATE TABLE identity.auth_events (
    id bigint NOT NULL,
    kind text NOT NULL,
    user_id uuid,
    account_id uuid,
    session_id uuid,
    ip text,
    user_agent text,
    detail jsonb DEFAULT '{}'::jsonb NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT auth_events_kind_check CHECK ((kind = ANY (ARRAY['signup'::text, 'signup_existing_email'::text, 'login_succeeded'::text, 'login_failed'::text, 'logout'::text, 'logout_all'::text, 'session_revoked'::text, 'refresh_token_reuse'::text, 'email_verified'::text, 'password_reset_requested'::text, 'password_reset'::text, 'password_rehashed'::text, 'api_key_created'::text, 'api_key_revoked'::text, 'device_identified'::text, 'device_merged'::text, 'rate_limited'::text, 'oauth_sign_in'::text, 'oauth_signup'::text, 'oauth_linked'::text, 'oauth_unlinked'::text, 'oauth_refused'::text, 'device_code_requested'::text, 'device_code_approved'::text, 'device_code_denied'::text, 'device_code_issued'::text, 'sso_domain_claimed'::text, 'sso_domain_verified'::text, 'sso_link_requested'::text, 'oidc_code_issued'::text, 'oidc_code_exchanged'::text, 'oidc_code_replayed'::text, 'oidc_consent_denied'::text, 'oidc_logout'::text])))
);

COMMENT ON TABLE identity.auth_events IS 'Append-only log of authentication events. Never holds a secret: no password, token or key, only ids.';

ALTER TABLE identity.auth_events ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME identity.auth_events_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

ALTER TABLE identity.auth_events
    ADD CONSTRAINT auth_events_ip_length CHECK ((length(ip) <= 64)) NOT VALID;

ALTER TABLE ONLY identity.auth_events
    ADD CONSTRAINT auth_events_pkey PRIMARY KEY (id);

ALTER TABLE identity.auth_events
    ADD CONSTRAINT auth_events_user_agent_length CHECK ((length(user_agent) <= 512)) NOT VALID;

CREATE INDEX auth_events_user_id_idx ON identity.auth_events USING btree (user_id, id) WHERE (user_id IS NOT NULL);

CREATE TRIGGER auth_events_append_only BEFORE DELETE OR UPDATE ON identity.auth_events FOR EACH STATEMENT EXECUTE FUNCTION util.forbid_change();

CREATE TABLE identity.authorization_codes (
    id uuid DEFAULT util.uuid_v7() NOT NULL,
    code_hash bytea NOT NULL,
    client_id text NOT NULL,
    browser_session_id uuid NOT NULL,
    redirect_uri text NOT NULL,
    scopes text[] NOT NULL,
    code_challenge text,
    nonce text,
    created_at timestamp with time zone NOT NULL,
    expires_at timestamp with time zone NOT NULL,
    used_at timestamp with time zone,
    session_id uuid,
    CONSTRAINT authorization_codes_code_challenge_check CHECK ((code_challenge ~ '^[A-Za-z0-9_-]{43}$'::text)),
    CONSTRAINT authorization_codes_nonce_check CHECK ((length(nonce) <= 500))
);

COMMENT ON TABLE identity.authorization_codes IS 'Authorization codes (RFC 6749 section 4.1), stored as SHA-256 hashes: single use, 60 seconds, bound to the client, the exact redirect URI, the PKCE challenge and the nonce. Issue 25.';

COMMENT ON COLUMN identity.authorization_codes.browser_session_id IS 'The signed-in browser session that approved it (its user and auth_time).';

COMMENT ON COLUMN identity.authorization_codes.code_challenge IS 'PKCE S256 code challenge (RFC 7636): BASE64URL(SHA-256(code_verifier)).';

COMMENT ON COLUMN identity.authorization_codes.used_at IS 'When it was exchanged; a second exchange is a replay and revokes the session it gave (RFC 6749 section 4.1.2).';

COMMENT ON COLUMN identity.authorization_codes.session_id IS 'The client session (refresh-token family) the exchange started.';

ALTER TABLE ONLY identity.authorization_codes
    ADD CONSTRAINT authorization_codes_code_hash_key UNIQUE (code_hash);

ALTER TABLE ONLY identity.authorization_codes
    ADD CONSTRAINT authorization_codes_pkey PRIMARY KEY (id);

CREATE INDEX authorization_codes_expires_at_idx ON identity.authorization_codes USING btree (expires_at);

ALTER TABLE ONLY identity.authorization_codes
    ADD CONSTRAINT authorization_codes_browser_session_id_fkey FOREIGN KEY (browser_session_id) REFERENCES identity.sessions(id);

ALTER TABLE ONLY identity.authorization_codes
    ADD CONSTRAINT authorization_codes_client_id_fkey FOREIGN KEY (client_id) REFERENCES identity.oauth_clients(id);

ALTER TABLE ONLY identity.authorization_codes
    ADD CONSTRAINT authorization_codes_session_id_fkey FOREIGN KEY (session_id) REFERENCES identity.sessions(id);

CREATE TABLE identity.device_codes (
    id uuid DEFAULT util.uuid_v7() NOT NULL,
    device_code_hash bytea NOT NULL,
    user_code text NOT NULL,
    client_id text NOT NULL,
    scope text,
    ip text,
    user_agent text,
    device_session_id uuid,
    status text DEFAULT 'pending'::text NOT NULL,
    user_id uuid,
    interval_seconds integer DEFAULT 5 NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    expires_at timestamp with time zone NOT NULL,
    last_polled_at timestamp with time zone,
    decided_at timestamp with time zone,
    issued_at timestamp with time zone,
    CONSTRAINT device_codes_check CHECK (((status = 'pending'::text) = (decided_at IS NULL))),
    CONSTRAINT device_codes_check1 CHECK (((status <> 'approved'::text) OR (user_id IS NOT NULL))),
    CONSTRAINT device_codes_client_id_check CHECK (((length(client_id) >= 1) AND (length(client_id) <= 100))),
    CONSTRAINT device_codes_interval_seconds_check CHECK (((interval_seconds >= 1) AND (interval_seconds <= 120))),
    CONSTRAINT device_codes_ip_check CHECK ((length(ip) <= 64)),
    CONSTRAINT device_codes_scope_check CHECK ((length(scope) <= 200)),
    CONSTRAINT device_codes_status_check CHECK ((status = ANY (ARRAY['pending'::text, 'approved'::text, 'denied'::text]))),
    CONSTRAINT device_codes_user_agent_check CHECK ((length(user_agent) <= 512)),
    CONSTRAINT device_codes_user_code_check CHECK ((user_code ~ '^[BCDFGHJKLMNPQRSTVWXZ]{8}$'::text))
);

COMMENT ON TABLE identity.device_codes IS 'Device authorization grant (RFC 8628): a command line asks for a device code, a signed-in person approves or denies its user code at /device, the command line polls /oauth/token and gets one token pair, once. Codes expire after 10 minutes.';

COMMENT ON COLUMN identity.device_codes.user_code IS '8 characters from an alphabet without vowels or look-alikes (RFC 8628 section 6.1), shown as XXXX-XXXX.';

COMMENT ON COLUMN identity.device_codes.device_session_id IS 'The command line''s anonymous device session (POST /v1/identify), when it sent one: merged into the user on approval, once.';

ALTER TABLE ONLY identity.device_codes
    ADD CONSTRAINT device_codes_device_code_hash_key UNIQUE (device_code_hash);

ALTER TABLE ONLY identity.device_codes
    ADD CONSTRAINT device_codes_pkey PRIMARY KEY (id);

CREATE UNIQUE INDEX device_codes_pending_user_code_idx ON identity.device_codes USING btree (user_code) WHERE (status = 'pending'::text);

ALTER TABLE ONLY identity.device_codes
    ADD CONSTRAINT device_codes_device_session_id_fkey FOREIGN KEY (device_session_id) REFERENCES identity.sessions(id);

ALTER TABLE ONLY identity.device_codes
    ADD CONSTRAINT device_codes_user_id_fkey FOREIGN KEY (user_id) REFERENCES identity.users(id);

CREATE TABLE identity.handoff_codes (
    code_hash bytea NOT NULL,
    device_session_id uuid NOT NULL,
    created_at timestamp with time zone NOT NULL,
    expires_at timestamp with time zone NOT NULL,
    claimed_at timestamp with time zone
);

COMMENT ON TABLE identity.handoff_codes IS 'Handoff codes (POST /v1/identify/handoff): an anonymous install''s session, for a browser to merge at sign-in (/login?handoff=, /signup?handoff=, /auth/*/start?handoff=). Single use, 10 minutes (api.claim_handoff). Issue 25.';

COMMENT ON COLUMN identity.handoff_codes.code_hash IS 'SHA-256 of the code (a random token shown once to the install).';

COMMENT ON COLUMN identity.handoff_codes.device_session_id IS 'The install''s session (of an unmerged device account) the code hands over.';

COMMENT ON COLUMN identity.handoff_codes.claimed_at IS 'When a page claimed it; a claimed code never works again.';

ALTER TABLE ONLY identity.handoff_codes
    ADD CONSTRAINT handoff_codes_pkey PRIMARY KEY (code_hash);

CREATE INDEX handoff_codes_device_session_idx ON identity.handoff_codes USING btree (device_session_id);

ALTER TABLE ONLY identity.handoff_codes
    ADD CONSTRAINT handoff_codes_device_session_id_fkey FOREIGN KEY (device_session_id) REFERENCES identity.sessions(id);

CREATE TABLE identity.invitations (
    id uuid DEFAULT util.uuid_v7() NOT NULL,
    account_id uuid NOT NULL,
    email_normalized text NOT NULL,
    role text NOT NULL,
    token_hash bytea NOT NULL,
    invited_by uuid NOT NULL,
    created_at timestamp with time zone NOT NULL,
    expires_at timestamp with time zone NOT NULL,
    sent_count integer DEFAULT 1 NOT NULL,
    CONSTRAINT invitations_email_normalized_check CHECK (((length(email_normalized) >= 3) AND (length(email_normalized) <= 320))),
    CONSTRAINT invitations_role_check CHECK ((role = ANY (ARRAY['owner'::text, 'admin'::text, 'member'::text, 'billing'::text, 'viewer'::text])))
);

COMMENT ON TABLE identity.invitations IS 'Pending invitations to join an account: single use (claimed by DELETE ... RETURNING, so two accepts cannot both succeed), expiring (7 days), for one address (the accepting user''s verified email must match). Only the token''s SHA-256 is kept; the link is emailed.';

ALTER TABLE ONLY identity.invitations
    ADD CONSTRAINT invitations_one_per_address UNIQUE (account_id, email_normalized);

ALTER TABLE ONLY identity.invitations
    ADD CONSTRAINT invitations_pkey PRIMARY KEY (id);

ALTER TABLE ONLY identity.invitations
    ADD CONSTRAINT invitations_token_hash_key UNIQUE (token_hash);

ALTER TABLE ONLY identity.invitations
    ADD CONSTRAINT invitations_account_id_fkey FOREIGN KEY (account_id) REFERENCES identity.accounts(id);

ALTER TABLE ONLY identity.invitations
    ADD CONSTRAINT invitations_invited_by_fkey FOREIGN KEY (invited_by) REFERENCES identity.users(id);

CREATE TABLE identity.jwt_keys (
    kid text NOT NULL,
    secret bytea NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT jwt_keys_secret_check CHECK ((length(secret) >= 32))
);

COMMENT ON TABLE identity.jwt_keys IS 'HMAC keys for access tokens (HS256, RFC 7518). The newest signs; the server reads them through api.jwt_keys().';

ALTER TABLE ONLY identity.jwt_keys
    ADD CONSTRAINT jwt_keys_pkey PRIMARY KEY (kid);

CREATE TABLE identity.memberships (
    account_id uuid NOT NULL,
    user_id uuid NOT NULL,
    role text NOT NULL,
    created_at timestamp with time zone NOT NULL,
    invited_by uuid,
    CONSTRAINT memberships_role_check CHECK ((role = ANY (ARRAY['owner'::text, 'admin'::text, 'member'::text, 'billing'::text, 'viewer'::text])))
);

COMMENT ON TABLE identity.memberships IS 'Who belongs to which account, with which role. A person owns their personal account; team accounts have members by invitation. An account always keeps at least one owner (enforced by the functions that change roles, under the account row''s lock).';

ALTER TABLE ONLY identity.memberships
    ADD CONSTRAINT memberships_pkey PRIMARY KEY (account_id, user_id);

CREATE INDEX memberships_user_idx ON identity.memberships USING btree (user_id);

ALTER TABLE ONLY identity.memberships
    ADD CONSTRAINT memberships_account_id_fkey FOREIGN KEY (account_id) REFERENCES identity.accounts(id);

ALTER TABLE ONLY identity.memberships
    ADD CONSTRAINT memberships_invited_by_fkey FOREIGN KEY (invited_by) REFERENCES identity.users(id);

ALTER TABLE ONLY identity.memberships
    ADD CONSTRAINT memberships_user_id_fkey FOREIGN KEY (user_id) REFERENCES identity.users(id) ON DELETE CASCADE;

CREATE TABLE identity.oauth_clients (
    id text NOT NULL,
    name text NOT NULL,
    secret_hash bytea,
    first_party boolean DEFAULT false NOT NULL,
    redirect_uris text[] NOT NULL,
    post_logout_redirect_uris text[] DEFAULT '{}'::text[] NOT NULL,
    origins text[] DEFAULT '{}'::text[] NOT NULL,
    created_at timestamp with time zone NOT NULL,
    revoked_at timestamp with time zone,
    CONSTRAINT oauth_clients_id_check CHECK ((id ~ '^pgc_[A-Za-z0-9_-]{22,64}$'::text)),
    CONSTRAINT oauth_clients_name_check CHECK (((length(btrim(name)) >= 1) AND (length(btrim(name)) <= 100))),
    CONSTRAINT oauth_clients_redirect_uris_check CHECK (((cardinality(redirect_uris) >= 1) AND (cardinality(redirect_uris) <= 20)))
);

COMMENT ON TABLE identity.oauth_clients IS 'Relying parties (OpenID Connect clients) registered with `pgtally clients create`: the product''s own front ends, backends and browser extensions. Issue 25.';

COMMENT ON COLUMN identity.oauth_clients.id IS 'The client_id: pgc_ and 22 or more random URL-safe characters.';

COMMENT ON COLUMN identity.oauth_clients.secret_hash IS 'SHA-256 of the client secret (a 366-bit random token, shown once) of a confidential client; NULL for a public client (browser app, extension), which must use PKCE S256.';

COMMENT ON COLUMN identity.oauth_clients.first_party IS 'The product''s own app: its users are not asked for consent.';

COMMENT ON COLUMN identity.oauth_clients.redirect_uris IS 'Exact redirect URIs (compared as strings, RFC 9700 section 4.1.3).';

COMMENT ON COLUMN identity.oauth_clients.post_logout_redirect_uris IS 'Where RP-initiated logout may send the browser back to (exact match).';

COMMENT ON COLUMN identity.oauth_clients.origins IS 'Extra browser origins (scheme://host[:port]) allowed by CORS besides the redirect URIs'' origins.';

COMMENT ON COLUMN identity.oauth_clients.revoked_at IS 'When the client was revoked: its codes, sessions and tokens stop working.';

ALTER TABLE ONLY identity.oauth_clients
    ADD CONSTRAINT oauth_clients_pkey PRIMARY KEY (id);

CREATE TABLE identity.oauth_flows (
    id uuid DEFAULT util.uuid_v7() NOT NULL,
    provider text NOT NULL,
    state_hash bytea NOT NULL,
    browser_hash bytea NOT NULL,
    nonce text NOT NULL,
    code_verifier text NOT NULL,
    purpose text NOT NULL,
    session_id uuid,
    device_session_id uuid,
    return_to text,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    expires_at timestamp with time zone NOT NULL,
    used_at timestamp with time zone,
    sso_account_id uuid,
    CONSTRAINT oauth_flows_code_verifier_check CHECK (((length(code_verifier) >= 43) AND (length(code_verifier) <= 128))),
    CONSTRAINT oauth_flows_nonce_check CHECK ((length(nonce) <= 128)),
    CONSTRAINT oauth_flows_provider_check CHECK ((provider = ANY (ARRAY['google'::text, 'github'::text, 'sso'::text]))),
    CONSTRAINT oauth_flows_purpose_check CHECK ((purpose = ANY (ARRAY['sign_in'::text, 'link'::text]))),
    CONSTRAINT oauth_flows_return_to_check CHECK ((length(return_to) <= 2000))
);

COMMENT ON TABLE identity.oauth_flows IS 'One authorization-code flow with a provider (RFC 6749 section 4.1 with PKCE, RFC 7636): the state (stored hashed) binds the callback to the browser that started it (browser_hash: SHA-256 of a random cookie), the nonce binds the ID token (OpenID Connect), the PKCE verifier stays here. Single use, 10 minutes.';

COMMENT ON COLUMN identity.oauth_flows.session_id IS 'For purpose = link: the signed-in session that asked to link a provider.';

COMMENT ON COLUMN identity.oauth_flows.device_session_id IS 'An anonymous device session the browser carried: merged into the user at sign-in.';

COMMENT ON COLUMN identity.oauth_flows.sso_account_id IS 'For provider sso: the team whose provider this flow signs in with.';

ALTER TABLE ONLY identity.oauth_flows
    ADD CONSTRAINT oauth_flows_pkey PRIMARY KEY (id);

ALTER TABLE ONLY identity.oauth_flows
    ADD CONSTRAINT oauth_flows_state_hash_key UNIQUE (state_hash);

ALTER TABLE ONLY identity.oauth_flows
    ADD CONSTRAINT oauth_flows_device_session_id_fkey FOREIGN KEY (device_session_id) REFERENCES identity.sessions(id);

ALTER TABLE ONLY identity.oauth_flows
    ADD CONSTRAINT oauth_flows_session_id_fkey FOREIGN KEY (session_id) REFERENCES identity.sessions(id);

ALTER TABLE ONLY identity.oauth_flows
    ADD CONSTRAINT oauth_flows_sso_account_id_fkey FOREIGN KEY (sso_account_id) REFERENCES identity.accounts(id);

CREATE TABLE identity.one_time_tokens (
    id uuid DEFAULT util.uuid_v7() NOT NULL,
    user_id uuid NOT NULL,
    purpose text NOT NULL,
    token_hash bytea NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    expires_at timestamp with time zone NOT NULL,
    used_at timestamp with time zone,
    CONSTRAINT one_time_tokens_purpose_check CHECK ((purpose = ANY (ARRAY['verify_email'::text, 'password_reset'::text])))
);

COMMENT ON TABLE identity.one_time_tokens IS 'Email verification and password reset tokens: 256 random bits, stored as SHA-256 hashes, claimed once with UPDATE ... RETURNING before they expire.';

ALTER TABLE ONLY identity.one_time_tokens
    ADD CONSTRAINT one_time_tokens_pkey PRIMARY KEY (id);

ALTER TABLE ONLY identity.one_time_tokens
    ADD CONSTRAINT one_time_tokens_token_hash_key UNIQUE (token_hash);

CREATE INDEX one_time_tokens_user_id_idx ON identity.one_time_tokens USING btree (user_id, purpose);

ALTER TABLE ONLY identity.one_time_tokens
    ADD CONSTRAINT one_time_tokens_user_id_fkey FOREIGN KEY (user_id) REFERENCES identity.users(id);

CREATE TABLE identity.public_mail_domains (
    domain text NOT NULL,
    CONSTRAINT public_mail_domains_domain_check CHECK ((domain = lower(domain)))
);

COMMENT ON TABLE identity.public_mail_domains IS 'Mail domains anyone can have an address at (Gmail, Outlook, ...): no team may claim them (or a subdomain of one) for single sign-on. Operators may add rows.';

ALTER TABLE ONLY identity.public_mail_domains
    ADD CONSTRAINT public_mail_domains_pkey PRIMARY KEY (domain);

CREATE TABLE identity.rate_limit_rules (
    action text NOT NULL,
    dimension text NOT NULL,
    max_attempts integer NOT NULL,
    per interval NOT NULL,
    CONSTRAINT rate_limit_rules_action_check CHECK ((action ~ '^[a-z_]{1,40}$'::text)),
    CONSTRAINT rate_limit_rules_dimension_check CHECK ((dimension ~ '^[a-z_]{1,40}$'::text)),
    CONSTRAINT rate_limit_rules_max_attempts_check CHECK ((max_attempts >= 0)),
    CONSTRAINT rate_limit_rules_per_check CHECK ((per > '00:00:00'::interval))
);

COMMENT ON TABLE identity.rate_limit_rules IS 'Every rate limit pgtally applies (identity.throttled): at most max_attempts of an action per dimension value (ip: the client''s address; email, fingerprint, install, user, code: what the caller names) in any sliding window of length per. An operator may change a row; the next attempt uses it.';

ALTER TABLE ONLY identity.rate_limit_rules
    ADD CONSTRAINT rate_limit_rules_pkey PRIMARY KEY (action, dimension);

CREATE TABLE identity.rate_limits (
    bucket text CONSTRAINT rate_limits_bucket_not_null1 NOT NULL,
    hits timestamp with time zone[] CONSTRAINT rate_limits_hits_not_null1 NOT NULL,
    CONSTRAINT rate_limits_bucket_length CHECK ((length(bucket) <= 600))
);

COMMENT ON TABLE identity.rate_limits IS 'Sliding-window rate limits shared by every server process, one row a bucket, locked by identity.throttled while it decides. A row may be deleted at will once its newest hit is older than the longest window (one day).';

COMMENT ON COLUMN identity.rate_limits.bucket IS 'action:dimension:value, e.g. login:ip:203.0.113.7 or signup:email:ada@example.com (at most 600 characters).';

COMMENT ON COLUMN identity.rate_limits.hits IS 'When the allowed attempts of the bucket happened, oldest first: those inside the window, at most the limit (refused attempts are not kept).';

ALTER TABLE ONLY identity.rate_limits
    ADD CONSTRAINT rate_limits_pkey PRIMARY KEY (bucket);

CREATE TABLE identity.refresh_tokens (
    id uuid DEFAULT util.uuid_v7() NOT NULL,
    session_id uuid NOT NULL,
    token_hash bytea NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    expires_at timestamp with time zone NOT NULL,
    used_at timestamp with time zone
);

COMMENT ON TABLE identity.refresh_tokens IS 'Refresh tokens (stored as SHA-256 hashes), each usable once: POST /v1/auth/refresh claims it and issues its successor. Presenting a used one outside the grace window revokes the session (RFC 9700 section 4.14.2).';

ALTER TABLE ONLY identity.refresh_tokens
    ADD CONSTRAINT refresh_tokens_pkey PRIMARY KEY (id);

ALTER TABLE ONLY identity.refresh_tokens
    ADD CONSTRAINT refresh_tokens_token_hash_key UNIQUE (token_hash);

CREATE INDEX refresh_tokens_session_id_idx ON identity.refresh_tokens USING btree (session_id);

ALTER TABLE ONLY identity.refresh_tokens
    ADD CONSTRAINT refresh_tokens_session_id_fkey FOREIGN KEY (session_id) REFERENCES identity.sessions(id);

CREATE TABLE identity.role_permissions (
    role text NOT NULL,
    permission text NOT NULL,
    CONSTRAINT role_permissions_permission_check CHECK ((permission = ANY (ARRAY['usage:read'::text, 'usage:write'::text, 'billing:read'::text, 'billing:manage'::text, 'members:read'::text, 'members:manage'::text, 'keys:manage'::text, 'sso:manage'::text]))),
    CONSTRAINT role_permissions_role_check CHECK ((role = ANY (ARRAY['owner'::text, 'admin'::text, 'member'::text, 'billing'::text, 'viewer'::text])))
);

COMMENT ON TABLE identity.role_permissions IS 'What each role of an account member may do: the one table identity.authenticate decides by. owner: everything; admin: everything but SSO (and only owners make owners); member: meter, read, manage its own API keys; billing: pay, see invoices, read usage (no members, no metering); viewer: read.';

ALTER TABLE ONLY identity.role_permissions
    ADD CONSTRAINT role_permissions_pkey PRIMARY KEY (role, permission);

CREATE TABLE identity.sessions (
    id uuid DEFAULT util.uuid_v7() NOT NULL,
    account_id uuid NOT NULL,
    user_id uuid,
    ip text,
    user_agent text,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    last_used_at timestamp with time zone DEFAULT now() NOT NULL,
    expires_at timestamp with time zone NOT NULL,
    revoked_at timestamp with time zone,
    revoked_reason text,
    refresh_secret bytea DEFAULT (uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid())) NOT NULL,
    method text DEFAULT 'password'::text NOT NULL,
    client_id text,
    scopes text[],
    auth_time timestamp with time zone,
    install_hash bytea,
    CONSTRAINT sessions_method_check CHECK ((method = ANY (ARRAY['password'::text, 'device'::text, 'google'::text, 'github'::text, 'device_code'::text, 'sso'::text, 'oidc'::text]))),
    CONSTRAINT sessions_refresh_secret_check CHECK ((length(refresh_secret) >= 32)),
    CONSTRAINT sessions_revoked_reason_check CHECK ((revoked_reason = ANY (ARRAY['logout'::text, 'logout_all'::text, 'revoked'::text, 'refresh_token_reuse'::text, 'password_reset'::text, 'merged'::text, 'staff'::text, 'code_replay'::text, 'client_revoked'::text])))
);

COMMENT ON TABLE identity.sessions IS 'A sign-in (a user''s login or an anonymous device''s identify): one refresh-token family. Revoking it ends every access and refresh token issued for it.';

COMMENT ON COLUMN identity.sessions.expires_at IS 'Absolute end of the session: refresh tokens stop rotating then (30 days after sign-in).';

COMMENT ON COLUMN identity.sessions.refresh_secret IS 'Random key of the refresh-token family: a token''s successor is HMAC-SHA256(refresh_secret, token), so a retry of the same token within the grace window gets the same successor, and the successor is never stored in plaintext.';

COMMENT ON COLUMN identity.sessions.method IS 'How the session started: password, google, github (browser sign-in), device (an anonymous install, POST /v1/identify), device_code (a command line approved at /device).';

COMMENT ON COLUMN identity.sessions.client_id IS 'The OpenID Connect client the session was granted to (its refresh tokens work only for it); NULL for pgtally''s own sign-ins.';

COMMENT ON COLUMN identity.sessions.scopes IS 'A client session''s granted scopes: its access tokens may do only these (identity.authenticate); NULL: not limited.';

COMMENT ON COLUMN identity.sessions.auth_time IS 'When the person authenticated (the browser session''s start): the ID token''s auth_time.';

COMMENT ON COLUMN identity.sessions.install_hash IS 'For a session POST /v1/identify issued to an install linked to a person (identity.accounts.device_install_hash of the device account merged into the person''s account): that hash. Revoking any such session unlinks the install (identity.unlink_install_on_revoke); NULL otherwise.';

ALTER TABLE identity.sessions
    ADD CONSTRAINT sessions_ip_length CHECK ((length(ip) <= 64)) NOT VALID;

ALTER TABLE ONLY identity.sessions
    ADD CONSTRAINT sessions_pkey PRIMARY KEY (id);

ALTER TABLE identity.sessions
    ADD CONSTRAINT sessions_user_agent_length CHECK ((length(user_agent) <= 512)) NOT VALID;

CREATE INDEX sessions_account_id_idx ON identity.sessions USING btree (account_id) WHERE (revoked_at IS NULL);

CREATE INDEX sessions_client_id_idx ON identity.sessions USING btree (client_id) WHERE ((client_id IS NOT NULL) AND (revoked_at IS NULL));

CREATE INDEX sessions_install_hash_idx ON identity.sessions USING btree (install_hash) WHERE (install_hash IS NOT NULL);

CREATE INDEX sessions_user_id_idx ON identity.sessions USING btree (user_id) WHERE (revoked_at IS NULL);

CREATE TRIGGER sessions_unlink_install AFTER UPDATE OF revoked_at ON identity.sessions FOR EACH ROW WHEN (((old.revoked_at IS NULL) AND (new.revoked_at IS NOT NULL) AND (new.install_hash IS NOT NULL))) EXECUTE FUNCTION identity.unlink_install_on_revoke();

ALTER TABLE ONLY identity.sessions
    ADD CONSTRAINT sessions_account_id_fkey FOREIGN KEY (account_id) REFERENCES identity.accounts(id);

ALTER TABLE ONLY identity.sessions
    ADD CONSTRAINT sessions_client_id_fkey FOREIGN KEY (client_id) REFERENCES identity.oauth_clients(id);

ALTER TABLE ONLY identity.sessions
    ADD CONSTRAINT sessions_user_id_fkey FOREIGN KEY (user_id) REFERENCES identity.users(id);

CREATE TABLE identity.signing_keys (
    kid text NOT NULL,
    alg text DEFAULT 'RS256'::text NOT NULL,
    private_jwk jsonb NOT NULL,
    public_jwk jsonb NOT NULL,
    created_at timestamp with time zone NOT NULL,
    CONSTRAINT signing_keys_alg_check CHECK ((alg = 'RS256'::text)),
    CONSTRAINT signing_keys_kid_check CHECK (((length(kid) >= 8) AND (length(kid) <= 64))),
    CONSTRAINT signing_keys_public_jwk_check CHECK ((NOT (public_jwk ? 'd'::text)))
);

COMMENT ON TABLE identity.signing_keys IS 'Asymmetric keys that sign ID tokens (RS256, RFC 7518), as JWKs (RFC 7517). The newest signs; an older one stays in the JWKS until every ID token it signed has expired (identity.published_signing_keys). Rotate with `pgtally clients rotate-key`. Issue 25.';

COMMENT ON COLUMN identity.signing_keys.private_jwk IS 'The private key (JWK, with d): read only by the server through api.oidc_signing_key().';

ALTER TABLE ONLY identity.signing_keys
    ADD CONSTRAINT signing_keys_pkey PRIMARY KEY (kid);

CREATE TABLE identity.sso_connections (
    account_id uuid NOT NULL,
    issuer text NOT NULL,
    client_id text NOT NULL,
    client_secret text NOT NULL,
    require_sso boolean DEFAULT false NOT NULL,
    created_at timestamp with time zone NOT NULL,
    updated_at timestamp with time zone NOT NULL,
    CONSTRAINT sso_connections_client_id_check CHECK (((length(client_id) >= 1) AND (length(client_id) <= 255))),
    CONSTRAINT sso_connections_client_secret_check CHECK (((length(client_secret) >= 1) AND (length(client_secret) <= 500))),
    CONSTRAINT sso_connections_issuer_check CHECK (((issuer ~ '^https?://\S+$'::text) AND (length(issuer) <= 500)))
);

COMMENT ON TABLE identity.sso_connections IS 'A team''s OpenID Connect provider (set by an owner, permission sso:manage): people of its domains who sign in through it join the team as members. require_sso: those people may not sign in with a password or Google/GitHub.';

COMMENT ON COLUMN identity.sso_connections.client_secret IS 'The team''s client secret at its provider, readable by the database owner (and by the server through api.sso_flow_config); never shown by the API.';

ALTER TABLE ONLY identity.sso_connections
    ADD CONSTRAINT sso_connections_pkey PRIMARY KEY (account_id);

ALTER TABLE ONLY identity.sso_connections
    ADD CONSTRAINT sso_connections_account_id_fkey FOREIGN KEY (account_id) REFERENCES identity.accounts(id);

CREATE TABLE identity.sso_domains (
    domain text NOT NULL,
    account_id uuid NOT NULL,
    verification_token text NOT NULL,
    claimed_at timestamp with time zone NOT NULL,
    verified_at timestamp with time zone,
    verified_by text,
    CONSTRAINT sso_domains_domain_check CHECK (((domain ~ '^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$'::text) AND (domain ~~ '%.%'::text))),
    CONSTRAINT sso_domains_verified_by_check CHECK ((verified_by = ANY (ARRAY['dns'::text, 'staff'::text]))),
    CONSTRAINT sso_domains_verified_check CHECK (((verified_at IS NULL) = (verified_by IS NULL)))
);

COMMENT ON TABLE identity.sso_domains IS 'Email domains a team claims for its provider. A claim takes effect (sign-in through the team''s provider, require_sso) only once verified: a DNS TXT record "pgtally-domain-verification=<verification_token>" on the domain (api.verify_sso_domain), or a staff approval written to ops.audit_log (api.admin_approve_sso_domain). Any number of teams may claim a domain; one may prove it (sso_domains_verified_domain_key).';

COMMENT ON COLUMN identity.sso_domains.verification_token IS 'Random value the team publishes in a TXT record on the domain to prove it owns it.';

COMMENT ON COLUMN identity.sso_domains.verified_at IS 'When ownership was proven; NULL: claimed only, no effect.';

COMMENT ON COLUMN identity.sso_domains.verified_by IS 'How: dns (the TXT record was found) or staff (an approval in ops.audit_log).';

ALTER TABLE ONLY identity.sso_domains
    ADD CONSTRAINT sso_domains_pkey PRIMARY KEY (account_id, domain);

CREATE UNIQUE INDEX sso_domains_verified_domain_key ON identity.sso_domains USING btree (domain) WHERE (verified_at IS NOT NULL);

ALTER TABLE ONLY identity.sso_domains
    ADD CONSTRAINT sso_domains_account_id_fkey FOREIGN KEY (account_id) REFERENCES identity.sso_connections(account_id) ON DELETE CASCADE;

CREATE TABLE identity.sso_link_requests (
    id uuid DEFAULT util.uuid_v7() NOT NULL,
    token_hash bytea NOT NULL,
    user_id uuid NOT NULL,
    account_id uuid NOT NULL,
    subject text NOT NULL,
    email text NOT NULL,
    return_to text,
    created_at timestamp with time zone NOT NULL,
    expires_at timestamp with time zone NOT NULL,
    used_at timestamp with time zone,
    CONSTRAINT sso_link_requests_email_check CHECK ((length(email) <= 320)),
    CONSTRAINT sso_link_requests_return_to_check CHECK ((length(return_to) <= 500)),
    CONSTRAINT sso_link_requests_subject_check CHECK (((length(subject) >= 1) AND (length(subject) <= 300)))
);

COMMENT ON TABLE identity.sso_link_requests IS 'A team''s provider signed in an address that already has a pgtally user who never linked that team''s sign-in: nothing is linked until the user opens the link emailed to that address (api.confirm_sso_link, once, within an hour). The token is stored as its SHA-256 hash.';

COMMENT ON COLUMN identity.sso_link_requests.account_id IS 'The team whose provider signed the person in.';

COMMENT ON COLUMN identity.sso_link_requests.subject IS 'The team''s provider''s subject, as identity.user_identities stores it for provider sso ("<team id>:<sub>").';

ALTER TABLE ONLY identity.sso_link_requests
    ADD CONSTRAINT sso_link_requests_pkey PRIMARY KEY (id);

ALTER TABLE ONLY identity.sso_link_requests
    ADD CONSTRAINT sso_link_requests_token_hash_key UNIQUE (token_hash);

CREATE INDEX sso_link_requests_user_idx ON identity.sso_link_requests USING btree (user_id);

ALTER TABLE ONLY identity.sso_link_requests
    ADD CONSTRAINT sso_link_requests_account_id_fkey FOREIGN KEY (account_id) REFERENCES identity.accounts(id);

ALTER TABLE ONLY identity.sso_link_requests
    ADD CONSTRAINT sso_link_requests_user_id_fkey FOREIGN KEY (user_id) REFERENCES identity.users(id);

CREATE TABLE identity.user_identities (
    provider text NOT NULL,
    subject text NOT NULL,
    user_id uuid NOT NULL,
    email text,
    email_verified boolean DEFAULT false NOT NULL,
    linked_at timestamp with time zone DEFAULT now() NOT NULL,
    last_sign_in_at timestamp with time zone,
    CONSTRAINT user_identities_email_check CHECK ((length(email) <= 320)),
    CONSTRAINT user_identities_provider_check CHECK ((provider = ANY (ARRAY['google'::text, 'github'::text, 'sso'::text]))),
    CONSTRAINT user_identities_subject_check CHECK (((length(subject) >= 1) AND (length(subject) <= 255)))
);

COMMENT ON TABLE identity.user_identities IS 'A provider account (Google''s OpenID Connect sub, GitHub''s numeric user id) linked to a pgtally user: at most one per provider and user. Linked at first sign-in, by a verified email, or from the account page.';

COMMENT ON COLUMN identity.user_identities.subject IS 'The provider''s stable user id (OIDC sub, GitHub id): never the email, which can change.';

ALTER TABLE ONLY identity.user_identities
    ADD CONSTRAINT user_identities_pkey PRIMARY KEY (provider, subject);

ALTER TABLE ONLY identity.user_identities
    ADD CONSTRAINT user_identities_user_id_provider_key UNIQUE (user_id, provider);

ALTER TABLE ONLY identity.user_identities
    ADD CONSTRAINT user_identities_user_id_fkey FOREIGN KEY (user_id) REFERENCES identity.users(id) ON DELETE CASCADE;

CREATE TABLE identity.users (
    id uuid DEFAULT util.uuid_v7() NOT NULL,
    account_id uuid NOT NULL,
    email text NOT NULL,
    email_normalized text NOT NULL,
    password_hash text,
    email_verified_at timestamp with time zone,
    password_changed_at timestamp with time zone DEFAULT now() NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    referral_code text DEFAULT util.referral_code() NOT NULL,
    staff_role text,
    CONSTRAINT users_email_check CHECK (((length(email) >= 3) AND (length(email) <= 320))),
    CONSTRAINT users_email_normalized_check CHECK ((email_normalized = lower(email_normalized))),
    CONSTRAINT users_referral_code_check CHECK ((referral_code ~ '^[a-z0-9]{8}$'::text)),
    CONSTRAINT users_staff_role_check CHECK ((staff_role = ANY (ARRAY['support'::text, 'admin'::text])))
);

COMMENT ON TABLE identity.users IS 'People who sign in with an email and password; each owns a personal account.';

COMMENT ON COLUMN identity.users.email_normalized IS 'lower(trim(email)): one user per address, whatever its case.';

COMMENT ON COLUMN identity.users.password_hash IS 'argon2id hash in PHC string format (argon2-cffi); the password itself never reaches the database. NULL for a user who signs in only through a provider.';

COMMENT ON COLUMN identity.users.referral_code IS 'The person''s referral code (their link is PGTALLY_PUBLIC_URL/r/CODE).';

COMMENT ON COLUMN identity.users.staff_role IS 'The operator''s role (pgtally staff grant EMAIL ROLE): support (reads accounts, users, events, metrics) or admin (everything); NULL for customers.';

ALTER TABLE ONLY identity.users
    ADD CONSTRAINT users_account_id_key UNIQUE (account_id);

ALTER TABLE ONLY identity.users
    ADD CONSTRAINT users_email_normalized_key UNIQUE (email_normalized);

ALTER TABLE identity.users
    ADD CONSTRAINT users_password_hash_length CHECK ((length(password_hash) <= 512)) NOT VALID;

ALTER TABLE ONLY identity.users
    ADD CONSTRAINT users_pkey PRIMARY KEY (id);

ALTER TABLE ONLY identity.users
    ADD CONSTRAINT users_referral_code_key UNIQUE (referral_code);

ALTER TABLE ONLY identity.users
    ADD CONSTRAINT users_account_id_fkey FOREIGN KEY (account_id) REFERENCES identity.accounts(id) DEFERRABLE INITIALLY DEFERRED;

CREATE TABLE ledger.archived_balances (
    month date NOT NULL,
    account_id uuid,
    system_account text,
    amount_micros numeric NOT NULL,
    entries bigint NOT NULL,
    entry_id bigint,
    CONSTRAINT archived_balances_check CHECK (((account_id IS NULL) <> (system_account IS NULL)))
);

COMMENT ON TABLE ledger.archived_balances IS 'What each account''s entries of a detached month summed to (micro-credits) and how many there were, written by api.detach_month in the transaction that detaches the month: the reconciliation views add these sums to the entries still attached. entry_id NULL: the month''s sum; set: one entry of the month kept by itself (entries = 1) because it was written after an entry of a later month of the same account, so reporting.entry_balance_breaks counts it at its place (its id).';

COMMENT ON COLUMN ledger.archived_balances.entry_id IS 'NULL for a month''s sum; the id of a single detached entry that came after the next month had begun for its account (see the table comment).';

ALTER TABLE ONLY ledger.archived_balances
    ADD CONSTRAINT archived_balances_month_account_id_system_account_key UNIQUE NULLS NOT DISTINCT (month, account_id, system_account, entry_id);

CREATE TABLE ledger.credit_lots (
    id uuid DEFAULT util.uuid_v7() NOT NULL,
    account_id uuid NOT NULL,
    source ledger.lot_source NOT NULL,
    amount_micros bigint NOT NULL,
    remaining_micros bigint NOT NULL,
    status ledger.lot_status NOT NULL,
    grant_key util.idempotency_key NOT NULL,
    transfer_id uuid,
    available_at timestamp with time zone NOT NULL,
    expires_at timestamp with time zone,
    created_at timestamp with time zone NOT NULL,
    settled_at timestamp with time zone,
    memo util.note,
    paid boolean GENERATED ALWAYS AS (((source)::text = ANY (ARRAY['purchase'::text, 'subscription_grant'::text]))) STORED,
    CONSTRAINT credit_lots_amount_micros_check CHECK ((amount_micros > 0)),
    CONSTRAINT credit_lots_check CHECK (((remaining_micros >= 0) AND (remaining_micros <= amount_micros))),
    CONSTRAINT credit_lots_check1 CHECK ((((status)::text <> ALL (ARRAY['pending'::text, 'canceled'::text])) OR (transfer_id IS NULL)))
);

COMMENT ON TABLE ledger.credit_lots IS 'Every credit that enters an account is a lot: where it came from (source), how much, what remains, when it expires and when it is spendable. The cached balance is the sum of active lots'' remaining (reporting.lot_balance_mismatches); charges spend lots in the burn order of ledger.spend_lots. pending: granted, not spendable before available_at (no ledger transfer yet); active: in the balance (its transfer_id brought it); expired: its remainder was taken by an expiry transfer; canceled: a pending lot that never became spendable (a referral reward whose payment was refunded).';

COMMENT ON COLUMN ledger.credit_lots.grant_key IS 'Once per account: the key of the grant that made the lot (its transfer''s idempotency key).';

COMMENT ON COLUMN ledger.credit_lots.paid IS 'Bought credits (purchase, subscription_grant); promotional credits (the rest) are spent before paid ones of the same expiry.';

ALTER TABLE ONLY ledger.credit_lots
    ADD CONSTRAINT credit_lots_grant_key UNIQUE (account_id, grant_key);

ALTER TABLE ONLY ledger.credit_lots
    ADD CONSTRAINT credit_lots_pkey PRIMARY KEY (id);

CREATE INDEX credit_lots_due_idx ON ledger.credit_lots USING btree (COALESCE(expires_at, available_at)) WHERE (((status)::text = 'pending'::text) OR (((status)::text = 'active'::text) AND (remaining_micros > 0) AND (expires_at IS NOT NULL)));

CREATE INDEX credit_lots_spendable_idx ON ledger.credit_lots USING btree (account_id, expires_at) WHERE (((status)::text = 'active'::text) AND (remaining_micros > 0));

CREATE TABLE ledger.entries (
    id bigint CONSTRAINT entries_id_not_null1 NOT NULL,
    transfer_id uuid CONSTRAINT entries_transfer_id_not_null1 NOT NULL,
    account_id uuid,
    system_account text,
    amount_micros ledger.amount_micros CONSTRAINT entries_amount_micros_not_null1 NOT NULL,
    balance_after_micros bigint,
    created_at timestamp with time zone DEFAULT now() CONSTRAINT entries_created_at_not_null1 NOT NULL,
    CONSTRAINT entries_check2 CHECK (((account_id IS NULL) <> (system_account IS NULL))),
    CONSTRAINT entries_check3 CHECK (((account_id IS NULL) = (balance_after_micros IS NULL)))
)
PARTITION BY RANGE (created_at);

COMMENT ON TABLE ledger.entries IS 'One side of a transfer: micro-credits added to (positive) or taken from (negative) one account. Append-only. Partitioned by month of created_at like metering.usage_events; a month that leaves (api.detach_month) leaves its sums per account in ledger.archived_balances, so the reconciliation views still balance.';

COMMENT ON COLUMN ledger.entries.account_id IS 'Customer account of this side, or NULL for a system account.';

COMMENT ON COLUMN ledger.entries.system_account IS 'System account of this side, or NULL for a customer account.';

COMMENT ON COLUMN ledger.entries.balance_after_micros IS 'The customer account''s balance right after this entry (NULL for system accounts).';

ALTER TABLE ledger.entries ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME ledger.entries_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

ALTER TABLE ONLY ledger.entries ATTACH PARTITION ledger.entries_default DEFAULT;

ALTER TABLE ONLY ledger.entries
    ADD CONSTRAINT entries_pkey PRIMARY KEY (id, created_at);

CREATE INDEX entries_account_id_idx ON ONLY ledger.entries USING btree (account_id, id) WHERE (account_id IS NOT NULL);

CREATE INDEX entries_transfer_id_idx ON ONLY ledger.entries USING btree (transfer_id) WHERE (account_id IS NOT NULL);

ALTER INDEX ledger.entries_account_id_idx ATTACH PARTITION ledger.entries_default_account_id_id_idx;

ALTER INDEX ledger.entries_pkey ATTACH PARTITION ledger.entries_default_pkey;

ALTER INDEX ledger.entries_transfer_id_idx ATTACH PARTITION ledger.entries_default_transfer_id_idx;

CREATE TRIGGER entries_append_only BEFORE DELETE OR UPDATE ON ledger.entries FOR EACH STATEMENT EXECUTE FUNCTION util.forbid_change();

CREATE TRIGGER entries_balanced AFTER INSERT ON ledger.entries REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT EXECUTE FUNCTION ledger.check_transfers_balanced();

CREATE TRIGGER entries_no_truncate BEFORE TRUNCATE ON ledger.entries FOR EACH STATEMENT EXECUTE FUNCTION util.forbid_change();

CREATE TABLE ledger.entries_default (
    id bigint CONSTRAINT entries_id_not_null1 NOT NULL,
    transfer_id uuid CONSTRAINT entries_transfer_id_not_null1 NOT NULL,
    account_id uuid,
    system_account text,
    amount_micros ledger.amount_micros CONSTRAINT entries_amount_micros_not_null1 NOT NULL,
    balance_after_micros bigint,
    created_at timestamp with time zone DEFAULT now() CONSTRAINT entries_created_at_not_null1 NOT NULL,
    CONSTRAINT entries_check2 CHECK (((account_id IS NULL) <> (system_account IS NULL))),
    CONSTRAINT entries_check3 CHECK (((account_id IS NULL) = (balance_after_micros IS NULL)))
);

COMMENT ON TABLE ledger.entries_default IS 'Ledger entries of months that have no partition of their own yet; util.ensure_partitions moves them into their month when it makes it.';

ALTER TABLE ONLY ledger.entries_default
    ADD CONSTRAINT entries_default_pkey PRIMARY KEY (id, created_at);

ALTER DOMAIN ledger.memo
    ADD CONSTRAINT memo_check CHECK ((length(VALUE) <= 500)) NOT VALID;

CREATE INDEX entries_default_account_id_id_idx ON ledger.entries_default USING btree (account_id, id) WHERE (account_id IS NOT NULL);

CREATE INDEX entries_default_transfer_id_idx ON ledger.entries_default USING btree (transfer_id) WHERE (account_id IS NOT NULL);

CREATE TRIGGER entries_append_only BEFORE DELETE OR UPDATE ON ledger.entries_default FOR EACH STATEMENT EXECUTE FUNCTION util.forbid_change();

CREATE TRIGGER entries_no_truncate BEFORE TRUNCATE ON ledger.entries_default FOR EACH STATEMENT EXECUTE FUNCTION util.forbid_change();

CREATE TABLE ledger.system_accounts (
    code text NOT NULL,
    description text NOT NULL
);

COMMENT ON TABLE ledger.system_accounts IS 'The house side of every transfer. Their balances are not cached (a cached house balance would be one row every charge locks); reporting.system_balances sums them.';

ALTER TABLE ONLY ledger.system_accounts
    ADD CONSTRAINT system_accounts_pkey PRIMARY KEY (code);

CREATE TABLE ledger.transfers (
    id uuid DEFAULT util.uuid_v7() NOT NULL,
    account_id uuid NOT NULL,
    kind ledger.transfer_kind NOT NULL,
    amount_micros ledger.amount_micros NOT NULL,
    idempotency_key util.idempotency_key,
    usage_event_id uuid,
    memo ledger.memo,
    created_at timestamp with time zone DEFAULT now() NOT NULL
);

COMMENT ON TABLE ledger.transfers IS 'A movement of credits between a customer account and a system account. Its two ledger.entries sum to zero. Append-only.';

COMMENT ON COLUMN ledger.transfers.amount_micros IS 'Micro-credits moved into the customer account (negative: out of it, as for usage).';

COMMENT ON COLUMN ledger.transfers.idempotency_key IS 'Caller''s idempotency key, unique per account: a retried grant is applied once.';

ALTER TABLE ONLY ledger.transfers
    ADD CONSTRAINT transfers_pkey PRIMARY KEY (id);

CREATE UNIQUE INDEX transfers_idempotency_key ON ledger.transfers USING btree (account_id, idempotency_key) WHERE (idempotency_key IS NOT NULL);

CREATE TRIGGER transfers_append_only BEFORE DELETE OR UPDATE ON ledger.transfers FOR EACH STATEMENT EXECUTE FUNCTION util.forbid_change();

CREATE TRIGGER transfers_no_truncate BEFORE TRUNCATE ON ledger.transfers FOR EACH STATEMENT EXECUTE FUNCTION util.forbid_change();

CREATE TABLE metering.active_accounts_daily (
    day date NOT NULL,
    dau bigint NOT NULL,
    wau bigint NOT NULL,
    mau bigint NOT NULL
);

COMMENT ON TABLE metering.active_accounts_daily IS 'Accounts with usage on the UTC day (dau), in the 7 days (wau) and the 30 days (mau) ending on it. Recomputed by api.rollup_usage for the days its new events touch.';

ALTER TABLE ONLY metering.active_accounts_daily
    ADD CONSTRAINT active_accounts_daily_pkey PRIMARY KEY (day);

CREATE TABLE metering.allowance_usage (
    account_id uuid NOT NULL,
    meter_id text NOT NULL,
    period_start timestamp with time zone NOT NULL,
    period_end timestamp with time zone NOT NULL,
    used util.count DEFAULT 0 NOT NULL,
    CONSTRAINT allowance_usage_check CHECK ((period_end > period_start))
);

COMMENT ON TABLE metering.allowance_usage IS 'Allowance units counted against an entitlement per account, meter and period. A new period starts a new row, which is how allowances reset.';

COMMENT ON COLUMN metering.allowance_usage.used IS 'Units counted against the entitlement in this window. A window''s row starts from all usage the account already made in it (metering.window_usage), so a plan change or a device merge never hands out a fresh allowance for usage already made.';

ALTER TABLE ONLY metering.allowance_usage
    ADD CONSTRAINT allowance_usage_pkey PRIMARY KEY (account_id, meter_id, period_start);

CREATE TABLE metering.budget_windows (
    budget_id uuid NOT NULL,
    period_start timestamp with time zone NOT NULL,
    period_end timestamp with time zone NOT NULL,
    spent_micros bigint NOT NULL,
    alerted smallint[] DEFAULT '{}'::smallint[] NOT NULL,
    CONSTRAINT budget_windows_check CHECK ((period_end > period_start)),
    CONSTRAINT budget_windows_spent_micros_check CHECK ((spent_micros >= 0))
);

COMMENT ON TABLE metering.budget_windows IS 'What a budget''s window has spent, one row per budget and window, written under the account''s lock by the charge, batch or hold that spends. A window''s row starts from the credits the budget''s subject already spent in it (metering.budget_window_usage), so a budget set mid-window counts the window''s earlier spending.';

COMMENT ON COLUMN metering.budget_windows.spent_micros IS 'Micro-credits spent in the window by the budget''s subject, open holds included.';

COMMENT ON COLUMN metering.budget_windows.alerted IS 'The alert thresholds (percent) already emailed in this window: each once.';

ALTER TABLE ONLY metering.budget_windows
    ADD CONSTRAINT budget_windows_pkey PRIMARY KEY (budget_id, period_start);

ALTER TABLE ONLY metering.budget_windows
    ADD CONSTRAINT budget_windows_budget_id_fkey FOREIGN KEY (budget_id) REFERENCES metering.budgets(id) ON DELETE CASCADE;

CREATE TABLE metering.budgets (
    id uuid DEFAULT util.uuid_v7() NOT NULL,
    account_id uuid NOT NULL,
    scope text NOT NULL,
    subject uuid NOT NULL,
    limit_micros bigint NOT NULL,
    period text NOT NULL,
    alerts smallint[] DEFAULT '{}'::smallint[] NOT NULL,
    created_at timestamp with time zone NOT NULL,
    created_by uuid,
    CONSTRAINT budgets_account_subject CHECK (((scope <> 'account'::text) OR (subject = account_id))),
    CONSTRAINT budgets_alerts_check CHECK (((cardinality(alerts) <= 10) AND (1 <= ALL (alerts)) AND (100 >= ALL (alerts)))),
    CONSTRAINT budgets_limit_micros_check CHECK ((limit_micros > 0)),
    CONSTRAINT budgets_period_check CHECK ((period = ANY (ARRAY['day'::text, 'month'::text, 'billing_period'::text]))),
    CONSTRAINT budgets_scope_check CHECK ((scope = ANY (ARRAY['api_key'::text, 'member'::text, 'account'::text])))
);

COMMENT ON TABLE metering.budgets IS 'Spending caps set by a customer (issue #28): at most limit_micros of credits spent per window by one API key (scope api_key, subject: the key''s id), one member across the keys they made and their sessions (scope member, subject: the user id) or the whole account (scope account, subject: the account id), on this account. A charge that would pass it is refused (TL4B2, 402 budget-exceeded) and charges nothing; crossing an alert threshold emails once per window.';

COMMENT ON COLUMN metering.budgets.limit_micros IS 'The cap, in micro-credits spent per window (allowance units and post-paid usage cost no credits and do not count).';

COMMENT ON COLUMN metering.budgets.period IS 'The window: day (UTC calendar day), month (UTC calendar month) or billing_period (the subscription period, else the calendar month), as metering.period_bounds.';

COMMENT ON COLUMN metering.budgets.alerts IS 'Soft thresholds, percent of the limit (1-100, at most 10): crossing one emails the account''s owners and admins (and the member, for a member budget) once per window.';

COMMENT ON COLUMN metering.budgets.created_by IS 'The user who set it (NULL: an operator or an API key).';

ALTER TABLE ONLY metering.budgets
    ADD CONSTRAINT budgets_one_per_window UNIQUE (account_id, scope, subject, period);

ALTER TABLE ONLY metering.budgets
    ADD CONSTRAINT budgets_pkey PRIMARY KEY (id);

ALTER TABLE ONLY metering.budgets
    ADD CONSTRAINT budgets_account_id_fkey FOREIGN KEY (account_id) REFERENCES identity.accounts(id);

CREATE TABLE metering.holds (
    id uuid DEFAULT util.uuid_v7() NOT NULL,
    account_id uuid NOT NULL,
    idempotency_key text NOT NULL,
    request_hash bytea NOT NULL,
    meter_id text NOT NULL,
    quantity bigint NOT NULL,
    input_tokens bigint,
    output_tokens bigint,
    allowance_units bigint NOT NULL,
    credits_micros bigint NOT NULL,
    period_start timestamp with time zone,
    status text DEFAULT 'open'::text NOT NULL,
    created_at timestamp with time zone NOT NULL,
    expires_at timestamp with time zone NOT NULL,
    settled_at timestamp with time zone,
    api_key_id uuid,
    user_id uuid,
    budget_ids uuid[],
    CONSTRAINT holds_allowance_units_check CHECK ((allowance_units >= 0)),
    CONSTRAINT holds_check CHECK (((status = 'open'::text) = (settled_at IS NULL))),
    CONSTRAINT holds_credits_micros_check CHECK ((credits_micros >= 0)),
    CONSTRAINT holds_idempotency_key_check CHECK (((length(idempotency_key) >= 1) AND (length(idempotency_key) <= 255))),
    CONSTRAINT holds_input_tokens_check CHECK ((input_tokens >= 0)),
    CONSTRAINT holds_output_tokens_check CHECK ((output_tokens >= 0)),
    CONSTRAINT holds_quantity_check CHECK ((quantity > 0)),
    CONSTRAINT holds_status_check CHECK ((status = ANY (ARRAY['open'::text, 'captured'::text, 'released'::text, 'expired'::text])))
);

COMMENT ON TABLE metering.holds IS 'Reservations for pay-per-use work: the allowance units and micro-credits a request would cost, reserved in the account-row transaction that charges, so no other charge or hold can spend them. Captured (one usage event with the actual amount, key hold:<id>), released, or expired (released by itself), exactly once.';

COMMENT ON COLUMN metering.holds.period_start IS 'The allowance window the reserved units were counted in.';

COMMENT ON COLUMN metering.holds.api_key_id IS 'The API key that made the hold (NULL: a session).';

COMMENT ON COLUMN metering.holds.user_id IS 'The person the hold is attributed to (as metering.usage_events.user_id).';

COMMENT ON COLUMN metering.holds.budget_ids IS 'The budgets whose current window counts the hold''s credits as spent (NULL: none); settling the hold gives them back to those windows (metering.budgets_return).';

ALTER TABLE ONLY metering.holds
    ADD CONSTRAINT holds_idempotency_key UNIQUE (account_id, idempotency_key);

ALTER TABLE ONLY metering.holds
    ADD CONSTRAINT holds_pkey PRIMARY KEY (id);

CREATE INDEX holds_open_expiry_idx ON metering.holds USING btree (expires_at) WHERE (status = 'open'::text);

CREATE INDEX holds_open_idx ON metering.holds USING btree (account_id, expires_at) WHERE (status = 'open'::text);

ALTER TABLE ONLY metering.holds
    ADD CONSTRAINT holds_account_id_fkey FOREIGN KEY (account_id) REFERENCES identity.accounts(id);

ALTER TABLE ONLY metering.holds
    ADD CONSTRAINT holds_meter_id_fkey FOREIGN KEY (meter_id) REFERENCES metering.meters(id);

CREATE TABLE metering.idempotency_keys (
    account_id uuid NOT NULL,
    idempotency_key util.idempotency_key NOT NULL,
    usage_event_id uuid NOT NULL,
    created_at timestamp with time zone NOT NULL,
    request_hash bytea NOT NULL
);

COMMENT ON TABLE metering.idempotency_keys IS 'The idempotency keys of usage events, unique per account, without the partition key: a retry finds its event here (usage_event_id, created_at: the event''s partition) and is answered from it. Kept for the idempotency window after the event (metering.idempotency_window(), 30 days unless pgtally.idempotency_window says otherwise), then forgotten by api.maintain_storage: a key older than that charges again.';

COMMENT ON COLUMN metering.idempotency_keys.request_hash IS 'sha256 of the canonical request (metering.request_hash), to tell a retry from a different request under the same key (TL409).';

ALTER TABLE ONLY metering.idempotency_keys
    ADD CONSTRAINT idempotency_keys_pkey PRIMARY KEY (account_id, idempotency_key);

CREATE INDEX idempotency_keys_created_at_idx ON metering.idempotency_keys USING btree (created_at);

CREATE TABLE metering.meters (
    id text NOT NULL,
    name text NOT NULL,
    unit text NOT NULL,
    pricing text NOT NULL,
    unit_price_micros bigint,
    input_price_micros_per_mtok bigint,
    output_price_micros_per_mtok bigint,
    margin numeric(10,4) DEFAULT 1 NOT NULL,
    CONSTRAINT meters_check CHECK (
CASE pricing
    WHEN 'unit'::text THEN ((unit_price_micros IS NOT NULL) AND (input_price_micros_per_mtok IS NULL) AND (output_price_micros_per_mtok IS NULL))
    ELSE ((unit_price_micros IS NULL) AND (input_price_micros_per_mtok IS NOT NULL) AND (output_price_micros_per_mtok IS NOT NULL))
END),
    CONSTRAINT meters_id_check CHECK ((id ~ '^[a-z][a-z0-9_]{0,62}$'::text)),
    CONSTRAINT meters_input_price_micros_per_mtok_check CHECK ((input_price_micros_per_mtok >= 0)),
    CONSTRAINT meters_margin_check CHECK ((margin > (0)::numeric)),
    CONSTRAINT meters_output_price_micros_per_mtok_check CHECK ((output_price_micros_per_mtok >= 0)),
    CONSTRAINT meters_pricing_check CHECK ((pricing = ANY (ARRAY['unit'::text, 'tokens'::text]))),
    CONSTRAINT meters_unit_price_micros_check CHECK ((unit_price_micros >= 0))
);

COMMENT ON TABLE metering.meters IS 'Meters and their rate cards. pricing=unit: each unit beyond the allowance costs unit_price_micros. pricing=tokens: a call costs ceil((input_tokens * input_price + output_tokens * output_price) / 1e6 * margin) micro-credits (2-console-app-billing-usage.md).';

COMMENT ON COLUMN metering.meters.unit IS 'Name of one unit in messages, for example generation.';

COMMENT ON COLUMN metering.meters.unit_price_micros IS 'Micro-credits per unit (1 credit = 1,000,000) for pricing=unit.';

COMMENT ON COLUMN metering.meters.input_price_micros_per_mtok IS 'Micro-credits per million input tokens, for pricing=tokens.';

COMMENT ON COLUMN metering.meters.output_price_micros_per_mtok IS 'Micro-credits per million output tokens, for pricing=tokens.';

COMMENT ON COLUMN metering.meters.margin IS 'Multiplier applied to the token cost (1.2 = 20% margin), for pricing=tokens.';

ALTER TABLE metering.meters
    ADD CONSTRAINT meters_name_length CHECK ((length(name) <= 200)) NOT VALID;

ALTER TABLE ONLY metering.meters
    ADD CONSTRAINT meters_pkey PRIMARY KEY (id);

ALTER TABLE metering.meters
    ADD CONSTRAINT meters_unit_length CHECK ((length(unit) <= 63)) NOT VALID;

CREATE TABLE metering.reversals (
    id uuid DEFAULT util.uuid_v7() NOT NULL,
    account_id uuid NOT NULL,
    usage_event_id uuid NOT NULL,
    event_created_at timestamp with time zone NOT NULL,
    idempotency_key text NOT NULL,
    request_hash bytea NOT NULL,
    quantity bigint NOT NULL,
    allowance_units bigint NOT NULL,
    credits_micros bigint NOT NULL,
    amount_minor bigint,
    currency text,
    allowance_returned boolean NOT NULL,
    transfer_id uuid,
    lots jsonb DEFAULT '[]'::jsonb NOT NULL,
    reason text NOT NULL,
    api_key_id uuid,
    user_id uuid,
    staff_user_id uuid,
    operator_key_id uuid,
    created_at timestamp with time zone NOT NULL,
    balance_after_micros bigint NOT NULL,
    CONSTRAINT reversals_allowance_units_check CHECK ((allowance_units >= 0)),
    CONSTRAINT reversals_amount_minor_check CHECK ((amount_minor >= 0)),
    CONSTRAINT reversals_by_someone CHECK ((num_nonnulls(staff_user_id, operator_key_id) <= 1)),
    CONSTRAINT reversals_credits_micros_check CHECK ((credits_micros >= 0)),
    CONSTRAINT reversals_idempotency_key_check CHECK (((length(idempotency_key) >= 1) AND (length(idempotency_key) <= 255))),
    CONSTRAINT reversals_quantity_check CHECK ((quantity > 0)),
    CONSTRAINT reversals_reason_check CHECK (((length(reason) >= 1) AND (length(reason) <= 500))),
    CONSTRAINT reversals_transfer CHECK (((credits_micros > 0) = (transfer_id IS NOT NULL)))
);

COMMENT ON TABLE metering.reversals IS 'Reversals of usage events (issue #28), full or partial, each once per idempotency key: the units reversed and what they had cost (allowance units, credits, post-paid amount). Credits come back by a ledger transfer of kind reversal (transfer_id) into the lots the charge drew from (lots); the sum of an event''s reversals never exceeds what it charged (reporting.reversal_mismatches). Written by metering.reverse_usage under the account''s lock.';

COMMENT ON COLUMN metering.reversals.event_created_at IS 'The reversed event''s created_at: its partition, and the windows (allowance, budgets) it counted in.';

COMMENT ON COLUMN metering.reversals.request_hash IS 'Fingerprint of the reversal request (event, quantity, reason), compared on retries of the idempotency key.';

COMMENT ON COLUMN metering.reversals.quantity IS 'Units of the event reversed (a token meter''s event is one unit: reversed whole).';

COMMENT ON COLUMN metering.reversals.allowance_units IS 'Allowance units (units, or micro-credits of cost for token meters) the reversed part had used; given back to the window when allowance_returned.';

COMMENT ON COLUMN metering.reversals.credits_micros IS 'Micro-credits given back to the account.';

COMMENT ON COLUMN metering.reversals.amount_minor IS 'Post-paid: what the reversed units cost (minor units of currency): a credit owed to the customer (reporting.post_paid_credits_owed). Cancelling the Stripe meter event is a follow-up.';

COMMENT ON COLUMN metering.reversals.allowance_returned IS 'Whether the allowance units went back to their window (only while that window is still open).';

COMMENT ON COLUMN metering.reversals.lots IS 'Where the credits went, in the order given back (reverse burn order): [{lot_id, credits, new_lot}]; new_lot when the lot had expired or been canceled since, so a new lot of source reversal holds them.';

COMMENT ON COLUMN metering.reversals.staff_user_id IS 'The staff user who reversed it (also in ops.audit_log).';

COMMENT ON COLUMN metering.reversals.operator_key_id IS 'The operator API key (scope usage:reverse) that reversed it.';

COMMENT ON COLUMN metering.reversals.balance_after_micros IS 'The account''s credit balance right after the reversal (micro-credits), as its answer shows it, first time and on replays.';

ALTER TABLE ONLY metering.reversals
    ADD CONSTRAINT reversals_idempotency_key UNIQUE (account_id, idempotency_key);

ALTER TABLE ONLY metering.reversals
    ADD CONSTRAINT reversals_pkey PRIMARY KEY (id);

CREATE INDEX reversals_event_idx ON metering.reversals USING btree (account_id, usage_event_id);

ALTER TABLE ONLY metering.reversals
    ADD CONSTRAINT reversals_account_id_fkey FOREIGN KEY (account_id) REFERENCES identity.accounts(id);

ALTER TABLE ONLY metering.reversals
    ADD CONSTRAINT reversals_staff_user_id_fkey FOREIGN KEY (staff_user_id) REFERENCES identity.users(id);

CREATE TABLE metering.rollup_state (
    singleton boolean DEFAULT true NOT NULL,
    last_id uuid DEFAULT '00000000-0000-0000-0000-000000000000'::uuid NOT NULL,
    updated_at timestamp with time zone,
    CONSTRAINT rollup_state_singleton_check CHECK (singleton)
);

COMMENT ON TABLE metering.rollup_state IS 'How far api.rollup_usage has read metering.usage_events: the id (time-ordered, version 7) of the last event folded in. It reads in id order and stops at the first event less than a minute old, so a charge still committing is never passed over; no index beyond the primary key is needed.';

ALTER TABLE ONLY metering.rollup_state
    ADD CONSTRAINT rollup_state_pkey PRIMARY KEY (singleton);

CREATE TABLE metering.usage_events (
    id uuid DEFAULT util.uuid_v7() CONSTRAINT usage_events_id_not_null1 NOT NULL,
    account_id uuid CONSTRAINT usage_events_account_id_not_null1 NOT NULL,
    created_at timestamp with time zone DEFAULT now() CONSTRAINT usage_events_created_at_not_null1 NOT NULL,
    quantity util.quantity CONSTRAINT usage_events_quantity_not_null1 NOT NULL,
    allowance_units util.count CONSTRAINT usage_events_allowance_units_not_null1 NOT NULL,
    credits_micros util.micro_credits CONSTRAINT usage_events_credits_micros_not_null1 NOT NULL,
    balance_after_micros bigint,
    used_after util.count,
    period_start timestamp with time zone,
    period_end timestamp with time zone,
    input_tokens util.count,
    output_tokens util.count,
    amount_minor util.minor_units,
    meter_id text CONSTRAINT usage_events_meter_id_not_null1 NOT NULL,
    idempotency_key util.idempotency_key CONSTRAINT usage_events_idempotency_key_not_null1 NOT NULL,
    plan_id text,
    currency util.currency,
    warnings metering.warnings,
    metadata metering.event_metadata,
    response jsonb,
    api_key_id uuid,
    user_id uuid,
    lot_id uuid,
    lot_draws jsonb,
    CONSTRAINT usage_events_check CHECK (((response IS NULL) = (balance_after_micros IS NOT NULL)))
)
PARTITION BY RANGE (created_at);

COMMENT ON TABLE metering.usage_events IS 'One row per charged usage event, partitioned by month of created_at (metering.usage_events_yYYYYmMM, made ahead by util.ensure_partitions; rows outside them land in usage_events_default). A charge''s answer is rebuilt from the row (metering.usage_event_answer); its idempotency key is remembered in metering.idempotency_keys for the idempotency window. Old months leave with api.detach_month.';

COMMENT ON COLUMN metering.usage_events.allowance_units IS 'Allowance units this event used.';

COMMENT ON COLUMN metering.usage_events.credits_micros IS 'Micro-credits this event spent from the credit balance.';

COMMENT ON COLUMN metering.usage_events.balance_after_micros IS 'The account''s credit balance right after the charge (micro-credits), as the answer shows it.';

COMMENT ON COLUMN metering.usage_events.used_after IS 'The allowance window''s usage right after the charge (units, or micro-credits of cost for token meters); NULL when the plan has no entitlement for the meter.';

COMMENT ON COLUMN metering.usage_events.period_start IS 'The allowance window the event was counted in: [period_start, period_end).';

COMMENT ON COLUMN metering.usage_events.amount_minor IS 'Post-paid events: what the event costs in minor currency units (quantity x the entitlement''s unit_amount_minor), billed by Stripe''s invoice; NULL for prepaid events.';

COMMENT ON COLUMN metering.usage_events.idempotency_key IS 'The caller''s idempotency key for the event, as listed with it; unique per account through metering.idempotency_keys while the key is remembered.';

COMMENT ON COLUMN metering.usage_events.plan_id IS 'The plan whose entitlement the event was charged under (NULL: none), to rebuild the answer''s allowance.';

COMMENT ON COLUMN metering.usage_events.currency IS 'Post-paid events: the currency of amount_minor.';

COMMENT ON COLUMN metering.usage_events.warnings IS 'The threshold warnings the charge crossed (NULL: none).';

COMMENT ON COLUMN metering.usage_events.metadata IS 'The caller''s metadata for the event (a JSON object of at most 2 KB: a request id, a thumbnail URL, a model name); part of the idempotency fingerprint, returned with the event.';

COMMENT ON COLUMN metering.usage_events.response IS 'Events charged before migration 0017 only: the JSON answer given the first time, returned as is on a replay.';

COMMENT ON COLUMN metering.usage_events.api_key_id IS 'The API key that made the charge (NULL: a session, or charged before migration 0032). A service key acting on another account is recorded too.';

COMMENT ON COLUMN metering.usage_events.user_id IS 'The person the charge is attributed to: the session''s user, or the member who made the API key (identity.api_keys.created_by); NULL for operator keys and anonymous devices. What member budgets count.';

COMMENT ON COLUMN metering.usage_events.lot_id IS 'The credit lot the charge''s credits came from (the first, when several): what a reversal gives them back to. NULL when no credits were spent, or charged before migration 0032b.';

COMMENT ON COLUMN metering.usage_events.lot_draws IS 'When the credits came from several lots: [[lot id, micro-credits], ...] in burn order (NULL for one lot: lot_id and credits_micros say it all).';

ALTER TABLE ONLY metering.usage_events ATTACH PARTITION metering.usage_events_default DEFAULT;

ALTER TABLE ONLY metering.usage_events
    ADD CONSTRAINT usage_events_pkey PRIMARY KEY (id, created_at);

CREATE INDEX usage_events_account_id_id_idx ON ONLY metering.usage_events USING btree (account_id, id);

CREATE INDEX usage_events_account_meter_created_idx ON ONLY metering.usage_events USING btree (account_id, meter_id, created_at);

CREATE INDEX usage_events_post_paid_idx ON ONLY metering.usage_events USING btree (account_id, created_at) WHERE (amount_minor IS NOT NULL);

ALTER INDEX metering.usage_events_post_paid_idx ATTACH PARTITION metering.usage_events_default_account_id_created_at_idx;

ALTER INDEX metering.usage_events_account_id_id_idx ATTACH PARTITION metering.usage_events_default_account_id_id_idx;

ALTER INDEX metering.usage_events_account_meter_created_idx ATTACH PARTITION metering.usage_events_default_account_id_meter_id_created_at_idx;

ALTER INDEX metering.usage_events_pkey ATTACH PARTITION metering.usage_events_default_pkey;

CREATE TABLE metering.usage_events_default (
    id uuid DEFAULT util.uuid_v7() CONSTRAINT usage_events_id_not_null1 NOT NULL,
    account_id uuid CONSTRAINT usage_events_account_id_not_null1 NOT NULL,
    created_at timestamp with time zone DEFAULT now() CONSTRAINT usage_events_created_at_not_null1 NOT NULL,
    quantity util.quantity CONSTRAINT usage_events_quantity_not_null1 NOT NULL,
    allowance_units util.count CONSTRAINT usage_events_allowance_units_not_null1 NOT NULL,
    credits_micros util.micro_credits CONSTRAINT usage_events_credits_micros_not_null1 NOT NULL,
    balance_after_micros bigint,
    used_after util.count,
    period_start timestamp with time zone,
    period_end timestamp with time zone,
    input_tokens util.count,
    output_tokens util.count,
    amount_minor util.minor_units,
    meter_id text CONSTRAINT usage_events_meter_id_not_null1 NOT NULL,
    idempotency_key util.idempotency_key CONSTRAINT usage_events_idempotency_key_not_null1 NOT NULL,
    plan_id text,
    currency util.currency,
    warnings metering.warnings,
    metadata metering.event_metadata,
    response jsonb,
    api_key_id uuid,
    user_id uuid,
    lot_id uuid,
    lot_draws jsonb,
    CONSTRAINT usage_events_check CHECK (((response IS NULL) = (balance_after_micros IS NOT NULL)))
);

COMMENT ON TABLE metering.usage_events_default IS 'Usage events of months that have no partition of their own yet; util.ensure_partitions moves them into their month when it makes it.';

ALTER TABLE ONLY metering.usage_events_default
    ADD CONSTRAINT usage_events_default_pkey PRIMARY KEY (id, created_at);

CREATE INDEX usage_events_default_account_id_created_at_idx ON metering.usage_events_default USING btree (account_id, created_at) WHERE (amount_minor IS NOT NULL);

CREATE INDEX usage_events_default_account_id_id_idx ON metering.usage_events_default USING btree (account_id, id);

CREATE INDEX usage_events_default_account_id_meter_id_created_at_idx ON metering.usage_events_default USING btree (account_id, meter_id, created_at);

CREATE TABLE metering.usage_rollup_daily (
    day date NOT NULL,
    account_id uuid NOT NULL,
    meter_id text NOT NULL,
    plan_id text NOT NULL,
    events bigint NOT NULL,
    quantity bigint NOT NULL,
    credits_micros bigint NOT NULL
);

COMMENT ON TABLE metering.usage_rollup_daily IS 'Usage per UTC day, account and meter (events, units, micro-credits), with the account''s plan when it was rolled up. Maintained by api.rollup_usage from metering.usage_events.';

ALTER TABLE ONLY metering.usage_rollup_daily
    ADD CONSTRAINT usage_rollup_daily_pkey PRIMARY KEY (day, account_id, meter_id);

CREATE INDEX usage_rollup_daily_account_idx ON metering.usage_rollup_daily USING btree (account_id, day);

CREATE TABLE metering.usage_rollup_hourly (
    hour timestamp with time zone NOT NULL,
    meter_id text NOT NULL,
    events bigint NOT NULL,
    quantity bigint NOT NULL
);

COMMENT ON TABLE metering.usage_rollup_hourly IS 'Usage per UTC hour and meter, all accounts together. Maintained by api.rollup_usage.';

ALTER TABLE ONLY metering.usage_rollup_hourly
    ADD CONSTRAINT usage_rollup_hourly_pkey PRIMARY KEY (hour, meter_id);

CREATE TABLE metering.usage_rollup_monthly (
    month date NOT NULL,
    account_id uuid NOT NULL,
    meter_id text NOT NULL,
    plan_id text NOT NULL,
    events bigint NOT NULL,
    quantity bigint NOT NULL,
    credits_micros bigint NOT NULL
);

COMMENT ON TABLE metering.usage_rollup_monthly IS 'Usage per UTC month, account, meter and plan (as rolled up): what the per-account percentiles read. Maintained by api.rollup_usage.';

ALTER TABLE ONLY metering.usage_rollup_monthly
    ADD CONSTRAINT usage_rollup_monthly_pkey PRIMARY KEY (month, account_id, meter_id, plan_id);

CREATE TABLE ops.alerts (
    condition text NOT NULL,
    last_sent_at timestamp with time zone NOT NULL,
    last_detail jsonb DEFAULT '{}'::jsonb NOT NULL,
    CONSTRAINT alerts_condition_check CHECK ((condition = ANY (ARRAY['webhook_rejected'::text, 'reconciliation'::text, 'outbox_failed'::text])))
);

COMMENT ON TABLE ops.alerts IS 'When each alert condition last emailed the operators (PGTALLY_ALERT_EMAIL): at most once an hour per condition. webhook_rejected: signed Stripe events that could not be applied; reconciliation: a row in a reconciliation view; outbox_failed: messages that exhausted their retries (emails, meter events, top-ups).';

ALTER TABLE ONLY ops.alerts
    ADD CONSTRAINT alerts_pkey PRIMARY KEY (condition);

CREATE TABLE ops.audit_log (
    id bigint NOT NULL,
    at timestamp with time zone NOT NULL,
    staff_user_id uuid NOT NULL,
    staff_role text NOT NULL,
    action text NOT NULL,
    target_account_id uuid,
    target_user_id uuid,
    reason text NOT NULL,
    before jsonb,
    after jsonb,
    CONSTRAINT audit_log_action_check CHECK ((action = ANY (ARRAY['adjust_credits'::text, 'refund'::text, 'set_plan'::text, 'suspend'::text, 'unsuspend'::text, 'revoke_sessions'::text, 'approve_sso_domain'::text, 'reverse_usage'::text]))),
    CONSTRAINT audit_log_reason_check CHECK (((length(reason) >= 1) AND (length(reason) <= 500)))
);

COMMENT ON TABLE ops.audit_log IS 'Every staff action (who, their role, what, on which account or user, why, the state before and after), written in the action''s own transaction. Append-only.';

ALTER TABLE ops.audit_log ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME ops.audit_log_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

ALTER TABLE ONLY ops.audit_log
    ADD CONSTRAINT audit_log_pkey PRIMARY KEY (id);

CREATE INDEX audit_log_account_idx ON ops.audit_log USING btree (target_account_id, at);

CREATE TRIGGER audit_log_append_only BEFORE DELETE OR UPDATE ON ops.audit_log FOR EACH STATEMENT EXECUTE FUNCTION util.forbid_change();

CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON ops.audit_log FOR EACH STATEMENT EXECUTE FUNCTION util.forbid_change();

ALTER TABLE ONLY ops.audit_log
    ADD CONSTRAINT audit_log_staff_user_id_fkey FOREIGN KEY (staff_user_id) REFERENCES identity.users(id);

ALTER TABLE ONLY ops.audit_log
    ADD CONSTRAINT audit_log_target_account_id_fkey FOREIGN KEY (target_account_id) REFERENCES identity.accounts(id);

ALTER TABLE ONLY ops.audit_log
    ADD CONSTRAINT audit_log_target_user_id_fkey FOREIGN KEY (target_user_id) REFERENCES identity.users(id);

CREATE TABLE outbox.messages (
    id uuid DEFAULT util.uuid_v7() NOT NULL,
    kind text NOT NULL,
    recipient text NOT NULL,
    payload jsonb DEFAULT '{}'::jsonb NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    attempts integer DEFAULT 0 NOT NULL,
    next_attempt_at timestamp with time zone DEFAULT now() NOT NULL,
    delivered_at timestamp with time zone,
    failed_at timestamp with time zone,
    last_error text,
    CONSTRAINT messages_kind_check CHECK ((kind = ANY (ARRAY['verify_email'::text, 'account_exists'::text, 'password_reset'::text, 'usage_warning'::text, 'auto_topup'::text, 'auto_topup_disabled'::text, 'meter_event'::text, 'alert'::text, 'payment_failed'::text, 'receipt'::text, 'subscription_ending'::text, 'subscription_canceled'::text, 'invitation'::text, 'sso_link'::text, 'cancel_duplicate_subscription'::text, 'subscription_duplicate'::text, 'invoice_topup'::text])))
);

COMMENT ON TABLE outbox.messages IS 'Emails to send, written in the transaction that caused them. pgtally worker claims due rows (FOR UPDATE SKIP LOCKED, with a lease), sends them and marks them delivered; failures retry with exponential backoff, 8 attempts.';

COMMENT ON COLUMN outbox.messages.kind IS 'An email (verify_email, account_exists, password_reset, usage_warning, auto_topup_disabled, payment_failed, receipt, subscription_ending, subscription_canceled, subscription_duplicate, invitation, sso_link; alert: to the operators) or a task for the worker (auto_topup: pay a bundle with the saved card; meter_event: report a post-paid usage event to Stripe, the message id being the usage event''s id; cancel_duplicate_subscription: cancel and refund a second subscription; invoice_topup: the invoice of a top-up paid by a PaymentIntent).';

COMMENT ON COLUMN outbox.messages.payload IS 'Template variables; a link token lives here only until delivery, then it is removed.';

ALTER TABLE outbox.messages
    ADD CONSTRAINT messages_last_error_length CHECK ((length(last_error) <= 1000)) NOT VALID;

ALTER TABLE ONLY outbox.messages
    ADD CONSTRAINT messages_pkey PRIMARY KEY (id);

ALTER TABLE outbox.messages
    ADD CONSTRAINT messages_recipient_length CHECK ((length(recipient) <= 320)) NOT VALID;

CREATE INDEX messages_pending_idx ON outbox.messages USING btree (next_attempt_at) WHERE ((delivered_at IS NULL) AND (failed_at IS NULL));

----------------------------------------------------------------------------------------------------
-- Views
----------------------------------------------------------------------------------------------------
CREATE VIEW reporting.active_accounts_daily AS
 SELECT day,
    dau,
    wau,
    mau
   FROM metering.active_accounts_daily;

COMMENT ON VIEW reporting.active_accounts_daily IS 'DAU, WAU and MAU: accounts with usage on the UTC day, and in the 7 and 30 days ending on it (from the usage rollup: events of the last minute are not in yet).';

GRANT SELECT ON TABLE reporting.active_accounts_daily TO pgtally_analyst;

CREATE VIEW reporting.arpu_monthly AS
 SELECT r.month,
    r.currency,
    r.revenue_minor,
    r.paying_accounts,
    round((r.revenue_minor / (NULLIF(r.paying_accounts, 0))::numeric), 2) AS arpu_minor,
    c.churn_percent,
    round(((r.revenue_minor / (NULLIF(r.paying_accounts, 0))::numeric) / NULLIF((c.churn_percent / (100)::numeric), (0)::numeric)), 2) AS clv_minor
   FROM (reporting.revenue_monthly r
     LEFT JOIN ( SELECT churn_by_plan_monthly.month,
            churn_by_plan_monthly.currency,
            round(((100.0 * sum(churn_by_plan_monthly.churned)) / sum(churn_by_plan_monthly.subscribers_at_start)), 2) AS churn_percent
           FROM reporting.churn_by_plan_monthly
          GROUP BY churn_by_plan_monthly.month, churn_by_plan_monthly.currency) c ON (((c.month = r.month) AND (c.currency = r.currency))));

COMMENT ON VIEW reporting.arpu_monthly IS 'ARPU (revenue / paying accounts, minor units) per UTC month and currency, the month''s subscriber churn (all plans, %), and a simple CLV = ARPU / monthly churn (null when nobody churned).';

GRANT SELECT ON TABLE reporting.arpu_monthly TO pgtally_analyst;

CREATE VIEW reporting.audit_log AS
 SELECT l.id,
    l.at,
    u.email AS staff_email,
    l.staff_role,
    l.action,
    l.target_account_id,
    l.target_user_id,
    l.reason,
    l.before,
    l.after
   FROM (ops.audit_log l
     JOIN identity.users u ON ((u.id = l.staff_user_id)));

COMMENT ON VIEW reporting.audit_log IS 'The operators'' actions, newest last: who (email, role), what, on what, why, before and after.';

GRANT SELECT ON TABLE reporting.audit_log TO pgtally_analyst;

CREATE VIEW reporting.auth_events_daily AS
 SELECT (date_trunc('day'::text, (created_at AT TIME ZONE 'UTC'::text)))::date AS day,
    kind,
    count(*) AS events
   FROM identity.auth_events
  GROUP BY ((date_trunc('day'::text, (created_at AT TIME ZONE 'UTC'::text)))::date), kind;

COMMENT ON VIEW reporting.auth_events_daily IS 'Authentication events per UTC day and kind.';

GRANT SELECT ON TABLE reporting.auth_events_daily TO pgtally_analyst;

CREATE VIEW reporting.balance_mismatches AS
 SELECT a.id AS account_id,
    a.credit_balance_micros AS cached_micros,
    COALESCE(e.total, (0)::bigint) AS ledger_micros,
    ((a.credit_balance_micros)::bigint - COALESCE(e.total, (0)::bigint)) AS difference_micros
   FROM (identity.accounts a
     LEFT JOIN ( SELECT x.account_id,
            (sum(x.amount))::bigint AS total
           FROM ( SELECT entries.account_id,
                    entries.amount_micros AS amount
                   FROM ledger.entries
                  WHERE (entries.account_id IS NOT NULL)
                UNION ALL
                 SELECT archived_balances.account_id,
                    archived_balances.amount_micros
                   FROM ledger.archived_balances
                  WHERE (archived_balances.account_id IS NOT NULL)) x
          GROUP BY x.account_id) e ON ((e.account_id = a.id)))
  WHERE ((a.credit_balance_micros)::bigint <> COALESCE(e.total, (0)::bigint));

COMMENT ON VIEW reporting.balance_mismatches IS 'Reconciliation: accounts whose cached credit balance differs from the sum of their ledger entries (with the sums of detached months, ledger.archived_balances). Must be empty.';

GRANT SELECT ON TABLE reporting.balance_mismatches TO pgtally_analyst;

CREATE VIEW reporting.churn_by_plan_monthly AS
 SELECT month,
    plan_at_start AS plan_id,
    currency,
    count(*) AS subscribers_at_start,
    count(*) FILTER (WHERE (mrr_end_minor = (0)::numeric)) AS churned,
    round(((100.0 * (count(*) FILTER (WHERE (mrr_end_minor = (0)::numeric)))::numeric) / (count(*))::numeric), 2) AS subscriber_churn_percent,
    sum(mrr_start_minor) AS mrr_start_minor,
    sum((mrr_start_minor - LEAST(mrr_end_minor, mrr_start_minor))) AS mrr_lost_minor,
    round(((100.0 * sum((mrr_start_minor - LEAST(mrr_end_minor, mrr_start_minor)))) / sum(mrr_start_minor)), 2) AS revenue_churn_percent
   FROM reporting.mrr_account_months
  WHERE (mrr_start_minor > (0)::numeric)
  GROUP BY month, plan_at_start, currency;

COMMENT ON VIEW reporting.churn_by_plan_monthly IS 'Churn per UTC month and the plan subscribers had at its start: subscribers then, how many stopped paying by its end (subscriber churn %), and the MRR lost to churn and contraction over the MRR at the start (gross revenue churn %).';

GRANT SELECT ON TABLE reporting.churn_by_plan_monthly TO pgtally_analyst;

CREATE VIEW reporting.conversion_by_cohort AS
 WITH firsts AS (
         SELECT u.account_id,
            ((date_trunc('month'::text, u.created_at, 'UTC'::text) AT TIME ZONE 'UTC'::text))::date AS cohort,
            u.created_at,
            LEAST(( SELECT min(c.at) AS min
                   FROM billing.mrr_changes c
                  WHERE ((c.account_id = u.account_id) AND (c.mrr_minor > (0)::numeric))), ( SELECT min(p.paid_at) AS min
                   FROM billing.payments p
                  WHERE (p.account_id = u.account_id))) AS first_paid_at
           FROM identity.users u
        )
 SELECT cohort,
    count(*) AS signed_up,
    count(first_paid_at) AS converted,
    count(*) FILTER (WHERE (first_paid_at < (created_at + '30 days'::interval))) AS converted_in_30_days,
    round(((100.0 * (count(first_paid_at))::numeric) / (count(*))::numeric), 2) AS conversion_percent
   FROM firsts
  GROUP BY cohort;

COMMENT ON VIEW reporting.conversion_by_cohort IS 'Free-to-paid conversion by sign-up cohort (UTC month a person signed up): how many signed up, how many have paid since (a subscription or a bundle), how many within 30 days, and the %.';

GRANT SELECT ON TABLE reporting.conversion_by_cohort TO pgtally_analyst;

CREATE VIEW reporting.entry_balance_breaks AS
 SELECT id AS entry_id,
    account_id,
    balance_after_micros,
    running_micros
   FROM ( SELECT x.id,
            x.account_id,
            x.balance_after_micros,
            x.attached,
            (COALESCE(s.archived, (0)::numeric) + sum(x.amount_micros) OVER (PARTITION BY x.account_id ORDER BY x.id)) AS running_micros
           FROM (( SELECT e.id,
                    e.account_id,
                    (e.amount_micros)::numeric AS amount_micros,
                    e.balance_after_micros,
                    true AS attached
                   FROM ledger.entries e
                  WHERE (e.account_id IS NOT NULL)
                UNION ALL
                 SELECT b.entry_id,
                    b.account_id,
                    b.amount_micros,
                    NULL::bigint,
                    false
                   FROM ledger.archived_balances b
                  WHERE ((b.entry_id IS NOT NULL) AND (b.account_id IS NOT NULL))) x
             LEFT JOIN ( SELECT archived_balances.account_id,
                    sum(archived_balances.amount_micros) AS archived
                   FROM ledger.archived_balances
                  WHERE ((archived_balances.entry_id IS NULL) AND (archived_balances.account_id IS NOT NULL))
                  GROUP BY archived_balances.account_id) s ON ((s.account_id = x.account_id)))) r
  WHERE (attached AND ((balance_after_micros)::numeric <> running_micros));

COMMENT ON VIEW reporting.entry_balance_breaks IS 'Reconciliation: customer entries whose recorded balance_after differs from the running sum of the account''s entries in id order (starting from what its detached months summed to, with the detached entries kept one by one at their places). Must be empty.';

GRANT SELECT ON TABLE reporting.entry_balance_breaks TO pgtally_analyst;

CREATE VIEW reporting.hold_mismatches AS
 SELECT a.id AS account_id,
    a.held_micros,
    COALESCE(h.open_micros, (0)::bigint) AS open_holds_micros
   FROM (identity.accounts a
     LEFT JOIN ( SELECT holds.account_id,
            (sum(holds.credits_micros))::bigint AS open_micros
           FROM metering.holds
          WHERE (holds.status = 'open'::text)
          GROUP BY holds.account_id) h ON ((h.account_id = a.id)))
  WHERE (a.held_micros <> COALESCE(h.open_micros, (0)::bigint));

COMMENT ON VIEW reporting.hold_mismatches IS 'Reconciliation: accounts whose held_micros differ from the credits of their open holds. Must be empty.';

GRANT SELECT ON TABLE reporting.hold_mismatches TO pgtally_analyst;

CREATE VIEW reporting.ledger_reference_breaks AS
 SELECT 'entry'::text AS row_kind,
    (e.id)::text AS row_id,
    'transfer'::text AS missing,
    (e.transfer_id)::text AS reference
   FROM ledger.entries e
  WHERE (NOT (EXISTS ( SELECT 1
           FROM ledger.transfers t
          WHERE (t.id = e.transfer_id))))
UNION ALL
 SELECT 'entry'::text AS row_kind,
    (e.id)::text AS row_id,
    'account'::text AS missing,
    (e.account_id)::text AS reference
   FROM ledger.entries e
  WHERE ((e.account_id IS NOT NULL) AND (NOT (EXISTS ( SELECT 1
           FROM identity.accounts a
          WHERE (a.id = e.account_id)))))
UNION ALL
 SELECT 'entry'::text AS row_kind,
    (e.id)::text AS row_id,
    'system_account'::text AS missing,
    e.system_account AS reference
   FROM ledger.entries e
  WHERE ((e.system_account IS NOT NULL) AND (NOT (EXISTS ( SELECT 1
           FROM ledger.system_accounts s
          WHERE (s.code = e.system_account)))))
UNION ALL
 SELECT 'transfer'::text AS row_kind,
    (t.id)::text AS row_id,
    'account'::text AS missing,
    (t.account_id)::text AS reference
   FROM ledger.transfers t
  WHERE (NOT (EXISTS ( SELECT 1
           FROM identity.accounts a
          WHERE (a.id = t.account_id))))
UNION ALL
 SELECT 'usage_event'::text AS row_kind,
    (u.id)::text AS row_id,
    'account'::text AS missing,
    (u.account_id)::text AS reference
   FROM metering.usage_events u
  WHERE (NOT (EXISTS ( SELECT 1
           FROM identity.accounts a
          WHERE (a.id = u.account_id))))
UNION ALL
 SELECT 'usage_event'::text AS row_kind,
    (u.id)::text AS row_id,
    'meter'::text AS missing,
    u.meter_id AS reference
   FROM metering.usage_events u
  WHERE (NOT (EXISTS ( SELECT 1
           FROM metering.meters m
          WHERE (m.id = u.meter_id))))
UNION ALL
 SELECT 'allowance_window'::text AS row_kind,
    ((((w.account_id || ' '::text) || w.meter_id) || ' '::text) || ((w.period_start AT TIME ZONE 'UTC'::text))::text) AS row_id,
    'account'::text AS missing,
    (w.account_id)::text AS reference
   FROM metering.allowance_usage w
  WHERE (NOT (EXISTS ( SELECT 1
           FROM identity.accounts a
          WHERE (a.id = w.account_id))))
UNION ALL
 SELECT 'allowance_window'::text AS row_kind,
    ((((w.account_id || ' '::text) || w.meter_id) || ' '::text) || ((w.period_start AT TIME ZONE 'UTC'::text))::text) AS row_id,
    'meter'::text AS missing,
    w.meter_id AS reference
   FROM metering.allowance_usage w
  WHERE (NOT (EXISTS ( SELECT 1
           FROM metering.meters m
          WHERE (m.id = w.meter_id))))
UNION ALL
 SELECT 'credit_lot'::text AS row_kind,
    (l.id)::text AS row_id,
    'account'::text AS missing,
    (l.account_id)::text AS reference
   FROM ledger.credit_lots l
  WHERE (NOT (EXISTS ( SELECT 1
           FROM identity.accounts a
          WHERE (a.id = l.account_id))))
UNION ALL
 SELECT 'credit_lot'::text AS row_kind,
    (l.id)::text AS row_id,
    'transfer'::text AS missing,
    (l.transfer_id)::text AS reference
   FROM ledger.credit_lots l
  WHERE ((l.transfer_id IS NOT NULL) AND (NOT (EXISTS ( SELECT 1
           FROM ledger.transfers t
          WHERE (t.id = l.transfer_id)))));

COMMENT ON VIEW reporting.ledger_reference_breaks IS 'Reconciliation: ledger entries, transfers, usage events, allowance windows and credit lots that name a transfer, account, system account or meter that does not exist. These references are not foreign keys (a foreign-key check per row was the largest share of a charge''s cost, and a batch paid one per event again on the rows it updates more than once; ledger.post_transfer, ledger.grant_lot and metering.charge write them from rows they just locked, read or wrote); this view proves them. Must be empty.';

GRANT SELECT ON TABLE reporting.ledger_reference_breaks TO pgtally_analyst;

CREATE VIEW reporting.lot_balance_mismatches AS
 SELECT a.id AS account_id,
    a.credit_balance_micros,
    COALESCE(l.remaining, (0)::bigint) AS active_lots_micros
   FROM (identity.accounts a
     LEFT JOIN ( SELECT credit_lots.account_id,
            (sum(credit_lots.remaining_micros))::bigint AS remaining
           FROM ledger.credit_lots
          WHERE ((credit_lots.status)::text = 'active'::text)
          GROUP BY credit_lots.account_id) l ON ((l.account_id = a.id)))
  WHERE ((a.credit_balance_micros)::bigint <> COALESCE(l.remaining, (0)::bigint));

COMMENT ON VIEW reporting.lot_balance_mismatches IS 'Reconciliation: accounts whose cached balance differs from what remains of their active credit lots. Must be empty.';

GRANT SELECT ON TABLE reporting.lot_balance_mismatches TO pgtally_analyst;

CREATE VIEW reporting.meter_event_reports_daily AS
 SELECT e.account_id,
    (date_trunc('day'::text, (e.created_at AT TIME ZONE 'UTC'::text)))::date AS day,
    count(*) FILTER (WHERE (m.delivered_at IS NOT NULL)) AS reported,
    count(*) FILTER (WHERE ((m.delivered_at IS NULL) AND (m.failed_at IS NULL))) AS pending,
    count(*) FILTER (WHERE (m.failed_at IS NOT NULL)) AS failed,
    count(*) FILTER (WHERE (m.id IS NULL)) AS missing,
    sum((e.quantity)::bigint) FILTER (WHERE (m.delivered_at IS NOT NULL)) AS reported_units,
    sum((e.amount_minor)::bigint) AS amount_minor
   FROM (metering.usage_events e
     LEFT JOIN outbox.messages m ON ((m.id = e.id)))
  WHERE (e.amount_minor IS NOT NULL)
  GROUP BY e.account_id, ((date_trunc('day'::text, (e.created_at AT TIME ZONE 'UTC'::text)))::date);

COMMENT ON VIEW reporting.meter_event_reports_daily IS 'Post-paid usage events per account and UTC day: reported to Stripe (the meter event was accepted), pending (queued or retrying), failed (retries exhausted: see outbox.messages.last_error) and missing (no report queued: must be 0); units reported and the amount charged locally, in minor units.';

GRANT SELECT ON TABLE reporting.meter_event_reports_daily TO pgtally_analyst;

CREATE VIEW reporting.meter_total_mismatches AS
 WITH reported AS (
         SELECT ((m.payload ->> 'account_id'::text))::uuid AS account_id,
            (m.payload ->> 'event_name'::text) AS event_name,
            ((to_timestamp((((m.payload ->> 'timestamp'::text))::bigint)::double precision) AT TIME ZONE 'UTC'::text))::date AS day,
            sum(((m.payload ->> 'value'::text))::numeric) AS reported_units
           FROM outbox.messages m
          WHERE ((m.kind = 'meter_event'::text) AND (m.delivered_at IS NOT NULL))
          GROUP BY ((m.payload ->> 'account_id'::text))::uuid, (m.payload ->> 'event_name'::text), (((to_timestamp((((m.payload ->> 'timestamp'::text))::bigint)::double precision) AT TIME ZONE 'UTC'::text))::date)
        )
 SELECT s.account_id,
    s.event_name,
    s.day,
    COALESCE(r.reported_units, (0)::numeric) AS reported_units,
    s.stripe_units,
    (s.stripe_units - COALESCE(r.reported_units, (0)::numeric)) AS difference_units,
    s.checked_at,
    ( SELECT array_agg(DISTINCT e.stripe_event_id) AS array_agg
           FROM billing.meter_error_reports e
          WHERE ((e.validation_start < ((s.day + 1))::timestamp with time zone) AND (e.validation_end >= (s.day)::timestamp with time zone))) AS error_reports
   FROM (billing.meter_event_summaries s
     LEFT JOIN reported r USING (account_id, event_name, day))
  WHERE (s.stripe_units <> COALESCE(r.reported_units, (0)::numeric));

COMMENT ON VIEW reporting.meter_total_mismatches IS 'Reconciliation: per account, Stripe meter (event_name) and UTC day, the post-paid units pgtally reported (and Stripe accepted) against what Stripe''s meter event summaries count, where they differ (difference_units = Stripe - pgtally), with the error reports of that day (billing.meter_error_reports): usage pgtally charged that Stripe will not bill. Must be empty.';

GRANT SELECT ON TABLE reporting.meter_total_mismatches TO pgtally_analyst;

CREATE VIEW reporting.mrr_account_months AS
 WITH months AS (
         SELECT generate_series(date_trunc('month'::text, min(mrr_changes.at), 'UTC'::text), date_trunc('month'::text, util.now(), 'UTC'::text), '1 mon'::interval) AS month
           FROM billing.mrr_changes
        ), accounts AS (
         SELECT DISTINCT mrr_changes.account_id
           FROM billing.mrr_changes
        )
 SELECT ((m.month AT TIME ZONE 'UTC'::text))::date AS month,
    a.account_id,
    COALESCE(e.currency, s.currency) AS currency,
    s.plan_id AS plan_at_start,
    e.plan_id AS plan_at_end,
    COALESCE(s.mrr_minor, (0)::numeric) AS mrr_start_minor,
    COALESCE(e.mrr_minor, (0)::numeric) AS mrr_end_minor,
    (EXISTS ( SELECT 1
           FROM billing.mrr_changes c
          WHERE ((c.account_id = a.account_id) AND (c.at < m.month) AND (c.mrr_minor > (0)::numeric)))) AS paid_before
   FROM (((months m
     CROSS JOIN accounts a)
     LEFT JOIN LATERAL ( SELECT c.currency,
            c.mrr_minor,
            c.plan_id
           FROM billing.mrr_changes c
          WHERE ((c.account_id = a.account_id) AND (c.at < m.month))
          ORDER BY c.at DESC, c.id DESC
         LIMIT 1) s ON (true))
     LEFT JOIN LATERAL ( SELECT c.currency,
            c.mrr_minor,
            c.plan_id
           FROM billing.mrr_changes c
          WHERE ((c.account_id = a.account_id) AND (c.at < (m.month + '1 mon'::interval)))
          ORDER BY c.at DESC, c.id DESC
         LIMIT 1) e ON (true))
  WHERE ((s.mrr_minor > (0)::numeric) OR (e.mrr_minor > (0)::numeric));

COMMENT ON VIEW reporting.mrr_account_months IS 'Each subscribing account''s MRR at the start and the end of each UTC month (from billing.mrr_changes; minor units, yearly prices / 12), its plan then, and whether it had paid before the month: what the MRR, movement and churn views add up.';

GRANT SELECT ON TABLE reporting.mrr_account_months TO pgtally_analyst;

CREATE VIEW reporting.mrr_monthly AS
 SELECT month,
    currency,
    round(sum(mrr_end_minor), 2) AS mrr_minor,
    round(((12)::numeric * sum(mrr_end_minor)), 2) AS arr_minor,
    count(*) FILTER (WHERE (mrr_end_minor > (0)::numeric)) AS subscribers
   FROM reporting.mrr_account_months
  GROUP BY month, currency;

COMMENT ON VIEW reporting.mrr_monthly IS 'MRR and ARR (= 12 x MRR) at the end of each UTC month (the current one: now), per currency, in minor units; yearly prices count as a twelfth a month. subscribers: accounts paying then.';

GRANT SELECT ON TABLE reporting.mrr_monthly TO pgtally_analyst;

CREATE VIEW reporting.mrr_movements_monthly AS
 SELECT month,
    currency,
    COALESCE(sum(mrr_end_minor) FILTER (WHERE ((mrr_start_minor = (0)::numeric) AND (NOT paid_before))), (0)::numeric) AS new_minor,
    COALESCE(sum((mrr_end_minor - mrr_start_minor)) FILTER (WHERE ((mrr_start_minor > (0)::numeric) AND (mrr_end_minor > mrr_start_minor))), (0)::numeric) AS expansion_minor,
    COALESCE(sum((mrr_start_minor - mrr_end_minor)) FILTER (WHERE ((mrr_end_minor > (0)::numeric) AND (mrr_end_minor < mrr_start_minor))), (0)::numeric) AS contraction_minor,
    COALESCE(sum(mrr_start_minor) FILTER (WHERE (mrr_end_minor = (0)::numeric)), (0)::numeric) AS churned_minor,
    COALESCE(sum(mrr_end_minor) FILTER (WHERE ((mrr_start_minor = (0)::numeric) AND paid_before)), (0)::numeric) AS reactivated_minor,
    (sum(mrr_end_minor) - sum(mrr_start_minor)) AS net_minor
   FROM reporting.mrr_account_months
  GROUP BY month, currency;

COMMENT ON VIEW reporting.mrr_movements_monthly IS 'MRR movements per UTC month and currency (minor units), account by account from the month''s start to its end: new (first paid month), expansion, contraction, churned (to zero), reactivated (paying again after a gap); net = the month''s MRR change.';

GRANT SELECT ON TABLE reporting.mrr_movements_monthly TO pgtally_analyst;

CREATE VIEW reporting.outbox_backlog AS
 SELECT kind,
    count(*) FILTER (WHERE ((delivered_at IS NULL) AND (failed_at IS NULL))) AS pending,
    count(*) FILTER (WHERE (failed_at IS NOT NULL)) AS failed,
    min(created_at) FILTER (WHERE ((delivered_at IS NULL) AND (failed_at IS NULL))) AS oldest_pending
   FROM outbox.messages
  GROUP BY kind;

COMMENT ON VIEW reporting.outbox_backlog IS 'Outbox messages waiting or given up, per kind.';

GRANT SELECT ON TABLE reporting.outbox_backlog TO pgtally_analyst;

CREATE VIEW reporting.payments_vs_ledger_daily AS
 WITH pay AS (
         SELECT (date_trunc('day'::text, (payments.paid_at AT TIME ZONE 'UTC'::text)))::date AS day,
            payments.currency,
            sum(payments.amount_minor) AS paid_minor,
            sum(payments.refunded_minor) AS refunded_minor,
            sum(payments.credits_micros) AS credits_sold_micros
           FROM billing.payments
          GROUP BY ((date_trunc('day'::text, (payments.paid_at AT TIME ZONE 'UTC'::text)))::date), payments.currency
        ), led AS (
         SELECT (date_trunc('day'::text, (t.created_at AT TIME ZONE 'UTC'::text)))::date AS day,
            sum((t.amount_micros)::bigint) AS ledger_purchase_micros
           FROM ledger.transfers t
          WHERE ((t.kind)::text = 'purchase'::text)
          GROUP BY ((date_trunc('day'::text, (t.created_at AT TIME ZONE 'UTC'::text)))::date)
        )
 SELECT COALESCE(pay.day, led.day) AS day,
    pay.currency,
    COALESCE(pay.paid_minor, (0)::numeric) AS paid_minor,
    COALESCE(pay.refunded_minor, (0)::numeric) AS refunded_minor,
    COALESCE(pay.credits_sold_micros, (0)::numeric) AS credits_sold_micros,
    COALESCE(led.ledger_purchase_micros, (0)::numeric) AS ledger_purchase_micros,
    (COALESCE(pay.credits_sold_micros, (0)::numeric) - COALESCE(led.ledger_purchase_micros, (0)::numeric)) AS difference_micros
   FROM (pay
     FULL JOIN led ON ((led.day = pay.day)));

COMMENT ON VIEW reporting.payments_vs_ledger_daily IS 'Per UTC day: Stripe bundle payments (minor units) and the credits they sold against the purchase credits the ledger holds; difference_micros should be 0.';

GRANT SELECT ON TABLE reporting.payments_vs_ledger_daily TO pgtally_analyst;

CREATE VIEW reporting.post_paid_credits_owed AS
 SELECT account_id,
    usage_event_id,
    id AS reversal_id,
    amount_minor,
    currency,
    reason,
    created_at
   FROM metering.reversals r
  WHERE (amount_minor > 0);

COMMENT ON VIEW reporting.post_paid_credits_owed IS 'Post-paid usage reversed after it was reported to Stripe: what each reversal owes the customer (minor units). Stripe meter event adjustments are not sent yet: credit it on the next invoice (or refund).';

GRANT SELECT ON TABLE reporting.post_paid_credits_owed TO pgtally_analyst;

CREATE VIEW reporting.post_paid_invoice_drift AS
 SELECT i.stripe_invoice_id,
    i.account_id,
    i.metered_period_start,
    i.metered_period_end,
    i.currency,
    i.metered_amount_minor AS invoiced_minor,
    COALESCE(u.amount, (0)::bigint) AS recorded_minor,
    round(((100.0 * ((i.metered_amount_minor - COALESCE(u.amount, (0)::bigint)))::numeric) / (NULLIF(COALESCE(u.amount, (0)::bigint), 0))::numeric), 2) AS drift_percent,
    ((abs((i.metered_amount_minor - COALESCE(u.amount, (0)::bigint))))::numeric <= (0.01 * (COALESCE(u.amount, (0)::bigint))::numeric)) AS within_1_percent
   FROM (billing.invoices i
     LEFT JOIN LATERAL ( SELECT (sum((e.amount_minor)::bigint))::bigint AS amount
           FROM metering.usage_events e
          WHERE ((e.account_id = i.account_id) AND (e.amount_minor IS NOT NULL) AND (e.created_at >= i.metered_period_start) AND (e.created_at < i.metered_period_end))) u ON (true))
  WHERE (i.metered_period_start IS NOT NULL);

COMMENT ON VIEW reporting.post_paid_invoice_drift IS 'Each paid invoice with metered lines against the post-paid usage pgtally charged the account in the same period: invoiced vs recorded (minor units), the drift in percent of what was recorded, and whether it is within 1% (the generation app''s success criterion, seeds/4-saas-monetisation-plan.md).';

GRANT SELECT ON TABLE reporting.post_paid_invoice_drift TO pgtally_analyst;

CREATE VIEW reporting.referral_funnel_daily AS
 SELECT (date_trunc('day'::text, (created_at AT TIME ZONE 'UTC'::text)))::date AS day,
    count(*) AS signed_up,
    count(qualified_at) AS qualified,
    count(*) FILTER (WHERE (status = 'rewarded'::text)) AS rewarded,
    count(*) FILTER (WHERE (rejected_reason = 'self_referral'::text)) AS rejected_self_referral,
    count(*) FILTER (WHERE (rejected_reason = 'own_device'::text)) AS rejected_own_device,
    count(*) FILTER (WHERE (rejected_reason = 'same_ip'::text)) AS rejected_same_ip,
    count(*) FILTER (WHERE (rejected_reason = 'same_fingerprint'::text)) AS rejected_same_fingerprint,
    count(*) FILTER (WHERE (rejected_reason = 'monthly_cap'::text)) AS rejected_monthly_cap,
    count(*) FILTER (WHERE (rejected_reason = 'refunded'::text)) AS rejected_refunded
   FROM billing.referrals
  GROUP BY ((date_trunc('day'::text, (created_at AT TIME ZONE 'UTC'::text)))::date);

COMMENT ON VIEW reporting.referral_funnel_daily IS 'Referrals by the UTC day the referee signed up: signed up, qualified, rewarded, and rejected by reason.';

GRANT SELECT ON TABLE reporting.referral_funnel_daily TO pgtally_analyst;

CREATE VIEW reporting.referral_reward_mismatches AS
 SELECT r.referee_account_id,
    r.status,
    l.id AS lot_id,
    l.status AS lot_status,
    count(t.id) AS transfers
   FROM ((billing.referrals r
     JOIN ledger.credit_lots l ON (((l.id = r.referrer_lot_id) OR (l.id = r.referee_lot_id))))
     LEFT JOIN ledger.transfers t ON (((t.account_id = l.account_id) AND ((t.idempotency_key)::text = (l.grant_key)::text))))
  GROUP BY r.referee_account_id, r.status, l.id, l.status
 HAVING (count(t.id) <>
        CASE
            WHEN ((l.status)::text = ANY (ARRAY['active'::text, 'expired'::text])) THEN 1
            ELSE 0
        END)
UNION ALL
 SELECT r.referee_account_id,
    r.status,
    NULL::uuid AS lot_id,
    NULL::text AS lot_status,
    0 AS transfers
   FROM billing.referrals r
  WHERE ((r.status = 'rewarded'::text) AND (r.referrer_lot_id IS NULL) AND (( SELECT referral_program.referrer_reward_micros
           FROM billing.referral_program) > 0));

COMMENT ON VIEW reporting.referral_reward_mismatches IS 'Reconciliation: referral rewards without exactly one ledger transfer once spendable (none while pending or canceled), and rewarded referrals without a reward lot. Must be empty.';

GRANT SELECT ON TABLE reporting.referral_reward_mismatches TO pgtally_analyst;

CREATE VIEW reporting.retention_weekly AS
 WITH weeks AS (
         SELECT DISTINCT usage_rollup_daily.account_id,
            (date_trunc('week'::text, (usage_rollup_daily.day)::timestamp with time zone))::date AS week
           FROM metering.usage_rollup_daily
        ), cohorts AS (
         SELECT weeks.account_id,
            min(weeks.week) AS cohort
           FROM weeks
          GROUP BY weeks.account_id
        )
 SELECT c.cohort,
    ((w.week - c.cohort) / 7) AS weeks_since,
    count(*) AS active_accounts,
    round(((100.0 * (count(*))::numeric) / (max(s.size))::numeric), 2) AS retention_percent
   FROM ((weeks w
     JOIN cohorts c USING (account_id))
     JOIN ( SELECT cohorts.cohort,
            count(*) AS size
           FROM cohorts
          GROUP BY cohorts.cohort) s ON ((s.cohort = c.cohort)))
  GROUP BY c.cohort, w.week;

COMMENT ON VIEW reporting.retention_weekly IS 'Weekly retention cohorts: accounts by the ISO week of their first usage, and how many of them had usage n weeks later (weeks_since 0 is the cohort itself, 100%).';

GRANT SELECT ON TABLE reporting.retention_weekly TO pgtally_analyst;

CREATE VIEW reporting.revenue_drift AS
 SELECT day,
    kind,
    currency,
    stripe_minor,
    recorded_minor,
    refunded_minor,
    expected_credits_micros,
    ledger_credits_micros,
    drift_percent
   FROM reporting.revenue_reconciliation_daily
  WHERE (drift_percent <> (0)::numeric);

COMMENT ON VIEW reporting.revenue_drift IS 'Reconciliation: the days, kinds and currencies where Stripe, pgtally''s records and the ledger disagree (reporting.revenue_reconciliation_daily with a drift). Must be empty.';

GRANT SELECT ON TABLE reporting.revenue_drift TO pgtally_analyst;

CREATE VIEW reporting.revenue_monthly AS
 SELECT ((date_trunc('month'::text, paid_at, 'UTC'::text) AT TIME ZONE 'UTC'::text))::date AS month,
    currency,
    sum((amount_minor - refunded_minor)) AS revenue_minor,
    count(DISTINCT account_id) AS paying_accounts
   FROM ( SELECT invoices.account_id,
            invoices.paid_at,
            invoices.currency,
            invoices.amount_paid_minor AS amount_minor,
            invoices.refunded_minor
           FROM billing.invoices
          WHERE (invoices.status = 'paid'::text)
        UNION ALL
         SELECT payments.account_id,
            payments.paid_at,
            payments.currency,
            payments.amount_minor,
            payments.refunded_minor
           FROM billing.payments) r
  GROUP BY (((date_trunc('month'::text, paid_at, 'UTC'::text) AT TIME ZONE 'UTC'::text))::date), currency;

COMMENT ON VIEW reporting.revenue_monthly IS 'Money in per UTC month and currency, net of refunds (subscription invoices, bundles and top-ups; minor units), and how many accounts paid.';

GRANT SELECT ON TABLE reporting.revenue_monthly TO pgtally_analyst;

CREATE VIEW reporting.revenue_reconciliation_daily AS
 WITH stripe_payments AS (
         SELECT DISTINCT ON (e.key) e.created,
            e.type,
            ((e.payload -> 'data'::text) -> 'object'::text) AS o
           FROM ( SELECT stripe_events.id,
                    stripe_events.type,
                    stripe_events.created,
                    stripe_events.livemode,
                    stripe_events.payload,
                    stripe_events.received_at,
                    stripe_events.status,
                    stripe_events.note,
                        CASE stripe_events.type
                            WHEN 'invoice.paid'::text THEN ('in:'::text || (stripe_events.payload #>> '{data,object,id}'::text[]))
                            WHEN 'payment_intent.succeeded'::text THEN ('pi:'::text || (stripe_events.payload #>> '{data,object,id}'::text[]))
                            ELSE ('pi:'::text || COALESCE((stripe_events.payload #>> '{data,object,payment_intent}'::text[]), (stripe_events.payload #>> '{data,object,id}'::text[])))
                        END AS key
                   FROM billing.stripe_events
                  WHERE (stripe_events.status = 'applied'::text)) e
          WHERE ((e.type = 'payment_intent.succeeded'::text) OR ((e.type = ANY (ARRAY['checkout.session.completed'::text, 'checkout.session.async_payment_succeeded'::text])) AND ((e.payload #>> '{data,object,mode}'::text[]) = 'payment'::text) AND ((e.payload #>> '{data,object,payment_status}'::text[]) = 'paid'::text)) OR ((e.type = 'invoice.paid'::text) AND (EXISTS ( SELECT 1
                   FROM billing.invoices i
                  WHERE (i.stripe_invoice_id = (e.payload #>> '{data,object,id}'::text[]))))))
          ORDER BY e.key, e.created, e.id
        ), stripe AS (
         SELECT (date_trunc('day'::text, (stripe_payments.created AT TIME ZONE 'UTC'::text)))::date AS day,
                CASE
                    WHEN (stripe_payments.type = 'invoice.paid'::text) THEN 'subscription'::text
                    ELSE 'bundle'::text
                END AS kind,
            lower(COALESCE((stripe_payments.o ->> 'currency'::text), 'usd'::text)) AS currency,
            sum(
                CASE stripe_payments.type
                    WHEN 'invoice.paid'::text THEN ((stripe_payments.o ->> 'amount_paid'::text))::bigint
                    WHEN 'payment_intent.succeeded'::text THEN ((stripe_payments.o ->> 'amount_received'::text))::bigint
                    ELSE ((stripe_payments.o ->> 'amount_total'::text))::bigint
                END) AS stripe_minor
           FROM stripe_payments
          GROUP BY ((date_trunc('day'::text, (stripe_payments.created AT TIME ZONE 'UTC'::text)))::date),
                CASE
                    WHEN (stripe_payments.type = 'invoice.paid'::text) THEN 'subscription'::text
                    ELSE 'bundle'::text
                END, (lower(COALESCE((stripe_payments.o ->> 'currency'::text), 'usd'::text)))
        ), recorded AS (
         SELECT (date_trunc('day'::text, (p.paid_at AT TIME ZONE 'UTC'::text)))::date AS day,
            'bundle'::text AS kind,
            p.currency,
            sum(p.amount_minor) AS recorded_minor,
            sum(p.refunded_minor) AS refunded_minor,
            sum(p.credits_micros) AS expected_credits_micros,
            sum(( SELECT COALESCE(sum((t.amount_micros)::bigint), (0)::numeric) AS "coalesce"
                   FROM ledger.transfers t
                  WHERE ((t.account_id = p.account_id) AND ((t.kind)::text = 'purchase'::text) AND ((t.idempotency_key)::text = ANY (ARRAY[('checkout:'::text || p.stripe_checkout_session), ('payment_intent:'::text || p.stripe_payment_intent_id)]))))) AS ledger_credits_micros
           FROM billing.payments p
          GROUP BY ((date_trunc('day'::text, (p.paid_at AT TIME ZONE 'UTC'::text)))::date), 'bundle'::text, p.currency
        UNION ALL
         SELECT (date_trunc('day'::text, (i.paid_at AT TIME ZONE 'UTC'::text)))::date AS date_trunc,
            'subscription'::text,
            i.currency,
            sum(i.amount_paid_minor) AS sum,
            sum(i.refunded_minor) AS sum,
            sum(
                CASE
                    WHEN (EXISTS ( SELECT 1
                       FROM billing.duplicate_subscriptions d
                      WHERE (d.stripe_subscription_id = i.stripe_subscription_id))) THEN (0)::bigint
                    ELSE COALESCE(pl.included_credits_micros, (0)::bigint)
                END) AS sum,
            sum(( SELECT COALESCE(sum((t.amount_micros)::bigint), (0)::numeric) AS "coalesce"
                   FROM ledger.transfers t
                  WHERE ((t.account_id = i.account_id) AND ((t.idempotency_key)::text = ('invoice:'::text || i.stripe_invoice_id))))) AS sum
           FROM (billing.invoices i
             LEFT JOIN billing.plans pl ON ((pl.id = i.plan_id)))
          WHERE (i.status = ANY (ARRAY['paid'::text, 'refunded'::text]))
          GROUP BY ((date_trunc('day'::text, (i.paid_at AT TIME ZONE 'UTC'::text)))::date), 'subscription'::text, i.currency
        )
 SELECT COALESCE(r.day, s.day) AS day,
    COALESCE(r.kind, s.kind) AS kind,
    COALESCE(r.currency, s.currency) AS currency,
    COALESCE(s.stripe_minor, (0)::numeric) AS stripe_minor,
    COALESCE(r.recorded_minor, (0)::numeric) AS recorded_minor,
    COALESCE(r.refunded_minor, (0)::numeric) AS refunded_minor,
    COALESCE(r.expected_credits_micros, (0)::numeric) AS expected_credits_micros,
    COALESCE(r.ledger_credits_micros, (0)::numeric) AS ledger_credits_micros,
    round((100.0 * GREATEST((abs((COALESCE(s.stripe_minor, (0)::numeric) - COALESCE(r.recorded_minor, (0)::numeric))) / GREATEST(COALESCE(s.stripe_minor, (0)::numeric), COALESCE(r.recorded_minor, (0)::numeric), (1)::numeric)), (abs((COALESCE(r.expected_credits_micros, (0)::numeric) - COALESCE(r.ledger_credits_micros, (0)::numeric))) / GREATEST(COALESCE(r.expected_credits_micros, (0)::numeric), (1)::numeric)))), 2) AS drift_percent
   FROM (recorded r
     FULL JOIN stripe s ON (((s.day = r.day) AND (s.kind = r.kind) AND (s.currency = r.currency))));

COMMENT ON VIEW reporting.revenue_reconciliation_daily IS 'Per UTC day, kind of payment (subscription invoices, bundles and top-ups) and currency: what Stripe''s applied events reported paid (minor units), what pgtally recorded (billing.invoices, billing.payments) and refunded, the credits those payments should have granted and what the ledger granted for them; drift_percent is the larger of the two relative differences and must be 0.00 on a consistent database.';

GRANT SELECT ON TABLE reporting.revenue_reconciliation_daily TO pgtally_analyst;

CREATE VIEW reporting.reversal_mismatches AS
 SELECT r.id AS reversal_id,
    r.account_id,
    r.usage_event_id,
    'transfer'::text AS problem
   FROM (metering.reversals r
     LEFT JOIN ledger.transfers t ON ((t.id = r.transfer_id)))
  WHERE ((r.credits_micros > 0) AND ((t.id IS NULL) OR ((t.kind)::text <> 'reversal'::text) OR ((t.amount_micros)::bigint <> r.credits_micros) OR (t.usage_event_id IS DISTINCT FROM r.usage_event_id)))
UNION ALL
 SELECT NULL::uuid AS reversal_id,
    t.account_id,
    t.usage_event_id,
    'transfer without reversal'::text AS problem
   FROM ledger.transfers t
  WHERE (((t.kind)::text = 'reversal'::text) AND (NOT (EXISTS ( SELECT 1
           FROM metering.reversals r
          WHERE (r.transfer_id = t.id)))))
UNION ALL
 SELECT NULL::uuid AS reversal_id,
    s.account_id,
    s.usage_event_id,
    'reversed more than charged'::text AS problem
   FROM (( SELECT r.account_id,
            r.usage_event_id,
            r.event_created_at,
            sum(r.quantity) AS quantity,
            sum(r.credits_micros) AS credits,
            sum(r.allowance_units) AS allowance_units
           FROM metering.reversals r
          GROUP BY r.account_id, r.usage_event_id, r.event_created_at) s
     LEFT JOIN metering.usage_events e ON (((e.id = s.usage_event_id) AND (e.created_at = s.event_created_at))))
  WHERE ((e.id IS NULL) OR (s.quantity > (e.quantity)::numeric) OR (s.credits > (e.credits_micros)::numeric) OR (s.allowance_units > (e.allowance_units)::numeric));

COMMENT ON VIEW reporting.reversal_mismatches IS 'Reconciliation: reversals whose ledger transfer is missing or differs from them, reversal transfers with no reversal, and usage events reversed for more units, credits or allowance than they charged (or missing). Must be empty.';

GRANT SELECT ON TABLE reporting.reversal_mismatches TO pgtally_analyst;

CREATE VIEW reporting.stripe_events_not_applied AS
 SELECT id,
    type,
    created,
    received_at,
    status,
    note
   FROM billing.stripe_events
  WHERE (status <> 'applied'::text);

COMMENT ON VIEW reporting.stripe_events_not_applied IS 'Webhook events received but not applied (stale or ignored), with the reason.';

GRANT SELECT ON TABLE reporting.stripe_events_not_applied TO pgtally_analyst;

CREATE VIEW reporting.stuck_auto_topups AS
 SELECT t.account_id,
    t.in_flight_since,
    t.task_id,
    t.stripe_payment_intent_id,
    t.failures,
    t.last_error,
        CASE
            WHEN (m.id IS NULL) THEN 'missing'::text
            WHEN (m.delivered_at IS NOT NULL) THEN 'delivered'::text
            WHEN (m.failed_at IS NOT NULL) THEN 'failed'::text
            ELSE 'queued'::text
        END AS task_state,
    m.attempts AS task_attempts,
    m.last_error AS task_error
   FROM (billing.auto_topups t
     LEFT JOIN outbox.messages m ON ((m.id = t.task_id)))
  WHERE (t.in_flight_since < (util.now() - '00:30:00'::interval));

COMMENT ON VIEW reporting.stuck_auto_topups IS 'Reconciliation: auto top-ups in flight for more than 30 minutes (no payment_intent.succeeded and no failure recorded): the task''s state (queued: the worker could not act yet, see task_error; delivered: Stripe was asked and its event never arrived; failed or missing). The worker''s housekeeping (api.release_stuck_auto_topups) releases the delivered, failed and missing ones; a queued one waits for a worker that can pay it. Must be empty.';

GRANT SELECT ON TABLE reporting.stuck_auto_topups TO pgtally_analyst;

CREATE VIEW reporting.subscriptions_by_status AS
 SELECT plan_id,
    status,
    count(*) AS subscriptions,
    count(*) FILTER (WHERE cancel_at_period_end) AS canceling_at_period_end
   FROM billing.subscriptions
  GROUP BY plan_id, status;

COMMENT ON VIEW reporting.subscriptions_by_status IS 'Subscriptions per plan and Stripe status.';

GRANT SELECT ON TABLE reporting.subscriptions_by_status TO pgtally_analyst;

CREATE VIEW reporting.system_balances AS
 SELECT code AS system_account,
    ((COALESCE(( SELECT sum((e.amount_micros)::bigint) AS sum
           FROM ledger.entries e
          WHERE (e.system_account = s.code)), (0)::numeric) + COALESCE(( SELECT sum(b.amount_micros) AS sum
           FROM ledger.archived_balances b
          WHERE (b.system_account = s.code)), (0)::numeric)))::bigint AS balance_micros
   FROM ledger.system_accounts s;

COMMENT ON VIEW reporting.system_balances IS 'Balance of each system account in micro-credits, detached months included (grants is negative: credits issued). With customer balances it sums to zero.';

GRANT SELECT ON TABLE reporting.system_balances TO pgtally_analyst;

CREATE VIEW reporting.unbalanced_transfers AS
 SELECT transfer_id,
    sum((amount_micros)::bigint) AS sum_micros,
    count(*) AS entries
   FROM ledger.entries
  GROUP BY transfer_id
 HAVING ((sum((amount_micros)::bigint) <> (0)::numeric) OR (count(*) <> 2));

COMMENT ON VIEW reporting.unbalanced_transfers IS 'Reconciliation: transfers whose entries do not sum to zero or are not exactly two. Must be empty.';

GRANT SELECT ON TABLE reporting.unbalanced_transfers TO pgtally_analyst;

CREATE VIEW reporting.unmatched_disputes AS
 SELECT stripe_dispute_id,
    stripe_charge_id,
    stripe_payment_intent_id,
    amount_minor,
    currency,
    status,
    created_at
   FROM billing.disputes d
  WHERE (account_id IS NULL);

COMMENT ON VIEW reporting.unmatched_disputes IS 'Reconciliation: disputes whose charge or PaymentIntent matches no payment pgtally recorded (no account): money Stripe may take back from a payment pgtally never saw. Must be empty.';

GRANT SELECT ON TABLE reporting.unmatched_disputes TO pgtally_analyst;

CREATE VIEW reporting.unmatched_refunds AS
 SELECT id AS event_id,
    created,
    (payload #>> '{data,object,id}'::text[]) AS stripe_charge_id,
    (payload #>> '{data,object,payment_intent}'::text[]) AS stripe_payment_intent_id,
    (payload #>> '{data,object,customer}'::text[]) AS stripe_customer_id,
    ((payload #>> '{data,object,amount_refunded}'::text[]))::numeric AS amount_refunded_minor,
    lower((payload #>> '{data,object,currency}'::text[])) AS currency,
    note
   FROM billing.stripe_events e
  WHERE ((type = 'charge.refunded'::text) AND (status = 'ignored'::text));

COMMENT ON VIEW reporting.unmatched_refunds IS 'Reconciliation: charge.refunded events that changed nothing because no payment pgtally recorded matched them (no bundle payment, no subscription invoice payment): money Stripe gave back that pgtally''s revenue still counts, or a payment pgtally never saw. Must be empty.';

GRANT SELECT ON TABLE reporting.unmatched_refunds TO pgtally_analyst;

CREATE VIEW reporting.unreported_post_paid_events AS
 SELECT id AS usage_event_id,
    account_id,
    amount_minor,
    created_at
   FROM metering.usage_events e
  WHERE ((amount_minor IS NOT NULL) AND (NOT (EXISTS ( SELECT 1
           FROM outbox.messages m
          WHERE (m.id = e.id)))));

COMMENT ON VIEW reporting.unreported_post_paid_events IS 'Reconciliation: post-paid usage events with no report to Stripe queued (the charge writes both in one transaction). Must be empty.';

GRANT SELECT ON TABLE reporting.unreported_post_paid_events TO pgtally_analyst;

CREATE VIEW reporting.usage_by_hour AS
 SELECT (EXTRACT(hour FROM (hour AT TIME ZONE 'UTC'::text)))::integer AS hour_of_day,
    meter_id,
    sum(events) AS events,
    sum(quantity) AS quantity,
    round(((100.0 * sum(events)) / sum(sum(events)) OVER (PARTITION BY meter_id)), 2) AS percent_of_events
   FROM metering.usage_rollup_hourly
  GROUP BY ((EXTRACT(hour FROM (hour AT TIME ZONE 'UTC'::text)))::integer), meter_id;

COMMENT ON VIEW reporting.usage_by_hour IS 'Usage by UTC hour of day and meter, over all time: events, units and the share of the meter''s events.';

GRANT SELECT ON TABLE reporting.usage_by_hour TO pgtally_analyst;

CREATE VIEW reporting.usage_by_principal_daily AS
 SELECT account_id,
    (date_trunc('day'::text, (created_at AT TIME ZONE 'UTC'::text)))::date AS day,
    api_key_id,
    user_id,
    meter_id,
    count(*) AS events,
    sum((quantity)::bigint) AS quantity,
    sum((allowance_units)::bigint) AS allowance_units,
    sum((credits_micros)::bigint) AS credits_micros
   FROM metering.usage_events e
  GROUP BY account_id, ((date_trunc('day'::text, (created_at AT TIME ZONE 'UTC'::text)))::date), api_key_id, user_id, meter_id;

COMMENT ON VIEW reporting.usage_by_principal_daily IS 'Usage per account, UTC day, API key, member and meter: events, units, allowance units and micro-credits spent (events charged before migration 0032 have no key or member).';

GRANT SELECT ON TABLE reporting.usage_by_principal_daily TO pgtally_analyst;

CREATE VIEW reporting.usage_charge_mismatches AS
 SELECT u.id AS usage_event_id,
    u.account_id,
    u.credits_micros,
    COALESCE((- (t.amount_micros)::bigint), (0)::bigint) AS ledger_micros
   FROM (metering.usage_events u
     LEFT JOIN ledger.transfers t ON (((t.usage_event_id = u.id) AND ((t.kind)::text = 'usage'::text))))
  WHERE ((u.credits_micros)::bigint <> COALESCE((- (t.amount_micros)::bigint), (0)::bigint));

COMMENT ON VIEW reporting.usage_charge_mismatches IS 'Reconciliation: usage events whose credits_micros differ from the usage transfer recorded for them (a reversal''s transfer names its event too: reporting.reversal_mismatches checks those). Must be empty.';

GRANT SELECT ON TABLE reporting.usage_charge_mismatches TO pgtally_analyst;

CREATE VIEW reporting.usage_daily AS
 SELECT (date_trunc('day'::text, (created_at AT TIME ZONE 'UTC'::text)))::date AS day,
    meter_id,
    count(*) AS events,
    sum((quantity)::bigint) AS quantity,
    sum((allowance_units)::bigint) AS allowance_units,
    sum((credits_micros)::bigint) AS credits_micros
   FROM metering.usage_events
  GROUP BY ((date_trunc('day'::text, (created_at AT TIME ZONE 'UTC'::text)))::date), meter_id;

COMMENT ON VIEW reporting.usage_daily IS 'Usage per UTC day and meter: events, units, allowance units and micro-credits spent.';

GRANT SELECT ON TABLE reporting.usage_daily TO pgtally_analyst;

CREATE VIEW reporting.usage_per_meter_plan_monthly AS
 SELECT month,
    meter_id,
    plan_id,
    count(*) AS accounts,
    sum(quantity) AS quantity,
    percentile_cont((0.5)::double precision) WITHIN GROUP (ORDER BY ((quantity)::double precision)) AS p50_per_account,
    percentile_cont((0.95)::double precision) WITHIN GROUP (ORDER BY ((quantity)::double precision)) AS p95_per_account
   FROM metering.usage_rollup_monthly
  GROUP BY month, meter_id, plan_id;

COMMENT ON VIEW reporting.usage_per_meter_plan_monthly IS 'Usage per UTC month, meter and plan: accounts, units, and the median and 95th percentile of units per account.';

GRANT SELECT ON TABLE reporting.usage_per_meter_plan_monthly TO pgtally_analyst;

----------------------------------------------------------------------------------------------------
-- Functions
----------------------------------------------------------------------------------------------------
CREATE FUNCTION api.accept_invitation(p_session_id uuid, p_token text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  u identity.users := identity.member_user(p_session_id);
  i identity.invitations;
BEGIN
  -- Members of an account change under its row's lock (identity.change_membership): taken first,
  -- so the sender's role read below stays true until this commits.
  PERFORM 1 FROM identity.accounts
  WHERE id = (SELECT account_id FROM identity.invitations WHERE token_hash = util.token_hash(p_token))
  FOR NO KEY UPDATE;
  -- The claim: one accept wins, however many arrive at once.
  DELETE FROM identity.invitations WHERE token_hash = util.token_hash(p_token) AND expires_at > util.now()
  RETURNING * INTO i;
  IF i.id IS NULL THEN
    PERFORM util.fail('TL400', 'this invitation is not valid: it was used, revoked, replaced or has expired');
  END IF;
  IF u.email_normalized <> i.email_normalized OR u.email_verified_at IS NULL THEN
    -- Raised: the claim rolls back and the invitation stays for its address.
    PERFORM util.fail('TL403', format('this invitation is for %s: sign in with that address (confirmed)', i.email_normalized));
  END IF;
  IF NOT identity.may_invite(i.invited_by, i.account_id, i.role) THEN
    -- Returned, not raised: the void invitation stays claimed.
    RETURN identity.error('TL400', 'this invitation is no longer valid: whoever sent it may no longer invite to this team with that role');
  END IF;
  INSERT INTO identity.memberships (account_id, user_id, role, created_at, invited_by)
  VALUES (i.account_id, u.id, i.role, util.now(), i.invited_by)
  ON CONFLICT (account_id, user_id) DO NOTHING;
  RETURN identity.account_json((SELECT a FROM identity.accounts a WHERE id = i.account_id),
                               (SELECT role FROM identity.memberships WHERE account_id = i.account_id AND user_id = u.id));
END $$;

COMMENT ON FUNCTION api.accept_invitation(p_session_id uuid, p_token text) IS 'POST /v1/invitations/accept {token}: join the team as the invited role, once (the invitation is claimed by DELETE ... RETURNING). The signed-in person''s verified email must be the invited address (TL403; the invitation stays). The sender must still be allowed to send it (identity.may_invite: still a member whose role grants members:manage, an owner for an owner invitation), else TL400 and the invitation is used up. TL400 used, revoked, replaced or expired.';

REVOKE ALL ON FUNCTION api.accept_invitation(p_session_id uuid, p_token text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.accept_invitation(p_session_id uuid, p_token text) TO pgtally_api;

CREATE FUNCTION api.account_page(p_session_id uuid) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  RETURN jsonb_build_object('me', api.me(NULL, p_session_id),
                            'methods', api.sign_in_methods(p_session_id),
                            'sessions', api.sessions(p_session_id) -> 'data',
                            'keys', api.list_api_keys(p_session_id) -> 'data');
END $$;

COMMENT ON FUNCTION api.account_page(p_session_id uuid) IS 'GET /account: the signed-in person (api.me), their ways to sign in (api.sign_in_methods), sessions (api.sessions) and API keys (api.list_api_keys). TL401 signed out.';

REVOKE ALL ON FUNCTION api.account_page(p_session_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.account_page(p_session_id uuid) TO pgtally_api;

CREATE FUNCTION api.account_summary(p_account_id uuid) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  a identity.accounts;
BEGIN
  SELECT * INTO a FROM identity.accounts WHERE id = p_account_id;
  IF NOT FOUND THEN
    PERFORM util.fail('TL404', format('no account %s', p_account_id));
  END IF;
  RETURN jsonb_build_object(
    'account_id', a.id, 'kind', a.kind, 'name', a.name, 'plan', identity.effective_plan(a), 'subscribed_plan', a.plan_id,
    'credits', util.credits(a.credit_balance_micros), 'created_at', util.iso(a.created_at),
    'email', (SELECT email FROM identity.users WHERE account_id = a.id), 'merged_into', a.merged_into,
    'stripe_customer_id', (SELECT stripe_customer_id FROM billing.customers WHERE account_id = a.id),
    'allowances', metering.allowances_json(a),
    'api_keys', (SELECT count(*) FROM identity.api_keys WHERE account_id = a.id AND revoked_at IS NULL),
    'usage_events', (SELECT count(*) FROM metering.usage_events WHERE account_id = a.id));
END $$;

COMMENT ON FUNCTION api.account_summary(p_account_id uuid) IS 'pgtally accounts show: an account for an operator: {account_id, kind, name, plan, subscribed_plan, credits, created_at, email, merged_into, stripe_customer_id, allowances, api_keys (live), usage_events (count)}. TL404 unknown account. Operators only.';

REVOKE ALL ON FUNCTION api.account_summary(p_account_id uuid) FROM PUBLIC;

CREATE FUNCTION api.accounts(p_session_id uuid) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  u identity.users := identity.member_user(p_session_id);
BEGIN
  RETURN jsonb_build_object('data', coalesce((
    SELECT jsonb_agg(identity.account_json(a, m.role) ORDER BY (a.id = u.account_id) DESC, a.created_at)
    FROM identity.memberships m JOIN identity.accounts a ON a.id = m.account_id
    WHERE m.user_id = u.id AND a.merged_into IS NULL), '[]'));
END $$;

COMMENT ON FUNCTION api.accounts(p_session_id uuid) IS 'GET /v1/accounts: the accounts the signed-in person belongs to (their own first) with their role.';

REVOKE ALL ON FUNCTION api.accounts(p_session_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.accounts(p_session_id uuid) TO pgtally_api;

CREATE FUNCTION api.accounts_list(p_limit integer DEFAULT 50, p_plan text DEFAULT NULL::text) RETURNS TABLE(account_id uuid, kind text, plan text, credits text, email text, created_at text)
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
  SELECT a.id, a.kind, identity.effective_plan(a), util.credits(a.credit_balance_micros), u.email, util.iso(a.created_at)
  FROM identity.accounts a LEFT JOIN identity.users u ON u.account_id = a.id
  WHERE a.merged_into IS NULL AND (p_plan IS NULL OR a.plan_id = p_plan)
  ORDER BY a.created_at DESC, a.id DESC
  LIMIT least(greatest(p_limit, 1), 10000)
$$;

COMMENT ON FUNCTION api.accounts_list(p_limit integer, p_plan text) IS 'pgtally accounts list: the newest accounts (not merged devices), optionally of one plan, at most p_limit (1-10,000). Operators only.';

REVOKE ALL ON FUNCTION api.accounts_list(p_limit integer, p_plan text) FROM PUBLIC;

CREATE FUNCTION api.adjust_credits(p_account_id uuid, p_amount_micros bigint, p_idempotency_key text, p_reason text) RETURNS TABLE(replayed boolean, body jsonb)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  IF p_amount_micros IS NULL OR p_amount_micros = 0 THEN
    PERFORM util.fail('TL422', 'an adjustment is a non-zero amount of credits (negative takes credits back)');
  END IF;
  IF p_reason IS NULL OR length(btrim(p_reason)) = 0 THEN
    PERFORM util.fail('TL422', 'an adjustment needs a reason');
  END IF;
  RETURN QUERY SELECT * FROM ledger.operator_transfer(p_account_id, 'adjustments', 'adjustment', p_amount_micros,
                                                      p_idempotency_key, btrim(p_reason));
END $$;

COMMENT ON FUNCTION api.adjust_credits(p_account_id uuid, p_amount_micros bigint, p_idempotency_key text, p_reason text) IS 'pgtally credits adjust: add (positive) or take back (negative) micro-credits through the adjustments system account, with a reason, once per idempotency key. Never below a zero balance (TL402). TL404 unknown account, TL42R key reused, TL422 zero amount or no reason. Operators only.';

REVOKE ALL ON FUNCTION api.adjust_credits(p_account_id uuid, p_amount_micros bigint, p_idempotency_key text, p_reason text) FROM PUBLIC;

CREATE FUNCTION api.admin_account(p_session_id uuid, p_account_id uuid) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_staff identity.users := identity.staff(p_session_id, 'read');
  a identity.accounts;
BEGIN
  SELECT * INTO a FROM identity.accounts WHERE id = p_account_id;
  IF NOT FOUND THEN
    PERFORM util.fail('TL404', format('no account %s', p_account_id));
  END IF;
  RETURN identity.account_json(a, NULL) || jsonb_build_object(
    'subscribed_plan', a.plan_id, 'held', util.credits(a.held_micros),
    'suspended_at', util.iso(a.suspended_at), 'suspended_reason', a.suspended_reason,
    'stripe_customer_id', (SELECT stripe_customer_id FROM billing.customers WHERE account_id = a.id),
    'members', coalesce((SELECT jsonb_agg(jsonb_build_object('user_id', u.id, 'email', u.email, 'role', m.role,
                                                             'email_verified', u.email_verified_at IS NOT NULL))
                         FROM identity.memberships m JOIN identity.users u ON u.id = m.user_id WHERE m.account_id = a.id), '[]'),
    'allowances', metering.allowances_json(a),
    'lots', coalesce((SELECT jsonb_agg(ledger.lot_json(l) ORDER BY l.id DESC)
                      FROM (SELECT * FROM ledger.credit_lots WHERE account_id = a.id ORDER BY id DESC LIMIT 20) l), '[]'),
    'usage_events', coalesce((SELECT jsonb_agg(metering.event_json(e) ORDER BY e.id DESC)
                              FROM (SELECT * FROM metering.usage_events WHERE account_id = a.id ORDER BY id DESC LIMIT 20) e), '[]'),
    'ledger', coalesce((SELECT jsonb_agg(ledger.entry_json(t, e.amount_micros, e.balance_after_micros, e.created_at) ORDER BY e.id DESC)
                        FROM (SELECT * FROM ledger.entries WHERE account_id = a.id ORDER BY id DESC LIMIT 20) e
                        JOIN ledger.transfers t ON t.id = e.transfer_id), '[]'),
    'holds', coalesce((SELECT jsonb_agg(metering.hold_json(h) ORDER BY h.id DESC)
                       FROM metering.holds h WHERE h.account_id = a.id AND h.status = 'open'), '[]'),
    'subscriptions', coalesce((SELECT jsonb_agg(jsonb_build_object('id', s.stripe_subscription_id, 'status', s.status,
                                                                   'plan', s.plan_id, 'current_period_end', util.iso(s.current_period_end),
                                                                   'cancel_at_period_end', s.cancel_at_period_end))
                               FROM billing.subscriptions s WHERE s.account_id = a.id), '[]'),
    'payments', coalesce((SELECT jsonb_agg(jsonb_build_object('payment_intent', p.stripe_payment_intent_id, 'price', p.price_id,
                                                              'amount', p.amount_minor, 'currency', p.currency,
                                                              'refunded', p.refunded_minor, 'paid_at', util.iso(p.paid_at))
                                           ORDER BY p.paid_at DESC)
                          FROM billing.payments p WHERE p.account_id = a.id), '[]'),
    'referrals', coalesce((SELECT jsonb_agg(jsonb_build_object('referee_account_id', r.referee_account_id, 'status', r.status,
                                                               'rejected_reason', r.rejected_reason))
                           FROM billing.referrals r WHERE r.referrer_account_id = a.id OR r.referee_account_id = a.id), '[]'),
    'auth_events', coalesce((SELECT jsonb_agg(jsonb_build_object('kind', e.kind, 'ip', e.ip, 'at', util.iso(e.created_at)) ORDER BY e.id DESC)
                             FROM (SELECT * FROM identity.auth_events WHERE account_id = a.id ORDER BY id DESC LIMIT 20) e), '[]'),
    'webhook_events', coalesce((SELECT jsonb_agg(jsonb_build_object('id', x.id, 'type', x.type, 'status', x.status,
                                                                    'received_at', util.iso(x.received_at)) ORDER BY x.received_at DESC)
                                FROM (SELECT * FROM billing.stripe_events x
                                      WHERE x.payload #>> '{data,object,customer}' = (SELECT stripe_customer_id FROM billing.customers WHERE account_id = a.id)
                                      ORDER BY x.received_at DESC LIMIT 20) x), '[]'),
    'audit', coalesce((SELECT jsonb_agg(to_jsonb(l) ORDER BY l.id DESC)
                       FROM (SELECT * FROM reporting.audit_log WHERE target_account_id = a.id ORDER BY id DESC LIMIT 20) l), '[]'));
END $$;

COMMENT ON FUNCTION api.admin_account(p_session_id uuid, p_account_id uuid) IS 'GET /v1/admin/accounts/{id} (staff: read): the account with its members, plan, balance, allowances, and the latest 20 lots, usage events, ledger entries, auth events, webhook events and staff actions; its open holds, subscriptions, payments and referrals. TL404.';

REVOKE ALL ON FUNCTION api.admin_account(p_session_id uuid, p_account_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.admin_account(p_session_id uuid, p_account_id uuid) TO pgtally_api;

CREATE FUNCTION api.admin_account_page(p_session_id uuid, p_account_id uuid) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  RETURN jsonb_build_object('account', api.admin_account(p_session_id, p_account_id), 'plans', api.plans() -> 'plans');
END $$;

COMMENT ON FUNCTION api.admin_account_page(p_session_id uuid, p_account_id uuid) IS 'GET /admin/accounts/{id} (staff): everything about the account (api.admin_account) and the plans a staff member may put it on. TL403 not staff, TL404.';

REVOKE ALL ON FUNCTION api.admin_account_page(p_session_id uuid, p_account_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.admin_account_page(p_session_id uuid, p_account_id uuid) TO pgtally_api;

CREATE FUNCTION api.admin_adjust_credits(p_session_id uuid, p_account_id uuid, p_amount text, p_idempotency_key text, p_reason text) RETURNS TABLE(replayed boolean, body jsonb)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_staff identity.users := identity.staff(p_session_id, 'adjust_credits');
  p_amount_micros bigint := billing.signed_to_micros(p_amount, 'amount');
  v_before bigint := (SELECT credit_balance_micros FROM identity.accounts WHERE id = p_account_id);
  r record;
BEGIN
  IF p_amount_micros IS NULL OR p_amount_micros = 0 THEN
    PERFORM util.fail('TL422', 'an adjustment is a non-zero amount of credits', '{"field": "amount"}');
  END IF;
  IF v_staff.staff_role = 'support' AND (p_amount_micros < 0 OR p_amount_micros > 50000000) THEN
    PERFORM util.fail('TL403', 'support grants at most 50 credits at a time and takes none back: ask an admin');
  END IF;
  SELECT * INTO r FROM ledger.operator_transfer(p_account_id, 'adjustments', 'adjustment', p_amount_micros,
                                                p_idempotency_key, btrim(p_reason));
  IF NOT r.replayed THEN
    PERFORM ops.audit(v_staff, 'adjust_credits', p_account_id, NULL, p_reason,
                      jsonb_build_object('credits', util.credits(v_before)),
                      jsonb_build_object('credits', util.credits(v_before + p_amount_micros),
                                         'transfer_id', r.body ->> 'transfer_id', 'amount', util.credits(p_amount_micros)));
  END IF;
  replayed := r.replayed;
  body := r.body;
  RETURN NEXT;
END $$;

COMMENT ON FUNCTION api.admin_adjust_credits(p_session_id uuid, p_account_id uuid, p_amount text, p_idempotency_key text, p_reason text) IS 'POST /v1/admin/accounts/{id}/credits: add (positive) or take back (negative) p_amount credits (a plain decimal, -5 or 2.5) with a reason, once per idempotency key (a retry replays it), never below zero (TL402); audited. Support may grant up to 50 credits (TL403 beyond). TL404, TL42R key reused, TL422.';

REVOKE ALL ON FUNCTION api.admin_adjust_credits(p_session_id uuid, p_account_id uuid, p_amount text, p_idempotency_key text, p_reason text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.admin_adjust_credits(p_session_id uuid, p_account_id uuid, p_amount text, p_idempotency_key text, p_reason text) TO pgtally_api;

CREATE FUNCTION api.admin_approve_sso_domain(p_session_id uuid, p_account_id uuid, p_domain text, p_reason text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_staff identity.users := identity.staff(p_session_id, 'approve_sso_domain');
  d identity.sso_domains;
BEGIN
  SELECT * INTO d FROM identity.sso_domains WHERE account_id = p_account_id AND domain = lower(btrim(p_domain)) FOR UPDATE;
  IF NOT FOUND THEN
    PERFORM util.fail('TL404', 'this team has not claimed that domain');
  ELSIF identity.public_mail_domain(d.domain) THEN
    PERFORM util.fail('TL422', format('%s is a public mail domain: no team can sign its people in', d.domain), '{"field": "domain"}');
  ELSIF d.verified_at IS NOT NULL THEN
    RETURN identity.sso_json(p_account_id);
  END IF;
  BEGIN
    UPDATE identity.sso_domains SET verified_at = util.now(), verified_by = 'staff'
    WHERE account_id = d.account_id AND domain = d.domain;
  EXCEPTION WHEN unique_violation THEN
    PERFORM util.fail('TL40C', format('%s signs in through another team''s provider', d.domain), '{"field": "domain"}');
  END;
  PERFORM ops.audit(v_staff, 'approve_sso_domain', p_account_id, NULL, p_reason,
                    jsonb_build_object('domain', d.domain, 'verified', false),
                    jsonb_build_object('domain', d.domain, 'verified', true));
  RETURN identity.sso_json(p_account_id);
END $$;

COMMENT ON FUNCTION api.admin_approve_sso_domain(p_session_id uuid, p_account_id uuid, p_domain text, p_reason text) IS 'POST /v1/admin/accounts/{id}/sso-domains/{domain}/approval (staff: admin): prove a team''s claimed domain without DNS (the team showed ownership another way), with a reason, audited in ops.audit_log. TL403 not admin, TL404 not claimed, TL40C another team proved it, TL422 no reason or a public mail domain (added to identity.public_mail_domains since it was claimed).';

REVOKE ALL ON FUNCTION api.admin_approve_sso_domain(p_session_id uuid, p_account_id uuid, p_domain text, p_reason text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.admin_approve_sso_domain(p_session_id uuid, p_account_id uuid, p_domain text, p_reason text) TO pgtally_api;

CREATE FUNCTION api.admin_audit(p_session_id uuid, p_limit integer DEFAULT 100) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_staff identity.users := identity.staff(p_session_id, 'read');
BEGIN
  RETURN jsonb_build_object('data', coalesce((
    SELECT jsonb_agg(to_jsonb(l) ORDER BY l.id DESC)
    FROM (SELECT * FROM reporting.audit_log ORDER BY id DESC LIMIT least(greatest(coalesce(p_limit, 100), 1), 1000)) l), '[]'));
END $$;

COMMENT ON FUNCTION api.admin_audit(p_session_id uuid, p_limit integer) IS 'GET /v1/admin/audit: the latest staff actions (staff: read).';

REVOKE ALL ON FUNCTION api.admin_audit(p_session_id uuid, p_limit integer) FROM PUBLIC;
GRANT ALL ON FUNCTION api.admin_audit(p_session_id uuid, p_limit integer) TO pgtally_api;

CREATE FUNCTION api.admin_refund_target(p_session_id uuid, p_payment_intent text, p_amount bigint DEFAULT NULL::bigint) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_staff identity.users := identity.staff(p_session_id, 'refund');
  p billing.payments;
  v_left bigint;
BEGIN
  SELECT * INTO p FROM billing.payments WHERE stripe_payment_intent_id = p_payment_intent;
  IF NOT FOUND THEN
    PERFORM util.fail('TL404', 'no payment pgtally recorded with this PaymentIntent');
  END IF;
  v_left := p.amount_minor - p.refunded_minor;
  IF coalesce(p_amount, v_left) NOT BETWEEN 1 AND v_left THEN
    PERFORM util.fail('TL422', format('between 1 and %s (minor units) is left to refund', v_left), '{"field": "amount"}');
  END IF;
  RETURN jsonb_build_object('payment_intent', p.stripe_payment_intent_id, 'account_id', p.account_id,
                            'amount', coalesce(p_amount, v_left), 'refunded', p.refunded_minor, 'currency', p.currency);
END $$;

COMMENT ON FUNCTION api.admin_refund_target(p_session_id uuid, p_payment_intent text, p_amount bigint) IS 'POST /v1/admin/refunds, step 1 (staff: admin): the recorded payment to refund and how much: p_amount (minor units), or all that is left when NULL; refunded so far. TL404 unknown payment, TL422 more than is left (or nothing).';

REVOKE ALL ON FUNCTION api.admin_refund_target(p_session_id uuid, p_payment_intent text, p_amount bigint) FROM PUBLIC;
GRANT ALL ON FUNCTION api.admin_refund_target(p_session_id uuid, p_payment_intent text, p_amount bigint) TO pgtally_api;

CREATE FUNCTION api.admin_refunded(p_session_id uuid, p_payment_intent text, p_amount bigint, p_stripe_refund text, p_reason text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_staff identity.users := identity.staff(p_session_id, 'refund');
  p billing.payments;
BEGIN
  SELECT * INTO p FROM billing.payments WHERE stripe_payment_intent_id = p_payment_intent;
  PERFORM ops.audit(v_staff, 'refund', p.account_id, NULL, p_reason,
                    jsonb_build_object('payment_intent', p_payment_intent, 'amount', p.amount_minor, 'refunded', p.refunded_minor),
                    jsonb_build_object('refund', p_stripe_refund, 'amount', p_amount));
  RETURN jsonb_build_object('refund', p_stripe_refund, 'payment_intent', p_payment_intent, 'amount', p_amount,
                            'status', 'refunded: the credits come back out with Stripe''s charge.refunded event');
END $$;

COMMENT ON FUNCTION api.admin_refunded(p_session_id uuid, p_payment_intent text, p_amount bigint, p_stripe_refund text, p_reason text) IS 'POST /v1/admin/refunds, step 2, after Stripe accepted the refund: the audit row. The credits are taken back by the charge.refunded webhook, as for any refund.';

REVOKE ALL ON FUNCTION api.admin_refunded(p_session_id uuid, p_payment_intent text, p_amount bigint, p_stripe_refund text, p_reason text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.admin_refunded(p_session_id uuid, p_payment_intent text, p_amount bigint, p_stripe_refund text, p_reason text) TO pgtally_api;

CREATE FUNCTION api.admin_revoke_sessions(p_session_id uuid, p_user_id uuid, p_reason text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_staff identity.users := identity.staff(p_session_id, 'revoke_sessions');
  v_count integer;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM identity.users WHERE id = p_user_id) THEN
    PERFORM util.fail('TL404', 'no such user');
  END IF;
  UPDATE identity.sessions SET revoked_at = util.now(), revoked_reason = 'staff'
  WHERE user_id = p_user_id AND revoked_at IS NULL;
  GET DIAGNOSTICS v_count = ROW_COUNT;
  PERFORM ops.audit(v_staff, 'revoke_sessions', (SELECT account_id FROM identity.users WHERE id = p_user_id), p_user_id,
                    p_reason, NULL, jsonb_build_object('sessions_revoked', v_count));
  RETURN jsonb_build_object('user_id', p_user_id, 'sessions_revoked', v_count);
END $$;

COMMENT ON FUNCTION api.admin_revoke_sessions(p_session_id uuid, p_user_id uuid, p_reason text) IS 'POST /v1/admin/users/{id}/revoke-sessions (staff: admin): sign the user out everywhere (every session and its refresh tokens); audited. TL404.';

REVOKE ALL ON FUNCTION api.admin_revoke_sessions(p_session_id uuid, p_user_id uuid, p_reason text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.admin_revoke_sessions(p_session_id uuid, p_user_id uuid, p_reason text) TO pgtally_api;

CREATE FUNCTION api.admin_search(p_session_id uuid, p_query text, p_limit integer DEFAULT 50) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_staff identity.users := identity.staff(p_session_id, 'read');
  q text := btrim(coalesce(p_query, ''));
BEGIN
  RETURN jsonb_build_object('data', coalesce((
    SELECT jsonb_agg(x ORDER BY x ->> 'created_at' DESC) FROM (
      SELECT identity.account_json(a, NULL) || jsonb_build_object(
               'email', (SELECT u.email FROM identity.users u WHERE u.account_id = a.id),
               'stripe_customer_id', (SELECT c.stripe_customer_id FROM billing.customers c WHERE c.account_id = a.id)) AS x
      FROM identity.accounts a
      WHERE a.merged_into IS NULL AND (
            q = ''
         OR a.id::text = q
         OR a.name ILIKE '%' || q || '%'
         OR EXISTS (SELECT 1 FROM identity.users u JOIN identity.memberships m ON m.user_id = u.id
                    WHERE m.account_id = a.id AND u.email_normalized LIKE '%' || lower(q) || '%')
         OR EXISTS (SELECT 1 FROM billing.customers c WHERE c.account_id = a.id AND c.stripe_customer_id = q))
      ORDER BY a.created_at DESC LIMIT least(greatest(coalesce(p_limit, 50), 1), 200)) r), '[]'));
END $$;

COMMENT ON FUNCTION api.admin_search(p_session_id uuid, p_query text, p_limit integer) IS 'GET /v1/admin/accounts?q=: accounts by id, name, a member''s email (part of it) or Stripe customer id, newest first (staff: read).';

REVOKE ALL ON FUNCTION api.admin_search(p_session_id uuid, p_query text, p_limit integer) FROM PUBLIC;
GRANT ALL ON FUNCTION api.admin_search(p_session_id uuid, p_query text, p_limit integer) TO pgtally_api;

CREATE FUNCTION api.admin_set_plan(p_session_id uuid, p_account_id uuid, p_plan text, p_reason text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_staff identity.users := identity.staff(p_session_id, 'set_plan');
  a identity.accounts;
BEGIN
  SELECT * INTO a FROM identity.accounts WHERE id = p_account_id FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    PERFORM util.fail('TL404', format('no account %s', p_account_id));
  END IF;
  IF NOT EXISTS (SELECT 1 FROM billing.plans WHERE id = p_plan AND active) THEN
    PERFORM util.fail('TL422', format('there is no active plan %L', p_plan), '{"field": "plan"}');
  END IF;
  UPDATE identity.accounts SET plan_id = p_plan, plan_grace_until = NULL,
    credits_due_at = CASE WHEN (SELECT monthly_credits_micros FROM billing.plans WHERE id = p_plan) > 0
                          THEN least(credits_due_at, util.now()) ELSE credits_due_at END
  WHERE id = p_account_id;
  PERFORM ops.audit(v_staff, 'set_plan', p_account_id, NULL, p_reason, jsonb_build_object('plan', a.plan_id),
                    jsonb_build_object('plan', p_plan));
  RETURN api.admin_account(p_session_id, p_account_id);
END $$;

COMMENT ON FUNCTION api.admin_set_plan(p_session_id uuid, p_account_id uuid, p_plan text, p_reason text) IS 'POST /v1/admin/accounts/{id}/plan (staff: admin): put the account on a plan without Stripe (a comp); audited. A later Stripe subscription event for the account sets its plan again. TL404, TL422.';

REVOKE ALL ON FUNCTION api.admin_set_plan(p_session_id uuid, p_account_id uuid, p_plan text, p_reason text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.admin_set_plan(p_session_id uuid, p_account_id uuid, p_plan text, p_reason text) TO pgtally_api;

CREATE FUNCTION api.admin_suspend(p_session_id uuid, p_account_id uuid, p_suspend boolean, p_reason text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_staff identity.users := identity.staff(p_session_id, CASE WHEN p_suspend THEN 'suspend' ELSE 'unsuspend' END);
  a identity.accounts;
BEGIN
  SELECT * INTO a FROM identity.accounts WHERE id = p_account_id FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    PERFORM util.fail('TL404', format('no account %s', p_account_id));
  END IF;
  UPDATE identity.accounts
  SET suspended_at = CASE WHEN p_suspend THEN coalesce(suspended_at, util.now()) END,
      suspended_reason = CASE WHEN p_suspend THEN left(btrim(p_reason), 500) END
  WHERE id = p_account_id;
  PERFORM ops.audit(v_staff, CASE WHEN p_suspend THEN 'suspend' ELSE 'unsuspend' END, p_account_id, NULL, p_reason,
                    jsonb_build_object('suspended', a.suspended_at IS NOT NULL), jsonb_build_object('suspended', p_suspend));
  RETURN api.admin_account(p_session_id, p_account_id);
END $$;

COMMENT ON FUNCTION api.admin_suspend(p_session_id uuid, p_account_id uuid, p_suspend boolean, p_reason text) IS 'POST /v1/admin/accounts/{id}/suspend and /unsuspend (staff: admin): while suspended every charge, hold, purchase and key of the account is refused (403 account-suspended, with the reason); audited. TL404, TL422.';

REVOKE ALL ON FUNCTION api.admin_suspend(p_session_id uuid, p_account_id uuid, p_suspend boolean, p_reason text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.admin_suspend(p_session_id uuid, p_account_id uuid, p_suspend boolean, p_reason text) TO pgtally_api;

CREATE FUNCTION api.auto_topup(p_api_key text, p_session_id uuid, p_enabled boolean DEFAULT NULL::boolean, p_account_id uuid DEFAULT NULL::uuid) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_account_id uuid := identity.authenticate(p_api_key, p_session_id,
                                             CASE WHEN p_enabled IS NULL THEN 'billing:read' ELSE 'billing:manage' END, p_account_id);
  t billing.auto_topups;
BEGIN
  IF p_enabled = false THEN
    PERFORM 1 FROM identity.accounts WHERE id = v_account_id FOR NO KEY UPDATE;
    UPDATE billing.auto_topups SET enabled = false, in_flight_since = NULL, task_id = NULL, updated_at = util.now()
    WHERE account_id = v_account_id;
    UPDATE identity.accounts SET auto_topup_below_micros = NULL WHERE id = v_account_id;
  END IF;
  SELECT * INTO t FROM billing.auto_topups WHERE account_id = v_account_id;
  RETURN billing.auto_topup_json(t);
END $$;

COMMENT ON FUNCTION api.auto_topup(p_api_key text, p_session_id uuid, p_enabled boolean, p_account_id uuid) IS 'GET /v1/billing/auto-topup (p_enabled NULL; billing:read) and DELETE (p_enabled false: turn it off, forgetting any top-up in flight, whose queued task then pays nothing; billing:manage): the settings. p_account_id: a team.';

REVOKE ALL ON FUNCTION api.auto_topup(p_api_key text, p_session_id uuid, p_enabled boolean, p_account_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.auto_topup(p_api_key text, p_session_id uuid, p_enabled boolean, p_account_id uuid) TO pgtally_api;

CREATE FUNCTION api.auto_topup_failed(p_account_id uuid, p_error text) RETURNS jsonb
    LANGUAGE sql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
  SELECT billing.auto_topup_json(billing.auto_topup_failure(p_account_id, p_error))
$$;

COMMENT ON FUNCTION api.auto_topup_failed(p_account_id uuid, p_error text) IS 'pgtally worker: the card was declined or needs authentication: count the failure and let the next charge try again; the third failure turns auto top-up off and emails the user.';

REVOKE ALL ON FUNCTION api.auto_topup_failed(p_account_id uuid, p_error text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.auto_topup_failed(p_account_id uuid, p_error text) TO pgtally_api;

CREATE FUNCTION api.auto_topup_payment(p_account_id uuid, p_task_id uuid) RETURNS jsonb
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  -- plpgsql (checked when run): task_id is younger than some migration levels the functions are applied at.
  RETURN (SELECT jsonb_build_object('account_id', t.account_id, 'stripe_customer_id', c.stripe_customer_id,
                            'price', p.id, 'amount', p.amount_minor, 'currency', p.currency,
                            'stripe_idempotency_key', 'auto-topup-' || t.task_id)
  FROM billing.auto_topups t JOIN billing.prices p ON p.id = t.price_id
  JOIN billing.customers c ON c.account_id = t.account_id
  WHERE t.account_id = p_account_id AND t.enabled AND t.task_id = p_task_id);
END $$;

COMMENT ON FUNCTION api.auto_topup_payment(p_account_id uuid, p_task_id uuid) IS 'pgtally worker: what the auto top-up task p_task_id pays (customer, bundle, amount in minor units, currency, and Stripe''s idempotency key auto-topup-<task id>); NULL when auto top-up was turned off meanwhile or this task is no longer the one in flight (turned off and on, or released as stuck).';

REVOKE ALL ON FUNCTION api.auto_topup_payment(p_account_id uuid, p_task_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.auto_topup_payment(p_account_id uuid, p_task_id uuid) TO pgtally_api;

CREATE FUNCTION api.auto_topup_started(p_account_id uuid, p_task_id uuid, p_payment_intent text) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  UPDATE billing.auto_topups SET stripe_payment_intent_id = left(p_payment_intent, 255), updated_at = util.now()
  WHERE account_id = p_account_id AND task_id = p_task_id;
END $$;

COMMENT ON FUNCTION api.auto_topup_started(p_account_id uuid, p_task_id uuid, p_payment_intent text) IS 'pgtally worker: Stripe answered the top-up of task p_task_id with PaymentIntent p_payment_intent (its credits arrive with payment_intent.succeeded).';

REVOKE ALL ON FUNCTION api.auto_topup_started(p_account_id uuid, p_task_id uuid, p_payment_intent text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.auto_topup_started(p_account_id uuid, p_task_id uuid, p_payment_intent text) TO pgtally_api;

CREATE FUNCTION api.balance(p_api_key text, p_session_id uuid, p_account_id uuid DEFAULT NULL::uuid) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_account_id uuid;
  v_account identity.accounts;
BEGIN
  -- authenticate is volatile (it keeps last_used_at): call it once, never inside a WHERE clause.
  v_account_id := identity.authenticate(p_api_key, p_session_id, 'usage:read', p_account_id);
  v_account := ledger.refreshed_account(v_account_id);
  RETURN jsonb_build_object(
    'account_id', v_account.id,
    'plan', identity.effective_plan(v_account),
    'credits', util.credits(v_account.credit_balance_micros),
    'held', util.credits(v_account.held_micros),
    'available', util.credits(v_account.credit_balance_micros - v_account.held_micros),
    'allowances', metering.allowances_json(v_account),
    'spending', metering.spending_json(v_account))
    || ledger.credits_json(v_account);
END $$;

COMMENT ON FUNCTION api.balance(p_api_key text, p_session_id uuid, p_account_id uuid) IS 'GET /v1/balance: the caller''s credit balance (credits: the spendable lots; held: reserved by open holds; available: what a charge may spend; pending: granted lots not spendable yet; next_expiry {credits, at}: what expires next) and, per entitled meter, the current period''s allowance ({kind, unit, period, limit, used, remaining, resets_at}), and for a post-paid plan its spending this billing period (metering.spending_json; null otherwise). Principal: API key (scope usage:read) or session id; p_account_id for service keys. TL401/TL403/TL404 as identity.authenticate.';

REVOKE ALL ON FUNCTION api.balance(p_api_key text, p_session_id uuid, p_account_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.balance(p_api_key text, p_session_id uuid, p_account_id uuid) TO pgtally_api;

CREATE FUNCTION api.billing_account(p_api_key text, p_session_id uuid, p_account_id uuid DEFAULT NULL::uuid) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_account_id uuid;
  a identity.accounts;
  s billing.subscriptions;
BEGIN
  v_account_id := identity.authenticate(p_api_key, p_session_id, 'billing:read', p_account_id);
  SELECT * INTO a FROM identity.accounts WHERE id = v_account_id;
  SELECT * INTO s FROM billing.subscriptions
  WHERE account_id = a.id
  ORDER BY (status IN ('active', 'trialing', 'past_due')) DESC, current_period_end DESC NULLS LAST
  LIMIT 1;
  RETURN jsonb_build_object(
    'account_id', a.id, 'plan', identity.effective_plan(a), 'subscribed_plan', a.plan_id,
    'stripe_customer_id', (SELECT stripe_customer_id FROM billing.customers WHERE account_id = a.id),
    'plan_grace_until', util.iso(a.plan_grace_until),
    'suspended', CASE WHEN a.suspended_at IS NOT NULL
                      THEN jsonb_build_object('at', util.iso(a.suspended_at), 'reason', a.suspended_reason) END,
    'subscription', CASE WHEN s.stripe_subscription_id IS NULL THEN NULL ELSE jsonb_build_object(
      'id', s.stripe_subscription_id, 'status', s.status, 'plan', s.plan_id, 'price', s.price_id,
      'stripe_item_id', s.stripe_item_id,
      'current_period_start', util.iso(s.current_period_start), 'current_period_end', util.iso(s.current_period_end),
      'cancel_at_period_end', s.cancel_at_period_end, 'cancel_at', util.iso(s.cancel_at),
      'ending', s.cancel_at_period_end OR s.cancel_at IS NOT NULL, 'canceled_at', util.iso(s.canceled_at),
      'live', s.status IN ('active', 'trialing', 'past_due')) END);
END $$;

COMMENT ON FUNCTION api.billing_account(p_api_key text, p_session_id uuid, p_account_id uuid) IS 'GET /v1/billing/subscription (permission billing:read; p_account_id: a team): the account''s plan, Stripe customer, suspension (at, reason: set by an operator), payment grace and its subscription (the live one, else the latest; ending: it will not renew, at cancel_at or its period end).';

REVOKE ALL ON FUNCTION api.billing_account(p_api_key text, p_session_id uuid, p_account_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.billing_account(p_api_key text, p_session_id uuid, p_account_id uuid) TO pgtally_api;

CREATE FUNCTION api.budgets(p_api_key text, p_session_id uuid, p_account_id uuid DEFAULT NULL::uuid) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  p record := identity.authenticate_principal(p_api_key, p_session_id, 'usage:read', p_account_id);
  v_all boolean;
BEGIN
  -- Who may read billing sees every budget; a member sees their own and their keys'.
  v_all := CASE WHEN p.api_key_id IS NOT NULL
                THEN EXISTS (SELECT 1 FROM identity.api_keys k WHERE k.id = p.api_key_id
                             AND k.scopes && '{billing:read,billing:manage,service}')
                     AND (p.user_id IS NULL OR identity.member_may(p.user_id, p.account_id, 'billing:read'))
                ELSE p.user_id IS NULL OR identity.member_may(p.user_id, p.account_id, 'billing:read') END;
  RETURN metering.budgets_json(p.account_id, p.user_id, v_all);
END $$;

COMMENT ON FUNCTION api.budgets(p_api_key text, p_session_id uuid, p_account_id uuid) IS 'GET /v1/budgets: the account''s budgets with this window''s spending: all of them for owners, admins, billing and viewer members (and keys with billing:read); a member''s own (member budget and their keys'') for the rest. Principal: usage:read.';

REVOKE ALL ON FUNCTION api.budgets(p_api_key text, p_session_id uuid, p_account_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.budgets(p_api_key text, p_session_id uuid, p_account_id uuid) TO pgtally_api;

CREATE FUNCTION api.capture_hold(p_api_key text, p_session_id uuid, p_hold_id uuid, p_quantity bigint DEFAULT NULL::bigint, p_input_tokens bigint DEFAULT NULL::bigint, p_output_tokens bigint DEFAULT NULL::bigint, p_account_id uuid DEFAULT NULL::uuid) RETURNS TABLE(replayed boolean, body json)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  a identity.accounts := metering.locked_account(p_api_key, p_session_id, p_account_id);
  h metering.holds;
BEGIN
  SELECT * INTO h FROM metering.holds WHERE id = p_hold_id AND account_id = a.id;
  IF NOT FOUND THEN
    PERFORM util.fail('TL404', 'no such hold');
  ELSIF h.status IN ('released', 'expired') THEN
    PERFORM util.fail('TL40C', format('the hold was %s: nothing to capture', h.status),
                      jsonb_build_object('hold_status', h.status));
  END IF;
  -- Return the reservation, then charge the actual amount as one usage event, exactly once
  -- (key hold:<id>; a repeated capture replays it). If the balance does not cover more than was
  -- held, api.consume refuses (TL402) and everything here rolls back: the hold stays open.
  PERFORM metering.settle_hold(h, 'captured');
  RETURN QUERY SELECT * FROM api.consume(p_api_key, p_session_id, 'hold:' || h.id, h.meter_id,
                                         CASE WHEN h.input_tokens IS NULL THEN coalesce(p_quantity, h.quantity) END,
                                         CASE WHEN h.input_tokens IS NOT NULL THEN coalesce(p_input_tokens, h.input_tokens) END,
                                         CASE WHEN h.input_tokens IS NOT NULL THEN coalesce(p_output_tokens, h.output_tokens) END,
                                         p_account_id);
END $$;

COMMENT ON FUNCTION api.capture_hold(p_api_key text, p_session_id uuid, p_hold_id uuid, p_quantity bigint, p_input_tokens bigint, p_output_tokens bigint, p_account_id uuid) IS 'POST /v1/holds/{id}/capture: return what the hold reserved and charge the actual quantity or tokens (the held ones when not given) as one usage event, exactly once (idempotency key hold:<id>: a repeated capture returns the first answer, replayed = true; a different amount is TL42R). More than was held only when the balance covers the difference (TL402 otherwise; the hold stays open). TL40C after release or expiry (DETAIL hold_status: released or expired), TL404 unknown hold.';

REVOKE ALL ON FUNCTION api.capture_hold(p_api_key text, p_session_id uuid, p_hold_id uuid, p_quantity bigint, p_input_tokens bigint, p_output_tokens bigint, p_account_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.capture_hold(p_api_key text, p_session_id uuid, p_hold_id uuid, p_quantity bigint, p_input_tokens bigint, p_output_tokens bigint, p_account_id uuid) TO pgtally_api;

CREATE FUNCTION api.check_alerts(p_email text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
  v_condition text;
  v_detail jsonb;
  v_since timestamptz;
  v_sent text[] := '{}';
BEGIN
  IF p_email IS NULL OR p_email !~ '^[^@\s]+@[^@\s]+$' THEN
    RETURN jsonb_build_object('sent', '[]'::jsonb);
  END IF;
  FOREACH v_condition IN ARRAY ARRAY['webhook_rejected', 'reconciliation', 'outbox_failed'] LOOP
    -- At most once an hour per condition; each alert tells what happened since the last one.
    SELECT last_sent_at INTO v_since FROM ops.alerts WHERE condition = v_condition FOR UPDATE;
    IF v_since > util.now() - interval '1 hour' THEN
      CONTINUE;
    END IF;
    v_detail := CASE v_condition
      WHEN 'webhook_rejected' THEN (
        SELECT jsonb_build_object('count', count(*), 'examples', jsonb_agg(jsonb_build_object('id', id, 'type', type, 'note', note)))
        FROM (SELECT * FROM billing.stripe_events WHERE status = 'rejected' AND received_at > coalesce(v_since, '-infinity')
              ORDER BY received_at DESC LIMIT 5) e
        HAVING count(*) > 0)
      WHEN 'reconciliation' THEN ops.reconciliation_problems()
      WHEN 'outbox_failed' THEN (
        SELECT jsonb_build_object('count', count(*), 'kinds', jsonb_agg(DISTINCT kind))
        FROM outbox.messages WHERE failed_at > coalesce(v_since, '-infinity') AND kind <> 'alert'
        HAVING count(*) > 0)
    END;
    IF v_detail IS NOT NULL THEN
      INSERT INTO outbox.messages (kind, recipient, payload, created_at, next_attempt_at)
      VALUES ('alert', p_email, jsonb_build_object('condition', v_condition, 'detail', v_detail::text), util.now(), util.now());
      INSERT INTO ops.alerts (condition, last_sent_at, last_detail) VALUES (v_condition, util.now(), v_detail)
      ON CONFLICT (condition) DO UPDATE SET last_sent_at = EXCLUDED.last_sent_at, last_detail = EXCLUDED.last_detail;
      v_sent := v_sent || v_condition;
    END IF;
  END LOOP;
  RETURN jsonb_build_object('sent', to_jsonb(v_sent));
END $_$;

COMMENT ON FUNCTION api.check_alerts(p_email text) IS 'pgtally worker (housekeeping), with PGTALLY_ALERT_EMAIL: for each condition that holds, queue one alert email (outbox kind alert) unless one went out in the last hour (ops.alerts): webhook_rejected (signed Stripe events rejected since the last alert), reconciliation (any row in a reconciliation view, or revenue drift), outbox_failed (messages that exhausted their retries since the last alert). Returns {sent: [conditions]}.';

REVOKE ALL ON FUNCTION api.check_alerts(p_email text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.check_alerts(p_email text) TO pgtally_api;

CREATE FUNCTION api.check_usage(p_api_key text, p_session_id uuid, p_meter text, p_quantity bigint DEFAULT NULL::bigint, p_input_tokens bigint DEFAULT NULL::bigint, p_output_tokens bigint DEFAULT NULL::bigint, p_account_id uuid DEFAULT NULL::uuid) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_account_id uuid;
  v_account identity.accounts;
  q record;
BEGIN
  v_account_id := identity.authenticate(p_api_key, p_session_id, 'usage:read', p_account_id);
  SELECT * INTO v_account FROM identity.accounts WHERE id = v_account_id;
  SELECT * INTO q FROM metering.quote(v_account, p_meter, p_quantity, p_input_tokens, p_output_tokens);
  RETURN jsonb_build_object(
    'allowed', q.allowed, 'meter', q.meter_id, 'quantity', q.quantity,
    'input_tokens', q.input_tokens, 'output_tokens', q.output_tokens,
    'charge', jsonb_build_object('allowance_units', CASE WHEN q.allowed THEN q.allowance_units ELSE 0 END,
                                 'credits', util.credits(CASE WHEN q.allowed THEN q.credits_micros ELSE 0 END)),
    'required_credits', util.credits(q.credits_micros),
    'amount', q.amount_minor, 'currency', q.currency,
    'allowance', q.allowance,
    'balance', jsonb_build_object('credits', util.credits(q.balance_after_micros)),
    'warnings', CASE WHEN q.allowed THEN q.warnings ELSE '[]' END,
    'resets_at', util.iso(q.period_end));
END $$;

COMMENT ON FUNCTION api.check_usage(p_api_key text, p_session_id uuid, p_meter text, p_quantity bigint, p_input_tokens bigint, p_output_tokens bigint, p_account_id uuid) IS 'POST /v1/usage/check: what api.consume would do for this request now, with no side effect: {allowed, meter, quantity, charge {allowance_units, credits}, required_credits, amount and currency (post-paid: what it would cost, minor units), allowance and balance after it, warnings, resets_at}. Principal as api.consume (scope usage:read). TL422 bad input.';

REVOKE ALL ON FUNCTION api.check_usage(p_api_key text, p_session_id uuid, p_meter text, p_quantity bigint, p_input_tokens bigint, p_output_tokens bigint, p_account_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.check_usage(p_api_key text, p_session_id uuid, p_meter text, p_quantity bigint, p_input_tokens bigint, p_output_tokens bigint, p_account_id uuid) TO pgtally_api;

CREATE FUNCTION api.checkout_opened(p_account_id uuid, p_checkout_session text, p_mode text, p_price text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_expire jsonb;
BEGIN
  -- One at a time per account: of two Checkouts opened at once, the later one sees the earlier.
  PERFORM 1 FROM identity.accounts WHERE id = p_account_id FOR NO KEY UPDATE;
  INSERT INTO billing.checkout_sessions (stripe_checkout_session_id, account_id, mode, price_id, created_at)
  VALUES (p_checkout_session, p_account_id, p_mode, p_price, util.now())
  ON CONFLICT (stripe_checkout_session_id) DO NOTHING;
  IF p_mode <> 'subscription' THEN
    RETURN jsonb_build_object('expire', '[]'::jsonb);
  END IF;
  WITH expired AS (
    UPDATE billing.checkout_sessions SET status = 'expired', closed_at = util.now()
    WHERE account_id = p_account_id AND mode = 'subscription' AND status = 'open'
      AND stripe_checkout_session_id <> p_checkout_session
    RETURNING stripe_checkout_session_id)
  SELECT coalesce(jsonb_agg(stripe_checkout_session_id ORDER BY stripe_checkout_session_id), '[]') INTO v_expire FROM expired;
  RETURN jsonb_build_object('expire', v_expire);
END $$;

COMMENT ON FUNCTION api.checkout_opened(p_account_id uuid, p_checkout_session text, p_mode text, p_price text) IS 'Checkout, last step (the server, after Stripe created the session for the account api.checkout_prepare authenticated): record the session; for a subscription, mark the account''s other open subscription sessions expired and return their ids ({expire: [...]}) for the server to expire at Stripe (POST /v1/checkout/sessions/:id/expire), so at most one can be paid. Serialised per account.';

REVOKE ALL ON FUNCTION api.checkout_opened(p_account_id uuid, p_checkout_session text, p_mode text, p_price text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.checkout_opened(p_account_id uuid, p_checkout_session text, p_mode text, p_price text) TO pgtally_api;

CREATE FUNCTION api.checkout_prepare(p_api_key text, p_session_id uuid, p_price text, p_account_id uuid DEFAULT NULL::uuid, p_idempotency_key text DEFAULT NULL::text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_account_id uuid := billing.buyer(p_api_key, p_session_id, p_account_id);
  v_price billing.prices;
BEGIN
  SELECT * INTO v_price FROM billing.prices WHERE id = p_price AND active;
  IF NOT FOUND THEN
    PERFORM util.fail('TL422', format('there is no price %L', p_price),
                      jsonb_build_object('prices', (SELECT jsonb_agg(id ORDER BY id) FROM billing.prices WHERE active)));
  END IF;
  IF v_price.plan_id IS NOT NULL AND EXISTS (
       SELECT 1 FROM billing.subscriptions
       WHERE account_id = v_account_id AND status IN ('active', 'trialing', 'past_due')) THEN
    PERFORM util.fail('TL40C', 'the account already has a subscription: change it instead',
                      jsonb_build_object('change_url', '/v1/billing/subscription/change'));
  END IF;
  RETURN jsonb_build_object(
    'account_id', v_account_id,
    'email', (SELECT email FROM identity.users WHERE account_id = v_account_id),
    'stripe_customer_id', (SELECT stripe_customer_id FROM billing.customers WHERE account_id = v_account_id),
    'mode', CASE WHEN v_price.plan_id IS NULL THEN 'payment' ELSE 'subscription' END,
    'price', v_price.id, 'stripe_price_id', v_price.stripe_price_id, 'usage_type', v_price.usage_type,
    'amount', v_price.amount_minor, 'currency', v_price.currency, 'credits', util.credits(v_price.credits_micros),
    -- Stripe's idempotency keys are shared by the whole Stripe account: a client's key is made
    -- pgtally's own, the account's, so two accounts sending the same key never collide.
    'stripe_idempotency_key', CASE WHEN p_idempotency_key IS NOT NULL THEN
      v_account_id || '-' || encode(sha256(convert_to(p_idempotency_key, 'UTF8')), 'hex') END);
END $$;

COMMENT ON FUNCTION api.checkout_prepare(p_api_key text, p_session_id uuid, p_price text, p_account_id uuid, p_idempotency_key text) IS 'POST /v1/billing/checkout, the pricing page and one-click top-ups, step 1: the buyer''s account (billing.buyer), email and Stripe customer (if any), and the mode for a price code (subscription for plan prices, payment for bundles) with its amount and usage_type (a metered price is bought with no quantity). stripe_idempotency_key: with the client''s Idempotency-Key (p_idempotency_key), the account id and the key''s SHA-256 (hex), which the server prefixes with the call (checkout-, topup-) and sends to Stripe; NULL without one. TL422 unknown price; TL40C (409 conflict) a plan price while a subscription is live.';

REVOKE ALL ON FUNCTION api.checkout_prepare(p_api_key text, p_session_id uuid, p_price text, p_account_id uuid, p_idempotency_key text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.checkout_prepare(p_api_key text, p_session_id uuid, p_price text, p_account_id uuid, p_idempotency_key text) TO pgtally_api;

CREATE FUNCTION api.claim_handoff(p_code text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_session_id uuid;
BEGIN
  UPDATE identity.handoff_codes SET claimed_at = util.now()
  WHERE code_hash = util.token_hash(p_code) AND claimed_at IS NULL AND expires_at > util.now()
  RETURNING device_session_id INTO v_session_id;
  RETURN jsonb_build_object('device_session_id', v_session_id);
END $$;

COMMENT ON FUNCTION api.claim_handoff(p_code text) IS 'A sign-in page claims a handoff code (api.handoff_code): {device_session_id} of the install, or {device_session_id: null} when the code is unknown, claimed already or expired. Single use: of any number of concurrent claims exactly one gets the session. Issue 25.';

REVOKE ALL ON FUNCTION api.claim_handoff(p_code text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.claim_handoff(p_code text) TO pgtally_api;

CREATE FUNCTION api.confirm_sso_link(p_token text, p_ip text, p_user_agent text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  r record;                        -- an identity.sso_link_requests row (0024)
  u identity.users;
  v_owner uuid;
  v_tokens jsonb;
BEGIN
  -- The claim: one use, before it expires.
  UPDATE identity.sso_link_requests SET used_at = util.now()
  WHERE token_hash = util.token_hash(p_token) AND used_at IS NULL AND expires_at > util.now()
  RETURNING * INTO r;
  IF NOT FOUND THEN
    RETURN identity.error('TL400', 'this link is not valid, was used already or has expired: sign in through your organisation again');
  END IF;
  SELECT * INTO u FROM identity.users WHERE id = r.user_id FOR UPDATE;
  IF identity.sso_team_of(u.email_normalized) IS DISTINCT FROM r.account_id THEN
    RETURN identity.error('TL400', 'this team no longer signs in people of your address''s domain');
  END IF;
  SELECT user_id INTO v_owner FROM identity.user_identities WHERE provider = 'sso' AND subject = r.subject;
  IF v_owner IS NULL THEN
    BEGIN
      PERFORM identity.link_identity(u.id, 'sso', r.subject, r.email, true);
    EXCEPTION WHEN unique_violation THEN     -- another user's confirmation of the same subject won
      RETURN identity.error('TL40C', 'this sign-in of your organisation is linked to another user');
    END;
  ELSIF v_owner <> u.id THEN
    RETURN identity.error('TL40C', 'this sign-in of your organisation is linked to another user');
  END IF;
  PERFORM identity.mark_email_verified(u.id);
  INSERT INTO identity.memberships (account_id, user_id, role, created_at)
  VALUES (r.account_id, u.id, 'member', util.now()) ON CONFLICT (account_id, user_id) DO NOTHING;
  v_tokens := identity.start_session(u.account_id, u.id, p_ip, p_user_agent, 'sso');
  PERFORM identity.log_event('oauth_linked', u.id, u.account_id, (v_tokens ->> 'session_id')::uuid, p_ip, p_user_agent,
                             jsonb_build_object('provider', 'sso', 'team', r.account_id, 'confirmed_by', 'email'));
  RETURN v_tokens;
END $$;

COMMENT ON FUNCTION api.confirm_sso_link(p_token text, p_ip text, p_user_agent text) IS 'POST /auth/sso/confirm: the user opened the link identity.request_sso_link emailed: link the team''s provider to them (once, within an hour), make them a member of the team, confirm their address, sign them in (identity.tokens). TL400 unknown, used or expired link, or the team lost the domain; TL40C the provider account is linked to someone else.';

REVOKE ALL ON FUNCTION api.confirm_sso_link(p_token text, p_ip text, p_user_agent text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.confirm_sso_link(p_token text, p_ip text, p_user_agent text) TO pgtally_api;

CREATE FUNCTION api.consume(p_api_key text, p_session_id uuid, p_idempotency_key text, p_meter text, p_quantity bigint DEFAULT NULL::bigint, p_input_tokens bigint DEFAULT NULL::bigint, p_output_tokens bigint DEFAULT NULL::bigint, p_account_id uuid DEFAULT NULL::uuid, p_metadata jsonb DEFAULT NULL::jsonb) RETURNS TABLE(replayed boolean, body json)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_account_id uuid;
  v_account identity.accounts;
  v_hash bytea := metering.request_hash(p_meter, p_quantity, p_input_tokens, p_output_tokens, p_metadata);
  v_key metering.idempotency_keys;
  q record;
  v_p record;                          -- the principal: account_id, api_key_id, user_id
  v_refusal jsonb;
BEGIN
  IF p_idempotency_key IS NULL OR length(p_idempotency_key) NOT BETWEEN 1 AND 255 THEN
    PERFORM util.fail('TL422', 'an idempotency key of 1 to 255 characters is required');
  END IF;
  IF p_metadata IS NOT NULL AND (jsonb_typeof(p_metadata) <> 'object' OR length(p_metadata::text) > 2048) THEN
    PERFORM util.fail('TL422', 'metadata is a JSON object of at most 2 KB', '{"field": "metadata"}');
  END IF;
  -- Every charge to an account serialises on its row: the allowance, the balance and the
  -- idempotency check below all read state no concurrent charge can change until we commit.
  v_p := identity.authenticate_principal(p_api_key, p_session_id, 'usage:write', p_account_id);
  v_account_id := v_p.account_id;
  SELECT * INTO v_account FROM identity.accounts WHERE id = v_account_id FOR NO KEY UPDATE;
  IF EXISTS (SELECT 1 FROM metering.holds h
             WHERE h.account_id = v_account.id AND h.status = 'open' AND h.expires_at <= util.now()) THEN
    PERFORM metering.expire_holds(v_account.id);       -- (most accounts have none: no call)
    SELECT * INTO v_account FROM identity.accounts WHERE id = v_account_id;
  END IF;
  IF v_account.credits_due_at <= util.now() THEN     -- (NULL AND f() would still call f)
    IF ledger.refresh_lots(v_account.id) THEN
      SELECT * INTO v_account FROM identity.accounts WHERE id = v_account_id;  -- lots released, expired or granted
    END IF;
  END IF;

  SELECT * INTO v_key FROM metering.idempotency_keys
  WHERE account_id = v_account.id AND idempotency_key = p_idempotency_key;
  IF FOUND THEN                         -- a replay, or TL42R for another request
    PERFORM util.idempotency_check(v_key.request_hash, v_hash, 'request',
                                   jsonb_build_object('usage_event_id', v_key.usage_event_id));
    replayed := true;
    body := metering.replayed_answer(v_key);
    RETURN NEXT;
    RETURN;
  END IF;

  -- (Calls in expressions, not SELECT ... FROM f(): no executor and tuplestore for a one-row result.)
  q := metering.quote(v_account, p_meter, p_quantity, p_input_tokens, p_output_tokens);
  IF NOT q.allowed THEN
    PERFORM util.fail('TL402', q.refusal ->> 'message', q.refusal -> 'detail');
  END IF;
  IF v_account.has_budgets AND q.credits_micros > 0 THEN      -- (no budget: not even a query)
    v_refusal := (metering.budgets_apply(v_account, v_p.api_key_id, v_p.user_id, q.credits_micros)).refusal;
    IF v_refusal IS NOT NULL THEN
      PERFORM util.fail('TL4B2', v_refusal ->> 'message', v_refusal -> 'detail');
    END IF;
  END IF;
  replayed := false;
  body := (metering.charge(v_account, p_idempotency_key, v_hash, p_metadata, q, false, NULL,
                           v_p.api_key_id, v_p.user_id)).answer;
  RETURN NEXT;
END $$;

COMMENT ON FUNCTION api.consume(p_api_key text, p_session_id uuid, p_idempotency_key text, p_meter text, p_quantity bigint, p_input_tokens bigint, p_output_tokens bigint, p_account_id uuid, p_metadata jsonb) IS 'POST /v1/usage/events: authenticate the principal (API key with scope usage:write, or session id; a service key may name p_account_id), then charge one usage event exactly once: the allowance first, then credits at the meter''s rate, writing the usage event and its idempotency key (metering.idempotency_keys), allowance usage, ledger transfer, any warning emails (outbox) and, for post-paid usage, its report to Stripe''s meter (outbox meter_event) in this one transaction. p_metadata: the caller''s JSON object (at most 2 KB), stored, returned and part of the fingerprint. Returns (replayed, body): body is the usage event JSON {id, meter, quantity, charged {allowance_units, credits; post-paid: amount (minor units), currency}, allowance, balance {credits}, warnings, metadata, created_at}; a retry with the same key and request within the idempotency window (metering.idempotency_window(), 30 days) returns the same body, rebuilt from the event (metering.usage_event_answer), with replayed = true. Errors: TL401 bad key or session, TL403 scope, TL404 unknown p_account_id, TL402 neither allowance nor credits cover it (DETAIL: account_id, required_credits, balance, allowance, resets_at; nothing is charged) or, post-paid, the spending limit does not (DETAIL: required_amount, spent, spending_limit, currency, resets_at), TL4B2 a budget of the account, key or member does not cover the credits (metering.budgets_apply; DETAIL names the budget and resets_at; nothing is charged), TL42R key reused for a different request (util.idempotency_check; nothing charged), TL422 bad input.';

REVOKE ALL ON FUNCTION api.consume(p_api_key text, p_session_id uuid, p_idempotency_key text, p_meter text, p_quantity bigint, p_input_tokens bigint, p_output_tokens bigint, p_account_id uuid, p_metadata jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION api.consume(p_api_key text, p_session_id uuid, p_idempotency_key text, p_meter text, p_quantity bigint, p_input_tokens bigint, p_output_tokens bigint, p_account_id uuid, p_metadata jsonb) TO pgtally_api;

CREATE FUNCTION api.consume_batch(p_api_key text, p_session_id uuid, p_events jsonb, OUT data json, OUT charged integer, OUT replayed integer, OUT refused integer) RETURNS record
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  e jsonb;
  v_named text;
  i integer := 0;
  v_accounts uuid[] := '{}';
  v_principals jsonb := '{}';          -- per account_id named in the batch: {account_id} or {refusal}
  v_account_id uuid;
  a identity.accounts;
  q record;
  v_hash bytea;
  v_metadata jsonb;
  v_prior metering.idempotency_keys;
  v_answer jsonb;                      -- a refusal
  v_result json;                       -- a charge or a replay: {index, status, event}
  v_results json[] := '{}';            -- appended in place (an expanded array); json, so that each answer
                                       -- is built once as text and never taken apart again (migration 0023)
  v_events metering.usage_events[] := '{}';         -- the charged events and their keys, written at the end
  v_keys metering.idempotency_keys[] := '{}';
  v_key metering.idempotency_keys;
  v_event metering.usage_events;
  v_group integer[];                   -- per event: its (account, key) group: events that share account and key
  v_priors metering.idempotency_keys[];  -- per event: its key's record from an earlier request (NULL: none)
  v_group_key integer[] := '{}';       -- per group: the place in v_keys of the event that charged it
  v_group_result integer[] := '{}';    -- per group: that event's place in v_results
  v_seen integer;
  v_window integer[];                  -- per event: its (account, meter) group, whose window the batch keeps
  v_w integer;
  v_w_account uuid[] := '{}';          -- per (account, meter) group charged: its allowance window, written at the end
  v_w_meter text[] := '{}';
  v_w_start timestamptz[] := '{}';
  v_w_end timestamptz[] := '{}';
  v_w_used bigint[] := '{}';
  v_w_meter_def metering.meters[] := '{}';          -- and its meter and entitlement, given to its next quotes
  v_w_entitlement_def billing.entitlements[] := '{}';
  v_read boolean := true;              -- whether a must be read again (another account, or credits spent)
  v_charge record;
  v_ids uuid[];                        -- the events' ids, made together (util.uuid_v7s)
  v_state text;
  v_message text;
  v_detail text;
  v_p record;                          -- the principal (identity.authenticate_principal): the same key or session for every account
  v_key_id uuid;
  v_user_id uuid;
  v_refusal jsonb;
BEGIN
  replayed := 0;
  refused := 0;
  IF jsonb_typeof(p_events) IS DISTINCT FROM 'array' OR jsonb_array_length(p_events) NOT BETWEEN 1 AND 1000 THEN
    PERFORM util.fail('TL422', 'events is an array of 1 to 1,000 usage events', '{"field": "events"}');
  END IF;
  -- Who may charge which account, decided once per account (identity.authenticate, read-only but
  -- for last_used_at); then every account the batch charges is locked, in id order, so that two
  -- batches over the same accounts never wait on each other in a cycle.
  FOR v_named IN SELECT DISTINCT coalesce(x ->> 'account_id', '') FROM jsonb_array_elements(p_events) x LOOP
    BEGIN
      v_p := identity.authenticate_principal(p_api_key, p_session_id, 'usage:write', nullif(v_named, '')::uuid);
      v_account_id := v_p.account_id;
      v_key_id := v_p.api_key_id;
      v_user_id := v_p.user_id;
      v_principals := v_principals || jsonb_build_object(v_named, jsonb_build_object('account_id', v_account_id));
      v_accounts := v_accounts || v_account_id;
    EXCEPTION WHEN SQLSTATE 'TL401' THEN
      RAISE;                                      -- no principal: the whole batch is refused
    WHEN OTHERS THEN
      GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_message = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL;
      v_principals := v_principals || jsonb_build_object(v_named, jsonb_build_object('refusal',
        metering.batch_refusal(CASE WHEN v_state LIKE 'TL%' THEN v_state ELSE 'TL422' END, v_message,
                               CASE WHEN v_detail ~ '^\{' THEN v_detail::jsonb END)));
    END;
  END LOOP;
  PERFORM 1 FROM identity.accounts WHERE id = ANY (v_accounts) ORDER BY id FOR NO KEY UPDATE;
  v_ids := util.uuid_v7s(jsonb_array_length(p_events));
  FOREACH v_account_id IN ARRAY v_accounts LOOP
    PERFORM metering.expire_holds(v_account_id);
    PERFORM ledger.refresh_lots(v_account_id);
  END LOOP;
  -- Every event's idempotency record from earlier requests, read in one statement now that the
  -- accounts are locked; and its group, so that a key charged earlier in this batch (not in the
  -- table yet) is found by array index, not by a lookup that grows with the batch.
  -- (A subquery per event, so that each is one probe of the key index: as a join, the planner
  -- may hash the whole key table for a batch of a hundred.)
  SELECT array_agg(x.grp ORDER BY x.n), array_agg(x.wgrp ORDER BY x.n),
         array_agg((SELECT k FROM metering.idempotency_keys k
                    WHERE k.account_id = x.account_id AND k.idempotency_key = x.idempotency_key) ORDER BY x.n)
  INTO v_group, v_window, v_priors
  FROM (SELECT t.n, dense_rank() OVER (ORDER BY p.account_id, t.x ->> 'idempotency_key') AS grp,
               dense_rank() OVER (ORDER BY p.account_id, t.x ->> 'meter') AS wgrp,
               p.account_id, t.x ->> 'idempotency_key' AS idempotency_key
        FROM jsonb_array_elements(p_events) WITH ORDINALITY t(x, n)
        CROSS JOIN LATERAL (SELECT (v_principals -> coalesce(t.x ->> 'account_id', '') ->> 'account_id')::uuid AS account_id) p) x;

  FOR e IN SELECT value FROM jsonb_array_elements(p_events) LOOP
    v_account_id := (v_principals -> coalesce(e ->> 'account_id', '') ->> 'account_id')::uuid;
    v_answer := v_principals -> coalesce(e ->> 'account_id', '') -> 'refusal';
    v_result := NULL;
    -- Each event is checked (key, metadata, its idempotency record, metering.quote) in a read-only
    -- block, then charged outside it by metering.charge, as api.consume charges: a refused event
    -- writes nothing, and no event holds a subtransaction that writes (more than 64 of those in a
    -- transaction slow every snapshot of the server).
    IF v_answer IS NULL AND coalesce(length(e ->> 'idempotency_key'), 0) NOT BETWEEN 1 AND 255 THEN
      v_answer := metering.batch_refusal('TL422', 'an idempotency key of 1 to 255 characters is required');
    ELSIF v_answer IS NULL AND e ? 'metadata' AND (jsonb_typeof(e -> 'metadata') NOT IN ('object', 'null')
                                                   OR length((e -> 'metadata')::text) > 2048) THEN
      v_answer := metering.batch_refusal('TL422', 'metadata is a JSON object of at most 2 KB');
    END IF;
    IF v_answer IS NULL THEN
      v_metadata := nullif(e -> 'metadata', 'null'::jsonb);
      -- A key charged earlier in this batch is not in the table yet.
      v_seen := v_group_key[v_group[i + 1]];
      v_prior := CASE WHEN v_seen IS NOT NULL THEN v_keys[v_seen] ELSE v_priors[i + 1] END;
      IF v_read OR a.id IS DISTINCT FROM v_account_id THEN
        SELECT * INTO a FROM identity.accounts WHERE id = v_account_id;
        v_read := false;
      END IF;
      BEGIN
        v_hash := metering.request_hash(e ->> 'meter', (e ->> 'quantity')::bigint, (e ->> 'input_tokens')::bigint,
                                        (e ->> 'output_tokens')::bigint, v_metadata);
        IF v_prior.usage_event_id IS NULL THEN
          v_w := v_window[i + 1];
          q := metering.quote(a, e ->> 'meter', (e ->> 'quantity')::bigint, (e ->> 'input_tokens')::bigint,
                              (e ->> 'output_tokens')::bigint, v_w_start[v_w], v_w_used[v_w], v_w_end[v_w],
                              v_w_meter_def[v_w], v_w_entitlement_def[v_w]);
          IF NOT q.allowed THEN
            v_answer := metering.batch_refusal('TL402', q.refusal ->> 'message', q.refusal -> 'detail');
          END IF;
        ELSIF util.idempotency_check(v_prior.request_hash, v_hash, 'request',
                                     jsonb_build_object('usage_event_id', v_prior.usage_event_id)) THEN
          v_result := json_build_object('index', i, 'status', 'replayed', 'event',
                                        CASE WHEN v_seen IS NOT NULL THEN v_results[v_group_result[v_group[i + 1]]] -> 'event'
                                             ELSE metering.replayed_answer(v_prior) END);
          replayed := replayed + 1;
        END IF;
      EXCEPTION WHEN SQLSTATE 'TL422' OR SQLSTATE 'TL42R' OR data_exception THEN
        -- an unknown meter, a bad quantity, a key reused for another request (read only)
        GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_message = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL;
        v_answer := metering.batch_refusal(CASE WHEN v_state = 'TL42R' THEN v_state ELSE 'TL422' END, v_message,
                                           CASE WHEN v_state = 'TL42R' THEN v_detail::jsonb END);
      END;
    END IF;
    IF v_answer IS NULL AND v_result IS NULL AND a.has_budgets THEN
      -- Budgets (accounts that have some): checked before anything is written, spent if they cover it.
      IF q.credits_micros > 0 THEN      -- (q is assigned only here: a separate IF)
        v_refusal := (metering.budgets_apply(a, v_key_id, v_user_id, q.credits_micros)).refusal;
        IF v_refusal IS NOT NULL THEN
          v_answer := metering.batch_refusal('TL4B2', v_refusal ->> 'message', v_refusal -> 'detail');
        END IF;
      END IF;
    END IF;
    IF v_answer IS NULL AND v_result IS NULL THEN
      v_charge := metering.charge(a, e ->> 'idempotency_key', v_hash, v_metadata, q, true, v_ids[i + 1],
                                  v_key_id, v_user_id);
      v_event := v_charge.event;
      v_result := json_build_object('index', i, 'status', 'charged', 'event', v_charge.answer);
      v_key.account_id := v_event.account_id;
      v_key.idempotency_key := v_event.idempotency_key;
      v_key.usage_event_id := v_event.id;
      v_key.created_at := v_event.created_at;
      v_key.request_hash := v_hash;
      v_events := v_events || v_event;
      v_keys := v_keys || v_key;
      v_group_key[v_group[i + 1]] := cardinality(v_keys);
      v_group_result[v_group[i + 1]] := i + 1;
      v_read := q.credits_micros > 0;      -- the balance changed (an allowance charge leaves the account row alone)
      IF q.entitled AND q.amount_minor IS NULL THEN   -- the window metering.charge left to the batch
        v_w_account[v_w] := v_account_id;
        v_w_meter[v_w] := q.meter_id;
        v_w_start[v_w] := q.period_start;
        v_w_end[v_w] := q.period_end;
        v_w_used[v_w] := q.used_before + q.allowance_units;
        IF v_w_meter_def[v_w] IS NULL THEN      -- the group's first charge: its definitions, read once
          v_w_meter_def[v_w] := (SELECT m FROM metering.meters m WHERE m.id = q.meter_id);
          v_w_entitlement_def[v_w] := (SELECT en FROM billing.entitlements en
                                       WHERE en.plan_id = q.plan_id AND en.meter_id = q.meter_id);
        END IF;
      END IF;
    END IF;
    v_results := v_results || coalesce(v_result, (jsonb_build_object('index', i) || v_answer)::json);
    refused := refused + (v_answer IS NOT NULL)::integer;
    i := i + 1;
  END LOOP;
  -- The charged events and their keys, one INSERT each (a third of the cost a row of one INSERT per event).
  INSERT INTO metering.usage_events SELECT * FROM unnest(v_events);
  INSERT INTO metering.idempotency_keys SELECT * FROM unnest(v_keys);
  -- Each allowance window the batch charged, once, with its usage after the batch's last charge of it.
  INSERT INTO metering.allowance_usage AS u (account_id, meter_id, period_start, period_end, used)
  SELECT * FROM unnest(v_w_account, v_w_meter, v_w_start, v_w_end, v_w_used) w (account_id, meter_id, period_start, period_end, used)
  WHERE w.account_id IS NOT NULL
  ON CONFLICT (account_id, meter_id, period_start) DO UPDATE SET used = EXCLUDED.used;
  data := array_to_json(v_results);
  charged := i - replayed - refused;
END $$;

COMMENT ON FUNCTION api.consume_batch(p_api_key text, p_session_id uuid, p_events jsonb, OUT data json, OUT charged integer, OUT replayed integer, OUT refused integer) IS 'POST /v1/usage/events/batch: charge up to 1,000 usage events ([{idempotency_key, meter, quantity | input_tokens, output_tokens, account_id, metadata}]) in one transaction, each exactly as api.consume charges it (the same metering.quote and metering.charge; the events and their keys written with one INSERT each at the end), each exactly once per its key, with the accounts locked in id order first. Returns (data: [{index, status: charged | replayed | refused, event | sqlstate, message, detail}], a json array in the events'' order; charged, replayed, refused: how many of each, so that a caller relays data as it is when none was refused): a refused event (TL402, TL4B2 a budget does not cover it, TL403, TL404, TL42R key reused for another request, TL422) changes nothing and does not stop the others. Events are checked (read only) before they are charged rather than rolled back one by one, so a batch holds no writing subtransaction per event (more than 64 would slow every snapshot of the server). TL401 no principal, TL422 not an array of 1 to 1,000.';

REVOKE ALL ON FUNCTION api.consume_batch(p_api_key text, p_session_id uuid, p_events jsonb, OUT data json, OUT charged integer, OUT replayed integer, OUT refused integer) FROM PUBLIC;
GRANT ALL ON FUNCTION api.consume_batch(p_api_key text, p_session_id uuid, p_events jsonb, OUT data json, OUT charged integer, OUT replayed integer, OUT refused integer) TO pgtally_api;

CREATE FUNCTION api.create_account(p_plan text, p_credits_micros bigint DEFAULT 0, p_name text DEFAULT NULL::text, p_kind text DEFAULT 'person'::text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_account_id uuid := identity.new_account(p_plan, p_kind, p_name, p_credits_micros);
  v_key record;
BEGIN
  SELECT * INTO v_key FROM identity.issue_api_key(
    v_account_id, 'default',
    CASE WHEN p_kind = 'service' THEN '{service,usage:write,usage:read,accounts:write}'::text[]
         ELSE '{usage:write,usage:read,billing:read,billing:manage}' END);
  RETURN jsonb_build_object(
    'account_id', v_account_id, 'plan', p_plan, 'kind', p_kind, 'name', p_name,
    'api_key_id', v_key.id, 'api_key', v_key.api_key,
    'balance', jsonb_build_object('credits', util.credits(p_credits_micros)));
END $$;

COMMENT ON FUNCTION api.create_account(p_plan text, p_credits_micros bigint, p_name text, p_kind text) IS 'Create an account on an active plan with an API key (scopes usage:write, usage:read, billing:read, billing:manage; returned once, stored as a hash) and optional initial credits in micro-credits, granted through the ledger. Kind service gets a service key (may meter on behalf of any account, and provision accounts: scope accounts:write). Returns {account_id, plan, kind, name, api_key_id, api_key, balance: {credits}}. Errors: TL422 unknown plan or bad input. Operators only (not granted to pgtally_api).';

REVOKE ALL ON FUNCTION api.create_account(p_plan text, p_credits_micros bigint, p_name text, p_kind text) FROM PUBLIC;

CREATE FUNCTION api.create_api_key(p_session_id uuid, p_name text, p_scopes text[], p_expires_at timestamp with time zone DEFAULT NULL::timestamp with time zone, p_account_id uuid DEFAULT NULL::uuid) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  s identity.sessions := identity.key_account(p_session_id, p_account_id);
  v_key record;
  k identity.api_keys;
  v_allowed text[];
BEGIN
  p_scopes := identity.scope_set(p_scopes);             -- each scope once, for the checks and the log too
  IF p_name IS NULL OR length(btrim(p_name)) NOT BETWEEN 1 AND 100 THEN
    PERFORM util.fail('TL422', 'a key name of 1 to 100 characters is required');
  END IF;
  IF p_scopes IS NULL OR cardinality(p_scopes) = 0
     OR NOT p_scopes <@ '{usage:write,usage:read,billing:read,billing:manage}'::text[] THEN
    PERFORM util.fail('TL422', 'scopes are one or more of usage:write, usage:read, billing:read, billing:manage');
  END IF;
  -- A key holds at most what its maker's role allows (and is cut down on use if the role shrinks).
  SELECT array_agg(r.permission) INTO v_allowed FROM identity.memberships m
  JOIN identity.role_permissions r ON r.role = m.role WHERE m.account_id = s.account_id AND m.user_id = s.user_id;
  IF NOT p_scopes <@ coalesce(v_allowed, '{}') THEN
    PERFORM util.fail('TL403', 'your role on this account does not allow a key with these scopes',
                      jsonb_build_object('allowed', to_jsonb(v_allowed)));
  END IF;
  IF p_expires_at IS NOT NULL AND p_expires_at <= util.now() THEN
    PERFORM util.fail('TL422', 'expires_at must be in the future');
  END IF;
  SELECT * INTO v_key FROM identity.issue_api_key(s.account_id, btrim(p_name), p_scopes, p_expires_at);
  UPDATE identity.api_keys SET created_by = s.user_id WHERE id = v_key.id RETURNING * INTO k;
  PERFORM identity.log_event('api_key_created', s.user_id, s.account_id, s.id, NULL, NULL,
                             jsonb_build_object('api_key_id', k.id, 'scopes', to_jsonb(p_scopes)));
  RETURN identity.api_key_json(k) || jsonb_build_object('api_key', v_key.api_key);
END $$;

COMMENT ON FUNCTION api.create_api_key(p_session_id uuid, p_name text, p_scopes text[], p_expires_at timestamp with time zone, p_account_id uuid) IS 'POST /v1/api-keys: a new API key for the signed-in person''s account, or a team''s (p_account_id; permission keys:manage), returned once in api_key (only its hash is kept). Its scopes (usage:write, usage:read, billing:read, billing:manage) are at most what the person''s role allows. TL403 anonymous session, no keys:manage, or scopes beyond the role; TL422 bad name, scopes or expiry.';

REVOKE ALL ON FUNCTION api.create_api_key(p_session_id uuid, p_name text, p_scopes text[], p_expires_at timestamp with time zone, p_account_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.create_api_key(p_session_id uuid, p_name text, p_scopes text[], p_expires_at timestamp with time zone, p_account_id uuid) TO pgtally_api;

CREATE FUNCTION api.create_budget(p_api_key text, p_session_id uuid, p_scope text, p_subject uuid, p_limit text, p_window text, p_alerts integer[] DEFAULT '{}'::integer[], p_account_id uuid DEFAULT NULL::uuid) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  p record := identity.authenticate_principal(p_api_key, p_session_id, 'billing:manage', p_account_id);
BEGIN
  RETURN metering.set_budget(p.account_id, p_scope, p_subject, p_limit, p_window, coalesce(p_alerts, '{}'), p.user_id);
END $$;

COMMENT ON FUNCTION api.create_budget(p_api_key text, p_session_id uuid, p_scope text, p_subject uuid, p_limit text, p_window text, p_alerts integer[], p_account_id uuid) IS 'POST /v1/budgets: set a budget (metering.set_budget) on the caller''s account (p_account_id: a team the person belongs to). Principal: a session of an owner, admin or billing member, or an API key with billing:manage (TL403 otherwise). Returns metering.budget_json.';

REVOKE ALL ON FUNCTION api.create_budget(p_api_key text, p_session_id uuid, p_scope text, p_subject uuid, p_limit text, p_window text, p_alerts integer[], p_account_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.create_budget(p_api_key text, p_session_id uuid, p_scope text, p_subject uuid, p_limit text, p_window text, p_alerts integer[], p_account_id uuid) TO pgtally_api;

CREATE FUNCTION api.create_team(p_session_id uuid, p_name text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  u identity.users := identity.member_user(p_session_id);
  v_account_id uuid;
BEGIN
  IF p_name IS NULL OR length(btrim(p_name)) NOT BETWEEN 1 AND 100 THEN
    PERFORM util.fail('TL422', 'a team name of 1 to 100 characters is required', '{"field": "name"}');
  END IF;
  v_account_id := identity.new_account('free', 'team', btrim(p_name), 0);
  INSERT INTO identity.memberships (account_id, user_id, role, created_at) VALUES (v_account_id, u.id, 'owner', util.now());
  RETURN identity.account_json((SELECT a FROM identity.accounts a WHERE id = v_account_id), 'owner');
END $$;

COMMENT ON FUNCTION api.create_team(p_session_id uuid, p_name text) IS 'POST /v1/accounts: a team account (free plan, its own credits, usage, keys and Stripe customer) owned by the signed-in person. TL403 anonymous, TL422 bad name.';

REVOKE ALL ON FUNCTION api.create_team(p_session_id uuid, p_name text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.create_team(p_session_id uuid, p_name text) TO pgtally_api;

CREATE FUNCTION api.credit_lots(p_api_key text, p_session_id uuid, p_status text DEFAULT NULL::text, p_limit integer DEFAULT 50, p_cursor text DEFAULT NULL::text, p_account_id uuid DEFAULT NULL::uuid) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
  v_account_id uuid := identity.authenticate(p_api_key, p_session_id, 'usage:read', p_account_id);
  v_rows jsonb;
  v_last uuid;
  v_more boolean;
BEGIN
  IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 100 THEN
    PERFORM util.fail('TL422', 'limit must be between 1 and 100', '{"field": "limit"}');
  END IF;
  IF p_status IS NOT NULL AND p_status NOT IN ('pending', 'active', 'expired', 'canceled') THEN
    PERFORM util.fail('TL422', 'status is pending, active, expired or canceled', '{"field": "status"}');
  END IF;
  IF p_cursor IS NOT NULL AND p_cursor !~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
    PERFORM util.fail('TL422', 'cursor is not one this API returned', '{"field": "cursor"}');
  END IF;
  PERFORM ledger.refreshed_account(v_account_id);
  SELECT jsonb_agg(ledger.lot_json(l) ORDER BY l.id DESC), (array_agg(l.id ORDER BY l.id))[1] INTO v_rows, v_last
  FROM (SELECT * FROM ledger.credit_lots
        WHERE account_id = v_account_id AND (p_status IS NULL OR status = p_status)
          AND id < coalesce(p_cursor::uuid, 'ffffffff-ffff-ffff-ffff-ffffffffffff')
        ORDER BY id DESC LIMIT p_limit) l;
  v_more := v_last IS NOT NULL AND EXISTS (SELECT 1 FROM ledger.credit_lots
                                           WHERE account_id = v_account_id AND (p_status IS NULL OR status = p_status)
                                             AND id < v_last);
  RETURN jsonb_build_object('data', coalesce(v_rows, '[]'), 'has_more', v_more,
                            'next_cursor', CASE WHEN v_more THEN v_last::text END);
END $_$;

COMMENT ON FUNCTION api.credit_lots(p_api_key text, p_session_id uuid, p_status text, p_limit integer, p_cursor text, p_account_id uuid) IS 'GET /v1/credits/lots: the caller''s credit lots, newest first (ledger.lot_json), optionally of one status, p_limit (1-100) per page; pass next_cursor back as p_cursor. Returns {data, has_more, next_cursor}. Principal as api.balance. TL422 bad status, limit or cursor.';

REVOKE ALL ON FUNCTION api.credit_lots(p_api_key text, p_session_id uuid, p_status text, p_limit integer, p_cursor text, p_account_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.credit_lots(p_api_key text, p_session_id uuid, p_status text, p_limit integer, p_cursor text, p_account_id uuid) TO pgtally_api;

CREATE FUNCTION api.dashboard_page(p_session_id uuid, p_account_id uuid, p_public_url text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_billing jsonb;
  v_invoices jsonb := '[]';
BEGIN
  BEGIN
    v_billing := api.billing_account(NULL, p_session_id, p_account_id);
    v_invoices := api.invoices(NULL, p_session_id, 10, p_account_id) -> 'data';
  EXCEPTION WHEN SQLSTATE 'TL403' THEN
    v_billing := NULL;                    -- a team member whose role does not see billing
  END;
  RETURN jsonb_build_object('balance', api.balance(NULL, p_session_id, p_account_id),
                            'billing', v_billing, 'invoices', v_invoices,
                            'events', api.usage_events(NULL, p_session_id, NULL, 10, NULL, NULL, NULL, p_account_id) -> 'data',
                            'bundles', api.plans() -> 'bundles',
                            'referrals', api.referrals(NULL, p_session_id, p_public_url));
END $$;

COMMENT ON FUNCTION api.dashboard_page(p_session_id uuid, p_account_id uuid, p_public_url text) IS 'GET /dashboard: for the account the page acts on (p_account_id: the team the switcher chose, NULL: the person''s own): balance and allowances (api.balance), plan and billing state (api.billing_account; null for a role that may not see billing), the last 10 invoices with their PDFs (api.invoices; empty for that role), the last 10 usage events, the catalog''s bundles, and the person''s referral link (api.referrals, links on p_public_url). TL401 signed out, TL403 not a member.';

REVOKE ALL ON FUNCTION api.dashboard_page(p_session_id uuid, p_account_id uuid, p_public_url text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.dashboard_page(p_session_id uuid, p_account_id uuid, p_public_url text) TO pgtally_api;

CREATE FUNCTION api.delete_budget(p_api_key text, p_session_id uuid, p_budget_id uuid, p_account_id uuid DEFAULT NULL::uuid) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  p record := identity.authenticate_principal(p_api_key, p_session_id, 'billing:manage', p_account_id);
BEGIN
  RETURN metering.delete_budget(p.account_id, p_budget_id);
END $$;

COMMENT ON FUNCTION api.delete_budget(p_api_key text, p_session_id uuid, p_budget_id uuid, p_account_id uuid) IS 'DELETE /v1/budgets/{id}: delete one of the account''s budgets (metering.delete_budget). Principal as api.create_budget. TL404 unknown budget.';

REVOKE ALL ON FUNCTION api.delete_budget(p_api_key text, p_session_id uuid, p_budget_id uuid, p_account_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.delete_budget(p_api_key text, p_session_id uuid, p_budget_id uuid, p_account_id uuid) TO pgtally_api;

CREATE FUNCTION api.detach_month(p_month date) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
  v_start date := date_trunc('month', p_month)::date;
  v_from timestamptz := date_trunc('month', p_month)::timestamp AT TIME ZONE 'UTC';
  v_to timestamptz := (date_trunc('month', p_month) + interval '1 month')::timestamp AT TIME ZONE 'UTC';
  v_events text := util.partition_name('metering.usage_events', date_trunc('month', p_month)::date);
  v_entries text := util.partition_name('ledger.entries', date_trunc('month', p_month)::date);
  v_name text;
  v_event_count bigint;
  v_entry_count bigint;
BEGIN
  IF p_month IS NULL OR v_to > util.now() - metering.idempotency_window() THEN
    PERFORM util.fail('TL422', format('a month leaves once the idempotency window (%s) has passed its end: %s can leave from %s',
                                      metering.idempotency_window(), to_char(v_start, 'YYYY-MM'),
                                      util.iso(v_to + metering.idempotency_window())));
  END IF;
  FOREACH v_name IN ARRAY ARRAY[v_events, v_entries] LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_inherits WHERE inhrelid = to_regclass(v_name)) THEN
      PERFORM util.fail('TL404', format('%s is not an attached partition (never made, or detached already)', v_name));
    END IF;
  END LOOP;
  -- The analytics rollup must have read the month's events before they leave.
  IF EXISTS (SELECT 1 FROM metering.usage_events e, metering.rollup_state s
             WHERE e.created_at >= v_from AND e.created_at < v_to AND e.id > s.last_id) THEN
    PERFORM util.fail('TL409', format('the usage rollup has not read all of %s yet: run the worker (api.rollup_usage) first',
                                      to_char(v_start, 'YYYY-MM')));
  END IF;
  LOCK TABLE metering.usage_events, ledger.entries IN SHARE ROW EXCLUSIVE MODE;
  -- Months leave oldest first: the archived sums are where an account's running balance starts.
  IF EXISTS (SELECT 1 FROM ledger.entries WHERE created_at < v_from) THEN
    PERFORM util.fail('TL409', format('an earlier month than %s still has ledger entries: detach the oldest month first',
                                      to_char(v_start, 'YYYY-MM')));
  END IF;
  EXECUTE format('SELECT count(*) FROM %s', v_events) INTO v_event_count;
  -- The month's entries summed per account and system account, but for those written after an
  -- entry of a later month of the same account (a transaction that began before the month ended
  -- and charged after the next one had begun): those are kept one by one, with their ids, so
  -- that reporting.entry_balance_breaks counts them where they came. Only the few entries near
  -- the month's end are looked at (ids come from a sequence, in the order entries are written).
  EXECUTE format($f$
    WITH later AS (SELECT l.account_id, min(l.id) AS first_id FROM ledger.entries l
                   WHERE l.created_at >= $2 AND l.account_id IS NOT NULL AND l.id < (SELECT max(id) FROM %1$s)
                   GROUP BY l.account_id),
         one_by_one AS (SELECT m.id, m.account_id, m.amount_micros FROM %1$s m
                        JOIN later ON later.account_id = m.account_id AND m.id > later.first_id),
         kept AS (INSERT INTO ledger.archived_balances (month, account_id, system_account, amount_micros, entries, entry_id)
                  SELECT $1, account_id, NULL, amount_micros, 1, id FROM one_by_one RETURNING 1)
    INSERT INTO ledger.archived_balances (month, account_id, system_account, amount_micros, entries)
    SELECT $1, m.account_id, m.system_account, sum(m.amount_micros), count(*) FROM %1$s m
    WHERE m.id NOT IN (SELECT id FROM one_by_one) GROUP BY 2, 3$f$, v_entries)
    USING v_start, v_to;
  SELECT count(*) INTO v_entry_count FROM ledger.archived_balances WHERE month = v_start;
  DELETE FROM metering.idempotency_keys WHERE created_at < v_to;      -- past the window already
  EXECUTE format('ALTER TABLE metering.usage_events DETACH PARTITION %s', v_events);
  EXECUTE format('ALTER TABLE ledger.entries DETACH PARTITION %s', v_entries);
  RETURN jsonb_build_object('month', to_char(v_start, 'YYYY-MM'), 'usage_events', v_events, 'usage_event_count', v_event_count,
                            'entries', v_entries, 'archived_balances', v_entry_count);
END $_$;

COMMENT ON FUNCTION api.detach_month(p_month date) IS 'pgtally partitions detach: the month containing p_month leaves metering.usage_events and ledger.entries. Its two partitions become standalone tables (metering.usage_events_yYYYYmMM, ledger.entries_yYYYYmMM) to archive (pg_dump -t) and drop; what the month''s entries summed to per account and system account stays in ledger.archived_balances (an entry written after an entry of a later month of its account stays there by itself, with its id), so reporting.balance_mismatches, entry_balance_breaks and system_balances still balance. Only once the idempotency window has passed the month''s end (TL422 before), once the analytics rollup has read it (TL409), and oldest month first (TL409 while an earlier month has ledger entries). TL404 when the month is not an attached partition. Returns {month, usage_events, usage_event_count, entries, archived_balances}. Operators only.';

REVOKE ALL ON FUNCTION api.detach_month(p_month date) FROM PUBLIC;

CREATE FUNCTION api.device_authorize(p_client_id text, p_scope text, p_device_session_id uuid, p_ip text, p_user_agent text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
  v_limited jsonb := identity.throttled('device_authorize', p_ip);
  v_alphabet constant text := 'BCDFGHJKLMNPQRSTVWXZ';
  v_device_code text := util.random_token();
  v_user_code text;
  v_bytes bytea;
BEGIN
  IF v_limited IS NOT NULL THEN
    RETURN v_limited;
  END IF;
  IF p_client_id IS NULL OR p_client_id !~ '^[A-Za-z0-9_.:-]{1,100}$' THEN
    PERFORM util.fail('TL422', 'client_id: 1 to 100 letters, digits and ._:-', '{"field": "client_id"}');
  END IF;
  LOOP
    -- 8 characters from a 20-letter alphabet: 34.6 bits, enough for 10 minutes with guesses limited.
    v_bytes := uuid_send(gen_random_uuid());
    SELECT string_agg(substr(v_alphabet, get_byte(v_bytes, i) % 20 + 1, 1), '' ORDER BY i)
    INTO v_user_code FROM generate_series(0, 7) i;
    EXIT WHEN NOT EXISTS (SELECT 1 FROM identity.device_codes WHERE user_code = v_user_code AND status = 'pending');
  END LOOP;
  INSERT INTO identity.device_codes (device_code_hash, user_code, client_id, scope, ip, user_agent, device_session_id,
                                     created_at, expires_at)
  VALUES (util.token_hash(v_device_code), v_user_code, p_client_id, left(p_scope, 200), left(p_ip, 64),
          left(p_user_agent, 512), p_device_session_id, util.now(), util.now() + interval '10 minutes');
  PERFORM identity.log_event('device_code_requested', NULL, NULL, p_device_session_id, p_ip, p_user_agent,
                             jsonb_build_object('client_id', p_client_id));
  RETURN jsonb_build_object('device_code', v_device_code, 'user_code', left(v_user_code, 4) || '-' || right(v_user_code, 4),
                            'expires_in', 600, 'interval', 5);
END $_$;

COMMENT ON FUNCTION api.device_authorize(p_client_id text, p_scope text, p_device_session_id uuid, p_ip text, p_user_agent text) IS 'POST /oauth/device_authorization (RFC 8628 section 3.1-3.2): a device code (secret, stored hashed) and a user code (XXXX-XXXX) valid 10 minutes, polled every 5 seconds. p_device_session_id: the command line''s anonymous device session, merged into the user on approval. Rate limited per IP (identity.rate_limit_rules, TL429).';

REVOKE ALL ON FUNCTION api.device_authorize(p_client_id text, p_scope text, p_device_session_id uuid, p_ip text, p_user_agent text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.device_authorize(p_client_id text, p_scope text, p_device_session_id uuid, p_ip text, p_user_agent text) TO pgtally_api;

CREATE FUNCTION api.device_decide(p_session_id uuid, p_user_code text, p_approve boolean, p_ip text, p_user_agent text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  r record;
  s identity.sessions := identity.active_session(p_session_id);
BEGIN
  SELECT * INTO r FROM identity.pending_device_code(p_session_id, p_user_code, p_ip);
  IF r.error IS NOT NULL THEN
    RETURN r.error;
  END IF;
  UPDATE identity.device_codes
  SET status = CASE WHEN p_approve THEN 'approved' ELSE 'denied' END, user_id = s.user_id, decided_at = util.now()
  WHERE id = (r.d).id;
  PERFORM identity.log_event(CASE WHEN p_approve THEN 'device_code_approved' ELSE 'device_code_denied' END,
                             s.user_id, s.account_id, s.id, p_ip, p_user_agent,
                             jsonb_build_object('client_id', (r.d).client_id));
  IF p_approve AND (r.d).device_session_id IS NOT NULL THEN
    PERFORM identity.merge_device((r.d).device_session_id, s.account_id, p_ip, p_user_agent);
  END IF;
  RETURN jsonb_build_object('client_id', (r.d).client_id, 'approved', p_approve);
END $$;

COMMENT ON FUNCTION api.device_decide(p_session_id uuid, p_user_code text, p_approve boolean, p_ip text, p_user_agent text) IS '/device: approve or deny a pending user code, once (a second decision finds no pending code: TL404). On approval the command line''s anonymous device account is merged into the user, once.';

REVOKE ALL ON FUNCTION api.device_decide(p_session_id uuid, p_user_code text, p_approve boolean, p_ip text, p_user_agent text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.device_decide(p_session_id uuid, p_user_code text, p_approve boolean, p_ip text, p_user_agent text) TO pgtally_api;

CREATE FUNCTION api.device_lookup(p_session_id uuid, p_user_code text, p_ip text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  r record;
BEGIN
  SELECT * INTO r FROM identity.pending_device_code(p_session_id, p_user_code, p_ip);
  IF r.error IS NOT NULL THEN
    RETURN r.error;
  END IF;
  RETURN jsonb_build_object('user_code', left((r.d).user_code, 4) || '-' || right((r.d).user_code, 4),
                            'client_id', (r.d).client_id, 'scope', (r.d).scope, 'ip', (r.d).ip,
                            'user_agent', (r.d).user_agent, 'created_at', util.iso((r.d).created_at),
                            'expires_at', util.iso((r.d).expires_at));
END $$;

COMMENT ON FUNCTION api.device_lookup(p_session_id uuid, p_user_code text, p_ip text) IS '/device: which client asks with this user code (client_id, scope, where from), for the signed-in user to approve or deny. Errors as identity.pending_device_code.';

REVOKE ALL ON FUNCTION api.device_lookup(p_session_id uuid, p_user_code text, p_ip text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.device_lookup(p_session_id uuid, p_user_code text, p_ip text) TO pgtally_api;

CREATE FUNCTION api.device_token(p_device_code text, p_client_id text, p_ip text, p_user_agent text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  d identity.device_codes;
  u identity.users;
  v_tokens jsonb;
BEGIN
  -- Polls of one code queue here: exactly one of any number of concurrent polls gets the tokens.
  SELECT * INTO d FROM identity.device_codes WHERE device_code_hash = util.token_hash(p_device_code) FOR UPDATE;
  IF NOT FOUND OR d.client_id IS DISTINCT FROM p_client_id THEN
    RETURN identity.oauth_error('invalid_grant', 'unknown device code, or issued to another client');
  END IF;
  IF d.issued_at IS NOT NULL THEN
    RETURN identity.oauth_error('invalid_grant', 'this device code was already exchanged for tokens');
  END IF;
  IF d.expires_at <= util.now() THEN
    RETURN identity.oauth_error('expired_token', 'the device code has expired: start again');
  END IF;
  IF d.last_polled_at > util.now() - make_interval(secs => d.interval_seconds) THEN
    UPDATE identity.device_codes SET interval_seconds = least(interval_seconds + 5, 120), last_polled_at = util.now()
    WHERE id = d.id;
    RETURN identity.oauth_error('slow_down', format('poll at most every %s seconds', least(d.interval_seconds + 5, 120)));
  END IF;
  UPDATE identity.device_codes SET last_polled_at = util.now() WHERE id = d.id;
  IF d.status = 'pending' THEN
    RETURN identity.oauth_error('authorization_pending', 'waiting for the user to approve the code');
  ELSIF d.status = 'denied' THEN
    RETURN identity.oauth_error('access_denied', 'the user denied the request');
  END IF;
  UPDATE identity.device_codes SET issued_at = util.now() WHERE id = d.id;
  SELECT * INTO u FROM identity.users WHERE id = d.user_id;
  v_tokens := identity.start_session(u.account_id, u.id, p_ip, p_user_agent, 'device_code');
  PERFORM identity.log_event('device_code_issued', u.id, u.account_id, (v_tokens ->> 'session_id')::uuid, p_ip, p_user_agent,
                             jsonb_build_object('client_id', d.client_id));
  RETURN v_tokens;
END $$;

COMMENT ON FUNCTION api.device_token(p_device_code text, p_client_id text, p_ip text, p_user_agent text) IS 'POST /oauth/token with grant_type urn:ietf:params:oauth:grant-type:device_code (RFC 8628 section 3.4-3.5): the tokens of a new session once the user approved, exactly once; otherwise {"oauth_error": {error}} with authorization_pending, slow_down (polled faster than the interval, which grows by 5 s), access_denied, expired_token or invalid_grant.';

REVOKE ALL ON FUNCTION api.device_token(p_device_code text, p_client_id text, p_ip text, p_user_agent text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.device_token(p_device_code text, p_client_id text, p_ip text, p_user_agent text) TO pgtally_api;

CREATE FUNCTION api.duplicate_subscription(p_subscription text) RETURNS jsonb
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  d record;
BEGIN
  SELECT * INTO d FROM billing.duplicate_subscriptions WHERE stripe_subscription_id = p_subscription;
  IF NOT FOUND OR d.canceled_at IS NOT NULL THEN
    RETURN NULL;
  END IF;
  RETURN jsonb_build_object(
    'subscription', d.stripe_subscription_id, 'account_id', d.account_id, 'kept', d.kept_subscription_id,
    -- Its invoice.paid has not arrived yet (or not all its payments): refund once they are known.
    'waiting', NOT EXISTS (SELECT 1 FROM billing.invoices i WHERE i.stripe_subscription_id = p_subscription)
               OR (SELECT coalesce(sum(i.amount_paid_minor), 0) FROM billing.invoices i
                   WHERE i.stripe_subscription_id = p_subscription)
                  > (SELECT coalesce(sum(ip.amount_minor), 0) FROM billing.invoice_payments ip
                     JOIN billing.invoices i ON i.stripe_invoice_id = ip.stripe_invoice_id
                     WHERE i.stripe_subscription_id = p_subscription),
    'payments', coalesce((SELECT jsonb_agg(jsonb_build_object(
                   'invoice_payment', ip.stripe_invoice_payment_id, 'payment_intent', ip.stripe_payment_intent_id,
                   'charge', ip.stripe_charge_id, 'refund', ip.amount_minor - ip.refunded_minor)
                   ORDER BY ip.stripe_invoice_payment_id)
                 FROM billing.invoice_payments ip JOIN billing.invoices i ON i.stripe_invoice_id = ip.stripe_invoice_id
                 WHERE i.stripe_subscription_id = p_subscription AND ip.amount_minor > ip.refunded_minor), '[]'));
END $$;

COMMENT ON FUNCTION api.duplicate_subscription(p_subscription text) IS 'pgtally worker, task cancel_duplicate_subscription: a duplicate subscription still to cancel and refund: {subscription, account_id, kept, waiting (its paid invoices are not all known yet), payments: [{invoice_payment, payment_intent, charge, refund (minor units left to refund)}]}; NULL when it is not one or is done.';

REVOKE ALL ON FUNCTION api.duplicate_subscription(p_subscription text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.duplicate_subscription(p_subscription text) TO pgtally_api;

CREATE FUNCTION api.duplicate_subscription_settled(p_subscription text, p_refunded_minor bigint) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  UPDATE billing.duplicate_subscriptions
  SET canceled_at = coalesce(canceled_at, util.now()), refunded_minor = refunded_minor + greatest(p_refunded_minor, 0)
  WHERE stripe_subscription_id = p_subscription;
END $$;

COMMENT ON FUNCTION api.duplicate_subscription_settled(p_subscription text, p_refunded_minor bigint) IS 'pgtally worker: the duplicate subscription was canceled at Stripe and p_refunded_minor (minor units) refunded; its customer.subscription.deleted and charge.refunded events follow.';

REVOKE ALL ON FUNCTION api.duplicate_subscription_settled(p_subscription text, p_refunded_minor bigint) FROM PUBLIC;
GRANT ALL ON FUNCTION api.duplicate_subscription_settled(p_subscription text, p_refunded_minor bigint) TO pgtally_api;

CREATE FUNCTION api.expire_holds() RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_account uuid;
  v_count integer := 0;
BEGIN
  FOR v_account IN SELECT DISTINCT account_id FROM metering.holds WHERE status = 'open' AND expires_at <= util.now() LOOP
    PERFORM 1 FROM identity.accounts WHERE id = v_account FOR NO KEY UPDATE;
    v_count := v_count + metering.expire_holds(v_account);
  END LOOP;
  RETURN v_count;
END $$;

COMMENT ON FUNCTION api.expire_holds() IS 'pgtally worker (housekeeping): release every expired open hold, each exactly once (accounts locked one at a time, as a charge would).';

REVOKE ALL ON FUNCTION api.expire_holds() FROM PUBLIC;
GRANT ALL ON FUNCTION api.expire_holds() TO pgtally_api;

CREATE FUNCTION api.grant_credits(p_account_id uuid, p_amount_micros bigint, p_idempotency_key text, p_memo text DEFAULT NULL::text) RETURNS TABLE(replayed boolean, body jsonb)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  IF p_amount_micros IS NULL OR p_amount_micros <= 0 THEN
    PERFORM util.fail('TL422', 'a grant is a positive amount of credits');
  END IF;
  RETURN QUERY SELECT * FROM ledger.operator_transfer(p_account_id, 'grants', 'grant', p_amount_micros,
                                                      p_idempotency_key, p_memo);
END $$;

COMMENT ON FUNCTION api.grant_credits(p_account_id uuid, p_amount_micros bigint, p_idempotency_key text, p_memo text) IS 'pgtally credits grant: grant credits (micro-credits) to an account from the grants system account, once per idempotency key (ledger.operator_transfer). TL404 unknown account, TL42R key reused for another amount, TL422 bad amount or key. Operators only (not granted to pgtally_api).';

REVOKE ALL ON FUNCTION api.grant_credits(p_account_id uuid, p_amount_micros bigint, p_idempotency_key text, p_memo text) FROM PUBLIC;

CREATE FUNCTION api.handoff_code(p_session_id uuid) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  s identity.sessions := identity.active_session(p_session_id);
  v_code text := util.random_token();
BEGIN
  IF NOT EXISTS (SELECT 1 FROM identity.accounts WHERE id = s.account_id AND kind = 'device' AND merged_into IS NULL) THEN
    PERFORM util.fail('TL403', 'only an anonymous install hands its sign-in to a browser (POST /v1/identify first)');
  END IF;
  INSERT INTO identity.handoff_codes (code_hash, device_session_id, created_at, expires_at)
  VALUES (util.token_hash(v_code), s.id, util.now(), util.now() + interval '10 minutes');
  RETURN jsonb_build_object('code', v_code, 'expires_in', 600);
END $$;

COMMENT ON FUNCTION api.handoff_code(p_session_id uuid) IS 'POST /v1/identify/handoff: a single-use code (random, stored as its SHA-256, 10 minutes: expires_in 600 seconds) that hands an anonymous install''s session to a browser: the install opens /login?handoff=CODE (or /signup, /auth/*/start), and the person''s sign-in there merges the install (identity.merge_device), which then keeps its person (api.identify). Replaces access tokens in URLs. TL401 ended session; TL403 for a session that is not an unmerged anonymous install''s. Issue 25.';

REVOKE ALL ON FUNCTION api.handoff_code(p_session_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.handoff_code(p_session_id uuid) TO pgtally_api;

CREATE FUNCTION api.hold(p_api_key text, p_session_id uuid, p_idempotency_key text, p_meter text, p_quantity bigint DEFAULT NULL::bigint, p_input_tokens bigint DEFAULT NULL::bigint, p_output_tokens bigint DEFAULT NULL::bigint, p_expires_in integer DEFAULT 900, p_account_id uuid DEFAULT NULL::uuid) RETURNS TABLE(replayed boolean, body jsonb)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  a identity.accounts;
  v_hash bytea := metering.request_hash(p_meter, p_quantity, p_input_tokens, p_output_tokens);
  h metering.holds;
  q record;
  v_p record;
  v_budgets record;
  v_budget_ids uuid[];                 -- the budgets that count the hold (NULL: none)
BEGIN
  IF p_idempotency_key IS NULL OR length(p_idempotency_key) NOT BETWEEN 1 AND 255 THEN
    PERFORM util.fail('TL422', 'an idempotency key of 1 to 255 characters is required');
  END IF;
  IF p_expires_in IS NULL OR p_expires_in NOT BETWEEN 1 AND 86400 THEN
    PERFORM util.fail('TL422', 'expires_in is 1 to 86,400 seconds', '{"field": "expires_in"}');
  END IF;
  v_p := identity.authenticate_principal(p_api_key, p_session_id, 'usage:write', p_account_id);
  a := metering.lock_account(v_p.account_id);
  SELECT * INTO h FROM metering.holds WHERE account_id = a.id AND idempotency_key = p_idempotency_key;
  IF FOUND THEN                         -- a replay, or TL42R for another request
    PERFORM util.idempotency_check(h.request_hash, v_hash, 'hold', jsonb_build_object('hold_id', h.id));
    replayed := true;
    body := metering.hold_json(h);
    RETURN NEXT;
    RETURN;
  END IF;
  SELECT * INTO q FROM metering.quote(a, p_meter, p_quantity, p_input_tokens, p_output_tokens);
  IF NOT q.allowed THEN
    PERFORM util.fail('TL402', q.refusal ->> 'message', q.refusal -> 'detail');
  END IF;
  IF a.has_budgets AND q.credits_micros > 0 THEN     -- a hold's credits count as spent until it is settled
    v_budgets := metering.budgets_apply(a, v_p.api_key_id, v_p.user_id, q.credits_micros);
    IF v_budgets.refusal IS NOT NULL THEN
      PERFORM util.fail('TL4B2', v_budgets.refusal ->> 'message', v_budgets.refusal -> 'detail');
    END IF;
    v_budget_ids := v_budgets.budget_ids;
  END IF;
  INSERT INTO metering.holds (account_id, idempotency_key, request_hash, meter_id, quantity, input_tokens,
                              output_tokens, allowance_units, credits_micros, period_start, created_at, expires_at,
                              api_key_id, user_id, budget_ids)
  VALUES (a.id, p_idempotency_key, v_hash, q.meter_id, q.quantity, q.input_tokens, q.output_tokens,
          CASE WHEN q.entitled THEN q.allowance_units ELSE 0 END, q.credits_micros, q.period_start,
          util.now(), util.now() + make_interval(secs => p_expires_in), v_p.api_key_id, v_p.user_id,
          v_budget_ids)
  RETURNING * INTO h;
  IF q.entitled THEN
    INSERT INTO metering.allowance_usage AS u (account_id, meter_id, period_start, period_end, used)
    VALUES (a.id, q.meter_id, q.period_start, q.period_end, q.used_before + q.allowance_units)
    ON CONFLICT (account_id, meter_id, period_start) DO UPDATE SET used = EXCLUDED.used;
  END IF;
  UPDATE identity.accounts SET held_micros = held_micros + q.credits_micros WHERE id = a.id;
  replayed := false;
  body := metering.hold_json(h);
  RETURN NEXT;
END $$;

COMMENT ON FUNCTION api.hold(p_api_key text, p_session_id uuid, p_idempotency_key text, p_meter text, p_quantity bigint, p_input_tokens bigint, p_output_tokens bigint, p_expires_in integer, p_account_id uuid) IS 'POST /v1/holds: reserve the allowance units and credits this request would cost (metering.quote, exactly as api.consume would charge them) for p_expires_in seconds (1-86,400), once per idempotency key (util.idempotency_check: a retry returns the hold, replayed = true; another request under the key is TL42R). TL402 when they are not there, TL4B2 when a budget does not cover the credits (they count as spent in its window until the hold is settled): nothing reserved. Principal as api.consume. Returns (replayed, metering.hold_json).';

REVOKE ALL ON FUNCTION api.hold(p_api_key text, p_session_id uuid, p_idempotency_key text, p_meter text, p_quantity bigint, p_input_tokens bigint, p_output_tokens bigint, p_expires_in integer, p_account_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.hold(p_api_key text, p_session_id uuid, p_idempotency_key text, p_meter text, p_quantity bigint, p_input_tokens bigint, p_output_tokens bigint, p_expires_in integer, p_account_id uuid) TO pgtally_api;

CREATE FUNCTION api.holds(p_api_key text, p_session_id uuid, p_account_id uuid DEFAULT NULL::uuid) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_account_id uuid := identity.authenticate(p_api_key, p_session_id, 'usage:read', p_account_id);
BEGIN
  RETURN jsonb_build_object('data', coalesce((
    SELECT jsonb_agg(metering.hold_json(h) ORDER BY h.id DESC) FROM metering.holds h
    WHERE h.account_id = v_account_id AND h.status = 'open' AND h.expires_at > util.now()), '[]'));
END $$;

COMMENT ON FUNCTION api.holds(p_api_key text, p_session_id uuid, p_account_id uuid) IS 'GET /v1/holds: the open holds of the caller''s account, or of p_account_id (a service key, or a team member with usage:read), newest first.';

REVOKE ALL ON FUNCTION api.holds(p_api_key text, p_session_id uuid, p_account_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.holds(p_api_key text, p_session_id uuid, p_account_id uuid) TO pgtally_api;

CREATE FUNCTION api.housekeeping() RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_buckets integer;
BEGIN
  DELETE FROM identity.rate_limits WHERE coalesce(hits[cardinality(hits)], '-infinity') < util.now() - interval '2 days';
  GET DIAGNOSTICS v_buckets = ROW_COUNT;
  RETURN jsonb_build_object('rate_limit_buckets_deleted', v_buckets, 'holds_expired', api.expire_holds(),
                            'credit_accounts_refreshed', api.refresh_due_credits());
END $$;

COMMENT ON FUNCTION api.housekeeping() IS 'pgtally worker, every few minutes: delete rate-limit buckets whose newest attempt is older than two days (the longest window is one day), release expired holds (api.expire_holds), and release and expire due credit lots (api.refresh_due_credits). The worker then calls api.maintain_storage in a transaction of its own.';

REVOKE ALL ON FUNCTION api.housekeeping() FROM PUBLIC;
GRANT ALL ON FUNCTION api.housekeeping() TO pgtally_api;

CREATE FUNCTION api.identify(p_fingerprint text, p_install_id text, p_meter text, p_ip text, p_user_agent text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
  v_install bytea;
  v_limited jsonb;
  a identity.accounts;
  u identity.users;
  v_returning boolean := false;
  v_account_id uuid;
  v_tokens jsonb;
  v_can_use boolean;
  v_allowance jsonb;
  v_allowances jsonb;
  v_resets_at timestamptz;
  q record;
BEGIN
  IF p_fingerprint IS NOT NULL AND length(p_fingerprint) NOT BETWEEN 1 AND 256 THEN
    PERFORM util.fail('TL422', 'a fingerprint has 1 to 256 characters', '{"field": "fingerprint"}');
  END IF;
  IF p_install_id IS NOT NULL AND (p_install_id !~ '^[A-Za-z0-9_-]+$' OR length(p_install_id) NOT BETWEEN 22 AND 256) THEN
    PERFORM util.fail('TL422', 'an install id is a random string of 22 to 256 URL-safe characters (at least 128 bits), made once per install',
                      '{"field": "install_id"}');
  END IF;
  IF p_fingerprint IS NULL AND p_install_id IS NULL THEN
    PERFORM util.fail('TL422', 'send an install_id (and a fingerprint, a hint for abuse limits)', '{"field": "install_id"}');
  END IF;
  v_install := util.token_hash(p_install_id);
  IF p_install_id IS NOT NULL THEN
    SELECT * INTO a FROM identity.accounts WHERE device_install_hash = v_install FOR NO KEY UPDATE;
    IF FOUND AND a.merged_into IS NOT NULL THEN
      -- The install was merged into a person's account (sign-up, login, provider sign-in or the
      -- device grant with its token): it stays linked, and answers for the person.
      SELECT * INTO u FROM identity.users WHERE account_id = a.merged_into;
      IF u.id IS NULL THEN
        UPDATE identity.accounts SET device_install_hash = NULL WHERE id = a.id;   -- no person to answer for
        a := NULL;
      ELSE
        SELECT * INTO a FROM identity.accounts WHERE id = u.account_id;
      END IF;
    END IF;
    v_returning := a.id IS NOT NULL;
  END IF;
  IF v_returning THEN
    v_limited := identity.throttled('identify_install', p_ip, 'install', encode(v_install, 'hex'));
  ELSE
    -- New device accounts: a few a day per fingerprint (identity.rate_limit_rules).
    v_limited := identity.throttled('identify', p_ip, 'fingerprint', p_fingerprint);
  END IF;
  IF v_limited IS NOT NULL THEN
    RETURN v_limited;
  END IF;
  IF NOT v_returning THEN
    v_account_id := identity.new_account('anonymous', 'device', NULL, 0, NULL, p_fingerprint);
    UPDATE identity.accounts SET device_install_hash = CASE WHEN p_install_id IS NOT NULL THEN v_install END
    WHERE id = v_account_id RETURNING * INTO a;
  END IF;
  IF u.id IS NOT NULL THEN
    v_tokens := identity.start_session(a.id, u.id, p_ip, p_user_agent, 'device');
    -- The install id alone opens it: it meters and reads, and manages nothing (keys, teams, billing).
    UPDATE identity.sessions SET install_hash = v_install, scopes = '{usage:read,usage:write,billing:read}'
    WHERE id = (v_tokens ->> 'session_id')::uuid;
  ELSE
    v_tokens := identity.start_session(a.id, NULL, p_ip, p_user_agent, 'device');
  END IF;
  PERFORM identity.log_event('device_identified', u.id, a.id, (v_tokens ->> 'session_id')::uuid, p_ip, p_user_agent,
    jsonb_build_object('returning_install', v_returning, 'linked_to_user', u.id IS NOT NULL,
                       'fingerprint_seen_before',
                       EXISTS (SELECT 1 FROM identity.accounts WHERE device_fingerprint = p_fingerprint AND id <> a.id)));
  IF p_meter IS NOT NULL THEN
    SELECT * INTO q FROM metering.quote(a, p_meter,
      CASE WHEN (SELECT pricing FROM metering.meters WHERE id = p_meter) = 'tokens' THEN NULL ELSE 1 END,
      CASE WHEN (SELECT pricing FROM metering.meters WHERE id = p_meter) = 'tokens' THEN 1 END, NULL);
    v_can_use := q.allowed;
    v_resets_at := q.period_end;
  END IF;
  v_allowances := metering.allowances_json(a);
  SELECT x INTO v_allowance FROM jsonb_array_elements(v_allowances) x WHERE x ->> 'meter' = p_meter;
  RETURN v_tokens || jsonb_build_object(
    'account_id', a.id, 'plan', identity.effective_plan(a), 'credits', util.credits(a.credit_balance_micros),
    'returning', v_returning, 'allowances', v_allowances,
    'meter', p_meter, 'can_use', v_can_use, 'allowance', v_allowance, 'resets_at', util.iso(v_resets_at));
END $_$;

COMMENT ON FUNCTION api.identify(p_fingerprint text, p_install_id text, p_meter text, p_ip text, p_user_agent text) IS 'POST /v1/identify: an anonymous device account on the anonymous plan (browser extension, CLI install) and a new session for it. With an install id (a client-generated secret of at least 128 bits, stored as its SHA-256) the same install gets the same account every time; without one every call makes a new account. Installs keep their person (issue 25): once the install''s device account was merged into a person''s account (identity.merge_device: sign-up, login, Google/GitHub/SSO sign-in or the device grant with its token), the install is linked (the merged device account keeps device_install_hash) and identify answers for the person''s account (plan, credits, can_use, allowances) with a session of the person (method device, identity.sessions.install_hash set, scopes usage:read, usage:write, billing:read only: the install id alone never manages keys, teams or billing), never a fresh anonymous quota; until the person signs out of that install (POST /v1/auth/logout with such a session) or unlinks it (DELETE /v1/me/sessions/{id} of such a session, logout everywhere, a password reset, refresh-token reuse): revoking any session of the install clears the link (identity.unlink_install_on_revoke), and the next identify starts a fresh device account. The fingerprint is a hint for lookups and abuse limits, never a credential. Limits (identity.rate_limit_rules): new accounts per fingerprint and per IP; returning installs per install and per IP (TL429). With p_meter, also whether one more use is allowed now (can_use: a unit, or a one-token call), that meter''s allowance and its reset. Returns identity.tokens plus {account_id, plan, credits, returning, allowances, meter, can_use, allowance, resets_at}. TL422 bad input or unknown meter.';

REVOKE ALL ON FUNCTION api.identify(p_fingerprint text, p_install_id text, p_meter text, p_ip text, p_user_agent text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.identify(p_fingerprint text, p_install_id text, p_meter text, p_ip text, p_user_agent text) TO pgtally_api;

CREATE FUNCTION api.invitations(p_session_id uuid, p_account_id uuid) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_account_id uuid := identity.authenticate(NULL, p_session_id, 'members:read', p_account_id);
BEGIN
  RETURN jsonb_build_object('data', coalesce((
    SELECT jsonb_agg(identity.invitation_json(i) ORDER BY i.created_at DESC)
    FROM identity.invitations i WHERE i.account_id = v_account_id AND i.expires_at > util.now()), '[]'));
END $$;

COMMENT ON FUNCTION api.invitations(p_session_id uuid, p_account_id uuid) IS 'GET /v1/accounts/{id}/invitations: the pending invitations (members:read).';

REVOKE ALL ON FUNCTION api.invitations(p_session_id uuid, p_account_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.invitations(p_session_id uuid, p_account_id uuid) TO pgtally_api;

CREATE FUNCTION api.invite(p_session_id uuid, p_account_id uuid, p_email text, p_role text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_actor identity.users := identity.member_user(p_session_id);
  v_account_id uuid := identity.authenticate(NULL, p_session_id, 'members:manage', p_account_id);
  v_email text := identity.normalize_email(p_email);
  v_token text := encode(uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid()), 'hex');
  i identity.invitations;
BEGIN
  IF p_role IS NULL OR p_role NOT IN ('owner', 'admin', 'member', 'billing', 'viewer') THEN
    PERFORM util.fail('TL422', 'a role is owner, admin, member, billing or viewer', '{"field": "role"}');
  END IF;
  IF NOT identity.may_invite(v_actor.id, v_account_id, p_role) THEN
    PERFORM util.fail('TL403', 'only an owner invites owners');
  END IF;
  IF (SELECT kind FROM identity.accounts WHERE id = v_account_id) <> 'team' THEN
    PERFORM util.fail('TL40C', 'invite people to a team account (POST /v1/accounts makes one)');
  END IF;
  IF EXISTS (SELECT 1 FROM identity.memberships m JOIN identity.users u ON u.id = m.user_id
             WHERE m.account_id = v_account_id AND u.email_normalized = v_email) THEN
    PERFORM util.fail('TL40C', format('%s is a member already', v_email));
  END IF;
  -- One pending invitation per address: inviting again sends a new link (the old one stops).
  INSERT INTO identity.invitations AS x (account_id, email_normalized, role, token_hash, invited_by, created_at, expires_at)
  VALUES (v_account_id, v_email, p_role, util.token_hash(v_token), v_actor.id, util.now(), util.now() + identity.link_lifetime('invitation')::interval)
  ON CONFLICT (account_id, email_normalized) DO UPDATE SET
    role = EXCLUDED.role, token_hash = EXCLUDED.token_hash, invited_by = EXCLUDED.invited_by,
    expires_at = EXCLUDED.expires_at, sent_count = x.sent_count + 1
  RETURNING * INTO i;
  INSERT INTO outbox.messages (kind, recipient, payload, created_at, next_attempt_at)
  VALUES ('invitation', v_email,
          jsonb_build_object('token', v_token, 'team', (SELECT name FROM identity.accounts WHERE id = v_account_id),
                             'inviter', v_actor.email, 'role', p_role, 'email', v_email,
                             'valid_for', identity.link_lifetime('invitation')),
          util.now(), util.now());
  RETURN identity.invitation_json(i);
END $$;

COMMENT ON FUNCTION api.invite(p_session_id uuid, p_account_id uuid, p_email text, p_role text) IS 'POST /v1/accounts/{id}/invitations (and resend): invite an address to a team with a role (members:manage; owners only for owner), valid 7 days; emails a single-use link. Inviting the same address again replaces the link. TL40C a member already or not a team, TL403, TL422.';

REVOKE ALL ON FUNCTION api.invite(p_session_id uuid, p_account_id uuid, p_email text, p_role text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.invite(p_session_id uuid, p_account_id uuid, p_email text, p_role text) TO pgtally_api;

CREATE FUNCTION api.invoices(p_api_key text, p_session_id uuid, p_limit integer DEFAULT 24, p_account_id uuid DEFAULT NULL::uuid) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_account_id uuid := identity.authenticate(p_api_key, p_session_id, 'billing:read', p_account_id);
BEGIN
  IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 100 THEN
    PERFORM util.fail('TL422', 'limit must be between 1 and 100', '{"field": "limit"}');
  END IF;
  RETURN jsonb_build_object('data', coalesce((
    SELECT jsonb_agg(x.invoice ORDER BY x.created_at DESC, x.id DESC)
    FROM (SELECT i.stripe_invoice_id AS id, i.created_at, jsonb_build_object(
             'id', i.stripe_invoice_id, 'object', 'invoice', 'kind', 'subscription', 'number', i.number, 'status', i.status,
             'amount_paid', i.amount_paid_minor, 'tax', i.tax_minor, 'refunded', i.refunded_minor, 'currency', i.currency,
             'plan', i.plan_id, 'description', NULL, 'period_start', util.iso(i.period_start), 'period_end', util.iso(i.period_end),
             'created_at', util.iso(i.created_at), 'paid_at', util.iso(i.paid_at),
             'hosted_invoice_url', i.hosted_invoice_url, 'invoice_pdf', i.invoice_pdf) AS invoice
          FROM billing.invoices i WHERE i.account_id = v_account_id
          UNION ALL
          SELECT v.stripe_invoice_id, v.created_at, jsonb_build_object(
             'id', v.stripe_invoice_id, 'object', 'invoice', 'kind', 'purchase', 'number', v.number,
             'status', CASE WHEN p.refunded_minor >= v.amount_paid_minor AND v.amount_paid_minor > 0 THEN 'refunded' ELSE v.status END,
             'amount_paid', v.amount_paid_minor, 'tax', v.tax_minor, 'refunded', coalesce(p.refunded_minor, 0),
             'currency', v.currency, 'plan', NULL, 'description', v.description, 'period_start', NULL, 'period_end', NULL,
             'created_at', util.iso(v.created_at), 'paid_at', util.iso(v.paid_at),
             'hosted_invoice_url', v.hosted_invoice_url, 'invoice_pdf', v.invoice_pdf)
          FROM billing.payment_invoices v
          LEFT JOIN billing.payments p ON p.stripe_payment_intent_id = v.stripe_payment_intent_id
          WHERE v.account_id = v_account_id
          ORDER BY 2 DESC, 1 DESC LIMIT p_limit) x), '[]'));
END $$;

COMMENT ON FUNCTION api.invoices(p_api_key text, p_session_id uuid, p_limit integer, p_account_id uuid) IS 'GET /v1/billing/invoices (permission billing:read; p_account_id: a team): every invoice of the account, newest first (at most p_limit, 1-100): subscription invoices (kind subscription) and the invoices of one-time purchases (kind purchase, refunded from their payment): {id, kind, number, status (paid, open, refunded), amount_paid, tax, refunded (minor units), currency, plan, description, period_start, period_end, created_at, paid_at, hosted_invoice_url, invoice_pdf}.';

REVOKE ALL ON FUNCTION api.invoices(p_api_key text, p_session_id uuid, p_limit integer, p_account_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.invoices(p_api_key text, p_session_id uuid, p_limit integer, p_account_id uuid) TO pgtally_api;

CREATE FUNCTION api.jwt_keys() RETURNS TABLE(kid text, secret bytea)
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
  SELECT kid, secret FROM identity.jwt_keys ORDER BY created_at DESC, kid DESC
$$;

COMMENT ON FUNCTION api.jwt_keys() IS 'The HS256 keys for access tokens, newest (the signing key) first; read by the server at startup.';

REVOKE ALL ON FUNCTION api.jwt_keys() FROM PUBLIC;
GRANT ALL ON FUNCTION api.jwt_keys() TO pgtally_api;

CREATE FUNCTION api.ledger(p_api_key text, p_session_id uuid, p_cursor text DEFAULT NULL::text, p_limit integer DEFAULT 20, p_account_id uuid DEFAULT NULL::uuid) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
  v_account_id uuid := identity.authenticate(p_api_key, p_session_id, 'usage:read', p_account_id);
  v_before bigint;
  v_rows jsonb;
  v_last bigint;
  v_more boolean;
BEGIN
  IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 100 THEN
    PERFORM util.fail('TL422', 'limit must be between 1 and 100');
  END IF;
  IF p_cursor IS NOT NULL AND p_cursor !~ '^[0-9]{1,18}$' THEN
    PERFORM util.fail('TL422', 'cursor is not one this API returned');
  END IF;
  v_before := coalesce(p_cursor::bigint, 9223372036854775807);
  SELECT count(*) > p_limit INTO v_more
  FROM (SELECT 1 FROM ledger.entries e
        WHERE e.account_id = v_account_id AND e.id < v_before
        ORDER BY e.id DESC LIMIT p_limit + 1) s;
  SELECT jsonb_agg(ledger.entry_json(t, e.amount_micros, e.balance_after_micros, e.created_at) ORDER BY e.id DESC),
         min(e.id)
  INTO v_rows, v_last
  FROM (SELECT * FROM ledger.entries e
        WHERE e.account_id = v_account_id AND e.id < v_before
        ORDER BY e.id DESC LIMIT p_limit) e
  JOIN ledger.transfers t ON t.id = e.transfer_id;
  RETURN jsonb_build_object('data', coalesce(v_rows, '[]'), 'has_more', v_more,
                            'next_cursor', CASE WHEN v_more THEN v_last::text END);
END $_$;

COMMENT ON FUNCTION api.ledger(p_api_key text, p_session_id uuid, p_cursor text, p_limit integer, p_account_id uuid) IS 'GET /v1/ledger: the caller''s ledger entries, newest first, p_limit (1-100) per page; pass next_cursor back as p_cursor for the next page. Returns {data, has_more, next_cursor}. Principal as api.balance. TL422 bad limit or cursor.';

REVOKE ALL ON FUNCTION api.ledger(p_api_key text, p_session_id uuid, p_cursor text, p_limit integer, p_account_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.ledger(p_api_key text, p_session_id uuid, p_cursor text, p_limit integer, p_account_id uuid) TO pgtally_api;

CREATE FUNCTION api.link_stripe_customer(p_api_key text, p_session_id uuid, p_stripe_customer_id text, p_account_id uuid DEFAULT NULL::uuid) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_account_id uuid := billing.buyer(p_api_key, p_session_id, p_account_id);
BEGIN
  INSERT INTO billing.customers (account_id, stripe_customer_id, created_at)
  VALUES (v_account_id, p_stripe_customer_id, util.now())
  ON CONFLICT (account_id) DO NOTHING;
  RETURN jsonb_build_object('stripe_customer_id',
                            (SELECT stripe_customer_id FROM billing.customers WHERE account_id = v_account_id));
END $$;

COMMENT ON FUNCTION api.link_stripe_customer(p_api_key text, p_session_id uuid, p_stripe_customer_id text, p_account_id uuid) IS 'Checkout, step 2 when the account had no customer: remember the Stripe customer the server created; returns the one stored (the first wins).';

REVOKE ALL ON FUNCTION api.link_stripe_customer(p_api_key text, p_session_id uuid, p_stripe_customer_id text, p_account_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.link_stripe_customer(p_api_key text, p_session_id uuid, p_stripe_customer_id text, p_account_id uuid) TO pgtally_api;

CREATE FUNCTION api.list_api_keys(p_session_id uuid, p_account_id uuid DEFAULT NULL::uuid) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  s identity.sessions := identity.key_account(p_session_id, p_account_id);
BEGIN
  RETURN jsonb_build_object('data', coalesce((
    SELECT jsonb_agg(identity.api_key_json(k) ORDER BY k.created_at DESC)
    FROM identity.api_keys k WHERE k.account_id = s.account_id AND k.revoked_at IS NULL), '[]'));
END $$;

COMMENT ON FUNCTION api.list_api_keys(p_session_id uuid, p_account_id uuid) IS 'GET /v1/api-keys: the account''s keys that are not revoked (never the keys themselves); p_account_id: a team (keys:manage).';

REVOKE ALL ON FUNCTION api.list_api_keys(p_session_id uuid, p_account_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.list_api_keys(p_session_id uuid, p_account_id uuid) TO pgtally_api;

CREATE FUNCTION api.live_subscription(p_api_key text, p_session_id uuid, p_price text DEFAULT NULL::text, p_account_id uuid DEFAULT NULL::uuid) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_account_id uuid := identity.authenticate(p_api_key, p_session_id, 'billing:manage', p_account_id);
  s billing.subscriptions;
  v_stripe_price text;
BEGIN
  SELECT * INTO s FROM billing.subscriptions
  WHERE account_id = v_account_id AND status IN ('active', 'trialing', 'past_due')
  ORDER BY current_period_end DESC NULLS LAST LIMIT 1;
  IF NOT FOUND THEN
    PERFORM util.fail('TL404', 'the account has no live subscription');
  END IF;
  IF p_price IS NOT NULL THEN
    SELECT stripe_price_id INTO v_stripe_price FROM billing.prices WHERE id = p_price AND active AND plan_id IS NOT NULL;
    IF v_stripe_price IS NULL THEN
      PERFORM util.fail('TL422', format('there is no plan price %L', p_price));
    END IF;
  END IF;
  RETURN jsonb_build_object('id', s.stripe_subscription_id, 'stripe_item_id', s.stripe_item_id,
                            'stripe_price_id', v_stripe_price, 'current_period_end', util.iso(s.current_period_end));
END $$;

COMMENT ON FUNCTION api.live_subscription(p_api_key text, p_session_id uuid, p_price text, p_account_id uuid) IS 'POST /v1/billing/subscription/change and DELETE /v1/billing/subscription (permission billing:manage; p_account_id: a team): the account''s live subscription (active, trialing or past_due) with its Stripe item, and the Stripe price of p_price when given. TL404 no live subscription; TL422 p_price is not an active plan price.';

REVOKE ALL ON FUNCTION api.live_subscription(p_api_key text, p_session_id uuid, p_price text, p_account_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.live_subscription(p_api_key text, p_session_id uuid, p_price text, p_account_id uuid) TO pgtally_api;

CREATE FUNCTION api.load_catalog(p_catalog jsonb) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
  v_id text;
  v_def jsonb;
  v_meter text;
  v_ent jsonb;
  v_kind text;
  v_limit bigint;
  v_pricing text;
  v_plans text[] := '{}';
  v_meters text[] := '{}';
  v_prices text[] := '{}';
  v_interval text;
  v_price jsonb;
  v_path text;
BEGIN
  IF jsonb_typeof(p_catalog -> 'meters') IS DISTINCT FROM 'object'
     OR jsonb_typeof(p_catalog -> 'plans') IS DISTINCT FROM 'object' THEN
    PERFORM util.fail('TL422', 'the catalog needs a "meters" table and a "plans" table');
  END IF;

  FOR v_id, v_def IN SELECT key, value FROM jsonb_each(p_catalog -> 'meters') LOOP
    v_pricing := coalesce(v_def ->> 'pricing', 'unit');
    IF v_id !~ '^[a-z][a-z0-9_]{0,62}$' THEN
      PERFORM util.fail('TL422', format('meters.%s: a meter id is lower-case letters, digits and _', v_id));
    END IF;
    IF v_pricing NOT IN ('unit', 'tokens') THEN
      PERFORM util.fail('TL422', format('meters.%s.pricing: must be "unit" or "tokens"', v_id));
    END IF;
    INSERT INTO metering.meters AS m (id, name, unit, pricing, unit_price_micros,
                                      input_price_micros_per_mtok, output_price_micros_per_mtok, margin)
    VALUES (v_id,
            coalesce(v_def ->> 'name', v_id),
            coalesce(v_def ->> 'unit', v_id),
            v_pricing,
            CASE WHEN v_pricing = 'unit' THEN billing.to_micros(v_def -> 'price', format('meters.%s.price', v_id)) END,
            CASE WHEN v_pricing = 'tokens' THEN billing.to_micros(v_def -> 'input_price_per_million', format('meters.%s.input_price_per_million', v_id)) END,
            CASE WHEN v_pricing = 'tokens' THEN billing.to_micros(v_def -> 'output_price_per_million', format('meters.%s.output_price_per_million', v_id)) END,
            coalesce((v_def ->> 'margin')::numeric, 1))
    ON CONFLICT (id) DO UPDATE SET
      name = EXCLUDED.name, unit = EXCLUDED.unit, pricing = EXCLUDED.pricing,
      unit_price_micros = EXCLUDED.unit_price_micros,
      input_price_micros_per_mtok = EXCLUDED.input_price_micros_per_mtok,
      output_price_micros_per_mtok = EXCLUDED.output_price_micros_per_mtok,
      margin = EXCLUDED.margin;
    v_meters := v_meters || v_id;
  END LOOP;

  FOR v_id, v_def IN SELECT key, value FROM jsonb_each(p_catalog -> 'plans') LOOP
    IF v_id !~ '^[a-z][a-z0-9_]{0,62}$' THEN
      PERFORM util.fail('TL422', format('plans.%s: a plan id is lower-case letters, digits and _', v_id));
    END IF;
    IF v_def ? 'spending_limit' AND NOT (jsonb_typeof(v_def -> 'spending_limit') = 'number'
                                         AND (v_def ->> 'spending_limit') ~ '^[0-9]{1,18}$') THEN
      PERFORM util.fail('TL422', format('plans.%s.spending_limit: a whole amount in minor units (cents) is required', v_id));
    END IF;
    INSERT INTO billing.plans (id, name, description, features, included_credits_micros, spending_limit_minor,
                               signup_bonus_micros, monthly_credits_micros, active, updated_at)
    VALUES (v_id, coalesce(v_def ->> 'name', initcap(v_id)), coalesce(v_def ->> 'description', ''),
            coalesce(v_def -> 'features', '[]'),
            billing.to_micros(coalesce(v_def -> 'included_credits', '0'), format('plans.%s.included_credits', v_id)),
            (v_def ->> 'spending_limit')::bigint,
            billing.to_micros(coalesce(v_def -> 'signup_bonus', '0'), format('plans.%s.signup_bonus', v_id)),
            billing.to_micros(coalesce(v_def -> 'monthly_credits', '0'), format('plans.%s.monthly_credits', v_id)),
            true, util.now())
    ON CONFLICT (id) DO UPDATE SET
      name = EXCLUDED.name, description = EXCLUDED.description, features = EXCLUDED.features,
      included_credits_micros = EXCLUDED.included_credits_micros, spending_limit_minor = EXCLUDED.spending_limit_minor,
      signup_bonus_micros = EXCLUDED.signup_bonus_micros, monthly_credits_micros = EXCLUDED.monthly_credits_micros,
      active = true, updated_at = EXCLUDED.updated_at;
    FOR v_interval, v_price IN SELECT key, value FROM jsonb_each(coalesce(v_def -> 'prices', '{}')) LOOP
      IF v_interval NOT IN ('monthly', 'yearly') THEN
        PERFORM util.fail('TL422', format('plans.%s.prices.%s: a plan price is monthly or yearly', v_id, v_interval));
      END IF;
      PERFORM billing.upsert_price(v_id || '_' || v_interval,
                                   jsonb_build_object('name', coalesce(v_def ->> 'name', v_id) || ' ' || v_interval) || v_price,
                                   format('plans.%s.prices.%s', v_id, v_interval),
                                   v_id, CASE v_interval WHEN 'monthly' THEN 'month' ELSE 'year' END, NULL);
      v_prices := v_prices || (v_id || '_' || v_interval);
    END LOOP;
    DELETE FROM billing.entitlements WHERE plan_id = v_id;
    FOR v_meter, v_ent IN SELECT key, value FROM jsonb_each(coalesce(v_def -> 'entitlements', '{}')) LOOP
      IF NOT v_meter = ANY (v_meters) THEN
        PERFORM util.fail('TL422', format('plans.%s.entitlements.%s: no such meter in this catalog', v_id, v_meter));
      END IF;
      v_kind := CASE WHEN v_ent ? 'allowance' THEN 'allowance'
                     WHEN v_ent ? 'fair_use' THEN 'fair_use'
                     WHEN v_ent ? 'post_paid' THEN 'post_paid'
                     WHEN (v_ent ->> 'unlimited')::boolean THEN 'unlimited' END;
      IF v_kind IS NULL THEN
        PERFORM util.fail('TL422', format('plans.%s.entitlements.%s: give allowance = N, fair_use = N, post_paid = CENTS or unlimited = true', v_id, v_meter));
      END IF;
      IF v_kind = 'post_paid' THEN
        -- Post-paid: each unit costs money, billed by Stripe after the fact (no allowance, no credits).
        v_path := format('plans.%s.entitlements.%s', v_id, v_meter);
        IF (SELECT pricing FROM metering.meters WHERE id = v_meter) <> 'unit' THEN
          PERFORM util.fail('TL422', format('%s.post_paid: only meters priced per unit can be post-paid', v_path));
        ELSIF NOT (jsonb_typeof(v_ent -> 'post_paid') = 'number' AND (v_ent ->> 'post_paid') ~ '^[0-9]{1,12}$') THEN
          PERFORM util.fail('TL422', format('%s.post_paid: the price of one unit in minor units (cents) is required', v_path));
        ELSIF coalesce(v_ent ->> 'stripe_meter', '') !~ '^[A-Za-z0-9_.:-]{1,100}$' THEN
          PERFORM util.fail('TL422', format('%s.stripe_meter: the event_name of the Stripe Billing Meter is required', v_path));
        ELSIF coalesce(v_ent ->> 'period', 'billing_period') <> 'billing_period' THEN
          PERFORM util.fail('TL422', format('%s.period: post-paid usage is billed per billing_period', v_path));
        END IF;
        INSERT INTO billing.entitlements (plan_id, meter_id, kind, period, limit_units, unit_amount_minor, stripe_meter_event)
        VALUES (v_id, v_meter, 'post_paid', 'billing_period', NULL, (v_ent ->> 'post_paid')::bigint, v_ent ->> 'stripe_meter');
        CONTINUE;
      END IF;
      -- Limits are what a person writes: units for unit meters, credits for token meters
      -- (stored as micro-credits of cost, the unit token allowances are counted in).
      v_path := format('plans.%s.entitlements.%s.%s', v_id, v_meter, v_kind);
      IF v_kind = 'unlimited' THEN
        v_limit := NULL;
      ELSIF (SELECT pricing FROM metering.meters WHERE id = v_meter) = 'tokens' THEN
        v_limit := billing.to_micros(v_ent -> v_kind, v_path || ' (credits)');
      ELSIF jsonb_typeof(v_ent -> v_kind) = 'number' AND (v_ent ->> v_kind) ~ '^[0-9]{1,18}$' THEN
        v_limit := (v_ent ->> v_kind)::bigint;
      ELSE
        PERFORM util.fail('TL422', format('%s: a whole, non-negative number of units is required', v_path));
      END IF;
      IF coalesce(v_ent ->> 'period', 'month') NOT IN ('day', 'month', 'billing_period') THEN
        PERFORM util.fail('TL422', format('plans.%s.entitlements.%s.period: day, month or billing_period', v_id, v_meter));
      END IF;
      INSERT INTO billing.entitlements (plan_id, meter_id, kind, period, limit_units)
      VALUES (v_id, v_meter, v_kind, coalesce(v_ent ->> 'period', 'month'), v_limit);
    END LOOP;
    v_plans := v_plans || v_id;
  END LOOP;

  FOR v_id, v_def IN SELECT key, value FROM jsonb_each(coalesce(p_catalog -> 'bundles', '{}')) LOOP
    PERFORM billing.upsert_price(v_id, v_def, format('bundles.%s', v_id), NULL, NULL,
                                 billing.to_micros(v_def -> 'credits', format('bundles.%s.credits', v_id)));
    v_prices := v_prices || v_id;
  END LOOP;

  -- The referral program (one row): [referrals] of the catalog, defaults where it is silent.
  v_def := coalesce(p_catalog -> 'referrals', '{}');
  IF coalesce(v_def ->> 'qualify_on', 'first_payment') NOT IN ('email_verified', 'first_payment') THEN
    PERFORM util.fail('TL422', 'referrals.qualify_on: email_verified or first_payment');
  END IF;
  FOREACH v_path IN ARRAY ARRAY['holdback_days', 'monthly_cap', 'same_ip_days'] LOOP
    IF v_def ? v_path AND NOT (jsonb_typeof(v_def -> v_path) = 'number' AND (v_def ->> v_path) ~ '^[0-9]{1,6}$') THEN
      PERFORM util.fail('TL422', format('referrals.%s: a whole, non-negative number is required', v_path));
    END IF;
  END LOOP;
  UPDATE billing.referral_program SET
    qualify_on = coalesce(v_def ->> 'qualify_on', 'first_payment'),
    referrer_reward_micros = billing.to_micros(coalesce(v_def -> 'referrer_credits', '10'), 'referrals.referrer_credits'),
    referee_reward_micros = billing.to_micros(coalesce(v_def -> 'referee_credits', '0'), 'referrals.referee_credits'),
    holdback = make_interval(days => coalesce((v_def ->> 'holdback_days')::integer, 14)),
    monthly_cap = coalesce((v_def ->> 'monthly_cap')::integer, 20),
    same_ip_window = make_interval(days => coalesce((v_def ->> 'same_ip_days')::integer, 30));

  UPDATE billing.plans SET active = false, updated_at = util.now()
  WHERE active AND NOT id = ANY (v_plans);
  UPDATE billing.prices SET active = false WHERE active AND NOT id = ANY (v_prices);

  RETURN jsonb_build_object('plans', to_jsonb(v_plans), 'meters', to_jsonb(v_meters), 'prices', to_jsonb(v_prices));
END $_$;

COMMENT ON FUNCTION api.load_catalog(p_catalog jsonb) IS 'Load the plan catalog (the catalog file as JSON: {"meters": {id: {name, unit, pricing: unit|tokens, price | input_price_per_million, output_price_per_million, margin}}, "plans": {id: {name, description, features, entitlements: {meter: {allowance|fair_use: N, period} | {unlimited: true}}}}}). Prices are credits; allowance and fair_use limits are units for unit meters and credits for token meters (stored as micro-credits). Plans may carry included_credits, signup_bonus (credits, once per person at email verification), monthly_credits (credits each billing period, expiring at its end), spending_limit (minor units per billing period, for post-paid entitlements {post_paid: cents per unit, stripe_meter: Stripe meter event_name}) and prices {monthly|yearly: {stripe_price, amount, currency}}; bundles: {id: {name, credits, stripe_price, amount, currency}}. Upserts meters, plans and prices, replaces each listed plan''s entitlements, deactivates plans and prices not listed; [referrals] {qualify_on: email_verified | first_payment, referrer_credits (10), referee_credits (0), holdback_days (14), monthly_cap (20), same_ip_days (30)} sets the referral program. Errors: TL422 naming the bad field. Operators only (not granted to pgtally_api).';

REVOKE ALL ON FUNCTION api.load_catalog(p_catalog jsonb) FROM PUBLIC;

CREATE FUNCTION api.login_failed(p_user_id uuid, p_email text, p_ip text, p_user_agent text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  PERFORM identity.log_event('login_failed', p_user_id, NULL, NULL, p_ip, p_user_agent,
                             jsonb_build_object('email', lower(btrim(p_email)), 'known_user', p_user_id IS NOT NULL));
  RETURN identity.error('TL401', 'the email or password is not right');
END $$;

COMMENT ON FUNCTION api.login_failed(p_user_id uuid, p_email text, p_ip text, p_user_agent text) IS 'POST /v1/auth/login, step 2 on a wrong password or unknown email: log it and return the one TL401 error both cases share.';

REVOKE ALL ON FUNCTION api.login_failed(p_user_id uuid, p_email text, p_ip text, p_user_agent text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.login_failed(p_user_id uuid, p_email text, p_ip text, p_user_agent text) TO pgtally_api;

CREATE FUNCTION api.login_start(p_email text, p_ip text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_email text := lower(btrim(p_email));
  v_limited jsonb := identity.throttled('login', p_ip, 'email', v_email);
  u identity.users;
BEGIN
  IF v_limited IS NOT NULL THEN
    RETURN v_limited;
  END IF;
  SELECT * INTO u FROM identity.users WHERE email_normalized = v_email;
  RETURN jsonb_build_object('user_id', u.id, 'password_hash', u.password_hash);
END $$;

COMMENT ON FUNCTION api.login_start(p_email text, p_ip text) IS 'POST /v1/auth/login, step 1: apply the login rate limits (per IP and per email, identity.rate_limit_rules: TL429) and return {user_id, password_hash}, both null for an unknown email. The server verifies the password (argon2id) and calls api.login_succeeded or api.login_failed.';

REVOKE ALL ON FUNCTION api.login_start(p_email text, p_ip text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.login_start(p_email text, p_ip text) TO pgtally_api;

CREATE FUNCTION api.login_succeeded(p_user_id uuid, p_new_password_hash text, p_ip text, p_user_agent text, p_device_session_id uuid DEFAULT NULL::uuid) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  u identity.users;
  v_tokens jsonb;
BEGIN
  SELECT * INTO u FROM identity.users WHERE id = p_user_id;
  IF NOT FOUND THEN
    PERFORM util.fail('TL401', 'the email or password is not right');
  END IF;
  IF identity.sso_required(u.id) THEN
    RETURN identity.error('TL403', 'your organisation signs you in through its own provider: use single sign-on',
                          jsonb_build_object('sso_url', '/auth/sso/start?email=' || u.email_normalized));
  END IF;
  IF p_new_password_hash IS NOT NULL THEN
    UPDATE identity.users SET password_hash = p_new_password_hash WHERE id = u.id;
    PERFORM identity.log_event('password_rehashed', u.id, u.account_id, NULL, p_ip, p_user_agent);
  END IF;
  v_tokens := identity.start_session(u.account_id, u.id, p_ip, p_user_agent);
  PERFORM identity.log_event('login_succeeded', u.id, u.account_id, (v_tokens ->> 'session_id')::uuid, p_ip, p_user_agent);
  IF p_device_session_id IS NOT NULL THEN
    PERFORM identity.merge_device(p_device_session_id, u.account_id, p_ip, p_user_agent);
  END IF;
  RETURN v_tokens;
END $$;

COMMENT ON FUNCTION api.login_succeeded(p_user_id uuid, p_new_password_hash text, p_ip text, p_user_agent text, p_device_session_id uuid) IS 'POST /v1/auth/login, step 2 after the server verified the password: store a rehash when argon2 parameters changed, start a session, log it, merge the caller''s anonymous device if any. Returns identity.tokens.';

REVOKE ALL ON FUNCTION api.login_succeeded(p_user_id uuid, p_new_password_hash text, p_ip text, p_user_agent text, p_device_session_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.login_succeeded(p_user_id uuid, p_new_password_hash text, p_ip text, p_user_agent text, p_device_session_id uuid) TO pgtally_api;

CREATE FUNCTION api.logout(p_session_id uuid, p_everywhere boolean DEFAULT false) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  s identity.sessions := identity.active_session(p_session_id);
  v_count integer;
BEGIN
  UPDATE identity.sessions x
  SET revoked_at = util.now(), revoked_reason = CASE WHEN p_everywhere THEN 'logout_all' ELSE 'logout' END
  WHERE x.revoked_at IS NULL
    AND (x.id = s.id OR (p_everywhere AND (x.user_id = s.user_id OR (s.user_id IS NULL AND x.account_id = s.account_id))));
  GET DIAGNOSTICS v_count = ROW_COUNT;
  PERFORM identity.log_event(CASE WHEN p_everywhere THEN 'logout_all' ELSE 'logout' END,
                             s.user_id, s.account_id, s.id, NULL, NULL, jsonb_build_object('sessions', v_count));
  RETURN jsonb_build_object('sessions_revoked', v_count);
END $$;

COMMENT ON FUNCTION api.logout(p_session_id uuid, p_everywhere boolean) IS 'POST /v1/auth/logout (this session) and /v1/auth/logout-all (p_everywhere: every session of the user): revokes them, with their refresh tokens. TL401 when the session has ended.';

REVOKE ALL ON FUNCTION api.logout(p_session_id uuid, p_everywhere boolean) FROM PUBLIC;
GRANT ALL ON FUNCTION api.logout(p_session_id uuid, p_everywhere boolean) TO pgtally_api;

CREATE FUNCTION api.maintain_storage() RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_made text[];
  v_forgotten bigint;
  v_lock_timeout text := current_setting('lock_timeout');
BEGIN
  -- Making a partition locks the parent table: charges queue behind a DDL that waits, so it waits
  -- at most two seconds (a long transaction holding the table) and tries again next time; the
  -- months are made three ahead.
  PERFORM set_config('lock_timeout', '2s', true);
  BEGIN
    v_made := util.ensure_partitions(3);
  EXCEPTION WHEN lock_not_available THEN
    v_made := NULL;
  END;
  PERFORM set_config('lock_timeout', v_lock_timeout, true);
  DELETE FROM metering.idempotency_keys WHERE created_at < util.now() - metering.idempotency_window();
  GET DIAGNOSTICS v_forgotten = ROW_COUNT;
  RETURN jsonb_build_object('partitions_made', to_jsonb(v_made), 'idempotency_keys_forgotten', v_forgotten);
END $$;

COMMENT ON FUNCTION api.maintain_storage() IS 'pgtally worker, every few minutes in its own transaction: make next months'' partitions (util.ensure_partitions(3); partitions_made is null when the tables stayed busy for two seconds: tried again next time) and forget idempotency keys older than the idempotency window (metering.idempotency_window()). Returns {partitions_made, idempotency_keys_forgotten}.';

REVOKE ALL ON FUNCTION api.maintain_storage() FROM PUBLIC;
GRANT ALL ON FUNCTION api.maintain_storage() TO pgtally_api;

CREATE FUNCTION api.me(p_api_key text, p_session_id uuid) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_account_id uuid;
  a identity.accounts;
  u identity.users;
BEGIN
  v_account_id := identity.authenticate(p_api_key, p_session_id, 'usage:read');
  SELECT * INTO a FROM identity.accounts WHERE id = v_account_id;
  SELECT * INTO u FROM identity.users WHERE account_id = a.id;
  RETURN jsonb_build_object(
    'account', jsonb_build_object('id', a.id, 'kind', a.kind, 'plan', identity.effective_plan(a),
                                  'credits', util.credits(a.credit_balance_micros), 'created_at', util.iso(a.created_at)),
    'user', CASE WHEN u.id IS NULL THEN NULL ELSE
              jsonb_build_object('id', u.id, 'email', u.email, 'email_verified', u.email_verified_at IS NOT NULL,
                                 'created_at', util.iso(u.created_at)) END,
    'session_id', p_session_id);
END $$;

COMMENT ON FUNCTION api.me(p_api_key text, p_session_id uuid) IS 'GET /v1/me: {account {id, kind, plan, credits, created_at}, user {id, email, email_verified, created_at} | null, session_id}.';

REVOKE ALL ON FUNCTION api.me(p_api_key text, p_session_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.me(p_api_key text, p_session_id uuid) TO pgtally_api;

CREATE FUNCTION api.members(p_session_id uuid, p_account_id uuid) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_account_id uuid := identity.authenticate(NULL, p_session_id, 'members:read', p_account_id);
BEGIN
  RETURN jsonb_build_object('data', coalesce((
    SELECT jsonb_agg(jsonb_build_object('user_id', u.id, 'email', u.email, 'role', m.role,
                                        'joined_at', util.iso(m.created_at)) ORDER BY m.created_at)
    FROM identity.memberships m JOIN identity.users u ON u.id = m.user_id
    WHERE m.account_id = v_account_id), '[]'));
END $$;

COMMENT ON FUNCTION api.members(p_session_id uuid, p_account_id uuid) IS 'GET /v1/accounts/{id}/members: the members and their roles (permission members:read: every member).';

REVOKE ALL ON FUNCTION api.members(p_session_id uuid, p_account_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.members(p_session_id uuid, p_account_id uuid) TO pgtally_api;

CREATE FUNCTION api.meter_summaries_due(p_limit integer DEFAULT 100) RETURNS jsonb
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  RETURN coalesce((
    SELECT jsonb_agg(jsonb_build_object('account_id', r.account_id, 'stripe_customer_id', c.stripe_customer_id,
                                        'event_name', r.event_name, 'day', r.day,
                                        'start_time', extract(epoch FROM r.day::timestamp AT TIME ZONE 'UTC')::bigint,
                                        'end_time', extract(epoch FROM (r.day + 1)::timestamp AT TIME ZONE 'UTC')::bigint)
                     ORDER BY r.day, r.account_id, r.event_name)
    FROM (SELECT DISTINCT (m.payload ->> 'account_id')::uuid AS account_id, m.payload ->> 'event_name' AS event_name,
                 (to_timestamp((m.payload ->> 'timestamp')::bigint) AT TIME ZONE 'UTC')::date AS day
          FROM outbox.messages m
          WHERE m.kind = 'meter_event' AND m.delivered_at IS NOT NULL
            AND m.created_at >= util.now() - interval '35 days') r
    JOIN billing.customers c ON c.account_id = r.account_id
    WHERE r.day < (util.now() AT TIME ZONE 'UTC')::date
      AND NOT EXISTS (SELECT 1 FROM billing.meter_event_summaries s
                      WHERE s.account_id = r.account_id AND s.event_name = r.event_name AND s.day = r.day)
    LIMIT greatest(p_limit, 1)), '[]');
END $$;

COMMENT ON FUNCTION api.meter_summaries_due(p_limit integer) IS 'pgtally worker, housekeeping: the (account, Stripe customer, meter event_name, UTC day) triples of the last 35 days whose post-paid usage was reported to Stripe and whose day has ended but whose Stripe total was not read yet (at most p_limit): each is compared once, the day after. start_time and end_time are the day''s bounds in Unix seconds, as Stripe''s meter event summaries take them.';

REVOKE ALL ON FUNCTION api.meter_summaries_due(p_limit integer) FROM PUBLIC;
GRANT ALL ON FUNCTION api.meter_summaries_due(p_limit integer) TO pgtally_api;

CREATE FUNCTION api.metrics_report(p_session_id uuid, p_name text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  IF api.staff_role(p_session_id) IS NULL THEN
    PERFORM util.fail('TL403', 'staff only');
  END IF;
  RETURN CASE p_name
    WHEN 'mrr' THEN (SELECT coalesce(jsonb_agg(to_jsonb(r) ORDER BY month), '[]') FROM reporting.mrr_monthly r)
    WHEN 'active_accounts' THEN (SELECT coalesce(jsonb_agg(to_jsonb(r) ORDER BY day), '[]')
                                 FROM (SELECT * FROM reporting.active_accounts_daily ORDER BY day DESC LIMIT 90) r)
    WHEN 'conversion' THEN (SELECT coalesce(jsonb_agg(to_jsonb(r) ORDER BY cohort), '[]') FROM reporting.conversion_by_cohort r)
    WHEN 'usage' THEN (SELECT coalesce(jsonb_agg(to_jsonb(r) ORDER BY day), '[]')
                       FROM (SELECT day, sum(events) AS events, sum(quantity) AS quantity FROM metering.usage_rollup_daily
                             GROUP BY day ORDER BY day DESC LIMIT 90) r)
  END;
END $$;

COMMENT ON FUNCTION api.metrics_report(p_session_id uuid, p_name text) IS '/admin/metrics: a report for staff (mrr, active_accounts, conversion, usage: the last 90 days) as JSON rows. TL403 for customers.';

REVOKE ALL ON FUNCTION api.metrics_report(p_session_id uuid, p_name text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.metrics_report(p_session_id uuid, p_name text) TO pgtally_api;

CREATE FUNCTION api.oauth_begin(p_provider text, p_purpose text, p_browser_secret text, p_session_id uuid, p_device_session_id uuid, p_return_to text, p_ip text, p_sso_account_id uuid DEFAULT NULL::uuid) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
  v_limited jsonb := identity.throttled('oauth', p_ip);
  v_state text := util.random_token();
  v_nonce text := util.random_token();
  v_verifier text := util.random_token();
BEGIN
  IF v_limited IS NOT NULL THEN
    RETURN v_limited;
  END IF;
  IF p_purpose = 'link' THEN
    PERFORM identity.active_session(p_session_id);
  END IF;
  IF p_browser_secret IS NULL OR length(p_browser_secret) < 32 THEN
    PERFORM util.fail('TL422', 'a browser binding secret of at least 32 characters is required');
  END IF;
  IF p_return_to IS NOT NULL AND p_return_to !~ '^/[A-Za-z0-9/_?=&.%+~-]*$' THEN
    p_return_to := NULL;                       -- only paths of this site: never an open redirect
  END IF;
  INSERT INTO identity.oauth_flows (provider, state_hash, browser_hash, nonce, code_verifier, purpose, session_id,
                                    device_session_id, return_to, created_at, expires_at, sso_account_id)
  VALUES (p_provider, util.token_hash(v_state), util.token_hash(p_browser_secret), v_nonce, v_verifier, p_purpose,
          CASE WHEN p_purpose = 'link' THEN p_session_id END, p_device_session_id, left(p_return_to, 2000),
          util.now(), util.now() + interval '10 minutes', CASE WHEN p_provider = 'sso' THEN p_sso_account_id END);
  RETURN jsonb_build_object('state', v_state, 'nonce', v_nonce, 'code_verifier', v_verifier);
END $_$;

COMMENT ON FUNCTION api.oauth_begin(p_provider text, p_purpose text, p_browser_secret text, p_session_id uuid, p_device_session_id uuid, p_return_to text, p_ip text, p_sso_account_id uuid) IS 'GET /auth/{provider}/start (and /auth/sso/start, p_sso_account_id: the team whose provider signs in): a new authorization-code flow: state, nonce and PKCE code_verifier (RFC 7636, S256 by the server), stored with the hash of the browser''s binding cookie, single use within 10 minutes. purpose sign_in, or link (p_session_id: the signed-in session). Rate limited per IP (identity.rate_limit_rules, TL429).';

REVOKE ALL ON FUNCTION api.oauth_begin(p_provider text, p_purpose text, p_browser_secret text, p_session_id uuid, p_device_session_id uuid, p_return_to text, p_ip text, p_sso_account_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.oauth_begin(p_provider text, p_purpose text, p_browser_secret text, p_session_id uuid, p_device_session_id uuid, p_return_to text, p_ip text, p_sso_account_id uuid) TO pgtally_api;

CREATE FUNCTION api.oauth_claim(p_state text, p_browser_secret text, p_ip text, p_user_agent text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  f identity.oauth_flows;
BEGIN
  -- The claim: a state is used once, whoever presents it.
  UPDATE identity.oauth_flows SET used_at = util.now()
  WHERE state_hash = util.token_hash(p_state) AND used_at IS NULL AND expires_at > util.now()
  RETURNING * INTO f;
  IF f.id IS NULL OR f.browser_hash <> util.token_hash(p_browser_secret) THEN
    PERFORM identity.log_event('oauth_refused', NULL, NULL, NULL, p_ip, p_user_agent,
      jsonb_build_object('reason', CASE WHEN f.id IS NULL THEN 'unknown, used or expired state' ELSE 'another browser' END,
                         'provider', f.provider));
    RETURN identity.error('TL400', 'this sign-in link is not valid, was used already, has expired or was started in another browser: start again');
  END IF;
  RETURN jsonb_build_object('provider', f.provider, 'purpose', f.purpose, 'nonce', f.nonce,
                            'code_verifier', f.code_verifier, 'session_id', f.session_id,
                            'device_session_id', f.device_session_id, 'return_to', f.return_to,
                            'sso_account_id', f.sso_account_id);
END $$;

COMMENT ON FUNCTION api.oauth_claim(p_state text, p_browser_secret text, p_ip text, p_user_agent text) IS 'GET /auth/{provider}/callback, step 1: use the flow of this state, once, from the browser that started it (its binding cookie); returns its provider, purpose, nonce and PKCE verifier. A replayed, expired, unknown or foreign state is refused (TL400) and logged as oauth_refused.';

REVOKE ALL ON FUNCTION api.oauth_claim(p_state text, p_browser_secret text, p_ip text, p_user_agent text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.oauth_claim(p_state text, p_browser_secret text, p_ip text, p_user_agent text) TO pgtally_api;

CREATE FUNCTION api.oauth_link(p_session_id uuid, p_provider text, p_subject text, p_email text, p_email_verified boolean, p_ip text, p_user_agent text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  s identity.sessions := identity.active_session(p_session_id);
  v_owner uuid;
BEGIN
  IF s.user_id IS NULL THEN
    PERFORM util.fail('TL403', 'sign in to link a provider');
  END IF;
  SELECT user_id INTO v_owner FROM identity.user_identities WHERE provider = p_provider AND subject = p_subject;
  IF v_owner = s.user_id THEN
    RETURN jsonb_build_object('provider', p_provider, 'linked', true);
  ELSIF v_owner IS NOT NULL THEN
    PERFORM identity.log_event('oauth_refused', s.user_id, s.account_id, s.id, p_ip, p_user_agent,
                               jsonb_build_object('provider', p_provider, 'reason', 'linked to another user'));
    RETURN identity.error('TL40C', format('this %s account already signs in to another pgtally user', initcap(p_provider)));
  ELSIF EXISTS (SELECT 1 FROM identity.user_identities WHERE user_id = s.user_id AND provider = p_provider) THEN
    PERFORM util.fail('TL40C', format('another %s account is linked already: unlink it first', initcap(p_provider)));
  END IF;
  PERFORM identity.link_identity(s.user_id, p_provider, p_subject, p_email, p_email_verified);
  PERFORM identity.log_event('oauth_linked', s.user_id, s.account_id, s.id, p_ip, p_user_agent,
                             jsonb_build_object('provider', p_provider));
  RETURN jsonb_build_object('provider', p_provider, 'linked', true);
END $$;

COMMENT ON FUNCTION api.oauth_link(p_session_id uuid, p_provider text, p_subject text, p_email text, p_email_verified boolean, p_ip text, p_user_agent text) IS 'The account page''s "link Google/GitHub": link the provider account to the signed-in user. TL40C when it signs in to another user, or another account of that provider is linked.';

REVOKE ALL ON FUNCTION api.oauth_link(p_session_id uuid, p_provider text, p_subject text, p_email text, p_email_verified boolean, p_ip text, p_user_agent text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.oauth_link(p_session_id uuid, p_provider text, p_subject text, p_email text, p_email_verified boolean, p_ip text, p_user_agent text) TO pgtally_api;

CREATE FUNCTION api.oauth_sign_in(p_provider text, p_subject text, p_email text, p_email_verified boolean, p_device_session_id uuid, p_ip text, p_user_agent text, p_referral_code text DEFAULT NULL::text, p_sso_account_id uuid DEFAULT NULL::uuid) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  i identity.user_identities;
  u identity.users;
  v_email text;
  v_account_id uuid;
  v_kind text := 'oauth_sign_in';
  v_tokens jsonb;
BEGIN
  IF p_subject IS NULL OR length(p_subject) NOT BETWEEN 1 AND 200 THEN
    PERFORM util.fail('TL422', 'the provider did not name the user');
  END IF;
  IF p_provider = 'sso' THEN
    -- A team's provider signs in people of the domains the team proved it owns, as members of the team.
    IF p_sso_account_id IS NULL OR identity.sso_team_of(p_email) IS DISTINCT FROM p_sso_account_id THEN
      PERFORM identity.log_event('oauth_refused', NULL, NULL, NULL, p_ip, p_user_agent,
                                 jsonb_build_object('provider', 'sso', 'reason', 'email domain not of the team'));
      RETURN identity.error('TL403', 'this provider signs in addresses of its team''s domains only');
    ELSIF NOT coalesce(p_email_verified, false) THEN
      PERFORM identity.log_event('oauth_refused', NULL, NULL, NULL, p_ip, p_user_agent,
                                 jsonb_build_object('provider', 'sso', 'reason', 'unverified email'));
      RETURN identity.error('TL403', 'your organisation''s provider did not confirm your address: ask its administrator');
    END IF;
    p_subject := p_sso_account_id || ':' || p_subject;    -- subjects are per provider, and each team has its own
  END IF;
  SELECT * INTO i FROM identity.user_identities WHERE provider = p_provider AND subject = p_subject FOR UPDATE;
  IF NOT FOUND AND p_email IS NOT NULL THEN
    SELECT * INTO u FROM identity.users WHERE email_normalized = lower(btrim(p_email));
  ELSE
    SELECT * INTO u FROM identity.users WHERE id = i.user_id;
  END IF;
  IF p_provider <> 'sso' AND u.id IS NOT NULL AND identity.sso_required(u.id) THEN
    -- Only members of a team that requires its provider, of a domain the team proved.
    RETURN identity.error('TL403', 'your organisation signs you in through its own provider: use single sign-on',
                          jsonb_build_object('sso_url', '/auth/sso/start?email=' || u.email_normalized));
  END IF;
  IF i.user_id IS NOT NULL THEN
    UPDATE identity.user_identities SET last_sign_in_at = util.now(), email = coalesce(left(p_email, 320), email),
                                        email_verified = coalesce(p_email_verified, email_verified)
    WHERE provider = p_provider AND subject = p_subject;
  ELSE
    IF p_email IS NULL THEN
      PERFORM identity.log_event('oauth_refused', NULL, NULL, NULL, p_ip, p_user_agent,
                                 jsonb_build_object('provider', p_provider, 'reason', 'no email'));
      RETURN identity.error('TL422', format('%s did not share an email address: make one visible there, or sign up with a password', initcap(p_provider)));
    END IF;
    v_email := identity.normalize_email(p_email);
    SELECT * INTO u FROM identity.users WHERE email_normalized = v_email FOR UPDATE;
    IF FOUND AND NOT coalesce(p_email_verified, false) THEN
      -- Linking on an unverified address would let whoever controls that provider account in.
      PERFORM identity.log_event('oauth_refused', u.id, u.account_id, NULL, p_ip, p_user_agent,
                                 jsonb_build_object('provider', p_provider, 'reason', 'unverified email of an existing user'));
      RETURN identity.error('TL40C', format('an account with this email exists: sign in with your password, then link %s from your account page', initcap(p_provider)));
    ELSIF FOUND AND p_provider = 'sso' THEN
      -- A team's provider never takes over a user who did not link it: the user confirms by email.
      RETURN identity.request_sso_link(u, p_sso_account_id, p_subject, p_email, p_ip, p_user_agent);
    ELSIF FOUND THEN
      v_kind := 'oauth_linked';
    ELSE
      v_kind := 'oauth_signup';
      v_account_id := util.uuid_v7();
      INSERT INTO identity.users (account_id, email, email_normalized, password_hash, email_verified_at, created_at,
                                  password_changed_at)
      VALUES (v_account_id, btrim(p_email), v_email, NULL, NULL, util.now(), util.now())
      ON CONFLICT (email_normalized) DO NOTHING
      RETURNING * INTO u;
      IF u.id IS NULL THEN
        PERFORM util.fail('TL503', 'a sign-up with this email is under way: try again');
      END IF;
      PERFORM identity.new_personal_account(u.id, v_account_id);
      PERFORM billing.attribute_referral(v_account_id, p_referral_code, p_ip, NULL,
                                         (SELECT account_id FROM identity.sessions WHERE id = p_device_session_id));
    END IF;
    PERFORM identity.link_identity(u.id, p_provider, p_subject, p_email, p_email_verified);
    IF p_email_verified THEN
      PERFORM identity.mark_email_verified(u.id);
    END IF;
  END IF;
  IF p_provider = 'sso' THEN
    INSERT INTO identity.memberships (account_id, user_id, role, created_at)
    VALUES (p_sso_account_id, u.id, 'member', util.now()) ON CONFLICT (account_id, user_id) DO NOTHING;
  END IF;
  v_tokens := identity.start_session(u.account_id, u.id, p_ip, p_user_agent, p_provider);
  PERFORM identity.log_event(v_kind, u.id, u.account_id, (v_tokens ->> 'session_id')::uuid, p_ip, p_user_agent,
                             jsonb_build_object('provider', p_provider, 'team', p_sso_account_id));
  IF p_device_session_id IS NOT NULL THEN
    PERFORM identity.merge_device(p_device_session_id, u.account_id, p_ip, p_user_agent);
  END IF;
  RETURN v_tokens || jsonb_build_object('new_user', v_kind = 'oauth_signup');
END $$;

COMMENT ON FUNCTION api.oauth_sign_in(p_provider text, p_subject text, p_email text, p_email_verified boolean, p_device_session_id uuid, p_ip text, p_user_agent text, p_referral_code text, p_sso_account_id uuid) IS 'GET /auth/{provider}/callback, step 2 after the server checked the provider''s answer (ID token: issuer, audience, expiry, nonce): sign in the user linked to this provider account; else link it to the user with the same email when the provider says the address is verified (otherwise TL40C: sign in with the password and link from the account page); else create the user and a personal account on the free plan (email verified when the provider says so, identity.mark_email_verified; p_referral_code: the /r/ link that brought the person, billing.attribute_referral). Merges the browser''s anonymous device. Provider sso (a team''s own, p_sso_account_id): only addresses it says are verified, of the domains the team proved, who join it as members; an existing user who never linked the team''s provider is not signed in but sent a confirmation link (identity.request_sso_link: status sso_link_email_sent). Members of a team that requires SSO, of a domain it proved, may not use Google or GitHub (TL403 with sso_url). Logged as oauth_sign_in, oauth_linked, oauth_signup or oauth_refused. Returns identity.tokens and new_user.';

REVOKE ALL ON FUNCTION api.oauth_sign_in(p_provider text, p_subject text, p_email text, p_email_verified boolean, p_device_session_id uuid, p_ip text, p_user_agent text, p_referral_code text, p_sso_account_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.oauth_sign_in(p_provider text, p_subject text, p_email text, p_email_verified boolean, p_device_session_id uuid, p_ip text, p_user_agent text, p_referral_code text, p_sso_account_id uuid) TO pgtally_api;

CREATE FUNCTION api.oauth_unlink(p_session_id uuid, p_provider text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  s identity.sessions := identity.active_session(p_session_id);
  u identity.users;
BEGIN
  SELECT * INTO u FROM identity.users WHERE id = s.user_id FOR UPDATE;
  IF NOT FOUND THEN
    PERFORM util.fail('TL403', 'sign in to unlink a provider');
  END IF;
  IF u.password_hash IS NULL AND NOT EXISTS (SELECT 1 FROM identity.user_identities
                                             WHERE user_id = u.id AND provider <> p_provider) THEN
    PERFORM util.fail('TL40C', 'this is your only way to sign in: set a password (reset it by email) or link another provider first');
  END IF;
  DELETE FROM identity.user_identities WHERE user_id = u.id AND provider = p_provider;
  IF NOT FOUND THEN
    PERFORM util.fail('TL404', format('%s is not linked', initcap(p_provider)));
  END IF;
  PERFORM identity.log_event('oauth_unlinked', u.id, u.account_id, s.id, NULL, NULL, jsonb_build_object('provider', p_provider));
  RETURN jsonb_build_object('provider', p_provider, 'linked', false);
END $$;

COMMENT ON FUNCTION api.oauth_unlink(p_session_id uuid, p_provider text) IS 'The account page''s "unlink": allowed while another way to sign in remains (a password or another provider); TL40C otherwise, TL404 when not linked.';

REVOKE ALL ON FUNCTION api.oauth_unlink(p_session_id uuid, p_provider text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.oauth_unlink(p_session_id uuid, p_provider text) TO pgtally_api;

CREATE FUNCTION api.oidc_add_signing_key(p_kid text, p_private_jwk jsonb, p_public_jwk jsonb, p_rotate boolean) RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  IF p_private_jwk ->> 'kty' IS DISTINCT FROM 'RSA' OR NOT p_private_jwk ? 'd' OR p_public_jwk ? 'd'
     OR p_public_jwk ->> 'n' IS DISTINCT FROM p_private_jwk ->> 'n' THEN
    PERFORM util.fail('TL422', 'a signing key is an RSA private JWK and its public half');
  END IF;
  -- Two servers starting at once each made a key: the first one stored is the one.
  LOCK TABLE identity.signing_keys IN SHARE ROW EXCLUSIVE MODE;
  IF NOT p_rotate AND EXISTS (SELECT 1 FROM identity.signing_keys) THEN
    RETURN false;
  END IF;
  INSERT INTO identity.signing_keys (kid, private_jwk, public_jwk, created_at)
  VALUES (p_kid, p_private_jwk, p_public_jwk, util.now());
  RETURN true;
END $$;

COMMENT ON FUNCTION api.oidc_add_signing_key(p_kid text, p_private_jwk jsonb, p_public_jwk jsonb, p_rotate boolean) IS 'Store a new ID-token signing key (RSA JWKs made by the server with joserfc). p_rotate false: only when there is none yet (the first server start; false when another server won). p_rotate true (`pgtally clients rotate-key`): it signs from now on, the older keys stay published (identity.published_signing_keys). TL422 not an RSA key pair.';

REVOKE ALL ON FUNCTION api.oidc_add_signing_key(p_kid text, p_private_jwk jsonb, p_public_jwk jsonb, p_rotate boolean) FROM PUBLIC;
GRANT ALL ON FUNCTION api.oidc_add_signing_key(p_kid text, p_private_jwk jsonb, p_public_jwk jsonb, p_rotate boolean) TO pgtally_api;

CREATE FUNCTION api.oidc_authorize(p_session_id uuid, p_client_id text, p_redirect_uri text, p_response_type text, p_scope text, p_code_challenge text, p_code_challenge_method text, p_nonce text, p_decision text, p_ip text, p_user_agent text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
  c record;
  s identity.sessions;
  v_scopes text[];
  v_code text;
BEGIN
  SELECT * INTO c FROM identity.oauth_clients WHERE id = p_client_id AND revoked_at IS NULL;
  IF NOT FOUND THEN
    RETURN jsonb_build_object('refuse', 'unknown or revoked client_id');
  END IF;
  IF p_redirect_uri IS NULL OR NOT p_redirect_uri = ANY (c.redirect_uris) THEN
    -- Never redirect to a URI that is not registered (RFC 6749 section 4.1.2.1).
    RETURN jsonb_build_object('refuse', 'redirect_uri is not one registered for this client');
  END IF;
  IF p_response_type IS DISTINCT FROM 'code' THEN
    RETURN identity.oauth_error('unsupported_response_type', 'only response_type=code (the authorization code flow) is supported');
  END IF;
  v_scopes := ARRAY(SELECT DISTINCT x FROM regexp_split_to_table(btrim(coalesce(p_scope, 'openid')), '\s+') x WHERE x <> '' ORDER BY x);
  IF cardinality(v_scopes) = 0 OR NOT v_scopes <@ identity.oidc_scopes() THEN
    RETURN identity.oauth_error('invalid_scope', 'scopes are among ' || array_to_string(identity.oidc_scopes(), ' '));
  END IF;
  IF p_code_challenge IS NULL AND c.secret_hash IS NULL THEN
    RETURN identity.oauth_error('invalid_request', 'a public client must send code_challenge with code_challenge_method=S256 (PKCE, RFC 7636)');
  END IF;
  IF p_code_challenge IS NOT NULL AND p_code_challenge_method IS DISTINCT FROM 'S256' THEN
    RETURN identity.oauth_error('invalid_request', 'code_challenge_method must be S256');
  END IF;
  IF p_code_challenge IS NULL AND p_code_challenge_method IS NOT NULL OR p_code_challenge !~ '^[A-Za-z0-9_-]{43}$' THEN
    RETURN identity.oauth_error('invalid_request', 'code_challenge must be BASE64URL(SHA-256(code_verifier)): 43 characters');
  END IF;
  IF length(p_nonce) > 500 THEN
    RETURN identity.oauth_error('invalid_request', 'nonce has at most 500 characters');
  END IF;
  SELECT * INTO s FROM identity.sessions
  WHERE id = p_session_id AND revoked_at IS NULL AND expires_at > util.now() AND user_id IS NOT NULL AND client_id IS NULL;
  IF NOT FOUND THEN
    RETURN jsonb_build_object('login', true, 'client_name', c.name);
  END IF;
  IF NOT c.first_party AND p_decision IS NULL THEN
    RETURN jsonb_build_object('consent', jsonb_build_object('client_id', c.id, 'client_name', c.name, 'scopes', to_jsonb(v_scopes),
                                                            'redirect_origin', identity.oidc_origin(p_redirect_uri)));
  END IF;
  IF NOT c.first_party AND p_decision IS DISTINCT FROM 'approve' THEN
    PERFORM identity.log_event('oidc_consent_denied', s.user_id, s.account_id, s.id, p_ip, p_user_agent,
                               jsonb_build_object('client_id', c.id));
    RETURN identity.oauth_error('access_denied', 'the person did not allow ' || c.name);
  END IF;
  v_code := util.random_token();
  PERFORM identity.oidc_forget_old_codes();
  INSERT INTO identity.authorization_codes (code_hash, client_id, browser_session_id, redirect_uri, scopes, code_challenge, nonce,
                                            created_at, expires_at)
  VALUES (util.token_hash(v_code), c.id, s.id, p_redirect_uri, v_scopes, p_code_challenge, p_nonce,
          util.now(), util.now() + interval '60 seconds');
  PERFORM identity.log_event('oidc_code_issued', s.user_id, s.account_id, s.id, p_ip, p_user_agent,
                             jsonb_build_object('client_id', c.id, 'scopes', to_jsonb(v_scopes), 'consented', NOT c.first_party));
  RETURN jsonb_build_object('code', v_code, 'client_name', c.name);
END $_$;

COMMENT ON FUNCTION api.oidc_authorize(p_session_id uuid, p_client_id text, p_redirect_uri text, p_response_type text, p_scope text, p_code_challenge text, p_code_challenge_method text, p_nonce text, p_decision text, p_ip text, p_user_agent text) IS 'GET /oauth/authorize and its consent form (OpenID Connect Core section 3.1.2): {"refuse": why} for an unknown client or a redirect URI not registered exactly (shown, never redirected to); {"oauth_error": {error, error_description}} to send back to the redirect URI (unsupported_response_type, invalid_scope, invalid_request: a public client without PKCE S256, a method other than S256; access_denied: consent refused); {"login": true} when p_session_id is not a signed-in person''s browser session; {"consent": {client_name, scopes, ...}} for a third-party client until p_decision is approve or deny; else {"code": ...}: an authorization code, single use, valid 60 seconds, bound to the client, redirect URI, PKCE challenge, nonce and scopes (stored as its hash).';

REVOKE ALL ON FUNCTION api.oidc_authorize(p_session_id uuid, p_client_id text, p_redirect_uri text, p_response_type text, p_scope text, p_code_challenge text, p_code_challenge_method text, p_nonce text, p_decision text, p_ip text, p_user_agent text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.oidc_authorize(p_session_id uuid, p_client_id text, p_redirect_uri text, p_response_type text, p_scope text, p_code_challenge text, p_code_challenge_method text, p_nonce text, p_decision text, p_ip text, p_user_agent text) TO pgtally_api;

CREATE FUNCTION api.oidc_cors_origins() RETURNS text[]
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  RETURN (SELECT coalesce(array_agg(DISTINCT x.o ORDER BY x.o), '{}')
          FROM identity.oauth_clients c,
               LATERAL (SELECT identity.oidc_origin(u) FROM unnest(c.redirect_uris) u UNION SELECT unnest(c.origins)) x (o)
          WHERE c.revoked_at IS NULL AND x.o IS NOT NULL);
END $$;

COMMENT ON FUNCTION api.oidc_cors_origins() IS 'The browser origins the JSON API answers cross-origin requests from (CORS): each active client''s redirect URIs'' origins and its extra origins.';

REVOKE ALL ON FUNCTION api.oidc_cors_origins() FROM PUBLIC;
GRANT ALL ON FUNCTION api.oidc_cors_origins() TO pgtally_api;

CREATE FUNCTION api.oidc_create_client(p_name text, p_redirect_uris text[], p_public boolean, p_first_party boolean, p_origins text[] DEFAULT '{}'::text[], p_post_logout_redirect_uris text[] DEFAULT '{}'::text[]) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
  v_id text := 'pgc_' || left(util.random_token(), 32);
  v_secret text := CASE WHEN NOT p_public THEN 'pgcs_' || util.random_token() END;
  v_origin text;
BEGIN
  IF p_name IS NULL OR length(btrim(p_name)) NOT BETWEEN 1 AND 100 THEN
    PERFORM util.fail('TL422', 'a client name of 1 to 100 characters is required', '{"field": "name"}');
  END IF;
  IF cardinality(p_redirect_uris) IS NULL OR cardinality(p_redirect_uris) NOT BETWEEN 1 AND 20 THEN
    PERFORM util.fail('TL422', 'a client needs 1 to 20 redirect URIs', '{"field": "redirect_uri"}');
  END IF;
  PERFORM identity.oidc_check_uris(p_redirect_uris, 'redirect_uri');
  PERFORM identity.oidc_check_uris(p_post_logout_redirect_uris, 'post_logout_redirect_uri');
  FOREACH v_origin IN ARRAY coalesce(p_origins, '{}') LOOP
    IF v_origin !~ '^[a-z][a-z0-9+.-]*://[a-z0-9.-]+(:[0-9]{1,5})?$' OR v_origin ~ '^http://' AND v_origin !~ '^http://(127\.0\.0\.1|localhost)(:|$)' THEN
      PERFORM util.fail('TL422', format('origin %L is not scheme://host[:port] in lower case (https, chrome-extension, ...; http only on loopback)',
                                        v_origin), '{"field": "origin"}');
    END IF;
  END LOOP;
  INSERT INTO identity.oauth_clients (id, name, secret_hash, first_party, redirect_uris, post_logout_redirect_uris, origins, created_at)
  VALUES (v_id, btrim(p_name), CASE WHEN v_secret IS NOT NULL THEN util.token_hash(v_secret) END, coalesce(p_first_party, false), p_redirect_uris,
          coalesce(p_post_logout_redirect_uris, '{}'), coalesce(p_origins, '{}'), util.now());
  RETURN jsonb_build_object('client_id', v_id, 'client_secret', v_secret, 'name', btrim(p_name),
                            'public', p_public, 'first_party', coalesce(p_first_party, false),
                            'redirect_uris', to_jsonb(p_redirect_uris),
                            'post_logout_redirect_uris', to_jsonb(coalesce(p_post_logout_redirect_uris, '{}')),
                            'origins', to_jsonb(coalesce(p_origins, '{}')));
END $_$;

COMMENT ON FUNCTION api.oidc_create_client(p_name text, p_redirect_uris text[], p_public boolean, p_first_party boolean, p_origins text[], p_post_logout_redirect_uris text[]) IS '`pgtally clients create`: register an OpenID Connect client. Confidential clients get a secret (pgcs_..., returned once, stored as SHA-256); public ones (p_public: browser apps, extensions) none, and must use PKCE S256. p_first_party: no consent screen. Redirect and post-logout URIs: identity.oidc_check_uris; p_origins: extra CORS origins. TL422 bad input.';

REVOKE ALL ON FUNCTION api.oidc_create_client(p_name text, p_redirect_uris text[], p_public boolean, p_first_party boolean, p_origins text[], p_post_logout_redirect_uris text[]) FROM PUBLIC;

CREATE FUNCTION api.oidc_end_session(p_browser_session_id uuid, p_hint_session_id uuid, p_client_id text, p_post_logout_redirect_uri text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_client text := coalesce(p_client_id, (SELECT client_id FROM identity.sessions WHERE id = p_hint_session_id));
  c record;
  v_count integer;
  v_user uuid;
BEGIN
  IF p_client_id IS NOT NULL AND p_hint_session_id IS NOT NULL
     AND p_client_id IS DISTINCT FROM (SELECT client_id FROM identity.sessions WHERE id = p_hint_session_id) THEN
    PERFORM util.fail('TL400', 'client_id is not the client the id_token_hint was issued to');
  END IF;
  SELECT * INTO c FROM identity.oauth_clients WHERE id = v_client AND revoked_at IS NULL;
  IF p_post_logout_redirect_uri IS NOT NULL AND (c.id IS NULL OR NOT p_post_logout_redirect_uri = ANY (c.post_logout_redirect_uris)) THEN
    PERFORM util.fail('TL400', 'post_logout_redirect_uri is not registered for this client (send id_token_hint or client_id)');
  END IF;
  SELECT user_id INTO v_user FROM identity.sessions WHERE id = p_browser_session_id;
  -- The browser's sign-in, and the client session the hint names when it is that person's.
  UPDATE identity.sessions SET revoked_at = util.now(), revoked_reason = 'logout'
  WHERE revoked_at IS NULL AND (id = p_browser_session_id AND client_id IS NULL
                                OR id = p_hint_session_id AND client_id = c.id
                                   AND (v_user IS NULL OR user_id = v_user));
  GET DIAGNOSTICS v_count = ROW_COUNT;
  IF v_count > 0 THEN
    PERFORM identity.log_event('oidc_logout', v_user, NULL, p_browser_session_id, NULL, NULL,
                               jsonb_build_object('client_id', c.id, 'sessions', v_count));
  END IF;
  RETURN jsonb_build_object('sessions_revoked', v_count, 'client_name', c.name, 'redirect_uri', p_post_logout_redirect_uri);
END $$;

COMMENT ON FUNCTION api.oidc_end_session(p_browser_session_id uuid, p_hint_session_id uuid, p_client_id text, p_post_logout_redirect_uri text) IS 'GET /oauth/logout (OpenID Connect RP-Initiated Logout 1.0): end the browser''s sign-in and the client session named by a verified id_token_hint (its sid), and say where to send the browser: p_post_logout_redirect_uri only when registered for the client (from the hint''s session or p_client_id). TL400, changing nothing, for an unregistered URI or a client_id that is not the hint''s.';

REVOKE ALL ON FUNCTION api.oidc_end_session(p_browser_session_id uuid, p_hint_session_id uuid, p_client_id text, p_post_logout_redirect_uri text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.oidc_end_session(p_browser_session_id uuid, p_hint_session_id uuid, p_client_id text, p_post_logout_redirect_uri text) TO pgtally_api;

CREATE FUNCTION api.oidc_jwks() RETURNS jsonb
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  RETURN (SELECT jsonb_build_object('keys', coalesce(jsonb_agg(k.public_jwk || jsonb_build_object('kid', k.kid, 'use', 'sig', 'alg', 'RS256')
                                                               ORDER BY k.created_at DESC), '[]'))
          FROM identity.published_signing_keys() k);
END $$;

COMMENT ON FUNCTION api.oidc_jwks() IS 'GET /oauth/jwks: the published public signing keys as a JWK Set (RFC 7517 section 5), newest first.';

REVOKE ALL ON FUNCTION api.oidc_jwks() FROM PUBLIC;
GRANT ALL ON FUNCTION api.oidc_jwks() TO pgtally_api;

CREATE FUNCTION api.oidc_list_clients() RETURNS jsonb
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  RETURN (SELECT coalesce(jsonb_agg(jsonb_build_object(
           'client_id', c.id, 'name', c.name, 'public', c.secret_hash IS NULL, 'first_party', c.first_party,
           'redirect_uris', to_jsonb(c.redirect_uris), 'post_logout_redirect_uris', to_jsonb(c.post_logout_redirect_uris),
           'origins', to_jsonb(c.origins), 'created_at', util.iso(c.created_at), 'revoked_at', util.iso(c.revoked_at))
         ORDER BY c.created_at, c.id), '[]')
  FROM identity.oauth_clients c);
END $$;

COMMENT ON FUNCTION api.oidc_list_clients() IS '`pgtally clients list`: every client, oldest first, revoked ones marked (never a secret).';

REVOKE ALL ON FUNCTION api.oidc_list_clients() FROM PUBLIC;

CREATE FUNCTION api.oidc_revoke_client(p_client_id text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_count integer;
BEGIN
  UPDATE identity.oauth_clients SET revoked_at = util.now() WHERE id = p_client_id AND revoked_at IS NULL;
  IF NOT FOUND THEN
    PERFORM util.fail('TL404', format('no active client %s', p_client_id));
  END IF;
  UPDATE identity.sessions SET revoked_at = util.now(), revoked_reason = 'client_revoked'
  WHERE client_id = p_client_id AND revoked_at IS NULL;
  GET DIAGNOSTICS v_count = ROW_COUNT;
  RETURN jsonb_build_object('client_id', p_client_id, 'revoked', true, 'sessions_revoked', v_count);
END $$;

COMMENT ON FUNCTION api.oidc_revoke_client(p_client_id text) IS '`pgtally clients revoke`: the client can no longer sign anyone in, and every session (access and refresh token) it holds ends now. TL404 unknown or already revoked.';

REVOKE ALL ON FUNCTION api.oidc_revoke_client(p_client_id text) FROM PUBLIC;

CREATE FUNCTION api.oidc_signing_key() RETURNS TABLE(kid text, private_jwk jsonb)
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  RETURN QUERY SELECT k.kid, k.private_jwk FROM identity.signing_keys k ORDER BY k.created_at DESC, k.kid DESC LIMIT 1;
END $$;

COMMENT ON FUNCTION api.oidc_signing_key() IS 'The newest signing key (kid, private JWK): it signs every ID token. Read by the server, cached 5 minutes.';

REVOKE ALL ON FUNCTION api.oidc_signing_key() FROM PUBLIC;
GRANT ALL ON FUNCTION api.oidc_signing_key() TO pgtally_api;

CREATE FUNCTION api.oidc_token_code(p_client_id text, p_client_secret text, p_code text, p_redirect_uri text, p_code_verifier text, p_ip text, p_user_agent text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
  v_client text := identity.oidc_client_auth(p_client_id, p_client_secret);
  c record;
  b identity.sessions;
  v_tokens jsonb;
  v_session_id uuid;
BEGIN
  IF v_client IS NULL THEN
    RETURN identity.oauth_error('invalid_client', 'unknown client, or its authentication failed');
  END IF;
  -- The claim: of any number of exchanges of one code, one wins.
  UPDATE identity.authorization_codes SET used_at = util.now()
  WHERE code_hash = util.token_hash(p_code) AND used_at IS NULL
  RETURNING * INTO c;
  IF NOT FOUND THEN
    SELECT * INTO c FROM identity.authorization_codes WHERE code_hash = util.token_hash(p_code);
    IF c.used_at IS NOT NULL THEN
      -- A replayed code: the tokens it gave are revoked too (RFC 6749 section 4.1.2).
      UPDATE identity.sessions SET revoked_at = util.now(), revoked_reason = 'code_replay'
      WHERE id = c.session_id AND revoked_at IS NULL;
      PERFORM identity.log_event('oidc_code_replayed', NULL, NULL, c.session_id, p_ip, p_user_agent,
                                 jsonb_build_object('client_id', c.client_id));
      RETURN identity.oauth_error('invalid_grant', 'this authorization code was already used: its tokens are revoked');
    END IF;
    RETURN identity.oauth_error('invalid_grant', 'unknown authorization code');
  END IF;
  IF c.expires_at <= util.now() THEN
    RETURN identity.oauth_error('invalid_grant', 'the authorization code has expired (60 seconds)');
  END IF;
  IF c.client_id <> v_client THEN
    RETURN identity.oauth_error('invalid_grant', 'the authorization code was issued to another client');
  END IF;
  IF p_redirect_uri IS DISTINCT FROM c.redirect_uri THEN
    RETURN identity.oauth_error('invalid_grant', 'redirect_uri differs from the authorization request''s');
  END IF;
  IF c.code_challenge IS NOT NULL AND p_code_verifier IS NULL THEN
    RETURN identity.oauth_error('invalid_grant', 'code_verifier is required (PKCE)');
  END IF;
  IF c.code_challenge IS NULL AND p_code_verifier IS NOT NULL THEN
    RETURN identity.oauth_error('invalid_grant', 'no code_challenge was sent with the authorization request');
  END IF;
  IF c.code_challenge IS NOT NULL AND (p_code_verifier !~ '^[A-Za-z0-9._~-]{43,128}$'
      OR util.base64url(sha256(convert_to(p_code_verifier, 'UTF8'))) <> c.code_challenge) THEN
    RETURN identity.oauth_error('invalid_grant', 'code_verifier does not match the code_challenge');
  END IF;
  SELECT * INTO b FROM identity.sessions WHERE id = c.browser_session_id AND revoked_at IS NULL AND expires_at > util.now();
  IF NOT FOUND THEN
    RETURN identity.oauth_error('invalid_grant', 'the person signed out before the code was exchanged');
  END IF;
  v_tokens := identity.start_session(b.account_id, b.user_id, p_ip, p_user_agent, 'oidc');
  v_session_id := (v_tokens ->> 'session_id')::uuid;
  UPDATE identity.sessions SET client_id = v_client, scopes = c.scopes, auth_time = coalesce(b.auth_time, b.created_at)
  WHERE id = v_session_id;
  UPDATE identity.authorization_codes SET session_id = v_session_id WHERE id = c.id;
  PERFORM identity.log_event('oidc_code_exchanged', b.user_id, b.account_id, v_session_id, p_ip, p_user_agent,
                             jsonb_build_object('client_id', v_client));
  RETURN v_tokens || jsonb_build_object('scope', array_to_string(c.scopes, ' '),
                                        'id_token', CASE WHEN 'openid' = ANY (c.scopes) THEN identity.oidc_id_token(v_session_id, c.nonce) END);
END $_$;

COMMENT ON FUNCTION api.oidc_token_code(p_client_id text, p_client_secret text, p_code text, p_redirect_uri text, p_code_verifier text, p_ip text, p_user_agent text) IS 'POST /oauth/token grant_type=authorization_code: authenticate the client (identity.oidc_client_auth: invalid_client), claim the code once (a replay revokes the session the first exchange started: invalid_grant), check expiry, client, exact redirect URI and PKCE (BASE64URL(SHA-256(code_verifier)) = code_challenge; a verifier without a challenge is refused too), then start a session for the client with the granted scopes. Returns identity.tokens plus scope and id_token (the claims to sign, identity.oidc_id_token) or {"oauth_error": ...} (RFC 6749 section 5.2), returned so the claim and a revocation commit.';

REVOKE ALL ON FUNCTION api.oidc_token_code(p_client_id text, p_client_secret text, p_code text, p_redirect_uri text, p_code_verifier text, p_ip text, p_user_agent text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.oidc_token_code(p_client_id text, p_client_secret text, p_code text, p_redirect_uri text, p_code_verifier text, p_ip text, p_user_agent text) TO pgtally_api;

CREATE FUNCTION api.oidc_token_refresh(p_client_id text, p_client_secret text, p_refresh_token text, p_ip text, p_user_agent text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_client text;
  v_tokens jsonb;
BEGIN
  -- A registered client authenticates; the client_id a command line sends with the device grant
  -- names no registered client and is one of pgtally's own sign-ins.
  IF p_client_secret IS NOT NULL OR EXISTS (SELECT 1 FROM identity.oauth_clients WHERE id = p_client_id) THEN
    v_client := identity.oidc_client_auth(p_client_id, p_client_secret);
    IF v_client IS NULL THEN
      RETURN identity.oauth_error('invalid_client', 'unknown client, or its authentication failed');
    END IF;
  END IF;
  v_tokens := identity.refresh_session(p_refresh_token, v_client, p_ip, p_user_agent);
  IF v_tokens ? 'error' THEN
    RETURN identity.oauth_error('invalid_grant', v_tokens #>> '{error,message}');
  END IF;
  IF v_client IS NOT NULL THEN
    v_tokens := v_tokens || (SELECT jsonb_build_object('scope', array_to_string(s.scopes, ' '),
                                                       'id_token', CASE WHEN 'openid' = ANY (s.scopes)
                                                                        THEN identity.oidc_id_token(s.id, NULL) END)
                             FROM identity.sessions s WHERE s.id = (v_tokens ->> 'session_id')::uuid);
  END IF;
  RETURN v_tokens;
END $$;

COMMENT ON FUNCTION api.oidc_token_refresh(p_client_id text, p_client_secret text, p_refresh_token text, p_ip text, p_user_agent text) IS 'POST /oauth/token grant_type=refresh_token: a registered client (or any caller sending a secret) authenticates first (invalid_client) and the token must be one issued to it; otherwise (no client_id, or the unregistered client_id of a device grant), only a token of pgtally''s own sign-ins (a command line''s device grant). Rotation, the 10-second grace for concurrent refreshes and reuse detection (the whole session revoked) are identity.refresh_session''s, as for /v1/auth/refresh. Returns identity.tokens (plus scope and a fresh id_token without nonce for a client) or {"oauth_error": invalid_grant}.';

REVOKE ALL ON FUNCTION api.oidc_token_refresh(p_client_id text, p_client_secret text, p_refresh_token text, p_ip text, p_user_agent text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.oidc_token_refresh(p_client_id text, p_client_secret text, p_refresh_token text, p_ip text, p_user_agent text) TO pgtally_api;

CREATE FUNCTION api.oidc_userinfo(p_session_id uuid) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  s identity.sessions;
BEGIN
  SELECT * INTO s FROM identity.sessions WHERE id = p_session_id AND revoked_at IS NULL AND expires_at > util.now();
  IF NOT FOUND THEN
    PERFORM util.fail('TL401', 'the session has ended: sign in again');
  END IF;
  IF s.client_id IS NULL OR NOT 'openid' = ANY (s.scopes) THEN
    PERFORM util.fail('TL403', 'userinfo needs an access token a client obtained with the openid scope');
  END IF;
  RETURN identity.oidc_claims(s.id);
END $$;

COMMENT ON FUNCTION api.oidc_userinfo(p_session_id uuid) IS 'GET /oauth/userinfo (OpenID Connect Core section 5.3): the claims of the access token''s person (identity.oidc_claims, as the granted scopes allow). TL401 ended session; TL403 a token without the openid scope or not issued to a client.';

REVOKE ALL ON FUNCTION api.oidc_userinfo(p_session_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.oidc_userinfo(p_session_id uuid) TO pgtally_api;

CREATE FUNCTION api.operator_budgets(p_account_id uuid) RETURNS jsonb
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
  SELECT metering.budgets_json(p_account_id, NULL, true)
$$;

COMMENT ON FUNCTION api.operator_budgets(p_account_id uuid) IS 'pgtally budgets list: every budget of an account. Operators only.';

REVOKE ALL ON FUNCTION api.operator_budgets(p_account_id uuid) FROM PUBLIC;

CREATE FUNCTION api.operator_delete_budget(p_budget_id uuid) RETURNS jsonb
    LANGUAGE sql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
  SELECT metering.delete_budget((SELECT account_id FROM metering.budgets WHERE id = p_budget_id), p_budget_id)
$$;

COMMENT ON FUNCTION api.operator_delete_budget(p_budget_id uuid) IS 'pgtally budgets delete: delete any budget. Operators only.';

REVOKE ALL ON FUNCTION api.operator_delete_budget(p_budget_id uuid) FROM PUBLIC;

CREATE FUNCTION api.operator_reversal_key(p_account_id uuid, p_name text DEFAULT 'reversals'::text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v record;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM identity.accounts WHERE id = p_account_id AND kind = 'service') THEN
    PERFORM util.fail('TL422', 'an operator key belongs to a service account (pgtally accounts create --kind service)');
  END IF;
  SELECT * INTO v FROM identity.issue_api_key(p_account_id, p_name, '{usage:reverse}', NULL);
  RETURN jsonb_build_object('api_key', v.api_key, 'account_id', p_account_id, 'scopes', '["usage:reverse"]'::jsonb);
END $$;

COMMENT ON FUNCTION api.operator_reversal_key(p_account_id uuid, p_name text) IS 'pgtally events reversal-key: issue an operator API key with the usage:reverse scope on a service account (shown once). Operators only.';

REVOKE ALL ON FUNCTION api.operator_reversal_key(p_account_id uuid, p_name text) FROM PUBLIC;

CREATE FUNCTION api.operator_reverse_usage(p_event_id uuid, p_quantity bigint, p_reason text, p_idempotency_key text) RETURNS TABLE(replayed boolean, body jsonb)
    LANGUAGE sql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
  SELECT * FROM metering.reverse_usage(p_event_id, p_quantity, p_reason, p_idempotency_key, NULL, NULL)
$$;

COMMENT ON FUNCTION api.operator_reverse_usage(p_event_id uuid, p_quantity bigint, p_reason text, p_idempotency_key text) IS 'pgtally events reverse: an operator reverses a usage event (metering.reverse_usage). Operators only (not granted to pgtally_api).';

REVOKE ALL ON FUNCTION api.operator_reverse_usage(p_event_id uuid, p_quantity bigint, p_reason text, p_idempotency_key text) FROM PUBLIC;

CREATE FUNCTION api.operator_set_budget(p_account_id uuid, p_scope text, p_subject uuid, p_limit text, p_window text, p_alerts integer[] DEFAULT '{}'::integer[]) RETURNS jsonb
    LANGUAGE sql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
  SELECT metering.set_budget(p_account_id, p_scope, p_subject, p_limit, p_window, coalesce(p_alerts, '{}'), NULL)
$$;

COMMENT ON FUNCTION api.operator_set_budget(p_account_id uuid, p_scope text, p_subject uuid, p_limit text, p_window text, p_alerts integer[]) IS 'pgtally budgets set: an operator sets a budget on any account (metering.set_budget). Operators only (not granted to pgtally_api).';

REVOKE ALL ON FUNCTION api.operator_set_budget(p_account_id uuid, p_scope text, p_subject uuid, p_limit text, p_window text, p_alerts integer[]) FROM PUBLIC;

CREATE FUNCTION api.ops_gauges() RETURNS jsonb
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
  SELECT jsonb_build_object(
    'outbox', coalesce((SELECT jsonb_object_agg(kind, jsonb_build_object('pending', pending, 'failed', failed))
                        FROM reporting.outbox_backlog), '{}'),
    'rollup_lag_seconds', coalesce((
      SELECT extract(epoch FROM util.now() - e.created_at) FROM metering.usage_events e
      WHERE e.id > (SELECT last_id FROM metering.rollup_state) ORDER BY e.id LIMIT 1), 0))
$$;

COMMENT ON FUNCTION api.ops_gauges() IS '/metrics: outbox messages pending and failed per kind, and the age in seconds of the oldest usage event not yet in the analytics rollup (0 when it is caught up).';

REVOKE ALL ON FUNCTION api.ops_gauges() FROM PUBLIC;
GRANT ALL ON FUNCTION api.ops_gauges() TO pgtally_api;

CREATE FUNCTION api.outbox_claim(p_limit integer DEFAULT 10) RETURNS TABLE(id uuid, kind text, recipient text, payload jsonb, attempts integer)
    LANGUAGE sql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
  WITH claimed AS (
    UPDATE outbox.messages m
    SET attempts = m.attempts + 1, next_attempt_at = util.now() + interval '5 minutes'
    WHERE m.id IN (SELECT x.id FROM outbox.messages x
                   WHERE x.delivered_at IS NULL AND x.failed_at IS NULL AND x.next_attempt_at <= util.now()
                   ORDER BY x.next_attempt_at LIMIT p_limit FOR UPDATE SKIP LOCKED)
    RETURNING m.id, m.kind, m.recipient, m.payload, m.attempts, m.created_at)
  SELECT id, kind, recipient, payload, attempts FROM claimed ORDER BY created_at, id
$$;

COMMENT ON FUNCTION api.outbox_claim(p_limit integer) IS 'pgtally worker: claim up to p_limit due messages with a 5-minute lease (FOR UPDATE SKIP LOCKED: concurrent workers never take the same row).';

REVOKE ALL ON FUNCTION api.outbox_claim(p_limit integer) FROM PUBLIC;
GRANT ALL ON FUNCTION api.outbox_claim(p_limit integer) TO pgtally_api;

CREATE FUNCTION api.outbox_delivered(p_id uuid) RETURNS void
    LANGUAGE sql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
  UPDATE outbox.messages SET delivered_at = util.now(), payload = payload - 'token', last_error = NULL
  WHERE id = p_id AND delivered_at IS NULL
$$;

COMMENT ON FUNCTION api.outbox_delivered(p_id uuid) IS 'pgtally worker: the message was accepted by the mail server; its link token is dropped.';

REVOKE ALL ON FUNCTION api.outbox_delivered(p_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.outbox_delivered(p_id uuid) TO pgtally_api;

CREATE FUNCTION api.outbox_failed(p_id uuid, p_error text) RETURNS void
    LANGUAGE sql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
  UPDATE outbox.messages
  SET last_error = left(p_error, 1000),
      next_attempt_at = util.now() + interval '5 seconds' * power(2, attempts - 1),
      failed_at = CASE WHEN attempts >= 8 THEN util.now() END,
      payload = CASE WHEN attempts >= 8 THEN payload - 'token' ELSE payload END
  WHERE id = p_id AND delivered_at IS NULL
$$;

COMMENT ON FUNCTION api.outbox_failed(p_id uuid, p_error text) IS 'pgtally worker: sending failed; retry after 5 s x 2^(attempts-1), give up after 8 attempts (failed_at, token dropped).';

REVOKE ALL ON FUNCTION api.outbox_failed(p_id uuid, p_error text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.outbox_failed(p_id uuid, p_error text) TO pgtally_api;

CREATE FUNCTION api.outbox_postpone(p_id uuid, p_reason text, p_seconds integer DEFAULT 60) RETURNS void
    LANGUAGE sql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
  UPDATE outbox.messages
  SET attempts = greatest(attempts - 1, 0), last_error = left(p_reason, 1000),
      next_attempt_at = util.now() + make_interval(secs => greatest(p_seconds, 1))
  WHERE id = p_id AND delivered_at IS NULL
$$;

COMMENT ON FUNCTION api.outbox_postpone(p_id uuid, p_reason text, p_seconds integer) IS 'pgtally worker: it cannot act on this task (no STRIPE_API_KEY for an auto top-up or a meter event): leave it queued, say why (last_error), claim it again after p_seconds; the attempt is not counted, so a worker that can act still gets all eight.';

REVOKE ALL ON FUNCTION api.outbox_postpone(p_id uuid, p_reason text, p_seconds integer) FROM PUBLIC;
GRANT ALL ON FUNCTION api.outbox_postpone(p_id uuid, p_reason text, p_seconds integer) TO pgtally_api;

CREATE FUNCTION api.partitions() RETURNS TABLE(table_name text, partition text, month text, attached boolean, rows_estimate bigint, bytes bigint)
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
  SELECT t.parent, c.oid::regclass::text, to_char(to_date(substring(c.relname FROM '_y(\d{4}m\d{2})$'), 'YYYY"m"MM'), 'YYYY-MM'),
         EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = c.oid), greatest(c.reltuples, 0)::bigint,
         pg_total_relation_size(c.oid)
  FROM (VALUES ('metering.usage_events', 'metering', 'usage_events'), ('ledger.entries', 'ledger', 'entries')) t(parent, nsp, base)
  JOIN pg_namespace n ON n.nspname = t.nsp
  JOIN pg_class c ON c.relnamespace = n.oid AND c.relkind = 'r'
                 AND (c.relname ~ ('^' || t.base || '_y\d{4}m\d{2}$') OR c.relname = t.base || '_default')
  ORDER BY 1, 3 NULLS FIRST
$_$;

COMMENT ON FUNCTION api.partitions() IS 'pgtally partitions list: every monthly partition of metering.usage_events and ledger.entries (and their default partitions, month NULL), attached or detached and kept, with the planner''s row estimate and its size in bytes. Operators only.';

REVOKE ALL ON FUNCTION api.partitions() FROM PUBLIC;

CREATE FUNCTION api.payment_status(p_checkout_session text, p_payment_intent text) RETURNS jsonb
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
  SELECT CASE
    WHEN p_payment_intent IS NOT NULL THEN
      jsonb_build_object('payment_intent', p_payment_intent, 'mode', 'payment',
        'state', CASE WHEN p.stripe_payment_intent_id IS NULL THEN 'processing' ELSE 'applied' END,
        'price', p.price_id, 'credits', util.credits(p.credits_micros))
    ELSE
      jsonb_build_object('checkout_session', p_checkout_session,
        'state', CASE WHEN e.status = 'applied' THEN 'applied' WHEN e.status IS NULL THEN 'processing' ELSE e.status END,
        'mode', e.payload #>> '{data,object,mode}', 'price', e.payload #>> '{data,object,metadata,price}')
  END
  FROM (SELECT 1) one
  LEFT JOIN billing.payments p ON p.stripe_payment_intent_id = p_payment_intent
  LEFT JOIN LATERAL (SELECT status, payload FROM billing.stripe_events
                     WHERE type LIKE 'checkout.session.%' AND payload #>> '{data,object,id}' = p_checkout_session
                     ORDER BY (status = 'applied') DESC LIMIT 1) e ON true
$$;

COMMENT ON FUNCTION api.payment_status(p_checkout_session text, p_payment_intent text) IS '/billing/success: whether Stripe''s event for a Checkout Session (or the payment of a one-click top-up''s PaymentIntent) has been applied yet: state applied, processing until it arrives, or ignored/rejected; with mode and price. Nothing is granted here: only the webhook grants.';

REVOKE ALL ON FUNCTION api.payment_status(p_checkout_session text, p_payment_intent text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.payment_status(p_checkout_session text, p_payment_intent text) TO pgtally_api;

CREATE FUNCTION api.plans() RETURNS jsonb
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
  SELECT billing.plans_json()
$$;

COMMENT ON FUNCTION api.plans() IS 'GET /v1/plans (public): billing.plans_json().';

REVOKE ALL ON FUNCTION api.plans() FROM PUBLIC;
GRANT ALL ON FUNCTION api.plans() TO pgtally_api;

CREATE FUNCTION api.principal_account(p_api_key text, p_session_id uuid) RETURNS uuid
    LANGUAGE sql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
  SELECT identity.authenticate(p_api_key, p_session_id, 'usage:read')
$$;

COMMENT ON FUNCTION api.principal_account(p_api_key text, p_session_id uuid) IS 'The account a key or session acts on: the authentication every request makes (SHA-256 of the key, one index probe), alone. bench/http_app.py''s ceiling route calls it, so the HTTP ceiling authenticates exactly as the real path does.';

REVOKE ALL ON FUNCTION api.principal_account(p_api_key text, p_session_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.principal_account(p_api_key text, p_session_id uuid) TO pgtally_api;

CREATE FUNCTION api.provision_account(p_api_key text, p_session_id uuid, p_external_id text, p_name text DEFAULT NULL::text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_owner uuid;
  v_account_id uuid;
  a identity.accounts;
  v_created boolean := false;
BEGIN
  IF p_api_key IS NULL THEN
    PERFORM util.fail('TL403', 'provisioning needs a service key with the accounts:write scope, not an access token');
  END IF;
  v_owner := identity.authenticate(p_api_key, NULL, 'accounts:write');
  IF NOT (SELECT '{service,accounts:write}'::text[] <@ scopes FROM identity.api_keys
          WHERE key_hash = util.token_hash(p_api_key)) THEN
    PERFORM util.fail('TL403', 'provisioning needs a service key with the accounts:write scope');
  END IF;
  IF p_external_id IS NULL OR length(p_external_id) NOT BETWEEN 1 AND 255 OR p_external_id ~ '[[:cntrl:]]' THEN
    PERFORM util.fail('TL422', 'external_id is your id for the person: 1 to 255 characters, no control characters',
                      '{"field": "external_id"}');
  END IF;
  -- One at a time per (service account, external id): concurrent calls make one account.
  PERFORM pg_advisory_xact_lock(hashtextextended('provision:' || v_owner || ':' || p_external_id, 0));
  SELECT * INTO a FROM identity.accounts WHERE provisioned_by = v_owner AND external_id = p_external_id;
  IF NOT FOUND THEN
    v_account_id := identity.new_account('free', 'person', p_name, 0);
    UPDATE identity.accounts SET external_id = p_external_id, provisioned_by = v_owner
    WHERE id = v_account_id RETURNING * INTO a;
    v_created := true;   -- the account row says who provisioned it (provisioned_by) and when
  END IF;
  RETURN jsonb_build_object('account_id', a.id, 'external_id', a.external_id, 'created', v_created,
                            'name', a.name, 'plan', identity.effective_plan(a),
                            'credits', util.credits(a.credit_balance_micros), 'created_at', util.iso(a.created_at));
END $$;

COMMENT ON FUNCTION api.provision_account(p_api_key text, p_session_id uuid, p_external_id text, p_name text) IS 'POST /v1/accounts/provision: for a product with its own auth (its users table, NextAuth, Clerk), create or find the account of the product''s person p_external_id (1 to 255 characters), idempotent per provisioning service account: the first call creates a person account on the free plan (with p_name) and answers created true, every later or concurrent call answers the same account with created false (one advisory transaction lock per external id, and a unique key behind it). The key must hold the scopes service and accounts:write (TL403 otherwise, or for an access token); it then meters on the account''s behalf with account_id (identity.authenticate). TL401 unknown key, TL422 bad external_id or name. Issue 25.';

REVOKE ALL ON FUNCTION api.provision_account(p_api_key text, p_session_id uuid, p_external_id text, p_name text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.provision_account(p_api_key text, p_session_id uuid, p_external_id text, p_name text) TO pgtally_api;

CREATE FUNCTION api.readiness() RETURNS jsonb
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
  SELECT jsonb_build_object('schema', api.schema_version(),
                            'read_only', current_setting('transaction_read_only')::boolean OR pg_is_in_recovery())
$$;

COMMENT ON FUNCTION api.readiness() IS '/readyz: {schema: the newest migration applied (api.schema_version), read_only: whether this session cannot write (default_transaction_read_only set for the server, database or role, or a standby in recovery; writes would fail with SQLSTATE 25006)}.';

REVOKE ALL ON FUNCTION api.readiness() FROM PUBLIC;
GRANT ALL ON FUNCTION api.readiness() TO pgtally_api;

CREATE FUNCTION api.record_meter_summary(p_account_id uuid, p_event_name text, p_day date, p_stripe_units numeric) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  INSERT INTO billing.meter_event_summaries AS s (account_id, event_name, day, stripe_units, checked_at)
  VALUES (p_account_id, p_event_name, p_day, coalesce(p_stripe_units, 0), util.now())
  ON CONFLICT (account_id, event_name, day) DO UPDATE SET stripe_units = EXCLUDED.stripe_units, checked_at = EXCLUDED.checked_at;
END $$;

COMMENT ON FUNCTION api.record_meter_summary(p_account_id uuid, p_event_name text, p_day date, p_stripe_units numeric) IS 'pgtally worker: what Stripe''s meter event summary counts for an account''s meter (event_name) on a UTC day (units); reporting.meter_total_mismatches compares it with what pgtally reported.';

REVOKE ALL ON FUNCTION api.record_meter_summary(p_account_id uuid, p_event_name text, p_day date, p_stripe_units numeric) FROM PUBLIC;
GRANT ALL ON FUNCTION api.record_meter_summary(p_account_id uuid, p_event_name text, p_day date, p_stripe_units numeric) TO pgtally_api;

CREATE FUNCTION api.referrals(p_api_key text, p_session_id uuid, p_public_url text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_account_id uuid := identity.authenticate(p_api_key, p_session_id, 'usage:read');
  u identity.users;
BEGIN
  SELECT * INTO u FROM identity.users WHERE account_id = v_account_id;
  IF NOT FOUND THEN
    PERFORM util.fail('TL40C', 'referrals are for people: sign up first');
  END IF;
  PERFORM ledger.refreshed_account(v_account_id);      -- rewards whose holdback ended are spendable now
  RETURN jsonb_build_object(
    'code', u.referral_code,
    'link', rtrim(p_public_url, '/') || '/r/' || u.referral_code,
    'program', (SELECT jsonb_build_object('qualify_on', qualify_on, 'referrer_credits', util.credits(referrer_reward_micros),
                                          'referee_credits', util.credits(referee_reward_micros),
                                          'holdback_days', extract(day FROM holdback)::integer, 'monthly_cap', monthly_cap)
                FROM billing.referral_program),
    'earned', util.credits(coalesce((SELECT sum(l.amount_micros) FROM billing.referrals r
                                     JOIN ledger.credit_lots l ON l.id = r.referrer_lot_id
                                     WHERE r.referrer_account_id = v_account_id AND l.status IN ('active', 'expired')), 0)::bigint),
    'pending', util.credits(coalesce((SELECT sum(l.amount_micros) FROM billing.referrals r
                                      JOIN ledger.credit_lots l ON l.id = r.referrer_lot_id
                                      WHERE r.referrer_account_id = v_account_id AND l.status = 'pending'), 0)::bigint),
    'referrals', coalesce((
      SELECT jsonb_agg(jsonb_build_object(
               'referee', regexp_replace(coalesce(ru.email, 'an anonymous account'), '^(.)[^@]*', '\1***'),
               'status', r.status, 'rejected_reason', r.rejected_reason,
               'credits', util.credits(l.amount_micros), 'credits_status', l.status,
               'available_at', util.iso(l.available_at),
               'signed_up_at', util.iso(r.created_at), 'qualified_at', util.iso(r.qualified_at),
               'rewarded_at', util.iso(r.rewarded_at)) ORDER BY r.created_at DESC)
      FROM billing.referrals r
      LEFT JOIN identity.users ru ON ru.account_id = r.referee_account_id
      LEFT JOIN ledger.credit_lots l ON l.id = r.referrer_lot_id
      WHERE r.referrer_account_id = v_account_id), '[]'));
END $$;

COMMENT ON FUNCTION api.referrals(p_api_key text, p_session_id uuid, p_public_url text) IS 'GET /v1/referrals: the caller''s referral code and link (p_public_url/r/CODE), the program''s rules, credits earned (spendable) and pending (in the holdback), and each referred account (email masked) with its status (signed_up, qualified, rewarded, rejected and the reason) and its reward. TL40C for accounts without a person (devices, service accounts).';

REVOKE ALL ON FUNCTION api.referrals(p_api_key text, p_session_id uuid, p_public_url text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.referrals(p_api_key text, p_session_id uuid, p_public_url text) TO pgtally_api;

CREATE FUNCTION api.refresh(p_refresh_token text, p_ip text, p_user_agent text) RETURNS jsonb
    LANGUAGE sql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
  SELECT identity.refresh_session(p_refresh_token, NULL, p_ip, p_user_agent)
$$;

COMMENT ON FUNCTION api.refresh(p_refresh_token text, p_ip text, p_user_agent text) IS 'POST /v1/auth/refresh: identity.refresh_session for pgtally''s own sessions (a client''s refresh token goes to /oauth/token with its client_id).';

REVOKE ALL ON FUNCTION api.refresh(p_refresh_token text, p_ip text, p_user_agent text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.refresh(p_refresh_token text, p_ip text, p_user_agent text) TO pgtally_api;

CREATE FUNCTION api.refresh_due_credits() RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_account uuid;
  v_count integer := 0;
BEGIN
  FOR v_account IN SELECT DISTINCT account_id FROM ledger.credit_lots
                   WHERE coalesce(expires_at, available_at) <= util.now()
                     AND (status = 'pending' OR (status = 'active' AND remaining_micros > 0 AND expires_at IS NOT NULL)) LOOP
    PERFORM 1 FROM identity.accounts WHERE id = v_account FOR NO KEY UPDATE;
    IF ledger.refresh_lots(v_account) THEN
      v_count := v_count + 1;
    END IF;
  END LOOP;
  RETURN v_count;
END $$;

COMMENT ON FUNCTION api.refresh_due_credits() IS 'pgtally worker (housekeeping): refresh every account with a lot to release or expire (ledger.refresh_lots), one account lock at a time, as a charge would; returns how many accounts it refreshed.';

REVOKE ALL ON FUNCTION api.refresh_due_credits() FROM PUBLIC;
GRANT ALL ON FUNCTION api.refresh_due_credits() TO pgtally_api;

CREATE FUNCTION api.release_hold(p_api_key text, p_session_id uuid, p_hold_id uuid, p_account_id uuid DEFAULT NULL::uuid) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  a identity.accounts := metering.locked_account(p_api_key, p_session_id, p_account_id);
  h metering.holds;
BEGIN
  SELECT * INTO h FROM metering.holds WHERE id = p_hold_id AND account_id = a.id;
  IF NOT FOUND THEN
    PERFORM util.fail('TL404', 'no such hold');
  ELSIF h.status = 'captured' THEN
    PERFORM util.fail('TL40C', 'the hold was captured: nothing to release', '{"hold_status": "captured"}');
  ELSIF h.status = 'open' THEN
    h := metering.settle_hold(h, 'released');
  END IF;
  RETURN metering.hold_json(h);
END $$;

COMMENT ON FUNCTION api.release_hold(p_api_key text, p_session_id uuid, p_hold_id uuid, p_account_id uuid) IS 'POST /v1/holds/{id}/release: return everything the hold reserved, once (releasing a released or expired hold returns it as it is). TL40C after capture (DETAIL hold_status: captured), TL404 unknown hold.';

REVOKE ALL ON FUNCTION api.release_hold(p_api_key text, p_session_id uuid, p_hold_id uuid, p_account_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.release_hold(p_api_key text, p_session_id uuid, p_hold_id uuid, p_account_id uuid) TO pgtally_api;

CREATE FUNCTION api.release_stuck_auto_topups(p_after interval DEFAULT '00:30:00'::interval) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  r record;
  n integer := 0;
BEGIN
  FOR r IN SELECT t.account_id, t.stripe_payment_intent_id, m.failed_at IS NOT NULL AS failed, m.last_error
           FROM billing.auto_topups t LEFT JOIN outbox.messages m ON m.id = t.task_id
           WHERE t.in_flight_since < util.now() - p_after
             AND (m.id IS NULL OR m.delivered_at IS NOT NULL OR m.failed_at IS NOT NULL)
           ORDER BY t.account_id
  LOOP
    PERFORM billing.auto_topup_failure(r.account_id, CASE
      WHEN r.failed THEN 'the top-up task failed: ' || coalesce(r.last_error, '?')
      ELSE format('no answer from Stripe about %s within %s: released', coalesce(r.stripe_payment_intent_id, 'the payment'), p_after) END);
    n := n + 1;
  END LOOP;
  RETURN n;
END $$;

COMMENT ON FUNCTION api.release_stuck_auto_topups(p_after interval) IS 'pgtally worker housekeeping: release auto top-ups in flight for longer than p_after whose task is settled (Stripe was asked and its payment_intent.succeeded never came, the task gave up, or it is gone), counting each as a failure (three turn auto top-up off). A payment_intent.succeeded arriving later still grants its credits. Queued tasks are left to the outbox''s retries. Returns how many were released.';

REVOKE ALL ON FUNCTION api.release_stuck_auto_topups(p_after interval) FROM PUBLIC;
GRANT ALL ON FUNCTION api.release_stuck_auto_topups(p_after interval) TO pgtally_api;

CREATE FUNCTION api.remove_member(p_session_id uuid, p_account_id uuid, p_user_id uuid) RETURNS jsonb
    LANGUAGE sql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
  SELECT identity.change_membership(p_session_id, p_account_id, p_user_id, NULL)
$$;

COMMENT ON FUNCTION api.remove_member(p_session_id uuid, p_account_id uuid, p_user_id uuid) IS 'DELETE /v1/accounts/{id}/members/{user_id}: remove a member (members:manage) or leave (yourself); the last owner stays (TL40C).';

REVOKE ALL ON FUNCTION api.remove_member(p_session_id uuid, p_account_id uuid, p_user_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.remove_member(p_session_id uuid, p_account_id uuid, p_user_id uuid) TO pgtally_api;

CREATE FUNCTION api.request_password_reset(p_email text, p_ip text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_limited jsonb := identity.throttled('password_reset', p_ip);
  v_email text;
  u identity.users;
BEGIN
  IF v_limited IS NOT NULL THEN
    RETURN v_limited;
  END IF;
  v_email := identity.normalize_email(p_email);
  SELECT * INTO u FROM identity.users WHERE email_normalized = v_email;
  -- A few emails an hour per address (identity.rate_limit_rules); beyond that, and for unknown addresses, the same answer.
  IF u.id IS NOT NULL AND identity.throttled('password_reset', NULL, 'email', v_email) IS NULL THEN
    INSERT INTO outbox.messages (kind, recipient, payload, created_at, next_attempt_at)
    VALUES ('password_reset', v_email,
            jsonb_build_object('email', v_email, 'valid_for', identity.link_lifetime('password_reset'),
                               'token', identity.one_time_token(u.id, 'password_reset',
                                                                identity.link_lifetime('password_reset')::interval)),
            util.now(), util.now());
    PERFORM identity.log_event('password_reset_requested', u.id, u.account_id, NULL, p_ip, NULL);
  END IF;
  RETURN jsonb_build_object('email', v_email, 'status', 'reset_email_sent_if_registered',
                            'valid_for', identity.link_lifetime('password_reset'));
END $$;

COMMENT ON FUNCTION api.request_password_reset(p_email text, p_ip text) IS 'POST /v1/auth/password-reset: queue a reset email (token valid 1 hour) when the address is registered; the same answer otherwise. Emails per address are limited silently, requests per IP with TL429 (identity.rate_limit_rules). TL422 bad email.';

REVOKE ALL ON FUNCTION api.request_password_reset(p_email text, p_ip text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.request_password_reset(p_email text, p_ip text) TO pgtally_api;

CREATE FUNCTION api.reset_password(p_token text, p_new_password_hash text, p_ip text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_limited jsonb := identity.throttled('password_reset_confirm', p_ip);
  v_user_id uuid;
  u identity.users;
  v_count integer;
BEGIN
  IF v_limited IS NOT NULL THEN
    RETURN v_limited;
  END IF;
  v_user_id := identity.claim_one_time_token(p_token, 'password_reset');
  IF v_user_id IS NULL THEN
    RETURN identity.error('TL400', 'the reset link is not valid or has expired');
  END IF;
  PERFORM identity.mark_email_verified(v_user_id);    -- the reset link reached the address
  UPDATE identity.users
  SET password_hash = p_new_password_hash, password_changed_at = util.now()
  WHERE id = v_user_id RETURNING * INTO u;
  UPDATE identity.one_time_tokens SET used_at = util.now()
  WHERE user_id = u.id AND purpose = 'password_reset' AND used_at IS NULL;
  UPDATE identity.sessions SET revoked_at = util.now(), revoked_reason = 'password_reset'
  WHERE user_id = u.id AND revoked_at IS NULL;
  GET DIAGNOSTICS v_count = ROW_COUNT;
  PERFORM identity.log_event('password_reset', u.id, u.account_id, NULL, p_ip, NULL,
                             jsonb_build_object('sessions_revoked', v_count));
  RETURN jsonb_build_object('status', 'password_changed', 'sessions_revoked', v_count);
END $$;

COMMENT ON FUNCTION api.reset_password(p_token text, p_new_password_hash text, p_ip text) IS 'POST /v1/auth/password-reset/confirm: use a reset token (once, within the hour) to set a new password hash; revokes every session (and so every refresh token) of the user and any other reset token. TL400 invalid, used or expired token; TL429 over the per-IP limit (identity.rate_limit_rules).';

REVOKE ALL ON FUNCTION api.reset_password(p_token text, p_new_password_hash text, p_ip text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.reset_password(p_token text, p_new_password_hash text, p_ip text) TO pgtally_api;

CREATE FUNCTION api.reverse_usage(p_api_key text, p_session_id uuid, p_event_id uuid, p_quantity bigint, p_reason text, p_idempotency_key text) RETURNS TABLE(replayed boolean, body jsonb)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  k identity.api_keys;
  v_staff identity.users;
BEGIN
  IF p_api_key IS NOT NULL THEN
    SELECT * INTO k FROM identity.api_keys
    WHERE key_hash = util.token_hash(p_api_key) AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > util.now());
    IF NOT FOUND THEN
      PERFORM util.fail('TL401', 'the API key is not valid');
    ELSIF NOT 'usage:reverse' = ANY (k.scopes) THEN
      PERFORM util.fail('TL403', 'this API key lacks the usage:reverse scope');
    END IF;
  ELSE
    v_staff := identity.staff(p_session_id, 'reverse_usage');
  END IF;
  RETURN QUERY SELECT * FROM metering.reverse_usage(p_event_id, p_quantity, p_reason, p_idempotency_key, v_staff.id, k.id);
END $$;

COMMENT ON FUNCTION api.reverse_usage(p_api_key text, p_session_id uuid, p_event_id uuid, p_quantity bigint, p_reason text, p_idempotency_key text) IS 'POST /v1/usage/events/{id}/reversal: reverse a usage event of any account (metering.reverse_usage). Principal: an operator API key with the usage:reverse scope, or a session of admin staff (identity.staff, action reverse_usage). TL401 bad key or session, TL403 otherwise. Returns (replayed, metering.reversal_json).';

REVOKE ALL ON FUNCTION api.reverse_usage(p_api_key text, p_session_id uuid, p_event_id uuid, p_quantity bigint, p_reason text, p_idempotency_key text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.reverse_usage(p_api_key text, p_session_id uuid, p_event_id uuid, p_quantity bigint, p_reason text, p_idempotency_key text) TO pgtally_api;

CREATE FUNCTION api.revoke_api_key(p_session_id uuid, p_api_key_id uuid, p_account_id uuid DEFAULT NULL::uuid) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  s identity.sessions := identity.key_account(p_session_id, p_account_id);
BEGIN
  UPDATE identity.api_keys SET revoked_at = util.now()
  WHERE id = p_api_key_id AND account_id = s.account_id AND revoked_at IS NULL;
  IF NOT FOUND THEN
    PERFORM util.fail('TL404', 'no such API key');
  END IF;
  PERFORM identity.log_event('api_key_revoked', s.user_id, s.account_id, s.id, NULL, NULL,
                             jsonb_build_object('api_key_id', p_api_key_id));
  RETURN jsonb_build_object('id', p_api_key_id, 'revoked', true);
END $$;

COMMENT ON FUNCTION api.revoke_api_key(p_session_id uuid, p_api_key_id uuid, p_account_id uuid) IS 'DELETE /v1/api-keys/{id}: revoke one of the account''s keys (p_account_id: a team; keys:manage); it stops working at once. TL404 otherwise.';

REVOKE ALL ON FUNCTION api.revoke_api_key(p_session_id uuid, p_api_key_id uuid, p_account_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.revoke_api_key(p_session_id uuid, p_api_key_id uuid, p_account_id uuid) TO pgtally_api;

CREATE FUNCTION api.revoke_invitation(p_session_id uuid, p_account_id uuid, p_invitation_id uuid) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_account_id uuid := identity.authenticate(NULL, p_session_id, 'members:manage', p_account_id);
  i identity.invitations;
BEGIN
  DELETE FROM identity.invitations WHERE id = p_invitation_id AND account_id = v_account_id RETURNING * INTO i;
  IF i.id IS NULL THEN
    PERFORM util.fail('TL404', 'no such invitation');
  END IF;
  RETURN identity.invitation_json(i) || '{"revoked": true}';
END $$;

COMMENT ON FUNCTION api.revoke_invitation(p_session_id uuid, p_account_id uuid, p_invitation_id uuid) IS 'DELETE /v1/accounts/{id}/invitations/{invitation_id}: the link stops working (members:manage). TL404.';

REVOKE ALL ON FUNCTION api.revoke_invitation(p_session_id uuid, p_account_id uuid, p_invitation_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.revoke_invitation(p_session_id uuid, p_account_id uuid, p_invitation_id uuid) TO pgtally_api;

CREATE FUNCTION api.revoke_session(p_session_id uuid, p_target_session_id uuid) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  s identity.sessions := identity.active_session(p_session_id);
BEGIN
  UPDATE identity.sessions x SET revoked_at = util.now(), revoked_reason = 'revoked'
  WHERE x.id = p_target_session_id AND x.revoked_at IS NULL
    AND (x.user_id = s.user_id OR x.id = s.id);
  IF NOT FOUND THEN
    PERFORM util.fail('TL404', 'no such active session of yours');
  END IF;
  PERFORM identity.log_event('session_revoked', s.user_id, s.account_id, s.id, NULL, NULL,
                             jsonb_build_object('revoked_session_id', p_target_session_id));
  RETURN jsonb_build_object('id', p_target_session_id, 'revoked', true);
END $$;

COMMENT ON FUNCTION api.revoke_session(p_session_id uuid, p_target_session_id uuid) IS 'DELETE /v1/me/sessions/{id}: revoke one of the caller''s sessions. TL404 when it is not theirs or not active.';

REVOKE ALL ON FUNCTION api.revoke_session(p_session_id uuid, p_target_session_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.revoke_session(p_session_id uuid, p_target_session_id uuid) TO pgtally_api;

CREATE FUNCTION api.rollup_usage(p_limit integer DEFAULT 50000) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  st metering.rollup_state;
  v_count integer;
  v_last uuid;
  v_first_day date;
  v_pending_day date;
  v_today date;
  v_day date;
BEGIN
  -- One worker at a time: the state row is the lock; a second worker skips.
  SELECT * INTO st FROM metering.rollup_state FOR UPDATE SKIP LOCKED;
  IF NOT FOUND THEN
    RETURN 0;
  END IF;
  CREATE TEMP TABLE IF NOT EXISTS rollup_batch (LIKE metering.usage_events) ON COMMIT DROP;
  TRUNCATE rollup_batch;
  -- In id order (ids are time-ordered), up to the first event less than a minute old: a charge
  -- still committing (its id and created_at are from its start) is never passed over.
  INSERT INTO rollup_batch
  SELECT * FROM metering.usage_events e WHERE e.id > st.last_id ORDER BY e.id LIMIT p_limit;
  DELETE FROM rollup_batch WHERE id >= (SELECT id FROM rollup_batch WHERE created_at >= util.now() - interval '1 minute'
                                        ORDER BY id LIMIT 1);
  SELECT count(*), (array_agg(id ORDER BY id DESC))[1] INTO v_count, v_last FROM rollup_batch;
  INSERT INTO metering.usage_rollup_daily AS r (day, account_id, meter_id, plan_id, events, quantity, credits_micros)
  SELECT (b.created_at AT TIME ZONE 'UTC')::date, b.account_id, b.meter_id, identity.effective_plan(a),
         count(*), sum(b.quantity), sum(b.credits_micros)
  FROM rollup_batch b JOIN identity.accounts a ON a.id = b.account_id
  GROUP BY 1, 2, 3, 4
  ON CONFLICT (day, account_id, meter_id) DO UPDATE SET
    events = r.events + EXCLUDED.events, quantity = r.quantity + EXCLUDED.quantity,
    credits_micros = r.credits_micros + EXCLUDED.credits_micros;
  INSERT INTO metering.usage_rollup_monthly AS r (month, account_id, meter_id, plan_id, events, quantity, credits_micros)
  SELECT date_trunc('month', b.created_at AT TIME ZONE 'UTC')::date, b.account_id, b.meter_id, identity.effective_plan(a),
         count(*), sum(b.quantity), sum(b.credits_micros)
  FROM rollup_batch b JOIN identity.accounts a ON a.id = b.account_id
  GROUP BY 1, 2, 3, 4
  ON CONFLICT (month, account_id, meter_id, plan_id) DO UPDATE SET
    events = r.events + EXCLUDED.events, quantity = r.quantity + EXCLUDED.quantity,
    credits_micros = r.credits_micros + EXCLUDED.credits_micros;
  INSERT INTO metering.usage_rollup_hourly AS r (hour, meter_id, events, quantity)
  SELECT date_trunc('hour', b.created_at, 'UTC'), b.meter_id, count(*), sum(b.quantity)
  FROM rollup_batch b GROUP BY 1, 2
  ON CONFLICT (hour, meter_id) DO UPDATE SET events = r.events + EXCLUDED.events, quantity = r.quantity + EXCLUDED.quantity;
  -- Active accounts per day. A day is final once every event of it is folded in: each is computed
  -- when it completes, and the day the next unfolded event falls on (today, when caught up) is
  -- recomputed each run. Events folded into days already final (a clock moved back) recompute
  -- from their day on, as the 7- and 30-day windows after it include them.
  v_today := (util.now() AT TIME ZONE 'UTC')::date;
  SELECT least((SELECT (e.created_at AT TIME ZONE 'UTC')::date FROM metering.usage_events e
                WHERE e.id > coalesce(v_last, st.last_id) ORDER BY e.id LIMIT 1), v_today)
  INTO v_pending_day;
  v_pending_day := coalesce(v_pending_day, v_today);
  SELECT least((SELECT min((created_at AT TIME ZONE 'UTC')::date) FROM rollup_batch),
               coalesce((SELECT max(day) + 1 FROM metering.active_accounts_daily),
                        (SELECT min(day) FROM metering.usage_rollup_daily)))
  INTO v_first_day;
  v_first_day := least(v_first_day, v_pending_day);
  FOR v_day IN SELECT generate_series(v_first_day, v_pending_day, '1 day')::date LOOP
    INSERT INTO metering.active_accounts_daily AS x (day, dau, wau, mau)
    SELECT v_day,
           count(DISTINCT account_id) FILTER (WHERE day = v_day),
           count(DISTINCT account_id) FILTER (WHERE day > v_day - 7),
           count(DISTINCT account_id)
    FROM metering.usage_rollup_daily WHERE day > v_day - 30 AND day <= v_day
    ON CONFLICT (day) DO UPDATE SET dau = EXCLUDED.dau, wau = EXCLUDED.wau, mau = EXCLUDED.mau;
  END LOOP;
  UPDATE metering.rollup_state SET last_id = coalesce(v_last, last_id), updated_at = util.now();
  RETURN v_count;
END $$;

COMMENT ON FUNCTION api.rollup_usage(p_limit integer) IS 'pgtally worker: fold up to p_limit usage events (after the last one folded, in id order, up to the first one less than a minute old) into metering.usage_rollup_daily, usage_rollup_monthly and usage_rollup_hourly, and compute metering.active_accounts_daily for each day that completed (every event of it folded in) and the day still filling (today, when caught up); returns how many events it folded. One worker at a time (the others return 0). The analytics views read these tables, so they stay fast with millions of events.';

REVOKE ALL ON FUNCTION api.rollup_usage(p_limit integer) FROM PUBLIC;
GRANT ALL ON FUNCTION api.rollup_usage(p_limit integer) TO pgtally_api;

CREATE FUNCTION api.schema_version() RETURNS text
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  RETURN (SELECT max(migration_id) FROM public._yoyo_migration);
END $$;

COMMENT ON FUNCTION api.schema_version() IS '/readyz: the newest migration applied to this database (yoyo''s _yoyo_migration).';

REVOKE ALL ON FUNCTION api.schema_version() FROM PUBLIC;
GRANT ALL ON FUNCTION api.schema_version() TO pgtally_api;

CREATE FUNCTION api.sessions(p_session_id uuid) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  s identity.sessions := identity.active_session(p_session_id);
BEGIN
  RETURN jsonb_build_object('data', coalesce((
    SELECT jsonb_agg(jsonb_build_object('id', x.id, 'current', x.id = s.id, 'method', x.method,
                                        'ip', x.ip, 'user_agent', x.user_agent,
                                        'created_at', util.iso(x.created_at), 'last_used_at', util.iso(x.last_used_at),
                                        'expires_at', util.iso(x.expires_at)) ORDER BY x.created_at DESC)
    FROM identity.sessions x
    WHERE x.revoked_at IS NULL AND x.expires_at > util.now()
      AND (x.user_id = s.user_id OR (s.user_id IS NULL AND x.id = s.id))), '[]'));
END $$;

COMMENT ON FUNCTION api.sessions(p_session_id uuid) IS 'GET /v1/me/sessions: the caller''s active sessions, newest first, marking the current one, with how each began (method: password, google, github, device, device_code).';

REVOKE ALL ON FUNCTION api.sessions(p_session_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.sessions(p_session_id uuid) TO pgtally_api;

CREATE FUNCTION api.set_auto_topup(p_api_key text, p_session_id uuid, p_below text, p_bundle text, p_account_id uuid DEFAULT NULL::uuid) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_account_id uuid := identity.authenticate(p_api_key, p_session_id, 'billing:manage', p_account_id);
  p_below_micros bigint := billing.to_micros(to_jsonb(p_below), 'below');
  t billing.auto_topups;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM billing.prices WHERE id = p_bundle AND active AND credits_micros IS NOT NULL) THEN
    PERFORM util.fail('TL422', format('there is no credit bundle %L', p_bundle), '{"field": "buy"}');
  END IF;
  IF p_below_micros IS NULL OR p_below_micros < 0 THEN
    PERFORM util.fail('TL422', 'below is a non-negative amount of credits', '{"field": "below"}');
  END IF;
  IF NOT EXISTS (SELECT 1 FROM billing.customers WHERE account_id = v_account_id) THEN
    PERFORM util.fail('TL40C', 'buy something once through Checkout first: auto top-up pays with the card saved then');
  END IF;
  PERFORM 1 FROM identity.accounts WHERE id = v_account_id FOR NO KEY UPDATE;
  INSERT INTO billing.auto_topups AS x (account_id, below_micros, price_id, enabled, failures, updated_at)
  VALUES (v_account_id, p_below_micros, p_bundle, true, 0, util.now())
  ON CONFLICT (account_id) DO UPDATE SET below_micros = EXCLUDED.below_micros, price_id = EXCLUDED.price_id,
    enabled = true, failures = 0, last_error = NULL, updated_at = EXCLUDED.updated_at,
    -- Turned on again after being off: whatever was in flight then is forgotten (its task pays nothing).
    in_flight_since = CASE WHEN x.enabled THEN x.in_flight_since END, task_id = CASE WHEN x.enabled THEN x.task_id END
  RETURNING * INTO t;
  UPDATE identity.accounts SET auto_topup_below_micros = p_below_micros WHERE id = v_account_id;
  RETURN billing.auto_topup_json(t);
END $$;

COMMENT ON FUNCTION api.set_auto_topup(p_api_key text, p_session_id uuid, p_below text, p_bundle text, p_account_id uuid) IS 'PUT /v1/billing/auto-topup (permission billing:manage; p_account_id: a team): when a charge leaves the balance below p_below credits (a plain decimal), buy the bundle p_bundle with the saved card (at most one in flight; turning it on after it was off clears a top-up left in flight). Needs a Stripe customer (an earlier Checkout, TL40C). TL422 not a bundle or a negative threshold.';

REVOKE ALL ON FUNCTION api.set_auto_topup(p_api_key text, p_session_id uuid, p_below text, p_bundle text, p_account_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.set_auto_topup(p_api_key text, p_session_id uuid, p_below text, p_bundle text, p_account_id uuid) TO pgtally_api;

CREATE FUNCTION api.set_member_role(p_session_id uuid, p_account_id uuid, p_user_id uuid, p_role text) RETURNS jsonb
    LANGUAGE sql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
  SELECT identity.change_membership(p_session_id, p_account_id, p_user_id, coalesce(p_role, '?'))
$$;

COMMENT ON FUNCTION api.set_member_role(p_session_id uuid, p_account_id uuid, p_user_id uuid, p_role text) IS 'PATCH /v1/accounts/{id}/members/{user_id}: change a member''s role (members:manage; owners only for the owner role; the last owner stays). TL403, TL404, TL40C, TL422.';

REVOKE ALL ON FUNCTION api.set_member_role(p_session_id uuid, p_account_id uuid, p_user_id uuid, p_role text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.set_member_role(p_session_id uuid, p_account_id uuid, p_user_id uuid, p_role text) TO pgtally_api;

CREATE FUNCTION api.set_sso(p_session_id uuid, p_account_id uuid, p_issuer text, p_client_id text, p_client_secret text, p_domains text[], p_require boolean) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
  v_account_id uuid := identity.authenticate(NULL, p_session_id, 'sso:manage', p_account_id);
  v_domains text[];
  v_domain text;
BEGIN
  IF (SELECT kind FROM identity.accounts WHERE id = v_account_id) <> 'team' THEN
    PERFORM util.fail('TL40C', 'single sign-on is set up for a team account');
  END IF;
  IF p_issuer IS NULL OR p_issuer !~ '^https?://\S+$' OR length(p_issuer) > 500 THEN
    PERFORM util.fail('TL422', 'issuer is the provider''s URL (its /.well-known/openid-configuration is read)', '{"field": "issuer"}');
  END IF;
  IF coalesce(length(p_client_id), 0) NOT BETWEEN 1 AND 255 OR coalesce(length(p_client_secret), 0) NOT BETWEEN 1 AND 500 THEN
    PERFORM util.fail('TL422', 'client_id and client_secret from the provider are required', '{"field": "client_id"}');
  END IF;
  SELECT array_agg(DISTINCT lower(btrim(x))) INTO v_domains FROM unnest(p_domains) x;
  IF v_domains IS NULL THEN
    PERFORM util.fail('TL422', 'at least one email domain is required', '{"field": "domains"}');
  END IF;
  FOREACH v_domain IN ARRAY v_domains LOOP
    IF v_domain IS NULL OR v_domain !~ '^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$' OR v_domain NOT LIKE '%.%' THEN
      PERFORM util.fail('TL422', format('%L is not an email domain', v_domain), '{"field": "domains"}');
    ELSIF identity.public_mail_domain(v_domain) THEN
      PERFORM util.fail('TL422', format('%s is a public mail domain: anyone can have an address there, so no team can sign its people in', v_domain),
                        '{"field": "domains"}');
    ELSIF EXISTS (SELECT 1 FROM identity.sso_domains WHERE domain = v_domain AND verified_at IS NOT NULL
                                                     AND account_id <> v_account_id) THEN
      PERFORM util.fail('TL40C', format('%s signs in through another team''s provider', v_domain), '{"field": "domains"}');
    END IF;
  END LOOP;
  PERFORM 1 FROM identity.accounts WHERE id = v_account_id FOR NO KEY UPDATE;
  INSERT INTO identity.sso_connections AS c (account_id, issuer, client_id, client_secret, require_sso, created_at, updated_at)
  VALUES (v_account_id, rtrim(p_issuer, '/'), p_client_id, p_client_secret, coalesce(p_require, false), util.now(), util.now())
  ON CONFLICT (account_id) DO UPDATE SET issuer = EXCLUDED.issuer, client_id = EXCLUDED.client_id,
    client_secret = EXCLUDED.client_secret, require_sso = EXCLUDED.require_sso, updated_at = EXCLUDED.updated_at;
  -- Domains kept keep their proof; new ones start unproven.
  DELETE FROM identity.sso_domains WHERE account_id = v_account_id AND domain <> ALL (v_domains);
  INSERT INTO identity.sso_domains (account_id, domain, verification_token, claimed_at)
  SELECT v_account_id, d, util.random_token(), util.now() FROM unnest(v_domains) d
  ON CONFLICT (account_id, domain) DO NOTHING;
  PERFORM identity.log_event('sso_domain_claimed', NULL, v_account_id, p_session_id, NULL, NULL,
                             jsonb_build_object('domains', to_jsonb(v_domains)));
  RETURN identity.sso_json(v_account_id);
END $_$;

COMMENT ON FUNCTION api.set_sso(p_session_id uuid, p_account_id uuid, p_issuer text, p_client_id text, p_client_secret text, p_domains text[], p_require boolean) IS 'PUT /v1/accounts/{id}/sso (permission sso:manage: owners): the team''s OpenID Connect provider (issuer, client id and secret), the email domains it claims, and whether its members must sign in through it. A claimed domain takes effect only once proven (api.verify_sso_domain: a DNS TXT record; or api.admin_approve_sso_domain); domains kept keep their proof. TL422 bad input or a public mail domain (identity.public_mail_domains), TL40C not a team or a domain another team proved.';

REVOKE ALL ON FUNCTION api.set_sso(p_session_id uuid, p_account_id uuid, p_issuer text, p_client_id text, p_client_secret text, p_domains text[], p_require boolean) FROM PUBLIC;
GRANT ALL ON FUNCTION api.set_sso(p_session_id uuid, p_account_id uuid, p_issuer text, p_client_id text, p_client_secret text, p_domains text[], p_require boolean) TO pgtally_api;

CREATE FUNCTION api.sign_in_methods(p_session_id uuid) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  s identity.sessions := identity.active_session(p_session_id);
BEGIN
  RETURN jsonb_build_object(
    'password', (SELECT password_hash IS NOT NULL FROM identity.users WHERE id = s.user_id),
    'identities', coalesce((SELECT jsonb_agg(jsonb_build_object('provider', i.provider, 'email', i.email,
                                                                'name', identity.identity_name(i.provider, i.email),
                                                                'linked_at', util.iso(i.linked_at),
                                                                'last_sign_in_at', util.iso(i.last_sign_in_at))
                                             ORDER BY i.provider)
                            FROM identity.user_identities i WHERE i.user_id = s.user_id), '[]'));
END $$;

COMMENT ON FUNCTION api.sign_in_methods(p_session_id uuid) IS 'The account page: whether the user has a password, and the linked providers {provider, email, name (identity.identity_name), linked_at, last_sign_in_at}.';

REVOKE ALL ON FUNCTION api.sign_in_methods(p_session_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.sign_in_methods(p_session_id uuid) TO pgtally_api;

CREATE FUNCTION api.signup(p_email text, p_password_hash text, p_ip text, p_user_agent text, p_device_session_id uuid DEFAULT NULL::uuid, p_referral_code text DEFAULT NULL::text, p_fingerprint text DEFAULT NULL::text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_email text := identity.normalize_email(p_email);
  v_limited jsonb := identity.throttled('signup', p_ip, 'email', v_email);
  v_account_id uuid := util.uuid_v7();
  v_user_id uuid;
BEGIN
  IF v_limited IS NOT NULL THEN
    RETURN v_limited;
  END IF;
  INSERT INTO identity.users (account_id, email, email_normalized, password_hash, created_at, password_changed_at)
  VALUES (v_account_id, btrim(p_email), v_email, p_password_hash, util.now(), util.now())
  ON CONFLICT (email_normalized) DO NOTHING
  RETURNING id INTO v_user_id;
  IF v_user_id IS NULL THEN
    -- Registered already: same answer to the caller, an email to the owner instead.
    SELECT id, account_id INTO v_user_id, v_account_id FROM identity.users WHERE email_normalized = v_email;
    INSERT INTO outbox.messages (kind, recipient, payload, created_at, next_attempt_at)
    VALUES ('account_exists', v_email, jsonb_build_object('email', v_email), util.now(), util.now());
    PERFORM identity.log_event('signup_existing_email', v_user_id, v_account_id, NULL, p_ip, p_user_agent);
  ELSE
    PERFORM identity.new_personal_account(v_user_id, v_account_id);
    INSERT INTO outbox.messages (kind, recipient, payload, created_at, next_attempt_at)
    VALUES ('verify_email', v_email,
            jsonb_build_object('email', v_email, 'valid_for', identity.link_lifetime('verify_email'),
                               'token', identity.one_time_token(v_user_id, 'verify_email',
                                                                identity.link_lifetime('verify_email')::interval)),
            util.now(), util.now());
    PERFORM identity.log_event('signup', v_user_id, v_account_id, NULL, p_ip, p_user_agent);
    PERFORM billing.attribute_referral(v_account_id, p_referral_code, p_ip, p_fingerprint,
                                       (SELECT account_id FROM identity.sessions WHERE id = p_device_session_id));
    IF p_device_session_id IS NOT NULL THEN
      PERFORM identity.merge_device(p_device_session_id, v_account_id, p_ip, p_user_agent);
    END IF;
  END IF;
  RETURN jsonb_build_object('email', v_email, 'status', 'verification_email_sent',
                            'valid_for', identity.link_lifetime('verify_email'));
END $$;

COMMENT ON FUNCTION api.signup(p_email text, p_password_hash text, p_ip text, p_user_agent text, p_device_session_id uuid, p_referral_code text, p_fingerprint text) IS 'POST /v1/auth/signup: create a user (argon2id hash computed by the server) with a personal account on the free plan and queue a verification email (valid 24 hours). An address already registered gets the same answer and an account_exists email instead (no enumeration). With the anonymous device''s session, moves its usage and credits to the new account. p_referral_code (and p_fingerprint, a client hint): who referred the person (billing.attribute_referral; an unknown code is ignored). Rate limited per IP and per address (identity.rate_limit_rules, TL429). TL422 bad email.';

REVOKE ALL ON FUNCTION api.signup(p_email text, p_password_hash text, p_ip text, p_user_agent text, p_device_session_id uuid, p_referral_code text, p_fingerprint text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.signup(p_email text, p_password_hash text, p_ip text, p_user_agent text, p_device_session_id uuid, p_referral_code text, p_fingerprint text) TO pgtally_api;

CREATE FUNCTION api.sso(p_session_id uuid, p_account_id uuid, p_delete boolean DEFAULT false) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_account_id uuid := identity.authenticate(NULL, p_session_id, 'sso:manage', p_account_id);
  v jsonb := identity.sso_json(v_account_id);
BEGIN
  IF v IS NULL THEN
    PERFORM util.fail('TL404', 'this team has no single sign-on');
  END IF;
  IF p_delete THEN
    DELETE FROM identity.sso_connections WHERE account_id = v_account_id;
  END IF;
  RETURN v;
END $$;

COMMENT ON FUNCTION api.sso(p_session_id uuid, p_account_id uuid, p_delete boolean) IS 'GET /v1/accounts/{id}/sso (and DELETE, p_delete): the team''s SSO settings (sso:manage). TL404 none.';

REVOKE ALL ON FUNCTION api.sso(p_session_id uuid, p_account_id uuid, p_delete boolean) FROM PUBLIC;
GRANT ALL ON FUNCTION api.sso(p_session_id uuid, p_account_id uuid, p_delete boolean) TO pgtally_api;

CREATE FUNCTION api.sso_available() RETURNS boolean
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  RETURN (SELECT EXISTS (SELECT 1 FROM identity.sso_domains d JOIN identity.sso_connections c ON c.account_id = d.account_id
                         WHERE d.verified_at IS NOT NULL AND NOT identity.public_mail_domain(d.domain)));
END $$;

COMMENT ON FUNCTION api.sso_available() IS '/login and /signup: whether to show the "Single sign-on" form: some team with SSO set up proved a domain (identity.sso_team_of would find it for someone). Stops at the first such domain; no input, no secret.';

REVOKE ALL ON FUNCTION api.sso_available() FROM PUBLIC;
GRANT ALL ON FUNCTION api.sso_available() TO pgtally_api;

CREATE FUNCTION api.sso_flow_config(p_email text, p_account_id uuid DEFAULT NULL::uuid) RETURNS jsonb
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
  SELECT jsonb_build_object('account_id', c.account_id, 'issuer', c.issuer, 'client_id', c.client_id,
                            'client_secret', c.client_secret)
  FROM identity.sso_connections c
  WHERE c.account_id = coalesce(p_account_id, identity.sso_team_of(p_email))
$$;

COMMENT ON FUNCTION api.sso_flow_config(p_email text, p_account_id uuid) IS '/auth/sso/start and its callback: the provider of the team that proved the address''s domain (or of p_account_id): issuer, client id and secret; NULL when none.';

REVOKE ALL ON FUNCTION api.sso_flow_config(p_email text, p_account_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.sso_flow_config(p_email text, p_account_id uuid) TO pgtally_api;

CREATE FUNCTION api.staff_grant(p_email text, p_role text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  u identity.users;
BEGIN
  IF p_role IS NOT NULL AND p_role NOT IN ('support', 'admin') THEN
    PERFORM util.fail('TL422', 'a staff role is support or admin', '{"field": "role"}');
  END IF;
  UPDATE identity.users SET staff_role = p_role WHERE email_normalized = lower(btrim(p_email)) RETURNING * INTO u;
  IF u.id IS NULL THEN
    PERFORM util.fail('TL404', format('no user %s', p_email));
  END IF;
  RETURN jsonb_build_object('email', u.email, 'staff_role', u.staff_role);
END $$;

COMMENT ON FUNCTION api.staff_grant(p_email text, p_role text) IS 'pgtally staff grant EMAIL ROLE (revoke: NULL): make a user staff (support or admin). TL404 unknown user, TL422 bad role. Operators only (not granted to pgtally_api).';

REVOKE ALL ON FUNCTION api.staff_grant(p_email text, p_role text) FROM PUBLIC;

CREATE FUNCTION api.staff_role(p_session_id uuid) RETURNS text
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
  SELECT u.staff_role FROM identity.sessions s JOIN identity.users u ON u.id = s.user_id
  WHERE s.id = p_session_id AND s.revoked_at IS NULL AND s.expires_at > util.now()
$$;

COMMENT ON FUNCTION api.staff_role(p_session_id uuid) IS 'The staff role of a signed-in session''s user (support, admin), NULL for customers: what /admin pages check.';

REVOKE ALL ON FUNCTION api.staff_role(p_session_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.staff_role(p_session_id uuid) TO pgtally_api;

CREATE FUNCTION api.stripe_customer(p_api_key text, p_session_id uuid, p_account_id uuid DEFAULT NULL::uuid) RETURNS text
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_account_id uuid := identity.authenticate(p_api_key, p_session_id, 'billing:manage', p_account_id);
  v_customer text;
BEGIN
  SELECT stripe_customer_id INTO v_customer FROM billing.customers WHERE account_id = v_account_id;
  IF v_customer IS NULL THEN
    PERFORM util.fail('TL404', 'no Stripe customer yet: check out first');
  END IF;
  RETURN v_customer;
END $$;

COMMENT ON FUNCTION api.stripe_customer(p_api_key text, p_session_id uuid, p_account_id uuid) IS 'POST /v1/billing/portal (permission billing:manage; p_account_id: a team): the account''s Stripe customer id. TL404 before the first checkout.';

REVOKE ALL ON FUNCTION api.stripe_customer(p_api_key text, p_session_id uuid, p_account_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.stripe_customer(p_api_key text, p_session_id uuid, p_account_id uuid) TO pgtally_api;

CREATE FUNCTION api.stripe_customer_of(p_account_id uuid) RETURNS text
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
  SELECT stripe_customer_id FROM billing.customers WHERE account_id = p_account_id
$$;

COMMENT ON FUNCTION api.stripe_customer_of(p_account_id uuid) IS 'pgtally worker: the Stripe customer id of an account (NULL when it has none), for the meter events that report its post-paid usage.';

REVOKE ALL ON FUNCTION api.stripe_customer_of(p_account_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.stripe_customer_of(p_account_id uuid) TO pgtally_api;

CREATE FUNCTION api.stripe_thin_event(p_event jsonb) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
  v_id text := p_event ->> 'id';
  v_type text := p_event ->> 'type';
  v_created timestamptz;
  v_status text;
  v_result text;
  v_reason text;
BEGIN
  -- A v2 event (https://docs.stripe.com/api/v2/core/events/object): created is an RFC 3339 string.
  BEGIN
    v_created := (p_event ->> 'created')::timestamptz;
  EXCEPTION WHEN data_exception THEN
    v_created := NULL;
  END;
  v_reason := CASE
    WHEN jsonb_typeof(p_event) <> 'object' OR p_event ->> 'object' IS DISTINCT FROM 'v2.core.event' THEN 'a v2 event object is required'
    WHEN jsonb_typeof(p_event -> 'id') IS DISTINCT FROM 'string' OR v_id !~ '^[A-Za-z0-9_]{1,255}$' THEN
      'id: a Stripe event id (letters, digits and _, at most 255) is required'
    WHEN jsonb_typeof(p_event -> 'type') IS DISTINCT FROM 'string' OR v_type !~ '^[a-z0-9_.]{1,100}$' THEN
      'type: a Stripe event type is required'
    WHEN v_created IS NULL OR v_created > '3000-01-01'::timestamptz THEN 'created: an RFC 3339 time before the year 3000 is required'
  END;
  IF v_reason IS NOT NULL THEN
    RETURN billing.record_rejected(
      CASE WHEN v_id ~ '^[A-Za-z0-9_]{1,255}$' THEN v_id
           ELSE 'rejected:' || encode(sha256(convert_to(p_event::text, 'UTF8')), 'hex') END,
      CASE WHEN jsonb_typeof(p_event -> 'type') = 'string' THEN v_type END, p_event, v_reason);
  END IF;
  PERFORM pg_advisory_xact_lock(hashtextextended('stripe:' || coalesce(p_event #>> '{related_object,id}', v_id), 0));
  SELECT status INTO v_status FROM billing.stripe_events WHERE id = v_id;
  IF FOUND THEN
    RETURN jsonb_build_object('received', true, 'duplicate', true, 'status', v_status, 'event_id', v_id);
  END IF;
  INSERT INTO billing.stripe_events (id, type, created, livemode, payload, received_at, status)
  VALUES (v_id, v_type, v_created, coalesce((p_event ->> 'livemode') = 'true', false), p_event, util.now(), 'ignored');
  BEGIN
    v_result := CASE v_type
      WHEN 'v1.billing.meter.error_report_triggered' THEN billing.apply_meter_error_report(p_event)
      ELSE 'ignored: pgtally does not handle ' || v_type
    END;
  EXCEPTION WHEN data_exception OR check_violation OR not_null_violation THEN
    GET STACKED DIAGNOSTICS v_reason = MESSAGE_TEXT;
    v_result := 'rejected: ' || v_reason;
  END;
  RETURN billing.record_outcome(v_id, v_result, v_reason);
END $_$;

COMMENT ON FUNCTION api.stripe_thin_event(p_event jsonb) IS 'POST /v1/webhooks/stripe for a thin event (object v2.core.event, an event destination''s payload): after the server verified the signature and read the whole event from Stripe (GET /v2/core/events/:id), record it in billing.stripe_events by id (a duplicate returns its recorded status) and apply it: v1.billing.meter.error_report_triggered (billing.apply_meter_error_report); other types are recorded as ignored, a malformed one as rejected. Returns {received, duplicate, status, event_id, reason}.';

REVOKE ALL ON FUNCTION api.stripe_thin_event(p_event jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION api.stripe_thin_event(p_event jsonb) TO pgtally_api;

CREATE FUNCTION api.stripe_webhook(p_event jsonb, p_current jsonb DEFAULT NULL::jsonb, p_lines jsonb DEFAULT NULL::jsonb) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
  v_id text := p_event ->> 'id';
  v_type text := p_event ->> 'type';
  v_object jsonb := p_event -> 'data' -> 'object';
  v_result text;
  v_reason text;
  v_status text;
  v_sub billing.subscriptions;
  v_sub_id text;
BEGIN
  -- The envelope (https://docs.stripe.com/api/events/object). A signed event that breaks it is rejected.
  v_reason := CASE
    WHEN jsonb_typeof(p_event) <> 'object' THEN 'an event is a JSON object'
    WHEN jsonb_typeof(p_event -> 'id') IS DISTINCT FROM 'string' OR v_id !~ '^[A-Za-z0-9_]{1,255}$' THEN
      'id: a Stripe event id (letters, digits and _, at most 255) is required'
    WHEN jsonb_typeof(p_event -> 'type') IS DISTINCT FROM 'string' OR v_type !~ '^[a-z0-9_.]{1,100}$' THEN
      'type: a Stripe event type is required'
    WHEN jsonb_typeof(p_event -> 'created') IS DISTINCT FROM 'number'
         OR (p_event ->> 'created') !~ '^[0-9]{1,11}$' OR (p_event ->> 'created')::bigint > 32503680000 THEN
      'created: a Unix time in seconds before the year 3000 is required'
    WHEN jsonb_typeof(v_object) IS DISTINCT FROM 'object' THEN 'data.object: an object is required'
  END;
  IF v_reason IS NOT NULL THEN
    RETURN billing.record_rejected(
      CASE WHEN v_id ~ '^[A-Za-z0-9_]{1,255}$' THEN v_id
           ELSE 'rejected:' || encode(sha256(convert_to(p_event::text, 'UTF8')), 'hex') END,
      CASE WHEN jsonb_typeof(p_event -> 'type') = 'string' THEN v_type END, p_event, v_reason);
  END IF;
  -- One event about a customer at a time (Stripe delivers concurrently and out of order): a
  -- duplicate waits here and then finds the first one recorded; events about one customer apply
  -- one after another. Taken before any row lock, so it cannot deadlock with them.
  PERFORM pg_advisory_xact_lock(hashtextextended(
    'stripe:' || coalesce(v_object ->> 'customer', v_object ->> 'charge', v_object ->> 'invoice', v_object ->> 'id', v_id), 0));
  SELECT status, note INTO v_status, v_reason FROM billing.stripe_events WHERE id = v_id;
  IF FOUND THEN
    RETURN jsonb_build_object('received', true, 'duplicate', true, 'status', v_status, 'event_id', v_id)
           || CASE WHEN v_status = 'rejected' THEN jsonb_build_object('reason', v_reason) ELSE '{}' END;
  END IF;
  -- Two events about one subscription in the same second (Stripe's resolution): their order is
  -- unknown, so ask the server to re-read the subscription from Stripe and apply that instead.
  IF v_type LIKE 'customer.subscription.%' AND p_current IS NULL THEN
    SELECT * INTO v_sub FROM billing.subscriptions WHERE stripe_subscription_id = v_object ->> 'id';
    IF v_sub.last_event_created = billing.ts(p_event -> 'created') AND v_sub.last_event_id <> v_id THEN
      RETURN jsonb_build_object('received', false, 'status', 'refetch', 'subscription', v_sub.stripe_subscription_id);
    END IF;
  END IF;
  -- An invoice of a subscription whose own events have not arrived (or are being delivered at
  -- the same moment): ask the server for the subscription as Stripe has it now, and apply that first.
  IF v_type LIKE 'invoice.%' THEN
    v_sub_id := coalesce(v_object #>> '{parent,subscription_details,subscription}', v_object ->> 'subscription');
    IF v_sub_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM billing.subscriptions WHERE stripe_subscription_id = v_sub_id) THEN
      IF p_current IS NULL THEN
        RETURN jsonb_build_object('received', false, 'status', 'refetch', 'subscription', v_sub_id);
      ELSIF p_current ->> 'id' IS DISTINCT FROM v_sub_id THEN
        PERFORM util.fail('TL422', 'p_current is not the subscription this invoice bills');
      END IF;
    END IF;
  END IF;
  -- An invoice whose lines do not all fit in the event (Stripe sends the first ones): ask the
  -- server for all of them (GET /v1/invoices/:id/lines), applied in place of the event's.
  IF v_type LIKE 'invoice.%' AND v_object #> '{lines,has_more}' = 'true'::jsonb THEN
    IF p_lines IS NULL THEN
      RETURN jsonb_build_object('received', false, 'status', 'refetch_lines', 'invoice', v_object ->> 'id');
    ELSIF jsonb_typeof(p_lines) <> 'array' THEN
      PERFORM util.fail('TL422', 'p_lines is the array of the invoice''s lines');
    END IF;
  END IF;
  -- The inbox: a redelivered event (even one being applied right now) conflicts here and changes nothing.
  INSERT INTO billing.stripe_events (id, type, created, livemode, payload, received_at, status)
  VALUES (v_id, v_type, billing.ts(p_event -> 'created'), coalesce((p_event ->> 'livemode') = 'true', false),
          p_event, util.now(), 'ignored')
  ON CONFLICT (id) DO NOTHING;
  IF NOT FOUND THEN
    SELECT status INTO v_status FROM billing.stripe_events WHERE id = v_id;
    RETURN jsonb_build_object('received', true, 'duplicate', true, 'status', coalesce(v_status, 'applied'), 'event_id', v_id);
  END IF;
  IF p_lines IS NOT NULL AND v_object #> '{lines,has_more}' = 'true'::jsonb THEN
    p_event := jsonb_set(p_event, '{data,object,lines}',
                         (v_object -> 'lines') || jsonb_build_object('data', p_lines, 'has_more', false));
  END IF;
  BEGIN
    IF v_sub_id IS NOT NULL AND p_current IS NOT NULL THEN
      PERFORM billing.apply_subscription(p_event, p_current);
    END IF;
    v_result := CASE v_type
      WHEN 'checkout.session.completed' THEN billing.apply_checkout_completed(p_event)
      WHEN 'checkout.session.async_payment_succeeded' THEN billing.apply_checkout_completed(p_event)
      WHEN 'checkout.session.expired' THEN billing.apply_checkout_expired(p_event)
      WHEN 'customer.subscription.created' THEN billing.apply_subscription(p_event, p_current)
      WHEN 'customer.subscription.updated' THEN billing.apply_subscription(p_event, p_current)
      WHEN 'customer.subscription.deleted' THEN billing.apply_subscription(p_event, p_current)
      WHEN 'invoice.paid' THEN billing.apply_invoice_paid(p_event)
      WHEN 'invoice.payment_failed' THEN billing.apply_invoice_payment_failed(p_event)
      WHEN 'charge.refunded' THEN billing.apply_charge_refunded(p_event)
      WHEN 'payment_intent.succeeded' THEN billing.apply_payment_intent_succeeded(p_event)
      WHEN 'charge.dispute.created' THEN billing.apply_dispute(p_event)
      WHEN 'charge.dispute.updated' THEN billing.apply_dispute(p_event)
      WHEN 'charge.dispute.closed' THEN billing.apply_dispute(p_event)
      WHEN 'invoice_payment.paid' THEN billing.apply_invoice_payment_paid(p_event)
      ELSE 'ignored: pgtally does not handle ' || v_type
    END;
  EXCEPTION WHEN data_exception OR check_violation OR not_null_violation OR SQLSTATE 'TL422' THEN
    -- A field of the wrong type or out of range (an amount of "abc" or -5, a year 5000 date):
    -- everything the event changed is rolled back to here; it stays recorded as rejected.
    GET STACKED DIAGNOSTICS v_reason = MESSAGE_TEXT;
    v_result := 'rejected: ' || v_reason;
  END;
  RETURN billing.record_outcome(v_id, v_result, v_reason);
END $_$;

COMMENT ON FUNCTION api.stripe_webhook(p_event jsonb, p_current jsonb, p_lines jsonb) IS 'POST /v1/webhooks/stripe, after the server verified the signature: record the event in billing.stripe_events (keyed by Stripe''s id) and apply it in the same transaction. A duplicate returns duplicate = true and its recorded status, changing nothing. Unknown types are recorded as ignored. A malformed event (bad envelope, a field of the wrong type or out of range) is recorded as rejected with the reason and nothing of it applied (status rejected; the API answers 400). Events are applied one customer at a time (a transaction advisory lock on the object''s customer, else its charge, invoice or id), so concurrent deliveries, duplicates included, wait rather than fail; a duplicate returns its recorded status. A subscription event in the same second as the one last applied, and an invoice event whose subscription is not known yet, return status refetch without recording anything: the server re-reads the subscription from Stripe and calls again with it as p_current (applied first, for an invoice). An invoice event whose lines.has_more is true returns status refetch_lines: the server reads all the invoice''s lines from Stripe and calls again with them as p_lines (applied in place of the event''s; the event is recorded as Stripe sent it). Other failures roll everything back (the API answers 500 or 503 and Stripe retries). Returns {received, duplicate, status, event_id, reason}.';

REVOKE ALL ON FUNCTION api.stripe_webhook(p_event jsonb, p_current jsonb, p_lines jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION api.stripe_webhook(p_event jsonb, p_current jsonb, p_lines jsonb) TO pgtally_api;

CREATE FUNCTION api.stripe_webhook_rejected(p_body_sha256 text, p_reason text) RETURNS jsonb
    LANGUAGE sql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
  SELECT billing.record_rejected('rejected:' || left(p_body_sha256, 64), NULL, NULL, p_reason)
$$;

COMMENT ON FUNCTION api.stripe_webhook_rejected(p_body_sha256 text, p_reason text) IS 'POST /v1/webhooks/stripe, for a validly signed body that is not readable JSON (not UTF-8, too deeply nested, a NUL character): record it as rejected under the id rejected:<SHA-256 of the body> with the reason. The API answers 400.';

REVOKE ALL ON FUNCTION api.stripe_webhook_rejected(p_body_sha256 text, p_reason text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.stripe_webhook_rejected(p_body_sha256 text, p_reason text) TO pgtally_api;

CREATE FUNCTION api.team_page(p_session_id uuid, p_account_id uuid) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_team jsonb;
BEGIN
  SELECT a INTO v_team FROM jsonb_array_elements(api.accounts(p_session_id) -> 'data') a
  WHERE a ->> 'id' = p_account_id::text;
  IF v_team IS NULL THEN
    PERFORM util.fail('TL403', 'you are not a member of this account');
  END IF;
  RETURN jsonb_build_object('team', v_team,
                            'members', api.members(p_session_id, p_account_id) -> 'data',
                            'invitations', api.invitations(p_session_id, p_account_id) -> 'data');
END $$;

COMMENT ON FUNCTION api.team_page(p_session_id uuid, p_account_id uuid) IS 'GET /teams/{id}: the team as the person''s account list shows it (api.accounts), its members (api.members) and pending invitations (api.invitations). TL401 signed out, TL403 not a member.';

REVOKE ALL ON FUNCTION api.team_page(p_session_id uuid, p_account_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.team_page(p_session_id uuid, p_account_id uuid) TO pgtally_api;

CREATE FUNCTION api.team_sso_page(p_session_id uuid, p_account_id uuid) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_account_id uuid := identity.authenticate(NULL, p_session_id, 'sso:manage', p_account_id);
BEGIN
  RETURN jsonb_build_object('team', (SELECT jsonb_build_object('id', a.id, 'name', a.name, 'kind', a.kind)
                                     FROM identity.accounts a WHERE a.id = v_account_id),
                            'sso', identity.sso_json(v_account_id));
END $$;

COMMENT ON FUNCTION api.team_sso_page(p_session_id uuid, p_account_id uuid) IS 'GET /teams/{id}/sso: the team (id, name, kind) and its SSO settings as GET /v1/accounts/{id}/sso shows them (identity.sso_json: issuer, client id, domains with their verification and TXT record; never the secret), null when none. Permission sso:manage (owners). TL401 signed out, TL403 not an owner.';

REVOKE ALL ON FUNCTION api.team_sso_page(p_session_id uuid, p_account_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.team_sso_page(p_session_id uuid, p_account_id uuid) TO pgtally_api;

CREATE FUNCTION api.upgrade_page(p_session_id uuid, p_account_id uuid) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_billing jsonb;
BEGIN
  IF p_session_id IS NOT NULL THEN
    BEGIN
      v_billing := api.billing_account(NULL, p_session_id, p_account_id);
    EXCEPTION WHEN SQLSTATE 'TL401' OR SQLSTATE 'TL403' OR SQLSTATE 'TL404' THEN
      v_billing := NULL;                  -- signed out since, or a role that may not buy: the catalog only
    END;
  END IF;
  RETURN jsonb_build_object('catalog', api.plans(), 'billing', v_billing);
END $$;

COMMENT ON FUNCTION api.upgrade_page(p_session_id uuid, p_account_id uuid) IS 'GET /upgrade: the catalog (api.plans) and, for a signed-in buyer (p_session_id, acting on p_account_id), the billing state that marks the current plan (api.billing_account; null when signed out or not allowed).';

REVOKE ALL ON FUNCTION api.upgrade_page(p_session_id uuid, p_account_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.upgrade_page(p_session_id uuid, p_account_id uuid) TO pgtally_api;

CREATE FUNCTION api.usage_events(p_api_key text, p_session_id uuid, p_cursor text DEFAULT NULL::text, p_limit integer DEFAULT 20, p_meter text DEFAULT NULL::text, p_from timestamp with time zone DEFAULT NULL::timestamp with time zone, p_to timestamp with time zone DEFAULT NULL::timestamp with time zone, p_account_id uuid DEFAULT NULL::uuid, p_api_key_id uuid DEFAULT NULL::uuid, p_user_id uuid DEFAULT NULL::uuid) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
  v_account_id uuid := identity.authenticate(p_api_key, p_session_id, 'usage:read', p_account_id);
  v_before uuid;
  v_rows jsonb;
  v_more boolean;
  v_last uuid;
BEGIN
  IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 100 THEN
    PERFORM util.fail('TL422', 'limit must be between 1 and 100');
  END IF;
  IF p_cursor IS NOT NULL AND p_cursor !~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
    PERFORM util.fail('TL422', 'cursor is not one this API returned');
  END IF;
  v_before := coalesce(p_cursor::uuid, 'ffffffff-ffff-ffff-ffff-ffffffffffff');
  -- Ids are time-ordered UUIDs (version 7): newest first is id order.
  SELECT jsonb_agg(metering.event_json(p) ORDER BY p.id DESC), (array_agg(p.id ORDER BY p.id))[1]
  INTO v_rows, v_last
  FROM (SELECT * FROM metering.usage_events e
        WHERE e.account_id = v_account_id AND e.id < v_before AND (p_meter IS NULL OR e.meter_id = p_meter)
          AND (p_from IS NULL OR e.created_at >= p_from) AND (p_to IS NULL OR e.created_at < p_to)
          AND (p_api_key_id IS NULL OR e.api_key_id = p_api_key_id) AND (p_user_id IS NULL OR e.user_id = p_user_id)
        ORDER BY e.id DESC LIMIT p_limit) p;
  v_more := v_last IS NOT NULL AND EXISTS (
    SELECT 1 FROM metering.usage_events e
    WHERE e.account_id = v_account_id AND e.id < v_last AND (p_meter IS NULL OR e.meter_id = p_meter)
      AND (p_from IS NULL OR e.created_at >= p_from) AND (p_to IS NULL OR e.created_at < p_to)
      AND (p_api_key_id IS NULL OR e.api_key_id = p_api_key_id) AND (p_user_id IS NULL OR e.user_id = p_user_id));
  RETURN jsonb_build_object('data', coalesce(v_rows, '[]'), 'has_more', v_more,
                            'next_cursor', CASE WHEN v_more THEN v_last::text END);
END $_$;

COMMENT ON FUNCTION api.usage_events(p_api_key text, p_session_id uuid, p_cursor text, p_limit integer, p_meter text, p_from timestamp with time zone, p_to timestamp with time zone, p_account_id uuid, p_api_key_id uuid, p_user_id uuid) IS 'GET /v1/usage/events: the caller''s usage events, newest first (metering.event_json), p_limit (1-100) per page, optionally of one meter, within [p_from, p_to), of one API key (p_api_key_id) and of one member (p_user_id); pass next_cursor back as p_cursor. Returns {data, has_more, next_cursor}. Principal as api.balance. TL422 bad limit or cursor.';

REVOKE ALL ON FUNCTION api.usage_events(p_api_key text, p_session_id uuid, p_cursor text, p_limit integer, p_meter text, p_from timestamp with time zone, p_to timestamp with time zone, p_account_id uuid, p_api_key_id uuid, p_user_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION api.usage_events(p_api_key text, p_session_id uuid, p_cursor text, p_limit integer, p_meter text, p_from timestamp with time zone, p_to timestamp with time zone, p_account_id uuid, p_api_key_id uuid, p_user_id uuid) TO pgtally_api;

CREATE FUNCTION api.verify_email(p_token text, p_ip text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_limited jsonb := identity.throttled('verify_email', p_ip);
  v_user_id uuid;
  u identity.users;
BEGIN
  IF v_limited IS NOT NULL THEN
    RETURN v_limited;
  END IF;
  v_user_id := identity.claim_one_time_token(p_token, 'verify_email');
  IF v_user_id IS NULL THEN
    RETURN identity.error('TL400', 'the verification link is not valid or has expired');
  END IF;
  PERFORM identity.mark_email_verified(v_user_id);
  SELECT * INTO u FROM identity.users WHERE id = v_user_id;
  PERFORM identity.log_event('email_verified', u.id, u.account_id, NULL, p_ip, NULL);
  RETURN jsonb_build_object('email', u.email, 'email_verified', true);
END $$;

COMMENT ON FUNCTION api.verify_email(p_token text, p_ip text) IS 'POST /v1/auth/verify-email: use a verification token (once, within 24 hours) to mark the email verified (identity.mark_email_verified: the sign-up bonus, a referral that qualifies on it). TL400 invalid, used or expired token; TL429 over the per-IP limit (identity.rate_limit_rules).';

REVOKE ALL ON FUNCTION api.verify_email(p_token text, p_ip text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.verify_email(p_token text, p_ip text) TO pgtally_api;

CREATE FUNCTION api.verify_sso_domain(p_session_id uuid, p_account_id uuid, p_domain text, p_txt_records text[]) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_account_id uuid := identity.authenticate(NULL, p_session_id, 'sso:manage', p_account_id);
  d identity.sso_domains;
BEGIN
  SELECT * INTO d FROM identity.sso_domains WHERE account_id = v_account_id AND domain = lower(btrim(p_domain)) FOR UPDATE;
  IF NOT FOUND THEN
    PERFORM util.fail('TL404', 'this team has not claimed that domain: add it to the SSO settings first');
  ELSIF d.verified_at IS NOT NULL OR p_txt_records IS NULL THEN
    RETURN identity.sso_json(v_account_id);
  ELSIF identity.sso_txt_value(d.verification_token) <> ALL (p_txt_records) THEN
    PERFORM util.fail('TL422', format('no TXT record on %s carries this team''s token yet (DNS changes can take a while to be seen)', d.domain),
                      jsonb_build_object('field', 'domain', 'txt_record',
                                         jsonb_build_object('name', d.domain, 'value', identity.sso_txt_value(d.verification_token))));
  END IF;
  BEGIN
    UPDATE identity.sso_domains SET verified_at = util.now(), verified_by = 'dns'
    WHERE account_id = d.account_id AND domain = d.domain;
  EXCEPTION WHEN unique_violation THEN
    PERFORM util.fail('TL40C', format('%s signs in through another team''s provider', d.domain), '{"field": "domain"}');
  END;
  PERFORM identity.log_event('sso_domain_verified', NULL, v_account_id, p_session_id, NULL, NULL,
                             jsonb_build_object('domain', d.domain, 'by', 'dns'));
  RETURN identity.sso_json(v_account_id);
END $$;

COMMENT ON FUNCTION api.verify_sso_domain(p_session_id uuid, p_account_id uuid, p_domain text, p_txt_records text[]) IS 'POST /v1/accounts/{id}/sso/domains/{domain}/verify (sso:manage). Called first with p_txt_records NULL: checks the caller may and the domain is claimed (the server asks DNS only then), returns the settings. Then the server looked up the TXT records of the domain (p_txt_records, through DNS) and this decides: one of them equal to identity.sso_txt_value(token) proves the claim, and the domain takes effect. Idempotent for a proven domain. TL404 not claimed by this team, TL422 no matching record (detail names the record to publish), TL40C another team proved it first.';

REVOKE ALL ON FUNCTION api.verify_sso_domain(p_session_id uuid, p_account_id uuid, p_domain text, p_txt_records text[]) FROM PUBLIC;
GRANT ALL ON FUNCTION api.verify_sso_domain(p_session_id uuid, p_account_id uuid, p_domain text, p_txt_records text[]) TO pgtally_api;

CREATE FUNCTION billing.account_mrr(p_account_id uuid, OUT currency text, OUT mrr_minor numeric, OUT plan_id text) RETURNS record
    LANGUAGE sql STABLE
    AS $$
  SELECT coalesce(max(p.currency),
                  (SELECT x.currency FROM billing.subscriptions s2 JOIN billing.prices x ON x.id = s2.price_id
                   WHERE s2.account_id = p_account_id ORDER BY s2.updated_at DESC LIMIT 1), 'usd'),
         coalesce(sum(CASE p.interval WHEN 'year' THEN p.amount_minor / 12.0 ELSE p.amount_minor END), 0),
         max(s.plan_id)
  FROM billing.subscriptions s JOIN billing.prices p ON p.id = s.price_id
  WHERE s.account_id = p_account_id AND s.status IN ('active', 'past_due') AND p.usage_type = 'licensed'
$$;

COMMENT ON FUNCTION billing.account_mrr(p_account_id uuid, OUT currency text, OUT mrr_minor numeric, OUT plan_id text) IS 'An account''s monthly recurring revenue now: its active and past_due licensed subscription prices (minor units; yearly ones / 12), the currency and plan.';

REVOKE ALL ON FUNCTION billing.account_mrr(p_account_id uuid, OUT currency text, OUT mrr_minor numeric, OUT plan_id text) FROM PUBLIC;

CREATE FUNCTION billing.account_of(p_account_hint text, p_customer text) RETURNS uuid
    LANGUAGE sql STABLE
    AS $_$
  SELECT coalesce(
    (SELECT coalesce(a.merged_into, a.id) FROM identity.accounts a
     WHERE p_account_hint ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
       AND a.id = p_account_hint::uuid),
    (SELECT c.account_id FROM billing.customers c WHERE c.stripe_customer_id = p_customer))
$_$;

COMMENT ON FUNCTION billing.account_of(p_account_hint text, p_customer text) IS 'The account a Stripe object belongs to: its account_id metadata (or client_reference_id) when it names an account (the user it was merged into, for a device that signed up since), else the owner of its customer.';

REVOKE ALL ON FUNCTION billing.account_of(p_account_hint text, p_customer text) FROM PUBLIC;

CREATE FUNCTION billing.apply_charge_refunded(p_event jsonb) RETURNS text
    LANGUAGE plpgsql
    AS $$
DECLARE
  o jsonb := p_event -> 'data' -> 'object';
  v_refunded bigint := (o ->> 'amount_refunded')::bigint;
  p billing.payments;
  v_target bigint;
  v_delta bigint;
  v_take bigint;
  v_invoice text := billing.apply_invoice_refund(o);
BEGIN
  IF v_invoice IS NOT NULL THEN
    RETURN v_invoice;
  END IF;
  -- A referral reward this payment earned is canceled if it is still in its holdback.
  PERFORM billing.cancel_referral_reward(o ->> 'payment_intent');
  SELECT * INTO p FROM billing.payments WHERE stripe_payment_intent_id = o ->> 'payment_intent';
  IF NOT FOUND THEN
    RETURN 'ignored: not a payment pgtally recorded (listed in reporting.unmatched_refunds)';
  END IF;
  PERFORM 1 FROM identity.accounts WHERE id = p.account_id FOR NO KEY UPDATE;
  SELECT * INTO p FROM billing.payments WHERE stripe_payment_intent_id = p.stripe_payment_intent_id FOR UPDATE;
  IF v_refunded IS NULL OR v_refunded <= p.refunded_minor THEN
    RETURN 'stale';
  END IF;
  -- Credits to take back, in proportion to the amount refunded so far.
  v_target := CASE WHEN p.amount_minor = 0 THEN p.credits_micros
                   ELSE (p.credits_micros::numeric * least(v_refunded, p.amount_minor) / p.amount_minor)::bigint END;
  v_delta := v_target - p.clawed_back_micros - p.shortfall_micros;
  SELECT least(v_delta, credit_balance_micros - held_micros) INTO v_take FROM identity.accounts WHERE id = p.account_id;
  IF v_take > 0 THEN
    -- From the lot this payment bought first, then in the burn order.
    PERFORM ledger.post_transfer(p.account_id, 'purchases', -v_take, 'refund',
                                 'refund:' || p.stripe_payment_intent_id || ':' || v_refunded, NULL,
                                 'refund of ' || coalesce(p.price_id, 'a bundle'),
                                 p_first_lot => (SELECT l.id FROM ledger.credit_lots l
                                                 WHERE l.account_id = p.account_id
                                                   AND l.grant_key IN ('checkout:' || p.stripe_checkout_session,
                                                                       'payment_intent:' || p.stripe_payment_intent_id)
                                                 LIMIT 1));
  END IF;
  UPDATE billing.payments
  SET refunded_minor = v_refunded, clawed_back_micros = clawed_back_micros + greatest(v_take, 0),
      shortfall_micros = shortfall_micros + greatest(v_delta - greatest(v_take, 0), 0)
  WHERE stripe_payment_intent_id = p.stripe_payment_intent_id;
  RETURN 'applied';
END $$;

COMMENT ON FUNCTION billing.apply_charge_refunded(p_event jsonb) IS 'charge.refunded: a subscription invoice''s payment is billing.apply_invoice_refund''s. Otherwise a referral reward the payment earned is canceled inside its holdback (billing.cancel_referral_reward); for a bundle payment, take back the credits in proportion to amount_refunded (from the lot it bought first, then in the burn order), never below a zero balance; what could not be taken is added to billing.payments.shortfall_micros. Partial refunds apply their increase only.';

REVOKE ALL ON FUNCTION billing.apply_charge_refunded(p_event jsonb) FROM PUBLIC;

CREATE FUNCTION billing.apply_checkout_completed(p_event jsonb) RETURNS text
    LANGUAGE plpgsql
    AS $$
DECLARE
  o jsonb := p_event -> 'data' -> 'object';
  v_account_id uuid := billing.account_of(coalesce(o ->> 'client_reference_id', o -> 'metadata' ->> 'account_id'),
                                          o ->> 'customer');
  v_price billing.prices;
  v_payment text;
BEGIN
  IF v_account_id IS NULL THEN
    RETURN 'ignored: checkout session names no pgtally account';
  END IF;
  PERFORM 1 FROM identity.accounts WHERE id = v_account_id FOR NO KEY UPDATE;
  IF o ->> 'customer' IS NOT NULL THEN
    INSERT INTO billing.customers (account_id, stripe_customer_id, created_at)
    VALUES (v_account_id, o ->> 'customer', util.now())
    ON CONFLICT DO NOTHING;
  END IF;
  UPDATE billing.checkout_sessions SET status = 'complete', closed_at = util.now()
  WHERE stripe_checkout_session_id = o ->> 'id' AND status <> 'complete';
  IF o ->> 'mode' <> 'payment' THEN
    RETURN 'applied';          -- subscriptions: their own events carry the state
  END IF;
  IF o ->> 'payment_status' <> 'paid' THEN
    RETURN 'ignored: payment not completed (' || coalesce(o ->> 'payment_status', '?') || ')';
  END IF;
  SELECT * INTO v_price FROM billing.prices WHERE id = o -> 'metadata' ->> 'price' AND credits_micros IS NOT NULL;
  IF NOT FOUND THEN
    RETURN 'ignored: checkout session names no credit bundle';
  END IF;
  INSERT INTO billing.payments (stripe_payment_intent_id, account_id, stripe_checkout_session, price_id,
                                amount_minor, currency, credits_micros, paid_at, tax_minor)
  VALUES (coalesce(o ->> 'payment_intent', o ->> 'id'), v_account_id, o ->> 'id', v_price.id,
          coalesce((o ->> 'amount_total')::bigint, v_price.amount_minor), coalesce(o ->> 'currency', v_price.currency),
          v_price.credits_micros, billing.ts(p_event -> 'created'), coalesce((o #>> '{total_details,amount_tax}')::bigint, 0))
  ON CONFLICT DO NOTHING
  RETURNING stripe_payment_intent_id INTO v_payment;
  IF v_payment IS NULL THEN
    RETURN 'ignored: this payment was already credited';
  END IF;
  PERFORM ledger.post_transfer(v_account_id, 'purchases', v_price.credits_micros, 'purchase',
                               'checkout:' || (o ->> 'id'), NULL, v_price.name);
  PERFORM billing.first_payment(v_account_id, v_payment);
  PERFORM billing.email_receipt(v_payment);
  RETURN 'applied';
END $$;

COMMENT ON FUNCTION billing.apply_checkout_completed(p_event jsonb) IS 'checkout.session.completed and checkout.session.async_payment_succeeded (delayed payment methods): link the Stripe customer to the account; for a paid bundle, record the payment (with its tax: total_details.amount_tax) and grant its credits (once per session).';

REVOKE ALL ON FUNCTION billing.apply_checkout_completed(p_event jsonb) FROM PUBLIC;

CREATE FUNCTION billing.apply_checkout_expired(p_event jsonb) RETURNS text
    LANGUAGE plpgsql
    AS $$
BEGIN
  UPDATE billing.checkout_sessions SET status = 'expired', closed_at = util.now()
  WHERE stripe_checkout_session_id = p_event #>> '{data,object,id}' AND status = 'open';
  RETURN CASE WHEN FOUND THEN 'applied' ELSE 'ignored: not an open session pgtally opened' END;
END $$;

COMMENT ON FUNCTION billing.apply_checkout_expired(p_event jsonb) IS 'checkout.session.expired: the session can no longer be paid (Stripe expired it after 24 hours, or pgtally asked because a newer one replaced it): close it in billing.checkout_sessions.';

REVOKE ALL ON FUNCTION billing.apply_checkout_expired(p_event jsonb) FROM PUBLIC;

CREATE FUNCTION billing.apply_dispute(p_event jsonb) RETURNS text
    LANGUAGE plpgsql
    AS $$
DECLARE
  o jsonb := p_event -> 'data' -> 'object';
  v_account_id uuid;
BEGIN
  -- A Dispute names no customer (API 2026-10-28): find the payment pgtally recorded, by
  -- PaymentIntent (bundles and top-ups, subscription invoice payments) or charge.
  SELECT account_id INTO v_account_id FROM billing.payments WHERE stripe_payment_intent_id = o ->> 'payment_intent';
  IF v_account_id IS NULL THEN
    SELECT account_id INTO v_account_id FROM billing.invoice_payments
    WHERE stripe_payment_intent_id = o ->> 'payment_intent' OR stripe_charge_id = o ->> 'charge'
    LIMIT 1;
  END IF;
  IF v_account_id IS NULL THEN
    SELECT account_id INTO v_account_id FROM billing.customers
    WHERE stripe_customer_id = o #>> '{evidence_details,customer}' OR stripe_customer_id = o ->> 'customer';
  END IF;
  INSERT INTO billing.disputes AS d (stripe_dispute_id, account_id, stripe_charge_id, stripe_payment_intent_id,
                                     amount_minor, currency, reason, status, created_at, closed_at)
  VALUES (o ->> 'id', v_account_id, o ->> 'charge', o ->> 'payment_intent', (o ->> 'amount')::bigint,
          lower(o ->> 'currency'), left(o ->> 'reason', 100), left(coalesce(o ->> 'status', 'needs_response'), 50),
          coalesce(billing.ts(o -> 'created'), billing.ts(p_event -> 'created')),
          CASE WHEN p_event ->> 'type' = 'charge.dispute.closed' THEN billing.ts(p_event -> 'created') END)
  ON CONFLICT (stripe_dispute_id) DO UPDATE SET
    status = EXCLUDED.status, amount_minor = EXCLUDED.amount_minor,
    closed_at = coalesce(EXCLUDED.closed_at, d.closed_at), account_id = coalesce(d.account_id, EXCLUDED.account_id);
  RETURN 'applied';
END $$;

COMMENT ON FUNCTION billing.apply_dispute(p_event jsonb) IS 'charge.dispute.created, .updated, .closed: record the dispute once (billing.disputes) with Stripe''s latest status, amount (minor units) and reason; closed sets closed_at. A Dispute names no customer: the account is found through the payment pgtally recorded (a bundle''s PaymentIntent, a subscription invoice''s PaymentIntent or charge in billing.invoice_payments), else a customer an older API version named.';

REVOKE ALL ON FUNCTION billing.apply_dispute(p_event jsonb) FROM PUBLIC;

CREATE FUNCTION billing.apply_invoice_paid(p_event jsonb) RETURNS text
    LANGUAGE plpgsql
    AS $$
DECLARE
  o jsonb := p_event -> 'data' -> 'object';
  s billing.subscriptions := billing.subscription_of_invoice(o);
  -- The period the invoice opens is its latest line's (metered lines bill the period before).
  v_line jsonb := (SELECT l -> 'period' FROM jsonb_array_elements(o -> 'lines' -> 'data') l
                   ORDER BY (l #>> '{period,end}')::bigint DESC NULLS LAST LIMIT 1);
  v_start timestamptz := billing.ts(v_line -> 'start');
  v_end timestamptz := billing.ts(v_line -> 'end');
  v_credits bigint;
BEGIN
  IF s.stripe_subscription_id IS NULL THEN
    RETURN billing.record_payment_invoice(o, billing.ts(p_event -> 'created'));
  END IF;
  PERFORM 1 FROM identity.accounts WHERE id = s.account_id FOR NO KEY UPDATE;
  PERFORM billing.record_invoice(o, s, 'paid', billing.ts(p_event -> 'created'));
  -- Which PaymentIntent paid it (the only link a later refund or dispute has to it).
  PERFORM billing.record_invoice_payment(ip, s.account_id) FROM jsonb_array_elements(
    CASE WHEN jsonb_typeof(o #> '{payments,data}') = 'array' THEN o #> '{payments,data}' ELSE '[]' END) ip;
  IF EXISTS (SELECT 1 FROM billing.duplicate_subscriptions WHERE stripe_subscription_id = s.stripe_subscription_id) THEN
    RETURN 'applied: a duplicate subscription''s invoice, recorded to be refunded';
  END IF;
  -- A new period starts: allowances counted per billing period start from zero in it.
  UPDATE billing.subscriptions
  SET current_period_start = v_start, current_period_end = v_end, updated_at = util.now()
  WHERE stripe_subscription_id = s.stripe_subscription_id
    AND v_end > v_start AND (current_period_end IS NULL OR v_end > current_period_end);
  UPDATE identity.accounts SET plan_grace_until = NULL WHERE id = s.account_id;
  PERFORM billing.sync_account_plan(s.account_id);
  IF (o ->> 'amount_paid')::bigint > 0 THEN
    PERFORM billing.first_payment(s.account_id, coalesce(o ->> 'payment_intent', o ->> 'id'));
  END IF;
  SELECT included_credits_micros INTO v_credits FROM billing.plans WHERE id = s.plan_id;
  IF v_credits > 0 AND NOT EXISTS (SELECT 1 FROM ledger.transfers
                                   WHERE account_id = s.account_id AND idempotency_key = 'invoice:' || (o ->> 'id')) THEN
    PERFORM ledger.post_transfer(s.account_id, 'purchases', v_credits, 'plan_credits', 'invoice:' || (o ->> 'id'),
                                 NULL, 'credits included in the ' || s.plan_id || ' plan');
  END IF;
  RETURN 'applied';
END $$;

COMMENT ON FUNCTION billing.apply_invoice_paid(p_event jsonb) IS 'invoice.paid for a subscription: record the invoice once (billing.invoices, with its metered lines: the post-paid usage Stripe billed) and the payments that paid it (payments.data: billing.invoice_payments); move the subscription and account to the invoiced period (its latest line''s; never backwards), which resets billing-period allowances; end any payment grace; grant the plan''s included credits once per invoice. A duplicate subscription''s invoice is recorded (to be refunded) and nothing else; the invoice of a one-time payment is billing.record_payment_invoice''s.';

REVOKE ALL ON FUNCTION billing.apply_invoice_paid(p_event jsonb) FROM PUBLIC;

CREATE FUNCTION billing.apply_invoice_payment_failed(p_event jsonb) RETURNS text
    LANGUAGE plpgsql
    AS $$
DECLARE
  o jsonb := p_event -> 'data' -> 'object';
  s billing.subscriptions := billing.subscription_of_invoice(o);
BEGIN
  IF s.stripe_subscription_id IS NULL THEN
    RETURN 'ignored: not a subscription invoice';
  END IF;
  PERFORM 1 FROM identity.accounts WHERE id = s.account_id FOR NO KEY UPDATE;
  -- Delivered after the invoice.paid of a retry that succeeded (Stripe does not order deliveries).
  IF EXISTS (SELECT 1 FROM billing.invoices WHERE stripe_invoice_id = o ->> 'id' AND status IN ('paid', 'refunded')) THEN
    RETURN 'stale';
  END IF;
  PERFORM billing.record_invoice(o, s, 'open', NULL);
  UPDATE identity.accounts
  SET plan_grace_until = coalesce(plan_grace_until, billing.ts(p_event -> 'created') + interval '7 days')
  WHERE id = s.account_id;
  -- The customer hears of it once per invoice (Stripe retries the payment and sends this again).
  IF NOT EXISTS (SELECT 1 FROM outbox.messages WHERE kind = 'payment_failed' AND payload ->> 'invoice' = o ->> 'id') THEN
    PERFORM billing.email_account(s.account_id, 'payment_failed', jsonb_build_object(
      'invoice', o ->> 'id', 'amount', billing.money(coalesce((o ->> 'amount_due')::bigint, 0), coalesce(o ->> 'currency', 'usd')),
      'grace_until', (SELECT to_char(plan_grace_until AT TIME ZONE 'UTC', 'YYYY-MM-DD') FROM identity.accounts WHERE id = s.account_id)));
  END IF;
  RETURN 'applied';
END $$;

COMMENT ON FUNCTION billing.apply_invoice_payment_failed(p_event jsonb) IS 'invoice.payment_failed: record the invoice as open, start a 7-day grace period (from the event''s time, once) and email the customer once per invoice (payment_failed: the amount, the grace end and the link to update the card); after the grace the account is metered as free until an invoice is paid. The subscription''s past_due status arrives by its own event. Stale (nothing changes) when the invoice is already recorded paid: the failure of an attempt before the one that succeeded, delivered late.';

REVOKE ALL ON FUNCTION billing.apply_invoice_payment_failed(p_event jsonb) FROM PUBLIC;

CREATE FUNCTION billing.apply_invoice_payment_paid(p_event jsonb) RETURNS text
    LANGUAGE plpgsql
    AS $$
DECLARE
  o jsonb := p_event -> 'data' -> 'object';
  v_account_id uuid := (SELECT account_id FROM billing.invoices WHERE stripe_invoice_id = o ->> 'invoice');
BEGIN
  IF v_account_id IS NULL THEN
    RETURN 'ignored: not an invoice pgtally recorded';
  END IF;
  PERFORM 1 FROM identity.accounts WHERE id = v_account_id FOR NO KEY UPDATE;
  PERFORM billing.record_invoice_payment(o, v_account_id);
  RETURN 'applied';
END $$;

COMMENT ON FUNCTION billing.apply_invoice_payment_paid(p_event jsonb) IS 'invoice_payment.paid: record which PaymentIntent or Charge paid a recorded subscription invoice (billing.invoice_payments), for Stripe accounts whose invoice.paid events do not include the invoice''s payments list.';

REVOKE ALL ON FUNCTION billing.apply_invoice_payment_paid(p_event jsonb) FROM PUBLIC;

CREATE FUNCTION billing.apply_invoice_refund(o jsonb) RETURNS text
    LANGUAGE plpgsql
    AS $$
DECLARE
  v_refunded bigint := (o ->> 'amount_refunded')::bigint;
  ip record;     -- a billing.invoice_payments row (a record: the table is younger than some migrations tested)
BEGIN
  SELECT * INTO ip FROM billing.invoice_payments
  WHERE stripe_payment_intent_id = o ->> 'payment_intent' OR stripe_charge_id = o ->> 'id'
  ORDER BY stripe_invoice_payment_id LIMIT 1;
  IF NOT FOUND THEN
    RETURN NULL;
  END IF;
  PERFORM 1 FROM identity.accounts WHERE id = ip.account_id FOR NO KEY UPDATE;
  UPDATE billing.invoice_payments
  SET refunded_minor = least(v_refunded, amount_minor), stripe_charge_id = coalesce(stripe_charge_id, o ->> 'id')
  WHERE stripe_invoice_payment_id = ip.stripe_invoice_payment_id AND refunded_minor < least(v_refunded, amount_minor);
  IF NOT FOUND THEN
    RETURN 'stale';
  END IF;
  UPDATE billing.invoices i
  SET refunded_minor = r.refunded,
      status = CASE WHEN i.status = 'paid' AND r.refunded >= i.amount_paid_minor THEN 'refunded' ELSE i.status END
  FROM (SELECT sum(refunded_minor) AS refunded FROM billing.invoice_payments
        WHERE stripe_invoice_id = ip.stripe_invoice_id) r
  WHERE i.stripe_invoice_id = ip.stripe_invoice_id;
  -- A referral reward this invoice earned is canceled if it is still in its holdback.
  PERFORM billing.cancel_referral_reward(ip.stripe_invoice_id);
  RETURN 'applied';
END $$;

COMMENT ON FUNCTION billing.apply_invoice_refund(o jsonb) IS 'charge.refunded of a subscription invoice''s payment (found by PaymentIntent or charge in billing.invoice_payments: since API 2025-03-31 a Charge names no invoice): record what was refunded of the payment and the invoice (minor units; refunded in full: status refunded, out of the revenue views), cancel a referral reward the invoice earned inside its holdback. NULL when the charge paid no recorded invoice; stale when no more was refunded than already recorded.';

REVOKE ALL ON FUNCTION billing.apply_invoice_refund(o jsonb) FROM PUBLIC;

CREATE FUNCTION billing.apply_meter_error_report(p_event jsonb) RETURNS text
    LANGUAGE plpgsql
    AS $$
DECLARE
  d jsonb := p_event -> 'data';
BEGIN
  INSERT INTO billing.meter_error_reports (stripe_event_id, stripe_meter_id, error_count, summary, error_types,
                                           identifiers, validation_start, validation_end, received_at)
  VALUES (p_event ->> 'id', p_event #>> '{related_object,id}', coalesce((d #>> '{reason,error_count}')::integer, 0),
          left(d ->> 'developer_message_summary', 2000),
          CASE WHEN jsonb_typeof(d #> '{reason,error_types}') = 'array' THEN d #> '{reason,error_types}' ELSE '[]' END,
          coalesce((SELECT array_agg(DISTINCT left(e #>> '{request,identifier}', 255))
                    FROM jsonb_array_elements(CASE WHEN jsonb_typeof(d #> '{reason,error_types}') = 'array'
                                                   THEN d #> '{reason,error_types}' ELSE '[]' END) t,
                         jsonb_array_elements(CASE WHEN jsonb_typeof(t -> 'sample_errors') = 'array'
                                                   THEN t -> 'sample_errors' ELSE '[]' END) e
                    WHERE e #>> '{request,identifier}' IS NOT NULL), '{}'),
          (d ->> 'validation_start')::timestamptz, (d ->> 'validation_end')::timestamptz, util.now())
  ON CONFLICT DO NOTHING;
  RETURN 'applied';
END $$;

COMMENT ON FUNCTION billing.apply_meter_error_report(p_event jsonb) IS 'v1.billing.meter.error_report_triggered (a thin event, read whole from Stripe): record which meter, how many meter events Stripe rejected in the validation window, the error types and the sample identifiers (billing.meter_error_reports). The daily comparison of totals (reporting.meter_total_mismatches) shows what it cost.';

REVOKE ALL ON FUNCTION billing.apply_meter_error_report(p_event jsonb) FROM PUBLIC;

CREATE FUNCTION billing.apply_payment_intent_succeeded(p_event jsonb) RETURNS text
    LANGUAGE plpgsql
    AS $$
DECLARE
  o jsonb := p_event -> 'data' -> 'object';
  v_account_id uuid := billing.account_of(o -> 'metadata' ->> 'account_id', o ->> 'customer');
  v_price billing.prices;
  v_payment text;
BEGIN
  SELECT * INTO v_price FROM billing.prices WHERE id = o -> 'metadata' ->> 'price' AND credits_micros IS NOT NULL;
  IF v_account_id IS NULL OR NOT FOUND THEN
    RETURN 'ignored: the payment names no pgtally account and credit bundle';
  END IF;
  PERFORM 1 FROM identity.accounts WHERE id = v_account_id FOR NO KEY UPDATE;
  -- One payment, one grant: a Checkout payment's own checkout.session.completed shares this key.
  INSERT INTO billing.payments (stripe_payment_intent_id, account_id, stripe_checkout_session, price_id,
                                amount_minor, currency, credits_micros, paid_at)
  VALUES (o ->> 'id', v_account_id, NULL, v_price.id, coalesce((o ->> 'amount_received')::bigint, v_price.amount_minor),
          coalesce(o ->> 'currency', v_price.currency), v_price.credits_micros, billing.ts(p_event -> 'created'))
  ON CONFLICT DO NOTHING
  RETURNING stripe_payment_intent_id INTO v_payment;
  IF v_payment IS NULL THEN
    RETURN 'ignored: this payment was already credited';
  END IF;
  PERFORM ledger.post_transfer(v_account_id, 'purchases', v_price.credits_micros, 'purchase',
                               'payment_intent:' || (o ->> 'id'), NULL, v_price.name);
  PERFORM billing.first_payment(v_account_id, v_payment);
  PERFORM billing.email_receipt(v_payment);
  -- A top-up (no Checkout, so no invoice_creation): the worker has Stripe invoice it.
  IF 'true' IN (o -> 'metadata' ->> 'topup', o -> 'metadata' ->> 'auto_topup') THEN
    INSERT INTO outbox.messages (kind, recipient, payload, created_at, next_attempt_at)
    SELECT 'invoice_topup', v_account_id::text,
           jsonb_build_object('account_id', v_account_id, 'payment_intent', o ->> 'id', 'price', v_price.id,
                              'stripe_price_id', v_price.stripe_price_id, 'stripe_customer_id', o ->> 'customer'),
           util.now(), util.now()
    WHERE o ->> 'customer' IS NOT NULL;
  END IF;
  IF o -> 'metadata' ->> 'auto_topup' = 'true' THEN
    -- Ends the top-up in flight only if it is this payment's (one released as stuck may succeed late).
    UPDATE billing.auto_topups SET in_flight_since = NULL, task_id = NULL, failures = 0, last_error = NULL,
                                   stripe_payment_intent_id = o ->> 'id', updated_at = util.now()
    WHERE account_id = v_account_id
      AND (task_id::text = o -> 'metadata' ->> 'auto_topup_task' OR o -> 'metadata' ->> 'auto_topup_task' IS NULL);
  END IF;
  RETURN 'applied';
END $$;

COMMENT ON FUNCTION billing.apply_payment_intent_succeeded(p_event jsonb) IS 'payment_intent.succeeded for a credit bundle (a one-click or auto top-up, or a Checkout payment whose own event has not arrived): record the payment and grant its credits, once per PaymentIntent whichever of the two events comes first; an auto top-up''s ends its in-flight state when it is the one in flight (metadata auto_topup_task); a top-up''s (metadata topup or auto_topup) queues its invoice (worker task invoice_topup).';

REVOKE ALL ON FUNCTION billing.apply_payment_intent_succeeded(p_event jsonb) FROM PUBLIC;

CREATE FUNCTION billing.apply_subscription(p_event jsonb, p_current jsonb DEFAULT NULL::jsonb) RETURNS text
    LANGUAGE plpgsql
    AS $$
DECLARE
  o jsonb := coalesce(p_current, p_event -> 'data' -> 'object');
  -- Every item is read: the plan is the item whose price is a plan's (licensed first), not items[0].
  v_item jsonb := coalesce(
    (SELECT i FROM jsonb_array_elements(CASE WHEN jsonb_typeof(o #> '{items,data}') = 'array' THEN o #> '{items,data}'
                                             ELSE '[]' END) WITH ORDINALITY AS x(i, n)
     JOIN billing.prices p ON p.stripe_price_id = i #>> '{price,id}' AND p.plan_id IS NOT NULL
     ORDER BY (p.usage_type = 'licensed') DESC, x.n LIMIT 1),
    o -> 'items' -> 'data' -> 0);
  v_cancel_at timestamptz := billing.ts(o -> 'cancel_at');
  v_ending boolean := coalesce((o ->> 'cancel_at_period_end')::boolean, false) OR billing.ts(o -> 'cancel_at') IS NOT NULL;
  v_status text := CASE WHEN p_event ->> 'type' = 'customer.subscription.deleted' THEN 'canceled' ELSE o ->> 'status' END;
  v_created timestamptz := billing.ts(p_event -> 'created');
  v_rank integer := billing.event_rank(p_event ->> 'type', v_status);
  v_account_id uuid := billing.account_of(o -> 'metadata' ->> 'account_id', o ->> 'customer');
  v_price billing.prices;
  cur billing.subscriptions;
  v_event_id text := p_event ->> 'id';
BEGIN
  IF v_account_id IS NULL THEN
    RETURN 'ignored: no pgtally account for customer ' || coalesce(o ->> 'customer', '?');
  END IF;
  SELECT * INTO v_price FROM billing.prices WHERE stripe_price_id = v_item -> 'price' ->> 'id';
  -- Lock order: the account, then its subscription row.
  PERFORM 1 FROM identity.accounts WHERE id = v_account_id FOR NO KEY UPDATE;
  SELECT * INTO cur FROM billing.subscriptions WHERE stripe_subscription_id = o ->> 'id' FOR UPDATE;
  IF FOUND AND (v_created, v_rank, p_event ->> 'id') <= (cur.last_event_created, cur.last_event_rank, cur.last_event_id) THEN
    IF p_current IS NULL THEN
      RETURN 'stale';
    END IF;
    -- The subscription as Stripe has it now is newer than any event: apply it, keep the newest event mark.
    SELECT cur.last_event_created, cur.last_event_rank, cur.last_event_id INTO v_created, v_rank, v_event_id;
  END IF;
  INSERT INTO billing.subscriptions AS s (
    stripe_subscription_id, account_id, stripe_customer_id, status, stripe_item_id, price_id, plan_id,
    current_period_start, current_period_end, cancel_at_period_end, cancel_at, canceled_at,
    last_event_created, last_event_rank, last_event_id, updated_at)
  VALUES (o ->> 'id', v_account_id, o ->> 'customer', v_status, v_item ->> 'id', v_price.id, v_price.plan_id,
          coalesce(billing.ts(v_item -> 'current_period_start'), billing.ts(o -> 'current_period_start')),
          coalesce(billing.ts(v_item -> 'current_period_end'), billing.ts(o -> 'current_period_end')),
          coalesce((o ->> 'cancel_at_period_end')::boolean, false), v_cancel_at, billing.ts(o -> 'canceled_at'),
          v_created, v_rank, v_event_id, util.now())
  ON CONFLICT (stripe_subscription_id) DO UPDATE SET
    account_id = EXCLUDED.account_id, stripe_customer_id = EXCLUDED.stripe_customer_id, status = EXCLUDED.status,
    stripe_item_id = EXCLUDED.stripe_item_id, price_id = EXCLUDED.price_id, plan_id = EXCLUDED.plan_id,
    current_period_start = EXCLUDED.current_period_start, current_period_end = EXCLUDED.current_period_end,
    cancel_at_period_end = EXCLUDED.cancel_at_period_end, cancel_at = EXCLUDED.cancel_at, canceled_at = EXCLUDED.canceled_at,
    last_event_created = EXCLUDED.last_event_created, last_event_rank = EXCLUDED.last_event_rank,
    last_event_id = EXCLUDED.last_event_id, updated_at = EXCLUDED.updated_at;
  IF v_status IN ('active', 'trialing', 'past_due') AND cur.status IS DISTINCT FROM v_status
     AND coalesce(cur.status, 'incomplete') NOT IN ('active', 'trialing', 'past_due') THEN
    PERFORM billing.catch_duplicate_subscription(o ->> 'id', v_account_id, v_price.plan_id, lower(o ->> 'currency'));
  END IF;
  PERFORM billing.sync_account_plan(v_account_id);
  PERFORM billing.record_mrr(v_account_id, v_created);
  -- Tell the customer when their plan is set to end (at period end or a chosen date), and when it has ended (once each).
  IF v_status = 'canceled' AND cur.status IS DISTINCT FROM 'canceled'
     AND NOT EXISTS (SELECT 1 FROM billing.duplicate_subscriptions WHERE stripe_subscription_id = o ->> 'id') THEN
    PERFORM billing.email_account(v_account_id, 'subscription_canceled',
                                  jsonb_build_object('plan', coalesce(v_price.plan_id, cur.plan_id)));
  ELSIF v_ending AND NOT (coalesce(cur.cancel_at_period_end, false) OR cur.cancel_at IS NOT NULL)
        AND v_status IN ('active', 'trialing', 'past_due') THEN
    PERFORM billing.email_account(v_account_id, 'subscription_ending',
      jsonb_build_object('plan', v_price.plan_id,
                         'ends_at', to_char(coalesce(v_cancel_at, billing.ts(v_item -> 'current_period_end'),
                                                     billing.ts(o -> 'current_period_end')) AT TIME ZONE 'UTC', 'YYYY-MM-DD')));
  END IF;
  RETURN 'applied';
END $$;

COMMENT ON FUNCTION billing.apply_subscription(p_event jsonb, p_current jsonb) IS 'customer.subscription.created/updated/deleted: store the subscription (status, the plan of whichever item has a plan''s price (licensed first), that item''s period, cancel at period end, cancel_at: a scheduled end by date) unless the stored state comes from a later event (then stale), and set the account''s plan from it. p_current: the subscription as just re-read from Stripe, applied instead of the event''s copy whatever the order (how Stripe recommends settling events of the same second).';

REVOKE ALL ON FUNCTION billing.apply_subscription(p_event jsonb, p_current jsonb) FROM PUBLIC;

CREATE FUNCTION billing.attribute_referral(p_referee_account_id uuid, p_code text, p_ip text, p_fingerprint text, p_device_account_id uuid DEFAULT NULL::uuid) RETURNS text
    LANGUAGE plpgsql
    AS $$
DECLARE
  ref identity.users;
  v_reason text;
  v_status text;
  v_device_fingerprint text := (SELECT device_fingerprint FROM identity.accounts WHERE id = p_device_account_id);
BEGIN
  IF p_code IS NULL OR btrim(p_code) = '' THEN
    RETURN NULL;
  END IF;
  SELECT * INTO ref FROM identity.users WHERE referral_code = lower(btrim(p_code));
  IF NOT FOUND THEN
    RETURN 'unknown_code';
  END IF;
  v_reason := CASE
    WHEN ref.account_id = p_referee_account_id
         OR billing.mailbox(ref.email_normalized) = billing.mailbox((SELECT email_normalized FROM identity.users
                                                                    WHERE account_id = p_referee_account_id))
      THEN 'self_referral'
    WHEN v_device_fingerprint IS NOT NULL AND EXISTS (
           SELECT 1 FROM identity.accounts d WHERE d.merged_into = ref.account_id AND d.device_fingerprint = v_device_fingerprint)
      THEN 'own_device'
    WHEN p_ip IS NOT NULL AND EXISTS (
           SELECT 1 FROM identity.auth_events e
           WHERE (e.user_id = ref.id OR e.account_id = ref.account_id) AND e.ip = p_ip
             AND e.created_at > util.now() - (SELECT same_ip_window FROM billing.referral_program))
      THEN 'same_ip'
    WHEN p_fingerprint IS NOT NULL AND EXISTS (
           SELECT 1 FROM identity.accounts d WHERE d.merged_into = ref.account_id AND d.device_fingerprint = p_fingerprint)
      THEN 'same_fingerprint'
  END;
  -- One referrer per account, the first one: a second attribution changes nothing.
  INSERT INTO billing.referrals (referee_account_id, referrer_account_id, referrer_user_id, code, status, rejected_reason,
                                 signup_ip, signup_fingerprint, created_at, rejected_at)
  VALUES (p_referee_account_id, ref.account_id, ref.id, ref.referral_code,
          CASE WHEN v_reason IS NULL THEN 'signed_up' ELSE 'rejected' END, v_reason,
          left(p_ip, 64), left(coalesce(p_fingerprint, v_device_fingerprint), 256), util.now(),
          CASE WHEN v_reason IS NOT NULL THEN util.now() END)
  ON CONFLICT (referee_account_id) DO NOTHING
  RETURNING status INTO v_status;
  RETURN coalesce(v_reason, v_status, 'already_referred');
END $$;

COMMENT ON FUNCTION billing.attribute_referral(p_referee_account_id uuid, p_code text, p_ip text, p_fingerprint text, p_device_account_id uuid) IS 'At sign-up only: record who referred the new account (p_code, a person''s referral code; unknown codes are ignored), first touch (an account already referred keeps its referrer). Refused without a reward, the reason recorded: self_referral (the referrer''s own account or mailbox, billing.mailbox: alice+2@ is alice@, a.lice@gmail.com is alice@googlemail.com), own_device (the anonymous device merged at sign-up has the fingerprint of a device the referrer merged), same_ip (the referrer was seen at this IP within the program''s same_ip_window, from identity.auth_events), same_fingerprint (the fingerprint sent at sign-up is one of the referrer''s devices). Returns signed_up, the reason, unknown_code or already_referred.';

REVOKE ALL ON FUNCTION billing.attribute_referral(p_referee_account_id uuid, p_code text, p_ip text, p_fingerprint text, p_device_account_id uuid) FROM PUBLIC;

CREATE FUNCTION billing.auto_topup_failure(p_account_id uuid, p_error text) RETURNS billing.auto_topups
    LANGUAGE plpgsql
    AS $$
DECLARE
  t billing.auto_topups;
BEGIN
  PERFORM 1 FROM identity.accounts WHERE id = p_account_id FOR NO KEY UPDATE;
  UPDATE billing.auto_topups
  SET failures = failures + 1, in_flight_since = NULL, task_id = NULL, last_error = left(p_error, 1000),
      updated_at = util.now(), enabled = failures + 1 < 3
  WHERE account_id = p_account_id RETURNING * INTO t;
  IF t.account_id IS NOT NULL AND NOT t.enabled THEN
    UPDATE identity.accounts SET auto_topup_below_micros = NULL WHERE id = p_account_id;
    INSERT INTO outbox.messages (kind, recipient, payload, created_at, next_attempt_at)
    SELECT 'auto_topup_disabled', u.email, jsonb_build_object('error', left(p_error, 300), 'failures', t.failures),
           util.now(), util.now()
    FROM identity.users u WHERE u.account_id = p_account_id AND u.email_verified_at IS NOT NULL;
  END IF;
  RETURN t;
END $$;

COMMENT ON FUNCTION billing.auto_topup_failure(p_account_id uuid, p_error text) IS 'An auto top-up did not happen (declined, needs authentication, or no answer from Stripe): count the failure, end the in-flight state so the next charge may try again; the third failure in a row turns auto top-up off and emails the user.';

REVOKE ALL ON FUNCTION billing.auto_topup_failure(p_account_id uuid, p_error text) FROM PUBLIC;

CREATE FUNCTION billing.auto_topup_json(t billing.auto_topups) RETURNS jsonb
    LANGUAGE sql STABLE
    AS $$
  SELECT jsonb_build_object('enabled', coalesce(t.enabled, false), 'below', util.credits(t.below_micros),
                            'bundle', t.price_id, 'failures', coalesce(t.failures, 0),
                            'in_flight', t.in_flight_since IS NOT NULL, 'last_error', t.last_error)
$$;

COMMENT ON FUNCTION billing.auto_topup_json(t billing.auto_topups) IS 'Auto top-up settings as the API shows them: {enabled, below (credits), bundle, failures, in_flight, last_error}.';

REVOKE ALL ON FUNCTION billing.auto_topup_json(t billing.auto_topups) FROM PUBLIC;

CREATE FUNCTION billing.buyer(p_api_key text, p_session_id uuid, p_account_id uuid) RETURNS uuid
    LANGUAGE plpgsql
    AS $$
BEGIN
  IF p_api_key IS NULL AND p_session_id IS NULL AND p_account_id IS NOT NULL THEN
    -- Named by a signed upgrade link the server verified (an anonymous device has no other way).
    IF NOT EXISTS (SELECT 1 FROM identity.accounts WHERE id = p_account_id AND merged_into IS NULL) THEN
      PERFORM util.fail('TL404', 'this account no longer exists (it may have signed up since): sign in');
    END IF;
    RETURN p_account_id;
  END IF;
  RETURN identity.authenticate(p_api_key, p_session_id, 'billing:manage', p_account_id);
END $$;

COMMENT ON FUNCTION billing.buyer(p_api_key text, p_session_id uuid, p_account_id uuid) IS 'The account a purchase is for: the principal''s (API key or session), or a team the person may buy for (p_account_id, permission billing:manage), or, with neither principal, the account of a signed upgrade link the server verified (p_account_id).';

REVOKE ALL ON FUNCTION billing.buyer(p_api_key text, p_session_id uuid, p_account_id uuid) FROM PUBLIC;

CREATE FUNCTION billing.cancel_referral_reward(p_ref text) RETURNS void
    LANGUAGE plpgsql
    AS $$
DECLARE
  r billing.referrals;
BEGIN
  SELECT * INTO r FROM billing.referrals WHERE qualifying_ref = p_ref AND status = 'rewarded';
  IF NOT FOUND THEN
    RETURN;
  END IF;
  PERFORM 1 FROM identity.accounts WHERE id IN (r.referrer_account_id, r.referee_account_id) ORDER BY id FOR NO KEY UPDATE;
  -- Only inside the holdback: a reward already spendable stays.
  UPDATE ledger.credit_lots SET status = 'canceled', settled_at = util.now()
  WHERE id IN (r.referrer_lot_id, r.referee_lot_id) AND status = 'pending' AND available_at > util.now();
  IF FOUND THEN
    UPDATE billing.referrals SET status = 'rejected', rejected_reason = 'refunded', rejected_at = util.now()
    WHERE referee_account_id = r.referee_account_id;
  END IF;
END $$;

COMMENT ON FUNCTION billing.cancel_referral_reward(p_ref text) IS 'The qualifying payment p_ref (a PaymentIntent or invoice id) was refunded: inside the holdback, cancel the reward''s pending lots (never spendable, no transfer) and mark the referral rejected (refunded); after it, nothing changes.';

REVOKE ALL ON FUNCTION billing.cancel_referral_reward(p_ref text) FROM PUBLIC;

CREATE FUNCTION billing.catch_duplicate_subscription(p_subscription text, p_account_id uuid, p_plan text, p_currency text) RETURNS boolean
    LANGUAGE plpgsql
    AS $_$
DECLARE
  v_kept text;
BEGIN
  SELECT x.stripe_subscription_id INTO v_kept FROM billing.subscriptions x
  WHERE x.account_id = p_account_id AND x.stripe_subscription_id <> p_subscription
    AND x.status IN ('active', 'trialing', 'past_due')
    AND NOT EXISTS (SELECT 1 FROM billing.duplicate_subscriptions d WHERE d.stripe_subscription_id = x.stripe_subscription_id)
  ORDER BY x.last_event_created, x.stripe_subscription_id LIMIT 1;
  IF v_kept IS NULL THEN
    RETURN false;
  END IF;
  INSERT INTO billing.duplicate_subscriptions (stripe_subscription_id, account_id, kept_subscription_id, detected_at, currency)
  VALUES (p_subscription, p_account_id, v_kept, util.now(), CASE WHEN p_currency ~ '^[a-z]{3}$' THEN p_currency END)
  ON CONFLICT DO NOTHING;
  IF NOT FOUND THEN
    RETURN true;
  END IF;
  INSERT INTO outbox.messages (kind, recipient, payload, created_at, next_attempt_at)
  VALUES ('cancel_duplicate_subscription', p_account_id::text,
          jsonb_build_object('subscription', p_subscription, 'account_id', p_account_id), util.now(), util.now());
  PERFORM billing.email_account(p_account_id, 'subscription_duplicate',
                                jsonb_build_object('plan', coalesce(p_plan, 'a'), 'subscription', p_subscription));
  RETURN true;
END $_$;

COMMENT ON FUNCTION billing.catch_duplicate_subscription(p_subscription text, p_account_id uuid, p_plan text, p_currency text) IS 'A subscription just became live: if the account already has another live one (two Checkouts paid at once), record it in billing.duplicate_subscriptions (once), queue the worker task that cancels it at Stripe and refunds its invoices (cancel_duplicate_subscription), and email the customer (subscription_duplicate). Returns whether it is a duplicate. The first live subscription is kept.';

REVOKE ALL ON FUNCTION billing.catch_duplicate_subscription(p_subscription text, p_account_id uuid, p_plan text, p_currency text) FROM PUBLIC;

CREATE FUNCTION billing.email_account(p_account_id uuid, p_kind text, p_payload jsonb) RETURNS void
    LANGUAGE sql
    AS $$
  INSERT INTO outbox.messages (kind, recipient, payload, created_at, next_attempt_at)
  SELECT p_kind, u.email, p_payload, util.now(), util.now()
  FROM identity.users u WHERE u.account_id = p_account_id AND u.email_verified_at IS NOT NULL
$$;

COMMENT ON FUNCTION billing.email_account(p_account_id uuid, p_kind text, p_payload jsonb) IS 'Queue a billing email (payment_failed, receipt, subscription_ending, subscription_canceled) to the account''s person, when their address is verified, in the caller''s transaction.';

REVOKE ALL ON FUNCTION billing.email_account(p_account_id uuid, p_kind text, p_payload jsonb) FROM PUBLIC;

CREATE FUNCTION billing.email_receipt(p_payment text) RETURNS void
    LANGUAGE sql
    AS $$
  SELECT billing.email_account(p.account_id, 'receipt', jsonb_build_object(
           'payment', p.stripe_payment_intent_id, 'bundle', coalesce(x.name, p.price_id),
           'amount', billing.money(p.amount_minor, p.currency), 'credits', util.credits(p.credits_micros),
           'paid_at', to_char(p.paid_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI "UTC"')))
  FROM billing.payments p LEFT JOIN billing.prices x ON x.id = p.price_id
  WHERE p.stripe_payment_intent_id = p_payment
$$;

COMMENT ON FUNCTION billing.email_receipt(p_payment text) IS 'Queue the receipt of a recorded bundle payment (once: called where the payment is first recorded).';

REVOKE ALL ON FUNCTION billing.email_receipt(p_payment text) FROM PUBLIC;

CREATE FUNCTION billing.enqueue_auto_topup(p_account_id uuid) RETURNS void
    LANGUAGE plpgsql
    AS $$
DECLARE
  t billing.auto_topups;
  v_task uuid;
BEGIN
  -- The claim: one top-up in flight at a time, whatever the number of charges under the threshold.
  UPDATE billing.auto_topups SET in_flight_since = util.now()
  WHERE account_id = p_account_id AND enabled AND in_flight_since IS NULL
  RETURNING * INTO t;
  IF t.account_id IS NOT NULL THEN
    INSERT INTO outbox.messages (kind, recipient, payload, created_at, next_attempt_at)
    VALUES ('auto_topup', p_account_id::text, jsonb_build_object('account_id', p_account_id, 'price', t.price_id),
            util.now(), util.now())
    RETURNING id INTO v_task;
    UPDATE billing.auto_topups SET task_id = v_task, stripe_payment_intent_id = NULL WHERE account_id = p_account_id;
  END IF;
END $$;

COMMENT ON FUNCTION billing.enqueue_auto_topup(p_account_id uuid) IS 'Called by the charge that left the balance under the threshold, in its transaction: queue one auto top-up (outbox task auto_topup, remembered as billing.auto_topups.task_id) unless one is in flight.';

REVOKE ALL ON FUNCTION billing.enqueue_auto_topup(p_account_id uuid) FROM PUBLIC;

CREATE FUNCTION billing.event_rank(p_type text, p_status text) RETURNS integer
    LANGUAGE sql IMMUTABLE
    AS $$
  SELECT 10 * CASE p_status WHEN 'incomplete' THEN 0 WHEN 'incomplete_expired' THEN 1 WHEN 'trialing' THEN 2
                            WHEN 'active' THEN 3 WHEN 'past_due' THEN 4 WHEN 'unpaid' THEN 5 WHEN 'paused' THEN 6
                            WHEN 'canceled' THEN 7 ELSE 0 END
         + CASE p_type WHEN 'customer.subscription.created' THEN 0 WHEN 'customer.subscription.updated' THEN 1
                       WHEN 'customer.subscription.deleted' THEN 2 ELSE 1 END
$$;

COMMENT ON FUNCTION billing.event_rank(p_type text, p_status text) IS 'Order of two subscription events created in the same second (Stripe timestamps have one-second resolution and deliveries are unordered): later in the subscription lifecycle first, then created < updated < deleted; the event id breaks any remaining tie. Deterministic, so arrival order never changes the outcome.';

REVOKE ALL ON FUNCTION billing.event_rank(p_type text, p_status text) FROM PUBLIC;

CREATE FUNCTION billing.first_payment(p_account_id uuid, p_ref text) RETURNS void
    LANGUAGE sql
    AS $$
  SELECT billing.qualify_referral(p_account_id, 'first_payment', p_ref)
$$;

COMMENT ON FUNCTION billing.first_payment(p_account_id uuid, p_ref text) IS 'A payment was recorded for the account (bundle, top-up or a paid subscription invoice; p_ref its PaymentIntent or invoice id): qualifies its referral when the program counts first payments (only the first does: the referral is claimed once).';

REVOKE ALL ON FUNCTION billing.first_payment(p_account_id uuid, p_ref text) FROM PUBLIC;

CREATE FUNCTION billing.mailbox(p_email text) RETURNS text
    LANGUAGE sql IMMUTABLE
    AS $_$
  SELECT CASE WHEN domain IN ('gmail.com', 'googlemail.com') THEN replace(local, '.', '') || '@gmail.com'
              ELSE local || '@' || domain END
  FROM (SELECT regexp_replace(split_part(lower(btrim(p_email)), '@', 1), '\+.*$', '') AS local,
               rtrim(split_part(lower(btrim(p_email)), '@', 2), '.') AS domain) AS address
$_$;

COMMENT ON FUNCTION billing.mailbox(p_email text) IS 'The mailbox an address delivers to, as far as the self-referral rule cares: lower case, the local part without a +tag (alice+2@example.com -> alice@example.com), and Gmail''s rules: dots in the local part do not count and googlemail.com is gmail.com (A.Lice+x@googlemail.com -> alice@gmail.com). Other providers'' dots are kept. Issue #22 item 10.';

REVOKE ALL ON FUNCTION billing.mailbox(p_email text) FROM PUBLIC;

CREATE FUNCTION billing.money(p_minor bigint, p_currency text) RETURNS text
    LANGUAGE sql IMMUTABLE
    AS $$
  SELECT CASE WHEN lower(p_currency) IN ('bif', 'clp', 'djf', 'gnf', 'jpy', 'kmf', 'krw', 'mga', 'pyg', 'rwf',
                                         'ugx', 'vnd', 'vuv', 'xaf', 'xof', 'xpf')
              THEN p_minor::text ELSE to_char(p_minor / 100.0, 'FM999999999999990.00') END || ' ' || upper(p_currency)
$$;

COMMENT ON FUNCTION billing.money(p_minor bigint, p_currency text) IS 'An amount in minor units for people: 4000, usd -> 40.00 USD (Stripe''s zero-decimal currencies have no minor unit: https://docs.stripe.com/currencies#zero-decimal).';

REVOKE ALL ON FUNCTION billing.money(p_minor bigint, p_currency text) FROM PUBLIC;

CREATE FUNCTION billing.plans_json() RETURNS jsonb
    LANGUAGE sql STABLE
    AS $$
  SELECT jsonb_build_object(
    'plans', coalesce((
      SELECT jsonb_agg(jsonb_build_object(
        'id', p.id, 'name', p.name, 'description', p.description, 'features', p.features,
        'included_credits', util.credits(p.included_credits_micros),
        'signup_bonus', util.credits(p.signup_bonus_micros), 'monthly_credits', util.credits(p.monthly_credits_micros),
        'spending_limit', p.spending_limit_minor,
        'entitlements', coalesce((SELECT jsonb_agg(jsonb_build_object('meter', e.meter_id, 'kind', e.kind,
                                                                      'period', e.period, 'limit', e.limit_units,
                                                                      'unit_amount', e.unit_amount_minor)
                                                   ORDER BY e.meter_id)
                                  FROM billing.entitlements e WHERE e.plan_id = p.id), '[]'),
        'prices', coalesce((SELECT jsonb_agg(billing.price_json(x) ORDER BY x.interval)
                            FROM billing.prices x WHERE x.plan_id = p.id AND x.active), '[]'))
        ORDER BY p.id)
      FROM billing.plans p WHERE p.active AND p.id <> 'anonymous'), '[]'),
    'bundles', coalesce((SELECT jsonb_agg(billing.price_json(x) ORDER BY x.amount_minor)
                         FROM billing.prices x WHERE x.credits_micros IS NOT NULL AND x.active), '[]'))
$$;

COMMENT ON FUNCTION billing.plans_json() IS 'The public catalog: active plans (not anonymous) with entitlements (post_paid ones with unit_amount, minor units per unit), spending_limit (post-paid plans, minor units per billing period) and active prices, and credit bundles.';

REVOKE ALL ON FUNCTION billing.plans_json() FROM PUBLIC;

CREATE FUNCTION billing.price_json(x billing.prices) RETURNS jsonb
    LANGUAGE sql STABLE
    AS $$
  SELECT jsonb_build_object('id', x.id, 'name', x.name, 'amount', x.amount_minor, 'currency', x.currency,
                            'interval', x.interval, 'stripe_price_id', x.stripe_price_id, 'usage_type', x.usage_type,
                            'credits', util.credits(x.credits_micros))
$$;

COMMENT ON FUNCTION billing.price_json(x billing.prices) IS 'A price as GET /v1/plans shows it: {id, name, amount (minor units), currency, interval, stripe_price_id, usage_type (licensed or metered), credits (bundles)}.';

REVOKE ALL ON FUNCTION billing.price_json(x billing.prices) FROM PUBLIC;

CREATE FUNCTION billing.qualify_referral(p_referee_account_id uuid, p_event text, p_ref text) RETURNS void
    LANGUAGE plpgsql
    AS $$
DECLARE
  prog billing.referral_program;
  r billing.referrals;
  v_referrer_lot uuid;
  v_referee_lot uuid;
BEGIN
  SELECT * INTO prog FROM billing.referral_program;
  IF prog.qualify_on IS DISTINCT FROM p_event THEN
    RETURN;
  END IF;
  -- The claim: once per referee, however often or concurrently the event is delivered.
  UPDATE billing.referrals SET status = 'qualified', qualified_at = util.now(), qualifying_event = p_event,
                               qualifying_ref = left(p_ref, 255)
  WHERE referee_account_id = p_referee_account_id AND status = 'signed_up'
  RETURNING * INTO r;
  IF r.referee_account_id IS NULL THEN
    RETURN;
  END IF;
  -- The referrer's row lock orders concurrent rewards of one referrer, so the cap is exact.
  PERFORM 1 FROM identity.accounts WHERE id = r.referrer_account_id FOR NO KEY UPDATE;
  IF (SELECT count(*) FROM billing.referrals
      WHERE referrer_account_id = r.referrer_account_id AND status = 'rewarded'
        AND rewarded_at >= date_trunc('month', util.now(), 'UTC')) >= prog.monthly_cap THEN
    UPDATE billing.referrals SET status = 'rejected', rejected_reason = 'monthly_cap', rejected_at = util.now()
    WHERE referee_account_id = r.referee_account_id;
    RETURN;
  END IF;
  v_referrer_lot := ledger.grant_lot(r.referrer_account_id, 'referral_reward', prog.referrer_reward_micros,
                                     'referral:' || r.referee_account_id, 'referral reward',
                                     util.now() + prog.holdback);
  v_referee_lot := ledger.grant_lot(r.referee_account_id, 'referral_reward', prog.referee_reward_micros,
                                    'referral-welcome', 'credits for joining through a referral',
                                    util.now() + prog.holdback);
  UPDATE billing.referrals SET status = 'rewarded', rewarded_at = util.now(),
                               referrer_lot_id = v_referrer_lot, referee_lot_id = v_referee_lot
  WHERE referee_account_id = r.referee_account_id;
END $$;

COMMENT ON FUNCTION billing.qualify_referral(p_referee_account_id uuid, p_event text, p_ref text) IS 'The referee did what the program qualifies on (p_event: email_verified or first_payment; p_ref names it, e.g. the payment): in the caller''s transaction, qualify the referral once and reward it: the referrer''s reward and any referee bonus as referral_reward lots, pending for the holdback (spendable after it, through one ledger transfer each); over the referrer''s monthly cap it is rejected (monthly_cap) instead. Callers lock the referee''s account.';

REVOKE ALL ON FUNCTION billing.qualify_referral(p_referee_account_id uuid, p_event text, p_ref text) FROM PUBLIC;

CREATE FUNCTION billing.record_invoice(o jsonb, s billing.subscriptions, p_status text, p_paid_at timestamp with time zone) RETURNS void
    LANGUAGE sql
    AS $$
  INSERT INTO billing.invoices AS i (stripe_invoice_id, account_id, stripe_subscription_id, number, status, currency,
                                     amount_paid_minor, tax_minor, plan_id, period_start, period_end,
                                     metered_amount_minor, metered_period_start, metered_period_end,
                                     hosted_invoice_url, invoice_pdf, created_at, paid_at)
  SELECT o ->> 'id', s.account_id, s.stripe_subscription_id, left(o ->> 'number', 255), p_status,
         lower(coalesce(o ->> 'currency', 'usd')),
         CASE WHEN p_status = 'paid' THEN coalesce((o ->> 'amount_paid')::bigint, 0) ELSE 0 END,
         coalesce((SELECT sum((t ->> 'amount')::bigint) FROM jsonb_array_elements(o -> 'total_taxes') t),
                  (o ->> 'tax')::bigint, 0),
         s.plan_id,
         -- Qualified: a bare name here would be the metered line m.line (NULL with no metered line).
         (SELECT min(billing.ts(a.line #> '{period,start}')) FROM jsonb_array_elements(o -> 'lines' -> 'data') AS a(line)),
         (SELECT max(billing.ts(a.line #> '{period,end}')) FROM jsonb_array_elements(o -> 'lines' -> 'data') AS a(line)),
         coalesce(sum((m.line ->> 'amount')::bigint), 0),
         min(billing.ts(m.line #> '{period,start}')), max(billing.ts(m.line #> '{period,end}')),
         left(o ->> 'hosted_invoice_url', 2000), left(o ->> 'invoice_pdf', 2000),
         coalesce(billing.ts(o -> 'created'), util.now()), p_paid_at
  FROM (SELECT 1) one
  LEFT JOIN LATERAL (
    SELECT b.line FROM jsonb_array_elements(o -> 'lines' -> 'data') AS b(line)
    JOIN billing.prices x ON x.usage_type = 'metered'
     AND x.stripe_price_id = coalesce(b.line #>> '{pricing,price_details,price}', b.line #>> '{price,id}')) m ON true
  ON CONFLICT (stripe_invoice_id) DO UPDATE SET
    status = EXCLUDED.status, amount_paid_minor = EXCLUDED.amount_paid_minor, paid_at = EXCLUDED.paid_at,
    hosted_invoice_url = coalesce(EXCLUDED.hosted_invoice_url, i.hosted_invoice_url),
    invoice_pdf = coalesce(EXCLUDED.invoice_pdf, i.invoice_pdf)
  WHERE i.status NOT IN ('paid', 'refunded') AND EXCLUDED.status = 'paid'
$$;

COMMENT ON FUNCTION billing.record_invoice(o jsonb, s billing.subscriptions, p_status text, p_paid_at timestamp with time zone) IS 'Record a subscription invoice from its Stripe object once (billing.invoices): amount paid, tax (total_taxes), plan, period (its lines''), the metered lines and their period, links. An open invoice (payment failed) becomes paid when invoice.paid arrives; a paid (or since refunded) one never changes here.';

REVOKE ALL ON FUNCTION billing.record_invoice(o jsonb, s billing.subscriptions, p_status text, p_paid_at timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION billing.record_invoice_payment(ip jsonb, p_account_id uuid) RETURNS void
    LANGUAGE plpgsql
    AS $$
BEGIN
  INSERT INTO billing.invoice_payments (stripe_invoice_payment_id, stripe_invoice_id, account_id, stripe_payment_intent_id,
                                        stripe_charge_id, amount_minor, currency, paid_at)
  SELECT ip ->> 'id', ip ->> 'invoice', p_account_id, ip #>> '{payment,payment_intent}', ip #>> '{payment,charge}',
         coalesce((ip ->> 'amount_paid')::bigint, 0), lower(coalesce(ip ->> 'currency', 'usd')),
         billing.ts(ip #> '{status_transitions,paid_at}')
  WHERE ip ->> 'status' = 'paid' AND ip ->> 'id' IS NOT NULL AND ip ->> 'invoice' IS NOT NULL
  ON CONFLICT (stripe_invoice_payment_id) DO NOTHING;
END $$;

COMMENT ON FUNCTION billing.record_invoice_payment(ip jsonb, p_account_id uuid) IS 'Record a paid Stripe InvoicePayment (once): which PaymentIntent or Charge paid which invoice of the account, amount paid in minor units. Source: Stripe API 2025-03-31, where Charge.invoice and Invoice.payment_intent were removed in favour of InvoicePayment.';

REVOKE ALL ON FUNCTION billing.record_invoice_payment(ip jsonb, p_account_id uuid) FROM PUBLIC;

CREATE FUNCTION billing.record_mrr(p_account_id uuid, p_at timestamp with time zone) RETURNS void
    LANGUAGE plpgsql
    AS $$
DECLARE
  m record;
  last billing.mrr_changes;
BEGIN
  SELECT * INTO m FROM billing.account_mrr(p_account_id);
  SELECT * INTO last FROM billing.mrr_changes WHERE account_id = p_account_id ORDER BY at DESC, id DESC LIMIT 1;
  IF (last.id IS NULL AND m.mrr_minor = 0)
     OR (last.mrr_minor = m.mrr_minor AND last.currency = m.currency AND last.plan_id IS NOT DISTINCT FROM m.plan_id) THEN
    RETURN;
  END IF;
  INSERT INTO billing.mrr_changes (account_id, at, currency, mrr_minor, plan_id)
  VALUES (p_account_id, greatest(coalesce(p_at, util.now()), last.at), m.currency, m.mrr_minor, m.plan_id);
END $$;

COMMENT ON FUNCTION billing.record_mrr(p_account_id uuid, p_at timestamp with time zone) IS 'After a subscription event: append the account''s MRR to billing.mrr_changes when it changed (amount, currency or plan), at the event''s time (never before the last change).';

REVOKE ALL ON FUNCTION billing.record_mrr(p_account_id uuid, p_at timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION billing.record_outcome(p_event_id text, p_result text, p_reason text) RETURNS jsonb
    LANGUAGE plpgsql
    AS $$
DECLARE
  v_status text := split_part(p_result, ':', 1);
BEGIN
  UPDATE billing.stripe_events
  SET status = v_status, note = left(nullif(btrim(substr(p_result, length(v_status) + 2)), ''), 1000)
  WHERE id = p_event_id;
  RETURN jsonb_build_object('received', true, 'duplicate', false, 'status', v_status, 'event_id', p_event_id)
         || CASE WHEN v_status = 'rejected' THEN jsonb_build_object('reason', left(p_reason, 1000)) ELSE '{}' END;
END $$;

COMMENT ON FUNCTION billing.record_outcome(p_event_id text, p_result text, p_reason text) IS 'What applying a Stripe event came to (p_result: ''applied'', ''ignored: why'', ''rejected: why''...): its status and note on billing.stripe_events, and the answer api.stripe_webhook and api.stripe_thin_event return ({received, duplicate: false, status, event_id, reason for a rejection}).';

REVOKE ALL ON FUNCTION billing.record_outcome(p_event_id text, p_result text, p_reason text) FROM PUBLIC;

CREATE FUNCTION billing.record_payment_invoice(o jsonb, p_paid_at timestamp with time zone) RETURNS text
    LANGUAGE plpgsql
    AS $$
DECLARE
  v_account_id uuid := billing.account_of(o -> 'metadata' ->> 'account_id', o ->> 'customer');
BEGIN
  IF v_account_id IS NULL THEN
    RETURN 'ignored: an invoice of no subscription and no pgtally customer';
  END IF;
  PERFORM 1 FROM identity.accounts WHERE id = v_account_id FOR NO KEY UPDATE;
  INSERT INTO billing.payment_invoices (stripe_invoice_id, account_id, stripe_payment_intent_id, number, status, currency,
                                        amount_paid_minor, tax_minor, description, hosted_invoice_url, invoice_pdf,
                                        created_at, paid_at)
  VALUES (o ->> 'id', v_account_id,
          (SELECT ip #>> '{payment,payment_intent}' FROM jsonb_array_elements(
             CASE WHEN jsonb_typeof(o #> '{payments,data}') = 'array' THEN o #> '{payments,data}' ELSE '[]' END) ip
           WHERE ip #>> '{payment,payment_intent}' IS NOT NULL LIMIT 1),
          left(o ->> 'number', 255), 'paid', lower(coalesce(o ->> 'currency', 'usd')),
          coalesce((o ->> 'amount_paid')::bigint, 0),
          coalesce((SELECT sum((t ->> 'amount')::bigint) FROM jsonb_array_elements(
                      CASE WHEN jsonb_typeof(o -> 'total_taxes') = 'array' THEN o -> 'total_taxes' ELSE '[]' END) t), 0),
          left(coalesce(o ->> 'description', o #>> '{lines,data,0,description}'), 500),
          left(o ->> 'hosted_invoice_url', 2000), left(o ->> 'invoice_pdf', 2000),
          coalesce(billing.ts(o -> 'created'), util.now()), p_paid_at)
  ON CONFLICT (stripe_invoice_id) DO NOTHING;
  RETURN CASE WHEN FOUND THEN 'applied' ELSE 'ignored: this invoice was already recorded' END;
END $$;

COMMENT ON FUNCTION billing.record_payment_invoice(o jsonb, p_paid_at timestamp with time zone) IS 'invoice.paid of an invoice that bills no subscription (a one-time Checkout purchase with invoice_creation): record it once in billing.payment_invoices for the account of its metadata or customer, with the PaymentIntent that paid it (payments.data), its number, tax (total_taxes) and links. Not revenue: the payment itself is billing.payments''.';

REVOKE ALL ON FUNCTION billing.record_payment_invoice(o jsonb, p_paid_at timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION billing.record_rejected(p_id text, p_type text, p_payload jsonb, p_reason text) RETURNS jsonb
    LANGUAGE plpgsql
    AS $$
BEGIN
  INSERT INTO billing.stripe_events (id, type, created, livemode, payload, received_at, status, note)
  VALUES (p_id, left(coalesce(p_type, '?'), 100), NULL, false, p_payload, util.now(), 'rejected', left(p_reason, 1000))
  ON CONFLICT (id) DO NOTHING;
  RETURN jsonb_build_object('received', true, 'status', 'rejected', 'event_id', p_id,
                            'reason', (SELECT note FROM billing.stripe_events WHERE id = p_id));
END $$;

COMMENT ON FUNCTION billing.record_rejected(p_id text, p_type text, p_payload jsonb, p_reason text) IS 'Record a signed but malformed Stripe event as rejected, with the reason (once per id); nothing is applied.';

REVOKE ALL ON FUNCTION billing.record_rejected(p_id text, p_type text, p_payload jsonb, p_reason text) FROM PUBLIC;

CREATE FUNCTION billing.report_meter_event(p_usage_event_id uuid, p_account_id uuid, p_event_name text, p_value bigint, p_at timestamp with time zone) RETURNS void
    LANGUAGE sql
    AS $$
  INSERT INTO outbox.messages (id, kind, recipient, payload, created_at, next_attempt_at)
  VALUES (p_usage_event_id, 'meter_event', p_account_id::text,
          jsonb_build_object('account_id', p_account_id, 'event_name', p_event_name, 'value', p_value,
                             'timestamp', extract(epoch FROM p_at)::bigint),
          p_at, p_at)
$$;

COMMENT ON FUNCTION billing.report_meter_event(p_usage_event_id uuid, p_account_id uuid, p_event_name text, p_value bigint, p_at timestamp with time zone) IS 'Queue the report of a post-paid usage event to Stripe''s Billing Meter (outbox meter_event whose id is the usage event''s id, in the charge''s transaction): the worker sends it with identifier = the usage event id, so Stripe counts it once (https://docs.stripe.com/api/billing/meter-event/create).';

REVOKE ALL ON FUNCTION billing.report_meter_event(p_usage_event_id uuid, p_account_id uuid, p_event_name text, p_value bigint, p_at timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION billing.signed_to_micros(p_credits text, p_path text) RETURNS bigint
    LANGUAGE sql IMMUTABLE
    AS $$
  SELECT CASE WHEN left(p_credits, 1) = '-' THEN -billing.to_micros(to_jsonb(substr(p_credits, 2)), p_path)
              ELSE billing.to_micros(to_jsonb(p_credits), p_path) END
$$;

COMMENT ON FUNCTION billing.signed_to_micros(p_credits text, p_path text) IS 'A plain decimal number of credits with an optional minus sign (-5, 0.25) as micro-credits, by billing.to_micros''s rules.';

REVOKE ALL ON FUNCTION billing.signed_to_micros(p_credits text, p_path text) FROM PUBLIC;

CREATE FUNCTION billing.subscription_of_invoice(o jsonb) RETURNS billing.subscriptions
    LANGUAGE plpgsql
    AS $$
DECLARE
  v_id text := coalesce(o -> 'parent' -> 'subscription_details' ->> 'subscription', o ->> 'subscription');
  s billing.subscriptions;
BEGIN
  IF v_id IS NULL THEN
    RETURN NULL;
  END IF;
  SELECT * INTO s FROM billing.subscriptions WHERE stripe_subscription_id = v_id;
  IF NOT FOUND THEN
    -- Its customer.subscription.created has not arrived yet: fail, so Stripe delivers this again later.
    RAISE EXCEPTION 'subscription % is not known yet', v_id USING ERRCODE = 'TL503';
  END IF;
  RETURN s;
END $$;

COMMENT ON FUNCTION billing.subscription_of_invoice(o jsonb) IS 'The subscription an invoice bills (NULL for a one-off invoice). TL503 (answered 503, so Stripe retries) when the subscription''s own events have not arrived yet.';

REVOKE ALL ON FUNCTION billing.subscription_of_invoice(o jsonb) FROM PUBLIC;

CREATE FUNCTION billing.sync_account_plan(p_account_id uuid) RETURNS void
    LANGUAGE plpgsql
    AS $$
DECLARE
  s billing.subscriptions;
BEGIN
  SELECT * INTO s FROM billing.subscriptions x
  WHERE account_id = p_account_id AND status IN ('active', 'trialing', 'past_due') AND plan_id IS NOT NULL
    AND NOT EXISTS (SELECT 1 FROM billing.duplicate_subscriptions d WHERE d.stripe_subscription_id = x.stripe_subscription_id)
  ORDER BY current_period_end DESC NULLS LAST, last_event_created DESC
  LIMIT 1;
  UPDATE identity.accounts
  SET plan_id = coalesce(s.plan_id, 'free'),
      billing_period_start = CASE WHEN s.current_period_end > s.current_period_start THEN s.current_period_start END,
      billing_period_end = CASE WHEN s.current_period_end > s.current_period_start THEN s.current_period_end END,
      plan_grace_until = CASE WHEN s.status = 'past_due' THEN plan_grace_until END,
      -- The new plan's monthly credits are due (ledger.refresh_lots grants them at the next charge).
      credits_due_at = CASE WHEN (SELECT monthly_credits_micros FROM billing.plans WHERE id = coalesce(s.plan_id, 'free')) > 0
                            THEN least(credits_due_at, util.now()) ELSE credits_due_at END
  WHERE id = p_account_id;
END $$;

COMMENT ON FUNCTION billing.sync_account_plan(p_account_id uuid) IS 'Set an account''s plan and billing period from its live subscription (active, trialing or past_due, not a duplicate being canceled; the one whose period ends last), or the free plan when it has none. Called with the account locked.';

REVOKE ALL ON FUNCTION billing.sync_account_plan(p_account_id uuid) FROM PUBLIC;

CREATE FUNCTION billing.to_micros(p_credits jsonb, p_path text) RETURNS bigint
    LANGUAGE plpgsql IMMUTABLE
    AS $_$
DECLARE
  v numeric;
BEGIN
  IF p_credits IS NULL OR jsonb_typeof(p_credits) NOT IN ('number', 'string') THEN
    PERFORM util.fail('TL422', format('%s: a number of credits is required', p_path));
  END IF;
  IF jsonb_typeof(p_credits) = 'string' AND (p_credits #>> '{}') !~ '^[0-9]{1,19}(\.[0-9]+)?$' THEN
    PERFORM util.fail('TL422', format('%s: %s is not a plain decimal number of credits such as 12 or 0.5', p_path, p_credits));
  END IF;
  BEGIN
    v := (p_credits #>> '{}')::numeric * 1000000;
  EXCEPTION WHEN invalid_text_representation THEN
    PERFORM util.fail('TL422', format('%s: %s is not a number', p_path, p_credits));
  END;
  IF v < 0 OR v <> trunc(v) OR v > 9e18 THEN
    PERFORM util.fail('TL422', format('%s: %s is not a non-negative amount with at most 6 decimals', p_path, p_credits));
  END IF;
  RETURN v::bigint;
END $_$;

COMMENT ON FUNCTION billing.to_micros(p_credits jsonb, p_path text) IS 'A catalog or command-line amount of credits (JSON number, or a string of plain decimal digits: 12, 0.5; no exponent, sign or spaces) as micro-credits; TL422 naming p_path when it is not a non-negative amount with at most 6 decimals.';

REVOKE ALL ON FUNCTION billing.to_micros(p_credits jsonb, p_path text) FROM PUBLIC;

CREATE FUNCTION billing.ts(p_unix jsonb) RETURNS timestamp with time zone
    LANGUAGE sql IMMUTABLE
    AS $$
  SELECT CASE WHEN jsonb_typeof(p_unix) = 'number' THEN to_timestamp((p_unix #>> '{}')::bigint) END
$$;

COMMENT ON FUNCTION billing.ts(p_unix jsonb) IS 'A Stripe Unix timestamp (seconds) as timestamptz; NULL when absent.';

REVOKE ALL ON FUNCTION billing.ts(p_unix jsonb) FROM PUBLIC;

CREATE FUNCTION billing.upsert_price(p_id text, p_def jsonb, p_path text, p_plan text, p_interval text, p_credits_micros bigint) RETURNS void
    LANGUAGE plpgsql
    AS $_$
BEGIN
  IF p_id !~ '^[a-z][a-z0-9_]{0,62}$' THEN
    PERFORM util.fail('TL422', format('%s: a price id is lower-case letters, digits and _', p_path));
  END IF;
  IF coalesce(p_def ->> 'stripe_price', '') = '' THEN
    PERFORM util.fail('TL422', format('%s.stripe_price: the Stripe price id (price_...) is required', p_path));
  END IF;
  IF jsonb_typeof(p_def -> 'amount') IS DISTINCT FROM 'number' OR (p_def ->> 'amount')::numeric < 0
     OR (p_def ->> 'amount')::numeric <> trunc((p_def ->> 'amount')::numeric) THEN
    PERFORM util.fail('TL422', format('%s.amount: an amount in minor units (cents) is required', p_path));
  END IF;
  IF coalesce(p_def ->> 'usage_type', 'licensed') NOT IN ('licensed', 'metered')
     OR (p_def ->> 'usage_type' = 'metered' AND p_plan IS NULL) THEN
    PERFORM util.fail('TL422', format('%s.usage_type: licensed, or metered (a plan''s price on a Stripe meter)', p_path));
  END IF;
  INSERT INTO billing.prices (id, stripe_price_id, plan_id, interval, credits_micros, amount_minor, currency, name, active,
                              usage_type)
  VALUES (p_id, p_def ->> 'stripe_price', p_plan, p_interval, p_credits_micros, (p_def ->> 'amount')::bigint,
          lower(coalesce(p_def ->> 'currency', 'usd')), coalesce(p_def ->> 'name', p_id), true,
          coalesce(p_def ->> 'usage_type', 'licensed'))
  ON CONFLICT (id) DO UPDATE SET
    stripe_price_id = EXCLUDED.stripe_price_id, plan_id = EXCLUDED.plan_id, interval = EXCLUDED.interval,
    credits_micros = EXCLUDED.credits_micros, amount_minor = EXCLUDED.amount_minor, currency = EXCLUDED.currency,
    name = EXCLUDED.name, active = true, usage_type = EXCLUDED.usage_type;
END $_$;

COMMENT ON FUNCTION billing.upsert_price(p_id text, p_def jsonb, p_path text, p_plan text, p_interval text, p_credits_micros bigint) IS 'Catalog loader helper: insert or update one Stripe price ({stripe_price, amount (minor units), currency, name, usage_type: licensed | metered}) of a plan or a bundle. TL422 naming p_path.';

REVOKE ALL ON FUNCTION billing.upsert_price(p_id text, p_def jsonb, p_path text, p_plan text, p_interval text, p_credits_micros bigint) FROM PUBLIC;

CREATE FUNCTION identity.account_json(a identity.accounts, p_role text) RETURNS jsonb
    LANGUAGE sql STABLE
    AS $$
  SELECT jsonb_build_object('id', a.id, 'object', 'account', 'kind', a.kind, 'name', a.name, 'role', p_role,
                            'plan', identity.effective_plan(a), 'credits', util.credits(a.credit_balance_micros),
                            'suspended', a.suspended_at IS NOT NULL, 'created_at', util.iso(a.created_at))
$$;

COMMENT ON FUNCTION identity.account_json(a identity.accounts, p_role text) IS 'An account as /v1/accounts shows it to a member: {id, kind (person, team), name, role, plan, credits, suspended, created_at}.';

REVOKE ALL ON FUNCTION identity.account_json(a identity.accounts, p_role text) FROM PUBLIC;

CREATE FUNCTION identity.active_session(p_session_id uuid) RETURNS identity.sessions
    LANGUAGE plpgsql
    AS $$
DECLARE
  s identity.sessions;
BEGIN
  SELECT * INTO s FROM identity.sessions
  WHERE id = p_session_id AND revoked_at IS NULL AND expires_at > util.now();
  IF NOT FOUND THEN
    PERFORM util.fail('TL401', 'the session has ended: sign in again');
  END IF;
  IF s.client_id IS NOT NULL THEN
    -- An app's access token acts only within its scopes (identity.authenticate), never as the person.
    PERFORM util.fail('TL403', 'an app''s access token cannot manage the account: it holds only the scopes it was granted');
  END IF;
  RETURN s;
END $$;

COMMENT ON FUNCTION identity.active_session(p_session_id uuid) IS 'The session, if neither revoked nor expired; TL401 otherwise. TL403 for a session an OpenID Connect client holds (issue 25): managing sessions, keys, teams and sign-in methods is for the person''s own sign-ins.';

REVOKE ALL ON FUNCTION identity.active_session(p_session_id uuid) FROM PUBLIC;

CREATE FUNCTION identity.api_key_checksum(p_prefix_and_body text) RETURNS text
    LANGUAGE sql IMMUTABLE
    AS $$
  SELECT left(encode(sha256(convert_to(p_prefix_and_body, 'UTF8')), 'hex'), 8)
$$;

COMMENT ON FUNCTION identity.api_key_checksum(p_prefix_and_body text) IS 'The 8 hex characters that end an API key: the start of SHA-256(pgt_ + body). api/security.py checks it before any lookup, so a mistyped key is refused without touching the database.';

REVOKE ALL ON FUNCTION identity.api_key_checksum(p_prefix_and_body text) FROM PUBLIC;

CREATE FUNCTION identity.api_key_json(k identity.api_keys) RETURNS jsonb
    LANGUAGE sql STABLE
    AS $$
  SELECT jsonb_build_object('id', k.id, 'name', k.name, 'display', k.display, 'scopes', to_jsonb(k.scopes),
                            'created_at', util.iso(k.created_at), 'last_used_at', util.iso(k.last_used_at),
                            'expires_at', util.iso(k.expires_at))
$$;

COMMENT ON FUNCTION identity.api_key_json(k identity.api_keys) IS 'An API key as GET /v1/api-keys shows it (never the key itself).';

REVOKE ALL ON FUNCTION identity.api_key_json(k identity.api_keys) FROM PUBLIC;

CREATE FUNCTION identity.authenticate(p_api_key text, p_session_id uuid, p_scope text, p_account_id uuid DEFAULT NULL::uuid) RETURNS uuid
    LANGUAGE sql
    AS $$
  SELECT (identity.authenticate_principal(p_api_key, p_session_id, p_scope, p_account_id)).account_id
$$;

COMMENT ON FUNCTION identity.authenticate(p_api_key text, p_session_id uuid, p_scope text, p_account_id uuid) IS 'The one function that decides whether a principal may do p_scope (a permission: usage:read, usage:write, billing:read, billing:manage, members:read, members:manage, keys:manage, sso:manage) on an account, and which account a request acts on. Principal: an API key (by SHA-256 hash; not revoked or expired; must hold p_scope; a key a member made holds at most what that member''s role allows now) or a session id from a verified access token (a client session must hold p_scope among its granted scopes). p_account_id: act on that account: a service key on any account, a signed-in person on an account they are a member of with a role that grants p_scope (identity.role_permissions). A suspended account may not spend or buy (usage:write, billing:manage: TL4S3, answered 403 account-suspended). TL401 unknown key or ended session, TL403 missing scope or role, TL404 unknown account. Keeps last_used_at, at most once a minute, unless the database cannot write (read-only, SQLSTATE 25006, or disk full, 53100): then the read goes on without it.';

REVOKE ALL ON FUNCTION identity.authenticate(p_api_key text, p_session_id uuid, p_scope text, p_account_id uuid) FROM PUBLIC;

CREATE FUNCTION identity.authenticate_principal(p_api_key text, p_session_id uuid, p_scope text, p_account_id uuid DEFAULT NULL::uuid, OUT account_id uuid, OUT api_key_id uuid, OUT user_id uuid) RETURNS record
    LANGUAGE plpgsql
    AS $$
#variable_conflict use_column
DECLARE
  k identity.api_keys;
  s identity.sessions;
  v_account_id uuid;
BEGIN
  IF p_api_key IS NOT NULL THEN
    SELECT * INTO k FROM identity.api_keys
    WHERE key_hash = util.token_hash(p_api_key) AND revoked_at IS NULL
      AND (expires_at IS NULL OR expires_at > util.now());
    IF NOT FOUND THEN
      PERFORM util.fail('TL401', 'the API key is not valid');
    END IF;
    IF k.last_used_at IS NULL OR k.last_used_at < util.now() - interval '1 minute' THEN
      BEGIN
        UPDATE identity.api_keys SET last_used_at = util.now() WHERE id = k.id;
      EXCEPTION WHEN read_only_sql_transaction OR disk_full THEN
        NULL;   -- a database that cannot write still serves reads: last_used_at waits
      END;
    END IF;
    IF p_account_id IS NOT NULL AND p_account_id <> k.account_id THEN
      IF NOT 'service' = ANY (k.scopes) THEN
        PERFORM util.fail('TL403', 'only a service key may act on behalf of another account');
      END IF;
      IF NOT EXISTS (SELECT 1 FROM identity.accounts WHERE id = p_account_id AND merged_into IS NULL) THEN
        PERFORM util.fail('TL404', format('no account %s', p_account_id));
      END IF;
      v_account_id := p_account_id;
    ELSIF NOT (p_scope = ANY (k.scopes) OR 'service' = ANY (k.scopes)) THEN
      PERFORM util.fail('TL403', format('this API key lacks the %s scope', p_scope));
    ELSIF k.created_by IS NOT NULL AND NOT identity.member_may(k.created_by, k.account_id, p_scope) THEN
      -- A member's key holds at most what the member's role allows now.
      PERFORM util.fail('TL403', format('the member who made this key may no longer %s on this account', p_scope));
    ELSE
      v_account_id := k.account_id;
    END IF;
  ELSIF p_session_id IS NOT NULL THEN
    SELECT * INTO s FROM identity.sessions
    WHERE id = p_session_id AND revoked_at IS NULL AND expires_at > util.now();
    IF NOT FOUND THEN
      PERFORM util.fail('TL401', 'the session has ended: sign in again');
    END IF;
    IF s.last_used_at < util.now() - interval '1 minute' THEN
      BEGIN
        UPDATE identity.sessions SET last_used_at = util.now() WHERE id = s.id;
      EXCEPTION WHEN read_only_sql_transaction OR disk_full THEN
        NULL;   -- as above
      END;
    END IF;
    IF s.scopes IS NOT NULL AND NOT p_scope = ANY (s.scopes) THEN
      -- A client's access token holds only the scopes the person granted it (issue 25).
      PERFORM util.fail('TL403', format('this access token lacks the %s scope', p_scope));
    END IF;
    IF p_account_id IS NOT NULL AND p_account_id <> s.account_id THEN
      -- Another account the person belongs to (a team), if their role there allows it.
      IF s.user_id IS NULL OR NOT identity.member_may(s.user_id, p_account_id, p_scope) THEN
        PERFORM util.fail('TL403', format('you may not %s on account %s', p_scope, p_account_id),
                          jsonb_build_object('account_id', p_account_id, 'permission', p_scope));
      END IF;
      v_account_id := p_account_id;
    ELSE
      v_account_id := s.account_id;
    END IF;
  ELSE
    PERFORM util.fail('TL401', 'an API key or access token is required');
  END IF;
  IF p_scope IN ('usage:write', 'billing:manage') THEN
    IF EXISTS (SELECT 1 FROM identity.accounts WHERE id = v_account_id AND suspended_at IS NOT NULL) THEN
      PERFORM util.fail('TL4S3', 'this account is suspended',
                        (SELECT jsonb_build_object('account_id', id, 'reason', suspended_reason, 'suspended_at', util.iso(suspended_at))
                         FROM identity.accounts WHERE id = v_account_id));
    END IF;
  END IF;
  account_id := v_account_id;
  api_key_id := k.id;                    -- (NULL for a session)
  user_id := coalesce(k.created_by, s.user_id);
END $$;

COMMENT ON FUNCTION identity.authenticate_principal(p_api_key text, p_session_id uuid, p_scope text, p_account_id uuid, OUT account_id uuid, OUT api_key_id uuid, OUT user_id uuid) IS 'identity.authenticate with the principal it found: account_id (the account the request acts on), api_key_id (the key, NULL for a session) and user_id (the session''s person, or the member who made the key; NULL for operator keys and anonymous devices). Charges and holds call it to record who spent and to apply key and member budgets (issue #28).';

REVOKE ALL ON FUNCTION identity.authenticate_principal(p_api_key text, p_session_id uuid, p_scope text, p_account_id uuid, OUT account_id uuid, OUT api_key_id uuid, OUT user_id uuid) FROM PUBLIC;

CREATE FUNCTION identity.change_membership(p_session_id uuid, p_account_id uuid, p_user_id uuid, p_role text) RETURNS jsonb
    LANGUAGE plpgsql
    AS $$
DECLARE
  v_actor identity.users := identity.member_user(p_session_id);
  v_account_id uuid;
  v_actor_role text;
  m identity.memberships;
BEGIN
  IF p_role IS NOT NULL AND p_role NOT IN ('owner', 'admin', 'member', 'billing', 'viewer') THEN
    PERFORM util.fail('TL422', 'a role is owner, admin, member, billing or viewer', '{"field": "role"}');
  END IF;
  -- Leaving an account needs no permission; changing someone else does.
  IF p_user_id = v_actor.id AND p_role IS NULL THEN
    v_account_id := identity.authenticate(NULL, p_session_id, 'members:read', p_account_id);
  ELSE
    v_account_id := identity.authenticate(NULL, p_session_id, 'members:manage', p_account_id);
  END IF;
  -- Every change of an account's members serialises on its row: the owner count below is exact.
  PERFORM 1 FROM identity.accounts WHERE id = v_account_id FOR NO KEY UPDATE;
  SELECT role INTO v_actor_role FROM identity.memberships WHERE account_id = v_account_id AND user_id = v_actor.id;
  SELECT * INTO m FROM identity.memberships WHERE account_id = v_account_id AND user_id = p_user_id;
  IF NOT FOUND THEN
    PERFORM util.fail('TL404', 'no such member');
  END IF;
  IF coalesce(v_actor_role, '') <> 'owner' AND (p_role = 'owner' OR (m.role = 'owner' AND p_user_id <> v_actor.id)) THEN
    PERFORM util.fail('TL403', 'only an owner makes or unmakes owners');
  END IF;
  IF p_user_id = (SELECT u.id FROM identity.users u WHERE u.account_id = v_account_id) THEN
    PERFORM util.fail('TL40C', 'a person''s own account stays theirs');
  END IF;
  IF p_role IS NULL THEN
    DELETE FROM identity.memberships WHERE account_id = v_account_id AND user_id = p_user_id;
    -- Their keys on this account stop at once.
    UPDATE identity.api_keys SET revoked_at = util.now()
    WHERE account_id = v_account_id AND created_by = p_user_id AND revoked_at IS NULL;
  ELSE
    UPDATE identity.memberships SET role = p_role WHERE account_id = v_account_id AND user_id = p_user_id;
  END IF;
  -- Their pending invitations go too, unless their role still lets them send each one.
  DELETE FROM identity.invitations i
  WHERE i.account_id = v_account_id AND i.invited_by = p_user_id
    AND NOT identity.may_invite(i.invited_by, i.account_id, i.role);
  IF NOT EXISTS (SELECT 1 FROM identity.memberships WHERE account_id = v_account_id AND role = 'owner') THEN
    PERFORM util.fail('TL40C', 'an account keeps at least one owner: make someone else owner first');
  END IF;
  IF p_role IS NULL AND p_user_id = v_actor.id THEN
    RETURN jsonb_build_object('data', '[]'::jsonb);     -- they left: the list is no longer theirs to see
  END IF;
  RETURN api.members(p_session_id, v_account_id);
END $$;

COMMENT ON FUNCTION identity.change_membership(p_session_id uuid, p_account_id uuid, p_user_id uuid, p_role text) IS 'Change a member''s role (p_role), or remove them (p_role NULL; anyone may leave), with the account row locked: only owners make or unmake owners, and an account always keeps an owner (TL40C, nothing changed). A removed member''s keys on the account are revoked, and so are the pending invitations they sent that their new role (or none) no longer allows (identity.may_invite; issue #22 item 5).';

REVOKE ALL ON FUNCTION identity.change_membership(p_session_id uuid, p_account_id uuid, p_user_id uuid, p_role text) FROM PUBLIC;

CREATE FUNCTION identity.claim_one_time_token(p_token text, p_purpose text) RETURNS uuid
    LANGUAGE sql
    AS $$
  UPDATE identity.one_time_tokens SET used_at = util.now()
  WHERE token_hash = util.token_hash(p_token) AND purpose = p_purpose
    AND used_at IS NULL AND expires_at > util.now()
  RETURNING user_id
$$;

COMMENT ON FUNCTION identity.claim_one_time_token(p_token text, p_purpose text) IS 'Use a one-time token: its user id, or NULL when unknown, used or expired. Atomic: of two concurrent claims one wins.';

REVOKE ALL ON FUNCTION identity.claim_one_time_token(p_token text, p_purpose text) FROM PUBLIC;

CREATE FUNCTION identity.effective_plan(a identity.accounts) RETURNS text
    LANGUAGE sql STABLE
    AS $$
  -- A failed subscription payment keeps the plan until the grace period ends, then meters as free.
  SELECT CASE WHEN a.plan_grace_until < util.now() THEN 'free' ELSE a.plan_id END
$$;

COMMENT ON FUNCTION identity.effective_plan(a identity.accounts) IS 'The plan an account is metered on now: its plan, or free once a payment grace period (plan_grace_until) has passed.';

REVOKE ALL ON FUNCTION identity.effective_plan(a identity.accounts) FROM PUBLIC;

CREATE FUNCTION identity.email_domain(p_email text) RETURNS text
    LANGUAGE sql IMMUTABLE
    AS $$
  SELECT split_part(lower(btrim(p_email)), '@', 2)
$$;

COMMENT ON FUNCTION identity.email_domain(p_email text) IS 'The domain of an address, lower case ('''' when it has no @).';

REVOKE ALL ON FUNCTION identity.email_domain(p_email text) FROM PUBLIC;

CREATE FUNCTION identity.error(p_sqlstate text, p_message text, p_extra jsonb DEFAULT '{}'::jsonb) RETURNS jsonb
    LANGUAGE sql IMMUTABLE
    AS $$
  SELECT jsonb_build_object('error', jsonb_build_object('sqlstate', p_sqlstate, 'message', p_message) || p_extra)
$$;

COMMENT ON FUNCTION identity.error(p_sqlstate text, p_message text, p_extra jsonb) IS 'An error returned rather than raised (so what the call wrote commits): {"error": {"sqlstate": "TL429", "message": ..., extra members}}.';

REVOKE ALL ON FUNCTION identity.error(p_sqlstate text, p_message text, p_extra jsonb) FROM PUBLIC;

CREATE FUNCTION identity.identity_name(p_provider text, p_email text) RETURNS text
    LANGUAGE plpgsql STABLE
    AS $$
BEGIN
  RETURN CASE p_provider WHEN 'google' THEN 'Google' WHEN 'github' THEN 'GitHub'
         ELSE coalesce((SELECT a.name FROM identity.accounts a WHERE a.id = identity.sso_team_of(p_email)),
                       'Your organisation''s sign-in') END;
END $$;

COMMENT ON FUNCTION identity.identity_name(p_provider text, p_email text) IS 'What a person calls a linked identity: Google, GitHub, or for a team''s own provider (sso) the name of the team whose proven domain the identity''s address is in (identity.sso_team_of), else "Your organisation''s sign-in" (the team turned SSO off or lost the domain).';

REVOKE ALL ON FUNCTION identity.identity_name(p_provider text, p_email text) FROM PUBLIC;

CREATE FUNCTION identity.invitation_json(i identity.invitations) RETURNS jsonb
    LANGUAGE sql STABLE
    AS $$
  SELECT jsonb_build_object('id', i.id, 'object', 'invitation', 'account_id', i.account_id, 'email', i.email_normalized,
                            'role', i.role, 'created_at', util.iso(i.created_at), 'expires_at', util.iso(i.expires_at),
                            'sent', i.sent_count)
$$;

COMMENT ON FUNCTION identity.invitation_json(i identity.invitations) IS 'An invitation as the API shows it (never its token).';

REVOKE ALL ON FUNCTION identity.invitation_json(i identity.invitations) FROM PUBLIC;

CREATE FUNCTION identity.issue_api_key(p_account_id uuid, p_name text DEFAULT ''::text, p_scopes text[] DEFAULT '{usage:write,usage:read}'::text[], p_expires_at timestamp with time zone DEFAULT NULL::timestamp with time zone, OUT id uuid, OUT api_key text) RETURNS record
    LANGUAGE plpgsql
    AS $$
DECLARE
  v_body text := 'pgt_' || util.random_token();
BEGIN
  api_key := v_body || identity.api_key_checksum(v_body);
  INSERT INTO identity.api_keys (account_id, name, key_hash, display, scopes, expires_at, created_at)
  VALUES (p_account_id, coalesce(p_name, ''), util.token_hash(api_key),
          left(api_key, 8) || '...' || right(api_key, 4), identity.scope_set(p_scopes), p_expires_at, util.now())
  RETURNING identity.api_keys.id INTO id;
END $$;

COMMENT ON FUNCTION identity.issue_api_key(p_account_id uuid, p_name text, p_scopes text[], p_expires_at timestamp with time zone, OUT id uuid, OUT api_key text) IS 'Create an API key for an account: returns its id and the key (pgt_ + 64 random characters + 8-character checksum), which is stored only as a SHA-256 hash; its scopes are stored once each (identity.scope_set).';

REVOKE ALL ON FUNCTION identity.issue_api_key(p_account_id uuid, p_name text, p_scopes text[], p_expires_at timestamp with time zone, OUT id uuid, OUT api_key text) FROM PUBLIC;

CREATE FUNCTION identity.issue_refresh_token(p_session_id uuid) RETURNS text
    LANGUAGE plpgsql
    AS $$
DECLARE
  v_token text := 'rt_' || util.random_token();
BEGIN
  INSERT INTO identity.refresh_tokens (session_id, token_hash, created_at, expires_at)
  SELECT p_session_id, util.token_hash(v_token), util.now(), s.expires_at FROM identity.sessions s WHERE s.id = p_session_id;
  RETURN v_token;
END $$;

COMMENT ON FUNCTION identity.issue_refresh_token(p_session_id uuid) IS 'A new refresh token for a session, valid until the session expires.';

REVOKE ALL ON FUNCTION identity.issue_refresh_token(p_session_id uuid) FROM PUBLIC;

CREATE FUNCTION identity.key_account(p_session_id uuid, p_account_id uuid) RETURNS identity.sessions
    LANGUAGE plpgsql
    AS $$
DECLARE
  s identity.sessions := identity.active_session(p_session_id);
BEGIN
  IF s.user_id IS NULL THEN
    PERFORM util.fail('TL403', 'sign up or log in to manage API keys');
  END IF;
  s.account_id := identity.authenticate(NULL, p_session_id, 'keys:manage', p_account_id);
  RETURN s;
END $$;

COMMENT ON FUNCTION identity.key_account(p_session_id uuid, p_account_id uuid) IS 'The signed-in person''s session, its account_id set to the account whose keys they manage (their own, or p_account_id where their role grants keys:manage). TL403 otherwise.';

REVOKE ALL ON FUNCTION identity.key_account(p_session_id uuid, p_account_id uuid) FROM PUBLIC;

CREATE FUNCTION identity.link_identity(p_user_id uuid, p_provider text, p_subject text, p_email text, p_email_verified boolean) RETURNS void
    LANGUAGE sql
    AS $$
  INSERT INTO identity.user_identities (provider, subject, user_id, email, email_verified, linked_at, last_sign_in_at)
  VALUES (p_provider, p_subject, p_user_id, left(p_email, 320), coalesce(p_email_verified, false), util.now(), util.now())
$$;

COMMENT ON FUNCTION identity.link_identity(p_user_id uuid, p_provider text, p_subject text, p_email text, p_email_verified boolean) IS 'Link a provider account to a user.';

REVOKE ALL ON FUNCTION identity.link_identity(p_user_id uuid, p_provider text, p_subject text, p_email text, p_email_verified boolean) FROM PUBLIC;

CREATE FUNCTION identity.link_lifetime(p_purpose text) RETURNS text
    LANGUAGE sql IMMUTABLE
    AS $$
  SELECT CASE p_purpose WHEN 'verify_email' THEN '24 hours' WHEN 'password_reset' THEN '1 hour'
                        WHEN 'invitation' THEN '7 days' WHEN 'sso_link' THEN '1 hour' END
$$;

COMMENT ON FUNCTION identity.link_lifetime(p_purpose text) IS 'How long an emailed link of each purpose works, as words an email can say and an interval casts from (''24 hours''): verify_email, password_reset, invitation, sso_link. The one place these lifetimes are written: the tokens expire by it and the emails (payload valid_for) and pages say it.';

REVOKE ALL ON FUNCTION identity.link_lifetime(p_purpose text) FROM PUBLIC;

CREATE FUNCTION identity.log_event(p_kind text, p_user_id uuid, p_account_id uuid, p_session_id uuid, p_ip text, p_user_agent text, p_detail jsonb DEFAULT '{}'::jsonb) RETURNS void
    LANGUAGE sql
    AS $$
  INSERT INTO identity.auth_events (kind, user_id, account_id, session_id, ip, user_agent, detail, created_at)
  VALUES (p_kind, p_user_id, p_account_id, p_session_id, p_ip, left(p_user_agent, 512), coalesce(p_detail, '{}'), util.now())
$$;

COMMENT ON FUNCTION identity.log_event(p_kind text, p_user_id uuid, p_account_id uuid, p_session_id uuid, p_ip text, p_user_agent text, p_detail jsonb) IS 'Append one authentication event. Callers never pass a secret.';

REVOKE ALL ON FUNCTION identity.log_event(p_kind text, p_user_id uuid, p_account_id uuid, p_session_id uuid, p_ip text, p_user_agent text, p_detail jsonb) FROM PUBLIC;

CREATE FUNCTION identity.mark_email_verified(p_user_id uuid) RETURNS boolean
    LANGUAGE plpgsql
    AS $$
DECLARE
  u identity.users;
  v_bonus bigint;
BEGIN
  -- The claim: the first verification only, whatever the number of links or providers.
  UPDATE identity.users SET email_verified_at = util.now()
  WHERE id = p_user_id AND email_verified_at IS NULL RETURNING * INTO u;
  IF u.id IS NULL THEN
    RETURN false;
  END IF;
  PERFORM 1 FROM identity.accounts WHERE id = u.account_id FOR NO KEY UPDATE;
  SELECT p.signup_bonus_micros INTO v_bonus
  FROM identity.accounts a JOIN billing.plans p ON p.id = identity.effective_plan(a) WHERE a.id = u.account_id;
  PERFORM ledger.grant_lot(u.account_id, 'signup_bonus', v_bonus, 'signup_bonus', 'sign-up bonus', util.now());
  PERFORM billing.qualify_referral(u.account_id, 'email_verified', 'user:' || u.id);
  RETURN true;
END $$;

COMMENT ON FUNCTION identity.mark_email_verified(p_user_id uuid) IS 'Mark a user''s email verified, the first time only (returns false after): in the same transaction grant the plan''s sign-up bonus once per person (a signup_bonus lot) and qualify a referral whose program qualifies on email_verified. Every path that verifies an address (the emailed link, a password reset, a provider that vouches for it) calls it.';

REVOKE ALL ON FUNCTION identity.mark_email_verified(p_user_id uuid) FROM PUBLIC;

CREATE FUNCTION identity.may_invite(p_user_id uuid, p_account_id uuid, p_role text) RETURNS boolean
    LANGUAGE sql STABLE
    AS $$
  SELECT identity.member_may(p_user_id, p_account_id, 'members:manage')
         AND (p_role <> 'owner' OR EXISTS (SELECT 1 FROM identity.memberships
                                           WHERE account_id = p_account_id AND user_id = p_user_id AND role = 'owner'))
$$;

COMMENT ON FUNCTION identity.may_invite(p_user_id uuid, p_account_id uuid, p_role text) IS 'Whether a person may, now, invite someone to an account with p_role: their role there grants members:manage, and only owners invite owners. Checked when the invitation is sent (api.invite), again when it is accepted (api.accept_invitation), and when the sender''s role changes (identity.change_membership revokes what it no longer allows). Issue #22 item 5.';

REVOKE ALL ON FUNCTION identity.may_invite(p_user_id uuid, p_account_id uuid, p_role text) FROM PUBLIC;

CREATE FUNCTION identity.member_may(p_user_id uuid, p_account_id uuid, p_permission text) RETURNS boolean
    LANGUAGE sql STABLE
    AS $$
  SELECT EXISTS (SELECT 1 FROM identity.memberships m
                 JOIN identity.role_permissions r ON r.role = m.role AND r.permission = p_permission
                 WHERE m.account_id = p_account_id AND m.user_id = p_user_id)
$$;

COMMENT ON FUNCTION identity.member_may(p_user_id uuid, p_account_id uuid, p_permission text) IS 'Whether a user''s role on an account grants a permission (identity.role_permissions).';

REVOKE ALL ON FUNCTION identity.member_may(p_user_id uuid, p_account_id uuid, p_permission text) FROM PUBLIC;

CREATE FUNCTION identity.member_user(p_session_id uuid) RETURNS identity.users
    LANGUAGE plpgsql
    AS $$
DECLARE
  s identity.sessions := identity.active_session(p_session_id);
  u identity.users;
BEGIN
  SELECT * INTO u FROM identity.users WHERE id = s.user_id;
  IF NOT FOUND THEN
    PERFORM util.fail('TL403', 'sign up or log in first: this is for people, not devices');
  END IF;
  RETURN u;
END $$;

COMMENT ON FUNCTION identity.member_user(p_session_id uuid) IS 'The signed-in person of a session (teams, staff); TL403 for an anonymous device.';

REVOKE ALL ON FUNCTION identity.member_user(p_session_id uuid) FROM PUBLIC;

CREATE FUNCTION identity.merge_device(p_device_session_id uuid, p_target_account_id uuid, p_ip text, p_user_agent text) RETURNS jsonb
    LANGUAGE plpgsql
    AS $$
DECLARE
  v_device uuid;
  v_credits bigint;
  v_user uuid;
  v_oldest timestamptz;
BEGIN
  SELECT s.account_id INTO v_device
  FROM identity.sessions s JOIN identity.accounts a ON a.id = s.account_id
  WHERE s.id = p_device_session_id AND s.revoked_at IS NULL AND a.kind = 'device' AND a.merged_into IS NULL;
  IF v_device IS NULL OR v_device = p_target_account_id THEN
    RETURN NULL;
  END IF;
  -- Both accounts change: lock them in id order.
  PERFORM 1 FROM identity.accounts WHERE id IN (v_device, p_target_account_id) ORDER BY id FOR NO KEY UPDATE;
  -- The claim: exactly once, whoever else tries at the same time.
  UPDATE identity.accounts SET merged_into = p_target_account_id
  WHERE id = v_device AND merged_into IS NULL
  RETURNING credit_balance_micros INTO v_credits;
  IF NOT FOUND THEN
    RETURN NULL;
  END IF;
  IF v_credits > 0 THEN
    PERFORM ledger.post_transfer(v_device, 'adjustments', -v_credits, 'adjustment', 'merge:' || p_target_account_id,
                                 NULL, 'moved to account ' || p_target_account_id, p_lots => false);
    PERFORM ledger.post_transfer(p_target_account_id, 'adjustments', v_credits, 'adjustment', 'merge:' || v_device,
                                 NULL, 'moved from device account ' || v_device, p_lots => false);
  END IF;
  -- The lots move as they are: where they came from, what remains, when they expire.
  UPDATE ledger.credit_lots SET account_id = p_target_account_id,
                                grant_key = left('merged:' || v_device || ':' || grant_key, 255)
  WHERE account_id = v_device AND status IN ('active', 'pending');
  UPDATE identity.accounts SET credits_due_at = least(credits_due_at, (SELECT credits_due_at FROM identity.accounts WHERE id = v_device))
  WHERE id = p_target_account_id;
  -- The device's usage events move with their idempotency keys, except those whose key the user
  -- already used (they stay with the device, as the same key cannot name two events).
  UPDATE metering.idempotency_keys k SET account_id = p_target_account_id
  WHERE k.account_id = v_device
    AND NOT EXISTS (SELECT 1 FROM metering.idempotency_keys t
                    WHERE t.account_id = p_target_account_id AND t.idempotency_key = k.idempotency_key);
  WITH moved AS (
    UPDATE metering.usage_events e SET account_id = p_target_account_id
    WHERE e.account_id = v_device
      AND NOT EXISTS (SELECT 1 FROM metering.idempotency_keys t
                      WHERE t.account_id = v_device AND t.idempotency_key = e.idempotency_key)
    RETURNING e.created_at)
  SELECT min(created_at) INTO v_oldest FROM moved;
  -- Windows that now hold the device's usage start again from the events (metering.window_usage),
  -- whatever period the user's plan counts in.
  DELETE FROM metering.allowance_usage
  WHERE account_id = v_device OR (account_id = p_target_account_id AND period_end > v_oldest);
  UPDATE identity.sessions SET revoked_at = util.now(), revoked_reason = 'merged'
  WHERE account_id = v_device AND revoked_at IS NULL;
  -- What the device bought moves with it: its subscriptions, and its Stripe customer when the
  -- user has none yet (webhooks naming the device find the user through merged_into).
  UPDATE billing.subscriptions SET account_id = p_target_account_id WHERE account_id = v_device;
  IF NOT EXISTS (SELECT 1 FROM billing.customers WHERE account_id = p_target_account_id) THEN
    UPDATE billing.customers SET account_id = p_target_account_id WHERE account_id = v_device;
  END IF;
  UPDATE billing.payments SET account_id = p_target_account_id WHERE account_id = v_device;
  IF EXISTS (SELECT 1 FROM billing.subscriptions WHERE account_id = p_target_account_id) THEN
    PERFORM billing.sync_account_plan(p_target_account_id);
  END IF;
  SELECT id INTO v_user FROM identity.users WHERE account_id = p_target_account_id;
  PERFORM identity.log_event('device_merged', v_user, p_target_account_id, NULL, p_ip, p_user_agent,
                             jsonb_build_object('device_account_id', v_device, 'credits_micros', v_credits));
  RETURN jsonb_build_object('device_account_id', v_device, 'credits', util.credits(v_credits));
END $$;

COMMENT ON FUNCTION identity.merge_device(p_device_session_id uuid, p_target_account_id uuid, p_ip text, p_user_agent text) IS 'Move an anonymous device account (found by its active session) into a user''s account, exactly once: credits through two ledger transfers via the adjustments account, usage events re-pointed (the user''s windows that now hold them are counted again from the events), subscriptions, payments and (when the user has none) the Stripe customer moved, device sessions revoked. The device account keeps its install hash: the install stays linked to the person (api.identify answers for them until a session of the install is revoked). NULL when there is nothing to merge.';

REVOKE ALL ON FUNCTION identity.merge_device(p_device_session_id uuid, p_target_account_id uuid, p_ip text, p_user_agent text) FROM PUBLIC;

CREATE FUNCTION identity.new_account(p_plan text, p_kind text, p_name text, p_credits_micros bigint, p_id uuid DEFAULT NULL::uuid, p_fingerprint text DEFAULT NULL::text) RETURNS uuid
    LANGUAGE plpgsql
    AS $$
DECLARE
  v_account_id uuid;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM billing.plans WHERE id = p_plan AND active) THEN
    PERFORM util.fail('TL422', format('there is no active plan %L', p_plan),
                      jsonb_build_object('plans', (SELECT jsonb_agg(id ORDER BY id) FROM billing.plans WHERE active)));
  END IF;
  IF p_credits_micros IS NULL OR p_credits_micros < 0 THEN
    PERFORM util.fail('TL422', 'initial credits cannot be negative');
  END IF;
  IF length(p_name) > 200 THEN
    PERFORM util.fail('TL422', 'an account name has at most 200 characters');
  END IF;
  IF p_kind IS NULL OR p_kind NOT IN ('person', 'team', 'device', 'service') THEN
    PERFORM util.fail('TL422', 'an account kind is person, team, device or service');
  END IF;
  INSERT INTO identity.accounts (id, kind, name, plan_id, device_fingerprint, created_at, credits_due_at)
  VALUES (coalesce(p_id, util.uuid_v7()), p_kind, p_name, p_plan, p_fingerprint, util.now(),
          CASE WHEN (SELECT monthly_credits_micros FROM billing.plans WHERE id = p_plan) > 0 THEN util.now() END)
  RETURNING id INTO v_account_id;
  IF p_credits_micros > 0 THEN
    PERFORM ledger.post_transfer(v_account_id, 'grants', p_credits_micros, 'grant',
                                 'initial-credits', NULL, 'initial credits');
  END IF;
  RETURN v_account_id;
END $$;

COMMENT ON FUNCTION identity.new_account(p_plan text, p_kind text, p_name text, p_credits_micros bigint, p_id uuid, p_fingerprint text) IS 'Create an account on an active plan, with initial credits (micro-credits) granted through the ledger (a promotion lot); a plan with monthly credits makes them due at once. TL422 unknown plan or bad input.';

REVOKE ALL ON FUNCTION identity.new_account(p_plan text, p_kind text, p_name text, p_credits_micros bigint, p_id uuid, p_fingerprint text) FROM PUBLIC;

CREATE FUNCTION identity.new_personal_account(p_user_id uuid, p_account_id uuid) RETURNS uuid
    LANGUAGE plpgsql
    AS $$
BEGIN
  PERFORM identity.new_account('free', 'person', NULL, 0, p_account_id);
  INSERT INTO identity.memberships (account_id, user_id, role, created_at)
  VALUES (p_account_id, p_user_id, 'owner', util.now());
  RETURN p_account_id;
END $$;

COMMENT ON FUNCTION identity.new_personal_account(p_user_id uuid, p_account_id uuid) IS 'A new person''s own account (free plan), which they own: every sign-up path calls it.';

REVOKE ALL ON FUNCTION identity.new_personal_account(p_user_id uuid, p_account_id uuid) FROM PUBLIC;

CREATE FUNCTION identity.normalize_email(p_email text) RETURNS text
    LANGUAGE plpgsql IMMUTABLE
    AS $_$
DECLARE
  v text := lower(btrim(p_email));
BEGIN
  IF v IS NULL OR length(v) > 320 OR v !~ '^[^@[:space:]]+@[^@[:space:]]+\.[^@[:space:]]+$' THEN
    PERFORM util.fail('TL422', 'a valid email address is required');
  END IF;
  RETURN v;
END $_$;

COMMENT ON FUNCTION identity.normalize_email(p_email text) IS 'lower(trim(email)), after a shape check (one @, a dot in the domain, no spaces, at most 320 characters). TL422 otherwise.';

REVOKE ALL ON FUNCTION identity.normalize_email(p_email text) FROM PUBLIC;

CREATE FUNCTION identity.normalize_user_code(p_code text) RETURNS text
    LANGUAGE sql IMMUTABLE
    AS $$
  SELECT upper(regexp_replace(coalesce(p_code, ''), '[^A-Za-z]', '', 'g'))
$$;

COMMENT ON FUNCTION identity.normalize_user_code(p_code text) IS 'A user code as typed (any case, with or without the dash or spaces) in its stored form: XXXX-XXXX -> XXXXXXXX (RFC 8628 section 6.1).';

REVOKE ALL ON FUNCTION identity.normalize_user_code(p_code text) FROM PUBLIC;

CREATE FUNCTION identity.oauth_error(p_error text, p_description text) RETURNS jsonb
    LANGUAGE sql IMMUTABLE
    AS $$
  SELECT jsonb_build_object('oauth_error', jsonb_build_object('error', p_error, 'error_description', p_description))
$$;

COMMENT ON FUNCTION identity.oauth_error(p_error text, p_description text) IS 'An OAuth token endpoint error (RFC 6749 section 5.2, RFC 8628 section 3.5), returned so that what the call wrote commits: {"oauth_error": {"error", "error_description"}}.';

REVOKE ALL ON FUNCTION identity.oauth_error(p_error text, p_description text) FROM PUBLIC;

CREATE FUNCTION identity.oidc_check_uris(p_uris text[], p_what text) RETURNS text[]
    LANGUAGE plpgsql IMMUTABLE
    AS $_$
DECLARE
  v text;
BEGIN
  FOREACH v IN ARRAY coalesce(p_uris, '{}') LOOP
    -- https anywhere; plain http only on this machine's loopback (RFC 8252 section 7.3); no fragment.
    IF length(v) > 500 OR v !~ '^(https://[^/?#[:space:]@]+|http://(127\.0\.0\.1|localhost|\[::1\])(:[0-9]{1,5})?)(/[^#[:space:]]*)?$' THEN
      PERFORM util.fail('TL422', format('%s %L is not an https URI (or http on 127.0.0.1, localhost or [::1]) without a fragment',
                                        p_what, v), jsonb_build_object('field', p_what));
    END IF;
  END LOOP;
  RETURN coalesce(p_uris, '{}');
END $_$;

COMMENT ON FUNCTION identity.oidc_check_uris(p_uris text[], p_what text) IS 'Check redirect URIs: absolute https (a browser extension''s https://<extension-id>.chromiumapp.org/ too), or http on loopback for native apps (RFC 8252), no fragment, no user info, at most 500 characters. TL422 naming the first bad one.';

REVOKE ALL ON FUNCTION identity.oidc_check_uris(p_uris text[], p_what text) FROM PUBLIC;

CREATE FUNCTION identity.oidc_claims(p_session_id uuid) RETURNS jsonb
    LANGUAGE plpgsql STABLE
    AS $$
BEGIN
  RETURN (SELECT jsonb_strip_nulls(jsonb_build_object(
           'sub', u.id::text,
           'email', CASE WHEN 'email' = ANY (s.scopes) THEN u.email END,
           'email_verified', CASE WHEN 'email' = ANY (s.scopes) THEN u.email_verified_at IS NOT NULL END,
           'name', CASE WHEN 'profile' = ANY (s.scopes) THEN coalesce(a.name, u.email) END))
         || jsonb_build_object('https://pgtally.dev/claims', jsonb_build_object(
           'account_id', a.id, 'plan', identity.effective_plan(a),
           'teams', coalesce((SELECT jsonb_agg(jsonb_build_object('account_id', t.id, 'name', t.name, 'role', m.role)
                                               ORDER BY t.created_at, t.id)
                              FROM identity.memberships m JOIN identity.accounts t ON t.id = m.account_id
                              WHERE m.user_id = u.id AND t.kind = 'team' AND t.merged_into IS NULL), '[]')))
  FROM identity.sessions s JOIN identity.users u ON u.id = s.user_id JOIN identity.accounts a ON a.id = u.account_id
  WHERE s.id = p_session_id);
END $$;

COMMENT ON FUNCTION identity.oidc_claims(p_session_id uuid) IS 'The person''s claims for a client session: sub (the stable user id), email and email_verified (scope email), name (scope profile: the account''s name, else the email), and the namespaced https://pgtally.dev/claims {account_id, plan, teams [{account_id, name, role}]}.';

REVOKE ALL ON FUNCTION identity.oidc_claims(p_session_id uuid) FROM PUBLIC;

CREATE FUNCTION identity.oidc_client_auth(p_client_id text, p_client_secret text) RETURNS text
    LANGUAGE plpgsql STABLE
    AS $$
BEGIN
  RETURN (SELECT c.id FROM identity.oauth_clients c
          WHERE c.id = p_client_id AND c.revoked_at IS NULL
            AND CASE WHEN c.secret_hash IS NULL THEN p_client_secret IS NULL
                     ELSE p_client_secret IS NOT NULL AND c.secret_hash = util.token_hash(p_client_secret) END);
END $$;

COMMENT ON FUNCTION identity.oidc_client_auth(p_client_id text, p_client_secret text) IS 'Client authentication at the token endpoint (RFC 6749 section 2.3): the active client''s id, when a confidential client sent its secret (Basic or form) or a public one sent none; NULL otherwise (invalid_client).';

REVOKE ALL ON FUNCTION identity.oidc_client_auth(p_client_id text, p_client_secret text) FROM PUBLIC;

CREATE FUNCTION identity.oidc_forget_old_codes() RETURNS integer
    LANGUAGE plpgsql
    AS $$
DECLARE
  v_count integer;
BEGIN
  DELETE FROM identity.authorization_codes
  WHERE id IN (SELECT id FROM identity.authorization_codes WHERE expires_at < util.now() - interval '1 day'
               ORDER BY expires_at LIMIT 100 FOR UPDATE SKIP LOCKED);
  GET DIAGNOSTICS v_count = ROW_COUNT;
  RETURN v_count;
END $$;

COMMENT ON FUNCTION identity.oidc_forget_old_codes() IS 'Delete up to 100 authorization codes that expired more than a day ago (a code lives 60 seconds; a replay that late is refused as unknown). Called with each new code, so the table stays small without a worker.';

REVOKE ALL ON FUNCTION identity.oidc_forget_old_codes() FROM PUBLIC;

CREATE FUNCTION identity.oidc_id_token(p_session_id uuid, p_nonce text) RETURNS jsonb
    LANGUAGE plpgsql STABLE
    AS $$
BEGIN
  RETURN (SELECT identity.oidc_claims(s.id)
         || jsonb_strip_nulls(jsonb_build_object('aud', s.client_id, 'sid', s.id, 'nonce', p_nonce,
                                                 'auth_time', floor(extract(epoch FROM s.auth_time))::bigint))
  FROM identity.sessions s WHERE s.id = p_session_id);
END $$;

COMMENT ON FUNCTION identity.oidc_id_token(p_session_id uuid, p_nonce text) IS 'The ID token claims of a client session (OpenID Connect Core section 2) except iss, iat and exp, which the signing server adds: identity.oidc_claims plus aud (the client id), sid (the session), nonce (the authorization request''s) and auth_time (seconds since the epoch).';

REVOKE ALL ON FUNCTION identity.oidc_id_token(p_session_id uuid, p_nonce text) FROM PUBLIC;

CREATE FUNCTION identity.oidc_origin(p_uri text) RETURNS text
    LANGUAGE sql IMMUTABLE
    AS $$
  SELECT lower(substring(p_uri FROM '^([A-Za-z][A-Za-z0-9+.-]*://[^/?#]+)'))
$$;

COMMENT ON FUNCTION identity.oidc_origin(p_uri text) IS 'The origin (scheme://host[:port], lower case) of a URI, as a browser sends it in Origin.';

REVOKE ALL ON FUNCTION identity.oidc_origin(p_uri text) FROM PUBLIC;

CREATE FUNCTION identity.oidc_scopes() RETURNS text[]
    LANGUAGE sql IMMUTABLE
    AS $$
  SELECT '{openid,profile,email,offline_access,usage:read,usage:write,billing:read,billing:manage}'::text[]
$$;

COMMENT ON FUNCTION identity.oidc_scopes() IS 'The scopes a client may ask for: OpenID Connect''s (openid, profile, email, offline_access) and the API-key scopes its access tokens then hold on the JSON API (usage:read, usage:write, billing:read, billing:manage).';

REVOKE ALL ON FUNCTION identity.oidc_scopes() FROM PUBLIC;

CREATE FUNCTION identity.one_time_token(p_user_id uuid, p_purpose text, p_lifetime interval) RETURNS text
    LANGUAGE plpgsql
    AS $$
DECLARE
  v_token text := util.random_token();
BEGIN
  INSERT INTO identity.one_time_tokens (user_id, purpose, token_hash, created_at, expires_at)
  VALUES (p_user_id, p_purpose, util.token_hash(v_token), util.now(), util.now() + p_lifetime);
  RETURN v_token;
END $$;

COMMENT ON FUNCTION identity.one_time_token(p_user_id uuid, p_purpose text, p_lifetime interval) IS 'Create a verify_email or password_reset token; returns the token, stored only as its hash.';

REVOKE ALL ON FUNCTION identity.one_time_token(p_user_id uuid, p_purpose text, p_lifetime interval) FROM PUBLIC;

CREATE FUNCTION identity.pending_device_code(p_session_id uuid, p_user_code text, p_ip text, OUT d identity.device_codes, OUT error jsonb) RETURNS record
    LANGUAGE plpgsql
    AS $$
DECLARE
  s identity.sessions := identity.active_session(p_session_id);
  v_code text := identity.normalize_user_code(p_user_code);
BEGIN
  IF s.user_id IS NULL THEN
    PERFORM util.fail('TL403', 'sign in to approve a device');
  END IF;
  -- Guesses: limited per IP and per user, and lookups of any one code (identity.rate_limit_rules).
  error := identity.throttled('device_code', p_ip, 'user', s.user_id::text);
  IF error IS NULL THEN
    error := identity.throttled('device_code_lookup', NULL, 'code', v_code);
  END IF;
  IF error IS NOT NULL THEN
    RETURN;
  END IF;
  SELECT * INTO d FROM identity.device_codes
  WHERE user_code = v_code AND status = 'pending' AND expires_at > util.now() FOR UPDATE;
  IF NOT FOUND THEN
    error := identity.error('TL404', 'no waiting request with this code: check it, or start again on the device');
  END IF;
END $$;

COMMENT ON FUNCTION identity.pending_device_code(p_session_id uuid, p_user_code text, p_ip text, OUT d identity.device_codes, OUT error jsonb) IS 'The pending, unexpired device code a signed-in user typed, locked; or an error (TL404 unknown, decided or expired; TL429 too many guesses) to return.';

REVOKE ALL ON FUNCTION identity.pending_device_code(p_session_id uuid, p_user_code text, p_ip text, OUT d identity.device_codes, OUT error jsonb) FROM PUBLIC;

CREATE FUNCTION identity.public_mail_domain(p_domain text) RETURNS boolean
    LANGUAGE plpgsql STABLE
    AS $$
BEGIN
  RETURN (SELECT EXISTS (SELECT 1 FROM identity.public_mail_domains p
                 WHERE p_domain = p.domain OR p_domain LIKE '%.' || p.domain));
END $$;

COMMENT ON FUNCTION identity.public_mail_domain(p_domain text) IS 'Whether a domain is a public mail domain (identity.public_mail_domains) or a subdomain of one: never claimable for SSO.';

REVOKE ALL ON FUNCTION identity.public_mail_domain(p_domain text) FROM PUBLIC;

CREATE FUNCTION identity.published_signing_keys() RETURNS TABLE(kid text, public_jwk jsonb, created_at timestamp with time zone)
    LANGUAGE plpgsql STABLE
    AS $$
BEGIN
  RETURN QUERY SELECT x.kid, x.public_jwk, x.created_at FROM (
    SELECT k.kid, k.public_jwk, k.created_at, lead(k.created_at) OVER (ORDER BY k.created_at, k.kid) AS superseded_at
    FROM identity.signing_keys k) x
  -- An ID token lives an hour, and a server keeps signing with the key it read for up to 5
  -- minutes after a rotation: a superseded key stays published 75 minutes.
  WHERE x.superseded_at IS NULL OR x.superseded_at > util.now() - interval '75 minutes'
  ORDER BY x.created_at DESC, x.kid DESC;
END $$;

COMMENT ON FUNCTION identity.published_signing_keys() IS 'The signing keys in the JWKS: the newest, and each older one until 75 minutes after a newer one was added (ID tokens live 60 minutes; servers cache the signing key 5 minutes).';

REVOKE ALL ON FUNCTION identity.published_signing_keys() FROM PUBLIC;

CREATE FUNCTION identity.refresh_session(p_refresh_token text, p_client_id text, p_ip text, p_user_agent text) RETURNS jsonb
    LANGUAGE plpgsql
    AS $$
DECLARE
  v_hash bytea := util.token_hash(p_refresh_token);
  v_session_id uuid;
  r identity.refresh_tokens;
  s identity.sessions;
BEGIN
  -- A client's refresh token works only for that client, and pgtally's own only without one.
  IF (SELECT x.client_id FROM identity.refresh_tokens t JOIN identity.sessions x ON x.id = t.session_id
      WHERE t.token_hash = v_hash) IS DISTINCT FROM p_client_id THEN
    RETURN identity.error('TL401', 'the refresh token was not issued to this client');
  END IF;
  -- The claim: one of any number of concurrent refreshes of this token wins it.
  UPDATE identity.refresh_tokens t SET used_at = util.now()
  FROM identity.sessions x
  WHERE t.token_hash = v_hash AND t.used_at IS NULL AND t.expires_at > util.now()
    AND x.id = t.session_id AND x.revoked_at IS NULL AND x.expires_at > util.now()
  RETURNING t.session_id INTO v_session_id;
  IF v_session_id IS NOT NULL THEN
    UPDATE identity.sessions SET last_used_at = util.now() WHERE id = v_session_id;
    RETURN identity.tokens(v_session_id, identity.successor_token(v_session_id, p_refresh_token));
  END IF;

  SELECT * INTO r FROM identity.refresh_tokens WHERE token_hash = v_hash;
  SELECT * INTO s FROM identity.sessions WHERE id = r.session_id;
  IF r.id IS NULL OR s.revoked_at IS NOT NULL OR r.expires_at <= util.now() OR s.expires_at <= util.now() THEN
    RETURN identity.error('TL401', 'the refresh token is not valid: sign in again');
  END IF;
  -- Used already. Within the grace window it is a concurrent refresh (two tabs, a retried
  -- request): it gets the same successor as the first, so the family stays one chain. Later it
  -- is reuse: revoke the family.
  IF r.used_at > util.now() - interval '10 seconds' THEN
    RETURN identity.tokens(s.id, identity.successor_token(s.id, p_refresh_token));
  END IF;
  UPDATE identity.sessions SET revoked_at = util.now(), revoked_reason = 'refresh_token_reuse'
  WHERE id = s.id AND revoked_at IS NULL;
  PERFORM identity.log_event('refresh_token_reuse', s.user_id, s.account_id, s.id, p_ip, p_user_agent,
                             jsonb_build_object('refresh_token_id', r.id));
  RETURN identity.error('TL401', 'this refresh token was already used: the session is revoked, sign in again');
END $$;

COMMENT ON FUNCTION identity.refresh_session(p_refresh_token text, p_client_id text, p_ip text, p_user_agent text) IS 'Rotate a refresh token (the old one stops working) and return identity.tokens. A token used within the last 10 seconds yields the same successor again (identity.successor_token: concurrent refreshes and retries continue one chain and do not lock the user out); a token used earlier revokes the whole session and is logged as refresh_token_reuse (RFC 9700 section 4.14.2). TL401 errors are returned, not raised, so the revocation commits. p_client_id: the OpenID Connect client the token was issued to (NULL: pgtally''s own sign-ins); a token of another client is TL401 and changes nothing (issue 25).';

REVOKE ALL ON FUNCTION identity.refresh_session(p_refresh_token text, p_client_id text, p_ip text, p_user_agent text) FROM PUBLIC;

CREATE FUNCTION identity.request_sso_link(u identity.users, p_team_id uuid, p_subject text, p_email text, p_ip text, p_user_agent text) RETURNS jsonb
    LANGUAGE plpgsql
    AS $$
DECLARE
  v_token text := util.random_token();
BEGIN
  -- One email per user and team every 10 minutes, however often the provider signs them in.
  IF EXISTS (SELECT 1 FROM identity.sso_link_requests WHERE user_id = u.id AND account_id = p_team_id AND used_at IS NULL
                                                        AND created_at > util.now() - interval '10 minutes') THEN
    RETURN jsonb_build_object('status', 'sso_link_email_sent', 'email', u.email_normalized,
                              'valid_for', identity.link_lifetime('sso_link'));
  END IF;
  INSERT INTO identity.sso_link_requests (token_hash, user_id, account_id, subject, email, created_at, expires_at)
  VALUES (util.token_hash(v_token), u.id, p_team_id, p_subject, left(p_email, 320), util.now(), util.now() + identity.link_lifetime('sso_link')::interval);
  INSERT INTO outbox.messages (kind, recipient, payload, created_at, next_attempt_at)
  VALUES ('sso_link', u.email_normalized,
          jsonb_build_object('email', u.email_normalized, 'token', v_token, 'valid_for', identity.link_lifetime('sso_link'),
                             'team', (SELECT name FROM identity.accounts WHERE id = p_team_id)),
          util.now(), util.now());
  PERFORM identity.log_event('sso_link_requested', u.id, u.account_id, NULL, p_ip, p_user_agent,
                             jsonb_build_object('team', p_team_id));
  RETURN jsonb_build_object('status', 'sso_link_email_sent', 'email', u.email_normalized,
                            'valid_for', identity.link_lifetime('sso_link'));
END $$;

COMMENT ON FUNCTION identity.request_sso_link(u identity.users, p_team_id uuid, p_subject text, p_email text, p_ip text, p_user_agent text) IS 'A team''s provider signed in the address of an existing user who never linked it: nothing is linked; a one-hour, single-use link goes to that address (outbox sso_link; at most one every 10 minutes per user and team) and the caller is told to open it. An identity provider, even of a proven domain, never takes over a user on its word alone.';

REVOKE ALL ON FUNCTION identity.request_sso_link(u identity.users, p_team_id uuid, p_subject text, p_email text, p_ip text, p_user_agent text) FROM PUBLIC;

CREATE FUNCTION identity.scope_set(p_scopes text[]) RETURNS text[]
    LANGUAGE sql IMMUTABLE
    AS $$
  SELECT coalesce(array_agg(s ORDER BY i), '{}') FROM (SELECT s, min(i) AS i FROM unnest(p_scopes) WITH ORDINALITY AS u(s, i) GROUP BY s) d
$$;

COMMENT ON FUNCTION identity.scope_set(p_scopes text[]) IS 'A key''s scopes as a set: each scope once, in the order first given (empty for NULL). A key sent usage:write a thousand times stores it once (issue 22).';

REVOKE ALL ON FUNCTION identity.scope_set(p_scopes text[]) FROM PUBLIC;

CREATE FUNCTION identity.sso_json(p_account_id uuid) RETURNS jsonb
    LANGUAGE plpgsql STABLE
    AS $$
BEGIN
  RETURN (SELECT jsonb_build_object('account_id', c.account_id, 'issuer', c.issuer, 'client_id', c.client_id,
                            'domains', coalesce((SELECT jsonb_agg(d.domain ORDER BY d.domain) FROM identity.sso_domains d
                                                 WHERE d.account_id = c.account_id), '[]'),
                            'domain_verification', coalesce((
                              SELECT jsonb_agg(jsonb_build_object(
                                       'domain', d.domain, 'verified', d.verified_at IS NOT NULL,
                                       'verified_by', d.verified_by, 'verified_at', util.iso(d.verified_at),
                                       'txt_record', jsonb_build_object('name', d.domain,
                                                                        'value', identity.sso_txt_value(d.verification_token)))
                                     ORDER BY d.domain)
                              FROM identity.sso_domains d WHERE d.account_id = c.account_id), '[]'),
                            'require_sso', c.require_sso, 'updated_at', util.iso(c.updated_at))
  FROM identity.sso_connections c WHERE c.account_id = p_account_id);
END $$;

COMMENT ON FUNCTION identity.sso_json(p_account_id uuid) IS 'A team''s SSO settings as the API shows them (never the client secret): its claimed domains and, per domain, whether it is verified and the TXT record that proves it.';

REVOKE ALL ON FUNCTION identity.sso_json(p_account_id uuid) FROM PUBLIC;

CREATE FUNCTION identity.sso_required(p_user_id uuid) RETURNS boolean
    LANGUAGE plpgsql STABLE
    AS $$
BEGIN
  RETURN (SELECT EXISTS (SELECT 1 FROM identity.users u
                 JOIN identity.sso_domains d ON d.domain = identity.email_domain(u.email_normalized) AND d.verified_at IS NOT NULL
                 JOIN identity.sso_connections c ON c.account_id = d.account_id AND c.require_sso
                 JOIN identity.memberships m ON m.account_id = c.account_id AND m.user_id = u.id
                 WHERE u.id = p_user_id));
END $$;

COMMENT ON FUNCTION identity.sso_required(p_user_id uuid) IS 'Whether this user must sign in through their team''s provider: they are a member of a team that requires SSO and proved the domain of their address. Strangers who merely share the domain are never bound by it.';

REVOKE ALL ON FUNCTION identity.sso_required(p_user_id uuid) FROM PUBLIC;

CREATE FUNCTION identity.sso_team_of(p_email text) RETURNS uuid
    LANGUAGE plpgsql STABLE
    AS $$
BEGIN
  RETURN (SELECT d.account_id FROM identity.sso_domains d
          WHERE d.domain = identity.email_domain(p_email) AND d.verified_at IS NOT NULL
            AND NOT identity.public_mail_domain(d.domain));
END $$;

COMMENT ON FUNCTION identity.sso_team_of(p_email text) IS 'The team whose provider signs in this address: the one that proved the address''s domain (at most one, sso_domains_verified_domain_key); NULL when none. Unproven claims, and public mail domains however they were proven, count for nothing.';

REVOKE ALL ON FUNCTION identity.sso_team_of(p_email text) FROM PUBLIC;

CREATE FUNCTION identity.sso_txt_value(p_token text) RETURNS text
    LANGUAGE sql IMMUTABLE
    AS $$
  SELECT 'pgtally-domain-verification=' || p_token
$$;

COMMENT ON FUNCTION identity.sso_txt_value(p_token text) IS 'The TXT record value that proves a team owns a domain it claimed for SSO (published on the domain itself, as Google''s and Microsoft''s domain verifications are).';

REVOKE ALL ON FUNCTION identity.sso_txt_value(p_token text) FROM PUBLIC;

CREATE FUNCTION identity.staff(p_session_id uuid, p_action text) RETURNS identity.users
    LANGUAGE plpgsql
    AS $$
DECLARE
  u identity.users := identity.member_user(p_session_id);
BEGIN
  IF u.staff_role IS NULL THEN
    PERFORM util.fail('TL403', 'staff only');
  END IF;
  -- support reads and grants (within a limit, checked by the action); admin does everything.
  IF u.staff_role = 'support' AND p_action NOT IN ('read', 'adjust_credits') THEN
    PERFORM util.fail('TL403', format('%s needs the admin staff role', p_action), jsonb_build_object('staff_role', u.staff_role));
  END IF;
  RETURN u;
END $$;

COMMENT ON FUNCTION identity.staff(p_session_id uuid, p_action text) IS 'The signed-in staff user for an admin action: read (support, admin), adjust_credits (support: grants up to 50 credits; admin: any), refund, set_plan, suspend, unsuspend, revoke_sessions (admin). TL403 for customers and for support doing an admin''s action.';

REVOKE ALL ON FUNCTION identity.staff(p_session_id uuid, p_action text) FROM PUBLIC;

CREATE FUNCTION identity.start_session(p_account_id uuid, p_user_id uuid, p_ip text, p_user_agent text, p_method text DEFAULT 'password'::text) RETURNS jsonb
    LANGUAGE plpgsql
    AS $$
DECLARE
  v_session_id uuid;
BEGIN
  INSERT INTO identity.sessions (account_id, user_id, ip, user_agent, created_at, last_used_at, expires_at, method)
  VALUES (p_account_id, p_user_id, left(p_ip, 64), left(p_user_agent, 512), util.now(), util.now(),
          util.now() + interval '30 days', p_method)
  RETURNING id INTO v_session_id;
  RETURN identity.tokens(v_session_id, identity.issue_refresh_token(v_session_id));
END $$;

COMMENT ON FUNCTION identity.start_session(p_account_id uuid, p_user_id uuid, p_ip text, p_user_agent text, p_method text) IS 'Start a session (a refresh-token family, 30 days at most) begun by p_method (password, google, github, device, device_code) and return identity.tokens for it.';

REVOKE ALL ON FUNCTION identity.start_session(p_account_id uuid, p_user_id uuid, p_ip text, p_user_agent text, p_method text) FROM PUBLIC;

CREATE FUNCTION identity.successor_token(p_session_id uuid, p_refresh_token text) RETURNS text
    LANGUAGE sql
    AS $$
  -- Derived, not random: every retry of one token inside the grace window gets this same
  -- successor, and only its hash is stored (a database reader cannot derive it: the parent's
  -- plaintext is needed too).
  WITH next AS (
    SELECT s.id, s.expires_at,
           'rt_' || util.base64url(util.hmac_sha256(s.refresh_secret, convert_to(p_refresh_token, 'UTF8'))) AS token
    FROM identity.sessions s WHERE s.id = p_session_id),
  stored AS (
    INSERT INTO identity.refresh_tokens (session_id, token_hash, created_at, expires_at)
    SELECT id, util.token_hash(token), util.now(), expires_at FROM next
    ON CONFLICT (token_hash) DO NOTHING)
  SELECT token FROM next
$$;

COMMENT ON FUNCTION identity.successor_token(p_session_id uuid, p_refresh_token text) IS 'The refresh token that follows p_refresh_token in its session: HMAC-SHA256(session.refresh_secret, token), stored (as a hash) the first time. Every retry of one token gets the same successor, so concurrent refreshes continue one chain.';

REVOKE ALL ON FUNCTION identity.successor_token(p_session_id uuid, p_refresh_token text) FROM PUBLIC;

CREATE FUNCTION identity.throttled(p_action text, p_ip text, p_dimension text DEFAULT NULL::text, p_value text DEFAULT NULL::text) RETURNS jsonb
    LANGUAGE plpgsql
    AS $$
DECLARE
  v_now timestamptz := util.now();
  v_retry integer := 0;
  v_recent timestamptz[];
  b record;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM identity.rate_limit_rules WHERE action = p_action) THEN
    RAISE EXCEPTION 'no rate limit rule for %', p_action;      -- a caller's mistake, never a free pass
  END IF;
  -- Each bucket's row is locked (in bucket order, so two attempts never wait on each other
  -- crosswise) until the caller's transaction ends: attempts on one bucket are decided one at a time.
  FOR b IN SELECT v.bucket, r.max_attempts AS lim, r.per AS win
           FROM (VALUES ('ip', p_action || ':ip:' || p_ip), (p_dimension, p_action || ':' || p_dimension || ':' || p_value))
                AS v (dimension, bucket)
           JOIN identity.rate_limit_rules r ON r.action = p_action AND r.dimension = v.dimension
           WHERE v.bucket IS NOT NULL ORDER BY v.bucket LOOP
    INSERT INTO identity.rate_limits (bucket, hits) VALUES (b.bucket, '{}') ON CONFLICT (bucket) DO NOTHING;
    SELECT ARRAY(SELECT h FROM unnest(r.hits) h WHERE h > v_now - b.win ORDER BY h) INTO v_recent
    FROM identity.rate_limits r WHERE r.bucket = b.bucket FOR UPDATE;
    IF cardinality(v_recent) >= b.lim THEN
      -- Allowed again once enough of the attempts counted now are older than the window.
      v_retry := greatest(v_retry, 1, CASE WHEN b.lim < 1 THEN ceil(extract(epoch FROM b.win))
                                          ELSE ceil(extract(epoch FROM v_recent[cardinality(v_recent) - b.lim + 1] + b.win - v_now))
                                          END::integer);
    END IF;
  END LOOP;
  IF v_retry = 0 THEN
    -- Allowed: the attempt counts in every bucket; what left the window is dropped.
    FOR b IN SELECT v.bucket, r.max_attempts AS lim, r.per AS win
             FROM (VALUES ('ip', p_action || ':ip:' || p_ip), (p_dimension, p_action || ':' || p_dimension || ':' || p_value))
                  AS v (dimension, bucket)
             JOIN identity.rate_limit_rules r ON r.action = p_action AND r.dimension = v.dimension
             WHERE v.bucket IS NOT NULL LOOP
      UPDATE identity.rate_limits r
      SET hits = ARRAY(SELECT h FROM (SELECT h FROM unnest(r.hits || v_now) h WHERE h > v_now - b.win
                                      ORDER BY h DESC LIMIT b.lim) newest ORDER BY h)
      WHERE r.bucket = b.bucket;
    END LOOP;
    RETURN NULL;
  END IF;
  PERFORM identity.log_event('rate_limited', NULL, NULL, NULL, p_ip, NULL, jsonb_build_object('action', p_action));
  RETURN identity.error('TL429', format('too many %s attempts; try again in %s seconds', replace(p_action, '_', ' '), v_retry),
                        jsonb_build_object('retry_after', v_retry));
END $$;

COMMENT ON FUNCTION identity.throttled(p_action text, p_ip text, p_dimension text, p_value text) IS 'Apply the rate limits of an action, as identity.rate_limit_rules states them: per IP (its ip rule), and optionally per p_dimension = p_value (email, fingerprint, install, user, code: its rule for that dimension), in sliding windows (the attempts of the last window count, whatever the clock says). NULL when allowed (the attempt then counts in each bucket); else a TL429 error with retry_after (seconds until an attempt is allowed), logged as rate_limited, and the refused attempt is not counted. A NULL p_ip or p_value, or a dimension with no rule, skips that limit; an action with no rule at all is an error. Shared by every server process: each bucket''s row is locked until the caller commits. Issue #22 item 11.';

REVOKE ALL ON FUNCTION identity.throttled(p_action text, p_ip text, p_dimension text, p_value text) FROM PUBLIC;

CREATE FUNCTION identity.tokens(p_session_id uuid, p_refresh_token text) RETURNS jsonb
    LANGUAGE sql STABLE
    AS $$
  SELECT jsonb_build_object('session_id', s.id, 'user_id', s.user_id, 'account_id', s.account_id,
                            'refresh_token', p_refresh_token, 'session_expires_at', util.iso(s.expires_at))
  FROM identity.sessions s WHERE s.id = p_session_id
$$;

COMMENT ON FUNCTION identity.tokens(p_session_id uuid, p_refresh_token text) IS 'What the server needs to answer a sign-in: the session, user and account ids (it signs the access token with them) and the refresh token.';

REVOKE ALL ON FUNCTION identity.tokens(p_session_id uuid, p_refresh_token text) FROM PUBLIC;

CREATE FUNCTION identity.unlink_install_on_revoke() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
  -- The install stops answering for the person, and its other sessions end with this one.
  UPDATE identity.accounts SET device_install_hash = NULL
  WHERE device_install_hash = NEW.install_hash AND merged_into IS NOT NULL;
  UPDATE identity.sessions SET revoked_at = NEW.revoked_at, revoked_reason = NEW.revoked_reason
  WHERE install_hash = NEW.install_hash AND revoked_at IS NULL;
  RETURN NULL;
END $$;

COMMENT ON FUNCTION identity.unlink_install_on_revoke() IS 'Trigger on identity.sessions: when a session POST /v1/identify issued to a linked install (install_hash set) is revoked, for whatever reason (logout of that install, DELETE /v1/me/sessions/{id}, logout everywhere, password reset, refresh-token reuse, staff), the install is unlinked (the merged device account''s device_install_hash cleared, so the next identify starts a fresh device account) and the install''s other sessions are revoked with the same reason. Issue 25: installs keep their person until the person signs out of that install or unlinks it.';

REVOKE ALL ON FUNCTION identity.unlink_install_on_revoke() FROM PUBLIC;

CREATE FUNCTION ledger.check_transfers_balanced() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
DECLARE
  v record;
BEGIN
  SELECT transfer_id, sum(amount_micros) AS off INTO v FROM inserted GROUP BY transfer_id HAVING sum(amount_micros) <> 0 LIMIT 1;
  IF FOUND THEN
    RAISE EXCEPTION 'transfer % is unbalanced by % micro-credits', v.transfer_id, v.off USING ERRCODE = 'TL500';
  END IF;
  RETURN NULL;
END $$;

COMMENT ON FUNCTION ledger.check_transfers_balanced() IS 'Statement-level trigger over the inserted entries: the entries each INSERT writes for a transfer must sum to zero (TL500 otherwise). ledger.post_transfer writes both sides in one statement, so every transfer balances as it is written.';

REVOKE ALL ON FUNCTION ledger.check_transfers_balanced() FROM PUBLIC;

CREATE FUNCTION ledger.credits_json(a identity.accounts) RETURNS jsonb
    LANGUAGE sql STABLE
    AS $$
  SELECT jsonb_build_object(
    'pending', util.credits(coalesce((SELECT sum(remaining_micros) FROM ledger.credit_lots
                                      WHERE account_id = a.id AND status = 'pending'), 0)::bigint),
    'next_expiry', (SELECT jsonb_build_object('credits', util.credits(sum(remaining_micros)::bigint), 'at', util.iso(expires_at))
                    FROM ledger.credit_lots
                    WHERE account_id = a.id AND status = 'active' AND remaining_micros > 0
                      AND expires_at = (SELECT min(expires_at) FROM ledger.credit_lots
                                        WHERE account_id = a.id AND status = 'active' AND remaining_micros > 0)
                    GROUP BY expires_at))
$$;

COMMENT ON FUNCTION ledger.credits_json(a identity.accounts) IS 'What GET /v1/balance adds about lots: pending (credits granted, not spendable yet) and next_expiry {credits, at} (null when nothing expires).';

REVOKE ALL ON FUNCTION ledger.credits_json(a identity.accounts) FROM PUBLIC;

CREATE FUNCTION ledger.entry_json(t ledger.transfers, p_amount_micros bigint, p_balance_after_micros bigint, p_created_at timestamp with time zone) RETURNS jsonb
    LANGUAGE sql STABLE
    AS $$
  SELECT jsonb_build_object(
    'transfer_id', t.id, 'kind', t.kind, 'amount', util.credits(p_amount_micros),
    'balance_after', util.credits(p_balance_after_micros), 'usage_event_id', t.usage_event_id,
    'memo', t.memo, 'created_at', util.iso(p_created_at))
$$;

COMMENT ON FUNCTION ledger.entry_json(t ledger.transfers, p_amount_micros bigint, p_balance_after_micros bigint, p_created_at timestamp with time zone) IS 'A customer ledger entry as the API shows it: {transfer_id, kind, amount, balance_after, usage_event_id, memo, created_at}, credits as decimal strings.';

REVOKE ALL ON FUNCTION ledger.entry_json(t ledger.transfers, p_amount_micros bigint, p_balance_after_micros bigint, p_created_at timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION ledger.grant_lot(p_account_id uuid, p_source text, p_amount_micros bigint, p_grant_key text, p_memo text, p_available_at timestamp with time zone, p_expires_at timestamp with time zone DEFAULT NULL::timestamp with time zone) RETURNS uuid
    LANGUAGE plpgsql
    AS $$
DECLARE
  v_id uuid;
BEGIN
  SELECT id INTO v_id FROM ledger.credit_lots WHERE account_id = p_account_id AND grant_key = p_grant_key;
  IF FOUND OR p_amount_micros <= 0 THEN
    RETURN v_id;                        -- granted once per key
  END IF;
  IF p_available_at <= util.now() THEN
    PERFORM ledger.post_transfer(p_account_id, CASE WHEN p_source IN ('purchase', 'subscription_grant') THEN 'purchases'
                                                    WHEN p_source = 'adjustment' THEN 'adjustments' ELSE 'grants' END,
                                 p_amount_micros, ledger.transfer_kind(p_source), p_grant_key, NULL, p_memo, p_expires_at);
    SELECT id INTO v_id FROM ledger.credit_lots WHERE account_id = p_account_id AND grant_key = p_grant_key;
  ELSE
    INSERT INTO ledger.credit_lots (account_id, source, amount_micros, remaining_micros, status, grant_key,
                                    available_at, expires_at, created_at, memo)
    VALUES (p_account_id, p_source, p_amount_micros, p_amount_micros, 'pending', p_grant_key, p_available_at, p_expires_at,
            util.now(), left(p_memo, 500))
    RETURNING id INTO v_id;
    UPDATE identity.accounts SET credits_due_at = least(credits_due_at, p_available_at) WHERE id = p_account_id;
  END IF;
  RETURN v_id;
END $$;

COMMENT ON FUNCTION ledger.grant_lot(p_account_id uuid, p_source text, p_amount_micros bigint, p_grant_key text, p_memo text, p_available_at timestamp with time zone, p_expires_at timestamp with time zone) IS 'Grant a credit lot once per (account, p_grant_key): spendable now (a ledger transfer from grants, purchases or adjustments brings it into the balance), or pending until p_available_at (no transfer until then; ledger.refresh_lots releases it). Returns the lot id (the existing one on a repeat). Callers lock the account.';

REVOKE ALL ON FUNCTION ledger.grant_lot(p_account_id uuid, p_source text, p_amount_micros bigint, p_grant_key text, p_memo text, p_available_at timestamp with time zone, p_expires_at timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION ledger.lot_json(l ledger.credit_lots) RETURNS jsonb
    LANGUAGE sql STABLE
    AS $$
  SELECT jsonb_build_object('id', l.id, 'object', 'credit_lot', 'source', l.source, 'status', l.status,
                            'amount', util.credits(l.amount_micros), 'remaining', util.credits(l.remaining_micros),
                            'available_at', util.iso(l.available_at), 'expires_at', util.iso(l.expires_at),
                            'memo', l.memo, 'created_at', util.iso(l.created_at))
$$;

COMMENT ON FUNCTION ledger.lot_json(l ledger.credit_lots) IS 'A credit lot as the API shows it: {id, source, status (pending, active, expired, canceled), amount, remaining (credits), available_at, expires_at, memo, created_at}.';

REVOKE ALL ON FUNCTION ledger.lot_json(l ledger.credit_lots) FROM PUBLIC;

CREATE FUNCTION ledger.lot_source(p_kind text) RETURNS text
    LANGUAGE sql IMMUTABLE
    AS $$
  SELECT CASE p_kind WHEN 'grant' THEN 'promotion' WHEN 'plan_credits' THEN 'subscription_grant' ELSE p_kind END
$$;

COMMENT ON FUNCTION ledger.lot_source(p_kind text) IS 'The credit lot source of credits a transfer of kind p_kind brings in: grant -> promotion, plan_credits -> subscription_grant, purchase, adjustment, signup_bonus, monthly_free, referral_reward as they are.';

REVOKE ALL ON FUNCTION ledger.lot_source(p_kind text) FROM PUBLIC;

CREATE FUNCTION ledger.operator_transfer(p_account_id uuid, p_system_account text, p_kind text, p_amount_micros bigint, p_idempotency_key text, p_memo text, OUT replayed boolean, OUT body jsonb) RETURNS record
    LANGUAGE plpgsql
    AS $$
DECLARE
  v_transfer ledger.transfers;
BEGIN
  IF p_idempotency_key IS NULL OR length(p_idempotency_key) NOT BETWEEN 1 AND 255 THEN
    PERFORM util.fail('TL422', 'an idempotency key of 1 to 255 characters is required');
  END IF;
  IF length(p_memo) > 500 THEN
    PERFORM util.fail('TL422', 'a memo has at most 500 characters');
  END IF;
  PERFORM 1 FROM identity.accounts WHERE id = p_account_id FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    PERFORM util.fail('TL404', format('no account %s', p_account_id));
  END IF;
  SELECT * INTO v_transfer FROM ledger.transfers
  WHERE account_id = p_account_id AND idempotency_key = p_idempotency_key;
  IF FOUND THEN                         -- a replay, or TL42R for another transfer
    PERFORM util.idempotency_check(convert_to(v_transfer.kind || ' ' || v_transfer.amount_micros, 'UTF8'),
                                   convert_to(p_kind || ' ' || p_amount_micros, 'UTF8'), 'transfer',
                                   jsonb_build_object('transfer_id', v_transfer.id));
    replayed := true;
  ELSE
    PERFORM ledger.post_transfer(p_account_id, p_system_account, p_amount_micros, p_kind, p_idempotency_key, NULL, p_memo);
    SELECT * INTO v_transfer FROM ledger.transfers
    WHERE account_id = p_account_id AND idempotency_key = p_idempotency_key;
    replayed := false;
  END IF;
  SELECT ledger.entry_json(v_transfer, e.amount_micros, e.balance_after_micros, e.created_at)
         || jsonb_build_object('account_id', p_account_id)
  INTO body
  FROM ledger.entries e WHERE e.transfer_id = v_transfer.id AND e.account_id IS NOT NULL;
END $$;

COMMENT ON FUNCTION ledger.operator_transfer(p_account_id uuid, p_system_account text, p_kind text, p_amount_micros bigint, p_idempotency_key text, p_memo text, OUT replayed boolean, OUT body jsonb) IS 'An operator''s transfer, once per idempotency key: a retry returns the original entry with replayed = true; the same key for another amount or kind is TL42R (util.idempotency_check). TL404 unknown account, TL422 bad key or memo, TL402 when it would take the balance below zero.';

REVOKE ALL ON FUNCTION ledger.operator_transfer(p_account_id uuid, p_system_account text, p_kind text, p_amount_micros bigint, p_idempotency_key text, p_memo text, OUT replayed boolean, OUT body jsonb) FROM PUBLIC;

CREATE FUNCTION ledger.post_transfer(p_account_id uuid, p_system_account text, p_amount_micros bigint, p_kind text, p_idempotency_key text, p_usage_event_id uuid, p_memo text, p_expires_at timestamp with time zone DEFAULT NULL::timestamp with time zone, p_lots boolean DEFAULT true, p_first_lot uuid DEFAULT NULL::uuid, OUT transfer_id uuid, OUT balance_after_micros bigint, OUT created_at timestamp with time zone, OUT lot_id uuid, OUT lot_draws jsonb) RETURNS record
    LANGUAGE plpgsql
    AS $$
BEGIN
  -- The balance update is the overdraft guard: it matches no row when the balance would go
  -- below what open holds reserve (never negative), or past what a bigint holds (compared in
  -- numeric, so the guard cannot overflow).
  UPDATE identity.accounts a
  SET credit_balance_micros = a.credit_balance_micros + p_amount_micros
  WHERE a.id = p_account_id
    AND a.credit_balance_micros::numeric + p_amount_micros BETWEEN a.held_micros AND 9223372036854775807
  RETURNING a.credit_balance_micros INTO balance_after_micros;
  IF NOT FOUND THEN
    IF p_amount_micros > 0 AND EXISTS (SELECT 1 FROM identity.accounts WHERE id = p_account_id) THEN
      PERFORM util.fail('TL422', 'the balance would exceed the largest amount pgtally can hold (9223372036854.775807 credits)');
    END IF;
    IF EXISTS (SELECT 1 FROM identity.accounts WHERE id = p_account_id) THEN
      PERFORM util.fail('TL402', 'not enough credits',
        jsonb_build_object('required_credits', util.credits(-p_amount_micros),
                           'balance', (SELECT util.credits(credit_balance_micros - held_micros) FROM identity.accounts WHERE id = p_account_id)));
    END IF;
    PERFORM util.fail('TL404', format('no account %s', p_account_id));
  END IF;
  created_at := util.now();
  INSERT INTO ledger.transfers (account_id, kind, amount_micros, idempotency_key, usage_event_id, memo, created_at)
  VALUES (p_account_id, p_kind, p_amount_micros, p_idempotency_key, p_usage_event_id, p_memo, created_at)
  RETURNING id INTO transfer_id;
  INSERT INTO ledger.entries (transfer_id, account_id, system_account, amount_micros, balance_after_micros, created_at)
  VALUES (transfer_id, p_account_id, NULL, p_amount_micros, balance_after_micros, created_at),
         (transfer_id, NULL, p_system_account, -p_amount_micros, NULL, created_at);
  IF NOT p_lots THEN
    RETURN;
  ELSIF p_amount_micros > 0 THEN
    INSERT INTO ledger.credit_lots (account_id, source, amount_micros, remaining_micros, status, grant_key, transfer_id,
                                    available_at, expires_at, created_at, memo)
    VALUES (p_account_id, ledger.lot_source(p_kind), p_amount_micros, p_amount_micros, 'active',
            coalesce(p_idempotency_key, 'transfer:' || transfer_id), transfer_id, created_at, p_expires_at, created_at,
            left(p_memo, 500));
    IF p_expires_at IS NOT NULL THEN
      UPDATE identity.accounts SET credits_due_at = least(credits_due_at, p_expires_at) WHERE id = p_account_id;
    END IF;
  ELSE
    SELECT x.first_lot, x.draws INTO lot_id, lot_draws FROM ledger.spend_lots(p_account_id, -p_amount_micros, p_first_lot) x;
  END IF;
END $$;

COMMENT ON FUNCTION ledger.post_transfer(p_account_id uuid, p_system_account text, p_amount_micros bigint, p_kind text, p_idempotency_key text, p_usage_event_id uuid, p_memo text, p_expires_at timestamp with time zone, p_lots boolean, p_first_lot uuid, OUT transfer_id uuid, OUT balance_after_micros bigint, OUT created_at timestamp with time zone, OUT lot_id uuid, OUT lot_draws jsonb) IS 'Move p_amount_micros into a customer account (negative: out of it) from/to a system account: updates the cached balance and writes the transfer and its two entries; credits in become a credit lot (source from p_kind, expiring at p_expires_at), credits out are taken from the lots in the burn order (ledger.spend_lots; p_first_lot first), returned as lot_id and lot_draws (spend_lots'' first_lot and draws). p_lots = false leaves the lots to the caller (releasing a pending lot, expiring one, moving lots at a device merge). TL402 when the balance would go below what holds reserve (or negative), TL422 when it would pass the bigint maximum, TL404 for an unknown account. Callers lock the account first.';

REVOKE ALL ON FUNCTION ledger.post_transfer(p_account_id uuid, p_system_account text, p_amount_micros bigint, p_kind text, p_idempotency_key text, p_usage_event_id uuid, p_memo text, p_expires_at timestamp with time zone, p_lots boolean, p_first_lot uuid, OUT transfer_id uuid, OUT balance_after_micros bigint, OUT created_at timestamp with time zone, OUT lot_id uuid, OUT lot_draws jsonb) FROM PUBLIC;

CREATE FUNCTION ledger.refresh_lots(p_account_id uuid) RETURNS boolean
    LANGUAGE plpgsql
    AS $$
DECLARE
  a identity.accounts;
  l ledger.credit_lots;
  p billing.plans;
  b record;
  v_take bigint;
  v_transfer uuid;
  v_next_grant timestamptz;
BEGIN
  SELECT * INTO a FROM identity.accounts WHERE id = p_account_id;
  IF a.credits_due_at IS NULL OR a.credits_due_at > util.now() THEN
    RETURN false;
  END IF;
  -- Pending lots whose holdback is over become spendable, each through one transfer.
  FOR l IN SELECT * FROM ledger.credit_lots WHERE account_id = p_account_id AND status = 'pending'
                                              AND available_at <= util.now() ORDER BY available_at, id LOOP
    SELECT t.transfer_id INTO v_transfer
    FROM ledger.post_transfer(p_account_id, 'grants', l.remaining_micros, ledger.transfer_kind(l.source), l.grant_key,
                              NULL, l.memo, p_lots => false) t;
    UPDATE ledger.credit_lots SET status = 'active', transfer_id = v_transfer WHERE id = l.id;
  END LOOP;
  -- Expired lots give up what remains, exactly once (the lot's state changes in the same
  -- transaction, under the account lock). Credits open holds reserve are not taken: they stay
  -- in the lot until the hold is captured (which spends this lot first) or released.
  FOR l IN SELECT * FROM ledger.credit_lots WHERE account_id = p_account_id AND status = 'active'
                                              AND remaining_micros > 0 AND expires_at <= util.now()
           ORDER BY expires_at, id LOOP
    SELECT least(l.remaining_micros, credit_balance_micros - held_micros) INTO v_take
    FROM identity.accounts WHERE id = p_account_id;
    IF v_take > 0 THEN
      PERFORM ledger.post_transfer(p_account_id, 'expirations', -v_take, 'expiry',
                                   'expiry:' || l.id || ':' || l.remaining_micros, NULL,
                                   'expired: ' || coalesce(l.memo, l.source), p_lots => false);
      UPDATE ledger.credit_lots
      SET remaining_micros = remaining_micros - v_take,
          status = CASE WHEN remaining_micros = v_take THEN 'expired' ELSE status END,
          settled_at = CASE WHEN remaining_micros = v_take THEN util.now() END
      WHERE id = l.id;
    END IF;
  END LOOP;
  -- Monthly free credits: one lot per billing period, expiring at its end (so they reset).
  SELECT * INTO p FROM billing.plans WHERE id = identity.effective_plan(a);
  IF p.monthly_credits_micros > 0 THEN
    SELECT * INTO b FROM metering.period_bounds('billing_period', util.now(), a.billing_period_start, a.billing_period_end);
    PERFORM ledger.grant_lot(p_account_id, 'monthly_free', p.monthly_credits_micros,
                             'monthly:' || p.id || ':' || util.iso(b.period_start), p.name || ' monthly credits',
                             util.now(), b.period_end);
    v_next_grant := b.period_end;
  END IF;
  UPDATE identity.accounts SET credits_due_at = (
    SELECT min(x) FROM (
      SELECT min(available_at) AS x FROM ledger.credit_lots WHERE account_id = p_account_id AND status = 'pending'
      UNION ALL
      SELECT min(expires_at) FROM ledger.credit_lots WHERE account_id = p_account_id AND status = 'active' AND remaining_micros > 0
      UNION ALL
      SELECT v_next_grant) d)
  WHERE id = p_account_id;
  RETURN true;
END $$;

COMMENT ON FUNCTION ledger.refresh_lots(p_account_id uuid) IS 'When the account''s credits_due_at has passed: make pending lots spendable (one ledger transfer each), expire what remains of expired lots (one expiry transfer each, exactly once; credits held by open holds wait for the hold), grant the plan''s monthly credits for the current billing period (once per period, expiring at its end), and set the next credits_due_at. Returns whether it ran. Called with the account locked: lazily by every charge, hold and balance read, and by the worker (api.refresh_due_credits).';

REVOKE ALL ON FUNCTION ledger.refresh_lots(p_account_id uuid) FROM PUBLIC;

CREATE FUNCTION ledger.refreshed_account(p_account_id uuid) RETURNS identity.accounts
    LANGUAGE plpgsql
    AS $$
DECLARE
  a identity.accounts;
BEGIN
  SELECT * INTO a FROM identity.accounts WHERE id = p_account_id;
  IF a.credits_due_at <= util.now() THEN
    PERFORM 1 FROM identity.accounts WHERE id = p_account_id FOR NO KEY UPDATE;
    PERFORM ledger.refresh_lots(p_account_id);
    SELECT * INTO a FROM identity.accounts WHERE id = p_account_id;
  END IF;
  RETURN a;
END $$;

COMMENT ON FUNCTION ledger.refreshed_account(p_account_id uuid) IS 'An account row for a read (balance, lots): refreshed first, under its lock, only when a lot is due.';

REVOKE ALL ON FUNCTION ledger.refreshed_account(p_account_id uuid) FROM PUBLIC;

CREATE FUNCTION ledger.spend_lots(p_account_id uuid, p_amount_micros bigint, p_first_lot uuid DEFAULT NULL::uuid, OUT first_lot uuid, OUT draws jsonb) RETURNS record
    LANGUAGE plpgsql
    AS $$
DECLARE
  l record;
  v_left bigint := p_amount_micros;
  v_take bigint;
  v_lots uuid[];
  v_takes bigint[];
BEGIN
  -- The burn order: soonest expiry first (never-expiring last), then promotional before paid,
  -- then oldest, as Stripe's credit grants (https://docs.stripe.com/billing/subscriptions/usage-based/billing-credits)
  -- and Lago's wallets (https://getlago.com/docs/guide/wallet-and-prepaid-credits) apply them.
  -- p_first_lot (a refund: the lot the payment bought) goes before all.
  FOR l IN SELECT id, remaining_micros FROM ledger.credit_lots
           WHERE account_id = p_account_id AND status = 'active' AND remaining_micros > 0
           ORDER BY id IS NOT DISTINCT FROM p_first_lot DESC, expires_at ASC NULLS LAST, paid, created_at, id LOOP
    v_take := least(l.remaining_micros, v_left);
    UPDATE ledger.credit_lots SET remaining_micros = remaining_micros - v_take WHERE id = l.id;
    v_left := v_left - v_take;
    IF first_lot IS NULL THEN
      first_lot := l.id;
      EXIT WHEN v_left = 0;              -- (one lot, as most charges: no list)
    END IF;
    v_lots := v_lots || l.id;
    v_takes := v_takes || v_take;
    EXIT WHEN v_left = 0;
  END LOOP;
  IF cardinality(v_lots) > 1 THEN
    SELECT jsonb_agg(jsonb_build_array(x.lot, x.micros) ORDER BY x.n) INTO draws
    FROM unnest(v_lots, v_takes) WITH ORDINALITY x (lot, micros, n);
  END IF;
  IF v_left > 0 THEN
    RAISE EXCEPTION 'the credit lots of account % do not cover its balance', p_account_id
      USING HINT = 'SELECT * FROM reporting.lot_balance_mismatches';
  END IF;
END $$;

COMMENT ON FUNCTION ledger.spend_lots(p_account_id uuid, p_amount_micros bigint, p_first_lot uuid, OUT first_lot uuid, OUT draws jsonb) IS 'Take p_amount_micros out of an account''s active credit lots in the burn order: p_first_lot first when given, then soonest expiry (never-expiring last), promotional before paid, oldest first. One charge may span several lots: first_lot is the first it drew from, draws ([[lot id, micro-credits], ...] in burn order) lists them when there are several (NULL for one), so a reversal can give the credits back to them (metering.reverse_usage). Called by ledger.post_transfer with the account locked.';

REVOKE ALL ON FUNCTION ledger.spend_lots(p_account_id uuid, p_amount_micros bigint, p_first_lot uuid, OUT first_lot uuid, OUT draws jsonb) FROM PUBLIC;

CREATE FUNCTION ledger.transfer_kind(p_source text) RETURNS text
    LANGUAGE sql IMMUTABLE
    AS $$
  SELECT CASE p_source WHEN 'promotion' THEN 'grant' WHEN 'subscription_grant' THEN 'plan_credits' ELSE p_source END
$$;

COMMENT ON FUNCTION ledger.transfer_kind(p_source text) IS 'The transfer kind that brings in a lot of this source (the inverse of ledger.lot_source).';

REVOKE ALL ON FUNCTION ledger.transfer_kind(p_source text) FROM PUBLIC;

CREATE FUNCTION metering.allowance_json(e billing.entitlements, m metering.meters, p_period_start timestamp with time zone, p_period_end timestamp with time zone, p_used bigint) RETURNS json
    LANGUAGE sql STABLE
    AS $$
  SELECT CASE WHEN e.kind = 'post_paid' THEN json_build_object(
    'meter', e.meter_id, 'kind', e.kind, 'unit', CASE m.pricing WHEN 'unit' THEN m.unit ELSE 'micro_credit' END,
    'period', e.period, 'limit', e.limit_units, 'used', p_used,
    'remaining', CASE WHEN e.kind = 'unlimited' THEN NULL ELSE greatest(e.limit_units - p_used, 0) END,
    'period_start', util.iso(p_period_start), 'resets_at', util.iso(p_period_end),
    'unit_amount', e.unit_amount_minor, 'amount', p_used * e.unit_amount_minor)
  ELSE json_build_object(
    'meter', e.meter_id, 'kind', e.kind, 'unit', CASE m.pricing WHEN 'unit' THEN m.unit ELSE 'micro_credit' END,
    'period', e.period, 'limit', e.limit_units, 'used', p_used,
    'remaining', CASE WHEN e.kind = 'unlimited' THEN NULL ELSE greatest(e.limit_units - p_used, 0) END,
    'period_start', util.iso(p_period_start), 'resets_at', util.iso(p_period_end)) END
$$;

COMMENT ON FUNCTION metering.allowance_json(e billing.entitlements, m metering.meters, p_period_start timestamp with time zone, p_period_end timestamp with time zone, p_used bigint) IS 'An entitlement''s state in a period as the API shows it: {meter, kind, unit, period, limit, used, remaining, period_start, resets_at}; limit and remaining are null for unlimited and post_paid; post_paid adds unit_amount and amount (what the period''s units cost, minor units).';

REVOKE ALL ON FUNCTION metering.allowance_json(e billing.entitlements, m metering.meters, p_period_start timestamp with time zone, p_period_end timestamp with time zone, p_used bigint) FROM PUBLIC;

CREATE FUNCTION metering.allowances_json(a identity.accounts) RETURNS jsonb
    LANGUAGE sql STABLE
    AS $$
  SELECT coalesce(jsonb_agg(metering.allowance_json(e, m, p.period_start, p.period_end,
                                                    coalesce(u.used, metering.window_usage(a.id, m, p.period_start, p.period_end)))
                            ORDER BY e.meter_id), '[]')
  FROM billing.entitlements e
  JOIN metering.meters m ON m.id = e.meter_id
  CROSS JOIN LATERAL metering.period_bounds(e.period, util.now(), a.billing_period_start, a.billing_period_end) p
  LEFT JOIN metering.allowance_usage u
    ON u.account_id = a.id AND u.meter_id = e.meter_id AND u.period_start = p.period_start
  WHERE e.plan_id = identity.effective_plan(a)
$$;

COMMENT ON FUNCTION metering.allowances_json(a identity.accounts) IS 'Each entitlement of the account''s plan with the current window''s usage (metering.allowance_json), as GET /v1/balance and POST /v1/identify show them.';

REVOKE ALL ON FUNCTION metering.allowances_json(a identity.accounts) FROM PUBLIC;

CREATE FUNCTION metering.batch_refusal(p_state text, p_message text, p_detail jsonb DEFAULT NULL::jsonb) RETURNS jsonb
    LANGUAGE sql IMMUTABLE
    AS $$
  SELECT jsonb_build_object('status', 'refused', 'sqlstate', p_state, 'message', p_message, 'detail', p_detail)
$$;

COMMENT ON FUNCTION metering.batch_refusal(p_state text, p_message text, p_detail jsonb) IS 'A refused event''s answer in a batch: {status: refused, sqlstate, message, detail}.';

REVOKE ALL ON FUNCTION metering.batch_refusal(p_state text, p_message text, p_detail jsonb) FROM PUBLIC;

CREATE FUNCTION metering.budget_applies(p_scope text, p_subject uuid, p_api_key_id uuid, p_user_id uuid) RETURNS boolean
    LANGUAGE sql IMMUTABLE
    AS $$
  SELECT p_scope = 'account' OR (p_scope = 'api_key' AND p_subject = p_api_key_id)
      OR (p_scope = 'member' AND p_subject = p_user_id)
$$;

COMMENT ON FUNCTION metering.budget_applies(p_scope text, p_subject uuid, p_api_key_id uuid, p_user_id uuid) IS 'Whether a budget of this scope and subject counts a spend on its account by this API key and person: an account budget counts all, a key budget its key''s, a member budget its member''s (the keys they made and their sessions).';

REVOKE ALL ON FUNCTION metering.budget_applies(p_scope text, p_subject uuid, p_api_key_id uuid, p_user_id uuid) FROM PUBLIC;

CREATE FUNCTION metering.budget_json(p_budget_id uuid) RETURNS jsonb
    LANGUAGE sql STABLE
    AS $$
  SELECT jsonb_build_object(
    'id', b.id, 'object', 'budget', 'account_id', b.account_id, 'scope', b.scope, 'subject', b.subject,
    'limit', util.credits(b.limit_micros), 'window', b.period, 'alerts', to_jsonb(b.alerts),
    'spent', util.credits(s.spent), 'remaining', util.credits(greatest(b.limit_micros - s.spent, 0)),
    'period_start', util.iso(p.period_start), 'resets_at', util.iso(p.period_end), 'created_at', util.iso(b.created_at))
  FROM metering.budgets b JOIN identity.accounts a ON a.id = b.account_id
  CROSS JOIN LATERAL metering.period_bounds(b.period, util.now(), a.billing_period_start, a.billing_period_end) p
  CROSS JOIN LATERAL (SELECT coalesce((SELECT w.spent_micros FROM metering.budget_windows w
                                       WHERE w.budget_id = b.id AND w.period_start = p.period_start),
                                      metering.budget_window_usage(b.account_id, b.scope, b.subject,
                                                                   p.period_start, p.period_end)) AS spent) s
  WHERE b.id = p_budget_id
$$;

COMMENT ON FUNCTION metering.budget_json(p_budget_id uuid) IS 'A budget as the API shows it: {id, object, account_id, scope, subject, limit, window, alerts, spent, remaining (credits, this window), period_start, resets_at, created_at}.';

REVOKE ALL ON FUNCTION metering.budget_json(p_budget_id uuid) FROM PUBLIC;

CREATE FUNCTION metering.budget_window_usage(p_account_id uuid, p_scope text, p_subject uuid, p_start timestamp with time zone, p_end timestamp with time zone) RETURNS bigint
    LANGUAGE sql STABLE
    AS $$
  SELECT (coalesce((SELECT sum(e.credits_micros) FROM metering.usage_events e
                    WHERE e.account_id = p_account_id AND e.created_at >= p_start AND e.created_at < p_end
                      AND e.credits_micros > 0 AND metering.budget_applies(p_scope, p_subject, e.api_key_id, e.user_id)), 0)
        - coalesce((SELECT sum(r.credits_micros) FROM metering.reversals r
                    WHERE r.account_id = p_account_id AND r.event_created_at >= p_start AND r.event_created_at < p_end
                      AND metering.budget_applies(p_scope, p_subject, r.api_key_id, r.user_id)), 0))::bigint
$$;

COMMENT ON FUNCTION metering.budget_window_usage(p_account_id uuid, p_scope text, p_subject uuid, p_start timestamp with time zone, p_end timestamp with time zone) IS 'The credits (micro-credits) a budget''s subject (p_scope, p_subject) spent on its account in [p_start, p_end), net of reversals (metering.reversals): where a budget window''s row starts, so a budget set mid-window counts that window''s earlier spending.';

REVOKE ALL ON FUNCTION metering.budget_window_usage(p_account_id uuid, p_scope text, p_subject uuid, p_start timestamp with time zone, p_end timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION metering.budgets_apply(a record, p_api_key_id uuid, p_user_id uuid, p_micros bigint, OUT refusal jsonb, OUT budget_ids uuid[]) RETURNS record
    LANGUAGE plpgsql
    AS $$
DECLARE
  b metering.budgets;
  v_budgets metering.budgets[] := '{}';
  v_start timestamptz[] := '{}';
  v_end timestamptz[] := '{}';
  v_spent bigint[] := '{}';
  v_alerted smallint[];
  v_new smallint[];
  v_start1 timestamptz;
  v_end1 timestamptz;
  v_before bigint;
  i integer;
BEGIN
  budget_ids := '{}';
  -- First every budget that counts this spend is checked (nothing written), then all are charged:
  -- a refused spend writes nothing, so a batch can go on with its next event.
  FOR b IN SELECT * FROM metering.budgets x WHERE x.account_id = a.id ORDER BY x.id LOOP
    CONTINUE WHEN NOT metering.budget_applies(b.scope, b.subject, p_api_key_id, p_user_id);
    SELECT p.period_start, p.period_end INTO v_start1, v_end1
    FROM metering.period_bounds(b.period, util.now(), a.billing_period_start, a.billing_period_end) p;
    SELECT w.spent_micros INTO v_before FROM metering.budget_windows w
    WHERE w.budget_id = b.id AND w.period_start = v_start1;
    IF NOT FOUND THEN
      v_before := metering.budget_window_usage(b.account_id, b.scope, b.subject, v_start1, v_end1);
    END IF;
    IF v_before + p_micros > b.limit_micros THEN
      refusal := jsonb_build_object(
        'message', format('the %s budget of %s credits per %s does not cover this request',
                          replace(b.scope, '_', ' '), util.credits(b.limit_micros), replace(b.period, '_', ' ')),
        'detail', jsonb_build_object('account_id', a.id, 'budget_id', b.id, 'scope', b.scope, 'subject', b.subject,
                                     'window', b.period, 'limit', util.credits(b.limit_micros),
                                     'spent', util.credits(v_before), 'required_credits', util.credits(p_micros),
                                     'remaining', util.credits(greatest(b.limit_micros - v_before, 0)),
                                     'resets_at', util.iso(v_end1)));
      budget_ids := NULL;
      RETURN;
    END IF;
    v_budgets := v_budgets || b;
    v_start := v_start || v_start1;
    v_end := v_end || v_end1;
    v_spent := v_spent || v_before;
  END LOOP;
  FOR i IN 1 .. cardinality(v_budgets) LOOP
    b := v_budgets[i];
    INSERT INTO metering.budget_windows AS w (budget_id, period_start, period_end, spent_micros)
    VALUES (b.id, v_start[i], v_end[i], v_spent[i] + p_micros)
    ON CONFLICT (budget_id, period_start) DO UPDATE SET spent_micros = w.spent_micros + p_micros
    RETURNING w.alerted INTO v_alerted;
    budget_ids := budget_ids || b.id;
    -- Soft thresholds: each crossed one not yet emailed in this window, once (the row is ours
    -- until commit, under the account's lock).
    SELECT coalesce(array_agg(t ORDER BY t), '{}') INTO v_new FROM unnest(b.alerts) t
    WHERE (v_spent[i] + p_micros) * 100 >= b.limit_micros * t AND NOT t = ANY (v_alerted);
    IF v_new <> '{}' THEN
      UPDATE metering.budget_windows SET alerted = alerted || v_new WHERE budget_id = b.id AND period_start = v_start[i];
      PERFORM metering.email_budget_alert(b.id, max(t), v_spent[i] + p_micros, v_end[i]) FROM unnest(v_new) t;
    END IF;
  END LOOP;
  budget_ids := nullif(budget_ids, '{}');
END $$;

COMMENT ON FUNCTION metering.budgets_apply(a record, p_api_key_id uuid, p_user_id uuid, p_micros bigint, OUT refusal jsonb, OUT budget_ids uuid[]) IS 'Spend p_micros (credits of a charge or hold on account a (its identity.accounts row), locked by the caller) against every budget of a that counts this API key and person (metering.budget_applies), in their current windows. When one would pass its limit, nothing is written and refusal is the TL4B2 answer {message, detail {account_id, budget_id, scope, subject, window, limit, spent, required_credits, remaining, resets_at}}; else each window''s spending grows, each alert threshold crossed for the first time in the window is emailed (metering.email_budget_alert), and budget_ids lists the budgets charged (NULL: none). Called by api.consume, api.consume_batch and api.hold only when a.has_budgets.';

REVOKE ALL ON FUNCTION metering.budgets_apply(a record, p_api_key_id uuid, p_user_id uuid, p_micros bigint, OUT refusal jsonb, OUT budget_ids uuid[]) FROM PUBLIC;

CREATE FUNCTION metering.budgets_json(p_account_id uuid, p_user_id uuid, p_all boolean) RETURNS jsonb
    LANGUAGE sql STABLE
    AS $$
  SELECT jsonb_build_object('data', coalesce(jsonb_agg(metering.budget_json(b.id) ORDER BY b.id), '[]'))
  FROM metering.budgets b
  WHERE b.account_id = p_account_id
    AND (p_all OR (b.scope = 'member' AND b.subject = p_user_id)
         OR (b.scope = 'api_key' AND EXISTS (SELECT 1 FROM identity.api_keys k WHERE k.id = b.subject AND k.created_by = p_user_id)))
$$;

COMMENT ON FUNCTION metering.budgets_json(p_account_id uuid, p_user_id uuid, p_all boolean) IS 'An account''s budgets with this window''s spending ({data: [metering.budget_json]}): all of them, or (p_all false) those of the member p_user_id: their member budget and the budgets of the keys they made.';

REVOKE ALL ON FUNCTION metering.budgets_json(p_account_id uuid, p_user_id uuid, p_all boolean) FROM PUBLIC;

CREATE FUNCTION metering.budgets_return(p_budget_ids uuid[], p_at timestamp with time zone, p_micros bigint) RETURNS void
    LANGUAGE sql
    AS $$
  UPDATE metering.budget_windows w SET spent_micros = greatest(w.spent_micros - p_micros, 0)
  FROM metering.budgets b JOIN identity.accounts a ON a.id = b.account_id
  CROSS JOIN LATERAL metering.period_bounds(b.period, p_at, a.billing_period_start, a.billing_period_end) p
  WHERE b.id = ANY (p_budget_ids) AND w.budget_id = b.id AND w.period_start = p.period_start
$$;

COMMENT ON FUNCTION metering.budgets_return(p_budget_ids uuid[], p_at timestamp with time zone, p_micros bigint) IS 'Give p_micros back to the windows (those containing p_at) of the budgets p_budget_ids: a hold settled (released, expired or captured, its actual charge being spent again) or a charge reversed. A window with no row yet has nothing to give back (it starts from the net spending). Callers lock the account.';

REVOKE ALL ON FUNCTION metering.budgets_return(p_budget_ids uuid[], p_at timestamp with time zone, p_micros bigint) FROM PUBLIC;

CREATE FUNCTION metering.charge(a identity.accounts, p_idempotency_key text, p_hash bytea, p_metadata jsonb, q record, p_defer_rows boolean DEFAULT false, p_event_id uuid DEFAULT NULL::uuid, p_api_key_id uuid DEFAULT NULL::uuid, p_user_id uuid DEFAULT NULL::uuid, OUT answer json, OUT event metering.usage_events) RETURNS record
    LANGUAGE plpgsql
    AS $$
DECLARE
  v_now timestamptz := util.now();
BEGIN
  event.id := coalesce(p_event_id, util.uuid_v7());
  event.account_id := a.id;
  event.created_at := v_now;
  event.meter_id := q.meter_id;
  event.idempotency_key := p_idempotency_key;
  event.quantity := q.quantity;
  event.input_tokens := q.input_tokens;
  event.output_tokens := q.output_tokens;
  event.allowance_units := q.allowance_units;
  event.credits_micros := q.credits_micros;
  event.balance_after_micros := q.balance_after_micros;
  event.used_after := q.used_before + q.allowance_units;
  event.period_start := q.period_start;
  event.period_end := q.period_end;
  event.plan_id := q.plan_id;
  event.amount_minor := q.amount_minor;
  event.currency := CASE WHEN q.amount_minor IS NOT NULL THEN q.currency END;
  event.warnings := nullif(q.warnings, '[]');
  event.metadata := p_metadata;
  event.api_key_id := p_api_key_id;
  event.user_id := p_user_id;
  IF q.credits_micros > 0 THEN          -- first: the event keeps the lots its credits came from
    SELECT t.lot_id, t.lot_draws INTO event.lot_id, event.lot_draws
    FROM ledger.post_transfer(a.id, 'usage', -q.credits_micros, 'usage', NULL, event.id,
                              format('%s x %s', q.quantity, q.meter_id)) t;
    IF q.balance_after_micros < a.auto_topup_below_micros THEN
      PERFORM billing.enqueue_auto_topup(a.id);
    END IF;
  END IF;
  IF NOT p_defer_rows THEN
    INSERT INTO metering.usage_events SELECT event.*;
    INSERT INTO metering.idempotency_keys (account_id, idempotency_key, usage_event_id, created_at, request_hash)
    VALUES (a.id, p_idempotency_key, event.id, v_now, p_hash);
  END IF;
  IF q.amount_minor IS NOT NULL THEN
    PERFORM billing.report_meter_event(event.id, a.id, q.stripe_meter_event, q.quantity, v_now);
  END IF;
  IF q.entitled AND (NOT p_defer_rows OR q.amount_minor IS NOT NULL) THEN
    -- The account row is locked, so used_before is still the window's usage. (Deferred: the
    -- caller writes it; a post-paid window is written now, as the plan's spending reads it.)
    INSERT INTO metering.allowance_usage AS u (account_id, meter_id, period_start, period_end, used)
    VALUES (a.id, q.meter_id, q.period_start, q.period_end, q.used_before + q.allowance_units)
    ON CONFLICT (account_id, meter_id, period_start) DO UPDATE SET used = EXCLUDED.used;
  END IF;
  IF q.warnings <> '[]' THEN
    PERFORM metering.email_warnings(a.id, q.warnings);
  END IF;
  answer := metering.usage_event_answer(event, q.allowance);
END $$;

COMMENT ON FUNCTION metering.charge(a identity.accounts, p_idempotency_key text, p_hash bytea, p_metadata jsonb, q record, p_defer_rows boolean, p_event_id uuid, p_api_key_id uuid, p_user_id uuid, OUT answer json, OUT event metering.usage_events) IS 'Write one allowed charge: q is metering.quote''s answer for the account a (locked by the caller, nothing charged to it since the quote), p_hash the request''s fingerprint. Makes the usage event (returned as event) and writes it and its idempotency key, the allowance window''s usage, the ledger transfer (credits), the post-paid meter report and warning emails (outbox), an auto top-up when the balance falls below its threshold; answer is the answer (metering.usage_event_answer). With p_defer_rows the event and key rows and the allowance window''s usage (but for post-paid windows) are left to the caller, who must write them before its transaction ends and pass the window''s usage to its next metering.quote of it (api.consume_batch writes a batch''s events and keys with one INSERT each, a third of the cost a row, and each window once). p_event_id: the event''s id (default util.uuid_v7(); a batch passes ids from util.uuid_v7s). p_api_key_id, p_user_id: who charged (identity.authenticate_principal), recorded on the event. api.consume and api.consume_batch charge through it.';

REVOKE ALL ON FUNCTION metering.charge(a identity.accounts, p_idempotency_key text, p_hash bytea, p_metadata jsonb, q record, p_defer_rows boolean, p_event_id uuid, p_api_key_id uuid, p_user_id uuid, OUT answer json, OUT event metering.usage_events) FROM PUBLIC;

CREATE FUNCTION metering.delete_budget(p_account_id uuid, p_budget_id uuid) RETURNS jsonb
    LANGUAGE plpgsql
    AS $$
DECLARE
  a identity.accounts;
  b metering.budgets;
BEGIN
  SELECT * INTO a FROM identity.accounts WHERE id = p_account_id FOR NO KEY UPDATE;
  DELETE FROM metering.budgets WHERE id = p_budget_id AND account_id = a.id RETURNING * INTO b;
  IF NOT FOUND THEN
    PERFORM util.fail('TL404', 'no such budget');
  END IF;
  UPDATE identity.accounts SET has_budgets = EXISTS (SELECT 1 FROM metering.budgets WHERE account_id = a.id)
  WHERE id = a.id;
  RETURN jsonb_build_object('id', b.id, 'object', 'budget', 'deleted', true);
END $$;

COMMENT ON FUNCTION metering.delete_budget(p_account_id uuid, p_budget_id uuid) IS 'Delete a budget of an account (its windows go with it) under the account''s lock, and clear has_budgets when it was the last. TL404 when the account has no such budget.';

REVOKE ALL ON FUNCTION metering.delete_budget(p_account_id uuid, p_budget_id uuid) FROM PUBLIC;

CREATE FUNCTION metering.email_budget_alert(p_budget_id uuid, p_percent integer, p_spent bigint, p_resets_at timestamp with time zone) RETURNS void
    LANGUAGE sql
    AS $$
  INSERT INTO outbox.messages (kind, recipient, payload, created_at, next_attempt_at)
  SELECT DISTINCT 'usage_warning', u.email,
         jsonb_build_object('code', 'budget_threshold', 'budget_id', b.id, 'scope', b.scope, 'subject', b.subject,
                            'meter', CASE b.scope WHEN 'api_key' THEN 'API key budget' WHEN 'member' THEN 'member budget'
                                                  ELSE 'account budget' END,
                            'threshold_percent', p_percent, 'spent', util.credits(p_spent),
                            'limit', util.credits(b.limit_micros), 'resets_at', util.iso(p_resets_at),
                            'message', format('%s%% of the %s budget used: %s of %s credits this %s%s', p_percent,
                                              replace(b.scope, '_', ' '), util.credits(p_spent), util.credits(b.limit_micros),
                                              replace(b.period, '_', ' '),
                                              CASE WHEN p_percent = 100 THEN '; further spending is refused until it resets'
                                                   ELSE '' END)),
         util.now(), util.now()
  FROM metering.budgets b JOIN identity.memberships m ON m.account_id = b.account_id JOIN identity.users u ON u.id = m.user_id
  WHERE b.id = p_budget_id AND u.email_verified_at IS NOT NULL
    AND (m.role IN ('owner', 'admin') OR (b.scope = 'member' AND m.user_id = b.subject))
$$;

COMMENT ON FUNCTION metering.email_budget_alert(p_budget_id uuid, p_percent integer, p_spent bigint, p_resets_at timestamp with time zone) IS 'Queue the email of a budget''s alert threshold (the highest one crossed by a spend) to the account''s owners and admins and, for a member budget, the member (verified addresses; outbox usage_warning, written by the spending transaction).';

REVOKE ALL ON FUNCTION metering.email_budget_alert(p_budget_id uuid, p_percent integer, p_spent bigint, p_resets_at timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION metering.email_warnings(p_account_id uuid, p_warnings jsonb) RETURNS void
    LANGUAGE sql
    AS $$
  INSERT INTO outbox.messages (kind, recipient, payload, created_at, next_attempt_at)
  SELECT 'usage_warning', u.email, w, util.now(), util.now()
  FROM identity.users u CROSS JOIN jsonb_array_elements(p_warnings) w
  WHERE u.account_id = p_account_id AND u.email_verified_at IS NOT NULL
$$;

COMMENT ON FUNCTION metering.email_warnings(p_account_id uuid, p_warnings jsonb) IS 'Queue one email per usage warning to the account''s user, when it has a verified address (the extension seed warns at 8 of 10 uses). Written by the charge''s own transaction.';

REVOKE ALL ON FUNCTION metering.email_warnings(p_account_id uuid, p_warnings jsonb) FROM PUBLIC;

CREATE FUNCTION metering.event_allowance(e metering.usage_events) RETURNS json
    LANGUAGE sql STABLE
    AS $$
  SELECT metering.allowance_json(en, m, e.period_start, e.period_end, e.used_after)
  FROM billing.entitlements en JOIN metering.meters m ON m.id = en.meter_id
  WHERE en.plan_id = e.plan_id AND en.meter_id = e.meter_id
$$;

COMMENT ON FUNCTION metering.event_allowance(e metering.usage_events) IS 'A charged event''s allowance right after it, for a replay: the window and usage stored on the event, with the kind, limit and unit of its plan''s entitlement as the catalog has them now (NULL when there was none, or the catalog no longer has it).';

REVOKE ALL ON FUNCTION metering.event_allowance(e metering.usage_events) FROM PUBLIC;

CREATE FUNCTION metering.event_json(e metering.usage_events) RETURNS jsonb
    LANGUAGE sql STABLE
    AS $$
  SELECT jsonb_build_object('id', e.id, 'object', 'usage_event', 'meter', e.meter_id, 'quantity', e.quantity,
                            'input_tokens', e.input_tokens, 'output_tokens', e.output_tokens,
                            'charged', jsonb_build_object('allowance_units', e.allowance_units,
                                                          'credits', util.credits(e.credits_micros),
                                                          'amount', e.amount_minor),
                            'idempotency_key', e.idempotency_key, 'metadata', e.metadata,
                            'api_key_id', e.api_key_id, 'user_id', e.user_id,
                            'reversed', (SELECT jsonb_build_object('quantity', sum(r.quantity),
                                                                   'credits', util.credits(sum(r.credits_micros)::bigint),
                                                                   'reversals', jsonb_agg(r.id ORDER BY r.id))
                                         FROM metering.reversals r
                                         WHERE r.account_id = e.account_id AND r.usage_event_id = e.id HAVING count(*) > 0),
                            'created_at', util.iso(e.created_at))
$$;

COMMENT ON FUNCTION metering.event_json(e metering.usage_events) IS 'A usage event as GET /v1/usage/events lists it: {id, meter, quantity, input_tokens, output_tokens, charged {allowance_units, credits, amount (post-paid: minor currency units; else null)}, idempotency_key, metadata, api_key_id and user_id (who charged it: the key, and the session''s person or the member who made the key), reversed ({quantity, credits, reversals: ids} when reversed in part or whole, else null), created_at}.';

REVOKE ALL ON FUNCTION metering.event_json(e metering.usage_events) FROM PUBLIC;

CREATE FUNCTION metering.expire_holds(p_account_id uuid) RETURNS integer
    LANGUAGE plpgsql
    AS $$
DECLARE
  h metering.holds;
  v_count integer := 0;
BEGIN
  FOR h IN SELECT * FROM metering.holds
           WHERE account_id = p_account_id AND status = 'open' AND expires_at <= util.now() ORDER BY id LOOP
    IF (metering.settle_hold(h, 'expired')).id IS NOT NULL THEN   -- (a row with NULL columns is not IS NOT NULL)
      v_count := v_count + 1;
    END IF;
  END LOOP;
  RETURN v_count;
END $$;

COMMENT ON FUNCTION metering.expire_holds(p_account_id uuid) IS 'Release the account''s open holds that have expired (lazily, at its next charge, hold or capture, with the account locked); returns how many.';

REVOKE ALL ON FUNCTION metering.expire_holds(p_account_id uuid) FROM PUBLIC;

CREATE FUNCTION metering.hold_json(h metering.holds) RETURNS jsonb
    LANGUAGE sql STABLE
    AS $$
  SELECT jsonb_build_object('id', h.id, 'object', 'hold', 'status', h.status, 'meter', h.meter_id,
                            'quantity', h.quantity, 'input_tokens', h.input_tokens, 'output_tokens', h.output_tokens,
                            'held', jsonb_build_object('allowance_units', h.allowance_units,
                                                       'credits', util.credits(h.credits_micros)),
                            'idempotency_key', h.idempotency_key, 'created_at', util.iso(h.created_at),
                            'expires_at', util.iso(h.expires_at), 'settled_at', util.iso(h.settled_at))
$$;

COMMENT ON FUNCTION metering.hold_json(h metering.holds) IS 'A hold as the API shows it: {id, status (open, captured, released, expired), meter, quantity, input_tokens, output_tokens, held {allowance_units, credits}, idempotency_key, created_at, expires_at, settled_at}.';

REVOKE ALL ON FUNCTION metering.hold_json(h metering.holds) FROM PUBLIC;

CREATE FUNCTION metering.idempotency_window() RETURNS interval
    LANGUAGE sql STABLE
    AS $$
  SELECT greatest(coalesce(nullif(current_setting('pgtally.idempotency_window', true), '')::interval, interval '30 days'),
                  interval '1 day')
$$;

COMMENT ON FUNCTION metering.idempotency_window() IS 'How long a usage event''s idempotency key is remembered after the event: 30 days, or the pgtally.idempotency_window setting (ALTER DATABASE ... SET pgtally.idempotency_window = ''90 days''), never less than a day. Within it a retry is answered from the first charge (or TL409 for a different request); after it the key is forgotten and the same key charges again. A month of usage events leaves (api.detach_month) only once the window has passed its end.';

REVOKE ALL ON FUNCTION metering.idempotency_window() FROM PUBLIC;

CREATE FUNCTION metering.lock_account(p_account_id uuid) RETURNS identity.accounts
    LANGUAGE plpgsql
    AS $$
DECLARE
  a identity.accounts;
BEGIN
  PERFORM 1 FROM identity.accounts WHERE id = p_account_id FOR NO KEY UPDATE;
  PERFORM metering.expire_holds(p_account_id);
  PERFORM ledger.refresh_lots(p_account_id);
  SELECT * INTO a FROM identity.accounts WHERE id = p_account_id;
  RETURN a;
END $$;

COMMENT ON FUNCTION metering.lock_account(p_account_id uuid) IS 'An account locked for a charge, with its expired holds released and its due credit lots refreshed (ledger.refresh_lots).';

REVOKE ALL ON FUNCTION metering.lock_account(p_account_id uuid) FROM PUBLIC;

CREATE FUNCTION metering.locked_account(p_api_key text, p_session_id uuid, p_account_id uuid) RETURNS identity.accounts
    LANGUAGE sql
    AS $$
  SELECT metering.lock_account(identity.authenticate(p_api_key, p_session_id, 'usage:write', p_account_id))
$$;

COMMENT ON FUNCTION metering.locked_account(p_api_key text, p_session_id uuid, p_account_id uuid) IS 'The principal''s account (scope usage:write), locked for a charge (metering.lock_account).';

REVOKE ALL ON FUNCTION metering.locked_account(p_api_key text, p_session_id uuid, p_account_id uuid) FROM PUBLIC;

CREATE FUNCTION metering.period_bounds(p_period text, p_at timestamp with time zone, p_billing_start timestamp with time zone, p_billing_end timestamp with time zone) RETURNS TABLE(period_start timestamp with time zone, period_end timestamp with time zone)
    LANGUAGE sql STABLE ROWS 1
    AS $$
  SELECT CASE
           WHEN p_period = 'day' THEN date_trunc('day', p_at, 'UTC')
           WHEN p_period = 'billing_period' AND p_at >= p_billing_start AND p_at < p_billing_end THEN p_billing_start
           ELSE date_trunc('month', p_at, 'UTC')
         END,
         CASE
           WHEN p_period = 'day' THEN date_trunc('day', p_at, 'UTC') + interval '1 day'
           WHEN p_period = 'billing_period' AND p_at >= p_billing_start AND p_at < p_billing_end THEN p_billing_end
           ELSE date_trunc('month', p_at, 'UTC') + interval '1 month'
         END
$$;

COMMENT ON FUNCTION metering.period_bounds(p_period text, p_at timestamp with time zone, p_billing_start timestamp with time zone, p_billing_end timestamp with time zone) IS 'The allowance period containing p_at: day = UTC calendar day, month = UTC calendar month, billing_period = the account''s subscription period when it covers p_at, else the calendar month. Returns [period_start, period_end).';

REVOKE ALL ON FUNCTION metering.period_bounds(p_period text, p_at timestamp with time zone, p_billing_start timestamp with time zone, p_billing_end timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION metering.post_paid_spent(p_account_id uuid, p_plan text, p_period_start timestamp with time zone) RETURNS bigint
    LANGUAGE sql STABLE
    AS $$
  SELECT coalesce(sum(u.used * e.unit_amount_minor), 0)::bigint
  FROM billing.entitlements e
  JOIN metering.allowance_usage u ON u.account_id = p_account_id AND u.meter_id = e.meter_id AND u.period_start = p_period_start
  WHERE e.plan_id = p_plan AND e.kind = 'post_paid'
$$;

COMMENT ON FUNCTION metering.post_paid_spent(p_account_id uuid, p_plan text, p_period_start timestamp with time zone) IS 'What an account''s post-paid meters of plan p_plan cost in the billing period starting at p_period_start (charged and held units times each meter''s unit_amount_minor), in minor units: what the plan''s spending limit is checked against.';

REVOKE ALL ON FUNCTION metering.post_paid_spent(p_account_id uuid, p_plan text, p_period_start timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION metering.quote(p_account identity.accounts, p_meter text, p_quantity bigint, p_input_tokens bigint, p_output_tokens bigint, p_window_start timestamp with time zone DEFAULT NULL::timestamp with time zone, p_window_used bigint DEFAULT NULL::bigint, p_window_end timestamp with time zone DEFAULT NULL::timestamp with time zone, p_meter_def metering.meters DEFAULT NULL::metering.meters, p_entitlement_def billing.entitlements DEFAULT NULL::billing.entitlements, OUT meter_id text, OUT quantity bigint, OUT input_tokens bigint, OUT output_tokens bigint, OUT entitled boolean, OUT period_start timestamp with time zone, OUT period_end timestamp with time zone, OUT used_before bigint, OUT allowance_units bigint, OUT credits_micros bigint, OUT balance_after_micros bigint, OUT allowed boolean, OUT allowance json, OUT warnings jsonb, OUT amount_minor bigint, OUT currency text, OUT spent_before_minor bigint, OUT spending_limit_minor bigint, OUT stripe_meter_event text, OUT refusal jsonb, OUT plan_id text) RETURNS record
    LANGUAGE plpgsql
    AS $$
DECLARE
  m metering.meters;
  e billing.entitlements;
  v_demand numeric;       -- allowance units the request needs
  v_price numeric;        -- micro-credits per allowance unit beyond the allowance
  v_used bigint := 0;
  v_after bigint;
  v_cost numeric;
  v_pct integer;
BEGIN
  -- (The scalar test first: a single charge passes no definitions and reads no field of them.)
  IF p_window_end IS NOT NULL AND p_meter_def.id = p_meter AND p_entitlement_def.meter_id = p_meter THEN
    m := p_meter_def;               -- read by the caller for this account earlier in its transaction
  ELSE
    SELECT * INTO m FROM metering.meters WHERE id = p_meter;
    IF NOT FOUND THEN
      PERFORM util.fail('TL422', format('there is no meter %L', p_meter),
                        jsonb_build_object('meters', (SELECT jsonb_agg(id ORDER BY id) FROM metering.meters)));
    END IF;
  END IF;
  meter_id := m.id;

  IF m.pricing = 'unit' THEN
    IF p_input_tokens IS NOT NULL OR p_output_tokens IS NOT NULL THEN
      PERFORM util.fail('TL422', format('meter %s is priced per %s: send quantity, not tokens', m.id, m.unit));
    END IF;
    quantity := coalesce(p_quantity, 1);
    IF quantity < 1 THEN
      PERFORM util.fail('TL422', 'quantity must be a positive integer');
    END IF;
    v_demand := quantity;
    v_price := m.unit_price_micros;
  ELSE
    IF p_quantity IS NOT NULL THEN
      PERFORM util.fail('TL422', format('meter %s is priced per token: send input_tokens and output_tokens, not quantity', m.id));
    END IF;
    IF coalesce(p_input_tokens, 0) < 0 OR coalesce(p_output_tokens, 0) < 0
       OR coalesce(p_input_tokens, 0) + coalesce(p_output_tokens, 0) = 0 THEN
      PERFORM util.fail('TL422', 'input_tokens and output_tokens must be non-negative and not both zero');
    END IF;
    quantity := 1;
    input_tokens := coalesce(p_input_tokens, 0);
    output_tokens := coalesce(p_output_tokens, 0);
    -- Rate card of 2-console-app-billing-usage.md: input and output token rates, times the margin.
    v_demand := ceil((input_tokens::numeric * m.input_price_micros_per_mtok
                      + output_tokens::numeric * m.output_price_micros_per_mtok) / 1000000 * m.margin);
    v_price := 1;
  END IF;

  IF p_window_end IS NOT NULL AND p_entitlement_def.meter_id = m.id AND p_meter_def.id = m.id THEN
    e := p_entitlement_def;
    entitled := true;
  ELSE
    SELECT * INTO e FROM billing.entitlements
    WHERE billing.entitlements.plan_id = identity.effective_plan(p_account) AND billing.entitlements.meter_id = m.id;
    entitled := FOUND;
  END IF;
  IF entitled THEN
    plan_id := e.plan_id;
    IF p_window_start <= util.now() AND util.now() < p_window_end THEN
      period_start := p_window_start;   -- the caller's window of this account and meter holds now
      period_end := p_window_end;
    ELSE
      SELECT b.period_start, b.period_end INTO period_start, period_end
      FROM metering.period_bounds(e.period, util.now(), p_account.billing_period_start, p_account.billing_period_end) b;
    END IF;
    IF p_window_start = period_start THEN
      v_used := p_window_used;          -- charged earlier in the caller's transaction, not written yet
    ELSE
      SELECT u.used INTO v_used FROM metering.allowance_usage u
      WHERE u.account_id = p_account.id AND u.meter_id = m.id AND u.period_start = quote.period_start;
    END IF;                             -- (NULL: the window has no row yet)
    IF v_used IS NULL AND e.kind = 'post_paid' THEN
      v_used := 0;          -- a post-paid window counts only post-paid units: they are what it costs
    ELSIF v_used IS NULL THEN
      -- A window with no row yet: it starts from the usage already made in it (another plan's).
      v_used := metering.window_usage(p_account.id, m, period_start, period_end);
    END IF;
    used_before := v_used;
  END IF;

  -- The charging rule: the allowance first, then credits at the meter's rate.
  allowance_units := CASE
                       WHEN NOT entitled THEN 0
                       WHEN e.kind = 'allowance' THEN least(v_demand, greatest(e.limit_units - v_used, 0))
                       ELSE v_demand        -- unlimited and fair_use never charge credits
                     END;
  v_cost := (v_demand - allowance_units) * v_price;
  IF v_cost > 9e18 OR v_demand > 9e18 THEN
    PERFORM util.fail('TL422', 'the request is too large to charge');
  END IF;
  credits_micros := v_cost;
  IF entitled AND e.kind = 'post_paid' THEN
    -- Post-paid: the units cost money, billed by Stripe later; the plan's spending limit for the
    -- billing period acts like a balance (open holds count, their units being in the window).
    IF v_demand * e.unit_amount_minor > 9e15 THEN
      PERFORM util.fail('TL422', 'the request is too large to charge');
    END IF;
    amount_minor := v_demand * e.unit_amount_minor;
    stripe_meter_event := e.stripe_meter_event;
    SELECT p.spending_limit_minor INTO spending_limit_minor FROM billing.plans p WHERE p.id = e.plan_id;
    SELECT x.currency INTO currency FROM billing.prices x WHERE x.plan_id = e.plan_id ORDER BY x.active DESC, x.id LIMIT 1;
    currency := coalesce(currency, 'usd');
    spent_before_minor := metering.post_paid_spent(p_account.id, e.plan_id, period_start);
    allowed := spending_limit_minor IS NULL OR spent_before_minor + amount_minor <= spending_limit_minor;
  ELSE
    -- Credits that open holds reserve are not spendable.
    allowed := credits_micros <= p_account.credit_balance_micros - p_account.held_micros;
  END IF;
  balance_after_micros := p_account.credit_balance_micros - CASE WHEN allowed THEN credits_micros ELSE 0 END;

  warnings := '[]';
  IF entitled THEN
    v_after := v_used + CASE WHEN allowed THEN allowance_units ELSE 0 END;
    allowance := metering.allowance_json(e, m, period_start, period_end, v_after);
    -- Warn when spending crosses 80% and 100% of a post-paid plan's limit.
    IF e.kind = 'post_paid' AND spending_limit_minor > 0 AND allowed THEN
      FOREACH v_pct IN ARRAY ARRAY[80, 100] LOOP
        IF spent_before_minor * 100 < spending_limit_minor * v_pct
           AND (spent_before_minor + amount_minor) * 100 >= spending_limit_minor * v_pct THEN
          warnings := warnings || jsonb_build_object(
            'code', 'spending_limit_threshold', 'meter', m.id, 'threshold_percent', v_pct,
            'spent', spent_before_minor + amount_minor, 'limit', spending_limit_minor, 'currency', currency,
            'resets_at', util.iso(period_end),
            'message', format('%s%% of this billing period''s spending limit used: %s of %s%s', v_pct,
                              billing.money(spent_before_minor + amount_minor, currency),
                              billing.money(spending_limit_minor, currency),
                              CASE WHEN v_pct = 100 THEN '; further use is refused until ' || util.iso(period_end) ELSE '' END));
        END IF;
      END LOOP;
    END IF;
    -- Warn when usage crosses 80% and 100% of an allowance or soft limit (the extension seed warns at 8 of 10).
    IF e.kind IN ('allowance', 'fair_use') AND e.limit_units > 0 THEN
      FOREACH v_pct IN ARRAY ARRAY[80, 100] LOOP
        IF v_used * 100 < e.limit_units * v_pct AND v_after * 100 >= e.limit_units * v_pct THEN
          warnings := warnings || jsonb_build_object(
            'code', CASE e.kind WHEN 'allowance' THEN 'allowance_threshold' ELSE 'fair_use_threshold' END,
            'meter', m.id, 'threshold_percent', v_pct, 'used', v_after, 'limit', e.limit_units,
            'resets_at', util.iso(period_end),
            'message', CASE
              WHEN e.kind = 'fair_use' AND v_pct = 100 THEN
                format('fair-use limit of %s for %s reached; usage continues but may be reviewed', e.limit_units, m.id)
              WHEN v_pct = 100 THEN
                format('the %s allowance of %s is used up; further use spends credits until %s', m.id, e.limit_units, util.iso(period_end))
              ELSE format('%s%% of the %s allowance used %s: %s of %s', v_pct, m.id,
                          CASE e.period WHEN 'day' THEN 'today' WHEN 'month' THEN 'this month'
                                        ELSE 'this billing period' END, v_after, e.limit_units)
            END);
        END IF;
      END LOOP;
    END IF;
  END IF;
  IF NOT allowed THEN
    refusal := CASE
      WHEN amount_minor IS NOT NULL THEN jsonb_build_object(
        'message', format('the spending limit of %s for this billing period does not cover this request',
                          billing.money(spending_limit_minor, currency)),
        'detail', jsonb_build_object('account_id', p_account.id, 'meter', m.id, 'required_amount', amount_minor,
                                     'spent', spent_before_minor, 'spending_limit', spending_limit_minor,
                                     'currency', currency, 'resets_at', util.iso(period_end)))
      ELSE jsonb_build_object(
        'message', format('the %s allowance and the credit balance do not cover this request', m.id),
        'detail', jsonb_build_object('account_id', p_account.id, 'meter', m.id, 'required_credits', util.credits(credits_micros),
                                     'balance', util.credits(p_account.credit_balance_micros - p_account.held_micros),
                                     'allowance', allowance, 'resets_at', util.iso(period_end)))
    END;
  END IF;
END $$;

COMMENT ON FUNCTION metering.quote(p_account identity.accounts, p_meter text, p_quantity bigint, p_input_tokens bigint, p_output_tokens bigint, p_window_start timestamp with time zone, p_window_used bigint, p_window_end timestamp with time zone, p_meter_def metering.meters, p_entitlement_def billing.entitlements, OUT meter_id text, OUT quantity bigint, OUT input_tokens bigint, OUT output_tokens bigint, OUT entitled boolean, OUT period_start timestamp with time zone, OUT period_end timestamp with time zone, OUT used_before bigint, OUT allowance_units bigint, OUT credits_micros bigint, OUT balance_after_micros bigint, OUT allowed boolean, OUT allowance json, OUT warnings jsonb, OUT amount_minor bigint, OUT currency text, OUT spent_before_minor bigint, OUT spending_limit_minor bigint, OUT stripe_meter_event text, OUT refusal jsonb, OUT plan_id text) IS 'The charging rule, with no side effect: for an account (as read or locked by the caller) and a request, the window''s usage before it (used_before), the allowance units and micro-credits it costs, whether the balance covers it, the allowance after it and the threshold warnings it crosses. Unit meters need quantity (default 1); token meters need input_tokens/output_tokens and spend their allowance in micro-credits. A post_paid entitlement charges no credits: amount_minor is what the units cost (currency), allowed while the billing period''s post-paid spending (spent_before_minor, open holds included) stays within the plan''s spending_limit_minor; stripe_meter_event names the Stripe meter. When not allowed, refusal is the TL402 answer {message, detail}. plan_id: the plan whose entitlement applies (NULL: none). p_window_start and p_window_used: a window of this account and meter that the caller charged earlier in its transaction and has not written yet (api.consume_batch), used in place of metering.allowance_usage when it is the window the request falls in; with p_window_end, p_meter_def and p_entitlement_def (the window''s end, the meter and the plan''s entitlement of it, as the caller read them for an earlier charge of this account and meter in its transaction), the meter, the entitlement and the window''s bounds are not read again. TL422 unknown meter or bad quantity.';

REVOKE ALL ON FUNCTION metering.quote(p_account identity.accounts, p_meter text, p_quantity bigint, p_input_tokens bigint, p_output_tokens bigint, p_window_start timestamp with time zone, p_window_used bigint, p_window_end timestamp with time zone, p_meter_def metering.meters, p_entitlement_def billing.entitlements, OUT meter_id text, OUT quantity bigint, OUT input_tokens bigint, OUT output_tokens bigint, OUT entitled boolean, OUT period_start timestamp with time zone, OUT period_end timestamp with time zone, OUT used_before bigint, OUT allowance_units bigint, OUT credits_micros bigint, OUT balance_after_micros bigint, OUT allowed boolean, OUT allowance json, OUT warnings jsonb, OUT amount_minor bigint, OUT currency text, OUT spent_before_minor bigint, OUT spending_limit_minor bigint, OUT stripe_meter_event text, OUT refusal jsonb, OUT plan_id text) FROM PUBLIC;

CREATE FUNCTION metering.replayed_answer(k metering.idempotency_keys) RETURNS json
    LANGUAGE plpgsql STABLE
    AS $$
DECLARE
  v_answer json;
BEGIN
  SELECT metering.usage_event_answer(e, metering.event_allowance(e)) INTO v_answer
  FROM metering.usage_events e WHERE e.id = k.usage_event_id AND e.created_at = k.created_at;
  IF v_answer IS NULL THEN        -- never answer a retry with nothing
    RAISE EXCEPTION 'usage event % of idempotency key % is missing', k.usage_event_id, k.idempotency_key
      USING ERRCODE = 'TL500',
            HINT = 'pgtally partitions detach forgets the keys of the month it detaches; was a partition dropped by hand?';
  END IF;
  RETURN v_answer;
END $$;

COMMENT ON FUNCTION metering.replayed_answer(k metering.idempotency_keys) IS 'The answer a retry of a remembered idempotency key gets: its event''s, rebuilt (metering.usage_event_answer with metering.event_allowance). The key''s created_at finds the event''s monthly partition. TL500 (a server error) when the event is missing, as it is only if its partition was dropped by hand: a retry never gets an empty answer.';

REVOKE ALL ON FUNCTION metering.replayed_answer(k metering.idempotency_keys) FROM PUBLIC;

CREATE FUNCTION metering.request_hash(p_meter text, p_quantity bigint, p_input_tokens bigint, p_output_tokens bigint, p_metadata jsonb DEFAULT NULL::jsonb) RETURNS bytea
    LANGUAGE sql STABLE
    AS $$        -- STABLE as jsonb_build_object and convert_to are, so that it is inlined
  SELECT sha256(convert_to((jsonb_build_object(
    'meter', p_meter,
    'quantity', coalesce(p_quantity, CASE WHEN p_input_tokens IS NULL AND p_output_tokens IS NULL THEN 1 END),
    'input_tokens', p_input_tokens, 'output_tokens', p_output_tokens)
    || CASE WHEN p_metadata IS NULL THEN '{}' ELSE jsonb_build_object('metadata', p_metadata) END)::text, 'UTF8'))
$$;

COMMENT ON FUNCTION metering.request_hash(p_meter text, p_quantity bigint, p_input_tokens bigint, p_output_tokens bigint, p_metadata jsonb) IS 'Fingerprint of a usage request (quantity defaults to 1; metadata counts when given), compared on retries of an idempotency key.';

REVOKE ALL ON FUNCTION metering.request_hash(p_meter text, p_quantity bigint, p_input_tokens bigint, p_output_tokens bigint, p_metadata jsonb) FROM PUBLIC;

CREATE FUNCTION metering.reversal_json(r record) RETURNS jsonb
    LANGUAGE plpgsql STABLE
    AS $$              -- (plpgsql: a sql function cannot take a record)
BEGIN
  RETURN jsonb_build_object(
    'id', r.id, 'object', 'usage_reversal', 'account_id', r.account_id, 'usage_event_id', r.usage_event_id,
    'quantity', r.quantity,
    'reversed', jsonb_build_object('allowance_units', r.allowance_units, 'credits', util.credits(r.credits_micros),
                                   'amount', r.amount_minor, 'currency', r.currency),
    'allowance_returned', r.allowance_returned, 'lots', r.lots, 'transfer_id', r.transfer_id,
    'reason', r.reason, 'idempotency_key', r.idempotency_key,
    'balance', jsonb_build_object('credits', util.credits(r.balance_after_micros)),
    'created_at', util.iso(r.created_at));
END $$;

COMMENT ON FUNCTION metering.reversal_json(r record) IS 'A reversal (a metering.reversals row) as the API shows it: {id, object, account_id, usage_event_id, quantity, reversed {allowance_units, credits, amount (post-paid credit owed, minor units), currency}, allowance_returned, lots [{lot_id, credits, new_lot}], transfer_id, reason, idempotency_key, balance {credits right after it}, created_at}.';

REVOKE ALL ON FUNCTION metering.reversal_json(r record) FROM PUBLIC;

CREATE FUNCTION metering.reversal_lot_days() RETURNS integer
    LANGUAGE sql IMMUTABLE
    AS $$ SELECT 7 $$;

COMMENT ON FUNCTION metering.reversal_lot_days() IS 'Days to spend credits a reversal gives back when the lot they came from has expired (or been canceled) since: they come back as a new lot of source reversal expiring this long after the reversal. 7.';

REVOKE ALL ON FUNCTION metering.reversal_lot_days() FROM PUBLIC;

CREATE FUNCTION metering.reverse_usage(p_event_id uuid, p_quantity bigint, p_reason text, p_idempotency_key text, p_staff_user_id uuid, p_operator_key_id uuid, OUT replayed boolean, OUT body jsonb) RETURNS record
    LANGUAGE plpgsql
    AS $$
DECLARE
  e metering.usage_events;
  a identity.accounts;
  r metering.reversals;
  v_hash bytea := sha256(convert_to(jsonb_build_object('event', p_event_id, 'quantity', p_quantity,
                                                       'reason', btrim(p_reason))::text, 'UTF8'));
  v_q bigint;             -- units reversed before
  v_c bigint;             -- credits reversed before
  v_al bigint;            -- allowance units reversed before
  v_am bigint;            -- post-paid amount reversed before
  v_n bigint;             -- units to reverse now
  v_credit_units bigint;  -- the event's units that credits paid for (after its allowance units)
  v_draws jsonb;          -- the lots the event drew from, in burn order: [[lot, micros], ...]
  v_skip bigint;          -- credits earlier reversals gave back (to the last-drawn lots first)
  v_left bigint;
  v_take bigint;
  v_lot ledger.credit_lots;
  d jsonb;
  v_new uuid;
  v_transfer record;
  v_expires timestamptz;
BEGIN
  IF p_idempotency_key IS NULL OR length(p_idempotency_key) NOT BETWEEN 1 AND 255 THEN
    PERFORM util.fail('TL422', 'an idempotency key of 1 to 255 characters is required', '{"field": "Idempotency-Key"}');
  END IF;
  IF p_reason IS NULL OR length(btrim(p_reason)) NOT BETWEEN 1 AND 500 THEN
    PERFORM util.fail('TL422', 'a reversal needs a reason of at most 500 characters', '{"field": "reason"}');
  END IF;
  IF p_quantity IS NOT NULL AND p_quantity < 1 THEN
    PERFORM util.fail('TL422', 'quantity must be a positive integer', '{"field": "quantity"}');
  END IF;
  SELECT * INTO e FROM metering.usage_events WHERE id = p_event_id;
  IF NOT FOUND THEN
    PERFORM util.fail('TL404', format('no usage event %s', p_event_id));
  END IF;
  -- The account's lock, as every charge takes it: reversals of one event, and charges spending
  -- the same lots, happen one after the other.
  a := metering.lock_account(e.account_id);

  SELECT * INTO r FROM metering.reversals WHERE account_id = a.id AND idempotency_key = p_idempotency_key;
  IF FOUND THEN                         -- a replay, or TL42R for another reversal
    PERFORM util.idempotency_check(r.request_hash, v_hash, 'reversal', jsonb_build_object('reversal_id', r.id));
    replayed := true;
    body := metering.reversal_json(r);
    RETURN;
  END IF;

  SELECT coalesce(sum(x.quantity), 0), coalesce(sum(x.credits_micros), 0), coalesce(sum(x.allowance_units), 0),
         coalesce(sum(x.amount_minor), 0)
  INTO v_q, v_c, v_al, v_am
  FROM metering.reversals x WHERE x.account_id = a.id AND x.usage_event_id = e.id;
  v_n := coalesce(p_quantity, e.quantity - v_q);
  IF v_q >= e.quantity THEN
    PERFORM util.fail('TL40C', 'this usage event is already fully reversed',
                      jsonb_build_object('usage_event_id', e.id, 'reversed_quantity', v_q));
  ELSIF v_q + v_n > e.quantity THEN
    PERFORM util.fail('TL422', format('at most %s of the event''s %s units are left to reverse', e.quantity - v_q, e.quantity),
                      jsonb_build_object('field', 'quantity', 'reversible_quantity', e.quantity - v_q));
  END IF;

  -- What the reversed units cost, cumulatively, so that partial reversals add up to the charge
  -- exactly: the last units charged (those credits paid for) are reversed first, then the
  -- allowance units. (A token meter's event is one unit: all of it.)
  v_credit_units := CASE WHEN e.input_tokens IS NULL THEN e.quantity - least(e.allowance_units, e.quantity) ELSE 1 END;
  r.id := util.uuid_v7();
  r.account_id := a.id;
  r.usage_event_id := e.id;
  r.event_created_at := e.created_at;
  r.idempotency_key := p_idempotency_key;
  r.request_hash := v_hash;
  r.quantity := v_n;
  r.credits_micros := CASE WHEN v_credit_units = 0 THEN 0
                           ELSE e.credits_micros * least(v_q + v_n, v_credit_units) / v_credit_units
                                - e.credits_micros * least(v_q, v_credit_units) / v_credit_units END;
  r.allowance_units := CASE WHEN e.input_tokens IS NOT NULL THEN e.allowance_units - v_al
                            ELSE greatest(v_q + v_n - v_credit_units, 0) - greatest(v_q - v_credit_units, 0) END;
  r.amount_minor := CASE WHEN e.amount_minor IS NOT NULL
                         THEN e.amount_minor * (v_q + v_n) / e.quantity - v_am END;
  r.currency := e.currency;
  r.reason := btrim(p_reason);
  r.api_key_id := e.api_key_id;
  r.user_id := e.user_id;
  r.staff_user_id := p_staff_user_id;
  r.operator_key_id := p_operator_key_id;
  r.created_at := util.now();
  r.lots := '[]';

  -- Allowance units go back to their window while it is still open.
  r.allowance_returned := r.allowance_units > 0 AND e.period_end > util.now();
  IF r.allowance_returned THEN
    UPDATE metering.allowance_usage SET used = greatest(used - r.allowance_units, 0)
    WHERE account_id = a.id AND meter_id = e.meter_id AND period_start = e.period_start;
  END IF;

  IF r.credits_micros > 0 THEN
    SELECT * INTO v_transfer
    FROM ledger.post_transfer(a.id, 'usage', r.credits_micros, 'reversal', 'reversal:' || r.id, e.id,
                              left('reversal: ' || r.reason, 500), p_lots => false);
    r.transfer_id := v_transfer.transfer_id;
    -- Back into the lots the charge drew from, the last drawn first (reverse burn order), past
    -- what earlier reversals of the event gave back already. A charge made before migration
    -- 0032b kept no lots: its credits come back as a new lot.
    v_draws := coalesce(e.lot_draws, CASE WHEN e.lot_id IS NOT NULL THEN jsonb_build_array(jsonb_build_array(e.lot_id, e.credits_micros))
                                          ELSE jsonb_build_array(jsonb_build_array(NULL, e.credits_micros)) END);
    v_skip := v_c;
    v_left := r.credits_micros;
    v_expires := util.now() + make_interval(days => metering.reversal_lot_days());
    FOR d IN SELECT x FROM jsonb_array_elements(v_draws) WITH ORDINALITY t (x, n) ORDER BY t.n DESC LOOP
      v_take := least((d ->> 1)::bigint - least(v_skip, (d ->> 1)::bigint), v_left);
      v_skip := v_skip - least(v_skip, (d ->> 1)::bigint);
      CONTINUE WHEN v_take <= 0;
      SELECT * INTO v_lot FROM ledger.credit_lots WHERE id = (d ->> 0)::uuid AND account_id = a.id;
      IF v_lot.status = 'active' AND (v_lot.expires_at IS NULL OR v_lot.expires_at > util.now()) THEN
        UPDATE ledger.credit_lots SET remaining_micros = remaining_micros + v_take WHERE id = v_lot.id;
        r.lots := r.lots || jsonb_build_object('lot_id', v_lot.id, 'credits', util.credits(v_take), 'new_lot', false);
      ELSE
        INSERT INTO ledger.credit_lots (account_id, source, amount_micros, remaining_micros, status, grant_key, transfer_id,
                                        available_at, expires_at, created_at, memo)
        VALUES (a.id, 'reversal', v_take, v_take, 'active', 'reversal:' || r.id || ':' || coalesce(v_lot.id::text, 'lot'),
                r.transfer_id, r.created_at, v_expires, r.created_at,
                left(format('reversal of %s (lot %s %s)', e.id, coalesce(v_lot.id::text, 'unknown'),
                            coalesce(v_lot.status, 'unrecorded')), 500))
        RETURNING id INTO v_new;
        UPDATE identity.accounts SET credits_due_at = least(credits_due_at, v_expires) WHERE id = a.id;
        r.lots := r.lots || jsonb_build_object('lot_id', v_new, 'credits', util.credits(v_take), 'new_lot', true,
                                               'replaces_lot', v_lot.id, 'expires_at', util.iso(v_expires));
      END IF;
      v_left := v_left - v_take;
      EXIT WHEN v_left = 0;
    END LOOP;
    IF v_left <> 0 THEN
      RAISE EXCEPTION 'the lots of usage event % do not add up to its credits', e.id USING ERRCODE = 'TL500';
    END IF;
    -- The budgets that counted the charge get the credits back in the window it counted in.
    IF a.has_budgets THEN
      PERFORM metering.budgets_return(array_agg(b.id), e.created_at, r.credits_micros)
      FROM metering.budgets b
      WHERE b.account_id = a.id AND metering.budget_applies(b.scope, b.subject, e.api_key_id, e.user_id);
    END IF;
  END IF;

  r.balance_after_micros := (SELECT credit_balance_micros FROM identity.accounts WHERE id = a.id);
  INSERT INTO metering.reversals SELECT r.*;
  IF p_staff_user_id IS NOT NULL THEN
    PERFORM ops.audit(u, 'reverse_usage', a.id, NULL, r.reason, metering.event_json(e), metering.reversal_json(r))
    FROM identity.users u WHERE u.id = p_staff_user_id;
  END IF;
  replayed := false;
  body := metering.reversal_json(r);
END $$;

COMMENT ON FUNCTION metering.reverse_usage(p_event_id uuid, p_quantity bigint, p_reason text, p_idempotency_key text, p_staff_user_id uuid, p_operator_key_id uuid, OUT replayed boolean, OUT body jsonb) IS 'Reverse p_quantity units of a usage event (NULL: all that are left), with a reason, once per (account, idempotency key): a retry with the same event, quantity and reason returns the reversal (replayed), another request under the key is TL42R (util.idempotency_check). Under the account''s lock: never more than was charged, however many run at once (TL40C fully reversed already, TL422 more units than are left). The reversed units cost what the charge''s last units did (credits first, then allowance units; partial reversals add up to the charge exactly). Credits come back by a ledger transfer of kind reversal from the usage system account into the lots the charge drew from, last drawn first; a lot that has expired or been canceled since becomes a new lot of source reversal expiring metering.reversal_lot_days() later. Allowance units go back to their window if it is still open; budgets that counted the charge get the credits back; a post-paid charge records the amount as a credit owed (reporting.post_paid_credits_owed). Staff reversals are audited (ops.audit_log); every reversal is a metering.reversals row. TL404 unknown event, TL422 bad key, reason or quantity.';

REVOKE ALL ON FUNCTION metering.reverse_usage(p_event_id uuid, p_quantity bigint, p_reason text, p_idempotency_key text, p_staff_user_id uuid, p_operator_key_id uuid, OUT replayed boolean, OUT body jsonb) FROM PUBLIC;

CREATE FUNCTION metering.set_budget(p_account_id uuid, p_scope text, p_subject uuid, p_limit text, p_window text, p_alerts integer[], p_created_by uuid) RETURNS jsonb
    LANGUAGE plpgsql
    AS $$
DECLARE
  a identity.accounts;
  b metering.budgets;
  v_limit bigint;
BEGIN
  IF p_scope IS NULL OR p_scope NOT IN ('api_key', 'member', 'account') THEN
    PERFORM util.fail('TL422', 'scope is api_key, member or account', '{"field": "scope"}');
  END IF;
  IF p_window IS NULL OR p_window NOT IN ('day', 'month', 'billing_period') THEN
    PERFORM util.fail('TL422', 'window is day, month or billing_period', '{"field": "window"}');
  END IF;
  v_limit := billing.to_micros(to_jsonb(p_limit), 'limit');
  IF v_limit <= 0 THEN
    PERFORM util.fail('TL422', 'limit: a budget is a positive number of credits', '{"field": "limit"}');
  END IF;
  IF cardinality(p_alerts) > 10 OR EXISTS (SELECT 1 FROM unnest(p_alerts) t WHERE t IS NULL OR t NOT BETWEEN 1 AND 100) THEN
    PERFORM util.fail('TL422', 'alerts: at most 10 percentages of the limit, each 1 to 100', '{"field": "alerts"}');
  END IF;
  SELECT * INTO a FROM identity.accounts WHERE id = p_account_id FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    PERFORM util.fail('TL404', format('no account %s', p_account_id));
  END IF;
  IF p_subject IS NULL AND p_scope = 'account' THEN
    p_subject := a.id;
  END IF;
  IF p_scope = 'account' AND p_subject IS DISTINCT FROM a.id
     OR p_scope = 'api_key' AND NOT EXISTS (SELECT 1 FROM identity.api_keys k WHERE k.id = p_subject AND k.account_id = a.id)
     OR p_scope = 'member' AND NOT EXISTS (SELECT 1 FROM identity.memberships m WHERE m.user_id = p_subject AND m.account_id = a.id) THEN
    PERFORM util.fail('TL422', format('subject: no %s %s on account %s', replace(p_scope, '_', ' '), p_subject, a.id),
                      '{"field": "subject"}');
  END IF;
  -- One budget per subject and window: setting it again changes its limit and alerts.
  INSERT INTO metering.budgets AS x (account_id, scope, subject, limit_micros, period, alerts, created_at, created_by)
  VALUES (a.id, p_scope, p_subject, v_limit, p_window,
          (SELECT coalesce(array_agg(DISTINCT t ORDER BY t), '{}') FROM unnest(p_alerts) t), util.now(), p_created_by)
  ON CONFLICT ON CONSTRAINT budgets_one_per_window DO UPDATE SET limit_micros = EXCLUDED.limit_micros, alerts = EXCLUDED.alerts
  RETURNING * INTO b;
  UPDATE identity.accounts SET has_budgets = true WHERE id = a.id AND NOT has_budgets;
  RETURN metering.budget_json(b.id);
END $$;

COMMENT ON FUNCTION metering.set_budget(p_account_id uuid, p_scope text, p_subject uuid, p_limit text, p_window text, p_alerts integer[], p_created_by uuid) IS 'Set a budget on an account (one per scope, subject and window: setting it again changes its limit and alerts), under the account''s lock, and mark the account as having budgets. p_limit: credits as a decimal string; p_alerts: percentages 1-100 (at most 10). TL404 unknown account, TL422 bad scope, subject (not a key or member of the account; account: the account itself, the default), window, limit or alerts.';

REVOKE ALL ON FUNCTION metering.set_budget(p_account_id uuid, p_scope text, p_subject uuid, p_limit text, p_window text, p_alerts integer[], p_created_by uuid) FROM PUBLIC;

CREATE FUNCTION metering.settle_hold(h metering.holds, p_status text) RETURNS metering.holds
    LANGUAGE plpgsql
    AS $$
DECLARE
  v metering.holds;
BEGIN
  -- The claim: an open hold is settled once, whoever else tries.
  UPDATE metering.holds SET status = p_status, settled_at = util.now()
  WHERE id = h.id AND status = 'open' RETURNING * INTO v;
  IF v.id IS NULL THEN
    RETURN NULL;
  END IF;
  UPDATE identity.accounts SET held_micros = held_micros - v.credits_micros WHERE id = v.account_id;
  IF v.budget_ids IS NOT NULL THEN       -- the budgets that counted the reservation get it back
    PERFORM metering.budgets_return(v.budget_ids, v.created_at, v.credits_micros);
  END IF;
  IF v.allowance_units > 0 THEN
    UPDATE metering.allowance_usage SET used = greatest(used - v.allowance_units, 0)
    WHERE account_id = v.account_id AND meter_id = v.meter_id AND period_start = v.period_start;
  END IF;
  RETURN v;
END $$;

COMMENT ON FUNCTION metering.settle_hold(h metering.holds, p_status text) IS 'Return what an open hold reserved (its credits to the spendable balance and to the windows of the budgets that counted them, its allowance units to their window) and mark it captured, released or expired, exactly once; NULL when it was not open. Callers lock the account first.';

REVOKE ALL ON FUNCTION metering.settle_hold(h metering.holds, p_status text) FROM PUBLIC;

CREATE FUNCTION metering.spending_json(a identity.accounts) RETURNS jsonb
    LANGUAGE sql STABLE
    AS $$
  SELECT jsonb_build_object('limit', p.spending_limit_minor, 'spent', metering.post_paid_spent(a.id, p.id, b.period_start),
                            'currency', coalesce((SELECT x.currency FROM billing.prices x WHERE x.plan_id = p.id
                                                  ORDER BY x.active DESC, x.id LIMIT 1), 'usd'),
                            'period_start', util.iso(b.period_start), 'resets_at', util.iso(b.period_end))
  FROM billing.plans p
  CROSS JOIN LATERAL metering.period_bounds('billing_period', util.now(), a.billing_period_start, a.billing_period_end) b
  WHERE p.id = identity.effective_plan(a)
    AND EXISTS (SELECT 1 FROM billing.entitlements e WHERE e.plan_id = p.id AND e.kind = 'post_paid')
$$;

COMMENT ON FUNCTION metering.spending_json(a identity.accounts) IS 'A post-paid plan''s spending this billing period as GET /v1/balance shows it: {limit, spent (minor units), currency, period_start, resets_at}; NULL when the account''s plan has no post-paid meter.';

REVOKE ALL ON FUNCTION metering.spending_json(a identity.accounts) FROM PUBLIC;

CREATE FUNCTION metering.usage_event_answer(e metering.usage_events, p_allowance json) RETURNS json
    LANGUAGE sql STABLE
    AS $$
  SELECT coalesce(e.response::json, json_build_object(
    'id', e.id, 'object', 'usage_event', 'account_id', e.account_id,
    'meter', e.meter_id, 'quantity', e.quantity,
    'input_tokens', e.input_tokens, 'output_tokens', e.output_tokens,
    'charged', CASE WHEN e.amount_minor IS NULL
                    THEN json_build_object('allowance_units', e.allowance_units, 'credits', util.credits(e.credits_micros))
                    ELSE json_build_object('allowance_units', e.allowance_units, 'credits', util.credits(e.credits_micros),
                                           'amount', e.amount_minor, 'currency', e.currency) END,
    'allowance', p_allowance,
    'balance', json_build_object('credits', util.credits(e.balance_after_micros)),
    'warnings', coalesce(e.warnings, '[]'),
    'metadata', e.metadata,
    'created_at', util.iso(e.created_at)))
$$;

COMMENT ON FUNCTION metering.usage_event_answer(e metering.usage_events, p_allowance json) IS 'The answer to a charge, first time and every replay alike: {id, object, account_id, meter, quantity, input_tokens, output_tokens, charged {allowance_units, credits; post-paid: amount (minor units), currency}, allowance (p_allowance: metering.allowance_json after the charge), balance {credits after it}, warnings, metadata, created_at}. Events charged before migration 0017 answer with their stored response.';

REVOKE ALL ON FUNCTION metering.usage_event_answer(e metering.usage_events, p_allowance json) FROM PUBLIC;

CREATE FUNCTION metering.window_usage(p_account_id uuid, m metering.meters, p_period_start timestamp with time zone, p_period_end timestamp with time zone) RETURNS bigint
    LANGUAGE sql STABLE
    AS $$
  SELECT coalesce(sum(CASE m.pricing WHEN 'unit' THEN e.quantity ELSE e.allowance_units + e.credits_micros END), 0)::bigint
  FROM metering.usage_events e
  WHERE e.account_id = p_account_id AND e.meter_id = m.id
    AND e.created_at >= p_period_start AND e.created_at < p_period_end
$$;

COMMENT ON FUNCTION metering.window_usage(p_account_id uuid, m metering.meters, p_period_start timestamp with time zone, p_period_end timestamp with time zone) IS 'All usage an account made on a meter in [p_period_start, p_period_end), whatever plan it was charged under: units for unit meters, micro-credits of cost for token meters. Where a window''s metering.allowance_usage row starts, so that a plan change or a device merge counts the usage already made (13 generations today on Pro, then Free: no Free generations left today).';

REVOKE ALL ON FUNCTION metering.window_usage(p_account_id uuid, m metering.meters, p_period_start timestamp with time zone, p_period_end timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION ops.audit(p_staff identity.users, p_action text, p_account_id uuid, p_user_id uuid, p_reason text, p_before jsonb, p_after jsonb) RETURNS bigint
    LANGUAGE plpgsql
    AS $$
DECLARE
  v_id bigint;
BEGIN
  IF p_reason IS NULL OR length(btrim(p_reason)) = 0 THEN
    PERFORM util.fail('TL422', 'every staff action needs a reason', '{"field": "reason"}');
  END IF;
  INSERT INTO ops.audit_log (at, staff_user_id, staff_role, action, target_account_id, target_user_id, reason, before, after)
  VALUES (util.now(), p_staff.id, p_staff.staff_role, p_action, p_account_id, p_user_id, left(btrim(p_reason), 500),
          p_before, p_after)
  RETURNING id INTO v_id;
  RETURN v_id;
END $$;

COMMENT ON FUNCTION ops.audit(p_staff identity.users, p_action text, p_account_id uuid, p_user_id uuid, p_reason text, p_before jsonb, p_after jsonb) IS 'Append a staff action to ops.audit_log (in the caller''s transaction: the action and its record commit together). TL422 without a reason.';

REVOKE ALL ON FUNCTION ops.audit(p_staff identity.users, p_action text, p_account_id uuid, p_user_id uuid, p_reason text, p_before jsonb, p_after jsonb) FROM PUBLIC;

CREATE FUNCTION ops.reconciliation_problems() RETURNS jsonb
    LANGUAGE plpgsql STABLE
    AS $$
DECLARE
  v text;
  n bigint;
  problems jsonb := '{}';
BEGIN
  FOREACH v IN ARRAY ops.reconciliation_views() LOOP
    EXECUTE format('SELECT count(*) FROM reporting.%I', v) INTO n;
    IF n > 0 THEN
      problems := problems || jsonb_build_object(v, n);
    END IF;
  END LOOP;
  RETURN nullif(problems, '{}');
END $$;

COMMENT ON FUNCTION ops.reconciliation_problems() IS 'How many rows each non-empty reconciliation view has ({view: rows}); NULL when all are empty.';

REVOKE ALL ON FUNCTION ops.reconciliation_problems() FROM PUBLIC;

CREATE FUNCTION ops.reconciliation_views() RETURNS text[]
    LANGUAGE sql IMMUTABLE
    AS $$
  SELECT ARRAY['balance_mismatches', 'unbalanced_transfers', 'entry_balance_breaks', 'usage_charge_mismatches',
               'hold_mismatches', 'unreported_post_paid_events', 'lot_balance_mismatches',
               'referral_reward_mismatches', 'revenue_drift', 'ledger_reference_breaks', 'unmatched_refunds',
               'stuck_auto_topups', 'meter_total_mismatches', 'unmatched_disputes', 'reversal_mismatches']
$$;

COMMENT ON FUNCTION ops.reconciliation_views() IS 'The reconciliation views of reporting, each of which must always be empty: what pgtally reconcile runs and what the reconciliation alert watches.';

REVOKE ALL ON FUNCTION ops.reconciliation_views() FROM PUBLIC;

CREATE FUNCTION util.alter_under_views(p_tables regclass[], p_ddl text) RETURNS integer
    LANGUAGE plpgsql
    AS $$
DECLARE
  v record;
  g text;
  saved jsonb;
BEGIN
  WITH RECURSIVE deps(view_oid, depth) AS (
    SELECT r.ev_class, 1
    FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid
    WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass
      AND d.refobjid = ANY (p_tables)
    UNION ALL
    SELECT r.ev_class, deps.depth + 1
    FROM deps JOIN pg_depend d ON d.refobjid = deps.view_oid AND d.refclassid = 'pg_class'::regclass
                                  AND d.classid = 'pg_rewrite'::regclass
    JOIN pg_rewrite r ON r.oid = d.objid
    WHERE r.ev_class <> deps.view_oid
  )
  SELECT coalesce(jsonb_agg(jsonb_build_object(
           'name', view_oid::regclass::text, 'depth', depth, 'def', pg_get_viewdef(view_oid),
           'comment', obj_description(view_oid, 'pg_class'),
           'grants', (SELECT coalesce(jsonb_agg(format('GRANT %s ON %s TO %I', a.privilege_type, view_oid::regclass,
                                                       r.rolname)), '[]')
                      FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a JOIN pg_roles r ON r.oid = a.grantee
                      WHERE c.oid = view_oid AND a.grantee <> c.relowner))), '[]')
  INTO saved
  FROM (SELECT view_oid, max(depth) AS depth FROM deps GROUP BY view_oid) x;

  FOR v IN SELECT * FROM jsonb_to_recordset(saved) AS s(name text, depth integer) ORDER BY depth DESC LOOP
    EXECUTE format('DROP VIEW %s', v.name);
  END LOOP;
  EXECUTE p_ddl;
  FOR v IN SELECT * FROM jsonb_to_recordset(saved) AS s(name text, depth integer, def text, comment text, grants jsonb)
           ORDER BY depth LOOP
    EXECUTE format('CREATE VIEW %s AS %s', v.name, v.def);
    EXECUTE format('COMMENT ON VIEW %s IS %L', v.name, v.comment);
    FOR g IN SELECT jsonb_array_elements_text(v.grants) LOOP
      EXECUTE g;
    END LOOP;
  END LOOP;
  RETURN jsonb_array_length(saved);
END $$;

COMMENT ON FUNCTION util.alter_under_views(p_tables regclass[], p_ddl text) IS 'For migrations: run the DDL p_ddl with the views that read the tables p_tables (and the views over those) out of its way: they are dropped first and made again after it, in dependency order, with their comments and grants (a column a view reads cannot change type). Returns how many views it made again.';

REVOKE ALL ON FUNCTION util.alter_under_views(p_tables regclass[], p_ddl text) FROM PUBLIC;

CREATE FUNCTION util.base64url(p_bytes bytea) RETURNS text
    LANGUAGE sql IMMUTABLE
    AS $$
  SELECT rtrim(translate(encode(p_bytes, 'base64'), E'+/\n', '-_'), '=')
$$;

COMMENT ON FUNCTION util.base64url(p_bytes bytea) IS 'Bytes as URL-safe base64 without padding (RFC 4648 section 5).';

REVOKE ALL ON FUNCTION util.base64url(p_bytes bytea) FROM PUBLIC;

CREATE FUNCTION util.credits(p_micros bigint) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
  -- Multiplying by 0.000001 is exact in numeric (a division would round to about 16 digits).
  SELECT trim_scale(p_micros::numeric * 0.000001)::text
$$;

COMMENT ON FUNCTION util.credits(p_micros bigint) IS 'Micro-credits as an exact decimal string of credits, as JSON shows them, for any bigint: 12500000 -> ''12.5'', 6000000000000052392 -> ''6000000000000.052392''. NULL stays NULL.';

REVOKE ALL ON FUNCTION util.credits(p_micros bigint) FROM PUBLIC;

CREATE FUNCTION util.ensure_partitions(p_months_ahead integer DEFAULT 3, p_from date DEFAULT NULL::date) RETURNS text[]
    LANGUAGE plpgsql
    AS $_$
DECLARE
  t regclass;
  v_default text;
  v_first date;
  v_month date;
  v_name text;
  v_moving boolean;
  v_made text[] := '{}';
BEGIN
  FOREACH t IN ARRAY ARRAY['metering.usage_events'::regclass, 'ledger.entries'::regclass] LOOP
    v_default := t::text || '_default';
    EXECUTE format('SELECT date_trunc(''month'', min(created_at), ''UTC'')::date FROM %s', v_default) INTO v_first;
    FOR v_month IN SELECT generate_series(least(v_first, date_trunc('month', util.now(), 'UTC')::date,
                                                date_trunc('month', p_from)::date),
                                          date_trunc('month', util.now(), 'UTC')::date + make_interval(months => p_months_ahead),
                                          interval '1 month')::date LOOP
      v_name := util.partition_name(t, v_month);
      CONTINUE WHEN to_regclass(v_name) IS NOT NULL;       -- made before (or detached and kept)
      EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s WHERE created_at >= $1 AND created_at < $2)', v_default)
        INTO v_moving USING v_month::timestamp AT TIME ZONE 'UTC', (v_month + interval '1 month') AT TIME ZONE 'UTC';
      IF v_moving THEN
        -- Rows of this month wait in the default partition (written before the month had its
        -- own, as by migration 0017): they move into it, the default detached meanwhile.
        EXECUTE format('ALTER TABLE %s DETACH PARTITION %s', t, v_default);
      END IF;
      EXECUTE format('CREATE TABLE %s PARTITION OF %s FOR VALUES FROM (%L) TO (%L)', v_name, t,
                     v_month::timestamp AT TIME ZONE 'UTC', (v_month + interval '1 month') AT TIME ZONE 'UTC');
      IF v_moving THEN
        EXECUTE format('INSERT INTO %s OVERRIDING SYSTEM VALUE SELECT * FROM %s WHERE created_at >= $1 AND created_at < $2',
                       v_name, v_default) USING v_month::timestamp AT TIME ZONE 'UTC', (v_month + interval '1 month') AT TIME ZONE 'UTC';
        EXECUTE format('ALTER TABLE %s DISABLE TRIGGER USER', v_default);
        EXECUTE format('DELETE FROM %s WHERE created_at >= $1 AND created_at < $2', v_default)
          USING v_month::timestamp AT TIME ZONE 'UTC', (v_month + interval '1 month') AT TIME ZONE 'UTC';
        EXECUTE format('ALTER TABLE %s ENABLE TRIGGER USER', v_default);
        EXECUTE format('ALTER TABLE %s ATTACH PARTITION %s DEFAULT', t, v_default);
      END IF;
      IF t = 'ledger.entries'::regclass THEN
        -- A statement on the partition itself is not one on the parent: it gets its own guards.
        EXECUTE format('CREATE TRIGGER entries_append_only BEFORE UPDATE OR DELETE ON %s '
                       'FOR EACH STATEMENT EXECUTE FUNCTION util.forbid_change()', v_name);
        EXECUTE format('CREATE TRIGGER entries_no_truncate BEFORE TRUNCATE ON %s '
                       'FOR EACH STATEMENT EXECUTE FUNCTION util.forbid_change()', v_name);
      END IF;
      v_made := v_made || v_name;
    END LOOP;
  END LOOP;
  RETURN v_made;
END $_$;

COMMENT ON FUNCTION util.ensure_partitions(p_months_ahead integer, p_from date) IS 'Make the monthly partitions (UTC months) of metering.usage_events and ledger.entries from the oldest month waiting in their default partitions, the current month or p_from, whichever is first, through p_months_ahead months ahead, moving rows out of the default partition into their month. A month whose table exists (attached, or detached and kept) is left alone. Returns the partitions made. Run after every upgrade and by the worker (api.maintain_storage).';

REVOKE ALL ON FUNCTION util.ensure_partitions(p_months_ahead integer, p_from date) FROM PUBLIC;

CREATE FUNCTION util.fail(p_sqlstate text, p_message text, p_detail jsonb DEFAULT NULL::jsonb) RETURNS void
    LANGUAGE plpgsql
    AS $$
BEGIN
  RAISE EXCEPTION USING ERRCODE = p_sqlstate, MESSAGE = p_message,
    DETAIL = coalesce(p_detail::text, '');
END $$;

COMMENT ON FUNCTION util.fail(p_sqlstate text, p_message text, p_detail jsonb) IS 'Raise a pgtally error: SQLSTATE of class TL (TL401 unauthenticated, TL402 payment required, TL404 not found, TL409 conflict, TL422 invalid input), a message meant for the caller, and optional JSON DETAIL whose members the API adds to the problem+json body.';

REVOKE ALL ON FUNCTION util.fail(p_sqlstate text, p_message text, p_detail jsonb) FROM PUBLIC;

CREATE FUNCTION util.forbid_change() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  RAISE EXCEPTION '% is append-only', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME
    USING ERRCODE = 'TL403', HINT = 'Correct a ledger with a new transfer, never by editing history.';
END $$;

COMMENT ON FUNCTION util.forbid_change() IS 'Trigger function for append-only tables: raises TL403 on UPDATE, DELETE or TRUNCATE.';

REVOKE ALL ON FUNCTION util.forbid_change() FROM PUBLIC;

CREATE FUNCTION util.hmac_sha256(p_key bytea, p_message bytea) RETURNS bytea
    LANGUAGE plpgsql IMMUTABLE STRICT
    AS $$
DECLARE
  -- HMAC (RFC 2104) over SHA-256 (block size 64 bytes); PostgreSQL has sha256() built in but
  -- no hmac() without pgcrypto, which the embedded server does not ship.
  v_key bytea := CASE WHEN length(p_key) > 64 THEN sha256(p_key) ELSE p_key END;
  v_inner bytea;
  v_outer bytea;
BEGIN
  v_key := v_key || decode(repeat('00', 64 - length(v_key)), 'hex');
  v_inner := v_key;
  v_outer := v_key;
  FOR i IN 0..63 LOOP
    v_inner := set_byte(v_inner, i, get_byte(v_key, i) # 54);    -- 0x36
    v_outer := set_byte(v_outer, i, get_byte(v_key, i) # 92);    -- 0x5c
  END LOOP;
  RETURN sha256(v_outer || sha256(v_inner || p_message));
END $$;

COMMENT ON FUNCTION util.hmac_sha256(p_key bytea, p_message bytea) IS 'HMAC-SHA256 (RFC 2104; checked against the RFC 4231 test vectors in tests/sql): a keyed hash, used to derive a refresh token''s successor from the token and its family''s secret.';

REVOKE ALL ON FUNCTION util.hmac_sha256(p_key bytea, p_message bytea) FROM PUBLIC;

CREATE FUNCTION util.idempotency_check(p_stored bytea, p_request bytea, p_what text, p_detail jsonb) RETURNS boolean
    LANGUAGE plpgsql STABLE
    AS $$
BEGIN
  IF p_stored IS NULL THEN
    RETURN false;                        -- no earlier request under the key: go on
  ELSIF p_stored = p_request THEN
    RETURN true;                         -- the same request again: answer it as the first time
  END IF;
  RAISE EXCEPTION USING ERRCODE = 'TL42R',
    MESSAGE = format('this idempotency key was already used for a different %s', p_what),
    DETAIL = coalesce(p_detail::text, '');
END $$;

COMMENT ON FUNCTION util.idempotency_check(p_stored bytea, p_request bytea, p_what text, p_detail jsonb) IS 'The idempotency check of the IETF draft "The Idempotency-Key HTTP Header Field" (draft-ietf-httpapi-idempotency-key-header): given the fingerprint stored with an earlier request under the key (NULL: none) and this request''s, false when there was none (process it), true when it is the same request (replay the first answer: the API adds Idempotent-Replayed: true), and TL42R (422 idempotency-key-reused; p_what names the thing, p_detail the earlier one) when the key was used for a different request: nothing changes. Callers read the earlier request under the lock that serialises the writes of the key (the account row), so a concurrent retry waits for the first and replays it: no request under a key is ever seen in progress. Used by api.consume, api.consume_batch, api.hold, ledger.operator_transfer (grants, adjustments, admin credits) and metering.reverse_usage.';

REVOKE ALL ON FUNCTION util.idempotency_check(p_stored bytea, p_request bytea, p_what text, p_detail jsonb) FROM PUBLIC;

CREATE FUNCTION util.iso(p_at timestamp with time zone) RETURNS text
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$
  SELECT to_char(p_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
$$;

COMMENT ON FUNCTION util.iso(p_at timestamp with time zone) IS 'A timestamp as RFC 3339 text in UTC with microseconds, whatever the session time zone.';

REVOKE ALL ON FUNCTION util.iso(p_at timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION util.now() RETURNS timestamp with time zone
    LANGUAGE sql STABLE
    AS $$
  SELECT coalesce(nullif(current_setting('pgtally.now', true), '')::timestamptz, now())
$$;

COMMENT ON FUNCTION util.now() IS 'The one clock of pgtally: now(), unless the session sets pgtally.now (tests move time with SET pgtally.now = ''2026-01-31 23:59:59+00'').';

REVOKE ALL ON FUNCTION util.now() FROM PUBLIC;

CREATE FUNCTION util.partition_name(p_table regclass, p_month date) RETURNS text
    LANGUAGE sql STABLE
    AS $$
  SELECT p_table::text || '_y' || to_char(p_month, 'YYYY') || 'm' || to_char(p_month, 'MM')
$$;

COMMENT ON FUNCTION util.partition_name(p_table regclass, p_month date) IS 'The name of a monthly partition: metering.usage_events, 2026-11-01 -> metering.usage_events_y2026m11.';

REVOKE ALL ON FUNCTION util.partition_name(p_table regclass, p_month date) FROM PUBLIC;

CREATE FUNCTION util.random_token() RETURNS text
    LANGUAGE sql
    AS $$
  -- 366 random bits (three version-4 UUIDs from pg_strong_random), URL-safe base64, 64 characters.
  SELECT util.base64url(uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid()))
$$;

COMMENT ON FUNCTION util.random_token() IS 'A secret token of 366 random bits as 64 URL-safe characters: refresh, verification and reset tokens, API key bodies.';

REVOKE ALL ON FUNCTION util.random_token() FROM PUBLIC;

CREATE FUNCTION util.referral_code() RETURNS text
    LANGUAGE sql
    AS $$
  -- 8 characters of an unambiguous alphabet (31^8, about 8.5e11 codes) from random uuid bytes.
  SELECT string_agg(substr('abcdefghjkmnpqrstuvwxyz23456789', 1 + get_byte(b, i) % 31, 1), '' ORDER BY i)
  FROM (SELECT uuid_send(gen_random_uuid()) AS b) x, unnest(ARRAY[0, 1, 2, 3, 4, 5, 10, 11]) i
$$;

COMMENT ON FUNCTION util.referral_code() IS 'A new random referral code: 8 lower-case letters and digits, no 0/o/1/l/i.';

REVOKE ALL ON FUNCTION util.referral_code() FROM PUBLIC;

CREATE FUNCTION util.token_hash(p_token text) RETURNS bytea
    LANGUAGE sql STABLE
    AS $$        -- STABLE as convert_to is, so that it is inlined
  SELECT sha256(convert_to(coalesce(p_token, ''), 'UTF8'))
$$;

COMMENT ON FUNCTION util.token_hash(p_token text) IS 'SHA-256 of a secret token: the only form in which tokens and keys are stored.';

REVOKE ALL ON FUNCTION util.token_hash(p_token text) FROM PUBLIC;

CREATE FUNCTION util.uuid_v7() RETURNS uuid
    LANGUAGE sql PARALLEL SAFE
    AS $$
  SELECT encode(
    set_bit(set_bit(
      overlay(uuid_send(gen_random_uuid())
              PLACING substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
              FROM 1 FOR 6),
      52, 1), 53, 1),
    'hex')::uuid
$$;

COMMENT ON FUNCTION util.uuid_v7() IS 'A version 7 UUID (RFC 9562 section 5.7): 48-bit Unix milliseconds, then random bits. Used for every public id.';

REVOKE ALL ON FUNCTION util.uuid_v7() FROM PUBLIC;

CREATE FUNCTION util.uuid_v7s(p_count integer) RETURNS uuid[]
    LANGUAGE sql
    AS $$
  SELECT array_agg(encode(substring(f.first FROM 1 FOR 8) || int8send(f.counter + n), 'hex')::uuid ORDER BY n)
  FROM (SELECT b AS first, ('x' || encode(substring(b FROM 9 FOR 8), 'hex'))::bit(64)::bigint & ~(1::bigint << 61) AS counter
        FROM uuid_send(util.uuid_v7()) b) f
  CROSS JOIN generate_series(0, p_count - 1) n
$$;

COMMENT ON FUNCTION util.uuid_v7s(p_count integer) IS 'p_count version 7 UUIDs (at most 2^61), ascending, made together: the first is util.uuid_v7(), each next one more in its random part (RFC 9562 section 6.2, method 2, monotonic random). For a batch: one draw of random bits instead of one per id. NULL for 0.';

REVOKE ALL ON FUNCTION util.uuid_v7s(p_count integer) FROM PUBLIC;
