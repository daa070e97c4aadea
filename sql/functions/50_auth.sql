-- Sign-up, login, rotating refresh tokens, sessions, email verification, password reset,
-- anonymous devices, API keys and rate limits.
--
-- Functions whose failure must leave a trace (a rate-limit hit, a failed login, a detected
-- refresh-token reuse) return {"error": {"sqlstate", "message", ...}} instead of raising, so the
-- trace commits; api/errors.py renders both forms alike.

CREATE OR REPLACE FUNCTION identity.error(p_sqlstate text, p_message text, p_extra jsonb DEFAULT '{}')
RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
  SELECT jsonb_build_object('error', jsonb_build_object('sqlstate', p_sqlstate, 'message', p_message) || p_extra)
$$;
COMMENT ON FUNCTION identity.error(text, text, jsonb) IS
  'An error returned rather than raised (so what the call wrote commits): {"error": {"sqlstate": "TL429", "message": ..., extra members}}.';

CREATE OR REPLACE FUNCTION identity.log_event(p_kind text, p_user_id uuid, p_account_id uuid, p_session_id uuid,
                                              p_ip text, p_user_agent text, p_detail jsonb DEFAULT '{}')
RETURNS void
LANGUAGE sql AS $$
  INSERT INTO identity.auth_events (kind, user_id, account_id, session_id, ip, user_agent, detail, created_at)
  VALUES (p_kind, p_user_id, p_account_id, p_session_id, p_ip, left(p_user_agent, 512), coalesce(p_detail, '{}'), util.now())
$$;
COMMENT ON FUNCTION identity.log_event(text, uuid, uuid, uuid, text, text, jsonb) IS
  'Append one authentication event. Callers never pass a secret.';

CREATE OR REPLACE FUNCTION identity.throttled(p_action text, p_ip text, p_dimension text DEFAULT NULL,
                                              p_value text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
  v_now timestamptz := util.now();
  v_retry integer := 0;
  v_recent timestamptz[];
  b record;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM identity.rate_limit_rules WHERE action = p_action) THEN
    RAISE EXCEPTION 'no rate limit rule for %', p_action;      -- a caller's mistake, never a free pass
  END IF;
  -- Each bucket's row is locked (in bucket order, so two attempts never wait on each other
  -- crosswise) until the caller's transaction ends: attempts on one bucket are decided one at a time.
  FOR b IN SELECT v.bucket, r.max_attempts AS lim, r.per AS win
           FROM (VALUES ('ip', p_action || ':ip:' || p_ip), (p_dimension, p_action || ':' || p_dimension || ':' || p_value))
                AS v (dimension, bucket)
           JOIN identity.rate_limit_rules r ON r.action = p_action AND r.dimension = v.dimension
           WHERE v.bucket IS NOT NULL ORDER BY v.bucket LOOP
    INSERT INTO identity.rate_limits (bucket, hits) VALUES (b.bucket, '{}') ON CONFLICT (bucket) DO NOTHING;
    SELECT ARRAY(SELECT h FROM unnest(r.hits) h WHERE h > v_now - b.win ORDER BY h) INTO v_recent
    FROM identity.rate_limits r WHERE r.bucket = b.bucket FOR UPDATE;
    IF cardinality(v_recent) >= b.lim THEN
      -- Allowed again once enough of the attempts counted now are older than the window.
      v_retry := greatest(v_retry, 1, CASE WHEN b.lim < 1 THEN ceil(extract(epoch FROM b.win))
                                          ELSE ceil(extract(epoch FROM v_recent[cardinality(v_recent) - b.lim + 1] + b.win - v_now))
                                          END::integer);
    END IF;
  END LOOP;
  IF v_retry = 0 THEN
    -- Allowed: the attempt counts in every bucket; what left the window is dropped.
    FOR b IN SELECT v.bucket, r.max_attempts AS lim, r.per AS win
             FROM (VALUES ('ip', p_action || ':ip:' || p_ip), (p_dimension, p_action || ':' || p_dimension || ':' || p_value))
                  AS v (dimension, bucket)
             JOIN identity.rate_limit_rules r ON r.action = p_action AND r.dimension = v.dimension
             WHERE v.bucket IS NOT NULL LOOP
      UPDATE identity.rate_limits r
      SET hits = ARRAY(SELECT h FROM (SELECT h FROM unnest(r.hits || v_now) h WHERE h > v_now - b.win
                                      ORDER BY h DESC LIMIT b.lim) newest ORDER BY h)
      WHERE r.bucket = b.bucket;
    END LOOP;
    RETURN NULL;
  END IF;
  PERFORM identity.log_event('rate_limited', NULL, NULL, NULL, p_ip, NULL, jsonb_build_object('action', p_action));
  RETURN identity.error('TL429', format('too many %s attempts; try again in %s seconds', replace(p_action, '_', ' '), v_retry),
                        jsonb_build_object('retry_after', v_retry));
END $$;
COMMENT ON FUNCTION identity.throttled(text, text, text, text) IS
  'Apply the rate limits of an action, as identity.rate_limit_rules states them: per IP (its ip rule), and optionally per p_dimension = p_value (email, fingerprint, install, user, code: its rule for that dimension), in sliding windows (the attempts of the last window count, whatever the clock says). NULL when allowed (the attempt then counts in each bucket); else a TL429 error with retry_after (seconds until an attempt is allowed), logged as rate_limited, and the refused attempt is not counted. A NULL p_ip or p_value, or a dimension with no rule, skips that limit; an action with no rule at all is an error. Shared by every server process: each bucket''s row is locked until the caller commits. Issue #22 item 11.';

CREATE OR REPLACE FUNCTION identity.normalize_email(p_email text) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
  v text := lower(btrim(p_email));
BEGIN
  IF v IS NULL OR length(v) > 320 OR v !~ '^[^@[:space:]]+@[^@[:space:]]+\.[^@[:space:]]+$' THEN
    PERFORM util.fail('TL422', 'a valid email address is required');
  END IF;
  RETURN v;
END $$;
COMMENT ON FUNCTION identity.normalize_email(text) IS
  'lower(trim(email)), after a shape check (one @, a dot in the domain, no spaces, at most 320 characters). TL422 otherwise.';

CREATE OR REPLACE FUNCTION identity.link_lifetime(p_purpose text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
  SELECT CASE p_purpose WHEN 'verify_email' THEN '24 hours' WHEN 'password_reset' THEN '1 hour'
                        WHEN 'invitation' THEN '7 days' WHEN 'sso_link' THEN '1 hour' END
$$;
COMMENT ON FUNCTION identity.link_lifetime(text) IS
  'How long an emailed link of each purpose works, as words an email can say and an interval casts from (''24 hours''): verify_email, password_reset, invitation, sso_link. The one place these lifetimes are written: the tokens expire by it and the emails (payload valid_for) and pages say it.';

CREATE OR REPLACE FUNCTION identity.one_time_token(p_user_id uuid, p_purpose text, p_lifetime interval)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
  v_token text := util.random_token();
BEGIN
  INSERT INTO identity.one_time_tokens (user_id, purpose, token_hash, created_at, expires_at)
  VALUES (p_user_id, p_purpose, util.token_hash(v_token), util.now(), util.now() + p_lifetime);
  RETURN v_token;
END $$;
COMMENT ON FUNCTION identity.one_time_token(uuid, text, interval) IS
  'Create a verify_email or password_reset token; returns the token, stored only as its hash.';

CREATE OR REPLACE FUNCTION identity.claim_one_time_token(p_token text, p_purpose text) RETURNS uuid
LANGUAGE sql AS $$
  UPDATE identity.one_time_tokens SET used_at = util.now()
  WHERE token_hash = util.token_hash(p_token) AND purpose = p_purpose
    AND used_at IS NULL AND expires_at > util.now()
  RETURNING user_id
$$;
COMMENT ON FUNCTION identity.claim_one_time_token(text, text) IS
  'Use a one-time token: its user id, or NULL when unknown, used or expired. Atomic: of two concurrent claims one wins.';

CREATE OR REPLACE FUNCTION identity.issue_refresh_token(p_session_id uuid) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
  v_token text := 'rt_' || util.random_token();
BEGIN
  INSERT INTO identity.refresh_tokens (session_id, token_hash, created_at, expires_at)
  SELECT p_session_id, util.token_hash(v_token), util.now(), s.expires_at FROM identity.sessions s WHERE s.id = p_session_id;
  RETURN v_token;
END $$;
COMMENT ON FUNCTION identity.issue_refresh_token(uuid) IS 'A new refresh token for a session, valid until the session expires.';

CREATE OR REPLACE FUNCTION identity.successor_token(p_session_id uuid, p_refresh_token text) RETURNS text
LANGUAGE sql AS $$
  -- Derived, not random: every retry of one token inside the grace window gets this same
  -- successor, and only its hash is stored (a database reader cannot derive it: the parent's
  -- plaintext is needed too).
  WITH next AS (
    SELECT s.id, s.expires_at,
           'rt_' || util.base64url(util.hmac_sha256(s.refresh_secret, convert_to(p_refresh_token, 'UTF8'))) AS token
    FROM identity.sessions s WHERE s.id = p_session_id),
  stored AS (
    INSERT INTO identity.refresh_tokens (session_id, token_hash, created_at, expires_at)
    SELECT id, util.token_hash(token), util.now(), expires_at FROM next
    ON CONFLICT (token_hash) DO NOTHING)
  SELECT token FROM next
$$;
COMMENT ON FUNCTION identity.successor_token(uuid, text) IS
  'The refresh token that follows p_refresh_token in its session: HMAC-SHA256(session.refresh_secret, token), stored (as a hash) the first time. Every retry of one token gets the same successor, so concurrent refreshes continue one chain.';

CREATE OR REPLACE FUNCTION identity.tokens(p_session_id uuid, p_refresh_token text) RETURNS jsonb
LANGUAGE sql STABLE AS $$
  SELECT jsonb_build_object('session_id', s.id, 'user_id', s.user_id, 'account_id', s.account_id,
                            'refresh_token', p_refresh_token, 'session_expires_at', util.iso(s.expires_at))
  FROM identity.sessions s WHERE s.id = p_session_id
$$;
COMMENT ON FUNCTION identity.tokens(uuid, text) IS
  'What the server needs to answer a sign-in: the session, user and account ids (it signs the access token with them) and the refresh token.';

CREATE OR REPLACE FUNCTION identity.start_session(p_account_id uuid, p_user_id uuid, p_ip text, p_user_agent text,
                                                  p_method text DEFAULT 'password')
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
  v_session_id uuid;
BEGIN
  INSERT INTO identity.sessions (account_id, user_id, ip, user_agent, created_at, last_used_at, expires_at, method)
  VALUES (p_account_id, p_user_id, left(p_ip, 64), left(p_user_agent, 512), util.now(), util.now(),
          util.now() + interval '30 days', p_method)
  RETURNING id INTO v_session_id;
  RETURN identity.tokens(v_session_id, identity.issue_refresh_token(v_session_id));
END $$;
COMMENT ON FUNCTION identity.start_session(uuid, uuid, text, text, text) IS
  'Start a session (a refresh-token family, 30 days at most) begun by p_method (password, google, github, device, device_code) and return identity.tokens for it.';

CREATE OR REPLACE FUNCTION identity.active_session(p_session_id uuid) RETURNS identity.sessions
LANGUAGE plpgsql AS $$
DECLARE
  s identity.sessions;
BEGIN
  SELECT * INTO s FROM identity.sessions
  WHERE id = p_session_id AND revoked_at IS NULL AND expires_at > util.now();
  IF NOT FOUND THEN
    PERFORM util.fail('TL401', 'the session has ended: sign in again');
  END IF;
  IF s.client_id IS NOT NULL THEN
    -- An app's access token acts only within its scopes (identity.authenticate), never as the person.
    PERFORM util.fail('TL403', 'an app''s access token cannot manage the account: it holds only the scopes it was granted');
  END IF;
  RETURN s;
END $$;
COMMENT ON FUNCTION identity.active_session(uuid) IS
  'The session, if neither revoked nor expired; TL401 otherwise. TL403 for a session an OpenID Connect client holds (issue 25): managing sessions, keys, teams and sign-in methods is for the person''s own sign-ins.';

CREATE OR REPLACE FUNCTION identity.merge_device(p_device_session_id uuid, p_target_account_id uuid,
                                                 p_ip text, p_user_agent text)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
  v_device uuid;
  v_credits bigint;
  v_user uuid;
  v_oldest timestamptz;
BEGIN
  SELECT s.account_id INTO v_device
  FROM identity.sessions s JOIN identity.accounts a ON a.id = s.account_id
  WHERE s.id = p_device_session_id AND s.revoked_at IS NULL AND a.kind = 'device' AND a.merged_into IS NULL;
  IF v_device IS NULL OR v_device = p_target_account_id THEN
    RETURN NULL;
  END IF;
  -- Both accounts change: lock them in id order.
  PERFORM 1 FROM identity.accounts WHERE id IN (v_device, p_target_account_id) ORDER BY id FOR NO KEY UPDATE;
  -- The claim: exactly once, whoever else tries at the same time.
  UPDATE identity.accounts SET merged_into = p_target_account_id
  WHERE id = v_device AND merged_into IS NULL
  RETURNING credit_balance_micros INTO v_credits;
  IF NOT FOUND THEN
    RETURN NULL;
  END IF;
  IF v_credits > 0 THEN
    PERFORM ledger.post_transfer(v_device, 'adjustments', -v_credits, 'adjustment', 'merge:' || p_target_account_id,
                                 NULL, 'moved to account ' || p_target_account_id, p_lots => false);
    PERFORM ledger.post_transfer(p_target_account_id, 'adjustments', v_credits, 'adjustment', 'merge:' || v_device,
                                 NULL, 'moved from device account ' || v_device, p_lots => false);
  END IF;
  -- The lots move as they are: where they came from, what remains, when they expire.
  UPDATE ledger.credit_lots SET account_id = p_target_account_id,
                                grant_key = left('merged:' || v_device || ':' || grant_key, 255)
  WHERE account_id = v_device AND status IN ('active', 'pending');
  UPDATE identity.accounts SET credits_due_at = least(credits_due_at, (SELECT credits_due_at FROM identity.accounts WHERE id = v_device))
  WHERE id = p_target_account_id;
  -- The device's usage events move with their idempotency keys, except those whose key the user
  -- already used (they stay with the device, as the same key cannot name two events).
  UPDATE metering.idempotency_keys k SET account_id = p_target_account_id
  WHERE k.account_id = v_device
    AND NOT EXISTS (SELECT 1 FROM metering.idempotency_keys t
                    WHERE t.account_id = p_target_account_id AND t.idempotency_key = k.idempotency_key);
  WITH moved AS (
    UPDATE metering.usage_events e SET account_id = p_target_account_id
    WHERE e.account_id = v_device
      AND NOT EXISTS (SELECT 1 FROM metering.idempotency_keys t
                      WHERE t.account_id = v_device AND t.idempotency_key = e.idempotency_key)
    RETURNING e.created_at)
  SELECT min(created_at) INTO v_oldest FROM moved;
  -- Windows that now hold the device's usage start again from the events (metering.window_usage),
  -- whatever period the user's plan counts in.
  DELETE FROM metering.allowance_usage
  WHERE account_id = v_device OR (account_id = p_target_account_id AND period_end > v_oldest);
  UPDATE identity.sessions SET revoked_at = util.now(), revoked_reason = 'merged'
  WHERE account_id = v_device AND revoked_at IS NULL;
  -- What the device bought moves with it: its subscriptions, and its Stripe customer when the
  -- user has none yet (webhooks naming the device find the user through merged_into).
  UPDATE billing.subscriptions SET account_id = p_target_account_id WHERE account_id = v_device;
  IF NOT EXISTS (SELECT 1 FROM billing.customers WHERE account_id = p_target_account_id) THEN
    UPDATE billing.customers SET account_id = p_target_account_id WHERE account_id = v_device;
  END IF;
  UPDATE billing.payments SET account_id = p_target_account_id WHERE account_id = v_device;
  IF EXISTS (SELECT 1 FROM billing.subscriptions WHERE account_id = p_target_account_id) THEN
    PERFORM billing.sync_account_plan(p_target_account_id);
  END IF;
  SELECT id INTO v_user FROM identity.users WHERE account_id = p_target_account_id;
  PERFORM identity.log_event('device_merged', v_user, p_target_account_id, NULL, p_ip, p_user_agent,
                             jsonb_build_object('device_account_id', v_device, 'credits_micros', v_credits));
  RETURN jsonb_build_object('device_account_id', v_device, 'credits', util.credits(v_credits));
END $$;
COMMENT ON FUNCTION identity.merge_device(uuid, uuid, text, text) IS
  'Move an anonymous device account (found by its active session) into a user''s account, exactly once: credits through two ledger transfers via the adjustments account, usage events re-pointed (the user''s windows that now hold them are counted again from the events), subscriptions, payments and (when the user has none) the Stripe customer moved, device sessions revoked. The device account keeps its install hash: the install stays linked to the person (api.identify answers for them until a session of the install is revoked). NULL when there is nothing to merge.';

CREATE OR REPLACE FUNCTION identity.unlink_install_on_revoke() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  -- The install stops answering for the person, and its other sessions end with this one.
  UPDATE identity.accounts SET device_install_hash = NULL
  WHERE device_install_hash = NEW.install_hash AND merged_into IS NOT NULL;
  UPDATE identity.sessions SET revoked_at = NEW.revoked_at, revoked_reason = NEW.revoked_reason
  WHERE install_hash = NEW.install_hash AND revoked_at IS NULL;
  RETURN NULL;
END $$;
COMMENT ON FUNCTION identity.unlink_install_on_revoke() IS
  'Trigger on identity.sessions: when a session POST /v1/identify issued to a linked install (install_hash set) is revoked, for whatever reason (logout of that install, DELETE /v1/me/sessions/{id}, logout everywhere, password reset, refresh-token reuse, staff), the install is unlinked (the merged device account''s device_install_hash cleared, so the next identify starts a fresh device account) and the install''s other sessions are revoked with the same reason. Issue 25: installs keep their person until the person signs out of that install or unlinks it.';
-- The trigger sessions_unlink_install (migration 0034) runs it.

------------------------------------------------------------------------------------------------
-- Sign-up, login, refresh, logout
------------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION api.signup(p_email text, p_password_hash text, p_ip text, p_user_agent text,
                                      p_device_session_id uuid DEFAULT NULL, p_referral_code text DEFAULT NULL,
                                      p_fingerprint text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_email text := identity.normalize_email(p_email);
  v_limited jsonb := identity.throttled('signup', p_ip, 'email', v_email);
  v_account_id uuid := util.uuid_v7();
  v_user_id uuid;
BEGIN
  IF v_limited IS NOT NULL THEN
    RETURN v_limited;
  END IF;
  INSERT INTO identity.users (account_id, email, email_normalized, password_hash, created_at, password_changed_at)
  VALUES (v_account_id, btrim(p_email), v_email, p_password_hash, util.now(), util.now())
  ON CONFLICT (email_normalized) DO NOTHING
  RETURNING id INTO v_user_id;
  IF v_user_id IS NULL THEN
    -- Registered already: same answer to the caller, an email to the owner instead.
    SELECT id, account_id INTO v_user_id, v_account_id FROM identity.users WHERE email_normalized = v_email;
    INSERT INTO outbox.messages (kind, recipient, payload, created_at, next_attempt_at)
    VALUES ('account_exists', v_email, jsonb_build_object('email', v_email), util.now(), util.now());
    PERFORM identity.log_event('signup_existing_email', v_user_id, v_account_id, NULL, p_ip, p_user_agent);
  ELSE
    PERFORM identity.new_personal_account(v_user_id, v_account_id);
    INSERT INTO outbox.messages (kind, recipient, payload, created_at, next_attempt_at)
    VALUES ('verify_email', v_email,
            jsonb_build_object('email', v_email, 'valid_for', identity.link_lifetime('verify_email'),
                               'token', identity.one_time_token(v_user_id, 'verify_email',
                                                                identity.link_lifetime('verify_email')::interval)),
            util.now(), util.now());
    PERFORM identity.log_event('signup', v_user_id, v_account_id, NULL, p_ip, p_user_agent);
    PERFORM billing.attribute_referral(v_account_id, p_referral_code, p_ip, p_fingerprint,
                                       (SELECT account_id FROM identity.sessions WHERE id = p_device_session_id));
    IF p_device_session_id IS NOT NULL THEN
      PERFORM identity.merge_device(p_device_session_id, v_account_id, p_ip, p_user_agent);
    END IF;
  END IF;
  RETURN jsonb_build_object('email', v_email, 'status', 'verification_email_sent',
                            'valid_for', identity.link_lifetime('verify_email'));
END $$;
COMMENT ON FUNCTION api.signup(text, text, text, text, uuid, text, text) IS
  'POST /v1/auth/signup: create a user (argon2id hash computed by the server) with a personal account on the free plan and queue a verification email (valid 24 hours). An address already registered gets the same answer and an account_exists email instead (no enumeration). With the anonymous device''s session, moves its usage and credits to the new account. p_referral_code (and p_fingerprint, a client hint): who referred the person (billing.attribute_referral; an unknown code is ignored). Rate limited per IP and per address (identity.rate_limit_rules, TL429). TL422 bad email.';

CREATE OR REPLACE FUNCTION api.login_start(p_email text, p_ip text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_email text := lower(btrim(p_email));
  v_limited jsonb := identity.throttled('login', p_ip, 'email', v_email);
  u identity.users;
BEGIN
  IF v_limited IS NOT NULL THEN
    RETURN v_limited;
  END IF;
  SELECT * INTO u FROM identity.users WHERE email_normalized = v_email;
  RETURN jsonb_build_object('user_id', u.id, 'password_hash', u.password_hash);
END $$;
COMMENT ON FUNCTION api.login_start(text, text) IS
  'POST /v1/auth/login, step 1: apply the login rate limits (per IP and per email, identity.rate_limit_rules: TL429) and return {user_id, password_hash}, both null for an unknown email. The server verifies the password (argon2id) and calls api.login_succeeded or api.login_failed.';

CREATE OR REPLACE FUNCTION api.login_failed(p_user_id uuid, p_email text, p_ip text, p_user_agent text)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM identity.log_event('login_failed', p_user_id, NULL, NULL, p_ip, p_user_agent,
                             jsonb_build_object('email', lower(btrim(p_email)), 'known_user', p_user_id IS NOT NULL));
  RETURN identity.error('TL401', 'the email or password is not right');
END $$;
COMMENT ON FUNCTION api.login_failed(uuid, text, text, text) IS
  'POST /v1/auth/login, step 2 on a wrong password or unknown email: log it and return the one TL401 error both cases share.';

CREATE OR REPLACE FUNCTION api.login_succeeded(p_user_id uuid, p_new_password_hash text, p_ip text, p_user_agent text,
                                               p_device_session_id uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  u identity.users;
  v_tokens jsonb;
BEGIN
  SELECT * INTO u FROM identity.users WHERE id = p_user_id;
  IF NOT FOUND THEN
    PERFORM util.fail('TL401', 'the email or password is not right');
  END IF;
  IF identity.sso_required(u.id) THEN
    RETURN identity.error('TL403', 'your organisation signs you in through its own provider: use single sign-on',
                          jsonb_build_object('sso_url', '/auth/sso/start?email=' || u.email_normalized));
  END IF;
  IF p_new_password_hash IS NOT NULL THEN
    UPDATE identity.users SET password_hash = p_new_password_hash WHERE id = u.id;
    PERFORM identity.log_event('password_rehashed', u.id, u.account_id, NULL, p_ip, p_user_agent);
  END IF;
  v_tokens := identity.start_session(u.account_id, u.id, p_ip, p_user_agent);
  PERFORM identity.log_event('login_succeeded', u.id, u.account_id, (v_tokens ->> 'session_id')::uuid, p_ip, p_user_agent);
  IF p_device_session_id IS NOT NULL THEN
    PERFORM identity.merge_device(p_device_session_id, u.account_id, p_ip, p_user_agent);
  END IF;
  RETURN v_tokens;
END $$;
COMMENT ON FUNCTION api.login_succeeded(uuid, text, text, text, uuid) IS
  'POST /v1/auth/login, step 2 after the server verified the password: store a rehash when argon2 parameters changed, start a session, log it, merge the caller''s anonymous device if any. Returns identity.tokens.';

CREATE OR REPLACE FUNCTION identity.refresh_session(p_refresh_token text, p_client_id text, p_ip text, p_user_agent text)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
  v_hash bytea := util.token_hash(p_refresh_token);
  v_session_id uuid;
  r identity.refresh_tokens;
  s identity.sessions;
BEGIN
  -- A client's refresh token works only for that client, and pgtally's own only without one.
  IF (SELECT x.client_id FROM identity.refresh_tokens t JOIN identity.sessions x ON x.id = t.session_id
      WHERE t.token_hash = v_hash) IS DISTINCT FROM p_client_id THEN
    RETURN identity.error('TL401', 'the refresh token was not issued to this client');
  END IF;
  -- The claim: one of any number of concurrent refreshes of this token wins it.
  UPDATE identity.refresh_tokens t SET used_at = util.now()
  FROM identity.sessions x
  WHERE t.token_hash = v_hash AND t.used_at IS NULL AND t.expires_at > util.now()
    AND x.id = t.session_id AND x.revoked_at IS NULL AND x.expires_at > util.now()
  RETURNING t.session_id INTO v_session_id;
  IF v_session_id IS NOT NULL THEN
    UPDATE identity.sessions SET last_used_at = util.now() WHERE id = v_session_id;
    RETURN identity.tokens(v_session_id, identity.successor_token(v_session_id, p_refresh_token));
  END IF;

  SELECT * INTO r FROM identity.refresh_tokens WHERE token_hash = v_hash;
  SELECT * INTO s FROM identity.sessions WHERE id = r.session_id;
  IF r.id IS NULL OR s.revoked_at IS NOT NULL OR r.expires_at <= util.now() OR s.expires_at <= util.now() THEN
    RETURN identity.error('TL401', 'the refresh token is not valid: sign in again');
  END IF;
  -- Used already. Within the grace window it is a concurrent refresh (two tabs, a retried
  -- request): it gets the same successor as the first, so the family stays one chain. Later it
  -- is reuse: revoke the family.
  IF r.used_at > util.now() - interval '10 seconds' THEN
    RETURN identity.tokens(s.id, identity.successor_token(s.id, p_refresh_token));
  END IF;
  UPDATE identity.sessions SET revoked_at = util.now(), revoked_reason = 'refresh_token_reuse'
  WHERE id = s.id AND revoked_at IS NULL;
  PERFORM identity.log_event('refresh_token_reuse', s.user_id, s.account_id, s.id, p_ip, p_user_agent,
                             jsonb_build_object('refresh_token_id', r.id));
  RETURN identity.error('TL401', 'this refresh token was already used: the session is revoked, sign in again');
END $$;
COMMENT ON FUNCTION identity.refresh_session(text, text, text, text) IS
  'Rotate a refresh token (the old one stops working) and return identity.tokens. A token used within the last 10 seconds yields the same successor again (identity.successor_token: concurrent refreshes and retries continue one chain and do not lock the user out); a token used earlier revokes the whole session and is logged as refresh_token_reuse (RFC 9700 section 4.14.2). TL401 errors are returned, not raised, so the revocation commits. p_client_id: the OpenID Connect client the token was issued to (NULL: pgtally''s own sign-ins); a token of another client is TL401 and changes nothing (issue 25).';

CREATE OR REPLACE FUNCTION api.refresh(p_refresh_token text, p_ip text, p_user_agent text) RETURNS jsonb
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT identity.refresh_session(p_refresh_token, NULL, p_ip, p_user_agent)
$$;
COMMENT ON FUNCTION api.refresh(text, text, text) IS
  'POST /v1/auth/refresh: identity.refresh_session for pgtally''s own sessions (a client''s refresh token goes to /oauth/token with its client_id).';

CREATE OR REPLACE FUNCTION api.logout(p_session_id uuid, p_everywhere boolean DEFAULT false) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  s identity.sessions := identity.active_session(p_session_id);
  v_count integer;
BEGIN
  UPDATE identity.sessions x
  SET revoked_at = util.now(), revoked_reason = CASE WHEN p_everywhere THEN 'logout_all' ELSE 'logout' END
  WHERE x.revoked_at IS NULL
    AND (x.id = s.id OR (p_everywhere AND (x.user_id = s.user_id OR (s.user_id IS NULL AND x.account_id = s.account_id))));
  GET DIAGNOSTICS v_count = ROW_COUNT;
  PERFORM identity.log_event(CASE WHEN p_everywhere THEN 'logout_all' ELSE 'logout' END,
                             s.user_id, s.account_id, s.id, NULL, NULL, jsonb_build_object('sessions', v_count));
  RETURN jsonb_build_object('sessions_revoked', v_count);
END $$;
COMMENT ON FUNCTION api.logout(uuid, boolean) IS
  'POST /v1/auth/logout (this session) and /v1/auth/logout-all (p_everywhere: every session of the user): revokes them, with their refresh tokens. TL401 when the session has ended.';

------------------------------------------------------------------------------------------------
-- Me and my sessions
------------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION api.me(p_api_key text, p_session_id uuid) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_account_id uuid;
  a identity.accounts;
  u identity.users;
BEGIN
  v_account_id := identity.authenticate(p_api_key, p_session_id, 'usage:read');
  SELECT * INTO a FROM identity.accounts WHERE id = v_account_id;
  SELECT * INTO u FROM identity.users WHERE account_id = a.id;
  RETURN jsonb_build_object(
    'account', jsonb_build_object('id', a.id, 'kind', a.kind, 'plan', identity.effective_plan(a),
                                  'credits', util.credits(a.credit_balance_micros), 'created_at', util.iso(a.created_at)),
    'user', CASE WHEN u.id IS NULL THEN NULL ELSE
              jsonb_build_object('id', u.id, 'email', u.email, 'email_verified', u.email_verified_at IS NOT NULL,
                                 'created_at', util.iso(u.created_at)) END,
    'session_id', p_session_id);
END $$;
COMMENT ON FUNCTION api.me(text, uuid) IS
  'GET /v1/me: {account {id, kind, plan, credits, created_at}, user {id, email, email_verified, created_at} | null, session_id}.';

CREATE OR REPLACE FUNCTION api.sessions(p_session_id uuid) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  s identity.sessions := identity.active_session(p_session_id);
BEGIN
  RETURN jsonb_build_object('data', coalesce((
    SELECT jsonb_agg(jsonb_build_object('id', x.id, 'current', x.id = s.id, 'method', x.method,
                                        'ip', x.ip, 'user_agent', x.user_agent,
                                        'created_at', util.iso(x.created_at), 'last_used_at', util.iso(x.last_used_at),
                                        'expires_at', util.iso(x.expires_at)) ORDER BY x.created_at DESC)
    FROM identity.sessions x
    WHERE x.revoked_at IS NULL AND x.expires_at > util.now()
      AND (x.user_id = s.user_id OR (s.user_id IS NULL AND x.id = s.id))), '[]'));
END $$;
COMMENT ON FUNCTION api.sessions(uuid) IS 'GET /v1/me/sessions: the caller''s active sessions, newest first, marking the current one, with how each began (method: password, google, github, device, device_code).';

CREATE OR REPLACE FUNCTION api.revoke_session(p_session_id uuid, p_target_session_id uuid) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  s identity.sessions := identity.active_session(p_session_id);
BEGIN
  UPDATE identity.sessions x SET revoked_at = util.now(), revoked_reason = 'revoked'
  WHERE x.id = p_target_session_id AND x.revoked_at IS NULL
    AND (x.user_id = s.user_id OR x.id = s.id);
  IF NOT FOUND THEN
    PERFORM util.fail('TL404', 'no such active session of yours');
  END IF;
  PERFORM identity.log_event('session_revoked', s.user_id, s.account_id, s.id, NULL, NULL,
                             jsonb_build_object('revoked_session_id', p_target_session_id));
  RETURN jsonb_build_object('id', p_target_session_id, 'revoked', true);
END $$;
COMMENT ON FUNCTION api.revoke_session(uuid, uuid) IS 'DELETE /v1/me/sessions/{id}: revoke one of the caller''s sessions. TL404 when it is not theirs or not active.';

------------------------------------------------------------------------------------------------
-- Email verification and password reset
------------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION api.verify_email(p_token text, p_ip text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_limited jsonb := identity.throttled('verify_email', p_ip);
  v_user_id uuid;
  u identity.users;
BEGIN
  IF v_limited IS NOT NULL THEN
    RETURN v_limited;
  END IF;
  v_user_id := identity.claim_one_time_token(p_token, 'verify_email');
  IF v_user_id IS NULL THEN
    RETURN identity.error('TL400', 'the verification link is not valid or has expired');
  END IF;
  PERFORM identity.mark_email_verified(v_user_id);
  SELECT * INTO u FROM identity.users WHERE id = v_user_id;
  PERFORM identity.log_event('email_verified', u.id, u.account_id, NULL, p_ip, NULL);
  RETURN jsonb_build_object('email', u.email, 'email_verified', true);
END $$;
COMMENT ON FUNCTION api.verify_email(text, text) IS
  'POST /v1/auth/verify-email: use a verification token (once, within 24 hours) to mark the email verified (identity.mark_email_verified: the sign-up bonus, a referral that qualifies on it). TL400 invalid, used or expired token; TL429 over the per-IP limit (identity.rate_limit_rules).';

CREATE OR REPLACE FUNCTION api.request_password_reset(p_email text, p_ip text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_limited jsonb := identity.throttled('password_reset', p_ip);
  v_email text;
  u identity.users;
BEGIN
  IF v_limited IS NOT NULL THEN
    RETURN v_limited;
  END IF;
  v_email := identity.normalize_email(p_email);
  SELECT * INTO u FROM identity.users WHERE email_normalized = v_email;
  -- A few emails an hour per address (identity.rate_limit_rules); beyond that, and for unknown addresses, the same answer.
  IF u.id IS NOT NULL AND identity.throttled('password_reset', NULL, 'email', v_email) IS NULL THEN
    INSERT INTO outbox.messages (kind, recipient, payload, created_at, next_attempt_at)
    VALUES ('password_reset', v_email,
            jsonb_build_object('email', v_email, 'valid_for', identity.link_lifetime('password_reset'),
                               'token', identity.one_time_token(u.id, 'password_reset',
                                                                identity.link_lifetime('password_reset')::interval)),
            util.now(), util.now());
    PERFORM identity.log_event('password_reset_requested', u.id, u.account_id, NULL, p_ip, NULL);
  END IF;
  RETURN jsonb_build_object('email', v_email, 'status', 'reset_email_sent_if_registered',
                            'valid_for', identity.link_lifetime('password_reset'));
END $$;
COMMENT ON FUNCTION api.request_password_reset(text, text) IS
  'POST /v1/auth/password-reset: queue a reset email (token valid 1 hour) when the address is registered; the same answer otherwise. Emails per address are limited silently, requests per IP with TL429 (identity.rate_limit_rules). TL422 bad email.';

CREATE OR REPLACE FUNCTION api.reset_password(p_token text, p_new_password_hash text, p_ip text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_limited jsonb := identity.throttled('password_reset_confirm', p_ip);
  v_user_id uuid;
  u identity.users;
  v_count integer;
BEGIN
  IF v_limited IS NOT NULL THEN
    RETURN v_limited;
  END IF;
  v_user_id := identity.claim_one_time_token(p_token, 'password_reset');
  IF v_user_id IS NULL THEN
    RETURN identity.error('TL400', 'the reset link is not valid or has expired');
  END IF;
  PERFORM identity.mark_email_verified(v_user_id);    -- the reset link reached the address
  UPDATE identity.users
  SET password_hash = p_new_password_hash, password_changed_at = util.now()
  WHERE id = v_user_id RETURNING * INTO u;
  UPDATE identity.one_time_tokens SET used_at = util.now()
  WHERE user_id = u.id AND purpose = 'password_reset' AND used_at IS NULL;
  UPDATE identity.sessions SET revoked_at = util.now(), revoked_reason = 'password_reset'
  WHERE user_id = u.id AND revoked_at IS NULL;
  GET DIAGNOSTICS v_count = ROW_COUNT;
  PERFORM identity.log_event('password_reset', u.id, u.account_id, NULL, p_ip, NULL,
                             jsonb_build_object('sessions_revoked', v_count));
  RETURN jsonb_build_object('status', 'password_changed', 'sessions_revoked', v_count);
END $$;
COMMENT ON FUNCTION api.reset_password(text, text, text) IS
  'POST /v1/auth/password-reset/confirm: use a reset token (once, within the hour) to set a new password hash; revokes every session (and so every refresh token) of the user and any other reset token. TL400 invalid, used or expired token; TL429 over the per-IP limit (identity.rate_limit_rules).';

------------------------------------------------------------------------------------------------
-- Anonymous devices
------------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION api.identify(p_fingerprint text, p_install_id text, p_meter text, p_ip text, p_user_agent text)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_install bytea;
  v_limited jsonb;
  a identity.accounts;
  u identity.users;
  v_returning boolean := false;
  v_account_id uuid;
  v_tokens jsonb;
  v_can_use boolean;
  v_allowance jsonb;
  v_allowances jsonb;
  v_resets_at timestamptz;
  q record;
BEGIN
  IF p_fingerprint IS NOT NULL AND length(p_fingerprint) NOT BETWEEN 1 AND 256 THEN
    PERFORM util.fail('TL422', 'a fingerprint has 1 to 256 characters', '{"field": "fingerprint"}');
  END IF;
  IF p_install_id IS NOT NULL AND (p_install_id !~ '^[A-Za-z0-9_-]+$' OR length(p_install_id) NOT BETWEEN 22 AND 256) THEN
    PERFORM util.fail('TL422', 'an install id is a random string of 22 to 256 URL-safe characters (at least 128 bits), made once per install',
                      '{"field": "install_id"}');
  END IF;
  IF p_fingerprint IS NULL AND p_install_id IS NULL THEN
    PERFORM util.fail('TL422', 'send an install_id (and a fingerprint, a hint for abuse limits)', '{"field": "install_id"}');
  END IF;
  v_install := util.token_hash(p_install_id);
  IF p_install_id IS NOT NULL THEN
    SELECT * INTO a FROM identity.accounts WHERE device_install_hash = v_install FOR NO KEY UPDATE;
    IF FOUND AND a.merged_into IS NOT NULL THEN
      -- The install was merged into a person's account (sign-up, login, provider sign-in or the
      -- device grant with its token): it stays linked, and answers for the person.
      SELECT * INTO u FROM identity.users WHERE account_id = a.merged_into;
      IF u.id IS NULL THEN
        UPDATE identity.accounts SET device_install_hash = NULL WHERE id = a.id;   -- no person to answer for
        a := NULL;
      ELSE
        SELECT * INTO a FROM identity.accounts WHERE id = u.account_id;
      END IF;
    END IF;
    v_returning := a.id IS NOT NULL;
  END IF;
  IF v_returning THEN
    v_limited := identity.throttled('identify_install', p_ip, 'install', encode(v_install, 'hex'));
  ELSE
    -- New device accounts: a few a day per fingerprint (identity.rate_limit_rules).
    v_limited := identity.throttled('identify', p_ip, 'fingerprint', p_fingerprint);
  END IF;
  IF v_limited IS NOT NULL THEN
    RETURN v_limited;
  END IF;
  IF NOT v_returning THEN
    v_account_id := identity.new_account('anonymous', 'device', NULL, 0, NULL, p_fingerprint);
    UPDATE identity.accounts SET device_install_hash = CASE WHEN p_install_id IS NOT NULL THEN v_install END
    WHERE id = v_account_id RETURNING * INTO a;
  END IF;
  IF u.id IS NOT NULL THEN
    v_tokens := identity.start_session(a.id, u.id, p_ip, p_user_agent, 'device');
    -- The install id alone opens it: it meters and reads, and manages nothing (keys, teams, billing).
    UPDATE identity.sessions SET install_hash = v_install, scopes = '{usage:read,usage:write,billing:read}'
    WHERE id = (v_tokens ->> 'session_id')::uuid;
  ELSE
    v_tokens := identity.start_session(a.id, NULL, p_ip, p_user_agent, 'device');
  END IF;
  PERFORM identity.log_event('device_identified', u.id, a.id, (v_tokens ->> 'session_id')::uuid, p_ip, p_user_agent,
    jsonb_build_object('returning_install', v_returning, 'linked_to_user', u.id IS NOT NULL,
                       'fingerprint_seen_before',
                       EXISTS (SELECT 1 FROM identity.accounts WHERE device_fingerprint = p_fingerprint AND id <> a.id)));
  IF p_meter IS NOT NULL THEN
    SELECT * INTO q FROM metering.quote(a, p_meter,
      CASE WHEN (SELECT pricing FROM metering.meters WHERE id = p_meter) = 'tokens' THEN NULL ELSE 1 END,
      CASE WHEN (SELECT pricing FROM metering.meters WHERE id = p_meter) = 'tokens' THEN 1 END, NULL);
    v_can_use := q.allowed;
    v_resets_at := q.period_end;
  END IF;
  v_allowances := metering.allowances_json(a);
  SELECT x INTO v_allowance FROM jsonb_array_elements(v_allowances) x WHERE x ->> 'meter' = p_meter;
  RETURN v_tokens || jsonb_build_object(
    'account_id', a.id, 'plan', identity.effective_plan(a), 'credits', util.credits(a.credit_balance_micros),
    'returning', v_returning, 'allowances', v_allowances,
    'meter', p_meter, 'can_use', v_can_use, 'allowance', v_allowance, 'resets_at', util.iso(v_resets_at));
END $$;
COMMENT ON FUNCTION api.identify(text, text, text, text, text) IS
  'POST /v1/identify: an anonymous device account on the anonymous plan (browser extension, CLI install) and a new session for it. With an install id (a client-generated secret of at least 128 bits, stored as its SHA-256) the same install gets the same account every time; without one every call makes a new account. Installs keep their person (issue 25): once the install''s device account was merged into a person''s account (identity.merge_device: sign-up, login, Google/GitHub/SSO sign-in or the device grant with its token), the install is linked (the merged device account keeps device_install_hash) and identify answers for the person''s account (plan, credits, can_use, allowances) with a session of the person (method device, identity.sessions.install_hash set, scopes usage:read, usage:write, billing:read only: the install id alone never manages keys, teams or billing), never a fresh anonymous quota; until the person signs out of that install (POST /v1/auth/logout with such a session) or unlinks it (DELETE /v1/me/sessions/{id} of such a session, logout everywhere, a password reset, refresh-token reuse): revoking any session of the install clears the link (identity.unlink_install_on_revoke), and the next identify starts a fresh device account. The fingerprint is a hint for lookups and abuse limits, never a credential. Limits (identity.rate_limit_rules): new accounts per fingerprint and per IP; returning installs per install and per IP (TL429). With p_meter, also whether one more use is allowed now (can_use: a unit, or a one-token call), that meter''s allowance and its reset. Returns identity.tokens plus {account_id, plan, credits, returning, allowances, meter, can_use, allowance, resets_at}. TL422 bad input or unknown meter.';

CREATE OR REPLACE FUNCTION api.handoff_code(p_session_id uuid) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  s identity.sessions := identity.active_session(p_session_id);
  v_code text := util.random_token();
BEGIN
  IF NOT EXISTS (SELECT 1 FROM identity.accounts WHERE id = s.account_id AND kind = 'device' AND merged_into IS NULL) THEN
    PERFORM util.fail('TL403', 'only an anonymous install hands its sign-in to a browser (POST /v1/identify first)');
  END IF;
  INSERT INTO identity.handoff_codes (code_hash, device_session_id, created_at, expires_at)
  VALUES (util.token_hash(v_code), s.id, util.now(), util.now() + interval '10 minutes');
  RETURN jsonb_build_object('code', v_code, 'expires_in', 600);
END $$;
COMMENT ON FUNCTION api.handoff_code(uuid) IS
  'POST /v1/identify/handoff: a single-use code (random, stored as its SHA-256, 10 minutes: expires_in 600 seconds) that hands an anonymous install''s session to a browser: the install opens /login?handoff=CODE (or /signup, /auth/*/start), and the person''s sign-in there merges the install (identity.merge_device), which then keeps its person (api.identify). Replaces access tokens in URLs. TL401 ended session; TL403 for a session that is not an unmerged anonymous install''s. Issue 25.';

CREATE OR REPLACE FUNCTION api.claim_handoff(p_code text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_session_id uuid;
BEGIN
  UPDATE identity.handoff_codes SET claimed_at = util.now()
  WHERE code_hash = util.token_hash(p_code) AND claimed_at IS NULL AND expires_at > util.now()
  RETURNING device_session_id INTO v_session_id;
  RETURN jsonb_build_object('device_session_id', v_session_id);
END $$;
COMMENT ON FUNCTION api.claim_handoff(text) IS
  'A sign-in page claims a handoff code (api.handoff_code): {device_session_id} of the install, or {device_session_id: null} when the code is unknown, claimed already or expired. Single use: of any number of concurrent claims exactly one gets the session. Issue 25.';
GRANT EXECUTE ON FUNCTION api.handoff_code(uuid), api.claim_handoff(text) TO pgtally_api;

------------------------------------------------------------------------------------------------
-- API keys
------------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION identity.api_key_json(k identity.api_keys) RETURNS jsonb
LANGUAGE sql STABLE AS $$
  SELECT jsonb_build_object('id', k.id, 'name', k.name, 'display', k.display, 'scopes', to_jsonb(k.scopes),
                            'created_at', util.iso(k.created_at), 'last_used_at', util.iso(k.last_used_at),
                            'expires_at', util.iso(k.expires_at))
$$;
COMMENT ON FUNCTION identity.api_key_json(identity.api_keys) IS 'An API key as GET /v1/api-keys shows it (never the key itself).';

CREATE OR REPLACE FUNCTION identity.key_account(p_session_id uuid, p_account_id uuid) RETURNS identity.sessions
LANGUAGE plpgsql AS $$
DECLARE
  s identity.sessions := identity.active_session(p_session_id);
BEGIN
  IF s.user_id IS NULL THEN
    PERFORM util.fail('TL403', 'sign up or log in to manage API keys');
  END IF;
  s.account_id := identity.authenticate(NULL, p_session_id, 'keys:manage', p_account_id);
  RETURN s;
END $$;
COMMENT ON FUNCTION identity.key_account(uuid, uuid) IS
  'The signed-in person''s session, its account_id set to the account whose keys they manage (their own, or p_account_id where their role grants keys:manage). TL403 otherwise.';

CREATE OR REPLACE FUNCTION api.create_api_key(p_session_id uuid, p_name text, p_scopes text[],
                                              p_expires_at timestamptz DEFAULT NULL, p_account_id uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  s identity.sessions := identity.key_account(p_session_id, p_account_id);
  v_key record;
  k identity.api_keys;
  v_allowed text[];
BEGIN
  p_scopes := identity.scope_set(p_scopes);             -- each scope once, for the checks and the log too
  IF p_name IS NULL OR length(btrim(p_name)) NOT BETWEEN 1 AND 100 THEN
    PERFORM util.fail('TL422', 'a key name of 1 to 100 characters is required');
  END IF;
  IF p_scopes IS NULL OR cardinality(p_scopes) = 0
     OR NOT p_scopes <@ '{usage:write,usage:read,billing:read,billing:manage}'::text[] THEN
    PERFORM util.fail('TL422', 'scopes are one or more of usage:write, usage:read, billing:read, billing:manage');
  END IF;
  -- A key holds at most what its maker's role allows (and is cut down on use if the role shrinks).
  SELECT array_agg(r.permission) INTO v_allowed FROM identity.memberships m
  JOIN identity.role_permissions r ON r.role = m.role WHERE m.account_id = s.account_id AND m.user_id = s.user_id;
  IF NOT p_scopes <@ coalesce(v_allowed, '{}') THEN
    PERFORM util.fail('TL403', 'your role on this account does not allow a key with these scopes',
                      jsonb_build_object('allowed', to_jsonb(v_allowed)));
  END IF;
  IF p_expires_at IS NOT NULL AND p_expires_at <= util.now() THEN
    PERFORM util.fail('TL422', 'expires_at must be in the future');
  END IF;
  SELECT * INTO v_key FROM identity.issue_api_key(s.account_id, btrim(p_name), p_scopes, p_expires_at);
  UPDATE identity.api_keys SET created_by = s.user_id WHERE id = v_key.id RETURNING * INTO k;
  PERFORM identity.log_event('api_key_created', s.user_id, s.account_id, s.id, NULL, NULL,
                             jsonb_build_object('api_key_id', k.id, 'scopes', to_jsonb(p_scopes)));
  RETURN identity.api_key_json(k) || jsonb_build_object('api_key', v_key.api_key);
END $$;
COMMENT ON FUNCTION api.create_api_key(uuid, text, text[], timestamptz, uuid) IS
  'POST /v1/api-keys: a new API key for the signed-in person''s account, or a team''s (p_account_id; permission keys:manage), returned once in api_key (only its hash is kept). Its scopes (usage:write, usage:read, billing:read, billing:manage) are at most what the person''s role allows. TL403 anonymous session, no keys:manage, or scopes beyond the role; TL422 bad name, scopes or expiry.';

CREATE OR REPLACE FUNCTION api.list_api_keys(p_session_id uuid, p_account_id uuid DEFAULT NULL) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  s identity.sessions := identity.key_account(p_session_id, p_account_id);
BEGIN
  RETURN jsonb_build_object('data', coalesce((
    SELECT jsonb_agg(identity.api_key_json(k) ORDER BY k.created_at DESC)
    FROM identity.api_keys k WHERE k.account_id = s.account_id AND k.revoked_at IS NULL), '[]'));
END $$;
COMMENT ON FUNCTION api.list_api_keys(uuid, uuid) IS
  'GET /v1/api-keys: the account''s keys that are not revoked (never the keys themselves); p_account_id: a team (keys:manage).';

CREATE OR REPLACE FUNCTION api.revoke_api_key(p_session_id uuid, p_api_key_id uuid, p_account_id uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  s identity.sessions := identity.key_account(p_session_id, p_account_id);
BEGIN
  UPDATE identity.api_keys SET revoked_at = util.now()
  WHERE id = p_api_key_id AND account_id = s.account_id AND revoked_at IS NULL;
  IF NOT FOUND THEN
    PERFORM util.fail('TL404', 'no such API key');
  END IF;
  PERFORM identity.log_event('api_key_revoked', s.user_id, s.account_id, s.id, NULL, NULL,
                             jsonb_build_object('api_key_id', p_api_key_id));
  RETURN jsonb_build_object('id', p_api_key_id, 'revoked', true);
END $$;
COMMENT ON FUNCTION api.revoke_api_key(uuid, uuid, uuid) IS
  'DELETE /v1/api-keys/{id}: revoke one of the account''s keys (p_account_id: a team; keys:manage); it stops working at once. TL404 otherwise.';

CREATE OR REPLACE FUNCTION api.jwt_keys() RETURNS TABLE (kid text, secret bytea)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT kid, secret FROM identity.jwt_keys ORDER BY created_at DESC, kid DESC
$$;
COMMENT ON FUNCTION api.jwt_keys() IS 'The HS256 keys for access tokens, newest (the signing key) first; read by the server at startup.';

GRANT EXECUTE ON FUNCTION
  api.signup(text, text, text, text, uuid, text, text), api.login_start(text, text), api.login_failed(uuid, text, text, text),
  api.login_succeeded(uuid, text, text, text, uuid), api.refresh(text, text, text), api.logout(uuid, boolean),
  api.me(text, uuid), api.sessions(uuid), api.revoke_session(uuid, uuid), api.verify_email(text, text),
  api.request_password_reset(text, text), api.reset_password(text, text, text), api.identify(text, text, text, text, text),
  api.create_api_key(uuid, text, text[], timestamptz, uuid), api.list_api_keys(uuid, uuid), api.revoke_api_key(uuid, uuid, uuid),
  api.jwt_keys()
TO pgtally_api;
