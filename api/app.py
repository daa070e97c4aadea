"""The Litestar application: settings, the connection pool, and the routes of every resource.

Run it with ``pgtally serve`` (or ``LITESTAR_APP=api.app:create_app litestar run``).
"""

from __future__ import annotations

import ipaddress
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Sequence

from litestar import Litestar
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.static_files import create_static_files_router
from litestar.openapi.spec import Components, SecurityScheme
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool
from swagger_ui_bundle import swagger_ui_path

from api import db, outbound, web
from api.errors import EXCEPTION_HANDLERS
from api.security import Keys
from api.validation import check_request


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
    def from_env(cls) -> "Settings":
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


IDLE_CHECK_SECONDS = 2.0


async def check_if_idle(conn: AsyncConnection) -> None:
    """Pool ``check``: ping a connection that sat idle for a while before handing it out (it may
    have died with a restarted server). Busy connections skip the extra round trip."""
    if time.monotonic() - getattr(conn, "pgtally_returned_at", 0.0) > IDLE_CHECK_SECONDS:
        await AsyncConnectionPool.check_connection(conn)


async def mark_returned(conn: AsyncConnection) -> None:
    """Pool ``reset``: remember when a connection went back to the pool."""
    conn.pgtally_returned_at = time.monotonic()


async def load_keys(pool: AsyncConnectionPool, issuer: str) -> Keys:
    """The access-token keys from api.jwt_keys(); the issuer is PGTALLY_PUBLIC_URL."""
    async with pool.connection() as conn:
        rows = await (await conn.execute("SELECT kid, secret FROM api.jwt_keys()")).fetchall()
    return Keys.from_rows(issuer, rows)


DOCS_ASSETS = "/schema/assets"


def docs_page() -> SwaggerRenderPlugin:
    """The API docs at /schema, with Swagger UI served by pgtally itself (from the
    swagger-ui-bundle package), so the page works offline and loads nothing from a CDN."""
    return SwaggerRenderPlugin(
        path="/", js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js", css_url=f"{DOCS_ASSETS}/swagger-ui.css",
        standalone_preset_js_url=f"{DOCS_ASSETS}/swagger-ui-standalone-preset.js",
        favicon=f'<link rel="icon" type="image/png" href="{DOCS_ASSETS}/favicon-32x32.png">')


def create_app(database_url: str | None = None, settings: Settings | None = None,
               route_handlers: Sequence[Any] = ()) -> Litestar:
    """Build the app. ``database_url`` is the owner's URL (default: :func:`api.db.database_url`);
    the pool connects with it and acts as the ``pgtally_api`` role, so it can only execute the
    granted ``api.*`` functions. ``route_handlers`` are added to pgtally's own (bench uses it)."""
    from api import admin, auth, billing, device, health, holds, keys, ledger, ops, pages, teams, usage
    from api.money import ROUTES as MONEY_ROUTES  # budgets and reversals (issue 28)

    settings = settings or Settings.from_env()
    outbound.check_settings(settings)
    pool = AsyncConnectionPool(
        db.api_conninfo(database_url or db.database_url()),
        min_size=settings.pool_min_size, max_size=settings.pool_max_size,
        # One statement per request: autocommit makes the function call its own transaction,
        # with no BEGIN/COMMIT round trips.
        kwargs={"autocommit": True}, open=False,
        # With PostgreSQL down a request waits this long for a connection, then gets a 503.
        timeout=settings.pool_timeout, check=check_if_idle, reset=mark_returned,
    )

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await pool.open(wait=True)
        app.state.jwt_keys = await load_keys(pool, settings.public_url.rstrip("/"))
        try:
            yield
        finally:
            await pool.close()

    return Litestar(
        route_handlers=[*usage.ROUTES, *ledger.ROUTES, *auth.ROUTES, *keys.ROUTES, *billing.ROUTES, *health.ROUTES,
                        *device.ROUTES, *holds.ROUTES, *ops.ROUTES, *teams.ROUTES, *admin.ROUTES, pages.router(settings),
                        *MONEY_ROUTES,
                        create_static_files_router(path=DOCS_ASSETS, directories=[swagger_ui_path],
                                                   include_in_schema=False),
                        *route_handlers],
        lifespan=[lifespan],
        state=State({"settings": settings, "pool": pool, "pool_check": None, "oidc_metadata": outbound.metadata_cache(),
                     "stripe": billing.stripe_client(settings)}),
        exception_handlers=EXCEPTION_HANDLERS,
        # Logging is the process's (api.ops.configure_logging: JSON lines); Litestar's own
        # configuration would replace its handlers.
        logging_config=None,
        before_request=check_request,
        middleware=[ops.Observe, web.session_config(settings).middleware],
        csrf_config=web.csrf_config(settings),
        template_config=web.template_config(),
        openapi_config=OpenAPIConfig(
            title="pgtally", version="0.1.0", path="/schema", render_plugins=[docs_page()],
            description="Accounts, usage metering and billing. Credits are decimal strings; "
                        "errors are RFC 9457 problem+json.",
            components=Components(security_schemes={
                "bearer": SecurityScheme(type="http", scheme="bearer",
                                         description="A pgtally API key (pgt_...) or an access token (JWT)"),
            }),
        ),
    )


def worker_app() -> Litestar:
    """The app of one ``pgtally serve --workers N`` process: its logging as ``serve`` set it up
    (``PGTALLY_LOG_FORMAT``), the database the parent started (``DATABASE_URL``)."""
    from api.ops import configure_logging

    configure_logging(os.environ.get("PGTALLY_LOG_FORMAT", "json"))
    return create_app()
