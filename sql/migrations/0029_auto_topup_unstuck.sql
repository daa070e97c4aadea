-- pgtally 0029: auto top-up never wedges (issue #23, defect 9). The top-up in flight is one outbox
-- task (task_id): a task of an earlier, cleared attempt pays nothing; the PaymentIntent the
-- worker created is remembered; top-ups in flight with no answer from Stripe are listed.
-- depends: 0028_stripe_as_it_is

ALTER TABLE billing.auto_topups
  ADD COLUMN task_id uuid,
  ADD COLUMN stripe_payment_intent_id text CHECK (length(stripe_payment_intent_id) <= 255);
COMMENT ON COLUMN billing.auto_topups.task_id IS
  'The outbox task (outbox.messages.id, kind auto_topup) of the top-up in flight: only that task may pay, and Stripe''s idempotency key is auto-topup-<task_id>. NULL when none is in flight.';
COMMENT ON COLUMN billing.auto_topups.stripe_payment_intent_id IS
  'The PaymentIntent the worker created for the top-up in flight (or the last one), as Stripe answered it.';

DROP FUNCTION IF EXISTS api.auto_topup_payment(uuid);

CREATE VIEW reporting.stuck_auto_topups AS
SELECT t.account_id, t.in_flight_since, t.task_id, t.stripe_payment_intent_id, t.failures, t.last_error,
       CASE WHEN m.id IS NULL THEN 'missing' WHEN m.delivered_at IS NOT NULL THEN 'delivered'
            WHEN m.failed_at IS NOT NULL THEN 'failed' ELSE 'queued' END AS task_state,
       m.attempts AS task_attempts, m.last_error AS task_error
FROM billing.auto_topups t LEFT JOIN outbox.messages m ON m.id = t.task_id
WHERE t.in_flight_since < util.now() - interval '30 minutes';
COMMENT ON VIEW reporting.stuck_auto_topups IS
  'Reconciliation: auto top-ups in flight for more than 30 minutes (no payment_intent.succeeded and no failure recorded): the task''s state (queued: the worker could not act yet, see task_error; delivered: Stripe was asked and its event never arrived; failed or missing). The worker''s housekeeping (api.release_stuck_auto_topups) releases the delivered, failed and missing ones; a queued one waits for a worker that can pay it. Must be empty.';
GRANT SELECT ON reporting.stuck_auto_topups TO pgtally_analyst;
