"""Team single sign-on (issue 22, item 1) and the requests pgtally makes to the providers it is
given (item 2), played as an attacker would: a second, hostile OpenID Connect provider
(oidc-provider-mock) that says whatever the attacker wants, a real DNS server (dnslib) that
answers only for the domains each side really controls, and HTTP servers on private addresses."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from litestar.testing import AsyncTestClient
from oidc_provider_mock import User, run_server_in_thread

from api import outbound
from api.app import create_app
from api.settings import Settings
from tests.conftest import LOCAL_PROVIDERS
from tests.http.conftest import BASE, PASSWORD, form, google
from tests.oidc_client import CLAIMS, WEB, answer, authorize_path, exchange, pkce, register, validate_id_token


@pytest.fixture(scope="module")
def corp_idp():
    """The provider corp.example really runs."""
    users = [User(sub="sso-kim", claims={"email": "kim@corp.example", "email_verified": True}),
             User(sub="sso-pat", claims={"email": "pat@corp.example", "email_verified": True}),
             User(sub="sso-lead", claims={"email": "lead@corp.example", "email_verified": True})]
    with run_server_in_thread(user_claims=users, require_nonce=True) as server:
        yield f"http://localhost:{server.server_port}"


@pytest.fixture(scope="module")
def evil_idp():
    """A provider the attacker runs: it vouches for the victim's address."""
    users = [User(sub="victim-by-attacker", claims={"email": "victim@corp.example", "email_verified": True}),
             User(sub="unconfirmed", claims={"email": "new@evil.example", "email_verified": False}),
             User(sub="gmail-victim", claims={"email": "someone@gmail.com", "email_verified": True})]
    with run_server_in_thread(user_claims=users, require_nonce=True) as server:
        yield f"http://localhost:{server.server_port}"


@pytest.fixture
def settings(smtp, dns_zone) -> Settings:
    return Settings(public_url=BASE, pool_max_size=16, smtp_url=f"smtp://127.0.0.1:{smtp.port}",
                    dns_nameservers=(f"127.0.0.1:{dns_zone.port}",), **LOCAL_PROVIDERS)


@pytest.fixture
async def client(db_url, settings):
    async with AsyncTestClient(app=create_app(db_url, settings), base_url=BASE) as c:
        yield c


async def person(client, owner, email: str) -> str:
    """A user with a confirmed address, signed in: their access token."""
    assert (await client.post("/v1/auth/signup", json={"email": email, "password": PASSWORD})).status_code == 202
    owner.execute("SELECT identity.mark_email_verified(id) FROM identity.users WHERE email_normalized = %s", [email])
    r = await client.post("/v1/auth/login", json={"email": email, "password": PASSWORD})
    assert r.status_code == 200, r.text
    return r.json()["access_token"]


async def team_claiming(client, token: str, issuer: str, domains: list[str], require: bool = False):
    headers = {"Authorization": f"Bearer {token}"}
    team = (await client.post("/v1/accounts", json={"name": "Team"}, headers=headers)).json()["id"]
    r = await client.put(f"/v1/accounts/{team}/sso", headers=headers, json={
        "issuer": issuer, "client_id": "corp-sso", "client_secret": "corp-secret", "domains": domains,
        "require_sso": require})
    return team, r


async def prove(client, dns_zone, token: str, team: str, domain: str):
    """Publish the claim's TXT record on the domain (as its owner would), then ask pgtally to check."""
    sso = (await client.get(f"/v1/accounts/{team}/sso", headers={"Authorization": f"Bearer {token}"})).json()
    (record,) = [d["txt_record"] for d in sso["domain_verification"] if d["domain"] == domain]
    dns_zone.txt.setdefault(record["name"], []).append(record["value"])
    return await client.post(f"/v1/accounts/{team}/sso/domains/{domain}/verify", headers={"Authorization": f"Bearer {token}"})


async def corp_team(client, owner, dns_zone, corp_idp, require: bool = False) -> tuple[str, str]:
    """corp.example's own team: its lead claims the domain and proves it in DNS."""
    lead = await person(client, owner, "lead@corp.example")
    team, r = await team_claiming(client, lead, corp_idp, ["Corp.example"], require)
    assert r.status_code == 200 and r.json()["domains"] == ["corp.example"] and "client_secret" not in r.json(), r.text
    assert (await prove(client, dns_zone, lead, team, "corp.example")).json()["domain_verification"][0]["verified"]
    return team, lead


def count(owner, query: str, *args) -> int:
    return owner.execute(query, list(args)).fetchone()[0]


# Item 1: account takeover through team SSO ----------------------------------------------------

async def test_item1_sso_takeover_is_refused_at_each_step(client, owner, smtp, deliver, dns_zone, evil_idp):
    victim_token = await person(client, owner, "victim@corp.example")
    attacker = await person(client, owner, "mallory@evil.example")

    # Public mail domains: refused outright, however they are written, and their subdomains too.
    for domains in (["gmail.com"], ["GoogleMail.com"], ["outlook.com"], ["corp.example", "hotmail.com"], ["eu.yahoo.com"]):
        _, r = await team_claiming(client, attacker, evil_idp, domains, require=True)
        assert r.status_code == 422 and "public mail domain" in r.json()["detail"], r.text
    # Claiming someone else's domain is possible, but it grants nothing ...
    team, r = await team_claiming(client, attacker, evil_idp, ["corp.example"], require=True)
    assert r.status_code == 200 and r.json()["domain_verification"][0]["verified"] is False
    assert (await client.get("/auth/sso/start?email=victim@corp.example")).status_code == 404
    # ... the victim still signs in with their password although the claim says require_sso ...
    assert (await client.post("/v1/auth/login", json={"email": "victim@corp.example", "password": PASSWORD})).status_code == 200
    # ... and the claim cannot be proven: DNS carries no record of the attacker's token.
    r = await client.post(f"/v1/accounts/{team}/sso/domains/corp.example/verify", headers={"Authorization": f"Bearer {attacker}"})
    assert r.status_code == 422 and r.json()["txt_record"]["name"] == "corp.example", r.text
    dns_zone.txt["corp.example"] = ["v=spf1 -all", "pgtally-domain-verification=not-the-attackers-token"]
    r = await client.post(f"/v1/accounts/{team}/sso/domains/corp.example/verify", headers={"Authorization": f"Bearer {attacker}"})
    assert r.status_code == 422
    assert count(owner, "SELECT count(*) FROM identity.sso_domains WHERE verified_at IS NOT NULL") == 0

    # Even a team that did prove the domain (here: the attacker got the record published) cannot
    # take over an existing user: its provider's word signs nobody in, the owner gets an email.
    assert (await prove(client, dns_zone, attacker, team, "corp.example")).status_code == 200
    r = await google(client, "victim-by-attacker", start="/auth/sso/start?email=victim@corp.example")
    assert r.status_code == 200 and "Check your email" in r.text, r.text
    assert "pgtally_session" not in r.cookies
    assert count(owner, "SELECT count(*) FROM identity.user_identities WHERE provider = 'sso'") == 0
    assert count(owner, "SELECT count(*) FROM identity.sessions s JOIN identity.users u ON u.id = s.user_id "
                        "WHERE u.email_normalized = 'victim@corp.example' AND s.method = 'sso'") == 0
    assert count(owner, "SELECT count(*) FROM identity.memberships m JOIN identity.users u ON u.id = m.user_id "
                        "WHERE u.email_normalized = 'victim@corp.example' AND m.account_id = %s", team) == 0
    # So no API key can be minted on the victim's account: the attacker holds no session of theirs.
    assert (await client.get("/account", follow_redirects=False)).status_code in (302, 303)
    await deliver()
    (mail,) = smtp.to("victim@corp.example")[-1:]
    assert "/auth/sso/confirm?token=" in mail.get_content() and "If it was not you" in mail.get_content()
    # require_sso binds members of the team only: the victim, a stranger to it, keeps their password.
    assert (await client.post("/v1/auth/login", json={"email": "victim@corp.example", "password": PASSWORD})).status_code == 200
    assert (await client.get("/v1/me", headers={"Authorization": f"Bearer {victim_token}"})).status_code == 200


async def test_item1_a_public_mail_domain_cannot_be_approved_either(client, owner, evil_idp):
    admin = await person(client, owner, "ops@pgtally.example")
    owner.execute("UPDATE identity.users SET staff_role = 'admin' WHERE email_normalized = 'ops@pgtally.example'")
    attacker = await person(client, owner, "mallory@evil.example")
    team, r = await team_claiming(client, attacker, evil_idp, ["gmail.com", "googlemail.com", "outlook.com"], require=True)
    assert r.status_code == 422
    assert count(owner, "SELECT count(*) FROM identity.sso_domains") == 0
    r = await client.post(f"/v1/admin/accounts/{team}/sso-domains/gmail.com/approval", json={"reason": "asked nicely"},
                          headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code == 404
    # A claim left from before the list named it (or from before 0024) cannot be approved, and a
    # proof it somehow has counts for nothing.
    team, r = await team_claiming(client, attacker, evil_idp, ["evil.example"])
    owner.execute("INSERT INTO identity.sso_domains (account_id, domain, verification_token, claimed_at) "
                  "VALUES (%s, 'gmail.com', 'left-over', now())", [team])
    r = await client.post(f"/v1/admin/accounts/{team}/sso-domains/gmail.com/approval", json={"reason": "asked nicely"},
                          headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code == 422 and "public mail domain" in r.json()["detail"]
    owner.execute("UPDATE identity.sso_domains SET verified_at = now(), verified_by = 'staff' WHERE domain = 'gmail.com'")
    assert (await client.get("/auth/sso/start?email=someone@gmail.com")).status_code == 404
    # A Gmail user keeps signing in with a password whatever any team claims.
    await person(client, owner, "someone@gmail.com")
    assert (await client.post("/v1/auth/login", json={"email": "someone@gmail.com", "password": PASSWORD})).status_code == 200


async def test_item1_a_dns_record_proves_a_domain_once_for_one_team(client, owner, dns_zone, corp_idp, evil_idp):
    squatter = await person(client, owner, "mallory@evil.example")
    squat, r = await team_claiming(client, squatter, evil_idp, ["corp.example"])
    assert r.status_code == 200            # an unproven claim blocks nobody ...
    team, lead = await corp_team(client, owner, dns_zone, corp_idp)
    # ... and once corp.example is proven, nobody else may claim or prove it.
    _, r = await team_claiming(client, squatter, evil_idp, ["corp.example"])
    assert r.status_code == 409
    r = await prove(client, dns_zone, squatter, squat, "corp.example")
    assert r.status_code == 409
    # Proving again is harmless; the proof is kept when the settings are saved again.
    assert (await client.post(f"/v1/accounts/{team}/sso/domains/corp.example/verify",
                              headers={"Authorization": f"Bearer {lead}"})).status_code == 200
    r = await client.put(f"/v1/accounts/{team}/sso", headers={"Authorization": f"Bearer {lead}"}, json={
        "issuer": corp_idp, "client_id": "corp-sso", "client_secret": "corp-secret", "domains": ["corp.example", "corp.test"]})
    assert [(d["domain"], d["verified"], d["verified_by"]) for d in r.json()["domain_verification"]] == [
        ("corp.example", True, "dns"), ("corp.test", False, None)]
    # Only owners (sso:manage) ask for a proof, of a domain their team claimed: DNS is not asked otherwise.
    asked = len(dns_zone.queries)
    assert (await client.post(f"/v1/accounts/{team}/sso/domains/corp.test/verify",
                              headers={"Authorization": f"Bearer {squatter}"})).status_code == 403
    assert (await client.post(f"/v1/accounts/{team}/sso/domains/victim.example/verify",
                              headers={"Authorization": f"Bearer {lead}"})).status_code == 404
    assert len(dns_zone.queries) == asked
    assert count(owner, "SELECT count(*) FROM identity.auth_events WHERE kind = 'sso_domain_verified'") == 1


async def test_item2_plain_http_issuers_are_refused_outside_development(db_url, smtp, owner, dns_zone, upstream):
    production = Settings(public_url=BASE, smtp_url=f"smtp://127.0.0.1:{smtp.port}", outbound_allow=("127.0.0.0/8",),
                          dns_nameservers=(f"127.0.0.1:{dns_zone.port}",))
    async with AsyncTestClient(app=create_app(db_url, production), base_url=BASE) as client:
        lead = await person(client, owner, "lead@corp.example")
        team, r = await team_claiming(client, lead, upstream.url, ["corp.example"])
        assert r.status_code == 422 and r.json()["field"] == "issuer" and "https" in r.json()["detail"]
        # One saved before (in development, or by hand) is not fetched either.
        team, r = await team_claiming(client, lead, "https://sso.corp.example", ["corp.example"])
        assert (await prove(client, dns_zone, lead, team, "corp.example")).status_code == 200
        owner.execute("UPDATE identity.sso_connections SET issuer = %s", [upstream.url])
        r = await client.get("/auth/sso/start?email=kim@corp.example", follow_redirects=False)
        assert r.status_code == 502 and "must use https" in r.text
    assert (upstream.accepts, upstream.hits) == (0, 0)


async def test_item1_a_dns_that_cannot_be_asked_is_502(db_url, smtp, owner, corp_idp):
    dead = Settings(public_url=BASE, smtp_url=f"smtp://127.0.0.1:{smtp.port}", dns_nameservers=("127.0.0.1:9",),
                    **LOCAL_PROVIDERS)
    async with AsyncTestClient(app=create_app(db_url, dead), base_url=BASE) as client:
        lead = await person(client, owner, "lead@corp.example")
        team, _ = await team_claiming(client, lead, corp_idp, ["corp.example"])
        r = await client.post(f"/v1/accounts/{team}/sso/domains/corp.example/verify", headers={"Authorization": f"Bearer {lead}"})
        assert r.status_code == 502 and r.json()["type"].endswith("/upstream-unavailable"), r.text


async def test_item1_staff_approval_proves_a_domain_and_is_audited(client, owner, corp_idp):
    lead = await person(client, owner, "lead@corp.example")
    team, _ = await team_claiming(client, lead, corp_idp, ["corp.example"])
    support = await person(client, owner, "help@pgtally.example")
    admin = await person(client, owner, "ops@pgtally.example")
    owner.execute("UPDATE identity.users SET staff_role = CASE WHEN email_normalized LIKE 'help@%%' THEN 'support' ELSE 'admin' END "
                  "WHERE email_normalized LIKE '%%@pgtally.example'")
    path = f"/v1/admin/accounts/{team}/sso-domains/corp.example/approval"
    for token in (lead, support):           # a customer, and support staff: not theirs to approve
        assert (await client.post(path, json={"reason": "x"}, headers={"Authorization": f"Bearer {token}"})).status_code == 403
    assert (await client.post(path, json={"reason": ""}, headers={"Authorization": f"Bearer {admin}"})).status_code == 422
    r = await client.post(path, json={"reason": "domain registrar letter, ticket 4711"}, headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code == 200 and r.json()["domain_verification"][0]["verified_by"] == "staff"
    assert owner.execute("SELECT action, target_account_id::text, reason FROM ops.audit_log").fetchall() == [
        ("approve_sso_domain", team, "domain registrar letter, ticket 4711")]
    assert (await client.get("/auth/sso/start?email=kim@corp.example", follow_redirects=False)).status_code in (302, 303)


async def test_item1_an_existing_user_links_the_teams_sign_in_from_the_emailed_link(client, owner, smtp, deliver,
                                                                                   dns_zone, corp_idp):
    await person(client, owner, "kim@corp.example")
    team, lead = await corp_team(client, owner, dns_zone, corp_idp)
    r = await google(client, "sso-kim", start="/auth/sso/start?email=kim@corp.example")
    assert r.status_code == 200 and "Check your email" in r.text and "pgtally_session" not in r.cookies
    await deliver()
    token = smtp.token("kim@corp.example", "single sign-on")
    page = await client.get(f"/auth/sso/confirm?token={token}")
    assert page.status_code == 200 and "Link and sign in" in page.text      # a button: mail scanners use nothing
    assert count(owner, "SELECT count(*) FROM identity.user_identities WHERE provider = 'sso'") == 0
    csrf = page.text.split('name="_csrf_token" value="')[1].split('"')[0]
    r = await client.post("/auth/sso/confirm", data={"token": token, "_csrf_token": csrf}, follow_redirects=False)
    assert r.status_code in (302, 303), r.text
    (user_id,) = owner.execute("SELECT id FROM identity.users WHERE email_normalized = 'kim@corp.example'").fetchone()
    assert owner.execute("SELECT role FROM identity.memberships WHERE account_id = %s AND user_id = %s", [team, user_id]).fetchone() == ("member",)
    # Used once.
    r = await client.post("/auth/sso/confirm", data={"token": token, "_csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 400
    # From now on the team's provider signs Kim straight in.
    client.cookies.clear()
    r = await google(client, "sso-kim", start="/auth/sso/start?email=kim@corp.example&next=/teams")
    assert r.status_code in (302, 303) and r.headers["location"] == "/teams", r.text


async def test_item1_a_team_name_with_a_line_break_still_gets_its_link_email_out(client, owner, smtp, deliver,
                                                                                  dns_zone, corp_idp):
    await person(client, owner, "kim@corp.example")
    lead = await person(client, owner, "lead@corp.example")
    headers = {"Authorization": f"Bearer {lead}"}
    team = (await client.post("/v1/accounts", json={"name": "Corp\nBcc: x@evil.example"}, headers=headers)).json()["id"]
    await client.put(f"/v1/accounts/{team}/sso", headers=headers, json={
        "issuer": corp_idp, "client_id": "corp-sso", "client_secret": "corp-secret", "domains": ["corp.example"]})
    assert (await prove(client, dns_zone, lead, team, "corp.example")).status_code == 200
    assert "Check your email" in (await google(client, "sso-kim", start="/auth/sso/start?email=kim@corp.example")).text
    assert await deliver() >= 1
    (mail,) = smtp.to("kim@corp.example")[-1:]
    assert mail["Subject"] == "Sign in with Corp Bcc: x@evil.example's single sign-on" and mail["Bcc"] is None


async def test_item1_a_teams_own_provider_signs_new_people_in_as_members(client, owner, dns_zone, corp_idp, evil_idp):
    team, lead = await corp_team(client, owner, dns_zone, corp_idp)
    r = await google(client, "sso-pat", start="/auth/sso/start?email=pat@corp.example&next=/teams")
    assert r.status_code in (302, 303) and r.headers["location"] == "/teams", r.text
    (user_id, verified) = owner.execute("SELECT id, email_verified_at IS NOT NULL FROM identity.users "
                                        "WHERE email_normalized = 'pat@corp.example'").fetchone()
    assert verified
    assert owner.execute("SELECT role FROM identity.memberships WHERE account_id = %s AND user_id = %s",
                         [team, user_id]).fetchone() == ("member",)
    assert owner.execute("SELECT method FROM identity.sessions WHERE user_id = %s", [user_id]).fetchone() == ("sso",)
    assert (await client.get("/auth/sso/start?email=x@elsewhere.example")).status_code == 404


async def test_item1_require_sso_binds_the_teams_members_not_strangers(client, owner, smtp, deliver, dns_zone, corp_idp):
    await person(client, owner, "pat@corp.example")              # shares the domain, not a member
    team, lead = await corp_team(client, owner, dns_zone, corp_idp, require=True)
    assert (await client.post("/v1/auth/login", json={"email": "pat@corp.example", "password": PASSWORD})).status_code == 200
    # The lead is a member of the team that requires it: the password no longer signs them in ...
    r = await client.post("/v1/auth/login", json={"email": "lead@corp.example", "password": PASSWORD})
    assert r.status_code == 403 and r.json()["sso_url"] == "/auth/sso/start?email=lead@corp.example"
    # ... the team's provider does, once the lead confirmed the link from their mailbox.
    assert "Check your email" in (await google(client, "sso-lead", start="/auth/sso/start?email=lead@corp.example")).text
    await deliver()
    token = smtp.token("lead@corp.example", "single sign-on")
    page = await client.get(f"/auth/sso/confirm?token={token}")
    csrf = page.text.split('name="_csrf_token" value="')[1].split('"')[0]
    assert (await client.post("/auth/sso/confirm", data={"token": token, "_csrf_token": csrf},
                              follow_redirects=False)).status_code in (302, 303)
    # Turned off, the password works again.
    sso_session = owner.execute("SELECT s.id FROM identity.sessions s JOIN identity.users u ON u.id = s.user_id "
                                "WHERE u.email_normalized = 'lead@corp.example' AND s.method = 'sso'").fetchone()
    assert sso_session
    owner.execute("DELETE FROM identity.sso_connections WHERE account_id = %s", [team])
    assert (await client.post("/v1/auth/login", json={"email": "lead@corp.example", "password": PASSWORD})).status_code == 200


async def test_item1_a_provider_signs_in_its_teams_proven_domains_only(client, owner, dns_zone, corp_idp, evil_idp):
    await corp_team(client, owner, dns_zone, corp_idp)
    attacker = await person(client, owner, "mallory@evil.example")
    team, _ = await team_claiming(client, attacker, evil_idp, ["evil.example"])
    assert (await prove(client, dns_zone, attacker, team, "evil.example")).status_code == 200
    # The attacker's provider, started for the attacker's proven domain, names a corp.example address.
    r = await google(client, "victim-by-attacker", start="/auth/sso/start?email=mallory@evil.example")
    assert r.status_code == 400 and "its team" in r.text
    assert count(owner, "SELECT count(*) FROM identity.users WHERE email_normalized = 'victim@corp.example'") == 0
    # Nor does a team's provider sign up an address it does not say it confirmed.
    r = await google(client, "unconfirmed", start="/auth/sso/start?email=new@evil.example")
    assert r.status_code == 400 and "did not confirm" in r.text
    assert count(owner, "SELECT count(*) FROM identity.users WHERE email_normalized = 'new@evil.example'") == 0


# Item 2: server-side requests ----------------------------------------------------------------

class Upstream:
    """An HTTP server on 127.0.0.1 that counts the connections it accepts and the requests it gets,
    and answers each path from ``routes``: ``{path: (status, body or body(handler))}``."""

    def __init__(self) -> None:
        self.hits = 0
        self.accepts = 0
        self.routes: dict[str, tuple[int, object]] = {}
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def answer(self):
                upstream.hits += 1
                status, body = upstream.routes.get(self.path.split("?")[0], (404, b"{}"))
                body = body(self) if callable(body) else body
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                if isinstance(body, bytes):
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                else:                   # an iterable of (delay, bytes): a provider that drips
                    self.end_headers()
                    try:
                        for delay, part in body:
                            time.sleep(delay)
                            self.wfile.write(part)
                            self.wfile.flush()
                    except (BrokenPipeError, ConnectionResetError):
                        pass            # pgtally gave up on it, as it should

            do_GET = do_POST = answer  # noqa: N815 - http.server's method names

            def log_message(self, *args):
                pass

        class Counting(ThreadingHTTPServer):
            daemon_threads = True

            def verify_request(self, request, client_address):
                upstream.accepts += 1
                return True

        self.server = Counting(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def discovery(self, **overrides) -> None:
        """Serve a discovery document naming this server's endpoints."""
        document = {"issuer": self.url, "authorization_endpoint": f"{self.url}/authorize",
                    "token_endpoint": f"{self.url}/token", "jwks_uri": f"{self.url}/jwks", **overrides}
        self.routes["/.well-known/openid-configuration"] = (200, json.dumps(document).encode())

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def upstream():
    server = Upstream()
    yield server
    server.close()


async def sso_team_at(client, owner, dns_zone, issuer: str) -> None:
    lead = await person(client, owner, "lead@corp.example")
    team, r = await team_claiming(client, lead, issuer, ["corp.example"])
    assert r.status_code == 200, r.text
    assert (await prove(client, dns_zone, lead, team, "corp.example")).status_code == 200


@pytest.mark.parametrize("env, allow, issuer, why", [
    ("development", (), "{upstream}", "may not reach"),                        # loopback, not allowed
    ("development", (), "http://localhost:{port}", "may not reach"),           # a name for it: no probe either
    ("development", (), "http://169.254.169.254", "may not reach"),            # cloud metadata (link-local)
    ("development", (), "http://10.1.2.3:8080", "may not reach"),              # private
    ("development", (), "http://[::ffff:127.0.0.1]:{port}", "may not reach"),  # loopback in disguise
    ("development", (), "http://[64:ff9b::7f00:1]:{port}", "may not reach"),   # ... through NAT64
    ("development", (), "http://[2002:7f00:1::1]:{port}", "may not reach"),    # ... through 6to4
    ("development", (), "http://[::7f00:1]:{port}", "may not reach"),          # IPv4-compatible
    ("development", (), "http://[ff02::1]:{port}", "may not reach"),           # multicast
])
async def test_item2_sso_issuers_on_internal_addresses_are_never_fetched(db_url, smtp, owner, dns_zone, upstream,
                                                                         env, allow, issuer, why):
    settings = Settings(public_url=BASE, smtp_url=f"smtp://127.0.0.1:{smtp.port}", env=env, outbound_allow=allow,
                        dns_nameservers=(f"127.0.0.1:{dns_zone.port}",))
    issuer = issuer.format(upstream=upstream.url, port=upstream.server.server_port)
    async with AsyncTestClient(app=create_app(db_url, settings), base_url=BASE) as client:
        await sso_team_at(client, owner, dns_zone, issuer)
        r = await client.get("/auth/sso/start?email=kim@corp.example", follow_redirects=False)
        assert r.status_code == 502 and why in r.text, r.text
    assert (upstream.accepts, upstream.hits) == (0, 0)       # not even a connection was opened


@pytest.mark.parametrize("answer, why", [
    (b"<html>not json</html>", "is not JSON"),
    (b"[1, 2]", "is not a JSON object"),
    (b"[" * 60_000 + b"]" * 60_000, "is not JSON"),                           # nested past Python's recursion
    (b'{"issuer": "' + b"x" * 300_000 + b'"}', "larger than"),
    (b'{"issuer": "https://accounts.evil.example"}', "names another issuer"),
    (lambda h: json.dumps({"issuer": f"http://127.0.0.1:{h.server.server_port}",
                           "authorization_endpoint": "file:///etc/passwd", "token_endpoint": "x", "jwks_uri": "x"}).encode(),
     "not an http(s) URL"),
    (None, "answered HTTP 500"),
])
async def test_item2_bad_provider_answers_are_502_pages_not_500(client, owner, dns_zone, upstream, answer, why):
    now = [0.0]
    client.app.state.oidc_metadata = outbound.metadata_cache(timer=lambda: now[0])
    upstream.routes["/.well-known/openid-configuration"] = (200, answer) if answer is not None else (500, b"oops")
    await sso_team_at(client, owner, dns_zone, upstream.url)
    r = await client.get("/auth/sso/start?email=kim@corp.example", follow_redirects=False)
    assert r.status_code == 502 and why in r.text and "Sign-in is unavailable" in r.text, r.text
    # A failure is remembered for a minute: every visitor does not make pgtally ask again ...
    assert (await client.get("/auth/sso/start?email=kim@corp.example", follow_redirects=False)).status_code == 502
    assert upstream.hits == 1
    # ... then it asks again.
    now[0] += outbound.FAILURE_TTL_SECONDS + 1
    await client.get("/auth/sso/start?email=kim@corp.example", follow_redirects=False)
    assert upstream.hits == 2


async def test_item2_a_provider_that_drips_its_answer_is_cut_off(client, owner, dns_zone, upstream):
    # One byte every 4 s passes the 5 s read timeout each time: the whole exchange's deadline ends it.
    upstream.routes["/.well-known/openid-configuration"] = (200, [(4, b" ")] * 10)
    await sso_team_at(client, owner, dns_zone, upstream.url)
    started = time.monotonic()
    r = await client.get("/auth/sso/start?email=kim@corp.example", follow_redirects=False)
    assert r.status_code == 502 and "took longer than" in r.text
    assert time.monotonic() - started < outbound.DEADLINE_SECONDS + 5


async def started_flow(client, owner, dns_zone, upstream) -> str:
    """A sign-in through a hostile provider started at pgtally: the callback URL to come back to."""
    upstream.discovery()
    await sso_team_at(client, owner, dns_zone, upstream.url)
    r = await client.get("/auth/sso/start?email=kim@corp.example", follow_redirects=False)
    assert r.status_code in (302, 303), r.text
    state = parse_qs(urlsplit(r.headers["location"]).query)["state"][0]
    return f"/auth/sso/callback?state={state}&code=the-code"


@pytest.mark.parametrize("token_answer, why", [
    (b'{"access_token": "' + b"x" * 300_000 + b'"}', "cannot be used right now"),   # too big: not read whole
    (b"<html>", "cannot be used right now"),
    (b"[1, 2]", "cannot be used right now"),
])
async def test_item2_a_hostile_token_endpoint_is_a_502_page(client, owner, dns_zone, upstream, token_answer, why):
    back = await started_flow(client, owner, dns_zone, upstream)
    upstream.routes["/token"] = (200, token_answer)
    r = await client.get(back, follow_redirects=False)
    assert r.status_code == 502 and why in r.text, r.text
    assert "pgtally_session" not in r.cookies


async def test_item2_an_id_token_naming_the_user_oddly_is_refused(client, owner, dns_zone, upstream):
    from joserfc import jwt
    from joserfc.jwk import RSAKey

    key = RSAKey.generate_key(2048, parameters={"kid": "k1"})
    upstream.routes["/jwks"] = (200, json.dumps({"keys": [key.as_dict(private=False)]}).encode())
    back = await started_flow(client, owner, dns_zone, upstream)
    flow_nonce = owner.execute("SELECT nonce FROM identity.oauth_flows ORDER BY created_at DESC LIMIT 1").fetchone()[0]
    claims = {"iss": upstream.url, "aud": "corp-sso", "exp": int(time.time()) + 300, "iat": int(time.time()),
              "nonce": flow_nonce, "sub": "kim\x00", "email": {"not": "a string"}, "email_verified": True}
    id_token = jwt.encode({"alg": "RS256", "kid": "k1"}, claims, key)
    upstream.routes["/token"] = (200, json.dumps({"access_token": "a", "token_type": "Bearer", "id_token": id_token}).encode())
    r = await client.get(back, follow_redirects=False)
    assert r.status_code == 400 and "cannot use" in r.text, r.text
    assert count(owner, "SELECT count(*) FROM identity.users WHERE email_normalized LIKE 'kim@%%'") == 0
async def test_item2_provider_metadata_is_cached_for_an_hour_then_read_again(client, owner, dns_zone, upstream):
    now = [0.0]
    client.app.state.oidc_metadata = outbound.metadata_cache(timer=lambda: now[0])
    upstream.discovery()
    await sso_team_at(client, owner, dns_zone, upstream.url)
    for _ in range(3):
        r = await client.get("/auth/sso/start?email=kim@corp.example", follow_redirects=False)
        assert r.status_code in (302, 303) and r.headers["location"].startswith(f"{upstream.url}/authorize?")
    assert upstream.hits == 1
    now[0] += outbound.METADATA_TTL_SECONDS + 1
    await client.get("/auth/sso/start?email=kim@corp.example", follow_redirects=False)
    assert upstream.hits == 2


# Team SSO inside an app's authorization request (issue 25, item 4) -----------------------------

async def test_item4_team_sso_inside_the_authorization_flow_names_the_team(client, owner, dns_zone, corp_idp):
    team, _ = await corp_team(client, owner, dns_zone, corp_idp)
    app = register(owner, "Web app", WEB, public=True, first_party=True)
    verifier, challenge = pkce()
    path = authorize_path(app["client_id"], WEB, challenge)
    start = f"/auth/sso/start?{urlencode({'email': 'pat@corp.example', 'next': path})}"
    r = await google(client, "sso-pat", start=start)
    assert r.status_code in (302, 303) and r.headers["location"] == path, r.text
    params = answer(await client.get(path, follow_redirects=False), WEB)
    tokens = (await exchange(client, params["code"], WEB, verifier, app["client_id"])).json()
    claims = await validate_id_token(client, tokens["id_token"], app["client_id"], "n-1")
    assert claims["email"] == "pat@corp.example" and claims["email_verified"] is True
    assert claims[CLAIMS]["teams"] == [{"account_id": team, "name": "Team", "role": "member"}]


# Issue 25: team SSO in a browser -----------------------------------------------------------------

async def test_item3_account_page_names_a_linked_sso_identity_by_its_team(client, owner, dns_zone, corp_idp):
    team, lead = await corp_team(client, owner, dns_zone, corp_idp)
    owner.execute("UPDATE identity.accounts SET name = 'Corp Inc' WHERE id = %s", [team])
    r = await google(client, "sso-pat", start="/auth/sso/start?email=pat@corp.example&next=/account")
    assert r.status_code in (302, 303), r.text
    shown = (await client.get("/account")).text
    assert "Corp Inc (pat@corp.example)" in shown and "GitHub" not in shown, shown
    # The team turns SSO off: the identity is still linked, and named for what it is.
    assert (await client.delete(f"/v1/accounts/{team}/sso", headers={"Authorization": f"Bearer {lead}"})).status_code == 200
    shown = (await client.get("/account")).text
    assert "Your organisation&#39;s sign-in (pat@corp.example)" in shown and "GitHub" not in shown, shown


async def test_item4_an_owner_sets_up_proves_and_turns_off_sso_on_the_teams_page(client, owner, dns_zone, corp_idp):
    lead = await person(client, owner, "lead@corp.example")
    team = (await client.post("/v1/accounts", json={"name": "Corp"}, headers={"Authorization": f"Bearer {lead}"})).json()["id"]
    assert (await form(client, "/login", {"email": "lead@corp.example", "password": PASSWORD})).status_code in (302, 303)
    assert f'href="/teams/{team}/sso"' in (await client.get(f"/teams/{team}")).text
    r = await client.get(f"/teams/{team}/sso")
    assert r.status_code == 200 and "Set it up" in r.text and f"{BASE}/auth/sso/callback" in r.text
    # Settings through the JSON endpoint's Struct and rules: a refusal is shown, nothing saved.
    r = await form(client, f"/teams/{team}/sso", {"issuer": corp_idp, "client_id": "corp-sso", "client_secret": "s",
                                                  "domains": "gmail.com"})
    assert r.status_code == 422 and "public mail domain" in r.text
    assert count(owner, "SELECT count(*) FROM identity.sso_connections WHERE account_id = %s", team) == 0
    r = await form(client, f"/teams/{team}/sso", {"issuer": corp_idp, "client_id": "corp-sso", "client_secret": "s",
                                                  "domains": "Corp.example\nlabs.corp.example", "require_sso": "on"})
    assert r.status_code == 200 and "Single sign-on saved." in r.text, r.text
    assert owner.execute("SELECT issuer, client_id, client_secret, require_sso FROM identity.sso_connections "
                         "WHERE account_id = %s", [team]).fetchone() == (corp_idp, "corp-sso", "s", True)
    (token,) = owner.execute("SELECT verification_token FROM identity.sso_domains WHERE account_id = %s "
                             "AND domain = 'corp.example'", [team]).fetchone()
    record = f"pgtally-domain-verification={token}"
    assert r.text.count("not verified") == 2 and record in r.text and corp_idp in r.text and "corp-sso" in r.text
    # Check DNS: before the record is published, then after.
    r = await form(client, f"/teams/{team}/sso/domains/corp.example/verify", {}, f"/teams/{team}/sso")
    assert r.status_code == 422 and "No TXT record" in r.text and r.text.count("not verified") == 2
    dns_zone.txt["corp.example"] = [record]
    r = await form(client, f"/teams/{team}/sso/domains/corp.example/verify", {}, f"/teams/{team}/sso")
    assert r.status_code == 200 and "corp.example is verified." in r.text and r.text.count("not verified") == 1
    assert owner.execute("SELECT verified_by FROM identity.sso_domains WHERE account_id = %s AND domain = 'corp.example'",
                         [team]).fetchone() == ("dns",)
    # The owner turns it off; someone who is not its owner may not see the page.
    r = await form(client, f"/teams/{team}/sso/delete", {}, f"/teams/{team}/sso")
    assert r.status_code == 200 and "Single sign-on is off." in r.text and "Set it up" in r.text
    assert count(owner, "SELECT count(*) FROM identity.sso_connections WHERE account_id = %s", team) == 0
    await client.post("/logout", data={"_csrf_token": "x"})
    client.cookies.clear()
    await person(client, owner, "kim@corp.example")
    assert (await form(client, "/login", {"email": "kim@corp.example", "password": PASSWORD})).status_code in (302, 303)
    assert (await client.get(f"/teams/{team}/sso")).status_code == 403
