"""Referrals: attribution at sign-up with its refusals, the reward granted by the transaction
that records the qualifying payment (once, however it is delivered), the holdback, the monthly
cap and refunds; called directly in SQL and with many real connections at once."""

from __future__ import annotations

from psycopg.types.json import Jsonb

from tests.conftest import CREDIT, move_clock, reconciliation_problems, referral, run_concurrently, signup
from tests.stripe_standin import Events

PUBLIC_URL = "https://pgtally.example"
EVENTS = Events()   # one sequence of event ids for the module


def checkout_event(person, payment_intent):
    return EVENTS.event("checkout.session.completed", {
        "id": f"cs_{payment_intent}", "object": "checkout.session", "mode": "payment", "payment_status": "paid",
        "customer": f"cus_{payment_intent}", "client_reference_id": person["account_id"],
        "payment_intent": payment_intent, "amount_total": 500, "currency": "usd", "metadata": {"price": "bundle_10"}})


def deliver(conn, event):
    return conn.execute("SELECT api.stripe_webhook(%s)", [Jsonb(event)]).fetchone()[0]


def referrals_of(conn, person):
    session = conn.execute("SELECT api.login_succeeded(%s, NULL, '192.0.2.1', 'test')", [person["user_id"]]).fetchone()[0]
    return conn.execute("SELECT api.referrals(NULL, %s, %s)", [session["session_id"], PUBLIC_URL]).fetchone()[0]


def balance_of(conn, person):
    return conn.execute("SELECT credit_balance_micros FROM identity.accounts WHERE id = %s",
                        [person["account_id"]]).fetchone()[0]


def test_a_referral_is_rewarded_by_the_first_payment_and_spendable_after_the_holdback(owner):
    alice = signup(owner, "alice@example.com")
    bob = signup(owner, "bob@example.com", code=alice["code"].upper())
    assert referral(owner, bob) == ("signed_up", None)
    token = owner.execute("SELECT identity.one_time_token(%s, 'verify_email', interval '1 day')", [bob["user_id"]]).fetchone()[0]
    owner.execute("SELECT api.verify_email(%s, '10.9.9.9')", [token])
    assert referral(owner, bob) == ("signed_up", None)          # the program qualifies on the first payment
    assert deliver(owner, checkout_event(bob, "pi_bob"))["status"] == "applied"
    assert referral(owner, bob) == ("rewarded", None)
    page = referrals_of(owner, alice)
    assert page["code"] == alice["code"] and page["link"] == f"{PUBLIC_URL}/r/{alice['code']}"
    assert (page["earned"], page["pending"]) == ("0", "10")
    (row,) = page["referrals"]
    assert row["referee"] == "b***@example.com" and row["status"] == "rewarded" and row["credits_status"] == "pending"
    assert balance_of(owner, alice) == 0
    # A second payment changes nothing.
    deliver(owner, checkout_event(bob, "pi_bob_2"))
    assert owner.execute("SELECT count(*) FROM ledger.credit_lots WHERE source = 'referral_reward'").fetchone()[0] == 1

    move_clock(owner, [owner], "15 days")
    page = referrals_of(owner, alice)
    assert (page["earned"], page["pending"]) == ("10", "0")
    assert balance_of(owner, alice) == 10 * CREDIT
    funnel = owner.execute("SELECT signed_up, qualified, rewarded FROM reporting.referral_funnel_daily").fetchall()
    assert funnel == [(1, 1, 1)]
    assert reconciliation_problems(owner) == {}


def test_refusals_are_recorded_with_their_reason_and_earn_nothing(owner):
    alice = signup(owner, "alice@example.com", ip="203.0.113.7")
    # Her own mailbox with a +tag.
    assert referral(owner, signup(owner, "alice+again@example.com", code=alice["code"])) == ("rejected", "self_referral")
    # From an IP she was seen at.
    assert referral(owner, signup(owner, "carol@example.com", code=alice["code"], ip="203.0.113.7")) == ("rejected", "same_ip")
    # Her own anonymous device: one she merged before has this fingerprint.
    first = owner.execute("SELECT api.identify('fp-alice', 'install-alice-0123456789abcdef', NULL, '10.2.0.1', 'x')").fetchone()[0]
    first_session = owner.execute("SELECT id FROM identity.sessions WHERE account_id = %s", [first["account_id"]]).fetchone()[0]
    owner.execute("SELECT api.login_succeeded(%s, NULL, '10.2.0.1', 'x', %s)", [alice["user_id"], first_session])
    again = owner.execute("SELECT api.identify('fp-alice', 'install-alice-again-0123456789ab', NULL, '10.2.0.2', 'x')").fetchone()[0]
    again_session = owner.execute("SELECT id FROM identity.sessions WHERE account_id = %s", [again["account_id"]]).fetchone()[0]
    dave = signup(owner, "dave@example.com", code=alice["code"], device_session=again_session)
    assert referral(owner, dave) == ("rejected", "own_device")
    # A browser sending that fingerprint.
    erin = signup(owner, "erin@example.com", code=alice["code"], fingerprint="fp-alice")
    assert referral(owner, erin) == ("rejected", "same_fingerprint")
    # An unknown code is ignored; a rejected referee who pays earns nothing.
    assert referral(owner, signup(owner, "frank@example.com", code="nosuchcd")) is None
    deliver(owner, checkout_event(erin, "pi_erin"))
    assert referral(owner, erin) == ("rejected", "same_fingerprint")
    assert owner.execute("SELECT count(*) FROM ledger.credit_lots WHERE source = 'referral_reward'").fetchone()[0] == 0
    funnel = owner.execute("SELECT signed_up, rejected_self_referral, rejected_same_ip, rejected_own_device, "
                           "rejected_same_fingerprint FROM reporting.referral_funnel_daily").fetchone()
    assert funnel == (4, 1, 1, 1, 1)
    assert reconciliation_problems(owner) == {}


def test_the_monthly_cap_rejects_rewards_past_it(owner):
    owner.execute("UPDATE billing.referral_program SET monthly_cap = 2, holdback = '0'")
    alice = signup(owner, "alice@example.com")
    referees = [signup(owner, f"friend{i}@example.com", code=alice["code"]) for i in range(3)]
    for i, friend in enumerate(referees):
        deliver(owner, checkout_event(friend, f"pi_friend{i}"))
    assert [referral(owner, f) for f in referees] == [("rewarded", None), ("rewarded", None), ("rejected", "monthly_cap")]
    assert balance_of(owner, alice) == 20 * CREDIT             # no holdback: spendable at once
    assert reconciliation_problems(owner) == {}


def test_20_concurrent_deliveries_of_the_qualifying_payment_reward_once(owner, connections):
    owner.execute("UPDATE billing.referral_program SET referee_reward_micros = 2000000")
    alice = signup(owner, "alice@example.com")
    bob = signup(owner, "bob@example.com", code=alice["code"])
    checkout = checkout_event(bob, "pi_once")
    intent = EVENTS.event("payment_intent.succeeded", {
        "id": "pi_once", "object": "payment_intent", "amount": 500, "amount_received": 500, "currency": "usd",
        "customer": "cus_pi_once", "metadata": {"account_id": bob["account_id"], "price": "bundle_10"}, "status": "succeeded"})
    conns = connections(20)
    results = run_concurrently(20, lambda i: deliver(conns[i], checkout if i % 2 else intent))
    assert not [r for r in results if isinstance(r, Exception)], results
    assert referral(owner, bob) == ("rewarded", None)
    rewards = owner.execute("SELECT account_id, amount_micros, status FROM ledger.credit_lots "
                            "WHERE source = 'referral_reward' ORDER BY amount_micros").fetchall()
    assert [(str(a), m, s) for a, m, s in rewards] == [(bob["account_id"], 2 * CREDIT, "pending"),
                                                       (alice["account_id"], 10 * CREDIT, "pending")]
    assert balance_of(owner, bob) == 10 * CREDIT                # the bundle, once
    assert reconciliation_problems(owner) == {}


def refund(conn, payment_intent):
    return deliver(conn, EVENTS.event("charge.refunded", {
        "id": f"ch_{payment_intent}", "object": "charge", "payment_intent": payment_intent, "amount": 500,
        "amount_refunded": 500, "refunded": True, "currency": "usd"}))


def test_a_refund_inside_the_holdback_cancels_the_reward_and_after_it_does_not(owner):
    alice = signup(owner, "alice@example.com")
    bob = signup(owner, "bob@example.com", code=alice["code"])
    carol = signup(owner, "carol@example.com", code=alice["code"])
    deliver(owner, checkout_event(bob, "pi_bob"))
    deliver(owner, checkout_event(carol, "pi_carol"))
    refund(owner, "pi_bob")
    assert referral(owner, bob) == ("rejected", "refunded")
    move_clock(owner, [owner], "15 days")
    refund(owner, "pi_carol")
    assert referral(owner, carol) == ("rewarded", None)
    assert referrals_of(owner, alice)["earned"] == "10"
    assert balance_of(owner, alice) == 10 * CREDIT
    assert owner.execute("SELECT status FROM ledger.credit_lots WHERE source = 'referral_reward' ORDER BY status").fetchall() == [
        ("active",), ("canceled",)]
    assert owner.execute("SELECT rejected_refunded FROM reporting.referral_funnel_daily").fetchone()[0] == 1
    assert reconciliation_problems(owner) == {}


def test_a_program_that_qualifies_on_email_verification_rewards_then(owner):
    owner.execute("UPDATE billing.referral_program SET qualify_on = 'email_verified'")
    alice = signup(owner, "alice@example.com")
    bob = signup(owner, "bob@example.com", code=alice["code"])
    token = owner.execute("SELECT identity.one_time_token(%s, 'verify_email', interval '1 day')", [bob["user_id"]]).fetchone()[0]
    owner.execute("SELECT api.verify_email(%s, '10.9.9.9')", [token])
    assert referral(owner, bob) == ("rewarded", None)
    assert balance_of(owner, bob) == 5 * CREDIT                  # the free plan's sign-up bonus
    assert reconciliation_problems(owner) == {}


def test_the_monthly_cap_holds_when_the_qualifying_payments_arrive_at_once(owner, connections):
    owner.execute("UPDATE billing.referral_program SET monthly_cap = 2, holdback = '0'")
    alice = signup(owner, "alice@example.com")
    friends = [signup(owner, f"pal{i}@example.com", code=alice["code"]) for i in range(6)]
    conns = connections(6)
    results = run_concurrently(6, lambda i: deliver(conns[i], checkout_event(friends[i], f"pi_pal{i}")))
    assert not [r for r in results if isinstance(r, Exception)], results
    statuses = sorted(referral(owner, f) for f in friends)
    assert statuses == [("rejected", "monthly_cap")] * 4 + [("rewarded", None)] * 2
    assert balance_of(owner, alice) == 20 * CREDIT
    assert reconciliation_problems(owner) == {}


def test_item10_gmail_dots_tags_and_googlemail_are_one_mailbox_for_the_self_referral_rule(owner):
    alice = signup(owner, "alice.smith@gmail.com")
    for alias in ("alicesmith@gmail.com", "a.l.i.c.e.s.m.i.t.h+ref@googlemail.com", "al.icesmith+2@gmail.com"):
        assert referral(owner, signup(owner, alias, code=alice["code"])) == ("rejected", "self_referral"), alias
    assert owner.execute("SELECT billing.mailbox('Ali.Ce+x@GoogleMail.com')").fetchone()[0] == "alice@gmail.com"
    # Other providers' dots are part of the address: another person.
    bob = signup(owner, "bob.jones@example.com")
    assert referral(owner, signup(owner, "bobjones@example.com", code=bob["code"])) == ("signed_up", None)
    assert referral(owner, signup(owner, "bob.jones+x@example.com", code=bob["code"])) == ("rejected", "self_referral")
