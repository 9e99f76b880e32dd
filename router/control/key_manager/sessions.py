"""Who is signed in to the Key Manager: signed cookie sessions, CSRF tokens, the viewer.

Sessions are Starlette's SessionMiddleware (itsdangerous-signed, not encrypted: they hold an
e-mail, a CSRF token and the sign-in's OIDC state, never a key), HttpOnly, SameSite=Lax (the
identity provider's redirect back is a top-level GET, which Strict would strip), scoped to
/key/manage, Secure when the request came over HTTPS (directly, or X-Forwarded-Proto from a proxy
uvicorn trusts), and valid for SESSION_S after sign-in.

The signing key, so that restarts and replicas agree without an extra setting:
CBORG_SESSION_SECRET when set; else derived from CBORG_MASTER_KEY (replicas share it; rotating it
signs everyone out); else random, made once and kept in CBORG_HOME/session-secret (mode 0600).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from starlette.datastructures import FormData
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request

from common.paths import cborg_home

from ... import auth
from ...config import Settings
from .errors import PageError

COOKIE = "cborg_km"
PATH = "/key/manage"
SESSION_S = 12 * 3600


def session_secret(settings: Settings, home: Path | None = None) -> tuple[str, str]:
    """The cookies' signing key, and where it came from (for the start-up log)."""
    if settings.session_secret:
        return settings.session_secret, "CBORG_SESSION_SECRET"
    if settings.master_key:
        return (hmac.new(settings.master_key.encode(), b"cborg key manager sessions", hashlib.sha256).hexdigest(),
                "derived from CBORG_MASTER_KEY")
    path = (home or cborg_home()) / "session-secret"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)   # first process wins
    except FileExistsError:
        return path.read_text().strip(), str(path)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32))
    return path.read_text().strip(), str(path)


class Sessions:
    """SessionMiddleware with the Secure flag on the cookies of requests that came over HTTPS."""

    def __init__(self, app, secret: str):
        kw = {"secret_key": secret, "session_cookie": COOKIE, "max_age": SESSION_S, "path": PATH, "same_site": "lax"}
        self.plain = SessionMiddleware(app, https_only=False, **kw)
        self.secure = SessionMiddleware(app, https_only=True, **kw)

    async def __call__(self, scope, receive, send) -> None:
        mw = self.secure if scope.get("scheme") in ("https", "wss") else self.plain
        await mw(scope, receive, send)


# -- CSRF: a random token per session, in every form; a POST without it is refused ---------------
def csrf_token(request: Request) -> str:
    tok = request.session.get("csrf")
    if not tok:
        tok = request.session["csrf"] = secrets.token_urlsafe(24)
    return tok


async def checked_form(request: Request) -> FormData:
    """The POSTed form, once its CSRF token matches the session's; 403 otherwise."""
    form = await request.form(max_files=0, max_fields=200)
    sent = form.get("csrf")
    want = request.session.get("csrf")
    if not want or not isinstance(sent, str) or not hmac.compare_digest(want.encode(), sent.encode()):
        raise PageError(403, "This form did not come from your Key Manager page, or your session ended. "
                             "Reload the page and try again.")
    return form


# -- the viewer ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Viewer:
    email: str | None       # None: an admin signed in with the master key (no keys of their own)
    name: str | None
    admin: bool


def master_fingerprint(settings: Settings, secret: str) -> str:
    """Ties a master-key session to the key it was opened with: a new master key ends it."""
    return hmac.new(secret.encode(), (settings.master_key or "").encode(), hashlib.sha256).hexdigest()[:32]


def sign_in(request: Request, who: dict) -> None:
    """A fresh session (new CSRF token) for someone just signed in."""
    request.session.clear()
    request.session["who"] = who
    csrf_token(request)


def viewer(request: Request) -> Viewer | None:
    """Who this request's session belongs to, decided again at every request (router/auth.py): an
    e-mail taken off CBORG_ADMIN_EMAILS or out of the allowed domains loses access at once."""
    who = request.session.get("who")
    if not isinstance(who, dict):
        return None
    km = request.app.state.key_manager
    s: Settings = km.settings
    if who.get("via") == "master":
        ok = bool(s.master_key) and hmac.compare_digest(who.get("mk", ""), master_fingerprint(s, km.secret))
        return Viewer(None, "Administrator (master key)", True) if ok else None
    email = who.get("email")
    if who.get("via") != "oidc" or not isinstance(email, str) or not km.oidc:
        return None
    role = auth.key_manager_role(email, s.oidc_allowed_domains, s.admin_emails)
    return Viewer(email, who.get("name"), role == "admin") if role else None


def require(request: Request, admin: bool = False) -> Viewer:
    v = viewer(request)
    if v is None:
        raise PageError(401, "Sign in first.", signin=True)
    if admin and not v.admin:
        raise PageError(403, "This page is for the service's administrators.")
    return v
