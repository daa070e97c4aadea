"""Teams and roles, called directly in SQL: the permission matrix, keys that follow their maker's
role, the last-owner rule under concurrent demotions, one invitation accepted 20 times at once,
and suspension."""

from __future__ import annotations

import pytest

from tests.conftest import CREDIT, call, consume, join, person, reconciliation_problems, run_concurrently, sqlstate_of, team_of

# What each role may do on a team: the product's rules, written out (not read from the table).
MATRIX = {
    "owner":   {"usage:read", "usage:write", "billing:read", "billing:manage", "members:read", "members:manage", "keys:manage", "sso:manage"},
    "admin":   {"usage:read", "usage:write", "billing:read", "billing:manage", "members:read", "members:manage", "keys:manage"},
    "member":  {"usage:read", "usage:write", "members:read", "keys:manage"},
    "billing": {"usage:read", "billing:read", "billing:manage", "members:read"},
    "viewer":  {"usage:read", "billing:read", "members:read"},
}
PERMISSIONS = sorted(set().union(*MATRIX.values()))


def test_the_permission_matrix(owner):
    boss = person(owner, "boss")
    team = team_of(owner, boss)
    people = {role: person(owner, role) for role in MATRIX if role != "owner"}
    for role, who in people.items():
        join(owner, boss, team, who, role)
    people["owner"] = boss
    for role, who in people.items():
        for permission in PERMISSIONS:
            run = lambda who=who, permission=permission: call(
                owner, "identity.authenticate(NULL, %s::uuid, %s::text, %s::uuid)", who["session"], permission, team)
            if permission in MATRIX[role]:
                assert str(run()) == team, (role, permission)
            else:
                assert sqlstate_of(run) == "TL403", (role, permission)
    stranger = person(owner, "stranger")
    assert sqlstate_of(lambda: call(owner, "api.members(%s::uuid, %s::uuid)", stranger["session"], team)) == "TL403"
    # A viewer reads the team's balance but does not meter on it.
    viewer = people["viewer"]
    assert call(owner, "api.balance(NULL, %s::uuid, %s::uuid)", viewer["session"], team)["account_id"] == team
    assert sqlstate_of(lambda: owner.execute("SELECT * FROM api.consume(NULL, %s, 'k', 'generation', 1, NULL, NULL, %s)",
                                             [viewer["session"], team])) == "TL403"


def test_a_members_key_follows_the_members_role(owner, api_conn):
    boss, dev = person(owner, "boss"), person(owner, "dev")
    team = team_of(owner, boss)
    join(owner, boss, team, dev, "member")
    key = call(owner, "api.create_api_key(%s::uuid, 'ci', '{usage:write,usage:read}', NULL, %s::uuid)", dev["session"], team)
    assert sqlstate_of(lambda: call(owner, "api.create_api_key(%s::uuid, 'x', '{billing:manage}', NULL, %s::uuid)",
                                    dev["session"], team)) == "TL403"      # beyond the member role
    assert consume(api_conn, key["api_key"], "k1")[1]["account_id"] == team
    call(owner, "api.set_member_role(%s::uuid, %s::uuid, %s::uuid, 'viewer')", boss["session"], team, dev["user_id"])
    assert sqlstate_of(lambda: consume(api_conn, key["api_key"], "k2")) == "TL403"          # the role lost usage:write
    assert api_conn.execute("SELECT api.balance(%s, NULL)", [key["api_key"]]).fetchone()[0]["account_id"] == team
    call(owner, "api.remove_member(%s::uuid, %s::uuid, %s::uuid)", boss["session"], team, dev["user_id"])
    assert sqlstate_of(lambda: api_conn.execute("SELECT api.balance(%s, NULL)", [key["api_key"]])) == "TL401"


def test_only_owners_make_owners_and_the_last_owner_stays(owner):
    boss, ops = person(owner, "boss"), person(owner, "ops")
    team = team_of(owner, boss)
    join(owner, boss, team, ops, "admin")
    assert sqlstate_of(lambda: call(owner, "api.set_member_role(%s::uuid, %s::uuid, %s::uuid, 'owner')",
                                    ops["session"], team, ops["user_id"])) == "TL403"
    assert sqlstate_of(lambda: call(owner, "api.remove_member(%s::uuid, %s::uuid, %s::uuid)",
                                    ops["session"], team, boss["user_id"])) == "TL403"
    assert sqlstate_of(lambda: call(owner, "api.remove_member(%s::uuid, %s::uuid, %s::uuid)",
                                    boss["session"], team, boss["user_id"])) == "TL40C"
    assert sqlstate_of(lambda: call(owner, "api.set_member_role(%s::uuid, %s::uuid, %s::uuid, 'viewer')",
                                    boss["session"], team, boss["user_id"])) == "TL40C"
    call(owner, "api.remove_member(%s::uuid, %s::uuid, %s::uuid)", ops["session"], team, ops["user_id"])   # leaving is free
    assert [m["email"] for m in call(owner, "api.members(%s::uuid, %s::uuid)", boss["session"], team)["data"]] == [boss["email"]]


def test_concurrent_demotions_leave_exactly_one_owner(owner, connections):
    founders = [person(owner, f"founder{i}") for i in range(10)]
    team = team_of(owner, founders[0])
    for who in founders[1:]:
        join(owner, founders[0], team, who, "owner")
    conns = connections(10)
    results = run_concurrently(10, lambda i: call(conns[i], "api.set_member_role(%s::uuid, %s::uuid, %s::uuid, 'member')",
                                                  founders[i]["session"], team, founders[i]["user_id"]))
    refused = [r for r in results if isinstance(r, Exception)]
    assert len(refused) == 1 and refused[0].sqlstate == "TL40C"
    roles = owner.execute("SELECT role, count(*) FROM identity.memberships WHERE account_id = %s GROUP BY role ORDER BY role",
                          [team]).fetchall()
    assert roles == [("member", 9), ("owner", 1)]


def test_20_concurrent_accepts_of_one_invitation_make_one_member(owner, connections):
    boss, guest = person(owner, "boss"), person(owner, "guest")
    team = team_of(owner, boss)
    call(owner, "api.invite(%s::uuid, %s::uuid, %s::text, 'member')", boss["session"], team, guest["email"])
    token = owner.execute("SELECT payload ->> 'token' FROM outbox.messages WHERE kind = 'invitation'").fetchone()[0]
    sessions = [guest["session"]] + [owner.execute("SELECT (api.login_succeeded(%s, NULL, '10.8.0.1', 't')) ->> 'session_id'",
                                                   [guest["user_id"]]).fetchone()[0] for _ in range(19)]
    conns = connections(20)
    results = run_concurrently(20, lambda i: call(conns[i], "api.accept_invitation(%s::uuid, %s::text)", sessions[i], token))
    accepted = [r for r in results if not isinstance(r, Exception)]
    assert len(accepted) == 1 and all(r.sqlstate == "TL400" for r in results if isinstance(r, Exception))
    assert owner.execute("SELECT count(*) FROM identity.memberships WHERE account_id = %s", [team]).fetchone()[0] == 2
    assert owner.execute("SELECT count(*) FROM identity.invitations").fetchone()[0] == 0


def test_an_invitation_is_for_its_address_only(owner):
    boss, guest, other = person(owner, "boss"), person(owner, "guest"), person(owner, "other")
    team = team_of(owner, boss)
    call(owner, "api.invite(%s::uuid, %s::uuid, %s::text, 'member')", boss["session"], team, guest["email"])
    first = owner.execute("SELECT payload ->> 'token' FROM outbox.messages WHERE kind = 'invitation'").fetchone()[0]
    assert sqlstate_of(lambda: call(owner, "api.accept_invitation(%s::uuid, %s::text)", other["session"], first)) == "TL403"
    # Sent again: the first link stops, the new one works for the invited address.
    again = call(owner, "api.invite(%s::uuid, %s::uuid, %s::text, 'viewer')", boss["session"], team, guest["email"])
    assert again["sent"] == 2
    second = owner.execute("SELECT payload ->> 'token' FROM outbox.messages WHERE kind = 'invitation' ORDER BY created_at DESC "
                           "LIMIT 1").fetchone()[0]
    assert sqlstate_of(lambda: call(owner, "api.accept_invitation(%s::uuid, %s::text)", guest["session"], first)) == "TL400"
    assert call(owner, "api.accept_invitation(%s::uuid, %s::text)", guest["session"], second)["role"] == "viewer"
    assert sqlstate_of(lambda: call(owner, "api.invite(%s::uuid, %s::uuid, %s::text, 'member')",
                                    boss["session"], team, guest["email"])) == "TL40C"     # a member already
    assert sqlstate_of(lambda: call(owner, "api.invite(%s::uuid, %s::uuid, 'x@example.com', 'member')",
                                    boss["session"], boss["account_id"])) == "TL40C"      # not a team


def test_a_team_has_its_own_credits_and_usage(owner, api_conn, new_account):
    boss, dev = person(owner, "boss"), person(owner, "dev")
    team = team_of(owner, boss)
    join(owner, boss, team, dev, "member")
    owner.execute("SELECT api.grant_credits(%s, %s, 'team-grant')", [team, 3 * CREDIT])
    body = owner.execute("SELECT body FROM api.consume(NULL, %s, 'team-1', 'generation', 12, NULL, NULL, %s)",
                         [dev["session"], team]).fetchone()[0]
    assert body["account_id"] == team and body["charged"] == {"allowance_units": 10, "credits": "2"}
    assert call(owner, "api.balance(NULL, %s::uuid)", dev["session"])["credits"] == "5"     # their own: the sign-up bonus only
    assert reconciliation_problems(owner) == {}


@pytest.mark.parametrize("what", ["consume", "hold", "key"])
def test_a_suspended_account_may_not_spend(owner, api_conn, new_account, what):
    acct = new_account("free", CREDIT)
    owner.execute("UPDATE identity.accounts SET suspended_at = now(), suspended_reason = 'chargebacks' WHERE id = %s",
                  [acct["account_id"]])
    run = {"consume": lambda: consume(api_conn, acct["api_key"], "s"),
           "hold": lambda: api_conn.execute("SELECT * FROM api.hold(%s, NULL, 'h', 'generation')", [acct["api_key"]]),
           "key": lambda: api_conn.execute("SELECT api.checkout_prepare(%s, NULL, 'bundle_10')", [acct["api_key"]])}[what]
    assert sqlstate_of(run) == "TL4S3"
    assert api_conn.execute("SELECT api.balance(%s, NULL)", [acct["api_key"]]).fetchone()[0]["credits"] == "1"


def invitation_token(conn, email: str) -> str:
    return conn.execute("SELECT payload ->> 'token' FROM outbox.messages WHERE kind = 'invitation' AND recipient = %s "
                        "ORDER BY created_at DESC LIMIT 1", [email]).fetchone()[0]


def accept(conn, who: dict, token: str) -> dict:
    """The answer of api.accept_invitation: the account joined, or {"error": ...} (raised errors propagate)."""
    return call(conn, "api.accept_invitation(%s::uuid, %s::text)", who["session"], token)


def pending(conn, team: str) -> int:
    return conn.execute("SELECT count(*) FROM identity.invitations WHERE account_id = %s", [team]).fetchone()[0]


def test_item5_invitations_outlive_their_sender_no_more(owner):
    boss, ops, eve, dan = (person(owner, n) for n in ("boss", "ops", "eve", "dan"))
    team = team_of(owner, boss)
    join(owner, boss, team, ops, "admin")
    call(owner, "api.invite(%s::uuid, %s::uuid, %s::text, 'admin')", ops["session"], team, eve["email"])
    call(owner, "api.invite(%s::uuid, %s::uuid, %s::text, 'member')", ops["session"], team, dan["email"])
    tokens = {who["email"]: invitation_token(owner, who["email"]) for who in (eve, dan)}
    # The admin who sent them is removed: the invitations go with them.
    call(owner, "api.remove_member(%s::uuid, %s::uuid, %s::uuid)", boss["session"], team, ops["user_id"])
    assert call(owner, "api.invitations(%s::uuid, %s::uuid)", boss["session"], team)["data"] == []
    assert sqlstate_of(lambda: accept(owner, eve, tokens[eve["email"]])) == "TL400"
    members = owner.execute("SELECT user_id::text FROM identity.memberships WHERE account_id = %s", [team]).fetchall()
    assert members == [(boss["user_id"],)]


def test_item5_a_demoted_inviter_keeps_only_the_invitations_their_role_still_allows(owner):
    boss, deputy, eve, dan = (person(owner, n) for n in ("boss", "deputy", "eve", "dan"))
    team = team_of(owner, boss)
    join(owner, boss, team, deputy, "owner")
    call(owner, "api.invite(%s::uuid, %s::uuid, %s::text, 'owner')", deputy["session"], team, eve["email"])
    call(owner, "api.invite(%s::uuid, %s::uuid, %s::text, 'member')", deputy["session"], team, dan["email"])
    call(owner, "api.set_member_role(%s::uuid, %s::uuid, %s::uuid, 'admin')", boss["session"], team, deputy["user_id"])
    # An admin may not make owners: that invitation is revoked; an admin may invite members: that one stays.
    assert [i["email"] for i in call(owner, "api.invitations(%s::uuid, %s::uuid)", boss["session"], team)["data"]] == [dan["email"]]
    assert sqlstate_of(lambda: accept(owner, eve, invitation_token(owner, eve["email"]))) == "TL400"
    assert accept(owner, dan, invitation_token(owner, dan["email"]))["role"] == "member"


def test_item5_acceptance_checks_the_inviters_role_now(owner):
    boss, ops, eve = (person(owner, n) for n in ("boss", "ops", "eve"))
    team = team_of(owner, boss)
    join(owner, boss, team, ops, "admin")
    call(owner, "api.invite(%s::uuid, %s::uuid, %s::text, 'admin')", ops["session"], team, eve["email"])
    token = invitation_token(owner, eve["email"])
    # A DBA demotes the admin behind the functions' back: the invitation is still there, but void.
    owner.execute("UPDATE identity.memberships SET role = 'viewer' WHERE account_id = %s AND user_id = %s", [team, ops["user_id"]])
    answer = accept(owner, eve, token)
    assert answer["error"]["sqlstate"] == "TL400"
    assert pending(owner, team) == 0                      # used up: the refusal committed its claim
    assert owner.execute("SELECT count(*) FROM identity.memberships WHERE account_id = %s", [team]).fetchone()[0] == 2


def test_item5_an_acceptance_waits_for_the_removal_of_its_sender(owner, db_url, connections):
    import threading
    import time

    import psycopg

    from api import db

    boss, ops, eve = (person(owner, n) for n in ("boss", "ops", "eve"))
    team = team_of(owner, boss)
    join(owner, boss, team, ops, "admin")
    call(owner, "api.invite(%s::uuid, %s::uuid, %s::text, 'admin')", ops["session"], team, eve["email"])
    token = invitation_token(owner, eve["email"])
    (accepting,) = connections(1)
    with psycopg.connect(db.api_conninfo(db_url)) as removing:               # a transaction left open
        call(removing, "api.remove_member(%s::uuid, %s::uuid, %s::uuid)", boss["session"], team, ops["user_id"])
        pid = accepting.info.backend_pid
        result: list = []
        thread = threading.Thread(target=lambda: result.append(run_concurrently(1, lambda _: accept(accepting, eve, token))[0]))
        thread.start()
        for _ in range(200):
            if owner.execute("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()[0]:
                break
            time.sleep(0.02)
        assert thread.is_alive(), "the acceptance did not wait for the removal"
        removing.commit()
    thread.join(10)
    (answer,) = result
    assert getattr(answer, "sqlstate", None) == "TL400", answer
    assert owner.execute("SELECT count(*) FROM identity.memberships WHERE account_id = %s", [team]).fetchone()[0] == 1
