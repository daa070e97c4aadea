-- Reversing a charge (issue #28): full or partial, once per idempotency key, never for more than
-- was charged however many run at once (each reversal locks the account row first, as every
-- charge does, and counts the event's earlier reversals under that lock).

CREATE OR REPLACE FUNCTION metering.reversal_lot_days() RETURNS integer
LANGUAGE sql IMMUTABLE AS $$ SELECT 7 $$;
COMMENT ON FUNCTION metering.reversal_lot_days() IS
  'Days to spend credits a reversal gives back when the lot they came from has expired (or been canceled) since: they come back as a new lot of source reversal expiring this long after the reversal. 7.';

CREATE OR REPLACE FUNCTION metering.reversal_json(r record) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$              -- (plpgsql: a sql function cannot take a record)
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
COMMENT ON FUNCTION metering.reversal_json(record) IS
  'A reversal (a metering.reversals row) as the API shows it: {id, object, account_id, usage_event_id, quantity, reversed {allowance_units, credits, amount (post-paid credit owed, minor units), currency}, allowance_returned, lots [{lot_id, credits, new_lot}], transfer_id, reason, idempotency_key, balance {credits right after it}, created_at}.';

CREATE OR REPLACE FUNCTION metering.reverse_usage(p_event_id uuid, p_quantity bigint, p_reason text, p_idempotency_key text,
                                                  p_staff_user_id uuid, p_operator_key_id uuid,
                                                  OUT replayed boolean, OUT body jsonb)
LANGUAGE plpgsql AS $$
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
COMMENT ON FUNCTION metering.reverse_usage(uuid, bigint, text, text, uuid, uuid) IS
  'Reverse p_quantity units of a usage event (NULL: all that are left), with a reason, once per (account, idempotency key): a retry with the same event, quantity and reason returns the reversal (replayed), another request under the key is TL42R (util.idempotency_check). Under the account''s lock: never more than was charged, however many run at once (TL40C fully reversed already, TL422 more units than are left). The reversed units cost what the charge''s last units did (credits first, then allowance units; partial reversals add up to the charge exactly). Credits come back by a ledger transfer of kind reversal from the usage system account into the lots the charge drew from, last drawn first; a lot that has expired or been canceled since becomes a new lot of source reversal expiring metering.reversal_lot_days() later. Allowance units go back to their window if it is still open; budgets that counted the charge get the credits back; a post-paid charge records the amount as a credit owed (reporting.post_paid_credits_owed). Staff reversals are audited (ops.audit_log); every reversal is a metering.reversals row. TL404 unknown event, TL422 bad key, reason or quantity.';

CREATE OR REPLACE FUNCTION api.reverse_usage(p_api_key text, p_session_id uuid, p_event_id uuid, p_quantity bigint,
                                             p_reason text, p_idempotency_key text)
RETURNS TABLE (replayed boolean, body jsonb)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
COMMENT ON FUNCTION api.reverse_usage(text, uuid, uuid, bigint, text, text) IS
  'POST /v1/usage/events/{id}/reversal: reverse a usage event of any account (metering.reverse_usage). Principal: an operator API key with the usage:reverse scope, or a session of admin staff (identity.staff, action reverse_usage). TL401 bad key or session, TL403 otherwise. Returns (replayed, metering.reversal_json).';

CREATE OR REPLACE FUNCTION api.operator_reverse_usage(p_event_id uuid, p_quantity bigint, p_reason text,
                                                      p_idempotency_key text)
RETURNS TABLE (replayed boolean, body jsonb)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT * FROM metering.reverse_usage(p_event_id, p_quantity, p_reason, p_idempotency_key, NULL, NULL)
$$;
COMMENT ON FUNCTION api.operator_reverse_usage(uuid, bigint, text, text) IS
  'pgtally events reverse: an operator reverses a usage event (metering.reverse_usage). Operators only (not granted to pgtally_api).';

CREATE OR REPLACE FUNCTION api.operator_reversal_key(p_account_id uuid, p_name text DEFAULT 'reversals') RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v record;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM identity.accounts WHERE id = p_account_id AND kind = 'service') THEN
    PERFORM util.fail('TL422', 'an operator key belongs to a service account (pgtally accounts create --kind service)');
  END IF;
  SELECT * INTO v FROM identity.issue_api_key(p_account_id, p_name, '{usage:reverse}', NULL);
  RETURN jsonb_build_object('api_key', v.api_key, 'account_id', p_account_id, 'scopes', '["usage:reverse"]'::jsonb);
END $$;
COMMENT ON FUNCTION api.operator_reversal_key(uuid, text) IS
  'pgtally events reversal-key: issue an operator API key with the usage:reverse scope on a service account (shown once). Operators only.';

GRANT EXECUTE ON FUNCTION api.reverse_usage(text, uuid, uuid, bigint, text, text) TO pgtally_api;
