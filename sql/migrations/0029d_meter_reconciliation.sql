-- pgtally 0029d: meter events Stripe rejected after accepting them (issue #23, defect 11). Stripe
-- validates meter events asynchronously and reports rejections with the thin event
-- v1.billing.meter.error_report_triggered: recorded here. Once a day the worker reads Stripe's
-- meter event summaries for each account, meter and day pgtally reported, and a reconciliation
-- view lists any difference.
-- depends: 0029c_one_subscription

CREATE TABLE billing.meter_error_reports (
  stripe_event_id  text PRIMARY KEY CHECK (length(stripe_event_id) <= 255),
  stripe_meter_id  text CHECK (length(stripe_meter_id) <= 255),
  error_count      integer NOT NULL CHECK (error_count >= 0),
  summary          text CHECK (length(summary) <= 2000),
  error_types      jsonb NOT NULL DEFAULT '[]',
  identifiers      text[] NOT NULL DEFAULT '{}',
  validation_start timestamptz,
  validation_end   timestamptz,
  received_at      timestamptz NOT NULL
);
COMMENT ON TABLE billing.meter_error_reports IS
  'Stripe''s v1.billing.meter.error_report_triggered events: meter events it accepted and then rejected in a validation window (an unknown customer, a timestamp too old, a bad value...). Source: https://docs.stripe.com/billing/subscriptions/usage-based/recording-usage#handle-meter-event-errors.';
COMMENT ON COLUMN billing.meter_error_reports.error_count IS 'How many meter events Stripe rejected in the window (reason.error_count).';
COMMENT ON COLUMN billing.meter_error_reports.error_types IS 'reason.error_types as Stripe sent them: [{code, error_count, sample_errors: [{error_message, request: {identifier}}]}].';
COMMENT ON COLUMN billing.meter_error_reports.identifiers IS 'The identifiers of the sample rejected meter events (pgtally sends the usage event id): a sample, not every one.';

CREATE TABLE billing.meter_event_summaries (
  account_id   uuid NOT NULL REFERENCES identity.accounts,
  event_name   text NOT NULL CHECK (length(event_name) <= 100),
  day          date NOT NULL,
  stripe_units numeric NOT NULL,
  checked_at   timestamptz NOT NULL,
  PRIMARY KEY (account_id, event_name, day)
);
COMMENT ON TABLE billing.meter_event_summaries IS
  'What Stripe counted of an account''s meter events per meter and UTC day (GET /v1/billing/meters/:id/event_summaries, aggregated_value), read once by the worker after the day ended, for the days pgtally reported usage.';
COMMENT ON COLUMN billing.meter_event_summaries.stripe_units IS 'Stripe''s aggregated_value for the day: units (the meter sums the values pgtally sent).';
