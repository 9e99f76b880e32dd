"""The researcher's page (/key/manage): their keys, budget, 30-day spend and models; making and
revoking keys of their own; sign-in with the master key where OIDC is not configured; sign-out."""
from __future__ import annotations

import logging
import time

from fastapi import APIRouter, Request

from ... import auth
from ...durations import parse_duration
from ...key_admin import KeyInputError, create_key, validate
from ..deps import gateway
from ..keys import revoke as revoke_key
from ..schemas import KeyGenerate
from .data import self_service_spec, user_view
from .errors import PageError
from .render import back, flash, page
from .sessions import PATH, checked_form, master_fingerprint, require, sign_in, viewer

log = logging.getLogger("cborg.key_manager")

router = APIRouter(include_in_schema=False)

EXPIRY_CHOICES = ("7d", "30d", "90d", "180d", "365d")


def expiry_choices(conf) -> list[str]:
    """The lifetimes a researcher may pick: the usual ones up to the lab's maximum, its default,
    and "never" where the lab sets no maximum."""
    top = conf.max_expiry_s
    out = {c for c in EXPIRY_CHOICES if top is None or parse_duration(c) <= top} | {conf.default_expiry}
    return sorted(out, key=parse_duration) + (["never"] if top is None else [])


async def user_page(request: Request, email: str, status: int = 200, error: str | None = None) -> object:
    gw = gateway(request)
    conf = gw.catalog.conf.key_manager
    return page(request, "user.html", status, view=await user_view(gw, email), error=error,
                expiries=expiry_choices(conf), default_expiry=conf.default_expiry, conf=conf)


@router.get(PATH)
async def home(request: Request):
    v = viewer(request)
    if v is None:
        km = request.app.state.key_manager
        return page(request, "signin.html", oidc=km.oidc is not None, master=bool(km.settings.master_key),
                    issuer=km.settings.oidc_issuer)
    if v.email is None:
        return back(PATH + "/admin")
    return await user_page(request, v.email)


@router.post(PATH + "/master-login")
async def master_login(request: Request):
    km = request.app.state.key_manager
    form = await checked_form(request)
    if km.oidc is not None:
        raise PageError(404, "Administrators sign in with the lab's identity provider on this gateway.")
    if not auth.master_matches(km.settings.master_key, str(form.get("master_key") or "")):
        log.warning("Key Manager: a master-key sign-in failed")
        return page(request, "signin.html", 401, oidc=False, master=bool(km.settings.master_key),
                    error="That is not this gateway's master key.")
    sign_in(request, {"via": "master", "mk": master_fingerprint(km.settings, km.secret)})
    return back(PATH + "/admin")


@router.post(PATH + "/logout")
async def logout(request: Request):
    await checked_form(request)
    request.session.clear()
    return back(PATH)


@router.post(PATH + "/keys")
async def new_key(request: Request):
    v = require(request)
    if v.email is None:
        raise PageError(403, "The master key has no keys of its own: sign in with a lab account to make keys.")
    form = await checked_form(request)
    gw = gateway(request)
    conf = gw.catalog.conf.key_manager
    expiry = str(form.get("expiry") or conf.default_expiry)
    models = [m for m in form.getlist("models") if isinstance(m, str) and m]
    spec = self_service_spec(gw, v.email)
    try:
        if expiry not in expiry_choices(conf):
            raise KeyInputError(f"expiry: choose one of {', '.join(expiry_choices(conf))}.", "expiry")
        bad = [m for m in models if (r := gw.catalog.resolve(m)) is None or not auth.allowed(spec, r)]
        if bad:
            raise KeyInputError(f"models: not offered for keys made here: {', '.join(bad)[:200]}.", "models")
        body = validate(KeyGenerate, {"user_id": v.email, "key_alias": str(form.get("alias") or "").strip() or None,
                                      "models": models or spec.models, "duration": expiry,
                                      "metadata": {"created_via": "key manager"}})
        now = time.time()
        mine = [k for k in await gw.store.list_keys(v.email) if k.expires_at is None or k.expires_at > now]
        if any(k.blocked for k in mine):    # revoked or not: no way round an admin's block
            raise KeyInputError("An administrator has blocked one of your keys: ask them before you make "
                                "new ones.")
        held = [k for k in mine if k.revoked_at is None]
        if len(held) >= conf.max_keys_per_user:
            raise KeyInputError(f"You hold {len(held)} keys, the most allowed here: revoke one you no longer "
                                "use first.")
        secret, rec = await create_key(gw.store, body, catalog=gw.catalog)
    except KeyInputError as e:
        return await user_page(request, v.email, 400, error=str(e))
    gw.keys.put(rec)
    log.info("Key Manager: %s made key %s", v.email, rec.id)
    base = str(request.base_url).rstrip("/")
    return page(request, "key_created.html", 201, secret=secret, key=rec, base=base)


@router.post(PATH + "/keys/{key_id}/revoke")
async def revoke(request: Request, key_id: str):
    v = require(request)
    await checked_form(request)
    gw = gateway(request)
    rec = await gw.store.find_key(key_id)
    if rec is None or rec.id != key_id or rec.user_id != v.email:
        raise PageError(404, "You have no such key.")
    if rec.revoked_at is None:
        rec = await revoke_key(gw, rec)
        log.info("Key Manager: %s revoked key %s", v.email, rec.id)
    flash(request, f"Key {rec.alias or rec.key_hint} is revoked: it no longer works.")
    return back(PATH)
