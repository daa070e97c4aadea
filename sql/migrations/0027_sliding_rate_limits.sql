-- pgtally 0027: rate limits count the attempts of the last window (a sliding log), not of the
-- current clock window, which let about twice the limit through around a window's end. Issue #22
-- item 11. identity.throttled (sql/functions/50_auth.sql) is made again after the migrations.
-- depends: 0023_json_answers

DROP FUNCTION IF EXISTS identity.rate_limit(text, text, text, integer, interval);

ALTER TABLE identity.rate_limits RENAME TO rate_limits_fixed_window;
ALTER TABLE identity.rate_limits_fixed_window RENAME CONSTRAINT rate_limits_pkey TO rate_limits_fixed_window_pkey;

CREATE TABLE identity.rate_limits (
  bucket text PRIMARY KEY CONSTRAINT rate_limits_bucket_length CHECK (length(bucket) <= 600),
  hits   timestamptz[] NOT NULL
);
COMMENT ON TABLE identity.rate_limits IS
  'Sliding-window rate limits shared by every server process, one row a bucket, locked by identity.throttled while it decides. A row may be deleted at will once its newest hit is older than the longest window (one day).';
COMMENT ON COLUMN identity.rate_limits.bucket IS
  'action:dimension:value, e.g. login:ip:203.0.113.7 or signup:email:ada@example.com (at most 600 characters).';
COMMENT ON COLUMN identity.rate_limits.hits IS
  'When the allowed attempts of the bucket happened, oldest first: those inside the window, at most the limit (refused attempts are not kept).';

-- A window in progress stays as full as it was: its attempts are dated at the window's start, so
-- they count until the moment the fixed window would have ended.
INSERT INTO identity.rate_limits (bucket, hits)
SELECT DISTINCT ON (bucket) bucket, array_fill(window_start, ARRAY[least(hits, 10000)])
FROM identity.rate_limits_fixed_window
WHERE length(bucket) <= 600
ORDER BY bucket, window_start DESC;

DROP TABLE identity.rate_limits_fixed_window;
