-- Pages: what each server-rendered page shows, in one call. Each function gathers the answers of
-- the api.* functions the JSON API serves (so a page and the API can never disagree), with the
-- principal the page acts for; a refusal raises as those functions raise.

CREATE OR REPLACE FUNCTION api.account_page(p_session_id uuid) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  RETURN jsonb_build_object('me', api.me(NULL, p_session_id),
                            'methods', api.sign_in_methods(p_session_id),
                            'sessions', api.sessions(p_session_id) -> 'data',
                            'keys', api.list_api_keys(p_session_id) -> 'data');
END $$;
COMMENT ON FUNCTION api.account_page(uuid) IS
  'GET /account: the signed-in person (api.me), their ways to sign in (api.sign_in_methods), sessions (api.sessions) and API keys (api.list_api_keys). TL401 signed out.';

CREATE OR REPLACE FUNCTION api.dashboard_page(p_session_id uuid, p_account_id uuid, p_public_url text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_billing jsonb;
  v_invoices jsonb := '[]';
BEGIN
  BEGIN
    v_billing := api.billing_account(NULL, p_session_id, p_account_id);
    v_invoices := api.invoices(NULL, p_session_id, 10, p_account_id) -> 'data';
  EXCEPTION WHEN SQLSTATE 'TL403' THEN
    v_billing := NULL;                    -- a team member whose role does not see billing
  END;
  RETURN jsonb_build_object('balance', api.balance(NULL, p_session_id, p_account_id),
                            'billing', v_billing, 'invoices', v_invoices,
                            'events', api.usage_events(NULL, p_session_id, NULL, 10, NULL, NULL, NULL, p_account_id) -> 'data',
                            'bundles', api.plans() -> 'bundles',
                            'referrals', api.referrals(NULL, p_session_id, p_public_url));
END $$;
COMMENT ON FUNCTION api.dashboard_page(uuid, uuid, text) IS
  'GET /dashboard: for the account the page acts on (p_account_id: the team the switcher chose, NULL: the person''s own): balance and allowances (api.balance), plan and billing state (api.billing_account; null for a role that may not see billing), the last 10 invoices with their PDFs (api.invoices; empty for that role), the last 10 usage events, the catalog''s bundles, and the person''s referral link (api.referrals, links on p_public_url). TL401 signed out, TL403 not a member.';

CREATE OR REPLACE FUNCTION api.upgrade_page(p_session_id uuid, p_account_id uuid) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_billing jsonb;
BEGIN
  IF p_session_id IS NOT NULL THEN
    BEGIN
      v_billing := api.billing_account(NULL, p_session_id, p_account_id);
    EXCEPTION WHEN SQLSTATE 'TL401' OR SQLSTATE 'TL403' OR SQLSTATE 'TL404' THEN
      v_billing := NULL;                  -- signed out since, or a role that may not buy: the catalog only
    END;
  END IF;
  RETURN jsonb_build_object('catalog', api.plans(), 'billing', v_billing);
END $$;
COMMENT ON FUNCTION api.upgrade_page(uuid, uuid) IS
  'GET /upgrade: the catalog (api.plans) and, for a signed-in buyer (p_session_id, acting on p_account_id), the billing state that marks the current plan (api.billing_account; null when signed out or not allowed).';

CREATE OR REPLACE FUNCTION api.team_page(p_session_id uuid, p_account_id uuid) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_team jsonb;
BEGIN
  SELECT a INTO v_team FROM jsonb_array_elements(api.accounts(p_session_id) -> 'data') a
  WHERE a ->> 'id' = p_account_id::text;
  IF v_team IS NULL THEN
    PERFORM util.fail('TL403', 'you are not a member of this account');
  END IF;
  RETURN jsonb_build_object('team', v_team,
                            'members', api.members(p_session_id, p_account_id) -> 'data',
                            'invitations', api.invitations(p_session_id, p_account_id) -> 'data');
END $$;
COMMENT ON FUNCTION api.team_page(uuid, uuid) IS
  'GET /teams/{id}: the team as the person''s account list shows it (api.accounts), its members (api.members) and pending invitations (api.invitations). TL401 signed out, TL403 not a member.';

CREATE OR REPLACE FUNCTION api.team_sso_page(p_session_id uuid, p_account_id uuid) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_account_id uuid := identity.authenticate(NULL, p_session_id, 'sso:manage', p_account_id);
BEGIN
  RETURN jsonb_build_object('team', (SELECT jsonb_build_object('id', a.id, 'name', a.name, 'kind', a.kind)
                                     FROM identity.accounts a WHERE a.id = v_account_id),
                            'sso', identity.sso_json(v_account_id));
END $$;
COMMENT ON FUNCTION api.team_sso_page(uuid, uuid) IS
  'GET /teams/{id}/sso: the team (id, name, kind) and its SSO settings as GET /v1/accounts/{id}/sso shows them (identity.sso_json: issuer, client id, domains with their verification and TXT record; never the secret), null when none. Permission sso:manage (owners). TL401 signed out, TL403 not an owner.';

CREATE OR REPLACE FUNCTION api.admin_account_page(p_session_id uuid, p_account_id uuid) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  RETURN jsonb_build_object('account', api.admin_account(p_session_id, p_account_id), 'plans', api.plans() -> 'plans');
END $$;
COMMENT ON FUNCTION api.admin_account_page(uuid, uuid) IS
  'GET /admin/accounts/{id} (staff): everything about the account (api.admin_account) and the plans a staff member may put it on. TL403 not staff, TL404.';

GRANT EXECUTE ON FUNCTION api.account_page(uuid), api.dashboard_page(uuid, uuid, text), api.upgrade_page(uuid, uuid),
  api.team_page(uuid, uuid), api.team_sso_page(uuid, uuid), api.admin_account_page(uuid, uuid) TO pgtally_api;
