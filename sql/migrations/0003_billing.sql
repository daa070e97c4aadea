-- pgtally 0003: Stripe prices and bundles, customers, subscriptions, payments and the webhook inbox.
-- depends: 0002_identity


ALTER TABLE billing.plans
  ADD COLUMN included_credits_micros bigint NOT NULL DEFAULT 0 CHECK (included_credits_micros >= 0);
COMMENT ON COLUMN billing.plans.included_credits_micros IS
  'Credits granted at the start of every paid subscription period (on invoice.paid), in micro-credits.';

ALTER TABLE identity.accounts
  ADD COLUMN plan_grace_until timestamptz;
COMMENT ON COLUMN identity.accounts.plan_grace_until IS
  'Set when a subscription payment fails: the plan holds until then, after which the account is metered as free until a payment succeeds.';

CREATE TABLE billing.prices (
  id                text PRIMARY KEY CHECK (id ~ '^[a-z][a-z0-9_]{0,62}$'),
  stripe_price_id   text NOT NULL UNIQUE,
  plan_id           text REFERENCES billing.plans,
  interval          text CHECK (interval IN ('month', 'year')),
  credits_micros    bigint CHECK (credits_micros > 0),
  amount_minor      bigint NOT NULL CHECK (amount_minor >= 0),
  currency          text NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
  name              text NOT NULL,
  active            boolean NOT NULL DEFAULT true,
  CHECK ((plan_id IS NOT NULL AND interval IS NOT NULL AND credits_micros IS NULL)
         OR (plan_id IS NULL AND interval IS NULL AND credits_micros IS NOT NULL))
);
COMMENT ON TABLE billing.prices IS
  'What can be bought through Stripe Checkout: a plan''s recurring price (monthly or yearly, subscription mode) or a one-time credit bundle (payment mode). Loaded from the catalog file.';
COMMENT ON COLUMN billing.prices.id IS 'pgtally''s price code, for example pro_monthly or bundle_10 (what clients send).';
COMMENT ON COLUMN billing.prices.stripe_price_id IS 'The Stripe Price id (price_...) of this environment.';
COMMENT ON COLUMN billing.prices.amount_minor IS 'Price in minor currency units (cents), as Stripe counts.';
COMMENT ON COLUMN billing.prices.credits_micros IS 'For a bundle: the micro-credits a paid checkout grants.';

CREATE TABLE billing.customers (
  account_id          uuid PRIMARY KEY REFERENCES identity.accounts,
  stripe_customer_id  text NOT NULL UNIQUE,
  created_at          timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE billing.customers IS 'The Stripe Customer (cus_...) of an account, one each.';

CREATE TABLE billing.subscriptions (
  stripe_subscription_id text PRIMARY KEY,
  account_id             uuid NOT NULL REFERENCES identity.accounts,
  stripe_customer_id     text,
  status                 text NOT NULL CHECK (status IN ('incomplete', 'incomplete_expired', 'trialing', 'active',
                                                         'past_due', 'canceled', 'unpaid', 'paused')),
  stripe_item_id         text,
  price_id               text REFERENCES billing.prices,
  plan_id                text REFERENCES billing.plans,
  current_period_start   timestamptz,
  current_period_end     timestamptz,
  cancel_at_period_end   boolean NOT NULL DEFAULT false,
  canceled_at            timestamptz,
  last_event_created     timestamptz NOT NULL,
  last_event_rank        integer NOT NULL,
  last_event_id          text NOT NULL,
  updated_at             timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX subscriptions_account_id_idx ON billing.subscriptions (account_id);
COMMENT ON TABLE billing.subscriptions IS
  'Stripe subscriptions as the newest applied event describes them. An event is applied only when (created, rank, id) is greater than the stored last_event_*: an older event never overwrites newer state, and events of the same second are ordered the same way whatever order they arrive in.';
COMMENT ON COLUMN billing.subscriptions.last_event_rank IS
  'Tiebreak within one second: the lifecycle rank of the event''s subscription status (incomplete < trialing < active < past_due < unpaid < paused < canceled), then created/updated/deleted.';

CREATE TABLE billing.payments (
  stripe_payment_intent_id text PRIMARY KEY,
  account_id               uuid NOT NULL REFERENCES identity.accounts,
  stripe_checkout_session  text UNIQUE,
  price_id                 text REFERENCES billing.prices,
  amount_minor             bigint NOT NULL CHECK (amount_minor >= 0),
  currency                 text NOT NULL,
  credits_micros           bigint NOT NULL CHECK (credits_micros >= 0),
  refunded_minor           bigint NOT NULL DEFAULT 0 CHECK (refunded_minor >= 0),
  clawed_back_micros       bigint NOT NULL DEFAULT 0 CHECK (clawed_back_micros >= 0),
  shortfall_micros         bigint NOT NULL DEFAULT 0 CHECK (shortfall_micros >= 0),
  paid_at                  timestamptz NOT NULL
);
COMMENT ON TABLE billing.payments IS
  'One-time payments for credit bundles. Refunds claw back credits in proportion, never below a zero balance: what could not be taken back is recorded in shortfall_micros.';

CREATE TABLE billing.stripe_events (
  id          text PRIMARY KEY,
  type        text NOT NULL,
  created     timestamptz NOT NULL,
  livemode    boolean NOT NULL DEFAULT false,
  payload     jsonb NOT NULL,
  received_at timestamptz NOT NULL DEFAULT now(),
  status      text NOT NULL CHECK (status IN ('applied', 'stale', 'ignored')),
  note        text
);
CREATE INDEX stripe_events_status_idx ON billing.stripe_events (status, received_at) WHERE status <> 'applied';
COMMENT ON TABLE billing.stripe_events IS
  'Inbox of Stripe webhook events, keyed by Stripe''s event id: an event is applied in the transaction that records it, and a redelivery changes nothing. status: applied, stale (older than the state already applied), ignored (a type pgtally does not handle, or nothing of pgtally''s to change; note says why).';

ALTER TABLE ledger.transfers DROP CONSTRAINT transfers_kind_check;
ALTER TABLE ledger.transfers ADD CONSTRAINT transfers_kind_check
  CHECK (kind IN ('grant', 'usage', 'purchase', 'adjustment', 'plan_credits', 'refund'));

CREATE VIEW reporting.subscriptions_by_status AS
SELECT plan_id, status, count(*) AS subscriptions,
       count(*) FILTER (WHERE cancel_at_period_end) AS canceling_at_period_end
FROM billing.subscriptions GROUP BY plan_id, status;
COMMENT ON VIEW reporting.subscriptions_by_status IS 'Subscriptions per plan and Stripe status.';

CREATE VIEW reporting.payments_vs_ledger_daily AS
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

CREATE VIEW reporting.stripe_events_not_applied AS
SELECT id, type, created, received_at, status, note FROM billing.stripe_events WHERE status <> 'applied';
COMMENT ON VIEW reporting.stripe_events_not_applied IS 'Webhook events received but not applied (stale or ignored), with the reason.';

GRANT SELECT ON reporting.subscriptions_by_status, reporting.payments_vs_ledger_daily,
                reporting.stripe_events_not_applied TO pgtally_analyst;
