-- pgtally as an OpenID Connect provider (issue 25): registered clients, the authorization
-- endpoint's decisions, single-use authorization codes, the code and refresh grants of
-- /oauth/token, userinfo, RP-initiated logout, the ID-token signing keys and CORS origins.
-- The server signs what these functions return (joserfc); every rule and claim is here.
-- Sources: OpenID Connect Core 1.0, Discovery 1.0, RP-Initiated Logout 1.0, RFC 6749, RFC 7636,
-- RFC 9700 (OAuth 2.0 security BCP).
--
-- PL/pgSQL throughout: these files are re-applied on databases migrated only part way (upgrade
-- tests), where a LANGUAGE sql body naming the tables of 0031 would not compile.

CREATE OR REPLACE FUNCTION identity.oidc_scopes() RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
  SELECT '{openid,profile,email,offline_access,usage:read,usage:write,billing:read,billing:manage}'::text[]
$$;
COMMENT ON FUNCTION identity.oidc_scopes() IS
  'The scopes a client may ask for: OpenID Connect''s (openid, profile, email, offline_access) and the API-key scopes its access tokens then hold on the JSON API (usage:read, usage:write, billing:read, billing:manage).';

CREATE OR REPLACE FUNCTION identity.oidc_origin(p_uri text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
  SELECT lower(substring(p_uri FROM '^([A-Za-z][A-Za-z0-9+.-]*://[^/?#]+)'))
$$;
COMMENT ON FUNCTION identity.oidc_origin(text) IS 'The origin (scheme://host[:port], lower case) of a URI, as a browser sends it in Origin.';

CREATE OR REPLACE FUNCTION identity.oidc_check_uris(p_uris text[], p_what text) RETURNS text[]
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
  v text;
BEGIN
  FOREACH v IN ARRAY coalesce(p_uris, '{}') LOOP
    -- https anywhere; plain http only on this machine's loopback (RFC 8252 section 7.3); no fragment.
    IF length(v) > 500 OR v !~ '^(https://[^/?#[:space:]@]+|http://(127\.0\.0\.1|localhost|\[::1\])(:[0-9]{1,5})?)(/[^#[:space:]]*)?$' THEN
      PERFORM util.fail('TL422', format('%s %L is not an https URI (or http on 127.0.0.1, localhost or [::1]) without a fragment',
                                        p_what, v), jsonb_build_object('field', p_what));
    END IF;
  END LOOP;
  RETURN coalesce(p_uris, '{}');
END $$;
COMMENT ON FUNCTION identity.oidc_check_uris(text[], text) IS
  'Check redirect URIs: absolute https (a browser extension''s https://<extension-id>.chromiumapp.org/ too), or http on loopback for native apps (RFC 8252), no fragment, no user info, at most 500 characters. TL422 naming the first bad one.';

------------------------------------------------------------------------------------------------
-- Clients (pgtally clients create/list/revoke)
------------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION api.oidc_create_client(p_name text, p_redirect_uris text[], p_public boolean,
                                                  p_first_party boolean, p_origins text[] DEFAULT '{}',
                                                  p_post_logout_redirect_uris text[] DEFAULT '{}')
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_id text := 'pgc_' || left(util.random_token(), 32);
  v_secret text := CASE WHEN NOT p_public THEN 'pgcs_' || util.random_token() END;
  v_origin text;
BEGIN
  IF p_name IS NULL OR length(btrim(p_name)) NOT BETWEEN 1 AND 100 THEN
    PERFORM util.fail('TL422', 'a client name of 1 to 100 characters is required', '{"field": "name"}');
  END IF;
  IF cardinality(p_redirect_uris) IS NULL OR cardinality(p_redirect_uris) NOT BETWEEN 1 AND 20 THEN
    PERFORM util.fail('TL422', 'a client needs 1 to 20 redirect URIs', '{"field": "redirect_uri"}');
  END IF;
  PERFORM identity.oidc_check_uris(p_redirect_uris, 'redirect_uri');
  PERFORM identity.oidc_check_uris(p_post_logout_redirect_uris, 'post_logout_redirect_uri');
  FOREACH v_origin IN ARRAY coalesce(p_origins, '{}') LOOP
    IF v_origin !~ '^[a-z][a-z0-9+.-]*://[a-z0-9.-]+(:[0-9]{1,5})?$' OR v_origin ~ '^http://' AND v_origin !~ '^http://(127\.0\.0\.1|localhost)(:|$)' THEN
      PERFORM util.fail('TL422', format('origin %L is not scheme://host[:port] in lower case (https, chrome-extension, ...; http only on loopback)',
                                        v_origin), '{"field": "origin"}');
    END IF;
  END LOOP;
  INSERT INTO identity.oauth_clients (id, name, secret_hash, first_party, redirect_uris, post_logout_redirect_uris, origins, created_at)
  VALUES (v_id, btrim(p_name), CASE WHEN v_secret IS NOT NULL THEN util.token_hash(v_secret) END, coalesce(p_first_party, false), p_redirect_uris,
          coalesce(p_post_logout_redirect_uris, '{}'), coalesce(p_origins, '{}'), util.now());
  RETURN jsonb_build_object('client_id', v_id, 'client_secret', v_secret, 'name', btrim(p_name),
                            'public', p_public, 'first_party', coalesce(p_first_party, false),
                            'redirect_uris', to_jsonb(p_redirect_uris),
                            'post_logout_redirect_uris', to_jsonb(coalesce(p_post_logout_redirect_uris, '{}')),
                            'origins', to_jsonb(coalesce(p_origins, '{}')));
END $$;
COMMENT ON FUNCTION api.oidc_create_client(text, text[], boolean, boolean, text[], text[]) IS
  '`pgtally clients create`: register an OpenID Connect client. Confidential clients get a secret (pgcs_..., returned once, stored as SHA-256); public ones (p_public: browser apps, extensions) none, and must use PKCE S256. p_first_party: no consent screen. Redirect and post-logout URIs: identity.oidc_check_uris; p_origins: extra CORS origins. TL422 bad input.';

CREATE OR REPLACE FUNCTION api.oidc_list_clients() RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  RETURN (SELECT coalesce(jsonb_agg(jsonb_build_object(
           'client_id', c.id, 'name', c.name, 'public', c.secret_hash IS NULL, 'first_party', c.first_party,
           'redirect_uris', to_jsonb(c.redirect_uris), 'post_logout_redirect_uris', to_jsonb(c.post_logout_redirect_uris),
           'origins', to_jsonb(c.origins), 'created_at', util.iso(c.created_at), 'revoked_at', util.iso(c.revoked_at))
         ORDER BY c.created_at, c.id), '[]')
  FROM identity.oauth_clients c);
END $$;
COMMENT ON FUNCTION api.oidc_list_clients() IS '`pgtally clients list`: every client, oldest first, revoked ones marked (never a secret).';

CREATE OR REPLACE FUNCTION api.oidc_revoke_client(p_client_id text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_count integer;
BEGIN
  UPDATE identity.oauth_clients SET revoked_at = util.now() WHERE id = p_client_id AND revoked_at IS NULL;
  IF NOT FOUND THEN
    PERFORM util.fail('TL404', format('no active client %s', p_client_id));
  END IF;
  UPDATE identity.sessions SET revoked_at = util.now(), revoked_reason = 'client_revoked'
  WHERE client_id = p_client_id AND revoked_at IS NULL;
  GET DIAGNOSTICS v_count = ROW_COUNT;
  RETURN jsonb_build_object('client_id', p_client_id, 'revoked', true, 'sessions_revoked', v_count);
END $$;
COMMENT ON FUNCTION api.oidc_revoke_client(text) IS
  '`pgtally clients revoke`: the client can no longer sign anyone in, and every session (access and refresh token) it holds ends now. TL404 unknown or already revoked.';

CREATE OR REPLACE FUNCTION identity.oidc_client_auth(p_client_id text, p_client_secret text) RETURNS text
LANGUAGE plpgsql STABLE AS $$
BEGIN
  RETURN (SELECT c.id FROM identity.oauth_clients c
          WHERE c.id = p_client_id AND c.revoked_at IS NULL
            AND CASE WHEN c.secret_hash IS NULL THEN p_client_secret IS NULL
                     ELSE p_client_secret IS NOT NULL AND c.secret_hash = util.token_hash(p_client_secret) END);
END $$;
COMMENT ON FUNCTION identity.oidc_client_auth(text, text) IS
  'Client authentication at the token endpoint (RFC 6749 section 2.3): the active client''s id, when a confidential client sent its secret (Basic or form) or a public one sent none; NULL otherwise (invalid_client).';

------------------------------------------------------------------------------------------------
-- Claims
------------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION identity.oidc_claims(p_session_id uuid) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
  RETURN (SELECT jsonb_strip_nulls(jsonb_build_object(
           'sub', u.id::text,
           'email', CASE WHEN 'email' = ANY (s.scopes) THEN u.email END,
           'email_verified', CASE WHEN 'email' = ANY (s.scopes) THEN u.email_verified_at IS NOT NULL END,
           'name', CASE WHEN 'profile' = ANY (s.scopes) THEN coalesce(a.name, u.email) END))
         || jsonb_build_object('https://pgtally.dev/claims', jsonb_build_object(
           'account_id', a.id, 'plan', identity.effective_plan(a),
           'teams', coalesce((SELECT jsonb_agg(jsonb_build_object('account_id', t.id, 'name', t.name, 'role', m.role)
                                               ORDER BY t.created_at, t.id)
                              FROM identity.memberships m JOIN identity.accounts t ON t.id = m.account_id
                              WHERE m.user_id = u.id AND t.kind = 'team' AND t.merged_into IS NULL), '[]')))
  FROM identity.sessions s JOIN identity.users u ON u.id = s.user_id JOIN identity.accounts a ON a.id = u.account_id
  WHERE s.id = p_session_id);
END $$;
COMMENT ON FUNCTION identity.oidc_claims(uuid) IS
  'The person''s claims for a client session: sub (the stable user id), email and email_verified (scope email), name (scope profile: the account''s name, else the email), and the namespaced https://pgtally.dev/claims {account_id, plan, teams [{account_id, name, role}]}.';

CREATE OR REPLACE FUNCTION identity.oidc_id_token(p_session_id uuid, p_nonce text) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
  RETURN (SELECT identity.oidc_claims(s.id)
         || jsonb_strip_nulls(jsonb_build_object('aud', s.client_id, 'sid', s.id, 'nonce', p_nonce,
                                                 'auth_time', floor(extract(epoch FROM s.auth_time))::bigint))
  FROM identity.sessions s WHERE s.id = p_session_id);
END $$;
COMMENT ON FUNCTION identity.oidc_id_token(uuid, text) IS
  'The ID token claims of a client session (OpenID Connect Core section 2) except iss, iat and exp, which the signing server adds: identity.oidc_claims plus aud (the client id), sid (the session), nonce (the authorization request''s) and auth_time (seconds since the epoch).';

------------------------------------------------------------------------------------------------
-- Authorization endpoint
------------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION identity.oidc_forget_old_codes() RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
  v_count integer;
BEGIN
  DELETE FROM identity.authorization_codes
  WHERE id IN (SELECT id FROM identity.authorization_codes WHERE expires_at < util.now() - interval '1 day'
               ORDER BY expires_at LIMIT 100 FOR UPDATE SKIP LOCKED);
  GET DIAGNOSTICS v_count = ROW_COUNT;
  RETURN v_count;
END $$;
COMMENT ON FUNCTION identity.oidc_forget_old_codes() IS
  'Delete up to 100 authorization codes that expired more than a day ago (a code lives 60 seconds; a replay that late is refused as unknown). Called with each new code, so the table stays small without a worker.';

CREATE OR REPLACE FUNCTION api.oidc_authorize(p_session_id uuid, p_client_id text, p_redirect_uri text,
                                              p_response_type text, p_scope text, p_code_challenge text,
                                              p_code_challenge_method text, p_nonce text, p_decision text,
                                              p_ip text, p_user_agent text)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  c record;
  s identity.sessions;
  v_scopes text[];
  v_code text;
BEGIN
  SELECT * INTO c FROM identity.oauth_clients WHERE id = p_client_id AND revoked_at IS NULL;
  IF NOT FOUND THEN
    RETURN jsonb_build_object('refuse', 'unknown or revoked client_id');
  END IF;
  IF p_redirect_uri IS NULL OR NOT p_redirect_uri = ANY (c.redirect_uris) THEN
    -- Never redirect to a URI that is not registered (RFC 6749 section 4.1.2.1).
    RETURN jsonb_build_object('refuse', 'redirect_uri is not one registered for this client');
  END IF;
  IF p_response_type IS DISTINCT FROM 'code' THEN
    RETURN identity.oauth_error('unsupported_response_type', 'only response_type=code (the authorization code flow) is supported');
  END IF;
  v_scopes := ARRAY(SELECT DISTINCT x FROM regexp_split_to_table(btrim(coalesce(p_scope, 'openid')), '\s+') x WHERE x <> '' ORDER BY x);
  IF cardinality(v_scopes) = 0 OR NOT v_scopes <@ identity.oidc_scopes() THEN
    RETURN identity.oauth_error('invalid_scope', 'scopes are among ' || array_to_string(identity.oidc_scopes(), ' '));
  END IF;
  IF p_code_challenge IS NULL AND c.secret_hash IS NULL THEN
    RETURN identity.oauth_error('invalid_request', 'a public client must send code_challenge with code_challenge_method=S256 (PKCE, RFC 7636)');
  END IF;
  IF p_code_challenge IS NOT NULL AND p_code_challenge_method IS DISTINCT FROM 'S256' THEN
    RETURN identity.oauth_error('invalid_request', 'code_challenge_method must be S256');
  END IF;
  IF p_code_challenge IS NULL AND p_code_challenge_method IS NOT NULL OR p_code_challenge !~ '^[A-Za-z0-9_-]{43}$' THEN
    RETURN identity.oauth_error('invalid_request', 'code_challenge must be BASE64URL(SHA-256(code_verifier)): 43 characters');
  END IF;
  IF length(p_nonce) > 500 THEN
    RETURN identity.oauth_error('invalid_request', 'nonce has at most 500 characters');
  END IF;
  SELECT * INTO s FROM identity.sessions
  WHERE id = p_session_id AND revoked_at IS NULL AND expires_at > util.now() AND user_id IS NOT NULL AND client_id IS NULL;
  IF NOT FOUND THEN
    RETURN jsonb_build_object('login', true, 'client_name', c.name);
  END IF;
  IF NOT c.first_party AND p_decision IS NULL THEN
    RETURN jsonb_build_object('consent', jsonb_build_object('client_id', c.id, 'client_name', c.name, 'scopes', to_jsonb(v_scopes),
                                                            'redirect_origin', identity.oidc_origin(p_redirect_uri)));
  END IF;
  IF NOT c.first_party AND p_decision IS DISTINCT FROM 'approve' THEN
    PERFORM identity.log_event('oidc_consent_denied', s.user_id, s.account_id, s.id, p_ip, p_user_agent,
                               jsonb_build_object('client_id', c.id));
    RETURN identity.oauth_error('access_denied', 'the person did not allow ' || c.name);
  END IF;
  v_code := util.random_token();
  PERFORM identity.oidc_forget_old_codes();
  INSERT INTO identity.authorization_codes (code_hash, client_id, browser_session_id, redirect_uri, scopes, code_challenge, nonce,
                                            created_at, expires_at)
  VALUES (util.token_hash(v_code), c.id, s.id, p_redirect_uri, v_scopes, p_code_challenge, p_nonce,
          util.now(), util.now() + interval '60 seconds');
  PERFORM identity.log_event('oidc_code_issued', s.user_id, s.account_id, s.id, p_ip, p_user_agent,
                             jsonb_build_object('client_id', c.id, 'scopes', to_jsonb(v_scopes), 'consented', NOT c.first_party));
  RETURN jsonb_build_object('code', v_code, 'client_name', c.name);
END $$;
COMMENT ON FUNCTION api.oidc_authorize(uuid, text, text, text, text, text, text, text, text, text, text) IS
  'GET /oauth/authorize and its consent form (OpenID Connect Core section 3.1.2): {"refuse": why} for an unknown client or a redirect URI not registered exactly (shown, never redirected to); {"oauth_error": {error, error_description}} to send back to the redirect URI (unsupported_response_type, invalid_scope, invalid_request: a public client without PKCE S256, a method other than S256; access_denied: consent refused); {"login": true} when p_session_id is not a signed-in person''s browser session; {"consent": {client_name, scopes, ...}} for a third-party client until p_decision is approve or deny; else {"code": ...}: an authorization code, single use, valid 60 seconds, bound to the client, redirect URI, PKCE challenge, nonce and scopes (stored as its hash).';

------------------------------------------------------------------------------------------------
-- Token endpoint
------------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION api.oidc_token_code(p_client_id text, p_client_secret text, p_code text, p_redirect_uri text,
                                               p_code_verifier text, p_ip text, p_user_agent text)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_client text := identity.oidc_client_auth(p_client_id, p_client_secret);
  c record;
  b identity.sessions;
  v_tokens jsonb;
  v_session_id uuid;
BEGIN
  IF v_client IS NULL THEN
    RETURN identity.oauth_error('invalid_client', 'unknown client, or its authentication failed');
  END IF;
  -- The claim: of any number of exchanges of one code, one wins.
  UPDATE identity.authorization_codes SET used_at = util.now()
  WHERE code_hash = util.token_hash(p_code) AND used_at IS NULL
  RETURNING * INTO c;
  IF NOT FOUND THEN
    SELECT * INTO c FROM identity.authorization_codes WHERE code_hash = util.token_hash(p_code);
    IF c.used_at IS NOT NULL THEN
      -- A replayed code: the tokens it gave are revoked too (RFC 6749 section 4.1.2).
      UPDATE identity.sessions SET revoked_at = util.now(), revoked_reason = 'code_replay'
      WHERE id = c.session_id AND revoked_at IS NULL;
      PERFORM identity.log_event('oidc_code_replayed', NULL, NULL, c.session_id, p_ip, p_user_agent,
                                 jsonb_build_object('client_id', c.client_id));
      RETURN identity.oauth_error('invalid_grant', 'this authorization code was already used: its tokens are revoked');
    END IF;
    RETURN identity.oauth_error('invalid_grant', 'unknown authorization code');
  END IF;
  IF c.expires_at <= util.now() THEN
    RETURN identity.oauth_error('invalid_grant', 'the authorization code has expired (60 seconds)');
  END IF;
  IF c.client_id <> v_client THEN
    RETURN identity.oauth_error('invalid_grant', 'the authorization code was issued to another client');
  END IF;
  IF p_redirect_uri IS DISTINCT FROM c.redirect_uri THEN
    RETURN identity.oauth_error('invalid_grant', 'redirect_uri differs from the authorization request''s');
  END IF;
  IF c.code_challenge IS NOT NULL AND p_code_verifier IS NULL THEN
    RETURN identity.oauth_error('invalid_grant', 'code_verifier is required (PKCE)');
  END IF;
  IF c.code_challenge IS NULL AND p_code_verifier IS NOT NULL THEN
    RETURN identity.oauth_error('invalid_grant', 'no code_challenge was sent with the authorization request');
  END IF;
  IF c.code_challenge IS NOT NULL AND (p_code_verifier !~ '^[A-Za-z0-9._~-]{43,128}$'
      OR util.base64url(sha256(convert_to(p_code_verifier, 'UTF8'))) <> c.code_challenge) THEN
    RETURN identity.oauth_error('invalid_grant', 'code_verifier does not match the code_challenge');
  END IF;
  SELECT * INTO b FROM identity.sessions WHERE id = c.browser_session_id AND revoked_at IS NULL AND expires_at > util.now();
  IF NOT FOUND THEN
    RETURN identity.oauth_error('invalid_grant', 'the person signed out before the code was exchanged');
  END IF;
  v_tokens := identity.start_session(b.account_id, b.user_id, p_ip, p_user_agent, 'oidc');
  v_session_id := (v_tokens ->> 'session_id')::uuid;
  UPDATE identity.sessions SET client_id = v_client, scopes = c.scopes, auth_time = coalesce(b.auth_time, b.created_at)
  WHERE id = v_session_id;
  UPDATE identity.authorization_codes SET session_id = v_session_id WHERE id = c.id;
  PERFORM identity.log_event('oidc_code_exchanged', b.user_id, b.account_id, v_session_id, p_ip, p_user_agent,
                             jsonb_build_object('client_id', v_client));
  RETURN v_tokens || jsonb_build_object('scope', array_to_string(c.scopes, ' '),
                                        'id_token', CASE WHEN 'openid' = ANY (c.scopes) THEN identity.oidc_id_token(v_session_id, c.nonce) END);
END $$;
COMMENT ON FUNCTION api.oidc_token_code(text, text, text, text, text, text, text) IS
  'POST /oauth/token grant_type=authorization_code: authenticate the client (identity.oidc_client_auth: invalid_client), claim the code once (a replay revokes the session the first exchange started: invalid_grant), check expiry, client, exact redirect URI and PKCE (BASE64URL(SHA-256(code_verifier)) = code_challenge; a verifier without a challenge is refused too), then start a session for the client with the granted scopes. Returns identity.tokens plus scope and id_token (the claims to sign, identity.oidc_id_token) or {"oauth_error": ...} (RFC 6749 section 5.2), returned so the claim and a revocation commit.';

CREATE OR REPLACE FUNCTION api.oidc_token_refresh(p_client_id text, p_client_secret text, p_refresh_token text,
                                                  p_ip text, p_user_agent text)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_client text;
  v_tokens jsonb;
BEGIN
  -- A registered client authenticates; the client_id a command line sends with the device grant
  -- names no registered client and is one of pgtally's own sign-ins.
  IF p_client_secret IS NOT NULL OR EXISTS (SELECT 1 FROM identity.oauth_clients WHERE id = p_client_id) THEN
    v_client := identity.oidc_client_auth(p_client_id, p_client_secret);
    IF v_client IS NULL THEN
      RETURN identity.oauth_error('invalid_client', 'unknown client, or its authentication failed');
    END IF;
  END IF;
  v_tokens := identity.refresh_session(p_refresh_token, v_client, p_ip, p_user_agent);
  IF v_tokens ? 'error' THEN
    RETURN identity.oauth_error('invalid_grant', v_tokens #>> '{error,message}');
  END IF;
  IF v_client IS NOT NULL THEN
    v_tokens := v_tokens || (SELECT jsonb_build_object('scope', array_to_string(s.scopes, ' '),
                                                       'id_token', CASE WHEN 'openid' = ANY (s.scopes)
                                                                        THEN identity.oidc_id_token(s.id, NULL) END)
                             FROM identity.sessions s WHERE s.id = (v_tokens ->> 'session_id')::uuid);
  END IF;
  RETURN v_tokens;
END $$;
COMMENT ON FUNCTION api.oidc_token_refresh(text, text, text, text, text) IS
  'POST /oauth/token grant_type=refresh_token: a registered client (or any caller sending a secret) authenticates first (invalid_client) and the token must be one issued to it; otherwise (no client_id, or the unregistered client_id of a device grant), only a token of pgtally''s own sign-ins (a command line''s device grant). Rotation, the 10-second grace for concurrent refreshes and reuse detection (the whole session revoked) are identity.refresh_session''s, as for /v1/auth/refresh. Returns identity.tokens (plus scope and a fresh id_token without nonce for a client) or {"oauth_error": invalid_grant}.';

------------------------------------------------------------------------------------------------
-- UserInfo and RP-initiated logout
------------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION api.oidc_userinfo(p_session_id uuid) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  s identity.sessions;
BEGIN
  SELECT * INTO s FROM identity.sessions WHERE id = p_session_id AND revoked_at IS NULL AND expires_at > util.now();
  IF NOT FOUND THEN
    PERFORM util.fail('TL401', 'the session has ended: sign in again');
  END IF;
  IF s.client_id IS NULL OR NOT 'openid' = ANY (s.scopes) THEN
    PERFORM util.fail('TL403', 'userinfo needs an access token a client obtained with the openid scope');
  END IF;
  RETURN identity.oidc_claims(s.id);
END $$;
COMMENT ON FUNCTION api.oidc_userinfo(uuid) IS
  'GET /oauth/userinfo (OpenID Connect Core section 5.3): the claims of the access token''s person (identity.oidc_claims, as the granted scopes allow). TL401 ended session; TL403 a token without the openid scope or not issued to a client.';

CREATE OR REPLACE FUNCTION api.oidc_end_session(p_browser_session_id uuid, p_hint_session_id uuid, p_client_id text,
                                                p_post_logout_redirect_uri text)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_client text := coalesce(p_client_id, (SELECT client_id FROM identity.sessions WHERE id = p_hint_session_id));
  c record;
  v_count integer;
  v_user uuid;
BEGIN
  IF p_client_id IS NOT NULL AND p_hint_session_id IS NOT NULL
     AND p_client_id IS DISTINCT FROM (SELECT client_id FROM identity.sessions WHERE id = p_hint_session_id) THEN
    PERFORM util.fail('TL400', 'client_id is not the client the id_token_hint was issued to');
  END IF;
  SELECT * INTO c FROM identity.oauth_clients WHERE id = v_client AND revoked_at IS NULL;
  IF p_post_logout_redirect_uri IS NOT NULL AND (c.id IS NULL OR NOT p_post_logout_redirect_uri = ANY (c.post_logout_redirect_uris)) THEN
    PERFORM util.fail('TL400', 'post_logout_redirect_uri is not registered for this client (send id_token_hint or client_id)');
  END IF;
  SELECT user_id INTO v_user FROM identity.sessions WHERE id = p_browser_session_id;
  -- The browser's sign-in, and the client session the hint names when it is that person's.
  UPDATE identity.sessions SET revoked_at = util.now(), revoked_reason = 'logout'
  WHERE revoked_at IS NULL AND (id = p_browser_session_id AND client_id IS NULL
                                OR id = p_hint_session_id AND client_id = c.id
                                   AND (v_user IS NULL OR user_id = v_user));
  GET DIAGNOSTICS v_count = ROW_COUNT;
  IF v_count > 0 THEN
    PERFORM identity.log_event('oidc_logout', v_user, NULL, p_browser_session_id, NULL, NULL,
                               jsonb_build_object('client_id', c.id, 'sessions', v_count));
  END IF;
  RETURN jsonb_build_object('sessions_revoked', v_count, 'client_name', c.name, 'redirect_uri', p_post_logout_redirect_uri);
END $$;
COMMENT ON FUNCTION api.oidc_end_session(uuid, uuid, text, text) IS
  'GET /oauth/logout (OpenID Connect RP-Initiated Logout 1.0): end the browser''s sign-in and the client session named by a verified id_token_hint (its sid), and say where to send the browser: p_post_logout_redirect_uri only when registered for the client (from the hint''s session or p_client_id). TL400, changing nothing, for an unregistered URI or a client_id that is not the hint''s.';

------------------------------------------------------------------------------------------------
-- Signing keys and CORS
------------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION identity.published_signing_keys()
RETURNS TABLE (kid text, public_jwk jsonb, created_at timestamptz)
LANGUAGE plpgsql STABLE AS $$
BEGIN
  RETURN QUERY SELECT x.kid, x.public_jwk, x.created_at FROM (
    SELECT k.kid, k.public_jwk, k.created_at, lead(k.created_at) OVER (ORDER BY k.created_at, k.kid) AS superseded_at
    FROM identity.signing_keys k) x
  -- An ID token lives an hour, and a server keeps signing with the key it read for up to 5
  -- minutes after a rotation: a superseded key stays published 75 minutes.
  WHERE x.superseded_at IS NULL OR x.superseded_at > util.now() - interval '75 minutes'
  ORDER BY x.created_at DESC, x.kid DESC;
END $$;
COMMENT ON FUNCTION identity.published_signing_keys() IS
  'The signing keys in the JWKS: the newest, and each older one until 75 minutes after a newer one was added (ID tokens live 60 minutes; servers cache the signing key 5 minutes).';

CREATE OR REPLACE FUNCTION api.oidc_jwks() RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  RETURN (SELECT jsonb_build_object('keys', coalesce(jsonb_agg(k.public_jwk || jsonb_build_object('kid', k.kid, 'use', 'sig', 'alg', 'RS256')
                                                               ORDER BY k.created_at DESC), '[]'))
          FROM identity.published_signing_keys() k);
END $$;
COMMENT ON FUNCTION api.oidc_jwks() IS 'GET /oauth/jwks: the published public signing keys as a JWK Set (RFC 7517 section 5), newest first.';

CREATE OR REPLACE FUNCTION api.oidc_signing_key() RETURNS TABLE (kid text, private_jwk jsonb)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  RETURN QUERY SELECT k.kid, k.private_jwk FROM identity.signing_keys k ORDER BY k.created_at DESC, k.kid DESC LIMIT 1;
END $$;
COMMENT ON FUNCTION api.oidc_signing_key() IS 'The newest signing key (kid, private JWK): it signs every ID token. Read by the server, cached 5 minutes.';

CREATE OR REPLACE FUNCTION api.oidc_add_signing_key(p_kid text, p_private_jwk jsonb, p_public_jwk jsonb, p_rotate boolean)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF p_private_jwk ->> 'kty' IS DISTINCT FROM 'RSA' OR NOT p_private_jwk ? 'd' OR p_public_jwk ? 'd'
     OR p_public_jwk ->> 'n' IS DISTINCT FROM p_private_jwk ->> 'n' THEN
    PERFORM util.fail('TL422', 'a signing key is an RSA private JWK and its public half');
  END IF;
  -- Two servers starting at once each made a key: the first one stored is the one.
  LOCK TABLE identity.signing_keys IN SHARE ROW EXCLUSIVE MODE;
  IF NOT p_rotate AND EXISTS (SELECT 1 FROM identity.signing_keys) THEN
    RETURN false;
  END IF;
  INSERT INTO identity.signing_keys (kid, private_jwk, public_jwk, created_at)
  VALUES (p_kid, p_private_jwk, p_public_jwk, util.now());
  RETURN true;
END $$;
COMMENT ON FUNCTION api.oidc_add_signing_key(text, jsonb, jsonb, boolean) IS
  'Store a new ID-token signing key (RSA JWKs made by the server with joserfc). p_rotate false: only when there is none yet (the first server start; false when another server won). p_rotate true (`pgtally clients rotate-key`): it signs from now on, the older keys stay published (identity.published_signing_keys). TL422 not an RSA key pair.';

CREATE OR REPLACE FUNCTION api.oidc_cors_origins() RETURNS text[]
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  RETURN (SELECT coalesce(array_agg(DISTINCT x.o ORDER BY x.o), '{}')
          FROM identity.oauth_clients c,
               LATERAL (SELECT identity.oidc_origin(u) FROM unnest(c.redirect_uris) u UNION SELECT unnest(c.origins)) x (o)
          WHERE c.revoked_at IS NULL AND x.o IS NOT NULL);
END $$;
COMMENT ON FUNCTION api.oidc_cors_origins() IS
  'The browser origins the JSON API answers cross-origin requests from (CORS): each active client''s redirect URIs'' origins and its extra origins.';

GRANT EXECUTE ON FUNCTION
  api.oidc_authorize(uuid, text, text, text, text, text, text, text, text, text, text),
  api.oidc_token_code(text, text, text, text, text, text, text), api.oidc_token_refresh(text, text, text, text, text),
  api.oidc_userinfo(uuid), api.oidc_end_session(uuid, uuid, text, text), api.oidc_jwks(), api.oidc_signing_key(),
  api.oidc_add_signing_key(text, jsonb, jsonb, boolean), api.oidc_cors_origins()
TO pgtally_api;
