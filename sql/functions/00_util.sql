-- Helpers shared by every domain (schema util): the clock, ids, units, JSON formatting, errors, HMAC,
-- secret tokens (random, hashed, base64url), and the idempotency check of every keyed write.

CREATE OR REPLACE FUNCTION util.now() RETURNS timestamptz
LANGUAGE sql STABLE AS $$
  SELECT coalesce(nullif(current_setting('pgtally.now', true), '')::timestamptz, now())
$$;
COMMENT ON FUNCTION util.now() IS
  'The one clock of pgtally: now(), unless the session sets pgtally.now (tests move time with SET pgtally.now = ''2026-01-31 23:59:59+00'').';

CREATE OR REPLACE FUNCTION util.uuid_v7s(p_count integer) RETURNS uuid[]
-- One util.uuid_v7 (one read of random bits: /dev/urandom, opened anew on every call when
-- PostgreSQL is built without OpenSSL, as the embedded one is), then a counter: rand_b's 62 bits
-- with their top bit cleared, so that adding up to 2^61 never reaches the variant bits.
LANGUAGE sql AS $$
  SELECT array_agg(encode(substring(f.first FROM 1 FOR 8) || int8send(f.counter + n), 'hex')::uuid ORDER BY n)
  FROM (SELECT b AS first, ('x' || encode(substring(b FROM 9 FOR 8), 'hex'))::bit(64)::bigint & ~(1::bigint << 61) AS counter
        FROM uuid_send(util.uuid_v7()) b) f
  CROSS JOIN generate_series(0, p_count - 1) n
$$;
COMMENT ON FUNCTION util.uuid_v7s(integer) IS
  'p_count version 7 UUIDs (at most 2^61), ascending, made together: the first is util.uuid_v7(), each next one more in its random part (RFC 9562 section 6.2, method 2, monotonic random). For a batch: one draw of random bits instead of one per id. NULL for 0.';

CREATE OR REPLACE FUNCTION util.credits(p_micros bigint) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  -- Multiplying by 0.000001 is exact in numeric (a division would round to about 16 digits).
  SELECT trim_scale(p_micros::numeric * 0.000001)::text
$$;
COMMENT ON FUNCTION util.credits(bigint) IS
  'Micro-credits as an exact decimal string of credits, as JSON shows them, for any bigint: 12500000 -> ''12.5'', 6000000000000052392 -> ''6000000000000.052392''. NULL stays NULL.';

CREATE OR REPLACE FUNCTION util.hmac_sha256(p_key bytea, p_message bytea) RETURNS bytea
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
  -- HMAC (RFC 2104) over SHA-256 (block size 64 bytes); PostgreSQL has sha256() built in but
  -- no hmac() without pgcrypto, which the embedded server does not ship.
  v_key bytea := CASE WHEN length(p_key) > 64 THEN sha256(p_key) ELSE p_key END;
  v_inner bytea;
  v_outer bytea;
BEGIN
  v_key := v_key || decode(repeat('00', 64 - length(v_key)), 'hex');
  v_inner := v_key;
  v_outer := v_key;
  FOR i IN 0..63 LOOP
    v_inner := set_byte(v_inner, i, get_byte(v_key, i) # 54);    -- 0x36
    v_outer := set_byte(v_outer, i, get_byte(v_key, i) # 92);    -- 0x5c
  END LOOP;
  RETURN sha256(v_outer || sha256(v_inner || p_message));
END $$;
COMMENT ON FUNCTION util.hmac_sha256(bytea, bytea) IS
  'HMAC-SHA256 (RFC 2104; checked against the RFC 4231 test vectors in tests/sql): a keyed hash, used to derive a refresh token''s successor from the token and its family''s secret.';

CREATE OR REPLACE FUNCTION util.iso(p_at timestamptz) RETURNS text
-- STABLE as to_char is, so that PostgreSQL inlines it where it is used (an IMMUTABLE function
-- over a STABLE one is called, not inlined: a function call of its own each time).
LANGUAGE sql STABLE PARALLEL SAFE AS $$
  SELECT to_char(p_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
$$;
COMMENT ON FUNCTION util.iso(timestamptz) IS
  'A timestamp as RFC 3339 text in UTC with microseconds, whatever the session time zone.';

CREATE OR REPLACE FUNCTION util.fail(p_sqlstate text, p_message text, p_detail jsonb DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION USING ERRCODE = p_sqlstate, MESSAGE = p_message,
    DETAIL = coalesce(p_detail::text, '');
END $$;
COMMENT ON FUNCTION util.fail(text, text, jsonb) IS
  'Raise a pgtally error: SQLSTATE of class TL (TL401 unauthenticated, TL402 payment required, TL404 not found, TL409 conflict, TL422 invalid input), a message meant for the caller, and optional JSON DETAIL whose members the API adds to the problem+json body.';

CREATE OR REPLACE FUNCTION util.base64url(p_bytes bytea) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
  SELECT rtrim(translate(encode(p_bytes, 'base64'), E'+/\n', '-_'), '=')
$$;
COMMENT ON FUNCTION util.base64url(bytea) IS 'Bytes as URL-safe base64 without padding (RFC 4648 section 5).';

CREATE OR REPLACE FUNCTION util.random_token() RETURNS text
LANGUAGE sql VOLATILE AS $$
  -- 366 random bits (three version-4 UUIDs from pg_strong_random), URL-safe base64, 64 characters.
  SELECT util.base64url(uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid()))
$$;
COMMENT ON FUNCTION util.random_token() IS
  'A secret token of 366 random bits as 64 URL-safe characters: refresh, verification and reset tokens, API key bodies.';

CREATE OR REPLACE FUNCTION util.token_hash(p_token text) RETURNS bytea
LANGUAGE sql STABLE AS $$        -- STABLE as convert_to is, so that it is inlined
  SELECT sha256(convert_to(coalesce(p_token, ''), 'UTF8'))
$$;
COMMENT ON FUNCTION util.token_hash(text) IS 'SHA-256 of a secret token: the only form in which tokens and keys are stored.';


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
