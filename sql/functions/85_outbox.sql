-- The outbox (outbox.messages: emails and other messages written by the transaction that caused them),
-- as the worker drives it: claim due messages, mark them delivered or failed (with retries); and the
-- worker's housekeeping (old rate-limit windows, expired holds, due credit lots).

CREATE OR REPLACE FUNCTION api.outbox_claim(p_limit integer DEFAULT 10)
RETURNS TABLE (id uuid, kind text, recipient text, payload jsonb, attempts integer)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  WITH claimed AS (
    UPDATE outbox.messages m
    SET attempts = m.attempts + 1, next_attempt_at = util.now() + interval '5 minutes'
    WHERE m.id IN (SELECT x.id FROM outbox.messages x
                   WHERE x.delivered_at IS NULL AND x.failed_at IS NULL AND x.next_attempt_at <= util.now()
                   ORDER BY x.next_attempt_at LIMIT p_limit FOR UPDATE SKIP LOCKED)
    RETURNING m.id, m.kind, m.recipient, m.payload, m.attempts, m.created_at)
  SELECT id, kind, recipient, payload, attempts FROM claimed ORDER BY created_at, id
$$;
COMMENT ON FUNCTION api.outbox_claim(integer) IS
  'pgtally worker: claim up to p_limit due messages with a 5-minute lease (FOR UPDATE SKIP LOCKED: concurrent workers never take the same row).';

CREATE OR REPLACE FUNCTION api.outbox_delivered(p_id uuid) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  UPDATE outbox.messages SET delivered_at = util.now(), payload = payload - 'token', last_error = NULL
  WHERE id = p_id AND delivered_at IS NULL
$$;
COMMENT ON FUNCTION api.outbox_delivered(uuid) IS 'pgtally worker: the message was accepted by the mail server; its link token is dropped.';

CREATE OR REPLACE FUNCTION api.outbox_failed(p_id uuid, p_error text) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  UPDATE outbox.messages
  SET last_error = left(p_error, 1000),
      next_attempt_at = util.now() + interval '5 seconds' * power(2, attempts - 1),
      failed_at = CASE WHEN attempts >= 8 THEN util.now() END,
      payload = CASE WHEN attempts >= 8 THEN payload - 'token' ELSE payload END
  WHERE id = p_id AND delivered_at IS NULL
$$;
COMMENT ON FUNCTION api.outbox_failed(uuid, text) IS
  'pgtally worker: sending failed; retry after 5 s x 2^(attempts-1), give up after 8 attempts (failed_at, token dropped).';

CREATE OR REPLACE FUNCTION api.housekeeping() RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_buckets integer;
BEGIN
  DELETE FROM identity.rate_limits WHERE coalesce(hits[cardinality(hits)], '-infinity') < util.now() - interval '2 days';
  GET DIAGNOSTICS v_buckets = ROW_COUNT;
  RETURN jsonb_build_object('rate_limit_buckets_deleted', v_buckets, 'holds_expired', api.expire_holds(),
                            'credit_accounts_refreshed', api.refresh_due_credits());
END $$;
COMMENT ON FUNCTION api.housekeeping() IS
  'pgtally worker, every few minutes: delete rate-limit buckets whose newest attempt is older than two days (the longest window is one day), release expired holds (api.expire_holds), and release and expire due credit lots (api.refresh_due_credits). The worker then calls api.maintain_storage in a transaction of its own.';

GRANT EXECUTE ON FUNCTION
  api.outbox_claim(integer), api.outbox_delivered(uuid), api.outbox_failed(uuid, text), api.housekeeping()
TO pgtally_api;
