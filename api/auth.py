"""``/v1/auth``, ``/v1/identify`` and ``/v1/me``: sign-up, login, rotating refresh tokens,
sessions, email verification, password reset and anonymous devices.

Every rule (rate limits, token claims, rotation and reuse detection, device merges) is in
sql/functions/50_auth.sql. Handlers here hash or verify the password (argon2id, off the event
loop), sign access tokens, and call one ``api.*`` function per step."""

from __future__ import annotations

import uuid
from typing import Annotated

import msgspec
from anyio import to_thread
from litestar import Request, delete, get, post
from litestar.params import FromPath, JSONBody

from api.calls import AUTH, NO_STORE_CACHE, OPTIONAL_AUTH, SECURITY, SESSION, Caller, MaybeCaller, Session, call_json, client
from api.errors import PgtallyError, problems, upgrade_url
from api.security import PASSWORD_MAX, hasher, password_problem, verify_password
from api.usage import Allowance
from api.web import REFERRAL_CODE

Email = Annotated[str, msgspec.Meta(min_length=3, max_length=320, examples=["ada@example.com"])]
Password = Annotated[str, msgspec.Meta(min_length=1, max_length=PASSWORD_MAX)]
Token = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class Credentials(msgspec.Struct, forbid_unknown_fields=True):
    email: Email
    password: Password


ReferralCode = Annotated[str, msgspec.Meta(pattern=f"^{REFERRAL_CODE.pattern}$", examples=["k7mq2xwd"])]
"""A person's referral code (api.web.REFERRAL_CODE: the format util.referral_code() makes)."""


class SignupRequest(msgspec.Struct, forbid_unknown_fields=True):
    email: Email
    password: Password
    referral_code: ReferralCode | None = None
    """The code of the person who referred this one (their link is /r/CODE); an unknown code is ignored."""
    fingerprint: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None
    """A client's device fingerprint, a hint against self-referral."""


class RefreshRequest(msgspec.Struct, forbid_unknown_fields=True):
    refresh_token: Token


class TokenRequest(msgspec.Struct, forbid_unknown_fields=True):
    token: Token


class EmailRequest(msgspec.Struct, forbid_unknown_fields=True):
    email: Email


class ResetConfirm(msgspec.Struct, forbid_unknown_fields=True):
    token: Token
    password: Password


class IdentifyRequest(msgspec.Struct, forbid_unknown_fields=True):
    """An install says who it is. ``install_id``: a random secret the client makes once per install
    (at least 128 bits, 22 to 256 URL-safe characters, for example 32 random bytes in base64url)
    and keeps; the same install id gets the same device account. ``fingerprint``: a hint for abuse
    limits, never a credential. ``meter``: also say whether one more use of it is allowed now."""

    install_id: Annotated[str, msgspec.Meta(min_length=22, max_length=256, pattern=r"^[A-Za-z0-9_-]+$")] | None = None
    fingerprint: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None
    meter: Annotated[str, msgspec.Meta(min_length=1, max_length=63, pattern=r"^[a-z][a-z0-9_]*$")] | None = None


class TokenResponse(msgspec.Struct):
    """OAuth 2.0 token response (RFC 6749 section 5.1): a 15-minute access token (JWT, HS256) and
    a single-use refresh token."""

    access_token: str
    token_type: str
    expires_in: int
    refresh_token: str


class IdentifyResponse(msgspec.Struct):
    """The tokens of a new device session (as ``TokenResponse``) and the account's state."""

    access_token: str
    token_type: str
    expires_in: int
    refresh_token: str
    account_id: str
    plan: str
    credits: str
    returning: bool
    """True when this install id was seen before (the same account)."""
    allowances: list[Allowance]
    upgrade_url: str
    meter: str | None = None
    can_use: bool | None = None
    """For ``meter``: whether one more use (a unit, or a one-token call) is allowed now."""
    allowance: Allowance | None = None
    resets_at: str | None = None


class EmailQueued(msgspec.Struct):
    """Accepted: an email is on its way if the address calls for one (the same answer either way)."""

    email: str
    status: str
    valid_for: str
    """How long the emailed link works, in words (``24 hours``; identity.link_lifetime)."""


class SessionsRevoked(msgspec.Struct):
    sessions_revoked: int


class EmailVerified(msgspec.Struct):
    email: str
    email_verified: bool


class PasswordChanged(msgspec.Struct):
    status: str
    sessions_revoked: int


class MeAccount(msgspec.Struct):
    id: str
    kind: str
    plan: str
    credits: str
    created_at: str


class MeUser(msgspec.Struct):
    id: str
    email: str
    email_verified: bool
    created_at: str


class Me(msgspec.Struct):
    account: MeAccount
    user: MeUser | None
    session_id: str | None


class SessionInfo(msgspec.Struct):
    id: str
    current: bool
    method: str
    """How it began: password, google, github, device, device_code."""
    ip: str | None
    user_agent: str | None
    created_at: str
    last_used_at: str
    expires_at: str


class SessionList(msgspec.Struct):
    data: list[SessionInfo]


class Revoked(msgspec.Struct):
    id: str
    revoked: bool


async def new_password_hash(password: str) -> str:
    """The argon2id hash of an acceptable new password; 422 with the reason otherwise."""
    if reason := password_problem(password):
        raise PgtallyError({"sqlstate": "TL422", "message": reason, "field": "password"})
    return await to_thread.run_sync(hasher.hash, password)


def device_session(caller: MaybeCaller) -> uuid.UUID | None:
    return caller.session_id if caller else None


@post("/v1/auth/signup", status_code=202, dependencies=OPTIONAL_AUTH, summary="Sign up",
      responses=problems(400, 401, 415, 422, 429, 503))
async def signup(request: Request, caller: MaybeCaller, data: JSONBody[SignupRequest]) -> EmailQueued:
    """Create a user with a personal account on the free plan and email a verification link.
    An address already registered gets the same 202 and body (its owner gets an email instead).
    Send an anonymous device's access token as Bearer to move its usage and credits over, and
    ``referral_code`` for the person who referred this one (one referrer, set here only).
    422 weak password or bad email; 429 with Retry-After over the rate limit."""
    return await register(request, data.email, data.password, device_session(caller), data.referral_code,
                          data.fingerprint)


async def register(request: Request, email: str, password: str, device: uuid.UUID | None,
                   referral_code: str | None = None, fingerprint: str | None = None) -> dict:
    """Sign-up, for the JSON endpoint and the /signup page alike: check and hash the password,
    then ``api.signup``."""
    password_hash = await new_password_hash(password)
    return await call_json(
        request, "SELECT api.signup(%s::text, %s::text, %s::text, %s::text, %s::uuid, %s::text, %s::text)",
        [email, password_hash, *client(request), device, referral_code, fingerprint])


async def password_login(request: Request, email: str, password: str, device: uuid.UUID | None) -> dict:
    """Login, for the JSON endpoint and the /login page alike: ``api.login_start`` (rate limits),
    the argon2id check off the event loop, then ``api.login_succeeded`` or ``api.login_failed``.
    Returns the session (identity.tokens); PgtallyError 401/429 otherwise."""
    ip, user_agent = client(request)
    found = await call_json(request, "SELECT api.login_start(%s::text, %s::text)", [email, ip])
    ok, rehash = await to_thread.run_sync(verify_password, found["password_hash"], password)
    if not ok:
        await call_json(request, "SELECT api.login_failed(%s::uuid, %s::text, %s::text, %s::text)",
                        [found["user_id"], email, ip, user_agent])
    return await call_json(request, "SELECT api.login_succeeded(%s::uuid, %s::text, %s::text, %s::text, %s::uuid)",
                           [found["user_id"], rehash, ip, user_agent, device])


@post("/v1/auth/login", status_code=200, dependencies=OPTIONAL_AUTH, summary="Log in", cache_control=NO_STORE_CACHE,
      responses=problems(400, 401, 415, 422, 429, 503))
async def login(request: Request, caller: MaybeCaller, data: JSONBody[Credentials]) -> TokenResponse:
    """Tokens for an email and password. An unknown email and a wrong password get the same 401
    after the same work (the password is checked against a dummy hash). Send an anonymous
    device's access token as Bearer to move its usage and credits to this account. 429 with
    Retry-After over the rate limit."""
    session = await password_login(request, data.email, data.password, device_session(caller))
    return request.app.state.jwt_keys.issue(session)


@post("/v1/auth/refresh", status_code=200, summary="Rotate a refresh token", cache_control=NO_STORE_CACHE,
      responses=problems(400, 401, 415, 422, 503))
async def refresh(request: Request, data: JSONBody[RefreshRequest]) -> TokenResponse:
    """New tokens for a refresh token, which stops working. Presenting a used refresh token
    (after a 10-second grace for concurrent refreshes) revokes its whole session: 401."""
    session = await call_json(request, "SELECT api.refresh(%s::text, %s::text, %s::text)",
                              [data.refresh_token, *client(request)])
    return request.app.state.jwt_keys.issue(session)


@post("/v1/auth/logout", status_code=200, dependencies=SESSION, security=SECURITY, summary="Log out",
      responses=problems(400, 401, 403, 503))
async def logout(request: Request, session: Session) -> SessionsRevoked:
    """End this session: its access and refresh tokens stop working."""
    return await call_json(request, "SELECT api.logout(%s::uuid, false)", [session])


@post("/v1/auth/logout-all", status_code=200, dependencies=SESSION, security=SECURITY, summary="Log out everywhere",
      responses=problems(400, 401, 403, 503))
async def logout_all(request: Request, session: Session) -> SessionsRevoked:
    """End every session of the signed-in user."""
    return await call_json(request, "SELECT api.logout(%s::uuid, true)", [session])


@post("/v1/auth/verify-email", status_code=200, summary="Verify an email address",
      responses=problems(400, 415, 422, 429, 503))
async def verify_email(request: Request, data: JSONBody[TokenRequest]) -> EmailVerified:
    """Use the token from the verification email (once, within 24 hours). 400 invalid, used or
    expired token."""
    return await call_json(request, "SELECT api.verify_email(%s::text, %s::text)", [data.token, client(request)[0]])


@post("/v1/auth/password-reset", status_code=202, summary="Ask for a password reset email",
      responses=problems(400, 415, 422, 429, 503))
async def password_reset(request: Request, data: JSONBody[EmailRequest]) -> EmailQueued:
    """Email a reset link (valid 1 hour) if the address is registered; the same 202 either way."""
    return await call_json(request, "SELECT api.request_password_reset(%s::text, %s::text)",
                           [data.email, client(request)[0]])


@post("/v1/auth/password-reset/confirm", status_code=200, summary="Set a new password",
      responses=problems(400, 415, 422, 429, 503))
async def password_reset_confirm(request: Request, data: JSONBody[ResetConfirm]) -> PasswordChanged:
    """Use a reset token (once) to set a new password; every session and refresh token of the
    user is revoked. 400 invalid, used or expired token; 422 weak password."""
    password_hash = await new_password_hash(data.password)
    return await call_json(request, "SELECT api.reset_password(%s::text, %s::text, %s::text)",
                           [data.token, password_hash, client(request)[0]])


@post("/v1/identify", status_code=201, summary="Tokens for an anonymous device", cache_control=NO_STORE_CACHE,
      responses=problems(400, 415, 422, 429, 503))
async def identify(request: Request, data: JSONBody[IdentifyRequest]) -> IdentifyResponse:
    """An anonymous account on the anonymous plan for a device (browser extension, CLI install),
    with tokens for it and what the client needs to decide: the plan, credits, allowances and,
    for ``meter``, ``can_use`` with that allowance and its reset, and where to upgrade. Send
    the same ``install_id`` on every call to get the same account (``returning``). 422 bad
    input or unknown meter; 429 with Retry-After over the limits (new accounts: 5 a day per
    fingerprint, 30 an hour per IP; a returning install: 600 an hour)."""
    found = await call_json(request, "SELECT api.identify(%s::text, %s::text, %s::text, %s::text, %s::text)",
                            [data.fingerprint, data.install_id, data.meter, *client(request)])
    return IdentifyResponse(**request.app.state.jwt_keys.issue(found), account_id=found["account_id"],
                            plan=found["plan"], credits=found["credits"], returning=found["returning"],
                            allowances=found["allowances"], meter=found["meter"], can_use=found["can_use"],
                            allowance=found["allowance"], resets_at=found["resets_at"],
                            upgrade_url=upgrade_url(request, found["account_id"]))


class Handoff(msgspec.Struct):
    code: str
    """Single use, for 10 minutes: open ``login_url`` or ``signup_url`` in the person's browser."""
    expires_in: int
    login_url: str
    signup_url: str


@post("/v1/identify/handoff", status_code=201, dependencies=SESSION, security=SECURITY, cache_control=NO_STORE_CACHE,
      summary="A code that hands an install's sign-in to a browser", responses=problems(400, 401, 403, 503))
async def handoff(request: Request, session: Session) -> Handoff:
    """For an anonymous install (its access token from ``/v1/identify``): a short-lived single-use
    code for the browser page where its person signs up or logs in (``/login?handoff=CODE``); that
    sign-in merges the install, which then keeps its person. No access token goes in a URL."""
    found = await call_json(request, "SELECT api.handoff_code(%s::uuid)", [session])
    base = request.app.state.settings.public_url.rstrip("/")
    return Handoff(code=found["code"], expires_in=found["expires_in"], login_url=f"{base}/login?handoff={found['code']}",
                   signup_url=f"{base}/signup?handoff={found['code']}")


@get("/v1/me", dependencies=AUTH, security=SECURITY, summary="The caller", responses=problems(400, 401, 403, 503))
async def me(request: Request, caller: Caller) -> Me:
    """The caller's account and, for a signed-in user, the user."""
    return await call_json(request, "SELECT api.me(%s::text, %s::uuid)", caller.params)


@get("/v1/me/sessions", dependencies=SESSION, security=SECURITY, summary="Active sessions",
     responses=problems(400, 401, 403, 503))
async def sessions(request: Request, session: Session) -> SessionList:
    """The signed-in user's active sessions, newest first, with the current one marked."""
    return await call_json(request, "SELECT api.sessions(%s::uuid)", [session])


@delete("/v1/me/sessions/{session_id:uuid}", status_code=200, dependencies=SESSION, security=SECURITY,
        summary="Revoke a session", responses=problems(400, 401, 403, 404, 503))
async def revoke_session(request: Request, session: Session, session_id: FromPath[uuid.UUID]) -> Revoked:
    """End one of the user's sessions. 404 when it is not theirs or already ended."""
    return await call_json(request, "SELECT api.revoke_session(%s::uuid, %s::uuid)", [session, session_id])


ROUTES = [signup, login, refresh, logout, logout_all, verify_email, password_reset, password_reset_confirm,
          identify, handoff, me, sessions, revoke_session]
