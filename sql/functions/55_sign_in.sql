-- Sign-in through Google and GitHub (the server speaks OAuth with authlib; every rule and every
-- single-use claim is here), and the device authorization grant (RFC 8628) for command lines.

------------------------------------------------------------------------------------------------
-- Provider sign-in
------------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION api.oauth_begin(p_provider text, p_purpose text, p_browser_secret text,
                                           p_session_id uuid, p_device_session_id uuid, p_return_to text, p_ip text,
                                           p_sso_account_id uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_limited jsonb := identity.throttled('oauth', p_ip);
  v_state text := util.random_token();
  v_nonce text := util.random_token();
  v_verifier text := util.random_token();
BEGIN
  IF v_limited IS NOT NULL THEN
    RETURN v_limited;
  END IF;
  IF p_purpose = 'link' THEN
    PERFORM identity.active_session(p_session_id);
  END IF;
  IF p_browser_secret IS NULL OR length(p_browser_secret) < 32 THEN
    PERFORM util.fail('TL422', 'a browser binding secret of at least 32 characters is required');
  END IF;
  IF p_return_to IS NOT NULL AND p_return_to !~ '^/[A-Za-z0-9/_?=&.%+~-]*$' THEN
    p_return_to := NULL;                       -- only paths of this site: never an open redirect
  END IF;
  INSERT INTO identity.oauth_flows (provider, state_hash, browser_hash, nonce, code_verifier, purpose, session_id,
                                    device_session_id, return_to, created_at, expires_at, sso_account_id)
  VALUES (p_provider, util.token_hash(v_state), util.token_hash(p_browser_secret), v_nonce, v_verifier, p_purpose,
          CASE WHEN p_purpose = 'link' THEN p_session_id END, p_device_session_id, left(p_return_to, 2000),
          util.now(), util.now() + interval '10 minutes', CASE WHEN p_provider = 'sso' THEN p_sso_account_id END);
  RETURN jsonb_build_object('state', v_state, 'nonce', v_nonce, 'code_verifier', v_verifier);
END $$;
COMMENT ON FUNCTION api.oauth_begin(text, text, text, uuid, uuid, text, text, uuid) IS
  'GET /auth/{provider}/start (and /auth/sso/start, p_sso_account_id: the team whose provider signs in): a new authorization-code flow: state, nonce and PKCE code_verifier (RFC 7636, S256 by the server), stored with the hash of the browser''s binding cookie, single use within 10 minutes. purpose sign_in, or link (p_session_id: the signed-in session). Rate limited per IP (identity.rate_limit_rules, TL429).';

CREATE OR REPLACE FUNCTION api.oauth_claim(p_state text, p_browser_secret text, p_ip text, p_user_agent text)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  f identity.oauth_flows;
BEGIN
  -- The claim: a state is used once, whoever presents it.
  UPDATE identity.oauth_flows SET used_at = util.now()
  WHERE state_hash = util.token_hash(p_state) AND used_at IS NULL AND expires_at > util.now()
  RETURNING * INTO f;
  IF f.id IS NULL OR f.browser_hash <> util.token_hash(p_browser_secret) THEN
    PERFORM identity.log_event('oauth_refused', NULL, NULL, NULL, p_ip, p_user_agent,
      jsonb_build_object('reason', CASE WHEN f.id IS NULL THEN 'unknown, used or expired state' ELSE 'another browser' END,
                         'provider', f.provider));
    RETURN identity.error('TL400', 'this sign-in link is not valid, was used already, has expired or was started in another browser: start again');
  END IF;
  RETURN jsonb_build_object('provider', f.provider, 'purpose', f.purpose, 'nonce', f.nonce,
                            'code_verifier', f.code_verifier, 'session_id', f.session_id,
                            'device_session_id', f.device_session_id, 'return_to', f.return_to,
                            'sso_account_id', f.sso_account_id);
END $$;
COMMENT ON FUNCTION api.oauth_claim(text, text, text, text) IS
  'GET /auth/{provider}/callback, step 1: use the flow of this state, once, from the browser that started it (its binding cookie); returns its provider, purpose, nonce and PKCE verifier. A replayed, expired, unknown or foreign state is refused (TL400) and logged as oauth_refused.';

CREATE OR REPLACE FUNCTION identity.link_identity(p_user_id uuid, p_provider text, p_subject text, p_email text,
                                                  p_email_verified boolean)
RETURNS void
LANGUAGE sql AS $$
  INSERT INTO identity.user_identities (provider, subject, user_id, email, email_verified, linked_at, last_sign_in_at)
  VALUES (p_provider, p_subject, p_user_id, left(p_email, 320), coalesce(p_email_verified, false), util.now(), util.now())
$$;
COMMENT ON FUNCTION identity.link_identity(uuid, text, text, text, boolean) IS 'Link a provider account to a user.';

CREATE OR REPLACE FUNCTION api.oauth_sign_in(p_provider text, p_subject text, p_email text, p_email_verified boolean,
                                             p_device_session_id uuid, p_ip text, p_user_agent text,
                                             p_referral_code text DEFAULT NULL, p_sso_account_id uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  i identity.user_identities;
  u identity.users;
  v_email text;
  v_account_id uuid;
  v_kind text := 'oauth_sign_in';
  v_tokens jsonb;
BEGIN
  IF p_subject IS NULL OR length(p_subject) NOT BETWEEN 1 AND 200 THEN
    PERFORM util.fail('TL422', 'the provider did not name the user');
  END IF;
  IF p_provider = 'sso' THEN
    -- A team's provider signs in people of the domains the team proved it owns, as members of the team.
    IF p_sso_account_id IS NULL OR identity.sso_team_of(p_email) IS DISTINCT FROM p_sso_account_id THEN
      PERFORM identity.log_event('oauth_refused', NULL, NULL, NULL, p_ip, p_user_agent,
                                 jsonb_build_object('provider', 'sso', 'reason', 'email domain not of the team'));
      RETURN identity.error('TL403', 'this provider signs in addresses of its team''s domains only');
    ELSIF NOT coalesce(p_email_verified, false) THEN
      PERFORM identity.log_event('oauth_refused', NULL, NULL, NULL, p_ip, p_user_agent,
                                 jsonb_build_object('provider', 'sso', 'reason', 'unverified email'));
      RETURN identity.error('TL403', 'your organisation''s provider did not confirm your address: ask its administrator');
    END IF;
    p_subject := p_sso_account_id || ':' || p_subject;    -- subjects are per provider, and each team has its own
  END IF;
  SELECT * INTO i FROM identity.user_identities WHERE provider = p_provider AND subject = p_subject FOR UPDATE;
  IF NOT FOUND AND p_email IS NOT NULL THEN
    SELECT * INTO u FROM identity.users WHERE email_normalized = lower(btrim(p_email));
  ELSE
    SELECT * INTO u FROM identity.users WHERE id = i.user_id;
  END IF;
  IF p_provider <> 'sso' AND u.id IS NOT NULL AND identity.sso_required(u.id) THEN
    -- Only members of a team that requires its provider, of a domain the team proved.
    RETURN identity.error('TL403', 'your organisation signs you in through its own provider: use single sign-on',
                          jsonb_build_object('sso_url', '/auth/sso/start?email=' || u.email_normalized));
  END IF;
  IF i.user_id IS NOT NULL THEN
    UPDATE identity.user_identities SET last_sign_in_at = util.now(), email = coalesce(left(p_email, 320), email),
                                        email_verified = coalesce(p_email_verified, email_verified)
    WHERE provider = p_provider AND subject = p_subject;
  ELSE
    IF p_email IS NULL THEN
      PERFORM identity.log_event('oauth_refused', NULL, NULL, NULL, p_ip, p_user_agent,
                                 jsonb_build_object('provider', p_provider, 'reason', 'no email'));
      RETURN identity.error('TL422', format('%s did not share an email address: make one visible there, or sign up with a password', initcap(p_provider)));
    END IF;
    v_email := identity.normalize_email(p_email);
    SELECT * INTO u FROM identity.users WHERE email_normalized = v_email FOR UPDATE;
    IF FOUND AND NOT coalesce(p_email_verified, false) THEN
      -- Linking on an unverified address would let whoever controls that provider account in.
      PERFORM identity.log_event('oauth_refused', u.id, u.account_id, NULL, p_ip, p_user_agent,
                                 jsonb_build_object('provider', p_provider, 'reason', 'unverified email of an existing user'));
      RETURN identity.error('TL40C', format('an account with this email exists: sign in with your password, then link %s from your account page', initcap(p_provider)));
    ELSIF FOUND AND p_provider = 'sso' THEN
      -- A team's provider never takes over a user who did not link it: the user confirms by email.
      RETURN identity.request_sso_link(u, p_sso_account_id, p_subject, p_email, p_ip, p_user_agent);
    ELSIF FOUND THEN
      v_kind := 'oauth_linked';
    ELSE
      v_kind := 'oauth_signup';
      v_account_id := util.uuid_v7();
      INSERT INTO identity.users (account_id, email, email_normalized, password_hash, email_verified_at, created_at,
                                  password_changed_at)
      VALUES (v_account_id, btrim(p_email), v_email, NULL, NULL, util.now(), util.now())
      ON CONFLICT (email_normalized) DO NOTHING
      RETURNING * INTO u;
      IF u.id IS NULL THEN
        PERFORM util.fail('TL503', 'a sign-up with this email is under way: try again');
      END IF;
      PERFORM identity.new_personal_account(u.id, v_account_id);
      PERFORM billing.attribute_referral(v_account_id, p_referral_code, p_ip, NULL,
                                         (SELECT account_id FROM identity.sessions WHERE id = p_device_session_id));
    END IF;
    PERFORM identity.link_identity(u.id, p_provider, p_subject, p_email, p_email_verified);
    IF p_email_verified THEN
      PERFORM identity.mark_email_verified(u.id);
    END IF;
  END IF;
  IF p_provider = 'sso' THEN
    INSERT INTO identity.memberships (account_id, user_id, role, created_at)
    VALUES (p_sso_account_id, u.id, 'member', util.now()) ON CONFLICT (account_id, user_id) DO NOTHING;
  END IF;
  v_tokens := identity.start_session(u.account_id, u.id, p_ip, p_user_agent, p_provider);
  PERFORM identity.log_event(v_kind, u.id, u.account_id, (v_tokens ->> 'session_id')::uuid, p_ip, p_user_agent,
                             jsonb_build_object('provider', p_provider, 'team', p_sso_account_id));
  IF p_device_session_id IS NOT NULL THEN
    PERFORM identity.merge_device(p_device_session_id, u.account_id, p_ip, p_user_agent);
  END IF;
  RETURN v_tokens || jsonb_build_object('new_user', v_kind = 'oauth_signup');
END $$;
COMMENT ON FUNCTION api.oauth_sign_in(text, text, text, boolean, uuid, text, text, text, uuid) IS
  'GET /auth/{provider}/callback, step 2 after the server checked the provider''s answer (ID token: issuer, audience, expiry, nonce): sign in the user linked to this provider account; else link it to the user with the same email when the provider says the address is verified (otherwise TL40C: sign in with the password and link from the account page); else create the user and a personal account on the free plan (email verified when the provider says so, identity.mark_email_verified; p_referral_code: the /r/ link that brought the person, billing.attribute_referral). Merges the browser''s anonymous device. Provider sso (a team''s own, p_sso_account_id): only addresses it says are verified, of the domains the team proved, who join it as members; an existing user who never linked the team''s provider is not signed in but sent a confirmation link (identity.request_sso_link: status sso_link_email_sent). Members of a team that requires SSO, of a domain it proved, may not use Google or GitHub (TL403 with sso_url). Logged as oauth_sign_in, oauth_linked, oauth_signup or oauth_refused. Returns identity.tokens and new_user.';

CREATE OR REPLACE FUNCTION api.oauth_link(p_session_id uuid, p_provider text, p_subject text, p_email text,
                                          p_email_verified boolean, p_ip text, p_user_agent text)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  s identity.sessions := identity.active_session(p_session_id);
  v_owner uuid;
BEGIN
  IF s.user_id IS NULL THEN
    PERFORM util.fail('TL403', 'sign in to link a provider');
  END IF;
  SELECT user_id INTO v_owner FROM identity.user_identities WHERE provider = p_provider AND subject = p_subject;
  IF v_owner = s.user_id THEN
    RETURN jsonb_build_object('provider', p_provider, 'linked', true);
  ELSIF v_owner IS NOT NULL THEN
    PERFORM identity.log_event('oauth_refused', s.user_id, s.account_id, s.id, p_ip, p_user_agent,
                               jsonb_build_object('provider', p_provider, 'reason', 'linked to another user'));
    RETURN identity.error('TL40C', format('this %s account already signs in to another pgtally user', initcap(p_provider)));
  ELSIF EXISTS (SELECT 1 FROM identity.user_identities WHERE user_id = s.user_id AND provider = p_provider) THEN
    PERFORM util.fail('TL40C', format('another %s account is linked already: unlink it first', initcap(p_provider)));
  END IF;
  PERFORM identity.link_identity(s.user_id, p_provider, p_subject, p_email, p_email_verified);
  PERFORM identity.log_event('oauth_linked', s.user_id, s.account_id, s.id, p_ip, p_user_agent,
                             jsonb_build_object('provider', p_provider));
  RETURN jsonb_build_object('provider', p_provider, 'linked', true);
END $$;
COMMENT ON FUNCTION api.oauth_link(uuid, text, text, text, boolean, text, text) IS
  'The account page''s "link Google/GitHub": link the provider account to the signed-in user. TL40C when it signs in to another user, or another account of that provider is linked.';

CREATE OR REPLACE FUNCTION api.oauth_unlink(p_session_id uuid, p_provider text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  s identity.sessions := identity.active_session(p_session_id);
  u identity.users;
BEGIN
  SELECT * INTO u FROM identity.users WHERE id = s.user_id FOR UPDATE;
  IF NOT FOUND THEN
    PERFORM util.fail('TL403', 'sign in to unlink a provider');
  END IF;
  IF u.password_hash IS NULL AND NOT EXISTS (SELECT 1 FROM identity.user_identities
                                             WHERE user_id = u.id AND provider <> p_provider) THEN
    PERFORM util.fail('TL40C', 'this is your only way to sign in: set a password (reset it by email) or link another provider first');
  END IF;
  DELETE FROM identity.user_identities WHERE user_id = u.id AND provider = p_provider;
  IF NOT FOUND THEN
    PERFORM util.fail('TL404', format('%s is not linked', initcap(p_provider)));
  END IF;
  PERFORM identity.log_event('oauth_unlinked', u.id, u.account_id, s.id, NULL, NULL, jsonb_build_object('provider', p_provider));
  RETURN jsonb_build_object('provider', p_provider, 'linked', false);
END $$;
COMMENT ON FUNCTION api.oauth_unlink(uuid, text) IS
  'The account page''s "unlink": allowed while another way to sign in remains (a password or another provider); TL40C otherwise, TL404 when not linked.';

CREATE OR REPLACE FUNCTION identity.identity_name(p_provider text, p_email text) RETURNS text
LANGUAGE plpgsql STABLE AS $$
BEGIN
  RETURN CASE p_provider WHEN 'google' THEN 'Google' WHEN 'github' THEN 'GitHub'
         ELSE coalesce((SELECT a.name FROM identity.accounts a WHERE a.id = identity.sso_team_of(p_email)),
                       'Your organisation''s sign-in') END;
END $$;
COMMENT ON FUNCTION identity.identity_name(text, text) IS
  'What a person calls a linked identity: Google, GitHub, or for a team''s own provider (sso) the name of the team whose proven domain the identity''s address is in (identity.sso_team_of), else "Your organisation''s sign-in" (the team turned SSO off or lost the domain).';

CREATE OR REPLACE FUNCTION api.sign_in_methods(p_session_id uuid) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  s identity.sessions := identity.active_session(p_session_id);
BEGIN
  RETURN jsonb_build_object(
    'password', (SELECT password_hash IS NOT NULL FROM identity.users WHERE id = s.user_id),
    'identities', coalesce((SELECT jsonb_agg(jsonb_build_object('provider', i.provider, 'email', i.email,
                                                                'name', identity.identity_name(i.provider, i.email),
                                                                'linked_at', util.iso(i.linked_at),
                                                                'last_sign_in_at', util.iso(i.last_sign_in_at))
                                             ORDER BY i.provider)
                            FROM identity.user_identities i WHERE i.user_id = s.user_id), '[]'));
END $$;
COMMENT ON FUNCTION api.sign_in_methods(uuid) IS
  'The account page: whether the user has a password, and the linked providers {provider, email, name (identity.identity_name), linked_at, last_sign_in_at}.';

------------------------------------------------------------------------------------------------
-- Device authorization grant (RFC 8628)
------------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION identity.normalize_user_code(p_code text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
  SELECT upper(regexp_replace(coalesce(p_code, ''), '[^A-Za-z]', '', 'g'))
$$;
COMMENT ON FUNCTION identity.normalize_user_code(text) IS
  'A user code as typed (any case, with or without the dash or spaces) in its stored form: XXXX-XXXX -> XXXXXXXX (RFC 8628 section 6.1).';

CREATE OR REPLACE FUNCTION api.device_authorize(p_client_id text, p_scope text, p_device_session_id uuid,
                                                p_ip text, p_user_agent text)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_limited jsonb := identity.throttled('device_authorize', p_ip);
  v_alphabet constant text := 'BCDFGHJKLMNPQRSTVWXZ';
  v_device_code text := util.random_token();
  v_user_code text;
  v_bytes bytea;
BEGIN
  IF v_limited IS NOT NULL THEN
    RETURN v_limited;
  END IF;
  IF p_client_id IS NULL OR p_client_id !~ '^[A-Za-z0-9_.:-]{1,100}$' THEN
    PERFORM util.fail('TL422', 'client_id: 1 to 100 letters, digits and ._:-', '{"field": "client_id"}');
  END IF;
  LOOP
    -- 8 characters from a 20-letter alphabet: 34.6 bits, enough for 10 minutes with guesses limited.
    v_bytes := uuid_send(gen_random_uuid());
    SELECT string_agg(substr(v_alphabet, get_byte(v_bytes, i) % 20 + 1, 1), '' ORDER BY i)
    INTO v_user_code FROM generate_series(0, 7) i;
    EXIT WHEN NOT EXISTS (SELECT 1 FROM identity.device_codes WHERE user_code = v_user_code AND status = 'pending');
  END LOOP;
  INSERT INTO identity.device_codes (device_code_hash, user_code, client_id, scope, ip, user_agent, device_session_id,
                                     created_at, expires_at)
  VALUES (util.token_hash(v_device_code), v_user_code, p_client_id, left(p_scope, 200), left(p_ip, 64),
          left(p_user_agent, 512), p_device_session_id, util.now(), util.now() + interval '10 minutes');
  PERFORM identity.log_event('device_code_requested', NULL, NULL, p_device_session_id, p_ip, p_user_agent,
                             jsonb_build_object('client_id', p_client_id));
  RETURN jsonb_build_object('device_code', v_device_code, 'user_code', left(v_user_code, 4) || '-' || right(v_user_code, 4),
                            'expires_in', 600, 'interval', 5);
END $$;
COMMENT ON FUNCTION api.device_authorize(text, text, uuid, text, text) IS
  'POST /oauth/device_authorization (RFC 8628 section 3.1-3.2): a device code (secret, stored hashed) and a user code (XXXX-XXXX) valid 10 minutes, polled every 5 seconds. p_device_session_id: the command line''s anonymous device session, merged into the user on approval. Rate limited per IP (identity.rate_limit_rules, TL429).';

CREATE OR REPLACE FUNCTION identity.oauth_error(p_error text, p_description text) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
  SELECT jsonb_build_object('oauth_error', jsonb_build_object('error', p_error, 'error_description', p_description))
$$;
COMMENT ON FUNCTION identity.oauth_error(text, text) IS
  'An OAuth token endpoint error (RFC 6749 section 5.2, RFC 8628 section 3.5), returned so that what the call wrote commits: {"oauth_error": {"error", "error_description"}}.';

CREATE OR REPLACE FUNCTION api.device_token(p_device_code text, p_client_id text, p_ip text, p_user_agent text)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  d identity.device_codes;
  u identity.users;
  v_tokens jsonb;
BEGIN
  -- Polls of one code queue here: exactly one of any number of concurrent polls gets the tokens.
  SELECT * INTO d FROM identity.device_codes WHERE device_code_hash = util.token_hash(p_device_code) FOR UPDATE;
  IF NOT FOUND OR d.client_id IS DISTINCT FROM p_client_id THEN
    RETURN identity.oauth_error('invalid_grant', 'unknown device code, or issued to another client');
  END IF;
  IF d.issued_at IS NOT NULL THEN
    RETURN identity.oauth_error('invalid_grant', 'this device code was already exchanged for tokens');
  END IF;
  IF d.expires_at <= util.now() THEN
    RETURN identity.oauth_error('expired_token', 'the device code has expired: start again');
  END IF;
  IF d.last_polled_at > util.now() - make_interval(secs => d.interval_seconds) THEN
    UPDATE identity.device_codes SET interval_seconds = least(interval_seconds + 5, 120), last_polled_at = util.now()
    WHERE id = d.id;
    RETURN identity.oauth_error('slow_down', format('poll at most every %s seconds', least(d.interval_seconds + 5, 120)));
  END IF;
  UPDATE identity.device_codes SET last_polled_at = util.now() WHERE id = d.id;
  IF d.status = 'pending' THEN
    RETURN identity.oauth_error('authorization_pending', 'waiting for the user to approve the code');
  ELSIF d.status = 'denied' THEN
    RETURN identity.oauth_error('access_denied', 'the user denied the request');
  END IF;
  UPDATE identity.device_codes SET issued_at = util.now() WHERE id = d.id;
  SELECT * INTO u FROM identity.users WHERE id = d.user_id;
  v_tokens := identity.start_session(u.account_id, u.id, p_ip, p_user_agent, 'device_code');
  PERFORM identity.log_event('device_code_issued', u.id, u.account_id, (v_tokens ->> 'session_id')::uuid, p_ip, p_user_agent,
                             jsonb_build_object('client_id', d.client_id));
  RETURN v_tokens;
END $$;
COMMENT ON FUNCTION api.device_token(text, text, text, text) IS
  'POST /oauth/token with grant_type urn:ietf:params:oauth:grant-type:device_code (RFC 8628 section 3.4-3.5): the tokens of a new session once the user approved, exactly once; otherwise {"oauth_error": {error}} with authorization_pending, slow_down (polled faster than the interval, which grows by 5 s), access_denied, expired_token or invalid_grant.';

CREATE OR REPLACE FUNCTION identity.pending_device_code(p_session_id uuid, p_user_code text, p_ip text,
                                                        OUT d identity.device_codes, OUT error jsonb)
LANGUAGE plpgsql AS $$
DECLARE
  s identity.sessions := identity.active_session(p_session_id);
  v_code text := identity.normalize_user_code(p_user_code);
BEGIN
  IF s.user_id IS NULL THEN
    PERFORM util.fail('TL403', 'sign in to approve a device');
  END IF;
  -- Guesses: limited per IP and per user, and lookups of any one code (identity.rate_limit_rules).
  error := identity.throttled('device_code', p_ip, 'user', s.user_id::text);
  IF error IS NULL THEN
    error := identity.throttled('device_code_lookup', NULL, 'code', v_code);
  END IF;
  IF error IS NOT NULL THEN
    RETURN;
  END IF;
  SELECT * INTO d FROM identity.device_codes
  WHERE user_code = v_code AND status = 'pending' AND expires_at > util.now() FOR UPDATE;
  IF NOT FOUND THEN
    error := identity.error('TL404', 'no waiting request with this code: check it, or start again on the device');
  END IF;
END $$;
COMMENT ON FUNCTION identity.pending_device_code(uuid, text, text) IS
  'The pending, unexpired device code a signed-in user typed, locked; or an error (TL404 unknown, decided or expired; TL429 too many guesses) to return.';

CREATE OR REPLACE FUNCTION api.device_lookup(p_session_id uuid, p_user_code text, p_ip text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  r record;
BEGIN
  SELECT * INTO r FROM identity.pending_device_code(p_session_id, p_user_code, p_ip);
  IF r.error IS NOT NULL THEN
    RETURN r.error;
  END IF;
  RETURN jsonb_build_object('user_code', left((r.d).user_code, 4) || '-' || right((r.d).user_code, 4),
                            'client_id', (r.d).client_id, 'scope', (r.d).scope, 'ip', (r.d).ip,
                            'user_agent', (r.d).user_agent, 'created_at', util.iso((r.d).created_at),
                            'expires_at', util.iso((r.d).expires_at));
END $$;
COMMENT ON FUNCTION api.device_lookup(uuid, text, text) IS
  '/device: which client asks with this user code (client_id, scope, where from), for the signed-in user to approve or deny. Errors as identity.pending_device_code.';

CREATE OR REPLACE FUNCTION api.device_decide(p_session_id uuid, p_user_code text, p_approve boolean, p_ip text,
                                             p_user_agent text)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  r record;
  s identity.sessions := identity.active_session(p_session_id);
BEGIN
  SELECT * INTO r FROM identity.pending_device_code(p_session_id, p_user_code, p_ip);
  IF r.error IS NOT NULL THEN
    RETURN r.error;
  END IF;
  UPDATE identity.device_codes
  SET status = CASE WHEN p_approve THEN 'approved' ELSE 'denied' END, user_id = s.user_id, decided_at = util.now()
  WHERE id = (r.d).id;
  PERFORM identity.log_event(CASE WHEN p_approve THEN 'device_code_approved' ELSE 'device_code_denied' END,
                             s.user_id, s.account_id, s.id, p_ip, p_user_agent,
                             jsonb_build_object('client_id', (r.d).client_id));
  IF p_approve AND (r.d).device_session_id IS NOT NULL THEN
    PERFORM identity.merge_device((r.d).device_session_id, s.account_id, p_ip, p_user_agent);
  END IF;
  RETURN jsonb_build_object('client_id', (r.d).client_id, 'approved', p_approve);
END $$;
COMMENT ON FUNCTION api.device_decide(uuid, text, boolean, text, text) IS
  '/device: approve or deny a pending user code, once (a second decision finds no pending code: TL404). On approval the command line''s anonymous device account is merged into the user, once.';

GRANT EXECUTE ON FUNCTION
  api.oauth_begin(text, text, text, uuid, uuid, text, text, uuid), api.oauth_claim(text, text, text, text),
  api.oauth_sign_in(text, text, text, boolean, uuid, text, text, text, uuid),
  api.oauth_link(uuid, text, text, text, boolean, text, text), api.oauth_unlink(uuid, text),
  api.sign_in_methods(uuid), api.device_authorize(text, text, uuid, text, text),
  api.device_token(text, text, text, text), api.device_lookup(uuid, text, text),
  api.device_decide(uuid, text, boolean, text, text)
TO pgtally_api;
