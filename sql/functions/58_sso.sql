-- Enterprise single sign-on: a team's own OpenID Connect provider signs in the people of the email
-- domains the team has proven it owns, who join the team as members. The flow itself is the
-- sign-in issue's (api.oauth_begin, api.oauth_claim, api.oauth_sign_in with provider sso); an
-- existing user is linked only from a link emailed to the address (api.confirm_sso_link).
--
-- Nothing a stranger claims grants anything until proven: a claimed domain has no effect until a
-- DNS TXT record on it carries the claim's token (api.verify_sso_domain) or staff approve it
-- (api.admin_approve_sso_domain, audited); public mail domains can never be claimed.
-- (plpgsql, not sql: an upgrade's test applies these before the columns of 0024 exist.)

CREATE OR REPLACE FUNCTION identity.sso_txt_value(p_token text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
  SELECT 'pgtally-domain-verification=' || p_token
$$;
COMMENT ON FUNCTION identity.sso_txt_value(text) IS
  'The TXT record value that proves a team owns a domain it claimed for SSO (published on the domain itself, as Google''s and Microsoft''s domain verifications are).';

CREATE OR REPLACE FUNCTION identity.email_domain(p_email text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
  SELECT split_part(lower(btrim(p_email)), '@', 2)
$$;
COMMENT ON FUNCTION identity.email_domain(text) IS 'The domain of an address, lower case ('''' when it has no @).';

CREATE OR REPLACE FUNCTION identity.sso_team_of(p_email text) RETURNS uuid
LANGUAGE plpgsql STABLE AS $$
BEGIN
  RETURN (SELECT d.account_id FROM identity.sso_domains d
          WHERE d.domain = identity.email_domain(p_email) AND d.verified_at IS NOT NULL
            AND NOT identity.public_mail_domain(d.domain));
END $$;
COMMENT ON FUNCTION identity.sso_team_of(text) IS
  'The team whose provider signs in this address: the one that proved the address''s domain (at most one, sso_domains_verified_domain_key); NULL when none. Unproven claims, and public mail domains however they were proven, count for nothing.';

CREATE OR REPLACE FUNCTION identity.sso_required(p_user_id uuid) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
  RETURN (SELECT EXISTS (SELECT 1 FROM identity.users u
                 JOIN identity.sso_domains d ON d.domain = identity.email_domain(u.email_normalized) AND d.verified_at IS NOT NULL
                 JOIN identity.sso_connections c ON c.account_id = d.account_id AND c.require_sso
                 JOIN identity.memberships m ON m.account_id = c.account_id AND m.user_id = u.id
                 WHERE u.id = p_user_id));
END $$;
COMMENT ON FUNCTION identity.sso_required(uuid) IS
  'Whether this user must sign in through their team''s provider: they are a member of a team that requires SSO and proved the domain of their address. Strangers who merely share the domain are never bound by it.';

CREATE OR REPLACE FUNCTION identity.public_mail_domain(p_domain text) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
  RETURN (SELECT EXISTS (SELECT 1 FROM identity.public_mail_domains p
                 WHERE p_domain = p.domain OR p_domain LIKE '%.' || p.domain));
END $$;
COMMENT ON FUNCTION identity.public_mail_domain(text) IS
  'Whether a domain is a public mail domain (identity.public_mail_domains) or a subdomain of one: never claimable for SSO.';

CREATE OR REPLACE FUNCTION identity.sso_json(p_account_id uuid) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
  RETURN (SELECT jsonb_build_object('account_id', c.account_id, 'issuer', c.issuer, 'client_id', c.client_id,
                            'domains', coalesce((SELECT jsonb_agg(d.domain ORDER BY d.domain) FROM identity.sso_domains d
                                                 WHERE d.account_id = c.account_id), '[]'),
                            'domain_verification', coalesce((
                              SELECT jsonb_agg(jsonb_build_object(
                                       'domain', d.domain, 'verified', d.verified_at IS NOT NULL,
                                       'verified_by', d.verified_by, 'verified_at', util.iso(d.verified_at),
                                       'txt_record', jsonb_build_object('name', d.domain,
                                                                        'value', identity.sso_txt_value(d.verification_token)))
                                     ORDER BY d.domain)
                              FROM identity.sso_domains d WHERE d.account_id = c.account_id), '[]'),
                            'require_sso', c.require_sso, 'updated_at', util.iso(c.updated_at))
  FROM identity.sso_connections c WHERE c.account_id = p_account_id);
END $$;
COMMENT ON FUNCTION identity.sso_json(uuid) IS
  'A team''s SSO settings as the API shows them (never the client secret): its claimed domains and, per domain, whether it is verified and the TXT record that proves it.';

CREATE OR REPLACE FUNCTION api.set_sso(p_session_id uuid, p_account_id uuid, p_issuer text, p_client_id text,
                                       p_client_secret text, p_domains text[], p_require boolean) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_account_id uuid := identity.authenticate(NULL, p_session_id, 'sso:manage', p_account_id);
  v_domains text[];
  v_domain text;
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
  SELECT array_agg(DISTINCT lower(btrim(x))) INTO v_domains FROM unnest(p_domains) x;
  IF v_domains IS NULL THEN
    PERFORM util.fail('TL422', 'at least one email domain is required', '{"field": "domains"}');
  END IF;
  FOREACH v_domain IN ARRAY v_domains LOOP
    IF v_domain IS NULL OR v_domain !~ '^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$' OR v_domain NOT LIKE '%.%' THEN
      PERFORM util.fail('TL422', format('%L is not an email domain', v_domain), '{"field": "domains"}');
    ELSIF identity.public_mail_domain(v_domain) THEN
      PERFORM util.fail('TL422', format('%s is a public mail domain: anyone can have an address there, so no team can sign its people in', v_domain),
                        '{"field": "domains"}');
    ELSIF EXISTS (SELECT 1 FROM identity.sso_domains WHERE domain = v_domain AND verified_at IS NOT NULL
                                                     AND account_id <> v_account_id) THEN
      PERFORM util.fail('TL40C', format('%s signs in through another team''s provider', v_domain), '{"field": "domains"}');
    END IF;
  END LOOP;
  PERFORM 1 FROM identity.accounts WHERE id = v_account_id FOR NO KEY UPDATE;
  INSERT INTO identity.sso_connections AS c (account_id, issuer, client_id, client_secret, require_sso, created_at, updated_at)
  VALUES (v_account_id, rtrim(p_issuer, '/'), p_client_id, p_client_secret, coalesce(p_require, false), util.now(), util.now())
  ON CONFLICT (account_id) DO UPDATE SET issuer = EXCLUDED.issuer, client_id = EXCLUDED.client_id,
    client_secret = EXCLUDED.client_secret, require_sso = EXCLUDED.require_sso, updated_at = EXCLUDED.updated_at;
  -- Domains kept keep their proof; new ones start unproven.
  DELETE FROM identity.sso_domains WHERE account_id = v_account_id AND domain <> ALL (v_domains);
  INSERT INTO identity.sso_domains (account_id, domain, verification_token, claimed_at)
  SELECT v_account_id, d, util.random_token(), util.now() FROM unnest(v_domains) d
  ON CONFLICT (account_id, domain) DO NOTHING;
  PERFORM identity.log_event('sso_domain_claimed', NULL, v_account_id, p_session_id, NULL, NULL,
                             jsonb_build_object('domains', to_jsonb(v_domains)));
  RETURN identity.sso_json(v_account_id);
END $$;
COMMENT ON FUNCTION api.set_sso(uuid, uuid, text, text, text, text[], boolean) IS
  'PUT /v1/accounts/{id}/sso (permission sso:manage: owners): the team''s OpenID Connect provider (issuer, client id and secret), the email domains it claims, and whether its members must sign in through it. A claimed domain takes effect only once proven (api.verify_sso_domain: a DNS TXT record; or api.admin_approve_sso_domain); domains kept keep their proof. TL422 bad input or a public mail domain (identity.public_mail_domains), TL40C not a team or a domain another team proved.';

CREATE OR REPLACE FUNCTION api.verify_sso_domain(p_session_id uuid, p_account_id uuid, p_domain text, p_txt_records text[])
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_account_id uuid := identity.authenticate(NULL, p_session_id, 'sso:manage', p_account_id);
  d identity.sso_domains;
BEGIN
  SELECT * INTO d FROM identity.sso_domains WHERE account_id = v_account_id AND domain = lower(btrim(p_domain)) FOR UPDATE;
  IF NOT FOUND THEN
    PERFORM util.fail('TL404', 'this team has not claimed that domain: add it to the SSO settings first');
  ELSIF d.verified_at IS NOT NULL OR p_txt_records IS NULL THEN
    RETURN identity.sso_json(v_account_id);
  ELSIF identity.sso_txt_value(d.verification_token) <> ALL (p_txt_records) THEN
    PERFORM util.fail('TL422', format('no TXT record on %s carries this team''s token yet (DNS changes can take a while to be seen)', d.domain),
                      jsonb_build_object('field', 'domain', 'txt_record',
                                         jsonb_build_object('name', d.domain, 'value', identity.sso_txt_value(d.verification_token))));
  END IF;
  BEGIN
    UPDATE identity.sso_domains SET verified_at = util.now(), verified_by = 'dns'
    WHERE account_id = d.account_id AND domain = d.domain;
  EXCEPTION WHEN unique_violation THEN
    PERFORM util.fail('TL40C', format('%s signs in through another team''s provider', d.domain), '{"field": "domain"}');
  END;
  PERFORM identity.log_event('sso_domain_verified', NULL, v_account_id, p_session_id, NULL, NULL,
                             jsonb_build_object('domain', d.domain, 'by', 'dns'));
  RETURN identity.sso_json(v_account_id);
END $$;
COMMENT ON FUNCTION api.verify_sso_domain(uuid, uuid, text, text[]) IS
  'POST /v1/accounts/{id}/sso/domains/{domain}/verify (sso:manage). Called first with p_txt_records NULL: checks the caller may and the domain is claimed (the server asks DNS only then), returns the settings. Then the server looked up the TXT records of the domain (p_txt_records, through DNS) and this decides: one of them equal to identity.sso_txt_value(token) proves the claim, and the domain takes effect. Idempotent for a proven domain. TL404 not claimed by this team, TL422 no matching record (detail names the record to publish), TL40C another team proved it first.';

CREATE OR REPLACE FUNCTION api.admin_approve_sso_domain(p_session_id uuid, p_account_id uuid, p_domain text, p_reason text)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_staff identity.users := identity.staff(p_session_id, 'approve_sso_domain');
  d identity.sso_domains;
BEGIN
  SELECT * INTO d FROM identity.sso_domains WHERE account_id = p_account_id AND domain = lower(btrim(p_domain)) FOR UPDATE;
  IF NOT FOUND THEN
    PERFORM util.fail('TL404', 'this team has not claimed that domain');
  ELSIF identity.public_mail_domain(d.domain) THEN
    PERFORM util.fail('TL422', format('%s is a public mail domain: no team can sign its people in', d.domain), '{"field": "domain"}');
  ELSIF d.verified_at IS NOT NULL THEN
    RETURN identity.sso_json(p_account_id);
  END IF;
  BEGIN
    UPDATE identity.sso_domains SET verified_at = util.now(), verified_by = 'staff'
    WHERE account_id = d.account_id AND domain = d.domain;
  EXCEPTION WHEN unique_violation THEN
    PERFORM util.fail('TL40C', format('%s signs in through another team''s provider', d.domain), '{"field": "domain"}');
  END;
  PERFORM ops.audit(v_staff, 'approve_sso_domain', p_account_id, NULL, p_reason,
                    jsonb_build_object('domain', d.domain, 'verified', false),
                    jsonb_build_object('domain', d.domain, 'verified', true));
  RETURN identity.sso_json(p_account_id);
END $$;
COMMENT ON FUNCTION api.admin_approve_sso_domain(uuid, uuid, text, text) IS
  'POST /v1/admin/accounts/{id}/sso-domains/{domain}/approval (staff: admin): prove a team''s claimed domain without DNS (the team showed ownership another way), with a reason, audited in ops.audit_log. TL403 not admin, TL404 not claimed, TL40C another team proved it, TL422 no reason or a public mail domain (added to identity.public_mail_domains since it was claimed).';

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
  WHERE c.account_id = coalesce(p_account_id, identity.sso_team_of(p_email))
$$;
COMMENT ON FUNCTION api.sso_flow_config(text, uuid) IS
  '/auth/sso/start and its callback: the provider of the team that proved the address''s domain (or of p_account_id): issuer, client id and secret; NULL when none.';

CREATE OR REPLACE FUNCTION api.sso_available() RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  RETURN (SELECT EXISTS (SELECT 1 FROM identity.sso_domains d JOIN identity.sso_connections c ON c.account_id = d.account_id
                         WHERE d.verified_at IS NOT NULL AND NOT identity.public_mail_domain(d.domain)));
END $$;
COMMENT ON FUNCTION api.sso_available() IS
  '/login and /signup: whether to show the "Single sign-on" form: some team with SSO set up proved a domain (identity.sso_team_of would find it for someone). Stops at the first such domain; no input, no secret.';

CREATE OR REPLACE FUNCTION identity.request_sso_link(u identity.users, p_team_id uuid, p_subject text, p_email text,
                                                    p_ip text, p_user_agent text) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
  v_token text := util.random_token();
BEGIN
  -- One email per user and team every 10 minutes, however often the provider signs them in.
  IF EXISTS (SELECT 1 FROM identity.sso_link_requests WHERE user_id = u.id AND account_id = p_team_id AND used_at IS NULL
                                                        AND created_at > util.now() - interval '10 minutes') THEN
    RETURN jsonb_build_object('status', 'sso_link_email_sent', 'email', u.email_normalized,
                              'valid_for', identity.link_lifetime('sso_link'));
  END IF;
  INSERT INTO identity.sso_link_requests (token_hash, user_id, account_id, subject, email, created_at, expires_at)
  VALUES (util.token_hash(v_token), u.id, p_team_id, p_subject, left(p_email, 320), util.now(), util.now() + identity.link_lifetime('sso_link')::interval);
  INSERT INTO outbox.messages (kind, recipient, payload, created_at, next_attempt_at)
  VALUES ('sso_link', u.email_normalized,
          jsonb_build_object('email', u.email_normalized, 'token', v_token, 'valid_for', identity.link_lifetime('sso_link'),
                             'team', (SELECT name FROM identity.accounts WHERE id = p_team_id)),
          util.now(), util.now());
  PERFORM identity.log_event('sso_link_requested', u.id, u.account_id, NULL, p_ip, p_user_agent,
                             jsonb_build_object('team', p_team_id));
  RETURN jsonb_build_object('status', 'sso_link_email_sent', 'email', u.email_normalized,
                            'valid_for', identity.link_lifetime('sso_link'));
END $$;
COMMENT ON FUNCTION identity.request_sso_link(identity.users, uuid, text, text, text, text) IS
  'A team''s provider signed in the address of an existing user who never linked it: nothing is linked; a one-hour, single-use link goes to that address (outbox sso_link; at most one every 10 minutes per user and team) and the caller is told to open it. An identity provider, even of a proven domain, never takes over a user on its word alone.';

CREATE OR REPLACE FUNCTION api.confirm_sso_link(p_token text, p_ip text, p_user_agent text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  r record;                        -- an identity.sso_link_requests row (0024)
  u identity.users;
  v_owner uuid;
  v_tokens jsonb;
BEGIN
  -- The claim: one use, before it expires.
  UPDATE identity.sso_link_requests SET used_at = util.now()
  WHERE token_hash = util.token_hash(p_token) AND used_at IS NULL AND expires_at > util.now()
  RETURNING * INTO r;
  IF NOT FOUND THEN
    RETURN identity.error('TL400', 'this link is not valid, was used already or has expired: sign in through your organisation again');
  END IF;
  SELECT * INTO u FROM identity.users WHERE id = r.user_id FOR UPDATE;
  IF identity.sso_team_of(u.email_normalized) IS DISTINCT FROM r.account_id THEN
    RETURN identity.error('TL400', 'this team no longer signs in people of your address''s domain');
  END IF;
  SELECT user_id INTO v_owner FROM identity.user_identities WHERE provider = 'sso' AND subject = r.subject;
  IF v_owner IS NULL THEN
    BEGIN
      PERFORM identity.link_identity(u.id, 'sso', r.subject, r.email, true);
    EXCEPTION WHEN unique_violation THEN     -- another user's confirmation of the same subject won
      RETURN identity.error('TL40C', 'this sign-in of your organisation is linked to another user');
    END;
  ELSIF v_owner <> u.id THEN
    RETURN identity.error('TL40C', 'this sign-in of your organisation is linked to another user');
  END IF;
  PERFORM identity.mark_email_verified(u.id);
  INSERT INTO identity.memberships (account_id, user_id, role, created_at)
  VALUES (r.account_id, u.id, 'member', util.now()) ON CONFLICT (account_id, user_id) DO NOTHING;
  v_tokens := identity.start_session(u.account_id, u.id, p_ip, p_user_agent, 'sso');
  PERFORM identity.log_event('oauth_linked', u.id, u.account_id, (v_tokens ->> 'session_id')::uuid, p_ip, p_user_agent,
                             jsonb_build_object('provider', 'sso', 'team', r.account_id, 'confirmed_by', 'email'));
  RETURN v_tokens;
END $$;
COMMENT ON FUNCTION api.confirm_sso_link(text, text, text) IS
  'POST /auth/sso/confirm: the user opened the link identity.request_sso_link emailed: link the team''s provider to them (once, within an hour), make them a member of the team, confirm their address, sign them in (identity.tokens). TL400 unknown, used or expired link, or the team lost the domain; TL40C the provider account is linked to someone else.';

GRANT EXECUTE ON FUNCTION api.set_sso(uuid, uuid, text, text, text, text[], boolean), api.sso(uuid, uuid, boolean),
  api.sso_flow_config(text, uuid), api.sso_available(), api.verify_sso_domain(uuid, uuid, text, text[]),
  api.admin_approve_sso_domain(uuid, uuid, text, text), api.confirm_sso_link(text, text, text) TO pgtally_api;
