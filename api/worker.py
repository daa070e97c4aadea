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
        "It works once, within 24 hours. If you did not sign up, you can ignore this email.\n"),
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
        "{public_url}/invitations/accept?token={token}\n\nIt works once, within 7 days.\n"),
    "sso_link": (
        "Sign in with {team}'s single sign-on",
        "Someone, hopefully you, signed in through the single sign-on of {team} with {email}, which already has "
        "an account. To let that sign-in open your account from now on (and join {team}), open this link:\n\n"
        "{public_url}/auth/sso/confirm?token={token}\n\n"
        "It works once, within an hour. If it was not you, ignore this email: nothing changes.\n"),
    "password_reset": (
        "Reset your password",
        "Open this link to choose a new password:\n\n"
        "{public_url}/reset-password?token={token}\n\n"
        "It works once, within an hour. If you did not ask for it, you can ignore this email.\n"),
}


def render(kind: str, recipient: str, payload: dict[str, Any], settings: Settings) -> EmailMessage:
    """The email for an outbox row; links start with ``PGTALLY_PUBLIC_URL``."""
    subject, body = TEMPLATES[kind]
    values = {**payload, "public_url": settings.public_url.rstrip("/")}
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


async def pay_auto_topup(conn: psycopg.AsyncConnection, message_id, payload: dict[str, Any], settings: Settings) -> None:
    """An auto top-up task: pay the bundle off-session with the saved card. The idempotency key is
    the task's id, so a worker that dies after Stripe's answer and runs the task again pays once.
    Credits arrive with payment_intent.succeeded; a declined card is counted as a failure (three
    turn auto top-up off), anything else is retried later with the outbox's backoff."""
    from api.billing import stripe_client

    client = stripe_client(settings)
    (target,) = await (await conn.execute("SELECT api.auto_topup_payment(%s::uuid)", [payload["account_id"]])).fetchone()
    if client is None or target is None:
        return                                   # billing off, or auto top-up turned off meanwhile
    cards = (await client.v1.payment_methods.list_async(
        params={"customer": target["stripe_customer_id"], "type": "card"})).data
    if not cards:
        await conn.execute("SELECT api.auto_topup_failed(%s::uuid, %s::text)", [payload["account_id"], "no saved card"])
        return
    try:
        await client.v1.payment_intents.create_async(params={
            "amount": target["amount"], "currency": target["currency"], "customer": target["stripe_customer_id"],
            "payment_method": cards[0].id, "off_session": True, "confirm": True,
            "metadata": {"account_id": payload["account_id"], "price": target["price"], "auto_topup": "true"}},
            options={"idempotency_key": f"auto-topup-{message_id}"})
    except stripe.CardError as exc:
        await conn.execute("SELECT api.auto_topup_failed(%s::uuid, %s::text)",
                           [payload["account_id"], f"{exc.code or 'card_error'}: {exc.user_message or exc}"])


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
        raise RuntimeError("STRIPE_API_KEY is not set: post-paid usage cannot be reported")
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
            else:
                await send(render(kind, recipient, payload, settings), settings)
        except Exception as exc:  # noqa: BLE001 - any failure is recorded and retried later
            log.warning("sending %s to %s failed: %s", kind, recipient, exc)
            await conn.execute("SELECT api.outbox_failed(%s, %s)", [message_id, repr(exc)])
        else:
            await conn.execute("SELECT api.outbox_delivered(%s)", [message_id])
    return len(rows)


HOUSEKEEPING_SECONDS = 300


async def housekeeping(conn: psycopg.AsyncConnection, settings: Settings) -> None:
    """The periodic chores: ``api.housekeeping`` (old rate-limit buckets, expired holds, due
    credit lots), next months' partitions and forgetting idempotency keys past their window
    (``api.maintain_storage``), the analytics rollup until it is caught up (``api.rollup_usage``), and the
    operator alerts (``api.check_alerts``, with ``PGTALLY_ALERT_EMAIL``)."""
    await conn.execute("SELECT api.housekeeping()")
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
