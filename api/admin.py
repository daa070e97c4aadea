"""``/admin/metrics``: the operators' charts (MRR, active accounts, conversion, usage), drawn as
SVG by pygal on the server (no script, nothing from a CDN), for users with a staff role
(``pgtally staff grant EMAIL ROLE``). The numbers come from the reporting views through
``api.metrics_report``, the same ones ``pgtally report`` prints."""

from __future__ import annotations

from typing import Any

import pygal
from litestar import Request, Response, get
from litestar.params import FromPath
from pygal.style import CleanStyle

from api.calls import call, call_json
from api.errors import PgtallyError
from api.web import browser_session, page, to_login

CHARTS = {
    "mrr": "Monthly recurring revenue",
    "active_accounts": "Active accounts (DAU, WAU, MAU)",
    "conversion": "Free-to-paid conversion by sign-up month",
    "usage": "Usage per day",
}
SVG_HEADERS = {"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
               "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


def draw(name: str, rows: list[dict[str, Any]]) -> bytes:
    """One chart as SVG, from a report's rows."""
    options = dict(style=CleanStyle, js=[], width=800, height=320, show_legend=True, x_label_rotation=30,
                   disable_xml_declaration=False, no_data_text="No data yet", truncate_label=12)
    if name == "mrr":
        chart = pygal.Line(title=CHARTS[name] + " (major units)", **options)
        chart.x_labels = [r["month"] for r in rows]
        for currency in sorted({r["currency"] for r in rows}):
            chart.add(currency.upper(), [float(r["mrr_minor"]) / 100 if r["currency"] == currency else None for r in rows])
    elif name == "active_accounts":
        chart = pygal.Line(title=CHARTS[name], **options)
        chart.x_labels = [r["day"] for r in rows]
        for series in ("dau", "wau", "mau"):
            chart.add(series.upper(), [r[series] for r in rows])
    elif name == "conversion":
        chart = pygal.Bar(title=CHARTS[name] + " (%)", **options)
        chart.x_labels = [r["cohort"] for r in rows]
        chart.add("converted", [float(r["conversion_percent"]) for r in rows])
    else:
        chart = pygal.Bar(title=CHARTS[name], **options)
        chart.x_labels = [r["day"] for r in rows]
        chart.add("events", [r["events"] for r in rows])
    return chart.render()


async def staff_only(request: Request) -> Any:
    """The signed-in session id of a staff user; False for a customer; None when signed out."""
    session_id = browser_session(request)
    if session_id is None:
        return None
    (role,) = await call(request, "SELECT api.staff_role(%s::uuid)", [session_id])
    return session_id if role else False


@get("/admin/metrics")
async def metrics_page(request: Request) -> Any:
    """The charts, for staff; customers get 403, visitors the login page."""
    session_id = await staff_only(request)
    if session_id is None:
        return to_login(request)
    if session_id is False:
        return page("message.html", request, 403, title="Staff only", message="This page is for pgtally's operators.")
    return page("admin_metrics.html", request, charts=CHARTS)


@get("/admin/metrics/charts/{name:str}")
async def metrics_chart(request: Request, name: FromPath[str]) -> Response[bytes]:
    session_id = await staff_only(request)
    if not session_id or name not in CHARTS:
        raise PgtallyError({"sqlstate": "TL403" if session_id is False else "TL404", "message": "no such chart for you"})
    rows = await call_json(request, "SELECT api.metrics_report(%s::uuid, %s::text)", [session_id, name])
    return Response(draw(name, rows), media_type="image/svg+xml", headers=SVG_HEADERS)


ROUTES = [metrics_page, metrics_chart]
