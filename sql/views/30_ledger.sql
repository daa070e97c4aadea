-- reporting views. Ledger reconciliation: each view must always be empty (the cached balances, transfers and
-- entries agree), and the system accounts' balances.
-- Re-applied after the migrations and the functions (sql/migrations/post-apply.py).

-- Balances count the months that left through ledger.archived_balances.
CREATE OR REPLACE VIEW reporting.balance_mismatches AS
SELECT a.id AS account_id,
       a.credit_balance_micros AS cached_micros,
       coalesce(e.total, 0) AS ledger_micros,
       a.credit_balance_micros - coalesce(e.total, 0) AS difference_micros
FROM identity.accounts a
LEFT JOIN (SELECT account_id, sum(amount)::bigint AS total
           FROM (SELECT account_id, amount_micros AS amount FROM ledger.entries WHERE account_id IS NOT NULL
                 UNION ALL
                 SELECT account_id, amount_micros FROM ledger.archived_balances WHERE account_id IS NOT NULL) x
           GROUP BY account_id) e ON e.account_id = a.id
WHERE a.credit_balance_micros <> coalesce(e.total, 0);
COMMENT ON VIEW reporting.balance_mismatches IS
  'Reconciliation: accounts whose cached credit balance differs from the sum of their ledger entries (with the sums of detached months, ledger.archived_balances). Must be empty.';

CREATE OR REPLACE VIEW reporting.unbalanced_transfers AS
SELECT transfer_id, sum(amount_micros) AS sum_micros, count(*) AS entries
FROM ledger.entries GROUP BY transfer_id
HAVING sum(amount_micros) <> 0 OR count(*) <> 2;
COMMENT ON VIEW reporting.unbalanced_transfers IS
  'Reconciliation: transfers whose entries do not sum to zero or are not exactly two. Must be empty.';

CREATE OR REPLACE VIEW reporting.entry_balance_breaks AS
SELECT id AS entry_id, account_id, balance_after_micros, running_micros
FROM (SELECT x.id, x.account_id, x.balance_after_micros, x.attached,
             coalesce(s.archived, 0) + sum(x.amount_micros) OVER (PARTITION BY x.account_id ORDER BY x.id) AS running_micros
      FROM (SELECT e.id, e.account_id, e.amount_micros::numeric AS amount_micros, e.balance_after_micros, true AS attached
            FROM ledger.entries e WHERE e.account_id IS NOT NULL
            UNION ALL
            SELECT b.entry_id, b.account_id, b.amount_micros, NULL, false
            FROM ledger.archived_balances b WHERE b.entry_id IS NOT NULL AND b.account_id IS NOT NULL) x
      LEFT JOIN (SELECT account_id, sum(amount_micros) AS archived FROM ledger.archived_balances
                 WHERE entry_id IS NULL AND account_id IS NOT NULL GROUP BY account_id) s ON s.account_id = x.account_id) r
WHERE attached AND balance_after_micros <> running_micros;
COMMENT ON VIEW reporting.entry_balance_breaks IS
  'Reconciliation: customer entries whose recorded balance_after differs from the running sum of the account''s entries in id order (starting from what its detached months summed to, with the detached entries kept one by one at their places). Must be empty.';

CREATE OR REPLACE VIEW reporting.usage_charge_mismatches AS
SELECT u.id AS usage_event_id, u.account_id, u.credits_micros, coalesce(-t.amount_micros, 0) AS ledger_micros
FROM metering.usage_events u
LEFT JOIN ledger.transfers t ON t.usage_event_id = u.id AND t.kind = 'usage'
WHERE u.credits_micros <> coalesce(-t.amount_micros, 0);
COMMENT ON VIEW reporting.usage_charge_mismatches IS
  'Reconciliation: usage events whose credits_micros differ from the usage transfer recorded for them (a reversal''s transfer names its event too: reporting.reversal_mismatches checks those). Must be empty.';

CREATE OR REPLACE VIEW reporting.system_balances AS
SELECT s.code AS system_account,
       (coalesce((SELECT sum(e.amount_micros) FROM ledger.entries e WHERE e.system_account = s.code), 0)
        + coalesce((SELECT sum(b.amount_micros) FROM ledger.archived_balances b WHERE b.system_account = s.code), 0))::bigint
         AS balance_micros
FROM ledger.system_accounts s;
COMMENT ON VIEW reporting.system_balances IS
  'Balance of each system account in micro-credits, detached months included (grants is negative: credits issued). With customer balances it sums to zero.';

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

CREATE OR REPLACE VIEW reporting.lot_balance_mismatches AS
SELECT a.id AS account_id, a.credit_balance_micros, coalesce(l.remaining, 0) AS active_lots_micros
FROM identity.accounts a
LEFT JOIN (SELECT account_id, sum(remaining_micros)::bigint AS remaining FROM ledger.credit_lots
           WHERE status = 'active' GROUP BY account_id) l ON l.account_id = a.id
WHERE a.credit_balance_micros <> coalesce(l.remaining, 0);
COMMENT ON VIEW reporting.lot_balance_mismatches IS
  'Reconciliation: accounts whose cached balance differs from what remains of their active credit lots. Must be empty.';

GRANT SELECT ON reporting.balance_mismatches, reporting.unbalanced_transfers, reporting.entry_balance_breaks, reporting.usage_charge_mismatches, reporting.system_balances, reporting.ledger_reference_breaks, reporting.lot_balance_mismatches TO pgtally_analyst;
