"""Team single sign-on in Chromium (issue 25): the "Single sign-on" form of /login reaches the
team's own provider under the page's CSP, and is shown only once some team proved a domain. The
team's provider is the site's local OpenID Connect provider (its users set over its API)."""

from __future__ import annotations

import httpx
import psycopg
from playwright.sync_api import Page, expect

from tests.e2e.conftest import PASSWORD


def sso_team(site, proven: bool) -> None:
    """corp.example's team: its lead signs up, creates the team and sets its provider up; with
    ``proven`` the domain is proven (as staff approval would, straight in the database), and the
    provider knows kim@corp.example. Once proven, it stays so for the module's site."""
    issuer = site["settings"].google_issuer
    httpx.put(f"{issuer}/users/sso-kim", json={"email": "kim@corp.example", "email_verified": True}).raise_for_status()
    with httpx.Client(base_url=site["base"]) as api, psycopg.connect(site["url"], autocommit=True) as owner:
        if owner.execute("SELECT 1 FROM identity.sso_domains WHERE domain = 'corp.example' AND verified_at IS NOT NULL").fetchone():
            return                               # an earlier test of this module's site proved it
        api.post("/v1/auth/signup", json={"email": "lead@corp.example", "password": PASSWORD})
        owner.execute("SELECT identity.mark_email_verified(id) FROM identity.users WHERE email_normalized = 'lead@corp.example'")
        token = api.post("/v1/auth/login", json={"email": "lead@corp.example", "password": PASSWORD}).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        team = api.post("/v1/accounts", json={"name": "Corp"}, headers=headers).json()["id"]
        r = api.put(f"/v1/accounts/{team}/sso", headers=headers, json={
            "issuer": issuer, "client_id": "corp-sso", "client_secret": "corp-secret", "domains": ["corp.example"]})
        assert r.status_code == 200, r.text
        if proven:
            owner.execute("UPDATE identity.sso_domains SET verified_at = now(), verified_by = 'staff' WHERE account_id = %s",
                          [team])


def test_item2_the_sso_form_shows_only_once_a_team_proved_a_domain(page: Page, site):
    page.goto("/login")
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    expect(page.get_by_role("button", name="Single sign-on")).to_have_count(0)
    sso_team(site, proven=False)                 # claimed, not proven: still nobody signs in through it
    page.goto("/signup")
    expect(page.get_by_role("button", name="Single sign-on")).to_have_count(0)
    sso_team(site, proven=True)
    page.goto("/signup")
    expect(page.get_by_role("button", name="Single sign-on")).to_be_visible()
    page.goto("/login")
    expect(page.get_by_role("button", name="Single sign-on")).to_be_visible()


def test_item1_the_sso_form_reaches_the_teams_provider_in_chromium(page: Page, site):
    sso_team(site, proven=True)
    page.goto("/login?next=/account")
    page.get_by_label("Company sign-in address").fill("kim@corp.example")
    page.get_by_role("button", name="Single sign-on").click()
    page.locator("input[name=sub]").fill("sso-kim")          # the team's provider's own page
    page.locator("input[name=sub]").press("Enter")
    expect(page.get_by_role("heading", name="Your account")).to_be_visible()
    expect(page.get_by_text("kim@corp.example confirmed")).to_be_visible()
