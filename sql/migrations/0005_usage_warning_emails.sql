-- pgtally 0005: usage warnings are also emailed, through the outbox.
-- depends: 0004_trigger_privileges

DROP FUNCTION IF EXISTS api.stripe_price_of(text);   -- replaced by api.live_subscription

ALTER TABLE outbox.messages DROP CONSTRAINT messages_kind_check;
ALTER TABLE outbox.messages ADD CONSTRAINT messages_kind_check
  CHECK (kind IN ('verify_email', 'account_exists', 'password_reset', 'usage_warning'));
