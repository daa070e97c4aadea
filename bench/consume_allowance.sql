-- api.consume on the allowance path (unlimited plan: usage event + allowance counter, no ledger).
\set id random(1, 1000)
\set k random(1, 1000000000000000)
SELECT replayed FROM api.consume((SELECT key FROM bench_keys WHERE id = :id AND plan = 'unlimited'), NULL, :k::text, 'generation');
