-- reporting views. Identity: authentication events per day.
-- Re-applied after the migrations and the functions (sql/migrations/post-apply.py).

CREATE OR REPLACE VIEW reporting.auth_events_daily AS
SELECT (date_trunc('day', created_at AT TIME ZONE 'UTC'))::date AS day, kind, count(*) AS events
FROM identity.auth_events GROUP BY 1, 2;
COMMENT ON VIEW reporting.auth_events_daily IS 'Authentication events per UTC day and kind.';

GRANT SELECT ON reporting.auth_events_daily TO pgtally_analyst;
