-- Metering: allowance periods, quotes (the charging rule), consume and check.

CREATE OR REPLACE FUNCTION metering.period_bounds(p_period text, p_at timestamptz,
                                                 p_billing_start timestamptz, p_billing_end timestamptz)
-- A one-row table function, so that PostgreSQL inlines it into the query that reads it (a
-- function returning a record would be called on its own every time).
RETURNS TABLE (period_start timestamptz, period_end timestamptz)
LANGUAGE sql STABLE ROWS 1 AS $$
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
COMMENT ON FUNCTION metering.period_bounds(text, timestamptz, timestamptz, timestamptz) IS
  'The allowance period containing p_at: day = UTC calendar day, month = UTC calendar month, billing_period = the account''s subscription period when it covers p_at, else the calendar month. Returns [period_start, period_end).';

CREATE OR REPLACE FUNCTION metering.allowance_json(e billing.entitlements, m metering.meters,
                                                   p_period_start timestamptz, p_period_end timestamptz,
                                                   p_used bigint)
RETURNS json
-- json, built once as text in this order (it goes into every charge's answer as it is; migration
-- 0023). json has no ||, so post_paid's two more keys make a second list.
LANGUAGE sql STABLE AS $$
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
COMMENT ON FUNCTION metering.allowance_json(billing.entitlements, metering.meters, timestamptz, timestamptz, bigint) IS
  'An entitlement''s state in a period as the API shows it: {meter, kind, unit, period, limit, used, remaining, period_start, resets_at}; limit and remaining are null for unlimited and post_paid; post_paid adds unit_amount and amount (what the period''s units cost, minor units).';

CREATE OR REPLACE FUNCTION metering.window_usage(p_account_id uuid, m metering.meters,
                                                 p_period_start timestamptz, p_period_end timestamptz)
RETURNS bigint
LANGUAGE sql STABLE AS $$
  SELECT coalesce(sum(CASE m.pricing WHEN 'unit' THEN e.quantity ELSE e.allowance_units + e.credits_micros END), 0)::bigint
  FROM metering.usage_events e
  WHERE e.account_id = p_account_id AND e.meter_id = m.id
    AND e.created_at >= p_period_start AND e.created_at < p_period_end
$$;
COMMENT ON FUNCTION metering.window_usage(uuid, metering.meters, timestamptz, timestamptz) IS
  'All usage an account made on a meter in [p_period_start, p_period_end), whatever plan it was charged under: units for unit meters, micro-credits of cost for token meters. Where a window''s metering.allowance_usage row starts, so that a plan change or a device merge counts the usage already made (13 generations today on Pro, then Free: no Free generations left today).';

CREATE OR REPLACE FUNCTION metering.allowances_json(a identity.accounts) RETURNS jsonb
LANGUAGE sql STABLE AS $$
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
COMMENT ON FUNCTION metering.allowances_json(identity.accounts) IS
  'Each entitlement of the account''s plan with the current window''s usage (metering.allowance_json), as GET /v1/balance and POST /v1/identify show them.';

CREATE OR REPLACE FUNCTION billing.money(p_minor bigint, p_currency text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
  SELECT CASE WHEN lower(p_currency) IN ('bif', 'clp', 'djf', 'gnf', 'jpy', 'kmf', 'krw', 'mga', 'pyg', 'rwf',
                                         'ugx', 'vnd', 'vuv', 'xaf', 'xof', 'xpf')
              THEN p_minor::text ELSE to_char(p_minor / 100.0, 'FM999999999999990.00') END || ' ' || upper(p_currency)
$$;
COMMENT ON FUNCTION billing.money(bigint, text) IS
  'An amount in minor units for people: 4000, usd -> 40.00 USD (Stripe''s zero-decimal currencies have no minor unit: https://docs.stripe.com/currencies#zero-decimal).';

CREATE OR REPLACE FUNCTION metering.post_paid_spent(p_account_id uuid, p_plan text, p_period_start timestamptz)
RETURNS bigint
LANGUAGE sql STABLE AS $$
  SELECT coalesce(sum(u.used * e.unit_amount_minor), 0)::bigint
  FROM billing.entitlements e
  JOIN metering.allowance_usage u ON u.account_id = p_account_id AND u.meter_id = e.meter_id AND u.period_start = p_period_start
  WHERE e.plan_id = p_plan AND e.kind = 'post_paid'
$$;
COMMENT ON FUNCTION metering.post_paid_spent(uuid, text, timestamptz) IS
  'What an account''s post-paid meters of plan p_plan cost in the billing period starting at p_period_start (charged and held units times each meter''s unit_amount_minor), in minor units: what the plan''s spending limit is checked against.';

CREATE OR REPLACE FUNCTION metering.spending_json(a identity.accounts) RETURNS jsonb
LANGUAGE sql STABLE AS $$
  SELECT jsonb_build_object('limit', p.spending_limit_minor, 'spent', metering.post_paid_spent(a.id, p.id, b.period_start),
                            'currency', coalesce((SELECT x.currency FROM billing.prices x WHERE x.plan_id = p.id
                                                  ORDER BY x.active DESC, x.id LIMIT 1), 'usd'),
                            'period_start', util.iso(b.period_start), 'resets_at', util.iso(b.period_end))
  FROM billing.plans p
  CROSS JOIN LATERAL metering.period_bounds('billing_period', util.now(), a.billing_period_start, a.billing_period_end) b
  WHERE p.id = identity.effective_plan(a)
    AND EXISTS (SELECT 1 FROM billing.entitlements e WHERE e.plan_id = p.id AND e.kind = 'post_paid')
$$;
COMMENT ON FUNCTION metering.spending_json(identity.accounts) IS
  'A post-paid plan''s spending this billing period as GET /v1/balance shows it: {limit, spent (minor units), currency, period_start, resets_at}; NULL when the account''s plan has no post-paid meter.';

CREATE OR REPLACE FUNCTION billing.report_meter_event(p_usage_event_id uuid, p_account_id uuid, p_event_name text,
                                                      p_value bigint, p_at timestamptz) RETURNS void
LANGUAGE sql AS $$
  INSERT INTO outbox.messages (id, kind, recipient, payload, created_at, next_attempt_at)
  VALUES (p_usage_event_id, 'meter_event', p_account_id::text,
          jsonb_build_object('account_id', p_account_id, 'event_name', p_event_name, 'value', p_value,
                             'timestamp', extract(epoch FROM p_at)::bigint),
          p_at, p_at)
$$;
COMMENT ON FUNCTION billing.report_meter_event(uuid, uuid, text, bigint, timestamptz) IS
  'Queue the report of a post-paid usage event to Stripe''s Billing Meter (outbox meter_event whose id is the usage event''s id, in the charge''s transaction): the worker sends it with identifier = the usage event id, so Stripe counts it once (https://docs.stripe.com/api/billing/meter-event/create).';

CREATE OR REPLACE FUNCTION metering.quote(
  p_account identity.accounts, p_meter text, p_quantity bigint, p_input_tokens bigint, p_output_tokens bigint,
  p_window_start timestamptz DEFAULT NULL, p_window_used bigint DEFAULT NULL, p_window_end timestamptz DEFAULT NULL,
  p_meter_def metering.meters DEFAULT NULL, p_entitlement_def billing.entitlements DEFAULT NULL,
  OUT meter_id text, OUT quantity bigint, OUT input_tokens bigint, OUT output_tokens bigint,
  OUT entitled boolean, OUT period_start timestamptz, OUT period_end timestamptz,
  OUT used_before bigint, OUT allowance_units bigint, OUT credits_micros bigint, OUT balance_after_micros bigint,
  OUT allowed boolean, OUT allowance json, OUT warnings jsonb,
  OUT amount_minor bigint, OUT currency text, OUT spent_before_minor bigint, OUT spending_limit_minor bigint,
  OUT stripe_meter_event text, OUT refusal jsonb, OUT plan_id text)
LANGUAGE plpgsql AS $$
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
COMMENT ON FUNCTION metering.quote(identity.accounts, text, bigint, bigint, bigint, timestamptz, bigint, timestamptz,
                                   metering.meters, billing.entitlements) IS
  'The charging rule, with no side effect: for an account (as read or locked by the caller) and a request, the window''s usage before it (used_before), the allowance units and micro-credits it costs, whether the balance covers it, the allowance after it and the threshold warnings it crosses. Unit meters need quantity (default 1); token meters need input_tokens/output_tokens and spend their allowance in micro-credits. A post_paid entitlement charges no credits: amount_minor is what the units cost (currency), allowed while the billing period''s post-paid spending (spent_before_minor, open holds included) stays within the plan''s spending_limit_minor; stripe_meter_event names the Stripe meter. When not allowed, refusal is the TL402 answer {message, detail}. plan_id: the plan whose entitlement applies (NULL: none). p_window_start and p_window_used: a window of this account and meter that the caller charged earlier in its transaction and has not written yet (api.consume_batch), used in place of metering.allowance_usage when it is the window the request falls in; with p_window_end, p_meter_def and p_entitlement_def (the window''s end, the meter and the plan''s entitlement of it, as the caller read them for an earlier charge of this account and meter in its transaction), the meter, the entitlement and the window''s bounds are not read again. TL422 unknown meter or bad quantity.';

CREATE OR REPLACE FUNCTION metering.request_hash(p_meter text, p_quantity bigint,
                                                 p_input_tokens bigint, p_output_tokens bigint,
                                                 p_metadata jsonb DEFAULT NULL)
RETURNS bytea
LANGUAGE sql STABLE AS $$        -- STABLE as jsonb_build_object and convert_to are, so that it is inlined
  SELECT sha256(convert_to((jsonb_build_object(
    'meter', p_meter,
    'quantity', coalesce(p_quantity, CASE WHEN p_input_tokens IS NULL AND p_output_tokens IS NULL THEN 1 END),
    'input_tokens', p_input_tokens, 'output_tokens', p_output_tokens)
    || CASE WHEN p_metadata IS NULL THEN '{}' ELSE jsonb_build_object('metadata', p_metadata) END)::text, 'UTF8'))
$$;
COMMENT ON FUNCTION metering.request_hash(text, bigint, bigint, bigint, jsonb) IS
  'Fingerprint of a usage request (quantity defaults to 1; metadata counts when given), compared on retries of an idempotency key.';

CREATE OR REPLACE FUNCTION metering.email_warnings(p_account_id uuid, p_warnings jsonb) RETURNS void
LANGUAGE sql AS $$
  INSERT INTO outbox.messages (kind, recipient, payload, created_at, next_attempt_at)
  SELECT 'usage_warning', u.email, w, util.now(), util.now()
  FROM identity.users u CROSS JOIN jsonb_array_elements(p_warnings) w
  WHERE u.account_id = p_account_id AND u.email_verified_at IS NOT NULL
$$;
COMMENT ON FUNCTION metering.email_warnings(uuid, jsonb) IS
  'Queue one email per usage warning to the account''s user, when it has a verified address (the extension seed warns at 8 of 10 uses). Written by the charge''s own transaction.';

CREATE OR REPLACE FUNCTION metering.usage_event_answer(e metering.usage_events, p_allowance json) RETURNS json
-- json, not jsonb: the answer is built once as text, in this order, and goes out as it is (into a
-- batch's answer too, where a jsonb would be taken apart and encoded again). Migration 0023.
LANGUAGE sql STABLE AS $$
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
COMMENT ON FUNCTION metering.usage_event_answer(metering.usage_events, json) IS
  'The answer to a charge, first time and every replay alike: {id, object, account_id, meter, quantity, input_tokens, output_tokens, charged {allowance_units, credits; post-paid: amount (minor units), currency}, allowance (p_allowance: metering.allowance_json after the charge), balance {credits after it}, warnings, metadata, created_at}. Events charged before migration 0017 answer with their stored response.';

CREATE OR REPLACE FUNCTION metering.event_allowance(e metering.usage_events) RETURNS json
LANGUAGE sql STABLE AS $$
  SELECT metering.allowance_json(en, m, e.period_start, e.period_end, e.used_after)
  FROM billing.entitlements en JOIN metering.meters m ON m.id = en.meter_id
  WHERE en.plan_id = e.plan_id AND en.meter_id = e.meter_id
$$;
COMMENT ON FUNCTION metering.event_allowance(metering.usage_events) IS
  'A charged event''s allowance right after it, for a replay: the window and usage stored on the event, with the kind, limit and unit of its plan''s entitlement as the catalog has them now (NULL when there was none, or the catalog no longer has it).';

CREATE OR REPLACE FUNCTION metering.replayed_answer(k metering.idempotency_keys) RETURNS json
LANGUAGE plpgsql STABLE AS $$
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
COMMENT ON FUNCTION metering.replayed_answer(metering.idempotency_keys) IS
  'The answer a retry of a remembered idempotency key gets: its event''s, rebuilt (metering.usage_event_answer with metering.event_allowance). The key''s created_at finds the event''s monthly partition. TL500 (a server error) when the event is missing, as it is only if its partition was dropped by hand: a retry never gets an empty answer.';

CREATE OR REPLACE FUNCTION metering.charge(a identity.accounts, p_idempotency_key text, p_hash bytea, p_metadata jsonb,
                                           q record, p_defer_rows boolean DEFAULT false, p_event_id uuid DEFAULT NULL,
                                           p_api_key_id uuid DEFAULT NULL, p_user_id uuid DEFAULT NULL,
                                           OUT answer json, OUT event metering.usage_events)
LANGUAGE plpgsql AS $$
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
COMMENT ON FUNCTION metering.charge(identity.accounts, text, bytea, jsonb, record, boolean, uuid, uuid, uuid) IS
  'Write one allowed charge: q is metering.quote''s answer for the account a (locked by the caller, nothing charged to it since the quote), p_hash the request''s fingerprint. Makes the usage event (returned as event) and writes it and its idempotency key, the allowance window''s usage, the ledger transfer (credits), the post-paid meter report and warning emails (outbox), an auto top-up when the balance falls below its threshold; answer is the answer (metering.usage_event_answer). With p_defer_rows the event and key rows and the allowance window''s usage (but for post-paid windows) are left to the caller, who must write them before its transaction ends and pass the window''s usage to its next metering.quote of it (api.consume_batch writes a batch''s events and keys with one INSERT each, a third of the cost a row, and each window once). p_event_id: the event''s id (default util.uuid_v7(); a batch passes ids from util.uuid_v7s). p_api_key_id, p_user_id: who charged (identity.authenticate_principal), recorded on the event. api.consume and api.consume_batch charge through it.';

CREATE OR REPLACE FUNCTION api.consume(p_api_key text, p_session_id uuid, p_idempotency_key text, p_meter text,
                                       p_quantity bigint DEFAULT NULL,
                                       p_input_tokens bigint DEFAULT NULL, p_output_tokens bigint DEFAULT NULL,
                                       p_account_id uuid DEFAULT NULL, p_metadata jsonb DEFAULT NULL)
RETURNS TABLE (replayed boolean, body json)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
COMMENT ON FUNCTION api.consume(text, uuid, text, text, bigint, bigint, bigint, uuid, jsonb) IS
  'POST /v1/usage/events: authenticate the principal (API key with scope usage:write, or session id; a service key may name p_account_id), then charge one usage event exactly once: the allowance first, then credits at the meter''s rate, writing the usage event and its idempotency key (metering.idempotency_keys), allowance usage, ledger transfer, any warning emails (outbox) and, for post-paid usage, its report to Stripe''s meter (outbox meter_event) in this one transaction. p_metadata: the caller''s JSON object (at most 2 KB), stored, returned and part of the fingerprint. Returns (replayed, body): body is the usage event JSON {id, meter, quantity, charged {allowance_units, credits; post-paid: amount (minor units), currency}, allowance, balance {credits}, warnings, metadata, created_at}; a retry with the same key and request within the idempotency window (metering.idempotency_window(), 30 days) returns the same body, rebuilt from the event (metering.usage_event_answer), with replayed = true. Errors: TL401 bad key or session, TL403 scope, TL404 unknown p_account_id, TL402 neither allowance nor credits cover it (DETAIL: account_id, required_credits, balance, allowance, resets_at; nothing is charged) or, post-paid, the spending limit does not (DETAIL: required_amount, spent, spending_limit, currency, resets_at), TL4B2 a budget of the account, key or member does not cover the credits (metering.budgets_apply; DETAIL names the budget and resets_at; nothing is charged), TL42R key reused for a different request (util.idempotency_check; nothing charged), TL422 bad input.';

CREATE OR REPLACE FUNCTION api.check_usage(p_api_key text, p_session_id uuid, p_meter text,
                                           p_quantity bigint DEFAULT NULL, p_input_tokens bigint DEFAULT NULL,
                                           p_output_tokens bigint DEFAULT NULL, p_account_id uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
COMMENT ON FUNCTION api.check_usage(text, uuid, text, bigint, bigint, bigint, uuid) IS
  'POST /v1/usage/check: what api.consume would do for this request now, with no side effect: {allowed, meter, quantity, charge {allowance_units, credits}, required_credits, amount and currency (post-paid: what it would cost, minor units), allowance and balance after it, warnings, resets_at}. Principal as api.consume (scope usage:read). TL422 bad input.';

GRANT EXECUTE ON FUNCTION api.consume(text, uuid, text, text, bigint, bigint, bigint, uuid, jsonb) TO pgtally_api;
CREATE OR REPLACE FUNCTION metering.event_json(e metering.usage_events) RETURNS jsonb
LANGUAGE sql STABLE AS $$
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
COMMENT ON FUNCTION metering.event_json(metering.usage_events) IS
  'A usage event as GET /v1/usage/events lists it: {id, meter, quantity, input_tokens, output_tokens, charged {allowance_units, credits, amount (post-paid: minor currency units; else null)}, idempotency_key, metadata, api_key_id and user_id (who charged it: the key, and the session''s person or the member who made the key), reversed ({quantity, credits, reversals: ids} when reversed in part or whole, else null), created_at}.';

CREATE OR REPLACE FUNCTION api.usage_events(p_api_key text, p_session_id uuid, p_cursor text DEFAULT NULL,
                                            p_limit integer DEFAULT 20, p_meter text DEFAULT NULL,
                                            p_from timestamptz DEFAULT NULL, p_to timestamptz DEFAULT NULL,
                                            p_account_id uuid DEFAULT NULL, p_api_key_id uuid DEFAULT NULL,
                                            p_user_id uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
END $$;
COMMENT ON FUNCTION api.usage_events(text, uuid, text, integer, text, timestamptz, timestamptz, uuid, uuid, uuid) IS
  'GET /v1/usage/events: the caller''s usage events, newest first (metering.event_json), p_limit (1-100) per page, optionally of one meter, within [p_from, p_to), of one API key (p_api_key_id) and of one member (p_user_id); pass next_cursor back as p_cursor. Returns {data, has_more, next_cursor}. Principal as api.balance. TL422 bad limit or cursor.';
GRANT EXECUTE ON FUNCTION api.usage_events(text, uuid, text, integer, text, timestamptz, timestamptz, uuid, uuid, uuid) TO pgtally_api;

GRANT EXECUTE ON FUNCTION api.check_usage(text, uuid, text, bigint, bigint, bigint, uuid) TO pgtally_api;
GRANT EXECUTE ON FUNCTION api.balance(text, uuid, uuid) TO pgtally_api;
GRANT EXECUTE ON FUNCTION api.ledger(text, uuid, text, integer, uuid) TO pgtally_api;
