-- api.consume_batch: 100 events for one account (unlimited plan) in one transaction.
\set id random(1, 1000)
SELECT api.consume_batch((SELECT key FROM bench_keys WHERE id = :id AND plan = 'unlimited'), NULL,
                         (SELECT jsonb_agg(jsonb_build_object('idempotency_key', gen_random_uuid()::text, 'meter', 'generation'))
                          FROM generate_series(1, 100)));
