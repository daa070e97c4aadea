-- api.consume on the credit path (allowance used up: usage event + ledger transfer and two entries).
\set id random(1, 1000)
\set k random(1, 1000000000000000)
SELECT replayed FROM api.consume((SELECT key FROM bench_keys WHERE id = :id AND plan = 'free'), NULL, :k::text, 'generation');
