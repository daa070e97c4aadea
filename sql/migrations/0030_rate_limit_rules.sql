-- pgtally 0030: one place for every rate limit: the rules table identity.throttled reads (until
-- now each caller wrote its limits as numbers).
-- depends: 0027_sliding_rate_limits 0024_sso_proof

CREATE TABLE identity.rate_limit_rules (
  action       text NOT NULL CHECK (action ~ '^[a-z_]{1,40}$'),
  dimension    text NOT NULL CHECK (dimension ~ '^[a-z_]{1,40}$'),
  max_attempts integer NOT NULL CHECK (max_attempts >= 0),
  per          interval NOT NULL CHECK (per > interval '0'),
  PRIMARY KEY (action, dimension)
);
COMMENT ON TABLE identity.rate_limit_rules IS
  'Every rate limit pgtally applies (identity.throttled): at most max_attempts of an action per dimension value (ip: the client''s address; email, fingerprint, install, user, code: what the caller names) in any sliding window of length per. An operator may change a row; the next attempt uses it.';
INSERT INTO identity.rate_limit_rules (action, dimension, max_attempts, per) VALUES
  ('signup', 'ip', 10, '1 hour'), ('signup', 'email', 5, '1 hour'),
  ('login', 'ip', 30, '5 minutes'), ('login', 'email', 10, '5 minutes'),
  ('verify_email', 'ip', 30, '1 hour'),
  ('password_reset', 'ip', 10, '1 hour'), ('password_reset', 'email', 3, '1 hour'),
  ('password_reset_confirm', 'ip', 10, '1 hour'),
  ('identify', 'ip', 30, '1 hour'), ('identify', 'fingerprint', 5, '1 day'),
  ('identify_install', 'ip', 3000, '1 hour'), ('identify_install', 'install', 600, '1 hour'),
  ('oauth', 'ip', 60, '10 minutes'),
  ('device_authorize', 'ip', 30, '1 hour'),
  ('device_code', 'ip', 20, '1 hour'), ('device_code', 'user', 20, '1 hour'),
  ('device_code_lookup', 'code', 10, '10 minutes');

DROP FUNCTION IF EXISTS identity.throttled(text, text, integer, interval, text, text, integer, interval);
