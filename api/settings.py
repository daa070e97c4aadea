"""pgtally's settings: one frozen object read from the environment (:meth:`Settings.from_env`),
used by the server, the worker and the command line. The README's Configuration table lists the
variables."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

PROVIDERS = ("google", "github")
"""The sign-in providers pgtally knows besides a team's own (sso)."""


@dataclass(frozen=True)
class Settings:
    """Server settings, read from the environment by :meth:`from_env`."""

    public_url: str = "http://127.0.0.1:8000"
    pool_min_size: int = 4
    pool_max_size: int = 16
    pool_timeout: float = 2.0
    smtp_url: str | None = None
    mail_from: str = "pgtally <no-reply@localhost>"
    stripe_api_key: str | None = None
    stripe_api_base: str | None = None
    stripe_webhook_secret: str | None = None
    secret_key: str | None = None
    """Signs browser cookies and CSRF tokens (PGTALLY_SECRET_KEY; default: a random key kept in
    PGTALLY_HOME/secret-key). Every server of one deployment needs the same."""
    google_client_id: str | None = None
    google_client_secret: str | None = None
    google_issuer: str = "https://accounts.google.com"
    github_client_id: str | None = None
    github_client_secret: str | None = None
    github_url: str = "https://github.com"
    github_api_url: str = "https://api.github.com"
    alert_email: str | None = None
    """Where the worker sends operator alerts (PGTALLY_ALERT_EMAIL); none when unset."""
    env: str = "production"
    """PGTALLY_ENV: ``production`` (the default) or ``development``, which lets pgtally fetch plain
    http provider URLs (api/outbound.py)."""
    outbound_allow: tuple[str, ...] = ()
    """PGTALLY_OUTBOUND_ALLOW: networks (CIDR or address, comma-separated) outbound requests may
    reach beyond the public internet, e.g. ``127.0.0.1/32`` for a provider on this machine. Loopback,
    private and link-local addresses are refused unless listed."""
    dns_nameservers: tuple[str, ...] = ()
    """PGTALLY_DNS_NAMESERVERS: ``host[:port]`` resolvers for domain verification (comma-separated);
    the system's when unset."""
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    """The reverse proxies whose ``X-Forwarded-For`` entries are believed (PGTALLY_TRUSTED_PROXIES,
    comma-separated IPs or CIDRs; none when unset): see :func:`api.calls.client_ip`."""

    @property
    def secure_cookies(self) -> bool:
        """Cookies are Secure when the public URL is https."""
        return self.public_url.startswith("https://")

    @property
    def upgrade_url(self) -> str:
        """Where a 402 sends the user to upgrade: ``PGTALLY_PUBLIC_URL`` + ``/upgrade``."""
        return self.public_url.rstrip("/") + "/upgrade"

    @staticmethod
    def parse_proxies(value: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """Networks from a comma-separated list of IPs and CIDRs (``127.0.0.1, 10.0.0.0/8``); a
        ValueError naming PGTALLY_TRUSTED_PROXIES and the bad item otherwise."""
        networks = []
        for item in filter(None, (part.strip() for part in value.split(","))):
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(f"PGTALLY_TRUSTED_PROXIES: {item!r} is not an IP address or CIDR network") from None
        return tuple(networks)

    @classmethod
    def from_env(cls) -> Settings:
        """Settings from the environment variables (README, Configuration)."""
        return cls(
            public_url=os.environ.get("PGTALLY_PUBLIC_URL", cls.public_url),
            pool_min_size=int(os.environ.get("PGTALLY_POOL_MIN", cls.pool_min_size)),
            pool_max_size=int(os.environ.get("PGTALLY_POOL_MAX", cls.pool_max_size)),
            pool_timeout=float(os.environ.get("PGTALLY_POOL_TIMEOUT", cls.pool_timeout)),
            smtp_url=os.environ.get("PGTALLY_SMTP_URL") or None,
            mail_from=os.environ.get("PGTALLY_MAIL_FROM", cls.mail_from),
            stripe_api_key=os.environ.get("STRIPE_API_KEY") or None,
            stripe_api_base=os.environ.get("STRIPE_API_BASE") or None,
            stripe_webhook_secret=os.environ.get("STRIPE_WEBHOOK_SECRET") or None,
            secret_key=os.environ.get("PGTALLY_SECRET_KEY") or None,
            google_client_id=os.environ.get("PGTALLY_GOOGLE_CLIENT_ID") or None,
            google_client_secret=os.environ.get("PGTALLY_GOOGLE_CLIENT_SECRET") or None,
            google_issuer=os.environ.get("PGTALLY_GOOGLE_ISSUER") or cls.google_issuer,
            github_client_id=os.environ.get("PGTALLY_GITHUB_CLIENT_ID") or None,
            github_client_secret=os.environ.get("PGTALLY_GITHUB_CLIENT_SECRET") or None,
            github_url=os.environ.get("PGTALLY_GITHUB_URL") or cls.github_url,
            github_api_url=os.environ.get("PGTALLY_GITHUB_API_URL") or cls.github_api_url,
            alert_email=os.environ.get("PGTALLY_ALERT_EMAIL") or None,
            env=os.environ.get("PGTALLY_ENV") or cls.env,
            outbound_allow=tuple(filter(None, os.environ.get("PGTALLY_OUTBOUND_ALLOW", "").split(","))),
            dns_nameservers=tuple(filter(None, os.environ.get("PGTALLY_DNS_NAMESERVERS", "").split(","))),
            trusted_proxies=cls.parse_proxies(os.environ.get("PGTALLY_TRUSTED_PROXIES", "")),
        )

    @property
    def providers(self) -> list[str]:
        """The sign-in providers this server offers: those with a client id and secret."""
        return [p for p in PROVIDERS if getattr(self, f"{p}_client_id") and getattr(self, f"{p}_client_secret")]

