"""The admin pages (/key/manage/admin): users with spend and limits (set through UserUpdate, as
/user/update), every key (search, block, revoke; keyset pages, so page 2,000 costs what page 1
does), models and nodes with load / unload / swap (ModelAdmin, as /admin/models/*)."""
from __future__ import annotations

import logging
import re
from urllib.parse import quote

from fastapi import APIRouter, Request
from pydantic import ValidationError

from common.asgi import HTTPError
from common.control_errors import validation_message

from ...auth import hash_key
from ...key_admin import KeyInputError, validate
from ..deps import gateway
from ..keys import revoke, set_blocked
from ..models_admin import ModelAdmin
from ..schemas import ModelSwap, ModelTarget, UserUpdate
from ..users import set_limits
from .data import key_rows, user_rows, user_view
from .errors import PageError
from .render import HEADERS, back, flash, page, templates
from .sessions import PATH, checked_form, require

log = logging.getLogger("cborg.key_manager")

ADMIN = PATH + "/admin"
router = APIRouter(prefix=ADMIN, include_in_schema=False)

PAGE = 50
LIMIT_FIELDS = ("max_budget", "budget_duration", "max_parallel_requests", "rpm_limit", "tpm_limit")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def text_param(v: str | None, limit: int = 320) -> str:
    """A search box's text, or "" for what no user or key could match."""
    v = (v or "").strip()
    return "" if len(v) > limit or _CONTROL.search(v) else v


def return_to(form, default: str) -> str:
    """Where to go after an action: the admin page it came from (never another site)."""
    to = str(form.get("back") or "")
    return to if to.startswith(ADMIN) and "//" not in to and not _CONTROL.search(to) else default


@router.get("")
async def admin_home(request: Request):
    require(request, admin=True)
    return back(ADMIN + "/users")


# -- users ---------------------------------------------------------------------------------------
@router.get("/users")
async def users(request: Request, q: str = "", after: str = ""):
    v = require(request, admin=True)
    gw = gateway(request)
    q, after = text_param(q), text_param(after)
    found = await gw.store.list_users(q, after, PAGE + 1)
    rows = await user_rows(gw, found[:PAGE])
    return page(request, "admin_users.html", viewer=v, rows=rows, q=q, after=after,
                next_after=rows[-1]["user_id"] if len(found) > PAGE else None)


@router.get("/user")
async def user(request: Request, u: str = ""):
    v = require(request, admin=True)
    uid = text_param(u)
    if not uid:
        raise PageError(404, "Name a user: /key/manage/admin/user?u=someone@lbl.gov")
    gw = gateway(request)
    return page(request, "admin_user.html", viewer=v, view=await user_view(gw, uid), fields=LIMIT_FIELDS)


@router.post("/user/limits")
async def user_limits(request: Request):
    require(request, admin=True)
    form = await checked_form(request)
    gw = gateway(request)
    data = {f: str(form.get(f) or "").strip() or None for f in LIMIT_FIELDS}
    data["user_id"] = str(form.get("user_id") or "")
    to = f"{ADMIN}/user?u={quote(data['user_id'], safe='@')}"     # an id with + & # is still that id
    try:
        body = validate(UserUpdate, data)       # the checks of /user/update: a blank field is the default
    except KeyInputError as e:
        flash(request, f"Not saved: {e}", "error")
        return back(to)
    await set_limits(gw, body.user_id, body.changes())
    log.info("Key Manager: limits of %s set: %s", body.user_id, body.changes())
    flash(request, f"Limits of {body.user_id} saved.")
    return back(to)


# -- keys ----------------------------------------------------------------------------------------
def cursor(before: str) -> tuple[float, str] | None:
    """`<created_at>_<id>` of the last key on the previous page."""
    ts, _, kid = before.partition("_")
    try:
        return (float(ts), kid) if kid else None
    except ValueError:
        return None


@router.get("/keys")
async def keys(request: Request, q: str = "", before: str = ""):
    v = require(request, admin=True)
    gw = gateway(request)
    q = text_param(q, 512)
    text = hash_key(q) if q.startswith("sk-") else q     # a pasted secret finds its key
    found = await gw.store.search_keys(text or None, cursor(text_param(before)), PAGE + 1)
    last = found[PAGE - 1] if len(found) > PAGE else None
    return page(request, "admin_keys.html", viewer=v, rows=key_rows(gw, found[:PAGE]), q=q,
                total=await gw.store.count_keys(), first=not before,
                next_before=f"{last.created_at!r}_{last.id}" if last else None)


@router.post("/keys/{key_id}/{action}")
async def key_action(request: Request, key_id: str, action: str):
    v = require(request, admin=True)
    form = await checked_form(request)
    gw = gateway(request)
    rec = await gw.store.find_key(key_id)
    if rec is None or rec.id != key_id:
        raise PageError(404, "No such key.")
    if action == "revoke":
        rec = await revoke(gw, rec)
    elif action in ("block", "unblock"):
        rec = await set_blocked(gw, rec, action == "block")
    else:
        raise PageError(404, f"Unknown action {action[:40]!r}.")
    done = {"revoke": "revoked", "block": "blocked", "unblock": "unblocked"}[action]
    log.info("Key Manager: %s: %s key %s of %s", v.email or "master key", done, rec.id, rec.user_id)
    flash(request, f"Key {rec.alias or rec.key_hint} of {rec.user_id} {done}.")
    return back(return_to(form, ADMIN + "/keys"))


# -- models and nodes ----------------------------------------------------------------------------
def models_context(gw) -> dict:
    view = gw.nodes.view()
    busy = any(d.get("state") in ("loading", "draining") for n in view["nodes"] for d in n["deployments"])
    alternatives: dict[str, list[str]] = {}
    for n in view["nodes"]:
        for d in n["deployments"]:
            alternatives.setdefault(d.get("model"), [])
            if d.get("state") in ("stopped", "failed"):
                alternatives[d.get("model")].append(d.get("name"))
    return {"nodes": view["nodes"], "models": view["models"], "profile": view["profile"], "busy": busy,
            "alternatives": alternatives}


@router.get("/models")
async def models(request: Request):
    v = require(request, admin=True)
    return page(request, "admin_models.html", viewer=v, **models_context(gateway(request)))


@router.get("/models/table")
async def models_table(request: Request):
    """The nodes' tables alone: the page's script reloads them while something loads or drains."""
    require(request, admin=True)
    return templates.TemplateResponse(request, "_models.html", {"request": request, **models_context(gateway(request)),
                                      "csrf": request.session.get("csrf", "")}, headers=HEADERS)


@router.post("/models/{action}")
async def model_action(request: Request, action: str):
    v = require(request, admin=True)
    form = await checked_form(request)
    ma = ModelAdmin(gateway(request))
    fields = {k: str(form.get(k)) for k in ("name", "node", "model", "to") if form.get(k)}
    try:
        if action == "swap":
            body = ModelSwap.model_validate(fields)
            await ma.swap(body.model, body.to, body.node)
            what = f"Swapping {body.model} to {body.to}"
        elif action in ("load", "unload"):
            body = ModelTarget.model_validate(fields)
            await ma.command("/" + action, body.name, body.node)
            what = f"{action.capitalize()}ing {body.name}"
        else:
            raise PageError(404, f"Unknown action {action[:40]!r}.")
    except ValidationError as e:
        flash(request, f"Not done: {validation_message(list(e.errors()))[0]}", "error")
    except HTTPError as e:
        flash(request, f"Not done: {e.message}", "error")
    else:
        log.info("Key Manager: %s: %s", v.email or "master key", what)
        flash(request, what + ": the table shows how it goes.")
    return back(ADMIN + "/models")
