"""Sign-up, login, tokens, sessions, email, password reset, devices and API keys over HTTP,
with email caught by a real SMTP server."""

from __future__ import annotations

import asyncio
import hashlib
import time

import pytest
from argon2 import PasswordHasher
from joserfc import jwt
from joserfc.jwk import OctKey

from tests.conftest import reconciliation_problems
from tests.http.conftest import PUBLIC_URL, bearer

PASSWORD = "violet-harbour-tangent-42"
PROBLEM = "application/problem+json"


async def signup(client, email="ada@example.com", password=PASSWORD, **headers):
    return await client.post("/v1/auth/signup", json={"email": email, "password": password}, headers=headers)


async def login(client, email="ada@example.com", password=PASSWORD, **headers):
    return await client.post("/v1/auth/login", json={"email": email, "password": password}, headers=headers)


async def signed_in(client, email="ada@example.com") -> dict:
    assert (await signup(client, email)).status_code == 202
    r = await login(client, email)
    assert r.status_code == 200, r.text
    return r.json()


async def test_signup_verify_login_me(client, smtp, deliver, owner):
    r = await signup(client, "Ada@Example.com")
    assert r.status_code == 202
    assert r.json() == {"email": "ada@example.com", "status": "verification_email_sent", "valid_for": "24 hours"}
    assert await deliver() == 1
    (mail,) = smtp.to("ada@example.com")
    assert mail["Subject"] == "Confirm your email address"
    assert f"{PUBLIC_URL}/verify-email?token=" in mail.get_content()
    token = smtp.token("ada@example.com", "Confirm")

    r = await client.post("/v1/auth/verify-email", json={"token": token})
    assert r.status_code == 200 and r.json()["email_verified"] is True
    r = await client.post("/v1/auth/verify-email", json={"token": token})
    assert r.status_code == 400 and r.headers["content-type"].startswith(PROBLEM)

    tokens = (await login(client, "ADA@example.com")).json()
    assert tokens["token_type"] == "bearer" and tokens["expires_in"] == 900
    me = (await client.get("/v1/me", headers=bearer(tokens["access_token"]))).json()
    assert me["user"]["email"] == "Ada@Example.com" and me["user"]["email_verified"] is True
    assert me["account"]["plan"] == "free"
    # The delivered message no longer holds its token.
    assert owner.execute("SELECT count(*) FROM outbox.messages WHERE payload ? 'token'").fetchone()[0] == 0


async def test_signup_with_a_registered_email_looks_the_same(client, smtp, deliver, owner):
    first = await signup(client)
    again = await signup(client, "ADA@example.com", "another-long-passphrase-77")
    assert (again.status_code, again.json()) == (first.status_code, first.json())
    await deliver()
    assert [m["Subject"] for m in smtp.to("ada@example.com")] == ["Confirm your email address",
                                                                  "You already have an account"]
    assert owner.execute("SELECT count(*) FROM identity.users").fetchone()[0] == 1
    assert (await login(client, password="another-long-passphrase-77")).status_code == 401


async def test_concurrent_signups_with_one_email_make_one_user(client, owner):
    responses = await asyncio.gather(*[signup(client) for _ in range(5)])
    assert {r.status_code for r in responses} == {202}
    assert owner.execute("SELECT count(*) FROM identity.users").fetchone()[0] == 1
    assert owner.execute("SELECT count(*) FROM identity.accounts").fetchone()[0] == 1


async def test_unknown_user_and_wrong_password_are_indistinguishable(client, owner):
    await signup(client)
    wrong = await login(client, password="not-the-password-at-all")
    unknown = await login(client, email="nobody@example.com")
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json()
    kinds = [r[0] for r in owner.execute("SELECT kind FROM identity.auth_events ORDER BY id")]
    assert kinds.count("login_failed") == 2


@pytest.mark.parametrize("password, fragment", [
    ("short", "at least 8"),
    ("password123", "common"),
    ("qwertyuiop", "common"),
    ("x" * 1025, "1024"),
])
async def test_weak_passwords_are_refused(client, owner, password, fragment):
    r = await signup(client, password=password)
    assert r.status_code in (400, 422) and r.headers["content-type"].startswith(PROBLEM)
    assert fragment in r.text
    assert owner.execute("SELECT count(*) FROM identity.users").fetchone()[0] == 0


async def test_a_128_character_password_is_kept_exactly(client):
    password = hashlib.sha256(b"pgtally").hexdigest() * 2          # 128 characters
    assert (await signup(client, password=password)).status_code == 202
    assert (await login(client, password=password)).status_code == 200
    assert (await login(client, password=password[:-1])).status_code == 401
    assert (await login(client, password=password + " ")).status_code == 401


async def test_login_rehashes_when_argon2_parameters_change(client, owner):
    await signup(client)
    old = PasswordHasher(time_cost=1, memory_cost=8192).hash(PASSWORD)
    owner.execute("UPDATE identity.users SET password_hash = %s", [old])
    assert (await login(client)).status_code == 200
    new = owner.execute("SELECT password_hash FROM identity.users").fetchone()[0]
    assert new != old and not PasswordHasher().check_needs_rehash(new)
    assert owner.execute("SELECT count(*) FROM identity.auth_events WHERE kind = 'password_rehashed'").fetchone()[0] == 1


async def test_refresh_rotates_and_reuse_revokes_the_family(client, owner):
    tokens = await signed_in(client)
    r = await client.post("/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert r.status_code == 200
    rotated = r.json()
    assert rotated["refresh_token"] != tokens["refresh_token"]
    assert (await client.get("/v1/me", headers=bearer(rotated["access_token"]))).status_code == 200

    # The first token was used; once the grace window has passed, presenting it is reuse.
    owner.execute("UPDATE identity.refresh_tokens SET used_at = used_at - interval '1 minute' WHERE used_at IS NOT NULL")
    r = await client.post("/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
    # The whole family is gone: the newest refresh token and the access tokens stop working.
    assert (await client.post("/v1/auth/refresh", json={"refresh_token": rotated["refresh_token"]})).status_code == 401
    assert (await client.get("/v1/me", headers=bearer(rotated["access_token"]))).status_code == 401
    assert owner.execute("SELECT count(*) FROM identity.auth_events WHERE kind = 'refresh_token_reuse'").fetchone()[0] == 1


async def test_concurrent_refreshes_within_the_grace_window_continue_one_chain(client, owner):
    tokens = await signed_in(client)
    old = {"refresh_token": tokens["refresh_token"]}
    responses = await asyncio.gather(*[client.post("/v1/auth/refresh", json=old) for _ in range(20)])
    assert [r.status_code for r in responses] == [200] * 20
    successors = {r.json()["refresh_token"] for r in responses}
    assert len(successors) == 1                             # one chain, not 20
    assert owner.execute("SELECT count(*) FROM identity.refresh_tokens WHERE used_at IS NULL").fetchone()[0] == 1
    # A retry inside the grace window still gets that same successor; the chain goes on from it.
    assert (await client.post("/v1/auth/refresh", json=old)).json()["refresh_token"] in successors
    (successor,) = successors
    later = await client.post("/v1/auth/refresh", json={"refresh_token": successor})
    assert later.status_code == 200 and later.json()["refresh_token"] not in successors | {old["refresh_token"]}
    # Outside the grace window, the first token is reuse: the whole family is revoked.
    owner.execute("UPDATE identity.refresh_tokens SET used_at = used_at - interval '1 minute' WHERE used_at IS NOT NULL")
    assert (await client.post("/v1/auth/refresh", json=old)).status_code == 401
    assert (await client.post("/v1/auth/refresh", json={"refresh_token": later.json()["refresh_token"]})).status_code == 401


async def test_unknown_refresh_token_is_401(client):
    r = await client.post("/v1/auth/refresh", json={"refresh_token": "rt_nothing"})
    assert r.status_code == 401 and r.headers["content-type"].startswith(PROBLEM)


async def test_logout_sessions_and_logout_all(client):
    first = await signed_in(client)
    second = (await login(client)).json()
    listed = (await client.get("/v1/me/sessions", headers=bearer(first["access_token"]))).json()["data"]
    assert len(listed) == 2 and sum(s["current"] for s in listed) == 1
    assert {s["method"] for s in listed} == {"password"}

    other = next(s["id"] for s in listed if not s["current"])
    r = await client.delete(f"/v1/me/sessions/{other}", headers=bearer(first["access_token"]))
    assert r.status_code == 200
    assert (await client.get("/v1/me", headers=bearer(second["access_token"]))).status_code == 401
    r = await client.delete(f"/v1/me/sessions/{other}", headers=bearer(first["access_token"]))
    assert r.status_code == 404

    third = (await login(client)).json()
    assert (await client.post("/v1/auth/logout", headers=bearer(first["access_token"]))).status_code == 200
    assert (await client.get("/v1/me", headers=bearer(first["access_token"]))).status_code == 401
    assert (await client.post("/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})).status_code == 401
    assert (await client.get("/v1/me", headers=bearer(third["access_token"]))).status_code == 200

    fourth = (await login(client)).json()
    r = await client.post("/v1/auth/logout-all", headers=bearer(fourth["access_token"]))
    assert r.json()["sessions_revoked"] == 2
    assert (await client.get("/v1/me", headers=bearer(third["access_token"]))).status_code == 401


async def test_password_reset_revokes_every_session(client, smtp, deliver, owner):
    tokens = await signed_in(client)
    known = await client.post("/v1/auth/password-reset", json={"email": "ada@example.com"})
    unknown = await client.post("/v1/auth/password-reset", json={"email": "nobody@example.com"})
    assert known.status_code == unknown.status_code == 202
    assert known.json().keys() == unknown.json().keys() and known.json()["status"] == unknown.json()["status"]
    await deliver()
    assert smtp.to("nobody@example.com") == []
    token = smtp.token("ada@example.com", "Reset")
    # Delivered links are redacted from the outbox: no token stays in the database in plaintext.
    assert owner.execute("SELECT count(*) FROM outbox.messages WHERE payload::text LIKE %s",
                         [f"%{token}%"]).fetchone()[0] == 0

    r = await client.post("/v1/auth/password-reset/confirm", json={"token": token, "password": "quartz-meadow-lantern-9"})
    assert r.status_code == 200 and r.json()["sessions_revoked"] == 1
    assert (await client.get("/v1/me", headers=bearer(tokens["access_token"]))).status_code == 401
    assert (await client.post("/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})).status_code == 401
    assert (await login(client)).status_code == 401
    assert (await login(client, password="quartz-meadow-lantern-9")).status_code == 200
    r = await client.post("/v1/auth/password-reset/confirm", json={"token": token, "password": "another-fine-phrase-3"})
    assert r.status_code == 400
    events = owner.execute("SELECT detail::text FROM identity.auth_events").fetchall()
    assert not any(token in d or PASSWORD in d for (d,) in events)


async def test_two_redemptions_of_one_reset_token_have_one_winner(client, smtp, deliver):
    await signup(client)
    await client.post("/v1/auth/password-reset", json={"email": "ada@example.com"})
    await deliver()
    token = smtp.token("ada@example.com", "Reset")
    responses = await asyncio.gather(*[
        client.post("/v1/auth/password-reset/confirm", json={"token": token, "password": f"winner-takes-all-{i}x"})
        for i in range(2)])
    assert sorted(r.status_code for r in responses) == [200, 400]


async def test_reset_emails_are_throttled_per_address(frozen_db_clock, client, smtp, deliver):
    await signup(client)
    for _ in range(5):
        assert (await client.post("/v1/auth/password-reset", json={"email": "ada@example.com"})).status_code == 202
    await deliver()
    assert len([m for m in smtp.to("ada@example.com") if m["Subject"] == "Reset your password"]) == 3


async def test_signup_and_login_are_rate_limited_per_ip_and_account(frozen_db_clock, client):
    for i in range(10):
        assert (await signup(client, f"user{i}@example.com")).status_code == 202
    r = await signup(client, "user10@example.com")
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    assert r.headers["content-type"].startswith(PROBLEM) and r.json()["retry_after"] > 0

    for _ in range(10):
        await login(client, "user1@example.com", "wrong-password-guess")
    r = await login(client, "user1@example.com")
    assert r.status_code == 429 and "retry-after" in r.headers


async def test_rate_limits_hold_across_server_processes(frozen_db_clock, client, db_url, settings):
    from litestar.testing import AsyncTestClient

    from api.app import create_app

    async with AsyncTestClient(app=create_app(db_url, settings)) as second_server:
        servers = [client, second_server] * 5
        responses = await asyncio.gather(*[signup(server, f"user{i}@example.com") for i, server in enumerate(servers)])
        assert {r.status_code for r in responses} == {202}
        assert (await signup(second_server, "one-too-many@example.com")).status_code == 429
        assert (await signup(client, "one-more@example.com")).status_code == 429


async def test_signups_are_rate_limited_per_address(frozen_db_clock, client, owner):
    for _ in range(5):
        assert (await signup(client, "ada@example.com")).status_code == 202
    (created,) = owner.execute("SELECT created_at FROM identity.users").fetchone()
    assert created.isoformat().startswith("2026-06-15T12:02:30")          # the frozen clock is in force
    assert (await signup(client, "ADA@example.com")).status_code == 429
    assert (await signup(client, "bob@example.com")).status_code == 202


async def test_anonymous_device_meters_then_merges_into_the_user_once(client, owner, new_account):
    r = await client.post("/v1/identify", json={"fingerprint": "ext-install-7f3a"})
    assert r.status_code == 201
    device = r.json()
    for i in range(3):
        r = await client.post("/v1/usage/events", json={"meter": "generation"},
                              headers=bearer(device["access_token"], **{"Idempotency-Key": f"d{i}"}))
        assert r.status_code == 201
    assert r.json()["allowance"]["limit"] == 5
    device_account = (await client.get("/v1/me", headers=bearer(device["access_token"]))).json()["account"]
    assert device_account["kind"] == "device" and device_account["plan"] == "anonymous"
    owner.execute("SELECT api.grant_credits(%s, 2000000, 'welcome')", [device_account["id"]])

    # Sign up with the device's token: its usage and credits move to the new account, once.
    assert (await signup(client, **bearer(device["access_token"]))).status_code == 202
    user = (await login(client, **bearer(device["access_token"]))).json()
    balance = (await client.get("/v1/balance", headers=bearer(user["access_token"]))).json()
    assert balance["credits"] == "2" and balance["allowances"][0]["used"] == 3
    assert (await client.get("/v1/me", headers=bearer(device["access_token"]))).status_code == 401
    assert owner.execute("SELECT count(*) FROM identity.auth_events WHERE kind = 'device_merged'").fetchone()[0] == 1
    assert owner.execute("SELECT count(*) FROM metering.usage_events WHERE account_id = %s",
                         [user_account := balance["account_id"]]).fetchone()[0] == 3
    assert user_account != device_account["id"]
    # The device's idempotency keys moved with its events: a late retry replays, charging nothing.
    r = await client.post("/v1/usage/events", json={"meter": "generation"},
                          headers=bearer(user["access_token"], **{"Idempotency-Key": "d2"}))
    assert r.status_code == 200 and r.headers["Idempotent-Replayed"] == "true"
    assert owner.execute("SELECT count(*) FROM metering.idempotency_keys WHERE account_id = %s",
                         [user_account]).fetchone()[0] == 3
    assert reconciliation_problems(owner) == {}


async def test_concurrent_logins_with_one_device_merge_it_once(client, owner):
    await signup(client)
    device = (await client.post("/v1/identify", json={"fingerprint": "cli-1"})).json()
    owner.execute("SELECT api.grant_credits((SELECT account_id FROM identity.sessions WHERE revoked_at IS NULL "
                  "AND user_id IS NULL), 1000000, 'g')")
    responses = await asyncio.gather(*[login(client, **bearer(device["access_token"])) for _ in range(6)])
    assert {r.status_code for r in responses} == {200}
    me = (await client.get("/v1/balance", headers=bearer(responses[0].json()["access_token"]))).json()
    assert me["credits"] == "1"
    assert owner.execute("SELECT count(*) FROM identity.auth_events WHERE kind = 'device_merged'").fetchone()[0] == 1
    assert reconciliation_problems(owner) == {}


async def test_identify_is_limited_per_fingerprint(frozen_db_clock, client):
    for _ in range(5):
        assert (await client.post("/v1/identify", json={"fingerprint": "same"})).status_code == 201
    r = await client.post("/v1/identify", json={"fingerprint": "same"})
    assert r.status_code == 429
    assert (await client.post("/v1/identify", json={"fingerprint": "other"})).status_code == 201


async def test_api_keys_are_shown_once_checked_and_revocable(client, owner):
    tokens = await signed_in(client)
    r = await client.post("/v1/api-keys", json={"name": "ci", "scopes": ["usage:read"]},
                          headers=bearer(tokens["access_token"]))
    assert r.status_code == 201
    created = r.json()
    key = created["api_key"]
    assert key.startswith("pgt_") and len(key) == 76 and created["scopes"] == ["usage:read"]
    assert owner.execute("SELECT count(*) FROM identity.api_keys WHERE key_hash = sha256(convert_to(%s, 'UTF8'))",
                         [key]).fetchone()[0] == 1

    assert (await client.get("/v1/balance", headers=bearer(key))).status_code == 200
    r = await client.post("/v1/usage/events", json={"meter": "generation"}, headers=bearer(key, **{"Idempotency-Key": "k"}))
    assert r.status_code == 403                                     # read-only key
    mistyped = key[:10] + ("a" if key[10] != "a" else "b") + key[11:]
    r = await client.get("/v1/balance", headers=bearer(mistyped))
    assert r.status_code == 401 and "checksum" in r.json()["detail"]

    listed = (await client.get("/v1/api-keys", headers=bearer(tokens["access_token"]))).json()["data"]
    mine = next(k for k in listed if k["id"] == created["id"])
    assert "api_key" not in mine and mine["last_used_at"] is not None and mine["display"].startswith("pgt_")

    assert (await client.post("/v1/api-keys", json={"name": "x"}, headers=bearer(key))).status_code == 403
    assert (await client.delete(f"/v1/api-keys/{created['id']}", headers=bearer(tokens["access_token"]))).status_code == 200
    assert (await client.get("/v1/balance", headers=bearer(key))).status_code == 401
    kinds = {r[0] for r in owner.execute("SELECT kind FROM identity.auth_events")}
    assert {"api_key_created", "api_key_revoked"} <= kinds


async def test_api_key_input_is_validated(client):
    tokens = await signed_in(client)
    for body in [{"name": ""}, {"name": "x", "scopes": ["service"]}, {"name": "x", "scopes": []},
                 {"name": "x", "expires_at": "2001-01-01T00:00:00Z"}, {"name": "x", "colour": "red"}]:
        r = await client.post("/v1/api-keys", json=body, headers=bearer(tokens["access_token"]))
        assert r.status_code in (400, 422), body


async def test_anonymous_devices_cannot_create_api_keys(client):
    device = (await client.post("/v1/identify", json={"fingerprint": "f"})).json()
    r = await client.post("/v1/api-keys", json={"name": "x"}, headers=bearer(device["access_token"]))
    assert r.status_code == 403


async def test_service_keys_meter_on_behalf_of_any_account(client, new_account, owner):
    service = owner.execute("SELECT api.create_account('free', 0, 'backend', 'service')").fetchone()[0]["api_key"]
    customer = new_account("free")
    r = await client.post("/v1/usage/events", json={"meter": "generation", "account_id": customer["account_id"]},
                          headers=bearer(service, **{"Idempotency-Key": "svc-1"}))
    assert r.status_code == 201 and r.json()["account_id"] == customer["account_id"]
    r = await client.get("/v1/balance", params={"account_id": customer["account_id"]}, headers=bearer(service))
    assert r.json()["allowances"][0]["used"] == 1
    other = new_account("free")
    r = await client.post("/v1/usage/events", json={"meter": "generation", "account_id": other["account_id"]},
                          headers=bearer(customer["api_key"], **{"Idempotency-Key": "x"}))
    assert r.status_code == 403


async def test_a_forged_or_expired_access_token_is_401(client, owner):
    tokens = await signed_in(client)
    kid, secret = owner.execute("SELECT kid, secret FROM identity.jwt_keys").fetchone()
    claims = jwt.decode(tokens["access_token"], OctKey.import_key(bytes(secret))).claims
    expired = jwt.encode({"alg": "HS256", "kid": kid}, {**claims, "exp": int(time.time()) - 60},
                         OctKey.import_key(bytes(secret)))
    assert (await client.get("/v1/me", headers=bearer(expired))).status_code == 401
    other_audience = jwt.encode({"alg": "HS256", "kid": kid}, {**claims, "aud": "someone-else"},
                                OctKey.import_key(bytes(secret)))
    assert (await client.get("/v1/me", headers=bearer(other_audience))).status_code == 401
    header, payload, signature = tokens["access_token"].split(".")
    # A changed character in the middle (the last one may differ only in unused padding bits).
    forged = f"{header}.{payload}.{signature[:10]}{'B' if signature[10] == 'A' else 'A'}{signature[11:]}"
    assert (await client.get("/v1/me", headers=bearer(forged))).status_code == 401
    none_alg = "eyJhbGciOiJub25lIn0." + payload + "."
    assert (await client.get("/v1/me", headers=bearer(none_alg))).status_code == 401


async def test_failed_delivery_is_retried_later(client, owner, db_url, settings):
    from dataclasses import replace

    import psycopg

    from api import db
    from api.worker import deliver_due

    await signup(client)
    broken = replace(settings, smtp_url="smtp://127.0.0.1:9")      # nothing listens on the discard port
    async with await psycopg.AsyncConnection.connect(db.api_conninfo(db_url), autocommit=True) as conn:
        assert await deliver_due(conn, broken) == 1
        assert await deliver_due(conn, broken) == 0                  # not due again yet
    attempts, delivered, error, later = owner.execute(
        "SELECT attempts, delivered_at, last_error, next_attempt_at > now() FROM outbox.messages").fetchone()
    assert (attempts, delivered, later) == (1, None, True) and error


async def test_usage_warnings_are_emailed_to_a_verified_user(client, smtp, deliver):
    tokens = await signed_in(client)
    for i in range(8):
        r = await client.post("/v1/usage/events", json={"meter": "generation"},
                              headers=bearer(tokens["access_token"], **{"Idempotency-Key": f"w{i}"}))
    assert r.json()["warnings"][0]["threshold_percent"] == 80
    await deliver()
    assert [m["Subject"] for m in smtp.to("ada@example.com")] == ["Confirm your email address"]   # not verified yet

    r = await client.post("/v1/auth/verify-email", json={"token": smtp.token("ada@example.com", "Confirm")})
    assert r.status_code == 200
    r = await client.post("/v1/usage/events", json={"meter": "generation", "quantity": 2},
                          headers=bearer(tokens["access_token"], **{"Idempotency-Key": "w-last"}))
    assert [w["threshold_percent"] for w in r.json()["warnings"]] == [100], r.text
    assert await deliver() == 1
    (warning,) = [m for m in smtp.to("ada@example.com") if m["Subject"] == "Your generation usage"]
    assert "allowance of 10 is used up" in warning.get_content()
    assert f"{PUBLIC_URL}/upgrade" in warning.get_content()


@pytest.mark.parametrize("path, body", [
    ("/v1/auth/signup", {"email": "a\x00@example.com", "password": PASSWORD}),
    ("/v1/auth/login", {"email": "a\x00@example.com", "password": PASSWORD}),
    ("/v1/auth/password-reset", {"email": "a\x00@example.com"}),
    ("/v1/auth/verify-email", {"token": "abc\x00"}),
    ("/v1/auth/password-reset/confirm", {"token": "abc\x00", "password": PASSWORD}),
    ("/v1/auth/refresh", {"refresh_token": "rt_\x00"}),
    ("/v1/identify", {"fingerprint": "fp\x00"}),
])
async def test_nul_characters_are_refused_with_422_and_change_nothing(client, owner, path, body):
    r = await client.post(path, json=body)
    assert r.status_code == 422 and r.headers["content-type"].startswith(PROBLEM), r.text
    assert "NUL" in r.json()["detail"]
    assert owner.execute("SELECT (SELECT count(*) FROM identity.users) + (SELECT count(*) FROM identity.accounts)"
                         " + (SELECT count(*) FROM identity.auth_events)").fetchone()[0] == 0


async def test_nul_in_an_api_key_name_is_422(client):
    tokens = await signed_in(client)
    r = await client.post("/v1/api-keys", json={"name": "lap\x00top"}, headers=bearer(tokens["access_token"]))
    assert r.status_code == 422 and "NUL" in r.json()["detail"], r.text


INSTALL = "k3Jq9v0Xw2bT6yP1sN8dLm4rA7cE5fGh"   # 32 URL-safe characters: 192 bits


async def test_the_same_install_gets_the_same_device_account_every_time(frozen_db_clock, client, owner):
    answers = [await client.post("/v1/identify", json={"install_id": INSTALL, "fingerprint": "fp", "meter": "generation"})
               for _ in range(12)]
    assert {r.status_code for r in answers} == {201}, answers[-1].text
    assert len({r.json()["account_id"] for r in answers}) == 1
    assert [r.json()["returning"] for r in answers] == [False] + [True] * 11
    body = answers[0].json()
    assert body["plan"] == "anonymous" and body["can_use"] is True and body["credits"] == "0"
    assert body["allowance"]["remaining"] == 5 and body["resets_at"] == body["allowance"]["resets_at"]
    assert body["upgrade_url"].startswith(f"{PUBLIC_URL}/upgrade?token=") and body["token_type"] == "bearer"
    assert str(client.app.state.jwt_keys.upgrade_account(body["upgrade_url"].split("token=")[1])) == body["account_id"]
    assert owner.execute("SELECT count(*) FROM identity.accounts WHERE kind = 'device'").fetchone()[0] == 1
    # The install id is stored only as its hash.
    assert owner.execute("SELECT count(*) FROM identity.accounts WHERE device_install_hash = sha256(%s::bytea)",
                         [INSTALL.encode()]).fetchone()[0] == 1

    for i in range(5):
        r = await client.post("/v1/usage/events", json={"meter": "generation"},
                              headers=bearer(body["access_token"], **{"Idempotency-Key": f"u{i}"}))
        assert r.status_code == 201
    again = (await client.post("/v1/identify", json={"install_id": INSTALL, "meter": "generation"})).json()
    assert again["can_use"] is False and again["allowance"]["remaining"] == 0


@pytest.mark.parametrize("body", [{"install_id": "short"}, {"install_id": "x" * 21}, {"install_id": "not base64url!" * 3},
                                  {}, {"install_id": INSTALL, "meter": "nope"}])
async def test_identify_refuses_a_weak_install_id_or_unknown_meter(client, owner, body):
    r = await client.post("/v1/identify", json=body)
    assert r.status_code == 422 and r.headers["content-type"].startswith(PROBLEM), r.text
    assert owner.execute("SELECT count(*) FROM identity.accounts").fetchone()[0] == 0


async def test_item1_installs_keep_their_person_until_they_sign_out_of_that_install(client, owner):
    device = (await client.post("/v1/identify", json={"install_id": INSTALL, "meter": "generation"})).json()
    assert (await signup(client, **bearer(device["access_token"]))).status_code == 202
    person = (await login(client)).json()
    mine = (await client.get("/v1/me", headers=bearer(person["access_token"]))).json()

    # The same install, many times at once: always the person's account and plan, never a new quota.
    answers = await asyncio.gather(*[client.post("/v1/identify", json={"install_id": INSTALL, "meter": "generation"})
                                     for _ in range(6)])
    assert {r.status_code for r in answers} == {201}, answers[0].text
    bodies = [r.json() for r in answers]
    assert {b["account_id"] for b in bodies} == {mine["account"]["id"]} != {device["account_id"]}
    assert all(b["returning"] and b["plan"] == "free" and b["can_use"] is True for b in bodies)
    assert bodies[0]["allowance"]["limit"] != 5          # the free plan's allowance, not the anonymous one
    assert str(client.app.state.jwt_keys.upgrade_account(bodies[0]["upgrade_url"].split("token=")[1])) == mine["account"]["id"]
    me = (await client.get("/v1/me", headers=bearer(bodies[0]["access_token"]))).json()
    assert me["user"]["email"] == "ada@example.com" and me["account"]["id"] == mine["account"]["id"]
    # It meters and reads as the person; it manages nothing (the install id alone opened it).
    r = await client.post("/v1/usage/events", json={"meter": "generation"},
                          headers=bearer(bodies[0]["access_token"], **{"Idempotency-Key": "linked-1"}))
    assert r.status_code == 201 and r.json()["account_id"] == mine["account"]["id"], r.text
    r = await client.post("/v1/api-keys", json={"name": "x"}, headers=bearer(bodies[0]["access_token"]))
    assert r.status_code == 403, r.text
    assert owner.execute("SELECT count(*) FROM identity.accounts WHERE kind = 'device'").fetchone()[0] == 1

    # Signing out of that install ends the link (and the install's other sessions); the person's
    # own sign-in stays; the next identify is a fresh anonymous account.
    assert (await client.post("/v1/auth/logout", headers=bearer(bodies[0]["access_token"]))).status_code == 200
    assert {(await client.get("/v1/me", headers=bearer(b["access_token"]))).status_code for b in bodies} == {401}
    assert (await client.get("/v1/me", headers=bearer(person["access_token"]))).status_code == 200
    after = (await client.post("/v1/identify", json={"install_id": INSTALL})).json()
    assert after["account_id"] not in (mine["account"]["id"], device["account_id"])
    assert after["returning"] is False and after["plan"] == "anonymous"


async def test_item1_an_install_unlinked_from_the_session_list_starts_afresh(client, owner):
    device = (await client.post("/v1/identify", json={"install_id": INSTALL})).json()
    person = await signed_in(client)
    assert (await login(client, **bearer(device["access_token"]))).status_code == 200
    linked = (await client.post("/v1/identify", json={"install_id": INSTALL})).json()
    me = (await client.get("/v1/me", headers=bearer(linked["access_token"]))).json()
    assert me["user"] is not None and linked["returning"] is True
    r = await client.delete(f"/v1/me/sessions/{me['session_id']}", headers=bearer(person["access_token"]))
    assert r.status_code == 200, r.text
    after = (await client.post("/v1/identify", json={"install_id": INSTALL})).json()
    assert after["account_id"] != linked["account_id"] and after["returning"] is False and after["plan"] == "anonymous"
