"""HTTP fixtures and helpers: the app on this test's database, a real SMTP server catching email, the
sign-in forms, and Stripe (the stand-in, signed webhook deliveries)."""

from __future__ import annotations

import json
import re
import socket
from email import message_from_bytes, policy
from email.message import Message
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
from aiosmtpd.controller import Controller
from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families

from api import db
from api.app import create_app
from api.settings import Settings
from api.worker import deliver_due
from tests.stripe_standin import Events, StripeStandIn, sign

PUBLIC_URL = "https://app.example.com"


@pytest.fixture
def settings(smtp) -> Settings:
    return Settings(public_url=PUBLIC_URL, pool_max_size=16, smtp_url=f"smtp://127.0.0.1:{smtp.port}")


@pytest.fixture
def frozen_db_clock(owner, db_url):
    """Stop the database clock (util.now) for every new connection of this test's database, so
    the attempts a test makes stay inside the rate limits' sliding windows however long the test
    runs, and the answers (retry_after) do not depend on the time. Use it before ``client``."""
    dbname = owner.info.dbname
    owner.execute(f"ALTER DATABASE \"{dbname}\" SET pgtally.now = '2026-06-15 12:02:30+00'")


@pytest.fixture
async def client(db_url, settings):
    async with AsyncTestClient(app=create_app(db_url, settings)) as c:
        yield c


class Inbox:
    """Messages an aiosmtpd server received."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's hook name
        self.messages.append(message_from_bytes(envelope.content, policy=policy.default))
        return "250 OK"

    def to(self, address: str) -> list[Message]:
        return [m for m in self.messages if m["To"] == address]

    def token(self, address: str, subject_part: str) -> str:
        """The token of the last link emailed to address with that subject."""
        (message, *_) = [m for m in reversed(self.to(address)) if subject_part in m["Subject"]]
        return re.search(r"token=([A-Za-z0-9_-]+)", message.get_content()).group(1)


@pytest.fixture
def smtp():
    inbox = Inbox()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        inbox.port = probe.getsockname()[1]
    controller = Controller(inbox, hostname="127.0.0.1", port=inbox.port)
    controller.start()
    yield inbox
    controller.stop()


@pytest.fixture
def deliver(db_url, settings):
    """Run the outbox worker once over real SMTP: deliver() -> messages claimed."""

    async def run() -> int:
        async with await psycopg.AsyncConnection.connect(db.api_conninfo(db_url), autocommit=True) as conn:
            return await deliver_due(conn, settings, limit=100)

    return run


def bearer(token: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **headers}


# Sign-in pages and forms.
BASE = "http://testserver.local"


PASSWORD = "violet-harbour-tangent-42"


async def google(client, sub: str, start: str = "/auth/google/start") -> httpx.Response:
    """Start at pgtally, choose the user at the provider, come back to the callback."""
    r = await client.get(start, follow_redirects=False)
    assert r.status_code in (302, 303), r.text
    consent = httpx.post(r.headers["location"], data={"sub": sub}, follow_redirects=False)
    assert consent.status_code == 302, consent.text
    back = urlsplit(consent.headers["location"])
    return await client.get(f"{back.path}?{back.query}", follow_redirects=False)


def csrf(page: httpx.Response) -> str:
    """The CSRF token of a page's form."""
    return re.search(r'name="_csrf_token" value="([^"]+)"', page.text).group(1)


async def form(client, path: str, fields: dict, page_path: str | None = None) -> httpx.Response:
    """Submit a page's form as a browser does: the page first (CSRF cookie and token)."""
    token = csrf(await client.get(page_path or path))
    return await client.post(path, data={**fields, "_csrf_token": token}, follow_redirects=False)


# Stripe: the stand-in, settings pointed at it, signed webhook deliveries, Checkout paid.
SECRET = "whsec_test_secret"


DAY = 86400


@pytest.fixture
def stripe_api():
    """The Stripe stand-in (tests/stripe_standin.py) on a port of its own."""
    with StripeStandIn() as standin:
        yield standin


@pytest.fixture
def stripe_settings(stripe_api) -> Settings:
    """Settings with Stripe: the API pointed at the stand-in, webhooks signed with SECRET."""
    return Settings(public_url=PUBLIC_URL, pool_max_size=16, stripe_api_key="sk_test_pgtally",
                    stripe_api_base=stripe_api.url, stripe_webhook_secret=SECRET)


@pytest.fixture
def stripe_mail_settings(smtp, stripe_api) -> Settings:
    """stripe_settings, and email through the test's SMTP server."""
    return Settings(public_url=PUBLIC_URL, pool_max_size=16, smtp_url=f"smtp://127.0.0.1:{smtp.port}",
                    stripe_api_key="sk_test_pgtally", stripe_api_base=stripe_api.url, stripe_webhook_secret=SECRET)


@pytest.fixture
def events() -> Events:
    """Stripe events with ids in one sequence for the test."""
    return Events()


async def webhook(client, event: dict, timestamp: int | None = None, secret: str = SECRET):
    """POST a Stripe event to /v1/webhooks/stripe, signed the way Stripe signs it."""
    payload = json.dumps(event).encode()
    return await client.post("/v1/webhooks/stripe", content=payload,
                             headers={"Stripe-Signature": sign(payload, secret, timestamp),
                                      "Content-Type": "application/json"})


async def pay_and_deliver(client, stripe_api, session_id: str) -> None:
    """Press the stand-in checkout page's Pay button, then deliver the events Stripe sends."""
    before = len(stripe_api.sent)
    stripe_api.pay(stripe_api.sessions[session_id])
    for event in stripe_api.sent[before:]:
        assert (await webhook(client, event)).status_code == 200


async def page_client(db_url, settings):
    """A client of the app that keeps cookies as a browser on https does (for the pages)."""
    # Cookies are Secure with an https public URL: the browser side speaks https too.
    return AsyncTestClient(app=create_app(db_url, settings), base_url="https://testserver.local")


def account_row(owner, account_id):
    """(plan_id, credit_balance_micros, billing_period_start, billing_period_end, plan_grace_until)."""
    return owner.execute("SELECT plan_id, credit_balance_micros, billing_period_start, billing_period_end, "
                         "plan_grace_until FROM identity.accounts WHERE id = %s", [account_id]).fetchone()


# Metrics.
def samples(text: str, name: str) -> dict[tuple, float]:
    """The samples of one metric in a Prometheus text exposition, by their sorted labels."""
    return {tuple(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples if s.name == name}
