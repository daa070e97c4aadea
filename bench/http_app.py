"""The app under HTTP load: pgtally itself plus the ceiling route, a handler that authenticates
the same way (bearer key) and runs ``SELECT 1`` through the same pool."""

from litestar import Request, get

from api.app import create_app
from api.calls import AUTH, Caller, call


@get("/bench/ceiling", dependencies=AUTH)
async def ceiling(request: Request, caller: Caller) -> dict[str, int]:
    (one,) = await call(request, "SELECT 1", [])
    return {"one": one}


app = create_app(route_handlers=[ceiling])
