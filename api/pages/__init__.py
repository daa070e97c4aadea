"""Server-rendered pages for people, one module per area, templates beside them (templates/, a
folder per area): sign_in, account, billing, teams, admin. Every page view makes one database
call; every action is a route of its own. What pages share (cookies, CSRF, headers, rendering,
the signed-in session) is api/web.py."""

from __future__ import annotations

from litestar import Router
from litestar.static_files import create_static_files_router

from api.pages import account, admin, billing, sign_in, teams
from api.web import STATIC, page_headers


def router(settings) -> Router:
    """Every page, with the security headers (api.web.page_headers) and the static files."""
    return Router(path="/", after_request=page_headers(settings), include_in_schema=False, route_handlers=[
        *sign_in.PAGES, *account.PAGES, *billing.PAGES, *teams.PAGES, *admin.PAGES,
        create_static_files_router(path="/static", directories=[STATIC], include_in_schema=False)])
