-- api.consume_batch: 100 events for one account (unlimited plan) in one transaction. The keys are
-- made from one random number per call (not gen_random_uuid() per event, which reads
-- /dev/urandom each time on this build and would be measured as pgtally's).
\set id random(1, 1000)
\set k random(1, 1000000000000000)
SELECT api.consume_batch((SELECT key FROM bench_keys WHERE id = :id AND plan = 'unlimited'), NULL,
                         (SELECT jsonb_agg(jsonb_build_object('idempotency_key', :k || '-' || n, 'meter', 'generation'))
                          FROM generate_series(1, 100) n));
