"""The app under HTTP load for bench/run.py: pgtally itself plus the ceiling route of
``pgtally bench`` (api/bench.py: authenticate exactly as a charge does, answer from the same pool)."""

from api.bench import http_app

app = http_app()
