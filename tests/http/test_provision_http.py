"""Provisioning for a product with its own auth (issue 25): a service key with accounts:write
creates or finds an account by the product's external_id, then meters on its behalf."""

from __future__ import annotations

import asyncio

from tests.http.conftest import bearer

PROBLEM = "application/problem+json"


def service_key(owner) -> str:
    """A service account's key: `pgtally accounts create --kind service` (scopes include accounts:write)."""
    return owner.execute("SELECT api.create_account('free', 0, 'the product', 'service')").fetchone()[0]["api_key"]


async def test_item2_a_service_key_provisions_an_account_by_external_id_and_meters_for_it(client, owner, new_account):
    key = service_key(owner)
    answers = await asyncio.gather(*[client.post("/v1/accounts/provision", json={"external_id": "user_2abc", "name": "Ada"},
                                                 headers=bearer(key)) for _ in range(8)])
    assert sorted(r.status_code for r in answers) == [200] * 7 + [201], answers[0].text
    bodies = [r.json() for r in answers]
    assert len({b["account_id"] for b in bodies}) == 1 and sum(b["created"] for b in bodies) == 1
    assert bodies[0]["external_id"] == "user_2abc" and bodies[0]["plan"] == "free" and bodies[0]["name"] == "Ada"
    account_id = bodies[0]["account_id"]
    assert owner.execute("SELECT count(*) FROM identity.accounts WHERE external_id = 'user_2abc'").fetchone()[0] == 1

    r = await client.post("/v1/usage/events", json={"meter": "generation", "account_id": account_id},
                          headers=bearer(key, **{"Idempotency-Key": "p-1"}))
    assert r.status_code == 201 and r.json()["account_id"] == account_id, r.text
    other = (await client.post("/v1/accounts/provision", json={"external_id": "user_2abd"}, headers=bearer(key))).json()
    assert other["account_id"] != account_id and other["created"] is True

    # Another product's service key has its own namespace of external ids.
    theirs = (await client.post("/v1/accounts/provision", json={"external_id": "user_2abc"},
                                headers=bearer(service_key(owner)))).json()
    assert theirs["account_id"] != account_id and theirs["created"] is True


async def test_item2_only_a_service_key_with_accounts_write_provisions(client, owner, new_account):
    customer = new_account("free")
    r = await client.post("/v1/accounts/provision", json={"external_id": "u1"}, headers=bearer(customer["api_key"]))
    assert r.status_code == 403 and r.headers["content-type"].startswith(PROBLEM), r.text
    old_service = owner.execute("SELECT (identity.issue_api_key(%s::uuid, 'old', '{service,usage:write}')).api_key",
                                [customer["account_id"]]).fetchone()[0]
    r = await client.post("/v1/accounts/provision", json={"external_id": "u1"}, headers=bearer(old_service))
    assert r.status_code == 403 and "accounts:write" in r.json()["detail"]
    for body in ({}, {"external_id": ""}, {"external_id": "x" * 256}, {"external_id": "a\u0007b"},
                 {"external_id": "u1", "email": "x@example.com"}):
        r = await client.post("/v1/accounts/provision", json=body, headers=bearer(service_key(owner)))
        assert r.status_code in (400, 422) and r.headers["content-type"].startswith(PROBLEM), (body, r.text)
    assert owner.execute("SELECT count(*) FROM identity.accounts WHERE external_id IS NOT NULL").fetchone()[0] == 0
