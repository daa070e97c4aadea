-- Accounts, principals (API keys and sessions) and authentication of every request.

CREATE OR REPLACE FUNCTION identity.api_key_checksum(p_prefix_and_body text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
  SELECT left(encode(sha256(convert_to(p_prefix_and_body, 'UTF8')), 'hex'), 8)
$$;
COMMENT ON FUNCTION identity.api_key_checksum(text) IS
  'The 8 hex characters that end an API key: the start of SHA-256(pgt_ + body). api/security.py checks it before any lookup, so a mistyped key is refused without touching the database.';

CREATE OR REPLACE FUNCTION identity.scope_set(p_scopes text[]) RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
  SELECT coalesce(array_agg(s ORDER BY i), '{}') FROM (SELECT s, min(i) AS i FROM unnest(p_scopes) WITH ORDINALITY AS u(s, i) GROUP BY s) d
$$;
COMMENT ON FUNCTION identity.scope_set(text[]) IS
  'A key''s scopes as a set: each scope once, in the order first given (empty for NULL). A key sent usage:write a thousand times stores it once (issue 22).';

CREATE OR REPLACE FUNCTION identity.issue_api_key(p_account_id uuid, p_name text DEFAULT '',
                                                  p_scopes text[] DEFAULT '{usage:write,usage:read}',
                                                  p_expires_at timestamptz DEFAULT NULL,
                                                  OUT id uuid, OUT api_key text)
LANGUAGE plpgsql AS $$
DECLARE
  v_body text := 'pgt_' || util.random_token();
BEGIN
  api_key := v_body || identity.api_key_checksum(v_body);
  INSERT INTO identity.api_keys (account_id, name, key_hash, display, scopes, expires_at, created_at)
  VALUES (p_account_id, coalesce(p_name, ''), util.token_hash(api_key),
          left(api_key, 8) || '...' || right(api_key, 4), identity.scope_set(p_scopes), p_expires_at, util.now())
  RETURNING identity.api_keys.id INTO id;
END $$;
COMMENT ON FUNCTION identity.issue_api_key(uuid, text, text[], timestamptz) IS
  'Create an API key for an account: returns its id and the key (pgt_ + 64 random characters + 8-character checksum), which is stored only as a SHA-256 hash; its scopes are stored once each (identity.scope_set).';

CREATE OR REPLACE FUNCTION identity.member_may(p_user_id uuid, p_account_id uuid, p_permission text) RETURNS boolean
LANGUAGE sql STABLE AS $$
  SELECT EXISTS (SELECT 1 FROM identity.memberships m
                 JOIN identity.role_permissions r ON r.role = m.role AND r.permission = p_permission
                 WHERE m.account_id = p_account_id AND m.user_id = p_user_id)
$$;
COMMENT ON FUNCTION identity.member_may(uuid, uuid, text) IS
  'Whether a user''s role on an account grants a permission (identity.role_permissions).';

CREATE OR REPLACE FUNCTION identity.authenticate_principal(p_api_key text, p_session_id uuid, p_scope text,
                                                           p_account_id uuid DEFAULT NULL,
                                                           OUT account_id uuid, OUT api_key_id uuid, OUT user_id uuid)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
  k identity.api_keys;
  s identity.sessions;
  v_account_id uuid;
BEGIN
  IF p_api_key IS NOT NULL THEN
    SELECT * INTO k FROM identity.api_keys
    WHERE key_hash = util.token_hash(p_api_key) AND revoked_at IS NULL
      AND (expires_at IS NULL OR expires_at > util.now());
    IF NOT FOUND THEN
      PERFORM util.fail('TL401', 'the API key is not valid');
    END IF;
    IF k.last_used_at IS NULL OR k.last_used_at < util.now() - interval '1 minute' THEN
      BEGIN
        UPDATE identity.api_keys SET last_used_at = util.now() WHERE id = k.id;
      EXCEPTION WHEN read_only_sql_transaction OR disk_full THEN
        NULL;   -- a database that cannot write still serves reads: last_used_at waits
      END;
    END IF;
    IF p_account_id IS NOT NULL AND p_account_id <> k.account_id THEN
      IF NOT 'service' = ANY (k.scopes) THEN
        PERFORM util.fail('TL403', 'only a service key may act on behalf of another account');
      END IF;
      IF NOT EXISTS (SELECT 1 FROM identity.accounts WHERE id = p_account_id AND merged_into IS NULL) THEN
        PERFORM util.fail('TL404', format('no account %s', p_account_id));
      END IF;
      v_account_id := p_account_id;
    ELSIF NOT (p_scope = ANY (k.scopes) OR 'service' = ANY (k.scopes)) THEN
      PERFORM util.fail('TL403', format('this API key lacks the %s scope', p_scope));
    ELSIF k.created_by IS NOT NULL AND NOT identity.member_may(k.created_by, k.account_id, p_scope) THEN
      -- A member's key holds at most what the member's role allows now.
      PERFORM util.fail('TL403', format('the member who made this key may no longer %s on this account', p_scope));
    ELSE
      v_account_id := k.account_id;
    END IF;
  ELSIF p_session_id IS NOT NULL THEN
    SELECT * INTO s FROM identity.sessions
    WHERE id = p_session_id AND revoked_at IS NULL AND expires_at > util.now();
    IF NOT FOUND THEN
      PERFORM util.fail('TL401', 'the session has ended: sign in again');
    END IF;
    IF s.last_used_at < util.now() - interval '1 minute' THEN
      BEGIN
        UPDATE identity.sessions SET last_used_at = util.now() WHERE id = s.id;
      EXCEPTION WHEN read_only_sql_transaction OR disk_full THEN
        NULL;   -- as above
      END;
    END IF;
    IF s.scopes IS NOT NULL AND NOT p_scope = ANY (s.scopes) THEN
      -- A client's access token holds only the scopes the person granted it (issue 25).
      PERFORM util.fail('TL403', format('this access token lacks the %s scope', p_scope));
    END IF;
    IF p_account_id IS NOT NULL AND p_account_id <> s.account_id THEN
      -- Another account the person belongs to (a team), if their role there allows it.
      IF s.user_id IS NULL OR NOT identity.member_may(s.user_id, p_account_id, p_scope) THEN
        PERFORM util.fail('TL403', format('you may not %s on account %s', p_scope, p_account_id),
                          jsonb_build_object('account_id', p_account_id, 'permission', p_scope));
      END IF;
      v_account_id := p_account_id;
    ELSE
      v_account_id := s.account_id;
    END IF;
  ELSE
    PERFORM util.fail('TL401', 'an API key or access token is required');
  END IF;
  IF p_scope IN ('usage:write', 'billing:manage') THEN
    IF EXISTS (SELECT 1 FROM identity.accounts WHERE id = v_account_id AND suspended_at IS NOT NULL) THEN
      PERFORM util.fail('TL4S3', 'this account is suspended',
                        (SELECT jsonb_build_object('account_id', id, 'reason', suspended_reason, 'suspended_at', util.iso(suspended_at))
                         FROM identity.accounts WHERE id = v_account_id));
    END IF;
  END IF;
  account_id := v_account_id;
  api_key_id := k.id;                    -- (NULL for a session)
  user_id := coalesce(k.created_by, s.user_id);
END $$;
COMMENT ON FUNCTION identity.authenticate_principal(text, uuid, text, uuid) IS
  'identity.authenticate with the principal it found: account_id (the account the request acts on), api_key_id (the key, NULL for a session) and user_id (the session''s person, or the member who made the key; NULL for operator keys and anonymous devices). Charges and holds call it to record who spent and to apply key and member budgets (issue #28).';

CREATE OR REPLACE FUNCTION identity.authenticate(p_api_key text, p_session_id uuid, p_scope text,
                                                 p_account_id uuid DEFAULT NULL)
RETURNS uuid
LANGUAGE sql AS $$
  SELECT (identity.authenticate_principal(p_api_key, p_session_id, p_scope, p_account_id)).account_id
$$;
COMMENT ON FUNCTION identity.authenticate(text, uuid, text, uuid) IS
  'The one function that decides whether a principal may do p_scope (a permission: usage:read, usage:write, billing:read, billing:manage, members:read, members:manage, keys:manage, sso:manage) on an account, and which account a request acts on. Principal: an API key (by SHA-256 hash; not revoked or expired; must hold p_scope; a key a member made holds at most what that member''s role allows now) or a session id from a verified access token (a client session must hold p_scope among its granted scopes). p_account_id: act on that account: a service key on any account, a signed-in person on an account they are a member of with a role that grants p_scope (identity.role_permissions). A suspended account may not spend or buy (usage:write, billing:manage: TL4S3, answered 403 account-suspended). TL401 unknown key or ended session, TL403 missing scope or role, TL404 unknown account. Keeps last_used_at, at most once a minute, unless the database cannot write (read-only, SQLSTATE 25006, or disk full, 53100): then the read goes on without it.';

CREATE OR REPLACE FUNCTION api.provision_account(p_api_key text, p_session_id uuid, p_external_id text,
                                                 p_name text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_owner uuid;
  v_account_id uuid;
  a identity.accounts;
  v_created boolean := false;
BEGIN
  IF p_api_key IS NULL THEN
    PERFORM util.fail('TL403', 'provisioning needs a service key with the accounts:write scope, not an access token');
  END IF;
  v_owner := identity.authenticate(p_api_key, NULL, 'accounts:write');
  IF NOT (SELECT '{service,accounts:write}'::text[] <@ scopes FROM identity.api_keys
          WHERE key_hash = util.token_hash(p_api_key)) THEN
    PERFORM util.fail('TL403', 'provisioning needs a service key with the accounts:write scope');
  END IF;
  IF p_external_id IS NULL OR length(p_external_id) NOT BETWEEN 1 AND 255 OR p_external_id ~ '[[:cntrl:]]' THEN
    PERFORM util.fail('TL422', 'external_id is your id for the person: 1 to 255 characters, no control characters',
                      '{"field": "external_id"}');
  END IF;
  -- One at a time per (service account, external id): concurrent calls make one account.
  PERFORM pg_advisory_xact_lock(hashtextextended('provision:' || v_owner || ':' || p_external_id, 0));
  SELECT * INTO a FROM identity.accounts WHERE provisioned_by = v_owner AND external_id = p_external_id;
  IF NOT FOUND THEN
    v_account_id := identity.new_account('free', 'person', p_name, 0);
    UPDATE identity.accounts SET external_id = p_external_id, provisioned_by = v_owner
    WHERE id = v_account_id RETURNING * INTO a;
    v_created := true;   -- the account row says who provisioned it (provisioned_by) and when
  END IF;
  RETURN jsonb_build_object('account_id', a.id, 'external_id', a.external_id, 'created', v_created,
                            'name', a.name, 'plan', identity.effective_plan(a),
                            'credits', util.credits(a.credit_balance_micros), 'created_at', util.iso(a.created_at));
END $$;
COMMENT ON FUNCTION api.provision_account(text, uuid, text, text) IS
  'POST /v1/accounts/provision: for a product with its own auth (its users table, NextAuth, Clerk), create or find the account of the product''s person p_external_id (1 to 255 characters), idempotent per provisioning service account: the first call creates a person account on the free plan (with p_name) and answers created true, every later or concurrent call answers the same account with created false (one advisory transaction lock per external id, and a unique key behind it). The key must hold the scopes service and accounts:write (TL403 otherwise, or for an access token); it then meters on the account''s behalf with account_id (identity.authenticate). TL401 unknown key, TL422 bad external_id or name. Issue 25.';
GRANT EXECUTE ON FUNCTION api.provision_account(text, uuid, text, text) TO pgtally_api;

CREATE OR REPLACE FUNCTION identity.effective_plan(a identity.accounts) RETURNS text
LANGUAGE sql STABLE AS $$
  -- A failed subscription payment keeps the plan until the grace period ends, then meters as free.
  SELECT CASE WHEN a.plan_grace_until < util.now() THEN 'free' ELSE a.plan_id END
$$;
COMMENT ON FUNCTION identity.effective_plan(identity.accounts) IS
  'The plan an account is metered on now: its plan, or free once a payment grace period (plan_grace_until) has passed.';

CREATE OR REPLACE FUNCTION identity.new_account(p_plan text, p_kind text, p_name text, p_credits_micros bigint,
                                                p_id uuid DEFAULT NULL, p_fingerprint text DEFAULT NULL)
RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
  v_account_id uuid;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM billing.plans WHERE id = p_plan AND active) THEN
    PERFORM util.fail('TL422', format('there is no active plan %L', p_plan),
                      jsonb_build_object('plans', (SELECT jsonb_agg(id ORDER BY id) FROM billing.plans WHERE active)));
  END IF;
  IF p_credits_micros IS NULL OR p_credits_micros < 0 THEN
    PERFORM util.fail('TL422', 'initial credits cannot be negative');
  END IF;
  IF length(p_name) > 200 THEN
    PERFORM util.fail('TL422', 'an account name has at most 200 characters');
  END IF;
  IF p_kind IS NULL OR p_kind NOT IN ('person', 'team', 'device', 'service') THEN
    PERFORM util.fail('TL422', 'an account kind is person, team, device or service');
  END IF;
  INSERT INTO identity.accounts (id, kind, name, plan_id, device_fingerprint, created_at, credits_due_at)
  VALUES (coalesce(p_id, util.uuid_v7()), p_kind, p_name, p_plan, p_fingerprint, util.now(),
          CASE WHEN (SELECT monthly_credits_micros FROM billing.plans WHERE id = p_plan) > 0 THEN util.now() END)
  RETURNING id INTO v_account_id;
  IF p_credits_micros > 0 THEN
    PERFORM ledger.post_transfer(v_account_id, 'grants', p_credits_micros, 'grant',
                                 'initial-credits', NULL, 'initial credits');
  END IF;
  RETURN v_account_id;
END $$;
COMMENT ON FUNCTION identity.new_account(text, text, text, bigint, uuid, text) IS
  'Create an account on an active plan, with initial credits (micro-credits) granted through the ledger (a promotion lot); a plan with monthly credits makes them due at once. TL422 unknown plan or bad input.';

CREATE OR REPLACE FUNCTION identity.new_personal_account(p_user_id uuid, p_account_id uuid) RETURNS uuid
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM identity.new_account('free', 'person', NULL, 0, p_account_id);
  INSERT INTO identity.memberships (account_id, user_id, role, created_at)
  VALUES (p_account_id, p_user_id, 'owner', util.now());
  RETURN p_account_id;
END $$;
COMMENT ON FUNCTION identity.new_personal_account(uuid, uuid) IS
  'A new person''s own account (free plan), which they own: every sign-up path calls it.';

CREATE OR REPLACE FUNCTION api.create_account(p_plan text, p_credits_micros bigint DEFAULT 0,
                                              p_name text DEFAULT NULL, p_kind text DEFAULT 'person')
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_account_id uuid := identity.new_account(p_plan, p_kind, p_name, p_credits_micros);
  v_key record;
BEGIN
  SELECT * INTO v_key FROM identity.issue_api_key(
    v_account_id, 'default',
    CASE WHEN p_kind = 'service' THEN '{service,usage:write,usage:read,accounts:write}'::text[]
         ELSE '{usage:write,usage:read,billing:read,billing:manage}' END);
  RETURN jsonb_build_object(
    'account_id', v_account_id, 'plan', p_plan, 'kind', p_kind, 'name', p_name,
    'api_key_id', v_key.id, 'api_key', v_key.api_key,
    'balance', jsonb_build_object('credits', util.credits(p_credits_micros)));
END $$;
COMMENT ON FUNCTION api.create_account(text, bigint, text, text) IS
  'Create an account on an active plan with an API key (scopes usage:write, usage:read, billing:read, billing:manage; returned once, stored as a hash) and optional initial credits in micro-credits, granted through the ledger. Kind service gets a service key (may meter on behalf of any account, and provision accounts: scope accounts:write). Returns {account_id, plan, kind, name, api_key_id, api_key, balance: {credits}}. Errors: TL422 unknown plan or bad input. Operators only (not granted to pgtally_api).';
