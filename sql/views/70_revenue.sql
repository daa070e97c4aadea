-- reporting views. Revenue analytics: Stripe money against the ledger, MRR and its movements, churn, revenue, ARPU,
-- conversion, activity and retention.
-- Re-applied after the migrations and the functions (sql/migrations/post-apply.py).

-- Recorded subscription money includes invoices refunded since (Stripe reported them paid).
CREATE OR REPLACE VIEW reporting.revenue_reconciliation_daily AS
WITH stripe_payments AS (
  SELECT DISTINCT ON (key) e.created, e.type, e.payload -> 'data' -> 'object' AS o
  FROM (SELECT *, CASE type WHEN 'invoice.paid' THEN 'in:' || (payload #>> '{data,object,id}')
                            WHEN 'payment_intent.succeeded' THEN 'pi:' || (payload #>> '{data,object,id}')
                            ELSE 'pi:' || coalesce(payload #>> '{data,object,payment_intent}', payload #>> '{data,object,id}') END AS key
        FROM billing.stripe_events WHERE status = 'applied') e
  WHERE e.type = 'payment_intent.succeeded'
     OR (e.type IN ('checkout.session.completed', 'checkout.session.async_payment_succeeded')
         AND e.payload #>> '{data,object,mode}' = 'payment' AND e.payload #>> '{data,object,payment_status}' = 'paid')
     OR (e.type = 'invoice.paid' AND EXISTS (SELECT 1 FROM billing.invoices i WHERE i.stripe_invoice_id = e.payload #>> '{data,object,id}'))
  ORDER BY key, e.created, e.id),
stripe AS (
  SELECT (date_trunc('day', created AT TIME ZONE 'UTC'))::date AS day,
         CASE WHEN type = 'invoice.paid' THEN 'subscription' ELSE 'bundle' END AS kind,
         lower(coalesce(o ->> 'currency', 'usd')) AS currency,
         sum(CASE type WHEN 'invoice.paid' THEN (o ->> 'amount_paid')::bigint
                       WHEN 'payment_intent.succeeded' THEN (o ->> 'amount_received')::bigint
                       ELSE (o ->> 'amount_total')::bigint END) AS stripe_minor
  FROM stripe_payments GROUP BY 1, 2, 3),
recorded AS (
  SELECT (date_trunc('day', p.paid_at AT TIME ZONE 'UTC'))::date AS day, 'bundle' AS kind, p.currency,
         sum(p.amount_minor) AS recorded_minor, sum(p.refunded_minor) AS refunded_minor,
         sum(p.credits_micros) AS expected_credits_micros,
         sum((SELECT coalesce(sum(t.amount_micros), 0) FROM ledger.transfers t
              WHERE t.account_id = p.account_id AND t.kind = 'purchase'
                AND t.idempotency_key IN ('checkout:' || p.stripe_checkout_session, 'payment_intent:' || p.stripe_payment_intent_id))
            ) AS ledger_credits_micros
  FROM billing.payments p GROUP BY 1, 2, 3
  UNION ALL
  SELECT (date_trunc('day', i.paid_at AT TIME ZONE 'UTC'))::date, 'subscription', i.currency,
         sum(i.amount_paid_minor), sum(i.refunded_minor),
         sum(coalesce(pl.included_credits_micros, 0)),
         sum((SELECT coalesce(sum(t.amount_micros), 0) FROM ledger.transfers t
              WHERE t.account_id = i.account_id AND t.idempotency_key = 'invoice:' || i.stripe_invoice_id))
  FROM billing.invoices i LEFT JOIN billing.plans pl ON pl.id = i.plan_id
  WHERE i.status IN ('paid', 'refunded') GROUP BY 1, 2, 3)
SELECT coalesce(r.day, s.day) AS day, coalesce(r.kind, s.kind) AS kind, coalesce(r.currency, s.currency) AS currency,
       coalesce(s.stripe_minor, 0) AS stripe_minor, coalesce(r.recorded_minor, 0) AS recorded_minor,
       coalesce(r.refunded_minor, 0) AS refunded_minor,
       coalesce(r.expected_credits_micros, 0) AS expected_credits_micros,
       coalesce(r.ledger_credits_micros, 0) AS ledger_credits_micros,
       round(100.0 * greatest(abs(coalesce(s.stripe_minor, 0) - coalesce(r.recorded_minor, 0))
                                / greatest(coalesce(s.stripe_minor, 0), coalesce(r.recorded_minor, 0), 1),
                              abs(coalesce(r.expected_credits_micros, 0) - coalesce(r.ledger_credits_micros, 0))
                                / greatest(coalesce(r.expected_credits_micros, 0), 1)), 2) AS drift_percent
FROM recorded r FULL JOIN stripe s ON s.day = r.day AND s.kind = r.kind AND s.currency = r.currency;
COMMENT ON VIEW reporting.revenue_reconciliation_daily IS
  'Per UTC day, kind of payment (subscription invoices, bundles and top-ups) and currency: what Stripe''s applied events reported paid (minor units), what pgtally recorded (billing.invoices, billing.payments) and refunded, the credits those payments should have granted and what the ledger granted for them; drift_percent is the larger of the two relative differences and must be 0.00 on a consistent database.';

CREATE OR REPLACE VIEW reporting.revenue_drift AS
SELECT * FROM reporting.revenue_reconciliation_daily WHERE drift_percent <> 0;
COMMENT ON VIEW reporting.revenue_drift IS
  'Reconciliation: the days, kinds and currencies where Stripe, pgtally''s records and the ledger disagree (reporting.revenue_reconciliation_daily with a drift). Must be empty.';

-- Analytics (documented in README.md, "For DBAs"; pgtally report NAME prints any of them)
CREATE OR REPLACE VIEW reporting.mrr_account_months AS
WITH months AS (
  SELECT generate_series(date_trunc('month', min(at), 'UTC'), date_trunc('month', util.now(), 'UTC'), interval '1 month') AS month
  FROM billing.mrr_changes),
accounts AS (SELECT DISTINCT account_id FROM billing.mrr_changes)
SELECT (m.month AT TIME ZONE 'UTC')::date AS month, a.account_id,
       coalesce(e.currency, s.currency) AS currency, s.plan_id AS plan_at_start, e.plan_id AS plan_at_end,
       coalesce(s.mrr_minor, 0) AS mrr_start_minor, coalesce(e.mrr_minor, 0) AS mrr_end_minor,
       EXISTS (SELECT 1 FROM billing.mrr_changes c WHERE c.account_id = a.account_id AND c.at < m.month AND c.mrr_minor > 0) AS paid_before
FROM months m CROSS JOIN accounts a
LEFT JOIN LATERAL (SELECT c.currency, c.mrr_minor, c.plan_id FROM billing.mrr_changes c
                   WHERE c.account_id = a.account_id AND c.at < m.month ORDER BY c.at DESC, c.id DESC LIMIT 1) s ON true
LEFT JOIN LATERAL (SELECT c.currency, c.mrr_minor, c.plan_id FROM billing.mrr_changes c
                   WHERE c.account_id = a.account_id AND c.at < m.month + interval '1 month'
                   ORDER BY c.at DESC, c.id DESC LIMIT 1) e ON true
WHERE s.mrr_minor > 0 OR e.mrr_minor > 0;
COMMENT ON VIEW reporting.mrr_account_months IS
  'Each subscribing account''s MRR at the start and the end of each UTC month (from billing.mrr_changes; minor units, yearly prices / 12), its plan then, and whether it had paid before the month: what the MRR, movement and churn views add up.';

CREATE OR REPLACE VIEW reporting.mrr_monthly AS
SELECT month, currency, round(sum(mrr_end_minor), 2) AS mrr_minor, round(12 * sum(mrr_end_minor), 2) AS arr_minor,
       count(*) FILTER (WHERE mrr_end_minor > 0) AS subscribers
FROM reporting.mrr_account_months GROUP BY month, currency;
COMMENT ON VIEW reporting.mrr_monthly IS
  'MRR and ARR (= 12 x MRR) at the end of each UTC month (the current one: now), per currency, in minor units; yearly prices count as a twelfth a month. subscribers: accounts paying then.';

CREATE OR REPLACE VIEW reporting.mrr_movements_monthly AS
SELECT month, currency,
       coalesce(sum(mrr_end_minor) FILTER (WHERE mrr_start_minor = 0 AND NOT paid_before), 0) AS new_minor,
       coalesce(sum(mrr_end_minor - mrr_start_minor) FILTER (WHERE mrr_start_minor > 0 AND mrr_end_minor > mrr_start_minor), 0) AS expansion_minor,
       coalesce(sum(mrr_start_minor - mrr_end_minor) FILTER (WHERE mrr_end_minor > 0 AND mrr_end_minor < mrr_start_minor), 0) AS contraction_minor,
       coalesce(sum(mrr_start_minor) FILTER (WHERE mrr_end_minor = 0), 0) AS churned_minor,
       coalesce(sum(mrr_end_minor) FILTER (WHERE mrr_start_minor = 0 AND paid_before), 0) AS reactivated_minor,
       sum(mrr_end_minor) - sum(mrr_start_minor) AS net_minor
FROM reporting.mrr_account_months GROUP BY month, currency;
COMMENT ON VIEW reporting.mrr_movements_monthly IS
  'MRR movements per UTC month and currency (minor units), account by account from the month''s start to its end: new (first paid month), expansion, contraction, churned (to zero), reactivated (paying again after a gap); net = the month''s MRR change.';

CREATE OR REPLACE VIEW reporting.churn_by_plan_monthly AS
SELECT month, plan_at_start AS plan_id, currency,
       count(*) AS subscribers_at_start,
       count(*) FILTER (WHERE mrr_end_minor = 0) AS churned,
       round(100.0 * count(*) FILTER (WHERE mrr_end_minor = 0) / count(*), 2) AS subscriber_churn_percent,
       sum(mrr_start_minor) AS mrr_start_minor,
       sum(mrr_start_minor - least(mrr_end_minor, mrr_start_minor)) AS mrr_lost_minor,
       round(100.0 * sum(mrr_start_minor - least(mrr_end_minor, mrr_start_minor)) / sum(mrr_start_minor), 2) AS revenue_churn_percent
FROM reporting.mrr_account_months WHERE mrr_start_minor > 0
GROUP BY month, plan_at_start, currency;
COMMENT ON VIEW reporting.churn_by_plan_monthly IS
  'Churn per UTC month and the plan subscribers had at its start: subscribers then, how many stopped paying by its end (subscriber churn %), and the MRR lost to churn and contraction over the MRR at the start (gross revenue churn %).';

CREATE OR REPLACE VIEW reporting.revenue_monthly AS
SELECT (date_trunc('month', paid_at, 'UTC') AT TIME ZONE 'UTC')::date AS month, currency,
       sum(amount_minor - refunded_minor) AS revenue_minor, count(DISTINCT account_id) AS paying_accounts
FROM (SELECT account_id, paid_at, currency, amount_paid_minor AS amount_minor, refunded_minor FROM billing.invoices WHERE status = 'paid'
      UNION ALL
      SELECT account_id, paid_at, currency, amount_minor, refunded_minor FROM billing.payments) r
GROUP BY 1, 2;
COMMENT ON VIEW reporting.revenue_monthly IS 'Money in per UTC month and currency, net of refunds (subscription invoices, bundles and top-ups; minor units), and how many accounts paid.';

CREATE OR REPLACE VIEW reporting.arpu_monthly AS
SELECT r.month, r.currency, r.revenue_minor, r.paying_accounts,
       round(r.revenue_minor::numeric / nullif(r.paying_accounts, 0), 2) AS arpu_minor,
       c.churn_percent,
       round(r.revenue_minor::numeric / nullif(r.paying_accounts, 0) / nullif(c.churn_percent / 100, 0), 2) AS clv_minor
FROM reporting.revenue_monthly r
LEFT JOIN (SELECT month, currency, round(100.0 * sum(churned) / sum(subscribers_at_start), 2) AS churn_percent
           FROM reporting.churn_by_plan_monthly GROUP BY month, currency) c ON c.month = r.month AND c.currency = r.currency;
COMMENT ON VIEW reporting.arpu_monthly IS
  'ARPU (revenue / paying accounts, minor units) per UTC month and currency, the month''s subscriber churn (all plans, %), and a simple CLV = ARPU / monthly churn (null when nobody churned).';

CREATE OR REPLACE VIEW reporting.conversion_by_cohort AS
WITH firsts AS (
  SELECT u.account_id, (date_trunc('month', u.created_at, 'UTC') AT TIME ZONE 'UTC')::date AS cohort, u.created_at,
         least((SELECT min(c.at) FROM billing.mrr_changes c WHERE c.account_id = u.account_id AND c.mrr_minor > 0),
               (SELECT min(p.paid_at) FROM billing.payments p WHERE p.account_id = u.account_id)) AS first_paid_at
  FROM identity.users u)
SELECT cohort, count(*) AS signed_up, count(first_paid_at) AS converted,
       count(*) FILTER (WHERE first_paid_at < created_at + interval '30 days') AS converted_in_30_days,
       round(100.0 * count(first_paid_at) / count(*), 2) AS conversion_percent
FROM firsts GROUP BY cohort;
COMMENT ON VIEW reporting.conversion_by_cohort IS
  'Free-to-paid conversion by sign-up cohort (UTC month a person signed up): how many signed up, how many have paid since (a subscription or a bundle), how many within 30 days, and the %.';

CREATE OR REPLACE VIEW reporting.active_accounts_daily AS
SELECT day, dau, wau, mau FROM metering.active_accounts_daily;
COMMENT ON VIEW reporting.active_accounts_daily IS
  'DAU, WAU and MAU: accounts with usage on the UTC day, and in the 7 and 30 days ending on it (from the usage rollup: events of the last minute are not in yet).';

CREATE OR REPLACE VIEW reporting.retention_weekly AS
WITH weeks AS (SELECT DISTINCT account_id, date_trunc('week', day)::date AS week FROM metering.usage_rollup_daily),
cohorts AS (SELECT account_id, min(week) AS cohort FROM weeks GROUP BY account_id)
SELECT c.cohort, (w.week - c.cohort) / 7 AS weeks_since, count(*) AS active_accounts,
       round(100.0 * count(*) / max(s.size), 2) AS retention_percent
FROM weeks w JOIN cohorts c USING (account_id)
JOIN (SELECT cohort, count(*) AS size FROM cohorts GROUP BY cohort) s ON s.cohort = c.cohort
GROUP BY c.cohort, w.week;
COMMENT ON VIEW reporting.retention_weekly IS
  'Weekly retention cohorts: accounts by the ISO week of their first usage, and how many of them had usage n weeks later (weeks_since 0 is the cohort itself, 100%).';

GRANT SELECT ON reporting.revenue_reconciliation_daily, reporting.revenue_drift, reporting.mrr_account_months, reporting.mrr_monthly, reporting.mrr_movements_monthly, reporting.churn_by_plan_monthly, reporting.revenue_monthly, reporting.arpu_monthly, reporting.conversion_by_cohort, reporting.active_accounts_daily, reporting.retention_weekly TO pgtally_analyst;
