"""The single-use claims of the OpenID Connect provider (issue 25) under concurrency, with real
connections as the API role."""

from __future__ import annotations

import base64
import hashlib

import psycopg

from api import db
from tests.conftest import run_concurrently

WEB = "https://web.example.org/callback"


def test_item1_an_authorization_code_is_exchanged_once_among_many_concurrent_tries(owner, db_url):
    (app,) = owner.execute("SELECT api.oidc_create_client('Web', %s, true, true)", [[WEB]]).fetchone()
    owner.execute("SELECT api.signup('ada@example.com', 'argon2-hash', NULL, NULL)")
    (user_id,) = owner.execute("SELECT id FROM identity.users").fetchone()
    (browser,) = owner.execute("SELECT api.login_succeeded(%s, NULL, NULL, NULL)", [user_id]).fetchone()
    verifier = "v" * 64
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    (found,) = owner.execute("SELECT api.oidc_authorize(%s, %s, %s, 'code', 'openid', %s, 'S256', 'n', NULL, NULL, NULL)",
                             [browser["session_id"], app["client_id"], WEB, challenge]).fetchone()

    def exchange(_: int) -> dict:
        with psycopg.connect(db.api_conninfo(db_url), autocommit=True) as conn:
            return conn.execute("SELECT api.oidc_token_code(%s, NULL, %s, %s, %s, NULL, NULL)",
                                [app["client_id"], found["code"], WEB, verifier]).fetchone()[0]

    results = run_concurrently(16, exchange)
    winners = [r for r in results if "session_id" in r]
    assert len(winners) == 1 and winners[0]["id_token"]["nonce"] == "n"
    assert all(r["oauth_error"]["error"] == "invalid_grant" for r in results if r not in winners)
    # The others were replays of a used code: the session the winner got is revoked (RFC 6749 4.1.2).
    assert owner.execute("SELECT revoked_reason FROM identity.sessions WHERE id = %s",
                         [winners[0]["session_id"]]).fetchone() == ("code_replay",)


def test_item1_old_authorization_codes_are_forgotten_as_new_ones_are_made(owner):
    (app,) = owner.execute("SELECT api.oidc_create_client('Web', %s, false, true)", [[WEB]]).fetchone()
    owner.execute("SELECT api.signup('bea@example.com', 'argon2-hash', NULL, NULL)")
    (user_id,) = owner.execute("SELECT id FROM identity.users").fetchone()
    (browser,) = owner.execute("SELECT api.login_succeeded(%s, NULL, NULL, NULL)", [user_id]).fetchone()

    def authorize():
        owner.execute("SELECT api.oidc_authorize(%s, %s, %s, 'code', 'openid', NULL, NULL, NULL, NULL, NULL, NULL)",
                      [browser["session_id"], app["client_id"], WEB])

    authorize()
    authorize()
    owner.execute("UPDATE identity.authorization_codes SET expires_at = now() - interval '25 hours'")
    authorize()
    assert owner.execute("SELECT count(*) FROM identity.authorization_codes").fetchone()[0] == 1
