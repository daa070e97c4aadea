-- The plan catalog: meters with their rate cards, plans with their entitlements.

CREATE OR REPLACE FUNCTION billing.to_micros(p_credits jsonb, p_path text) RETURNS bigint
LANGUAGE plpgsql IMMUTABLE AS $$
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
END $$;
COMMENT ON FUNCTION billing.to_micros(jsonb, text) IS
  'A catalog or command-line amount of credits (JSON number, or a string of plain decimal digits: 12, 0.5; no exponent, sign or spaces) as micro-credits; TL422 naming p_path when it is not a non-negative amount with at most 6 decimals.';

CREATE OR REPLACE FUNCTION billing.signed_to_micros(p_credits text, p_path text) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
  SELECT CASE WHEN left(p_credits, 1) = '-' THEN -billing.to_micros(to_jsonb(substr(p_credits, 2)), p_path)
              ELSE billing.to_micros(to_jsonb(p_credits), p_path) END
$$;
COMMENT ON FUNCTION billing.signed_to_micros(text, text) IS
  'A plain decimal number of credits with an optional minus sign (-5, 0.25) as micro-credits, by billing.to_micros''s rules.';

CREATE OR REPLACE FUNCTION billing.upsert_price(p_id text, p_def jsonb, p_path text, p_plan text,
                                                p_interval text, p_credits_micros bigint)
RETURNS void
LANGUAGE plpgsql AS $$
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
END $$;
COMMENT ON FUNCTION billing.upsert_price(text, jsonb, text, text, text, bigint) IS
  'Catalog loader helper: insert or update one Stripe price ({stripe_price, amount (minor units), currency, name, usage_type: licensed | metered}) of a plan or a bundle. TL422 naming p_path.';

CREATE OR REPLACE FUNCTION billing.price_json(x billing.prices) RETURNS jsonb
LANGUAGE sql STABLE AS $$
  SELECT jsonb_build_object('id', x.id, 'name', x.name, 'amount', x.amount_minor, 'currency', x.currency,
                            'interval', x.interval, 'stripe_price_id', x.stripe_price_id, 'usage_type', x.usage_type,
                            'credits', util.credits(x.credits_micros))
$$;
COMMENT ON FUNCTION billing.price_json(billing.prices) IS
  'A price as GET /v1/plans shows it: {id, name, amount (minor units), currency, interval, stripe_price_id, usage_type (licensed or metered), credits (bundles)}.';

CREATE OR REPLACE FUNCTION billing.plans_json() RETURNS jsonb
LANGUAGE sql STABLE AS $$
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
COMMENT ON FUNCTION billing.plans_json() IS
  'The public catalog: active plans (not anonymous) with entitlements (post_paid ones with unit_amount, minor units per unit), spending_limit (post-paid plans, minor units per billing period) and active prices, and credit bundles.';

CREATE OR REPLACE FUNCTION api.plans() RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT billing.plans_json()
$$;
COMMENT ON FUNCTION api.plans() IS 'GET /v1/plans (public): billing.plans_json().';
GRANT EXECUTE ON FUNCTION api.plans() TO pgtally_api;

CREATE OR REPLACE FUNCTION api.load_catalog(p_catalog jsonb) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
END $$;
COMMENT ON FUNCTION api.load_catalog(jsonb) IS
  'Load the plan catalog (the catalog file as JSON: {"meters": {id: {name, unit, pricing: unit|tokens, price | input_price_per_million, output_price_per_million, margin}}, "plans": {id: {name, description, features, entitlements: {meter: {allowance|fair_use: N, period} | {unlimited: true}}}}}). Prices are credits; allowance and fair_use limits are units for unit meters and credits for token meters (stored as micro-credits). Plans may carry included_credits, signup_bonus (credits, once per person at email verification), monthly_credits (credits each billing period, expiring at its end), spending_limit (minor units per billing period, for post-paid entitlements {post_paid: cents per unit, stripe_meter: Stripe meter event_name}) and prices {monthly|yearly: {stripe_price, amount, currency}}; bundles: {id: {name, credits, stripe_price, amount, currency}}. Upserts meters, plans and prices, replaces each listed plan''s entitlements, deactivates plans and prices not listed; [referrals] {qualify_on: email_verified | first_payment, referrer_credits (10), referee_credits (0), holdback_days (14), monthly_cap (20), same_ip_days (30)} sets the referral program. Errors: TL422 naming the bad field. Operators only (not granted to pgtally_api).';
