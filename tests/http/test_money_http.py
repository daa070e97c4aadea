"""Issue 28 over HTTP: budgets (POST/GET/DELETE /v1/budgets, 402 budget-exceeded) and usage per
API key, through the real app, pool and database."""

from __future__ import annotations

from tests.conftest import CREDIT, reconciliation_problems
from tests.http.conftest import PASSWORD, bearer

PROBLEM = "application/problem+json"


def auth(key: str, idem: str | None = None) -> dict[str, str]:
    return bearer(key, **({"Idempotency-Key": idem} if idem is not None else {}))


async def person(client, owner, email: str, staff: str) -> dict:
    """A verified person with staff role staff, signed in: {token}."""
    assert (await client.post("/v1/auth/signup", json={"email": email, "password": PASSWORD})).status_code == 202
    user_id = owner.execute("SELECT id FROM identity.users WHERE email_normalized = %s", [email]).fetchone()[0]
    owner.execute("SELECT identity.mark_email_verified(%s)", [user_id])
    owner.execute("SELECT api.staff_grant(%s, %s)", [email, staff])
    return {"token": (await client.post("/v1/auth/login", json={"email": email, "password": PASSWORD})).json()["access_token"]}


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


async def test_item2_reversal_over_http_for_admin_staff_and_operator_keys_only(client, owner, new_account):
    acct = new_account("free", 5 * CREDIT)
    await client.post("/v1/usage/events", json={"meter": "generation", "quantity": 10}, headers=auth(acct["api_key"], "free"))
    event = (await client.post("/v1/usage/events", json={"meter": "generation", "quantity": 3},
                               headers=auth(acct["api_key"], "paid"))).json()
    url = f"/v1/usage/events/{event['id']}/reversal"
    # The customer's own key, a support agent: 403; nothing reversed.
    r = await client.post(url, json={"reason": "mine"}, headers=auth(acct["api_key"], "r0"))
    assert r.status_code == 403 and r.headers["content-type"].startswith(PROBLEM)
    support = await person(client, owner, "support@example.com", staff="support")
    assert (await client.post(url, json={"reason": "x"}, headers={**bearer(support["token"]), "Idempotency-Key": "r1"})
            ).status_code == 403
    # Bad input: 422, no reason; missing key: 400.
    admin = await person(client, owner, "admin@example.com", staff="admin")
    staff_headers = {**bearer(admin["token"]), "Idempotency-Key": "r2"}
    assert (await client.post(url, json={"quantity": 1}, headers=staff_headers)).status_code in (400, 422)
    assert (await client.post(url, json={"reason": "x", "quantity": 0}, headers=staff_headers)).status_code in (400, 422)
    assert (await client.post(url, json={"reason": "x"}, headers=bearer(admin["token"]))).status_code == 400
    r = await client.post(url, json={"reason": "double charge", "quantity": 1}, headers=staff_headers)
    assert r.status_code == 201, r.text
    assert r.json()["reversed"]["credits"] == "1" and r.json()["balance"] == {"credits": "3"}
    again = await client.post(url, json={"reason": "double charge", "quantity": 1}, headers=staff_headers)
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true" and again.json()["id"] == r.json()["id"]
    assert (await client.post(url, json={"reason": "other", "quantity": 1}, headers=staff_headers)).status_code == 422
    audit = owner.execute("SELECT action, reason FROM ops.audit_log").fetchall()
    assert audit == [("reverse_usage", "double charge")]
    # An operator key with usage:reverse reverses the rest; then there is nothing left (409).
    service = owner.execute("SELECT api.create_account('free', 0, 'ops', 'service')").fetchone()[0]["account_id"]
    op_key = owner.execute("SELECT api.operator_reversal_key(%s::uuid)", [service]).fetchone()[0]["api_key"]
    r = await client.post(url, json={"reason": "goodwill"}, headers=auth(op_key, "r3"))
    assert r.status_code == 201 and r.json()["quantity"] == 2
    assert (await client.post(url, json={"reason": "more"}, headers=auth(op_key, "r4"))).status_code == 409
    assert (await client.post("/v1/usage/events/00000000-0000-7000-8000-000000000000/reversal", json={"reason": "x"},
                              headers=auth(op_key, "r5"))).status_code == 404
    assert reconciliation_problems(owner) == {}


async def test_item3_one_idempotency_contract_replay_reuse_and_concurrent_retries(client, owner, new_account):
    """Table-driven over the writes whose idempotency check util.idempotency_check now makes: the
    same key and request replays (Idempotent-Replayed: true, the first body), the same key with
    another request is 422 idempotency-key-reused and changes nothing, and concurrent requests
    under one key (one still in progress when the others arrive) are processed once, the others
    replaying its answer."""
    import asyncio

    acct = new_account("free", 50 * CREDIT)
    key = acct["api_key"]
    await client.post("/v1/usage/events", json={"meter": "generation", "quantity": 10}, headers=auth(key, "free"))
    event = (await client.post("/v1/usage/events", json={"meter": "generation", "quantity": 3},
                               headers=auth(key, "to-reverse"))).json()
    hold = (await client.post("/v1/holds", json={"meter": "generation", "quantity": 2}, headers=auth(key, "to-capture"))).json()
    admin = await person(client, owner, "admin@example.com", staff="admin")
    service = owner.execute("SELECT api.create_account('free', 0, 'ops', 'service')").fetchone()[0]["account_id"]
    op_key = owner.execute("SELECT api.operator_reversal_key(%s::uuid)", [service]).fetchone()[0]["api_key"]

    def balance():
        return owner.execute("SELECT credit_balance_micros FROM identity.accounts WHERE id = %s", [acct["account_id"]]).fetchone()[0]

    writes = [  # (name, path, headers, body, other body, replay status)
        ("usage event", "/v1/usage/events", auth(key, "w1"), {"meter": "generation"}, {"meter": "generation", "quantity": 2}, 200),
        ("hold", "/v1/holds", auth(key, "w2"), {"meter": "generation"}, {"meter": "generation", "quantity": 2}, 200),
        ("capture", f"/v1/holds/{hold['id']}/capture", auth(key), {}, {"quantity": 1}, 200),
        ("reversal", f"/v1/usage/events/{event['id']}/reversal", auth(op_key, "w3"), {"reason": "x", "quantity": 1},
         {"reason": "x", "quantity": 2}, 200),
        ("admin credits", f"/v1/admin/accounts/{acct['account_id']}/credits", {**bearer(admin["token"]), "Idempotency-Key": "w4"},
         {"amount": "1", "reason": "goodwill"}, {"amount": "2", "reason": "goodwill"}, 200),
    ]
    for name, path, headers, body, other, replay_status in writes:
        first = await client.post(path, json=body, headers=headers)
        assert first.status_code in (200, 201), (name, first.text)
        before = balance()
        again = await client.post(path, json=body, headers=headers)
        assert again.status_code == replay_status, (name, again.text)
        if name == "admin credits":
            assert again.json()["replayed"] is True
        else:
            assert again.headers["Idempotent-Replayed"] == "true", name
            assert again.json() == first.json(), name
        reused = await client.post(path, json=other, headers=headers)
        assert reused.status_code == 422, (name, reused.text)
        assert reused.headers["content-type"].startswith(PROBLEM) and reused.json()["type"].endswith("/idempotency-key-reused")
        assert balance() == before, name                     # nothing changed
    # A batch answers per event: a replayed event and a reused key (422 problem) in one request.
    r = await client.post("/v1/usage/events/batch", headers=auth(key),
                          json={"events": [{"idempotency_key": "w1", "meter": "generation"},
                                           {"idempotency_key": "w1", "meter": "generation", "quantity": 5}]})
    answers = r.json()["data"]
    assert answers[0]["status"] == "replayed"
    assert answers[1]["status"] == "refused" and answers[1]["problem"]["status"] == 422
    assert answers[1]["problem"]["type"].endswith("/idempotency-key-reused")
    # In progress: 16 concurrent requests under one key; the account's lock makes the others wait
    # for the first and replay it, so none is charged twice and none fails.
    results = await asyncio.gather(*[client.post("/v1/usage/events", json={"meter": "generation"}, headers=auth(key, "w9"))
                                     for _ in range(16)])
    assert sorted(r.status_code for r in results) == [200] * 15 + [201]
    assert len({r.json()["id"] for r in results}) == 1
    assert reconciliation_problems(owner) == {}
