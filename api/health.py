"""``/healthz``: the server is up and its database answers."""

from litestar import Request, get

from api.calls import call


@get("/healthz", summary="Liveness and database check")
async def healthz(request: Request) -> dict[str, str]:
    """200 ``{"status": "ok"}`` when a pooled connection answers ``SELECT 1``; 500 otherwise."""
    await call(request, "SELECT 1", [])
    return {"status": "ok"}


ROUTES = [healthz]
