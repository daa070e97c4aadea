"""What browser pages share: the signed session cookie, CSRF protection, security headers,
templates, and the signed-in session of a request.

A browser session is a row of ``identity.sessions``, like an access token's: the cookie only
names it (encrypted and signed by Litestar's cookie session backend), and every page checks the
row through the same ``api.*`` functions, so logging out anywhere ends it everywhere."""

from __future__ import annotations

import hashlib
import re
import uuid
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import msgspec
import stripe
from litestar import Request, Response
from litestar.config.csrf import CSRFConfig
from litestar.enums import MediaType, RequestEncodingType
from litestar.middleware.session.client_side import CookieBackendConfig
from litestar.params import Body
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.response import Redirect, Template
from litestar.template.config import TemplateConfig

from api import db
from api.calls import call_json
from api.errors import PgtallyError
from api.validation import invalid

TEMPLATES = Path(__file__).resolve().parent / "pages" / "templates"
STATIC = Path(__file__).resolve().parent / "static"
SESSION_COOKIE = "pgtally_session"
SESSION_DAYS = 30
# JSON and OAuth endpoints authenticate with a bearer token (or a signature), not a cookie.
CSRF_EXEMPT = ["^/v1/", "^/oauth/", "^/healthz", "^/schema"]

STRIPE_PAGES = "https://checkout.stripe.com https://billing.stripe.com"
PAGE_HEADERS = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
"""On every page: no inline script, no framing, and no Referer (pages carry tokens in their URL)."""


def secret(settings, purpose: str) -> bytes:
    """A 32-byte key for one purpose, from PGTALLY_SECRET_KEY (or the local secret file)."""
    base = settings.secret_key or db.local_secret("secret-key")
    return hashlib.sha256(f"{purpose}:{base}".encode()).digest()


def session_config(settings) -> CookieBackendConfig:
    # The JSON API never reads the page session: no cookie to decrypt or write on its requests.
    return CookieBackendConfig(secret=secret(settings, "session"), key=SESSION_COOKIE, max_age=SESSION_DAYS * 86400,
                               secure=settings.secure_cookies, httponly=True, samesite="lax", exclude=["^/v1/"])


def csrf_config(settings) -> CSRFConfig:
    return CSRFConfig(secret=secret(settings, "csrf").hex(), cookie_name="pgtally_csrf",
                      cookie_secure=settings.secure_cookies, cookie_httponly=True, cookie_samesite="lax",
                      exclude=CSRF_EXEMPT)


def template_config() -> TemplateConfig:
    return TemplateConfig(directory=TEMPLATES, engine=JinjaTemplateEngine)


def page_headers(settings):
    """``after_request`` of the pages: the security headers. Forms may post to this site only,
    and be redirected on to Stripe's Checkout and portal pages (or a stand-in's, with
    STRIPE_API_BASE), which form-action governs too."""
    from urllib.parse import urlsplit

    stand_in = urlsplit(settings.stripe_api_base) if settings.stripe_api_base else None
    stripe_pages = STRIPE_PAGES + (f" {stand_in.scheme}://{stand_in.netloc}" if stand_in else "")
    headers = {"Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                                          f"img-src 'self' data: https:; form-action 'self' {stripe_pages}; "
                                          "frame-ancestors 'none'; base-uri 'none'; object-src 'none'",
               **PAGE_HEADERS}

    def add(response: Response) -> Response:
        for name, value in headers.items():
            response.headers.setdefault(name, value)
        return response

    return add


def browser_session(request: Request) -> uuid.UUID | None:
    """The session id the cookie names, if any (whether it is still active, api.* decides)."""
    data = request.scope.get("session")
    sid = data.get("sid") if isinstance(data, dict) else None
    try:
        return uuid.UUID(sid) if sid else None
    except ValueError:
        return None


async def claim_handoff(request: Request, code: str | None) -> None:
    """Claim an install's handoff code (``/login?handoff=``, api.claim_handoff: once, within 10
    minutes) and keep its session in this browser's encrypted page session, to merge into the
    person who signs in here (:func:`handed_off_device`). An unknown, used or expired code is ignored."""
    if not code or len(code) > 200:
        return
    found = await call_json(request, "SELECT api.claim_handoff(%s::text)", [code])
    if found["device_session_id"]:
        request.set_session({**(request.scope.get("session") or {}), "device": found["device_session_id"]})


def handed_off_device(request: Request) -> uuid.UUID | None:
    """The install session a handoff code gave this browser (:func:`claim_handoff`), if any."""
    data = request.scope.get("session")
    device = data.get("device") if isinstance(data, dict) else None
    try:
        return uuid.UUID(device) if device else None
    except ValueError:
        return None


def principal_of(request: Request, session_id: uuid.UUID | None) -> list:
    """[API key, session id, account id] for a page's api.* calls: the signed-in person, acting on
    the account the team switcher chose (None: their own)."""
    chosen = request.session.get("account_id") if request.scope.get("session") is not None else None
    return [None, session_id, uuid.UUID(chosen) if chosen else None]


FORM = Body(media_type=RequestEncodingType.URL_ENCODED)
"""A page's form body (application/x-www-form-urlencoded): ``Annotated[SomeForm, FORM]``."""

T = TypeVar("T")


def form_as(model: type[T], **fields: Any) -> T:
    """A page form's fields as the JSON endpoint's body ``model``, so a page takes the same types
    and limits as the API (one place for them: the model). An empty field counts as not sent. A
    field that does not fit raises TL422 naming it (PgtallyError), which the page shows as it shows
    any refusal: nothing reaches the database."""
    try:
        return msgspec.convert({name: value for name, value in fields.items() if value not in ("", None)}, model,
                               strict=False)
    except msgspec.ValidationError as exc:
        message, _, where = str(exc).partition(" - at `$.")
        field = where.rstrip("`") or None
        if missing := re.fullmatch(r"Object missing required field `(.+)`", message):
            raise invalid(f"{missing[1]} is required", missing[1]) from None
        message = message.replace("`", "")
        raise invalid(f"{field}: {message[0].lower()}{message[1:]}" if field else message, field) from None


def refusal_status(exc: PgtallyError, otherwise: int) -> int:
    """The status of a page that shows a refusal: 422 for input that does not fit (form_as, or
    the database's TL422), else the page's own (``otherwise``)."""
    return 422 if exc.error.get("sqlstate") == "TL422" else otherwise


REFERRAL_COOKIE = "pgtally_ref"
REFERRAL_DAYS = 30


REFERRAL_CODE = re.compile(r"[A-Za-z0-9]{8}")
"""A referral code as util.referral_code() makes them (8 letters and digits; compared in lower
case by billing.attribute_referral): the one check of the format on this side."""


def referral_code(text: str | None) -> str | None:
    """``text`` in lower case when it has a referral code's format, else None."""
    return text.lower() if text and REFERRAL_CODE.fullmatch(text) else None


def referral_of(request: Request) -> str | None:
    """The referral code a /r/CODE link left in this browser (first touch), if any."""
    return referral_code(request.cookies.get(REFERRAL_COOKIE))


def sign_in_browser(request: Request, session: dict[str, Any]) -> None:
    """Make the browser carry this session (identity.tokens of a sign-in)."""
    request.set_session({"sid": session["session_id"]})


def to_login(request: Request) -> Redirect:
    """Send a visitor who is not signed in to /login, and back here afterwards."""
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return Redirect(f"/login?next={quote(here, safe='')}")


def safe_next(target: str | None, default: str = "/account") -> str:
    """Only a path of this site (never //host or a scheme): no open redirect."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return default


def page(name: str, request: Request, status_code: int = 200, **context: Any) -> Template:
    """Render a page with what every page shows: the signed-in state and the configured providers."""
    context.setdefault("signed_in", browser_session(request) is not None)
    context.setdefault("providers", request.app.state.settings.providers)
    return Template(template_name=name, context=context, status_code=status_code, media_type=MediaType.HTML)


def problem_text(exc: PgtallyError) -> str:
    """A refusal in plain words for a page."""
    message = exc.error.get("message") or "That did not work"
    return message[0].upper() + message[1:] + ("" if message.endswith(".") else ".")


async def signed_in(request: Request, action, view) -> Any:
    """Run a page action for the signed-in session; to /login when there is none or it ended. A
    refusal is shown on ``view(request, session_id, error=..., status_code=...)``."""
    session_id = browser_session(request)
    if session_id is None:
        return to_login(request)
    try:
        return await action(session_id)
    except PgtallyError as exc:
        if exc.error.get("sqlstate") == "TL401":
            request.clear_session()
            return to_login(request)
        if exc.error.get("sqlstate") == "TL403" and request.session.pop("account_id", None):
            # The team the switcher chose is no longer theirs (removed, or the role shrank): back
            # to their own account.
            return Redirect("/dashboard")
        return await view(request, session_id, error=problem_text(exc), status_code=refusal_status(exc, 200))
    except stripe.StripeError as exc:
        return await view(request, session_id,
                          error=f"Stripe could not do it right now ({exc.user_message or type(exc).__name__}).")
