"""A local stand-in for the part of Stripe's API pgtally calls, spoken over real HTTP to the real
``stripe`` SDK (form-encoded requests, JSON objects back, idempotency keys honoured), and a signer
for webhook events the way Stripe signs them (HMAC-SHA256 of ``"{t}.{payload}"``)."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl


def nested(form: list[tuple[str, str]]) -> dict[str, Any]:
    """Stripe's bracket form encoding (``line_items[0][price]=...``) as nested dicts and lists."""
    root: dict[str, Any] = {}
    for key, value in form:
        parts = re.findall(r"[^\[\]]+", key)
        node: Any = root
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return _lists(root)


def _lists(node: Any) -> Any:
    if isinstance(node, dict):
        if node and all(k.isdigit() for k in node):
            return [_lists(node[k]) for k in sorted(node, key=int)]
        return {k: _lists(v) for k, v in node.items()}
    return node


class StripeStandIn:
    """Customers, Checkout Sessions, billing portal sessions and subscriptions, in memory."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, Any], str | None]] = []
        self.subscriptions: dict[str, dict[str, Any]] = {}
        self.idempotent: dict[str, tuple[int, dict[str, Any]]] = {}
        self.ids = itertools.count(1)
        self.lock = threading.Lock()
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Request-Id", f"req_{next(standin.ids)}")
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                params = nested(parse_qsl(self.rfile.read(length).decode(), keep_blank_values=True))
                key = self.headers.get("Idempotency-Key")
                auth = self.headers.get("Authorization", "")
                with standin.lock:
                    standin.requests.append((method, self.path, params, key))
                    if not auth.startswith("Bearer sk_"):
                        return self._answer(401, {"error": {"type": "invalid_request_error",
                                                            "message": "Invalid API Key provided"}})
                    if key and method == "POST" and (method, self.path, key) in standin.idempotent:
                        return self._answer(*standin.idempotent[(method, self.path, key)])
                    status, body = standin.route(method, self.path, params)
                    if key and method == "POST":
                        standin.idempotent[(method, self.path, key)] = (status, body)
                self._answer(status, body)

            def do_GET(self) -> None:  # noqa: N802
                self._handle("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._handle("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "StripeStandIn":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()

    def route(self, method: str, path: str, p: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        n = next(self.ids)
        if (method, path) == ("POST", "/v1/customers"):
            return 200, {"id": f"cus_{n}", "object": "customer", "email": p.get("email"), "metadata": p.get("metadata", {})}
        if (method, path) == ("POST", "/v1/checkout/sessions"):
            return 200, {"id": f"cs_test_{n}", "object": "checkout.session", "url": f"https://checkout.stripe.test/c/pay/cs_test_{n}",
                         "mode": p["mode"], "customer": p.get("customer"), "client_reference_id": p.get("client_reference_id"),
                         "metadata": p.get("metadata", {}), "status": "open"}
        if (method, path) == ("POST", "/v1/billing_portal/sessions"):
            return 200, {"id": f"bps_{n}", "object": "billing_portal.session", "customer": p["customer"],
                         "url": f"https://billing.stripe.test/p/session/bps_{n}"}
        match = re.fullmatch(r"/v1/subscriptions/(\w+)", path)
        if match and match.group(1) in self.subscriptions:
            sub = self.subscriptions[match.group(1)]
            if method == "POST":
                if "cancel_at_period_end" in p:
                    sub["cancel_at_period_end"] = p["cancel_at_period_end"] == "true"
                for item in p.get("items", []):
                    sub["items"]["data"][0]["price"] = {"id": item["price"], "object": "price"}
            return 200, sub
        return 404, {"error": {"type": "invalid_request_error", "message": f"No such route {method} {path}"}}


def sign(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    """A Stripe-Signature header for payload (https://docs.stripe.com/webhooks#verify-manually)."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


class Events:
    """Stripe event payloads (API version 2026-10-28) with fresh ids."""

    def __init__(self) -> None:
        self.n = itertools.count(1)

    def event(self, type_: str, obj: dict[str, Any], created: int | None = None, id_: str | None = None) -> dict[str, Any]:
        return {"id": id_ or f"evt_{next(self.n):06d}", "object": "event", "api_version": "2026-10-28.endive",
                "created": created or int(time.time()), "livemode": False, "type": type_,
                "data": {"object": obj}, "pending_webhooks": 1, "request": {"id": None, "idempotency_key": None}}

    @staticmethod
    def subscription(sub_id: str, customer: str, account_id: str | None, status: str, stripe_price: str,
                     start: int, end: int, cancel_at_period_end: bool = False) -> dict[str, Any]:
        return {"id": sub_id, "object": "subscription", "customer": customer, "status": status,
                "cancel_at_period_end": cancel_at_period_end, "canceled_at": None,
                "metadata": {"account_id": account_id} if account_id else {},
                "items": {"object": "list", "data": [{
                    "id": f"si_{sub_id}", "object": "subscription_item", "price": {"id": stripe_price, "object": "price"},
                    "current_period_start": start, "current_period_end": end}]}}


if __name__ == "__main__":
    # Try pgtally's billing offline: STRIPE_API_BASE=http://127.0.0.1:12111 STRIPE_API_KEY=sk_test_x make run
    import sys

    standin = StripeStandIn()
    standin.server.server_close()
    standin.server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1]) if len(sys.argv) > 1 else 12111),
                                         standin.server.RequestHandlerClass)
    print(f"Stripe stand-in on http://127.0.0.1:{standin.server.server_address[1]}", flush=True)
    standin.server.serve_forever()
