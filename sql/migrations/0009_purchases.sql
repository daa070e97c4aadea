-- pgtally 0009: purchases from the pages: checkout for the account a signed upgrade link names,
-- checkout status for the success page, one-click top-ups paid by PaymentIntent.
-- depends: 0008_usage_metadata

DROP FUNCTION IF EXISTS api.checkout_prepare(text, uuid, text);
DROP FUNCTION IF EXISTS api.link_stripe_customer(text, uuid, text);

CREATE INDEX stripe_events_checkout_session_idx ON billing.stripe_events ((payload #>> '{data,object,id}'))
  WHERE type LIKE 'checkout.session.%';
CREATE INDEX payments_account_id_idx ON billing.payments (account_id);
COMMENT ON COLUMN billing.payments.stripe_checkout_session IS
  'The Checkout Session that sold it; NULL for a one-click top-up (an off-session PaymentIntent with a saved card).';
