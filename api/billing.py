"""``/v1/plans``, ``/v1/billing`` and ``/v1/webhooks/stripe``: how pgtally gets paid.

Stripe is called through the real ``stripe`` SDK (``STRIPE_API_KEY``; ``STRIPE_API_BASE`` points
it at another address, such as a local stand-in), always between database calls, never inside a
transaction. Webhook events are verified here and applied by one PL/pgSQL function,
``api.stripe_webhook`` (sql/functions/60_billing.sql), exactly once and in order."""

from __future__ import annotations

import hashlib
import time
import uuid
from typing import Annotated, Any

import msgspec
import psycopg
import stripe
from litestar import Request, Response, delete, get, post, put
from litestar.exceptions import HTTPException
from litestar.params import HeaderParameter, JSONBody, QueryParameter
from psycopg.types.json import Jsonb

from api.calls import AUTH, NO_STORE_CACHE, SECURITY, Caller, call, call_json, json_response
from api.errors import PgtallyError, problems
from api.ops import WEBHOOKS
from api.validation import decode_json, nul_path

PriceCode = Annotated[str, msgspec.Meta(min_length=1, max_length=63, pattern=r"^[a-z][a-z0-9_]*$",
                                        examples=["pro_monthly", "bundle_10"])]
Url = Annotated[str, msgspec.Meta(min_length=8, max_length=2000, pattern=r"^https?://")]
IdempotencyKey = Annotated[str | None, HeaderParameter(name="Idempotency-Key", min_length=1, max_length=255,
                                                       required=False)]
SIGNATURE_TOLERANCE = 300   # seconds, as Stripe's own libraries
AccountParam = Annotated[uuid.UUID | None, QueryParameter(
    description="Act on this account: a team whose role lets you (billing:read or billing:manage), or any account for a service key")]


def stripe_client(settings) -> stripe.StripeClient | None:
    """The Stripe SDK client, or None when ``STRIPE_API_KEY`` is not set."""
    if not settings.stripe_api_key:
        return None
    stripe.enable_telemetry = False
    return stripe.StripeClient(
        settings.stripe_api_key, http_client=stripe.HTTPXClient(), max_network_retries=2,
        base_addresses={"api": settings.stripe_api_base} if settings.stripe_api_base else None)


def client_of(request: Request) -> stripe.StripeClient:
    client = request.app.state.stripe
    if client is None:
        raise PgtallyError({"sqlstate": "TL503", "message": "billing is not configured: set STRIPE_API_KEY"})
    return client


class CheckoutRequest(msgspec.Struct, forbid_unknown_fields=True):
    price: PriceCode
    success_url: Url | None = None
    cancel_url: Url | None = None


class ChangeRequest(msgspec.Struct, forbid_unknown_fields=True):
    price: PriceCode


class Price(msgspec.Struct):
    id: str
    name: str
    amount: int
    """Minor currency units (cents)."""
    currency: str
    interval: str | None
    stripe_price_id: str
    usage_type: str
    """licensed (a fixed amount per period) or metered (bills the period's reported usage)."""
    credits: str | None
    """For a bundle: the credits it grants."""


class PlanEntitlement(msgspec.Struct):
    meter: str
    kind: str
    """allowance, fair_use, unlimited or post_paid."""
    period: str
    limit: int | None
    unit_amount: int | None
    """post_paid: the price of one unit, in minor currency units (cents)."""


class Plan(msgspec.Struct):
    id: str
    name: str
    description: str
    features: list[str]
    included_credits: str
    signup_bonus: str
    """Credits granted once per person when they verify their email."""
    monthly_credits: str
    """Credits granted each billing period, expiring at its end."""
    spending_limit: int | None
    """Post-paid plans: the most post-paid usage may cost per billing period, in minor units."""
    entitlements: list[PlanEntitlement]
    prices: list[Price]


class Catalog(msgspec.Struct):
    plans: list[Plan]
    bundles: list[Price]


class CheckoutSession(msgspec.Struct):
    id: str
    url: str
    mode: str
    price: str


class PortalSession(msgspec.Struct):
    url: str


class SubscriptionInfo(msgspec.Struct):
    id: str
    status: str
    plan: str | None
    price: str | None
    stripe_item_id: str | None
    current_period_start: str | None
    current_period_end: str | None
    cancel_at_period_end: bool
    canceled_at: str | None
    live: bool


class Suspension(msgspec.Struct):
    at: str
    reason: str | None


class BillingAccount(msgspec.Struct):
    account_id: str
    plan: str
    subscribed_plan: str
    stripe_customer_id: str | None
    plan_grace_until: str | None
    subscription: SubscriptionInfo | None
    suspended: Suspension | None = None
    """Set by an operator: charges, holds and purchases are refused (403 account-suspended)."""


class SubscriptionChange(msgspec.Struct):
    id: str
    status: str
    price: str
    applied: str


class SubscriptionCancel(msgspec.Struct):
    id: str
    status: str
    cancel_at_period_end: bool
    current_period_end: str | None


class WebhookResult(msgspec.Struct):
    received: bool
    status: str
    """applied, stale, ignored (rejected events are answered 400)."""
    duplicate: bool | None = None
    event_id: str | None = None


@get("/v1/plans", summary="Plans, prices and bundles", responses=problems(503))
async def plans(request: Request) -> Response[Catalog]:
    """Public: active plans with their entitlements and Stripe prices (amount in minor units,
    currency, interval, Stripe price id), and the one-time credit bundles."""
    (body,) = await call(request, "SELECT api.plans()::text", [])
    return json_response(body)


async def start_checkout(request: Request, principal: list, price: str,
                         success_url: str | None = None, cancel_url: str | None = None,
                         idempotency_key: str | None = None) -> CheckoutSession:
    """A Stripe Checkout Session for the account of ``principal`` ([API key, session id, account
    id]: the principal's own account, a team it may buy for, or with neither key nor session the
    account a verified upgrade link names): creates or reuses its Stripe customer, names the
    account in ``client_reference_id`` and metadata, saves the card of a bundle purchase for
    one-click top-ups, and sends Stripe an idempotency key: ``checkout-`` and the account-scoped
    key ``api.checkout_prepare`` derives from the client's ``Idempotency-Key`` (a fresh one without)."""
    client = client_of(request)
    public_url = request.app.state.settings.public_url.rstrip("/")
    key, session_id, account_id = principal
    prep = await call_json(request, "SELECT api.checkout_prepare(%s::text, %s::uuid, %s::text, %s::uuid, %s::text)",
                           [key, session_id, price, account_id, idempotency_key])
    customer = prep["stripe_customer_id"]
    if customer is None:
        created = await client.v1.customers.create_async(
            params={"email": prep["email"], "metadata": {"account_id": prep["account_id"]}} if prep["email"]
            else {"metadata": {"account_id": prep["account_id"]}},
            options={"idempotency_key": f"customer-{prep['account_id']}"})
        customer = (await call_json(request, "SELECT api.link_stripe_customer(%s::text, %s::uuid, %s::text, %s::uuid)",
                                    [key, session_id, created.id, account_id]))["stripe_customer_id"]
    metadata = {"account_id": prep["account_id"], "price": prep["price"]}
    params: dict[str, Any] = {
        "mode": prep["mode"], "customer": customer, "client_reference_id": prep["account_id"],
        # A metered price bills the reported usage: Stripe takes no quantity for it.
        "line_items": [{"price": prep["stripe_price_id"]} if prep["usage_type"] == "metered"
                       else {"price": prep["stripe_price_id"], "quantity": 1}], "metadata": metadata,
        "success_url": success_url or f"{public_url}/billing/success?session_id={{CHECKOUT_SESSION_ID}}",
        "cancel_url": cancel_url or f"{public_url}/billing/cancel",
    }
    if prep["mode"] == "subscription":
        params["subscription_data"] = {"metadata": metadata}
    else:
        params["payment_intent_data"] = {"metadata": metadata, "setup_future_usage": "off_session"}
    session = await client.v1.checkout.sessions.create_async(
        params=params, options={"idempotency_key": f"checkout-{prep['stripe_idempotency_key'] or uuid.uuid4()}"})
    return CheckoutSession(id=session.id, url=session.url, mode=prep["mode"], price=prep["price"])


@post("/v1/billing/checkout", status_code=201, dependencies=AUTH, security=SECURITY,
      summary="Start a Stripe Checkout", responses=problems(400, 401, 403, 409, 415, 422, 502, 503))
async def checkout(request: Request, caller: Caller, data: JSONBody[CheckoutRequest],
                   idempotency_key: IdempotencyKey = None, account_id: AccountParam = None) -> CheckoutSession:
    """A Stripe Checkout Session for a plan price (subscription mode) or a credit bundle
    (payment mode, saving the card for one-click top-ups): creates or reuses the account's
    Stripe customer, names the account in ``client_reference_id`` and metadata, and sends an
    idempotency key to Stripe (derived from the account and the request's ``Idempotency-Key`` when
    given: a retry gets the same session). Returns ``{id, url}``; the purchase is applied when
    Stripe's webhook arrives. 409 ``conflict`` when buying a plan while a subscription is live;
    409 ``idempotency-key-reused`` when the key was used for another purchase."""
    return await start_checkout(request, [*caller.params, account_id], data.price, success_url=data.success_url,
                                cancel_url=data.cancel_url, idempotency_key=idempotency_key)


class TopUpRequest(msgspec.Struct, forbid_unknown_fields=True):
    bundle: PriceCode


class TopUp(msgspec.Struct):
    """``paid``: the saved card was charged; the credits arrive with Stripe's
    payment_intent.succeeded event (a moment later). ``checkout``: no saved card, or the bank
    wants the person to authenticate: finish at ``url``."""

    status: str
    price: str
    credits: str
    payment_intent: str | None = None
    url: str | None = None


async def top_up(request: Request, principal: list, bundle: str, idempotency_key: str | None = None) -> TopUp:
    """One-click top-up: charge the customer's saved card off-session for a bundle (an
    idempotency key goes to Stripe), falling back to Checkout when there is no saved card or the
    card needs authentication. Credits are granted only by the webhook, exactly once. Stripe's
    idempotency key is ``topup-`` and the account-scoped key derived from ``idempotency_key``."""
    client = client_of(request)
    prep = await call_json(request, "SELECT api.checkout_prepare(%s::text, %s::uuid, %s::text, %s::uuid, %s::text)",
                           [principal[0], principal[1], bundle, principal[2], idempotency_key])
    if prep["mode"] != "payment":
        raise PgtallyError({"sqlstate": "TL422", "message": f"{bundle} is not a credit bundle", "field": "bundle"})
    cards = ((await client.v1.payment_methods.list_async(params={"customer": prep["stripe_customer_id"], "type": "card"})).data
             if prep["stripe_customer_id"] else [])
    if cards:
        try:
            intent = await client.v1.payment_intents.create_async(params={
                "amount": prep["amount"], "currency": prep["currency"], "customer": prep["stripe_customer_id"],
                "payment_method": cards[0].id, "off_session": True, "confirm": True,
                "metadata": {"account_id": prep["account_id"], "price": prep["price"]}},
                options={"idempotency_key": f"topup-{prep['stripe_idempotency_key'] or uuid.uuid4()}"})
            if intent.status == "succeeded":
                return TopUp(status="paid", price=bundle, credits=prep["credits"], payment_intent=intent.id)
        except stripe.CardError as exc:
            if exc.code != "authentication_required":
                raise
    session = await start_checkout(request, principal, bundle)
    return TopUp(status="checkout", price=bundle, credits=prep["credits"], url=session.url)


@post("/v1/billing/topup", status_code=201, dependencies=AUTH, security=SECURITY,
      summary="Buy a credit bundle in one click", responses=problems(400, 401, 402, 403, 409, 415, 422, 502, 503))
async def topup(request: Request, caller: Caller, data: JSONBody[TopUpRequest],
                idempotency_key: IdempotencyKey = None, account_id: AccountParam = None) -> TopUp:
    """Buy a credit bundle with the card saved by an earlier Checkout, at once (``paid``; the
    credits follow with Stripe's event), else ``checkout`` with a Checkout ``url``. 402 a declined
    card; 422 not a bundle."""
    return await top_up(request, [*caller.params, account_id], data.bundle, idempotency_key)


class AutoTopUpRequest(msgspec.Struct, forbid_unknown_fields=True):
    below: Annotated[str, msgspec.Meta(min_length=1, max_length=30, examples=["5"])]
    """Credits (a plain decimal): a charge that leaves the balance below this buys ``buy``."""
    buy: PriceCode
    """A credit bundle, paid with the card saved by an earlier Checkout."""


class AutoTopUp(msgspec.Struct):
    enabled: bool
    below: str | None
    bundle: str | None
    failures: int
    in_flight: bool
    last_error: str | None


@put("/v1/billing/auto-topup", status_code=200, dependencies=AUTH, security=SECURITY,
     summary="Turn on auto top-up", responses=problems(400, 401, 403, 409, 415, 422, 503))
async def set_auto_topup(request: Request, caller: Caller, data: JSONBody[AutoTopUpRequest],
                         account_id: AccountParam = None) -> AutoTopUp:
    """When a charge leaves the balance below ``below`` credits, buy the ``buy`` bundle with the
    saved card: one top-up in flight at a time, credits when Stripe confirms the payment; three
    failed charges turn it off and email the user. 409 before any Checkout (no saved card yet)."""
    return await call_json(request, "SELECT api.set_auto_topup(%s::text, %s::uuid, %s::text, %s::text, %s::uuid)",
                           [*caller.params, data.below, data.buy, account_id])


@get("/v1/billing/auto-topup", dependencies=AUTH, security=SECURITY, summary="Auto top-up settings",
     responses=problems(400, 401, 403, 503))
async def get_auto_topup(request: Request, caller: Caller, account_id: AccountParam = None) -> AutoTopUp:
    """The auto top-up settings and state (in flight, failures, last error)."""
    return await call_json(request, "SELECT api.auto_topup(%s::text, %s::uuid, NULL, %s::uuid)", [*caller.params, account_id])


@delete("/v1/billing/auto-topup", status_code=200, dependencies=AUTH, security=SECURITY,
        summary="Turn off auto top-up", responses=problems(400, 401, 403, 503))
async def delete_auto_topup(request: Request, caller: Caller, account_id: AccountParam = None) -> AutoTopUp:
    """Turn auto top-up off."""
    return await call_json(request, "SELECT api.auto_topup(%s::text, %s::uuid, false, %s::uuid)", [*caller.params, account_id])


async def open_portal(request: Request, principal: list) -> str:
    """A Stripe customer portal session for the principal's account (JSON endpoint and dashboard)."""
    client = client_of(request)
    (customer,) = await call(request, "SELECT api.stripe_customer(%s::text, %s::uuid, %s::uuid)", principal)
    session = await client.v1.billing_portal.sessions.create_async(params={
        "customer": customer, "return_url": request.app.state.settings.public_url.rstrip("/") + "/billing"})
    return session.url


@post("/v1/billing/portal", status_code=201, dependencies=AUTH, security=SECURITY, cache_control=NO_STORE_CACHE,
      summary="Open the Stripe customer portal", responses=problems(400, 401, 403, 404, 502, 503))
async def portal(request: Request, caller: Caller, account_id: AccountParam = None) -> PortalSession:
    """A Stripe customer portal session (update card, cancel, switch plan): ``{url}``. 404 before
    the account has a Stripe customer."""
    return PortalSession(url=await open_portal(request, [*caller.params, account_id]))


@get("/v1/billing/subscription", dependencies=AUTH, security=SECURITY, summary="The account's subscription",
     responses=problems(400, 401, 403, 503))
async def subscription(request: Request, caller: Caller, account_id: AccountParam = None) -> BillingAccount:
    """The account's plan, payment grace and subscription (status, plan, period, cancel at period end)."""
    return await call_json(request, "SELECT api.billing_account(%s::text, %s::uuid, %s::uuid)", [*caller.params, account_id])


async def change_plan(request: Request, principal: list, price: str, idempotency_key: str | None = None) -> SubscriptionChange:
    """Move the principal's live subscription to another plan price, with proration."""
    client = client_of(request)
    sub = await call_json(request, "SELECT api.live_subscription(%s::text, %s::uuid, %s::text, %s::uuid)",
                          [principal[0], principal[1], price, principal[2]])
    updated = await client.v1.subscriptions.update_async(
        sub["id"], params={"items": [{"id": sub["stripe_item_id"], "price": sub["stripe_price_id"]}],
                           "proration_behavior": "create_prorations", "cancel_at_period_end": False},
        options={"idempotency_key": idempotency_key or f"change-{uuid.uuid4()}"})
    return SubscriptionChange(id=updated.id, status=updated.status, price=price, applied="on webhook")


async def preview_change(request: Request, principal: list, price: str) -> dict[str, Any]:
    """What the switch costs now, as Stripe previews the prorated invoice:
    ``{amount_due (minor units), currency}``."""
    client = client_of(request)
    sub = await call_json(request, "SELECT api.live_subscription(%s::text, %s::uuid, %s::text, %s::uuid)",
                          [principal[0], principal[1], price, principal[2]])
    preview = await client.v1.invoices.create_preview_async(params={
        "subscription": sub["id"],
        "subscription_details": {"items": [{"id": sub["stripe_item_id"], "price": sub["stripe_price_id"]}],
                                 "proration_behavior": "create_prorations"}})
    return {"amount_due": preview.amount_due, "currency": preview.currency}


@post("/v1/billing/subscription/change", status_code=202, dependencies=AUTH, security=SECURITY,
      summary="Switch plan, with proration", responses=problems(400, 401, 403, 404, 415, 422, 502, 503))
async def change_subscription(request: Request, caller: Caller, data: JSONBody[ChangeRequest],
                              idempotency_key: IdempotencyKey = None, account_id: AccountParam = None) -> SubscriptionChange:
    """Move the live subscription to another plan price with proration (upgrade or downgrade).
    202: Stripe accepted it; the plan changes when its customer.subscription.updated arrives."""
    return await change_plan(request, [*caller.params, account_id], data.price, idempotency_key)


async def cancel_at_period_end(request: Request, principal: list, cancel: bool) -> SubscriptionCancel:
    """Set (or undo) cancel at period end on the principal's live subscription in Stripe; the
    state here follows when its customer.subscription.updated arrives."""
    client = client_of(request)
    sub = await call_json(request, "SELECT api.live_subscription(%s::text, %s::uuid, NULL, %s::uuid)", principal)
    updated = await client.v1.subscriptions.update_async(
        sub["id"], params={"cancel_at_period_end": cancel},
        options={"idempotency_key": f"{'cancel' if cancel else 'resume'}-{uuid.uuid4()}"})
    return SubscriptionCancel(id=updated.id, status=updated.status, cancel_at_period_end=cancel,
                              current_period_end=sub["current_period_end"])


@delete("/v1/billing/subscription", status_code=202, dependencies=AUTH, security=SECURITY,
        summary="Cancel at period end", responses=problems(400, 401, 403, 404, 502, 503))
async def cancel_subscription(request: Request, caller: Caller, account_id: AccountParam = None) -> SubscriptionCancel:
    """Cancel the live subscription at the end of its period: the plan stays until then, then the
    account falls back to free (when customer.subscription.deleted arrives). 404 no live subscription."""
    return await cancel_at_period_end(request, [*caller.params, account_id], True)


@post("/v1/billing/subscription/resume", status_code=202, dependencies=AUTH, security=SECURITY,
      summary="Undo cancel at period end", responses=problems(400, 401, 403, 404, 502, 503))
async def resume_subscription(request: Request, caller: Caller, account_id: AccountParam = None) -> SubscriptionCancel:
    """Keep the live subscription after all: undo a cancel at period end. 404 no live subscription."""
    return await cancel_at_period_end(request, [*caller.params, account_id], False)


class Invoice(msgspec.Struct):
    id: str
    object: str
    number: str | None
    status: str
    """paid, or open (its payment failed and Stripe is retrying)."""
    amount_paid: int
    """Minor currency units (cents), as every amount here."""
    tax: int
    refunded: int
    currency: str
    plan: str | None
    period_start: str | None
    period_end: str | None
    created_at: str
    paid_at: str | None
    hosted_invoice_url: str | None
    invoice_pdf: str | None


class InvoiceList(msgspec.Struct):
    data: list[Invoice]


@get("/v1/billing/invoices", dependencies=AUTH, security=SECURITY, summary="Your invoices",
     responses=problems(400, 401, 403, 422, 503))
async def invoices(request: Request, caller: Caller,
                   limit: Annotated[int, QueryParameter(ge=1, le=100)] = 24,
                   account_id: AccountParam = None) -> Response[InvoiceList]:
    """The caller's subscription invoices, newest first, as Stripe reported them (``api.invoices``):
    number, status, amounts in minor units (paid, tax, refunded), plan, period and Stripe's
    hosted page and PDF."""
    (body,) = await call(request, "SELECT api.invoices(%s::text, %s::uuid, %s::integer, %s::uuid)::text",
                         [*caller.params, limit, account_id])
    return json_response(body)


@post("/v1/webhooks/stripe", status_code=200, summary="Stripe webhook events", responses=problems(400, 502, 503))
async def stripe_webhook(request: Request,
                         stripe_signature: Annotated[str | None, HeaderParameter(name="Stripe-Signature",
                                                                                 required=False)] = None) -> WebhookResult:
    """Verify the ``Stripe-Signature`` (HMAC-SHA256 of ``t.body`` with ``STRIPE_WEBHOOK_SECRET``;
    timestamps more than 300 s old or ahead refused) on the raw body, then hand the whole event to
    ``api.stripe_webhook``. 200 for applied, duplicate, stale and unhandled events; 400 bad
    signature, or a signed event that is malformed (recorded as rejected with the reason, nothing
    applied); 500/503 when applying fails, so Stripe retries. Concurrent deliveries, duplicates
    included, are answered 2xx (the database applies one customer's events one at a time). Two
    events about one subscription in the same second, and an invoice of a subscription not known
    yet, are settled by re-reading the subscription from Stripe (502 when Stripe cannot be
    reached, so Stripe retries)."""
    secret = request.app.state.settings.stripe_webhook_secret
    if not secret:
        raise PgtallyError({"sqlstate": "TL503", "message": "webhooks are not configured: set STRIPE_WEBHOOK_SECRET"})
    body = await request.body()
    try:
        # Verifies without parsing (construct_event would json.loads a 5,000-deep body).
        stripe.WebhookSignature.verify_header(body, stripe_signature or "", secret, tolerance=SIGNATURE_TOLERANCE)
        signed_at = int(dict(p.split("=", 1) for p in stripe_signature.split(",") if "=" in p)["t"])
    except (stripe.SignatureVerificationError, ValueError, KeyError, AttributeError) as exc:
        # ValueError includes a body that is not UTF-8: Stripe signs (and sends) UTF-8 text only.
        raise HTTPException(status_code=400, detail=f"the Stripe-Signature header does not verify: {exc}") from None
    if signed_at > time.time() + SIGNATURE_TOLERANCE:
        raise HTTPException(status_code=400, detail="the Stripe-Signature timestamp is in the future")
    event: Any = None
    try:
        event = decode_json(body)
        reason = f"text cannot contain the NUL character (U+0000): {where}" if (where := nul_path(event)) else None
    except HTTPException as exc:
        reason = exc.detail
    text = body.decode() if not reason else ""
    if not reason:
        try:
            (result,) = await call(request, "SELECT api.stripe_webhook(%s::text::jsonb)", [text])
        except psycopg.DataError as exc:    # text PostgreSQL's jsonb refuses (a lone surrogate escape)
            reason = f"the body is not JSON PostgreSQL can store: {exc.diag.message_primary}"
    if reason:
        (result,) = await call(request, "SELECT api.stripe_webhook_rejected(%s::text, %s::text)",
                               [hashlib.sha256(body).hexdigest(), reason])
    else:
        if result["status"] == "refetch":
            current = await current_subscription(request, result["subscription"], event)
            (result,) = await call(request, "SELECT api.stripe_webhook(%s::text::jsonb, %s::jsonb)",
                                   [text, Jsonb(current)])
    event_type = event.get("type") if not reason and isinstance(event, dict) else None
    WEBHOOKS.labels(str(event_type or "malformed")[:100], "duplicate" if result.get("duplicate") else result["status"]).inc()
    if result["status"] == "rejected":
        raise HTTPException(status_code=400, detail=f"the event is malformed and was recorded as rejected: "
                                                    f"{result['reason']}", extra={"event_id": result["event_id"]})
    return result


async def current_subscription(request: Request, subscription_id: str, event: dict[str, Any]) -> dict[str, Any]:
    """The subscription as Stripe has it now (how Stripe recommends settling events whose order is
    unknown), as JSON (``for_json``: prices' ``unit_amount_decimal`` is a ``Decimal`` in the SDK);
    the event's own copy when no Stripe API key is configured (503 for an invoice event: its
    subscription's own events must arrive first)."""
    client = request.app.state.stripe
    if client is None:
        if event["data"]["object"].get("object") != "subscription":
            raise PgtallyError({"sqlstate": "TL503", "message": f"subscription {subscription_id} is not known yet"})
        return event["data"]["object"]
    return (await client.v1.subscriptions.retrieve_async(subscription_id)).to_dict(for_json=True)


ROUTES = [plans, invoices, checkout, topup, set_auto_topup, get_auto_topup, delete_auto_topup, portal, subscription,
          change_subscription, cancel_subscription, resume_subscription, stripe_webhook]
