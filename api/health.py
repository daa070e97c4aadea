"""``/healthz``: the server is up and its database answers, within a second."""

import asyncio

import msgspec
from litestar import Request, get

from api.errors import PgtallyError, problems

HEALTH_TIMEOUT_SECONDS = 0.8


class Health(msgspec.Struct):
    status: str


@get("/healthz", summary="Liveness and database check", responses=problems(503))
async def healthz(request: Request) -> Health:
    """200 ``{"status": "ok"}`` when a pooled connection answers ``SELECT 1`` within 0.8 s; 503
    ``retry-later`` with Retry-After otherwise (PostgreSQL down or every connection busy)."""
    pool = request.app.state.pool
    try:
        async with pool.connection(timeout=HEALTH_TIMEOUT_SECONDS) as conn:
            await asyncio.wait_for(conn.execute("SELECT 1"), HEALTH_TIMEOUT_SECONDS)
    except TimeoutError:
        raise PgtallyError({"sqlstate": "TL503", "message": "the database did not answer within a second"}) from None
    return Health(status="ok")


ROUTES = [healthz]
