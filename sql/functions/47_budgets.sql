-- Budgets: spending caps and alert thresholds per API key, member and account (issue #28).
-- A charge, a batch's event and a hold apply them (metering.budgets_apply) in their own
-- transaction, under the account row's lock that every spend of the account takes first: two
-- charges never read the same window's spending, so no concurrency can overspend a budget. An
-- account without budgets never reaches this file (identity.accounts.has_budgets is false).

-- (Parameters are scalars or record, never a table's type: this checkout's functions are made on
-- older schemas too, by the upgrade tests.)

CREATE OR REPLACE FUNCTION metering.budget_applies(p_scope text, p_subject uuid, p_api_key_id uuid, p_user_id uuid)
RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
  SELECT p_scope = 'account' OR (p_scope = 'api_key' AND p_subject = p_api_key_id)
      OR (p_scope = 'member' AND p_subject = p_user_id)
$$;
COMMENT ON FUNCTION metering.budget_applies(text, uuid, uuid, uuid) IS
  'Whether a budget of this scope and subject counts a spend on its account by this API key and person: an account budget counts all, a key budget its key''s, a member budget its member''s (the keys they made and their sessions).';

CREATE OR REPLACE FUNCTION metering.budget_window_usage(p_account_id uuid, p_scope text, p_subject uuid,
                                                        p_start timestamptz, p_end timestamptz)
RETURNS bigint
LANGUAGE sql STABLE AS $$
  SELECT (coalesce((SELECT sum(e.credits_micros) FROM metering.usage_events e
                    WHERE e.account_id = p_account_id AND e.created_at >= p_start AND e.created_at < p_end
                      AND e.credits_micros > 0 AND metering.budget_applies(p_scope, p_subject, e.api_key_id, e.user_id)), 0)
        - coalesce((SELECT sum(r.credits_micros) FROM metering.reversals r
                    WHERE r.account_id = p_account_id AND r.event_created_at >= p_start AND r.event_created_at < p_end
                      AND metering.budget_applies(p_scope, p_subject, r.api_key_id, r.user_id)), 0))::bigint
$$;
COMMENT ON FUNCTION metering.budget_window_usage(uuid, text, uuid, timestamptz, timestamptz) IS
  'The credits (micro-credits) a budget''s subject (p_scope, p_subject) spent on its account in [p_start, p_end), net of reversals (metering.reversals): where a budget window''s row starts, so a budget set mid-window counts that window''s earlier spending.';

CREATE OR REPLACE FUNCTION metering.budget_json(p_budget_id uuid) RETURNS jsonb
LANGUAGE sql STABLE AS $$
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
COMMENT ON FUNCTION metering.budget_json(uuid) IS
  'A budget as the API shows it: {id, object, account_id, scope, subject, limit, window, alerts, spent, remaining (credits, this window), period_start, resets_at, created_at}.';

CREATE OR REPLACE FUNCTION metering.budgets_apply(a record, p_api_key_id uuid, p_user_id uuid, p_micros bigint,
                                                  OUT refusal jsonb, OUT budget_ids uuid[])
LANGUAGE plpgsql AS $$
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
COMMENT ON FUNCTION metering.budgets_apply(record, uuid, uuid, bigint) IS
  'Spend p_micros (credits of a charge or hold on account a (its identity.accounts row), locked by the caller) against every budget of a that counts this API key and person (metering.budget_applies), in their current windows. When one would pass its limit, nothing is written and refusal is the TL4B2 answer {message, detail {account_id, budget_id, scope, subject, window, limit, spent, required_credits, remaining, resets_at}}; else each window''s spending grows, each alert threshold crossed for the first time in the window is emailed (metering.email_budget_alert), and budget_ids lists the budgets charged (NULL: none). Called by api.consume, api.consume_batch and api.hold only when a.has_budgets.';

CREATE OR REPLACE FUNCTION metering.email_budget_alert(p_budget_id uuid, p_percent integer, p_spent bigint,
                                                       p_resets_at timestamptz) RETURNS void
LANGUAGE sql AS $$
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
COMMENT ON FUNCTION metering.email_budget_alert(uuid, integer, bigint, timestamptz) IS
  'Queue the email of a budget''s alert threshold (the highest one crossed by a spend) to the account''s owners and admins and, for a member budget, the member (verified addresses; outbox usage_warning, written by the spending transaction).';

CREATE OR REPLACE FUNCTION metering.budgets_return(p_budget_ids uuid[], p_at timestamptz, p_micros bigint) RETURNS void
LANGUAGE sql AS $$
  UPDATE metering.budget_windows w SET spent_micros = greatest(w.spent_micros - p_micros, 0)
  FROM metering.budgets b JOIN identity.accounts a ON a.id = b.account_id
  CROSS JOIN LATERAL metering.period_bounds(b.period, p_at, a.billing_period_start, a.billing_period_end) p
  WHERE b.id = ANY (p_budget_ids) AND w.budget_id = b.id AND w.period_start = p.period_start
$$;
COMMENT ON FUNCTION metering.budgets_return(uuid[], timestamptz, bigint) IS
  'Give p_micros back to the windows (those containing p_at) of the budgets p_budget_ids: a hold settled (released, expired or captured, its actual charge being spent again) or a charge reversed. A window with no row yet has nothing to give back (it starts from the net spending). Callers lock the account.';

CREATE OR REPLACE FUNCTION metering.set_budget(p_account_id uuid, p_scope text, p_subject uuid, p_limit text,
                                               p_window text, p_alerts integer[], p_created_by uuid) RETURNS jsonb
LANGUAGE plpgsql AS $$
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
COMMENT ON FUNCTION metering.set_budget(uuid, text, uuid, text, text, integer[], uuid) IS
  'Set a budget on an account (one per scope, subject and window: setting it again changes its limit and alerts), under the account''s lock, and mark the account as having budgets. p_limit: credits as a decimal string; p_alerts: percentages 1-100 (at most 10). TL404 unknown account, TL422 bad scope, subject (not a key or member of the account; account: the account itself, the default), window, limit or alerts.';

CREATE OR REPLACE FUNCTION metering.delete_budget(p_account_id uuid, p_budget_id uuid) RETURNS jsonb
LANGUAGE plpgsql AS $$
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
COMMENT ON FUNCTION metering.delete_budget(uuid, uuid) IS
  'Delete a budget of an account (its windows go with it) under the account''s lock, and clear has_budgets when it was the last. TL404 when the account has no such budget.';

CREATE OR REPLACE FUNCTION metering.budgets_json(p_account_id uuid, p_user_id uuid, p_all boolean) RETURNS jsonb
LANGUAGE sql STABLE AS $$
  SELECT jsonb_build_object('data', coalesce(jsonb_agg(metering.budget_json(b.id) ORDER BY b.id), '[]'))
  FROM metering.budgets b
  WHERE b.account_id = p_account_id
    AND (p_all OR (b.scope = 'member' AND b.subject = p_user_id)
         OR (b.scope = 'api_key' AND EXISTS (SELECT 1 FROM identity.api_keys k WHERE k.id = b.subject AND k.created_by = p_user_id)))
$$;
COMMENT ON FUNCTION metering.budgets_json(uuid, uuid, boolean) IS
  'An account''s budgets with this window''s spending ({data: [metering.budget_json]}): all of them, or (p_all false) those of the member p_user_id: their member budget and the budgets of the keys they made.';

CREATE OR REPLACE FUNCTION api.create_budget(p_api_key text, p_session_id uuid, p_scope text, p_subject uuid,
                                             p_limit text, p_window text, p_alerts integer[] DEFAULT '{}',
                                             p_account_id uuid DEFAULT NULL) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  p record := identity.authenticate_principal(p_api_key, p_session_id, 'billing:manage', p_account_id);
BEGIN
  RETURN metering.set_budget(p.account_id, p_scope, p_subject, p_limit, p_window, coalesce(p_alerts, '{}'), p.user_id);
END $$;
COMMENT ON FUNCTION api.create_budget(text, uuid, text, uuid, text, text, integer[], uuid) IS
  'POST /v1/budgets: set a budget (metering.set_budget) on the caller''s account (p_account_id: a team the person belongs to). Principal: a session of an owner, admin or billing member, or an API key with billing:manage (TL403 otherwise). Returns metering.budget_json.';

CREATE OR REPLACE FUNCTION api.budgets(p_api_key text, p_session_id uuid, p_account_id uuid DEFAULT NULL) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
COMMENT ON FUNCTION api.budgets(text, uuid, uuid) IS
  'GET /v1/budgets: the account''s budgets with this window''s spending: all of them for owners, admins, billing and viewer members (and keys with billing:read); a member''s own (member budget and their keys'') for the rest. Principal: usage:read.';

CREATE OR REPLACE FUNCTION api.delete_budget(p_api_key text, p_session_id uuid, p_budget_id uuid,
                                             p_account_id uuid DEFAULT NULL) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  p record := identity.authenticate_principal(p_api_key, p_session_id, 'billing:manage', p_account_id);
BEGIN
  RETURN metering.delete_budget(p.account_id, p_budget_id);
END $$;
COMMENT ON FUNCTION api.delete_budget(text, uuid, uuid, uuid) IS
  'DELETE /v1/budgets/{id}: delete one of the account''s budgets (metering.delete_budget). Principal as api.create_budget. TL404 unknown budget.';

CREATE OR REPLACE FUNCTION api.operator_set_budget(p_account_id uuid, p_scope text, p_subject uuid, p_limit text,
                                                   p_window text, p_alerts integer[] DEFAULT '{}') RETURNS jsonb
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT metering.set_budget(p_account_id, p_scope, p_subject, p_limit, p_window, coalesce(p_alerts, '{}'), NULL)
$$;
COMMENT ON FUNCTION api.operator_set_budget(uuid, text, uuid, text, text, integer[]) IS
  'pgtally budgets set: an operator sets a budget on any account (metering.set_budget). Operators only (not granted to pgtally_api).';

CREATE OR REPLACE FUNCTION api.operator_budgets(p_account_id uuid) RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT metering.budgets_json(p_account_id, NULL, true)
$$;
COMMENT ON FUNCTION api.operator_budgets(uuid) IS 'pgtally budgets list: every budget of an account. Operators only.';

CREATE OR REPLACE FUNCTION api.operator_delete_budget(p_budget_id uuid) RETURNS jsonb
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT metering.delete_budget((SELECT account_id FROM metering.budgets WHERE id = p_budget_id), p_budget_id)
$$;
COMMENT ON FUNCTION api.operator_delete_budget(uuid) IS 'pgtally budgets delete: delete any budget. Operators only.';

GRANT EXECUTE ON FUNCTION api.create_budget(text, uuid, text, uuid, text, text, integer[], uuid),
  api.budgets(text, uuid, uuid), api.delete_budget(text, uuid, uuid, uuid) TO pgtally_api;
