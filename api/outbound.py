"""Requests pgtally makes to addresses it did not choose itself: a team's SSO issuer, the endpoints
its discovery document names, the sign-in providers' URLs, DNS lookups of claimed domains.

Outbound requests go only where the operator allowed (OWASP's SSRF prevention cheat sheet):
- https only, unless ``PGTALLY_ENV=development``;
- never to a loopback, private, link-local, shared, multicast, reserved or otherwise non-global
  address (nor one embedded in a NAT64, 6to4, Teredo or IPv4-mapped IPv6 address), unless the
  operator allowed that network (``PGTALLY_OUTBOUND_ALLOW``, e.g. ``127.0.0.1/32`` for a provider
  on this machine). Two checks: every address a name resolves to is checked before any
  connection is opened (a name that resolves to 10.0.0.1 is refused without a packet sent
  there), and httpx-secure checks the address each connection really goes to and connects to
  that very address (a name that changes its answer in between, DNS rebinding, is refused too);
- bounded: 5 s to connect and between bytes, 15 s for a whole exchange, 256 KiB for any answer
  (the token endpoint's included: every response body read through these clients is capped);
- any failure is :class:`OutboundError`, which the callers answer 502, never 500, in words that do
  not tell a closed port from a refused one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver
import httpx
from cachetools import TTLCache
from httpx_secure import httpx_ssrf_protection

TIMEOUT = httpx.Timeout(5.0)
"""Seconds to connect, and between bytes read, for every outbound HTTP request."""
DEADLINE_SECONDS = 15.0
"""Seconds one exchange with a provider (discovery, token, keys, user) may take in all."""
MAX_DOCUMENT_BYTES = 256 * 1024
"""The largest answer read (Google's discovery document and keys are under 5 KiB)."""
METADATA_TTL_SECONDS = 3600
"""How long a discovery document is kept before it is read again (its keys rotate)."""
FAILURE_TTL_SECONDS = 60
"""How long a provider that failed is not asked again (its failure is answered from memory)."""
REFUSED = [ipaddress.ip_network(n) for n in (
    "64:ff9b:1::/48",      # NAT64 for local use (RFC 8215)
    "::/96",               # IPv4-compatible (deprecated, RFC 4291 2.5.5.1)
    "::ffff:0:0:0/96",     # IPv4-translated (RFC 2765)
    "fec0::/10",           # site-local (deprecated, RFC 3879)
    "2001::/32",           # Teredo: an IPv4 address of anyone's choosing inside
)]
NAT64 = ipaddress.ip_network("64:ff9b::/96")


class OutboundError(Exception):
    """An outbound request was refused by policy or failed; the message says which, in plain words."""


def allowed_networks(settings) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The networks the operator allowed beyond the public internet (PGTALLY_OUTBOUND_ALLOW).
    ValueError on a malformed entry (checked when the app is made)."""
    return [ipaddress.ip_network(n.strip(), strict=False) for n in settings.outbound_allow if n.strip()]


def nameservers(settings) -> list[tuple[str, int]]:
    """PGTALLY_DNS_NAMESERVERS as (address, port): ``1.2.3.4``, ``1.2.3.4:5353``, ``[::1]:5353``.
    ValueError on a malformed entry (checked when the app is made)."""
    servers = []
    for entry in (e.strip() for e in settings.dns_nameservers if e.strip()):
        parts = urlsplit(f"//{entry}")
        servers.append((str(ipaddress.ip_address(parts.hostname)), parts.port or 53))
    return servers


def check_settings(settings) -> None:
    """Refuse to start with an outbound setting that cannot be read."""
    allowed_networks(settings)
    nameservers(settings)


def address_allowed(settings, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A public unicast address, or one in a network the operator allowed. An IPv4 address
    embedded in an IPv6 one (IPv4-mapped, NAT64, 6to4) is judged as itself."""
    if any(address in net for net in allowed_networks(settings)):
        return True
    if isinstance(address, ipaddress.IPv6Address):
        if any(address in net for net in REFUSED):
            return False
        embedded = (address.ipv4_mapped or address.sixtofour
                    or (ipaddress.IPv4Address(int(address) & 0xFFFFFFFF) if address in NAT64 else None))
        if embedded is not None:
            return address_allowed(settings, embedded)
    return address.is_global and not address.is_multicast


def check_url(settings, url: Any, what: str) -> str:
    """``url`` if pgtally may fetch it: an absolute http(s) URL, https outside development.
    Raises :class:`OutboundError` otherwise."""
    if not isinstance(url, str) or len(url) > 2000:
        raise OutboundError(f"{what} is not a URL")
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.username or parts.password:
        raise OutboundError(f"{what} is not an http(s) URL")
    if parts.scheme != "https" and settings.env != "development":
        raise OutboundError(f"{what} must use https")
    return url


async def check_host(settings, url: str, what: str) -> None:
    """Every address the URL's host resolves to is one pgtally may reach, before any connection."""
    parts = urlsplit(url)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(parts.hostname, parts.port or 443, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise OutboundError(f"{what} could not be reached") from None
    for *_, sockaddr in infos:
        if not address_allowed(settings, ipaddress.ip_address(sockaddr[0].split("%")[0])):
            raise OutboundError(f"{what} is on an address pgtally may not reach (not public; PGTALLY_OUTBOUND_ALLOW)")


def guarded(client: httpx.AsyncClient, settings) -> httpx.AsyncClient:
    """Make ``client`` (an httpx or authlib client, created with ``trust_env=False`` and
    ``event_hooks=hooks(settings)``) check each host before a request and refuse every connection
    :func:`address_allowed` refuses."""
    return httpx_ssrf_protection(client, check_globally_reachable=False,
                                 custom_validator=lambda host, address, port: address_allowed(settings, address))


def hooks(settings) -> dict[str, list]:
    """httpx event hooks of every outbound client: the host checked before the request (and each
    redirect); the body of every answer capped at MAX_DOCUMENT_BYTES while it is read."""

    async def before(request: httpx.Request) -> None:
        await check_host(settings, str(request.url), "the provider")

    async def after(response: httpx.Response) -> None:
        response.stream = Capped(response.stream)

    return {"request": [before], "response": [after]}


class Capped(httpx.AsyncByteStream):
    """A response body that stops with :class:`OutboundError` past MAX_DOCUMENT_BYTES."""

    def __init__(self, stream: httpx.AsyncByteStream) -> None:
        self.stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        read = 0
        async for chunk in self.stream:
            read += len(chunk)
            if read > MAX_DOCUMENT_BYTES:
                raise OutboundError(f"the provider's answer is larger than {MAX_DOCUMENT_BYTES // 1024} KiB")
            yield chunk

    async def aclose(self) -> None:
        await self.stream.aclose()


def client(settings, **kwargs: Any) -> httpx.AsyncClient:
    """A plain guarded client."""
    return guarded(httpx.AsyncClient(timeout=TIMEOUT, trust_env=False, follow_redirects=False,
                                     event_hooks=hooks(settings), **kwargs), settings)


@asynccontextmanager
async def exchange(what: str) -> AsyncIterator[None]:
    """One exchange with a provider: at most DEADLINE_SECONDS in all, and whatever goes wrong on
    the wire or in its answers (unreachable, refused, too big, too slow, not JSON, not the shape
    the protocol says) is :class:`OutboundError`."""
    try:
        async with asyncio.timeout(DEADLINE_SECONDS):
            yield
    except OutboundError:
        raise
    except TimeoutError:
        raise OutboundError(f"{what} took longer than {DEADLINE_SECONDS:.0f} s") from None
    except httpx.HTTPStatusError as exc:
        raise OutboundError(f"{what} answered HTTP {exc.response.status_code}") from None
    except httpx.HTTPError:
        raise OutboundError(f"{what} could not be reached") from None
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):   # JSON and shapes
        raise OutboundError(f"{what} answered in a shape pgtally does not know") from None


def parse_object(body: bytes, what: str) -> dict[str, Any]:
    """A JSON object, or :class:`OutboundError` (deep nesting included)."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise OutboundError(f"{what} is not JSON") from None
    if not isinstance(document, dict):
        raise OutboundError(f"{what} is not a JSON object")
    return document


async def read_json(http: httpx.AsyncClient, settings, url: str, what: str) -> dict[str, Any]:
    """GET a JSON object through a guarded client (its body capped by :func:`hooks`)."""
    check_url(settings, url, what)
    async with exchange(what):
        response = await http.get(url, headers={"Accept": "application/json"})
        if response.status_code != 200:
            raise OutboundError(f"{what} answered HTTP {response.status_code}")
        return parse_object(response.content, what)


def metadata_cache(**kwargs: Any) -> TTLCache:
    """Discovery documents (and failures) by issuer: documents for METADATA_TTL_SECONDS, at most
    1,000 issuers (``kwargs``: cachetools' ``timer``)."""
    return TTLCache(maxsize=1000, ttl=METADATA_TTL_SECONDS, **kwargs)


async def oidc_metadata(cache: TTLCache, settings, issuer: str) -> dict[str, Any]:
    """An issuer's OpenID Connect discovery document (OpenID Connect Discovery 1.0 section 4),
    checked: its ``issuer`` is the one asked for (section 4.3), and the endpoints pgtally uses are
    URLs it may fetch. Cached for METADATA_TTL_SECONDS; a failure for FAILURE_TTL_SECONDS (so a
    slow or broken provider is not asked again by every visitor)."""
    issuer = check_url(settings, issuer.rstrip("/"), "the provider's issuer")
    cached = cache.get(issuer)
    if isinstance(cached, tuple) and cached[0] > cache.timer():
        raise OutboundError(cached[1])
    if isinstance(cached, dict):
        return cached
    try:
        async with client(settings) as http:
            document = await read_json(http, settings, f"{issuer}/.well-known/openid-configuration",
                                       "the provider's discovery document")
        if str(document.get("issuer", "")).rstrip("/") != issuer:
            raise OutboundError("the provider's discovery document names another issuer")
        for field in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            check_url(settings, document.get(field), f"the provider's {field}")
    except OutboundError as exc:
        cache[issuer] = (cache.timer() + FAILURE_TTL_SECONDS, str(exc))
        raise
    cache[issuer] = document
    return document


async def txt_records(settings, domain: str) -> list[str]:
    """The TXT records of ``domain`` through DNS (dnspython): the system's resolvers, or
    PGTALLY_DNS_NAMESERVERS. A name with no TXT record gives an empty list; DNS that cannot be
    asked is :class:`OutboundError`."""
    servers = nameservers(settings)
    resolver = dns.asyncresolver.Resolver(configure=not servers)
    if servers:
        resolver.nameservers = [dns.nameserver.Do53Nameserver(address, port) for address, port in servers]
    try:
        answer = await resolver.resolve(domain, "TXT", lifetime=5)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except dns.exception.DNSException:
        raise OutboundError(f"DNS could not be asked about {domain}") from None
    return [b"".join(record.strings).decode("utf-8", "replace") for record in answer]
