"""Browser test fixtures: pgtally on a real port (a database of its own, Google pointed at a
local OpenID Connect provider, the Stripe stand-in, a real SMTP server), and Debian's Chromium
through Playwright. Module-scoped: each test module gets its own site."""

from __future__ import annotations

import os

import pytest
from oidc_provider_mock import User, run_server_in_thread
from playwright.sync_api import Page, sync_playwright

from api.app import create_app
from api.settings import Settings
from tests.conftest import LOCAL_PROVIDERS, free_port, fresh_database, serving
from tests.http.conftest import Inbox
from tests.stripe_standin import StripeStandIn

CHROMIUM = os.environ.get("PGTALLY_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
PASSWORD = "violet-harbour-tangent-42"


@pytest.fixture(scope="module")
def smtp():
    from aiosmtpd.controller import Controller

    inbox = Inbox()
    inbox.port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=inbox.port)
    controller.start()
    yield inbox
    controller.stop()


@pytest.fixture(scope="module")
def site(postgresql_noproc, smtp):
    """pgtally on a real port, with Google pointed at a local OpenID Connect provider."""
    users = [User(sub="g-grace", claims={"email": "grace@example.com", "email_verified": True})]
    port = free_port()
    with fresh_database(f"pgtally_e2e_{os.getpid()}") as url, \
            run_server_in_thread(user_claims=users, require_nonce=True) as oidc, \
            StripeStandIn(webhook_url=f"http://127.0.0.1:{port}/v1/webhooks/stripe", webhook_secret="whsec_e2e") as stripe_api:
        settings = Settings(public_url=f"http://127.0.0.1:{port}", smtp_url=f"smtp://127.0.0.1:{smtp.port}",
                            google_client_id="pgtally-e2e", google_client_secret="s3cret",
                            google_issuer=f"http://localhost:{oidc.server_port}", stripe_api_key="sk_test_e2e", **LOCAL_PROVIDERS,
                            stripe_api_base=stripe_api.url, stripe_webhook_secret="whsec_e2e")
        with serving(create_app(url, settings), port) as base:
            yield {"base": base, "url": url, "settings": settings, "stripe": stripe_api}


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, site) -> Page:
    context = browser.new_context(base_url=site["base"])
    yield context.new_page()
    context.close()
