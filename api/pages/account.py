"""The account page: the person, their ways to sign in (link and unlink providers), their
sessions (sign out one) and API keys (create, shown once; revoke). One call draws it
(api.account_page)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

import msgspec
from litestar import Request, get, post
from litestar.params import FromPath
from litestar.response import Redirect

from api.calls import call_json
from api.keys import NewApiKey
from api.web import FORM, form_as, page, signed_in

Form = FORM


class KeyForm(msgspec.Struct):
    name: str = ""


async def account_view(request: Request, session_id: uuid.UUID, **extra: Any) -> Any:
    shown = await call_json(request, "SELECT api.account_page(%s::uuid)", [session_id])
    linked = {i["provider"] for i in shown["methods"]["identities"]}
    return page("account/account.html", request, me=shown["me"], methods=shown["methods"], linked=linked,
                sessions=shown["sessions"], keys=shown["keys"], **extra)


@get("/account")
async def account_page(request: Request) -> Any:
    return await signed_in(request, lambda sid: account_view(request, sid), account_view)


@post("/account/sessions/{target:uuid}/revoke")
async def revoke_session(request: Request, target: FromPath[uuid.UUID]) -> Any:
    async def action(sid):
        await call_json(request, "SELECT api.revoke_session(%s::uuid, %s::uuid)", [sid, target])
        if target == sid:
            request.clear_session()
            return Redirect("/login")
        return Redirect("/account")
    return await signed_in(request, action, account_view)


@post("/account/api-keys")
async def create_key(request: Request, data: Annotated[KeyForm, Form]) -> Any:
    async def action(sid):
        new = form_as(NewApiKey, name=data.name)
        key = await call_json(request, "SELECT api.create_api_key(%s::uuid, %s::text, %s::text[], NULL)",
                              [sid, new.name, new.scopes])
        return await account_view(request, sid, new_key=key)
    return await signed_in(request, action, account_view)


@post("/account/api-keys/{key_id:uuid}/revoke")
async def revoke_key(request: Request, key_id: FromPath[uuid.UUID]) -> Any:
    async def action(sid):
        await call_json(request, "SELECT api.revoke_api_key(%s::uuid, %s::uuid)", [sid, key_id])
        return Redirect("/account")
    return await signed_in(request, action, account_view)


@post("/account/providers/{provider:str}/unlink")
async def unlink(request: Request, provider: FromPath[str]) -> Any:
    async def action(sid):
        await call_json(request, "SELECT api.oauth_unlink(%s::uuid, %s::text)", [sid, provider])
        return Redirect("/account")
    return await signed_in(request, action, account_view)


PAGES = [account_page, revoke_session, create_key, revoke_key, unlink]
