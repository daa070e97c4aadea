-- reporting views. Usage: per day, per hour of day, per meter and plan.
-- Re-applied after the migrations and the functions (sql/migrations/post-apply.py).

CREATE OR REPLACE VIEW reporting.usage_daily AS
SELECT (date_trunc('day', created_at AT TIME ZONE 'UTC'))::date AS day, meter_id,
       count(*) AS events, sum(quantity) AS quantity,
       sum(allowance_units) AS allowance_units, sum(credits_micros) AS credits_micros
FROM metering.usage_events GROUP BY 1, 2;
COMMENT ON VIEW reporting.usage_daily IS 'Usage per UTC day and meter: events, units, allowance units and micro-credits spent.';

CREATE OR REPLACE VIEW reporting.usage_per_meter_plan_monthly AS
SELECT month, meter_id, plan_id, count(*) AS accounts, sum(quantity) AS quantity,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY quantity) AS p50_per_account,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY quantity) AS p95_per_account
FROM metering.usage_rollup_monthly
GROUP BY month, meter_id, plan_id;
COMMENT ON VIEW reporting.usage_per_meter_plan_monthly IS
  'Usage per UTC month, meter and plan: accounts, units, and the median and 95th percentile of units per account.';

CREATE OR REPLACE VIEW reporting.usage_by_hour AS
SELECT extract(hour FROM hour AT TIME ZONE 'UTC')::integer AS hour_of_day, meter_id,
       sum(events) AS events, sum(quantity) AS quantity,
       round(100.0 * sum(events) / sum(sum(events)) OVER (PARTITION BY meter_id), 2) AS percent_of_events
FROM metering.usage_rollup_hourly GROUP BY 1, 2;
COMMENT ON VIEW reporting.usage_by_hour IS 'Usage by UTC hour of day and meter, over all time: events, units and the share of the meter''s events.';

GRANT SELECT ON reporting.usage_daily, reporting.usage_per_meter_plan_monthly, reporting.usage_by_hour TO pgtally_analyst;

CREATE OR REPLACE VIEW reporting.usage_by_principal_daily AS
SELECT e.account_id, (date_trunc('day', e.created_at AT TIME ZONE 'UTC'))::date AS day, e.api_key_id, e.user_id,
       e.meter_id, count(*) AS events, sum(e.quantity::bigint) AS quantity,
       sum(e.allowance_units::bigint) AS allowance_units, sum(e.credits_micros::bigint) AS credits_micros
FROM metering.usage_events e
GROUP BY 1, 2, 3, 4, 5;
COMMENT ON VIEW reporting.usage_by_principal_daily IS
  'Usage per account, UTC day, API key, member and meter: events, units, allowance units and micro-credits spent (events charged before migration 0032 have no key or member).';
GRANT SELECT ON reporting.usage_by_principal_daily TO pgtally_analyst;
