"""Team pages: /teams (your accounts, the switcher, a new team), /teams/{id} (members, roles,
invitations: each action its own route), /invitations/accept (the emailed link). The rules are
sql/functions/57_teams.sql's; the bodies and limits are the JSON endpoints' (api/teams.py)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, get_args

import msgspec
from litestar import Request, get, post
from litestar.params import FromPath, FromQuery
from litestar.response import Redirect

from api.calls import call_json
from api.errors import PgtallyError
from api.teams import Acceptance, NewInvitation, NewTeam, Role, RoleChange, SsoSettings, check_sso_domain, save_sso
from api.web import FORM, browser_session, form_as, page, problem_text, signed_in

Form = FORM


class TeamForm(msgspec.Struct):
    """The team pages' form fields (each route reads its own; ids travel in the path)."""

    name: str = ""
    account_id: str = ""
    email: str = ""
    role: str = "member"
    token: str = ""


async def signed_in_page(request: Request, render) -> Any:
    """A team page's action for the signed-in person (pages.signed_in: to the login page when
    signed out); a refusal is shown on a message page that leads back to /teams."""
    async def refused(request: Request, session_id, error: str, status_code: int = 400) -> Any:
        return page("message.html", request, max(status_code, 400), title="Not done", message=error, link=("/teams", "Teams"))

    return await signed_in(request, render, refused)


async def teams_view(request: Request, session_id: uuid.UUID, **extra: Any) -> Any:
    mine = await call_json(request, "SELECT api.accounts(%s::uuid)", [session_id])
    return page("teams/teams.html", request, accounts=mine["data"], current=request.session.get("account_id"), **extra)


@get("/teams")
async def teams_page(request: Request) -> Any:
    """Your accounts with your role in each; which one the dashboard and plans act on; a new team."""
    return await signed_in_page(request, lambda sid: teams_view(request, sid))


@post("/teams")
async def teams_create(request: Request, data: Annotated[TeamForm, Form]) -> Any:
    async def render(sid):
        new = form_as(NewTeam, name=data.name)
        team = await call_json(request, "SELECT api.create_team(%s::uuid, %s::text)", [sid, new.name])
        return Redirect(f"/teams/{team['id']}")
    return await signed_in_page(request, render)


@post("/teams/switch")
async def teams_switch(request: Request, data: Annotated[TeamForm, Form]) -> Any:
    """The team switcher: the dashboard, plans and purchases act on this account from now on
    (your own when empty). Membership is checked by every call, not here."""
    async def render(sid):
        mine = await call_json(request, "SELECT api.accounts(%s::uuid)", [sid])
        ids = {a["id"]: a for a in mine["data"]}
        if data.account_id and data.account_id in ids and ids[data.account_id]["kind"] == "team":
            request.session["account_id"] = data.account_id
        else:
            request.session.pop("account_id", None)
        return Redirect("/dashboard")
    return await signed_in_page(request, render)


async def team_view(request: Request, session_id: uuid.UUID, account_id: uuid.UUID, **extra: Any) -> Any:
    shown = await call_json(request, "SELECT api.team_page(%s::uuid, %s::uuid)", [session_id, account_id])
    return page("teams/team.html", request, **shown, roles=list(get_args(Role)), **extra)


@get("/teams/{account_id:uuid}")
async def team_page(request: Request, account_id: FromPath[uuid.UUID]) -> Any:
    """A team: members and their roles, pending invitations, and the forms to change them."""
    return await signed_in_page(request, lambda sid: team_view(request, sid, account_id))


async def team_action(request: Request, account_id: uuid.UUID, act, notice: str) -> Any:
    """Do ``act(session_id)`` on the team, then show its page with ``notice`` (the team list when
    the person just left it)."""
    async def render(sid):
        await act(sid)
        try:
            return await team_view(request, sid, account_id, notice=notice)
        except PgtallyError:
            return Redirect("/teams")          # you left it
    return await signed_in_page(request, render)


@post("/teams/{account_id:uuid}/invitations")
async def team_invite(request: Request, account_id: FromPath[uuid.UUID], data: Annotated[TeamForm, Form]) -> Any:
    """Invite (or send again)."""
    async def act(sid):
        asked = form_as(NewInvitation, email=data.email, role=data.role)
        await call_json(request, "SELECT api.invite(%s::uuid, %s::uuid, %s::text, %s::text)",
                        [sid, account_id, asked.email, asked.role])
    return await team_action(request, account_id, act, f"Invitation sent to {data.email.strip()[:320]}.")


@post("/teams/{account_id:uuid}/invitations/{invitation_id:uuid}/revoke")
async def team_revoke_invitation(request: Request, account_id: FromPath[uuid.UUID], invitation_id: FromPath[uuid.UUID]) -> Any:
    async def act(sid):
        await call_json(request, "SELECT api.revoke_invitation(%s::uuid, %s::uuid, %s::uuid)", [sid, account_id, invitation_id])
    return await team_action(request, account_id, act, "Invitation revoked.")


@post("/teams/{account_id:uuid}/members/{user_id:uuid}/role")
async def team_set_role(request: Request, account_id: FromPath[uuid.UUID], user_id: FromPath[uuid.UUID],
                        data: Annotated[TeamForm, Form]) -> Any:
    async def act(sid):
        change = form_as(RoleChange, role=data.role)
        await call_json(request, "SELECT api.set_member_role(%s::uuid, %s::uuid, %s::uuid, %s::text)",
                        [sid, account_id, user_id, change.role])
    return await team_action(request, account_id, act, "Role changed.")


@post("/teams/{account_id:uuid}/members/{user_id:uuid}/remove")
async def team_remove(request: Request, account_id: FromPath[uuid.UUID], user_id: FromPath[uuid.UUID]) -> Any:
    """Remove a member (or leave)."""
    async def act(sid):
        await call_json(request, "SELECT api.remove_member(%s::uuid, %s::uuid, %s::uuid)", [sid, account_id, user_id])
    return await team_action(request, account_id, act, "Removed.")


class SsoForm(msgspec.Struct):
    """The SSO settings form: ``domains`` one per line (or separated by commas or spaces),
    ``require_sso`` a checkbox."""

    issuer: str = ""
    client_id: str = ""
    client_secret: str = ""
    domains: str = ""
    require_sso: str = ""


async def sso_view(request: Request, session_id: uuid.UUID, account_id: uuid.UUID, status_code: int = 200,
                   **extra: Any) -> Any:
    """The team's SSO page (api.team_sso_page); a refusal to show it at all on a message page."""
    try:
        shown = await call_json(request, "SELECT api.team_sso_page(%s::uuid, %s::uuid)", [session_id, account_id])
    except PgtallyError as exc:
        return page("message.html", request, 403 if exc.error.get("sqlstate") == "TL403" else 400, title="Not done",
                    message=problem_text(exc), link=("/teams", "Teams"))
    callback = f"{request.app.state.settings.public_url.rstrip('/')}/auth/sso/callback"
    return page("teams/sso.html", request, status_code, **shown, callback=callback, **extra)


async def sso_action(request: Request, account_id: uuid.UUID, act, notice: str) -> Any:
    """Do ``act(session_id)`` on the team's SSO, then show its page with ``notice``; a refusal is
    shown on the page, nothing changed."""
    async def view(request: Request, sid, error: str, status_code: int = 400) -> Any:
        return await sso_view(request, sid, account_id, max(status_code, 400), error=error)

    async def render(sid):
        await act(sid)
        return await sso_view(request, sid, account_id, notice=notice)
    return await signed_in(request, render, view)


@get("/teams/{account_id:uuid}/sso")
async def team_sso_page(request: Request, account_id: FromPath[uuid.UUID]) -> Any:
    """The team's single sign-on (owners): issuer, client id, each domain with its verification
    and the TXT record to publish; the settings form, "Check DNS" per domain, and turning it off."""
    return await signed_in_page(request, lambda sid: sso_view(request, sid, account_id))


@post("/teams/{account_id:uuid}/sso")
async def team_sso_save(request: Request, account_id: FromPath[uuid.UUID], data: Annotated[SsoForm, Form]) -> Any:
    """Save the settings (PUT /v1/accounts/{id}/sso's body and rules)."""
    async def act(sid):
        settings = form_as(SsoSettings, issuer=data.issuer.strip(), client_id=data.client_id.strip(),
                           client_secret=data.client_secret, domains=data.domains.replace(",", " ").split() or None,
                           require_sso=data.require_sso == "on")
        await save_sso(request, sid, account_id, settings)
    return await sso_action(request, account_id, act, "Single sign-on saved.")


@post("/teams/{account_id:uuid}/sso/domains/{domain:str}/verify")
async def team_sso_verify(request: Request, account_id: FromPath[uuid.UUID], domain: FromPath[str]) -> Any:
    """Check DNS for the domain's TXT record (POST .../sso/domains/{domain}/verify's work)."""
    async def act(sid):
        await check_sso_domain(request, sid, account_id, domain[:253])
    return await sso_action(request, account_id, act, f"{domain[:253]} is verified.")


@post("/teams/{account_id:uuid}/sso/delete")
async def team_sso_delete(request: Request, account_id: FromPath[uuid.UUID]) -> Any:
    """Turn single sign-on off (DELETE /v1/accounts/{id}/sso)."""
    async def act(sid):
        await call_json(request, "SELECT api.sso(%s::uuid, %s::uuid, true)", [sid, account_id])
    return await sso_action(request, account_id, act, "Single sign-on is off.")


@get("/invitations/accept")
async def invitation_page(request: Request, token: FromQuery[str] = "") -> Any:
    """The emailed link: sign in (or up) first, then one button joins the team."""
    if browser_session(request) is None:
        return page("teams/invitation.html", request, token=token, signed_in_now=False)
    return page("teams/invitation.html", request, token=token, signed_in_now=True)


@post("/invitations/accept")
async def invitation_accept(request: Request, data: Annotated[TeamForm, Form]) -> Any:
    async def render(sid):
        token = form_as(Acceptance, token=data.token).token
        team = await call_json(request, "SELECT api.accept_invitation(%s::uuid, %s::text)", [sid, token])
        return Redirect(f"/teams/{team['id']}")
    return await signed_in_page(request, render)


PAGES = [teams_page, teams_create, teams_switch, team_page, team_invite, team_revoke_invitation, team_set_role, team_remove,
         team_sso_page, team_sso_save, team_sso_verify, team_sso_delete, invitation_page, invitation_accept]
