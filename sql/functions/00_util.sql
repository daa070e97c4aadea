-- Helpers shared by every domain: the clock, units, JSON formatting and errors.

CREATE OR REPLACE FUNCTION util.now() RETURNS timestamptz
LANGUAGE sql STABLE AS $$
  SELECT coalesce(nullif(current_setting('pgtally.now', true), '')::timestamptz, now())
$$;
COMMENT ON FUNCTION util.now() IS
  'The one clock of pgtally: now(), unless the session sets pgtally.now (tests move time with SET pgtally.now = ''2026-01-31 23:59:59+00'').';

CREATE OR REPLACE FUNCTION util.credits(p_micros bigint) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT trim_scale(p_micros::numeric / 1000000)::text
$$;
COMMENT ON FUNCTION util.credits(bigint) IS
  'Micro-credits as a decimal string of credits, as JSON shows them: 12500000 -> ''12.5''. NULL stays NULL.';

CREATE OR REPLACE FUNCTION util.iso(p_at timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
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
