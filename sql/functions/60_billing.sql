-- Stripe billing: checkout preparation, subscriptions, and webhook events applied exactly once,
-- in order, in the transaction that records them.
-- Object shapes follow Stripe API 2026-10-28 (stripe 16): a subscription's period is on its
-- items (items.data[].current_period_*), an invoice names its subscription under
-- parent.subscription_details.subscription.

CREATE OR REPLACE FUNCTION billing.ts(p_unix jsonb) RETURNS timestamptz
LANGUAGE sql IMMUTABLE AS $$
  SELECT CASE WHEN jsonb_typeof(p_unix) = 'number' THEN to_timestamp((p_unix #>> '{}')::bigint) END
$$;
COMMENT ON FUNCTION billing.ts(jsonb) IS 'A Stripe Unix timestamp (seconds) as timestamptz; NULL when absent.';

CREATE OR REPLACE FUNCTION billing.event_rank(p_type text, p_status text) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$
  SELECT 10 * CASE p_status WHEN 'incomplete' THEN 0 WHEN 'incomplete_expired' THEN 1 WHEN 'trialing' THEN 2
                            WHEN 'active' THEN 3 WHEN 'past_due' THEN 4 WHEN 'unpaid' THEN 5 WHEN 'paused' THEN 6
                            WHEN 'canceled' THEN 7 ELSE 0 END
         + CASE p_type WHEN 'customer.subscription.created' THEN 0 WHEN 'customer.subscription.updated' THEN 1
                       WHEN 'customer.subscription.deleted' THEN 2 ELSE 1 END
$$;
COMMENT ON FUNCTION billing.event_rank(text, text) IS
  'Order of two subscription events created in the same second (Stripe timestamps have one-second resolution and deliveries are unordered): later in the subscription lifecycle first, then created < updated < deleted; the event id breaks any remaining tie. Deterministic, so arrival order never changes the outcome.';

CREATE OR REPLACE FUNCTION billing.account_of(p_account_hint text, p_customer text) RETURNS uuid
LANGUAGE sql STABLE AS $$
  SELECT coalesce(
    (SELECT coalesce(a.merged_into, a.id) FROM identity.accounts a
     WHERE p_account_hint ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
       AND a.id = p_account_hint::uuid),
    (SELECT c.account_id FROM billing.customers c WHERE c.stripe_customer_id = p_customer))
$$;
COMMENT ON FUNCTION billing.account_of(text, text) IS
  'The account a Stripe object belongs to: its account_id metadata (or client_reference_id) when it names an account (the user it was merged into, for a device that signed up since), else the owner of its customer.';

CREATE OR REPLACE FUNCTION billing.sync_account_plan(p_account_id uuid) RETURNS void
LANGUAGE plpgsql AS $$
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
COMMENT ON FUNCTION billing.sync_account_plan(uuid) IS
  'Set an account''s plan and billing period from its live subscription (active, trialing or past_due, not a duplicate being canceled; the one whose period ends last), or the free plan when it has none. Called with the account locked.';

CREATE OR REPLACE FUNCTION billing.catch_duplicate_subscription(p_subscription text, p_account_id uuid, p_plan text,
                                                               p_currency text) RETURNS boolean
LANGUAGE plpgsql AS $$
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
END $$;
COMMENT ON FUNCTION billing.catch_duplicate_subscription(text, uuid, text, text) IS
  'A subscription just became live: if the account already has another live one (two Checkouts paid at once), record it in billing.duplicate_subscriptions (once), queue the worker task that cancels it at Stripe and refunds its invoices (cancel_duplicate_subscription), and email the customer (subscription_duplicate). Returns whether it is a duplicate. The first live subscription is kept.';

CREATE OR REPLACE FUNCTION billing.apply_subscription(p_event jsonb, p_current jsonb DEFAULT NULL) RETURNS text
LANGUAGE plpgsql AS $$
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
COMMENT ON FUNCTION billing.apply_subscription(jsonb, jsonb) IS
  'customer.subscription.created/updated/deleted: store the subscription (status, the plan of whichever item has a plan''s price (licensed first), that item''s period, cancel at period end, cancel_at: a scheduled end by date) unless the stored state comes from a later event (then stale), and set the account''s plan from it. p_current: the subscription as just re-read from Stripe, applied instead of the event''s copy whatever the order (how Stripe recommends settling events of the same second).';

CREATE OR REPLACE FUNCTION billing.apply_checkout_completed(p_event jsonb) RETURNS text
LANGUAGE plpgsql AS $$
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
COMMENT ON FUNCTION billing.apply_checkout_completed(jsonb) IS
  'checkout.session.completed and checkout.session.async_payment_succeeded (delayed payment methods): link the Stripe customer to the account; for a paid bundle, record the payment (with its tax: total_details.amount_tax) and grant its credits (once per session).';

CREATE OR REPLACE FUNCTION billing.apply_checkout_expired(p_event jsonb) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
  UPDATE billing.checkout_sessions SET status = 'expired', closed_at = util.now()
  WHERE stripe_checkout_session_id = p_event #>> '{data,object,id}' AND status = 'open';
  RETURN CASE WHEN FOUND THEN 'applied' ELSE 'ignored: not an open session pgtally opened' END;
END $$;
COMMENT ON FUNCTION billing.apply_checkout_expired(jsonb) IS
  'checkout.session.expired: the session can no longer be paid (Stripe expired it after 24 hours, or pgtally asked because a newer one replaced it): close it in billing.checkout_sessions.';

CREATE OR REPLACE FUNCTION billing.apply_payment_intent_succeeded(p_event jsonb) RETURNS text
LANGUAGE plpgsql AS $$
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
COMMENT ON FUNCTION billing.apply_payment_intent_succeeded(jsonb) IS
  'payment_intent.succeeded for a credit bundle (a one-click or auto top-up, or a Checkout payment whose own event has not arrived): record the payment and grant its credits, once per PaymentIntent whichever of the two events comes first; an auto top-up''s ends its in-flight state when it is the one in flight (metadata auto_topup_task); a top-up''s (metadata topup or auto_topup) queues its invoice (worker task invoice_topup).';

CREATE OR REPLACE FUNCTION billing.subscription_of_invoice(o jsonb) RETURNS billing.subscriptions
LANGUAGE plpgsql AS $$
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
COMMENT ON FUNCTION billing.subscription_of_invoice(jsonb) IS
  'The subscription an invoice bills (NULL for a one-off invoice). TL503 (answered 503, so Stripe retries) when the subscription''s own events have not arrived yet.';

CREATE OR REPLACE FUNCTION billing.record_payment_invoice(o jsonb, p_paid_at timestamptz) RETURNS text
LANGUAGE plpgsql AS $$
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
COMMENT ON FUNCTION billing.record_payment_invoice(jsonb, timestamptz) IS
  'invoice.paid of an invoice that bills no subscription (a one-time Checkout purchase with invoice_creation): record it once in billing.payment_invoices for the account of its metadata or customer, with the PaymentIntent that paid it (payments.data), its number, tax (total_taxes) and links. Not revenue: the payment itself is billing.payments''.';

CREATE OR REPLACE FUNCTION billing.apply_invoice_paid(p_event jsonb) RETURNS text
LANGUAGE plpgsql AS $$
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
COMMENT ON FUNCTION billing.apply_invoice_paid(jsonb) IS
  'invoice.paid for a subscription: record the invoice once (billing.invoices, with its metered lines: the post-paid usage Stripe billed) and the payments that paid it (payments.data: billing.invoice_payments); move the subscription and account to the invoiced period (its latest line''s; never backwards), which resets billing-period allowances; end any payment grace; grant the plan''s included credits once per invoice. A duplicate subscription''s invoice is recorded (to be refunded) and nothing else; the invoice of a one-time payment is billing.record_payment_invoice''s.';

CREATE OR REPLACE FUNCTION billing.apply_invoice_payment_failed(p_event jsonb) RETURNS text
LANGUAGE plpgsql AS $$
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
COMMENT ON FUNCTION billing.apply_invoice_payment_failed(jsonb) IS
  'invoice.payment_failed: record the invoice as open, start a 7-day grace period (from the event''s time, once) and email the customer once per invoice (payment_failed: the amount, the grace end and the link to update the card); after the grace the account is metered as free until an invoice is paid. The subscription''s past_due status arrives by its own event. Stale (nothing changes) when the invoice is already recorded paid: the failure of an attempt before the one that succeeded, delivered late.';

CREATE OR REPLACE FUNCTION billing.apply_invoice_refund(o jsonb) RETURNS text
LANGUAGE plpgsql AS $$
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
COMMENT ON FUNCTION billing.apply_invoice_refund(jsonb) IS
  'charge.refunded of a subscription invoice''s payment (found by PaymentIntent or charge in billing.invoice_payments: since API 2025-03-31 a Charge names no invoice): record what was refunded of the payment and the invoice (minor units; refunded in full: status refunded, out of the revenue views), cancel a referral reward the invoice earned inside its holdback. NULL when the charge paid no recorded invoice; stale when no more was refunded than already recorded.';

CREATE OR REPLACE FUNCTION billing.apply_charge_refunded(p_event jsonb) RETURNS text
LANGUAGE plpgsql AS $$
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
COMMENT ON FUNCTION billing.apply_charge_refunded(jsonb) IS
  'charge.refunded: a subscription invoice''s payment is billing.apply_invoice_refund''s. Otherwise a referral reward the payment earned is canceled inside its holdback (billing.cancel_referral_reward); for a bundle payment, take back the credits in proportion to amount_refunded (from the lot it bought first, then in the burn order), never below a zero balance; what could not be taken is added to billing.payments.shortfall_micros. Partial refunds apply their increase only.';

CREATE OR REPLACE FUNCTION billing.record_rejected(p_id text, p_type text, p_payload jsonb, p_reason text)
RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO billing.stripe_events (id, type, created, livemode, payload, received_at, status, note)
  VALUES (p_id, left(coalesce(p_type, '?'), 100), NULL, false, p_payload, util.now(), 'rejected', left(p_reason, 1000))
  ON CONFLICT (id) DO NOTHING;
  RETURN jsonb_build_object('received', true, 'status', 'rejected', 'event_id', p_id,
                            'reason', (SELECT note FROM billing.stripe_events WHERE id = p_id));
END $$;
COMMENT ON FUNCTION billing.record_rejected(text, text, jsonb, text) IS
  'Record a signed but malformed Stripe event as rejected, with the reason (once per id); nothing is applied.';

CREATE OR REPLACE FUNCTION api.stripe_webhook_rejected(p_body_sha256 text, p_reason text) RETURNS jsonb
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT billing.record_rejected('rejected:' || left(p_body_sha256, 64), NULL, NULL, p_reason)
$$;
COMMENT ON FUNCTION api.stripe_webhook_rejected(text, text) IS
  'POST /v1/webhooks/stripe, for a validly signed body that is not readable JSON (not UTF-8, too deeply nested, a NUL character): record it as rejected under the id rejected:<SHA-256 of the body> with the reason. The API answers 400.';

CREATE OR REPLACE FUNCTION billing.record_outcome(p_event_id text, p_result text, p_reason text) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
  v_status text := split_part(p_result, ':', 1);
BEGIN
  UPDATE billing.stripe_events
  SET status = v_status, note = left(nullif(btrim(substr(p_result, length(v_status) + 2)), ''), 1000)
  WHERE id = p_event_id;
  RETURN jsonb_build_object('received', true, 'duplicate', false, 'status', v_status, 'event_id', p_event_id)
         || CASE WHEN v_status = 'rejected' THEN jsonb_build_object('reason', left(p_reason, 1000)) ELSE '{}' END;
END $$;
COMMENT ON FUNCTION billing.record_outcome(text, text, text) IS
  'What applying a Stripe event came to (p_result: ''applied'', ''ignored: why'', ''rejected: why''...): its status and note on billing.stripe_events, and the answer api.stripe_webhook and api.stripe_thin_event return ({received, duplicate: false, status, event_id, reason for a rejection}).';

CREATE OR REPLACE FUNCTION api.stripe_webhook(p_event jsonb, p_current jsonb DEFAULT NULL, p_lines jsonb DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
END $$;
COMMENT ON FUNCTION api.stripe_webhook(jsonb, jsonb, jsonb) IS
  'POST /v1/webhooks/stripe, after the server verified the signature: record the event in billing.stripe_events (keyed by Stripe''s id) and apply it in the same transaction. A duplicate returns duplicate = true and its recorded status, changing nothing. Unknown types are recorded as ignored. A malformed event (bad envelope, a field of the wrong type or out of range) is recorded as rejected with the reason and nothing of it applied (status rejected; the API answers 400). Events are applied one customer at a time (a transaction advisory lock on the object''s customer, else its charge, invoice or id), so concurrent deliveries, duplicates included, wait rather than fail; a duplicate returns its recorded status. A subscription event in the same second as the one last applied, and an invoice event whose subscription is not known yet, return status refetch without recording anything: the server re-reads the subscription from Stripe and calls again with it as p_current (applied first, for an invoice). An invoice event whose lines.has_more is true returns status refetch_lines: the server reads all the invoice''s lines from Stripe and calls again with them as p_lines (applied in place of the event''s; the event is recorded as Stripe sent it). Other failures roll everything back (the API answers 500 or 503 and Stripe retries). Returns {received, duplicate, status, event_id, reason}.';

CREATE OR REPLACE FUNCTION billing.apply_meter_error_report(p_event jsonb) RETURNS text
LANGUAGE plpgsql AS $$
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
COMMENT ON FUNCTION billing.apply_meter_error_report(jsonb) IS
  'v1.billing.meter.error_report_triggered (a thin event, read whole from Stripe): record which meter, how many meter events Stripe rejected in the validation window, the error types and the sample identifiers (billing.meter_error_reports). The daily comparison of totals (reporting.meter_total_mismatches) shows what it cost.';

CREATE OR REPLACE FUNCTION api.stripe_thin_event(p_event jsonb) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
END $$;
COMMENT ON FUNCTION api.stripe_thin_event(jsonb) IS
  'POST /v1/webhooks/stripe for a thin event (object v2.core.event, an event destination''s payload): after the server verified the signature and read the whole event from Stripe (GET /v2/core/events/:id), record it in billing.stripe_events by id (a duplicate returns its recorded status) and apply it: v1.billing.meter.error_report_triggered (billing.apply_meter_error_report); other types are recorded as ignored, a malformed one as rejected. Returns {received, duplicate, status, event_id, reason}.';
GRANT EXECUTE ON FUNCTION api.stripe_thin_event(jsonb) TO pgtally_api;

------------------------------------------------------------------------------------------------
-- What the server needs around its Stripe API calls (made outside any transaction)
------------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION billing.buyer(p_api_key text, p_session_id uuid, p_account_id uuid) RETURNS uuid
LANGUAGE plpgsql AS $$
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
COMMENT ON FUNCTION billing.buyer(text, uuid, uuid) IS
  'The account a purchase is for: the principal''s (API key or session), or a team the person may buy for (p_account_id, permission billing:manage), or, with neither principal, the account of a signed upgrade link the server verified (p_account_id).';

CREATE OR REPLACE FUNCTION api.checkout_prepare(p_api_key text, p_session_id uuid, p_price text,
                                                p_account_id uuid DEFAULT NULL, p_idempotency_key text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
COMMENT ON FUNCTION api.checkout_prepare(text, uuid, text, uuid, text) IS
  'POST /v1/billing/checkout, the pricing page and one-click top-ups, step 1: the buyer''s account (billing.buyer), email and Stripe customer (if any), and the mode for a price code (subscription for plan prices, payment for bundles) with its amount and usage_type (a metered price is bought with no quantity). stripe_idempotency_key: with the client''s Idempotency-Key (p_idempotency_key), the account id and the key''s SHA-256 (hex), which the server prefixes with the call (checkout-, topup-) and sends to Stripe; NULL without one. TL422 unknown price; TL40C (409 conflict) a plan price while a subscription is live.';

CREATE OR REPLACE FUNCTION api.link_stripe_customer(p_api_key text, p_session_id uuid, p_stripe_customer_id text,
                                                    p_account_id uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_account_id uuid := billing.buyer(p_api_key, p_session_id, p_account_id);
BEGIN
  INSERT INTO billing.customers (account_id, stripe_customer_id, created_at)
  VALUES (v_account_id, p_stripe_customer_id, util.now())
  ON CONFLICT (account_id) DO NOTHING;
  RETURN jsonb_build_object('stripe_customer_id',
                            (SELECT stripe_customer_id FROM billing.customers WHERE account_id = v_account_id));
END $$;
COMMENT ON FUNCTION api.link_stripe_customer(text, uuid, text, uuid) IS
  'Checkout, step 2 when the account had no customer: remember the Stripe customer the server created; returns the one stored (the first wins).';

CREATE OR REPLACE FUNCTION api.payment_status(p_checkout_session text, p_payment_intent text) RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
COMMENT ON FUNCTION api.payment_status(text, text) IS
  '/billing/success: whether Stripe''s event for a Checkout Session (or the payment of a one-click top-up''s PaymentIntent) has been applied yet: state applied, processing until it arrives, or ignored/rejected; with mode and price. Nothing is granted here: only the webhook grants.';

CREATE OR REPLACE FUNCTION api.billing_account(p_api_key text, p_session_id uuid, p_account_id uuid DEFAULT NULL) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
COMMENT ON FUNCTION api.billing_account(text, uuid, uuid) IS
  'GET /v1/billing/subscription (permission billing:read; p_account_id: a team): the account''s plan, Stripe customer, suspension (at, reason: set by an operator), payment grace and its subscription (the live one, else the latest; ending: it will not renew, at cancel_at or its period end).';

CREATE OR REPLACE FUNCTION api.stripe_customer(p_api_key text, p_session_id uuid, p_account_id uuid DEFAULT NULL) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
COMMENT ON FUNCTION api.stripe_customer(text, uuid, uuid) IS
  'POST /v1/billing/portal (permission billing:manage; p_account_id: a team): the account''s Stripe customer id. TL404 before the first checkout.';

CREATE OR REPLACE FUNCTION api.stripe_customer_of(p_account_id uuid) RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT stripe_customer_id FROM billing.customers WHERE account_id = p_account_id
$$;
COMMENT ON FUNCTION api.stripe_customer_of(uuid) IS
  'pgtally worker: the Stripe customer id of an account (NULL when it has none), for the meter events that report its post-paid usage.';
GRANT EXECUTE ON FUNCTION api.stripe_customer_of(uuid) TO pgtally_api;

CREATE OR REPLACE FUNCTION api.live_subscription(p_api_key text, p_session_id uuid, p_price text DEFAULT NULL,
                                                 p_account_id uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
COMMENT ON FUNCTION api.live_subscription(text, uuid, text, uuid) IS
  'POST /v1/billing/subscription/change and DELETE /v1/billing/subscription (permission billing:manage; p_account_id: a team): the account''s live subscription (active, trialing or past_due) with its Stripe item, and the Stripe price of p_price when given. TL404 no live subscription; TL422 p_price is not an active plan price.';

CREATE OR REPLACE FUNCTION api.checkout_opened(p_account_id uuid, p_checkout_session text, p_mode text, p_price text)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
COMMENT ON FUNCTION api.checkout_opened(uuid, text, text, text) IS
  'Checkout, last step (the server, after Stripe created the session for the account api.checkout_prepare authenticated): record the session; for a subscription, mark the account''s other open subscription sessions expired and return their ids ({expire: [...]}) for the server to expire at Stripe (POST /v1/checkout/sessions/:id/expire), so at most one can be paid. Serialised per account.';

CREATE OR REPLACE FUNCTION api.duplicate_subscription(p_subscription text) RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
COMMENT ON FUNCTION api.duplicate_subscription(text) IS
  'pgtally worker, task cancel_duplicate_subscription: a duplicate subscription still to cancel and refund: {subscription, account_id, kept, waiting (its paid invoices are not all known yet), payments: [{invoice_payment, payment_intent, charge, refund (minor units left to refund)}]}; NULL when it is not one or is done.';

CREATE OR REPLACE FUNCTION api.duplicate_subscription_settled(p_subscription text, p_refunded_minor bigint) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  UPDATE billing.duplicate_subscriptions
  SET canceled_at = coalesce(canceled_at, util.now()), refunded_minor = refunded_minor + greatest(p_refunded_minor, 0)
  WHERE stripe_subscription_id = p_subscription;
END $$;
COMMENT ON FUNCTION api.duplicate_subscription_settled(text, bigint) IS
  'pgtally worker: the duplicate subscription was canceled at Stripe and p_refunded_minor (minor units) refunded; its customer.subscription.deleted and charge.refunded events follow.';

GRANT EXECUTE ON FUNCTION api.checkout_opened(uuid, text, text, text), api.duplicate_subscription(text),
  api.duplicate_subscription_settled(text, bigint) TO pgtally_api;

GRANT EXECUTE ON FUNCTION api.stripe_webhook(jsonb, jsonb, jsonb), api.stripe_webhook_rejected(text, text),
  api.checkout_prepare(text, uuid, text, uuid, text), api.link_stripe_customer(text, uuid, text, uuid), api.payment_status(text, text), api.billing_account(text, uuid, uuid), api.live_subscription(text, uuid, text, uuid),
  api.stripe_customer(text, uuid, uuid)
TO pgtally_api;
