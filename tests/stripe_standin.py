"""A local stand-in for the part of Stripe's API pgtally calls, spoken over real HTTP to the real
``stripe`` SDK (form-encoded requests, JSON objects back, idempotency keys honoured), and a signer
for webhook events the way Stripe signs them (HMAC-SHA256 of ``"{t}.{payload}"``).

Every object it serves or sends is one of Stripe's published example objects
(``tests/stripe_fixtures.json``, trimmed from ``openapi/fixtures3.json`` of github.com/stripe/openapi)
with pgtally's ids and amounts laid over it (``Shapes``): prices carry ``unit_amount_decimal``,
invoices ``parent``, ``payments`` and ``total_taxes``, charges no ``invoice``, disputes no customer."""

from __future__ import annotations

import copy
import functools
import hashlib
import hmac
import itertools
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

FIXTURES: dict[str, dict[str, Any]] = json.loads(
    (Path(__file__).resolve().parent / "stripe_fixtures.json").read_text())["resources"]


def fixture(resource: str, **overlay: Any) -> dict[str, Any]:
    """A fresh copy of Stripe's published example ``resource`` with ``overlay``'s fields set."""
    obj = copy.deepcopy(FIXTURES[resource])
    obj.update(overlay)
    return obj


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


def catalog_prices(path: str | None = None) -> dict[str, dict[str, Any]]:
    """Stripe price id -> {amount, currency, interval, metered}, from pgtally's catalog file; a
    metered price maps each Stripe meter's event_name to its unit amount (the post-paid
    entitlements of its plan)."""
    import tomllib
    from pathlib import Path

    catalog = tomllib.loads(Path(path or Path(__file__).resolve().parent.parent / "api" / "default_catalog.toml").read_text())
    prices = {}
    for plan in catalog.get("plans", {}).values():
        meters = {e["stripe_meter"]: e["post_paid"] for e in plan.get("entitlements", {}).values() if "post_paid" in e}
        for interval, price in plan.get("prices", {}).items():
            prices[price["stripe_price"]] = {"amount": price["amount"], "currency": price.get("currency", "usd"),
                                             "interval": "month" if interval == "monthly" else "year",
                                             "metered": meters if price.get("usage_type") == "metered" else None}
    for bundle in catalog.get("bundles", {}).values():
        prices[bundle["stripe_price"]] = {"amount": bundle["amount"], "currency": bundle.get("currency", "usd"),
                                          "interval": None, "metered": None}
    return prices


@functools.cache
def default_prices() -> dict[str, dict[str, Any]]:
    return catalog_prices()


class Shapes:
    """Stripe objects as API 2026-10-28 has them: Stripe's published example of each resource
    with pgtally's ids, amounts and times laid over it."""

    @staticmethod
    def price(stripe_price: str, prices: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        known = (prices or default_prices()).get(stripe_price, {"amount": 0, "currency": "usd", "interval": "month",
                                                                 "metered": None})
        recurring = None if known["interval"] is None else {
            "interval": known["interval"], "interval_count": 1, "meter": None, "trial_period_days": None,
            "usage_type": "metered" if known["metered"] is not None else "licensed"}
        return fixture("price", id=stripe_price, currency=known["currency"], unit_amount=known["amount"],
                       unit_amount_decimal=str(known["amount"]), recurring=recurring, transform_quantity=None,
                       type="one_time" if recurring is None else "recurring", product=f"prod_{stripe_price}")

    @staticmethod
    def subscription(sub_id: str, customer: str, account_id: str | None, status: str, stripe_price: str,
                     start: int, end: int, cancel_at_period_end: bool = False,
                     prices: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        price = Shapes.price(stripe_price, prices)
        item = copy.deepcopy(FIXTURES["subscription"]["items"]["data"][0])
        item.update(id=f"si_{sub_id}", subscription=sub_id, price=price, created=start, quantity=1,
                    current_period_start=start, current_period_end=end, billing_thresholds=None,
                    plan={**item["plan"], "id": stripe_price, "amount": price["unit_amount"],
                          "amount_decimal": price["unit_amount_decimal"], "currency": price["currency"],
                          "interval": (price["recurring"] or {}).get("interval", "month"), "interval_count": 1,
                          "product": price["product"], "billing_scheme": "per_unit", "transform_usage": None,
                          "usage_type": (price["recurring"] or {}).get("usage_type", "licensed")})
        return fixture("subscription", id=sub_id, customer=customer, status=status, currency=price["currency"],
                       cancel_at_period_end=cancel_at_period_end, cancel_at=end if cancel_at_period_end else None,
                       canceled_at=None, ended_at=None, trial_start=None, trial_end=None, pause_collection=None,
                       pending_update=None, pending_invoice_item_interval=None, transfer_data=None,
                       next_pending_invoice_item_invoice=None, billing_schedules=[], billing_thresholds=None,
                       created=start, start_date=start, billing_cycle_anchor=start, billing_cycle_anchor_config=None,
                       metadata={"account_id": account_id} if account_id else {},
                       items={"object": "list", "data": [item], "has_more": False,
                              "url": f"/v1/subscription_items?subscription={sub_id}"})

    @staticmethod
    def line(invoice_id: str, sub_id: str, stripe_price: str, amount: int, start: int, end: int,
             quantity: int = 1, currency: str = "usd", n: int = 0) -> dict[str, Any]:
        return copy.deepcopy(FIXTURES["invoice"]["lines"]["data"][0]) | {
            "id": f"il_{invoice_id}_{n}", "invoice": invoice_id, "amount": amount, "subtotal": amount,
            "currency": currency, "quantity": quantity, "period": {"start": start, "end": end},
            "description": f"{quantity} × {stripe_price}",
            "parent": {"type": "subscription_item_details", "invoice_item_details": None,
                       "subscription_item_details": {"invoice_item": None, "proration": False,
                                                     "proration_details": {"credited_items": None},
                                                     "subscription": sub_id, "subscription_item": f"si_{sub_id}"}},
            "pricing": {"type": "price_details", "price_details": {"price": stripe_price, "product": f"prod_{stripe_price}"},
                        "unit_amount_decimal": str(amount // quantity if quantity else 0)}}

    @staticmethod
    def invoice_payment(invoice_id: str, payment_intent: str, amount: int, currency: str = "usd",
                        paid_at: int | None = None) -> dict[str, Any]:
        return fixture("invoice_payment", id=f"inpay_{invoice_id}", invoice=invoice_id, amount_paid=amount,
                       amount_requested=amount, currency=currency, livemode=False, created=paid_at or int(time.time()),
                       payment={"type": "payment_intent", "payment_intent": payment_intent},
                       status="paid", status_transitions={"canceled_at": None, "paid_at": paid_at or int(time.time())})

    @staticmethod
    def invoice(invoice_id: str, customer: str, sub_id: str | None, lines: list[dict[str, Any]], status: str = "paid",
                currency: str = "usd", payment_intent: str | None = None, number: str | None = None,
                created: int | None = None, billing_reason: str = "subscription_cycle",
                account_id: str | None = None) -> dict[str, Any]:
        """An invoice of a subscription (parent.subscription_details); paid: one InvoicePayment
        naming its PaymentIntent in ``payments``."""
        total = sum(line["amount"] for line in lines)
        now = created or int(time.time())
        paid = status == "paid"
        return fixture(
            "invoice", id=invoice_id, customer=customer, status=status, currency=currency, number=number,
            amount_due=total, amount_paid=total if paid else 0, amount_remaining=0 if paid else total,
            subtotal=total, subtotal_excluding_tax=total, total=total, total_excluding_tax=total, total_taxes=[],
            amount_overpaid=0, attempted=True, attempt_count=1, billing_reason=billing_reason, created=now,
            effective_at=now, period_start=lines[0]["period"]["start"] if lines else now,
            period_end=lines[0]["period"]["end"] if lines else now, due_date=None, from_invoice=None,
            last_finalization_error=None, shipping_cost=None, next_payment_attempt=None if paid else now + 86400,
            webhooks_delivered_at=now, auto_advance=not paid,
            hosted_invoice_url=f"https://invoice.stripe.test/i/{invoice_id}",
            invoice_pdf=f"https://invoice.stripe.test/i/{invoice_id}/pdf",
            status_transitions={"finalized_at": now, "marked_uncollectible_at": None,
                                "paid_at": now if paid else None, "voided_at": None},
            parent=None if sub_id is None else {
                "type": "subscription_details", "quote_details": None,
                "subscription_details": {"metadata": {"account_id": account_id} if account_id else {},
                                         "subscription": sub_id}},
            lines={"object": "list", "data": lines, "has_more": False, "url": f"/v1/invoices/{invoice_id}/lines"},
            payments={"object": "list", "has_more": False, "url": "/v1/invoice_payments",
                      "data": [Shapes.invoice_payment(invoice_id, payment_intent, total, currency, now)]
                      if paid and payment_intent else []})

    @staticmethod
    def payment_intent(pi_id: str, customer: str | None, amount: int, currency: str = "usd", status: str = "succeeded",
                       metadata: dict[str, str] | None = None, payment_method: str | None = None) -> dict[str, Any]:
        return fixture("payment_intent", id=pi_id, customer=customer, amount=amount,
                       amount_received=amount if status == "succeeded" else 0, currency=currency, status=status,
                       metadata=metadata or {}, payment_method=payment_method, latest_charge=f"ch_{pi_id}",
                       client_secret=f"{pi_id}_secret_standin", canceled_at=None, last_payment_error=None,
                       next_action=None, processing=None, transfer_data=None, created=int(time.time()))

    @staticmethod
    def charge(payment_intent: str, customer: str | None, amount: int, currency: str = "usd",
               amount_refunded: int = 0) -> dict[str, Any]:
        """A Charge of a PaymentIntent: since API 2025-03-31 it names no invoice."""
        return fixture("charge", id=f"ch_{payment_intent}", payment_intent=payment_intent, customer=customer,
                       amount=amount, amount_captured=amount, amount_refunded=amount_refunded, captured=True,
                       refunded=amount_refunded >= amount, currency=currency, transfer_data=None, created=int(time.time()),
                       description=None, balance_transaction=f"txn_{payment_intent}",
                       refunds={"object": "list", "data": [], "has_more": False,
                                "url": f"/v1/charges/ch_{payment_intent}/refunds"})

    @staticmethod
    def dispute(dispute_id: str, charge: str, payment_intent: str | None, amount: int, currency: str = "usd",
                status: str = "needs_response", reason: str = "fraudulent") -> dict[str, Any]:
        """A Dispute: it names the charge and PaymentIntent, never a customer."""
        return fixture("dispute", id=dispute_id, charge=charge, payment_intent=payment_intent, amount=amount,
                       currency=currency, status=status, reason=reason, created=int(time.time()))

    @staticmethod
    def checkout_session(session_id: str, mode: str, customer: str | None, **fields: Any) -> dict[str, Any]:
        return fixture("checkout.session", **{
            "id": session_id, "mode": mode, "customer": customer, "currency": "usd", "invoice_creation": None,
            "payment_intent": None, "shipping_address_collection": None, "shipping_cost": None,
            "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0}, "currency_conversion": None,
            "after_expiration": None, "custom_text": None, "created": int(time.time()),
            "expires_at": int(time.time()) + 86400, **fields})


class StripeStandIn:
    """Customers, Checkout Sessions (with a checkout page whose Pay button completes them and
    sends Stripe-signed events to pgtally's webhook), billing portal sessions, subscriptions,
    saved cards, PaymentIntents, refunds (charge.refunded follows), invoice previews, Billing
    Meter events and period-end invoices (``close_period``), in memory.

    With ``webhook_url`` the events are POSTed there, signed with ``webhook_secret``; without, they
    are kept in ``sent`` for a test to deliver."""

    def __init__(self, webhook_url: str | None = None, webhook_secret: str | None = None,
                 catalog: str | None = None) -> None:
        self.requests: list[tuple[str, str, dict[str, Any], str | None]] = []
        self.subscriptions: dict[str, dict[str, Any]] = {}
        self.sessions: dict[str, dict[str, Any]] = {}
        self.cards: dict[str, list[str]] = {}          # customer -> saved payment method ids
        self.needs_authentication: set[str] = set()    # customers whose bank asks for 3-D Secure
        self.sent: list[dict[str, Any]] = []
        self.meter_events: dict[str, dict[str, Any]] = {}   # identifier -> billing.meter_event
        self.meter_event_failures = 0                       # answer the next N meter events with a 500
        self.charges: dict[str, dict[str, Any]] = {}       # payment intent -> {amount, currency, refunded}
        self.webhook_url, self.webhook_secret = webhook_url, webhook_secret
        self.prices = catalog_prices(catalog)
        self.events = Events()
        self.idempotent: dict[str, tuple[str, dict[str, Any], tuple[int, dict[str, Any]]]] = {}
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
                    if key and method == "POST" and key in standin.idempotent:
                        # Stripe's keys are shared by the whole Stripe account, every endpoint.
                        seen_path, seen_params, answer = standin.idempotent[key]
                        if (seen_path, seen_params) != (self.path, params):
                            return self._answer(400, {"error": {
                                "type": "idempotency_error",
                                "message": "Keys for idempotent requests can only be used with the same parameters "
                                           "they were first used with."}})
                        return self._answer(*answer)
                    status, body = standin.route(method, self.path, params)
                    if key and method == "POST":
                        standin.idempotent[key] = (self.path, params, (status, body))
                self._answer(status, body)

            def _page(self, method: str) -> None:
                session = standin.sessions.get(self.path.split("?")[0].rsplit("/", 1)[-1])
                if session is None:
                    return self._answer(404, {"error": {"message": "No such checkout session"}})
                if method == "POST" and session["status"] == "open":
                    standin.pay(session)
                if session["status"] == "complete":
                    self.send_response(303)
                    self.send_header("Location", session["success_url"].replace("{CHECKOUT_SESSION_ID}", session["id"]))
                    self.end_headers()
                    return
                price = standin.prices.get(session["line_items"][0]["price"], {"amount": 0, "currency": "usd"})
                html = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>Pay</title></head><body>"
                        f"<h1>Stripe stand-in checkout</h1><p>{session['mode']}: {session['line_items'][0]['price']}, "
                        f"{price['amount'] / 100:.2f} {price['currency'].upper()}</p>"
                        f"<form method=post><button type=submit>Pay</button></form>"
                        f"<p><a href=\"{session['cancel_url']}\">Cancel</a></p></body></html>").encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(html)))
                self.end_headers()
                self.wfile.write(html)

            def do_GET(self) -> None:  # noqa: N802
                if self.path.startswith("/c/pay/"):
                    return self._page("GET")
                self._handle("GET")

            def do_POST(self) -> None:  # noqa: N802
                if self.path.startswith("/c/pay/"):
                    length = int(self.headers.get("Content-Length") or 0)
                    self.rfile.read(length)
                    return self._page("POST")
                self._handle("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StripeStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()

    def route(self, method: str, path: str, p: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        n = next(self.ids)
        if (method, path) == ("POST", "/v1/customers"):
            return 200, fixture("customer", id=f"cus_{n}", email=p.get("email"), metadata=p.get("metadata", {}),
                                discount=None, created=int(time.time()), invoice_prefix=f"SI{n:05d}")
        if (method, path) == ("POST", "/v1/checkout/sessions"):
            session = Shapes.checkout_session(
                f"cs_test_{n}", p["mode"], p.get("customer"), url=f"{self.url}/c/pay/cs_test_{n}",
                client_reference_id=p.get("client_reference_id"), metadata=p.get("metadata", {}), status="open",
                payment_status="unpaid", success_url=p["success_url"], cancel_url=p["cancel_url"],
                line_items=p["line_items"], subscription_data=p.get("subscription_data", {}),
                payment_intent_data=p.get("payment_intent_data", {}))
            self.sessions[session["id"]] = session
            return 200, {k: v for k, v in session.items() if k not in ("line_items", "subscription_data", "payment_intent_data")}
        if (method, path.split("?")[0]) == ("GET", "/v1/payment_methods"):
            query = dict(parse_qsl(path.partition("?")[2]))
            cards = self.cards.get(query.get("customer", ""), [])
            return 200, {"object": "list", "data": [{"id": pm, "object": "payment_method", "type": "card",
                                                     "customer": query["customer"]} for pm in cards],
                         "has_more": False, "url": "/v1/payment_methods"}
        if (method, path) == ("POST", "/v1/payment_intents"):
            if p.get("payment_method") not in self.cards.get(p.get("customer", ""), []):
                return 400, {"error": {"type": "invalid_request_error", "message": "No such PaymentMethod"}}
            if p["customer"] in self.needs_authentication:
                return 402, {"error": {"type": "card_error", "code": "authentication_required",
                                       "message": "This payment requires authentication."}}
            intent = Shapes.payment_intent(f"pi_{n}", p["customer"], int(p["amount"]), p["currency"],
                                           metadata=p.get("metadata", {}), payment_method=p["payment_method"])
            self.charges[intent["id"]] = {"amount": intent["amount"], "currency": intent["currency"], "refunded": 0,
                                          "customer": p["customer"]}
            self.send_event("payment_intent.succeeded", intent)
            return 200, intent
        if (method, path) == ("POST", "/v1/refunds"):
            charge = self.charges.get(p.get("payment_intent", ""))
            if charge is None:
                return 400, {"error": {"type": "invalid_request_error", "message": "No such payment_intent"}}
            amount = int(p.get("amount") or charge["amount"] - charge["refunded"])
            if amount > charge["amount"] - charge["refunded"]:
                return 400, {"error": {"type": "invalid_request_error", "code": "charge_already_refunded",
                                       "message": "Refund amount is greater than what is left to refund"}}
            charge["refunded"] += amount
            refund = fixture("refund", id=f"re_{n}", amount=amount, payment_intent=p["payment_intent"],
                             charge=f"ch_{p['payment_intent']}", currency=charge["currency"], created=int(time.time()),
                             metadata=p.get("metadata", {}), customer=charge.get("customer"))
            event = Shapes.charge(p["payment_intent"], charge.get("customer"), charge["amount"], charge["currency"],
                                  charge["refunded"])
            if self.webhook_url:
                threading.Thread(target=self.send_event, args=("charge.refunded", event), daemon=True).start()
            else:
                self.send_event("charge.refunded", event)
            return 200, refund
        if (method, path) == ("POST", "/v1/billing/meter_events"):
            if self.meter_event_failures:
                self.meter_event_failures -= 1
                return 500, {"error": {"type": "api_error", "message": "An unknown error occurred"}}
            if p.get("identifier") in self.meter_events:    # Stripe keeps identifiers unique for 24 hours at least
                return 400, {"error": {"type": "invalid_request_error",
                                       "message": f"An event already exists with identifier {p['identifier']}."}}
            event = {"object": "billing.meter_event", "created": int(time.time()), "event_name": p["event_name"],
                     "identifier": p.get("identifier") or f"mev_{n}", "livemode": False, "payload": p["payload"],
                     "timestamp": int(p.get("timestamp") or time.time())}
            self.meter_events[event["identifier"]] = event
            return 200, event
        if (method, path) == ("POST", "/v1/billing_portal/sessions"):
            return 200, {"id": f"bps_{n}", "object": "billing_portal.session", "customer": p["customer"],
                         "url": f"https://billing.stripe.test/p/session/bps_{n}"}
        if (method, path) == ("POST", "/v1/invoices/create_preview"):
            sub = self.subscriptions.get(p.get("subscription", ""))
            if sub is None:
                return 404, {"error": {"type": "invalid_request_error", "message": "No such subscription"}}
            old = self.prices.get(sub["items"]["data"][0]["price"]["id"], {"amount": 0, "currency": "usd"})
            new = self.prices.get(p["subscription_details"]["items"][0]["price"], old)
            item = sub["items"]["data"][0]
            left = max(item["current_period_end"] - time.time(), 0) / max(item["current_period_end"] - item["current_period_start"], 1)
            return 200, {"object": "invoice", "amount_due": max(round((new["amount"] - old["amount"]) * left), 0),
                         "currency": new["currency"], "subscription": sub["id"]}
        match = re.fullmatch(r"/v1/subscriptions/(\w+)", path)
        if match and match.group(1) in self.subscriptions:
            sub = self.subscriptions[match.group(1)]
            if method == "POST":
                if "cancel_at_period_end" in p:
                    sub["cancel_at_period_end"] = p["cancel_at_period_end"] == "true"
                for item in p.get("items", []):
                    sub["items"]["data"][0]["price"] = Shapes.price(item["price"], self.prices)
                if self.webhook_url:    # a stand-in with a webhook tells pgtally, as Stripe does
                    threading.Thread(target=self.send_event, args=("customer.subscription.updated", dict(sub)),
                                     daemon=True).start()
            return 200, sub
        return 404, {"error": {"type": "invalid_request_error", "message": f"No such route {method} {path}"}}


def _pay(self, session: dict[str, Any]) -> None:
    """The Pay button: complete the session and send the events Stripe sends, in its order."""
    with self.lock:
        n = next(self.ids)
        price_id = session["line_items"][0]["price"]
        price = self.prices.get(price_id, {"amount": 0, "currency": "usd", "interval": "month"})
        session.update(status="complete", payment_status="paid", amount_total=price["amount"], currency=price["currency"])
        now = int(time.time())
        if session["mode"] == "subscription":
            end = now + (365 if price["interval"] == "year" else 30) * 86400
            account_id = session["subscription_data"].get("metadata", {}).get("account_id")
            sub = Shapes.subscription(f"sub_{n}", session["customer"], account_id, "active", price_id, now, end,
                                      prices=self.prices)
            self.subscriptions[sub["id"]] = sub
            session["subscription"] = sub["id"]
            # A metered price bills in arrears: its first invoice has nothing to bill (no line here).
            lines = [] if price["metered"] else [Shapes.line(f"in_{n}", sub["id"], price_id, price["amount"], now, end,
                                                             currency=price["currency"])]
            invoice = Shapes.invoice(f"in_{n}", session["customer"], sub["id"], lines, currency=price["currency"],
                                     payment_intent=f"pi_in_{n}", number=f"STANDIN-{n:04d}",
                                     billing_reason="subscription_create", account_id=account_id)
            session["invoice"] = invoice["id"]
            self.charges[f"pi_in_{n}"] = {"amount": invoice["amount_paid"], "currency": price["currency"], "refunded": 0,
                                          "customer": session["customer"], "invoice": invoice["id"]}
            events = [("customer.subscription.created", sub), ("checkout.session.completed", session),
                      ("invoice.paid", invoice)]
        else:
            session["payment_intent"] = f"pi_{n}"
            self.charges[f"pi_{n}"] = {"amount": price["amount"], "currency": price["currency"], "refunded": 0,
                                       "customer": session["customer"]}
            if session["payment_intent_data"].get("setup_future_usage") == "off_session":
                self.cards.setdefault(session["customer"], []).append(f"pm_card_{n}")
            events = [("checkout.session.completed", session)]
    public = {k: v for k, v in session.items() if k not in ("line_items", "subscription_data", "payment_intent_data")}
    for type_, obj in events:
        self.send_event(type_, public if obj is session else obj)


def _close_period(self, sub_id: str) -> dict[str, Any]:
    """What Stripe does at the end of a subscription's period: the next invoice, with the new
    period's fixed fee and, for a metered price, the ended period's meter events summed per meter
    and priced (in arrears); then invoice.paid and the subscription's move to the next period."""
    with self.lock:
        sub = self.subscriptions[sub_id]
        item = sub["items"]["data"][0]
        price_id = item["price"]["id"]
        price = self.prices[price_id]
        start, end = item["current_period_start"], item["current_period_end"]
        lines: list[dict[str, Any]] = []
        n = next(self.ids)
        for event_name, unit_amount in (price["metered"] or {}).items():
            units = sum(int(e["payload"]["value"]) for e in self.meter_events.values()
                        if e["event_name"] == event_name and e["payload"]["stripe_customer_id"] == sub["customer"]
                        and start <= e["timestamp"] < end)
            lines.append(Shapes.line(f"in_{n}", sub_id, price_id, units * unit_amount, start, end, quantity=units,
                                     currency=price["currency"], n=len(lines)))
        new_end = end + (end - start)
        if not price["metered"]:
            lines.insert(0, Shapes.line(f"in_{n}", sub_id, price_id, price["amount"], end, new_end,
                                        currency=price["currency"], n=len(lines)))
        invoice = Shapes.invoice(f"in_{n}", sub["customer"], sub_id, lines, currency=price["currency"],
                                 payment_intent=f"pi_in_{n}", number=f"STANDIN-{n:04d}",
                                 account_id=sub["metadata"].get("account_id"))
        self.charges[f"pi_in_{n}"] = {"amount": invoice["amount_paid"], "currency": price["currency"], "refunded": 0,
                                      "customer": sub["customer"], "invoice": invoice["id"]}
        item["current_period_start"], item["current_period_end"] = end, new_end
    self.send_event("invoice.paid", invoice)
    self.send_event("customer.subscription.updated", dict(sub))
    return invoice


def _send_event(self, type_: str, obj: dict[str, Any]) -> None:
    event = self.events.event(type_, obj, id_=f"evt_standin_{next(self.ids)}")
    self.sent.append(event)
    if self.webhook_url:
        import urllib.request

        payload = json.dumps(event).encode()
        request = urllib.request.Request(self.webhook_url, data=payload, method="POST", headers={
            "Content-Type": "application/json", "Stripe-Signature": sign(payload, self.webhook_secret or "")})
        with urllib.request.urlopen(request, timeout=30):
            pass


StripeStandIn.pay = _pay
StripeStandIn.send_event = _send_event
StripeStandIn.close_period = _close_period


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
        """A full-shape subscription (``Shapes.subscription``)."""
        return Shapes.subscription(sub_id, customer, account_id, status, stripe_price, start, end, cancel_at_period_end)


if __name__ == "__main__":
    # Try pgtally's billing offline, checkout page included:
    #   python -m tests.stripe_standin --webhook-url http://127.0.0.1:8000/v1/webhooks/stripe --webhook-secret whsec_local
    #   STRIPE_API_BASE=http://127.0.0.1:12111 STRIPE_API_KEY=sk_test_x STRIPE_WEBHOOK_SECRET=whsec_local make run
    import argparse

    parser = argparse.ArgumentParser(description="A local Stripe stand-in for pgtally")
    parser.add_argument("port", nargs="?", type=int, default=12111)
    parser.add_argument("--webhook-url", help="where to send the signed events (pgtally's /v1/webhooks/stripe)")
    parser.add_argument("--webhook-secret", default="whsec_local", help="the secret to sign them with")
    args = parser.parse_args()
    standin = StripeStandIn(args.webhook_url, args.webhook_secret)
    standin.server.server_close()
    standin.server = ThreadingHTTPServer(("127.0.0.1", args.port), standin.server.RequestHandlerClass)
    standin.url = f"http://127.0.0.1:{args.port}"
    print(f"Stripe stand-in on {standin.url}; events to {args.webhook_url or 'nowhere'}", flush=True)
    standin.server.serve_forever()
