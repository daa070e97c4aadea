-- pgtally 0034: installs keep their person (issue 25). A linked install's sessions remember the
-- install (its hash), so ending one of them (sign out of that install, revoke it in the session
-- list, log out everywhere, a password reset, a detected refresh-token reuse) unlinks the install.

ALTER TABLE identity.sessions ADD COLUMN install_hash bytea;
COMMENT ON COLUMN identity.sessions.install_hash IS
  'For a session POST /v1/identify issued to an install linked to a person (identity.accounts.device_install_hash of the device account merged into the person''s account): that hash. Revoking any such session unlinks the install (identity.unlink_install_on_revoke); NULL otherwise.';
CREATE INDEX sessions_install_hash_idx ON identity.sessions (install_hash) WHERE install_hash IS NOT NULL;

COMMENT ON COLUMN identity.accounts.device_install_hash IS
  'For an anonymous device account: SHA-256 of the install id the device sends to POST /v1/identify (a client-generated secret of at least 128 bits). The same install gets the same account. Kept after the account is merged into a person''s account (merged_into): the install is then linked, and identify answers for the person, until one of its sessions is revoked (identity.sessions.install_hash), which clears it.';

-- The trigger's function, as sql/functions/50_auth.sql states it (re-applied there on every upgrade).
CREATE OR REPLACE FUNCTION identity.unlink_install_on_revoke() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  -- The install stops answering for the person, and its other sessions end with this one.
  UPDATE identity.accounts SET device_install_hash = NULL
  WHERE device_install_hash = NEW.install_hash AND merged_into IS NOT NULL;
  UPDATE identity.sessions SET revoked_at = NEW.revoked_at, revoked_reason = NEW.revoked_reason
  WHERE install_hash = NEW.install_hash AND revoked_at IS NULL;
  RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER sessions_unlink_install AFTER UPDATE OF revoked_at ON identity.sessions
  FOR EACH ROW WHEN (OLD.revoked_at IS NULL AND NEW.revoked_at IS NOT NULL AND NEW.install_hash IS NOT NULL)
  EXECUTE FUNCTION identity.unlink_install_on_revoke();
