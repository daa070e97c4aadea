-- reporting views. Referrals: rewards against the lots they granted (must be empty), the funnel per day.
-- Re-applied after the migrations and the functions (sql/migrations/post-apply.py).

CREATE OR REPLACE VIEW reporting.referral_reward_mismatches AS
SELECT r.referee_account_id, r.status, l.id AS lot_id, l.status AS lot_status, count(t.id) AS transfers
FROM billing.referrals r
JOIN ledger.credit_lots l ON l.id IN (r.referrer_lot_id, r.referee_lot_id)
LEFT JOIN ledger.transfers t ON t.account_id = l.account_id AND t.idempotency_key = l.grant_key
GROUP BY r.referee_account_id, r.status, l.id, l.status
HAVING count(t.id) <> CASE WHEN l.status IN ('active', 'expired') THEN 1 ELSE 0 END
UNION ALL
SELECT r.referee_account_id, r.status, NULL, NULL, 0
FROM billing.referrals r WHERE r.status = 'rewarded' AND r.referrer_lot_id IS NULL
  AND (SELECT referrer_reward_micros FROM billing.referral_program) > 0;
COMMENT ON VIEW reporting.referral_reward_mismatches IS
  'Reconciliation: referral rewards without exactly one ledger transfer once spendable (none while pending or canceled), and rewarded referrals without a reward lot. Must be empty.';

CREATE OR REPLACE VIEW reporting.referral_funnel_daily AS
SELECT (date_trunc('day', created_at AT TIME ZONE 'UTC'))::date AS day,
       count(*) AS signed_up,
       count(qualified_at) AS qualified,
       count(*) FILTER (WHERE status = 'rewarded') AS rewarded,
       count(*) FILTER (WHERE rejected_reason = 'self_referral') AS rejected_self_referral,
       count(*) FILTER (WHERE rejected_reason = 'own_device') AS rejected_own_device,
       count(*) FILTER (WHERE rejected_reason = 'same_ip') AS rejected_same_ip,
       count(*) FILTER (WHERE rejected_reason = 'same_fingerprint') AS rejected_same_fingerprint,
       count(*) FILTER (WHERE rejected_reason = 'monthly_cap') AS rejected_monthly_cap,
       count(*) FILTER (WHERE rejected_reason = 'refunded') AS rejected_refunded
FROM billing.referrals GROUP BY 1;
COMMENT ON VIEW reporting.referral_funnel_daily IS
  'Referrals by the UTC day the referee signed up: signed up, qualified, rewarded, and rejected by reason.';

GRANT SELECT ON reporting.referral_reward_mismatches, reporting.referral_funnel_daily TO pgtally_analyst;
