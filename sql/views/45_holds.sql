-- reporting views. Holds reconciliation (must be empty).
-- Re-applied after the migrations and the functions (sql/migrations/post-apply.py).

CREATE OR REPLACE VIEW reporting.hold_mismatches AS
SELECT a.id AS account_id, a.held_micros, coalesce(h.open_micros, 0) AS open_holds_micros
FROM identity.accounts a
LEFT JOIN (SELECT account_id, sum(credits_micros)::bigint AS open_micros FROM metering.holds
           WHERE status = 'open' GROUP BY account_id) h ON h.account_id = a.id
WHERE a.held_micros <> coalesce(h.open_micros, 0);
COMMENT ON VIEW reporting.hold_mismatches IS
  'Reconciliation: accounts whose held_micros differ from the credits of their open holds. Must be empty.';

GRANT SELECT ON reporting.hold_mismatches TO pgtally_analyst;
