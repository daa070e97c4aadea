-- The operators' console: staff (identity.users.staff_role) search and inspect accounts and act
-- on them; every action writes its ops.audit_log row in its own transaction.

CREATE OR REPLACE FUNCTION identity.staff(p_session_id uuid, p_action text) RETURNS identity.users
LANGUAGE plpgsql AS $$
DECLARE
  u identity.users := identity.member_user(p_session_id);
BEGIN
  IF u.staff_role IS NULL THEN
    PERFORM util.fail('TL403', 'staff only');
  END IF;
  -- support reads and grants (within a limit, checked by the action); admin does everything.
  IF u.staff_role = 'support' AND p_action NOT IN ('read', 'adjust_credits') THEN
    PERFORM util.fail('TL403', format('%s needs the admin staff role', p_action), jsonb_build_object('staff_role', u.staff_role));
  END IF;
  RETURN u;
END $$;
COMMENT ON FUNCTION identity.staff(uuid, text) IS
  'The signed-in staff user for an admin action: read (support, admin), adjust_credits (support: grants up to 50 credits; admin: any), refund, set_plan, suspend, unsuspend, revoke_sessions (admin). TL403 for customers and for support doing an admin''s action.';

CREATE OR REPLACE FUNCTION ops.audit(p_staff identity.users, p_action text, p_account_id uuid, p_user_id uuid,
                                     p_reason text, p_before jsonb, p_after jsonb) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
  v_id bigint;
BEGIN
  IF p_reason IS NULL OR length(btrim(p_reason)) = 0 THEN
    PERFORM util.fail('TL422', 'every staff action needs a reason', '{"field": "reason"}');
  END IF;
  INSERT INTO ops.audit_log (at, staff_user_id, staff_role, action, target_account_id, target_user_id, reason, before, after)
  VALUES (util.now(), p_staff.id, p_staff.staff_role, p_action, p_account_id, p_user_id, left(btrim(p_reason), 500),
          p_before, p_after)
  RETURNING id INTO v_id;
  RETURN v_id;
END $$;
COMMENT ON FUNCTION ops.audit(identity.users, text, uuid, uuid, text, jsonb, jsonb) IS
  'Append a staff action to ops.audit_log (in the caller''s transaction: the action and its record commit together). TL422 without a reason.';

CREATE OR REPLACE FUNCTION api.admin_search(p_session_id uuid, p_query text, p_limit integer DEFAULT 50) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_staff identity.users := identity.staff(p_session_id, 'read');
  q text := btrim(coalesce(p_query, ''));
BEGIN
  RETURN jsonb_build_object('data', coalesce((
    SELECT jsonb_agg(x ORDER BY x ->> 'created_at' DESC) FROM (
      SELECT identity.account_json(a, NULL) || jsonb_build_object(
               'email', (SELECT u.email FROM identity.users u WHERE u.account_id = a.id),
               'stripe_customer_id', (SELECT c.stripe_customer_id FROM billing.customers c WHERE c.account_id = a.id)) AS x
      FROM identity.accounts a
      WHERE a.merged_into IS NULL AND (
            q = ''
         OR a.id::text = q
         OR a.name ILIKE '%' || q || '%'
         OR EXISTS (SELECT 1 FROM identity.users u JOIN identity.memberships m ON m.user_id = u.id
                    WHERE m.account_id = a.id AND u.email_normalized LIKE '%' || lower(q) || '%')
         OR EXISTS (SELECT 1 FROM billing.customers c WHERE c.account_id = a.id AND c.stripe_customer_id = q))
      ORDER BY a.created_at DESC LIMIT least(greatest(coalesce(p_limit, 50), 1), 200)) r), '[]'));
END $$;
COMMENT ON FUNCTION api.admin_search(uuid, text, integer) IS
  'GET /v1/admin/accounts?q=: accounts by id, name, a member''s email (part of it) or Stripe customer id, newest first (staff: read).';

CREATE OR REPLACE FUNCTION api.admin_account(p_session_id uuid, p_account_id uuid) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_staff identity.users := identity.staff(p_session_id, 'read');
  a identity.accounts;
BEGIN
  SELECT * INTO a FROM identity.accounts WHERE id = p_account_id;
  IF NOT FOUND THEN
    PERFORM util.fail('TL404', format('no account %s', p_account_id));
  END IF;
  RETURN identity.account_json(a, NULL) || jsonb_build_object(
    'subscribed_plan', a.plan_id, 'held', util.credits(a.held_micros),
    'suspended_at', util.iso(a.suspended_at), 'suspended_reason', a.suspended_reason,
    'stripe_customer_id', (SELECT stripe_customer_id FROM billing.customers WHERE account_id = a.id),
    'members', coalesce((SELECT jsonb_agg(jsonb_build_object('user_id', u.id, 'email', u.email, 'role', m.role,
                                                             'email_verified', u.email_verified_at IS NOT NULL))
                         FROM identity.memberships m JOIN identity.users u ON u.id = m.user_id WHERE m.account_id = a.id), '[]'),
    'allowances', metering.allowances_json(a),
    'lots', coalesce((SELECT jsonb_agg(ledger.lot_json(l) ORDER BY l.id DESC)
                      FROM (SELECT * FROM ledger.credit_lots WHERE account_id = a.id ORDER BY id DESC LIMIT 20) l), '[]'),
    'usage_events', coalesce((SELECT jsonb_agg(metering.event_json(e) ORDER BY e.id DESC)
                              FROM (SELECT * FROM metering.usage_events WHERE account_id = a.id ORDER BY id DESC LIMIT 20) e), '[]'),
    'ledger', coalesce((SELECT jsonb_agg(ledger.entry_json(t, e.amount_micros, e.balance_after_micros, e.created_at) ORDER BY e.id DESC)
                        FROM (SELECT * FROM ledger.entries WHERE account_id = a.id ORDER BY id DESC LIMIT 20) e
                        JOIN ledger.transfers t ON t.id = e.transfer_id), '[]'),
    'holds', coalesce((SELECT jsonb_agg(metering.hold_json(h) ORDER BY h.id DESC)
                       FROM metering.holds h WHERE h.account_id = a.id AND h.status = 'open'), '[]'),
    'subscriptions', coalesce((SELECT jsonb_agg(jsonb_build_object('id', s.stripe_subscription_id, 'status', s.status,
                                                                   'plan', s.plan_id, 'current_period_end', util.iso(s.current_period_end),
                                                                   'cancel_at_period_end', s.cancel_at_period_end))
                               FROM billing.subscriptions s WHERE s.account_id = a.id), '[]'),
    'payments', coalesce((SELECT jsonb_agg(jsonb_build_object('payment_intent', p.stripe_payment_intent_id, 'price', p.price_id,
                                                              'amount', p.amount_minor, 'currency', p.currency,
                                                              'refunded', p.refunded_minor, 'paid_at', util.iso(p.paid_at))
                                           ORDER BY p.paid_at DESC)
                          FROM billing.payments p WHERE p.account_id = a.id), '[]'),
    'referrals', coalesce((SELECT jsonb_agg(jsonb_build_object('referee_account_id', r.referee_account_id, 'status', r.status,
                                                               'rejected_reason', r.rejected_reason))
                           FROM billing.referrals r WHERE r.referrer_account_id = a.id OR r.referee_account_id = a.id), '[]'),
    'auth_events', coalesce((SELECT jsonb_agg(jsonb_build_object('kind', e.kind, 'ip', e.ip, 'at', util.iso(e.created_at)) ORDER BY e.id DESC)
                             FROM (SELECT * FROM identity.auth_events WHERE account_id = a.id ORDER BY id DESC LIMIT 20) e), '[]'),
    'webhook_events', coalesce((SELECT jsonb_agg(jsonb_build_object('id', x.id, 'type', x.type, 'status', x.status,
                                                                    'received_at', util.iso(x.received_at)) ORDER BY x.received_at DESC)
                                FROM (SELECT * FROM billing.stripe_events x
                                      WHERE x.payload #>> '{data,object,customer}' = (SELECT stripe_customer_id FROM billing.customers WHERE account_id = a.id)
                                      ORDER BY x.received_at DESC LIMIT 20) x), '[]'),
    'audit', coalesce((SELECT jsonb_agg(to_jsonb(l) ORDER BY l.id DESC)
                       FROM (SELECT * FROM reporting.audit_log WHERE target_account_id = a.id ORDER BY id DESC LIMIT 20) l), '[]'));
END $$;
COMMENT ON FUNCTION api.admin_account(uuid, uuid) IS
  'GET /v1/admin/accounts/{id} (staff: read): the account with its members, plan, balance, allowances, and the latest 20 lots, usage events, ledger entries, auth events, webhook events and staff actions; its open holds, subscriptions, payments and referrals. TL404.';

CREATE OR REPLACE FUNCTION api.admin_adjust_credits(p_session_id uuid, p_account_id uuid, p_amount text,
                                                    p_idempotency_key text, p_reason text)
RETURNS TABLE (replayed boolean, body jsonb)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_staff identity.users := identity.staff(p_session_id, 'adjust_credits');
  p_amount_micros bigint := billing.signed_to_micros(p_amount, 'amount');
  v_before bigint := (SELECT credit_balance_micros FROM identity.accounts WHERE id = p_account_id);
  r record;
BEGIN
  IF p_amount_micros IS NULL OR p_amount_micros = 0 THEN
    PERFORM util.fail('TL422', 'an adjustment is a non-zero amount of credits', '{"field": "amount"}');
  END IF;
  IF v_staff.staff_role = 'support' AND (p_amount_micros < 0 OR p_amount_micros > 50000000) THEN
    PERFORM util.fail('TL403', 'support grants at most 50 credits at a time and takes none back: ask an admin');
  END IF;
  SELECT * INTO r FROM ledger.operator_transfer(p_account_id, 'adjustments', 'adjustment', p_amount_micros,
                                                p_idempotency_key, btrim(p_reason));
  IF NOT r.replayed THEN
    PERFORM ops.audit(v_staff, 'adjust_credits', p_account_id, NULL, p_reason,
                      jsonb_build_object('credits', util.credits(v_before)),
                      jsonb_build_object('credits', util.credits(v_before + p_amount_micros),
                                         'transfer_id', r.body ->> 'transfer_id', 'amount', util.credits(p_amount_micros)));
  END IF;
  replayed := r.replayed;
  body := r.body;
  RETURN NEXT;
END $$;
COMMENT ON FUNCTION api.admin_adjust_credits(uuid, uuid, text, text, text) IS
  'POST /v1/admin/accounts/{id}/credits: add (positive) or take back (negative) p_amount credits (a plain decimal, -5 or 2.5) with a reason, once per idempotency key (a retry replays it), never below zero (TL402); audited. Support may grant up to 50 credits (TL403 beyond). TL404, TL42R key reused, TL422.';

CREATE OR REPLACE FUNCTION api.admin_refund_target(p_session_id uuid, p_payment_intent text, p_amount bigint DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_staff identity.users := identity.staff(p_session_id, 'refund');
  p billing.payments;
  v_left bigint;
BEGIN
  SELECT * INTO p FROM billing.payments WHERE stripe_payment_intent_id = p_payment_intent;
  IF NOT FOUND THEN
    PERFORM util.fail('TL404', 'no payment pgtally recorded with this PaymentIntent');
  END IF;
  v_left := p.amount_minor - p.refunded_minor;
  IF coalesce(p_amount, v_left) NOT BETWEEN 1 AND v_left THEN
    PERFORM util.fail('TL422', format('between 1 and %s (minor units) is left to refund', v_left), '{"field": "amount"}');
  END IF;
  RETURN jsonb_build_object('payment_intent', p.stripe_payment_intent_id, 'account_id', p.account_id,
                            'amount', coalesce(p_amount, v_left), 'refunded', p.refunded_minor, 'currency', p.currency);
END $$;
COMMENT ON FUNCTION api.admin_refund_target(uuid, text, bigint) IS
  'POST /v1/admin/refunds, step 1 (staff: admin): the recorded payment to refund and how much: p_amount (minor units), or all that is left when NULL; refunded so far. TL404 unknown payment, TL422 more than is left (or nothing).';

CREATE OR REPLACE FUNCTION api.admin_refunded(p_session_id uuid, p_payment_intent text, p_amount bigint,
                                              p_stripe_refund text, p_reason text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_staff identity.users := identity.staff(p_session_id, 'refund');
  p billing.payments;
BEGIN
  SELECT * INTO p FROM billing.payments WHERE stripe_payment_intent_id = p_payment_intent;
  PERFORM ops.audit(v_staff, 'refund', p.account_id, NULL, p_reason,
                    jsonb_build_object('payment_intent', p_payment_intent, 'amount', p.amount_minor, 'refunded', p.refunded_minor),
                    jsonb_build_object('refund', p_stripe_refund, 'amount', p_amount));
  RETURN jsonb_build_object('refund', p_stripe_refund, 'payment_intent', p_payment_intent, 'amount', p_amount,
                            'status', 'refunded: the credits come back out with Stripe''s charge.refunded event');
END $$;
COMMENT ON FUNCTION api.admin_refunded(uuid, text, bigint, text, text) IS
  'POST /v1/admin/refunds, step 2, after Stripe accepted the refund: the audit row. The credits are taken back by the charge.refunded webhook, as for any refund.';

CREATE OR REPLACE FUNCTION api.admin_set_plan(p_session_id uuid, p_account_id uuid, p_plan text, p_reason text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_staff identity.users := identity.staff(p_session_id, 'set_plan');
  a identity.accounts;
BEGIN
  SELECT * INTO a FROM identity.accounts WHERE id = p_account_id FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    PERFORM util.fail('TL404', format('no account %s', p_account_id));
  END IF;
  IF NOT EXISTS (SELECT 1 FROM billing.plans WHERE id = p_plan AND active) THEN
    PERFORM util.fail('TL422', format('there is no active plan %L', p_plan), '{"field": "plan"}');
  END IF;
  UPDATE identity.accounts SET plan_id = p_plan, plan_grace_until = NULL,
    credits_due_at = CASE WHEN (SELECT monthly_credits_micros FROM billing.plans WHERE id = p_plan) > 0
                          THEN least(credits_due_at, util.now()) ELSE credits_due_at END
  WHERE id = p_account_id;
  PERFORM ops.audit(v_staff, 'set_plan', p_account_id, NULL, p_reason, jsonb_build_object('plan', a.plan_id),
                    jsonb_build_object('plan', p_plan));
  RETURN api.admin_account(p_session_id, p_account_id);
END $$;
COMMENT ON FUNCTION api.admin_set_plan(uuid, uuid, text, text) IS
  'POST /v1/admin/accounts/{id}/plan (staff: admin): put the account on a plan without Stripe (a comp); audited. A later Stripe subscription event for the account sets its plan again. TL404, TL422.';

CREATE OR REPLACE FUNCTION api.admin_suspend(p_session_id uuid, p_account_id uuid, p_suspend boolean, p_reason text)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_staff identity.users := identity.staff(p_session_id, CASE WHEN p_suspend THEN 'suspend' ELSE 'unsuspend' END);
  a identity.accounts;
BEGIN
  SELECT * INTO a FROM identity.accounts WHERE id = p_account_id FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    PERFORM util.fail('TL404', format('no account %s', p_account_id));
  END IF;
  UPDATE identity.accounts
  SET suspended_at = CASE WHEN p_suspend THEN coalesce(suspended_at, util.now()) END,
      suspended_reason = CASE WHEN p_suspend THEN left(btrim(p_reason), 500) END
  WHERE id = p_account_id;
  PERFORM ops.audit(v_staff, CASE WHEN p_suspend THEN 'suspend' ELSE 'unsuspend' END, p_account_id, NULL, p_reason,
                    jsonb_build_object('suspended', a.suspended_at IS NOT NULL), jsonb_build_object('suspended', p_suspend));
  RETURN api.admin_account(p_session_id, p_account_id);
END $$;
COMMENT ON FUNCTION api.admin_suspend(uuid, uuid, boolean, text) IS
  'POST /v1/admin/accounts/{id}/suspend and /unsuspend (staff: admin): while suspended every charge, hold, purchase and key of the account is refused (403 account-suspended, with the reason); audited. TL404, TL422.';

CREATE OR REPLACE FUNCTION api.admin_revoke_sessions(p_session_id uuid, p_user_id uuid, p_reason text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_staff identity.users := identity.staff(p_session_id, 'revoke_sessions');
  v_count integer;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM identity.users WHERE id = p_user_id) THEN
    PERFORM util.fail('TL404', 'no such user');
  END IF;
  UPDATE identity.sessions SET revoked_at = util.now(), revoked_reason = 'staff'
  WHERE user_id = p_user_id AND revoked_at IS NULL;
  GET DIAGNOSTICS v_count = ROW_COUNT;
  PERFORM ops.audit(v_staff, 'revoke_sessions', (SELECT account_id FROM identity.users WHERE id = p_user_id), p_user_id,
                    p_reason, NULL, jsonb_build_object('sessions_revoked', v_count));
  RETURN jsonb_build_object('user_id', p_user_id, 'sessions_revoked', v_count);
END $$;
COMMENT ON FUNCTION api.admin_revoke_sessions(uuid, uuid, text) IS
  'POST /v1/admin/users/{id}/revoke-sessions (staff: admin): sign the user out everywhere (every session and its refresh tokens); audited. TL404.';

CREATE OR REPLACE FUNCTION api.admin_audit(p_session_id uuid, p_limit integer DEFAULT 100) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_staff identity.users := identity.staff(p_session_id, 'read');
BEGIN
  RETURN jsonb_build_object('data', coalesce((
    SELECT jsonb_agg(to_jsonb(l) ORDER BY l.id DESC)
    FROM (SELECT * FROM reporting.audit_log ORDER BY id DESC LIMIT least(greatest(coalesce(p_limit, 100), 1), 1000)) l), '[]'));
END $$;
COMMENT ON FUNCTION api.admin_audit(uuid, integer) IS 'GET /v1/admin/audit: the latest staff actions (staff: read).';

GRANT EXECUTE ON FUNCTION api.admin_search(uuid, text, integer), api.admin_account(uuid, uuid),
  api.admin_adjust_credits(uuid, uuid, text, text, text), api.admin_refund_target(uuid, text, bigint),
  api.admin_refunded(uuid, text, bigint, text, text), api.admin_set_plan(uuid, uuid, text, text),
  api.admin_suspend(uuid, uuid, boolean, text), api.admin_revoke_sessions(uuid, uuid, text), api.admin_audit(uuid, integer)
TO pgtally_api;

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

GRANT EXECUTE ON FUNCTION api.staff_role(uuid), api.metrics_report(uuid, text) TO pgtally_api;
