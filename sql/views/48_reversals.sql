-- reporting views. Reversals of usage events (issue #28): their reconciliation, and what post-paid
-- reversals owe. Re-applied after the migrations and the functions (sql/migrations/post-apply.py).

CREATE OR REPLACE VIEW reporting.reversal_mismatches AS
SELECT r.id AS reversal_id, r.account_id, r.usage_event_id, 'transfer' AS problem
FROM metering.reversals r LEFT JOIN ledger.transfers t ON t.id = r.transfer_id
WHERE r.credits_micros > 0 AND (t.id IS NULL OR t.kind <> 'reversal' OR t.amount_micros <> r.credits_micros
                                OR t.usage_event_id IS DISTINCT FROM r.usage_event_id)
UNION ALL
SELECT NULL, t.account_id, t.usage_event_id, 'transfer without reversal'
FROM ledger.transfers t
WHERE t.kind = 'reversal' AND NOT EXISTS (SELECT 1 FROM metering.reversals r WHERE r.transfer_id = t.id)
UNION ALL
SELECT NULL, s.account_id, s.usage_event_id, 'reversed more than charged'
FROM (SELECT r.account_id, r.usage_event_id, r.event_created_at, sum(r.quantity) AS quantity,
             sum(r.credits_micros) AS credits, sum(r.allowance_units) AS allowance_units
      FROM metering.reversals r GROUP BY 1, 2, 3) s
LEFT JOIN metering.usage_events e ON e.id = s.usage_event_id AND e.created_at = s.event_created_at
WHERE e.id IS NULL OR s.quantity > e.quantity OR s.credits > e.credits_micros OR s.allowance_units > e.allowance_units;
COMMENT ON VIEW reporting.reversal_mismatches IS
  'Reconciliation: reversals whose ledger transfer is missing or differs from them, reversal transfers with no reversal, and usage events reversed for more units, credits or allowance than they charged (or missing). Must be empty.';

CREATE OR REPLACE VIEW reporting.post_paid_credits_owed AS
SELECT r.account_id, r.usage_event_id, r.id AS reversal_id, r.amount_minor, r.currency, r.reason, r.created_at
FROM metering.reversals r WHERE r.amount_minor > 0;
COMMENT ON VIEW reporting.post_paid_credits_owed IS
  'Post-paid usage reversed after it was reported to Stripe: what each reversal owes the customer (minor units). Stripe meter event adjustments are not sent yet: credit it on the next invoice (or refund).';

GRANT SELECT ON reporting.reversal_mismatches, reporting.post_paid_credits_owed TO pgtally_analyst;
