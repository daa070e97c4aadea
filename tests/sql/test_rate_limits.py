"""Rate limits (identity.throttled): a sliding window, exact under concurrency, called through
api.signup (10 an hour per IP, 5 an hour per address) with the database clock moved per
connection."""

from __future__ import annotations

import psycopg
import pytest

from tests.conftest import run_concurrently, set_clock

IP = "198.51.100.23"


def signup(conn, email: str, ip: str = IP) -> dict:
    return conn.execute("SELECT api.signup(%s, 'argon2-hash', %s, 'test')", [email, ip]).fetchone()[0]


def allowed(answer: dict) -> bool:
    assert "error" not in answer or answer["error"]["sqlstate"] == "TL429", answer
    return "error" not in answer


def test_item11_parallel_attempts_around_a_window_boundary_never_pass_more_than_the_limit(api_conn, connections):
    conns = connections(40)
    # Half the callers just before 13:00 (the old fixed window's end), half just after.
    for i, conn in enumerate(conns):
        set_clock(conn, "2026-06-15 12:59:59.9+00" if i % 2 else "2026-06-15 13:00:00.1+00")
    answers = run_concurrently(40, lambda i: signup(conns[i], f"boundary{i}@example.com"))
    assert not [a for a in answers if isinstance(a, Exception)]
    assert sum(allowed(a) for a in answers) == 10
    # Later callers of the same hour are refused too, whichever side of 13:00 they are on.
    set_clock(api_conn, "2026-06-15 13:30:00+00")
    refused = signup(api_conn, "later@example.com")
    assert not allowed(refused) and 0 < refused["error"]["retry_after"] <= 1800


def test_item11_the_window_slides_with_the_clock(api_conn):
    set_clock(api_conn, "2026-06-15 12:30:00+00")
    assert all(allowed(signup(api_conn, f"early{i}@example.com")) for i in range(5))
    set_clock(api_conn, "2026-06-15 12:59:59+00")
    assert all(allowed(signup(api_conn, f"late{i}@example.com")) for i in range(5))
    # A fixed window would start afresh at 13:00; the last hour still holds 10 sign-ups.
    set_clock(api_conn, "2026-06-15 13:00:01+00")
    refused = signup(api_conn, "next@example.com")
    assert not allowed(refused)
    assert refused["error"]["retry_after"] == 1799          # until the 12:30 sign-ups are an hour old
    # Refused attempts are not counted: once the 12:30 ones leave the window, five more pass.
    set_clock(api_conn, "2026-06-15 13:30:00+00")
    assert all(allowed(signup(api_conn, f"again{i}@example.com")) for i in range(5))
    assert not allowed(signup(api_conn, "one-more@example.com"))
    # Another IP has a window of its own.
    assert allowed(signup(api_conn, "elsewhere@example.com", ip="198.51.100.24"))


def test_item11_limits_per_address_and_per_ip_are_both_kept(api_conn):
    set_clock(api_conn, "2026-06-15 12:00:00+00")
    for i in range(5):
        assert allowed(signup(api_conn, "same@example.com", ip=f"203.0.113.{i}"))
    assert not allowed(signup(api_conn, "same@example.com", ip="203.0.113.99"))
    # The refused address did not use up the IP's allowance.
    for i in range(10):
        assert allowed(signup(api_conn, f"user{i}@example.com", ip="203.0.113.99"))
    assert not allowed(signup(api_conn, "user10@example.com", ip="203.0.113.99"))


def test_item11_the_upgrade_keeps_the_windows_in_progress():
    import os

    import psycopg

    from api import db
    from tests.conftest import fresh_database

    with fresh_database(f"pgtally_0027_{os.getpid()}", until="0023_json_answers") as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("INSERT INTO identity.rate_limits (bucket, window_start, hits) VALUES "
                         "('signup:ip:192.0.2.1', '2026-06-15 11:00+00', 50), "
                         "('signup:ip:192.0.2.1', '2026-06-15 12:00+00', 12), "
                         "('signup:ip:192.0.2.2', '2026-06-15 12:00+00', 3)")
        assert "0027_sliding_rate_limits" in db.upgrade(url)
        with psycopg.connect(url, autocommit=True) as conn:
            set_clock(conn, "2026-06-15 12:40:00+00")
            refused = signup(conn, "full@example.com", ip="192.0.2.1")
            assert not allowed(refused) and refused["error"]["retry_after"] == 1200   # when the old window ended
            assert [allowed(signup(conn, f"some{i}@example.com", ip="192.0.2.2")) for i in range(8)] == [True] * 7 + [False]
            set_clock(conn, "2026-06-15 13:00:00+00")
            assert allowed(signup(conn, "then@example.com", ip="192.0.2.1"))


def test_every_limit_is_a_row_of_the_rules_table_an_operator_may_change(owner, api_conn):
    """One place per constant (issue 24): the limits identity.throttled applies are those of
    identity.rate_limit_rules, read on each attempt; an action without a rule is an error, never
    a free pass."""
    owner.execute("UPDATE identity.rate_limit_rules SET max_attempts = 2 WHERE action = 'signup' AND dimension = 'ip'")
    set_clock(api_conn, "2026-06-15 12:00:00+00")
    assert [allowed(signup(api_conn, f"rule{i}@example.com")) for i in range(3)] == [True, True, False]
    actions = {a for (a,) in owner.execute("SELECT DISTINCT action FROM identity.rate_limit_rules").fetchall()}
    assert {"signup", "login", "password_reset", "identify", "oauth", "device_code"} <= actions
    with pytest.raises(psycopg.errors.RaiseException, match="no rate limit rule for no_such_action"):
        owner.execute("SELECT identity.throttled('no_such_action', '198.51.100.1')")
