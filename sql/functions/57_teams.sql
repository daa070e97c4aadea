-- Teams: accounts several people belong to, with roles; invitations by email. Who may do what is
-- decided by identity.authenticate from identity.role_permissions; these functions only call it.

CREATE OR REPLACE FUNCTION identity.member_user(p_session_id uuid) RETURNS identity.users
LANGUAGE plpgsql AS $$
DECLARE
  s identity.sessions := identity.active_session(p_session_id);
  u identity.users;
BEGIN
  SELECT * INTO u FROM identity.users WHERE id = s.user_id;
  IF NOT FOUND THEN
    PERFORM util.fail('TL403', 'sign up or log in first: this is for people, not devices');
  END IF;
  RETURN u;
END $$;
COMMENT ON FUNCTION identity.member_user(uuid) IS 'The signed-in person of a session (teams, staff); TL403 for an anonymous device.';

CREATE OR REPLACE FUNCTION identity.account_json(a identity.accounts, p_role text) RETURNS jsonb
LANGUAGE sql STABLE AS $$
  SELECT jsonb_build_object('id', a.id, 'object', 'account', 'kind', a.kind, 'name', a.name, 'role', p_role,
                            'plan', identity.effective_plan(a), 'credits', util.credits(a.credit_balance_micros),
                            'suspended', a.suspended_at IS NOT NULL, 'created_at', util.iso(a.created_at))
$$;
COMMENT ON FUNCTION identity.account_json(identity.accounts, text) IS
  'An account as /v1/accounts shows it to a member: {id, kind (person, team), name, role, plan, credits, suspended, created_at}.';

CREATE OR REPLACE FUNCTION api.create_team(p_session_id uuid, p_name text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  u identity.users := identity.member_user(p_session_id);
  v_account_id uuid;
BEGIN
  IF p_name IS NULL OR length(btrim(p_name)) NOT BETWEEN 1 AND 100 THEN
    PERFORM util.fail('TL422', 'a team name of 1 to 100 characters is required', '{"field": "name"}');
  END IF;
  v_account_id := identity.new_account('free', 'team', btrim(p_name), 0);
  INSERT INTO identity.memberships (account_id, user_id, role, created_at) VALUES (v_account_id, u.id, 'owner', util.now());
  RETURN identity.account_json((SELECT a FROM identity.accounts a WHERE id = v_account_id), 'owner');
END $$;
COMMENT ON FUNCTION api.create_team(uuid, text) IS
  'POST /v1/accounts: a team account (free plan, its own credits, usage, keys and Stripe customer) owned by the signed-in person. TL403 anonymous, TL422 bad name.';

CREATE OR REPLACE FUNCTION api.accounts(p_session_id uuid) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  u identity.users := identity.member_user(p_session_id);
BEGIN
  RETURN jsonb_build_object('data', coalesce((
    SELECT jsonb_agg(identity.account_json(a, m.role) ORDER BY (a.id = u.account_id) DESC, a.created_at)
    FROM identity.memberships m JOIN identity.accounts a ON a.id = m.account_id
    WHERE m.user_id = u.id AND a.merged_into IS NULL), '[]'));
END $$;
COMMENT ON FUNCTION api.accounts(uuid) IS 'GET /v1/accounts: the accounts the signed-in person belongs to (their own first) with their role.';

CREATE OR REPLACE FUNCTION api.members(p_session_id uuid, p_account_id uuid) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_account_id uuid := identity.authenticate(NULL, p_session_id, 'members:read', p_account_id);
BEGIN
  RETURN jsonb_build_object('data', coalesce((
    SELECT jsonb_agg(jsonb_build_object('user_id', u.id, 'email', u.email, 'role', m.role,
                                        'joined_at', util.iso(m.created_at)) ORDER BY m.created_at)
    FROM identity.memberships m JOIN identity.users u ON u.id = m.user_id
    WHERE m.account_id = v_account_id), '[]'));
END $$;
COMMENT ON FUNCTION api.members(uuid, uuid) IS 'GET /v1/accounts/{id}/members: the members and their roles (permission members:read: every member).';

CREATE OR REPLACE FUNCTION identity.change_membership(p_session_id uuid, p_account_id uuid, p_user_id uuid, p_role text)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
  v_actor identity.users := identity.member_user(p_session_id);
  v_account_id uuid;
  v_actor_role text;
  m identity.memberships;
BEGIN
  IF p_role IS NOT NULL AND p_role NOT IN ('owner', 'admin', 'member', 'billing', 'viewer') THEN
    PERFORM util.fail('TL422', 'a role is owner, admin, member, billing or viewer', '{"field": "role"}');
  END IF;
  -- Leaving an account needs no permission; changing someone else does.
  IF p_user_id = v_actor.id AND p_role IS NULL THEN
    v_account_id := identity.authenticate(NULL, p_session_id, 'members:read', p_account_id);
  ELSE
    v_account_id := identity.authenticate(NULL, p_session_id, 'members:manage', p_account_id);
  END IF;
  -- Every change of an account's members serialises on its row: the owner count below is exact.
  PERFORM 1 FROM identity.accounts WHERE id = v_account_id FOR NO KEY UPDATE;
  SELECT role INTO v_actor_role FROM identity.memberships WHERE account_id = v_account_id AND user_id = v_actor.id;
  SELECT * INTO m FROM identity.memberships WHERE account_id = v_account_id AND user_id = p_user_id;
  IF NOT FOUND THEN
    PERFORM util.fail('TL404', 'no such member');
  END IF;
  IF coalesce(v_actor_role, '') <> 'owner' AND (p_role = 'owner' OR (m.role = 'owner' AND p_user_id <> v_actor.id)) THEN
    PERFORM util.fail('TL403', 'only an owner makes or unmakes owners');
  END IF;
  IF p_user_id = (SELECT u.id FROM identity.users u WHERE u.account_id = v_account_id) THEN
    PERFORM util.fail('TL40C', 'a person''s own account stays theirs');
  END IF;
  IF p_role IS NULL THEN
    DELETE FROM identity.memberships WHERE account_id = v_account_id AND user_id = p_user_id;
    -- Their keys on this account stop at once.
    UPDATE identity.api_keys SET revoked_at = util.now()
    WHERE account_id = v_account_id AND created_by = p_user_id AND revoked_at IS NULL;
  ELSE
    UPDATE identity.memberships SET role = p_role WHERE account_id = v_account_id AND user_id = p_user_id;
  END IF;
  -- Their pending invitations go too, unless their role still lets them send each one.
  DELETE FROM identity.invitations i
  WHERE i.account_id = v_account_id AND i.invited_by = p_user_id
    AND NOT identity.may_invite(i.invited_by, i.account_id, i.role);
  IF NOT EXISTS (SELECT 1 FROM identity.memberships WHERE account_id = v_account_id AND role = 'owner') THEN
    PERFORM util.fail('TL40C', 'an account keeps at least one owner: make someone else owner first');
  END IF;
  IF p_role IS NULL AND p_user_id = v_actor.id THEN
    RETURN jsonb_build_object('data', '[]'::jsonb);     -- they left: the list is no longer theirs to see
  END IF;
  RETURN api.members(p_session_id, v_account_id);
END $$;
COMMENT ON FUNCTION identity.change_membership(uuid, uuid, uuid, text) IS
  'Change a member''s role (p_role), or remove them (p_role NULL; anyone may leave), with the account row locked: only owners make or unmake owners, and an account always keeps an owner (TL40C, nothing changed). A removed member''s keys on the account are revoked, and so are the pending invitations they sent that their new role (or none) no longer allows (identity.may_invite; issue #22 item 5).';

CREATE OR REPLACE FUNCTION api.set_member_role(p_session_id uuid, p_account_id uuid, p_user_id uuid, p_role text)
RETURNS jsonb
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT identity.change_membership(p_session_id, p_account_id, p_user_id, coalesce(p_role, '?'))
$$;
COMMENT ON FUNCTION api.set_member_role(uuid, uuid, uuid, text) IS
  'PATCH /v1/accounts/{id}/members/{user_id}: change a member''s role (members:manage; owners only for the owner role; the last owner stays). TL403, TL404, TL40C, TL422.';

CREATE OR REPLACE FUNCTION api.remove_member(p_session_id uuid, p_account_id uuid, p_user_id uuid) RETURNS jsonb
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT identity.change_membership(p_session_id, p_account_id, p_user_id, NULL)
$$;
COMMENT ON FUNCTION api.remove_member(uuid, uuid, uuid) IS
  'DELETE /v1/accounts/{id}/members/{user_id}: remove a member (members:manage) or leave (yourself); the last owner stays (TL40C).';

CREATE OR REPLACE FUNCTION identity.invitation_json(i identity.invitations) RETURNS jsonb
LANGUAGE sql STABLE AS $$
  SELECT jsonb_build_object('id', i.id, 'object', 'invitation', 'account_id', i.account_id, 'email', i.email_normalized,
                            'role', i.role, 'created_at', util.iso(i.created_at), 'expires_at', util.iso(i.expires_at),
                            'sent', i.sent_count)
$$;
COMMENT ON FUNCTION identity.invitation_json(identity.invitations) IS 'An invitation as the API shows it (never its token).';

CREATE OR REPLACE FUNCTION identity.may_invite(p_user_id uuid, p_account_id uuid, p_role text) RETURNS boolean
LANGUAGE sql STABLE AS $$
  SELECT identity.member_may(p_user_id, p_account_id, 'members:manage')
         AND (p_role <> 'owner' OR EXISTS (SELECT 1 FROM identity.memberships
                                           WHERE account_id = p_account_id AND user_id = p_user_id AND role = 'owner'))
$$;
COMMENT ON FUNCTION identity.may_invite(uuid, uuid, text) IS
  'Whether a person may, now, invite someone to an account with p_role: their role there grants members:manage, and only owners invite owners. Checked when the invitation is sent (api.invite), again when it is accepted (api.accept_invitation), and when the sender''s role changes (identity.change_membership revokes what it no longer allows). Issue #22 item 5.';

CREATE OR REPLACE FUNCTION api.invite(p_session_id uuid, p_account_id uuid, p_email text, p_role text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_actor identity.users := identity.member_user(p_session_id);
  v_account_id uuid := identity.authenticate(NULL, p_session_id, 'members:manage', p_account_id);
  v_email text := identity.normalize_email(p_email);
  v_token text := encode(uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid()), 'hex');
  i identity.invitations;
BEGIN
  IF p_role IS NULL OR p_role NOT IN ('owner', 'admin', 'member', 'billing', 'viewer') THEN
    PERFORM util.fail('TL422', 'a role is owner, admin, member, billing or viewer', '{"field": "role"}');
  END IF;
  IF NOT identity.may_invite(v_actor.id, v_account_id, p_role) THEN
    PERFORM util.fail('TL403', 'only an owner invites owners');
  END IF;
  IF (SELECT kind FROM identity.accounts WHERE id = v_account_id) <> 'team' THEN
    PERFORM util.fail('TL40C', 'invite people to a team account (POST /v1/accounts makes one)');
  END IF;
  IF EXISTS (SELECT 1 FROM identity.memberships m JOIN identity.users u ON u.id = m.user_id
             WHERE m.account_id = v_account_id AND u.email_normalized = v_email) THEN
    PERFORM util.fail('TL40C', format('%s is a member already', v_email));
  END IF;
  -- One pending invitation per address: inviting again sends a new link (the old one stops).
  INSERT INTO identity.invitations AS x (account_id, email_normalized, role, token_hash, invited_by, created_at, expires_at)
  VALUES (v_account_id, v_email, p_role, util.token_hash(v_token), v_actor.id, util.now(), util.now() + interval '7 days')
  ON CONFLICT (account_id, email_normalized) DO UPDATE SET
    role = EXCLUDED.role, token_hash = EXCLUDED.token_hash, invited_by = EXCLUDED.invited_by,
    expires_at = EXCLUDED.expires_at, sent_count = x.sent_count + 1
  RETURNING * INTO i;
  INSERT INTO outbox.messages (kind, recipient, payload, created_at, next_attempt_at)
  VALUES ('invitation', v_email,
          jsonb_build_object('token', v_token, 'team', (SELECT name FROM identity.accounts WHERE id = v_account_id),
                             'inviter', v_actor.email, 'role', p_role, 'email', v_email),
          util.now(), util.now());
  RETURN identity.invitation_json(i);
END $$;
COMMENT ON FUNCTION api.invite(uuid, uuid, text, text) IS
  'POST /v1/accounts/{id}/invitations (and resend): invite an address to a team with a role (members:manage; owners only for owner), valid 7 days; emails a single-use link. Inviting the same address again replaces the link. TL40C a member already or not a team, TL403, TL422.';

CREATE OR REPLACE FUNCTION api.invitations(p_session_id uuid, p_account_id uuid) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_account_id uuid := identity.authenticate(NULL, p_session_id, 'members:read', p_account_id);
BEGIN
  RETURN jsonb_build_object('data', coalesce((
    SELECT jsonb_agg(identity.invitation_json(i) ORDER BY i.created_at DESC)
    FROM identity.invitations i WHERE i.account_id = v_account_id AND i.expires_at > util.now()), '[]'));
END $$;
COMMENT ON FUNCTION api.invitations(uuid, uuid) IS 'GET /v1/accounts/{id}/invitations: the pending invitations (members:read).';

CREATE OR REPLACE FUNCTION api.revoke_invitation(p_session_id uuid, p_account_id uuid, p_invitation_id uuid) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_account_id uuid := identity.authenticate(NULL, p_session_id, 'members:manage', p_account_id);
  i identity.invitations;
BEGIN
  DELETE FROM identity.invitations WHERE id = p_invitation_id AND account_id = v_account_id RETURNING * INTO i;
  IF i.id IS NULL THEN
    PERFORM util.fail('TL404', 'no such invitation');
  END IF;
  RETURN identity.invitation_json(i) || '{"revoked": true}';
END $$;
COMMENT ON FUNCTION api.revoke_invitation(uuid, uuid, uuid) IS 'DELETE /v1/accounts/{id}/invitations/{invitation_id}: the link stops working (members:manage). TL404.';

CREATE OR REPLACE FUNCTION api.accept_invitation(p_session_id uuid, p_token text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  u identity.users := identity.member_user(p_session_id);
  i identity.invitations;
BEGIN
  -- Members of an account change under its row's lock (identity.change_membership): taken first,
  -- so the sender's role read below stays true until this commits.
  PERFORM 1 FROM identity.accounts
  WHERE id = (SELECT account_id FROM identity.invitations WHERE token_hash = util.token_hash(p_token))
  FOR NO KEY UPDATE;
  -- The claim: one accept wins, however many arrive at once.
  DELETE FROM identity.invitations WHERE token_hash = util.token_hash(p_token) AND expires_at > util.now()
  RETURNING * INTO i;
  IF i.id IS NULL THEN
    PERFORM util.fail('TL400', 'this invitation is not valid: it was used, revoked, replaced or has expired');
  END IF;
  IF u.email_normalized <> i.email_normalized OR u.email_verified_at IS NULL THEN
    -- Raised: the claim rolls back and the invitation stays for its address.
    PERFORM util.fail('TL403', format('this invitation is for %s: sign in with that address (confirmed)', i.email_normalized));
  END IF;
  IF NOT identity.may_invite(i.invited_by, i.account_id, i.role) THEN
    -- Returned, not raised: the void invitation stays claimed.
    RETURN identity.error('TL400', 'this invitation is no longer valid: whoever sent it may no longer invite to this team with that role');
  END IF;
  INSERT INTO identity.memberships (account_id, user_id, role, created_at, invited_by)
  VALUES (i.account_id, u.id, i.role, util.now(), i.invited_by)
  ON CONFLICT (account_id, user_id) DO NOTHING;
  RETURN identity.account_json((SELECT a FROM identity.accounts a WHERE id = i.account_id),
                               (SELECT role FROM identity.memberships WHERE account_id = i.account_id AND user_id = u.id));
END $$;
COMMENT ON FUNCTION api.accept_invitation(uuid, text) IS
  'POST /v1/invitations/accept {token}: join the team as the invited role, once (the invitation is claimed by DELETE ... RETURNING). The signed-in person''s verified email must be the invited address (TL403; the invitation stays). The sender must still be allowed to send it (identity.may_invite: still a member whose role grants members:manage, an owner for an owner invitation), else TL400 and the invitation is used up. TL400 used, revoked, replaced or expired.';

GRANT EXECUTE ON FUNCTION api.create_team(uuid, text), api.accounts(uuid), api.members(uuid, uuid),
  api.set_member_role(uuid, uuid, uuid, text), api.remove_member(uuid, uuid, uuid), api.invite(uuid, uuid, text, text),
  api.invitations(uuid, uuid), api.revoke_invitation(uuid, uuid, uuid), api.accept_invitation(uuid, text)
TO pgtally_api;
