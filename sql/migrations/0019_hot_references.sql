-- pgtally 0019: the allowance windows and the credit lots lose their foreign keys, proved instead by
-- reporting.ledger_reference_breaks like the other hot tables (0017). Issue #14.
-- depends: 0018_archived_entries
--
-- A row a transaction updates a second time was written by that transaction, and PostgreSQL
-- then checks its foreign keys again (a query per key) even though they did not change: a batch
-- of usage events updates its account's window (and, on the credit path, its lot) once per event,
-- so every event after the first paid two foreign-key queries. The windows and lots are written
-- by metering.charge, ledger.post_transfer and ledger.grant_lot from rows they just locked or
-- wrote; no account or meter is ever deleted (the windows' ON DELETE CASCADE never fired).

ALTER TABLE metering.allowance_usage DROP CONSTRAINT allowance_usage_account_id_fkey,
  DROP CONSTRAINT allowance_usage_meter_id_fkey;
ALTER TABLE ledger.credit_lots DROP CONSTRAINT credit_lots_account_id_fkey,
  DROP CONSTRAINT credit_lots_transfer_id_fkey;

CREATE OR REPLACE VIEW reporting.ledger_reference_breaks AS
SELECT 'entry' AS row_kind, e.id::text AS row_id, 'transfer' AS missing, e.transfer_id::text AS reference
FROM ledger.entries e WHERE NOT EXISTS (SELECT 1 FROM ledger.transfers t WHERE t.id = e.transfer_id)
UNION ALL
SELECT 'entry', e.id::text, 'account', e.account_id::text
FROM ledger.entries e WHERE e.account_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM identity.accounts a WHERE a.id = e.account_id)
UNION ALL
SELECT 'entry', e.id::text, 'system_account', e.system_account
FROM ledger.entries e WHERE e.system_account IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM ledger.system_accounts s WHERE s.code = e.system_account)
UNION ALL
SELECT 'transfer', t.id::text, 'account', t.account_id::text
FROM ledger.transfers t WHERE NOT EXISTS (SELECT 1 FROM identity.accounts a WHERE a.id = t.account_id)
UNION ALL
SELECT 'usage_event', u.id::text, 'account', u.account_id::text
FROM metering.usage_events u WHERE NOT EXISTS (SELECT 1 FROM identity.accounts a WHERE a.id = u.account_id)
UNION ALL
SELECT 'usage_event', u.id::text, 'meter', u.meter_id
FROM metering.usage_events u WHERE NOT EXISTS (SELECT 1 FROM metering.meters m WHERE m.id = u.meter_id)
UNION ALL
SELECT 'allowance_window', w.account_id || ' ' || w.meter_id || ' ' || (w.period_start AT TIME ZONE 'UTC')::text, 'account', w.account_id::text
FROM metering.allowance_usage w WHERE NOT EXISTS (SELECT 1 FROM identity.accounts a WHERE a.id = w.account_id)
UNION ALL
SELECT 'allowance_window', w.account_id || ' ' || w.meter_id || ' ' || (w.period_start AT TIME ZONE 'UTC')::text, 'meter', w.meter_id
FROM metering.allowance_usage w WHERE NOT EXISTS (SELECT 1 FROM metering.meters m WHERE m.id = w.meter_id)
UNION ALL
SELECT 'credit_lot', l.id::text, 'account', l.account_id::text
FROM ledger.credit_lots l WHERE NOT EXISTS (SELECT 1 FROM identity.accounts a WHERE a.id = l.account_id)
UNION ALL
SELECT 'credit_lot', l.id::text, 'transfer', l.transfer_id::text
FROM ledger.credit_lots l WHERE l.transfer_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM ledger.transfers t WHERE t.id = l.transfer_id);
COMMENT ON VIEW reporting.ledger_reference_breaks IS
  'Reconciliation: ledger entries, transfers, usage events, allowance windows and credit lots that name a transfer, account, system account or meter that does not exist. These references are not foreign keys (a foreign-key check per row was the largest share of a charge''s cost, and a batch paid one per event again on the rows it updates more than once; ledger.post_transfer, ledger.grant_lot and metering.charge write them from rows they just locked, read or wrote); this view proves them. Must be empty.';

-- metering.quote gains p_window_start and p_window_used (re-created by the functions step).
DROP FUNCTION IF EXISTS metering.quote(identity.accounts, text, bigint, bigint, bigint);
-- metering.period_bounds becomes a one-row table function, which PostgreSQL inlines.
DROP FUNCTION IF EXISTS metering.period_bounds(text, timestamptz, timestamptz, timestamptz);
