"""HTTP fixtures: the app on this test's database, and a real SMTP server catching email."""

from __future__ import annotations

import re
import socket
from email import message_from_bytes, policy
from email.message import Message

import psycopg
import pytest
from aiosmtpd.controller import Controller
from litestar.testing import AsyncTestClient

from api import db
from api.app import Settings, create_app
from api.worker import deliver_due

PUBLIC_URL = "https://app.example.com"


@pytest.fixture
def settings(smtp) -> Settings:
    return Settings(public_url=PUBLIC_URL, pool_max_size=16, smtp_url=f"smtp://127.0.0.1:{smtp.port}")


@pytest.fixture
def frozen_db_clock(owner, db_url):
    """Stop the database clock (util.now) for every new connection of this test's database, so
    the attempts a test makes stay inside the rate limits' sliding windows however long the test
    runs, and the answers (retry_after) do not depend on the time. Use it before ``client``."""
    dbname = owner.info.dbname
    owner.execute(f"ALTER DATABASE \"{dbname}\" SET pgtally.now = '2026-06-15 12:02:30+00'")


@pytest.fixture
async def client(db_url, settings):
    async with AsyncTestClient(app=create_app(db_url, settings)) as c:
        yield c


class Inbox:
    """Messages an aiosmtpd server received."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's hook name
        self.messages.append(message_from_bytes(envelope.content, policy=policy.default))
        return "250 OK"

    def to(self, address: str) -> list[Message]:
        return [m for m in self.messages if m["To"] == address]

    def token(self, address: str, subject_part: str) -> str:
        """The token of the last link emailed to address with that subject."""
        (message, *_) = [m for m in reversed(self.to(address)) if subject_part in m["Subject"]]
        return re.search(r"token=([A-Za-z0-9_-]+)", message.get_content()).group(1)


@pytest.fixture
def smtp():
    inbox = Inbox()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        inbox.port = probe.getsockname()[1]
    controller = Controller(inbox, hostname="127.0.0.1", port=inbox.port)
    controller.start()
    yield inbox
    controller.stop()


@pytest.fixture
def deliver(db_url, settings):
    """Run the outbox worker once over real SMTP: deliver() -> messages claimed."""

    async def run() -> int:
        async with await psycopg.AsyncConnection.connect(db.api_conninfo(db_url), autocommit=True) as conn:
            return await deliver_due(conn, settings, limit=100)

    return run


def bearer(token: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **headers}
