-- Batches of usage events: many charges, one transaction, each answered on its own.

CREATE OR REPLACE FUNCTION metering.batch_refusal(p_state text, p_message text, p_detail jsonb DEFAULT NULL) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
  SELECT jsonb_build_object('status', 'refused', 'sqlstate', p_state, 'message', p_message, 'detail', p_detail)
$$;
COMMENT ON FUNCTION metering.batch_refusal(text, text, jsonb) IS 'A refused event''s answer in a batch: {status: refused, sqlstate, message, detail}.';

CREATE OR REPLACE FUNCTION api.consume_batch(p_api_key text, p_session_id uuid, p_events jsonb,
                                             OUT data json, OUT charged integer, OUT replayed integer, OUT refused integer)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
COMMENT ON FUNCTION api.consume_batch(text, uuid, jsonb) IS
  'POST /v1/usage/events/batch: charge up to 1,000 usage events ([{idempotency_key, meter, quantity | input_tokens, output_tokens, account_id, metadata}]) in one transaction, each exactly as api.consume charges it (the same metering.quote and metering.charge; the events and their keys written with one INSERT each at the end), each exactly once per its key, with the accounts locked in id order first. Returns (data: [{index, status: charged | replayed | refused, event | sqlstate, message, detail}], a json array in the events'' order; charged, replayed, refused: how many of each, so that a caller relays data as it is when none was refused): a refused event (TL402, TL4B2 a budget does not cover it, TL403, TL404, TL42R key reused for another request, TL422) changes nothing and does not stop the others. Events are checked (read only) before they are charged rather than rolled back one by one, so a batch holds no writing subtransaction per event (more than 64 would slow every snapshot of the server). TL401 no principal, TL422 not an array of 1 to 1,000.';

GRANT EXECUTE ON FUNCTION api.consume_batch(text, uuid, jsonb) TO pgtally_api;

CREATE OR REPLACE FUNCTION api.principal_account(p_api_key text, p_session_id uuid) RETURNS uuid
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT identity.authenticate(p_api_key, p_session_id, 'usage:read')
$$;
COMMENT ON FUNCTION api.principal_account(text, uuid) IS
  'The account a key or session acts on: the authentication every request makes (SHA-256 of the key, one index probe), alone. bench/http_app.py''s ceiling route calls it, so the HTTP ceiling authenticates exactly as the real path does.';
GRANT EXECUTE ON FUNCTION api.principal_account(text, uuid) TO pgtally_api;
