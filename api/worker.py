"""``pgtally worker``: deliver the outbox.

Messages are rows written by the transaction that caused them (sign-up, password reset, a charge
that queues an auto top-up or reports post-paid usage to Stripe). The
worker claims due rows with a lease (``api.outbox_claim``: FOR UPDATE SKIP LOCKED, so several
workers never send the same row), renders and sends each one over SMTP (``PGTALLY_SMTP_URL``,
for example ``smtp://127.0.0.1:1025``; ``smtps://`` for implicit TLS, ``?starttls=1`` to upgrade)
and records the outcome: ``api.outbox_delivered`` or ``api.outbox_failed``, which schedules the
retry with exponential backoff. With no SMTP configured each message is written to the log.
"""

from __future__ import annotations

import asyncio
import logging
from decimal import Decimal
from email.message import EmailMessage
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import aiosmtplib
import psycopg
import stripe

from api import db
from api.settings import Settings

log = logging.getLogger("pgtally.worker")

TEMPLATES: dict[str, tuple[str, str]] = {
    "verify_email": (
        "Confirm your email address",
        "Welcome!\n\nConfirm your email address by opening this link:\n\n"
        "{public_url}/verify-email?token={token}\n\n"
        "It works once, within {valid_for}. If you did not sign up, you can ignore this email.\n"),
    "account_exists": (
        "You already have an account",
        "Someone, hopefully you, tried to sign up with {email}, which already has an account.\n\n"
        "Log in at {public_url}/login, or choose a new password at {public_url}/reset-password.\n"),
    "usage_warning": (
        "Your {meter} usage",
        "{message}\n\nIt resets at {resets_at}. To keep going without limits, see your plan at "
        "{public_url}/upgrade.\n"),
    "auto_topup_disabled": (
        "Auto top-up is off",
        "We could not charge your saved card for an automatic top-up ({error}), {failures} times in a row, so "
        "automatic top-ups are now off. Update your card and turn them on again at {public_url}/dashboard.\n"),
    "payment_failed": (
        "Your payment did not go through",
        "We could not collect {amount} for your subscription. Your plan stays as it is until {grace_until}; "
        "update your card before then at {public_url}/billing/portal (Stripe's secure page).\n"),
    "receipt": (
        "Receipt: {bundle}",
        "Thank you. We received {amount} on {paid_at} for {bundle}: {credits} credits are in your account.\n\n"
        "Payment reference: {payment}. Your balance and usage: {public_url}/dashboard\n"),
    "subscription_ending": (
        "Your {plan} plan ends on {ends_at}",
        "As you asked, your {plan} plan will not renew: it ends on {ends_at}, and then your account moves to the "
        "free plan. Changed your mind? Keep your plan at {public_url}/dashboard.\n"),
    "subscription_duplicate": (
        "You were subscribed twice: we canceled the second subscription",
        "Two checkouts for your {plan} plan were paid at about the same time, which would have billed you twice. "
        "We kept your first subscription, canceled the second one ({subscription}) at once and refunded everything it "
        "charged; the refund reaches your card in 5-10 days. Nothing else changes: {public_url}/dashboard\n"),
    "subscription_canceled": (
        "Your {plan} plan has ended",
        "Your {plan} plan has ended and your account is on the free plan. You can subscribe again at any time at "
        "{public_url}/upgrade.\n"),
    "alert": (
        "[pgtally alert] {condition}",
        "pgtally noticed {condition}:\n\n{detail}\n\nThis alert is sent at most once an hour per condition. "
        "The views in reporting.* and pgtally reconcile tell more.\n"),
    "invitation": (
        "{inviter} invited you to {team} on pgtally",
        "{inviter} invited you to join the team {team} as {role}.\n\n"
        "Accept by opening this link, signed in with {email} (sign up first if you have no account):\n\n"
        "{public_url}/invitations/accept?token={token}\n\nIt works once, within {valid_for}.\n"),
    "sso_link": (
        "Sign in with {team}'s single sign-on",
        "Someone, hopefully you, signed in through the single sign-on of {team} with {email}, which already has "
        "an account. To let that sign-in open your account from now on (and join {team}), open this link:\n\n"
        "{public_url}/auth/sso/confirm?token={token}\n\n"
        "It works once, within {valid_for}. If it was not you, ignore this email: nothing changes.\n"),
    "password_reset": (
        "Reset your password",
        "Open this link to choose a new password:\n\n"
        "{public_url}/reset-password?token={token}\n\n"
        "It works once, within {valid_for}. If you did not ask for it, you can ignore this email.\n"),
}


def render(kind: str, recipient: str, payload: dict[str, Any], settings: Settings) -> EmailMessage:
    """The email for an outbox row; links start with ``PGTALLY_PUBLIC_URL``."""
    subject, body = TEMPLATES[kind]
    # valid_for: how long a link works (identity.link_lifetime); a message queued before it was
    # in the payload says less.
    values = {"valid_for": "a limited time", **payload, "public_url": settings.public_url.rstrip("/")}
    message = EmailMessage()
    message["From"] = settings.mail_from
    message["To"] = recipient
    # A header is one line (RFC 5322 section 2.2): a line break in a team's name is a space.
    message["Subject"] = " ".join(subject.format(**values).split())
    message.set_content(body.format(**values))
    return message


async def send(message: EmailMessage, settings: Settings) -> None:
    """Hand a message to the SMTP server, or write it to the log when none is configured."""
    if not settings.smtp_url:
        log.info("email (no PGTALLY_SMTP_URL set)\nTo: %s\nSubject: %s\n\n%s",
                 message["To"], message["Subject"], message.get_content())
        return
    url = urlsplit(settings.smtp_url)
    query = parse_qs(url.query)
    await aiosmtplib.send(
        message, hostname=url.hostname or "localhost", port=url.port,
        username=unquote(url.username) if url.username else None,
        password=unquote(url.password) if url.password else None,
        use_tls=url.scheme == "smtps", start_tls=True if query.get("starttls") == ["1"] else None,
        timeout=30)


class CannotActError(Exception):
    """This worker cannot do the task (no ``STRIPE_API_KEY``): it stays queued, with the reason."""


async def pay_auto_topup(conn: psycopg.AsyncConnection, message_id, payload: dict[str, Any], settings: Settings) -> None:
    """An auto top-up task: pay the bundle off-session with the saved card. The idempotency key is
    ``auto-topup-`` and the task's id, so a worker that dies after Stripe's answer and runs the task
    again pays once. Credits arrive with payment_intent.succeeded; a declined card is counted as a
    failure (three turn auto top-up off), anything else is retried later with the outbox's backoff.
    Without ``STRIPE_API_KEY`` the task is left queued (:class:`CannotActError`); a task that is no longer
    the one in flight (auto top-up turned off, or off and on) pays nothing."""
    from api.billing import stripe_client

    client = stripe_client(settings)
    if client is None:
        raise CannotActError("STRIPE_API_KEY is not set in this worker: the auto top-up waits for a worker that has it")
    (target,) = await (await conn.execute("SELECT api.auto_topup_payment(%s::uuid, %s::uuid)",
                                          [payload["account_id"], message_id])).fetchone()
    if target is None:
        return                                   # turned off meanwhile, or this task was superseded
    cards = (await client.v1.payment_methods.list_async(
        params={"customer": target["stripe_customer_id"], "type": "card"})).data
    if not cards:
        await conn.execute("SELECT api.auto_topup_failed(%s::uuid, %s::text)", [payload["account_id"], "no saved card"])
        return
    try:
        intent = await client.v1.payment_intents.create_async(params={
            "amount": target["amount"], "currency": target["currency"], "customer": target["stripe_customer_id"],
            "payment_method": cards[0].id, "payment_method_types": ["card"], "off_session": True, "confirm": True,
            "metadata": {"account_id": payload["account_id"], "price": target["price"], "auto_topup": "true",
                         "auto_topup_task": str(message_id)}},
            options={"idempotency_key": target["stripe_idempotency_key"]})
    except stripe.CardError as exc:
        await conn.execute("SELECT api.auto_topup_failed(%s::uuid, %s::text)",
                           [payload["account_id"], f"{exc.code or 'card_error'}: {exc.user_message or exc}"])
        return
    await conn.execute("SELECT api.auto_topup_started(%s::uuid, %s::uuid, %s::text)",
                       [payload["account_id"], message_id, intent.id])


async def cancel_duplicate_subscription(conn: psycopg.AsyncConnection, payload: dict[str, Any],
                                        settings: Settings) -> None:
    """A second live subscription of one account (two Checkouts paid at once): cancel it at Stripe
    now and refund what its invoices charged, with idempotency keys made of Stripe's own ids
    (``cancel-duplicate-<subscription>``, ``refund-duplicate-<invoice payment>``). Until its paid
    invoices are known (invoice.paid may come later) the task raises and is retried."""
    from api.billing import stripe_client

    client = stripe_client(settings)
    if client is None:
        raise CannotActError("STRIPE_API_KEY is not set in this worker: the duplicate subscription waits for one that has it")
    sub = payload["subscription"]
    (dup,) = await (await conn.execute("SELECT api.duplicate_subscription(%s::text)", [sub])).fetchone()
    if dup is None:
        return
    try:
        await client.v1.subscriptions.cancel_async(sub, options={"idempotency_key": f"cancel-duplicate-{sub}"})
    except stripe.InvalidRequestError as exc:
        if exc.code != "resource_missing" and "canceled" not in str(exc.user_message or exc):
            raise
    if dup["waiting"]:
        raise RuntimeError(f"duplicate subscription {sub} canceled; its paid invoice is not recorded yet, to refund")
    refunded = 0
    for payment in dup["payments"]:
        target = {"payment_intent": payment["payment_intent"]} if payment["payment_intent"] else {"charge": payment["charge"]}
        await client.v1.refunds.create_async(
            params={**target, "amount": payment["refund"], "reason": "duplicate",
                    "metadata": {"account_id": dup["account_id"], "duplicate_subscription": sub}},
            options={"idempotency_key": f"refund-duplicate-{payment['invoice_payment']}"})
        refunded += payment["refund"]
    await conn.execute("SELECT api.duplicate_subscription_settled(%s::text, %s::bigint)", [sub, refunded])


async def invoice_topup(conn: psycopg.AsyncConnection, payload: dict[str, Any], settings: Settings) -> None:
    """The invoice of a top-up paid off-session (one-click or auto): an invoice of the bundle's
    price for the customer, finalized, with the top-up's PaymentIntent attached, so Stripe marks it
    paid (invoice.paid records it in billing.payment_invoices). Each call's idempotency key is made
    of the PaymentIntent's id (``topup-invoice-<pi>``, ``-item``, ``-finalize``, ``-attach``)."""
    from api.billing import stripe_client

    client = stripe_client(settings)
    if client is None:
        raise CannotActError("STRIPE_API_KEY is not set in this worker: the top-up's invoice waits for one that has it")
    key = f"topup-invoice-{payload['payment_intent']}"
    metadata = {"account_id": payload["account_id"], "price": payload["price"], "payment_intent": payload["payment_intent"]}
    invoice = await client.v1.invoices.create_async(params={
        "customer": payload["stripe_customer_id"], "auto_advance": False, "collection_method": "charge_automatically",
        "pending_invoice_items_behavior": "exclude", "metadata": metadata}, options={"idempotency_key": key})
    await client.v1.invoice_items.create_async(params={
        "customer": payload["stripe_customer_id"], "invoice": invoice.id, "pricing": {"price": payload["stripe_price_id"]},
        "metadata": metadata}, options={"idempotency_key": f"{key}-item"})
    if invoice.status == "draft":
        await client.v1.invoices.finalize_invoice_async(invoice.id, params={"auto_advance": False},
                                                        options={"idempotency_key": f"{key}-finalize"})
    await client.v1.invoices.attach_payment_async(invoice.id, params={"payment_intent": payload["payment_intent"]},
                                                  options={"idempotency_key": f"{key}-attach"})


async def report_meter_event(conn: psycopg.AsyncConnection, message_id, payload: dict[str, Any],
                             settings: Settings) -> None:
    """A post-paid usage event, reported to Stripe's Billing Meter
    (https://docs.stripe.com/api/billing/meter-event/create) with ``identifier`` = the usage event's
    id (the outbox message's id): a report sent again after a crash is counted once, Stripe refusing
    an identifier it already holds (400, "An event already exists with identifier ..."), which is
    proof of delivery. No idempotency key of ours: Stripe keeps a key's first answer, a 500
    included, for 24 hours, and the identifier already deduplicates. Any other failure raises and
    is retried with the outbox's backoff (8 attempts, then ``reporting.meter_event_reports_daily``
    counts it failed)."""
    from api.billing import stripe_client

    client = stripe_client(settings)
    if client is None:
        raise CannotActError("STRIPE_API_KEY is not set in this worker: post-paid usage waits for a worker that has it")
    (customer,) = await (await conn.execute("SELECT api.stripe_customer_of(%s::uuid)", [payload["account_id"]])).fetchone()
    if customer is None:
        raise RuntimeError(f"account {payload['account_id']} has no Stripe customer")
    try:
        await client.v1.billing.meter_events.create_async(params={
            "event_name": payload["event_name"], "identifier": str(message_id), "timestamp": payload["timestamp"],
            "payload": {"stripe_customer_id": customer, "value": str(payload["value"])}})
    except stripe.InvalidRequestError as exc:
        if "already exists" not in str(exc.user_message or exc):
            raise


async def compare_meter_totals(conn: psycopg.AsyncConnection, settings: Settings, limit: int = 100) -> int:
    """Once per account, meter and UTC day with post-paid usage reported (the day after it ends):
    read Stripe's meter event summary for that day (``GET /v1/billing/meters/:id/event_summaries``)
    and record it (``api.record_meter_summary``); ``reporting.meter_total_mismatches`` lists any
    difference with what pgtally reported. Returns how many days were compared."""
    from api.billing import stripe_client

    client = stripe_client(settings)
    if client is None:
        return 0
    (due,) = await (await conn.execute("SELECT api.meter_summaries_due(%s)", [limit])).fetchone()
    if not due:
        return 0
    meters = {meter.event_name: meter.id async for meter in
              (await client.v1.billing.meters.list_async(params={"limit": 100})).auto_paging_iter()}
    compared = 0
    for day in due:
        meter = meters.get(day["event_name"])
        if meter is None:
            log.warning("Stripe has no meter with event_name %s: its totals cannot be compared", day["event_name"])
            continue
        summaries = await client.v1.billing.meters.event_summaries.list_async(meter, params={
            "customer": day["stripe_customer_id"], "start_time": day["start_time"], "end_time": day["end_time"],
            "limit": 100})
        total = sum([Decimal(str(s.aggregated_value)) async for s in summaries.auto_paging_iter()], Decimal(0))
        await conn.execute("SELECT api.record_meter_summary(%s::uuid, %s::text, %s::date, %s::numeric)",
                           [day["account_id"], day["event_name"], day["day"], total])
        compared += 1
    return compared


async def deliver_due(conn: psycopg.AsyncConnection, settings: Settings, limit: int = 10) -> int:
    """Claim, send and settle up to ``limit`` due messages (emails, auto top-ups, meter events);
    returns how many were claimed."""
    rows = await (await conn.execute(
        "SELECT id, kind, recipient, payload FROM api.outbox_claim(%s)", [limit])).fetchall()
    for message_id, kind, recipient, payload in rows:
        try:
            if kind == "auto_topup":
                await pay_auto_topup(conn, message_id, payload, settings)
            elif kind == "meter_event":
                await report_meter_event(conn, message_id, payload, settings)
            elif kind == "cancel_duplicate_subscription":
                await cancel_duplicate_subscription(conn, payload, settings)
            elif kind == "invoice_topup":
                await invoice_topup(conn, payload, settings)
            else:
                await send(render(kind, recipient, payload, settings), settings)
        except CannotActError as exc:
            log.warning("%s task %s left queued: %s", kind, message_id, exc)
            await conn.execute("SELECT api.outbox_postpone(%s, %s)", [message_id, str(exc)])
            continue
        except Exception as exc:  # noqa: BLE001 - any failure is recorded and retried later
            log.warning("sending %s to %s failed: %s", kind, recipient, exc)
            await conn.execute("SELECT api.outbox_failed(%s, %s)", [message_id, repr(exc)])
        else:
            await conn.execute("SELECT api.outbox_delivered(%s)", [message_id])
    return len(rows)


HOUSEKEEPING_SECONDS = 300


async def housekeeping(conn: psycopg.AsyncConnection, settings: Settings) -> None:
    """The periodic chores: ``api.housekeeping`` (old rate-limit buckets, expired holds, due
    credit lots), auto top-ups stuck in flight (``api.release_stuck_auto_topups``), yesterday's
    meter totals against Stripe's (:func:`compare_meter_totals`), next months' partitions and
    forgetting idempotency keys past their window (``api.maintain_storage``), the analytics rollup
    until it is caught up (``api.rollup_usage``), and the operator alerts (``api.check_alerts``,
    with ``PGTALLY_ALERT_EMAIL``)."""
    await conn.execute("SELECT api.housekeeping()")
    await conn.execute("SELECT api.release_stuck_auto_topups()")
    try:
        await compare_meter_totals(conn, settings)
    except stripe.StripeError as exc:          # tried again at the next housekeeping
        log.warning("comparing meter totals with Stripe failed: %s", exc)
    # Its own transaction: making a partition locks the tables, and must not wait holding accounts.
    await conn.execute("SELECT api.maintain_storage()")
    while (await (await conn.execute("SELECT api.rollup_usage(50000)")).fetchone())[0] == 50000:
        pass
    if settings.alert_email:
        await conn.execute("SELECT api.check_alerts(%s)", [settings.alert_email])


async def run(database_url: str, settings: Settings, once: bool = False, poll_seconds: float = 1.0) -> None:
    """Deliver until stopped (or until nothing is due, with ``once``); at the start and every five
    minutes also run :func:`housekeeping`."""
    async with await psycopg.AsyncConnection.connect(db.api_conninfo(database_url), autocommit=True) as conn:
        last_housekeeping = 0.0
        while True:
            if asyncio.get_running_loop().time() - last_housekeeping > HOUSEKEEPING_SECONDS:
                await housekeeping(conn, settings)
                last_housekeeping = asyncio.get_running_loop().time()
            claimed = await deliver_due(conn, settings)
            if once and not claimed:
                return
            if not claimed:
                await asyncio.sleep(poll_seconds)
