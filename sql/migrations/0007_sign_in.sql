-- pgtally 0007: sign-in with OAuth / OpenID Connect providers, browser sign-in flows, and the
-- device authorization grant (RFC 8628) for the command line.
-- depends: 0006_hardening

-- A user who signed up with Google or GitHub has no password until they choose one.
ALTER TABLE identity.users ALTER COLUMN password_hash DROP NOT NULL;
COMMENT ON COLUMN identity.users.password_hash IS
  'argon2id hash in PHC string format (argon2-cffi); the password itself never reaches the database. NULL for a user who signs in only through a provider.';

CREATE TABLE identity.user_identities (
  provider        text NOT NULL CHECK (provider IN ('google', 'github')),
  subject         text NOT NULL CHECK (length(subject) BETWEEN 1 AND 255),
  user_id         uuid NOT NULL REFERENCES identity.users ON DELETE CASCADE,
  email           text CHECK (length(email) <= 320),
  email_verified  boolean NOT NULL DEFAULT false,
  linked_at       timestamptz NOT NULL DEFAULT now(),
  last_sign_in_at timestamptz,
  PRIMARY KEY (provider, subject),
  UNIQUE (user_id, provider)
);
COMMENT ON TABLE identity.user_identities IS
  'A provider account (Google''s OpenID Connect sub, GitHub''s numeric user id) linked to a pgtally user: at most one per provider and user. Linked at first sign-in, by a verified email, or from the account page.';
COMMENT ON COLUMN identity.user_identities.subject IS 'The provider''s stable user id (OIDC sub, GitHub id): never the email, which can change.';

CREATE TABLE identity.oauth_flows (
  id             uuid PRIMARY KEY DEFAULT util.uuid_v7(),
  provider       text NOT NULL CHECK (provider IN ('google', 'github')),
  state_hash     bytea NOT NULL UNIQUE,
  browser_hash   bytea NOT NULL,
  nonce          text NOT NULL CHECK (length(nonce) <= 128),
  code_verifier  text NOT NULL CHECK (length(code_verifier) BETWEEN 43 AND 128),
  purpose        text NOT NULL CHECK (purpose IN ('sign_in', 'link')),
  session_id     uuid REFERENCES identity.sessions,
  device_session_id uuid REFERENCES identity.sessions,
  return_to      text CHECK (length(return_to) <= 500),
  created_at     timestamptz NOT NULL DEFAULT now(),
  expires_at     timestamptz NOT NULL,
  used_at        timestamptz
);
COMMENT ON TABLE identity.oauth_flows IS
  'One authorization-code flow with a provider (RFC 6749 section 4.1 with PKCE, RFC 7636): the state (stored hashed) binds the callback to the browser that started it (browser_hash: SHA-256 of a random cookie), the nonce binds the ID token (OpenID Connect), the PKCE verifier stays here. Single use, 10 minutes.';
COMMENT ON COLUMN identity.oauth_flows.session_id IS 'For purpose = link: the signed-in session that asked to link a provider.';
COMMENT ON COLUMN identity.oauth_flows.device_session_id IS 'An anonymous device session the browser carried: merged into the user at sign-in.';

CREATE TABLE identity.device_codes (
  id                uuid PRIMARY KEY DEFAULT util.uuid_v7(),
  device_code_hash  bytea NOT NULL UNIQUE,
  user_code         text NOT NULL CHECK (user_code ~ '^[BCDFGHJKLMNPQRSTVWXZ]{8}$'),
  client_id         text NOT NULL CHECK (length(client_id) BETWEEN 1 AND 100),
  scope             text CHECK (length(scope) <= 200),
  ip                text CHECK (length(ip) <= 64),
  user_agent        text CHECK (length(user_agent) <= 512),
  device_session_id uuid REFERENCES identity.sessions,
  status            text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'approved', 'denied')),
  user_id           uuid REFERENCES identity.users,
  interval_seconds  integer NOT NULL DEFAULT 5 CHECK (interval_seconds BETWEEN 1 AND 120),
  created_at        timestamptz NOT NULL DEFAULT now(),
  expires_at        timestamptz NOT NULL,
  last_polled_at    timestamptz,
  decided_at        timestamptz,
  issued_at         timestamptz,
  CHECK ((status = 'pending') = (decided_at IS NULL)),
  CHECK (status <> 'approved' OR user_id IS NOT NULL)
);
CREATE UNIQUE INDEX device_codes_pending_user_code_idx ON identity.device_codes (user_code) WHERE status = 'pending';
COMMENT ON TABLE identity.device_codes IS
  'Device authorization grant (RFC 8628): a command line asks for a device code, a signed-in person approves or denies its user code at /device, the command line polls /oauth/token and gets one token pair, once. Codes expire after 10 minutes.';
COMMENT ON COLUMN identity.device_codes.user_code IS
  '8 characters from an alphabet without vowels or look-alikes (RFC 8628 section 6.1), shown as XXXX-XXXX.';
COMMENT ON COLUMN identity.device_codes.device_session_id IS
  'The command line''s anonymous device session (POST /v1/identify), when it sent one: merged into the user on approval, once.';

ALTER TABLE identity.auth_events DROP CONSTRAINT auth_events_kind_check;
ALTER TABLE identity.auth_events ADD CONSTRAINT auth_events_kind_check
  CHECK (kind IN ('signup', 'signup_existing_email', 'login_succeeded', 'login_failed',
                  'logout', 'logout_all', 'session_revoked', 'refresh_token_reuse',
                  'email_verified', 'password_reset_requested', 'password_reset',
                  'password_rehashed', 'api_key_created', 'api_key_revoked',
                  'device_identified', 'device_merged', 'rate_limited',
                  'oauth_sign_in', 'oauth_signup', 'oauth_linked', 'oauth_unlinked', 'oauth_refused',
                  'device_code_requested', 'device_code_approved', 'device_code_denied', 'device_code_issued'));

ALTER TABLE identity.sessions DROP CONSTRAINT sessions_revoked_reason_check;
ALTER TABLE identity.sessions ADD CONSTRAINT sessions_revoked_reason_check
  CHECK (revoked_reason IN ('logout', 'logout_all', 'revoked', 'refresh_token_reuse', 'password_reset', 'merged'));
ALTER TABLE identity.sessions ADD COLUMN method text NOT NULL DEFAULT 'password'
  CHECK (method IN ('password', 'device', 'google', 'github', 'device_code'));
COMMENT ON COLUMN identity.sessions.method IS
  'How the session started: password, google, github (browser sign-in), device (an anonymous install, POST /v1/identify), device_code (a command line approved at /device).';
UPDATE identity.sessions SET method = 'device' WHERE user_id IS NULL;
DROP FUNCTION IF EXISTS identity.start_session(uuid, uuid, text, text);
