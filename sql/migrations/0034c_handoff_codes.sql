-- pgtally 0034c: no access token in a URL (issue 25). An install hands its sign-in to a browser
-- with a short-lived single-use code it asked for over an authenticated POST; the login page
-- claims it once and keeps the install's session in the encrypted page session.

CREATE TABLE identity.handoff_codes (
  code_hash         bytea PRIMARY KEY,
  device_session_id uuid NOT NULL REFERENCES identity.sessions,
  created_at        timestamptz NOT NULL,
  expires_at        timestamptz NOT NULL,
  claimed_at        timestamptz
);
COMMENT ON TABLE identity.handoff_codes IS
  'Handoff codes (POST /v1/identify/handoff): an anonymous install''s session, for a browser to merge at sign-in (/login?handoff=, /signup?handoff=, /auth/*/start?handoff=). Single use, 10 minutes (api.claim_handoff). Issue 25.';
COMMENT ON COLUMN identity.handoff_codes.code_hash IS 'SHA-256 of the code (a random token shown once to the install).';
COMMENT ON COLUMN identity.handoff_codes.device_session_id IS 'The install''s session (of an unmerged device account) the code hands over.';
COMMENT ON COLUMN identity.handoff_codes.claimed_at IS 'When a page claimed it; a claimed code never works again.';
CREATE INDEX handoff_codes_device_session_idx ON identity.handoff_codes (device_session_id);
