"""Issue 28 over HTTP: budgets (POST/GET/DELETE /v1/budgets, 402 budget-exceeded) and usage per
API key, through the real app, pool and database."""

from __future__ import annotations

from tests.http.test_usage_http import CREDIT, PROBLEM, auth


def key_with(owner, account_id: str, scopes: str) -> tuple[str, str]:
    return owner.execute("SELECT api_key, id::text FROM identity.issue_api_key(%s::uuid, 'k', %s::text[], NULL)",
                         [account_id, scopes]).fetchone()


async def test_item1_budgets_over_http_refuse_with_402_budget_exceeded(client, owner, new_account):
    acct = new_account("free", 100 * CREDIT)
    admin_key, _ = key_with(owner, acct["account_id"], "{usage:read,usage:write,billing:read,billing:manage}")
    meter_key, meter_key_id = key_with(owner, acct["account_id"], "{usage:read,usage:write}")
    r = await client.post("/v1/budgets", json={"scope": "api_key", "subject": meter_key_id, "limit": "2",
                                               "window": "day", "alerts": [50, 100]}, headers=auth(meter_key))
    assert r.status_code == 403 and r.headers["content-type"].startswith(PROBLEM)
    for body, status in [({"scope": "api_key", "subject": meter_key_id, "limit": "2", "window": "week"}, 422),
                         ({"scope": "api_key", "subject": meter_key_id, "limit": "-2", "window": "day"}, 422),
                         ({"scope": "api_key", "subject": acct["account_id"], "limit": "2", "window": "day"}, 422),
                         ({"scope": "api_key", "subject": meter_key_id, "limit": "2", "window": "day", "x": 1}, 422)]:
        r = await client.post("/v1/budgets", json=body, headers=auth(admin_key))
        assert r.status_code == status, (body, r.text)
        assert r.headers["content-type"].startswith(PROBLEM)
    r = await client.post("/v1/budgets", json={"scope": "api_key", "subject": meter_key_id, "limit": "2",
                                               "window": "day", "alerts": [50, 100]}, headers=auth(admin_key))
    assert r.status_code == 201, r.text
    budget = r.json()
    assert budget["limit"] == "2" and budget["alerts"] == [50, 100] and budget["subject"] == meter_key_id

    await client.post("/v1/usage/events", json={"meter": "generation", "quantity": 10}, headers=auth(meter_key, "free"))
    for i in range(2):
        r = await client.post("/v1/usage/events", json={"meter": "generation"}, headers=auth(meter_key, f"c{i}"))
        assert r.status_code == 201, r.text
    r = await client.post("/v1/usage/events", json={"meter": "generation"}, headers=auth(meter_key, "over"))
    assert r.status_code == 402 and r.headers["content-type"].startswith(PROBLEM)
    problem = r.json()
    assert problem["type"].endswith("/budget-exceeded")
    assert problem["budget_id"] == budget["id"] and problem["resets_at"] == budget["resets_at"]
    # The admin's key is not capped by the meter key's budget.
    r = await client.post("/v1/usage/events", json={"meter": "generation"}, headers=auth(admin_key, "admin"))
    assert r.status_code == 201

    listed = (await client.get("/v1/budgets", headers=auth(admin_key))).json()["data"]
    assert [(b["id"], b["spent"], b["remaining"]) for b in listed] == [(budget["id"], "2", "0")]
    assert (await client.get("/v1/budgets", headers=auth(meter_key))).json()["data"] == []   # not its maker's to see

    page = (await client.get(f"/v1/usage/events?api_key={meter_key_id}", headers=auth(admin_key))).json()
    assert [e["idempotency_key"] for e in page["data"]] == ["c1", "c0", "free"]

    r = await client.delete(f"/v1/budgets/{budget['id']}", headers=auth(admin_key))
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert (await client.delete(f"/v1/budgets/{budget['id']}", headers=auth(admin_key))).status_code == 404
    r = await client.post("/v1/usage/events", json={"meter": "generation"}, headers=auth(meter_key, "over"))
    assert r.status_code == 201
