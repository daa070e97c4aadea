-- Accounts and API keys.

CREATE OR REPLACE FUNCTION identity.issue_api_key(p_account_id uuid, p_name text DEFAULT '',
                                                  OUT id uuid, OUT api_key text)
LANGUAGE plpgsql AS $$
BEGIN
  -- 244 random bits from two version-4 UUIDs (pg_strong_random), URL-safe base64.
  api_key := 'pgt_' || rtrim(translate(encode(uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid()), 'base64'),
                                       '+/', '-_'), '=');
  INSERT INTO identity.api_keys (account_id, name, key_hash, display, created_at)
  VALUES (p_account_id, coalesce(p_name, ''), sha256(convert_to(api_key, 'UTF8')),
          left(api_key, 8) || '...' || right(api_key, 4), util.now())
  RETURNING identity.api_keys.id INTO id;
END $$;
COMMENT ON FUNCTION identity.issue_api_key(uuid, text) IS
  'Create an API key for an account: returns its id and the key text (pgt_ + 43 characters), which is stored only as a SHA-256 hash.';

CREATE OR REPLACE FUNCTION identity.authenticate(p_api_key text) RETURNS uuid
LANGUAGE plpgsql STABLE AS $$
DECLARE
  v_account_id uuid;
BEGIN
  SELECT k.account_id INTO v_account_id
  FROM identity.api_keys k
  WHERE k.key_hash = sha256(convert_to(coalesce(p_api_key, ''), 'UTF8'))
    AND k.revoked_at IS NULL
    AND (k.expires_at IS NULL OR k.expires_at > util.now());
  IF v_account_id IS NULL THEN
    PERFORM util.fail('TL401', 'the API key is not valid');
  END IF;
  RETURN v_account_id;
END $$;
COMMENT ON FUNCTION identity.authenticate(text) IS
  'The account an API key belongs to, found by the key''s SHA-256 hash. TL401 when the key is unknown, revoked or expired.';

CREATE OR REPLACE FUNCTION api.create_account(p_plan text, p_credits_micros bigint DEFAULT 0,
                                              p_name text DEFAULT NULL, p_kind text DEFAULT 'person')
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_account_id uuid;
  v_key record;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM billing.plans WHERE id = p_plan AND active) THEN
    PERFORM util.fail('TL422', format('there is no active plan %L', p_plan),
                      jsonb_build_object('plans', (SELECT jsonb_agg(id ORDER BY id) FROM billing.plans WHERE active)));
  END IF;
  IF p_credits_micros IS NULL OR p_credits_micros < 0 THEN
    PERFORM util.fail('TL422', 'initial credits cannot be negative');
  END IF;
  IF p_kind IS NULL OR p_kind NOT IN ('person', 'team', 'device', 'service') THEN
    PERFORM util.fail('TL422', 'an account kind is person, team, device or service');
  END IF;
  INSERT INTO identity.accounts (kind, name, plan_id, created_at)
  VALUES (p_kind, p_name, p_plan, util.now())
  RETURNING id INTO v_account_id;
  SELECT * INTO v_key FROM identity.issue_api_key(v_account_id, 'default');
  IF p_credits_micros > 0 THEN
    PERFORM ledger.post_transfer(v_account_id, 'grants', p_credits_micros, 'grant',
                                 'initial-credits', NULL, 'initial credits');
  END IF;
  RETURN jsonb_build_object(
    'account_id', v_account_id, 'plan', p_plan, 'kind', p_kind, 'name', p_name,
    'api_key_id', v_key.id, 'api_key', v_key.api_key,
    'balance', jsonb_build_object('credits', util.credits(p_credits_micros)));
END $$;
COMMENT ON FUNCTION api.create_account(text, bigint, text, text) IS
  'Create an account on an active plan with an API key (returned once, stored as a hash) and optional initial credits in micro-credits, granted through the ledger. Returns {account_id, plan, kind, name, api_key_id, api_key, balance: {credits}}. Errors: TL422 unknown plan or bad input. Operators only (not granted to pgtally_api).';
