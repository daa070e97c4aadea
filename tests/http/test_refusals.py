"""Issue 22, items 7, 8 and 12: refusals are answered, logged and counted as what they are; page
forms refuse bad fields in the page; small API fixes (problem status, holds by account, scope
dedupe, no-store on secrets)."""

from __future__ import annotations

import logging

from tests.http.test_operations import samples


def http_requests(text: str, route: str) -> dict[str, float]:
    return {dict(labels)["status"]: value for labels, value in samples(text, "pgtally_http_requests_total").items()
            if dict(labels)["route"] == route and dict(labels)["method"] == "POST"}


async def test_item7_refusals_are_logged_and_counted_as_what_they_are(client, caplog):
    caplog.set_level(logging.INFO, logger="pgtally.http")
    before = http_requests((await client.get("/metrics")).text, "/login")
    await client.get("/login")                                # the CSRF cookie, but no token sent back
    refused = await client.post("/login", data={"email": "a@example.com", "password": "x"}, headers={"X-Request-Id": "csrf-1"})
    assert refused.status_code == 403 and refused.headers["x-request-id"] == "csrf-1"
    assert refused.headers["content-type"].startswith("application/problem+json")
    malformed = await client.post("/login", content=b"--nope\r\nnot a part",
                                  headers={"Content-Type": "multipart/form-data; boundary=nope", "X-Request-Id": "mp-1"})
    assert malformed.status_code == 400 and malformed.headers["x-request-id"] == "mp-1", malformed.text
    logged = {r.request_id: r.status for r in caplog.records if r.name == "pgtally.http" and r.getMessage() == "request"}
    assert logged["csrf-1"] == 403 and logged["mp-1"] == 400
    after = http_requests((await client.get("/metrics")).text, "/login")
    assert after.get("403", 0) - before.get("403", 0) == 1
    assert after.get("400", 0) - before.get("400", 0) == 1
    assert after.get("500", 0) == before.get("500", 0)
