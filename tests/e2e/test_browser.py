"""The pages in real Chromium (Debian's chromium, driven by Playwright's Python package):
sign up and confirm by the emailed link, log in with a password and with an OpenID Connect
provider, reset a password by the emailed link, and approve a device code while
``pgtally login`` polls in another process."""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psycopg
import pytest
from oidc_provider_mock import User, run_server_in_thread
from playwright.sync_api import Page, expect, sync_playwright

from api import db
from api.app import create_app
from api.settings import Settings
from api.worker import deliver_due
from tests.conftest import LOCAL_PROVIDERS, free_port, fresh_database, serving
from tests.http.conftest import Inbox
from tests.stripe_standin import StripeStandIn

SCREENSHOTS = Path(__file__).resolve().parent.parent.parent / "docs" / "screenshots"

CHROMIUM = os.environ.get("PGTALLY_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
PASSWORD = "violet-harbour-tangent-42"
PGTALLY = Path(sys.executable).parent / "pgtally"


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


def deliver(site) -> None:
    async def run():
        async with await psycopg.AsyncConnection.connect(db.api_conninfo(site["url"]), autocommit=True) as conn:
            await deliver_due(conn, site["settings"], limit=100)
    # Playwright's sync API keeps an event loop in this thread: deliver from another one.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, run()).result()


def emailed_link(smtp, address: str, subject: str) -> str:
    (message, *_) = [m for m in reversed(smtp.to(address)) if subject in m["Subject"]]
    return re.search(r"(http://\S+token=[\w-]+)", message.get_content()).group(1)


def log_in(page: Page, email: str, password: str) -> None:
    page.goto("/login")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Your account")).to_be_visible()


def test_sign_up_confirm_by_email_log_in_and_reset_the_password(page, site, smtp):
    page.goto("/signup")
    page.get_by_label("Email").fill("ada@example.com")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign up").click()
    expect(page.get_by_role("heading", name="Check your email")).to_be_visible()

    deliver(site)
    page.goto(emailed_link(smtp, "ada@example.com", "Confirm"))
    page.get_by_role("button", name="Confirm my email address").click()
    expect(page.get_by_text("ada@example.com is confirmed.")).to_be_visible()

    log_in(page, "ada@example.com", PASSWORD)
    expect(page.get_by_text("confirmed", exact=True)).to_be_visible()
    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()

    page.get_by_role("link", name="Forgot your password?").click()
    page.get_by_label("Email").fill("ada@example.com")
    page.get_by_role("button", name="Email me a link").click()
    expect(page.get_by_role("heading", name="Check your email")).to_be_visible()
    deliver(site)
    page.goto(emailed_link(smtp, "ada@example.com", "Reset"))
    page.get_by_label("New password").fill("quartz-meadow-lantern-9")
    page.get_by_role("button", name="Set the new password").click()
    expect(page.get_by_role("heading", name="Password changed")).to_be_visible()
    log_in(page, "ada@example.com", "quartz-meadow-lantern-9")


def test_log_in_with_the_openid_connect_provider(page):
    page.goto("/login")
    page.get_by_role("link", name="Continue with Google").click()
    page.locator("input[name=sub]").fill("g-grace")
    page.locator("input[name=sub]").press("Enter")
    expect(page.get_by_role("heading", name="Your account")).to_be_visible()
    expect(page.get_by_text("grace@example.com confirmed")).to_be_visible()
    expect(page.get_by_text("Google (grace@example.com)")).to_be_visible()


def test_approve_a_device_code_while_pgtally_login_polls(page, site, tmp_path):
    env = {**os.environ, "PGTALLY_CONFIG_DIR": str(tmp_path)}
    cli = subprocess.Popen([str(PGTALLY), "login", "--url", site["base"], "--no-browser"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = cli.stdout.readline()
        code = re.search(r"enter the code ([A-Z]{4}-[A-Z]{4})", line).group(1)
        page.goto("/login")
        page.get_by_role("link", name="Continue with Google").click()
        page.locator("input[name=sub]").fill("g-grace")
        page.locator("input[name=sub]").press("Enter")
        expect(page.get_by_role("heading", name="Your account")).to_be_visible()
        page.goto(f"/device?user_code={code}")
        page.get_by_role("button", name="Continue").click()
        expect(page.get_by_text("pgtally-cli asks to sign in to your account")).to_be_visible()
        page.get_by_role("button", name="Approve").click()
        expect(page.get_by_role("heading", name="Device approved")).to_be_visible()
        out, err = cli.communicate(timeout=60)
    finally:
        cli.kill()
    assert cli.returncode == 0, err
    credentials = tmp_path / "credentials.json"
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
    assert json.loads(credentials.read_text())["url"] == site["base"]
    whoami = subprocess.run([str(PGTALLY), "whoami"], env=env, capture_output=True, text=True, timeout=60)
    assert whoami.returncode == 0 and whoami.stdout.startswith("grace@example.com"), whoami.stderr
    usage = subprocess.run([str(PGTALLY), "usage"], env=env, capture_output=True, text=True, timeout=60)
    assert "generation" in usage.stdout and "of 10" in usage.stdout, usage.stderr
    assert subprocess.run([str(PGTALLY), "logout"], env=env, capture_output=True, timeout=60).returncode == 0
    assert not credentials.exists()
    assert subprocess.run([str(PGTALLY), "whoami"], env=env, capture_output=True, timeout=60).returncode != 0


def screenshot(page: Page, name: str) -> None:
    """README pictures, when PGTALLY_SCREENSHOTS is set (they are committed, not made in CI)."""
    if os.environ.get("PGTALLY_SCREENSHOTS"):
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.set_viewport_size({"width": 900, "height": 1000})
        page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def test_a_device_that_ran_out_buys_pro_through_checkout_and_meters_again(page, site):
    api = httpx.Client(base_url=site["base"], timeout=30)
    device = api.post("/v1/identify", json={"install_id": "e2e-extension-install-0001", "meter": "generation"}).json()
    headers = {"Authorization": f"Bearer {device['access_token']}"}
    for i in range(5):
        assert api.post("/v1/usage/events", json={"meter": "generation"}, headers={**headers, "Idempotency-Key": f"e{i}"}).status_code == 201
    refused = api.post("/v1/usage/events", json={"meter": "generation"}, headers={**headers, "Idempotency-Key": "e5"})
    assert refused.status_code == 402

    page.goto(refused.json()["upgrade_url"])
    expect(page.get_by_text("Choosing for this device's account")).to_be_visible()
    screenshot(page, "pricing")
    page.get_by_role("button", name="Get Pro").click()
    expect(page.get_by_role("heading", name="Stripe stand-in checkout")).to_be_visible()
    page.get_by_role("button", name="Pay").click()
    expect(page.get_by_role("heading", name="Thank you")).to_be_visible()
    again = api.post("/v1/usage/events", json={"meter": "generation"}, headers={**headers, "Idempotency-Key": "e5"})
    assert again.status_code == 201 and again.json()["allowance"]["limit"] == 1000


def test_a_signed_in_user_tops_up_in_one_click_then_cancels_and_keeps_the_plan(page, site):
    page.goto("/signup")
    page.get_by_label("Email").fill("topup@example.com")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign up").click()
    log_in(page, "topup@example.com", PASSWORD)
    # The first bundle goes through Checkout, which saves the card.
    page.goto("/upgrade")
    page.get_by_role("button", name="Buy 10 credits").click()
    page.get_by_role("button", name="Pay").click()
    expect(page.get_by_role("heading", name="Thank you")).to_be_visible()
    page.goto("/dashboard")
    expect(page.locator("#credits")).to_have_text("10")
    # Then one click: the saved card is charged and the webhook grants the credits.
    page.get_by_role("button", name=re.compile("Top up 25 credits")).click()
    expect(page.get_by_role("heading", name="Thank you")).to_be_visible()
    page.goto("/dashboard")
    expect(page.locator("#credits")).to_have_text("35")

    page.goto("/upgrade")
    page.get_by_role("button", name="Get Pro").click()
    page.get_by_role("button", name="Pay").click()
    expect(page.get_by_role("heading", name="Thank you")).to_be_visible()
    page.goto("/dashboard")
    expect(page.get_by_text("You are on pro")).to_be_visible()
    screenshot(page, "dashboard")
    page.get_by_role("button", name="Cancel at period end").click()
    expect(page.get_by_text("will end at the end of this period")).to_be_visible()
    for _ in range(50):                      # Stripe's customer.subscription.updated follows
        page.goto("/dashboard")
        if page.get_by_role("button", name="Keep my plan").count():
            break
        page.wait_for_timeout(100)
    page.get_by_role("button", name="Keep my plan").click()
    expect(page.get_by_text("Your plan continues.")).to_be_visible()
    for _ in range(50):
        page.goto("/dashboard")
        if page.get_by_role("button", name="Cancel at period end").count():
            break
        page.wait_for_timeout(100)
    expect(page.get_by_role("button", name="Cancel at period end")).to_be_visible()


def sign_up(page: Page, email: str) -> None:
    page.goto("/signup")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign up").click()
    expect(page.get_by_role("heading", name="Check your email")).to_be_visible()


def confirm_email(page: Page, site, smtp, email: str) -> None:
    deliver(site)
    page.goto(emailed_link(smtp, email, "Confirm"))
    page.get_by_role("button", name="Confirm my email address").click()
    expect(page.get_by_text(f"{email} is confirmed.")).to_be_visible()


def test_an_owner_invites_a_colleague_who_signs_up_from_the_email_and_sees_the_team(browser, site, smtp):
    lead = browser.new_context(base_url=site["base"]).new_page()
    sign_up(lead, "lead@example.com")
    log_in(lead, "lead@example.com", PASSWORD)
    lead.goto("/teams")
    lead.get_by_label("Name").fill("Studio")
    lead.get_by_role("button", name="Create team").click()
    expect(lead.get_by_role("heading", name="Studio")).to_be_visible()
    lead.get_by_label("Email").fill("mate@example.com")
    lead.get_by_role("button", name="Invite").click()
    expect(lead.get_by_text("Invitation sent to mate@example.com.")).to_be_visible()
    expect(lead.locator("#invitations")).to_contain_text("mate@example.com as member")

    deliver(site)
    link = emailed_link(smtp, "mate@example.com", "invited you")
    mate = browser.new_context(base_url=site["base"]).new_page()
    mate.goto(link)
    expect(mate.get_by_text("Log in (or sign up, then confirm your email)")).to_be_visible()
    mate.get_by_role("link", name="Sign up", exact=True).last.click()
    mate.get_by_label("Email").fill("mate@example.com")
    mate.get_by_label("Password").fill(PASSWORD)
    mate.get_by_role("button", name="Sign up").click()
    confirm_email(mate, site, smtp, "mate@example.com")
    log_in(mate, "mate@example.com", PASSWORD)
    mate.goto(link)
    mate.get_by_role("button", name="Accept the invitation").click()
    expect(mate.get_by_role("heading", name="Studio")).to_be_visible()
    expect(mate.locator("#members")).to_contain_text("lead@example.com")
    expect(mate.locator("#members")).to_contain_text("mate@example.com")
    mate.goto("/teams")
    expect(mate.get_by_role("link", name="Studio")).to_be_visible()
    lead.context.close()
    mate.context.close()


def test_an_admin_adjusts_credits_and_refunds_a_payment_in_admin(page, site):
    api = httpx.Client(base_url=site["base"], timeout=30)
    assert api.post("/v1/auth/signup", json={"email": "buyer@example.com", "password": PASSWORD}).status_code == 202
    buyer = api.post("/v1/auth/login", json={"email": "buyer@example.com", "password": PASSWORD}).json()["access_token"]
    session = api.post("/v1/billing/checkout", json={"price": "bundle_10"}, headers={"Authorization": f"Bearer {buyer}"}).json()
    site["stripe"].pay(site["stripe"].sessions[session["id"]])           # the Pay button; the webhook follows
    assert api.post("/v1/auth/signup", json={"email": "root@pgtally.example", "password": PASSWORD}).status_code == 202
    with psycopg.connect(site["url"], autocommit=True) as conn:
        conn.execute("SELECT api.staff_grant('root@pgtally.example', 'admin')")
    balance = lambda: api.get("/v1/balance", headers={"Authorization": f"Bearer {buyer}"}).json()["credits"]
    assert balance() == "10"

    log_in(page, "root@pgtally.example", PASSWORD)
    page.goto("/admin")
    page.get_by_label("Search").fill("buyer@")
    page.get_by_role("button", name="Search").click()
    page.get_by_role("link", name=re.compile("^[0-9a-f-]{36}$")).first.click()
    expect(page.locator("#credits")).to_have_text("10")
    page.get_by_label("Credits (+/-)").fill("7")
    page.locator("#credit-reason").fill("support ticket 42")
    page.get_by_role("button", name="Adjust credits").click()
    expect(page.get_by_text("adjust_credits")).to_be_visible()
    expect(page.locator("#credits")).to_have_text("17")
    page.get_by_label("Refund reason").fill("duplicate purchase")
    page.get_by_role("button", name="Refund").click()
    expect(page.locator("#audit")).to_contain_text("refund · duplicate purchase")
    for _ in range(50):                      # Stripe's charge.refunded takes the 10 credits back
        if balance() == "7":
            break
        page.wait_for_timeout(100)
    assert balance() == "7"
    page.goto("/admin/audit")
    expect(page.locator("#audit")).to_contain_text("support ticket 42")
    expect(page.locator("#audit")).to_contain_text("duplicate purchase")
