-- pgtally 0023: a charge's answer is json, built once as text, not jsonb (sql/functions makes the
-- new functions after the migrations). Issue #14.
-- depends: 0022_quote_in_hand
--
-- A batch wrapped each event's jsonb answer in another jsonb and all of them in a third: each time
-- PostgreSQL takes the inner value apart and encodes it again, and once more into text on the way
-- out. Built as json, an answer is text appended as it is (a batch of 100: -12%). The return types
-- change, so the old functions go; the keys now come in the order they are built in.
DROP FUNCTION IF EXISTS api.capture_hold(text, uuid, uuid, bigint, bigint, bigint, uuid);
DROP FUNCTION IF EXISTS api.consume(text, uuid, text, text, bigint, bigint, bigint, uuid, jsonb);
DROP FUNCTION IF EXISTS api.consume_batch(text, uuid, jsonb);
DROP FUNCTION IF EXISTS metering.charge(identity.accounts, text, bytea, jsonb, record, boolean);
DROP FUNCTION IF EXISTS metering.replayed_answer(metering.idempotency_keys);
DROP FUNCTION IF EXISTS metering.usage_event_answer(metering.usage_events, jsonb);
-- An allowance's state (in every answer, from metering.quote) is json too.
DROP FUNCTION IF EXISTS metering.event_allowance(metering.usage_events);
DROP FUNCTION IF EXISTS metering.quote(identity.accounts, text, bigint, bigint, bigint, timestamptz, bigint, timestamptz,
                                       metering.meters, billing.entitlements);
DROP FUNCTION IF EXISTS metering.allowance_json(billing.entitlements, metering.meters, timestamptz, timestamptz, bigint);
