-- pgtally 0002: users, sessions and rotating refresh tokens, one-time tokens, API key scopes,
-- anonymous devices, rate limits, the auth event log and the outbox.
-- depends: 0001_skeleton

-- Principal-taking api functions now take (p_api_key, p_session_id): drop the old signatures
-- (post-apply re-creates the functions).
DROP FUNCTION IF EXISTS api.consume(text, text, text, bigint, bigint, bigint);
DROP FUNCTION IF EXISTS api.check_usage(text, text, bigint, bigint, bigint);
DROP FUNCTION IF EXISTS api.balance(text);
DROP FUNCTION IF EXISTS api.ledger(text, text, integer);
DROP FUNCTION IF EXISTS identity.authenticate(text);
DROP FUNCTION IF EXISTS identity.issue_api_key(uuid, text);

CREATE SCHEMA outbox;
COMMENT ON SCHEMA outbox IS 'pgtally outbox: messages written by the transaction that caused them, delivered by pgtally worker.';

ALTER TABLE identity.accounts
  ADD COLUMN merged_into uuid REFERENCES identity.accounts,
  ADD COLUMN device_fingerprint text CHECK (length(device_fingerprint) BETWEEN 1 AND 256);
COMMENT ON COLUMN identity.accounts.merged_into IS
  'For an anonymous device account: the user account its usage and credits moved to (set once, by identity.merge_device).';
COMMENT ON COLUMN identity.accounts.device_fingerprint IS
  'For an anonymous device account: the fingerprint the device sent to POST /v1/identify. A hint for lookups and abuse limits, never a credential.';
CREATE INDEX accounts_device_fingerprint_idx ON identity.accounts (device_fingerprint) WHERE device_fingerprint IS NOT NULL;

ALTER TABLE identity.api_keys
  ADD COLUMN scopes text[] NOT NULL DEFAULT '{usage:write,usage:read}'
    CHECK (scopes <@ '{usage:write,usage:read,service}'::text[] AND cardinality(scopes) > 0),
  ADD COLUMN last_used_at timestamptz;
COMMENT ON COLUMN identity.api_keys.scopes IS
  'What the key may do: usage:write (POST /v1/usage/events), usage:read (check, balance, ledger), service (act on behalf of any account: account_id in the request).';
COMMENT ON COLUMN identity.api_keys.last_used_at IS 'When the key last authenticated a request (updated at most once a minute).';

CREATE TABLE identity.users (
  id                  uuid PRIMARY KEY DEFAULT util.uuid_v7(),
  account_id          uuid NOT NULL UNIQUE REFERENCES identity.accounts DEFERRABLE INITIALLY DEFERRED,
  email               text NOT NULL CHECK (length(email) BETWEEN 3 AND 320),
  email_normalized    text NOT NULL UNIQUE CHECK (email_normalized = lower(email_normalized)),
  password_hash       text NOT NULL,
  email_verified_at   timestamptz,
  password_changed_at timestamptz NOT NULL DEFAULT now(),
  created_at          timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE identity.users IS 'People who sign in with an email and password; each owns a personal account.';
COMMENT ON COLUMN identity.users.email_normalized IS 'lower(trim(email)): one user per address, whatever its case.';
COMMENT ON COLUMN identity.users.password_hash IS 'argon2id hash in PHC string format (argon2-cffi); the password itself never reaches the database.';

CREATE TABLE identity.sessions (
  id             uuid PRIMARY KEY DEFAULT util.uuid_v7(),
  account_id     uuid NOT NULL REFERENCES identity.accounts,
  user_id        uuid REFERENCES identity.users,
  ip             text,
  user_agent     text,
  created_at     timestamptz NOT NULL DEFAULT now(),
  last_used_at   timestamptz NOT NULL DEFAULT now(),
  expires_at     timestamptz NOT NULL,
  revoked_at     timestamptz,
  revoked_reason text CHECK (revoked_reason IN ('logout', 'logout_all', 'revoked', 'refresh_token_reuse',
                                                'password_reset', 'merged'))
);
CREATE INDEX sessions_user_id_idx ON identity.sessions (user_id) WHERE revoked_at IS NULL;
CREATE INDEX sessions_account_id_idx ON identity.sessions (account_id) WHERE revoked_at IS NULL;
COMMENT ON TABLE identity.sessions IS
  'A sign-in (a user''s login or an anonymous device''s identify): one refresh-token family. Revoking it ends every access and refresh token issued for it.';
COMMENT ON COLUMN identity.sessions.expires_at IS 'Absolute end of the session: refresh tokens stop rotating then (30 days after sign-in).';

CREATE TABLE identity.refresh_tokens (
  id          uuid PRIMARY KEY DEFAULT util.uuid_v7(),
  session_id  uuid NOT NULL REFERENCES identity.sessions,
  token_hash  bytea NOT NULL UNIQUE,
  created_at  timestamptz NOT NULL DEFAULT now(),
  expires_at  timestamptz NOT NULL,
  used_at     timestamptz
);
CREATE INDEX refresh_tokens_session_id_idx ON identity.refresh_tokens (session_id);
COMMENT ON TABLE identity.refresh_tokens IS
  'Refresh tokens (stored as SHA-256 hashes), each usable once: POST /v1/auth/refresh claims it and issues its successor. Presenting a used one outside the grace window revokes the session (RFC 9700 section 4.14.2).';

CREATE TABLE identity.one_time_tokens (
  id          uuid PRIMARY KEY DEFAULT util.uuid_v7(),
  user_id     uuid NOT NULL REFERENCES identity.users,
  purpose     text NOT NULL CHECK (purpose IN ('verify_email', 'password_reset')),
  token_hash  bytea NOT NULL UNIQUE,
  created_at  timestamptz NOT NULL DEFAULT now(),
  expires_at  timestamptz NOT NULL,
  used_at     timestamptz
);
CREATE INDEX one_time_tokens_user_id_idx ON identity.one_time_tokens (user_id, purpose);
COMMENT ON TABLE identity.one_time_tokens IS
  'Email verification and password reset tokens: 256 random bits, stored as SHA-256 hashes, claimed once with UPDATE ... RETURNING before they expire.';

CREATE TABLE identity.rate_limits (
  bucket       text NOT NULL,
  window_start timestamptz NOT NULL,
  hits         integer NOT NULL,
  PRIMARY KEY (bucket, window_start)
);
COMMENT ON TABLE identity.rate_limits IS
  'Fixed-window rate limit counters shared by every server process: bucket is action:dimension:value (login:ip:203.0.113.7). Old windows can be deleted at will.';

CREATE TABLE identity.auth_events (
  id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  kind        text NOT NULL CHECK (kind IN ('signup', 'signup_existing_email', 'login_succeeded', 'login_failed',
                                            'logout', 'logout_all', 'session_revoked', 'refresh_token_reuse',
                                            'email_verified', 'password_reset_requested', 'password_reset',
                                            'password_rehashed', 'api_key_created', 'api_key_revoked',
                                            'device_identified', 'device_merged', 'rate_limited')),
  user_id     uuid,
  account_id  uuid,
  session_id  uuid,
  ip          text,
  user_agent  text,
  detail      jsonb NOT NULL DEFAULT '{}',
  created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX auth_events_user_id_idx ON identity.auth_events (user_id, id) WHERE user_id IS NOT NULL;
COMMENT ON TABLE identity.auth_events IS
  'Append-only log of authentication events. Never holds a secret: no password, token or key, only ids.';
CREATE TRIGGER auth_events_append_only BEFORE UPDATE OR DELETE ON identity.auth_events
  FOR EACH STATEMENT EXECUTE FUNCTION util.forbid_change();

CREATE TABLE identity.jwt_keys (
  kid        text PRIMARY KEY,
  secret     bytea NOT NULL CHECK (length(secret) >= 32),
  created_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE identity.jwt_keys IS
  'HMAC keys for access tokens (HS256, RFC 7518). The newest signs; the server reads them through api.jwt_keys().';
INSERT INTO identity.jwt_keys (kid, secret)
VALUES (to_char(now() AT TIME ZONE 'UTC', 'YYYYMMDD') || '-' || left(gen_random_uuid()::text, 8),
        uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid()));

CREATE TABLE outbox.messages (
  id              uuid PRIMARY KEY DEFAULT util.uuid_v7(),
  kind            text NOT NULL CHECK (kind IN ('verify_email', 'account_exists', 'password_reset')),
  recipient       text NOT NULL,
  payload         jsonb NOT NULL DEFAULT '{}',
  created_at      timestamptz NOT NULL DEFAULT now(),
  attempts        integer NOT NULL DEFAULT 0,
  next_attempt_at timestamptz NOT NULL DEFAULT now(),
  delivered_at    timestamptz,
  failed_at       timestamptz,
  last_error      text
);
CREATE INDEX messages_pending_idx ON outbox.messages (next_attempt_at) WHERE delivered_at IS NULL AND failed_at IS NULL;
COMMENT ON TABLE outbox.messages IS
  'Emails to send, written in the transaction that caused them. pgtally worker claims due rows (FOR UPDATE SKIP LOCKED, with a lease), sends them and marks them delivered; failures retry with exponential backoff, 8 attempts.';
COMMENT ON COLUMN outbox.messages.payload IS
  'Template variables; a link token lives here only until delivery, then it is removed.';

CREATE VIEW reporting.auth_events_daily AS
SELECT (date_trunc('day', created_at AT TIME ZONE 'UTC'))::date AS day, kind, count(*) AS events
FROM identity.auth_events GROUP BY 1, 2;
COMMENT ON VIEW reporting.auth_events_daily IS 'Authentication events per UTC day and kind.';
CREATE VIEW reporting.outbox_backlog AS
SELECT kind, count(*) FILTER (WHERE delivered_at IS NULL AND failed_at IS NULL) AS pending,
       count(*) FILTER (WHERE failed_at IS NOT NULL) AS failed,
       min(created_at) FILTER (WHERE delivered_at IS NULL AND failed_at IS NULL) AS oldest_pending
FROM outbox.messages GROUP BY kind;
COMMENT ON VIEW reporting.outbox_backlog IS 'Outbox messages waiting or given up, per kind.';
GRANT SELECT ON reporting.auth_events_daily, reporting.outbox_backlog TO pgtally_analyst;
