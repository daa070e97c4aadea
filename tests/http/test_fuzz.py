"""Generated input against the running API: every operation of the OpenAPI document through
schemathesis, and arbitrary bodies (hypothesis) at every route. Nothing may answer 5xx, every
refusal is problem+json, and answers match the document. The numbers of examples are bounded
so the suite stays fast; raise PGTALLY_FUZZ_EXAMPLES to search longer."""

from __future__ import annotations

import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import checks as st_checks

from api.app import create_app
from api.settings import Settings
from tests.conftest import free_port, fresh_database, serving
from tests.http.conftest import PUBLIC_URL
from tests.stripe_standin import StripeStandIn

EXAMPLES = int(os.environ.get("PGTALLY_FUZZ_EXAMPLES", "12"))
OFFLINE = "postgresql://nobody@/nothing?host=/nonexistent"
SCHEMA = schemathesis.openapi.from_dict(create_app(OFFLINE, Settings()).openapi_schema.to_schema())
PASSWORD = "violet-harbour-tangent-42"
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def live(postgresql_noproc):
    """The app on a real port (uvicorn in a thread) over a database of this module's, with the
    Stripe stand-in and a webhook secret."""
    with fresh_database(f"pgtally_fuzz_{os.getpid()}") as url, StripeStandIn() as stripe_api:
        app = create_app(url, Settings(public_url=PUBLIC_URL, stripe_api_key="sk_test_fuzz",
                                       stripe_api_base=stripe_api.url, stripe_webhook_secret="whsec_fuzz"))
        with serving(app, free_port()) as base:
            yield base


@pytest.fixture(scope="module")
def token(live) -> str:
    """An access token of a signed-up user."""
    httpx.post(f"{live}/v1/auth/signup", json={"email": "fuzz@example.com", "password": PASSWORD})
    r = httpx.post(f"{live}/v1/auth/login", json={"email": "fuzz@example.com", "password": PASSWORD})
    assert r.status_code == 200, r.text
    return r.json()["access_token"]


def refusals_are_problems(ctx, response, case):
    """Every 4xx and 5xx is RFC 9457 problem+json with type, title, status and detail, but the
    OAuth token endpoint's 400, which is OAuth's own error JSON (RFC 6749 section 5.2)."""
    if response.status_code == 400 and case.path == "/oauth/token":
        assert response.json()["error"]
    elif response.status_code >= 400:
        assert response.headers.get("content-type", [""])[0].startswith("application/problem+json"), response.text
        body = response.json()
        assert body["status"] == response.status_code and body["type"] and body["title"] and "detail" in body
    return None


@SCHEMA.parametrize()
@FUZZ
def test_every_operation_against_its_openapi_document(case, live, token):
    response = case.call(base_url=live, headers={"Authorization": f"Bearer {token}"})
    case.validate_response(response, checks=[st_checks.not_a_server_error, st_checks.status_code_conformance,
                                             st_checks.content_type_conformance,
                                             st_checks.response_schema_conformance])
    refusals_are_problems(None, response, case)


ROUTES = [(method, path.replace("{session_id}", "0190a1b2-0000-7000-8000-000000000000")
                        .replace("{key_id}", "0190a1b2-0000-7000-8000-000000000000"))
          for path, item in SCHEMA.raw_schema["paths"].items() for method in item]
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                    max_leaves=12)


@pytest.mark.parametrize("method, path", ROUTES, ids=[f"{m.upper()} {p}" for m, p in ROUTES])
def test_arbitrary_bodies_never_get_a_5xx(live, token, method, path):
    @FUZZ
    @given(body=JSON | st.dictionaries(st.sampled_from(["meter", "quantity", "email", "password", "token",
                                                        "refresh_token", "install_id", "fingerprint", "name",
                                                        "price", "scopes", "input_tokens"]), JSON, max_size=4),
           raw=st.none() | st.binary(max_size=64),
           content_type=st.sampled_from(["application/json", "text/plain", "application/json; charset=latin-1", None]),
           authorized=st.booleans())
    def check(body, raw, content_type, authorized):
        headers = {"Idempotency-Key": "fuzz"} | ({"Authorization": f"Bearer {token}"} if authorized else {})
        if content_type:
            headers["Content-Type"] = content_type
        content = raw if raw is not None else httpx._content.json_dumps(body).encode()
        response = httpx.request(method.upper(), f"{live}{path}", content=content, headers=headers, timeout=30)
        assert response.status_code < 500, (response.status_code, response.text)
        if response.status_code == 400 and path == "/oauth/token":
            assert response.json()["error"], response.text
        elif response.status_code >= 400:
            assert response.headers["content-type"].startswith("application/problem+json"), response.text

    check()
