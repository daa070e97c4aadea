-- pgtally 0029f: top-ups get invoices too, and disputes that found no account are listed
-- (issue #23). A top-up paid off-session by a PaymentIntent is documented by an invoice the
-- worker creates at Stripe and attaches the payment to (task invoice_topup).
-- depends: 0029e_tax_and_invoices

ALTER TABLE outbox.messages DROP CONSTRAINT messages_kind_check;
ALTER TABLE outbox.messages ADD CONSTRAINT messages_kind_check
  CHECK (kind IN ('verify_email', 'account_exists', 'password_reset', 'usage_warning', 'auto_topup',
                  'auto_topup_disabled', 'meter_event', 'alert', 'payment_failed', 'receipt', 'subscription_ending',
                  'subscription_canceled', 'invitation', 'sso_link', 'cancel_duplicate_subscription',
                  'subscription_duplicate', 'invoice_topup'));
COMMENT ON COLUMN outbox.messages.kind IS
  'An email (verify_email, account_exists, password_reset, usage_warning, auto_topup_disabled, payment_failed, receipt, subscription_ending, subscription_canceled, subscription_duplicate, invitation, sso_link; alert: to the operators) or a task for the worker (auto_topup: pay a bundle with the saved card; meter_event: report a post-paid usage event to Stripe, the message id being the usage event''s id; cancel_duplicate_subscription: cancel and refund a second subscription; invoice_topup: the invoice of a top-up paid by a PaymentIntent).';
