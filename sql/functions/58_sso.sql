-- Enterprise single sign-on: a team's own OpenID Connect provider signs in the people of its
-- email domains, who join the team as members. The flow itself is the sign-in issue's
-- (api.oauth_begin, api.oauth_claim, api.oauth_sign_in with provider sso).

CREATE OR REPLACE FUNCTION identity.sso_required(p_email text) RETURNS boolean
LANGUAGE sql STABLE AS $$
  SELECT EXISTS (SELECT 1 FROM identity.sso_domains d JOIN identity.sso_connections c ON c.account_id = d.account_id
                 WHERE d.domain = split_part(lower(btrim(p_email)), '@', 2) AND c.require_sso)
$$;
COMMENT ON FUNCTION identity.sso_required(text) IS
  'Whether the address''s domain belongs to a team that requires its own provider: its people may not sign in with a password or Google/GitHub.';

CREATE OR REPLACE FUNCTION identity.sso_json(p_account_id uuid) RETURNS jsonb
LANGUAGE sql STABLE AS $$
  SELECT jsonb_build_object('account_id', c.account_id, 'issuer', c.issuer, 'client_id', c.client_id,
                            'domains', coalesce((SELECT jsonb_agg(d.domain ORDER BY d.domain) FROM identity.sso_domains d
                                                 WHERE d.account_id = c.account_id), '[]'),
                            'require_sso', c.require_sso, 'updated_at', util.iso(c.updated_at))
  FROM identity.sso_connections c WHERE c.account_id = p_account_id
$$;
COMMENT ON FUNCTION identity.sso_json(uuid) IS 'A team''s SSO settings as the API shows them (never the client secret).';

CREATE OR REPLACE FUNCTION api.set_sso(p_session_id uuid, p_account_id uuid, p_issuer text, p_client_id text,
                                       p_client_secret text, p_domains text[], p_require boolean) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_account_id uuid := identity.authenticate(NULL, p_session_id, 'sso:manage', p_account_id);
  v_domain text;
  v_taken uuid;
BEGIN
  IF (SELECT kind FROM identity.accounts WHERE id = v_account_id) <> 'team' THEN
    PERFORM util.fail('TL40C', 'single sign-on is set up for a team account');
  END IF;
  IF p_issuer IS NULL OR p_issuer !~ '^https?://\S+$' OR length(p_issuer) > 500 THEN
    PERFORM util.fail('TL422', 'issuer is the provider''s URL (its /.well-known/openid-configuration is read)', '{"field": "issuer"}');
  END IF;
  IF coalesce(length(p_client_id), 0) NOT BETWEEN 1 AND 255 OR coalesce(length(p_client_secret), 0) NOT BETWEEN 1 AND 500 THEN
    PERFORM util.fail('TL422', 'client_id and client_secret from the provider are required', '{"field": "client_id"}');
  END IF;
  IF p_domains IS NULL OR cardinality(p_domains) = 0 THEN
    PERFORM util.fail('TL422', 'at least one email domain is required', '{"field": "domains"}');
  END IF;
  PERFORM 1 FROM identity.accounts WHERE id = v_account_id FOR NO KEY UPDATE;
  INSERT INTO identity.sso_connections AS c (account_id, issuer, client_id, client_secret, require_sso, created_at, updated_at)
  VALUES (v_account_id, rtrim(p_issuer, '/'), p_client_id, p_client_secret, coalesce(p_require, false), util.now(), util.now())
  ON CONFLICT (account_id) DO UPDATE SET issuer = EXCLUDED.issuer, client_id = EXCLUDED.client_id,
    client_secret = EXCLUDED.client_secret, require_sso = EXCLUDED.require_sso, updated_at = EXCLUDED.updated_at;
  DELETE FROM identity.sso_domains WHERE account_id = v_account_id;
  FOREACH v_domain IN ARRAY p_domains LOOP
    v_domain := lower(btrim(v_domain));
    IF v_domain !~ '^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$' OR v_domain NOT LIKE '%.%' THEN
      PERFORM util.fail('TL422', format('%L is not an email domain', v_domain), '{"field": "domains"}');
    END IF;
    INSERT INTO identity.sso_domains (domain, account_id) VALUES (v_domain, v_account_id)
    ON CONFLICT (domain) DO NOTHING RETURNING account_id INTO v_taken;
    IF v_taken IS NULL THEN
      PERFORM util.fail('TL40C', format('%s signs in through another team''s provider', v_domain), '{"field": "domains"}');
    END IF;
  END LOOP;
  RETURN identity.sso_json(v_account_id);
END $$;
COMMENT ON FUNCTION api.set_sso(uuid, uuid, text, text, text, text[], boolean) IS
  'PUT /v1/accounts/{id}/sso (permission sso:manage: owners): the team''s OpenID Connect provider (issuer, client id and secret) and its email domains (one team per domain), and whether its people must sign in through it. TL40C not a team or a domain of another team, TL422 bad input.';

CREATE OR REPLACE FUNCTION api.sso(p_session_id uuid, p_account_id uuid, p_delete boolean DEFAULT false) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_account_id uuid := identity.authenticate(NULL, p_session_id, 'sso:manage', p_account_id);
  v jsonb := identity.sso_json(v_account_id);
BEGIN
  IF v IS NULL THEN
    PERFORM util.fail('TL404', 'this team has no single sign-on');
  END IF;
  IF p_delete THEN
    DELETE FROM identity.sso_connections WHERE account_id = v_account_id;
  END IF;
  RETURN v;
END $$;
COMMENT ON FUNCTION api.sso(uuid, uuid, boolean) IS 'GET /v1/accounts/{id}/sso (and DELETE, p_delete): the team''s SSO settings (sso:manage). TL404 none.';

CREATE OR REPLACE FUNCTION api.sso_flow_config(p_email text, p_account_id uuid DEFAULT NULL) RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT jsonb_build_object('account_id', c.account_id, 'issuer', c.issuer, 'client_id', c.client_id,
                            'client_secret', c.client_secret)
  FROM identity.sso_connections c
  WHERE c.account_id = coalesce(p_account_id, (SELECT d.account_id FROM identity.sso_domains d
                                               WHERE d.domain = split_part(lower(btrim(p_email)), '@', 2)))
$$;
COMMENT ON FUNCTION api.sso_flow_config(text, uuid) IS
  '/auth/sso/start and its callback: the provider of the team an address''s domain belongs to (or of p_account_id): issuer, client id and secret; NULL when none.';

GRANT EXECUTE ON FUNCTION api.set_sso(uuid, uuid, text, text, text, text[], boolean), api.sso(uuid, uuid, boolean),
  api.sso_flow_config(text, uuid) TO pgtally_api;
