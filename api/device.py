"""The device authorization grant (RFC 8628) for command lines: ``POST /oauth/device_authorization``
and the token endpoint ``POST /oauth/token`` (device codes and refresh tokens), form-encoded as
RFC 8628 sections 3.1-3.5 and RFC 6749 section 5 say, with OAuth's own JSON errors. A person
approves the code at ``/device`` (api/pages/sign_in.py). The rules are in sql/functions/55_sign_in.sql."""

from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import Request, Response, post
from litestar.enums import RequestEncodingType
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Body

from api.auth import TokenResponse
from api.calls import NO_STORE_CACHE, OPTIONAL_AUTH, MaybeCaller, call, call_json, client
from api.errors import problems

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


UserCode = Annotated[str, msgspec.Meta(min_length=1, max_length=32, examples=["BCDF-GHJK"])]
"""The code a person types at /device: 8 letters, with or without a dash or spaces."""


class UserCodeForm(msgspec.Struct, forbid_unknown_fields=True):
    """The /device forms' code (api/pages/sign_in.py: device_lookup, device_decide)."""

    user_code: UserCode


class DeviceAuthorizationRequest(msgspec.Struct):
    client_id: str
    scope: str | None = None


class TokenRequest(msgspec.Struct):
    """Every field optional, and a repeated one arrives as a list: both are answered the OAuth way
    (invalid_request, RFC 6749 section 5.2), not as a problem."""

    grant_type: str | list[str] | None = None
    client_id: str | list[str] | None = None
    device_code: str | list[str] | None = None
    refresh_token: str | list[str] | None = None


class DeviceAuthorization(msgspec.Struct):
    """RFC 8628 section 3.2."""

    device_code: str
    user_code: str
    verification_uri: str
    verification_uri_complete: str
    expires_in: int
    interval: int


def oauth_error(error: str, error_description: str) -> Response:
    """An OAuth error answer (RFC 6749 section 5.2): 400, JSON, not cached."""
    return Response({"error": error, "error_description": error_description}, status_code=400, headers=NO_STORE)


@post("/oauth/device_authorization", status_code=200, dependencies=OPTIONAL_AUTH, summary="Device authorization (RFC 8628)",
      cache_control=NO_STORE_CACHE,
      responses=problems(400, 401, 415, 422, 429, 503))
async def device_authorization(request: Request, caller: MaybeCaller,
                               data: Annotated[DeviceAuthorizationRequest, Body(media_type=RequestEncodingType.URL_ENCODED)]
                               ) -> DeviceAuthorization:
    """Start a console login: a ``device_code`` to poll ``/oauth/token`` with and a ``user_code``
    for the person to enter at ``verification_uri`` (``/device``) while signed in. Valid 10
    minutes; poll every ``interval`` seconds. Send the install's anonymous device token as Bearer
    to have its usage merged into the user on approval."""
    found = await call_json(request, "SELECT api.device_authorize(%s::text, %s::text, %s::uuid, %s::text, %s::text)",
                            [data.client_id, data.scope, caller.session_id if caller else None, *client(request)])
    base = request.app.state.settings.public_url.rstrip("/")
    return DeviceAuthorization(device_code=found["device_code"], user_code=found["user_code"],
                               verification_uri=f"{base}/device",
                               verification_uri_complete=f"{base}/device?user_code={found['user_code']}",
                               expires_in=found["expires_in"], interval=found["interval"])


class OAuthErrorBody(msgspec.Struct):
    """RFC 6749 section 5.2 (a token is section 5.1: TokenResponse)."""

    error: str
    error_description: str


@post("/oauth/token", status_code=200, summary="Token endpoint (RFC 6749, RFC 8628)",
      responses={**problems(415, 422, 503),
                 400: ResponseSpec(OAuthErrorBody, description="An OAuth error (RFC 6749 section 5.2, RFC 8628 "
                                                               "section 3.5): not problem+json, as OAuth clients expect",
                                   generate_examples=False)})
async def token(request: Request,
                data: Annotated[TokenRequest, Body(media_type=RequestEncodingType.URL_ENCODED)]) -> Response[TokenResponse]:
    """``grant_type=urn:ietf:params:oauth:grant-type:device_code`` with ``device_code`` and
    ``client_id``: the tokens once the user approved (exactly once), else 400 with ``error``
    ``authorization_pending``, ``slow_down``, ``access_denied``, ``expired_token`` or
    ``invalid_grant``. ``grant_type=refresh_token``: rotate a refresh token, as
    ``/v1/auth/refresh``. Other grant types: ``unsupported_grant_type``."""
    ip, user_agent = client(request)
    if repeated := [name for name in data.__struct_fields__ if isinstance(getattr(data, name), list)]:
        return oauth_error("invalid_request", f"{', '.join(repeated)} must be sent once")
    if not data.grant_type:
        return oauth_error("invalid_request", "grant_type is required")
    if data.grant_type == DEVICE_GRANT:
        if not data.device_code or not data.client_id:
            return oauth_error("invalid_request", "device_code and client_id are required")
        (found,) = await call(request, "SELECT api.device_token(%s::text, %s::text, %s::text, %s::text)",
                              [data.device_code, data.client_id, ip, user_agent])
    elif data.grant_type == "refresh_token":
        if not data.refresh_token:
            return oauth_error("invalid_request", "refresh_token is required")
        (found,) = await call(request, "SELECT api.refresh(%s::text, %s::text, %s::text)",
                              [data.refresh_token, ip, user_agent])
        if "error" in found:
            return oauth_error("invalid_grant", found["error"]["message"])
    else:
        return oauth_error("unsupported_grant_type", "use the device_code or refresh_token grant")
    if "oauth_error" in found:
        return oauth_error(**found["oauth_error"])
    return Response(request.app.state.jwt_keys.issue(found), headers=NO_STORE)


ROUTES = [device_authorization, token]
