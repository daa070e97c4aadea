-- pgtally 0031: pgtally as an OpenID Connect provider for the product's own apps (issue 25):
-- registered clients, single-use authorization codes, asymmetric ID-token signing keys, and
-- sessions that belong to a client and hold its scopes.

CREATE TABLE identity.oauth_clients (
  id                        text PRIMARY KEY CHECK (id ~ '^pgc_[A-Za-z0-9_-]{22,64}$'),
  name                      text NOT NULL CHECK (length(btrim(name)) BETWEEN 1 AND 100),
  secret_hash               bytea,
  first_party               boolean NOT NULL DEFAULT false,
  redirect_uris             text[] NOT NULL CHECK (cardinality(redirect_uris) BETWEEN 1 AND 20),
  post_logout_redirect_uris text[] NOT NULL DEFAULT '{}',
  origins                   text[] NOT NULL DEFAULT '{}',
  created_at                timestamptz NOT NULL,
  revoked_at                timestamptz
);
COMMENT ON TABLE identity.oauth_clients IS
  'Relying parties (OpenID Connect clients) registered with `pgtally clients create`: the product''s own front ends, backends and browser extensions. Issue 25.';
COMMENT ON COLUMN identity.oauth_clients.id IS 'The client_id: pgc_ and 22 or more random URL-safe characters.';
COMMENT ON COLUMN identity.oauth_clients.secret_hash IS
  'SHA-256 of the client secret (a 366-bit random token, shown once) of a confidential client; NULL for a public client (browser app, extension), which must use PKCE S256.';
COMMENT ON COLUMN identity.oauth_clients.first_party IS 'The product''s own app: its users are not asked for consent.';
COMMENT ON COLUMN identity.oauth_clients.redirect_uris IS 'Exact redirect URIs (compared as strings, RFC 9700 section 4.1.3).';
COMMENT ON COLUMN identity.oauth_clients.post_logout_redirect_uris IS 'Where RP-initiated logout may send the browser back to (exact match).';
COMMENT ON COLUMN identity.oauth_clients.origins IS 'Extra browser origins (scheme://host[:port]) allowed by CORS besides the redirect URIs'' origins.';
COMMENT ON COLUMN identity.oauth_clients.revoked_at IS 'When the client was revoked: its codes, sessions and tokens stop working.';

CREATE TABLE identity.authorization_codes (
  id              uuid PRIMARY KEY DEFAULT util.uuid_v7(),
  code_hash       bytea NOT NULL UNIQUE,
  client_id       text NOT NULL REFERENCES identity.oauth_clients,
  browser_session_id uuid NOT NULL REFERENCES identity.sessions,
  redirect_uri    text NOT NULL,
  scopes          text[] NOT NULL,
  code_challenge  text CHECK (code_challenge ~ '^[A-Za-z0-9_-]{43}$'),
  nonce           text CHECK (length(nonce) <= 500),
  created_at      timestamptz NOT NULL,
  expires_at      timestamptz NOT NULL,
  used_at         timestamptz,
  session_id      uuid REFERENCES identity.sessions
);
CREATE INDEX authorization_codes_expires_at_idx ON identity.authorization_codes (expires_at);
COMMENT ON TABLE identity.authorization_codes IS
  'Authorization codes (RFC 6749 section 4.1), stored as SHA-256 hashes: single use, 60 seconds, bound to the client, the exact redirect URI, the PKCE challenge and the nonce. Issue 25.';
COMMENT ON COLUMN identity.authorization_codes.browser_session_id IS 'The signed-in browser session that approved it (its user and auth_time).';
COMMENT ON COLUMN identity.authorization_codes.code_challenge IS 'PKCE S256 code challenge (RFC 7636): BASE64URL(SHA-256(code_verifier)).';
COMMENT ON COLUMN identity.authorization_codes.used_at IS 'When it was exchanged; a second exchange is a replay and revokes the session it gave (RFC 6749 section 4.1.2).';
COMMENT ON COLUMN identity.authorization_codes.session_id IS 'The client session (refresh-token family) the exchange started.';

CREATE TABLE identity.signing_keys (
  kid          text PRIMARY KEY CHECK (length(kid) BETWEEN 8 AND 64),
  alg          text NOT NULL DEFAULT 'RS256' CHECK (alg = 'RS256'),
  private_jwk  jsonb NOT NULL,
  public_jwk   jsonb NOT NULL CHECK (NOT public_jwk ? 'd'),
  created_at   timestamptz NOT NULL
);
COMMENT ON TABLE identity.signing_keys IS
  'Asymmetric keys that sign ID tokens (RS256, RFC 7518), as JWKs (RFC 7517). The newest signs; an older one stays in the JWKS until every ID token it signed has expired (identity.published_signing_keys). Rotate with `pgtally clients rotate-key`. Issue 25.';
COMMENT ON COLUMN identity.signing_keys.private_jwk IS 'The private key (JWK, with d): read only by the server through api.oidc_signing_key().';

ALTER TABLE identity.sessions ADD COLUMN client_id text REFERENCES identity.oauth_clients,
                              ADD COLUMN scopes text[],
                              ADD COLUMN auth_time timestamptz;
CREATE INDEX sessions_client_id_idx ON identity.sessions (client_id) WHERE client_id IS NOT NULL AND revoked_at IS NULL;
COMMENT ON COLUMN identity.sessions.client_id IS 'The OpenID Connect client the session was granted to (its refresh tokens work only for it); NULL for pgtally''s own sign-ins.';
COMMENT ON COLUMN identity.sessions.scopes IS 'A client session''s granted scopes: its access tokens may do only these (identity.authenticate); NULL: not limited.';
COMMENT ON COLUMN identity.sessions.auth_time IS 'When the person authenticated (the browser session''s start): the ID token''s auth_time.';

ALTER TABLE identity.sessions DROP CONSTRAINT sessions_method_check;
ALTER TABLE identity.sessions ADD CONSTRAINT sessions_method_check
  CHECK (method IN ('password', 'device', 'google', 'github', 'device_code', 'sso', 'oidc'));
ALTER TABLE identity.sessions DROP CONSTRAINT sessions_revoked_reason_check;
ALTER TABLE identity.sessions ADD CONSTRAINT sessions_revoked_reason_check
  CHECK (revoked_reason IN ('logout', 'logout_all', 'revoked', 'refresh_token_reuse', 'password_reset', 'merged', 'staff',
                            'code_replay', 'client_revoked'));

-- An authorization URL is a local path of a few hundred characters (percent-encoded redirect URI,
-- state, nonce, PKCE challenge): sign-in through a provider must carry it back whole.
ALTER TABLE identity.oauth_flows DROP CONSTRAINT oauth_flows_return_to_check;
ALTER TABLE identity.oauth_flows ADD CONSTRAINT oauth_flows_return_to_check CHECK (length(return_to) <= 2000);

-- What the provider does is logged like every other sign-in.
ALTER TABLE identity.auth_events DROP CONSTRAINT auth_events_kind_check;
ALTER TABLE identity.auth_events ADD CONSTRAINT auth_events_kind_check
  CHECK (kind IN ('signup', 'signup_existing_email', 'login_succeeded', 'login_failed', 'logout',
                   'logout_all', 'session_revoked', 'refresh_token_reuse', 'email_verified',
                   'password_reset_requested', 'password_reset', 'password_rehashed', 'api_key_created',
                   'api_key_revoked', 'device_identified', 'device_merged', 'rate_limited', 'oauth_sign_in',
                   'oauth_signup', 'oauth_linked', 'oauth_unlinked', 'oauth_refused', 'device_code_requested',
                   'device_code_approved', 'device_code_denied', 'device_code_issued', 'sso_domain_claimed',
                   'sso_domain_verified', 'sso_link_requested', 'oidc_code_issued', 'oidc_code_exchanged',
                   'oidc_code_replayed', 'oidc_consent_denied', 'oidc_logout'));
