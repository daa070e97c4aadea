-- The idempotency window, making next months' partitions (util.ensure_partitions, with the tables, in
-- migration 0017) and old months leaving the database (issue #14).

CREATE OR REPLACE FUNCTION metering.idempotency_window() RETURNS interval
LANGUAGE sql STABLE AS $$
  SELECT greatest(coalesce(nullif(current_setting('pgtally.idempotency_window', true), '')::interval, interval '30 days'),
                  interval '1 day')
$$;
COMMENT ON FUNCTION metering.idempotency_window() IS
  'How long a usage event''s idempotency key is remembered after the event: 30 days, or the pgtally.idempotency_window setting (ALTER DATABASE ... SET pgtally.idempotency_window = ''90 days''), never less than a day. Within it a retry is answered from the first charge (or TL409 for a different request); after it the key is forgotten and the same key charges again. A month of usage events leaves (api.detach_month) only once the window has passed its end.';

CREATE OR REPLACE FUNCTION api.maintain_storage() RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_made text[];
  v_forgotten bigint;
  v_lock_timeout text := current_setting('lock_timeout');
BEGIN
  -- Making a partition locks the parent table: charges queue behind a DDL that waits, so it waits
  -- at most two seconds (a long transaction holding the table) and tries again next time; the
  -- months are made three ahead.
  PERFORM set_config('lock_timeout', '2s', true);
  BEGIN
    v_made := util.ensure_partitions(3);
  EXCEPTION WHEN lock_not_available THEN
    v_made := NULL;
  END;
  PERFORM set_config('lock_timeout', v_lock_timeout, true);
  DELETE FROM metering.idempotency_keys WHERE created_at < util.now() - metering.idempotency_window();
  GET DIAGNOSTICS v_forgotten = ROW_COUNT;
  RETURN jsonb_build_object('partitions_made', to_jsonb(v_made), 'idempotency_keys_forgotten', v_forgotten);
END $$;
COMMENT ON FUNCTION api.maintain_storage() IS
  'pgtally worker, every few minutes in its own transaction: make next months'' partitions (util.ensure_partitions(3); partitions_made is null when the tables stayed busy for two seconds: tried again next time) and forget idempotency keys older than the idempotency window (metering.idempotency_window()). Returns {partitions_made, idempotency_keys_forgotten}.';

CREATE OR REPLACE FUNCTION api.detach_month(p_month date) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_start date := date_trunc('month', p_month)::date;
  v_from timestamptz := date_trunc('month', p_month)::timestamp AT TIME ZONE 'UTC';
  v_to timestamptz := (date_trunc('month', p_month) + interval '1 month')::timestamp AT TIME ZONE 'UTC';
  v_events text := util.partition_name('metering.usage_events', date_trunc('month', p_month)::date);
  v_entries text := util.partition_name('ledger.entries', date_trunc('month', p_month)::date);
  v_name text;
  v_event_count bigint;
  v_entry_count bigint;
BEGIN
  IF p_month IS NULL OR v_to > util.now() - metering.idempotency_window() THEN
    PERFORM util.fail('TL422', format('a month leaves once the idempotency window (%s) has passed its end: %s can leave from %s',
                                      metering.idempotency_window(), to_char(v_start, 'YYYY-MM'),
                                      util.iso(v_to + metering.idempotency_window())));
  END IF;
  FOREACH v_name IN ARRAY ARRAY[v_events, v_entries] LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_inherits WHERE inhrelid = to_regclass(v_name)) THEN
      PERFORM util.fail('TL404', format('%s is not an attached partition (never made, or detached already)', v_name));
    END IF;
  END LOOP;
  -- The analytics rollup must have read the month's events before they leave.
  IF EXISTS (SELECT 1 FROM metering.usage_events e, metering.rollup_state s
             WHERE e.created_at >= v_from AND e.created_at < v_to AND e.id > s.last_id) THEN
    PERFORM util.fail('TL409', format('the usage rollup has not read all of %s yet: run the worker (api.rollup_usage) first',
                                      to_char(v_start, 'YYYY-MM')));
  END IF;
  LOCK TABLE metering.usage_events, ledger.entries IN SHARE ROW EXCLUSIVE MODE;
  -- Months leave oldest first: the archived sums are where an account's running balance starts.
  IF EXISTS (SELECT 1 FROM ledger.entries WHERE created_at < v_from) THEN
    PERFORM util.fail('TL409', format('an earlier month than %s still has ledger entries: detach the oldest month first',
                                      to_char(v_start, 'YYYY-MM')));
  END IF;
  EXECUTE format('SELECT count(*) FROM %s', v_events) INTO v_event_count;
  -- The month's entries summed per account and system account, but for those written after an
  -- entry of a later month of the same account (a transaction that began before the month ended
  -- and charged after the next one had begun): those are kept one by one, with their ids, so
  -- that reporting.entry_balance_breaks counts them where they came. Only the few entries near
  -- the month's end are looked at (ids come from a sequence, in the order entries are written).
  EXECUTE format($f$
    WITH later AS (SELECT l.account_id, min(l.id) AS first_id FROM ledger.entries l
                   WHERE l.created_at >= $2 AND l.account_id IS NOT NULL AND l.id < (SELECT max(id) FROM %1$s)
                   GROUP BY l.account_id),
         one_by_one AS (SELECT m.id, m.account_id, m.amount_micros FROM %1$s m
                        JOIN later ON later.account_id = m.account_id AND m.id > later.first_id),
         kept AS (INSERT INTO ledger.archived_balances (month, account_id, system_account, amount_micros, entries, entry_id)
                  SELECT $1, account_id, NULL, amount_micros, 1, id FROM one_by_one RETURNING 1)
    INSERT INTO ledger.archived_balances (month, account_id, system_account, amount_micros, entries)
    SELECT $1, m.account_id, m.system_account, sum(m.amount_micros), count(*) FROM %1$s m
    WHERE m.id NOT IN (SELECT id FROM one_by_one) GROUP BY 2, 3$f$, v_entries)
    USING v_start, v_to;
  SELECT count(*) INTO v_entry_count FROM ledger.archived_balances WHERE month = v_start;
  DELETE FROM metering.idempotency_keys WHERE created_at < v_to;      -- past the window already
  EXECUTE format('ALTER TABLE metering.usage_events DETACH PARTITION %s', v_events);
  EXECUTE format('ALTER TABLE ledger.entries DETACH PARTITION %s', v_entries);
  RETURN jsonb_build_object('month', to_char(v_start, 'YYYY-MM'), 'usage_events', v_events, 'usage_event_count', v_event_count,
                            'entries', v_entries, 'archived_balances', v_entry_count);
END $$;
COMMENT ON FUNCTION api.detach_month(date) IS
  'pgtally partitions detach: the month containing p_month leaves metering.usage_events and ledger.entries. Its two partitions become standalone tables (metering.usage_events_yYYYYmMM, ledger.entries_yYYYYmMM) to archive (pg_dump -t) and drop; what the month''s entries summed to per account and system account stays in ledger.archived_balances (an entry written after an entry of a later month of its account stays there by itself, with its id), so reporting.balance_mismatches, entry_balance_breaks and system_balances still balance. Only once the idempotency window has passed the month''s end (TL422 before), once the analytics rollup has read it (TL409), and oldest month first (TL409 while an earlier month has ledger entries). TL404 when the month is not an attached partition. Returns {month, usage_events, usage_event_count, entries, archived_balances}. Operators only.';

CREATE OR REPLACE FUNCTION api.partitions() RETURNS TABLE (table_name text, partition text, month text, attached boolean, rows_estimate bigint, bytes bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT t.parent, c.oid::regclass::text, to_char(to_date(substring(c.relname FROM '_y(\d{4}m\d{2})$'), 'YYYY"m"MM'), 'YYYY-MM'),
         EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = c.oid), greatest(c.reltuples, 0)::bigint,
         pg_total_relation_size(c.oid)
  FROM (VALUES ('metering.usage_events', 'metering', 'usage_events'), ('ledger.entries', 'ledger', 'entries')) t(parent, nsp, base)
  JOIN pg_namespace n ON n.nspname = t.nsp
  JOIN pg_class c ON c.relnamespace = n.oid AND c.relkind = 'r'
                 AND (c.relname ~ ('^' || t.base || '_y\d{4}m\d{2}$') OR c.relname = t.base || '_default')
  ORDER BY 1, 3 NULLS FIRST
$$;
COMMENT ON FUNCTION api.partitions() IS
  'pgtally partitions list: every monthly partition of metering.usage_events and ledger.entries (and their default partitions, month NULL), attached or detached and kept, with the planner''s row estimate and its size in bytes. Operators only.';

GRANT EXECUTE ON FUNCTION api.maintain_storage() TO pgtally_api;
