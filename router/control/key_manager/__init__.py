"""The Key Manager (/key/manage): a web page where researchers sign in with the lab's identity,
make and revoke their own keys and see their spend, and where admins see users, keys and models.

Server-rendered Jinja2 pages, a little JavaScript (copy button, confirmations, the models table
kept fresh) and CSS, shipped in this package (no CDN). Pages read the daily spend aggregate and
indexed, paginated key and user lists; never the ledger.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from starlette.staticfiles import StaticFiles

from ...config import Settings
from . import admin, oidc, pages
from .errors import PageError
from .render import HERE, page
from .sessions import PATH, Sessions, session_secret

if TYPE_CHECKING:
    from ...app import Gateway

log = logging.getLogger("cborg.key_manager")


@dataclass
class KeyManager:
    settings: Settings
    secret: str
    oidc: Any        # Authlib's client for the lab's provider, or None


def install(app: FastAPI, gw: "Gateway") -> None:
    """Add the Key Manager's routes, static files, error pages and cookie sessions to the control plane."""
    s = gw.settings
    secret, source = session_secret(s)
    km = app.state.key_manager = KeyManager(s, secret, oidc.client(s))
    if km.oidc is None:
        log.info("Key Manager: no CBORG_OIDC_ISSUER: admins sign in with the master key; researchers cannot "
                 "sign in (session key: %s)", source)
    elif not s.oidc_allowed_domains:
        log.warning("Key Manager: CBORG_OIDC_ALLOWED_DOMAINS is empty: anyone %s vouches for may sign in",
                    s.oidc_issuer)
    for r in (pages.router, oidc.router, admin.router):
        app.include_router(r)
    app.mount(PATH + "/static", StaticFiles(directory=HERE / "static"), name="km-static")

    @app.exception_handler(PageError)
    async def _page_error(request: Request, e: PageError):
        return page(request, "error.html", e.status, message=e.message, signin=e.signin)

    app.add_middleware(Sessions, secret=secret)
