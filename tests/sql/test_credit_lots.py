"""Credit lots: the burn order, expiry exactly once, the sign-up bonus and monthly credits, called
directly in SQL and with many real connections at once."""

from __future__ import annotations

from tests.conftest import CREDIT, balance, capture, consume, hold, move_clock, reconciliation_problems, run_concurrently, sqlstate_of


def grant(owner, account_id, source, credits, key, expires_in_days=None, available_in_days=0):
    """A lot granted now (or pending for available_in_days), expiring at midnight UTC
    expires_in_days from today (lots given the same day expire at the same moment)."""
    return owner.execute(
        "SELECT ledger.grant_lot(%s, %s, %s, %s, %s, util.now() + make_interval(days => %s), "
        "date_trunc('day', util.now(), 'UTC') + make_interval(days => %s))",
        [account_id, source, credits * CREDIT, key, key, available_in_days, expires_in_days]).fetchone()[0]


def remaining(owner, account_id) -> dict[str, float]:
    return {key: r / CREDIT for key, r in owner.execute(
        "SELECT grant_key, remaining_micros FROM ledger.credit_lots WHERE account_id = %s", [account_id])}


def lots(owner, account_id):
    return owner.execute("SELECT grant_key, status, remaining_micros FROM ledger.credit_lots WHERE account_id = %s "
                         "ORDER BY grant_key", [account_id]).fetchall()


def test_charges_burn_soonest_expiry_first_then_promotional_before_paid_then_oldest(owner, api_conn, new_account):
    acct = new_account("free")
    a = acct["account_id"]
    grant(owner, a, "purchase", 4, "paid-forever")
    grant(owner, a, "promotion", 4, "promo-forever")
    grant(owner, a, "purchase", 4, "paid-10d", expires_in_days=10)
    grant(owner, a, "promotion", 4, "promo-10d", expires_in_days=10)
    grant(owner, a, "signup_bonus", 2, "promo-5d", expires_in_days=5)
    consume(api_conn, acct["api_key"], "allowance", quantity=10)             # the daily allowance first
    # One charge of 3 credits spans two lots: the 5-day lot (2), then the 10-day promotional one.
    replayed, event = consume(api_conn, acct["api_key"], "span", quantity=3)
    assert not replayed and event["charged"]["credits"] == "3"
    assert remaining(owner, a) == {"paid-forever": 4, "promo-forever": 4, "paid-10d": 4, "promo-10d": 3, "promo-5d": 0}
    assert owner.execute("SELECT count(*) FROM ledger.transfers WHERE usage_event_id = %s", [event["id"]]).fetchone()[0] == 1
    consume(api_conn, acct["api_key"], "more", quantity=5)
    assert remaining(owner, a) == {"paid-forever": 4, "promo-forever": 4, "paid-10d": 2, "promo-10d": 0, "promo-5d": 0}
    consume(api_conn, acct["api_key"], "again", quantity=4)
    assert remaining(owner, a) == {"paid-forever": 4, "promo-forever": 2, "paid-10d": 0, "promo-10d": 0, "promo-5d": 0}
    b = balance(api_conn, acct["api_key"])
    assert b["credits"] == "6" and b["next_expiry"] is None and b["pending"] == "0"
    assert reconciliation_problems(owner) == {}


def test_an_expired_lot_gives_up_its_remainder_once_under_concurrent_charges(owner, new_account, connections):
    acct = new_account("free")
    a = acct["account_id"]
    grant(owner, a, "promotion", 5, "expiring", expires_in_days=1)
    grant(owner, a, "purchase", 20, "bought")
    b = balance(owner, acct["api_key"])
    assert b["next_expiry"]["credits"] == "5" and b["credits"] == "25"
    conns = connections(24)
    move_clock(owner, conns, "2 days")
    consume(conns[0], acct["api_key"], "allowance", quantity=10)

    def work(i):
        if i % 3 == 0:
            return conns[i].execute("SELECT api.refresh_due_credits()").fetchone()[0]
        return consume(conns[i], acct["api_key"], f"c{i}")

    results = run_concurrently(24, work)
    assert not [r for r in results if isinstance(r, Exception)]
    expiries = owner.execute("SELECT amount_micros FROM ledger.transfers WHERE account_id = %s AND kind = 'expiry'",
                             [a]).fetchall()
    assert expiries == [(-5 * CREDIT,)]
    assert lots(owner, a) == [("bought", "active", 4 * CREDIT), ("expiring", "expired", 0)]
    assert reconciliation_problems(owner) == {}


def test_credits_held_by_an_open_hold_wait_for_it_before_expiring(owner, api_conn, new_account):
    acct = new_account("free")
    a = acct["account_id"]
    grant(owner, a, "promotion", 3, "expiring", expires_in_days=1)
    consume(api_conn, acct["api_key"], "allowance", quantity=10)
    h = hold(api_conn, acct["api_key"], "h", quantity=2, expires_in=86400)[1]
    move_clock(owner, [api_conn], "1 second", since="date_trunc('day', now(), 'UTC') + interval '1 day'")
    api_conn.execute("SELECT api.refresh_due_credits()")
    assert lots(owner, a) == [("expiring", "active", 2 * CREDIT)]        # the held 2 stay for the hold
    capture(api_conn, acct["api_key"], h["id"], quantity=1)                 # spends the expiring lot first
    api_conn.execute("SELECT api.refresh_due_credits()")
    assert lots(owner, a) == [("expiring", "expired", 0)]
    assert balance(api_conn, acct["api_key"])["credits"] == "0"
    assert reconciliation_problems(owner) == {}


def test_pending_credits_are_not_spendable_until_available(owner, api_conn, new_account):
    acct = new_account("free")
    grant(owner, acct["account_id"], "referral_reward", 10, "later", available_in_days=14)
    consume(api_conn, acct["api_key"], "allowance", quantity=10)
    b = balance(api_conn, acct["api_key"])
    assert (b["credits"], b["pending"]) == ("0", "10")
    assert sqlstate_of(lambda: consume(api_conn, acct["api_key"], "x")) == "TL402"
    assert owner.execute("SELECT count(*) FROM ledger.transfers WHERE account_id = %s", [acct["account_id"]]).fetchone()[0] == 0
    move_clock(owner, [api_conn], "15 days")
    assert consume(api_conn, acct["api_key"], "y", quantity=11)[1]["charged"]["credits"] == "1"
    assert (balance(api_conn, acct["api_key"])["credits"], balance(api_conn, acct["api_key"])["pending"]) == ("9", "0")
    lots_page = api_conn.execute("SELECT api.credit_lots(%s, NULL)", [acct["api_key"]]).fetchone()[0]
    assert [(x["source"], x["status"], x["remaining"]) for x in lots_page["data"]] == [("referral_reward", "active", "9")]
    assert reconciliation_problems(owner) == {}


def verify_token(owner, user_id):
    return owner.execute("SELECT identity.one_time_token(%s, 'verify_email', interval '1 day')", [user_id]).fetchone()[0]


def test_the_sign_up_bonus_is_granted_once_even_with_two_verification_links(owner, connections):
    owner.execute("SELECT api.signup('bonus@example.com', 'argon2-hash', '10.0.0.1', 'test')")
    user_id, account_id = owner.execute("SELECT id, account_id FROM identity.users").fetchone()
    tokens = [verify_token(owner, user_id) for _ in range(8)]
    conns = connections(8)
    results = run_concurrently(8, lambda i: conns[i].execute("SELECT api.verify_email(%s, %s)",
                                                             [tokens[i], f"10.0.1.{i}"]).fetchone()[0])
    assert all(r["email_verified"] for r in results), results
    assert lots(owner, account_id) == [("signup_bonus", "active", 5 * CREDIT)]
    assert owner.execute("SELECT credit_balance_micros FROM identity.accounts WHERE id = %s", [account_id]).fetchone()[0] == 5 * CREDIT
    assert reconciliation_problems(owner) == {}


def test_monthly_free_credits_reset_at_the_period_boundary(owner, new_account):
    owner.execute("UPDATE billing.plans SET monthly_credits_micros = 3000000 WHERE id = 'free'")
    owner.execute("SET pgtally.now = '2026-03-15 12:00:00+00'")
    acct = new_account("free")
    a = acct["account_id"]
    b = balance(owner, acct["api_key"])
    assert b["credits"] == "3" and b["next_expiry"] == {"credits": "3", "at": "2026-04-01T00:00:00.000000Z"}
    consume(owner, acct["api_key"], "allowance", quantity=10)
    consume(owner, acct["api_key"], "march")
    owner.execute("SET pgtally.now = '2026-03-31 23:59:59+00'")
    assert balance(owner, acct["api_key"])["credits"] == "2"
    owner.execute("SET pgtally.now = '2026-04-01 00:00:00+00'")
    consume(owner, acct["api_key"], "april-allowance", quantity=10)
    assert consume(owner, acct["api_key"], "april")[1]["balance"]["credits"] == "2"     # 2 expired, 3 new, 1 spent
    assert lots(owner, a) == [("monthly:free:2026-03-01T00:00:00.000000Z", "expired", 0),
                              ("monthly:free:2026-04-01T00:00:00.000000Z", "active", 2 * CREDIT)]
    assert owner.execute("SELECT amount_micros FROM ledger.transfers WHERE account_id = %s AND kind = 'expiry'",
                         [a]).fetchall() == [(-2 * CREDIT,)]
    assert reconciliation_problems(owner) == {}


def test_a_device_merge_moves_lots_with_their_expiry(owner):
    device = owner.execute("SELECT api.identify('fp-merge', 'install-merge-0123456789abcdef', NULL, '10.0.0.9', 'x')").fetchone()[0]
    grant(owner, device["account_id"], "promotion", 2, "device-promo", expires_in_days=3)
    (session_id,) = owner.execute("SELECT id FROM identity.sessions WHERE account_id = %s", [device["account_id"]]).fetchone()
    owner.execute("SELECT api.signup('merge@example.com', 'argon2-hash', '10.0.0.9', 'test', %s)", [session_id])
    user_account = owner.execute("SELECT account_id FROM identity.users").fetchone()[0]
    moved = owner.execute("SELECT source, remaining_micros, expires_at IS NOT NULL FROM ledger.credit_lots "
                          "WHERE account_id = %s", [user_account]).fetchall()
    assert moved == [("promotion", 2 * CREDIT, True)]
    assert lots(owner, device["account_id"]) == []
    assert reconciliation_problems(owner) == {}
