-- pgtally 0029b: fields Stripe moved or pgtally never read (issue #23, defect 10): a cancellation
-- scheduled by date (cancel_at, from the dashboard or the customer portal); an invoice whose
-- lines do not all fit in its event (lines.has_more) is applied with all of them (the new
-- p_lines argument of api.stripe_webhook).
-- depends: 0029_auto_topup_unstuck

ALTER TABLE billing.subscriptions ADD COLUMN cancel_at timestamptz;
COMMENT ON COLUMN billing.subscriptions.cancel_at IS
  'Stripe''s cancel_at: when the subscription is scheduled to end (set by cancel at period end, or a date chosen in the dashboard or the customer portal); NULL when it renews.';

DROP FUNCTION IF EXISTS api.stripe_webhook(jsonb, jsonb);
