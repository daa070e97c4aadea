-- Holds: reserve what a request would cost before the work, then capture the actual amount or
-- release it. A hold reserves in the same account-row transaction that charges (api.consume),
-- so a hold and a concurrent charge can never spend the same unit.

CREATE OR REPLACE FUNCTION metering.hold_json(h metering.holds) RETURNS jsonb
LANGUAGE sql STABLE AS $$
  SELECT jsonb_build_object('id', h.id, 'object', 'hold', 'status', h.status, 'meter', h.meter_id,
                            'quantity', h.quantity, 'input_tokens', h.input_tokens, 'output_tokens', h.output_tokens,
                            'held', jsonb_build_object('allowance_units', h.allowance_units,
                                                       'credits', util.credits(h.credits_micros)),
                            'idempotency_key', h.idempotency_key, 'created_at', util.iso(h.created_at),
                            'expires_at', util.iso(h.expires_at), 'settled_at', util.iso(h.settled_at))
$$;
COMMENT ON FUNCTION metering.hold_json(metering.holds) IS
  'A hold as the API shows it: {id, status (open, captured, released, expired), meter, quantity, input_tokens, output_tokens, held {allowance_units, credits}, idempotency_key, created_at, expires_at, settled_at}.';

CREATE OR REPLACE FUNCTION metering.settle_hold(h metering.holds, p_status text) RETURNS metering.holds
LANGUAGE plpgsql AS $$
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
COMMENT ON FUNCTION metering.settle_hold(metering.holds, text) IS
  'Return what an open hold reserved (its credits to the spendable balance and to the windows of the budgets that counted them, its allowance units to their window) and mark it captured, released or expired, exactly once; NULL when it was not open. Callers lock the account first.';

CREATE OR REPLACE FUNCTION metering.expire_holds(p_account_id uuid) RETURNS integer
LANGUAGE plpgsql AS $$
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
COMMENT ON FUNCTION metering.expire_holds(uuid) IS
  'Release the account''s open holds that have expired (lazily, at its next charge, hold or capture, with the account locked); returns how many.';

CREATE OR REPLACE FUNCTION metering.lock_account(p_account_id uuid) RETURNS identity.accounts
LANGUAGE plpgsql AS $$
DECLARE
  a identity.accounts;
BEGIN
  PERFORM 1 FROM identity.accounts WHERE id = p_account_id FOR NO KEY UPDATE;
  PERFORM metering.expire_holds(p_account_id);
  PERFORM ledger.refresh_lots(p_account_id);
  SELECT * INTO a FROM identity.accounts WHERE id = p_account_id;
  RETURN a;
END $$;
COMMENT ON FUNCTION metering.lock_account(uuid) IS
  'An account locked for a charge, with its expired holds released and its due credit lots refreshed (ledger.refresh_lots).';

CREATE OR REPLACE FUNCTION metering.locked_account(p_api_key text, p_session_id uuid, p_account_id uuid)
RETURNS identity.accounts
LANGUAGE sql AS $$
  SELECT metering.lock_account(identity.authenticate(p_api_key, p_session_id, 'usage:write', p_account_id))
$$;
COMMENT ON FUNCTION metering.locked_account(text, uuid, uuid) IS
  'The principal''s account (scope usage:write), locked for a charge (metering.lock_account).';

CREATE OR REPLACE FUNCTION api.hold(p_api_key text, p_session_id uuid, p_idempotency_key text, p_meter text,
                                    p_quantity bigint DEFAULT NULL, p_input_tokens bigint DEFAULT NULL,
                                    p_output_tokens bigint DEFAULT NULL, p_expires_in integer DEFAULT 900,
                                    p_account_id uuid DEFAULT NULL)
RETURNS TABLE (replayed boolean, body jsonb)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
COMMENT ON FUNCTION api.hold(text, uuid, text, text, bigint, bigint, bigint, integer, uuid) IS
  'POST /v1/holds: reserve the allowance units and credits this request would cost (metering.quote, exactly as api.consume would charge them) for p_expires_in seconds (1-86,400), once per idempotency key (util.idempotency_check: a retry returns the hold, replayed = true; another request under the key is TL42R). TL402 when they are not there, TL4B2 when a budget does not cover the credits (they count as spent in its window until the hold is settled): nothing reserved. Principal as api.consume. Returns (replayed, metering.hold_json).';

CREATE OR REPLACE FUNCTION api.capture_hold(p_api_key text, p_session_id uuid, p_hold_id uuid,
                                            p_quantity bigint DEFAULT NULL, p_input_tokens bigint DEFAULT NULL,
                                            p_output_tokens bigint DEFAULT NULL, p_account_id uuid DEFAULT NULL)
RETURNS TABLE (replayed boolean, body json)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
COMMENT ON FUNCTION api.capture_hold(text, uuid, uuid, bigint, bigint, bigint, uuid) IS
  'POST /v1/holds/{id}/capture: return what the hold reserved and charge the actual quantity or tokens (the held ones when not given) as one usage event, exactly once (idempotency key hold:<id>: a repeated capture returns the first answer, replayed = true; a different amount is TL42R). More than was held only when the balance covers the difference (TL402 otherwise; the hold stays open). TL40C after release or expiry (DETAIL hold_status: released or expired), TL404 unknown hold.';

CREATE OR REPLACE FUNCTION api.release_hold(p_api_key text, p_session_id uuid, p_hold_id uuid,
                                            p_account_id uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
COMMENT ON FUNCTION api.release_hold(text, uuid, uuid, uuid) IS
  'POST /v1/holds/{id}/release: return everything the hold reserved, once (releasing a released or expired hold returns it as it is). TL40C after capture (DETAIL hold_status: captured), TL404 unknown hold.';

CREATE OR REPLACE FUNCTION api.holds(p_api_key text, p_session_id uuid, p_account_id uuid DEFAULT NULL) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_account_id uuid := identity.authenticate(p_api_key, p_session_id, 'usage:read', p_account_id);
BEGIN
  RETURN jsonb_build_object('data', coalesce((
    SELECT jsonb_agg(metering.hold_json(h) ORDER BY h.id DESC) FROM metering.holds h
    WHERE h.account_id = v_account_id AND h.status = 'open' AND h.expires_at > util.now()), '[]'));
END $$;
COMMENT ON FUNCTION api.holds(text, uuid, uuid) IS
  'GET /v1/holds: the open holds of the caller''s account, or of p_account_id (a service key, or a team member with usage:read), newest first.';

CREATE OR REPLACE FUNCTION api.expire_holds() RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
COMMENT ON FUNCTION api.expire_holds() IS
  'pgtally worker (housekeeping): release every expired open hold, each exactly once (accounts locked one at a time, as a charge would).';

GRANT EXECUTE ON FUNCTION
  api.hold(text, uuid, text, text, bigint, bigint, bigint, integer, uuid),
  api.capture_hold(text, uuid, uuid, bigint, bigint, bigint, uuid), api.release_hold(text, uuid, uuid, uuid),
  api.holds(text, uuid, uuid), api.expire_holds()
TO pgtally_api;
