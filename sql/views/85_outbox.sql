-- reporting views. Outbox: messages waiting or given up.
-- Re-applied after the migrations and the functions (sql/migrations/post-apply.py).

CREATE OR REPLACE VIEW reporting.outbox_backlog AS
SELECT kind, count(*) FILTER (WHERE delivered_at IS NULL AND failed_at IS NULL) AS pending,
       count(*) FILTER (WHERE failed_at IS NOT NULL) AS failed,
       min(created_at) FILTER (WHERE delivered_at IS NULL AND failed_at IS NULL) AS oldest_pending
FROM outbox.messages GROUP BY kind;
COMMENT ON VIEW reporting.outbox_backlog IS 'Outbox messages waiting or given up, per kind.';

GRANT SELECT ON reporting.outbox_backlog TO pgtally_analyst;
