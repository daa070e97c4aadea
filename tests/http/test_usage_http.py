"""The HTTP API over the real stack: Litestar app, psycopg pool as pgtally_api, PostgreSQL."""

from __future__ import annotations

import asyncio
import re

import pytest

from tests.conftest import reconciliation_problems

CREDIT = 1_000_000
PROBLEM = "application/problem+json"


def auth(key: str, idem: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {key}"}
    if idem is not None:
        headers["Idempotency-Key"] = idem
    return headers


async def test_meter_until_refused_with_402(client, new_account):
    key = new_account("free", CREDIT)["api_key"]
    for i in range(11):
        r = await client.post("/v1/usage/events", json={"meter": "generation", "quantity": 1}, headers=auth(key, f"e{i}"))
        assert r.status_code == 201, r.text
    assert r.json()["charged"] == {"allowance_units": 0, "credits": "1"}
    assert r.json()["balance"] == {"credits": "0"}

    r = await client.post("/v1/usage/events", json={"meter": "generation"}, headers=auth(key, "e-last"))
    assert r.status_code == 402
    assert r.headers["content-type"].startswith(PROBLEM)
    body = r.json()
    assert body["type"].endswith("/quota-exhausted") and body["status"] == 402
    # The upgrade link names the account, signed and short-lived, for the pricing page.
    assert body["upgrade_url"].startswith("https://app.example.com/upgrade?token=")
    token = body["upgrade_url"].split("token=")[1]
    assert str(client.app.state.jwt_keys.upgrade_account(token)) == body["account_id"]
    page = await client.get(f"/upgrade?token={token}")
    assert body["account_id"] in page.text
    assert body["resets_at"].endswith("T00:00:00.000000Z")
    assert body["required_credits"] == "1" and body["balance"] == "0"


async def test_replay_returns_the_original_body_and_other_payload_conflicts(client, new_account):
    key = new_account("free")["api_key"]
    first = await client.post("/v1/usage/events", json={"meter": "generation"}, headers=auth(key, "once"))
    assert first.status_code == 201 and "idempotent-replayed" not in first.headers
    again = await client.post("/v1/usage/events", json={"meter": "generation"}, headers=auth(key, "once"))
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    other = await client.post("/v1/usage/events", json={"meter": "generation", "quantity": 3}, headers=auth(key, "once"))
    assert other.status_code == 422 and other.headers["content-type"].startswith(PROBLEM)
    assert other.json()["type"].endswith("/idempotency-key-reused")
    assert other.json()["usage_event_id"] == first.json()["id"]


async def test_100_concurrent_http_retries_charge_once(client, owner, new_account):
    key = new_account("free")["api_key"]
    responses = await asyncio.gather(*[
        client.post("/v1/usage/events", json={"meter": "generation"}, headers=auth(key, "same"))
        for _ in range(100)])
    assert sorted(r.status_code for r in responses) == [200] * 99 + [201]
    assert len({r.text for r in responses}) == 1
    assert owner.execute("SELECT count(*) FROM metering.usage_events").fetchone()[0] == 1


async def test_concurrent_http_events_never_overspend(client, owner, new_account):
    acct = new_account("free", 3 * CREDIT)
    responses = await asyncio.gather(*[
        client.post("/v1/usage/events", json={"meter": "generation"}, headers=auth(acct["api_key"], f"k{i}"))
        for i in range(40)])
    assert sorted(r.status_code for r in responses) == [201] * 13 + [402] * 27
    assert reconciliation_problems(owner) == {}


@pytest.mark.parametrize("body, headers_idem, status, fragment", [
    ({"meter": "generation", "colour": "red"}, "k", 422, "unknown field"),
    ({"meter": "generation", "quantity": 0}, "k", 422, "quantity"),
    ({"meter": "generation", "quantity": 1.5}, "k", 422, "quantity"),
    ({"meter": "generation", "quantity": 1.0}, "k", 422, "quantity"),
    ({"meter": "generation", "quantity": "1"}, "k", 422, "quantity"),
    ({"meter": "generation", "quantity": True}, "k", 422, "quantity"),
    ({"meter": "gene\u0000ration"}, "k", 422, "meter"),
    ({"quantity": 1}, "k", 422, "meter"),
    ({"meter": "generation"}, None, 400, "Idempotency-Key"),
    ({"meter": "no_such_meter"}, "k", 422, "no meter"),
    ({"meter": "llm_tokens", "quantity": 2}, "k", 422, "tokens"),
])
async def test_bad_requests_get_a_problem_and_charge_nothing(client, owner, new_account, body, headers_idem,
                                                             status, fragment):
    key = new_account("free", CREDIT)["api_key"]
    r = await client.post("/v1/usage/events", json=body, headers=auth(key, headers_idem))
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    problem = r.json()
    assert problem["status"] == status and problem["type"] and problem["title"]
    assert fragment in problem["detail"] or fragment in str(problem.get("errors"))
    assert owner.execute("SELECT count(*) FROM metering.usage_events").fetchone()[0] == 0


@pytest.mark.parametrize("content, detail", [
    (b'{"meter": ', "not valid JSON"),
    (b'{"meter": "\xff\xfe"}', "UTF-8"),
    (b'[' * 10_000 + b']' * 10_000, "nests"),
    (b'{"meter": ' + b'{"a": ' * 5_000 + b'1' + b'}' * 5_001, "nests"),
])
async def test_malformed_json_is_a_400_problem(client, owner, new_account, content, detail):
    key = new_account()["api_key"]
    r = await client.post("/v1/usage/events", content=content, headers={**auth(key, "k"),
                                                                      "Content-Type": "application/json"})
    assert r.status_code == 400 and r.headers["content-type"].startswith(PROBLEM), r.text
    assert detail in r.json()["detail"]
    assert owner.execute("SELECT count(*) FROM metering.usage_events").fetchone()[0] == 0


async def test_brackets_inside_strings_do_not_count_as_nesting(client, new_account):
    key = new_account()["api_key"]
    note = '\\"' + "[{" * 40 + '\\\\'                       # an escaped quote, 80 brackets, an escaped backslash
    content = ('{"meter": "generation", "metadata": {"note": "' + note + '", "list": [[1]]}}').encode()
    r = await client.post("/v1/usage/events", content=content, headers={**auth(key, "strings"),
                                                                      "Content-Type": "application/json"})
    assert r.status_code == 201, r.text
    assert r.json()["metadata"]["note"] == '"' + "[{" * 40 + "\\"


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
async def test_a_body_that_is_not_declared_json_is_415(client, owner, new_account, content_type):
    key = new_account()["api_key"]
    headers = auth(key, "k") | ({"Content-Type": content_type} if content_type else {})
    r = await client.post("/v1/usage/events", content=b'{"meter": "generation"}', headers=headers)
    assert r.status_code == 415 and r.headers["content-type"].startswith(PROBLEM), r.text
    assert owner.execute("SELECT count(*) FROM metering.usage_events").fetchone()[0] == 0


async def test_nul_in_query_parameters_is_a_422_problem(client, new_account):
    key = new_account()["api_key"]
    r = await client.get("/v1/ledger?cursor=%00", headers=auth(key))
    assert r.status_code == 422 and r.headers["content-type"].startswith(PROBLEM), r.text


@pytest.mark.parametrize("header", [None, "Bearer", "Basic abc", "Bearer pgt_unknown"])
async def test_missing_or_bad_api_key_is_401(client, header):
    headers = {"Idempotency-Key": "k"} | ({"Authorization": header} if header else {})
    r = await client.post("/v1/usage/events", json={"meter": "generation"}, headers=headers)
    assert r.status_code == 401 and r.headers["content-type"].startswith(PROBLEM)
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert (await client.get("/v1/balance", headers={"Authorization": header} if header else {})).status_code == 401


async def test_check_then_balance_and_ledger(client, new_account):
    key = new_account("free", 2 * CREDIT)["api_key"]
    r = await client.post("/v1/usage/check", json={"meter": "generation", "quantity": 12}, headers=auth(key))
    assert r.status_code == 200
    assert r.json()["allowed"] is True and r.json()["charge"] == {"allowance_units": 10, "credits": "2"}
    r = await client.post("/v1/usage/check", json={"meter": "generation", "quantity": 13}, headers=auth(key))
    assert r.json()["allowed"] is False
    await client.post("/v1/usage/events", json={"meter": "generation", "quantity": 11}, headers=auth(key, "k"))

    balance = (await client.get("/v1/balance", headers=auth(key))).json()
    assert balance["credits"] == "1" and balance["allowances"][0]["remaining"] == 0

    page = (await client.get("/v1/ledger", params={"limit": 1}, headers=auth(key))).json()
    assert [e["amount"] for e in page["data"]] == ["-1"] and page["has_more"] is True
    page = (await client.get("/v1/ledger", params={"limit": 1, "cursor": page["next_cursor"]}, headers=auth(key))).json()
    assert [e["kind"] for e in page["data"]] == ["grant"] and page["has_more"] is False
    r = await client.get("/v1/ledger", params={"limit": 500}, headers=auth(key))
    assert r.status_code == 400 and r.headers["content-type"].startswith(PROBLEM)
    r = await client.get("/v1/ledger", params={"cursor": "zzz"}, headers=auth(key))
    assert r.status_code == 422


async def test_health_and_openapi(client):
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    schema = (await client.get("/schema/openapi.json")).json()
    assert {"/v1/usage/events", "/v1/usage/check", "/v1/balance", "/v1/ledger"} <= set(schema["paths"])
    r = await client.get("/v1/nothing-here")
    assert r.status_code == 404 and r.headers["content-type"].startswith(PROBLEM)


async def test_every_operation_has_a_typed_answer_and_documents_its_problems(client):
    schema = (await client.get("/schema/openapi.json")).json()
    problem_schema = schema["components"]["schemas"]["Problem"]
    assert set(problem_schema["required"]) == {"type", "title", "status", "detail"}
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            success = [code for code in responses if code.startswith("2")]
            assert success, (method, path)
            for code in success:
                (media,) = responses[code]["content"].values()
                assert "$ref" in media["schema"], (method, path, code)
            problems = [code for code in responses if not code.startswith("2")]
            assert "500" in problems, (method, path)
            for code in problems:
                if (path, code) == ("/oauth/token", "400"):       # OAuth's own error JSON (RFC 6749 5.2)
                    continue
                assert responses[code]["content"] == {"application/problem+json": {
                    "schema": {"$ref": "#/components/schemas/Problem"}}}, (method, path, code)


async def test_the_docs_page_loads_nothing_from_elsewhere(client):
    page = await client.get("/schema")
    assert page.status_code == 200 and "swagger-ui" in page.text
    # Nothing it loads comes from elsewhere (the schema it embeds may name URLs, such as the ID
    # token's namespaced claim: names, not loads).
    assert not re.findall(r'(?:src|href)\s*=\s*["\']?(?:https?:)?//', page.text)
    assert not re.findall(r'url:\s*["\'](?:https?:)?//', page.text)
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "swagger-ui-standalone-preset.js"):
        assert f"/schema/assets/{asset}" in page.text
        assert (await client.get(f"/schema/assets/{asset}")).status_code == 200


async def test_usage_events_list_newest_first_with_pages_filters_and_metadata(client, new_account, owner):
    key = new_account("free", 10 * CREDIT)["api_key"]
    other = new_account("free")["api_key"]
    for i in range(5):
        r = await client.post("/v1/usage/events", headers=auth(key, f"g{i}"),
                              json={"meter": "generation", "metadata": {"request_id": f"r{i}", "thumbnail_url": f"https://cdn.example.com/{i}.png"}})
        assert r.status_code == 201 and r.json()["metadata"]["request_id"] == f"r{i}"
    await client.post("/v1/usage/events", headers=auth(key, "t1"), json={"meter": "llm_tokens", "input_tokens": 10, "output_tokens": 5})
    await client.post("/v1/usage/events", headers=auth(other, "o1"), json={"meter": "generation"})

    first = (await client.get("/v1/usage/events?limit=4", headers=auth(key))).json()
    assert [e["meter"] for e in first["data"]] == ["llm_tokens", "generation", "generation", "generation"]
    assert first["has_more"] is True and first["data"][1]["metadata"]["request_id"] == "r4"
    second = (await client.get(f"/v1/usage/events?limit=4&cursor={first['next_cursor']}", headers=auth(key))).json()
    assert [e["metadata"]["request_id"] for e in second["data"]] == ["r1", "r0"] and second["has_more"] is False
    generation = (await client.get("/v1/usage/events?meter=generation&limit=100", headers=auth(key))).json()
    assert len(generation["data"]) == 5 and generation["data"][0]["charged"] == {"allowance_units": 1, "credits": "0", "amount": None}
    future = (await client.get("/v1/usage/events?from=2999-01-01T00:00:00Z", headers=auth(key))).json()
    assert future["data"] == []
    # Another account's events are invisible.
    others = (await client.get("/v1/usage/events", headers=auth(other))).json()
    assert len(others["data"]) == 1 and others["data"][0]["idempotency_key"] == "o1"
    assert (await client.get("/v1/usage/events?cursor=nope", headers=auth(key))).status_code == 422


@pytest.mark.parametrize("metadata", [{"blob": "x" * 2100}, [1, 2], "text", 5])
async def test_metadata_must_be_an_object_of_at_most_2_kb(client, new_account, owner, metadata):
    key = new_account("free")["api_key"]
    r = await client.post("/v1/usage/events", headers=auth(key, "m"), json={"meter": "generation", "metadata": metadata})
    assert r.status_code == 422 and r.headers["content-type"].startswith(PROBLEM), r.text
    assert owner.execute("SELECT count(*) FROM metering.usage_events").fetchone()[0] == 0


async def test_metadata_is_part_of_the_idempotency_fingerprint(client, new_account):
    key = new_account("free")["api_key"]
    body = {"meter": "generation", "metadata": {"model": "a"}}
    assert (await client.post("/v1/usage/events", headers=auth(key, "k"), json=body)).status_code == 201
    assert (await client.post("/v1/usage/events", headers=auth(key, "k"), json=body)).status_code == 200
    changed = {"meter": "generation", "metadata": {"model": "b"}}
    assert (await client.post("/v1/usage/events", headers=auth(key, "k"), json=changed)).status_code == 422


async def test_holds_over_http_reserve_capture_release_and_list(client, new_account):
    key = new_account("free", CREDIT)["api_key"]
    r = await client.post("/v1/holds", json={"meter": "generation", "quantity": 11, "expires_in": 600}, headers=auth(key, "h1"))
    assert r.status_code == 201 and r.json()["held"] == {"allowance_units": 10, "credits": "1"}, r.text
    hold = r.json()
    again = await client.post("/v1/holds", json={"meter": "generation", "quantity": 11, "expires_in": 600}, headers=auth(key, "h1"))
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true" and again.json() == hold
    other = await client.post("/v1/holds", json={"meter": "generation", "quantity": 2}, headers=auth(key, "h1"))
    assert other.status_code == 422
    refused = await client.post("/v1/holds", json={"meter": "generation"}, headers=auth(key, "h2"))
    assert refused.status_code == 402 and refused.headers["content-type"].startswith(PROBLEM)
    assert (await client.post("/v1/usage/events", json={"meter": "generation"}, headers=auth(key, "u1"))).status_code == 402
    listed = (await client.get("/v1/holds", headers=auth(key))).json()["data"]
    assert [h["id"] for h in listed] == [hold["id"]]
    balance = (await client.get("/v1/balance", headers=auth(key))).json()
    assert (balance["credits"], balance["held"], balance["available"]) == ("1", "1", "0")

    captured = await client.post(f"/v1/holds/{hold['id']}/capture", json={"quantity": 4}, headers=auth(key))
    assert captured.status_code == 200 and captured.json()["charged"] == {"allowance_units": 4, "credits": "0"}
    replay = await client.post(f"/v1/holds/{hold['id']}/capture", json={"quantity": 4}, headers=auth(key))
    assert replay.headers["idempotent-replayed"] == "true" and replay.json() == captured.json()
    assert (await client.post(f"/v1/holds/{hold['id']}/release", headers=auth(key))).status_code == 409

    second = (await client.post("/v1/holds", json={"meter": "generation", "quantity": 2}, headers=auth(key, "h3"))).json()
    released = await client.post(f"/v1/holds/{second['id']}/release", headers=auth(key))
    assert released.status_code == 200 and released.json()["status"] == "released"
    assert (await client.post(f"/v1/holds/{second['id']}/capture", json={}, headers=auth(key))).status_code == 409
    assert (await client.post(f"/v1/holds/{second['id']}/release", headers=auth(key))).json()["status"] == "released"
    unknown = "0190a1b2-0000-7000-8000-000000000000"
    assert (await client.post(f"/v1/holds/{unknown}/release", headers=auth(key))).status_code == 404
    bad = await client.post("/v1/holds", json={"meter": "generation", "expires_in": 100000}, headers=auth(key, "h4"))
    assert bad.status_code == 422


async def test_a_batch_answers_each_event_as_a_single_request_would(client, new_account, owner):
    key = new_account("free", CREDIT)["api_key"]
    body = {"events": [{"idempotency_key": "b1", "meter": "generation", "quantity": 10},
                       {"idempotency_key": "b2", "meter": "generation", "quantity": 5},
                       {"idempotency_key": "b3", "meter": "generation", "metadata": {"job": "x"}},
                       {"idempotency_key": "b1", "meter": "generation", "quantity": 10}]}
    r = await client.post("/v1/usage/events/batch", json=body, headers=auth(key))
    assert r.status_code == 200, r.text
    result = r.json()
    assert (result["charged"], result["replayed"], result["refused"]) == (2, 1, 1)
    refused = result["data"][1]
    assert refused["status"] == "refused" and refused["problem"]["status"] == 402
    assert refused["problem"]["type"].endswith("/quota-exhausted") and "upgrade_url" in refused["problem"]
    assert result["data"][2]["event"]["metadata"] == {"job": "x"}
    assert result["data"][3]["event"] == result["data"][0]["event"]
    # Nothing refused: the database's answers are relayed as they are, in the same shape.
    again = await client.post("/v1/usage/events/batch", json={"events": [body["events"][0], body["events"][2]]}, headers=auth(key))
    assert again.headers["content-type"] == "application/json"
    assert again.json() == {"data": [{"index": 0, "status": "replayed", "event": result["data"][0]["event"]},
                                     {"index": 1, "status": "replayed", "event": result["data"][2]["event"]}],
                            "charged": 0, "replayed": 2, "refused": 0}
    assert (await client.post("/v1/usage/events/batch", json={"events": []}, headers=auth(key))).status_code == 422
    assert (await client.post("/v1/usage/events/batch", json={"events": [{"meter": "generation"}] * 1001},
                              headers=auth(key))).status_code == 422
    assert (await client.post("/v1/usage/events/batch", json=body)).status_code == 401
