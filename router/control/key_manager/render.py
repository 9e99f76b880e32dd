"""Pages from Jinja2 templates (autoescaped), with what every page shows (who is signed in, the CSRF
token, a one-time notice) and the headers every page gets: no caching (keys and spend), and a
content security policy that allows this site's own scripts, styles and forms only."""
from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastapi.templating import Jinja2Templates
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse

from .sessions import PATH, csrf_token, viewer

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
STATIC_VERSION = str(int(max(p.stat().st_mtime for p in (HERE / "static").iterdir())))

HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


def money(v: float | None) -> str:
    """Dollars as people read them: cents, or the first digits of a fraction of a cent."""
    if v is None:
        return "no limit"
    if v == 0 or v >= 0.00995:
        return f"${v:,.2f}"
    if v < 1e-10:
        return "< $0.0000000001"
    return f"${v:.{1 - math.floor(math.log10(v))}f}"     # two significant digits: $0.0000015


def date(ts: float | str | None) -> str:
    if ts is None:
        return "never"
    if isinstance(ts, str):     # ISO 8601 from router/control/views.py
        return ts[:10]
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d")


templates.env.filters.update(money=money, date=date)
templates.env.globals.update(PATH=PATH, STATIC_VERSION=STATIC_VERSION)


def flash(request: Request, text: str, kind: str = "ok") -> None:
    """A notice shown once, on the next page (after a POST's redirect)."""
    request.session["flash"] = {"text": text[:500], "kind": kind}


def page(request: Request, name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
    ctx.setdefault("viewer", viewer(request))
    ctx.update(request=request, csrf=csrf_token(request), flash=request.session.pop("flash", None))
    return templates.TemplateResponse(request, name, ctx, status_code=status, headers=HEADERS)


def back(to: str) -> RedirectResponse:
    """After a POST: see the page again (303: as a GET)."""
    return RedirectResponse(to, 303, headers={"Cache-Control": "no-store"})
