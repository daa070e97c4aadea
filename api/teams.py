"""``/v1/accounts``: teams, and ``/v1/accounts/provision`` (a product's own users, by a service
key). A person belongs to their own account and to any number of team accounts, each with a role
(owner, admin, member, billing, viewer); the usage, billing and key endpoints act on a team when
given its ``account_id``. Invitations go by email and are single use. The rules live in
sql/functions/57_teams.sql; who may do what, in ``identity.role_permissions``, decided by
``identity.authenticate``."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

import msgspec
from litestar import Request, Response, delete, get, patch, post, put
from litestar.params import FromPath, JSONBody, Parameter

from api import outbound
from api.calls import AUTH, SECURITY, SESSION, Caller, Session, call_json
from api.errors import PgtallyError, problems

Role = Literal["owner", "admin", "member", "billing", "viewer"]


class Account(msgspec.Struct):
    id: str
    object: str
    kind: str
    """person (your own) or team."""
    name: str | None
    role: str | None
    plan: str
    credits: str
    suspended: bool
    created_at: str


class AccountList(msgspec.Struct):
    data: list[Account]


class NewTeam(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]


class Member(msgspec.Struct):
    user_id: str
    email: str
    role: str
    joined_at: str


class MemberList(msgspec.Struct):
    data: list[Member]


class RoleChange(msgspec.Struct, forbid_unknown_fields=True):
    role: Role


class NewInvitation(msgspec.Struct, forbid_unknown_fields=True):
    email: Annotated[str, msgspec.Meta(min_length=3, max_length=320)]
    role: Role = "member"


class Invitation(msgspec.Struct):
    id: str
    object: str
    account_id: str
    email: str
    role: str
    created_at: str
    expires_at: str
    sent: int
    """How many times the link was sent (inviting again sends a new one)."""
    revoked: bool | None = None


class InvitationList(msgspec.Struct):
    data: list[Invitation]


class Acceptance(msgspec.Struct, forbid_unknown_fields=True):
    token: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


TEAM = {"security": SECURITY, "dependencies": SESSION}


@get("/v1/accounts", summary="Your accounts", responses=problems(400, 401, 403, 503), **TEAM)
async def accounts(request: Request, session: Session) -> AccountList:
    """The accounts you belong to, your own first, with your role in each."""
    return await call_json(request, "SELECT api.accounts(%s::uuid)", [session])


@post("/v1/accounts", status_code=201, summary="Create a team", responses=problems(400, 401, 403, 415, 422, 503), **TEAM)
async def create_team(request: Request, session: Session, data: JSONBody[NewTeam]) -> Account:
    """A team account you own: its own plan, credits, usage, API keys and Stripe customer."""
    return await call_json(request, "SELECT api.create_team(%s::uuid, %s::text)", [session, data.name])


class ProvisionRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The product's person to create or find an account for."""

    external_id: Annotated[str, msgspec.Meta(min_length=1, max_length=255, examples=["user_2abc"])]
    """Your id for the person (your users table, NextAuth, Clerk): one account per external_id."""
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None


class Provisioned(msgspec.Struct):
    account_id: str
    external_id: str
    created: bool
    """True for the call that created the account; false when it existed already."""
    name: str | None
    plan: str
    credits: str
    created_at: str


@post("/v1/accounts/provision", status_code=201, summary="Create or find the account of your app's user",
      security=SECURITY, dependencies=AUTH, responses=problems(400, 401, 403, 415, 422, 503))
async def provision(request: Request, caller: Caller, data: JSONBody[ProvisionRequest]) -> Response[Provisioned]:
    """For a product with its own sign-in: the account of its person ``external_id``, created on
    the free plan by the first call (201) and found by every later one (200), concurrent calls
    included. Needs a service key with the ``accounts:write`` scope; the key then meters on the
    account's behalf with ``account_id``. 403 for any other key or an access token."""
    found = await call_json(request, "SELECT api.provision_account(%s::text, %s::uuid, %s::text, %s::text)",
                            [*caller.params, data.external_id, data.name])
    return Response(Provisioned(**found), status_code=201 if found["created"] else 200)


@get("/v1/accounts/{account_id:uuid}/members", summary="Members", responses=problems(400, 401, 403, 404, 503), **TEAM)
async def members(request: Request, session: Session, account_id: FromPath[uuid.UUID]) -> MemberList:
    """The members and their roles (any member may look)."""
    return await call_json(request, "SELECT api.members(%s::uuid, %s::uuid)", [session, account_id])


@patch("/v1/accounts/{account_id:uuid}/members/{user_id:uuid}", summary="Change a member's role",
       responses=problems(400, 401, 403, 404, 409, 415, 422, 503), **TEAM)
async def set_role(request: Request, session: Session, account_id: FromPath[uuid.UUID], user_id: FromPath[uuid.UUID],
                   data: JSONBody[RoleChange]) -> MemberList:
    """Owners and admins change roles; only owners make or unmake owners; 409 when the account
    would be left without an owner."""
    return await call_json(request, "SELECT api.set_member_role(%s::uuid, %s::uuid, %s::uuid, %s::text)",
                           [session, account_id, user_id, data.role])


@delete("/v1/accounts/{account_id:uuid}/members/{user_id:uuid}", status_code=200, summary="Remove a member, or leave",
        responses=problems(400, 401, 403, 404, 409, 503), **TEAM)
async def remove_member(request: Request, session: Session, account_id: FromPath[uuid.UUID],
                        user_id: FromPath[uuid.UUID]) -> MemberList:
    """Owners and admins remove members (their keys on the account stop); anyone may leave; 409
    for the last owner."""
    return await call_json(request, "SELECT api.remove_member(%s::uuid, %s::uuid, %s::uuid)", [session, account_id, user_id])


@get("/v1/accounts/{account_id:uuid}/invitations", summary="Pending invitations",
     responses=problems(400, 401, 403, 404, 503), **TEAM)
async def invitations(request: Request, session: Session, account_id: FromPath[uuid.UUID]) -> InvitationList:
    """Invitations not yet accepted, revoked or expired."""
    return await call_json(request, "SELECT api.invitations(%s::uuid, %s::uuid)", [session, account_id])


@post("/v1/accounts/{account_id:uuid}/invitations", status_code=201, summary="Invite someone (or send again)",
      responses=problems(400, 401, 403, 404, 409, 415, 422, 503), **TEAM)
async def invite(request: Request, session: Session, account_id: FromPath[uuid.UUID],
                 data: JSONBody[NewInvitation]) -> Invitation:
    """Email a single-use link (7 days) to join the team with a role; inviting the same address
    again sends a new link and the old one stops. 409 a member already, or not a team."""
    return await call_json(request, "SELECT api.invite(%s::uuid, %s::uuid, %s::text, %s::text)",
                           [session, account_id, data.email, data.role])


@delete("/v1/accounts/{account_id:uuid}/invitations/{invitation_id:uuid}", status_code=200,
        summary="Revoke an invitation", responses=problems(400, 401, 403, 404, 503), **TEAM)
async def revoke_invitation(request: Request, session: Session, account_id: FromPath[uuid.UUID],
                            invitation_id: FromPath[uuid.UUID]) -> Invitation:
    """The link stops working."""
    return await call_json(request, "SELECT api.revoke_invitation(%s::uuid, %s::uuid, %s::uuid)",
                           [session, account_id, invitation_id])


@post("/v1/invitations/accept", status_code=200, summary="Accept an invitation",
      responses=problems(400, 401, 403, 415, 422, 503), **TEAM)
async def accept(request: Request, session: Session, data: JSONBody[Acceptance]) -> Account:
    """Join the team with the token from the email, once. Your verified email must be the invited
    address (403; the invitation stays for it). 400 used, revoked, replaced or expired."""
    return await call_json(request, "SELECT api.accept_invitation(%s::uuid, %s::text)", [session, data.token])


class SsoSettings(msgspec.Struct, forbid_unknown_fields=True):
    issuer: Annotated[str, msgspec.Meta(min_length=8, max_length=500, examples=["https://app.example.com/sso"])]
    """The provider's URL: its /.well-known/openid-configuration is read."""
    client_id: Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
    client_secret: Annotated[str, msgspec.Meta(min_length=1, max_length=500)]
    domains: Annotated[list[Annotated[str, msgspec.Meta(min_length=3, max_length=253)]], msgspec.Meta(min_length=1, max_length=50)]
    """Email domains whose people sign in through it and join the team as members."""
    require_sso: bool = False
    """Those people may not sign in with a password or Google/GitHub."""


class TxtRecord(msgspec.Struct):
    name: str
    """The domain itself."""
    value: str
    """``pgtally-domain-verification=<token>``."""


class DomainVerification(msgspec.Struct):
    domain: str
    verified: bool
    """Only a verified domain signs its people in through the team's provider."""
    verified_by: Literal["dns", "staff"] | None
    verified_at: str | None
    txt_record: TxtRecord
    """Publish it in DNS, then ask ``POST .../sso/domains/{domain}/verify``."""


class Sso(msgspec.Struct):
    account_id: str
    issuer: str
    client_id: str
    domains: list[str]
    """Claimed domains; see domain_verification for which are proven."""
    domain_verification: list[DomainVerification]
    require_sso: bool
    updated_at: str


@put("/v1/accounts/{account_id:uuid}/sso", summary="Set up the team's single sign-on",
     responses=problems(400, 401, 403, 404, 409, 415, 422, 503), **TEAM)
async def set_sso(request: Request, session: Session, account_id: FromPath[uuid.UUID], data: JSONBody[SsoSettings]) -> Sso:
    """The team's own OpenID Connect provider (owners: sso:manage). People of its domains sign in
    at ``/auth/sso/start?email=`` and join the team as members; with ``require_sso`` its members
    (of those domains) may sign in no other way. A domain takes effect only once proven: publish
    its ``txt_record`` and ``POST .../sso/domains/{domain}/verify`` (or ask staff to approve it).
    The redirect URI to register there: ``PGTALLY_PUBLIC_URL/auth/sso/callback``.
    409 when another team proved a domain; 422 a public mail domain (gmail.com, outlook.com...)."""
    return await save_sso(request, session, account_id, data)


async def save_sso(request: Request, session: uuid.UUID, account_id: uuid.UUID, data: SsoSettings) -> dict[str, Any]:
    """PUT .../sso's work, shared with the team's SSO page (api/pages/teams.py): the issuer is a
    URL pgtally will fetch, then api.set_sso decides."""
    try:        # a URL pgtally will fetch: https outside development (api/outbound.py)
        outbound.check_url(request.app.state.settings, data.issuer, "the issuer")
    except outbound.OutboundError as exc:
        raise PgtallyError({"sqlstate": "TL422", "message": str(exc), "field": "issuer"}) from None
    return await call_json(request, "SELECT api.set_sso(%s::uuid, %s::uuid, %s::text, %s::text, %s::text, %s::text[], %s::boolean)",
                           [session, account_id, data.issuer, data.client_id, data.client_secret, data.domains, data.require_sso])


@get("/v1/accounts/{account_id:uuid}/sso", summary="The team's single sign-on", responses=problems(400, 401, 403, 404, 503), **TEAM)
async def get_sso(request: Request, session: Session, account_id: FromPath[uuid.UUID]) -> Sso:
    """The settings (never the client secret). 404 none."""
    return await call_json(request, "SELECT api.sso(%s::uuid, %s::uuid)", [session, account_id])


@delete("/v1/accounts/{account_id:uuid}/sso", status_code=200, summary="Turn the team's single sign-on off",
        responses=problems(400, 401, 403, 404, 503), **TEAM)
async def delete_sso(request: Request, session: Session, account_id: FromPath[uuid.UUID]) -> Sso:
    """Its people sign in as before; the settings removed are returned."""
    return await call_json(request, "SELECT api.sso(%s::uuid, %s::uuid, true)", [session, account_id])


@post("/v1/accounts/{account_id:uuid}/sso/domains/{domain:str}/verify", status_code=200,
      summary="Prove the team owns an SSO domain", responses=problems(400, 401, 403, 404, 409, 422, 502, 503), **TEAM)
async def verify_sso_domain(request: Request, session: Session, account_id: FromPath[uuid.UUID],
                            domain: Annotated[str, Parameter(max_length=253)]) -> Sso:
    """Look up the domain's TXT records in DNS (RFC 1035 section 3.3.14) and prove the claim when
    one is the claim's ``txt_record.value`` (api.verify_sso_domain decides). 422 no such record yet
    (the problem names the record to publish), 404 not claimed, 409 another team proved it, 502
    DNS could not be asked."""
    return await check_sso_domain(request, session, account_id, domain)


async def check_sso_domain(request: Request, session: uuid.UUID, account_id: uuid.UUID, domain: str) -> dict[str, Any]:
    """The verify endpoint's work, shared with the "Check DNS" button of the team's SSO page."""
    query = "SELECT api.verify_sso_domain(%s::uuid, %s::uuid, %s::text, %s::text[])"
    # First who asks and whether the domain is theirs: DNS is asked for claimed domains only.
    settings = await call_json(request, query, [session, account_id, domain, None])
    (claim,) = [d for d in settings["domain_verification"] if d["domain"] == domain.strip().lower()]
    if claim["verified"]:
        return settings
    try:
        records = await outbound.txt_records(request.app.state.settings, claim["domain"])
    except outbound.OutboundError as exc:
        raise PgtallyError({"sqlstate": "TL502", "message": str(exc)}) from None
    return await call_json(request, query, [session, account_id, domain, records])


ROUTES = [accounts, create_team, provision, members, set_role, remove_member, invitations, invite, revoke_invitation, accept,
          set_sso, get_sso, delete_sso, verify_sso_domain]
