"""The app under HTTP load: pgtally itself plus the ceiling route, a handler that authenticates
exactly as the real path does (the bearer key's SHA-256 and its index probe, in
``api.principal_account``) and answers from the same pool."""

from litestar import Request, get

from api.app import create_app
from api.calls import AUTH, Caller, call


@get("/v1/bench/ceiling", dependencies=AUTH)   # under /v1/: the same middleware as the API
async def ceiling(request: Request, caller: Caller) -> dict[str, str]:
    (account,) = await call(request, "SELECT api.principal_account(%s::text, %s::uuid)", caller.params)
    return {"account": str(account)}


app = create_app(route_handlers=[ceiling])
