-- Credit lots: where credits came from, when they become spendable, when they expire.
-- ledger.post_transfer makes and spends lots; this file grants, releases and expires them.

CREATE OR REPLACE FUNCTION ledger.lot_json(l ledger.credit_lots) RETURNS jsonb
LANGUAGE sql STABLE AS $$
  SELECT jsonb_build_object('id', l.id, 'object', 'credit_lot', 'source', l.source, 'status', l.status,
                            'amount', util.credits(l.amount_micros), 'remaining', util.credits(l.remaining_micros),
                            'available_at', util.iso(l.available_at), 'expires_at', util.iso(l.expires_at),
                            'memo', l.memo, 'created_at', util.iso(l.created_at))
$$;
COMMENT ON FUNCTION ledger.lot_json(ledger.credit_lots) IS
  'A credit lot as the API shows it: {id, source, status (pending, active, expired, canceled), amount, remaining (credits), available_at, expires_at, memo, created_at}.';

CREATE OR REPLACE FUNCTION ledger.transfer_kind(p_source text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
  SELECT CASE p_source WHEN 'promotion' THEN 'grant' WHEN 'subscription_grant' THEN 'plan_credits' ELSE p_source END
$$;
COMMENT ON FUNCTION ledger.transfer_kind(text) IS 'The transfer kind that brings in a lot of this source (the inverse of ledger.lot_source).';

CREATE OR REPLACE FUNCTION ledger.grant_lot(p_account_id uuid, p_source text, p_amount_micros bigint, p_grant_key text,
                                            p_memo text, p_available_at timestamptz, p_expires_at timestamptz DEFAULT NULL)
RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
  v_id uuid;
BEGIN
  SELECT id INTO v_id FROM ledger.credit_lots WHERE account_id = p_account_id AND grant_key = p_grant_key;
  IF FOUND OR p_amount_micros <= 0 THEN
    RETURN v_id;                        -- granted once per key
  END IF;
  IF p_available_at <= util.now() THEN
    PERFORM ledger.post_transfer(p_account_id, CASE WHEN p_source IN ('purchase', 'subscription_grant') THEN 'purchases'
                                                    WHEN p_source = 'adjustment' THEN 'adjustments' ELSE 'grants' END,
                                 p_amount_micros, ledger.transfer_kind(p_source), p_grant_key, NULL, p_memo, p_expires_at);
    SELECT id INTO v_id FROM ledger.credit_lots WHERE account_id = p_account_id AND grant_key = p_grant_key;
  ELSE
    INSERT INTO ledger.credit_lots (account_id, source, amount_micros, remaining_micros, status, grant_key,
                                    available_at, expires_at, created_at, memo)
    VALUES (p_account_id, p_source, p_amount_micros, p_amount_micros, 'pending', p_grant_key, p_available_at, p_expires_at,
            util.now(), left(p_memo, 500))
    RETURNING id INTO v_id;
    UPDATE identity.accounts SET credits_due_at = least(credits_due_at, p_available_at) WHERE id = p_account_id;
  END IF;
  RETURN v_id;
END $$;
COMMENT ON FUNCTION ledger.grant_lot(uuid, text, bigint, text, text, timestamptz, timestamptz) IS
  'Grant a credit lot once per (account, p_grant_key): spendable now (a ledger transfer from grants, purchases or adjustments brings it into the balance), or pending until p_available_at (no transfer until then; ledger.refresh_lots releases it). Returns the lot id (the existing one on a repeat). Callers lock the account.';

CREATE OR REPLACE FUNCTION ledger.refresh_lots(p_account_id uuid) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
  a identity.accounts;
  l ledger.credit_lots;
  p billing.plans;
  b record;
  v_take bigint;
  v_transfer uuid;
  v_next_grant timestamptz;
BEGIN
  SELECT * INTO a FROM identity.accounts WHERE id = p_account_id;
  IF a.credits_due_at IS NULL OR a.credits_due_at > util.now() THEN
    RETURN false;
  END IF;
  -- Pending lots whose holdback is over become spendable, each through one transfer.
  FOR l IN SELECT * FROM ledger.credit_lots WHERE account_id = p_account_id AND status = 'pending'
                                              AND available_at <= util.now() ORDER BY available_at, id LOOP
    SELECT t.transfer_id INTO v_transfer
    FROM ledger.post_transfer(p_account_id, 'grants', l.remaining_micros, ledger.transfer_kind(l.source), l.grant_key,
                              NULL, l.memo, p_lots => false) t;
    UPDATE ledger.credit_lots SET status = 'active', transfer_id = v_transfer WHERE id = l.id;
  END LOOP;
  -- Expired lots give up what remains, exactly once (the lot's state changes in the same
  -- transaction, under the account lock). Credits open holds reserve are not taken: they stay
  -- in the lot until the hold is captured (which spends this lot first) or released.
  FOR l IN SELECT * FROM ledger.credit_lots WHERE account_id = p_account_id AND status = 'active'
                                              AND remaining_micros > 0 AND expires_at <= util.now()
           ORDER BY expires_at, id LOOP
    SELECT least(l.remaining_micros, credit_balance_micros - held_micros) INTO v_take
    FROM identity.accounts WHERE id = p_account_id;
    IF v_take > 0 THEN
      PERFORM ledger.post_transfer(p_account_id, 'expirations', -v_take, 'expiry',
                                   'expiry:' || l.id || ':' || l.remaining_micros, NULL,
                                   'expired: ' || coalesce(l.memo, l.source), p_lots => false);
      UPDATE ledger.credit_lots
      SET remaining_micros = remaining_micros - v_take,
          status = CASE WHEN remaining_micros = v_take THEN 'expired' ELSE status END,
          settled_at = CASE WHEN remaining_micros = v_take THEN util.now() END
      WHERE id = l.id;
    END IF;
  END LOOP;
  -- Monthly free credits: one lot per billing period, expiring at its end (so they reset).
  SELECT * INTO p FROM billing.plans WHERE id = identity.effective_plan(a);
  IF p.monthly_credits_micros > 0 THEN
    SELECT * INTO b FROM metering.period_bounds('billing_period', util.now(), a.billing_period_start, a.billing_period_end);
    PERFORM ledger.grant_lot(p_account_id, 'monthly_free', p.monthly_credits_micros,
                             'monthly:' || p.id || ':' || util.iso(b.period_start), p.name || ' monthly credits',
                             util.now(), b.period_end);
    v_next_grant := b.period_end;
  END IF;
  UPDATE identity.accounts SET credits_due_at = (
    SELECT min(x) FROM (
      SELECT min(available_at) AS x FROM ledger.credit_lots WHERE account_id = p_account_id AND status = 'pending'
      UNION ALL
      SELECT min(expires_at) FROM ledger.credit_lots WHERE account_id = p_account_id AND status = 'active' AND remaining_micros > 0
      UNION ALL
      SELECT v_next_grant) d)
  WHERE id = p_account_id;
  RETURN true;
END $$;
COMMENT ON FUNCTION ledger.refresh_lots(uuid) IS
  'When the account''s credits_due_at has passed: make pending lots spendable (one ledger transfer each), expire what remains of expired lots (one expiry transfer each, exactly once; credits held by open holds wait for the hold), grant the plan''s monthly credits for the current billing period (once per period, expiring at its end), and set the next credits_due_at. Returns whether it ran. Called with the account locked: lazily by every charge, hold and balance read, and by the worker (api.refresh_due_credits).';

CREATE OR REPLACE FUNCTION api.refresh_due_credits() RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_account uuid;
  v_count integer := 0;
BEGIN
  FOR v_account IN SELECT DISTINCT account_id FROM ledger.credit_lots
                   WHERE coalesce(expires_at, available_at) <= util.now()
                     AND (status = 'pending' OR (status = 'active' AND remaining_micros > 0 AND expires_at IS NOT NULL)) LOOP
    PERFORM 1 FROM identity.accounts WHERE id = v_account FOR NO KEY UPDATE;
    IF ledger.refresh_lots(v_account) THEN
      v_count := v_count + 1;
    END IF;
  END LOOP;
  RETURN v_count;
END $$;
COMMENT ON FUNCTION api.refresh_due_credits() IS
  'pgtally worker (housekeeping): refresh every account with a lot to release or expire (ledger.refresh_lots), one account lock at a time, as a charge would; returns how many accounts it refreshed.';

CREATE OR REPLACE FUNCTION ledger.refreshed_account(p_account_id uuid) RETURNS identity.accounts
LANGUAGE plpgsql AS $$
DECLARE
  a identity.accounts;
BEGIN
  SELECT * INTO a FROM identity.accounts WHERE id = p_account_id;
  IF a.credits_due_at <= util.now() THEN
    PERFORM 1 FROM identity.accounts WHERE id = p_account_id FOR NO KEY UPDATE;
    PERFORM ledger.refresh_lots(p_account_id);
    SELECT * INTO a FROM identity.accounts WHERE id = p_account_id;
  END IF;
  RETURN a;
END $$;
COMMENT ON FUNCTION ledger.refreshed_account(uuid) IS
  'An account row for a read (balance, lots): refreshed first, under its lock, only when a lot is due.';

CREATE OR REPLACE FUNCTION ledger.credits_json(a identity.accounts) RETURNS jsonb
LANGUAGE sql STABLE AS $$
  SELECT jsonb_build_object(
    'pending', util.credits(coalesce((SELECT sum(remaining_micros) FROM ledger.credit_lots
                                      WHERE account_id = a.id AND status = 'pending'), 0)::bigint),
    'next_expiry', (SELECT jsonb_build_object('credits', util.credits(sum(remaining_micros)::bigint), 'at', util.iso(expires_at))
                    FROM ledger.credit_lots
                    WHERE account_id = a.id AND status = 'active' AND remaining_micros > 0
                      AND expires_at = (SELECT min(expires_at) FROM ledger.credit_lots
                                        WHERE account_id = a.id AND status = 'active' AND remaining_micros > 0)
                    GROUP BY expires_at))
$$;
COMMENT ON FUNCTION ledger.credits_json(identity.accounts) IS
  'What GET /v1/balance adds about lots: pending (credits granted, not spendable yet) and next_expiry {credits, at} (null when nothing expires).';

CREATE OR REPLACE FUNCTION api.credit_lots(p_api_key text, p_session_id uuid, p_status text DEFAULT NULL,
                                           p_limit integer DEFAULT 50, p_cursor text DEFAULT NULL,
                                           p_account_id uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_account_id uuid := identity.authenticate(p_api_key, p_session_id, 'usage:read', p_account_id);
  v_rows jsonb;
  v_last uuid;
  v_more boolean;
BEGIN
  IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 100 THEN
    PERFORM util.fail('TL422', 'limit must be between 1 and 100', '{"field": "limit"}');
  END IF;
  IF p_status IS NOT NULL AND p_status NOT IN ('pending', 'active', 'expired', 'canceled') THEN
    PERFORM util.fail('TL422', 'status is pending, active, expired or canceled', '{"field": "status"}');
  END IF;
  IF p_cursor IS NOT NULL AND p_cursor !~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
    PERFORM util.fail('TL422', 'cursor is not one this API returned', '{"field": "cursor"}');
  END IF;
  PERFORM ledger.refreshed_account(v_account_id);
  SELECT jsonb_agg(ledger.lot_json(l) ORDER BY l.id DESC), (array_agg(l.id ORDER BY l.id))[1] INTO v_rows, v_last
  FROM (SELECT * FROM ledger.credit_lots
        WHERE account_id = v_account_id AND (p_status IS NULL OR status = p_status)
          AND id < coalesce(p_cursor::uuid, 'ffffffff-ffff-ffff-ffff-ffffffffffff')
        ORDER BY id DESC LIMIT p_limit) l;
  v_more := v_last IS NOT NULL AND EXISTS (SELECT 1 FROM ledger.credit_lots
                                           WHERE account_id = v_account_id AND (p_status IS NULL OR status = p_status)
                                             AND id < v_last);
  RETURN jsonb_build_object('data', coalesce(v_rows, '[]'), 'has_more', v_more,
                            'next_cursor', CASE WHEN v_more THEN v_last::text END);
END $$;
COMMENT ON FUNCTION api.credit_lots(text, uuid, text, integer, text, uuid) IS
  'GET /v1/credits/lots: the caller''s credit lots, newest first (ledger.lot_json), optionally of one status, p_limit (1-100) per page; pass next_cursor back as p_cursor. Returns {data, has_more, next_cursor}. Principal as api.balance. TL422 bad status, limit or cursor.';

GRANT EXECUTE ON FUNCTION api.credit_lots(text, uuid, text, integer, text, uuid), api.refresh_due_credits() TO pgtally_api;
