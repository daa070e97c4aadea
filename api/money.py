"""Money controls (issue 28): ``/v1/budgets`` (spending caps and alerts per API key, member and
account; the rules are in sql/functions/47_budgets.sql) and ``POST /v1/usage/events/{id}/reversal``
(reversing a charge into its lots; sql/functions/48_reversals.sql)."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, HeaderParameter, JSONBody, QueryParameter

from api.calls import AUTH, SECURITY, Caller, call, json_response
from api.errors import problems

Credits = Annotated[str, msgspec.Meta(min_length=1, max_length=40, pattern=r"^[0-9]{1,19}(\.[0-9]{1,6})?$",
                                      examples=["10", "2.5"])]


class BudgetRequest(msgspec.Struct, forbid_unknown_fields=True):
    """A cap on the credits spent per window by one API key, one member (the keys they made and
    their sessions) or the whole account."""

    scope: Literal["api_key", "member", "account"]
    limit: Credits
    """Credits per window, as a decimal string."""
    window: Literal["day", "month", "billing_period"]
    subject: uuid.UUID | None = None
    """The API key's id, the member's user id, or the account id (the default for scope account)."""
    alerts: Annotated[list[Annotated[int, msgspec.Meta(ge=1, le=100)]], msgspec.Meta(max_length=10)] = []
    """Percentages of the limit at which the owners and admins (and the member) are emailed, once per window."""
    account_id: uuid.UUID | None = None
    """A team account you belong to (default: the account of the key or session)."""


class Budget(msgspec.Struct):
    """A budget with what its current window has spent."""

    id: str
    object: str
    account_id: str
    scope: str
    subject: str
    limit: str
    window: str
    alerts: list[int]
    spent: str
    remaining: str
    period_start: str
    resets_at: str
    created_at: str


class BudgetList(msgspec.Struct):
    data: list[Budget]


class Deleted(msgspec.Struct):
    id: str
    object: str
    deleted: bool


@post("/v1/budgets", status_code=201, dependencies=AUTH, security=SECURITY, summary="Set a budget",
      responses=problems(400, 401, 403, 404, 415, 422, 503))
async def create_budget(request: Request, caller: Caller, data: JSONBody[BudgetRequest]) -> Response[Budget]:
    """Cap what an API key, a member or the account may spend per window (``api.create_budget``);
    setting the same scope, subject and window again changes its limit and alerts. A charge,
    batch event or hold the budget does not cover is refused with 402 ``budget-exceeded`` naming
    the budget and ``resets_at``, and charges nothing. Owners, admins and billing members (or a
    key with billing:manage); 403 otherwise; 422 a subject that is not a key or member of the account."""
    (body,) = await call(
        request, "SELECT api.create_budget(%s::text, %s::uuid, %s::text, %s::uuid, %s::text, %s::text, "
                 "%s::integer[], %s::uuid)::text",
        [*caller.params, data.scope, data.subject, data.limit, data.window, data.alerts, data.account_id])
    return json_response(body, 201)


@get("/v1/budgets", dependencies=AUTH, security=SECURITY, summary="Budgets and their spending",
     responses=problems(400, 401, 403, 404, 503))
async def list_budgets(
    request: Request, caller: Caller,
    account_id: Annotated[uuid.UUID | None, QueryParameter(description="a team account you belong to")] = None,
) -> Response[BudgetList]:
    """The account's budgets with this window's spending (``api.budgets``): all of them for
    owners, admins, billing and viewer members; a member sees their own and their keys'."""
    (body,) = await call(request, "SELECT api.budgets(%s::text, %s::uuid, %s::uuid)::text", [*caller.params, account_id])
    return json_response(body)


@delete("/v1/budgets/{budget_id:uuid}", status_code=200, dependencies=AUTH, security=SECURITY,
        summary="Delete a budget", responses=problems(400, 401, 403, 404, 503))
async def delete_budget(
    request: Request, caller: Caller, budget_id: FromPath[uuid.UUID],
    account_id: Annotated[uuid.UUID | None, QueryParameter(description="a team account you belong to")] = None,
) -> Response[Deleted]:
    """Delete one of the account's budgets (``api.delete_budget``). 404 when it has no such budget."""
    (body,) = await call(request, "SELECT api.delete_budget(%s::text, %s::uuid, %s::uuid, %s::uuid)::text",
                         [*caller.params, budget_id, account_id])
    return json_response(body)


class ReversalRequest(msgspec.Struct, forbid_unknown_fields=True):
    """What to reverse: ``quantity`` units of the event (default: all that are left), and why."""

    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=500)]
    quantity: Annotated[int, msgspec.Meta(ge=1, le=10**12)] | None = None


class Reversed(msgspec.Struct):
    allowance_units: int
    credits: str
    amount: int | None
    """Post-paid: what the reversed units cost (minor units): a credit owed to the customer."""
    currency: str | None


class ReversalLot(msgspec.Struct):
    lot_id: str
    credits: str
    new_lot: bool
    """The lot had expired since: a new lot (source reversal) holds the credits for 7 days."""
    replaces_lot: str | None = None
    expires_at: str | None = None


class Reversal(msgspec.Struct):
    """A reversal of a usage event."""

    id: str
    object: str
    account_id: str
    usage_event_id: str
    quantity: int
    reversed: Reversed
    allowance_returned: bool
    lots: list[ReversalLot]
    transfer_id: str | None
    reason: str
    idempotency_key: str
    balance: dict[str, str]
    created_at: str


@post("/v1/usage/events/{event_id:uuid}/reversal", status_code=201, dependencies=AUTH, security=SECURITY,
      summary="Reverse a charge, in whole or in part",
      responses={200: ResponseSpec(Reversal, description="Replay of an earlier request with this key "
                                                         "(header Idempotent-Replayed: true)"),
                 **problems(400, 401, 403, 404, 409, 415, 422, 503)})
async def reverse_usage_event(
    request: Request, caller: Caller, event_id: FromPath[uuid.UUID], data: JSONBody[ReversalRequest],
    idempotency_key: Annotated[str, HeaderParameter(name="Idempotency-Key", min_length=1, max_length=255)],
) -> Response[Reversal]:
    """Reverse a usage event of any account (``api.reverse_usage``): admin staff, or an operator
    key with the ``usage:reverse`` scope. Its credits go back to the lots it drew from, last drawn
    first (an expired lot's as a new lot for 7 days), its allowance units to their window if still
    open; post-paid usage is recorded as a credit owed. 201 with the reversal; 200 and
    ``Idempotent-Replayed: true`` for a retry; 422 ``idempotency-key-reused`` for the key reused with
    another request; 409 an event already fully reversed; 422 more units than are left."""
    replayed, body = await call(
        request, "SELECT replayed, body::text FROM api.reverse_usage(%s::text, %s::uuid, %s::uuid, %s::bigint, "
                 "%s::text, %s::text)",
        [*caller.params, event_id, data.quantity, data.reason, idempotency_key])
    if replayed:
        return json_response(body, 200, {"Idempotent-Replayed": "true"})
    return json_response(body, 201)


ROUTES = [create_budget, list_budgets, delete_budget, reverse_usage_event]
