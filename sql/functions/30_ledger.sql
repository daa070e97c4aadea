-- The double-entry credit ledger: the only code that changes a credit balance.

CREATE OR REPLACE FUNCTION ledger.lot_source(p_kind text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
  SELECT CASE p_kind WHEN 'grant' THEN 'promotion' WHEN 'plan_credits' THEN 'subscription_grant' ELSE p_kind END
$$;
COMMENT ON FUNCTION ledger.lot_source(text) IS
  'The credit lot source of credits a transfer of kind p_kind brings in: grant -> promotion, plan_credits -> subscription_grant, purchase, adjustment, signup_bonus, monthly_free, referral_reward as they are.';

CREATE OR REPLACE FUNCTION ledger.spend_lots(p_account_id uuid, p_amount_micros bigint, p_first_lot uuid DEFAULT NULL,
                                             OUT first_lot uuid, OUT draws jsonb)
LANGUAGE plpgsql AS $$
DECLARE
  l record;
  v_left bigint := p_amount_micros;
  v_take bigint;
  v_lots uuid[];
  v_takes bigint[];
BEGIN
  -- The burn order: soonest expiry first (never-expiring last), then promotional before paid,
  -- then oldest, as Stripe's credit grants (https://docs.stripe.com/billing/subscriptions/usage-based/billing-credits)
  -- and Lago's wallets (https://getlago.com/docs/guide/wallet-and-prepaid-credits) apply them.
  -- p_first_lot (a refund: the lot the payment bought) goes before all.
  FOR l IN SELECT id, remaining_micros FROM ledger.credit_lots
           WHERE account_id = p_account_id AND status = 'active' AND remaining_micros > 0
           ORDER BY id IS NOT DISTINCT FROM p_first_lot DESC, expires_at ASC NULLS LAST, paid, created_at, id LOOP
    v_take := least(l.remaining_micros, v_left);
    UPDATE ledger.credit_lots SET remaining_micros = remaining_micros - v_take WHERE id = l.id;
    v_left := v_left - v_take;
    IF first_lot IS NULL THEN
      first_lot := l.id;
      EXIT WHEN v_left = 0;              -- (one lot, as most charges: no list)
    END IF;
    v_lots := v_lots || l.id;
    v_takes := v_takes || v_take;
    EXIT WHEN v_left = 0;
  END LOOP;
  IF cardinality(v_lots) > 1 THEN
    SELECT jsonb_agg(jsonb_build_array(x.lot, x.micros) ORDER BY x.n) INTO draws
    FROM unnest(v_lots, v_takes) WITH ORDINALITY x (lot, micros, n);
  END IF;
  IF v_left > 0 THEN
    RAISE EXCEPTION 'the credit lots of account % do not cover its balance', p_account_id
      USING HINT = 'SELECT * FROM reporting.lot_balance_mismatches';
  END IF;
END $$;
COMMENT ON FUNCTION ledger.spend_lots(uuid, bigint, uuid) IS
  'Take p_amount_micros out of an account''s active credit lots in the burn order: p_first_lot first when given, then soonest expiry (never-expiring last), promotional before paid, oldest first. One charge may span several lots: first_lot is the first it drew from, draws ([[lot id, micro-credits], ...] in burn order) lists them when there are several (NULL for one), so a reversal can give the credits back to them (metering.reverse_usage). Called by ledger.post_transfer with the account locked.';

CREATE OR REPLACE FUNCTION ledger.post_transfer(
  p_account_id uuid, p_system_account text, p_amount_micros bigint, p_kind text,
  p_idempotency_key text, p_usage_event_id uuid, p_memo text,
  p_expires_at timestamptz DEFAULT NULL, p_lots boolean DEFAULT true, p_first_lot uuid DEFAULT NULL,
  OUT transfer_id uuid, OUT balance_after_micros bigint, OUT created_at timestamptz,
  OUT lot_id uuid, OUT lot_draws jsonb)
LANGUAGE plpgsql AS $$
BEGIN
  -- The balance update is the overdraft guard: it matches no row when the balance would go
  -- below what open holds reserve (never negative), or past what a bigint holds (compared in
  -- numeric, so the guard cannot overflow).
  UPDATE identity.accounts a
  SET credit_balance_micros = a.credit_balance_micros + p_amount_micros
  WHERE a.id = p_account_id
    AND a.credit_balance_micros::numeric + p_amount_micros BETWEEN a.held_micros AND 9223372036854775807
  RETURNING a.credit_balance_micros INTO balance_after_micros;
  IF NOT FOUND THEN
    IF p_amount_micros > 0 AND EXISTS (SELECT 1 FROM identity.accounts WHERE id = p_account_id) THEN
      PERFORM util.fail('TL422', 'the balance would exceed the largest amount pgtally can hold (9223372036854.775807 credits)');
    END IF;
    IF EXISTS (SELECT 1 FROM identity.accounts WHERE id = p_account_id) THEN
      PERFORM util.fail('TL402', 'not enough credits',
        jsonb_build_object('required_credits', util.credits(-p_amount_micros),
                           'balance', (SELECT util.credits(credit_balance_micros - held_micros) FROM identity.accounts WHERE id = p_account_id)));
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
  IF NOT p_lots THEN
    RETURN;
  ELSIF p_amount_micros > 0 THEN
    INSERT INTO ledger.credit_lots (account_id, source, amount_micros, remaining_micros, status, grant_key, transfer_id,
                                    available_at, expires_at, created_at, memo)
    VALUES (p_account_id, ledger.lot_source(p_kind), p_amount_micros, p_amount_micros, 'active',
            coalesce(p_idempotency_key, 'transfer:' || transfer_id), transfer_id, created_at, p_expires_at, created_at,
            left(p_memo, 500));
    IF p_expires_at IS NOT NULL THEN
      UPDATE identity.accounts SET credits_due_at = least(credits_due_at, p_expires_at) WHERE id = p_account_id;
    END IF;
  ELSE
    SELECT x.first_lot, x.draws INTO lot_id, lot_draws FROM ledger.spend_lots(p_account_id, -p_amount_micros, p_first_lot) x;
  END IF;
END $$;
COMMENT ON FUNCTION ledger.post_transfer(uuid, text, bigint, text, text, uuid, text, timestamptz, boolean, uuid) IS
  'Move p_amount_micros into a customer account (negative: out of it) from/to a system account: updates the cached balance and writes the transfer and its two entries; credits in become a credit lot (source from p_kind, expiring at p_expires_at), credits out are taken from the lots in the burn order (ledger.spend_lots; p_first_lot first), returned as lot_id and lot_draws (spend_lots'' first_lot and draws). p_lots = false leaves the lots to the caller (releasing a pending lot, expiring one, moving lots at a device merge). TL402 when the balance would go below what holds reserve (or negative), TL422 when it would pass the bigint maximum, TL404 for an unknown account. Callers lock the account first.';

CREATE OR REPLACE FUNCTION ledger.entry_json(t ledger.transfers, p_amount_micros bigint,
                                             p_balance_after_micros bigint, p_created_at timestamptz)
RETURNS jsonb
LANGUAGE sql STABLE AS $$
  SELECT jsonb_build_object(
    'transfer_id', t.id, 'kind', t.kind, 'amount', util.credits(p_amount_micros),
    'balance_after', util.credits(p_balance_after_micros), 'usage_event_id', t.usage_event_id,
    'memo', t.memo, 'created_at', util.iso(p_created_at))
$$;
COMMENT ON FUNCTION ledger.entry_json(ledger.transfers, bigint, bigint, timestamptz) IS
  'A customer ledger entry as the API shows it: {transfer_id, kind, amount, balance_after, usage_event_id, memo, created_at}, credits as decimal strings.';

CREATE OR REPLACE FUNCTION ledger.operator_transfer(p_account_id uuid, p_system_account text, p_kind text,
                                                   p_amount_micros bigint, p_idempotency_key text, p_memo text,
                                                   OUT replayed boolean, OUT body jsonb)
LANGUAGE plpgsql AS $$
DECLARE
  v_transfer ledger.transfers;
BEGIN
  IF p_idempotency_key IS NULL OR length(p_idempotency_key) NOT BETWEEN 1 AND 255 THEN
    PERFORM util.fail('TL422', 'an idempotency key of 1 to 255 characters is required');
  END IF;
  IF length(p_memo) > 500 THEN
    PERFORM util.fail('TL422', 'a memo has at most 500 characters');
  END IF;
  PERFORM 1 FROM identity.accounts WHERE id = p_account_id FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    PERFORM util.fail('TL404', format('no account %s', p_account_id));
  END IF;
  SELECT * INTO v_transfer FROM ledger.transfers
  WHERE account_id = p_account_id AND idempotency_key = p_idempotency_key;
  IF FOUND THEN                         -- a replay, or TL42R for another transfer
    PERFORM util.idempotency_check(convert_to(v_transfer.kind || ' ' || v_transfer.amount_micros, 'UTF8'),
                                   convert_to(p_kind || ' ' || p_amount_micros, 'UTF8'), 'transfer',
                                   jsonb_build_object('transfer_id', v_transfer.id));
    replayed := true;
  ELSE
    PERFORM ledger.post_transfer(p_account_id, p_system_account, p_amount_micros, p_kind, p_idempotency_key, NULL, p_memo);
    SELECT * INTO v_transfer FROM ledger.transfers
    WHERE account_id = p_account_id AND idempotency_key = p_idempotency_key;
    replayed := false;
  END IF;
  SELECT ledger.entry_json(v_transfer, e.amount_micros, e.balance_after_micros, e.created_at)
         || jsonb_build_object('account_id', p_account_id)
  INTO body
  FROM ledger.entries e WHERE e.transfer_id = v_transfer.id AND e.account_id IS NOT NULL;
END $$;
COMMENT ON FUNCTION ledger.operator_transfer(uuid, text, text, bigint, text, text) IS
  'An operator''s transfer, once per idempotency key: a retry returns the original entry with replayed = true; the same key for another amount or kind is TL42R (util.idempotency_check). TL404 unknown account, TL422 bad key or memo, TL402 when it would take the balance below zero.';

CREATE OR REPLACE FUNCTION api.grant_credits(p_account_id uuid, p_amount_micros bigint,
                                             p_idempotency_key text, p_memo text DEFAULT NULL)
RETURNS TABLE (replayed boolean, body jsonb)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF p_amount_micros IS NULL OR p_amount_micros <= 0 THEN
    PERFORM util.fail('TL422', 'a grant is a positive amount of credits');
  END IF;
  RETURN QUERY SELECT * FROM ledger.operator_transfer(p_account_id, 'grants', 'grant', p_amount_micros,
                                                      p_idempotency_key, p_memo);
END $$;
COMMENT ON FUNCTION api.grant_credits(uuid, bigint, text, text) IS
  'pgtally credits grant: grant credits (micro-credits) to an account from the grants system account, once per idempotency key (ledger.operator_transfer). TL404 unknown account, TL42R key reused for another amount, TL422 bad amount or key. Operators only (not granted to pgtally_api).';

CREATE OR REPLACE FUNCTION api.adjust_credits(p_account_id uuid, p_amount_micros bigint,
                                              p_idempotency_key text, p_reason text)
RETURNS TABLE (replayed boolean, body jsonb)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF p_amount_micros IS NULL OR p_amount_micros = 0 THEN
    PERFORM util.fail('TL422', 'an adjustment is a non-zero amount of credits (negative takes credits back)');
  END IF;
  IF p_reason IS NULL OR length(btrim(p_reason)) = 0 THEN
    PERFORM util.fail('TL422', 'an adjustment needs a reason');
  END IF;
  RETURN QUERY SELECT * FROM ledger.operator_transfer(p_account_id, 'adjustments', 'adjustment', p_amount_micros,
                                                      p_idempotency_key, btrim(p_reason));
END $$;
COMMENT ON FUNCTION api.adjust_credits(uuid, bigint, text, text) IS
  'pgtally credits adjust: add (positive) or take back (negative) micro-credits through the adjustments system account, with a reason, once per idempotency key. Never below a zero balance (TL402). TL404 unknown account, TL42R key reused, TL422 zero amount or no reason. Operators only.';

CREATE OR REPLACE FUNCTION api.account_summary(p_account_id uuid) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  a identity.accounts;
BEGIN
  SELECT * INTO a FROM identity.accounts WHERE id = p_account_id;
  IF NOT FOUND THEN
    PERFORM util.fail('TL404', format('no account %s', p_account_id));
  END IF;
  RETURN jsonb_build_object(
    'account_id', a.id, 'kind', a.kind, 'name', a.name, 'plan', identity.effective_plan(a), 'subscribed_plan', a.plan_id,
    'credits', util.credits(a.credit_balance_micros), 'created_at', util.iso(a.created_at),
    'email', (SELECT email FROM identity.users WHERE account_id = a.id), 'merged_into', a.merged_into,
    'stripe_customer_id', (SELECT stripe_customer_id FROM billing.customers WHERE account_id = a.id),
    'allowances', metering.allowances_json(a),
    'api_keys', (SELECT count(*) FROM identity.api_keys WHERE account_id = a.id AND revoked_at IS NULL),
    'usage_events', (SELECT count(*) FROM metering.usage_events WHERE account_id = a.id));
END $$;
COMMENT ON FUNCTION api.account_summary(uuid) IS
  'pgtally accounts show: an account for an operator: {account_id, kind, name, plan, subscribed_plan, credits, created_at, email, merged_into, stripe_customer_id, allowances, api_keys (live), usage_events (count)}. TL404 unknown account. Operators only.';

CREATE OR REPLACE FUNCTION api.accounts_list(p_limit integer DEFAULT 50, p_plan text DEFAULT NULL)
RETURNS TABLE (account_id uuid, kind text, plan text, credits text, email text, created_at text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT a.id, a.kind, identity.effective_plan(a), util.credits(a.credit_balance_micros), u.email, util.iso(a.created_at)
  FROM identity.accounts a LEFT JOIN identity.users u ON u.account_id = a.id
  WHERE a.merged_into IS NULL AND (p_plan IS NULL OR a.plan_id = p_plan)
  ORDER BY a.created_at DESC, a.id DESC
  LIMIT least(greatest(p_limit, 1), 10000)
$$;
COMMENT ON FUNCTION api.accounts_list(integer, text) IS
  'pgtally accounts list: the newest accounts (not merged devices), optionally of one plan, at most p_limit (1-10,000). Operators only.';

CREATE OR REPLACE FUNCTION api.balance(p_api_key text, p_session_id uuid, p_account_id uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_account_id uuid;
  v_account identity.accounts;
BEGIN
  -- authenticate is volatile (it keeps last_used_at): call it once, never inside a WHERE clause.
  v_account_id := identity.authenticate(p_api_key, p_session_id, 'usage:read', p_account_id);
  v_account := ledger.refreshed_account(v_account_id);
  RETURN jsonb_build_object(
    'account_id', v_account.id,
    'plan', identity.effective_plan(v_account),
    'credits', util.credits(v_account.credit_balance_micros),
    'held', util.credits(v_account.held_micros),
    'available', util.credits(v_account.credit_balance_micros - v_account.held_micros),
    'allowances', metering.allowances_json(v_account),
    'spending', metering.spending_json(v_account))
    || ledger.credits_json(v_account);
END $$;
COMMENT ON FUNCTION api.balance(text, uuid, uuid) IS
  'GET /v1/balance: the caller''s credit balance (credits: the spendable lots; held: reserved by open holds; available: what a charge may spend; pending: granted lots not spendable yet; next_expiry {credits, at}: what expires next) and, per entitled meter, the current period''s allowance ({kind, unit, period, limit, used, remaining, resets_at}), and for a post-paid plan its spending this billing period (metering.spending_json; null otherwise). Principal: API key (scope usage:read) or session id; p_account_id for service keys. TL401/TL403/TL404 as identity.authenticate.';

CREATE OR REPLACE FUNCTION api.ledger(p_api_key text, p_session_id uuid, p_cursor text DEFAULT NULL,
                                      p_limit integer DEFAULT 20, p_account_id uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_account_id uuid := identity.authenticate(p_api_key, p_session_id, 'usage:read', p_account_id);
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
END $$;
COMMENT ON FUNCTION api.ledger(text, uuid, text, integer, uuid) IS
  'GET /v1/ledger: the caller''s ledger entries, newest first, p_limit (1-100) per page; pass next_cursor back as p_cursor for the next page. Returns {data, has_more, next_cursor}. Principal as api.balance. TL422 bad limit or cursor.';
