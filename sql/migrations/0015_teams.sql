-- pgtally 0015: teams (accounts several people belong to, with roles), invitations, one
-- permission table, suspension, and the operators' audit log.
-- depends: 0014_revenue_analytics

-- Billing functions gain the account to act on (sql/functions/60_billing.sql, 62_auto_topup.sql,
-- 70_revenue.sql create them again).
DROP FUNCTION IF EXISTS api.billing_account(text, uuid);
DROP FUNCTION IF EXISTS api.stripe_customer(text, uuid);
DROP FUNCTION IF EXISTS api.live_subscription(text, uuid, text);
DROP FUNCTION IF EXISTS api.set_auto_topup(text, uuid, text, text);
DROP FUNCTION IF EXISTS api.auto_topup(text, uuid, boolean);
DROP FUNCTION IF EXISTS api.invoices(text, uuid, integer);
DROP FUNCTION IF EXISTS api.create_api_key(uuid, text, text[], timestamptz);
DROP FUNCTION IF EXISTS api.list_api_keys(uuid);
DROP FUNCTION IF EXISTS api.revoke_api_key(uuid, uuid);

CREATE TABLE identity.role_permissions (
  role       text NOT NULL CHECK (role IN ('owner', 'admin', 'member', 'billing', 'viewer')),
  permission text NOT NULL CHECK (permission IN ('usage:read', 'usage:write', 'billing:read', 'billing:manage',
                                                 'members:read', 'members:manage', 'keys:manage', 'sso:manage')),
  PRIMARY KEY (role, permission)
);
INSERT INTO identity.role_permissions (role, permission)
SELECT 'owner', p FROM unnest('{usage:read,usage:write,billing:read,billing:manage,members:read,members:manage,keys:manage,sso:manage}'::text[]) p
UNION ALL
SELECT 'admin', p FROM unnest('{usage:read,usage:write,billing:read,billing:manage,members:read,members:manage,keys:manage}'::text[]) p
UNION ALL
SELECT 'member', p FROM unnest('{usage:read,usage:write,members:read,keys:manage}'::text[]) p
UNION ALL
SELECT 'billing', p FROM unnest('{usage:read,billing:read,billing:manage,members:read}'::text[]) p
UNION ALL
SELECT 'viewer', p FROM unnest('{usage:read,billing:read,members:read}'::text[]) p;
COMMENT ON TABLE identity.role_permissions IS
  'What each role of an account member may do: the one table identity.authenticate decides by. owner: everything; admin: everything but SSO (and only owners make owners); member: meter, read, manage its own API keys; billing: pay, see invoices, read usage (no members, no metering); viewer: read.';

CREATE TABLE identity.memberships (
  account_id uuid NOT NULL REFERENCES identity.accounts,
  user_id    uuid NOT NULL REFERENCES identity.users ON DELETE CASCADE,
  role       text NOT NULL CHECK (role IN ('owner', 'admin', 'member', 'billing', 'viewer')),
  created_at timestamptz NOT NULL,
  invited_by uuid REFERENCES identity.users,
  PRIMARY KEY (account_id, user_id)
);
CREATE INDEX memberships_user_idx ON identity.memberships (user_id);
COMMENT ON TABLE identity.memberships IS
  'Who belongs to which account, with which role. A person owns their personal account; team accounts have members by invitation. An account always keeps at least one owner (enforced by the functions that change roles, under the account row''s lock).';
INSERT INTO identity.memberships (account_id, user_id, role, created_at)
SELECT account_id, id, 'owner', created_at FROM identity.users;

CREATE TABLE identity.invitations (
  id               uuid PRIMARY KEY DEFAULT util.uuid_v7(),
  account_id       uuid NOT NULL REFERENCES identity.accounts,
  email_normalized text NOT NULL CHECK (length(email_normalized) BETWEEN 3 AND 320),
  role             text NOT NULL CHECK (role IN ('owner', 'admin', 'member', 'billing', 'viewer')),
  token_hash       bytea NOT NULL UNIQUE,
  invited_by       uuid NOT NULL REFERENCES identity.users,
  created_at       timestamptz NOT NULL,
  expires_at       timestamptz NOT NULL,
  sent_count       integer NOT NULL DEFAULT 1,
  CONSTRAINT invitations_one_per_address UNIQUE (account_id, email_normalized)
);
COMMENT ON TABLE identity.invitations IS
  'Pending invitations to join an account: single use (claimed by DELETE ... RETURNING, so two accepts cannot both succeed), expiring (7 days), for one address (the accepting user''s verified email must match). Only the token''s SHA-256 is kept; the link is emailed.';

ALTER TABLE identity.api_keys ADD COLUMN created_by uuid REFERENCES identity.users ON DELETE SET NULL;
COMMENT ON COLUMN identity.api_keys.created_by IS
  'The member who created the key: on every use its scopes are cut to what that member''s role allows now (a demoted member''s keys lose what the role lost; a removed member''s keys stop). NULL for operator keys.';
ALTER TABLE identity.api_keys DROP CONSTRAINT api_keys_scopes_check;
ALTER TABLE identity.api_keys ADD CONSTRAINT api_keys_scopes_check
  CHECK (scopes <@ '{usage:write,usage:read,billing:read,billing:manage,service}'::text[] AND cardinality(scopes) > 0);
-- Keys that could meter could also buy before billing became a scope of its own: they keep that.
UPDATE identity.api_keys SET scopes = scopes || '{billing:read,billing:manage}'::text[]
WHERE 'usage:write' = ANY (scopes) AND NOT 'billing:manage' = ANY (scopes);

ALTER TABLE identity.accounts
  ADD COLUMN suspended_at timestamptz,
  ADD COLUMN suspended_reason text CHECK (length(suspended_reason) <= 500);
COMMENT ON COLUMN identity.accounts.suspended_at IS
  'Set by an operator (pgtally admin): every charge, hold and API key of the account is refused (403 account-suspended) until unsuspended; signing in still works and shows why.';

CREATE TABLE ops.audit_log (
  id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  at                timestamptz NOT NULL,
  staff_user_id     uuid NOT NULL REFERENCES identity.users,
  staff_role        text NOT NULL,
  action            text NOT NULL CHECK (action IN ('adjust_credits', 'refund', 'set_plan', 'suspend', 'unsuspend',
                                                    'revoke_sessions')),
  target_account_id uuid REFERENCES identity.accounts,
  target_user_id    uuid REFERENCES identity.users,
  reason            text NOT NULL CHECK (length(reason) BETWEEN 1 AND 500),
  before            jsonb,
  after             jsonb
);
CREATE INDEX audit_log_account_idx ON ops.audit_log (target_account_id, at);
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON ops.audit_log
  FOR EACH STATEMENT EXECUTE FUNCTION util.forbid_change();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON ops.audit_log
  FOR EACH STATEMENT EXECUTE FUNCTION util.forbid_change();
COMMENT ON TABLE ops.audit_log IS
  'Every staff action (who, their role, what, on which account or user, why, the state before and after), written in the action''s own transaction. Append-only.';

CREATE VIEW reporting.audit_log AS
SELECT l.id, l.at, u.email AS staff_email, l.staff_role, l.action, l.target_account_id, l.target_user_id, l.reason,
       l.before, l.after
FROM ops.audit_log l JOIN identity.users u ON u.id = l.staff_user_id;
COMMENT ON VIEW reporting.audit_log IS 'The operators'' actions, newest last: who (email, role), what, on what, why, before and after.';
GRANT SELECT ON reporting.audit_log TO pgtally_analyst;

ALTER TABLE outbox.messages DROP CONSTRAINT messages_kind_check;
ALTER TABLE outbox.messages ADD CONSTRAINT messages_kind_check
  CHECK (kind IN ('verify_email', 'account_exists', 'password_reset', 'usage_warning', 'auto_topup',
                  'auto_topup_disabled', 'meter_event', 'alert', 'payment_failed', 'receipt',
                  'subscription_ending', 'subscription_canceled', 'invitation'));

ALTER TABLE identity.sessions DROP CONSTRAINT sessions_revoked_reason_check;
ALTER TABLE identity.sessions ADD CONSTRAINT sessions_revoked_reason_check
  CHECK (revoked_reason IN ('logout', 'logout_all', 'revoked', 'refresh_token_reuse', 'password_reset', 'merged', 'staff'));
