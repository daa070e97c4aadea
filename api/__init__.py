"""pgtally: accounts, usage metering and billing in PostgreSQL behind a thin Litestar API."""
