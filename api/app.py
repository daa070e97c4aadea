"""The Litestar application: the connection pool and the routes of every resource (settings are
api/settings.py).

Run it with ``pgtally serve`` (or ``LITESTAR_APP=api.app:create_app litestar run``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar, Request
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from litestar.static_files import create_static_files_router
from psycopg import AsyncConnection, OperationalError
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from swagger_ui_bundle import swagger_ui_path

from api import db, outbound, web
from api.errors import EXCEPTION_HANDLERS
from api.security import Keys
from api.settings import Settings
from api.validation import check_request

log = logging.getLogger("pgtally")


IDLE_CHECK_SECONDS = 2.0


async def check_if_idle(conn: AsyncConnection) -> None:
    """Pool ``check``: ping a connection that sat idle for a while before handing it out (it may
    have died with a restarted server). Busy connections skip the extra round trip."""
    if time.monotonic() - getattr(conn, "pgtally_returned_at", 0.0) > IDLE_CHECK_SECONDS:
        await AsyncConnectionPool.check_connection(conn)


READ_ONLY_RENEW_SECONDS = 5.0
RECONNECT_SECONDS = 5.0


async def note_connected(conn: AsyncConnection) -> None:
    """Pool ``configure``: remember when a connection was made."""
    conn.pgtally_connected_at = time.monotonic()


async def mark_returned(conn: AsyncConnection) -> None:
    """Pool ``reset``: remember when a connection went back to the pool. A session that started
    read-only keeps that default (``ALTER DATABASE`` or ``ROLE ... SET default_transaction_read_only``
    applies to new sessions only): one older than 5 s is closed (the pool makes a new one), so
    that writes resume soon after the database takes them again. PostgreSQL 14+ reports the
    setting with every change: no round trip."""
    now = time.monotonic()
    if (conn.info.parameter_status("default_transaction_read_only") == "on"
            and now - getattr(conn, "pgtally_connected_at", 0.0) > READ_ONLY_RENEW_SECONDS):
        await conn.close()
        return
    conn.pgtally_returned_at = now


async def load_keys(pool: AsyncConnectionPool, issuer: str) -> Keys:
    """The access-token keys from api.jwt_keys(); the issuer is PGTALLY_PUBLIC_URL."""
    async with pool.connection() as conn:
        rows = await (await conn.execute("SELECT kid, secret FROM api.jwt_keys()")).fetchall()
    return Keys.from_rows(issuer, rows)


class KeysPending:
    """The access-token keys before they could be read (the database was away when the process
    started); :func:`before_request` reads them on the next request."""


KEYLESS_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


async def before_request(request: Request) -> None:
    """Litestar ``before_request`` hook: the input checks (:func:`api.validation.check_request`),
    then the access-token keys, read now when the database was away at startup: until it is
    back, a request gets 503 retry-later before any database call (the health routes excepted,
    they answer on their own)."""
    await check_request(request)
    state = request.app.state
    if isinstance(state.jwt_keys, KeysPending) and request.url.path not in KEYLESS_PATHS:
        async with state.keys_lock:               # one reader at a time; the others find them read
            if isinstance(state.jwt_keys, KeysPending):
                state.jwt_keys = await load_keys(state.pool, state.settings.public_url.rstrip("/"))


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
    from api import admin, auth, billing, device, health, holds, keys, ledger, money, oidc, ops, pages, teams, usage

    settings = settings or Settings.from_env()
    outbound.check_settings(settings)
    pool = AsyncConnectionPool(
        db.api_conninfo(database_url or db.database_url()),
        min_size=settings.pool_min_size, max_size=settings.pool_max_size,
        # One statement per request: autocommit makes the function call its own transaction,
        # with no BEGIN/COMMIT round trips.
        kwargs={"autocommit": True}, open=False,
        # With PostgreSQL down a request waits this long for a connection, then gets a 503.
        timeout=settings.pool_timeout, check=check_if_idle, reset=mark_returned, configure=note_connected,
        # A connection attempt that keeps failing backs off (1, 2, 4 s...): give it up after 5 s,
        # so that the next request starts a new one and the pool is back soon after PostgreSQL.
        reconnect_timeout=RECONNECT_SECONDS,
    )

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        # The pool opens without waiting for PostgreSQL: a worker that starts while the database
        # is away serves 503 retry-later until it is back, instead of failing its startup.
        await pool.open(wait=False)
        app.state.keys_lock = asyncio.Lock()
        try:
            app.state.jwt_keys = await load_keys(pool, settings.public_url.rstrip("/"))
        except (PoolTimeout, OperationalError) as exc:
            log.warning("starting without the database (%s): requests get 503 until it is back", exc)
            app.state.jwt_keys = KeysPending()
        try:
            yield
        finally:
            await pool.close()

    return Litestar(
        route_handlers=[*usage.ROUTES, *ledger.ROUTES, *auth.ROUTES, *keys.ROUTES, *billing.ROUTES, *health.ROUTES,
                        *device.ROUTES, *holds.ROUTES, *ops.ROUTES, *teams.ROUTES, *admin.ROUTES, pages.router(settings),
                        *oidc.ROUTES, oidc.router(settings), *money.ROUTES,
                        create_static_files_router(path=DOCS_ASSETS, directories=[swagger_ui_path],
                                                   include_in_schema=False),
                        *route_handlers],
        lifespan=[lifespan],
        state=State({"settings": settings, "pool": pool, "pool_check": None, "cannot_write": (0.0, ""),
                     "oidc_metadata": outbound.metadata_cache(),
                     "stripe": billing.stripe_client(settings)}),
        exception_handlers=EXCEPTION_HANDLERS,
        # Logging is the process's (api.ops.configure_logging: JSON lines); Litestar's own
        # configuration would replace its handlers.
        logging_config=None,
        before_request=before_request,
        middleware=[oidc.ClientCORS, ops.Observe, web.session_config(settings).middleware],
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
