"""Requests pgtally makes to addresses it did not choose itself: a team's SSO issuer, the endpoints
its discovery document names, the sign-in providers' URLs, DNS lookups of claimed domains.

Outbound requests go only where the operator allowed (OWASP's SSRF prevention cheat sheet):
- https only, unless ``PGTALLY_ENV=development``;
- never to a loopback, private, link-local, shared, reserved or otherwise non-global address,
  unless the operator allowed that network (``PGTALLY_OUTBOUND_ALLOW``, e.g. ``127.0.0.1/32`` for
  a provider on this machine). httpx-secure checks the address each connection really goes to,
  after DNS, and connects to that very address: a name that resolves to 10.0.0.1, or that changes
  its answer between check and use (DNS rebinding), is refused too;
- bounded: a connect and read timeout, and a size limit on every document read;
- any failure is :class:`Unavailable`, which the callers answer 502, never 500.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any
from urllib.parse import urlsplit

import dns.asyncresolver
import dns.exception
import dns.resolver
import httpx
from cachetools import TTLCache
from httpx_secure import SSRFProtectionError, httpx_ssrf_protection

TIMEOUT = httpx.Timeout(5.0)
"""Seconds to connect, and between bytes read, for every outbound HTTP request."""
MAX_DOCUMENT_BYTES = 256 * 1024
"""The largest discovery document or JWKS read (Google's are under 5 KiB)."""
METADATA_TTL_SECONDS = 3600
"""How long a discovery document is kept before it is read again (its keys rotate)."""
NAT64 = ipaddress.ip_network("64:ff9b::/96")


class Unavailable(Exception):
    """An outbound request was refused by policy or failed; the message says which, in plain words."""


def allowed_networks(settings) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The networks the operator allowed beyond the public internet (PGTALLY_OUTBOUND_ALLOW)."""
    return [ipaddress.ip_network(n.strip(), strict=False) for n in settings.outbound_allow if n.strip()]


def address_allowed(settings, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A public address, or one in a network the operator allowed. An IPv4 address embedded in
    the NAT64 prefix is judged as itself."""
    if address in NAT64:
        address = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_global or any(address in net for net in allowed_networks(settings))


def check_url(settings, url: Any, what: str) -> str:
    """``url`` if pgtally may fetch it: an absolute http(s) URL, https outside development.
    Raises :class:`Unavailable` otherwise."""
    if not isinstance(url, str) or len(url) > 2000:
        raise Unavailable(f"{what} is not a URL")
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.username or parts.password:
        raise Unavailable(f"{what} is not an http(s) URL")
    if parts.scheme != "https" and settings.env != "development":
        raise Unavailable(f"{what} must use https")
    return url


def guarded(client: httpx.AsyncClient, settings) -> httpx.AsyncClient:
    """Make ``client`` (an httpx or authlib client, created with ``trust_env=False``) refuse every
    connection to an address :func:`address_allowed` refuses."""
    return httpx_ssrf_protection(client, check_globally_reachable=False,
                                 custom_validator=lambda host, address, port: address_allowed(settings, address))


def client(settings, **kwargs: Any) -> httpx.AsyncClient:
    """A plain guarded client."""
    return guarded(httpx.AsyncClient(timeout=TIMEOUT, trust_env=False, follow_redirects=False, **kwargs), settings)


async def read_json(http: httpx.AsyncClient, settings, url: str, what: str) -> dict[str, Any]:
    """GET a JSON object of at most MAX_DOCUMENT_BYTES through a guarded client."""
    check_url(settings, url, what)
    try:
        async with http.stream("GET", url, headers={"Accept": "application/json"}) as response:
            if response.status_code != 200:
                raise Unavailable(f"{what} answered HTTP {response.status_code}")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_DOCUMENT_BYTES:
                    raise Unavailable(f"{what} is larger than {MAX_DOCUMENT_BYTES // 1024} KiB")
    except SSRFProtectionError:
        raise Unavailable(f"{what} is on an address pgtally may not reach (not public; PGTALLY_OUTBOUND_ALLOW)") from None
    except httpx.HTTPError as exc:
        raise Unavailable(f"{what} could not be reached ({type(exc).__name__})") from None
    try:
        document = json.loads(body)
    except ValueError:
        raise Unavailable(f"{what} is not JSON") from None
    if not isinstance(document, dict):
        raise Unavailable(f"{what} is not a JSON object")
    return document


def metadata_cache(**kwargs: Any) -> TTLCache:
    """Discovery documents by issuer, each for METADATA_TTL_SECONDS, at most 1,000 issuers
    (``kwargs``: cachetools' ``timer``)."""
    return TTLCache(maxsize=1000, ttl=METADATA_TTL_SECONDS, **kwargs)


async def oidc_metadata(cache: TTLCache, settings, issuer: str) -> dict[str, Any]:
    """An issuer's OpenID Connect discovery document (OpenID Connect Discovery 1.0 section 4),
    checked: its ``issuer`` is the one asked for (section 4.3), and the endpoints pgtally uses are
    URLs it may fetch. Cached for METADATA_TTL_SECONDS; a failure is not cached."""
    issuer = check_url(settings, issuer.rstrip("/"), "the provider's issuer")
    if issuer in cache:
        return cache[issuer]
    async with client(settings) as http:
        document = await read_json(http, settings, f"{issuer}/.well-known/openid-configuration",
                                   "the provider's discovery document")
    if str(document.get("issuer", "")).rstrip("/") != issuer:
        raise Unavailable("the provider's discovery document names another issuer")
    for field in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
        check_url(settings, document.get(field), f"the provider's {field}")
    cache[issuer] = document
    return document


async def txt_records(settings, domain: str) -> list[str]:
    """The TXT records of ``domain`` through DNS (dnspython): the system's resolvers, or
    PGTALLY_DNS_NAMESERVERS (``host[:port]``, comma-separated). A name with no TXT record gives
    an empty list; DNS that cannot be asked is :class:`Unavailable`."""
    resolver = dns.asyncresolver.Resolver(configure=not settings.dns_nameservers)
    if settings.dns_nameservers:
        hosts = [n.strip().rsplit(":", 1) if n.count(":") == 1 else [n.strip()] for n in settings.dns_nameservers]
        resolver.nameservers = [h[0] for h in hosts]
        resolver.port = int(hosts[0][1]) if len(hosts[0]) == 2 else 53
    try:
        answer = await resolver.resolve(domain, "TXT", lifetime=5)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except dns.exception.DNSException as exc:
        raise Unavailable(f"DNS could not be asked about {domain} ({type(exc).__name__})") from None
    return [b"".join(record.strings).decode("utf-8", "replace") for record in answer]
