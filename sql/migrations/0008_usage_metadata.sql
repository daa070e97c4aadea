-- pgtally 0008: usage events carry the caller's metadata (a request id, a thumbnail URL, a
-- model name) and can be listed newest first.
-- depends: 0007_sign_in

DROP FUNCTION IF EXISTS api.consume(text, uuid, text, text, bigint, bigint, bigint, uuid);
DROP FUNCTION IF EXISTS metering.request_hash(text, bigint, bigint, bigint);

ALTER TABLE metering.usage_events
  ADD COLUMN metadata jsonb CHECK (jsonb_typeof(metadata) = 'object' AND length(metadata::text) <= 2048);
COMMENT ON COLUMN metering.usage_events.metadata IS
  'The caller''s metadata for the event (a JSON object of at most 2 KB: a request id, a thumbnail URL, a model name); part of the idempotency fingerprint, returned with the event.';
CREATE INDEX usage_events_account_id_id_idx ON metering.usage_events (account_id, id);
