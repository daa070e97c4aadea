-- pgtally 0018: a detached month keeps, one by one, the entries it holds that were written after
-- an entry of a later month of the same account, so reporting.entry_balance_breaks stays empty
-- after a detach. Issue #14.
-- depends: 0017_partitions
--
-- An entry's month is the start of its transaction (created_at); its place in the account's
-- sequence is its id (taken when it is written, under the account's lock). A transaction that
-- began before midnight at the end of a month and waited for the account's lock past a charge
-- of the new month writes an entry of the old month with a later id. Summing that entry into the
-- old month's total would count it before the new month's first entries, whose balances do not
-- include it.

ALTER TABLE ledger.archived_balances ADD COLUMN entry_id bigint;
ALTER TABLE ledger.archived_balances DROP CONSTRAINT archived_balances_month_account_id_system_account_key;
ALTER TABLE ledger.archived_balances ADD CONSTRAINT archived_balances_month_account_id_system_account_key
  UNIQUE NULLS NOT DISTINCT (month, account_id, system_account, entry_id);
COMMENT ON TABLE ledger.archived_balances IS
  'What each account''s entries of a detached month summed to (micro-credits) and how many there were, written by api.detach_month in the transaction that detaches the month: the reconciliation views add these sums to the entries still attached. entry_id NULL: the month''s sum; set: one entry of the month kept by itself (entries = 1) because it was written after an entry of a later month of the same account, so reporting.entry_balance_breaks counts it at its place (its id).';
COMMENT ON COLUMN ledger.archived_balances.entry_id IS
  'NULL for a month''s sum; the id of a single detached entry that came after the next month had begun for its account (see the table comment).';

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
