-- pgtally 0006: every stored string bounded, rejected Stripe events, one refresh-token chain per
-- family, install ids for anonymous devices, usage events by window.
-- depends: 0005_usage_warning_emails

-- Signatures that change (post-apply re-creates them).
DROP FUNCTION IF EXISTS api.identify(text, text, text);
DROP FUNCTION IF EXISTS api.stripe_webhook(jsonb);

------------------------------------------------------------------------------------------------
-- Bounded strings: what the database stores has a length limit (or a shape) of its own.
-- NOT VALID: enforced for every new or changed row; rows stored before (a 5,000-character
-- currency) do not stop the upgrade. A DBA validates each after a look:
--   ALTER TABLE billing.payments VALIDATE CONSTRAINT payments_currency_shape;
------------------------------------------------------------------------------------------------
ALTER TABLE identity.accounts ADD CONSTRAINT accounts_name_length CHECK (length(name) <= 200) NOT VALID;
ALTER TABLE identity.api_keys ADD CONSTRAINT api_keys_name_length CHECK (length(name) <= 100) NOT VALID;
ALTER TABLE identity.sessions ADD CONSTRAINT sessions_ip_length CHECK (length(ip) <= 64) NOT VALID,
  ADD CONSTRAINT sessions_user_agent_length CHECK (length(user_agent) <= 512) NOT VALID;
ALTER TABLE identity.auth_events ADD CONSTRAINT auth_events_ip_length CHECK (length(ip) <= 64) NOT VALID,
  ADD CONSTRAINT auth_events_user_agent_length CHECK (length(user_agent) <= 512) NOT VALID;
ALTER TABLE identity.rate_limits ADD CONSTRAINT rate_limits_bucket_length CHECK (length(bucket) <= 600) NOT VALID;
ALTER TABLE identity.users ADD CONSTRAINT users_password_hash_length CHECK (length(password_hash) <= 512) NOT VALID;
ALTER TABLE outbox.messages ADD CONSTRAINT messages_recipient_length CHECK (length(recipient) <= 320) NOT VALID,
  ADD CONSTRAINT messages_last_error_length CHECK (length(last_error) <= 1000) NOT VALID;
ALTER TABLE ledger.transfers ADD CONSTRAINT transfers_memo_length CHECK (length(memo) <= 500) NOT VALID;
ALTER TABLE billing.plans ADD CONSTRAINT plans_name_length CHECK (length(name) <= 200) NOT VALID,
  ADD CONSTRAINT plans_description_length CHECK (length(description) <= 2000) NOT VALID;
ALTER TABLE metering.meters ADD CONSTRAINT meters_name_length CHECK (length(name) <= 200) NOT VALID,
  ADD CONSTRAINT meters_unit_length CHECK (length(unit) <= 63) NOT VALID;
ALTER TABLE billing.prices ADD CONSTRAINT prices_name_length CHECK (length(name) <= 200) NOT VALID,
  ADD CONSTRAINT prices_stripe_price_id_length CHECK (length(stripe_price_id) <= 255) NOT VALID;
ALTER TABLE billing.customers ADD CONSTRAINT customers_stripe_customer_id_length
  CHECK (length(stripe_customer_id) BETWEEN 1 AND 255) NOT VALID;
ALTER TABLE billing.subscriptions
  ADD CONSTRAINT subscriptions_id_length CHECK (length(stripe_subscription_id) BETWEEN 1 AND 255) NOT VALID,
  ADD CONSTRAINT subscriptions_customer_length CHECK (length(stripe_customer_id) <= 255) NOT VALID,
  ADD CONSTRAINT subscriptions_item_length CHECK (length(stripe_item_id) <= 255) NOT VALID,
  ADD CONSTRAINT subscriptions_last_event_id_length CHECK (length(last_event_id) <= 255) NOT VALID;
ALTER TABLE billing.payments
  ADD CONSTRAINT payments_id_length CHECK (length(stripe_payment_intent_id) BETWEEN 1 AND 255) NOT VALID,
  ADD CONSTRAINT payments_session_length CHECK (length(stripe_checkout_session) <= 255) NOT VALID,
  ADD CONSTRAINT payments_currency_shape CHECK (currency ~ '^[a-z]{3}$') NOT VALID;

------------------------------------------------------------------------------------------------
-- Stripe events that are signed but malformed are recorded as rejected, with the reason.
------------------------------------------------------------------------------------------------
ALTER TABLE billing.stripe_events DROP CONSTRAINT stripe_events_status_check;
ALTER TABLE billing.stripe_events
  ADD CONSTRAINT stripe_events_status_check CHECK (status IN ('applied', 'stale', 'ignored', 'rejected')),
  ADD CONSTRAINT stripe_events_id_length CHECK (length(id) BETWEEN 1 AND 255) NOT VALID,
  ADD CONSTRAINT stripe_events_type_length CHECK (length(type) <= 100) NOT VALID,
  ADD CONSTRAINT stripe_events_note_length CHECK (length(note) <= 1000) NOT VALID,
  ALTER COLUMN payload DROP NOT NULL,
  ALTER COLUMN created DROP NOT NULL,
  ADD CONSTRAINT stripe_events_rejected_only_unreadable
    CHECK (status = 'rejected' OR (payload IS NOT NULL AND created IS NOT NULL));
COMMENT ON COLUMN billing.stripe_events.status IS
  'applied; stale (older than the state already applied); ignored (nothing of pgtally''s to change); rejected (validly signed but malformed: nothing applied, note says why; answered 400).';
COMMENT ON COLUMN billing.stripe_events.payload IS
  'The event as received; NULL only for a rejected event that is not readable JSON (its id is then rejected: + the SHA-256 of the body).';

------------------------------------------------------------------------------------------------
-- Refresh tokens: every retry inside the grace window continues the one chain.
------------------------------------------------------------------------------------------------
ALTER TABLE identity.sessions
  ADD COLUMN refresh_secret bytea NOT NULL DEFAULT (uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid()))
    CHECK (length(refresh_secret) >= 32);
COMMENT ON COLUMN identity.sessions.refresh_secret IS
  'Random key of the refresh-token family: a token''s successor is HMAC-SHA256(refresh_secret, token), so a retry of the same token within the grace window gets the same successor, and the successor is never stored in plaintext.';

------------------------------------------------------------------------------------------------
-- Anonymous devices identified by a client-generated install id (stored hashed).
------------------------------------------------------------------------------------------------
ALTER TABLE identity.accounts ADD COLUMN device_install_hash bytea UNIQUE;
COMMENT ON COLUMN identity.accounts.device_install_hash IS
  'For an anonymous device account: SHA-256 of the install id the device sends to POST /v1/identify (a client-generated secret of at least 128 bits). The same install gets the same account.';

------------------------------------------------------------------------------------------------
-- Usage in a window, whatever the plan it was charged under (plan changes, device merges).
------------------------------------------------------------------------------------------------
CREATE INDEX usage_events_account_meter_created_idx ON metering.usage_events (account_id, meter_id, created_at);
COMMENT ON COLUMN metering.allowance_usage.used IS
  'Units counted against the entitlement in this window. A window''s row starts from all usage the account already made in it (metering.window_usage), so a plan change or a device merge never hands out a fresh allowance for usage already made.';

-- metering.quote returns the window's usage before the request (used_before).
DROP FUNCTION IF EXISTS metering.quote(identity.accounts, text, bigint, bigint, bigint);
DROP FUNCTION IF EXISTS billing.apply_subscription(jsonb);
