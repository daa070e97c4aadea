-- The idempotency check every write that takes an idempotency key makes, written once (issue #28).

CREATE OR REPLACE FUNCTION util.idempotency_check(p_stored bytea, p_request bytea, p_what text, p_detail jsonb)
RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
  IF p_stored IS NULL THEN
    RETURN false;                        -- no earlier request under the key: go on
  ELSIF p_stored = p_request THEN
    RETURN true;                         -- the same request again: answer it as the first time
  END IF;
  RAISE EXCEPTION USING ERRCODE = 'TL42R',
    MESSAGE = format('this idempotency key was already used for a different %s', p_what),
    DETAIL = coalesce(p_detail::text, '');
END $$;
COMMENT ON FUNCTION util.idempotency_check(bytea, bytea, text, jsonb) IS
  'The idempotency check of the IETF draft "The Idempotency-Key HTTP Header Field" (draft-ietf-httpapi-idempotency-key-header): given the fingerprint stored with an earlier request under the key (NULL: none) and this request''s, false when there was none (process it), true when it is the same request (replay the first answer: the API adds Idempotent-Replayed: true), and TL42R (422 idempotency-key-reused; p_what names the thing, p_detail the earlier one) when the key was used for a different request: nothing changes. Callers read the earlier request under the lock that serialises the writes of the key (the account row), so a concurrent retry waits for the first and replays it: no request under a key is ever seen in progress. Used by api.consume, api.consume_batch, api.hold, ledger.operator_transfer (grants, adjustments, admin credits) and metering.reverse_usage.';
