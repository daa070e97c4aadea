-- pgtally 0024: a team's SSO email domain takes effect only once its ownership is proven (a DNS TXT
-- record, or a staff approval in the audit log); public mail domains are refused; an SSO sign-in
-- links to an existing user only after that user confirms it from a link sent to the address.
-- depends: 0023_json_answers

-- A claim no longer blocks the domain for others: many teams may claim it, one may prove it.
ALTER TABLE identity.sso_domains DROP CONSTRAINT sso_domains_pkey;
ALTER TABLE identity.sso_domains
  ADD COLUMN verification_token text NOT NULL DEFAULT replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''),
  ADD COLUMN claimed_at timestamptz NOT NULL DEFAULT now(),
  ADD COLUMN verified_at timestamptz,
  ADD COLUMN verified_by text CHECK (verified_by IN ('dns', 'staff')),
  ADD CONSTRAINT sso_domains_verified_check CHECK ((verified_at IS NULL) = (verified_by IS NULL)),
  ADD PRIMARY KEY (account_id, domain);
ALTER TABLE identity.sso_domains ALTER COLUMN verification_token DROP DEFAULT, ALTER COLUMN claimed_at DROP DEFAULT;
-- Claims made before this migration were never proven: they wait for a proof like new ones.
CREATE UNIQUE INDEX sso_domains_verified_domain_key ON identity.sso_domains (domain) WHERE verified_at IS NOT NULL;
COMMENT ON TABLE identity.sso_domains IS
  'Email domains a team claims for its provider. A claim takes effect (sign-in through the team''s provider, require_sso) only once verified: a DNS TXT record "pgtally-domain-verification=<verification_token>" on the domain (api.verify_sso_domain), or a staff approval written to ops.audit_log (api.admin_approve_sso_domain). Any number of teams may claim a domain; one may prove it (sso_domains_verified_domain_key).';
COMMENT ON COLUMN identity.sso_domains.verification_token IS 'Random value the team publishes in a TXT record on the domain to prove it owns it.';
COMMENT ON COLUMN identity.sso_domains.verified_at IS 'When ownership was proven; NULL: claimed only, no effect.';
COMMENT ON COLUMN identity.sso_domains.verified_by IS 'How: dns (the TXT record was found) or staff (an approval in ops.audit_log).';

CREATE TABLE identity.public_mail_domains (
  domain text PRIMARY KEY CHECK (domain = lower(domain))
);
COMMENT ON TABLE identity.public_mail_domains IS
  'Mail domains anyone can have an address at (Gmail, Outlook, ...): no team may claim them (or a subdomain of one) for single sign-on. Operators may add rows.';
INSERT INTO identity.public_mail_domains (domain) VALUES
  ('gmail.com'), ('googlemail.com'), ('outlook.com'), ('hotmail.com'), ('hotmail.co.uk'), ('hotmail.fr'), ('hotmail.de'),
  ('hotmail.it'), ('hotmail.es'), ('live.com'), ('live.co.uk'), ('live.fr'), ('msn.com'), ('outlook.fr'), ('outlook.de'),
  ('yahoo.com'), ('yahoo.co.uk'), ('yahoo.co.jp'), ('yahoo.fr'), ('yahoo.de'), ('yahoo.es'), ('yahoo.it'), ('ymail.com'),
  ('rocketmail.com'), ('icloud.com'), ('me.com'), ('mac.com'), ('aol.com'), ('proton.me'), ('protonmail.com'),
  ('protonmail.ch'), ('pm.me'), ('tutanota.com'), ('tuta.io'), ('tutamail.com'), ('gmx.com'), ('gmx.de'), ('gmx.net'),
  ('gmx.at'), ('web.de'), ('t-online.de'), ('mail.com'), ('email.com'), ('fastmail.com'), ('fastmail.fm'), ('hey.com'),
  ('zoho.com'), ('zohomail.com'), ('yandex.com'), ('yandex.ru'), ('mail.ru'), ('inbox.ru'), ('list.ru'), ('bk.ru'),
  ('rambler.ru'), ('qq.com'), ('163.com'), ('126.com'), ('yeah.net'), ('sina.com'), ('naver.com'), ('daum.net'),
  ('hanmail.net'), ('orange.fr'), ('wanadoo.fr'), ('free.fr'), ('laposte.net'), ('sfr.fr'), ('libero.it'), ('virgilio.it'),
  ('seznam.cz'), ('wp.pl'), ('o2.pl'), ('interia.pl'), ('onet.pl'), ('btinternet.com'), ('sky.com'), ('comcast.net'),
  ('att.net'), ('sbcglobal.net'), ('verizon.net'), ('cox.net'), ('earthlink.net'), ('rediffmail.com'), ('bol.com.br'),
  ('uol.com.br'), ('terra.com.br'), ('hushmail.com'), ('mailbox.org'), ('posteo.de'), ('disroot.org'), ('duck.com'),
  ('passmail.net'), ('simplelogin.com'), ('anonaddy.me'), ('mailinator.com'), ('guerrillamail.com'), ('10minutemail.com'),
  ('yopmail.com'), ('example.com'), ('example.org'), ('example.net');

-- Claims of public mail domains made before this migration (the attack this closes) are dropped.
DELETE FROM identity.sso_domains d USING identity.public_mail_domains p
WHERE d.domain = p.domain OR d.domain LIKE '%.' || p.domain;

CREATE TABLE identity.sso_link_requests (
  id          uuid PRIMARY KEY DEFAULT util.uuid_v7(),
  token_hash  bytea NOT NULL UNIQUE,
  user_id     uuid NOT NULL REFERENCES identity.users,
  account_id  uuid NOT NULL REFERENCES identity.accounts,
  subject     text NOT NULL CHECK (length(subject) BETWEEN 1 AND 300),
  email       text NOT NULL CHECK (length(email) <= 320),
  return_to   text CHECK (length(return_to) <= 500),
  created_at  timestamptz NOT NULL,
  expires_at  timestamptz NOT NULL,
  used_at     timestamptz
);
CREATE INDEX sso_link_requests_user_idx ON identity.sso_link_requests (user_id);
COMMENT ON TABLE identity.sso_link_requests IS
  'A team''s provider signed in an address that already has a pgtally user who never linked that team''s sign-in: nothing is linked until the user opens the link emailed to that address (api.confirm_sso_link, once, within an hour). The token is stored as its SHA-256 hash.';
COMMENT ON COLUMN identity.sso_link_requests.subject IS 'The team''s provider''s subject, as identity.user_identities stores it for provider sso ("<team id>:<sub>").';
COMMENT ON COLUMN identity.sso_link_requests.account_id IS 'The team whose provider signed the person in.';

ALTER TABLE outbox.messages DROP CONSTRAINT messages_kind_check;
ALTER TABLE outbox.messages ADD CONSTRAINT messages_kind_check
  CHECK (kind IN ('verify_email', 'account_exists', 'password_reset', 'usage_warning', 'auto_topup',
                  'auto_topup_disabled', 'meter_event', 'alert', 'payment_failed', 'receipt', 'subscription_ending',
                  'subscription_canceled', 'invitation', 'sso_link'));

ALTER TABLE ops.audit_log DROP CONSTRAINT audit_log_action_check;
ALTER TABLE ops.audit_log ADD CONSTRAINT audit_log_action_check
  CHECK (action IN ('adjust_credits', 'refund', 'set_plan', 'suspend', 'unsuspend', 'revoke_sessions',
                    'approve_sso_domain'));

-- The SSO rule now asks about a user (a member of the team), not about an address.
DROP FUNCTION IF EXISTS identity.sso_required(text);

ALTER TABLE identity.auth_events DROP CONSTRAINT auth_events_kind_check;
ALTER TABLE identity.auth_events ADD CONSTRAINT auth_events_kind_check
  CHECK (kind IN ('signup', 'signup_existing_email', 'login_succeeded', 'login_failed', 'logout', 'logout_all',
                  'session_revoked', 'refresh_token_reuse', 'email_verified', 'password_reset_requested', 'password_reset',
                  'password_rehashed', 'api_key_created', 'api_key_revoked', 'device_identified', 'device_merged',
                  'rate_limited', 'oauth_sign_in', 'oauth_signup', 'oauth_linked', 'oauth_unlinked', 'oauth_refused',
                  'device_code_requested', 'device_code_approved', 'device_code_denied', 'device_code_issued',
                  'sso_domain_claimed', 'sso_domain_verified', 'sso_link_requested'));
