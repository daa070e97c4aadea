CREATE SCHEMA api;

COMMENT ON SCHEMA api IS 'pgtally entry points: SECURITY DEFINER functions, the only thing the server role may touch.';

CREATE SCHEMA billing;

COMMENT ON SCHEMA billing IS 'pgtally plan catalog: plans and their per-meter entitlements.';

CREATE SCHEMA identity;

COMMENT ON SCHEMA identity IS 'pgtally accounts and the principals that act on them (API keys).';

CREATE SCHEMA ledger;

COMMENT ON SCHEMA ledger IS 'pgtally double-entry credit ledger: transfers and their entries.';

CREATE SCHEMA metering;

COMMENT ON SCHEMA metering IS 'pgtally meters (with their rate cards), allowance usage and usage events.';

CREATE SCHEMA reporting;

COMMENT ON SCHEMA reporting IS 'pgtally read-only views for DBAs and the analyst role (reconciliation, usage).';

CREATE SCHEMA util;

COMMENT ON SCHEMA util IS 'pgtally helpers shared by every domain (clock, ids, units, errors).';

CREATE FUNCTION api.balance(p_api_key text) RETURNS jsonb
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_account identity.accounts;
BEGIN
  SELECT * INTO v_account FROM identity.accounts WHERE id = identity.authenticate(p_api_key);
  RETURN jsonb_build_object(
    'account_id', v_account.id,
    'plan', v_account.plan_id,
    'credits', util.credits(v_account.credit_balance_micros),
    'allowances', coalesce((
      SELECT jsonb_agg(metering.allowance_json(e, m, p.period_start, p.period_end, coalesce(u.used, 0)) ORDER BY e.meter_id)
      FROM billing.entitlements e
      JOIN metering.meters m ON m.id = e.meter_id
      CROSS JOIN LATERAL metering.period_bounds(e.period, util.now(), v_account.billing_period_start,
                                                v_account.billing_period_end) p
      LEFT JOIN metering.allowance_usage u
        ON u.account_id = v_account.id AND u.meter_id = e.meter_id AND u.period_start = p.period_start
      WHERE e.plan_id = v_account.plan_id), '[]'));
END $$;

COMMENT ON FUNCTION api.balance(p_api_key text) IS 'GET /v1/balance: the caller''s credit balance and, per entitled meter, the current period''s allowance ({kind, unit, period, limit, used, remaining, resets_at}). TL401 bad API key.';

CREATE FUNCTION api.check_usage(p_api_key text, p_meter text, p_quantity bigint DEFAULT NULL::bigint, p_input_tokens bigint DEFAULT NULL::bigint, p_output_tokens bigint DEFAULT NULL::bigint) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_account identity.accounts;
  q record;
BEGIN
  SELECT * INTO v_account FROM identity.accounts WHERE id = identity.authenticate(p_api_key);
  SELECT * INTO q FROM metering.quote(v_account, p_meter, p_quantity, p_input_tokens, p_output_tokens);
  RETURN jsonb_build_object(
    'allowed', q.allowed, 'meter', q.meter_id, 'quantity', q.quantity,
    'input_tokens', q.input_tokens, 'output_tokens', q.output_tokens,
    'charge', jsonb_build_object('allowance_units', CASE WHEN q.allowed THEN q.allowance_units ELSE 0 END,
                                 'credits', util.credits(CASE WHEN q.allowed THEN q.credits_micros ELSE 0 END)),
    'required_credits', util.credits(q.credits_micros),
    'allowance', q.allowance,
    'balance', jsonb_build_object('credits', util.credits(q.balance_after_micros)),
    'warnings', CASE WHEN q.allowed THEN q.warnings ELSE '[]' END,
    'resets_at', util.iso(q.period_end));
END $$;

COMMENT ON FUNCTION api.check_usage(p_api_key text, p_meter text, p_quantity bigint, p_input_tokens bigint, p_output_tokens bigint) IS 'POST /v1/usage/check: what api.consume would do for this request now, with no side effect: {allowed, meter, quantity, charge {allowance_units, credits}, required_credits, allowance and balance after it, warnings, resets_at}. TL401 bad key, TL422 bad input.';

CREATE FUNCTION api.consume(p_api_key text, p_idempotency_key text, p_meter text, p_quantity bigint DEFAULT NULL::bigint, p_input_tokens bigint DEFAULT NULL::bigint, p_output_tokens bigint DEFAULT NULL::bigint) RETURNS TABLE(replayed boolean, body jsonb)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_account identity.accounts;
  v_hash bytea := metering.request_hash(p_meter, p_quantity, p_input_tokens, p_output_tokens);
  v_prior metering.usage_events;
  q record;
  v_event_id uuid := util.uuid_v7();
  v_now timestamptz := util.now();
BEGIN
  IF p_idempotency_key IS NULL OR length(p_idempotency_key) NOT BETWEEN 1 AND 255 THEN
    PERFORM util.fail('TL422', 'an idempotency key of 1 to 255 characters is required');
  END IF;
  -- Every charge to an account serialises on its row: the allowance, the balance and the
  -- idempotency check below all read state no concurrent charge can change until we commit.
  SELECT * INTO v_account FROM identity.accounts
  WHERE id = identity.authenticate(p_api_key) FOR NO KEY UPDATE;

  SELECT * INTO v_prior FROM metering.usage_events
  WHERE account_id = v_account.id AND idempotency_key = p_idempotency_key;
  IF FOUND THEN
    IF v_prior.request_hash <> v_hash THEN
      PERFORM util.fail('TL409', 'this idempotency key was already used for a different request',
                        jsonb_build_object('usage_event_id', v_prior.id));
    END IF;
    replayed := true;
    body := v_prior.response;
    RETURN NEXT;
    RETURN;
  END IF;

  SELECT * INTO q FROM metering.quote(v_account, p_meter, p_quantity, p_input_tokens, p_output_tokens);
  IF NOT q.allowed THEN
    PERFORM util.fail('TL402', format('the %s allowance and the credit balance do not cover this request', q.meter_id),
      jsonb_build_object('meter', q.meter_id, 'required_credits', util.credits(q.credits_micros),
                         'balance', util.credits(v_account.credit_balance_micros),
                         'allowance', q.allowance, 'resets_at', util.iso(q.period_end)));
  END IF;

  body := jsonb_build_object(
    'id', v_event_id, 'object', 'usage_event', 'account_id', v_account.id,
    'meter', q.meter_id, 'quantity', q.quantity,
    'input_tokens', q.input_tokens, 'output_tokens', q.output_tokens,
    'charged', jsonb_build_object('allowance_units', q.allowance_units, 'credits', util.credits(q.credits_micros)),
    'allowance', q.allowance,
    'balance', jsonb_build_object('credits', util.credits(q.balance_after_micros)),
    'warnings', q.warnings,
    'created_at', util.iso(v_now));
  INSERT INTO metering.usage_events (id, account_id, idempotency_key, request_hash, meter_id, quantity,
                                     input_tokens, output_tokens, allowance_units, credits_micros, response, created_at)
  VALUES (v_event_id, v_account.id, p_idempotency_key, v_hash, q.meter_id, q.quantity,
          q.input_tokens, q.output_tokens, q.allowance_units, q.credits_micros, body, v_now);
  IF q.entitled THEN
    INSERT INTO metering.allowance_usage AS u (account_id, meter_id, period_start, period_end, used)
    VALUES (v_account.id, q.meter_id, q.period_start, q.period_end, q.allowance_units)
    ON CONFLICT (account_id, meter_id, period_start) DO UPDATE SET used = u.used + EXCLUDED.used;
  END IF;
  IF q.credits_micros > 0 THEN
    PERFORM ledger.post_transfer(v_account.id, 'usage', -q.credits_micros, 'usage', NULL, v_event_id,
                                 format('%s x %s', q.quantity, q.meter_id));
  END IF;
  replayed := false;
  RETURN NEXT;
END $$;

COMMENT ON FUNCTION api.consume(p_api_key text, p_idempotency_key text, p_meter text, p_quantity bigint, p_input_tokens bigint, p_output_tokens bigint) IS 'POST /v1/usage/events: authenticate the API key, then charge one usage event exactly once: the allowance first, then credits at the meter''s rate, writing the usage event, allowance usage and ledger transfer in this one transaction. Returns (replayed, body): body is the usage event JSON {id, meter, quantity, charged {allowance_units, credits}, allowance, balance {credits}, warnings, created_at}; a retry with the same key and request returns the stored body with replayed = true. Errors: TL401 bad key, TL402 neither allowance nor credits cover it (DETAIL: required_credits, balance, allowance, resets_at; nothing is charged), TL409 key reused for a different request, TL422 bad input.';

CREATE FUNCTION api.create_account(p_plan text, p_credits_micros bigint DEFAULT 0, p_name text DEFAULT NULL::text, p_kind text DEFAULT 'person'::text) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_account_id uuid;
  v_key record;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM billing.plans WHERE id = p_plan AND active) THEN
    PERFORM util.fail('TL422', format('there is no active plan %L', p_plan),
                      jsonb_build_object('plans', (SELECT jsonb_agg(id ORDER BY id) FROM billing.plans WHERE active)));
  END IF;
  IF p_credits_micros IS NULL OR p_credits_micros < 0 THEN
    PERFORM util.fail('TL422', 'initial credits cannot be negative');
  END IF;
  IF p_kind IS NULL OR p_kind NOT IN ('person', 'team', 'device', 'service') THEN
    PERFORM util.fail('TL422', 'an account kind is person, team, device or service');
  END IF;
  INSERT INTO identity.accounts (kind, name, plan_id, created_at)
  VALUES (p_kind, p_name, p_plan, util.now())
  RETURNING id INTO v_account_id;
  SELECT * INTO v_key FROM identity.issue_api_key(v_account_id, 'default');
  IF p_credits_micros > 0 THEN
    PERFORM ledger.post_transfer(v_account_id, 'grants', p_credits_micros, 'grant',
                                 'initial-credits', NULL, 'initial credits');
  END IF;
  RETURN jsonb_build_object(
    'account_id', v_account_id, 'plan', p_plan, 'kind', p_kind, 'name', p_name,
    'api_key_id', v_key.id, 'api_key', v_key.api_key,
    'balance', jsonb_build_object('credits', util.credits(p_credits_micros)));
END $$;

COMMENT ON FUNCTION api.create_account(p_plan text, p_credits_micros bigint, p_name text, p_kind text) IS 'Create an account on an active plan with an API key (returned once, stored as a hash) and optional initial credits in micro-credits, granted through the ledger. Returns {account_id, plan, kind, name, api_key_id, api_key, balance: {credits}}. Errors: TL422 unknown plan or bad input. Operators only (not granted to pgtally_api).';

CREATE FUNCTION api.grant_credits(p_account_id uuid, p_amount_micros bigint, p_idempotency_key text, p_memo text DEFAULT NULL::text) RETURNS TABLE(replayed boolean, body jsonb)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_transfer ledger.transfers;
BEGIN
  IF p_amount_micros IS NULL OR p_amount_micros <= 0 THEN
    PERFORM util.fail('TL422', 'a grant is a positive amount of credits');
  END IF;
  IF p_idempotency_key IS NULL OR length(p_idempotency_key) NOT BETWEEN 1 AND 255 THEN
    PERFORM util.fail('TL422', 'an idempotency key of 1 to 255 characters is required');
  END IF;
  PERFORM 1 FROM identity.accounts WHERE id = p_account_id FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    PERFORM util.fail('TL404', format('no account %s', p_account_id));
  END IF;
  SELECT * INTO v_transfer FROM ledger.transfers
  WHERE account_id = p_account_id AND idempotency_key = p_idempotency_key;
  IF FOUND THEN
    IF v_transfer.kind <> 'grant' OR v_transfer.amount_micros <> p_amount_micros THEN
      PERFORM util.fail('TL409', 'this idempotency key was already used for a different transfer',
                        jsonb_build_object('transfer_id', v_transfer.id));
    END IF;
    replayed := true;
  ELSE
    PERFORM ledger.post_transfer(p_account_id, 'grants', p_amount_micros, 'grant', p_idempotency_key, NULL, p_memo);
    SELECT * INTO v_transfer FROM ledger.transfers
    WHERE account_id = p_account_id AND idempotency_key = p_idempotency_key;
    replayed := false;
  END IF;
  SELECT ledger.entry_json(v_transfer, e.amount_micros, e.balance_after_micros, e.created_at)
         || jsonb_build_object('account_id', p_account_id)
  INTO body
  FROM ledger.entries e WHERE e.transfer_id = v_transfer.id AND e.account_id IS NOT NULL;
  RETURN NEXT;
END $$;

COMMENT ON FUNCTION api.grant_credits(p_account_id uuid, p_amount_micros bigint, p_idempotency_key text, p_memo text) IS 'Grant credits (micro-credits) to an account from the grants system account, once per idempotency key: a retry returns the original entry with replayed = true; the same key for another amount is TL409. TL404 unknown account, TL422 bad amount or key. Operators only (not granted to pgtally_api).';

CREATE FUNCTION api.ledger(p_api_key text, p_cursor text DEFAULT NULL::text, p_limit integer DEFAULT 20) RETURNS jsonb
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
  v_account_id uuid := identity.authenticate(p_api_key);
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

COMMENT ON FUNCTION api.ledger(p_api_key text, p_cursor text, p_limit integer) IS 'GET /v1/ledger: the caller''s ledger entries, newest first, p_limit (1-100) per page; pass next_cursor back as p_cursor for the next page. Returns {data, has_more, next_cursor}. TL401 bad API key, TL422 bad limit or cursor.';

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
    INSERT INTO billing.plans (id, name, description, features, active, updated_at)
    VALUES (v_id, coalesce(v_def ->> 'name', initcap(v_id)), coalesce(v_def ->> 'description', ''),
            coalesce(v_def -> 'features', '[]'), true, util.now())
    ON CONFLICT (id) DO UPDATE SET
      name = EXCLUDED.name, description = EXCLUDED.description, features = EXCLUDED.features,
      active = true, updated_at = EXCLUDED.updated_at;
    DELETE FROM billing.entitlements WHERE plan_id = v_id;
    FOR v_meter, v_ent IN SELECT key, value FROM jsonb_each(coalesce(v_def -> 'entitlements', '{}')) LOOP
      IF NOT v_meter = ANY (v_meters) THEN
        PERFORM util.fail('TL422', format('plans.%s.entitlements.%s: no such meter in this catalog', v_id, v_meter));
      END IF;
      v_kind := CASE WHEN v_ent ? 'allowance' THEN 'allowance'
                     WHEN v_ent ? 'fair_use' THEN 'fair_use'
                     WHEN (v_ent ->> 'unlimited')::boolean THEN 'unlimited' END;
      IF v_kind IS NULL THEN
        PERFORM util.fail('TL422', format('plans.%s.entitlements.%s: give allowance = N, fair_use = N or unlimited = true', v_id, v_meter));
      END IF;
      v_limit := CASE v_kind WHEN 'unlimited' THEN NULL ELSE (v_ent ->> v_kind)::bigint END;
      IF v_limit < 0 THEN
        PERFORM util.fail('TL422', format('plans.%s.entitlements.%s: a limit cannot be negative', v_id, v_meter));
      END IF;
      IF coalesce(v_ent ->> 'period', 'month') NOT IN ('day', 'month', 'billing_period') THEN
        PERFORM util.fail('TL422', format('plans.%s.entitlements.%s.period: day, month or billing_period', v_id, v_meter));
      END IF;
      INSERT INTO billing.entitlements (plan_id, meter_id, kind, period, limit_units)
      VALUES (v_id, v_meter, v_kind, coalesce(v_ent ->> 'period', 'month'), v_limit);
    END LOOP;
    v_plans := v_plans || v_id;
  END LOOP;

  UPDATE billing.plans SET active = false, updated_at = util.now()
  WHERE active AND NOT id = ANY (v_plans);

  RETURN jsonb_build_object('plans', to_jsonb(v_plans), 'meters', to_jsonb(v_meters));
END $_$;

COMMENT ON FUNCTION api.load_catalog(p_catalog jsonb) IS 'Load the plan catalog (the catalog file as JSON: {"meters": {id: {name, unit, pricing: unit|tokens, price | input_price_per_million, output_price_per_million, margin}}, "plans": {id: {name, description, features, entitlements: {meter: {allowance|fair_use: N, period} | {unlimited: true}}}}}). Prices are credits. Upserts meters and plans, replaces each listed plan''s entitlements, deactivates plans not listed. Errors: TL422 naming the bad field. Operators only (not granted to pgtally_api).';

CREATE FUNCTION billing.to_micros(p_credits jsonb, p_path text) RETURNS bigint
    LANGUAGE plpgsql IMMUTABLE
    AS $$
DECLARE
  v numeric;
BEGIN
  IF p_credits IS NULL OR jsonb_typeof(p_credits) NOT IN ('number', 'string') THEN
    PERFORM util.fail('TL422', format('%s: a number of credits is required', p_path));
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

COMMENT ON FUNCTION billing.to_micros(p_credits jsonb, p_path text) IS 'A catalog amount of credits (JSON number or decimal string) as micro-credits; TL422 naming p_path when it is not a non-negative amount with at most 6 decimals.';

CREATE FUNCTION identity.authenticate(p_api_key text) RETURNS uuid
    LANGUAGE plpgsql STABLE
    AS $$
DECLARE
  v_account_id uuid;
BEGIN
  SELECT k.account_id INTO v_account_id
  FROM identity.api_keys k
  WHERE k.key_hash = sha256(convert_to(coalesce(p_api_key, ''), 'UTF8'))
    AND k.revoked_at IS NULL
    AND (k.expires_at IS NULL OR k.expires_at > util.now());
  IF v_account_id IS NULL THEN
    PERFORM util.fail('TL401', 'the API key is not valid');
  END IF;
  RETURN v_account_id;
END $$;

COMMENT ON FUNCTION identity.authenticate(p_api_key text) IS 'The account an API key belongs to, found by the key''s SHA-256 hash. TL401 when the key is unknown, revoked or expired.';

CREATE FUNCTION identity.issue_api_key(p_account_id uuid, p_name text DEFAULT ''::text, OUT id uuid, OUT api_key text) RETURNS record
    LANGUAGE plpgsql
    AS $$
BEGIN
  -- 244 random bits from two version-4 UUIDs (pg_strong_random), URL-safe base64.
  api_key := 'pgt_' || rtrim(translate(encode(uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid()), 'base64'),
                                       '+/', '-_'), '=');
  INSERT INTO identity.api_keys (account_id, name, key_hash, display, created_at)
  VALUES (p_account_id, coalesce(p_name, ''), sha256(convert_to(api_key, 'UTF8')),
          left(api_key, 8) || '...' || right(api_key, 4), util.now())
  RETURNING identity.api_keys.id INTO id;
END $$;

COMMENT ON FUNCTION identity.issue_api_key(p_account_id uuid, p_name text, OUT id uuid, OUT api_key text) IS 'Create an API key for an account: returns its id and the key text (pgt_ + 43 characters), which is stored only as a SHA-256 hash.';

CREATE FUNCTION ledger.check_transfer_balanced() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
DECLARE
  v_sum numeric;
BEGIN
  SELECT sum(amount_micros) INTO v_sum FROM ledger.entries WHERE transfer_id = NEW.transfer_id;
  IF v_sum <> 0 THEN
    RAISE EXCEPTION 'transfer % is unbalanced by % micro-credits', NEW.transfer_id, v_sum
      USING ERRCODE = 'TL500';
  END IF;
  RETURN NULL;
END $$;

COMMENT ON FUNCTION ledger.check_transfer_balanced() IS 'Deferred constraint trigger: the entries of a transfer must sum to zero at commit (TL500 otherwise).';

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

CREATE TABLE ledger.transfers (
    id uuid DEFAULT util.uuid_v7() NOT NULL,
    account_id uuid NOT NULL,
    kind text NOT NULL,
    amount_micros bigint NOT NULL,
    idempotency_key text,
    usage_event_id uuid,
    memo text,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT transfers_amount_micros_check CHECK ((amount_micros <> 0)),
    CONSTRAINT transfers_idempotency_key_check CHECK (((length(idempotency_key) >= 1) AND (length(idempotency_key) <= 255))),
    CONSTRAINT transfers_kind_check CHECK ((kind = ANY (ARRAY['grant'::text, 'usage'::text, 'purchase'::text, 'adjustment'::text])))
);

COMMENT ON TABLE ledger.transfers IS 'A movement of credits between a customer account and a system account. Its two ledger.entries sum to zero. Append-only.';

COMMENT ON COLUMN ledger.transfers.amount_micros IS 'Micro-credits moved into the customer account (negative: out of it, as for usage).';

COMMENT ON COLUMN ledger.transfers.idempotency_key IS 'Caller''s idempotency key, unique per account: a retried grant is applied once.';

CREATE FUNCTION ledger.entry_json(t ledger.transfers, p_amount_micros bigint, p_balance_after_micros bigint, p_created_at timestamp with time zone) RETURNS jsonb
    LANGUAGE sql STABLE
    AS $$
  SELECT jsonb_build_object(
    'transfer_id', t.id, 'kind', t.kind, 'amount', util.credits(p_amount_micros),
    'balance_after', util.credits(p_balance_after_micros), 'usage_event_id', t.usage_event_id,
    'memo', t.memo, 'created_at', util.iso(p_created_at))
$$;

COMMENT ON FUNCTION ledger.entry_json(t ledger.transfers, p_amount_micros bigint, p_balance_after_micros bigint, p_created_at timestamp with time zone) IS 'A customer ledger entry as the API shows it: {transfer_id, kind, amount, balance_after, usage_event_id, memo, created_at}, credits as decimal strings.';

CREATE FUNCTION ledger.post_transfer(p_account_id uuid, p_system_account text, p_amount_micros bigint, p_kind text, p_idempotency_key text, p_usage_event_id uuid, p_memo text, OUT transfer_id uuid, OUT balance_after_micros bigint, OUT created_at timestamp with time zone) RETURNS record
    LANGUAGE plpgsql
    AS $$
BEGIN
  -- The balance update is the overdraft guard: it matches no row when the balance would go negative.
  UPDATE identity.accounts a
  SET credit_balance_micros = a.credit_balance_micros + p_amount_micros
  WHERE a.id = p_account_id AND a.credit_balance_micros + p_amount_micros >= 0
  RETURNING a.credit_balance_micros INTO balance_after_micros;
  IF NOT FOUND THEN
    IF EXISTS (SELECT 1 FROM identity.accounts WHERE id = p_account_id) THEN
      PERFORM util.fail('TL402', 'not enough credits',
        jsonb_build_object('required_credits', util.credits(-p_amount_micros),
                           'balance', (SELECT util.credits(credit_balance_micros) FROM identity.accounts WHERE id = p_account_id)));
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
END $$;

COMMENT ON FUNCTION ledger.post_transfer(p_account_id uuid, p_system_account text, p_amount_micros bigint, p_kind text, p_idempotency_key text, p_usage_event_id uuid, p_memo text, OUT transfer_id uuid, OUT balance_after_micros bigint, OUT created_at timestamp with time zone) IS 'Move p_amount_micros into a customer account (negative: out of it) from/to a system account: updates the cached balance and writes the transfer and its two entries. TL402 when the balance would go negative, TL404 for an unknown account. Callers lock the account first.';

CREATE TABLE billing.entitlements (
    plan_id text NOT NULL,
    meter_id text NOT NULL,
    kind text NOT NULL,
    period text NOT NULL,
    limit_units bigint,
    CONSTRAINT entitlements_check CHECK (((kind = 'unlimited'::text) = (limit_units IS NULL))),
    CONSTRAINT entitlements_kind_check CHECK ((kind = ANY (ARRAY['allowance'::text, 'unlimited'::text, 'fair_use'::text]))),
    CONSTRAINT entitlements_limit_units_check CHECK ((limit_units >= 0)),
    CONSTRAINT entitlements_period_check CHECK ((period = ANY (ARRAY['day'::text, 'month'::text, 'billing_period'::text])))
);

COMMENT ON TABLE billing.entitlements IS 'What a plan grants per meter and period. allowance: limit_units free per period, then credits at the meter rate, refused when neither covers. unlimited: never charged. fair_use: limit_units is a soft limit that warns at 80% and 100% and never blocks or charges.';

COMMENT ON COLUMN billing.entitlements.period IS 'day: resets at midnight UTC. month: resets on the 1st at midnight UTC. billing_period: the account''s subscription period, a calendar month until one is set.';

COMMENT ON COLUMN billing.entitlements.limit_units IS 'Allowance or soft limit per period, in allowance units: meter units for pricing=unit, micro-credits of cost for pricing=tokens. NULL for unlimited.';

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

CREATE FUNCTION metering.allowance_json(e billing.entitlements, m metering.meters, p_period_start timestamp with time zone, p_period_end timestamp with time zone, p_used bigint) RETURNS jsonb
    LANGUAGE sql STABLE
    AS $$
  SELECT jsonb_build_object(
    'meter', e.meter_id,
    'kind', e.kind,
    'unit', CASE m.pricing WHEN 'unit' THEN m.unit ELSE 'micro_credit' END,
    'period', e.period,
    'limit', e.limit_units,
    'used', p_used,
    'remaining', CASE WHEN e.kind = 'unlimited' THEN NULL ELSE greatest(e.limit_units - p_used, 0) END,
    'period_start', util.iso(p_period_start),
    'resets_at', util.iso(p_period_end))
$$;

COMMENT ON FUNCTION metering.allowance_json(e billing.entitlements, m metering.meters, p_period_start timestamp with time zone, p_period_end timestamp with time zone, p_used bigint) IS 'An entitlement''s state in a period as the API shows it: {meter, kind, unit, period, limit, used, remaining, period_start, resets_at}; limit and remaining are null for unlimited.';

CREATE FUNCTION metering.period_bounds(p_period text, p_at timestamp with time zone, p_billing_start timestamp with time zone, p_billing_end timestamp with time zone, OUT period_start timestamp with time zone, OUT period_end timestamp with time zone) RETURNS record
    LANGUAGE sql STABLE
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

COMMENT ON FUNCTION metering.period_bounds(p_period text, p_at timestamp with time zone, p_billing_start timestamp with time zone, p_billing_end timestamp with time zone, OUT period_start timestamp with time zone, OUT period_end timestamp with time zone) IS 'The allowance period containing p_at: day = UTC calendar day, month = UTC calendar month, billing_period = the account''s subscription period when it covers p_at, else the calendar month. Returns [period_start, period_end).';

CREATE TABLE identity.accounts (
    id uuid DEFAULT util.uuid_v7() NOT NULL,
    kind text DEFAULT 'person'::text NOT NULL,
    name text,
    plan_id text NOT NULL,
    credit_balance_micros bigint DEFAULT 0 NOT NULL,
    billing_period_start timestamp with time zone,
    billing_period_end timestamp with time zone,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT accounts_check CHECK (((billing_period_start IS NULL) = (billing_period_end IS NULL))),
    CONSTRAINT accounts_check1 CHECK ((billing_period_end > billing_period_start)),
    CONSTRAINT accounts_kind_check CHECK ((kind = ANY (ARRAY['person'::text, 'team'::text, 'device'::text, 'service'::text]))),
    CONSTRAINT credit_balance_not_negative CHECK ((credit_balance_micros >= 0))
);

COMMENT ON TABLE identity.accounts IS 'An account owns a plan, a credit balance and usage: a person, a team, an anonymous device or a service.';

COMMENT ON COLUMN identity.accounts.credit_balance_micros IS 'Cached credit balance in micro-credits; always equals the sum of this account''s ledger.entries (reporting.balance_mismatches proves it). Cannot go negative.';

COMMENT ON COLUMN identity.accounts.billing_period_start IS 'Start of the current subscription period, for entitlements with period=billing_period (set by billing).';

COMMENT ON COLUMN identity.accounts.billing_period_end IS 'End (exclusive) of the current subscription period.';

CREATE FUNCTION metering.quote(p_account identity.accounts, p_meter text, p_quantity bigint, p_input_tokens bigint, p_output_tokens bigint, OUT meter_id text, OUT quantity bigint, OUT input_tokens bigint, OUT output_tokens bigint, OUT entitled boolean, OUT period_start timestamp with time zone, OUT period_end timestamp with time zone, OUT allowance_units bigint, OUT credits_micros bigint, OUT balance_after_micros bigint, OUT allowed boolean, OUT allowance jsonb, OUT warnings jsonb) RETURNS record
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
  SELECT * INTO m FROM metering.meters WHERE id = p_meter;
  IF NOT FOUND THEN
    PERFORM util.fail('TL422', format('there is no meter %L', p_meter),
                      jsonb_build_object('meters', (SELECT jsonb_agg(id ORDER BY id) FROM metering.meters)));
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

  SELECT * INTO e FROM billing.entitlements WHERE plan_id = p_account.plan_id AND billing.entitlements.meter_id = m.id;
  entitled := FOUND;
  IF entitled THEN
    SELECT b.period_start, b.period_end INTO period_start, period_end
    FROM metering.period_bounds(e.period, util.now(), p_account.billing_period_start, p_account.billing_period_end) b;
    SELECT u.used INTO v_used FROM metering.allowance_usage u
    WHERE u.account_id = p_account.id AND u.meter_id = m.id AND u.period_start = quote.period_start;
    v_used := coalesce(v_used, 0);
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
  allowed := credits_micros <= p_account.credit_balance_micros;
  balance_after_micros := p_account.credit_balance_micros - CASE WHEN allowed THEN credits_micros ELSE 0 END;

  warnings := '[]';
  IF entitled THEN
    v_after := v_used + CASE WHEN allowed THEN allowance_units ELSE 0 END;
    allowance := metering.allowance_json(e, m, period_start, period_end, v_after);
    -- Warn when usage crosses 80% and 100% of an allowance or soft limit (the extension seed warns at 8 of 10).
    IF e.kind <> 'unlimited' AND e.limit_units > 0 THEN
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
END $$;

COMMENT ON FUNCTION metering.quote(p_account identity.accounts, p_meter text, p_quantity bigint, p_input_tokens bigint, p_output_tokens bigint, OUT meter_id text, OUT quantity bigint, OUT input_tokens bigint, OUT output_tokens bigint, OUT entitled boolean, OUT period_start timestamp with time zone, OUT period_end timestamp with time zone, OUT allowance_units bigint, OUT credits_micros bigint, OUT balance_after_micros bigint, OUT allowed boolean, OUT allowance jsonb, OUT warnings jsonb) IS 'The charging rule, with no side effect: for an account (as read or locked by the caller) and a request, the allowance units and micro-credits it costs, whether the balance covers it, the allowance after it and the threshold warnings it crosses. Unit meters need quantity (default 1); token meters need input_tokens/output_tokens and spend their allowance in micro-credits. TL422 unknown meter or bad quantity.';

CREATE FUNCTION metering.request_hash(p_meter text, p_quantity bigint, p_input_tokens bigint, p_output_tokens bigint) RETURNS bytea
    LANGUAGE sql IMMUTABLE
    AS $$
  SELECT sha256(convert_to(jsonb_build_object(
    'meter', p_meter,
    'quantity', coalesce(p_quantity, CASE WHEN p_input_tokens IS NULL AND p_output_tokens IS NULL THEN 1 END),
    'input_tokens', p_input_tokens, 'output_tokens', p_output_tokens)::text, 'UTF8'))
$$;

COMMENT ON FUNCTION metering.request_hash(p_meter text, p_quantity bigint, p_input_tokens bigint, p_output_tokens bigint) IS 'Fingerprint of a usage request (quantity defaults to 1), compared on retries of an idempotency key.';

CREATE FUNCTION util.credits(p_micros bigint) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
  SELECT trim_scale(p_micros::numeric / 1000000)::text
$$;

COMMENT ON FUNCTION util.credits(p_micros bigint) IS 'Micro-credits as a decimal string of credits, as JSON shows them: 12500000 -> ''12.5''. NULL stays NULL.';

CREATE FUNCTION util.fail(p_sqlstate text, p_message text, p_detail jsonb DEFAULT NULL::jsonb) RETURNS void
    LANGUAGE plpgsql
    AS $$
BEGIN
  RAISE EXCEPTION USING ERRCODE = p_sqlstate, MESSAGE = p_message,
    DETAIL = coalesce(p_detail::text, '');
END $$;

COMMENT ON FUNCTION util.fail(p_sqlstate text, p_message text, p_detail jsonb) IS 'Raise a pgtally error: SQLSTATE of class TL (TL401 unauthenticated, TL402 payment required, TL404 not found, TL409 conflict, TL422 invalid input), a message meant for the caller, and optional JSON DETAIL whose members the API adds to the problem+json body.';

CREATE FUNCTION util.forbid_change() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
  RAISE EXCEPTION '% is append-only', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME
    USING ERRCODE = 'TL403', HINT = 'Correct a ledger with a new transfer, never by editing history.';
END $$;

COMMENT ON FUNCTION util.forbid_change() IS 'Trigger function for append-only tables: raises TL403 on UPDATE, DELETE or TRUNCATE.';

CREATE FUNCTION util.iso(p_at timestamp with time zone) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
  SELECT to_char(p_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
$$;

COMMENT ON FUNCTION util.iso(p_at timestamp with time zone) IS 'A timestamp as RFC 3339 text in UTC with microseconds, whatever the session time zone.';

CREATE FUNCTION util.now() RETURNS timestamp with time zone
    LANGUAGE sql STABLE
    AS $$
  SELECT coalesce(nullif(current_setting('pgtally.now', true), '')::timestamptz, now())
$$;

COMMENT ON FUNCTION util.now() IS 'The one clock of pgtally: now(), unless the session sets pgtally.now (tests move time with SET pgtally.now = ''2026-01-31 23:59:59+00'').';

CREATE TABLE billing.plans (
    id text NOT NULL,
    name text NOT NULL,
    description text DEFAULT ''::text NOT NULL,
    features jsonb DEFAULT '[]'::jsonb NOT NULL,
    active boolean DEFAULT true NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT plans_features_check CHECK ((jsonb_typeof(features) = 'array'::text)),
    CONSTRAINT plans_id_check CHECK ((id ~ '^[a-z][a-z0-9_]{0,62}$'::text))
);

COMMENT ON TABLE billing.plans IS 'Plans of the catalog (loaded from the catalog file by api.load_catalog). A plan absent from the last loaded file is inactive: existing accounts keep it, new accounts cannot take it.';

COMMENT ON COLUMN billing.plans.id IS 'Stable plan code, for example free, pro, unlimited.';

COMMENT ON COLUMN billing.plans.features IS 'Marketing feature list (JSON array of strings) shown by clients.';

CREATE TABLE identity.api_keys (
    id uuid DEFAULT util.uuid_v7() NOT NULL,
    account_id uuid NOT NULL,
    name text DEFAULT ''::text NOT NULL,
    key_hash bytea NOT NULL,
    display text NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    expires_at timestamp with time zone,
    revoked_at timestamp with time zone
);

COMMENT ON TABLE identity.api_keys IS 'API keys of an account. The key itself is shown once at creation and never stored: only its SHA-256 hash.';

COMMENT ON COLUMN identity.api_keys.key_hash IS 'sha256 of the full key text (UTF-8).';

COMMENT ON COLUMN identity.api_keys.display IS 'The key''s prefix and last four characters, to recognise it in lists.';

CREATE TABLE ledger.entries (
    id bigint NOT NULL,
    transfer_id uuid NOT NULL,
    account_id uuid,
    system_account text,
    amount_micros bigint NOT NULL,
    balance_after_micros bigint,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT entries_amount_micros_check CHECK ((amount_micros <> 0)),
    CONSTRAINT entries_check CHECK (((account_id IS NULL) <> (system_account IS NULL))),
    CONSTRAINT entries_check1 CHECK (((account_id IS NULL) = (balance_after_micros IS NULL)))
);

COMMENT ON TABLE ledger.entries IS 'One side of a transfer: micro-credits added to (positive) or taken from (negative) one account. Append-only.';

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

CREATE TABLE ledger.system_accounts (
    code text NOT NULL,
    description text NOT NULL
);

COMMENT ON TABLE ledger.system_accounts IS 'The house side of every transfer. Their balances are not cached (a cached house balance would be one row every charge locks); reporting.system_balances sums them.';

CREATE TABLE metering.allowance_usage (
    account_id uuid NOT NULL,
    meter_id text NOT NULL,
    period_start timestamp with time zone NOT NULL,
    period_end timestamp with time zone NOT NULL,
    used bigint DEFAULT 0 NOT NULL,
    CONSTRAINT allowance_usage_check CHECK ((period_end > period_start)),
    CONSTRAINT allowance_usage_used_check CHECK ((used >= 0))
);

COMMENT ON TABLE metering.allowance_usage IS 'Allowance units counted against an entitlement per account, meter and period. A new period starts a new row, which is how allowances reset.';

COMMENT ON COLUMN metering.allowance_usage.used IS 'Allowance units used in the period: covered by the allowance for kind=allowance, all usage for unlimited and fair_use.';

CREATE TABLE metering.usage_events (
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
    response jsonb NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT usage_events_allowance_units_check CHECK ((allowance_units >= 0)),
    CONSTRAINT usage_events_credits_micros_check CHECK ((credits_micros >= 0)),
    CONSTRAINT usage_events_idempotency_key_check CHECK (((length(idempotency_key) >= 1) AND (length(idempotency_key) <= 255))),
    CONSTRAINT usage_events_input_tokens_check CHECK ((input_tokens >= 0)),
    CONSTRAINT usage_events_output_tokens_check CHECK ((output_tokens >= 0)),
    CONSTRAINT usage_events_quantity_check CHECK ((quantity > 0))
);

COMMENT ON TABLE metering.usage_events IS 'One row per charged usage event. Unique on (account_id, idempotency_key): a retry with the same request replays response, a different request under the same key is refused (TL409).';

COMMENT ON COLUMN metering.usage_events.request_hash IS 'sha256 of the canonical request (meter, quantity, tokens), to tell a retry from a different request.';

COMMENT ON COLUMN metering.usage_events.allowance_units IS 'Allowance units this event used.';

COMMENT ON COLUMN metering.usage_events.credits_micros IS 'Micro-credits this event spent from the credit balance.';

COMMENT ON COLUMN metering.usage_events.response IS 'The JSON answer given the first time, returned as is on every replay.';

CREATE VIEW reporting.balance_mismatches AS
 SELECT a.id AS account_id,
    a.credit_balance_micros AS cached_micros,
    COALESCE(e.total, (0)::bigint) AS ledger_micros,
    (a.credit_balance_micros - COALESCE(e.total, (0)::bigint)) AS difference_micros
   FROM (identity.accounts a
     LEFT JOIN ( SELECT entries.account_id,
            (sum(entries.amount_micros))::bigint AS total
           FROM ledger.entries
          WHERE (entries.account_id IS NOT NULL)
          GROUP BY entries.account_id) e ON ((e.account_id = a.id)))
  WHERE (a.credit_balance_micros <> COALESCE(e.total, (0)::bigint));

COMMENT ON VIEW reporting.balance_mismatches IS 'Reconciliation: accounts whose cached credit balance differs from the sum of their ledger entries. Must be empty.';

CREATE VIEW reporting.entry_balance_breaks AS
 SELECT id AS entry_id,
    account_id,
    balance_after_micros,
    running_micros
   FROM ( SELECT entries.id,
            entries.account_id,
            entries.balance_after_micros,
            sum(entries.amount_micros) OVER (PARTITION BY entries.account_id ORDER BY entries.id) AS running_micros
           FROM ledger.entries
          WHERE (entries.account_id IS NOT NULL)) s
  WHERE ((balance_after_micros)::numeric <> running_micros);

COMMENT ON VIEW reporting.entry_balance_breaks IS 'Reconciliation: customer entries whose recorded balance_after differs from the running sum of the account''s entries. Must be empty.';

CREATE VIEW reporting.system_balances AS
 SELECT s.code AS system_account,
    (COALESCE(sum(e.amount_micros), (0)::numeric))::bigint AS balance_micros
   FROM (ledger.system_accounts s
     LEFT JOIN ledger.entries e ON ((e.system_account = s.code)))
  GROUP BY s.code;

COMMENT ON VIEW reporting.system_balances IS 'Balance of each system account in micro-credits (grants is negative: credits issued). With customer balances it sums to zero.';

CREATE VIEW reporting.unbalanced_transfers AS
 SELECT transfer_id,
    sum(amount_micros) AS sum_micros,
    count(*) AS entries
   FROM ledger.entries
  GROUP BY transfer_id
 HAVING ((sum(amount_micros) <> (0)::numeric) OR (count(*) <> 2));

COMMENT ON VIEW reporting.unbalanced_transfers IS 'Reconciliation: transfers whose entries do not sum to zero or are not exactly two. Must be empty.';

CREATE VIEW reporting.usage_charge_mismatches AS
 SELECT u.id AS usage_event_id,
    u.account_id,
    u.credits_micros,
    COALESCE((- t.amount_micros), (0)::bigint) AS ledger_micros
   FROM (metering.usage_events u
     LEFT JOIN ledger.transfers t ON ((t.usage_event_id = u.id)))
  WHERE (u.credits_micros <> COALESCE((- t.amount_micros), (0)::bigint));

COMMENT ON VIEW reporting.usage_charge_mismatches IS 'Reconciliation: usage events whose credits_micros differ from the usage transfer recorded for them. Must be empty.';

CREATE VIEW reporting.usage_daily AS
 SELECT (date_trunc('day'::text, (created_at AT TIME ZONE 'UTC'::text)))::date AS day,
    meter_id,
    count(*) AS events,
    sum(quantity) AS quantity,
    sum(allowance_units) AS allowance_units,
    sum(credits_micros) AS credits_micros
   FROM metering.usage_events
  GROUP BY ((date_trunc('day'::text, (created_at AT TIME ZONE 'UTC'::text)))::date), meter_id;

COMMENT ON VIEW reporting.usage_daily IS 'Usage per UTC day and meter: events, units, allowance units and micro-credits spent.';

ALTER TABLE ONLY billing.entitlements
    ADD CONSTRAINT entitlements_pkey PRIMARY KEY (plan_id, meter_id);

ALTER TABLE ONLY billing.plans
    ADD CONSTRAINT plans_pkey PRIMARY KEY (id);

ALTER TABLE ONLY identity.accounts
    ADD CONSTRAINT accounts_pkey PRIMARY KEY (id);

ALTER TABLE ONLY identity.api_keys
    ADD CONSTRAINT api_keys_key_hash_key UNIQUE (key_hash);

ALTER TABLE ONLY identity.api_keys
    ADD CONSTRAINT api_keys_pkey PRIMARY KEY (id);

ALTER TABLE ONLY ledger.entries
    ADD CONSTRAINT entries_pkey PRIMARY KEY (id);

ALTER TABLE ONLY ledger.system_accounts
    ADD CONSTRAINT system_accounts_pkey PRIMARY KEY (code);

ALTER TABLE ONLY ledger.transfers
    ADD CONSTRAINT transfers_idempotency_key UNIQUE (account_id, idempotency_key);

ALTER TABLE ONLY ledger.transfers
    ADD CONSTRAINT transfers_pkey PRIMARY KEY (id);

ALTER TABLE ONLY metering.allowance_usage
    ADD CONSTRAINT allowance_usage_pkey PRIMARY KEY (account_id, meter_id, period_start);

ALTER TABLE ONLY metering.meters
    ADD CONSTRAINT meters_pkey PRIMARY KEY (id);

ALTER TABLE ONLY metering.usage_events
    ADD CONSTRAINT usage_events_idempotency_key UNIQUE (account_id, idempotency_key);

ALTER TABLE ONLY metering.usage_events
    ADD CONSTRAINT usage_events_pkey PRIMARY KEY (id);

CREATE INDEX api_keys_account_id_idx ON identity.api_keys USING btree (account_id);

CREATE INDEX entries_account_id_idx ON ledger.entries USING btree (account_id, id) WHERE (account_id IS NOT NULL);

CREATE INDEX entries_transfer_id_idx ON ledger.entries USING btree (transfer_id);

CREATE INDEX transfers_usage_event_id_idx ON ledger.transfers USING btree (usage_event_id) WHERE (usage_event_id IS NOT NULL);

CREATE TRIGGER entries_append_only BEFORE DELETE OR UPDATE ON ledger.entries FOR EACH STATEMENT EXECUTE FUNCTION util.forbid_change();

CREATE CONSTRAINT TRIGGER entries_balanced AFTER INSERT ON ledger.entries DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION ledger.check_transfer_balanced();

CREATE TRIGGER entries_no_truncate BEFORE TRUNCATE ON ledger.entries FOR EACH STATEMENT EXECUTE FUNCTION util.forbid_change();

CREATE TRIGGER transfers_append_only BEFORE DELETE OR UPDATE ON ledger.transfers FOR EACH STATEMENT EXECUTE FUNCTION util.forbid_change();

CREATE TRIGGER transfers_no_truncate BEFORE TRUNCATE ON ledger.transfers FOR EACH STATEMENT EXECUTE FUNCTION util.forbid_change();

ALTER TABLE ONLY billing.entitlements
    ADD CONSTRAINT entitlements_meter_id_fkey FOREIGN KEY (meter_id) REFERENCES metering.meters(id);

ALTER TABLE ONLY billing.entitlements
    ADD CONSTRAINT entitlements_plan_id_fkey FOREIGN KEY (plan_id) REFERENCES billing.plans(id) ON DELETE CASCADE;

ALTER TABLE ONLY identity.accounts
    ADD CONSTRAINT accounts_plan_id_fkey FOREIGN KEY (plan_id) REFERENCES billing.plans(id);

ALTER TABLE ONLY identity.api_keys
    ADD CONSTRAINT api_keys_account_id_fkey FOREIGN KEY (account_id) REFERENCES identity.accounts(id) ON DELETE CASCADE;

ALTER TABLE ONLY ledger.entries
    ADD CONSTRAINT entries_account_id_fkey FOREIGN KEY (account_id) REFERENCES identity.accounts(id) ON DELETE RESTRICT;

ALTER TABLE ONLY ledger.entries
    ADD CONSTRAINT entries_system_account_fkey FOREIGN KEY (system_account) REFERENCES ledger.system_accounts(code);

ALTER TABLE ONLY ledger.entries
    ADD CONSTRAINT entries_transfer_id_fkey FOREIGN KEY (transfer_id) REFERENCES ledger.transfers(id);

ALTER TABLE ONLY ledger.transfers
    ADD CONSTRAINT transfers_account_id_fkey FOREIGN KEY (account_id) REFERENCES identity.accounts(id) ON DELETE RESTRICT;

ALTER TABLE ONLY ledger.transfers
    ADD CONSTRAINT transfers_usage_event_id_fkey FOREIGN KEY (usage_event_id) REFERENCES metering.usage_events(id);

ALTER TABLE ONLY metering.allowance_usage
    ADD CONSTRAINT allowance_usage_account_id_fkey FOREIGN KEY (account_id) REFERENCES identity.accounts(id) ON DELETE CASCADE;

ALTER TABLE ONLY metering.allowance_usage
    ADD CONSTRAINT allowance_usage_meter_id_fkey FOREIGN KEY (meter_id) REFERENCES metering.meters(id);

ALTER TABLE ONLY metering.usage_events
    ADD CONSTRAINT usage_events_account_id_fkey FOREIGN KEY (account_id) REFERENCES identity.accounts(id) ON DELETE CASCADE;

ALTER TABLE ONLY metering.usage_events
    ADD CONSTRAINT usage_events_meter_id_fkey FOREIGN KEY (meter_id) REFERENCES metering.meters(id);

GRANT USAGE ON SCHEMA api TO pgtally_api;

GRANT USAGE ON SCHEMA reporting TO pgtally_analyst;

REVOKE ALL ON FUNCTION api.balance(p_api_key text) FROM PUBLIC;
GRANT ALL ON FUNCTION api.balance(p_api_key text) TO pgtally_api;

REVOKE ALL ON FUNCTION api.check_usage(p_api_key text, p_meter text, p_quantity bigint, p_input_tokens bigint, p_output_tokens bigint) FROM PUBLIC;
GRANT ALL ON FUNCTION api.check_usage(p_api_key text, p_meter text, p_quantity bigint, p_input_tokens bigint, p_output_tokens bigint) TO pgtally_api;

REVOKE ALL ON FUNCTION api.consume(p_api_key text, p_idempotency_key text, p_meter text, p_quantity bigint, p_input_tokens bigint, p_output_tokens bigint) FROM PUBLIC;
GRANT ALL ON FUNCTION api.consume(p_api_key text, p_idempotency_key text, p_meter text, p_quantity bigint, p_input_tokens bigint, p_output_tokens bigint) TO pgtally_api;

REVOKE ALL ON FUNCTION api.create_account(p_plan text, p_credits_micros bigint, p_name text, p_kind text) FROM PUBLIC;

REVOKE ALL ON FUNCTION api.grant_credits(p_account_id uuid, p_amount_micros bigint, p_idempotency_key text, p_memo text) FROM PUBLIC;

REVOKE ALL ON FUNCTION api.ledger(p_api_key text, p_cursor text, p_limit integer) FROM PUBLIC;
GRANT ALL ON FUNCTION api.ledger(p_api_key text, p_cursor text, p_limit integer) TO pgtally_api;

REVOKE ALL ON FUNCTION api.load_catalog(p_catalog jsonb) FROM PUBLIC;

REVOKE ALL ON FUNCTION billing.to_micros(p_credits jsonb, p_path text) FROM PUBLIC;

REVOKE ALL ON FUNCTION identity.authenticate(p_api_key text) FROM PUBLIC;

REVOKE ALL ON FUNCTION identity.issue_api_key(p_account_id uuid, p_name text, OUT id uuid, OUT api_key text) FROM PUBLIC;

REVOKE ALL ON FUNCTION ledger.check_transfer_balanced() FROM PUBLIC;

REVOKE ALL ON FUNCTION util.uuid_v7() FROM PUBLIC;

REVOKE ALL ON FUNCTION ledger.entry_json(t ledger.transfers, p_amount_micros bigint, p_balance_after_micros bigint, p_created_at timestamp with time zone) FROM PUBLIC;

REVOKE ALL ON FUNCTION ledger.post_transfer(p_account_id uuid, p_system_account text, p_amount_micros bigint, p_kind text, p_idempotency_key text, p_usage_event_id uuid, p_memo text, OUT transfer_id uuid, OUT balance_after_micros bigint, OUT created_at timestamp with time zone) FROM PUBLIC;

REVOKE ALL ON FUNCTION metering.allowance_json(e billing.entitlements, m metering.meters, p_period_start timestamp with time zone, p_period_end timestamp with time zone, p_used bigint) FROM PUBLIC;

REVOKE ALL ON FUNCTION metering.period_bounds(p_period text, p_at timestamp with time zone, p_billing_start timestamp with time zone, p_billing_end timestamp with time zone, OUT period_start timestamp with time zone, OUT period_end timestamp with time zone) FROM PUBLIC;

REVOKE ALL ON FUNCTION metering.quote(p_account identity.accounts, p_meter text, p_quantity bigint, p_input_tokens bigint, p_output_tokens bigint, OUT meter_id text, OUT quantity bigint, OUT input_tokens bigint, OUT output_tokens bigint, OUT entitled boolean, OUT period_start timestamp with time zone, OUT period_end timestamp with time zone, OUT allowance_units bigint, OUT credits_micros bigint, OUT balance_after_micros bigint, OUT allowed boolean, OUT allowance jsonb, OUT warnings jsonb) FROM PUBLIC;

REVOKE ALL ON FUNCTION metering.request_hash(p_meter text, p_quantity bigint, p_input_tokens bigint, p_output_tokens bigint) FROM PUBLIC;

REVOKE ALL ON FUNCTION util.credits(p_micros bigint) FROM PUBLIC;

REVOKE ALL ON FUNCTION util.fail(p_sqlstate text, p_message text, p_detail jsonb) FROM PUBLIC;

REVOKE ALL ON FUNCTION util.forbid_change() FROM PUBLIC;

REVOKE ALL ON FUNCTION util.iso(p_at timestamp with time zone) FROM PUBLIC;

REVOKE ALL ON FUNCTION util.now() FROM PUBLIC;

GRANT SELECT ON TABLE reporting.balance_mismatches TO pgtally_analyst;

GRANT SELECT ON TABLE reporting.entry_balance_breaks TO pgtally_analyst;

GRANT SELECT ON TABLE reporting.system_balances TO pgtally_analyst;

GRANT SELECT ON TABLE reporting.unbalanced_transfers TO pgtally_analyst;

GRANT SELECT ON TABLE reporting.usage_charge_mismatches TO pgtally_analyst;

GRANT SELECT ON TABLE reporting.usage_daily TO pgtally_analyst;

ALTER DEFAULT PRIVILEGES FOR ROLE <owner> REVOKE ALL ON FUNCTIONS FROM PUBLIC;
