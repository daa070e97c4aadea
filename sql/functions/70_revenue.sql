-- Money in, recorded: invoices, disputes, MRR history; customer billing emails; usage rollups
-- for analytics; operator alerts; staff.

CREATE OR REPLACE FUNCTION billing.email_account(p_account_id uuid, p_kind text, p_payload jsonb) RETURNS void
LANGUAGE sql AS $$
  INSERT INTO outbox.messages (kind, recipient, payload, created_at, next_attempt_at)
  SELECT p_kind, u.email, p_payload, util.now(), util.now()
  FROM identity.users u WHERE u.account_id = p_account_id AND u.email_verified_at IS NOT NULL
$$;
COMMENT ON FUNCTION billing.email_account(uuid, text, jsonb) IS
  'Queue a billing email (payment_failed, receipt, subscription_ending, subscription_canceled) to the account''s person, when their address is verified, in the caller''s transaction.';

CREATE OR REPLACE FUNCTION billing.email_receipt(p_payment text) RETURNS void
LANGUAGE sql AS $$
  SELECT billing.email_account(p.account_id, 'receipt', jsonb_build_object(
           'payment', p.stripe_payment_intent_id, 'bundle', coalesce(x.name, p.price_id),
           'amount', billing.money(p.amount_minor, p.currency), 'credits', util.credits(p.credits_micros),
           'paid_at', to_char(p.paid_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI "UTC"')))
  FROM billing.payments p LEFT JOIN billing.prices x ON x.id = p.price_id
  WHERE p.stripe_payment_intent_id = p_payment
$$;
COMMENT ON FUNCTION billing.email_receipt(text) IS 'Queue the receipt of a recorded bundle payment (once: called where the payment is first recorded).';

CREATE OR REPLACE FUNCTION billing.record_invoice(o jsonb, s billing.subscriptions, p_status text, p_paid_at timestamptz)
RETURNS void
LANGUAGE sql AS $$
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
COMMENT ON FUNCTION billing.record_invoice(jsonb, billing.subscriptions, text, timestamptz) IS
  'Record a subscription invoice from its Stripe object once (billing.invoices): amount paid, tax (total_taxes), plan, period (its lines''), the metered lines and their period, links. An open invoice (payment failed) becomes paid when invoice.paid arrives; a paid (or since refunded) one never changes here.';

CREATE OR REPLACE FUNCTION billing.record_invoice_payment(ip jsonb, p_account_id uuid) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO billing.invoice_payments (stripe_invoice_payment_id, stripe_invoice_id, account_id, stripe_payment_intent_id,
                                        stripe_charge_id, amount_minor, currency, paid_at)
  SELECT ip ->> 'id', ip ->> 'invoice', p_account_id, ip #>> '{payment,payment_intent}', ip #>> '{payment,charge}',
         coalesce((ip ->> 'amount_paid')::bigint, 0), lower(coalesce(ip ->> 'currency', 'usd')),
         billing.ts(ip #> '{status_transitions,paid_at}')
  WHERE ip ->> 'status' = 'paid' AND ip ->> 'id' IS NOT NULL AND ip ->> 'invoice' IS NOT NULL
  ON CONFLICT (stripe_invoice_payment_id) DO NOTHING;
END $$;
COMMENT ON FUNCTION billing.record_invoice_payment(jsonb, uuid) IS
  'Record a paid Stripe InvoicePayment (once): which PaymentIntent or Charge paid which invoice of the account, amount paid in minor units. Source: Stripe API 2025-03-31, where Charge.invoice and Invoice.payment_intent were removed in favour of InvoicePayment.';

CREATE OR REPLACE FUNCTION billing.apply_invoice_payment_paid(p_event jsonb) RETURNS text
LANGUAGE plpgsql AS $$
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
COMMENT ON FUNCTION billing.apply_invoice_payment_paid(jsonb) IS
  'invoice_payment.paid: record which PaymentIntent or Charge paid a recorded subscription invoice (billing.invoice_payments), for Stripe accounts whose invoice.paid events do not include the invoice''s payments list.';

CREATE OR REPLACE FUNCTION billing.apply_dispute(p_event jsonb) RETURNS text
LANGUAGE plpgsql AS $$
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
COMMENT ON FUNCTION billing.apply_dispute(jsonb) IS
  'charge.dispute.created, .updated, .closed: record the dispute once (billing.disputes) with Stripe''s latest status, amount (minor units) and reason; closed sets closed_at. A Dispute names no customer: the account is found through the payment pgtally recorded (a bundle''s PaymentIntent, a subscription invoice''s PaymentIntent or charge in billing.invoice_payments), else a customer an older API version named.';

CREATE OR REPLACE FUNCTION billing.account_mrr(p_account_id uuid, OUT currency text, OUT mrr_minor numeric, OUT plan_id text)
LANGUAGE sql STABLE AS $$
  SELECT coalesce(max(p.currency),
                  (SELECT x.currency FROM billing.subscriptions s2 JOIN billing.prices x ON x.id = s2.price_id
                   WHERE s2.account_id = p_account_id ORDER BY s2.updated_at DESC LIMIT 1), 'usd'),
         coalesce(sum(CASE p.interval WHEN 'year' THEN p.amount_minor / 12.0 ELSE p.amount_minor END), 0),
         max(s.plan_id)
  FROM billing.subscriptions s JOIN billing.prices p ON p.id = s.price_id
  WHERE s.account_id = p_account_id AND s.status IN ('active', 'past_due') AND p.usage_type = 'licensed'
$$;
COMMENT ON FUNCTION billing.account_mrr(uuid) IS
  'An account''s monthly recurring revenue now: its active and past_due licensed subscription prices (minor units; yearly ones / 12), the currency and plan.';

CREATE OR REPLACE FUNCTION billing.record_mrr(p_account_id uuid, p_at timestamptz) RETURNS void
LANGUAGE plpgsql AS $$
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
COMMENT ON FUNCTION billing.record_mrr(uuid, timestamptz) IS
  'After a subscription event: append the account''s MRR to billing.mrr_changes when it changed (amount, currency or plan), at the event''s time (never before the last change).';

CREATE OR REPLACE FUNCTION api.invoices(p_api_key text, p_session_id uuid, p_limit integer DEFAULT 24,
                                        p_account_id uuid DEFAULT NULL) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_account_id uuid := identity.authenticate(p_api_key, p_session_id, 'billing:read', p_account_id);
BEGIN
  IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 100 THEN
    PERFORM util.fail('TL422', 'limit must be between 1 and 100', '{"field": "limit"}');
  END IF;
  RETURN jsonb_build_object('data', coalesce((
    SELECT jsonb_agg(jsonb_build_object(
             'id', i.stripe_invoice_id, 'object', 'invoice', 'number', i.number, 'status', i.status,
             'amount_paid', i.amount_paid_minor, 'tax', i.tax_minor, 'refunded', i.refunded_minor, 'currency', i.currency,
             'plan', i.plan_id, 'period_start', util.iso(i.period_start), 'period_end', util.iso(i.period_end),
             'created_at', util.iso(i.created_at), 'paid_at', util.iso(i.paid_at),
             'hosted_invoice_url', i.hosted_invoice_url, 'invoice_pdf', i.invoice_pdf) ORDER BY i.created_at DESC)
    FROM (SELECT * FROM billing.invoices WHERE account_id = v_account_id ORDER BY created_at DESC LIMIT p_limit) i), '[]'));
END $$;
COMMENT ON FUNCTION api.invoices(text, uuid, integer, uuid) IS
  'GET /v1/billing/invoices (permission billing:read; p_account_id: a team): the account''s subscription invoices, newest first (at most p_limit, 1-100): {id, number, status (paid, open), amount_paid, tax, refunded (minor units), currency, plan, period_start, period_end, created_at, paid_at, hosted_invoice_url, invoice_pdf}.';

------------------------------------------------------------------------------------------------
-- Usage rollups
------------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION api.rollup_usage(p_limit integer DEFAULT 50000) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
COMMENT ON FUNCTION api.rollup_usage(integer) IS
  'pgtally worker: fold up to p_limit usage events (after the last one folded, in id order, up to the first one less than a minute old) into metering.usage_rollup_daily, usage_rollup_monthly and usage_rollup_hourly, and compute metering.active_accounts_daily for each day that completed (every event of it folded in) and the day still filling (today, when caught up); returns how many events it folded. One worker at a time (the others return 0). The analytics views read these tables, so they stay fast with millions of events.';

------------------------------------------------------------------------------------------------
-- Alerts to operators
------------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION ops.reconciliation_views() RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
  SELECT ARRAY['balance_mismatches', 'unbalanced_transfers', 'entry_balance_breaks', 'usage_charge_mismatches',
               'hold_mismatches', 'unreported_post_paid_events', 'lot_balance_mismatches',
               'referral_reward_mismatches', 'revenue_drift', 'ledger_reference_breaks', 'unmatched_refunds',
               'reversal_mismatches']
$$;
COMMENT ON FUNCTION ops.reconciliation_views() IS
  'The reconciliation views of reporting, each of which must always be empty: what pgtally reconcile runs and what the reconciliation alert watches.';

CREATE OR REPLACE FUNCTION ops.reconciliation_problems() RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
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
COMMENT ON FUNCTION ops.reconciliation_problems() IS
  'How many rows each non-empty reconciliation view has ({view: rows}); NULL when all are empty.';

CREATE OR REPLACE FUNCTION api.check_alerts(p_email text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
END $$;
COMMENT ON FUNCTION api.check_alerts(text) IS
  'pgtally worker (housekeeping), with PGTALLY_ALERT_EMAIL: for each condition that holds, queue one alert email (outbox kind alert) unless one went out in the last hour (ops.alerts): webhook_rejected (signed Stripe events rejected since the last alert), reconciliation (any row in a reconciliation view, or revenue drift), outbox_failed (messages that exhausted their retries since the last alert). Returns {sent: [conditions]}.';

------------------------------------------------------------------------------------------------
-- Staff
------------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION api.staff_grant(p_email text, p_role text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
COMMENT ON FUNCTION api.staff_grant(text, text) IS
  'pgtally staff grant EMAIL ROLE (revoke: NULL): make a user staff (support or admin). TL404 unknown user, TL422 bad role. Operators only (not granted to pgtally_api).';

CREATE OR REPLACE FUNCTION api.staff_role(p_session_id uuid) RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT u.staff_role FROM identity.sessions s JOIN identity.users u ON u.id = s.user_id
  WHERE s.id = p_session_id AND s.revoked_at IS NULL AND s.expires_at > util.now()
$$;
COMMENT ON FUNCTION api.staff_role(uuid) IS 'The staff role of a signed-in session''s user (support, admin), NULL for customers: what /admin pages check.';

CREATE OR REPLACE FUNCTION api.metrics_report(p_session_id uuid, p_name text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
COMMENT ON FUNCTION api.metrics_report(uuid, text) IS
  '/admin/metrics: a report for staff (mrr, active_accounts, conversion, usage: the last 90 days) as JSON rows. TL403 for customers.';

GRANT EXECUTE ON FUNCTION api.invoices(text, uuid, integer, uuid), api.rollup_usage(integer), api.check_alerts(text),
  api.staff_role(uuid), api.metrics_report(uuid, text) TO pgtally_api;

------------------------------------------------------------------------------------------------
-- Operations
------------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION api.ops_gauges() RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT jsonb_build_object(
    'outbox', coalesce((SELECT jsonb_object_agg(kind, jsonb_build_object('pending', pending, 'failed', failed))
                        FROM reporting.outbox_backlog), '{}'),
    'rollup_lag_seconds', coalesce((
      SELECT extract(epoch FROM util.now() - e.created_at) FROM metering.usage_events e
      WHERE e.id > (SELECT last_id FROM metering.rollup_state) ORDER BY e.id LIMIT 1), 0))
$$;
COMMENT ON FUNCTION api.ops_gauges() IS
  '/metrics: outbox messages pending and failed per kind, and the age in seconds of the oldest usage event not yet in the analytics rollup (0 when it is caught up).';

CREATE OR REPLACE FUNCTION api.schema_version() RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  RETURN (SELECT max(migration_id) FROM public._yoyo_migration);
END $$;
COMMENT ON FUNCTION api.schema_version() IS '/readyz: the newest migration applied to this database (yoyo''s _yoyo_migration).';

CREATE OR REPLACE FUNCTION api.readiness() RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT jsonb_build_object('schema', api.schema_version(),
                            'read_only', current_setting('transaction_read_only')::boolean OR pg_is_in_recovery())
$$;
COMMENT ON FUNCTION api.readiness() IS
  '/readyz: {schema: the newest migration applied (api.schema_version), read_only: whether this session cannot write (default_transaction_read_only set for the server, database or role, or a standby in recovery; writes would fail with SQLSTATE 25006)}.';

GRANT EXECUTE ON FUNCTION api.ops_gauges(), api.schema_version(), api.readiness() TO pgtally_api;
