-- pgtally 0010: holds (reserve before the work, then capture the actual amount or release).
-- depends: 0009_purchases

ALTER TABLE identity.accounts ADD COLUMN held_micros bigint NOT NULL DEFAULT 0
  CONSTRAINT held_within_balance CHECK (held_micros >= 0 AND held_micros <= credit_balance_micros);
COMMENT ON COLUMN identity.accounts.held_micros IS
  'Micro-credits reserved by open holds: part of the balance that no charge or other hold may spend (spendable = credit_balance_micros - held_micros).';

CREATE TABLE metering.holds (
  id              uuid PRIMARY KEY DEFAULT util.uuid_v7(),
  account_id      uuid NOT NULL REFERENCES identity.accounts,
  idempotency_key text NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 255),
  request_hash    bytea NOT NULL,
  meter_id        text NOT NULL REFERENCES metering.meters,
  quantity        bigint NOT NULL CHECK (quantity > 0),
  input_tokens    bigint CHECK (input_tokens >= 0),
  output_tokens   bigint CHECK (output_tokens >= 0),
  allowance_units bigint NOT NULL CHECK (allowance_units >= 0),
  credits_micros  bigint NOT NULL CHECK (credits_micros >= 0),
  period_start    timestamptz,
  status          text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'captured', 'released', 'expired')),
  created_at      timestamptz NOT NULL,
  expires_at      timestamptz NOT NULL,
  settled_at      timestamptz,
  CHECK ((status = 'open') = (settled_at IS NULL)),
  CONSTRAINT holds_idempotency_key UNIQUE (account_id, idempotency_key)
);
CREATE INDEX holds_open_idx ON metering.holds (account_id, expires_at) WHERE status = 'open';
CREATE INDEX holds_open_expiry_idx ON metering.holds (expires_at) WHERE status = 'open';
COMMENT ON TABLE metering.holds IS
  'Reservations for pay-per-use work: the allowance units and micro-credits a request would cost, reserved in the account-row transaction that charges, so no other charge or hold can spend them. Captured (one usage event with the actual amount, key hold:<id>), released, or expired (released by itself), exactly once.';
COMMENT ON COLUMN metering.holds.period_start IS 'The allowance window the reserved units were counted in.';

CREATE VIEW reporting.hold_mismatches AS
SELECT a.id AS account_id, a.held_micros, coalesce(h.open_micros, 0) AS open_holds_micros
FROM identity.accounts a
LEFT JOIN (SELECT account_id, sum(credits_micros)::bigint AS open_micros FROM metering.holds
           WHERE status = 'open' GROUP BY account_id) h ON h.account_id = a.id
WHERE a.held_micros <> coalesce(h.open_micros, 0);
COMMENT ON VIEW reporting.hold_mismatches IS
  'Reconciliation: accounts whose held_micros differ from the credits of their open holds. Must be empty.';
GRANT SELECT ON reporting.hold_mismatches TO pgtally_analyst;
