-- Operations: what tells the operator pgtally is well (readiness, the schema version, /metrics
-- gauges), the reconciliation views to run, and the alerts the worker emails when they are not.

------------------------------------------------------------------------------------------------
-- Alerts to operators
------------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION ops.reconciliation_views() RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
  SELECT ARRAY['balance_mismatches', 'unbalanced_transfers', 'entry_balance_breaks', 'usage_charge_mismatches',
               'hold_mismatches', 'unreported_post_paid_events', 'lot_balance_mismatches',
               'referral_reward_mismatches', 'revenue_drift', 'ledger_reference_breaks', 'unmatched_refunds',
               'stuck_auto_topups', 'meter_total_mismatches', 'unmatched_disputes', 'reversal_mismatches']
$$;
COMMENT ON FUNCTION ops.reconciliation_views() IS
  'The reconciliation views of reporting, each of which must always be empty: what pgtally reconcile runs and what the reconciliation alert watches.';

CREATE OR REPLACE FUNCTION ops.reconciliation_problems() RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
  v text;
  n bigint;
  problems jsonb := '{}';
BEGIN
  FOREACH v IN ARRAY ops.reconciliation_views() LOOP
    EXECUTE format('SELECT count(*) FROM reporting.%I', v) INTO n;
    IF n > 0 THEN
      problems := problems || jsonb_build_object(v, n);
    END IF;
  END LOOP;
  RETURN nullif(problems, '{}');
END $$;
COMMENT ON FUNCTION ops.reconciliation_problems() IS
  'How many rows each non-empty reconciliation view has ({view: rows}); NULL when all are empty.';

CREATE OR REPLACE FUNCTION api.check_alerts(p_email text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_condition text;
  v_detail jsonb;
  v_since timestamptz;
  v_sent text[] := '{}';
BEGIN
  IF p_email IS NULL OR p_email !~ '^[^@\s]+@[^@\s]+$' THEN
    RETURN jsonb_build_object('sent', '[]'::jsonb);
  END IF;
  FOREACH v_condition IN ARRAY ARRAY['webhook_rejected', 'reconciliation', 'outbox_failed'] LOOP
    -- At most once an hour per condition; each alert tells what happened since the last one.
    SELECT last_sent_at INTO v_since FROM ops.alerts WHERE condition = v_condition FOR UPDATE;
    IF v_since > util.now() - interval '1 hour' THEN
      CONTINUE;
    END IF;
    v_detail := CASE v_condition
      WHEN 'webhook_rejected' THEN (
        SELECT jsonb_build_object('count', count(*), 'examples', jsonb_agg(jsonb_build_object('id', id, 'type', type, 'note', note)))
        FROM (SELECT * FROM billing.stripe_events WHERE status = 'rejected' AND received_at > coalesce(v_since, '-infinity')
              ORDER BY received_at DESC LIMIT 5) e
        HAVING count(*) > 0)
      WHEN 'reconciliation' THEN ops.reconciliation_problems()
      WHEN 'outbox_failed' THEN (
        SELECT jsonb_build_object('count', count(*), 'kinds', jsonb_agg(DISTINCT kind))
        FROM outbox.messages WHERE failed_at > coalesce(v_since, '-infinity') AND kind <> 'alert'
        HAVING count(*) > 0)
    END;
    IF v_detail IS NOT NULL THEN
      INSERT INTO outbox.messages (kind, recipient, payload, created_at, next_attempt_at)
      VALUES ('alert', p_email, jsonb_build_object('condition', v_condition, 'detail', v_detail::text), util.now(), util.now());
      INSERT INTO ops.alerts (condition, last_sent_at, last_detail) VALUES (v_condition, util.now(), v_detail)
      ON CONFLICT (condition) DO UPDATE SET last_sent_at = EXCLUDED.last_sent_at, last_detail = EXCLUDED.last_detail;
      v_sent := v_sent || v_condition;
    END IF;
  END LOOP;
  RETURN jsonb_build_object('sent', to_jsonb(v_sent));
END $$;
COMMENT ON FUNCTION api.check_alerts(text) IS
  'pgtally worker (housekeeping), with PGTALLY_ALERT_EMAIL: for each condition that holds, queue one alert email (outbox kind alert) unless one went out in the last hour (ops.alerts): webhook_rejected (signed Stripe events rejected since the last alert), reconciliation (any row in a reconciliation view, or revenue drift), outbox_failed (messages that exhausted their retries since the last alert). Returns {sent: [conditions]}.';

GRANT EXECUTE ON FUNCTION api.check_alerts(text) TO pgtally_api;

------------------------------------------------------------------------------------------------
-- Operations
------------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION api.ops_gauges() RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT jsonb_build_object(
    'outbox', coalesce((SELECT jsonb_object_agg(kind, jsonb_build_object('pending', pending, 'failed', failed))
                        FROM reporting.outbox_backlog), '{}'),
    'rollup_lag_seconds', coalesce((
      SELECT extract(epoch FROM util.now() - e.created_at) FROM metering.usage_events e
      WHERE e.id > (SELECT last_id FROM metering.rollup_state) ORDER BY e.id LIMIT 1), 0))
$$;
COMMENT ON FUNCTION api.ops_gauges() IS
  '/metrics: outbox messages pending and failed per kind, and the age in seconds of the oldest usage event not yet in the analytics rollup (0 when it is caught up).';

CREATE OR REPLACE FUNCTION api.schema_version() RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  RETURN (SELECT max(migration_id) FROM public._yoyo_migration);
END $$;
COMMENT ON FUNCTION api.schema_version() IS '/readyz: the newest migration applied to this database (yoyo''s _yoyo_migration).';

CREATE OR REPLACE FUNCTION api.readiness() RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT jsonb_build_object('schema', api.schema_version(),
                            'read_only', current_setting('transaction_read_only')::boolean OR pg_is_in_recovery())
$$;
COMMENT ON FUNCTION api.readiness() IS
  '/readyz: {schema: the newest migration applied (api.schema_version), read_only: whether this session cannot write (default_transaction_read_only set for the server, database or role, or a standby in recovery; writes would fail with SQLSTATE 25006)}.';

GRANT EXECUTE ON FUNCTION api.ops_gauges(), api.schema_version(), api.readiness() TO pgtally_api;
