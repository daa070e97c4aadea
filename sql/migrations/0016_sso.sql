-- pgtally 0016: enterprise single sign-on: a team's own OpenID Connect provider.
-- depends: 0015_teams

CREATE TABLE identity.sso_connections (
  account_id    uuid PRIMARY KEY REFERENCES identity.accounts,
  issuer        text NOT NULL CHECK (issuer ~ '^https?://\S+$' AND length(issuer) <= 500),
  client_id     text NOT NULL CHECK (length(client_id) BETWEEN 1 AND 255),
  client_secret text NOT NULL CHECK (length(client_secret) BETWEEN 1 AND 500),
  require_sso   boolean NOT NULL DEFAULT false,
  created_at    timestamptz NOT NULL,
  updated_at    timestamptz NOT NULL
);
COMMENT ON TABLE identity.sso_connections IS
  'A team''s OpenID Connect provider (set by an owner, permission sso:manage): people of its domains who sign in through it join the team as members. require_sso: those people may not sign in with a password or Google/GitHub.';
COMMENT ON COLUMN identity.sso_connections.client_secret IS 'The team''s client secret at its provider, readable by the database owner (and by the server through api.sso_flow_config); never shown by the API.';

CREATE TABLE identity.sso_domains (
  domain     text PRIMARY KEY CHECK (domain ~ '^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$' AND domain LIKE '%.%'),
  account_id uuid NOT NULL REFERENCES identity.sso_connections ON DELETE CASCADE
);
COMMENT ON TABLE identity.sso_domains IS 'Email domains and the team whose provider signs their people in: one team per domain.';

ALTER TABLE identity.user_identities DROP CONSTRAINT user_identities_provider_check;
ALTER TABLE identity.user_identities ADD CONSTRAINT user_identities_provider_check CHECK (provider IN ('google', 'github', 'sso'));
ALTER TABLE identity.oauth_flows DROP CONSTRAINT oauth_flows_provider_check;
ALTER TABLE identity.oauth_flows ADD CONSTRAINT oauth_flows_provider_check CHECK (provider IN ('google', 'github', 'sso'));
ALTER TABLE identity.oauth_flows ADD COLUMN sso_account_id uuid REFERENCES identity.accounts;
COMMENT ON COLUMN identity.oauth_flows.sso_account_id IS 'For provider sso: the team whose provider this flow signs in with.';
ALTER TABLE identity.sessions DROP CONSTRAINT sessions_method_check;
ALTER TABLE identity.sessions ADD CONSTRAINT sessions_method_check
  CHECK (method IN ('password', 'device', 'google', 'github', 'device_code', 'sso'));

DROP FUNCTION IF EXISTS api.oauth_begin(text, text, text, uuid, uuid, text, text);
DROP FUNCTION IF EXISTS api.oauth_sign_in(text, text, text, boolean, uuid, text, text, text);
-- The refund's amount rule moved into api.admin_refund_target (sql/functions/75_admin.sql).
DROP FUNCTION IF EXISTS api.admin_refund_target(uuid, text);
