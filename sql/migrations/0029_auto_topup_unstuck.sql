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
