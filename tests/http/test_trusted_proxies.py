"""The client IP that rate limits, the auth event log and the same-IP referral rule see:
``X-Forwarded-For`` is believed only as far as it was written by proxies in
PGTALLY_TRUSTED_PROXIES (issue 22 item 10). The app runs under uvicorn on a real port, as
``pgtally serve`` runs it, and requests come from 127.0.0.1."""

from __future__ import annotations

import ipaddress

import httpx
import pytest

from api.app import create_app
from api.calls import client_ip
from api.settings import Settings
from tests.conftest import free_port, serving
from tests.http.conftest import PUBLIC_URL

PASSWORD = "violet-harbour-tangent-42"


def signup(base: str, email: str, forwarded_for: list[str]) -> httpx.Response:
    headers = [("X-Forwarded-For", value) for value in forwarded_for]
    return httpx.post(f"{base}/v1/auth/signup", json={"email": email, "password": PASSWORD}, headers=headers)


def signup_ips(owner) -> list[str]:
    return [ip for (ip,) in owner.execute("SELECT ip FROM identity.auth_events WHERE kind = 'signup' ORDER BY id")]


def test_item10_x_forwarded_for_from_an_untrusted_client_is_ignored(db_url, owner):
    with serving(create_app(db_url, Settings(public_url=PUBLIC_URL)), free_port()) as base:
        # A new made-up address each time does not buy a new allowance: 10 sign-ups an hour per IP.
        answers = [signup(base, f"user{i}@example.com", [f"203.0.113.{i}"]).status_code for i in range(11)]
    assert answers == [202] * 10 + [429]
    assert signup_ips(owner) == ["127.0.0.1"] * 10


def test_item10_x_forwarded_for_is_believed_as_far_as_trusted_proxies_wrote_it(db_url, owner):
    settings = Settings(public_url=PUBLIC_URL, trusted_proxies=Settings.parse_proxies("127.0.0.1, 10.0.0.0/8"))
    with serving(create_app(db_url, settings), free_port()) as base:
        # The client sent a made-up first entry; the edge proxy appended the address it saw
        # (203.0.113.9), an inner proxy (10.1.2.3) appended the edge's; 127.0.0.1 is the last hop.
        assert signup(base, "ada@example.com", ["198.51.100.7, 203.0.113.9", "10.1.2.3"]).status_code == 202
        assert signup(base, "bob@example.com", ["10.9.9.9, 10.1.2.3"]).status_code == 202       # proxies all the way
        assert signup(base, "eve@example.com", []).status_code == 202
    assert signup_ips(owner) == ["203.0.113.9", "10.9.9.9", "127.0.0.1"]


TRUSTED = Settings.parse_proxies("127.0.0.1, ::1, 10.0.0.0/8, 2001:db8:1::/48")


@pytest.mark.parametrize("peer, forwarded_for, expected", [
    ("192.0.2.1", ["203.0.113.9"], "192.0.2.1"),                       # not a proxy: its own address
    ("10.0.0.2", ["198.51.100.7, 203.0.113.9"], "203.0.113.9"),       # the right-most untrusted entry
    ("10.0.0.2", ["198.51.100.7", "203.0.113.9, 10.3.3.3"], "203.0.113.9"),   # several header lines
    ("10.0.0.2", ["203.0.113.9:4711"], "203.0.113.9"),                # with a port
    ("::1", ["[2001:db8:2::7]:443"], "2001:db8:2::7"),
    ("::ffff:10.0.0.2", ["2001:DB8:2::7"], "2001:db8:2::7"),          # an IPv4-mapped peer; normalised output
    ("10.0.0.2", ["2001:db8:1::5, 10.0.0.3"], "2001:db8:1::5"),       # all trusted: the farthest one
    ("10.0.0.2", ["203.0.113.9, not-an-ip"], "10.0.0.2"),             # garbage from a proxy: stop at the proxy
    ("10.0.0.2", [], "10.0.0.2"),
    ("testclient", ["203.0.113.9"], "testclient"),                    # not an IP (a test client): as it is
    (None, ["203.0.113.9"], None),                                    # a unix socket
])
def test_item10_client_ip_takes_the_right_most_untrusted_address(peer, forwarded_for, expected):
    assert client_ip(peer, forwarded_for, TRUSTED) == expected


def test_item10_trusted_proxies_are_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("PGTALLY_TRUSTED_PROXIES", " 10.0.0.0/8 ,192.0.2.7,, 2001:db8::/32 ")
    assert Settings.from_env().trusted_proxies == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.0.2.7/32"),
                                                   ipaddress.ip_network("2001:db8::/32"))
    monkeypatch.delenv("PGTALLY_TRUSTED_PROXIES")
    assert Settings.from_env().trusted_proxies == ()
    monkeypatch.setenv("PGTALLY_TRUSTED_PROXIES", "10.0.0.0/8, proxy.internal")
    with pytest.raises(ValueError, match="PGTALLY_TRUSTED_PROXIES.*proxy.internal"):
        Settings.from_env()
