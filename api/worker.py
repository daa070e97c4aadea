"""``pgtally worker``: deliver the outbox.

Messages are rows written by the transaction that caused them (sign-up, password reset). The
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

from api import db
from api.app import Settings

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
        "{message}\n\nThe allowance resets at {resets_at}. To keep going without limits, see your plan at "
        "{public_url}/upgrade.\n"),
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
    message["Subject"] = subject.format(**values)
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


async def deliver_due(conn: psycopg.AsyncConnection, settings: Settings, limit: int = 10) -> int:
    """Claim, send and settle up to ``limit`` due messages; returns how many were claimed."""
    rows = await (await conn.execute(
        "SELECT id, kind, recipient, payload FROM api.outbox_claim(%s)", [limit])).fetchall()
    for message_id, kind, recipient, payload in rows:
        try:
            await send(render(kind, recipient, payload, settings), settings)
        except Exception as exc:  # noqa: BLE001 - any failure is recorded and retried later
            log.warning("sending %s to %s failed: %s", kind, recipient, exc)
            await conn.execute("SELECT api.outbox_failed(%s, %s)", [message_id, repr(exc)])
        else:
            await conn.execute("SELECT api.outbox_delivered(%s)", [message_id])
    return len(rows)


HOUSEKEEPING_SECONDS = 300


async def run(database_url: str, settings: Settings, once: bool = False, poll_seconds: float = 1.0) -> None:
    """Deliver until stopped (or until nothing is due, with ``once``); every five minutes also run
    ``api.housekeeping`` (old rate-limit windows)."""
    async with await psycopg.AsyncConnection.connect(db.api_conninfo(database_url), autocommit=True) as conn:
        last_housekeeping = 0.0
        while True:
            if asyncio.get_running_loop().time() - last_housekeeping > HOUSEKEEPING_SECONDS:
                await conn.execute("SELECT api.housekeeping()")
                last_housekeeping = asyncio.get_running_loop().time()
            claimed = await deliver_due(conn, settings)
            if once and not claimed:
                return
            if not claimed:
                await asyncio.sleep(poll_seconds)
