-- Auto top-up: a charge that leaves the balance below the account's threshold queues one
-- top-up (an outbox task, in the charge's own transaction); the worker pays it off-session with
-- the saved card; the credits arrive only with Stripe's payment_intent.succeeded, exactly once.

CREATE OR REPLACE FUNCTION billing.auto_topup_json(t billing.auto_topups) RETURNS jsonb
LANGUAGE sql STABLE AS $$
  SELECT jsonb_build_object('enabled', coalesce(t.enabled, false), 'below', util.credits(t.below_micros),
                            'bundle', t.price_id, 'failures', coalesce(t.failures, 0),
                            'in_flight', t.in_flight_since IS NOT NULL, 'last_error', t.last_error)
$$;
COMMENT ON FUNCTION billing.auto_topup_json(billing.auto_topups) IS
  'Auto top-up settings as the API shows them: {enabled, below (credits), bundle, failures, in_flight, last_error}.';

CREATE OR REPLACE FUNCTION api.set_auto_topup(p_api_key text, p_session_id uuid, p_below text, p_bundle text,
                                              p_account_id uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_account_id uuid := identity.authenticate(p_api_key, p_session_id, 'billing:manage', p_account_id);
  p_below_micros bigint := billing.to_micros(to_jsonb(p_below), 'below');
  t billing.auto_topups;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM billing.prices WHERE id = p_bundle AND active AND credits_micros IS NOT NULL) THEN
    PERFORM util.fail('TL422', format('there is no credit bundle %L', p_bundle), '{"field": "buy"}');
  END IF;
  IF p_below_micros IS NULL OR p_below_micros < 0 THEN
    PERFORM util.fail('TL422', 'below is a non-negative amount of credits', '{"field": "below"}');
  END IF;
  IF NOT EXISTS (SELECT 1 FROM billing.customers WHERE account_id = v_account_id) THEN
    PERFORM util.fail('TL40C', 'buy something once through Checkout first: auto top-up pays with the card saved then');
  END IF;
  PERFORM 1 FROM identity.accounts WHERE id = v_account_id FOR NO KEY UPDATE;
  INSERT INTO billing.auto_topups AS x (account_id, below_micros, price_id, enabled, failures, updated_at)
  VALUES (v_account_id, p_below_micros, p_bundle, true, 0, util.now())
  ON CONFLICT (account_id) DO UPDATE SET below_micros = EXCLUDED.below_micros, price_id = EXCLUDED.price_id,
    enabled = true, failures = 0, last_error = NULL, updated_at = EXCLUDED.updated_at,
    -- Turned on again after being off: whatever was in flight then is forgotten (its task pays nothing).
    in_flight_since = CASE WHEN x.enabled THEN x.in_flight_since END, task_id = CASE WHEN x.enabled THEN x.task_id END
  RETURNING * INTO t;
  UPDATE identity.accounts SET auto_topup_below_micros = p_below_micros WHERE id = v_account_id;
  RETURN billing.auto_topup_json(t);
END $$;
COMMENT ON FUNCTION api.set_auto_topup(text, uuid, text, text, uuid) IS
  'PUT /v1/billing/auto-topup (permission billing:manage; p_account_id: a team): when a charge leaves the balance below p_below credits (a plain decimal), buy the bundle p_bundle with the saved card (at most one in flight; turning it on after it was off clears a top-up left in flight). Needs a Stripe customer (an earlier Checkout, TL40C). TL422 not a bundle or a negative threshold.';

CREATE OR REPLACE FUNCTION api.auto_topup(p_api_key text, p_session_id uuid, p_enabled boolean DEFAULT NULL,
                                          p_account_id uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_account_id uuid := identity.authenticate(p_api_key, p_session_id,
                                             CASE WHEN p_enabled IS NULL THEN 'billing:read' ELSE 'billing:manage' END, p_account_id);
  t billing.auto_topups;
BEGIN
  IF p_enabled = false THEN
    PERFORM 1 FROM identity.accounts WHERE id = v_account_id FOR NO KEY UPDATE;
    UPDATE billing.auto_topups SET enabled = false, in_flight_since = NULL, task_id = NULL, updated_at = util.now()
    WHERE account_id = v_account_id;
    UPDATE identity.accounts SET auto_topup_below_micros = NULL WHERE id = v_account_id;
  END IF;
  SELECT * INTO t FROM billing.auto_topups WHERE account_id = v_account_id;
  RETURN billing.auto_topup_json(t);
END $$;
COMMENT ON FUNCTION api.auto_topup(text, uuid, boolean, uuid) IS
  'GET /v1/billing/auto-topup (p_enabled NULL; billing:read) and DELETE (p_enabled false: turn it off, forgetting any top-up in flight, whose queued task then pays nothing; billing:manage): the settings. p_account_id: a team.';

CREATE OR REPLACE FUNCTION billing.enqueue_auto_topup(p_account_id uuid) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
  t billing.auto_topups;
  v_task uuid;
BEGIN
  -- The claim: one top-up in flight at a time, whatever the number of charges under the threshold.
  UPDATE billing.auto_topups SET in_flight_since = util.now()
  WHERE account_id = p_account_id AND enabled AND in_flight_since IS NULL
  RETURNING * INTO t;
  IF t.account_id IS NOT NULL THEN
    INSERT INTO outbox.messages (kind, recipient, payload, created_at, next_attempt_at)
    VALUES ('auto_topup', p_account_id::text, jsonb_build_object('account_id', p_account_id, 'price', t.price_id),
            util.now(), util.now())
    RETURNING id INTO v_task;
    UPDATE billing.auto_topups SET task_id = v_task, stripe_payment_intent_id = NULL WHERE account_id = p_account_id;
  END IF;
END $$;
COMMENT ON FUNCTION billing.enqueue_auto_topup(uuid) IS
  'Called by the charge that left the balance under the threshold, in its transaction: queue one auto top-up (outbox task auto_topup, remembered as billing.auto_topups.task_id) unless one is in flight.';

CREATE OR REPLACE FUNCTION api.auto_topup_payment(p_account_id uuid, p_task_id uuid) RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  -- plpgsql (checked when run): task_id is younger than some migration levels the functions are applied at.
  RETURN (SELECT jsonb_build_object('account_id', t.account_id, 'stripe_customer_id', c.stripe_customer_id,
                            'price', p.id, 'amount', p.amount_minor, 'currency', p.currency,
                            'stripe_idempotency_key', 'auto-topup-' || t.task_id)
  FROM billing.auto_topups t JOIN billing.prices p ON p.id = t.price_id
  JOIN billing.customers c ON c.account_id = t.account_id
  WHERE t.account_id = p_account_id AND t.enabled AND t.task_id = p_task_id);
END $$;
COMMENT ON FUNCTION api.auto_topup_payment(uuid, uuid) IS
  'pgtally worker: what the auto top-up task p_task_id pays (customer, bundle, amount in minor units, currency, and Stripe''s idempotency key auto-topup-<task id>); NULL when auto top-up was turned off meanwhile or this task is no longer the one in flight (turned off and on, or released as stuck).';

CREATE OR REPLACE FUNCTION api.auto_topup_started(p_account_id uuid, p_task_id uuid, p_payment_intent text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  UPDATE billing.auto_topups SET stripe_payment_intent_id = left(p_payment_intent, 255), updated_at = util.now()
  WHERE account_id = p_account_id AND task_id = p_task_id;
END $$;
COMMENT ON FUNCTION api.auto_topup_started(uuid, uuid, text) IS
  'pgtally worker: Stripe answered the top-up of task p_task_id with PaymentIntent p_payment_intent (its credits arrive with payment_intent.succeeded).';

CREATE OR REPLACE FUNCTION billing.auto_topup_failure(p_account_id uuid, p_error text) RETURNS billing.auto_topups
LANGUAGE plpgsql AS $$
DECLARE
  t billing.auto_topups;
BEGIN
  PERFORM 1 FROM identity.accounts WHERE id = p_account_id FOR NO KEY UPDATE;
  UPDATE billing.auto_topups
  SET failures = failures + 1, in_flight_since = NULL, task_id = NULL, last_error = left(p_error, 1000),
      updated_at = util.now(), enabled = failures + 1 < 3
  WHERE account_id = p_account_id RETURNING * INTO t;
  IF t.account_id IS NOT NULL AND NOT t.enabled THEN
    UPDATE identity.accounts SET auto_topup_below_micros = NULL WHERE id = p_account_id;
    INSERT INTO outbox.messages (kind, recipient, payload, created_at, next_attempt_at)
    SELECT 'auto_topup_disabled', u.email, jsonb_build_object('error', left(p_error, 300), 'failures', t.failures),
           util.now(), util.now()
    FROM identity.users u WHERE u.account_id = p_account_id AND u.email_verified_at IS NOT NULL;
  END IF;
  RETURN t;
END $$;
COMMENT ON FUNCTION billing.auto_topup_failure(uuid, text) IS
  'An auto top-up did not happen (declined, needs authentication, or no answer from Stripe): count the failure, end the in-flight state so the next charge may try again; the third failure in a row turns auto top-up off and emails the user.';

CREATE OR REPLACE FUNCTION api.auto_topup_failed(p_account_id uuid, p_error text) RETURNS jsonb
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT billing.auto_topup_json(billing.auto_topup_failure(p_account_id, p_error))
$$;
COMMENT ON FUNCTION api.auto_topup_failed(uuid, text) IS
  'pgtally worker: the card was declined or needs authentication: count the failure and let the next charge try again; the third failure turns auto top-up off and emails the user.';

CREATE OR REPLACE FUNCTION api.release_stuck_auto_topups(p_after interval DEFAULT interval '30 minutes') RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  r record;
  n integer := 0;
BEGIN
  FOR r IN SELECT t.account_id, t.stripe_payment_intent_id, m.failed_at IS NOT NULL AS failed, m.last_error
           FROM billing.auto_topups t LEFT JOIN outbox.messages m ON m.id = t.task_id
           WHERE t.in_flight_since < util.now() - p_after
             AND (m.id IS NULL OR m.delivered_at IS NOT NULL OR m.failed_at IS NOT NULL)
           ORDER BY t.account_id
  LOOP
    PERFORM billing.auto_topup_failure(r.account_id, CASE
      WHEN r.failed THEN 'the top-up task failed: ' || coalesce(r.last_error, '?')
      ELSE format('no answer from Stripe about %s within %s: released', coalesce(r.stripe_payment_intent_id, 'the payment'), p_after) END);
    n := n + 1;
  END LOOP;
  RETURN n;
END $$;
COMMENT ON FUNCTION api.release_stuck_auto_topups(interval) IS
  'pgtally worker housekeeping: release auto top-ups in flight for longer than p_after whose task is settled (Stripe was asked and its payment_intent.succeeded never came, the task gave up, or it is gone), counting each as a failure (three turn auto top-up off). A payment_intent.succeeded arriving later still grants its credits. Queued tasks are left to the outbox''s retries. Returns how many were released.';

GRANT EXECUTE ON FUNCTION api.set_auto_topup(text, uuid, text, text, uuid), api.auto_topup(text, uuid, boolean, uuid),
  api.auto_topup_payment(uuid, uuid), api.auto_topup_started(uuid, uuid, text), api.auto_topup_failed(uuid, text),
  api.release_stuck_auto_topups(interval)
TO pgtally_api;
